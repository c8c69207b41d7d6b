"""Tiny teacher/student models and data for fast integration tests."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

IN_DIM, NUM_CLASSES = 8, 4


class TinyTeacher(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES, hidden: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(IN_DIM, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class SoftmaxTeacher(TinyTeacher):
    """A teacher whose forward ends in softmax: its logits are the output of ``head``."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(super().forward(x), dim=-1)


class KwargsTeacher(TinyTeacher):
    """Takes keyword inputs and returns a Hugging Face-style mapping."""

    def forward(self, features: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        return {"logits": super().forward(features)}


def tiny_student(num_classes: int = NUM_CLASSES) -> nn.Module:
    return nn.Sequential(nn.Linear(IN_DIM, 6), nn.ReLU(), nn.Linear(6, num_classes))


def make_data(n: int = 64, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Inputs and labels from a fixed linear rule, so a teacher can learn them in a few hundred steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_DIM, generator=g)
    rule = torch.randn(IN_DIM, NUM_CLASSES, generator=torch.Generator().manual_seed(1234))
    return x, (x @ rule).argmax(-1)


def make_loader(n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    return DataLoader(TensorDataset(*make_data(n, seed)), batch_size=batch_size, shuffle=False)


class DictDataset(Dataset):
    def __init__(self, n: int = 32) -> None:
        self.x, self.y = make_data(n)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"features": self.x[i], "labels": self.y[i]}


def trained_teacher(steps: int = 300) -> TinyTeacher:
    torch.manual_seed(0)
    teacher = TinyTeacher()
    x, y = make_data(512, seed=99)
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(teacher(x), y).backward()
        opt.step()
    return teacher.eval()


def make_trainer(tmp_path: Any, **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=2,
        log_every_n_steps=1,  # two batches: Lightning warns when the interval is longer than an epoch
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def random_logits(
    shape: tuple[int, ...], seed: int = 0, scale: float = 3.0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Student and teacher logits of ``shape``, class targets and a bool mask (about 70 % True) over the positions."""
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=gen) * scale).to(dtype)
    teacher = (torch.randn(shape, generator=gen) * scale).to(dtype)
    target = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    mask = torch.rand(shape[:-1], generator=gen) > 0.3
    return student, teacher, target, mask
