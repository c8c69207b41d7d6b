"""TokenCache: the 8-bit top-k codec against its documented error bound, the on-disk sizes, the stored positions, the
loss a fit from the cache computes (chunked or not), and bad inputs (token rows in the loss: test_token_cache_loss.py).

Every expectation is computed independently of the library: float64 numpy references for the probabilities and the
KL terms, hand-written loops for the positions, closed forms for the record sizes.
"""

from __future__ import annotations

import copy
import functools
import math

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_distill import CachedTeacher, DistillModule, IndexedDataset, TokenCache, TokenCachePass
from lightning_distill.demos import MarkovDataset, MarkovLanguage, TinyCausalLM
from lightning_distill.losses.functional import kd_loss
from lightning_distill.losses.functional.topk import topk_kd_loss
from lightning_distill.teacher._token_codec import (
    decode_tokens,
    encode_tokens,
    error_radius,
    index_dtype,
    token_dtype,
)
from lightning_distill.teacher._token_files import SAMPLE_DTYPE
from lightning_distill.teacher._token_pass import stored_positions
from tests.helpers.token_cache import _trainer

CPU = torch.device("cpu")
EPS32 = float(np.finfo(np.float32).eps)
FLOOR = -1.0e4  # the documented log-probability of a zero probability (LOG_ZERO)


# ------------------------------------------------------------------------------------------- float64 references
def _records(logits: torch.Tensor, top_k: int, temperature: float) -> np.ndarray:
    fields = encode_tokens(logits, top_k, temperature)
    records = np.zeros(logits.shape[0], dtype=token_dtype(top_k, logits.shape[-1]))
    records["position"] = np.arange(logits.shape[0])
    for name, value in fields.items():
        records[name] = value
    return records


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(x - top), axis=axis)) + np.squeeze(top, axis)


def _log_softmax(logits: torch.Tensor, temperature: float) -> np.ndarray:
    z = logits.double().numpy() / temperature
    return z - _logsumexp(z)[:, None]


def _buckets(log_p: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 log-masses ``(N, k + 1)`` of the k classes ``indices`` and of the tail (all other classes)."""
    head = np.take_along_axis(log_p, indices, axis=-1)
    outside = log_p.copy()
    np.put_along_axis(outside, indices, -np.inf, axis=-1)
    return np.concatenate([head, _logsumexp(outside)[:, None]], axis=-1), outside


def _kl_buckets(log_p: np.ndarray, log_s: np.ndarray) -> np.ndarray:
    """``sum_j p_j (log p_j - log s_j)`` per row, with ``0 log 0 = 0``."""
    p = np.exp(log_p)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (log_p - log_s), 0.0)
    return terms.sum(-1)


class Quantized:
    """One batch of encoded rows and everything the documented bound speaks of, in float64."""

    def __init__(self, logits: torch.Tensor, top_k: int, temperature: float, records: np.ndarray | None = None) -> None:
        self.records = _records(logits, top_k, temperature) if records is None else records
        values, indices, tail = decode_tokens(self.records, CPU)
        self.values, self.indices, self.tail = values, indices, tail
        self.k, self.temperature = top_k, temperature
        self.log_p = _log_softmax(logits, temperature)
        self.idx = indices.numpy()
        self.true, _ = _buckets(self.log_p, self.idx)  # log p_j of the k + 1 buckets
        self.zero = self.records["codes"] == 255  # classes stored as probability zero
        delta, delta_tail = error_radius(self.records)
        self.delta = np.concatenate([np.repeat(delta[:, None], top_k, 1), delta_tail[:, None]], axis=-1)
        p = np.exp(self.true)
        p[:, :top_k][self.zero] = 0.0  # not a stored bucket
        self.zeta = np.log((p * np.exp(self.delta)).sum(-1))
        with np.errstate(divide="ignore"):
            decoded = np.concatenate([values.double().numpy(), np.log(tail.double().numpy())[:, None]], axis=-1)
        decoded[:, :top_k][self.zero] = -np.inf
        self.decoded = decoded  # log p^_j of the k + 1 buckets, -inf where nothing is stored
        # float32 rounding (the encoder computes log-softmax in float32): eps-relative to each log-probability
        self.slack = np.where(np.isfinite(self.true), 8 * EPS32 * (1.0 + np.abs(self.true)), 0.0)

    def student_buckets(self, student: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        log_s = _log_softmax(student, self.temperature)
        buckets, outside = _buckets(log_s, self.idx)
        with np.errstate(invalid="ignore"):  # k = V: nothing outside K (-inf - -inf)
            return buckets, outside - buckets[:, -1:]  # and log s^_j, the student renormalized outside K

    def kl_bound(self, log_s: np.ndarray) -> np.ndarray:
        """The documented bound on ``|KL_k(p^ || s) - KL_k(p || s)|`` per row."""
        p = np.exp(self.true)
        stored = np.ones_like(p, dtype=bool)
        stored[:, : self.k] = ~self.zero
        stored &= p > 0
        p_hat = np.exp(self.decoded)
        with np.errstate(invalid="ignore"):
            ratio = np.where(p > 0, np.abs(self.true - log_s), 0.0)
        radius = self.delta + self.zeta[:, None]
        bound = np.where(stored, p * np.expm1(radius) * ratio + p_hat * radius, 0.0).sum(-1)
        zeroed = np.zeros_like(p, dtype=bool)
        zeroed[:, : self.k] = self.zero
        return bound + np.where(zeroed, p * ratio, 0.0).sum(-1)


def _truncation(q: Quantized, log_s_out: np.ndarray) -> np.ndarray:
    """``m log(1 / min_{j not in K} s^_j)`` per row (0 without a class outside the top-k, or without tail mass)."""
    m = np.exp(q.true[:, -1])
    smallest = np.min(np.where(np.isfinite(log_s_out), log_s_out, np.inf), -1)
    with np.errstate(invalid="ignore"):
        return np.where((m > 0) & np.isfinite(smallest), m * -smallest, 0.0)


def _logits(rows: int, vocab: int, scale: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen) * scale


# flat, typical and peaked logits (30: classes beyond the 40-nat range), at several temperatures
SCALES_AND_TEMPERATURES = [
    (0.01, 1.0),
    (0.01, 4.0),
    (1.0, 0.5),
    (1.0, 1.0),
    (4.0, 0.5),
    (4.0, 4.0),
    (30.0, 0.5),
    (30.0, 4.0),
]
CASES = [
    (vocab, k, scale, temperature)
    for vocab in (50, 5000)
    for k in sorted({1, 16, vocab})
    for scale, temperature in SCALES_AND_TEMPERATURES
]


# --------------------------------------------------------------------------------------------------- error bound
@pytest.mark.parametrize(("vocab", "k", "scale", "temperature"), CASES)
def test_error_bound_per_bucket_and_kl(vocab: int, k: int, scale: float, temperature: float) -> None:
    """(a) each decoded bucket within delta_j + zeta of the float64 truth; (b) the KL_k bound; (c) full KL bound."""
    seed = vocab * 7 + k * 13 + int(scale * 100) + int(temperature * 10)
    rows = 24 if vocab < 1000 else 12
    logits = _logits(rows, vocab, scale, seed)
    q = Quantized(logits, k, temperature)

    # (a) classes: in log space
    head_err = np.abs(q.decoded[:, :k] - q.true[:, :k])
    allowed = q.delta[:, :k] + q.zeta[:, None] + q.slack[:, :k]
    assert (head_err[~q.zero] <= allowed[~q.zero]).all(), float((head_err - allowed)[~q.zero].max())
    # a class is zeroed only when it is more than 40 nats below the top (minus float16 rounding of the top)
    gap = q.true[:, :1] - q.true[:, :k]
    assert (gap[q.zero] > 40.0 - 2e-2).all()
    assert (q.values.numpy()[q.zero] == FLOOR).all()
    # the tail, in mass (its float32 mass may be subnormal): |m^ - m| <= m (e^(delta + zeta) - 1)
    m, m_hat = np.exp(q.true[:, -1]), q.tail.double().numpy()
    radius = q.delta[:, -1] + q.zeta + q.slack[:, -1]
    assert (np.abs(m_hat - m) <= m * np.expm1(radius) + 2.0**-126).all()
    if k == vocab:
        assert (q.tail == 0).all() and (q.records["log_tail"] == np.float16(FLOOR)).all()
        assert (q.delta[:, -1] == 0).all()
    # the decoded buckets are a distribution
    total = q.values.double().exp().sum(-1) + q.tail.double()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)

    # (b) KL_k(p^ || s) against KL_k(p || s), for random students (near the teacher and unrelated)
    for student in (logits + 0.5 * _logits(rows, vocab, scale + 0.1, seed + 1), _logits(rows, vocab, 3.0, seed + 2)):
        log_s, log_s_out = q.student_buckets(student)
        kl_true = _kl_buckets(q.true, log_s)
        kl_hat = _kl_buckets(q.decoded, log_s)
        bound = q.kl_bound(log_s)
        tol = 1e-6 * (1.0 + np.abs(kl_true))
        assert (np.abs(kl_hat - kl_true) <= bound + tol).all(), float((np.abs(kl_hat - kl_true) - bound).max())

        # the library's loss is T^2 times the mean of KL_k(p^ || s) (float64 reference)
        loss = topk_kd_loss(student, q.values, q.indices, q.tail, temperature)
        expected = temperature**2 * kl_hat.mean()
        assert math.isclose(float(loss), expected, rel_tol=2e-5, abs_tol=1e-6 * temperature**2)

        # (c) the full KL minus the cached loss, per row, within [-B_q, m log(1 / min_{j not in K} s^_j) + B_q]
        kl_full = _kl_buckets(q.log_p, _log_softmax(student, temperature))
        truncation = _truncation(q, log_s_out)
        gap = kl_full - kl_hat
        assert (gap >= -bound - tol).all()
        assert (gap <= truncation + bound + tol).all()
        # and on the mean, with the library's value
        mean_gap = kl_full.mean() - float(loss) / temperature**2
        assert -bound.mean() - 1e-5 <= mean_gap <= truncation.mean() + bound.mean() + 1e-5


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_error_bound_is_not_vacuous(temperature: float) -> None:
    """(d) on LM-like logits the cached loss is within 2 % of the exact top-k loss, and so is the bound itself."""
    logits = _logits(64, 5000, 4.0, 11)
    student = logits + _logits(64, 5000, 2.0, 12)
    q = Quantized(logits, 16, temperature)
    log_s, _ = q.student_buckets(student)
    exact = temperature**2 * _kl_buckets(q.true, log_s).mean()
    cached = float(topk_kd_loss(student, q.values, q.indices, q.tail, temperature))
    assert abs(cached - exact) / exact < 0.02
    assert temperature**2 * q.kl_bound(log_s).mean() / exact < 0.1
    # the per-class radius really is about step / 2 with step ~ (v_1 - v_k) / 254
    spread = q.true[:, 0] - q.true[:, 15]
    assert (q.delta[:, 0] <= (spread / 254 + 2e-3) / 2 + 1e-3).all()


def test_far_below_top_and_masked_classes_decode_to_zero() -> None:
    """More than 40 nats below the top: exactly zero; -inf logits: exactly zero; k = V: an empty tail exactly."""
    vocab = 12
    row = torch.tensor([0.0, -5.0, -39.0, -39.9, -40.2, -41.0, -60.0, -500.0, -float("inf"), -1.0, -2.0, -float("inf")])
    records = _records(row[None], vocab, 1.0)
    values, indices, tail = decode_tokens(records, CPU)
    prob = torch.zeros(vocab, dtype=torch.float64)
    prob[indices[0]] = values[0].double().exp()
    log_p = _log_softmax(row[None], 1.0)[0]
    top = log_p.max()
    far = torch.from_numpy(top - log_p > 40.0)
    assert far.sum() == 6  # -40.2 (41.2 below the top), -41, -60, -500 and the two -inf
    assert (prob[far] == 0).all()
    assert (prob[~far] > 0).all()  # -39.9: 39.9 nats below the top, kept
    assert float(tail[0]) == 0.0 and (records["log_tail"] == np.float16(FLOOR)).all()
    assert error_radius(records)[1][0] == 0.0

    # masked classes in the tail of k < V: the tail is exactly 0 when every class outside the top-k is masked
    row = torch.tensor([[2.0, 1.0, 0.5, -float("inf"), -float("inf")]])
    records = _records(row, 3, 1.0)
    values, indices, tail = decode_tokens(records, CPU)
    assert float(tail[0]) == 0.0 and error_radius(records)[1][0] == 0.0
    assert set(indices[0].tolist()) == {0, 1, 2}
    expected = torch.from_numpy(_log_softmax(row, 1.0)[0, :3])
    assert torch.allclose(values[0].double(), expected, atol=2e-2)

    # a masked class inside the top-k (k = V): probability 0, and the others are the renormalized softmax, within
    # the bound; the masked class (stored as zero) does not widen the step: it spans the kept classes only,
    # (3 - 0) / T nats below the top
    row = torch.tensor([[3.0, -float("inf"), 1.0, 0.0]])
    records = _records(row, 4, 2.0)
    values, indices, tail = decode_tokens(records, CPU)
    prob = torch.zeros(4, dtype=torch.float64).index_put_((indices[0],), values[0].double().exp())
    assert prob[1] == 0 and float(tail[0]) == 0.0
    delta = float(error_radius(records)[0][0])
    assert math.isclose(delta, 1.5 / 254 / 2, rel_tol=2e-3)
    log_ref = torch.log_softmax(row[0].double() / 2.0, -1)
    kept = torch.tensor([0, 2, 3])
    assert ((prob[kept].log() - log_ref[kept]).abs() <= 2 * delta).all()


# ---------------------------------------------------------------------------------------------------------- sizes
def test_record_sizes() -> None:
    for vocab, dtype in [(2, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16), (65537, np.uint32)]:
        assert index_dtype(vocab) == np.dtype(dtype)
        for k in (1, 5, 16, 64):
            # position (4) + k indices + k codes + top, step, log tail (3 float16)
            assert token_dtype(k, vocab).itemsize == 4 + k * np.dtype(dtype).itemsize + k + 6
    for vocab in (257, 1000, 32000, 50257, 65536):
        assert token_dtype(16, vocab).itemsize == 58
        assert TokenCache("unused", top_k=16).bytes_per_token(vocab) == 58
    assert token_dtype(16, 256).itemsize == 42 and token_dtype(16, 65537).itemsize == 90
    assert SAMPLE_DTYPE.itemsize == 25
    per_token = [(58 * n + SAMPLE_DTYPE.itemsize) / n for n in range(1, 200)]
    assert all(b <= 64 for b in per_token[4:]) and per_token[3] > 64  # >= 5 stored tokens: at most 64 bytes
    with pytest.raises(ValueError, match=r"32-bit"):
        index_dtype(2**32 + 1)


class HoledLabels(Dataset):
    """A MarkovDataset whose labels are also ``ignore_index`` at a few real positions (a masked prompt)."""

    def __init__(self, base: MarkovDataset, ignore_index: int = -100) -> None:
        self.base, self.ignore_index = base, ignore_index

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = dict(self.base[i])
        labels = item["labels"].clone()
        if i % 3 == 0:
            labels[1] = self.ignore_index
        if i % 4 == 1:
            labels[3] = self.ignore_index
        item["labels"] = labels
        return item


VOCAB = 300  # > 256: uint16 indices, 58-byte records
TEMPERATURE = 2.0


def _expected_positions(batch: dict[str, torch.Tensor], shift: bool, ignore_index: int = -100) -> list[list[int]]:
    """Hand-written rule: the positions a DistillModule's loss counts."""
    out = []
    for mask, labels in zip(batch["attention_mask"].tolist(), batch["labels"].tolist(), strict=True):
        length = len(mask)
        if shift:
            out.append([t for t in range(length - 1) if mask[t + 1] == 1 and labels[t + 1] != ignore_index])
        else:
            out.append([t for t in range(length) if mask[t] == 1 and labels[t] != ignore_index])
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A real pre-pass over a Markov dataset with random lengths and holes in its labels."""
    torch.manual_seed(0)
    language = MarkovLanguage(vocab_size=VOCAB, branching=5, seed=0)
    data = HoledLabels(MarkovDataset(language, 20, max_length=12, min_length=7, seed=3))
    train = IndexedDataset(data)
    teacher = TinyCausalLM(VOCAB, dim=16, layers=1, heads=2, max_length=12)
    path = tmp_path_factory.mktemp("token-cache")
    cache = TokenCache(path, top_k=16)
    prepass = TokenCachePass(teacher, cache, temperature=TEMPERATURE, shift_labels=True)
    _trainer().predict(prepass, dataloaders=DataLoader(train, batch_size=8), return_predictions=False)
    full = {key: torch.stack([data[i][key] for i in range(len(data))]) for key in data[0]}
    return {"path": path, "train": train, "teacher": teacher, "pass": prepass, "batch": full}


def _read_shard(path: object) -> tuple[np.ndarray, np.ndarray]:
    shard = next(iter(sorted(p for p in path.iterdir() if p.name.startswith("shard-"))))  # type: ignore[attr-defined]
    tokens = np.fromfile(shard / "tokens.bin", dtype=token_dtype(16, VOCAB))
    samples = np.fromfile(shard / "samples.bin", dtype=SAMPLE_DTYPE)
    return tokens, samples


def test_files_have_the_formula_sizes(written: dict[str, object]) -> None:
    path, prepass = written["path"], written["pass"]
    expected = _expected_positions(written["batch"], shift=True)  # type: ignore[arg-type]
    stored = sum(len(p) for p in expected)
    assert prepass.tokens_written == stored and prepass.rows_written == 20  # type: ignore[attr-defined]
    shard = next(p for p in path.iterdir() if p.name.startswith("shard-"))  # type: ignore[attr-defined]
    tokens_bytes, samples_bytes = (shard / "tokens.bin").stat().st_size, (shard / "samples.bin").stat().st_size
    assert tokens_bytes == 58 * stored and samples_bytes == 25 * 20
    assert min(len(p) for p in expected) >= 5
    per_token = (tokens_bytes + samples_bytes) / stored
    assert per_token == 58 + 25 * 20 / stored and per_token <= 64


# ----------------------------------------------------------------------------------------------- stored positions
def test_stored_positions_follow_the_loss_rule() -> None:
    gen = torch.Generator().manual_seed(5)
    batch_size, length = 6, 9
    lengths = torch.randint(2, length + 1, (batch_size,), generator=gen)
    mask = (torch.arange(length) < lengths[:, None]).long()
    labels = torch.randint(1, 20, (batch_size, length), generator=gen).masked_fill(mask == 0, -100)
    labels[torch.rand(batch_size, length, generator=gen) < 0.2] = -7  # a custom ignore_index
    batch = {"input_ids": labels.clamp(min=0), "attention_mask": mask, "labels": labels}
    logits = torch.zeros(batch_size, length, 20)
    for shift in (True, False):
        got = stored_positions(
            {"input_ids": batch["input_ids"], "attention_mask": mask}, labels, logits, nn.Identity(), shift, -7
        )
        expected = _expected_positions(batch, shift, ignore_index=-7)
        assert [row.nonzero().flatten().tolist() for row in got] == expected
        # padding (label -100 with ignore_index -7) is still not stored: the attention mask rules
        assert not got[mask == 0].any() if not shift else not got[:, :-1][mask[:, 1:] == 0].any()
    # without an attention mask: the labels alone; without labels: everything real
    got = stored_positions({}, labels, logits, nn.Identity(), False, -7)
    assert torch.equal(got, labels != -7)
    got = stored_positions({"attention_mask": mask}, None, logits, nn.Identity(), True, -7)
    assert torch.equal(got[:, :-1], mask[:, 1:].bool()) and not got[:, -1].any()


def test_prepass_stores_exactly_the_counted_positions(written: dict[str, object]) -> None:
    expected = _expected_positions(written["batch"], shift=True)  # type: ignore[arg-type]
    tokens, samples = _read_shard(written["path"])
    assert (samples["filled"] == 1).all()
    for row, positions in enumerate(expected):
        start, count = int(samples["offset"][row]), int(samples["count"][row])
        assert tokens["position"][start : start + count].tolist() == positions
    assert int(samples["count"].sum()) == len(tokens)

    # the stored distributions are the teacher's (float64 reference) to within the bound
    batch = written["batch"]
    with torch.no_grad():
        logits = written["teacher"](batch["input_ids"], batch["attention_mask"])  # type: ignore[operator]
    rows = np.repeat(np.arange(20), samples["count"])
    q_logits = logits[torch.from_numpy(rows), torch.from_numpy(tokens["position"].astype(np.int64))]
    values, indices, _ = decode_tokens(tokens, CPU)
    log_p = _log_softmax(q_logits, TEMPERATURE)
    truth = np.take_along_axis(log_p, indices.numpy(), -1)
    delta, _ = error_radius(tokens)
    assert (np.abs(values.double().numpy() - truth) <= 2 * delta[:, None] + 1e-4).all()


# ------------------------------------------------------------------------------------------- the loss from cache
class FirstStep(L.Callback):
    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        if batch_idx == 0:
            self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}


def _fit_from_cache(written: dict[str, object], student: nn.Module, **module_kwargs: object) -> tuple[dict, nn.Module]:
    module = DistillModule(
        student=student,
        alpha=0.5,
        temperature=TEMPERATURE,
        shift_labels=True,
        optimizer=functools.partial(torch.optim.SGD, lr=0.5),
        **module_kwargs,  # type: ignore[arg-type]
    )
    first = FirstStep()
    trainer = _trainer(max_steps=1, callbacks=[CachedTeacher(TokenCache(written["path"], top_k=16)), first])
    trainer.fit(module, DataLoader(written["train"], batch_size=20, shuffle=False))  # type: ignore[arg-type]
    return first.metrics, module.student


def test_cached_fit_loss_equals_the_decoded_records_and_bounds_the_online_loss(written: dict[str, object]) -> None:
    torch.manual_seed(1)
    student = TinyCausalLM(VOCAB, dim=8, layers=1, heads=2, max_length=12)
    initial = copy.deepcopy(student)
    metrics, trained = _fit_from_cache(written, student)
    batch = written["batch"]
    with torch.no_grad():
        s_logits = initial(batch["input_ids"], batch["attention_mask"])
        t_logits = written["teacher"](batch["input_ids"], batch["attention_mask"])  # type: ignore[operator]

    # directly from the files: each stored record scores the student's logits at its own position
    tokens, samples = _read_shard(written["path"])
    rows = torch.from_numpy(np.repeat(np.arange(20), samples["count"]))
    positions = torch.from_numpy(tokens["position"].astype(np.int64))
    values, indices, tail = decode_tokens(tokens, CPU)
    direct = topk_kd_loss(s_logits[rows, positions], values, indices, tail, TEMPERATURE)
    assert math.isclose(metrics["train/kd_loss"], float(direct), rel_tol=1e-5)

    # the online loss from the teacher's full logits (shifted), within the documented bound of the cached one
    labels, mask = batch["labels"], batch["attention_mask"].bool()
    online = kd_loss(
        s_logits[:, :-1], t_logits[:, :-1], temperature=TEMPERATURE, mask=mask[:, 1:], target=labels[:, 1:]
    )
    q = Quantized(t_logits[rows, positions], 16, TEMPERATURE, records=tokens)  # the stored records, the true p
    log_s, log_s_out = q.student_buckets(s_logits[rows, positions])
    bound = TEMPERATURE**2 * q.kl_bound(log_s).mean()
    truncation = TEMPERATURE**2 * _truncation(q, log_s_out).mean()
    gap = float(online) - metrics["train/kd_loss"]
    assert -bound - 1e-5 <= gap <= truncation + bound + 1e-5, (gap, bound, truncation)
    # the untrained teacher is nearly flat over 300 classes, so the top-16 truncation dominates the gap; the 8-bit
    # quantization itself moves the loss by little: against the exact top-k loss of the float64 teacher
    exact = TEMPERATURE**2 * _kl_buckets(q.true, log_s).mean()
    assert abs(metrics["train/kd_loss"] - exact) / exact < 0.02

    # the step trained the student
    changed = [not torch.equal(a, b) for a, b in zip(initial.parameters(), trained.parameters(), strict=True)]
    assert any(changed)


def test_chunked_topk_loss_equals_unchunked_in_value_and_gradient() -> None:
    gen = torch.Generator().manual_seed(4)
    batch, length, vocab, k = 3, 5, 40, 8
    student = torch.randn(batch, length, vocab, generator=gen) * 2
    teacher = torch.randn(batch, length, vocab, generator=gen) * 2
    q = Quantized(teacher.reshape(-1, vocab), k, 2.0)
    values, indices, tail = (t.reshape(batch, length, *t.shape[1:]) for t in (q.values, q.indices, q.tail))
    mask = torch.rand(batch, length, generator=gen) < 0.7
    target = torch.randint(0, vocab, (batch, length), generator=gen)
    target[0, 1] = target[2, 3] = -100
    mask[1, 0] = True

    def loss_and_grad(chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        s = student.clone().requires_grad_(True)
        loss = topk_kd_loss(s, values, indices, tail, 2.0, mask=mask, target=target, chunk_size=chunk)
        loss.backward()
        return loss.detach(), s.grad

    reference, grad = loss_and_grad(None)
    counted = (mask & (target != -100)).reshape(-1).numpy()
    log_s, _ = q.student_buckets(student.reshape(-1, vocab))
    expected = 4.0 * _kl_buckets(q.decoded, log_s)[counted].mean()
    assert math.isclose(float(reference), expected, rel_tol=1e-5)
    assert (grad[~(mask & (target != -100))] == 0).all()
    for chunk in (1, 2, 4, 7, 15, 100):
        value, chunked_grad = loss_and_grad(chunk)
        assert torch.allclose(value, reference, rtol=1e-6, atol=0), chunk
        assert torch.allclose(chunked_grad, grad, rtol=1e-5, atol=1e-8), chunk


def test_module_with_kd_chunk_size_trains_from_the_cache(written: dict[str, object]) -> None:
    torch.manual_seed(2)
    student = TinyCausalLM(VOCAB, dim=8, layers=1, heads=2, max_length=12)
    plain_metrics, plain = _fit_from_cache(written, copy.deepcopy(student))
    chunk_metrics, chunked = _fit_from_cache(written, copy.deepcopy(student), kd_chunk_size=7)
    assert math.isclose(chunk_metrics["train/kd_loss"], plain_metrics["train/kd_loss"], rel_tol=1e-6)
    assert math.isclose(chunk_metrics["train/loss"], plain_metrics["train/loss"], rel_tol=1e-6)
    moved = 0.0
    for start, a, b in zip(student.parameters(), plain.parameters(), chunked.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
        moved += float((b - start).detach().abs().sum())
    assert moved > 0


# --------------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_are_refused_clearly(tmp_path: object) -> None:
    for top_k in (0, True, "3", -1, 2.0):
        with pytest.raises(ValueError, match=r"top_k"):
            TokenCache(tmp_path, top_k=top_k)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"on_mismatch.*'x'"):
        TokenCache(tmp_path, on_mismatch="x")
    cache = TokenCache(tmp_path)
    with pytest.raises(TypeError, match=r"teacher.*nn.Module"):
        TokenCachePass(lambda x: x, cache)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"cache.*TokenCache"):
        TokenCachePass(nn.Linear(2, 3), str(tmp_path))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"shift_labels.*'yes'"):
        TokenCachePass(nn.Linear(2, 3), cache, shift_labels="yes")  # type: ignore[arg-type]
    for temperature in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"temperature"):
            TokenCachePass(nn.Linear(2, 3), cache, temperature=temperature)
    with pytest.raises(TypeError, match=r"TokenCache"):
        CachedTeacher(str(tmp_path))  # type: ignore[arg-type]

    logits = torch.randn(3, 5)
    for top_k in (6, 0, True):
        with pytest.raises(ValueError, match=r"top_k.*\[1, 5\]"):
            encode_tokens(logits, top_k, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"temperature"):
        encode_tokens(logits, 2, 0.0)
    for bad in (float("nan"), float("inf")):
        broken = logits.clone()
        broken[1, 2] = bad
        with pytest.raises(FloatingPointError, match=r"1 of 3 token rows.*NaN or \+inf"):
            encode_tokens(broken, 2, 1.0)
    broken = logits.clone()
    broken[0] = broken[2] = -float("inf")
    with pytest.raises(FloatingPointError, match=r"2 of 3 token rows.*all -inf"):
        encode_tokens(broken, 2, 1.0)
