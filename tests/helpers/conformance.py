"""Shared pieces of the conformance matrix (``tests/test_conformance*.py``): settings, cases, hand-written rules.

Every expected value is computed here with plain torch in float64 from the models' own outputs (a copy of the
student's initial weights, the teacher, hand-built decoder inputs and hand-written position rules), never with the
library's loss functions, masks or routing.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.helpers import hf

ALPHA = 0.7
T = 2.0
W = 0.5  # weight of every feature map
REL = 1e-5

needs_hf = pytest.mark.skipif(not hf.has_transformers(), reason="transformers is not installed")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models run ~20x faster on one thread than on two contended ones (and give the same values).

    Autouse in every module that imports it (``from tests.helpers.conformance import one_torch_thread``).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def params(names: Sequence[str], family_of: dict[str, Any] | None = None) -> list[Any]:
    """``pytest.param``s named by the case; Hugging Face cases skip without transformers."""
    out = []
    for name in names:
        family = name if family_of is None else family_of[name][0]
        out.append(pytest.param(name, id=name, marks=() if family == "resnet" else needs_hf))
    return out


def make_trainer(callbacks: list[L.Callback], **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "max_epochs": 1,
        "limit_train_batches": 2,
        "logger": False,
        "enable_progress_bar": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
    }
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


class Recorder(L.Callback):
    """Records each training step's returned loss and logged ``train/*`` values, and the trainable extras (projectors,
    exit heads) as they were before the step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.before: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        snapshot = {}
        for name in ("projectors", "heads"):
            if isinstance(getattr(pl_module, name, None), nn.Module):
                snapshot[name] = copy.deepcopy(getattr(pl_module, name))
        self.before.append(snapshot)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        row = {"loss": float(outputs["loss"])}
        row.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})
        self.steps.append(row)


# ------------------------------------------------------------------------------------------ hand-written rules
def counted_positions(family: str, batch: Any) -> Tensor:
    """Which positions of the (aligned) logits count, written from the families' semantics.

    Sequence-level logits: every sample (an ``attention_mask`` in the batch is about tokens, not samples). Token
    classification: real tokens with a label. Causal LM: position t counts when token t + 1 is real and labelled.
    Encoder-decoder: decoder positions with a label (and set in ``decoder_attention_mask`` when given); the
    encoder's ``attention_mask`` never applies.
    """
    target = hf.target_of(batch)
    if family in ("bert_seq", "vit", "resnet"):
        return torch.ones(target.shape[0], dtype=torch.bool)
    if family == "bert_tok":
        return batch["attention_mask"].bool() & (target != -100)
    if family == "gpt2":
        return (batch["attention_mask"].bool() & (target != -100))[:, 1:]
    counted = target != -100
    if "decoder_attention_mask" in batch:
        counted = counted & batch["decoder_attention_mask"].bool()
    return counted


def token_mask(family: str, batch: Any, side: str | None) -> Tensor | None:
    """Which positions of a token feature count: the encoder's real tokens, the decoder's real targets, or all."""
    if side is None:
        return None
    if side == "encoder":
        return batch["attention_mask"].bool()
    return counted_positions(family, batch)


def align(family: str, student: Tensor, teachers: list[Tensor], target: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
    """A causal LM's logits at t score token t + 1; other families are aligned as they are."""
    if family != "gpt2":
        return student, teachers, target
    return student[:, :-1], [t[:, :-1] for t in teachers], target[:, 1:]


def teacher_log_probs(teachers: list[Tensor], temperature: float) -> Tensor:
    """log softmax(z / T) of one teacher; of several, log of the equal mixture sum_k softmax(z_k / T) / K."""
    probs = torch.stack([F.softmax(t.double() / temperature, -1) for t in teachers]).mean(0)
    return probs.log()


def reference_terms(
    student: Tensor, log_pt: Tensor, target: Tensor, counted: Tensor, alpha: float = ALPHA, temperature: float = T
) -> dict[str, float]:
    """alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE, each averaged over the counted positions, in float64."""
    s = student.double()
    log_ps = F.log_softmax(s / temperature, -1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    log_p = F.log_softmax(s, -1)
    ce = -log_p.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    kd, task = temperature**2 * kl[counted].mean(), ce[counted].mean()
    return {"kd_loss": float(kd), "task_loss": float(task), "loss": float(alpha * kd + (1 - alpha) * task)}


@torch.no_grad()
def expected_logit_terms(
    family: str,
    batch: Any,
    student: nn.Module,
    teachers: list[nn.Module],
    teacher_dtype: torch.dtype | None = None,
    counted: Tensor | None = None,
) -> dict[str, float]:
    """The logit terms of one training step, from the models run on hand-built inputs (``counted``: another rule)."""
    inputs = hf.model_inputs(family, batch)
    s = hf.logits_of(student, inputs)
    ts = [hf.logits_of(t, inputs) for t in teachers]
    if teacher_dtype is not None:  # what a float16 cache stores
        ts = [t.to(teacher_dtype).float() for t in ts]
    s, ts, target = align(family, s, ts, hf.target_of(batch))
    counted = counted_positions(family, batch) if counted is None else counted
    return reference_terms(s, teacher_log_probs(ts, T), target, counted)


def wrong_rule(case: str, batch: Any) -> Tensor | None:
    """A plausible but wrong choice of positions for ``case`` (None where no other reading of the batch exists)."""
    target = hf.target_of(batch)
    if case == "bert_tok":  # the labels' -100 alone, padding with valid labels counted
        return target != -100
    if case == "gpt2":  # the mask of the unshifted positions
        return (batch["attention_mask"].bool() & (target != -100))[:, :-1]
    if case.endswith("equal_lengths"):  # the encoder's attention_mask read as the decoder's
        return batch["attention_mask"].bool() & (target != -100)
    if case.endswith("decoder_mask"):  # decoder_attention_mask ignored
        return target != -100
    return None


@torch.no_grad()
def expected_evaluation(family: str, batch: Any, student: nn.Module, teacher: nn.Module) -> dict[str, float]:
    """``loss`` (CE), ``acc``, ``teacher_acc``, ``agreement`` and ``kd_loss`` over the counted positions."""
    inputs = hf.model_inputs(family, batch)
    s, (t,), target = align(family, hf.logits_of(student, inputs), [hf.logits_of(teacher, inputs)], hf.target_of(batch))
    counted = counted_positions(family, batch)
    terms = reference_terms(s, F.log_softmax(t.double() / T, -1), target, counted)
    s_pred, t_pred = s.argmax(-1), t.argmax(-1)
    return {
        "loss": terms["task_loss"],
        "kd_loss": terms["kd_loss"],
        "acc": float((s_pred == target)[counted].double().mean()),
        "teacher_acc": float((t_pred == target)[counted].double().mean()),
        "agreement": float((s_pred == t_pred)[counted].double().mean()),
    }


@contextlib.contextmanager
def captured(model: nn.Module, layers: dict[str, tuple[str, int | None]]) -> Iterator[dict[str, Tensor]]:
    """Our own forward hooks: a copy of each named layer's output (part ``select`` of a tuple) as it was returned."""
    found: dict[str, Tensor] = {}
    handles = []
    for key, (name, select) in layers.items():

        def hook(module: nn.Module, args: Any, output: Any, key: str = key, select: int | None = select) -> None:
            found[key] = (output if select is None else output[select]).detach().clone()

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def masked_mse(student: Tensor, teacher: Tensor, mask: Tensor | None) -> float:
    """Mean of (s - t)^2 over every element of the counted positions (all positions without a mask)."""
    diff = (student.double() - teacher.double()) ** 2
    return float(diff.mean() if mask is None else diff[mask].mean())


def run_once(model: nn.Module, family: str, batch: Any) -> Tensor:
    with torch.no_grad():
        return hf.logits_of(model, hf.model_inputs(family, batch))


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)
