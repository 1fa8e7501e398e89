"""The synthetic distortions of the training pool: 35 types in 12 groups, 5 severity levels each.

The set and its per-level parameters follow the DepictQA distortion library (XPixelGroup/DepictQA,
build_datasets/x_distortion/), written anew with Pillow + numpy + scipy. make_pool.py applies them to every pool
image; the type and level of a variant go into the pool manifest only to pair versions of one reference and to
report: no stage reads them, a variant is voted on like any other image.

    from distortions import distort, draw
    kind, level = draw(np.random.default_rng(0))         # uniform over the 35 types, level uniform in 1..5
    variant = distort(Image.open("x.png"), kind, level, seed=123)   # same size and mode; same pixels for a seed

Inside, an image is an H x W x 3 float32 array in [0, 1]; each function maps (array, its level's parameter, rng) to
an array, clipped to [0, 1] on the way out. Colour spaces: HSV as in colorsys (computed without the round trip: with
hue and saturation fixed RGB scales with the value V; with hue and V fixed V - RGB scales with the saturation S),
YCbCr as in JPEG (BT.601, full range, chroma centred on 0.5).
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance
from scipy import ndimage, signal, special

Array = np.ndarray


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: colour spaces and shared filters
# ---------------------------------------------------------------------------------------------------------------------

YCBCR = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], np.float32)


def rgb_to_ycbcr(x: Array) -> Array:
    return x @ YCBCR.T + np.array([0, 0.5, 0.5], np.float32)


def ycbcr_to_rgb(x: Array) -> Array:
    return (x - np.array([0, 0.5, 0.5], np.float32)) @ np.linalg.inv(YCBCR).T


def gaussian(x: Array, sigma: float, radius: int | None = None) -> Array:
    truncate = 4.0 if radius is None else radius / sigma
    return ndimage.gaussian_filter(x, (sigma, sigma, 0), mode="nearest", truncate=truncate)


def convolve(x: Array, kernel: Array) -> Array:
    """Each channel convolved with an odd-sized 2-D kernel (by FFT), edges repeated."""
    r = kernel.shape[0] // 2
    padded = np.pad(x, ((r, r), (r, r), (0, 0)), mode="edge")
    return signal.fftconvolve(padded, kernel[..., None], mode="valid", axes=(0, 1))


def scramble(x: Array, shift: int, rng: np.random.Generator) -> Array:
    """Every pixel replaced by one at most `shift` pixels away in each direction (a local pixel shuffle)."""
    h, w = x.shape[:2]
    yy = np.clip(np.arange(h)[:, None] + rng.integers(-shift, shift + 1, (h, w)), 0, h - 1)
    xx = np.clip(np.arange(w)[None, :] + rng.integers(-shift, shift + 1, (h, w)), 0, w - 1)
    return x[yy, xx]


def to_pil(x: Array) -> Image.Image:
    return Image.fromarray((np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")


def from_pil(img: Image.Image) -> Array:
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: the distortions, f(image, parameter of the level, rng) -> image
# ---------------------------------------------------------------------------------------------------------------------

def gaussian_blur(x, sigma, rng):
    return gaussian(x, sigma)


def motion_blur(x, p, rng):
    """A one-sided streak of 2 * radius + 1 taps at a random angle, weights a half Gaussian of `sigma` taps."""
    radius, sigma = p
    angle, n = np.deg2rad(rng.uniform(-90, 90)), 2 * radius
    kernel = np.zeros((2 * n + 1, 2 * n + 1), np.float32)
    for t in range(n + 1):
        dy, dx = int(round(t * np.sin(angle))), int(round(t * np.cos(angle)))
        kernel[n + dy, n + dx] += np.exp(-t ** 2 / (2 * sigma ** 2))
    return convolve(x, kernel / kernel.sum())


def glass_blur(x, p, rng):
    sigma, shift, iterations = p
    x = gaussian(x, sigma)
    for _ in range(iterations):
        x = scramble(x, shift, rng)
    return gaussian(x, sigma)


def lens_blur(x, radius, rng):
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disk = (yy ** 2 + xx ** 2 <= radius ** 2).astype(np.float32)
    return convolve(x, disk / disk.sum())


def zoom_blur(x, end, rng):
    """Mean of the image and its centre crops enlarged by each factor in arange(1, end, 0.02)."""
    h, w = x.shape[:2]
    out = x.copy()
    factors = np.arange(1, end, 0.02)
    for z in factors:
        ch, cw = h / z, w / z
        box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
        for c in range(3):
            out[..., c] += np.asarray(Image.fromarray(x[..., c], "F").resize((w, h), Image.BILINEAR, box=box))
    return out / (len(factors) + 1)


def jitter(x, shift, rng):
    return scramble(x, shift, rng)


def gaussian_noise(x, sigma, rng):
    return x + rng.normal(0, sigma, x.shape).astype(np.float32)


def ycbcr_noise(x, p, rng):
    """More noise in the two chroma channels than in luma."""
    sigma_luma, chroma_factor = p
    sigma = np.array([1, chroma_factor, chroma_factor], np.float32) * sigma_luma
    return ycbcr_to_rgb(rgb_to_ycbcr(x) + rng.normal(0, 1, x.shape).astype(np.float32) * sigma)


def speckle_noise(x, scale, rng):
    return x * (1 + rng.normal(0, scale, x.shape).astype(np.float32))


def correlated_noise(x, sigma, rng):
    return ndimage.uniform_filter(gaussian_noise(x, sigma, rng), (3, 3, 1), mode="nearest")


def poisson_noise(x, factor, rng):
    return (rng.poisson(np.clip(x, 0, 1) * factor) / factor).astype(np.float32)


def impulse_noise(x, amount, rng):
    """Salt and pepper: a fraction `amount` of the values set to 0 or 1 (one half each)."""
    u = rng.random(x.shape)
    return np.where(u < amount / 2, 0, np.where(u < amount, 1, x)).astype(np.float32)


def jpeg(x, quality, rng):
    buffer = io.BytesIO()
    to_pil(x).save(buffer, "JPEG", quality=quality)
    return from_pil(Image.open(buffer))


def jpeg2000(x, db, rng):
    buffer = io.BytesIO()
    to_pil(x).save(buffer, "JPEG2000", quality_mode="dB", quality_layers=[db])
    return from_pil(Image.open(buffer))


def with_value(x, value):
    """x with its HSV value (max of R, G, B) replaced, hue and saturation kept: RGB scales with V."""
    v = x.max(-1, keepdims=True)
    value = np.clip(value, 0, 1)
    return np.where(v > 0, x * value / np.maximum(v, 1e-12), value)


def hsv_shift(x, shift, rng):
    return with_value(x, x.max(-1, keepdims=True) + shift)


def rgb_shift(x, shift, rng):
    return x + shift


def hsv_gamma(x, gamma, rng):
    return with_value(x, x.max(-1, keepdims=True) ** gamma)


def rgb_gamma(x, gamma, rng):
    return np.clip(x, 0, 1) ** gamma


def contrast_scale(x, factor, rng):
    return from_pil(ImageEnhance.Contrast(to_pil(x)).enhance(factor))


def contrast_stretch(x, f, rng):
    """1 / (1 + (mean / x)^f) per channel: f > 1 steepens the curve around the channel mean, f < 1 flattens it."""
    mean = x.mean((0, 1), keepdims=True)
    return special.expit(f * (np.log(np.maximum(x, 1e-6)) - np.log(mean)))  # the same curve, without overflow


def saturation_hsv(x, factor, rng):
    """HSV saturation S = (V - min) / V times `factor`, clipped to [0, 1], hue and V kept: V - RGB scales with S."""
    v, low = x.max(-1, keepdims=True), x.min(-1, keepdims=True)
    s = (v - low) / np.maximum(v, 1e-12)
    scale = np.clip(s * factor, 0, 1) / np.maximum(s, 1e-12)
    return np.where(s > 0, v - (v - x) * scale, x)


def saturation_ycbcr(x, factor, rng):
    ycc = rgb_to_ycbcr(x)
    ycc[..., 1:] = np.clip(0.5 + (ycc[..., 1:] - 0.5) * factor, 0, 1)
    return ycbcr_to_rgb(ycc)


def oversharpen(x, amount, rng):
    """(1 + a) x - a blur(x), blur a 5 x 5 Gaussian (sigma 1.1, what a 5-tap kernel gets by default)."""
    return (1 + amount) * x - amount * gaussian(x, 1.1, radius=2)


def pixelate(x, scale, rng):
    img, (h, w) = to_pil(x), x.shape[:2]
    small = img.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.BOX)
    return from_pil(small.resize((w, h), Image.NEAREST))


def otsu_thresholds(values: Array, classes: int, bins: int = 30) -> Array:
    """Multi-level Otsu: the bin edges that split a `bins`-bin histogram into `classes` classes of the largest
    between-class variance, by dynamic programming over the bins (a class of n values of mean m adds n m^2)."""
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    s0, s1 = np.concatenate([[0], np.cumsum(counts)]), np.concatenate([[0], np.cumsum(counts * centres)])
    i, j = np.meshgrid(np.arange(bins + 1), np.arange(bins + 1), indexing="ij")  # a class = bins i .. j - 1
    n = s0[j] - s0[i]
    gain = np.where(j >= i, (s1[j] - s1[i]) ** 2 / np.maximum(n, 1), -np.inf)
    best, back = gain[0], []  # best[j]: the largest total over bins 0 .. j - 1 with the classes so far
    for _ in range(classes - 1):
        total = best[:, None] + gain
        back.append(total.argmax(0))
        best = total.max(0)
    cuts, end = [], bins
    for b in reversed(back):
        end = b[end]
        cuts.append(end)
    return edges[sorted({c for c in cuts if 0 < c < bins})]


def quantize_otsu(x, classes, rng):
    """Each channel cut at its multi-level Otsu thresholds; a class takes the mean of its values."""
    out = np.empty_like(x)
    for c in range(3):
        v = x[..., c]
        label = np.digitize(v, otsu_thresholds(v, classes))
        means = ndimage.mean(v, label, np.arange(label.max() + 1))
        out[..., c] = np.asarray(means, np.float32)[label]
    return out


def quantize_median_cut(x, colours, rng):
    """Each channel reduced to a median-cut palette of `colours` grey levels."""
    u8 = np.asarray(to_pil(x))
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(u8[..., c]), "L")
                         .quantize(colours, method=Image.Quantize.MEDIANCUT).convert("L")) for c in range(3)]
    return np.stack(planes, -1).astype(np.float32) / 255


def quantize_histogram(x, bins, rng):
    """The image's histogram (all channels) cut into `bins` bins of equal population; a value takes its bin's mean."""
    edges = np.quantile(x, np.arange(1, bins) / bins)
    label = np.digitize(x, edges)
    means = ndimage.mean(x, label, np.arange(bins))
    return np.asarray(means, np.float32)[label]


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: the table (group, function, parameter at levels 1..5) and the public API
# ---------------------------------------------------------------------------------------------------------------------

TABLE: dict[str, tuple[str, Callable, tuple]] = {
    "gaussian_blur": ("blur", gaussian_blur, (1, 2, 3, 4, 5)),
    "motion_blur": ("blur", motion_blur, ((5, 3), (10, 5), (15, 7), (15, 9), (20, 12))),  # (radius, sigma)
    "glass_blur": ("blur", glass_blur, ((0.7, 1, 1), (0.9, 2, 1), (1.2, 2, 2), (1.4, 3, 2), (1.6, 4, 2))),
    "lens_blur": ("blur", lens_blur, (2, 3, 4, 6, 8)),  # disk radius
    "zoom_blur": ("blur", zoom_blur, (1.03, 1.06, 1.10, 1.15, 1.21)),  # end of the zoom factors
    "jitter": ("blur", jitter, (1, 2, 3, 4, 5)),  # largest pixel shift
    "gaussian_noise": ("noise", gaussian_noise, (0.05, 0.10, 0.15, 0.20, 0.25)),
    "ycbcr_noise": ("noise", ycbcr_noise, ((0.05, 1), (0.06, 1.45), (0.07, 1.9), (0.08, 2.35), (0.09, 2.8))),
    "speckle_noise": ("noise", speckle_noise, (0.14, 0.21, 0.28, 0.35, 0.42)),
    "correlated_noise": ("noise", correlated_noise, (0.08, 0.11, 0.14, 0.18, 0.22)),
    "poisson_noise": ("noise", poisson_noise, (80, 60, 40, 25, 15)),
    "impulse_noise": ("noise", impulse_noise, (0.01, 0.03, 0.05, 0.07, 0.10)),
    "jpeg": ("compression", jpeg, (25, 18, 12, 8, 5)),  # quality
    "jpeg2000": ("compression", jpeg2000, (29, 27.5, 26, 24.5, 23)),  # target PSNR of the single layer, dB
    "brighten_hsv_shift": ("brighten", hsv_shift, (0.1, 0.2, 0.3, 0.4, 0.5)),
    "brighten_rgb_shift": ("brighten", rgb_shift, (0.1, 0.15, 0.2, 0.27, 0.35)),
    "brighten_hsv_gamma": ("brighten", hsv_gamma, (0.7, 0.58, 0.47, 0.36, 0.25)),
    "brighten_rgb_gamma": ("brighten", rgb_gamma, (0.8, 0.7, 0.6, 0.45, 0.3)),
    "darken_hsv_shift": ("darken", hsv_shift, (-0.1, -0.2, -0.3, -0.4, -0.5)),
    "darken_rgb_shift": ("darken", rgb_shift, (-0.1, -0.15, -0.2, -0.27, -0.35)),
    "darken_hsv_gamma": ("darken", hsv_gamma, (1.5, 1.8, 2.2, 2.7, 3.5)),
    "darken_rgb_gamma": ("darken", rgb_gamma, (1.4, 1.7, 2.1, 2.6, 3.2)),
    "contrast_up_scale": ("contrast_up", contrast_scale, (1.4, 1.7, 2.1, 2.6, 4.0)),
    "contrast_up_stretch": ("contrast_up", contrast_stretch, (2, 4, 6, 8, 10)),
    "contrast_down_scale": ("contrast_down", contrast_scale, (0.75, 0.6, 0.45, 0.3, 0.2)),
    "contrast_down_stretch": ("contrast_down", contrast_stretch, (1.0, 0.9, 0.8, 0.6, 0.4)),
    "saturation_up_hsv": ("saturation_up", saturation_hsv, (3, 6, 12, 20, 64)),
    "saturation_up_ycbcr": ("saturation_up", saturation_ycbcr, (2, 3, 5, 8, 16)),
    "saturation_down_hsv": ("saturation_down", saturation_hsv, (0.7, 0.55, 0.4, 0.2, 0.0)),
    "saturation_down_ycbcr": ("saturation_down", saturation_ycbcr, (0.6, 0.4, 0.2, 0.1, 0.0)),
    "oversharpen": ("oversharpen", oversharpen, (2, 2.8, 4, 6, 8)),  # amount
    "pixelate": ("pixelate", pixelate, (0.5, 0.4, 0.3, 0.25, 0.2)),  # size of the box-downscaled copy
    "quantize_otsu": ("quantization", quantize_otsu, (15, 11, 8, 5, 3)),  # classes per channel
    "quantize_median_cut": ("quantization", quantize_median_cut, (20, 15, 10, 6, 3)),  # grey levels per channel
    "quantize_histogram": ("quantization", quantize_histogram, (24, 16, 8, 6, 4)),  # levels
}
GROUPS: dict[str, list[str]] = {}
for _kind, (_group, _, _) in TABLE.items():
    GROUPS.setdefault(_group, []).append(_kind)
LEVELS = (1, 2, 3, 4, 5)


def apply(x: Array, kind: str, level: int, rng: np.random.Generator) -> Array:
    """One distortion on a float image (H x W x 3 in [0, 1]); the result is clipped to [0, 1]."""
    _, fn, params = TABLE[kind]
    return np.clip(fn(x, params[level - 1], rng), 0, 1).astype(np.float32)


DISTORTIONS: dict[str, Callable[[Array, int, np.random.Generator], Array]] = {
    kind: (lambda x, level, rng, kind=kind: apply(x, kind, level, rng)) for kind in TABLE}


def distort(image: Image.Image, kind: str, level: int, seed: int) -> Image.Image:
    """`image` with distortion `kind` at `level` (1..5): the same size and mode, the same pixels for the same seed.
    An alpha channel is kept as it is; the distortion acts on the colour."""
    if kind not in TABLE:
        raise ValueError(f"unknown distortion {kind!r}; expected one of {', '.join(TABLE)}")
    if level not in LEVELS:
        raise ValueError(f"distortion level must be one of {LEVELS}, got {level!r}")
    out = to_pil(apply(from_pil(image), kind, level, np.random.default_rng(seed)))
    if "A" in image.getbands():
        out.putalpha(image.getchannel("A"))
    return out if out.mode == image.mode else out.convert(image.mode)


def draw(rng: np.random.Generator, by: str = "type") -> tuple[str, int]:
    """A random (kind, level). by="type": uniform over the 35 types; by="group": a group uniform over the 12, then a
    type uniform within it (DepictQA's order). The level is uniform over 1..5 either way."""
    if by == "type":
        kind = list(TABLE)[rng.integers(len(TABLE))]
    elif by == "group":
        members = GROUPS[list(GROUPS)[rng.integers(len(GROUPS))]]
        kind = members[rng.integers(len(members))]
    else:
        raise ValueError(f"draw by 'type' or 'group', got {by!r}")
    return kind, int(rng.integers(1, 6))
