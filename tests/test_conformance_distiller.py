"""Conformance matrix, your own loop: the ``Distiller`` in a plain PyTorch loop (d). The matrix itself:
``tests/test_conformance.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_distill import Distiller, DistillModule
from tests.helpers import hf
from tests.helpers.conformance import (
    ALPHA,
    REL,
    T,
    expected_logit_terms,
    one_torch_thread,  # noqa: F401  (an autouse fixture)
    params,
)


# --------------------------------------------------------------------------------------------------- d: Distiller
@pytest.mark.parametrize("family", params(hf.FAMILIES))
def test_distiller_in_a_plain_loop(family: str) -> None:
    student, teacher = hf.pair(family)
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    teacher.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args, dict(kwargs))), with_kwargs=True)
    distiller = Distiller(teacher, alpha=ALPHA, temperature=T, shift_labels=family == "gpt2")
    distiller.on_train_begin(student)
    batch = hf.batches(family, 1)[0]

    inputs, target = distiller.split_batch(batch)
    module_inputs, module_target = DistillModule(student=student).split_batch(batch)
    torch.testing.assert_close(target, module_target)
    if isinstance(batch, dict):
        assert inputs.keys() == module_inputs.keys() == hf.model_inputs(family, batch).keys()
        for key, value in hf.model_inputs(family, batch).items():  # decoder inputs built from the labels (T5, BART)
            torch.testing.assert_close(inputs[key], value, msg=key)
            torch.testing.assert_close(module_inputs[key], value, msg=key)
    else:
        torch.testing.assert_close(inputs, module_inputs)

    expected = expected_logit_terms(family, batch, student.train(), [teacher])
    output = student(**inputs) if isinstance(inputs, dict) else student(inputs)
    loss = distiller.loss(inputs, output, target)
    assert float(loss.detach()) == pytest.approx(expected["loss"], rel=REL)
    for key in ("kd_loss", "task_loss"):
        assert float(distiller.last_terms[key]) == pytest.approx(expected[key], rel=REL), key
    loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher.parameters())

    if isinstance(batch, dict):  # a whole dict batch: its labels are the target, and never reach the teacher
        assert float(distiller.loss(batch, output).detach()) == pytest.approx(expected["loss"], rel=REL)
    assert calls, "the teacher never ran"
    for args, kwargs in calls:
        assert "labels" not in kwargs
        if isinstance(batch, dict):
            assert not args
            assert kwargs.keys() == hf.model_inputs(family, batch).keys()
    distiller.on_train_end()
