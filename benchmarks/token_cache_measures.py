"""The cache's own measurements for ``token_cache.py``: the pre-pass, size, fidelity, pre-pass throughput.

See ``token_cache.py``'s docstring (parts 1, 2 and 5) for what each measurement is and how it is taken.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import benchmark_trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_distill import IndexedDataset, TokenCache, TokenCachePass
from lightning_distill._batches import split_batch
from lightning_distill.demos import MarkovDataset
from lightning_distill.losses.functional.topk import topk_kd_loss
from lightning_distill.teacher._digest import input_digests
from lightning_distill.teacher._token_codec import decode_tokens, encode_tokens, token_dtype

TOP_K, BATCH, SAMPLE_BYTES = 16, 32, 25
VOCABS = (64, 50257, 65536, 128256)
DISTILLKIT = "DistillKit, ~114-300 bytes a token (its budget and its recommendation, as cited in the issue)"
RANDOM_VOCAB, RANDOM_CHUNK, RHO = 50257, 256, 0.9


# -------------------------------------------------------------------------------------------------------- pre-pass
def pre_pass(teacher: nn.Module, data: Dataset[Any], directory: Path, batch: int = BATCH) -> TokenCachePass:
    """Write the teacher's top-16 distributions of ``data`` into a new cache at ``directory``."""
    cache_pass = TokenCachePass(teacher, TokenCache(directory, top_k=TOP_K), temperature=1.0, shift_labels=True)
    trainer = benchmark_trainer(1, [])
    trainer.predict(
        cache_pass, dataloaders=DataLoader(IndexedDataset(data), batch_size=batch), return_predictions=False
    )
    if cache_pass.tokens_written == 0:
        raise RuntimeError(f"The pre-pass into {directory} wrote nothing (a stale cache there?).")
    return cache_pass


# ------------------------------------------------------------------------------------------------------------ size
@dataclass(frozen=True)
class Files:
    """A real pre-pass's files: tokens stored, samples, bytes of tokens.bin + samples.bin, and of every file."""

    label: str
    vocab: int
    tokens: int
    samples: int
    data_bytes: int
    all_bytes: int


def measure_files(label: str, directory: Path, vocab: int, tokens: int, samples: int) -> Files:
    files = [p for p in directory.rglob("*") if p.is_file()]
    data = sum(p.stat().st_size for p in files if p.name in ("tokens.bin", "samples.bin"))
    return Files(label, vocab, tokens, samples, data, sum(p.stat().st_size for p in files))


def size_tables(measured: Sequence[Files]) -> tuple[list[str], list[str]]:
    files = [
        "| pre-pass | vocabulary | tokens stored | tokens a sample | bytes a token (tokens.bin + samples.bin) "
        "| bytes a token (every file) | record (token_dtype) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for f in measured:
        files.append(
            f"| {f.label} | {f.vocab} | {f.tokens} | {f.tokens / f.samples:.1f} | {f.data_bytes / f.tokens:.2f} | "
            f"{f.all_bytes / f.tokens:.2f} | {token_dtype(TOP_K, f.vocab).itemsize} |"
        )
    short = measured[0].tokens / measured[0].samples  # the Markov sequences: the shortest, the per-sample share largest
    records = [
        f"| vocabulary | index type | record bytes (k = {TOP_K}) | + 25 B a sample at {short:.1f} tokens a sample | "
        "+ 25 B a sample at 512 tokens a sample | target <= 64 (vocabulary <= 65 536) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for vocab in VOCABS:
        dtype = token_dtype(TOP_K, vocab)
        record = dtype.itemsize
        worst = record + SAMPLE_BYTES / short
        verdict = ("**met**" if worst <= 64 else "**NOT met**") if vocab <= 65536 else "(no target)"
        records.append(
            f"| {vocab} | {dtype['indices'].base.name} | {record} | {worst:.1f} | {record + SAMPLE_BYTES / 512:.1f} | "
            f"{verdict} |"
        )
    records.append(f"| for comparison: {DISTILLKIT} | | 114-300 | | | |")
    return files, records


# -------------------------------------------------------------------------------------------------------- fidelity
def full_kl(teacher: Tensor, student: Tensor) -> Tensor:
    """Per-row ``KL(softmax(teacher) || softmax(student))`` of logits ``(N, V)``, float64."""
    log_p, log_s = teacher.double().log_softmax(-1), student.double().log_softmax(-1)
    return (log_p.exp() * (log_p - log_s)).sum(-1)


def topk_kl(values: Tensor, indices: Tensor, tail: Tensor, student: Tensor) -> Tensor:
    """Per-row top-k KL with the tail as one bucket (the formula of ``losses.functional.topk``), float64."""
    log_s = student.double().log_softmax(-1)
    values, tail = values.double().clamp(min=-1e4), tail.double()
    head = (values.exp() * (values - log_s.gather(-1, indices))).sum(-1)
    log_s_tail = torch.logsumexp(log_s.scatter(-1, indices, float("-inf")), dim=-1)
    return head + torch.xlogy(tail, tail) - tail * log_s_tail


def encode_decode(teacher: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The cache's round trip of logits ``(N, V)``: 8-bit records, decoded (values, indices, tail)."""
    fields = encode_tokens(teacher, TOP_K, 1.0)
    records = np.zeros(teacher.shape[0], dtype=token_dtype(TOP_K, teacher.shape[-1]))
    for name, value in fields.items():
        records[name] = value
    return decode_tokens(records, torch.device("cpu"))


def float_topk(teacher: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Top-16 log-probabilities in float32 and the exact tail (no quantization)."""
    log_p = teacher.float().log_softmax(-1)
    values, indices = log_p.topk(TOP_K, dim=-1)
    return values, indices, torch.logsumexp(log_p.scatter(-1, indices, float("-inf")), dim=-1).exp()


@dataclass
class Fidelity:
    """Per-position KLs of one setting: full, top-16 float32, top-16 8-bit (the cache); the top-16 mass."""

    full: list[Tensor]
    truncated: list[Tensor]
    cached: list[Tensor]
    mass: list[Tensor]

    def add(self, full: Tensor, truncated: Tensor, cached: Tensor, mass: Tensor) -> None:
        self.full.append(full)
        self.truncated.append(truncated)
        self.cached.append(cached)
        self.mass.append(mass)

    def row(self, label: str) -> str:
        full, truncated, cached = (torch.cat(x) for x in (self.full, self.truncated, self.cached))
        total = (cached - full).abs() / full
        cut = (full - truncated) / full
        codec = (cached - truncated).abs() / full

        def med_max(x: Tensor) -> str:
            return f"{100 * float(x.median()):.3f} / {100 * float(x.max()):.2f}"

        loss = abs(float(cached.mean() / full.mean()) - 1)
        return (
            f"| {label} | {len(full)} | {float(torch.cat(self.mass).median()):.3f} | {float(full.mean()):.4f} | "
            f"{med_max(total)} | {100 * loss:.3f} | {med_max(cut)} | {med_max(codec)} |"
        )


FIDELITY_HEADER = [
    "| setting | positions | median top-16 mass | mean full KL (nats) | cache vs full KL: rel. error % per position "
    "(median / max) | cache vs full: rel. error % of the mean | truncation alone % (median / max) | "
    "8-bit codec alone % of the full KL (median / max) |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
]


def random_fidelity(positions: int, scale: float) -> Fidelity:
    """Teacher ``scale * g``, student ``scale * (rho g + sqrt(1 - rho^2) g')`` at V = 50 257, in chunks."""
    generator = torch.Generator().manual_seed(int(10 * scale))
    found = Fidelity([], [], [], [])
    for start in range(0, positions, RANDOM_CHUNK):
        rows = min(RANDOM_CHUNK, positions - start)
        g = torch.randn(rows, RANDOM_VOCAB, generator=generator)
        noise = torch.randn(rows, RANDOM_VOCAB, generator=generator)
        teacher, student = scale * g, scale * (RHO * g + math.sqrt(1 - RHO**2) * noise)
        values, indices, tail = float_topk(teacher)
        decoded = encode_decode(teacher)
        check_against_library(student, *decoded)
        found.add(
            full_kl(teacher, student), topk_kl(values, indices, tail, student), topk_kl(*decoded, student), 1 - tail
        )
    return found


def check_against_library(student: Tensor, values: Tensor, indices: Tensor, tail: Tensor) -> None:
    """This script's per-position top-k KL averages to the library's ``topk_kd_loss`` (the loss a fit trains on)."""
    ours = float(topk_kl(values, indices, tail, student).mean())
    library = float(topk_kd_loss(student, values, indices, tail, temperature=1.0))
    if not math.isclose(ours, library, rel_tol=1e-4, abs_tol=1e-6):
        raise RuntimeError(f"The benchmark's top-k KL {ours} differs from topk_kd_loss {library}.")


def markov_fidelity(teacher: nn.Module, student: nn.Module, data: MarkovDataset, directory: Path) -> Fidelity:
    """The Markov teacher's logits against its distributions read back from the cache at ``directory``."""
    cache = TokenCache(directory, top_k=TOP_K)
    cache.open_reader({"num_samples": len(data), "views": 1, "shift_labels": True, "ignore_index": -100})
    found = Fidelity([], [], [], [])
    teacher.eval()
    student.eval()
    try:
        for batch in DataLoader(IndexedDataset(data), batch_size=BATCH):
            inputs, _ = split_batch(batch)
            rows = cache.rows(batch, len(data), 1)
            digests = input_digests(inputs, len(rows))
            assert digests is not None
            stored = cache.load(rows, digests, torch.device("cpu"))
            assert stored.positions is not None
            where = (stored.positions[:, 0], stored.positions[:, 1])  # each stored row's (sample, position)
            with torch.no_grad():
                t_logits, s_logits = teacher(**inputs)[where], student(**inputs)[where]
            values, indices, tail = float_topk(t_logits)
            cached = (stored.values, stored.indices, stored.tail)
            check_against_library(s_logits, *cached)
            found.add(
                full_kl(t_logits, s_logits),
                topk_kl(values, indices, tail, s_logits),
                topk_kl(*cached, s_logits),
                1 - tail,
            )
    finally:
        cache.close()
    return found


# -------------------------------------------------------------------------------------------- pre-pass throughput
def forward_loop(teacher: nn.Module, data: Dataset[Any], batch: int) -> float:
    """Wall seconds of the teacher's forward over the pre-pass's DataLoader (the same batches), nothing else."""
    teacher.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for item in DataLoader(IndexedDataset(data), batch_size=batch):
            inputs, _ = split_batch(item)
            teacher(**inputs)
    return time.perf_counter() - start


@dataclass
class Throughput:
    """Per round: stored tokens, forward-loop seconds, the pass's teacher seconds and whole seconds."""

    tokens: list[int]
    forward: list[float]
    teacher: list[float]
    whole: list[float]


def throughput(teacher: nn.Module, data: Dataset[Any], batch: int, rounds: int, scratch: Path, name: str) -> Throughput:
    found = Throughput([], [], [], [])
    for index in range(rounds):
        for kind in ("forward", "pass") if index % 2 == 0 else ("pass", "forward"):
            if kind == "forward":
                found.forward.append(forward_loop(teacher, data, batch))
                continue
            done = pre_pass(teacher, data, scratch / f"{name}-{index}", batch)
            found.tokens.append(done.tokens_written)
            found.teacher.append(done.teacher_seconds)
            found.whole.append(done.seconds)
    return found


def throughput_table(measured: Mapping[str, Throughput]) -> tuple[list[str], list[str]]:
    lines = [
        "| teacher | stored tokens | forward loop, tokens/s | pre-pass: its teacher forward, tokens/s "
        "| whole pre-pass (Trainer.predict), tokens/s | pre-pass / forward loop time (median of rounds) "
        "| per-round ratios |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    notes = []
    for label, t in measured.items():
        tokens = t.tokens[0]
        ratios = [w / f for w, f in zip(t.whole, t.forward, strict=True)]
        lines.append(
            f"| {label} | {tokens} | {tokens / statistics.median(t.forward):,.0f} | "
            f"{tokens / statistics.median(t.teacher):,.0f} | {tokens / statistics.median(t.whole):,.0f} | "
            f"{statistics.median(ratios):.2f} | {', '.join(f'{r:.2f}' for r in ratios)} |"
        )
        notes.append(
            f"- Pre-pass, {label}: {tokens / statistics.median(t.whole):,.0f} stored tokens/s, "
            f"{statistics.median(ratios):.2f}x the time of the forward alone."
        )
    return lines, notes
