"""Demo data and models: MNIST-1D and a Markov language, small teachers and students, the demo runner.

As ``lightning.pytorch.demos`` for Lightning, nothing in the library imports this package: it serves the
``lightning-distill demo`` command, the notebooks, the benchmarks and the tests.
"""

from lightning_distill.demos.markov import MarkovDataset, MarkovLanguage
from lightning_distill.demos.markov_data import MarkovDataModule
from lightning_distill.demos.markov_eval import evaluate_generations, next_token_nll
from lightning_distill.demos.mnist1d import MNIST1DDataModule
from lightning_distill.demos.models import MLPStudent, MNIST1DDeepCNN, MNIST1DTeacher
from lightning_distill.demos.sequence_models import CausalBlock, KVCache, TinyCausalLM

__all__ = [
    "CausalBlock",
    "KVCache",
    "MLPStudent",
    "MNIST1DDataModule",
    "MNIST1DDeepCNN",
    "MNIST1DTeacher",
    "MarkovDataModule",
    "MarkovDataset",
    "MarkovLanguage",
    "TinyCausalLM",
    "evaluate_generations",
    "next_token_nll",
]
