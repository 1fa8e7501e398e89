"""The paper's prompts, byte-exact as the released model card publishes them, as named presets, and the parsers that
read an answer out of a completion: None for anything that is not exactly one answer, never a guess.

    from prompts import PRESETS, parse_compare, parse_score
    PRESETS["evoquality"].prompt("compare", reasoning=True)   # the text after the two images
    parse_compare("... \\boxed{1}")                             # 1: the second image is better
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Optional


# ---------------------------------------------------------------------------------------------------------------------
# Prompts (the model card's; keep byte-exact)
# ---------------------------------------------------------------------------------------------------------------------

COMPARE_PROMPT = (
    "You are performing an image quality assessment task. Compare the two images and decide which one has better "
    "perceptual quality. Answer strictly with the index of the better image: 0 if the first image is better, or 1 if "
    "the second image is better."
)
SCORE_PROMPT = (
    "You are doing the image quality assessment task. Here is the question: What is your overall rating on the "
    "quality of this picture? The rating should be a float between 1 and 5, rounded to two decimal places, with 1 "
    "representing very poor quality and 5 representing excellent quality."
)
# The released model's card (ByteDance/EvoQuality, "Reasoning Suffix (for self-consistency sampling)")
BOXED_REASONING_SUFFIX = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. The "
    "final answer MUST BE put in \\boxed{}."
)
# EasyR1's generic math template (examples/format_prompt/math.jinja) has one more sentence; the card does not
EASYR1_REASONING_SUFFIX = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. The "
    "reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in \\boxed{}."
)
BOXED_ANSWER_SUFFIX = "The final answer MUST BE put in \\boxed{}."  # our no-reasoning variant (the paper's last sentence)
VQR1_REASONING_SUFFIX = (
    "First output the thinking process in <think> </think> tags and then output the final answer with only one score "
    "in <answer> </answer> tags."
)
VQR1_ANSWER_SUFFIX = "Please only output the final answer with only one score in <answer> </answer> tags."
VQR1_COMPARE_SUFFIX = (  # ours: VisualQuality-R1 publishes no compare prompt; same tags, an index instead of a score
    "First output the thinking process in <think> </think> tags and then output the final answer with only the index "
    "of the better image in <answer> </answer> tags."
)
VQR1_COMPARE_ANSWER_SUFFIX = "Please only output the final answer with only the index of the better image in <answer> </answer> tags."


@dataclass(frozen=True)
class Preset:
    """A prompt family: the questions, the format suffixes, and where the answer lives."""

    name: str
    compare: str
    score: str
    compare_suffix: tuple[str, str]  # (reasoning, no reasoning)
    score_suffix: tuple[str, str]
    answer: str  # "boxed": the last \boxed{...}; "answer_tag": the last <answer>...</answer>
    add_vision_id: bool  # "Picture 1: " before each image, as VisualQuality-R1's published inference does
    lead: str = ""  # text between the images and the question: the card writes "<image><image> You are ..."

    def prompt(self, task: str, reasoning: bool) -> str:
        """The text that follows the images in the user turn."""
        question, suffixes = (self.compare, self.compare_suffix) if task == "compare" else (self.score, self.score_suffix)
        return f"{self.lead}{question} {suffixes[0] if reasoning else suffixes[1]}"

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


PRESETS = {
    # byte-exact to the released model's card: the images, then " " and the text; no "Picture N:" labels
    "evoquality": Preset(
        "evoquality", COMPARE_PROMPT, SCORE_PROMPT,
        (BOXED_REASONING_SUFFIX, BOXED_ANSWER_SUFFIX), (BOXED_REASONING_SUFFIX, BOXED_ANSWER_SUFFIX),
        answer="boxed", add_vision_id=False, lead=" ",
    ),
    # the same with EasyR1's longer reasoning suffix (it asks for <think> tags), for checkpoints trained on it
    "evoquality_easyr1": Preset(
        "evoquality_easyr1", COMPARE_PROMPT, SCORE_PROMPT,
        (EASYR1_REASONING_SUFFIX, BOXED_ANSWER_SUFFIX), (EASYR1_REASONING_SUFFIX, BOXED_ANSWER_SUFFIX),
        answer="boxed", add_vision_id=False, lead=" ",
    ),
    "visualquality_r1": Preset(
        "visualquality_r1", COMPARE_PROMPT, SCORE_PROMPT,
        (VQR1_COMPARE_SUFFIX, VQR1_COMPARE_ANSWER_SUFFIX), (VQR1_REASONING_SUFFIX, VQR1_ANSWER_SUFFIX),
        answer="answer_tag", add_vision_id=True,
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown prompt preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


# ---------------------------------------------------------------------------------------------------------------------
# Answer parsing: None for anything that is not exactly one answer (never a guess)
# ---------------------------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last top-level \\boxed{...}; None if there is none or the last one is never closed."""
    last, i = None, 0
    while (start := text.find("\\boxed{", i)) != -1:
        depth, j = 1, start + len("\\boxed{")
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth:  # truncated: the model's final box never closed
            return None
        last, i = text[start + len("\\boxed{"): j - 1], j
    return last


def last_answer_tag(text: str) -> Optional[str]:
    """Content of the last <answer>...</answer>; None if there is none or an <answer> after it is never closed."""
    matches = list(re.finditer(r"<answer>(.*?)</answer>", text, flags=re.S))
    if not matches or "<answer>" in text[matches[-1].end():]:
        return None
    return matches[-1].group(1)


def extract_answer(text: str, preset: Preset) -> Optional[str]:
    content = last_boxed(text) if preset.answer == "boxed" else last_answer_tag(text)
    return None if content is None else content.strip()


def parse_compare(text: str, preset: Preset = PRESETS["evoquality"]) -> Optional[int]:
    """0 (first image better) or 1 (second image better); None otherwise."""
    answer = extract_answer(text, preset)
    return int(answer) if answer in ("0", "1") else None


def parse_score(text: str, preset: Preset = PRESETS["evoquality"]) -> Optional[float]:
    """A finite float in [1, 5]; None otherwise (no answer, several numbers, out of range, NaN, junk)."""
    answer = extract_answer(text, preset)
    if answer is None or not _NUMBER.fullmatch(answer):
        return None
    value = float(answer)
    return value if math.isfinite(value) and 1.0 <= value <= 5.0 else None
