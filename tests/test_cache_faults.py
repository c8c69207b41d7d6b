"""TeacherCache faults (issue 17, items 2 and 3): nothing stale is read silently, and every failure names its cause.

2a rows bound to their samples' inputs; 2b a moved row fails its checksum; 2c every byte of the teacher fingerprinted;
2d messages that name the teacher when it changed; 3a concurrent creation; 3b a failed open leaves the cache closed;
3c ``on_mismatch="rebuild"`` rebuilds a damaged cache; 3d an unreadable ``meta.json`` is named; 3e an uncreatable
directory fails at setup.
"""

from __future__ import annotations

import copy
import json
import os
import threading
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_distill import DistillationCallback, DistillModule, TeacherCache
from lightning_distill.teacher import IndexedDataset
from tests.helpers.tiny import (
    IN_DIM,
    NUM_CLASSES,
    KwargsTeacher,
    TinyTeacher,
    make_data,
    make_trainer,
    tiny_student,
    trained_teacher,
)


def _fit(
    tmp_path: Path,
    cache: TeacherCache,
    teacher: nn.Module,
    dataset: Dataset | None = None,
    epochs: int = 1,
    callbacks: tuple[L.Callback, ...] = (),
    student: nn.Module | None = None,
) -> None:
    """Fit a tiny student over 64 samples in order (batches of 16: samples 0-15 first)."""
    torch.manual_seed(0)
    dataset = IndexedDataset(TensorDataset(*make_data(64))) if dataset is None else dataset
    callback = DistillationCallback(teacher, cache=cache, check_accuracy=False)
    trainer = make_trainer(tmp_path, max_epochs=epochs, limit_train_batches=None, callbacks=[callback, *callbacks])
    module = DistillModule(student=tiny_student() if student is None else student, alpha=0.5, temperature=2.0)
    trainer.fit(module, DataLoader(dataset, batch_size=16))


def _changed_data(index: int) -> TensorDataset:
    x, y = make_data(64)
    x = x.clone()
    x[index, 0] += 0.5
    return TensorDataset(x, y)


# ------------------------------------------------------------------------------------ 2a: rows bound to their inputs
def test_2a_a_sample_changed_after_caching_is_refused_in_whichever_batch_it_is(tmp_path: Path) -> None:
    teacher = trained_teacher()
    _fit(tmp_path, TeacherCache(tmp_path / "cache"), teacher)
    # same length, one sample changed outside the first batch (which `verify` alone would have compared)
    with pytest.raises(
        RuntimeError,
        match=r"the inputs of 1 of 16 samples at epoch 0 \(sample index \[40\], view \[0\]\) are not those their "
        r"teacher outputs were cached for .* the inputs changed since they were cached.* HINT: for new data rebuild "
        r"the cache: delete '.*meta.json'",
    ):
        _fit(tmp_path, TeacherCache(tmp_path / "cache"), teacher, IndexedDataset(_changed_data(40)))


class DictSamples(Dataset):
    """Hugging Face-style samples: a mapping of tensors (``features``, ``mask``) and ``labels``."""

    def __init__(self, changed: int | None = None) -> None:
        self.x, self.y = make_data(64)
        self.mask = torch.ones(64, 3, dtype=torch.long)
        if changed is not None:
            self.mask = self.mask.clone()
            self.mask[changed, 2] = 0  # only the second tensor of the sample changes

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"features": self.x[i], "mask": self.mask[i], "labels": self.y[i]}


class MaskedKwargsTeacher(KwargsTeacher):
    def forward(self, features: Tensor, mask: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        return super().forward(features)


class MaskedStudent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_student()

    def forward(self, features: Tensor, mask: Tensor) -> Tensor:
        return self.net(features)


def test_2a_every_tensor_of_dict_inputs_is_digested(tmp_path: Path) -> None:
    teacher = MaskedKwargsTeacher()
    _fit(tmp_path, TeacherCache(tmp_path / "cache"), teacher, IndexedDataset(DictSamples()), student=MaskedStudent())
    with pytest.raises(RuntimeError, match=r"inputs of 1 of 16 samples at epoch 0 \(sample index \[21\], view \[0\]\)"):
        changed = IndexedDataset(DictSamples(changed=21))
        _fit(tmp_path, TeacherCache(tmp_path / "cache"), teacher, changed, student=MaskedStudent())


def test_2a_input_digests_are_per_sample_keyed_padding_free_and_the_same_in_torch_and_numpy() -> None:
    from lightning_distill.teacher._digest import _residues_numpy, _residues_torch, _words, input_digests

    def digests(inputs: object) -> np.ndarray:
        found = input_digests(inputs, 6)
        assert found is not None
        return found

    x = torch.randn(6, 5)
    ids = torch.randint(1, 1000, (6, 7))
    base = digests({"x": x, "ids": ids})
    assert base.dtype == np.uint64 and len(set(base.tolist())) == 6
    changed = ids.clone()
    changed[4, 6] += 1
    assert (digests({"x": x, "ids": changed}) != base).tolist() == [False] * 4 + [True, False]
    assert (digests({"x": x, "other": ids}) != base).all()  # a tensor's key is part of the digest
    assert (digests((x, ids)) != digests((ids, x))).all()  # so is its position
    padded = torch.cat([ids, torch.zeros(6, 9, dtype=ids.dtype)], dim=1)
    assert (digests({"x": x, "ids": padded}) == base).all()  # zero padding to any length
    assert (digests({"x": x, "ids": ids, "n": 3, "shared": torch.ones(2)}) == base).all()  # not per sample
    assert input_digests({"n": 3}, 6) is None
    for tensor in (x, ids, x.half(), x.bfloat16(), x > 0, ids.to(torch.uint8), x.double().t().contiguous().t()):
        words = _words(tensor, 6)
        np.testing.assert_array_equal(_residues_torch(words, 6), _residues_numpy(words.numpy(), 6))


# ----------------------------------------------------------------------------------- 2b: a moved row fails its CRC
def test_2b_two_rows_swapped_with_their_checksums_fail_them(tmp_path: Path) -> None:
    teacher = trained_teacher()
    _fit(tmp_path, TeacherCache(tmp_path / "cache"), teacher)
    for file in (tmp_path / "cache").glob("*.bin"):  # every per-row file: data, digest, checksum and flag move
        rows = np.fromfile(file, dtype=np.uint8).reshape(64, -1)
        rows[[40, 41]] = rows[[41, 40]]
        rows.tofile(file)
    with pytest.raises(ValueError, match=r"rows \[40, 41\] fail their checksum .* rows were moved within them"):
        _fit(tmp_path, TeacherCache(tmp_path / "cache"), teacher)


# --------------------------------------------------------------------------- 2c: every byte of the teacher counts
def test_2c_a_weight_change_a_sampled_fingerprint_misses_refuses_the_cache(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(IN_DIM, 1024), nn.ReLU(), nn.Linear(1024, 4))
    _fit(tmp_path, TeacherCache(tmp_path / "cache"), teacher)
    changed = copy.deepcopy(teacher)
    with torch.no_grad():
        # the sampled fingerprint of 0.1.0 read every 2nd of these 8192 values, so not this one
        changed.get_parameter("0.weight").view(-1)[1] += 1e-3
    with pytest.raises(ValueError, match=r"was made for other settings: teacher: cache '[0-9a-f]{32}', now"):
        _fit(tmp_path, TeacherCache(tmp_path / "cache"), changed)


# ------------------------------------------------------------------------ 2d: the message names the teacher's change
def test_2d_another_teachers_weights_are_named_as_the_cause(tmp_path: Path) -> None:
    _fit(tmp_path, TeacherCache(tmp_path / "cache"), trained_teacher())
    with pytest.raises(
        ValueError, match=r"teacher: cache '\w+', now '\w+' \(the teacher differs from the one the cache was made with"
    ):
        _fit(tmp_path, TeacherCache(tmp_path / "cache"), TinyTeacher())


class ScaledTeacher(nn.Module):
    """No weights: logits ``x[:, :4] * scale``; changing ``scale`` changes the forward, not the fingerprint."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :4] * self.scale


def test_2d_a_changed_forward_is_named_as_the_cause_not_the_inputs(tmp_path: Path) -> None:
    _fit(tmp_path, TeacherCache(tmp_path / "cache"), ScaledTeacher(1.0))
    with pytest.raises(RuntimeError) as caught:
        _fit(tmp_path, TeacherCache(tmp_path / "cache"), ScaledTeacher(3.0))
    message = str(caught.value)
    assert "the inputs are those the rows were cached for (their digests match)" in message
    assert "the teacher's forward computes something else on the same inputs" in message
    assert "augmentation" not in message


class ScaleTeacherAtEpoch1(L.Callback):
    def __init__(self, teacher: TinyTeacher) -> None:
        self.teacher = teacher

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            with torch.no_grad():
                self.teacher.head.weight.mul_(3.0)


def test_2d_weights_changed_during_the_fit_are_named_as_the_cause(tmp_path: Path) -> None:
    teacher = trained_teacher()
    with pytest.raises(
        RuntimeError,
        match=r"at epoch 1 differ from the cached ones .*: the teacher's weights changed during the fit \(fingerprint "
        r"'\w+' when the cache was opened, '\w+' now\)",
    ):
        _fit(tmp_path, TeacherCache(tmp_path / "cache"), teacher, epochs=2, callbacks=(ScaleTeacherAtEpoch1(teacher),))


# ---------------------------------------------------------------------------------- 3a: concurrent creation
def test_3a_two_fits_creating_one_cache_at_once_both_open_it(tmp_path: Path) -> None:
    settings = {
        "format": _settings_format(),
        "teacher": "t",
        "num_samples": 20_000,
        "views": 1,
        "num_classes": 10,
        "top_k": None,
        "temperature": None,
    }
    for attempt in range(40):
        path = tmp_path / f"cache{attempt}"
        start = threading.Barrier(2)
        errors: list[BaseException] = []
        caches = [TeacherCache(path), TeacherCache(path)]
        threads = [threading.Thread(target=_open_together, args=(c, settings, start, errors)) for c in caches]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, f"attempt {attempt}: {errors[0]!r}"
        assert all(cache.is_open and cache.filled_fraction() == 0.0 for cache in caches)
        caches[0]._arrays["filled"][7] = 1  # one cache, seen by both openers
        assert caches[1].filled_fraction() == 1 / 20_000


def _open_together(cache: TeacherCache, settings: dict, start: threading.Barrier, errors: list) -> None:
    start.wait()
    try:
        cache.open(settings, create=True)
    except BaseException as err:  # reported by the test, with the attempt
        errors.append(err)


def _settings_format() -> int:
    try:
        from lightning_distill.teacher._cache_files import _FORMAT
    except ImportError:  # before the split into two modules
        from lightning_distill.teacher._cache import _FORMAT  # type: ignore[attr-defined,no-redef]
    return _FORMAT


# ---------------------------------------------------------------------------- 3b: a failed open leaves it closed
def test_3b_an_open_that_raises_leaves_the_cache_closed_and_a_retry_raises_the_same(tmp_path: Path) -> None:
    _fit(tmp_path, TeacherCache(tmp_path / "cache"), trained_teacher())
    settings = json.loads((tmp_path / "cache" / "meta.json").read_text())
    values = tmp_path / "cache" / "values.bin"
    values.write_bytes(values.read_bytes()[:-6])
    cache = TeacherCache(tmp_path / "cache")
    for _ in range(2):
        with pytest.raises(ValueError, match=r"values.bin' is truncated or damaged: 506 bytes, expected 512"):
            cache.open(settings, create=False)
        assert not cache.is_open and cache.filled_fraction() == 0.0


# ------------------------------------------------------------------------ 3c: rebuild rebuilds a damaged cache
@pytest.mark.parametrize("damage", ["truncated", "meta"])
def test_3c_on_mismatch_rebuild_rebuilds_a_damaged_cache(tmp_path: Path, damage: str) -> None:
    teacher = trained_teacher()
    _fit(tmp_path, TeacherCache(tmp_path / "cache"), teacher)
    (tmp_path / "cache" / "keep.txt").write_text("not the cache's")
    if damage == "truncated":
        values = tmp_path / "cache" / "values.bin"
        values.write_bytes(values.read_bytes()[:-6])
    else:
        (tmp_path / "cache" / "meta.json").write_text('{"format": 3, "teach')
    with pytest.raises(ValueError, match=r"HINT: pass `TeacherCache\(\.\.\., on_mismatch='rebuild'\)` to rebuild it"):
        _fit(tmp_path, TeacherCache(tmp_path / "cache"), teacher)
    rebuilt = TeacherCache(tmp_path / "cache", on_mismatch="rebuild")
    _fit(tmp_path, rebuilt, teacher, epochs=2)
    assert rebuilt.teacher_runs == 4 and rebuilt.filled_fraction() == 1.0  # refilled in epoch 1, read in epoch 2
    assert (tmp_path / "cache" / "keep.txt").read_text() == "not the cache's"  # only the cache's own files go


# ------------------------------------------------------------------------------ 3d: an unreadable meta.json
@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\xff\xfe{not json", r"meta.json' is damaged: 11 bytes that are not valid JSON"),
        (b'{"format": 3,', r"meta.json' is damaged: 13 bytes that are not valid JSON"),
        (b"[1, 2]", r"meta.json' is damaged: it holds a list, not the cache's settings"),
    ],
)
def test_3d_a_damaged_meta_json_is_named_with_the_fix(tmp_path: Path, content: bytes, match: str) -> None:
    teacher = trained_teacher()
    _fit(tmp_path, TeacherCache(tmp_path / "cache"), teacher)
    (tmp_path / "cache" / "meta.json").write_bytes(content)
    with pytest.raises(ValueError, match=match + r".* HINT: pass `TeacherCache\(\.\.\., on_mismatch='rebuild'\)`"):
        _fit(tmp_path, TeacherCache(tmp_path / "cache"), teacher)


# ------------------------------------------------------------------------ 3e: an uncreatable path fails at setup
class CountingTeacher(TinyTeacher):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return super().forward(x)


def test_3e_a_cache_path_under_a_file_fails_at_setup_naming_path_and_reason(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    teacher = CountingTeacher()
    with pytest.raises(OSError, match=r"Teacher cache directory '.*file/cache' cannot be created or written: Not a"):
        _fit(tmp_path, TeacherCache(tmp_path / "file" / "cache"), teacher)
    assert teacher.calls == 0  # before the first batch


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only directories")
def test_3e_a_read_only_cache_directory_fails_at_setup(tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(PermissionError, match=r"Teacher cache directory '.*ro' cannot be created or written: Permissi"):
        _fit(tmp_path, TeacherCache(tmp_path / "ro"), CountingTeacher())


# ------------------------------------------------------------ 7: a top_k above the classes, named when the cache opens
def test_7_a_top_k_above_the_teachers_classes_is_named_before_anything_is_stored(tmp_path: Path) -> None:
    # it failed with torch's bare `selected index k out of range` from topk
    cache = TeacherCache(tmp_path / "cache", top_k=NUM_CLASSES + 1)
    with pytest.raises(
        ValueError,
        match=rf"top_k={NUM_CLASSES + 1}\)` keeps more classes than the teacher has "
        rf"\({NUM_CLASSES}\)\. HINT: pass `top_k` below {NUM_CLASSES}",
    ):
        _fit(tmp_path, cache, TinyTeacher())
    assert not cache.is_open and not (tmp_path / "cache" / "meta.json").exists()
    _fit(tmp_path, TeacherCache(tmp_path / "cache", top_k=NUM_CLASSES), TinyTeacher())  # all classes: allowed
