"""fixtures/synthetic.py's distortion world: SSIM against a window-by-window computation of its definition, the
quality formula, the pool make_pool.py writes against the world in memory, and the two held-out benchmarks."""

import json

import numpy as np
import pytest
from PIL import Image

import common
import distortions
from fixtures import synthetic as S


def ssim_by_windows(x: np.ndarray, y: np.ndarray, sigma: float = 1.5, radius: int = 5) -> float:
    """Wang et al.'s SSIM written out: at every position where the 11 x 11 window fits, Gaussian-weighted means,
    variances and covariance of the two lumas, the SSIM formula, then the mean over positions."""
    offsets = np.arange(-radius, radius + 1)
    w = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma ** 2))
    w /= w.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(radius, x.shape[0] - radius):
        for j in range(radius, x.shape[1] - radius):
            a, b = x[i - radius:i + radius + 1, j - radius:j + radius + 1], y[i - radius:i + radius + 1,
                                                                              j - radius:j + radius + 1]
            mu_a, mu_b = (w * a).sum(), (w * b).sum()
            var_a, var_b = (w * (a - mu_a) ** 2).sum(), (w * (b - mu_b) ** 2).sum()
            cov = (w * (a - mu_a) * (b - mu_b)).sum()
            values.append((2 * mu_a * mu_b + c1) * (2 * cov + c2)
                          / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(values))


def test_ssim_is_the_windowed_definition_on_luma():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (19, 23, 3), dtype=np.uint8)
    y = np.clip(x.astype(int) // 2 + rng.integers(0, 60, x.shape), 0, 255).astype(np.uint8)
    luma = lambda a: a.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # noqa: E731
    expected = ssim_by_windows(luma(x), luma(y))
    assert S.ssim(Image.fromarray(x), Image.fromarray(y)) == pytest.approx(expected, abs=1e-9)
    assert S.ssim(Image.fromarray(x), Image.fromarray(x)) == pytest.approx(1.0, abs=1e-12)
    flat = np.full((16, 16, 3), 100, np.uint8)  # constant images: only the luminance term is left
    brighter = flat + np.uint8(50)
    luminance = (2 * 100 * 150 + (2.55 ** 2)) / (100 ** 2 + 150 ** 2 + 2.55 ** 2)
    assert S.ssim(Image.fromarray(flat), Image.fromarray(brighter)) == pytest.approx(luminance, rel=1e-9)


def test_world_quality_is_the_reference_quality_times_the_clipped_fidelity():
    assert S.world_quality(4.0, 0.5) == 2.0
    assert S.world_quality(3.0, 1.0) == 3.0
    assert S.world_quality(5.0, -0.2) == 0.0


def test_contrast_world_is_the_pristine_content_with_its_contrast_level():
    for seed in range(12):
        image, record = S.make_image(seed, 56, "contrast")
        (kind, level), = record["distortions"].items()
        content, name = S.pristine(seed, 56)
        assert kind == "contrast" and record["mos"] == 5 - level and name == record["content"]
        assert np.array_equal(np.asarray(image), np.asarray(S.distort(content, "contrast", level, None)))


def test_the_pool_make_pool_writes_is_the_world_in_memory(tmp_path):
    """Every manifest image's labels line: the quality from ITS files (SSIM of the written variant to the written
    reference) equals the in-memory world's, pixel for pixel; the types are the world's."""
    out = S.write_pool_world(tmp_path / "pool", "pool", 4, size=56, variants=3, seed=0)
    labels = common.read_jsonl(out / "labels.jsonl")
    manifest = common.read_jsonl(out / "manifest.jsonl")
    assert [r["image"] for r in labels] == [r["image"] for r in manifest] and len(labels) == 16
    world = S.world_images("pool", 4, size=56, variants=3, seed=0)
    assert [r["image"] for _, r in world] == [r["image"] for r in labels]
    for (image, expected), r in zip(world, labels):
        assert np.array_equal(np.asarray(Image.open(out / r["image"]).convert("RGB")), np.asarray(image))
        assert r["mos"] == pytest.approx(expected["mos"], abs=1e-12) and r["type"] == expected["type"]
        reference_quality = next(x["mos"] for x in labels if x["image"] == r["reference"])
        fidelity = S.ssim(Image.open(out / r["image"]), Image.open(out / r["reference"]))
        assert r["mos"] == pytest.approx(reference_quality * max(0.0, fidelity), abs=1e-12)
        assert r["type"] is None or r["type"] in S.WORLD_TYPES
    assert {"labels.jsonl", "manifest.jsonl", "references", "references.txt", "variants"} <= {p.name for p in
                                                                                              out.iterdir()}
    assert json.loads((out / "settings.json").read_text())["settings"]["types"] == list(S.WORLD_TYPES)
    assert not (tmp_path / "pool.source").exists()


def test_benchmarks_authentic_references_and_synthetic_types_by_levels(tmp_path):
    out = S.write_benchmarks(tmp_path / "bench", 5, 2, size=56)
    authentic = common.read_jsonl(out / "authentic" / "labels.jsonl")
    assert [r["mos"] for r in authentic] == [S.make_image(S.SEED_BASE["bench"] + i, 56, "contrast")[1]["mos"]
                                            for i in range(5)]
    synthetic = common.read_jsonl(out / "synthetic" / "labels.jsonl")
    assert len(synthetic) == 2 * len(S.WORLD_TYPES) * 5
    assert {(r["reference"], r["type"], r["level"]) for r in synthetic} == {
        (f"s{i:03d}", kind, level) for i in range(2) for kind in S.WORLD_TYPES for level in distortions.LEVELS}
    for r in synthetic[:7]:
        reference, _ = S.pristine(S.SEED_BASE["bench"] + S.SYNTHETIC_SEED + int(r["reference"][1:]), 56)
        fidelity = S.ssim(Image.open(out / "synthetic" / r["image"]), reference)
        assert r["mos"] == pytest.approx(5 * max(0.0, fidelity), abs=1e-12)
