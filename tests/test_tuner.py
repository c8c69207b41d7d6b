"""Lightning's Tuner and its callbacks with a DistillationCallback: the teacher really runs during the search.

The searches swap ``trainer.callbacks`` for their own, so no hook of the DistillationCallback runs in them; the module
then runs the teacher itself through the connection the callback gave it at ``setup``. Each test counts the
teacher's forwards and the training steps while no DistillationCallback is among the Trainer's callbacks (the
search), and checks the loss the search optimized against one composed here, independently.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder
from lightning.pytorch.tuner import Tuner
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill import DistillationCallback, DistillModule
from tests.helpers.tiny import TinyTeacher, make_data, tiny_student

ALPHA, TEMPERATURE = 0.8, 2.0
TRAIN_BATCHES = 16
TEACHER_SEED = 1


def searching(trainer: L.Trainer) -> bool:
    """Whether a search runs now: it has replaced the Trainer's callbacks, so no DistillationCallback is there."""
    return not any(isinstance(c, DistillationCallback) for c in trainer.callbacks)


class TunedModule(DistillModule):
    """A DistillModule with what the Tuner tunes (``lr``, ``batch_size``), recording every training step's terms."""

    def __init__(self, batch_size: int = 8, lr: float = 0.01) -> None:
        torch.manual_seed(0)
        super().__init__(student=tiny_student(), alpha=ALPHA, temperature=TEMPERATURE)
        self.batch_size = batch_size
        self.lr = lr
        self.steps: list[tuple[bool, dict[str, torch.Tensor]]] = []  # (during a search, loss terms) per step
        self.first_batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.first_batch is None:
            self.first_batch = (batch[0].clone(), batch[1].clone())
        return super().training_step(batch, batch_idx)

    def compute_loss(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        terms = super().compute_loss(*args, **kwargs)
        if self.training:
            self.steps.append((searching(self.trainer), {k: v.detach() for k, v in terms.items()}))
        return terms

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*make_data(512)), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:  # the batch size search validates each trial, whatever the Trainer says
        return DataLoader(TensorDataset(*make_data(32, seed=1)), batch_size=8)


class CountingTeacher(TinyTeacher):
    """Counts its forwards, split into those during a search and the others."""

    def __init__(self) -> None:
        torch.manual_seed(TEACHER_SEED)
        super().__init__()
        self.trainer: L.Trainer | None = None
        self.forwards = {True: 0, False: 0}
        self.register_forward_hook(self._count)

    def _count(self, *_: Any) -> None:
        assert self.trainer is not None
        self.forwards[searching(self.trainer)] += 1


def expected_loss(x: torch.Tensor, y: torch.Tensor) -> float:
    """alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE of the initial student on one batch, written out here."""
    student = TunedModule().student
    torch.manual_seed(TEACHER_SEED)
    teacher = TinyTeacher()  # the same weights as the CountingTeacher, without its hook
    with torch.no_grad():
        s, t = student(x), teacher(x)
    log_p_t, log_p_s = torch.log_softmax(t / TEMPERATURE, -1), torch.log_softmax(s / TEMPERATURE, -1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean() * TEMPERATURE**2
    ce = -torch.log_softmax(s, -1).gather(1, y[:, None]).mean()
    return float(ALPHA * kl + (1 - ALPHA) * ce)


def setup_run(tmp_path: Any, *callbacks: L.Callback) -> tuple[L.Trainer, TunedModule, CountingTeacher]:
    teacher = CountingTeacher()
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=TRAIN_BATCHES,
        limit_val_batches=0,
        log_every_n_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[*callbacks, DistillationCallback(teacher)],
    )
    teacher.trainer = trainer
    return trainer, TunedModule(), teacher


def check_search(module: TunedModule, teacher: CountingTeacher, steps: int) -> None:
    """The search ran ``steps`` training steps, each with one teacher forward and a loss with the KD term.

    Its first step saw the initial weights: its loss is composed here from the batch it trained on.
    """
    searched = [terms for during, terms in module.steps if during]
    assert len(searched) == steps > 0
    assert teacher.forwards[True] == steps
    for terms in searched:
        assert terms["kd_loss"] > 0
        torch.testing.assert_close(terms["loss"], ALPHA * terms["kd_loss"] + (1 - ALPHA) * terms["task_loss"])
    assert module.first_batch is not None and module.steps[0][0]  # the first step of all was the search's
    assert float(searched[0]["loss"]) == pytest.approx(expected_loss(*module.first_batch), rel=1e-5)


def test_tuner_lr_find_runs_the_teacher_in_every_search_step(tmp_path):
    trainer, module, teacher = setup_run(tmp_path)
    finder = Tuner(trainer).lr_find(module, num_training=TRAIN_BATCHES, early_stop_threshold=None)
    assert finder is not None and len(finder.results["lr"]) == TRAIN_BATCHES
    check_search(module, teacher, TRAIN_BATCHES)
    assert teacher.forwards[False] == 0  # the Tuner's fit stops after the search
    assert module.lr == finder.suggestion()
    assert module.teacher_outputs is None


def test_tuner_scale_batch_size_runs_the_teacher_in_every_trial_step(tmp_path):
    trainer, module, teacher = setup_run(tmp_path)
    size = Tuner(trainer).scale_batch_size(module, mode="power", max_trials=2, steps_per_trial=3, init_val=2)
    assert size == module.batch_size == 4  # 2 succeeded, then 4, the last trial
    check_search(module, teacher, 2 * 3)


def test_learning_rate_finder_callback_then_training_with_the_callback(tmp_path):
    finder = LearningRateFinder(num_training_steps=TRAIN_BATCHES, early_stop_threshold=None)
    trainer, module, teacher = setup_run(tmp_path, finder)
    trainer.fit(module)
    check_search(module, teacher, TRAIN_BATCHES)
    trained = [terms for during, terms in module.steps if not during]
    assert len(trained) == teacher.forwards[False] == TRAIN_BATCHES  # afterwards the callback runs the teacher
    assert torch.isfinite(trainer.callback_metrics["train/kd_loss"])


def test_batch_size_finder_callback_then_training_with_the_callback(tmp_path):
    finder = BatchSizeFinder(mode="power", steps_per_trial=3, init_val=2, max_trials=2)
    trainer, module, teacher = setup_run(tmp_path, finder)
    trainer.fit(module)
    check_search(module, teacher, 2 * 3)
    assert module.batch_size == finder.optimal_batch_size == 4
    trained = [terms for during, terms in module.steps if not during]
    assert len(trained) == teacher.forwards[False] == TRAIN_BATCHES
