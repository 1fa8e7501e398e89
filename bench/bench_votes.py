"""Benchmark: voting through sampling.sample (each prompt prefilled once) against the plain generate path
(`generate(num_return_sequences=n)`, which prefills every prompt once per vote), side by side in one run.

    OMP_NUM_THREADS=2 python bench/bench_votes.py                        # both model sizes, 3 repeats each
    OMP_NUM_THREADS=2 python bench/bench_votes.py --size 30m --repeats 1

K votes on P pairs with the compare prompt, K/2 per order (two images per prompt), batched as sample_votes.py does
(--batch-size sequences per call, whole prompts). Both paths see the same prompts after one warm-up call each; the
repeats alternate generate/sample and the medians are printed. Beside seconds and votes/s: prompt tokens the language model
PREFILLED per generated sequence (padding included: it is computed) and vision patches ENCODED per image shown,
counted by forward pre-hooks on the language model and the vision tower.

Model sizes (random Qwen2.5-VL weights built from config like fixtures/tiny_models.py, cached in runs/bench_cache/):
  tiny  the tests' default model (text 64 x 2, images capped at 56 px: 4 tokens each): overhead-dominated;
  30m   text 512 x 8 layers, vision 256 x 4, 448 px images (256 tokens each): compute-dominated on a CPU, a stand-in
        for 7B's prefill-heavy regime on a GPU (24 M parameters with the tiny tokenizer's vocabulary). With other
        work on the cores, OMP_NUM_THREADS=1 gives stable timings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import prompts  # noqa: E402
import sampling  # noqa: E402

SIZES = {  # name: (checkpoint dims for fixtures.tiny_models.build_tiny_checkpoint, synthetic image side in pixels)
    "tiny": ({}, 112),
    "30m": (dict(text_hidden=512, text_layers=8, vision_hidden=256, vision_depth=4, max_pixels=448 * 448), 448),
}


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
# The two paths: prompt text, images per prompt, n -> per prompt, n (text, truncated)
# ---------------------------------------------------------------------------------------------------------------------


def generate_path(model, processor, prompt: str, images: list, n: int, max_new_tokens: int, temperature: float = 1.0,
                 do_sample: bool = True) -> list[list[tuple[str, bool]]]:
    """One generate call with num_return_sequences=n, which expands the batch BEFORE prefill."""
    import torch

    inputs = common.encode_batch(processor, [prompt] * len(images), images).to(model.device)
    config = sampling.sampling_config(model, max_new_tokens, temperature, do_sample=do_sample, num_return_sequences=n)
    with torch.inference_mode():
        sequences = model.generate(**inputs, generation_config=config)
    length = inputs["input_ids"].shape[1]
    texts = sampling.completion_texts(processor, sequences, length)
    eos = torch.tensor(sampling.eos_token_ids(config), device=sequences.device)
    finished = torch.isin(sequences[:, length:], eos).any(dim=1).tolist()
    return [[(texts[i * n + j], not finished[i * n + j]) for j in range(n)] for i in range(len(images))]


def sample_path(model, processor, prompt: str, images: list, n: int, max_new_tokens: int, temperature: float = 1.0,
                 do_sample: bool = True) -> list[list[tuple[str, bool]]]:
    """sampling.sample: each prompt prefilled once, its n completions decoded from copies of its KV cache."""
    samples = sampling.sample_prompts(model, processor, [prompt] * len(images), images, n, max_new_tokens, temperature,
                                      do_sample=do_sample)
    return [[(c.text, c.truncated) for c in per_prompt] for per_prompt in samples.completions()]


# ---------------------------------------------------------------------------------------------------------------------
# Counting and timing
# ---------------------------------------------------------------------------------------------------------------------


class Counter:
    """Forward pre-hooks: tokens through the language model in calls over more than one position (prefill) and in
    one-position calls (decode); patches and images through the vision tower."""

    def __init__(self, model):
        self.prefilled = self.decoded = self.patches = self.images = 0
        self.handles = [model.model.language_model.register_forward_pre_hook(self.language, with_kwargs=True),
                        model.model.visual.register_forward_pre_hook(self.vision, with_kwargs=True)]

    def language(self, module, args, kwargs):
        batch, length = kwargs["inputs_embeds"].shape[:2]
        if length > 1:
            self.prefilled += batch * length
        else:
            self.decoded += batch

    def vision(self, module, args, kwargs):
        pixels = args[0] if args else kwargs["hidden_states"]
        grid = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        self.patches += pixels.shape[0]
        self.images += len(grid)

    def remove(self):
        for handle in self.handles:
            handle.remove()


def run(model, fn) -> dict:
    """Seconds and counts of one call of fn()."""
    counter = Counter(model)
    start = time.perf_counter()
    try:
        units = fn()
    finally:
        seconds = time.perf_counter() - start
        counter.remove()
    return {"seconds": seconds, "units": units, "prefilled": counter.prefilled, "decoded": counter.decoded,
            "patches": counter.patches, "vision_images": counter.images}


def compare(model, fns: dict, repeats: int) -> dict:
    """One warm-up and `repeats` timed runs of each path, alternating (load on a shared machine hits both alike);
    medians of seconds, counts of the last run (they do not change between runs)."""
    import torch

    for fn in fns.values():
        torch.manual_seed(0)
        fn(warmup=True)
    runs = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            torch.manual_seed(r)
            runs[name].append(run(model, fn))
    return {name: {**results[-1], "seconds": statistics.median(x["seconds"] for x in results),
                   "all_seconds": [round(x["seconds"], 2) for x in results]} for name, results in runs.items()}


def report(results: dict, unit: str, sequences: int, image_slots: int) -> None:
    """The table: one line per path, then generate/sample."""
    rows = {}
    for name, r in results.items():
        rows[name] = (r["seconds"], r["units"] / r["seconds"], r["prefilled"] / sequences, r["patches"] / image_slots)
        print(f"  {name:<28} {r['seconds']:8.2f} s  {rows[name][1]:9.2f} {unit}/s  {rows[name][2]:10.1f} "
              f"prefilled tokens/seq  {rows[name][3]:8.1f} vision patches/image   (runs: {r['all_seconds']} s)")
    gen, new = rows.values()
    print(f"  {'ratio generate/sample':<28} {gen[0] / new[0]:7.2f}x  {new[1] / gen[1]:8.2f}x {unit}/s "
          f"{gen[2] / new[2]:9.2f}x prefilled tokens    {gen[3] / new[3]:7.2f}x vision patches")


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs"


# ---------------------------------------------------------------------------------------------------------------------
# Voting
# ---------------------------------------------------------------------------------------------------------------------

SETTINGS = {  # size: (pairs, K, new tokens); both at a sampling batch of 64 sequences
    "tiny": (16, 8, 32),
    "30m": (4, 16, 8),
}


def bench_size(size: str, repeats: int, batch_size: int) -> None:
    import torch

    pairs, k, max_new_tokens = SETTINGS[size]
    assert k % 2 == 0, "K/2 votes per order"
    model, processor, images, description = load_size(size, 2 * pairs)
    prompt = prompts.get_preset("evoquality").prompt("compare", True)
    # K/2 votes in each order; one prompt per (pair, order), as sample_votes.py batches them
    shown = [[images[2 * p], images[2 * p + 1]][::order] for p in range(pairs) for order in (1, -1)]
    n = k // 2
    step = max(1, batch_size // n)

    def votes(generate):
        def fn(warmup: bool = False) -> int:
            todo = shown[:1] if warmup else shown
            counted = 0
            for s in range(0, len(todo), step):
                for per_prompt in generate(model, processor, prompt, todo[s:s + step], n, max_new_tokens):
                    for text, truncated in per_prompt:  # parsed as the stage does; every answer is a vote
                        sampling.answer(sampling.Completion(text, truncated), prompts.parse_compare)
                        counted += 1
            return counted
        return fn

    print(f"== {size}: {description}; {pairs} pairs x K={k} ({len(shown)} prompts of 2 images x {n} votes), "
          f"{max_new_tokens} new tokens, {batch_size} sequences per call; torch threads {torch.get_num_threads()}; "
          f"median of {repeats}; {load()}")
    results = compare(model, {"generate(num_return_sequences)": votes(generate_path),
                              "sampling.sample (prefill once)": votes(sample_path)}, repeats)
    report(results, "votes", len(shown) * n, 2 * len(shown))
    print(f"  after: {load()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "30m", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per call, in whole prompts")
    args = parser.parse_args()
    for size in (["tiny", "30m"] if args.size == "both" else [args.size]):
        bench_size(size, args.repeats, args.batch_size)


if __name__ == "__main__":
    main()
