"""DistillModule: the student's LightningModule; owns the loss, its composition and the logging of every term."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from typing_extensions import override

from lightning_distill._batches import call_with_inputs, example_inputs, extract_logits, next_token_view, split_batch
from lightning_distill._evaluation import evaluate_student
from lightning_distill._layers import find_layer
from lightning_distill._positions import (
    Side,
    TokenMasks,
    feature_mask,
    layer_side,
    logits_mask,
    route_inputs,
    token_masks,
)
from lightning_distill._training import (
    FactoryModule,
    LRSchedulerFactory,
    OptimizerFactory,
    check_optimized,
)
from lightning_distill.features._capture import FeatureCapture
from lightning_distill.features._map import FeatureMap, coerce_feature_maps
from lightning_distill.features._projectors import (
    build_projector,
    match_spatial,
    projector_from_dims,
    projector_from_state,
    resolve_projector,
)
from lightning_distill.losses.functional import (
    Divergence,
    check_alpha,
    check_chunk_size,
    check_divergence,
    check_js_beta,
    check_temperature,
    check_weight,
    cross_entropy,
    distillation_loss_terms,
    feature_loss,
)
from lightning_distill.losses.functional._common import _check_ignore_index
from lightning_distill.losses.functional.topk import topk_distillation_terms
from lightning_distill.schedules import Schedule, checked_schedule
from lightning_distill.teacher._runner import TeacherOutputs
from lightning_distill.teacher._sharding import strategy_kind, unsharded_projectors


class DistillModule(FactoryModule):
    r"""A LightningModule that trains a student from its labels, a teacher's logits and, optionally, its features.

    The loss of a training step is

    .. math::
        \mathcal{L} = \alpha \, T^2 \, D\big(p_t^{(T)}, p_s^{(T)}\big) + (1 - \alpha)\, \mathrm{CE}(z_s, y)
        + \sum_i w_i \, D_i\big(F_t^{(n_i)}, P_i(F_s^{(m_i)})\big), \qquad p^{(T)} = \mathrm{softmax}(z / T)

    (see :func:`~lightning_distill.losses.functional.distillation_loss` and :class:`~lightning_distill.FeatureMap`).
    The teacher's outputs come from :class:`~lightning_distill.DistillationCallback`; validation, test and predict
    run without it. ``alpha``, ``temperature`` and every term weight may be a
    :class:`~lightning_distill.schedules.Schedule`; scheduled values are logged as ``train/<name>`` every step.

    Two ways in: subclass and write ``forward`` (and ``configure_optimizers`` if you like), or wrap a network,
    ``DistillModule(student=net, ...)`` (a Hugging Face model, a torchvision-style CNN, a ``torch.compile``-d
    network). ``forward`` must return logits (a tensor, ``.logits`` or ``["logits"]``) with classes in the last
    dimension. What the student and the teacher receive from a dict batch, and which positions of the logits count,
    follow one policy (:mod:`lightning_distill._positions`): labels never reach a model; an encoder-decoder's decoder
    inputs are built from them; a ``(B, C)`` classifier gets no position mask, per-token logits get the mask of
    their own positions.

    Args:
        student: The network to train, when not subclassing. Stored as ``self.student``; a ``torch.compile``-d
            network is stored as its original module (so checkpoint keys and :meth:`export_student` are the plain
            network's) and trained through its compiled forward.
        alpha: Weight of the KD term, in ``[0, 1]``; ``1 - alpha`` weights cross-entropy on the labels. With
            ``alpha=0.0`` (and no feature maps) the module trains without a teacher: the plain student baseline,
            same recipe.
        temperature: Softmax temperature :math:`T > 0` of the KD term; the term is scaled by :math:`T^2`.
        divergence: ``"kl"`` (Hinton), ``"reverse_kl"``, ``"soft_ce"``, ``"js"``, ``"mse"`` or ``"dkd"`` (decoupled
            KD, weighted by ``tckd_weight`` and ``nckd_weight``).
        ignore_index: Target value excluded from both loss terms and from the metrics.
        feature_maps: Intermediate layers to match (:class:`~lightning_distill.FeatureMap` objects or their config
            dicts). Their projectors are built before the optimizer (see :meth:`build_projectors`), stored under
            ``projectors.<key>`` in the checkpoint, and left out by :meth:`export_student`.
        tckd_weight: Weight of DKD's target-class term (``divergence="dkd"`` only).
        nckd_weight: Weight of DKD's non-target-class term (``divergence="dkd"`` only).
        js_beta: The teacher's weight in ``divergence="js"``'s mixture (GKD's generalized JSD), in ``(0, 1)``.
        kd_chunk_size: Compute the KD term over at most this many positions at a time, so a large vocabulary's
            float32 probabilities are never all alive (see :func:`~lightning_distill.losses.functional.kd_loss`).
        shift_labels: For causal language models: logits at position t are scored against token t + 1 (labels are
            the unshifted ``input_ids`` with ``-100`` where nothing is predicted). Sequence batches are dicts; their
            ``attention_mask`` (when present) masks positions out of both terms and the metrics.
        optimizer: Builds the optimizer from the parameters, e.g. ``functools.partial(torch.optim.Adam, lr=1e-2)``.
            Default: Adam with learning rate 1e-3. Ignored when a subclass overrides ``configure_optimizers``.
        lr_scheduler: Optional; builds a scheduler (stepped every epoch) from the optimizer.
        sync_dist: Average each training term across processes before logging it (one all-reduce per term and
            step). Off by default: per-step training logs show process 0's batch; validation and test metrics are
            always synchronized.
        example_input_array: The inputs part of one batch, for the shapes of inferred projectors (and Lightning's
            model summary). Without it, the first batch of the training data ``fit`` gets is used.

    Raises:
        ValueError: For ``alpha`` outside ``[0, 1]``, a non-positive ``temperature``, a negative weight, an unknown
            ``divergence``, or feature maps with clashing names.
        TypeError: For a ``student`` that is not an ``nn.Module``, or an ``optimizer`` / ``lr_scheduler`` that is an
            instance rather than a factory.

    Example::

        >>> from torch import nn
        >>> module = DistillModule(student=nn.Linear(40, 10), alpha=0.9, temperature=4.0)
        >>> batch = (torch.randn(8, 40), torch.randint(0, 10, (8,)))
        >>> terms = module.compute_loss(module(batch[0]), TeacherOutputs(torch.randn(8, 10)), batch[1])
        >>> sorted(terms)
        ['kd_loss', 'loss', 'task_loss']
    """

    def __init__(
        self,
        student: nn.Module | None = None,
        *,
        alpha: float | Schedule = 0.5,
        temperature: float | Schedule = 1.0,
        divergence: Divergence = "kl",
        ignore_index: int = -100,
        feature_maps: Sequence[FeatureMap | Mapping[str, Any]] | None = None,
        tckd_weight: float | Schedule = 1.0,
        nckd_weight: float | Schedule = 8.0,
        js_beta: float = 0.5,
        kd_chunk_size: int | None = None,
        shift_labels: bool = False,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: LRSchedulerFactory | None = None,
        sync_dist: bool = False,
        example_input_array: Any = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, sync_dist)
        if student is not None and not isinstance(student, nn.Module):
            raise TypeError(f"`student` must be a torch.nn.Module, got {type(student).__name__}.")
        original = getattr(student, "_orig_mod", None)  # torch.compile's OptimizedModule wraps the network
        self._compiled_student: tuple[nn.Module, ...] = ()  # a tuple: the compiled wrapper is no submodule
        if isinstance(original, nn.Module) and student is not None:
            self._compiled_student, student = (student,), original
        self.student = student
        if example_input_array is not None:
            self.example_input_array = example_input_array
        self._divergence = check_divergence(divergence)
        self._ignore_index = _check_ignore_index(ignore_index)
        self.js_beta = check_js_beta(js_beta)
        self.kd_chunk_size = check_chunk_size(kd_chunk_size)
        if not isinstance(shift_labels, bool):
            raise TypeError(f"`shift_labels` must be True or False, got {shift_labels!r}.")
        self.shift_labels = shift_labels
        self.feature_maps = coerce_feature_maps(feature_maps)
        self.schedules: dict[str, Schedule] = {
            "alpha": checked_schedule(alpha, "alpha", check_alpha, 0.0, 1.0),
            "temperature": checked_schedule(
                temperature, "temperature", check_temperature, 0.0, None, low_inclusive=False
            ),
            "tckd_weight": checked_schedule(
                tckd_weight, "tckd_weight", partial(check_weight, "tckd_weight"), 0.0, None
            ),
            "nckd_weight": checked_schedule(
                nckd_weight, "nckd_weight", partial(check_weight, "nckd_weight"), 0.0, None
            ),
        }
        self.schedules.update({f"weight/{m.name}": m.weight_schedule for m in self.feature_maps})
        self._scheduled = [name for name, schedule in self.schedules.items() if not schedule.is_constant]
        self._teacher_outputs: TeacherOutputs | None = None
        # One projector per feature map, keyed by `FeatureMap.key`; built before the optimizer (`build_projectors`).
        self.projectors = nn.ModuleDict(
            {
                m.key: projector
                for m in self.feature_maps
                if (projector := projector_from_dims(m.projector, m.loss, m.student_dim, m.teacher_dim, m.name))
                is not None
            }
        )
        self._student_capture = FeatureCapture(role="student")
        for fmap in self.feature_maps:
            self._student_capture.add(fmap.student, fmap.student_select)
        self._feature_sides: dict[str, Side] = {}
        self._probed = False  # whether a dry forward has shown which captured layers are modified in place
        if type(self) is DistillModule:
            self._save_plain_hyperparameters(
                {"feature_maps": [m.to_config() for m in self.feature_maps]} if feature_maps is not None else {},
                student=student,
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                example_input_array=example_input_array,
            )

    # ------------------------------------------------------------------------------------------- hyper-parameters
    def hparam_values(self) -> dict[str, float]:
        """The current value of every scheduled hyper-parameter, at the Trainer's step and epoch (0 and 0 without).

        Keys: ``"alpha"``, ``"temperature"``, ``"tckd_weight"``, ``"nckd_weight"`` and ``"weight/<map name>"``.
        """
        step, epoch = self.schedule_position()
        return {name: schedule(step=step, epoch=epoch) for name, schedule in self.schedules.items()}

    def schedule_position(self) -> tuple[int, int]:
        """The ``(step, epoch)`` schedules are evaluated at: the Trainer's ``global_step`` and ``current_epoch``."""
        trainer = self._trainer
        return (0, 0) if trainer is None else (trainer.global_step, trainer.current_epoch)

    @property
    def alpha(self) -> float:
        """Weight of the KD term (its current value, if scheduled)."""
        return self.hparam_values()["alpha"]

    @property
    def temperature(self) -> float:
        """Softmax temperature of the KD term (its current value, if scheduled)."""
        return self.hparam_values()["temperature"]

    @property
    def divergence(self) -> Divergence:
        """Name of the divergence of the KD term."""
        return self._divergence

    @property
    def ignore_index(self) -> int:
        """Target value left out of both loss terms and the metrics."""
        return self._ignore_index

    # ----------------------------------------------------------------------------------------------- teacher hand-off
    def set_teacher_outputs(self, outputs: TeacherOutputs | None) -> None:
        """Receive the teacher's outputs for the current batch (``None`` clears them). Called by the callback."""
        if outputs is not None and not isinstance(outputs, TeacherOutputs):
            raise TypeError(f"`outputs` must be TeacherOutputs or None, got {type(outputs).__name__}.")
        self._teacher_outputs = outputs

    @property
    def teacher_outputs(self) -> TeacherOutputs | None:
        """The teacher's outputs for the current batch, or ``None`` outside a batch or without a teacher."""
        return self._teacher_outputs

    # -------------------------------------------------------------------------------------------------------- model
    @override
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the student. Subclasses that do not pass ``student=`` override this."""
        if self.student is None:
            raise RuntimeError(
                f"{type(self).__name__} has no `student`: pass `student=` to DistillModule or override `forward`."
            )
        network = self._compiled_student[0] if self._compiled_student else self.student
        return network(*args, **kwargs)

    def student_logits(self, inputs: Any) -> Tensor:
        """Run ``forward`` on the inputs part of a batch and return the logits."""
        return extract_logits(call_with_inputs(self, inputs), role="student")

    # -------------------------------------------------------------------------------------------- batches, masks
    def split_batch(self, batch: Any) -> tuple[Any, Tensor | None]:
        """Split a batch into ``(inputs, target)`` and route the inputs (see :mod:`lightning_distill._positions`).

        The split is :func:`~lightning_distill._batches.split_batch`'s (``(x, y)``, or a dict whose ``labels`` /
        ``label`` / ``y`` / ``target`` entry is the target); the inputs are then what both models receive: for an
        encoder-decoder student without ``decoder_input_ids`` in the batch they are built from the labels. The
        callback calls this too, so the teacher receives the same inputs. Override it for other batch structures.

        Example::

            >>> DistillModule(student=nn.Linear(2, 2)).split_batch({"input_ids": 1, "labels": 2})
            ({'input_ids': 1}, 2)
        """
        inputs, target = split_batch(batch)
        return route_inputs(inputs, target, self._feature_root()), target

    def token_masks(self, inputs: Any, target: Tensor | None) -> TokenMasks:
        """The per-token masks of a batch, by the positions they describe (see :mod:`lightning_distill._positions`)."""
        return token_masks(inputs, target, self.ignore_index, self._feature_root())

    def position_mask(self, masks: TokenMasks, logits: Tensor) -> Tensor | None:
        """The bool mask of the positions of ``logits`` that count, or ``None`` for all of them.

        Default: :func:`~lightning_distill._positions.logits_mask` (``(B, C)`` logits get none; per-token logits the
        mask of their own positions). Override it for models whose logits' positions follow another rule.
        """
        return logits_mask(masks, logits)

    # --------------------------------------------------------------------------------------------------------- loss
    def compute_loss(
        self,
        student_logits: Tensor,
        teacher_outputs: TeacherOutputs | None,
        target: Tensor | None,
        mask: Tensor | None = None,
        student_features: Mapping[str, Tensor] | None = None,
        task_loss: Tensor | None = None,
        masks: TokenMasks | None = None,
    ) -> dict[str, Tensor]:
        """Compose the training loss and return every term.

        Args:
            student_logits: The student's logits ``(*, C)``.
            teacher_outputs: The teacher's outputs for the same batch, or ``None`` (allowed with ``alpha=0`` and no
                feature maps).
            target: Class indices ``(*)``, or ``None`` (then ``alpha`` must be 1).
            mask: Optional bool tensor ``(*)`` of the positions that count in the logit terms.
            student_features: The captured student features (``training_step`` passes them), keyed by
                :attr:`FeatureMap.student_key`; needed when there are feature maps.
            task_loss: A task loss the caller computed itself (the loop API's ``on_after_compute_loss``), used in
                place of the cross-entropy on ``target``: ``loss = alpha * kd_loss + (1 - alpha) * task_loss + ...``.
            masks: The batch's per-token masks (:meth:`token_masks`), so feature terms on token features count only
                real tokens; ``None``: every position counts.

        Returns:
            ``{"loss", "task_loss", "kd_loss"}`` with a teacher, plus ``"tckd_loss"`` and ``"nckd_loss"`` for
            ``divergence="dkd"`` and ``"feature_loss/<name>"`` per feature map (unweighted); ``{"loss",
            "task_loss"}`` without one.

        Raises:
            RuntimeError: Without teacher outputs while ``alpha > 0`` or with feature maps, or without
                ``student_features`` while there are feature maps.
        """
        values = self.hparam_values()
        if self.shift_labels:
            student_logits, target, mask = next_token_view(student_logits, target, mask)
        if teacher_outputs is None:
            if values["alpha"] > 0.0 or self.feature_maps:
                what = f"alpha={values['alpha']}" if values["alpha"] > 0.0 else f"{len(self.feature_maps)} feature maps"
                raise RuntimeError(
                    f"{type(self).__name__} has {what} but received no teacher outputs. HINT: add the teacher to the "
                    "Trainer: `Trainer(callbacks=[DistillationCallback(teacher=...)])`, or pass `alpha=0.0` (and no "
                    "feature maps) to train the student alone."
                )
            if task_loss is not None:
                return {"loss": task_loss, "task_loss": task_loss}
            if target is None:
                raise ValueError("Training without a teacher needs labels, but the batch has no target.")
            task = cross_entropy(student_logits, target, mask=mask, ignore_index=self.ignore_index)
            return {"loss": task, "task_loss": task}
        if teacher_outputs.topk is not None:
            terms = topk_distillation_terms(
                student_logits,
                teacher_outputs.topk,
                target,
                mask,
                self.ignore_index,
                values["alpha"],
                values["temperature"],
                self.divergence,
            )
        else:
            teacher_logits = teacher_outputs.logits
            terms = distillation_loss_terms(
                student_logits,
                next_token_view(teacher_logits, None, None)[0] if self.shift_labels else teacher_logits,
                target,
                alpha=values["alpha"] if task_loss is None else 1.0,  # with a given task loss: only the KD term here
                temperature=values["temperature"],
                divergence=self.divergence,
                mask=mask,
                ignore_index=self.ignore_index,
                tckd_weight=values["tckd_weight"],
                nckd_weight=values["nckd_weight"],
                js_beta=self.js_beta,
                chunk_size=self.kd_chunk_size,
            )
        if task_loss is not None:
            terms["task_loss"] = task_loss
            terms["loss"] = values["alpha"] * terms["kd_loss"] + (1.0 - values["alpha"]) * task_loss
        if self.feature_maps:
            if student_features is None:
                raise RuntimeError(
                    f"{type(self).__name__} has feature maps, so `compute_loss` needs `student_features` (the "
                    "outputs `training_step` captures from the student's layers)."
                )
            loss = terms["loss"]
            for fmap in self.feature_maps:
                term = self.feature_term(fmap, student_features, teacher_outputs.features, masks)
                terms[f"feature_loss/{fmap.name}"] = term
                loss = loss + values[f"weight/{fmap.name}"] * term
            terms["loss"] = loss
        return terms

    def feature_term(
        self,
        fmap: FeatureMap,
        student_features: Mapping[str, Tensor],
        teacher_features: Mapping[str, Tensor],
        masks: TokenMasks | None = None,
    ) -> Tensor:
        """The unweighted loss of one feature map: spatial pooling (channel-first maps), projector, feature loss.

        With ``masks``, token features ``(B, L, D)`` count only the real tokens of their positions (the student
        layer's side: an encoder-decoder's decoder layers use the decoder mask), unless ``fmap.masked`` is false.
        """
        for side, features, key in (
            ("student", student_features, fmap.student_key),
            ("teacher", teacher_features, fmap.teacher_key),
        ):
            if key not in features:
                raise RuntimeError(
                    f"Feature map {fmap.name!r}: no {side} feature {key!r} was captured (captured: {list(features)}). "
                    "HINT: the DistillationCallback captures the teacher's features for the module it was set up "
                    "with; `training_step` captures the student's."
                )
        if fmap.key not in self.projectors:
            raise RuntimeError(
                f"Feature map {fmap.name!r} has no projector yet. HINT: projectors are built in setup by "
                "DistillationCallback from `example_input_array`; outside a Trainer, call `build_projectors(...)`."
            )
        projector = self.projectors[fmap.key]
        student, teacher = student_features[fmap.student_key], teacher_features[fmap.teacher_key]
        if not isinstance(projector, nn.Linear):
            student, teacher = match_spatial(student, teacher)
        mask = None
        if masks is not None and fmap.masked:
            mask = feature_mask(masks, self._feature_side(fmap), teacher, f"Feature map {fmap.name!r}")
        return feature_loss(projector(student), teacher, loss=fmap.loss, mask=mask)

    def _feature_side(self, fmap: FeatureMap) -> Side:
        """Which positions the student layer of ``fmap`` has (looked up once per map)."""
        if fmap.name not in self._feature_sides:
            root = self._feature_root()
            self._feature_sides[fmap.name] = layer_side(root, find_layer(root, fmap.student, role="student"))
        return self._feature_sides[fmap.name]

    # ------------------------------------------------------------------------------------------------ projectors
    def build_projectors(self, teacher_features: Mapping[str, Tensor] | None, example_inputs: Any = None) -> None:
        """Create the projector of every feature map that has none yet, from the features' shapes, and check all maps.

        The student's shapes come from one dry forward (eval mode, no gradient, train/eval modes restored) on
        ``example_inputs`` (default: ``example_input_array``); the teacher's from ``teacher_features``, which
        :class:`~lightning_distill.DistillationCallback` computes on the same inputs in ``setup`` (the first
        training batch when no ``example_input_array`` is set), before the optimizer is built. Every map's loss is
        then evaluated once on these features, so a shape that no projector can fix fails here rather than at the
        first step; the dry forward also shows which captured layers are modified in place later in the forward.

        Args:
            teacher_features: The teacher's features on the same inputs, keyed by :attr:`FeatureMap.teacher_key`.
            example_inputs: The inputs part of one batch; defaults to ``example_input_array``.

        Raises:
            RuntimeError: Without example inputs or ``teacher_features`` while a projector is missing.
            ValueError: If a projector kind cannot match the two shapes, or a given width disagrees with them.
        """
        pending = [m for m in self.feature_maps if m.key not in self.projectors]
        example_inputs = self.example_input_array if example_inputs is None else example_inputs
        if not pending and (teacher_features is None or example_inputs is None):
            return
        names = [m.name for m in pending]
        if example_inputs is None:
            raise RuntimeError(
                f"The projectors of feature maps {names} need the features' shapes, inferred from one dry forward on "
                f"`example_input_array`, which {type(self).__name__} does not set. HINT: inside `Trainer.fit` the "
                "first training batch is used; outside it pass `example_input_array=` (the inputs part of one "
                "batch), or give each FeatureMap `student_dim=`, `teacher_dim=` and a projector other than 'auto'."
            )
        if teacher_features is None:
            raise RuntimeError(
                f"The projectors of feature maps {names} need the teacher's feature shapes. HINT: add "
                "`DistillationCallback(teacher=...)` to the Trainer (it provides them in setup)."
            )
        student_features = self._probe_student(example_inputs)
        for fmap in self.feature_maps:
            where = f"Feature map {fmap.name!r}"
            s_shape = tuple(student_features[fmap.student_key].shape)
            t_shape = tuple(teacher_features[fmap.teacher_key].shape)
            if fmap not in pending:
                if fmap.projector == "identity" and fmap.loss != "attention":
                    resolve_projector(fmap.projector, s_shape, t_shape, where)  # refuses shapes it cannot match
                continue
            kind = (
                "identity" if fmap.loss == "attention" else resolve_projector(fmap.projector, s_shape, t_shape, where)
            )
            s_dim, t_dim = (s_shape[-1], t_shape[-1]) if kind == "linear" else (s_shape[1], t_shape[1])
            for side, given, found in (
                ("student_dim", fmap.student_dim, s_dim),
                ("teacher_dim", fmap.teacher_dim, t_dim),
            ):
                if given is not None and given != found:
                    raise ValueError(f"{where}: `{side}={given}` but the probed feature has width {found}.")
            self.projectors[fmap.key] = build_projector(kind, s_dim, t_dim).to(self.device)
        with torch.no_grad():
            for fmap in self.feature_maps:
                self.feature_term(fmap, student_features, teacher_features)

    def _probe_student(self, example_inputs: Any) -> dict[str, Tensor]:
        """Run the student once on ``example_inputs`` and return the requested features (for their shapes)."""
        root = self._feature_root()  # the loop API's student is not a submodule: its modes are kept too
        modes = {module: module.training for module in (*self.modules(), *root.modules())}
        attached = self._student_capture.attached
        self._student_capture.attach(root)
        self.eval()
        root.eval()
        try:
            with torch.no_grad(), self._student_capture.recording():
                call_with_inputs(self, move_data_to_device(example_inputs, self.device))
            self._probed = True
            return self._student_capture.take(learn=True)  # in-place modified layers are copied from now on
        finally:
            for module, training in modes.items():
                module.training = training
            if not attached:
                self._student_capture.remove()

    def _feature_root(self) -> nn.Module:
        """The model whose layers feature maps name: the wrapped ``student``, or this module when subclassing."""
        return self if self.student is None else self.student

    @override
    def setup(self, stage: str) -> None:
        """Attach the forward hooks that capture the student's features (when there are feature maps).

        Before fitting, every projector must exist (``DistillationCallback.setup`` builds them, and runs first), and
        one dry forward on the first batch shows which captured layers the forward later modifies in place
        (``ReLU(inplace=True)``, ``x += skip``): their outputs are copied when captured.
        """
        if self.feature_maps:
            pending = any(m.key not in self.projectors for m in self.feature_maps)
            if stage == "fit" and (pending or not self._probed):  # the callback's setup usually did both already
                example = example_inputs(self.trainer, self)
                self.build_projectors(None, example)  # a no-op when built; otherwise raises naming what is missing
                if not self._probed and example is not None:
                    self._probe_student(example)
            self._student_capture.attach(self._feature_root())

    @override
    def teardown(self, stage: str) -> None:
        """Remove the student's feature hooks."""
        self._student_capture.remove()

    @override
    def on_fit_start(self) -> None:
        """Check that every trainable projector parameter is in an optimizer (else it would silently never train).

        Under ``ModelParallelStrategy`` also check that ``configure_model`` sharded the projectors: nothing else
        synchronizes their gradients across processes.
        """
        if self.projectors and self._trainer is not None:
            unsharded = unsharded_projectors(self)
            if unsharded and strategy_kind(self.trainer.strategy) == "model_parallel":
                raise RuntimeError(
                    f"The projector parameters {unsharded} are not sharded under ModelParallelStrategy, so their "
                    "gradients would never be synchronized across processes. HINT: in `configure_model`, after "
                    "sharding the student, call `fully_shard(self, mesh=self.device_mesh['data_parallel'])` (or "
                    "`fully_shard(self.projectors, ...)`)."
                )
            check_optimized(
                self,
                ((f"projectors.{name}", p) for name, p in self.projectors.named_parameters()),
                "build the optimizer from `self.parameters()` in `configure_optimizers` (it includes "
                "`self.projectors`); under LightningCLI give it as the model's `optimizer:` argument, not the "
                "top-level `optimizer:` (built before the projectors exist).",
            )

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild projectors that were inferred at fit time from their weights, so ``load_from_checkpoint`` works.

        Raises:
            TypeError: For a checkpoint of a wrapped student loaded without ``student=`` (the network is not saved).
        """
        state = checkpoint.get("state_dict", {})
        if self.student is None and type(self) is DistillModule and any(k.startswith("student.") for k in state):
            raise TypeError(
                "This checkpoint holds a wrapped student's weights (`student.*`), but the network itself is not "
                "saved, so DistillModule cannot rebuild it. HINT: pass the network: "
                "`DistillModule.load_from_checkpoint(path, student=MyNet(...))`, or load the weights into it with "
                "`net.load_state_dict({k.removeprefix('student.'): v for k, v in ckpt['state_dict'].items() if "
                "k.startswith('student.')})`."
            )
        for fmap in self.feature_maps:
            if fmap.key not in self.projectors:
                self.projectors[fmap.key] = projector_from_state(state, f"projectors.{fmap.key}.")

    # -------------------------------------------------------------------------------------------------------- steps
    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        terms, batch_size = self._step_terms(batch, self._teacher_outputs)
        self.log_train_terms(terms, batch_size=batch_size)
        if self._scheduled:  # the same on every process: never synchronized
            values = self.hparam_values()
            self.log_dict({f"train/{name}": values[name] for name in self._scheduled}, batch_size=batch_size)
        return terms["loss"]

    def loss_terms(self, batch: Any, teacher_outputs: TeacherOutputs | None) -> dict[str, Tensor]:
        """Every loss term of one training batch, as ``training_step`` computes them (without logging).

        The batch is split and routed (:meth:`split_batch`), the student runs once (its features captured for the
        feature maps), and :meth:`compute_loss` gets the mask of the logits' positions (:meth:`position_mask`) and
        the batch's token masks for the feature terms.
        """
        return self._step_terms(batch, teacher_outputs)[0]

    def _step_terms(self, batch: Any, teacher_outputs: TeacherOutputs | None) -> tuple[dict[str, Tensor], int]:
        inputs, target = self.split_batch(batch)
        features = None
        if self.feature_maps:
            self._student_capture.attach(self._feature_root())
            with self._student_capture.recording():
                logits = self.student_logits(inputs)
            features = self._student_capture.take()
        else:
            logits = self.student_logits(inputs)
        masks = self.token_masks(inputs, target)
        mask = self.position_mask(masks, logits)
        return self.compute_loss(logits, teacher_outputs, target, mask, features, masks=masks), logits.shape[0]

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Return the student's logits for the inputs part of the batch."""
        inputs, _ = self.split_batch(batch)
        return self.student_logits(inputs)

    @override
    def _evaluate(self, stage: str, batch: Any, dataloader_idx: int) -> None:
        """Log ``{stage}/loss`` and ``{stage}/acc``; with teacher outputs also teacher accuracy, agreement, KD loss."""
        evaluate_student(self, stage, batch, dataloader_idx)

    # ------------------------------------------------------------------------------------------------------- export
    def export_student(self) -> nn.Module:
        """Return a standalone copy of the trained student, in eval mode, with no distillation-only state.

        For the wrapped form this is a copy of ``student`` (of the original network for a ``torch.compile``-d one:
        compile the copy again if you like); for a subclass it is a copy of the module detached from its Trainer,
        without projectors, feature maps or feature hooks (its ``forward`` still works on its own).
        """
        attached = self._student_capture.attached
        self._student_capture.remove()  # hooks must not be copied along with the layers they sit on
        try:
            if self.student is not None:
                return copy.deepcopy(self.student).eval()
            trainer = self._trainer
            self.trainer = None
            try:
                exported = copy.deepcopy(self)
            finally:
                self.trainer = trainer
        finally:
            if attached:
                self._student_capture.attach(self._feature_root())
        exported.set_teacher_outputs(None)
        exported.projectors = nn.ModuleDict()
        exported.feature_maps = ()
        exported._student_capture = FeatureCapture(role="student")
        return exported.eval()
