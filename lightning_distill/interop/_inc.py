"""Intel Neural Compressor's self-distillation configuration, read into ``SelfDistillModule``'s arguments.

See :meth:`SelfDistillModule.from_inc_config <lightning_distill.SelfDistillModule.from_inc_config>`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def inc_self_distill_arguments(
    layer_mappings: Sequence[Sequence[Sequence[str]]],
    loss_types: Sequence[str],
    loss_weights: Sequence[float],
    add_origin_loss: bool = True,
) -> dict[str, Any]:
    """The ``SelfDistillModule`` arguments of INC's ``SelfKnowledgeDistillationLossConfig``.

    Returns ``exits``, ``feature_weight``, ``kd_weight``, ``task_weight``, ``feature_layer`` and ``exit_weights``;
    the rules are documented on ``SelfDistillModule.from_inc_config``.

    Raises:
        ValueError: For groups and ``loss_types`` / ``loss_weights`` of different lengths, an unknown loss type, or
            several deepest layers in the ``"L2"`` group.

    Example::

        >>> inc_self_distill_arguments([[["a", "z"], ["b", "z"]]], ["L2"], [0.5])["exits"]
        ['a', 'b']
    """
    if not len(layer_mappings) == len(loss_types) == len(loss_weights):
        raise ValueError(
            f"`layer_mappings` ({len(layer_mappings)} groups), `loss_types` ({len(loss_types)}) and "
            f"`loss_weights` ({len(loss_weights)}) must have the same length."
        )
    exits: list[str] = []
    feature_layers: set[str] = set()
    feature_weight, kd_weight = 0.0, 0.0
    for group, kind, weight in zip(layer_mappings, loss_types, loss_weights, strict=True):
        if kind not in ("L2", "KL", "CE"):
            raise ValueError(f"INC loss type must be 'L2', 'KL' or 'CE', got {kind!r}.")
        for shallow, deepest in group:
            exits.extend([shallow] if shallow not in exits else [])
            if kind == "L2":
                feature_layers.add(deepest)
        if kind == "L2":
            feature_weight += weight
        else:
            kd_weight += weight
    if len(feature_layers) > 1:
        raise ValueError(f"The 'L2' group names several deepest layers {sorted(feature_layers)}; expected one.")
    return {
        "exits": exits,
        "feature_weight": feature_weight,
        "kd_weight": kd_weight,
        "task_weight": 0.0,
        "feature_layer": next(iter(feature_layers), None),
        "exit_weights": [1.0] * len(exits) + [1.0 if add_origin_loss else 0.0],
    }
