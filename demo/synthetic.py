"""A synthetic IQA world: procedural images with graded distortions and a known quality.

Content (from a seed): smooth colour fields, stripes, fine texture, hard-edged shapes. Distortions at levels 0..4:
Gaussian blur, Gaussian noise, JPEG quality, contrast reduction; some images carry two. The known quality is
`5 - worst level - 0.5 * second level` (clipped to [1, 5]); in the "noise" world every image has one
distortion, Gaussian noise, and quality `5 - level`: it is used only to REPORT (benchmark MOS, pseudo-label
accuracy), never by the evolution itself.

Three disjoint content sets come from different seed ranges (warm-start, unlabeled pool, held-out benchmark).

A distorted world (`write_pool_world`) adds the training pool's variants: make_pool.py gives every image V variants
from the 35 x 5 distortion library, and a variant's known quality is its reference's minus its level (1..5). So
within one reference the order is reference > level 1 > ... > level 5, whatever the type, and across references a
mildly distorted clean image can beat a noisy original. Like the others, this quality only serves to report.

    python demo/synthetic.py OUT_DIR --set pool --n 64        # writes OUT_DIR/*.png and OUT_DIR/labels.jsonl
    python demo/synthetic.py OUT_DIR --set pool --n 64 --variants 2   # OUT_DIR: make_pool.py's layout + labels.jsonl
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SEED_BASE = {"warmstart": 0, "pool": 1_000_000, "bench": 2_000_000}  # disjoint content seeds per set
CONTENTS = ("smooth", "stripes", "texture", "shapes")
DISTORTIONS = ("blur", "noise", "jpeg", "contrast")
WORLDS = ("mixed", "noise")


def make_content(rng: np.random.Generator, size: int, kind: str) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size] / size
    if kind == "smooth":
        corner, right, down = (rng.uniform(0, 255, 3) for _ in range(3))
        img = corner + np.multiply.outer(xx, right - corner) + np.multiply.outer(yy, down - corner) * 0.5
    elif kind == "stripes":
        freq, angle = rng.uniform(3, 12), rng.uniform(0, np.pi)
        wave = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))
        dark, light = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        img = np.multiply.outer((wave + 1) / 2, light - dark) + dark
    elif kind == "texture":
        base = rng.uniform(40, 215, 3)
        grain = rng.normal(0, 1, (size // 4, size // 4, 3))
        grain = np.kron(grain, np.ones((4, 4, 1)))
        img = base + 45 * grain + 30 * np.sin(2 * np.pi * rng.uniform(8, 20) * xx)[..., None]
    else:
        canvas = Image.new("RGB", (size, size), tuple(int(v) for v in rng.uniform(0, 255, 3)))
        draw = ImageDraw.Draw(canvas)
        for _ in range(rng.integers(3, 7)):
            x0, y0 = rng.integers(0, size - 16, 2)
            x1, y1 = x0 + rng.integers(12, size // 2), y0 + rng.integers(12, size // 2)
            fill = tuple(int(v) for v in rng.uniform(0, 255, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([int(x0), int(y0), int(x1), int(y1)], fill=fill)
        return canvas
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def distort(img: Image.Image, kind: str, level: int, rng: np.random.Generator) -> Image.Image:
    if level == 0:
        return img
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=[0, 0.8, 1.6, 2.8, 4.5][level]))
    if kind == "noise":
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, [0, 8, 18, 32, 52][level], (*img.size[::-1], 3))
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if kind == "jpeg":
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=[95, 30, 15, 8, 3][level])
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    arr = np.asarray(img, dtype=np.float32)  # contrast: pull every pixel toward the mean grey
    factor = [1, 0.7, 0.45, 0.28, 0.15][level]
    return Image.fromarray(np.clip(arr.mean() + factor * (arr - arr.mean()), 0, 255).astype(np.uint8), "RGB")


def make_image(seed: int, size: int = 112, world: str = "mixed") -> tuple[Image.Image, dict]:
    """One image and its record (content, distortions, quality), fully determined by `seed` and the world:
    "mixed" (four distortion kinds, a quarter with two) or "noise" (one kind, Gaussian noise: a world a tiny vision
    tower perceives easily)."""
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; expected one of {WORLDS}")
    rng = np.random.default_rng(seed)
    content = CONTENTS[rng.integers(len(CONTENTS))]
    img = make_content(rng, size, content)
    if world == "noise":
        level = int(rng.integers(0, 5))
        return distort(img, "noise", level, rng), {"content": content, "distortions": {"noise": level},
                                                   "mos": float(5 - level)}
    kinds = list(rng.choice(DISTORTIONS, size=2 if rng.random() < 0.25 else 1, replace=False))
    levels = [int(rng.integers(0, 5)) for _ in kinds]
    for kind, level in zip(kinds, levels):
        img = distort(img, kind, level, rng)
    worst, second = (sorted(levels, reverse=True) + [0])[:2]
    quality = float(np.clip(5 - worst - 0.5 * second, 1, 5))
    return img, {"content": content, "distortions": dict(zip(kinds, levels)), "mos": quality}


def write_set(out_dir: str | Path, which: str, n: int, size: int = 112, world: str = "mixed") -> Path:
    """Write n images of one content set and `labels.jsonl` ({"image", "mos", ...}: also a benchmark file)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "labels.jsonl", "w") as f:
        for i in range(n):
            img, record = make_image(SEED_BASE[which] + i, size, world)
            name = f"{which}_{i:05d}.png"
            img.save(out_dir / name)
            f.write(json.dumps({"image": name, **record}) + "\n")
    return out_dir


def write_pool_world(out_dir: str | Path, which: str, n: int, size: int = 112, world: str = "mixed",
                     variants: int = 2, seed: int = 0) -> Path:
    """n images of one content set with `variants` distorted versions each, laid out by make_pool.py in `out_dir`,
    and `out_dir/labels.jsonl` ({"image", "mos", "reference", "level"} for every manifest image, names relative to
    `out_dir`): a variant's quality is its reference's minus its level."""
    out_dir = Path(out_dir)
    source = out_dir.with_name(out_dir.name + ".source")
    write_set(source, which, n, size, world)
    mos = {r["image"]: r["mos"] for r in map(json.loads, (source / "labels.jsonl").read_text().splitlines())}
    (source / "labels.jsonl").unlink()  # not an image: make_pool.py would skip nothing, but keep the input clean
    subprocess.run([sys.executable, "make_pool.py", "--images", str(source), "--out", str(out_dir), "--variants",
                    str(variants), "--seed", str(seed), "--workers", "1"], cwd=Path(__file__).resolve().parents[1],
                   check=True, capture_output=True)
    shutil.rmtree(source)
    with open(out_dir / "labels.jsonl", "w") as f:
        for line in (out_dir / "manifest.jsonl").read_text().splitlines():
            r = json.loads(line)
            quality = mos[r["reference"].removeprefix("references/")] - r["level"]
            f.write(json.dumps({"image": r["image"], "mos": float(quality), "reference": r["reference"],
                                "level": r["level"]}) + "\n")
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--set", default="pool", choices=sorted(SEED_BASE))
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--world", default="mixed", choices=WORLDS)
    parser.add_argument("--variants", type=int, default=0, help="distorted versions per image (make_pool.py)")
    a = parser.parse_args()
    if a.variants:
        print(write_pool_world(a.out_dir, a.set, a.n, a.size, a.world, a.variants))
    else:
        print(write_set(a.out_dir, a.set, a.n, a.size, a.world))
