"""memory_plan: the per-GPU and host memory plan of grpo_train.py's FSDP2 path, from a model's config.json alone.

    python bench/memory_plan.py --config bench/qwen2_5_vl_7b_config.json --gpus 8 --gpu-gib 80 \\
        --micro-batch-size 4 --group-size 8 --pairs-per-step 4 --max-new-tokens 512 --gradient-checkpointing
    python bench/memory_plan.py --config bench/qwen2_5_vl_7b_config.json --gpu-gib 80 --voting   # sample_votes.py
    python bench/memory_plan.py --config bench/qwen2_5_vl_7b_config.json --gpu-gib 80 --evaluation   # evaluate.py

Parameters are counted exactly from the config (every weight and bias of a Qwen2.5-VL, by its HF name and shape) and
checked against the model built on the meta device (no memory, no download). Every other row is arithmetic over
those shapes and the settings; the assumptions behind each are printed with the plan. A step goes through four
phases (rollout, reference log-probs, policy update, optimizer step); the peak of each is what is resident in every
phase (the fp32 shards, the AdamW state, the reference) plus that phase's own buffers, plus a CUDA/NCCL allowance.
--voting prints instead the largest sample_votes.py batch on one GPU, with the shared-prefix sampler and with each
prompt's KV cache copied per vote, and what its default --batch-size takes; --evaluation the same for evaluate.py.
tests/test_memory_plan.py checks the counted rows against measured tensors on the tiny model; bench/gpu_check.sh
sets the plan's peak beside a measured one on one GPU.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

GiB = 2 ** 30


@dataclass
class Settings:
    config: str = common.arg(help="a Qwen2.5-VL config.json (the file, or a folder holding one)")
    gpus: int = common.arg(8, help="N: GPUs the policy is sharded over (one process each)")
    gpu_gib: float = common.arg(80.0, help="memory of one GPU in GiB, for the margin")
    micro_batch_size: int = common.arg(4, help="grpo_train.py --micro-batch-size: rollouts per forward/backward, "
                                               "whole groups (at least one)")
    group_size: int = common.arg(8, help="grpo_train.py --group-size: G rollouts per image")
    pairs_per_step: int = common.arg(4, help="grpo_train.py --pairs-per-step (per process)")
    image_width: int = common.arg(1024, help="image width in pixels (KonIQ-10k: 1024 x 768)")
    image_height: int = common.arg(768, help="image height in pixels")
    text_tokens: int = common.arg(110, help="prompt tokens besides the image's: chat template + the evoquality "
                                            "score prompt (about 430 characters), an estimate for Qwen's tokenizer")
    max_pixels: int = common.arg(12845056, help="image processor max_pixels (Qwen2.5-VL's preprocessor_config.json)")
    min_pixels: int = common.arg(3136, help="image processor min_pixels")
    max_new_tokens: int = common.arg(512, help="grpo_train.py --max-new-tokens; every completion is taken to run to it")
    gradient_checkpointing: bool = common.arg(True, help="grpo_train.py --gradient-checkpointing")
    bf16: bool = common.arg(True, help="grpo_train.py --bf16: bf16 compute and all-gathers, bf16 reference")
    shard_reference: bool = common.arg(False, help="grpo_train.py --shard-reference: the reference sharded too")
    rollout_batch: int = common.arg(8, help="grpo_train.py --rollout-batch: images per sampling call (x G rows)")
    prefill_once: bool = common.arg(True, help="sampling.sample prefills each prompt once (--no-prefill-once: "
                                               "generate prefills all G rows)")
    shared_prefix: bool = common.arg(True, help="sampling.sample keeps each prompt's KV once and each completion's own "
                                                "tokens (--no-shared-prefix: the prompt's KV copied per completion)")
    voting: bool = common.arg(False, help="print the largest sample_votes.py batch on ONE GPU instead (both samplers)")
    votes_per_pair: int = common.arg(32, help="--voting: sample_votes.py --votes-per-pair K (K/2 per prompt)")
    vote_tokens: int = common.arg(512, help="--voting/--evaluation: --max-new-tokens; every completion runs to it")
    compare_text_tokens: int = common.arg(130, help="--voting: text tokens of the two-image compare prompt with its "
                                                    "reasoning suffix (an estimate for Qwen's tokenizer)")
    evaluation: bool = common.arg(False, help="print the largest evaluate.py batch on ONE GPU instead (both samplers; "
                                              "one image per prompt, --text-tokens of text)")
    samples: int = common.arg(1, help="--evaluation: evaluate.py --samples per image (1, greedy: the most memory per "
                                      "sequence, each its own prompt)")
    logprob_chunk: int = common.arg(64, help="completion positions per fp32 chunk of the gather-minus-logsumexp "
                                             "log-probs (logprobs.py's LOGPROB_CHUNK), recomputed in backward")
    overhead_gib: float = common.arg(3.0, help="per-GPU allowance: CUDA context, cuBLAS workspaces, NCCL buffers, "
                                               "allocator fragmentation")
    process_rss_gib: float = common.arg(3.0, help="host RAM of one process before any weight (python, torch, CUDA)")
    check_meta: bool = common.arg(True, help="also count the parameters of the model built on the meta device")


# ---------------------------------------------------------------------------------------------------------------------
# Parameters: every tensor of a Qwen2.5-VL from its config, grouped into the FSDP units grpo_train.py --fsdp shards
# ---------------------------------------------------------------------------------------------------------------------


def text_config(cfg: dict) -> dict:
    """The language model's settings: the published config.json is flat, transformers 5 nests them in text_config."""
    flat = {k: v for k, v in cfg.items() if not isinstance(v, dict)}
    return {**flat, **cfg.get("text_config", {})}


def param_shapes(cfg: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """(FSDP unit, HF parameter name, shape) of every parameter. Units: each decoder layer, each vision block, and
    the root (embeddings, final norm, lm_head, vision patch embedding and merger)."""
    if cfg.get("model_type") != "qwen2_5_vl":
        raise SystemExit(f"error: model_type {cfg.get('model_type')!r}: this plan counts Qwen2.5-VL (qwen2_5_vl) only")
    t, v = text_config(cfg), cfg["vision_config"]
    h, V, I, L = t["hidden_size"], t["vocab_size"], t["intermediate_size"], t["num_hidden_layers"]
    q, kv = t["num_attention_heads"] * head_dim(t), t["num_key_value_heads"] * head_dim(t)
    shapes = [("root", "model.language_model.embed_tokens.weight", (V, h))]
    for i in range(L):
        shapes += [(f"text layer {i}", f"model.language_model.layers.{i}.{name}", shape) for name, shape in [
            ("self_attn.q_proj.weight", (q, h)), ("self_attn.q_proj.bias", (q,)),
            ("self_attn.k_proj.weight", (kv, h)), ("self_attn.k_proj.bias", (kv,)),
            ("self_attn.v_proj.weight", (kv, h)), ("self_attn.v_proj.bias", (kv,)),
            ("self_attn.o_proj.weight", (h, q)),  # no bias
            ("mlp.gate_proj.weight", (I, h)), ("mlp.up_proj.weight", (I, h)), ("mlp.down_proj.weight", (h, I)),
            ("input_layernorm.weight", (h,)), ("post_attention_layernorm.weight", (h,))]]
    shapes.append(("root", "model.language_model.norm.weight", (h,)))
    hv, Iv, m = v["hidden_size"], v["intermediate_size"], v["spatial_merge_size"]
    channels = v.get("in_channels", v.get("in_chans", 3))
    shapes.append(("root", "model.visual.patch_embed.proj.weight",  # Conv3d, no bias
                   (hv, channels, v["temporal_patch_size"], v["patch_size"], v["patch_size"])))
    for i in range(v["depth"]):
        shapes += [(f"vision block {i}", f"model.visual.blocks.{i}.{name}", shape) for name, shape in [
            ("norm1.weight", (hv,)), ("norm2.weight", (hv,)),
            ("attn.qkv.weight", (3 * hv, hv)), ("attn.qkv.bias", (3 * hv,)),
            ("attn.proj.weight", (hv, hv)), ("attn.proj.bias", (hv,)),
            ("mlp.gate_proj.weight", (Iv, hv)), ("mlp.gate_proj.bias", (Iv,)),
            ("mlp.up_proj.weight", (Iv, hv)), ("mlp.up_proj.bias", (Iv,)),
            ("mlp.down_proj.weight", (hv, Iv)), ("mlp.down_proj.bias", (hv,))]]
    merged = hv * m * m  # the merger concatenates m x m neighbouring patches
    shapes += [("root", "model.visual.merger.ln_q.weight", (hv,)),
               ("root", "model.visual.merger.mlp.0.weight", (merged, merged)),
               ("root", "model.visual.merger.mlp.0.bias", (merged,)),
               ("root", "model.visual.merger.mlp.2.weight", (v["out_hidden_size"], merged)),
               ("root", "model.visual.merger.mlp.2.bias", (v["out_hidden_size"],))]
    if not cfg.get("tie_word_embeddings", t.get("tie_word_embeddings", False)):
        shapes.append(("root", "lm_head.weight", (V, h)))
    return shapes


def head_dim(t: dict) -> int:
    return t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def shard_numel(shape: tuple[int, ...], n: int) -> int:
    """Elements one rank holds of a parameter FSDP2 shards on dim 0 over n ranks: ceil(dim0 / n) rows (the padded
    shard every rank allocates; rank 0's real shard is exactly this size)."""
    return -(-shape[0] // n) * numel(shape[1:])


def meta_param_count(config_path: str) -> tuple[int, dict[str, tuple[int, ...]]]:
    """Parameter count and shapes of the real model class built from the config on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(config_path))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    return sum(map(numel, shapes.values())), shapes


# ---------------------------------------------------------------------------------------------------------------------
# Tokens, KV cache, activations
# ---------------------------------------------------------------------------------------------------------------------


def image_patches(cfg: dict, s: Settings) -> int:
    """Vision patches of one image after Qwen's smart_resize (sides rounded to patch x merge, area bounded)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    v = cfg["vision_config"]
    factor = v["patch_size"] * v["spatial_merge_size"]
    height, width = smart_resize(s.image_height, s.image_width, factor, s.min_pixels, s.max_pixels)
    return (height // v["patch_size"]) * (width // v["patch_size"])


def kv_cache_bytes(cfg: dict, rows: int, tokens: int, dtype_bytes: int) -> int:
    """Keys and values of every decoder layer for `rows` sequences of `tokens` tokens."""
    t = text_config(cfg)
    return rows * tokens * t["num_hidden_layers"] * 2 * t["num_key_value_heads"] * head_dim(t) * dtype_bytes


def text_layer_saved_per_token(cfg: dict, cb: int) -> int:
    """What one decoder layer saves for backward per token (no checkpointing; cb = bytes of the compute dtype): each
    RMSNorm its fp32 input, its normalised output and an fp32 rsqrt; the q/k/v input, q and k after RoPE, v, the
    attention output (= o_proj's input) and its fp32 logsumexp per head; the MLP input, gate, up, silu(gate) and
    down_proj's input (4 x intermediate). Attention through a fused kernel: no tokens x tokens matrix.
    Equal to saved-tensor hooks on a real layer (tests/test_memory_plan.py)."""
    t = text_config(cfg)
    h, heads = t["hidden_size"], t["num_attention_heads"]
    kv = t["num_key_value_heads"] * head_dim(t)
    return 2 * (4 * h + cb * h + 4) + cb * (4 * h + 2 * kv + 4 * t["intermediate_size"]) + 4 * heads


def vision_block_saved_per_patch(cfg: dict, cb: int) -> int:
    """The same for a vision block, per patch: the fused qkv output stays alive whole (v is a view of it) beside the
    roped q and k, and the attention output is copied before proj (9 widths instead of the text layer's 4 + KV)."""
    v = cfg["vision_config"]
    hv = v["hidden_size"]
    return 2 * (4 * hv + cb * hv + 4) + cb * (9 * hv + 4 * v["intermediate_size"]) + 4 * v["num_heads"]


def inference_per_token(width: int, intermediate: int, cb: int) -> int:
    """Live buffers of one layer's forward without autograd, per token: input, output, fp32 norm, q/k/v/attention
    (about 4 widths), gate, up and their product (3 x intermediate)."""
    return 4 * width + cb * (6 * width + 3 * intermediate)


def sampler_kv_bytes(cfg: dict, prompts: int, n: int, prompt: int, new: int, cb: int, shared: bool) -> int:
    """KV bytes one sampling call holds for `prompts` prompts x n completions, each run to `new` tokens. Shared prefix
    (sampling.sample): each prompt's tokens once and each completion's own tokens. Copies: prompt + new tokens for
    every completion."""
    if shared:
        return kv_cache_bytes(cfg, prompts, prompt, cb) + kv_cache_bytes(cfg, prompts * n, new, cb)
    return kv_cache_bytes(cfg, prompts * n, prompt + new, cb)


def sampler_rows(cfg: dict, prompts: int, n: int, prompt: int, new: int, cb: int, shared: bool, prefill_rows: int,
                 images: int, patches: int, image_tokens: int) -> list[Row]:
    """What one sampling call holds beside the weights: KV cache, prefill transient, decode attention, logits."""
    t, v = text_config(cfg), cfg["vision_config"]
    h, V, heads = t["hidden_size"], t["vocab_size"], t["num_attention_heads"]
    rows = prompts * n
    kv_note = (f"{prompts} prompts x {prompt} tokens once + {rows} rows x {new} new tokens" if shared else
               f"{rows} rows ({prompts} prompts x {n}) x {prompt + new} tokens ({prompt} prompt + {new} new)")
    layers = t["num_hidden_layers"]
    out = [
        Row("KV cache" + (", shared prefix" if shared else ", copied per completion"),
            sampler_kv_bytes(cfg, prompts, n, prompt, new, cb, shared), kv_note),
        Row("KV while " + ("a layer's buffers are rebuilt" if shared else "the prefill's cache is copied"),
            kv_cache_bytes(cfg, rows, new, cb) // layers if shared else kv_cache_bytes(cfg, prompts, prompt, cb),
            "one layer's generated part twice (growth, compaction)" if shared else "the prompts' cache beside its "
            "copies"),
        Row("prefill transient (one layer at a time)",
            max(prefill_rows * prompt * inference_per_token(h, t["intermediate_size"], cb),
                images * patches * inference_per_token(v["hidden_size"], v["intermediate_size"], cb))
            + images * image_tokens * h * cb,
            f"{prefill_rows} prompt rows, or the vision tower on {images} images; plus the image embeddings"),
        Row("sampling logits", rows * V * (cb + 8), "one step's logits, their fp32 scores and exp (the block draw)"),
    ]
    if shared:
        out.append(Row("decode attention scores (one layer)", prompts * heads * n * prompt * 8,
                       f"fp32 scores and their exp over each prompt's keys: [{prompts}, {heads} heads, {n}, {prompt}]"))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The plan: rows per phase, then totals
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    bytes: int
    note: str = ""


def plan(cfg: dict, s: Settings) -> dict:
    """Every row of the plan, by phase, plus the numbers the rows are made of."""
    N, cb = s.gpus, 2 if s.bf16 else 4
    shapes = param_shapes(cfg)
    P = sum(numel(sh) for _, _, sh in shapes)
    P_shard = sum(shard_numel(sh, N) for _, _, sh in shapes)
    units: dict[str, int] = {}
    for unit, _, sh in shapes:
        units[unit] = units.get(unit, 0) + numel(sh)
    root = units.pop("root")
    largest_unit = max(units.values())
    t, v = text_config(cfg), cfg["vision_config"]
    h, L, V, hv, D = t["hidden_size"], t["num_hidden_layers"], t["vocab_size"], v["hidden_size"], v["depth"]
    patches = image_patches(cfg, s)
    image_tokens = patches // v["spatial_merge_size"] ** 2
    prompt = image_tokens + s.text_tokens
    T, S = s.max_new_tokens, image_tokens + s.text_tokens + s.max_new_tokens  # every completion runs to the budget
    images = min(s.rollout_batch, 2 * s.pairs_per_step)  # images of one sampling call
    rollouts, G = images * s.group_size, s.group_size
    prefill_rows = images if s.prefill_once else rollouts
    # log-prob micro-batch (logprobs.shared_prompt): whole groups, each a packed row [prompt, c_1 .. c_G]
    groups = max(1, s.micro_batch_size // G)
    B, packed = groups * G, prompt + G * T  # completions, tokens of one packed row
    tokens = groups * packed  # forwarded per micro-batch (per-row: B x S)
    chunk = B * min(s.logprob_chunk, T) * V * 4  # one fp32 chunk of logits / temperature
    logits = B * T * V * cb  # lm_head output at the completion positions of one micro-batch
    mask = groups * packed ** 2 * (1 + cb)  # the boolean 4D mask and sdpa's additive copy of it
    inference = max(tokens * inference_per_token(h, t["intermediate_size"], cb),
                    groups * patches * inference_per_token(hv, v["intermediate_size"], cb))
    # resident in every phase: what FSDP keeps sharded, and the reference
    resident = [
        Row("fp32 master parameters", 4 * P_shard, f"1/{N} shard (dim 0, padded)"),
        Row("AdamW m and v (fp32)", 8 * P_shard + 4 * len(shapes), f"1/{N} shard, plus a step counter per tensor"),
        Row(f"reference, {'bf16' if s.bf16 else 'fp32'}",
            cb * (P_shard + root) if s.shard_reference else cb * P,
            f"frozen, sharded 1/{N}, plus its root, gathered for good after its first forward (FSDP2 reshards a root "
            "only after backward)" if s.shard_reference else "frozen replica on every GPU (--shard-reference: 1/N)"),
    ]
    # rollout: the whole policy gathered once (no collective per token), one sampling call's KV cache
    rollout = [
        Row("policy unsharded for generate", cb * P, "all-gathered once per rollout phase, resharded after"),
        *sampler_rows(cfg, images, G, prompt, T, cb, s.shared_prefix, prefill_rows, images, patches, image_tokens),
    ]
    # reference log-probs: a no-grad forward per micro-batch, one layer's buffers at a time
    reference_rows = [
        Row("forward transient (one layer at a time)", inference + 2 * tokens * h * cb,
            f"{groups} packed row(s) of {packed} tokens (prompt {prompt} once + G {G} x {T}), or {groups} x "
            f"{patches} patches in the vision tower"),
        Row("packed attention mask", mask, f"{groups} x {packed}^2: boolean, and sdpa's additive copy"),
        Row("logits + log-prob chunk", logits + 2 * chunk,
            f"{B} x {T} x {V} lm_head output; fp32 chunk of {B} x {min(s.logprob_chunk, T)} positions and its exp"),
    ]
    if s.shard_reference:
        reference_rows.insert(0, Row("reference: 2 layers gathered", cb * 2 * largest_unit,
                                     "the current one and the prefetched one"))
    # policy update: forward + backward per micro-batch, gradients reduce-scattered into fp32 shards
    if s.gradient_checkpointing:
        activations = Row("activations, gradient checkpointing",
                          L * tokens * h * cb + D * groups * patches * hv * cb
                          + 2 * max(tokens * text_layer_saved_per_token(cfg, cb),
                                    groups * patches * vision_block_saved_per_patch(cfg, cb)),
                          "each layer's and block's input kept; one layer recomputed in backward (x2 with its grads)")
    else:
        activations = Row("activations, no checkpointing (estimate)",
                          L * tokens * text_layer_saved_per_token(cfg, cb)
                          + D * groups * patches * vision_block_saved_per_patch(cfg, cb),
                          f"{text_layer_saved_per_token(cfg, cb) / 1024:.0f} KiB/token/layer, "
                          f"{vision_block_saved_per_patch(cfg, cb) / 1024:.0f} KiB/patch/block saved for backward")
    update = [
        Row("fp32 gradients", 4 * P_shard, f"1/{N} shard (reduce-scattered in fp32)"),
        Row("root unsharded + its grads", root * (cb + cb + 4),
            f"{root / 1e9:.2f} B params (embeddings, lm_head, vision patch embed + merger): "
            "kept gathered from forward to backward; grads in compute dtype + an fp32 copy to reduce-scatter"),
        Row("2 layers in flight", 2 * largest_unit * (cb + cb + 4),
            f"largest unit {largest_unit / 1e6:.0f} M params: current + prefetched, params + grads + fp32 copy"),
        activations,
        Row("packed attention mask", mask, "kept for backward (and the recompute)"),
        Row("logits + log-prob chunk, with grads", 2 * logits + 3 * chunk,
            "lm_head output (kept for the chunks' recompute) and its grad; one recomputed fp32 chunk, its exp, its grad"),
    ]
    optimizer_step = [
        Row("fp32 gradients", 4 * P_shard, "clipped, then consumed by AdamW"),
        Row("AdamW foreach temporaries", 4 * P_shard, "sqrt(v) of every shard at once (one fp32 shard-sized list)"),
    ]
    return {"P": P, "P_shard": P_shard, "units": units, "root": root, "largest_unit": largest_unit,
            "patches": patches, "image_tokens": image_tokens, "prompt": prompt, "S": S, "images": images,
            "groups": groups, "packed": packed, "tokens_shared": prompt + G * T, "tokens_per_row": G * S,
            "rollouts": rollouts, "resident": resident,
            "phases": {"rollout": rollout, "reference log-probs": reference_rows, "policy update": update,
                       "optimizer step": optimizer_step},
            "overhead": int(s.overhead_gib * GiB)}


def phase_peaks(p: dict) -> dict[str, int]:
    """Bytes at each phase's peak: resident + the phase's rows + the CUDA/NCCL allowance."""
    resident = sum(r.bytes for r in p["resident"])
    return {name: resident + sum(r.bytes for r in rows) + p["overhead"] for name, rows in p["phases"].items()}


def host_rows(p: dict, s: Settings) -> list[Row]:
    """Host RAM at start-up (models are read into CPU memory before they reach a GPU) and at the final save."""
    cb, P, N = 2 if s.bf16 else 4, p["P"], s.gpus
    base = N * s.process_rss_gib * GiB
    reference = cb * P if s.shard_reference else N * cb * P
    return [
        Row("start-up, every rank reads both models", N * (4 * P + cb * P) + base,
            f"{N} x (fp32 policy {4 * P / GiB:.1f} + reference {cb * P / GiB:.1f} GiB): what --fsdp avoids"),
        Row("start-up, --fsdp", max(4 * P, reference) + base,
            "rank 0 reads the fp32 policy and sends each rank its shards (the others build on meta); then the "
            + ("reference the same way" if s.shard_reference else f"bf16 reference replica is read by all {N} ranks")),
        Row("final save, rank 0", 4 * P + cb * P + base,
            "full fp32 state dict gathered to rank 0's CPU, then cast to the checkpoint dtype"),
    ]


def gib(x: float) -> str:
    return f"{x / GiB:6.1f}"


def report(cfg: dict, s: Settings, config_name: str, meta_count: int | None) -> str:
    p = plan(cfg, s)
    peaks = phase_peaks(p)
    text_p = sum(numel(sh) for u, n, sh in param_shapes(cfg) if not n.startswith("model.visual."))
    lines = [f"Memory plan of grpo_train.py --fsdp for {config_name}",
             f"parameters: {p['P']:,} ({p['P'] / 1e9:.2f} B; text {text_p / 1e9:.2f} B, vision "
             f"{(p['P'] - text_p) / 1e9:.2f} B), counted from the config"
             + ("" if meta_count is None else
                f"; meta-device model: {meta_count:,} ({'match' if meta_count == p['P'] else 'MISMATCH'})"),
             f"GPUs: {s.gpus} x {s.gpu_gib:g} GiB; {'bf16' if s.bf16 else 'fp32'} compute, gradient checkpointing "
             f"{'on' if s.gradient_checkpointing else 'off'}, reference {'sharded' if s.shard_reference else 'replica'}",
             f"sampling call: {p['images']} images x G {s.group_size} = {p['rollouts']} rows; "
             f"image {s.image_width}x{s.image_height} -> {p['patches']} patches, "
             f"{p['image_tokens']} image tokens; prompt {p['prompt']} tokens, sequence {p['S']}; "
             f"log-prob micro-batch {p['groups']} group(s) of G {s.group_size}, each a packed row of "
             f"{p['packed']} tokens: {p['tokens_shared']} tokens per image where one row per rollout forwards "
             f"{p['tokens_per_row']} ({p['tokens_per_row'] / p['tokens_shared']:.1f}x)",
             "", f"{'per GPU':58s} {'GiB':>6s}  note"]
    lines.append("resident in every phase")
    lines += [f"  {r.name:56s} {gib(r.bytes)}  {r.note}" for r in p["resident"]]
    for name, rows in p["phases"].items():
        lines.append(f"{name} (on top of the resident rows)")
        lines += [f"  {r.name:56s} {gib(r.bytes)}  {r.note}" for r in rows]
    lines.append(f"  {'CUDA/NCCL allowance (every phase)':56s} {gib(p['overhead'])}  context, workspaces, NCCL, "
                 "fragmentation")
    lines += ["", f"peak per GPU by phase (of {s.gpu_gib:g} GiB)"]
    limit = s.gpu_gib * GiB
    for name, peak in peaks.items():
        lines.append(f"  {name:56s} {gib(peak)}  margin {gib(limit - peak).strip()} GiB "
                     f"({(limit - peak) / limit:.0%})")
    worst = max(peaks, key=peaks.get)
    verdict = "fits" if peaks[worst] <= limit else "DOES NOT FIT"
    lines.append(f"  {'=> peak: ' + worst:56s} {gib(peaks[worst])}  {verdict}, margin "
                 f"{(limit - peaks[worst]) / GiB:.1f} GiB")
    lines += ["", f"{'host RAM (one node)':58s} {'GiB':>6s}"]
    lines += [f"  {r.name:56s} {gib(r.bytes)}  {r.note}" for r in host_rows(p, s)]
    lines += ["", "assumptions"] + [f"  - {a}" for a in [
        "FSDP2 fully_shard on every decoder layer, every vision block and the root; parameters sharded on dim 0 "
        "(each rank allocates ceil(dim0 / N) rows); MixedPrecisionPolicy(param_dtype=compute dtype, "
        "reduce_dtype=fp32); fp32 master weights, gradients and AdamW m, v.",
        "gradients exist only in the policy-update phase (zero_grad(set_to_none=True) after each step).",
        "the policy is gathered once for the whole rollout phase (unshard, generate, reshard); in forward/backward "
        "FSDP gathers one layer at a time with one prefetched, and keeps the root gathered from forward to backward.",
        f"every completion runs to --max-new-tokens ({s.max_new_tokens}); the KV cache holds the G rows of one "
        f"sampling call ({p['images']} images, --rollout-batch {s.rollout_batch}) in the compute dtype; "
        + ("each prompt prefilled once" if s.prefill_once else "generate prefills all G rows of each prompt")
        + ("; its KV kept once, each rollout keeps only its own tokens (sampling.sample's shared prefix)."
           if s.shared_prefix else "; its KV copied G times."),
        "the vision tower runs once per image in a sampling call and in each log-prob pass (logprobs.shared_prompt: "
        "each prompt once, its G completions packed behind it under a [S, S] boolean mask).",
        f"prompt = {p['image_tokens']} image tokens + {s.text_tokens} text tokens (chat template + prompt; an "
        f"estimate for Qwen's tokenizer); image processor max_pixels {s.max_pixels}.",
        "attention through fused kernels (SDPA flash / memory-efficient): no tokens x tokens score matrix is "
        "stored; the log-prob passes hold their packed rows' mask (1 + compute-dtype bytes per entry).",
        f"log-probs: gather minus logsumexp over fp32 chunks of {s.logprob_chunk} positions, each chunk checkpointed "
        "(recomputed in backward), so only the compute-dtype logits and their grad span the micro-batch.",
        "exact sizes, checked against real tensors in tests/test_memory_plan.py: parameters, fp32 shards, AdamW "
        "state, KV cache, image patches, and what one layer / one block saves for backward; estimates: how many of "
        "those are live at once (activation, transient, logits rows) and the allowance.",
        f"CUDA/NCCL allowance {s.overhead_gib:g} GiB per GPU; host: {s.process_rss_gib:g} GiB per process before "
        "weights (included in every host row), one model read at a time; 1 GiB = 1.074 GB (an '80 GB' H100 shows about 79.6 GiB).",
    ]]
    return "\n".join(lines)


def voting_plan(cfg: dict, s: Settings) -> dict:
    """sample_votes.py on ONE GPU: per call P prompts (a pair in one order, two images) x K/2 votes."""
    return sampling_plan(cfg, s, 2, s.compare_text_tokens, s.votes_per_pair // 2)


def evaluation_plan(cfg: dict, s: Settings) -> dict:
    """evaluate.py on ONE GPU: per call P prompts (one image each) x --samples answers."""
    return sampling_plan(cfg, s, 1, s.text_tokens, s.samples)


def sampling_plan(cfg: dict, s: Settings, images_per_prompt: int, text_tokens: int, n: int) -> dict:
    """A stage that only samples, on ONE GPU: bf16 weights, then per call P prompts x n completions, every completion
    to --vote-tokens; for each sampler (shared prefix, copies) the largest P whose peak fits --gpu-gib, and `call`,
    the peak of any P. A call peaks either in its prefill (the prompts' KV and one layer's activations) or in its
    decode (the whole KV cache, the logits of a step, the attention scores of a layer): the prefill's activations are
    freed before the decode's buffers grow."""
    cb = 2 if s.bf16 else 4
    v = cfg["vision_config"]
    patches = image_patches(cfg, s)
    image_tokens = patches // v["spatial_merge_size"] ** 2
    prompt = images_per_prompt * image_tokens + text_tokens
    weights = cb * sum(numel(sh) for _, _, sh in param_shapes(cfg))
    overhead = int(s.overhead_gib * GiB)

    def call(prompts: int, shared: bool = True) -> dict:  # P images per call (a pair's two orders share its 2)
        rows = sampler_rows(cfg, prompts, n, prompt, s.vote_tokens, cb, shared, prompts, prompts, patches,
                            image_tokens)
        activations = next(r.bytes for r in rows if r.name.startswith("prefill transient"))
        prefill = kv_cache_bytes(cfg, prompts, prompt, cb) + activations
        decode = sum(r.bytes for r in rows) - activations
        return {"rows": rows, "prefill": prefill, "decode": decode,
                "peak": weights + overhead + max(prefill, decode)}

    plans = {}
    for shared in (True, False):
        fits = 0
        while call(fits + 1, shared)["peak"] <= s.gpu_gib * GiB:
            fits += 1
        plans[shared] = {"prompts": fits, **call(max(fits, 1), shared)}
    return {"prompt": prompt, "n": n, "weights": weights, "overhead": overhead, "image_tokens": image_tokens,
            "plans": plans, "call": call}


def default_batch_size(script: str) -> int:
    """The --batch-size a stage ships with (its Args dataclass), read without running it."""
    import dataclasses
    import importlib

    return next(f.default for f in dataclasses.fields(importlib.import_module(script).Args) if f.name == "batch_size")


def sampling_report(cfg: dict, s: Settings, config_name: str) -> str:
    script, p = ("sample_votes", voting_plan(cfg, s)) if s.voting else ("evaluate", evaluation_plan(cfg, s))
    n, images = p["n"], 2 if s.voting else 1
    per_prompt = (f"K {s.votes_per_pair} = {n} votes per prompt (one order of a pair)" if s.voting else
                  f"--samples {n} per prompt")
    lines = [f"{'Voting' if s.voting else 'Evaluation'} plan of {script}.py on ONE GPU of {s.gpu_gib:g} GiB for "
             f"{config_name}",
             f"{'bf16' if s.bf16 else 'fp32'} weights {p['weights'] / GiB:.1f} GiB, CUDA allowance "
             f"{p['overhead'] / GiB:g} GiB; a prompt: {images} x {p['image_tokens']} image tokens ({s.image_width}x"
             f"{s.image_height}) + {p['prompt'] - images * p['image_tokens']} text = {p['prompt']} tokens; "
             f"{per_prompt}; every completion runs to {s.vote_tokens} new tokens", ""]
    for shared, name in ((False, "each prompt's KV copied per completion"), (True, "shared prefix (sampling.sample)")):
        plan = p["plans"][shared]
        P = plan["prompts"]
        lines.append(f"{name}: at most {P} prompts per call = --batch-size {P * n} sequences")
        lines += [f"  {r.name:56s} {gib(r.bytes)}  {r.note}" for r in plan["rows"]]
        lines.append(f"  {'in the prefill (prompts KV + activations)':56s} {gib(plan['prefill'])}")
        lines.append(f"  {'in the decode (the rest)':56s} {gib(plan['decode'])}")
        lines.append(f"  {'peak, with the weights and the allowance':56s} {gib(plan['peak'])}")
    before, after = (p["plans"][x]["prompts"] * n for x in (False, True))
    default = default_batch_size(script)
    peak = p["call"](max(1, default // n))["peak"]
    lines += ["", f"=> largest {'voting' if s.voting else 'evaluation'} batch: {before} -> {after} sequences per call "
              f"({after / max(before, 1):.1f}x), every completion run to the budget; answers of uneven length leave "
              "the shared batch early and free their rows",
              f"=> {script}.py's default --batch-size {default} ({max(1, default // n)} prompts x {n}): peak "
              f"{gib(peak).strip()} GiB, {(s.gpu_gib * GiB - peak) / GiB:.1f} GiB to spare"]
    return "\n".join(lines)


def main() -> None:
    s = common.parse_args(Settings)
    path = Path(s.config) / "config.json" if Path(s.config).is_dir() else Path(s.config)
    if not path.is_file():
        common.die(f"--config {s.config}: no such config.json")
    cfg = json.loads(path.read_text())
    if s.voting or s.evaluation:
        return print(sampling_report(cfg, s, str(path)))
    meta = meta_param_count(str(path))[0] if s.check_meta else None
    print(report(cfg, s, str(path), meta))
    if meta is not None and meta != sum(numel(sh) for _, _, sh in param_shapes(cfg)):
        common.die(f"{path}: the count from the config differs from the meta-device model's ({meta:,})")


if __name__ == "__main__":
    main()
