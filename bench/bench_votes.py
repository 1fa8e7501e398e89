"""Benchmark: voting through sampling.sample against another sampler, side by side in one run: the plain generate
path (`generate(num_return_sequences=n)`, which prefills every prompt once per vote), or with --against COMMIT that
commit's sampling.py (with its common.py, from a copy of its tree made by `git archive`).

    OMP_NUM_THREADS=1 python bench/bench_votes.py --size 30m --against COMMIT        # 4 and 8 pairs per call
    OMP_NUM_THREADS=1 python bench/bench_votes.py --size 30m --pairs-per-call 4 --max-new-tokens 256 --against COMMIT
    OMP_NUM_THREADS=2 python bench/bench_votes.py --size tiny                           # against generate

K votes per pair with the compare prompt and its reasoning suffix, K/2 per order (two images per prompt), one call of
`--pairs-per-call` pairs (2 x pairs prompts x K/2 completions), as sample_votes.py batches them. Completion lengths are
made uneven the same way for both samplers: an lm_head hook sets the end-of-sequence logit so that, at step t of a
budget of T new tokens, P(EOS) = 1 / (T - t) under softmax at temperature 1 (lengths uniform on 1..T: a random model
would otherwise never stop; an image placeholder it samples ends a completion earlier, in both samplers, as "cut
off"). After one warm-up call each, the repeats alternate the two samplers (load on a shared machine hits both alike)
and the medians are printed. Per sampler: seconds and sequences (votes) per second of the call (prefill, vision and
decode), the prefill forward's seconds, the decode phase (from the end of the prefill to the end of the call) and its
milliseconds per decode step, row-steps (completions summed over decode forwards), the KV cache's bytes (the most held
at once; for generate, not measured), prompt tokens PREFILLED per completion and vision patches per image shown.

Model sizes (random Qwen2.5-VL weights built from config like demo/tiny_models.py, cached under runs/bench_cache/):
  tiny  the tests' default model (text 64 x 2, images capped at 56 px: 4 tokens each): overhead-dominated;
  30m   text 512 x 8 layers, vision 256 x 4, 448 px images (256 tokens each): compute-dominated on a CPU (24 M
        parameters with the tiny tokenizer's vocabulary). With other work on the cores, OMP_NUM_THREADS=1 gives stable
        timings.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import prompts  # noqa: E402
import sampling  # noqa: E402

SIZES = {  # name: (checkpoint dims for demo.tiny_models.build_tiny_checkpoint, synthetic image side in pixels)
    "tiny": ({}, 112),
    "30m": (dict(text_hidden=512, text_layers=8, vision_hidden=256, vision_depth=4, max_pixels=448 * 448), 448),
}
MiB = 2 ** 20


def load_size(size: str, n_images: int):
    """(model, processor, images, description) for a model size; the checkpoint and images are built once."""
    import torch

    from fixtures.synthetic import write_set
    from fixtures.tiny_models import build_tiny_checkpoint

    dims, side = SIZES[size]
    cache = ROOT / "runs" / "bench_cache" / f"bench_{size}"
    if not (cache / "model" / "config.json").exists():
        build_tiny_checkpoint(cache / "model", "qwen2_5_vl", **dims)
    if len(list((cache / "images").glob("*.png"))) < n_images:
        write_set(cache / "images", "pool", n_images, size=side)
    model = common.load_model(str(cache / "model"), device="cuda" if torch.cuda.is_available() else None).eval()
    processor = common.load_processor(str(cache / "model"))
    images = [common.load_image(p) for p in sorted((cache / "images").glob("*.png"))[:n_images]]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return model, processor, images, f"random Qwen2.5-VL, {params:.1f} M parameters, {side} px images"


# ---------------------------------------------------------------------------------------------------------------------
# The samplers: (model, processor, prompts, images, n, max_new_tokens, keys) -> (completions per prompt, KV bytes)
# ---------------------------------------------------------------------------------------------------------------------


def generate_path(model, processor, prompts, images, n, max_new_tokens, keys):
    """One generate call with num_return_sequences=n, which expands the batch BEFORE prefill."""
    import torch

    inputs = common.encode_batch(processor, prompts, images).to(model.device)
    config = sampling.sampling_config(model, max_new_tokens, num_return_sequences=n)
    with torch.inference_mode():
        sequences = model.generate(**inputs, generation_config=config)
    length = inputs["input_ids"].shape[1]
    texts = sampling.completion_texts(processor, sequences, length)
    eos = torch.tensor(sampling.eos_token_ids(config), device=sequences.device)
    finished = torch.isin(sequences[:, length:], eos).any(dim=1).tolist()
    rows = [sampling.Completion(t, not f) for t, f in zip(texts, finished)]
    return [rows[i * n:(i + 1) * n] for i in range(len(prompts))], None


def sample_path(model, processor, prompts, images, n, max_new_tokens, keys):
    """sampling.sample: each prompt prefilled once, decoded by the shared-prefix engine, noise keyed per completion."""
    samples = sampling.sample_prompts(model, processor, prompts, images, n, max_new_tokens, keys=keys)
    return samples.completions(), samples.decode.get("kv_bytes")


def commit_path(commit: str):
    """The sampler of `commit`: its sampling.py, importing its own common.py, loaded under other module names."""
    folder = Path(tempfile.mkdtemp(prefix="sampler_"))
    archive = subprocess.run(["git", "archive", commit, "sampling.py", "common.py"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(folder, filter="data")
    modules = {}
    current = sys.modules["common"]
    try:
        for name in ("common", "sampling"):
            spec = importlib.util.spec_from_file_location(f"{name}_{commit}", folder / f"{name}.py")
            modules[name] = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
            sys.modules["common"] = modules["common"]  # its sampling.py imports ITS common.py
            spec.loader.exec_module(modules[name])
    finally:
        sys.modules["common"] = current
    old = modules["sampling"]
    held = []
    repeat = old._repeat_with_room

    def repeat_and_measure(cache, n, room):  # the KV bytes of its n-times repeated cache
        cache = repeat(cache, n, room)
        held.append(sum(t.numel() * t.element_size() for layer in cache.layers
                        for t in getattr(layer, "buffers", [layer.keys, layer.values])))
        return cache

    old._repeat_with_room = repeat_and_measure

    def path(model, processor, prompts, images, n, max_new_tokens, keys):
        held.clear()
        samples = old.sample_prompts(model, processor, prompts, images, n, max_new_tokens)
        return samples.completions(), max(held, default=None)

    return path


# ---------------------------------------------------------------------------------------------------------------------
# Uneven lengths, counting and timing
# ---------------------------------------------------------------------------------------------------------------------


class EndHazard:
    """lm_head hook: at the t-th forward of a sampling call (t = 0 is the prefill), the first EOS id's logit is set to
    logsumexp(other logits) + log(h / (1 - h)), h = 1 / (T - t): P(EOS) = h at temperature 1, so a completion that
    runs from step 0 ends at step t with probability 1 / T. `reset()` before each call."""

    def __init__(self, model, budget: int):
        self.eos = sampling.eos_token_ids(sampling.sampling_config(model, 1))[0]
        self.budget, self.step = budget, 0
        self.handle = model.lm_head.register_forward_hook(self.hook)

    def reset(self):
        self.step = 0

    def hook(self, module, args, out):
        import math

        h = min(1.0 / (self.budget - self.step), 1 - 1e-6)
        self.step += 1
        others = out.float().index_fill(-1, out.new_tensor([self.eos], dtype=int), float("-inf")).logsumexp(-1)
        out = out.clone()
        out[..., self.eos] = (others + math.log(h / (1 - h))).to(out.dtype)
        return out


class Counter:
    """Forward hooks: tokens through the language model in calls over more than one position (prefill) and rows in
    one-position calls (decode row-steps); patches and images through the vision tower; the prefill forward's seconds
    and when it ended."""

    def __init__(self, model):
        import torch

        self.sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        self.prefilled = self.decoded = self.steps = self.patches = self.images = 0
        self.prefill_seconds, self.prefill_end, self.start = 0.0, None, None
        self.handles = [model.model.language_model.register_forward_pre_hook(self.language, with_kwargs=True),
                        model.model.visual.register_forward_pre_hook(self.vision, with_kwargs=True),
                        model.register_forward_pre_hook(self.before, with_kwargs=True),
                        model.register_forward_hook(self.after, with_kwargs=True)]

    def length(self, kwargs):
        x = kwargs.get("input_ids")
        return (x if x is not None else kwargs["inputs_embeds"]).shape[1]

    def before(self, module, args, kwargs):
        if self.length(kwargs) > 1:
            self.sync()
            self.start = time.perf_counter()

    def after(self, module, args, kwargs, out):
        if self.length(kwargs) > 1:
            self.sync()
            self.prefill_end = time.perf_counter()
            self.prefill_seconds += self.prefill_end - self.start

    def language(self, module, args, kwargs):
        batch, length = kwargs["inputs_embeds"].shape[:2]
        if length > 1:
            self.prefilled += batch * length
        else:
            self.decoded += batch
            self.steps += 1

    def vision(self, module, args, kwargs):
        pixels = args[0] if args else kwargs["hidden_states"]
        grid = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        self.patches += pixels.shape[0]
        self.images += len(grid)

    def remove(self):
        for handle in self.handles:
            handle.remove()


def run(model, fn) -> dict:
    """Seconds and counts of one call of fn() -> (completions per prompt, KV bytes)."""
    counter = Counter(model)
    counter.sync()
    start = time.perf_counter()
    try:
        completions, kv_bytes = fn()
        counter.sync()
    finally:
        seconds = time.perf_counter() - start
        counter.remove()
    rows = [c for per_prompt in completions for c in per_prompt]
    decode = seconds - (counter.prefill_end - start) if counter.prefill_end else float("nan")
    return {"seconds": seconds, "completions": len(rows), "prefill": counter.prefill_seconds, "decode": decode,
            "row_steps": counter.decoded, "steps": counter.steps, "kv_bytes": kv_bytes, "prefilled": counter.prefilled,
            "patches": counter.patches, "vision_images": counter.images,
            "truncated": sum(c.truncated for c in rows) / len(rows)}


def compare(model, fns: dict, repeats: int) -> dict:
    """One warm-up and `repeats` timed runs of each sampler, alternating; medians of the times, counts of the last
    run."""
    import torch

    for fn in fns.values():
        torch.manual_seed(0)
        fn(warmup=True)
    runs = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            torch.manual_seed(r)
            runs[name].append(run(model, lambda: fn(seed=r)))
    out = {}
    for name, results in runs.items():
        out[name] = {**results[-1], **{k: statistics.median(x[k] for x in results)
                                       for k in ("seconds", "prefill", "decode")},
                     "all_seconds": [round(x["seconds"], 1) for x in results]}
    return out


def report(results: dict, sequences: int, image_slots: int) -> None:
    """The table: one line per sampler, then the first/last ratios."""
    head = (f"  {'':32s} {'seconds':>8s} {'seq/s':>8s} {'prefill s':>9s} {'decode s':>9s} {'ms/step':>8s} "
            f"{'row-steps':>9s} {'KV MiB':>8s} {'prefilled/seq':>13s} {'patches/img':>11s} {'cut off':>7s}")
    print(head)
    rows = {}
    for name, r in results.items():
        kv = r["kv_bytes"] / MiB if r["kv_bytes"] else float("nan")
        rows[name] = (r["seconds"], r["completions"] / r["seconds"], r["prefill"], r["decode"],
                      1e3 * r["decode"] / max(r["steps"], 1), r["row_steps"], kv, r["prefilled"] / sequences,
                      r["patches"] / image_slots)
        print(f"  {name:32s} {rows[name][0]:8.1f} {rows[name][1]:8.2f} {rows[name][2]:9.1f} {rows[name][3]:9.1f} "
              f"{rows[name][4]:8.1f} {rows[name][5]:9d} {kv:8.1f} {rows[name][7]:13.1f} {rows[name][8]:11.1f} "
              f"{r['truncated']:7.1%}   (runs: {r['all_seconds']} s)")
    old, new = rows.values()
    ratio = [o / n if n else float("nan") for o, n in zip(old, new)]
    print(f"  {'ratio (first / last)':32s} {ratio[0]:7.2f}x {1 / ratio[1]:7.2f}x {ratio[2]:8.2f}x {ratio[3]:8.2f}x "
          f"{ratio[4]:7.2f}x {ratio[5]:8.2f}x {ratio[6]:7.2f}x {ratio[7]:12.2f}x {ratio[8]:10.2f}x   "
          "(seq/s: last / first)")


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs"


# ---------------------------------------------------------------------------------------------------------------------
# Voting
# ---------------------------------------------------------------------------------------------------------------------


def bench_calls(model, processor, samplers: dict, prompts: list[str], shown: list, n: int, max_new_tokens: int,
                repeats: int, parse, header: str) -> None:
    """One call of each sampler on `prompts` (images `shown`, n completions each), timed side by side, parsed with
    `parse` as the stages do; then the table."""
    import torch

    keys = [sampling.prompt_key(i) for i in range(len(prompts))]
    hazard = EndHazard(model, max_new_tokens)

    def calls(path):
        def fn(warmup: bool = False, seed: int = 0):
            hazard.reset()
            todo = 1 if warmup else len(prompts)
            completions, kv = path(model, processor, prompts[:todo], shown[:todo], n, max_new_tokens,
                                   [key + seed for key in keys[:todo]])
            for per_prompt in completions:
                for completion in per_prompt:
                    sampling.answer(completion, parse)
            return completions, kv
        return fn

    print(f"{header}; {max_new_tokens} new tokens (lengths uniform on 1..{max_new_tokens}); torch threads "
          f"{torch.get_num_threads()}; median of {repeats}; {load()}")
    try:
        results = compare(model, {name: calls(path) for name, path in samplers.items()}, repeats)
    finally:
        hazard.handle.remove()
    report(results, len(prompts) * n, sum(map(len, shown)))
    print(f"  after: {load()}")


def bench_voting(model, processor, images, description, samplers: dict, pairs: int, k: int, max_new_tokens: int,
                 repeats: int) -> None:
    """K/2 votes in each order of `pairs` pairs, one prompt per (pair, order), as sample_votes.py batches them."""
    assert k % 2 == 0, "K/2 votes per order"
    prompt = prompts.get_preset("evoquality").prompt("compare", True)
    shown = [[images[2 * p], images[2 * p + 1]][::order] for p in range(pairs) for order in (1, -1)]
    header = (f"== voting, {description}: {pairs} pairs x K={k} in one call ({len(shown)} prompts of 2 images x "
              f"{k // 2} votes = {len(shown) * k // 2} sequences), reasoning prompt")
    bench_calls(model, processor, samplers, [prompt] * len(shown), shown, k // 2, max_new_tokens, repeats,
                prompts.parse_compare, header)


def samplers_for(against: str | None) -> dict:
    first = {f"sampler of {against}": commit_path(against)} if against else {
        "generate(num_return_sequences)": generate_path}
    return {**first, "sampling.sample (shared prefix)": sample_path}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="30m")
    parser.add_argument("--against", default=None, help="a commit whose sampling.py runs beside today's (default: "
                                                         "generate)")
    parser.add_argument("--pairs-per-call", default="4,8", help="pairs per sampling call, comma separated")
    parser.add_argument("--votes", type=int, default=32, help="K votes per pair, K/2 per order")
    parser.add_argument("--max-new-tokens", type=int, default=192, help="budget T; lengths uniform on 1..T")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    samplers = samplers_for(args.against)
    per_call = [int(x) for x in args.pairs_per_call.split(",")]
    model, processor, images, description = load_size(args.size, 2 * max(per_call))
    for pairs in per_call:
        bench_voting(model, processor, images, description, samplers, pairs, args.votes, args.max_new_tokens,
                     args.repeats)


if __name__ == "__main__":
    main()
