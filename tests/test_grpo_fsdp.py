"""grpo_train.py --fsdp on CPU (torchrun, 2 processes, gloo): uneven images per process finish in lock-step and equal
one process (and stop doing so when one process weighs its micro-batches wrong); SIGKILL + --resume is exact; a bf16
run writes a loadable bf16 checkpoint. Every run here has one thread per process (OMP_NUM_THREADS=1).

The invariant tested: a step is defined globally (its pairs, its rollouts keyed to the step and the image, the loss
normalised by all its rollouts), so 2 FSDP processes with --pairs-per-step 1 and a sampling call per image compute what
1 plain process with --pairs-per-step 2 and one sampling call computes, up to the order of floating-point sums."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import common
from test_grpo_train import WRAPPER  # the same scoring stand-in as the one-process tests

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
TIMEOUT = 240  # a hang fails the test; --dist-timeout makes a desynchronised collective raise long before


# The parity runs take plain SGD steps: the weight gap is then lr x the gradient gap, which summation-order noise
# (BLAS kernels, thread counts) keeps at float32 rounding on any CPU. AdamW would divide that noise by sqrt(v) and turn
# it into a full-size step for a parameter whose gradient is near zero. Their launcher puts SGD where grpo_train.py
# builds its AdamW, and says so.
PLAIN_SGD = """
import torch
class PlainSGD(torch.optim.SGD):
    def __init__(self, params, lr, weight_decay):
        super().__init__(params, lr=lr, weight_decay=weight_decay)
        print("optimizer: plain SGD", flush=True)
torch.optim.AdamW = PlainSGD
"""


@pytest.fixture(scope="module")
def s(tmp_path_factory, tiny_model_dir, demo_pool):
    tmp = tmp_path_factory.mktemp("fsdp")
    wrapper, sgd_wrapper = tmp / "wrapper.py", tmp / "sgd_wrapper.py"
    wrapper.write_text(WRAPPER.format(root=str(ROOT), script=str(ROOT / "grpo_train.py")))
    setup, launch = wrapper.read_text().split("sys.argv[0]")
    sgd_wrapper.write_text(setup + PLAIN_SGD + "sys.argv[0]" + launch)
    images = sorted(p.name for p in demo_pool.glob("*.png"))
    labels = tmp / "pseudolabels.jsonl"
    with open(labels, "w") as f:  # every pair holds image 0: a step of 2 pairs has 3 images (2 + 1 per process)
        for k in range(6):
            f.write(json.dumps({"a": images[0], "b": images[k + 1], "p_star": [1.0, 0.0, 0.5][k % 3]}) + "\n")
    return {"tmp": tmp, "wrapper": wrapper, "sgd_wrapper": sgd_wrapper, "labels": labels, "model": tiny_model_dir,
            "pool": demo_pool}


def args(s, out, *extra):
    return ["--model", s["model"], "--pseudolabels", str(s["labels"]), "--images-root", str(s["pool"]),
            "--out", str(out), "--group-size", "2", "--max-new-tokens", "6", "--micro-batch-size", "2",
            "--rollout-batch", "1", "--lr", "1e-3", "--max-steps", "3", "--save-every", "1", "--dist-timeout", "60",
            *extra]


def torchrun(s, out, *extra, nproc=2, wrapper="wrapper"):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(s[wrapper]), *args(s, out, "--pairs-per-step", str(2 // nproc), *extra)]


def check_sgd(r):
    check(r)
    assert "optimizer: plain SGD" in r.stdout  # the parity runs took SGD steps


def check(r):
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])


def weights(path):
    return common.load_model(str(path), dtype=torch.float32).state_dict()


@pytest.fixture(scope="module")
def fsdp_run(s):
    out = s["tmp"] / "fsdp"
    check(subprocess.run(torchrun(s, out, "--fsdp", "--gradient-checkpointing"), cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=TIMEOUT))
    return out


SGD = ("--lr", "0.5", "--max-steps", "2", "--save-every", "100")  # with the SGD launcher
MUTATIONS = {  # what the parity test must catch, planted in the processes before grpo_train's main runs
    "weighting": """
_loss = grpo_train.grpo_loss
def grpo_loss(*a, **k):  # process 1's micro-batches weigh 1.5 x their share of the step
    loss, metrics = _loss(*a, **k)
    return loss * (1.5 if parallel.rank() == 1 else 1.0), metrics
grpo_train.grpo_loss = grpo_loss
""",
    "padding": """
_lockstep = parallel.lockstep
parallel.lockstep = lambda *a: [(mb, True) for mb, _ in _lockstep(*a)]  # the lock-step repeats count as real
""",
}


def mutated_wrapper(s, mutation):
    path = s["tmp"] / f"mutated_{mutation}.py"
    setup = s["sgd_wrapper"].read_text().split("sys.argv[0]")[0]  # the scoring stand-in and SGD, then the mutation
    path.write_text(setup + "import grpo_train, parallel\n" + MUTATIONS[mutation] + "grpo_train.main()\n")
    return path


def weight_gap(a, b, base) -> tuple[float, float]:
    """(max |a - b|, max |b - base|) over every weight: the gap between two runs, and how far training moved."""
    wa, wb, w0 = weights(a), weights(b), weights(base)
    return (max((wa[k] - wb[k]).abs().max().item() for k in wa), max((wb[k] - w0[k]).abs().max().item() for k in wb))


@pytest.fixture(scope="module")
def sgd_one(s):
    out = s["tmp"] / "sgd_one"
    check_sgd(subprocess.run([sys.executable, str(s["sgd_wrapper"]), *args(s, out, "--pairs-per-step", "2", *SGD,
                                                                           "--rollout-batch", "3")],  # one call
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT))
    return out


def test_two_fsdp_processes_with_uneven_images_equal_one_process(s, sgd_one):
    two = s["tmp"] / "sgd_fsdp"
    check_sgd(subprocess.run(torchrun(s, two, "--fsdp", "--gradient-checkpointing", *SGD, wrapper="sgd_wrapper"),
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT))
    a, b = common.read_jsonl(two / "train_log.jsonl"), common.read_jsonl(sgd_one / "train_log.jsonl")
    assert [x["step"] for x in a] == [1, 2]
    # 3 images a step on 2 processes: one process ran a zero-weight stand-in micro-batch every step
    assert all(x["reward/groups"] == 3 and x["rollout/stand_in_micro_batches"] == 1 for x in a)
    assert all(x["rollout/stand_in_micro_batches"] == 0 for x in b)
    for x, y in zip(a, b):  # the same pairs and rollouts (keyed to step and image), the same loss and gradient
        assert x["pairs"] == y["pairs"] and x["reward/mean"] == y["reward/mean"]
        assert [x[k] for k in ("rollout/generated_tokens", "rollout/row_steps", "rollout/score_mean")] == \
            [y[k] for k in ("rollout/generated_tokens", "rollout/row_steps", "rollout/score_mean")]
        for key in ("loss/total", "kl/mean", "optim/grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-9), key
    gap, moved = weight_gap(two, sgd_one, s["model"])
    print(f"FSDP 2 processes vs 1 process after 2 SGD steps: max |weight gap| {gap:.2e}, max |update| {moved:.2e}")
    assert moved > 1e-3 and gap < 1e-4 * moved


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_the_parity_comparison_fails_when_one_process_weighs_wrong(s, sgd_one, mutation):
    two = s["tmp"] / f"sgd_fsdp_{mutation}"
    cmd = torchrun(s, two, "--fsdp", *SGD, wrapper="sgd_wrapper")
    cmd[cmd.index(str(s["sgd_wrapper"]))] = str(mutated_wrapper(s, mutation))
    check_sgd(subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT))
    gap, moved = weight_gap(two, sgd_one, s["model"])
    print(f"mutation {mutation}: max |weight gap| {gap:.2e}, max |update| {moved:.2e}")
    assert gap > 1e-2 * moved  # the parity bound (1e-4 x moved) fails by far


def test_sigkill_then_resume_logs_each_step_once_and_ends_with_the_same_weights(s, fsdp_run):
    out = s["tmp"] / "killed"
    cmd = torchrun(s, out, "--fsdp", "--gradient-checkpointing")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + TIMEOUT
    while not (out / "checkpoints" / "step-1").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
    proc.wait()
    assert not (out / "config.json").exists() and not (out / "checkpoints" / "step-3").exists(), "killed too late"
    r = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    check(r)
    assert "resuming from" in r.stdout + r.stderr
    a, b = common.read_jsonl(fsdp_run / "train_log.jsonl"), common.read_jsonl(out / "train_log.jsonl")
    assert [x["step"] for x in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert x["pairs"] == y["pairs"] and x["reward/mean"] == y["reward/mean"]
        assert x["loss/total"] == y["loss/total"]
    wa, wb = weights(fsdp_run), weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bf16_run_with_sharded_reference_saves_a_loadable_bf16_checkpoint(s):
    out = s["tmp"] / "bf16"
    r = subprocess.run(torchrun(s, out, "--fsdp", "--bf16", "--shard-reference", "--max-steps", "1"), cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    check(r)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    loaded = common.load_model(str(out), dtype=torch.float32).state_dict()
    base = weights(s["model"])
    assert loaded.keys() == base.keys() and any(not torch.equal(loaded[k], base[k]) for k in base)
    (record,) = common.read_jsonl(out / "train_log.jsonl")
    assert record["optim/grad_norm"] > 0 and record["kl/mean"] >= 0
