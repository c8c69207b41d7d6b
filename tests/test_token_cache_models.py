"""A token cache end to end with third-party models built from configs (random weights, one process).

GPT-2 (causal LM, ``shift_labels=True``, on padded Markov sequences), T5 (encoder-decoder: decoder positions, the
decoder inputs built from the labels) and BERT token classification (a vocabulary of a few tags, ``top_k`` up to it):
the pre-pass stores exactly the positions the loss counts, and a fit from the cache (``CachedTeacher``, no teacher
alive) logs at its first step the top-k KD loss the teacher's own logits give on that batch, within the codec's error
bound (:mod:`lightning_distill.teacher._token_codec`).
"""

from __future__ import annotations

import functools
import gc
import warnings
import weakref
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_distill import CachedTeacher, DistillModule, IndexedDataset, TokenCache, TokenCachePass
from lightning_distill._batches import split_batch
from lightning_distill._positions import route_inputs
from lightning_distill.demos import MarkovDataset, MarkovLanguage
from lightning_distill.losses.functional.topk import topk_kd_loss, topk_log_probs
from lightning_distill.teacher._digest import input_digests
from lightning_distill.teacher._token_codec import encode_tokens, error_radius
from tests.helpers import hf

pytestmark = [
    pytest.mark.skipif(not hf.has_transformers(), reason="needs transformers"),
    pytest.mark.filterwarnings("ignore:predict returned None"),  # the pre-pass writes, it returns nothing
]

TEMPERATURE = 2.0
VOCAB = 64  # the Markov language's (GPT-2 family)


def _trainer(**kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
    }
    return L.Trainer(**{**defaults, **kwargs})


def _prepass(teacher: nn.Module, data: Any, path: Path, top_k: int, shift_labels: bool, batch_size: int) -> int:
    """Run the pre-pass; return the tokens written. Nothing of the pass (nor its Trainer) outlives the call."""
    pass_ = TokenCachePass(teacher, TokenCache(path, top_k=top_k), temperature=TEMPERATURE, shift_labels=shift_labels)
    _trainer().predict(pass_, dataloaders=DataLoader(data, batch_size=batch_size), return_predictions=False)
    return pass_.tokens_written


def _inputs(batch: Any, model: nn.Module) -> tuple[Any, Tensor]:
    inputs, target = split_batch(batch)
    return route_inputs(inputs, target, model), target


def _stored(path: Path, top_k: int, data: Any, model: nn.Module, shift_labels: bool) -> list[Tensor]:
    """Per sample, the bool mask ``(L,)`` of its stored positions, read back from the cache."""
    cache = TokenCache(path, top_k=top_k)
    cache.open_reader({"num_samples": len(data), "views": 1, "shift_labels": shift_labels, "ignore_index": -100})
    try:
        masks = []
        for batch in DataLoader(data, batch_size=len(data)):
            inputs, target = _inputs(batch, model)
            rows = cache.rows(batch, len(data), 1)
            topk = cache.load(rows, input_digests(inputs, len(rows)), torch.device("cpu"))
            length = target.shape[1]
            stored = torch.zeros(len(rows), length, dtype=torch.bool)
            stored[topk.positions[:, 0], topk.positions[:, 1]] = True
            assert len(topk.positions) == int(stored.sum())  # no position twice
            masks.extend(stored)
        return masks
    finally:
        cache.close()


def _online_and_bound(
    student: nn.Module, teacher: nn.Module, batch: Any, mask: Tensor, top_k: int, shift_labels: bool
) -> tuple[float, float]:
    """The top-k KD loss the teacher's own logits give on ``batch`` (counted positions ``mask``), and the codec's bound
    on how far a cached copy of the teacher may move it (module docstring of ``_token_codec``)."""
    inputs, _ = _inputs(batch, student)
    with torch.no_grad():
        s, t = hf.logits_of(student, inputs).float(), hf.logits_of(teacher, inputs).float()
    if shift_labels:
        s, t = s[:, :-1], t[:, :-1]
    values, indices, tail = topk_log_probs(t, top_k, TEMPERATURE)
    online = float(topk_kd_loss(s, values, indices, tail, TEMPERATURE, mask=mask))
    # the bound, per counted position, over the k classes and the tail bucket
    t, s = t[mask], s[mask]
    fields = encode_tokens(t, top_k, TEMPERATURE)  # what the pre-pass stored: its steps and tails
    delta, delta_tail = (torch.from_numpy(d) for d in error_radius(fields))
    log_p = torch.log_softmax(t.double() / TEMPERATURE, -1)
    log_s = torch.log_softmax(s.double() / TEMPERATURE, -1)
    top = log_p.topk(top_k, -1).indices
    p_top, s_top = log_p.gather(-1, top).exp(), log_s.gather(-1, top).exp()
    p_tail = (1 - p_top.sum(-1)).clamp(min=0)
    s_tail = (1 - s_top.sum(-1)).clamp(min=1e-300)
    p = torch.cat([p_top, p_tail[:, None]], -1)
    ratio = torch.cat([p_top / s_top, p_tail[:, None] / s_tail[:, None]], -1)
    d = torch.cat([delta[:, None].expand_as(p_top), delta_tail[:, None]], -1)
    zeta = torch.log((p * d.exp()).sum(-1, keepdim=True))
    log_ratio = torch.where(p > 0, ratio.clamp(min=1e-300).log().abs(), torch.zeros_like(p))
    per_position = (p * ((d + zeta).exp() - 1) * log_ratio).sum(-1) + (p * (d + zeta).exp() * (d + zeta)).sum(-1)
    return online, TEMPERATURE**2 * float(per_position.mean())


class FitRecorder(L.Callback):
    """Records the logged KD loss of every step, and checks at the first step that the teacher model is gone."""

    def __init__(self, teacher: weakref.ref[nn.Module]) -> None:
        self.teacher = teacher
        self.kd: list[tuple[int, float]] = []
        self.teacher_alive: bool | None = None
        self.connection: Any = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if self.teacher_alive is None:
            if self.teacher() is not None:
                gc.collect()  # only reference cycles may still hold it
            self.teacher_alive = self.teacher() is not None
            self.connection = pl_module._teacher
            assert pl_module.teacher_outputs is not None and pl_module.teacher_outputs.topk is not None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.kd.append((trainer.current_epoch, float(trainer.callback_metrics["train/kd_loss"])))


def _fit(
    student: nn.Module,
    data: Any,
    path: Path,
    top_k: int,
    shift_labels: bool,
    batch_size: int,
    epochs: int,
    teacher: weakref.ref[nn.Module],
    kd_chunk_size: int | None = None,
) -> FitRecorder:
    recorder = FitRecorder(teacher)
    module = DistillModule(
        student=student,
        alpha=0.5,
        temperature=TEMPERATURE,
        shift_labels=shift_labels,
        kd_chunk_size=kd_chunk_size,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
    )
    trainer = _trainer(max_epochs=epochs, callbacks=[CachedTeacher(TokenCache(path, top_k=top_k)), recorder])
    trainer.fit(module, DataLoader(data, batch_size=batch_size, shuffle=False))
    assert trainer.state.finished
    assert recorder.teacher_alive is False  # the fit ran with no teacher model anywhere in the process
    assert recorder.connection is not None and recorder.connection.owner == "CachedTeacher"
    with pytest.raises(RuntimeError, match="no teacher to run"):
        recorder.connection.run(None)
    return recorder


def _first_step_matches_online(
    recorder: FitRecorder, online_and_bound: tuple[float, float], slack: float = 1e-5
) -> None:
    online, bound = online_and_bound
    cached = recorder.kd[0][1]
    assert online > 1e-2  # far from uniform: the comparison means something
    assert bound < 0.1 * online  # the codec's bound says something here (it is loose: 20-80x the error seen)
    assert abs(cached - online) <= bound + slack, (cached, online, bound)
    assert abs(cached - online) <= 2e-3 * online, (cached, online)  # 8-bit codes: about 1e-4 to 7e-4 relative


def _teacher(family: str, outputs: int | None = None) -> nn.Module:
    return hf.make_model(family, "teacher", seed=1, outputs=outputs).eval()


# ----------------------------------------------------------------------------------------------------------- GPT-2
def _markov() -> IndexedDataset:
    language = MarkovLanguage(vocab_size=VOCAB, branching=4, seed=0)
    return IndexedDataset(MarkovDataset(language, 48, max_length=16, min_length=4, seed=1))


@pytest.mark.parametrize("kd_chunk_size", [None, 7], ids=["whole", "chunked"])
def test_gpt2_teacher_to_smaller_gpt2_from_the_cache_matches_the_online_topk_loss_and_learns(tmp_path, kd_chunk_size):
    train, top_k, batch_size = _markov(), 16, 16
    teacher = _teacher("gpt2", outputs=VOCAB)  # 2 layers x 32
    student = hf.make_model("gpt2", "student", seed=0, outputs=VOCAB)  # 1 layer x 16
    assert teacher.config.n_layer == 2 and student.config.n_layer == 1
    written = _prepass(teacher, train, tmp_path, top_k, shift_labels=True, batch_size=batch_size)

    # stored: position t where token t + 1 is real (and labelled); never the last one, never padding
    stored = _stored(tmp_path, top_k, train, student, shift_labels=True)
    for i, mask in enumerate(stored):
        sample = train.dataset[i]
        expected = torch.zeros_like(mask)
        expected[:-1] = sample["attention_mask"][1:].bool() & (sample["labels"][1:] != -100)
        assert torch.equal(mask, expected), i
    assert written == sum(int(m.sum()) for m in stored) == int((train.dataset.lengths - 1).sum())
    assert int(train.dataset.lengths.min()) < 16  # some samples are padded

    first = next(iter(DataLoader(train, batch_size=batch_size)))
    sample = first.sample
    mask = sample["attention_mask"][:, 1:].bool() & (sample["labels"][:, 1:] != -100)
    reference = _online_and_bound(student, teacher, first, mask, top_k, shift_labels=True)
    gone, teacher = weakref.ref(teacher), None

    recorder = _fit(student, train, tmp_path, top_k, True, batch_size, 4, gone, kd_chunk_size=kd_chunk_size)
    _first_step_matches_online(recorder, reference)
    per_epoch = [sum(v for e, v in recorder.kd if e == epoch) / 3 for epoch in range(4)]
    assert len(recorder.kd) == 12 and per_epoch[-1] < 0.8 * per_epoch[0], per_epoch


# ------------------------------------------------------------------------------------------------------------- T5
def test_t5_teacher_to_student_stores_the_labelled_decoder_positions_and_matches_the_online_loss(tmp_path):
    items = hf.samples("t5", n=16)
    train, top_k, batch_size = IndexedDataset(items), 16, 4
    teacher = _teacher("t5")
    student = hf.make_model("t5", "student", seed=0)
    written = _prepass(teacher, train, tmp_path, top_k, shift_labels=False, batch_size=batch_size)

    stored = _stored(tmp_path, top_k, train, student, shift_labels=False)
    for i, mask in enumerate(stored):  # decoder positions (length 6, the encoder's is 10) whose label is not -100
        assert mask.shape == (hf.DECODER_LEN,) and torch.equal(mask, items[i]["labels"] != -100), i
    assert written == sum(int((item["labels"] != -100).sum()) for item in items)
    assert any(bool((item["labels"] == -100).any()) for item in items)

    first = next(iter(DataLoader(train, batch_size=batch_size)))
    inputs, _ = _inputs(first, student)
    labels = first.sample["labels"]
    assert torch.equal(inputs["decoder_input_ids"], hf.decoder_inputs("t5", labels))  # built from the labels
    reference = _online_and_bound(student, teacher, first, labels != -100, top_k, shift_labels=False)
    gone, teacher = weakref.ref(teacher), None

    recorder = _fit(student, train, tmp_path, top_k, False, batch_size, 2, gone)
    _first_step_matches_online(recorder, reference)
    assert len(recorder.kd) == 8 and all(torch.isfinite(torch.tensor(v)) for _, v in recorder.kd)


# ------------------------------------------------------------------------------------------------- BERT token tags
@pytest.mark.parametrize("top_k", [3, hf.TOKEN_CLASSES], ids=["k-below-classes", "k-all-classes"])
def test_bert_token_classifier_stores_real_labelled_tokens_and_matches_the_online_loss(tmp_path, top_k):
    items = hf.samples("bert_tok", n=16)
    train, batch_size = IndexedDataset(items), 4
    teacher = _teacher("bert_tok")
    student = hf.make_model("bert_tok", "student", seed=0)
    written = _prepass(teacher, train, tmp_path, top_k, shift_labels=False, batch_size=batch_size)

    stored = _stored(tmp_path, top_k, train, student, shift_labels=False)
    for i, mask in enumerate(stored):  # odd samples carry labels on their padding: attention_mask drops them
        expected = items[i]["attention_mask"].bool() & (items[i]["labels"] != -100)
        assert torch.equal(mask, expected), i
    assert written == sum(int(m.sum()) for m in stored)
    assert any(bool(((item["attention_mask"] == 0) & (item["labels"] != -100)).any()) for item in items)

    first = next(iter(DataLoader(train, batch_size=batch_size)))
    sample = first.sample
    mask = sample["attention_mask"].bool() & (sample["labels"] != -100)
    reference = _online_and_bound(student, teacher, first, mask, top_k, shift_labels=False)
    gone, teacher = weakref.ref(teacher), None

    recorder = _fit(student, train, tmp_path, top_k, False, batch_size, 2, gone)
    _first_step_matches_online(recorder, reference)


def test_bert_token_classifier_refuses_top_k_above_its_classes(tmp_path):
    train = IndexedDataset(hf.samples("bert_tok", n=8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"top_k=8\)` keeps more classes than the teacher's vocabulary \(5\)"):
            _prepass(_teacher("bert_tok"), train, tmp_path, 8, shift_labels=False, batch_size=4)
    assert not any(tmp_path.glob("shard-*/tokens*"))  # nothing was stored
