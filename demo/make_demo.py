"""Assets of the CPU demo that `bash run_evolution.sh` runs with no settings.

The base is the test bed's SHIPPED base, demo/base/ (a 0.71 M-parameter Qwen2.5-VL of the real architecture,
warm-started on the synthetic "noise" world by experiments/warmstart.py; demo/base/REPRODUCE.md holds the command,
settings and sha256), copied to OUT/base. Plus a pool of unlabeled synthetic images (their true quality goes to
OUT/pool.labels.jsonl, OUTSIDE the pool folder: no stage reads it) and a held-out synthetic benchmark with a known
quality (OUT/bench/labels.jsonl, read only by evaluate.py).

    python demo/make_demo.py --out runs/demo/assets     # writes base/, pool/, pool.labels.jsonl, bench/
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures.synthetic import write_set  # noqa: E402

SHIPPED_BASE = Path(__file__).resolve().parent / "base"
WORLD, SIZE = "noise", 56  # the world and image side the shipped base was warm-started on


def make_demo(out: Path, pool: int = 64, bench: int = 128, base: Path = SHIPPED_BASE) -> None:
    if not (base / "model.safetensors").exists():
        sys.exit(f"error: {base} holds no model.safetensors (the shipped demo base; see demo/base/REPRODUCE.md)")
    write_set(out / "pool", "pool", pool, SIZE, WORLD)
    os.replace(out / "pool" / "labels.jsonl", out / "pool.labels.jsonl")
    write_set(out / "bench", "bench", bench, SIZE, WORLD)
    shutil.rmtree(out / "base", ignore_errors=True)
    shutil.copytree(base, out / "base", ignore=shutil.ignore_patterns("*.md", "warmstart.json", "heldout.json"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for base/, pool/ and bench/")
    parser.add_argument("--pool", type=int, default=64, help="unlabeled pool images")
    parser.add_argument("--bench", type=int, default=128, help="benchmark images")
    parser.add_argument("--base", default=str(SHIPPED_BASE), help="base checkpoint folder to copy")
    a = parser.parse_args()
    make_demo(Path(a.out), a.pool, a.bench, Path(a.base))
    print(a.out)
