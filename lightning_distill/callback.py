"""DistillationCallback: owns the teacher's whole lifecycle inside a Lightning ``Trainer``."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_zero_deprecation
from torch import Tensor, nn
from typing_extensions import override

from lightning_distill._contract import TeacherClient, TeacherConnection, TeacherNeeds, TeacherRequest
from lightning_distill._rng import ResumeRng
from lightning_distill.generation import max_sequence_length
from lightning_distill.teacher._cache import TeacherCache
from lightning_distill.teacher._cache_files import cache_settings
from lightning_distill.teacher._digest import teacher_weights_fingerprint
from lightning_distill.teacher._mixture import TeacherMixture
from lightning_distill.teacher._runner import TeacherOutputs, TeacherPrecision, TeacherRunner
from lightning_distill.teacher._sharding import TeacherSharding, module_bytes, strategy_kind

__all__ = ["DistillationCallback"]

_RUNNER_KEYWORDS = {  # the deprecated callback keywords and the TeacherRunner keywords that replace them
    "teacher_checkpoint": "checkpoint",
    "logits_layer": "logits_layer",
    "teacher_precision": "precision",
    "teacher_device": "device",
    "teacher_sharding": "sharding",
    "teacher_shard_units": "shard_units",
}


class DistillationCallback(L.Callback):
    r"""Runs a frozen teacher beside a :class:`~lightning_distill.DistillModule` student.

    The callback holds the teacher, so the teacher never enters the student's ``state_dict``, ``parameters()``,
    optimizer or strategy wrapper. It talks to the module only through the teacher contract
    (:class:`~lightning_distill._contract.TeacherClient`): in ``setup`` it places the teacher on the student's device
    and precision (or where its :class:`~lightning_distill.teacher.TeacherRunner` says), asks the module which teacher
    layers to capture (forward hooks, removed in ``teardown``) and connects the teacher to the module, which refuses
    a teacher its loss cannot use and runs it itself for its own set-up and for steps no callback hook sees (the
    Tuner's searches). In ``on_train_batch_start`` it asks the module what to run the teacher on, runs it once under
    ``torch.no_grad()`` and the Trainer's precision context, and hands the outputs over with
    :meth:`~lightning_distill.DistillModule.set_teacher_outputs`; they are cleared in ``on_train_batch_end``.

    Args:
        teacher: The teacher model, frozen and kept in eval mode; its output must be logits (a tensor, ``.logits`` or
            ``["logits"]``). A :class:`~lightning_distill.teacher.TeacherMixture` distills from the weighted mixture
            of several teachers' distributions at the module's temperature. A
            :class:`~lightning_distill.teacher.TeacherRunner` holds the teacher with its placement: a checkpoint to
            load, a logits layer, its own precision or device, and its sharding under FSDP.
        cache: A :class:`~lightning_distill.TeacherCache`: the teacher's logits are stored in the first epoch and read
            back later, so cached batches never run the teacher (logits only: no feature maps, no mixture).
        run_on_validation: Also run the teacher on validation and test batches, so the module logs
            ``val/teacher_acc``, ``val/agreement`` and ``val/kd_loss`` (``test/...`` likewise).
        check_finite: Check the teacher's logits for NaN, ``+inf`` and all ``-inf`` rows (a single ``-inf`` is a
            masked class) and raise naming the batch and step: on every validation and test batch, and on every
            training batch unless the module checks its own loss (``DistillModule(check_finite=True)``, then only the
            first), one device synchronisation a batch. With a ``cache`` the cache checks every row it stores,
            whatever this is, and reads back only rows it checked.
        check_accuracy: Warn when the teacher's top-1 accuracy on the first training batch with labels is not clearly
            above chance (an untrained or unloaded teacher; on-policy batches have none: their tokens are the
            student's samples). ``False`` for a teacher that is weak on purpose or a smoke run.
        allow_untested: Run under a strategy other than single device, the DDP family, FSDP, ``ModelParallelStrategy``
            and DeepSpeed, whose teacher handling is untested (the teacher is then replicated per process).
        teachers: Deprecated: pass ``TeacherMixture(teachers, weights)`` as ``teacher``.
        weights: Deprecated, with ``teachers``.
        teacher_checkpoint: Deprecated: ``TeacherRunner(teacher, checkpoint=...)``.
        logits_layer: Deprecated: ``TeacherRunner(teacher, logits_layer=...)``.
        teacher_precision: Deprecated: ``TeacherRunner(teacher, precision=...)``.
        teacher_device: Deprecated: ``TeacherRunner(teacher, device=...)``.
        teacher_sharding: Deprecated: ``TeacherRunner(teacher, sharding=...)``.
        teacher_shard_units: Deprecated: ``TeacherRunner(teacher, shard_units=...)``.

    Raises:
        TypeError: For a teacher that is neither an ``nn.Module`` nor a ``TeacherRunner``, a ``cache`` that is not a
            ``TeacherCache``, or a flag that is not a bool (and as :class:`~lightning_distill.teacher.TeacherRunner`
            raises for the deprecated keywords).
        ValueError: For a deprecated keyword together with a ``TeacherRunner``, or neither or both of ``teacher`` and
            ``teachers``; at ``setup("fit")`` for a cached mixture of teachers.
        OSError: At ``setup("fit")``, naming the directory and the reason, when the cache directory cannot be
            created or written.

    Example::

        >>> from torch import nn
        >>> cb = DistillationCallback(nn.Linear(40, 10))
        >>> cb.teacher.training, any(p.requires_grad for p in cb.teacher.parameters())
        (False, False)
        >>> cb = DistillationCallback(TeacherRunner(nn.Linear(40, 10), precision="bf16"))
        >>> cb.teacher.weight.dtype, cb.runner.precision
        (torch.float32, 'bf16')
    """

    def __init__(
        self,
        teacher: nn.Module | TeacherRunner | None = None,
        *,
        cache: TeacherCache | None = None,
        run_on_validation: bool = True,
        check_finite: bool = True,
        check_accuracy: bool = True,
        allow_untested: bool = False,
        teachers: Mapping[str, nn.Module] | None = None,
        weights: Mapping[str, float] | None = None,
        teacher_checkpoint: str | Path | None = None,
        logits_layer: str | None = None,
        teacher_precision: TeacherPrecision | None = None,
        teacher_device: str | torch.device | None = None,
        teacher_sharding: TeacherSharding | None = None,
        teacher_shard_units: Sequence[type[nn.Module]] | None = None,
    ) -> None:
        for name, flag in (
            ("run_on_validation", run_on_validation),
            ("check_finite", check_finite),
            ("check_accuracy", check_accuracy),
            ("allow_untested", allow_untested),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be True or False, got {flag!r}.")
        placement = {
            "teacher_checkpoint": teacher_checkpoint,
            "logits_layer": logits_layer,
            "teacher_precision": teacher_precision,
            "teacher_device": teacher_device,
            "teacher_sharding": teacher_sharding,
            "teacher_shard_units": teacher_shard_units,
        }
        self._runner = _runner_from(teacher, teachers, weights, placement)
        if cache is not None and not isinstance(cache, TeacherCache):
            hint = (
                " HINT: a TokenCache is written ahead by the pre-pass (`TokenCachePass`) and read by "
                "`CachedTeacher(cache)` in place of this callback."
                if type(cache).__name__ == "TokenCache"
                else ""
            )
            raise TypeError(f"`cache` must be a TeacherCache or None, got {type(cache).__name__}.{hint}")
        self.cache = cache
        self.run_on_validation = run_on_validation
        self.check_finite = check_finite
        self.check_accuracy = check_accuracy
        self.allow_untested = allow_untested
        self.teacher_sharded = False
        self._loaded_fingerprint: str | None = None
        self._fingerprint: str | None = None  # every byte of the placed teacher, taken once per fit when needed
        # Lightning reads `state_key` on every hook call; the teacher's class and logits layer never change.
        self._state_key = self._generate_state_key(
            teacher=_describe(self.teacher), logits_layer=self._runner.logits_layer
        )
        self._client: TeacherClient | None = None  # the module connected in `setup`
        self._needs = TeacherNeeds()
        self._forward_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
        self._first_batch_checked = False
        self._first_batch: tuple[Tensor, Tensor] | None = None  # the first batch's teacher logits and target
        self._accuracy_pending = check_accuracy
        self._rng = ResumeRng("DistillationCallback")  # the global RNG states, kept in checkpoints for resume

    @property
    def runner(self) -> TeacherRunner:
        """The :class:`~lightning_distill.teacher.TeacherRunner` that holds, places and runs the teacher."""
        return self._runner

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher model."""
        return self._runner.teacher

    @property
    def teacher_bytes(self) -> int:
        """Bytes of the teacher's weights and buffers held by this process (its shard when sharded)."""
        return module_bytes(self.teacher)

    @property
    def fingerprint(self) -> str:
        """A SHA-256 of every byte of the teacher's weights as it runs (its precision counts) and its logits layer.

        Taken at most once per fit, when first needed: at ``setup("fit")`` with a
        :class:`~lightning_distill.TeacherCache` (which is keyed by it), else when the first checkpoint is saved (it is
        kept in the student's checkpoints) or a resumed fit compares it with the checkpoint's (another teacher warns).
        Cost: one pass over the weights, copied to the CPU tensor by tensor, about 0.02 s per 10 million float32
        parameters here (a 7-billion-parameter bf16 teacher: some seconds, on every process).
        """
        if self._fingerprint is None:  # first needed: a checkpoint, a resume
            self._fingerprint = self._weights_fingerprint()
        return self._fingerprint

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint (one entry per teacher architecture)."""
        return self._state_key

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        client = _as_client(pl_module)
        strategy = trainer.strategy
        kind = strategy_kind(strategy)
        if kind == "untested" and not self.allow_untested:
            raise RuntimeError(
                f"DistillationCallback does not support the strategy {type(strategy).__name__} yet: the teacher's "
                "placement under it is untested. Supported: single device, ddp, ddp_spawn, ddp_fork/ddp_notebook, "
                "fsdp, ModelParallelStrategy (FSDP2), deepspeed. HINT: pass `allow_untested=True` to try anyway "
                "(the teacher is then replicated on every process)."
            )
        # `Trainer.callbacks` is public but set by Lightning's callback connector, so type checkers do not see it
        present: list[L.Callback] = trainer.callbacks  # type: ignore[attr-defined]
        callbacks = [c for c in present if isinstance(c, DistillationCallback)]
        if len(callbacks) > 1:
            teachers = ", ".join(_describe(c.teacher) for c in callbacks)
            raise RuntimeError(
                f"The Trainer has {len(callbacks)} DistillationCallbacks (teachers {teachers}), but a module learns "
                "from one teacher: it would silently get only the last one's outputs. HINT: pass the teachers as one "
                "mixture, `DistillationCallback(TeacherMixture({'a': teacher_a, 'b': teacher_b}))`."
            )
        cache = self.cache if stage == "fit" else None  # only training steps read the cache
        if cache is not None and isinstance(self.teacher, TeacherMixture):
            raise ValueError(
                "TeacherCache stores one teacher's logits; a mixture of teachers depends on the temperature and is not "
                "cached. HINT: remove `cache=` or distill from one teacher."
            )
        if cache is not None:
            cache.close()  # opened again, and checked against this fit's teacher and data, at the first batch
            cache.prepare()  # an uncreatable or read-only directory fails here, not at the first batch
        student_params = {id(p) for p in pl_module.parameters()}
        shared = [n for n, p in self.teacher.named_parameters() if id(p) in student_params]
        if shared:
            raise ValueError(
                f"The teacher shares parameters with the student ({shared[:5]}): distillation needs a separate, frozen "
                "teacher. HINT: pass `copy.deepcopy(model)` as the teacher."
            )
        self._runner.place(strategy.root_device, trainer.precision_plugin.convert_module)
        if stage == "fit" and not self.teacher_sharded:
            self._fingerprint = None  # taken again for this fit, when first needed
        if cache is not None and self._fingerprint is None:
            self._fingerprint = self._weights_fingerprint()  # placed (its dtype counts), not yet sharded
        self.teacher_sharded = self._runner.shard(kind, type(strategy).__name__, strategy.root_device)
        self._needs = client.teacher_needs()
        self._runner.set_features(self._needs.features)
        self._forward_context = trainer.precision_plugin.forward_context
        self._first_batch_checked = False
        self._accuracy_pending = self.check_accuracy
        self._first_batch = None
        client.connect_teacher(
            TeacherConnection(
                run=self._run,
                mixture=isinstance(self.teacher, TeacherMixture),
                cached=cache is not None,
                cache_top_k=None if cache is None else cache.top_k,
                owner=f"DistillationCallback({_describe(self.teacher)})",
                max_length=max_sequence_length(self.teacher)[0],
            )
        )
        self._client = client

    def _run(self, request: TeacherRequest) -> TeacherOutputs:
        """Run the teacher for ``request`` under the Trainer's precision context (never reading the cache)."""
        if isinstance(self.teacher, TeacherMixture):
            self.teacher.temperature = request.temperature
        return self._runner.run(request.inputs, self._forward_context(), features=request.features)

    def _client_for(self, pl_module: L.LightningModule) -> TeacherClient:
        """The module as a teacher client: the one ``setup`` connected, without checking the protocol again."""
        client = self._client
        if client is None or pl_module is not client:
            client = self._client = _as_client(pl_module)
        return client

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rng.fit_start(trainer)  # a resumed fit's shuffling and dropout continue the interrupted fit's streams
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
        client = self._client_for(pl_module)
        request = client.teacher_request(batch)
        outputs = self._run(request) if self.cache is None else self._cached_outputs(trainer, batch, request)
        every_step = self.check_finite and not self._needs.checks_loss  # else the module's loss check names it
        if self.cache is None and (every_step or not self._first_batch_checked):
            _check_finite(outputs.logits, trainer, batch_idx)  # a cache stores (so returns) only finite rows
        self._first_batch_checked = True
        if self._accuracy_pending and request.target is not None:  # the first batch with labels (none on-policy)
            self._accuracy_pending = False
            self._first_batch = (outputs.logits, request.target)  # scored after the step: its shape checks first
        client.set_teacher_outputs(outputs)

    def _cached_outputs(self, trainer: L.Trainer, batch: Any, request: TeacherRequest) -> TeacherOutputs:
        cache = self.cache
        assert cache is not None

        ran: list[Tensor] = []

        def run() -> Tensor:  # at most one teacher forward per batch, however many times it is asked for
            if not ran:
                ran.append(self._run(dataclasses.replace(request, features=False)).logits)
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
                request.temperature,
            )
            if not cache.open(settings, create=trainer.is_global_zero, barrier=trainer.strategy.barrier):
                raise RuntimeError(
                    f"Teacher cache {str(cache.path)!r} does not exist for global rank {trainer.global_rank} after "
                    "rank 0 created it: every process must see the same directory. HINT: on several machines put "
                    "the cache on a shared file system."
                )
        fingerprint = None if self.teacher_sharded else self._weights_fingerprint  # names the cause of a mismatch
        return cache.outputs(
            cache.rows(batch),
            run,
            trainer.current_epoch,
            trainer.strategy.root_device,
            inputs=request.inputs,
            fingerprint=fingerprint,
        )

    def _weights_fingerprint(self) -> str:
        """The teacher cache's fingerprint of the teacher: every byte of its weights, and its logits layer."""
        return teacher_weights_fingerprint(self.teacher, self._runner.logits_layer)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.cache is not None and self.cache.is_open:
            self.cache.flush()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._client_for(pl_module).set_teacher_outputs(None)
        if self._first_batch is not None:
            logits, target = self._first_batch
            self._first_batch = None
            _warn_if_chance_level(logits, target, self._needs.ignore_index, self._needs.shift_labels)

    @override
    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.run_on_validation:
            client = self._client_for(pl_module)
            request = client.teacher_request(batch)
            outputs = self._run(dataclasses.replace(request, features=False))
            if self.check_finite:  # a NaN teacher would log `kd_loss: nan` and agreement 0 as if they were measured
                stage = "validation" if trainer.validating or trainer.sanity_checking else "test"
                _check_finite(outputs.logits, trainer, batch_idx, stage)
            client.set_teacher_outputs(outputs)

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
        self._client_for(pl_module).set_teacher_outputs(None)

    # The test loop gets the same teacher run and clean-up as the validation loop.
    on_test_batch_start = on_validation_batch_start
    on_test_batch_end = on_validation_batch_end

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._disconnect(pl_module)  # Lightning runs no `teardown` after an exception

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._runner.remove_hooks()
        self._disconnect(pl_module)

    def _disconnect(self, pl_module: L.LightningModule) -> None:
        if isinstance(pl_module, TeacherClient):
            pl_module.set_teacher_outputs(None)
            pl_module.connect_teacher(None)
        self._client = None
        self._forward_context = contextlib.nullcontext

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "teacher_weights_fingerprint": self.fingerprint,
            "teacher_class": type(self.teacher).__qualname__,
            "teacher_checkpoint": self._runner.checkpoint,
            "teacher_checkpoint_prefix": self._runner.checkpoint_prefix,
            "logits_layer": self._runner.logits_layer,
            "teacher_precision": self._runner.precision,
            "teacher_device": None if self._runner.device is None else str(self._runner.device),
            "teacher_sharded": self.teacher_sharded,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # checkpoints of 0.1.0 hold a sampled "teacher_fingerprint", not comparable with this one: not checked
        self._loaded_fingerprint = state_dict.get("teacher_weights_fingerprint")

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._rng.save(checkpoint)  # the global RNG states, for a resumed fit's shuffling and dropout

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._rng.load(checkpoint)  # restored in on_fit_start if this fit resumes from the checkpoint

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rng.train_start(trainer)  # warns when a mid-epoch resume cannot continue the epoch's batches


def _as_client(pl_module: L.LightningModule) -> TeacherClient:
    if not isinstance(pl_module, TeacherClient):
        raise TypeError(
            f"DistillationCallback needs a DistillModule, got {type(pl_module).__name__} (a module that is no "
            "`lightning_distill._contract.TeacherClient`). HINT: subclass `lightning_distill.DistillModule`, or wrap "
            "your network: `DistillModule(student=net, ...)`."
        )
    return pl_module


def _runner_from(
    teacher: nn.Module | TeacherRunner | None,
    teachers: Mapping[str, nn.Module] | None,
    weights: Mapping[str, float] | None,
    placement: dict[str, Any],
) -> TeacherRunner:
    """The teacher's runner: ``teacher`` itself, or one built from a model and the deprecated keywords (warning)."""
    given = {name: value for name, value in placement.items() if value is not None}
    if isinstance(teacher, TeacherRunner):
        old = [*given, *(["teachers"] if teachers is not None else []), *(["weights"] if weights is not None else [])]
        if old:
            raise ValueError(
                f"The teacher is a TeacherRunner, which holds its own placement, so DistillationCallback takes no "
                f"`{'`, `'.join(old)}` as well. HINT: give them to the TeacherRunner: `TeacherRunner(teacher, "
                f"{', '.join(f'{_RUNNER_KEYWORDS.get(k, k)}=...' for k in old)})`."
            )
        return teacher
    if (teacher is None) == (teachers is None):
        raise ValueError(
            "Pass exactly one of `teacher` (a model, a TeacherMixture or a TeacherRunner) and the deprecated "
            f"`teachers`, got teacher={type(teacher).__name__} and teachers={type(teachers).__name__}. HINT: "
            "`DistillationCallback(teacher)`, or `DistillationCallback(TeacherMixture({'a': t1, 'b': t2}))`."
        )
    if teachers is None and weights is not None:
        raise ValueError(
            "`weights` weighs several `teachers`; with one `teacher` leave it None. HINT: weigh a mixture's teachers "
            "in it: `TeacherMixture({'a': t1, 'b': t2}, weights={'a': 0.7, 'b': 0.3})`."
        )
    if "teacher_checkpoint" in given and not isinstance(given["teacher_checkpoint"], (str, Path)):
        raise TypeError(
            f"`teacher_checkpoint` must be a path (str or Path), got {type(given['teacher_checkpoint']).__name__}."
        )
    if given or teachers is not None:
        rank_zero_deprecation(_deprecation_message(teachers, weights, given), stacklevel=7)  # at the caller
    model = TeacherMixture(teachers, weights) if teachers is not None else teacher
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`teacher` must be a torch.nn.Module or a TeacherRunner, got {type(model).__name__}. HINT: "
            "`DistillationCallback(my_model)`."
        )
    return TeacherRunner(model, **{_RUNNER_KEYWORDS[name]: value for name, value in given.items()})


def _deprecation_message(
    teachers: Mapping[str, nn.Module] | None, weights: Mapping[str, float] | None, given: dict[str, Any]
) -> str:
    """``"`DistillationCallback(<old>)` is deprecated: pass `DistillationCallback(<new>)`"``, spelled out."""
    placement = [f"{name}={_spell(value)}" for name, value in given.items()]
    runner = [f"{_RUNNER_KEYWORDS[name]}={_spell(value)}" for name, value in given.items()]
    if teachers is None:
        old, model = ["teacher"], "teacher"
    else:
        models = "{" + ", ".join(f"{name!r}: ..." for name in teachers) + "}"
        old = [f"teachers={models}", *([] if weights is None else [f"weights={dict(weights)!r}"])]
        model = f"TeacherMixture({models}{'' if weights is None else f', weights={dict(weights)!r}'})"
    new = f"TeacherRunner({', '.join([model, *runner])})" if runner else model
    names = ", ".join(name for name in ("TeacherMixture", "TeacherRunner") if name in new)
    return (
        f"`DistillationCallback({', '.join([*old, *placement])})` is deprecated: pass `DistillationCallback({new})` "
        f"(`from lightning_distill import {names}`); the old keywords are removed in the next release."
    )


def _spell(value: Any) -> str:
    """A keyword value as it is written in code: classes by name, paths and devices as strings."""
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, (Path, torch.device)):
        return repr(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_spell(v) for v in value) + "]"
    return repr(value)


def _describe(teacher: nn.Module) -> str:
    """The teacher's class, or for a mixture each teacher's name and class (the callback's state key)."""
    if isinstance(teacher, TeacherMixture):
        return ",".join(f"{name}:{type(t).__qualname__}" for name, t in teacher.teachers.items())
    return type(teacher).__qualname__


def _check_finite(logits: Tensor, trainer: L.Trainer, batch_idx: int, stage: str = "training") -> None:
    """Raise if the teacher's logits hold NaN or +inf, or a row that is all ``-inf`` (one synchronisation).

    A ``-inf`` logit on its own is a masked class (a padded vocabulary, a constrained output), not a fault.
    """
    bad = logits.isnan() | logits.isposinf()
    empty = logits.isneginf().all(-1)
    if bool(bad.any() | empty.any()):
        found = f"{int(bad.sum())} NaN/+inf value(s) and {int(empty.sum())} all -inf row(s)"
        raise FloatingPointError(
            f"The teacher's logits contain {found} out of {logits.numel()} values on {stage} batch {batch_idx} "
            f"(global step {trainer.global_step}, epoch {trainer.current_epoch}), so nothing was computed from them. "
            "HINT: check the teacher's checkpoint and the input batch; under 16-mixed precision, try bf16-mixed or "
            "32-true. `DistillationCallback(check_finite=False)` turns this check off."
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
        "weights with `DistillationCallback(TeacherRunner(teacher, checkpoint=...))`."
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
