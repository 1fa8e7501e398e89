"""experiments/warmstart.py: the base-model maker of the CPU test bed."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import prompts
from experiments import warmstart as W
from fixtures.synthetic import make_image
from fixtures.tiny_models import build_model, build_processor, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--text-hidden", "32", "--text-layers", "1", "--vision-hidden", "32", "--vision-depth", "1"]


@pytest.fixture(scope="module")
def built_base(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("base") / "base"
    run = subprocess.run(build_command(out), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run.stdout


def build_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "experiments/warmstart.py", "--out", str(out), "--steps", "3", "--warmup-steps", "1",
            "--score-batch", "2", "--compare-batch", "2", "--n-images", "8", "--n-bench", "6", "--bench-pairs", "4",
            "--eval-samples", "2", "--record", "", *TINY, *extra]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer()
    processor = build_processor("qwen2_5_vl", tokenizer, max_pixels=112 * 112, min_pixels=28 * 28)
    processor.tokenizer.padding_side = "left"
    model = build_model("qwen2_5_vl", tokenizer, text_hidden=32, text_layers=1, vision_hidden=32, vision_depth=1)
    return model, processor


def test_saved_base_loads_like_a_stage_checkpoint_and_is_reused(built_base):
    out, stdout = built_base
    assert stdout.strip().splitlines()[-1] == str(out)
    assert not out.with_name(out.name + ".partial").exists()
    model = common.load_model(str(out))
    processor = common.load_processor(str(out), max_pixels=112 * 112)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert model.generation_config.top_k == 1  # Qwen's shipped quirk kept: the stages must override it
    heldout = json.loads((out / "heldout.json").read_text())
    for key in ("srcc_greedy", "srcc_single", "srcc_mean_of_samples", "compare_acc_greedy", "compare_acc_majority"):
        assert -1.0 <= heldout[key] <= 1.0
    info = json.loads((out / "warmstart.json").read_text())
    assert info["steps"] == 3 and info["history"][-1]["step"] == 3
    # a 112 px image is 16 LLM tokens with the saved processor, as the test bed's dims promise
    batch = common.encode_batch(processor, ["q"], [[make_image(0)[0]]])
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 16
    again = subprocess.run(build_command(out), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "reusing" in again.stdout
    other = subprocess.run(build_command(out, "--seed", "1"), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert other.returncode == 2 and "other settings" in other.stderr  # never a silently wrong base


def test_training_prompt_is_exactly_the_stages_prompt(built_base, tiny):
    _, processor = tiny
    out, _ = built_base
    stage_processor = common.load_processor(str(out), max_pixels=112 * 112)  # what every stage loads
    preset = prompts.get_preset("evoquality")
    img = [make_image(k)[0] for k in range(3)]
    images, tasks, answers = [[img[0]], [img[1], img[2]]], ["score", "compare"], ["\\boxed{3.50}", "\\boxed{1}"]
    batch = W.training_batch(processor, preset, images, tasks, answers)
    texts = [preset.prompt(t, reasoning=False) for t in tasks]
    stage = common.encode_batch(stage_processor, texts, images, add_vision_id=preset.add_vision_id)
    width = stage["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][:, :width], stage["input_ids"])
    assert torch.equal(batch["attention_mask"][:, :width], stage["attention_mask"])
    assert torch.equal(batch["pixel_values"], stage["pixel_values"])
    text = common.chat_text(stage_processor, texts[1], 2, add_vision_id=True)
    assert text.endswith(f"{preset.compare} {prompts.BOXED_ANSWER_SUFFIX}<|im_end|>\n<|im_start|>assistant\n")
    assert text.count("<|image_pad|>") == 2 and "Picture 2: " in text
    # the loss sees the answer and <|im_end|>, nothing of the prompt, nothing of the padding
    for row, answer in enumerate(answers):
        target = batch["labels"][row][batch["labels"][row] != -100]
        assert processor.tokenizer.decode(target) == answer + "<|im_end|>"
        assert torch.all(batch["labels"][row][:width] == -100)
    assert int(batch["attention_mask"][0].sum()) == int(stage["attention_mask"][0].sum()) + 9  # \boxed{3.50} + eos
    assert int(batch["attention_mask"][1].sum()) == int(stage["attention_mask"][1].sum()) + 6  # \boxed{1} + eos


def test_answer_loss_matches_transformers_token_mean(tiny):
    """Equal-length answers: the mean of per-example means equals HF's own token-mean loss on the same labels."""
    model, processor = tiny
    preset = prompts.get_preset("evoquality")
    images = [[make_image(k)[0]] for k in range(3)]
    answers = ["\\boxed{1.00}", "\\boxed{4.50}", "\\boxed{2.25}"]
    batch = W.training_batch(processor, preset, images, ["score"] * 3, answers)
    with torch.no_grad():
        ours = W.per_example_loss(model, batch).mean()
        theirs = model(**batch).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_loss_goes_down_on_a_fixed_batch(tiny):
    """An honest learning check: 30 AdamW steps on one fixed mixed batch (both tasks) more than halve its loss."""
    _, processor = tiny
    torch.manual_seed(0)
    model = build_model("qwen2_5_vl", processor.tokenizer, text_hidden=32, text_layers=1, vision_hidden=32,
                        vision_depth=1)
    preset = prompts.get_preset("evoquality")
    rng = np.random.default_rng(0)
    images, quality, _ = W.warmstart_set(8, 112)
    pairs = [W.compare_example(rng, images, quality, 0.0, W.Args()) for _ in range(4)]
    batch = W.training_batch(processor, preset, [[images[i]] for i in range(4)] + [p for p, _ in pairs],
                             ["score"] * 4 + ["compare"] * 4,
                             [f"\\boxed{{{quality[i]:.2f}}}" for i in range(4)] + [f"\\boxed{{{t}}}" for _, t in pairs])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = W.per_example_loss(model, batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_same_content_variant_is_the_warmstart_image_content():
    """The curriculum's same-content pairs reuse the warm-start image's own content: for an image whose only
    distortion is deterministic (blur, JPEG, contrast), rebuilding it from its seed gives the identical pixels."""
    checked = 0
    for seed in range(60):
        img, record = make_image(seed)
        (kind, level), = record["distortions"].items() if len(record["distortions"]) == 1 else [(None, None)]
        if kind in ("blur", "jpeg", "contrast"):
            assert np.array_equal(np.asarray(W.same_content_variant(seed, kind, level, 112)), np.asarray(img))
            assert record["mos"] == 5 - level
            checked += 1
    assert checked >= 10


def test_curriculum_starts_with_gap_four_same_content_pairs():
    """At progress 0 every pair is one warm-start content, clean vs. level 4; the target points at the clean one."""
    rng = np.random.default_rng(1)
    images, quality, _ = W.warmstart_set(4, 112)
    clean = [np.asarray(W.same_content_variant(seed, "blur", 0, 112)) for seed in range(4)]  # level 0: no distortion
    for _ in range(8):
        shown, target = W.compare_example(rng, images, quality, 0.0, W.Args())
        better, worse = np.asarray(shown[target]), np.asarray(shown[1 - target])
        assert any(np.array_equal(better, c) for c in clean)
        assert not any(np.array_equal(worse, c) for c in clean)


def test_noise_world_and_its_same_content_variant():
    """The "noise" world: one distortion, Gaussian noise, quality 5 - level; the curriculum's variant of an image at
    its own level is the identical image (the same random draws, noise included), at another level it differs."""
    levels = set()
    for seed in range(20):
        img, record = make_image(seed, 56, "noise")
        (kind, level), = record["distortions"].items()
        assert kind == "noise" and record["mos"] == 5 - level and img.size == (56, 56)
        assert np.array_equal(np.asarray(W.same_content_variant(seed, "blur", level, 56, "noise")), np.asarray(img))
        other = W.same_content_variant(seed, "noise", (level + 1) % 5, 56, "noise")
        assert not np.array_equal(np.asarray(other), np.asarray(img))
        levels.add(level)
    assert levels == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match="unknown world"):
        make_image(0, 56, "fog")


def test_score_label_is_miscalibrated_by_content_only():
    """label = clip(1 + scale * (q - 1) + bias * index(content) / 3, 1, 5), by hand; defaults give the true quality."""
    args = W.Args(score_scale=0.4, score_bias=2.4)
    assert W.score_label(5.0, "smooth", args) == pytest.approx(2.6)  # 1 + 0.4 * 4 + 0
    assert W.score_label(1.0, "shapes", args) == pytest.approx(3.4)  # 1 + 0 + 2.4: a worse image scored higher
    assert W.score_label(3.0, "texture", args) == pytest.approx(1 + 0.8 + 1.6)
    assert W.score_label(5.0, "shapes", args) == 5.0  # clipped at 5
    assert W.score_label(3.5, "stripes", W.Args()) == 3.5
    # the new settings change the cache key only when set: bases built before them keep their hash
    assert W.settings_hash(W.Args()) == W.settings_hash(W.Args(world="mixed", score_bias=0.0))
    assert W.settings_hash(W.Args()) != W.settings_hash(W.Args(score_bias=2.4))


def test_readout_loss_is_the_mse_of_every_image_token_the_language_model_reads(tiny):
    """Independent computation: the merger's output captured by a hook during a FULL forward of the stages' prompt
    (the embeddings the language model reads), a hand-written linear readout and MSE in numpy."""
    model, processor = tiny
    preset = prompts.get_preset("evoquality")
    images, quality, _ = W.warmstart_set(3, 56, "noise")
    head = torch.nn.Linear(32, 1)
    captured = []
    hook = model.model.visual.merger.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    with torch.no_grad():
        ours = W.readout_loss(model, head, processor, images, quality).item()
        captured.clear()
        batch = common.encode_batch(processor, [preset.prompt("score", reasoning=False)] * 3, [[im] for im in images],
                                    add_vision_id=preset.add_vision_id)
        model(**batch)
    hook.remove()
    tokens = captured[0].numpy()  # (3 images x 4 tokens, hidden): 56 px images, 2x2 merge
    assert tokens.shape == (12, 32)
    prediction = tokens @ head.weight.detach().numpy()[0] + head.bias.item()
    target = np.repeat((quality - 3.0) / 2.0, 4)
    assert ours == pytest.approx(float(np.mean((prediction - target) ** 2)), rel=1e-5)


def test_vision_pretraining_lowers_the_readout_loss_and_touches_only_the_vision_tower(tiny):
    """The pre-training phase learns (noise world, 56 px; measured: readout MSE .55 -> .03 in 60 steps) and leaves the
    language model as it was."""
    _, processor = tiny
    model = build_model("qwen2_5_vl", processor.tokenizer, text_hidden=32, text_layers=1, vision_hidden=32,
                        vision_depth=1)
    language = {n: p.detach().clone() for n, p in model.named_parameters() if ".visual." not in f".{n}"}
    images, quality, _ = W.warmstart_set(64, 56, "noise")
    head = torch.nn.Linear(32, 1)
    args = W.Args(vision_pretrain_steps=60, vision_batch=32, vision_lr=1e-3, log_every=20, text_hidden=32)
    with torch.no_grad():
        before = W.readout_loss(model, head, processor, images, quality).item()
    curve = W.pretrain_vision(model, head, processor, images, quality, np.random.default_rng(0), args)
    with torch.no_grad():
        after = W.readout_loss(model, head, processor, images, quality).item()
    assert [c["step"] for c in curve] == [20, 40, 60]
    assert after < 0.6 * before, (before, after, curve)
    for name, p in model.named_parameters():
        if name in language:
            assert torch.equal(p, language[name]), name


def test_noisy_compare_label_flips_at_its_rate_and_draws_nothing_when_off():
    rng = np.random.default_rng(0)
    flips = np.mean([W.noisy_label(t, rng, 0.3) != t for t in [0, 1] * 5000])
    assert abs(flips - 0.3) < 0.02, flips
    rng, untouched = np.random.default_rng(1), np.random.default_rng(1)
    assert [W.noisy_label(t, rng, 0.0) for t in [0, 1, 1]] == [0, 1, 1]
    assert rng.random() == untouched.random()  # older bases (noise 0) keep their batches


@pytest.fixture(scope="module")
def world():
    return W.world_set(6, 56, 3)


def test_world_compare_examples_follow_the_true_order_and_the_shares(world):
    images, quality, _, reference_of, _ = world
    args = W.Args(world="distortion", same_reference_share=0.5, gap_start=1.0, curriculum_frac=0.5)
    pixels = {np.asarray(im).tobytes(): k for k, im in enumerate(images)}
    rng = np.random.default_rng(0)
    kinds = {"same": 0, "references": 0, "other": 0}
    for progress in (0.0, 0.9):
        for _ in range(200):
            shown, target = W.world_compare_example(rng, images, quality, reference_of, progress, args)
            i, j = (pixels[np.asarray(im).tobytes()] for im in shown)
            assert quality[i if target == 0 else j] > quality[j if target == 0 else i]  # the label is the true order
            if progress == 0.0:
                assert abs(quality[i] - quality[j]) > 1.0  # the curriculum's starting gap
            same = reference_of[i] == reference_of[j]
            kinds["same" if same else "references" if i == reference_of[i] and j == reference_of[j] else "other"] += 1
    assert 150 < kinds["same"] < 250 and kinds["references"] > 60 and kinds["other"] > 60


def test_score_quality_sees_the_fidelity_raised_to_a_power(world):
    _, quality, _, reference_of, fidelity = world
    np.testing.assert_allclose(W.score_quality(quality, reference_of, fidelity, 1.0), quality, atol=1e-12)
    lenient = W.score_quality(quality, reference_of, fidelity, 0.25)
    np.testing.assert_allclose(lenient, quality[reference_of] * np.maximum(fidelity, 0) ** 0.25)
    assert np.all(lenient >= quality - 1e-12)  # a power below 1 only forgives distortion


def test_world_pairs_are_of_their_kind_and_unequal():
    records = [r for _, r in W.world_images("bench", 8, 56, 2)]
    pairs = W.world_pairs(records, 10, 0)
    assert set(pairs) == set(W.PAIR_KINDS)
    for kind, chosen in pairs.items():
        assert len(chosen) == len(set(chosen)) == 10
        for i, j in chosen:
            assert i < j and records[i]["mos"] != records[j]["mos"]
            same = records[i]["reference"] == records[j]["reference"]
            assert same == (kind == "same_reference")
            if kind == "reference":
                assert records[i]["type"] is None and records[j]["type"] is None


def test_premise_table_hand_computed():
    quality = np.array([3.0, 2.0, 1.0])
    pairs = [(0, 1), (1, 2), (0, 2)]
    better, worse = np.array([5.0, 2.0, 3.0]), np.array([3.0, 2.0, 4.0])  # right, tie, wrong
    single = np.array([0.6, 0.5, 0.4])
    means = [2.0, 2.5, None]  # (0, 1) wrong, (1, 2) missing: half, (0, 2) missing: half
    firsts = [3.0, 1.0, 2.0]  # right, wrong, right
    table = W.premise_table(pairs, quality, better, worse, single, means, firsts)
    assert table["majority"]["accuracy"] == pytest.approx(0.5)
    assert table["single_vote"]["accuracy"] == pytest.approx(0.5)
    assert table["score_mean"]["accuracy"] == pytest.approx(1 / 3)
    assert table["score_single"]["accuracy"] == pytest.approx(2 / 3)
    margin = np.array([1 - 0, 0.5 - 0.5, 0 - 0.5])
    assert table["premise_margin"] == pytest.approx({"accuracy": margin.mean(), "se": margin.std(ddof=1) / np.sqrt(3)})


def test_a_distortion_world_base_builds_and_reports_the_premise_per_kind_of_pair(tmp_path):
    out = tmp_path / "base"
    cmd = build_command(out, "--world", "distortion", "--variants", "2", "--image-size", "56", "--max-pixels", "3136",
                        "--votes", "2", "--bench-variants", "2", "--n-synthetic", "1", "--score-fidelity-power", "0.5",
                        "--readout-fidelity", "--vision-pretrain-steps", "1", "--vision-aux-weight", "1")
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    heldout = json.loads((out / "heldout.json").read_text())
    assert heldout["n_images"] == 6 * 3 and heldout["votes"] == 2
    for kind in W.PAIR_KINDS:
        row = heldout[kind]
        assert row["pairs"] == 4
        for key in ("single_vote", "majority", "score_mean", "score_single"):
            assert 0.0 <= row[key]["accuracy"] <= 1.0
        assert row["premise_margin"]["accuracy"] == pytest.approx(row["majority"]["accuracy"]
                                                                 - row["score_mean"]["accuracy"])
    assert {"srcc_authentic", "srcc_synthetic", "srcc_pool_like"} <= set(heldout)
