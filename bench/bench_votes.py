"""Benchmark: sample_votes.py's voting core against a naive loop (one prompt and one `generate` call per vote).

    OMP_NUM_THREADS=2 python bench/bench_votes.py [--pairs 16] [--votes-per-pair 8] [--max-new-tokens 32]

Both run in this one process on the tiny random Qwen2.5-VL (demo.tiny_models) and the demo pool images, on the same
pairs with the same K, after one warm-up call each. Prints votes/s for both, the ratio and peak memory.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import sample_votes  # noqa: E402


def naive_votes(model, processor, pairs, root, k, seed, max_new_tokens) -> int:
    """The loop to beat: every vote is its own one-prompt generate call."""
    import torch

    preset = common.get_preset("evoquality")
    prompt = preset.prompt("compare", True)
    config = common.sampling_config(model, max_new_tokens, temperature=1.0, num_return_sequences=1)
    votes = 0
    for a, b in pairs:
        images = {x: common.load_image(root / x) for x in (a, b)}
        for order, n in sample_votes.vote_orders(a, b, k, seed).items():
            shown = [images[a], images[b]] if order == "ab" else [images[b], images[a]]
            for _ in range(n):
                inputs = common.encode_batch(processor, [prompt], [shown], preset.add_vision_id).to(model.device)
                with torch.inference_mode():
                    sequences = model.generate(**inputs, generation_config=config)
                common.parse_compare(common.completion_texts(processor, sequences, inputs["input_ids"].shape[1])[0])
                votes += 1
    return votes


def peak_memory() -> str:
    import torch

    rss = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (process, so far)"
    if torch.cuda.is_available():
        rss += f", peak CUDA {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB (this phase)"
        torch.cuda.reset_peak_memory_stats()
    return rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--votes-per-pair", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64, help="sample_votes' --batch-size (sequences per call)")
    bench = parser.parse_args()
    import torch

    from demo.synthetic import write_set
    from demo.tiny_models import build_tiny_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="bench_votes_"))
    model_dir, root = str(build_tiny_checkpoint(tmp / "tiny")), write_set(tmp / "pool", "pool", 12)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = common.load_model(model_dir, device=device).eval(), common.load_processor(model_dir)
    _, names = common.list_images(root)
    pairs = [(names[i], names[j]) for i, j in sample_votes.sample_pairs(len(names), bench.pairs, seed=0)]
    args = sample_votes.Args(model=model_dir, images=str(root), out="-", votes_per_pair=bench.votes_per_pair,
                             max_new_tokens=bench.max_new_tokens, batch_size=bench.batch_size)
    generate_fn = sample_votes.make_generate_fn(model, processor, True, args.max_new_tokens, args.temperature)
    k, step = args.votes_per_pair, max(1, args.batch_size // args.votes_per_pair)
    print(f"device {device}, torch threads {torch.get_num_threads()}, {len(pairs)} pairs x K={k}, "
          f"{args.max_new_tokens} new tokens per vote, batch size {args.batch_size}")

    torch.manual_seed(0)
    sample_votes.process_chunk(pairs[:step], args, root, generate_fn, {})  # warm-up
    naive_votes(model, processor, pairs[:1], root, 1, 0, args.max_new_tokens)
    peak_memory()

    start = time.perf_counter()
    records = [r for s in range(0, len(pairs), step)
               for r in sample_votes.process_chunk(pairs[s:s + step], args, root, generate_fn, {})]
    core_s = time.perf_counter() - start
    core_votes = sum(len(r["answers"]) for r in records)
    print(f"sample_votes core: {core_votes} votes in {core_s:.2f} s = {core_votes / core_s:.1f} votes/s; "
          f"{peak_memory()}")

    start = time.perf_counter()
    naive = naive_votes(model, processor, pairs, root, k, 0, args.max_new_tokens)
    naive_s = time.perf_counter() - start
    print(f"naive loop:        {naive} votes in {naive_s:.2f} s = {naive / naive_s:.1f} votes/s; {peak_memory()}")
    print(f"ratio (core / naive votes/s): {(core_votes / core_s) / (naive / naive_s):.1f}x (target >= 5x)")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
