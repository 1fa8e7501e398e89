"""The results of one run of run_evolution.sh: its table and its figures.

    python plot_run.py runs/demo

The table (SRCC and PLCC per benchmark and WAVG, one row per round, from OUT/round_t/eval/summary.json) is printed
and written to OUT/results.md (with links to the figures) and OUT/results.json (every round's summary). The figures
go to OUT/figures/ when matplotlib is installed (the only file that needs it; without it a one-line hint, exit 0):
- training.png: per round, the GRPO curves against the step (OUT/round_t/model/train_log.jsonl);
- correlations.png: SRCC and PLCC per benchmark and WAVG across rounds, with their 95 % bootstrap intervals where
  summary.json has them (OUT/round_t/eval/summary.json);
- votes.png: per round, how the K votes agreed (OUT/round_t/stats.json, written by build_pseudolabels.py).
A figure whose files are all absent is not written. Round t has the same colour in every figure. A summary, stats
file or log line that is not what the stages write, or an output that cannot be written, is one line naming the file
(exit 2); the table is still written when only the figures fail.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Optional

import common

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
except ImportError:
    plt = None

# (train_log.jsonl key, panel title, y-axis label): one idea per panel
TRAINING_PANELS = [
    ("reward/mean", "Fidelity reward, mean over completions", "reward (0 to 1)"),
    ("reward/std", "Fidelity reward, std over completions", "reward (0 to 1)"),
    ("reward/zero_std_fraction", "Groups without signal (all rewards equal)", "fraction of groups"),
    ("kl/mean", "KL to the reference (k3 estimate)", "nats per token"),
    ("loss/clip_fraction", "Clipped tokens (PPO ratio outside 1 ± eps)", "fraction of tokens"),
    ("rollout/score_within_group_std", "Spread of the G scores of one image", "score std (1 to 5 scale)"),
    ("rollout/parse_failure_rate", "Completions without a parsable score", "fraction of completions"),
    ("rollout/truncation_rate", "Completions cut off by --max-new-tokens", "fraction of completions"),
    ("rollout/completion_length", "Completion length", "tokens per completion"),
]
TIME_KEYS = [("time/generation", "generation", "-"), ("time/reference", "log-probs", "--"),
             ("time/update", "update", ":")]
METRICS = [("srcc", "SRCC"), ("plcc", "PLCC")]
KIND_STYLES = {"all": "-", "random": "-", "same_reference": "--"}  # stats.json's by_kind: how a pair was drawn


def colour(t: int) -> str:
    """Round t's colour in every figure."""
    return f"C{t % 10}"


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: reading the run (one function per source)
# ---------------------------------------------------------------------------------------------------------------------


def round_dirs(out: Path) -> dict[int, Path]:
    """{t: OUT/round_t} for every round folder, in round order."""
    found = [(int(m.group(1)), p) for p in out.glob("round_*") if (m := re.fullmatch(r"round_(\d+)", p.name))]
    return dict(sorted(found))


def load_train_logs(out: Path) -> dict[int, list[dict]]:
    """{t: the records of OUT/round_t/model/train_log.jsonl} for the rounds that have one."""
    logs = {}
    keys = [k for k, _, _ in TRAINING_PANELS] + [k for k, _, _ in TIME_KEYS]
    for t, d in round_dirs(out).items():
        path = d / "model" / "train_log.jsonl"
        try:
            records = common.read_jsonl(path, with_lineno=True)
        except ValueError as e:
            common.die(str(e))
        for lineno, r in records:
            if not (isinstance(r.get("step"), int) and not isinstance(r["step"], bool)):
                common.die(f"{path}:{lineno}: no integer 'step' (every line grpo_train.py writes has one)")
        records = [r for _, r in records]
        if records and not any(k in r for r in records for k in keys):
            print(f"plot_run.py: skipping {path}: none of the plotted keys ({keys[0]}, ...)")
        elif records:
            logs[t] = records
    return logs


def objects(path: Path, value: Any, where: str) -> dict:
    """`value` if it is a JSON object; else a one-line error naming the file and the key where it is nested (a whole
    file that is not an object is common.read_json's error)."""
    if not isinstance(value, dict):
        common.die(f"{path}: {where} is not a JSON object ({type(value).__name__}); it was not "
                   "written by the stages: delete it, or rerun the stage that writes it")
    return value


def load_summaries(out: Path) -> dict[int, dict]:
    """{t: OUT/round_t/eval/summary.json} for the rounds that have one, checked to hold the objects read here."""
    summaries = {}
    for t, d in round_dirs(out).items():
        path = d / "eval" / "summary.json"
        if path.exists():
            summary = common.read_json(path)
            parts = {**objects(path, summary.get("benchmarks", {}), "'benchmarks'"),
                     "wavg": objects(path, summary.get("wavg", {}), "'wavg'")}
            for name, values in parts.items():
                objects(path, values, f"'{name}'")
                objects(path, values.get("ci95") or {}, f"'{name}' 'ci95'")
            summaries[t] = summary
    return summaries


def load_vote_stats(out: Path) -> dict[int, dict]:
    """{t: OUT/round_t/stats.json} (build_pseudolabels.py --stats) for the rounds that have one, checked likewise."""
    stats = {}
    for t, d in round_dirs(out).items():
        path = d / "stats.json"
        if path.exists():
            s = common.read_json(path)
            for kind, part in objects(path, s.get("by_kind") or {}, "'by_kind'").items():
                objects(path, part, f"'by_kind' '{kind}'")
            for part in [s, *(s.get("by_kind") or {}).values()]:
                hist = objects(path, part.get("majority_agreement_histogram") or {}, "'majority_agreement_histogram'")
                if hist and not all(isinstance(hist.get(k), list) and all(map(finite, hist[k]))
                                    for k in ("counts", "edges")):
                    common.die(f"{path}: 'majority_agreement_histogram' needs number lists 'counts' and 'edges'")
            stats[t] = s
    return stats


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: the figures (each artist's gid names its round and series, so tests can compare it with the logs)
# ---------------------------------------------------------------------------------------------------------------------


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def curve(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one train_log key, leaving out the steps where it is null or absent."""
    points = [(r["step"], r[key]) for r in records if finite(r.get(key))]
    return [s for s, _ in points], [v for _, v in points]


def round_legend(fig, rounds: list[int], label: str = "round {t}") -> None:
    handles = [plt.Line2D([], [], color=colour(t), marker="o", label=label.format(t=t)) for t in rounds]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), frameon=False)


def plot_training(logs: dict[int, list[dict]]):
    """One panel per metric of TRAINING_PANELS, plus the step-time split; one curve per round."""
    fig, axes = plt.subplots(2, 5, figsize=(24, 9), constrained_layout=True)
    fig.get_layout_engine().set(rect=(0, 0, 1, 0.95))
    for ax, (key, title, unit) in zip(axes.flat, TRAINING_PANELS):
        for t, records in logs.items():
            ax.plot(*curve(records, key), color=colour(t), marker=".", gid=f"round_{t}:{key}")
        ax.set(title=title, xlabel="GRPO step", ylabel=unit)
        if unit.startswith("fraction"):  # from 0, with room to see a rate that stays at 0
            top = max(ax.get_ylim()[1], 0.05)
            ax.set_ylim(-0.03 * top, top)
    ax = axes.flat[len(TRAINING_PANELS)]
    for t, records in logs.items():
        for key, _, style in TIME_KEYS:
            ax.plot(*curve(records, key), color=colour(t), linestyle=style, gid=f"round_{t}:{key}")
    ax.legend(handles=[plt.Line2D([], [], color="k", linestyle=s, label=name) for _, name, s in TIME_KEYS],
              title="phase (slowest process)", fontsize="small")
    ax.set(title="Where a step's time goes", xlabel="GRPO step", ylabel="seconds per step")
    for ax in axes.flat:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    round_legend(fig, list(logs))
    return fig


def plot_correlations(summaries: dict[int, dict]):
    """One panel per metric: a point per benchmark (and WAVG) and round, with its 95 % interval where recorded."""
    names = sorted({n for s in summaries.values() for n in s.get("benchmarks", {})}) + ["WAVG"]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(2 * max(6, 1 + 1.2 * len(names)), 5.5), constrained_layout=True)
    fig.get_layout_engine().set(rect=(0, 0, 1, 0.88))
    width = 0.7 / max(1, len(summaries))
    for ax, (metric, title) in zip(axes, METRICS):
        for j, (t, summary) in enumerate(summaries.items()):
            for i, name in enumerate(names):
                values = summary.get("wavg", {}) if name == "WAVG" else summary.get("benchmarks", {}).get(name, {})
                y, ci = values.get(metric), (values.get("ci95") or {}).get(metric)
                if not finite(y):
                    continue
                x = i + (j - (len(summaries) - 1) / 2) * width
                ax.plot([x], [y], "o", color=colour(t), gid=f"round_{t}:{name}")
                if ci and all(map(finite, ci)):  # drawn as recorded: a percentile interval may miss the point
                    ax.vlines([x], ci[0], ci[1], color=colour(t), gid=f"round_{t}:{name}:ci95")
        ax.set_xticks(range(len(names)), names)
        ax.set(title=f"{title} with the MOS", xlabel="benchmark", ylabel=f"{title} (-1 to 1)")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Correlation per benchmark and round (vertical line: 95 % bootstrap interval over the images)")
    round_legend(fig, list(summaries))
    fig.legends[0].set_bbox_to_anchor((0.5, 0.955))
    return fig


def plot_votes(stats: dict[int, dict]):
    """Agreement histogram (share of pairs per bin; per kind of pair where a round has several) and one bar per round
    for position bias, ties, abstentions."""
    fig, axes = plt.subplots(1, 4, figsize=(22, 5), constrained_layout=True)
    fig.get_layout_engine().set(rect=(0, 0, 1, 0.9))
    ax = axes[0]
    for t, s in stats.items():
        parts = s["by_kind"] if len(s.get("by_kind") or {}) > 1 else {"all": s}
        for kind, part in parts.items():
            hist = part.get("majority_agreement_histogram")
            if hist and sum(hist["counts"]):
                shares = [c / sum(hist["counts"]) for c in hist["counts"]]
                ax.stairs(shares, hist["edges"], color=colour(t), linewidth=2, linestyle=KIND_STYLES.get(kind, ":"),
                          gid=f"round_{t}:agreement:{kind}")
    if any(len(s.get("by_kind") or {}) > 1 for s in stats.values()):
        ax.legend(handles=[plt.Line2D([], [], color="k", linestyle=KIND_STYLES[k], label=k.replace("_", "-") + " pairs")
                           for k in ("random", "same_reference")], fontsize="small")
    ax.set(title="Majority agreement of a pair's votes", xlabel="max(K_a, K_b) / (K_a + K_b)",
           ylabel="share of pairs with a valid vote")
    bars = [("first_slot_win_rate", "Position bias: first image shown wins", "share of valid votes", 0.5),
            ("tie_rate", "Tied pairs (K_a = K_b, p* = 0.5)", "share of pairs with a valid vote", None),
            ("abstention_rate", "Abstentions (unparsed or cut off)", "share of votes", None)]
    for ax, (key, title, unit, reference) in zip(axes[1:], bars):
        for t, s in stats.items():
            if finite(s.get(key)):
                bars = ax.bar([t], [s[key]], width=0.6, color=colour(t), gid=f"round_{t}:{key}")
                ax.bar_label(bars, fmt="%.3f")  # a zero rate shows as 0.000, not as nothing
        ax.set_ylim(bottom=0)
        if reference is not None:
            ax.axhline(reference, color="k", linestyle="--", linewidth=1, label="no bias")
            ax.legend(fontsize="small", loc="lower right")
            ax.set_ylim(0, 1)
        ax.set_xticks(list(stats), [f"round {t}" for t in stats])
        ax.set_xlim(min(stats) - 1, max(stats) + 1)
        ax.set(title=title, xlabel="round", ylabel=unit)
    round_legend(fig, list(stats))
    return fig


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: the results table, writing, main
# ---------------------------------------------------------------------------------------------------------------------


def results_table(summaries: dict[int, dict]) -> str:
    """The markdown table: one row per round, SRCC and PLCC per benchmark and WAVG ("-" where undefined)."""
    names = sorted({n for s in summaries.values() for n in s.get("benchmarks", {})})
    fmt = lambda v: f"{v:.3f}" if finite(v) else "-"  # noqa: E731
    rows = ["| round | " + " | ".join(f"{n} SRCC | {n} PLCC" for n in names + ["WAVG"]) + " |",
            "|" + "---|" * (1 + 2 * (len(names) + 1))]
    for t, s in summaries.items():
        parts = [s.get("benchmarks", {}).get(n, {}) for n in names] + [s.get("wavg", {})]
        cells = [f"{fmt(v.get('srcc'))} | {fmt(v.get('plcc'))}" for v in parts]
        rows.append(f"| round_{t} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_results(out: Path, summaries: dict[int, dict]) -> None:
    """OUT/results.md (the table, then links to the figures there are) and OUT/results.json; the table printed."""
    table = results_table(summaries)
    links = [f"![{name}](figures/{name}.png)" for name in ("correlations", "training", "votes")
             if (out / "figures" / f"{name}.png").is_file()]
    try:
        common.write_lines_atomic(out / "results.md", [table + "\n" + "".join(f"\n{link}\n" for link in links)])
        common.write_json_atomic(out / "results.json", {f"round_{t}": s for t, s in summaries.items()})
    except OSError as e:
        print(table)
        common.die(f"{e.filename or out}: {e.strerror}; the table above was not written: fix the folder, then rerun "
                   f"plot_run.py")
    print(table)
    print(f"written: {out / 'results.md'}, {out / 'results.json'}")


def draw_figures(out: Path, summaries: dict[int, dict]) -> list[Path]:
    """OUT/figures/NAME.png for every figure that has data; each written to a new temporary file, then renamed."""
    figures = {"training": (plot_training, load_train_logs(out)), "correlations": (plot_correlations, summaries),
               "votes": (plot_votes, load_vote_stats(out))}
    folder = out / "figures"
    if folder.exists() and not folder.is_dir() or folder.is_symlink():
        raise NotADirectoryError(errno.ENOTDIR, "not a folder (a file or link is in its place)", str(folder))
    folder.mkdir(exist_ok=True)
    written = []
    for name, (plot, data) in figures.items():
        if data:
            fig = plot(data)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{name}.", suffix=".png", delete=False) as f:
                try:
                    fig.savefig(f, format="png", dpi=80)
                except OSError:
                    os.unlink(f.name)
                    raise
            plt.close(fig)
            os.chmod(f.name, 0o644)  # readable like any output (a temporary file starts private)
            Path(f.name).replace(folder / f"{name}.png")
            written.append(folder / f"{name}.png")
    return written


def main(argv: Optional[list[str]] = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the run's folder (run_evolution.sh's OUT)")
    out = Path(parser.parse_args(argv).out)
    if not out.is_dir():
        common.die(f"{out}: no such run folder")
    try:
        summaries, written, failed = load_summaries(out), [], None
        if plt is None:
            print("plot_run.py: matplotlib is not installed, so no figures were written (pip install matplotlib)")
        else:
            try:
                written = draw_figures(out, summaries)
                print("figures: " + (", ".join(map(str, written))
                                     or f"none (no training logs, summaries or vote stats in {out})"))
            except OSError as e:  # the table is still written
                failed = f"{e.filename or out / 'figures'}: {e.strerror}"
    except OSError as e:  # reading: a file the stages write is a folder, unreadable, ...
        common.die(f"{e.filename or out}: {e.strerror}")
    if summaries:
        write_results(out, summaries)
    if failed:
        common.die(f"figures not written ({failed}); fix the folder, then rerun plot_run.py")
    return written


if __name__ == "__main__":
    common.run_main(main)
