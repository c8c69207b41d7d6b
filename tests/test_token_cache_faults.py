"""TokenCache faults: a pre-pass that crashes resumes exactly, and nothing damaged or stale is read silently.

1 crash and resume (a teacher or a DataLoader failing mid-pass, a writer killed between its tokens and its flag);
2 corruption (a flipped byte, moved rows, truncated or missing files, an unreadable ``meta.json``); 3 a stale cache
(other data, another teacher, other settings, a subset pre-pass, other counted positions); 4 the writer's lock;
5 batches without identity, a classification teacher, no teacher to run; 6 a resume with another world size.
Every failure is checked for naming its cause.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.tuner import Tuner
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_distill import CachedTeacher, DistillModule, IndexedDataset, TokenCache, TokenCachePass
from lightning_distill._batches import split_batch
from lightning_distill.demos import MarkovDataset, MarkovLanguage, TinyCausalLM
from lightning_distill.teacher._cache_files import DamagedCacheError
from lightning_distill.teacher._digest import input_digests, teacher_weights_fingerprint
from lightning_distill.teacher._token_cache import token_cache_settings
from lightning_distill.teacher._token_codec import token_dtype
from lightning_distill.teacher._token_files import SAMPLE_DTYPE
from lightning_distill.teacher._token_pass import stored_positions

VOCAB, LENGTH, NUM, BATCH, TOP_K = 32, 12, 48, 8, 4
pytestmark = pytest.mark.filterwarnings("ignore:predict returned None:UserWarning")  # the pre-pass returns nothing
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


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
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


# ------------------------------------------------------------------------------------------------ 2: corruption
@pytest.fixture
def stored(tmp_path: Path, reference: Path) -> Path:
    """A copy of the reference cache, to damage."""
    path = tmp_path / "cache"
    shutil.copytree(reference, path)
    return path


def test_2_a_flipped_byte_in_a_rows_tokens_fails_its_checksum_naming_the_sample(stored: Path) -> None:
    row = 20
    entry = _samples(stored)[row]
    itemsize = token_dtype(TOP_K, VOCAB).itemsize
    with open(stored / "shard-00000/tokens.bin", "r+b") as handle:
        handle.seek(int(entry["offset"]) * itemsize + itemsize + 3)  # inside the row's second token
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(
        ValueError, match=r"rows \[20\] fail their checksum \(sample index \[20\], view \[0\].*corrupted"
    ):
        _fit(stored)


def test_2_rows_swapped_in_samples_bin_fail_their_checksum_bound_to_the_row_number(stored: Path) -> None:
    samples = np.memmap(stored / "shard-00000/samples.bin", dtype=SAMPLE_DTYPE, mode="r+")
    samples[[5, 6]] = samples[[6, 5]]
    samples.flush()
    del samples
    with pytest.raises(ValueError, match=r"rows \[5, 6\] fail their checksum .*rows were moved within them"):
        _fit(stored)


def test_2_a_truncated_tokens_bin_fails_the_checksum_of_the_rows_cut(stored: Path) -> None:
    tokens = stored / "shard-00000/tokens.bin"
    itemsize = token_dtype(TOP_K, VOCAB).itemsize
    end_of_row_30 = int(_samples(stored)["offset"][31])
    with open(tokens, "r+b") as handle:
        handle.truncate(end_of_row_30 * itemsize + itemsize // 2)  # half a token of row 31
    cache = TokenCache(stored, top_k=TOP_K)
    cache.open_reader(READ)
    rows = np.arange(24, 32)
    digests = np.array(_samples(stored)["digest"][rows])
    with pytest.raises(ValueError, match=r"rows \[31\] fail their checksum .*corrupted or truncated"):
        cache.load(rows, digests, torch.device("cpu"))
    rows = np.arange(32, 40)  # wholly past the end
    digests = np.array(_samples(stored)["digest"][rows])
    with pytest.raises(ValueError, match=r"rows \[32, 33, 34, 35, 36\] fail their checksum"):
        cache.load(rows, digests, torch.device("cpu"))
    cache.close()
    with pytest.raises(ValueError, match=r"rows \[31\] fail their checksum"):  # batch 3 of the fit (24-31)
        _fit(stored)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_2_a_truncated_or_missing_samples_bin_is_a_damaged_cache_naming_the_file(stored: Path, damage: str) -> None:
    file = stored / "shard-00000/samples.bin"
    if damage == "truncated":
        with open(file, "r+b") as handle:
            handle.truncate(NUM * SAMPLE_DTYPE.itemsize - 7)
        size = str(NUM * SAMPLE_DTYPE.itemsize - 7)
    else:
        file.unlink()
        size = "missing"
    message = rf"samples\.bin' is truncated or damaged: {size} bytes, expected {NUM * 25}\. HINT: delete the shard"
    assert issubclass(DamagedCacheError, ValueError)
    with pytest.raises(DamagedCacheError, match=message):
        TokenCache(stored, top_k=TOP_K).open_reader(READ)
    with pytest.raises(DamagedCacheError, match=message):
        _fit(stored)
    with pytest.raises(DamagedCacheError, match=message):  # the pre-pass too: it does not write over a damaged shard
        _prepass(_teacher(), stored)


@pytest.mark.parametrize(
    ("content", "cause"),
    [(b'{"format": 1, "teacher"', "cannot be read"), (b"\xff\xfe", "cannot be read"), (b"[1, 2]", "holds a list")],
)
def test_2_an_unreadable_meta_json_is_named(stored: Path, content: bytes, cause: str) -> None:
    (stored / "shard-00000/meta.json").write_bytes(content)
    with pytest.raises(DamagedCacheError, match=rf"Token cache file '.*shard-00000/meta\.json' {cause}"):
        TokenCache(stored, top_k=TOP_K).open_reader(READ)
    with pytest.raises(DamagedCacheError, match=r"shard-00000/meta\.json"):
        _prepass(_teacher(), stored)


# ------------------------------------------------------------------------------------------------- 3: stale cache
def test_3_a_dataset_changed_since_the_pre_pass_is_refused_naming_the_sample(reference: Path) -> None:
    def other_token(index: int, item: dict[str, Tensor]) -> dict[str, Tensor]:
        if index == 27:
            item["input_ids"] = item["input_ids"].clone()
            item["input_ids"][1] = (item["input_ids"][1] % (VOCAB - 1)) + 1  # another real token, same length
            item["labels"] = item["input_ids"].masked_fill(item["attention_mask"] == 0, -100)
        return item

    with pytest.raises(
        RuntimeError,
        match=r"the inputs of 1 of 8 samples \(sample index \[27\], view \[0\]\) are not those .*inputs digests differ"
        r".*the dataset changed since the pre-pass",
    ):
        _fit(reference, IndexedDataset(Edited(_markov(), other_token)))


def test_3_a_second_pre_pass_with_another_teacher_is_refused_or_rebuilds(tmp_path: Path, reference: Path) -> None:
    path = tmp_path / "cache"
    shutil.copytree(reference, path)
    # a shard of another rank from the same old teacher: a rebuild deletes it too
    _write_directly(TokenCache(path, top_k=TOP_K), _teacher(), [], rank=1)
    assert (path / "shard-00001/meta.json").is_file()
    new = _teacher(seed=1)
    with pytest.raises(
        ValueError,
        match=r"\(shard-00000\) was written for other settings: teacher: cache '[0-9a-f]+', "
        r"now '[0-9a-f]+' \(another teacher .*on_mismatch='rebuild'",
    ):
        _prepass(new, path)
    assert _samples(path)["filled"].all()  # refused: nothing touched

    rebuilt = _prepass(new, TokenCache(path, top_k=TOP_K, on_mismatch="rebuild"))
    assert (rebuilt.rows_written, rebuilt.batches_skipped) == (NUM, 0)
    assert sorted(p.name for p in path.iterdir()) == ["shard-00000"]
    meta = json.loads((path / "shard-00000/meta.json").read_text())
    assert meta["teacher"] == teacher_weights_fingerprint(new) != teacher_weights_fingerprint(_teacher())
    fresh = tmp_path / "fresh"
    _prepass(_teacher(seed=1), fresh)
    _assert_same_rows(path, fresh)


def test_3_shards_written_for_different_settings_are_refused_by_the_reader(tmp_path: Path, reference: Path) -> None:
    path, other = tmp_path / "cache", tmp_path / "other"
    shutil.copytree(reference, path)
    writer = TokenCache(other, top_k=TOP_K)
    writer.open_writer(_settings(_teacher(), temperature=2.0), 1)
    writer.close()
    shutil.copytree(other / "shard-00001", path / "shard-00001")
    with pytest.raises(
        ValueError,
        match=r"its shards were written for different settings \(shard-00001 vs shard-00000: temperature: cache 2\.0, "
        r"now 1\.0",
    ):
        TokenCache(path, top_k=TOP_K).open_reader(READ)
    with pytest.raises(ValueError, match="its shards were written for different settings"):
        _fit(path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"shift_labels": False}, r"shift_labels: cache True, now False \(the positions stored are those"),
        ({"ignore_index": -1}, r"ignore_index: cache -100, now -1 \(the positions stored"),
        ({"temperature": 2.0}, r"stores probabilities at temperature 1\.0, the module's temperature is 2\.0"),
        ({"num": 40}, r"num_samples: cache 48, now 40 \(the training dataset has another length\)"),
        ({"views": 2}, r"views: cache 1, now 2 \(the dataset has another number of views"),
        ({"top_k": 8}, r"top_k: cache 4, now 8 \(`TokenCache\(top_k=\)` differs\)"),
    ],
    ids=["shift_labels", "ignore_index", "temperature", "num_samples", "views", "top_k"],
)
def test_3_a_fit_with_other_settings_than_the_pre_pass_is_refused_naming_the_setting(
    reference: Path, changes: dict[str, Any], message: str
) -> None:
    module_kwargs = {"alpha": 0.5, "shift_labels": True, **changes}
    num, views, top_k = (
        module_kwargs.pop(key, default) for key, default in (("num", NUM), ("views", 1), ("top_k", TOP_K))
    )
    data = IndexedDataset(_markov(num), augment=(lambda item, generator: item) if views > 1 else None, views=views)
    trainer = _trainer(max_epochs=1, callbacks=[CachedTeacher(TokenCache(reference, top_k=top_k))])
    with pytest.raises(ValueError, match=message):
        trainer.fit(DistillModule(student=_student(), **module_kwargs), DataLoader(data, batch_size=BATCH))


def test_3_a_student_with_another_vocabulary_is_refused(reference: Path) -> None:
    with pytest.raises(ValueError, match=r"vocabulary of 32 classes, the student's logits 40.*same tokenizer"):
        _fit(reference, student=_student(vocab=40))


def test_3_rows_the_pre_pass_did_not_reach_are_missing_with_the_hint_to_run_it(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    _prepass(_teacher(), path, limit_predict_batches=3)  # rows 0-23
    cache = TokenCache(path, top_k=TOP_K)
    cache.open_reader(READ)
    assert cache.stored_fraction() == 0.5
    cache.close()
    with pytest.raises(
        KeyError,
        match=r"holds no teacher distributions for 8 of 8 samples of this batch \(sample index \[24, 25, "
        r"26, 27, 28\], view \[0, 0, 0, 0, 0\]\)\. HINT: run the pre-pass",
    ):
        _fit(path)


def test_3_a_batch_counting_positions_the_pre_pass_did_not_store_is_refused(tmp_path: Path) -> None:
    def prompt_unlabelled(index: int, item: dict[str, Tensor]) -> dict[str, Tensor]:
        item["labels"] = item["labels"].clone()
        item["labels"][:3] = -100  # a prompt: not scored, so not stored (the teacher's inputs are the same)
        return item

    path = tmp_path / "cache"
    _prepass(_teacher(), path, IndexedDataset(Edited(_markov(), prompt_unlabelled)))
    _fit(path, IndexedDataset(Edited(_markov(), prompt_unlabelled)))  # the pre-pass's labels: fine
    with pytest.raises(
        ValueError, match=r"The loss counts 16 positions of this batch for which the token cache holds no teacher"
    ):
        _fit(path)  # the prompt labelled now: the loss counts positions 0 and 1 of each sample as well


# ---------------------------------------------------------------------------------------------------------- 4: lock
def test_4_a_second_writer_of_a_shard_is_refused_while_the_first_holds_it(tmp_path: Path) -> None:
    path, settings = tmp_path / "cache", _settings(_teacher())
    first = TokenCache(path, top_k=TOP_K)
    first.open_writer(settings, 0)
    second = TokenCache(path, top_k=TOP_K)
    with pytest.raises(RuntimeError, match=r"shard-00000' is being written by another process \(its lock is held\)"):
        second.open_writer(settings, 0)
    assert second.settings is None
    with pytest.raises(RuntimeError, match="being written by another process"):
        _prepass(_teacher(), second)
    other_rank = TokenCache(path, top_k=TOP_K)
    other_rank.open_writer(settings, 1)  # another rank's shard: its own lock
    other_rank.close()
    first.close()
    second.open_writer(settings, 0)
    second.close()
    assert _prepass(_teacher(), second).rows_written == NUM

    # a writer that rebuilt its own shard (written for other settings) still holds the shard's lock
    rebuilt = TokenCache(path, top_k=TOP_K, on_mismatch="rebuild")
    rebuilt.open_writer(_settings(_teacher(), temperature=2.0), 0)
    assert rebuilt.missing(np.arange(NUM)).all()  # the rows of the old settings deleted with them
    with pytest.raises(RuntimeError, match="being written by another process"):
        TokenCache(path, top_k=TOP_K, on_mismatch="rebuild").open_writer(_settings(_teacher(), temperature=2.0), 0)
    rebuilt.close()


# ---------------------------------------------------------------------------------------- 5: what cannot be cached
def test_5_batches_without_sample_identity_are_refused_naming_indexed_dataset(reference: Path, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"TokenCachePass needs each batch's sample indices.*IndexedDataset"):
        _prepass(_teacher(), tmp_path / "cache", _markov())
    with pytest.raises(TypeError, match=r"TokenCache needs each batch's sample indices.*IndexedDataset"):
        _fit(reference, _markov())


class PooledTeacher(nn.Module):
    """A classifier over token sequences: one ``(B, C)`` logits row per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.head(self.embed(input_ids).mean(1))


def test_5_a_classification_teacher_in_the_pre_pass_points_to_teacher_cache(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"per-token logits \(B, L, V\), but the teacher returned \(8, 5\).*TeacherCache"
    ):
        _prepass(PooledTeacher(), tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("shard-*/meta.json"))  # nothing written


class TunedModule(DistillModule):
    def __init__(self) -> None:
        super().__init__(student=_student(), alpha=0.5, shift_labels=True)
        self.lr = 0.01

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def test_5_without_the_callbacks_batch_hooks_there_is_no_teacher_to_run(reference: Path) -> None:
    trainer = _trainer(max_epochs=1, callbacks=[CachedTeacher(TokenCache(reference, top_k=TOP_K))])
    loader = DataLoader(_data(), batch_size=BATCH)
    with pytest.raises(RuntimeError, match=r"CachedTeacher has no teacher to run.*Tuner.*HINT"):
        Tuner(trainer).lr_find(TunedModule(), train_dataloaders=loader, num_training=2, early_stop_threshold=None)

    module = DistillModule(student=_student(), alpha=0.5, shift_labels=True)
    callback = CachedTeacher(TokenCache(reference, top_k=TOP_K))
    callback.setup(trainer, module, "fit")
    assert module._teacher is not None
    with pytest.raises(RuntimeError, match="CachedTeacher has no teacher to run"):
        module._step_terms(next(iter(loader)), None)
    callback.teardown(trainer, module, "fit")
    assert module._teacher is None


def test_5_a_fit_with_feature_maps_is_refused_at_setup(reference: Path) -> None:
    with pytest.raises(ValueError, match="stores the teacher's outputs only, but the module has feature maps"):
        _fit(reference, feature_maps=[{"student": "blocks.0", "teacher": "blocks.0"}])


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
