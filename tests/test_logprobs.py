"""The shared-prompt log-probs (each prompt once, its G completions packed behind it) against the per-row forward:
per-token log-probs and gradients of vision and language parameters, on tiny Qwen2.5-VL, Qwen2-VL and Qwen3-VL."""

import numpy as np
import pytest
import torch
from PIL import Image

import common
import logprobs
import sampling

ARCHS = ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"]
LOGPROB_TOL = 1e-5  # absolute, per token
GRAD_TOL = 1e-5  # relative to the parameter gradient's largest entry


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    from fixtures.tiny_models import build_tiny_checkpoint

    return {arch: str(build_tiny_checkpoint(tmp_path_factory.mktemp(arch), arch)) for arch in ARCHS}


def rollouts(checkpoint: str, G: int, seed: int = 0):
    """Two short prompts whose images and texts differ in length (the shorter is left padded) and G completions of
    each: text tokens of different lengths, an EOS mid-way and padding behind it, a sampled image placeholder in one."""
    processor = common.load_processor(checkpoint)
    model = common.load_model(checkpoint, dtype=torch.float32)
    rng = np.random.default_rng(seed)
    images = [[Image.fromarray(rng.integers(0, 256, (32, w, 3), dtype=np.uint8))] for w in (64, 32)]
    prompts = dict(common.encode_batch(processor, ["Score the quality of this image.", "Score it."], images))
    assert prompts["image_grid_thw"][0].prod() > prompts["image_grid_thw"][1].prod()
    assert (prompts["attention_mask"][1] == 0).sum() > 3  # left padding
    config = sampling.sampling_config(model, max_new_tokens=8)
    eos, pad = sampling.eos_token_ids(config), config.pad_token_id
    placeholders = tuple(sampling.placeholder_token_ids(model))
    generator = torch.Generator().manual_seed(seed)
    T = 7
    ids = torch.randint(50, 500, (2 * G, T), generator=generator)  # ordinary text tokens
    for row in range(0, 2 * G, 3):  # an EOS mid-way, padding after it: lengths differ
        end = row % (T - 1) + 1
        ids[row, end] = eos[0]
        ids[row, end + 1:] = pad
    ids[1, 3] = model.config.image_token_id
    mask = sampling.completion_mask(ids, eos + list(placeholders))
    assert mask[1].tolist() == [1, 1, 1, 1, 0, 0, 0] and len(set(mask.sum(1).tolist())) > 2
    return model, prompts, ids, mask, placeholders, pad


PARAMS = {"vision patch embedding": lambda m: m.model.visual.patch_embed.proj.weight,
          "vision block 0 qkv": lambda m: m.model.visual.blocks[0].attn.qkv.weight,
          "language layer 0 q": lambda m: m.model.language_model.layers[0].self_attn.q_proj.weight,
          "language last mlp": lambda m: m.model.language_model.layers[-1].mlp.down_proj.weight,
          "embeddings": lambda m: m.model.language_model.embed_tokens.weight}


def run(model, prompts, ids, mask, placeholders, pad, shared: bool, grad: bool) -> tuple:
    """Per-token log-probs, and the gradients of PARAMS of a loss in which every used token has its own weight."""
    G = len(ids) // 2
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad):
        if shared:
            logp = logprobs.shared_prompt(model, prompts, ids, 0.7, placeholders, pad)
        else:
            rows = logprobs.select_rows(prompts, [0] * G + [1] * G, model.config.vision_start_token_id)
            logp = logprobs.per_row(model, rows, ids, 0.7, placeholders, pad)
        if grad:
            (logp * torch.randn(ids.shape, generator=torch.Generator().manual_seed(1)) * mask).sum().backward()
    return logp.detach(), {k: get(model).grad.clone() for k, get in PARAMS.items()} if grad else {}


def gaps(expect: tuple, got: tuple, mask: torch.Tensor) -> tuple[float, dict]:
    """The largest per-token log-prob gap, and per parameter the largest gradient gap relative to its largest entry."""
    assert all(g.abs().max() > 0 for g in expect[1].values())  # every parameter is in the graph
    return ((got[0] - expect[0])[mask.bool()].abs().max().item(),
            {k: ((got[1][k] - g).abs().max() / g.abs().max()).item() for k, g in expect[1].items()})


@pytest.mark.parametrize("G", [2, 32])
@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prompt_equals_the_per_row_forward(checkpoints, arch, G):
    model, *batch = rollouts(checkpoints[arch], G)
    mask = batch[2]
    expect = {"eval": run(model.eval(), *batch, shared=False, grad=False)}
    expect["train"] = run(model.train(), *batch, shared=False, grad=True)
    layer_calls, mlp = [], model.model.language_model.layers[0].mlp
    mlp.forward = lambda *a, forward=mlp.forward: layer_calls.append(1) or forward(*a)  # the recompute skips hooks
    for mode in ("eval", "train", "train + gradient checkpointing"):
        if mode == "train + gradient checkpointing":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train(mode != "eval")
        layer_calls.clear()
        logprob_gap, grad_gaps = gaps(expect[mode.split()[0]], run(model, *batch, shared=True, grad=mode != "eval"),
                                      mask)
        assert len(layer_calls) == (2 if "checkpointing" in mode else 1)  # one packed forward (and its recompute)
        print(f"{arch} G={G} {mode}: log-prob gap {logprob_gap:.1e}, gradient gaps "
              + ", ".join(f"{k} {v:.1e}" for k, v in grad_gaps.items()))
        assert logprob_gap < LOGPROB_TOL, mode
        assert all(v < GRAD_TOL for v in grad_gaps.values()), (mode, grad_gaps)


def broken_layout(mutation: str):
    """packed_layout with one of its two rules broken: a completion that also sees the completions before it
    ("cross"), or completion positions one off ("shift +1", "shift -1")."""
    layout = logprobs.packed_layout

    def broken(model, prompts, G, T):
        out, L = layout(model, prompts, G, T), prompts["input_ids"].shape[1]
        if mutation == "cross":
            out["attention_mask"][:, :, L:, L:] |= torch.ones(G * T, G * T, dtype=torch.bool).tril()
        else:
            out["position_ids"][:, :, L:] += int(mutation.split()[1])
        return out
    return broken


@pytest.mark.parametrize("arch", ARCHS)
def test_a_broken_layout_fails_the_parity_check(checkpoints, arch, monkeypatch):
    """The parity check can fail: a completion that sees the completions before it, or completion positions one
    off, gives log-probs and gradients well outside the tolerances."""
    model, *batch = rollouts(checkpoints[arch], 2)
    expect = run(model.train(), *batch, shared=False, grad=True)
    for mutation in ("cross", "shift +1", "shift -1"):
        monkeypatch.setattr(logprobs, "packed_layout", broken_layout(mutation))
        logprob_gap, grad_gaps = gaps(expect, run(model, *batch, shared=True, grad=True), batch[2])
        monkeypatch.undo()
        print(f"{arch} {mutation}: log-prob gap {logprob_gap:.1e}, largest gradient gap {max(grad_gaps.values()):.1e}")
        assert logprob_gap > 10 * LOGPROB_TOL and max(grad_gaps.values()) > 10 * GRAD_TOL, mutation


def test_vision_tower_runs_once_per_image_and_bad_groups_are_refused(checkpoints):
    model, prompts, ids, mask, placeholders, pad = rollouts(checkpoints["qwen2_5_vl"], 4)
    calls = []
    hook = model.model.visual.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        logprobs.shared_prompt(model, prompts, ids, 0.7, placeholders, pad)
    hook.remove()
    assert calls == [int(prompts["image_grid_thw"].prod(-1).sum())]  # both images, once, in one vision pass
    with pytest.raises(ValueError, match="not whole groups"):
        logprobs.shared_prompt(model, prompts, ids[:-1], 0.7)
