"""Does it evolve? The CPU test bed: the REAL loop, `bash run_evolution.sh` (sample_votes -> build_pseudolabels ->
grpo_train -> evaluate, `--no-reasoning`), on the shipped base (demo/base), for K = 32 and for the K = 1 control
(same seed, same pool, same pairs), and the ORACLE arm: the loop again with K = 1 and `build_pseudolabels.py
--oracle`, so that every round trains on the same pairs as the K = 32 run's (the pairs depend only on SEED and the
pool) with p* from the true order; then a report that uses ground truth only AFTER the fact. Every arm runs through
run_evolution.sh with its settings given as NAME=VALUE arguments, so a setting the loop does not know is refused.

The evolution never sees a label: the pool is written by fixtures.synthetic.write_set and its labels.jsonl is moved
out of the pool folder (to <pool>.labels.jsonl) before any stage runs. Only the held-out benchmark carries labels,
and only evaluate.py reads them, as it would read KonIQ's (and build_pseudolabels.py --oracle, in the oracle arm).

Reported per run (K) and round: benchmark SRCC/PLCC of the mean of --eval-samples sampled scores (each round's
eval/summary.json), of one sampled score (the first valid one) and of the greedy answer (eval_greedy/: evaluate.py
once more per round model, a measurement); vote statistics (abstention, first-slot win rate, ties); the accuracy of
the round's votes against the true order; GRPO statistics from train_log.jsonl (reward mean/std, zero_std_fraction,
within-group score std, kl) and the group size G the round trained with (its args.json); stage wall times. Plus
pseudo-label accuracy vs K (1, 4, 8, 32) on the SAME round-1 pairs, subsampled from the largest-K votes file, beside
the premise's other side: how often the base's OWN scores rank those pairs right (evaluate.py --images).

    python experiments/evolve.py --seed 0                   # K=32, K=1, oracle, 2 rounds (~6 min, 2 cores)
    python experiments/evolve.py --mode score --seed 1      # votes from sampled scores instead
    python experiments/evolve.py --seed 0 --record experiments/evolve_results.json   # append the record there
    python experiments/evolve.py --summarize                # mean +- std over seeds of every recorded setting
    python experiments/evolve.py --report-only              # re-measure finished runs, record nothing
    python experiments/evolve.py --pool-variants 2 --seed 0 --base BASE   # the pool experiment (distortion world)

Runs and data go to --work (under runs/, git-ignored; finished stages are skipped when rerun); the record goes to
the run's folder, or is appended to --record FILE when given (experiments/evolve_results.json and pool_results.json
are the records the write-up, experiments/README.md, cites).

The pool experiment (--pool-variants V): the distortion world of fixtures/synthetic.py (references with their own
quality, V variants each drawn by make_pool.py among its WORLD_TYPES, every image's quality = its reference's times its
SSIM to it; the pool's labels kept outside the pool folder) and its two held-out benchmarks, "authentic" (--bench
references alone) and "synthetic" (--synthetic pristine contents x types x 5 levels, as KADID). Four loop runs with
the same SEED and POOL: round 2 with SYNTH_PAIRS=0 ("random": --pairs random pairs of the whole pool), with
SYNTH_PAIRS=--same-reference-pairs ("same_reference": the same random pairs, as sample_votes.py draws them on a stream
of their own, plus pairs of two versions of one reference) and with SYNTH_MIX=replace ("replace": as many pairs as
"random", the same share of them same-reference pairs as in "same_reference": the control for the number of pairs),
all three with K = ks[0]; and the oracle arm (K = 1, p* from the true quality, SYNTH_PAIRS as "same_reference").
Round 1 (random pairs of the references) is the same in the first three: recomputed by each run, and the record says
whether they agree byte for byte, and whether replace's pairs are the first of the others'. Reported: SRCC on both
benchmarks per round and arm, pseudo-label accuracy per kind of pair and per distortion group, the base's K votes on
round 2's pairs beside the round-1 model's (does the round-1 model vote better?), and each voter's own mean-score
ranking on the pairs it voted on (the premise).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from scipy.stats import pearsonr, spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import distortions  # noqa: E402
from experiments import records  # noqa: E402
from fixtures.synthetic import write_benchmarks, write_pool_world, write_set  # noqa: E402

LOOP_SETTINGS = ("MODEL", "IMAGES", "IMAGES_ROOT", "POOL", "BENCH", "ROUNDS", "PAIRS", "K", "GROUP_SIZE", "OUT",
                 "NPROC", "SEED", "REF", "FSDP", "VARIANTS", "SYNTH_PAIRS", "SYNTH_MIX", "VOTES_ARGS", "LABEL_ARGS",
                 "TRAIN_ARGS", "EVAL_ARGS")  # run_evolution.sh's; given as arguments, and kept out of its environment


@dataclass
class Args:
    base: str = common.arg(str(ROOT / "demo" / "base"), help="base checkpoint (default: the shipped demo/base)")
    world: str = common.arg("noise", choices=["mixed", "noise"], help="synthetic world of pool and bench")
    image_size: int = common.arg(56, help="side of the synthetic pool and bench images")
    mode: str = common.arg("compare", choices=["compare", "score"], help="vote mode of sample_votes.py")
    ks: list[int] = common.arg([32, 1], help="votes per pair K of each run (the first, largest, is the main run)")
    acc_ks: list[int] = common.arg([1, 4, 8, 32], help="K values of the pseudo-label accuracy table")
    rounds: int = common.arg(2, help="evolution rounds")
    pool: int = common.arg(300, help="unlabeled pool images (fixtures.synthetic 'pool' seeds)")
    bench: int = common.arg(200, help="held-out benchmark images (fixtures.synthetic 'bench' seeds)")
    pairs: int = common.arg(128, help="pairs drawn per round")
    group_size: int = common.arg(8, help="G: GRPO rollouts per image (GROUP_SIZE of run_evolution.sh)")
    pairs_per_step: int = common.arg(8, help="pseudo-labelled pairs per GRPO step")
    lr: float = common.arg(1e-4, help="GRPO learning rate (the paper's 3e-7 is for 7B parameters)")
    beta: float = common.arg(0.02, help="KL weight")
    warmup_steps: int = common.arg(1, help="GRPO linear warm-up steps")
    epochs: int = common.arg(1, help="GRPO passes over the round's pseudo-labels")
    ref: str = common.arg("base", choices=["base", "round"], help="KL reference (REF of run_evolution.sh)")
    eval_samples: int = common.arg(8, help="sampled answers averaged per benchmark image")
    greedy: bool = common.arg(True, help="also evaluate every round's model greedily (one answer per image)")
    max_pixels: int = common.arg(56 * 56, help="processor max_pixels (the shipped base: 56 x 56, 4 tokens per image)")
    max_new_tokens: int = common.arg(10, help="answer budget (\\boxed{3.25} is 8 tokens in the demo tokenizer)")
    label_args: str = common.arg("", help="extra flags for build_pseudolabels.py (LABEL_ARGS; not the oracle arm's)")
    seed: int = common.arg(0, help="SEED of run_evolution.sh (round t draws its pairs with SEED + t)")
    jobs: int = common.arg(2, help="loop runs at the same time, one CPU thread each")
    work: str = common.arg(str(records.RUNS / "evolve"), help="folder for the data and the runs (reused: finished "
                           "stages skip)")
    record: str = common.arg("", help="append the record to this JSON list (e.g. experiments/evolve_results.json); "
                             "--summarize reads it (default: experiments/evolve_results.json)")
    note: str = common.arg("", help="free text stored with the record (why this setting was tried)")
    oracle: bool = common.arg(True, help="also run the oracle arm: the main run's pairs, p* from the TRUE order")
    report_only: bool = common.arg(False, help="do not run anything: measure and print the existing runs")
    summarize: bool = common.arg(False, help="only print mean +- std over seeds of every setting in --record")
    pool_variants: int = common.arg(0, help="> 0: the pool experiment (below) with this many variants per image")
    same_reference_pairs: int = common.arg(64, help="pool experiment: SYNTH_PAIRS of round 2's second arm")
    synthetic: int = common.arg(8, help="pool experiment: pristine contents of the synthetic benchmark (x 7 types x 5 "
                                        "levels); --bench is then the authentic benchmark's references")


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: measuring against the ground truth, after the fact
# ---------------------------------------------------------------------------------------------------------------------


def subsample_votes(answers: list[dict], k: int) -> tuple[int, int]:
    """(votes for a, votes for b) among k of a pair's compare answers: the first k/2 shown in each order (k = 1: the
    first answer). Abstentions (choice None) count for neither."""
    if k == 1:
        chosen = answers[:1]
    else:
        chosen = [x for x in answers if x["order"] == "ab"][:k // 2] + [x for x in answers if x["order"] == "ba"][:k // 2]
    return sum(x["choice"] == "a" for x in chosen), sum(x["choice"] == "b" for x in chosen)


def score_subsample_votes(scores_a: list, scores_b: list, k: int) -> tuple[int, int]:
    """Score mode, as votes.score_votes: sample i votes for the higher of scores_a[i], scores_b[i];
    an unparsed (None) or equal pair of scores is an abstention. The first k samples of each image."""
    votes = [(x > y) - (x < y) for x, y in zip(scores_a[:k], scores_b[:k]) if x is not None and y is not None]
    return votes.count(1), votes.count(-1)


def majority_accuracy(votes: list[tuple[int, int]], truth: list[int]) -> tuple[float, float]:
    """(accuracy, tie rate) of hard majority labels against the true order (truth 1: a better, 0: b better). A tie
    (including no valid vote) is p* = 0.5 in the paper, so it counts as half correct."""
    correct = [1.0 if va != vb and (va > vb) == bool(t) else 0.5 if va == vb else 0.0
               for (va, vb), t in zip(votes, truth)]
    return float(np.mean(correct)), float(np.mean([va == vb for va, vb in votes]))


def pseudolabel_accuracy(votes_path: Path, quality: dict[str, float], ks: list[int], mode: str = "compare",
                         kind: Optional[str] = None) -> dict:
    """Pseudo-label accuracy vs K on the pairs of one votes file (pairs of equal true quality left out); with `kind`,
    on the compare records of that kind of pair only ("random", "same_reference")."""
    records = [r for r in common.read_jsonl(votes_path) if kind is None or r.get("kind", "random") == kind]
    if mode == "compare":
        pairs = [(r["a"], r["b"], r["answers"]) for r in records]
        vote_fn = lambda r, k: subsample_votes(r[2], k)  # noqa: E731
    else:
        scores = {r["image"]: r["scores"] for r in records}
        pairs = [(r["a"], r["b"], None) for r in common.read_jsonl(Path(f"{votes_path}.pairs.jsonl"))]
        vote_fn = lambda r, k: score_subsample_votes(scores.get(r[0], []), scores.get(r[1], []), k)  # noqa: E731
    pairs = [p for p in pairs if quality[p[0]] != quality[p[1]]]
    truth = [int(quality[a] > quality[b]) for a, b, _ in pairs]
    out = {"pairs": len(pairs)}
    for k in ks:
        acc, ties = majority_accuracy([vote_fn(p, k) for p in pairs], truth)
        out[f"K{k}"] = {"accuracy": acc, "tie_rate": ties}
    return out


def own_score_accuracy(predictions: Path, votes_path: Path, quality: dict[str, float], kind: Optional[str] = None
                       ) -> dict:
    """The premise's other side: how often the BASE's own scores rank a pair right, on the same pairs as
    pseudolabel_accuracy (unequal true quality; equal scores count half; with `kind`, that kind of pair only), by the
    mean of its sampled scores and by one sampled score (the first valid one; the score-mode counterpart of K = 1).
    `predictions`: evaluate.py --images; an image is found by its name there, or by its file name."""
    rows = common.read_jsonl(predictions)
    scores = {**{Path(r["image"]).name: r for r in rows}, **{r["image"]: r for r in rows}}
    pairs = [(r["a"], r["b"]) for r in common.read_jsonl(votes_path) if quality[r["a"]] != quality[r["b"]]
             and (kind is None or r.get("kind", "random") == kind)]
    first = lambda r: next((x for x in r.get("scores", []) if x is not None), None)  # noqa: E731

    def accuracy(value) -> float:
        right = []
        for a, b in pairs:
            x, y = value(scores[a]), value(scores[b])
            right.append(0.5 if x is None or y is None or x == y else float((x > y) == (quality[a] > quality[b])))
        return float(np.mean(right))
    return {"pairs": len(pairs), "mean_of_samples": accuracy(lambda r: r.get("score")), "single_sample": accuracy(first)}


def bench_correlations(eval_dir: Path, mos: dict[str, float], bench: str = "synthetic") -> dict:
    """SRCC/PLCC from evaluate.py's summary and, from its predictions, of the first valid sampled score alone."""
    summary = json.loads((eval_dir / "summary.json").read_text())["benchmarks"][bench]
    out = {k: summary.get(k) for k in ("srcc", "plcc", "coverage")}
    predictions = common.read_jsonl(eval_dir / f"predictions_{bench}.jsonl")
    first = [(next((s for s in p.get("scores", []) if s is not None), None), mos[p["image"]]) for p in predictions]
    first = np.array([f for f in first if f[0] is not None], dtype=float).reshape(-1, 2)
    constant = len(first) < 3 or np.ptp(first[:, 0]) == 0
    out["srcc_single"] = 0.0 if constant else float(spearmanr(first[:, 0], first[:, 1])[0])
    out["plcc_single"] = 0.0 if constant else float(pearsonr(first[:, 0], first[:, 1])[0])
    out["distinct_scores"] = len({p.get("score") for p in predictions if p.get("score") is not None})
    if out["distinct_scores"] == 1:  # one answer for every image: no ranking at all (evaluate.py reports None)
        out["srcc"] = out["plcc"] = 0.0
    return out


def within_reference_srcc(eval_dir: Path, labels: Path, bench: str = "synthetic") -> Optional[float]:
    """Mean over the benchmark's references of the SRCC among that reference's versions (labels' "reference" field):
    the order of distortions with the content held fixed, what same-reference pairs speak to."""
    reference = {r["image"]: r.get("reference") for r in common.read_jsonl(labels)}
    by_reference: dict[str, list[tuple[float, float]]] = {}
    for p in common.read_jsonl(eval_dir / f"predictions_{bench}.jsonl"):
        if p.get("score") is not None and reference.get(p["image"]) is not None:
            by_reference.setdefault(reference[p["image"]], []).append((p["score"], p["mos"]))
    values = [spearmanr(*zip(*v))[0] for v in by_reference.values() if len(v) > 2 and len({s for s, _ in v}) > 1]
    return float(np.mean(values)) if values else None


def train_stats(log_path: Path) -> dict:
    """Means over the GRPO steps (and over the first / last quarter, to see a trend) of what says whether it learns."""
    steps = common.read_jsonl(log_path)
    keys = {"reward_mean": "reward/mean", "reward_std": "reward/std", "zero_std_fraction": "reward/zero_std_fraction",
            "score_within_group_std": "rollout/score_within_group_std", "kl": "kl/mean",
            "parse_failure_rate": "rollout/parse_failure_rate", "grad_norm": "optim/grad_norm",
            "score_mean": "rollout/score_mean"}  # the summary's name: train_log.jsonl's
    mean = lambda rows, k: float(np.mean([r[k] for r in rows if r.get(k) is not None])) if rows else None  # noqa: E731
    q = max(1, len(steps) // 4)
    return {"steps": len(steps), **{name: mean(steps, k) for name, k in keys.items()},
            "reward_mean_first_quarter": mean(steps[:q], "reward/mean"),
            "reward_mean_last_quarter": mean(steps[-q:], "reward/mean"),
            "kl_last": steps[-1]["kl/mean"] if steps else None,
            "score_within_group_std_last_quarter": mean(steps[-q:], "rollout/score_within_group_std")}


def stage_seconds(log_path: Path) -> dict:
    """Seconds of every finished stage, from the '[done] NAME N s' lines run_evolution.sh printed (all invocations)."""
    times, rnd = {}, "round_0"
    for line in log_path.read_text().splitlines() if log_path.exists() else []:
        if m := re.match(r"round (\d+):", line):
            rnd = f"round_{m.group(1)}"
        elif m := re.match(r"\s*\[done\] (\S+)\s+(\d+) s", line):
            times[f"{rnd}/{m.group(1)}"] = int(m.group(2))
    return times


def trained_group_size(model: Path) -> Optional[int]:
    """G as grpo_train.py recorded it for the round's model (args.json): what the round trained with, whatever the
    command said."""
    path = model / "args.json"
    return common.read_json(path)["args"]["group_size"] if path.exists() else None


def measure_run(run: Path, args: Args, mos: dict, quality: dict) -> dict:
    rounds = {}
    for t in range(args.rounds + 1):
        R, row = run / f"round_{t}", {}
        if (R / "eval" / "summary.json").exists():
            row["sampled"] = bench_correlations(R / "eval", mos)
        if (R / "eval_greedy" / "summary.json").exists():
            g = bench_correlations(R / "eval_greedy", mos)
            row["greedy"] = {k: g[k] for k in ("srcc", "plcc", "coverage", "distinct_scores")}
        if (R / "stats.json").exists() and run.name == "oracle":  # its K = 1 votes only supplied the pairs
            row["labels"] = json.loads((R / "stats.json").read_text()).get("labels")
        elif (R / "stats.json").exists():
            s = json.loads((R / "stats.json").read_text())
            row["votes"] = {k: s.get(k) for k in ("pairs_in", "pairs_kept", "tie_rate", "abstention_rate",
                                                  "first_slot_win_rate", "votes_per_pair_mean")}
            k_run = int(run.name[1:])
            row["votes"]["accuracy"] = pseudolabel_accuracy(R / "votes.jsonl", quality, [k_run], args.mode)[f"K{k_run}"]
        if (R / "model" / "train_log.jsonl").exists():
            row["grpo"] = {**train_stats(R / "model" / "train_log.jsonl"),
                           "group_size": trained_group_size(R / "model")}
        rounds[f"round_{t}"] = row
    seconds = stage_seconds(run / "evolution.log")
    return {"rounds": rounds, "stage_seconds": seconds, "wall_seconds": sum(seconds.values())}


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: data, the loop runs, the record
# ---------------------------------------------------------------------------------------------------------------------


def make_data(work: Path, which: str, n: int, keep_labels: bool, world: str = "mixed", size: int = 112
              ) -> tuple[Path, Path]:
    """(image folder, labels file). The pool's labels are moved OUT of its folder: no stage can read them."""
    name = f"{which}_{n}" if (world, size) == ("mixed", 112) else f"{world}{size}_{which}_{n}"
    folder, labels = work / name, work / f"{name}.labels.jsonl"
    if not labels.exists():
        shutil.rmtree(folder, ignore_errors=True)
        write_set(folder, which, n, size, world)
        shutil.copy(folder / "labels.jsonl", labels) if keep_labels else shutil.move(folder / "labels.jsonl", labels)
    return folder, labels


def settings_key(args: Args) -> dict:
    skip = {"jobs", "work", "record", "note", "report_only", "summarize", "ks", "greedy", "acc_ks", "oracle"}
    if not args.pool_variants:
        skip.add("synthetic")  # a pool-experiment setting: the other experiment's records keep their settings
    return {k: v for k, v in asdict(args).items() if k not in skip}


def stage_flags(args: Args) -> str:
    return f"--no-reasoning --max-pixels {args.max_pixels} --max-new-tokens {args.max_new_tokens}"


def loop_settings(args: Args, base: str, k: int, bench: str, images: Path | str = "", pool: Path | str = "",
                  label_args: Optional[str] = None) -> dict[str, str]:
    """run_evolution.sh's settings of one arm: every flag of every stage, one thread per process."""
    flags = stage_flags(args)
    return {"MODEL": base, "IMAGES": str(images), "POOL": str(pool), "BENCH": bench, "ROUNDS": str(args.rounds),
            "PAIRS": str(args.pairs), "K": str(k), "GROUP_SIZE": str(args.group_size), "SEED": str(args.seed),
            "REF": args.ref, "NPROC": "1", "VOTES_ARGS": f"{flags} --mode {args.mode} --batch-size 64 --no-text",
            "LABEL_ARGS": args.label_args if label_args is None else label_args,
            "TRAIN_ARGS": f"{flags} --lr {args.lr} --beta {args.beta} --pairs-per-step {args.pairs_per_step} "
                          f"--epochs {args.epochs} --warmup-steps {args.warmup_steps} --micro-batch-size 64 "
                          "--save-every 1000",
            "EVAL_ARGS": f"{flags} --samples {args.eval_samples} --batch-size 32 --seed {args.seed} --no-text"}


def run_loop(run: Path, settings: dict[str, str]) -> Optional[str]:
    """`bash run_evolution.sh NAME=VALUE ...` with OUT=run, its output appended to run/evolution.log; an error
    message, or None."""
    run.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in LOOP_SETTINGS}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    words = [f"{name}={value}" for name, value in {**settings, "OUT": str(run)}.items()]
    print(f"{run.name}: bash run_evolution.sh -> {run} (log: {run / 'evolution.log'})", flush=True)
    with open(run / "evolution.log", "a") as log:
        done = subprocess.run(["bash", str(ROOT / "run_evolution.sh"), *words], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    return f"{run.name}: run_evolution.sh failed (exit {done.returncode}); see {run / 'evolution.log'}" \
        if done.returncode else None


def run_loops(loops: dict[Path, dict[str, str]], jobs: int) -> None:
    """Several loop runs, `jobs` at a time (threads only wait on the subprocesses); one error line if any failed."""
    with ThreadPoolExecutor(max(1, jobs)) as executor:
        errors = list(executor.map(lambda item: run_loop(*item), loops.items()))
    if any(errors):
        common.die("; ".join(e for e in errors if e))


def run_logged(cmd: list[str], run: Path, label: str, name: str = "") -> None:
    """A measurement (evaluate.py, not a round) with the log lines run_evolution.sh writes ("round t:",
    "[done] NAME N s"), one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(run / "evolution.log", "a") as log:
        start = time.time()
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
        log.write(f"{label}\n  [done] {name or Path(cmd[1]).stem}  {round(time.time() - start)} s\n")


def greedy_evals(args: Args, run: Path, base: str, bench_labels: Path) -> None:
    """Greedy answers of every round's model (round 0: the base), cheap: one answer per image."""
    for t in range(args.rounds + 1):
        model = base if t == 0 else str(run / f"round_{t}" / "model")
        out = run / f"round_{t}" / "eval_greedy"
        if (out / "summary.json").exists() or not Path(model).exists():
            continue
        run_logged([sys.executable, "evaluate.py", "--model", model, "--bench", f"synthetic={bench_labels}", "--out",
                    str(out), *stage_flags(args).split(), "--samples", "1", "--batch-size", "32", "--no-text"],
                   run, f"round {t}: greedy evaluation", "evaluate_greedy")


def base_pool_scores(args: Args, base: str, pool: Path, out: Path) -> Path:
    """The base's own sampled scores of every pool image (evaluate.py --images, no labels): the premise's baseline."""
    if not (out / "predictions.jsonl").exists():
        out.mkdir(parents=True, exist_ok=True)
        run_logged([sys.executable, "evaluate.py", "--model", base, "--images", str(pool), "--out", str(out),
                    *stage_flags(args).split(), "--samples", str(args.eval_samples), "--batch-size", "32", "--seed",
                    str(args.seed), "--no-text"], out, "base scores of the pool")
    return out / "predictions.jsonl"


def provenance() -> dict:
    """What produced a record: the commit of this checkout and whether it had changes, the package versions."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {"commit": git("rev-parse", "HEAD") or None, "uncommitted_changes": bool(git("status", "--porcelain")),
            "versions": common.package_versions()}


def print_table(record: dict) -> None:
    fmt = lambda v: "   -  " if v is None else f"{v:6.3f}"  # noqa: E731
    print(f"\n{record['settings']['mode']} mode, lr {record['settings']['lr']}, pairs {record['settings']['pairs']}, "
          f"pool {record['settings']['pool']}, bench {record['settings']['bench']}, seed {record['settings']['seed']}")
    print("run  round   SRCC8  PLCC8  SRCC1  SRCCgr | vote_acc abstain first_slot | reward  r_std  zero_std  "
          "wg_std   kl     G")
    for name, run in record["runs"].items():
        for key, row in run["rounds"].items():
            s, g, v, r = row.get("sampled", {}), row.get("greedy", {}), row.get("votes", {}), row.get("grpo", {})
            print(f"{name:4s} {key[6:]:5s} {fmt(s.get('srcc'))} {fmt(s.get('plcc'))} {fmt(s.get('srcc_single'))} "
                  f"{fmt(g.get('srcc'))} | {fmt(v.get('accuracy', {}).get('accuracy'))}  {fmt(v.get('abstention_rate'))} "
                  f"{fmt(v.get('first_slot_win_rate'))}    | {fmt(r.get('reward_mean'))} {fmt(r.get('reward_std'))} "
                  f"{fmt(r.get('zero_std_fraction'))}  {fmt(r.get('score_within_group_std'))} {fmt(r.get('kl_last'))} "
                  f"{r.get('group_size') or '-':>3}")
        print(f"{name:4s} wall {run['wall_seconds']} s")
    acc = record.get("pseudolabel_accuracy_round1") or {}
    print("pseudo-label accuracy on the same round-1 pairs (" + str(acc.get("pairs")) + " pairs of unequal quality): "
          + ", ".join(f"{k} {v['accuracy']:.3f} (ties {v['tie_rate']:.2f})" for k, v in acc.items() if k != "pairs"))
    own = record.get("own_score_accuracy_round1")
    if own:
        print(f"the base's own score ranking on the same pairs: mean of {record['settings']['eval_samples']} samples "
              f"{own['mean_of_samples']:.3f}, one sample {own['single_sample']:.3f} (the premise: majority votes > this)")


def summarize(history: list[dict]) -> None:
    """Mean +- std over the records that differ only in their seed (the last record of each seed counts)."""
    summarize_pool([r for r in history if "rounds" in r])
    groups: dict[str, dict[int, dict]] = {}
    for record in history:
        if "settings" in record and "runs" in record:
            key = json.dumps({**{k: v for k, v in record["settings"].items() if k not in ("seed", "base", "summarize")},
                              "base_sha256": record.get("base_sha256")}, sort_keys=True)  # one base, one group
            groups.setdefault(key, {})[record["settings"]["seed"]] = record
    for key, by_seed in groups.items():
        records = list(by_seed.values())
        st = json.loads(key)
        print(f"\n{st['mode']} mode, lr {st['lr']}, beta {st['beta']}, G {st['group_size']}, pairs {st['pairs']}, "
              f"pool {st['pool']}, bench {st['bench']}, base sha256 {str(st['base_sha256'])[:12]}: "
              f"seeds {sorted(by_seed)}")
        print("run  round  SRCC(mean of 8)   PLCC(mean of 8)   SRCC(1 sample)    SRCC(greedy)      vote acc")
        for name in records[0]["runs"]:
            for rnd in records[0]["runs"][name]["rounds"]:
                cells = []
                for path in (("sampled", "srcc"), ("sampled", "plcc"), ("sampled", "srcc_single"), ("greedy", "srcc"),
                             ("votes", "accuracy", "accuracy")):
                    values = []
                    for r in records:
                        v = r["runs"].get(name, {}).get("rounds", {}).get(rnd, {})
                        for p in path:
                            v = v.get(p) if isinstance(v, dict) else None
                        values.append(v)
                    values = [v for v in values if v is not None]
                    cells.append(f"{np.mean(values):.3f} +- {np.std(values):.3f}" if values else "-".ljust(14))
                print(f"{name:4s} {rnd[6:]:5s}  " + "   ".join(cells))
        accs = [r["pseudolabel_accuracy_round1"] for r in records if r.get("pseudolabel_accuracy_round1")]
        if accs:
            print("pseudo-label accuracy, round-1 pairs: " + ", ".join(
                f"{k} {np.mean([a[k]['accuracy'] for a in accs]):.3f} +- {np.std([a[k]['accuracy'] for a in accs]):.3f}"
                for k in accs[0] if k != "pairs"))
        owns = [r["own_score_accuracy_round1"] for r in records if r.get("own_score_accuracy_round1")]
        if owns:
            print("base's own score ranking, same pairs: " + ", ".join(
                f"{k} {np.mean([o[k] for o in owns]):.3f} +- {np.std([o[k] for o in owns]):.3f}"
                for k in ("mean_of_samples", "single_sample")))
        print("wall seconds per run: " + ", ".join(
            f"{n} {np.mean([r['runs'][n]['wall_seconds'] for r in records]):.0f}" for n in records[0]["runs"]))


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: the pool experiment (round 2 with and without same-reference pairs)
# ---------------------------------------------------------------------------------------------------------------------


def pool_data(args: Args, work: Path) -> tuple[Path, Path, dict[str, Path]]:
    """(pool root, pool labels OUTSIDE it, {benchmark name: labels file}) of the distortion world
    (fixtures.synthetic: write_pool_world, write_benchmarks)."""
    name = f"world{args.image_size}"
    pool = work / f"{name}_pool_{args.pool}_v{args.pool_variants}"
    pool_labels = pool.with_name(pool.name + ".labels.jsonl")
    bench = work / f"{name}_bench_{args.bench}_{args.synthetic}"
    if not pool_labels.exists():
        shutil.rmtree(pool, ignore_errors=True)
        write_pool_world(pool, "pool", args.pool, args.image_size, args.pool_variants, seed=0)
        shutil.move(pool / "labels.jsonl", pool_labels)
    if not (bench / ".done").exists():
        shutil.rmtree(bench, ignore_errors=True)
        write_benchmarks(bench, args.bench, args.synthetic, args.image_size)
        (bench / ".done").touch()
    return pool, pool_labels, {b: bench / b / "labels.jsonl" for b in BENCHES}


BENCHES = ("authentic", "synthetic")


def same_round(a: Path, b: Path) -> bool:
    """Whether two round folders hold the same votes, pseudo-labels, weights and benchmark scores, byte for byte (the
    summaries differ only in the paths they name)."""
    names = ["votes.jsonl", "pseudolabels.jsonl", "model/model.safetensors",
             *(p.relative_to(a) for p in sorted((a / "eval").glob("predictions_*.jsonl")))]
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def replace_pairs(args: Args) -> int:
    """SYNTH_PAIRS of the "replace" arm: the share of same-reference pairs of "same_reference" among --pairs."""
    return round(args.pairs * args.same_reference_pairs / (args.pairs + args.same_reference_pairs))


def pool_arms(args: Args, base: str, pool: Path, pool_labels: Path, benches: dict[str, Path], exp: Path
              ) -> dict[Path, dict[str, str]]:
    """The arms, each one run_evolution.sh run with the same SEED and POOL: round 2 with SYNTH_PAIRS = 0 ("random"),
    = --same-reference-pairs added to the random pairs ("same_reference") and `replace_pairs` in place of as many
    random ones ("replace", SYNTH_MIX=replace), all at K = ks[0]; the oracle arm: K = 1 (its votes only supply the
    pairs, the same as "same_reference"'s), p* from the true quality (LABEL_ARGS=--oracle), SYNTH_PAIRS as
    "same_reference"."""
    bench = "".join(f"{name}={path}\n" for name, path in benches.items())
    def arm(k: int, n: int, label_args: Optional[str] = None, mix: str = "add") -> dict[str, str]:
        return {**loop_settings(args, base, k, bench, pool=pool, label_args=label_args), "SYNTH_PAIRS": str(n),
                "SYNTH_MIX": mix}
    return {exp / "random": arm(args.ks[0], 0), exp / "same_reference": arm(args.ks[0], args.same_reference_pairs),
            exp / "replace": arm(args.ks[0], replace_pairs(args), mix="replace"),
            exp / "oracle": arm(1, args.same_reference_pairs, f"--oracle {pool_labels}")}


def pairs_nested(replace: Path, random: Path, same: Path) -> dict[str, bool]:
    """Whether the "replace" arm's round-2 random pairs are the first of the "random" arm's and its same-reference
    pairs the first of the "same_reference" arm's (the draws are nested: sample_votes.sample_pairs)."""
    def pairs(R: Path, kind: str) -> list[tuple[str, str]]:
        return [(r["a"], r["b"]) for r in common.read_jsonl(R / "votes.jsonl") if r.get("kind", "random") == kind]
    mine = {kind: pairs(replace, kind) for kind in ("random", "same_reference")}
    return {"random": mine["random"] == pairs(random, "random")[:len(mine["random"])],
            "same_reference": mine["same_reference"] == pairs(same, "same_reference")[:len(mine["same_reference"])]}


def base_votes(args: Args, model: str, pool: Path, out: Path) -> Path:
    """`model`'s K = ks[0] votes on round 2's pairs (sample_votes.py with round 2's pair settings: the same pairs):
    whether the round-1 model votes better than the base is its round-2 votes against these."""
    if not (out / ".done").exists():
        out.mkdir(parents=True, exist_ok=True)
        manifest = pool / "manifest.jsonl"
        run_logged([sys.executable, "sample_votes.py", "--model", model, "--images", str(manifest), "--images-root",
                    str(pool), "--out", str(out / "votes.jsonl"), "--num-pairs", str(args.pairs), "--votes-per-pair",
                    str(args.ks[0]), "--seed", str(args.seed + 2), "--same-reference-pairs",
                    str(args.same_reference_pairs), "--pool-manifest", str(manifest), *stage_flags(args).split(),
                    "--mode", "compare", "--batch-size", "64", "--no-text"], out, "base votes on round 2's pairs")
        (out / ".done").touch()
    return out / "votes.jsonl"


def pool_scores(args: Args, model: str, pool: Path, out: Path) -> Path:
    """`model`'s own sampled scores of every pool image (evaluate.py --images on the manifest: no labels)."""
    if not (out / "predictions.jsonl").exists():
        out.mkdir(parents=True, exist_ok=True)
        run_logged([sys.executable, "evaluate.py", "--model", model, "--images", str(pool / "manifest.jsonl"), "--out",
                    str(out), *stage_flags(args).split(), "--samples", str(args.eval_samples), "--batch-size", "32",
                    "--seed", str(args.seed), "--no-text"], out, "scores of the pool")
    return out / "predictions.jsonl"


def accuracy_by_group(votes: Path, quality: dict[str, float], manifest: Path, k: int, kind: str = "same_reference"
                      ) -> dict:
    """Pseudo-label accuracy (K = k) of one kind of pair, by the distortion group of the pair's variants (a pair of
    two variants counts under each group; a pair of two references under "none"): which distortions the voter can
    judge. Reads the manifest's types only to report."""
    group_of = {kind: group for group, kinds in distortions.GROUPS.items() for kind in kinds}
    groups = {r["image"]: group_of[r["type"]] for r in common.read_jsonl(manifest) if r["type"]}
    correct: dict[str, list[float]] = {}
    for r in common.read_jsonl(votes):
        if r.get("kind", "random") != kind or quality[r["a"]] == quality[r["b"]]:
            continue
        va, vb = subsample_votes(r["answers"], k)
        right = 0.5 if va == vb else float((va > vb) == (quality[r["a"]] > quality[r["b"]]))
        for group in {groups[x] for x in (r["a"], r["b"]) if x in groups} or {"none"}:
            correct.setdefault(group, []).append(right)
    return {g: {"pairs": len(v), "accuracy": float(np.mean(v))} for g, v in sorted(correct.items())}


def pool_experiment(args: Args, base: str, work: Path) -> dict:
    """The arms of `pool_arms` through the loop, then the measured record."""
    pool, pool_labels, benches = pool_data(args, work)
    settings = {**settings_key(args), "world": "distortion", "ks": args.ks[:1], "base": base}  # --world: not read
    exp = work / ("pool-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10])
    arms = pool_arms(args, base, pool, pool_labels, benches, exp)
    random, same, replace, oracle = exp / "random", exp / "same_reference", exp / "replace", exp / "oracle"
    if not args.report_only:
        start = time.time()
        run_loops(arms, args.jobs)
        base_votes(args, base, pool, exp / "base_votes_round2")
        pool_scores(args, base, pool, exp / "base_scores")
        pool_scores(args, str(same / "round_1" / "model"), pool, exp / "round1_scores")
        wall = round(time.time() - start, 1)
    quality = {r["image"]: r["mos"] for r in common.read_jsonl(pool_labels)}
    mos = {b: {r["image"]: r["mos"] for r in common.read_jsonl(path)} for b, path in benches.items()}
    rounds = {"round_0": same / "round_0", "round_1": same / "round_1", "round_2_random": random / "round_2",
              "round_2_same_reference": same / "round_2", "round_2_replace": replace / "round_2",
              "oracle_round_1": oracle / "round_1",
              "oracle_round_2": oracle / "round_2"}
    rows = {}
    for name, R in rounds.items():
        rows[name] = {b: bench_correlations(R / "eval", mos[b], b) for b in mos}
        rows[name]["synthetic"]["srcc_within_reference"] = within_reference_srcc(R / "eval", benches["synthetic"])
        if (R / "pseudolabels.jsonl").exists():
            rows[name]["pairs_trained"] = len(common.read_jsonl(R / "pseudolabels.jsonl"))
            rows[name]["group_size"] = trained_group_size(R / "model")
            rows[name]["grpo"] = train_stats(R / "model" / "train_log.jsonl")
    votes1, votes2, base2 = random / "round_1" / "votes.jsonl", same / "round_2" / "votes.jsonl", \
        exp / "base_votes_round2" / "votes.jsonl"
    kinds, acc_ks = ("random", "same_reference"), sorted(set(args.acc_ks) | {args.ks[0]})
    accuracy = {"round_1_random": pseudolabel_accuracy(votes1, quality, acc_ks, kind="random"),
                **{f"round_2_{kind}": pseudolabel_accuracy(votes2, quality, acc_ks, kind=kind) for kind in kinds},
                "round_2_random_arm": pseudolabel_accuracy(random / "round_2" / "votes.jsonl", quality, acc_ks),
                **{f"round_2_replace_arm_{kind}": pseudolabel_accuracy(replace / "round_2" / "votes.jsonl", quality,
                                                                       acc_ks, kind=kind) for kind in kinds}}
    manifest = pool / "manifest.jsonl"
    by_group = {f"{who}_{kind}": accuracy_by_group(votes, quality, manifest, args.ks[0], kind)
                for who, votes in (("round_1_model", votes2), ("base", base2)) for kind in kinds}
    voter = {kind: {"base": pseudolabel_accuracy(base2, quality, acc_ks, kind=kind),
                    "round_1_model": accuracy[f"round_2_{kind}"]} for kind in kinds}
    own = {}  # the premise's other side: each voter's own mean score ranking on the pairs it voted on
    for who, scores in (("base", exp / "base_scores"), ("round_1_model", exp / "round1_scores")):
        predictions = scores / "predictions.jsonl"
        own[f"{who}/round_1_pairs"] = own_score_accuracy(predictions, votes1, quality)
        for kind in kinds:
            own[f"{who}/round_2_{kind}_pairs"] = own_score_accuracy(predictions, votes2, quality, kind)
    return {"time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": " ".join(["python", "experiments/evolve.py", *sys.argv[1:]]), "note": args.note,
            "settings": settings, "base_sha256": common.file_sha256(Path(base) / "model.safetensors"),
            "work": str(exp), "rounds": rows, "pseudolabel_accuracy": accuracy, "accuracy_by_group": by_group,
            "voter_round_2_pairs": voter, "own_score_accuracy": own,
            "round_1_identical_in_both_runs": same_round(random / "round_1", same / "round_1"),
            "round_1_identical_in_replace": same_round(random / "round_1", replace / "round_1"),
            "replace_pairs_are_the_first": pairs_nested(replace / "round_2", random / "round_2", same / "round_2"),
            "stage_seconds": {f"{arm.name}/{k}": v for arm in arms for k, v in
                              stage_seconds(arm / "evolution.log").items()},
            "wall_seconds_per_arm": {arm.name: sum(stage_seconds(arm / "evolution.log").values()) for arm in arms},
            **({"invocation_seconds": wall} if not args.report_only else {}), **provenance()}


def summarize_pool(history: list[dict]) -> None:
    """The pool experiment's records that differ only in their seed (the last of each seed; records marked
    "superseded" left out): SRCC per arm and round, per seed and mean +- sd (n - 1) over the seeds; the arms' lift
    over "random"; pseudo-label accuracy (K = ks[0]) per kind of pair and per distortion group."""
    groups: dict[str, dict[int, dict]] = {}
    for record in history:
        if "superseded" not in record:
            key = json.dumps({**{k: v for k, v in record["settings"].items() if k not in ("seed", "base")},
                              "base_sha256": record.get("base_sha256")}, sort_keys=True)
            groups.setdefault(key, {})[record["settings"]["seed"]] = record
    stat = lambda v: f"{np.mean(v):6.3f} +- {np.std(v, ddof=1) if len(v) > 1 else 0:.3f}"  # noqa: E731
    for key, by_seed in groups.items():
        seeds, records = sorted(by_seed), [by_seed[s] for s in sorted(by_seed)]
        st, k = json.loads(key), f"K{records[0]['settings']['ks'][0]}"
        print(f"\npool experiment: pool {st['pool']} x {st['pool_variants'] + 1}, pairs {st['pairs']} + "
              f"{st['same_reference_pairs']}, base sha256 {str(st['base_sha256'])[:12]}, seeds {seeds}")

        def srcc(record: dict, row: str, bench: str) -> Optional[float]:  # "within": the synthetic one's
            cell = record["rounds"].get(row, {})
            return (cell.get("synthetic", {}).get("srcc_within_reference") if bench == "within" else
                    cell.get(bench, {}).get("srcc"))
        for b in ("authentic", "synthetic", "within"):
            print(f"  SRCC {b} (per seed; mean +- sd)")
            for row in records[0]["rounds"]:
                v = [srcc(r, row, b) for r in records]
                if None not in v:
                    print(f"    {row:24s} " + " ".join(f"{x:6.3f}" for x in v) + f"   {stat(v)}")
            for arm in ("round_2_same_reference", "round_2_replace", "oracle_round_2"):
                v = [srcc(r, arm, b) - srcc(r, "round_2_random", b) for r in records
                     if srcc(r, arm, b) is not None]
                if len(v) == len(records):
                    print(f"    {arm + ' - random':24s} " + " ".join(f"{x:+6.3f}" for x in v) + f"   {stat(v)}")
        for name in records[0]["pseudolabel_accuracy"]:
            v = [r["pseudolabel_accuracy"][name][k]["accuracy"] for r in records if name in r["pseudolabel_accuracy"]]
            print(f"  pseudo-label accuracy {k} {name:36s} " + " ".join(f"{x:.3f}" for x in v) + f"   {stat(v)}")
        for kind in records[0]["voter_round_2_pairs"]:
            for who in ("base", "round_1_model"):
                v = [r["voter_round_2_pairs"][kind][who][k]["accuracy"] for r in records]
                print(f"  round-2 {kind} pairs, {k} votes of the {who:14s} " + " ".join(f"{x:.3f}" for x in v)
                      + f"   {stat(v)}")
        for name in records[0]["accuracy_by_group"]:
            by_group = [r["accuracy_by_group"][name] for r in records]
            print(f"  by group, {name} (mean over seeds): " + ", ".join(
                f"{g} {np.mean([x[g]['accuracy'] for x in by_group if g in x]):.2f}"
                for g in sorted({g for x in by_group for g in x})))
        for name in records[0]["own_score_accuracy"]:
            v = [r["own_score_accuracy"][name]["mean_of_samples"] for r in records]
            print(f"  own mean-score ranking {name:40s} " + " ".join(f"{x:.3f}" for x in v) + f"   {stat(v)}")
        print("  wall seconds per arm (mean): " + ", ".join(
            f"{a} {np.mean([r['wall_seconds_per_arm'][a] for r in records]):.0f}"
            for a in records[0]["wall_seconds_per_arm"]))


def print_pool_record(record: dict) -> None:
    fmt = lambda v: "   -  " if v is None else f"{v:6.3f}"  # noqa: E731
    print(f"\npool experiment, seed {record['settings']['seed']}: SRCC (mean of {record['settings']['eval_samples']} "
          "samples) on the held-out authentic / synthetic benchmarks, and on the synthetic one within each reference")
    for name, row in record["rounds"].items():
        print(f"  {name:24s} {fmt(row['authentic']['srcc'])} {fmt(row['synthetic']['srcc'])} "
              f"{fmt(row['synthetic'].get('srcc_within_reference'))}   pairs trained {row.get('pairs_trained', '-')}")
    for name, acc in record["pseudolabel_accuracy"].items():
        print(f"  pseudo-label accuracy {name:30s} ({acc['pairs']} pairs): " + ", ".join(
            f"{k} {v['accuracy']:.3f}" for k, v in acc.items() if k != "pairs"))
    k = f"K{record['settings']['ks'][0]}"
    for kind, row in record["voter_round_2_pairs"].items():
        print(f"  round-2 {kind} pairs, {k} votes: base {row['base'][k]['accuracy']:.3f}, round-1 model "
              f"{row['round_1_model'][k]['accuracy']:.3f}")
    for name, v in record["own_score_accuracy"].items():
        print(f"  own mean-score ranking {name:40s} {v['mean_of_samples']:.3f} ({v['pairs']} pairs)")
    for name, groups in record["accuracy_by_group"].items():
        print(f"  by group, {name}: " + ", ".join(f"{g} {v['accuracy']:.2f} ({v['pairs']})" for g, v in groups.items()))
    print("  wall seconds per arm: " + ", ".join(f"{k} {v}" for k, v in record["wall_seconds_per_arm"].items()))


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: main
# ---------------------------------------------------------------------------------------------------------------------


def main_experiment(args: Args, base: str, work: Path) -> dict:
    """The K runs and the oracle arm through the loop, then the measured record."""
    pool, pool_labels = make_data(work, "pool", args.pool, False, args.world, args.image_size)
    bench, _ = make_data(work, "bench", args.bench, True, args.world, args.image_size)
    bench_labels = bench / "labels.jsonl"  # evaluate.py resolves image paths relative to the labels file's folder
    settings = {**settings_key(args), "base": base}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    runs = {f"K{k}": work / f"{args.mode}-{digest}" / f"K{k}" for k in args.ks}
    loops = {runs[f"K{k}"]: loop_settings(args, base, k, f"synthetic={bench_labels}\n", images=pool) for k in args.ks}
    if args.oracle:  # K = 1: its votes only supply the pairs, which depend on SEED and the pool alone
        runs["oracle"] = work / f"{args.mode}-{digest}" / "oracle"
        loops[runs["oracle"]] = loop_settings(args, base, 1, f"synthetic={bench_labels}\n", images=pool,
                                              label_args=f"--oracle {pool_labels}")
    start = time.time()
    if not args.report_only:
        run_loops(loops, args.jobs)
        if args.greedy:
            for run in runs.values():
                greedy_evals(args, run, base, bench_labels)

    quality = {r["image"]: r["mos"] for r in common.read_jsonl(pool_labels)}
    mos = {r["image"]: r["mos"] for r in common.read_jsonl(bench_labels)}
    main_votes = runs[f"K{args.ks[0]}"] / "round_1" / "votes.jsonl"
    return {
        "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join(["python", "experiments/evolve.py", *sys.argv[1:]]),
        "note": args.note, "settings_hash": digest, "settings": settings, "ks": args.ks,
        "base_sha256": common.file_sha256(Path(base) / "model.safetensors")
        if (Path(base) / "model.safetensors").exists() else None,
        "base_heldout": json.loads((Path(base) / "heldout.json").read_text()) if (Path(base) / "heldout.json").exists()
        else None,
        "invocation_seconds": round(time.time() - start, 1),
        "runs": {name: measure_run(run, args, mos, quality) for name, run in runs.items() if run.exists()},
        "pseudolabel_accuracy_round1": pseudolabel_accuracy(main_votes, quality, args.acc_ks, args.mode)
        if main_votes.exists() else None,
        "own_score_accuracy_round1": own_score_accuracy(
            base_pool_scores(args, base, pool, work / f"{args.mode}-{digest}" / "base_pool_scores"), main_votes,
            quality) if main_votes.exists() and not args.report_only else None,
        **provenance(),
    }


def main() -> None:
    args = common.parse_args(Args)
    if args.summarize:
        path = Path(args.record or ROOT / "experiments" / "evolve_results.json")
        return summarize(json.loads(path.read_text()) if path.exists() else [])
    base = str(Path(args.base).resolve())
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.pool_variants:
        record = pool_experiment(args, base, work)
        print_pool_record(record)
    else:
        record = main_experiment(args, base, work)
        print_table(record)
    if not args.report_only:
        records.save(record, args.record, Path(record["work"] if args.pool_variants else
                                               work / f"{args.mode}-{record['settings_hash']}") / "record.json")


if __name__ == "__main__":
    main()
