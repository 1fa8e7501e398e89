"""The sampler every stage uses: each prompt prefilled once, its n completions decoded together.

- `sample`: n completions per prompt with the explicit sampling config (no shipped top_k=1 leaks in);
  `sample_prompts`: the same from prompts and images (encode, then sample);
- `prompt_key`: a prompt's identity as a 64-bit key. Completion k of a prompt with key `key` draws its sampling noise
  from (seed, key, k, step) alone, whatever batch, position in the batch, split of its n completions over calls,
  process count or resume it is sampled in; so are its tokens wherever its logits do not depend on the batch (fp32 on
  CPU in the tests; kernels whose rounding follows the batch shape can flip a draw between two near-equal scores);
- `split_calls` and `sample_in_calls`: a stage's prompts and their completion counts cut into calls of at most
  --batch-size rows, a prompt's completions split over calls where it asks for more;
- `completion_mask` and `answer`: where a completion ends, and the truncation rule every stage applies;
- `encode_images_once`: each distinct image of a batch through the vision tower once.

The decode engine (shared-prefix attention, as in Hydragen, arXiv 2402.05099): each prompt's KV cache is kept ONCE per
layer, and each running completion keeps only the tokens it generated. At a decode step, a completion's attention over
[its prompt's keys; its own generated keys] is split into two softmaxes, merged exactly by their log-sum-exps:
the prompt part for all running completions of a prompt at once (one matmul per layer against that prompt's keys), the
generated part per completion. A completion that emitted an end-of-sequence token (or an image placeholder) leaves the
batch at once. A model or cache it cannot serve (sliding-window layers, say) decodes from n copies of each prompt's
cache instead, with a warning; that path is also the reference the tests hold the engine to.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import common

KV_ROOM_STEP = 32  # generated-token buffers grow by this many tokens (never past max_new_tokens)
NOISE_BLOCK = 256  # tokens per block of the two-level draw (Qwen's 152k vocabulary: 594 blocks)
MASK32 = 0xFFFFFFFF


def sampling_config(model, max_new_tokens: int, temperature: float = 1.0, do_sample: bool = True,
                    num_return_sequences: int = 1):
    """An explicit GenerationConfig. Qwen2.5-VL ships top_k=1, which would make every sample identical,
    so nothing is inherited but the special token ids."""
    from transformers import GenerationConfig

    shipped = model.generation_config
    eos = shipped.eos_token_id if shipped.eos_token_id is not None else model.config.get_text_config().eos_token_id
    pad = shipped.pad_token_id if shipped.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    # greedy ignores the sampling knobs; they get the library's neutral defaults so the shipped ones do not leak in
    sampling = dict(temperature=temperature, top_p=1.0, top_k=0) if do_sample else dict(temperature=1.0, top_p=1.0,
                                                                                          top_k=50)
    return GenerationConfig(
        do_sample=do_sample, repetition_penalty=1.0, max_new_tokens=max_new_tokens,
        num_return_sequences=num_return_sequences, eos_token_id=eos, pad_token_id=pad,
        bos_token_id=shipped.bos_token_id, **sampling,
    )


def eos_token_ids(generation_config) -> list[int]:
    eos = generation_config.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def completion_texts(processor, sequences, prompt_length: int) -> list[str]:
    """Decoded completions (the tokens after the prompt), special tokens dropped."""
    return processor.batch_decode(sequences[:, prompt_length:], skip_special_tokens=True)


class Completion(NamedTuple):
    text: str
    truncated: bool  # no end-of-sequence token within max_new_tokens


@dataclass
class Samples:
    """n sampled completions of each of P prompts; row p * n + k is prompt p's k-th completion."""

    ids: Any  # [P*n, T] completion tokens (after the end of a completion: padding)
    mask: Any  # [P*n, T] 1 for every token up to and including the first end-of-sequence (or image placeholder)
    truncated: list[bool]  # per row: no end-of-sequence within max_new_tokens (an abnormal stop counts as truncated)
    texts: list[str]  # per row: the masked tokens decoded, special tokens dropped
    n: int
    # what the decode cost: engine ("shared_prefix" or "copies"), steps (decode forwards), row_steps (completions
    # summed over those forwards), kv_bytes (most bytes of keys and values held at once)
    decode: dict = field(default_factory=dict)

    def completions(self) -> list[list[Completion]]:
        """Per prompt, its n (text, truncated) completions."""
        rows = [Completion(t, c) for t, c in zip(self.texts, self.truncated)]
        return [rows[i:i + self.n] for i in range(0, len(rows), self.n)]


def completion_mask(completion_ids, stop_ids: list[int]):
    """1 for every completion token up to and including the first stop token (all of them if none), from positions:
    the pad token may itself be an EOS id, so `token != pad` would drop a real EOS or keep padding."""
    import torch

    is_stop = torch.isin(completion_ids, torch.tensor(stop_ids, device=completion_ids.device))
    T = completion_ids.shape[1]
    first = torch.where(is_stop.any(dim=1), is_stop.int().argmax(dim=1),
                        torch.full_like(is_stop[:, 0], T - 1, dtype=torch.long))
    return (torch.arange(T, device=completion_ids.device)[None, :] <= first[:, None]).long()


def placeholder_token_ids(model) -> list[int]:
    """Image/video placeholder ids: a degenerate sample can emit one; a completion ends there (abnormally)."""
    config = model.config
    return [i for i in (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None))
            if i is not None]


def sample(model, processor, inputs, n: int, max_new_tokens: int, temperature: float = 1.0, do_sample: bool = True,
           keys: list[int] | None = None, seed: int = 0, first_index: int | list[int] = 0) -> Samples:
    """THE sampling routine of every stage: n completions per prompt of `inputs` (from encode_batch, on the model's
    device), with the explicit sampling config (temperature, top-k/top-p off, repetition penalty off; greedy with
    do_sample=False). Every stage reads truncation from here and parses answers through `answer`.

    keys: one int per prompt, its identity (`prompt_key`); completion k of prompt p is completion number
    first_index[p] + k of that prompt (first_index: one int for all prompts, or one per prompt), and draws its noise
    from (seed, keys[p], first_index[p] + k, step) alone. So a prompt's K completions may be split over calls
    (first_index 0, then 8, ...) and give the same tokens as one call. Without keys, each prompt gets a key drawn from
    torch's generator (torch.manual_seed decides, but the batch then matters).

    Each prompt is prefilled ONCE (its images encoded once): `generate(num_return_sequences=n)` would prefill the same
    prompt n times, and at 7B with ~2,000-token two-image prompts that prefill is much of the cost."""
    import torch

    config = sampling_config(model, max_new_tokens, temperature, do_sample=do_sample)
    eos = eos_token_ids(config)
    P = inputs["input_ids"].shape[0]
    keys = torch.randint(0, 2 ** 62, (P,)).tolist() if keys is None else list(keys)
    firsts = [first_index] * P if isinstance(first_index, int) else list(first_index)
    if len(keys) != P or len(firsts) != P:
        raise ValueError(f"sample: {P} prompts, {len(keys)} keys, {len(firsts)} first indices")
    device = inputs["input_ids"].device
    # every row's identity: its prompt's key as two 32-bit words, and its completion index
    words = torch.tensor([[k & MASK32, (k >> 32) & MASK32] for k in keys], device=device).repeat_interleave(n, 0)
    index = torch.tensor([f + k for f in firsts for k in range(n)], device=device)

    def pick(logits, rows, step: int):
        """The next token of each row of `logits`; `rows`: which rows of the call they are (p * n + k)."""
        if not config.do_sample:
            return logits.argmax(-1)
        return gumbel_argmax(logits, config.temperature, seed, words[rows], index[rows], step)

    with torch.inference_mode():
        logits, cache, position = _prefill(model, inputs)
        stops = torch.tensor(eos + placeholder_token_ids(model), device=logits.device)
        reason = _why_not_shared(model, cache)
        if reason is None:
            ids, decode = _decode_shared(model, logits, cache, inputs["attention_mask"], position, n, config, pick,
                                         stops)
        else:
            _warn_once(reason)
            ids, decode = _decode_copies(model, logits, cache, inputs["attention_mask"], position, n, config, pick,
                                         stops)
    mask = completion_mask(ids, eos + placeholder_token_ids(model))
    ids = torch.where(mask.bool(), ids, config.pad_token_id)  # cloned outside inference mode: usable in training
    ended = torch.isin(ids, torch.tensor(eos, device=ids.device)) & mask.bool()
    truncated = (~ended.any(dim=1)).tolist()
    texts = processor.batch_decode(ids * mask + (1 - mask) * eos[0], skip_special_tokens=True)
    return Samples(ids=ids, mask=mask, truncated=truncated, texts=texts, n=n, decode=decode)


def sample_prompts(model, processor, prompts: list[str], images: list[list[Any]], n: int, max_new_tokens: int,
                   temperature: float = 1.0, add_vision_id: bool = False, do_sample: bool = True,
                   keys: list[int] | None = None, seed: int = 0, first_index: int | list[int] = 0) -> Samples:
    """`sample` of the prompts (one list of PIL images each), encoded as every stage encodes them."""
    inputs = common.encode_batch(processor, prompts, images, add_vision_id).to(model.device)
    return sample(model, processor, inputs, n, max_new_tokens, temperature, do_sample, keys, seed, first_index)


def prompt_key(*parts) -> int:
    """A 64-bit key from a prompt's identity (strings and ints: the two image names of a pair in the order shown, an
    image, a step and an image), the same in every process and run (no Python hash randomisation). The run's seed is
    not part of it: it goes to `sample(seed=...)`."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def split_calls(counts: list[int], batch_size: int) -> list[list[tuple[int, int, int]]]:
    """The sampling calls that give prompt i its counts[i] completions with at most batch_size rows per call, each a
    list of (prompt, first, n): completions first .. first + n - 1 of that prompt, one n for all prompts of a call, as
    many prompts as batch_size // n. A prompt asking for more than batch_size completions is split over calls,
    batch_size at a time (its first_index), so that memory follows batch_size alone. Pieces of n = batch_size come
    before the smaller last piece of a prompt: a prompt's pieces are listed in the order of their completions."""
    pieces = [(i, first, min(batch_size, count - first)) for i, count in enumerate(counts)
              for first in range(0, count, batch_size)]
    calls = []
    for n in sorted({n for _, _, n in pieces}, reverse=True):
        same = [piece for piece in pieces if piece[2] == n]
        calls += [same[s:s + batch_size // n] for s in range(0, len(same), batch_size // n)]
    return calls


def sample_in_calls(counts: list[int], batch_size: int,
                    sample_call: Callable[[list[int], int, list[int]], list[list[Completion]]]
                    ) -> list[list[Completion]]:
    """Every prompt's counts[i] completions, from the calls of `split_calls`: `sample_call(prompts, n, first_index)`
    returns n completions of each prompt in `prompts` (indices), numbered from first_index[j] on."""
    completions: list[list[Completion]] = [[] for _ in counts]
    for call in split_calls(counts, batch_size):
        prompts, n, firsts = [i for i, _, _ in call], call[0][2], [first for _, first, _ in call]
        for i, got in zip(prompts, sample_call(prompts, n, firsts)):
            completions[i] += got
    return completions


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: sampling noise keyed to the completion (a counter-based generator in int64 arithmetic)
# ---------------------------------------------------------------------------------------------------------------------


def _mul32(x, c: int):
    """(x * c) mod 2^32 for int64 x in [0, 2^32). A constant c >= 2^31 is used as c - 2^32 (the same residue mod
    2^32), so |x * c| < 2^63 and the int64 product never overflows; & MASK32 takes a negative product to its residue."""
    return (x * (c - (1 << 32) if c >= 1 << 31 else c)) & MASK32


def _mix32(x):
    """lowbias32 (C. Wellons' hash-prospector): a bijection of [0, 2^32) in which each input bit flips about half of the
    output bits. Values stay in [0, 2^32) throughout, so int64's arithmetic right shift is the logical one."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def noise_lanes(seed: int, words, index, step: int):
    """Each row's 64-bit noise state, two 32-bit lanes [rows]: the row's words (seed low and high, its prompt's key low
    and high `words` [rows, 2], its completion index, the step; 32 bits each) chained through _mix32 from two
    different start constants."""
    import torch

    lane_a, lane_b = torch.full_like(index, 0x243F6A88), torch.full_like(index, 0x85A308D3)  # digits of pi
    for word in (seed & MASK32, (seed >> 32) & MASK32, words[:, 0], words[:, 1], index, step):
        lane_a, lane_b = _mix32(lane_a ^ word), _mix32(lane_b ^ word)
    return lane_a, lane_b


def gumbel(lane_a, lane_b, ids):
    """Gumbel(0, 1) noise (float64) of `ids` under the states (lane_a, lane_b), broadcast together: id v's 32 bits
    b = _mix32(lane_a ^ v) ^ lane_b (distinct ids of a row get distinct bits), the uniform u = (b + 1/2) / 2^32 in
    (0, 1), the noise -log(-log u)."""
    import torch

    u = ((_mix32(lane_a ^ ids) ^ lane_b).double() + 0.5) / 2 ** 32
    return -torch.log(-torch.log(u))


def gumbel_argmax(logits, temperature: float, seed: int, words, index, step: int):
    """One draw of softmax(logits / T) per row [rows], by the Gumbel-max trick (argmax(scores + Gumbel noise) is a
    draw of softmax(scores)) applied twice: a block of NOISE_BLOCK tokens, drawn with its share of the softmax (the
    block's logsumexp of scores, plus the noise of id vocab + block), then a token of that block, drawn with its share
    of the block (its score, plus the noise of its own id): P(block) P(token | block) = softmax(logits / T)[token].
    Noise for vocab / NOISE_BLOCK + NOISE_BLOCK ids per row instead of vocab. Unlike a multinomial draw on the batch, a
    row's draw flips under a rounding-size change of its logits only if two perturbed scores are that close."""
    import torch

    R, V = logits.shape
    blocks = -(-V // NOISE_BLOCK)
    scores = torch.nn.functional.pad(logits.float() / temperature, (0, blocks * NOISE_BLOCK - V), value=-math.inf)
    scores = scores.view(R, blocks, NOISE_BLOCK)  # the padding's -inf is never drawn
    lane_a, lane_b = (lane[:, None] for lane in noise_lanes(seed, words, index, step))
    ids = torch.arange(max(blocks, NOISE_BLOCK), device=logits.device)
    block = (scores.logsumexp(-1).double() + gumbel(lane_a, lane_b, V + ids[:blocks])).argmax(-1)  # [R]
    tokens = block[:, None] * NOISE_BLOCK + ids[:NOISE_BLOCK]  # [R, NOISE_BLOCK]
    within = scores[torch.arange(R, device=logits.device), block].double() + gumbel(lane_a, lane_b, tokens)
    return tokens.gather(1, within.argmax(-1, keepdim=True)).squeeze(1)


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: shared-prefix attention (the prompt part per prompt, the generated part per row, merged exactly)
# ---------------------------------------------------------------------------------------------------------------------


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Softmax attention over the union of two disjoint key sets, from each set's own output and log-sum-exp of scores:
        out = (e^{lse_a} out_a + e^{lse_b} out_b) / (e^{lse_a} + e^{lse_b}),
    computed with M = max(lse_a, lse_b) subtracted from both exponents, so that no exponential overflows (scores in
    the hundreds) or vanishes to 0 / 0 (scores in the minus hundreds)."""
    import torch

    top = torch.maximum(lse_a, lse_b)
    w_a, w_b = (lse_a - top).exp(), (lse_b - top).exp()
    return (w_a * out_a + w_b * out_b) / (w_a + w_b)


def softmax_attention(q, k, v, scaling: float, bias=None):
    """(softmax(q k^T * scaling + bias) v, logsumexp of the scores): q [..., Q, D], k and v [..., K, D]. Matmuls in the
    inputs' dtype, the softmax in fp32 as e = exp(scores - max): output (e v) / sum(e), logsumexp max + log sum(e)."""
    scores = ((q * scaling) @ k.transpose(-1, -2)).float()
    if bias is not None:
        scores += bias
    top = scores.amax(-1, keepdim=True)
    e = scores.sub_(top).exp_()
    total = e.sum(-1, keepdim=True)
    return (e.to(v.dtype) @ v).float() / total, top + total.log()


def shared_prefix_attention(module, query, key, value, attention_mask=None, scaling=None, shared_prefix=None,
                            **kwargs):
    """Attention of one decode step (an AttentionInterface function, for the text layers only). query [B, Hq, 1, D],
    key/value [B, Hkv, 1, D]: this step's token of each running row, appended to the row's generated keys first.
    The query heads sharing a KV head (GQA: head h * g + r reads KV head h) are folded into the query axis, so the
    prompt part is one matmul per layer: the rows of each prompt scattered into a [P, m] grid (m = most running rows
    of one prompt), [P, Hkv, m * g, D] @ [P, Hkv, D, L]. The generated part: the rows scattered into their rows of the
    generated buffers, [Bbuf, Hkv, g, D] @ [Bbuf, Hkv, D, t] (a finished row's buffer row gets a zero query until the
    buffers are rebuilt without it)."""
    state = shared_prefix
    keys_g, values_g = state.append(module.layer_idx, key, value)  # [Bbuf, Hkv, t, D]
    keys_p, values_p = state.prompt_keys[module.layer_idx], state.prompt_values[module.layer_idx]  # [P, Hkv, L, D]
    B, Hq, _, D = query.shape
    P, Hkv, m = keys_p.shape[0], keys_p.shape[1], state.m
    g = Hq // Hkv
    q = query.reshape(B, Hkv, g, D)
    grid = q.new_zeros(P * m, Hkv, g, D)
    grid[state.slot] = q
    grid = grid.view(P, m, Hkv, g, D).transpose(1, 2).reshape(P, Hkv, m * g, D)
    out_p, lse_p = softmax_attention(grid, keys_p, values_p, scaling, state.pad_bias)  # [P, Hkv, m*g, D | 1]

    def rows(x):  # [P, Hkv, m * g, E] -> each running row's [B, Hkv, g, E]
        return x.view(P, Hkv, m, g, -1).transpose(1, 2).reshape(P * m, Hkv, g, -1)[state.slot]

    own = q.new_zeros(len(keys_g), Hkv, g, D)
    own[state.buffer_row] = q
    out_g, lse_g = softmax_attention(own, keys_g, values_g, scaling)  # [Bbuf, Hkv, g, D | 1]
    out = merge_attention(rows(out_p), rows(lse_p), out_g[state.buffer_row], lse_g[state.buffer_row])
    return out.to(query.dtype).reshape(B, 1, Hq, D), None


class SharedPrefix:
    """The keys and values a decode reads. Per layer: the prompts' [P, Hkv, L, D], the prefill's own tensors (each
    prompt once; left padding masked by `pad_bias` [P, 1, 1, L], -inf on pads, None without padding), and the
    generated ones [Bbuf, Hkv, room, D], `length` of them filled (every running row is at the same step). Per running
    row [B]: `prompt_of`, its prompt (rows stay prompt-major); `slot`, its place in the [P, m] grid of queries;
    `buffer_row`, its row of the generated buffers. A finished row leaves the batch at once; its buffer row is dropped
    when the buffers are next rebuilt (they grow by KV_ROOM_STEP tokens), so that compaction copies nothing per step."""

    def __init__(self, cache, attention_mask, n: int, max_new_tokens: int):
        import torch

        self.prompt_keys = [layer.keys for layer in cache.layers]
        self.prompt_values = [layer.values for layer in cache.layers]
        P, pad = attention_mask.shape[0], attention_mask == 0
        self.pad_bias = torch.zeros(pad.shape, device=pad.device).masked_fill(pad, -math.inf)[:, None, None] \
            if pad.any() else None
        self.prompt_of = torch.arange(P, device=attention_mask.device).repeat_interleave(n)
        self.buffer_row = torch.arange(P * n, device=attention_mask.device)
        self.length, self.max_new_tokens = 0, max_new_tokens
        self.keys = [k.new_empty(P * n, k.shape[1], 0, k.shape[3]) for k in self.prompt_keys]
        self.values = [v.new_empty(P * n, v.shape[1], 0, v.shape[3]) for v in self.prompt_values]
        self.peak_bytes = 0
        self._layout()

    def append(self, layer: int, key, value):
        """Writes this step's key/value of every running row; returns the generated keys/values so far."""
        self.keys[layer][self.buffer_row, :, self.length] = key[:, :, 0]
        self.values[layer][self.buffer_row, :, self.length] = value[:, :, 0]
        return self.keys[layer][:, :, :self.length + 1], self.values[layer][:, :, :self.length + 1]

    def make_room(self) -> None:
        """Before a forward: room for one more generated token. Full buffers are rebuilt KV_ROOM_STEP tokens longer,
        with the running rows' filled part only."""
        import torch

        if self.length < self.keys[0].shape[2]:
            return
        room, t = min(self.max_new_tokens, self.length + KV_ROOM_STEP), self.length
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                buffers[i] = old.new_empty(len(self.buffer_row), old.shape[1], room, old.shape[3])
                buffers[i][:, :, :t] = old[self.buffer_row, :, :t]
        self.buffer_row = torch.arange(len(self.buffer_row), device=self.buffer_row.device)
        self.peak_bytes = max(self.peak_bytes, self.bytes())

    def keep(self, keep) -> None:
        """Only the running rows `keep` (indices, in order) go on; a prompt with no running row left leaves the prompt
        part (its keys and values are dropped)."""
        import torch

        self.buffer_row, prompt_of = self.buffer_row[keep], self.prompt_of[keep]
        alive = torch.unique_consecutive(prompt_of)
        if len(alive) < self.prompt_keys[0].shape[0]:
            self.prompt_keys = [k[alive] for k in self.prompt_keys]
            self.prompt_values = [v[alive] for v in self.prompt_values]
            self.pad_bias = None if self.pad_bias is None else self.pad_bias[alive]
            prompt_of = torch.searchsorted(alive, prompt_of)  # renumbered 0 .. len(alive) - 1
        self.prompt_of = prompt_of
        self._layout()

    def _layout(self) -> None:
        import torch

        counts = torch.bincount(self.prompt_of, minlength=self.prompt_keys[0].shape[0])
        self.m = int(counts.max())  # the one host sync of a compaction
        first = counts.cumsum(0) - counts  # each prompt's first running row
        self.slot = self.prompt_of * self.m + torch.arange(len(self.prompt_of), device=counts.device) \
            - first[self.prompt_of]
        self.peak_bytes = max(self.peak_bytes, self.bytes())

    def bytes(self) -> int:
        tensors = self.prompt_keys + self.prompt_values + self.keys + self.values
        return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: prefill, the two decode loops, the plumbing into transformers
# ---------------------------------------------------------------------------------------------------------------------


def _prefill(model, inputs):
    """One forward over the P prompts, each distinct image through the vision tower once: the last position's logits
    [P, V], the KV cache, and the M-RoPE position of each prompt's first new token [P]."""
    import torch

    language = model.model
    if not hasattr(language, "rope_deltas"):
        raise TypeError(f"sampling.sample supports Qwen-VL models (M-RoPE with rope_deltas); got {type(model).__name__}")
    # cleared so that the prefill computes it for THESE prompts (a stale one from an earlier batch is never reused)
    language.rope_deltas = None
    out = model(**encode_images_once(model, inputs), use_cache=True, logits_to_keep=1)
    deltas = language.rope_deltas if language.rope_deltas is not None else torch.zeros_like(inputs["input_ids"][:, :1])
    language.rope_deltas = None  # the decode passes positions itself; nothing stale stays behind
    # Qwen-VL's M-RoPE: after the prompt every text token sits at (its index among real tokens) + rope delta,
    # equal on all three axes; the first new token's index is the number of real prompt tokens
    position = inputs["attention_mask"].sum(1) + deltas.view(-1).to(inputs["attention_mask"].device)
    return out.logits[:, -1], out.cache, position


def _decode_shared(model, logits, cache, attention_mask, position, n: int, config, pick, stops):
    """Completion ids [P*n, T] by the shared-prefix engine: the running rows only, each prompt's KV read once per
    layer and step; a row leaves the batch right after its stop token."""
    import torch

    state = SharedPrefix(cache, attention_mask, n, config.max_new_tokens)
    cache.layers = []  # the state holds the prompts' keys now: a prompt it drops is freed
    rows = torch.arange(len(logits) * n, device=logits.device)  # the call's row (p * n + k) of each running row
    logits, position = logits.repeat_interleave(n, 0), position.repeat_interleave(n, 0)
    ids = torch.full((len(rows), config.max_new_tokens), config.pad_token_id, device=logits.device)
    text = model.config.get_text_config()
    original = text._attn_implementation
    row_steps = 0
    _register_attention()
    model.set_attn_implementation({"text_config": "shared_prefix"})
    try:
        for step in range(config.max_new_tokens):
            token = pick(logits, rows, step)
            ids[rows, step] = token
            running = ~torch.isin(token, stops)
            if step == config.max_new_tokens - 1 or not running.any():
                break
            if not running.all():
                keep = running.nonzero().squeeze(1)
                rows, token, position = rows[keep], token[keep], position[keep]
                state.keep(keep)
            state.make_room()
            out = model(input_ids=token[:, None], position_ids=(position + step).view(1, -1, 1).expand(3, -1, -1),
                        use_cache=False, shared_prefix=state)
            state.length += 1
            row_steps += len(rows)
            logits = out.logits[:, -1]
    finally:
        model.set_attn_implementation({"text_config": original})
    return ids[:, :step + 1], {"engine": "shared_prefix", "steps": step, "row_steps": row_steps,
                               "kv_bytes": state.peak_bytes}


def _decode_copies(model, logits, cache, attention_mask, position, n: int, config, pick, stops):
    """Completion ids [P*n, T] from n copies of each prompt's cache (row p*n+k), every row computed until the last one
    ends, through the model's own attention: the fallback, and the reference the engine is tested against."""
    import torch

    cache = _repeat_with_room(cache, n, config.max_new_tokens)
    logits, attention_mask, position = (t.repeat_interleave(n, dim=0) for t in (logits, attention_mask, position))
    rows = torch.arange(len(logits), device=logits.device)
    running = torch.ones(len(rows), dtype=torch.bool, device=logits.device)
    tokens = []
    for step in range(config.max_new_tokens):
        token = torch.where(running, pick(logits, rows, step), config.pad_token_id)  # ended rows keep padding
        tokens.append(token)
        running &= ~torch.isin(token, stops)
        if not running.any() or step == config.max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(token), 1)], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attention_mask, cache=cache, use_cache=True,
                    position_ids=(position + step).view(1, -1, 1).expand(3, -1, -1))
        logits = out.logits[:, -1]
    kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers
                   for t in getattr(layer, "buffers", [layer.keys, layer.values]))
    return torch.stack(tokens, 1), {"engine": "copies", "steps": step, "row_steps": step * len(rows),
                                    "kv_bytes": kv_bytes}


def _repeat_with_room(cache, n: int, room: int):
    """The prefilled cache with each row repeated n times in place (row p*n+k), copied once into buffers with room
    for `room` new tokens: a DynamicCache appends with torch.cat, which copies the whole n-times repeated prompt cache
    at every step (3x slower decode steps measured on the 30 M bench model)."""
    from transformers.cache_utils import DynamicLayer

    if any(type(layer) is not DynamicLayer for layer in cache.layers):  # sliding windows etc.: the library's way
        cache.batch_repeat_interleave(n)
        return cache

    class Layer(DynamicLayer):
        def __init__(self, keys, values):
            super().__init__()
            self.lazy_initialization(keys, values)
            P, H, self.length, _ = keys.shape
            self.buffers = [t.new_empty(P * n, H, self.length + room, t.shape[-1]) for t in (keys, values)]
            for buffer, t in zip(self.buffers, (keys, values)):
                buffer.view(P, n, H, self.length + room, -1)[:, :, :, :self.length] = t[:, None]
            self.keys, self.values = (buffer[:, :, :self.length] for buffer in self.buffers)

        def update(self, keys, values, *args, **kwargs):
            end = self.length + keys.shape[-2]
            for buffer, t in zip(self.buffers, (keys, values)):
                buffer[:, :, self.length:end] = t
            self.length = end
            self.keys, self.values = (buffer[:, :, :end] for buffer in self.buffers)
            return self.keys, self.values

    cache.layers = [Layer(layer.keys, layer.values) for layer in cache.layers]
    return cache


def _why_not_shared(model, cache) -> str | None:
    """Why the shared-prefix engine cannot decode for this model and cache (None: it can)."""
    from transformers.cache_utils import DynamicLayer

    kinds = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if kinds:
        return f"cache layers of type {', '.join(sorted(kinds))} (sliding windows?)"
    if not model._can_set_attn_implementation():
        return f"{type(model).__name__} cannot swap its attention implementation"
    return None


_WARNED: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"sampling.sample: {reason}: decoding from n copies of each prompt's KV cache instead of the "
                      "shared-prefix engine", stacklevel=3)


def _register_attention() -> None:
    """`shared_prefix` joins transformers' attention functions but not its mask functions, so no [rows, L + t] mask is
    built per step (the engine's attention function needs none)."""
    from transformers import AttentionInterface

    AttentionInterface.register("shared_prefix", shared_prefix_attention)


def encode_images_once(model, inputs) -> dict:
    """The prefill's inputs with each DISTINCT image of the batch encoded once (a pair's two orders show the same two
    images): its features go in as `mm_encoder_outputs` in place of `pixel_values`. Unchanged if none repeats."""
    import torch

    if inputs.get("pixel_values") is None:
        return dict(inputs)
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    patches = pixels.split(grid.prod(-1).tolist())
    # a few of each image's own values find candidates (no arithmetic: equal images give equal keys); only exact
    # equality makes two images one
    keys = [(tuple(g), tuple(p.flatten()[::max(1, p.numel() // 64)].tolist())) for g, p in zip(grid.tolist(), patches)]
    distinct, index, candidates = [], [], {}  # first occurrences; image -> its distinct number; key -> numbers
    for i, (key, p) in enumerate(zip(keys, patches)):
        same = next((d for d in candidates.get(key, []) if torch.equal(patches[distinct[d]], p)), None)
        if same is None:
            same = len(distinct)
            candidates.setdefault(key, []).append(same)
            distinct.append(i)
        index.append(same)
    if len(distinct) == len(patches):
        return dict(inputs)
    features = model.model.get_image_features(torch.cat([patches[i] for i in distinct]), grid[distinct],
                                              return_dict=True)
    features.pooler_output = [features.pooler_output[d] for d in index]  # per image, in the prompts' order
    if getattr(features, "deepstack_features", None) is not None:  # Qwen3-VL: features of intermediate layers too
        features.deepstack_features = [[layer[d] for d in index] for layer in features.deepstack_features]
    rest = {k: v for k, v in inputs.items() if k != "pixel_values"}
    return {**rest, "mm_encoder_outputs": {"image": features}}


def answer(completion: Completion, parse: Callable[[str], Any]) -> Any:
    """THE truncation rule, the same in every stage: a completion cut off by the token budget is unparseable (None),
    whatever its text holds ("... \\boxed{3.2}. Wait, let me reconsider" cut at the budget is not a 3.2)."""
    return None if completion.truncated else parse(completion.text)
