"""Plumbing shared by the LightningModules of this package: a common base, optimizer factories, exact rates."""

from __future__ import annotations

import copy
import inspect
import weakref
from collections.abc import Callable, Iterable
from typing import Any, cast

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch import callbacks
from lightning.pytorch.trainer.states import RunningStage
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


_TRAIN_PREFIX = "train/"
# Callbacks known never to read logged metrics, by exact type (a subclass may read them). Not among them: Timer (it
# may set `should_stop` after the step, which makes Lightning write that step), LambdaCallback (your functions).
_QUIET_CALLBACKS: frozenset[type[L.Callback]] = frozenset(
    {
        callbacks.TQDMProgressBar,  # show `prog_bar` metrics only, which the training terms are not
        callbacks.RichProgressBar,
        callbacks.ModelSummary,
        callbacks.RichModelSummary,
        callbacks.LearningRateMonitor,
        callbacks.GradientAccumulationScheduler,
        callbacks.StochasticWeightAveraging,
        callbacks.WeightAveraging,
        callbacks.EMAWeightAveraging,
        callbacks.ModelPruning,
        callbacks.DeviceStatsMonitor,
        callbacks.ThroughputMonitor,
        callbacks.OnExceptionCheckpoint,
        callbacks.BackboneFinetuning,
    }
)
# This package's callbacks, by module and name (importing them here would be circular): none reads logged metrics.
_QUIET_OWN_CALLBACKS = frozenset(
    {
        ("lightning_distill.callback", "DistillationCallback"),
        ("lightning_distill.cached_teacher", "CachedTeacher"),
        ("lightning_distill.quantization._qat", "FreezeQuantization"),
    }
)
# Per Trainer: (callbacks, LR scheduler configs, module class) and whether any of them reads `train/` metrics.
_READERS: weakref.WeakKeyDictionary[L.Trainer, tuple[tuple[Any, ...], bool]] = weakref.WeakKeyDictionary()


def train_logs_read(module: L.LightningModule) -> bool:
    """Whether values that ``module``'s ``training_step`` logs now as ``train/<name>`` will be read by anyone.

    ``self.log`` costs about 0.3 ms a key on a CPU, a large share of a small model's step, and most steps' values are
    never read: Lightning's logger connector writes step metrics to the loggers only every ``log_every_n_steps``
    steps, and ``trainer.callback_metrics`` matter only to whoever reads them. So the training terms are logged when
    (and, whenever unsure, logged):

    * there is no Trainer, or it is not in its training loop;
    * a logger writes this step, by the logger connector's own rule (``should_update_logs`` and
      ``update_train_step_metrics``): the Trainer has loggers and this batch does not only accumulate gradients, and
      ``(optimizer steps so far + 1) % log_every_n_steps == 0``, or ``trainer.should_stop`` is set, or
      ``fast_dev_run`` is on (``log_every_n_steps=0`` never writes);
    * it is the last batch of the epoch, or the last optimizer step under ``max_steps``, or ``trainer.should_stop`` is
      set (the fit may end after any step): so ``trainer.callback_metrics`` after each epoch and after ``fit`` hold
      the last step's values, as when logging every step;
    * anything may read ``trainer.callback_metrics`` between steps: a ``ModelCheckpoint`` or ``EarlyStopping`` whose
      ``monitor`` (or checkpoint ``filename``) names a ``train/`` key, an ``EarlyStopping`` while validation also
      runs within epochs (it may end the fit after any such step), an LR scheduler that monitors a ``train/`` key,
      any callback other than those known to read no logged metrics (Lightning's progress bars, which show only
      ``prog_bar`` metrics and so never these, model summaries, ``LearningRateMonitor``, weight averaging and a few
      more, and this package's own callbacks; ``Timer`` is not one of them, it may stop the fit after the step), or
      a module class of your own that overrides an ``on_*`` hook or ``optimizer_step``. A callback of yours that
      never reads ``train/`` metrics nor sets ``trainer.should_stop`` can say so with a class attribute
      ``reads_train_metrics = False``.

    On the steps it returns ``False`` the logger receives exactly what it receives when every step is logged: a
    step's logged values reach the loggers only on the steps above. The answer depends only on state every process
    shares, so under ``sync_dist=True`` all processes log (and synchronize) on the same steps.
    """
    trainer = module._trainer
    if trainer is None or trainer.state.stage is not RunningStage.TRAINING:  # `is`: the enum's `==` is slow
        return True
    try:
        if _read_between_steps(trainer, module):
            return True
        epoch_loop = trainer.fit_loop.epoch_loop
        progress = epoch_loop.batch_progress
        if progress.is_last_batch or progress.current.ready >= trainer.num_training_batches:
            return True
        if 0 <= trainer.max_steps <= trainer.global_step + 1 or trainer.should_stop:
            return True
        if not trainer.loggers:
            return False
        if trainer.fast_dev_run:  # type: ignore[attr-defined]  # set by Lightning at runtime
            return True
        if module.automatic_optimization and trainer.fit_loop._should_accumulate():
            return False
        return bool(trainer._logger_connector.should_update_logs)
    except AttributeError:  # a Lightning whose loops differ from the ones this rule was written for: log
        return True


def _read_between_steps(trainer: L.Trainer, module: L.LightningModule) -> bool:
    """Whether a callback, an LR scheduler or the module's own hooks may read ``train/`` metrics (cached per fit)."""
    present: list[L.Callback] = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning at runtime
    val_check_batch = getattr(trainer, "val_check_batch", None)
    key = (*present, *trainer.lr_scheduler_configs, type(module), val_check_batch, trainer.num_training_batches)
    cached = _READERS.get(trainer)
    if cached is not None and cached[0] == key:
        return cached[1]
    mid_epoch = (
        getattr(trainer, "_val_check_time_interval", None) is not None
        or trainer.check_val_every_n_epoch is None
        or (val_check_batch is not None and val_check_batch < trainer.num_training_batches)
    )
    read = (
        any(_callback_reads(callback, mid_epoch) for callback in present)
        or any(_names_train_key(config.monitor) for config in trainer.lr_scheduler_configs)
        or _hooks_of_your_own(type(module))
    )
    _READERS[trainer] = (key, read)
    return read


def _names_train_key(text: str | None) -> bool:
    return text is not None and _TRAIN_PREFIX in text


def _callback_reads(callback: L.Callback, validates_mid_epoch: bool) -> bool:
    kind = type(callback)
    if kind in _QUIET_CALLBACKS or (kind.__module__, kind.__qualname__) in _QUIET_OWN_CALLBACKS:
        return False
    if getattr(callback, "reads_train_metrics", True) is False:  # a callback of yours that says so
        return False
    if kind is callbacks.ModelCheckpoint:
        checkpoint = cast(callbacks.ModelCheckpoint, callback)
        return _names_train_key(checkpoint.monitor) or _names_train_key(checkpoint.filename)
    if kind is callbacks.EarlyStopping:  # it may also stop the fit after a validation within an epoch
        return _names_train_key(cast(callbacks.EarlyStopping, callback).monitor) or validates_mid_epoch
    return True


def _hooks_of_your_own(cls: type) -> bool:
    """Whether a class outside Lightning and this package, in ``cls``'s MRO, defines a hook that runs after a step."""
    for klass in cls.__mro__:
        if klass.__module__.split(".", 1)[0] in ("lightning", "lightning_distill", "torch", "builtins"):
            continue
        if any(name.startswith("on_") or name in ("optimizer_step", "lr_scheduler_step") for name in vars(klass)):
            return True
    return False


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
        """Log each loss term as ``train/<name>`` for this step, averaged over processes when ``sync_dist``.

        The ``self.log`` calls are made only on the steps whose values someone reads (see
        :func:`train_logs_read`): elsewhere they cost time (about 0.3 ms a key on a CPU) and change nothing.
        """
        if train_logs_read(self):
            logged = {f"train/{name}": value.detach() for name, value in terms.items()}
            self.log_dict(logged, batch_size=batch_size, sync_dist=self.sync_dist)

    def log_train_values(self, values: dict[str, float], batch_size: int) -> None:
        """Log scheduled hyper-parameter values as ``train/<name>`` for this step, on the steps they are read.

        The values are the same on every process, so they are never synchronized. See :func:`train_logs_read`.
        """
        if values and train_logs_read(self):
            self.log_dict({f"train/{name}": float(v) for name, v in values.items()}, batch_size=batch_size)

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
