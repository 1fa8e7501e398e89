"""Stage 2 of a round, the offline stage's majority vote (paper: Method, offline stage, the pseudo-preference p* of a
pair by majority of its K votes): votes.jsonl -> pseudo-labels, plus a Bradley-Terry ranking and statistics.

One process is enough at every scale (numpy/scipy, no model; about 30 s per 200,000 pairs on 2 cores):

    python build_pseudolabels.py --votes runs/r1/votes.jsonl --out runs/r1/pseudolabels.jsonl \
        --rankings runs/r1/rankings.jsonl --stats runs/r1/stats.json

The paper's scale (20,000 pairs x K = 32 in round 1, 25,000 in round 2) is the same command.
Writes --out, one line per kept pair {"a", "b", "kind", "p_star", "votes_a", "votes_b", "abstain"} in input order,
and --rankings (one line per image, best first) and --stats (JSON) when given. Rules: docs/implementation.md.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from scipy.optimize import minimize
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.special import expit

import common
import votes


@dataclass
class Args:
    votes: str = common.arg(help="votes.jsonl written by sample_votes.py (compare or score mode)")
    out: str = common.arg(help="where to write the pseudo-labels (JSONL, one line per kept pair)")
    rankings: str = common.arg("", help="also write a per-image ranking here (JSONL, best first)")
    stats: str = common.arg("", help="also write statistics here (JSON)")
    pairs: str = common.arg("", help="score mode: the drawn pairs (default: <votes>.pairs.jsonl)")
    label: str = common.arg("hard", help="hard: majority 1/0.5/0 (the paper); soft: K_a / (K_a + K_b)",
                            choices=["hard", "soft"])
    min_margin: float = common.arg(0.0, help="drop pairs with |K_a - K_b| / (K_a + K_b) below this")
    min_valid_votes: int = common.arg(1, help="drop pairs with fewer valid (non-abstaining) votes than this")
    drop_ties: bool = common.arg(False, help="drop pairs whose votes are tied (the paper keeps them as 0.5)")
    bt_prior: float = common.arg(0.1, help="Bradley-Terry prior: virtual games per image vs a theta=0 reference")
    oracle: str = common.arg("", help="control: p* of every voted pair from this JSONL of {image, mos} (true "
                             "quality) instead of the votes: the ceiling of what perfect voting could teach")


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: votes -> pseudo-labels (paper: hard majority, ties = 0.5)
# ---------------------------------------------------------------------------------------------------------------------


def pseudo_labels(votes_a: np.ndarray, votes_b: np.ndarray, label: str = "hard", min_margin: float = 0.0,
                  min_valid_votes: int = 1, drop_ties: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """(p*, keep mask, number dropped by each rule). Each dropped pair is counted under the first rule that drops it."""
    valid = votes_a + votes_b
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 only where valid == 0, which is always dropped
        margin = np.abs(votes_a - votes_b) / valid
        soft = votes_a / valid
    hard = np.where(votes_a > votes_b, 1.0, np.where(votes_a < votes_b, 0.0, 0.5))
    p_star = hard if label == "hard" else soft
    keep = valid >= min_valid_votes
    dropped = {"min_valid_votes": int((~keep).sum())}
    for rule, drop in (("min_margin", margin < min_margin), ("ties", (votes_a == votes_b) & drop_ties)):
        dropped[rule] = int((keep & drop).sum())
        keep &= ~drop
    return p_star, keep, dropped


def oracle_labels(mos: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The control: p* = 1 if mos_a > mos_b, 0 if lower, 0.5 if equal (what unanimous, correct votes would give)."""
    return np.where(mos[a] > mos[b], 1.0, np.where(mos[a] < mos[b], 0.0, 0.5))


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: votes -> rankings (Bradley-Terry MAP by Newton-CG; the penalised likelihood is written out below)
# ---------------------------------------------------------------------------------------------------------------------


def bradley_terry(a: np.ndarray, b: np.ndarray, votes_a: np.ndarray, votes_b: np.ndarray, n_images: int,
                  prior_games: float = 0.1) -> np.ndarray:
    """Log-strengths theta maximising
        sum_pairs [K_a log sigmoid(theta_a - theta_b) + K_b log sigmoid(theta_b - theta_a)]
      + prior_games / 2 * sum_images [log sigmoid(theta_i) + log sigmoid(-theta_i)]
    (the prior: virtual games against a reference of theta = 0, half won, half lost). Strictly concave, so the
    maximiser is unique and finite even for undefeated images or a disconnected comparison graph."""
    votes_a, votes_b = votes_a.astype(np.float64), votes_b.astype(np.float64)
    n = votes_a + votes_b

    def to_images(per_pair: np.ndarray) -> np.ndarray:  # d(theta_a - theta_b) -> +a, -b
        return np.bincount(a, per_pair, n_images) - np.bincount(b, per_pair, n_images)

    def loss_and_grad(theta):
        d = theta[a] - theta[b]
        loss = votes_a @ np.logaddexp(0, -d) + votes_b @ np.logaddexp(0, d)
        loss += prior_games / 2 * (np.logaddexp(0, -theta) + np.logaddexp(0, theta)).sum()
        grad = to_images(n * expit(d) - votes_a) + prior_games / 2 * np.tanh(theta / 2)  # tanh(x/2) = 2 sigmoid - 1
        return loss, grad

    cached = {}  # the inner CG loop asks for many Hessian-vector products at one theta: weigh the pairs once

    def hessp(theta, v):  # the Hessian is a vote-weighted graph Laplacian plus the prior's diagonal
        if not np.array_equal(cached.get("theta"), theta):
            s, t = expit(theta[a] - theta[b]), expit(theta)
            cached.update(theta=theta.copy(), pairs=n * s * (1 - s), images=prior_games * t * (1 - t))
        return to_images(cached["pairs"] * (v[a] - v[b])) + cached["images"] * v

    # Newton-CG stops when the mean |Newton step| < xtol: theta is then far more precise than the 6 decimals we print
    result = minimize(loss_and_grad, np.zeros(n_images), jac=True, hessp=hessp, method="Newton-CG",
                      options={"xtol": 1e-8, "maxiter": 200})
    # Converged when each image's expected wins match its actual wins to 1e-6 of its games; "precision loss" from
    # the line search right at the optimum is not a failure
    games = np.bincount(a, n, n_images) + np.bincount(b, n, n_images) + prior_games
    residual = np.abs(result.jac) / games
    if residual.max() > 1e-6:
        warnings.warn(f"Bradley-Terry fit did not converge: {result.message} (largest win residual "
                      f"{residual.max():.2e} of an image's games)")
    return result.x


def rankings(names: list[str], a: np.ndarray, b: np.ndarray, votes_a: np.ndarray, votes_b: np.ndarray,
             theta: np.ndarray) -> list[dict]:
    """One record per image, best first (ties in theta broken by name)."""
    n = len(names)
    count = lambda mask, idx: np.bincount(idx[mask], minlength=n)
    wins = count(votes_a > votes_b, a) + count(votes_b > votes_a, b)
    losses = count(votes_a < votes_b, a) + count(votes_b < votes_a, b)
    ties = count(votes_a == votes_b, a) + count(votes_a == votes_b, b)
    comparisons = wins + losses + ties
    name_order = np.empty(n, np.int64)
    name_order[sorted(range(n), key=names.__getitem__)] = np.arange(n)
    order = np.lexsort((name_order, -theta))
    return [{"image": names[i], "rank": rank, "bt_strength": round(float(theta[i]), 6),
             "win_rate": round((wins[i] + ties[i] / 2) / comparisons[i], 6) if comparisons[i] else None,
             "wins": int(wins[i]), "losses": int(losses[i]), "ties": int(ties[i]), "comparisons": int(comparisons[i])}
            for rank, i in enumerate(order, 1)]


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: reading and validation (the votes file itself: votes.py)
# ---------------------------------------------------------------------------------------------------------------------


def check_args(args: Args) -> None:
    if args.min_valid_votes < 1:
        common.die("--min-valid-votes must be at least 1 (a pair without a valid vote has no label)")
    if not 0 <= args.min_margin <= 1 or not args.bt_prior > 0:
        common.die("--min-margin must be in [0, 1] and --bt-prior positive")
    if args.oracle and (args.label != "hard" or args.min_margin or args.drop_ties or args.min_valid_votes != 1):
        common.die("--oracle labels every voted pair from the true quality: --label, --min-margin, --drop-ties and "
                   "--min-valid-votes apply to votes")
    if args.oracle and not Path(args.oracle).is_file():
        common.die(f"oracle file {args.oracle} not found")
    if not Path(args.votes).is_file():
        common.die(f"votes file {args.votes} not found")


def read_inputs(args: Args) -> tuple[str, list[str], dict[str, np.ndarray], dict, Optional[np.ndarray]]:
    """(mode, image names, one row per unique pair with its vote counts, reading info, the --oracle mos or None)."""
    try:
        mode, names, pairs, info = votes.read_votes(Path(args.votes), Path(args.pairs or f"{args.votes}.pairs.jsonl"))
        return mode, names, pairs, info, read_oracle(Path(args.oracle), names, pairs) if args.oracle else None
    except ValueError as e:
        common.die(str(e))


def read_oracle(path: Path, names: list[str], pairs: dict[str, np.ndarray]) -> np.ndarray:
    """The true quality of each image (NaN for images in no pair), from {"image", "mos"} lines; names resolved as
    the votes' names. A voted image without one is an error naming it."""
    index = {name: i for i, name in enumerate(names)}
    mos, seen = np.full(len(names), np.nan), set()
    for lineno, r in common.iter_jsonl(path):
        image, value = r.get("image"), r.get("mos")
        if type(value) not in (int, float) or not np.isfinite(value):
            raise ValueError(f"{path}:{lineno}: expected {{\"image\": name, \"mos\": a finite number}}")
        name = common.safe_name(".", image, f"{path}:{lineno}")
        if name in seen:
            raise ValueError(f"{path}:{lineno}: image {image!r} is listed twice")
        seen.add(name)
        if name in index:
            mos[index[name]] = value
    voted = np.unique(np.concatenate([pairs["a"], pairs["b"]]))
    missing = voted[np.isnan(mos[voted])]
    if len(missing):
        raise ValueError(f"{path}: no mos for the voted image {names[missing[0]]!r} ({len(missing)} voted image(s) "
                         "missing)")
    return mos


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: statistics and output
# ---------------------------------------------------------------------------------------------------------------------


def graph_stats(pairs: dict[str, np.ndarray], keep: np.ndarray, n_images: int) -> dict:
    """The comparison graph of the kept pairs: how many images it reaches, in how many connected components."""
    kept_a, kept_b = pairs["a"][keep], pairs["b"][keep]
    graph = coo_matrix((np.ones(len(kept_a)), (kept_a, kept_b)), shape=(n_images, n_images))
    labels = connected_components(graph, directed=False)[1]
    compared = np.zeros(n_images, bool)
    compared[kept_a] = compared[kept_b] = True
    sizes = np.bincount(labels[compared])
    return {"images_in_kept_pairs": int(compared.sum()), "connected_components": int((sizes > 0).sum()),
            "largest_component_images": int(sizes.max()) if len(sizes) else 0}


def label_stats(mode: str, n_images: int, pairs: dict[str, np.ndarray], keep: np.ndarray, dropped: dict,
                info: dict) -> dict:
    return {"mode": mode, "pair_records_in": info["pair_records"], "duplicate_records_merged": info["duplicate_records"],
            "pairs_in": len(keep), "pairs_kept": int(keep.sum()),
            "pairs_dropped": dropped,  # each pair under the first rule that drops it, in this order
            "images": n_images, **votes.vote_stats(pairs), **votes.truncation_stats(info["truncation"]),
            **graph_stats(pairs, keep, n_images), "by_kind": votes.kind_stats(pairs, keep)}


def pseudolabel_lines(names: list[str], kept: dict[str, np.ndarray], p_star: np.ndarray) -> Iterator[str]:
    """Exactly json.dumps({"a", "b", "kind", "p_star", "votes_a", "votes_b", "abstain"}) per pair, but each name is
    escaped once instead of once per pair (json.dumps of a million dicts costs seconds)."""
    quoted = [json.dumps(name, ensure_ascii=False) for name in names]
    kinds = [json.dumps(kind) for kind in votes.KINDS]
    for a, b, k, p, va, vb, ab in zip(kept["a"].tolist(), kept["b"].tolist(), kept["kind"].tolist(), p_star.tolist(),
                                      kept["votes_a"].tolist(), kept["votes_b"].tolist(), kept["abstain"].tolist()):
        yield (f'{{"a": {quoted[a]}, "b": {quoted[b]}, "kind": {kinds[k]}, "p_star": {p!r}, '
               f'"votes_a": {va}, "votes_b": {vb}, "abstain": {ab}}}\n')


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: the run
# ---------------------------------------------------------------------------------------------------------------------


def write_rankings(path: str, names: list[str], pairs: dict[str, np.ndarray], prior: float) -> None:
    theta = bradley_terry(pairs["a"], pairs["b"], pairs["votes_a"], pairs["votes_b"], len(names), prior)
    ranked = rankings(names, pairs["a"], pairs["b"], pairs["votes_a"], pairs["votes_b"], theta)
    common.write_lines_atomic(path, (json.dumps(r, ensure_ascii=False) + "\n" for r in ranked))


def run(args: Args) -> dict:
    """Read the votes, label every pair, write the pseudo-labels, the rankings and the statistics."""
    t0 = time.perf_counter()
    mode, names, pairs, info, mos = read_inputs(args)
    t_read = time.perf_counter() - t0
    p_star, keep, dropped = pseudo_labels(pairs["votes_a"], pairs["votes_b"], args.label, args.min_margin,
                                          args.min_valid_votes, args.drop_ties)
    voted = keep  # the rankings describe the votes, also under --oracle
    if mos is not None:
        majority, p_star = p_star, oracle_labels(mos, pairs["a"], pairs["b"])
        keep, dropped = np.ones(len(keep), bool), dict.fromkeys(dropped, 0)
    n_kept = int(keep.sum())
    if n_kept == 0:
        common.die(f"no pair kept out of {len(keep)} from {args.votes} (dropped: {dropped}); "
                   "check the votes (all abstentions?) or loosen --min-valid-votes / --min-margin / --drop-ties")
    t0 = time.perf_counter()
    common.write_lines_atomic(args.out, pseudolabel_lines(names, {k: v[keep] for k, v in pairs.items()}, p_star[keep]))
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.rankings:
        write_rankings(args.rankings, names, {k: v[voted] for k, v in pairs.items()}, args.bt_prior)
    t_rank = time.perf_counter() - t0
    stats = label_stats(mode, len(names), pairs, keep, dropped, info)
    stats["votes_file"] = str(args.votes)
    stats["settings"] = {k: getattr(args, k) for k in ("label", "min_margin", "min_valid_votes", "drop_ties",
                                                        "bt_prior")}
    if mos is not None:  # a control, not the method: say where the labels came from
        stats["labels"] = {"source": "oracle", "oracle_file": str(args.oracle), "oracle_sha256": hashlib.sha256(
            Path(args.oracle).read_bytes()).hexdigest(), "votes_agree_with_oracle": votes.ratio(
            (majority == p_star)[voted].sum(), voted.sum())}
    if args.stats:
        common.write_json_atomic(args.stats, stats)
    print(f"build_pseudolabels: {mode} mode, {stats['pairs_in']} pairs over {len(names)} images -> {n_kept} kept "
          f"{'with p* from the oracle file ' if mos is not None else ''}"
          f"(dropped {dropped}); tie rate {stats['tie_rate']}, abstention rate {stats['abstention_rate']}, "
          f"truncation rate {stats['truncation_rate']}; "
          f"read {t_read:.1f}s, write {t_write:.1f}s, rankings {t_rank:.1f}s")
    return stats


def main(argv: Optional[list[str]] = None) -> dict:
    args = common.parse_args(Args, argv)
    check_args(args)
    for path in filter(None, (args.out, args.rankings, args.stats)):
        common.check_writable(Path(path).parent)
    with common.output_lock(args.out):  # one run at a time writes these outputs
        return run(args)


if __name__ == "__main__":
    common.run_main(main)
