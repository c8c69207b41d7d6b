"""Plumbing shared by the LightningModules of this package: a common base, optimizer factories, exact rates."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable
from typing import Any, cast

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_distill._batches import split_batch
from lightning_distill.schedules import Schedule

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
LRSchedulerFactory = Callable[[Optimizer], LRScheduler]


def check_factories(optimizer: object, lr_scheduler: object) -> None:
    """Raise ``TypeError`` if ``optimizer`` or ``lr_scheduler`` is an instance rather than a factory (or ``None``).

    Example::

        >>> import functools
        >>> check_factories(functools.partial(torch.optim.Adam, lr=1e-3), None)
    """
    for name, factory, example in (
        ("optimizer", optimizer, "functools.partial(torch.optim.Adam, lr=1e-3)"),
        ("lr_scheduler", lr_scheduler, "functools.partial(torch.optim.lr_scheduler.StepLR, step_size=10)"),
    ):
        if factory is not None and not callable(factory):
            raise TypeError(
                f"`{name}` must be a factory that builds it, got an instance of {type(factory).__name__}. "
                f"HINT: pass `{example}`."
            )


def build_optimizers(
    module: nn.Module, optimizer: OptimizerFactory | None, lr_scheduler: LRSchedulerFactory | None
) -> Any:
    """Return what ``configure_optimizers`` returns for ``module``: the optimizer and the optional scheduler.

    The optimizer covers every trainable parameter (default Adam, lr 1e-3); the scheduler is stepped every epoch.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    built: Optimizer = torch.optim.Adam(params, lr=1e-3) if optimizer is None else optimizer(params)
    if lr_scheduler is None:
        return built
    return {"optimizer": built, "lr_scheduler": lr_scheduler(built)}


def log_rate(
    module: L.LightningModule,
    metrics: nn.ModuleDict,
    attribute: str,
    metric_name: str,
    log_key: str,
    hits: Tensor,
    counted: Tensor,
    prog_bar: bool = False,
) -> None:
    """Accumulate the fraction of counted positions that are hits and log it as ``log_key`` once per epoch.

    Each ``metric_name`` (one per stage, dataloader and rate) has its own ``MeanMetric`` in ``metrics``, the module
    attribute named ``attribute``, created on first use; so rates are exact over all samples and synchronized
    across processes. With several dataloaders Lightning appends ``/dataloader_idx_<i>`` to ``log_key`` itself.
    """
    if metric_name not in metrics:
        metrics[metric_name] = MeanMetric().to(module.device)
    metric = cast(MeanMetric, metrics[metric_name])
    metric.update(hits[counted].float())
    module.log(
        log_key,
        metric,
        on_step=False,
        on_epoch=True,
        prog_bar=prog_bar,
        metric_attribute=f"{attribute}.{metric_name}",  # created after Lightning indexed the module's metrics
    )


def check_optimized(module: L.LightningModule, parameters: Iterable[tuple[str, nn.Parameter]], hint: str) -> None:
    """Raise if a trainable parameter among ``parameters`` is in none of the Trainer's optimizers.

    Distillation-only parameters (projectors, exit heads) are easy to leave out of a hand-written optimizer, and they
    then never train, silently. The check is skipped when none of the module's parameters is found in any optimizer
    (a strategy that flattens parameters, such as FSDP, makes identity comparisons meaningless).

    Raises:
        RuntimeError: Naming the missing parameters, followed by ``hint``.
    """
    optimizers = module.trainer.optimizers
    optimized = {id(p) for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]}
    if not optimized & {id(p) for p in module.parameters()}:
        return
    missing = [name for name, p in parameters if p.requires_grad and id(p) not in optimized]
    if missing:
        raise RuntimeError(f"The parameters {missing} are in no optimizer, so they would never train. HINT: {hint}")


class FactoryModule(L.LightningModule):
    """Base of :class:`~lightning_distill.DistillModule` and :class:`~lightning_distill.SelfDistillModule`.

    It holds what both share: batch splitting, the optimizer and scheduler built from factories over every trainable
    parameter, validation and test routed to one ``_evaluate(stage, batch, dataloader_idx)`` that subclasses define,
    and exact per-epoch rates in ``eval_metrics``.

    Args:
        optimizer: Factory building the optimizer from the parameters (default Adam, lr 1e-3).
        lr_scheduler: Optional factory building a scheduler (stepped every epoch) from the optimizer.
        sync_dist: Average each training term across processes before logging it (one all-reduce per term and
            step). Off by default: per-step training logs show process 0's batch; validation and test metrics are
            always synchronized.

    Raises:
        TypeError: For an optimizer or scheduler that is an instance rather than a factory, or a ``sync_dist`` that is
            not a bool.
    """

    def __init__(
        self, optimizer: OptimizerFactory | None, lr_scheduler: LRSchedulerFactory | None, sync_dist: bool = False
    ) -> None:
        super().__init__()
        check_factories(optimizer, lr_scheduler)
        if not isinstance(sync_dist, bool):
            raise TypeError(f"`sync_dist` must be True or False, got {sync_dist!r}.")
        self.sync_dist = sync_dist
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        # One MeanMetric per (stage, dataloader, rate), created on first use: see `_log_rate`.
        self.eval_metrics = nn.ModuleDict()

    def split_batch(self, batch: Any) -> tuple[Any, Tensor | None]:
        """Split a batch into ``(inputs, target)``; see :func:`~lightning_distill._batches.split_batch`.

        Override it for any batch structure the default does not handle.

        Example::

            >>> FactoryModule(None, None).split_batch({"input_ids": 1, "labels": 2})
            ({'input_ids': 1}, 2)
        """
        return split_batch(batch)

    @override
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("val", batch, dataloader_idx)

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("test", batch, dataloader_idx)

    def _evaluate(self, stage: str, batch: Any, dataloader_idx: int) -> None:
        """Log the metrics of one validation or test batch; subclasses define what they are."""

    def log_train_terms(self, terms: dict[str, Tensor], batch_size: int) -> None:
        """Log each loss term as ``train/<name>`` for this step, averaged over processes when ``sync_dist``."""
        logged = {f"train/{name}": value.detach() for name, value in terms.items()}
        self.log_dict(logged, batch_size=batch_size, sync_dist=self.sync_dist)

    def _log_rate(
        self, stage: str, dataloader_idx: int, name: str, hits: Tensor, counted: Tensor, prog_bar: bool = False
    ) -> None:
        """Log the exact rate of hits among counted positions as ``{stage}/{name}`` (see :func:`log_rate`)."""
        metric_name = f"{stage}_{dataloader_idx}_{name}"
        log_rate(self, self.eval_metrics, "eval_metrics", metric_name, f"{stage}/{name}", hits, counted, prog_bar)

    def _save_plain_hyperparameters(self, configs: dict[str, Any], **live: Any) -> None:
        """Save the constructor's arguments as hyper-parameters, leaving out live objects (call it from ``__init__``).

        A network, factory or tensor passed from Python (``live``) is never saved, not even in the
        ``hparams_initial`` that loggers write (``load_from_checkpoint(path, student=net)`` gives it back); under
        ``LightningCLI`` the same arguments arrive as plain config dicts, which are kept so that ``--ckpt_path`` can
        rebuild the module. Schedules are stored as their config dicts, and ``configs`` replaces saved values by
        their plain form (e.g. feature maps as dicts).
        """
        # ignored, not deleted after saving (that deep-copies the network); LightningCLI gives config dicts instead
        ignore = [] if _cli_given_hyperparameters() else [key for key, value in live.items() if _is_live(value)]
        self.save_hyperparameters(ignore=ignore, frame=inspect.currentframe().f_back)  # type: ignore[union-attr]
        for key in live:
            if _is_live(self.hparams.get(key)):
                del self.hparams[key]
        for key, value in self.hparams.items():
            if isinstance(value, Schedule):
                self.hparams[key] = value.to_config()
        self.hparams.update(configs)
        self._hparams_initial = copy.deepcopy(self._hparams)  # what loggers write: the plain form too

    @override
    def configure_optimizers(self) -> Any:
        """Build the optimizer from ``optimizer`` (default Adam, lr 1e-3) and the optional ``lr_scheduler``."""
        return build_optimizers(self, self.optimizer_factory, self.lr_scheduler_factory)


def _is_live(value: Any) -> bool:
    """A live object that is never saved as a hyper-parameter: a network, a factory, tensors (example inputs)."""
    tensors: list[Tensor] = []
    apply_to_collection(value, Tensor, tensors.append)
    return callable(value) or bool(tensors)


def _cli_given_hyperparameters() -> bool:
    """Whether ``LightningCLI`` is instantiating the module (it hands ``save_hyperparameters`` the config)."""
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # a Lightning without it: the objects are saved, then dropped
        return False
    return _given_hyperparameters.get() is not None
