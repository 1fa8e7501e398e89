"""Tiny random-weight Qwen-VL checkpoints of the REAL architectures, built offline.

The model hub is unreachable in tests and CI, and a user's real checkpoint must take the same code path as ours, so
this builds everything a checkpoint folder holds, with no download: a byte-level BPE tokenizer trained here (with all
Qwen special tokens), the real Qwen2.5-VL chat template (`chat_template.jinja` beside this file), the real image
processor with a small `max_pixels`, a random `*ForConditionalGeneration` with tiny dims, and a generation config that
copies the quirks of Qwen2.5-VL's shipped one (top_k=1). It is saved with `save_pretrained` and loaded back through
`common.load_model` / `common.load_processor` like any hub id.

    python demo/tiny_models.py OUT_DIR [--arch qwen2_5_vl|qwen2_vl|qwen3_vl]
"""

from __future__ import annotations

import argparse
from pathlib import Path

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]
CHAT_TEMPLATE = (Path(__file__).parent / "chat_template.jinja").read_text()


def tokenizer_corpus() -> list[str]:
    """Text the BPE is trained on: the prompts, the answer formats, numbers, a little reasoning prose."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from prompts import PRESETS

    texts = []
    for preset in PRESETS.values():
        for task in ("compare", "score"):
            texts += [preset.prompt(task, True), preset.prompt(task, False)]
    texts += ["system\nYou are a helpful assistant.", "user\n", "assistant\n", "Picture 1: ", "Picture 2: "]
    texts += [f"\\boxed{{{i / 100:.2f}}}" for i in range(100, 501)] + ["\\boxed{0}", "\\boxed{1}"]
    texts += [f"<answer>{i / 100:.2f}</answer>" for i in range(100, 501, 7)] + ["<answer>0</answer>", "<answer>1</answer>"]
    texts += ["<think> The image is sharp, with little noise and good contrast. </think>",
              "<think> The first image is blurry and noisy; the second one looks cleaner. </think>"] * 20
    return texts


def build_tokenizer(vocab_size: int = 600):
    """A Qwen2Tokenizer over a byte-level BPE trained here, with the 14 Qwen special tokens (and <think> tags)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(tokenizer_corpus(), trainer)
    state = bpe.model.__getstate__() if hasattr(bpe.model, "__getstate__") else None
    import json

    model_json = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    del state
    tokenizer = Qwen2Tokenizer(vocab=model_json["vocab"], merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    tokenizer.add_tokens(["<think>", "</think>", "<answer>", "</answer>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(arch: str, tokenizer, max_pixels: int = 56 * 56, min_pixels: int = 28 * 28):
    from transformers import (Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor,
                              Qwen3VLProcessor)

    patch = 16 if arch == "qwen3_vl" else 14
    image_processor = Qwen2VLImageProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                            size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    if arch == "qwen3_vl":
        from transformers import Qwen3VLVideoProcessor

        video_processor = Qwen3VLVideoProcessor(patch_size=patch, merge_size=2)
        cls = Qwen3VLProcessor
    else:
        video_processor = Qwen2VLVideoProcessor(patch_size=patch, merge_size=2)
        cls = Qwen2_5_VLProcessor if arch == "qwen2_5_vl" else Qwen2VLProcessor
    return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
               chat_template=CHAT_TEMPLATE)


def build_model(arch: str, tokenizer, text_hidden: int = 64, text_layers: int = 2, vision_hidden: int = 32,
                vision_depth: int = 2, seed: int = 0):
    import torch
    import transformers

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    heads = 4
    head_dim = text_hidden // heads
    half = head_dim // 2
    mrope = [half - 2 * (half // 4), half // 4, half // 4]  # temporal, height, width; sums to head_dim / 2
    text = dict(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=2,
                max_position_embeddings=4096, bos_token_id=eos[1], eos_token_id=eos[0], pad_token_id=eos[1],
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope})
    if arch == "qwen2_5_vl":
        vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                      out_hidden_size=text_hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      window_size=112, fullatt_block_indexes=[vision_depth - 1])
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    elif arch == "qwen2_vl":
        vision = dict(depth=vision_depth, embed_dim=vision_hidden, hidden_size=text_hidden, num_heads=2, mlp_ratio=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        cls = transformers.Qwen2VLForConditionalGeneration
    elif arch == "qwen3_vl":
        text.update(head_dim=head_dim)
        text["rope_parameters"].update(mrope_interleaved=True)
        vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                      out_hidden_size=text_hidden, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                      num_position_embeddings=64, deepstack_visual_indexes=[0])
        config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
        cls = transformers.Qwen3VLForConditionalGeneration
    else:
        raise ValueError(f"unknown arch {arch!r}")
    torch.manual_seed(seed)
    model = cls(config)
    # Copy the shipped Qwen2.5-VL generation config, quirks included (top_k=1 makes every sample identical):
    # the stages must override it explicitly, and the tests check that they do.
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=eos[1], pad_token_id=eos[1], eos_token_id=eos, do_sample=True, repetition_penalty=1.05,
        temperature=0.1, top_p=0.001, top_k=1)
    return model


def build_tiny_checkpoint(out_dir: str | Path, arch: str = "qwen2_5_vl", seed: int = 0, **dims) -> Path:
    """Build and save a tiny checkpoint folder loadable with AutoModelForImageTextToText / AutoProcessor."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    processor = build_processor(arch, tokenizer, **{k: dims.pop(k) for k in ("max_pixels", "min_pixels") if k in dims})
    model = build_model(arch, tokenizer, seed=seed, **dims)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--arch", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    print(build_tiny_checkpoint(a.out_dir, a.arch, a.seed))
