"""make_pool.py: the manifest and the files it names, resume after SIGKILL, refused setting changes, unreadable images
skipped with the reason; nothing that would mix two pools (an output inside the inputs, other inputs on a rerun,
names a line-based list cannot hold), symlinked inputs linked by their real file, no write through a planted link."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest.mock import patch

import numpy as np

import common
import distortions
import make_pool
from test_distortions import natural_image

ROOT = Path(__file__).resolve().parents[1]


def make_inputs(folder: Path, n: int, size: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        natural_image(size, i).save(folder / f"img{i:02d}.jpg", quality=90)
    return folder


def run(images: Path, out: Path, *extra: str, workers: int = 1) -> subprocess.CompletedProcess:
    """make_pool.py's main in this process (the start-up of a new interpreter is most of a small run's time)."""
    argv = ["make_pool.py", "--images", str(images), "--out", str(out), "--workers", str(workers), *extra]
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with patch.object(sys, "argv", argv), redirect_stdout(stdout), redirect_stderr(stderr):
        try:
            common.run_main(make_pool.main)  # as the script runs it
        except SystemExit as e:
            code = e.code
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())


def pool_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


def test_manifest_names_every_image_and_each_variant_is_its_distortion(tmp_path):
    images = make_inputs(tmp_path / "in", 2)
    (images / "sub").mkdir()
    natural_image(48, 7).save(images / "sub" / "deep.png")
    out = tmp_path / "pool"
    done = run(images, out, "--variants", "3", "--seed", "5", workers=2)
    assert done.returncode == 0, done.stderr
    records = common.read_jsonl(out / "manifest.jsonl")
    references = ["references/img00.jpg", "references/img01.jpg", "references/sub/deep.png"]
    assert [r["image"] for r in records if r["type"] is None] == references
    assert len(records) == 3 * 4 and len({r["image"] for r in records}) == 12
    for ref in references:
        source = images / ref.removeprefix("references/")
        assert (out / ref).read_bytes() == source.read_bytes()  # the reference itself, unchanged
        assert {"image": ref, "reference": ref, "type": None, "level": 0, "seed": None} in records
        variants = [r for r in records if r["reference"] == ref and r["type"] is not None]
        stem = ref.removeprefix("references/").rsplit(".", 1)[0]
        assert [r["image"] for r in variants] == [f"variants/{stem}_{k:02d}.png" for k in range(3)]
        assert len({(r["type"], r["level"]) for r in variants}) == 3  # no (type, level) twice for one reference
        for r in variants:
            assert r["type"] in distortions.TABLE and r["level"] in distortions.LEVELS
            expected = distortions.distort(common.load_image(source), r["type"], r["level"], r["seed"])
            assert np.array_equal(np.asarray(common.load_image(out / r["image"])), np.asarray(expected))
    assert (out / "references.txt").read_text().split() == references
    # both list files resolve against the pool root: what sample_votes.py reads with --images
    assert common.list_images(out / "manifest.jsonl") == (out, [r["image"] for r in records])
    assert common.list_images(out / "references.txt") == (out, references)
    assert sorted(common.list_images(out)[1]) == sorted(r["image"] for r in records)
    assert common.read_jsonl(out / "skipped.jsonl") == []


def test_the_plan_depends_on_seed_and_name_only():
    plan = make_pool.variant_plan("a/x.jpg", 10, 0, "type")
    assert plan == make_pool.variant_plan("a/x.jpg", 10, 0, "type")
    assert plan != make_pool.variant_plan("a/x.jpg", 10, 1, "type")
    assert plan != make_pool.variant_plan("a/y.jpg", 10, 0, "type")
    assert len({(kind, level) for kind, level, _ in make_pool.variant_plan("x", 175, 0, "group")}) == 175


def test_sigkill_mid_run_then_rerun_gives_the_same_pool(tmp_path):
    images = make_inputs(tmp_path / "in", 12, size=160)
    clean = tmp_path / "clean"
    assert run(images, clean, "--variants", "5", "--seed", "3").returncode == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "make_pool.py", "--images", str(images), "--out", str(out), "--variants", "5", "--seed",
           "3", "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    manifest = out / "manifest.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and manifest.stat().st_size:  # the first reference is in: kill in the middle
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the worker too, as a kill of the job would
    proc.wait()
    lines_at_kill = len(manifest.read_text().splitlines())
    assert 0 < lines_at_kill < 12 * 6
    again = run(images, out, "--variants", "5", "--seed", "3", workers=2)  # another worker count: same pixels
    assert again.returncode == 0, again.stderr
    assert pool_files(out) == pool_files(clean)
    assert not list(out.rglob("*.tmp"))
    records = common.read_jsonl(out / "manifest.jsonl")
    assert len(records) == len({r["image"] for r in records}) == 12 * 6


def test_changed_settings_are_refused_naming_the_flag(tmp_path):
    images = make_inputs(tmp_path / "in", 1)
    out = tmp_path / "pool"
    assert run(images, out, "--variants", "2", "--seed", "1").returncode == 0
    for flags, change in [(["--variants", "3", "--seed", "1"], "variants: 2 -> 3"),
                          (["--variants", "2", "--seed", "4"], "seed: 1 -> 4"),
                          (["--variants", "2", "--seed", "1", "--draw", "group"], "draw: 'type' -> 'group'")]:
        refused = run(images, out, *flags)
        assert refused.returncode == 2 and change in refused.stderr and refused.stderr.count("\n") == 1
    assert run(images, out, "--variants", "2", "--seed", "1", "--png-level", "6").returncode == 0  # not a setting


def test_types_restrict_the_draw_and_are_a_setting(tmp_path):
    images = make_inputs(tmp_path / "in", 3, size=32)
    out = tmp_path / "pool"
    assert run(images, out, "--variants", "4", "--types", "noise,jpeg").returncode == 0
    kinds = {r["type"] for r in common.read_jsonl(out / "manifest.jsonl") if r["type"]}
    assert kinds <= set(distortions.GROUPS["noise"]) | {"jpeg"} and len(kinds) > 1
    refused = run(images, out, "--variants", "4", "--types", "jpeg")
    assert refused.returncode == 2 and "types: [" in refused.stderr
    wrong = run(images, tmp_path / "other", "--types", "fog")
    assert wrong.returncode == 2 and "'fog' is neither a distortion type nor a group" in wrong.stderr
    assert run(images, tmp_path / "other", "--variants", "6", "--types", "jpeg").returncode == 2  # 5 (type, level)


def test_a_pool_built_with_other_distortion_definitions_is_not_extended(tmp_path):
    images = make_inputs(tmp_path / "in", 1)
    out = tmp_path / "pool"
    assert run(images, out, "--variants", "2").returncode == 0
    settings = json.loads((out / "settings.json").read_text())
    settings["settings"]["distortions_version"] -= 1  # as a pool written by an older library records it
    (out / "settings.json").write_text(json.dumps(settings))
    refused = run(images, out, "--variants", "2")
    assert refused.returncode == 2 and "distortions_version" in refused.stderr, refused.stderr


def test_unreadable_image_is_skipped_with_the_reason_and_tried_again(tmp_path):
    images = make_inputs(tmp_path / "in", 2)
    (images / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "pool"
    done = run(images, out, "--variants", "2")
    assert done.returncode == 0, done.stderr
    assert "skipped broken.jpg: cannot read image" in done.stderr
    skipped = common.read_jsonl(out / "skipped.jsonl")
    assert [s["image"] for s in skipped] == ["broken.jpg"] and "UnidentifiedImageError" in skipped[0]["reason"]
    assert "references/broken.jpg" not in {r["reference"] for r in common.read_jsonl(out / "manifest.jsonl")}
    assert not list(out.rglob("broken*"))
    natural_image(64, 9).save(images / "broken.jpg")  # fixed: the rerun builds it
    assert run(images, out, "--variants", "2").returncode == 0
    assert common.read_jsonl(out / "skipped.jsonl") == []
    assert len(common.read_jsonl(out / "manifest.jsonl")) == 3 * 3


def test_two_inputs_with_one_stem_are_refused(tmp_path):
    images = make_inputs(tmp_path / "in", 1)
    natural_image(32).save(images / "img00.png")
    refused = run(images, tmp_path / "pool", "--variants", "1")
    assert refused.returncode == 2 and "img00.jpg and img00.png" in refused.stderr


def test_an_out_inside_the_images_or_the_reverse_is_refused(tmp_path):
    images = make_inputs(tmp_path / "in", 2)
    refused = run(images, images / "pool", "--variants", "1")  # each rerun would take its own files as inputs
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert str(images / "pool") in refused.stderr and not (images / "pool").exists()
    refused = run(images, tmp_path, "--variants", "1")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and str(images) in refused.stderr
    assert not (tmp_path / "manifest.jsonl").exists()


def test_a_rerun_with_other_inputs_is_refused_naming_what_changed(tmp_path):
    images = make_inputs(tmp_path / "in", 2)
    out = tmp_path / "pool"
    assert run(images, out, "--variants", "1").returncode == 0
    other = make_inputs(tmp_path / "other", 2)  # the same names, another folder
    refused = run(other, out, "--variants", "1")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and str(other) in refused.stderr
    natural_image(64, 5).save(images / "new.jpg")  # the same folder, another file
    refused = run(images, out, "--variants", "1")
    assert refused.returncode == 2 and "2 images" in refused.stderr and "3 images" in refused.stderr
    (images / "new.jpg").unlink()
    assert run(images, out, "--variants", "1").returncode == 0  # the same inputs again: resumes
    assert len(common.read_jsonl(out / "manifest.jsonl")) == 2 * 2


def test_a_symlinked_input_is_linked_by_its_real_file(tmp_path):
    real = make_inputs(tmp_path / "real", 1)
    images = tmp_path / "in"
    images.mkdir()
    (images / "linked.jpg").symlink_to(Path("..") / "real" / "img00.jpg")  # relative: dangles if copied as a link
    out = tmp_path / "pool"
    done = run(images, out, "--variants", "1")
    assert done.returncode == 0 and common.read_jsonl(out / "skipped.jsonl") == [], done.stderr
    reference = out / "references" / "linked.jpg"
    assert not reference.is_symlink() and reference.read_bytes() == (real / "img00.jpg").read_bytes()


def test_names_a_line_based_list_cannot_hold_are_refused_naming_them(tmp_path):
    for name in ["a\nb.jpg", "a\rb.jpg", "a\u2028b.jpg", "a\u2029b.jpg", "a\x85b.jpg", "a\x1bb.jpg"]:
        images = tmp_path / f"in{ord(name[1])}"
        make_inputs(images, 1)
        natural_image(32).save(images / name, format="JPEG")
        refused = run(images, tmp_path / f"pool{ord(name[1])}", "--variants", "1")
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, (name, refused.stderr)
        assert repr(name)[1:-1] in refused.stderr


def test_a_link_planted_at_a_temporary_is_refused_not_followed(tmp_path):
    images = make_inputs(tmp_path / "in", 1)
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    out = tmp_path / "pool"
    (out / "variants").mkdir(parents=True)
    (out / "variants" / "img00_00.png.tmp").symlink_to(target)
    refused = run(images, out, "--variants", "1")
    assert refused.returncode == 2 and "img00_00.png.tmp" in refused.stderr and "Traceback" not in refused.stderr
    assert target.read_text() == "keep me"
