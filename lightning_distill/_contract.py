"""The teacher contract: what a distillation module asks of whoever runs its teacher, and what it gets back.

:class:`~lightning_distill.DistillationCallback` talks to the LightningModule through :class:`TeacherClient` only:

1. at ``setup`` it reads :meth:`TeacherClient.teacher_needs` (the teacher layers to capture, the target convention
   for its first-batch checks) and hands the module a :class:`TeacherConnection` with
   :meth:`TeacherClient.connect_teacher`: what the teacher is (one model or a mixture, cached or not; the module
   refuses what its loss cannot use) and a function that runs it, which the module uses for its own set-up (the
   projectors' shapes) and for steps where no callback hook runs (the Tuner's searches swap the Trainer's callbacks);
2. on every batch it asks :meth:`TeacherClient.teacher_request` what to run the teacher on (the batch is split there,
   once a step), runs it, hands the :class:`~lightning_distill.teacher.TeacherOutputs` over with
   :meth:`TeacherClient.set_teacher_outputs` and clears them after the batch.

The callback never reads the module's schedules, never builds its parameters and never applies its loss rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from lightning_distill.features._capture import Selector
from lightning_distill.teacher._runner import TeacherOutputs


@dataclass(frozen=True)
class TeacherNeeds:
    """What a module needs from its teacher for a whole run (read once, at ``setup``).

    Attributes:
        features: The teacher layers whose outputs to capture, as ``(layer name, selector)`` pairs.
        ignore_index: The target value that marks positions which count nowhere (for the first-batch checks).
        shift_labels: Whether logits at position t are scored against the target at t + 1 (causal LMs).
        checks_loss: Whether the module checks every training step's loss for NaN/inf and names the teacher when its
            outputs are the cause; the callback then checks the teacher's logits on the first batch only.
    """

    features: tuple[tuple[str, Selector], ...] = ()
    ignore_index: int = -100
    shift_labels: bool = False
    checks_loss: bool = False


@dataclass(frozen=True)
class TeacherRequest:
    """What to run the teacher on for one batch.

    Attributes:
        inputs: The batch's inputs as the teacher receives them (labels removed, decoder inputs added).
        target: The batch's target, or ``None``; only for checks (the teacher never sees it).
        temperature: The KD temperature of this step (a mixture of teachers mixes its distributions at it; a top-k
            cache stores probabilities at it).
        features: Whether this step needs the teacher's features (training steps with feature maps).
    """

    inputs: Any
    target: Tensor | None
    temperature: float
    features: bool = False


TeacherSource = Callable[[TeacherRequest], TeacherOutputs]
"""Runs the teacher for one request (under no gradient and the right precision) and returns its outputs."""


@dataclass(frozen=True)
class TeacherConnection:
    """What a module is told about its teacher at ``setup``.

    Attributes:
        run: Runs the teacher for a request (it never reads the cache).
        mixture: Whether the teacher is a :class:`~lightning_distill.teacher.TeacherMixture` (it has no logits of
            its own, only a mixed distribution).
        cached: Whether training steps may get their outputs from a teacher cache (logits only).
        cache_top_k: With a top-k cache, its ``k``: outputs are then top-k probabilities at one temperature.
        owner: A description of who connected (named when a second one tries).
        max_length: The longest sequence the teacher takes, when it says (``max_length``, ``n_positions``, ...).
    """

    run: TeacherSource
    mixture: bool = False
    cached: bool = False
    cache_top_k: int | None = None
    owner: str = "DistillationCallback"
    max_length: int | None = None


@runtime_checkable
class TeacherClient(Protocol):
    """A LightningModule that learns from a teacher someone else runs (:class:`~lightning_distill.DistillModule`)."""

    def teacher_needs(self) -> TeacherNeeds:
        """What the module needs from the teacher for the whole run."""
        ...

    def connect_teacher(self, connection: TeacherConnection | None) -> None:
        """Accept a teacher (raising if the loss cannot use it), or forget it with ``None``."""
        ...

    def teacher_request(self, batch: Any) -> TeacherRequest:
        """Split the batch (once a step) and say what the teacher runs on."""
        ...

    def set_teacher_outputs(self, outputs: TeacherOutputs | None) -> None:
        """Receive the teacher's outputs for the current batch (``None`` clears them)."""
        ...
