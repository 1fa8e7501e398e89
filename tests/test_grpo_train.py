"""grpo_train.py: the three pure functions against hand-worked numbers and autograd, log-prob parity with generate,
and subprocess runs of the script (one step, kill + resume, two processes, bad input)."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from scipy.stats import norm

import common
import grpo_train
import logprobs
import prompts
import sampling
import votes
from sampling import completion_mask
from grpo_train import group_advantages, grpo_loss, pair_fidelity_rewards

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------------------------------------------------------------
# pair_fidelity_rewards
# ---------------------------------------------------------------------------------------------------------------------


def fidelity(p_star, p):
    return math.sqrt(p_star * p) + math.sqrt((1 - p_star) * (1 - p))


def test_fidelity_rewards_golden():
    g = 1e-6
    scores = {"x": [4.0, 2.0, None], "y": [3.0, 3.0, 3.0], "z": [None, None, None], "w": [1.0, 5.0, 3.0]}
    pairs = [("x", "y", 1.0), ("x", "z", 0.5), ("w", "x", 0.5), ("y", "w", 0.0)]
    r = pair_fidelity_rewards(scores, pairs, gamma=g)
    # x: mu 3, var 2 (ddof 1); y: mu 3, var 0; w: mu 3, var 4; z: no valid score -> gives no term to x
    sx = math.sqrt(2 + 0 + g)
    sxw = math.sqrt(2 + 4 + g)
    expect_x = [(fidelity(1.0, norm.cdf((q - 3) / sx)) + fidelity(0.5, norm.cdf((q - 3) / sxw))) / 2
                for q in (4.0, 2.0)]
    assert r["x"][:2] == pytest.approx(expect_x, abs=1e-12)
    assert r["x"][2] == 0.0  # unparseable rollout
    # hand-worked: q = 4 vs y is Phi(1/sqrt 2) = 0.760250, fidelity(1, .) = sqrt(0.760250) = 0.871923;
    # vs w Phi(1/sqrt 6) = 0.658448 at p* = 0.5: sqrt(.329224) + sqrt(.170776) = 0.573780 + 0.413251
    assert r["x"][0] == pytest.approx((0.871923 + 0.573780 + 0.413251) / 2, abs=2e-6)
    # y: partners x (p*(y, x) = 1 - 1 = 0) and w (p*(y, w) = 0); all y scores equal the partners' means: p = 0.5
    assert r["y"] == pytest.approx([math.sqrt(0.5)] * 3, abs=1e-9)
    # w: partners x (p*(w, x) = 0.5) and y (p*(w, y) = 1); a tie at p* = 0.5 with q = mu gives fidelity 1
    sw = math.sqrt(4 + 2 + g)
    swy = math.sqrt(4 + 0 + g)
    expect_w = [(fidelity(0.5, norm.cdf((q - 3) / sw)) + fidelity(1.0, norm.cdf((q - 3) / swy))) / 2
                for q in (1.0, 5.0, 3.0)]
    assert r["w"] == pytest.approx(expect_w, abs=1e-12)
    assert r["w"][2] == pytest.approx((1.0 + math.sqrt(0.5)) / 2, abs=1e-9)
    # z has a valid partner (x), so its unparseable rollouts get 0, not NaN
    assert r["z"] == [0.0, 0.0, 0.0]


def test_fidelity_rewards_no_valid_partner_is_nan_and_single_valid_score_has_zero_variance():
    r = pair_fidelity_rewards({"a": [2.0, 3.0], "b": [None, None], "c": [4.0, None]}, [("a", "b", 1.0)])
    assert all(math.isnan(v) for v in r["a"])  # its only partner has no valid score
    assert all(math.isnan(v) for v in r["c"])  # no partner at all
    r = pair_fidelity_rewards({"a": [2.0, None], "b": [3.0, None]}, [("a", "b", 0.0)], gamma=1e-6)
    # one valid score each: variances 0, so p = Phi(-1 / sqrt(1e-6)) = 0 and fidelity(0, 0) = 1
    assert r["a"] == pytest.approx([1.0, 0.0]) and r["b"] == pytest.approx([1.0, 0.0])


def test_fidelity_rewards_bounds_and_determinism():
    gen = torch.Generator().manual_seed(0)
    names = [f"i{k}" for k in range(6)]
    for _ in range(50):
        scores = {n: [None if torch.rand(1, generator=gen) < 0.2 else float(1 + 4 * torch.rand(1, generator=gen))
                      for _ in range(5)] for n in names}
        pairs = [(names[k], names[(k + 1) % 6], float(torch.randint(0, 3, (1,), generator=gen)) / 2) for k in range(6)]
        r = pair_fidelity_rewards(scores, pairs)
        assert json.dumps(r) == json.dumps(pair_fidelity_rewards(scores, pairs))  # no randomness (NaN-safe)
        for vs in r.values():
            assert all(math.isnan(v) or 0.0 <= v <= 1.0 + 1e-12 for v in vs)


# ---------------------------------------------------------------------------------------------------------------------
# group_advantages
# ---------------------------------------------------------------------------------------------------------------------


def test_group_advantages_golden():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.5, 0.5], [0.1, float("nan"), 0.3, 0.2],
                            [0.0, 1.0, 0.0, 1.0]])
    a = group_advantages(rewards, eps=1e-4)
    # row 0: mean 3, unbiased std sqrt((4 + 1 + 0 + 9) / 3) = sqrt(14 / 3) = 2.160247
    assert a[0].tolist() == pytest.approx([(x - 3) / (2.1602469 + 1e-4) for x in (1, 2, 3, 6)], abs=1e-6)
    assert a[1].tolist() == [0.0] * 4 and a[2].tolist() == [0.0] * 4  # constant row, skipped (NaN) row
    # row 3: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.577350
    assert a[3].tolist() == pytest.approx([-0.5 / 0.5774503, 0.5 / 0.5774503] * 2, abs=1e-6)
    assert torch.allclose(a.sum(dim=1), torch.zeros(4), atol=1e-6)
    assert group_advantages(torch.tensor([[0.7], [0.2]])).tolist() == [[0.0], [0.0]]  # G = 1: no NaN


# ---------------------------------------------------------------------------------------------------------------------
# grpo_loss
# ---------------------------------------------------------------------------------------------------------------------


def random_loss_inputs(N=6, T=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(N, T, generator=gen, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(N, T, generator=gen, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(N, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(N, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([7, 1, 4, 6, 2, 5])[:N]
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return logp, old, ref, adv, mask


def test_grpo_loss_matches_a_loop_and_the_analytic_gradient():
    logp, old, ref, adv, mask = random_loss_inputs()
    beta, eps = 0.05, 0.2
    logp = logp.clone().requires_grad_(True)
    loss, metrics = grpo_loss(logp, old, ref, adv, mask, beta, eps)
    loss.backward()
    N, T = logp.shape
    expect, grad, kls, clipped = 0.0, torch.zeros(N, T, dtype=torch.float64), 0.0, 0
    for i in range(N):
        n = int(mask[i].sum())
        seq, seq_kl = 0.0, 0.0
        for t in range(n):
            lp, o, r, a = float(logp.detach()[i, t]), float(old[i, t]), float(ref[i, t]), float(adv[i])
            rho = math.exp(lp - o)
            unclipped, clip = rho * a, min(max(rho, 1 - eps), 1 + eps) * a
            k3 = math.exp(r - lp) - (r - lp) - 1
            seq += -min(unclipped, clip) + beta * k3
            seq_kl += k3
            d_policy = -a * rho if unclipped <= clip else 0.0  # the clipped branch is constant in logp
            grad[i, t] = (d_policy + beta * (1 - math.exp(r - lp))) / (n * N)
            clipped += (rho < 1 - eps and a < 0) or (rho > 1 + eps and a > 0)
        expect += seq / n / N
        kls += seq_kl / n / N
    assert float(loss) == pytest.approx(expect, rel=1e-12)
    assert torch.allclose(logp.grad, grad, atol=1e-12)
    assert float(metrics["kl"]) == pytest.approx(kls, rel=1e-12)
    assert float(metrics["clip_fraction"]) == pytest.approx(clipped / int(mask.sum()), rel=1e-12)


def test_k3_nonnegative_zero_with_zero_gradient_at_reference_and_differentiable():
    logp, old, ref, adv, mask = random_loss_inputs(seed=1)
    zero_adv = torch.zeros_like(adv)
    for x in (logp, ref):
        x_ = x.clone().requires_grad_(True)
        _, metrics = grpo_loss(x_, old, ref if x is logp else logp, zero_adv, mask, 1.0, 0.2)
        assert float(metrics["kl"]) >= 0
    d = torch.linspace(-20, 20, 2001, dtype=torch.float64)
    assert (torch.exp(d) - d - 1 >= 0).all()
    # at ref == logp the penalty and its gradient vanish
    lp = logp.clone().requires_grad_(True)
    loss, metrics = grpo_loss(lp, lp.detach(), logp.clone(), zero_adv, mask, 0.05, 0.2)
    loss.backward()
    assert float(loss) == 0.0 and float(metrics["kl"]) == 0.0 and lp.grad.abs().max() == 0.0
    # away from it the KL term alone carries gradient beta (1 - exp(ref - logp)) / (n_i N) on masked tokens
    lp = logp.clone().requires_grad_(True)
    loss, _ = grpo_loss(lp, lp.detach(), ref, zero_adv, mask, 0.05, 0.2)
    loss.backward()
    expect = 0.05 * (1 - torch.exp(ref - logp)) * mask / mask.sum(1, keepdim=True) / len(mask)
    assert lp.grad.abs().max() > 0 and torch.allclose(lp.grad, expect, atol=1e-15)


def test_clipping_on_both_sides_with_both_signs():
    old = torch.zeros(4, 1, dtype=torch.float64)
    logp = torch.log(torch.tensor([[1.5], [1.5], [0.5], [0.5]], dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(4, 1)
    loss, metrics = grpo_loss(logp, old, logp.detach(), adv, mask, beta=0.0, clip_eps=0.2)
    loss.backward()
    # per sequence: rho 1.5, A +1 -> clipped at 1.2: -1.2, no gradient; rho 1.5, A -1 -> -min(-1.5, -1.2) = 1.5;
    # rho 0.5, A +1 -> -min(0.5, 0.8) = -0.5; rho 0.5, A -1 -> clipped at 0.8: 0.8, no gradient
    assert float(loss) == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4)
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, 1.5 / 4, -0.5 / 4, 0.0])
    assert float(metrics["clip_fraction"]) == 0.5


def test_micro_batches_give_the_same_gradient():
    logp, old, ref, adv, mask = random_loss_inputs()
    full = logp.clone().requires_grad_(True)
    grpo_loss(full, old, ref, adv, mask, 0.05, 0.2)[0].backward()
    for split in ([0, 2, 4, 6], [0, 3, 5, 6]):  # 3 micro-batches, even and uneven
        micro = logp.clone().requires_grad_(True)
        for s, e in zip(split[:-1], split[1:]):
            loss, _ = grpo_loss(micro[s:e], old[s:e], ref[s:e], adv[s:e], mask[s:e], 0.05, 0.2)
            (loss * (e - s) / len(logp)).backward()
        assert torch.allclose(micro.grad, full.grad, atol=1e-15)


def test_completion_mask_from_positions_when_pad_is_an_eos():
    eos, pad = 7, 8  # the tiny and the real Qwen2.5-VL both list the pad token <|endoftext|> among the EOS ids
    ids = torch.tensor([[5, 6, eos, pad, pad], [5, pad, pad, pad, pad], [5, 6, 4, 3, 2], [eos, pad, pad, pad, pad]])
    assert completion_mask(ids, [eos, pad]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1] * 5, [1, 0, 0, 0, 0]]


def test_step_pairs_are_disjoint_and_a_pass_per_epoch():
    pairs = [(f"a{i}", f"b{i}", 1.0) for i in range(10)]
    drawn = [grpo_train.step_pairs(pairs, 3, step, 2, 4) for step in range(2)]
    flat = [p for d in drawn for p in d]
    assert len(set(flat)) == 8 and set(flat) <= set(pairs)
    next_epoch = [grpo_train.step_pairs(pairs, 3, step, 2, 4) for step in (2, 3)]
    assert next_epoch != drawn and len({p for d in next_epoch for p in d}) == 8


def test_sampling_calls_cover_every_image_once_whatever_the_number_of_processes():
    for n, batch, world in ((7, 2, 2), (3, 1, 2), (5, 4, 3), (1, 4, 2)):
        calls = [c for rank in range(world) for c in grpo_train.sampling_calls(n, batch, rank, world)]
        assert sorted(i for _, images in calls for i in images) == list(range(n))
        assert sorted(calls) == grpo_train.sampling_calls(n, batch, 0, 1)  # the same calls (and seeds) as 1 process
    assert grpo_train.sampling_calls(3, 1, 1, 2) == [(1, [1])]


def test_chunked_logprobs_equal_the_full_log_softmax_with_gradients():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 11, 50, generator=gen, dtype=torch.float64) * 4
    ids = torch.randint(0, 50, (3, 11), generator=gen)
    full = logits.clone().requires_grad_(True)
    expect = torch.log_softmax(full / 0.7, dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    weights = torch.randn(3, 11, generator=gen, dtype=torch.float64)
    (expect * weights).sum().backward()
    chunked = logits.clone().requires_grad_(True)
    got = logprobs.logprobs_at(chunked, ids, 0.7, chunk=4)  # 11 positions: chunks of 4, 4, 3
    (got * weights).sum().backward()
    assert torch.allclose(got, expect, atol=1e-12) and torch.allclose(chunked.grad, full.grad, atol=1e-12)
    with torch.no_grad():
        assert torch.allclose(logprobs.logprobs_at(logits, ids, 0.7, chunk=5), expect.detach(), atol=1e-12)


def test_rewards_parse_through_the_truncation_rule_and_land_on_their_images_rows():
    """The real parser (sampling.answer + parse_score) on scripted completions; the calls come in another order than
    the step's images, and image 'hi' (scored high, p* says it is better) must get the high rewards."""

    C = sampling.Completion
    images = ["lo.png", "hi.png", "mid.png"]
    hi = [C("\\boxed{4.50}", False), C("it is fine \\boxed{4.0}", False), C("\\boxed{5.0}. Wait, let me", True)]
    lo = [C("\\boxed{1.5}", False), C("no answer", False), C("\\boxed{2.0}", False)]
    mid = [C("\\boxed{3.0}", False), C("\\boxed{3.5}", False), C("\\boxed{2.5}", True)]
    mask = torch.tensor([[1, 1, 0]] * 3 + [[1, 1, 1]] * 3)
    calls = [grpo_train.Call([2, 1], {}, mask.clone(), mask, [mid, hi]),
             grpo_train.Call([0], {}, mask[:3], mask[:3], [lo])]
    pairs = [("hi.png", "lo.png", 1.0), ("mid.png", "lo.png", 0.5)]
    r = grpo_train.rewards(calls, images, pairs, prompts.get_preset("evoquality"), 1e-6)
    assert r["scores"] == {"lo.png": [1.5, None, 2.0], "hi.png": [4.5, 4.0, None], "mid.png": [3.0, 3.5, None]}
    assert r["truncated"] == [False] * 3 + [False, False, True] + [False, False, True]  # in the step's image order
    assert r["lengths"] == [2, 2, 2] + [3, 3, 3] + [2, 2, 2]
    expect = pair_fidelity_rewards(r["scores"], pairs, 1e-6)
    assert r["rewards"].tolist() == [expect[x] for x in images]
    assert r["rewards"][1, 2] == 0 and r["rewards"][0, 1] == 0  # truncated / unparseable: reward 0
    assert r["rewards"][1, :2].min() > 0.9 > r["rewards"][0, 0]  # the better image's parseable rollouts score high
    assert (r["advantages"][1, :2] > 0).all() and r["advantages"][1, 2] < 0


# ---------------------------------------------------------------------------------------------------------------------
# Log-prob parity with generate (minGPT-style), on the tiny real Qwen2.5-VL
# ---------------------------------------------------------------------------------------------------------------------


def test_logprobs_equal_generate_scores_with_left_padding_twice(tiny_model_dir, demo_pool):
    torch.manual_seed(0)
    processor = common.load_processor(tiny_model_dir)
    model = common.load_model(tiny_model_dir, dtype=torch.float32).eval()
    preset = prompts.get_preset("evoquality")
    small = common.load_image(demo_pool / "pool_00001.png").resize((28, 28))  # 2x2 patches vs 4x4: left padding
    images = [common.load_image(demo_pool / "pool_00000.png"), small]
    prompt = preset.prompt("score", True)
    encoded = dict(common.encode_batch(processor, [prompt] * 2, [[im] for im in images], preset.add_vision_id))
    assert (encoded["attention_mask"][1] == 0).any() and encoded["image_grid_thw"][0].tolist() != encoded[
        "image_grid_thw"][1].tolist()
    vs = model.config.vision_start_token_id
    G = 3
    batch = logprobs.select_rows(encoded, [0] * G + [1] * G, vs)
    config = sampling.sampling_config(model, max_new_tokens=12, temperature=0.7, do_sample=True)
    eos = sampling.eos_token_ids(config)
    P = batch["input_ids"].shape[1]
    for _ in range(2):  # twice in a row: no stale M-RoPE deltas from the previous generate
        with torch.no_grad():
            out = model.generate(**batch, generation_config=config, output_scores=True, return_dict_in_generate=True)
            completions = out.sequences[:, P:]
            mask = completion_mask(completions, eos).bool()
            expect = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)
            expect = expect.gather(-1, completions[..., None]).squeeze(-1)
            got = logprobs.per_row(model, batch, completions, 0.7)
            assert torch.allclose(got[mask], expect[mask], atol=1e-4), (got - expect)[mask].abs().max()
            # batched (left-padded, G copies) == one prompt alone, unpadded
            for i in (0, G):
                alone = dict(common.encode_batch(processor, [prompt], [[images[i // G]]], preset.add_vision_id))
                single = logprobs.per_row(model, alone, completions[i:i + 1], 0.7)
                assert torch.allclose(single[0][mask[i]], got[i][mask[i]], atol=1e-4)
        assert len({tuple(c.tolist()) for c in completions[:G]}) > 1  # explicit sampling: samples differ (top_k=1 trap)
    # a rollout that emits an image placeholder: the forward still runs, and the mask ends at the placeholder
    image_pad = model.config.image_token_id
    ids = completions[:1, :4].clone()
    ids[0, 2] = image_pad
    with torch.no_grad():
        got = logprobs.per_row(model, logprobs.select_rows(batch, [0], vs), ids, 0.7, (image_pad,), eos[0])
        clean = logprobs.per_row(model, logprobs.select_rows(batch, [0], vs), ids[:, :2], 0.7)
    assert torch.allclose(got[0, :2], clean[0]) and completion_mask(ids, eos + [image_pad]).tolist() == [[1, 1, 1, 0]]


def test_shared_image_features_equal_the_per_row_pass_in_logprobs_and_gradients(tiny_model_dir, demo_pool):
    """A micro-batch mixing rows of two images: each image through the vision tower once, with the same per-token
    log-probs and the same gradient (vision tower and language model) as one row at a time."""
    torch.manual_seed(0)
    processor = common.load_processor(tiny_model_dir)
    model = common.load_model(tiny_model_dir, dtype=torch.float32).train()
    preset = prompts.get_preset("evoquality")
    images = [[common.load_image(demo_pool / "pool_00000.png")],
              [common.load_image(demo_pool / "pool_00001.png").resize((28, 28))]]  # different sizes: left padding
    encoded = dict(common.encode_batch(processor, [preset.prompt("score", True)] * 2, images, preset.add_vision_id))
    rows = [0, 0, 1, 1, 0]
    batch = logprobs.select_rows(encoded, rows, model.config.vision_start_token_id)
    ids = torch.randint(50, 500, (len(rows), 7))  # ordinary text tokens (the specials come after the 600 BPE ones)
    weights = torch.randn(ids.shape)  # a loss in which every row and token has its own gradient
    params = {"vision block 0 qkv": model.model.visual.blocks[0].attn.qkv.weight,
              "vision patch embedding": model.model.visual.patch_embed.proj.weight,
              "vision merger": next(model.model.visual.merger.parameters()),
              "language layer 0 q": model.model.language_model.layers[0].self_attn.q_proj.weight,
              "language last mlp": model.model.language_model.layers[-1].mlp.down_proj.weight}
    calls = []
    hook = model.model.visual.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))

    def logprobs_and_grads(row_groups):
        model.zero_grad(set_to_none=True)
        calls.clear()
        parts = []
        for group in row_groups:
            prompt = logprobs.select_rows(batch, group, model.config.vision_start_token_id)
            logp = logprobs.per_row(model, prompt, ids[group], 0.7)
            (logp * weights[group]).sum().backward()
            parts.append(logp.detach())
        return torch.cat(parts), {k: p.grad.clone() for k, p in params.items()}, list(calls)

    shared, shared_grads, shared_calls = logprobs_and_grads([list(range(len(rows)))])
    per_row, per_row_grads, per_row_calls = logprobs_and_grads([[r] for r in range(len(rows))])
    hook.remove()
    patches = encoded["image_grid_thw"].prod(-1).tolist()
    assert shared_calls == [sum(patches)]  # one vision pass, each of the two distinct images once
    assert per_row_calls == [patches[r] for r in rows]
    gap = (shared - per_row).abs().max().item()
    print(f"log-prob max gap {gap:.2e}")
    assert gap < 1e-5
    for name in params:
        assert shared_grads[name].abs().max() > 0, name  # the parameter is in the graph
        rel = ((shared_grads[name] - per_row_grads[name]).abs().max() / per_row_grads[name].abs().max()).item()
        print(f"{name}: gradient max gap relative to its max {rel:.2e}")
        assert rel < 1e-5, name


def test_ratio_is_one_at_the_first_update(tiny_model_dir, demo_pool):
    """The old log-probs (no grad, eval mode, the whole batch) equal the policy's (grad, train mode, a micro-batch
    trimmed to its own completion width): on-policy, rho = 1 at the first update."""
    torch.manual_seed(1)
    processor = common.load_processor(tiny_model_dir)
    model = common.load_model(tiny_model_dir, dtype=torch.float32)
    preset = prompts.get_preset("evoquality")
    images = [[common.load_image(demo_pool / f"pool_0000{i}.png")] for i in (2, 3)]
    encoded = dict(common.encode_batch(processor, [preset.prompt("score", False)] * 2, images, preset.add_vision_id))
    batch = logprobs.select_rows(encoded, [0, 0, 1, 1], model.config.vision_start_token_id)
    config = sampling.sampling_config(model, max_new_tokens=10, temperature=1.0)
    with torch.no_grad():
        completions = model.eval().generate(**batch, generation_config=config)[:, batch["input_ids"].shape[1]:]
        old = logprobs.per_row(model, batch, completions, 1.0)
    mask = completion_mask(completions, sampling.eos_token_ids(config))
    model.train()
    rows = [1, 2]
    width = int(mask[rows].sum(1).max())
    sub = logprobs.select_rows(batch, rows, model.config.vision_start_token_id)
    logp = logprobs.per_row(model, sub, completions[rows, :width], 1.0)
    ratio = torch.exp(logp - old[rows, :width])[mask[rows, :width].bool()]
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5)
    loss, metrics = grpo_loss(logp, old[rows, :width], old[rows, :width], torch.tensor([1.0, -1.0]),
                              mask[rows, :width], 0.05, 0.2)
    assert float(metrics["clip_fraction"]) == 0.0 and abs(float(metrics["kl"])) < 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# The script: subprocess runs (a scoring stand-in makes the random tiny model's answers parseable)
# ---------------------------------------------------------------------------------------------------------------------

WRAPPER = """
import runpy, sys, zlib
sys.path.insert(0, {root!r})
import prompts
import sampling
def parse_score(text, preset=None):  # deterministic in the text: varied rewards from a random model
    h = zlib.crc32(text.encode())
    return None if h % 5 == 0 else 1 + (h % 401) / 100
prompts.parse_score = parse_score
sampling.answer = lambda completion, parse: parse(completion.text)  # the random model never ends: ignore truncation
sys.argv[0] = {script!r}
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, demo_pool):
    tmp = tmp_path_factory.mktemp("grpo")
    wrapper = tmp / "grpo_with_stand_in_parser.py"
    wrapper.write_text(WRAPPER.format(root=str(ROOT), script=str(ROOT / "grpo_train.py")))
    images = sorted(p.name for p in demo_pool.glob("*.png"))
    labels = tmp / "pseudolabels.jsonl"
    with open(labels, "w") as f:
        for k in range(12):
            a, b = images[k], images[(k * 5 + 1) % 12]
            f.write(json.dumps({"a": a, "b": b, "p_star": [1.0, 0.0, 0.5][k % 3], "votes_a": 3, "votes_b": 1,
                                "abstain": 0}) + "\n")
    return {"tmp": tmp, "wrapper": wrapper, "labels": labels, "model": tiny_model_dir, "pool": demo_pool}


def base_args(s, out, *extra):
    return ["--model", s["model"], "--pseudolabels", str(s["labels"]), "--images-root", str(s["pool"]),
            "--out", str(out), "--group-size", "4", "--pairs-per-step", "2", "--max-new-tokens", "12",
            "--micro-batch-size", "3", "--lr", "1e-3", "--beta", "0.05", *extra]


def run(s, args, **kw):
    return subprocess.run([sys.executable, str(s["wrapper"]), *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300, **kw)


def test_one_real_step_changes_parameters_and_writes_the_log(setup):
    s = setup
    labels = s["tmp"] / "with_missing.jsonl"
    missing = json.dumps({"a": "gone.png", "b": "pool_00000.png", "p_star": 1})
    labels.write_text(s["labels"].read_text() + missing + "\n")
    out = s["tmp"] / "one_step"
    # two passes over the rollouts with a tight clip: the second pass's ratios move away from 1 and get clipped (0 if
    # the old log-probs were wrongly refreshed per pass)
    args = base_args(s, out, "--max-steps", "1", "--skip-missing", "--ppo-epochs", "2", "--clip-eps", "0.01")
    args[args.index("--pseudolabels") + 1] = str(labels)
    r = run(s, args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dropped 1 of 13 pairs" in r.stdout
    (record,) = common.read_jsonl(out / "train_log.jsonl")
    assert set(record) == {"step", "epoch", "pairs", "optim/lr", "optim/grad_norm", "loss/total", "loss/clip_fraction",
                           "kl/mean", "reward/mean", "reward/std", "reward/zero_std_fraction", "reward/groups",
                           "reward/groups_skipped", "rollout/parse_failure_rate", "rollout/truncation_rate",
                           "rollout/score_mean", "rollout/score_within_group_std", "rollout/completion_length",
                           "rollout/generated_tokens", "rollout/tokens_per_s", "rollout/stand_in_micro_batches",
                           "rollout/row_steps", "rollout/kv_bytes", "time/step", "time/generation", "time/reference",
                           "time/update"}
    assert record["step"] == 1 and record["optim/grad_norm"] > 0 and 0 <= record["reward/mean"] <= 1
    assert 0 < record["rollout/parse_failure_rate"] < 1 and record["loss/clip_fraction"] > 0 and record["kl/mean"] > 0
    assert 0 <= record["rollout/truncation_rate"] <= 1 and record["rollout/stand_in_micro_batches"] == 0
    # at most 4 images x G 4 rollouts of at most 12 tokens: at most 11 decode forwards each
    assert 0 < record["rollout/row_steps"] <= 4 * 4 * 11 and record["rollout/kv_bytes"] > 0
    assert json.loads((out / "args.json").read_text())["args"]["group_size"] == 4
    before = common.load_model(s["model"], dtype=torch.float32).state_dict()
    after = common.load_model(str(out), dtype=torch.float32).state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
    assert common.load_processor(str(out)).tokenizer.padding_side == "left"
    assert json.loads((out / "generation_config.json").read_text())["top_k"] == 1  # the shipped config, untouched
    assert not (out / ".final.tmp").exists()


def test_kill_and_resume_continues_with_the_same_next_pairs(setup):
    s = setup
    args = ["--epochs", "2", "--save-every", "1", "--save-total-limit", "2"]  # 6 steps an epoch: 12 steps
    whole = s["tmp"] / "whole"
    r = run(s, base_args(s, whole, *args))
    assert r.returncode == 0, r.stderr[-3000:]
    killed = s["tmp"] / "killed"
    proc = subprocess.Popen([sys.executable, str(s["wrapper"]), *base_args(s, killed, *args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-3").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = common.read_jsonl(killed / "train_log.jsonl")
    assert 3 <= len(logged) < 12 and not (killed / "config.json").exists(), "the kill came too late"
    r = run(s, base_args(s, killed, *args))  # without --resume: refused, nothing overwritten
    assert r.returncode == 2 and "--resume" in r.stderr
    r = run(s, base_args(s, killed, *args, "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = common.read_jsonl(whole / "train_log.jsonl"), common.read_jsonl(killed / "train_log.jsonl")
    assert [x["step"] for x in b] == list(range(1, 13))  # nothing lost, nothing duplicated
    assert [x["pairs"] for x in a] == [x["pairs"] for x in b]
    for x, y in zip(a, b):  # same rollouts (keyed to the step and image) and same restored model/optimizer state
        assert y["reward/mean"] == pytest.approx(x["reward/mean"], abs=1e-6)
        assert y["loss/total"] == pytest.approx(x["loss/total"], abs=1e-5)
        assert (y["rollout/generated_tokens"], y["rollout/row_steps"]) == (x["rollout/generated_tokens"],
                                                                           x["rollout/row_steps"])
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-11", "step-12"]
    wa = common.load_model(str(whole), dtype=torch.float32).state_dict()
    wb = common.load_model(str(killed), dtype=torch.float32).state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_two_processes(setup):
    s = setup
    out = s["tmp"] / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(s["wrapper"]), *base_args(s, out, "--max-steps", "2")]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    log = common.read_jsonl(out / "train_log.jsonl")
    assert [x["step"] for x in log] == [1, 2]
    drawn = [tuple(p) for x in log for p in x["pairs"]]
    assert len(drawn) == 8 and len(set(drawn)) == 8  # 2 processes x 2 pairs x 2 steps, all different
    assert all(x["reward/groups"] >= 4 and x["optim/grad_norm"] > 0 for x in log)
    assert json.loads((out / "args.json").read_text())["world_size"] == 2
    assert (out / "checkpoints" / "step-2" / "process-1.pt").exists()
    common.load_model(str(out))


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: refused before any model is loaded (in-process, model loading patched to fail)
# ---------------------------------------------------------------------------------------------------------------------


def run_main(monkeypatch, argv):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(common, "load_model", no_model)
    monkeypatch.setattr(sys, "argv", ["grpo_train.py", *argv])
    with pytest.raises(SystemExit) as e:
        grpo_train.main()
    return e.value.code


def test_bad_input_is_refused_before_loading_a_model(setup, monkeypatch, capsys, tmp_path):
    s = setup
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"a": "pool_00000.png", "b": "nope_1.png", "p_star": 1}) + "\n"
                      + json.dumps({"a": "nope_2.png", "b": "pool_00001.png", "p_star": 0}) + "\n")
    argv = base_args(s, tmp_path / "out")
    argv[argv.index("--pseudolabels") + 1] = str(labels)
    assert run_main(monkeypatch, argv) == 2
    err = capsys.readouterr().err
    assert "2 image(s)" in err and "nope_1.png" in err and "nope_2.png" in err and "--skip-missing" in err

    labels.write_text(json.dumps({"a": "pool_00000.png", "b": "pool_00001.png", "p_star": 1}) + "\n{oops\n"
                      + json.dumps({"a": "pool_00000.png", "b": "pool_00002.png", "p_star": 1}) + "\n")
    assert run_main(monkeypatch, argv) == 2
    assert f"{labels}:2" in capsys.readouterr().err

    labels.write_text(json.dumps({"a": "pool_00000.png", "b": "pool_00001.png"}) + "\n")  # no p_star
    assert run_main(monkeypatch, argv) == 2
    assert f"{labels}:1" in capsys.readouterr().err

    labels.write_text("")
    assert run_main(monkeypatch, argv) == 2
    assert "no pseudo-labelled pairs" in capsys.readouterr().err

    argv = base_args(s, tmp_path / "out")
    argv[argv.index("--group-size") + 1] = "1"
    assert run_main(monkeypatch, argv) == 2
    assert "--group-size 1" in capsys.readouterr().err

    images = tmp_path / "images"  # an image that exists but does not decode
    images.mkdir()
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    shutil.copy(s["pool"] / "pool_00000.png", images / "ok.png")
    labels.write_text(json.dumps({"a": "ok.png", "b": "broken.png", "p_star": 1}) + "\n")
    argv = base_args(s, tmp_path / "out")
    argv[argv.index("--pseudolabels") + 1], argv[argv.index("--images-root") + 1] = str(labels), str(images)
    assert run_main(monkeypatch, argv) == 2
    err = capsys.readouterr().err
    assert "1 image(s)" in err and "broken.png (UnidentifiedImageError" in err and "--skip-missing" in err


class Crash(Exception):
    pass


def crash(*a, **k):
    raise Crash


def test_resume_with_changed_settings_is_refused_naming_each(setup, monkeypatch, capsys, tmp_path):
    """A run that saved a checkpoint holds --resume to its settings: a change of the method, the reference or the
    pseudo-labels' content is refused before any model loads, naming each change."""
    s = setup
    out = tmp_path / "out"
    labels = tmp_path / "labels.jsonl"
    labels.write_text(s["labels"].read_text())
    argv = base_args(s, out, "--resume", "--max-steps", "1")
    argv[argv.index("--pseudolabels") + 1] = str(labels)
    monkeypatch.setattr(sys, "argv", ["grpo_train.py", *argv])
    grpo_train.main()  # one real step: checkpoints/step-1
    assert json.loads((out / "settings.json").read_text())["settings"]["lr"] == 1e-3
    with pytest.raises(AssertionError, match="a model was loaded"):  # the same settings: accepted
        run_main(monkeypatch, argv)
    changed = [*argv, "--lr", "2e-3", "--beta", "0.1", "--group-size", "8", "--ref-model", str(tmp_path)]
    assert run_main(monkeypatch, changed) == 2
    err = capsys.readouterr().err
    for change in ("lr: 0.001 -> 0.002", "beta: 0.05 -> 0.1", "group_size: 4 -> 8", "ref_model: "):
        assert change in err, (change, err)
    assert "rerun with its settings" in err and "clip_eps" not in err
    labels.write_text(s["labels"].read_text().replace('"p_star": 1.0', '"p_star": 0.9', 1))
    assert run_main(monkeypatch, argv) == 2
    assert "pseudolabels_sha256: " in capsys.readouterr().err


def test_a_run_that_failed_before_its_first_checkpoint_does_not_refuse_the_corrected_command(setup, monkeypatch,
                                                                                             capsys, tmp_path):
    """A mistyped --model fails before anything is recorded; the corrected command then starts. A run that crashed
    before its first checkpoint held no work: --resume with another --pairs-per-step starts it over."""
    s = setup
    out = tmp_path / "out"
    argv = base_args(s, out, "--resume")
    wrong = [*argv, "--model", str(tmp_path / "no_such_model")]
    monkeypatch.setattr(sys, "argv", ["grpo_train.py", *wrong])
    with pytest.raises(SystemExit) as e:
        grpo_train.main()
    assert e.value.code == 2 and "cannot load --model" in capsys.readouterr().err
    assert not (out / "settings.json").exists()
    monkeypatch.setattr(grpo_train, "train_step", crash)  # a crash in the first step, before any checkpoint
    monkeypatch.setattr(sys, "argv", ["grpo_train.py", *argv])
    with pytest.raises(Crash):
        grpo_train.main()
    assert json.loads((out / "settings.json").read_text())["settings"]["pairs_per_step_all_processes"] == 2
    monkeypatch.setattr(sys, "argv", ["grpo_train.py", *argv, "--pairs-per-step", "1"])
    with pytest.raises(Crash):  # not refused
        grpo_train.main()
    assert json.loads((out / "settings.json").read_text())["settings"]["pairs_per_step_all_processes"] == 1


def plant_checkpoint(out: Path, state, trainer_state: str = '{"step": 1, "world_size": 1}') -> Path:
    step = out / "checkpoints" / "step-1"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(trainer_state)
    torch.save(state, step / "process-0.pt")
    (step / ".metadata").write_bytes(dcp_metadata())  # a distributed checkpoint's own metadata (of another model)
    return step


def dcp_metadata() -> bytes:
    import tempfile
    import warnings

    import torch.distributed.checkpoint as dcp

    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one process, no process group: DCP says so
        dcp.save({"model": {"w": torch.zeros(2)}, "optim": {"lr": 0.1}}, checkpoint_id=folder)
        return (Path(folder) / ".metadata").read_bytes()


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what unpickling runs
        return os.system, (f"touch {self.marker}",)


def error_line(err: str) -> str:
    """The error's one line (stderr may also hold library warnings); never a traceback."""
    assert "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    return line


def test_a_planted_pickle_in_a_checkpoint_is_refused_not_run(setup, monkeypatch, capsys, tmp_path):
    s = setup
    out, marker = tmp_path / "out", tmp_path / "it_ran"
    step = plant_checkpoint(out, {"scheduler": Payload(marker), "torch_rng": None, "cuda_rng": None,
                                  "python_rng": None})
    assert run_main(monkeypatch, base_args(s, out, "--resume")) == 2
    line = error_line(capsys.readouterr().err)
    assert str(step / "process-0.pt") in line and "not unpickled" in line
    assert not marker.exists()
    torch.load(step / "process-0.pt", weights_only=False)  # the planted file is live: a plain load runs it
    assert marker.exists()


def test_a_planted_pickle_in_the_distributed_checkpoint_metadata_is_refused_not_run(setup, monkeypatch, capsys,
                                                                                     tmp_path):
    import pickle

    s = setup
    out, marker = tmp_path / "out", tmp_path / "it_ran"
    state = {"scheduler": {}, "torch_rng": torch.get_rng_state(), "cuda_rng": None, "python_rng": (3, (1, 2), None)}
    step = plant_checkpoint(out, state)
    (step / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    assert run_main(monkeypatch, base_args(s, out, "--resume")) == 2  # refused before any model loads
    line = error_line(capsys.readouterr().err)
    assert str(step / ".metadata") in line and "not unpickled" in line
    assert not marker.exists()
    with open(step / ".metadata", "rb") as f:  # torch's own reader does exactly this
        pickle.load(f)
    assert marker.exists()


def test_empty_or_cut_json_sidecars_are_one_line_errors(setup, monkeypatch, capsys, tmp_path):
    s = setup
    state = {"scheduler": {}, "torch_rng": torch.get_rng_state(), "cuda_rng": None, "python_rng": (3, (1, 2), None)}
    out = tmp_path / "empty_state"
    step = plant_checkpoint(out, state, trainer_state="")
    assert run_main(monkeypatch, base_args(s, out, "--resume")) == 2
    assert str(step / "trainer_state.json") in error_line(capsys.readouterr().err)
    out = tmp_path / "cut_settings"
    plant_checkpoint(out, state)
    (out / "settings.json").write_text('{"settings": {"lr": 0.0')
    assert run_main(monkeypatch, base_args(s, out, "--resume")) == 2
    assert str(out / "settings.json") in error_line(capsys.readouterr().err)


def test_a_second_run_into_a_locked_out_fails_at_once(setup, monkeypatch, capsys, tmp_path):
    s = setup
    out = tmp_path / "out"
    with common.output_lock(out):  # another run holds --out
        t0 = time.time()
        assert run_main(monkeypatch, base_args(s, out)) == 2
        assert time.time() - t0 < 30
    line = error_line(capsys.readouterr().err)
    assert "in use by another run" in line and f"pid {os.getpid()}" in line
    assert not (out / "settings.json").exists() and not (out / "train_log.jsonl").exists()


def test_unwritable_out_and_nan_settings_are_refused_before_a_model_loads(setup, monkeypatch, capsys, tmp_path):
    s = setup
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert run_main(monkeypatch, base_args(s, blocker / "out")) == 2  # --out cannot be created
    assert "cannot write to" in error_line(capsys.readouterr().err)
    if os.geteuid() != 0:  # root writes through a read-only mode
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o555)
        assert run_main(monkeypatch, base_args(s, read_only)) == 2
        assert "cannot write to" in error_line(capsys.readouterr().err)
    for flag in ("--temperature", "--lr", "--beta"):
        assert run_main(monkeypatch, base_args(s, tmp_path / "out", flag, "nan")) == 2
        assert f"{flag} nan" in error_line(capsys.readouterr().err)


def test_image_names_resolve_under_the_root_one_name_per_image(setup, capsys, tmp_path):
    s = setup
    labels = tmp_path / "labels.jsonl"
    lines = [{"a": "./pool_00000.png", "b": "pool_00001.png", "p_star": 1},
             {"a": "pool_00000.png", "b": "x/../pool_00002.png", "p_star": 0}]
    labels.write_text("".join(json.dumps(r) + "\n" for r in lines))
    pairs, dropped = votes.read_pseudolabels(str(labels), str(s["pool"]), False)
    assert pairs == [("pool_00000.png", "pool_00001.png", 1.0), ("pool_00000.png", "pool_00002.png", 0.0)]
    assert dropped == 0
    for bad, why in ((s["pool"] / "pool_00003.png", "outside the image root"), ("../pool/pool_00003.png", "outside"),
                     ("pool_00001.png/../pool_00000.png", "expected")):  # the last one pairs an image with itself
        labels.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"a": str(bad), "b": "pool_00000.png",
                                                                    "p_star": 1}) + "\n")
        with pytest.raises(SystemExit) as e:
            votes.read_pseudolabels(str(labels), str(s["pool"]), False)
        line = error_line(capsys.readouterr().err)
        assert e.value.code == 2 and f"{labels}:2" in line and why in line, line


def test_a_scripted_step_through_the_real_parser_puts_each_advantage_on_its_own_rows(setup, monkeypatch, tmp_path):
    """One step of the real loop (main, 1 process) with a scripted sampler and the real answer parser: image X's
    rollouts answer high, Y's low, one of each truncated or unparseable; p*(X, Y) = 1. The logged rewards and the
    gradient norm must equal an independent computation that puts each image's advantages on its own completions
    (with the advantages swapped between the images, the gradient norm differs)."""
    s = setup
    processor = common.load_processor(s["model"])
    model = common.load_model(s["model"], dtype=torch.float32)
    preset = prompts.get_preset("evoquality")
    eos = sampling.eos_token_ids(sampling.sampling_config(model, 1))
    script = {"pool_00003.png": [("\\boxed{4.5}", True), ("so \\boxed{4.0}", True), ("\\boxed{5.0}. Wait", False)],
              "pool_00007.png": [("no idea", True), ("\\boxed{1.5}", True), ("\\boxed{2.0}", True)]}
    encoded = {x: dict(common.encode_batch(processor, [preset.prompt("score", False)],
                                           [[common.load_image(s["pool"] / x)]])) for x in script}
    which = {x: float(e["pixel_values"].sum()) for x, e in encoded.items()}  # the image, from its pixels
    tokens = {x: [processor.tokenizer(t).input_ids + (eos[:1] if ended else []) for t, ended in rows]
              for x, rows in script.items()}

    def scripted_sample(model_, processor_, inputs, n, max_new_tokens, temperature=1.0, do_sample=True, keys=None,
                        seed=0, first_index=0):
        sizes = inputs["image_grid_thw"].prod(dim=1).tolist()  # one image per prompt: its pixel rows
        names = [min(which, key=lambda x: abs(which[x] - float(chunk.sum())))
                 for chunk in inputs["pixel_values"].split(sizes)]
        assert keys == [sampling.prompt_key(0, x) for x in names] and seed == 0  # keyed to (step, image), the seed
        rows = [row for x in names for row in tokens[x]]  # prompt-major, as sampling.sample returns them
        width = max(map(len, rows))
        ids = torch.tensor([row + eos[:1] * (width - len(row)) for row in rows])
        mask = sampling.completion_mask(ids, eos)
        return sampling.Samples(ids=ids, mask=mask, truncated=[not ended for x in names for _, ended in script[x]],
                              texts=processor.batch_decode(ids * mask + (1 - mask) * eos[0], skip_special_tokens=True),
                              n=n)

    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"a": "pool_00003.png", "b": "pool_00007.png", "p_star": 1.0}) + "\n")
    out = tmp_path / "out"
    argv = ["--model", s["model"], "--pseudolabels", str(labels), "--images-root", str(s["pool"]), "--out", str(out),
            "--group-size", "3", "--pairs-per-step", "1", "--max-new-tokens", "8", "--no-reasoning", "--lr", "1e-3",
            "--max-grad-norm", "1e9", "--micro-batch-size", "2"]  # both images in one sampling call
    monkeypatch.setattr(sampling, "sample", scripted_sample)
    monkeypatch.setattr(sys, "argv", ["grpo_train.py", *argv])
    grpo_train.main()
    (record,) = common.read_jsonl(out / "train_log.jsonl")

    scores = {"pool_00003.png": [4.5, 4.0, None], "pool_00007.png": [None, 1.5, 2.0]}  # truncated, unparseable: None
    rewards = pair_fidelity_rewards(scores, [("pool_00003.png", "pool_00007.png", 1.0)])
    reward_matrix = torch.tensor([rewards[x] for x in script], dtype=torch.float64)
    assert record["reward/mean"] == pytest.approx(float(reward_matrix.mean()), abs=1e-12)
    assert record["rollout/parse_failure_rate"] == pytest.approx(2 / 6)
    assert record["rollout/truncation_rate"] == pytest.approx(1 / 6)

    def grad_norm(advantages):  # on-policy at step 1: the loss gradient is -(1/N) sum_i A_i grad mean_t logp_i
        model.zero_grad()
        for k, x in enumerate(script):
            prompt = logprobs.select_rows(encoded[x], [0, 0, 0], model.config.vision_start_token_id)
            ids = scripted_sample(None, None, encoded[x], 3, 8, keys=[sampling.prompt_key(0, x)])
            logp = logprobs.per_row(model, prompt, ids.ids, 1.0)
            mask = ids.mask.double()
            per_seq = (logp.double() * mask).sum(1) / mask.sum(1)
            (-(advantages[k] * per_seq).sum() / 6).backward()
        return float(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None)))

    advantages = group_advantages(reward_matrix)
    assert record["optim/grad_norm"] == pytest.approx(grad_norm(advantages), rel=1e-4)
    assert abs(grad_norm(advantages.flip(0)) - record["optim/grad_norm"]) > 1e-3 * record["optim/grad_norm"]
