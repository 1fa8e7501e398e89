"""run_evolution.sh: the demo end to end, resume after a kill during training, settings errors, two processes."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["sample_votes", "build_pseudolabels", "grpo_train", "evaluate"]
SMALL = {"ROUNDS": "1", "PAIRS": "6", "K": "2", "G": "2"}


def run_loop(env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("MODEL", "IMAGES", "BENCH", "OUT")}
    full.update(env, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", "run_evolution.sh"], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """The default demo (no MODEL), with the smallest budgets: builds its assets, runs round 0 and round 1."""
    out = tmp_path_factory.mktemp("demo") / "run"
    result = run_loop({"OUT": str(out), **SMALL})
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_demo_runs_end_to_end(demo_run):
    assert (demo_run / "assets" / "base" / "config.json").exists()
    for stage in STAGES:
        assert (demo_run / "round_1" / f".done_{stage}").exists()
    assert (demo_run / "round_0" / ".done_evaluate").exists()
    results = json.loads((demo_run / "results.json").read_text())
    assert set(results) == {"round_0", "round_1"}
    assert set(results["round_1"]["benchmarks"]) == {"synthetic"}
    table = (demo_run / "results.md").read_text()
    assert "round_0" in table and "round_1" in table and "synthetic SRCC" in table
    assert (demo_run / "round_1" / "model" / "config.json").exists()
    assert not (demo_run / "round_1" / "model" / "checkpoints").exists()  # optimizer states of a finished round
    labels = [json.loads(line) for line in (demo_run / "round_1" / "pseudolabels.jsonl").read_text().splitlines()]
    assert labels and all(set(r) >= {"a", "b", "p_star"} for r in labels)
    # each marker records its stage's settings: the command from the script on, without launcher or batch sizes
    votes = (demo_run / "round_1" / ".done_sample_votes").read_text().splitlines()
    assert votes[0] == "sample_votes.py" and votes[votes.index("--votes-per-pair") + 1] == "2"
    assert "--batch-size" not in votes and "8" not in votes and "python" not in votes
    assert (demo_run / "round_1" / ".done_grpo_train").read_text().splitlines()[:2] == ["NPROC=1", "grpo_train.py"]


def test_rerun_of_finished_run_only_prints_the_table(demo_run):
    before = {p: p.stat().st_mtime_ns for p in demo_run.rglob("*") if p.is_file() and p.name != "results.md"
              and p.name != "results.json"}
    result = run_loop({"OUT": str(demo_run), **SMALL})
    assert result.returncode == 0, result.stderr
    assert "[run ]" not in result.stdout and result.stdout.count("[skip]") == 1 + len(STAGES)
    assert "round_1" in result.stdout  # the table
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after


# the demo's own --samples (run_evolution.sh's demo block), to which EVAL_ARGS is appended
DEMO_SAMPLES = re.search(r'EVAL_ARGS="[^"]*--samples (\d+)', (ROOT / "run_evolution.sh").read_text()).group(1)


def files_and_times(out: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_finished_stage_refuses_changed_settings(demo_run):
    """Reruns of the finished demo with one setting changed: refused before anything runs, naming each change."""
    before = files_and_times(demo_run)
    round_1 = demo_run / "round_1"
    cases = [
        ({"K": "4", "SEED": "5"}, f"error: stage 'sample_votes' in {round_1} finished with other settings "
                                  "(--votes-per-pair: 2 -> 4; --seed: 1 -> 6); restore them, or use another OUT"),
        ({"LABEL_ARGS": "--label soft --drop-ties"}, f"error: stage 'build_pseudolabels' in {round_1} finished with "
         "other settings (--label: (absent) -> soft; --drop-ties: (absent) -> (set)); restore them, or use another OUT"),
        ({"NPROC": "2"}, f"error: stage 'grpo_train' in {round_1} finished with other settings (NPROC: 1 -> 2); "
                         "restore them, or use another OUT"),  # the votes and labels stay: skipped
        ({"EVAL_ARGS": "--samples 2"}, f"error: stage 'evaluate' in {demo_run / 'round_0'} finished with other "
                                       f"settings (--samples: {DEMO_SAMPLES} -> {DEMO_SAMPLES} 2)"),  # argparse: the last
    ]
    for change, message in cases:
        result = run_loop({"OUT": str(demo_run), **SMALL, **change})
        assert result.returncode == 2 and message in result.stderr, result.stdout + result.stderr
        assert "[run ]" not in result.stdout
        if "NPROC" in change:  # the process count is no setting of the votes and labels
            assert "[skip] sample_votes" in result.stdout and "[skip] build_pseudolabels" in result.stdout
    # not settings: batch sizes, --no-text; a flag repeated to no effect (other words, the same flags): all skipped
    result = run_loop({"OUT": str(demo_run), **SMALL, "VOTES_ARGS": "--batch-size 2 --no-reasoning",
                       "TRAIN_ARGS": "--micro-batch-size 1", "EVAL_ARGS": "--no-text --batch-size 3"})
    assert result.returncode == 0 and "[run ]" not in result.stdout, result.stdout + result.stderr
    # a marker of the earlier version (an empty file) records nothing to compare: refused
    marker = round_1 / ".done_build_pseudolabels"
    saved = marker.read_bytes()
    try:
        marker.write_bytes(b"")
        result = run_loop({"OUT": str(demo_run), **SMALL})
        assert result.returncode == 2 and f"error: {marker} records no settings" in result.stderr
    finally:
        marker.write_bytes(saved)
    after = files_and_times(demo_run)
    changed = {p for p in after if after[p] != before.get(p)} - {demo_run / "results.md", demo_run / "results.json",
                                                                   marker}
    assert not changed and set(after) == set(before)


def test_settings_errors():
    result = run_loop({"MODEL": "some/model"})
    assert result.returncode == 2 and "IMAGES" in result.stderr
    result = run_loop({"IMAGES": "/tmp"})
    assert result.returncode == 2 and "MODEL" in result.stderr
    result = run_loop({"MODEL": "m", "IMAGES": "/tmp", "REF": "other"})
    assert result.returncode == 2 and "REF" in result.stderr


def test_failing_stage_names_stage_and_log(demo_run, tmp_path):
    assets = demo_run / "assets"
    env = {"MODEL": str(tmp_path / "no_such_model"), "IMAGES": str(assets / "pool"), "OUT": str(tmp_path / "run"),
           **SMALL}
    result = run_loop(env)
    assert result.returncode == 1
    assert "stage 'sample_votes' failed" in result.stderr and "sample_votes.log" in result.stderr


def test_kill_during_training_then_resume(demo_run, tmp_path):
    assets, out = demo_run / "assets", tmp_path / "run"
    env = {"MODEL": str(assets / "base"), "IMAGES": str(assets / "pool"), "OUT": str(out), "ROUNDS": "1",
           "PAIRS": "8", "K": "2", "G": "2",
           "VOTES_ARGS": "--no-reasoning --max-new-tokens 8", "EVAL_ARGS": "--no-reasoning --max-new-tokens 8",
           "TRAIN_ARGS": "--no-reasoning --max-new-tokens 8 --pairs-per-step 2 --save-every 1 --lr 1e-4"}
    full = {k: v for k, v in os.environ.items() if k not in ("MODEL", "IMAGES", "BENCH", "OUT")}
    full.update(env, OMP_NUM_THREADS="1")
    loop = subprocess.Popen(["bash", "run_evolution.sh"], cwd=ROOT, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    checkpoints = out / "round_1" / "model" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not any(checkpoints.glob("step-[0-9]")):
        assert loop.poll() is None, loop.stdout.read()
        time.sleep(0.2)
    os.killpg(loop.pid, signal.SIGKILL)  # the whole loop, the training process included
    loop.wait()
    assert not (out / "round_1" / ".done_grpo_train").exists()

    result = run_loop(env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[skip] sample_votes" in result.stdout and "[skip] build_pseudolabels" in result.stdout
    assert "[run ] grpo_train" in result.stdout
    steps = [json.loads(line)["step"] for line in (out / "round_1" / "model" / "train_log.jsonl").open()]
    total = json.loads((out / "round_1" / "model" / "args.json").read_text())["total_steps"]
    assert total >= 2 and steps == list(range(1, total + 1))  # every step once: none lost, none repeated
    for stage in ["sample_votes", "build_pseudolabels"]:  # ran once: one run's output in the log
        assert (out / "round_1" / "logs" / f"{stage}.log").read_text().count("Traceback") == 0
    assert (out / "round_1" / "model" / "config.json").exists() and not (out / "results.json").exists()


def test_two_processes(demo_run, tmp_path):
    assets, out = demo_run / "assets", tmp_path / "run"
    env = {"MODEL": str(assets / "base"), "IMAGES": str(assets / "pool"), "OUT": str(out), "NPROC": "2",
           "BENCH": f"synthetic={assets / 'bench' / 'labels.jsonl'}", "ROUNDS": "1", "PAIRS": "8", "K": "2", "G": "2",
           "VOTES_ARGS": "--no-reasoning --max-new-tokens 8",
           "EVAL_ARGS": "--no-reasoning --max-new-tokens 8 --samples 2",
           "TRAIN_ARGS": "--no-reasoning --max-new-tokens 8 --pairs-per-step 2 --lr 1e-4"}
    result = run_loop(env)
    assert result.returncode == 0, result.stdout + result.stderr
    log = (out / "round_1" / "logs" / "grpo_train.log").read_text()
    meta = json.loads((out / "round_1" / "votes.jsonl.meta.json").read_text())
    assert meta["num_processes"] == 2
    train = [json.loads(line) for line in (out / "round_1" / "model" / "train_log.jsonl").open()]
    total = json.loads((out / "round_1" / "model" / "args.json").read_text())["total_steps"]
    assert total >= 1 and len(train) == total, log
    assert all(len(r["pairs"]) == 4 for r in train)  # 2 processes x 2 pairs per step
    assert json.loads((out / "round_1" / "eval" / "summary.json").read_text())["num_processes"] == 2
    assert (out / "results.md").exists()
