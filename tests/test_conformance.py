"""Conformance matrix: model family x capability, each cell checked against values written by hand.

Families (tiny models, random weights from configs, ``tests/helpers/hf.py``): BERT sequence classification, BERT
token classification, GPT-2 causal LM, T5 and BART encoder-decoders, ViT image classification, and the
torchvision-style ResNet of ``tests/helpers/resnet.py``. Capabilities (``CAPABILITIES``): logit KD through the
Trainer (with validate, test, checkpoint and export), feature maps on named layers, the teacher cache, the
``Distiller`` loop API, a mixture of two teachers, self-distillation, a ``torch.compile``-d student, loading a
checkpoint without ``student=``, and the untrained-teacher warning.

The cells are tested in ``tests/test_conformance_<part>.py`` (``trainer``: a, c, g, h, i; ``features``: b, e;
``distiller``: d; ``self_distill``: f; run them all with ``python -m pytest tests/test_conformance*.py``), against
values computed with plain torch in float64 (``tests/helpers/conformance.py``), never with the library's loss
functions, masks or routing. ``MATRIX`` lists every cell with its status; ``test_matrix_is_honest`` checks that each
"tested" or "refused" cell names a test (and parameter) of one of those files.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

from tests.helpers import hf

# ------------------------------------------------------------------------------------------------- the matrix
CAPABILITIES = {
    "a": "logit KD through the Trainer (+ validate, test, checkpoint, export)",
    "b": "feature maps on named layers (masked on real tokens)",
    "c": "teacher cache",
    "d": "Distiller in a plain loop",
    "e": "mixture of two teachers (+ a feature map on 'a.<layer>')",
    "f": "SelfDistillModule",
    "g": "torch.compile-d student",
    "h": "load_from_checkpoint without student= refused",
    "i": "no 'untrained teacher' warning before a real error",
}

_SELF_DISTILL_NA = {
    "bert_seq": (
        "n/a (not in scope: it runs, with token exit heads as for ViT, but they average over padding tokens too)"
    ),
}
_COMPILE_NA = "n/a (a property of the wrapper, checked on the ResNet and BERT seq-cls)"

MATRIX: list[dict[str, str]] = [
    # a. logit KD through the Trainer
    *(
        {"family": f, "capability": "a", "status": "tested", "test": f"test_logit_kd_through_the_trainer[{case}]"}
        for f, case in [
            ("bert_seq", "bert_seq"),
            ("bert_tok", "bert_tok"),
            ("gpt2", "gpt2"),
            ("t5", "t5"),
            ("t5", "t5_equal_lengths"),
            ("t5", "t5_decoder_mask"),
            ("bart", "bart"),
            ("bart", "bart_equal_lengths"),
            ("bart", "bart_decoder_mask"),
            ("vit", "vit"),
            ("resnet", "resnet"),
        ]
    ),
    # b. feature maps
    *(
        {"family": f, "capability": "b", "status": "tested", "test": f"test_feature_maps_on_named_layers[{case}]"}
        for f, case in [
            ("bert_seq", "bert_seq"),
            ("bert_tok", "bert_tok"),
            ("gpt2", "gpt2"),
            ("t5", "t5"),
            ("t5", "t5_decoder_mask"),
            ("bart", "bart"),
            ("vit", "vit"),
            ("resnet", "resnet_layer1"),
            ("resnet", "resnet_bn1"),
        ]
    ),
    # c. teacher cache
    *(
        {"family": f, "capability": "c", "status": "tested", "test": f"test_cached_teacher_gives_uncached_losses[{f}]"}
        for f in ("bert_seq", "vit", "resnet")
    ),
    *(
        {
            "family": f,
            "capability": "c",
            "status": f"refused (test_cache_refuses_token_level_logits[{f}])",
            "test": f"test_cache_refuses_token_level_logits[{f}]",
        }
        for f in ("bert_tok", "gpt2", "t5", "bart")
    ),
    # d. Distiller
    *(
        {"family": f, "capability": "d", "status": "tested", "test": f"test_distiller_in_a_plain_loop[{f}]"}
        for f in hf.FAMILIES
    ),
    # e. mixture of two teachers
    *(
        {"family": f, "capability": "e", "status": "tested", "test": f"test_mixture_of_two_teachers[{f}]"}
        for f in hf.FAMILIES
    ),
    # f. self-distillation
    *(
        {"family": f, "capability": "f", "status": "tested", "test": f"test_self_distillation[{f}]"}
        for f in ("vit", "resnet")
    ),
    *({"family": f, "capability": "f", "status": why} for f, why in _SELF_DISTILL_NA.items()),
    *(
        {
            "family": f,
            "capability": "f",
            "status": f"refused (test_self_distillation_refuses_per_token_and_encoder_decoder_backbones[{f}])",
            "test": f"test_self_distillation_refuses_per_token_and_encoder_decoder_backbones[{f}]",
        }
        for f in ("bert_tok", "gpt2", "t5", "bart")
    ),
    # g. torch.compile
    *(
        {"family": f, "capability": "g", "status": "tested", "test": f"test_compiled_student[{f}]"}
        for f in ("bert_seq", "resnet")
    ),
    *({"family": f, "capability": "g", "status": _COMPILE_NA} for f in ("bert_tok", "gpt2", "t5", "bart", "vit")),
    # h. load_from_checkpoint without student= (checked in every cell of a)
    *(
        {"family": f, "capability": "h", "status": "tested", "test": f"test_logit_kd_through_the_trainer[{f}]"}
        for f in hf.FAMILIES
    ),
    # i. untrained-teacher warning before a real error
    *(
        {
            "family": f,
            "capability": "i",
            "status": "tested",
            "test": f"test_no_untrained_warning_before_a_real_error[{case}]",
        }
        for f, case in [
            ("bert_seq", "bert_seq"),
            ("bert_tok", "bert_tok"),
            ("gpt2", "gpt2_no_shift"),
            ("gpt2", "gpt2_shift"),
            ("t5", "t5"),
            ("bart", "bart"),
            ("vit", "vit"),
            ("resnet", "resnet"),
        ]
    ),
]


FAMILY_NAMES = {
    "bert_seq": "BERT sequence classification",
    "bert_tok": "BERT token classification",
    "gpt2": "GPT-2 causal LM",
    "t5": "T5 encoder-decoder",
    "bart": "BART encoder-decoder",
    "vit": "ViT image classification",
    "resnet": "ResNet (torchvision-style CNN)",
}


def matrix_markdown() -> str:
    """``MATRIX`` as a Markdown table (families x capabilities) with the reasons of the n/a cells as notes."""
    notes: list[str] = []
    lines = [
        "| family | " + " | ".join(f"{c}. {CAPABILITIES[c]}" for c in CAPABILITIES) + " |",
        "|---|" + "---|" * len(CAPABILITIES),
    ]
    for family in hf.FAMILIES:
        cells = []
        for capability in CAPABILITIES:
            statuses = {row["status"] for row in MATRIX if (row["family"], row["capability"]) == (family, capability)}
            word = "tested" if statuses == {"tested"} else next(iter(statuses)).split(" (")[0]
            if word == "n/a":
                reason = next(iter(statuses)).partition(" (")[2].removesuffix(")")
                if reason not in notes:
                    notes.append(reason)
                word = f"n/a [{notes.index(reason) + 1}]"
            cells.append(word)
        lines.append(f"| {FAMILY_NAMES[family]} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(f"[{i}] {note}" for i, note in enumerate(notes, start=1))
    return "\n".join(lines)


def cell_tests() -> dict[str, Any]:
    """Every test function of the ``tests/test_conformance_<part>.py`` files, by name (each name in one file only)."""
    found: dict[str, Any] = {}
    files = sorted(Path(__file__).parent.glob("test_conformance_*.py"))
    assert files, "no tests/test_conformance_<part>.py file"
    for path in files:
        module = importlib.import_module(path.stem)  # pytest puts tests/ on sys.path (rootdir-relative, no __init__)
        for name, function in vars(module).items():
            if name.startswith("test_") and callable(function):
                assert name not in found, f"{name} is defined in two conformance files"
                found[name] = function
    return found


def test_matrix_is_honest() -> None:
    """Every family x capability has a row; every "tested" or "refused" row names a test and parameter of a part."""
    tests = cell_tests()
    cells = {(row["family"], row["capability"]) for row in MATRIX}
    assert cells == {(f, c) for f in hf.FAMILIES for c in CAPABILITIES}
    for row in MATRIX:
        status = row["status"]
        assert status == "tested" or re.fullmatch(r"(refused|n/a) \(.+\)", status), row
        if status.startswith("n/a"):
            continue
        name, _, param = row["test"].partition("[")
        function = tests.get(name)
        assert callable(function) and name.startswith("test_"), f"{row}: no test function {name!r}"
        if param:
            ids = [
                p.id if hasattr(p, "id") else p
                for mark in getattr(function, "pytestmark", [])
                if mark.name == "parametrize"
                for p in mark.args[1]
            ]
            assert param.rstrip("]") in ids, f"{row}: {name} has no parameter {param.rstrip(']')!r} (has {ids})"
        if status.startswith("refused"):
            assert row["test"] in status, row
    table = matrix_markdown()
    assert all(FAMILY_NAMES[f] in table for f in hf.FAMILIES)
