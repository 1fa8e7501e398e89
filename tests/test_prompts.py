"""prompts.py: the presets byte-exact against an independent copy of the published text (also inside the real chat
template), the preset hash, and the parsers: None for anything that is not exactly one answer."""

import dataclasses
import math

import pytest

import common
import prompts
from prompts import PRESETS, parse_compare, parse_score

# ---------------------------------------------------------------------------------------------------------------------
# Prompts: byte-exact against the published text (an independent copy here)
# ---------------------------------------------------------------------------------------------------------------------

PUBLISHED_COMPARE = ("You are performing an image quality assessment task. Compare the two images and decide which one "
                     "has better perceptual quality. Answer strictly with the index of the better image: 0 if the first "
                     "image is better, or 1 if the second image is better.")
PUBLISHED_SCORE = ("You are doing the image quality assessment task. Here is the question: What is your overall rating "
                   "on the quality of this picture? The rating should be a float between 1 and 5, rounded to two decimal "
                   "places, with 1 representing very poor quality and 5 representing excellent quality.")
# The released model's card (two copies agree): images first, then " " and the text; this reasoning suffix
PUBLISHED_SUFFIX = ("You FIRST think about the reasoning process as an internal monologue and then provide the final "
                    "answer. The final answer MUST BE put in \\boxed{}.")
EASYR1_SUFFIX = ("You FIRST think about the reasoning process as an internal monologue and then provide the final "
                 "answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST "
                 "BE put in \\boxed{}.")
VQR1_SUFFIX = ("First output the thinking process in <think> </think> tags and then output the final answer with only "
               "one score in <answer> </answer> tags.")


def test_prompts_byte_exact():
    evo = PRESETS["evoquality"]
    assert evo.prompt("compare", True) == " " + PUBLISHED_COMPARE + " " + PUBLISHED_SUFFIX
    assert evo.prompt("score", True) == " " + PUBLISHED_SCORE + " " + PUBLISHED_SUFFIX
    assert PRESETS["evoquality_easyr1"].prompt("score", True) == " " + PUBLISHED_SCORE + " " + EASYR1_SUFFIX
    assert not evo.add_vision_id
    assert PRESETS["visualquality_r1"].prompt("score", True) == PUBLISHED_SCORE + " " + VQR1_SUFFIX


def test_preset_hash_changes_with_text():
    evo = PRESETS["evoquality"]
    assert evo.hash() != PRESETS["visualquality_r1"].hash() != PRESETS["evoquality_easyr1"].hash()
    assert dataclasses.replace(evo).hash() == evo.hash()  # a separately built, equal preset: the same hash
    for change in ({"lead": ""}, {"add_vision_id": True}, {"score": evo.score + " "}, {"answer": "answer_tag"}):
        assert dataclasses.replace(evo, **change).hash() != evo.hash(), change
    with pytest.raises(ValueError, match="unknown prompt preset"):
        prompts.get_preset("nope")


# ---------------------------------------------------------------------------------------------------------------------
# Parsers: None for anything that is not exactly one answer
# ---------------------------------------------------------------------------------------------------------------------

SCORE_CASES = [
    ("<think>fine</think> \\boxed{3.25}", 3.25),
    ("\\boxed{1}", 1.0),
    ("\\boxed{5.00}", 5.0),
    ("\\boxed{ 4.5 }", 4.5),
    ("\\boxed{2.} and more text", 2.0),
    ("\\boxed{.5}", None),  # 0.5 is out of range
    ("first \\boxed{2.0} then \\boxed{4.0}", 4.0),  # the LAST box counts
    ("\\boxed{0.99}", None),
    ("\\boxed{5.01}", None),
    ("\\boxed{-3}", None),
    ("\\boxed{nan}", None),
    ("\\boxed{inf}", None),
    ("\\boxed{}", None),
    ("\\boxed{3.5, 4.0}", None),  # several numbers
    ("\\boxed{3 4}", None),
    ("\\boxed{3.5/5}", None),
    ("\\boxed{\\text{3.5}}", None),  # nested junk
    ("\\boxed{\\boxed{3.5}}", None),
    ("\\boxed{1e0}", None),
    ("The score is 3.5", None),  # no box
    ("", None),
    ("\\boxed{4.2", None),  # never closed: truncated
    ("\\boxed{2.0} then \\boxed{4.", None),  # the final box is truncated
    ("\\boxed{three}", None),
    ("boxed{3.0}", None),
    ("\\boxed{3.50}}", 3.5),
    ("<answer>3.5</answer>", None),  # wrong tag for this preset
]


@pytest.mark.parametrize("text,expected", SCORE_CASES)
def test_parse_score_boxed(text, expected):
    assert parse_score(text) == expected


COMPARE_CASES = [
    ("<think>the second is sharper</think> \\boxed{1}", 1),
    ("\\boxed{0}", 0),
    ("\\boxed{ 0 }", 0),
    ("\\boxed{1} no wait \\boxed{0}", 0),
    ("\\boxed{2}", None),
    ("\\boxed{0.5}", None),
    ("\\boxed{01}", None),
    ("\\boxed{0 or 1}", None),
    ("\\boxed{first}", None),
    ("1", None),
    ("\\boxed{1", None),
    ("\\boxed{-1}", None),
]


@pytest.mark.parametrize("text,expected", COMPARE_CASES)
def test_parse_compare_boxed(text, expected):
    assert parse_compare(text) == expected


VQR1_CASES = [
    ("<think>ok</think><answer>3.42</answer>", 3.42),
    ("<answer> 4 </answer>", 4.0),
    ("<answer>1.0</answer> <answer>2.0</answer>", 2.0),
    ("<answer>2.0</answer> <answer>4.", None),  # the final answer is truncated
    ("<answer>6</answer>", None),
    ("<answer>3.5 or 4</answer>", None),
    ("<answer></answer>", None),
    ("\\boxed{3.5}", None),
]


@pytest.mark.parametrize("text,expected", VQR1_CASES)
def test_parse_score_answer_tag(text, expected):
    assert parse_score(text, PRESETS["visualquality_r1"]) == expected


def test_parse_compare_answer_tag():
    vq = PRESETS["visualquality_r1"]
    assert parse_compare("<think>x</think><answer>1</answer>", vq) == 1
    assert parse_compare("<answer>3</answer>", vq) is None


def test_parsed_scores_are_finite_floats():
    for text, expected in SCORE_CASES + VQR1_CASES:
        for preset in PRESETS.values():
            value = parse_score(text, preset)
            assert value is None or (isinstance(value, float) and math.isfinite(value) and 1 <= value <= 5)


CHAT_HEAD = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def test_evoquality_chat_text_is_the_cards_format(tiny_model_dir):
    """The card's `<image><image> You are performing ...`: the images, one space, the text; no "Picture N:"."""
    processor = common.load_processor(tiny_model_dir)
    evo = PRESETS["evoquality"]
    two = common.chat_text(processor, evo.prompt("compare", True), 2, evo.add_vision_id)
    assert two == (CHAT_HEAD + IMAGE + IMAGE + " " + PUBLISHED_COMPARE + " " + PUBLISHED_SUFFIX
                   + "<|im_end|>\n<|im_start|>assistant\n")
    one = common.chat_text(processor, evo.prompt("score", True), 1, evo.add_vision_id)
    assert one == (CHAT_HEAD + IMAGE + " " + PUBLISHED_SCORE + " " + PUBLISHED_SUFFIX
                   + "<|im_end|>\n<|im_start|>assistant\n")
