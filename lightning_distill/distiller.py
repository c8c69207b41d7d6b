"""Distiller: the same distillation for loops written by hand, with Lightning Fabric or plain PyTorch.

The teacher is driven by a :class:`~lightning_distill.teacher.TeacherRunner` (what
:class:`~lightning_distill.DistillationCallback` uses) and the loss is composed by a
:class:`~lightning_distill.DistillationObjective` (what :class:`~lightning_distill.DistillModule` uses): one
implementation behind both APIs.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from lightning_distill._batches import call_with_inputs, extract_logits, split_batch
from lightning_distill._numerics import check_finite_loss
from lightning_distill._positions import logits_mask, route_inputs, token_masks
from lightning_distill.objective import DistillationObjective
from lightning_distill.teacher._runner import TeacherOutputs, TeacherPrecision, TeacherRunner

__all__ = ["Distiller"]


class Distiller(nn.Module):
    r"""Knowledge distillation for a training loop you write yourself (Lightning Fabric or plain PyTorch).

    The loss is the one :class:`~lightning_distill.DistillModule` trains with,

    .. math::

        \mathcal{L} = \alpha \, T^2 \, \mathrm{KL}(p_t^T \,\|\, p_s^T) + (1 - \alpha) \, \mathrm{CE}(z_s, y)
        + \sum_i w_i \, \mathcal{L}_i(\mathrm{proj}_i(f_s^{(i)}), f_t^{(i)}),

    computed by the same code, with the teacher frozen, in eval mode, placed on the student's device and run once per
    step without gradient. The ``Distiller``'s own parameters are the feature-map projectors (none without feature
    maps): give ``distiller.parameters()`` to your optimizer.

    Call order (the hook names follow Intel Neural Compressor's distillation callbacks)::

        distiller.on_train_begin(student, example_inputs=x0)   # places the teacher, builds projectors
        for epoch ...:
            distiller.on_epoch_begin(epoch)                     # optional: sets the epoch for schedules
            for batch in loader:
                x, y = distiller.split_batch(batch)             # what the Trainer path does with a batch
                distiller.on_step_begin()                       # needed with feature maps: records the student's
                out = student(x)                                # (student(**x) for a dict batch)
                loss = distiller.loss(x, out, y)                # or on_after_compute_loss(x, out, my_loss)
                loss.backward(); optimizer.step()
                distiller.on_after_optimizer_step()             # optional: checks the projectors were stepped
            distiller.on_epoch_end()
        distiller.on_train_end()                                # removes the hooks

    To resume your loop exactly, checkpoint ``distiller.state_dict()`` (the projectors and the schedules'
    counters), the ``state_dict()`` of a :class:`~lightning_distill.ResumableDataLoader` (the epoch and the position
    in it: its ``load_state_dict`` continues there) and the global generators' states (``torch.get_rng_state()``,
    NumPy's and Python's if your loop draws from them, for shuffling and dropout), and set those again right before
    the resumed loop's first step.

    Args:
        teacher: The teacher model (frozen here; never trained), or a
            :class:`~lightning_distill.teacher.TeacherRunner` holding it with its placement (checkpoint, logits layer,
            precision, device).
        objective: The loss, a :class:`~lightning_distill.DistillationObjective`; or give its arguments instead
            (``alpha``, ``temperature``, ``divergence``, ``ignore_index``, ``feature_maps``, ``tckd_weight``,
            ``nckd_weight``, ``js_beta``, ``kd_chunk_size``, ``shift_labels``, as in
            :class:`~lightning_distill.DistillModule`). A schedule advances with ``loss`` calls (steps) and
            ``on_epoch_end`` (epochs).
        check_finite: Check every step's loss for NaN/inf in :meth:`loss` (one device synchronisation a step) and
            raise naming the step and the culprit (the inputs, the student's logits, the teacher's outputs, a term),
            before your loop calls ``backward``. ``False`` returns the loss unchecked.
        logits_layer, teacher_checkpoint, teacher_precision, teacher_device: Deprecated: give them to
            ``TeacherRunner(teacher, logits_layer=..., checkpoint=..., precision=..., device=...)``.

    Raises:
        TypeError, ValueError: As the callback and the module raise for the same arguments, and for an
            ``objective`` given together with its arguments.

    Example::

        >>> torch.manual_seed(0) is not None
        True
        >>> student, distiller = nn.Linear(4, 3), Distiller(nn.Linear(4, 3), alpha=0.5, temperature=2.0)
        >>> distiller.on_train_begin(student)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> loss = distiller.loss(x, student(x), y)
        >>> sorted(distiller.last_terms), loss.requires_grad
        (['kd_loss', 'loss', 'task_loss'], True)
    """

    def __init__(
        self,
        teacher: nn.Module | TeacherRunner,
        objective: DistillationObjective | None = None,
        *,
        logits_layer: str | None = None,
        teacher_checkpoint: str | Path | None = None,
        teacher_precision: TeacherPrecision | None = None,
        teacher_device: str | torch.device | None = None,
        check_finite: bool = True,
        **objective_args: Any,
    ) -> None:
        super().__init__()
        if not isinstance(check_finite, bool):
            raise TypeError(f"`check_finite` must be True or False, got {check_finite!r}.")
        self.check_finite = check_finite
        if objective is None:
            objective = DistillationObjective(**objective_args)
        elif not isinstance(objective, DistillationObjective):
            raise TypeError(f"`objective` must be a DistillationObjective, got {type(objective).__name__}.")
        elif objective_args:
            raise ValueError(
                f"Pass either `objective` or its arguments, got both (`{'`, `'.join(objective_args)}`). HINT: give "
                "them to `DistillationObjective(...)`."
            )
        self.objective = objective
        old = {
            "logits_layer": logits_layer,
            "checkpoint": teacher_checkpoint,
            "precision": teacher_precision,
            "device": teacher_device,
        }
        given = {name: value for name, value in old.items() if value is not None}
        if isinstance(teacher, TeacherRunner):
            if given:
                raise ValueError(
                    f"The teacher is a TeacherRunner, which holds its own placement, so `Distiller` takes no "
                    f"{sorted(given)} as well. HINT: give them to the TeacherRunner."
                )
            self._runner = teacher
        else:
            if given:
                spelled = ", ".join(f"{name}={value!r}" for name, value in given.items())
                warnings.warn(
                    f"Distiller's teacher keywords are deprecated: pass `Distiller(TeacherRunner(teacher, {spelled}), "
                    "...)` instead.",
                    DeprecationWarning,
                    stacklevel=2,
                )
            self._runner = TeacherRunner(
                teacher,
                logits_layer=logits_layer,
                checkpoint=teacher_checkpoint,
                precision=teacher_precision,
                device=teacher_device,
            )
        self._context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
        self._device = torch.device("cpu")
        self._begun = False
        self._step_open = False
        self._snapshot: list[Tensor] | None = None
        self.last_terms: dict[str, Tensor] = {}
        self.step = 0
        self.epoch = 0
        self._register_load_state_dict_pre_hook(_rename_engine_keys)

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher model."""
        return self._runner.teacher

    def hparam_values(self) -> dict[str, float]:
        """The current value of every (possibly scheduled) hyper-parameter, at :attr:`step` and :attr:`epoch`."""
        return self.objective.hparam_values(self.step, self.epoch)

    def get_extra_state(self) -> dict[str, int]:
        """The loop's counters, so a resumed loop continues the schedules where they were."""
        return {"step": self.step, "epoch": self.epoch}

    def set_extra_state(self, state: dict[str, int]) -> None:
        """Restore the counters saved by :meth:`get_extra_state`."""
        self.step, self.epoch = int(state["step"]), int(state["epoch"])

    # ---------------------------------------------------------------------------------------------------- lifecycle
    def on_train_begin(self, student: nn.Module, *, example_inputs: Any = None, fabric: Any = None) -> None:
        """Place the teacher beside ``student``, attach the feature hooks and build the projectors.

        Args:
            student: The student being trained (a Fabric-wrapped module is fine).
            example_inputs: The inputs part of one batch; needed when a feature map's projector is inferred from the
                features' shapes (projector ``"auto"`` without ``student_dim`` / ``teacher_dim``).
            fabric: The ``lightning.fabric.Fabric`` running the loop, if any: the teacher then goes to
                ``fabric.device``, is converted like the student for ``*-true`` precisions and runs in
                ``fabric.autocast()``. Without it the teacher goes to the student's device.

        Raises:
            ValueError: If the teacher shares parameters with the student, or projectors must be inferred and
                ``example_inputs`` is missing.
        """
        if not isinstance(student, nn.Module):
            raise TypeError(f"`student` must be a torch.nn.Module, got {type(student).__name__}.")
        shared = {id(p) for p in student.parameters()}
        if any(id(p) in shared for p in self.teacher.parameters()):
            raise ValueError(
                "The teacher shares parameters with the student: distillation needs a separate, frozen teacher. HINT: "
                "pass `copy.deepcopy(model)` as the teacher."
            )
        if fabric is not None:
            self._device = fabric.device
            self._context = fabric.autocast
            self._runner.place(self._device, fabric.strategy.precision.convert_module)
        else:
            self._device = next(student.parameters(), torch.empty(0)).device
            self._runner.place(self._device)
        objective = self.objective
        self._runner.set_features(objective.teacher_layers())
        objective.bind(student)
        objective.to(self._device)
        if objective.pending and example_inputs is None:
            raise ValueError(
                f"The projectors of feature maps {objective.pending} are inferred from the features' shapes, so "
                "`on_train_begin` needs `example_inputs` (the inputs part of one batch). HINT: "
                "`distiller.on_train_begin(student, example_inputs=next(iter(loader))[0])`, or give each "
                "FeatureMap `student_dim=` and `teacher_dim=`."
            )
        if objective.feature_maps and example_inputs is not None:
            inputs = move_data_to_device(example_inputs, self._device)
            # shows which captured layers the forward modifies in place: those are copied when captured
            student_features = objective.probe(lambda: call_with_inputs(student, inputs))
            if objective.pending:
                teacher_features = self._runner.run(inputs, self._context()).features
                objective.build_projectors(student_features, teacher_features, self._device)
        if objective.feature_maps:
            objective.capture.attach(student)
        self._snapshot = [p.detach().clone() for p in self.parameters() if p.requires_grad] or None
        self._begun = True

    def on_epoch_begin(self, epoch: int | None = None) -> None:
        """Optionally set the epoch schedules are evaluated at (e.g. when resuming)."""
        if epoch is not None:
            if not isinstance(epoch, int) or epoch < 0:
                raise ValueError(f"`epoch` must be a non-negative int, got {epoch!r}.")
            self.epoch = epoch

    def on_step_begin(self, batch_id: int | None = None) -> None:
        """Start recording the student's features for this step (call it before the student's forward)."""
        self._require_begun("on_step_begin")
        self.objective.capture.start()
        self._step_open = True

    def on_after_optimizer_step(self) -> None:
        """Check, after the first optimizer step, that the projectors were updated (else they are in no optimizer)."""
        self._check_stepped()

    def on_epoch_end(self) -> None:
        """Advance the epoch, and check that the projectors were updated at least once."""
        self._check_stepped()
        self.epoch += 1

    def on_train_end(self) -> None:
        """Remove the hooks this distiller put on the student and the teacher."""
        self.objective.capture.remove()
        self._runner.remove_hooks()
        self._begun = False

    # --------------------------------------------------------------------------------------------------------- loss
    def split_batch(self, batch: Any) -> tuple[Any, Tensor | None]:
        """Split a batch into ``(inputs, target)`` and route the inputs, as the Trainer path does.

        See :meth:`DistillModule.split_batch <lightning_distill.DistillModule.split_batch>`: the target
        (``labels``, ...) is taken out of a dict batch, and an encoder-decoder student (known after
        ``on_train_begin``) gets ``decoder_input_ids`` built from it. Feed the student ``inputs`` and pass the same
        ``inputs`` to :meth:`loss`.
        """
        inputs, target = split_batch(batch)
        return route_inputs(inputs, target, self.objective.root), target

    def teacher_outputs(self, inputs: Any) -> TeacherOutputs:
        """Run the teacher on ``inputs`` (moved to its device) without gradient and return its outputs."""
        self._require_begun("teacher_outputs")
        return self._runner.run(move_data_to_device(inputs, self._device), self._context())

    def loss(
        self, inputs: Any, student_output: Any, target: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """The combined distillation loss of one step (every term is kept in :attr:`last_terms`).

        Args:
            inputs: The inputs the student ran on (a tensor, or a mapping passed as keyword arguments). A mapping
                is split and routed as :meth:`split_batch` does, so a whole dict batch works too: its ``labels``
                never reach the teacher and are the target when ``target`` is not given.
            student_output: The student's output: logits, or an object with ``.logits`` / ``["logits"]``.
            target: Class indices, or ``None`` for pure distillation (``alpha`` must be 1).
            mask: Optional bool tensor of the positions that count; by default the mask of the logits' own positions
                (:mod:`lightning_distill._positions`: none for ``(B, C)`` logits, ``attention_mask`` for per-token
                logits, the decoder mask for an encoder-decoder's).

        Raises:
            RuntimeError: If called before ``on_train_begin``, or with feature maps without ``on_step_begin`` before
                the student's forward.
        """
        return self(inputs, student_output, target, mask)

    def forward(
        self, inputs: Any, student_output: Any, target: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """Same as :meth:`loss`; lets ``fabric.setup_module(distiller)`` synchronize the projectors' gradients."""
        return self._compose(inputs, student_output, target, mask, None)

    def on_after_compute_loss(self, inputs: Any, student_output: Any, student_loss: Tensor) -> Tensor:
        """Return ``alpha * kd_loss + (1 - alpha) * student_loss + feature terms`` for a task loss you computed.

        Intel Neural Compressor's hook of the same name. ``divergence="dkd"`` needs the labels: use :meth:`loss`.
        """
        if not isinstance(student_loss, Tensor) or student_loss.dim() != 0:
            raise TypeError(f"`student_loss` must be a scalar tensor, got {student_loss!r}.")
        return self._compose(inputs, student_output, None, None, student_loss)

    def _compose(
        self, inputs: Any, student_output: Any, target: Tensor | None, mask: Tensor | None, task_loss: Tensor | None
    ) -> Tensor:
        self._require_begun("loss")
        objective = self.objective
        features = None
        if objective.feature_maps:
            if not self._step_open:
                raise RuntimeError(
                    "This distiller has feature maps, so call `distiller.on_step_begin()` before the student's forward "
                    "on every step: the student's features are recorded from then until `loss`."
                )
            objective.capture.stop()
            self._step_open = False
            features = objective.capture.take()
        logits = extract_logits(student_output, role="student")
        if isinstance(inputs, Mapping):  # the Trainer path's policy: labels out, decoder inputs in
            inputs, found = self.split_batch(inputs)
            target = found if target is None else target
        masks = token_masks(inputs, target, objective.ignore_index, objective.root)
        mask = logits_mask(masks, logits) if mask is None else mask
        teacher = self.teacher_outputs(inputs)
        terms = objective(logits, teacher, target, mask, features, task_loss, masks, self.hparam_values())
        if self.check_finite:
            check_finite_loss(terms, f"distiller step {self.step} (epoch {self.epoch})", logits, teacher, inputs, self)
        self.last_terms = {name: value.detach() for name, value in terms.items()}
        self.step += 1
        return terms["loss"]

    # ------------------------------------------------------------------------------------------------------ checks
    def _require_begun(self, call: str) -> None:
        if not self._begun:
            raise RuntimeError(
                f"`distiller.{call}` was called before `distiller.on_train_begin(student)`, which places the teacher "
                "and builds the projectors. HINT: call `on_train_begin` once before the training loop."
            )

    def _check_stepped(self) -> None:
        if self._snapshot is None:
            return
        current = [p for p in self.parameters() if p.requires_grad]
        if any(not torch.equal(before, p.detach()) for before, p in zip(self._snapshot, current, strict=True)):
            self._snapshot = None  # stepped: nothing more to check
            return
        if self.step == 0:
            return
        names = [name for name, p in self.named_parameters() if p.requires_grad]
        raise RuntimeError(
            f"The distiller's projector parameters {names} have not changed after {self.step} step(s): they are "
            "in no optimizer, so they would never train. HINT: build the optimizer from "
            "`[*student.parameters(), *distiller.parameters()]`."
        )


def _rename_engine_keys(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load a state saved before the objective existed (its keys were ``engine.*``; the counters its extra state)."""
    for key in [k for k in state_dict if k.startswith(f"{prefix}engine.")]:
        rest = key[len(f"{prefix}engine.") :]
        state_dict[f"{prefix}{'' if rest == '_extra_state' else 'objective.'}{rest}"] = state_dict.pop(key)
