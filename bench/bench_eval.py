"""Benchmark: evaluation with --samples through sampling.sample against another sampler, side by side in one run: the
plain generate path (`generate(num_return_sequences=samples)`, which prefills every image's prompt once per sample),
or with --against COMMIT that commit's sampling.py.

    OMP_NUM_THREADS=1 python bench/bench_eval.py --size 30m --images 8 --samples 8        # against generate
    OMP_NUM_THREADS=1 python bench/bench_eval.py --size 30m --against COMMIT
    OMP_NUM_THREADS=1 python bench/bench_eval.py --size tiny --images 4 --samples 4 --max-new-tokens 16

One image per prompt (the score prompt with its reasoning suffix, evaluate.py's default), all --images in one call of
--images x --samples sequences (evaluate.py with a --batch-size that large), sampled at temperature 1 and parsed as
evaluate.py parses. The model sizes, the uneven completion lengths, the counters (prompt tokens prefilled per
completion, vision patches per image, row-steps, KV bytes) and the timing rules (one warm-up each, alternating repeats,
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
from bench_votes import SIZES, bench_calls, load, load_size, prompts, samplers_for  # noqa: E402


def bench_evaluation(size: str, samplers: dict, images: int, samples: int, max_new_tokens: int, repeats: int) -> None:
    model, processor, pictures, description = load_size(size, images)
    prompt = prompts.get_preset("evoquality").prompt("score", True)
    header = (f"== evaluation, {description}: {images} images x --samples {samples} in one call ({images * samples} "
              "sequences), score prompt with reasoning")
    bench_calls(model, processor, samplers, [prompt] * images, [[picture] for picture in pictures], samples,
                max_new_tokens, repeats, prompts.parse_score, header)


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
    parser.add_argument("--size", choices=sorted(SIZES), default="30m")
    parser.add_argument("--against", default=None, help="a commit whose sampling.py runs beside today's (default: "
                                                         "generate)")
    parser.add_argument("--images", type=int, default=8, help="images in the call, one prompt each")
    parser.add_argument("--samples", type=int, default=8, help="evaluate.py --samples: answers per image")
    parser.add_argument("--max-new-tokens", type=int, default=192, help="budget T; lengths uniform on 1..T")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--bootstrap-images", type=int, default=0, help="time the 95 %% intervals on N images instead")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (with --bootstrap-images)")
    args = parser.parse_args()
    if args.bootstrap_images:
        return bench_bootstrap(args.bootstrap_images, args.resamples)
    bench_evaluation(args.size, samplers_for(args.against), args.images, args.samples, args.max_new_tokens,
                     args.repeats)


if __name__ == "__main__":
    main()
