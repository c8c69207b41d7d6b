"""Data modules for the demos and benchmarks."""

from lightning_distill.data.indexed import Indexed, IndexedDataset
from lightning_distill.data.mnist1d import MNIST1DDataModule

__all__ = ["Indexed", "IndexedDataset", "MNIST1DDataModule"]
