"""experiments/evolve.py: the test bed's experiment. The accuracy measure against hand-worked numbers, and smoke runs
through the real loop (tiny base, tiny budgets): every arm trains with the group size asked for, the oracle arm on the
main run's pairs with p* from the true order, and the record is complete and appended only where asked."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
from experiments import evolve as E  # noqa: E402


def answers(ab: list, ba: list) -> list[dict]:
    """Interleaved ab/ba answers, as sample_votes.py writes them in no particular order."""
    out = []
    for x, y in zip(ab, ba):
        out += [{"order": "ab", "choice": x}, {"order": "ba", "choice": y}]
    return out


def test_pseudolabel_accuracy_compare_hand_computed(tmp_path):
    quality = {"x": 5.0, "y": 3.0, "z": 3.0, "w": 1.0}
    records = [
        # x better. k=1: a (right). k=4: ab a,a + ba a,b -> 3:1 right. k=8: a 3, b 4 (one abstention) -> wrong.
        {"a": "x", "b": "y", "answers": answers(["a", "a", "b", None], ["a", "b", "b", "b"])},
        # equal true quality: left out whatever the votes
        {"a": "y", "b": "z", "answers": answers(["a"] * 4, ["a"] * 4)},
        # y (b) better. k=1: abstention -> tie 0.5. k=4: ab None,b + ba a,a -> 2:1 wrong. k=8: a 4, b 3 -> wrong.
        {"a": "w", "b": "y", "answers": answers([None, "b", "a", "a"], ["a", "a", "b", "b"])},
        # x (b) better. k=1: b right. k=4: ab b,b + ba a,a -> tie 0.5. k=8: b 6, a 2 -> right.
        {"a": "y", "b": "x", "answers": answers(["b"] * 4, ["a", "a", "b", "b"])},
    ]
    votes = tmp_path / "votes.jsonl"
    votes.write_text("".join(json.dumps(r) + "\n" for r in records))
    acc = E.pseudolabel_accuracy(votes, quality, [1, 4, 8])
    assert acc["pairs"] == 3
    assert acc["K1"] == pytest.approx({"accuracy": 2.5 / 3, "tie_rate": 1 / 3})
    assert acc["K4"] == pytest.approx({"accuracy": 1.5 / 3, "tie_rate": 1 / 3})
    assert acc["K8"] == pytest.approx({"accuracy": 1 / 3, "tie_rate": 0.0})


def test_pseudolabel_accuracy_score_mode_hand_computed(tmp_path):
    quality = {"x": 5.0, "y": 3.0, "w": 1.0}
    votes = tmp_path / "votes.jsonl"
    votes.write_text("".join(json.dumps(r) + "\n" for r in [
        {"image": "x", "scores": [4.0, 2.0, None, 1.0]}, {"image": "y", "scores": [3.0, 3.0, 3.0, 3.0]},
        {"image": "w", "scores": [2.0, 4.0, 4.0, 4.0]}]))
    Path(f"{votes}.pairs.jsonl").write_text(json.dumps({"a": "x", "b": "y"}) + "\n" + json.dumps({"a": "w", "b": "y"})
                                            + "\n")
    acc = E.pseudolabel_accuracy(votes, quality, [1, 2, 4], mode="score")
    # (x, y), x better: k=1 4>3 right; k=2 1:1 tie; k=4 (None abstains) 1:2 wrong.
    # (w, y), y better: k=1 2<3 right; k=2 1:1 tie; k=4 w wins samples 2-4: 3:1 wrong.
    assert acc["K1"] == pytest.approx({"accuracy": 1.0, "tie_rate": 0.0})
    assert acc["K2"] == pytest.approx({"accuracy": 0.5, "tie_rate": 1.0})
    assert acc["K4"] == pytest.approx({"accuracy": 0.0, "tie_rate": 0.0})


def test_pseudolabel_accuracy_by_kind_of_pair(tmp_path):
    quality = {"r": 5.0, "v1": 4.0, "v3": 2.0, "s": 3.0}
    votes = tmp_path / "votes.jsonl"
    votes.write_text("".join(json.dumps(r) + "\n" for r in [
        {"a": "r", "b": "s", "kind": "random", "answers": answers(["a"], ["a"])},  # r better: right
        {"a": "v1", "b": "r", "kind": "same_reference", "answers": answers(["a"], ["a"])},  # r better: wrong
        {"a": "v1", "b": "v3", "kind": "same_reference", "answers": answers(["a"], ["b"])},  # v1 better: 1:1 tie
        {"a": "s", "b": "v3", "answers": answers(["b"], ["b"])}]))  # no kind: random; s better: wrong
    assert E.pseudolabel_accuracy(votes, quality, [2], kind="random")["K2"]["accuracy"] == pytest.approx(0.5)
    same = E.pseudolabel_accuracy(votes, quality, [2], kind="same_reference")
    assert same["pairs"] == 2 and same["K2"] == pytest.approx({"accuracy": 0.25, "tie_rate": 0.5})
    assert E.pseudolabel_accuracy(votes, quality, [2])["pairs"] == 4


def test_pool_arms_share_seed_pool_and_random_pairs_and_differ_where_they_should(tmp_path):
    args = E.Args(pool_variants=2, same_reference_pairs=5, ks=[8], pairs=12, seed=3)
    benches = {"authentic": tmp_path / "a" / "labels.jsonl", "synthetic": tmp_path / "s" / "labels.jsonl"}
    arms = E.pool_arms(args, "BASE", tmp_path / "pool", tmp_path / "pool.labels.jsonl", benches, tmp_path / "exp")
    assert [p.name for p in arms] == ["random", "same_reference", "replace", "oracle"]
    random, same, replace, oracle = arms.values()
    for arm in (random, same, replace, oracle):
        assert {arm[k] for k in ("POOL", "SEED", "PAIRS", "MODEL", "ROUNDS")} == {str(tmp_path / "pool"), "3", "12",
                                                                                 "BASE", "2"}
        assert arm["BENCH"] == f"authentic={benches['authentic']}\nsynthetic={benches['synthetic']}\n"
        assert arm["IMAGES"] == ""  # the pool is built before: the loop only reads it
    # replace: 12 pairs in all, the share of same-reference pairs of "same_reference" (5 of 17): 4 of them
    assert [a["SYNTH_PAIRS"] for a in (random, same, replace, oracle)] == ["0", "5", "4", "5"]
    assert [a["SYNTH_MIX"] for a in (random, same, replace, oracle)] == ["add", "add", "replace", "add"]
    assert (random["K"], same["K"], replace["K"], oracle["K"]) == ("8", "8", "8", "1")
    assert random["LABEL_ARGS"] == same["LABEL_ARGS"] == replace["LABEL_ARGS"] == ""
    assert oracle["LABEL_ARGS"] == f"--oracle {tmp_path}/pool.labels.jsonl"
    for arm in (random, same, replace):
        del arm["SYNTH_PAIRS"], arm["SYNTH_MIX"]
    assert random == same == replace


def test_accuracy_by_group_per_kind_of_pair(tmp_path):
    quality = {"r": 4.0, "v1": 3.0, "v2": 1.0, "s": 2.0, "w": 1.5}
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in [
        {"image": "r", "type": None}, {"image": "v1", "type": "gaussian_blur"}, {"image": "v2", "type": "jpeg"},
        {"image": "s", "type": None}, {"image": "w", "type": "motion_blur"}]))
    votes = tmp_path / "votes.jsonl"
    votes.write_text("".join(json.dumps(r) + "\n" for r in [
        {"a": "r", "b": "v1", "kind": "same_reference", "answers": answers(["a"], ["a"])},  # r better: right (blur)
        {"a": "v1", "b": "v2", "kind": "same_reference", "answers": answers(["b"], ["b"])},  # wrong (blur, compression)
        {"a": "r", "b": "s", "kind": "random", "answers": answers(["a"], ["b"])},  # tie: half (two references)
        {"a": "w", "b": "s", "kind": "random", "answers": answers(["b"], ["b"])}]))  # s better: right (blur)
    assert E.accuracy_by_group(votes, quality, manifest, 2) == {
        "blur": {"pairs": 2, "accuracy": 0.5}, "compression": {"pairs": 1, "accuracy": 0.0}}
    assert E.accuracy_by_group(votes, quality, manifest, 2, "random") == {
        "blur": {"pairs": 1, "accuracy": 1.0}, "none": {"pairs": 1, "accuracy": 0.5}}


def test_own_score_accuracy_hand_computed(tmp_path):
    quality = {"x": 5.0, "y": 3.0, "z": 3.0, "w": 1.0}
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps(r) + "\n" for r in [  # evaluate.py --images rows (paths as written)
        {"image": "/pool/x", "score": 2.0, "scores": [None, 4.0]}, {"image": "/pool/y", "score": 3.0, "scores": [3.0]},
        {"image": "/pool/z", "score": 1.0, "scores": [1.0]}, {"image": "/pool/w", "score": None, "scores": [None]}]))
    votes = tmp_path / "votes.jsonl"
    votes.write_text("".join(json.dumps({"a": a, "b": b, "answers": []}) + "\n"
                             for a, b in [("x", "y"), ("y", "z"), ("z", "x"), ("w", "y")]))
    own = E.own_score_accuracy(predictions, votes, quality)
    # (y, z) equal quality: left out. Mean: x<y wrong, z<x right, w unscored -> half. First valid sample: x 4 > y 3
    # right, z 1 < x 4 right, w none -> half.
    assert own == {"pairs": 3, "mean_of_samples": pytest.approx(1.5 / 3), "single_sample": pytest.approx(2.5 / 3)}
    # names relative to a pool root (evaluate.py --images on a manifest), one kind of pair
    predictions.write_text("".join(json.dumps(r) + "\n" for r in [
        {"image": "references/x.png", "score": 2.0, "scores": [2.0]}, {"image": "variants/x_00.png", "score": 3.0,
                                                                       "scores": [3.0]}]))
    votes.write_text(json.dumps({"a": "references/x.png", "b": "variants/x_00.png", "kind": "same_reference"}) + "\n"
                     + json.dumps({"a": "variants/x_00.png", "b": "references/x.png"}) + "\n")
    quality = {"references/x.png": 4.0, "variants/x_00.png": 2.0}
    assert E.own_score_accuracy(predictions, votes, quality, "same_reference")["pairs"] == 1
    assert E.own_score_accuracy(predictions, votes, quality, "random") == {"pairs": 1, "mean_of_samples": 0.0,
                                                                           "single_sample": 0.0}


def test_stage_seconds_reads_every_invocation(tmp_path):
    log = tmp_path / "evolution.log"
    log.write_text("round 0: evaluate the base model\n  [done] evaluate  7 s\nround 1: voter and policy = m\n"
                   "  [skip] sample_votes (done)\n  [done] grpo_train  12 s\nround 1: greedy evaluation\n"
                   "  [done] evaluate_greedy  3 s\n")
    assert E.stage_seconds(log) == {"round_0/evaluate": 7, "round_1/grpo_train": 12, "round_1/evaluate_greedy": 3}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evolve") / "base"
    # 100 steps (~15 s): the fewest after which sampled answers are mostly parseable (3 steps: every vote abstains,
    # every pair is dropped and GRPO has nothing to train on)
    subprocess.run([sys.executable, "experiments/warmstart.py", "--steps", "100", "--warmup-steps", "5", "--lr", "3e-3",
                    "--score-batch", "8", "--compare-batch", "8", "--text-hidden", "64", "--text-layers", "2",
                    "--vision-hidden", "32", "--max-pixels", "3136", "--n-images", "40", "--n-bench", "8",
                    "--bench-pairs", "8", "--eval-samples", "0", "--record", "", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_smoke_one_round_appends_a_complete_record(tiny_base, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"earlier": "record"}]))  # append-only: an earlier record must survive
    cmd = [sys.executable, "experiments/evolve.py", "--base", str(tiny_base), "--work", str(tmp_path / "work"),
           "--record", str(results), "--ks", "2", "--acc-ks", "1", "2", "--rounds", "1", "--pool", "6",
           "--bench", "6", "--pairs", "4", "--group-size", "3", "--pairs-per-step", "2", "--eval-samples", "2",
           "--max-pixels", "3136", "--note", "smoke"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    history = json.loads(results.read_text())
    assert len(history) == 2 and history[0] == {"earlier": "record"}
    record = history[1]
    assert record["note"] == "smoke" and record["settings"]["pairs"] == 4 and record["ks"] == [2]
    assert record["settings"]["group_size"] == 3 and record["commit"]
    assert set(record["runs"]) == {"K2", "oracle"}
    work = next((tmp_path / "work").glob("compare-*"))
    for arm in ("K2", "oracle"):  # the group size each arm TRAINED with, as grpo_train.py recorded it
        args = json.loads((work / arm / "round_1" / "model" / "args.json").read_text())["args"]
        assert args["group_size"] == 3 and record["runs"][arm]["rounds"]["round_1"]["grpo"]["group_size"] == 3
        assert ["GROUP_SIZE", "3"] in [line.split() for line in (work / arm / "evolution.log").open()]  # as echoed
    oracle = record["runs"].pop("oracle")  # the positive control: same pairs as K2, p* from the true order
    assert {"sampled", "greedy", "grpo", "labels"} <= set(oracle["rounds"]["round_1"])
    assert oracle["rounds"]["round_1"]["labels"]["source"] == "oracle"
    assert oracle["rounds"]["round_0"]["sampled"] == record["runs"]["K2"]["rounds"]["round_0"]["sampled"]
    quality = {r["image"]: r["mos"] for r in read_jsonl(tmp_path / "work" / "noise56_pool_6.labels.jsonl")}
    voted = read_jsonl(work / "K2" / "round_1" / "votes.jsonl")
    truth = read_jsonl(work / "oracle" / "round_1" / "pseudolabels.jsonl")
    assert sorted((r["a"], r["b"]) for r in truth) == sorted((r["a"], r["b"]) for r in voted) and len(truth) == 4
    assert all(r["p_star"] == (1.0 if quality[r["a"]] > quality[r["b"]] else 0.0 if quality[r["a"]] < quality[r["b"]]
                               else 0.5) for r in truth)
    own = record["own_score_accuracy_round1"]
    assert set(own) == {"pairs", "mean_of_samples", "single_sample"} and 0 <= own["mean_of_samples"] <= 1
    for run in record["runs"].values():
        assert set(run["rounds"]) == {"round_0", "round_1"}
        assert {"sampled", "greedy"} <= set(run["rounds"]["round_0"])
        r1 = run["rounds"]["round_1"]
        assert {"sampled", "greedy", "votes", "grpo"} <= set(r1)
        assert {"srcc", "plcc", "srcc_single"} <= set(r1["sampled"])
        assert {"abstention_rate", "first_slot_win_rate", "accuracy"} <= set(r1["votes"])
        assert {"reward_mean", "reward_std", "zero_std_fraction", "score_within_group_std", "kl"} <= set(r1["grpo"])
        assert 1 <= r1["grpo"]["steps"] <= 2  # up to 4 kept pairs, 2 per step
        assert {"round_1/sample_votes", "round_1/grpo_train", "round_1/evaluate"} <= set(run["stage_seconds"])
    assert set(record["pseudolabel_accuracy_round1"]) == {"pairs", "K1", "K2"}
    # the evolution never sees a label: the pool folder holds only images
    pool = tmp_path / "work" / "noise56_pool_6"
    assert sorted(p.suffix for p in pool.iterdir()) == [".png"] * 6
    assert (tmp_path / "work" / "noise56_pool_6.labels.jsonl").exists()
    # the same command without --record: every stage skipped, the record written to the run's folder, nothing appended
    logs = {arm: len((work / arm / "evolution.log").read_text()) for arm in ("K2", "oracle")}
    done = subprocess.run(cmd[:6] + cmd[8:], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert all("[run ]" not in (work / arm / "evolution.log").read_text()[n:] for arm, n in logs.items())
    assert len(json.loads(results.read_text())) == 2
    assert json.loads((work / "record.json").read_text())["runs"]["K2"] == history[1]["runs"]["K2"]


def test_within_reference_srcc_hand_computed(tmp_path):
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"image": f"{r}{k}", "mos": m, "reference": r}) + "\n"
                              for r, ms in (("x", [3.0, 2.0, 1.0]), ("y", [1.0, 2.0, 3.0])) for k, m in enumerate(ms)))
    (tmp_path / "eval").mkdir()
    scores = {"x0": 5.0, "x1": 4.0, "x2": 1.0, "y0": 3.0, "y1": 2.0, "y2": 2.5}  # x in order (1), y: -0.5
    (tmp_path / "eval" / "predictions_synthetic.jsonl").write_text("".join(
        json.dumps({"image": i, "score": s, "mos": float(i[0] == "x") * (3 - int(i[1])) + float(i[0] == "y") * (
            1 + int(i[1]))}) + "\n" for i, s in scores.items()))
    assert E.within_reference_srcc(tmp_path / "eval", labels) == pytest.approx((1.0 - 0.5) / 2)
