"""The Markov language as a LightningDataModule: causal-LM batches for ``lightning-distill fit`` and ``cache``.

The configs ``configs/markov_teacher.yaml``, ``markov_cache.yaml`` and ``markov_from_cache.yaml`` use it: train a
:class:`~lightning_distill.demos.TinyCausalLM` teacher, cache its per-token distributions over the training set,
then distill a smaller one from the cache alone.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_distill._indexed import IndexedDataset
from lightning_distill.data import ResumableDataLoader
from lightning_distill.demos.markov import MarkovDataset, MarkovLanguage, _check_int

__all__ = ["MarkovDataModule"]

_MAX_SEED = 2**63 - 1


class MarkovDataModule(L.LightningDataModule):
    """Sequences of a :class:`~lightning_distill.demos.MarkovLanguage`, split into a training and a validation set.

    Both sets are :class:`~lightning_distill.demos.MarkovDataset` samples of the same language (different seeds);
    batches are dicts of ``input_ids``, ``attention_mask`` and (unshifted) ``labels``, each ``(B, max_length)``. The
    training set is wrapped in :class:`~lightning_distill.IndexedDataset`, so its batches are
    :class:`~lightning_distill.teacher.Indexed` and it serves a :class:`~lightning_distill.TokenCache` (the pre-pass and
    the fit from the cache); the validation set is not. ``test_dataloader`` serves the validation set too.

    The training loader is a :class:`~lightning_distill.ResumableDataLoader` shuffled with ``shuffle_seed`` or, when
    that is ``None``, with :func:`lightning.seed_everything`'s seed (``PL_GLOBAL_SEED``, else 0); ``shuffle=False``
    keeps the dataset order.

    Args:
        vocab_size: Token ids of the language, ``PAD`` included (``>= 2``).
        branching: Possible next tokens of each token, in ``[1, vocab_size - 1]``.
        language_seed: Seed of the language (its transition matrix).
        num_train: Training sequences (``>= 1``).
        num_val: Validation sequences (``>= 1``).
        max_length: Longest sequence and padded length (``>= min_length``).
        min_length: Shortest sequence (``>= 2``).
        train_seed: Seed of the training sequences.
        val_seed: Seed of the validation sequences.
        batch_size: Sequences per batch (``>= 1``).
        num_workers: ``DataLoader`` worker processes (``>= 0``; the data sit in memory, 0 is usually fastest).
        shuffle: Shuffle the training set every epoch.
        shuffle_seed: Seed of the training order; ``None`` follows ``seed_everything``.

    Raises:
        ValueError: If an argument is not of its type or out of its range; the message names it and the value.

    Example::

        >>> dm = MarkovDataModule(vocab_size=16, num_train=64, num_val=16, max_length=12, min_length=4, batch_size=8)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> type(batch).__name__, batch.index.shape, sorted(batch.sample), batch.sample["input_ids"].shape
        ('Indexed', torch.Size([8]), ['attention_mask', 'input_ids', 'labels'], torch.Size([8, 12]))
        >>> len(dm.train_set), len(dm.val_set), sorted(next(iter(dm.val_dataloader())))
        (64, 16, ['attention_mask', 'input_ids', 'labels'])
    """

    def __init__(
        self,
        vocab_size: int = 64,
        branching: int = 4,
        language_seed: int = 0,
        num_train: int = 1024,
        num_val: int = 256,
        max_length: int = 32,
        min_length: int = 8,
        train_seed: int = 1,
        val_seed: int = 2,
        batch_size: int = 32,
        num_workers: int = 0,
        shuffle: bool = True,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__()
        self.language = MarkovLanguage(vocab_size, branching, language_seed)  # checks its three arguments
        self.num_train = _check_int("num_train", num_train, minimum=1)
        self.num_val = _check_int("num_val", num_val, minimum=1)
        self.min_length = _check_int("min_length", min_length, minimum=2)
        self.max_length = _check_int("max_length", max_length, minimum=min_length)
        self.train_seed = _check_int("train_seed", train_seed)
        self.val_seed = _check_int("val_seed", val_seed)
        self.batch_size = _check_int("batch_size", batch_size, minimum=1)
        self.num_workers = _check_int("num_workers", num_workers, minimum=0)
        if not isinstance(shuffle, bool):
            raise ValueError(f"`shuffle` must be True or False, got {shuffle!r}")
        self.shuffle = shuffle
        self.shuffle_seed = (
            None if shuffle_seed is None else _check_int("shuffle_seed", shuffle_seed, minimum=0, maximum=_MAX_SEED)
        )
        self.save_hyperparameters()
        self.train_set: IndexedDataset | None = None
        self.val_set: MarkovDataset | None = None

    @property
    def vocab_size(self) -> int:
        """Token ids of the language, ``PAD`` included (the models' ``vocab_size``)."""
        return self.language.vocab_size

    def setup(self, stage: str | None = None) -> None:
        """Sample both sets (every stage builds both; it takes milliseconds)."""
        if self.train_set is None:
            train = MarkovDataset(self.language, self.num_train, self.max_length, self.min_length, self.train_seed)
            self.train_set = IndexedDataset(train)
            self.val_set = MarkovDataset(self.language, self.num_val, self.max_length, self.min_length, self.val_seed)

    def train_dataloader(self) -> DataLoader[Any]:
        """Training batches, :class:`~lightning_distill.teacher.Indexed`, shuffled unless ``shuffle=False``."""
        seed = self.shuffle_seed if self.shuffle_seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        return ResumableDataLoader(self._require(self.train_set), shuffle=self.shuffle, seed=seed, **self._kwargs())

    def val_dataloader(self) -> DataLoader[dict[str, Tensor]]:
        """Validation batches in a fixed order."""
        return DataLoader(self._require(self.val_set), **self._kwargs())

    def test_dataloader(self) -> DataLoader[dict[str, Tensor]]:
        """The validation batches (the language has no separate test set: any fresh sample is one)."""
        return self.val_dataloader()

    def _kwargs(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
        }

    @staticmethod
    def _require(dataset: Any) -> Any:
        if dataset is None:
            raise RuntimeError(
                "The MarkovDataModule has not been set up yet. HINT: call `datamodule.setup()` first, or pass it to "
                "`trainer.fit(..., datamodule=datamodule)`, which does so."
            )
        return dataset
