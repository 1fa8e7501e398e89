"""The evaluation's numbers (paper: Experiments, the evaluation protocol: SRCC, KRCC, PLCC after the 4-parameter
logistic, WAVG weighted by image count), their 95 % bootstrap intervals, and the summary files that report them.
evaluate.py writes them after scoring; report.py recomputes them, or compares two evaluations, from the predictions.

    import metrics
    metrics.srcc(pred, mos), metrics.plcc_logistic(pred, mos)          # 1-D arrays, higher MOS = better
    draws = metrics.bootstrap(pred, mos, resamples=1000, seed=0, name="koniq")
"""

from __future__ import annotations

import math
import re
import warnings
import zlib
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from scipy import optimize, stats

import common


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: metrics, each a pure function f(pred, mos) on 1-D arrays
# ---------------------------------------------------------------------------------------------------------------------


def srcc(pred: np.ndarray, mos: np.ndarray) -> float:
    return float(stats.spearmanr(pred, mos)[0])


def krcc(pred: np.ndarray, mos: np.ndarray) -> float:
    return float(stats.kendalltau(pred, mos)[0])


def plcc(pred: np.ndarray, mos: np.ndarray) -> float:
    return float(stats.pearsonr(pred, mos)[0])


def logistic4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """VQEG's 4-parameter logistic: b2 at the bottom, b1 at the top, centre b3, slope scale |b4|."""
    with np.errstate(over="ignore"):  # exp overflow is the correct limit (the curve's bottom), not an error
        return (b1 - b2) / (1 + np.exp(-(x - b3) / np.abs(b4))) + b2


def fit_logistic(pred: np.ndarray, mos: np.ndarray, maxfev: int = 10000) -> Optional[np.ndarray]:
    """Least-squares (b1, b2, b3, b4) mapping predictions onto the MOS scale; None (and a warning) if it fails."""
    pred, mos = np.asarray(pred, dtype=float), np.asarray(mos, dtype=float)
    if pred.size < 4 or np.ptp(pred) == 0:
        warnings.warn(f"logistic fit skipped ({pred.size} points, spread {np.ptp(pred) if pred.size else 0}): "
                      "needs >= 4 non-constant predictions; PLCC/RMSE after the fit are NaN")
        return None
    p0 = [mos.max(), mos.min(), pred.mean(), pred.std() / 4 or 1.0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optimize.OptimizeWarning)  # no covariance estimate: we do not use it
            params, _ = optimize.curve_fit(logistic4, pred, mos, p0=p0, maxfev=maxfev)
    except (RuntimeError, ValueError, TypeError) as e:
        warnings.warn(f"logistic fit failed ({e}); PLCC/RMSE after the fit are NaN")
        return None
    if not np.all(np.isfinite(params)):
        warnings.warn("logistic fit returned non-finite parameters; PLCC/RMSE after the fit are NaN")
        return None
    return params


def plcc_logistic(pred: np.ndarray, mos: np.ndarray, maxfev: int = 10000) -> float:
    params = fit_logistic(pred, mos, maxfev)
    if params is None:
        return math.nan
    fitted = logistic4(np.asarray(pred, dtype=float), *params)
    if np.ptp(fitted) == 0:
        warnings.warn("the fitted logistic is flat; PLCC after the fit is NaN")
        return math.nan
    return float(stats.pearsonr(fitted, mos)[0])


def rmse_logistic(pred: np.ndarray, mos: np.ndarray) -> float:
    params = fit_logistic(pred, mos)
    if params is None:
        return math.nan
    fitted = logistic4(np.asarray(pred, dtype=float), *params)
    return float(np.sqrt(np.mean((fitted - np.asarray(mos, dtype=float)) ** 2)))


METRICS = {"srcc": srcc, "krcc": krcc, "plcc": plcc, "plcc_logistic": plcc_logistic, "rmse_logistic": rmse_logistic}


def scored(records: list[dict], lower_better: bool) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, MOS) of the images with a score; the MOS negated for lower-is-better, so higher is better."""
    valid = [r for r in records if r.get("score") is not None]
    pred = np.array([r["score"] for r in valid], dtype=float)
    return pred, np.array([r["mos"] for r in valid], dtype=float) * (-1.0 if lower_better else 1.0)


def benchmark_metrics(name: str, records: list[dict], lower_better: bool) -> dict:
    """n, coverage, missing, truncation rate and every metric of one benchmark's predictions."""
    pred, mos = scored(records, lower_better)
    missing = [r["image"] for r in records if r.get("error")]
    answers = [t for r in records for t in r.get("truncated", [])]
    out = {"n": len(records), "n_valid": len(pred), "coverage": len(pred) / len(records) if records else math.nan,
           "missing": len(missing), "missing_images": missing, "lower_better": lower_better,
           "truncation_rate": sum(answers) / len(answers) if answers else math.nan}
    if len(pred) < 3:
        warnings.warn(f"{name}: only {len(pred)} valid predictions (need >= 3); its metrics are NaN")
        return {**out, **{key: math.nan for key in METRICS}}
    return {**out, **{key: f(pred, mos) for key, f in METRICS.items()}}


def aggregate(benchmarks: dict[str, dict]) -> tuple[dict, dict]:
    """(wavg weighted by image count, the paper's WAVG; plain mean over benchmarks) of coverage and each metric.
    A NaN metric in any benchmark makes its aggregate NaN: hiding a broken benchmark would flatter the average."""
    keys = ["coverage", "truncation_rate", *METRICS]
    weights = np.array([b["n"] for b in benchmarks.values()], dtype=float)
    wavg, mean = {}, {}
    for key in keys:
        values = np.array([b.get(key, math.nan) for b in benchmarks.values()], dtype=float)
        wavg[key] = float(np.sum(weights * values) / weights.sum()) if weights.sum() else math.nan
        mean[key] = float(values.mean()) if values.size else math.nan
    return wavg, mean


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: 95 % bootstrap intervals (resamples of a benchmark's scored images, with replacement)
# ---------------------------------------------------------------------------------------------------------------------

CI_METRICS = ("srcc", "krcc", "plcc", "plcc_logistic")
# A resample's logistic fit, as the point estimate's, but given up (NaN) after 400 evaluations: a fit on real data
# converges in about 30-70, while a small, flat resample can spend the point estimate's 10,000 and ~20 ms each.
RESAMPLE_MAXFEV = 400
MAX_RESAMPLES = 100_000  # --bootstrap's bound: at 2,000 images about 12 minutes on 2 cores, and memory bounded


def check_resamples(resamples: int) -> None:
    if not 0 <= resamples <= MAX_RESAMPLES:
        common.die(f"--bootstrap {resamples}: the resamples must be between 0 (no intervals) and {MAX_RESAMPLES:,}")


def resample_indices(n: int, resamples: int, seed: int, name: str) -> Iterator[np.ndarray]:
    """Resample b of benchmark `name`: n image indices drawn with replacement, the b-th draw of a generator seeded
    with (seed, crc32(name)): the same images for the same name and size, whichever benchmarks run beside it."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    for _ in range(resamples):
        yield rng.integers(0, n, n)


def rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson's r of each row pair of two (B, n) arrays; NaN for a constant row."""
    x, y = x - x.mean(axis=1, keepdims=True), y - y.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(x * y, axis=1) / np.sqrt(np.sum(x * x, axis=1) * np.sum(y * y, axis=1))


def bootstrap(pred: np.ndarray, mos: np.ndarray, resamples: int, seed: int, name: str) -> dict[str, np.ndarray]:
    """Each of CI_METRICS on every resample: metric -> (resamples,) values. SRCC and PLCC are vectorised over
    chunks of resamples (SRCC is Pearson's r of the average ranks); KRCC and the logistic fit run per resample, the
    fit as for the point estimate, capped at RESAMPLE_MAXFEV (a warm start from the full sample's fit is barely
    faster and, on a flat least-squares surface, lands elsewhere: another estimator)."""
    draws: dict[str, list] = {key: [] for key in CI_METRICS}
    rows, chunk = resample_indices(len(pred), resamples, seed, name), max(1, 2_000_000 // max(len(pred), 1))
    for done in range(0, resamples, chunk):
        idx = np.stack([next(rows) for _ in range(min(chunk, resamples - done))])
        p, m = pred[idx], mos[idx]
        draws["srcc"].append(rowwise_pearson(stats.rankdata(p, axis=1), stats.rankdata(m, axis=1)))
        draws["plcc"].append(rowwise_pearson(p, m))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a constant resample or a failed fit: NaN, counted by `interval`
            draws["krcc"].append([stats.kendalltau(a, b)[0] for a, b in zip(p, m)])
            draws["plcc_logistic"].append([plcc_logistic(a, b, RESAMPLE_MAXFEV) for a, b in zip(p, m)])
    return {key: np.concatenate(values).astype(float) for key, values in draws.items()}


def interval(values: np.ndarray, what: str) -> list[float]:
    """[2.5th, 97.5th percentile] of the resamples where the metric exists; NaN if under half of them have it."""
    finite = values[np.isfinite(values)]
    if finite.size < len(values):
        warnings.warn(f"{what}: {len(values) - finite.size} of {len(values)} resamples have no value (constant "
                      f"or failed fit); the interval is over the other {finite.size}")
    if finite.size == 0 or finite.size < len(values) / 2:
        return [math.nan, math.nan]
    return [float(v) for v in np.percentile(finite, [2.5, 97.5])]


def weighted_draws(draws: dict[str, dict[str, np.ndarray]], weights: dict[str, float]) -> dict[str, np.ndarray]:
    """WAVG on every resample: each benchmark resampled on its own, their values averaged with the WAVG weights."""
    total = sum(weights.values())
    return {key: sum(weights[name] * d[key] for name, d in draws.items()) / total for key in CI_METRICS}


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: summary.json and summary.md
# ---------------------------------------------------------------------------------------------------------------------


def json_safe(obj):
    """NaN -> null, so that summary.json is valid JSON for every reader."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


def cell(value: float, low: Optional[float] = None, high: Optional[float] = None, digits: int = 2) -> str:
    """.812, or .812 [.79, .83] with an interval (`digits` decimals); nan for a missing value."""
    def short(x: Optional[float], places: int) -> str:
        return "nan" if x is None or not math.isfinite(x) else re.sub(r"^(-?)0\.", r"\1.", f"{x:.{places}f}")
    return short(value, 3) + (f" [{short(low, digits)}, {short(high, digits)}]" if low is not None else "")


def markdown_table(benchmarks: dict[str, dict], wavg: dict, mean: dict) -> str:
    columns = [("coverage", "coverage"), ("truncation_rate", "truncated"), ("srcc", "SRCC"), ("krcc", "KRCC"),
               ("plcc", "PLCC"), ("plcc_logistic", "PLCC (logistic)"), ("rmse_logistic", "RMSE (logistic)")]
    total = sum(b["n"] for b in benchmarks.values())
    lines = ["| benchmark | n | " + " | ".join(title for _, title in columns) + " |",
             "|---|--:|" + "--:|" * len(columns)]
    rows = [(name, b["n"], b) for name, b in benchmarks.items()] + [("WAVG", total, wavg), ("mean", total, mean)]
    for name, n, values in rows:
        cells = [cell(values.get(key, math.nan), *values.get("ci95", {}).get(key, [])) for key, _ in columns]
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(out: Path, setup: dict, predictions: dict[str, list[dict]], lower_better: list[str],
                  resamples: int, seed: int) -> dict:
    """summary.json and summary.md: every benchmark's metrics, WAVG and the plain mean, with 95 % intervals of
    CI_METRICS per benchmark and for WAVG (`resamples` 0: none)."""
    sources, benchmarks, draws = setup.get("sources", {}), {}, {}
    for name, records in predictions.items():
        benchmarks[name] = {**sources.get(name, {}), **benchmark_metrics(name, records, name in lower_better)}
        if resamples:
            pred, mos = scored(records, name in lower_better)
            draws[name] = (bootstrap(pred, mos, resamples, seed, name) if len(pred) >= 3 else
                           {key: np.full(resamples, math.nan) for key in CI_METRICS})
            benchmarks[name]["ci95"] = {k: interval(v, f"{name} {k}") for k, v in draws[name].items()}
    wavg, mean = aggregate(benchmarks)
    if resamples:
        wavg_draws = weighted_draws(draws, {name: b["n"] for name, b in benchmarks.items()})
        wavg["ci95"] = {k: interval(v, f"WAVG {k}") for k, v in wavg_draws.items()}
    summary = {**setup, "lower_better": lower_better, "bootstrap": {"resamples": resamples, "seed": seed},
               "benchmarks": benchmarks, "wavg": wavg, "mean": mean}
    common.write_json_atomic(out / "summary.json", json_safe(summary))
    table = markdown_table(benchmarks, wavg, mean)
    header = f"model: {setup.get('model')}, prompt: {setup.get('prompt')} ({setup.get('prompt_hash')})"
    if resamples:
        header += f"; [95 % bootstrap interval over images, {resamples} resamples, seed {seed}]"
    common.write_lines_atomic(out / "summary.md", [header + "\n\n" + table])
    print(table, end="")
    return summary
