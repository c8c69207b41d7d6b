"""Sample identity for the teacher cache: a dataset wrapper that adds each sample's index and view."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

Augment = Callable[[Any, torch.Generator], Any]
"""A random augmentation that draws all its randomness from the generator it is given."""


class Indexed(NamedTuple):
    """One sample (or, after collation, one batch) with its identity in the dataset.

    The default collate function batches it field by field, so a batch is ``Indexed(index=(B,) tensor,
    view=(B,) tensor, sample=<the collated samples>)``. ``split_batch`` reads ``sample``; the teacher cache reads
    ``index`` and ``view``. A dataset may return it itself, with an index of its own.
    """

    index: Any
    view: Any
    sample: Any


class IndexedDataset(Dataset):
    """Wrap a dataset so that every item carries its index and, with augmentation, which fixed view it is.

    With ``augment`` and ``views=K``, each access picks one of K views of the sample at random (from the DataLoader's
    seeded RNG) and applies ``augment(sample, generator)`` with a generator seeded by ``(seed, index, view)``: view v
    of sample i is the same image every epoch, so a teacher output cached for it stays valid. Without ``augment`` the
    single view is the sample itself.

    Args:
        dataset: Any map-style dataset.
        augment: Optional random augmentation taking ``(sample, generator)``; all its randomness must come from the
            generator (a cache check catches one that does not).
        views: How many fixed views per sample (``>= 1``); the cache stores one entry per view.
        seed: Seed of the views.

    Example::

        >>> ds = IndexedDataset([10, 20, 30])
        >>> ds[2]
        Indexed(index=2, view=0, sample=30)
    """

    def __init__(self, dataset: Any, augment: Augment | None = None, views: int = 1, seed: int = 0) -> None:
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise ValueError(f"`views` must be an int >= 1, got {views!r}.")
        if views > 1 and augment is None:
            raise ValueError(
                f"`views={views}` without `augment`: every view would be the same sample. HINT: pass the "
                "augmentation as `augment=fn(sample, generator)`, or use views=1."
            )
        if augment is not None and not callable(augment):
            raise TypeError(
                f"`augment` must be a callable (sample, generator) -> sample, got {type(augment).__name__}."
            )
        self.dataset = dataset
        self.augment = augment
        self.views = views
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Indexed:
        sample = self.dataset[index]
        view = int(torch.randint(self.views, ())) if self.views > 1 else 0
        if self.augment is not None:
            generator = torch.Generator().manual_seed(hash((self.seed, int(index), view)) & 0x7FFF_FFFF_FFFF_FFFF)
            sample = self.augment(sample, generator)
        return Indexed(index=index, view=view, sample=sample)

    def __getitems__(self, indices: list[int]) -> list[Indexed]:
        """The items of one batch, as ``[self[i] for i in indices]`` (the DataLoader calls this for a batch).

        Without augmentation it takes the samples in one call to the wrapped dataset's own ``__getitems__`` when it
        has one, and builds the items in one pass.
        """
        if self.augment is not None:
            return [self[i] for i in indices]
        fetch = getattr(self.dataset, "__getitems__", None)
        samples = fetch(indices) if callable(fetch) else [self.dataset[i] for i in indices]
        if len(samples) != len(indices):
            raise RuntimeError(
                f"{type(self.dataset).__name__}.__getitems__ returned {len(samples)} samples for {len(indices)} "
                "indices: it must return one sample per index, in order."
            )
        return [Indexed(index, 0, sample) for index, sample in zip(indices, samples, strict=True)]


def sample_rows(batch: Any, num_samples: int, views: int, owner: str) -> np.ndarray:
    """The cache rows (``index * views + view``) of an :class:`Indexed` batch's samples, range-checked.

    Args:
        batch: The batch.
        num_samples: The dataset's length the cache was made for.
        views: Its views.
        owner: Who asks (``"TeacherCache"``, ``"TokenCache"``), for the messages.

    Raises:
        TypeError: If the batch carries no sample identity.
        IndexError: If the indices and views differ in number, or one is out of range.

    Example::

        >>> sample_rows(Indexed(torch.tensor([0, 3]), torch.tensor([1, 0]), None), 4, 2, "TeacherCache").tolist()
        [1, 6]
    """
    if not isinstance(batch, Indexed):
        raise TypeError(
            f"{owner} needs each batch's sample indices, but the batch is a {type(batch).__name__}. HINT: wrap the "
            "training dataset: `IndexedDataset(dataset)` (from lightning_distill), in every pass that reads the cache."
        )
    index, view = _flat_int64(batch.index), _flat_int64(batch.view)
    if index.shape != view.shape:
        raise IndexError(f"A batch has {index.size} sample indices but {view.size} views.")
    if index.size and index.min() >= 0 and index.max() < num_samples and view.min() >= 0 and view.max() < views:
        return index * views + view
    bad = (index < 0) | (index >= num_samples) | (view < 0) | (view >= views)
    if bad.any():
        raise IndexError(
            f"Sample index/view out of the cache's range ({num_samples} samples x {views} views): index "
            f"{index[bad][:5].tolist()}, view {view[bad][:5].tolist()}."
        )
    return index * views + view


def _flat_int64(value: Any) -> np.ndarray:
    """A batch's sample indices (or views) as a flat int64 array on the CPU (shared with a CPU tensor, no copy)."""
    if isinstance(value, Tensor):
        if value.device.type != "cpu":
            value = value.cpu()
        return (value if value.dtype is torch.int64 else value.long()).detach().numpy().reshape(-1)
    return np.asarray(value, dtype=np.int64).reshape(-1)
