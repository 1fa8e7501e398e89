"""Assets of the CPU demo that `bash run_evolution.sh` runs with no settings.

A tiny Qwen2.5-VL of the real architecture (0.2 M parameters) is taught the no-reasoning ANSWER FORMAT with a short
supervised warm-start (demo/warmstart.py with a small model and budget), so that the stages have answers to parse;
its quality judgement is near random, so the demo's numbers mean nothing. Plus a pool of synthetic unlabeled images
and a small synthetic benchmark with a known quality (demo/synthetic.py).

    python demo/make_demo.py --out runs/demo_assets     # writes base/, pool/, bench/labels.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from demo import warmstart  # noqa: E402
from demo.synthetic import write_set  # noqa: E402


def make_demo(out: Path, steps: int = 150, pool: int = 24, bench: int = 16) -> None:
    write_set(out / "pool", "pool", pool)
    write_set(out / "bench", "bench", bench)
    args = warmstart.Args(out=str(out / "base"), steps=steps, score_batch=8, compare_batch=8, warmup_steps=5, lr=3e-3,
                          n_images=200, max_pixels=56 * 56, text_hidden=64, text_layers=2, vision_hidden=32,
                          vision_depth=2, tried_log="")
    warmstart.train(args, out / "base")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for base/, pool/ and bench/")
    parser.add_argument("--steps", type=int, default=150, help="warm-start steps (enough to learn the answer format)")
    parser.add_argument("--pool", type=int, default=24, help="unlabeled pool images")
    parser.add_argument("--bench", type=int, default=16, help="benchmark images")
    a = parser.parse_args()
    make_demo(Path(a.out), a.steps, a.pool, a.bench)
    print(a.out)
