"""The shared module: images, JSONL, loading, sampling, the Args adapter, run records, locks and shards."""

import errno
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import common
import sampling
from prompts import PRESETS, parse_score

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "1", "RGB"])
def test_load_image_modes(tmp_path, mode):
    arr = (np.arange(24 * 16).reshape(16, 24) % 256).astype(np.uint8)
    img = Image.fromarray(arr, "L").convert(mode) if mode not in ("I;16", "I") else None
    if mode == "I;16":
        img = Image.fromarray(arr.astype(np.uint16) * 256)
        assert img.mode == "I;16"
    if mode == "I":
        img = Image.fromarray(arr.astype(np.int32) * 1000)
        assert img.mode == "I"
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16", "I") else "x.png")
    img.save(path)
    out = common.load_image(path)
    assert out.mode == "RGB" and out.size == (24, 16)
    if mode in ("I;16", "I"):  # scaled to 8 bits, not clipped to white
        assert 0 < np.asarray(out).mean() < 255 and np.asarray(out).max() > 200


def test_load_image_transparency_becomes_white(tmp_path):
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "t.png")
    assert common.load_image(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)


def test_load_image_exif_orientation(tmp_path):
    img = Image.new("RGB", (30, 10), (0, 255, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    img.save(tmp_path / "r.jpg", exif=exif)
    assert common.load_image(tmp_path / "r.jpg").size == (10, 30)


def test_load_image_broken_files_name_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for name in ["empty.png", "junk.jpg", "cut.png", "missing.png"]:
        with pytest.raises(ValueError, match=re.escape(name)):
            common.load_image(tmp_path / name)


def test_load_image_decompression_bomb(tmp_path, monkeypatch):
    Image.new("L", (100, 100)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 px > 2x the limit: PIL refuses
    with pytest.raises(ValueError, match="bomb.png"):
        common.load_image(tmp_path / "bomb.png")


def test_list_images_folder_and_list_files(tmp_path):
    for rel in ["b/2.png", "a/1.JPG", "c.webp", "notes.txt"]:
        (tmp_path / "pool" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pool" / rel).write_bytes(b"x")
    root, images = common.list_images(tmp_path / "pool")
    assert root == tmp_path / "pool" and images == ["a/1.JPG", "b/2.png", "c.webp"]
    (tmp_path / "pool" / "list.txt").write_text("# comment\nb/2.png\n\nc.webp\n")
    assert common.list_images(tmp_path / "pool" / "list.txt") == (tmp_path / "pool", ["b/2.png", "c.webp"])
    (tmp_path / "l.jsonl").write_text('{"image": "x.png"}\n{"image": ["y.png"]}\n')
    assert common.list_images(tmp_path / "l.jsonl", root="/data") == (Path("/data"), ["x.png", "y.png"])
    (tmp_path / "bad.jsonl").write_text('{"image": "x.png"}\n{"path": "y.png"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        common.list_images(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError):
        common.list_images(tmp_path / "nowhere")


def test_image_names_are_canonical_and_stay_under_their_root(tmp_path):
    assert common.safe_name(tmp_path, "./a//b/../c.png", "list:1") == "a/c.png"
    for bad in ["/etc/passwd", "../x.png", "a/../../x.png"]:
        with pytest.raises(ValueError, match=r"list:3: image name .* outside the image root"):
            common.safe_name(tmp_path, bad, "list:3")
    assert common.safe_name(tmp_path / "pool", "../x.png", "list:3", allow_outside=True) == str(tmp_path / "x.png")
    (tmp_path / "l.txt").write_text("x.png\n./x.png\n")
    with pytest.raises(ValueError, match=r"l.txt:2: x.png is listed twice .*l.txt:1"):
        common.list_images(tmp_path / "l.txt")
    (tmp_path / "out.jsonl").write_text('{"image": "ok.png"}\n{"image": "/abs/y.png"}\n')
    with pytest.raises(ValueError, match=r"out.jsonl:2: image name '/abs/y.png'"):
        common.list_images(tmp_path / "out.jsonl")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9.png\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8"):
        common.list_images(tmp_path / "latin1.txt")


def test_a_folder_scan_says_which_subfolders_it_skipped(tmp_path, capsys):
    (tmp_path / "pool" / "real").mkdir(parents=True)
    (tmp_path / "pool" / "real" / "1.png").write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "2.png").write_bytes(b"x")
    (tmp_path / "pool" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert common.list_images(tmp_path / "pool")[1] == ["real/1.png"]
    assert "skipped subfolder " + str(tmp_path / "pool" / "linked") + ": a symlinked folder" in capsys.readouterr().err


def test_empty_or_cut_json_sidecars_are_one_line_errors(tmp_path, capsys):
    for text in ["", '{"settings": {"a": 1']:
        (tmp_path / "meta.json").write_text(text)
        with pytest.raises(SystemExit) as exit:
            common.read_json(tmp_path / "meta.json")
        assert exit.value.code == 2 and "meta.json is empty or not valid JSON" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            common.refuse_changed_settings(tmp_path / "meta.json", {"a": 1}, "votes", "use another --out")
    common.record_settings(tmp_path / "meta.json", {"a": 1}, started="now")
    assert common.read_json(tmp_path / "meta.json") == {"settings": {"a": 1}, "started": "now"}
    common.refuse_changed_settings(tmp_path / "meta.json", {"a": 1}, "votes", "use another --out")
    with pytest.raises(SystemExit):
        common.refuse_changed_settings(tmp_path / "meta.json", {"a": 2}, "votes", "use another --out")
    assert "a: 1 -> 2" in capsys.readouterr().err


LOCK_HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
import common
with common.output_lock({path!r}):
    print("held", flush=True)
    time.sleep(60)
"""


def test_one_run_per_output_and_a_dead_owner_is_taken_over(tmp_path, capsys):
    import subprocess

    path = tmp_path / "votes.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER.format(root=str(ROOT), path=str(path))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as exit:
            with common.output_lock(path):
                pass
        err = capsys.readouterr().err
        assert exit.value.code == 2 and f"pid {holder.pid} on host" in err and "in use by another run" in err
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the lock file keeps its owner's line
        holder.wait()
    assert f"pid {holder.pid}" in (tmp_path / "votes.jsonl.lock").read_text()
    with common.output_lock(path):
        assert "taking over" in capsys.readouterr().err
        assert f"pid {os.getpid()} " in (tmp_path / "votes.jsonl.lock").read_text()
    assert (tmp_path / "votes.jsonl.lock").read_text() == ""  # released: free for the next run, no warning
    with common.output_lock(path):
        assert "taking over" not in capsys.readouterr().err


def test_unwritable_output_and_full_disk_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exit:
        common.check_writable(tmp_path / "file" / "out")  # a path under a file: cannot be created
    assert exit.value.code == 2 and "cannot write to" in capsys.readouterr().err
    common.check_writable(tmp_path / "new" / "out")
    assert (tmp_path / "new" / "out").is_dir() and not list((tmp_path / "new" / "out").iterdir())

    def full():
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "votes.jsonl"))
    with pytest.raises(SystemExit) as exit:
        common.run_main(full)
    assert exit.value.code == 2 and "votes.jsonl: No space left on device" in capsys.readouterr().err

    def bug():
        raise OSError(errno.EBADF, "Bad file descriptor")
    with pytest.raises(OSError):  # not a user's problem: the traceback stays
        common.run_main(bug)


def test_shards_are_merged_once_and_a_killed_merge_is_redone(tmp_path):
    out = tmp_path / "votes.jsonl"
    for rank, keys in [(0, [1, 3]), (1, [2])]:
        with common.JsonlWriter(common.shard_file(out, rank)) as writer:
            for k in keys:
                writer.write({"k": k})
    assert [p.name for p in common.shard_files(out)] == ["votes.jsonl.shard-00000.jsonl",
                                                         "votes.jsonl.shard-00001.jsonl"]
    records = sorted((r for p in [out, *common.shard_files(out)] for r in common.read_jsonl(p)), key=lambda r: r["k"])
    common.merge_shards(out, records)
    assert common.read_jsonl(out) == [{"k": 1}, {"k": 2}, {"k": 3}] and common.shard_files(out) == []


# ---------------------------------------------------------------------------------------------------------------------
# Files a run makes (locks, temporaries, shards): never written through a link or onto anything planted at their name
# ---------------------------------------------------------------------------------------------------------------------


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    return line


def plant(kind: str, path: Path, target: Path) -> None:
    if kind == "symlink":
        path.symlink_to(target)
    elif kind == "hard link":
        os.link(target, path)
    elif kind == "folder":
        path.mkdir()
    else:
        os.mkfifo(path)


def remove_planted(path: Path) -> None:
    path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()


@pytest.mark.parametrize("kind", ["symlink", "hard link", "folder", "fifo"])
def test_a_link_or_other_file_planted_at_a_lock_or_a_jsonl_is_refused_not_followed(tmp_path, capsys, kind):
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    out = tmp_path / "votes.jsonl"
    uses = [(Path(f"{out}.lock"), lambda: common.output_lock(out).__enter__()),
            (common.shard_file(out, 0), lambda: common.JsonlWriter(common.shard_file(out, 0))),
            (out, lambda: common.JsonlWriter(out))]
    for path, use in uses:
        plant(kind, path, target)
        with pytest.raises(SystemExit) as exit:
            common.run_main(use)
        line = one_error_line(capsys.readouterr().err)
        assert exit.value.code == 2 and str(path) in line, line
        remove_planted(path)
    assert target.read_text() == "keep me\n"


def test_temporaries_never_follow_a_planted_link(tmp_path, capsys):
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    meta = tmp_path / "votes.jsonl.meta.json"
    Path(f"{meta}.tmp").symlink_to(target)
    with pytest.raises(SystemExit):
        common.run_main(lambda: common.write_json_atomic(meta, {"a": 1}))
    assert f"{meta}.tmp" in one_error_line(capsys.readouterr().err)
    assert target.read_text() == "keep me\n" and not meta.exists()
    Path(f"{meta}.tmp").unlink()
    Path(f"{meta}.tmp").write_text("left by a killed run")  # a regular leftover is simply replaced
    common.write_json_atomic(meta, {"a": 1})
    assert common.read_json(meta) == {"a": 1} and not Path(f"{meta}.tmp").exists()
    umask = os.umask(0o022)
    os.umask(umask)
    assert meta.stat().st_mode & 0o777 == 0o666 & ~umask  # the mode of any file the user's umask allows
    (tmp_path / "summary.json").mkdir()  # a folder where a file is rewritten: one line
    with pytest.raises(SystemExit):
        common.run_main(lambda: common.write_json_atomic(tmp_path / "summary.json", {}))
    assert str(tmp_path / "summary.json") in one_error_line(capsys.readouterr().err)
    probe = tmp_path / f".write-test-{os.getpid()}"  # the writability probe's name was predictable
    probe.symlink_to(target)
    common.check_writable(tmp_path)
    assert target.read_text() == "keep me\n"


def test_a_lock_file_is_read_bounded_and_as_bytes(tmp_path, capsys):
    import fcntl

    out = tmp_path / "votes.jsonl"
    lock = Path(f"{out}.lock")
    junk = b"\xff\xfe owner \x1b[31m red\nsecond line " + b"x" * (8 << 20)  # not UTF-8, an escape, 8 MB
    lock.write_bytes(junk)
    with open(lock, "rb") as held:  # another run holds it (flock is per open file)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit) as exit:
            with common.output_lock(out):
                pass
    line = one_error_line(capsys.readouterr().err)
    assert exit.value.code == 2 and "in use by another run" in line and len(line) < 1000 and "\x1b" not in line
    with common.output_lock(out):  # left by a dead run: taken over, said in one bounded line
        err = capsys.readouterr().err
        assert "taking over" in err and err.count("\n") == 1 and len(err) < 1000 and "\x1b" not in err
    assert lock.read_bytes() == b""


@pytest.mark.parametrize("text", ["[]", "null", '"x"', "3"])
def test_a_sidecar_that_is_json_but_not_an_object_is_a_one_line_error(tmp_path, capsys, text):
    (tmp_path / "meta.json").write_text(text)
    with pytest.raises(SystemExit) as exit:
        common.read_json(tmp_path / "meta.json")
    assert exit.value.code == 2 and str(tmp_path / "meta.json") in one_error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit):
        common.refuse_changed_settings(tmp_path / "meta.json", {"a": 1}, "votes", "use another --out")
    assert str(tmp_path / "meta.json") in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------------------------------
# JSONL
# ---------------------------------------------------------------------------------------------------------------------


def test_jsonl_truncated_last_line_is_dropped_with_warning(tmp_path):
    path = tmp_path / "v.jsonl"
    path.write_text('{"k": 1}\n{"k": 2}\n{"k": 3, "te')
    with pytest.warns(UserWarning, match="partial last line"):
        assert common.read_jsonl(path) == [{"k": 1}, {"k": 2}]


def test_jsonl_malformed_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "v.jsonl"
    path.write_text('{"k": 1}\n{"k": \n{"k": 3}\n')
    with pytest.raises(ValueError, match=r"v.jsonl:2"):
        common.read_jsonl(path)
    path.write_text('{"k": 1}\n[1, 2]\n{"k": 3}\n')
    with pytest.raises(ValueError, match=r"v.jsonl:2: .*not a JSON object"):
        common.read_jsonl(path)


def test_jsonl_writer_cuts_partial_line_before_appending(tmp_path):
    path = tmp_path / "v.jsonl"
    path.write_text('{"k": 1}\n{"k": 2, "te')
    with pytest.warns(UserWarning, match="cutting a partial last line"):
        writer = common.JsonlWriter(path)
    with writer:
        writer.write({"k": 2})
        writer.write({"k": 3, "text": "ünïcode \\boxed{1}"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records = common.read_jsonl(path)
    assert [r["k"] for r in records] == [1, 2, 3] and records[2]["text"] == "ünïcode \\boxed{1}"
    assert common.read_jsonl(tmp_path / "absent.jsonl") == []


def test_jsonl_writer_flushes_each_record(tmp_path):
    writer = common.JsonlWriter(tmp_path / "v.jsonl")
    writer.write({"k": 1})
    assert (tmp_path / "v.jsonl").read_text() == '{"k": 1}\n'  # visible before close: a kill loses nothing written
    writer.close()


def test_write_json_atomic(tmp_path):
    common.write_json_atomic(tmp_path / "d" / "m.json", {"a": 1})
    assert json.loads((tmp_path / "d" / "m.json").read_text()) == {"a": 1}
    assert not list((tmp_path / "d").glob("*.tmp"))


# ---------------------------------------------------------------------------------------------------------------------
# Args adapter
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _Args:
    model: str = common.arg(help="model")
    num_pairs: int = common.arg(20000, help="pairs")
    temperature: float = common.arg(1.0, help="temperature")
    reasoning: bool = common.arg(True, help="reasoning suffix")
    bench: list[str] = common.arg([], help="benchmarks")
    mode: str = common.arg("compare", help="mode", choices=["compare", "score"])


def test_parse_args():
    a = common.parse_args(_Args, ["--model", "m", "--num-pairs", "5", "--no-reasoning", "--bench", "x=1", "y=2"])
    assert (a.model, a.num_pairs, a.reasoning, a.bench, a.temperature, a.mode) == ("m", 5, False, ["x=1", "y=2"], 1.0,
                                                                                  "compare")
    with pytest.raises(SystemExit):
        common.parse_args(_Args, [])  # --model is required
    with pytest.raises(SystemExit):
        common.parse_args(_Args, ["--model", "m", "--mode", "other"])


# ---------------------------------------------------------------------------------------------------------------------
# Tiny real-architecture checkpoints, loading, sampling
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_tiny_checkpoint_round_trip(tmp_path, arch):
    import torch

    from fixtures.tiny_models import build_model, build_tiny_checkpoint, build_tokenizer

    path = build_tiny_checkpoint(tmp_path / arch, arch)
    model, processor = common.load_model(str(path)), common.load_processor(str(path))
    expected = build_model(arch, build_tokenizer())  # same seed: the saved weights must come back unchanged
    assert type(model).__name__ == type(expected).__name__
    saved, rebuilt = model.state_dict(), expected.state_dict()
    assert saved.keys() == rebuilt.keys() and all(torch.equal(saved[k], rebuilt[k]) for k in saved)
    assert processor.tokenizer.padding_side == "left"
    assert model.generation_config.top_k == 1  # the shipped quirk survives, so the stages must override it
    inputs = common.encode_batch(processor, ["hi"], [[Image.new("RGB", (56, 56))]])
    merged_tokens = int(inputs["image_grid_thw"].prod()) // 4  # patches after the 2x2 merge
    assert merged_tokens >= 1 and (inputs["input_ids"] == model.config.image_token_id).sum() == merged_tokens
    assert model(**inputs).logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        common.load_model(str(tmp_path / "no_model"))


def test_chat_text_uses_real_template(tiny_model_dir):
    processor = common.load_processor(tiny_model_dir)
    text = common.chat_text(processor, "Q?", 2, add_vision_id=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "Picture 1: <|vision_start|><|image_pad|><|vision_end|>"
                    "Picture 2: <|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\n")


def test_max_pixels_bounds_image_tokens(tiny_model_dir):
    big = Image.new("RGB", (400, 300))
    counts = []
    for max_pixels in (28 * 28, 56 * 56, 112 * 112):
        processor = common.load_processor(tiny_model_dir, max_pixels=max_pixels, min_pixels=28 * 28)
        grid = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[big])["image_grid_thw"][0]
        counts.append(int(grid.prod()) // 4)  # LLM tokens after the 2x2 merge
        assert int(grid.prod()) * 14 * 14 <= max_pixels
    assert counts[0] < counts[1] < counts[2]


def test_sampling_config_overrides_shipped_top_k(tiny_model_dir):
    model = common.load_model(tiny_model_dir)
    config = sampling.sampling_config(model, max_new_tokens=8, temperature=0.7, num_return_sequences=8)
    assert (config.do_sample, config.top_k, config.top_p, config.repetition_penalty, config.temperature) == (
        True, 0, 1.0, 1.0, 0.7)
    assert set(sampling.eos_token_ids(config)) == set(model.generation_config.eos_token_id)
    greedy = sampling.sampling_config(model, max_new_tokens=8, do_sample=False)
    assert model.generation_config.top_k == 1 and greedy.top_k != 1  # nothing of the shipped sampling leaks in


def test_two_image_prompt_samples_differ(tiny_model_dir, demo_pool):
    import torch

    model, processor = common.load_model(tiny_model_dir), common.load_processor(tiny_model_dir)
    images = [common.load_image(p) for p in sorted(demo_pool.glob("*.png"))[:2]]
    prompt = PRESETS["evoquality"].prompt("compare", True)
    inputs = common.encode_batch(processor, [prompt], [images], add_vision_id=True)
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 2 * 4  # max_pixels 56*56: 4 tokens each
    torch.manual_seed(0)
    out = model.generate(**inputs, generation_config=sampling.sampling_config(model, 12, num_return_sequences=8))
    texts = sampling.completion_texts(processor, out, inputs["input_ids"].shape[1])
    assert len(texts) == 8 and len(set(texts)) > 1
    # the shipped config (top_k=1) would have made all eight identical
    shipped = model.generate(**inputs, max_new_tokens=12, num_return_sequences=8)
    assert len(set(sampling.completion_texts(processor, shipped, inputs["input_ids"].shape[1]))) == 1


def test_sample_matches_generate_and_flags_truncation(tiny_model_dir, demo_pool):
    import torch

    model, processor = common.load_model(tiny_model_dir), common.load_processor(tiny_model_dir)
    images = [[common.load_image(p)] for p in sorted(demo_pool.glob("*.png"))[:3]]
    inputs = common.encode_batch(processor, [PRESETS["evoquality"].prompt("score", False)] * 3, images)
    samples = sampling.sample(model, processor, inputs, n=1, max_new_tokens=10, do_sample=False)
    reference = model.generate(**inputs, generation_config=sampling.sampling_config(model, 10, do_sample=False))
    T = samples.ids.shape[1]
    torch.testing.assert_close(samples.ids, reference[:, inputs["input_ids"].shape[1]:][:, :T])
    eos = set(sampling.eos_token_ids(sampling.sampling_config(model, 10)))
    for row, truncated in zip(samples.ids.tolist(), samples.truncated):
        assert truncated == (not eos & set(row))  # a random tiny model rarely ends: most rows run out of budget
    assert [len(c) for c in samples.completions()] == [1, 1, 1]


def test_truncated_answer_is_unparseable_in_every_stage():
    text = "The image is sharp. \\boxed{3.2}. Wait, let me reconsider"
    parse = lambda t: parse_score(t, PRESETS["evoquality"])
    assert sampling.answer(sampling.Completion(text, truncated=False), parse) == 3.2
    assert sampling.answer(sampling.Completion(text, truncated=True), parse) is None


def test_completion_mask_from_positions():
    import torch

    eos, pad = 5, 5
    ids = torch.tensor([[1, 2, eos, pad], [1, 2, 3, 4], [eos, pad, pad, pad]])
    assert sampling.completion_mask(ids, [eos, pad]).tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_refuse_changed_settings_names_each_change(tmp_path, capsys):
    path = tmp_path / "settings.json"
    common.refuse_changed_settings(path, {"lr": 1e-6}, "x", "y")  # nothing recorded yet: no refusal
    common.write_json_atomic(path, {"settings": {"lr": 1e-6, "beta": 0.05, "model": "a"}})
    common.refuse_changed_settings(path, {"lr": 1e-6, "beta": 0.05, "model": "a"}, "x", "y")
    with pytest.raises(SystemExit):
        common.refuse_changed_settings(path, {"lr": 3e-7, "beta": 0.05, "model": "b"}, "runs/r1", "use another --out")
    err = capsys.readouterr().err
    assert "lr: 1e-06 -> 3e-07" in err and "model: 'a' -> 'b'" in err and "beta" not in err
    assert "runs/r1" in err and "use another --out" in err


def test_fingerprint_sees_content_changes(tmp_path):
    import os

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(b"1234")
    before = common.fingerprint(tmp_path / "m")
    assert common.fingerprint(tmp_path / "m") == before
    (tmp_path / "m" / "w.bin").write_bytes(b"12345")
    assert common.fingerprint(tmp_path / "m") != before
    assert common.fingerprint("Qwen/Qwen2.5-VL-7B-Instruct") == "Qwen/Qwen2.5-VL-7B-Instruct"
    (tmp_path / "f").write_bytes(b"a")
    st = os.stat(tmp_path / "f")
    one = common.fingerprint(tmp_path / "f")
    os.utime(tmp_path / "f", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert common.fingerprint(tmp_path / "f") != one


def test_greedy_config_decodes_argmax_batched_like_alone(tiny_model_dir, demo_pool):
    """Greedy generate with the explicit config equals a hand-written argmax loop, row by row, in a left-padded batch
    of two different images (different prompt lengths)."""
    import torch

    model, processor = common.load_model(tiny_model_dir), common.load_processor(tiny_model_dir, max_pixels=112 * 112)
    images = [common.load_image(p) for p in sorted(demo_pool.glob("*.png"))[:2]]
    images[1] = images[1].resize((56, 56))  # fewer vision tokens: the batch is left padded
    prompt = PRESETS["evoquality"].prompt("score", False)
    inputs = common.encode_batch(processor, [prompt] * 2, [[im] for im in images])
    assert (inputs["attention_mask"] == 0).any()
    out = model.generate(**inputs, generation_config=sampling.sampling_config(model, 6, do_sample=False))
    for row, image in enumerate(images):
        alone = dict(common.encode_batch(processor, [prompt], [[image]]))
        ids = alone["input_ids"]
        for _ in range(6):
            extra = {"mm_token_type_ids": torch.nn.functional.pad(alone["mm_token_type_ids"],
                                                                  (0, ids.shape[1] - alone["input_ids"].shape[1]))
                     } if "mm_token_type_ids" in alone else {}  # generated tokens are text
            with torch.no_grad():
                logits = model(**dict(alone, input_ids=ids, attention_mask=torch.ones_like(ids), **extra)).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        want = ids[0, alone["input_ids"].shape[1]:]
        got = out[row, inputs["input_ids"].shape[1]:][:len(want)]
        assert got.tolist() == want[:len(got)].tolist()
