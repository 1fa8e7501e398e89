"""grpo_train: EvoQuality's online stage, GRPO with the fidelity reward and a k3 KL penalty, written out by hand.

Each step draws pseudo-labelled pairs, samples G scores per image of those pairs, rewards every score by how well it
ranks the image against its partners (the fidelity to p*), normalises the rewards within each image's group, and
takes a clipped policy-gradient step with a KL penalty towards the frozen initial model (../EVOQUALITY.md, "Online
stage"). The result in --out is a plain HF checkpoint: the next round's --model.

    python grpo_train.py --model Qwen/Qwen2.5-VL-7B-Instruct --pseudolabels runs/r1/pseudolabels.jsonl \\
        --images-root data/koniq/images --out runs/r1/model --bf16 --gradient-checkpointing

    # the same on several GPUs (DDP: each process draws its own pairs, gradients are averaged)
    accelerate launch --num_processes 8 grpo_train.py ... (same flags)

    # the paper's scale (Qwen2.5-VL-7B full fine-tune, 8 x 80 GB): FSDP2, see configs/fsdp_8gpu.yaml for the memory plan
    accelerate launch --config_file configs/fsdp_8gpu.yaml grpo_train.py ... --bf16 --gradient-checkpointing

    # a killed run: the same command with --resume continues from the latest --out/checkpoints/step-N

Outputs: --out/{config.json, model weights, processor, generation config}, --out/args.json,
--out/train_log.jsonl (one line per step), --out/checkpoints/step-N/ (full training state).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

import common


@dataclass
class Args:
    model: str = common.arg(help="policy to train: a local checkpoint folder or a hub id")
    pseudolabels: str = common.arg(help="pseudolabels.jsonl from build_pseudolabels.py ({'a', 'b', 'p_star'} lines)")
    images_root: str = common.arg(help="folder the image paths in --pseudolabels are relative to")
    out: str = common.arg(help="output folder: the trained HF checkpoint, train_log.jsonl, checkpoints/")
    ref_model: Optional[str] = common.arg(None, help="frozen KL reference (default: --model, the initial policy)")
    group_size: int = common.arg(8, help="G: rollouts per image (>= 2: the reward needs a variance)")
    pairs_per_step: int = common.arg(4, help="pseudo-labelled pairs per step and process; their images are rolled out")
    epochs: int = common.arg(1, help="passes over the pseudo-labelled pairs")
    lr: float = common.arg(3e-7, help="AdamW peak learning rate (paper: 3e-7, linear decay)")
    beta: float = common.arg(0.05, help="weight of the k3 KL penalty towards the reference")
    clip_eps: float = common.arg(0.2, help="PPO clip range of the ratio")
    ppo_epochs: int = common.arg(1, help="optimisation passes over each step's rollouts (1: on-policy)")
    temperature: float = common.arg(1.0, help="sampling temperature, also used for every log-prob")
    max_new_tokens: int = common.arg(512, help="longest completion")
    reasoning: bool = common.arg(True, help="ask for <think> reasoning before the boxed answer")
    prompt: str = common.arg("evoquality", help="prompt preset", choices=sorted(common.PRESETS))
    gamma: float = common.arg(1e-6, help="variance floor in the fidelity reward's Phi")
    micro_batch_size: int = common.arg(4, help="sequences per forward/backward (does not change the gradient)")
    max_grad_norm: float = common.arg(1.0, help="gradient clipping norm")
    warmup_steps: int = common.arg(0, help="linear warmup optimizer steps before the linear decay")
    weight_decay: float = common.arg(0.0, help="AdamW weight decay")
    max_steps: int = common.arg(0, help="stop after N steps (0: all epochs); the schedule still spans all epochs")
    seed: int = common.arg(0, help="seed of the pair order and of the rollouts")
    bf16: bool = common.arg(False, help="bf16 autocast (fp32 master weights and AdamW), bf16 reference and checkpoint")
    gradient_checkpointing: bool = common.arg(False, help="recompute activations in backward (saves memory)")
    max_pixels: Optional[int] = common.arg(None, help="image processor max_pixels (default: the checkpoint's)")
    save_every: int = common.arg(100, help="save the full training state every N steps (and at the end)")
    save_total_limit: int = common.arg(2, help="keep only the latest N checkpoints/step-N folders")
    resume: bool = common.arg(False, help="continue from the latest --out/checkpoints/step-N")
    skip_missing: bool = common.arg(False, help="drop pairs whose images are missing instead of refusing")


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: reward, advantages, loss (read next to EVOQUALITY.md, "Online stage")
# ---------------------------------------------------------------------------------------------------------------------


def normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def pair_fidelity_rewards(scores: dict[str, list[Optional[float]]], pairs: list[tuple[str, str, float]],
                          gamma: float = 1e-6) -> dict[str, list[float]]:
    """Reward of each rollout: the mean over the image's partners of the fidelity between p* and the probability
    that this rollout's score beats the partner, p = Phi((q_k(i) - mu_j) / sqrt(var_i + var_j + gamma)).

    An unparseable rollout gets 0. A partner with no valid score gives no term; an image left with no term gets NaN
    for every rollout (its group is skipped). Variances are unbiased (ddof 1) with >= 2 valid scores, else 0."""
    stats = {}
    for image, qs in scores.items():
        valid = [q for q in qs if q is not None]
        mu = sum(valid) / len(valid) if valid else None
        var = sum((q - mu) ** 2 for q in valid) / (len(valid) - 1) if len(valid) >= 2 else 0.0
        stats[image] = (mu, var)
    partners: dict[str, list[tuple[str, float]]] = {image: [] for image in scores}
    for a, b, p_star in pairs:  # both directions: p*(b, a) = 1 - p*(a, b)
        partners[a].append((b, p_star))
        partners[b].append((a, 1.0 - p_star))
    rewards = {}
    for image, qs in scores.items():
        var_i = stats[image][1]
        valid_partners = [(j, p_star) for j, p_star in partners[image] if stats[j][0] is not None]
        if not valid_partners:
            rewards[image] = [float("nan")] * len(qs)
            continue
        rewards[image] = []
        for q in qs:
            if q is None:
                rewards[image].append(0.0)
                continue
            terms = []
            for j, p_star in valid_partners:
                mu_j, var_j = stats[j]
                p = normal_cdf((q - mu_j) / math.sqrt(var_i + var_j + gamma))
                terms.append(math.sqrt(p_star * p) + math.sqrt((1.0 - p_star) * (1.0 - p)))
            rewards[image].append(sum(terms) / len(terms))
    return rewards


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean) / (std + eps) within each row (one image's G rollouts), std unbiased (ddof 1).
    A row holding a NaN (skipped image) or constant rewards gets zeros: it carries no ranking signal."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.full_like(mean, float("nan"))
    advantages = (rewards - mean) / (std + eps)
    dead = ~torch.isfinite(std) | (std == 0) | ~torch.isfinite(rewards).all(dim=1, keepdim=True)
    return torch.where(dead, torch.zeros_like(advantages), advantages)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, beta: float, clip_eps: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per token -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta k3(ref, logp), rho = exp(logp - old_logp),
    k3 = exp(ref - logp) - (ref - logp) - 1 >= 0; masked mean over each sequence's tokens, then mean over sequences.
    Shapes: logp/old_logp/ref_logp/mask [N, T], advantages [N]. Returns (loss, {"kl", "clip_fraction"})."""
    mask = mask.to(logp.dtype)
    a = advantages.to(logp.dtype)[:, None]
    ratio = torch.exp(logp - old_logp)
    policy_term = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a)
    log_ref_ratio = ref_logp - logp
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
    tokens = mask.sum(dim=1).clamp(min=1)
    loss = (((policy_term + beta * kl) * mask).sum(dim=1) / tokens).mean()
    clipped = ((ratio < 1 - clip_eps) & (a < 0)) | ((ratio > 1 + clip_eps) & (a > 0))
    metrics = {"kl": ((kl * mask).sum(dim=1) / tokens).mean().detach(),
               "clip_fraction": ((clipped * mask).sum() / mask.sum().clamp(min=1)).detach()}
    return loss, metrics


def completion_mask(completion_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 for every completion token up to and including the first EOS (all of them if none), from positions:
    the pad token may itself be an EOS id, so `token != pad` would drop a real EOS or keep padding."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    T = completion_ids.shape[1]
    first_eos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), torch.full_like(is_eos[:, 0], T - 1,
                                                                                            dtype=torch.long))
    return (torch.arange(T, device=completion_ids.device)[None, :] <= first_eos[:, None]).long()


def token_logprobs(model, prompt: dict, completion_ids: torch.Tensor, temperature: float,
                   placeholder_ids: tuple[int, ...] = (), pad_id: int = 0) -> torch.Tensor:
    """log pi(token) of each completion token [N, T], from ONE forward over prompt + completion with the very
    pixel_values/image_grid_thw used at generation, logits / temperature (the temperature the tokens were drawn at).

    A sampled image/video placeholder token (`placeholder_ids`; a degenerate rollout can emit one) would make the
    forward look for image features that do not exist; it is fed as `pad_id` instead. The completion mask ends at it,
    and its own log-prob comes from the position before it, so no used log-prob depends on that input."""
    T = completion_ids.shape[1]
    ones = torch.ones_like(completion_ids)
    safe_ids = completion_ids.masked_fill(torch.isin(completion_ids, completion_ids.new_tensor(list(placeholder_ids))),
                                          pad_id)
    inputs = dict(prompt, input_ids=torch.cat([prompt["input_ids"], safe_ids], dim=1),
                  attention_mask=torch.cat([prompt["attention_mask"], ones], dim=1))
    if "mm_token_type_ids" in prompt:  # M-RoPE positions: completion tokens are text
        inputs["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(completion_ids)], dim=1)
    logits = model(**inputs, use_cache=False, logits_to_keep=T + 1).logits[:, :-1]  # position t predicts token t + 1
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, completion_ids[..., None]).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Batches: one row per rollout; pixel rows follow image_grid_thw
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


def step_pairs(pairs: list, seed: int, step: int, steps_per_epoch: int, rank: int, world: int, per_step: int) -> list:
    """The pairs of one process at one step: a seeded shuffle per epoch, cut into disjoint per-process slices.
    A function of the step alone, so a resumed run draws exactly the pairs the killed run would have drawn."""
    epoch, position = divmod(step, steps_per_epoch)
    order = list(range(len(pairs)))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    start = (position * world + rank) * per_step
    return [pairs[i] for i in order[start:start + per_step]]


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: inputs, checkpoints, the final model
# ---------------------------------------------------------------------------------------------------------------------


def load_pairs(path: str, images_root: str, skip_missing: bool) -> list[tuple[str, str, float]]:
    """(a, b, p_star) of every pseudo-labelled pair; refuses malformed lines and missing images before any model."""
    try:
        records = common.read_jsonl(path, with_lineno=True)
    except ValueError as e:
        common.die(str(e))
    if not Path(path).is_file() or not records:
        common.die(f"{path}: no pseudo-labelled pairs (missing or empty file)")
    pairs = []
    for lineno, r in records:
        a, b, p_star = r.get("a"), r.get("b"), r.get("p_star")
        if not (isinstance(a, str) and isinstance(b, str) and isinstance(p_star, (int, float))
                and not isinstance(p_star, bool) and 0.0 <= p_star <= 1.0 and a != b):
            common.die(f"{path}:{lineno}: expected {{'a': path, 'b': other path, 'p_star': number in [0, 1]}}, "
                       f"got {json.dumps(r)[:200]}")
        pairs.append((a, b, float(p_star)))
    root = Path(images_root)
    missing = sorted({x for a, b, _ in pairs for x in (a, b) if not (root / x).is_file()})
    if missing and not skip_missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing) - 10} more)" if len(missing) > 10 else "")
        common.die(f"{len(missing)} image(s) named in {path} do not exist under {root}: {shown} "
                   "(--skip-missing drops their pairs)")
    if missing:
        kept = [p for p in pairs if not ({p[0], p[1]} & set(missing))]
        print(f"--skip-missing: dropped {len(pairs) - len(kept)} of {len(pairs)} pairs ({len(missing)} missing images)")
        pairs = kept
    return pairs


def latest_checkpoint(out: Path) -> Optional[Path]:
    done = [p for p in (out / "checkpoints").glob("step-*") if p.is_dir() and p.name.split("-")[1].isdigit()
            and (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(accelerator, out: Path, step: int, trainer_state: dict, keep: int) -> None:
    """Full training state (model, optimizer, scheduler, RNG; accelerate's save_state) + the data position, written
    to step-N.tmp and renamed: a kill mid-save leaves no step-N folder that --resume would trust."""
    final, tmp = out / "checkpoints" / f"step-{step}", out / "checkpoints" / f"step-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        common.write_json_atomic(tmp / "trainer_state.json", {**trainer_state, "step": step})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*")
                       if p.name.split("-")[1].isdigit())
        for old in steps[:-keep] if keep > 0 else []:
            shutil.rmtree(out / "checkpoints" / f"step-{old}", ignore_errors=True)
    accelerator.wait_for_everyone()


def save_final_model(accelerator, model, processor, out: Path, bf16: bool) -> None:
    """The loadable HF checkpoint in --out: written to --out/.final.tmp, then renamed file by file with config.json
    last, so that --out never holds a config.json beside half-written weights."""
    state_dict = accelerator.get_state_dict(model)  # gathers full weights under FSDP
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if bf16:  # fp32 master weights -> bf16 on disk, like the released checkpoints
            state_dict = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state_dict.items()}
            unwrapped.config.dtype = torch.bfloat16
        tmp = out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped.save_pretrained(tmp, state_dict=state_dict)
        processor.save_pretrained(tmp)
        names = sorted((p.name for p in tmp.iterdir()), key=lambda name: name == "config.json")
        (out / "config.json").unlink(missing_ok=True)
        for name in names:
            os.replace(tmp / name, out / name)
        tmp.rmdir()
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------------------------------
# Main loop
# ---------------------------------------------------------------------------------------------------------------------


def main() -> None:
    args = common.parse_args(Args)
    if args.group_size < 2:
        common.die(f"--group-size {args.group_size}: needs >= 2 (the reward uses each image's score variance)")
    if args.ppo_epochs < 1 or args.pairs_per_step < 1 or args.micro_batch_size < 1 or args.epochs < 1:
        common.die("--ppo-epochs, --pairs-per-step, --micro-batch-size and --epochs must be >= 1")
    if args.temperature <= 0:
        common.die("--temperature must be > 0 (GRPO samples; log-probs divide the logits by it)")
    pairs = load_pairs(args.pseudolabels, args.images_root, args.skip_missing)  # before any model is loaded

    from accelerate import Accelerator
    from accelerate.utils import DistributedType, gather_object
    from tqdm import tqdm
    from transformers import get_linear_schedule_with_warmup

    # cpu=True when there is no GPU: without it accelerate 1.15 runs each torchrun process alone (DistributedType.NO)
    accelerator = Accelerator(mixed_precision="bf16" if args.bf16 else "no", cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    out = Path(args.out)
    steps_per_epoch = len(pairs) // (args.pairs_per_step * world)
    if steps_per_epoch == 0:
        common.die(f"{len(pairs)} pairs is fewer than one step needs ({args.pairs_per_step} pairs x {world} processes)")
    total_steps = steps_per_epoch * args.epochs
    last_step = min(total_steps, args.max_steps) if args.max_steps > 0 else total_steps
    pairs_sha = hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]
    trainer_state = {"world_size": world, "pairs_per_step": args.pairs_per_step, "n_pairs": len(pairs),
                     "pairs_sha256": pairs_sha, "seed": args.seed, "steps_per_epoch": steps_per_epoch}
    checkpoint = latest_checkpoint(out)
    if checkpoint is not None and not args.resume:
        common.die(f"{out} already holds a run ({checkpoint.name}); pass --resume to continue it, or use another --out")
    if checkpoint is None and not args.resume and common.read_jsonl(out / "train_log.jsonl"):
        common.die(f"{out} holds a train_log.jsonl but no checkpoint; pass --resume to start over in it, or choose "
                   "another --out")
    preset = common.get_preset(args.prompt)
    if accelerator.is_main_process:
        for stale in (out / "checkpoints").glob("step-*.tmp"):  # a save that a kill interrupted
            shutil.rmtree(stale, ignore_errors=True)
        common.write_json_atomic(out / "args.json", {"args": asdict(args), "preset": preset.name,
                                                     "preset_hash": preset.hash(), "world_size": world,
                                                     "n_pairs": len(pairs), "total_steps": total_steps,
                                                     "versions": common.package_versions()})

    # TRY NOT TO MODIFY: models. The policy keeps fp32 master weights (bf16 AdamW would round lr 3e-7 updates away);
    # the reference is a frozen bf16/fp32 replica on every process, outside DDP/FSDP (no collectives in its forward).
    device = accelerator.device
    processor = common.load_processor(args.model, max_pixels=args.max_pixels)
    policy = common.load_model(args.model, dtype=torch.float32)
    reference = common.load_model(args.ref_model or args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32,
                                  device=device).eval().requires_grad_(False)
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vision_start_id = policy.config.vision_start_token_id
    generation_config = common.sampling_config(policy, args.max_new_tokens, args.temperature, do_sample=True)
    eos_ids = common.eos_token_ids(generation_config)
    placeholder_ids = tuple(i for i in (policy.config.image_token_id, getattr(policy.config, "video_token_id", None))
                            if i is not None)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, args.warmup_steps, total_steps * args.ppo_epochs)
    model, optimizer = accelerator.prepare(policy, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # not prepared: accelerate would step it once per process
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    ddp = accelerator.distributed_type in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)

    start_step = 0
    if checkpoint is not None:
        saved = json.loads((checkpoint / "trainer_state.json").read_text())
        changed = {k: (saved.get(k), v) for k, v in trainer_state.items() if saved.get(k) != v}
        if changed:
            common.die(f"--resume from {checkpoint}: the data order would change ({changed}); same inputs, "
                       "--pairs-per-step, --seed and number of processes needed")
        accelerator.load_state(str(checkpoint))
        start_step = saved["step"]
        accelerator.print(f"resuming from {checkpoint} at step {start_step}")
    if accelerator.is_main_process and (out / "train_log.jsonl").exists():  # drop steps logged after the checkpoint
        kept = [r for r in common.read_jsonl(out / "train_log.jsonl") if r.get("step", 0) <= start_step]
        common.write_jsonl_atomic(out / "train_log.jsonl", kept)
    accelerator.wait_for_everyone()
    log = common.JsonlWriter(out / "train_log.jsonl") if accelerator.is_main_process else None
    prompt_text = preset.prompt("score", args.reasoning)
    G = args.group_size

    progress = tqdm(range(start_step, last_step), initial=start_step, total=last_step,
                    disable=not accelerator.is_main_process, desc="grpo")
    for step in progress:
        t0 = time.perf_counter()
        # ALGO LOGIC: rollouts. Both members of every pair are scored in this step; G rows per image.
        pairs_now = step_pairs(pairs, args.seed, step, steps_per_epoch, rank, world, args.pairs_per_step)
        images = list(dict.fromkeys(x for a, b, _ in pairs_now for x in (a, b)))
        encoded = common.encode_batch(processor, [prompt_text] * len(images),
                                      [[common.load_image(Path(args.images_root) / x)] for x in images],
                                      add_vision_id=preset.add_vision_id)
        batch = select_rows(dict(encoded), [i for i in range(len(images)) for _ in range(G)], vision_start_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        torch.manual_seed(args.seed * 1_000_003 + step * 1009 + rank)  # rollouts are a function of (seed, step, rank)
        model.eval()
        with torch.no_grad(), accelerator.autocast():
            # FSDP2 shards hook into the module itself, so the unwrapped module generates with gathered layers;
            # synced_gpus keeps every rank stepping until all are done (a rank that stops early would hang the others).
            sequences = accelerator.unwrap_model(model).generate(
                **batch, generation_config=generation_config, synced_gpus=fsdp and world > 1)
        prompt_len = batch["input_ids"].shape[1]
        completions = sequences[:, prompt_len:]
        mask = completion_mask(completions, eos_ids + list(placeholder_ids))  # see token_logprobs
        texts = processor.batch_decode(completions * mask + (1 - mask) * eos_ids[0], skip_special_tokens=True)
        parsed = [common.parse_score(t, preset) for t in texts]
        t_generation = time.perf_counter() - t0

        # ALGO LOGIC: rewards and advantages within each image's group
        scores = {x: parsed[i * G:(i + 1) * G] for i, x in enumerate(images)}
        rewards = pair_fidelity_rewards(scores, pairs_now, args.gamma)
        reward_matrix = torch.tensor([rewards[x] for x in images], dtype=torch.float32)
        advantages = group_advantages(reward_matrix).flatten().to(device)

        # ALGO LOGIC: reference log-probs (frozen), then --ppo-epochs passes of micro-batched loss + backward
        t1 = time.perf_counter()
        N = len(parsed)
        micro_batches = [list(range(s, min(s + args.micro_batch_size, N))) for s in range(0, N, args.micro_batch_size)]

        def mb_inputs(rows):
            width = int(mask[rows].sum(dim=1).max())  # causal: trailing padding changes no earlier log-prob
            return select_rows(batch, rows, vision_start_id), completions[rows, :width], mask[rows, :width]

        ref_logps = []
        with torch.no_grad(), accelerator.autocast():
            for rows in micro_batches:
                prompt, ids, _ = mb_inputs(rows)
                ref_logps.append(token_logprobs(reference, prompt, ids, args.temperature, placeholder_ids, eos_ids[0]))
        t_logprobs = time.perf_counter() - t1

        t2 = time.perf_counter()
        model.train()
        old_logps: list[torch.Tensor] = []
        sums = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0}
        for ppo_epoch in range(args.ppo_epochs):
            for k, rows in enumerate(micro_batches):
                prompt, ids, mb_mask = mb_inputs(rows)
                sync = not ddp or k == len(micro_batches) - 1  # DDP: all-reduce once, on the last micro-batch
                with (contextlib.nullcontext() if sync else accelerator.no_sync(model)), accelerator.autocast():
                    logp = token_logprobs(model, prompt, ids, args.temperature, placeholder_ids, eos_ids[0])
                    if ppo_epoch == 0:  # old policy = the policy before this step's first update
                        old_logps.append(logp.detach())
                    loss, metrics = grpo_loss(logp, old_logps[k], ref_logps[k], advantages[rows], mb_mask,
                                              args.beta, args.clip_eps)
                    # weight by the micro-batch's share of sequences: the sum is the mean over all N sequences
                    accelerator.backward(loss * len(rows) / N)
                if ppo_epoch == args.ppo_epochs - 1:
                    for key, value in (("loss", loss), *metrics.items()):
                        sums[key] += float(value.detach()) * len(rows) / N
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        t_backward = time.perf_counter() - t2

        # TRY NOT TO MODIFY: logging (means over processes; counts summed)
        valid_rewards = reward_matrix[torch.isfinite(reward_matrix)]
        skipped = ~torch.isfinite(reward_matrix).all(dim=1)
        group_std = reward_matrix.std(dim=1)
        score_groups = [[q for q in qs if q is not None] for qs in scores.values()]
        score_std = [torch.tensor(s).std().item() for s in score_groups if len(s) >= 2]
        n_tokens = int(mask.sum())
        local = {
            "loss": sums["loss"], "kl": sums["kl"], "clip_fraction": sums["clip_fraction"],
            "reward_mean": valid_rewards.mean().item() if len(valid_rewards) else float("nan"),
            "reward_std": valid_rewards.std().item() if len(valid_rewards) > 1 else float("nan"),
            "parse_failure_rate": sum(q is None for q in parsed) / N,
            "zero_std_fraction": float(((group_std == 0) & ~skipped).float().mean()),
            "score_mean": (sum(map(sum, score_groups)) / max(1, sum(map(len, score_groups))))
            if any(score_groups) else float("nan"),
            "score_within_group_std": sum(score_std) / len(score_std) if score_std else float("nan"),
            "completion_length": n_tokens / N,
        }
        means = accelerator.reduce(torch.tensor(list(local.values()), dtype=torch.float64, device=device), "mean")
        totals = accelerator.reduce(torch.tensor([float(skipped.sum()), float(len(images)), float(n_tokens)],
                                                 dtype=torch.float64, device=device), "sum")
        all_pairs = gather_object([[a, b] for a, b, _ in pairs_now])
        step_seconds = time.perf_counter() - t0
        record = {"step": step + 1, "epoch": step // steps_per_epoch, "lr": scheduler.get_last_lr()[0],
                  **{k: v if math.isfinite(v) else None for k, v in zip(local, means.tolist())},  # NaN -> null
                  "groups_skipped": int(totals[0]), "groups": int(totals[1]), "grad_norm": float(grad_norm),
                  "generated_tokens": int(totals[2]), "step_seconds": step_seconds,
                  "generation_seconds": t_generation, "logprob_seconds": t_logprobs, "backward_seconds": t_backward,
                  "generated_tokens_per_s": n_tokens / t_generation, "pairs": all_pairs}
        if log is not None:
            log.write(record)
        progress.set_postfix(step_s=f"{step_seconds:.1f}", reward=f"{record['reward_mean'] or float('nan'):.3f}")
        if (step + 1) % args.save_every == 0 or step + 1 == last_step:
            save_checkpoint(accelerator, out, step + 1, trainer_state, args.save_total_limit)

    if log is not None:
        log.close()
    save_final_model(accelerator, model, processor, out, args.bf16)
    accelerator.print(f"wrote {out} (step {last_step} of {total_steps})")
    accelerator.end_training()


if __name__ == "__main__":
    main()
