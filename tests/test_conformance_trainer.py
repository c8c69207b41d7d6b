"""Conformance matrix, through the Trainer: logit KD (a, with h), the teacher cache (c), ``torch.compile`` (g), and
no untrained-teacher warning before a real error (i). The matrix itself: ``tests/test_conformance.py``.
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_distill import DistillationCallback, DistillModule, TeacherCache
from lightning_distill.teacher import IndexedDataset
from tests.helpers import hf
from tests.helpers.conformance import (
    ALPHA,
    REL,
    Recorder,
    T,
    assert_same_weights,
    expected_evaluation,
    expected_logit_terms,
    make_trainer,
    one_torch_thread,  # noqa: F401  (an autouse fixture)
    params,
    run_once,
    wrong_rule,
)

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")

# name -> (family, options of hf.samples)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "bert_seq": ("bert_seq", {}),
    "bert_tok": ("bert_tok", {}),
    "gpt2": ("gpt2", {}),
    "t5": ("t5", {}),  # encoder 10, decoder 6
    "t5_equal_lengths": ("t5", {"encoder_len": 8, "decoder_len": 8}),
    "t5_decoder_mask": ("t5", {"decoder_attention_mask": True}),
    "bart": ("bart", {}),
    "bart_equal_lengths": ("bart", {"encoder_len": 8, "decoder_len": 8}),
    "bart_decoder_mask": ("bart", {"decoder_attention_mask": True}),
    "vit": ("vit", {}),
    "resnet": ("resnet", {}),
}


# ---------------------------------------------------------------------------------------------- a (+ h): logit KD
@pytest.mark.parametrize("case", params(list(CASES), CASES))
def test_logit_kd_through_the_trainer(case: str, tmp_path: Any) -> None:
    family, options = CASES[case]
    student, teacher = hf.pair(family)
    initial = copy.deepcopy(student).train()
    train = hf.batches(family, 2, seed=0, **options)
    if case.endswith("equal_lengths"):  # the encoder's mask has the decoder's shape but says something else
        assert train[0]["attention_mask"].shape == train[0]["labels"].shape
        assert not torch.equal(train[0]["attention_mask"].bool(), train[0]["labels"] != -100)
    module = DistillModule(student=student, alpha=ALPHA, temperature=T, shift_labels=family == "gpt2")
    teacher_kwargs: list[set[str]] = []
    teacher.register_forward_pre_hook(lambda m, args, kwargs: teacher_kwargs.append(set(kwargs)), with_kwargs=True)
    recorder = Recorder()
    trainer = make_trainer([DistillationCallback(teacher), recorder])
    trainer.fit(module, hf.loader(family, 2, seed=0, **options))

    expected = expected_logit_terms(family, train[0], initial, [teacher])
    step = recorder.steps[0]
    assert step["loss"] == pytest.approx(expected["loss"], rel=REL)
    for key in ("loss", "kd_loss", "task_loss"):
        assert step[f"train/{key}"] == pytest.approx(expected[key], rel=REL), key
    if (wrong := wrong_rule(case, train[0])) is not None:  # the check can tell the right positions from these
        assert expected_logit_terms(family, train[0], initial, [teacher], counted=wrong)["loss"] != pytest.approx(
            expected["loss"], rel=1e-3
        )
    assert teacher_kwargs and all("labels" not in kwargs for kwargs in teacher_kwargs)
    if family in hf.ENCODER_DECODER:
        assert all("decoder_input_ids" in kwargs for kwargs in teacher_kwargs)

    held_out = hf.loader(family, 1, seed=1, **options)
    (batch,) = list(held_out)
    (val,) = trainer.validate(module, held_out, verbose=False)
    (test,) = trainer.test(module, held_out, verbose=False)
    module.eval()
    evaluation = expected_evaluation(family, batch, module.student, teacher)
    for stage, result in (("val", val), ("test", test)):
        for key, value in evaluation.items():
            assert result[f"{stage}/{key}"] == pytest.approx(value, rel=REL, abs=1e-7), f"{stage}/{key}"

    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    loaded = DistillModule.load_from_checkpoint(path, student=hf.make_model(family, seed=123))
    assert_same_weights(loaded.student, module.student)
    assert (loaded.alpha, loaded.temperature, loaded.shift_labels) == (ALPHA, T, family == "gpt2")
    with pytest.raises(TypeError, match=r"student="):  # h: the network is not in the checkpoint
        DistillModule.load_from_checkpoint(path)

    exported = module.export_student()
    assert type(exported) is type(student)
    assert not exported.training
    inputs, _ = module.split_batch(batch)
    with torch.no_grad():
        torch.testing.assert_close(run_once(exported, family, batch), module.student_logits(inputs))


# ----------------------------------------------------------------------------------------------- c: teacher cache
def _fit_indexed(family: str, cache: TeacherCache | None) -> tuple[Recorder, nn.Module, nn.Module]:
    student, teacher = hf.pair(family)
    initial = copy.deepcopy(student).train()
    module = DistillModule(student=student, alpha=ALPHA, temperature=T, shift_labels=family == "gpt2")
    recorder = Recorder()
    trainer = make_trainer([DistillationCallback(teacher, cache=cache), recorder], max_epochs=2)
    data = DataLoader(IndexedDataset(hf.samples(family, 2 * hf.BATCH)), batch_size=hf.BATCH, shuffle=False)
    trainer.fit(module, data)
    return recorder, initial, teacher


@pytest.mark.parametrize("family", params(["bert_seq", "vit", "resnet"]))
def test_cached_teacher_gives_uncached_losses(family: str, tmp_path: Any) -> None:
    cache = TeacherCache(tmp_path / "cache")
    cached, initial, teacher = _fit_indexed(family, cache)
    uncached, _, _ = _fit_indexed(family, None)
    assert cache.teacher_runs == 2  # epoch 1 only (epoch 2 reads both batches)
    assert len(cached.steps) == len(uncached.steps) == 4
    for a, b in zip(cached.steps, uncached.steps, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3)  # the cache stores float16 logits
    # exactly: the first step's objective is the teacher's logits as the cache stores them (float16)
    batch = hf.batches(family, 1)[0]
    expected = expected_logit_terms(family, batch, initial, [teacher], teacher_dtype=torch.float16)
    assert cached.steps[0]["loss"] == pytest.approx(expected["loss"], rel=REL)


@pytest.mark.parametrize("family", params(["bert_tok", "gpt2", "t5", "bart"]))
def test_cache_refuses_token_level_logits(family: str, tmp_path: Any) -> None:
    with pytest.raises(ValueError, match=r"token-level \(B, L, V\) logits are not cached"):
        _fit_indexed(family, TeacherCache(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------- g: torch.compile
@pytest.mark.parametrize("family", params(["bert_seq", "resnet"]))
def test_compiled_student(family: str, tmp_path: Any) -> None:
    student, teacher = hf.pair(family)
    initial = copy.deepcopy(student).train()
    compiled = torch.compile(student, backend="eager")
    module = DistillModule(student=compiled, alpha=ALPHA, temperature=T)
    recorder = Recorder()
    trainer = make_trainer([DistillationCallback(teacher), recorder], limit_train_batches=1)
    trainer.fit(module, hf.loader(family, 1))
    batch = hf.batches(family, 1)[0]
    assert recorder.steps[0]["loss"] == pytest.approx(
        expected_logit_terms(family, batch, initial, [teacher])["loss"], rel=REL
    )

    exported = module.export_student()
    assert type(exported) is type(student)
    assert not isinstance(exported, torch._dynamo.eval_frame.OptimizedModule)
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    plain_keys = set(student.state_dict())
    assert set(state) == {f"student.{k}" for k in plain_keys}
    assert not any("_orig_mod" in k for k in state)
    plain = hf.make_model(family, seed=123)
    plain.load_state_dict({k.removeprefix("student."): v for k, v in state.items()}, strict=True)
    assert_same_weights(plain, student)
    loaded = DistillModule.load_from_checkpoint(path, student=hf.make_model(family, seed=321))
    assert_same_weights(loaded.student, student)


# ------------------------------------------------------------------------------- i: no untrained warning first
# case -> (family, shift_labels)
MISMATCH_CASES = {
    "bert_seq": ("bert_seq", False),
    "bert_tok": ("bert_tok", False),
    "gpt2_no_shift": ("gpt2", False),
    "gpt2_shift": ("gpt2", True),
    "t5": ("t5", False),
    "bart": ("bart", False),
    "vit": ("vit", False),
    "resnet": ("resnet", False),
}
_OUTPUTS = {
    "bert_seq": hf.SEQ_CLASSES,
    "bert_tok": hf.TOKEN_CLASSES,
    "gpt2": hf.VOCAB,
    "t5": hf.VOCAB,
    "bart": hf.VOCAB,
    "vit": hf.IMAGE_CLASSES,
    "resnet": hf.RESNET_CLASSES,
}


@pytest.mark.parametrize("case", params(list(MISMATCH_CASES), MISMATCH_CASES))
def test_no_untrained_warning_before_a_real_error(case: str) -> None:
    """A random teacher whose logits do not fit the student's: the shape error comes first, no blame on weights."""
    family, shift = MISMATCH_CASES[case]
    student = hf.make_model(family, "student", seed=0)
    teacher = hf.make_model(family, "teacher", seed=1, outputs=_OUTPUTS[family] + 8)
    module = DistillModule(student=student, alpha=ALPHA, temperature=T, shift_labels=shift)
    trainer = make_trainer([DistillationCallback(teacher)])
    # the message names both sizes ("class counts differ (3 vs 11)", "per-position class counts differ (40 vs 48)")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=rf"differ \({_OUTPUTS[family]} vs {_OUTPUTS[family] + 8}\b"):
            trainer.fit(module, hf.loader(family, 2))
    blamed = [str(w.message) for w in seen if re.search(r"untrained|teacher's top-1 accuracy", str(w.message))]
    assert not blamed
