r"""Feature-matching losses between intermediate student and teacher activations.

Every loss upcasts to float32 (float64 stays float64), returns a scalar, gives a zero that is still attached to the
autograd graph for empty input (``backward()`` then gives zero gradients, not NaN), and lets gradients flow into both
tensors (pass a detached teacher). Shapes must match exactly, except that :func:`attention_transfer_loss` allows
different channel counts; map the student to the teacher's width first (``FeatureMap(projector='auto')``).
"""

from __future__ import annotations

import math
from typing import Literal, cast, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_distill.losses.functional._common import (
    check_choice,
    check_power,
    compute_dtype,
    kl_sum,
    log_probs,
)

__all__ = [
    "FeatureLossName",
    "attention_map",
    "attention_transfer_loss",
    "check_feature_loss",
    "cosine_feature_loss",
    "feature_loss",
    "kl_feature_loss",
    "l1_feature_loss",
    "mse_feature_loss",
]

FeatureLossName = Literal["mse", "l1", "cosine", "kl", "attention"]
"""How student features are compared with teacher features (see :func:`feature_loss`)."""

_FEATURE_LOSSES: tuple[str, ...] = get_args(FeatureLossName)
_COSINE_EPS = 1e-8  # lower bound on each vector norm, as in ``F.cosine_similarity``
_ATTENTION_EPS = 1e-12  # lower bound on the attention-map norm, as in ``F.normalize``
_PROJECTOR_HINT = "HINT: use a projector (FeatureMap(projector='auto')) to map the student's features to the teacher's."


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------
def check_feature_loss(name: str) -> FeatureLossName:
    """Validate the name of a feature loss and return it.

    Args:
        name: One of ``"mse"``, ``"l1"``, ``"cosine"``, ``"kl"``, ``"attention"``.

    Returns:
        ``name``, typed as :data:`FeatureLossName`.

    Raises:
        ValueError: If ``name`` is not one of the allowed names; the message lists them.

    Example::

        >>> check_feature_loss("cosine")
        'cosine'
    """
    return cast(FeatureLossName, check_choice("loss", name, _FEATURE_LOSSES))


def _check_feature(name: str, feature: object, min_ndim: int, layout: str) -> Tensor:
    if not isinstance(feature, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(feature).__name__}.")
    if not feature.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor, got dtype {feature.dtype} and shape {tuple(feature.shape)}."
        )
    if feature.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimension(s) {layout}, got shape {tuple(feature.shape)}."
        )
    return feature


def _upcast_pair(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Validate two same-shape feature tensors and upcast both to the compute dtype."""
    _check_feature("student features", student, 1, "(*, D)")
    _check_feature("teacher features", teacher, 1, "(*, D)")
    if student.shape == teacher.shape:
        dtype = compute_dtype(student, teacher)
        return student.to(dtype), teacher.to(dtype)
    s_shape, t_shape = tuple(student.shape), tuple(teacher.shape)
    if len(s_shape) != len(t_shape):
        why = f"their ranks differ ({len(s_shape)} vs {len(t_shape)})."
    elif s_shape[-1] != t_shape[-1]:
        why = f"the feature widths (last dim) differ ({s_shape[-1]} vs {t_shape[-1]}). {_PROJECTOR_HINT}"
    elif len(s_shape) >= 3 and s_shape[1] != t_shape[1]:
        why = (
            f"dim 1 differs ({s_shape[1]} vs {t_shape[1]}). HINT: if it holds channels, use a projector "
            "(FeatureMap(projector='auto')) or loss='attention' (any channel counts); if positions, feed one input."
        )
    else:
        dims = [d for d, (a, b) in enumerate(zip(s_shape, t_shape, strict=True)) if a != b]
        why = f"dims {dims} differ. HINT: feed both models the same batch; pool or resize spatial maps first."
    raise ValueError(f"student features {s_shape} and teacher features {t_shape} must have the same shape, but {why}")


def _masked_pair(student: Tensor, teacher: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The positions of two feature tensors that ``mask`` (their leading shape, bool) selects, each ``(n, D)``."""
    _upcast_pair(student, teacher)  # same shapes, floating: the mask then fits both
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(student.shape[:-1]):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"`mask` must be a bool tensor of the features' leading shape {tuple(student.shape[:-1])}, got {got}."
        )
    return student[mask], teacher[mask]


def _attached_zero(student: Tensor, teacher: Tensor) -> Tensor:
    """A zero scalar connected to both (upcast) inputs, so that ``backward()`` gives zero gradients for empty input."""
    return (student.sum() + teacher.sum()) * 0.0


# --------------------------------------------------------------------------------------------------------------------
# Element-wise and per-vector losses
# --------------------------------------------------------------------------------------------------------------------
def mse_feature_loss(student: Tensor, teacher: Tensor) -> Tensor:
    r"""Mean squared error between features, averaged over all :math:`n` elements (FitNets' hint loss).

    .. math::

        \mathcal{L}_{MSE} = \frac{1}{n} \sum_{j=1}^{n} (s_j - t_j)^2

    Args:
        student: Student features of any shape with at least one dimension; any floating dtype.
        teacher: Teacher features of the same shape.

    Returns:
        A scalar tensor, float32 (float64 if an input is float64). Zero for empty input.

    Raises:
        ValueError: If an input is not a floating tensor with at least one dimension or the shapes differ.

    Example::

        >>> s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> t = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
        >>> mse_feature_loss(s, t).item()
        3.25
    """
    s, t = _upcast_pair(student, teacher)
    if s.numel() == 0:
        return _attached_zero(s, t)
    return F.mse_loss(s, t)


def l1_feature_loss(student: Tensor, teacher: Tensor) -> Tensor:
    r"""Mean absolute error between features, averaged over all :math:`n` elements.

    .. math::

        \mathcal{L}_{L1} = \frac{1}{n} \sum_{j=1}^{n} |s_j - t_j|

    Args:
        student: Student features of any shape with at least one dimension; any floating dtype.
        teacher: Teacher features of the same shape.

    Returns:
        A scalar tensor, float32 (float64 if an input is float64). Zero for empty input.

    Raises:
        ValueError: If an input is not a floating tensor with at least one dimension or the shapes differ.

    Example::

        >>> s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> t = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
        >>> l1_feature_loss(s, t).item()
        1.25
    """
    s, t = _upcast_pair(student, teacher)
    if s.numel() == 0:
        return _attached_zero(s, t)
    return F.l1_loss(s, t)


def cosine_feature_loss(student: Tensor, teacher: Tensor) -> Tensor:
    r"""One minus the cosine similarity along the last dimension, averaged over the :math:`P` leading positions.

    .. math::

        \mathcal{L}_{cos} = \frac{1}{P} \sum_{i=1}^{P} \Big(1 - \frac{s^{(i)} \cdot t^{(i)}}
            {\max(\|s^{(i)}\|_2, \epsilon) \, \max(\|t^{(i)}\|_2, \epsilon)}\Big), \qquad \epsilon = 10^{-8}

    The loss is in :math:`[0, 2]` and ignores the vectors' lengths. A zero vector (student or teacher) has
    similarity 0 with anything, so its position contributes exactly 1, and its gradient is 0 (not NaN, and not the
    :math:`\sim 1/\epsilon` spike of a plain clamp: a dead-ReLU row gets no push from this loss).

    Args:
        student: Student features ``(*, D)``, e.g. ``(B, D)`` or ``(B, L, D)``; any floating dtype.
        teacher: Teacher features of the same shape.

    Returns:
        A scalar tensor, float32 (float64 if an input is float64). Zero for empty input.

    Raises:
        ValueError: If an input is not a floating tensor with at least one dimension or the shapes differ.

    Example::

        >>> s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
        >>> t = torch.tensor([[0.0, 1.0], [2.0, 2.0], [1.0, 0.0]])
        >>> round(cosine_feature_loss(s, t).item(), 4)
        0.6667
    """
    s, t = _upcast_pair(student, teacher)
    if s.numel() == 0:
        return _attached_zero(s, t)
    s_norm = torch.linalg.vector_norm(s, dim=-1)
    t_norm = torch.linalg.vector_norm(t, dim=-1)
    similarity = (s * t).sum(dim=-1) / (s_norm.clamp(min=_COSINE_EPS) * t_norm.clamp(min=_COSINE_EPS))
    # Same value (0) at an exact zero vector, but a zero gradient there instead of one of size ~1/eps.
    similarity = torch.where((s_norm > 0) & (t_norm > 0), similarity, 0.0)
    return 1.0 - similarity.mean()


def kl_feature_loss(student: Tensor, teacher: Tensor) -> Tensor:
    r"""KL divergence from the teacher's to the student's softmax over the last dimension, averaged over positions.

    With :math:`p = \mathrm{softmax}(t^{(i)})` and :math:`q = \mathrm{softmax}(s^{(i)})` over the last dimension,

    .. math::

        \mathcal{L}_{KL} = \frac{1}{P} \sum_{i=1}^{P} \sum_{d} p_d (\log p_d - \log q_d)

    computed from ``log_softmax`` (``F.kl_div(..., log_target=True)``) and clamped at 0, so bf16 inputs and zero
    probabilities give neither NaN nor a negative value. A ``-inf`` input is probability zero with the convention of
    :func:`~lightning_distill.losses.functional.kd_loss` (:math:`0 \log 0 = 0`; :math:`\log q_d` floored at
    :math:`-10^4` where only the teacher has mass). No temperature: scale the inputs first to use one.

    Args:
        student: Student features ``(*, D)``; any floating dtype.
        teacher: Teacher features of the same shape.

    Returns:
        A scalar tensor, float32 (float64 if an input is float64). Zero for empty input.

    Raises:
        ValueError: If an input is not a floating tensor with at least one dimension or the shapes differ.

    Example::

        >>> s = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
        >>> t = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
        >>> round(kl_feature_loss(s, t).item(), 4)
        0.2311
    """
    s, t = _upcast_pair(student, teacher)
    if s.numel() == 0:
        return _attached_zero(s, t)
    log_s = log_probs(s.reshape(-1, s.shape[-1]), 1.0)
    log_t = log_probs(t.reshape(-1, t.shape[-1]), 1.0)
    return (kl_sum(log_t, log_s) / log_s.shape[0]).clamp(min=0.0)


# --------------------------------------------------------------------------------------------------------------------
# Attention transfer
# --------------------------------------------------------------------------------------------------------------------
def _abs_pow(feature: Tensor, p: float) -> Tensor:
    if p == 2.0:
        return feature.square()
    magnitude = feature.abs()
    if p >= 1.0:
        return magnitude.pow(p)
    # d|x|^p/dx is infinite at 0 for p < 1 (NaN after the chain rule); take 0 there instead.
    nonzero = magnitude > 0
    return torch.where(nonzero, torch.where(nonzero, magnitude, 1.0).pow(p), 0.0)


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    r"""Spatial attention map of a channel-first feature map (Zagoruyko & Komodakis, 2017).

    For :math:`F` of shape ``(N, C, *spatial)``, per sample and spatial position :math:`k`,

    .. math::

        Q_k = \frac{1}{C} \sum_{c=1}^{C} |F_{c,k}|^p, \qquad
        \hat{Q} = \frac{Q}{\max(\|Q\|_2, \epsilon)}, \qquad \epsilon = 10^{-12}

    with :math:`Q` flattened to ``prod(spatial)`` values, as in RepDistiller's ``Attention.at``. An all-zero sample
    gives an all-zero map. For ``p < 1`` the gradient at an exact zero activation is taken as 0.

    Args:
        feature: Feature map ``(N, C, *spatial)`` with at least one spatial dimension and one channel.
        p: Exponent :math:`p > 0` applied to the activations' magnitudes; the paper uses 2.

    Returns:
        The L2-normalized maps, shape ``(N, prod(spatial))``, float32 (float64 for float64 input).

    Raises:
        ValueError: If ``feature`` is not a floating tensor of rank at least 3 with at least one channel, or ``p``
            is not finite and positive.

    Example::

        >>> feature = torch.tensor([[[[1.0, -2.0], [2.0, 2.0]], [[-1.0, 0.0], [0.0, 2.0]]]])  # (1, 2, 2, 2)
        >>> attention_map(feature)
        tensor([[0.2000, 0.4000, 0.4000, 0.8000]])
    """
    p = check_power(p)
    _check_feature("feature map", feature, 3, "(N, C, *spatial)")
    if feature.shape[1] == 0:
        raise ValueError(f"feature map must have at least one channel (dim 1), got shape {tuple(feature.shape)}.")
    values = _abs_pow(feature.to(compute_dtype(feature)), p).mean(dim=1)
    flat = values.reshape(feature.shape[0], math.prod(feature.shape[2:]))
    return F.normalize(flat, p=2.0, dim=1, eps=_ATTENTION_EPS)


def attention_transfer_loss(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    r"""Attention-transfer loss: mean squared difference of normalized attention maps (Zagoruyko & Komodakis, 2017).

    With :math:`\hat{Q}` from :func:`attention_map`, :math:`N` samples and :math:`K` spatial positions,

    .. math::

        \mathcal{L}_{AT} = \frac{1}{N K} \sum_{n=1}^{N} \sum_{k=1}^{K} (\hat{Q}_{s,nk} - \hat{Q}_{t,nk})^2

    which is RepDistiller's ``Attention.at_loss`` (without its pooling). The channel counts may differ; the batch
    and spatial sizes may not. The value is small (each map has unit norm), so callers usually weight it heavily,
    e.g. 1000 as the paper's :math:`\beta`.

    Args:
        student: Student feature map ``(N, C_s, *spatial)``; any floating dtype.
        teacher: Teacher feature map ``(N, C_t, *spatial)``.
        p: Exponent of :func:`attention_map`, ``> 0``.

    Returns:
        A scalar tensor, float32 (float64 if an input is float64). Zero for empty input.

    Raises:
        ValueError: If an input is not a floating tensor of rank at least 3 with at least one channel, the ranks,
            batch or spatial sizes differ, or ``p`` is not finite and positive.

    Example::

        >>> s = torch.tensor([[[[1.0, -2.0], [2.0, 2.0]], [[-1.0, 0.0], [0.0, 2.0]]]])  # (1, 2, 2, 2)
        >>> t = torch.tensor([[[[0.0, 0.0], [0.0, 1.0]]]])  # (1, 1, 2, 2)
        >>> round(attention_transfer_loss(s, t).item(), 4)
        0.1
    """
    p = check_power(p)
    layout = "(N, C, *spatial)"
    _check_feature("student features", student, 3, layout)
    _check_feature("teacher features", teacher, 3, layout)
    s_shape, t_shape = tuple(student.shape), tuple(teacher.shape)
    if len(s_shape) != len(t_shape) or s_shape[0] != t_shape[0] or s_shape[2:] != t_shape[2:]:
        raise ValueError(
            f"student features {s_shape} and teacher features {t_shape} must have the same rank, batch size and "
            "spatial size (only the channel counts may differ). HINT: pool or resize one map first, e.g. "
            "F.adaptive_avg_pool2d(student, teacher.shape[-2:])."
        )
    dtype = compute_dtype(student, teacher)
    q_s = attention_map(student.to(dtype), p)
    q_t = attention_map(teacher.to(dtype), p)
    if q_s.numel() == 0:
        return _attached_zero(q_s, q_t)
    return F.mse_loss(q_s, q_t)


# --------------------------------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------------------------------
def feature_loss(
    student: Tensor, teacher: Tensor, loss: FeatureLossName = "mse", *, p: float = 2.0, mask: Tensor | None = None
) -> Tensor:
    r"""Feature-matching loss chosen by name.

    .. math::

        \mathcal{L} = \mathcal{L}_{\text{loss}}(s, t)

    where ``loss`` picks :func:`mse_feature_loss` (``"mse"``), :func:`l1_feature_loss` (``"l1"``),
    :func:`cosine_feature_loss` (``"cosine"``), :func:`kl_feature_loss` (``"kl"``) or
    :func:`attention_transfer_loss` (``"attention"``, the only one that uses ``p``).

    With a ``mask`` over the leading (position) dimensions, e.g. ``(B, L)`` for token features ``(B, L, D)``, only
    the positions where it is ``True`` count: the loss is the chosen loss of ``student[mask]`` and ``teacher[mask]``
    (each ``(n, D)``), so padding tokens neither add to nor dilute the mean.

    Args:
        student: Student features; see the chosen loss for the shape it needs.
        teacher: Teacher features.
        loss: Name of the loss.
        p: Exponent of the attention maps, ``> 0`` (validated always, used only by ``"attention"``).
        mask: Optional bool tensor of the leading dimensions of ``student`` (all but the last) marking the
            positions that count. Not for ``"attention"``, whose maps are over a CNN's spatial positions.

    Returns:
        A scalar tensor, float32 (float64 if an input is float64); zero (attached) when no position counts.

    Raises:
        ValueError: If ``loss`` is unknown, ``p`` is not finite and positive, the mask is not a bool tensor of the
            features' leading shape, a mask is given with ``"attention"``, or the chosen loss rejects the inputs.

    Example::

        >>> s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> t = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
        >>> [round(feature_loss(s, t, name).item(), 4) for name in ("mse", "l1", "cosine", "kl")]
        [3.25, 1.25, 0.3764, 0.3516]
        >>> feature_loss(s, t, "mse", mask=torch.tensor([True, False])).item()  # only the first row counts
        2.0
    """
    name = check_feature_loss(loss)
    p = check_power(p)
    if mask is not None:
        if name == "attention":
            raise ValueError(
                "loss='attention' compares spatial attention maps of channel-first CNN features (N, C, *spatial); it "
                "has no meaning for masked token features (B, L, D). HINT: use loss='mse' or 'cosine' for token "
                "features."
            )
        student, teacher = _masked_pair(student, teacher, mask)
    if name == "attention":
        return attention_transfer_loss(student, teacher, p)
    pairwise = {"mse": mse_feature_loss, "l1": l1_feature_loss, "cosine": cosine_feature_loss, "kl": kl_feature_loss}
    return pairwise[name](student, teacher)
