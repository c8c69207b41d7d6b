"""Distilling a small GPT in bf16 on one GPU: the plugin against a hand-written LightningModule, and teacher memory.

Models (``transformers`` GPT-2 built from configs, random weights: their values do not matter for timing):
teacher GPT-2 small (12 layers, width 768, 12 heads, vocabulary 50257, 124 M parameters), student DistilGPT2's shape
(6 layers, same width, 82 M). Data: random token ids, ``--batch-size`` 16 x ``--length`` 256, dict batches
``input_ids`` / ``attention_mask`` / ``labels`` (the ids). Loss: next-token KD, alpha * T^2 * KL(p_t || p_s) over the
shifted positions + (1 - alpha) * CE, alpha = 0.5, T = 2; AdamW 1e-4; ``precision="bf16-mixed"``, one device, no
logger, checkpoints or validation.

Variants, run in alternating rounds (one fresh fit of ``--steps`` steps per variant and round, the order rotated
every round, the first ``--warmup`` steps of each fit dropped; every fit starts from the same student weights):

``hand-written``
    A ``LightningModule`` holding the frozen float32 teacher, with the same loss written inline, logging the same
    three terms (``train/loss``, ``train/task_loss``, ``train/kd_loss``).
``plugin``
    ``DistillModule(student=..., shift_labels=True)`` + ``DistillationCallback(teacher)``.
``plugin, check_finite=False``
    The same without the per-step NaN/inf check of the teacher's logits (one device sync per step).
``plugin, teacher_precision="bf16"``
    ``DistillationCallback(TeacherRunner(teacher, precision="bf16"))``: the teacher's weights in bfloat16, run outside
    the Trainer's autocast (half its memory).

Measured: the step time (device-synchronized wall time from the first callback's ``on_train_batch_start``, before
the plugin's teacher forward, to the last callback's ``on_train_batch_end``), its median per variant and the median
over rounds of the per-round ratio to ``hand-written``; the teacher's bytes on the device; the peak device memory of
one fit (``torch.cuda.max_memory_allocated``, reset before the fit; CUDA only).

Run from the repository root::

    python benchmarks/gpu_model.py                        # CUDA: 4 variants x 3 rounds x 40 steps, about 1-2 min
    python benchmarks/gpu_model.py --quick                # smoke run on whatever device there is (tiny models)
    python benchmarks/gpu_model.py --quick --device cpu   # the dry run of benchmarks/gpu_check.sh --cpu-dry-run
"""

from __future__ import annotations

import argparse
import copy
import functools
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from common import quartiles, start_run
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_distill import DistillationCallback, DistillModule, TeacherRunner

VARIANTS = ("hand-written", "plugin", "plugin, check_finite=False", 'plugin, teacher_precision="bf16"')
ALPHA, TEMPERATURE, LR = 0.5, 2.0, 1e-4


@dataclass(frozen=True)
class Config:
    """The run's settings."""

    device: str
    steps: int
    warmup: int
    rounds: int
    batch_size: int
    length: int
    tiny: bool


class RandomTokens(Dataset[dict[str, Tensor]]):
    """``n`` random sequences of token ids, as causal-LM dict samples (labels are the ids; nothing is padded)."""

    def __init__(self, n: int, length: int, vocab_size: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab_size, (n, length), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        ids = self.ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def make_models(tiny: bool) -> tuple[nn.Module, nn.Module, int]:
    """Teacher, student (random weights, seeded) and the vocabulary size."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ModuleNotFoundError as error:
        raise SystemExit("gpu_model.py needs `transformers`: pip install -e '.[hf]'") from error
    if tiny:
        shape: dict[str, Any] = dict(vocab_size=512, n_positions=64, n_embd=64, n_head=2)
        teacher_layers, student_layers = 2, 1
    else:
        shape = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_head=12)
        teacher_layers, student_layers = 12, 6
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(n_layer=teacher_layers, **shape)).eval().requires_grad_(False)
    student = GPT2LMHeadModel(GPT2Config(n_layer=student_layers, **shape))
    return teacher, student, shape["vocab_size"]


def inline_kd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Next-token KD written by hand: position t is scored against token t + 1; KD in float32, batchmean."""
    s = student_logits[:, :-1].flatten(0, 1).float()
    t = teacher_logits[:, :-1].flatten(0, 1).float()
    target = labels[:, 1:].flatten()
    kd = F.kl_div(F.log_softmax(s / TEMPERATURE, -1), F.log_softmax(t / TEMPERATURE, -1), log_target=True)
    kd = kd * s.shape[-1] * TEMPERATURE**2  # kl_div's "mean" divides by the classes too: back to batchmean
    task = F.cross_entropy(s, target)
    return ALPHA * kd + (1 - ALPHA) * task, task, kd


class HandWrittenKD(L.LightningModule):
    """The baseline: the frozen teacher inside the module, the loss inline, the same three terms logged."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher

    def train(self, mode: bool = True) -> HandWrittenKD:
        super().train(mode)
        self.teacher.eval()
        return self

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).logits
        loss, task, kd = inline_kd(self.student(**inputs).logits, teacher_logits, batch["labels"])
        self.log_dict({"train/loss": loss, "train/task_loss": task, "train/kd_loss": kd})
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.student.parameters(), lr=LR)


@dataclass
class _Steps:
    """Step times of one fit, filled by the two timing callbacks."""

    sync: Callable[[], None]
    started: float = 0.0
    times: list[float] = field(default_factory=list)


class _Start(L.Callback):
    def __init__(self, steps: _Steps) -> None:
        self.steps = steps

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        self.steps.sync()
        self.steps.started = time.perf_counter()


class _Stop(L.Callback):
    def __init__(self, steps: _Steps) -> None:
        self.steps = steps

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.steps.sync()
        self.steps.times.append(time.perf_counter() - self.steps.started)


@dataclass(frozen=True)
class Fit:
    """One fit's outcome."""

    step_ms: list[float]
    peak_mib: float | None
    teacher_mib: float


def _mib(module: nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]) / 2**20


def run_fit(variant: str, config: Config, models: dict[str, nn.Module], loader: DataLoader[Any]) -> Fit:
    """Train a fresh copy of the student for ``config.steps`` steps as ``variant``; time every step."""
    cuda = config.device == "cuda"
    steps = _Steps(sync=torch.cuda.synchronize if cuda else (lambda: None))
    student = copy.deepcopy(models["student"])
    callbacks: list[L.Callback] = [_Start(steps)]
    if variant == "hand-written":
        teacher = models["teacher"]
        module: L.LightningModule = HandWrittenKD(student, teacher)
    else:
        teacher = models["teacher_bf16"] if "bf16" in variant else models["teacher"]
        callback = DistillationCallback(
            TeacherRunner(teacher, precision="bf16" if "bf16" in variant else None),
            check_finite="check_finite=False" not in variant,
        )
        callbacks.append(callback)
        module = DistillModule(
            student=student,
            alpha=ALPHA,
            temperature=TEMPERATURE,
            shift_labels=True,
            optimizer=functools.partial(torch.optim.AdamW, lr=LR),
        )
    callbacks.append(_Stop(steps))
    trainer = L.Trainer(
        accelerator=config.device,
        devices=1,
        precision="bf16-mixed",
        max_steps=config.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, loader)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    kept = steps.times[config.warmup :] or steps.times
    return Fit([1000 * s for s in kept], peak, _mib(teacher))


def run_rounds(config: Config, log: Callable[..., None]) -> tuple[dict[str, list[Fit]], dict[str, Any]]:
    """Every variant once per round, the order rotated; also what the models are."""
    teacher, student, vocab = make_models(config.tiny)
    models = {"teacher": teacher, "teacher_bf16": copy.deepcopy(teacher), "student": student}
    data = RandomTokens(config.steps * config.batch_size, config.length, vocab)
    loader = DataLoader(data, batch_size=config.batch_size, shuffle=False)
    fits: dict[str, list[Fit]] = {v: [] for v in VARIANTS}
    for r in range(config.rounds):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for variant in order:
            fit = run_fit(variant, config, models, loader)
            fits[variant].append(fit)
            log(f"round {r + 1}/{config.rounds} {variant}: median step {statistics.median(fit.step_ms):.1f} ms")
    about = {
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
        "vocab": vocab,
    }
    return fits, about


def _device_line(device: str) -> str:
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return f"CPU ({platform.processor() or platform.machine()}), no GPU: a dry run, the figures mean nothing"


def report(config: Config, fits: dict[str, list[Fit]], about: dict[str, Any], command: str) -> list[str]:
    """The markdown report: settings, then one row per variant."""
    lines = [
        f"Command: `{command}`",
        "",
        f"Device: {_device_line(config.device)}; torch {torch.__version__}, lightning {L.__version__}.",
        f"Teacher GPT-2 {about['teacher_params'] / 1e6:.1f} M parameters, "
        f"student {about['student_params'] / 1e6:.1f} M, vocabulary {about['vocab']}; "
        f"batch {config.batch_size} x {config.length} tokens, bf16-mixed, "
        f"{config.rounds} rounds x {config.steps} steps (first {config.warmup} dropped).",
        "",
        "| variant | median step ms [p25-p75] | ratio vs hand-written (median of rounds) | peak memory MiB | "
        "teacher MiB on the device |",
        "|---|---:|---:|---:|---:|",
    ]
    base = [statistics.median(f.step_ms) for f in fits["hand-written"]]
    for variant in VARIANTS:
        times = [t for f in fits[variant] for t in f.step_ms]
        p25, median, p75 = quartiles(times)
        ratios = [statistics.median(f.step_ms) / b for f, b in zip(fits[variant], base, strict=True)]
        peaks = [f.peak_mib for f in fits[variant] if f.peak_mib is not None]
        peak = f"{max(peaks):.0f}" if peaks else "n/a"
        lines.append(
            f"| {variant} | {median:.2f} [{p25:.2f}-{p75:.2f}] | {statistics.median(ratios):.3f} | {peak} | "
            f"{fits[variant][0].teacher_mib:.1f} |"
        )
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=40, help="training steps per fit")
    parser.add_argument("--warmup", type=int, default=10, help="steps dropped at the start of each fit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny GPT-2s, 1 round of 4 steps")
    parser.add_argument("--markdown", type=Path, help="also write the report here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = start_run("gpu_model.py", argv, threads=min(8, torch.get_num_threads()))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available here. HINT: --device cpu for a dry run.")
    if args.quick:
        config = Config(args.device, steps=4, warmup=1, rounds=1, batch_size=4, length=32, tiny=True)
    else:
        config = Config(args.device, args.steps, args.warmup, args.rounds, args.batch_size, args.length, tiny=False)
    fits, about = run_rounds(config, run.log)
    return run.finish(report(config, fits, about, run.command), args.markdown)


if __name__ == "__main__":
    raise SystemExit(main())
