"""Early-exit inference for :class:`~lightning_distill.SelfDistillModule`: stop confident samples at shallow exits.

The backbone is run **once**, as it is; a forward hook on each exit layer runs that exit's head on the samples still
going, records the predictions of those whose top softmax probability reaches the threshold, and returns the exit
layer's output **without them**, so every deeper layer only computes for the samples that continue. This needs
every layer after an exit to depend on that exit's output only, per sample (true of plain, staged and residual CNNs
with exits at stage boundaries; not of a U-Net skip that crosses an exit).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from lightning_distill._batches import call_with_inputs, extract_logits
from lightning_distill._layers import find_layer

if TYPE_CHECKING:
    from lightning_distill.self_distill._heads import ExitHead
    from lightning_distill.self_distill._module import SelfDistillModule


class _AllExited(Exception):
    """Raised inside the backbone's forward once every sample has stopped."""


class _ExitReached(Exception):
    """Raised by an exported model's exit layer, carrying its output."""

    def __init__(self, output: Tensor) -> None:
        super().__init__()
        self.output = output


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise ValueError(
            f"`threshold` must be a number, got {threshold!r}. HINT: 0 stops every sample at the first exit, a value "
            "above 1 runs the full network."
        )
    return float(threshold)


@torch.no_grad()
def run_early_exit(module: SelfDistillModule, inputs: Any, threshold: float) -> tuple[Tensor, Tensor]:
    """Predict every sample at the first exit whose top softmax probability is ``>= threshold``.

    Args:
        module: A self-distillation module with built heads; it is run in eval mode (its mode is restored).
        inputs: The inputs of one batch (a tensor, or a mapping passed as keyword arguments).
        threshold: Confidence needed to stop. ``0`` stops every sample at the first exit; above 1, none stops early.

    Returns:
        ``(predictions, exit_index)``, both ``(N,)``; exit ``len(module.exits)`` is the backbone's own output.

    Raises:
        ValueError: For a threshold that is not a number.
        RuntimeError: If the backbone fails on the shrunken batch (a layer after an exit mixes in tensors from
            before it), with a hint.
    """
    threshold = _check_threshold(threshold)
    if len(module.heads) != len(module.exits):
        raise RuntimeError("The module has no exit heads yet. HINT: build them first (`build_heads` or a fit).")
    state: dict[str, Tensor] = {}

    def make_hook(index: int, head: ExitHead) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Tensor) -> Tensor:
            if "alive" not in state:
                state["alive"] = torch.arange(output.shape[0], device=output.device)
                state["preds"] = torch.full_like(state["alive"], -1)
                state["exits"] = torch.full_like(state["alive"], len(module.exits))
            alive = state["alive"]
            confidence, prediction = head(output)[1].float().softmax(-1).max(-1)
            stop = confidence >= threshold
            state["preds"][alive[stop]] = prediction[stop]
            state["exits"][alive[stop]] = index
            state["alive"] = alive[~stop]
            if state["alive"].numel() == 0:
                raise _AllExited
            return output if not bool(stop.any()) else output[~stop]

        return hook

    training = module.training
    if training:  # walking every submodule costs ~0.1 ms: only when needed
        module.eval()
    handles = [
        layer.register_forward_hook(make_hook(i, head))
        for i, (layer, head) in enumerate(zip(module.exit_layers.values(), module.exit_heads, strict=True))
    ]
    try:
        output = call_with_inputs(module.backbone, move_data_to_device(inputs, module.device))
        state["preds"][state["alive"]] = extract_logits(output, role="backbone").argmax(-1)
    except _AllExited:
        pass
    except RuntimeError as err:
        if "alive" in state and state["alive"].numel() < state["preds"].numel():
            raise RuntimeError(
                f"The backbone failed after some samples stopped at an exit ({err}). Early exit runs the layers after "
                "an exit on the remaining samples only, so they must depend on that exit's output alone. HINT: put "
                "exits at stage boundaries that every later layer goes through."
            ) from err
        raise
    finally:
        for handle in handles:
            handle.remove()
        if training:
            module.train()
    return state["preds"], state["exits"]


@dataclass(frozen=True)
class EarlyExitReport:
    """Early-exit inference at one threshold, measured on a whole dataloader.

    Attributes:
        threshold: The confidence threshold.
        accuracy: Top-1 accuracy of the early-exit predictions.
        exit_fractions: Fraction of samples that stopped at each exit (the last is the backbone's output).
        mean_exit: Mean exit index.
        latency_ms: Best-of-``repeats`` wall time per sample of early-exit inference, in milliseconds.
        full_latency_ms: The same for the plain backbone forward (no hooks, every layer).
        speedup: ``full_latency_ms / latency_ms``.
    """

    threshold: float
    accuracy: float
    exit_fractions: tuple[float, ...]
    mean_exit: float
    latency_ms: float
    full_latency_ms: float
    speedup: float


def _best_time(run: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def sweep_thresholds(
    module: SelfDistillModule, dataloader: Any, thresholds: Sequence[float], repeats: int = 3
) -> list[EarlyExitReport]:
    """Measure accuracy, exit use and per-sample latency of early exit for each threshold.

    Every batch of ``dataloader`` is moved to the module's device once; each timing is the best of ``repeats``
    passes over all batches (noise on a shared machine only adds time), against the plain backbone forward timed
    the same way right before it, for every threshold.

    Raises:
        ValueError: For ``repeats < 1``, no thresholds, or a dataloader without labels.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"`repeats` must be a positive int, got {repeats!r}.")
    if not thresholds:
        raise ValueError("`thresholds` must hold at least one threshold.")
    batches: list[tuple[Any, Tensor]] = []
    for batch in dataloader:
        inputs, target = module.split_batch(move_data_to_device(batch, module.device))
        if target is None:
            raise ValueError("sweep_thresholds needs labelled batches (inputs, target) to measure accuracy.")
        batches.append((inputs, target))
    total = sum(int(target.shape[0]) for _, target in batches)
    training = module.training
    module.eval()
    try:
        reports = []
        for threshold in thresholds:
            # the plain forward is timed next to each threshold, so a burst of load skews one row, not all
            full = _best_time(lambda: [call_with_inputs(module.backbone, x) for x, _ in batches], repeats)
            full_ms = full / total * 1e3
            correct, exit_parts = 0, []
            for x, y in batches:
                preds, exit_idx = run_early_exit(module, x, threshold)
                correct += int((preds == y).sum())
                exit_parts.append(exit_idx)
            exits = torch.cat(exit_parts)
            counts = torch.bincount(exits, minlength=len(module.exits) + 1).tolist()
            latency = _best_time(lambda t=threshold: [run_early_exit(module, x, t) for x, _ in batches], repeats)
            latency_ms = latency / total * 1e3
            reports.append(
                EarlyExitReport(
                    threshold=float(threshold),
                    accuracy=correct / total,
                    exit_fractions=tuple(c / total for c in counts),
                    mean_exit=statistics.fmean(exits.tolist()),
                    latency_ms=latency_ms,
                    full_latency_ms=full_ms,
                    speedup=full_ms / latency_ms,
                )
            )
    finally:
        module.train(training)
    return reports


class _Removed(nn.Module):
    """Stands in for a layer that a truncated model never reaches."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("This layer was removed by `export_exit`: it runs only after the exit.")


def _stop_at_exit(_module: nn.Module, _args: Any, output: Tensor) -> None:
    raise _ExitReached(output)


class ExitModel(nn.Module):
    """A standalone model that runs a backbone up to one exit layer and returns that exit head's logits.

    The forward stops at the exit layer (a forward hook raises an internal exception carrying its output), so the
    layers after it never run; :meth:`from_module` also removes them from the copy.

    Args:
        backbone: The (truncated) backbone.
        exit_layer: Dotted name of the exit layer in ``backbone``.
        head: The exit's head.
    """

    def __init__(self, backbone: nn.Module, exit_layer: str, head: ExitHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.exit_layer = exit_layer
        self.head = head
        find_layer(backbone, exit_layer, role="backbone").register_forward_hook(_stop_at_exit)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """Return the exit's logits."""
        try:
            self.backbone(*args, **kwargs)
        except _ExitReached as reached:
            return self.head(reached.output)[1]
        raise RuntimeError(f"The exit layer {self.exit_layer!r} did not run in the backbone's forward.")

    @classmethod
    def from_module(cls, module: SelfDistillModule, index: int) -> nn.Module:
        """Copy the backbone and exit ``index``'s head; drop the layers only reached after that exit.

        Which layers run before the exit is read from one dry forward on ``module.example_input_array``; without
        one the copy keeps every layer (the forward still stops at the exit).

        Raises:
            IndexError: For an index outside ``0 .. len(module.exits)``.
        """
        count = len(module.exits)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= count:
            raise IndexError(f"Exit index must be in [0, {count}] ({count} is the backbone's output), got {index!r}.")
        capture = module._capture
        if capture is not None:
            capture.remove()  # hooks must not be copied with the layers they sit on
        backbone = copy.deepcopy(module.backbone).eval()
        if index == count:
            return backbone
        exported = cls(backbone, module.exits[index], copy.deepcopy(module.exit_heads[index])).eval()
        if module.example_input_array is not None:
            _remove_unreached(exported, move_data_to_device(module.example_input_array, module.device))
        return exported


def _remove_unreached(model: ExitModel, example: Any) -> None:
    """Replace the backbone layers that do not run before the exit with :class:`_Removed`."""
    entered: set[nn.Module] = set()
    handle = nn.modules.module.register_module_forward_pre_hook(lambda m, _args: entered.add(m))
    try:
        with torch.no_grad():
            call_with_inputs(model, example)
    finally:
        handle.remove()
    reached = [name for name, layer in model.backbone.named_modules() if layer in entered]
    removed: list[str] = []
    for name, _layer in list(model.backbone.named_modules()):
        if not name or any(r == name or r.startswith(name + ".") for r in reached):
            continue  # ran before the exit, or holds a layer that did (a ModuleList is never called itself)
        if any(name.startswith(prefix + ".") for prefix in removed):
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.backbone.get_submodule(parent_name), child, _Removed())
        removed.append(name)
