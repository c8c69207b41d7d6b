"""Loggers for the demo and the notebooks: a CSV log always, TensorBoard beside it when it is installed.

The CSV log is what the demo's tables and the notebooks' learning curves are read from, so it is always written;
TensorBoard is added for browsing when the ``tensorboard`` package is importable (``pip install tensorboard``).
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["default_loggers", "logged_trainer", "read_metric", "tensorboard_available", "where_logs_are"]


def tensorboard_available() -> bool:
    """Whether Lightning's ``TensorBoardLogger`` can write here (``tensorboard`` or ``tensorboardX`` installed)."""
    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def default_loggers(save_dir: str | Path, name: str, tensorboard: bool | None = None) -> list[Logger]:
    """A :class:`CSVLogger` writing ``save_dir/name/metrics.csv``, then a TensorBoard logger when wanted.

    Args:
        save_dir: Root folder of every run's logs.
        name: The run's name (its sub-folder).
        tensorboard: ``None`` (default) adds a :class:`TensorBoardLogger` writing to ``save_dir/tensorboard/name``
            when TensorBoard is installed; ``True`` requires it; ``False`` never adds it.

    A run's folders belong to its name: a previous run's ``metrics.csv``, ``hparams.yaml`` and TensorBoard event
    files there are removed first (on process 0), so a re-run's logs are its own and Lightning does not warn that
    it will delete them (its ``CSVLogger`` would replace them anyway; TensorBoard would show both runs overlaid).

    Returns:
        The loggers for ``Trainer(logger=...)``; the CSV logger is first, so ``trainer.log_dir`` is its folder.

    Raises:
        ModuleNotFoundError: ``tensorboard=True`` and TensorBoard is not installed.

    Example:
        >>> import tempfile
        >>> [type(logger).__name__ for logger in default_loggers(tempfile.mkdtemp(), "run", tensorboard=False)]
        ['CSVLogger']
    """
    save_dir = Path(save_dir)
    if tensorboard and not tensorboard_available():
        raise ModuleNotFoundError(
            "tensorboard=True but neither `tensorboard` nor `tensorboardX` is installed. "
            "HINT: `pip install tensorboard`, or pass tensorboard=None to log to CSV only."
        )
    _remove_previous_run(save_dir / name, ("metrics.csv", "hparams.yaml"))
    loggers: list[Logger] = [CSVLogger(save_dir, name=name, version="")]
    if tensorboard or (tensorboard is None and tensorboard_available()):
        _remove_previous_run(save_dir / "tensorboard" / name, ("events.out.tfevents.*", "hparams.yaml"))
        loggers.append(TensorBoardLogger(save_dir / "tensorboard", name=name, version="", default_hp_metric=False))
    return loggers


@rank_zero_only  # a DDP child re-running the script starts after process 0 removed them, never after it wrote
def _remove_previous_run(folder: Path, patterns: Sequence[str]) -> None:
    if not folder.is_dir():
        return
    for pattern in patterns:
        for path in folder.glob(pattern):
            if path.is_file():
                path.unlink()


def logged_trainer(
    save_dir: str | Path,
    name: str,
    max_epochs: int,
    callbacks: Sequence[L.Callback] = (),
    *,
    tensorboard: bool | None = None,
    **trainer_kwargs: Any,
) -> L.Trainer:
    """A quiet one-device CPU ``Trainer`` (no checkpoints, progress bar or summary) logging to ``save_dir/name``.

    What the demo and the notebooks train with; ``trainer_kwargs`` override or add any ``Trainer`` argument.
    ``tensorboard`` is passed to :func:`default_loggers`.
    """
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": max_epochs,
        "logger": default_loggers(save_dir, name, tensorboard=tensorboard),
        "callbacks": list(callbacks),
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return L.Trainer(**{**settings, **trainer_kwargs})


def where_logs_are(loggers: list[Logger]) -> str:
    """One line per logger saying where its files are and, for TensorBoard, the command that shows them."""
    lines = []
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            lines.append(f"TensorBoard: {logger.log_dir}  (view: tensorboard --logdir {Path(logger.save_dir)})")
        elif isinstance(logger, CSVLogger):
            lines.append(f"CSV: {Path(logger.log_dir) / 'metrics.csv'}")
        else:
            lines.append(f"{type(logger).__name__}: {logger.log_dir}")
    return "\n".join(lines)


def read_metric(log_dir: str | Path, key: str, by: str = "epoch") -> list[tuple[int, float]]:
    """``(epoch, value)`` for every row of ``log_dir/metrics.csv`` (a :class:`CSVLogger` log) that has ``key``.

    Args:
        log_dir: The run's folder (``trainer.log_dir``, ``logger.log_dir``).
        key: The logged name, e.g. ``"val/acc"``.
        by: The column paired with each value: ``"epoch"`` (Trainer logs) or ``"step"`` (any log, Fabric's too).

    Raises:
        FileNotFoundError: No ``metrics.csv`` in ``log_dir``.
        KeyError: No row logged ``key`` (the message lists the keys that were), or a row with it has no ``by``.
    """
    path = Path(log_dir) / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"No CSV log at {path}. HINT: pass the folder of a CSVLogger run (trainer.log_dir).")
    with open(path, newline="") as f:
        every_row = list(csv.DictReader(f))
    rows = [row for row in every_row if row.get(key)]
    if any(not row.get(by) for row in rows):
        raise KeyError(f"Rows of {key!r} in {path} have no {by!r} value. HINT: Fabric logs have no epoch: by='step'.")
    points = [(int(float(row[by])), float(row[key])) for row in rows]
    if not points:
        logged = sorted({k for row in every_row for k, v in row.items() if v and k not in ("epoch", "step")})
        raise KeyError(f"{key!r} was never logged in {path}; logged keys: {logged}.")
    return points
