"""Reports from finished evaluations, no model: an evaluation's metrics and 95 % intervals recomputed from its saved
predictions, or two evaluations of the same benchmarks compared (B - A with a paired bootstrap over the images both
scored). The numbers are metrics.py's, as evaluate.py reports them (paper: Experiments, SRCC / PLCC and WAVG).

    python report.py runs/eval                                       # summary.json and summary.md again
    python report.py runs/eval_round1 runs/eval_round2 [--out DIR]    # B - A; compare.json and compare.md in DIR

Each prediction line must be {"image": name, "mos": finite number, "score": finite number or null, ...}, one per
image; anything else is refused with its file and line.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

import common
import metrics
from metrics import CI_METRICS


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: the paired comparison (both evaluations on the same resampled images)
# ---------------------------------------------------------------------------------------------------------------------


def compare_benchmark(name: str, a: list[dict], b: list[dict], lower_better: bool, resamples: int, seed: int
                      ) -> tuple[dict, dict[str, np.ndarray]]:
    """A and B on the images both scored: each metric, B - A, its paired bootstrap interval (the same resampled
    images for both) and the share of resamples in which B is better; with the (resamples,) differences."""
    scored_a = {r["image"]: r for r in a if r.get("score") is not None}
    both = [r for r in b if r.get("score") is not None and r["image"] in scored_a]
    if len(both) < 3:
        warnings.warn(f"{name}: {len(both)} images scored in both folders (need >= 3); its differences are NaN")
        nan = {key: math.nan for key in CI_METRICS}
        return ({"n_both": len(both), "a": nan, "b": nan, "difference": nan}, {key: np.full(resamples, math.nan)
                                                                            for key in CI_METRICS})
    ya, yb = metrics.scored([scored_a[r["image"]] for r in both], lower_better), metrics.scored(both, lower_better)
    row = {"n_both": len(both), "a": {k: metrics.METRICS[k](*ya) for k in CI_METRICS},
           "b": {k: metrics.METRICS[k](*yb) for k in CI_METRICS}}
    row["difference"] = {k: row["b"][k] - row["a"][k] for k in CI_METRICS}
    da, db = metrics.bootstrap(*ya, resamples, seed, name), metrics.bootstrap(*yb, resamples, seed, name)
    return row, {k: db[k] - da[k] for k in CI_METRICS}


def compare_runs(a: Path, b: Path, resamples: int, seed: int, out: Optional[Path]) -> dict:
    """A B: per benchmark and WAVG, B - A of each metric with its paired 95 % bootstrap interval and the
    share of resamples where B is better. WAVG weights each benchmark by its image count, as summary.json does."""
    (config_a, runs_a), (config_b, runs_b) = read_run(a), read_run(b)
    same_benchmarks(a, b, config_a, config_b, list(runs_a), list(runs_b))
    rows, draws = {}, {}
    for name in runs_a:
        rows[name], draws[name] = compare_benchmark(name, runs_a[name], runs_b[name],
                                                    name in config_a.get("lower_better", []), resamples, seed)
    weights = {name: len(records) for name, records in runs_a.items()}
    total, wavg_draws = sum(weights.values()), metrics.weighted_draws(draws, weights)
    rows["WAVG"] = {"n_both": sum(r["n_both"] for r in rows.values()), **{
        side: {k: sum(weights[n] * rows[n][side][k] for n in runs_a) / total for k in CI_METRICS}
        for side in ("a", "b", "difference")}}
    for name, d in [*draws.items(), ("WAVG", wavg_draws)]:
        rows[name]["ci95"] = {k: metrics.interval(v, f"{name} {k} difference") for k, v in d.items()}
        rows[name]["b_better"] = {k: float(np.mean(v[np.isfinite(v)] > 0)) if np.isfinite(v).any() else math.nan
                                  for k, v in d.items()}
    result = {"a": str(a), "b": str(b), "bootstrap": {"resamples": resamples, "seed": seed}, "benchmarks": rows}
    lines = [f"B - A, A = {a}, B = {b}; 95 % paired bootstrap interval over the images both scored "
             f"({resamples} resamples, seed {seed})", "", "| benchmark | n both | metric | A | B | B - A | B better |",
             "|---|--:|---|--:|--:|--:|--:|"]
    for name, r in rows.items():
        lines += [f"| {name} | {r['n_both']} | {k} | {metrics.cell(r['a'][k])} | {metrics.cell(r['b'][k])} | "
                  f"{metrics.cell(r['difference'][k], *r['ci95'][k], digits=3)} | {metrics.cell(r['b_better'][k])} |"
                  for k in CI_METRICS]
    if out is not None:
        common.write_json_atomic(out / "compare.json", metrics.json_safe(result))
        common.write_lines_atomic(out / "compare.md", [line + "\n" for line in lines])
    print("\n".join(lines))
    return result


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: reading an evaluation folder (every prediction checked)
# ---------------------------------------------------------------------------------------------------------------------


def check_prediction(path: Path, lineno: int, record: dict, seen: dict[str, int]) -> None:
    """One line naming file:line for a record the metrics cannot use as it is."""
    image, mos, score = record.get("image"), record.get("mos"), record.get("score")

    def number(x) -> bool:
        return type(x) in (int, float) and math.isfinite(x)
    if not (isinstance(image, str) and image and number(mos)):
        common.die(f'{path}:{lineno}: expected a prediction {{"image": name, "mos": finite number, "score": ...}}, '
                   f"got {str(record)[:200]}")
    if score is not None and not number(score):
        common.die(f"{path}:{lineno}: the score of {image!r} must be a finite number or null, got {score!r}")
    truncated = record.get("truncated", [])
    if not (isinstance(truncated, list) and all(type(t) is bool for t in truncated)):
        common.die(f"{path}:{lineno}: 'truncated' must be a list of true/false, got {truncated!r}")
    if image in seen:
        common.die(f"{path}:{lineno}: a second prediction for {image!r} (the first on line {seen[image]}); one per "
                   "image")
    seen[image] = lineno


def read_predictions(path: Path) -> list[dict]:
    try:
        records = common.read_jsonl(path, with_lineno=True)
    except ValueError as e:
        common.die(str(e))
    seen: dict[str, int] = {}
    for lineno, record in records:
        check_prediction(path, lineno, record, seen)
    return [record for _, record in records]


def read_run(out: Path) -> tuple[dict, dict[str, list[dict]]]:
    """(eval_config.json or {}, benchmark name -> its merged predictions in the run's order) of an evaluation folder."""
    files = sorted(out.glob("predictions_*.jsonl"))
    if not files:
        common.die(f"{out}: no predictions_*.jsonl files there (an evaluate.py --bench output folder?)")
    config = common.read_json(out / "eval_config.json") if (out / "eval_config.json").exists() else {}
    names = [f.name[len("predictions_"):-len(".jsonl")] for f in files]
    known = [n for n in config.get("sources", {}) if n in names]  # the live run's order first
    order = known + [n for n in names if n not in known]
    for name in order:
        if common.shard_files(out / f"predictions_{name}.jsonl"):
            warnings.warn(f"{name}: shard files of an unfinished run are ignored; rerun the evaluation to merge them")
    return config, {name: read_predictions(out / f"predictions_{name}.jsonl") for name in order}


def same_benchmarks(a: Path, b: Path, config_a: dict, config_b: dict, names_a: list[str], names_b: list[str]) -> None:
    """Die unless both folders scored the same benchmarks from the same label files (content, split, direction)."""
    if set(names_a) != set(names_b):
        common.die(f"the folders hold other benchmarks: only in {a}: {sorted(set(names_a) - set(names_b))}"
                   f", only in {b}: {sorted(set(names_b) - set(names_a))}")
    for folder, config in ((a, config_a), (b, config_b)):
        if "settings" not in config:
            common.die(f"{folder} has no eval_config.json: its label files cannot be checked")

    def labels(config: dict, name: str) -> tuple:
        setting = config["settings"].get(f"benchmark {name}", {})
        return setting.get("labels"), setting.get("split"), name in config.get("lower_better", [])
    differ = [name for name in names_a if labels(config_a, name) != labels(config_b, name)]
    if differ:
        common.die(f"the label files (or --split, or the direction) of {differ} differ between {a} and {b}")


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: the command line
# ---------------------------------------------------------------------------------------------------------------------


def recompute(out: Path, lower_better: list[str], resamples: int, seed: int) -> dict:
    """summary.json and summary.md of one evaluation folder, from its predictions_*.jsonl; the setup and the
    lower-is-better benchmarks as the evaluation recorded them, unless given."""
    config, predictions = read_run(out)
    with common.output_lock(out):  # not while a run writes into the folder
        return metrics.write_summary(out, config, predictions, lower_better or config.get("lower_better", []),
                                     resamples, seed)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="OUT", help="an evaluation folder (its summary again), or two: A B")
    parser.add_argument("--out", default="", help="with two folders: also write compare.json and compare.md here")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples of the images for the 95 %% intervals "
                        f"(0: none; at most {metrics.MAX_RESAMPLES:,})")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap resamples")
    parser.add_argument("--lower-better", nargs="+", action="extend", default=[], help="one folder: benchmarks whose "
                        "labels are lower-is-better (default: as the evaluation recorded)")
    args = parser.parse_args(argv)
    metrics.check_resamples(args.bootstrap)
    if len(args.runs) > 2:
        common.die(f"give one evaluation folder, or two to compare, not {len(args.runs)}")
    if len(args.runs) == 1:
        if args.out:
            common.die("--out applies to a comparison: one folder's summary is written in that folder")
        return recompute(Path(args.runs[0]), args.lower_better, args.bootstrap, args.bootstrap_seed)
    if args.bootstrap < 1 or args.lower_better:
        common.die("a comparison needs --bootstrap >= 1 and takes the direction each evaluation recorded "
                   "(no --lower-better)")
    a, b = map(Path, args.runs)
    return compare_runs(a, b, args.bootstrap, args.bootstrap_seed, Path(args.out) if args.out else None)


if __name__ == "__main__":
    common.run_main(main)
