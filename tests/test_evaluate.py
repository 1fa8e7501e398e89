"""evaluate.py: bad input, resume, the one truncation rule, reruns refused by setting (model identity, label content),
--images scoring, and end-to-end runs on the tiny model (one process, and two under torchrun) checked against plain
`generate`. The metrics are metrics.py's (test_metrics.py), the benchmark files benchmarks.py's (test_benchmarks.py),
the reports of a finished evaluation report.py's (test_report.py)."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import common
import prompts
import sampling
import benchmarks
import evaluate
import metrics
import report

ROOT = Path(__file__).resolve().parents[1]
# Subprocess runs stay on CPU even on a GPU machine: torchrun's 2 processes would otherwise ask for 2 GPUs.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "CUDA_VISIBLE_DEVICES": ""}


# ---------------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------------


def test_repeated_list_flags_accumulate():
    argv = ["--bench", "a=x", "--out", "o", "--bench=b=y", "--bench", "c=z", "--lower-better", "a", "--no-text"]
    args = common.parse_args(evaluate.Args, argv)
    assert args.bench == ["a=x", "b=y", "c=z"] and args.lower_better == ["a"] and args.out == "o" and not args.text


def test_user_errors_exit_2_without_traceback(tmp_path, demo_bench):
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"image": "bench_00000.png", "mos": 3}\n{"image": "bench_00000.png", "mos": 2}\n')
    cmd = [sys.executable, "evaluate.py", "--model", "none", "--out", str(tmp_path / "o"),
           "--bench", f"dup={dup}@{demo_bench}"]
    run = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert run.returncode == 2 and "dup.jsonl:1 and" in run.stderr and "Traceback" not in run.stderr
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"image": "bench_00000.png", "mos": 3}\n{"image": "nowhere.png", "mos": 2}\n')
    run = subprocess.run(cmd[:-1] + [f"m={missing}@{demo_bench}", "--strict"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True)
    assert run.returncode == 2 and "nowhere.png" in run.stderr and "Traceback" not in run.stderr


# ---------------------------------------------------------------------------------------------------------------------
# the pipeline in process, with a deterministic stand-in for the model's answers (a random tiny model never answers)
# ---------------------------------------------------------------------------------------------------------------------


def fake_answers(calls):
    """Answers that depend on the image: a score from its pixel spread; of the 12 demo images, 2 get no answer and
    1 gets a closed box cut off by the token budget (truncated: unparseable)."""
    def sample_answers(model, processor, images, names, prompt, preset, args):
        calls.append(len(images))
        out = []
        for image in images:
            spread = float(np.asarray(image, dtype=float).std())
            text, truncated = f"<think>ok</think> \\boxed{{{1 + spread / 30:.2f}}}", False
            if int(spread) % 4 == 1:
                text = "<think>hm</think> no idea"
            elif int(spread) % 7 == 3:
                text, truncated = f"\\boxed{{{1 + spread / 30:.2f}}}. Wait, let me reconsider", True
            out.append([sampling.Completion(text, truncated)] * args.samples)
        return out
    return sample_answers


@pytest.fixture
def bench_with_a_gap(tmp_path, demo_bench):
    """The 12 demo images plus one listed image that does not exist."""
    lines = (demo_bench / "labels.jsonl").read_text().splitlines()
    path = tmp_path / "labels.jsonl"
    path.write_text("\n".join(lines + ['{"image": "lost.png", "mos": 2.5}']) + "\n")
    return path


def run_eval(monkeypatch, calls, tiny_model_dir, bench, root, out, *extra):
    monkeypatch.setattr(evaluate, "sample_answers", fake_answers(calls))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return evaluate.main(["--model", tiny_model_dir, "--bench", f"demo={bench}@{root}", "--bench",
                              f"again={bench}@{root}", "--out", str(out), "--batch-size", "5",
                              "--max-new-tokens", "4", "--bootstrap", "100", *extra])


def test_live_run_predictions_recompute_and_lower_better(monkeypatch, tmp_path, tiny_model_dir, demo_bench,
                                                         bench_with_a_gap):
    calls = []
    summary = run_eval(monkeypatch, calls, tiny_model_dir, bench_with_a_gap, demo_bench, tmp_path / "o",
                       "--lower-better", "again", "--no-text")
    records = common.read_jsonl(tmp_path / "o" / "predictions_demo.jsonl")
    assert [r["image"] for r in records] == [e["image"] for e in benchmarks.read_benchmark(bench_with_a_gap)[0]]
    assert records[-1] == {"image": "lost.png", "mos": 2.5, "score": None, "n_valid": 0, "file": None,
                           "error": "missing file"}
    assert all("answers" not in r for r in records)  # --no-text
    valid = [r for r in records if r["score"] is not None]
    demo = summary["benchmarks"]["demo"]
    assert (demo["n"], demo["missing"], demo["missing_images"]) == (13, 1, ["lost.png"])
    assert demo["n_valid"] == 8 and demo["coverage"] == pytest.approx(8 / 13)
    # the truncated answers hold a closed box, yet score nothing (the one truncation rule), and are counted
    cut = [r for r in records if any(r.get("truncated", []))]
    assert len(cut) == 2
    assert all(r["score"] is None and r["scores"] == [None] for r in cut)
    assert demo["truncation_rate"] == pytest.approx(2 / 12)
    pred, mos = [r["score"] for r in valid], [r["mos"] for r in valid]
    assert demo["srcc"] == pytest.approx(stats.spearmanr(pred, mos).statistic)
    assert demo["plcc"] == pytest.approx(stats.pearsonr(pred, mos).statistic)
    again = summary["benchmarks"]["again"]
    assert again["srcc"] == pytest.approx(-demo["srcc"]) and again["plcc"] == pytest.approx(-demo["plcc"])
    assert summary["wavg"]["srcc"] == pytest.approx(0.0, abs=1e-12)  # equal sizes, opposite signs

    saved = json.loads((tmp_path / "o" / "summary.json").read_text())
    md = (tmp_path / "o" / "summary.md").read_text()
    assert "| WAVG | 26 |" in md and "| mean | 26 |" in md and "| demo | 13 | .615 |" in md
    assert saved["prompt_hash"] == prompts.get_preset("evoquality").hash() and saved["samples"] == 1
    assert set(saved["package_versions"]) >= {"torch", "transformers", "scipy"}

    again_summary = report.main([str(tmp_path / "o"), "--bootstrap", "100"])  # no model
    for key in ("benchmarks", "wavg", "mean"):
        assert metrics.json_safe(again_summary[key]) == saved[key]


def test_resume_after_truncation_and_after_a_crash(monkeypatch, tmp_path, tiny_model_dir, demo_bench,
                                                   bench_with_a_gap):
    calls = []
    out = tmp_path / "o"
    run_eval(monkeypatch, calls, tiny_model_dir, bench_with_a_gap, demo_bench, out)
    reference = {name: (out / f"predictions_{name}.jsonl").read_bytes() for name in ("demo", "again")}
    assert sum(calls) == 24  # 12 readable images in each benchmark; the missing one is not sent to the model

    # a kill while the merged file was being cut: keep 7 full lines and half of the 8th
    lines = reference["demo"].split(b"\n")
    (out / "predictions_demo.jsonl").write_bytes(b"\n".join(lines[:7]) + b"\n" + lines[7][:20])
    calls.clear()
    run_eval(monkeypatch, calls, tiny_model_dir, bench_with_a_gap, demo_bench, out)
    assert sum(calls) == 12 - 7  # only the lost images are scored again
    assert {n: (out / f"predictions_{n}.jsonl").read_bytes() for n in reference} == reference

    # a crash in the middle of scoring: shards keep what was written, the rerun scores only the rest
    shutil.rmtree(out)
    real = fake_answers([])

    def crash_after_one_batch(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)
    calls.clear()
    monkeypatch.setattr(evaluate, "sample_answers", crash_after_one_batch)
    with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluate.main(["--model", tiny_model_dir, "--bench", f"demo={bench_with_a_gap}@{demo_bench}",
                       "--bench", f"again={bench_with_a_gap}@{demo_bench}", "--out", str(out), "--batch-size", "5",
                       "--max-new-tokens", "4"])
    assert len(common.read_jsonl(common.shard_file(out / "predictions_demo.jsonl", 0))) == 5
    calls.clear()
    run_eval(monkeypatch, calls, tiny_model_dir, bench_with_a_gap, demo_bench, out)
    assert sum(calls) == 7 + 12 and not list(out.glob("*.shard-*"))
    assert {n: (out / f"predictions_{n}.jsonl").read_bytes() for n in reference} == reference

    with pytest.raises(SystemExit) as e:  # resuming with other decoding settings would mix two setups
        run_eval(monkeypatch, calls, tiny_model_dir, bench_with_a_gap, demo_bench, out, "--samples", "4")
    assert e.value.code == 2


def test_default_batch_size_follows_the_evaluation_plan_at_7b_and_says_why():
    """The default --batch-size against bench/memory_plan.py --evaluation (Qwen2.5-VL-7B, one 80 GiB GPU, greedy: each
    sequence its own prompt, the most memory per sequence; every answer run to 512 tokens)."""
    import dataclasses

    sys.path.insert(0, str(ROOT / "bench"))
    import memory_plan

    field = next(f for f in dataclasses.fields(evaluate.Args) if f.name == "batch_size")
    cfg = json.loads((ROOT / "bench" / "qwen2_5_vl_7b_config.json").read_text())
    plan = memory_plan.evaluation_plan(cfg, memory_plan.Settings(config="unused", gpus=1))
    largest, peak = plan["plans"][True]["prompts"], plan["call"](field.default)["peak"]
    assert plan["n"] == 1 and plan["prompt"] == 999 + 110 and largest == 253
    assert peak < 60 * memory_plan.GiB and 2 * field.default > largest  # a margin of 20 GiB, half the largest or more
    assert f"{field.default} fits 7B on one 80 GB GPU with {int((80 * memory_plan.GiB - peak) / memory_plan.GiB)} " \
           "GiB to spare" in field.metadata["help"], (field.metadata["help"], peak / memory_plan.GiB)


def test_truncated_closed_box_scores_nothing():
    preset = prompts.get_preset("evoquality")
    text = "<think>looks sharp</think> \\boxed{3.2}. Wait, let me reconsider"
    assert prompts.parse_score(text, preset) == 3.2  # the text alone would parse: only the flag stops it
    score, scores = evaluate.image_score([sampling.Completion(text, True), sampling.Completion("\\boxed{4.0}", False)],
                                         preset)
    assert scores == [None, 4.0] and score == 4.0


def test_reruns_that_change_a_result_are_refused(monkeypatch, tmp_path, tiny_model_dir, demo_bench, capsys):
    """The model by identity (a retrained checkpoint in the same folder), a benchmark by its label file's content,
    each decoding setting; a new benchmark is not a change."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    bench = tmp_path / "labels.jsonl"
    shutil.copy(demo_bench / "labels.jsonl", bench)
    out, calls = tmp_path / "o", []
    monkeypatch.setattr(evaluate, "sample_answers", fake_answers(calls))

    def run(*extra):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return evaluate.main(["--model", str(model), "--bench", f"demo={bench}@{demo_bench}", "--out", str(out),
                                  "--max-new-tokens", "4", "--bootstrap", "0", *extra])

    def refused(*extra) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run(*extra)
        assert e.value.code == 2
        return capsys.readouterr().err

    run()
    assert sum(calls) == 12
    err = refused("--samples", "4", "--temperature", "0.7")
    assert "samples: 1 -> 4" in err and "temperature: None -> 0.7" in err
    assert "max_new_tokens: 4 -> 8" in refused("--max-new-tokens", "8")
    assert "prompt: 'evoquality' -> 'visualquality_r1'" in refused("--prompt", "visualquality_r1")
    assert "reasoning: True -> False" in refused("--no-reasoning")

    (model / "config.json").write_text((model / "config.json").read_text() + "\n")  # retrained in place
    assert "model:" in refused()
    shutil.rmtree(model)
    shutil.copytree(tiny_model_dir, model)  # copytree keeps mtimes: the same files, the same model
    lines = bench.read_text().splitlines()
    record = json.loads(lines[0])
    lines[0] = json.dumps({**record, "mos": record["mos"] + 0.5})  # one label corrected
    bench.write_text("\n".join(lines) + "\n")
    assert "benchmark demo:" in refused()

    lines[0] = json.dumps(record)
    bench.write_text("\n".join(lines) + "\n")
    calls.clear()
    with warnings.catch_warnings():  # the original file again, plus a new benchmark: allowed, only it is scored
        warnings.simplefilter("ignore")
        evaluate.main(["--model", str(model), "--bench", f"demo={bench}@{demo_bench}",
                       f"more={demo_bench / 'labels.jsonl'}", "--out", str(out), "--max-new-tokens", "4",
                       "--bootstrap", "0"])
    assert sum(calls) == 12
    saved = json.loads((out / "eval_config.json").read_text())["settings"]
    assert {"benchmark demo", "benchmark more"} <= set(saved)


def test_images_mode_scores_every_image_and_lists_unreadable_ones(monkeypatch, tmp_path, tiny_model_dir, demo_pool):
    folder = tmp_path / "photos"
    shutil.copytree(demo_pool, folder)
    (folder / "sub").mkdir()
    shutil.copy(demo_pool / "pool_00000.png", folder / "sub" / "again.png")
    (folder / "broken.png").write_bytes(b"not a png")
    calls = []
    monkeypatch.setattr(evaluate, "sample_answers", fake_answers(calls))
    args = ["--model", tiny_model_dir, "--images", str(folder), "--out", str(tmp_path / "o"), "--batch-size", "5",
            "--max-new-tokens", "4", "--samples", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = evaluate.main(args)
    records = common.read_jsonl(tmp_path / "o" / "predictions.jsonl")
    assert [r["image"] for r in records] == common.list_images(folder)[1]  # every image, in the folder's order
    assert len(records) == 14 and sum(calls) == 13 and all("mos" not in r for r in records)
    broken = next(r for r in records if r["image"] == "broken.png")
    assert broken["score"] is None and "cannot read image" in broken["error"]
    assert summary["images"]["unreadable"] == [{"image": "broken.png", "error": broken["error"]}]
    assert all(len(r["scores"]) == 2 for r in records if not r.get("error"))  # --samples 2
    assert "srcc" not in json.dumps(summary) and not list((tmp_path / "o").glob("predictions_*"))
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluate.main(args)  # resume: only the broken image is tried again, and it still cannot be read
    assert calls == [] and common.read_jsonl(tmp_path / "o" / "predictions.jsonl") == records


# ---------------------------------------------------------------------------------------------------------------------
# misuse: a failed first run, a changed image, a second run, names outside their root, one-line errors
# ---------------------------------------------------------------------------------------------------------------------


def quiet_main(argv: list[str]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return evaluate.main(argv)


def refused(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        quiet_main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert e.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_a_mistyped_model_leaves_nothing_that_refuses_the_right_one(monkeypatch, tmp_path, tiny_model_dir, demo_bench,
                                                                    capsys):
    monkeypatch.setattr(evaluate, "sample_answers", fake_answers([]))
    out = tmp_path / "o"
    argv = ["--bench", f"demo={demo_bench / 'labels.jsonl'}", "--out", str(out), "--max-new-tokens", "4",
            "--bootstrap", "0"]
    err = refused(capsys, ["--model", str(tmp_path / "nonexist"), *argv])
    assert "nonexist: cannot load it" in err and not (out / "eval_config.json").exists()
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text("{ not json")
    assert f"--model {broken}: cannot load it" in refused(capsys, ["--model", str(broken), *argv])
    assert quiet_main(["--model", tiny_model_dir, *argv])["benchmarks"]["demo"]["n"] == 12


def test_an_image_changed_in_place_is_scored_again(monkeypatch, tmp_path, tiny_model_dir, demo_pool):
    folder = tmp_path / "photos"
    shutil.copytree(demo_pool, folder)
    calls = []
    monkeypatch.setattr(evaluate, "sample_answers", fake_answers(calls))
    argv = ["--model", tiny_model_dir, "--images", str(folder), "--out", str(tmp_path / "o"), "--max-new-tokens", "4"]
    quiet_main(argv)
    before = {r["image"]: r for r in common.read_jsonl(tmp_path / "o" / "predictions.jsonl")}
    changed = sorted(before)[3]
    shutil.copy(folder / sorted(before)[0], folder / changed)  # another picture under the same name
    calls.clear()
    quiet_main(argv)
    after = {r["image"]: r for r in common.read_jsonl(tmp_path / "o" / "predictions.jsonl")}
    stat = (folder / changed).stat()
    assert calls == [1] and after[changed]["file"] == [stat.st_size, stat.st_mtime_ns]
    assert after[changed]["file"] != before[changed]["file"] and after[changed]["scores"] == after[sorted(before)[0]][
        "scores"]
    assert {k: v for k, v in after.items() if k != changed} == {k: v for k, v in before.items() if k != changed}
    calls.clear()
    quiet_main(argv)
    assert calls == []


def test_a_second_run_into_the_same_out_is_refused_at_once(tmp_path, tiny_model_dir, demo_bench, capsys):
    out = tmp_path / "o"
    with common.output_lock(out):
        err = refused(capsys, ["--model", tiny_model_dir, "--bench", f"demo={demo_bench / 'labels.jsonl'}", "--out",
                               str(out)])
    assert f"{out} is in use by another run (pid {os.getpid()}" in err and not (out / "eval_config.json").exists()


def test_image_names_stay_under_their_root(tmp_path, demo_bench, capsys):
    for name in ["../outside.png", str(demo_bench / "bench_00000.png")]:
        labels = tmp_path / "labels.jsonl"
        labels.write_text(json.dumps({"image": "bench_00001.png", "mos": 2}) + "\n"
                          + json.dumps({"image": name, "mos": 3}) + "\n")
        with pytest.raises(ValueError, match=r"labels\.jsonl:2: image name .* is outside the image root"):
            benchmarks.read_benchmark(labels, root=demo_bench)
        entries, _, _ = benchmarks.read_benchmark(labels, root=demo_bench, allow_outside=True)
        assert Path(entries[1]["image"]).is_absolute()
    labels.write_text('{"image": "./bench_00001.png", "mos": 2}\n{"image": "bench_00001.png", "mos": 3}\n')
    with pytest.raises(ValueError, match=r"labels\.jsonl:1 and .*labels\.jsonl:2: image bench_00001\.png is listed"):
        benchmarks.read_benchmark(labels)
    listed = tmp_path / "list.txt"
    listed.write_text("a.png\n/etc/passwd\n")
    err = refused(capsys, ["--model", "m", "--images", str(listed), "--out", str(tmp_path / "o")])
    assert "list.txt:2" in err and "outside the image root" in err


def test_bad_inputs_are_one_line_errors_before_the_model_loads(monkeypatch, tmp_path, tiny_model_dir, demo_bench,
                                                              capsys):
    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    argv = ["--model", tiny_model_dir, "--bench", f"demo={demo_bench / 'labels.jsonl'}"]
    (tmp_path / "file").write_text("")
    assert "cannot write to" in refused(capsys, [*argv, "--out", str(tmp_path / "file" / "o")])
    assert "--bootstrap 100001: the resamples must be between 0 (no intervals) and 100,000" in refused(
        capsys, [*argv, "--out", str(tmp_path / "o"), "--bootstrap", "100001"])
    out = tmp_path / "o"
    out.mkdir()
    (out / "eval_config.json").write_text("")
    assert f"{out / 'eval_config.json'} is empty or not valid JSON" in refused(capsys, [*argv, "--out", str(out)])
    latin = tmp_path / "meta.csv"
    latin.write_bytes("name,mos\ncaf\xe9.png,3\n".encode("latin-1"))
    err = refused(capsys, ["--model", tiny_model_dir, "--bench", f"x={latin}", "--out", str(tmp_path / "o2")])
    assert f"{latin}: not UTF-8" in err


def test_a_folder_scan_says_which_subfolders_it_skipped(monkeypatch, tmp_path, tiny_model_dir, demo_pool, capsys):
    folder = tmp_path / "photos"
    shutil.copytree(demo_pool, folder)
    (folder / "linked").symlink_to(demo_pool, target_is_directory=True)
    monkeypatch.setattr(evaluate, "sample_answers", fake_answers([]))
    summary = quiet_main(["--model", tiny_model_dir, "--images", str(folder), "--out", str(tmp_path / "o"),
                          "--max-new-tokens", "4"])
    assert f"skipped subfolder {folder / 'linked'}: a symlinked folder" in capsys.readouterr().err
    assert summary["images"]["n"] == len(list(demo_pool.glob("*.png")))


def test_bench_and_images_together_is_refused(tmp_path, demo_bench):
    run = subprocess.run([sys.executable, "evaluate.py", "--model", "none", "--out", str(tmp_path / "o"),
                          "--images", str(demo_bench), "--bench", f"d={demo_bench / 'labels.jsonl'}"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert run.returncode == 2 and "--bench and --images" in run.stderr


# ---------------------------------------------------------------------------------------------------------------------
# sampled scores keyed to (seed, image, sample index): the same whatever batch, process or resume
# ---------------------------------------------------------------------------------------------------------------------


def sampled_eval(tiny_model_dir, labels, out, *extra) -> dict:
    """The real tiny model, 3 sampled answers of 6 tokens per image (the random model rarely parses: the answer
    texts are compared)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return evaluate.main(["--model", tiny_model_dir, "--bench", f"demo={labels}", "--out", str(out), "--samples",
                              "3", "--max-new-tokens", "6", "--seed", "2", "--bootstrap", "0", *map(str, extra)])


@pytest.mark.parametrize("mutation", [None, "batch_row"])
def test_sampled_scores_do_not_depend_on_the_batch_size(monkeypatch, tmp_path, tiny_model_dir, demo_bench, mutation):
    """--batch-size 2 (an image's 3 samples split over 2 calls) and 64 (all 12 images in one call): byte-identical
    predictions, answer texts included; with noise keyed to the call they differ."""
    from test_sample_votes import plant

    if mutation:
        plant(monkeypatch, mutation)
    written = {}
    for batch_size in (2, 64):
        sampled_eval(tiny_model_dir, demo_bench / "labels.jsonl", tmp_path / str(batch_size), "--batch-size",
                     batch_size)
        written[batch_size] = (tmp_path / str(batch_size) / "predictions_demo.jsonl").read_bytes()
    answers = [a for r in common.read_jsonl(tmp_path / "64" / "predictions_demo.jsonl") for a in r["answers"]]
    assert len(answers) == 36 and len(set(answers)) > 18  # sampled answers differ: a changed draw would show
    assert (written[2] == written[64]) == (mutation is None)


def test_sampled_scores_after_a_crash_and_resume_equal_an_uninterrupted_run(monkeypatch, tmp_path, tiny_model_dir,
                                                                             demo_bench):
    labels, reference, out = demo_bench / "labels.jsonl", tmp_path / "reference", tmp_path / "o"
    sampled_eval(tiny_model_dir, labels, reference, "--batch-size", 6)
    real, batches = evaluate.sample_answers, []

    def crash_after_one_batch(*a, **k):
        if batches:
            raise KeyboardInterrupt
        batches.append(1)
        return real(*a, **k)

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(evaluate, "sample_answers", crash_after_one_batch)
        sampled_eval(tiny_model_dir, labels, out, "--batch-size", 6)
    assert len(common.read_jsonl(common.shard_file(out / "predictions_demo.jsonl", 0))) == 2  # 2 images x 3 samples
    sampled_eval(tiny_model_dir, labels, out, "--batch-size", 6)  # the same command resumes
    assert (out / "predictions_demo.jsonl").read_bytes() == (reference / "predictions_demo.jsonl").read_bytes()


def test_many_samples_are_drawn_in_calls_of_batch_size_rows(monkeypatch, tmp_path, tiny_model_dir, demo_bench):
    """--samples far above --batch-size: no sampling call holds more than --batch-size rows; an image's samples are
    split over calls, every sample index drawn exactly once (recorded where the stage reaches the model)."""
    seen = []

    def record(model, processor, inputs, n, max_new_tokens, temperature=1.0, do_sample=True, keys=None, seed=0,
               first_index=0):
        seen.append((list(keys), n, list(first_index), seed, do_sample))
        rows = len(keys) * n
        return sampling.Samples(ids=None, mask=None, truncated=[False] * rows, texts=["\\boxed{3}"] * rows, n=n)

    monkeypatch.setattr(sampling, "sample", record)
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join((demo_bench / "labels.jsonl").read_text().splitlines(keepends=True)[:2]))
    sampled_eval(tiny_model_dir, f"{labels}@{demo_bench}", tmp_path / "o", "--samples", 1001, "--batch-size", 64,
                 "--no-text")
    assert max(len(keys) * n for keys, n, _, _, _ in seen) == 64
    assert {(seed, do_sample) for _, _, _, seed, do_sample in seen} == {(2, True)}
    drawn: dict[int, list[int]] = {}
    for keys, n, firsts, _, _ in seen:
        for key, first in zip(keys, firsts):
            drawn.setdefault(key, []).extend(range(first, first + n))
    records = common.read_jsonl(tmp_path / "o" / "predictions_demo.jsonl")
    assert {key: sorted(indices) for key, indices in drawn.items()} == \
        {sampling.prompt_key(r["image"]): list(range(1001)) for r in records}
    assert [(r["score"], r["n_valid"]) for r in records] == [(3.0, 1001)] * 2


# ---------------------------------------------------------------------------------------------------------------------
# end to end on the tiny model: one process, then two under torchrun
# ---------------------------------------------------------------------------------------------------------------------


def test_end_to_end_tiny_model_one_and_two_processes(tmp_path, tiny_model_dir, demo_bench):
    """One process on the benchmark, then two under torchrun on --images of the same folder with another
    --batch-size: both paths shard, resume and merge through the same code, and the same sampled answers must come
    back on the same images (each keyed to its image and sample index)."""
    args = ["--model", tiny_model_dir, "--max-new-tokens", "16", "--samples", "2", "--seed", "5"]
    one = subprocess.run([sys.executable, "evaluate.py", *args, "--bench", f"demo={demo_bench / 'labels.jsonl'}",
                          "--out", str(tmp_path / "one"), "--batch-size", "4"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "| demo | 12 |" in one.stdout and "| WAVG | 12 |" in one.stdout
    records = common.read_jsonl(tmp_path / "one" / "predictions_demo.jsonl")
    assert [r["image"] for r in records] == [f"bench_{i:05d}.png" for i in range(12)]
    assert all(len(r["answers"]) == 2 for r in records)
    assert len({r["answers"][0] for r in records}) > 1  # answers differ by image, so a mix-up below would show
    for r in records:  # nothing is invented: the score is what the parser makes of the saved, untruncated text
        parsed = [None if cut else prompts.parse_score(text) for text, cut in zip(r["answers"], r["truncated"])]
        assert r["scores"] == parsed and r["n_valid"] == sum(x is not None for x in parsed)
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    demo = summary["benchmarks"]["demo"]
    assert demo["n"] == 12 and summary["num_processes"] == 1 and demo["dataset"] == "generic file"
    assert demo["truncation_rate"] == pytest.approx(np.mean([t for r in records for t in r["truncated"]]))

    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "evaluate.py", *args,
                          "--images", str(demo_bench), "--out", str(tmp_path / "two"), "--batch-size", "6"], cwd=ROOT,
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["num_processes"] == 2
    scored = common.read_jsonl(tmp_path / "two" / "predictions.jsonl")
    assert [{k: v for k, v in r.items() if k != "mos"} for r in records] == scored
    assert two.stdout.count("12 images: ") == 1  # only the main process reports


def test_sampled_answers_are_grouped_per_image(tiny_model_dir, demo_bench):
    """Against plain `generate`, one image at a time, greedy: evaluate's greedy answers and truncation flags equal
    it; at a near-zero temperature every sample of image i is image i's reference answer (the grouping); at
    temperature 1 (top_k=0, not the shipped top_k=1) the samples differ."""
    import torch

    model = common.load_model(tiny_model_dir, dtype=torch.float32, device="cpu").eval()
    processor = common.load_processor(tiny_model_dir)
    preset = prompts.get_preset("evoquality")
    prompt = preset.prompt("score", True)
    images = [common.load_image(demo_bench / f"bench_{i:05d}.png") for i in (0, 1, 2)]
    eos = sampling.eos_token_ids(sampling.sampling_config(model, 4))
    reference, ended = [], []
    for image in images:
        inputs = common.encode_batch(processor, [prompt], [[image]])
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=32,  # the shipped penalty 1.05 off
                                 repetition_penalty=1.0)[0, inputs["input_ids"].shape[1]:]
        reference.append(processor.decode(out, skip_special_tokens=True))
        ended.append(any(t in eos for t in out.tolist()))
    assert len(set(reference)) > 1  # the images lead to different answers, so a mix-up would show

    def run(**kwargs):
        return evaluate.sample_answers(model, processor, images, ["a.png", "b.png", "c.png"], prompt, preset,
                                       evaluate.Args(max_new_tokens=32, **kwargs))
    greedy = run(samples=1)
    assert [g[0].text for g in greedy] == reference and [g[0].truncated for g in greedy] == [not e for e in ended]
    cold = run(samples=3, temperature=1e-5)
    assert [[c.text for c in group] for group in cold] == [[text] * 3 for text in reference]
    hot = run(samples=3, temperature=1.0)
    assert [len(group) for group in hot] == [3, 3, 3] and len({c.text for c in hot[0]}) > 1
