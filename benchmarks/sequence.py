"""Token-level KD: the chunked loss against the naive one at a 32k vocabulary, and distillation on a synthetic language.

Part 1, memory and time: ``kd_loss`` (KL, T = 2) forward and backward on float32 logits ``(B, L, V) = (4, 512,
32000)`` with a padding mask, naive (``chunk_size=None``) against ``chunk_size=256``. Each measurement runs in a fresh
child process: the logits are made, the peak RSS is reset (``/proc/self/clear_refs``), then forward + backward run
``--repeats`` times; the report gives the peak RSS above the logits (MB) and the median wall time per forward +
backward. Rounds alternate the order. Target: the chunked peak bounded by the chunk, time <= 1.2x the naive one.

Part 2, distillation on a synthetic language: a random Markov chain (64 tokens, 4 successors each) is the
"language"; a ``TinyCausalLM`` teacher (dim 64, 2 layers) learns it from 4096 sequences, then a small student (dim
16, 1 layer) is trained on 256 sequences alone (cross-entropy) or distilled (alpha 0.5, T 1, next-token shift). The
report gives held-out perplexity (exp of the mean next-token cross-entropy on 512 sequences) and the chain's own floor
``exp(entropy rate)``.

Run from the repository root::

    python benchmarks/sequence.py            # ~4 min on 2 cores
    python benchmarks/sequence.py --quick    # smoke run

``--plot PATH`` also draws the peak memory and time naive vs chunked, and the perplexities, to a PNG.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from common import (
    bar_panel,
    benchmark_trainer,
    machine_description,
    mean_std,
    proc_status_mb,
    pyplot,
    reset_peak_rss,
    save_figure,
    start_run,
)
from torch.utils.data import DataLoader

from lightning_distill import DistillationCallback, DistillModule
from lightning_distill.demos import MarkovDataset, MarkovLanguage, TinyCausalLM
from lightning_distill.losses.functional import kd_loss

CHUNK = 256


def measure_loss(positions: int, vocab: int, chunk: int | None, repeats: int) -> dict[str, float]:
    """In this (child) process: peak RSS above the inputs and median time of kd_loss forward + backward."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    batch = 4
    student = torch.randn(batch, positions // batch, vocab, requires_grad=True)
    teacher = torch.randn(batch, positions // batch, vocab)
    mask = torch.ones(batch, positions // batch, dtype=torch.bool)
    mask[:, -positions // batch // 8 :] = False  # padding at the end of every sequence
    kd_loss(student, teacher, temperature=2.0, mask=mask, chunk_size=chunk).backward()  # warm-up
    student.grad = None
    before = proc_status_mb("VmRSS")
    if not reset_peak_rss():
        raise RuntimeError("Cannot reset the peak RSS on this system (needs Linux /proc/self/clear_refs).")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        kd_loss(student, teacher, temperature=2.0, mask=mask, chunk_size=chunk).backward()
        times.append(time.perf_counter() - start)
        student.grad = None
    return {"peak_mb": proc_status_mb("VmHWM") - before, "seconds": statistics.median(times)}


def run_loss_child(args: argparse.Namespace, chunk: int | None) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", str(chunk or 0), "--positions", str(args.positions)]
    command += ["--vocab", str(args.vocab), "--repeats", str(args.repeats)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"The chunk={chunk} measurement failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def perplexity(model: torch.nn.Module, dataset: MarkovDataset) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(dataset.input_ids, dataset.attention_mask)[:, :-1]
        labels = dataset.labels[:, 1:]
        return math.exp(
            float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)))
        )


def fit_lm(
    model: torch.nn.Module, data: MarkovDataset, epochs: int, teacher: torch.nn.Module | None, seed: int
) -> None:
    torch.manual_seed(seed)
    module = DistillModule(
        student=model,
        alpha=0.0 if teacher is None else 0.5,
        temperature=1.0,
        shift_labels=True,
        optimizer=functools.partial(torch.optim.Adam, lr=3e-3),
    )
    callbacks = [] if teacher is None else [DistillationCallback(teacher)]
    loader = DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    benchmark_trainer(epochs, callbacks).fit(module, loader)


def language_part(args: argparse.Namespace, log: Callable[[str], None]) -> tuple[list[str], dict[str, list[float]]]:
    """The report's lines and the perplexities to plot: the chain's floor, the teacher, the students per seed."""
    language = MarkovLanguage(vocab_size=64, branching=4, seed=0)
    held_out = MarkovDataset(language, num_sequences=512, max_length=32, seed=1)
    teacher = TinyCausalLM(vocab_size=64, dim=64, layers=2, heads=4)
    fit_lm(
        teacher, MarkovDataset(language, args.teacher_sequences, max_length=32, seed=2), args.teacher_epochs, None, 0
    )
    teacher_ppl = perplexity(teacher, held_out)
    log(f"teacher perplexity {teacher_ppl:.2f}")
    small = MarkovDataset(language, args.student_sequences, max_length=32, seed=3)
    results: dict[str, list[float]] = {"alone": [], "distilled": []}
    for seed in range(args.seeds):
        for name in ("alone", "distilled") if seed % 2 == 0 else ("distilled", "alone"):
            torch.manual_seed(100 + seed)
            student = TinyCausalLM(vocab_size=64, dim=16, layers=1, heads=2)
            fit_lm(student, small, args.student_epochs, None if name == "alone" else teacher, seed)
            results[name].append(perplexity(student, held_out))
            log(f"seed {seed} {name}: perplexity {results[name][-1]:.2f}")

    floor = math.exp(language.entropy_rate())
    lines = [
        "| model | held-out perplexity |",
        "|---|---:|",
        f"| the chain itself (floor, exp of its entropy rate) | {floor:.2f} |",
        f"| teacher (dim 64, 2 layers, {args.teacher_sequences} sequences) | {teacher_ppl:.2f} |",
        f"| student alone (dim 16, 1 layer, {args.student_sequences} sequences) | {mean_std(results['alone'], 2)} |",
        f"| student distilled (alpha 0.5, T 1) | {mean_std(results['distilled'], 2)} |",
        "",
        f"{args.seeds} seed(s), student {args.student_epochs} epochs, teacher {args.teacher_epochs} epochs.",
    ]
    perplexities = {
        "chain (floor)": [floor],
        "teacher": [teacher_ppl],
        **{f"student {k}": v for k, v in results.items()},
    }
    return lines, perplexities


def plot(
    measured: Mapping[str, list[dict[str, float]]],
    one_chunk_mb: float,
    perplexities: Mapping[str, Sequence[float]],
    path: Path,
) -> str:
    """Left: peak memory, middle: time of the KD loss naive vs chunked; right: held-out perplexity per model."""
    plt = pyplot()

    fig, (memory, seconds, ppl) = plt.subplots(1, 3, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 1, 1.6]})
    labels = {"naive": "naive", "chunked": f"chunked ({CHUNK})"}
    peaks = {labels[name]: [r["peak_mb"] for r in runs] for name, runs in measured.items()}
    bar_panel(
        memory, peaks, "KD loss: peak RSS above the logits (MB)", "Peak memory (mean ± std; dots: rounds)", digits=0
    )
    memory.axhline(one_chunk_mb, color="grey", linestyle="--", linewidth=1, label="one chunk's logits")
    memory.legend(fontsize=8)
    times = {labels[name]: [1e3 * r["seconds"] for r in runs] for name, runs in measured.items()}
    bar_panel(seconds, times, "KD loss: ms per forward + backward", "Time (mean ± std; dots: rounds)", digits=0)
    bar_panel(ppl, perplexities, "held-out perplexity", "Perplexity (mean ± std; dots: seeds)", digits=2, zoom=True)
    return save_figure(fig, path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--positions", type=int, default=2048, help="B * L of the loss measurement (B = 4)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--teacher-sequences", type=int, default=4096)
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--student-sequences", type=int, default=256)
    parser.add_argument("--student-epochs", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, 1 round, 1 seed")
    parser.add_argument("--plot", type=Path, default=None, help="also draw the results to this PNG")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.repeats, args.positions, args.vocab, args.seeds = 1, 1, 256, 4096, 1
        args.teacher_sequences, args.teacher_epochs, args.student_sequences, args.student_epochs = 256, 1, 64, 2
    if args.positions % 4 or args.positions < 32:
        parser.error("--positions must be a multiple of 4 and >= 32")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure_loss(args.positions, args.vocab, args.child or None, args.repeats)))
        return 0
    run = start_run("sequence.py", argv, threads=1)
    measured: dict[str, list[dict[str, float]]] = {"naive": [], "chunked": []}
    ratios = []
    for index in range(args.rounds):
        for name in ("naive", "chunked") if index % 2 == 0 else ("chunked", "naive"):
            measured[name].append(run_loss_child(args, None if name == "naive" else CHUNK))
        ratios.append(measured["chunked"][-1]["seconds"] / measured["naive"][-1]["seconds"])
        run.log(f"round {index + 1}: chunked / naive time {ratios[-1]:.2f}")
    (batch_len, vocab), one_chunk_mb = (args.positions, args.vocab), CHUNK * args.vocab * 4 / 2**20
    rows = [
        f"| {name} | {statistics.median(r['peak_mb'] for r in measured[name]):.0f} | "
        f"{1e3 * statistics.median(r['seconds'] for r in measured[name]):.0f} |"
        for name in ("naive", "chunked")
    ]
    language_lines, perplexities = language_part(args, run.log)
    lines = [
        f"## Token-level KD: `{run.command}`",
        "",
        *machine_description(1, run.load_at_start),
        "",
        f"### KD loss at V = {vocab}: {batch_len} positions (B = 4), float32, forward + backward",
        "",
        "| variant | peak RSS above the logits, MB | median ms |",
        "|---|---:|---:|",
        *rows[:1],
        f"| chunked ({CHUNK} positions) {rows[1][len('| chunked ') :]}",
        "",
        f"One (positions, V) float32 tensor is {batch_len * vocab * 4 / 2**20:.0f} MB, one chunk's "
        f"{one_chunk_mb:.0f} MB. Time chunked / naive: median {statistics.median(ratios):.2f} (per round "
        f"{', '.join(f'{r:.2f}' for r in ratios)}; target <= 1.2).",
        "",
        "### Distillation on a synthetic language (Markov chain, 64 tokens, 4 successors)",
        "",
        *language_lines,
    ]
    if args.plot is not None:
        lines.append(plot(measured, one_chunk_mb, perplexities, args.plot))
    return run.finish(lines, None)


if __name__ == "__main__":
    sys.exit(main())
