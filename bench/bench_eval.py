"""Benchmark: evaluation with --samples 8 through sampling.sample (each prompt prefilled once) against plain
`generate(num_return_sequences=8)` (which prefills every image's prompt 8 times), side by side.

    OMP_NUM_THREADS=2 python bench/bench_eval.py                         # both model sizes, 3 repeats each
    OMP_NUM_THREADS=2 python bench/bench_eval.py --size 30m --samples 8 --repeats 1

One image per prompt (the score prompt with reasoning, evaluate.py's default), --batch-size images per call as
evaluate.py batches them, sampled at temperature 1. The model sizes, the counters (prompt tokens prefilled per
generated sequence, vision patches encoded per image) and the timing rules (one warm-up each, alternating repeats,
medians) are bench_votes.py's.

    python bench/bench_eval.py --bootstrap-images 2000            # the cost of the 95 % intervals, no model

times metrics.bootstrap (1,000 resamples of N synthetic scored images: SRCC and PLCC vectorised over resamples,
KRCC and the logistic fit per resample) against one scipy call per metric and resample, side by side.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_votes import prompts, sampling, compare, load, load_size, new_generate, old_generate, report  # noqa: E402

SETTINGS = {  # size: (images, new tokens)
    "tiny": (32, 64),
    "30m": (8, 8),
}


def bench_size(size: str, repeats: int, samples: int, batch_size: int) -> None:
    import torch

    n_images, max_new_tokens = SETTINGS[size]
    model, processor, images, description = load_size(size, n_images)
    prompt = prompts.get_preset("evoquality").prompt("score", True)

    def scores(generate):
        def fn(warmup: bool = False) -> int:
            todo = images[:1] if warmup else images
            for s in range(0, len(todo), batch_size):
                for per_image in generate(model, processor, prompt, [[im] for im in todo[s:s + batch_size]], samples,
                                          max_new_tokens):
                    for text, truncated in per_image:  # parsed as the stage does
                        sampling.answer(sampling.Completion(text, truncated), prompts.parse_score)
            return len(todo)
        return fn

    print(f"== {size}: {description}; {n_images} images x {samples} samples, {max_new_tokens} new tokens, "
          f"{batch_size} images per call; torch threads {torch.get_num_threads()}; median of {repeats}; {load()}")
    results = compare(model, {"generate (n copies)": scores(old_generate),
                              "new (sampling.sample)": scores(new_generate)}, repeats)
    report(results, "images", n_images * samples, n_images)
    print(f"  after: {load()}")


def bench_bootstrap(n: int, resamples: int) -> None:
    import time
    import warnings

    import numpy as np

    import metrics

    rng = np.random.default_rng(0)
    mos = rng.uniform(1, 5, n)
    pred = mos + rng.normal(0, 0.8, n)
    times = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, fn in [("metrics.bootstrap", lambda: metrics.bootstrap(pred, mos, resamples, 0, "b")),
                          ("one scipy call per metric and resample", lambda: [
                              [f(pred[i], mos[i]) for f in (metrics.METRICS[k] for k in metrics.CI_METRICS)]
                              for i in metrics.resample_indices(n, resamples, 0, "b")])]:
            start = time.perf_counter()
            fn()
            times[label] = time.perf_counter() - start
    print(f"== bootstrap: {n} images x {resamples} resamples, 4 metrics; {load()}")
    for label, seconds in times.items():
        print(f"  {label}: {seconds:.1f} s")
    print(f"  ratio: {times['one scipy call per metric and resample'] / times['metrics.bootstrap']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "30m", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=8, help="evaluate.py --samples: answers per image")
    parser.add_argument("--batch-size", type=int, default=8, help="evaluate.py --batch-size: images per call")
    parser.add_argument("--bootstrap-images", type=int, default=0, help="time the 95 %% intervals on N images instead")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (with --bootstrap-images)")
    args = parser.parse_args()
    if args.bootstrap_images:
        return bench_bootstrap(args.bootstrap_images, args.resamples)
    for size in (["tiny", "30m"] if args.size == "both" else [args.size]):
        bench_size(size, args.repeats, args.samples, args.batch_size)


if __name__ == "__main__":
    main()
