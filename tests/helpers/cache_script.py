"""Run by ``tests/test_cache.py`` as ``python -m tests.helpers.cache_script CACHE_DIR KILL_AFTER``.

Fits a tiny student with a full-logits ``TeacherCache`` (64 samples, batches of 16 in order) and, when
``KILL_AFTER`` > 0, kills its own process with SIGKILL after that many training batches: no clean-up runs.
Otherwise prints ``teacher_runs=<n> filled=<fraction>`` when the fit ends.
"""

from __future__ import annotations

import os
import signal
import sys

import lightning as L
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill import DistillationCallback, DistillModule, TeacherCache
from lightning_distill.teacher import IndexedDataset
from tests.helpers.tiny import make_data, make_trainer, tiny_student, trained_teacher


class Kill(L.Callback):
    def __init__(self, after: int) -> None:
        self.after = after

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        if self.after and batch_idx + 1 == self.after:
            os.kill(os.getpid(), signal.SIGKILL)


def main(path: str, kill_after: int) -> None:
    cache = TeacherCache(path)
    loader = DataLoader(IndexedDataset(TensorDataset(*make_data(64))), batch_size=16, shuffle=False)
    trainer = make_trainer(
        path,
        max_epochs=2,
        limit_train_batches=None,
        callbacks=[DistillationCallback(trained_teacher(), cache=cache), Kill(kill_after)],
    )
    trainer.fit(DistillModule(student=tiny_student(), alpha=0.5, temperature=2.0), loader)
    print(f"teacher_runs={cache.teacher_runs} filled={cache.filled_fraction()}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
