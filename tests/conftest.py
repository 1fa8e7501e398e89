"""Shared fixtures: tiny real-architecture checkpoints and synthetic images, built offline once per session."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at test time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random Qwen2.5-VL checkpoint folder (the real classes, saved with save_pretrained)."""
    from fixtures.tiny_models import build_tiny_checkpoint

    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), "qwen2_5_vl"))


@pytest.fixture(scope="session")
def demo_pool(tmp_path_factory) -> Path:
    """12 synthetic unlabeled-pool images (112 px PNGs) and their labels.jsonl."""
    from fixtures.synthetic import write_set

    return write_set(tmp_path_factory.mktemp("pool"), "pool", 12)


@pytest.fixture(scope="session")
def demo_bench(tmp_path_factory) -> Path:
    """12 synthetic benchmark images with a known MOS in labels.jsonl ({"image", "mos"} lines)."""
    from fixtures.synthetic import write_set

    return write_set(tmp_path_factory.mktemp("bench"), "bench", 12)
