"""Majority voting: votes.jsonl from sample_votes.py -> pairwise pseudo-labels p* (what grpo_train.py trains on),
plus a global ranking and statistics for inspection. Pure numpy/scipy, no model, one process (a few seconds per
100k pairs; no `accelerate launch` needed).

    python build_pseudolabels.py --votes runs/r1/votes.jsonl --out runs/r1/pseudolabels.jsonl \
        --rankings runs/r1/rankings.jsonl --stats runs/r1/pseudolabel_stats.json

Input, either shape (sample_votes.py writes one of them):
  compare mode, one line per pair: {"a", "b", "kind", "votes_a", "votes_b", "abstain", "first_slot_wins", "answers",
      ...}
  score mode, one line per image:  {"image", "scores": [3.25, null, ...], ...}, and the pairs that sample_votes.py
      drew in the sidecar `<votes>.pairs.jsonl` ({"a", "b", "kind"} per line; --pairs names another file).
  "kind" is "random" or "same_reference" (two versions of one reference image); a pair without one is random.
Output: one line per kept pair {"a", "b", "kind", "p_star", "votes_a", "votes_b", "abstain"}, in input order.

Rules (EVOQUALITY.md, offline stage). K_a, K_b = votes for a and for b; abstentions count for neither.
  --label hard (the paper): p* = 1 if K_a > K_b, 0 if K_a < K_b, 0.5 on a tie.   --label soft: p* = K_a / (K_a + K_b).
  Score mode: sample index k gives one vote to the higher of q_k(a), q_k(b) when both parsed; an equal score or an
  unparsed one is an abstention (so votes_a + votes_b + abstain = K in both modes).
  Drops, each pair counted under the first rule that drops it, in this order: fewer than --min-valid-votes valid
  votes; |K_a - K_b| / (K_a + K_b) < --min-margin; a tie when --drop-ties. The defaults reproduce the paper: only
  pairs without a single valid vote are dropped.
  A pair recorded twice ((a, b) or (b, a)) has its counts merged, with a warning.
Truncation (stats): answers cut off by --max-new-tokens are abstentions (sampling.answer); the stats count them from
  each answer's `truncated` flag (compare mode: in "answers", kept by --no-text too; score mode: the "truncated" list)
  as truncation_rate = truncated answers / answers with a flag (votes in compare mode, score samples in score mode),
  and say in truncation_flags when some or all answers carry none (votes not written by sample_votes.py).
Rankings (--rankings): one line per image, best first, over the kept pairs: wins / losses / ties by majority,
  win_rate = (wins + ties / 2) / comparisons, and bt_strength, the Bradley-Terry log-strength theta
  (P(i beats j) = sigmoid(theta_i - theta_j)) fitted to the vote counts, MAP with a tiny prior (--bt-prior):
  every image also plays that many virtual games against a reference of theta = 0, half won, half lost. It keeps
  undefeated images finite and anchors each connected component; an image never compared gets theta = 0.
Control (--oracle FILE, {"image", "mos"} per line): p* = 1, 0 or 0.5 as mos_a >, < or = mos_b for every pair in
  the votes file, the ceiling of what perfect voting could teach; rankings and vote statistics still describe the votes.
Image names are normalised ('./x.png' and 'x.png' are one image); an absolute or escaping one is refused.
Exit code 2 with one line on stderr for a malformed input (file:line), an unknown record shape, or nothing kept.
Outputs are written through a temporary file and a rename, and are byte-identical when the command is rerun;
`<out>.lock` keeps a second run from writing them at the same time.
"""

from __future__ import annotations

import hashlib
import itertools
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
# TRY NOT TO MODIFY: reading the votes (streamed with common.iter_jsonl: 1M lines of answers do not fit as dicts)
# ---------------------------------------------------------------------------------------------------------------------

COMPARE_KEYS = {"a", "b", "votes_a", "votes_b", "abstain"}  # and "first_slot_wins", "kind", optional
SCORE_KEYS = {"image", "scores"}
KINDS = ("random", "same_reference")  # how sample_votes.py drew a pair; stored as an index into this


def kind_index(path: Path, lineno: int, record: dict) -> int:
    kind = record.get("kind", "random")
    if kind not in KINDS:
        raise ValueError(f"{path}:{lineno}: 'kind' must be one of {list(KINDS)}, got {kind!r}")
    return KINDS.index(kind)


class ImageIds:
    """Image name -> number, one number per image: './x.png' and 'x.png' are one (common.safe_name); an absolute name
    or one climbing out with '..' is refused naming file and line. Each spelling is normalised once."""

    def __init__(self):
        self.ids: dict[str, int] = {}  # canonical name -> number; list(ids) are the names
        self.spelled: dict[str, int] = {}  # name as written -> number

    def __call__(self, name: str, path: Path, lineno: int) -> int:
        i = self.spelled.get(name)
        if i is None:
            i = self.spelled[name] = self.ids.setdefault(common.safe_name(".", name, f"{path}:{lineno}"), len(self.ids))
        return i


def count_truncated(path: Path, lineno: int, flags: list, values: list) -> int:
    """Answers of one record cut off by the token budget, checked: one true/false per answer, each an abstention."""
    if type(flags) is not list or len(flags) != len(values) or not all(type(f) is bool for f in flags):
        raise ValueError(f"{path}:{lineno}: 'truncated' must be one true/false flag per answer")
    if any(f and v is not None for f, v in zip(flags, values)):
        raise ValueError(f"{path}:{lineno}: an answer cut off by the token budget (truncated) counts as a vote; "
                         f"it must be an abstention (null)")
    return sum(flags)


def read_compare(path: Path, records: Iterator[tuple[int, dict]]) -> tuple[list[str], dict[str, np.ndarray], dict]:
    """Image names, one row per record: a, b (indices into the names), votes_a, votes_b, abstain,
    first_slot_wins (-1 where absent), kind (into KINDS), and the truncation counts {truncated, flagged, answers}."""
    ids = ImageIds()
    rows = []
    truncation = {"truncated": 0, "flagged": 0, "answers": 0}
    for lineno, r in records:  # the hot loop of the whole stage (with json.loads): checks kept cheap
        if not r.keys() >= COMPARE_KEYS:
            raise ValueError(f"{path}:{lineno}: expected a compare-mode record with {sorted(COMPARE_KEYS)}, "
                             f"got keys {sorted(r)}")
        a, b, va, vb, ab, first = r["a"], r["b"], r["votes_a"], r["votes_b"], r["abstain"], r.get("first_slot_wins", -1)
        if type(a) is not str or type(b) is not str or not a or not b:
            raise ValueError(f"{path}:{lineno}: 'a' and 'b' must be image paths")
        ia, ib = ids(a, path, lineno), ids(b, path, lineno)
        if ia == ib:
            raise ValueError(f"{path}:{lineno}: a pair of {a!r} with itself")
        if type(va) is not int or type(vb) is not int or type(ab) is not int or min(va, vb, ab) < 0:
            raise ValueError(f"{path}:{lineno}: votes_a, votes_b, abstain must be non-negative integers")
        if first != -1 and (type(first) is not int or not 0 <= first <= va + vb):
            raise ValueError(f"{path}:{lineno}: first_slot_wins must be an integer in [0, votes_a + votes_b]")
        answers = r.get("answers")
        truncation["answers"] += va + vb + ab
        if answers is not None and not (type(answers) is list and all(type(x) is dict for x in answers)):
            raise ValueError(f"{path}:{lineno}: 'answers' must be a list of objects")
        if answers and any("truncated" in x for x in answers):
            truncation["truncated"] += count_truncated(path, lineno, [x.get("truncated") for x in answers],
                                                       [x.get("choice") for x in answers])
            truncation["flagged"] += len(answers)
        rows.append((ia, ib, va, vb, ab, first, kind_index(path, lineno, r) if "kind" in r else 0))
    columns = np.array(rows, dtype=np.int64).reshape(-1, 7).T
    return list(ids.ids), dict(zip(("a", "b", "votes_a", "votes_b", "abstain", "first_slot_wins", "kind"), columns)), \
        truncation


def read_score(path: Path, records: Iterator[tuple[int, dict]], pairs_path: Path
               ) -> tuple[list[str], np.ndarray, dict[str, np.ndarray], dict]:
    """Image names, the (images x K) score matrix (NaN = unparsed or no record), the drawn pairs a, b, kind, and
    the truncation counts {truncated, flagged, answers} over the score samples."""
    ids = ImageIds()
    scores: dict[int, list] = {}
    truncation = {"truncated": 0, "flagged": 0, "answers": 0}
    for lineno, r in records:
        image, values = r.get("image"), r.get("scores")
        if not r.keys() >= SCORE_KEYS or "a" in r:
            raise ValueError(f"{path}:{lineno}: expected a score-mode record with {sorted(SCORE_KEYS)}, "
                             f"got keys {sorted(r)}")
        if not isinstance(image, str) or not isinstance(values, list) or not all(
                v is None or type(v) in (int, float) for v in values):
            raise ValueError(f"{path}:{lineno}: 'image' must be a path and 'scores' a list of numbers or null")
        i = ids(image, path, lineno)
        if i in scores:
            warnings.warn(f"{path}:{lineno}: image {image!r} recorded twice; keeping its first record")
            continue
        scores[i] = values
        truncation["answers"] += len(values)
        if "truncated" in r:
            truncation["truncated"] += count_truncated(path, lineno, r["truncated"], values)
            truncation["flagged"] += len(values)
    if not pairs_path.exists():
        raise ValueError(f"score-mode votes need the drawn pairs: {pairs_path} does not exist (see --pairs)")
    rows = []
    for lineno, r in common.iter_jsonl(pairs_path):
        a, b = r.get("a"), r.get("b")
        if not (isinstance(a, str) and isinstance(b, str) and a and b) or ids(a, pairs_path, lineno) == ids(
                b, pairs_path, lineno):
            raise ValueError(f"{pairs_path}:{lineno}: expected {{\"a\": image, \"b\": another image}}")
        rows.append((ids(a, pairs_path, lineno), ids(b, pairs_path, lineno), kind_index(pairs_path, lineno, r)))
    missing = len(ids.ids) - len(scores)
    if missing:
        warnings.warn(f"{pairs_path}: {missing} image(s) in the pairs have no score record; their pairs get no votes")
    k = max((len(v) for v in scores.values()), default=0)
    matrix = np.full((len(ids.ids), k), np.nan)
    for i, values in scores.items():
        matrix[i, :len(values)] = np.array(values, dtype=np.float64)  # None -> NaN
    a, b, kind = np.array(rows, dtype=np.int64).reshape(-1, 3).T
    return list(ids.ids), matrix, {"a": a, "b": b, "kind": kind}, truncation


def merge_duplicate_pairs(pairs: dict[str, np.ndarray], n_images: int) -> tuple[dict[str, np.ndarray], int]:
    """One row per unordered pair, in first-seen order and orientation; the counts of (b, a) rows are swapped."""
    a, b = pairs["a"], pairs["b"]
    key = np.minimum(a, b) * n_images + np.maximum(a, b)
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    if len(first) == len(a):
        return pairs, 0
    order = np.argsort(first)
    group = np.argsort(order)[inverse]  # each row's output row
    canonical = first[order]
    flipped = a != a[canonical][group]
    merged = {"a": a[canonical], "b": b[canonical], "kind": pairs["kind"][canonical]}
    if "votes_a" in pairs:
        def total(column):
            return np.bincount(group, column, len(canonical)).astype(np.int64)

        merged["votes_a"] = total(np.where(flipped, pairs["votes_b"], pairs["votes_a"]))
        merged["votes_b"] = total(np.where(flipped, pairs["votes_a"], pairs["votes_b"]))
        merged["abstain"] = total(pairs["abstain"])
        seen = pairs["first_slot_wins"] >= 0  # position-bias counts do not depend on orientation
        merged["first_slot_wins"] = np.where(np.bincount(group, ~seen * 1.0, len(canonical)) > 0, -1,
                                             total(np.where(seen, pairs["first_slot_wins"], 0)))
    return merged, len(a) - len(canonical)


def read_votes(path: Path, pairs_path: Path) -> tuple[str, list[str], dict[str, np.ndarray], dict]:
    """(mode, image names, one row per unique pair with its vote counts, reading info)."""
    records = common.iter_jsonl(path)
    first = next(records, None)
    if first is None:
        raise ValueError(f"{path}: no votes in the file")
    lineno, record = first
    mode = "compare" if "a" in record else "score" if "image" in record else None
    if mode is None:
        raise ValueError(f"{path}:{lineno}: unknown record shape with keys {sorted(record)}: expected compare-mode "
                         f"{sorted(COMPARE_KEYS)} or score-mode {sorted(SCORE_KEYS)} (sample_votes.py output)")
    records = itertools.chain([first], records)
    if mode == "compare":
        names, pairs, truncation = read_compare(path, records)
    else:
        names, matrix, pairs, truncation = read_score(path, records, pairs_path)
    n_rows = len(pairs["a"])
    pairs, duplicates = merge_duplicate_pairs(pairs, len(names))
    if duplicates:
        what = "counts merged" if mode == "compare" else "duplicates ignored"
        warnings.warn(f"{path if mode == 'compare' else pairs_path}: {duplicates} pair(s) recorded more than once "
                      f"((a, b) and (b, a) are the same pair); {what}")
    if mode == "score":
        pairs.update(score_votes(matrix, pairs["a"], pairs["b"]))
        pairs["first_slot_wins"] = np.full(len(pairs["a"]), -1)
    return mode, names, pairs, {"pair_records": n_rows, "duplicate_records": duplicates, "truncation": truncation}


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: votes -> pseudo-labels (paper: hard majority, ties = 0.5)
# ---------------------------------------------------------------------------------------------------------------------


def score_votes(scores: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 65536) -> dict[str, np.ndarray]:
    """Score mode: sample k votes for the higher of scores[a, k], scores[b, k]. NaN (unparsed) compares False both
    ways, so an unparsed score, like an equal one, gives no vote: an abstention."""
    votes_a, votes_b = np.zeros(len(a), np.int64), np.zeros(len(a), np.int64)
    for s in range(0, len(a), chunk):  # chunks bound the (pairs x K) temporaries
        qa, qb = scores[a[s:s + chunk]], scores[b[s:s + chunk]]
        votes_a[s:s + chunk] = (qa > qb).sum(1)
        votes_b[s:s + chunk] = (qa < qb).sum(1)
    return {"votes_a": votes_a, "votes_b": votes_b, "abstain": scores.shape[1] - votes_a - votes_b}


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
# ALGO LOGIC: vote statistics (overall and per kind of pair; sample_votes.py prints them too)
# ---------------------------------------------------------------------------------------------------------------------


def vote_stats(pairs: dict[str, np.ndarray]) -> dict:
    """The votes of some pairs (K_a, K_b, abstentions, first-slot wins; -1 = unknown): the statistics sample_votes.py
    prints when it ends and this stage records, overall and per kind of pair."""
    va, vb, abstain, first = pairs["votes_a"], pairs["votes_b"], pairs["abstain"], pairs["first_slot_wins"]
    valid = va + vb
    voted = valid > 0
    agreement = np.maximum(va, vb)[voted] / valid[voted]  # max(K_a, K_b) / (K_a + K_b)
    edges = np.linspace(0.5, 1.0, 11)
    seen = first >= 0
    return {
        "votes": int((valid + abstain).sum()),
        "votes_per_pair_mean": ratio((valid + abstain).sum(), len(va)),
        "tie_rate": ratio((va == vb)[voted].sum(), voted.sum()),  # among pairs with at least one valid vote
        "abstention_rate": ratio(abstain.sum(), (valid + abstain).sum()),
        "first_slot_win_rate": ratio(first[seen].sum(), valid[seen].sum()) if seen.any() else None,  # position bias
        "majority_agreement_mean": ratio(agreement.sum(), len(agreement)),
        "majority_agreement_histogram": {"edges": [round(float(e), 2) for e in edges],
                                         "counts": np.histogram(agreement, edges)[0].tolist()},
    }


def kind_stats(pairs: dict[str, np.ndarray], keep: Optional[np.ndarray] = None) -> dict:
    """vote_stats of each kind of pair present (and how many of them were kept, given the keep mask)."""
    out = {}
    for k, kind in enumerate(KINDS):
        mine = pairs["kind"] == k
        if mine.any():
            out[kind] = {"pairs_in": int(mine.sum()), **({} if keep is None else {"pairs_kept": int(keep[mine].sum())}),
                         **vote_stats({key: column[mine] for key, column in pairs.items()})}
    return out


def truncation_stats(truncation: dict) -> dict:
    cut, flagged, answers = (truncation[k] for k in ("truncated", "flagged", "answers"))
    return {
        "truncated_answers": cut,  # cut off by --max-new-tokens: abstentions (votes; score samples in score mode)
        "truncation_rate": ratio(cut, flagged),  # over the answers that carry a `truncated` flag
        "truncation_flags": "every answer" if flagged == answers else
        f"absent: truncation unknown for {answers - flagged} of {answers} answers (not written by sample_votes.py)",
    }


def ratio(x, y) -> Optional[float]:
    return round(float(x) / float(y), 6) if y else None


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
            "images": n_images, **vote_stats(pairs), **truncation_stats(info["truncation"]),
            **graph_stats(pairs, keep, n_images), "by_kind": kind_stats(pairs, keep)}


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: output and main
# ---------------------------------------------------------------------------------------------------------------------


def pseudolabel_lines(names: list[str], kept: dict[str, np.ndarray], p_star: np.ndarray) -> Iterator[str]:
    """Exactly json.dumps({"a", "b", "kind", "p_star", "votes_a", "votes_b", "abstain"}) per pair, but each name is
    escaped once instead of once per pair (json.dumps of a million dicts costs seconds)."""
    quoted = [json.dumps(name, ensure_ascii=False) for name in names]
    kinds = [json.dumps(kind) for kind in KINDS]
    for a, b, k, p, va, vb, ab in zip(kept["a"].tolist(), kept["b"].tolist(), kept["kind"].tolist(), p_star.tolist(),
                                      kept["votes_a"].tolist(), kept["votes_b"].tolist(), kept["abstain"].tolist()):
        yield (f'{{"a": {quoted[a]}, "b": {quoted[b]}, "kind": {kinds[k]}, "p_star": {p!r}, '
               f'"votes_a": {va}, "votes_b": {vb}, "abstain": {ab}}}\n')


def main(args: Optional[Args] = None) -> dict:
    args = args or common.parse_args(Args)
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
    for path in filter(None, (args.out, args.rankings, args.stats)):
        common.check_writable(Path(path).parent)
    with common.output_lock(args.out):  # one run at a time writes these outputs
        return build(args)


def build(args: Args) -> dict:
    votes_path = Path(args.votes)
    t0 = time.perf_counter()
    try:
        mode, names, pairs, info = read_votes(votes_path, Path(args.pairs or f"{votes_path}.pairs.jsonl"))
    except ValueError as e:
        common.die(str(e))
    t_read = time.perf_counter() - t0

    p_star, keep, dropped = pseudo_labels(pairs["votes_a"], pairs["votes_b"], args.label, args.min_margin,
                                          args.min_valid_votes, args.drop_ties)
    ranked = keep  # the rankings describe the votes, also under --oracle
    if args.oracle:
        try:
            mos = read_oracle(Path(args.oracle), names, pairs)
        except ValueError as e:
            common.die(str(e))
        votes_p_star = p_star
        p_star = oracle_labels(mos, pairs["a"], pairs["b"])
        keep, dropped = np.ones(len(keep), bool), dict.fromkeys(dropped, 0)
    n_kept = int(keep.sum())
    if n_kept == 0:
        common.die(f"no pair kept out of {len(keep)} from {votes_path} (dropped: {dropped}); "
                   "check the votes (all abstentions?) or loosen --min-valid-votes / --min-margin / --drop-ties")
    kept = {k: v[keep] for k, v in pairs.items()}
    t0 = time.perf_counter()
    common.write_lines_atomic(args.out, pseudolabel_lines(names, kept, p_star[keep]))
    t_write = time.perf_counter() - t0
    t_rank = 0.0
    if args.rankings:
        t0 = time.perf_counter()
        voted = {k: v[ranked] for k, v in pairs.items()}
        theta = bradley_terry(voted["a"], voted["b"], voted["votes_a"], voted["votes_b"], len(names), args.bt_prior)
        ranks = rankings(names, voted["a"], voted["b"], voted["votes_a"], voted["votes_b"], theta)
        common.write_lines_atomic(args.rankings, (json.dumps(r, ensure_ascii=False) + "\n" for r in ranks))
        t_rank = time.perf_counter() - t0
    stats = label_stats(mode, len(names), pairs, keep, dropped, info)
    stats["votes_file"] = str(votes_path)
    stats["settings"] = {k: getattr(args, k) for k in ("label", "min_margin", "min_valid_votes", "drop_ties",
                                                        "bt_prior")}
    if args.oracle:  # a control, not the method: say where the labels came from
        stats["labels"] = {"source": "oracle", "oracle_file": str(args.oracle), "oracle_sha256": hashlib.sha256(
            Path(args.oracle).read_bytes()).hexdigest(), "votes_agree_with_oracle": ratio(
            (votes_p_star == p_star)[ranked].sum(), ranked.sum())}
    if args.stats:
        common.write_json_atomic(args.stats, stats)
    print(f"build_pseudolabels: {mode} mode, {stats['pairs_in']} pairs over {len(names)} images -> {n_kept} kept "
          f"{'with p* from the oracle file ' if args.oracle else ''}"
          f"(dropped {dropped}); tie rate {stats['tie_rate']}, abstention rate {stats['abstention_rate']}, "
          f"truncation rate {stats['truncation_rate']}; "
          f"read {t_read:.1f}s, write {t_write:.1f}s, rankings {t_rank:.1f}s")
    return stats


if __name__ == "__main__":
    common.run_main(main)
