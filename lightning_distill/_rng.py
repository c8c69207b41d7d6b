"""The global random-number state a resumed fit needs, carried in the checkpoint to the start of training.

A ``DataLoader(shuffle=True)`` draws each epoch's order from torch's global generator and dropout its masks: a fit
resumed from a checkpoint continues exactly only if those generators are where the interrupted fit left them.
:class:`ResumeRng` collects torch's (CPU, and the current CUDA device's once CUDA is in use), NumPy's and Python's
states into the checkpoint and restores them in ``on_fit_start`` of the resumed fit, and at the start of training
warns about what a checkpoint cannot give back: the position inside an epoch of a loader without a ``state_dict``.

When: Lightning loads callback and module states before ``configure_optimizers`` and the strategy's set-up (which
may draw, e.g. to initialise layers), and runs the sanity-check validation under an isolated RNG. ``on_fit_start``
is the last hook before the fit loop builds the training iterator, which is where the interrupted fit's stream
continued after the checkpoint too (at an epoch's end nothing draws between the save and that iterator; inside an
epoch, the next batch), so restoring there lines both streams up. A strategy that restores after ``on_fit_start``
(DeepSpeed) gets the states at load time instead.

The states are plain lists, ints and tensors, so checkpoints still load with ``torch.load(weights_only=True)``.
Under DDP the checkpoint holds global rank 0's states and every process restores them: exact when the processes'
streams were alike (``seed_everything`` seeds every rank the same).
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy comes with every supported torch wheel
    np = None  # type: ignore[assignment]

__all__ = ["CHECKPOINT_KEY", "ResumeRng", "collect_rng_states", "restore_rng_states"]

CHECKPOINT_KEY = "lightning_distill_rng_states"  # a top-level entry of the checkpoint, shared by every owner


def collect_rng_states() -> dict[str, Any]:
    """The global generators' states: torch CPU, the current CUDA device (when initialised), NumPy, Python.

    Example::

        >>> states = collect_rng_states()
        >>> a = torch.rand(3)
        >>> restore_rng_states(states)
        >>> torch.equal(torch.rand(3), a)
        True
    """
    version, state, gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(state), "gauss": gauss},
    }
    if np is not None:
        name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
        states["numpy"] = {
            "name": str(name),
            "key": [int(k) for k in key],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # never initialises CUDA (a forked DDP child)
        states["torch.cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global generators to ``states`` (from :func:`collect_rng_states`); absent entries are left alone."""
    torch.set_rng_state(states["torch"])
    python = states.get("python")
    if python is not None:
        random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy = states.get("numpy")
    if numpy is not None and np is not None:
        key = np.asarray(numpy["key"], dtype=np.uint32)
        np.random.set_state((numpy["name"], key, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    if "torch.cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["torch.cuda"])


class ResumeRng:
    """Carries the RNG states from a checkpoint to the resumed fit; warns about what cannot be restored.

    The owner (a callback or a LightningModule) calls :meth:`save` and :meth:`load` from its ``on_save_checkpoint``
    and ``on_load_checkpoint`` hooks (the states are one top-level entry of the checkpoint, ``CHECKPOINT_KEY``, not
    in the owner's own state) and :meth:`fit_start` and :meth:`train_start` from its hooks of those names.

    Args:
        owner: Who keeps the states, for the messages (``"DistillationCallback"``).
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._pending: dict[str, Any] | None = None
        self._missing = False  # the loaded checkpoint had no states (an older version wrote it)
        self._in_fit = False  # between on_fit_start and on_train_start: a late load restores at once

    def save(self, checkpoint: dict[str, Any]) -> None:
        """Put the states of now in ``checkpoint``."""
        checkpoint[CHECKPOINT_KEY] = collect_rng_states()

    def load(self, checkpoint: dict[str, Any]) -> None:
        """Keep ``checkpoint``'s states for :meth:`fit_start` (or restore at once when the fit has started)."""
        states = checkpoint.get(CHECKPOINT_KEY)
        self._pending, self._missing = states, states is None
        if self._in_fit and states is not None:
            restore_rng_states(states)
            self._pending = None

    def fit_start(self, trainer: L.Trainer) -> None:
        """Restore the loaded states if this fit resumes from a checkpoint (``fit(..., ckpt_path=...)``)."""
        self._in_fit = True
        if trainer.ckpt_path is None:  # states loaded by `load_from_checkpoint`, not a resume: keep the stream
            self._pending, self._missing = None, False
            return
        if self._pending is not None:
            restore_rng_states(self._pending)
            self._pending = None

    def train_start(self, trainer: L.Trainer) -> None:
        """Warn when the resumed fit cannot continue as the interrupted one did."""
        self._in_fit = False
        if trainer.ckpt_path is None:
            return
        if self._missing:
            rank_zero_warn(
                f"The checkpoint {str(trainer.ckpt_path)!r} holds no random-number state (an older lightning-distill "
                f"or a fit without {self.owner} wrote it): shuffling and dropout continue from this process's "
                "generators, so the resumed fit will not match an uninterrupted one. Checkpoints written from now on "
                "hold it."
            )
            self._missing = False
        _warn_if_mid_epoch_without_position(trainer)


def _warn_if_mid_epoch_without_position(trainer: L.Trainer) -> None:
    """Warn when the fit resumes inside an epoch with a training loader that cannot restore its position."""
    fit_loop = trainer.fit_loop
    progress = fit_loop.epoch_loop.batch_progress
    done = getattr(progress.current, "processed", progress.current.completed)  # completed lags after batch end
    if not fit_loop.restarted_mid_epoch or done == 0 or progress.is_last_batch:
        return
    combined = fit_loop._combined_loader
    loaders = [] if combined is None else combined.flattened
    plain = [type(dl).__name__ for dl in loaders if not (hasattr(dl, "state_dict") and hasattr(dl, "load_state_dict"))]
    if plain:
        rank_zero_warn(
            f"Resuming inside epoch {trainer.current_epoch}, after {done} of its batches, but the training "
            f"{', '.join(plain)} cannot restore its position: it starts the epoch again, so the resumed fit trains "
            f"on the epoch's first batches again and never on its last {done}, unlike an uninterrupted one. HINT: "
            "train from `lightning_distill.ResumableDataLoader(dataset, batch_size=..., seed=...)`, which resumes "
            "inside an epoch, or resume from a checkpoint saved at an epoch's end."
        )
