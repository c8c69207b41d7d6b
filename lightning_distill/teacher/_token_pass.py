"""TokenCachePass: the pre-pass that runs a language-model teacher once over the training set and fills a TokenCache.

``Trainer.predict(TokenCachePass(teacher, cache), dataloaders=loader, return_predictions=False)`` on any number of
processes: Lightning gives each process every world-size-th sample (its distributed sampler for prediction repeats
none), and each process appends the rows of its samples to its own shard. A pass resumed after a crash (or run again
over a grown cache) skips the batches whose rows any shard holds, so only the missing ones run the teacher.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lightning_distill._batches import split_batch
from lightning_distill._positions import logits_mask, route_inputs, token_masks
from lightning_distill.losses.functional._common import check_ignore_index, check_temperature
from lightning_distill.teacher._digest import teacher_weights_fingerprint
from lightning_distill.teacher._runner import TeacherRunner
from lightning_distill.teacher._token_cache import TokenCache, token_cache_settings, token_digests


def stored_positions(
    inputs: Any, target: Tensor | None, logits: Tensor, model: nn.Module, shift_labels: bool, ignore_index: int
) -> Tensor:
    """Bool ``(B, L)``: the positions of per-token logits a :class:`~lightning_distill.DistillModule` loss counts.

    The rule of the module's default ``position_mask`` (:func:`~lightning_distill._positions.logits_mask`): a real
    token (the attention or decoder mask) whose label is not ``ignore_index``; with ``shift_labels`` position t
    counts when token t + 1 is real and labelled (the last position never).

    Example::

        >>> logits = torch.zeros(1, 4, 5)
        >>> stored_positions({}, torch.tensor([[3, 1, -100, -100]]), logits, nn.Identity(), True, -100).tolist()
        [[True, False, False, False]]
    """
    mask = logits_mask(token_masks(inputs, target, ignore_index, model), logits)
    lead = tuple(logits.shape[:-1])
    keep = torch.ones(lead, dtype=torch.bool, device=logits.device)
    labelled = None if target is None else (target != ignore_index).to(logits.device)
    if shift_labels:
        keep[..., -1] = False
        if mask is not None:
            keep[..., :-1] &= mask[..., 1:].to(logits.device)
        if labelled is not None:
            keep[..., :-1] &= labelled[..., 1:]
        return keep
    if mask is not None:
        keep &= mask.to(logits.device)
    return keep if labelled is None else keep & labelled


class TokenCachePass(L.LightningModule):
    """Runs a frozen language-model teacher under ``Trainer.predict`` and writes its per-token top-k distributions.

    The stored positions are those a :class:`~lightning_distill.DistillModule` with the same ``shift_labels`` and
    ``ignore_index`` counts (real tokens with a label; :func:`stored_positions`), at ``temperature``; a fit from the
    cache (:class:`~lightning_distill.CachedTeacher`) refuses a module with other settings. Batches must be
    :class:`~lightning_distill.teacher.Indexed` (an :class:`~lightning_distill.IndexedDataset`), split like the module's
    (``labels`` is the target and never reaches the teacher) with the same dataset as the fit.

    After the pass, :attr:`tokens_written`, :attr:`teacher_seconds` (time in the teacher's forward) and
    :attr:`seconds` (the whole pass, this process) tell its throughput; rank 0 prints a summary.

    Args:
        teacher: The teacher, or a :class:`~lightning_distill.TeacherRunner` (its checkpoint, precision, device).
        cache: The :class:`~lightning_distill.TokenCache` to fill.
        temperature: The KD temperature the fit will use (the cache stores probabilities at it).
        shift_labels: As the student module's: causal LMs score logits at t against token t + 1.
        ignore_index: As the student module's: positions whose label is this are not stored.

    Raises:
        TypeError: For a teacher that is neither an ``nn.Module`` nor a ``TeacherRunner``, or a cache that is not a
            ``TokenCache``.
        ValueError: For a bad temperature or ``ignore_index``.
    """

    def __init__(
        self,
        teacher: nn.Module | TeacherRunner,
        cache: TokenCache,
        *,
        temperature: float = 1.0,
        shift_labels: bool = False,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        if not isinstance(teacher, (nn.Module, TeacherRunner)):
            raise TypeError(f"`teacher` must be an nn.Module or a TeacherRunner, got {type(teacher).__name__}.")
        if not isinstance(cache, TokenCache):
            raise TypeError(f"`cache` must be a TokenCache, got {type(cache).__name__}.")
        if not isinstance(shift_labels, bool):
            raise TypeError(f"`shift_labels` must be True or False, got {shift_labels!r}.")
        self._runner = teacher if isinstance(teacher, TeacherRunner) else TeacherRunner(teacher)  # not a submodule
        self.cache = cache
        self.temperature = check_temperature(temperature)
        self.shift_labels = shift_labels
        self.ignore_index = check_ignore_index(ignore_index)
        self.tokens_written = 0
        self.rows_written = 0
        self.batches_skipped = 0
        self.teacher_seconds = 0.0
        self.seconds = 0.0
        self._fingerprint: str | None = None
        self._size: tuple[int, int] | None = None
        self._started = 0.0

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher."""
        return self._runner.teacher

    @override
    def setup(self, stage: str) -> None:
        """Place the teacher on this process's device and precision, and take its fingerprint."""
        trainer = self.trainer
        self._runner.place(trainer.strategy.root_device, trainer.precision_plugin.convert_module)
        self._fingerprint = teacher_weights_fingerprint(self.teacher, self._runner.logits_layer)

    @override
    def on_predict_start(self) -> None:
        self.tokens_written = self.rows_written = self.batches_skipped = 0
        self.teacher_seconds, self._started = 0.0, time.perf_counter()
        dataset = _predict_dataset(self.trainer)
        self._size = (len(dataset), int(getattr(dataset, "views", 1)))
        if self._size[1] != 1:
            raise ValueError(
                f"TokenCachePass stores one entry per sample, but the dataset has views={self._size[1]} (an "
                "`IndexedDataset` with an augmentation draws one of its views at random on each read, so one pass "
                "cannot store every view). HINT: `IndexedDataset(dataset)` with views=1 for the token cache."
            )

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> int:
        """Run the teacher on a batch with missing rows and store them (skip a batch whose rows are all stored).

        Returns:
            The number of tokens written for the batch (0 for a skipped one).
        """
        written = self.tokens_written
        try:
            self._store(batch)
            return self.tokens_written - written
        except BaseException:
            self.cache.close()  # releases the shard's lock; what was written stays, the next pass writes the rest
            raise

    def _store(self, batch: Any) -> None:
        assert self._size is not None and self._fingerprint is not None
        rows = self.cache.rows(batch, *self._size, owner=type(self).__name__)
        opened = self.cache.settings is not None
        if opened and not self.cache.missing(rows).any():
            self.batches_skipped += 1
            return
        inputs, target = split_batch(batch)
        inputs = route_inputs(inputs, target, self.teacher)
        started = time.perf_counter()
        logits = self._runner.run(inputs, features=False).logits
        if logits.is_cuda:  # the forward runs asynchronously: wait for it, or its time is charged to the encoding
            torch.cuda.synchronize(logits.device)
        self.teacher_seconds += time.perf_counter() - started
        if logits.ndim != 3:
            raise ValueError(
                f"TokenCache stores per-token logits (B, L, V), but the teacher returned {tuple(logits.shape)}. "
                "HINT: for one logits row per sample use `TeacherCache` with `DistillationCallback(cache=...)`."
            )
        if not opened:
            settings = token_cache_settings(
                self._fingerprint,
                *self._size,
                logits.shape[-1],
                self.cache.top_k,
                self.temperature,
                self.shift_labels,
                self.ignore_index,
            )
            self.cache.open_writer(settings, self.trainer.global_rank, self.trainer.world_size)
        digests = token_digests(inputs, len(rows))
        missing = int(self.cache.missing(rows).sum())
        if not missing:  # the first batch of a resumed pass (its rows are known once the writer is open)
            self.batches_skipped += 1
            return
        counted = stored_positions(inputs, target, logits, self.teacher, self.shift_labels, self.ignore_index)
        self.tokens_written += self.cache.write(rows, logits, counted, digests)  # the missing rows only
        self.rows_written += missing

    @override
    def on_predict_end(self) -> None:
        self.cache.close()
        self.seconds = time.perf_counter() - self._started
        rate = self.tokens_written / self.seconds if self.seconds > 0 else float("nan")
        rank_zero_info(
            f"TokenCachePass (rank 0, its own shard): {self.rows_written} samples, {self.tokens_written} tokens "
            f"written to {str(self.cache.path)!r} in {self.seconds:.1f} s ({rate:,.0f} tokens/s; teacher forward "
            f"{self.teacher_seconds:.1f} s); {self.batches_skipped} batches already stored."
        )

    @override
    def configure_optimizers(self) -> Any:
        return None

    @override
    def configure_callbacks(self) -> list[L.Callback]:
        """A callback that closes the writer (releasing the shard's lock) when the pass fails outside its step."""
        return [_CloseOnFailure(self.cache)]


class _CloseOnFailure(L.Callback):
    """Closes a failed pre-pass's writer, releasing the shard's lock for the next pass of this process.

    Lightning calls no module hook when the pass fails outside its step (a DataLoader raising), only callbacks'.
    """

    def __init__(self, cache: TokenCache) -> None:
        self.cache = cache

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.cache.close()


def _predict_dataset(trainer: L.Trainer) -> Any:
    """The dataset of the (one) prediction DataLoader: the training set the cache is for."""
    loaders = trainer.predict_dataloaders
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    if len(loaders) != 1 or getattr(loaders[0], "dataset", None) is None:
        raise ValueError(
            f"TokenCachePass runs over one DataLoader of the training set, got {len(loaders)}. HINT: "
            "`trainer.predict(TokenCachePass(...), dataloaders=DataLoader(IndexedDataset(train_set), ...))`."
        )
    dataset = loaders[0].dataset
    try:
        len(dataset)
    except TypeError as err:
        raise TypeError("TokenCachePass needs a map-style dataset with a length (sized for the cache).") from err
    return dataset
