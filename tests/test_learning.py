"""Does grpo_train.py LEARN? A few GRPO steps of the real stage (a subprocess: its real code path) on the shipped base
of the CPU test bed (demo/base), with oracle pseudo-labels (p* from the true quality), must raise the SRCC of the
pool's scores (or at least not lower it) and the same steps with REVERSED labels must lower it, by a clear margin
between the two arms. Unit tests cannot see a reward
aligned with the wrong rows, an advantage with the wrong sign or a log-prob of the wrong token; this test does.

The pool is one the base can tell apart: the shipped base's scores follow image CONTENT (smooth field, stripes,
texture, shapes) and not the noise level (see README "Does it evolve?"), so here the true quality is set by content
(noise level 0, 1, 3, 4 by content kind). Oracle labels must then reorder the content kinds' scores."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from demo import oracle as O  # noqa: E402
from demo.synthetic import SEED_BASE, make_image  # noqa: E402
from demo.warmstart import same_content_variant  # noqa: E402

BASE = ROOT / "demo" / "base"
LEVEL = {"texture": 0, "smooth": 1, "stripes": 3, "shapes": 4}  # the base scores shapes > texture > smooth > stripes
PER_CONTENT, PER_STEP, STEPS, G, LR, BETA = 2, 14, 8, 8, 5e-4, 0.02
# Measured on this machine (pool SRCC, mean of 8 samples, mean of 2 seeds): base -.22, oracle .00, reversed -.61.
# Eight steps move the base's own bias (reversed) much faster than they undo it (oracle): the gap between the arms is
# what a wrong sign or a misaligned reward would erase, so it carries the main margin; oracle must not fall.
GAP, DROP = 0.35, 0.2


def content_coded_pool(folder: Path) -> dict[str, float]:
    """PER_CONTENT pool-seed images of each content kind, noise level set by the kind; {name: true quality}."""
    folder.mkdir()
    quality, counts, seed = {}, dict.fromkeys(LEVEL, 0), SEED_BASE["pool"]
    while min(counts.values()) < PER_CONTENT:
        content = make_image(seed, 56, "noise")[1]["content"]
        if counts[content] < PER_CONTENT:
            counts[content] += 1
            name = f"{content}_{counts[content]}.png"
            same_content_variant(seed, "noise", LEVEL[content], 56, "noise").save(folder / name)
            quality[name] = 5.0 - LEVEL[content]
        seed += 1
    return quality


def grpo(out: Path, labels: Path, pool: Path) -> None:
    cmd = [sys.executable, "grpo_train.py", "--model", str(BASE), "--pseudolabels", str(labels), "--images-root",
           str(pool), "--out", str(out), "--group-size", str(G), "--pairs-per-step", str(PER_STEP), "--lr", str(LR),
           "--beta", str(BETA), "--max-steps", str(STEPS), "--epochs", "20", "--warmup-steps", "1",
           "--no-reasoning", "--max-new-tokens", "10", "--max-pixels", "3136", "--micro-batch-size", "256",
           "--save-every", "1000", "--seed", "0"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_oracle_labels_raise_pool_srcc_and_reversed_labels_lower_it(tmp_path):
    assert (BASE / "model.safetensors").exists(), "the shipped base demo/base is missing"
    pool = tmp_path / "pool"
    quality = content_coded_pool(pool)
    names = sorted(quality)
    pairs = O.oracle_pairs(quality, 10_000, seed=0)  # every pair
    assert sum(p != 0.5 for _, _, p in pairs) >= 0.7 * len(pairs)
    sets = {"pool": O.load_set(pool, [{"image": n, "mos": quality[n]} for n in names])}
    srcc = {"base": O.srcc_table(str(BASE), sets, 8, 2, 3136, 10)["pool"]["srcc"]}
    for arm in ("oracle", "reversed"):
        O.write_pseudolabels(tmp_path / f"{arm}.jsonl", pairs, reverse=arm == "reversed")
        grpo(tmp_path / arm, tmp_path / f"{arm}.jsonl", pool)
        srcc[arm] = O.srcc_table(str(tmp_path / arm), sets, 8, 2, 3136, 10)["pool"]["srcc"]
    print(srcc)
    assert np.isfinite(list(srcc.values())).all()
    assert srcc["oracle"] > srcc["reversed"] + GAP, srcc
    assert srcc["reversed"] < srcc["base"] - DROP, srcc
    assert srcc["oracle"] >= srcc["base"], srcc
