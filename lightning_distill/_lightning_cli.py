"""``DistillCLI``: Lightning's ``LightningCLI`` that checks the teacher checkpoint first and reports what ``fit`` did.

The ``lightning-distill fit|validate|test|predict`` commands (:mod:`lightning_distill.cli`) run it. Importing this
module imports ``jsonargparse``, which :mod:`lightning_distill.cli` does only for those commands: ``lightning-distill
demo`` does not pay for it, and a process that imports ``jupytext`` later still writes notebooks (jupytext registers
its YAML representer on a class whose table jsonargparse has already copied).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from typing_extensions import override


class DistillCLI(LightningCLI):
    """:class:`LightningCLI` over :class:`DistillModule` that checks the teacher checkpoint first and reports ``fit``.

    :func:`lightning_distill.cli.main` runs it; a script of your own may use it like ``LightningCLI`` (the same
    arguments). A teacher ``checkpoint`` in ``trainer.callbacks`` that does not exist stops it before anything is
    built, naming the config beside the given one whose ``ModelCheckpoint`` writes that file; ``fit`` ends by
    printing the final ``val/`` metrics and the checkpoint's path.
    """

    @override
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_teacher_checkpoints(config, config.get("trainer", {}).get("callbacks"))

    def after_fit(self) -> None:
        """Print the final validation metrics and the path of the checkpoint ``fit`` saved (process 0 only)."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        shown = ", ".join(f"{key} {value:.4f}" for key, value in sorted(metrics.items())) or "none (no validation)"
        print(f"Final validation metrics: {shown}")
        checkpoint = trainer.checkpoint_callback
        path = checkpoint.best_model_path if isinstance(checkpoint, ModelCheckpoint) else ""
        if path and Path(path).resolve().is_relative_to(Path.cwd().resolve()):
            path = os.path.relpath(path)
        print(f"Checkpoint: {path}" if path else "Checkpoint: none saved (no ModelCheckpoint callback)")


def check_teacher_checkpoints(config: Any, holders: Any) -> None:
    """Stop with a one-line message if a teacher checkpoint set in ``holders`` does not exist.

    Args:
        config: The parsed config (of the subcommand): its ``config`` entry lists the YAML files given, beside which
            the message looks for the one whose ``ModelCheckpoint`` writes the missing file.
        holders: Parsed components that may hold a teacher (see :func:`_teacher_checkpoints`).

    Raises:
        SystemExit: Naming the missing checkpoint and the ``lightning-distill fit --config ...`` that writes it.
    """
    for path in _teacher_checkpoints(holders):
        if not Path(path).is_file():
            writer = _config_that_writes(path, [Path(str(c)) for c in config.get("config") or []])
            hint = (
                f"run `lightning-distill fit --config {writer}` first, it writes it"
                if writer is not None
                else "train the teacher first, or point the TeacherRunner's `checkpoint` at an existing checkpoint"
            )
            raise SystemExit(f"lightning-distill: the teacher checkpoint {path} does not exist: {hint}.")


def _teacher_checkpoints(holders: Any) -> list[str]:
    """The teacher checkpoint paths set in parsed components: ``trainer.callbacks``, or a ``TokenCachePass`` model.

    A component (a ``DistillationCallback``, the pre-pass) holds its teacher in ``init_args.teacher``: a
    ``TeacherRunner`` whose ``checkpoint`` is the path, or (deprecated, the callback only) a network beside the
    component's own ``teacher_checkpoint``.
    """
    if holders is None:
        return []
    found: list[str] = []
    for holder in holders if isinstance(holders, list) else [holders]:
        init_args = getattr(holder, "init_args", None)
        if init_args is None:
            continue
        teacher = init_args.get("teacher")
        runner_args = getattr(teacher, "init_args", None)
        is_runner = str(getattr(teacher, "class_path", "")).endswith("TeacherRunner")
        paths = [
            init_args.get("teacher_checkpoint"),
            runner_args.get("checkpoint") if is_runner and runner_args else None,
        ]
        found.extend(str(path) for path in paths if path is not None)
    return found


def _config_that_writes(checkpoint: str, configs: Iterable[Path]) -> str | None:
    """The YAML file beside ``configs`` whose ``ModelCheckpoint`` writes ``checkpoint``, as a path from here."""
    target = Path(os.path.abspath(checkpoint))
    for folder in dict.fromkeys(Path(c).resolve().parent for c in configs):
        for candidate in sorted(folder.glob("*.yaml")):
            if target in _checkpoints_written_by(candidate):
                return os.path.relpath(candidate)
    return None


def _checkpoints_written_by(config: Path) -> list[Path]:
    """The files the ``ModelCheckpoint`` callbacks of a YAML config write (those with a fixed dirpath and filename)."""
    try:
        text = yaml.safe_load(config.read_text())
    except (OSError, yaml.YAMLError):
        return []
    trainer = text.get("trainer") if isinstance(text, dict) else None
    callbacks = trainer.get("callbacks") if isinstance(trainer, dict) else None
    written = []
    for callback in callbacks if isinstance(callbacks, list) else []:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
            args = callback.get("init_args") or {}
            if args.get("dirpath") is not None and args.get("filename") is not None:
                written.append(Path(os.path.abspath(os.path.join(args["dirpath"], f"{args['filename']}.ckpt"))))
    return written
