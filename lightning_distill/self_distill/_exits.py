"""Setting up a backbone's exits: heads sized from one dry forward, and the hooks that capture the exits' outputs.

:func:`plan_exits` runs the backbone once (eval mode, no gradient) with a global forward hook, checks that every
exit runs once, in order, and returns a batch-first tensor, finds the deepest feature, learns which captured outputs
the backbone changes in place afterwards, and builds one :class:`~lightning_distill.self_distill.ExitHead` per exit.
:func:`exit_capture` and :func:`learn_copies` build and teach the :class:`~lightning_distill.features.FeatureCapture`
that :class:`~lightning_distill.SelfDistillModule` reads the exits' outputs from in every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_distill._batches import call_with_inputs, extract_logits
from lightning_distill._layers import find_layer
from lightning_distill.features._capture import FeatureCapture, tensor_version
from lightning_distill.self_distill._heads import ExitHead

_Call = tuple[nn.Module, Any, Any]  # a recorded forward: (module, positional inputs, output)


@dataclass(frozen=True)
class ExitPlan:
    """What the dry forward found: the heads, the deepest feature's capture key, and the captures to copy.

    ``copied`` is ``None`` when it could not be learned (the dry forward ran on inference tensors).
    """

    heads: nn.ModuleList
    hint_key: str | None
    copied: frozenset[str] | None


def plan_exits(
    backbone: nn.Module,
    exits: Sequence[str],
    inputs: Any,
    *,
    num_classes: int,
    feature_layer: str | None,
    feature_weight: float,
) -> ExitPlan:
    """Size one exit head per exit from a dry forward of ``backbone`` on ``inputs`` (already on its device).

    The forward runs in eval mode without gradient (train/eval modes are restored). The deepest feature is
    ``feature_layer``'s output, else the input of the layer that returns the logits (the classifier).

    Raises:
        ValueError: If the logits are not ``(B, num_classes)``, an exit does not run, runs out of order, or returns
            something else than a batch-first tensor, or the deepest feature cannot be found while
            ``feature_weight > 0``.
    """
    order: list[str] = []
    names = {module: name for name, module in backbone.named_modules()}
    exit_modules = {find_layer(backbone, name, role="backbone"): name for name in exits}
    calls: list[_Call] = []
    versions: list[tuple[int | None, int | None]] = []  # of each call's output and first input, as it returned

    def record(module: nn.Module, args: Any, output: Any) -> None:
        calls.append((module, args, output))
        versions.append((_version(output), _version(args[0]) if args else None))
        if module in exit_modules:
            order.append(exit_modules[module])

    handle = nn.modules.module.register_module_forward_hook(record)
    modes = {module: module.training for module in backbone.modules()}
    backbone.eval()
    try:
        with torch.inference_mode(False), torch.no_grad():  # tensors with version counters
            logits = extract_logits(call_with_inputs(backbone, inputs), role="backbone")
    finally:
        handle.remove()
        for module, training in modes.items():
            module.training = training
    if logits.ndim != 2:
        raise ValueError(
            f"SelfDistillModule's exits give one prediction per sample, but the backbone returns logits of shape "
            f"{tuple(logits.shape)} (per-token logits: a language model or token classifier). HINT: self-"
            "distillation here is for (B, C) classifiers (CNNs, ViTs, sequence classifiers)."
        )
    if logits.shape[-1] != num_classes:
        raise ValueError(
            f"The backbone returns {logits.shape[-1]} logits per sample but `num_classes` is {num_classes}."
        )
    if order != list(exits):
        raise ValueError(
            f"The exits must each run once, in forward order; the backbone ran them as {order}, expected "
            f"{list(exits)}. HINT: list the exits shallow to deep, naming layers every forward goes through."
        )
    outputs = {exit_modules[m]: out for m, _, out in calls if m in exit_modules}
    for name, out in outputs.items():
        if not isinstance(out, Tensor) or out.ndim < 2 or out.shape[0] != logits.shape[0]:
            raise ValueError(
                f"Exit {name!r} must output a batch-first tensor, got "
                f"{type(out).__name__}{'' if not isinstance(out, Tensor) else tuple(out.shape)}."
            )
    hint_call, hint_key = _find_hint(backbone, calls, names, logits, feature_layer, feature_weight)
    parts = {exit_modules[m]: (i, 0) for i, (m, _, _) in enumerate(calls) if m in exit_modules}
    hint = None
    if hint_call is not None and hint_key is not None:
        parts[hint_key] = (hint_call, int(hint_key.endswith(":input")))
        hint = _part(calls[hint_call], parts[hint_key][1])
    changed = {key: _changed(calls[i], versions[i], part) for key, (i, part) in parts.items()}
    copied = None if None in changed.values() else frozenset(k for k, yes in changed.items() if yes)
    hint_shape = None if hint is None else tuple(hint.shape[1:])
    heads = nn.ModuleList()
    for name in exits:
        tokens = _tokens(backbone, outputs[name])
        heads.append(
            ExitHead(
                tuple(outputs[name].shape[1:]),
                width=_width(outputs[name], tokens) if hint_shape is None else hint_shape[0],
                num_classes=num_classes,
                hint_shape=hint_shape,
                tokens=tokens,
            )
        )
    return ExitPlan(heads.to(logits.device), hint_key, copied)


def exit_capture(exits: Sequence[str], hint_key: str | None, copied: frozenset[str] | None) -> FeatureCapture:
    """The forward hooks on the exits (and the deepest feature), not yet attached; ``copied`` captures are copies."""
    capture = FeatureCapture(role="backbone")
    for name in exits:
        capture.add(name)
    if hint_key is not None:
        layer, _, kind = hint_key.partition(":")
        capture.add_input(layer) if kind == "input" else capture.add(layer)
    capture.add_copies(copied or ())
    return capture


def learn_copies(backbone: nn.Module, capture: FeatureCapture, inputs: Any) -> frozenset[str]:
    """Which of ``capture``'s outputs the backbone changes in place, from one forward in eval mode without gradient.

    For heads restored without that knowledge (a checkpoint written before it was stored). ``capture`` must be
    attached to ``backbone``; it is left in copy mode for those outputs.
    """
    modes = {module: module.training for module in backbone.modules()}
    backbone.eval()
    try:
        with torch.inference_mode(False), torch.no_grad(), capture.recording():
            call_with_inputs(backbone, inputs)
        capture.take(learn=True)
    finally:
        for module, training in modes.items():
            module.training = training
    return capture.copied


def _find_hint(
    backbone: nn.Module,
    calls: list[_Call],
    names: dict[nn.Module, str],
    logits: Tensor,
    feature_layer: str | None,
    feature_weight: float,
) -> tuple[int | None, str | None]:
    """The deepest feature's call index and capture key: ``feature_layer``'s output, else the classifier's input."""
    if feature_layer is not None:
        layer = find_layer(backbone, feature_layer, role="backbone")
        found = [i for i, (m, _, _) in enumerate(calls) if m is layer]
        if not found or not isinstance(calls[found[-1]][2], Tensor):
            raise ValueError(f"`feature_layer` {feature_layer!r} did not return a tensor in the forward.")
        return found[-1], feature_layer
    for i, (module, args, out) in enumerate(calls):  # hooks fire as modules finish: the logits' innermost producer
        if out is logits and args and isinstance(args[0], Tensor) and names.get(module):
            return i, f"{names[module]}:input"
    if feature_weight > 0:
        raise ValueError(
            "Cannot find the deepest feature: no layer of the backbone returns its logits as they are. HINT: pass "
            "`feature_layer=` (the layer whose output feeds the classifier), or `feature_weight=0.0`."
        )
    return None, None


def _tokens(backbone: nn.Module, feature: Tensor) -> bool:
    """Whether an exit's output is token features ``(B, L, D)`` rather than a channel-first map.

    Token features are a Hugging Face backbone's hidden states: rank 3, the last dimension ``config.hidden_size``.
    """
    hidden_size = getattr(getattr(backbone, "config", None), "hidden_size", None)
    return feature.ndim == 3 and isinstance(hidden_size, int) and feature.shape[-1] == hidden_size


def _version(value: Any) -> int | None:
    return tensor_version(value) if isinstance(value, Tensor) else None


def _part(call: _Call, part: int) -> Tensor:
    """A recorded call's output (``part`` 0) or first input (1)."""
    return cast(Tensor, call[2] if part == 0 else call[1][0])


def _changed(call: _Call, versions: tuple[int | None, int | None], part: int) -> bool | None:
    """Whether that part changed in place since the layer returned; ``None`` if unknown (inference tensors)."""
    before, after = versions[part], _version(_part(call, part))
    return None if before is None or after is None else after != before


def _width(feature: Tensor, tokens: bool) -> int:
    """The width of an exit feature: its last dimension for tokens, its channels (dimension 1) otherwise."""
    return feature.shape[-1] if tokens else feature.shape[1]
