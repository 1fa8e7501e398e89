"""gpu_check_report: what bench/gpu_check.sh prints. The step-time split and generated tokens/s from the run's
train_log.jsonl, and the measured peak GPU memory (torch's allocator, inside and outside sampling, and nvidia-smi's
samples) beside bench/memory_plan.py's prediction for the same model and settings; then the voting runs' generated
tokens/s and peak memory with the shared-prefix engine and with the copies path (WORK/votes_peak_ENGINE.json, written
by the voting wrappers).

    python bench/gpu_check_report.py WORK --group-size 8 --pairs-per-step 4 --micro-batch-size 4 --max-new-tokens 256
    python bench/gpu_check_report.py WORK --write-wrapper grpo_train.py      # the torchrun wrapper
    python bench/gpu_check_report.py WORK --write-vote-wrapper sample_votes.py   # one wrapper per engine
    python bench/gpu_check_report.py WORK --engine-parity    # the two decode paths on WORK's model, on this device
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory_plan  # noqa: E402

GiB = memory_plan.GiB

# Run by torchrun in place of grpo_train.py: the same script, plus peak-memory bookkeeping around sampling.sample (the
# rollout phase). A random model's completions run to the budget, are unparseable and get reward 0 (zero advantages);
# every forward, backward and optimizer step still runs, so time and memory are those of a real step.
WRAPPER = """
import atexit, json, runpy, sys
import torch
sys.path.insert(0, {root!r})
import common
import sampling
peaks = {{"rollout": 0, "other": 0, "rollout_reserved": 0, "other_reserved": 0, "sampling_calls": 0}}
sample = sampling.sample

def take(region):  # the allocator keeps one running maximum: read it into the region, then restart it
    if not torch.cuda.is_available():  # a CPU rehearsal of the script
        return
    peaks[region] = max(peaks[region], torch.cuda.max_memory_allocated())
    peaks[region + "_reserved"] = max(peaks[region + "_reserved"], torch.cuda.max_memory_reserved())
    torch.cuda.reset_peak_memory_stats()

def sampled(*args, **kwargs):  # the rollout phase's peak apart from the rest of the step
    take("other")
    peaks["sampling_calls"] += 1
    try:
        return sample(*args, **kwargs)
    finally:
        take("rollout")

def dump():
    take("other")
    peaks["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    json.dump(peaks, open({peak!r}, "w"))

sampling.sample = sampled
atexit.register(dump)
sys.argv[0] = {script!r}
runpy.run_path({script!r}, run_name="__main__")
"""


# Run in place of sample_votes.py: every sampling call timed, its generated tokens counted, the peak memory recorded.
# Completion lengths are made uneven (bench_votes.EndHazard: uniform on 1..--max-new-tokens; a random model would
# run every vote to the budget); engine "copies" forces the path that copies each prompt's KV per vote.
VOTE_WRAPPER = """
import atexit, json, runpy, sys, time
import torch
sys.path.insert(0, {root!r})
sys.path.insert(0, {bench!r})
import sampling
from bench_votes import EndHazard
stats = {{"engine": {engine!r}, "seconds": 0.0, "generated_tokens": 0, "sequences": 0, "row_steps": 0,
          "kv_bytes": 0, "peak": 0}}
sample = sampling.sample
{force_copies}

def timed(model, *args, **kwargs):
    hazard = EndHazard(model, kwargs.get("max_new_tokens", args[3] if len(args) > 3 else None))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        s = sample(model, *args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    finally:
        hazard.handle.remove()
    stats["seconds"] += time.perf_counter() - t0
    stats["generated_tokens"] += int(s.mask.sum())
    stats["sequences"] += int(s.mask.shape[0])
    stats["row_steps"] += s.decode["row_steps"]
    stats["kv_bytes"] = max(stats["kv_bytes"], s.decode["kv_bytes"])
    stats["engine"] = s.decode["engine"]
    return s

def dump():
    stats["peak"] = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    json.dump(stats, open({out!r}, "w"))

sampling.sample = timed
atexit.register(dump)
sys.argv[0] = {script!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def votes_report(work: Path) -> None:
    """Voting with the shared-prefix engine and with the copies path, side by side."""
    runs = {}
    for engine in ("shared", "copies"):
        path = work / f"votes_peak_{engine}.json"
        if not path.exists():
            print(f"\nvoting ({engine}): no {path.name} (the voting run did not finish)")
            continue
        runs[engine] = v = json.loads(path.read_text())
        v["tokens_per_s"] = v["generated_tokens"] / max(v["seconds"], 1e-9)
    if not runs:
        return
    v = next(iter(runs.values()))
    print(f"\nvoting (sample_votes.py, {v['sequences']} votes on 1024x768 pairs, lengths uniform on 1..budget)")
    print(f"  {'engine':14s} {'seconds':>8s} {'tokens':>8s} {'tokens/s':>9s} {'row-steps':>10s} {'KV GiB':>7s} "
          f"{'peak GiB':>9s}")
    for engine, v in runs.items():
        print(f"  {v['engine']:14s} {v['seconds']:8.1f} {v['generated_tokens']:8d} {v['tokens_per_s']:9.0f} "
              f"{v['row_steps']:10d} {v['kv_bytes'] / GiB:7.2f} {v['peak'] / GiB:9.1f}   (peak: torch "
              "max_memory_allocated)")
    if len(runs) == 2:
        shared, copies = runs["shared"], runs["copies"]
        print(f"  shared / copies: tokens/s {shared['tokens_per_s'] / copies['tokens_per_s']:.2f}x, KV "
              f"{copies['kv_bytes'] / max(shared['kv_bytes'], 1):.1f}x smaller, peak "
              f"{copies['peak'] / max(shared['peak'], 1):.2f}x smaller")


def engine_parity(work: Path, pairs: int = 2, n: int = 8, max_new_tokens: int = 96) -> None:
    """The shared-prefix engine against the copies path on the wide model, in its dtype, on this device: `pairs`
    pairs in both orders x n samples (keyed, lengths uneven as in the voting runs). Per row, the logits each token was
    drawn from are compared up to the first token where the two paths part (a near-tie under rounding)."""
    import torch

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    import common
    import prompts
    import sampling
    from bench_votes import EndHazard

    device = "cuda" if torch.cuda.is_available() else None
    model = common.load_model(str(work / "model"), device=device).eval()
    processor = common.load_processor(str(work / "model"))
    names = sorted((work / "images").glob("*.jpg"))[:2 * pairs]
    images = [common.load_image(p) for p in names]
    shown = [[images[2 * p], images[2 * p + 1]][::order] for p in range(pairs) for order in (1, -1)]
    preset = prompts.get_preset("evoquality")
    inputs = common.encode_batch(processor, [preset.prompt("compare", True)] * len(shown), shown,
                                 preset.add_vision_id).to(model.device)
    runs = {}
    for engine in ("shared_prefix", "copies"):
        steps = []
        hazard = EndHazard(model, max_new_tokens)
        capture = model.lm_head.register_forward_hook(lambda m, a, out: steps.append(out[:, -1].float().cpu()))
        original = sampling._why_not_shared
        if engine == "copies":
            sampling._why_not_shared = lambda model, cache: "gpu_check: the copies path"
        try:
            s = sampling.sample(model, processor, inputs, n, max_new_tokens, keys=list(range(len(shown))), seed=1)
        finally:
            sampling._why_not_shared = original
            capture.remove()
            hazard.handle.remove()
        ids, mask = s.ids.cpu(), s.mask.cpu().bool()
        logits = torch.full((*ids.shape, steps[0].shape[-1]), float("nan"))
        logits[:, 0] = steps[0].repeat_interleave(n, 0)
        for t, step in enumerate(steps[1:ids.shape[1]], start=1):
            logits[mask[:, t], t] = step if len(step) == int(mask[:, t].sum()) else step[mask[:, t]]
        runs[engine] = (ids, mask, logits, s.decode["engine"])
    (ids, mask, logits, got), (ids_c, mask_c, logits_c, want) = runs["shared_prefix"], runs["copies"]
    T = min(ids.shape[1], ids_c.shape[1])
    same, gap = 0, 0.0
    for r in range(len(ids)):
        differ = (ids[r, :T] != ids_c[r, :T]).nonzero()
        upto = int(differ[0]) + 1 if len(differ) else int(min(mask[r].sum(), mask_c[r].sum()))
        same += not len(differ) and torch.equal(mask[r], mask_c[r])
        gap = max(gap, (logits[r, :upto] - logits_c[r, :upto]).abs().max().item())
    print(f"engine parity ({got} vs {want}, {model.dtype}, {model.device}; {len(ids)} rows of up to {max_new_tokens} "
          f"tokens): {same}/{len(ids)} rows identical; max |logit difference| until the paths part {gap:.3g} "
          f"(largest |logit| {logits_c[mask_c].abs().max().item():.3g})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", help="bench/gpu_check.sh's work folder")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--pairs-per-step", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--rollout-batch", type=int, default=8)  # grpo_train.py's default
    parser.add_argument("--write-wrapper", metavar="SCRIPT", help="only write the torchrun wrapper for SCRIPT")
    parser.add_argument("--write-vote-wrapper", metavar="SCRIPT", help="only write the voting wrappers for SCRIPT "
                                                                       "(one per engine)")
    parser.add_argument("--engine-parity", action="store_true", help="only compare the two decode paths on WORK's model")
    a = parser.parse_args()
    work = Path(a.work)
    if a.engine_parity:
        return engine_parity(work)
    if a.write_wrapper:
        (work / "wrapper.py").write_text(WRAPPER.format(root=str(Path(a.write_wrapper).resolve().parent),
                                                        script=str(Path(a.write_wrapper).resolve()),
                                                        peak=str(work / "peak.json")))
        return
    if a.write_vote_wrapper:
        for engine in ("shared", "copies"):
            (work / f"vote_wrapper_{engine}.py").write_text(VOTE_WRAPPER.format(
                root=str(Path(a.write_vote_wrapper).resolve().parent), bench=str(Path(__file__).resolve().parent),
                script=str(Path(a.write_vote_wrapper).resolve()), engine=engine,
                force_copies='sampling._why_not_shared = lambda model, cache: "gpu_check: the copies path"'
                if engine == "copies" else "",
                out=str(work / f"votes_peak_{engine}.json")))
        return

    inputs = json.loads((work / "inputs.json").read_text())
    s = memory_plan.Settings(config=str(work / "model"), gpus=1, micro_batch_size=a.micro_batch_size,
                             group_size=a.group_size, pairs_per_step=a.pairs_per_step,
                             max_new_tokens=a.max_new_tokens, text_tokens=inputs["text_tokens"],
                             rollout_batch=a.rollout_batch)
    cfg = json.loads((work / "model" / "config.json").read_text())
    p = memory_plan.plan(cfg, s)
    predicted = {k: v - p["overhead"] for k, v in memory_plan.phase_peaks(p).items()}  # allocator bytes only

    log = [json.loads(line) for line in (work / "run" / "train_log.jsonl").read_text().splitlines() if line.strip()]
    if not log:
        sys.exit("error: the run logged no step")
    print(f"grpo_train.py --fsdp --bf16 --gradient-checkpointing, 1 process: random Qwen2.5-VL, 7B widths, "
          f"{p['P'] / 1e9:.2f} B parameters; G {a.group_size}, {a.pairs_per_step} pairs/step, "
          f"{inputs['prompt_tokens']}-token prompts (1024x768 images), {a.max_new_tokens} new tokens, "
          f"micro-batch {a.micro_batch_size}")
    keys = ("time/step", "time/generation", "time/reference", "time/update", "rollout/tokens_per_s")
    print(f"{'step':>5s} " + " ".join(f"{k.split('/')[1].replace('tokens_per_s', 'tokens/s'):>13s}" for k in keys)
          + "  generated tokens")
    for r in log:
        print(f"{r['step']:5d} " + " ".join(f"{r.get(k, float('nan')):13.2f}" for k in keys)
              + f"  {r.get('rollout/generated_tokens', '?')}")
    timed = log[1:] or log  # the first step carries the warm-up
    mean = {k: sum(r.get(k, float("nan")) for r in timed) / len(timed) for k in keys}
    split = ", ".join(f"{k.split('/')[1]} {mean[k]:.1f} s ({mean[k] / mean['time/step']:.0%})" for k in keys[1:4])
    print(f"mean of steps {timed[0]['step']}-{timed[-1]['step']}: step {mean['time/step']:.1f} s = {split}; "
          f"{mean['rollout/tokens_per_s']:.0f} generated tokens/s")

    peak_file, smi_file = work / "peak.json", work / "smi.csv"
    measured = json.loads(peak_file.read_text()) if peak_file.exists() else {}
    smi = [float(x) for x in smi_file.read_text().split() if x.strip()] if smi_file.exists() else []
    print(f"\npeak GPU memory, GiB ({measured.get('device', 'device unknown')}; "
          f"{measured.get('sampling_calls', '?')} sampling calls)   measured   memory_plan.py   ratio")
    for name, key, phases in (("rollout (inside sampling.sample)", "rollout", ["rollout"]),
                              ("rest of the step (log-probs, update)", "other",
                               ["reference log-probs", "policy update", "optimizer step"])):
        plan_bytes = max(predicted[ph] for ph in phases)
        if key in measured:
            print(f"  {name:38s} {measured[key] / GiB:8.1f} {plan_bytes / GiB:16.1f} {measured[key] / plan_bytes:7.2f}"
                  "   (torch max_memory_allocated; plan without the allowance)")
        else:
            print(f"  {name:38s} {'-':>8s} {plan_bytes / GiB:16.1f}   (no peak.json)")
    whole = max(memory_plan.phase_peaks(p).values())
    if smi:
        print(f"  {'whole run, nvidia-smi memory.used':38s} {max(smi) / 1024:8.1f} {whole / GiB:16.1f} "
              f"{max(smi) / 1024 / (whole / GiB):7.2f}   (plan with the {p['overhead'] / GiB:g} GiB allowance)")
    if "other_reserved" in measured:
        print(f"  {'allocator reserved (max)':38s} {max(measured['rollout_reserved'], measured['other_reserved']) / GiB:8.1f}"
              f"   (rollout {measured['rollout_reserved'] / GiB:.1f}, rest {measured['other_reserved'] / GiB:.1f})")
    votes_report(work)


if __name__ == "__main__":
    main()
