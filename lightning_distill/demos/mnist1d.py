"""MNIST-1D as a LightningDataModule, generated locally (no download).

MNIST-1D (Greydanus, 2020) is a procedurally generated 1-D stand-in for MNIST: 10 classes, signals of length 40,
4000 training and 1000 test samples. It is small enough to train a teacher and a student on a CPU in seconds, yet
a CNN clearly beats an MLP on it, which leaves room for distillation to help.
"""

from __future__ import annotations

import os
import random
from functools import lru_cache
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset, default_collate

from lightning_distill.data import ResumableDataLoader

__all__ = ["MNIST1DDataModule"]

_NUM_TRAIN = 4000
_NUM_TEST = 1000
_MAX_SEED = 2**32 - 1  # numpy's seed range; MNIST-1D seeds numpy with it


def _check_int(name: str, value: object, *, minimum: int, maximum: int | None = None, hint: str = "") -> int:
    """Return ``value`` if it is an ``int`` (not a ``bool``) in ``[minimum, maximum]``, else raise ``ValueError``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        valid = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        message = f"`{name}` must be an integer {valid}, got {value!r}"
        raise ValueError(f"{message}. HINT: {hint}" if hint else message)
    return value


@lru_cache(maxsize=8)
def _generate(data_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Generate the canonical MNIST-1D split for ``data_seed``: ``(x_train, y_train, x_test, y_test)``.

    ``make_dataset`` reseeds Python's ``random`` and NumPy's global generator; both states are restored afterwards,
    so generating data does not perturb the caller's random streams. The arrays are cached per seed and marked
    read-only; callers copy them.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:
        raise ImportError(
            "MNIST1DDataModule needs the `mnist1d` package, which is not installed."
            " HINT: pip install 'lightning-distill[demo]'"
        ) from err
    args = get_dataset_args()
    args.seed = data_seed
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    arrays = (data["x"], data["y"], data["x_test"], data["y_test"])
    for array in arrays:
        array.setflags(write=False)
    return arrays


def _collate_pair(samples: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Collate ``(x, y)`` samples into an ``(x, y)`` tuple (``default_collate`` alone returns a list)."""
    x, y = default_collate(samples)
    return x, y


class MNIST1DDataModule(L.LightningDataModule):
    """MNIST-1D, generated in-process with ``mnist1d.data.make_dataset`` (nothing is downloaded).

    Splits: the canonical 4000 training / 1000 test samples for ``data_seed``. MNIST-1D has no separate
    validation set, so by default ``val_dataloader`` serves the held-out **test** split, as the published
    baselines report test accuracy. Pass ``val_size > 0`` to carve a validation set from the *end* of the
    training split instead (the training set then comes from the remaining samples), which keeps the test
    split untouched for model selection. ``test_dataloader`` and ``predict_dataloader`` always serve the test
    split. Batches are ``(x, y)`` tuples: ``x`` float32 of shape ``(B, 40)``, ``y`` int64 of shape ``(B,)``.

    Normalization: with ``normalize=True`` every split is standardised with the scalar mean and standard
    deviation of the training samples actually used (after ``num_train`` / ``val_size``), so the training inputs
    have mean 0 and std 1. A single scalar (not one per position) keeps the signal's shape intact.
    ``make_dataset`` already standardises the whole data set, so this changes little for the full split but
    keeps subsets well scaled. The statistics are exposed as ``mean`` and ``std`` after ``setup``.

    Shuffling: the training loader is a :class:`~lightning_distill.ResumableDataLoader` seeded with ``shuffle_seed``
    or, when that is ``None``, with the seed of :func:`lightning.seed_everything` (``PL_GLOBAL_SEED``); if neither
    is set a seed is drawn from torch's global generator. The order of epoch ``k`` depends only on that seed and
    ``k`` (Lightning calls the sampler's ``set_epoch``; a plain loop gets the next epoch's order every complete
    pass), so runs are reproducible under ``seed_everything``, and a run resumed from a checkpoint, even one saved
    inside an epoch, sees the same batches as an uninterrupted one. Under DDP each process gets its share of every
    epoch's order.

    Generation takes about a second and is cached per ``data_seed`` for the life of the process. It does not
    change the state of Python's ``random`` or NumPy's global generator (``make_dataset`` reseeds both; they are
    restored).

    Args:
        data_seed: Seed of the data generator (``args.seed`` of MNIST-1D; 42 is the published data set).
        num_train: Use only the first ``num_train`` training samples (``None``: all that remain after
            ``val_size``).
        num_test: Use only the first ``num_test`` test samples (``None``: all 1000).
        val_size: Number of training samples held out as the validation split; 0 serves the test split.
        batch_size: Batch size of every loader.
        num_workers: ``DataLoader`` worker processes (the data sit in memory; 0 is usually fastest).
        normalize: Standardise with the training mean and std (see above).
        shuffle_seed: Seed of the training order; ``None`` follows ``seed_everything`` (see above).

    Raises:
        ValueError: If an argument is out of range or of the wrong type; the message names the value.
        ImportError: In ``setup`` if ``mnist1d`` is not installed (``pip install 'lightning-distill[demo]'``).

    Example::

        >>> dm = MNIST1DDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, x.dtype, y.shape, y.dtype
        (torch.Size([32, 40]), torch.float32, torch.Size([32]), torch.int64)
        >>> len(dm.train_set), len(dm.val_set), len(dm.test_set)
        (4000, 1000, 1000)
    """

    num_classes: int = 10
    input_length: int = 40

    def __init__(
        self,
        data_seed: int = 42,
        num_train: int | None = None,
        num_test: int | None = None,
        val_size: int = 0,
        batch_size: int = 100,
        num_workers: int = 0,
        normalize: bool = True,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__()
        self.data_seed = _check_int("data_seed", data_seed, minimum=0, maximum=_MAX_SEED)
        self.val_size = _check_int(
            "val_size", val_size, minimum=0, maximum=_NUM_TRAIN - 1, hint="at least one training sample must remain"
        )
        available = _NUM_TRAIN - val_size
        self.num_train = (
            None
            if num_train is None
            else _check_int(
                "num_train",
                num_train,
                minimum=1,
                maximum=available,
                hint=f"MNIST-1D has {_NUM_TRAIN} training samples and `val_size={val_size}` of them are held out"
                " for validation; pass `num_train=None` to use all the rest",
            )
        )
        self.num_test = (
            None
            if num_test is None
            else _check_int(
                "num_test",
                num_test,
                minimum=1,
                maximum=_NUM_TEST,
                hint=f"MNIST-1D has {_NUM_TEST} test samples; pass `num_test=None` to use all of them",
            )
        )
        self.batch_size = _check_int("batch_size", batch_size, minimum=1)
        self.num_workers = _check_int("num_workers", num_workers, minimum=0)
        if not isinstance(normalize, bool):
            raise ValueError(f"`normalize` must be a bool, got {normalize!r}")
        self.normalize = normalize
        self.shuffle_seed = (
            None if shuffle_seed is None else _check_int("shuffle_seed", shuffle_seed, minimum=0, maximum=_MAX_SEED)
        )
        self.save_hyperparameters()
        self.mean: float | None = None
        self.std: float | None = None
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def prepare_data(self) -> None:
        """Do nothing: MNIST-1D is generated in ``setup``, there is nothing to download."""

    def setup(self, stage: str | None = None) -> None:
        """Generate (or fetch from the per-process cache) the data and build the three splits.

        Every stage builds every split; this is cheap and makes the datamodule usable for any stage.

        Args:
            stage: The Lightning stage (``"fit"``, ``"validate"``, ``"test"``, ``"predict"``) or ``None``.

        Raises:
            ImportError: If the ``mnist1d`` package is not installed.
        """
        x_train, y_train, x_test, y_test = _generate(self.data_seed)
        end = _NUM_TRAIN - self.val_size
        train_end = end if self.num_train is None else self.num_train
        test_end = _NUM_TEST if self.num_test is None else self.num_test
        x_fit = torch.tensor(x_train[:train_end], dtype=torch.float32)
        x_val = torch.tensor(x_train[end:], dtype=torch.float32)
        x_eval = torch.tensor(x_test[:test_end], dtype=torch.float32)
        if self.normalize:
            self.mean = float(x_fit.mean())
            self.std = float(x_fit.std())
            if self.std == 0.0:  # a single sample of a constant signal; avoid dividing by zero
                self.std = 1.0
            x_fit, x_val, x_eval = ((x - self.mean) / self.std for x in (x_fit, x_val, x_eval))
        self.train_set = TensorDataset(x_fit, torch.tensor(y_train[:train_end], dtype=torch.int64))
        self.test_set = TensorDataset(x_eval, torch.tensor(y_test[:test_end], dtype=torch.int64))
        self.val_set = (
            TensorDataset(x_val, torch.tensor(y_train[end:], dtype=torch.int64)) if self.val_size else self.test_set
        )

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """Shuffled training batches ``(x, y)``; see the class docstring for how the order is seeded."""
        dataset = self._require(self.train_set)
        return self._loader(dataset, seed=self._resolve_shuffle_seed())

    def val_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """Validation batches ``(x, y)`` in a fixed order: the test split unless ``val_size > 0``."""
        return self._loader(self._require(self.val_set))

    def test_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """Test batches ``(x, y)`` in a fixed order."""
        return self._loader(self._require(self.test_set))

    def predict_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """Test-split batches ``(x, y)`` in a fixed order, for ``Trainer.predict``."""
        return self._loader(self._require(self.test_set))

    def _resolve_shuffle_seed(self) -> int:
        if self.shuffle_seed is not None:
            return self.shuffle_seed
        global_seed = os.environ.get("PL_GLOBAL_SEED")
        if global_seed is not None:
            return int(global_seed)
        return int(torch.empty((), dtype=torch.int64).random_(0, _MAX_SEED).item())

    def _loader(self, dataset: TensorDataset, seed: int | None = None) -> DataLoader[tuple[Tensor, ...]]:
        """A loader in dataset order, or with a ``seed`` the resumable shuffled training loader."""
        kwargs: dict[str, Any] = dict(
            batch_size=self.batch_size,
            collate_fn=_collate_pair,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
        if seed is None:
            return DataLoader(dataset, **kwargs)
        return ResumableDataLoader(dataset, shuffle=True, seed=seed, **kwargs)

    @staticmethod
    def _require(dataset: TensorDataset | None) -> TensorDataset:
        if dataset is None:
            raise RuntimeError(
                "The MNIST1DDataModule has not been set up yet. HINT: call `datamodule.setup()` first, or pass it to"
                " `trainer.fit(..., datamodule=datamodule)`, which does so."
            )
        return dataset
