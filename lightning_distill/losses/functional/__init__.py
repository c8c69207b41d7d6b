r"""Knowledge-distillation losses as pure tensor functions.

Conventions shared by every function here:

- The class dimension is the **last** one; every leading dimension is a position, so ``(B, C)`` image logits and
  ``(B, L, V)`` token logits go through the same code.
- ``mask`` is a bool tensor over the leading dimensions; ``True`` marks the positions that count. Positions whose
  ``target`` equals ``ignore_index`` are removed from **both** terms of :func:`distillation_loss`.
- Logits are upcast to float32 (float64 stays float64) before any softmax, and every divergence is computed from
  log-probabilities (``log_softmax``, ``F.kl_div(..., log_target=True)``, a log-space mixture for ``"js"``), so
  bf16/fp16 logits and zero probabilities give neither NaN nor a negative divergence.
- Masked classes: a ``-inf`` logit (a padded vocabulary entry, a constrained-decoding mask) is probability zero,
  with the convention of information theory :math:`0 \log 0 = 0`. Every divergence works on the log-probabilities
  floored at :math:`L = -10^4`, :math:`\ell_c = \max(\log p_c, L)` (so a class more than :math:`10^4 T` below the
  row's largest logit counts as masked too), and for a term
  :math:`p_c (\log p_c - \log q_c)` of an expectation over :math:`p`:

  - :math:`p_c = 0` (masked by :math:`p`'s model, masked or not by the other): exactly 0, with zero gradients;
  - :math:`p_c > 0 = q_c` (masked by the other model only; the true divergence is infinite):
    :math:`p_c (\log p_c - L)`, large (at most :math:`10^4` nats a position, times :math:`T^2`) but finite, with
    finite gradients.

  So with both models masking the same classes every divergence equals the one over the other classes; forward KL
  and ``"soft_ce"`` ignore classes the teacher masks, ``"reverse_kl"`` those the student masks, ``"js"`` is always
  finite, ``"dkd"`` applies the rule to its target/non-target split and the top-k loss to its tail bucket (a bucket
  of zero-probability classes is one). ``"mse"`` compares the logits floored at :math:`L` and leaves classes masked
  on both sides out of its mean. A row that is all ``-inf``, or any NaN, is a fault, not a mask: the loss is NaN
  (and the training loss's finiteness check names it).
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
