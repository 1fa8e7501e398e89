"""Step-time breakdown of grpo_train.py on the tiny Qwen2.5-VL (CPU unless a GPU is there): generation, reference
log-probs, policy forward + backward + AdamW, and generated tokens/s, for G = 8 and 4 pairs per step.

    python bench/bench_grpo.py [--steps 4] [--max-new-tokens 64] [--bf16] [--parity]
    python bench/bench_grpo.py --ddp-vs-fsdp [--steps 3]     # 2 processes (torchrun), DDP then --fsdp, side by side
    python bench/bench_grpo.py --against COMMIT --size 30m --group-sizes 8,32   # that commit, then today's, per G
    python bench/bench_grpo.py --against COMMIT --size 30m --group-sizes 8,32 --pairs-per-step 1 --steps 2 \
        --max-new-tokens 16                                   # the same with fewer tokens, for 2 shared cores
    python bench/bench_grpo.py --rollouts-against COMMIT --size 30m --group-sizes 32 --max-new-tokens 192
                                                              # the rollout phase alone: that commit's sampler, today's

With --against, each run also counts, per phase, the tokens the language model forwards per rollout (generation:
the prefill, calls over more than one position; reference and policy: every position of every log-prob forward) and
the vision patches encoded per image of the step; the commit's grpo_train.py runs beside today's other modules
(prompts.py, sampling.py, logprobs.py, parallel.py), so it must have today's layout.

It runs the real script (a stand-in parser makes the random tiny model's answers parseable, so every group has a
gradient) and reads the per-step timings from train_log.jsonl; the first step (warm-up) is left out of the means.
--parity also prints the largest gap between generate's scores and the recomputed log-probs (fp32, and bf16 autocast
on a GPU), the number the test checks on CPU.

--rollouts-against COMMIT times the rollout phase alone, side by side in one process: G samples of the score prompt
(with reasoning) for --rollout-batch images per call, as grpo_train.py's rollout makes them, through that commit's
sampling.py and today's, completion lengths made uneven the same way for both (bench_votes.py's timing and table).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {"tiny": {}, "30m": dict(text_hidden=512, text_layers=8, vision_hidden=256, vision_depth=4,
                                 max_pixels=448 * 448)}  # 30m: compute-dominated on CPU, like 7B's prefill regime
WRAPPER = """
import atexit, json, runpy, sys, zlib
import torch
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen
sys.path.insert(0, {root!r})
import prompts, sampling
prompts.parse_score = lambda text, preset=None: 1 + (zlib.crc32(text.encode()) % 401) / 100
sampling.answer = lambda completion, parse: parse(completion.text)  # the random model never ends: ignore truncation

# counters per phase: generation (inside sampling.sample), else policy (gradient on) or reference
counts, generating = {{}}, [False]
def phase():
    return "generation" if generating[0] else "policy" if torch.is_grad_enabled() else "reference"
def add(key, value):
    counts.setdefault(phase(), {{}})[key] = counts.get(phase(), {{}}).get(key, 0) + value
def wrap(owner, name, before=None, flag=False):
    original = getattr(owner, name)
    def wrapped(*args, **kwargs):
        if before:
            before(args, kwargs)
        if not flag:
            return original(*args, **kwargs)
        generating[0] = True
        try:
            return original(*args, **kwargs)
        finally:
            generating[0] = False
    setattr(owner, name, wrapped)
def language(args, kwargs):
    rows, length = kwargs["inputs_embeds"].shape[:2]
    add("forwarded" if length > 1 else "decoded", rows * length)
def vision(args, kwargs):
    add("patches", (args[1] if len(args) > 1 else kwargs["hidden_states"]).shape[0])
wrap(qwen.Qwen2_5_VLTextModel, "forward", language)
wrap(qwen.Qwen2_5_VisionTransformerPretrainedModel, "forward", vision)
wrap(sampling, "sample", flag=True)
atexit.register(lambda: json.dump(counts, open({counts!r}, "w")))
sys.argv[0] = {script!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def parity(model_dir: str, pool: Path) -> None:
    import torch

    import common
    import logprobs
    import prompts
    import sampling

    device = "cuda" if torch.cuda.is_available() else "cpu"
    processor = common.load_processor(model_dir)
    model = common.load_model(model_dir, dtype=torch.float32, device=device).eval()
    preset = prompts.get_preset("evoquality")
    images = [[common.load_image(pool / "pool_00000.png")],
              [common.load_image(pool / "pool_00001.png").resize((28, 28))]]  # different sizes: left padding
    encoded = dict(common.encode_batch(processor, [preset.prompt("score", True)] * 2, images, preset.add_vision_id))
    batch = {k: v.to(device) for k, v in logprobs.select_rows(encoded, [0] * 4 + [1] * 4,
                                                                model.config.vision_start_token_id).items()}
    config = sampling.sampling_config(model, max_new_tokens=32, temperature=0.7)
    eos = sampling.eos_token_ids(config)
    for dtype in [torch.float32] + ([torch.bfloat16] if device == "cuda" else []):
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            out = model.generate(**batch, generation_config=config, output_scores=True, return_dict_in_generate=True)
            ids = out.sequences[:, batch["input_ids"].shape[1]:]
            mask = sampling.completion_mask(ids, eos + [model.config.image_token_id]).bool()
            expect = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)
            expect = expect.gather(-1, ids[..., None]).squeeze(-1)
            got = logprobs.per_row(model, batch, ids, 0.7, (model.config.image_token_id,), eos[0])
        print(f"parity on {device} {str(dtype)[6:]}: max |logp(one forward) - log_softmax(generate scores)| = "
              f"{(got - expect)[mask].abs().max().item():.2e} over {int(mask.sum())} tokens")


def summary(log: list[dict], title: str) -> dict:
    timed = log[1:] or log
    mean = lambda key: sum(r[key] for r in timed) / len(timed)  # noqa: E731
    step = mean("time/step")
    print(f"{title}, mean of {len(timed)} steps after a warm-up step")
    phases = {}
    for name, key, phase in (("generation", "time/generation", "generation"),
                             ("reference log-probs", "time/reference", "reference"),
                             ("policy fwd+bwd+AdamW", "time/update", "policy")):
        phases[phase] = mean(key)
        print(f"  {name:22s} {mean(key):7.3f} s  {mean(key) / step:6.1%}")
    print(f"  {'step':22s} {step:7.3f} s")
    per_token = mean("time/generation") / mean("rollout/generated_tokens")
    print(f"  generated tokens/step  {mean('rollout/generated_tokens'):7.0f}   s per generated token "
          f"{per_token * 1e3:7.2f} ms   mean completion length {mean('rollout/completion_length'):.1f}")
    return {"step": step, "per_token": per_token, **phases}


def against(a, tmp: Path, setting: str, train) -> None:
    """The commit's grpo_train.py, then today's, at each G: times per phase and tokens forwarded per rollout."""
    (tmp / "old").mkdir()
    (tmp / "old" / "grpo_train.py").write_text(subprocess.run(
        ["git", "show", f"{a.against}:grpo_train.py"], cwd=ROOT, check=True, capture_output=True, text=True).stdout)
    table = []
    for G in map(int, a.group_sizes.split(",")):
        rollouts, n_images = 2 * G * a.pairs_per_step * a.steps, 2 * a.pairs_per_step * a.steps  # all steps
        results = {}
        for name, title, script in (("old", f"grpo_train.py of {a.against}", tmp / "old" / "grpo_train.py"),
                                    ("now", "grpo_train.py now", ROOT / "grpo_train.py")):
            results[name] = r = summary(train(f"{name}_{G}", 1, script=script, G=G),
                                        f"{title}, {a.size} model: G={G}, {setting}")
            counts = json.loads((tmp / f"counts_{name}_{G}.json").read_text())
            r["passes"] = r["reference"] + r["policy"]
            for p in ("generation", "reference", "policy"):
                r[f"tokens {p}"] = counts.get(p, {}).get("forwarded", 0) / rollouts
                r[f"patches {p}"] = counts.get(p, {}).get("patches", 0) / n_images
            print("  tokens forwarded per rollout " + "   ".join(f"{p} {r[f'tokens {p}']:7.1f}"
                                                               for p in ("generation", "reference", "policy")))
            print("  vision patches per image     " + "   ".join(f"{p} {r[f'patches {p}']:7.0f}"
                                                               for p in ("generation", "reference", "policy")))
        table.append((G, results["old"], results["now"]))
    print(f"\n{'':28s}" + "".join(f"{f'G={G} old':>12s}{f'G={G} now':>12s}{'old/now':>9s}" for G, _, _ in table))
    for label, key, fmt in (("step s", "step", ".2f"), ("generation s", "generation", ".2f"),
                            ("reference s", "reference", ".2f"), ("policy fwd+bwd+AdamW s", "policy", ".2f"),
                            ("policy + reference s", "passes", ".2f"), ("tokens/rollout reference", "tokens reference",
                                                                        ".0f"),
                            ("tokens/rollout policy", "tokens policy", ".0f"),
                            ("vision patches/image policy", "patches policy", ".0f")):
        print(f"{label:28s}" + "".join(f"{old[key]:12{fmt}}{now[key]:12{fmt}}{old[key] / max(now[key], 1e-9):8.2f}x"
                                       for _, old, now in table))


def rollouts_against(a) -> None:
    """The rollout phase alone: the commit's sampler and today's on the same sampling calls (bench_votes.py)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_votes
    import prompts

    model, processor, images, description = bench_votes.load_size(a.size, a.rollout_batch)
    prompt = prompts.get_preset("evoquality").prompt("score", True)
    for G in map(int, a.group_sizes.split(",")):
        header = (f"== GRPO rollouts, {description}: {a.rollout_batch} images x G={G} in one call "
                  f"({a.rollout_batch * G} sequences), score prompt with reasoning")
        bench_votes.bench_calls(model, processor, bench_votes.samplers_for(a.rollouts_against),
                                [prompt] * a.rollout_batch, [[image] for image in images], G, a.max_new_tokens, 1,
                                prompts.parse_score, header)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=8, help="rollouts per micro-batch (whole groups now)")
    parser.add_argument("--group-sizes", default="8", help="G values, comma separated: each runs both versions")
    parser.add_argument("--pairs-per-step", type=int, default=4, help="disjoint pairs: 2 images x G rollouts each")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--parity", action="store_true")
    parser.add_argument("--ddp-vs-fsdp", action="store_true", help="2 processes: DDP and --fsdp on the same steps")
    parser.add_argument("--against", default=None, help="a commit whose grpo_train.py runs first, on the same steps")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model: the tiny one or a 30 M one")
    parser.add_argument("--rollouts-against", default=None, help="a commit whose sampler runs the rollout phase beside "
                                                                 "today's (no training)")
    parser.add_argument("--rollout-batch", type=int, default=4, help="images per sampling call (--rollouts-against)")
    a = parser.parse_args()
    if a.rollouts_against:
        return rollouts_against(a)
    from fixtures.synthetic import write_set
    from fixtures.tiny_models import build_tiny_checkpoint

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_checkpoint(tmp / "tiny", **SIZES[a.size])
        pool = write_set(tmp / "pool", "pool", 32, size=448) if a.size == "30m" else write_set(tmp / "pool", "pool", 32)
        images = sorted(p.name for p in pool.glob("*.png"))
        with open(tmp / "pseudolabels.jsonl", "w") as f:  # 16 disjoint pairs
            for k in range(16):
                f.write(json.dumps({"a": images[2 * k], "b": images[2 * k + 1], "p_star": k % 2}) + "\n")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

        def train(name: str, nproc: int, *extra: str, script: Path = ROOT / "grpo_train.py", G: int = 8) -> list[dict]:
            wrapper = tmp / f"wrapper_{name}.py"
            wrapper.write_text(WRAPPER.format(root=str(ROOT), script=str(script),
                                              counts=str(tmp / f"counts_{name}.json")))
            launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                            "--standalone", "--nproc_per_node", str(nproc)]
            cmd = [*launcher, str(wrapper), "--model", str(model), "--pseudolabels", str(tmp / "pseudolabels.jsonl"),
                   "--images-root", str(pool), "--out", str(tmp / name), "--group-size", str(G), "--pairs-per-step",
                   str(a.pairs_per_step // nproc), "--max-new-tokens", str(a.max_new_tokens), "--micro-batch-size",
                   str(a.micro_batch_size), "--max-steps", str(a.steps), "--save-every", "1000", "--lr", "1e-4",
                   *(["--bf16"] if a.bf16 else []), *extra]
            run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if run.returncode:
                sys.exit(f"grpo_train.py failed:\n{run.stderr[-4000:]}")
            return [json.loads(line) for line in open(tmp / name / "train_log.jsonl")]

        setting = f"{a.pairs_per_step} pairs/step ({2 * a.pairs_per_step} images), max_new_tokens=" \
                  f"{a.max_new_tokens}, threads {torch.get_num_threads()}, micro-batch {a.micro_batch_size}, {device}"
        if a.ddp_vs_fsdp:
            ddp = summary(train("ddp", 2), f"2 processes, DDP replicas: {setting}")
            fsdp = summary(train("fsdp", 2, "--fsdp"), f"2 processes, --fsdp (weights gathered once per rollout "
                                                      f"phase): {setting}")
            print(f"FSDP / DDP: s per generated token {fsdp['per_token'] / ddp['per_token']:.2f}x, "
                  f"step {fsdp['step'] / ddp['step']:.2f}x")
        elif a.against:
            against(a, tmp, setting, train)
        else:
            summary(train("one", 1), f"grpo_train.py on the {a.size} Qwen2.5-VL: G=8, {setting}")
        if a.parity:
            parity(str(model), pool)


if __name__ == "__main__":
    main()
