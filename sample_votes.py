"""Stage 1 of a round, the offline stage's votes (paper: Method, offline stage: K pairwise comparisons of each image
pair, shown in both orders): the current model votes K times on each of N random image pairs and, from round 2 on,
on pairs of two versions of one reference image.

One process:

    python sample_votes.py --model Qwen/Qwen2.5-VL-7B-Instruct --images pool/ --out runs/r1/votes.jsonl

Several processes (the pairs are split across them; torchrun on CPU, where `accelerate launch --cpu` starts one):

    accelerate launch --num_processes 8 sample_votes.py --model ... --images pool/ --out runs/r1/votes.jsonl
    torchrun --nproc_per_node 2 sample_votes.py ...

The paper's scale (20,000 random pairs, K = 32; round 2 adds same-reference pairs of make_pool.py's pool):

    accelerate launch --num_processes 8 sample_votes.py --model runs/r1/model --images /data/koniq_pool \
        --out runs/r2/votes.jsonl --num-pairs 20000 --votes-per-pair 32 --seed 2 \
        --same-reference-pairs 5000 --pool-manifest /data/koniq_pool/manifest.jsonl

Writes --out, one line per pair (the record: votes.py), and beside it <out>.meta.json (settings, vote statistics),
<out>.pool.json, <out>.skipped.jsonl; rerun the same command to resume. Rules: docs/implementation.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

import common
import prompts
import sampling
import votes


@dataclass
class Args:
    model: str = common.arg(help="the voting model: a local checkpoint folder or a hub id")
    images: str = common.arg(help="the unlabeled pool: a folder (searched recursively) or a .txt/.jsonl list of images")
    out: str = common.arg(help="output JSONL: one line per pair (per image with --mode score)")
    images_root: Optional[str] = common.arg(None, help="folder the image paths are relative to (default: --images "
                                                       "itself, or the list file's folder)")
    num_pairs: int = common.arg(20000, help="distinct unordered image pairs to draw (all pairs if fewer exist)")
    same_reference_pairs: int = common.arg(0, help="also this many pairs of two versions of one reference image")
    pool_manifest: Optional[str] = common.arg(None, help="make_pool.py's manifest.jsonl: each pool image's reference")
    votes_per_pair: int = common.arg(32, help="K: votes per pair, K/2 in each order (per image with --mode score)")
    seed: int = common.arg(0, help="seed of the pair draw, of odd-K vote orders and of the sampling noise")
    temperature: float = common.arg(1.0, help="sampling temperature (> 0: K greedy votes would all be the same)")
    max_new_tokens: int = common.arg(512, help="completion budget; an answer cut off by it is an abstention")
    reasoning: bool = common.arg(True, help="ask for reasoning before the final answer (the preset's reasoning suffix)")
    prompt: str = common.arg("evoquality", help="prompt preset (prompts.PRESETS)", choices=sorted(prompts.PRESETS))
    mode: str = common.arg("compare", choices=["compare", "score"],
                           help="compare: the paper's pairwise votes; score: K scores per image (cheaper, not paper)")
    # bench/memory_plan.py --voting at 7B, 1024x768 images, every vote run to 512 tokens: at most 1,648 sequences fit
    # one 80 GiB GPU; 1,024 (64 prompts at K = 32) peak at 57 GiB, leaving room for larger images and longer prompts
    batch_size: int = common.arg(1024, help="sequences sampled per call, in whole prompts (a prompt's K/2 split over "
                                            "calls if larger); 1024 fits 7B on one 80 GB GPU with 23 GiB to spare "
                                            "(bench/memory_plan.py --voting: 1,648 at most). Votes do not depend on it")
    max_pixels: Optional[int] = common.arg(None, help="downscale images above this many pixels (default: processor's)")
    text: bool = common.arg(True, help="keep each answer's raw text (--no-text keeps only the parsed answers)")
    strict: bool = common.arg(False, help="stop at the first unreadable image instead of skipping its pairs")
    overwrite: bool = common.arg(False, help="discard an existing --out (and its shards, meta, skipped); start over")


# generate_fn(prompt, images_per_prompt, n, keys, first_index) -> n sampling.Completion(text, truncated) per prompt:
# completions first_index[j] .. first_index[j] + n - 1 of prompt j, whose identity is keys[j] (sampling.sample). The
# only place the model is touched, so tests can plug in a scripted model whose answers are known.
GenerateFn = Callable[[str, list[list[Image.Image]], int, list[int], list[int]], list[list[sampling.Completion]]]
# the Args fields that define the votes (see the module docstring); settings_of adds the model, prompt and pool identity
SETTINGS = ("prompt", "reasoning", "mode", "votes_per_pair", "temperature", "max_new_tokens", "max_pixels", "num_pairs",
            "same_reference_pairs", "seed")


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: pairs, vote orders, answers mapped back to image identity
# ---------------------------------------------------------------------------------------------------------------------


def sample_pairs(n_images: int, num_pairs: int, seed: int) -> list[tuple[int, int]]:
    """`num_pairs` distinct unordered pairs (i, j), i < j, drawn uniformly without replacement (all pairs if fewer
    exist). Depends only on its arguments, so a rerun or a resume draws the same pairs in the same order; and a
    draw of fewer pairs is the start of a draw of more (same images and seed), so runs that differ in their number
    of pairs share the pairs they have in common."""
    total = n_images * (n_images - 1) // 2
    rng = np.random.default_rng(seed)
    if total <= 1 << 22:  # every pair number in a random order (at most 32 MB)
        picks = rng.permutation(total)[:num_pairs].tolist()
    else:  # too many to list: pair numbers in blocks of a fixed size, each kept the first time it comes
        drawn: dict[int, None] = {}
        while len(drawn) < min(num_pairs, total):
            for k in rng.integers(total, size=4096).tolist():
                if len(drawn) < num_pairs:
                    drawn.setdefault(k, None)
        picks = list(drawn)
    pairs = []
    for k in picks:  # pair number k <-> (i, j) with k = j (j - 1) / 2 + i, exact in integers
        j = (1 + math.isqrt(1 + 8 * k)) // 2
        pairs.append((k - j * (j - 1) // 2, j))
    return pairs


def sample_same_reference_pairs(groups: list[list[int]], num_pairs: int, seed: int,
                                taken: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """`num_pairs` pairs (i, j), i < j, of two members of one group (the pool indices of one reference's versions,
    ascending): a group uniformly among those with a pair still free, then two of its members uniformly; none
    drawn twice or in `taken` (the random pairs); all free pairs if fewer exist. Depends only on its arguments."""
    rng = np.random.default_rng([seed, 1])  # a stream of its own: the random pairs stay those drawn without it
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    free = [len(m) * (len(m) - 1) // 2 for m in groups]
    for i, j in taken:
        if i in group_of and group_of[i] == group_of.get(j):
            free[group_of[i]] -= 1
    live = [g for g, f in enumerate(free) if f > 0]
    drawn: dict[tuple[int, int], None] = {}
    while len(drawn) < num_pairs and live:
        g = live[rng.integers(len(live))]
        m = len(groups[g])
        i, j = rng.integers(m), rng.integers(m - 1)  # an ordered pair of distinct members, uniformly
        pair = (groups[g][min(i, j + (j >= i))], groups[g][max(i, j + (j >= i))])
        if pair in taken or pair in drawn:
            continue  # the group still has a free pair (it is live), so a retry ends
        drawn[pair] = None
        free[g] -= 1
        if free[g] == 0:
            live.remove(g)
    return list(drawn)


def vote_orders(a: str, b: str, k: int, seed: int) -> dict[str, int]:
    """How many of a pair's K votes show a first ("ab") and b first ("ba"): K/2 each. An odd K's extra vote takes a
    random order seeded by (seed, a, b) alone, so it is the same whichever process or batch asks."""
    extra = random.Random(f"{seed}:{a}:{b}").choice(["ab", "ba"]) if k % 2 else None
    return {order: k // 2 + (order == extra) for order in ("ab", "ba")}


def sample_batched(generate_fn: GenerateFn, prompt: str, jobs: list[tuple[list[Image.Image], int, int]],
                   batch_size: int) -> list[list[sampling.Completion]]:
    """n completions for each job (images, n, key), in calls of at most batch_size sequences (sampling.split_calls).
    Each completion's noise is keyed to (seed, key, its index), so the grouping into calls changes no vote."""
    return sampling.sample_in_calls([n for _, n, _ in jobs], batch_size, lambda idx, n, firsts: generate_fn(
        prompt, [jobs[i][0] for i in idx], n, [jobs[i][2] for i in idx], firsts))


def compare_record(a: str, b: str, answers: list[dict]) -> dict:
    choices = [(x["order"], x["choice"]) for x in answers]
    return {
        "a": a, "b": b,
        "votes_a": sum(c == "a" for _, c in choices),
        "votes_b": sum(c == "b" for _, c in choices),
        "abstain": sum(c is None for _, c in choices),
        "first_slot_wins": sum(c == ("a" if order == "ab" else "b") for order, c in choices),
        "answers": answers,
    }


def vote_pairs(pairs: list[tuple[str, str]], images: dict[str, Image.Image], generate_fn: GenerateFn, prompt: str,
               parse: Callable[[str], Optional[int]], k: int, seed: int, batch_size: int,
               keep_text: bool = True) -> list[dict]:
    """K votes for each pair, K/2 per order, each answer mapped back to image identity. The prompt of an order is
    keyed by the two image names in the order shown: its votes are votes 0 .. K/2 - 1 of that key."""
    jobs = []
    for a, b in pairs:
        for order, n in vote_orders(a, b, k, seed).items():
            first, second = (a, b) if order == "ab" else (b, a)
            jobs.append(([images[first], images[second]], n, sampling.prompt_key(first, second)))
    completions = sample_batched(generate_fn, prompt, jobs, batch_size)
    records = []
    for p, (a, b) in enumerate(pairs):
        answers = []
        for order, per_order in zip(("ab", "ba"), completions[2 * p: 2 * p + 2]):
            for completion in per_order:
                index = sampling.answer(completion, parse)  # 0: the first image shown is better, 1: the second
                choice = None if index is None else ("a" if (index == 0) == (order == "ab") else "b")
                answers.append({"order": order, "choice": choice, "truncated": completion.truncated}
                               | ({"text": completion.text} if keep_text else {}))
        records.append(compare_record(a, b, answers))
    return records


def score_images(names: list[str], images: dict[str, Image.Image], generate_fn: GenerateFn, prompt: str,
                 parse: Callable[[str], Optional[float]], k: int, batch_size: int,
                 keep_text: bool = True) -> list[dict]:
    """--mode score: K sampled scores per image (None where unparseable or cut off), and which were cut off."""
    completions = sample_batched(generate_fn, prompt, [([images[x]], k, sampling.prompt_key(x)) for x in names],
                                 batch_size)
    return [{"image": x, "scores": [sampling.answer(c, parse) for c in per_image],
             "truncated": [c.truncated for c in per_image]}
            | ({"answers": [c.text for c in per_image]} if keep_text else {})
            for x, per_image in zip(names, completions)]


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: reading and validation (the pool, its manifest, the pairs)
# ---------------------------------------------------------------------------------------------------------------------


def check_args(args: Args) -> None:
    if args.votes_per_pair < 1 or args.num_pairs < 1 or args.batch_size < 1 or args.same_reference_pairs < 0:
        common.die("--votes-per-pair, --num-pairs and --batch-size must be >= 1, --same-reference-pairs >= 0")
    if not 0 < args.temperature < math.inf:  # also refuses nan
        common.die(f"--temperature must be a finite number > 0 (K greedy votes would all be the same), "
                   f"not {args.temperature}")
    if args.same_reference_pairs and not args.pool_manifest:
        common.die("--same-reference-pairs needs --pool-manifest (make_pool.py's manifest.jsonl)")
    if args.pool_manifest and not Path(args.pool_manifest).is_file():
        common.die(f"pool manifest {args.pool_manifest} not found")


def list_pool(args: Args) -> tuple[Path, list[str]]:
    try:
        root, names = common.list_images(args.images, args.images_root)
    except (OSError, ValueError) as e:
        common.die(str(e))
    if len(names) < 2:
        common.die(f"need at least 2 images to draw pairs, found {len(names)} in {args.images}")
    return root, names


def read_manifest(path: Path, root: Path, index: dict[str, int]) -> list[list[int]]:
    """The pool images grouped by reference (pool indices, ascending), groups in reference order, only those with
    two versions or more. Each line: {"image": name, "reference": name, ...}, names relative to the pool root."""
    try:
        lines = common.read_text(path).splitlines()
    except (OSError, ValueError) as e:
        common.die(f"cannot read the pool manifest: {e}")
    groups: dict[str, list[int]] = {}
    line_of: dict[str, int] = {}
    for lineno, line in enumerate(lines, 1):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            common.die(f"{where}: malformed JSON line ({e})")
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("image", "reference")):
            common.die(f'{where}: expected {{"image": name, "reference": name, ...}}')
        try:
            image, reference = (common.safe_name(root, record[k], where) for k in ("image", "reference"))
        except ValueError as e:
            common.die(str(e))
        if image not in index:
            common.die(f"{where}: image {image!r} is not in the pool {root} (manifest names are relative to it)")
        if image in line_of:
            common.die(f"{where}: image {image!r} is listed twice (also on line {line_of[image]})")
        line_of[image] = lineno
        groups.setdefault(reference, []).append(index[image])
    return [sorted(groups[r]) for r in sorted(groups) if len(groups[r]) > 1]


def draw_pairs(args: Args, root: Path, names: list[str]) -> dict[tuple[str, str], str]:
    """Every pair of the run, in output order (random pairs, then same-reference pairs), and its kind."""
    drawn = sample_pairs(len(names), args.num_pairs, args.seed)
    kinds = {(names[i], names[j]): "random" for i, j in drawn}
    if args.pool_manifest:
        groups = read_manifest(Path(args.pool_manifest), root, {x: i for i, x in enumerate(names)})
        same = sample_same_reference_pairs(groups, args.same_reference_pairs, args.seed, set(drawn))
        if args.same_reference_pairs and not same:
            why = ("every pair of two versions of one reference is already among the random pairs" if groups else
                   "no reference holds two versions in the pool (each has one image there)")
            common.die(f"--same-reference-pairs {args.same_reference_pairs}: nothing to draw from "
                       f"{args.pool_manifest}: {why}")
        for i, j in same:
            kinds[names[i], names[j]] = "same_reference"
    return kinds


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: the model and the images
# ---------------------------------------------------------------------------------------------------------------------


def make_generate_fn(model, processor, add_vision_id: bool, max_new_tokens: int, temperature: float,
                     seed: int) -> GenerateFn:
    """sampling.sample_prompts with the run's settings; `generate.decode` sums what the decodes cost (calls, decode
    steps, row-steps) and keeps the most KV bytes one call held."""
    def generate(prompt: str, images: list[list[Image.Image]], n: int, keys: list[int],
                 first_index: list[int]) -> list[list[sampling.Completion]]:
        samples = sampling.sample_prompts(model, processor, [prompt] * len(images), images, n, max_new_tokens,
                                          temperature, add_vision_id, keys=keys, seed=seed, first_index=first_index)
        totals = generate.decode
        totals.update(calls=totals["calls"] + 1, steps=totals["steps"] + samples.decode["steps"],
                      row_steps=totals["row_steps"] + samples.decode["row_steps"],
                      kv_bytes=max(totals["kv_bytes"], samples.decode["kv_bytes"]))
        return samples.completions()

    generate.decode = {"calls": 0, "steps": 0, "row_steps": 0, "kv_bytes": 0}
    return generate


def load_generate_fn(args: Args, device) -> GenerateFn:
    try:
        model = common.load_model(args.model, device=device).eval()
        processor = common.load_processor(args.model, max_pixels=args.max_pixels)
    except (OSError, ValueError) as e:  # FileNotFoundError, hub errors, a folder that holds no checkpoint
        common.die(f"cannot load model {args.model}: {str(e).splitlines()[0]}")
    add_vision_id = prompts.get_preset(args.prompt).add_vision_id
    return make_generate_fn(model, processor, add_vision_id, args.max_new_tokens, args.temperature, args.seed)


def load_images(names: list[str], root: Path, strict: bool) -> tuple[dict[str, Image.Image], dict[str, str]]:
    """(images, errors) by relative path; an unreadable image stops the run only with --strict."""
    images, errors = {}, {}
    for name in dict.fromkeys(names):
        try:
            images[name] = common.load_image(root / name)
        except ValueError as e:
            if strict:
                common.die(f"{e} (--strict; without it the pairs of this image are skipped)")
            errors[name] = str(e)
    return images, errors


def process_chunk(units: list, args: Args, root: Path, generate_fn: GenerateFn, pairs_of: dict,
                  kind_of: dict) -> list[dict]:
    """Records for a few pairs (images with --mode score): votes, plus a {"a", "b", "kind", "skipped"} record for each
    pair that has an unreadable image. `pairs_of`: image -> its pairs (used with --mode score); `kind_of`: pair ->
    "random" or "same_reference"."""
    preset = prompts.get_preset(args.prompt)
    names = [x for u in units for x in (u if args.mode == "compare" else (u,))]
    images, errors = load_images(names, root, args.strict)
    if args.mode == "compare":
        skipped = {pair: errors[x] for pair in units for x in pair if x in errors}
        good = [u for u in units if u not in skipped]
        parse = partial(prompts.parse_compare, preset=preset)
        records = vote_pairs(good, images, generate_fn, preset.prompt("compare", args.reasoning), parse,
                             args.votes_per_pair, args.seed, args.batch_size, args.text)
        records = [{"a": r["a"], "b": r["b"], "kind": kind_of[r["a"], r["b"]], **r} for r in records]
    else:
        skipped = {pair: errors[x] for x in units if x in errors for pair in pairs_of[x]}
        good = [x for x in units if x in images]
        parse = partial(prompts.parse_score, preset=preset)
        records = score_images(good, images, generate_fn, preset.prompt("score", args.reasoning), parse,
                               args.votes_per_pair, args.batch_size, args.text)
    return records + [{"a": a, "b": b, "kind": kind_of[a, b], "skipped": reason} for (a, b), reason in skipped.items()]


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: resume and output
# ---------------------------------------------------------------------------------------------------------------------


def read_done(out: Path) -> tuple[dict, dict]:
    """(results, skipped) by key, from --out and every shard file left by any earlier run (any number of processes)."""
    results, skipped = {}, {}
    for path in [out, *common.shard_files(out)]:
        for record in common.read_jsonl(path):
            key = record["image"] if "image" in record else (record["a"], record["b"])
            (skipped if "skipped" in record else results)[key] = record
    return results, skipped


def merge(out: Path, pairs: list[tuple[str, str]], keys: list, mode: str) -> tuple[list[dict], list[dict]]:
    """Shards + an earlier --out -> --out in pair order, skipped pairs -> <out>.skipped.jsonl, shards deleted last:
    a merge killed at any point is simply redone by the next run."""
    results, skipped = read_done(out)
    records = [results[key] for key in keys if key in results]
    voted = (lambda pair: pair in results) if mode == "compare" else (lambda pair: all(x in results for x in pair))
    skipped_records = [skipped[pair] for pair in pairs if pair in skipped and not voted(pair)]
    common.write_jsonl_atomic(Path(f"{out}.skipped.jsonl"), skipped_records)
    common.merge_shards(out, records)
    return records, skipped_records


def settings_of(args: Args, names: list[str]) -> dict:
    """What defines the votes (module docstring); a rerun against an existing --out must match every one."""
    return {"model": common.fingerprint(args.model), **{key: getattr(args, key) for key in SETTINGS},
            "prompt_hash": prompts.get_preset(args.prompt).hash(),  # the preset's text, not only its name
            "pool_names": hashlib.sha256("\n".join(names).encode()).hexdigest()[:16],  # the pair draw's input
            "pool_manifest": common.file_sha256(args.pool_manifest) if args.pool_manifest else None}


def image_stats(root: Path, names: list[str]) -> dict[str, Optional[list[int]]]:
    """[size, mtime_ns] of every pool image (None if it is missing): an image's identity, cheap for 10k images."""
    def stat(name: str) -> Optional[list[int]]:
        try:
            info = (root / name).stat()
            return [info.st_size, info.st_mtime_ns]
        except OSError:
            return None

    return {name: stat(name) for name in names}


def refuse_changes(out: Path, settings: dict, stats: dict, done: dict, mode: str) -> None:
    """Die if the votes already in --out were made with other settings, or on an image changed since."""
    meta_path, remedy = Path(f"{out}.meta.json"), "use another --out, or --overwrite to discard them"
    if not meta_path.exists():
        if out.exists() or common.shard_files(out):
            common.die(f"{out} exists without {meta_path.name}, so it cannot be resumed safely; {remedy}")
        return
    common.refuse_changed_settings(meta_path, settings, str(out), remedy)
    pool_path = Path(f"{out}.pool.json")
    old = common.read_json(pool_path) if pool_path.exists() else {}
    voted = {x for key in done for x in ((key,) if mode == "score" else key)}
    changed = sorted(x for x in voted if old.get(x) != stats.get(x))
    if changed:
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        common.die(f"{out} holds votes on images changed since (size or mtime): {', '.join(changed[:5])}{more}; "
                   f"{remedy}")


def start(args: Args, out: Path, settings: dict, stats: dict, pairs: dict, num_processes: int) -> None:
    """The run has started for real (inputs checked, model loaded): only now its record is written."""
    if args.overwrite:
        for path in [out, *common.shard_files(out), Path(f"{out}.skipped.jsonl"), Path(f"{out}.pairs.jsonl")]:
            path.unlink(missing_ok=True)
    model_path = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    common.write_lines_atomic(f"{out}.pool.json", [json.dumps(stats, ensure_ascii=False) + "\n"])
    common.record_settings(f"{out}.meta.json", settings, model_path=model_path, args=dataclasses.asdict(args),
                           package_versions=common.package_versions(), num_processes=num_processes,
                           num_images=len(stats), started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           finished=None, counts=None)
    if args.mode == "score":
        common.write_jsonl_atomic(Path(f"{out}.pairs.jsonl"), [{"a": a, "b": b, "kind": k} for (a, b), k in
                                                               pairs.items()])


def finish(args: Args, out: Path, pairs: dict, keys: list, seconds: float) -> None:
    """Merge the shards, then record and print the vote statistics (votes.py's, from the merged file)."""
    records, skipped = merge(out, list(pairs), keys, args.mode)
    if not records:
        common.die(f"no votes: every pair has an unreadable image (see {out}.skipped.jsonl)")
    with warnings.catch_warnings():  # pairs of skipped images have no votes: said below, with the file that lists them
        warnings.simplefilter("ignore")
        _, _, voted, info = votes.read_votes(out, Path(f"{out}.pairs.jsonl"))
    counts = {"pairs": len(pairs) - len(skipped), "skipped_pairs": len(skipped), **votes.vote_stats(voted),
              **votes.truncation_stats(info["truncation"]), "by_kind": votes.kind_stats(voted),
              "seconds_this_run": int(seconds)}
    meta = common.read_json(f"{out}.meta.json")
    common.write_json_atomic(f"{out}.meta.json", {**meta, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                 "counts": counts})
    print(" | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in counts.items()
                     if not isinstance(v, (dict, list))))
    if skipped:
        print(f"skipped {len(skipped)} pairs with an unreadable image: {out}.skipped.jsonl")


def vote(args: Args, out: Path, root: Path, rank: int, mine: list, generate_fn: GenerateFn, pairs: dict) -> None:
    """This process's share of the units of work, appended to its shard as they are voted; then what its decodes
    cost."""
    from tqdm import tqdm

    pairs_of: dict[str, list] = {}  # image -> its pairs, for skipping
    for pair in pairs:
        for x in pair:
            pairs_of.setdefault(x, []).append(pair)
    step = max(1, args.batch_size // args.votes_per_pair)
    with common.JsonlWriter(common.shard_file(out, rank)) as writer, \
            tqdm(total=len(mine) * args.votes_per_pair, unit="vote", desc=f"votes [{rank}]", position=rank,
                 dynamic_ncols=True) as bar:
        for s in range(0, len(mine), step):
            for record in process_chunk(mine[s:s + step], args, root, generate_fn, pairs_of, pairs):
                writer.write(record)
            bar.update(len(mine[s:s + step]) * args.votes_per_pair)
    decode = getattr(generate_fn, "decode", None)
    if decode:
        print(f"decode [{rank}]: {decode['calls']} calls, {decode['steps']} steps, {decode['row_steps']} row-steps "
              f"(completions x steps computed), KV at most {decode['kv_bytes'] / 2 ** 20:.1f} MiB per call",
              file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: the run
# ---------------------------------------------------------------------------------------------------------------------


def run(args: Args, state, out: Path) -> None:
    start_time = time.time()
    root, names = list_pool(args)
    pairs = draw_pairs(args, root, names)  # pair -> kind, in output order
    keys = list(pairs) if args.mode == "compare" else list(dict.fromkeys(x for pair in pairs for x in pair))
    settings, stats = settings_of(args, names), image_stats(root, names)
    try:
        done = {} if args.overwrite else read_done(out)[0]
    except ValueError as e:  # a malformed line inside a file (not a cut last line, which is dropped)
        common.die(str(e))
    if not args.overwrite:
        refuse_changes(out, settings, stats, done, args.mode)
    mine = [key for key in keys if key not in done][state.process_index::state.num_processes]
    generate_fn = load_generate_fn(args, state.device) if mine else None
    state.wait_for_everyone()  # every process has read the old files before any is deleted or appended to
    if state.is_main_process:
        start(args, out, settings, stats, pairs, state.num_processes)
    state.wait_for_everyone()
    if mine:
        vote(args, out, root, state.process_index, mine, generate_fn, pairs)
    state.wait_for_everyone()
    if state.is_main_process:
        finish(args, out, pairs, keys, time.time() - start_time)


def main(argv: Optional[list[str]] = None) -> None:
    args = common.parse_args(Args, argv)
    check_args(args)
    import torch
    from accelerate import PartialState

    # cpu=True is what makes torchrun's processes one group on a machine without GPUs (else each runs alone);
    # a long timeout because the last barrier waits for the slowest shard, which may be far behind on big runs
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=24))
    out = Path(args.out)
    if state.is_main_process:
        common.check_writable(out.parent)
    with common.output_lock(out) if state.is_main_process else contextlib.nullcontext():  # one lock for all processes
        run(args, state, out)


if __name__ == "__main__":
    common.run_main(main)
