"""Conformance matrix, intermediate features: feature maps on named layers (b) and a mixture of two teachers with a
feature map on one of them (e). The matrix itself: ``tests/test_conformance.py``.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from lightning_distill import DistillationCallback, DistillModule, FeatureMap, TeacherMixture
from tests.helpers import hf
from tests.helpers.conformance import (
    ALPHA,
    REL,
    Recorder,
    T,
    W,
    captured,
    expected_logit_terms,
    make_trainer,
    masked_mse,
    one_torch_thread,  # noqa: F401  (an autouse fixture)
    params,
    token_mask,
)

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")

# ----------------------------------------------------------------------------------------------- b: feature maps
VIT0, VIT1 = (hf.vit_block(0), hf.vit_block(1)) if hf.has_transformers() else ("vit.layers.0", "vit.layers.1")

# case -> (family, sample options, [(name, student layer, teacher layer, side of the token mask)]); a layer that
# returns a tuple (T5 blocks) is read at index 0, its hidden states
FEATURE_CASES: dict[str, tuple[str, dict[str, Any], list[tuple[str, str, str, str | None]]]] = {
    "bert_seq": ("bert_seq", {}, [("enc", "bert.encoder.layer.0", "bert.encoder.layer.1", "encoder")]),
    "bert_tok": ("bert_tok", {}, [("enc", "bert.encoder.layer.0", "bert.encoder.layer.1", "encoder")]),
    "gpt2": ("gpt2", {}, [("h0", "transformer.h.0", "transformer.h.1", "encoder")]),
    "t5": (
        "t5",
        {},
        [
            ("enc", "encoder.block.0", "encoder.block.1", "encoder"),
            ("dec", "decoder.block.0", "decoder.block.1", "decoder"),
        ],
    ),
    "t5_decoder_mask": (
        "t5",
        {"decoder_attention_mask": True},
        [("dec", "decoder.block.0", "decoder.block.1", "decoder")],
    ),
    "bart": (
        "bart",
        {},
        [
            ("enc", "model.encoder.layers.0", "model.encoder.layers.1", "encoder"),
            ("dec", "model.decoder.layers.0", "model.decoder.layers.1", "decoder"),
        ],
    ),
    # transformers 5 names ViT's blocks `vit.layers.<i>` (4.x: `vit.encoder.layer.<i>`); no mask: no padding
    "vit": ("vit", {}, [("tokens", VIT0, VIT1, None)]),
    "resnet_layer1": ("resnet", {}, [("layer1", "layer1", "layer1", None)]),
    # bn1 is followed by ReLU(inplace=True): the feature is the BatchNorm's output, not the rectified one
    "resnet_bn1": ("resnet", {}, [("bn1", "bn1", "bn1", None)]),
}


@pytest.mark.parametrize("case", params(list(FEATURE_CASES), FEATURE_CASES))
def test_feature_maps_on_named_layers(case: str) -> None:
    family, options, maps = FEATURE_CASES[case]
    student, teacher = hf.pair(family)
    initial = copy.deepcopy(student).train()
    batch = hf.batches(family, 1, seed=0, **options)[0]
    inputs = hf.model_inputs(family, batch)
    s_sel = {name: hf.tuple_index(initial, s, inputs) for name, s, _, _ in maps}
    t_sel = {name: hf.tuple_index(teacher, t, inputs) for name, _, t, _ in maps}
    feature_maps = [
        FeatureMap(student=s, teacher=t, name=name, student_select=s_sel[name], teacher_select=t_sel[name], weight=W)
        for name, s, t, _ in maps
    ]
    module = DistillModule(
        student=student, alpha=ALPHA, temperature=T, feature_maps=feature_maps, shift_labels=family == "gpt2"
    )
    assert module.example_input_array is None  # shapes come from the first batch of the loader given to fit
    recorder = Recorder()
    trainer = make_trainer([DistillationCallback(teacher), recorder])
    trainer.fit(module, hf.loader(family, 2, seed=0, **options))

    with captured(initial, {n: (s, s_sel[n]) for n, s, _, _ in maps}) as s_feats, torch.no_grad():
        hf.logits_of(initial, inputs)
    with captured(teacher, {n: (t, t_sel[n]) for n, _, t, _ in maps}) as t_feats, torch.no_grad():
        hf.logits_of(teacher, inputs)
    projectors = recorder.before[0]["projectors"]
    step = recorder.steps[0]
    total = expected_logit_terms(family, batch, initial, [teacher])["loss"]
    for name, _, _, side in maps:
        with torch.no_grad():
            projected = projectors[name](s_feats[name])
        assert projected.shape == t_feats[name].shape
        mask = token_mask(family, batch, side)
        expected = masked_mse(projected, t_feats[name], mask)
        assert step[f"train/feature_loss/{name}"] == pytest.approx(expected, rel=REL), name
        # the check can tell: averaging over the padding too, or matching rectified BatchNorm outputs, differs
        if mask is not None:
            assert masked_mse(projected, t_feats[name], None) != pytest.approx(expected, rel=1e-3)
        if name == "bn1":
            with torch.no_grad():
                rectified = projectors[name](s_feats[name].relu())
            assert masked_mse(rectified, t_feats[name].relu(), None) != pytest.approx(expected, rel=1e-3)
        total += W * expected
    assert step["loss"] == pytest.approx(total, rel=REL)


# ----------------------------------------------------------------------------------------------- e: two teachers
# family -> (student layer, teacher layer, side of the token mask)
MIXTURE_MAPS: dict[str, tuple[str, str, str | None]] = {
    "bert_seq": ("bert.encoder.layer.0", "bert.encoder.layer.1", "encoder"),
    "bert_tok": ("bert.encoder.layer.0", "bert.encoder.layer.0", "encoder"),
    "gpt2": ("transformer.h.0", "transformer.h.1", "encoder"),
    "t5": ("decoder.block.0", "decoder.block.1", "decoder"),
    "bart": ("model.encoder.layers.0", "model.encoder.layers.1", "encoder"),
    "vit": (VIT0, VIT1, None),
    "resnet": ("layer2", "layer2", None),
}


@pytest.mark.parametrize("family", params(hf.FAMILIES))
def test_mixture_of_two_teachers(family: str) -> None:
    student = hf.make_model(family, "student", seed=0)
    teacher_a, teacher_b = hf.make_model(family, "teacher", seed=1), hf.make_model(family, "teacher", seed=2)
    initial = copy.deepcopy(student).train()
    s_layer, t_layer, side = MIXTURE_MAPS[family]
    batch = hf.batches(family, 1)[0]
    inputs = hf.model_inputs(family, batch)
    s_sel, t_sel = hf.tuple_index(initial, s_layer, inputs), hf.tuple_index(teacher_a, t_layer, inputs)
    fmap = FeatureMap(
        student=s_layer, teacher=f"a.{t_layer}", name="mix", student_select=s_sel, teacher_select=t_sel, weight=W
    )
    module = DistillModule(
        student=student, alpha=ALPHA, temperature=T, feature_maps=[fmap], shift_labels=family == "gpt2"
    )
    recorder = Recorder()
    trainer = make_trainer([DistillationCallback(TeacherMixture({"a": teacher_a, "b": teacher_b})), recorder])
    trainer.fit(module, hf.loader(family, 2))

    logit_terms = expected_logit_terms(family, batch, initial, [teacher_a, teacher_b])
    with captured(initial, {"mix": (s_layer, s_sel)}) as s_feat, torch.no_grad():
        hf.logits_of(initial, inputs)
    with captured(teacher_a, {"mix": (t_layer, t_sel)}) as t_feat, torch.no_grad():
        hf.logits_of(teacher_a, inputs)
    with torch.no_grad():
        projected = recorder.before[0]["projectors"]["mix"](s_feat["mix"])
    feature = masked_mse(projected, t_feat["mix"], token_mask(family, batch, side))
    step = recorder.steps[0]
    for alone in (teacher_a, teacher_b):  # the target is the mixture, not either teacher
        kd_alone = expected_logit_terms(family, batch, initial, [alone])["kd_loss"]
        assert kd_alone != pytest.approx(logit_terms["kd_loss"], rel=1e-3)
    assert step["train/kd_loss"] == pytest.approx(logit_terms["kd_loss"], rel=REL)
    assert step["train/task_loss"] == pytest.approx(logit_terms["task_loss"], rel=REL)
    assert step["train/feature_loss/mix"] == pytest.approx(feature, rel=REL)
    assert step["loss"] == pytest.approx(logit_terms["loss"] + W * feature, rel=REL)
