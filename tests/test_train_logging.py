"""Training terms are logged only on the steps someone reads, and what is read is what logging every step gives.

The oracle is an independent module that calls ``self.log_dict`` on every step, as a hand-written LightningModule
does; each test runs it and the module under test with the same Trainer settings and compares what the loggers, the
monitors and ``trainer.callback_metrics`` received.
"""

from __future__ import annotations

import functools
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint, Timer
from lightning.pytorch.loggers import Logger
from torch import Tensor

from lightning_distill import CachedTeacher, DistillationCallback, DistillModule, TokenCache
from lightning_distill._training import _callback_reads, train_logs_read
from lightning_distill.schedules import Cosine
from tests.helpers.tiny import TinyTeacher, make_loader, make_trainer, tiny_student

BATCHES = 5  # per epoch (20 samples, batch 4)
pytestmark = pytest.mark.filterwarnings("ignore:The number of training batches .* is smaller than the logging interval")


class MemoryLogger(Logger):
    """Every ``log_metrics`` call, in order: ``(step, metrics as floats)``."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, {k: float(v) for k, v in metrics.items()}))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


class EveryStep(DistillModule):
    """The oracle: the same terms and scheduled values, logged with ``self.log_dict`` on every step."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        terms = self.loss_terms(batch, self.teacher_outputs)
        size = batch[0].shape[0]
        self.log_dict({f"train/{name}": value.detach() for name, value in terms.items()}, batch_size=size)
        values = self.hparam_values()
        self.log_dict({f"train/{name}": values[name] for name in self.objective.scheduled}, batch_size=size)
        return terms["loss"]


def student(cls: type[DistillModule] = DistillModule, alpha: float = 0.0, **kwargs: Any) -> DistillModule:
    torch.manual_seed(0)
    return cls(
        student=tiny_student(),
        alpha=alpha,
        temperature=Cosine(4.0, 1.0, length=7, unit="step"),  # a scheduled value: `train/temperature`
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        **kwargs,
    )


def fit(module: DistillModule, tmp_path: Any, val: bool = False, **kwargs: Any) -> L.Trainer:
    settings: dict[str, Any] = dict(max_epochs=2, limit_train_batches=BATCHES, limit_val_batches=2 if val else 0)
    settings.update(kwargs)
    trainer = make_trainer(tmp_path, **settings)
    trainer.fit(module, make_loader(20, batch_size=4), make_loader(8, batch_size=4) if val else None)
    return trainer


def train_metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}


def count_logging_steps(module: DistillModule) -> list[int]:
    """Record the global step of every ``log_dict`` call the module makes (one entry per step that logs terms)."""
    steps: list[int] = []
    original = module.log_dict

    def log_dict(dictionary: Any, *args: Any, **kwargs: Any) -> None:
        if "train/loss" in dictionary:
            steps.append(module.trainer.global_step)
        original(dictionary, *args, **kwargs)

    module.log_dict = log_dict  # type: ignore[method-assign]
    return steps


@pytest.mark.parametrize(
    "settings",
    [
        dict(log_every_n_steps=3),
        dict(log_every_n_steps=1),
        dict(log_every_n_steps=7),  # longer than an epoch: writes straddle epochs
        dict(log_every_n_steps=50),  # never a multiple within the fit: nothing but epoch-end metrics
        dict(log_every_n_steps=2, accumulate_grad_batches=2),  # accumulating batches are never written
        dict(log_every_n_steps=3, max_steps=4),
        dict(log_every_n_steps=0),
    ],
    ids=["every-3", "every-1", "every-7", "every-50", "accumulate-2", "max-steps", "never"],
)
def test_the_logger_receives_what_logging_every_step_gives(tmp_path, settings):
    runs = {}
    for name, cls in (("oracle", EveryStep), ("skipping", DistillModule)):
        logger = MemoryLogger()
        module = student(cls)
        steps = count_logging_steps(module)
        trainer = fit(module, tmp_path / name, val=True, logger=logger, **settings)
        runs[name] = (logger.records, train_metrics(trainer), steps, trainer.global_step)
    (oracle, oracle_metrics, _, total), (got, metrics, logged_at, _) = runs["oracle"], runs["skipping"]
    assert got == oracle
    assert any("train/temperature" in m for _, m in oracle) or settings["log_every_n_steps"] in (0, 50)
    assert metrics == oracle_metrics  # the last step's terms, as logging every step leaves them
    assert len(logged_at) < total or settings["log_every_n_steps"] == 1


def test_only_written_steps_and_the_last_batch_of_each_epoch_log(tmp_path):
    module = student()
    steps = count_logging_steps(module)
    fit(module, tmp_path, logger=MemoryLogger(), log_every_n_steps=3)
    # written after optimizer steps 3, 6, 9 (global_step 2, 5, 8 while logging); the last batches are steps 5, 10
    assert steps == [2, 4, 5, 8, 9]


def test_without_a_logger_only_the_last_batch_of_each_epoch_logs(tmp_path):
    module = student()
    steps = count_logging_steps(module)
    oracle = fit(student(EveryStep), tmp_path / "oracle", logger=False)
    trainer = fit(module, tmp_path / "skip", logger=False)
    assert steps == [BATCHES - 1, 2 * BATCHES - 1]
    assert train_metrics(trainer) == train_metrics(oracle) and "train/temperature" in train_metrics(trainer)


def test_a_checkpoint_monitoring_a_train_key_sees_every_step(tmp_path):
    """ModelCheckpoint(monitor="train/loss") every step: each saved score is that step's loss."""
    oracle_logger = MemoryLogger()
    fit(student(EveryStep), tmp_path / "oracle", logger=oracle_logger, log_every_n_steps=1)
    losses = {step: m["train/loss"] for step, m in oracle_logger.records if "train/loss" in m}
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="train/loss", every_n_train_steps=1, save_top_k=-1, filename="{step}"
    )
    module = student()
    steps = count_logging_steps(module)
    fit(module, tmp_path / "skip", logger=False, callbacks=[checkpoint], enable_checkpointing=True)
    scores = {int(path.rsplit("step=", 1)[1].split(".")[0]): float(s) for path, s in checkpoint.best_k_models.items()}
    assert scores == {step + 1: loss for step, loss in losses.items()}  # ModelCheckpoint names the step after it
    assert len(steps) == 2 * BATCHES


def test_callback_metrics_hold_the_last_step_when_a_logger_writes_it(tmp_path):
    logger = MemoryLogger()
    trainer = fit(student(), tmp_path, logger=logger, log_every_n_steps=BATCHES)  # 5 and 10: the last step
    last_step, last = [(step, m) for step, m in logger.records if "train/loss" in m][-1]
    assert last_step == 2 * BATCHES - 1
    assert train_metrics(trainer) == {k: v for k, v in last.items() if k.startswith("train/")}


def test_should_stop_makes_every_later_step_written(tmp_path):
    """EarlyStopping stops after the first validation but min_epochs keeps training: Lightning writes every step."""
    runs = []
    for cls in (EveryStep, DistillModule):
        logger = MemoryLogger()
        stop = EarlyStopping(monitor="val/loss", stopping_threshold=1e9)  # satisfied at once: sets should_stop
        fit(student(cls), tmp_path, val=True, logger=logger, log_every_n_steps=50, min_epochs=3, max_epochs=3,
            callbacks=[stop])  # fmt: skip
        runs.append(logger.records)
    assert runs[1] == runs[0]
    assert sum("train/loss" in m for _, m in runs[0]) >= BATCHES  # the later epochs' steps were written


class Reader(Callback):
    """A callback this package does not know: it might read `trainer.callback_metrics` after any step."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.seen.append(float(trainer.callback_metrics["train/loss"]))


class OwnHook(DistillModule):
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.seen = float(self.trainer.callback_metrics["train/loss"])


def test_an_unknown_callback_or_hook_of_your_own_sees_every_step(tmp_path):
    oracle_reader, reader = Reader(), Reader()
    fit(student(EveryStep), tmp_path / "oracle", callbacks=[oracle_reader])
    module = student()
    steps = count_logging_steps(module)
    fit(module, tmp_path / "skip", callbacks=[reader])
    assert reader.seen == oracle_reader.seen and len(steps) == 2 * BATCHES
    own = student(OwnHook)
    steps = count_logging_steps(own)
    fit(own, tmp_path / "own")
    assert len(steps) == 2 * BATCHES


def monitored(tmp_path: Any, callbacks: list[Callback], **trainer_kwargs: Any) -> int:
    """How many of the fit's steps logged the training terms (a logger that writes no step of this fit)."""
    module = student()
    steps = count_logging_steps(module)
    checkpointing = any(isinstance(callback, ModelCheckpoint) for callback in callbacks)
    fit(module, tmp_path, val=True, logger=MemoryLogger(), log_every_n_steps=50, callbacks=callbacks,
        enable_checkpointing=checkpointing, **trainer_kwargs)  # fmt: skip
    return len(steps)


class Quiet(Callback):
    """A callback of yours that says it never reads `train/` metrics."""

    reads_train_metrics = False

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        pass


def test_which_callbacks_force_logging(tmp_path):
    last_batches = 2
    quiet = [LearningRateMonitor(), ModelCheckpoint(dirpath=tmp_path / "a", monitor="val/loss"), Quiet()]
    assert monitored(tmp_path / "quiet", quiet) == last_batches
    assert monitored(tmp_path / "early", [EarlyStopping(monitor="train/loss", patience=100)]) == 2 * BATCHES
    named = ModelCheckpoint(dirpath=tmp_path / "b", filename="{epoch}-{train/loss:.3f}")
    assert monitored(tmp_path / "named", [named]) == 2 * BATCHES
    assert monitored(tmp_path / "timer", [Timer(duration="00:01:00:00")]) == 2 * BATCHES
    # EarlyStopping on a validation key: quiet while validation runs at epoch ends only, which are logged anyway;
    # with validation within epochs it may end the fit after any step, which must then hold that step's values
    assert monitored(tmp_path / "stop", [EarlyStopping(monitor="val/loss", patience=100)]) == last_batches
    stop = EarlyStopping(monitor="val/loss", patience=100)
    assert monitored(tmp_path / "stop-within", [stop], val_check_interval=2) == 2 * BATCHES


def test_a_fit_stopped_after_a_validation_within_an_epoch_ends_with_that_steps_values(tmp_path):
    metrics = []
    for cls in (EveryStep, DistillModule):
        stop = EarlyStopping(monitor="val/loss", stopping_threshold=1e9)  # stops after the first validation
        trainer = fit(student(cls), tmp_path, val=True, val_check_interval=2, callbacks=[stop])
        assert trainer.global_step == 2
        metrics.append(train_metrics(trainer))
    assert metrics[1] == metrics[0]


def test_the_teacher_callback_reads_no_metrics(tmp_path):
    module = student(alpha=0.5)
    steps = count_logging_steps(module)
    fit(module, tmp_path, callbacks=[DistillationCallback(TinyTeacher())])
    assert len(steps) == 2


def test_the_token_cache_reader_reads_no_metrics(tmp_path):
    # CachedTeacher stands in for DistillationCallback: it must not make the module log its terms every step
    assert not _callback_reads(CachedTeacher(TokenCache(tmp_path / "cache")), validates_mid_epoch=True)


def test_a_plateau_scheduler_on_a_train_key_sees_every_step(tmp_path):
    module = student()

    def configure_optimizers() -> Any:
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "train/loss"}}

    module.configure_optimizers = configure_optimizers  # type: ignore[method-assign]
    steps = count_logging_steps(module)
    fit(module, tmp_path)
    assert len(steps) == 2 * BATCHES


def test_outside_a_fit_everything_is_logged():
    module = student()
    assert train_logs_read(module)
