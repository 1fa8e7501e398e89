"""The synthetic distortions of the training pool: 35 types in 12 groups, 5 severity levels each.

The set, each type's definition and its per-level parameters follow the DepictQA distortion library
(XPixelGroup/DepictQA, build_datasets/x_distortion/, with the scikit-image 0.21 it pins for multi-level Otsu),
written anew with Pillow + numpy + scipy. make_pool.py applies them to every pool image; the type and level of a
variant go into the pool manifest only to pair versions of one reference and to report: no stage reads them, a
variant is voted on like any other image.

    from distortions import distort, draw
    kind, level = draw(np.random.default_rng(0))         # uniform over the 35 types, level uniform in 1..5
    variant = distort(Image.open("x.png"), kind, level, seed=123)   # same size and mode; same pixels for a seed

Inside, an image is an H x W x 3 float32 array in [0, 1]; each function maps (array, its level's parameter, rng) to
an array, clipped to [0, 1] on the way out. Colour spaces: HSV as in colorsys (computed without the round trip: with
hue and saturation fixed RGB scales with the value V; with hue and V fixed V - RGB scales with the saturation S),
YCbCr as in JPEG (BT.601, full range, chroma centred on 0.5). Results are rounded to 8 bits; DepictQA truncates the
types it computes in floating point (a cast to uint8), which leaves its variants half a grey level darker on average.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance
from scipy import ndimage, signal, special

Array = np.ndarray
# The definitions' version: make_pool.py records it, so a pool is never extended with variants of other definitions
# (the table's parameters alone would not tell). Bump it whenever a function's output changes.
VERSION = 2


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


def shuffle_pixels(x: Array, shift: int, passes: int, rng: np.random.Generator) -> Array:
    """DepictQA's local pixel shuffle (helper.py, shuffle_pixels_njit): `passes` passes, each over the pixels with
    at least shift + 1 rows and columns above and left of them and at least shift - 1 below and right, bottom row
    first and right to left within a row; each such pixel takes, in place, the pixel (dy, dx) away, dy and dx drawn
    uniformly from -shift .. shift - 1 (numpy's randint leaves out the upper bound). The swap in that code only
    copies: both sides are views of the image, so its second assignment writes back what the first put there.
    A pass draws its offsets as rng.integers(-shift, shift, (2, rows, columns), np.int16), dy first."""
    h, w = x.shape[:2]
    for _ in range(passes):
        dy, dx = rng.integers(-shift, shift, (2, max(h - 2 * shift, 0), max(w - 2 * shift, 0)), np.int16)
        x = shuffle_pass(x, dy, dx, shift)
    return x


def shuffle_pass(x: Array, dy: Array, dx: Array, shift: int) -> Array:
    """One in-place pass of `shuffle_pixels`, all pixels at once; dy[i, j] and dx[i, j] are the offsets of the pixel
    shift + 1 + i rows and shift + 1 + j columns in. A pixel whose source was already written in this pass (the
    source lies in the shuffled region and comes later in row-major order: below, or to the right on the same row)
    takes that source's new value, itself a copy; following these links from a pixel ends at one whose source still
    holds its value from before the pass, and that value is the pixel's."""
    h, w, rows, cols = *x.shape[:2], *dy.shape
    if dy.size == 0:
        return x
    index = np.int32 if h * w < 2 ** 31 else np.intp
    i, j = np.arange(rows, dtype=index)[:, None], np.arange(cols, dtype=index)[None, :]
    down, right = i + dy, j + dx  # the source's place in the region (may lie outside it)
    written = ((dy > 0) | ((dy == 0) & (dx > 0))) & (down < rows) & (right >= 0) & (right < cols)
    written = written.ravel()
    link = np.where(written, (down * cols + right).ravel(), np.arange(rows * cols, dtype=index))
    pending = np.flatnonzero(written)
    while pending.size:  # pointer doubling; chains are short (a link is taken with probability < 1/2)
        link[pending] = link[link[pending]]
        pending = pending[written[link[pending]]]
    source = ((down + shift + 1) * w + right + shift + 1).ravel()[link]
    out = x.copy()
    out[shift + 1:h - shift + 1, shift + 1:w - shift + 1] = np.take(x.reshape(h * w, -1), source, 0).reshape(
        rows, cols, -1)
    return out


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
    """A one-sided streak of 2 * radius + 1 taps at an angle a drawn in [-90, 90) degrees: tap t reads the pixel
    ceil(t sin a - 1/2) rows and ceil(t cos a - 1/2) columns away (edges repeated), weights a half Gaussian of
    `sigma` taps, normalised (DepictQA's helper.py, motion_blur with shift_img)."""
    radius, sigma = p
    angle, n = np.deg2rad(rng.uniform(-90, 90)), 2 * radius
    kernel = np.zeros((2 * n + 1, 2 * n + 1), np.float32)
    for t in range(n + 1):
        dy, dx = int(np.ceil(t * np.sin(angle) - 0.5)), int(np.ceil(t * np.cos(angle) - 0.5))
        kernel[n - dy, n - dx] += np.exp(-t ** 2 / (2 * sigma ** 2))  # convolving flips the kernel back
    return convolve(x, kernel / kernel.sum())


def glass_blur(x, p, rng):
    sigma, shift, passes = p
    return gaussian(shuffle_pixels(gaussian(x, sigma), shift, passes, rng), sigma)


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
    return shuffle_pixels(x, shift, 1, rng)


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
    """x with its HSV value (max of R, G, B) replaced, hue and saturation kept: RGB scales with V, and a black pixel
    (no hue, no saturation) becomes the grey `value`. V is not capped: a V above 1 saturates the channels that pass
    1 when `apply` clips them (highlights wash out to white), as OpenCV's HSV-to-RGB conversion and DepictQA's clip
    do; a V below 0 gives black."""
    v = x.max(-1, keepdims=True)
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
    """1 / (1 + (mean / (x + 1e-12))^f) per channel: f > 1 steepens the curve around the channel mean, f < 1
    flattens it; a constant channel becomes 1/2. An all-black channel (mean 0) has no curve and stays black."""
    mean = x.mean((0, 1), keepdims=True)
    log_mean = np.log(np.where(mean > 0, mean, 1))
    stretched = special.expit(f * (np.log(x + 1e-12) - log_mean))  # the same curve, without overflow
    return np.where(mean > 0, stretched, x)


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
    """Multi-level Otsu as scikit-image 0.21's threshold_multiotsu computes it (DepictQA's call): a class is a run of
    bins of a `bins`-bin histogram over [min, max]; the classes maximise the sum over classes of S^2 / P (P: the
    class's share of the values, S: the sum of share x bin index, counting bin 0 at index 1 and scoring a class of
    bin 0 alone 0, as that code does), ties going to the lexicographically first thresholds; each threshold is the
    centre of a class's last bin. With no more occupied bins than classes, each occupied bin is a class (there
    scikit-image refuses fewer). The search is a dynamic programme over the bins, not scikit-image's enumeration."""
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    p = counts / counts.sum()
    if np.count_nonzero(p) <= classes:
        return centres[np.flatnonzero(p)[:-1]]
    share, moment = np.cumsum(p), np.cumsum(np.arange(bins) * p) + p[0]
    share0, moment0 = np.concatenate([[0], share[:-1]]), np.concatenate([[0], moment[:-1]])  # before bin a
    a, b = np.meshgrid(np.arange(bins), np.arange(bins), indexing="ij")  # a class = bins a .. b
    mass, first = share[b] - share0[a], moment[b] - moment0[a]
    score = np.where(mass > 0, first ** 2 / np.where(mass > 0, mass, 1), 0.0)
    score[b < a], score[0, 0] = -np.inf, 0.0
    best = [score[:, -1]]  # best[k - 1][a]: the largest total splitting bins a .. end into k classes
    for _ in range(classes - 1):
        best.append(np.max(score + np.append(best[-1][1:], -np.inf)[None, :], axis=1))
    cuts, a = [], 0
    for k in range(classes - 1, 0, -1):  # the first last-bin that still reaches the best total, class by class
        total = score[a] + np.append(best[k - 1][1:], -np.inf)
        a = int(np.flatnonzero(total == best[k][a])[0])
        cuts.append(a)
        a += 1
    return centres[cuts]


def quantize_otsu(x, classes, rng):
    """Each channel's 8-bit values cut at their multi-level Otsu thresholds (a value on a threshold goes up); class
    k = 0, 1, .. takes v_min + k (v_max - v_min) / classes (DepictQA's quantization_otsu), so the top class stays
    below v_max. Not monotone in the level: fewer classes can land closer to the original values."""
    out = np.empty_like(x)
    for c in range(3):
        v = np.round(x[..., c] * 255)
        label = np.digitize(v, otsu_thresholds(v, classes))
        low, high = v.min(), v.max()
        out[..., c] = (low + label * (high - low) / classes) / 255
    return out


def quantize_median_cut(x, colours, rng):
    """Each channel reduced to a median-cut palette of `colours` grey levels."""
    u8 = np.asarray(to_pil(x))
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(u8[..., c]), "L")
                         .quantize(colours, method=Image.Quantize.MEDIANCUT).convert("L")) for c in range(3)]
    return np.stack(planes, -1).astype(np.float32) / 255


def quantize_histogram(x, levels, rng):
    """Posterisation and histogram equalisation at once (DepictQA's quantization_hist): the 8-bit values u of all
    channels go to `levels` uniform levels k = round(u (levels - 1) / 255), and level k to
    floor(255 (C_k - C_min) / (N - C_min)) / 255, C the cumulative counts of a `levels`-bin histogram of u over
    [0, 255], C_min its first non-zero entry, N the number of values (0 where C_k = 0). Not monotone in the level.
    With every value in one bin the equalisation is 0 / 0 (DepictQA's masked arrays make it black): kept as it is."""
    u = np.round(x.astype(np.float64) * 255)
    cdf = np.cumsum(np.histogram(u, bins=levels, range=(0, 255))[0])
    low, n = cdf[cdf > 0][0], cdf[-1]
    if n == low:
        return x
    lut = np.where(cdf > 0, (cdf - low) * 255 // (n - low), 0)
    return (lut[np.round(u / 255 * (levels - 1)).astype(np.intp)] / 255).astype(np.float32)


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


def draw(rng: np.random.Generator, by: str = "type", kinds: list[str] | None = None) -> tuple[str, int]:
    """A random (kind, level). by="type": uniform over the 35 types; by="group": a group uniform over the 12, then a
    type uniform within it (DepictQA's order). The level is uniform over 1..5 either way. `kinds`: draw among these
    types only (by="group": among the groups that hold one of them, then among its listed types)."""
    kinds = list(TABLE) if kinds is None else [kind for kind in TABLE if kind in kinds]
    groups = {group: [kind for kind in members if kind in kinds] for group, members in GROUPS.items()}
    groups = {group: members for group, members in groups.items() if members}
    if by == "type":
        kind = kinds[rng.integers(len(kinds))]
    elif by == "group":
        members = groups[list(groups)[rng.integers(len(groups))]]
        kind = members[rng.integers(len(members))]
    else:
        raise ValueError(f"draw by 'type' or 'group', got {by!r}")
    return kind, int(rng.integers(1, 6))
