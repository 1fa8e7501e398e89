"""make_wide_model: the inputs of bench/gpu_check.sh. A random Qwen2.5-VL with Qwen2.5-VL-7B's widths (hidden 3584,
vocabulary 152064, vision 1280) but few layers, so that a full fine-tune fits one GPU; the tokenizer and processor of
fixtures/tiny_models.py (max_pixels of the real Qwen2.5-VL, so a 1024 x 768 image gives the real 999 image tokens);
KonIQ-sized synthetic JPEGs and a pseudolabels.jsonl whose pairs are disjoint (every step rolls out 2 x pairs images).

    python bench/make_wide_model.py OUT [--text-layers 4] [--vision-depth 4] [--pairs 12] [--device cuda]
    python bench/make_wide_model.py OUT --meta    # no weights: config, processor, images, labels (CPU, seconds)

Writes OUT/model/ (config.json, processor, weights unless --meta), OUT/images/*.jpg, OUT/pseudolabels.jsonl and
OUT/inputs.json (the measured prompt length, image tokens and patches, for bench/memory_plan.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402
import prompts  # noqa: E402
import memory_plan  # noqa: E402
from fixtures.tiny_models import build_processor, build_tokenizer  # noqa: E402

CONFIG_7B = ROOT / "bench" / "qwen2_5_vl_7b_config.json"


def wide_config(tokenizer, text_layers: int, vision_depth: int, source: Path = CONFIG_7B):
    """The 7B config with fewer layers and blocks, and the special-token ids of our tokenizer."""
    from transformers import AutoConfig

    cfg = json.loads(source.read_text())
    cfg["num_hidden_layers"] = cfg["max_window_layers"] = text_layers
    vision = cfg["vision_config"]
    full = [i for i in vision["fullatt_block_indexes"] if i < vision_depth]
    vision.update(depth=vision_depth, fullatt_block_indexes=full or [vision_depth - 1])
    token = tokenizer.convert_tokens_to_ids
    cfg.update(image_token_id=token("<|image_pad|>"), video_token_id=token("<|video_pad|>"),
               vision_start_token_id=token("<|vision_start|>"), vision_end_token_id=token("<|vision_end|>"),
               vision_token_id=token("<|vision_pad|>"), bos_token_id=token("<|endoftext|>"),
               eos_token_id=token("<|im_end|>"), pad_token_id=token("<|endoftext|>"))
    assert cfg["vocab_size"] >= len(tokenizer)
    return AutoConfig.for_model(**cfg)


def write_images(folder: Path, n: int, size: tuple[int, int] = (1024, 768), seed: int = 0) -> list[str]:
    """n KonIQ-sized JPEGs: a colour gradient with noise of growing strength (content does not matter to a random
    model; the size sets the image tokens)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0, 1, width)[None, :, None] * np.linspace(0.3, 1, height)[:, None, None]
    names = []
    for k in range(n):
        colour = rng.uniform(40, 215, 3)
        pixels = colour * (0.5 + ramp) + rng.normal(0, 4 + 4 * k, (height, width, 3))
        names.append(f"img_{k:03d}.jpg")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / names[-1], quality=90)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--vision-depth", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=12, help="disjoint pairs (2 x pairs images)")
    parser.add_argument("--device", default="cuda", help="where the random weights are initialised")
    parser.add_argument("--meta", action="store_true", help="no weights: check the config, processor and inputs only")
    a = parser.parse_args()
    import torch
    import transformers

    out = Path(a.out)
    model_dir = out / "model"
    tokenizer = build_tokenizer()
    processor = build_processor("qwen2_5_vl", tokenizer, max_pixels=memory_plan.Settings.max_pixels,
                                min_pixels=memory_plan.Settings.min_pixels)
    config = wide_config(tokenizer, a.text_layers, a.vision_depth)
    with torch.device("meta" if a.meta else a.device):
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config = transformers.GenerationConfig(bos_token_id=eos[1], pad_token_id=eos[1], eos_token_id=eos)
    counted = sum(memory_plan.numel(shape) for _, _, shape in memory_plan.param_shapes(config.to_dict()))
    built = sum(p.numel() for p in model.parameters())
    if counted != built:
        sys.exit(f"error: memory_plan counts {counted:,} parameters, the model has {built:,}")
    if a.meta:
        config.save_pretrained(model_dir)
    else:  # bf16 on disk like the released checkpoints; grpo_train.py loads its fp32 master copy from it
        model.to(torch.bfloat16).save_pretrained(model_dir)
    processor.save_pretrained(model_dir)

    names = write_images(out / "images", 2 * a.pairs)
    common.write_jsonl_atomic(out / "pseudolabels.jsonl", [{"a": names[2 * k], "b": names[2 * k + 1],
                                                            "p_star": 0.25 + 0.5 * (k % 2)} for k in range(a.pairs)])
    preset = prompts.get_preset("evoquality")
    encoded = common.encode_batch(processor, [preset.prompt("score", True)],
                                  [[common.load_image(out / "images" / names[0])]], preset.add_vision_id)
    patches = int(encoded["image_grid_thw"].prod())
    image_tokens = int((encoded["input_ids"] == config.image_token_id).sum())
    prompt = encoded["input_ids"].shape[1]
    settings = memory_plan.Settings(config=str(model_dir))
    if patches != memory_plan.image_patches(config.to_dict(), settings):
        sys.exit(f"error: the processor gives {patches} patches, memory_plan {memory_plan.image_patches(config.to_dict(), settings)}")
    inputs = {"parameters": built, "patches": patches, "image_tokens": image_tokens, "prompt_tokens": prompt,
              "text_tokens": prompt - image_tokens, "images": len(names), "pairs": a.pairs, "weights": not a.meta}
    common.write_json_atomic(out / "inputs.json", inputs)
    print(json.dumps(inputs))


if __name__ == "__main__":
    main()
