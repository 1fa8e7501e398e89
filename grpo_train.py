"""Stage 3 of a round, the online stage (paper: Method, online stage: the fidelity reward of each sampled score against
the pseudo-preferences p*, group-normalised advantages, GRPO's clipped objective with a KL penalty), written out by
hand. Each step draws pseudo-labelled pairs, samples G scores per image of those pairs, rewards every score by how
well it ranks the image against its partners, normalises the rewards within each image's group, and takes a clipped
policy-gradient step with a k3 KL penalty towards the frozen initial model.

One process (bf16 and gradient checkpointing by default on a GPU):

    python grpo_train.py --model Qwen/Qwen2.5-VL-7B-Instruct --pseudolabels runs/r1/pseudolabels.jsonl \\
        --images-root data/koniq/images --out runs/r1/model

Several processes, small models (DDP replicas; torchrun on CPU):

    accelerate launch --num_processes 8 grpo_train.py ...

The paper's scale (Qwen2.5-VL-7B full fine-tune, 8 x 80 GB): FSDP2, the same code on CPU (gloo) and GPU:

    accelerate launch --num_processes 8 grpo_train.py ... --group-size 32 --fsdp [--shard-reference]
    torchrun --standalone --nproc_per_node 2 grpo_train.py ... --fsdp

Writes in --out a plain HF checkpoint (the next round's --model), train_log.jsonl (one line per step), args.json,
settings.json and checkpoints/step-N/; a killed run continues with the same command and --resume.
"""


from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

import common
import logprobs
import parallel
import prompts
import sampling
import votes


@dataclass
class Args:
    model: str = common.arg(help="policy to train: a local checkpoint folder or a hub id")
    pseudolabels: str = common.arg(help="pseudolabels.jsonl from build_pseudolabels.py ({'a', 'b', 'p_star'} lines)")
    images_root: str = common.arg(help="folder the image paths in --pseudolabels are relative to")
    out: str = common.arg(help="output folder: the trained HF checkpoint, train_log.jsonl, checkpoints/")
    ref_model: Optional[str] = common.arg(None, help="frozen KL reference (default: --model, the initial policy)")
    group_size: int = common.arg(8, help="G: rollouts per image (>= 2: the reward needs a variance)")
    pairs_per_step: int = common.arg(4, help="pseudo-labelled pairs per step and process (a step: this x processes)")
    epochs: int = common.arg(1, help="passes over the pseudo-labelled pairs")
    lr: float = common.arg(3e-7, help="AdamW peak learning rate (paper: 3e-7, linear decay)")
    beta: float = common.arg(0.05, help="weight of the k3 KL penalty towards the reference")
    clip_eps: float = common.arg(0.2, help="PPO clip range of the ratio")
    ppo_epochs: int = common.arg(1, help="optimisation passes over each step's rollouts (1: on-policy)")
    temperature: float = common.arg(1.0, help="sampling temperature, also used for every log-prob")
    max_new_tokens: int = common.arg(512, help="longest completion (a completion cut here is unparseable: reward 0)")
    reasoning: bool = common.arg(True, help="ask for reasoning before the boxed answer")
    prompt: str = common.arg("evoquality", help="prompt preset", choices=sorted(prompts.PRESETS))
    gamma: float = common.arg(1e-6, help="variance floor in the fidelity reward's Phi")
    rollout_batch: int = common.arg(8, help="images per sampling call (x G rows); 8 = a process's step at "
                                           "--pairs-per-step 4: at 7B, G 32 the rollout phase then peaks below the "
                                           "update (bench/memory_plan.py). Rollouts do not depend on it")
    micro_batch_size: int = common.arg(4, help="rollouts per forward/backward, in whole groups (at least one); "
                                       "does not change the gradient")
    max_grad_norm: float = common.arg(1.0, help="gradient clipping norm")
    warmup_steps: int = common.arg(0, help="linear warmup optimizer steps before the linear decay")
    weight_decay: float = common.arg(0.0, help="AdamW weight decay")
    max_steps: int = common.arg(0, help="stop after N steps (0: all epochs); the schedule still spans all epochs")
    seed: int = common.arg(0, help="seed of the pair order and of the rollouts' sampling noise")
    bf16: Optional[bool] = common.arg(None, help="bf16 compute, fp32 master weights and AdamW; bf16 reference and "
                                                 "checkpoint (default: on with CUDA, off on CPU)")
    gradient_checkpointing: Optional[bool] = common.arg(None, help="recompute activations in backward "
                                                                   "(default: on with CUDA, off on CPU)")
    fsdp: bool = common.arg(False, help="shard the policy with FSDP2 (7B full fine-tuning); default: DDP replicas")
    shard_reference: bool = common.arg(False, help="with --fsdp: shard the frozen reference too (else a replica)")
    max_pixels: Optional[int] = common.arg(None, help="image processor max_pixels (default: the checkpoint's)")
    save_every: int = common.arg(100, help="save the full training state every N steps (and at the end)")
    save_total_limit: int = common.arg(2, help="keep only the latest N checkpoints/step-N folders")
    resume: bool = common.arg(False, help="continue from the latest --out/checkpoints/step-N (same settings only)")
    skip_missing: bool = common.arg(False, help="drop pairs whose images do not open instead of refusing")
    dist_timeout: int = common.arg(1800, help="seconds a collective waits before raising (a hang becomes an error)")


# settings that change the result: a --resume with any of them different is refused (common.refuse_changed_settings)
METHOD_SETTINGS = ("group_size", "epochs", "lr", "beta", "clip_eps", "ppo_epochs", "temperature", "max_new_tokens",
                   "reasoning", "prompt", "gamma", "max_grad_norm", "warmup_steps", "weight_decay", "seed", "bf16",
                   "max_pixels", "skip_missing", "images_root")


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: reward, advantages, loss (the paper's online stage, formula by formula)
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


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: a step's data: its pairs, its sampling calls, one row per rollout
# ---------------------------------------------------------------------------------------------------------------------


def step_pairs(pairs: list, seed: int, step: int, steps_per_epoch: int, per_step: int) -> list:
    """The pairs of one step (all processes together): a seeded shuffle per epoch, cut into disjoint slices.
    A function of the step alone, so a resumed run draws exactly the pairs the killed run would have drawn."""
    epoch, position = divmod(step, steps_per_epoch)
    order = list(range(len(pairs)))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    return [pairs[i] for i in order[position * per_step:(position + 1) * per_step]]


def sampling_calls(n_images: int, rollout_batch: int, rank: int, world: int) -> list[tuple[int, list[int]]]:
    """(k, image indices) of the sampling calls this process runs: call k samples the step's images
    [k * rollout_batch, (k + 1) * rollout_batch) and runs on process k mod world. An image's rollouts are keyed to
    the step and the image (see rollout): which call or process samples them changes none of them."""
    calls = [list(range(s, min(s + rollout_batch, n_images))) for s in range(0, n_images, rollout_batch)]
    return [(k, images) for k, images in enumerate(calls) if k % world == rank]


@dataclass
class Call:
    """One sampling call's rollouts; row i * G + g is the g-th rollout of image i of the call."""

    images: list[int]  # indices into the step's images (empty: a zero-weight stand-in, see lockstep)
    batch: dict  # model inputs, one prompt per image
    ids: torch.Tensor  # [rows, T] completion tokens
    mask: torch.Tensor  # [rows, T] completion mask (sampling.completion_mask)
    completions: list[list[sampling.Completion]]  # per image, its G (text, truncated)
    decode: dict = field(default_factory=dict)  # what the call's decode cost (sampling.Samples.decode)

    def micro_batch(self, rows: list[int], vision_start_id: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """The prompts of the whole groups `rows`, each once, and their completions (logprobs.shared_prompt)."""
        G = len(self.ids) // len(self.batch["input_ids"])
        width = int(self.mask[rows].sum(dim=1).max())  # causal: trailing padding changes no earlier log-prob
        prompt_rows = logprobs.select_rows(self.batch, [r // G for r in rows[::G]], vision_start_id)
        return prompt_rows, self.ids[rows, :width], self.mask[rows, :width]


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: the step, phase by phase
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What every phase needs: settings, models, tokens."""

    args: Args
    accelerator: object
    model: object  # the policy as trained (DDP-wrapped, FSDP-sharded or plain)
    generator: object  # the same weights as a module that samples (DDP unwrapped)
    reference: object
    optimizer: object
    scheduler: object
    processor: object
    preset: prompts.Preset
    prompt_text: str
    eos_ids: list[int]
    placeholder_ids: tuple[int, ...]
    vision_start_id: int
    device: torch.device

    def encode(self, images: list[str]) -> dict:
        encoded = common.encode_batch(self.processor, [self.prompt_text] * len(images),
                                      [[common.load_image(Path(self.args.images_root) / x)] for x in images],
                                      add_vision_id=self.preset.add_vision_id)
        return {k: v.to(self.device) for k, v in encoded.items()}


def rollout(run: Run, images: list[str], step: int) -> list[Call]:
    """This process's sampling calls: each distinct image prompt encoded once, G samples of it (sampling.sample),
    rollout g of an image keyed to (seed, step, image, g) alone, so that the rollouts do not depend on the number of
    processes, --rollout-batch or a resume. Under FSDP the weights are gathered once for the whole phase."""
    G, calls = run.args.group_size, []
    run.model.eval()
    with parallel.full_weights(run.model), run.accelerator.autocast():
        for k, idx in sampling_calls(len(images), run.args.rollout_batch, parallel.rank(), parallel.world_size()):
            encoded = run.encode([images[i] for i in idx])
            keys = [sampling.prompt_key(step, images[i]) for i in idx]
            s = sampling.sample(run.generator, run.processor, encoded, G, run.args.max_new_tokens,
                                run.args.temperature, do_sample=True, keys=keys, seed=run.args.seed)
            # clone: tensors made under inference mode cannot enter autograd
            calls.append(Call(idx, encoded, s.ids.clone(), s.mask.clone(), s.completions(), s.decode))
    return calls


def rewards(calls: list[Call], images: list[str], pairs_now: list, preset: prompts.Preset, gamma: float) -> dict:
    """Every process's scores to every process (an image's reward needs its partners' score statistics), then the
    fidelity rewards of all the step's pairs and the advantages within each image's group. A completion cut off at
    --max-new-tokens is unparseable (sampling.answer): reward 0."""
    local = {}
    for call in calls:
        lengths = call.mask.sum(dim=1).tolist()
        for j, i in enumerate(call.images):
            completions = call.completions[j]
            n = len(completions)
            local[i] = ([sampling.answer(c, lambda t: prompts.parse_score(t, preset)) for c in completions],
                        [c.truncated for c in completions], lengths[j * n:(j + 1) * n])
    merged = {i: v for part in parallel.all_gather(local) for i, v in part.items()}
    scores = {images[i]: merged[i][0] for i in range(len(images))}
    fidelity = pair_fidelity_rewards(scores, pairs_now, gamma)
    reward_matrix = torch.tensor([fidelity[x] for x in images], dtype=torch.float64)
    return {"scores": scores, "rewards": reward_matrix, "advantages": group_advantages(reward_matrix),
            "truncated": [t for i in range(len(images)) for t in merged[i][1]],
            "lengths": [n for i in range(len(images)) for n in merged[i][2]]}


def schedule(run: Run, calls: list[Call], images: list[str]) -> list[tuple[tuple[Call, list[int]], bool]]:
    """The micro-batches of this process, in lock-step with the others (parallel.lockstep): whole groups, as many as
    --micro-batch-size rollouts hold, at least one (a group larger than that is one image with its G completions). A
    process with no sampling call this step (fewer calls than processes) uses the step's first image with a
    one-token completion as stand-in."""
    rows = max(1, run.args.micro_batch_size // run.args.group_size) * run.args.group_size
    own = [(c, list(range(s, min(s + rows, len(c.ids))))) for c in calls for s in range(0, len(c.ids), rows)]
    if own:
        stand_in = own[0]
    else:
        one = torch.full((1, 1), run.eos_ids[0], device=run.device)
        stand_in = (Call([], run.encode(images[:1]), one, torch.ones_like(one), []), [0])
    return parallel.lockstep(own, stand_in, run.device)


def reference_logprobs(run: Run, passes: list) -> list[torch.Tensor]:
    """log pi_ref of every completion token, micro-batch by micro-batch (no gradient), each prompt once."""
    out = []
    with torch.no_grad(), run.accelerator.autocast():
        for (call, rows), _ in passes:
            prompt, ids, _ = call.micro_batch(rows, run.vision_start_id)
            out.append(logprobs.shared_prompt(run.reference, prompt, ids, run.args.temperature, run.placeholder_ids,
                                              run.eos_ids[0]))
    return out


def policy_update(run: Run, passes: list, ref_logps: list[torch.Tensor], advantages: torch.Tensor,
                  n_rollouts: int) -> dict:
    """--ppo-epochs passes of loss + backward over the micro-batches, one optimizer step each. The loss of a
    micro-batch is weighted by its share of the step's rollouts (all processes together), times the number of
    processes because DDP and FSDP average gradients over processes: the gradient is that of the mean loss over all
    the step's rollouts, as one process would compute it. Stand-in micro-batches weigh 0: `(loss * 0).backward()`."""
    args, world = run.args, parallel.world_size()
    run.model.train()
    old_logps: list[torch.Tensor] = []
    sums = [0.0, 0.0, 0.0]  # loss, kl, clip_fraction: means over the step's rollouts (this process's share)
    for ppo_epoch in range(args.ppo_epochs):
        for k, ((call, rows), real) in enumerate(passes):
            prompt, ids, mask = call.micro_batch(rows, run.vision_start_id)
            adv_rows = advantages[call.images].flatten() if real else torch.zeros(len(call.ids), dtype=torch.float64)
            with parallel.accumulate(run.model, last=k == len(passes) - 1), run.accelerator.autocast():
                logp = logprobs.shared_prompt(run.model, prompt, ids, args.temperature, run.placeholder_ids,
                                              run.eos_ids[0])
                if ppo_epoch == 0:  # old policy = the policy before this step's first update
                    old_logps.append(logp.detach())
                loss, metrics = grpo_loss(logp, old_logps[k], ref_logps[k], adv_rows[rows].to(run.device), mask,
                                          args.beta, args.clip_eps)
                weight = len(rows) / n_rollouts * world if real else 0.0
                (loss * weight).backward()
            if ppo_epoch == args.ppo_epochs - 1 and real:
                for j, value in enumerate((loss, metrics["kl"], metrics["clip_fraction"])):
                    sums[j] += float(value.detach()) * len(rows) / n_rollouts
        grad_norm = parallel.clip_grad_norm(run.model, args.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    loss, kl, clip_fraction = parallel.all_reduce(sums, "sum", run.device)
    return {"loss/total": loss, "kl/mean": kl, "loss/clip_fraction": clip_fraction, "optim/grad_norm": grad_norm}


def log_record(run: Run, step: int, steps_per_epoch: int, pairs_now: list, r: dict, update: dict, calls: list[Call],
               passes: list, seconds: list[float]) -> dict:
    """One train_log.jsonl line: the step's metrics over all processes (null for an undefined statistic)."""
    reward_matrix = r["rewards"]
    valid = reward_matrix[torch.isfinite(reward_matrix)]
    skipped = ~torch.isfinite(reward_matrix).all(dim=1)
    group_std = reward_matrix.std(dim=1)
    score_groups = [[q for q in qs if q is not None] for qs in r["scores"].values()]
    score_std = [torch.tensor(s).std().item() for s in score_groups if len(s) >= 2]
    parsed = [q for qs in r["scores"].values() for q in qs]
    stand_ins, = parallel.all_reduce([sum(not real for _, real in passes)], "sum", run.device)
    t_generation, t_reference, t_update, t_step = parallel.all_reduce(seconds, "max", run.device)  # the slowest
    row_steps, = parallel.all_reduce([sum(c.decode.get("row_steps", 0) for c in calls)], "sum", run.device)
    kv_bytes, = parallel.all_reduce([max([c.decode.get("kv_bytes", 0) for c in calls], default=0)], "max",
                                    run.device)  # the most one sampling call held
    tokens = sum(r["lengths"])
    record = {"step": step + 1, "epoch": step // steps_per_epoch, "optim/lr": run.scheduler.get_last_lr()[0],
              **update, "reward/mean": valid.mean().item() if len(valid) else None,
              "reward/std": valid.std().item() if len(valid) > 1 else None,
              "reward/zero_std_fraction": float(((group_std == 0) & ~skipped).double().mean()),
              "reward/groups": len(reward_matrix), "reward/groups_skipped": int(skipped.sum()),
              "rollout/parse_failure_rate": sum(q is None for q in parsed) / len(parsed),
              "rollout/truncation_rate": sum(r["truncated"]) / len(r["truncated"]),
              "rollout/score_mean": sum(map(sum, score_groups)) / max(1, sum(map(len, score_groups)))
              if any(score_groups) else None,
              "rollout/score_within_group_std": sum(score_std) / len(score_std) if score_std else None,
              "rollout/completion_length": tokens / len(r["lengths"]), "rollout/generated_tokens": tokens,
              "rollout/tokens_per_s": tokens / t_generation, "rollout/row_steps": int(row_steps),
              "rollout/kv_bytes": int(kv_bytes), "rollout/stand_in_micro_batches": int(stand_ins),
              "time/step": t_step, "time/generation": t_generation, "time/reference": t_reference,
              "time/update": t_update, "pairs": [[a, b] for a, b, _ in pairs_now]}
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def train_step(run: Run, pairs_now: list, step: int, steps_per_epoch: int) -> dict:
    """One step: rollouts, rewards and advantages, reference log-probs, policy update, its log line."""
    t0 = time.perf_counter()
    images = list(dict.fromkeys(x for a, b, _ in pairs_now for x in (a, b)))  # both members of every pair
    calls = rollout(run, images, step)
    t1 = time.perf_counter()
    r = rewards(calls, images, pairs_now, run.preset, run.args.gamma)
    passes = schedule(run, calls, images)
    ref_logps = reference_logprobs(run, passes)
    t2 = time.perf_counter()
    update = policy_update(run, passes, ref_logps, r["advantages"], len(images) * run.args.group_size)
    t3 = time.perf_counter()
    return log_record(run, step, steps_per_epoch, pairs_now, r, update, calls, passes,
                      [t1 - t0, t2 - t1, t3 - t2, t3 - t0])


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: reading and validation (the pseudo-labels file itself: votes.py)
# ---------------------------------------------------------------------------------------------------------------------


def check_args(args: Args) -> None:
    if args.group_size < 2:
        common.die(f"--group-size {args.group_size}: needs >= 2 (the reward uses each image's score variance)")
    if min(args.ppo_epochs, args.pairs_per_step, args.micro_batch_size, args.epochs, args.rollout_batch) < 1:
        common.die("--ppo-epochs, --pairs-per-step, --micro-batch-size, --rollout-batch and --epochs must be >= 1")
    if not args.temperature > 0:  # NaN included
        common.die(f"--temperature {args.temperature}: must be > 0 (GRPO samples; log-probs divide the logits by it)")
    for name in ("lr", "beta", "clip_eps", "gamma", "max_grad_norm", "weight_decay"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            common.die(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a finite number >= 0")
    if args.shard_reference and not args.fsdp:
        common.die("--shard-reference needs --fsdp")
    cuda = torch.cuda.is_available()
    args.bf16 = cuda if args.bf16 is None else args.bf16
    args.gradient_checkpointing = cuda if args.gradient_checkpointing is None else args.gradient_checkpointing


def run_settings(args: Args, n_pairs: int, world: int, preset: prompts.Preset) -> dict:
    """What defines the run's result, checked on --resume: the method settings, the global batch, the models'
    identity (common.fingerprint) and the pseudo-labels' content."""
    return {**{k: getattr(args, k) for k in METHOD_SETTINGS}, "pairs_per_step_all_processes":
            args.pairs_per_step * world, "n_pairs": n_pairs, "preset_hash": preset.hash(),
            "model": common.fingerprint(args.model), "ref_model": common.fingerprint(args.ref_model or args.model),
            "pseudolabels_sha256": common.file_sha256(args.pseudolabels)}


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: models, optimizer and resume
# ---------------------------------------------------------------------------------------------------------------------


def build_run(args: Args, accelerator, preset: prompts.Preset, total_steps: int) -> Run:
    from transformers import get_linear_schedule_with_warmup

    processor = common.load_processor(args.model, max_pixels=args.max_pixels)
    model, generator, reference = parallel.load_models(args.model, args.ref_model or args.model, accelerator,
                                                       args.bf16, args.fsdp, args.shard_reference,
                                                       args.gradient_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, args.warmup_steps, total_steps * args.ppo_epochs)
    return Run(args, accelerator, model, generator, reference, optimizer, scheduler, processor, preset,
               preset.prompt("score", args.reasoning), sampling.eos_token_ids(sampling.sampling_config(generator, 1)),
               tuple(sampling.placeholder_token_ids(generator)), generator.config.vision_start_token_id,
               accelerator.device)


def checkpoint_to_resume(args: Args, out: Path, settings: dict) -> tuple[Optional[Path], Optional[dict]]:
    """The checkpoint to continue from and this process's state in it (None, None: a fresh start), after refusing to
    overwrite a run in --out or to continue it with other settings. Only a checkpoint holds work to protect: a run
    that stopped before its first one is started over, whatever its settings."""
    checkpoint = parallel.latest_checkpoint(out)
    if checkpoint is not None and not args.resume:
        common.die(f"{out} already holds a run ({checkpoint.name}); pass --resume to continue it, or use another --out")
    if checkpoint is None and not args.resume and common.read_jsonl(out / "train_log.jsonl"):
        common.die(f"{out} holds a train_log.jsonl but no checkpoint; pass --resume to start over in it, or choose "
                   "another --out")
    if checkpoint is None:
        return None, None
    state = parallel.checkpoint_state(checkpoint)
    common.refuse_changed_settings(out / "settings.json", settings, f"the run in {out}",
                                   "rerun with its settings, or train into another --out")
    return checkpoint, state


def resume(run: Run, out: Path, checkpoint: Optional[Path], state: Optional[dict]) -> int:
    """The step to start from: the checkpoint's (its state loaded), else 0; steps logged after it are dropped."""
    start_step = 0
    if checkpoint is not None:
        start_step = parallel.load_checkpoint(checkpoint, state, run.model, run.optimizer, run.scheduler)
        run.accelerator.print(f"resuming from {checkpoint} at step {start_step}")
    if parallel.is_main():
        parallel.remove_interrupted_saves(out)
        if (out / "train_log.jsonl").exists():
            kept = [r for r in common.read_jsonl(out / "train_log.jsonl") if r.get("step", 0) <= start_step]
            common.write_jsonl_atomic(out / "train_log.jsonl", kept)
    parallel.barrier()
    return start_step


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: the run
# ---------------------------------------------------------------------------------------------------------------------


def train(args: Args, accelerator) -> None:
    world, out, preset = parallel.world_size(), Path(args.out), prompts.get_preset(args.prompt)
    pairs, dropped = votes.read_pseudolabels(args.pseudolabels, args.images_root, args.skip_missing)  # before a model
    per_step = args.pairs_per_step * world
    steps_per_epoch = len(pairs) // per_step
    if steps_per_epoch == 0:
        common.die(f"{len(pairs)} pairs is fewer than one step needs ({args.pairs_per_step} pairs x {world} processes)")
    total_steps = steps_per_epoch * args.epochs
    last_step = min(total_steps, args.max_steps) if args.max_steps > 0 else total_steps
    settings = run_settings(args, len(pairs), world, preset)
    checkpoint, state = checkpoint_to_resume(args, out, settings)
    try:
        run = build_run(args, accelerator, preset, total_steps)
    except OSError as e:  # a mistyped --model / --ref-model: nothing recorded yet, the corrected command runs
        common.die(f"cannot load --model {args.model} / --ref-model {args.ref_model} ({str(e).splitlines()[0]})")
    start_step = resume(run, out, checkpoint, state)
    if parallel.is_main():  # the run has started for real: from here on --resume holds it to these settings
        common.record_settings(out / "settings.json", settings)
        common.write_json_atomic(out / "args.json", {
            "args": asdict(args), "preset": preset.name, "preset_hash": preset.hash(), "world_size": world,
            "n_pairs": len(pairs), "pairs_dropped": dropped, "total_steps": total_steps,
            "versions": common.package_versions()})

    from tqdm import tqdm

    log = common.JsonlWriter(out / "train_log.jsonl") if parallel.is_main() else None
    progress = tqdm(range(start_step, last_step), initial=start_step, total=last_step, disable=log is None,
                    desc="grpo")
    for step in progress:
        record = train_step(run, step_pairs(pairs, args.seed, step, steps_per_epoch, per_step), step, steps_per_epoch)
        if log is not None:
            log.write(record)
        progress.set_postfix(step_s=f"{record['time/step']:.1f}", reward=f"{record['reward/mean'] or 0:.3f}")
        if (step + 1) % args.save_every == 0 or step + 1 == last_step:
            parallel.save_checkpoint(out, step + 1, args.save_total_limit, run.model, run.optimizer, run.scheduler)
    if log is not None:
        log.close()
    parallel.save_final(out, run.model, run.generator, run.processor, args.bf16)
    accelerator.print(f"wrote {out} (step {last_step} of {total_steps})")


def main(argv: Optional[list[str]] = None) -> None:
    args = common.parse_args(Args, argv)
    check_args(args)
    common.check_writable(args.out)  # before any model
    accelerator = parallel.init(args.bf16, args.fsdp, args.dist_timeout)
    with common.output_lock(args.out) if parallel.is_main() else contextlib.nullcontext():  # one lock for all processes
        train(args, accelerator)
    parallel.destroy()


if __name__ == "__main__":
    common.run_main(main)
