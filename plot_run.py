"""Figures of one run of run_evolution.sh, written to OUT/figures/ (matplotlib: the only file that needs it).

    python plot_run.py runs/demo

- training.png: per round, the GRPO curves against the step (OUT/round_t/model/train_log.jsonl);
- correlations.png: SRCC and PLCC per benchmark and WAVG across rounds, with their 95 % bootstrap intervals where
  summary.json has them (OUT/round_t/eval/summary.json);
- votes.png: per round, how the K votes agreed (OUT/round_t/stats.json, written by build_pseudolabels.py).
A figure whose files are all absent is not written. Round t has the same colour in every figure.
Without matplotlib it prints a one-line hint and exits 0: the figures are a view of the run, not part of it.
"""

from __future__ import annotations

import argparse
import math
import re
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
    for t, d in round_dirs(out).items():
        try:
            records = common.read_jsonl(d / "model" / "train_log.jsonl")
        except ValueError as e:
            common.die(str(e))
        keys = [k for k, _, _ in TRAINING_PANELS] + [k for k, _, _ in TIME_KEYS]
        if records and not any(k in r for r in records for k in keys):
            print(f"plot_run.py: skipping {d / 'model' / 'train_log.jsonl'}: none of the plotted keys ({keys[0]}, ...)")
        elif records:
            logs[t] = records
    return logs


def load_summaries(out: Path) -> dict[int, dict]:
    """{t: OUT/round_t/eval/summary.json} for the rounds that have one."""
    return {t: common.read_json(d / "eval" / "summary.json") for t, d in round_dirs(out).items()
            if (d / "eval" / "summary.json").exists()}


def load_vote_stats(out: Path) -> dict[int, dict]:
    """{t: OUT/round_t/stats.json} (build_pseudolabels.py --stats) for the rounds that have one."""
    return {t: common.read_json(d / "stats.json") for t, d in round_dirs(out).items() if (d / "stats.json").exists()}


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
# TRY NOT TO MODIFY: main
# ---------------------------------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the run's folder (run_evolution.sh's OUT)")
    out = Path(parser.parse_args(argv).out)
    if plt is None:
        print("plot_run.py: matplotlib is not installed, so no figures were written (pip install matplotlib)")
        return []
    if not out.is_dir():
        common.die(f"{out}: no such run folder")
    figures = {"training": (plot_training, load_train_logs(out)), "correlations": (plot_correlations,
               load_summaries(out)), "votes": (plot_votes, load_vote_stats(out))}
    (out / "figures").mkdir(exist_ok=True)
    written = []
    for name, (plot, data) in figures.items():
        if data:
            fig = plot(data)
            path = out / "figures" / f"{name}.png"
            fig.savefig(f"{path}.tmp.png", dpi=80)
            Path(f"{path}.tmp.png").replace(path)
            plt.close(fig)
            written.append(path)
    print("figures: " + (", ".join(map(str, written)) or f"none (no training logs, summaries or vote stats in {out})"))
    return written


if __name__ == "__main__":
    main()
