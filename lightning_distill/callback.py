"""DistillationCallback: owns the teacher's whole lifecycle inside a Lightning ``Trainer``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_distill._batches import example_inputs
from lightning_distill.module import DistillModule
from lightning_distill.teacher._cache import TeacherCache, cache_settings
from lightning_distill.teacher._mixture import TeacherMixture
from lightning_distill.teacher._runner import (
    TeacherOutputs,
    TeacherPrecision,
    TeacherRunner,
    load_teacher_checkpoint,
    teacher_fingerprint,
)
from lightning_distill.teacher._sharding import (
    TeacherSharding,
    check_sharding_option,
    module_bytes,
    resolve_sharding,
    shard_teacher,
    strategy_kind,
)


class DistillationCallback(L.Callback):
    r"""Runs a frozen teacher beside a :class:`~lightning_distill.DistillModule` student.

    The callback holds the teacher, so the teacher never enters the student's ``state_dict``, ``parameters()``,
    optimizer or strategy wrapper. In ``setup`` the teacher is placed on the student's device and precision; in
    ``on_train_batch_start`` it runs once on the batch's inputs under ``torch.no_grad()`` and the Trainer's precision
    context, and its outputs (logits, and the features the module's
    :class:`~lightning_distill.FeatureMap` s name, captured by forward hooks removed in ``teardown``) are handed to
    the module with :meth:`~lightning_distill.DistillModule.set_teacher_outputs`; they are cleared in
    ``on_train_batch_end``. With feature maps, ``setup("fit")`` also runs the teacher once on the module's
    ``example_input_array`` (or, without one, on the first batch of the training data ``fit`` was given: a
    ``DataLoader``, a datamodule's or the module's ``train_dataloader``) so that the module can build its projectors
    before the optimizer exists.

    Args:
        teacher: The teacher model; frozen and kept in eval mode. Its output must be logits (a tensor, ``.logits`` or
            ``["logits"]``) unless ``logits_layer`` is given.
        teachers: Instead of ``teacher``, several teachers by name: the KD target is the weighted mixture of their
            distributions at the module's temperature (:class:`~lightning_distill.teacher.TeacherMixture`); feature
            maps name their layers ``"<name>.<layer>"``.
        weights: With ``teachers``: name -> weight (normalized to sum to 1); default equal.
        teacher_checkpoint: Optional Lightning ``.ckpt`` or plain ``state_dict`` file loaded strictly into
            ``teacher`` at construction (one wrapping prefix such as ``"net."`` is stripped when that makes it match).
        logits_layer: Optional dotted name of an inner teacher layer whose output are the logits (for a teacher that
            ends in softmax, take the layer before it).
        run_on_validation: Also run the teacher on validation and test batches, so the module logs
            ``val/teacher_acc``, ``val/agreement`` and ``val/kd_loss`` (``test/...`` likewise).
        check_finite: Check the teacher's logits for NaN/inf on every training batch (one device synchronisation per
            step) and raise naming the step. The first batch is always checked.
        check_accuracy: Warn when the teacher's top-1 accuracy on the first training batch is not clearly above
            chance (an untrained or unloaded teacher). ``False`` for a teacher that is weak on purpose or a smoke run.
        allow_untested: Run under a strategy other than single device, the DDP family, FSDP, ``ModelParallelStrategy``
            and DeepSpeed, whose teacher handling is untested (the teacher is then replicated per process).
        teacher_precision: Give the teacher its own precision (``"32"``, ``"64"``, ``"16"``, ``"bf16"``), e.g. a
            ``"bf16"`` teacher for a float32 student: its weights and floating inputs are cast to it and it runs
            outside the Trainer's autocast. ``None`` (default) follows the Trainer's precision.
        teacher_device: Keep the teacher on its own device (``"cpu"``, ``"cuda:1"``): the batch's inputs are moved to
            it and its outputs back to the student's device. ``None`` (default): the student's device.
        teacher_sharding: Under ``FSDPStrategy`` / ``ModelParallelStrategy``: ``"shard"`` the teacher across all
            processes with FSDP2 (no optimizer, no gradients, each unit's weights gathered for its forward and freed
            after), ``"replicate"`` it (a full copy per process), or ``"auto"`` (default): shard when its weights take
            at least 1 GiB. Under other strategies ``"auto"`` replicates and ``"shard"`` is refused.
        cache: A :class:`~lightning_distill.TeacherCache`: the teacher's logits are stored in the first epoch and read
            back later, so cached batches never run the teacher (logits only: no feature maps).
        teacher_shard_units: Module classes of the teacher to shard as separate FSDP units (e.g. its transformer block
            class), so its forward never holds more than one unit's full weights; by default the whole teacher is one
            unit.

    Raises:
        TypeError: For a teacher that is not an ``nn.Module`` or is ``DataParallel``-wrapped, a flag that is not a
            bool, or a ``teacher_checkpoint`` that is not a path.
        ValueError: For a ``logits_layer`` that does not exist, a checkpoint that does not match, an unknown
            ``teacher_sharding``, or ``teacher_sharding="shard"`` together with a ``teacher_device``.
        FileNotFoundError: For a ``teacher_checkpoint`` that does not exist.

    Example::

        >>> from torch import nn
        >>> cb = DistillationCallback(nn.Linear(40, 10))
        >>> cb.teacher.training, any(p.requires_grad for p in cb.teacher.parameters())
        (False, False)
    """

    def __init__(
        self,
        teacher: nn.Module | None = None,
        *,
        teachers: Mapping[str, nn.Module] | None = None,
        weights: Mapping[str, float] | None = None,
        teacher_checkpoint: str | Path | None = None,
        logits_layer: str | None = None,
        run_on_validation: bool = True,
        check_finite: bool = True,
        check_accuracy: bool = True,
        allow_untested: bool = False,
        teacher_precision: TeacherPrecision | None = None,
        teacher_device: str | torch.device | None = None,
        teacher_sharding: TeacherSharding = "auto",
        teacher_shard_units: Sequence[type[nn.Module]] = (),
        cache: TeacherCache | None = None,
    ) -> None:
        for name, flag in (
            ("run_on_validation", run_on_validation),
            ("check_finite", check_finite),
            ("check_accuracy", check_accuracy),
            ("allow_untested", allow_untested),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be True or False, got {flag!r}.")
        if teacher_checkpoint is not None and not isinstance(teacher_checkpoint, (str, Path)):
            raise TypeError(
                f"`teacher_checkpoint` must be a path (str or Path), got {type(teacher_checkpoint).__name__}."
            )
        self.teacher_sharding = check_sharding_option(teacher_sharding)
        self.teacher_shard_units = _check_units(teacher_shard_units)
        if teacher_sharding == "shard" and teacher_device is not None:
            raise ValueError(
                f"`teacher_sharding='shard'` spreads the teacher over every process's device, so it cannot also stay "
                f"on `teacher_device={str(teacher_device)!r}`. HINT: drop one of the two options."
            )
        if (teacher is None) == (teachers is None):
            raise ValueError(
                "Pass exactly one of `teacher` (one model) and `teachers` (a dict of models whose distributions are "
                f"mixed), got teacher={type(teacher).__name__} and teachers={type(teachers).__name__}."
            )
        if teachers is not None:
            teacher = TeacherMixture(teachers, weights)
        elif weights is not None:
            raise ValueError("`weights` weighs several `teachers`; with one `teacher` leave it None.")
        assert teacher is not None
        self._runner = TeacherRunner(teacher, logits_layer, precision=teacher_precision, device=teacher_device)
        self.teacher_sharded = False
        if cache is not None and not isinstance(cache, TeacherCache):
            raise TypeError(f"`cache` must be a TeacherCache or None, got {type(cache).__name__}.")
        self.cache = cache
        if teacher_checkpoint is not None:
            load_teacher_checkpoint(self.teacher, teacher_checkpoint)
        self.teacher_checkpoint = None if teacher_checkpoint is None else str(teacher_checkpoint)
        self.run_on_validation = run_on_validation
        self.check_finite = check_finite
        self.check_accuracy = check_accuracy
        self.allow_untested = allow_untested
        self.fingerprint = teacher_fingerprint(self.teacher)
        self._loaded_fingerprint: str | None = None
        # Lightning reads `state_key` on every hook call; the teacher's class and logits layer never change.
        self._state_key = self._generate_state_key(teacher=_describe(self.teacher), logits_layer=logits_layer)
        self._first_batch_checked = False
        self._first_batch: tuple[Tensor, Tensor] | None = None  # the first batch's teacher logits and target

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher model."""
        return self._runner.teacher

    @property
    def teacher_bytes(self) -> int:
        """Bytes of the teacher's weights and buffers held by this process (its shard when sharded)."""
        return module_bytes(self.teacher)

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint (one entry per teacher architecture)."""
        return self._state_key

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, DistillModule):
            raise TypeError(
                f"DistillationCallback needs a DistillModule, got {type(pl_module).__name__}. HINT: subclass "
                "`lightning_distill.DistillModule`, or wrap your network: `DistillModule(student=net, ...)`."
            )
        strategy = trainer.strategy
        kind = strategy_kind(strategy)
        if kind == "untested" and not self.allow_untested:
            raise RuntimeError(
                f"DistillationCallback does not support the strategy {type(strategy).__name__} yet: the teacher's "
                "placement under it is untested. Supported: single device, ddp, ddp_spawn, ddp_fork/ddp_notebook, "
                "fsdp, ModelParallelStrategy (FSDP2), deepspeed. HINT: pass `allow_untested=True` to try anyway "
                "(the teacher is then replicated on every process)."
            )
        student_params = {id(p) for p in pl_module.parameters()}
        shared = [n for n, p in self.teacher.named_parameters() if id(p) in student_params]
        if shared:
            raise ValueError(
                f"The teacher shares parameters with the student ({shared[:5]}): distillation needs a separate, frozen "
                "teacher. HINT: pass `copy.deepcopy(model)` as the teacher."
            )
        _check_available(self._runner.device)
        self._runner.place(strategy.root_device, trainer.precision_plugin.convert_module)
        self.teacher_sharded = self._runner.device is None and resolve_sharding(
            self.teacher_sharding, kind, type(strategy).__name__, module_bytes(self.teacher)
        )
        if self.teacher_sharded:
            shard_teacher(self.teacher, strategy.root_device, self.teacher_shard_units)
        self._runner.set_features((m.teacher, m.teacher_select) for m in pl_module.feature_maps)
        self._first_batch_checked = False
        self._first_batch = None
        if stage != "fit":
            return
        if self.cache is not None:
            _check_cacheable(self.cache, pl_module, self.teacher)
        if isinstance(self.teacher, TeacherMixture) and pl_module.divergence == "mse":
            raise ValueError(
                "divergence='mse' compares raw logits, which a mixture of teachers does not have. HINT: use a "
                "divergence on probabilities ('kl', 'reverse_kl', 'js', 'soft_ce', 'dkd')."
            )
        if pl_module.feature_maps:  # shapes for the projectors, and a check of every map, before the optimizer
            example = example_inputs(trainer, pl_module)
            teacher_features = None
            if example is not None:
                inputs = move_data_to_device(example, trainer.strategy.root_device)
                teacher_features = self._runner.run(inputs, trainer.precision_plugin.forward_context()).features
            pl_module.build_projectors(teacher_features, example)
        if pl_module.schedules["alpha"].bounds() == (0.0, 0.0) and not pl_module.feature_maps:
            rank_zero_warn(
                "DistillModule has alpha=0.0, so the KD term has no weight: the teacher runs on every training batch "
                "but does not change the student. HINT: remove DistillationCallback to train the student alone."
            )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._loaded_fingerprint is not None and self._loaded_fingerprint != self.fingerprint:
            rank_zero_warn(
                f"Resuming with a different teacher: the checkpoint was trained with teacher fingerprint "
                f"{self._loaded_fingerprint}, this teacher's is {self.fingerprint}. The student will be distilled "
                "from the new teacher from here on."
            )

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        module = _as_distill_module(pl_module)
        inputs, target = module.split_batch(batch)
        self._set_mixture_temperature(module)
        if self.cache is None:
            outputs = self._runner.run(inputs, trainer.precision_plugin.forward_context())
        else:
            outputs = self._cached_outputs(trainer, module, batch, inputs)
        if self.check_finite or not self._first_batch_checked:
            _check_finite(outputs.logits, trainer, batch_idx)
        if not self._first_batch_checked:
            self._first_batch_checked = True
            if target is not None and self.check_accuracy:  # scored after the step: the module's shape checks first
                self._first_batch = (outputs.logits, target)
        module.set_teacher_outputs(outputs)

    def _cached_outputs(self, trainer: L.Trainer, module: DistillModule, batch: Any, inputs: Any) -> TeacherOutputs:
        cache = self.cache
        assert cache is not None

        ran: list[Tensor] = []

        def run() -> Tensor:  # at most one teacher forward per batch, however many times it is asked for
            if not ran:
                ran.append(self._runner.run(inputs, trainer.precision_plugin.forward_context(), features=False).logits)
            return ran[0]

        if not cache.is_open:
            logits = run()  # the first batch of a fit tells the number of classes
            if logits.ndim != 2:
                raise ValueError(
                    f"TeacherCache stores one logits row per sample, but the teacher returned {tuple(logits.shape)}. "
                    "HINT: token-level (B, L, V) logits are not cached; remove `cache=`."
                )
            dataset = getattr(trainer.train_dataloader, "dataset", None)
            if dataset is None:
                raise TypeError("TeacherCache needs the training DataLoader's dataset to size the cache.")
            settings = cache_settings(
                self.fingerprint,
                len(dataset),
                getattr(dataset, "views", 1),
                logits.shape[-1],
                cache.top_k,
                module.hparam_values()["temperature"],
            )
            cache.open(settings, create=trainer.is_global_zero, barrier=trainer.strategy.barrier)
        return cache.outputs(cache.rows(batch), run, trainer.current_epoch, trainer.strategy.root_device)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.cache is not None and self.cache.is_open:
            self.cache.flush()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        module = _as_distill_module(pl_module)
        module.set_teacher_outputs(None)
        if self._first_batch is not None:
            logits, target = self._first_batch
            self._first_batch = None
            _warn_if_chance_level(logits, target, module.ignore_index, module.shift_labels)

    @override
    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._run_for_evaluation(trainer, pl_module, batch)

    @override
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        _as_distill_module(pl_module).set_teacher_outputs(None)

    # The test loop gets the same teacher run and clean-up as the validation loop.
    on_test_batch_start = on_validation_batch_start
    on_test_batch_end = on_validation_batch_end

    def _set_mixture_temperature(self, module: DistillModule) -> None:
        if isinstance(self.teacher, TeacherMixture):
            self.teacher.temperature = module.hparam_values()["temperature"]

    def _run_for_evaluation(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> None:
        if self.run_on_validation:
            module = _as_distill_module(pl_module)
            inputs, _ = module.split_batch(batch)
            self._set_mixture_temperature(module)
            outputs = self._runner.run(inputs, trainer.precision_plugin.forward_context(), features=False)
            module.set_teacher_outputs(outputs)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(pl_module, DistillModule):
            pl_module.set_teacher_outputs(None)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._runner.remove_hooks()
        if isinstance(pl_module, DistillModule):
            pl_module.set_teacher_outputs(None)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "teacher_fingerprint": self.fingerprint,
            "teacher_class": type(self.teacher).__qualname__,
            "teacher_checkpoint": self.teacher_checkpoint,
            "logits_layer": self._runner.logits_layer,
            "teacher_precision": self._runner.precision,
            "teacher_device": None if self._runner.device is None else str(self._runner.device),
            "teacher_sharded": self.teacher_sharded,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_fingerprint = state_dict.get("teacher_fingerprint")


def _as_distill_module(pl_module: L.LightningModule) -> DistillModule:
    if not isinstance(pl_module, DistillModule):  # setup() has refused this already; keeps type checkers honest
        raise TypeError(f"DistillationCallback needs a DistillModule, got {type(pl_module).__name__}.")
    return pl_module


def _describe(teacher: nn.Module) -> str:
    """The teacher's class, or for a mixture each teacher's name and class (the callback's state key)."""
    if isinstance(teacher, TeacherMixture):
        return ",".join(f"{name}:{type(t).__qualname__}" for name, t in teacher.teachers.items())
    return type(teacher).__qualname__


def _check_cacheable(cache: TeacherCache, module: DistillModule, teacher: nn.Module) -> None:
    """Refuse a cache the module's loss could not use: features, or top-k with another divergence or a schedule."""
    if isinstance(teacher, TeacherMixture):
        raise ValueError(
            "TeacherCache stores one teacher's logits; a mixture of teachers depends on the temperature and is not "
            "cached. HINT: remove `cache=` or distill from one teacher."
        )
    if module.feature_maps:
        raise ValueError(
            "TeacherCache stores the teacher's logits only, but the module has feature maps, which need the teacher's "
            "forward on every batch. HINT: remove `cache=` or the feature maps."
        )
    if cache.top_k is not None:
        if module.divergence != "kl":
            raise ValueError(
                f"A top-k TeacherCache supports divergence='kl' only, got {module.divergence!r}. HINT: "
                "`TeacherCache(path)` stores the full logits, which work with every divergence."
            )
        if not module.schedules["temperature"].is_constant:
            raise ValueError(
                "A top-k TeacherCache stores probabilities at one temperature, but the temperature is scheduled. HINT: "
                "`TeacherCache(path)` stores the full logits, which work at any temperature."
            )


def _check_units(units: Sequence[type[nn.Module]]) -> tuple[type[nn.Module], ...]:
    if isinstance(units, (str, type)) or not all(isinstance(u, type) and issubclass(u, nn.Module) for u in units):
        raise TypeError(
            f"`teacher_shard_units` must be a sequence of nn.Module classes, got {units!r}. HINT: pass the teacher's "
            "block class, e.g. `teacher_shard_units=[MyTransformerBlock]`."
        )
    return tuple(units)


def _check_available(device: torch.device | None) -> None:
    """Raise if a requested teacher device does not exist on this machine (before any weight is moved)."""
    if device is None or device.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (device.index is not None and device.index >= count) or count == 0:
        raise RuntimeError(
            f"`teacher_device={str(device)!r}` is not available: this machine has {count} CUDA device(s). HINT: "
            "pass 'cpu' or an existing 'cuda:<index>'."
        )


def _check_finite(logits: Tensor, trainer: L.Trainer, batch_idx: int) -> None:
    finite = torch.isfinite(logits)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise FloatingPointError(
            f"The teacher's logits contain {bad} NaN/inf value(s) out of {logits.numel()} at global step "
            f"{trainer.global_step} (epoch {trainer.current_epoch}, batch {batch_idx}). HINT: check the teacher's "
            "checkpoint and the input batch; under 16-mixed precision, try bf16-mixed or 32-true."
        )


def _warn_if_chance_level(logits: Tensor, target: Tensor, ignore_index: int, shift_labels: bool) -> None:
    """Warn when the teacher's first-batch accuracy is not clearly above chance (an untrained or unloaded teacher).

    "Clearly" is three binomial standard deviations above chance; the check is skipped when the batch is too small
    for that bound to be below 100 %. With ``shift_labels`` a causal LM's logits at t are scored against token t + 1.
    Per-token logits scored without the shift that do predict the *next* token well get a hint to pass
    ``shift_labels=True`` instead of the blame for untrained weights.
    """
    if shift_labels and logits.ndim >= 3:
        logits, target = logits[..., :-1, :], target[..., 1:]
    accuracy, bound, n = _accuracy_and_bound(logits, target, ignore_index)
    if accuracy is None or accuracy >= bound:
        return
    num_classes = logits.shape[-1]
    seen = f"{accuracy:.1%} ({n} positions, {num_classes} classes, chance {1.0 / num_classes:.1%})"
    if not shift_labels and logits.ndim >= 3 and logits.shape[-2] > 1:
        shifted, shifted_bound, _ = _accuracy_and_bound(logits[..., :-1, :], target[..., 1:], ignore_index)
        if shifted is not None and shifted >= shifted_bound:
            rank_zero_warn(
                f"The teacher's top-1 accuracy on the first training batch is {seen} against the labels at the same "
                f"position, but {shifted:.1%} against the next token: it is a causal language model scored without "
                "the shift. HINT: pass `DistillModule(..., shift_labels=True)`."
            )
            return
    rank_zero_warn(
        f"The teacher's top-1 accuracy on the first training batch is {seen}: it looks untrained. HINT: load its "
        "weights with `DistillationCallback(teacher, teacher_checkpoint=...)`."
    )


def _accuracy_and_bound(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[float | None, float, int]:
    """Top-1 accuracy over the counted positions and its chance bound; ``None`` when it cannot be judged."""
    if target.shape != logits.shape[:-1] or target.is_floating_point():
        return None, 1.0, 0
    counted = target != ignore_index
    n = int(counted.sum())
    chance = 1.0 / logits.shape[-1]
    bound = chance + 3.0 * math.sqrt(chance * (1.0 - chance) / max(n, 1))
    if n == 0 or bound >= 1.0:
        return None, bound, n
    return float((logits.argmax(-1) == target)[counted].float().mean()), bound, n
