"""TokenCache faults: a pre-pass that crashes resumes exactly, and nothing damaged or stale is read silently.

(1 crash and resume, 6 another number of processes and 7 dynamic padding: ``test_token_cache_resume.py``);
2 corruption (a flipped byte, moved rows, truncated or missing files, an unreadable ``meta.json``); 3 a stale cache
(other data, another teacher, other settings, a subset pre-pass, other counted positions); 4 the writer's lock;
5 batches without identity, a classification teacher, no teacher to run; 6 a resume with another world size.
Every failure is checked for naming its cause.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.tuner import Tuner
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_distill import CachedTeacher, DistillationCallback, DistillModule, IndexedDataset, OnPolicy, TokenCache
from lightning_distill.teacher._cache_files import DamagedCacheError
from lightning_distill.teacher._digest import teacher_weights_fingerprint
from lightning_distill.teacher._token_cache import token_digests
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
    _data,
    _fit,
    _markov,
    _prepass,
    _samples,
    _settings,
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


def test_5_augmented_views_are_refused_by_the_pre_pass(tmp_path: Path) -> None:
    views = IndexedDataset(_markov(), augment=lambda sample, generator: sample, views=2)  # one view drawn per read
    with pytest.raises(ValueError, match=r"stores one entry per sample, but the dataset has views=2"):
        _prepass(_teacher(), tmp_path / "cache", views)
    assert not list((tmp_path / "cache").glob("shard-*/tokens.bin"))


def test_5_a_cache_used_before_it_is_opened_names_the_call(tmp_path: Path) -> None:
    cache = TokenCache(tmp_path / "cache", top_k=TOP_K)
    rows, digests = np.array([0]), np.zeros(1, dtype=np.uint64)
    with pytest.raises(RuntimeError, match=r"is not open for this: call `open_reader\(expected\)` first"):
        cache.load(rows, digests, torch.device("cpu"))
    with pytest.raises(RuntimeError, match=r"call `open_writer\(settings, rank\)` first"):
        cache.missing(rows)
    with pytest.raises(RuntimeError, match=r"call `open_reader\(expected\)` first"):
        cache.stored_tokens()


def test_5_inputs_without_a_batch_first_tensor_are_refused() -> None:
    with pytest.raises(ValueError, match=r"no tensor whose first dimension is the batch's 2 samples \(got dict\)"):
        token_digests({"input_ids": torch.zeros(3, 4)}, 2)


def test_5_a_cached_teacher_beside_a_teacher_callback_or_on_policy_sampling_is_refused(reference: Path) -> None:
    module = DistillModule(student=_student(), alpha=0.5, shift_labels=True)
    both = [CachedTeacher(TokenCache(reference, top_k=TOP_K)), DistillationCallback(_teacher())]
    with pytest.raises(RuntimeError, match=r"would replace it silently\. HINT: keep one of them"):
        _trainer(max_epochs=1, callbacks=both).fit(module, DataLoader(_data(), batch_size=BATCH))
    with pytest.raises(ValueError, match=r"use DistillationCallback\(teacher\) instead of CachedTeacher"):
        _fit(reference, on_policy=OnPolicy(prompt_length=4, max_new_tokens=4))


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
