"""Training data whose order survives a crash: an epoch-seeded sampler and a DataLoader that resumes mid-epoch.

A plain ``DataLoader(shuffle=True)`` draws each epoch's order from torch's global generator, and Lightning cannot tell
it where an interrupted epoch stopped: resumed from a mid-epoch checkpoint, it replays the epoch's first batches and
never trains on the rest. :class:`ResumableSampler` orders epoch ``k`` from ``(seed, k)`` alone, and
:class:`ResumableDataLoader` saves how many of that epoch's batches were trained on (Lightning puts its
``state_dict()`` in every checkpoint and loads it on resume), so a resumed fit continues with exactly the batches the
interrupted one had not reached, in the same order.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator, Sized
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

__all__ = ["ResumableDataLoader", "ResumableSampler"]

_MAX_SEED = 2**63 - 2**32  # room for ``seed + epoch`` in torch's 64-bit seed
_COMPARED = ("dataset_size", "seed", "shuffle", "drop_last", "num_replicas")  # what must match to continue a pass
_WORKER_SEED_OFFSET = 0x5EED  # worker base seeds come from ``seed + epoch + offset``, apart from the order's seed


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum and value > maximum):
        valid = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"`{name}` must be an integer {valid}, got {value!r}.")
    return value


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return value


def _default_seed() -> int:
    """``seed_everything``'s seed (``PL_GLOBAL_SEED``), as Lightning's own ``DistributedSampler`` takes it, else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0)) % _MAX_SEED


class ResumableSampler(DistributedSampler[int]):
    """Shuffles a dataset with an order that depends only on ``(seed, epoch)``, and resumes inside an epoch.

    Epoch ``k``'s order is ``DistributedSampler``'s (``torch.randperm`` seeded with ``seed + k``), whatever else drew
    from torch's global generator, so a resumed fit sees the same epochs as an uninterrupted one. Lightning calls
    :meth:`set_epoch` before every epoch; without it (a loop of your own) each *complete* pass moves to the next
    epoch, so every pass is a new permutation (an interrupted pass repeats its epoch).

    It is a ``DistributedSampler`` on purpose: Lightning and Fabric replace a ``RandomSampler`` by one under
    DDP/FSDP (``use_distributed_sampler=True``), but leave a ``DistributedSampler`` in place. The process group is
    read when an epoch starts, not at construction: with ``num_replicas`` / ``rank`` left ``None`` each process takes
    every ``world_size``-th sample of the epoch's order from its global rank (padded to equal length, or cut with
    ``drop_last``), as ``DistributedSampler`` does; outside a process group, all of it. Under tensor or pipeline
    parallelism (``ModelParallelStrategy``), where ranks of one data-parallel group must see the same samples, pass
    the data-parallel ``num_replicas`` and ``rank``.

    :meth:`state_dict` holds the epoch and how many of this process's samples of it were used; after
    :meth:`load_state_dict` the next pass of that epoch starts there. With a plain ``DataLoader`` the count is what
    the sampler handed out, which runs ahead of training when workers prefetch, and Lightning never asks a plain
    ``DataLoader`` for its state: use :class:`ResumableDataLoader`, which counts the batches actually consumed.

    Args:
        dataset: The dataset (anything with a length).
        shuffle: Shuffle (``False``: dataset order, split across processes the same way).
        seed: Seed of the orders; ``None`` takes ``seed_everything``'s (``PL_GLOBAL_SEED``) or 0, as Lightning's
            ``DistributedSampler`` does.
        drop_last: Cut the order to a multiple of ``num_replicas`` instead of padding it with repeated samples.
        num_replicas: Number of processes sharing each epoch (``None``: the process group's world size, or 1).
        rank: This process's share (``None``: its global rank, or 0).

    Raises:
        TypeError: If ``dataset`` has no length.
        ValueError: For a seed, ``num_replicas`` or ``rank`` out of range or not an integer, or a flag that is not a
            bool; the message names the value. :meth:`set_epoch` likewise for a negative epoch.

    Example::

        >>> sampler = ResumableSampler(range(6), seed=0)
        >>> first = list(sampler)
        >>> sorted(first), list(sampler) != first  # a permutation; a second complete pass is epoch 1
        ([0, 1, 2, 3, 4, 5], True)
        >>> sampler.set_epoch(0)
        >>> list(sampler) == first  # epoch 0 again: the same order
        True
        >>> [list(ResumableSampler(range(6), seed=0, num_replicas=2, rank=r)) for r in (0, 1)]  # two processes
        [[2, 3, 1], [5, 0, 4]]
    """

    def __init__(
        self,
        dataset: Sized,
        *,
        shuffle: bool = True,
        seed: int | None = None,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        # DistributedSampler.__init__ is not called: it needs the process group now, this reads it per epoch
        if not isinstance(dataset, Sized):
            raise TypeError(f"`dataset` must have a length (a map-style dataset), got {type(dataset).__name__}.")
        self.dataset = dataset  # type: ignore[assignment]
        self.shuffle = _check_bool("shuffle", shuffle)
        self.drop_last = _check_bool("drop_last", drop_last)
        self.seed = _default_seed() if seed is None else _check_int("seed", seed, 0, _MAX_SEED)
        self._replicas = None if num_replicas is None else _check_int("num_replicas", num_replicas, 1)
        self._rank = None if rank is None else _check_int("rank", rank, 0)
        if self._replicas is not None and self._rank is not None and self._rank >= self._replicas:
            raise ValueError(f"`rank` must be below `num_replicas={self._replicas}`, got {rank!r}.")
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, position) the next pass of that epoch starts at
        self._exhausted = False  # the last pass ran to its end: without set_epoch the next pass is the next epoch
        self._pass_epoch, self._position = 0, 0  # the current pass: its epoch and how many samples were used
        self._loader_pass = False  # the next pass was begun by a ResumableDataLoader, which counts its batches
        self._refresh()

    def _refresh(self) -> None:
        """Read the process group (when not given) and size this process's share as ``DistributedSampler`` does."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.num_replicas = self._replicas or (torch.distributed.get_world_size() if distributed else 1)
        self.rank = self._rank if self._rank is not None else (torch.distributed.get_rank() if distributed else 0)
        if self.rank >= self.num_replicas:
            raise ValueError(f"`rank` must be below `num_replicas={self.num_replicas}`, got {self.rank}.")
        size = len(self.dataset)  # type: ignore[arg-type]
        if self.drop_last and size % self.num_replicas:
            self.num_samples = math.ceil((size - self.num_replicas) / self.num_replicas)
        else:
            self.num_samples = math.ceil(size / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch``'s order (Lightning calls this before every epoch).

        A position restored by :meth:`load_state_dict` for another epoch is dropped: that epoch is over.
        """
        self.epoch = _check_int("epoch", epoch, 0)
        self._exhausted = False
        if self._resume is not None and self._resume[0] != epoch:
            self._resume = None

    def _begin_pass(self, by_loader: bool) -> int:
        """Start a pass: settle its epoch and return the position (samples of this process) it starts at."""
        self._refresh()
        if self._exhausted:  # a complete pass without set_epoch since: move on, as a RandomSampler would
            self.epoch += 1
            self._exhausted = False
        start = 0
        if self._resume is not None:
            start = self._resume[1]
            self._resume = None
        self._pass_epoch, self._position, self._loader_pass = self.epoch, start, by_loader
        return start

    def __iter__(self) -> Iterator[int]:
        counting = not self._loader_pass  # a ResumableDataLoader began this pass and counts what it consumes
        if counting:
            self._begin_pass(by_loader=False)
        self._loader_pass = False
        for index in itertools.islice(super().__iter__(), self._position, None):
            if counting:
                self._position += 1
            yield index
        self._exhausted = True

    def __len__(self) -> int:
        self._refresh()
        return self.num_samples

    def state_dict(self) -> dict[str, Any]:
        """The epoch, the position in it (samples of this process already used) and what the order depends on."""
        epoch, position = self._resume if self._resume is not None else (self._pass_epoch, self._position)
        return {
            "epoch": epoch,
            "position": position,
            "dataset_size": len(self.dataset),  # type: ignore[arg-type]
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "num_replicas": self.num_replicas,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from ``state_dict``: the next pass of its epoch starts at its position.

        A state of another dataset size, seed, shuffling or number of processes cannot be continued exactly: it warns
        naming what changed and starts the saved epoch from its beginning.

        Raises:
            ValueError: If ``state_dict`` is not a state of this class (a key is missing).
        """
        missing = [key for key in ("epoch", "position", *_COMPARED) if key not in state_dict]
        if missing:
            raise ValueError(f"Not a ResumableSampler state: it lacks {missing}; got keys {sorted(state_dict)}.")
        self._refresh()
        now = self.state_dict()
        changed = [f"{key} {state_dict[key]!r} -> {now[key]!r}" for key in _COMPARED if state_dict[key] != now[key]]
        epoch, position = int(state_dict["epoch"]), int(state_dict["position"])
        self.epoch, self._exhausted, self._resume = epoch, False, None
        if changed:
            rank_zero_warn(
                f"The checkpoint's data order cannot be continued exactly: {', '.join(changed)}. Epoch {epoch} "
                "restarts from its first batch. HINT: resume with the dataset, seed and number of processes the "
                "checkpoint was trained with."
            )
            position = 0
        elif position >= self.num_samples:  # that epoch is complete: the next pass is the next epoch
            self._exhausted = True
        elif position > 0:
            self._resume = (epoch, position)
        self._pass_epoch, self._position = epoch, min(position, self.num_samples)


class ResumableDataLoader(DataLoader[Any]):
    """A ``DataLoader`` over a :class:`ResumableSampler` that Lightning checkpoints and resumes mid-epoch.

    Lightning saves the ``state_dict()`` of every training loader that has one in each checkpoint and, resuming a fit
    from a checkpoint saved inside an epoch (``ModelCheckpoint(every_n_train_steps=...)``, a crash handler), loads it
    before the epoch continues. The state holds the epoch and the number of batches *consumed* (handed to training,
    counted here, so batches that workers prefetched do not count), and the resumed epoch yields exactly the batches
    not yet trained on, in the same order: with the random-number state that
    :class:`~lightning_distill.DistillationCallback` and :class:`~lightning_distill.SelfDistillModule` keep in the
    checkpoint, the resumed fit ends bit-identical to an uninterrupted one. At an epoch boundary the order alone
    matters, and it depends only on ``(seed, epoch)``.

    Every ``DataLoader`` keyword works (``num_workers``, ``collate_fn``, ``pin_memory``, ...) except ``batch_sampler``
    and ``generator``: worker seeds come from a generator of this loader's own, seeded from ``(seed, epoch)``, so the
    loader draws nothing from torch's global generator. Randomness *inside* worker processes (augmentation) restarts
    with the epoch's worker seeds on resume rather than continuing; with ``num_workers=0`` it draws from the global
    generator, which the checkpoint restores. Under DDP each process gets its share of every epoch (see
    :class:`ResumableSampler`); Lightning leaves the sampler in place and every process resumes at rank 0's position,
    the same number of batches for all. It is a training loader: Lightning rebuilds prediction loaders with a sampler
    of its own, which this refuses (predict from a plain ``DataLoader``).

    Args:
        dataset: A map-style dataset (with ``__getitem__`` and ``__len__``).
        batch_size: Samples per batch.
        shuffle: Shuffle every epoch (default ``True``; ``False`` keeps the dataset order).
        seed: Seed of the orders; ``None`` takes ``seed_everything``'s (``PL_GLOBAL_SEED``) or 0.
        sampler: A :class:`ResumableSampler` of your own (for ``drop_last`` across processes, or explicit
            ``num_replicas`` / ``rank``), instead of ``shuffle`` and ``seed``.
        **kwargs: Other ``torch.utils.data.DataLoader`` arguments.

    Raises:
        TypeError: For an iterable-style dataset, or a ``sampler`` that is not a :class:`ResumableSampler`.
        ValueError: For a ``batch_size`` that is not a positive integer, ``shuffle`` or ``seed`` together with
            ``sampler``, or a ``batch_sampler`` or ``generator`` keyword; the message names the value.

    Example::

        >>> loader = ResumableDataLoader(list(range(10)), batch_size=2, seed=0)
        >>> batches = iter(loader)
        >>> trained = [next(batches).tolist() for _ in range(2)]  # two batches, then the checkpoint
        >>> state = loader.state_dict()
        >>> state["epoch"], state["position"]
        (0, 4)
        >>> resumed = ResumableDataLoader(list(range(10)), batch_size=2, seed=0)
        >>> resumed.load_state_dict(state)  # a new process: it continues where the checkpoint was written
        >>> rest = [batch.tolist() for batch in resumed]
        >>> uninterrupted = [batch.tolist() for batch in ResumableDataLoader(list(range(10)), batch_size=2, seed=0)]
        >>> trained + rest == uninterrupted, len(rest)
        (True, 3)
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        batch_size: int = 1,
        shuffle: bool | None = None,
        *,
        seed: int | None = None,
        sampler: ResumableSampler | None = None,
        **kwargs: Any,
    ) -> None:
        for name in ("batch_sampler", "generator"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"ResumableDataLoader takes no `{name}` (got {kwargs[name]!r}): it batches its ResumableSampler "
                    "and seeds its workers itself. HINT: pass `sampler=ResumableSampler(...)` to tune the order; "
                    "predict and evaluate with a plain DataLoader."
                )
            kwargs.pop(name, None)
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                f"ResumableDataLoader needs a map-style dataset, got the iterable {type(dataset).__name__}: its "
                "position in an epoch cannot be restored. HINT: make the stream resumable itself (`state_dict`)."
            )
        _check_int("batch_size", batch_size, 1)
        if sampler is None:
            sampler = ResumableSampler(dataset, shuffle=True if shuffle is None else shuffle, seed=seed)  # type: ignore[arg-type]
        elif not isinstance(sampler, ResumableSampler):
            raise TypeError(
                f"`sampler` must be a ResumableSampler, got {type(sampler).__name__}: only its order can be resumed."
            )
        elif shuffle is not None or seed is not None:
            raise ValueError(
                f"Pass `shuffle` and `seed` to the ResumableSampler, not beside it (got shuffle={shuffle!r}, "
                f"seed={seed!r})."
            )
        super().__init__(dataset, batch_size, sampler=sampler, **kwargs)  # `generator` is made per pass
        self._resumable = sampler
        self._batch = batch_size

    def __getstate__(self) -> dict[str, Any]:
        # a torch.Generator does not survive torch.multiprocessing's pickling (ddp_spawn): the next pass makes one
        return {**self.__dict__, "generator": None}

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        # a generator, so the pass begins at the first `next`: after Lightning's `set_epoch`, with workers too
        sampler = self._resumable
        start = sampler._begin_pass(by_loader=True)
        self.generator = torch.Generator().manual_seed(sampler.seed + sampler.epoch + _WORKER_SEED_OFFSET)
        consumed = 0
        for batch in super().__iter__():
            consumed += 1
            sampler._position = min(start + consumed * self._batch, sampler.num_samples)
            yield batch
        sampler._position = sampler.num_samples  # complete (with drop_last, the cut tail counts as used)

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state at the batches consumed so far: what Lightning saves in each checkpoint."""
        return self._resumable.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from ``state_dict``: the next pass of its epoch yields the batches not yet consumed.

        Raises:
            ValueError: If ``state_dict`` is not a ResumableDataLoader state.
        """
        self._resumable.load_state_dict(state_dict)
