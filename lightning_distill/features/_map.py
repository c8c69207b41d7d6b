r"""``FeatureMap``: which student layer learns from which teacher layer, through which projector and loss.

Intermediate-layer distillation adds, for every map :math:`i`,

.. math::

    w_i \, D_i\big(F_t^{(n_i)},\; P_i(F_s^{(m_i)})\big)

to the training loss: :math:`F^{(n)}` is the output of the layer named :math:`n` (captured by a forward hook, no
edit to either model), :math:`P_i` a learnable projector owned by the student's module (see
:mod:`lightning_distill.features._projectors`) and :math:`D_i` a feature loss (see
:mod:`lightning_distill.losses.functional.features`). FitNets (Romero et al. 2015) is one ``"mse"`` map with a
projector; attention transfer (Zagoruyko & Komodakis 2017) is ``loss="attention"`` maps.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_distill.features._capture import Selector, check_selector, feature_key
from lightning_distill.features._projectors import ProjectorName, check_projector
from lightning_distill.losses.functional import FeatureLossName, check_feature_loss
from lightning_distill.schedules import Schedule, as_schedule, check_schedule

_INC_LOSS_NAMES = {"MSE": "mse", "KL": "kl", "L1": "l1"}


@dataclass(frozen=True)
class FeatureMap:
    r"""One pairing of a student layer with a teacher layer.

    Args:
        student: Dotted name of the student layer (as in ``named_modules()``; ``Sequential``/``ModuleList`` indices
            are plain numbers, ``"blocks.1"``). For ``DistillModule(student=net)`` names are relative to ``net``.
        teacher: Dotted name of the teacher layer.
        projector: ``"auto"`` (default), ``"identity"``, ``"linear"`` or ``"conv1x1"``; see
            :mod:`lightning_distill.features._projectors`.
        loss: ``"mse"`` (default), ``"l1"``, ``"cosine"``, ``"kl"`` or ``"attention"``.
        weight: Weight :math:`w_i \ge 0` of this term, a number or a
            :class:`~lightning_distill.schedules.Schedule`.
        name: Name of the term: logged as ``train/feature_loss/<name>``; its projector is stored under
            ``projectors.<name with non-word characters as "_">``. Defaults to the student layer's name.
        student_select: Part of the student layer's output to use: an index for tuple outputs, a key for dict
            outputs (``None``: the output itself).
        teacher_select: The same for the teacher layer.
        student_dim: Width of the student feature (last dimension for ``"linear"``, channels for ``"conv1x1"``).
            With both widths given the projector is built at once; otherwise the shapes are inferred from one
            dry forward of each model on the module's ``example_input_array``.
        teacher_dim: Width of the teacher feature.
        masked: For token features ``(B, L, D)``: count only the batch's real tokens (``attention_mask``, or for an
            encoder-decoder's decoder layers the decoder mask; see :mod:`lightning_distill._positions`). ``False``
            averages over every position, e.g. for a channel-first ``(N, C, L)`` map in a batch that has a mask.

    Raises:
        ValueError: For an empty layer name, an unknown projector or loss, a negative weight, a non-positive width,
            or a projector combined with ``loss="attention"`` (attention maps are channel-free).
        TypeError: For a selector that is not ``None``, an ``int`` or a ``str``.

    Example::

        >>> FeatureMap(student="blocks.1", teacher="layer3", weight=0.5)
        FeatureMap(student='blocks.1', teacher='layer3', weight=0.5)
    """

    student: str
    teacher: str
    projector: ProjectorName = "auto"
    loss: FeatureLossName = "mse"
    weight: float | Schedule = 1.0
    name: str = ""
    student_select: Selector = None
    teacher_select: Selector = None
    student_dim: int | None = None
    teacher_dim: int | None = None
    masked: bool = True

    def __post_init__(self) -> None:
        for side in ("student", "teacher"):
            layer = getattr(self, side)
            if not isinstance(layer, str) or not layer:
                raise ValueError(f"FeatureMap `{side}` must be a non-empty dotted layer name, got {layer!r}.")
            check_selector(getattr(self, f"{side}_select"), f"FeatureMap `{side}_select`")
            dim = getattr(self, f"{side}_dim")
            if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
                raise ValueError(f"FeatureMap `{side}_dim` must be a positive int or None, got {dim!r}.")
        check_projector(self.projector)
        check_feature_loss(self.loss)
        if not isinstance(self.masked, bool):
            raise TypeError(f"FeatureMap `masked` must be True or False, got {self.masked!r}.")
        if self.loss == "attention" and self.projector not in ("auto", "identity"):
            raise ValueError(
                f"FeatureMap with loss='attention' compares channel-averaged attention maps, so it needs no "
                f"projector; got projector={self.projector!r}. HINT: leave projector='auto'."
            )
        if not isinstance(self.name, str):
            raise ValueError(f"FeatureMap `name` must be a str, got {self.name!r}.")
        if not self.name:
            object.__setattr__(self, "name", self.student_key)
        if isinstance(self.weight, Mapping):  # a schedule's config (YAML, saved hyper-parameters)
            object.__setattr__(self, "weight", as_schedule(self.weight, "weight"))
        check_schedule(as_schedule(self.weight, "weight"), f"FeatureMap {self.name!r} `weight`", 0.0, None)

    def __repr__(self) -> str:
        shown = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name in ("student", "teacher")
            or (getattr(self, f.name) != f.default and not (f.name == "name" and self.name == self.student_key))
        ]
        return f"FeatureMap({', '.join(shown)})"

    @functools.cached_property
    def student_key(self) -> str:
        """Key of the captured student feature (the layer name, plus the selector if any)."""
        return feature_key(self.student, self.student_select)

    @functools.cached_property
    def teacher_key(self) -> str:
        """Key of the captured teacher feature in :attr:`TeacherOutputs.features`."""
        return feature_key(self.teacher, self.teacher_select)

    @functools.cached_property
    def key(self) -> str:
        """Key of this map's projector in ``DistillModule.projectors``: the name with non-word characters as ``_``."""
        return re.sub(r"\W", "_", self.name)

    @property
    def weight_schedule(self) -> Schedule:
        """The weight as a schedule (a constant for a plain number)."""
        return as_schedule(self.weight, "weight")

    def to_config(self) -> dict[str, Any]:
        """Plain-Python fields (a schedule as its config) that ``FeatureMap(**config)`` rebuilds."""
        config = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if isinstance(self.weight, Schedule):
            config["weight"] = self.weight.to_config()
        return config

    @classmethod
    def from_layer_mappings(
        cls,
        layer_mappings: Sequence[Any],
        loss_types: Sequence[str] | None = None,
        loss_weights: Sequence[float] | None = None,
        projector: ProjectorName = "auto",
    ) -> list[FeatureMap]:
        """Convert Intel Neural Compressor's ``layer_mappings`` (``IntermediateLayersKnowledgeDistillationLoss``).

        Accepted items: ``"name"`` or ``["name"]`` (the same layer name in both models); ``[student, teacher]``;
        ``[[student, sel], [teacher, sel]]`` (each inner list may omit ``sel``); and INC's older
        ``[student, sel, teacher, sel]``. A selector ``""`` means the whole output, a numeric string (``"0"``) or int
        an index, any other string a key. INC's ``loss_types`` ``"MSE"``, ``"KL"``, ``"L1"`` map to ``"mse"``,
        ``"kl"``, ``"l1"`` (our names are accepted too); missing ``loss_types`` default to ``"mse"`` and missing
        ``loss_weights`` to ``1 / len(layer_mappings)`` each, as in INC.

        Raises:
            ValueError: For an item of another shape, or ``loss_types`` / ``loss_weights`` of the wrong length.
            TypeError: For a callable selector (INC allows one; here, select with an index or key).

        Example::

            >>> maps = FeatureMap.from_layer_mappings(
            ...     [["layer1.0"], [["layer1.1.conv1", ""], ["layer1.1.conv1", "0"]]], loss_types=["KL", "MSE"])
            >>> [(m.student_key, m.teacher_key, m.loss, m.weight) for m in maps]
            [('layer1.0', 'layer1.0', 'kl', 0.5), ('layer1.1.conv1', 'layer1.1.conv1[0]', 'mse', 0.5)]
        """
        count = len(layer_mappings)
        loss_types = ["MSE"] * count if loss_types is None else list(loss_types)
        loss_weights = [1.0 / max(count, 1)] * count if loss_weights is None else list(loss_weights)
        if len(loss_types) != count or len(loss_weights) != count:
            raise ValueError(
                f"`loss_types` ({len(loss_types)}) and `loss_weights` ({len(loss_weights)}) must have one entry per "
                f"layer mapping ({count})."
            )
        maps = []
        for item, loss, weight in zip(layer_mappings, loss_types, loss_weights, strict=True):
            (student, s_sel), (teacher, t_sel) = _parse_inc_item(item)
            maps.append(
                cls(
                    student=student,
                    teacher=teacher,
                    projector=projector,
                    loss=_INC_LOSS_NAMES.get(loss, loss.lower() if isinstance(loss, str) else loss),  # type: ignore[arg-type]
                    weight=weight,
                    student_select=s_sel,
                    teacher_select=t_sel,
                )
            )
        return maps


def coerce_feature_maps(feature_maps: Iterable[FeatureMap | Mapping[str, Any]] | None) -> tuple[FeatureMap, ...]:
    """Validate a list of maps (``FeatureMap`` objects or their config dicts) and check their names are distinct.

    Raises:
        TypeError: For an entry that is neither.
        ValueError: If two maps share a name or a projector key (give them distinct ``name=``).
    """
    if feature_maps is None:
        return ()
    if isinstance(feature_maps, (FeatureMap, Mapping, str)):
        raise TypeError("`feature_maps` must be a list of FeatureMap, got a single " + type(feature_maps).__name__)
    maps = tuple(m if isinstance(m, FeatureMap) else _from_mapping(m) for m in feature_maps)
    for attribute in ("name", "key"):
        seen: dict[str, FeatureMap] = {}
        for fmap in maps:
            value = getattr(fmap, attribute)
            if value in seen:
                raise ValueError(
                    f"Two feature maps have the {attribute} {value!r} ({seen[value].student!r} -> "
                    f"{seen[value].teacher!r} and {fmap.student!r} -> {fmap.teacher!r}). HINT: give each a distinct "
                    "`name=`."
                )
            seen[value] = fmap
    return maps


def _from_mapping(entry: object) -> FeatureMap:
    if not isinstance(entry, Mapping):
        raise TypeError(f"`feature_maps` entries must be FeatureMap or dict, got {type(entry).__name__}: {entry!r}.")
    try:
        return FeatureMap(**entry)
    except TypeError as err:
        raise TypeError(f"Cannot build a FeatureMap from {dict(entry)!r}: {err}.") from err


def _parse_selector(select: object) -> Selector:
    if callable(select):
        raise TypeError(
            "Callable output selectors are not supported; select a tuple index or a dict key, or map the layer "
            "inside that produces the tensor."
        )
    if isinstance(select, str):
        if not select:
            return None
        if re.fullmatch(r"-?\d+", select):
            return int(select)
    return check_selector(select, "A layer_mappings selector")


def _parse_side(side: object) -> tuple[str, Selector]:
    if isinstance(side, str):
        return side, None
    if isinstance(side, (list, tuple)) and len(side) in (1, 2) and isinstance(side[0], str):
        return side[0], _parse_selector(side[1]) if len(side) == 2 else None
    raise ValueError(f"A layer_mappings side must be 'name' or ['name', selector], got {side!r}.")


def _parse_inc_item(item: object) -> tuple[tuple[str, Selector], tuple[str, Selector]]:
    if isinstance(item, str):
        return (item, None), (item, None)
    if isinstance(item, (list, tuple)):
        if len(item) == 1:
            same = _parse_side(item[0])
            return same, same
        if len(item) == 2:
            return _parse_side(item[0]), _parse_side(item[1])
        if len(item) == 4 and isinstance(item[0], str) and isinstance(item[2], str):
            return (item[0], _parse_selector(item[1])), (item[2], _parse_selector(item[3]))
    raise ValueError(
        f"Cannot read the layer mapping {item!r}: expected 'name', [student, teacher], "
        "[[student, selector], [teacher, selector]] or [student, selector, teacher, selector]."
    )
