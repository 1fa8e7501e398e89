"""Score IQA benchmarks with a VLM and report SRCC / KRCC / PLCC against the human MOS.

Every benchmark image gets the score prompt; the number in the answer is its predicted quality. Single process:

    python evaluate.py --model ByteDance/EvoQuality --out runs/eval \
        --bench koniq=meta_info_KonIQ10kDataset.csv@data/koniq10k/1024x768 --split split=test \
        --bench csiq=meta_info_CSIQDataset.csv@data/CSIQ/dst_imgs --lower-better csiq \
        --bench demo=demo/bench/labels.jsonl

Several GPUs (the images are sharded across processes; the main process merges the shards and reports):

    accelerate launch --num_processes 8 evaluate.py --model ... --bench ... --out runs/eval

Recompute the metrics from the saved predictions, with no model:

    python evaluate.py --predictions runs/eval

--bench NAME=FILE[@IMAGE_ROOT] (repeatable). FILE is auto-detected as one of
  - plain JSONL: {"image": "relative/path.jpg", "mos": 3.42} per line;
  - pyiqa meta-info CSV: an image column (name, dist_name, img_name, image_name or image), a MOS column (mos or dmos),
    other columns (std, split, ...) ignored unless `--split COLUMN=VALUE` selects rows by one of them;
  - VisualQuality-R1 JSONL: {"image": ["x.png"], "conversations": [..., {"from": "gpt", "value": 4.63}]}.
Image paths are relative to IMAGE_ROOT, by default FILE's folder. `--lower-better NAME` flips a DMOS benchmark.

`--samples 1` (default) decodes greedily (deterministic); `--samples N` samples N answers at `--temperature` and the
image's score is the mean of its valid ones. Unparseable answers are never replaced by a guess: an image with no valid
answer is left out of the correlations and counted in `coverage`.

Outputs in --out: predictions_NAME.jsonl (one line per benchmark image, in benchmark order:
{"image", "mos", "score", "n_valid", "scores", "answers"}, plus "error" for a missing or unreadable image),
eval_config.json (the setup; a rerun with a different one is refused), summary.json, summary.md (also printed).
Rerunning the same command resumes: scored images are kept, nothing is scored twice; a kill corrupts nothing.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import optimize, stats

import common


@dataclass
class Args:
    model: str = common.arg("", help="checkpoint folder or hub id, e.g. ByteDance/EvoQuality")
    bench: list[str] = common.arg([], help="NAME=FILE[@IMAGE_ROOT]; repeat the flag or list several")
    out: str = common.arg("", help="output folder for predictions and summaries")
    predictions: str = common.arg("", help="recompute metrics from the predictions in this folder (no model)")
    prompt: str = common.arg("evoquality", help="prompt preset", choices=sorted(common.PRESETS))
    reasoning: bool = common.arg(True, help="ask for <think> reasoning before the answer (the presets' default)")
    samples: int = common.arg(1, help="answers per image: 1 = greedy; N > 1 = sampled, valid ones averaged")
    temperature: float = common.arg(1.0, help="sampling temperature (used only when --samples > 1)")
    max_new_tokens: int = common.arg(512, help="generation budget per answer")
    batch_size: int = common.arg(8, help="images per generate call, per process")
    max_pixels: Optional[int] = common.arg(None, help="cap on image pixels for the processor (default: the model's)")
    lower_better: list[str] = common.arg([], help="benchmark names whose labels are lower-is-better (DMOS)")
    split: str = common.arg("", help="COLUMN=VALUE: keep only benchmark rows whose COLUMN equals VALUE")
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
    """n, coverage, missing and every metric of one benchmark's predictions (MOS negated for lower-is-better)."""
    valid = [r for r in records if r.get("score") is not None]
    missing = [r["image"] for r in records if r.get("error")]
    out = {"n": len(records), "n_valid": len(valid), "coverage": len(valid) / len(records) if records else math.nan,
           "missing": len(missing), "missing_images": missing, "lower_better": lower_better}
    pred = np.array([r["score"] for r in valid], dtype=float)
    mos = np.array([r["mos"] for r in valid], dtype=float) * (-1.0 if lower_better else 1.0)
    if len(valid) < 3:
        warnings.warn(f"{name}: only {len(valid)} valid predictions (need >= 3); its metrics are NaN")
        return {**out, **{key: math.nan for key in METRICS}}
    return {**out, **{key: f(pred, mos) for key, f in METRICS.items()}}


def aggregate(benchmarks: dict[str, dict]) -> tuple[dict, dict]:
    """(wavg weighted by image count, the paper's WAVG; plain mean over benchmarks) of coverage and each metric.
    A NaN metric in any benchmark makes its aggregate NaN: hiding a broken benchmark would flatter the average."""
    keys = ["coverage", *METRICS]
    weights = np.array([b["n"] for b in benchmarks.values()], dtype=float)
    wavg, mean = {}, {}
    for key in keys:
        values = np.array([b[key] for b in benchmarks.values()], dtype=float)
        wavg[key] = float(np.sum(weights * values) / weights.sum()) if weights.sum() else math.nan
        mean[key] = float(values.mean()) if values.size else math.nan
    return wavg, mean


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: scoring (one generate call per batch of images; N answers per image)
# ---------------------------------------------------------------------------------------------------------------------


def generate_answers(model, processor, images: list, prompt: str, preset: common.Preset, generation_config,
                     samples: int) -> list[list[str]]:
    """`samples` answer texts for each image, from one batched, left-padded generate call."""
    import torch

    inputs = common.encode_batch(processor, [prompt] * len(images), [[image] for image in images],
                                 add_vision_id=preset.add_vision_id).to(model.device)
    with torch.inference_mode():
        sequences = model.generate(**inputs, generation_config=generation_config)
    texts = common.completion_texts(processor, sequences, inputs["input_ids"].shape[1])
    return [texts[i * samples:(i + 1) * samples] for i in range(len(images))]  # generate groups each input's samples


def image_score(answers: list[str], preset: common.Preset) -> tuple[Optional[float], list[Optional[float]]]:
    """(mean of the valid parsed scores or None, every parsed score with None for the unparseable ones)."""
    scores = [common.parse_score(text, preset) for text in answers]
    valid = [s for s in scores if s is not None]
    return (sum(valid) / len(valid) if valid else None), scores


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: benchmark files
# ---------------------------------------------------------------------------------------------------------------------

IMAGE_COLUMNS = ("name", "dist_name", "img_name", "image_name", "image")
MOS_COLUMNS = ("mos", "dmos")
FORMATS_HELP = ('plain JSONL ({"image", "mos"} per line), VisualQuality-R1 JSONL ({"image", "conversations"}), or a '
                f"CSV with an image column ({', '.join(IMAGE_COLUMNS)}) and a MOS column ({', '.join(MOS_COLUMNS)})")


def to_mos(value, where: str) -> float:
    try:
        mos = float(value)  # VisualQuality-R1 files hold numbers, sometimes as strings
    except (TypeError, ValueError):
        raise ValueError(f"{where}: MOS {value!r} is not a number") from None
    if not math.isfinite(mos) or isinstance(value, bool):
        raise ValueError(f"{where}: MOS {value!r} is not a finite number")
    return mos


def read_benchmark(path: Path, split: Optional[tuple[str, str]] = None) -> tuple[list[dict], bool, str]:
    """([{"image", "mos", "line"}] in file order, whether `split` applied, the label's field), format auto-detected.
    `split` = (column, value) keeps the rows whose column equals value, in files that have that column.
    Raises ValueError naming file:line on a bad row, a duplicate image, or an unknown format."""
    text = path.read_text(encoding="utf-8-sig")
    first = next((line for line in text.splitlines() if line.strip()), "")
    rows: list[tuple[int, dict, object, object]] = []  # (line, raw row, image, mos)
    label = "mos"
    if first.lstrip().startswith("{"):
        for lineno, record in common.read_jsonl(path, with_lineno=True):
            image = record.get("image")
            image = image[0] if isinstance(image, list) and len(image) == 1 else image
            if "conversations" in record:  # VisualQuality-R1: the MOS is the last gpt turn
                turns = record["conversations"] if isinstance(record["conversations"], list) else []
                answers = [t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"]
                mos, label = (answers[-1] if answers else None), "conversations"
            elif "mos" in record:
                mos = record["mos"]
            else:
                raise ValueError(f"{path}:{lineno}: no 'mos' or 'conversations' field; expected {FORMATS_HELP}")
            rows.append((lineno, record, image, mos))
    else:
        reader = csv.DictReader(io.StringIO(text))
        fields = reader.fieldnames or []
        image_col = next((c for c in IMAGE_COLUMNS if c in fields), None)
        mos_col = next((c for c in MOS_COLUMNS if c in fields), None)
        if not (image_col and mos_col):
            raise ValueError(f"{path}: unrecognised benchmark file (starts {first[:60]!r}); expected {FORMATS_HELP}")
        label = mos_col
        for row in reader:
            rows.append((reader.line_num, row, row.get(image_col), row.get(mos_col)))
    applied = split is not None and any(split[0] in row for _, row, _, _ in rows)
    entries, seen = [], {}
    for lineno, row, image, mos in rows:
        if applied and str(row.get(split[0])) != split[1]:
            continue
        if not isinstance(image, str) or not image.strip():
            raise ValueError(f"{path}:{lineno}: no image path")
        if image in seen:
            raise ValueError(f"{path}:{seen[image]} and {path}:{lineno}: image {image} is listed twice")
        seen[image] = lineno
        entries.append({"image": image, "mos": to_mos(mos, f"{path}:{lineno}"), "line": lineno})
    return entries, applied, label


def parse_bench_spec(spec: str) -> tuple[str, Path, Path]:
    """NAME=FILE[@IMAGE_ROOT] -> (name, file, image root, by default the file's folder)."""
    name, eq, rest = spec.partition("=")
    if not eq or not rest:
        common.die(f"--bench {spec!r}: expected NAME=FILE[@IMAGE_ROOT]")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        common.die(f"--bench {spec!r}: NAME may use letters, digits, '_' and '-' only (it names output files)")
    file, at, root = rest.rpartition("@") if "@" in rest else (rest, "", "")
    file = Path(file)
    if not file.is_file():
        common.die(f"--bench {name}: benchmark file {file} not found")
    root = Path(root) if root else file.parent
    if not root.is_dir():
        common.die(f"--bench {name}: image root {root} is not a folder")
    return name, file, root


def load_benchmarks(args: Args, split: Optional[tuple[str, str]], talk: bool) -> dict[str, tuple[Path, Path, list]]:
    """name -> (file, image root, entries) for every --bench; dies on bad files, warns about missing images."""
    benchmarks, applied = {}, []
    specs = [parse_bench_spec(spec) for spec in args.bench]
    for name, file, root in specs:
        try:
            entries, split_applied, label = read_benchmark(file, split)
        except ValueError as e:
            common.die(str(e))
        if not entries:
            common.die(f"{name}: {file} lists no images" + (f" with {args.split}" if split_applied else ""))
        missing = [e["image"] for e in entries if not (root / e["image"]).is_file()]
        if len(missing) == len(entries):
            common.die(f"{name}: none of its {len(entries)} images is under {root} (e.g. {root / missing[0]}); "
                       "give the image folder as NAME=FILE@IMAGE_ROOT")
        if missing and args.strict:
            common.die(f"{name}: {len(missing)} images missing under {root}, e.g. {missing[:3]} (--strict)")
        if missing and talk:
            warnings.warn(f"{name}: {len(missing)} of {len(entries)} images are missing under {root}; "
                          "they are excluded and listed in summary.json")
        if label == "dmos" and name not in args.lower_better and talk:
            warnings.warn(f"{name}: its label column is 'dmos'; pass --lower-better {name} if lower is better")
        benchmarks[name] = (file, root, entries)
        applied.append(split_applied)
    if split is not None:
        if not any(applied):
            common.die(f"--split {args.split}: no benchmark has a column {split[0]!r}")
        for (name, _, _), used in zip(specs, applied):
            if not used and talk:
                print(f"note: {name} has no column {split[0]!r}; --split does not apply to it", file=sys.stderr)
    return benchmarks


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: prediction files (per-process shards, merged in benchmark order by the main process)
# ---------------------------------------------------------------------------------------------------------------------


def predictions_path(out: Path, name: str) -> Path:
    return out / f"predictions_{name}.jsonl"


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
    """Write predictions_NAME.jsonl with exactly one record per benchmark entry (atomically), drop the shards."""
    saved, final = read_predictions(out, name), predictions_path(out, name)
    records = []
    for entry in entries:
        if entry["image"] not in saved:
            raise RuntimeError(f"{name}: no prediction for {entry['image']} after scoring (a process failed?)")
        records.append({**saved[entry["image"]], "mos": entry["mos"]})  # the MOS as the benchmark file has it now
    common.write_jsonl_atomic(final, records)
    for part in out.glob(final.name + ".part*"):
        part.unlink()
    return records


def score_benchmark(model, processor, preset: common.Preset, prompt: str, generation_config, args: Args,
                    root: Path, entries: list[dict], part: Path, show_progress: bool) -> None:
    """Score `entries` (this process's shard) in batches, one flushed line per image in `part`."""
    from tqdm import tqdm

    batches = [entries[i:i + args.batch_size] for i in range(0, len(entries), args.batch_size)]
    with common.JsonlWriter(part) as writer:
        for batch in tqdm(batches, desc=part.name, disable=not show_progress):
            images, loaded = [], []
            for entry in batch:
                base = {"image": entry["image"], "mos": entry["mos"], "score": None, "n_valid": 0}
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
            for base, answers in zip(loaded, generate_answers(model, processor, images, prompt, preset,
                                                              generation_config, args.samples)):
                score, scores = image_score(answers, preset)
                writer.write({**base, "score": score, "n_valid": sum(s is not None for s in scores), "scores": scores,
                              **({"answers": answers} if args.text else {})})


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: reports
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
    columns = [("coverage", "coverage"), ("srcc", "SRCC"), ("krcc", "KRCC"), ("plcc", "PLCC"),
               ("plcc_logistic", "PLCC (logistic)"), ("rmse_logistic", "RMSE (logistic)")]
    total = sum(b["n"] for b in benchmarks.values())
    lines = ["| benchmark | n | " + " | ".join(title for _, title in columns) + " |",
             "|---|--:|" + "--:|" * len(columns)]
    rows = [(name, b["n"], b) for name, b in benchmarks.items()] + [("WAVG", total, wavg), ("mean", total, mean)]
    for name, n, values in rows:
        cells = [f"{values[key]:.3f}" if math.isfinite(values[key]) else "nan" for key, _ in columns]
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(out: Path, setup: dict, predictions: dict[str, list[dict]], lower_better: list[str]) -> dict:
    benchmarks = {name: benchmark_metrics(name, records, name in lower_better) for name, records in predictions.items()}
    wavg, mean = aggregate(benchmarks)
    summary = {**setup, "lower_better": lower_better, "benchmarks": benchmarks, "wavg": wavg, "mean": mean}
    common.write_json_atomic(out / "summary.json", json_safe(summary))
    table = markdown_table(benchmarks, wavg, mean)
    header = f"model: {setup.get('model')}, prompt: {setup.get('prompt')} ({setup.get('prompt_hash')})\n\n"
    (out / "summary.md").write_text(header + table, encoding="utf-8")
    print(table, end="")
    return summary


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

SETUP_KEYS = ("model", "prompt", "prompt_hash", "reasoning", "samples", "temperature", "max_new_tokens", "max_pixels")


def main(argv: Optional[list[str]] = None) -> Optional[dict]:
    args = common.parse_args(Args, argv)
    if args.predictions:
        return recompute(args)
    if not (args.model and args.bench and args.out):
        common.die("--model, --bench and --out are required (or --predictions DIR to recompute metrics)")
    if args.samples < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        common.die("--samples, --batch-size and --max-new-tokens must be >= 1")
    if args.samples > 1 and args.temperature <= 0:
        common.die("--samples > 1 needs --temperature > 0 (use --samples 1 for greedy decoding)")
    split = tuple(args.split.split("=", 1)) if args.split else None
    if split is not None and (len(split) != 2 or not split[0]):
        common.die(f"--split {args.split!r}: expected COLUMN=VALUE")
    names = [parse_bench_spec(spec)[0] for spec in args.bench]
    if len(set(names)) != len(names):
        common.die(f"--bench: a benchmark name is used twice: {names}")
    unknown = sorted(set(args.lower_better) - set(names))
    if unknown:
        common.die(f"--lower-better {unknown}: not among the --bench names {names}")

    import torch
    from accelerate import PartialState

    # Without an accelerator, accelerate sets up torchrun's processes (gloo) only when told it runs on CPU.
    state = PartialState(cpu=not torch.cuda.is_available())  # as the other stages: torchrun on CPU needs cpu=True
    out = Path(args.out)
    benchmarks = load_benchmarks(args, split, state.is_main_process)
    preset = common.get_preset(args.prompt)
    model_id = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    setup = {"model": model_id, "prompt": preset.name, "prompt_hash": preset.hash(), "reasoning": args.reasoning,
             "samples": args.samples, "temperature": args.temperature if args.samples > 1 else None,
             "max_new_tokens": args.max_new_tokens, "max_pixels": args.max_pixels,
             "decoding": "greedy" if args.samples == 1 else f"sampled, top_k=0, top_p=1, seed {args.seed}",
             "batch_size": args.batch_size, "split": args.split or None, "num_processes": state.num_processes,
             "sources": {name: {"file": str(file.resolve()), "image_root": str(root.resolve())}
                         for name, (file, root, _) in benchmarks.items()},
             "lower_better": args.lower_better, "package_versions": common.package_versions(), "argv": sys.argv}
    config_path = out / "eval_config.json"
    if config_path.exists():  # every process checks, so that every process stops
        saved = json.loads(config_path.read_text())
        changed = [k for k in SETUP_KEYS if saved.get(k) != setup[k]]
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {setup[k]!r}" for k in changed)
            common.die(f"{out} holds predictions made with other settings ({diffs}); use another --out")
    state.wait_for_everyone()
    if state.is_main_process:
        common.write_json_atomic(config_path, setup)

    torch.manual_seed(args.seed + state.process_index)
    model = common.load_model(args.model, device=state.device).eval()
    processor = common.load_processor(args.model, max_pixels=args.max_pixels)
    generation_config = common.sampling_config(model, args.max_new_tokens, args.temperature, do_sample=args.samples > 1,
                                               num_return_sequences=args.samples)
    prompt = preset.prompt("score", args.reasoning)

    start, predictions = time.time(), {}
    for name, (file, root, entries) in benchmarks.items():
        try:
            saved = read_predictions(out, name)
        except ValueError as e:
            common.die(str(e))
        todo = [e for e in entries if e["image"] not in saved or saved[e["image"]].get("error")]
        state.wait_for_everyone()  # every process has read the same files before anyone appends to them
        mine = todo[state.process_index::state.num_processes]
        if state.is_main_process:
            print(f"{name}: {len(entries)} images, {len(entries) - len(todo)} already scored, {len(todo)} to score",
                  file=sys.stderr)
        if mine:
            part = out / f"{predictions_path(out, name).name}.part{state.process_index}"
            score_benchmark(model, processor, preset, prompt, generation_config, args, root, mine, part,
                            state.is_main_process)
        state.wait_for_everyone()
        if state.is_main_process:
            predictions[name] = merge_predictions(out, name, entries)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    print(f"scored in {time.time() - start:.1f}s on {state.num_processes} process(es)", file=sys.stderr)
    return write_summary(out, setup, predictions, args.lower_better)


if __name__ == "__main__":
    main()
