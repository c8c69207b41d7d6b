"""Tests for MNIST1DDataModule, checked against MNIST-1D's own generator and plain numpy/torch references."""

from __future__ import annotations

import random
import sys

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

import lightning_distill.demos.mnist1d as mnist1d_module
from lightning_distill.demos import MNIST1DDataModule
from tests.helpers.tiny import make_trainer

mnist1d_data = pytest.importorskip("mnist1d.data")


def _reference(seed: int = 42) -> dict[str, np.ndarray]:
    """MNIST-1D straight from its generator (this reseeds the global RNGs; only call it in tests)."""
    args = mnist1d_data.get_dataset_args()
    args.seed = seed
    return mnist1d_data.make_dataset(args)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    return _reference(42)


@pytest.fixture(scope="module")
def dm() -> MNIST1DDataModule:
    datamodule = MNIST1DDataModule()
    datamodule.setup("fit")
    return datamodule


def _all(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_shapes_dtypes_and_sizes(dm: MNIST1DDataModule) -> None:
    assert dm.num_classes == 10 and dm.input_length == 40
    assert dm.train_set is not None and dm.test_set is not None
    x, y = dm.train_set.tensors
    assert x.shape == (4000, 40) and x.dtype == torch.float32
    assert y.shape == (4000,) and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10))
    x_test, y_test = dm.test_set.tensors
    assert x_test.shape == (1000, 40) and y_test.shape == (1000,)
    # no separate validation split by default: validation runs on the held-out test split
    assert dm.val_set is dm.test_set


def test_batches_are_xy_tuples(dm: MNIST1DDataModule) -> None:
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        batch = next(iter(loader))
        assert isinstance(batch, tuple) and len(batch) == 2
        x, y = batch
        assert x.shape == (100, 40) and x.dtype == torch.float32
        assert y.shape == (100,) and y.dtype == torch.int64
    assert len(dm.train_dataloader()) == 40 and len(dm.val_dataloader()) == 10


def test_matches_mnist1d_generator(reference: dict[str, np.ndarray]) -> None:
    dm = MNIST1DDataModule(normalize=False)
    dm.setup()
    assert dm.train_set is not None and dm.test_set is not None
    np.testing.assert_array_equal(dm.train_set.tensors[0].numpy(), reference["x"].astype(np.float32))
    np.testing.assert_array_equal(dm.train_set.tensors[1].numpy(), reference["y"])
    np.testing.assert_array_equal(dm.test_set.tensors[0].numpy(), reference["x_test"].astype(np.float32))
    np.testing.assert_array_equal(dm.test_set.tensors[1].numpy(), reference["y_test"])


def test_normalization_uses_train_statistics(dm: MNIST1DDataModule, reference: dict[str, np.ndarray]) -> None:
    assert dm.train_set is not None and dm.test_set is not None
    x = dm.train_set.tensors[0]
    assert abs(float(x.mean())) < 1e-5
    assert float(x.std()) == pytest.approx(1.0, abs=1e-5)
    mean, std = reference["x"].mean(), reference["x"].std(ddof=1)
    assert dm.mean == pytest.approx(mean, abs=1e-5) and dm.std == pytest.approx(std, rel=1e-5)
    np.testing.assert_allclose(dm.test_set.tensors[0].numpy(), (reference["x_test"] - mean) / std, atol=1e-5)


def test_normalization_of_a_subset() -> None:
    dm = MNIST1DDataModule(num_train=100)
    dm.setup()
    assert dm.train_set is not None
    x = dm.train_set.tensors[0]
    assert abs(float(x.mean())) < 1e-5 and float(x.std()) == pytest.approx(1.0, abs=1e-5)


def test_generation_leaves_the_callers_rngs_alone() -> None:
    random.seed(123)
    np.random.seed(123)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    misses = mnist1d_module._generate.cache_info().misses
    dm = MNIST1DDataModule(data_seed=7)  # also used by the next tests; whichever runs first generates it
    dm.setup()
    if mnist1d_module._generate.cache_info().misses == misses:  # it was cached: generate again, uncached
        mnist1d_module._generate.__wrapped__(7)
    assert random.getstate() == python_state
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and after[2:] == numpy_state[2:]
    np.testing.assert_array_equal(after[1], numpy_state[1])


def test_same_seed_gives_identical_data_and_other_seed_differs(dm: MNIST1DDataModule) -> None:
    again = MNIST1DDataModule(data_seed=42)
    again.setup()
    other = MNIST1DDataModule(data_seed=7)
    other.setup()
    assert dm.train_set is not None and again.train_set is not None and other.train_set is not None
    for a, b in zip(dm.train_set.tensors, again.train_set.tensors, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(dm.train_set.tensors[0], other.train_set.tensors[0])


def test_generation_is_cached_per_seed() -> None:
    MNIST1DDataModule(data_seed=7).setup()
    info = mnist1d_module._generate.cache_info()
    MNIST1DDataModule(data_seed=7).setup()
    after = mnist1d_module._generate.cache_info()
    assert after.hits == info.hits + 1 and after.misses == info.misses


def test_subsets_are_prefixes(dm: MNIST1DDataModule) -> None:
    small = MNIST1DDataModule(num_train=500, num_test=200, normalize=False)
    small.setup()
    full = MNIST1DDataModule(normalize=False)
    full.setup()
    assert small.train_set is not None and small.test_set is not None
    assert full.train_set is not None and full.test_set is not None
    assert len(small.train_set) == 500 and len(small.test_set) == 200
    assert torch.equal(small.train_set.tensors[0], full.train_set.tensors[0][:500])
    assert torch.equal(small.test_set.tensors[1], full.test_set.tensors[1][:200])


def test_val_size_holds_out_the_end_of_the_training_split() -> None:
    dm = MNIST1DDataModule(val_size=500, normalize=False)
    dm.setup()
    full = MNIST1DDataModule(normalize=False)
    full.setup()
    assert dm.train_set is not None and dm.val_set is not None and dm.test_set is not None
    assert full.train_set is not None and full.test_set is not None
    assert len(dm.train_set) == 3500 and len(dm.val_set) == 500 and len(dm.test_set) == 1000
    assert torch.equal(dm.train_set.tensors[0], full.train_set.tensors[0][:3500])
    assert torch.equal(dm.val_set.tensors[0], full.train_set.tensors[0][3500:])
    assert torch.equal(dm.test_set.tensors[0], full.test_set.tensors[0])
    assert torch.equal(_all(dm.val_dataloader())[0], full.train_set.tensors[0][3500:])


def test_eval_loaders_keep_dataset_order(dm: MNIST1DDataModule) -> None:
    assert dm.test_set is not None
    x, y = _all(dm.test_dataloader())
    assert torch.equal(x, dm.test_set.tensors[0]) and torch.equal(y, dm.test_set.tensors[1])


def test_train_loader_shuffles_reproducibly(dm: MNIST1DDataModule) -> None:
    assert dm.train_set is not None
    seeded = MNIST1DDataModule(shuffle_seed=5)
    seeded.setup()
    loader = seeded.train_dataloader()
    first, second = _all(loader)[1], _all(loader)[1]
    assert not torch.equal(first, second)  # a plain loop still gets a new order every pass
    # the same permutation of the same labels
    assert torch.equal(first.sort().values, dm.train_set.tensors[1].sort().values)
    # epoch k's order depends only on (seed, k), as DistributedSampler's does
    for epoch in (0, 3):
        expected = torch.randperm(4000, generator=torch.Generator().manual_seed(5 + epoch))
        for _ in range(2):
            loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
            assert torch.equal(_all(loader)[1], dm.train_set.tensors[1][expected])


def test_shuffle_seed_follows_seed_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "11")
    implicit = MNIST1DDataModule()
    implicit.setup()
    explicit = MNIST1DDataModule(shuffle_seed=11)
    explicit.setup()
    assert torch.equal(_all(implicit.train_dataloader())[1], _all(explicit.train_dataloader())[1])


class _Recorder(L.LightningModule):
    """Tiny model that records the labels of the first training batch of each epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(40, 10)
        self.first_labels: list[torch.Tensor] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if batch_idx == 0:
            self.first_labels.append(y.clone())
        return nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path: object) -> list[torch.Tensor]:
    L.seed_everything(3, verbose=False)
    model = _Recorder()
    trainer = make_trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, datamodule=MNIST1DDataModule(num_train=400, num_test=100))
    return model.first_labels


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_lightning_fit_is_reproducible_and_reshuffles_each_epoch(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # seed_everything sets it; restored after the test
    first_run, second_run = _fit(tmp_path), _fit(tmp_path)
    assert len(first_run) == 2
    assert not torch.equal(first_run[0], first_run[1])
    for a, b in zip(first_run, second_run, strict=True):
        assert torch.equal(a, b)
    # Lightning called set_epoch: epoch k used the permutation seeded with seed + k
    reference = MNIST1DDataModule(num_train=400)
    reference.setup()
    assert reference.train_set is not None
    for epoch, labels in enumerate(first_run):
        order = torch.randperm(400, generator=torch.Generator().manual_seed(3 + epoch))
        assert torch.equal(labels, reference.train_set.tensors[1][order[:100]])


def test_loaders_before_setup_raise() -> None:
    with pytest.raises(RuntimeError, match=r"not been set up.*setup\(\)"):
        MNIST1DDataModule().train_dataloader()


def test_prepare_data_downloads_nothing() -> None:
    dm = MNIST1DDataModule()
    dm.prepare_data()
    assert dm.train_set is None


def test_missing_mnist1d_raises_a_helpful_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match=r"pip install 'lightning-distill\[demo\]'"):
        MNIST1DDataModule(data_seed=31337).setup()  # a seed no other test uses, so not cached


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"data_seed": -1}, r"`data_seed` must be an integer in \[0, 4294967295\], got -1"),
        ({"data_seed": 2**32}, r"`data_seed` .* got 4294967296"),
        ({"data_seed": "42"}, r"`data_seed` .* got '42'"),
        ({"data_seed": True}, r"`data_seed` .* got True"),
        ({"num_train": 0}, r"`num_train` must be an integer in \[1, 4000\], got 0"),
        ({"num_train": 4001}, r"`num_train` .* got 4001.*HINT"),
        (
            {"num_train": 3600, "val_size": 500},
            r"`num_train` must be an integer in \[1, 3500\], got 3600.*val_size=500",
        ),
        ({"num_train": 10.0}, r"`num_train` .* got 10\.0"),
        ({"num_test": 0}, r"`num_test` .* got 0"),
        ({"num_test": 1001}, r"`num_test` must be an integer in \[1, 1000\], got 1001"),
        ({"val_size": -1}, r"`val_size` .* got -1"),
        ({"val_size": 4000}, r"`val_size` .* got 4000.*HINT"),
        ({"batch_size": 0}, r"`batch_size` must be an integer >= 1, got 0"),
        ({"num_workers": -1}, r"`num_workers` must be an integer >= 0, got -1"),
        ({"normalize": "yes"}, r"`normalize` must be a bool, got 'yes'"),
        ({"shuffle_seed": -5}, r"`shuffle_seed` .* got -5"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MNIST1DDataModule(**kwargs)  # type: ignore[arg-type]
