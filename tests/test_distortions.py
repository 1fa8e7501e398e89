"""distortions.py: every type keeps size and mode, is deterministic for a seed, grows with the level on
natural-looking images (but the two quantisers DepictQA defines that way) and does what its definition says to a
constant image; the definitions that are easy to get subtly wrong (HSV value shift, the in-place pixel shuffle,
motion blur's direction, multi-level Otsu, histogram quantisation) against plain loops or direct formulas."""

import colorsys
import itertools
import warnings
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

import distortions as D

KINDS = list(D.TABLE)


def natural_image(size: int = 96, seed: int = 0) -> Image.Image:
    """A small landscape: a sky gradient fading to near-white (every saturation from .47 down to ~0), textured
    grey ground under a wavy horizon, a sun and a house with hard edges, a thin white line."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    t = np.clip(yy / 0.6, 0, 1)[..., None]
    x = (1 - t) * np.array([0.45, 0.6, 0.85]) + t * np.array([0.9, 0.9, 0.905])
    grain = ndimage.gaussian_filter(rng.normal(0, 1, (size, size, 3)), (1.2, 1.2, 0))
    ground = (yy > 0.55 + 0.08 * np.sin(6 * xx))[..., None]
    earth = np.array([0.42, 0.40, 0.36]) + 0.1 * xx[..., None] + 0.15 * grain[..., :1] + 0.01 * grain
    img = Image.fromarray((np.clip(np.where(ground, earth, x), 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.ellipse([size * .6, size * .1, size * .8, size * .3], fill=(250, 220, 90))
    draw.rectangle([size * .15, size * .35, size * .35, size * .7], fill=(150, 60, 50), outline=(30, 20, 20))
    draw.line([0, size * .9, size, size * .8], fill=(240, 240, 240), width=2)
    return img


def mean_abs_error(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() / 255)


def test_the_table_has_35_types_in_12_groups_with_5_levels():
    assert len(D.TABLE) == 35 and len(D.GROUPS) == 12 and set(D.DISTORTIONS) == set(D.TABLE)
    assert [len(D.GROUPS[g]) for g in D.GROUPS] == [6, 6, 2, 4, 4, 2, 2, 2, 2, 1, 1, 3]
    assert all(len(params) == 5 for _, _, params in D.TABLE.values())


@pytest.mark.parametrize("kind", KINDS)
def test_size_and_mode_kept_and_deterministic(kind):
    rgb = natural_image(64).resize((72, 56))  # not square: catches a swapped height and width
    for mode in ("RGB", "L", "RGBA"):
        img = rgb.convert(mode)
        if mode == "RGBA":
            img.putalpha(Image.linear_gradient("L").resize(img.size))
        out = D.distort(img, kind, 3, seed=7)
        assert out.size == img.size and out.mode == img.mode
        assert np.array_equal(np.asarray(out), np.asarray(D.distort(img, kind, 3, seed=7)))
        if mode == "RGBA":
            assert np.array_equal(np.asarray(out)[..., 3], np.asarray(img)[..., 3])


NOT_MONOTONE = ("quantize_otsu", "quantize_histogram")  # DepictQA's definitions; the paper's pool had them so


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_distortion_grows_with_the_level(kind, seed):
    ref = natural_image(96, seed)
    errors = [mean_abs_error(D.distort(ref, kind, level, seed), ref) for level in D.LEVELS]
    assert errors[0] > 0.002, errors  # level 1 already changes the image visibly
    grows = all(a < b for a, b in zip(errors, errors[1:]))
    # Otsu's classes map to v_min + k (v_max - v_min) / n, off the class means, and histogram quantisation
    # equalises as well as posterises: fewer classes or levels can land closer to the original.
    assert grows or kind in NOT_MONOTONE, errors


def test_otsu_and_histogram_quantisation_are_not_monotone_in_the_level():
    for kind, seed in (("quantize_otsu", 1), ("quantize_histogram", 0)):
        ref = natural_image(96, seed)
        errors = [mean_abs_error(D.distort(ref, kind, level, seed), ref) for level in D.LEVELS]
        assert any(a > b for a, b in zip(errors, errors[1:])), (kind, errors)


def test_random_types_depend_on_the_seed_and_the_others_do_not():
    img = natural_image(64)
    random_kinds = {"motion_blur", "glass_blur", "jitter", "gaussian_noise", "ycbcr_noise", "speckle_noise",
                    "correlated_noise", "poisson_noise", "impulse_noise"}
    for kind in KINDS:
        same = np.array_equal(np.asarray(D.distort(img, kind, 2, 0)), np.asarray(D.distort(img, kind, 2, 1)))
        assert same == (kind not in random_kinds), kind


def test_bad_kind_or_level_is_refused():
    with pytest.raises(ValueError, match="unknown distortion"):
        D.distort(natural_image(32), "blurr", 1, 0)
    with pytest.raises(ValueError, match="level"):
        D.distort(natural_image(32), "jpeg", 6, 0)


def hsv_reference(x: np.ndarray, change) -> np.ndarray:
    """Per pixel: to HSV, change, saturation clipped to [0, 1], V left as it is, back to RGB, each channel clipped."""
    out = []
    for pixel in x.reshape(-1, 3):
        h, s, v = change(*colorsys.rgb_to_hsv(*pixel))
        out.append(np.clip(colorsys.hsv_to_rgb(h, min(max(s, 0), 1), v), 0, 1))
    return np.array(out).reshape(x.shape)


@pytest.mark.parametrize("fn, p, change", [
    (D.hsv_shift, 0.3, lambda h, s, v: (h, s, v + 0.3)), (D.hsv_shift, -0.4, lambda h, s, v: (h, s, v - 0.4)),
    (D.hsv_gamma, 2.2, lambda h, s, v: (h, s, v ** 2.2)), (D.hsv_gamma, 0.47, lambda h, s, v: (h, s, v ** 0.47)),
    (D.saturation_hsv, 6, lambda h, s, v: (h, s * 6, v)), (D.saturation_hsv, 0.4, lambda h, s, v: (h, s * 0.4, v)),
])
def test_hsv_changes_match_colorsys(fn, p, change):
    x = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    x[0, 0], x[0, 1], x[0, 2] = 0, 0.5, (0.2, 0.2, 0.9)  # black, grey, one channel alone at the max
    x[0, 3] = (0.9, 0.45, 0.1)  # a highlight: + 0.3 pushes V to 1.2, red clips, green and blue still scale
    assert np.abs(np.clip(fn(x, p, None), 0, 1) - hsv_reference(x, change)).max() < 1e-5


def test_brighten_hsv_shift_washes_highlights_out():
    x = np.array([[[0.9, 0.45, 0.1], [0, 0, 0]]], np.float32)
    out = D.apply(x, "brighten_hsv_shift", 5, None)  # V + 0.5: every channel times 1.4 / 0.9, then clipped
    assert np.allclose(out, [[[1, 0.7, 0.1 * 1.4 / 0.9], [0.5, 0.5, 0.5]]], atol=1e-6)


def test_ycbcr_is_the_jpeg_transform():
    x = np.random.default_rng(1).random((6, 6, 3)).astype(np.float32)
    ycc = np.asarray(Image.fromarray((x * 255).round().astype(np.uint8)).convert("YCbCr"), np.float32) / 255
    assert np.abs(D.rgb_to_ycbcr((x * 255).round() / 255) - ycc).max() < 1.5 / 255  # PIL rounds to 8 bits
    assert np.abs(D.ycbcr_to_rgb(D.rgb_to_ycbcr(x)) - x).max() < 1e-5


def multiotsu_brute_force(values: np.ndarray, classes: int, bins: int = 30) -> np.ndarray:
    """scikit-image 0.21's threshold_multiotsu written out: every set of class-ending bins in lexicographic order,
    the first strictly best total of S^2 / P kept (bin 0 counted at index 1, a class of bin 0 alone scoring 0);
    thresholds at those bins' centres; with no more occupied bins than classes, each occupied bin a class."""
    counts, edges = np.histogram(values, bins=bins)
    centres, p = (edges[:-1] + edges[1:]) / 2, counts / counts.sum()
    if np.count_nonzero(p) <= classes:
        return centres[np.flatnonzero(p)[:-1]]
    index = np.arange(bins, dtype=float)
    index[0] = 1

    def score(a, b):  # the class of bins a .. b
        mass = p[a:b + 1].sum()
        return 0.0 if (a, b) == (0, 0) or mass == 0 else (p[a:b + 1] * index[a:b + 1]).sum() ** 2 / mass

    best, best_cuts = 0.0, None
    for cuts in itertools.combinations(range(bins - 1), classes - 1):
        bounds = [-1, *cuts, bins - 1]
        total = sum(score(a + 1, b) for a, b in zip(bounds, bounds[1:]))
        if total > best + 1e-12:
            best, best_cuts = total, cuts
    return centres[list(best_cuts)]


def eight_bit_mixture(rng: np.random.Generator, n: int = 3000) -> np.ndarray:
    values = np.concatenate([rng.normal(60, 15, n // 2), rng.normal(150, 20, n // 3), rng.normal(230, 6, n // 6)])
    return np.clip(np.round(values), 0, 255).astype(np.float32)


@pytest.mark.parametrize("classes", [2, 3, 4, 5])
def test_otsu_thresholds_match_scikit_images_search(classes):
    rng = np.random.default_rng(classes)
    mixture = eight_bit_mixture(rng)
    sparse = rng.choice(np.float32([10, 11, 50, 52, 53, 120, 200, 240]), 500)  # empty bins: exact ties
    few = np.float32([30, 30, 90, 200, 200])  # at most as many occupied bins as classes
    for values in (mixture, sparse, few):
        assert np.array_equal(D.otsu_thresholds(values, classes), multiotsu_brute_force(values, classes))


@pytest.mark.parametrize("classes", [3, 4])
def test_quantize_otsu_maps_class_k_to_vmin_plus_k_range_over_n(classes):
    rng = np.random.default_rng(10 + classes)
    x = np.stack([eight_bit_mixture(rng, 600).reshape(20, 30) for _ in range(3)], -1) / 255
    out = D.quantize_otsu(x, classes, None)
    for c in range(3):
        v = np.round(x[..., c] * 255)
        thresholds = multiotsu_brute_force(v, classes)
        for value, got in zip(v.ravel(), out[..., c].ravel()):
            k = sum(value >= t for t in thresholds)
            assert got == pytest.approx((v.min() + k * (v.max() - v.min()) / classes) / 255, abs=1e-6)


def histogram_quantisation_loop(x: np.ndarray, levels: int) -> np.ndarray:
    """DepictQA's quantization_hist value by value, in 8-bit units; an image in one bin is kept."""
    u = np.round(x * 255).astype(int).ravel()
    counts = Counter(min(value * levels // 255, levels - 1) for value in u)  # bins of width 255 / levels
    cdf = list(itertools.accumulate(counts.get(k, 0) for k in range(levels)))
    low = min(c for c in cdf if c > 0)
    if low == len(u):
        return u.reshape(x.shape)
    return np.array([0 if cdf[k] == 0 else (cdf[k] - low) * 255 // (len(u) - low)
                     for k in (int(np.round(value / 255 * (levels - 1))) for value in u)]).reshape(x.shape)


@pytest.mark.parametrize("levels", [24, 16, 8, 6, 4])
def test_quantize_histogram_is_posterisation_through_the_equalising_cdf(levels):
    natural = np.asarray(natural_image(40), np.float32) / 255
    sparse = np.float32([170, 200, 255])[np.random.default_rng(0).integers(0, 3, (10, 12, 3))] / 255
    for x in (natural, sparse):  # sparse: at 6 levels 170 -> level 3, a bin below the first occupied one -> 0
        out = D.quantize_histogram(x, levels, None)
        assert np.array_equal(np.round(out * 255), histogram_quantisation_loop(x, levels))


def shuffle_loop(x: np.ndarray, shift: int, passes: int, rng: np.random.Generator) -> np.ndarray:
    """DepictQA's shuffle as a plain loop: bottom row first, right to left, each pixel in place taking the current
    pixel (dy, dx) away; the same offsets as distortions.shuffle_pixels draws."""
    x, (h, w) = x.copy(), x.shape[:2]
    for _ in range(passes):
        dy, dx = rng.integers(-shift, shift, (2, max(h - 2 * shift, 0), max(w - 2 * shift, 0)), np.int16)
        for row in range(h - shift, shift, -1):
            for col in range(w - shift, shift, -1):
                i, j = row - shift - 1, col - shift - 1
                x[row, col] = x[row + dy[i, j], col + dx[i, j]]
    return x


@pytest.mark.parametrize("shift, passes", [(1, 1), (2, 1), (3, 2), (4, 1), (5, 2)])
def test_pixel_shuffle_equals_the_in_place_loop(shift, passes):
    x = np.random.default_rng(shift).random((17, 23, 3)).astype(np.float32)
    out = D.shuffle_pixels(x, shift, passes, np.random.default_rng(7))
    assert np.array_equal(out, shuffle_loop(x, shift, passes, np.random.default_rng(7)))
    # the border DepictQA leaves: shift + 1 rows and columns at the top and left, shift - 1 at the bottom and right
    inner = np.zeros(x.shape[:2], bool)
    inner[shift + 1:17 - shift + 1, shift + 1:23 - shift + 1] = True
    assert np.array_equal(out[~inner], x[~inner]) and not np.array_equal(out[inner], x[inner])
    if shift > 1:  # chains occur: reading every source from the original instead gives another image
        dy, dx = np.random.default_rng(7).integers(-shift, shift, (2, 17 - 2 * shift, 23 - 2 * shift), np.int16)
        i, j = np.mgrid[shift + 1:17 - shift + 1, shift + 1:23 - shift + 1]
        independent = x.copy()
        independent[i, j] = x[i + dy, j + dx]
        assert passes > 1 or not np.array_equal(out, independent)


def test_jitter_and_glass_blur_are_the_shuffle_with_depictqas_parameters():
    x = np.asarray(natural_image(32), np.float32) / 255
    for level, shift in enumerate((1, 2, 3, 4, 5), 1):
        out = D.apply(x, "jitter", level, np.random.default_rng(level))
        assert np.array_equal(out, shuffle_loop(x, shift, 1, np.random.default_rng(level)))
    glass = [(0.7, 1, 1), (0.9, 2, 1), (1.2, 2, 2), (1.4, 3, 2), (1.6, 4, 2)]  # (sigma, shift, passes)
    for level, (sigma, shift, passes) in enumerate(glass, 1):
        blurred = ndimage.gaussian_filter(x, (sigma, sigma, 0), mode="nearest")
        shuffled = shuffle_loop(blurred, shift, passes, np.random.default_rng(level))
        expected = ndimage.gaussian_filter(shuffled, (sigma, sigma, 0), mode="nearest")
        assert np.allclose(D.apply(x, "glass_blur", level, np.random.default_rng(level)), expected, atol=1e-6)


@pytest.mark.parametrize("level", [1, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_motion_blur_is_the_sum_of_shifted_copies(level, seed):
    (radius, sigma), x = D.TABLE["motion_blur"][2][level - 1], np.random.default_rng(seed).random((30, 50, 3))
    angle = np.deg2rad(np.random.default_rng(seed).uniform(-90, 90))  # the function's first draw
    taps = np.arange(2 * radius + 1)
    weights = np.exp(-taps ** 2 / (2 * sigma ** 2)) / np.exp(-taps ** 2 / (2 * sigma ** 2)).sum()
    rows, cols = np.arange(30)[:, None], np.arange(50)[None, :]
    expected = np.zeros_like(x)
    for t, weight in zip(taps, weights):  # tap t reads ceil(t sin a - 1/2) rows, ceil(t cos a - 1/2) columns away
        dy, dx = np.ceil(t * np.sin(angle) - 0.5), np.ceil(t * np.cos(angle) - 0.5)
        expected += weight * x[np.clip(rows + int(dy), 0, 29), np.clip(cols + int(dx), 0, 49)]
    out = D.motion_blur(x.astype(np.float32), (radius, sigma), np.random.default_rng(seed))
    assert np.abs(out - expected).max() < 1e-5


def test_draw_by_type_and_by_group():
    rng = np.random.default_rng(0)
    by_type = Counter(D.draw(rng)[0] for _ in range(35_000))
    assert set(by_type) == set(D.TABLE) and max(by_type.values()) < 1200 and min(by_type.values()) > 800
    group_of = {kind: group for group, kinds in D.GROUPS.items() for kind in kinds}
    by_group = Counter(group_of[D.draw(rng, by="group")[0]] for _ in range(12_000))
    assert set(by_group) == set(D.GROUPS) and max(by_group.values()) < 1150 and min(by_group.values()) > 850
    levels = Counter(D.draw(rng)[1] for _ in range(5_000))
    assert set(levels) == set(D.LEVELS) and min(levels.values()) > 850


def test_draw_among_chosen_types():
    chosen = ["gaussian_blur", "lens_blur", "jpeg"]
    rng = np.random.default_rng(0)
    by_type = Counter(D.draw(rng, kinds=chosen)[0] for _ in range(3_000))
    assert set(by_type) == set(chosen) and min(by_type.values()) > 900
    by_group = Counter(D.draw(rng, by="group", kinds=chosen)[0] for _ in range(4_000))
    assert set(by_group) == set(chosen) and 1850 < by_group["jpeg"] < 2150  # the group first: compression is half
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert [D.draw(a, "group", None) for _ in range(50)] == [D.draw(b, "group") for _ in range(50)]


def test_contrast_stretch_is_the_logistic_curve_around_the_channel_mean():
    x = np.random.default_rng(2).uniform(0.05, 1, (8, 8, 3)).astype(np.float32)
    x[0, 0] = 0
    x[..., 2] = 0  # an all-black channel stays black
    mean = x.mean((0, 1), keepdims=True)
    for f in (0.4, 1.0, 10.0):
        expected = 1 / (1 + (mean[..., :2] / (x[..., :2].astype(np.float64) + 1e-12)) ** f)
        out = D.contrast_stretch(x, f, None)
        assert np.allclose(out[..., :2], expected, atol=1e-6) and not out[..., 2].any()


# ---------------------------------------------------------------------------------------------------------------------
# a constant image: each type keeps it constant or changes it as its definition says
# ---------------------------------------------------------------------------------------------------------------------

CONSTANTS = {"black": (0, 0, 0), "white": (255, 255, 255), "grey": (128, 128, 128), "colour": (204, 77, 26)}


def hsv_change(c, change):
    h, s, v = change(*colorsys.rgb_to_hsv(*c))
    return np.clip(colorsys.hsv_to_rgb(h, min(max(s, 0), 1), v), 0, 1)


def ycbcr_chroma_scaled(c, factor):
    y = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    cb, cr = (np.clip(0.5 + factor * (d / k), 0, 1) for d, k in ((c[2] - y, 1.772), (c[0] - y, 1.402)))
    r, b = y + 1.402 * (cr - 0.5), y + 1.772 * (cb - 0.5)
    return np.clip([r, (y - 0.299 * r - 0.114 * b) / 0.587, b], 0, 1)


def pil_contrast(c, factor):  # Pillow blends with the mean luma (ITU-R 601-2), rounded to 8 bits
    luma = np.round(255 * (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])) / 255
    return np.clip(luma + factor * (np.asarray(c) - luma), 0, 1)


KEEPS = ("blur", "oversharpen", "pixelate")  # groups whose filters average or copy pixels
VALUE_ON_CONSTANT = {  # kind -> (colour in [0, 1], level's parameter) -> the constant colour it must give
    "brighten_hsv_shift": lambda c, p: hsv_change(c, lambda h, s, v: (h, s, v + p)),
    "darken_hsv_shift": lambda c, p: hsv_change(c, lambda h, s, v: (h, s, v + p)),
    "brighten_hsv_gamma": lambda c, p: hsv_change(c, lambda h, s, v: (h, s, v ** p)),
    "darken_hsv_gamma": lambda c, p: hsv_change(c, lambda h, s, v: (h, s, v ** p)),
    "brighten_rgb_shift": lambda c, p: np.clip(np.asarray(c) + p, 0, 1),
    "darken_rgb_shift": lambda c, p: np.clip(np.asarray(c) + p, 0, 1),
    "brighten_rgb_gamma": lambda c, p: np.asarray(c) ** p,
    "darken_rgb_gamma": lambda c, p: np.asarray(c) ** p,
    "contrast_up_scale": pil_contrast,
    "contrast_down_scale": pil_contrast,
    "contrast_up_stretch": lambda c, p: np.where(np.asarray(c) > 0, 0.5, 0.0),  # the mean maps to 1/2; black stays
    "contrast_down_stretch": lambda c, p: np.where(np.asarray(c) > 0, 0.5, 0.0),
    "saturation_up_hsv": lambda c, p: hsv_change(c, lambda h, s, v: (h, s * p, v)),
    "saturation_down_hsv": lambda c, p: hsv_change(c, lambda h, s, v: (h, s * p, v)),
    "saturation_up_ycbcr": ycbcr_chroma_scaled,
    "saturation_down_ycbcr": ycbcr_chroma_scaled,
    "quantize_otsu": lambda c, p: np.asarray(c),  # one class per channel: v_min
    "quantize_median_cut": lambda c, p: np.asarray(c),  # a palette of one grey per channel
    "quantize_histogram": lambda c, p: histogram_quantisation_loop(np.float32(c)[None, None], p)[0, 0] / 255,
}
TOLERANCE = {"contrast_up_scale": 1.5 / 255, "contrast_down_scale": 1.5 / 255, "contrast_up_stretch": 1 / 255,
             "contrast_down_stretch": 1 / 255}
FIXED_UNDER_NOISE = {("speckle_noise", "black"), ("poisson_noise", "black")}  # x (1 + n) and Poisson(0) are 0


@pytest.mark.parametrize("kind", KINDS)
def test_a_constant_image_stays_constant_or_changes_as_the_type_says(kind):
    group, _, params = D.TABLE[kind]
    for (name, colour), level in itertools.product(CONSTANTS.items(), D.LEVELS):
        c = np.float32(colour) / 255
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a division by zero or a log of 0 on the way counts as a failure
            out = D.apply(np.broadcast_to(c, (40, 48, 3)).copy(), kind, level, np.random.default_rng(level))
        assert np.isfinite(out).all(), (kind, name, level)
        spread = (out.max((0, 1)) - out.min((0, 1))).max()
        where = (kind, name, level, out[0, 0] * 255)
        if group == "noise" and (kind, name) not in FIXED_UNDER_NOISE:
            changed = np.abs(out - c).reshape(-1, 3) > 0.5 / 255
            assert np.abs(np.median(out.reshape(-1, 3), 0) - c).max() < 0.05, where  # noise around the colour
            if kind == "impulse_noise":  # a fraction `amount` set to 0 or 1: half of it is invisible on 0 or 1
                expected = params[level - 1] * np.where((c == 0) | (c == 1), 0.5, 1)
                assert np.all(np.abs(changed.mean(0) - expected) < 0.5 * expected), (where, changed.mean(0))
            else:
                assert changed.mean() > 0.25, (where, changed.mean())
            continue
        assert spread < 0.5 / 255, where  # constant
        if group in KEEPS or kind in {kind for kind, _ in FIXED_UNDER_NOISE}:
            assert np.abs(out[0, 0] - c).max() < 0.5 / 255, where
        elif kind == "jpeg":  # the flat blocks keep only their DC terms, quantised in steps up to 170 at quality 5
            assert np.abs(out[0, 0] - c).max() < 32 / 255, where
        elif kind == "jpeg2000":  # greys are kept; openjpeg's rate allocation moves a flat colour's chroma
            assert np.abs(out[0, 0] - c).max() < (0.5 / 255 if len(set(colour)) == 1 else 64 / 255), where
        else:
            expected = VALUE_ON_CONSTANT[kind](c.astype(np.float64), params[level - 1])
            assert np.abs(out[0, 0] - expected).max() < TOLERANCE.get(kind, 0.51 / 255), (where, expected * 255)
