"""Score IQA benchmarks with a VLM and report SRCC / KRCC / PLCC against the human MOS; or score any images.

Every image gets the score prompt; the number in the answer is its predicted quality. Single process, the paper's
benchmarks straight from the folders their releases unpack to (the layout is recognised by its files):

    python evaluate.py --model ByteDance/EvoQuality --out runs/eval \
        --bench koniq=/data/koniq10k spaq=/data/SPAQ agiqa=/data/AGIQA-3K livew=/data/ChallengeDB_release \
                kadid=/data/kadid10k pipal=/data/PIPAL tid2013=/data/tid2013 csiq=/data/CSIQ --split set=test

Several GPUs (the images are sharded across processes; the main process merges the shards and reports):

    accelerate launch --num_processes 8 evaluate.py --model ... --bench ... --out runs/eval

Score images without labels (a folder, recursively, or a list file; no metrics):

    python evaluate.py --model ByteDance/EvoQuality --images /data/photos --out runs/scores

Recompute the metrics from the saved predictions, with no model:

    python evaluate.py --predictions runs/eval

--bench NAME=PATH[@IMAGE_FOLDER] (repeatable): PATH a dataset folder as its official release unpacks (KonIQ-10k,
SPAQ, AGIQA-3K, LIVE Challenge, KADID-10k, PIPAL, TID2013, CSIQ), one of their label files, or a generic label file
(plain JSONL, pyiqa CSV, VisualQuality-R1 JSONL); benchmarks.py reads them and, run alone, says what a folder holds.

Outputs in --out: predictions_NAME.jsonl (one line per image), eval_config.json, summary.json and summary.md with
95 % bootstrap intervals (docs/metrics.md lists every key). Rerunning the same command resumes; a rerun that would
change a result is refused, naming each changed setting; an image changed in place is scored again.

Compare two evaluations of the same benchmarks (B - A, paired bootstrap over the images both scored):

    python evaluate.py --compare runs/eval_round1 runs/eval_round2
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from scipy import optimize, stats

import common
import prompts
import sampling
from benchmarks import IMAGES, Bench, label_identity, load_benchmarks, load_images, parse_split


@dataclass
class Args:
    model: str = common.arg("", help="checkpoint folder or hub id, e.g. ByteDance/EvoQuality")
    bench: list[str] = common.arg([], help="NAME=PATH[@IMAGE_FOLDER], PATH a dataset folder or label file; repeatable")
    images: str = common.arg("", help="score these images instead (a folder or a .txt/.jsonl list; an image changed "
                                      "in place since it was scored is scored again); no metrics")
    out: str = common.arg("", help="output folder for predictions and summaries")
    predictions: str = common.arg("", help="recompute metrics from the predictions in this folder (no model)")
    prompt: str = common.arg("evoquality", help="prompt preset", choices=sorted(prompts.PRESETS))
    reasoning: bool = common.arg(True, help="ask for reasoning before the boxed answer (the presets' default)")
    samples: int = common.arg(1, help="answers per image: 1 = greedy; N > 1 = sampled, valid ones averaged")
    temperature: float = common.arg(1.0, help="sampling temperature (used only when --samples > 1)")
    max_new_tokens: int = common.arg(512, help="generation budget per answer; an answer cut off here is unparseable")
    batch_size: int = common.arg(32, help="images per sampling call, per process; 32 fits one 80 GB GPU at 7B up to "
                                          "--samples 16 (KV 56 KiB/token x ~1.5k tokens x 512 sequences ~ 44 GB "
                                          "+ 16.6 GB bf16 weights)")
    max_pixels: Optional[int] = common.arg(None, help="cap on image pixels for the processor (default: the model's)")
    lower_better: list[str] = common.arg([], help="names of --bench files (not known releases) whose labels are "
                                                  "lower-is-better")
    split: str = common.arg("", help="COLUMN=VALUE: keep only benchmark rows whose COLUMN equals VALUE, e.g. set=test")
    text: bool = common.arg(True, help="keep the answer texts in the predictions (--no-text drops them)")
    strict: bool = common.arg(False, help="stop on a missing or unreadable image instead of counting it")
    seed: int = common.arg(0, help="sampling seed (process i uses seed + i)")
    bootstrap: int = common.arg(1000, help="resamples of the images for the 95 %% intervals (0: no intervals)")
    bootstrap_seed: int = common.arg(0, help="seed of the bootstrap resamples")
    compare: list[str] = common.arg([], help="OUT_A OUT_B: B - A per metric with a paired bootstrap interval, no model")
    allow_outside_root: bool = common.arg(False, help="accept absolute or '..' image names in label files and lists")


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
# ALGO LOGIC: scoring (one sampling call per batch of images; N answers per image; truncated = unparseable)
# ---------------------------------------------------------------------------------------------------------------------


def sample_answers(model, processor, images: list, prompt: str, preset: prompts.Preset, args: Args
                   ) -> list[list[sampling.Completion]]:
    """`args.samples` completions for each image, from one batched call of the shared sampling routine (greedy for
    --samples 1), each with its truncation flag."""
    inputs = common.encode_batch(processor, [prompt] * len(images), [[image] for image in images],
                                 add_vision_id=preset.add_vision_id).to(model.device)
    samples = sampling.sample(model, processor, inputs, n=args.samples, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, do_sample=args.samples > 1)
    return samples.completions()


def image_score(completions: list[sampling.Completion], preset: prompts.Preset
                ) -> tuple[Optional[float], list[Optional[float]]]:
    """(mean of the valid parsed scores or None, every parsed score with None for the unparseable ones).
    A truncated answer is unparseable (sampling.answer), even when its text holds a closed box."""
    scores = [sampling.answer(c, lambda text: prompts.parse_score(text, preset)) for c in completions]
    valid = [s for s in scores if s is not None]
    return (sum(valid) / len(valid) if valid else None), scores


def score_entries(model, processor, preset: prompts.Preset, prompt: str, args: Args, root: Path, entries: list[dict],
                  part: Path, show_progress: bool) -> None:
    """Score `entries` (this process's shard) in batches, one flushed line per image in `part`, with the image's
    [size, mtime] as it was read (`file`): an image changed in place since is scored again."""
    from tqdm import tqdm

    batches = [entries[i:i + args.batch_size] for i in range(0, len(entries), args.batch_size)]
    with common.JsonlWriter(part) as writer:
        for batch in tqdm(batches, desc=part.name, disable=not show_progress):
            images, loaded = [], []
            for entry in batch:
                base = {"image": entry["image"], **({"mos": entry["mos"]} if "mos" in entry else {}), "score": None,
                        "n_valid": 0, "file": file_stat(root / entry["image"])}
                if base["file"] is None:
                    writer.write({**base, "error": "missing file"})
                    continue
                try:
                    images.append(common.load_image(root / entry["image"]))
                    loaded.append(base)
                except ValueError as e:
                    if args.strict:
                        common.die(f"{e} (--strict)")
                    writer.write({**base, "error": str(e)})
            if not images:
                continue
            for base, completions in zip(loaded, sample_answers(model, processor, images, prompt, preset, args)):
                score, scores = image_score(completions, preset)
                writer.write({**base, "score": score, "n_valid": sum(s is not None for s in scores), "scores": scores,
                              "truncated": [c.truncated for c in completions],
                              **({"answers": [c.text for c in completions]} if args.text else {})})



# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: reports (per benchmark, WAVG, the plain mean)
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
    (out / "summary.md").write_text(header + "\n\n" + table, encoding="utf-8")
    print(table, end="")
    return summary


def compare_benchmark(name: str, a: list[dict], b: list[dict], lower_better: bool, resamples: int, seed: int
                      ) -> tuple[dict, dict[str, np.ndarray]]:
    """A and B on the images both scored: each metric, B - A, its paired bootstrap interval (the same resampled
    images for both) and the share of resamples in which B is better; with the (resamples,) differences."""
    scored_a = {r["image"]: r for r in a if r.get("score") is not None}
    both = [r for r in b if r.get("score") is not None and r["image"] in scored_a]
    if len(both) < 3:
        warnings.warn(f"{name}: {len(both)} images scored in both folders (need >= 3); its differences are NaN")
        nan = {key: math.nan for key in CI_METRICS}
        return ({"n_both": len(both), "a": nan, "b": nan, "difference": nan}, {key: np.full(resamples, math.nan)
                                                                            for key in CI_METRICS})
    ya, yb = scored([scored_a[r["image"]] for r in both], lower_better), scored(both, lower_better)
    row = {"n_both": len(both), "a": {k: METRICS[k](*ya) for k in CI_METRICS},
           "b": {k: METRICS[k](*yb) for k in CI_METRICS}}
    row["difference"] = {k: row["b"][k] - row["a"][k] for k in CI_METRICS}
    da, db = bootstrap(*ya, resamples, seed, name), bootstrap(*yb, resamples, seed, name)
    return row, {k: db[k] - da[k] for k in CI_METRICS}


def same_benchmarks(a: Path, b: Path, config_a: dict, config_b: dict, names_a: list[str], names_b: list[str]) -> None:
    """Die unless both folders scored the same benchmarks from the same label files (content, split, direction)."""
    if set(names_a) != set(names_b):
        common.die(f"--compare: the folders hold other benchmarks: only in {a}: {sorted(set(names_a) - set(names_b))}"
                   f", only in {b}: {sorted(set(names_b) - set(names_a))}")
    for folder, config in ((a, config_a), (b, config_b)):
        if "settings" not in config:
            common.die(f"--compare: {folder} has no eval_config.json: its label files cannot be checked")

    def labels(config: dict, name: str) -> tuple:
        setting = config["settings"].get(f"benchmark {name}", {})
        return setting.get("labels"), setting.get("split"), name in config.get("lower_better", [])
    differ = [name for name in names_a if labels(config_a, name) != labels(config_b, name)]
    if differ:
        common.die(f"--compare: the label files (or --split, or the direction) of {differ} differ between {a} and {b}")


def compare_runs(a: Path, b: Path, resamples: int, seed: int, out: Optional[Path]) -> dict:
    """--compare A B: per benchmark and WAVG, B - A of each metric with its paired 95 % bootstrap interval and the
    share of resamples where B is better. WAVG weights each benchmark by its image count, as summary.json does."""
    (config_a, runs_a), (config_b, runs_b) = read_run(a, "--compare"), read_run(b, "--compare")
    same_benchmarks(a, b, config_a, config_b, list(runs_a), list(runs_b))
    rows, draws = {}, {}
    for name in runs_a:
        rows[name], draws[name] = compare_benchmark(name, runs_a[name], runs_b[name],
                                                    name in config_a.get("lower_better", []), resamples, seed)
    weights = {name: len(records) for name, records in runs_a.items()}
    total, wavg_draws = sum(weights.values()), weighted_draws(draws, weights)
    rows["WAVG"] = {"n_both": sum(r["n_both"] for r in rows.values()), **{
        side: {k: sum(weights[n] * rows[n][side][k] for n in runs_a) / total for k in CI_METRICS}
        for side in ("a", "b", "difference")}}
    for name, d in [*draws.items(), ("WAVG", wavg_draws)]:
        rows[name]["ci95"] = {k: interval(v, f"{name} {k} difference") for k, v in d.items()}
        rows[name]["b_better"] = {k: float(np.mean(v[np.isfinite(v)] > 0)) if np.isfinite(v).any() else math.nan
                                  for k, v in d.items()}
    result = {"a": str(a), "b": str(b), "bootstrap": {"resamples": resamples, "seed": seed}, "benchmarks": rows}
    lines = [f"B - A, A = {a}, B = {b}; 95 % paired bootstrap interval over the images both scored "
             f"({resamples} resamples, seed {seed})", "", "| benchmark | n both | metric | A | B | B - A | B better |",
             "|---|--:|---|--:|--:|--:|--:|"]
    for name, r in rows.items():
        lines += [f"| {name} | {r['n_both']} | {k} | {cell(r['a'][k])} | {cell(r['b'][k])} | "
                  f"{cell(r['difference'][k], *r['ci95'][k], digits=3)} | {cell(r['b_better'][k])} |"
                  for k in CI_METRICS]
    if out is not None:
        common.write_json_atomic(out / "compare.json", json_safe(result))
        common.write_lines_atomic(out / "compare.md", [line + "\n" for line in lines])
    print("\n".join(lines))
    return result


def write_image_summary(out: Path, setup: dict, records: list[dict]) -> dict:
    """--images: how many were scored, which could not be read and why, the truncation rate; no metrics."""
    answers = [t for r in records for t in r.get("truncated", [])]
    unreadable = [{"image": r["image"], "error": r["error"]} for r in records if r.get("error")]
    scored = sum(r.get("score") is not None for r in records)
    images = {"n": len(records), "n_scored": scored, "coverage": scored / len(records), "n_unreadable": len(unreadable),
              "unreadable": unreadable, "truncation_rate": sum(answers) / len(answers) if answers else math.nan}
    summary = {**setup, "images": images}
    common.write_json_atomic(out / "summary.json", json_safe(summary))
    lines = [f"{len(records)} images: {scored} scored, {len(records) - scored - len(unreadable)} without a valid "
             f"answer, {len(unreadable)} unreadable; truncated answers {images['truncation_rate']:.3f}"]
    lines += [f"unreadable: {u['image']}: {u['error']}" for u in unreadable]
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return summary



# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: predictions I/O (per-process shards, merged in benchmark order by the main process)
# ---------------------------------------------------------------------------------------------------------------------


def predictions_path(out: Path, name: str) -> Path:
    return out / ("predictions.jsonl" if name == IMAGES else f"predictions_{name}.jsonl")


def file_stat(path: Path) -> Optional[list[int]]:
    """[size, mtime in ns] of an image file, None if it is not one: its identity, cheap for 10k images."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns] if path.is_file() else None


def read_predictions(out: Path, name: str, stats: dict[str, Optional[list[int]]]) -> dict[str, dict]:
    """image -> its best saved record, from the merged file and any shards left by a killed run: one made from the
    image as it is now (`stats`: image -> file_stat) beats a stale one, a scored one an error (a missing image
    may have been restored since), a later one an earlier one."""
    best: dict[str, tuple] = {}
    final = predictions_path(out, name)
    for order, record in enumerate(r for path in [final, *common.shard_files(final)] for r in common.read_jsonl(path)):
        rank = (record.get("file") == stats.get(record["image"]), not record.get("error"), order)
        if record["image"] not in best or rank > best[record["image"]][0]:
            best[record["image"]] = (rank, record)
    return {image: record for image, (_, record) in best.items()}


def to_score(entries: list[dict], saved: dict[str, dict], stats: dict[str, Optional[list[int]]]) -> list[dict]:
    """The entries without a score made from the image as it is now."""
    return [e for e in entries if e["image"] not in saved or saved[e["image"]].get("error")
            or saved[e["image"]].get("file") != stats[e["image"]]]


def merge_predictions(out: Path, name: str, entries: list[dict], stats: dict[str, Optional[list[int]]]
                      ) -> list[dict]:
    """Write the predictions file with exactly one record per entry (atomically), drop the shards."""
    saved, final = read_predictions(out, name, stats), predictions_path(out, name)
    records = []
    for entry in entries:
        if entry["image"] not in saved:
            raise RuntimeError(f"{name}: no prediction for {entry['image']} after scoring (a process failed?)")
        mos = {"mos": entry["mos"]} if "mos" in entry else {}  # the MOS as the benchmark file has it now
        records.append({**saved[entry["image"]], **mos})
    common.merge_shards(final, records)
    return records


def read_run(out: Path, flag: str) -> tuple[dict, dict[str, list[dict]]]:
    """(eval_config.json or {}, benchmark name -> its merged predictions in the run's order) of an evaluation folder."""
    files = sorted(out.glob("predictions_*.jsonl"))
    if not files:
        common.die(f"{flag} {out}: no predictions_*.jsonl files there")
    config = common.read_json(out / "eval_config.json") if (out / "eval_config.json").exists() else {}
    names = [f.name[len("predictions_"):-len(".jsonl")] for f in files]
    known = [n for n in config.get("sources", {}) if n in names]  # the live run's order first
    order = known + [n for n in names if n not in known]
    for name in order:
        if common.shard_files(predictions_path(out, name)):
            warnings.warn(f"{name}: shard files of an unfinished run are ignored; rerun the evaluation to merge them")
    try:
        return config, {name: common.read_jsonl(predictions_path(out, name)) for name in order}
    except ValueError as e:
        common.die(str(e))


def recompute(args: Args) -> dict:
    """--predictions DIR: metrics from the saved predictions_*.jsonl, setup and lower-better list from the run."""
    out = Path(args.predictions)
    config, predictions = read_run(out, "--predictions")
    with common.output_lock(out):  # not while a run writes into the folder
        return write_summary(out, config, predictions, args.lower_better or config.get("lower_better", []),
                             args.bootstrap, args.bootstrap_seed)


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: main
# ---------------------------------------------------------------------------------------------------------------------


def run_settings(args: Args, preset: prompts.Preset, jobs: dict[str, Bench]) -> dict:
    """Every setting that changes a prediction. The model by identity (a retrained checkpoint in the same folder is
    another model), each benchmark by the content of its label file(s)."""
    sampled = args.samples > 1
    settings = {"model": common.fingerprint(args.model), "prompt": preset.name, "prompt_hash": preset.hash(),
                "reasoning": args.reasoning, "samples": args.samples,
                "temperature": args.temperature if sampled else None, "seed": args.seed if sampled else None,
                "max_new_tokens": args.max_new_tokens, "max_pixels": args.max_pixels}
    for name, job in jobs.items():
        if name == IMAGES:
            settings["images"] = str(job.root.resolve())
        else:
            settings[f"benchmark {name}"] = {"labels": label_identity(job.files), "images": str(job.root.resolve()),
                                             "split": args.split if job.split_applied else None}
    return settings


def merged_config(out: Path, settings: dict, setup: dict) -> dict:
    """Refuse a rerun whose settings would change a saved prediction (each changed setting named); a benchmark not
    in the earlier run is new, not changed. The record to write once the run has started: the union."""
    path = out / "eval_config.json"
    saved = common.read_json(path) if path.exists() else {}
    before = saved.get("settings", {})
    compare = {k: v for k, v in settings.items() if not k.startswith("benchmark ") or k in before}
    common.refuse_changed_settings(path, compare, f"{out} (predictions)",
                                   f"use another --out, or the settings recorded in {path}")
    sources = setup.get("sources", {})
    earlier = [n for n in saved.get("lower_better", []) if n not in sources]  # this run decides for its own names
    return {**saved, **setup, "settings": {**before, **settings}, "sources": {**saved.get("sources", {}), **sources},
            "lower_better": earlier + setup.get("lower_better", [])}


def load_model(args: Args, device):
    """(model, processor); a model that fails to load is one line naming it."""
    try:
        return (common.load_model(args.model, device=device).eval(),
                common.load_processor(args.model, max_pixels=args.max_pixels))
    except Exception as e:  # a broken folder raises OSError, ValueError, KeyError, ... depending on what is wrong
        first = (str(e).splitlines() or [""])[0]
        common.die(f"--model {args.model}: cannot load it ({type(e).__name__}: {first}); give a checkpoint folder or "
                   "hub id")


def check_args(args: Args) -> None:
    if not (args.model and args.out and (args.bench or args.images)):
        common.die("--model, --out and --bench (or --images) are required (or --predictions DIR to recompute metrics)")
    if args.bench and args.images:
        common.die("--bench and --images are separate runs (the second has no metrics): give one of them")
    if args.images and (args.split or args.lower_better):
        common.die("--split and --lower-better apply to --bench runs only")
    if args.samples < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        common.die("--samples, --batch-size and --max-new-tokens must be >= 1")
    if args.samples > 1 and not args.temperature > 0:
        common.die("--samples > 1 needs --temperature > 0 (use --samples 1 for greedy decoding)")
    if args.allow_outside_root and not (args.bench or args.images):
        common.die("--allow-outside-root applies to --bench and --images runs")


def run_setup(args: Args, preset: prompts.Preset, jobs: dict[str, Bench], num_processes: int) -> dict:
    """What summary.json says about the run, beside the settings."""
    return {"model": str(Path(args.model).resolve()) if Path(args.model).exists() else args.model,
            "prompt": preset.name, "prompt_hash": preset.hash(), "samples": args.samples,
            "decoding": "greedy" if args.samples == 1 else f"sampled, T={args.temperature}, top_k=0, top_p=1, "
                                                          f"seed {args.seed}",
            "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "split": args.split or None,
            "num_processes": num_processes,
            "sources": {name: job.source() for name, job in jobs.items() if name != IMAGES},
            "lower_better": [name for name, job in jobs.items() if job.lower_better],
            "package_versions": common.package_versions(), "argv": sys.argv}


def score_jobs(state, model, processor, preset: prompts.Preset, args: Args, out: Path, jobs: dict[str, Bench]
               ) -> dict[str, list[dict]]:
    """Each job's images not yet scored, sharded across processes; the main process merges and returns them."""
    prompt, predictions = preset.prompt("score", args.reasoning), {}
    for name, job in jobs.items():
        stats = {e["image"]: file_stat(job.root / e["image"]) for e in job.entries}
        try:
            saved = read_predictions(out, name, stats)
        except ValueError as e:
            common.die(str(e))
        todo = to_score(job.entries, saved, stats)
        state.wait_for_everyone()  # every process has read the same files before anyone appends to them
        mine = todo[state.process_index::state.num_processes]
        if state.is_main_process:
            print(f"{name}: {len(job.entries)} images, {len(job.entries) - len(todo)} already scored, {len(todo)} "
                  "to score (new, missing before or changed since)", file=sys.stderr)
        if mine:
            part = common.shard_file(predictions_path(out, name), state.process_index)
            score_entries(model, processor, preset, prompt, args, job.root, mine, part, state.is_main_process)
        state.wait_for_everyone()
        if state.is_main_process:
            predictions[name] = merge_predictions(out, name, job.entries, stats)
    return predictions


def main(argv: Optional[list[str]] = None) -> Optional[dict]:
    args = common.parse_args(Args, argv)
    if args.bootstrap < 0:
        common.die("--bootstrap must be >= 0 (0: no intervals)")
    if args.compare:
        if len(args.compare) != 2 or args.bootstrap < 1:
            common.die("--compare takes two evaluation folders, OUT_A OUT_B, and --bootstrap >= 1")
        return compare_runs(Path(args.compare[0]), Path(args.compare[1]), args.bootstrap, args.bootstrap_seed,
                            Path(args.out) if args.out else None)
    if args.predictions:
        return recompute(args)
    check_args(args)

    import torch
    from accelerate import PartialState

    # Without an accelerator, accelerate sets up torchrun's processes (gloo) only when told it runs on CPU.
    state = PartialState(cpu=not torch.cuda.is_available())
    out = Path(args.out)
    if state.is_main_process:
        common.check_writable(out)
    with common.output_lock(out) if state.is_main_process else contextlib.nullcontext():  # one lock per run
        return run(args, state, out)


def run(args: Args, state, out: Path) -> Optional[dict]:
    """The run: inputs checked, the model loaded, only then the settings recorded; score, merge, report."""
    import torch

    jobs = (load_benchmarks(args.bench, parse_split(args.split), args.lower_better, args.strict,
                            state.is_main_process, args.allow_outside_root) if args.bench
            else {IMAGES: load_images(args.images, args.allow_outside_root)})
    preset = prompts.get_preset(args.prompt)
    config = merged_config(out, run_settings(args, preset, jobs), run_setup(args, preset, jobs, state.num_processes))
    torch.manual_seed(args.seed + state.process_index)
    model, processor = load_model(args, state.device)
    if state.is_main_process:
        common.record_settings(out / "eval_config.json", **config)
    state.wait_for_everyone()
    start = time.time()
    predictions = score_jobs(state, model, processor, preset, args, out, jobs)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    print(f"scored in {time.time() - start:.1f}s on {state.num_processes} process(es)", file=sys.stderr)
    if args.images:
        return write_image_summary(out, config, predictions[IMAGES])
    return write_summary(out, config, predictions, config["lower_better"], args.bootstrap, args.bootstrap_seed)


if __name__ == "__main__":
    common.run_main(main)
