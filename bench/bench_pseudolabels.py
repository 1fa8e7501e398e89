"""Benchmark of build_pseudolabels.py at the paper's scale and beyond: synthetic votes for 1,000,000 pairs x K = 32
over 50,000 images (compare mode, answers without text as `sample_votes.py --no-text` writes them, about 1.2 GB),
then the stage end to end as a subprocess (rankings and stats included). Prints its wall time and peak memory,
side by side with the floor that any JSONL reader pays (json.loads of every line, nothing else), and how well the
rankings recover the known strengths. With --score it also runs the score-mode input of the same size.

    python bench/bench_pseudolabels.py                       # target: < 60 s on 2 cores
    python bench/bench_pseudolabels.py --pairs 100000 --images 5000 --score
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]


def make_pairs(rng: np.random.Generator, n_pairs: int, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct unordered pairs, random orientation."""
    a, b = rng.integers(0, n_images, (2, int(n_pairs * 1.1) + 100))
    a, b = a[a != b], b[a != b]
    _, first = np.unique(np.minimum(a, b) * n_images + np.maximum(a, b), return_index=True)
    first = np.sort(first)[:n_pairs]
    return a[first], b[first]


def write_compare_votes(path: Path, names: list[str], a, b, votes_a, votes_b, abstain, k: int) -> None:
    """Answers consistent with the counts: the first votes_a answers choose a, the next votes_b choose b, the rest are
    unparseable; orders alternate ab, ba. first_slot_wins follows from that."""
    entries = {c: [json.dumps({"order": "ab" if i % 2 == 0 else "ba", "choice": c}) for i in range(k)]
               for c in ("a", "b", None)}
    first_slot = (votes_a + 1) // 2 + (votes_a + votes_b) // 2 - votes_a // 2
    quoted = [json.dumps(n) for n in names]
    with open(path, "w") as f:
        for i, j, va, vb, ab, fs in zip(a.tolist(), b.tolist(), votes_a.tolist(), votes_b.tolist(), abstain.tolist(),
                                        first_slot.tolist()):
            answers = ", ".join(entries["a"][:va] + entries["b"][va:va + vb] + entries[None][va + vb:])
            f.write(f'{{"a": {quoted[i]}, "b": {quoted[j]}, "votes_a": {va}, "votes_b": {vb}, "abstain": {ab}, '
                    f'"first_slot_wins": {fs}, "answers": [{answers}]}}\n')


def write_score_votes(path: Path, names: list[str], a, b, theta: np.ndarray, k: int, rng) -> None:
    scores = np.clip(3 + theta[:, None] + rng.normal(0, 1, (len(names), k)), 1, 5).round(2)
    with open(path, "w") as f:
        for name, row in zip(names, scores.tolist()):
            row = [None if rng.random() < 0.05 else s for s in row]
            f.write(json.dumps({"image": name, "scores": row, "answers": ["\\boxed{3.00}"] * k}) + "\n")
    with open(f"{path}.pairs.jsonl", "w") as f:  # sample_votes.py's sidecar name
        f.writelines(f'{{"a": {json.dumps(names[i])}, "b": {json.dumps(names[j])}}}\n'
                     for i, j in zip(a.tolist(), b.tolist()))


def run_stage(votes: Path, out_dir: Path) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds, peak RSS in GiB of the stage process alone, its stdout). CPU time is printed too
    because wall time on a shared machine depends on everyone else's load."""
    cmd = [sys.executable, str(ROOT / "build_pseudolabels.py"), "--votes", str(votes),
           "--out", str(out_dir / "pseudolabels.jsonl"), "--rankings", str(out_dir / "rankings.jsonl"),
           "--stats", str(out_dir / "stats.json")]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the sum over all children
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"stage failed:\n{output}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20, output.strip()


def json_floor(path: Path) -> float:
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        for line in f:
            json.loads(line)
    return time.perf_counter() - t0


def ranking_srcc(out_dir: Path, names: list[str], theta: np.ndarray) -> tuple[float, float]:
    index = {n: i for i, n in enumerate(names)}
    rows = [json.loads(line) for line in open(out_dir / "rankings.jsonl")]
    true = theta[[index[r["image"]] for r in rows]]
    rated = [(t, r["win_rate"]) for t, r in zip(true, rows) if r["win_rate"] is not None]
    return (spearmanr(true, [r["bt_strength"] for r in rows])[0],
            spearmanr([t for t, _ in rated], [w for _, w in rated])[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--score", action="store_true", help="also run a score-mode input of the same size")
    parser.add_argument("--dir", default="", help="work folder (default: a temporary one, deleted afterwards)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        names = [f"pool/img_{i:06d}.jpg" for i in range(args.images)]
        theta = rng.normal(0, 1, args.images)
        a, b = make_pairs(rng, args.pairs, args.images)
        abstain = rng.binomial(args.k, 0.05, len(a))
        votes_a = rng.binomial(args.k - abstain, 1 / (1 + np.exp(theta[b] - theta[a])))
        votes_b = args.k - abstain - votes_a
        t0 = time.perf_counter()
        write_compare_votes(work / "votes.jsonl", names, a, b, votes_a, votes_b, abstain, args.k)
        size = (work / "votes.jsonl").stat().st_size / 2**30
        print(f"made compare votes: {len(a)} pairs x K={args.k} over {args.images} images, {size:.2f} GiB "
              f"in {time.perf_counter() - t0:.1f}s")

        wall, cpu, rss, output = run_stage(work / "votes.jsonl", work)
        floor = json_floor(work / "votes.jsonl")
        srcc_bt, srcc_wr = ranking_srcc(work, names, theta)
        print(f"  {output}")
        print(f"compare mode end to end: {wall:.1f}s wall (target < 60 s), {cpu:.1f}s CPU, peak RSS {rss:.2f} GiB; "
              f"json.loads of every line alone {floor:.1f}s -> stage / floor = {wall / floor:.2f}")
        print(f"  SRCC with the true strengths: Bradley-Terry {srcc_bt:.4f}, win rate {srcc_wr:.4f}")

        if args.score:
            (work / "votes.jsonl").unlink()
            t0 = time.perf_counter()
            write_score_votes(work / "votes.jsonl", names, a, b, theta, args.k, rng)
            print(f"made score votes: {args.images} images x K={args.k} + {len(a)} pairs "
                  f"in {time.perf_counter() - t0:.1f}s")
            wall, cpu, rss, output = run_stage(work / "votes.jsonl", work)
            srcc_bt, srcc_wr = ranking_srcc(work, names, theta)
            print(f"  {output}")
            print(f"score mode end to end: {wall:.1f}s wall, {cpu:.1f}s CPU, peak RSS {rss:.2f} GiB; "
                  f"SRCC Bradley-Terry {srcc_bt:.4f}, win rate {srcc_wr:.4f}")


if __name__ == "__main__":
    main()
