"""build_pseudolabels.py: hand-computed labels, drop rules, score-mode votes, Bradley-Terry against an independent
maximum-likelihood fit, stats, input validation, and byte-identical reruns of the real command line."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.stats import spearmanr

import build_pseudolabels as bp

ROOT = Path(__file__).resolve().parents[1]

# x beats y 19-11, z beats y 5-3, z ties w 4-4, w-x and u-v never got a valid vote, p beats q 7-1.
CRAFTED = [
    {"a": "x.png", "b": "y.png", "votes_a": 19, "votes_b": 11, "abstain": 2, "first_slot_wins": 17},
    {"a": "y.png", "b": "z.png", "votes_a": 3, "votes_b": 5, "abstain": 0, "first_slot_wins": 4},
    {"a": "z.png", "b": "w.png", "votes_a": 4, "votes_b": 4, "abstain": 0, "first_slot_wins": 5},
    {"a": "w.png", "b": "x.png", "votes_a": 0, "votes_b": 0, "abstain": 32, "first_slot_wins": 0},
    {"a": "p.png", "b": "q.png", "votes_a": 7, "votes_b": 1, "abstain": 0, "first_slot_wins": 3},
    {"a": "u.png", "b": "v.png", "votes_a": 0, "votes_b": 0, "abstain": 8, "first_slot_wins": 0},
]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(tmp_path: Path, records, **kwargs) -> tuple[list[dict], list[dict], dict]:
    """The stage in-process: (pseudo-labels, rankings, stats)."""
    votes = records if isinstance(records, Path) else write_jsonl(tmp_path / "votes.jsonl", records)
    args = bp.Args(votes=str(votes), out=str(tmp_path / "pl.jsonl"), rankings=str(tmp_path / "rank.jsonl"),
                   stats=str(tmp_path / "stats.json"), **kwargs)
    bp.main(args)
    return read_jsonl(tmp_path / "pl.jsonl"), read_jsonl(tmp_path / "rank.jsonl"), \
        json.loads((tmp_path / "stats.json").read_text())


def run_error(tmp_path, capsys, records, **kwargs) -> str:
    with pytest.raises(SystemExit) as e:
        run(tmp_path, records, **kwargs)
    assert e.value.code == 2
    return capsys.readouterr().err


def labels(out: list[dict]) -> dict:
    return {(r["a"], r["b"]): r["p_star"] for r in out}


# ---------------------------------------------------------------------------------------------------------------------
# Labels and drop rules, by hand
# ---------------------------------------------------------------------------------------------------------------------


def test_hard_majority_tie_and_all_abstain(tmp_path):
    out, _, stats = run(tmp_path, CRAFTED)
    assert out == [  # input order and orientation, exactly these keys, all-abstain pairs dropped
        {"a": "x.png", "b": "y.png", "kind": "random", "p_star": 1.0, "votes_a": 19, "votes_b": 11, "abstain": 2},
        {"a": "y.png", "b": "z.png", "kind": "random", "p_star": 0.0, "votes_a": 3, "votes_b": 5, "abstain": 0},
        {"a": "z.png", "b": "w.png", "kind": "random", "p_star": 0.5, "votes_a": 4, "votes_b": 4, "abstain": 0},
        {"a": "p.png", "b": "q.png", "kind": "random", "p_star": 1.0, "votes_a": 7, "votes_b": 1, "abstain": 0},
    ]
    assert [list(r) for r in out] == [["a", "b", "kind", "p_star", "votes_a", "votes_b", "abstain"]] * 4
    assert stats["pairs_in"] == 6 and stats["pairs_kept"] == 4
    assert stats["pairs_dropped"] == {"min_valid_votes": 2, "min_margin": 0, "ties": 0}


def test_output_lines_are_exactly_json_dumps():
    names = ['plain.png', 'quo"te\\back.png', "ünï cödé/日本.jpg", "tab\there.png"]
    kept = {"a": np.array([0, 2, 3]), "b": np.array([1, 0, 2]), "kind": np.array([0, 1, 0]),
            "votes_a": np.array([19, 0, 7]), "votes_b": np.array([11, 3, 7]), "abstain": np.array([2, 0, 18])}
    p_star = np.array([19 / 30, 0.0, 0.5])
    expected = [json.dumps({"a": names[a], "b": names[b], "kind": ["random", "same_reference"][k], "p_star": float(p),
                            "votes_a": int(va), "votes_b": int(vb), "abstain": int(ab)}, ensure_ascii=False) + "\n"
                for a, b, k, p, va, vb, ab in zip(kept["a"], kept["b"], kept["kind"], p_star, kept["votes_a"],
                                                  kept["votes_b"], kept["abstain"])]
    assert list(bp.pseudolabel_lines(names, kept, p_star)) == expected


def test_soft_labels(tmp_path):
    out, _, _ = run(tmp_path, CRAFTED, label="soft")
    assert labels(out) == {("x.png", "y.png"): 19 / 30, ("y.png", "z.png"): 3 / 8, ("z.png", "w.png"): 0.5,
                           ("p.png", "q.png"): 7 / 8}


def test_min_margin_drop_ties_min_valid_votes(tmp_path):
    # margins: x-y 8/30 = 0.267, y-z 2/8 = 0.25, z-w 0, p-q 6/8 = 0.75, r-s 2/10 = 0.2 exactly (kept: not < 0.2)
    records = CRAFTED + [{"a": "r.png", "b": "s.png", "votes_a": 4, "votes_b": 6, "abstain": 0}]
    out, _, stats = run(tmp_path, records, min_margin=0.2)
    assert set(labels(out)) == {("x.png", "y.png"), ("y.png", "z.png"), ("p.png", "q.png"), ("r.png", "s.png")}
    assert labels(out)[("r.png", "s.png")] == 0.0
    assert stats["pairs_dropped"] == {"min_valid_votes": 2, "min_margin": 1, "ties": 0}  # the tie went by margin

    out, _, stats = run(tmp_path, records, min_margin=0.26)
    assert set(labels(out)) == {("x.png", "y.png"), ("p.png", "q.png")}
    assert stats["pairs_dropped"] == {"min_valid_votes": 2, "min_margin": 3, "ties": 0}

    out, _, stats = run(tmp_path, records, drop_ties=True)
    assert ("z.png", "w.png") not in labels(out) and len(out) == 4
    assert stats["pairs_dropped"] == {"min_valid_votes": 2, "min_margin": 0, "ties": 1}

    out, _, stats = run(tmp_path, records, min_valid_votes=10)  # 30 and 10 valid votes pass, 8 does not
    assert set(labels(out)) == {("x.png", "y.png"), ("r.png", "s.png")}
    assert stats["pairs_dropped"] == {"min_valid_votes": 5, "min_margin": 0, "ties": 0}


def test_duplicate_pairs_are_merged_with_counts_swapped(tmp_path):
    records = [
        {"a": "x.png", "b": "y.png", "votes_a": 10, "votes_b": 2, "abstain": 0, "first_slot_wins": 7},
        {"a": "y.png", "b": "z.png", "votes_a": 1, "votes_b": 2, "abstain": 0, "first_slot_wins": 1},
        {"a": "y.png", "b": "x.png", "votes_a": 3, "votes_b": 1, "abstain": 1, "first_slot_wins": 2},
        {"a": "x.png", "b": "y.png", "votes_a": 0, "votes_b": 4, "abstain": 0, "first_slot_wins": 4},
    ]
    with pytest.warns(UserWarning, match="2 pair.*recorded more than once"):
        out, _, stats = run(tmp_path, records)
    assert out == [{"a": "x.png", "b": "y.png", "kind": "random", "p_star": 1.0, "votes_a": 11, "votes_b": 9, "abstain": 1},
                   {"a": "y.png", "b": "z.png", "kind": "random", "p_star": 0.0, "votes_a": 1, "votes_b": 2, "abstain": 0}]
    assert stats["pair_records_in"] == 4 and stats["duplicate_records_merged"] == 2 and stats["pairs_in"] == 2
    assert stats["first_slot_win_rate"] == round((7 + 1 + 2 + 4) / (12 + 3 + 4 + 4), 6)


def test_first_slot_wins_is_optional(tmp_path):
    records = [{k: v for k, v in r.items() if k != "first_slot_wins"} for r in CRAFTED]
    _, _, stats = run(tmp_path, records)
    assert stats["first_slot_win_rate"] is None
    _, _, stats = run(tmp_path, records[:2] + CRAFTED[2:])  # only the records that have it count
    assert stats["first_slot_win_rate"] == round((5 + 0 + 3 + 0) / (8 + 0 + 8 + 0), 6)
    records = [CRAFTED[0], {**CRAFTED[0], "a": "y.png", "b": "x.png"}]
    del records[1]["first_slot_wins"]  # merged with a record without it: unknown for the pair
    with pytest.warns(UserWarning, match="recorded more than once"):
        _, _, stats = run(tmp_path, records)
    assert stats["first_slot_win_rate"] is None


def test_kind_passes_through_and_stats_split_by_kind(tmp_path, capsys):
    same = "same_reference"
    records = [{**CRAFTED[0], "kind": "random"}, {**CRAFTED[1], "kind": same}, {**CRAFTED[2], "kind": same},
               CRAFTED[3], {**CRAFTED[4], "kind": same}]  # a record without "kind" is a random pair
    out, _, stats = run(tmp_path, records)
    assert [r["kind"] for r in out] == ["random", same, same, same]
    random, ref = stats["by_kind"]["random"], stats["by_kind"][same]
    # random: x-y 19-11 (2 abstain, first slot 17), w-x all 32 abstain
    assert (random["pairs_in"], random["pairs_kept"], random["votes"]) == (2, 1, 64)
    assert random["abstention_rate"] == round(34 / 64, 6) and random["tie_rate"] == 0.0
    assert random["first_slot_win_rate"] == round(17 / 30, 6) and random["majority_agreement_mean"] == round(19 / 30, 6)
    # same reference: y-z 3-5 (first 4), z-w 4-4 (first 5), p-q 7-1 (first 3)
    assert (ref["pairs_in"], ref["pairs_kept"], ref["votes"], ref["abstention_rate"]) == (3, 3, 24, 0.0)
    assert ref["tie_rate"] == round(1 / 3, 6) and ref["first_slot_win_rate"] == 0.5
    assert ref["majority_agreement_mean"] == round((5 / 8 + 4 / 8 + 7 / 8) / 3, 6)
    assert ref["majority_agreement_histogram"]["counts"] == [1, 0, 1, 0, 0, 0, 0, 1, 0, 0]
    _, _, stats = run(tmp_path, CRAFTED)
    assert set(stats["by_kind"]) == {"random"}
    err = run_error(tmp_path, capsys, [CRAFTED[0], {**CRAFTED[1], "kind": "synthetic"}])
    assert "votes.jsonl:2: 'kind' must be one of ['random', 'same_reference'], got 'synthetic'" in err
    # score mode: the kind comes from the drawn pairs
    votes = write_jsonl(tmp_path / "votes.jsonl", [{"image": "x.png", "scores": [3.0]}, {"image": "y.png",
                                                                                        "scores": [2.0]}])
    write_jsonl(tmp_path / "votes.jsonl.pairs.jsonl", [{"a": "x.png", "b": "y.png", "kind": same}])
    out, _, stats = run(tmp_path, votes)
    assert out[0]["kind"] == same and stats["by_kind"][same]["pairs_kept"] == 1
    write_jsonl(tmp_path / "votes.jsonl.pairs.jsonl", [{"a": "x.png", "b": "y.png", "kind": 3}])
    assert "votes.jsonl.pairs.jsonl:1: 'kind' must be one of" in run_error(tmp_path, capsys, votes)


# ---------------------------------------------------------------------------------------------------------------------
# Score mode
# ---------------------------------------------------------------------------------------------------------------------


def test_score_mode_votes_from_crafted_scores(tmp_path):
    scores = [
        {"image": "x.png", "scores": [3.0, 4.0, None, 2.0], "answers": ["..."] * 4},
        {"image": "y.png", "scores": [2.0, 4.0, 1.0, 3.0]},
        {"image": "z.png", "scores": [1.0, 1.0, 1.0]},  # a shorter list: sample 3 is missing, i.e. unparsed
    ]
    # x-y: k0 x wins, k1 equal, k2 x unparsed, k3 y wins -> 1-1, 2 abstain (tie)
    # z-x: k0, k1 x wins, k2 x unparsed, k3 z missing -> 0-2, 2 abstain
    # y-z: k0, k1 y wins, k2 equal, k3 z missing -> 2-0, 2 abstain
    votes = write_jsonl(tmp_path / "votes.jsonl", scores)
    write_jsonl(tmp_path / "votes.jsonl.pairs.jsonl", [{"a": "x.png", "b": "y.png"}, {"a": "z.png", "b": "x.png"},
                                                 {"a": "y.png", "b": "z.png"}, {"a": "y.png", "b": "x.png"}])
    with pytest.warns(UserWarning, match="1 pair.*duplicates ignored"):
        out, ranks, stats = run(tmp_path, votes)
    assert out == [{"a": "x.png", "b": "y.png", "kind": "random", "p_star": 0.5, "votes_a": 1, "votes_b": 1, "abstain": 2},
                   {"a": "z.png", "b": "x.png", "kind": "random", "p_star": 0.0, "votes_a": 0, "votes_b": 2, "abstain": 2},
                   {"a": "y.png", "b": "z.png", "kind": "random", "p_star": 1.0, "votes_a": 2, "votes_b": 0, "abstain": 2}]
    assert stats["mode"] == "score" and stats["first_slot_win_rate"] is None
    assert stats["abstention_rate"] == 0.5 and stats["tie_rate"] == round(1 / 3, 6)
    assert [r["image"] for r in ranks][-1] == "z.png"

    (tmp_path / "votes.jsonl.pairs.jsonl").rename(tmp_path / "drawn.jsonl")  # --pairs names another sidecar
    with pytest.warns(UserWarning, match="drawn.jsonl: 1 pair"):
        out2, _, _ = run(tmp_path, votes, pairs=str(tmp_path / "drawn.jsonl"), label="soft")
    assert [r["p_star"] for r in out2] == [0.5, 0.0, 1.0]


# ---------------------------------------------------------------------------------------------------------------------
# Rankings and Bradley-Terry
# ---------------------------------------------------------------------------------------------------------------------


def test_rankings_counts_by_hand(tmp_path):
    _, ranks, _ = run(tmp_path, CRAFTED)
    by_image = {r["image"]: r for r in ranks}
    expect = {  # (wins, losses, ties, win_rate) over the kept pairs
        "x.png": (1, 0, 0, 1.0), "y.png": (0, 2, 0, 0.0), "z.png": (1, 0, 1, 0.75), "w.png": (0, 0, 1, 0.5),
        "p.png": (1, 0, 0, 1.0), "q.png": (0, 1, 0, 0.0), "u.png": (0, 0, 0, None), "v.png": (0, 0, 0, None),
    }
    for image, (wins, losses, ties, win_rate) in expect.items():
        r = by_image[image]
        assert (r["wins"], r["losses"], r["ties"], r["win_rate"]) == (wins, losses, ties, win_rate), image
        assert r["comparisons"] == wins + losses + ties
    assert [r["rank"] for r in ranks] == list(range(1, 9))
    assert by_image["u.png"]["bt_strength"] == 0.0 == by_image["v.png"]["bt_strength"]  # never compared: the prior
    assert by_image["u.png"]["rank"] + 1 == by_image["v.png"]["rank"]  # equal strength: by name
    strengths = [r["bt_strength"] for r in ranks]
    assert strengths == sorted(strengths, reverse=True)
    assert by_image["x.png"]["bt_strength"] > by_image["y.png"]["bt_strength"]


def brute_force_bt(pairs, n_images, prior):
    """The same penalised likelihood written independently (loops, math), maximised by a derivative-free method."""
    def nll(theta):
        total = 0.0
        for i, j, wins_i, wins_j in pairs:
            total -= wins_i * math.log(1 / (1 + math.exp(theta[j] - theta[i])))
            total -= wins_j * math.log(1 / (1 + math.exp(theta[i] - theta[j])))
        for t in theta:  # half a virtual win and half a virtual loss against theta = 0, per prior game
            total -= prior / 2 * (math.log(1 / (1 + math.exp(-t))) + math.log(1 / (1 + math.exp(t))))
        return total
    result = minimize(nll, np.zeros(n_images), method="Nelder-Mead",
                      options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 200_000, "maxfev": 200_000})
    return result.x


@pytest.mark.parametrize("prior", [0.1, 1.0])
def test_bradley_terry_matches_brute_force_ml(prior):
    # image 0 is undefeated (its plain ML strength is infinite), image 4 is never compared
    pairs = [(0, 1, 5, 0), (0, 2, 3, 0), (1, 2, 4, 2), (2, 3, 6, 1), (3, 1, 2, 5)]
    a, b, wins_a, wins_b = (np.array(c) for c in zip(*pairs))
    theta = bp.bradley_terry(a, b, wins_a, wins_b, 5, prior)
    expected = brute_force_bt(pairs, 5, prior)
    np.testing.assert_allclose(theta, expected, atol=2e-4)
    assert np.isfinite(theta).all() and theta[0] == theta.max() and theta[4] == 0.0


def test_bradley_terry_recovers_a_known_ranking(tmp_path):
    rng = np.random.default_rng(1)
    n_images, n_pairs, k = 200, 2000, 32
    true = rng.normal(0, 1, n_images)
    a, b = rng.integers(0, n_images, (2, 3 * n_pairs))
    a, b = a[a != b], b[a != b]
    _, first = np.unique(np.minimum(a, b) * n_images + np.maximum(a, b), return_index=True)
    a, b = a[np.sort(first)[:n_pairs]], b[np.sort(first)[:n_pairs]]
    abstain = rng.binomial(k, 0.1, n_pairs)
    votes_a = rng.binomial(k - abstain, 1 / (1 + np.exp(true[b] - true[a])))
    records = [{"a": f"{i}.png", "b": f"{j}.png", "votes_a": int(va), "votes_b": int(k - ab - va), "abstain": int(ab)}
               for i, j, va, ab in zip(a, b, votes_a, abstain)]
    _, ranks, stats = run(tmp_path, records)
    fitted = {int(r["image"].split(".")[0]): r["bt_strength"] for r in ranks}
    srcc = spearmanr(true[list(fitted)], list(fitted.values()))[0]
    assert srcc > 0.95, srcc
    assert stats["pairs_in"] == n_pairs and stats["connected_components"] == 1


# ---------------------------------------------------------------------------------------------------------------------
# Stats
# ---------------------------------------------------------------------------------------------------------------------


def test_stats_by_hand(tmp_path):
    _, _, stats = run(tmp_path, CRAFTED)
    assert stats["images"] == 8 and stats["images_in_kept_pairs"] == 6
    assert stats["tie_rate"] == 0.25  # 1 tie among the 4 pairs with a valid vote
    assert stats["abstention_rate"] == round(42 / 96, 6)  # (2 + 32 + 8) / (32 + 8 + 8 + 32 + 8 + 8)
    assert stats["first_slot_win_rate"] == round((17 + 4 + 5 + 3) / (30 + 8 + 8 + 8), 6)
    assert stats["votes_per_pair_mean"] == 16.0
    assert stats["votes"] == 96 and stats["votes_file"] == str(tmp_path / "votes.jsonl")
    assert stats["majority_agreement_mean"] == round((19 / 30 + 5 / 8 + 4 / 8 + 7 / 8) / 4, 6)
    hist = stats["majority_agreement_histogram"]  # agreements 19/30 = .633, 5/8 = .625, .5, 7/8 = .875
    assert hist["edges"][0] == 0.5 and hist["edges"][-1] == 1.0 and len(hist["counts"]) == 10
    assert hist["counts"] == [1, 0, 2, 0, 0, 0, 0, 1, 0, 0]
    assert stats["connected_components"] == 2 and stats["largest_component_images"] == 4  # x-y-z-w and p-q
    # hand-made records carry no per-answer flags: the rate is unknown, and the stats say so
    assert stats["truncated_answers"] == 0 and stats["truncation_rate"] is None
    assert stats["truncation_flags"] == "absent: truncation unknown for 96 of 96 answers (not written by " \
                                        "sample_votes.py)"


def answers(choices: str, truncated: str) -> list[dict]:
    """Per-answer records as sample_votes.py --no-text writes them: choices 'a'/'b'/'-' (none), truncated 'T'/'.'."""
    return [{"order": "ab", "choice": None if c == "-" else c, "truncated": t == "T"} for c, t in zip(choices, truncated)]


def test_truncation_rate_from_answer_flags(tmp_path, capsys):
    records = [{"a": "x.png", "b": "y.png", "votes_a": 2, "votes_b": 1, "abstain": 3,
                "answers": answers("ab-a--", "..T.T.")},  # 2 of the 3 abstentions were cut off
               {"a": "y.png", "b": "z.png", "votes_a": 0, "votes_b": 2, "abstain": 2, "answers": answers("-bb-", "T..T")}]
    _, _, stats = run(tmp_path, records)
    assert (stats["truncated_answers"], stats["truncation_rate"]) == (4, 0.4)  # 4 of 10 votes
    assert stats["truncation_flags"] == "every answer" and stats["abstention_rate"] == 0.5
    assert "truncation rate 0.4" in capsys.readouterr().out
    # one record without flags: the rate covers the others, and the stats say how many answers it misses
    _, _, stats = run(tmp_path, records + [CRAFTED[4]])
    assert stats["truncation_rate"] == 0.4 and "unknown for 8 of 18 answers" in stats["truncation_flags"]
    # bad flags: a cut-off answer that still voted, a flag that is not a boolean, answers that are not objects
    for bad, message in (
            ({**records[0], "answers": answers("ab-a--", "T.T.T.")}, "votes.jsonl:1: an answer cut off by the token "
                                                                      "budget (truncated) counts as a vote"),
            ({**records[0], "answers": [{**x, "truncated": "no"} for x in records[0]["answers"]]},
             "votes.jsonl:1: 'truncated' must be one true/false flag per answer"),
            ({**records[0], "answers": [{"truncated": True}, {"choice": None}]},
             "votes.jsonl:1: 'truncated' must be one true/false flag per answer"),
            ({**records[0], "answers": "ab-a--"}, "votes.jsonl:1: 'answers' must be a list of objects")):
        assert message in run_error(tmp_path, capsys, [bad])


def test_score_mode_truncation_rate(tmp_path, capsys):
    write_jsonl(tmp_path / "votes.jsonl.pairs.jsonl", [{"a": "x.png", "b": "y.png"}])
    scores = [{"image": "x.png", "scores": [3.0, None, None, 2.0], "truncated": [False, True, False, False]},
              {"image": "y.png", "scores": [2.0, 4.0, None, 3.0], "truncated": [False, False, True, False]}]
    _, _, stats = run(tmp_path, write_jsonl(tmp_path / "votes.jsonl", scores))
    assert (stats["truncated_answers"], stats["truncation_rate"]) == (2, 0.25)  # 2 of 8 score samples
    assert stats["truncation_flags"] == "every answer"
    _, _, stats = run(tmp_path, write_jsonl(tmp_path / "votes.jsonl", [scores[0], {"image": "y.png",
                                                                                   "scores": [1.0, 2.0]}]))
    assert stats["truncation_rate"] == 0.25 and "unknown for 2 of 6 answers" in stats["truncation_flags"]
    for bad, message in (({**scores[0], "truncated": [False, True, False, True]}, "votes.jsonl:1: an answer cut off"),
                         ({**scores[0], "truncated": [False, True]}, "votes.jsonl:1: 'truncated' must be one"),
                         ({**scores[0], "truncated": [0, 1, 0, 0]}, "votes.jsonl:1: 'truncated' must be one")):
        assert message in run_error(tmp_path, capsys, write_jsonl(tmp_path / "votes.jsonl", [bad]))


# ---------------------------------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------------------------------


def test_malformed_line_names_file_and_line(tmp_path, capsys):
    records = [json.dumps(CRAFTED[0]), '{"a": "x.png", "b": ', json.dumps(CRAFTED[1])]
    err = run_error(tmp_path, capsys, write_jsonl(tmp_path / "votes.jsonl", records))
    assert "votes.jsonl:2: malformed JSONL line" in err
    err = run_error(tmp_path, capsys, write_jsonl(tmp_path / "votes.jsonl", [CRAFTED[0], "[1, 2]", CRAFTED[1]]))
    assert "votes.jsonl:2: malformed JSONL line: not a JSON object" in err


def test_truncated_last_line_is_dropped_with_a_warning(tmp_path):
    votes = tmp_path / "votes.jsonl"
    votes.write_text(json.dumps(CRAFTED[0]) + "\n\n" + json.dumps(CRAFTED[1]) + "\n" + '{"a": "z.png", "b": "w.p')
    with pytest.warns(UserWarning, match="votes.jsonl:4: dropping a partial last line"):
        out, _, _ = run(tmp_path, votes)
    assert len(out) == 2


@pytest.mark.parametrize("bad, message", [
    ({"image": "x.png", "score": 3.0}, "votes.jsonl:1: expected a score-mode record with ['image', 'scores']"),
    ({"pair": ["x.png", "y.png"]}, "votes.jsonl:1: unknown record shape"),
    ({"a": "x.png", "b": "y.png", "votes_a": 1}, "votes.jsonl:1: expected a compare-mode record"),
    ({"a": "x.png", "b": "y.png", "votes_a": 1.5, "votes_b": 0, "abstain": 0}, "votes.jsonl:1: votes_a"),
    ({"a": "x.png", "b": "y.png", "votes_a": -1, "votes_b": 0, "abstain": 0}, "votes.jsonl:1: votes_a"),
    ({"a": "x.png", "b": "x.png", "votes_a": 1, "votes_b": 0, "abstain": 0}, "votes.jsonl:1: a pair of 'x.png'"),
    ({"a": "x.png", "b": "y.png", "votes_a": 1, "votes_b": 0, "abstain": 0, "first_slot_wins": 2},
     "votes.jsonl:1: first_slot_wins"),
])
def test_bad_records_are_clear_errors(tmp_path, capsys, bad, message):
    assert message in run_error(tmp_path, capsys, [bad])


def test_mixed_and_score_mode_errors(tmp_path, capsys):
    err = run_error(tmp_path, capsys, [CRAFTED[0], {"image": "x.png", "scores": [3.0]}])
    assert "votes.jsonl:2: expected a compare-mode record" in err
    err = run_error(tmp_path, capsys, [{"image": "x.png", "scores": [3.0]}, CRAFTED[0]])
    assert "votes.jsonl:2: expected a score-mode record" in err
    err = run_error(tmp_path, capsys, [{"image": "x.png", "scores": ["3.0"]}])
    assert "votes.jsonl:1: 'image' must be a path and 'scores' a list of numbers or null" in err
    err = run_error(tmp_path, capsys, [{"image": "x.png", "scores": [3.0]}])
    assert "votes.jsonl.pairs.jsonl does not exist" in err


def test_image_names_are_one_image_each_and_stay_relative(tmp_path, capsys):
    records = [{**CRAFTED[0], "a": "./x.png"}, {**CRAFTED[1], "b": "sub//../z.png"}, {**CRAFTED[2], "a": "z.png"}]
    out, ranks, stats = run(tmp_path, records)
    assert [(r["a"], r["b"]) for r in out] == [("x.png", "y.png"), ("y.png", "z.png"), ("z.png", "w.png")]
    assert stats["images"] == 4 and len(ranks) == 4
    for bad, message in (({**CRAFTED[0], "a": "./y.png"}, "votes.jsonl:1: a pair of './y.png' with itself"),
                         ({**CRAFTED[0], "a": "/etc/x.png"}, "votes.jsonl:1: image name '/etc/x.png' is outside"),
                         ({**CRAFTED[0], "b": "../y.png"}, "votes.jsonl:1: image name '../y.png' is outside")):
        assert message in run_error(tmp_path, capsys, [bad])
    votes = write_jsonl(tmp_path / "votes.jsonl", [{"image": "x.png", "scores": [3.0]}])
    write_jsonl(tmp_path / "votes.jsonl.pairs.jsonl", [{"a": "x.png", "b": "./x.png"}])
    assert "votes.jsonl.pairs.jsonl:1: expected" in run_error(tmp_path, capsys, votes)
    write_jsonl(tmp_path / "votes.jsonl.pairs.jsonl", [{"a": "x.png", "b": "../y.png"}])
    assert "votes.jsonl.pairs.jsonl:1: image name '../y.png' is outside" in run_error(tmp_path, capsys, votes)


def test_second_run_unwritable_out_and_non_utf8_input_are_one_line_errors(tmp_path, capsys):
    import common

    with common.output_lock(tmp_path / "pl.jsonl"):  # another run writing the same outputs
        err = run_error(tmp_path, capsys, CRAFTED)
    assert err.startswith(f"error: {tmp_path / 'pl.jsonl'} is in use by another run (pid ") and \
        len(err.strip().splitlines()) == 1
    run(tmp_path, CRAFTED)  # released: the next run goes ahead
    (tmp_path / "file").write_text("")
    votes = write_jsonl(tmp_path / "votes.jsonl", CRAFTED)
    with pytest.raises(SystemExit) as e:
        bp.main(bp.Args(votes=str(votes), out=str(tmp_path / "file" / "pl.jsonl")))
    assert e.value.code == 2 and f"cannot write to {tmp_path / 'file'}" in capsys.readouterr().err
    votes.write_bytes(json.dumps(CRAFTED[0]).encode() + b"\n\xff\xfe{}\n" + json.dumps(CRAFTED[1]).encode() + b"\n")
    assert "votes.jsonl:2: malformed JSONL line" in run_error(tmp_path, capsys, votes)


def test_empty_results_exit_2_with_the_reason(tmp_path, capsys):
    err = run_error(tmp_path, capsys, [CRAFTED[3], CRAFTED[5]])
    assert "no pair kept out of 2" in err and "'min_valid_votes': 2" in err
    err = run_error(tmp_path, capsys, [CRAFTED[2]], drop_ties=True)
    assert "no pair kept out of 1" in err and "'ties': 1" in err
    err = run_error(tmp_path, capsys, [])
    assert "no votes in the file" in err
    assert not (tmp_path / "pl.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------------------
# The real command line: exit codes, byte-identical reruns
# ---------------------------------------------------------------------------------------------------------------------


def cli(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "build_pseudolabels.py", "--votes", str(tmp_path / "votes.jsonl"),
           "--out", str(tmp_path / "pl.jsonl"), "--rankings", str(tmp_path / "rank.jsonl"),
           "--stats", str(tmp_path / "stats.json"), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_is_byte_identical_when_rerun(tmp_path):
    rng = np.random.default_rng(2)
    records = [{"a": f"{i}.png", "b": f"{j}.png", "votes_a": int(va), "votes_b": int(30 - va), "abstain": 2}
               for i, j, va in zip(rng.integers(0, 50, 300), rng.integers(50, 100, 300), rng.integers(0, 31, 300))]
    write_jsonl(tmp_path / "votes.jsonl", records)
    outputs = []
    for _ in range(2):
        proc = cli(tmp_path, "--label", "soft", "--min-margin", "0.1")
        assert proc.returncode == 0, proc.stderr
        outputs.append([(tmp_path / name).read_bytes() for name in ("pl.jsonl", "rank.jsonl", "stats.json")])
    assert outputs[0] == outputs[1]
    assert "kept" in proc.stdout and not list(tmp_path.glob("*.tmp"))
    assert len(read_jsonl(tmp_path / "rank.jsonl")) == len({r[k] for r in records for k in "ab"})


def test_cli_exit_code_2_on_bad_input(tmp_path):
    write_jsonl(tmp_path / "votes.jsonl", [CRAFTED[0], "not json", CRAFTED[1]])
    proc = cli(tmp_path)
    assert proc.returncode == 2 and "votes.jsonl:2:" in proc.stderr and "Traceback" not in proc.stderr
    write_jsonl(tmp_path / "votes.jsonl", [CRAFTED[3]])
    proc = cli(tmp_path)
    assert proc.returncode == 2 and "no pair kept" in proc.stderr
    proc = cli(tmp_path, "--label", "medium")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_score_mode_warnings_for_inconsistent_files(tmp_path):
    votes = write_jsonl(tmp_path / "votes.jsonl", [{"image": "x.png", "scores": [3.0, 2.0]},
                                                   {"image": "y.png", "scores": [2.0, 2.5]},
                                                   {"image": "x.png", "scores": [1.0, 1.0]}])
    write_jsonl(tmp_path / "votes.jsonl.pairs.jsonl",
                [{"a": "x.png", "b": "y.png"}, {"a": "x.png", "b": "gone.png"}])
    with pytest.warns(UserWarning) as record:
        out, ranks, stats = run(tmp_path, votes)
    messages = " | ".join(str(w.message) for w in record)
    assert "votes.jsonl:3: image 'x.png' recorded twice; keeping its first record" in messages
    assert "1 image(s) in the pairs have no score record" in messages
    assert out == [{"a": "x.png", "b": "y.png", "kind": "random", "p_star": 0.5, "votes_a": 1, "votes_b": 1, "abstain": 0}]
    assert stats["pairs_dropped"]["min_valid_votes"] == 1 and len(ranks) == 3


def test_oracle_labels_every_voted_pair_from_the_mos(tmp_path, capsys):
    import hashlib
    mos = {"x.png": 3.0, "y.png": 1.5, "z.png": 3.0, "w.png": 3.0, "p.png": 2.0, "q.png": 2.5, "u.png": 0.0,
           "v.png": 1.0, "unvoted.png": 9.0}
    oracle = write_jsonl(tmp_path / "mos.jsonl", [{"image": ("./" if i % 2 else "") + name, "mos": m}
                                                   for i, (name, m) in enumerate(mos.items())])
    out, ranks, stats = run(tmp_path, CRAFTED, oracle=str(oracle))
    expected = []  # every pair of the file, abstentions or not, labelled by comparing the two numbers
    for r in CRAFTED:
        ma, mb = mos[r["a"]], mos[r["b"]]
        expected.append(((r["a"], r["b"]), 1.0 if ma > mb else 0.0 if ma < mb else 0.5))
    assert [((r["a"], r["b"]), r["p_star"]) for r in out] == expected
    assert [r["votes_a"] for r in out] == [r["votes_a"] for r in CRAFTED]  # the vote counts pass through
    assert stats["pairs_kept"] == 6 and stats["labels"]["source"] == "oracle"
    assert stats["labels"]["oracle_file"] == str(oracle)
    assert stats["labels"]["oracle_sha256"] == hashlib.sha256(oracle.read_bytes()).hexdigest()
    assert [p for _, p in expected] == [1.0, 0.0, 0.5, 0.5, 0.0, 0.0]  # the crafted mos hold every case
    # the four pairs with a valid vote: majority x>y, y<z, z=w, p>q against the mos x>y, y<z, z=w, p<q
    assert stats["labels"]["votes_agree_with_oracle"] == 0.75
    (tmp_path / "votes").mkdir()
    assert ranks == run(tmp_path / "votes", CRAFTED)[1]  # the rankings still describe the votes
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"image": n, "mos": m} for n, m in mos.items() if n != "q.png"])
    assert "no mos for the voted image 'q.png'" in run_error(tmp_path, capsys, CRAFTED, oracle=str(missing))
    twice = write_jsonl(tmp_path / "twice.jsonl", [{"image": "x.png", "mos": 1}, {"image": "./x.png", "mos": 2}])
    assert f"{twice}:2: image './x.png' is listed twice" in run_error(tmp_path, capsys, CRAFTED, oracle=str(twice))
    assert "apply to votes" in run_error(tmp_path, capsys, CRAFTED, oracle=str(oracle), drop_ties=True)
