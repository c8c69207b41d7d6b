"""DistillModule: the student's LightningModule; owns the loss, its composition and the logging of every term."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_distill.losses.functional import Divergence, cross_entropy, kd_loss
from lightning_distill.losses.kd import DistillationLoss
from lightning_distill.outputs import call_with_inputs, extract_logits
from lightning_distill.teacher import TeacherOutputs

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
LRSchedulerFactory = Callable[[Optimizer], LRScheduler]

TARGET_KEYS = ("labels", "label", "y", "target")


class DistillModule(L.LightningModule):
    r"""A LightningModule that trains a student from its labels and a teacher's logits.

    The loss of a training step is

    .. math::
        \mathcal{L} = \alpha \, T^2 \, D\big(p_t^{(T)}, p_s^{(T)}\big) + (1 - \alpha)\, \mathrm{CE}(z_s, y),
        \qquad p^{(T)} = \mathrm{softmax}(z / T)

    (see :func:`~lightning_distill.losses.functional.distillation_loss`). The teacher's outputs come from
    :class:`~lightning_distill.DistillationCallback`; validation, test and predict run without it.

    Two ways in: subclass and write ``forward`` (and ``configure_optimizers`` if you like), or wrap a network,
    ``DistillModule(student=net, ...)``. ``forward`` must return logits (a tensor, ``.logits`` or ``["logits"]``)
    with classes in the last dimension.

    Args:
        student: The network to train, when not subclassing. Stored as ``self.student``.
        alpha: Weight of the KD term, in ``[0, 1]``; ``1 - alpha`` weights cross-entropy on the labels. With
            ``alpha=0.0`` the module trains without a teacher (the plain student baseline, same recipe).
        temperature: Softmax temperature :math:`T > 0` of the KD term; the term is scaled by :math:`T^2`.
        divergence: ``"kl"`` (Hinton), ``"reverse_kl"``, ``"soft_ce"``, ``"js"`` or ``"mse"``.
        ignore_index: Target value excluded from both loss terms and from the metrics.
        optimizer: Builds the optimizer from the parameters, e.g. ``functools.partial(torch.optim.Adam, lr=1e-2)``.
            Default: Adam with learning rate 1e-3. Ignored when a subclass overrides ``configure_optimizers``.
        lr_scheduler: Optional; builds a scheduler (stepped every epoch) from the optimizer.

    Raises:
        ValueError: For ``alpha`` outside ``[0, 1]``, a non-positive ``temperature`` or an unknown ``divergence``.
        TypeError: For a ``student`` that is not an ``nn.Module``, or an ``optimizer`` / ``lr_scheduler`` that is an
            instance rather than a factory.

    Example::

        >>> from torch import nn
        >>> module = DistillModule(student=nn.Linear(40, 10), alpha=0.9, temperature=4.0)
        >>> batch = (torch.randn(8, 40), torch.randint(0, 10, (8,)))
        >>> terms = module.compute_loss(module(batch[0]), TeacherOutputs(torch.randn(8, 10)), batch[1])
        >>> sorted(terms)
        ['kd_loss', 'loss', 'task_loss']
    """

    def __init__(
        self,
        student: nn.Module | None = None,
        *,
        alpha: float = 0.5,
        temperature: float = 1.0,
        divergence: Divergence = "kl",
        ignore_index: int = -100,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: LRSchedulerFactory | None = None,
    ) -> None:
        super().__init__()
        if student is not None and not isinstance(student, nn.Module):
            raise TypeError(f"`student` must be a torch.nn.Module, got {type(student).__name__}.")
        for name, factory, example in (
            ("optimizer", optimizer, "functools.partial(torch.optim.Adam, lr=1e-3)"),
            ("lr_scheduler", lr_scheduler, "functools.partial(torch.optim.lr_scheduler.StepLR, step_size=10)"),
        ):
            if factory is not None and not callable(factory):
                raise TypeError(
                    f"`{name}` must be a factory that builds it, got an instance of {type(factory).__name__}. "
                    f"HINT: pass `{example}`."
                )
        self.student = student
        self.criterion = DistillationLoss(
            alpha=alpha, temperature=temperature, divergence=divergence, ignore_index=ignore_index
        )
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self._teacher_outputs: TeacherOutputs | None = None
        # One MeanMetric per (stage, dataloader, rate), created on first use: see `_log_rate`.
        self.eval_metrics = nn.ModuleDict()
        if type(self) is DistillModule:
            self._save_plain_hyperparameters()

    def _save_plain_hyperparameters(self) -> None:
        """Save the wrapped form's arguments as hyper-parameters, leaving out live objects.

        A network or factory passed from Python is dropped (``load_from_checkpoint(path, student=net)`` gives it
        back); under ``LightningCLI`` the same arguments arrive as plain config dicts, which are kept so that
        ``--ckpt_path`` can rebuild the module.
        """
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters()
        for key in ("student", "optimizer", "lr_scheduler"):
            if callable(self.hparams.get(key)):
                del self.hparams[key]

    @property
    def alpha(self) -> float:
        """Weight of the KD term."""
        return self.criterion.alpha

    @property
    def temperature(self) -> float:
        """Softmax temperature of the KD term."""
        return self.criterion.temperature

    @property
    def divergence(self) -> Divergence:
        """Name of the divergence of the KD term."""
        return self.criterion.divergence

    @property
    def ignore_index(self) -> int:
        """Target value left out of both loss terms and the metrics."""
        return self.criterion.ignore_index

    # ----------------------------------------------------------------------------------------------- teacher hand-off
    def set_teacher_outputs(self, outputs: TeacherOutputs | None) -> None:
        """Receive the teacher's outputs for the current batch (``None`` clears them). Called by the callback."""
        if outputs is not None and not isinstance(outputs, TeacherOutputs):
            raise TypeError(f"`outputs` must be TeacherOutputs or None, got {type(outputs).__name__}.")
        self._teacher_outputs = outputs

    @property
    def teacher_outputs(self) -> TeacherOutputs | None:
        """The teacher's outputs for the current batch, or ``None`` outside a batch or without a teacher."""
        return self._teacher_outputs

    # -------------------------------------------------------------------------------------------------------- model
    @override
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the student. Subclasses that do not pass ``student=`` override this."""
        if self.student is None:
            raise RuntimeError(
                f"{type(self).__name__} has no `student`: pass `student=` to DistillModule or override `forward`."
            )
        return self.student(*args, **kwargs)

    def split_batch(self, batch: Any) -> tuple[Any, Tensor | None]:
        """Split a batch into ``(inputs, target)``; ``target`` is ``None`` for unlabeled batches.

        Handled: ``(x, y)`` tuples or lists, ``(x,)``, a bare tensor, and mappings whose target is under one of
        ``"labels"``, ``"label"``, ``"y"``, ``"target"`` (the other entries are the inputs, passed to ``forward`` as
        keyword arguments). Override it for any other structure.

        Raises:
            ValueError: For a sequence of another length or a mapping with several target keys.
            TypeError: For any other batch type.

        Example::

            >>> DistillModule().split_batch({"input_ids": 1, "labels": 2})
            ({'input_ids': 1}, 2)
        """
        if isinstance(batch, Mapping):
            keys = [k for k in TARGET_KEYS if k in batch]
            if len(keys) > 1:
                raise ValueError(
                    f"The batch has several target keys {keys}; expected at most one of {list(TARGET_KEYS)}. "
                    "HINT: override `split_batch`."
                )
            target = batch[keys[0]] if keys else None
            return {k: v for k, v in batch.items() if k not in keys}, target
        if isinstance(batch, (tuple, list)):
            if len(batch) in (1, 2):
                return batch[0], (batch[1] if len(batch) == 2 else None)
            raise ValueError(
                f"Cannot split a batch {type(batch).__name__} of length {len(batch)} into (inputs, target): expected "
                "(inputs, target) or (inputs,). HINT: override `DistillModule.split_batch`."
            )
        if isinstance(batch, Tensor):
            return batch, None
        raise TypeError(
            f"Cannot split a batch of type {type(batch).__name__} into (inputs, target): expected a tuple, list, "
            "mapping or tensor. HINT: override `DistillModule.split_batch`."
        )

    def student_logits(self, inputs: Any) -> Tensor:
        """Run ``forward`` on the inputs part of a batch and return the logits."""
        return extract_logits(call_with_inputs(self, inputs), role="student")

    # --------------------------------------------------------------------------------------------------------- loss
    def compute_loss(
        self,
        student_logits: Tensor,
        teacher_outputs: TeacherOutputs | None,
        target: Tensor | None,
        mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Compose the training loss and return every term.

        Returns:
            ``{"loss", "task_loss", "kd_loss"}`` with a teacher; ``{"loss", "task_loss"}`` without one (only
            allowed with ``alpha=0.0``).

        Raises:
            RuntimeError: Without teacher outputs while ``alpha > 0``.
        """
        if teacher_outputs is None:
            if self.alpha > 0.0:
                raise RuntimeError(
                    f"{type(self).__name__} has alpha={self.alpha} but received no teacher outputs. HINT: add the "
                    "teacher to the Trainer: `Trainer(callbacks=[DistillationCallback(teacher=...)])`, or pass "
                    "`alpha=0.0` to train the student alone."
                )
            if target is None:
                raise ValueError("Training without a teacher needs labels, but the batch has no target.")
            task = cross_entropy(student_logits, target, mask=mask, ignore_index=self.ignore_index)
            return {"loss": task, "task_loss": task}
        return self.criterion.terms(student_logits, teacher_outputs.logits, target, mask=mask)

    # -------------------------------------------------------------------------------------------------------- steps
    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, target = self.split_batch(batch)
        logits = self.student_logits(inputs)
        terms = self.compute_loss(logits, self._teacher_outputs, target)
        self.log_dict(
            {f"train/{name}": value.detach() for name, value in terms.items()},
            batch_size=logits.shape[0],
            prog_bar=False,
        )
        return terms["loss"]

    @override
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("val", batch, dataloader_idx)

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("test", batch, dataloader_idx)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Return the student's logits for the inputs part of the batch."""
        inputs, _ = self.split_batch(batch)
        return self.student_logits(inputs)

    def _evaluate(self, stage: str, batch: Any, dataloader_idx: int) -> None:
        """Log ``{stage}/loss`` and ``{stage}/acc``; with teacher outputs also teacher accuracy, agreement, KD loss."""
        inputs, target = self.split_batch(batch)
        logits = self.student_logits(inputs)
        batch_size = logits.shape[0]
        preds = logits.argmax(-1)
        counted = torch.ones_like(preds, dtype=torch.bool) if target is None else target != self.ignore_index
        if target is not None:
            loss = cross_entropy(logits, target, ignore_index=self.ignore_index)
            self.log(f"{stage}/loss", loss, batch_size=batch_size, sync_dist=True, prog_bar=stage == "val")
            self._log_rate(stage, dataloader_idx, "acc", preds == target, counted, prog_bar=stage == "val")
        teacher = self._teacher_outputs
        if teacher is None:
            return
        teacher_preds = teacher.logits.argmax(-1)
        self._log_rate(stage, dataloader_idx, "agreement", preds == teacher_preds, counted)
        if target is not None:
            self._log_rate(stage, dataloader_idx, "teacher_acc", teacher_preds == target, counted)
        divergence = kd_loss(
            logits, teacher.logits, temperature=self.temperature, divergence=self.divergence, mask=counted
        )
        self.log(f"{stage}/kd_loss", divergence, batch_size=batch_size, sync_dist=True)

    def _log_rate(
        self, stage: str, dataloader_idx: int, name: str, hits: Tensor, counted: Tensor, prog_bar: bool = False
    ) -> None:
        """Accumulate the fraction of counted positions that are hits and log it as ``{stage}/{name}``.

        Each stage, dataloader and rate has its own ``MeanMetric`` (Lightning appends ``/dataloader_idx_<i>`` to the
        key when there are several dataloaders), so rates are exact over all samples and synchronized across ranks.
        """
        key = f"{stage}_{dataloader_idx}_{name}"
        if key not in self.eval_metrics:
            self.eval_metrics[key] = MeanMetric().to(self.device)
        metric = cast(MeanMetric, self.eval_metrics[key])
        metric.update(hits[counted].float())
        self.log(
            f"{stage}/{name}",
            metric,
            on_step=False,
            on_epoch=True,
            prog_bar=prog_bar,
            metric_attribute=f"eval_metrics.{key}",  # created after Lightning indexed the module's metrics
        )

    # ---------------------------------------------------------------------------------------------------- optimizer
    @override
    def configure_optimizers(self) -> Any:
        """Build the optimizer from ``optimizer`` (default Adam, lr 1e-3) and the optional ``lr_scheduler``."""
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            optimizer: Optimizer = torch.optim.Adam(params, lr=1e-3)
        else:
            optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    # ------------------------------------------------------------------------------------------------------- export
    def export_student(self) -> nn.Module:
        """Return a standalone copy of the trained student, in eval mode, with no distillation-only state.

        For the wrapped form this is a copy of ``student``; for a subclass it is a copy of the module detached from
        its Trainer (its ``forward`` still works on its own).
        """
        if self.student is not None:
            return copy.deepcopy(self.student).eval()
        trainer = self._trainer
        self.trainer = None
        try:
            exported = copy.deepcopy(self)
        finally:
            self.trainer = trainer
        exported.set_teacher_outputs(None)
        return exported.eval()
