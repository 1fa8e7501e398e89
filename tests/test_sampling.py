"""sampling.sample: the shared-prefix decode engine against the path it replaces (n copies of each prompt's KV cache,
every row to the end, the model's own attention), against `model.generate` (greedy) and against a full forward over
prompt + completion; the keyed sampling noise against its definition and the softmax. Tiny real Qwen-VL checkpoints,
a left-padded batch of mixed lengths: a two-image prompt and a one-image prompt with a smaller image. Each mutation of
the engine named in a test's docstring is applied by monkeypatch and shown to fail the check."""

import math
import random
import warnings

import pytest
import torch

import common
import sampling
from prompts import PRESETS

ARCHS = ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"]


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
KEYS = [11, 2 ** 63 + 5, 7]  # one above 2^63: keys are unsigned 64-bit


def mixed_batch(processor, images, order=(0, 1, 2)):
    """The prompts `order` (all three: left padded, the middle one shorter)."""
    return common.encode_batch(processor, [PROMPTS[i] for i in order], [images[i] for i in order],
                               PRESETS["evoquality"].add_vision_id)


class LogitHook:
    """An lm_head forward hook. `end_every`: the EOS logit raised by 100 wherever the row's top token is a multiple of
    it (a function of the row's logits alone, so both engines end the same rows at the same steps whatever the batch:
    completions of uneven length); `first_call`: {prompt: token} forced at the first token (the prefill's logits, one
    row per prompt); `steps` collects every call's last-position logits."""

    def __init__(self, model, end_every: int = 0, first_call: dict | None = None):
        self.eos = sampling.eos_token_ids(sampling.sampling_config(model, 1))[0]
        self.end_every, self.first_call, self.steps = end_every, first_call or {}, []
        self.handle = model.lm_head.register_forward_hook(self.hook)

    def hook(self, module, args, out):
        out = out.clone()
        if self.end_every:
            out[..., self.eos] += 100.0 * (out.argmax(-1) % self.end_every == 0)
        if not self.steps:
            for p, token in self.first_call.items():
                out[p, :, token] += 100.0
        self.steps.append(out[:, -1].float())
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def copies_engine(monkeypatch):
    """The reference: sample() through the copies path (as for a model the engine cannot serve), no warning."""
    monkeypatch.setattr(sampling, "_why_not_shared", lambda model, cache: "the tests' reference")
    monkeypatch.setattr(sampling, "_warn_once", lambda reason: None)


def run(model, processor, inputs, n, max_new_tokens, end_every=0, first_call=None, **kwargs):
    """(samples, logits [rows, T, V]: the logits each row's token was drawn from, NaN where the row had ended)."""
    with LogitHook(model, end_every, first_call) as seen:
        got = sampling.sample(model, processor, inputs, n, max_new_tokens, **kwargs)
    R, T = got.ids.shape
    logits = torch.full((R, T, seen.steps[0].shape[-1]), float("nan"))
    logits[:, 0] = seen.steps[0].repeat_interleave(n, 0)
    for s, step in enumerate(seen.steps[1:T], start=1):
        running = got.mask[:, s].bool()  # rows whose token s was still to come: they computed step s
        logits[running, s] = step if len(step) == int(running.sum()) else step[running]
    return got, logits


def assert_same(got: sampling.Samples, want: sampling.Samples):
    assert torch.equal(got.ids, want.ids), (got.ids, want.ids)
    assert torch.equal(got.mask, want.mask)
    assert (got.truncated, got.texts, got.n) == (want.truncated, want.texts, want.n)


def assert_engine_equals_copies(model, processor, inputs, n, do_sample, monkeypatch, first_call=None, budget=16):
    kwargs = dict(do_sample=do_sample, keys=KEYS[:len(inputs["input_ids"])], seed=3, temperature=0.8)
    monkeypatch.setattr(sampling, "KV_ROOM_STEP", 5)  # the generated buffers rebuilt (grown, compacted) 3 times
    got, logits = run(model, processor, inputs, n, budget, 7, first_call, **kwargs)
    with monkeypatch.context() as m:
        copies_engine(m)
        want, want_logits = run(model, processor, inputs, n, budget, 7, first_call, **kwargs)
    assert got.decode["engine"] == "shared_prefix" and want.decode["engine"] == "copies"
    assert_same(got, want)
    running = got.mask.bool()
    gap = (logits[running] - want_logits[running]).abs().max().item()
    assert gap < 1e-5, gap
    lengths = got.mask.sum(1)
    # each row computed only while it ran: a decode forward per token after the first
    assert got.decode["row_steps"] == int((lengths - 1).sum()) < want.decode["row_steps"]
    assert got.decode["kv_bytes"] < want.decode["kv_bytes"] or n == 1 and got.decode["kv_bytes"] == want.decode[
        "kv_bytes"]  # one completion per prompt: nothing to share
    return got, gap


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_generate_token_for_token(checkpoints, images, arch):
    """Greedy decoding by the engine equals `generate` (the library's own loop over n prompt copies)."""
    model, processor = checkpoints[arch]
    inputs = mixed_batch(processor, images)
    assert inputs["attention_mask"].all(1).tolist() == [True, False, True]
    encoded = []  # images per call of the vision tower
    hook = model.model.visual.register_forward_pre_hook(lambda m, args, kwargs: encoded.append(len(kwargs["grid_thw"])),
                                                        with_kwargs=True)
    for n in (1, 2):  # twice on one model: no M-RoPE state carried over from the previous batch
        config = sampling.sampling_config(model, 12, do_sample=False)
        with torch.inference_mode():
            sequences = model.generate(**inputs, generation_config=config).repeat_interleave(n, dim=0)
        want = sequences[:, inputs["input_ids"].shape[1]:]
        got = sampling.sample(model, processor, inputs, n, 12, do_sample=False)
        assert got.decode["engine"] == "shared_prefix"
        assert torch.equal(got.ids, torch.where(got.mask.bool(), want, config.pad_token_id))
        assert got.ids.shape == (3 * n, 12)
    hook.remove()
    assert encoded == [5, 3] * 2  # generate: every image shown; sample: each distinct image once
    assert model.config.get_text_config()._attn_implementation == "sdpa"  # restored after the decode


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n, do_sample", [(1, False), (2, True), (32, True)])
def test_engine_equals_copies_with_uneven_lengths(checkpoints, images, arch, n, do_sample, monkeypatch):
    """Tokens, mask, truncation and texts identical, the logits each token was drawn from within 1e-5 (fp32), rows
    ending at different steps; and the engine computes each row only while it runs and holds fewer KV bytes."""
    model, processor = checkpoints[arch]
    got, _ = assert_engine_equals_copies(model, processor, mixed_batch(processor, images), n, do_sample, monkeypatch)
    lengths = got.mask.sum(1).tolist()
    assert len(set(lengths)) > 1 and min(lengths) < got.ids.shape[1], lengths  # uneven: the engine compacted


def test_a_prompt_whose_rows_all_end_at_the_first_token(checkpoints, images, monkeypatch):
    """The middle prompt's 8 rows all emit EOS first (the prompt leaves the prompt part at once), the others go on; a
    row of the last prompt emits an image placeholder first (it ends there, truncated, as generate's mask would)."""
    model, processor = checkpoints["qwen2_5_vl"]
    eos = sampling.eos_token_ids(sampling.sampling_config(model, 1))[0]
    placeholder = model.config.image_token_id
    got, _ = assert_engine_equals_copies(model, processor, mixed_batch(processor, images), 8, True, monkeypatch,
                                         first_call={1: eos, 2: placeholder})
    assert got.mask[8:24].sum(1).tolist() == [1] * 16 and got.mask[:8, 1].all()
    assert got.ids[8:16, 0].tolist() == [eos] * 8 and got.truncated[8:16] == [False] * 8
    assert got.ids[16:24, 0].tolist() == [placeholder] * 8 and got.truncated[16:24] == [True] * 8
    with LogitHook(model, first_call={0: eos, 1: eos, 2: eos}):  # every row ends at once: one token, no decode step
        short = sampling.sample(model, processor, mixed_batch(processor, images), 3, 10)
    assert short.ids.shape == (9, 1) and short.truncated == [False] * 9 and short.decode["row_steps"] == 0


def test_mask_padding_truncation_and_texts_from_their_definition(checkpoints, images):
    model, processor = checkpoints["qwen2_5_vl"]
    got, _ = run(model, processor, mixed_batch(processor, images), 4, 6, end_every=7, keys=KEYS)
    eos = sampling.eos_token_ids(sampling.sampling_config(model, 1))
    ended = [any(t in eos for t in row) for row in got.ids.tolist()]
    assert any(ended) and not all(ended)
    placeholders = sampling.placeholder_token_ids(model)
    for row, mask, truncated, text in zip(got.ids.tolist(), got.mask.tolist(), got.truncated, got.texts):
        stops = [i for i, t in enumerate(row) if t in eos + placeholders]
        end = stops[0] + 1 if stops else len(row)
        assert mask == [1] * end + [0] * (len(row) - end)
        assert truncated == (not stops or row[stops[0]] in placeholders)  # a placeholder is an abnormal end
        assert all(t == model.generation_config.pad_token_id for t in row[end:])
        assert text == processor.decode(row[:end], skip_special_tokens=True)


def test_mutation_a_row_reading_another_prompts_keys_fails_parity(checkpoints, images, monkeypatch):
    """Mutation: each row's query slot moved to the next prompt's grid row (so it reads that prompt's keys)."""
    model, processor = checkpoints["qwen2_5_vl"]
    layout = sampling.SharedPrefix._layout

    def shifted(self):
        layout(self)
        self.slot = (self.slot + self.m) % (self.prompt_keys[0].shape[0] * self.m)

    monkeypatch.setattr(sampling.SharedPrefix, "_layout", shifted)
    with pytest.raises(AssertionError):
        assert_engine_equals_copies(model, processor, mixed_batch(processor, images), 2, False, monkeypatch)


@pytest.mark.parametrize("when", ["compaction", "rebuild"])
def test_mutation_a_finished_row_left_in_the_generated_part_fails_parity(checkpoints, images, when, monkeypatch):
    """Mutation: the running rows taken as the FIRST rows of the generated buffers, so that finished rows' keys and
    values are read by running ones: right after a compaction, or when the buffers are rebuilt."""
    model, processor = checkpoints["qwen2_5_vl"]
    keep, make_room = sampling.SharedPrefix.keep, sampling.SharedPrefix.make_room

    def first_rows(self):
        self.buffer_row = torch.arange(len(self.buffer_row))

    if when == "compaction":
        monkeypatch.setattr(sampling.SharedPrefix, "keep", lambda self, rows: (keep(self, rows), first_rows(self)))
    else:
        monkeypatch.setattr(sampling.SharedPrefix, "make_room", lambda self: (
            first_rows(self) if self.length == self.keys[0].shape[2] else None, make_room(self)))
    with pytest.raises(AssertionError):
        assert_engine_equals_copies(model, processor, mixed_batch(processor, images), 4, True, monkeypatch)


def test_bf16_decode_within_bf16_rounding_of_the_reference(checkpoints, images, tiny_model_dir, monkeypatch):
    """bf16 weights on CPU: the engine's logits within 4 bf16 steps (4 x 2^-8 of the largest logit) of the copies
    path's until the two greedy paths part, and they part only where the reference's top two are that close (a tie)."""
    model = common.load_model(tiny_model_dir, dtype=torch.bfloat16).eval()
    processor = checkpoints["qwen2_5_vl"][1]
    inputs = mixed_batch(processor, images)
    got, logits = run(model, processor, inputs, 1, 16, 3, do_sample=False)
    with monkeypatch.context() as m:
        copies_engine(m)
        want, want_logits = run(model, processor, inputs, 1, 16, 3, do_sample=False)
    assert got.decode["engine"] == "shared_prefix"
    tolerance = 4 * 2 ** -8 * want_logits[want.mask.bool()].abs().max().item()
    for r in range(len(got.ids)):
        differ = (got.ids[r] != want.ids[r]).nonzero()
        upto = int(differ[0]) + 1 if len(differ) else int(got.mask[r].sum())  # both computed these steps
        gap = (logits[r, :upto] - want_logits[r, :upto]).abs().max().item()
        assert gap <= tolerance, (r, gap, tolerance)
        if len(differ):
            top2 = want_logits[r, upto - 1].topk(2).values
            assert top2[0] - top2[1] <= 2 * tolerance


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


@pytest.mark.parametrize("n", [1, 3])
def test_decode_logprobs_equal_a_full_forward_and_rows_are_prompt_major(checkpoints, images, n):
    model, processor = checkpoints["qwen2_5_vl"]
    inputs = mixed_batch(processor, images)
    with LogitHook(model, end_every=5):  # uneven lengths: rows leave the batch mid-way
        torch.manual_seed(0)
        got, logits = run(model, processor, inputs, n, 8, temperature=0.7)  # keys from torch's generator
        assert not got.ids.is_inference()  # usable in training
        logprobs = torch.log_softmax(logits / 0.7, -1).gather(2, got.ids[..., None]).squeeze(2)
        for row in range(3 * n):  # row p * n + k belongs to prompt p
            p, keep = row // n, int(got.mask[row].sum())
            expect = full_forward_logprobs(model, processor, PROMPTS[p], images[p], got.ids[row, :keep], 0.7)
            torch.testing.assert_close(logprobs[row, :keep], expect, atol=1e-5, rtol=0)
        assert len(set(got.mask.sum(1).tolist())) > 1
        torch.manual_seed(0)
        assert torch.equal(sampling.sample(model, processor, inputs, n, 8, temperature=0.7).ids, got.ids)  # seeded
        if n > 1:
            assert len({tuple(r) for r in got.ids[:n].tolist()}) > 1  # the copies are sampled independently
            torch.manual_seed(1)
            assert not torch.equal(sampling.sample(model, processor, inputs, n, 8, temperature=0.7).ids, got.ids)


def per_prompt(samples: sampling.Samples, p: int) -> list[list[int]]:
    """Prompt p's completions, each up to its end."""
    n = samples.n
    return [row[:int(m.sum())] for row, m in zip(samples.ids[p * n:(p + 1) * n].tolist(), samples.mask[p * n:(p + 1) * n])]


def assert_a_prompts_tokens_do_not_depend_on_its_batch(model, processor, images, monkeypatch):
    """Prompt 0 (key KEYS[0]): its 6 completions alone; in a batch of three at another position; split 2 + 4 over
    two calls (first_index 0 and 2); and through the copies path (no compaction): the same tokens."""
    kwargs = dict(max_new_tokens=10, temperature=1.0, seed=5)
    with LogitHook(model, end_every=4):
        alone = sampling.sample(model, processor, mixed_batch(processor, images, (0,)), 6, keys=KEYS[:1], **kwargs)
        batched = sampling.sample(model, processor, mixed_batch(processor, images, (1, 2, 0)), 6,
                                  keys=[KEYS[1], KEYS[2], KEYS[0]], **kwargs)
        split = [sampling.sample(model, processor, mixed_batch(processor, images, (2, 0)), k,
                                 keys=[KEYS[2], KEYS[0]], first_index=[0, first], **kwargs)
                 for first, k in ((0, 2), (2, 4))]
        with monkeypatch.context() as m:
            copies_engine(m)
            copies = sampling.sample(model, processor, mixed_batch(processor, images, (0,)), 6, keys=KEYS[:1],
                                     **kwargs)
    want = per_prompt(alone, 0)
    assert len(set(map(len, want))) > 1  # uneven: compaction happened
    assert per_prompt(batched, 2) == want
    assert per_prompt(split[0], 1) + per_prompt(split[1], 1) == want
    assert per_prompt(copies, 0) == want


def test_a_prompts_tokens_do_not_depend_on_its_batch_position_split_or_compaction(checkpoints, images, monkeypatch):
    model, processor = checkpoints["qwen2_5_vl"]
    assert_a_prompts_tokens_do_not_depend_on_its_batch(model, processor, images, monkeypatch)


def test_mutation_noise_keyed_to_the_batch_row_fails_invariance(checkpoints, images, monkeypatch):
    """Mutation: each row's noise from its row in the current batch instead of its completion index."""
    model, processor = checkpoints["qwen2_5_vl"]
    lanes = sampling.noise_lanes
    monkeypatch.setattr(sampling, "noise_lanes", lambda seed, words, index, step: lanes(
        seed, words, torch.arange(len(index)), step))
    with pytest.raises(AssertionError):
        assert_a_prompts_tokens_do_not_depend_on_its_batch(model, processor, images, monkeypatch)


@pytest.mark.parametrize("batch_size", [1, 3, 4, 7, 64])
def test_split_calls_hold_at_most_batch_size_rows_and_cover_every_completion_once_in_order(batch_size):
    counts = [0, 5, 16, 3, 3, 1, 9]
    calls = sampling.split_calls(counts, batch_size)
    assert all(len({n for _, _, n in call}) == 1 and len(call) * call[0][2] <= batch_size for call in calls)
    pieces = [piece for call in calls for piece in call]
    for p, count in enumerate(counts):  # each prompt's completions once, its pieces listed in completion order
        assert [k for i, first, n in pieces if i == p for k in range(first, first + n)] == list(range(count))
    assert len(calls) <= sum(-(-count // batch_size) for count in counts)  # prompts share calls where they fit
    got = sampling.sample_in_calls(counts, batch_size, lambda idx, n, firsts: [
        [(i, first + k) for k in range(n)] for i, first in zip(idx, firsts)])
    assert got == [[(p, k) for k in range(count)] for p, count in enumerate(counts)]


# ---------------------------------------------------------------------------------------------------------------------
# The noise and the merge against independent computations
# ---------------------------------------------------------------------------------------------------------------------


def lowbias32(x: int) -> int:
    """The published lowbias32 in Python's unbounded integers, reduced mod 2^32 after every product."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) % 2 ** 32
    x ^= x >> 15
    x = (x * 0x846CA68B) % 2 ** 32
    return x ^ (x >> 16)


def test_mix32_and_the_noise_equal_their_definition_in_python_integers():
    rng = random.Random(0)
    xs = [0, 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1] + [rng.randrange(2 ** 32) for _ in range(2000)]
    assert sampling._mix32(torch.tensor(xs)).tolist() == [lowbias32(x) for x in xs]
    seed, key, index, step = -3, 2 ** 64 - 7, 12345, 511
    lane_a, lane_b = sampling.noise_lanes(seed, torch.tensor([[key & sampling.MASK32, key >> 32]]),
                                          torch.tensor([index]), step)
    got = sampling.gumbel(lane_a[:, None], lane_b[:, None], torch.arange(40))[0]
    lanes = [0x243F6A88, 0x85A308D3]
    for word in (seed % 2 ** 32, (seed % 2 ** 64) >> 32, key % 2 ** 32, key >> 32, index, step):
        lanes = [lowbias32(lane ^ word) for lane in lanes]
    assert [lane_a.item(), lane_b.item()] == lanes
    want = [-math.log(-math.log((lowbias32(lanes[0] ^ v) ^ lanes[1]) / 2 ** 32 + 2 ** -33)) for v in range(40)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


def draws(logits, temperature, sampler=sampling.gumbel_argmax):
    """Tokens drawn for every (key, completion index, step) of 4 keys x 50 indices x 30 steps."""
    keys = [sampling.prompt_key("image", i) for i in range(4)]
    words = torch.tensor([[k & sampling.MASK32, k >> 32] for k in keys for _ in range(50)])
    index = torch.arange(50).repeat(4)
    return torch.stack([sampler(logits.expand(len(index), -1), temperature, 9, words, index, step)
                        for step in range(30)], 1)  # [200, 30]


def goodness_of_fit(tokens, logits, temperature) -> float:
    from scipy.stats import chisquare

    expected = torch.softmax(logits.double() / temperature, -1) * tokens.numel()
    return chisquare(torch.bincount(tokens.flatten(), minlength=len(logits)).numpy(), expected.numpy()).pvalue


def independence(tokens, vocab) -> float:
    """p-value of a chi-square test that a token and the next step's token of the same completion are independent."""
    from scipy.stats import chi2_contingency

    table = torch.zeros(vocab, vocab)
    for a, b in zip(tokens[:, :-1].flatten().tolist(), tokens[:, 1:].flatten().tolist()):
        table[a, b] += 1
    return chi2_contingency(table.numpy()).pvalue


LOGITS = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0, 1.5, 0.3, -0.5, 1.2, 0.8])


@pytest.mark.parametrize("block", [sampling.NOISE_BLOCK, 4])
def test_gumbel_draws_follow_the_softmax_and_are_independent(block, monkeypatch):
    """6,000 draws (fixed keys and seed) of 10 tokens, in one block, or in blocks of 4 (the last one padded): chi-square
    p-values above 1e-3 for softmax(logits / T) at two temperatures and for independence across steps."""
    monkeypatch.setattr(sampling, "NOISE_BLOCK", block)
    for temperature in (1.0, 0.6):
        tokens = draws(LOGITS, temperature)
        assert goodness_of_fit(tokens, LOGITS, temperature) > 1e-3
    assert independence(draws(LOGITS, 1.0), len(LOGITS)) > 1e-3


def test_mutations_of_the_sampler_fail_the_goodness_of_fit(monkeypatch):
    """Exponential noise instead of Gumbel; the temperature multiplied instead of divided; noise that ignores the step
    (every step of a completion draws the same noise: dependent steps). p-values below 1e-6."""
    def times_t(logits, temperature, seed, words, index, step):
        return sampling.gumbel_argmax(logits * temperature ** 2, temperature, seed, words, index, step)

    def stepless(logits, temperature, seed, words, index, step):
        return sampling.gumbel_argmax(logits, temperature, seed, words, index, 0)

    assert goodness_of_fit(draws(LOGITS, 0.6, times_t), LOGITS, 0.6) < 1e-6
    assert independence(draws(LOGITS, 1.0, stepless), len(LOGITS)) < 1e-6
    gumbel = sampling.gumbel
    monkeypatch.setattr(sampling, "NOISE_BLOCK", 4)
    monkeypatch.setattr(sampling, "gumbel", lambda a, b, ids: gumbel(a, b, ids).neg().exp())  # -log u: exponential
    assert goodness_of_fit(draws(LOGITS, 1.0), LOGITS, 1.0) < 1e-6


def merge_reference(q, k_a, v_a, k_b, v_b):
    """Softmax attention over the concatenated keys, in float64."""
    scores = q.double() @ torch.cat([k_a, k_b], -2).double().transpose(-1, -2)
    return torch.softmax(scores, -1) @ torch.cat([v_a, v_b], -2).double()


@pytest.mark.parametrize("scale", [1.0, 300.0, -300.0])
def test_merge_equals_softmax_over_the_union_of_keys(scale):
    """Scores of order +-300 * |q||k| overflow exp in fp32 (e^89 = inf) unless the max is subtracted."""
    gen = torch.Generator().manual_seed(0)
    q, k_a, v_a, k_b, v_b = (torch.randn(*shape, generator=gen) for shape in
                             [(2, 3, 4), (2, 7, 4), (2, 7, 4), (2, 5, 4), (2, 5, 4)])
    k_b = k_b + scale / 4 * q.mean(1, keepdim=True)  # one part's scores far above or below the other's
    out_a, lse_a = sampling.softmax_attention(q, k_a, v_a, abs(scale))
    out_b, lse_b = sampling.softmax_attention(q, k_b, v_b, abs(scale))
    assert (lse_a.abs().max() > 100) == (scale != 1.0)
    got = sampling.merge_attention(out_a, lse_a, out_b, lse_b)
    want = merge_reference(q * abs(scale), k_a, v_a, k_b, v_b)
    # fp32 scores in the hundreds carry ~1e-5 absolute rounding: the tolerance follows them
    tolerance = 1e-6 if scale == 1.0 else 1e-4
    torch.testing.assert_close(got.double(), want, atol=tolerance, rtol=tolerance)


def test_mutation_the_merge_without_the_max_shift_fails(monkeypatch):
    """(On the decode's fp32 scores of the tiny models, within a few units, the unshifted merge passes the parity
    tests: overflow needs scores near 89, hence this test.)"""
    def unshifted(out_a, lse_a, out_b, lse_b):
        return (lse_a.exp() * out_a + lse_b.exp() * out_b) / (lse_a.exp() + lse_b.exp())

    monkeypatch.setattr(sampling, "merge_attention", unshifted)
    for scale in (300.0, -300.0):
        with pytest.raises(AssertionError):
            test_merge_equals_softmax_over_the_union_of_keys(scale)


# ---------------------------------------------------------------------------------------------------------------------
# The fallback, the refusal, the copies path's cache, sample_prompts
# ---------------------------------------------------------------------------------------------------------------------


def test_a_sliding_window_model_falls_back_to_copies_with_one_warning(checkpoints, images, tiny_model_dir,
                                                                     monkeypatch):
    """Sliding-window layers (a window longer than every sequence here, so the attention is the full one): the copies
    path, one warning naming why, the same greedy tokens as the engine on the plain model."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.text_config.update(dict(use_sliding_window=True, sliding_window=4096, max_window_layers=0,
                                   layer_types=["sliding_attention"] * config.text_config.num_hidden_layers))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers: sliding windows are not implemented for sdpa
        sliding = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, config=config,
                                                              dtype=torch.float32).eval()
    model, processor = checkpoints["qwen2_5_vl"]
    inputs = mixed_batch(processor, images)
    monkeypatch.setattr(sampling, "_WARNED", set())
    with pytest.warns(UserWarning, match="DynamicSlidingWindowLayer"):
        got = sampling.sample(sliding, processor, inputs, 2, 10, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        again = sampling.sample(sliding, processor, inputs, 2, 10, do_sample=False)
    assert got.decode["engine"] == again.decode["engine"] == "copies"
    assert_same(got, sampling.sample(model, processor, inputs, 2, 10, do_sample=False))


def test_a_model_without_mrope_state_is_refused():
    import transformers

    config = transformers.Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with pytest.raises(TypeError, match="Qwen-VL"):
        sampling._prefill(model, {"input_ids": torch.ones(1, 3, dtype=torch.long),
                                  "attention_mask": torch.ones(1, 3, dtype=torch.long)})


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


def test_sample_prompts_is_encode_then_sample(checkpoints, images):
    model, processor = checkpoints["qwen2_5_vl"]
    want = sampling.sample(model, processor, mixed_batch(processor, images), 2, 6, temperature=0.7, keys=KEYS)
    got = sampling.sample_prompts(model, processor, PROMPTS, images, 2, 6, 0.7, PRESETS["evoquality"].add_vision_id,
                                  keys=KEYS)
    assert_same(got, want)


def test_prompt_key_is_stable_and_64_bit():
    assert sampling.prompt_key("a.png", "b.png", "ab") == sampling.prompt_key("a.png", "b.png", "ab")
    keys = {sampling.prompt_key("a.png", "b.png", order) for order in ("ab", "ba")} | {sampling.prompt_key(1, "a")}
    assert len(keys) == 3 and all(0 <= k < 2 ** 64 for k in keys)
    # a fixed value: the same in every process and Python version (no hash randomisation)
    assert sampling.prompt_key("a.png", 0) == int.from_bytes(
        __import__("hashlib").blake2b(b"('a.png', 0)", digest_size=8).digest(), "little")
