"""Plumbing shared by the LightningModules of this package: optimizer factories and exact evaluation rates."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import MeanMetric

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
