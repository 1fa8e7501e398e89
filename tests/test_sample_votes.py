"""sample_votes.py: pair draws (random and same-reference), order balance, identity mapping, abstentions, resume,
skips, 2 processes, meta, refusals, the output lock and one-line errors.

Most runs use a scripted model (plugged in at the generate_fn seam) whose answers are known: it prefers the brighter
image and, per prompt, sample j answers junk (j % 4 == 0), a correct answer cut off by the token budget (j % 4 == 1),
or the correct boxed answer. Expectations are computed independently from the image pixels.

Run as a script, this file is sample_votes.py with the scripted model, for the torchrun test:
    torchrun --nproc_per_node 2 tests/test_sample_votes.py --model scripted --images DIR --out votes.jsonl ...
"""

import dataclasses
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import prompts  # noqa: E402
import sampling  # noqa: E402
import sample_votes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# ---------------------------------------------------------------------------------------------------------------------
# The scripted model
# ---------------------------------------------------------------------------------------------------------------------

def brightness(img: Image.Image) -> float:
    return float(np.asarray(img, dtype=np.float64).mean())


def scripted_completion(imgs: list, j: int) -> sampling.Completion:
    if len(imgs) == 2:
        answer = f"\\boxed{{{0 if brightness(imgs[0]) > brightness(imgs[1]) else 1}}}"
    else:
        answer = f"\\boxed{{{1 + 4 * brightness(imgs[0]) / 255:.2f}}}"
    if j % 4 == 0:  # out of range for both tasks: unparseable, never guessed
        return sampling.Completion("<think> hmm </think> \\boxed{7}", False)
    if j % 4 == 1:  # cut off: an abstention, though parseable
        return sampling.Completion(f"<think> the brighter one </think> {answer} and then", True)
    return sampling.Completion(f"<think> the brighter one </think> {answer}", False)


def scripted(calls: list | None = None, fail_after: int | None = None, delay: float = 0.0):
    """A generate_fn; records (prompts, n) per call; raises after `fail_after` calls (a crash mid-run). Sample j of a
    prompt is its completion number first_index + j (a prompt's samples may be split over calls)."""
    def generate(prompt, images, n, keys, first_index):
        time.sleep(delay)
        if fail_after is not None and calls is not None and len(calls) >= fail_after:
            raise RuntimeError("killed")
        if calls is not None:
            calls.append((len(images), n))
        return [[scripted_completion(imgs, first + j) for j in range(n)] for imgs, first in zip(images, first_index)]
    return generate


def always(index: int):
    """A maximally position-biased model: always answers `index` (0: the first image shown)."""
    return lambda prompt, images, n, keys, first_index: [[sampling.Completion(f"\\boxed{{{index}}}", False)] * n
                                                         for _ in images]


def expected_counts(pool: Path, a: str, b: str, k: int, seed: int = 0) -> dict:
    """votes/abstentions/first-slot wins of the scripted model, worked out per order from its rule."""
    a_better = brightness(Image.open(pool / a).convert("RGB")) > brightness(Image.open(pool / b).convert("RGB"))
    counts = {"votes_a": 0, "votes_b": 0, "abstain": 0, "first_slot_wins": 0}
    for order, n in sample_votes.vote_orders(a, b, k, seed).items():
        valid = sum(j % 4 >= 2 for j in range(n))
        counts["abstain"] += n - valid
        counts["votes_a" if a_better else "votes_b"] += valid
        first_is_better = a_better == (order == "ab")
        counts["first_slot_wins"] += valid if first_is_better else 0
    return counts


def run(monkeypatch, generate_fn, *argv):
    monkeypatch.setattr(sample_votes, "load_generate_fn", lambda args, device: generate_fn)
    sample_votes.main([str(a) for a in argv])


def base_argv(pool, out, *extra):
    return ["--model", "scripted", "--images", pool, "--out", out, "--num-pairs", 20, "--votes-per-pair", 8,
            "--batch-size", 16, *extra]


@pytest.fixture()
def pool(demo_pool, tmp_path) -> Path:
    """A private copy of the demo pool (some tests corrupt an image)."""
    return Path(shutil.copytree(demo_pool, tmp_path / "pool"))


# ---------------------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------------------

def test_sample_pairs_distinct_deterministic_capped():
    pairs = sample_votes.sample_pairs(50, 300, seed=3)
    assert len(pairs) == 300 and len(set(pairs)) == 300
    assert all(0 <= i < j < 50 for i, j in pairs)  # unordered (i < j), no self-pairs
    assert pairs == sample_votes.sample_pairs(50, 300, seed=3)
    assert pairs != sample_votes.sample_pairs(50, 300, seed=4)
    every = sample_votes.sample_pairs(7, 1000, seed=0)  # more asked than exist: all 21, each once
    assert sorted(every) == list(itertools.combinations(range(7), 2))
    assert every != sorted(every)  # still in drawn (shuffled) order
    big = sample_votes.sample_pairs(10_000, 2000, seed=0)  # the decode of pair numbers is exact for big pools
    assert len(set(big)) == 2000 and all(0 <= i < j < 10_000 for i, j in big)
    # uniform: every image shows up about equally often over many draws
    counts = np.bincount(np.array(sample_votes.sample_pairs(20, 190, seed=1)).ravel(), minlength=20)
    assert (counts == 19).all()


def test_sample_pairs_fewer_are_the_start_of_more():
    """A draw of n pairs is the first n of a draw of m > n (same images and seed), for a pool whose pairs are listed
    and for one whose pairs are drawn in blocks: runs with fewer pairs (SYNTH_MIX=replace) share their pairs."""
    for n_images in (50, 3000):  # 1225 pairs; 4.5 M pairs (more than are listed)
        many = sample_votes.sample_pairs(n_images, 1000, seed=5)
        assert len(set(many)) == 1000
        for n in (1, 250, 999):
            assert sample_votes.sample_pairs(n_images, n, seed=5) == many[:n]


def test_vote_orders_balanced():
    assert sample_votes.vote_orders("x", "y", 32, 0) == {"ab": 16, "ba": 16}
    extras = []
    for p in range(200):
        orders = sample_votes.vote_orders(f"i{p}", f"j{p}", 5, seed=0)
        assert sorted(orders.values()) == [2, 3]
        assert orders == sample_votes.vote_orders(f"i{p}", f"j{p}", 5, seed=0)  # same whoever asks
        extras.append(max(orders, key=orders.get))
    assert 70 < extras.count("ab") < 130  # the extra vote's order is random, not always the same
    assert sorted(sample_votes.vote_orders("x", "y", 1, 0).values()) == [0, 1]


def test_identity_mapping_abstentions_and_batching(demo_pool):
    _, names = common.list_images(demo_pool)
    pairs = [(names[i], names[j]) for i, j in sample_votes.sample_pairs(len(names), 15, 0)]
    images = {x: common.load_image(demo_pool / x) for x in names}
    prompt = prompts.get_preset("evoquality").prompt("compare", True)
    parse = prompts.parse_compare
    for k in (8, 5):
        calls = []
        records = sample_votes.vote_pairs(pairs, images, scripted(calls), prompt, parse, k, 0, batch_size=12)
        assert [(r["a"], r["b"]) for r in records] == pairs
        for r in records:
            assert {key: r[key] for key in ("votes_a", "votes_b", "abstain", "first_slot_wins")} == \
                expected_counts(demo_pool, r["a"], r["b"], k)
            orders = [x["order"] for x in r["answers"]]
            assert abs(orders.count("ab") - orders.count("ba")) == k % 2 and len(orders) == k
            per_order = sample_votes.vote_orders(r["a"], r["b"], k, 0).values()
            assert sum(x["truncated"] for x in r["answers"]) == sum(j % 4 == 1 for n in per_order for j in range(n))
        assert all(n_prompts * n <= 12 for n_prompts, n in calls)  # batched within --batch-size sequences
        assert len(calls) < len(pairs)  # many prompts per call
        # the grouping into generate calls does not change any vote, nor a prompt's samples split over calls
        one_by_one, calls = [], []
        one_by_one = sample_votes.vote_pairs(pairs, images, scripted(calls), prompt, parse, k, 0, batch_size=1)
        assert one_by_one == records and set(calls) == {(1, 1)} and len(calls) == k * len(pairs)
    # a model that always picks the first slot: votes split evenly between a and b, all "won" by the first slot
    for index, first_wins in ((0, 8), (1, 0)):
        for r in sample_votes.vote_pairs(pairs, images, always(index), prompt, parse, 8, 0, 64, keep_text=False):
            assert (r["votes_a"], r["votes_b"], r["abstain"], r["first_slot_wins"]) == (4, 4, 0, first_wins)
            assert "text" not in r["answers"][0]
            chosen_first = [x["choice"] == ("a" if x["order"] == "ab" else "b") for x in r["answers"]]
            assert all(chosen_first) == (index == 0)


def test_default_batch_size_follows_the_voting_plan_at_7b_and_says_why():
    """The default --batch-size against bench/memory_plan.py --voting (Qwen2.5-VL-7B, one 80 GiB GPU, K = 32, every
    vote run to 512 tokens): whole prompts, below the largest batch with a margin, not far below it."""
    sys.path.insert(0, str(ROOT / "bench"))
    import memory_plan

    field = next(f for f in dataclasses.fields(sample_votes.Args) if f.name == "batch_size")
    cfg = json.loads((ROOT / "bench" / "qwen2_5_vl_7b_config.json").read_text())
    plan = memory_plan.voting_plan(cfg, memory_plan.Settings(config="unused", gpus=1))
    largest = plan["plans"][True]["prompts"] * plan["n"]
    peak = plan["call"](field.default // plan["n"])["peak"]
    assert field.default % plan["n"] == 0 and largest == 1648  # whole prompts of K/2 = 16 votes
    assert peak < 60 * memory_plan.GiB and 2 * field.default > largest  # a margin of 20 GiB, half the largest or more
    help_text = field.metadata["help"]
    assert f"{field.default} fits 7B on one 80 GB GPU with {int((80 * memory_plan.GiB - peak) / memory_plan.GiB)} " \
           f"GiB to spare" in help_text and "1,648 at most" in help_text, (help_text, peak / memory_plan.GiB)


# ---------------------------------------------------------------------------------------------------------------------
# The script: files, resume, skips, processes
# ---------------------------------------------------------------------------------------------------------------------

def test_run_meta_and_summary(pool, tmp_path, monkeypatch, capsys):
    out = tmp_path / "votes.jsonl"
    run(monkeypatch, scripted(), *base_argv(pool, out))
    records = common.read_jsonl(out)
    _, names = common.list_images(pool)
    assert [(r["a"], r["b"]) for r in records] == \
        [(names[i], names[j]) for i, j in sample_votes.sample_pairs(len(names), 20, 0)]
    for r in records:
        assert {key: r[key] for key in ("votes_a", "votes_b", "abstain", "first_slot_wins")} == \
            expected_counts(pool, r["a"], r["b"], 8)
    meta = json.loads(Path(f"{out}.meta.json").read_text())
    settings = meta["settings"]
    assert settings["model"] == "scripted" and settings["votes_per_pair"] == 8 and settings["mode"] == "compare"
    assert settings["prompt"] == "evoquality" and settings["prompt_hash"] == prompts.get_preset("evoquality").hash()
    assert len({p.hash() for p in prompts.PRESETS.values()}) == len(prompts.PRESETS)  # the hash tells presets apart
    assert meta["args"]["batch_size"] == 16 and meta["package_versions"]["torch"] != "missing"
    assert meta["started"] and meta["finished"]
    pool_stats = json.loads(Path(f"{out}.pool.json").read_text())
    assert pool_stats == {x: [(pool / x).stat().st_size, (pool / x).stat().st_mtime_ns] for x in names}
    # scripted: per order of 4 samples, 2 abstain (one of them cut off); the better image wins every valid vote,
    # once per slot
    expected = {"pairs": 20, "skipped_pairs": 0, "votes": 160, "abstention_rate": 0.5, "truncated_answers": 40,
                "truncation_rate": 0.25, "first_slot_win_rate": 0.5, "majority_agreement_mean": 1.0,
                "tie_rate": 0.0, "votes_per_pair_mean": 8.0}
    assert {key: meta["counts"][key] for key in expected} == expected
    printed = capsys.readouterr().out
    assert "abstention_rate 0.500" in printed and "truncation_rate 0.250" in printed
    assert not list(tmp_path.glob("votes.jsonl.shard-*")) and Path(f"{out}.skipped.jsonl").read_text() == ""


def test_resume_after_kill(pool, tmp_path, monkeypatch):
    reference = tmp_path / "ref" / "votes.jsonl"
    run(monkeypatch, scripted(), *base_argv(pool, reference))
    out = tmp_path / "votes.jsonl"
    with pytest.raises(RuntimeError, match="killed"):  # dies after 3 chunks of 2 pairs were written
        run(monkeypatch, scripted([], fail_after=3), *base_argv(pool, out))
    shard = tmp_path / "votes.jsonl.shard-00000.jsonl"
    data = shard.read_bytes()
    assert data.count(b"\n") == 6
    shard.write_bytes(data[:-40])  # a kill in the middle of writing the 6th line
    calls = []
    with pytest.warns(UserWarning, match="partial"):
        run(monkeypatch, scripted(calls), *base_argv(pool, out))
    assert sum(n_prompts for n_prompts, _ in calls) == 2 * (20 - 5)  # only the 15 missing pairs were voted again
    assert out.read_bytes() == reference.read_bytes()
    # the merged file itself cut mid-line: only its last pair is voted again
    out.write_bytes(out.read_bytes()[:-10])
    calls.clear()
    with pytest.warns(UserWarning, match="partial"):
        run(monkeypatch, scripted(calls), *base_argv(pool, out))
    assert calls == [(2, 4)] and out.read_bytes() == reference.read_bytes()
    # a merge killed after writing --out but before deleting the shards: the rerun merges again, votes nothing
    shutil.copy(reference, tmp_path / "votes.jsonl.shard-00003.jsonl")  # a leftover shard holding every pair
    calls.clear()
    run(monkeypatch, scripted(calls), *base_argv(pool, out))
    assert calls == [] and out.read_bytes() == reference.read_bytes()
    assert not list(tmp_path.glob("votes.jsonl.shard-*"))


def test_resume_after_sigkill(pool, tmp_path, monkeypatch):
    reference = tmp_path / "ref" / "votes.jsonl"
    run(monkeypatch, scripted(), *base_argv(pool, reference))
    out = tmp_path / "votes.jsonl"
    proc = subprocess.Popen([sys.executable, __file__, *map(str, base_argv(pool, out))], cwd=ROOT,
                            env={**ENV, "SCRIPTED_DELAY": "0.5"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard, deadline = tmp_path / "votes.jsonl.shard-00000.jsonl", time.time() + 120
    while not (shard.exists() and shard.read_bytes().count(b"\n") >= 4):
        assert proc.poll() is None and time.time() < deadline, "the scripted run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and shard.read_bytes().count(b"\n") < 20
    run(monkeypatch, scripted(), *base_argv(pool, out))
    assert out.read_bytes() == reference.read_bytes()


def refused(monkeypatch, capsys, argv, generate_fn=None) -> str:
    """The one-line error of a run that must be refused (exit 2, nothing voted)."""
    calls, _ = [], capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(monkeypatch, generate_fn or scripted(calls), *argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and calls == [] and len(err.splitlines()) == 1, err
    return err


def test_refuses_each_changed_setting(pool, tmp_path, monkeypatch, capsys):
    out = tmp_path / "votes.jsonl"
    run(monkeypatch, scripted(), *base_argv(pool, out))
    before, _ = out.read_bytes(), capsys.readouterr()
    for change, named in ((["--model", "other"], "model: 'scripted' -> 'other'"),
                          (["--prompt", "visualquality_r1"], "prompt: 'evoquality' -> 'visualquality_r1'; prompt_hash: "
                           f"'{prompts.PRESETS['evoquality'].hash()}' -> '{prompts.PRESETS['visualquality_r1'].hash()}'"),
                          (["--no-reasoning"], "reasoning: True -> False"),
                          (["--mode", "score"], "mode: 'compare' -> 'score'"),
                          (["--votes-per-pair", "6"], "votes_per_pair: 8 -> 6"),
                          (["--temperature", "0.7"], "temperature: 1.0 -> 0.7"),
                          (["--max-new-tokens", "64"], "max_new_tokens: 512 -> 64"),
                          (["--max-pixels", "3136"], "max_pixels: None -> 3136"),
                          (["--num-pairs", "10"], "num_pairs: 20 -> 10"),
                          (["--seed", "1"], "seed: 0 -> 1")):
        err = refused(monkeypatch, capsys, [*base_argv(pool, out), *change])  # argparse: the last occurrence wins
        assert err == f"error: {out} was made with other settings ({named}); use another --out, or --overwrite to " \
                      f"discard them", err
    # two changes at once: both named
    err = refused(monkeypatch, capsys, [*base_argv(pool, out), "--seed", "1", "--votes-per-pair", "6"])
    assert "votes_per_pair: 8 -> 6; seed: 0 -> 1" in err
    # the preset's text edited under the same name: its hash changes
    edited = dataclasses.replace(prompts.PRESETS["evoquality"], compare=prompts.PRESETS["evoquality"].compare + " ")
    with monkeypatch.context() as m:
        m.setitem(prompts.PRESETS, "evoquality", edited)
        err = refused(monkeypatch, capsys, base_argv(pool, out))
    assert f"prompt_hash: '{prompts.PRESETS['evoquality'].hash()}' -> '{edited.hash()}'" in err
    # another pool listing (one image more): the pair draw's input changed
    shutil.copy(pool / "pool_00000.png", pool / "pool_00012.png")
    assert "pool_names: " in refused(monkeypatch, capsys, base_argv(pool, out))
    (pool / "pool_00012.png").unlink()
    assert out.read_bytes() == before
    # not settings: --batch-size, --no-text, --strict (how the votes are computed and stored, not what they are)
    calls = []
    run(monkeypatch, scripted(calls), *base_argv(pool, out, "--batch-size", 4, "--no-text", "--strict"))
    assert calls == [] and out.read_bytes() == before
    run(monkeypatch, scripted(), *base_argv(pool, out), "--votes-per-pair", 4, "--overwrite")
    assert {len(r["answers"]) for r in common.read_jsonl(out)} == {4}
    assert json.loads(Path(f"{out}.meta.json").read_text())["settings"]["votes_per_pair"] == 4


def test_refuses_a_model_retrained_in_place(pool, tmp_path, monkeypatch, capsys):
    model, out = tmp_path / "model", tmp_path / "votes.jsonl"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights of round 1")
    argv = base_argv(pool, out, "--model", model, "--num-pairs", 3)
    run(monkeypatch, scripted(), *argv)
    old = common.fingerprint(model)
    assert json.loads(Path(f"{out}.meta.json").read_text())["settings"]["model"] == old
    (model / "model.safetensors").write_bytes(b"weights of round 2, retrained")  # same folder, same file names
    err = refused(monkeypatch, capsys, argv)
    assert f"model: '{old}' -> '{common.fingerprint(model)}'" in err and old != common.fingerprint(model)


def test_refuses_a_pool_image_modified_in_place(pool, tmp_path, monkeypatch, capsys):
    out = tmp_path / "votes.jsonl"
    argv = base_argv(pool, out, "--num-pairs", 3)
    run(monkeypatch, scripted(), *argv)
    voted = {x for r in common.read_jsonl(out) for x in (r["a"], r["b"])}
    _, names = common.list_images(pool)
    unvoted = sorted(set(names) - voted)
    assert len(voted) <= 6 and unvoted
    # an image without votes may change (nothing recorded depends on it): accepted, nothing voted again
    with Image.open(pool / unvoted[0]) as img:
        img.rotate(90).save(pool / unvoted[0])
    calls = []
    run(monkeypatch, scripted(calls), *argv)
    assert calls == []
    # an image with votes, rewritten in place under the same name (the same size, a later mtime): refused
    target = pool / sorted(voted)[0]
    data = target.read_bytes()
    stat = target.stat()
    target.write_bytes(data)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    err = refused(monkeypatch, capsys, argv)
    assert err == f"error: {out} holds votes on images changed since (size or mtime): {sorted(voted)[0]}; " \
                  f"use another --out, or --overwrite to discard them"
    # and one whose size changed
    with Image.open(target) as img:
        img.resize((64, 64)).save(target)
    assert sorted(voted)[0] in refused(monkeypatch, capsys, argv)


def test_refuses_an_out_without_meta_and_corrupt_sidecars(pool, tmp_path, monkeypatch, capsys):
    out = tmp_path / "votes.jsonl"
    run(monkeypatch, scripted(), *base_argv(pool, out))
    meta_path, pool_path = Path(f"{out}.meta.json"), Path(f"{out}.pool.json")
    for path, content in ((meta_path, b""), (meta_path, b'{"settings": {"mod'), (pool_path, b""), (pool_path, b"{")):
        original = path.read_bytes()
        path.write_bytes(content)  # a 0-byte or cut-off sidecar: one line naming it, not a JSONDecodeError
        err = refused(monkeypatch, capsys, base_argv(pool, out))
        assert err.startswith(f"error: {path} is empty or not valid JSON"), err
        path.write_bytes(original)
    meta_path.unlink()
    err = refused(monkeypatch, capsys, base_argv(pool, out))
    assert err == f"error: {out} exists without votes.jsonl.meta.json, so it cannot be resumed safely; " \
                  f"use another --out, or --overwrite to discard them"


def test_bad_runs_fail_before_loading_the_model_in_one_line(pool, tmp_path, monkeypatch, capsys):
    loads = []

    def load(args, device):
        loads.append(args.model)
        return scripted()

    def error(argv) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            sample_votes.main([str(a) for a in argv])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and loads == [], err
        return err

    monkeypatch.setattr(sample_votes, "load_generate_fn", load)
    (tmp_path / "file").write_text("")  # a folder that cannot be created: as unwritable as a read-only one
    assert error(base_argv(pool, tmp_path / "file" / "votes.jsonl")).startswith(f"error: cannot write to "
                                                                                f"{tmp_path / 'file'}")
    for value in ("nan", "inf", "0"):
        assert "--temperature must be a finite number > 0" in error(base_argv(pool, tmp_path / "v.jsonl",
                                                                               "--temperature", value))
    listed = tmp_path / "pool.txt"
    for lines, message in ((["pool_00001.png", "./pool_00001.png"], f"{listed}:2: pool_00001.png is listed twice"),
                           (["pool_00001.png", "../pool/pool_00002.png"], f"{listed}:2: image name '../pool/pool_0000"),
                           (["/etc/hostname", "pool_00002.png"], f"{listed}:1: image name '/etc/hostname' is outside")):
        listed.write_text("\n".join(lines) + "\n")
        assert error(base_argv(listed, tmp_path / "v.jsonl", "--images-root", pool)).startswith(f"error: {message}")
    out = tmp_path / "votes.jsonl"
    with common.output_lock(out):  # another run voting into the same --out
        err = error(base_argv(pool, out))
    assert err.startswith(f"error: {out} is in use by another run (pid {os.getpid()} on host ")
    assert not Path(f"{out}.meta.json").exists() and not out.exists()
    run(monkeypatch, scripted(), *base_argv(pool, out, "--num-pairs", 2))  # the lock released: the run goes ahead
    assert len(common.read_jsonl(out)) == 2


def test_corrupt_image_skipped_or_strict(pool, tmp_path, monkeypatch, capsys):
    (pool / "pool_00004.png").write_bytes(b"not a png at all")
    out = tmp_path / "votes.jsonl"
    run(monkeypatch, scripted(), *base_argv(pool, out, "--num-pairs", 66))  # all 66 pairs of 12 images
    records, skipped = common.read_jsonl(out), common.read_jsonl(f"{out}.skipped.jsonl")
    assert len(records) == 55 and all("pool_00004.png" not in (r["a"], r["b"]) for r in records)
    assert len(skipped) == 11 and all("pool_00004.png" in (s["a"], s["b"]) for s in skipped)
    assert all("pool_00004.png" in s["skipped"] for s in skipped)
    meta = json.loads(Path(f"{out}.meta.json").read_text())
    assert (meta["counts"]["pairs"], meta["counts"]["skipped_pairs"]) == (55, 11)
    # a rerun retries only the skipped pairs (the image may have been fixed) and keeps the rest
    calls = []
    run(monkeypatch, scripted(calls), *base_argv(pool, out, "--num-pairs", 66))
    assert calls == [] and len(common.read_jsonl(out)) == 55 and len(common.read_jsonl(f"{out}.skipped.jsonl")) == 11
    shutil.copy(tmp_path / "pool" / "pool_00005.png", pool / "pool_00004.png")  # fixed
    run(monkeypatch, scripted(), *base_argv(pool, out, "--num-pairs", 66))
    assert len(common.read_jsonl(out)) == 66 and common.read_jsonl(f"{out}.skipped.jsonl") == []
    (pool / "pool_00004.png").write_bytes(b"broken again")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(monkeypatch, scripted(), *base_argv(pool, tmp_path / "strict.jsonl", "--strict"))
    assert e.value.code == 2 and "pool_00004.png" in capsys.readouterr().err


def test_score_mode(pool, tmp_path, monkeypatch):
    out = tmp_path / "scores.jsonl"
    run(monkeypatch, scripted(), *base_argv(pool, out, "--mode", "score", "--num-pairs", 5, "--no-text"))
    pairs = [(p["a"], p["b"]) for p in common.read_jsonl(f"{out}.pairs.jsonl")]
    _, names = common.list_images(pool)
    assert pairs == [(names[i], names[j]) for i, j in sample_votes.sample_pairs(len(names), 5, 0)]
    records = common.read_jsonl(out)
    assert [r["image"] for r in records] == list(dict.fromkeys(x for pair in pairs for x in pair))
    for r in records:
        score = round(1 + 4 * brightness(Image.open(pool / r["image"]).convert("RGB")) / 255, 2)
        assert r["scores"] == [None, None, score, score] * 2 and "answers" not in r
        assert r["truncated"] == [False, True, False, False] * 2  # kept by --no-text
    counts = json.loads(Path(f"{out}.meta.json").read_text())["counts"]
    # per pair, samples 2, 3, 6, 7 of both images parsed (different brightness: a vote each), the rest abstain
    assert (counts["pairs"], counts["votes"], counts["abstention_rate"]) == (5, 40, 0.5)
    assert counts["truncated_answers"] == 2 * len(records) and counts["truncation_rate"] == 0.25


# ---------------------------------------------------------------------------------------------------------------------
# Same-reference pairs
# ---------------------------------------------------------------------------------------------------------------------

GROUPS = {"pool_00000.png": [0, 1, 2, 3], "pool_00004.png": [4, 5, 6, 7], "pool_00008.png": [8, 9]}  # 6 + 6 + 1 pairs


def write_manifest(path: Path, groups=GROUPS, extra=()) -> Path:
    """make_pool.py's manifest for a pool where image i is a version of the reference whose group holds it."""
    lines = [json.dumps({"image": f"pool_{i:05d}.png", "reference": ref, "type": None if f"pool_{i:05d}.png" == ref
                         else "gaussian_blur", "level": 3, "seed": i}) for ref, members in groups.items() for i in members]
    path.write_text("\n".join([*lines, *extra]) + "\n")
    return path


def test_sample_same_reference_pairs_within_groups_no_repeats_capped():
    groups = [[0, 1, 2, 3], [5, 7, 9], [10, 11]]
    taken = {(0, 1), (5, 9), (3, 10)}  # random pairs: two inside groups, one across
    pairs = sample_votes.sample_same_reference_pairs(groups, 6, 4, taken)
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    assert len(pairs) == 6 == len(set(pairs)) and not set(pairs) & taken
    assert all(i < j and group_of[i] == group_of[j] for i, j in pairs)
    assert pairs == sample_votes.sample_same_reference_pairs(groups, 6, 4, taken)
    assert pairs != sample_votes.sample_same_reference_pairs(groups, 6, 5, taken)
    every = sample_votes.sample_same_reference_pairs(groups, 100, 0, taken)  # 6 + 3 + 1 - 2 taken inside = 8 exist
    free = {(i, j) for m in groups for i, j in itertools.combinations(m, 2)} - taken
    assert len(every) == 8 and set(every) == free
    # a reference uniformly, then two of its versions: a 2-version reference gets the first pair half the time,
    # although it holds 1 of the 46 pairs
    first = [sample_votes.sample_same_reference_pairs([[0, 1], list(range(2, 12))], 1, seed, set())[0]
             for seed in range(2000)]
    assert 900 < first.count((0, 1)) < 1100
    inner = [p for p in first if p != (0, 1)]  # and within a reference, every pair of versions alike
    assert len(set(inner)) == 45 and max(map(inner.count, set(inner))) < 3 * len(inner) / 45


def test_same_reference_pairs_run(pool, tmp_path, monkeypatch, capsys):
    import build_pseudolabels

    manifest, out = write_manifest(tmp_path / "manifest.jsonl"), tmp_path / "votes.jsonl"
    argv = base_argv(pool, out, "--same-reference-pairs", 5, "--pool-manifest", manifest)
    run(monkeypatch, scripted(), *argv)
    records = common.read_jsonl(out)
    reference = {f"pool_{i:05d}.png": ref for ref, members in GROUPS.items() for i in members}
    _, names = common.list_images(pool)
    random_pairs = [(names[i], names[j]) for i, j in sample_votes.sample_pairs(len(names), 20, 0)]
    assert [(r["a"], r["b"]) for r in records[:20]] == random_pairs  # the random draw is unchanged by the option
    assert [r["kind"] for r in records] == ["random"] * 20 + ["same_reference"] * 5
    for r in records[20:]:
        assert r["a"] != r["b"] and reference[r["a"]] == reference[r["b"]]
        assert {key: r[key] for key in ("votes_a", "votes_b", "abstain", "first_slot_wins")} == \
            expected_counts(pool, r["a"], r["b"], 8)
    assert len({frozenset((r["a"], r["b"])) for r in records}) == 25  # no pair twice, none repeating a random one
    settings = json.loads(Path(f"{out}.meta.json").read_text())["settings"]
    assert settings["same_reference_pairs"] == 5 and settings["pool_manifest"] == common.file_sha256(manifest)
    stats = build_pseudolabels.main(["--votes", str(out), "--out", str(tmp_path / "pl.jsonl")])
    assert stats["by_kind"]["same_reference"]["pairs_in"] == 5 and stats["by_kind"]["random"]["pairs_in"] == 20
    assert [r["kind"] for r in common.read_jsonl(tmp_path / "pl.jsonl")] == [r["kind"] for r in records]
    # other values refused, naming the setting; the same command resumes with nothing to vote
    capsys.readouterr()
    assert "same_reference_pairs: 5 -> 6" in refused(monkeypatch, capsys, [*argv, "--same-reference-pairs", "6"])
    old = common.file_sha256(manifest)
    write_manifest(manifest, {**GROUPS, "pool_00010.png": [10, 11]})
    assert f"pool_manifest: '{old}' -> '{common.file_sha256(manifest)}'" in refused(monkeypatch, capsys, argv)
    write_manifest(manifest)
    calls = []
    run(monkeypatch, scripted(calls), *argv)
    assert calls == [] and common.read_jsonl(out) == records
    # more asked than exist: every same-reference pair that is not a random one, each once
    every = tmp_path / "every.jsonl"
    run(monkeypatch, scripted(), *base_argv(pool, every, "--same-reference-pairs", 100, "--pool-manifest", manifest,
                                            "--mode", "score"))
    drawn = common.read_jsonl(f"{every}.pairs.jsonl")
    same = {(p["a"], p["b"]) for p in drawn if p["kind"] == "same_reference"}
    within = {(names[i], names[j]) for m in GROUPS.values() for i, j in itertools.combinations(m, 2)}
    assert same == within - set(random_pairs) and len(drawn) == 20 + len(same)


def test_bad_manifest_lines_name_file_and_line(pool, tmp_path, monkeypatch, capsys):
    manifest = tmp_path / "manifest.jsonl"
    argv = base_argv(pool, tmp_path / "votes.jsonl", "--same-reference-pairs", 3, "--pool-manifest", manifest)
    for extra, message in (
            (['{"image": "pool_00010.png", "reference": '], f"{manifest}:11: malformed JSON line"),
            (['{"image": "pool_00010.png"}'], f'{manifest}:11: expected {{"image": name, "reference": name, ...}}'),
            (['{"image": "elsewhere.png", "reference": "pool_00000.png"}'],
             f"{manifest}:11: image 'elsewhere.png' is not in the pool"),
            (['{"image": "../pool/pool_00010.png", "reference": "pool_00000.png"}'],
             f"{manifest}:11: image name '../pool/pool_00010.png' is outside the image root"),
            (['{"image": "/etc/passwd", "reference": "pool_00000.png"}'], f"{manifest}:11: image name '/etc/passwd'"),
            (['{"image": "./pool_00001.png", "reference": "pool_00000.png"}'],  # the same image as pool_00001.png
             f"{manifest}:11: image 'pool_00001.png' is listed twice (also on line 2)")):
        write_manifest(manifest, extra=extra)
        err = refused(monkeypatch, capsys, argv)
        assert err.startswith(f"error: {message}"), err
    assert not (tmp_path / "votes.jsonl.meta.json").exists()
    assert "--same-reference-pairs needs --pool-manifest" in refused(monkeypatch, capsys, argv[:-2])
    # './x.png' and 'x.png' name one reference: the pairs stay within it
    write_manifest(manifest, {"pool_00000.png": [0, 1]}, extra=['{"image": "pool_00002.png", '
                                                                 '"reference": "./pool_00000.png"}'])
    groups = sample_votes.read_manifest(manifest, pool, {f"pool_{i:05d}.png": i for i in range(12)})
    assert groups == [[0, 1, 2]]



def test_same_reference_pairs_with_none_to_draw_are_refused_naming_why(pool, tmp_path, monkeypatch, capsys):
    manifest, out = tmp_path / "manifest.jsonl", tmp_path / "votes.jsonl"
    write_manifest(manifest, {f"pool_{i:05d}.png": [i] for i in range(12)})  # every reference has one version
    err = refused(monkeypatch, capsys, base_argv(pool, out, "--same-reference-pairs", 3, "--pool-manifest", manifest))
    assert f"--same-reference-pairs 3: nothing to draw from {manifest}: no reference holds two versions" in err
    write_manifest(manifest)  # two-version references, but all 66 pairs of the 12 images are random pairs already
    err = refused(monkeypatch, capsys, base_argv(pool, out, "--same-reference-pairs", 3, "--pool-manifest", manifest,
                                                 "--num-pairs", 66))
    assert "every pair of two versions of one reference is already among the random pairs" in err
    assert not out.exists() and not Path(f"{out}.meta.json").exists()

def cut_off_every_other(prompt, images, n, keys, first_index):
    """The right boxed answer in every sample, but samples 1, 3, ... were cut off by the token budget."""
    return [[sampling.Completion(scripted_completion(imgs, 2).text, (first + j) % 2 == 1) for j in range(n)]
            for imgs, first in zip(images, first_index)]


@pytest.mark.parametrize("mode", ["compare", "score"])
def test_truncated_boxed_answers_are_abstentions_and_counted(pool, tmp_path, monkeypatch, mode):
    import build_pseudolabels

    out = tmp_path / "votes.jsonl"
    run(monkeypatch, cut_off_every_other, *base_argv(pool, out, "--mode", mode, "--num-pairs", 6, "--no-text"))
    meta = json.loads(Path(f"{out}.meta.json").read_text())["counts"]
    stats = build_pseudolabels.main(["--votes", str(out), "--out", str(tmp_path / "pl.jsonl")])
    assert stats["truncation_rate"] == 0.5 and stats["truncation_flags"] == "every answer"
    assert meta["truncation_rate"] == 0.5
    if mode == "compare":
        for r in common.read_jsonl(out):  # each boxed answer cut off is an abstention, never a vote
            assert (r["votes_a"] + r["votes_b"], r["abstain"]) == (4, 4)
            assert all((x["choice"] is None) == x["truncated"] for x in r["answers"])
        assert (meta["truncated_answers"], meta["abstention_rate"]) == (24, 0.5)
        assert (stats["truncated_answers"], stats["abstention_rate"]) == (24, 0.5)
    else:
        records = common.read_jsonl(out)
        for r in records:
            assert [s is None for s in r["scores"]] == r["truncated"] == [False, True] * 4
        assert (meta["truncated_answers"], meta["abstention_rate"]) == (4 * len(records), 0.5)
        assert stats["truncated_answers"] == 4 * len(records)


def test_two_processes_equal_one(pool, tmp_path, monkeypatch):
    (pool / "pool_00007.png").write_bytes(b"corrupt")  # skipped pairs are merged across shards too
    argv = base_argv(pool, tmp_path / "one" / "votes.jsonl", "--num-pairs", 25, "--votes-per-pair", 5)
    run(monkeypatch, scripted(), *argv)
    argv2 = base_argv(pool, tmp_path / "two" / "votes.jsonl", "--num-pairs", 25, "--votes-per-pair", 5)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           *map(str, argv2)]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "votes.jsonl.meta.json").read_text())["num_processes"] == 2
    for suffix in ("", ".skipped.jsonl"):
        one = (tmp_path / "one" / f"votes.jsonl{suffix}").read_bytes()
        assert one and one == (tmp_path / "two" / f"votes.jsonl{suffix}").read_bytes()


# ---------------------------------------------------------------------------------------------------------------------
# The real (tiny) model
# ---------------------------------------------------------------------------------------------------------------------

def test_generate_fn_rows_and_truncation(tiny_model_dir, demo_pool):
    model, processor = common.load_model(tiny_model_dir), common.load_processor(tiny_model_dir)
    a, b = (common.load_image(demo_pool / f"pool_0000{i}.png") for i in (1, 2))
    prompt = prompts.get_preset("evoquality").prompt("compare", False)
    # near-greedy: the n samples of one prompt agree, so rows i*n .. i*n+n-1 must all belong to prompt i
    generate = sample_votes.make_generate_fn(model, processor, True, max_new_tokens=8, temperature=1e-4, seed=0)
    out = generate(prompt, [[a, b], [b, a], [a, a]], 3, [1, 2, 3], [0, 0, 0])
    assert [len(o) for o in out] == [3, 3, 3]
    assert all(len({text for text, _ in o}) == 1 for o in out) and len({o[0][0] for o in out}) > 1
    assert all(truncated for o in out for _, truncated in o)  # a random tiny model never emits EOS
    # at temperature 1 the samples differ (the shipped top_k=1 is overridden)
    hot = sample_votes.make_generate_fn(model, processor, True, 8, 1.0, seed=0)
    texts = [text for text, _ in hot(prompt, [[a, b]], 6, [1], [0])[0]]
    assert len(set(texts)) > 1
    assert hot.decode["calls"] == 1 and 0 < hot.decode["row_steps"] <= 6 * 7 and hot.decode["kv_bytes"] > 0
    model.generation_config.eos_token_id = list(range(model.config.get_text_config().vocab_size))  # any token ends
    assert not any(t for o in generate(prompt, [[a, b]], 2, [1], [0]) for _, t in o)


def tiny_argv(tiny_model_dir, pool, out, *extra) -> list[str]:
    """A run of the real tiny model: 4 pairs x K = 6 (3 votes per order), sampled at temperature 1, 6 new tokens."""
    return [str(a) for a in ("--model", tiny_model_dir, "--images", pool, "--out", out, "--num-pairs", 4,
                             "--votes-per-pair", 6, "--max-new-tokens", 6, "--seed", 3, *extra)]


def plant(monkeypatch, mutation: str) -> None:
    """Noise keyed to the call instead of the vote, planted in sampling.sample (the stage's only way to the model):
    "batch_row", each prompt keyed by its row in the call and its votes numbered from 0 in every call; "unkeyed",
    keys drawn from torch's generator."""
    sample = sampling.sample

    def mutated(model, processor, inputs, n, max_new_tokens, temperature=1.0, do_sample=True, keys=None, seed=0,
                first_index=0):
        keys = list(range(len(keys))) if mutation == "batch_row" else None
        return sample(model, processor, inputs, n, max_new_tokens, temperature, do_sample, keys, seed, 0)

    monkeypatch.setattr(sampling, "sample", mutated)


@pytest.mark.parametrize("mutation", [None, "batch_row", "unkeyed"])
def test_votes_do_not_depend_on_the_batch_size(tiny_model_dir, demo_pool, tmp_path, monkeypatch, mutation):
    """--batch-size 2 (a prompt's 3 votes split over 2 calls), 8 (2 prompts per call) and 64 (all 8 prompts in one
    call) write byte-identical votes, answer texts included; with noise keyed to the call they differ."""
    if mutation:
        plant(monkeypatch, mutation)
    written = {}
    for batch_size in (2, 8, 64) if mutation is None else (2, 64):
        out = tmp_path / f"batch_{batch_size}" / "votes.jsonl"
        sample_votes.main(tiny_argv(tiny_model_dir, demo_pool, out, "--batch-size", batch_size))
        written[batch_size] = out.read_bytes()
    answers = [x["text"] for r in common.read_jsonl(out) for x in r["answers"]]
    assert len(answers) == 24 and len(set(answers)) > 12  # sampled answers differ: a changed draw would show
    assert (len(set(written.values())) == 1) == (mutation is None)


def test_votes_after_a_kill_and_resume_equal_an_uninterrupted_run(tiny_model_dir, demo_pool, tmp_path, monkeypatch):
    reference, out = tmp_path / "reference" / "votes.jsonl", tmp_path / "votes.jsonl"
    sample_votes.main(tiny_argv(tiny_model_dir, demo_pool, reference, "--batch-size", 8))
    load = sample_votes.load_generate_fn

    def dies_after_two_calls(args, device):
        generate, calls = load(args, device), []

        def generate_or_die(*a):
            if len(calls) == 2:
                raise RuntimeError("killed")
            calls.append(1)
            return generate(*a)
        return generate_or_die

    with monkeypatch.context() as m, pytest.raises(RuntimeError, match="killed"):
        m.setattr(sample_votes, "load_generate_fn", dies_after_two_calls)
        sample_votes.main(tiny_argv(tiny_model_dir, demo_pool, out, "--batch-size", 8))
    assert len(common.read_jsonl(tmp_path / "votes.jsonl.shard-00000.jsonl")) == 2  # one pair per call: 2 of 4 voted
    sample_votes.main(tiny_argv(tiny_model_dir, demo_pool, out, "--batch-size", 8))  # the same command resumes
    assert out.read_bytes() == reference.read_bytes()


def test_a_huge_k_is_sampled_in_calls_of_batch_size_rows(tiny_model_dir, demo_pool, tmp_path, monkeypatch):
    """--votes-per-pair far above --batch-size: no sampling call holds more than --batch-size rows; each prompt's votes
    are split over calls, every vote index drawn exactly once (recorded where the stage reaches the model)."""
    seen = []

    def record(model, processor, inputs, n, max_new_tokens, temperature=1.0, do_sample=True, keys=None, seed=0,
               first_index=0):
        seen.append((list(keys), n, list(first_index)))
        rows = len(keys) * n
        return sampling.Samples(ids=None, mask=None, truncated=[True] * rows, texts=[""] * rows, n=n,
                                decode={"steps": 0, "row_steps": 0, "kv_bytes": 0})

    monkeypatch.setattr(sampling, "sample", record)
    out = tmp_path / "votes.jsonl"
    sample_votes.main(tiny_argv(tiny_model_dir, demo_pool, out, "--num-pairs", 2, "--votes-per-pair", 1001,
                                "--batch-size", 64, "--no-text"))
    assert max(len(keys) * n for keys, n, _ in seen) == 64
    drawn: dict[int, list[int]] = {}
    for keys, n, firsts in seen:
        for key, first in zip(keys, firsts):
            drawn.setdefault(key, []).extend(range(first, first + n))
    expected = {}
    for r in common.read_jsonl(out):
        assert len(r["answers"]) == 1001
        for order, n in sample_votes.vote_orders(r["a"], r["b"], 1001, 3).items():
            expected[sampling.prompt_key(*((r["a"], r["b"]) if order == "ab" else (r["b"], r["a"])))] = list(range(n))
    assert {key: sorted(indices) for key, indices in drawn.items()} == expected


def test_real_tiny_model_end_to_end(tiny_model_dir, demo_pool, tmp_path):
    def votes(*extra, launch=(sys.executable,)):
        cmd = [*launch, "sample_votes.py", "--model", tiny_model_dir, "--images", str(demo_pool),
               "--out", str(out), "--num-pairs", "6", "--votes-per-pair", "4", "--max-new-tokens", "8",
               "--batch-size", "8", *extra]
        return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)

    out = tmp_path / "votes.jsonl"
    result = votes("--model", str(tmp_path / "mistyped"))  # fails before any work: leaves nothing that refuses
    assert result.returncode == 2 and "cannot load model" in result.stderr and not Path(f"{out}.meta.json").exists()
    result = votes()  # the corrected command into the same --out
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vote/s" in result.stderr and "first_slot_win_rate" in result.stdout
    assert "decode [0]: 3 calls, " in result.stderr  # 2 pairs (4 prompts x 2 votes = 8 sequences) per call
    records = common.read_jsonl(out)
    assert len(records) == 6
    for r in records:
        assert r["votes_a"] + r["votes_b"] + r["abstain"] == 4 == len(r["answers"])
        assert [x["order"] for x in r["answers"]] == ["ab", "ab", "ba", "ba"]
        for x in r["answers"]:  # cut off -> abstention; else the parsed index, mapped through the order shown
            index = None if x["truncated"] else prompts.parse_compare(x["text"])
            assert x["choice"] == (None if index is None else "ab"[index] if x["order"] == "ab" else "ba"[index])
        assert sum(x["truncated"] for x in r["answers"]) >= 2  # a random tiny model rarely emits EOS in 8 tokens
    meta = json.loads(Path(f"{out}.meta.json").read_text())
    assert meta["model_path"] == str(Path(tiny_model_dir).resolve()) and meta["counts"]["votes"] == 24
    assert meta["settings"]["model"] == common.fingerprint(tiny_model_dir) != tiny_model_dir
    truncated = sum(x["truncated"] for r in records for x in r["answers"])
    assert meta["counts"]["truncated_answers"] == truncated and meta["counts"]["truncation_rate"] == round(truncated / 24, 6)
    # 2 processes (torchrun, gloo), each voting every other pair: the same votes, byte for byte
    two = tmp_path / "two" / "votes.jsonl"
    result = votes("--out", str(two), launch=(sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              "--nproc_per_node", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(Path(f"{two}.meta.json").read_text())["num_processes"] == 2
    assert two.read_bytes() == out.read_bytes() and len({x["text"] for r in records for x in r["answers"]}) > 12
    # user errors: one line, exit 2, no traceback
    (tmp_path / "empty").mkdir()
    for bad in (["--model", str(tmp_path / "missing")], ["--images", str(tmp_path / "empty")]):
        result = votes("--out", str(tmp_path / "bad.jsonl"), *bad)
        assert result.returncode == 2 and result.stderr.startswith("error:"), result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


if __name__ == "__main__":  # sample_votes.py with the scripted model (see the module docstring)
    delay = float(os.environ.get("SCRIPTED_DELAY", "0"))  # seconds per generate call, to be killed mid-run
    sample_votes.load_generate_fn = lambda args, device: scripted(delay=delay)
    sample_votes.main()
