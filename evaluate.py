"""Stage 4 of a round, the evaluation (paper: Experiments: SRCC / KRCC / PLCC against the human MOS, WAVG over
benchmarks weighted by image count): the model scores every image of IQA benchmarks with the score prompt, and the
scores are correlated with the MOS (metrics.py). Or it scores any images, with no metrics.

One process, on the folders the benchmarks' releases unpack to (the layout is recognised by its files; benchmarks.py):

    python evaluate.py --model ByteDance/EvoQuality --bench koniq=/data/koniq10k --split set=test --out runs/eval

Several processes (the images are sharded across them; the main process merges and reports):

    accelerate launch --num_processes 8 evaluate.py --model ... --bench ... --out runs/eval

The paper's eight benchmarks:

    accelerate launch --num_processes 8 evaluate.py --model ByteDance/EvoQuality --out runs/eval --split set=test \
        --bench koniq=/data/koniq10k spaq=/data/SPAQ agiqa=/data/AGIQA-3K livew=/data/ChallengeDB_release \
                kadid=/data/kadid10k pipal=/data/PIPAL tid2013=/data/tid2013 csiq=/data/CSIQ

    python evaluate.py --model ByteDance/EvoQuality --images /data/photos --out runs/scores   # any images, no metrics

Writes in --out: predictions_NAME.jsonl (one line per image), eval_config.json, summary.json and summary.md with 95 %
bootstrap intervals (docs/metrics.md). Rerun the same command to resume; report.py recomputes or compares reports.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import common
import metrics
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
    prompt: str = common.arg("evoquality", help="prompt preset", choices=sorted(prompts.PRESETS))
    reasoning: bool = common.arg(True, help="ask for reasoning before the boxed answer (the presets' default)")
    samples: int = common.arg(1, help="answers per image: 1 = greedy; N > 1 = sampled, valid ones averaged")
    temperature: float = common.arg(1.0, help="sampling temperature (used only when --samples > 1)")
    max_new_tokens: int = common.arg(512, help="generation budget per answer; an answer cut off here is unparseable")
    # bench/memory_plan.py --evaluation at 7B, 1024x768 images, every answer run to 512 tokens: greedy, each sequence
    # its own prompt, at most 253 fit one 80 GiB GPU (the prefill of 253 prompts is the peak); 128 peak at 50 GiB
    batch_size: int = common.arg(128, help="sequences per sampling call and process (images x --samples, an image's "
                                           "samples split over calls if more); 128 fits 7B on one 80 GB GPU with 30 "
                                           "GiB to spare (bench/memory_plan.py --evaluation). Scores do not depend "
                                           "on it")
    max_pixels: Optional[int] = common.arg(None, help="cap on image pixels for the processor (default: the model's)")
    lower_better: list[str] = common.arg([], help="names of --bench files (not known releases) whose labels are "
                                                  "lower-is-better")
    split: str = common.arg("", help="COLUMN=VALUE: keep only benchmark rows whose COLUMN equals VALUE, e.g. set=test")
    text: bool = common.arg(True, help="keep the answer texts in the predictions (--no-text drops them)")
    strict: bool = common.arg(False, help="stop on a missing or unreadable image instead of counting it")
    seed: int = common.arg(0, help="seed of the sampling noise (--samples > 1): sample k of an image draws from (seed, "
                                   "image name, k) alone")
    bootstrap: int = common.arg(1000, help="resamples of the images for the 95 %% intervals (0: no intervals; at most "
                                          f"{metrics.MAX_RESAMPLES:,})")
    bootstrap_seed: int = common.arg(0, help="seed of the bootstrap resamples")
    allow_outside_root: bool = common.arg(False, help="accept absolute or '..' image names in label files and lists")


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: scoring (one sampling call per batch of images; N answers per image; truncated = unparseable)
# ---------------------------------------------------------------------------------------------------------------------


def sample_answers(model, processor, images: list, names: list[str], prompt: str, preset: prompts.Preset,
                   args: Args) -> list[list[sampling.Completion]]:
    """`args.samples` completions for each image (greedy for --samples 1), each with its truncation flag, in calls of
    at most --batch-size sequences. Sample k of an image is keyed to (--seed, its name, k): the same whatever batch,
    process or resume it is drawn in."""
    def sample_call(idx: list[int], n: int, firsts: list[int]) -> list[list[sampling.Completion]]:
        inputs = common.encode_batch(processor, [prompt] * len(idx), [[images[i]] for i in idx],
                                     add_vision_id=preset.add_vision_id).to(model.device)
        return sampling.sample(model, processor, inputs, n, args.max_new_tokens, args.temperature,
                               do_sample=args.samples > 1, keys=[sampling.prompt_key(names[i]) for i in idx],
                               seed=args.seed, first_index=firsts).completions()

    return sampling.sample_in_calls([args.samples] * len(images), args.batch_size, sample_call)


def image_score(completions: list[sampling.Completion], preset: prompts.Preset
                ) -> tuple[Optional[float], list[Optional[float]]]:
    """(mean of the valid parsed scores or None, every parsed score with None for the unparseable ones).
    A truncated answer is unparseable (sampling.answer), even when its text holds a closed box."""
    scores = [sampling.answer(c, lambda text: prompts.parse_score(text, preset)) for c in completions]
    valid = [s for s in scores if s is not None]
    return (sum(valid) / len(valid) if valid else None), scores


def score_entries(model, processor, preset: prompts.Preset, prompt: str, args: Args, root: Path, entries: list[dict],
                  part: Path, show_progress: bool) -> None:
    """Score `entries` (this process's shard) in batches of --batch-size sequences, one flushed line per image in
    `part`, with the image's [size, mtime] as it was read (`file`): an image changed in place since is scored again."""
    from tqdm import tqdm

    per_batch = max(1, args.batch_size // args.samples)
    batches = [entries[i:i + per_batch] for i in range(0, len(entries), per_batch)]
    with common.JsonlWriter(part) as writer:
        for batch in tqdm(batches, desc=part.name, disable=not show_progress):
            images, names, loaded = [], [], []
            for entry in batch:
                base = {"image": entry["image"], **({"mos": entry["mos"]} if "mos" in entry else {}), "score": None,
                        "n_valid": 0, "file": file_stat(root / entry["image"])}
                if base["file"] is None:
                    writer.write({**base, "error": "missing file"})
                    continue
                try:
                    images.append(common.load_image(root / entry["image"]))
                    names.append(entry["image"])
                    loaded.append(base)
                except ValueError as e:
                    if args.strict:
                        common.die(f"{e} (--strict)")
                    writer.write({**base, "error": str(e)})
            if not images:
                continue
            for base, completions in zip(loaded, sample_answers(model, processor, images, names, prompt, preset,
                                                                args)):
                score, scores = image_score(completions, preset)
                writer.write({**base, "score": score, "n_valid": sum(s is not None for s in scores), "scores": scores,
                              "truncated": [c.truncated for c in completions],
                              **({"answers": [c.text for c in completions]} if args.text else {})})


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: reading and validation (the benchmark files themselves: benchmarks.py)
# ---------------------------------------------------------------------------------------------------------------------


def check_args(args: Args) -> None:
    if not (args.model and args.out and (args.bench or args.images)):
        common.die("--model, --out and --bench (or --images) are required (report.py recomputes a finished "
                   "evaluation's metrics)")
    if args.bench and args.images:
        common.die("--bench and --images are separate runs (the second has no metrics): give one of them")
    if args.images and (args.split or args.lower_better):
        common.die("--split and --lower-better apply to --bench runs only")
    if args.samples < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        common.die("--samples, --batch-size and --max-new-tokens must be >= 1")
    if args.samples > 1 and not args.temperature > 0:
        common.die("--samples > 1 needs --temperature > 0 (use --samples 1 for greedy decoding)")
    metrics.check_resamples(args.bootstrap)


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


def load_model(args: Args, device):
    """(model, processor); a model that fails to load is one line naming it."""
    try:
        return (common.load_model(args.model, device=device).eval(),
                common.load_processor(args.model, max_pixels=args.max_pixels))
    except Exception as e:  # a broken folder raises OSError, ValueError, KeyError, ... depending on what is wrong
        first = (str(e).splitlines() or [""])[0]
        common.die(f"--model {args.model}: cannot load it ({type(e).__name__}: {first}); give a checkpoint folder or "
                   "hub id")


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: resume and output (per-process shards, merged in benchmark order by the main process)
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


def write_image_summary(out: Path, setup: dict, records: list[dict]) -> dict:
    """--images: how many were scored, which could not be read and why, the truncation rate; no metrics."""
    answers = [t for r in records for t in r.get("truncated", [])]
    unreadable = [{"image": r["image"], "error": r["error"]} for r in records if r.get("error")]
    scored = sum(r.get("score") is not None for r in records)
    images = {"n": len(records), "n_scored": scored, "coverage": scored / len(records), "n_unreadable": len(unreadable),
              "unreadable": unreadable, "truncation_rate": sum(answers) / len(answers) if answers else math.nan}
    summary = {**setup, "images": images}
    common.write_json_atomic(out / "summary.json", metrics.json_safe(summary))
    lines = [f"{len(records)} images: {scored} scored, {len(records) - scored - len(unreadable)} without a valid "
             f"answer, {len(unreadable)} unreadable; truncated answers {images['truncation_rate']:.3f}"]
    lines += [f"unreadable: {u['image']}: {u['error']}" for u in unreadable]
    common.write_lines_atomic(out / "summary.md", ["\n".join(lines) + "\n"])
    print("\n".join(lines))
    return summary


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: the run
# ---------------------------------------------------------------------------------------------------------------------


def run(args: Args, state, out: Path) -> Optional[dict]:
    """The run: inputs checked, the model loaded, only then the settings recorded; score, merge, report."""
    jobs = (load_benchmarks(args.bench, parse_split(args.split), args.lower_better, args.strict,
                            state.is_main_process, args.allow_outside_root) if args.bench
            else {IMAGES: load_images(args.images, args.allow_outside_root)})
    preset = prompts.get_preset(args.prompt)
    config = merged_config(out, run_settings(args, preset, jobs), run_setup(args, preset, jobs, state.num_processes))
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
    return metrics.write_summary(out, config, predictions, config["lower_better"], args.bootstrap,
                                 args.bootstrap_seed)


def main(argv: Optional[list[str]] = None) -> Optional[dict]:
    args = common.parse_args(Args, argv)
    check_args(args)
    import torch
    from accelerate import PartialState

    # Without an accelerator, accelerate sets up torchrun's processes (gloo) only when told it runs on CPU.
    state = PartialState(cpu=not torch.cuda.is_available())
    out = Path(args.out)
    if state.is_main_process:
        common.check_writable(out)
    with common.output_lock(out) if state.is_main_process else contextlib.nullcontext():  # one lock for all processes
        return run(args, state, out)


if __name__ == "__main__":
    common.run_main(main)
