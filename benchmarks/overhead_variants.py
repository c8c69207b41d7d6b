"""The variants that ``overhead.py`` times: the models, the hand-written modules and one fit function per variant.

See ``overhead.py``'s docstring for what each variant is and how they are measured.
"""

from __future__ import annotations

import functools
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import torch
import torch.nn.functional as F
from common import RunTimes, StepClock, benchmark_trainer
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_distill import DistillationCallback, DistillModule, FeatureMap, TeacherCache
from lightning_distill.demos import MLPStudent, MNIST1DDataModule, MNIST1DTeacher
from lightning_distill.teacher import Indexed, IndexedDataset

Variant = Literal[
    "plain", "lightning", "plugin", "alone", "cached", "hand_cached", "fm0", "fm1", "hand_fm0", "hand_fm1"
]
VARIANTS: tuple[Variant, ...] = get_args(Variant)
GROUPS: dict[str, tuple[Variant, ...]] = {
    "a": ("plain", "lightning", "plugin"),
    "b": ("alone", "cached", "hand_cached"),
    "c": ("fm0", "fm1", "hand_fm0", "hand_fm1"),
}
LABELS: dict[Variant, str] = {
    "plain": "plain PyTorch loop (inline KD)",
    "lightning": "hand-written LightningModule (inline KD)",
    "plugin": "DistillModule + DistillationCallback",
    "alone": "student alone (plain LightningModule, CE)",
    "cached": "plugin, full TeacherCache (epochs >= 2 read it)",
    "hand_cached": "hand-written LightningModule, teacher logits precomputed (float16 table)",
    "fm0": "CNN student: plugin, logit KD",
    "fm1": "CNN student: plugin, logit KD + 1 feature map",
    "hand_fm0": "CNN student: hand-written, logit KD",
    "hand_fm1": "CNN student: hand-written, logit KD + 1 feature map",
}
MEMORY_VARIANTS: tuple[Variant, ...] = GROUPS["a"]
ALPHA = 0.9
TEMPERATURE = 4.0
LR = 1e-2
FM_WEIGHT = 0.1
FM_LAYER = "features.act1"


@dataclass(frozen=True)
class Config:
    """Everything that defines one benchmark run."""

    rounds: int
    epochs: int
    threads: int
    batch_size: int
    limit_batches: int | None
    seed: int
    data_seed: int
    clock: Literal["wall", "thread"] = "wall"
    logger: Literal["csv", "none"] = "csv"
    log_every_n_steps: int = 50

    @property
    def timer(self) -> Callable[[], float]:
        """``time.perf_counter`` (wall time) or ``time.thread_time`` (CPU time of the main thread)."""
        return time.thread_time if self.clock == "thread" else time.perf_counter

    def cli_args(self) -> list[str]:
        """The command-line arguments that reproduce this configuration (for the memory subprocesses)."""
        args = ["--epochs", str(self.epochs), "--threads", str(self.threads), "--batch-size", str(self.batch_size)]
        args += ["--seed", str(self.seed), "--data-seed", str(self.data_seed), "--logger", self.logger]
        args += ["--log-every-n-steps", str(self.log_every_n_steps)]
        if self.limit_batches is not None:
            args += ["--limit-batches", str(self.limit_batches)]
        return args


# ------------------------------------------------------------------------------------------------------ shared pieces
def inline_kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float, temperature: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Hinton KD written directly with ``torch.nn.functional``: ``(loss, task_loss, kd_loss)``."""
    kd = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature**2)
    ce = F.cross_entropy(student_logits, target)
    return alpha * kd + (1.0 - alpha) * ce, ce, kd


def make_dataset(data_seed: int) -> TensorDataset:
    """MNIST-1D's 4000 training samples as in-memory tensors."""
    datamodule = MNIST1DDataModule(data_seed=data_seed)
    datamodule.setup("fit")
    if datamodule.train_set is None:  # setup() always builds it; keeps type checkers honest
        raise RuntimeError("MNIST1DDataModule.setup did not build a training set.")
    return datamodule.train_set


def make_loader(dataset: Dataset[Any], config: Config) -> DataLoader[Any]:
    """The one loader construction every variant uses: shuffled with a fixed generator, no workers."""
    generator = torch.Generator()
    generator.manual_seed(config.seed)
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=generator, num_workers=0)


def make_student(seed: int, cnn: bool = False) -> nn.Module:
    """The MLP student (or the 8-channel CNN of group (c)), with the same initial weights for a given seed."""
    torch.manual_seed(seed)
    return MNIST1DTeacher(channels=8) if cnn else MLPStudent(input_dim=40, hidden=256, num_classes=10)


def make_teacher(seed: int) -> nn.Module:
    """The MNIST-1D CNN teacher, frozen and in eval mode (random weights: only its cost matters here)."""
    torch.manual_seed(seed + 1)
    return MNIST1DTeacher(channels=32, num_classes=10, input_length=40).requires_grad_(False).eval()


@contextmanager
def make_trainer(config: Config, callbacks: list[L.Callback]) -> Iterator[L.Trainer]:
    """The Trainer every Lightning variant uses (its CSV logs in a temporary folder, removed afterwards)."""
    limit = config.limit_batches if config.limit_batches is not None else 1.0
    with tempfile.TemporaryDirectory() as logs:
        logger = CSVLogger(logs, name="overhead") if config.logger == "csv" else False
        yield benchmark_trainer(
            config.epochs,
            callbacks,
            limit_train_batches=limit,
            logger=logger,
            log_every_n_steps=config.log_every_n_steps,
        )


def adam(parameters: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(parameters, lr=LR)


# ------------------------------------------------------------------------------------------ the hand-written modules
def logged_kd_step(module: L.LightningModule, student_logits: Tensor, teacher_logits: Tensor, y: Tensor) -> Tensor:
    """The inline KD loss, its three terms logged with ``self.log_dict`` every step, as one writes it by hand."""
    loss, task_loss, kd_loss = inline_kd_loss(student_logits, teacher_logits, y, ALPHA, TEMPERATURE)
    module.log_dict(
        {"train/loss": loss.detach(), "train/task_loss": task_loss.detach(), "train/kd_loss": kd_loss.detach()},
        batch_size=y.shape[0],
    )
    return loss


class HandWrittenKD(L.LightningModule):
    """The LightningModule one would write by hand: teacher as a frozen submodule, inline loss, three logged terms."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> HandWrittenKD:
        """Keep the teacher in eval mode whatever the Trainer asks of the module."""
        super().train(mode)
        self.teacher.eval()
        return self

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        return logged_kd_step(self, self.student(x), teacher_logits, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return adam(self.student.parameters())


class StudentAlone(L.LightningModule):
    """The plain LightningModule training the student alone: cross-entropy, ``train/loss`` logged every step."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.student(x), y)
        self.log("train/loss", loss.detach(), batch_size=x.shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return adam(self.student.parameters())


class HandWrittenFeatureKD(HandWrittenKD):
    """Logit KD plus one FitNets map written by hand: forward hooks on both models, a conv1x1 projector, MSE."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__(student, teacher)
        self.projector = nn.Conv1d(8, 32, kernel_size=1)
        self.captured: dict[str, Tensor] = {}
        for name, model in (("student", student), ("teacher", teacher)):
            model.get_submodule(FM_LAYER).register_forward_hook(functools.partial(self._keep, name))

    def _keep(self, name: str, module: nn.Module, inputs: Any, output: Tensor) -> None:
        self.captured[name] = output

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        loss, task_loss, kd_loss = inline_kd_loss(self.student(x), teacher_logits, y, ALPHA, TEMPERATURE)
        feature_loss = F.mse_loss(self.projector(self.captured.pop("student")), self.captured.pop("teacher"))
        loss = loss + FM_WEIGHT * feature_loss
        self.log_dict(
            {
                "train/loss": loss.detach(),
                "train/task_loss": task_loss.detach(),
                "train/kd_loss": kd_loss.detach(),
                f"train/feature_loss/{FM_LAYER}": feature_loss.detach(),
            },
            batch_size=x.shape[0],
        )
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return adam([*self.student.parameters(), *self.projector.parameters()])


class HandWrittenCachedKD(L.LightningModule):
    """KD from teacher logits computed once before the fit, as one would cache them by hand: a float16 table read by
    the batch's sample indices (``IndexedDataset`` items), the inline loss of (a), the same three terms logged."""

    def __init__(self, student: nn.Module, logits: Tensor) -> None:
        super().__init__()
        self.student = student
        self.logits = logits  # (num_samples, C) float16, not a parameter or buffer: nothing to save or move

    def training_step(self, batch: Indexed, batch_idx: int) -> Tensor:
        x, y = batch.sample
        teacher_logits = self.logits[batch.index].float()
        return logged_kd_step(self, self.student(x), teacher_logits, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return adam(self.student.parameters())


def plugin_module(student: nn.Module, maps: Sequence[FeatureMap] = ()) -> DistillModule:
    return DistillModule(student=student, alpha=ALPHA, temperature=TEMPERATURE, feature_maps=maps, optimizer=adam)


def fit_with_timers(
    module: L.LightningModule, extra: list[L.Callback], dataset: Dataset[Any], config: Config
) -> RunTimes:
    """Fit ``module`` with the timing callbacks around ``extra`` callbacks and return the times."""
    clock = StepClock(config.timer)
    timed = clock.around(extra)
    with make_trainer(config, timed) as trainer:
        trainer.fit(module, train_dataloaders=make_loader(dataset, config))
    return clock.checked(trainer, timed, config.threads)


# --------------------------------------------------------------------------------------------------------- variants
def fit_plain(teacher: nn.Module, dataset: TensorDataset, config: Config) -> RunTimes:
    """Train with a plain PyTorch loop and inline KD; time every step and epoch."""
    student = make_student(config.seed).train()
    optimizer = adam(student.parameters())
    loader = make_loader(dataset, config)
    times = RunTimes()
    clock = config.timer
    for _ in range(config.epochs):
        steps: list[float] = []
        epoch_start = clock()
        for batch_idx, (x, y) in enumerate(loader):
            if config.limit_batches is not None and batch_idx >= config.limit_batches:
                break
            start = clock()
            with torch.no_grad():
                teacher_logits = teacher(x)
            loss, _, _ = inline_kd_loss(student(x), teacher_logits, y, ALPHA, TEMPERATURE)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps.append(clock() - start)
        times.epochs.append(clock() - epoch_start)
        times.steps.append(steps)
    return times


def fit_cached(teacher: nn.Module, dataset: TensorDataset, config: Config) -> RunTimes:
    """The plugin with a fresh full-logits ``TeacherCache``: epoch 1 fills it, the later epochs read it."""
    with tempfile.TemporaryDirectory() as folder:
        cache = TeacherCache(Path(folder) / "cache")
        callback = DistillationCallback(teacher, cache=cache)
        times = fit_with_timers(plugin_module(make_student(config.seed)), [callback], IndexedDataset(dataset), config)
    if config.limit_batches is None and cache.teacher_runs > len(times.steps[0]):  # partial epochs: never full
        raise RuntimeError(f"The teacher ran {cache.teacher_runs} times: the cache was not read after epoch 1.")
    return times


def fit_hand_cached(teacher: nn.Module, dataset: TensorDataset, config: Config) -> RunTimes:
    """The hand-written cache: the teacher runs once over the whole data set before the fit (untimed)."""
    with torch.no_grad():
        logits = teacher(dataset.tensors[0]).half()
    module = HandWrittenCachedKD(make_student(config.seed), logits)
    return fit_with_timers(module, [], IndexedDataset(dataset), config)


def fit_feature(teacher: nn.Module, dataset: TensorDataset, config: Config, maps: int) -> RunTimes:
    """The plugin with the CNN student and logit KD, with ``maps`` (0 or 1) FitNets maps on ``features.act1``."""
    fmaps = [FeatureMap(student=FM_LAYER, teacher=FM_LAYER, loss="mse", weight=FM_WEIGHT)][:maps]
    module = plugin_module(make_student(config.seed, cnn=True), fmaps)
    return fit_with_timers(module, [DistillationCallback(teacher)], dataset, config)


FITS: dict[Variant, Callable[[nn.Module, TensorDataset, Config], RunTimes]] = {
    "plain": fit_plain,
    "lightning": lambda t, d, c: fit_with_timers(HandWrittenKD(make_student(c.seed), t), [], d, c),
    "plugin": lambda t, d, c: fit_with_timers(plugin_module(make_student(c.seed)), [DistillationCallback(t)], d, c),
    "alone": lambda t, d, c: fit_with_timers(StudentAlone(make_student(c.seed)), [], d, c),
    "cached": fit_cached,
    "hand_cached": fit_hand_cached,
    "fm0": functools.partial(fit_feature, maps=0),
    "fm1": functools.partial(fit_feature, maps=1),
    "hand_fm0": lambda t, d, c: fit_with_timers(HandWrittenKD(make_student(c.seed, cnn=True), t), [], d, c),
    "hand_fm1": lambda t, d, c: fit_with_timers(HandWrittenFeatureKD(make_student(c.seed, cnn=True), t), [], d, c),
}
