"""plot_run.py: the results table equals the summaries, every plotted point equals its log line, one colour per round;
a run without matplotlib still gets its table; bad inputs and unwritable outputs are one line, never a traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.colors import to_rgba

import plot_run

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["reward/mean", "reward/std", "reward/zero_std_fraction", "kl/mean", "loss/clip_fraction",
        "rollout/score_within_group_std", "rollout/parse_failure_rate", "rollout/truncation_rate",
        "rollout/completion_length", "time/generation", "time/reference", "time/update"]


def write_run(out: Path) -> Path:
    """Round 0: an evaluation; rounds 1 and 2: training log, evaluation (round 2 without intervals), vote stats."""
    def summary(srcc: float, with_ci: bool) -> dict:
        bench = {"n": 50, "srcc": srcc, "plcc": srcc + 0.05, "krcc": srcc - 0.2}
        wavg = {"srcc": srcc - 0.01, "plcc": None}  # an undefined statistic is null in summary.json
        if with_ci:
            bench["ci95"] = {"srcc": [srcc - 0.03, srcc + 0.02], "plcc": [srcc + 0.01, srcc + 0.08]}
            wavg["ci95"] = {"srcc": [srcc - 0.04, srcc + 0.03], "plcc": None}
        spaq = {**bench, "srcc": srcc / 2}
        if with_ci:
            spaq["ci95"] = {**bench["ci95"], "srcc": [srcc / 2 + 0.01, srcc / 2 + 0.05]}  # misses the point: drawn so
        return {"benchmarks": {"koniq": bench, "spaq": spaq}, "wavg": wavg}

    for t in range(3):
        (out / f"round_{t}" / "eval").mkdir(parents=True)
        (out / f"round_{t}" / "eval" / "summary.json").write_text(json.dumps(summary(0.5 + 0.1 * t, t < 2)))
    for t in (1, 2):
        (out / f"round_{t}" / "model").mkdir()
        lines = []
        for step in range(1, 6):
            record = {"step": step, "epoch": 0, "pairs": [["a.png", "b.png"]]}
            record.update({k: 0.01 * step * t + i for i, k in enumerate(KEYS)})
            record["reward/std"] = None if step == 3 else record["reward/std"]  # a null: no point at step 3
            lines.append(json.dumps(record))
        (out / f"round_{t}" / "model" / "train_log.jsonl").write_text("\n".join(lines) + "\n")
        stats = {"tie_rate": 0.1 * t, "abstention_rate": 0.02 * t, "first_slot_win_rate": 0.5 + 0.05 * t,
                 "majority_agreement_histogram": {"edges": [0.5, 0.75, 1.0], "counts": [t, 4 - t]}}
        if t == 2:  # a round with same-reference pairs: its histogram per kind of pair
            stats["by_kind"] = {"random": {"majority_agreement_histogram": {"edges": [0.5, 0.75, 1.0],
                                                                            "counts": [1, 0]}},
                                "same_reference": {"majority_agreement_histogram": {"edges": [0.5, 0.75, 1.0],
                                                                                    "counts": [1, 2]}}}
        (out / f"round_{t}" / "stats.json").write_text(json.dumps(stats))
    return out


@pytest.fixture
def run(tmp_path) -> Path:
    return write_run(tmp_path / "run")


def artists(fig) -> dict:
    """gid -> artist, over every panel of a figure."""
    found = {}
    for ax in fig.axes:
        for artist in [*ax.lines, *ax.patches]:
            if artist.get_gid():
                assert artist.get_gid() not in found, artist.get_gid()
                found[artist.get_gid()] = artist
    return found


def test_training_curves_equal_the_log(run):
    fig = plot_run.plot_training(plot_run.load_train_logs(run))
    lines = artists(fig)
    assert len(lines) == 2 * len(KEYS)
    for t in (1, 2):
        records = [json.loads(line) for line in (run / f"round_{t}" / "model" / "train_log.jsonl").open()]
        for key in KEYS:
            line = lines[f"round_{t}:{key}"]
            expected = [(r["step"], r[key]) for r in records if r[key] is not None]
            assert list(line.get_xdata()) == [step for step, _ in expected]
            assert list(line.get_ydata()) == pytest.approx([value for _, value in expected])
            assert to_rgba(line.get_color()) == to_rgba(f"C{t}")
    assert len(lines["round_1:reward/std"].get_xdata()) == 4  # the null step is left out
    titles = [ax.get_title() for ax in fig.axes]
    assert all(titles) and all(ax.get_xlabel() == "GRPO step" and ax.get_ylabel() for ax in fig.axes)


def test_correlation_points_and_intervals_equal_the_summaries(run):
    fig = plot_run.plot_correlations(plot_run.load_summaries(run))
    assert [ax.get_ylabel() for ax in fig.axes] == ["SRCC (-1 to 1)", "PLCC (-1 to 1)"]
    points = 0
    for ax, metric in zip(fig.axes, ["srcc", "plcc"]):
        intervals = {c.get_gid().removesuffix(":ci95"): c.get_segments()[0] for c in ax.collections}
        lines = {line.get_gid(): line for line in ax.lines if line.get_gid()}
        names = [label.get_text() for label in ax.get_xticklabels()]
        assert names == ["koniq", "spaq", "WAVG"]
        for t in range(3):
            summary = json.loads((run / f"round_{t}" / "eval" / "summary.json").read_text())
            for i, name in enumerate(names):
                values = summary["wavg"] if name == "WAVG" else summary["benchmarks"][name]
                gid = f"round_{t}:{name}"
                if values[metric] is None:
                    assert gid not in lines
                    continue
                points += 1
                x, y = lines[gid].get_xdata()[0], lines[gid].get_ydata()[0]
                assert y == pytest.approx(values[metric]) and abs(x - i) < 0.4
                assert to_rgba(lines[gid].get_color()) == to_rgba(f"C{t}")
                ci = (values.get("ci95") or {}).get(metric)
                if ci:
                    assert intervals[gid].ravel().tolist() == pytest.approx([x, ci[0], x, ci[1]])
                else:  # a plain point
                    assert gid not in intervals
    assert points == 3 * 3 + 3 * 2  # WAVG's PLCC is null in every round


def test_vote_bars_and_histogram_equal_the_stats(run):
    fig = plot_run.plot_votes(plot_run.load_vote_stats(run))
    shown = artists(fig)
    for t in (1, 2):
        stats = json.loads((run / f"round_{t}" / "stats.json").read_text())
        for key in ["tie_rate", "abstention_rate", "first_slot_win_rate"]:
            bar = shown[f"round_{t}:{key}"]
            assert bar.get_height() == pytest.approx(stats[key]) and to_rgba(bar.get_facecolor()) == to_rgba(f"C{t}")
        parts = stats.get("by_kind", {"all": stats})
        for kind, part in parts.items():
            values, edges, _ = shown[f"round_{t}:agreement:{kind}"].get_data()
            counts = part["majority_agreement_histogram"]["counts"]
            assert list(values) == pytest.approx([c / sum(counts) for c in counts])
            assert list(edges) == part["majority_agreement_histogram"]["edges"]
    assert sorted(g for g in shown if ":agreement" in g) == ["round_1:agreement:all", "round_2:agreement:random",
                                                             "round_2:agreement:same_reference"]


def test_main_writes_the_figures_that_have_data(run):
    written = plot_run.main([str(run)])
    assert [p.name for p in written] == ["training.png", "correlations.png", "votes.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
    for t in (1, 2):
        (run / f"round_{t}" / "stats.json").unlink()
    (run / "figures" / "votes.png").unlink()
    assert [p.name for p in plot_run.main([str(run)])] == ["training.png", "correlations.png"]
    assert not (run / "figures" / "votes.png").exists()


def test_corrupt_summary_is_one_line_naming_the_file(run):
    bad = run / "round_1" / "eval" / "summary.json"
    bad.write_text("")
    result = subprocess.run([sys.executable, "plot_run.py", str(run)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {bad} is empty or not valid JSON")
    assert len(result.stderr.strip().splitlines()) == 1


def test_without_matplotlib_prints_a_hint_and_the_table(run):
    script = ("import sys, runpy; sys.modules['matplotlib'] = None; sys.argv = ['plot_run.py', sys.argv[1]]; "
              "runpy.run_path('plot_run.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", script, str(run)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    table = (run / "results.md").read_text().strip()
    assert result.stdout.splitlines() == ["plot_run.py: matplotlib is not installed, so no figures were written "
                                          "(pip install matplotlib)", *table.splitlines(),
                                          f"written: {run / 'results.md'}, {run / 'results.json'}"]
    assert not (run / "figures").exists() and "figures/" not in table


def test_results_table_equals_the_summaries(run):
    plot_run.main([str(run)])
    summaries = {f"round_{t}": json.loads((run / f"round_{t}" / "eval" / "summary.json").read_text()) for t in range(3)}
    assert json.loads((run / "results.json").read_text()) == summaries
    lines = (run / "results.md").read_text().splitlines()
    assert lines[:2] == ["| round | koniq SRCC | koniq PLCC | spaq SRCC | spaq PLCC | WAVG SRCC | WAVG PLCC |",
                         "|---|---|---|---|---|---|---|"]
    for line, (key, s) in zip(lines[2:5], summaries.items()):
        parts = [s["benchmarks"]["koniq"], s["benchmarks"]["spaq"], s["wavg"]]
        cells = [f"{v[m]:.3f}" if v[m] is not None else "-" for v in parts for m in ("srcc", "plcc")]
        assert line == f"| {key} | " + " | ".join(cells) + " |"
    assert lines[5:] == ["", "![correlations](figures/correlations.png)", "", "![training](figures/training.png)",
                         "", "![votes](figures/votes.png)"]


def plot(out: Path, read_only: Path | None = None) -> subprocess.CompletedProcess:
    """python plot_run.py OUT, with every write under `read_only` failing as on a read-only file system (an audit
    hook: a root user, as in CI containers, writes through any permission bit)."""
    script = (
        "import errno, os, runpy, sys\n"
        "folder = sys.argv.pop(2)\n"
        "def inside(path):\n"
        "    path = os.path.abspath(os.fsdecode(path))\n"
        "    return path == folder or path.startswith(folder + os.sep)\n"
        "def hook(event, args):\n"
        "    writes = args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) if event == 'open' else True\n"
        "    paths = args[:2] if event == 'os.rename' else args[:1]\n"
        "    if event in ('open', 'os.mkdir', 'os.rename', 'os.remove', 'os.chmod') and writes and any(\n"
        "            isinstance(p, (str, bytes, os.PathLike)) and inside(p) for p in paths):\n"
        "        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(paths[0]))\n"
        "if folder:\n"
        "    sys.addaudithook(hook)\n"
        "sys.argv = ['plot_run.py', sys.argv[1]]\n"
        "runpy.run_path('plot_run.py', run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", script, str(out), str(read_only or "")], cwd=ROOT,
                          capture_output=True, text=True)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr
    return result.stderr.strip()


def test_read_only_run_folder_is_one_line(run):
    result = plot(run, read_only=run)
    line = one_error_line(result)
    assert f"{run / 'results.md'}" in line and "Read-only file system" in line
    assert "| round_2 |" in result.stdout  # the table is shown even though it could not be written
    assert not (run / "figures").exists() and not (run / "results.md").exists()


def test_unwritable_figures_folder_still_writes_the_table(run):
    (run / "figures").mkdir()
    line = one_error_line(plot(run, read_only=run / "figures"))
    assert line.startswith(f"error: figures not written ({run / 'figures'}") and "Read-only file system" in line
    assert "| round_2 |" in (run / "results.md").read_text() and list((run / "figures").iterdir()) == []


def test_figures_being_a_file_still_writes_the_table(run):
    (run / "figures").write_text("not a folder")
    line = one_error_line(plot(run))
    assert line.startswith(f"error: figures not written ({run / 'figures'}: not a folder")
    assert (run / "figures").read_text() == "not a folder" and "| round_2 |" in (run / "results.md").read_text()


def test_train_log_line_without_step_is_one_line_naming_it(run):
    log = run / "round_2" / "model" / "train_log.jsonl"
    lines = log.read_text().splitlines()
    lines[1] = json.dumps({k: v for k, v in json.loads(lines[1]).items() if k != "step"})
    log.write_text("\n".join(lines) + "\n")
    assert one_error_line(plot(run)) == f"error: {log}:2: no integer 'step' (every line grpo_train.py writes has one)"


@pytest.mark.parametrize("content, where", [("[]", "holds [], not"), ("null", "holds null, not"), ('"x"', 'holds "x", not'),
                                            ('{"benchmarks": []}', "'benchmarks'"),
                                            ('{"benchmarks": {"koniq": 0.5}}', "'koniq'"),
                                            ('{"wavg": {"srcc": 0.5, "ci95": [0, 1]}}', "'wavg' 'ci95'")])
def test_summary_not_of_objects_is_one_line_naming_it(run, content, where):
    bad = run / "round_1" / "eval" / "summary.json"
    bad.write_text(content)
    line = one_error_line(plot(run))  # a whole file that is not an object: common.read_json's own line
    assert line.startswith((f"error: {bad}: {where} is not a JSON object", f"error: {bad} {where} a JSON object"))
    assert not (run / "results.md").exists()


@pytest.mark.parametrize("content", ["[]", '{"by_kind": {"random": []}}',
                                     '{"majority_agreement_histogram": {"counts": "3", "edges": [0, 1]}}'])
def test_vote_stats_not_as_written_are_one_line_naming_them(run, content):
    bad = run / "round_2" / "stats.json"
    bad.write_text(content)
    assert one_error_line(plot(run)).startswith((f"error: {bad}: ", f"error: {bad} holds"))
