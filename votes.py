"""The offline stage's two files, read and checked (a malformed record is one line naming file:line): the votes
(sample_votes.py writes them, build_pseudolabels.py reads them) and the pseudo-labels (build_pseudolabels.py writes
them, grpo_train.py reads them); and the statistics of a set of votes that sample_votes.py and build_pseudolabels.py
both report.

Compare mode, one line per pair (an answer's choice is "a", "b" or null, an abstention; its text unless --no-text):

    {"a": "x.png", "b": "y.png", "kind": "random", "votes_a": 19, "votes_b": 11, "abstain": 2, "first_slot_wins": 17,
     "answers": [{"order": "ab", "choice": "a", "truncated": false, "text": "... \\boxed{0}"}, ...]}

Score mode, one line per image, {"image", "scores": [3.25, null, ...], "truncated": [false, true, ...], "answers"}
(a score cut off by the token budget is null, like an unparseable one), with the drawn pairs in `<votes>.pairs.jsonl`
({"a", "b", "kind"} per line); sample k of a pair votes for the higher of its two scores.
"kind" is "random" or "same_reference" (two versions of one reference image); a pair without one is random.
"""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

import common


# ---------------------------------------------------------------------------------------------------------------------
# Reading (streamed with common.iter_jsonl: 1M lines of answers do not fit as dicts)
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


def score_votes(scores: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 65536) -> dict[str, np.ndarray]:
    """Score mode: sample k votes for the higher of scores[a, k], scores[b, k]. NaN (unparsed) compares False both
    ways, so an unparsed score, like an equal one, gives no vote: an abstention."""
    votes_a, votes_b = np.zeros(len(a), np.int64), np.zeros(len(a), np.int64)
    for s in range(0, len(a), chunk):  # chunks bound the (pairs x K) temporaries
        qa, qb = scores[a[s:s + chunk]], scores[b[s:s + chunk]]
        votes_a[s:s + chunk] = (qa > qb).sum(1)
        votes_b[s:s + chunk] = (qa < qb).sum(1)
    return {"votes_a": votes_a, "votes_b": votes_b, "abstain": scores.shape[1] - votes_a - votes_b}


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
# The pseudo-labels (build_pseudolabels.py writes them, grpo_train.py reads them)
# ---------------------------------------------------------------------------------------------------------------------


def read_pseudolabels(path: str, images_root: str, skip_missing: bool) -> tuple[list[tuple[str, str, float]], int]:
    """grpo_train.py's input: (a, b, p_star) of every pseudo-labelled pair, and how many were dropped; refuses
    malformed lines, and images that do not open (every one is decoded, common.load_image) unless `skip_missing`."""
    try:
        records = common.read_jsonl(path, with_lineno=True)
    except ValueError as e:
        common.die(str(e))
    if not Path(path).is_file() or not records:
        common.die(f"{path}: no pseudo-labelled pairs (missing or empty file)")
    pairs = []
    for lineno, r in records:
        try:  # one canonical name per image under --images-root ('./x.png' is 'x.png'); none outside it
            a, b = (common.safe_name(images_root, r.get(key), f"{path}:{lineno}") for key in ("a", "b"))
        except ValueError as e:
            common.die(str(e))
        p_star = r.get("p_star")
        if not (isinstance(p_star, (int, float)) and not isinstance(p_star, bool) and 0.0 <= p_star <= 1.0 and a != b):
            common.die(f"{path}:{lineno}: expected {{'a': path, 'b': other path, 'p_star': number in [0, 1]}}, "
                       f"got {json.dumps(r)[:200]}")
        pairs.append((a, b, float(p_star)))
    bad = {}
    for x in dict.fromkeys(x for a, b, _ in pairs for x in (a, b)):
        try:
            common.load_image(Path(images_root) / x)
        except ValueError as e:
            bad[x] = str(e).split(": ", 1)[-1]
    if bad and not skip_missing:
        shown = "; ".join(f"{x} ({why})" for x, why in list(bad.items())[:10])
        more = f"; ... ({len(bad) - 10} more)" if len(bad) > 10 else ""
        common.die(f"{len(bad)} image(s) named in {path} cannot be opened under {images_root}: {shown}{more} "
                   "(--skip-missing drops their pairs)")
    kept = [p for p in pairs if p[0] not in bad and p[1] not in bad]
    if bad:
        print(f"--skip-missing: dropped {len(pairs) - len(kept)} of {len(pairs)} pairs ({len(bad)} images do not "
              f"open: {', '.join(list(bad)[:10])})")
    return kept, len(pairs) - len(kept)


# ---------------------------------------------------------------------------------------------------------------------
# Statistics (overall and per kind of pair; sample_votes.py prints them, build_pseudolabels.py records them)
# ---------------------------------------------------------------------------------------------------------------------


def vote_stats(pairs: dict[str, np.ndarray]) -> dict:
    """The votes of some pairs (K_a, K_b, abstentions, first-slot wins; -1 = unknown): the statistics sample_votes.py
    prints when it ends and build_pseudolabels.py records, overall and per kind of pair."""
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
