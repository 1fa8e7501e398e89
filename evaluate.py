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

`--samples 1` (default) decodes greedily (deterministic); `--samples N` samples N answers at `--temperature` and the
image's score is the mean of its valid ones. An answer cut off by `--max-new-tokens` is unparseable, whatever it
holds (sampling.answer). Unparseable answers are never replaced by a guess: an image with no valid answer is left out
of the correlations and counted in `coverage`; the share of truncated answers is reported per benchmark.

Outputs in --out: predictions_NAME.jsonl (one line per benchmark image, in benchmark order:
{"image", "mos", "score", "n_valid", "scores", "truncated", "answers"}, plus "error" for a missing or unreadable
image), or predictions.jsonl for --images; eval_config.json (the settings; a rerun that would change a result is
refused, naming each changed setting), summary.json, summary.md (also printed). Rerunning the same command resumes:
scored images are kept, nothing is scored twice; a kill corrupts nothing.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import optimize, stats

import common
import sampling
from benchmarks import IMAGES, Bench, label_identity, load_benchmarks, load_images, parse_split


@dataclass
class Args:
    model: str = common.arg("", help="checkpoint folder or hub id, e.g. ByteDance/EvoQuality")
    bench: list[str] = common.arg([], help="NAME=PATH[@IMAGE_FOLDER], PATH a dataset folder or label file; repeatable")
    images: str = common.arg("", help="score these images instead (a folder or a .txt/.jsonl list); no metrics")
    out: str = common.arg("", help="output folder for predictions and summaries")
    predictions: str = common.arg("", help="recompute metrics from the predictions in this folder (no model)")
    prompt: str = common.arg("evoquality", help="prompt preset", choices=sorted(common.PRESETS))
    reasoning: bool = common.arg(True, help="ask for reasoning before the boxed answer (the presets' default)")
    samples: int = common.arg(1, help="answers per image: 1 = greedy; N > 1 = sampled, valid ones averaged")
    temperature: float = common.arg(1.0, help="sampling temperature (used only when --samples > 1)")
    max_new_tokens: int = common.arg(512, help="generation budget per answer; an answer cut off here is unparseable")
    # 7B on one 80 GB GPU: bf16 weights ~16.6 GB; KV cache per token = 28 layers x 2 x 4 KV heads x 128 x 2 bytes
    # = 56 KiB, so a KonIQ-size image prompt (~1,000 tokens) + 512 new tokens is ~85 MB per sequence. 32 images x
    # 16 samples = 512 sequences ~ 44 GB of KV (each sample's cache is a copy of its prompt's, prefilled once) + the
    # weights ~ 61 GB, leaving room for the prefill activations and the vision tower. Lower it above --samples 16.
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


def fit_logistic(pred: np.ndarray, mos: np.ndarray) -> Optional[np.ndarray]:
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
            params, _ = optimize.curve_fit(logistic4, pred, mos, p0=p0, maxfev=10000)
    except (RuntimeError, ValueError, TypeError) as e:
        warnings.warn(f"logistic fit failed ({e}); PLCC/RMSE after the fit are NaN")
        return None
    if not np.all(np.isfinite(params)):
        warnings.warn("logistic fit returned non-finite parameters; PLCC/RMSE after the fit are NaN")
        return None
    return params


def plcc_logistic(pred: np.ndarray, mos: np.ndarray) -> float:
    params = fit_logistic(pred, mos)
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


def benchmark_metrics(name: str, records: list[dict], lower_better: bool) -> dict:
    """n, coverage, missing, truncation rate and every metric of one benchmark's predictions (MOS negated for
    lower-is-better)."""
    valid = [r for r in records if r.get("score") is not None]
    missing = [r["image"] for r in records if r.get("error")]
    answers = [t for r in records for t in r.get("truncated", [])]
    out = {"n": len(records), "n_valid": len(valid), "coverage": len(valid) / len(records) if records else math.nan,
           "missing": len(missing), "missing_images": missing, "lower_better": lower_better,
           "truncation_rate": sum(answers) / len(answers) if answers else math.nan}
    pred = np.array([r["score"] for r in valid], dtype=float)
    mos = np.array([r["mos"] for r in valid], dtype=float) * (-1.0 if lower_better else 1.0)
    if len(valid) < 3:
        warnings.warn(f"{name}: only {len(valid)} valid predictions (need >= 3); its metrics are NaN")
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
# ALGO LOGIC: scoring (one sampling call per batch of images; N answers per image; truncated = unparseable)
# ---------------------------------------------------------------------------------------------------------------------


def sample_answers(model, processor, images: list, prompt: str, preset: common.Preset, args: Args
                   ) -> list[list[sampling.Completion]]:
    """`args.samples` completions for each image, from one batched call of the shared sampling routine (greedy for
    --samples 1), each with its truncation flag."""
    inputs = common.encode_batch(processor, [prompt] * len(images), [[image] for image in images],
                                 add_vision_id=preset.add_vision_id).to(model.device)
    samples = sampling.sample(model, processor, inputs, n=args.samples, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, do_sample=args.samples > 1)
    return samples.completions()


def image_score(completions: list[sampling.Completion], preset: common.Preset
                ) -> tuple[Optional[float], list[Optional[float]]]:
    """(mean of the valid parsed scores or None, every parsed score with None for the unparseable ones).
    A truncated answer is unparseable (sampling.answer), even when its text holds a closed box."""
    scores = [sampling.answer(c, lambda text: common.parse_score(text, preset)) for c in completions]
    valid = [s for s in scores if s is not None]
    return (sum(valid) / len(valid) if valid else None), scores


def score_entries(model, processor, preset: common.Preset, prompt: str, args: Args, root: Path, entries: list[dict],
                  part: Path, show_progress: bool) -> None:
    """Score `entries` (this process's shard) in batches, one flushed line per image in `part`."""
    from tqdm import tqdm

    batches = [entries[i:i + args.batch_size] for i in range(0, len(entries), args.batch_size)]
    with common.JsonlWriter(part) as writer:
        for batch in tqdm(batches, desc=part.name, disable=not show_progress):
            images, loaded = [], []
            for entry in batch:
                base = {"image": entry["image"], **({"mos": entry["mos"]} if "mos" in entry else {}), "score": None,
                        "n_valid": 0}
                if not (root / entry["image"]).is_file():
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


def markdown_table(benchmarks: dict[str, dict], wavg: dict, mean: dict) -> str:
    columns = [("coverage", "coverage"), ("truncation_rate", "truncated"), ("srcc", "SRCC"), ("krcc", "KRCC"),
               ("plcc", "PLCC"), ("plcc_logistic", "PLCC (logistic)"), ("rmse_logistic", "RMSE (logistic)")]
    total = sum(b["n"] for b in benchmarks.values())
    lines = ["| benchmark | n | " + " | ".join(title for _, title in columns) + " |",
             "|---|--:|" + "--:|" * len(columns)]
    rows = [(name, b["n"], b) for name, b in benchmarks.items()] + [("WAVG", total, wavg), ("mean", total, mean)]
    for name, n, values in rows:
        cells = [f"{values[key]:.3f}" if math.isfinite(values.get(key, math.nan)) else "nan" for key, _ in columns]
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(out: Path, setup: dict, predictions: dict[str, list[dict]], lower_better: list[str]) -> dict:
    sources = setup.get("sources", {})
    benchmarks = {name: {**sources.get(name, {}), **benchmark_metrics(name, records, name in lower_better)}
                  for name, records in predictions.items()}
    wavg, mean = aggregate(benchmarks)
    summary = {**setup, "lower_better": lower_better, "benchmarks": benchmarks, "wavg": wavg, "mean": mean}
    common.write_json_atomic(out / "summary.json", json_safe(summary))
    table = markdown_table(benchmarks, wavg, mean)
    header = f"model: {setup.get('model')}, prompt: {setup.get('prompt')} ({setup.get('prompt_hash')})\n\n"
    (out / "summary.md").write_text(header + table, encoding="utf-8")
    print(table, end="")
    return summary


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


def read_predictions(out: Path, name: str) -> dict[str, dict]:
    """image -> its best saved record, from the merged file and any shards left by a killed run.
    A scored record beats an error record (a missing image may have been restored since)."""
    best: dict[str, dict] = {}
    final = predictions_path(out, name)
    for path in [final, *sorted(out.glob(final.name + ".part*"))]:
        for record in common.read_jsonl(path):
            if record["image"] not in best or (best[record["image"]].get("error") and not record.get("error")):
                best[record["image"]] = record
    return best


def merge_predictions(out: Path, name: str, entries: list[dict]) -> list[dict]:
    """Write the predictions file with exactly one record per entry (atomically), drop the shards."""
    saved, final = read_predictions(out, name), predictions_path(out, name)
    records = []
    for entry in entries:
        if entry["image"] not in saved:
            raise RuntimeError(f"{name}: no prediction for {entry['image']} after scoring (a process failed?)")
        mos = {"mos": entry["mos"]} if "mos" in entry else {}  # the MOS as the benchmark file has it now
        records.append({**saved[entry["image"]], **mos})
    common.write_jsonl_atomic(final, records)
    for part in out.glob(final.name + ".part*"):
        part.unlink()
    return records


def recompute(args: Args) -> dict:
    """--predictions DIR: metrics from the saved predictions_*.jsonl, setup and lower-better list from the run."""
    out = Path(args.predictions)
    files = sorted(out.glob("predictions_*.jsonl"))
    if not files:
        common.die(f"--predictions {out}: no predictions_*.jsonl files there")
    config = json.loads((out / "eval_config.json").read_text()) if (out / "eval_config.json").exists() else {}
    names = [f.name[len("predictions_"):-len(".jsonl")] for f in files]
    known = [n for n in config.get("sources", {}) if n in names]  # the live run's order first
    order = known + [n for n in names if n not in known]
    for name in order:
        if list(out.glob(predictions_path(out, name).name + ".part*")):
            warnings.warn(f"{name}: shard files of an unfinished run are ignored; rerun the evaluation to merge them")
    try:
        predictions = {name: common.read_jsonl(predictions_path(out, name)) for name in order}
    except ValueError as e:
        common.die(str(e))
    return write_summary(out, config, predictions, args.lower_better or config.get("lower_better", []))



# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: main
# ---------------------------------------------------------------------------------------------------------------------


def run_settings(args: Args, preset: common.Preset, jobs: dict[str, Bench]) -> dict:
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


def check_and_record(out: Path, args: Args, settings: dict, setup: dict, is_main: bool) -> dict:
    """Refuse a rerun whose settings would change a saved prediction (each changed setting named); a benchmark not
    in the earlier run is new, not changed. The main process then records the union."""
    path = out / "eval_config.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    before = saved.get("settings", {})
    compare = {k: v for k, v in settings.items() if not k.startswith("benchmark ") or k in before}
    common.refuse_changed_settings(path, compare, f"{out} (predictions)",
                                   f"use another --out, or the settings recorded in {path}")
    sources = setup.get("sources", {})
    earlier = [n for n in saved.get("lower_better", []) if n not in sources]  # this run decides for its own names
    config = {**saved, **setup, "settings": {**before, **settings}, "sources": {**saved.get("sources", {}), **sources},
              "lower_better": earlier + setup.get("lower_better", [])}
    if is_main:
        common.write_json_atomic(path, config)
    return config


def check_args(args: Args) -> None:
    if not (args.model and args.out and (args.bench or args.images)):
        common.die("--model, --out and --bench (or --images) are required (or --predictions DIR to recompute metrics)")
    if args.bench and args.images:
        common.die("--bench and --images are separate runs (the second has no metrics): give one of them")
    if args.images and (args.split or args.lower_better):
        common.die("--split and --lower-better apply to --bench runs only")
    if args.samples < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        common.die("--samples, --batch-size and --max-new-tokens must be >= 1")
    if args.samples > 1 and args.temperature <= 0:
        common.die("--samples > 1 needs --temperature > 0 (use --samples 1 for greedy decoding)")


def run_setup(args: Args, preset: common.Preset, jobs: dict[str, Bench], num_processes: int) -> dict:
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


def score_jobs(state, model, processor, preset: common.Preset, args: Args, out: Path, jobs: dict[str, Bench]
               ) -> dict[str, list[dict]]:
    """Each job's images not yet scored, sharded across processes; the main process merges and returns them."""
    prompt, predictions = preset.prompt("score", args.reasoning), {}
    for name, job in jobs.items():
        try:
            saved = read_predictions(out, name)
        except ValueError as e:
            common.die(str(e))
        todo = [e for e in job.entries if e["image"] not in saved or saved[e["image"]].get("error")]
        state.wait_for_everyone()  # every process has read the same files before anyone appends to them
        mine = todo[state.process_index::state.num_processes]
        if state.is_main_process:
            print(f"{name}: {len(job.entries)} images, {len(job.entries) - len(todo)} already scored, {len(todo)} "
                  "to score", file=sys.stderr)
        if mine:
            part = out / f"{predictions_path(out, name).name}.part{state.process_index}"
            score_entries(model, processor, preset, prompt, args, job.root, mine, part, state.is_main_process)
        state.wait_for_everyone()
        if state.is_main_process:
            predictions[name] = merge_predictions(out, name, job.entries)
    return predictions


def main(argv: Optional[list[str]] = None) -> Optional[dict]:
    args = common.parse_args(Args, argv)
    if args.predictions:
        return recompute(args)
    check_args(args)
    split = parse_split(args.split)

    import torch
    from accelerate import PartialState

    # Without an accelerator, accelerate sets up torchrun's processes (gloo) only when told it runs on CPU.
    state = PartialState(cpu=not torch.cuda.is_available())
    out = Path(args.out)
    jobs = (load_benchmarks(args.bench, split, args.lower_better, args.strict, state.is_main_process) if args.bench
            else {IMAGES: load_images(args.images)})
    preset = common.get_preset(args.prompt)
    setup = run_setup(args, preset, jobs, state.num_processes)
    config = check_and_record(out, args, run_settings(args, preset, jobs), setup, state.is_main_process)
    state.wait_for_everyone()

    torch.manual_seed(args.seed + state.process_index)
    model = common.load_model(args.model, device=state.device).eval()
    processor = common.load_processor(args.model, max_pixels=args.max_pixels)
    start = time.time()
    predictions = score_jobs(state, model, processor, preset, args, out, jobs)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    print(f"scored in {time.time() - start:.1f}s on {state.num_processes} process(es)", file=sys.stderr)
    if args.images:
        return write_image_summary(out, config, predictions[IMAGES])
    return write_summary(out, config, predictions, config["lower_better"])


if __name__ == "__main__":
    main()
