"""run_evolution.sh: the demo end to end with its figures, resume after a kill during training, settings errors and
misspelt settings, one run per OUT and a lock file that cannot be abused, two processes; every path here holds a space
and shell-special characters."""

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["sample_votes", "build_pseudolabels", "grpo_train", "evaluate"]
SMALL = {"ROUNDS": "1", "PAIRS": "6", "K": "2", "GROUP_SIZE": "2"}
FIGURES = ["correlations", "training", "votes"]
NO_FIGURES = "plot_run.py: matplotlib is not installed, so no figures were written (pip install matplotlib)"
SPECIAL = "a b'c\"$d*&;e"  # a folder name with a space, quotes and shell-special characters


def run_loop(env: dict, args: list[str] = (), timeout: int = 600) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("MODEL", "IMAGES", "BENCH", "OUT")}
    full.update(env, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", "run_evolution.sh", *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


def wait_until_released(out: Path, timeout: float = 60) -> None:
    """Until no process of a killed loop holds OUT/.lock any more (a killed process closes its files as it exits)."""
    deadline = time.time() + timeout
    with open(out / ".lock") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.time() < deadline, f"{out / '.lock'} still held {timeout} s after the kill"
                time.sleep(0.1)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """The default demo (no MODEL), with the smallest budgets: builds its assets, runs round 0 and round 1. Its OUT,
    and so its MODEL, IMAGES and BENCH, holds a space and shell-special characters."""
    out = tmp_path_factory.mktemp("demo") / SPECIAL / "run"
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
    assert sorted(p.stem for p in (demo_run / "figures").glob("*.png")) == FIGURES
    assert all(f"![{name}](figures/{name}.png)" in table for name in FIGURES)
    assert (demo_run / ".lock").read_text() == ""  # released


def unchanged(path: Path) -> bool:
    """Files a rerun of a finished run leaves as they are: all but the table, the figures and the lock."""
    return path.name not in ("results.md", "results.json", ".lock") and path.parent.name != "figures"


def test_rerun_of_finished_run_only_prints_the_table_and_draws_the_figures(demo_run):
    before = {p: p.stat().st_mtime_ns for p in demo_run.rglob("*") if p.is_file() and unchanged(p)}
    figures = demo_run / "figures"
    for png in figures.glob("*.png"):
        png.unlink()
    # the same settings as NAME=VALUE arguments: the same run, all skipped
    result = run_loop({}, [f"OUT={demo_run}", *(f"{k}={v}" for k, v in SMALL.items())])
    assert result.returncode == 0, result.stderr
    assert "[run ]" not in result.stdout and result.stdout.count("[skip]") == 1 + len(STAGES)
    assert "round_1" in result.stdout  # the table
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after
    assert sorted(p.stem for p in figures.glob("*.png")) == FIGURES


def test_rerun_without_matplotlib_gives_a_hint_and_succeeds(demo_run, tmp_path):
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text("raise ImportError(\"No module named 'matplotlib'\")\n")
    saved = {p: p.read_bytes() for p in (demo_run / "figures").glob("*.png")}
    try:
        for png in saved:
            png.unlink()
        result = run_loop({"OUT": str(demo_run), **SMALL, "PYTHONPATH": str(tmp_path)})
        assert result.returncode == 0, result.stdout + result.stderr
        assert NO_FIGURES in result.stdout.splitlines() and "warning" not in result.stderr
        assert "figures/" not in (demo_run / "results.md").read_text()  # links only to figures that exist
    finally:
        for png, data in saved.items():
            png.write_bytes(data)


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
    # not settings: batch sizes (votes, rollouts and samples are keyed), --no-text; a flag repeated to no effect (other words, the same flags): all skipped
    result = run_loop({"OUT": str(demo_run), **SMALL, "VOTES_ARGS": "--batch-size 2 --no-reasoning",
                       "TRAIN_ARGS": "--micro-batch-size 1 --rollout-batch 1", "EVAL_ARGS": "--no-text --batch-size 3"})
    assert result.returncode == 0 and "[run ]" not in result.stdout, result.stdout + result.stderr
    after = files_and_times(demo_run)
    changed = {p for p in after if after[p] != before.get(p) and unchanged(p)}
    assert not changed and set(after) == set(before)


def test_settings_errors():
    result = run_loop({"MODEL": "m", "IMAGES": "/tmp", "OUT": "/nonexistent/run", "BENCH": "koniq=/data/with space"})
    assert result.returncode == 2 and result.stderr == ("error: BENCH: 'space' is not NAME=FOLDER|FILE[@ROOT] (a path "
                                                        "with spaces: one spec per line)\n")
    result = run_loop({"MODEL": "some/model"})
    assert result.returncode == 2 and "IMAGES" in result.stderr
    result = run_loop({"IMAGES": "/tmp"})
    assert result.returncode == 2 and "MODEL" in result.stderr
    for name in ["REF", "FSDP"]:
        result = run_loop({"MODEL": "m", "IMAGES": "/tmp", "OUT": "/nonexistent/run", name: "2"})
        assert result.returncode == 2 and f"error: {name} must be" in result.stderr, result.stderr
    result = run_loop({"POOL": "/tmp"})
    assert result.returncode == 2 and "MODEL" in result.stderr
    result = run_loop({"MODEL": "m", "IMAGES": "/tmp", "OUT": "/nonexistent/run", "SYNTH_MIX": "mixed"})
    assert result.returncode == 2 and "error: SYNTH_MIX must be 'add' or 'replace', not 'mixed'" in result.stderr
    result = run_loop({"MODEL": "m", "IMAGES": "/tmp", "OUT": "/nonexistent/run", "PAIRS": "8", "SYNTH_PAIRS": "8",
                       "SYNTH_MIX": "replace"})
    assert result.returncode == 2 and "SYNTH_PAIRS must be below PAIRS" in result.stderr, result.stderr
    result = run_loop({"MODEL": "m", "POOL": "/nonexistent/pool", "OUT": "/nonexistent/run"})
    assert result.returncode == 2 and result.stderr == ("error: POOL /nonexistent/pool holds no manifest.jsonl and "
                                                        "references.txt: build it with make_pool.py, or set IMAGES to "
                                                        "build it here\n")


def test_misspelt_settings_are_refused_naming_the_setting(tmp_path):
    """A setting the loop does not know is refused before anything runs, never ignored: as an environment variable
    that looks like one of the loop's (another loop's name, another case, one S more or less) or as an argument."""
    env = {"MODEL": str(tmp_path / "model"), "IMAGES": str(tmp_path), "OUT": str(tmp_path / "run")}
    cases = [({"G": "8"}, [], "error: G is set, but the loop has no setting G: did you mean GROUP_SIZE? (unset G;"),
             ({"FSDP_CONFIG": "fsdp.yaml"}, [], "no setting FSDP_CONFIG: did you mean FSDP?"),
             ({"group_size": "8"}, [], "no setting group_size: did you mean GROUP_SIZE?"),
             ({"ROUND": "1"}, [], "no setting ROUND: did you mean ROUNDS?"),
             ({"K_VOTES": "8"}, [], "no setting K_VOTES: did you mean K?"),
             ({}, ["GROUP_SIZE=2", "NUM_PAIRS=4"], "error: argument NUM_PAIRS=...: the loop has no setting NUM_PAIRS: "
                                                   "did you mean PAIRS? (settings: MODEL IMAGES"),
             ({}, ["SEEDS=1"], "the loop has no setting SEEDS: did you mean SEED?"),
             ({}, ["XYZ=1"], "error: argument XYZ=...: the loop has no setting XYZ (settings: MODEL IMAGES"),
             ({}, ["K"], "error: argument 'K' is not NAME=VALUE (a setting)")]
    for extra, args, message in cases:
        result = run_loop({**env, **extra}, args, timeout=60)
        assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
        assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was made


def failing_loop(tmp_path: Path) -> dict:
    """Settings of a loop that gets past its lock and fails at its first stage (no such model)."""
    return {"MODEL": str(tmp_path / "no_model"), "IMAGES": str(tmp_path), "OUT": str(tmp_path / "run")}


@pytest.mark.parametrize("kind", ["symlink", "folder", "fifo"])
def test_lock_that_is_not_a_plain_file_is_refused(tmp_path, kind):
    """OUT/.lock planted as a link (to a file of the user's), a folder or a FIFO: refused, nothing written through."""
    (tmp_path / "run").mkdir()
    lock, target = tmp_path / "run" / ".lock", tmp_path / "precious.txt"
    target.write_text("the user's file\n")
    {"symlink": lambda: lock.symlink_to(target), "folder": lock.mkdir, "fifo": lambda: os.mkfifo(lock)}[kind]()
    result = run_loop(failing_loop(tmp_path), timeout=60)
    assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
    assert result.stderr == f"error: {lock} is not a plain file (a link, folder or device): remove it, then rerun\n"
    assert target.read_text() == "the user's file\n"


def test_lock_note_is_read_bounded_and_as_bytes(tmp_path):
    """A 100 MB lock file with bytes that are not UTF-8: its note is shown as at most 200 printable characters, both
    when another process holds the lock and when a rerun takes it over."""
    (tmp_path / "run").mkdir()
    lock = tmp_path / "run" / ".lock"
    lock.write_bytes(b"pid 12 on host \xff\xfe\x00x" + b"y" * 100_000_000)
    shown = "pid 12 on host ???x" + "y" * 181
    with open(lock, "rb") as held:  # another run holds the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        result = run_loop(failing_loop(tmp_path), timeout=60)
    assert result.returncode == 2 and result.stdout == "", result.stdout[:1000] + result.stderr[:1000]
    assert result.stderr == (f"error: {tmp_path / 'run'} is in use by another run_evolution.sh or a stage it started "
                             f"({shown}); wait for it to end, or use another OUT\n")
    result = run_loop(failing_loop(tmp_path), timeout=120)  # nobody holds it: taken over, then the first stage fails
    assert result.returncode == 1 and len(result.stdout) < 10_000, result.stderr[:1000]
    assert f"note: taking over {lock}, left by a run that ended without releasing it ({shown})" in \
        result.stdout.splitlines()
    assert lock.read_bytes() == b""  # released


def test_one_loop_per_out(demo_run, tmp_path):
    """A second loop into a running loop's OUT refuses before doing anything; a lock left by a killed loop is taken
    over, and said so."""
    assets, out = demo_run / "assets", tmp_path / "run"
    env = {"MODEL": str(assets / "base"), "IMAGES": str(assets / "pool"), "OUT": str(out), **SMALL,
           "BENCH": f"synthetic={assets / 'bench' / 'labels.jsonl'}\n",  # one spec a line: the path has a space
           "EVAL_ARGS": "--no-reasoning --max-new-tokens 8"}
    full = {k: v for k, v in os.environ.items() if k not in ("MODEL", "IMAGES", "BENCH", "OUT")}
    first = subprocess.Popen(["bash", "run_evolution.sh"], cwd=ROOT, env={**full, **env, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    owner = f"pid {first.pid} on host {socket.gethostname()}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not ((out / ".lock").exists() and (out / ".lock").read_text().strip()):
            time.sleep(0.05)
        second = run_loop(env)
        assert first.poll() is None  # the first was running all along
        assert second.returncode == 2 and second.stdout == "", second.stdout + second.stderr
        assert second.stderr.splitlines() == [f"error: {out} is in use by another run_evolution.sh or a stage it "
                                              f"started ({owner}); wait for it to end, or use another OUT"]
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    wait_until_released(out)
    left = (out / ".lock").read_text()
    assert left == owner + "\n"  # a killed run cannot release its note, the kernel releases the lock itself
    (demo_run / ".lock").write_text(left)  # the finished demo, as a killed run would leave it: a rerun goes on
    result = run_loop({"OUT": str(demo_run), **SMALL})
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"note: taking over {demo_run}/.lock, left by a run that ended without releasing it ({owner})" in \
        result.stdout.splitlines()
    assert (demo_run / ".lock").read_text() == ""


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
           "PAIRS": "8", "K": "2", "GROUP_SIZE": "2",
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
    wait_until_released(out)
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
    """The paper's configuration (MODEL, IMAGES, two benchmarks in BENCH, one per line) with 2 processes; every path
    holds a space and shell-special characters."""
    assets, out = demo_run / "assets", tmp_path / SPECIAL / "run"
    small = tmp_path / SPECIAL / "small bench"  # a second benchmark: 6 of the demo's images
    small.mkdir(parents=True)
    lines = (assets / "bench" / "labels.jsonl").read_text().splitlines()[:6]
    for line in lines:
        shutil.copy(assets / "bench" / json.loads(line)["image"], small)
    (small / "labels.jsonl").write_text("\n".join(lines) + "\n")
    env = {"MODEL": str(assets / "base"), "IMAGES": str(assets / "pool"), "OUT": str(out), "NPROC": "2",
           "BENCH": f"synthetic={assets / 'bench' / 'labels.jsonl'}\n  small={small / 'labels.jsonl'}\n",
           "ROUNDS": "1", "PAIRS": "8", "K": "2", "GROUP_SIZE": "2",
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
    summary = json.loads((out / "round_1" / "eval" / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["benchmarks"]["small"]["n"] == 6
    assert "| round | small SRCC | small PLCC | synthetic SRCC |" in (out / "results.md").read_text()


def test_pool_round_2_adds_same_reference_pairs(demo_run, tmp_path):
    """With IMAGES and POOL, the loop builds the pool (make_pool.py); round 1 votes on its references alone, round 2
    draws its random pairs over the whole pool and adds SYNTH_PAIRS pairs of two versions of one reference, a setting
    in its marker. A rerun naming only the built POOL (no IMAGES) finds everything done; SYNTH_MIX=replace puts them
    in place of as many random pairs."""
    assets, out, pool = demo_run / "assets", tmp_path / "run", tmp_path / SPECIAL / "pool"
    images = tmp_path / "my images"
    images.mkdir()
    for path in sorted((assets / "pool").glob("*.png"))[:6]:
        shutil.copy(path, images / path.name)
    flags = "--no-reasoning --max-new-tokens 8"
    env = {"MODEL": str(assets / "base"), "POOL": str(pool), "OUT": str(out), "ROUNDS": "2", "VARIANTS": "2",
           "PAIRS": "4", "SYNTH_PAIRS": "3", "K": "2", "GROUP_SIZE": "2", "VOTES_ARGS": flags,
           "TRAIN_ARGS": f"{flags} --pairs-per-step 4 --lr 1e-4"}
    result = run_loop({**env, "IMAGES": str(images)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[done] make_pool" in result.stdout
    reference_of = {r["image"]: r["reference"] for r in map(json.loads, (pool / "manifest.jsonl").open())}
    assert len(reference_of) == 6 * 3
    votes = {t: [json.loads(line) for line in (out / f"round_{t}" / "votes.jsonl").open()] for t in (1, 2)}
    assert len(votes[1]) == 4 and all(r["kind"] == "random" for r in votes[1])
    assert all(reference_of[r[x]] == r[x] for r in votes[1] for x in "ab")  # references only
    same = [r for r in votes[2] if r["kind"] == "same_reference"]
    assert len(votes[2]) == 4 + 3 and len(same) == 3
    assert all(reference_of[r["a"]] == reference_of[r["b"]] and r["a"] != r["b"] for r in same)
    assert len({frozenset((r["a"], r["b"])) for r in votes[2]}) == 7  # no pair twice
    markers = {t: (out / f"round_{t}" / ".done_sample_votes").read_text().splitlines() for t in (1, 2)}
    assert "--same-reference-pairs" not in markers[1] and "--pool-manifest" not in markers[1]
    assert markers[2][markers[2].index("--same-reference-pairs") + 1] == "3"
    assert markers[2][markers[2].index("--pool-manifest") + 1] == str(pool / "manifest.jsonl")
    labels = [json.loads(line) for line in (out / "round_2" / "pseudolabels.jsonl").open()]
    assert {r["kind"] for r in labels} == {"random", "same_reference"}
    result = run_loop(env)
    assert result.returncode == 0 and "[run ]" not in result.stdout, result.stdout + result.stderr
    # SYNTH_MIX=replace: the same-reference pairs take the place of as many random ones, PAIRS in all; the random
    # pairs left are the first of those drawn above (same SEED and pool), the same-reference pairs the same
    replace = {**env, "OUT": str(tmp_path / "replace"), "SYNTH_MIX": "replace"}
    result = run_loop(replace)
    assert result.returncode == 0, result.stdout + result.stderr
    round_2 = [json.loads(line) for line in (tmp_path / "replace" / "round_2" / "votes.jsonl").open()]
    pairs = lambda rows, kind: [(r["a"], r["b"]) for r in rows if r["kind"] == kind]  # noqa: E731
    assert len(round_2) == 4 and len(pairs(round_2, "same_reference")) == 3
    assert pairs(round_2, "random") == pairs(votes[2], "random")[:1]
    assert pairs(round_2, "same_reference") == pairs(votes[2], "same_reference")
