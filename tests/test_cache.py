"""TeacherCache: cached losses equal uncached ones, the top-k bound, integrity, crash and resume, DDP, bad inputs."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill import DistillationCallback, DistillModule, FeatureMap, TeacherCache
from lightning_distill.losses.functional import kd_loss
from lightning_distill.losses.functional.topk import topk_kd_loss, topk_log_probs
from lightning_distill.schedules import LinearWarmup
from lightning_distill.teacher import Indexed, IndexedDataset
from tests.helpers.processes import REPO_ROOT
from tests.helpers.tiny import TinyTeacher, make_data, make_trainer, random_logits, tiny_student, trained_teacher


class StepLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.kd: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.losses.append(float(outputs["loss"]))
        self.kd.append(float(trainer.callback_metrics["train/kd_loss"]))


def _fit(tmp_path, cache=None, epochs=3, teacher=None, dataset=None, **module_kwargs):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    teacher = trained_teacher() if teacher is None else teacher
    dataset = IndexedDataset(TensorDataset(*make_data(64))) if dataset is None else dataset
    loader = DataLoader(dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    record = StepLosses()
    callback = DistillationCallback(teacher, cache=cache)
    kwargs = {"alpha": 0.5, "temperature": 2.0, **module_kwargs}
    trainer = make_trainer(tmp_path, max_epochs=epochs, limit_train_batches=None, callbacks=[callback, record])
    trainer.fit(DistillModule(student=tiny_student(), **kwargs), loader)
    return record


def test_full_logits_cache_gives_the_uncached_losses_and_runs_the_teacher_in_epoch_one_only(tmp_path):
    plain = _fit(tmp_path)
    cache = TeacherCache(tmp_path / "cache")
    cached = _fit(tmp_path, cache)
    assert cache.teacher_runs == 4 and cache.filled_fraction() == 1.0  # 4 batches in epoch 1, none after
    np.testing.assert_allclose(cached.losses, plain.losses, rtol=2e-3)  # float16 logits
    assert cache.bytes_per_sample() == 4 * 2 + 8 + 4 + 1  # 4 float16 logits, inputs digest, CRC-32, filled flag
    again = TeacherCache(tmp_path / "cache")
    np.testing.assert_allclose(_fit(tmp_path, again).losses, cached.losses, rtol=1e-6)  # a later run reads it all
    assert again.teacher_runs == 0


def test_topk_kd_is_a_lower_bound_within_the_documented_gap():
    student, teacher, _, _ = random_logits((64, 12), seed=3)
    for k in (1, 3, 6, 12):
        values, indices, tail = topk_log_probs(teacher, k, temperature=2.0)
        exact = kd_loss(student, teacher, temperature=2.0)
        approx = topk_kd_loss(student, values, indices, tail, temperature=2.0)
        log_s = torch.log_softmax(student / 2.0, -1).scatter(-1, indices, float("-inf"))
        rest = (log_s - torch.logsumexp(log_s, -1, keepdim=True)).exp()  # student renormalized outside the top-k
        min_rest = rest.masked_fill(rest == 0, 1.0).amin(-1) if k < 12 else torch.ones(64)
        bound = 4.0 * (tail * torch.log(1 / min_rest)).mean()  # T^2 * mean(m * log(1 / min s_hat))
        assert 0.0 <= float(exact - approx) <= float(bound) + 1e-5, k
    assert float(exact - approx) == pytest.approx(0.0, abs=1e-5)  # k = C is exact


def test_topk_cache_trains_with_the_bucketed_kd_and_counts_bytes(tmp_path):
    cache = TeacherCache(tmp_path / "cache", top_k=2)
    record = _fit(tmp_path, cache)
    plain = _fit(tmp_path)
    assert cache.teacher_runs == 4 and all(math.isfinite(v) for v in record.losses)
    assert 0.0 <= plain.kd[0] - record.kd[0]  # same weights at step 1: the bucketed KD never exceeds the full KD
    assert cache.bytes_per_sample() == 2 * 2 + 2 * 2 + 4 + 8 + 4 + 1  # values, indices, tail, digest, CRC, flag


def test_a_cache_for_another_teacher_is_refused_or_rebuilt(tmp_path):
    _fit(tmp_path, TeacherCache(tmp_path / "cache"), epochs=1)
    with pytest.raises(ValueError, match=r"was made for other settings: teacher: cache '[0-9a-f]+', now '[0-9a-f]+'"):
        _fit(tmp_path, TeacherCache(tmp_path / "cache"), epochs=1, teacher=TinyTeacher())
    rebuilt = TeacherCache(tmp_path / "cache", on_mismatch="rebuild")
    _fit(tmp_path, rebuilt, epochs=1, teacher=TinyTeacher())
    assert rebuilt.teacher_runs == 4


def test_truncated_and_corrupted_files_are_detected(tmp_path):
    _fit(tmp_path, TeacherCache(tmp_path / "cache"), epochs=1)
    values = tmp_path / "cache" / "values.bin"
    data = bytearray(values.read_bytes())
    data[10] ^= 0xFF  # one flipped byte in sample 1's logits
    values.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"rows \[.*\] fail their checksum"):
        _fit(tmp_path, TeacherCache(tmp_path / "cache"), epochs=1)
    values.write_bytes(bytes(data[:-6]))
    with pytest.raises(ValueError, match=r"values.bin' is truncated or damaged: 506 bytes, expected 512"):
        _fit(tmp_path, TeacherCache(tmp_path / "cache"), epochs=1)


@pytest.mark.slow
def test_a_process_killed_mid_epoch_leaves_unfilled_rows_and_resume_fills_only_those(tmp_path):
    path = str(tmp_path / "cache")
    command = [sys.executable, "-m", "tests.helpers.cache_script", path]
    killed = subprocess.run([*command, "2"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9  # SIGKILL: no clean-up, no flush
    filled = np.fromfile(tmp_path / "cache" / "filled.bin", dtype=np.uint8)
    assert filled.tolist() == [1] * 32 + [0] * 32  # the two batches written before the kill, nothing after
    resumed = subprocess.run([*command, "0"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "teacher_runs=2 filled=1.0" in resumed.stdout  # only the two missing batches ran the teacher


def _shifted(sample, generator):  # type: ignore[no-untyped-def]
    x, y = sample
    return x + torch.randn(x.shape, generator=generator), y


def _unseeded(sample, generator):  # type: ignore[no-untyped-def]
    x, y = sample
    return x + torch.randn(x.shape), y  # ignores the generator: a new image every epoch


def test_seeded_views_are_cached_and_unseeded_augmentation_is_caught(tmp_path):
    base = TensorDataset(*make_data(64))
    cache = TeacherCache(tmp_path / "views")
    _fit(tmp_path, cache, epochs=4, dataset=IndexedDataset(base, augment=_shifted, views=2))
    assert json.loads((tmp_path / "views" / "meta.json").read_text())["views"] == 2
    assert 0.5 < cache.filled_fraction() <= 1.0 and cache.teacher_runs < 16
    with pytest.raises(RuntimeError, match=r"inputs of \d+ of 16 samples at epoch 1 .* the inputs changed since"):
        _fit(tmp_path, TeacherCache(tmp_path / "stale"), epochs=2, dataset=IndexedDataset(base, augment=_unseeded))


class RankCacheChecks(L.Callback):
    def __init__(self, callback: DistillationCallback) -> None:
        self.callback = callback

    def on_train_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        cache = self.callback.cache
        assert cache is not None and cache.filled_fraction() == 1.0
        assert cache.teacher_runs == 2  # this rank's 2 batches of epoch 1; epoch 2 read rows the other rank wrote too


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_ranks_fill_their_own_rows_of_one_cache(tmp_path):
    callback = DistillationCallback(trained_teacher(), cache=TeacherCache(tmp_path / "cache"))
    loader = DataLoader(IndexedDataset(TensorDataset(*make_data(64))), batch_size=16, shuffle=True)
    trainer = make_trainer(
        tmp_path,
        strategy="ddp_spawn",
        devices=2,
        max_epochs=2,
        limit_train_batches=None,
        callbacks=[callback, RankCacheChecks(callback)],
    )
    trainer.fit(DistillModule(student=tiny_student(), alpha=0.5, temperature=2.0), loader)
    assert np.fromfile(tmp_path / "cache" / "filled.bin", dtype=np.uint8).all()


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda p: TeacherCache(p, top_k=0), ValueError, "`top_k` must be None"),
        (lambda p: TeacherCache(p, on_mismatch="fix"), ValueError, "`on_mismatch` must be 'refuse' or 'rebuild'"),
        (lambda p: IndexedDataset([1, 2], views=2), ValueError, "`views=2` without `augment`"),
        (lambda p: DistillationCallback(TinyTeacher(), cache=str(p)), TypeError, "`cache` must be a TeacherCache"),
        (lambda p: TeacherCache(p, verify="yes"), TypeError, "`verify` must be True or False, got 'yes'"),
        (lambda p: IndexedDataset([1, 2], views=0), ValueError, "`views` must be an int >= 1, got 0"),
        (lambda p: IndexedDataset([1, 2], augment="flip"), TypeError, "`augment` must be a callable .* got str"),
    ],
)
def test_bad_cache_arguments_are_explained(tmp_path, make, error, match):
    with pytest.raises(error, match=match):
        make(tmp_path)


@pytest.mark.parametrize(
    ("top_k", "module_kwargs", "match"),
    [
        (
            None,
            {
                "feature_maps": [
                    FeatureMap(student="1", teacher="body.1", projector="linear", student_dim=6, teacher_dim=16)
                ]
            },
            "outputs only, but the module has feature maps",
        ),
        (2, {"divergence": "js"}, "supports divergence='kl' only, got 'js'"),
        (2, {"temperature": LinearWarmup(2.0, warmup=3, start=1.0)}, "the temperature is scheduled"),
    ],
)
def test_a_cache_the_loss_cannot_use_is_refused_at_setup(tmp_path, top_k, module_kwargs, match):
    with pytest.raises(ValueError, match=match):
        _fit(tmp_path, TeacherCache(tmp_path / "cache", top_k=top_k), epochs=1, **module_kwargs)


def test_batches_without_sample_identity_are_refused(tmp_path):
    with pytest.raises(TypeError, match=r"needs each batch's sample indices.*IndexedDataset\(dataset\)"):
        _fit(tmp_path, TeacherCache(tmp_path / "cache"), epochs=1, dataset=TensorDataset(*make_data(64)))


class OutOfRange(torch.utils.data.Dataset):
    """Claims 64 samples but labels one of them with index 64."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        x, y = make_data(64)
        return Indexed(index=64 if i == 5 else i, view=0, sample=(x[i], y[i]))


def test_a_sample_index_outside_the_cache_is_named(tmp_path):
    with pytest.raises(IndexError, match=r"out of the cache's range \(64 samples x 1 views\): index \[64\]"):
        _fit(tmp_path, TeacherCache(tmp_path / "cache"), epochs=1, dataset=OutOfRange())


class SequenceTeacher(torch.nn.Module):
    def forward(self, x):  # type: ignore[no-untyped-def]
        return x[:, None, :4].expand(-1, 3, -1)  # (B, L=3, V=4) token logits


def test_token_level_logits_are_not_cached(tmp_path):
    with pytest.raises(ValueError, match=r"one logits row per sample, but the teacher returned \(16, 3, 4\)"):
        _fit(tmp_path, TeacherCache(tmp_path / "cache"), epochs=1, teacher=SequenceTeacher())


class ScaledTeacher(torch.nn.Module):
    """Logits ``x[:, :4] * scale``, plus a NaN in sample 3's first logit when ``nan``."""

    def __init__(self, scale: float, nan: bool = False) -> None:
        super().__init__()
        self.scale, self.nan = scale, nan

    def forward(self, x):  # type: ignore[no-untyped-def]
        logits = x[:, :4] * self.scale
        if self.nan:
            logits = logits.clone()
            logits[x[:, 0] == x[:, 0].max(), 0] = float("nan")
        return logits


@pytest.mark.parametrize(
    ("teacher", "match"),
    [
        (ScaledTeacher(1e6), r"not finite once stored as float16 .* 0 NaN, 0 inf, largest \|logit\| .*65504"),
        (ScaledTeacher(1.0, nan=True), r"not finite once stored as float16 \(rows \[\d+\]; the logits hold 1 NaN"),
    ],
)
def test_rows_that_would_not_be_finite_are_never_stored(tmp_path, teacher, match):
    # float16 holds at most 65504: a teacher whose logits are larger would be cached as inf; the cache refuses
    # (even with check_finite=False), and nothing is marked stored, so a rerun refuses again instead of reading it.
    for _ in range(2):
        cache = TeacherCache(tmp_path / "cache")
        callback = DistillationCallback(teacher, cache=cache, check_finite=False, check_accuracy=False)
        loader = DataLoader(IndexedDataset(TensorDataset(*make_data(64))), batch_size=16)
        trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=None, callbacks=[callback])
        with pytest.raises(FloatingPointError, match=match):
            trainer.fit(DistillModule(student=tiny_student(), alpha=0.5, temperature=2.0), loader)
        assert cache.filled_fraction() == 0.0


class Batched(torch.utils.data.Dataset):
    """A dataset with its own ``__getitems__``; ``short`` makes it return one sample too few."""

    def __init__(self, short: bool = False) -> None:
        self.data, self.short, self.calls = make_data(8), short, 0

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        return self.data[0][i], self.data[1][i]

    def __getitems__(self, indices):  # type: ignore[no-untyped-def]
        self.calls += 1
        return [self[i] for i in indices][: len(indices) - self.short]


def _same_items(got, want) -> None:  # type: ignore[no-untyped-def]
    assert [(g.index, g.view) for g in got] == [(w.index, w.view) for w in want]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.sample, w.sample, rtol=0, atol=0)


def test_a_batch_of_items_is_the_items_one_by_one():
    indices = [5, 0, 7, 5]
    plain = IndexedDataset(TensorDataset(*make_data(8)))
    _same_items(plain.__getitems__(indices), [plain[i] for i in indices])
    inner = Batched()
    batched = IndexedDataset(inner)
    _same_items(batched.__getitems__(indices), [batched[i] for i in indices])
    assert inner.calls == 1  # the wrapped dataset's own batch fetch, once

    def shift(sample, generator):  # type: ignore[no-untyped-def]
        return sample[0] + torch.rand((), generator=generator), sample[1]

    views = IndexedDataset(TensorDataset(*make_data(8)), augment=shift, views=3, seed=1)
    torch.manual_seed(0)
    got = views.__getitems__(indices)
    torch.manual_seed(0)
    _same_items(got, [views[i] for i in indices])  # the same views drawn, in the same order
    loader = DataLoader(plain, batch_size=4)
    assert torch.equal(next(iter(loader)).index, torch.arange(4))
    with pytest.raises(RuntimeError, match=r"Batched.__getitems__ returned 3 samples for 4 indices"):
        IndexedDataset(Batched(short=True)).__getitems__(indices)
