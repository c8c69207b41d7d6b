"""CachedTeacher: a fit that learns from a TokenCache the pre-pass wrote, with no teacher model at all."""

from __future__ import annotations

from typing import Any

import lightning as L
from typing_extensions import override

from lightning_distill._contract import TeacherClient, TeacherConnection, TeacherRequest
from lightning_distill._rng import ResumeRng
from lightning_distill.teacher._runner import TeacherOutputs
from lightning_distill.teacher._token_cache import TokenCache, token_digests

__all__ = ["CachedTeacher"]


class CachedTeacher(L.Callback):
    """Stands in for the teacher: hands a :class:`~lightning_distill.DistillModule` its cached distributions.

    ``Trainer(callbacks=[CachedTeacher(TokenCache("runs/gpt2-top16"))])``: each training batch's rows are read from
    the cache (checked against their checksums and the digests of the batch's teacher inputs) and given to the module
    as a top-k teacher, so the loss is the top-k KL of :mod:`~lightning_distill.losses.functional.topk` plus the task
    term; the teacher is never built or loaded. Validation and test log the student's metrics only (there is no
    teacher to score). The cache must have been written by :class:`~lightning_distill.TokenCachePass` for this
    training set (the same length and views), the module's ``shift_labels``, ``ignore_index`` and (constant)
    temperature, and ``divergence="kl"``; every batch must be :class:`~lightning_distill.teacher.Indexed`. Like
    :class:`~lightning_distill.DistillationCallback` it keeps the global RNG states in checkpoints, so a resumed fit
    continues exactly (see "Resuming exactly" in the README).

    Args:
        cache: The :class:`~lightning_distill.TokenCache` to read.

    Raises:
        TypeError: If ``cache`` is not a ``TokenCache``.
    """

    def __init__(self, cache: TokenCache) -> None:
        if not isinstance(cache, TokenCache):
            raise TypeError(
                f"`cache` must be a TokenCache, got {type(cache).__name__}. HINT: a classification TeacherCache is "
                "filled during the fit: `DistillationCallback(teacher, cache=TeacherCache(...))`."
            )
        self.cache = cache
        self._client: TeacherClient | None = None
        self._size: tuple[int, int] | None = None
        self._temperature: float | None = None
        self._rng = ResumeRng(type(self).__name__)  # the global RNG states, kept in checkpoints for resume

    @property
    def state_key(self) -> str:
        """Key of this callback's (empty) state in a checkpoint: one per cache directory."""
        return self._generate_state_key(cache=str(self.cache.path))

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return  # only training steps read the cache
        if not isinstance(pl_module, TeacherClient):
            raise TypeError(
                f"CachedTeacher needs a DistillModule, got {type(pl_module).__name__}. HINT: subclass "
                "`lightning_distill.DistillModule`, or wrap your network: `DistillModule(student=net, ...)`."
            )
        pl_module.connect_teacher(
            TeacherConnection(
                run=self._no_teacher, cached=True, cache_top_k=self.cache.top_k, owner=f"{type(self).__name__}"
            )
        )
        self._client = pl_module

    @staticmethod
    def _no_teacher(request: TeacherRequest) -> TeacherOutputs:
        raise RuntimeError(
            "CachedTeacher has no teacher to run: a fit from a TokenCache gets its teacher's outputs in the training "
            "batch hooks only (the Tuner's searches, which run without callbacks, and feature maps cannot use it). "
            "HINT: tune with `DistillationCallback(teacher)`, or pass the batch size and learning rate yourself."
        )

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._rng.save(checkpoint)  # as DistillationCallback: a resumed fit's shuffling and dropout continue exactly

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._rng.load(checkpoint)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rng.fit_start(trainer)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Open the cache and check it against this fit: the training set's size and the module's target rules."""
        self._rng.train_start(trainer)  # warns when a mid-epoch resume cannot continue the epoch's batches
        assert self._client is not None
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        if dataset is None:
            raise TypeError("CachedTeacher needs the training DataLoader's dataset to check the cache against.")
        needs = self._client.teacher_needs()
        self._size = (len(dataset), int(getattr(dataset, "views", 1)))
        expected = {
            "num_samples": self._size[0],
            "views": self._size[1],
            "shift_labels": needs.shift_labels,
            "ignore_index": needs.ignore_index,
        }
        self._temperature = float(self.cache.open_reader(expected)["temperature"])

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        assert self._client is not None and self._size is not None
        request = self._client.teacher_request(batch)
        if request.temperature != self._temperature:
            raise ValueError(
                f"The token cache {str(self.cache.path)!r} stores probabilities at temperature {self._temperature}, "
                f"the module's temperature is {request.temperature} at step {trainer.global_step}. HINT: run the "
                f"pre-pass with `TokenCachePass(..., temperature={request.temperature})` into another directory, or "
                f"use temperature={self._temperature}."
            )
        rows = self.cache.rows(batch, *self._size)
        digests = token_digests(request.inputs, len(rows))
        topk = self.cache.load(rows, digests, trainer.strategy.root_device)
        self._client.set_teacher_outputs(TeacherOutputs(logits=topk.values, topk=topk))

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._client is not None:
            self._client.set_teacher_outputs(None)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._disconnect()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._disconnect()

    def _disconnect(self) -> None:
        if self._client is not None:
            self._client.set_teacher_outputs(None)
            self._client.connect_teacher(None)
        self._client = None
        self.cache.close()
