r"""Several teachers as one: the KD target is the weighted mixture of their distributions.

For teachers :math:`k` with weights :math:`w_k` (normalized to sum to 1) and the module's temperature :math:`T`,

.. math::

    p_{mix} = \sum_k w_k \, \mathrm{softmax}(z_k / T), \qquad z_{mix} = T \log p_{mix},

so that :math:`\mathrm{softmax}(z_{mix} / T) = p_{mix}` exactly: every divergence on probabilities (``"kl"``,
``"reverse_kl"``, ``"soft_ce"``, ``"js"``, ``"dkd"``) then distills toward the mixture at that temperature. ``"mse"``
compares raw logits, for which a mixture has no meaning; it is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_distill._batches import call_with_inputs, extract_logits


class TeacherMixture(nn.Module):
    """Runs every teacher on the same inputs and returns the logits of their weighted mixture at ``temperature``.

    The teachers are direct submodules named by their keys, so a feature map names a teacher's layer
    ``"<key>.<layer>"`` (``"a.layer2"``). The callback sets :attr:`temperature` to the temperature the module
    requests before every run.

    Args:
        teachers: Name -> teacher model (at least two). Each returns logits (a tensor, ``.logits`` or
            ``["logits"]``) over the same classes.
        weights: Name -> weight (non-negative, not all zero; normalized to sum to 1). Default: equal weights.

    Raises:
        TypeError: For a teacher that is not an ``nn.Module``.
        ValueError: For fewer than two teachers, a name that is not a plain identifier or is taken by a mixture
            attribute (``"weights"``, ``"forward"``, ...), weights naming other teachers, or a negative or all-zero
            weight.

    Example::

        >>> mix = TeacherMixture({"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)}, weights={"a": 3.0, "b": 1.0})
        >>> mix.weights
        {'a': 0.75, 'b': 0.25}
        >>> a, b, x = mix.teachers["a"], mix.teachers["b"], torch.randn(2, 4)
        >>> expected = 0.75 * a(x).softmax(-1) + 0.25 * b(x).softmax(-1)
        >>> torch.allclose(mix(x).softmax(-1), expected)  # at temperature 1 the output's softmax is the mixture
        True
    """

    def __init__(self, teachers: Mapping[str, nn.Module], weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if not isinstance(teachers, Mapping) or len(teachers) < 2:
            raise ValueError(
                f"`teachers` must map at least two names to models, got {teachers!r}. HINT: for one teacher pass "
                "`DistillationCallback(teacher)`."
            )
        self.names = tuple(teachers)
        self.weights = _normalized(weights, list(teachers))
        self.temperature = 1.0
        for name, teacher in teachers.items():  # after the attributes, so that no teacher can take their names
            if not isinstance(teacher, nn.Module):
                raise TypeError(f"Teacher {name!r} must be a torch.nn.Module, got {type(teacher).__name__}.")
            if not isinstance(name, str) or not name.isidentifier() or hasattr(self, name):
                raise ValueError(
                    f"Teacher name {name!r} must be a plain identifier that is not an attribute of TeacherMixture "
                    "(its layers are named '<name>.<layer>'). HINT: use names such as 'a', 'big', 'bert_large'."
                )
            self.add_module(name, teacher)

    @property
    def teachers(self) -> dict[str, nn.Module]:
        """The teachers by name, in the order given."""
        return {name: self.get_submodule(name) for name in self.names}

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """``T * log(sum_k w_k softmax(z_k / T))`` over the teachers' logits, in float32 (float64 stays)."""
        inputs: Any = kwargs if kwargs else (args[0] if len(args) == 1 else args)
        logits = {
            name: extract_logits(call_with_inputs(t, inputs), role=f"teacher {name!r}")
            for name, t in self.teachers.items()
        }
        shapes = {name: tuple(z.shape) for name, z in logits.items()}
        if len(set(shapes.values())) > 1:
            raise ValueError(
                f"The teachers' logits differ in shape {shapes}: a mixture needs the same classes (the same "
                "vocabulary) from every teacher; nothing is truncated."
            )
        temperature = self.temperature
        parts = [
            torch.log_softmax((z if z.dtype == torch.float64 else z.float()) / temperature, -1) for z in logits.values()
        ]
        log_w = parts[0].new_tensor([math.log(w) if w > 0 else -math.inf for w in self.weights.values()])
        mixed = torch.logsumexp(torch.stack(parts) + log_w.view(-1, *([1] * parts[0].ndim)), dim=0)
        return temperature * mixed.clamp(min=torch.finfo(mixed.dtype).min)


def _normalized(weights: Mapping[str, float] | None, names: list[str]) -> dict[str, float]:
    if weights is None:
        return {name: 1.0 / len(names) for name in names}
    if not isinstance(weights, Mapping) or set(weights) != set(names):
        raise ValueError(f"`weights` must give one weight per teacher {names}, got {weights!r}.")
    bad = {k: v for k, v in weights.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0}
    total = sum(float(v) for v in weights.values()) if not bad else 0.0
    if bad or not math.isfinite(total) or total <= 0:
        raise ValueError(f"`weights` must be finite, non-negative and not all zero, got {dict(weights)!r}.")
    return {name: float(weights[name]) / total for name in names}
