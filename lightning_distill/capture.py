"""Capturing intermediate layer outputs with forward hooks, for the teacher and the student alike.

A :class:`FeatureCapture` is told which layers (by dotted name) and which part of their output (a tuple index or a
mapping key) to keep. Its hooks record only inside :meth:`FeatureCapture.recording`, so outputs of forwards outside a
training step (validation, a user's own call) are never kept, and :meth:`FeatureCapture.take` hands the recorded
tensors over and forgets them, so nothing outlives the step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_distill.layers import find_layer

Selector = int | str | None
"""Which part of a layer's output to keep: ``None`` (the output itself), a tuple/list index, or a mapping key."""


def feature_key(layer: str, select: Selector = None) -> str:
    """Return the key under which the output of ``layer`` (optionally a part of it) is stored.

    Example::

        >>> feature_key("encoder.3"), feature_key("encoder.3", 0), feature_key("block", "hidden")
        ('encoder.3', 'encoder.3[0]', "block['hidden']")
    """
    return layer if select is None else f"{layer}[{select!r}]"


def input_key(layer: str) -> str:
    """Return the key under which the first positional input of ``layer`` is stored.

    Example::

        >>> input_key("head")
        'head:input'
    """
    return f"{layer}:input"


def check_selector(select: object, what: str) -> Selector:
    """Validate a selector: ``None``, a non-negative or negative ``int`` index, or a non-empty ``str`` key.

    Raises:
        TypeError: For any other value; the message names ``what`` and the value.
    """
    if select is None or (isinstance(select, int) and not isinstance(select, bool)):
        return select
    if isinstance(select, str) and select:
        return select
    raise TypeError(
        f"{what} must be None, an int index (tuple/list outputs) or a non-empty str key (mapping outputs), "
        f"got {select!r}."
    )


def select_output(output: Any, select: Selector, where: str) -> Tensor:
    """Return the tensor part of a layer's ``output`` picked by ``select``.

    Args:
        output: What the layer's ``forward`` returned.
        select: ``None`` for the output itself, an index into a tuple/list, or a key (or attribute, for
            ``ModelOutput``-like objects) of a mapping.
        where: How to name the layer in error messages.

    Raises:
        TypeError: If the selected value is not a tensor, or ``select`` does not fit the output's type.
        IndexError: If an index is out of range.
        KeyError: If a key is missing; the message lists the existing keys.

    Example::

        >>> import torch
        >>> select_output((torch.zeros(2), torch.ones(3)), 1, "layer").shape
        torch.Size([3])
    """
    value = output
    if isinstance(select, int):
        if not isinstance(output, (tuple, list)):
            raise TypeError(f"{where} returned a {type(output).__name__}, which cannot be indexed by {select!r}.")
        if not -len(output) <= select < len(output):
            raise IndexError(f"{where} returned {len(output)} values; index {select!r} is out of range.")
        value = output[select]
    elif isinstance(select, str):
        if isinstance(output, Mapping):
            if select not in output:
                raise KeyError(f"{where} returned a mapping without key {select!r}; its keys are {list(output)}.")
            value = output[select]
        elif hasattr(output, select):
            value = getattr(output, select)
        else:
            raise TypeError(f"{where} returned a {type(output).__name__}, which has no key {select!r}.")
    if not isinstance(value, Tensor):
        part = "its output" if select is None else f"part {select!r} of its output"
        raise TypeError(
            f"{where}: {part} is a {type(value).__name__}, not a tensor. HINT: select the tensor with an index "
            "(tuple outputs) or a key (dict outputs)."
        )
    return value


class FeatureCapture:
    """Forward hooks that keep selected outputs of named layers of one model, for one forward at a time.

    Args:
        role: How to call the model in error messages (``"teacher"``, ``"student"``).

    Example::

        >>> import torch
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> capture = FeatureCapture(role="student")
        >>> capture.add("1")
        '1'
        >>> capture.attach(net)
        >>> with capture.recording():
        ...     _ = net(torch.ones(3, 4))
        >>> {key: tuple(value.shape) for key, value in capture.take().items()}
        {'1': (3, 8)}
        >>> capture.remove()
    """

    def __init__(self, role: str) -> None:
        self.role = role
        self._selectors: dict[str, list[Selector]] = {}
        self._input_layers: list[str] = []
        self._recorded: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = []
        self._recording = False

    @property
    def keys(self) -> list[str]:
        """Keys of every requested feature, in the order they were added."""
        outputs = [feature_key(layer, select) for layer, selects in self._selectors.items() for select in selects]
        return outputs + [input_key(layer) for layer in self._input_layers]

    @property
    def attached(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    def add(self, layer: str, select: Selector = None) -> str:
        """Request the output of ``layer`` (or the part ``select`` of it) and return its key; idempotent."""
        select = check_selector(select, f"The selector of layer {layer!r}")
        if select not in self._selectors.get(layer, []):
            if self.attached:
                raise RuntimeError(f"Request the {self.role}'s features before its hooks are attached.")
            self._selectors.setdefault(layer, []).append(select)
        return feature_key(layer, select)

    def add_input(self, layer: str) -> str:
        """Request the first positional input of ``layer`` and return its key (``"<layer>:input"``); idempotent."""
        if layer not in self._input_layers:
            if self.attached:
                raise RuntimeError(f"Request the {self.role}'s features before its hooks are attached.")
            self._input_layers.append(layer)
        return input_key(layer)

    def check(self, model: nn.Module) -> None:
        """Raise ``ValueError`` (listing the closest names) if a requested layer does not exist in ``model``."""
        for layer in dict.fromkeys([*self._selectors, *self._input_layers]):
            find_layer(model, layer, role=self.role)

    def attach(self, model: nn.Module) -> None:
        """Register one forward hook per requested layer of ``model`` (idempotent)."""
        if self.attached:
            return
        for layer in dict.fromkeys([*self._selectors, *self._input_layers]):
            module = find_layer(model, layer, role=self.role)
            hook = self._hook(layer, self._selectors.get(layer, []), layer in self._input_layers)
            self._handles.append(module.register_forward_hook(hook))

    def remove(self) -> None:
        """Remove the hooks and forget anything recorded."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._recorded.clear()

    @property
    def is_recording(self) -> bool:
        """Whether forwards are being recorded now."""
        return self._recording

    def start(self) -> None:
        """Record the requested outputs of every forward from now until :meth:`stop` (earlier records are dropped)."""
        self._recorded.clear()
        self._recording = True

    def stop(self) -> None:
        """Stop recording; what was recorded stays until :meth:`take`."""
        self._recording = False

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record the requested outputs of the forwards run inside this context (earlier records are dropped)."""
        self.start()
        try:
            yield
        finally:
            self.stop()

    def take(self) -> dict[str, Tensor]:
        """Return what was recorded and forget it.

        Raises:
            RuntimeError: If a requested layer did not run (the message names it).
        """
        recorded, self._recorded = self._recorded, {}
        missing = [key for key in self.keys if key not in recorded]
        if missing:
            raise RuntimeError(
                f"The {self.role}'s layers {missing} did not run in its forward, so their outputs could not be "
                "captured. HINT: name layers that every forward goes through."
            )
        return recorded

    def _hook(
        self, layer: str, selects: Sequence[Selector], record_input: bool
    ) -> Callable[[nn.Module, Any, Any], None]:
        where = f"The {self.role}'s layer {layer!r}"

        def hook(_module: nn.Module, inputs: Any, output: Any) -> None:
            if self._recording:
                for select in selects:
                    self._recorded[feature_key(layer, select)] = select_output(output, select, where)
                if record_input:
                    self._recorded[input_key(layer)] = select_output(inputs, 0, f"{where} (its inputs)")

        return hook
