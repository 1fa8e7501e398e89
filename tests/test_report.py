"""report.py: a finished evaluation's intervals against an independent bootstrap (per benchmark and WAVG), the paired
comparison of two evaluations, and the records, folders and flags it refuses with one line."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import common
import metrics
import report

ROOT = Path(__file__).resolve().parents[1]


def write_run(folder: Path, benchmarks: dict[str, tuple], labels: str = "labels-1") -> Path:
    """An evaluation folder as evaluate.py leaves it: name -> (predictions, MOS) of one benchmark each."""
    folder.mkdir(parents=True)
    for name, (pred, mos) in benchmarks.items():
        common.write_jsonl_atomic(folder / f"predictions_{name}.jsonl", [
            {"image": f"{i}.png", "mos": float(m), "score": None if p is None else float(p)}
            for i, (p, m) in enumerate(zip(pred, mos))])
    config = {"settings": {f"benchmark {name}": {"labels": labels, "split": None} for name in benchmarks},
              "sources": {name: {} for name in benchmarks}, "lower_better": []}
    (folder / "eval_config.json").write_text(json.dumps(config))
    return folder


def noisy(n: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mos = rng.uniform(1, 5, n)
    return mos + rng.normal(0, noise, n), mos


def independent_bootstrap(pred: np.ndarray, mos: np.ndarray, resamples: int, seed: int, name: str) -> dict:
    """The four metrics on each resample, one resample at a time with scipy; the logistic fitted from the data's
    starting point, NaN if it needs over 400 evaluations."""
    import zlib
    from scipy.optimize import curve_fit

    def curve(x, b1, b2, b3, b4):
        return (b1 - b2) / (1 + np.exp(-(x - b3) / np.abs(b4))) + b2
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    out = {"srcc": [], "krcc": [], "plcc": [], "plcc_logistic": []}
    for _ in range(resamples):
        i = rng.integers(0, len(pred), len(pred))
        p, m = pred[i], mos[i]
        out["srcc"].append(stats.spearmanr(p, m).statistic)
        out["krcc"].append(stats.kendalltau(p, m).statistic)
        out["plcc"].append(stats.pearsonr(p, m).statistic)
        try:
            params, _ = curve_fit(curve, p, m, p0=[m.max(), m.min(), p.mean(), p.std() / 4], maxfev=400)
            out["plcc_logistic"].append(stats.pearsonr(curve(p, *params), m).statistic)
        except RuntimeError:
            out["plcc_logistic"].append(np.nan)
    return {k: np.array(v) for k, v in out.items()}


def test_intervals_match_an_independent_bootstrap_per_benchmark_and_for_wavg(tmp_path):
    data = {"big": noisy(80, 0.7, 0), "small": noisy(40, 1.5, 1)}
    out = write_run(tmp_path / "o", data)
    summary = report.main([str(out), "--bootstrap", "200", "--bootstrap-seed", "7"])
    saved = json.loads((out / "summary.json").read_text())
    assert saved["bootstrap"] == {"resamples": 200, "seed": 7} and saved["wavg"]["ci95"] == summary["wavg"]["ci95"]
    draws = {name: independent_bootstrap(*d, 200, 7, name) for name, d in data.items()}
    for name in data:
        for key, values in draws[name].items():
            expected = np.percentile(values[np.isfinite(values)], [2.5, 97.5])
            assert saved["benchmarks"][name]["ci95"][key] == pytest.approx(expected, abs=1e-6)
            low, high = saved["benchmarks"][name]["ci95"][key]
            assert low < saved["benchmarks"][name][key] < high
    for key in draws["big"]:  # WAVG: each benchmark resampled on its own, averaged per resample by image count
        wavg = (80 * draws["big"][key] + 40 * draws["small"][key]) / 120
        assert saved["wavg"]["ci95"][key] == pytest.approx(np.percentile(wavg[np.isfinite(wavg)], [2.5, 97.5]),
                                                           abs=1e-6)
    table = (out / "summary.md").read_text()
    srcc, (low, high) = saved["benchmarks"]["big"]["srcc"], saved["benchmarks"]["big"]["ci95"]["srcc"]
    assert f"{srcc:.3f} [{low:.2f}, {high:.2f}]".replace("0.", ".") in table
    report.main([str(out), "--bootstrap", "0"])
    assert "ci95" not in json.dumps(json.loads((out / "summary.json").read_text()))


def test_compare_identical_folders_differ_by_zero(tmp_path):
    data = {"x": noisy(60, 0.8, 2), "y": noisy(30, 0.5, 3)}
    a, b = write_run(tmp_path / "a", data), write_run(tmp_path / "b", data)
    result = report.main([str(a), str(b), "--bootstrap", "200", "--out", str(tmp_path)])
    for name in ("x", "y", "WAVG"):
        row = result["benchmarks"][name]
        assert all(row["difference"][k] == 0 and row["ci95"][k] == [0, 0] and row["b_better"][k] == 0
                   for k in metrics.CI_METRICS)
    assert json.loads((tmp_path / "compare.json").read_text())["benchmarks"]["x"]["n_both"] == 60


def test_compare_against_shuffled_scores_b_is_worse_in_nearly_every_resample(tmp_path):
    data = {"x": noisy(200, 0.8, 4), "y": noisy(100, 0.8, 5)}
    a = write_run(tmp_path / "a", data)
    rng = np.random.default_rng(0)
    shuffled = {name: (rng.permutation(pred), mos) for name, (pred, mos) in data.items()}
    shuffled["x"] = ([None] * 5 + list(shuffled["x"][0][5:]), shuffled["x"][1])  # unscored in B: left out of both
    b = write_run(tmp_path / "b", shuffled)
    result = report.main([str(a), str(b), "--bootstrap", "200"])
    assert result["benchmarks"]["x"]["n_both"] == 195
    for name in ("x", "y", "WAVG"):
        row = result["benchmarks"][name]
        for k in metrics.CI_METRICS:
            assert row["b_better"][k] <= 0.01 and row["ci95"][k][1] < 0 and row["difference"][k] < -0.3


def test_compare_refuses_other_benchmarks_or_label_files(tmp_path, capsys):
    data = {"x": noisy(20, 0.8, 6)}
    a = write_run(tmp_path / "a", data)
    others = [write_run(tmp_path / "b", {**data, "z": noisy(20, 0.8, 7)}), write_run(tmp_path / "c", data, "labels-2")]
    for other, message in zip(others, ["only in " + str(tmp_path / "b") + ": ['z']", "label files"]):
        with pytest.raises(SystemExit) as e:
            report.main([str(a), str(other)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "'x'" in err or "['z']" in err


# ---------------------------------------------------------------------------------------------------------------------
# refused with one line naming the file and line: records the metrics cannot use, runaway flags
# ---------------------------------------------------------------------------------------------------------------------


def refused(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        report.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    return err


BAD_RECORDS = [  # (the 3rd line of predictions_x.jsonl, what the error says)
    ({"mos": 2.0, "score": 3.0}, 'expected a prediction {"image": name, "mos": finite number'),
    ({"image": "2.png", "score": 3.0}, 'expected a prediction {"image": name, "mos": finite number'),
    ({"image": "2.png", "mos": "high", "score": 3.0}, 'expected a prediction {"image": name, "mos": finite number'),
    ({"image": "2.png", "mos": 2.0, "score": [3.0, 4.0]}, "the score of '2.png' must be a finite number or null"),
    ({"image": "2.png", "mos": 2.0, "score": "3.0"}, "the score of '2.png' must be a finite number or null"),
    ({"image": "2.png", "mos": 2.0, "score": math.nan}, "the score of '2.png' must be a finite number or null, got nan"),
    ({"image": "2.png", "mos": 2.0, "score": -math.inf}, "the score of '2.png' must be a finite number or null"),
    ({"image": "2.png", "mos": math.inf, "score": 3.0}, 'expected a prediction {"image": name, "mos": finite number'),
    ({"image": "2.png", "mos": 2.0, "score": 3.0, "truncated": "no"}, "'truncated' must be a list of true/false"),
    ({"image": "0.png", "mos": 2.0, "score": 3.0}, "a second prediction for '0.png' (the first on line 1)"),
]


@pytest.mark.parametrize("bad,message", BAD_RECORDS)
def test_bad_prediction_records_are_refused_naming_file_and_line(tmp_path, capsys, bad, message):
    data = {"x": noisy(20, 0.8, 8)}
    a, b = write_run(tmp_path / "a", data), write_run(tmp_path / "b", data)
    path = b / "predictions_x.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = json.dumps(bad)  # json writes NaN and Infinity, and reads them back
    path.write_text("\n".join(lines) + "\n")
    for argv in ([str(b)], [str(a), str(b)]):  # one folder's summary, and a comparison: no interval over a NaN
        assert refused(capsys, argv).startswith(f"error: {path}:3: {message}")
    assert not (b / "summary.json").exists()


def test_refusals_are_one_line_without_a_traceback(tmp_path):
    folder = write_run(tmp_path / "a", {"x": noisy(10, 0.8, 9)})
    with open(folder / "predictions_x.jsonl", "a") as f:
        f.write(json.dumps({"image": "0.png", "mos": 1.0, "score": None}) + "\n")
    run = subprocess.run([sys.executable, "report.py", str(folder)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [f"error: {folder / 'predictions_x.jsonl'}:11: a second prediction for "
                                               "'0.png' (the first on line 1); one per image"]


def test_runaway_bootstrap_and_misused_flags_are_refused(tmp_path, capsys):
    data = {"x": noisy(20, 0.8, 10)}
    a, b = write_run(tmp_path / "a", data), write_run(tmp_path / "b", data)
    for argv in ([str(a), "--bootstrap", "1000000000"], [str(a), str(b), "--bootstrap", "100001"],
                 [str(a), "--bootstrap", "-1"]):
        assert "the resamples must be between 0 (no intervals) and 100,000" in refused(capsys, argv)
    assert "--out applies to a comparison" in refused(capsys, [str(a), "--out", str(tmp_path)])
    assert "needs --bootstrap >= 1" in refused(capsys, [str(a), str(b), "--bootstrap", "0"])
    assert "give one evaluation folder, or two" in refused(capsys, [str(a), str(b), str(a)])
    assert "no predictions_*.jsonl files" in refused(capsys, [str(tmp_path)])
    (a / "eval_config.json").write_text("[]")
    assert "eval_config.json holds [], not a JSON object" in refused(capsys, [str(a)])
    assert report.main([str(b), "--bootstrap", str(metrics.MAX_RESAMPLES // 1000)])["bootstrap"]["resamples"] == 100
