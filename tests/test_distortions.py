"""distortions.py: every type keeps size and mode, is deterministic for a seed and grows with the level on
natural-looking images; the colour transforms and the multi-level Otsu search against independent computations."""

import colorsys
import itertools
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


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_distortion_grows_with_the_level(kind, seed):
    ref = natural_image(96, seed)
    errors = [mean_abs_error(D.distort(ref, kind, level, seed), ref) for level in D.LEVELS]
    assert errors[0] > 0.002, errors  # level 1 already changes the image visibly
    assert all(a < b for a, b in zip(errors, errors[1:])), errors


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
    out = []
    for pixel in x.reshape(-1, 3):
        h, s, v = change(*colorsys.rgb_to_hsv(*pixel))
        out.append(colorsys.hsv_to_rgb(h, min(max(s, 0), 1), min(max(v, 0), 1)))
    return np.array(out).reshape(x.shape)


@pytest.mark.parametrize("fn, p, change", [
    (D.hsv_shift, 0.3, lambda h, s, v: (h, s, v + 0.3)), (D.hsv_shift, -0.4, lambda h, s, v: (h, s, v - 0.4)),
    (D.hsv_gamma, 2.2, lambda h, s, v: (h, s, v ** 2.2)), (D.hsv_gamma, 0.47, lambda h, s, v: (h, s, v ** 0.47)),
    (D.saturation_hsv, 6, lambda h, s, v: (h, s * 6, v)), (D.saturation_hsv, 0.4, lambda h, s, v: (h, s * 0.4, v)),
])
def test_hsv_changes_match_colorsys(fn, p, change):
    x = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    x[0, 0], x[0, 1], x[0, 2] = 0, 0.5, (0.2, 0.2, 0.9)  # black, grey, one channel alone at the max
    assert np.abs(np.clip(fn(x, p, None), 0, 1) - hsv_reference(x, change)).max() < 1e-5


def test_ycbcr_is_the_jpeg_transform():
    x = np.random.default_rng(1).random((6, 6, 3)).astype(np.float32)
    ycc = np.asarray(Image.fromarray((x * 255).round().astype(np.uint8)).convert("YCbCr"), np.float32) / 255
    assert np.abs(D.rgb_to_ycbcr((x * 255).round() / 255) - ycc).max() < 1.5 / 255  # PIL rounds to 8 bits
    assert np.abs(D.ycbcr_to_rgb(D.rgb_to_ycbcr(x)) - x).max() < 1e-5


@pytest.mark.parametrize("classes", [2, 3, 4])
def test_otsu_thresholds_match_a_brute_force_search(classes):
    rng = np.random.default_rng(classes)
    values = np.concatenate([rng.normal(0.2, 0.05, 500), rng.normal(0.6, 0.05, 300), rng.normal(0.9, 0.02, 200)])
    bins = 12
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2

    def between_class(cuts):  # sum over classes of n_k * mean_k^2 (the total mean is fixed)
        bounds = [0, *cuts, bins]
        return sum((counts[a:b] * centres[a:b]).sum() ** 2 / max(counts[a:b].sum(), 1)
                   for a, b in zip(bounds, bounds[1:]))

    best = max(itertools.combinations(range(1, bins), classes - 1), key=between_class)
    assert np.allclose(D.otsu_thresholds(values, classes, bins), edges[list(best)])


def test_motion_kernel_weights_are_a_normalised_half_gaussian():
    x = np.zeros((41, 41, 3), np.float32)
    x[20, 20] = 1  # an impulse: the output is the kernel
    out = D.motion_blur(x, (5, 3), np.random.default_rng(0))
    assert out.sum() == pytest.approx(3.0, abs=1e-4)
    weights = np.exp(-np.arange(11) ** 2 / 18)
    assert out[..., 0].max() == pytest.approx(weights[0] / weights.sum(), rel=1e-3)


def test_draw_by_type_and_by_group():
    rng = np.random.default_rng(0)
    by_type = Counter(D.draw(rng)[0] for _ in range(35_000))
    assert set(by_type) == set(D.TABLE) and max(by_type.values()) < 1200 and min(by_type.values()) > 800
    group_of = {kind: group for group, kinds in D.GROUPS.items() for kind in kinds}
    by_group = Counter(group_of[D.draw(rng, by="group")[0]] for _ in range(12_000))
    assert set(by_group) == set(D.GROUPS) and max(by_group.values()) < 1150 and min(by_group.values()) > 850
    levels = Counter(D.draw(rng)[1] for _ in range(5_000))
    assert set(levels) == set(D.LEVELS) and min(levels.values()) > 850


def test_contrast_stretch_is_the_logistic_curve_around_the_channel_mean():
    x = np.random.default_rng(2).uniform(0.05, 1, (8, 8, 3)).astype(np.float32)
    mean = x.mean((0, 1), keepdims=True)
    for f in (0.4, 1.0, 10.0):
        assert np.allclose(D.contrast_stretch(x, f, None), 1 / (1 + (mean / x) ** f), atol=1e-6)
