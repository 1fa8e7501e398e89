"""sampling.sample (prefill once, decode n copies) against `model.generate`, the routine it replaces, and against a full
forward over prompt + completion. Tiny real Qwen-VL checkpoints, a left-padded batch of mixed lengths: a two-image
prompt and a one-image prompt with a smaller image."""

import pytest
import torch

import common
import sampling
from prompts import PRESETS


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory):
    from fixtures.tiny_models import build_tiny_checkpoint

    dirs = {"qwen2_5_vl": tiny_model_dir}
    for arch in ("qwen2_vl", "qwen3_vl"):
        dirs[arch] = str(build_tiny_checkpoint(tmp_path_factory.mktemp(arch), arch))
    return {arch: (common.load_model(d, dtype=torch.float32).eval(), common.load_processor(d))
            for arch, d in dirs.items()}


@pytest.fixture(scope="module")
def images(demo_pool):
    pool = [common.load_image(p) for p in sorted(demo_pool.glob("*.png"))[:3]]
    # a pair in both orders (2 x 4 image tokens) around one small image (1 token): left padding, a shared image
    return [[pool[0], pool[1]], [pool[2].resize((28, 28))], [pool[1], pool[0]]]


PROMPTS = [PRESETS["evoquality"].prompt("compare", True), PRESETS["evoquality"].prompt("score", False),
           PRESETS["evoquality"].prompt("compare", True)]


def mixed_batch(processor, images):
    inputs = common.encode_batch(processor, PROMPTS, images, PRESETS["evoquality"].add_vision_id)
    assert inputs["attention_mask"].all(1).tolist() == [True, False, True]
    return inputs


def reference_sample(model, processor, inputs, n, max_new_tokens, temperature=1.0, do_sample=True) -> sampling.Samples:
    """The plain generate path: one generate call with num_return_sequences=n. (generate refuses
    greedy with n > 1; the n copies of a greedy completion are the same completion repeated.)"""
    copies = 1 if not do_sample else n
    config = sampling.sampling_config(model, max_new_tokens, temperature, do_sample=do_sample,
                                    num_return_sequences=copies)
    eos = sampling.eos_token_ids(config)
    with torch.inference_mode():
        sequences = model.generate(**inputs, generation_config=config).repeat_interleave(n // copies, dim=0)
    ids = sequences[:, inputs["input_ids"].shape[1]:]
    mask = sampling.completion_mask(ids, eos + sampling.placeholder_token_ids(model))
    ended = torch.isin(ids, torch.tensor(eos, device=ids.device)) & mask.bool()
    truncated = (~ended.any(dim=1)).tolist()
    texts = processor.batch_decode(ids * mask + (1 - mask) * eos[0], skip_special_tokens=True)
    return sampling.Samples(ids=ids, mask=mask, truncated=truncated, texts=texts, n=n)


def assert_same(got: sampling.Samples, want: sampling.Samples):
    assert torch.equal(got.ids, want.ids), (got.ids, want.ids)
    assert torch.equal(got.mask, want.mask)
    assert (got.truncated, got.texts, got.n) == (want.truncated, want.texts, want.n)


class EosBias:
    """Adds `bias` to the EOS logit (lm_head forward hook) so completions end mid-way, for generate and sample alike."""

    def __init__(self, model, bias: float):
        self.eos = sampling.eos_token_ids(sampling.sampling_config(model, 1))[0]
        self.handle = model.lm_head.register_forward_hook(self.hook)
        self.bias = bias

    def hook(self, module, args, out):
        out = out.clone()
        out[..., self.eos] += self.bias
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_greedy_equals_generate_token_for_token(checkpoints, images, arch):
    model, processor = checkpoints[arch]
    inputs = mixed_batch(processor, images)
    encoded = []  # images per call of the vision tower
    hook = model.model.visual.register_forward_pre_hook(lambda m, args, kwargs: encoded.append(len(kwargs["grid_thw"])),
                                                        with_kwargs=True)
    for n in (1, 2):  # twice on one model: no M-RoPE state carried over from the previous batch
        want = reference_sample(model, processor, inputs, n, 12, do_sample=False)
        got = sampling.sample(model, processor, inputs, n, 12, do_sample=False)
        assert_same(got, want)
        assert got.ids.shape == (3 * n, 12)
    hook.remove()
    assert encoded == [5, 3] * 2  # generate: every image shown; sample: each distinct image once
    # a batch of one prompt right after: another length, another rope delta
    single = common.encode_batch(processor, ["hello"], [images[1]])
    assert_same(sampling.sample(model, processor, single, 1, 6, do_sample=False),
                reference_sample(model, processor, single, 1, 6, do_sample=False))


def test_eos_mid_way_gives_the_same_ids_mask_and_truncation_as_generate(checkpoints, images):
    model, processor = checkpoints["qwen2_5_vl"]
    inputs = mixed_batch(processor, images)
    with EosBias(model, 4.0) as bias:
        for seed in range(3):
            torch.manual_seed(seed)
            want = reference_sample(model, processor, inputs, 4, 10, temperature=1.0)
            torch.manual_seed(seed)
            got = sampling.sample(model, processor, inputs, 4, 10, temperature=1.0)
            assert_same(got, want)  # same seed as generate -> the same samples, shape included
            ended = [bias.eos in row for row in got.ids.tolist()]
            if any(ended) and not all(ended):
                break
        assert any(ended) and not all(ended), "the bias should end some rows and not others"
        # independently: mask up to and including the first EOS, padding after it, truncated iff no EOS
        for row, mask, truncated, text in zip(got.ids.tolist(), got.mask.tolist(), got.truncated, got.texts):
            stops = [i for i, t in enumerate(row) if t in sampling.eos_token_ids(sampling.sampling_config(model, 1))]
            end = stops[0] + 1 if stops else len(row)
            assert mask == [1] * end + [0] * (len(row) - end) and truncated == (not stops)
            assert all(t == model.generation_config.pad_token_id for t in row[end:])
            assert text == processor.decode(row[:end], skip_special_tokens=True)
        assert_same(sampling.sample(model, processor, inputs, 2, 10, do_sample=False),
                    reference_sample(model, processor, inputs, 2, 10, do_sample=False))
    with EosBias(model, 100.0):  # every row ends at once: the loop stops as generate does, before the budget
        torch.manual_seed(0)
        short = sampling.sample(model, processor, inputs, 3, 10)
        assert short.ids.shape == (9, 1) and short.truncated == [False] * 9 and short.mask.tolist() == [[1]] * 9


def full_forward_logprobs(model, processor, prompt: str, images, completion, temperature: float):
    """Log-probs of `completion` under one unpadded forward over the prompt alone + the completion."""
    alone = dict(common.encode_batch(processor, [prompt], [images]))
    L = alone["input_ids"].shape[1]
    alone["input_ids"] = torch.cat([alone["input_ids"], completion[None]], 1)
    alone["attention_mask"] = torch.ones_like(alone["input_ids"])
    alone["mm_token_type_ids"] = torch.cat([alone["mm_token_type_ids"], torch.zeros_like(completion[None])], 1)
    with torch.no_grad():
        logits = model(**alone).logits[0, L - 1:-1].float()
    return torch.log_softmax(logits / temperature, -1).gather(1, completion[:, None]).squeeze(1)


class DecodeLogits:
    """The last-position logits of every forward the sampler makes (lm_head forward hook): the prefill's, one row per
    prompt, then one row per sequence for each decode step."""

    def __init__(self, model):
        self.steps = []
        self.handle = model.lm_head.register_forward_hook(lambda m, args, out: self.steps.append(out[:, -1].float()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("n", [1, 3])
def test_decode_logits_equal_a_full_forward_and_rows_are_prompt_major(checkpoints, images, n):
    model, processor = checkpoints["qwen2_5_vl"]
    inputs = mixed_batch(processor, images)
    with DecodeLogits(model) as seen:
        torch.manual_seed(0)
        got = sampling.sample(model, processor, inputs, n, 8, temperature=0.7)
    ids = got.ids
    assert not ids.is_inference() and len(seen.steps) == ids.shape[1]  # usable in training; one forward per token
    logits = torch.stack([seen.steps[0].repeat_interleave(n, 0), *seen.steps[1:]], 1)  # [P*n, T, V]
    logprobs = torch.log_softmax(logits / 0.7, -1).gather(2, ids[..., None]).squeeze(2)
    placeholder = torch.isin(ids, torch.tensor(sampling.placeholder_token_ids(model)))
    for row in range(3 * n):  # row p * n + k belongs to prompt p
        p = row // n
        keep = int(got.mask[row].sum()) - int(placeholder[row][got.mask[row].bool()].any())  # a sampled <|image_pad|>
        expect = full_forward_logprobs(model, processor, PROMPTS[p], images[p], ids[row, :keep], 0.7)
        torch.testing.assert_close(logprobs[row, :keep], expect, atol=1e-5, rtol=0)
    torch.manual_seed(0)
    assert torch.equal(sampling.sample(model, processor, inputs, n, 8, temperature=0.7).ids, ids)  # seeded
    if n > 1:
        assert len({tuple(r) for r in ids[:n].tolist()}) > 1  # the copies are sampled independently
        torch.manual_seed(1)
        assert not torch.equal(sampling.sample(model, processor, inputs, n, 8, temperature=0.7).ids, ids)


def test_sample_prompts_is_encode_then_sample(checkpoints, images):
    model, processor = checkpoints["qwen2_5_vl"]
    torch.manual_seed(0)
    want = sampling.sample(model, processor, mixed_batch(processor, images), 2, 6, temperature=0.7)
    torch.manual_seed(0)
    got = sampling.sample_prompts(model, processor, PROMPTS, images, 2, 6, 0.7, PRESETS["evoquality"].add_vision_id)
    assert_same(got, want)


def test_a_model_without_mrope_state_is_refused(tmp_path):
    import transformers

    config = transformers.Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    model = transformers.Qwen2ForCausalLM(config).eval()
    model.generation_config.eos_token_id = 0
    with pytest.raises(TypeError, match="Qwen-VL"):
        sampling._sample_tokens(model, {"input_ids": torch.ones(1, 3, dtype=torch.long),
                                      "attention_mask": torch.ones(1, 3, dtype=torch.long)}, 2,
                              sampling.sampling_config(model, 2))


def test_repeated_cache_with_room_equals_repeat_interleave_then_append():
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    torch.manual_seed(0)
    keys, values = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    new_keys, new_values = torch.randn(6, 3, 1, 4), torch.randn(6, 3, 1, 4)
    for layer in (DynamicLayer(), DynamicSlidingWindowLayer(sliding_window=16)):  # the second: the library's repeat
        cache = DynamicCache()
        cache.layers = [layer]
        cache.update(keys, values, 0)
        cache = sampling._repeat_with_room(cache, 3, room=2)
        assert torch.equal(cache.layers[0].keys, keys.repeat_interleave(3, 0)) and cache.get_seq_length() == 5
        for step in range(2):
            k, v = cache.update(new_keys + step, new_values - step, 0)
        assert torch.equal(k, torch.cat([keys.repeat_interleave(3, 0), new_keys, new_keys + 1], 2))
        assert torch.equal(v, torch.cat([values.repeat_interleave(3, 0), new_values, new_values - 1], 2))
        assert cache.get_seq_length() == 7
