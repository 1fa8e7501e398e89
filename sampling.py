"""The sampler every stage uses: each prompt prefilled once, its n completions decoded from copies of that KV cache.

- `sample`: n completions per prompt with the explicit sampling config (no shipped top_k=1 leaks in);
  `sample_prompts`: the same from prompts and images (encode, then sample);
- `completion_mask` and `answer`: where a completion ends, and the truncation rule every stage applies;
- `encode_images_once`: each distinct image of a batch through the vision tower once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import common


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


def sample(model, processor, inputs, n: int, max_new_tokens: int, temperature: float = 1.0,
           do_sample: bool = True) -> Samples:
    """THE sampling routine of every stage: n completions per prompt of `inputs` (from encode_batch, on the model's
    device), with the explicit sampling config (temperature, top-k/top-p off, repetition penalty off; greedy with
    do_sample=False). Every stage reads truncation from here and parses answers through `answer`.

    Each prompt is prefilled ONCE (its images encoded once) and its n continuations are decoded from copies of that
    KV cache: `generate(num_return_sequences=n)` would prefill the same prompt n times, and at 7B with ~2,000-token
    two-image prompts that prefill, not the short answers, is the cost."""
    import torch

    config = sampling_config(model, max_new_tokens, temperature, do_sample=do_sample)
    eos = eos_token_ids(config)
    ids = _sample_tokens(model, inputs, n, config)
    mask = completion_mask(ids, eos + placeholder_token_ids(model))
    ended = torch.isin(ids, torch.tensor(eos, device=ids.device)) & mask.bool()
    truncated = (~ended.any(dim=1)).tolist()
    texts = processor.batch_decode(ids * mask + (1 - mask) * eos[0], skip_special_tokens=True)
    return Samples(ids=ids, mask=mask, truncated=truncated, texts=texts, n=n)


def sample_prompts(model, processor, prompts: list[str], images: list[list[Any]], n: int, max_new_tokens: int,
                   temperature: float = 1.0, add_vision_id: bool = False, do_sample: bool = True) -> Samples:
    """`sample` of the prompts (one list of PIL images each), encoded as every stage encodes them."""
    inputs = common.encode_batch(processor, prompts, images, add_vision_id).to(model.device)
    return sample(model, processor, inputs, n, max_new_tokens, temperature, do_sample)


def _sample_tokens(model, inputs, n: int, config):
    """Completion ids [P*n, T]: prefill once, repeat the cache n times, then one token per step for every row, as
    `generate` does (softmax of logits / temperature and multinomial, or argmax; a row that emitted an EOS id gets
    the pad id; stop when every row has ended)."""
    import torch

    with torch.inference_mode():
        logits, cache, attention_mask, position = _prefill_once(model, inputs, n, config.max_new_tokens)
        eos = torch.tensor(eos_token_ids(config), device=logits.device)
        running = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        tokens = []
        for step in range(config.max_new_tokens):
            scores = logits.float() / config.temperature if config.do_sample else logits.float()
            token = (torch.multinomial(torch.softmax(scores, -1), 1).squeeze(1) if config.do_sample
                     else scores.argmax(-1))
            token = torch.where(running, token, config.pad_token_id)  # ended rows keep padding
            tokens.append(token)
            running &= ~torch.isin(token, eos)
            if not running.any() or step == config.max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(token), 1)], dim=1)
            out = model(input_ids=token[:, None], attention_mask=attention_mask, cache=cache, use_cache=True,
                        position_ids=(position + step).view(1, -1, 1).expand(3, -1, -1))
            logits = out.logits[:, -1]
    return torch.stack(tokens, 1)


def _prefill_once(model, inputs, n: int, room: int):
    """One forward over the P prompts, each distinct image through the vision tower once, then everything the decode
    loop needs repeated n times in place (row p*n+k = prompt p's k-th copy): last-token logits, KV cache (with room
    for `room` new tokens), attention mask, and the M-RoPE position of each row's first new token."""
    import torch

    language = model.model
    if not hasattr(language, "rope_deltas"):
        raise TypeError(f"sampling.sample supports Qwen-VL models (M-RoPE with rope_deltas); got {type(model).__name__}")
    # cleared so that the prefill recomputes it for THESE prompts (a stale one from an earlier batch is never reused)
    language.rope_deltas = None
    out = model(**encode_images_once(model, inputs), use_cache=True, logits_to_keep=1)
    deltas = language.rope_deltas if language.rope_deltas is not None else torch.zeros_like(inputs["input_ids"][:, :1])
    # Qwen-VL's M-RoPE: after the prompt every text token sits at (its index among real tokens) + rope delta,
    # equal on all three axes; the first new token's index is the number of real prompt tokens
    position = inputs["attention_mask"].sum(1) + deltas.view(-1).to(inputs["attention_mask"].device)
    cache = _repeat_with_room(out.cache, n, room)
    language.rope_deltas = deltas.repeat_interleave(n, dim=0)  # what generate would hold for the expanded batch
    repeat = lambda t: t.repeat_interleave(n, dim=0)  # noqa: E731
    return repeat(out.logits[:, -1]), cache, repeat(inputs["attention_mask"]), repeat(position)


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
