"""Every Python block of README.md runs as written, so none can drift from the code.

The convention (README's "Development" section says it too):

- The ``python`` blocks of one ``##`` section run in order in one namespace, as a reader reads them: a block may use
  what an earlier block of its section imported or defined, and must import everything else itself.
- The objects a block assumes the reader already has are given as small stand-ins (``STAND_INS`` below: ``teacher``,
  ``dm``, ``my_net``, ...), and a ``teacher.ckpt`` of the stand-in teacher lies in the working folder. Nothing else
  is given: a missing import fails.
- Every ``Trainer(...)`` that fits must say when it stops (``max_epochs`` or ``max_steps``; Lightning's default is
  1000 epochs); the quick switch then trains it for one epoch of two batches on CPU (a prediction runs whole: a
  pre-pass must fill its cache).
- A block that cannot run (an excerpt, a class body with ``...``, placeholders for user data) has the line
  ``<!-- snippet: illustrative -->`` right before its fence: it is only compiled. So is a block that shows an
  ``examples/*.py`` file verbatim: that file is run by its own tests (``tests/test_distiller.py``, which also checks
  the copy, and ``tests/test_distributed.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import lightning.pytorch
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers.processes import REPO_ROOT

ILLUSTRATIVE = "<!-- snippet: illustrative -->"
README = REPO_ROOT / "README.md"

pytestmark = pytest.mark.filterwarnings("ignore:.*it looks untrained")  # the stand-in teachers are untrained


@dataclass(frozen=True)
class Block:
    """One ```` ```python ```` block of README.md."""

    line: int  # 1-based line of its first code line
    section: str  # the ``##`` heading above it ("" before the first)
    code: str
    illustrative: bool


def readme_blocks(text: str) -> list[Block]:
    """The python blocks of a markdown text, with their section and marker."""
    blocks = []
    lines = text.splitlines()
    section = ""
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("## "):
            section = line[3:].strip()
        if line.strip() == "```python":
            end = next(j for j in range(index + 1, len(lines)) if lines[j].strip() == "```")
            marked = any(lines[j].strip() == ILLUSTRATIVE for j in range(max(index - 2, 0), index))
            blocks.append(Block(index + 2, section, "\n".join(lines[index + 1 : end]) + "\n", marked))
            index = end
        index += 1
    return blocks


def _example_bodies() -> set[str]:
    """Every ``examples/*.py`` after its module docstring, as README shows it."""
    return {path.read_text().split('"""', 2)[2].strip() for path in (REPO_ROOT / "examples").glob("*.py")}


BLOCKS = readme_blocks(README.read_text())
EXAMPLES = _example_bodies()
RUN = [block for block in BLOCKS if not block.illustrative and block.code.strip() not in EXAMPLES]
SECTIONS = list(dict.fromkeys(block.section for block in RUN))


class _Backbone(nn.Module):
    """A small staged 1-D CNN with torchvision's layer names (``layer1``-``layer4``, classifier ``fc``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.ReLU())
        widths = [8, 8, 16, 32, 32]
        for i in range(4):
            stage = nn.Sequential(nn.Conv1d(widths[i], widths[i + 1], 3, stride=2, padding=1), nn.ReLU())
            self.add_module(f"layer{i + 1}", stage)
        self.pool = nn.AdaptiveMaxPool1d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x.unsqueeze(1))
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.pool(x).flatten(1))


def _pad(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Collate tokenized samples of different lengths: pad ``input_ids`` with 0 and ``attention_mask`` with 0."""
    length = max(len(item["input_ids"]) for item in items)
    batch = {
        key: torch.stack([nn.functional.pad(item[key], (0, length - len(item[key]))) for item in items])
        for key in ("input_ids", "attention_mask")
    }
    batch["labels"] = torch.stack([item["labels"] for item in items])
    return batch


def _tokenized() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    samples = []
    for i in range(64):
        n = 8 + i % 9
        ids = torch.randint(1000, 2000, (n,), generator=generator)
        samples.append(
            {"input_ids": ids, "attention_mask": torch.ones(n, dtype=torch.long), "labels": torch.tensor(i % 2)}
        )
    return samples


def _mnist1d_like(n: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 40, generator=generator), torch.randint(0, 10, (n,), generator=generator))


def _stand_ins() -> dict[str, Callable[[], Any]]:
    from lightning_distill.demos import MLPStudent, MNIST1DDataModule, MNIST1DTeacher

    return {
        "teacher": MNIST1DTeacher,  # "your trained teacher"; an MNIST-1D CNN
        "float_model": MNIST1DTeacher,  # the float network to quantize
        "dm": lambda: MNIST1DDataModule(num_train=400),
        "datamodule": lambda: MNIST1DDataModule(num_train=400),
        "my_net": lambda: MLPStudent(hidden=32),  # "your network", logits out
        "net": lambda: MLPStudent(hidden=32),
        "backbone": _Backbone,  # for SelfDistillModule's exits layer1-layer3
        "x": lambda: torch.randn(8, 40),  # one batch of inputs
        "train_set": lambda: _mnist1d_like(200),
        "test_loader": lambda: DataLoader(_mnist1d_like(64), batch_size=32),
        "tokenized": _tokenized,  # tokenized text samples, and the collate function that pads them
        "pad": lambda: _pad,
    }


class QuickTrainer(L.Trainer):
    """The quick switch: a README ``Trainer`` must say when it stops; it then trains 1 epoch of 2 batches on CPU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._stops = bool({"max_epochs", "max_steps"} & kwargs.keys())
        self._given = ", ".join(kwargs)
        kwargs.update(
            accelerator="cpu",
            devices=1,
            max_epochs=1,
            max_steps=-1,
            limit_train_batches=2,
            limit_val_batches=2,
            limit_test_batches=2,
            log_every_n_steps=1,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        kwargs.setdefault("logger", False)
        super().__init__(*args, **kwargs)

    def fit(self, *args: Any, **kwargs: Any) -> None:
        if not self._stops:  # a Trainer that only predicts, validates or tests needs no stopping rule
            raise AssertionError(
                "A README Trainer without max_epochs or max_steps trains for Lightning's default of 1000 epochs: "
                f"Trainer({self._given})."
            )
        super().fit(*args, **kwargs)


def test_blocks_are_found_and_markers_sit_right_before_a_python_fence() -> None:
    assert len(BLOCKS) >= 10 and "Two ways in" in SECTIONS
    lines = README.read_text().splitlines()
    for number, line in enumerate(lines):
        if line.strip() == ILLUSTRATIVE:
            following = next(later.strip() for later in lines[number + 1 :] if later.strip())
            assert following == "```python", f"README line {number + 1}: the marker is not right before a python block"


@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{block.line}" for block in BLOCKS])
def test_every_block_compiles(block: Block) -> None:
    compile(block.code, f"README.md:{block.line}", "exec")


@pytest.mark.parametrize("section", SECTIONS)
def test_section_runs_as_written(section: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["README.md"])  # blocks with a `__main__` guard parse their own arguments
    monkeypatch.setattr(L, "Trainer", QuickTrainer)
    monkeypatch.setattr(lightning.pytorch, "Trainer", QuickTrainer)
    torch.manual_seed(0)
    stand_ins = {name: make() for name, make in _stand_ins().items()}
    torch.save(stand_ins["teacher"].state_dict(), tmp_path / "teacher.ckpt")
    namespace: dict[str, Any] = {"__name__": "__main__", **stand_ins}
    for block in (b for b in RUN if b.section == section):
        try:
            exec(compile(block.code, f"README.md:{block.line}", "exec"), namespace)
        except ModuleNotFoundError as error:
            if error.name in ("transformers",):  # an optional extra ([hf]); the block needs it
                pytest.skip(f"README.md:{block.line} needs {error.name}")
            raise


def test_readme_states_the_convention() -> None:
    text = README.read_text()
    assert "tests/test_readme.py" in text and ILLUSTRATIVE in text
