"""Run by ``tests/test_distributed.py`` as ``python -m tests.helpers.token_ddp_script OUT_DIR``: a token cache under
2-process CPU ``ddp``.

Lightning's ``ddp`` strategy relaunches this module for rank 1, so both ranks run all of it. Phase 1: the
``TokenCachePass`` pre-pass of the GPT-2 teacher in ``OUT_DIR/teacher.pt`` (its state dict, written by the test, so
both ranks run the same teacher) over :func:`data` into ``OUT_DIR/cache`` (each rank writes its own shard). Phase 2:
with the teacher gone, a DDP fit of a smaller GPT-2 student from the cache (``CachedTeacher``). Each rank writes
``OUT_DIR/rank<r>.json``: the logged ``train/kd_loss`` of each step and what it checked.
"""

from __future__ import annotations

import functools
import gc
import json
import sys
import weakref
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_distill import CachedTeacher, DistillModule, IndexedDataset, TokenCache, TokenCachePass
from lightning_distill.demos import MarkovDataset, MarkovLanguage
from tests.helpers import hf

VOCAB = 64
TOP_K = 16
TEMPERATURE = 2.0
BATCH = 8


def data() -> IndexedDataset:
    """47 padded Markov sequences: an odd count, so the two ranks' prediction shares differ (24 and 23)."""
    language = MarkovLanguage(vocab_size=VOCAB, branching=4, seed=0)
    return IndexedDataset(MarkovDataset(language, 47, max_length=16, min_length=4, seed=1))


def teacher() -> torch.nn.Module:
    """The teacher's architecture: GPT-2, 2 layers x 32 (its weights come from the state dict file)."""
    return hf.make_model("gpt2", "teacher", seed=1, outputs=VOCAB).eval()


def prepass(model: torch.nn.Module, path: Path, **trainer_kwargs: Any) -> TokenCachePass:
    """The pre-pass of ``model`` into ``path`` (what the test runs on one process for reference)."""
    pass_ = TokenCachePass(model, TokenCache(path, top_k=TOP_K), temperature=TEMPERATURE, shift_labels=True)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs
    )
    trainer.predict(pass_, dataloaders=DataLoader(data(), batch_size=BATCH), return_predictions=False)
    return pass_


class Report(L.Callback):
    def __init__(self, teacher_ref: weakref.ref[torch.nn.Module], out: Path, written: dict[str, int]) -> None:
        self.teacher_ref, self.out = teacher_ref, out
        self.report: dict[str, Any] = {"kd_loss": [], **written}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if "teacher_alive" not in self.report:
            gc.collect()
            self.report["teacher_alive"] = self.teacher_ref() is not None
            self.report["connection"] = pl_module._teacher.owner

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.report["kd_loss"].append(float(trainer.callback_metrics["train/kd_loss"]))

    def on_train_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = pl_module.all_gather(flat)
        self.report["students_equal"] = bool(torch.equal(gathered[0], gathered[1]))
        self.report["world_size"] = trainer.world_size
        self.report["ddp"] = isinstance(trainer.strategy.model, torch.nn.parallel.DistributedDataParallel)

    def write(self, rank: int, finished: bool) -> None:
        (self.out / f"rank{rank}.json").write_text(json.dumps({**self.report, "finished": finished}))


def main(out: Path) -> None:
    L.seed_everything(0, verbose=False)
    model = teacher()
    model.load_state_dict(torch.load(out / "teacher.pt", weights_only=True))
    pass_ = prepass(model, out / "cache", devices=2, strategy="ddp")
    written = {"rows_written": pass_.rows_written, "tokens_written": pass_.tokens_written}
    pass_.trainer.strategy.barrier()  # every shard is closed before any rank reads them
    teacher_ref = weakref.ref(model)
    model = pass_ = None  # the fit has no teacher

    L.seed_everything(0, verbose=False)
    student = DistillModule(
        student=hf.make_model("gpt2", "student", seed=0, outputs=VOCAB),
        alpha=0.5,
        temperature=TEMPERATURE,
        shift_labels=True,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
    )
    report = Report(teacher_ref, out, written)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[CachedTeacher(TokenCache(out / "cache", top_k=TOP_K)), report],
    )
    trainer.fit(student, DataLoader(data(), batch_size=BATCH, shuffle=True))
    report.write(trainer.global_rank, trainer.state.finished)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
