"""Benchmark of distortions.py at KonIQ's size (1024 x 768) on one core: each type's time (mean over its 5 levels and
the images), the time to decode a reference and to write a variant as PNG, the bytes a variant takes on disk, and
from these the projected wall time and disk cost of the paper's pool (10,073 images x 10 variants) built by
make_pool.py on N cores.

    python bench/bench_distortions.py                                   # a synthetic landscape; target: < 30 min
    python bench/bench_distortions.py --images a.jpg b.jpg --cores 16   # photographs, resized to 1024 x 768
    python bench/bench_distortions.py --kinds jitter glass_blur         # only these types (no projection)

Times are CPU seconds of the process (time.process_time, one thread), so a busy machine does not inflate them.
The projection assumes make_pool.py's work per reference: one decode, then per variant one draw, one distortion
and one PNG encode (compress level --png-level, make_pool.py's setting), spread evenly over the cores (one process
each; nothing is shared between images). Photographs upscaled from a smaller size are smoother than KonIQ's, so
their PNG bytes are a lower bound; the uncompressed size (3 bytes a pixel) is printed as the upper one.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, before numpy loads
    os.environ[_var] = "1"

import argparse  # noqa: E402
import io  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from scipy import ndimage  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import distortions as D  # noqa: E402


def landscape(width: int, height: int, seed: int = 0) -> Image.Image:
    """A synthetic photo stand-in: sky gradient, textured ground, hard-edged shapes, sensor-like grain."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    t = np.clip(yy / 0.6, 0, 1)[..., None]
    sky = (1 - t) * np.array([0.45, 0.6, 0.85]) + t * np.array([0.9, 0.9, 0.905])
    grain = ndimage.gaussian_filter(rng.normal(0, 1, (height, width, 3)), (2, 2, 0))
    ground = (yy > 0.55 + 0.08 * np.sin(6 * xx))[..., None]
    x = np.where(ground, np.array([0.42, 0.40, 0.36]) + 0.1 * xx[..., None] + 0.6 * grain, sky)
    x += rng.normal(0, 0.01, x.shape)
    img = Image.fromarray((np.clip(x, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.ellipse([width * .6, height * .1, width * .7, height * .25], fill=(250, 220, 90))
    draw.rectangle([width * .15, height * .35, width * .35, height * .7], fill=(150, 60, 50), outline=(30, 20, 20))
    return img


def seconds(fn, repeats: int) -> float:
    """CPU seconds of this process (one thread): what a core spends, whatever else the machine runs."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", nargs="*", default=[], help="photographs to use (default: a synthetic landscape)")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs per type and level")
    parser.add_argument("--kinds", nargs="*", default=[], help="time only these types (default: all 35)")
    parser.add_argument("--pool-images", type=int, default=10073, help="references in the pool (KonIQ-10k)")
    parser.add_argument("--variants", type=int, default=10, help="variants per reference")
    parser.add_argument("--cores", type=int, default=16)
    parser.add_argument("--png-level", type=int, default=1, help="PNG compress level of the variants (make_pool.py)")
    parser.add_argument("--target-min", type=float, default=30.0)
    a = parser.parse_args()
    size = (a.width, a.height)
    images = [Image.open(p).convert("RGB").resize(size, Image.BICUBIC) for p in a.images] or [landscape(*size)]

    unknown = sorted(set(a.kinds) - set(D.TABLE))
    if unknown:
        parser.error(f"unknown distortion type(s) {', '.join(unknown)}")

    print(f"one core, {a.width} x {a.height}, best of {a.repeats}, mean over levels 1..5 and {len(images)} image(s)")
    print(f"{'group':16s} {'type':24s} {'s/variant':>9s}  by level")
    per_type = {}
    for kind, (group, _, _) in D.TABLE.items():
        if a.kinds and kind not in a.kinds:
            continue
        levels = [np.mean([seconds(lambda: D.distort(img, kind, level, seed=level), a.repeats) for img in images])
                  for level in D.LEVELS]
        per_type[kind] = float(np.mean(levels))
        print(f"{group:16s} {kind:24s} {per_type[kind]:9.3f}  " + " ".join(f"{s:.3f}" for s in levels))
    if a.kinds:
        return
    distort_s = float(np.mean(list(per_type.values())))  # the draw is uniform over types

    jpeg = io.BytesIO()
    images[0].save(jpeg, "JPEG", quality=90)  # KonIQ's references are JPEG files of this size
    decode_s = seconds(lambda: Image.open(io.BytesIO(jpeg.getvalue())).convert("RGB"), 5)
    rng, png_bytes, encode_s = np.random.default_rng(0), {1: [], 6: []}, {1: [], 6: []}
    for img in images:
        for kind in D.TABLE:  # one variant per type, a random level: the mix the pool holds
            variant = D.distort(img, kind, int(rng.integers(1, 6)), seed=0)
            for level in png_bytes:
                buffer = io.BytesIO()
                start = time.process_time()
                variant.save(buffer, "PNG", compress_level=level)
                encode_s[level].append(time.process_time() - start)
                png_bytes[level].append(buffer.tell())
    n_variants = a.pool_images * a.variants
    print(f"\nmean distortion (uniform over the {len(per_type)} types): {distort_s:.3f} s; slowest "
          f"{max(per_type, key=per_type.get)} {max(per_type.values()):.3f} s")
    print(f"decode of a {a.width} x {a.height} JPEG reference: {decode_s:.3f} s")
    for level in png_bytes:
        print(f"PNG compress level {level}: encode {np.mean(encode_s[level]):.3f} s, "
              f"{np.mean(png_bytes[level]) / 1e6:.2f} MB per variant (median {np.median(png_bytes[level]) / 1e6:.2f}, "
              f"{len(png_bytes[level])} variants of {len(images)} image(s))")
    print(f"uncompressed: {a.width * a.height * 3 / 1e6:.2f} MB per variant")

    per_reference = decode_s + a.variants * (distort_s + float(np.mean(encode_s[a.png_level])))
    total_min = a.pool_images * per_reference / a.cores / 60
    print(f"\nprojection: {a.pool_images} references x {a.variants} variants = {n_variants} variants on {a.cores} "
          f"cores (PNG level {a.png_level}): {per_reference:.2f} core-s per reference -> {total_min:.1f} min "
          f"(target < {a.target_min:.0f} min: {'met' if total_min < a.target_min else 'NOT met'})")
    for level in png_bytes:
        print(f"disk, variants stored as PNG level {level}: {n_variants * np.mean(png_bytes[level]) / 1e9:.0f} GB; "
              f"rendered on load instead: 0 GB and {distort_s:.2f} s of one core per variant per load")


if __name__ == "__main__":
    main()
