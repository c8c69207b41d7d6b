"""DistillModule: the student's LightningModule; its objective composes the loss, it logs every term."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_distill._batches import call_with_inputs, example_inputs, extract_logits, split_batch
from lightning_distill._contract import TeacherConnection, TeacherNeeds, TeacherRequest
from lightning_distill._evaluation import evaluate_student
from lightning_distill._numerics import check_finite_loss
from lightning_distill._on_policy import OnPolicy, Rewritten, check_on_policy, sample_batch
from lightning_distill._positions import TokenMasks, logits_mask, route_inputs, token_masks
from lightning_distill._training import FactoryModule, LRSchedulerFactory, OptimizerFactory, check_optimized
from lightning_distill.features._map import FeatureMap
from lightning_distill.features._projectors import projector_from_state
from lightning_distill.losses.functional import Divergence
from lightning_distill.objective import DistillationObjective
from lightning_distill.schedules import Schedule
from lightning_distill.teacher._runner import TeacherOutputs
from lightning_distill.teacher._sharding import strategy_kind, unsharded_projectors

__all__ = ["DistillModule"]


class DistillModule(FactoryModule):
    r"""A LightningModule that trains a student from its labels, a teacher's logits and, optionally, its features.

    The loss of a training step is

    .. math::
        \mathcal{L} = \alpha \, T^2 \, D\big(p_t^{(T)}, p_s^{(T)}\big) + (1 - \alpha)\, \mathrm{CE}(z_s, y)
        + \sum_i w_i \, D_i\big(F_t^{(n_i)}, P_i(F_s^{(m_i)})\big), \qquad p^{(T)} = \mathrm{softmax}(z / T)

    composed by its :class:`~lightning_distill.DistillationObjective` (``self.objective``; see
    :func:`~lightning_distill.losses.functional.distillation_loss` and :class:`~lightning_distill.FeatureMap`).
    The teacher's outputs come from :class:`~lightning_distill.DistillationCallback` through the teacher contract
    (:class:`~lightning_distill._contract.TeacherClient`: :meth:`teacher_needs`, :meth:`connect_teacher`,
    :meth:`teacher_request`, :meth:`set_teacher_outputs`); validation, test and predict run without it.
    ``alpha``, ``temperature`` and every term weight may be a :class:`~lightning_distill.schedules.Schedule`;
    scheduled values are logged as ``train/<name>``.

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
        check_finite: Check every training step's loss for NaN/inf before anything is trained on it (one device
            synchronisation per step; the teacher's logits need no check of their own then) and raise naming the
            step and the culprit: the batch's inputs, the student's logits, the teacher's outputs, or a term.
        on_policy: Distill a causal LM on continuations it samples itself (GKD; needs ``shift_labels=True``): each
            training batch of prompts gets the student's completions before the teacher scores them, and the KD term
            counts completion tokens only, with weight 1 (see :class:`~lightning_distill.OnPolicy`).

    Raises:
        ValueError: For ``alpha`` outside ``[0, 1]``, a non-positive ``temperature``, a negative weight, an unknown
            ``divergence``, or feature maps with clashing names.
        TypeError: For a ``student`` that is not an ``nn.Module``, or an ``optimizer`` / ``lr_scheduler`` that is an
            instance rather than a factory.

    Example::

        >>> import torch
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
        check_finite: bool = True,
        on_policy: OnPolicy | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, sync_dist)
        if not isinstance(check_finite, bool):
            raise TypeError(f"`check_finite` must be True or False, got {check_finite!r}.")
        self.check_finite = check_finite
        if student is not None and not isinstance(student, nn.Module):
            raise TypeError(f"`student` must be a torch.nn.Module, got {type(student).__name__}.")
        original = getattr(student, "_orig_mod", None)  # torch.compile's OptimizedModule wraps the network
        self._compiled_student: tuple[nn.Module, ...] = ()  # a tuple: the compiled wrapper is no submodule
        if isinstance(original, nn.Module) and student is not None:
            self._compiled_student, student = (student,), original
        self.student = student
        if example_input_array is not None:
            self.example_input_array = example_input_array
        objective = DistillationObjective(
            alpha=alpha,
            temperature=temperature,
            divergence=divergence,
            ignore_index=ignore_index,
            feature_maps=feature_maps,
            tckd_weight=tckd_weight,
            nckd_weight=nckd_weight,
            js_beta=js_beta,
            kd_chunk_size=kd_chunk_size,
            shift_labels=shift_labels,
        )
        objective.bind(self if student is None else student)
        # The objective's only tensors are its projectors: registered here, so checkpoint keys are
        # `projectors.<key>`; the objective itself is held in a tuple (not a second path to the same weights).
        self._objective = (objective,)
        self.projectors = objective.projectors
        self._teacher: TeacherConnection | None = None
        self._teacher_outputs: TeacherOutputs | None = None
        self._split: tuple[Any, Any, Tensor | None] | None = None  # (batch, inputs, target) of the current step
        self.on_policy = check_on_policy(on_policy, objective)
        self._sampled: Rewritten | None = None  # the on-policy batch of this step
        self.last_sampled_batch: dict[str, Tensor] | None = None  # the last batch the student sampled, to inspect
        self._sampling_seed: int | None = None
        if type(self) is DistillModule:
            plain: dict[str, Any] = (
                {"feature_maps": [m.to_config() for m in objective.feature_maps]} if feature_maps else {}
            )
            if self.on_policy is not None:
                plain["on_policy"] = dataclasses.asdict(self.on_policy)  # a checkpoint holds no custom classes
            self._save_plain_hyperparameters(
                plain,
                student=student,
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                example_input_array=example_input_array,
            )

    @property
    def objective(self) -> DistillationObjective:
        """The loss: schedules, feature maps, projectors and the composition of the terms."""
        return self._objective[0]

    @property
    def feature_maps(self) -> tuple[FeatureMap, ...]:
        """The feature maps of the objective."""
        return self.objective.feature_maps

    @property
    def schedules(self) -> dict[str, Schedule]:
        """Every hyper-parameter as a schedule, by name (see :meth:`hparam_values`)."""
        return self.objective.schedules

    # ------------------------------------------------------------------------------------------- hyper-parameters
    def hparam_values(self) -> dict[str, float]:
        """The current value of every scheduled hyper-parameter, at the Trainer's step and epoch (0 and 0 without).

        Keys: ``"alpha"``, ``"temperature"``, ``"tckd_weight"``, ``"nckd_weight"`` and ``"weight/<map name>"``.
        """
        return self.objective.hparam_values(*self.schedule_position())

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
        return self.objective.divergence

    @property
    def ignore_index(self) -> int:
        """Target value left out of both loss terms and the metrics."""
        return self.objective.ignore_index

    @property
    def shift_labels(self) -> bool:
        """Whether logits at position t are scored against the target at t + 1 (causal language models)."""
        return self.objective.shift_labels

    # -------------------------------------------------------------------------------------- the teacher contract
    def teacher_needs(self) -> TeacherNeeds:
        """What the teacher must provide for the whole run: the layers the feature maps read, the target rules."""
        return TeacherNeeds(self.objective.teacher_layers(), self.ignore_index, self.shift_labels, self.check_finite)

    def connect_teacher(self, connection: TeacherConnection | None) -> None:
        """Accept the teacher the callback runs (``None`` forgets it); the loss refuses what it cannot learn from.

        Raises:
            RuntimeError: If another teacher is connected already (two ``DistillationCallback`` s).
            ValueError: See :meth:`DistillationObjective.check_teacher
                <lightning_distill.DistillationObjective.check_teacher>`.
        """
        if connection is not None:
            if self._teacher is not None and self._teacher.run != connection.run:
                cached = "CachedTeacher" in self._teacher.owner + connection.owner  # it stands in for the callback
                hint = "keep one of them." if cached else "pass several teachers as one `TeacherMixture({...})`."
                raise RuntimeError(
                    f"{type(self).__name__} already learns from the teacher of {self._teacher.owner}; "
                    f"{connection.owner} would replace it silently. HINT: {hint}"
                )
            self.objective.check_teacher(connection)
            if self.on_policy is not None and connection.cached:
                raise ValueError(
                    "On-policy distillation samples new sequences every step, so a TeacherCache can never hold the "
                    "teacher's outputs for them. HINT: remove `cache=` from DistillationCallback, or use "
                    "DistillationCallback(teacher) instead of CachedTeacher."
                )
        self._teacher = connection

    def teacher_request(self, batch: Any) -> TeacherRequest:
        """What the teacher runs on for ``batch``: its routed inputs (split once a step), target and temperature."""
        inputs, target = self._split_once(batch)
        return self._request(inputs, target)

    def _request(self, inputs: Any, target: Tensor | None) -> TeacherRequest:
        features = bool(self.feature_maps) and self.training
        target = None if self._sampled is not None else target  # sampled tokens are no labels to score a teacher by
        return TeacherRequest(inputs, target, self.hparam_values()["temperature"], features)

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
        teacher receives the same inputs (:meth:`teacher_request`); each batch is split once. Override it for other
        batch structures.

        Example::

            >>> DistillModule(student=nn.Linear(2, 2)).split_batch({"input_ids": 1, "labels": 2})
            ({'input_ids': 1}, 2)
        """
        inputs, target = split_batch(batch)
        return route_inputs(inputs, target, self.objective.root), target

    def _split_once(self, batch: Any) -> tuple[Any, Tensor | None]:
        """:meth:`split_batch`, remembered for the current batch (the teacher's request and the step share it).

        With ``on_policy`` a training batch is first replaced by the student's completions of its prompts (the
        callback asks for the teacher's request first, so the teacher scores what the loss counts).
        """
        if self._split is None or self._split[0] is not batch:
            self._sampled, source = None, batch
            if self.on_policy is not None and self._trainer is not None and self.trainer.training:
                self._sampling_seed, self._sampled = sample_batch(self, self.on_policy, batch, self._sampling_seed)
                if self._sampled is not None:
                    source = self.last_sampled_batch = self._sampled.batch
            self._split = (batch, *self.split_batch(source))
        return self._split[1], self._split[2]

    def token_masks(self, inputs: Any, target: Tensor | None) -> TokenMasks:
        """The per-token masks of a batch, by the positions they describe (see :mod:`lightning_distill._positions`)."""
        return token_masks(inputs, target, self.ignore_index, self.objective.root)

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
        """Compose the training loss at the current step and return every term.

        See :meth:`DistillationObjective.forward <lightning_distill.DistillationObjective.forward>`, which takes the
        same arguments.
        """
        values = self.hparam_values()
        if self._sampled is not None and self.on_policy is not None and not self.on_policy.task_loss:
            values["alpha"] = 1.0  # no cross-entropy on the student's own samples
        return self.objective(student_logits, teacher_outputs, target, mask, student_features, task_loss, masks, values)

    # ------------------------------------------------------------------------------------------------ projectors
    def build_projectors(self, teacher_features: Mapping[str, Tensor] | None, example_inputs: Any = None) -> None:
        """Create the projector of every feature map that has none yet, from the features' shapes, and check all maps.

        The student's shapes come from one dry forward (eval mode, no gradient, train/eval modes restored) on
        ``example_inputs`` (default: ``example_input_array``); the teacher's from ``teacher_features``: in
        ``setup("fit")`` the module asks its connected teacher for them, on the same inputs (the first training batch
        when no ``example_input_array`` is set), before the optimizer is built. Every map's loss is then evaluated
        once on these features, so a shape that no projector can fix fails here rather than at the first step; the
        dry forward also shows which captured layers are modified in place later in the forward.

        Args:
            teacher_features: The teacher's features on the same inputs, keyed by :attr:`FeatureMap.teacher_key`.
            example_inputs: The inputs part of one batch; defaults to ``example_input_array``.

        Raises:
            RuntimeError: Without example inputs or ``teacher_features`` while a projector is missing.
            ValueError: If a projector kind cannot match the two shapes, or a given width disagrees with them.
        """
        pending = self.objective.pending
        example_inputs = self.example_input_array if example_inputs is None else example_inputs
        if not pending and (teacher_features is None or example_inputs is None):
            return
        if example_inputs is None:
            raise RuntimeError(
                f"The projectors of feature maps {pending} need the features' shapes, inferred from one dry forward "
                f"on `example_input_array`, which {type(self).__name__} does not set. HINT: inside `Trainer.fit` the "
                "first training batch is used; outside it pass `example_input_array=` (the inputs part of one "
                "batch), or give each FeatureMap `student_dim=`, `teacher_dim=` and a projector other than 'auto'."
            )
        if teacher_features is None:
            raise RuntimeError(
                f"The projectors of feature maps {pending} need the teacher's feature shapes. HINT: add "
                "`DistillationCallback(teacher=...)` to the Trainer (it provides them in setup)."
            )
        student_features = self._probe_student(example_inputs)
        self.objective.build_projectors(student_features, teacher_features, self.device)

    def _probe_student(self, example_inputs: Any) -> dict[str, Tensor]:
        """Run the student once on ``example_inputs`` and return the requested features (for their shapes)."""
        inputs = move_data_to_device(example_inputs, self.device)
        modes = {module: module.training for module in self.modules()}
        self.eval()
        try:
            return self.objective.probe(lambda: call_with_inputs(self, inputs))
        finally:
            for module, training in modes.items():
                module.training = training

    @override
    def setup(self, stage: str) -> None:
        """With feature maps, attach the student's capture hooks; before fitting, build the projectors first.

        A fit with a teacher that cannot change the student (``alpha=0`` and no feature maps) warns.

        The connected teacher (:meth:`connect_teacher`, done by the callback's ``setup``, which Lightning runs before
        the module's) is run once on ``example_input_array`` or the first training batch for its features' shapes;
        one dry forward of the student on the same inputs shows which captured layers the forward later modifies in
        place (``ReLU(inplace=True)``, ``x += skip``): their outputs are copied when captured.
        """
        if stage == "fit" and self._teacher is not None and not self.objective.needs_teacher:
            rank_zero_warn(
                f"{type(self).__name__} has alpha=0.0 and no feature maps, so the teacher runs on every training "
                "batch but does not change the student. HINT: remove DistillationCallback to train the student alone."
            )
        if not self.feature_maps:
            return
        if stage == "fit" and (self.objective.pending or not self.objective.probed):
            example = example_inputs(self.trainer, self)
            teacher_features = None
            if example is not None and self._teacher is not None:
                # as a training batch reaches the teacher: converted by the precision plugin (bf16-true: bf16)
                inputs = self.trainer.precision_plugin.convert_input(example)
                inputs = move_data_to_device(inputs, self.trainer.strategy.root_device)
                request = TeacherRequest(inputs, None, self.hparam_values()["temperature"], features=True)
                teacher_features = self._teacher.run(request).features
            self.build_projectors(teacher_features, example)  # raises naming what is missing when it cannot
            if not self.objective.probed and example is not None:
                self._probe_student(example)
        self.objective.capture.attach(self.objective.root)

    @override
    def teardown(self, stage: str) -> None:
        """Remove the student's feature hooks."""
        self.objective.capture.remove()

    @override
    def on_fit_start(self) -> None:
        """Check that every trainable projector parameter is in an optimizer (else it would silently never train).

        Under ``ModelParallelStrategy`` also check that ``configure_model`` sharded the projectors: nothing else
        synchronizes their gradients across processes.
        """
        if self._trainer is not None and self.trainer.ckpt_path is None:
            self._sampling_seed = None  # a new fit takes its own seed (a resumed one keeps the checkpoint's)
        if len(self.projectors) and self._trainer is not None:
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
        self._sampling_seed = checkpoint.get("on_policy_seed", self._sampling_seed)

    # -------------------------------------------------------------------------------------------------------- steps
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._sampling_seed is not None:
            checkpoint["on_policy_seed"] = self._sampling_seed  # a resumed fit samples what this one would have

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        terms, batch_size = self._step_terms(batch, self._teacher_outputs, check=self.check_finite)
        if self._sampled is not None:
            terms, self._sampled = {**terms, **self._sampled.figures(terms)}, None
        self.log_train_terms(terms, batch_size=batch_size)
        if self.objective.scheduled:  # the same on every process: never synchronized
            values = self.hparam_values()
            self.log_train_values({name: values[name] for name in self.objective.scheduled}, batch_size=batch_size)
        return terms["loss"]

    def loss_terms(self, batch: Any, teacher_outputs: TeacherOutputs | None) -> dict[str, Tensor]:
        """Every loss term of one training batch, as ``training_step`` computes them (without logging).

        The batch is split and routed (:meth:`split_batch`), the student runs once (its features captured for the
        feature maps), and :meth:`compute_loss` gets the mask of the logits' positions (:meth:`position_mask`) and
        the batch's token masks for the feature terms.
        """
        return self._step_terms(batch, teacher_outputs)[0]

    def _step_terms(
        self, batch: Any, teacher_outputs: TeacherOutputs | None, check: bool = False
    ) -> tuple[dict[str, Tensor], int]:
        inputs, target = self._split_once(batch)
        self._split = None  # nothing of the batch is kept past its step
        if teacher_outputs is None and self._teacher is not None and self.objective.needs_teacher:
            # no callback hook ran for this batch (the Tuner's searches swap the Trainer's callbacks): ask directly
            teacher_outputs = self._teacher.run(self._request(inputs, target))
        with self.objective.recording():
            logits = self.student_logits(inputs)
        features = self.objective.capture.take() if self.feature_maps else None
        masks = self.token_masks(inputs, target)
        mask = self.position_mask(masks, logits)
        terms = self.compute_loss(logits, teacher_outputs, target, mask, features, masks=masks)
        if check:
            check_finite_loss(terms, self._step_name(), logits, teacher_outputs, inputs, self)
        return terms, logits.shape[0]

    def _step_name(self) -> str:
        if self._trainer is None:
            return "a step outside a Trainer"
        trainer = self.trainer
        batch = trainer.fit_loop.epoch_loop.batch_idx
        return f"global step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch})"

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Return the student's logits for the inputs part of the batch."""
        inputs, _ = self.split_batch(batch)
        return self.student_logits(inputs)

    @override
    def _evaluate(self, stage: str, batch: Any, dataloader_idx: int) -> None:
        """Log ``{stage}/loss`` and ``{stage}/acc``; with teacher outputs also teacher accuracy, agreement, KD loss."""
        inputs, target = self._split_once(batch)
        self._split = None
        evaluate_student(self, stage, inputs, target, dataloader_idx)

    # ------------------------------------------------------------------------------------------------------- export
    def export_student(self) -> nn.Module:
        """Return a standalone copy of the trained student, in eval mode, with no distillation-only state.

        For the wrapped form this is a copy of ``student`` (of the original network for a ``torch.compile``-d one:
        compile the copy again if you like); for a subclass it is a copy of the module detached from its Trainer,
        without projectors, feature maps or feature hooks (its ``forward`` still works on its own).
        """
        capture = self.objective.capture
        attached = capture.attached
        capture.remove()  # hooks must not be copied along with the layers they sit on
        try:
            if self.student is not None:
                return copy.deepcopy(self.student).eval()
            trainer, teacher = self._trainer, self._teacher
            self.trainer, self._teacher = None, None
            try:
                exported = copy.deepcopy(self)
            finally:
                self.trainer, self._teacher = trainer, teacher
        finally:
            if attached:
                capture.attach(self.objective.root)
        exported.set_teacher_outputs(None)
        bare = DistillationObjective(alpha=0.0)
        bare.bind(exported)
        exported._objective = (bare,)
        exported.projectors = bare.projectors
        return exported.eval()
