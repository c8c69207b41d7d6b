"""Shared pieces of the token-cache fault tests: tiny Markov data and models, the pre-pass, a fit, reading rows back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_distill import CachedTeacher, DistillModule, IndexedDataset, TokenCache, TokenCachePass
from lightning_distill._batches import split_batch
from lightning_distill.demos import MarkovDataset, MarkovLanguage, TinyCausalLM
from lightning_distill.teacher._digest import input_digests, teacher_weights_fingerprint
from lightning_distill.teacher._token_cache import token_cache_settings
from lightning_distill.teacher._token_files import SAMPLE_DTYPE
from lightning_distill.teacher._token_pass import stored_positions

VOCAB, LENGTH, NUM, BATCH, TOP_K = 32, 12, 48, 8, 4
READ = {"num_samples": NUM, "views": 1, "shift_labels": True, "ignore_index": -100}  # what the fit knows


# ------------------------------------------------------------------------------------------------------ helpers
def _markov(num: int = NUM, seed: int = 1) -> MarkovDataset:
    return MarkovDataset(MarkovLanguage(VOCAB, branching=4, seed=0), num, max_length=LENGTH, min_length=4, seed=seed)


def _data(num: int = NUM, seed: int = 1) -> IndexedDataset:
    return IndexedDataset(_markov(num, seed))


class Edited(Dataset):
    """A dataset whose items pass through ``edit(index, item)``: changed tokens, labels, or a failing item."""

    def __init__(self, base: Dataset, edit: Callable[[int, dict[str, Tensor]], dict[str, Tensor]]) -> None:
        self.base, self.edit = base, edit

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.edit(index, dict(self.base[index]))


def _teacher(seed: int = 0) -> TinyCausalLM:
    torch.manual_seed(seed)
    return TinyCausalLM(VOCAB, dim=16, layers=1, max_length=16)


def _student(vocab: int = VOCAB) -> TinyCausalLM:
    torch.manual_seed(5)
    return TinyCausalLM(vocab, dim=16, layers=1, max_length=16)


def _trainer(**kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **kwargs})


def _prepass(
    teacher: nn.Module, cache: TokenCache | Path, data: Dataset | None = None, **trainer_kwargs: Any
) -> TokenCachePass:
    cache = cache if isinstance(cache, TokenCache) else TokenCache(cache, top_k=TOP_K)
    prepass = TokenCachePass(teacher, cache, shift_labels=True)
    loader = DataLoader(_data() if data is None else data, batch_size=BATCH)
    _trainer(**trainer_kwargs).predict(prepass, dataloaders=loader, return_predictions=False)
    return prepass


def _fit(
    path: Path, data: Dataset | None = None, student: nn.Module | None = None, **module_kwargs: Any
) -> DistillModule:
    """One epoch over the data in order (batches of 8: samples 0-7 first) from the cache at ``path``."""
    module_kwargs = {"alpha": 0.5, "shift_labels": True, **module_kwargs}
    module = DistillModule(student=_student() if student is None else student, **module_kwargs)
    trainer = _trainer(max_epochs=1, callbacks=[CachedTeacher(TokenCache(path, top_k=TOP_K))])
    trainer.fit(module, DataLoader(_data() if data is None else data, batch_size=BATCH))
    return module


def _rows(path: Path, data: Dataset | None = None) -> list[tuple[Tensor, ...]]:
    """Every row's stored distribution, read one sample at a time as a fit reads it (checked against its inputs)."""
    cache = TokenCache(path, top_k=TOP_K)
    cache.open_reader(READ)
    found = []
    for batch in DataLoader(_data() if data is None else data, batch_size=1):
        rows = cache.rows(batch, NUM, 1)
        digests = input_digests(split_batch(batch)[0], 1)
        topk = cache.load(rows, digests, torch.device("cpu"))
        assert topk.positions is not None
        found.append((topk.values, topk.indices, topk.tail, topk.positions))
    cache.close()
    return found


_READ_ONCE: dict[Path, list[tuple[Tensor, ...]]] = {}  # the rows of each reference cache, read once


def _assert_same_rows(path: Path, reference: Path) -> None:
    """Every row of ``path`` decodes to the very values, classes, tail and positions of ``reference``'s."""
    if reference not in _READ_ONCE:  # a reference is written once, never changed
        _READ_ONCE[reference] = _rows(reference)
    mine, theirs = _rows(path), _READ_ONCE[reference]
    assert len(mine) == len(theirs) == NUM
    for row, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        for name, x, y in zip(("values", "indices", "tail", "positions"), a, b, strict=True):
            assert torch.equal(x, y), f"row {row}: {name} differ"


def write_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache of the whole training set written by one uninterrupted pre-pass of teacher 0."""
    path = tmp_path_factory.mktemp("reference") / "cache"
    prepass = _prepass(_teacher(), path)
    assert (prepass.rows_written, prepass.batches_skipped) == (NUM, 0)
    return path


def _samples(path: Path, shard: str = "shard-00000") -> np.ndarray:
    return np.fromfile(path / shard / "samples.bin", dtype=SAMPLE_DTYPE)


def _count_forwards(teacher: nn.Module, fail_at: int | None = None) -> dict[str, Any]:
    """Count the teacher's forwards (``["count"]``); the forward numbered ``["fail_at"]`` raises."""
    state: dict[str, Any] = {"count": 0, "fail_at": fail_at}

    def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
        state["count"] += 1
        if state["count"] == state["fail_at"]:
            raise RuntimeError(f"teacher crashed at forward {state['fail_at']}")

    teacher.register_forward_pre_hook(hook, with_kwargs=True)  # a hook: the weights, so the fingerprint, stay the same
    return state


def _settings(teacher: nn.Module, **changes: Any) -> dict[str, Any]:
    """The settings a pre-pass of ``teacher`` over the training set writes (as ``TokenCachePass`` takes them)."""
    values: dict[str, Any] = dict(
        fingerprint=teacher_weights_fingerprint(teacher),
        num_samples=NUM,
        views=1,
        vocab=VOCAB,
        top_k=TOP_K,
        temperature=1.0,
        shift_labels=True,
        ignore_index=-100,
    )
    return token_cache_settings(**{**values, **changes})


def _write_directly(cache: TokenCache, teacher: nn.Module, indices: list[int], rank: int) -> None:
    """Write the rows of ``indices`` as the pre-pass of global rank ``rank`` would (batches of 8 of them)."""
    cache.open_writer(_settings(teacher), rank)
    teacher.eval()
    for batch in DataLoader(Subset(_data(), indices), batch_size=BATCH):
        rows = cache.rows(batch, NUM, 1)
        inputs, target = split_batch(batch)
        with torch.no_grad():
            logits = teacher(**inputs)
        counted = stored_positions(inputs, target, logits, teacher, True, -100)
        digests = input_digests(inputs, len(rows))
        assert cache.missing(rows).all()
        cache.write(rows, logits, counted, digests)
    cache.close()
