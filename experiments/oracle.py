"""The oracle arm of the CPU test bed: can the online stage (the REAL grpo_train.py) lift a base's SRCC when
its pseudo-labels are RIGHT? A positive control: pseudo-labels from the pool's true quality (p* in {0, .5, 1}), and
the same pairs with REVERSED labels (p* -> 1 - p*), which must lower it. If correct and reversed labels cannot be told
apart, no vote quality can help, and a reward or alignment bug is possible.

Ground truth is used twice here and nowhere else: to write the oracle pseudo-labels (the point of the arm) and to
measure. Evaluation: SRCC of the mean of --samples sampled scores, on the held-out benchmark AND on the training pool,
repeated over --eval-seeds sampling seeds (their spread is the evaluation noise).

    python experiments/oracle.py --labels oracle reversed     # the record: in --work, or appended to --record FILE
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
from fixtures.ground_truth import load_set, oracle_pairs, srcc_table, write_pseudolabels  # noqa: E402
from experiments import records  # noqa: E402
from fixtures.synthetic import write_set  # noqa: E402


@dataclass
class Args:
    base: str = common.arg(str(ROOT / "demo" / "base"), help="base checkpoint folder")
    world: str = common.arg("noise", help="synthetic world of the pool and bench (fixtures.synthetic)")
    image_size: int = common.arg(56, help="side of the synthetic images")
    labels: list[str] = common.arg(["oracle", "reversed"], help="arms: oracle (true order) and/or reversed")
    pool: int = common.arg(64, help="pool images (the GRPO training images)")
    bench: int = common.arg(200, help="held-out benchmark images")
    pairs: int = common.arg(256, help="pairs drawn from the pool (distinct, unordered)")
    pairs_per_step: int = common.arg(8, help="pairs per GRPO step")
    epochs: int = common.arg(1, help="GRPO passes over the pairs")
    max_steps: int = common.arg(0, help="stop GRPO after N steps (0: all)")
    group_size: int = common.arg(8, help="G")
    lr: float = common.arg(1e-3, help="GRPO peak learning rate")
    warmup_steps: int = common.arg(0, help="GRPO linear warm-up steps")
    beta: float = common.arg(0.0, help="KL weight")
    max_new_tokens: int = common.arg(10, help="answer budget")
    max_pixels: int = common.arg(56 * 56, help="processor max_pixels")
    samples: int = common.arg(8, help="sampled scores averaged per image")
    eval_seeds: int = common.arg(5, help="evaluation seeds (their spread is the evaluation noise)")
    seed: int = common.arg(0, help="seed of the pair draw and of GRPO")
    threads: int = common.arg(1, help="torch threads of every process")
    work: str = common.arg(str(records.RUNS / "oracle"), help="data and runs (reused: a finished run is not redone)")
    record: str = common.arg("", help="append the record to this JSON list (e.g. experiments/evolve_results.json)")
    note: str = common.arg("", help="why this setting was tried")


def main() -> None:
    args = common.parse_args(Args)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    pool_dir, bench_dir = work / f"{args.world}_pool_{args.pool}", work / f"{args.world}_bench_{args.bench}"
    pool_labels = work / f"{args.world}_pool_{args.pool}.labels.jsonl"
    if not pool_labels.exists():  # the pool's labels live OUTSIDE its folder: grpo_train.py sees images only
        write_set(pool_dir, "pool", args.pool, args.image_size, args.world)
        os.replace(pool_dir / "labels.jsonl", pool_labels)
    if not (bench_dir / "labels.jsonl").exists():
        write_set(bench_dir, "bench", args.bench, args.image_size, args.world)
    quality = {r["image"]: r["mos"] for r in common.read_jsonl(pool_labels)}
    pairs = oracle_pairs(quality, args.pairs, args.seed)
    sets = {"bench": load_set(bench_dir, common.read_jsonl(bench_dir / "labels.jsonl")),
            "pool": load_set(pool_dir, common.read_jsonl(pool_labels))}
    evaluate = lambda model: srcc_table(model, sets, args.samples, args.eval_seeds, args.max_pixels,  # noqa: E731
                                        args.max_new_tokens)

    settings = {k: v for k, v in asdict(args).items() if k not in ("labels", "work", "record", "note", "threads")}
    settings["base_sha256"] = common.file_sha256(Path(args.base) / "model.safetensors")
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    record = {"kind": "oracle_probe", "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "command": " ".join(["python", "experiments/oracle.py", *sys.argv[1:]]), "note": args.note, "probe": settings,
              "pairs_with_a_winner": sum(p != 0.5 for _, _, p in pairs), "arms": {}}
    start = time.time()
    record["base"] = evaluate(args.base)
    print(f"base: {json.dumps(record['base'])}", flush=True)
    for arm in args.labels:
        run = work / f"{digest}-{arm}"
        run.mkdir(parents=True, exist_ok=True)
        write_pseudolabels(run / "pseudolabels.jsonl", pairs, reverse=arm == "reversed")
        if not (run / "model" / "config.json").exists():
            cmd = [sys.executable, "grpo_train.py", "--model", args.base,
                   "--pseudolabels", str(run / "pseudolabels.jsonl"),
                   "--images-root", str(pool_dir), "--out", str(run / "model"), "--group-size", str(args.group_size),
                   "--seed", str(args.seed), "--no-reasoning", "--max-pixels", str(args.max_pixels),
                   "--max-new-tokens", str(args.max_new_tokens), "--lr", str(args.lr), "--beta", str(args.beta),
                   "--pairs-per-step", str(args.pairs_per_step), "--epochs", str(args.epochs),
                   "--warmup-steps", str(args.warmup_steps), "--max-steps", str(args.max_steps),
                   "--micro-batch-size", "256", "--save-every", "100000", "--resume"]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
            t0 = time.time()
            with open(run / "grpo.log", "w") as log:
                subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
            print(f"{arm}: grpo_train.py {time.time() - t0:.0f} s", flush=True)
        steps = common.read_jsonl(run / "model" / "train_log.jsonl")
        q = max(1, len(steps) // 4)
        def mean(rows: list, k: str):
            values = [r[k] for r in rows if r.get(k) is not None]
            return float(np.mean(values)) if values else None
        record["arms"][arm] = {**evaluate(str(run / "model")), "grpo": {
            "steps": len(steps), "reward_first_quarter": mean(steps[:q], "reward/mean"),
            "reward_last_quarter": mean(steps[-q:], "reward/mean"), "kl_last": steps[-1]["kl/mean"],
            "parse_failure_rate": mean(steps, "rollout/parse_failure_rate"),
            "zero_std_fraction": mean(steps, "reward/zero_std_fraction"), "s_per_step": mean(steps, "time/step")}}
        print(f"{arm}: {json.dumps(record['arms'][arm])}", flush=True)
    record["seconds"] = round(time.time() - start, 1)
    print(f"\n{'arm':10s} {'bench SRCC':>18s} {'pool SRCC':>18s}   (mean of {args.samples} samples; "
          f"mean +- std over {args.eval_seeds} eval seeds)")
    for name, row in [("base", record["base"]), *record["arms"].items()]:
        print(f"{name:10s} {row['bench']['srcc']:8.3f} +- {row['bench']['srcc_std']:.3f}  "
              f"{row['pool']['srcc']:8.3f} +- {row['pool']['srcc_std']:.3f}")
    records.save(record, args.record, work / f"{digest}-record.json")


if __name__ == "__main__":
    main()
