r"""DistillationObjective: the one composition of a distillation loss, shared by the Trainer path and your own loops.

.. math::
    \mathcal{L} = \alpha \, \mathcal{L}_{KD} + (1 - \alpha)\, \mathcal{L}_{task} + \sum_i w_i \, \mathcal{L}_{F_i}

:class:`~lightning_distill.DistillModule` (a LightningModule) and :class:`~lightning_distill.Distiller` (a loop
helper) both hold one; neither composes a loss of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from lightning_distill._batches import next_token_view
from lightning_distill._contract import TeacherConnection
from lightning_distill._layers import find_layer
from lightning_distill._positions import Side, TokenMasks, feature_mask, layer_side
from lightning_distill.features._capture import FeatureCapture, Selector
from lightning_distill.features._map import FeatureMap, coerce_feature_maps
from lightning_distill.features._projectors import (
    build_projector,
    check_projector_fits,
    match_spatial,
    projector_from_dims,
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
    kd_loss,
)
from lightning_distill.losses.functional._common import check_ignore_index
from lightning_distill.losses.functional.logits import weigh_terms
from lightning_distill.losses.functional.topk import topk_distillation_terms
from lightning_distill.schedules import Schedule, checked_schedule
from lightning_distill.teacher._runner import TeacherOutputs

__all__ = ["DistillationObjective"]


class DistillationObjective(nn.Module):
    r"""Schedules, feature maps, projectors and the composition of the distillation loss, as a plain ``nn.Module``.

    .. math::
        \mathcal{L} = \alpha \, T^2 \, D\big(p_t^{(T)}, p_s^{(T)}\big) + (1 - \alpha)\, \mathrm{CE}(z_s, y)
        + \sum_i w_i \, D_i\big(F_t^{(n_i)}, P_i(F_s^{(m_i)})\big), \qquad p^{(T)} = \mathrm{softmax}(z / T)

    The alpha-weighting is :func:`~lightning_distill.losses.functional.logits.weigh_terms`'s, the only one in the
    library. The objective's parameters are the feature maps' projectors (``projectors.<key>``); it also holds the
    forward hooks that capture the student's features. Its owner (a :class:`~lightning_distill.DistillModule`, a
    :class:`~lightning_distill.Distiller`) binds the model whose layers the feature maps name (:meth:`bind`) and
    says where in training the schedules are (``step``, ``epoch``).

    Args:
        alpha, temperature, divergence, ignore_index, feature_maps, tckd_weight, nckd_weight, js_beta,
            kd_chunk_size, shift_labels: As in :class:`~lightning_distill.DistillModule`.

    Raises:
        ValueError: For ``alpha`` outside ``[0, 1]``, a non-positive ``temperature``, a negative weight, an unknown
            ``divergence``, or feature maps with clashing names.

    Example::

        >>> objective = DistillationObjective(alpha=0.5, temperature=2.0)
        >>> s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
        >>> terms = objective(s, TeacherOutputs(t), y)
        >>> sorted(terms), bool(torch.isclose(terms["loss"], 0.5 * terms["kd_loss"] + 0.5 * terms["task_loss"]))
        (['kd_loss', 'loss', 'task_loss'], True)
    """

    def __init__(
        self,
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
    ) -> None:
        super().__init__()
        self.divergence: Divergence = check_divergence(divergence)
        self.ignore_index = check_ignore_index(ignore_index)
        self.js_beta = check_js_beta(js_beta)
        self.kd_chunk_size = check_chunk_size(kd_chunk_size)
        if self.kd_chunk_size is not None and self.divergence == "dkd":
            raise ValueError(
                f"`kd_chunk_size={kd_chunk_size}` is not supported with divergence='dkd' (DKD needs every class of a "
                "position at once). HINT: pass kd_chunk_size=None, or another divergence."
            )
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
        self.scheduled = tuple(name for name, schedule in self.schedules.items() if not schedule.is_constant)
        self._values: tuple[tuple[int, int], dict[str, float]] | None = None
        self.projectors = nn.ModuleDict(
            {
                m.key: projector
                for m in self.feature_maps
                if (projector := projector_from_dims(m.projector, m.loss, m.student_dim, m.teacher_dim, m.name))
                is not None
            }
        )
        self.capture = FeatureCapture(role="student")
        for fmap in self.feature_maps:
            self.capture.add(fmap.student, fmap.student_select)
        self._root: tuple[nn.Module, ...] = ()  # a tuple: the student is its owner's submodule, not ours
        self._feature_sides: dict[str, Side] = {}
        self.probed = False  # whether a dry forward has shown which captured layers are modified in place

    # ---------------------------------------------------------------------------------------------- the student
    def bind(self, root: nn.Module) -> None:
        """Name the model whose layers the feature maps refer to (the student, or the module that is it)."""
        if self._root and self._root[0] is not root:
            self.capture.remove()
            self._feature_sides.clear()
        self._root = (root,)

    @property
    def root(self) -> nn.Module:
        """The bound student model (see :meth:`bind`)."""
        if not self._root:
            raise RuntimeError("The objective has no student yet. HINT: call `objective.bind(student)` first.")
        return self._root[0]

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Capture the student's feature-map layers during the block (nothing without feature maps)."""
        if not self.feature_maps:
            yield
            return
        self.capture.attach(self.root)
        with self.capture.recording():
            yield

    def probe(self, run: Callable[[], object], learn: bool = True) -> dict[str, Tensor]:
        """Run the student once in eval mode without gradient and return its captured features.

        Train/eval modes of every module of the owner's and the student's are restored. With ``learn`` the capture
        learns which layers the forward modifies in place (their outputs are copied from then on).
        """
        root = self.root
        modes = {module: module.training for module in (*self.modules(), *root.modules())}
        attached = self.capture.attached
        self.capture.attach(root)
        root.eval()
        try:
            with torch.no_grad(), self.capture.recording():
                run()
            self.probed = True
            return self.capture.take(learn=learn)
        finally:
            for module, training in modes.items():
                module.training = training
            if not attached:
                self.capture.remove()

    # ------------------------------------------------------------------------------------------ hyper-parameters
    def hparam_values(self, step: int = 0, epoch: int = 0) -> dict[str, float]:
        """Every hyper-parameter's value at ``(step, epoch)``, each schedule evaluated once per position.

        Keys: ``alpha``, ``temperature``, ``tckd_weight``, ``nckd_weight`` and ``weight/<map name>``.
        """
        if self._values is None or self._values[0] != (step, epoch):
            self._values = ((step, epoch), {n: s(step=step, epoch=epoch) for n, s in self.schedules.items()})
        return dict(self._values[1])

    @property
    def needs_teacher(self) -> bool:
        """Whether any step can use the teacher: the KD term has weight somewhere, or there are feature maps."""
        return bool(self.feature_maps) or self.schedules["alpha"].bounds() != (0.0, 0.0)

    def teacher_layers(self) -> tuple[tuple[str, Selector], ...]:
        """The teacher layers (and selectors) the feature maps read."""
        return tuple((m.teacher, m.teacher_select) for m in self.feature_maps)

    def check_teacher(self, connection: TeacherConnection) -> None:
        """Refuse a teacher this loss cannot learn from.

        Raises:
            ValueError: For ``divergence="mse"`` with a mixture of teachers (it has no logits), a teacher cache with
                feature maps (it stores logits only), or a top-k cache with another divergence than ``"kl"`` or a
                scheduled temperature (it stores probabilities at one temperature).
        """
        if connection.mixture and self.divergence == "mse":
            raise ValueError(
                "divergence='mse' compares raw logits, which a mixture of teachers does not have. HINT: use a "
                "divergence on probabilities ('kl', 'reverse_kl', 'js', 'soft_ce', 'dkd')."
            )
        if connection.cached and self.feature_maps:
            raise ValueError(
                "A teacher cache (TeacherCache, TokenCache) stores the teacher's outputs only, but the module has "
                "feature maps, which need the teacher's forward on every batch. HINT: remove the cache or the "
                "feature maps."
            )
        if connection.cache_top_k is not None:
            if self.divergence != "kl":
                raise ValueError(
                    f"A top-k TeacherCache supports divergence='kl' only, got {self.divergence!r}. HINT: "
                    "`TeacherCache(path)` stores the full logits, which work with every divergence."
                )
            if not self.schedules["temperature"].is_constant:
                raise ValueError(
                    "A top-k TeacherCache stores probabilities at one temperature, but the temperature is scheduled. "
                    "HINT: `TeacherCache(path)` stores the full logits, which work at any temperature."
                )

    # ---------------------------------------------------------------------------------------------------- terms
    def kd_loss(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor | None,
        mask: Tensor | None,
        values: Mapping[str, float],
    ) -> Tensor:
        """The KD term alone (validation's ``kd_loss``), at the temperature and DKD weights of ``values``."""
        return kd_loss(
            student_logits,
            teacher_logits,
            temperature=values["temperature"],
            divergence=self.divergence,
            mask=mask,
            target=target,
            ignore_index=self.ignore_index,
            tckd_weight=values["tckd_weight"],
            nckd_weight=values["nckd_weight"],
            js_beta=self.js_beta,
            chunk_size=self.kd_chunk_size,
        )

    def forward(
        self,
        student_logits: Tensor,
        teacher_outputs: TeacherOutputs | None,
        target: Tensor | None,
        mask: Tensor | None = None,
        student_features: Mapping[str, Tensor] | None = None,
        task_loss: Tensor | None = None,
        masks: TokenMasks | None = None,
        values: Mapping[str, float] | None = None,
    ) -> dict[str, Tensor]:
        """Compose the loss of one step and return every term.

        Args:
            student_logits: The student's logits ``(*, C)``.
            teacher_outputs: The teacher's outputs for the same batch, or ``None`` (allowed with ``alpha=0`` and no
                feature maps).
            target: Class indices ``(*)``, or ``None`` (then ``alpha`` must be 1).
            mask: Optional bool tensor ``(*)`` of the positions that count in the logit terms.
            student_features: The captured student features, keyed by :attr:`FeatureMap.student_key`; needed when
                there are feature maps.
            task_loss: A task loss computed by the caller, used in place of the cross-entropy on ``target``.
            masks: The batch's per-token masks, so feature terms on token features count only real tokens.
            values: The hyper-parameters of this step (:meth:`hparam_values`); default: step 0, epoch 0.

        Returns:
            ``{"loss", "task_loss", "kd_loss"}`` with a teacher, plus ``"tckd_loss"`` and ``"nckd_loss"`` for
            ``divergence="dkd"`` and ``"feature_loss/<name>"`` per feature map (unweighted); ``{"loss",
            "task_loss"}`` without one.

        Raises:
            RuntimeError: Without teacher outputs while ``alpha > 0`` or with feature maps, or without
                ``student_features`` while there are feature maps.
            ValueError: Without a target while ``alpha < 1``.
        """
        values = self.hparam_values() if values is None else values
        alpha = values["alpha"]
        if self.shift_labels:
            student_logits, target, mask = next_token_view(student_logits, target, mask)
        if teacher_outputs is None:
            if alpha > 0.0 or self.feature_maps:
                what = f"alpha={alpha}" if alpha > 0.0 else f"{len(self.feature_maps)} feature maps"
                raise RuntimeError(
                    f"The distillation loss has {what} but received no teacher outputs. HINT: add the teacher to the "
                    "Trainer: `Trainer(callbacks=[DistillationCallback(teacher=...)])`, or pass `alpha=0.0` (and no "
                    "feature maps) to train the student alone."
                )
            if task_loss is None:
                if target is None:
                    raise ValueError("Training without a teacher needs labels, but the batch has no target.")
                task_loss = cross_entropy(student_logits, target, mask=mask, ignore_index=self.ignore_index)
            return {"loss": task_loss, "task_loss": task_loss}
        terms = self._logit_terms(
            student_logits,
            teacher_outputs,
            None if task_loss is not None else target,
            mask,
            values,
            pure=task_loss is not None,
        )
        if task_loss is not None:
            terms.update(weigh_terms(terms["kd_loss"], task_loss, alpha))
        if self.feature_maps:
            if student_features is None:
                raise RuntimeError(
                    "The distillation loss has feature maps, so it needs `student_features` (the outputs captured "
                    "from the student's layers during its forward)."
                )
            loss = terms["loss"]
            for fmap in self.feature_maps:
                term = self.feature_term(fmap, student_features, teacher_outputs.features, masks)
                terms[f"feature_loss/{fmap.name}"] = term
                loss = loss + values[f"weight/{fmap.name}"] * term
            terms["loss"] = loss
        return terms

    def _logit_terms(
        self,
        student_logits: Tensor,
        teacher: TeacherOutputs,
        target: Tensor | None,
        mask: Tensor | None,
        values: Mapping[str, float],
        pure: bool,
    ) -> dict[str, Tensor]:
        """``loss``, ``task_loss``, ``kd_loss`` (and DKD's parts) of the logits; ``pure``: the KD term only.

        A top-k teacher from a token cache holds rows at unshifted positions t, which are the shifted logits' t too.
        """
        alpha = 1.0 if pure else values["alpha"]
        if teacher.topk is not None:
            return topk_distillation_terms(
                student_logits,
                teacher.topk,
                target,
                mask,
                self.ignore_index,
                alpha,
                values["temperature"],
                self.divergence,
                chunk_size=self.kd_chunk_size,
            )
        teacher_logits = next_token_view(teacher.logits, None, None)[0] if self.shift_labels else teacher.logits
        return distillation_loss_terms(
            student_logits,
            teacher_logits,
            target,
            alpha=alpha,
            temperature=values["temperature"],
            divergence=self.divergence,
            mask=mask,
            ignore_index=self.ignore_index,
            tckd_weight=values["tckd_weight"],
            nckd_weight=values["nckd_weight"],
            js_beta=self.js_beta,
            chunk_size=self.kd_chunk_size,
        )

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
                    "HINT: the teacher's features are captured for the feature maps its runner was set up with; the "
                    "student's during its forward inside `recording()` (`training_step` does this)."
                )
        if fmap.key not in self.projectors:
            raise RuntimeError(
                f"Feature map {fmap.name!r} has no projector yet. HINT: projectors are built in setup from the first "
                "batch (or `example_input_array`); outside a Trainer, call `build_projectors(...)`."
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
            root = self.root
            self._feature_sides[fmap.name] = layer_side(root, find_layer(root, fmap.student, role="student"))
        return self._feature_sides[fmap.name]

    # ---------------------------------------------------------------------------------------------- projectors
    @property
    def pending(self) -> list[str]:
        """Names of the feature maps whose projector is not built yet."""
        return [m.name for m in self.feature_maps if m.key not in self.projectors]

    def build_projectors(
        self, student_features: Mapping[str, Tensor], teacher_features: Mapping[str, Tensor], device: torch.device
    ) -> None:
        """Create every missing projector from the two sides' feature shapes, then evaluate every map once.

        A shape that no projector can match, or a given ``student_dim`` / ``teacher_dim`` that disagrees with the
        probed width, fails here rather than at the first step.

        Raises:
            ValueError: If a projector kind cannot match the two shapes, or a given width disagrees with them.
        """
        for fmap in self.feature_maps:
            where = f"Feature map {fmap.name!r}"
            s_shape = tuple(student_features[fmap.student_key].shape)
            t_shape = tuple(teacher_features[fmap.teacher_key].shape)
            if fmap.key in self.projectors:
                if fmap.projector == "identity" and fmap.loss != "attention":
                    resolve_projector(fmap.projector, s_shape, t_shape, where)  # refuses shapes it cannot match
                check_projector_fits(self.projectors[fmap.key], s_shape, t_shape, where)
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
            self.projectors[fmap.key] = build_projector(kind, s_dim, t_dim).to(device)
        with torch.no_grad():
            for fmap in self.feature_maps:
                self.feature_term(fmap, student_features, teacher_features)
