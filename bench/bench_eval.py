"""Benchmark evaluate.py's scorer: images/s of batched generation vs a naive one-image-per-generate loop.

Same model, same images, same greedy decoding, measured side by side in one run (the tiny model by default):

    python bench/bench_eval.py                          # tiny random Qwen2.5-VL, 32 demo images, batch 8
    python bench/bench_eval.py --model Qwen/Qwen2.5-VL-7B-Instruct --images data/koniq/1024x768 --n-images 64
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import evaluate  # noqa: E402


@dataclass
class Args:
    model: str = common.arg("", help="checkpoint (default: build the tiny random Qwen2.5-VL)")
    images: str = common.arg("", help="image folder or list (default: synthetic demo images)")
    n_images: int = common.arg(32, help="images scored by each method")
    batch_size: int = common.arg(8, help="images per generate call for the batched scorer")
    max_new_tokens: int = common.arg(64, help="tokens per answer (the tiny model never stops early)")


def images_per_second(model, processor, images, batch_size: int, generation_config, prompt, preset) -> float:
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        evaluate.generate_answers(model, processor, images[i:i + batch_size], prompt, preset, generation_config, 1)
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    import torch

    args = common.parse_args(Args)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.model:
            from demo.tiny_models import build_tiny_checkpoint

            args.model = str(build_tiny_checkpoint(Path(tmp) / "tiny"))
        if not args.images:
            from demo.synthetic import write_set

            args.images = str(write_set(Path(tmp) / "bench", "bench", args.n_images))
        root, names = common.list_images(args.images)
        images = [common.load_image(root / name) for name in names[:args.n_images]]
        model = common.load_model(args.model, device="cuda" if torch.cuda.is_available() else None).eval()
        processor = common.load_processor(args.model)
    preset = common.get_preset("evoquality")
    prompt = preset.prompt("score", True)
    generation_config = common.sampling_config(model, args.max_new_tokens, do_sample=False)
    images_per_second(model, processor, images[:args.batch_size], args.batch_size, generation_config, prompt, preset)

    naive = images_per_second(model, processor, images, 1, generation_config, prompt, preset)
    batched = images_per_second(model, processor, images, args.batch_size, generation_config, prompt, preset)
    print(f"device {model.device}, torch threads {torch.get_num_threads()}, {len(images)} images, "
          f"{args.max_new_tokens} new tokens each, greedy")
    print(f"naive   (1 image per generate):  {naive:8.2f} images/s")
    print(f"batched ({args.batch_size} images per generate): {batched:8.2f} images/s")
    print(f"speed-up: {batched / naive:.2f}x")


if __name__ == "__main__":
    main()
