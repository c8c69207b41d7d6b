"""Conformance matrix: model family x capability, each cell checked against values written here by hand.

Families (tiny models, random weights from configs, ``tests/helpers/hf.py``): BERT sequence classification, BERT
token classification, GPT-2 causal LM, T5 and BART encoder-decoders, ViT image classification, and the
torchvision-style ResNet of ``tests/helpers/resnet.py``. Capabilities (``CAPABILITIES``): logit KD through the
Trainer (with validate, test, checkpoint and export), feature maps on named layers, the teacher cache, the
``Distiller`` loop API, a mixture of two teachers, self-distillation, a ``torch.compile``-d student, loading a
checkpoint without ``student=``, and the untrained-teacher warning.

Every expected value is computed here with plain torch in float64 from the models' own outputs (a copy of the
student's initial weights, the teacher, hand-built decoder inputs and hand-written position rules), never with the
library's loss functions, masks or routing. ``MATRIX`` lists every cell with its status; ``test_matrix_is_honest``
checks that each "tested" cell names a test (and parameter) of this file.
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_distill import (
    DistillationCallback,
    Distiller,
    DistillModule,
    FeatureMap,
    SelfDistillModule,
    TeacherCache,
)
from lightning_distill.teacher import IndexedDataset
from tests.helpers import hf

ALPHA = 0.7
T = 2.0
W = 0.5  # weight of every feature map
REL = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")

needs_hf = pytest.mark.skipif(not hf.has_transformers(), reason="transformers is not installed")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Tiny models run ~20x faster on one thread than on two contended ones (and give the same values)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def test_matrix_is_honest() -> None:
    """Every family x capability has a row; every "tested" or "refused" row names a test and parameter here."""
    cells = {(row["family"], row["capability"]) for row in MATRIX}
    assert cells == {(f, c) for f in hf.FAMILIES for c in CAPABILITIES}
    for row in MATRIX:
        status = row["status"]
        assert status == "tested" or re.fullmatch(r"(refused|n/a) \(.+\)", status), row
        if status.startswith("n/a"):
            continue
        name, _, param = row["test"].partition("[")
        function = globals().get(name)
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


# ----------------------------------------------------------------------------------------------------- cases
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
    trainer = make_trainer([DistillationCallback(teachers={"a": teacher_a, "b": teacher_b}), recorder])
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


# --------------------------------------------------------------------------------------------- f: self-distillation
# family -> (exits, classifier layer, number of classes)
SELF_DISTILL: dict[str, tuple[list[str], str, int]] = {
    "resnet": (["layer1"], "fc", hf.RESNET_CLASSES),
    "vit": (["vit.layers.0"], "classifier", hf.IMAGE_CLASSES),
}


@pytest.mark.parametrize("family", params(list(SELF_DISTILL)))
def test_self_distillation(family: str) -> None:
    exits, classifier, classes = SELF_DISTILL[family]
    backbone = hf.make_model(family, "teacher", seed=0)
    initial = copy.deepcopy(backbone).train()
    temperature, alpha, feature_weight = 3.0, 0.3, 0.03
    module = SelfDistillModule(
        backbone, exits=exits, num_classes=classes, temperature=temperature, alpha=alpha, feature_weight=feature_weight
    )
    recorder = Recorder()
    trainer = make_trainer([recorder])
    trainer.fit(module, hf.loader(family, 2))

    batch = hf.batches(family, 1)[0]
    inputs, y = hf.inputs_of(batch), hf.target_of(batch)
    deepest_feature: list[Tensor] = []
    handle = initial.get_submodule(classifier).register_forward_pre_hook(
        lambda m, args: deepest_feature.append(args[0].detach().clone())
    )
    with captured(initial, {name: (name, None) for name in exits}) as exit_feats, torch.no_grad():
        deepest = hf.logits_of(initial, inputs).double()
    handle.remove()
    heads = recorder.before[0]["heads"]
    if family == "vit":  # a transformer block's (B, L, D) output is read as tokens, not as L channels
        head, feature = heads[0], exit_feats[exits[0]]
        assert head.tokens and head.project.in_features == feature.shape[-1]
        with torch.no_grad():
            by_hand = head.classifier(torch.relu(head.project(feature.mean(1))))
        torch.testing.assert_close(head(feature)[1], by_hand)
    log_pk = F.log_softmax(deepest / temperature, -1)
    expected = float(F.cross_entropy(deepest, y))
    for head, name in zip(heads, exits, strict=True):
        with torch.no_grad():
            hint, logits = head(exit_feats[name])
        logits = logits.double()
        kl = (log_pk.exp() * (log_pk - F.log_softmax(logits / temperature, -1))).sum(-1).mean()
        ce = F.cross_entropy(logits, y)
        hint_loss = masked_mse(hint, deepest_feature[0], None)
        expected += float(alpha * temperature**2 * kl + (1 - alpha) * ce) + feature_weight * hint_loss
    assert recorder.steps[0]["loss"] == pytest.approx(expected, rel=REL)

    # early exit: threshold 0 stops everyone at exit 0, above 1 nobody; in between, per sample
    module.eval()
    with torch.no_grad(), captured(module.backbone, {n: (n, None) for n in exits}) as now:
        full = hf.logits_of(module.backbone, inputs)
        first = module.heads[0](now[exits[0]])[1]
    preds, where = module.predict_early_exit(inputs, threshold=0.0)
    assert where.tolist() == [0] * len(y) and torch.equal(preds, first.argmax(-1))
    preds, where = module.predict_early_exit(inputs, threshold=1.01)
    assert where.tolist() == [len(exits)] * len(y) and torch.equal(preds, full.argmax(-1))
    confidence = first.softmax(-1).max(-1).values
    threshold = float(confidence.median())
    stops = confidence >= threshold
    assert 0 < int(stops.sum()) < len(y)
    preds, where = module.predict_early_exit(inputs, threshold=threshold)
    assert torch.equal(where, torch.where(stops, 0, len(exits)))
    assert torch.equal(preds, torch.where(stops, first.argmax(-1), full.argmax(-1)))


@pytest.mark.parametrize("family", params(["bert_tok", "gpt2", "t5", "bart"]))
def test_self_distillation_refuses_per_token_and_encoder_decoder_backbones(family: str) -> None:
    backbone = hf.make_model(family, "teacher", seed=0)
    exits = {"bert_tok": "bert.encoder.layer.0", "gpt2": "transformer.h.0"}
    if family in hf.ENCODER_DECODER:
        with pytest.raises(ValueError, match=r"does not support encoder-decoder backbones"):
            SelfDistillModule(backbone, exits=["encoder"], num_classes=hf.VOCAB)
        return
    module = SelfDistillModule(backbone, exits=[exits[family]], num_classes=hf.VOCAB)
    with pytest.raises(ValueError, match=r"one prediction per sample, but the backbone returns logits of shape"):
        module.build_heads(hf.inputs_of(hf.batches(family, 1)[0]))


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
