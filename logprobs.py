"""logprobs: log pi(token) of GRPO's completions, each prompt forwarded ONCE with its G completions on top.

The reference and the policy pass both call `shared_prompt`: P prompts (left padded, as `common.encode_batch` makes
them, pixel_values included) and the G completions of each, rows p * G + g of `ids`. Each prompt becomes one packed
sequence [prompt (L), c_1 (T), ..., c_G (T)] with a 4D attention mask in which completion g sees the prompt's real
tokens and its own earlier tokens only, and M-RoPE positions in which every completion starts where the prompt ends,
as if it were alone behind it. The log-probs and the gradients (through the shared prompt and the vision tower) are
those of G separate prompt + completion forwards (`per_row`, kept as the reference the tests compare against), at
L + G T tokens instead of G (L + T), and the vision tower runs once per image.

    from logprobs import shared_prompt
    logp = shared_prompt(model, prompts, ids, temperature, placeholder_ids, pad_id)   # [P * G, T]

Needs the sdpa attention (the default; a boolean mask under eager attention is read as numbers). The mask is
[P, 1, S, S] booleans for S = L + G T (27 M per prompt at L = 1,110, G = 8, T = 512; 306 M at
G = 32), and attention runs over all S x S entries: at G = 32 the masked-out completion pairs are most of them.
"""

from __future__ import annotations

import torch

import parallel
import sampling

LOGPROB_CHUNK = 64  # completion positions per log-softmax chunk: 64 x rows x 152k vocab x 4 B at most


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: log-softmax at the sampled tokens, chunk by chunk
# ---------------------------------------------------------------------------------------------------------------------


def _chunk_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # bf16 logits: fp32 here
    return x.gather(-1, ids[..., None]).squeeze(-1) - torch.logsumexp(x, dim=-1)


def logprobs_at(logits: torch.Tensor, ids: torch.Tensor, temperature: float,
                chunk: int = LOGPROB_CHUNK) -> torch.Tensor:
    """log_softmax(logits / temperature) at `ids`, as gather minus logsumexp over `chunk` positions at a time: never a
    full fp32 [N, T, vocab] log-softmax (at 152k vocab it would outweigh the logits). Each chunk is recomputed in
    backward (checkpoint), so backward keeps the logits only, not an fp32 copy per chunk."""
    from torch.utils.checkpoint import checkpoint

    parts = []
    for s in range(0, ids.shape[1], chunk):
        args = (logits[:, s:s + chunk], ids[:, s:s + chunk], temperature)
        parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if torch.is_grad_enabled()
                     else _chunk_logprobs(*args))
    return torch.cat(parts, dim=1)


def safe_ids(ids: torch.Tensor, placeholder_ids: tuple[int, ...], pad_id: int) -> torch.Tensor:
    """A sampled image/video placeholder token (a degenerate rollout can emit one) would make the forward look for
    image features that do not exist; it is fed as `pad_id`. The completion mask ends at it, and its own log-prob
    comes from the position before it, so no used log-prob depends on that input."""
    return ids.masked_fill(torch.isin(ids, ids.new_tensor(list(placeholder_ids))), pad_id)


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: each prompt once, its G completions packed behind it
# ---------------------------------------------------------------------------------------------------------------------


def packed_layout(model, prompts: dict, G: int, T: int) -> dict:
    """Mask, positions and logit indices of P packed rows [prompt (L), c_1 .. c_G (T each)].

    Mask: causal, AND a completion's query sees only the prompt and its own completion, AND never the prompt's left
    padding, OR the diagonal (a padded query with no key at all would give NaN). Positions: the prompt's own M-RoPE
    positions (get_rope_index, as the per-row forward computes them); completion token t at the prompt's real length +
    its rope delta + t on all three axes, for every completion (what the per-row forward gives the text after the
    prompt)."""
    pad_mask = prompts["attention_mask"].bool()
    P, L = pad_mask.shape
    S, device = L + G * T, pad_mask.device
    positions, deltas = parallel.unwrap(model).model.get_rope_index(
        prompts["input_ids"], mm_token_type_ids=prompts["mm_token_type_ids"],
        image_grid_thw=prompts.get("image_grid_thw"), attention_mask=prompts["attention_mask"])
    t = torch.arange(T, device=device).repeat(G)  # [G T]: position within its completion
    completion_positions = (pad_mask.sum(1) + deltas.view(-1).to(device))[:, None] + t  # [P, G T]
    position_ids = torch.cat([positions.to(device), completion_positions.expand(3, P, G * T)], dim=2)
    segment = torch.cat([torch.zeros(L, dtype=torch.long, device=device),
                         torch.arange(1, G + 1, device=device).repeat_interleave(T)])  # 0: prompt, g + 1: c_g
    sees = (segment[None, :] == 0) | (segment[:, None] == segment[None, :])
    causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()
    keys = torch.cat([pad_mask, torch.ones(P, G * T, dtype=torch.bool, device=device)], dim=1)
    mask = ((causal & sees)[None] & keys[:, None, :]) | torch.eye(S, dtype=torch.bool, device=device)
    # completion g's token t is predicted at the prompt's last position (t = 0) or at its own token t - 1
    starts = L + T * torch.arange(G, device=device)[:, None]
    keep = torch.cat([torch.full((G, 1), L - 1, device=device), starts + torch.arange(T - 1, device=device)], dim=1)
    return {"attention_mask": mask[:, None], "position_ids": position_ids, "logits_to_keep": keep.flatten()}


def shared_prompt(model, prompts: dict, ids: torch.Tensor, temperature: float, placeholder_ids: tuple[int, ...] = (),
                  pad_id: int = 0) -> torch.Tensor:
    """log pi(token) [P G, T] of completion rows p G + g (`ids`), from ONE forward over P packed rows: each prompt of
    `prompts` (P rows, one image each, pixel_values through the root forward so FSDP gathers the vision weights) and
    its G completions behind it, logits / temperature (the temperature the tokens were drawn at). Trailing padding
    after a completion's end changes no earlier log-prob (causal). A group does not split: a micro-batch holds whole
    groups, and a group larger than the micro-batch size is one prompt with all its G completions."""
    P, L = prompts["input_ids"].shape
    G, T = ids.shape[0] // P, ids.shape[1]
    if ids.shape[0] != P * G:
        raise ValueError(f"{ids.shape[0]} completion rows for {P} prompts: not whole groups")
    implementation = parallel.unwrap(model).config.text_config._attn_implementation
    if implementation != "sdpa":
        raise ValueError(f"shared_prompt needs attn_implementation='sdpa' (the model has {implementation!r})")
    layout = packed_layout(model, prompts, G, T)
    inputs = dict(prompts, input_ids=torch.cat([prompts["input_ids"], safe_ids(ids, placeholder_ids, pad_id)
                                               .view(P, G * T)], dim=1), **layout)
    types = prompts["mm_token_type_ids"]  # the processor's image-token flags; completion tokens are text
    inputs["mm_token_type_ids"] = torch.cat([types, types.new_zeros(P, G * T)], dim=1)
    logits = model(**inputs, use_cache=False).logits  # [P, G T, vocab]
    return logprobs_at(logits.reshape(P * G, T, -1), ids, temperature)


# ---------------------------------------------------------------------------------------------------------------------
# The rows of an encoded batch (a micro-batch's prompts, each with its own pixel_values)
# ---------------------------------------------------------------------------------------------------------------------


def images_per_row(batch: dict, vision_start_id: int) -> list[int]:
    return (batch["input_ids"] == vision_start_id).sum(dim=1).tolist()


def select_rows(batch: dict, rows: list[int], vision_start_id: int) -> dict:
    """The sub-batch of the given rows (repeats allowed), pixel_values and image_grid_thw included."""
    counts = images_per_row(batch, vision_start_id)
    image_start = [sum(counts[:r]) for r in range(len(counts) + 1)]
    patches = batch["image_grid_thw"].prod(dim=1).tolist()
    pixel_start = [sum(patches[:i]) for i in range(len(patches) + 1)]
    images = [i for r in rows for i in range(image_start[r], image_start[r + 1])]
    index = torch.tensor(rows, device=batch["input_ids"].device)
    out = {k: v[index] for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    out["image_grid_thw"] = batch["image_grid_thw"][images]
    out["pixel_values"] = torch.cat([batch["pixel_values"][pixel_start[i]:pixel_start[i + 1]] for i in images])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The per-row reference: one prompt + completion forward per rollout (what the tests compare the shared path with)
# ---------------------------------------------------------------------------------------------------------------------


def per_row(model, prompt: dict, completion_ids: torch.Tensor, temperature: float,
            placeholder_ids: tuple[int, ...] = (), pad_id: int = 0) -> torch.Tensor:
    """log pi(token) of each completion token [N, T], from ONE forward over prompt + completion per row (`prompt` has
    N rows, repeats allowed) with the very pixel_values/image_grid_thw used at generation (each distinct image
    encoded once: shared_image_features), logits / temperature."""
    T = completion_ids.shape[1]
    ones = torch.ones_like(completion_ids)
    inputs = dict(prompt, input_ids=torch.cat([prompt["input_ids"], safe_ids(completion_ids, placeholder_ids, pad_id)],
                                              dim=1),
                  attention_mask=torch.cat([prompt["attention_mask"], ones], dim=1))
    if "mm_token_type_ids" in prompt:  # M-RoPE positions: completion tokens are text
        inputs["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(completion_ids)], dim=1)
    inputs = shared_image_features(model, inputs)
    logits = model(**inputs, use_cache=False, logits_to_keep=T + 1).logits[:, :-1]  # position t predicts token t + 1
    return logprobs_at(logits, completion_ids, temperature)


def shared_image_features(model, inputs: dict) -> dict:
    """The forward's inputs with each distinct image of the micro-batch through the vision tower ONCE (its G rollout
    rows share its features as `mm_encoder_outputs`; with gradient, so its backward runs once too). Not under FSDP:
    the root's vision weights (patch embedding, merger) are gathered only inside the root forward, so there every row
    keeps its own pixel_values."""
    if parallel.is_sharded(model):
        return inputs
    return sampling.encode_images_once(parallel.unwrap(model), inputs)  # DDP: the wrapped module's tower
