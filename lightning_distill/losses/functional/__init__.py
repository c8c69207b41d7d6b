r"""Knowledge-distillation losses as pure tensor functions.

Conventions shared by every function here:

- The class dimension is the **last** one; every leading dimension is a position, so ``(B, C)`` image logits and
  ``(B, L, V)`` token logits go through the same code.
- ``mask`` is a bool tensor over the leading dimensions; ``True`` marks the positions that count. Positions whose
  ``target`` equals ``ignore_index`` are removed from **both** terms of :func:`distillation_loss`.
- Logits are upcast to float32 (float64 stays float64) before any softmax, and every divergence is computed from
  log-probabilities (``log_softmax``, ``F.kl_div(..., log_target=True)``, a log-space mixture for ``"js"``), so
  bf16/fp16 logits and zero probabilities give neither NaN nor a negative divergence. ``-inf`` logits (a masked
  vocabulary entry) count as probability zero.
- ``divergence="dkd"`` (decoupled KD, :func:`dkd_loss`) splits each distribution at the target class, so it needs
  ``target`` (and at least two classes); its two parts come back as ``tckd_loss`` and ``nckd_loss`` from
  :func:`distillation_loss_terms`.
- Reduction: sum over classes, mean over counted positions (``"batchmean"``). With no counted position the result
  is a zero that is still attached to the autograd graph, so ``backward()`` gives zero gradients, not NaN.
- Gradients flow into both logits tensors; pass a detached teacher (the callback does).

The weight ``alpha`` multiplies the **distillation** term, as in MNN's ``_DistillLoss``, Intel Neural Compressor's
``KnowledgeDistillationLoss`` (``loss_weights=[1 - alpha, alpha]``) and NVIDIA ModelOpt. torchdistill's
``KDLoss`` uses the opposite convention (its ``alpha`` weights the hard-label term), so torchdistill's ``alpha=a``
is ``alpha=1 - a`` here.
"""

from lightning_distill.losses.functional._common import (
    Divergence,
    check_alpha,
    check_chunk_size,
    check_divergence,
    check_js_beta,
    check_temperature,
    check_weight,
)
from lightning_distill.losses.functional.dkd import dkd_loss
from lightning_distill.losses.functional.features import (
    FeatureLossName,
    attention_map,
    attention_transfer_loss,
    check_feature_loss,
    cosine_feature_loss,
    feature_loss,
    kl_feature_loss,
    l1_feature_loss,
    mse_feature_loss,
)
from lightning_distill.losses.functional.logits import (
    cross_entropy,
    distillation_loss,
    distillation_loss_terms,
    kd_loss,
    weigh_terms,
)

__all__ = [
    "Divergence",
    "FeatureLossName",
    "attention_map",
    "attention_transfer_loss",
    "check_alpha",
    "check_chunk_size",
    "check_divergence",
    "check_feature_loss",
    "check_js_beta",
    "check_temperature",
    "check_weight",
    "cosine_feature_loss",
    "cross_entropy",
    "distillation_loss",
    "distillation_loss_terms",
    "dkd_loss",
    "feature_loss",
    "kd_loss",
    "kl_feature_loss",
    "l1_feature_loss",
    "mse_feature_loss",
    "weigh_terms",
]
