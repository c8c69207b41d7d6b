"""TokenCache resume: a pre-pass that crashes, is killed or resumes on another number of processes ends equal to one
uninterrupted pass; batches padded to their longest, with any padding id, read back; a fit from the cache resumed
from a checkpoint ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_distill import CachedTeacher, DistillModule, IndexedDataset, TokenCache, TokenCachePass
from lightning_distill.teacher._token_codec import token_dtype
from lightning_distill.teacher._token_files import SAMPLE_DTYPE
from tests.helpers.token_cache import (
    BATCH,
    NUM,
    READ,
    TOP_K,
    VOCAB,
    Edited,
    _assert_same_rows,
    _count_forwards,
    _data,
    _fit,
    _markov,
    _prepass,
    _samples,
    _student,
    _teacher,
    _trainer,
    _write_directly,
    write_reference,
)

pytestmark = pytest.mark.filterwarnings("ignore:predict returned None:UserWarning")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache of the whole training set written by one uninterrupted pre-pass of teacher 0."""
    return write_reference(tmp_path_factory)


# ------------------------------------------------------------------------------------------- 1: crash and resume
def test_1_a_pass_whose_teacher_crashes_resumes_with_only_the_missing_rows(tmp_path: Path, reference: Path) -> None:
    teacher = _teacher()
    forwards = _count_forwards(teacher, fail_at=3)  # batches 0 and 1 are stored, batch 2 crashes
    cache = TokenCache(tmp_path / "cache", top_k=TOP_K)
    with pytest.raises(RuntimeError, match="teacher crashed at forward 3"):
        _prepass(teacher, cache)
    assert cache.settings is None  # closed: its lock released
    assert (_samples(tmp_path / "cache")["filled"] == 1).tolist() == [True] * 16 + [False] * 32

    forwards.update(count=0, fail_at=None)
    resumed = _prepass(teacher, TokenCache(tmp_path / "cache", top_k=TOP_K))  # a new cache object, as a new process
    assert resumed.rows_written == NUM - 16
    assert resumed.batches_skipped == 2
    # the 4 missing batches, and batch 0 once: its forward gives the vocabulary the writer opens with
    assert forwards["count"] == 4 + 1
    _assert_same_rows(tmp_path / "cache", reference)
    assert (tmp_path / "cache/shard-00000/tokens.bin").read_bytes() == (
        reference / "shard-00000/tokens.bin"
    ).read_bytes()

    again = _prepass(teacher, TokenCache(tmp_path / "cache", top_k=TOP_K))
    assert (again.rows_written, again.tokens_written, again.batches_skipped) == (0, 0, NUM // BATCH)


def test_1_a_pass_whose_dataloader_crashes_resumes_with_only_the_missing_rows(tmp_path: Path, reference: Path) -> None:
    def fail_at_20(index: int, item: dict[str, Tensor]) -> dict[str, Tensor]:
        if index == 20:
            raise OSError("sample 20 cannot be read")
        return item

    with pytest.raises(OSError, match="sample 20 cannot be read"):
        _prepass(_teacher(), tmp_path / "cache", IndexedDataset(Edited(_markov(), fail_at_20)))
    assert int((_samples(tmp_path / "cache")["filled"] == 1).sum()) == 16
    # the failed pass's writer is closed although the failure was outside its step: a new pass takes the shard
    resumed = _prepass(_teacher(), tmp_path / "cache")
    assert (resumed.rows_written, resumed.batches_skipped) == (NUM - 16, 2)
    _assert_same_rows(tmp_path / "cache", reference)


def test_1_a_writer_killed_after_its_tokens_leaves_leftovers_the_next_pass_cuts(
    tmp_path: Path, reference: Path
) -> None:
    path = tmp_path / "cache"
    _prepass(_teacher(), path, limit_predict_batches=2)  # rows 0-15
    tokens = path / "shard-00000/tokens.bin"
    itemsize = token_dtype(TOP_K, VOCAB).itemsize
    stored = tokens.stat().st_size
    samples = _samples(path)
    assert stored == int(samples["offset"][15] + samples["count"][15]) * itemsize
    # killed while appending a batch: 3.5 records of another row, never flagged
    with open(tokens, "ab") as handle:
        handle.write(b"\x7f" * int(3.5 * itemsize))
    # and killed between row 15's tokens and its flag: its tokens are the last ones, its record unflagged
    records = np.memmap(path / "shard-00000/samples.bin", dtype=SAMPLE_DTYPE, mode="r+")
    records["filled"][15] = 0
    records.flush()
    del records

    resumed = _prepass(_teacher(), path)
    assert resumed.rows_written == NUM - 15  # row 15 again, with the 32 rows never written
    assert resumed.batches_skipped == 1
    samples = _samples(path)
    assert int(samples["offset"][15]) == int(samples["offset"][14] + samples["count"][14])  # leftovers cut
    assert tokens.stat().st_size == int(samples["count"].sum()) * itemsize
    _assert_same_rows(path, reference)


# ------------------------------------------------------------------------------------ 6: another number of processes
def test_6_a_pass_resumed_on_one_process_completes_a_two_process_cache(tmp_path: Path, reference: Path) -> None:
    path, teacher = tmp_path / "cache", _teacher()
    # two processes killed part-way: rank 0 had the even samples (it reached 0-22), rank 1 the odd ones (all)
    _write_directly(TokenCache(path, top_k=TOP_K), teacher, list(range(0, 24, 2)), rank=0)
    _write_directly(TokenCache(path, top_k=TOP_K), teacher, list(range(1, NUM, 2)), rank=1)
    shard_1 = {name: (path / "shard-00001" / name).read_bytes() for name in ("samples.bin", "tokens.bin", "meta.json")}

    forwards = _count_forwards(teacher)
    resumed = _prepass(teacher, TokenCache(path, top_k=TOP_K))
    assert resumed.rows_written == 12  # the even samples 24-46, into shard-00000
    assert resumed.batches_skipped == 3
    assert forwards["count"] == 1 + 3
    assert {name: (path / "shard-00001" / name).read_bytes() for name in shard_1} == shard_1  # not rewritten
    filled_0 = _samples(path)["filled"] == 1
    assert np.flatnonzero(filled_0).tolist() == list(range(0, NUM, 2))
    assert not (filled_0 & (_samples(path, "shard-00001")["filled"] == 1)).any()  # no row stored twice
    cache = TokenCache(path, top_k=TOP_K)
    cache.open_reader(READ)
    assert cache.stored_fraction() == 1.0
    cache.close()
    _assert_same_rows(path, reference)
    _fit(path)


# ------------------------------------------------------------------------------------------- 7 dynamic padding
class Trimmed(Dataset):
    """The Markov samples cut to their real length (a collator pads each batch, as Hugging Face's do)."""

    def __init__(self) -> None:
        self.base = _markov()

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = self.base[index]
        length = int(item["attention_mask"].sum())
        return {key: value[:length] for key, value in item.items()}


def _pad_collate(pad_id: int, left: bool = False) -> Callable[[list[Any]], Any]:
    """Collate `Indexed` items, padding each batch to its longest sequence with ``pad_id`` (on the right or left)."""

    def collate(items: list[Any]) -> Any:
        longest = max(len(item.sample["input_ids"]) for item in items)

        def pad(value: Tensor, fill: int) -> Tensor:
            filler = torch.full((longest - len(value),), fill, dtype=value.dtype)
            return torch.cat([filler, value] if left else [value, filler])

        samples = [
            {
                "input_ids": pad(item.sample["input_ids"], pad_id),
                "attention_mask": pad(item.sample["attention_mask"], 0),
                "labels": pad(item.sample["labels"], -100),
            }
            for item in items
        ]
        batch = torch.utils.data.default_collate(
            [(item.index, item.view, sample) for item, sample in zip(items, samples, strict=True)]
        )
        return type(items[0])(*batch)

    return collate


def test_7_batches_padded_to_their_longest_with_any_padding_id_read_back(tmp_path: Path) -> None:
    """A pre-pass in order and a shuffled fit pad the same sample to other lengths, with pad id 7: the rows agree."""
    data = IndexedDataset(Trimmed())
    teacher = _teacher()
    cache = TokenCache(tmp_path / "cache", top_k=TOP_K)
    loader = DataLoader(data, batch_size=BATCH, collate_fn=_pad_collate(7))
    _trainer().predict(TokenCachePass(teacher, cache, shift_labels=True), dataloaders=loader, return_predictions=False)
    module = DistillModule(student=_student(), alpha=0.5, shift_labels=True)
    shuffled = DataLoader(
        data, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(3), collate_fn=_pad_collate(7)
    )
    trainer = _trainer(max_epochs=2, callbacks=[CachedTeacher(TokenCache(tmp_path / "cache", top_k=TOP_K))])
    trainer.fit(module, shuffled)
    assert trainer.global_step == 2 * len(shuffled) and torch.isfinite(trainer.callback_metrics["train/kd_loss"])

    left = DataLoader(data, batch_size=BATCH, collate_fn=_pad_collate(7, left=True))  # left padding moves the tokens
    trainer = _trainer(max_epochs=1, callbacks=[CachedTeacher(TokenCache(tmp_path / "cache", top_k=TOP_K))])
    with pytest.raises(RuntimeError, match="are not those the teacher's distributions were cached for"):
        trainer.fit(DistillModule(student=_student(), alpha=0.5, shift_labels=True), left)


# ------------------------------------------------------------------------------------- 8 a fit from the cache, resumed
class _Crash(L.Callback):
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 2:
            raise RuntimeError("simulated crash")


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # the resumed run saves no checkpoints
def test_8_a_fit_from_the_cache_resumed_from_a_checkpoint_equals_an_uninterrupted_one(
    tmp_path: Path, reference: Path
) -> None:
    """CachedTeacher keeps the RNG states in checkpoints: a shuffled fit resumed at an epoch's end is bit-identical."""

    def fit(root: Path, callbacks: list[L.Callback], ckpt_path: Path | None = None, **kwargs: Any) -> DistillModule:
        module = DistillModule(student=_student(), alpha=0.5, shift_labels=True)
        if ckpt_path is not None:  # another start for the resumed run: everything must come from the checkpoint
            with torch.no_grad():
                for parameter in module.parameters():
                    parameter.normal_(0, 0.02)
        cache = CachedTeacher(TokenCache(reference, top_k=TOP_K))
        trainer = _trainer(max_epochs=4, default_root_dir=root, callbacks=[cache, *callbacks], **kwargs)
        trainer.fit(module, DataLoader(_data(), batch_size=BATCH, shuffle=True), ckpt_path=ckpt_path)
        return module

    torch.manual_seed(0)
    straight = fit(tmp_path / "a", [])
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(
            tmp_path / "b",
            [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True), _Crash()],
            enable_checkpointing=True,
        )
    torch.manual_seed(123)  # the resumed process's generator is elsewhere: the checkpoint must set it
    resumed = fit(tmp_path / "c", [], ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name
