r"""Projectors: the learnable maps that bring a student feature to the shape of the teacher feature it matches.

A projector maps the student's feature into the teacher's space (FitNets' regressor), so the loss compares
:math:`D(F_t, P(F_s))`. Kinds:

- ``"identity"``: no parameters; the features must already agree (up to spatial size, see below).
- ``"linear"``: ``nn.Linear`` over the **last** dimension: ``(*, D_s) -> (*, D_t)`` (vectors, token features).
- ``"conv1x1"``: a 1x1 convolution over the **channel** dimension 1 of a channel-first map:
  ``(N, C_s, *spatial) -> (N, C_t, *spatial)``, for any number of spatial dimensions.
- ``"auto"``: chosen from the two shapes (per sample, batch dimension excluded) by :func:`resolve_projector`.

Spatial sizes. For channel-first maps (rank 3 to 5) whose spatial sizes differ, both maps are average-pooled
(``adaptive_avg_pool``) to the element-wise **smaller** size before the projector, so the finer map is summarized
and nothing is interpolated; see :func:`match_spatial`. Average pooling commutes with a 1x1 convolution, so the
order does not change the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal, cast, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_distill.losses.functional._common import check_choice

ProjectorName = Literal["auto", "identity", "linear", "conv1x1"]
"""How a student feature is mapped to the teacher feature's shape."""

_PROJECTORS: tuple[str, ...] = get_args(ProjectorName)
_POOLS: dict[int, Callable[..., Tensor]] = {
    1: F.adaptive_avg_pool1d,
    2: F.adaptive_avg_pool2d,
    3: F.adaptive_avg_pool3d,
}


class ChannelProjector(nn.Module):
    """A 1x1 convolution over dimension 1 of a ``(N, C, *spatial)`` map, for any number of spatial dimensions.

    It is a ``nn.Linear`` applied along the channel dimension, so one class serves 1-D, 2-D and 3-D maps; its
    parameters are ``linear.weight`` ``(C_out, C_in)`` and ``linear.bias`` ``(C_out,)``.

    Args:
        in_channels: Channels of the student's map.
        out_channels: Channels of the teacher's map.

    Example::

        >>> import torch
        >>> ChannelProjector(8, 16)(torch.randn(2, 8, 5, 5)).shape
        torch.Size([2, 16, 5, 5])
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """Project the channels of ``x`` of shape ``(N, C_in, *spatial)``."""
        if x.ndim < 3 or x.shape[1] != self.linear.in_features:
            raise ValueError(
                f"ChannelProjector expects a (N, {self.linear.in_features}, *spatial) map, got {tuple(x.shape)}."
            )
        # One batched matrix product over the flattened positions: its output is contiguous in the teacher's
        # (N, C_out, *spatial) layout, so the loss after it and the backward need no transposing copies (about
        # 1.2-1.7x faster than `linear(x.movedim(1, -1)).movedim(-1, 1)` forward and backward on CPU).
        n, spatial = x.shape[0], x.shape[2:]
        flat = x.reshape(n, x.shape[1], math.prod(spatial))
        out = torch.baddbmm(self.linear.bias[None, :, None], self.linear.weight.expand(n, -1, -1), flat)
        return out.view(n, self.linear.out_features, *spatial)


def check_projector(projector: object) -> ProjectorName:
    """Validate a projector name.

    Raises:
        ValueError: If ``projector`` is not one of ``"auto"``, ``"identity"``, ``"linear"``, ``"conv1x1"``.
    """
    return cast(ProjectorName, check_choice("projector", projector, _PROJECTORS))


def _is_channel_first(shape: tuple[int, ...]) -> bool:
    return 3 <= len(shape) <= 5


def spatial_mismatch(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> bool:
    """Whether two channel-first map shapes of equal rank differ in their spatial sizes (dimensions 2 and up)."""
    return (
        len(student_shape) == len(teacher_shape)
        and _is_channel_first(student_shape)
        and student_shape[2:] != teacher_shape[2:]
    )


def resolve_projector(
    projector: ProjectorName, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], where: str
) -> Literal["identity", "linear", "conv1x1"]:
    """Turn ``"auto"`` into a concrete kind and check that the kind fits the two feature shapes.

    The rule for ``"auto"`` (shapes include the batch dimension, which must agree):

    1. equal shapes: ``"identity"``;
    2. rank 2 ``(N, D)``, or rank 3 differing only in the last dimension (token features ``(B, L, D)``):
       ``"linear"`` (for a 1-D map ``(N, C, L)`` that differs only in length, pass ``"identity"`` to pool instead);
    3. rank 3-5 with a different dimension 1 (channels): ``"conv1x1"`` (spatial sizes are pooled to match);
    4. rank 4-5 differing only in spatial size: ``"identity"`` (pooled); anything else: ``"linear"``.

    Args:
        projector: The requested kind.
        student_shape: Shape of the student's feature.
        teacher_shape: Shape of the teacher's feature.
        where: How to name the feature map in error messages.

    Raises:
        ValueError: If the shapes cannot be matched by the (resolved) kind; the message says which kind would.

    Example::

        >>> resolve_projector("auto", (8, 16, 10), (8, 32, 10), "map")
        'conv1x1'
        >>> resolve_projector("auto", (8, 12, 64), (8, 12, 128), "map")
        'linear'
    """
    s, t = tuple(student_shape), tuple(teacher_shape)
    shapes = f"student feature {s} and teacher feature {t}"
    if len(s) != len(t) or len(s) < 2 or s[0] != t[0]:
        raise ValueError(
            f"{where}: {shapes} must have the same rank (≥ 2) and batch size. HINT: select the right part of a "
            "layer's output with `student_select` / `teacher_select`, or map other layers."
        )
    pooled_equal = s == t or (spatial_mismatch(s, t) and s[:2] == t[:2])
    if projector == "auto":
        if s == t:
            return "identity"
        if len(s) == 2 or (len(s) == 3 and s[:2] == t[:2]):
            return "linear"
        if _is_channel_first(s) and s[1] != t[1]:
            return "conv1x1"
        projector = "identity" if pooled_equal else "linear"
    if projector == "identity" and not pooled_equal:
        raise ValueError(f"{where}: projector='identity' cannot match {shapes}. HINT: use projector='auto'.")
    if projector == "linear" and s[:-1] != t[:-1]:
        raise ValueError(
            f"{where}: projector='linear' maps the last dimension only, but {shapes} also differ elsewhere. "
            "HINT: use projector='conv1x1' for channel-first maps, or 'auto'."
        )
    if projector == "conv1x1" and not _is_channel_first(s):
        raise ValueError(
            f"{where}: projector='conv1x1' needs channel-first maps (N, C, *spatial) of rank 3 to 5, got {shapes}. "
            "HINT: use projector='linear' for (N, D) or (B, L, D) features."
        )
    return projector


def build_projector(kind: Literal["identity", "linear", "conv1x1"], student_dim: int, teacher_dim: int) -> nn.Module:
    """Build a projector of a concrete kind from the student's and the teacher's feature width.

    For ``"linear"`` the widths are the last dimensions, for ``"conv1x1"`` the channel dimensions.

    Example::

        >>> build_projector("linear", 64, 128)
        Linear(in_features=64, out_features=128, bias=True)
    """
    if kind == "identity":
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(student_dim, teacher_dim)
    return ChannelProjector(student_dim, teacher_dim)


def check_projector_fits(
    projector: nn.Module, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], where: str
) -> None:
    """Refuse a projector whose widths disagree with the probed feature shapes.

    For a projector built before the features were seen (from ``student_dim`` / ``teacher_dim``, or loaded from a
    checkpoint): the mismatch is named here instead of a bare matmul error at the first step.

    Raises:
        ValueError: If the projector's input or output width differs from the features' (named with both shapes).
    """
    if isinstance(projector, ChannelProjector):
        widths, axis, index = (projector.linear.in_features, projector.linear.out_features), "dimension 1", 1
    elif isinstance(projector, nn.Linear):
        widths, axis, index = (projector.in_features, projector.out_features), "the last dimension", -1
    else:
        return
    found = (
        student_shape[index] if len(student_shape) > 1 else None,
        teacher_shape[index] if len(teacher_shape) > 1 else None,
    )
    if found != widths:
        raise ValueError(
            f"{where}: its projector maps {widths[0]} -> {widths[1]} features along {axis}, but the student's feature "
            f"has shape {student_shape} and the teacher's {teacher_shape} ({found[0]} -> {found[1]}). HINT: correct "
            "`student_dim` / `teacher_dim` (or leave them None: they are inferred from one batch), or check that the "
            "layers are the ones the projector (or the checkpoint it came from) was made for."
        )


def match_spatial(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool two channel-first maps to their element-wise smaller spatial size (others pass unchanged).

    Example::

        >>> import torch
        >>> s, t = match_spatial(torch.ones(2, 4, 8, 8), torch.ones(2, 6, 4, 16))
        >>> tuple(s.shape), tuple(t.shape)
        ((2, 4, 4, 8), (2, 6, 4, 8))
    """
    s_shape, t_shape = tuple(student.shape), tuple(teacher.shape)
    if not spatial_mismatch(s_shape, t_shape):
        return student, teacher
    size = tuple(min(a, b) for a, b in zip(s_shape[2:], t_shape[2:], strict=True))
    pool = _POOLS[len(size)]
    if s_shape[2:] != size:
        student = pool(student, size)
    if t_shape[2:] != size:
        teacher = pool(teacher, size)
    return student, teacher


def projector_from_dims(
    projector: ProjectorName, loss: str, student_dim: int | None, teacher_dim: int | None, name: str
) -> nn.Module | None:
    """The projector of a feature map known without its shapes; ``None`` when it must be inferred from them.

    Attention maps and ``"identity"`` need no widths; other kinds need both widths.

    Raises:
        ValueError: For ``projector="auto"`` with two different widths (the rank, hence the kind, is unknown).
    """
    if loss == "attention":  # channel-free maps: nothing to size
        return nn.Identity()
    both = student_dim is not None and teacher_dim is not None
    if projector == "identity" and both and student_dim != teacher_dim:
        raise ValueError(
            f"Feature map {name!r}: projector='identity' with different widths {student_dim} and "
            f"{teacher_dim}. HINT: use projector='linear' or 'conv1x1'."
        )
    if projector == "identity":
        return nn.Identity()
    if student_dim is None or teacher_dim is None:
        return None
    kind = projector
    if kind == "auto":
        if student_dim != teacher_dim:
            raise ValueError(
                f"Feature map {name!r}: projector='auto' cannot choose between 'linear' and 'conv1x1' from the "
                f"widths alone ({student_dim} -> {teacher_dim}). HINT: say which, or drop the widths to "
                "infer everything from `example_input_array`."
            )
        return nn.Identity()
    return build_projector(kind, student_dim, teacher_dim)


def projector_from_state(state: Mapping[str, Tensor], prefix: str) -> nn.Module:
    """Rebuild a projector from its saved weights: no weights is an identity, ``linear.weight`` a 1x1 convolution."""
    if f"{prefix}linear.weight" in state:
        out_dim, in_dim = state[f"{prefix}linear.weight"].shape
        return ChannelProjector(in_dim, out_dim)
    if f"{prefix}weight" in state:
        out_dim, in_dim = state[f"{prefix}weight"].shape
        return nn.Linear(in_dim, out_dim)
    return nn.Identity()
