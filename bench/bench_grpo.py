"""Step-time breakdown of grpo_train.py on the tiny Qwen2.5-VL (CPU unless a GPU is there): generation, reference
log-probs, policy forward + backward + AdamW, and generated tokens/s, for G = 8 and 4 pairs per step.

    python bench/bench_grpo.py [--steps 4] [--max-new-tokens 64] [--bf16] [--parity]
    python bench/bench_grpo.py --ddp-vs-fsdp [--steps 3]     # 2 processes (torchrun), DDP then --fsdp, side by side
    python bench/bench_grpo.py --against 45faead --size 30m   # that commit's grpo_train.py, then today's, side by side
    OMP_NUM_THREADS=1 python bench/bench_grpo.py --against 45faead --size 30m --pairs-per-step 2 --steps 2 \
        --max-new-tokens 8                                    # the same in about 10 minutes on 2 shared cores

With --against, each run also counts, per phase, the prompt tokens the language model prefills per rollout
(generation: calls over more than one position) and the vision patches encoded per image of the step; the commit's
grpo_train.py runs with today's common.py (same prompt format; it samples with its own generate call).

It runs the real script (a stand-in parser makes the random tiny model's answers parseable, so every group has a
gradient) and reads the per-step timings from train_log.jsonl; the first step (warm-up) is left out of the means.
--parity also prints the largest gap between generate's scores and the recomputed log-probs (fp32, and bf16 autocast
on a GPU), the number the test checks on CPU.
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
import torch, transformers
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen
sys.path.insert(0, {root!r})
import common
try:  # the sampler's module: sampling.py, or common.py in older commits
    import sampling
except ImportError:
    sampling = common
common.parse_score = lambda text, preset=None: 1 + (zlib.crc32(text.encode()) % 401) / 100
sampling.answer = lambda completion, parse: parse(completion.text)  # the random model never ends: ignore truncation

# counters per phase: generation (inside generate / sampling.sample), else policy (gradient on) or reference
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
    add("prefilled" if length > 1 else "decoded", rows * length)
def vision(args, kwargs):
    add("patches", (args[1] if len(args) > 1 else kwargs["hidden_states"]).shape[0])
wrap(qwen.Qwen2_5_VLTextModel, "forward", language)
wrap(qwen.Qwen2_5_VisionTransformerPretrainedModel, "forward", vision)
wrap(transformers.GenerationMixin, "generate", flag=True)
if hasattr(sampling, "sample"):
    wrap(sampling, "sample", flag=True)
atexit.register(lambda: json.dump(counts, open({counts!r}, "w")))
sys.argv[0] = {script!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def parity(model_dir: str, pool: Path) -> None:
    import torch

    import common
    import sampling
    import grpo_train

    device = "cuda" if torch.cuda.is_available() else "cpu"
    processor = common.load_processor(model_dir)
    model = common.load_model(model_dir, dtype=torch.float32, device=device).eval()
    preset = common.get_preset("evoquality")
    images = [[common.load_image(pool / "pool_00000.png")],
              [common.load_image(pool / "pool_00001.png").resize((28, 28))]]  # different sizes: left padding
    encoded = dict(common.encode_batch(processor, [preset.prompt("score", True)] * 2, images, preset.add_vision_id))
    batch = {k: v.to(device) for k, v in grpo_train.select_rows(encoded, [0] * 4 + [1] * 4,
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
            got = grpo_train.token_logprobs(model, batch, ids, 0.7, (model.config.image_token_id,), eos[0])
        print(f"parity on {device} {str(dtype)[6:]}: max |logp(one forward) - log_softmax(generate scores)| = "
              f"{(got - expect)[mask].abs().max().item():.2e} over {int(mask.sum())} tokens")


def summary(log: list[dict], title: str) -> dict:
    timed = log[1:] or log
    mean = lambda key: sum(r[key] for r in timed) / len(timed)  # noqa: E731
    step = mean("step_seconds")
    print(f"{title}, mean of {len(timed)} steps after a warm-up step")
    phases = {}
    for name, key, phase in (("generation", "generation_seconds", "generation"),
                             ("reference log-probs", "logprob_seconds", "reference"),
                             ("policy fwd+bwd+AdamW", "backward_seconds", "policy")):
        phases[phase] = mean(key)
        print(f"  {name:22s} {mean(key):7.3f} s  {mean(key) / step:6.1%}")
    print(f"  {'step':22s} {step:7.3f} s")
    per_token = mean("generation_seconds") / mean("generated_tokens")
    print(f"  generated tokens/step  {mean('generated_tokens'):7.0f}   s per generated token {per_token * 1e3:7.2f} ms"
          f"   mean completion length {mean('completion_length'):.1f}")
    return {"step": step, "per_token": per_token, **phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=8, help="8 = G: one image's group per micro-batch")
    parser.add_argument("--pairs-per-step", type=int, default=4, help="disjoint pairs: 2 images x G rollouts each")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--parity", action="store_true")
    parser.add_argument("--ddp-vs-fsdp", action="store_true", help="2 processes: DDP and --fsdp on the same steps")
    parser.add_argument("--against", default=None, help="a commit whose grpo_train.py runs first, on the same steps")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model: the tiny one or a 30 M one")
    a = parser.parse_args()
    from demo.synthetic import write_set
    from demo.tiny_models import build_tiny_checkpoint

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

        def train(name: str, nproc: int, *extra: str, script: Path = ROOT / "grpo_train.py") -> list[dict]:
            wrapper = tmp / f"wrapper_{name}.py"
            wrapper.write_text(WRAPPER.format(root=str(ROOT), script=str(script),
                                              counts=str(tmp / f"counts_{name}.json")))
            launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                            "--standalone", "--nproc_per_node", str(nproc)]
            cmd = [*launcher, str(wrapper), "--model", str(model), "--pseudolabels", str(tmp / "pseudolabels.jsonl"),
                   "--images-root", str(pool), "--out", str(tmp / name), "--group-size", "8", "--pairs-per-step",
                   str(a.pairs_per_step // nproc), "--max-new-tokens", str(a.max_new_tokens), "--micro-batch-size",
                   str(a.micro_batch_size), "--max-steps", str(a.steps), "--save-every", "1000", "--lr", "1e-4",
                   *(["--bf16"] if a.bf16 else []), *extra]
            run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if run.returncode:
                sys.exit(f"grpo_train.py failed:\n{run.stderr[-4000:]}")
            return [json.loads(line) for line in open(tmp / name / "train_log.jsonl")]

        setting = f"G=8, {a.pairs_per_step} pairs/step ({2 * a.pairs_per_step} images, {16 * a.pairs_per_step} " \
                  f"rollouts), max_new_tokens={a.max_new_tokens}, threads {torch.get_num_threads()}, " \
                  f"micro-batch {a.micro_batch_size}, {device}"
        if a.ddp_vs_fsdp:
            ddp = summary(train("ddp", 2), f"2 processes, DDP replicas: {setting}")
            fsdp = summary(train("fsdp", 2, "--fsdp"), f"2 processes, --fsdp (weights gathered once per rollout "
                                                      f"phase): {setting}")
            print(f"FSDP / DDP: s per generated token {fsdp['per_token'] / ddp['per_token']:.2f}x, "
                  f"step {fsdp['step'] / ddp['step']:.2f}x")
        elif a.against:
            # the commit's script with today's common.py: the same prompt format (the preset changed since), and the
            # commit's own sampling (generate on G repeated rows) and log-prob passes
            (tmp / "old").mkdir()
            (tmp / "old" / "grpo_train.py").write_text(subprocess.run(
                ["git", "show", f"{a.against}:grpo_train.py"], cwd=ROOT, check=True, capture_output=True, text=True).stdout)
            rollouts, n_images = 16 * a.pairs_per_step * a.steps, 2 * a.pairs_per_step * a.steps  # all steps
            results = {}
            for name, title, script in (("old", f"grpo_train.py of {a.against}", tmp / "old" / "grpo_train.py"),
                                        ("now", "grpo_train.py now", ROOT / "grpo_train.py")):
                results[name] = summary(train(name, 1, script=script), f"{title}, {a.size} model: {setting}")
                counts = json.loads((tmp / f"counts_{name}.json").read_text())
                results[name]["prefilled"] = counts["generation"]["prefilled"] / rollouts
                results[name].update({f"patches {p}": counts.get(p, {}).get("patches", 0) / n_images
                                      for p in ("generation", "reference", "policy")})
                print(f"  prompt tokens prefilled per rollout (generation) {results[name]['prefilled']:9.1f}")
                print("  vision patches encoded per image   " + "   ".join(
                    f"{p} {results[name][f'patches {p}']:7.0f}" for p in ("generation", "reference", "policy")))
            old, now = results["old"], results["now"]
            print(f"now vs {a.against} (old / now): step {old['step'] / now['step']:.2f}x faster; " + ", ".join(
                f"{p} {old[p] / now[p]:.2f}x" for p in ("generation", "reference", "policy")))
            print(f"  prompt tokens prefilled per rollout {old['prefilled'] / now['prefilled']:.2f}x fewer; vision "
                  "patches per image " + ", ".join(f"{p} {old[f'patches {p}'] / now[f'patches {p}']:.2f}x fewer"
                                                   for p in ("generation", "reference", "policy")))
        else:
            summary(train("one", 1), f"grpo_train.py on the {a.size} Qwen2.5-VL: {setting}")
        if a.parity:
            parity(str(model), pool)


if __name__ == "__main__":
    main()
