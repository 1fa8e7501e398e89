"""The CPU test bed's "base model": a tiny Qwen2.5-VL of the real architecture, given WEAK image-quality perception
by a supervised warm-start. It plays the role the pre-trained VLM plays in the paper.

It trains on the warm-start content set of fixtures/synthetic.py only (never the pool or benchmark seeds), in two
phases: an optional vision pre-training (`--vision-pretrain-steps`: a discarded linear readout of every image token
regresses the quality, as a real VLM's vision tower is pre-trained before it meets the language model), then both
tasks in the no-reasoning answer format of the `evoquality` preset (`\\boxed{0|1}`, `\\boxed{x.xx}`), with the prompts
built by `common.encode_batch` exactly as the stages build them. The compare task gets its own curriculum: easy
same-content pairs with large quality gaps first. With `--score-bias` the absolute score labels are miscalibrated by
content while the compare labels stay true (the premise of the paper). The shipped base's command:
demo/base/REPRODUCE.md.

The folder (model, processor, generation config, warmstart.json, heldout.json) is built once, under
runs/experiments/warmstart/base-<hash of the training settings>/ unless --out says otherwise, and reused when present.
Every build appends its settings and results to --record (default: beside the bases, under runs/; the record file of
the bases tried is experiments/warmstart_tried.jsonl, appended to only when named).

    python experiments/warmstart.py                           # build (or reuse) the base; prints its folder last
                                                              # (1500 steps: ~19 min at 0.75 s/step, 1 CPU thread)
    python experiments/warmstart.py --steps 40 --out /tmp/base --n-bench 24 --bench-pairs 24   # a quick try
    python experiments/warmstart.py --out DIR --measure-only  # (re)measure an existing folder on the held-out bench
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import prompts  # noqa: E402
from experiments import records  # noqa: E402
from fixtures.ground_truth import answers, srcc  # noqa: E402
from fixtures.synthetic import (CONTENTS, DISTORTIONS, SEED_BASE, distort, make_content, make_image,  # noqa: E402
                                synthetic_benchmark, world_images)
from fixtures.tiny_models import build_model, build_processor, build_tokenizer  # noqa: E402

CACHE = records.RUNS / "warmstart"
RECIPE_VERSION = 1  # bump when the training logic changes, so that old cached bases are not reused by mistake


@dataclass
class Args:
    out: str = common.arg("", help="checkpoint folder; default runs/experiments/warmstart/base-<settings hash>")
    steps: int = common.arg(1500, help="optimisation steps: the base is made weak by this budget, not by label noise")
    score_batch: int = common.arg(16, help="score examples (one image) per step")
    compare_batch: int = common.arg(16, help="compare examples (two images) per step")
    lr: float = common.arg(1e-3, help="peak AdamW learning rate of the language model")
    vision_lr: float = common.arg(3e-3, help="peak learning rate of the vision tower and merger")
    warmup_steps: int = common.arg(50, help="linear warm-up steps, then cosine decay to 0")
    compare_weight: float = common.arg(1.0, help="weight of the compare loss (each task's loss is a per-token mean)")
    curriculum_frac: float = common.arg(0.5, help="share of the steps over which compare pairs go from easy to final")
    same_content_final: float = common.arg(0.5, help="fraction of same-content compare pairs after the curriculum")
    n_images: int = common.arg(4000, help="warm-start images (seeds of the warm-start range only)")
    image_size: int = common.arg(112, help="side of the synthetic images in pixels")
    max_pixels: int = common.arg(112 * 112, help="processor max_pixels: a 112 px image gives 8x8 patches, 16 tokens")
    text_hidden: int = common.arg(128, help="language model hidden size")
    text_layers: int = common.arg(4, help="language model layers")
    vision_hidden: int = common.arg(64, help="vision tower hidden size")
    vision_depth: int = common.arg(2, help="vision tower layers")
    vocab_size: int = common.arg(600, help="BPE vocabulary size (before the special tokens)")
    seed: int = common.arg(0, help="seed of the weights, the batches and the curriculum")
    world: str = common.arg("mixed", choices=["mixed", "noise", "distortion"], help="synthetic world "
                            "(fixtures.synthetic): mixed, noise, or distortion (references and their variants)")
    variants: int = common.arg(4, help="distortion world: variants of each warm-start reference")
    same_reference_share: float = common.arg(0.5, help="distortion world: share of compare examples that are two "
                                                       "versions of one reference (the rest: half pairs of references, "
                                                       "half pairs of any two images of different references)")
    score_fidelity_power: float = common.arg(1.0, help="distortion world: the score labels see a variant's quality "
                                                       "as its reference's x SSIM^this (< 1: absolute scores under-"
                                                       "penalise synthetic distortions; compare labels stay true)")
    readout_fidelity: bool = common.arg(False, help="distortion world: the vision readout also regresses each "
                                                    "image's SSIM to its reference")
    gap_start: float = common.arg(1.0, help="distortion world: smallest quality gap of a compare pair at the start (it "
                                            "falls to 0 over curriculum_frac of the steps)")
    score_scale: float = common.arg(1.0, help="score label = 1 + score_scale * (quality - 1) + content bias, in [1, 5]")
    vision_scale: float = common.arg(1.0, help="multiply the merger's output layer at init (image tokens are 4-16 "
                                               "of a ~115-token prompt: a louder image signal)")
    score_bias: float = common.arg(0.0, help="content bias of the SCORE labels: 0 for smooth .. this for shapes "
                                               "(miscalibrated absolute scores; compare labels stay true)")
    compare_label_noise: float = common.arg(0.0, help="flip each compare label with this probability: single sampled "
                                                      "votes then err that often, as a VLM's do, while their majority "
                                                      "stays right")
    vision_pretrain_steps: int = common.arg(0, help="steps of vision-tower pre-training before the joint phase: a "
                                                    "linear readout of every image token regresses the quality")
    vision_aux_weight: float = common.arg(0.0, help="weight of that readout loss during the joint phase (score images)")
    vision_batch: int = common.arg(64, help="images per vision pre-training step")
    # not part of the cache key: measurement and bookkeeping
    n_bench: int = common.arg(200, help="held-out benchmark images (bench seed range) for the measurement")
    bench_pairs: int = common.arg(200, help="held-out benchmark pairs (different quality) for compare accuracy")
    eval_samples: int = common.arg(8, help="sampled answers per image / per pair order (temperature 1)")
    votes: int = common.arg(32, help="distortion world: sampled votes per held-out pair (K, half in each order)")
    bench_variants: int = common.arg(2, help="distortion world: variants per held-out reference (as the pool)")
    n_synthetic: int = common.arg(4, help="distortion world: pristine contents of the held-out synthetic benchmark")
    eval_every: int = common.arg(0, help="greedy held-out measurement every N steps during training (0: off)")
    log_every: int = common.arg(50, help="print the running losses every N steps")
    measure_only: bool = common.arg(False, help="only measure an existing --out folder on the held-out bench")
    force: bool = common.arg(False, help="rebuild even if the folder exists")
    record: str = common.arg(str(CACHE / "tried.jsonl"), help="append settings + results to this JSONL ('' to skip; "
                             "the record file: experiments/warmstart_tried.jsonl)")
    note: str = common.arg("", help="free text stored with the record (why this setting was tried)")


ADDED_LATER = {"world", "score_scale", "score_bias", "vision_scale", "vision_pretrain_steps", "vision_aux_weight",
               "vision_batch", "compare_label_noise", "variants", "same_reference_share", "score_fidelity_power",
               "readout_fidelity", "gap_start"}
NOT_IN_KEY = {"out", "n_bench", "bench_pairs", "eval_samples", "votes", "bench_variants", "n_synthetic", "eval_every",
              "log_every", "measure_only", "force", "record", "note"}


def settings_hash(args: Args) -> str:
    import hashlib

    defaults = Args()
    key = {k: v for k, v in dataclasses.asdict(args).items() if k not in NOT_IN_KEY
           and not (k in ADDED_LATER and v == getattr(defaults, k))}  # older bases keep their hash
    key["recipe_version"] = RECIPE_VERSION
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


# ALGO LOGIC: the warm-start data (warm-start seeds only) and the compare curriculum
def warmstart_set(n: int, size: int, world: str = "mixed") -> tuple[list[Image.Image], np.ndarray, list[str]]:
    """The first n images of the warm-start content set (the same ones fixtures.synthetic.write_set writes), their
    quality and their content kind."""
    images, quality, contents = [], [], []
    for i in range(n):
        img, record = make_image(SEED_BASE["warmstart"] + i, size, world)
        images.append(img)
        quality.append(record["mos"])
        contents.append(record["content"])
    return images, np.array(quality), contents


def score_label(quality: float, content: str, args: Args) -> float:
    """The warm-start's ABSOLUTE score label. With score_bias > 0 it is miscalibrated by content, as a VLM's absolute
    scores are (a smooth field and a shape drawing of equal quality get different labels), while every compare label
    follows the true quality: comparing is then easier than scoring, the premise of the paper."""
    bias = args.score_bias * CONTENTS.index(content) / (len(CONTENTS) - 1)
    return float(np.clip(1.0 + args.score_scale * (quality - 1.0) + bias, 1.0, 5.0))


def same_content_variant(seed: int, kind: str, level: int, size: int, world: str = "mixed") -> Image.Image:
    """The content of warm-start image `seed` (the same random draws as make_image) with one distortion at `level`:
    its quality is 5 - level, the same rule as fixtures.synthetic with a single distortion."""
    rng = np.random.default_rng(seed)
    img = make_content(rng, size, CONTENTS[rng.integers(len(CONTENTS))])
    if world == "noise":
        rng.integers(0, 5)  # make_image's level draw: the noise below is then make_image's noise
        kind = "noise"
    return distort(img, kind, level, rng)


def compare_example(rng: np.random.Generator, images: list[Image.Image], quality: np.ndarray, progress: float,
                    args: Args) -> tuple[list[Image.Image], int]:
    """One compare example ([first, second], index of the better one). Curriculum: at the start every pair is the same
    content with quality gap 4 (clean vs. level 4); over `curriculum_frac` of the steps the minimum gap falls to 1 and
    the share of same-content pairs to `same_content_final`; the rest are random warm-start pairs of unequal quality."""
    t = min(1.0, progress / max(args.curriculum_frac, 1e-9))
    if rng.random() < 1.0 - t * (1.0 - args.same_content_final):
        min_gap = int(round(4 - 3 * t))
        low = int(rng.integers(0, 5 - min_gap))  # the better image's distortion level
        high = int(rng.integers(low + min_gap, 5))
        seed, kind = SEED_BASE["warmstart"] + int(rng.integers(len(images))), str(rng.choice(DISTORTIONS))
        better, worse = (same_content_variant(seed, kind, level, args.image_size, args.world) for level in (low, high))
    else:
        while True:
            i, j = rng.integers(len(images), size=2)
            if quality[i] != quality[j]:
                break
        better, worse = (images[i], images[j]) if quality[i] > quality[j] else (images[j], images[i])
    return ([better, worse], 0) if rng.random() < 0.5 else ([worse, better], 1)


def world_set(n: int, size: int, variants: int) -> tuple[list[Image.Image], np.ndarray, list[str], np.ndarray,
                                                         np.ndarray]:
    """The distortion world's warm-start set: n warm-start references, each followed by its variants
    (fixtures.synthetic.world_images, drawn as make_pool.py draws a pool), their quality, content kind, the index of
    each image's reference and its SSIM to it."""
    world = world_images("warmstart", n, size, variants)
    index = {r["image"]: k for k, (_, r) in enumerate(world)}
    reference_of = np.array([index[r["reference"]] for _, r in world])
    return [img for img, _ in world], np.array([r["mos"] for _, r in world]), [r["content"] for _, r in world], \
        reference_of, np.array([r["ssim"] for _, r in world])


def score_quality(quality: np.ndarray, reference_of: np.ndarray, fidelity: np.ndarray, power: float) -> np.ndarray:
    """The quality the score labels see in the distortion world: q(r) * max(0, SSIM)^power (power 1: the true one)."""
    return quality[reference_of] * np.maximum(fidelity, 0.0) ** power


def world_compare_example(rng: np.random.Generator, images: list[Image.Image], quality: np.ndarray,
                          reference_of: np.ndarray, progress: float, args: Args) -> tuple[list[Image.Image], int]:
    """One compare example of the distortion world ([first, second], index of the better one): two versions of one
    reference (share `same_reference_share`), else two references or two images of different references (half each);
    never of equal quality. Curriculum: the smallest quality gap falls from `gap_start` to 0 over `curriculum_frac` of
    the steps."""
    min_gap = args.gap_start * (1.0 - min(1.0, progress / max(args.curriculum_frac, 1e-9)))
    references = np.flatnonzero(reference_of == np.arange(len(images)))
    while True:
        u = rng.random()
        if u < args.same_reference_share:
            members = np.flatnonzero(reference_of == references[rng.integers(len(references))])
            i, j = rng.choice(members, 2, replace=False)
        elif u < (1 + args.same_reference_share) / 2:
            i, j = rng.choice(references, 2, replace=False)
        else:
            i, j = rng.integers(len(images), size=2)
            if reference_of[i] == reference_of[j]:
                continue
        if abs(quality[i] - quality[j]) > min_gap:
            break
    better, worse = (images[i], images[j]) if quality[i] > quality[j] else (images[j], images[i])
    return ([better, worse], 0) if rng.random() < 0.5 else ([worse, better], 1)


def noisy_label(target: int, rng: np.random.Generator, noise: float) -> int:
    """The compare label, flipped with probability `noise` (no draw at all when noise is 0: older bases keep their
    batches)."""
    return 1 - target if noise and rng.random() < noise else target


def training_batch(processor, preset: prompts.Preset, images: list[list[Image.Image]], tasks: list[str],
                   answers: list[str]) -> dict:
    """Model inputs + labels: the stages' exact prompt (common.encode_batch, left padded), then the answer and
    <|im_end|> (right padded). Labels are -100 everywhere but the answer tokens."""
    texts = [preset.prompt(task, reasoning=False) for task in tasks]
    batch = common.encode_batch(processor, texts, images, add_vision_id=preset.add_vision_id)
    tok = processor.tokenizer
    completions = [tok(answer + "<|im_end|>", add_special_tokens=False).input_ids for answer in answers]
    width = max(map(len, completions))
    ids = torch.full((len(completions), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, completion in enumerate(completions):
        ids[row, :len(completion)] = torch.tensor(completion)
        mask[row, :len(completion)] = 1
    prompt_len = batch["input_ids"].shape[1]
    batch["input_ids"] = torch.cat([batch["input_ids"], ids], 1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], mask], 1)
    if "mm_token_type_ids" in batch:  # transformers >= 5 builds the 3D positions from it: text is type 0
        batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(ids)], 1)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, prompt_len:] = ids.masked_fill(mask == 0, -100)
    batch["labels"] = labels
    return batch


def per_example_loss(model, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over each example's answer tokens, shape (batch,)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    answer = (labels != -100).float()
    return (nll * answer).sum(1) / answer.sum(1)


def readout_loss(model, head: torch.nn.Linear, processor, images: list[Image.Image], quality: np.ndarray,
                 fidelity: np.ndarray | None = None) -> torch.Tensor:
    """Vision pre-training, as a real VLM's vision tower is pre-trained before it meets the language model: a linear
    readout of EVERY image token (the merger's output, what the language model reads) regresses the image's quality
    (MSE on (quality - 3) / 2). Without it the tiny language model learns the answer format and the label marginal in
    ~60 steps and then ignores the image tokens (experiments/warmstart_tried.jsonl, diagnostic-compare-only-gap4).
    With `fidelity` (the distortion world's SSIM to the reference), a second output regresses (SSIM - .75) / .25 too:
    trained on the quality alone, the tower perceives the references' own degradation and hardly the variants'."""
    vision = processor.image_processor(images=images, return_tensors="pt")
    grid = vision["image_grid_thw"].to(model.device)
    tokens = model.model.get_image_features(vision["pixel_values"].to(model.device), grid).pooler_output
    per_image = torch.tensor([len(t) for t in tokens], device=model.device)
    target = (quality - 3.0) / 2.0
    if fidelity is not None:
        target = np.stack([target, (fidelity - 0.75) / 0.25], 1)
    target = torch.tensor(target, dtype=torch.float32, device=model.device).repeat_interleave(per_image, 0)
    return torch.nn.functional.mse_loss(head(torch.cat(tokens).float()).squeeze(-1), target)


def lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


# ALGO LOGIC: held-out measurement (benchmark seeds; used only to REPORT)
def measure(model, processor, preset: prompts.Preset, n_bench: int, n_pairs: int, samples: int, size: int = 112,
            seed: int = 0, world: str = "mixed") -> dict:
    """Score SRCC (greedy, one sampled answer, mean of `samples` sampled answers) on held-out benchmark images, and
    compare accuracy on held-out pairs of unequal quality shown in both orders (greedy, per sampled vote, and the
    majority of all sampled votes of a pair). Unparseable answers count as wrong, and as missing for the SRCC."""
    was_training = model.training
    model.eval()
    bench = [make_image(SEED_BASE["bench"] + i, size, world) for i in range(n_bench)]
    images, mos = [[img] for img, _ in bench], np.array([record["mos"] for _, record in bench])
    greedy = [prompts.parse_score(t[0], preset) for t in answers(model, processor, preset, "score", images, False)]
    result = {"n_bench": n_bench, "srcc_greedy": srcc(greedy, mos),
              "score_coverage_greedy": float(np.mean([g is not None for g in greedy])),
              "distinct_greedy_scores": len({g for g in greedy if g is not None})}
    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < n_pairs:
        i, j = (int(x) for x in rng.integers(n_bench, size=2))
        if mos[i] != mos[j]:
            pairs.append((i, j))
    shown = [[bench[i][0], bench[j][0]] for i, j in pairs] + [[bench[j][0], bench[i][0]] for i, j in pairs]
    truth = [0 if mos[i] > mos[j] else 1 for i, j in pairs] + [1 if mos[i] > mos[j] else 0 for i, j in pairs]
    choices = [prompts.parse_compare(t[0], preset) for t in answers(model, processor, preset, "compare", shown, False)]
    result.update(n_pairs=n_pairs, compare_acc_greedy=float(np.mean([c == y for c, y in zip(choices, truth)])),
                  compare_first_slot_rate_greedy=float(np.mean([c == 0 for c in choices if c is not None] or [0])),
                  compare_coverage_greedy=float(np.mean([c is not None for c in choices])))
    if samples:
        sampled = [[prompts.parse_score(t, preset) for t in texts]
                   for texts in answers(model, processor, preset, "score", images, True, samples)]
        means = [float(np.mean(v)) if (v := [s for s in row if s is not None]) else None for row in sampled]
        result.update(
            srcc_single=float(np.mean([srcc([row[k] for row in sampled], mos) for k in range(samples)])),
            srcc_mean_of_samples=srcc(means, mos),
            score_coverage_sampled=float(np.mean([s is not None for row in sampled for s in row])),
            within_image_score_std=float(np.mean([np.std(v) for row in sampled
                                                  if len(v := [s for s in row if s is not None]) > 1] or [0])))
        votes = [[prompts.parse_compare(t, preset) for t in texts]
                 for texts in answers(model, processor, preset, "compare", shown, True, samples)]
        correct = np.array([[v == y for v in row] for row, y in zip(votes, truth)], dtype=float)  # (2P, samples)
        per_pair = correct[:n_pairs].sum(1) + correct[n_pairs:].sum(1)  # votes for the better image, of 2*samples
        result.update(compare_acc_sampled_vote=float(correct.mean()),
                      compare_acc_majority=float(np.mean(np.where(per_pair == samples, 0.5, per_pair > samples))),
                      compare_coverage_sampled=float(np.mean([v is not None for row in votes for v in row])))
    model.train(was_training)
    return result


PAIR_KINDS = ("reference", "random", "same_reference")  # round 1's pairs; round 2's random and same-reference pairs


def world_pairs(records: list[dict], n: int, seed: int) -> dict[str, list[tuple[int, int]]]:
    """n held-out pairs of unequal quality of each kind, indices into `records` (world_images records): two
    references (round 1's pairs), two images of different references (round 2's random pairs), two versions of one
    reference (its same-reference pairs)."""
    rng = np.random.default_rng(seed)
    quality = [r["mos"] for r in records]
    references = [k for k, r in enumerate(records) if r["type"] is None]
    versions: dict[str, list[int]] = {}
    for k, r in enumerate(records):
        versions.setdefault(r["reference"], []).append(k)
    draw = {"reference": lambda: tuple(rng.choice(references, 2, replace=False)),
            "random": lambda: tuple(rng.choice(len(records), 2, replace=False)),
            "same_reference": lambda: tuple(rng.choice(versions[records[references[rng.integers(len(references))]]
                                                                ["image"]], 2, replace=False))}
    pairs = {}
    for kind in PAIR_KINDS:
        chosen: dict[tuple[int, int], None] = {}
        for _ in range(100 * n):
            i, j = (int(x) for x in draw[kind]())
            same = records[i]["reference"] == records[j]["reference"]
            if quality[i] != quality[j] and same == (kind == "same_reference") and (min(i, j), max(i, j)) not in chosen:
                chosen[min(i, j), max(i, j)] = None
            if len(chosen) == n:
                break
        pairs[kind] = list(chosen)
    return pairs


def pair_accuracy(right: np.ndarray) -> dict:
    """Mean and standard error of per-pair outcomes (1 right, .5 tie, 0 wrong)."""
    return {"accuracy": float(right.mean()), "se": float(right.std(ddof=1) / np.sqrt(len(right))) if len(right) > 1
            else None}


def premise_table(pairs: list[tuple[int, int]], quality: np.ndarray, votes_better: np.ndarray, votes_worse: np.ndarray,
                  single_right: np.ndarray, score_mean: list, score_first: list) -> dict:
    """One kind of pair: a single sampled vote, the majority of all K votes, the mean of the sampled scores and one
    sampled score, as accuracies over the pairs (ties and missing answers count half; an unparseable vote is wrong),
    and the premise margin (majority minus mean score) with its standard error over the pairs."""
    majority = np.where(votes_better == votes_worse, 0.5, (votes_better > votes_worse).astype(float))

    def ranked(values: list) -> np.ndarray:
        out = []
        for i, j in pairs:
            x, y = values[i], values[j]
            out.append(0.5 if x is None or y is None or x == y else float((x > y) == (quality[i] > quality[j])))
        return np.array(out)
    mean_score = ranked(score_mean)
    return {"pairs": len(pairs), "single_vote": pair_accuracy(single_right), "majority": pair_accuracy(majority),
            "score_mean": pair_accuracy(mean_score), "score_single": pair_accuracy(ranked(score_first)),
            "premise_margin": pair_accuracy(majority - mean_score)}


def measure_world(model, processor, preset: prompts.Preset, args: Args) -> dict:
    """The premise on held-out pool-like data of the distortion world (benchmark references with their variants,
    drawn as a pool's): for each kind of pair (`world_pairs`), the accuracy of one sampled vote, of the majority of
    `votes` sampled votes (half in each order) and of the model's own mean of `eval_samples` sampled scores; plus score
    SRCC on the references (authentic) and on a small synthetic benchmark, and greedy compare accuracy."""
    was_training = model.training
    model.eval()
    world = world_images("bench", args.n_bench, args.image_size, args.bench_variants)
    images, records = [img for img, _ in world], [r for _, r in world]
    quality = np.array([r["mos"] for r in records])
    pairs = world_pairs(records, args.bench_pairs, args.seed)
    result: dict = {"n_images": len(images), "votes": args.votes, "score_samples": args.eval_samples}
    for kind, chosen in pairs.items():
        shown = [[images[i], images[j]] for i, j in chosen] + [[images[j], images[i]] for i, j in chosen]
        better_slot = [0 if quality[i] > quality[j] else 1 for i, j in chosen]
        truth = better_slot + [1 - b for b in better_slot]
        greedy = [prompts.parse_compare(t[0], preset) for t in answers(model, processor, preset, "compare", shown,
                                                                          False)]
        row = {"greedy": float(np.mean([c == y for c, y in zip(greedy, truth)]))}
        if args.votes:
            sampled = answers(model, processor, preset, "compare", shown, True, max(1, args.votes // 2))
            choices = [[prompts.parse_compare(t, preset) for t in texts] for texts in sampled]
            right = np.array([[c == y for c in row_] for row_, y in zip(choices, truth)], dtype=float)
            wrong = np.array([[c is not None and c != y for c in row_] for row_, y in zip(choices, truth)], dtype=float)
            n = len(chosen)
            better, worse = right[:n].sum(1) + right[n:].sum(1), wrong[:n].sum(1) + wrong[n:].sum(1)
            row["better_worse"] = (better, worse, better / (2 * right.shape[1]))  # one vote: its expected accuracy
        result[kind] = row
    if not args.eval_samples:
        model.train(was_training)
        return result
    scores = [[prompts.parse_score(t, preset) for t in texts]
              for texts in answers(model, processor, preset, "score", [[im] for im in images], True, args.eval_samples)]
    means = [float(np.mean(v)) if (v := [x for x in row if x is not None]) else None for row in scores]
    firsts = [next((x for x in row if x is not None), None) for row in scores]
    for kind, chosen in pairs.items():
        row = result[kind]
        if "better_worse" in row:
            better, worse, single = row.pop("better_worse")
            row.update(premise_table(chosen, quality, better, worse, single, means, firsts))
    refs = [k for k, r in enumerate(records) if r["type"] is None]
    result["srcc_authentic"] = srcc([means[k] for k in refs], quality[refs])
    result["srcc_pool_like"] = srcc(means, quality)
    synthetic = synthetic_benchmark(args.n_synthetic, args.image_size)
    if synthetic:
        synthetic_scores = [[prompts.parse_score(t, preset) for t in texts] for texts in answers(
            model, processor, preset, "score", [[im] for im, _ in synthetic], True, args.eval_samples)]
        result["srcc_synthetic"] = srcc([float(np.mean(v)) if (v := [x for x in row if x is not None]) else None
                                         for row in synthetic_scores], np.array([r["mos"] for _, r in synthetic]))
    result["score_coverage"] = float(np.mean([x is not None for row in scores for x in row]))
    model.train(was_training)
    return result


def train(args: Args, out: Path) -> dict:
    """Build the tiny model, warm-start it, save it to `out` (model, processor, generation config)."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    preset = prompts.get_preset("evoquality")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = build_tokenizer(args.vocab_size)
    processor = build_processor("qwen2_5_vl", tokenizer, max_pixels=args.max_pixels, min_pixels=28 * 28)
    processor.tokenizer.padding_side = "left"  # as common.load_processor sets it for the stages
    model = build_model("qwen2_5_vl", tokenizer, text_hidden=args.text_hidden, text_layers=args.text_layers,
                        vision_hidden=args.vision_hidden, vision_depth=args.vision_depth, seed=args.seed).to(device)
    with torch.no_grad():  # the merger's last linear layer writes the image tokens' embeddings
        for p in model.model.visual.merger.mlp[-1].parameters():
            p.mul_(args.vision_scale)
    vision = [p for n, p in model.named_parameters() if ".visual." in f".{n}"]  # the ViT and its merger
    others = [p for n, p in model.named_parameters() if ".visual." not in f".{n}"]
    optimizer = torch.optim.AdamW([{"params": others, "lr": args.lr}, {"params": vision, "lr": args.vision_lr}],
                                  weight_decay=0.0)
    peak = [group["lr"] for group in optimizer.param_groups]
    if args.world == "distortion":
        images, quality, contents, reference_of, fidelity = world_set(args.n_images, args.image_size, args.variants)
        scored = score_quality(quality, reference_of, fidelity, args.score_fidelity_power)
    else:
        images, quality, contents = warmstart_set(args.n_images, args.image_size, args.world)
        scored, fidelity = quality, None
    print(f"[warmstart] {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters "
          f"({sum(p.numel() for p in vision) / 1e6:.2f} M vision), {len(images)} warm-start images, {device}")
    fidelity = fidelity if args.readout_fidelity else None
    with torch.random.fork_rng():  # the readout: discarded, never saved; its init leaves the torch RNG as it was
        head = torch.nn.Linear(args.text_hidden, 1 if fidelity is None else 2).to(device)
    optimizer.add_param_group({"params": list(head.parameters()), "lr": args.vision_lr})
    peak.append(args.vision_lr)
    readout_fidelity = lambda picks: None if fidelity is None else fidelity[picks]  # noqa: E731
    pretrain = pretrain_vision(model, head, processor, images, quality, rng, args, fidelity)

    # TRY NOT TO MODIFY: the loop
    history, curve, running = [], [], []
    start = time.time()
    model.train()
    for step in range(args.steps):
        progress = step / max(1, args.steps)
        picks = rng.integers(len(images), size=args.score_batch)
        pairs = [world_compare_example(rng, images, quality, reference_of, progress, args) if args.world == "distortion"
                 else compare_example(rng, images, quality, progress, args) for _ in range(args.compare_batch)]
        batch = training_batch(
            processor, preset,
            [[images[i]] for i in picks] + [shown for shown, _ in pairs],
            ["score"] * args.score_batch + ["compare"] * args.compare_batch,
            [f"\\boxed{{{score_label(scored[i], contents[i], args):.2f}}}" for i in picks]
            + [f"\\boxed{{{noisy_label(target, rng, args.compare_label_noise)}}}" for _, target in pairs],
        ).to(device)
        losses = per_example_loss(model, batch)
        score_loss, compare_loss = losses[:args.score_batch].mean(), losses[args.score_batch:].mean()
        loss = score_loss + args.compare_weight * compare_loss
        if args.vision_aux_weight:
            loss = loss + args.vision_aux_weight * readout_loss(model, head, processor, [images[i] for i in picks],
                                                                quality[picks], readout_fidelity(picks))
        for group, lr in zip(optimizer.param_groups, peak):
            group["lr"] = lr * lr_factor(step, args.steps, args.warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running.append((score_loss.item(), compare_loss.item()))
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            s, c = np.mean(running, axis=0)
            record = {"step": step + 1, "loss_score": round(float(s), 4), "loss_compare": round(float(c), 4),
                      "s_per_step": round((time.time() - start) / (step + 1), 3)}
            history.append(record)
            print(f"[warmstart] {json.dumps(record)}", flush=True)
            running = []
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            if args.world == "distortion":
                greedy = measure_world(model, processor, preset, dataclasses.replace(args, votes=0, eval_samples=0))
            else:
                greedy = measure(model, processor, preset, args.n_bench, args.bench_pairs, 0, args.image_size,
                                 world=args.world)
            point = {"step": step + 1, **greedy}
            curve.append(point)
            print(f"[warmstart] eval {json.dumps(point)}", flush=True)
    seconds = time.time() - start

    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(out)  # with build_model's generation config (Qwen's top_k=1 quirk included)
    processor.save_pretrained(out)
    info = {"args": dataclasses.asdict(args), "hash": settings_hash(args), "recipe_version": RECIPE_VERSION,
            "steps": args.steps, "train_seconds": round(seconds, 1), "s_per_step": round(seconds / args.steps, 3),
            "device": str(device), "threads": torch.get_num_threads(), "history": history, "curve": curve,
            "vision_pretrain": pretrain,
            "versions": common.package_versions()}
    common.write_json_atomic(out / "warmstart.json", info)
    return info


def pretrain_vision(model, head: torch.nn.Linear, processor, images: list[Image.Image], quality: np.ndarray,
                    rng: np.random.Generator, args: Args, fidelity: np.ndarray | None = None) -> list[dict]:
    """The vision pre-training phase (readout_loss only, vision tower + readout, constant lr); its loss curve."""
    optimizer = torch.optim.AdamW(list(model.model.visual.parameters()) + list(head.parameters()), lr=args.vision_lr,
                                  weight_decay=0.0)
    curve, running = [], []
    for step in range(args.vision_pretrain_steps):
        picks = rng.integers(len(images), size=args.vision_batch)
        loss = readout_loss(model, head, processor, [images[i] for i in picks], quality[picks],
                            None if fidelity is None else fidelity[picks])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.vision_pretrain_steps:
            curve.append({"step": step + 1, "readout_mse": round(float(np.mean(running)), 4)})
            print(f"[warmstart] vision {json.dumps(curve[-1])}", flush=True)
            running = []
    return curve


def measure_folder(folder: Path, args: Args) -> dict:
    """Load a saved base the way the stages do and measure it on the held-out bench; writes heldout.json."""
    preset = prompts.get_preset("evoquality")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = common.load_model(str(folder), dtype=torch.float32, device=device)
    processor = common.load_processor(str(folder), max_pixels=args.max_pixels)
    start = time.time()
    if args.world == "distortion":
        result = measure_world(model, processor, preset, args)
    else:
        result = measure(model, processor, preset, args.n_bench, args.bench_pairs, args.eval_samples, args.image_size,
                         world=args.world)
    result["measure_seconds"] = round(time.time() - start, 1)
    common.write_json_atomic(folder / "heldout.json", result)
    return result


def main() -> None:
    args = common.parse_args(Args)
    out = Path(args.out) if args.out else CACHE / f"base-{settings_hash(args)}"
    if args.measure_only:
        if not (out / "config.json").exists():
            common.die(f"{out} holds no saved model")
        print(json.dumps(measure_folder(out, args), indent=2))
        print(out)
        return
    if out.exists() and not (out / "warmstart.json").exists():
        common.die(f"{out} exists and is not a warm-start folder; choose another --out")
    if (out / "heldout.json").exists() and not args.force:
        built = json.loads((out / "warmstart.json").read_text())["hash"]
        if built != settings_hash(args):
            common.die(f"{out} was built with other settings (hash {built}); use --force or another --out")
        print(f"[warmstart] reusing {out} (built before with the same settings; --force rebuilds)")
        print(out)
        return
    # Build in a side folder and rename it at the end: a killed build never leaves a folder that looks finished.
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    info = train(args, partial)
    heldout = measure_folder(partial, args)
    print(f"[warmstart] held-out {json.dumps(heldout)}")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    if args.record:
        with common.JsonlWriter(args.record) as writer:
            writer.write({"note": args.note, "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                          "folder": str(out), "hash": info["hash"], "args": info["args"], "steps": info["steps"],
                          "s_per_step": info["s_per_step"], "train_seconds": info["train_seconds"],
                          "device": info["device"], "threads": info["threads"],
                          "model_sha256": common.file_sha256(out / "model.safetensors"),
                          "vision_pretrain_last": info["vision_pretrain"][-1] if info["vision_pretrain"] else None,
                          "final_losses": info["history"][-1] if info["history"] else None,
                          "curve": info["curve"], "heldout": heldout, "versions": info["versions"]})
    print(out)


if __name__ == "__main__":
    main()
