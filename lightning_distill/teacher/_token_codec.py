r"""How a token cache stores a teacher's distribution at one position: 8-bit top-k log-probabilities, and its error.

A position's distribution :math:`p = \mathrm{softmax}(z / T)` is kept as its k most likely classes :math:`K`
(indices in the narrowest unsigned type the vocabulary needs), their log-probabilities :math:`v_1 \ge \dots \ge v_k`
on 8 bits, and the log of the tail mass :math:`m = 1 - \sum_{i \in K} p_i` in float16:

- ``top`` is :math:`v_1` in float16, rounded up; ``step`` is :math:`(\mathrm{top} - v_\mathrm{low}) / 254` in
  float16, rounded up, :math:`v_\mathrm{low}` the smallest :math:`v_i` within :math:`R = 40` nats of the top (so a
  masked class among the k does not coarsen the others);
- :math:`q_i = \mathrm{round}((\mathrm{top} - v_i) / \mathrm{step}) \in [0, 254]`, and :math:`q_i = 255` for a class
  below :math:`\mathrm{top} - R` (its probability is under :math:`e^{-40} p_1`: stored as exactly zero);
- decoded, :math:`\hat v_i = \mathrm{top} - q_i \,\mathrm{step}` and :math:`\log \hat m` are renormalized together
  so that the :math:`k + 1` buckets sum to 1.

**Error bound.** Before renormalization every stored bucket :math:`j` is within :math:`\delta_j` of the truth in
log space,

.. math::

    |\hat v_i - v_i| \le \delta_i = \mathrm{step} / 2, \qquad
    |\log \hat m - \log m| \le \delta_{\mathrm{tail}} = 2^{-11} |\log m|

(``step`` is at most :math:`(v_1 - v_\mathrm{low}) / 254` plus float16 rounding, and at most :math:`40 / 254`; a
zero tail is stored exactly; on top of these comes the float32 rounding of the log-probabilities themselves, about
:math:`2^{-24} (1 + |\log p_j|)` a bucket, which matters only where ``step`` is 0; a tail above 1/2 is taken as
:math:`1 - \sum_{i \in K} p_i`, one below it as the sum of its classes, each to a few float32 ulps). Renormalizing
divides by :math:`Z = \sum_j p_j e^{\epsilon_j}`, :math:`|\epsilon_j| \le \delta_j`, so
:math:`|\log Z| \le \zeta = \log \sum_j p_j e^{\delta_j}` (a mass-weighted error: a negligible tail stored
coarsely hardly counts) and the decoded buckets satisfy :math:`|\log \hat p_j - \log p_j| \le \delta_j + \zeta`. For a
student :math:`s`, the top-k KL of :mod:`~lightning_distill.losses.functional.topk` then moves by at most

.. math::

    |\mathrm{KL}_k(\hat p \,\|\, s) - \mathrm{KL}_k(p \,\|\, s)|
    \le \sum_j |\hat p_j - p_j| \Big|\log \frac{p_j}{s_j}\Big| + \sum_j \hat p_j \Big|\log \frac{\hat p_j}{p_j}\Big|
    \le \sum_j p_j \big(e^{\delta_j + \zeta} - 1\big) \Big|\log \frac{p_j}{s_j}\Big|
    + \sum_j \hat p_j (\delta_j + \zeta),

the sums over the k classes and the tail bucket (a class stored as zero adds :math:`p_i |\log(p_i / s_i)|`, with
:math:`p_i < e^{-40} p_1`). On top of this comes the top-k truncation itself, :math:`0 \le \mathrm{KL} -
\mathrm{KL}_k \le m \log(1 / \min_{j \notin K} \hat s_j)` (see :mod:`~lightning_distill.losses.functional.topk`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from lightning_distill.losses.functional._common import LOG_ZERO, check_temperature

RANGE = 40.0
"""Nats below the top log-probability that are stored; classes further down are stored as probability zero."""
_ZERO = 255  # the code of a class stored as probability zero
_LEVELS = 254  # codes 0..254 span [top - step * 254, top]


def index_dtype(vocab: int) -> np.dtype:
    """The narrowest unsigned integer type that holds every class index of a vocabulary.

    Example::

        >>> index_dtype(256), index_dtype(50257), index_dtype(65537)
        (dtype('uint8'), dtype('uint16'), dtype('uint32'))
    """
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"A vocabulary of {vocab} classes does not fit 32-bit indices.")


def token_dtype(top_k: int, vocab: int) -> np.dtype:
    """The packed record of one stored token: position, k indices, k codes, top, step, log tail (58 bytes at k=16)."""
    return np.dtype(
        [
            ("position", "<u4"),
            ("indices", index_dtype(vocab).newbyteorder("<"), (top_k,)),
            ("codes", "u1", (top_k,)),
            ("top", "<f2"),
            ("step", "<f2"),
            ("log_tail", "<f2"),
        ]
    )


def _round_up_half(x: Tensor) -> Tensor:
    """``x`` (float32) as float16, rounded towards +inf (so the float16 value is never below ``x``)."""
    half = x.half()
    return torch.where(half.float() < x, torch.nextafter(half, torch.full_like(half, float("inf"))), half)


def encode_tokens(logits: Tensor, top_k: int, temperature: float) -> dict[str, np.ndarray]:
    """Encode per-token logits ``(N, V)`` at ``temperature`` as the record fields (without ``position``).

    The softmax, top-k and tail run on the logits' device; only the ``(N, k)`` results are copied to the CPU, where
    the 8-bit coding happens.

    Raises:
        ValueError: If ``top_k`` is not in ``[1, V]``.
        FloatingPointError: If a row holds NaN or ``+inf``, or is all ``-inf`` (nothing is stored then).
    """
    check_temperature(temperature)
    vocab = logits.shape[-1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab:
        raise ValueError(f"`top_k` must be an int in [1, {vocab}] (the vocabulary), got {top_k!r}.")
    z = logits.detach().float()
    bad = ~z.amax(-1).isfinite()  # one pass: the maximum is NaN with a NaN, +inf with a +inf, -inf when all are -inf
    if bool(bad.any()):
        raise FloatingPointError(
            f"{int(bad.sum())} of {z.shape[0]} token rows of the teacher's logits hold NaN or +inf or are all -inf, "
            "so they cannot be cached. HINT: check the teacher, its checkpoint and its precision."
        )
    log_p = torch.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)
    values, indices = log_p.topk(top_k, dim=-1)
    if top_k < vocab:
        # a small tail is summed directly (exactly 0 when its classes are masked); a large one, where that float32 sum
        # over V - k classes would err by ~log2(V) ulps, is 1 - (the top-k mass)
        head = torch.logsumexp(values, dim=-1)
        summed = torch.logsumexp(log_p.scatter_(-1, indices, float("-inf")), dim=-1)  # log_p is ours: in place
        log_tail = torch.where(head < -math.log(2.0), torch.log1p(-head.exp()), summed)
    else:
        log_tail = values.new_full(values.shape[:-1], float("-inf"))
    # the (N, k) rest runs on the CPU, where the results go: small, and float16 rounding the same on every device
    values, indices, log_tail = values.clamp(min=LOG_ZERO).cpu(), indices.cpu(), log_tail.cpu()
    top = _round_up_half(values[:, 0])
    kept = values >= top.float().unsqueeze(-1) - RANGE  # the classes stored with a value (the top always)
    low = torch.where(kept, values, top.float().unsqueeze(-1)).amin(-1)
    step = _round_up_half((top.float() - low) / _LEVELS)
    gaps = top.float().unsqueeze(-1) - values
    safe = torch.where(step > 0, step, torch.ones_like(step)).float().unsqueeze(-1)
    codes = torch.round(gaps / safe).clamp(0, _LEVELS)
    codes = torch.where(gaps > RANGE, torch.full_like(codes, _ZERO), codes)
    return {
        "indices": indices.numpy(),
        "codes": codes.to(torch.uint8).numpy(),
        "top": top.numpy(),
        "step": step.numpy(),
        "log_tail": log_tail.clamp(min=LOG_ZERO).half().numpy(),
    }


def decode_tokens(records: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``(log-probabilities (N, k), indices (N, k), tail mass (N,))`` of stored records, renormalized, on ``device``.

    Classes stored as zero decode to :data:`~lightning_distill.losses.functional._common.LOG_ZERO`. Computed in
    NumPy (a few microseconds at batch sizes, where each torch call costs more), then moved.
    """
    codes = records["codes"]
    top = records["top"].astype(np.float32)[:, None]
    log_tail = records["log_tail"].astype(np.float32)
    values = top - codes.astype(np.float32) * records["step"].astype(np.float32)[:, None]
    values[codes == _ZERO] = LOG_ZERO
    # log Z of the k + 1 buckets, shifted by the largest of them (the top, or the tail when it is larger)
    shift = np.maximum(values[:, 0], log_tail)
    with np.errstate(under="ignore"):
        z = np.exp(values - shift[:, None]).sum(-1) + np.exp(log_tail - shift)
        log_z = shift + np.log(z)
        values = np.maximum(values - log_z[:, None], LOG_ZERO)
        values[codes == _ZERO] = LOG_ZERO  # exactly the floor (LOG_ZERO - log Z is not, when Z < 1)
        tail = np.exp(log_tail - log_z)
    indices = records["indices"].astype(np.int64)
    return (
        torch.from_numpy(values).to(device),
        torch.from_numpy(indices).to(device),
        torch.from_numpy(tail).to(device),
    )


def error_radius(records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""``(delta of the k classes (N,), delta of the tail (N,))`` of stored records, float64 (module docstring)."""
    step = records["step"].astype(np.float64)
    log_tail = records["log_tail"].astype(np.float64)
    return step / 2, np.where(log_tail <= LOG_ZERO, 0.0, np.abs(log_tail) * 2.0**-11)
