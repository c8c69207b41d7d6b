"""Capturing intermediate layer outputs with forward hooks, for the teacher and the student alike.

A :class:`FeatureCapture` is told which layers (by dotted name) and which part of their output (a tuple index or a
mapping key) to keep. Its hooks record only inside :meth:`FeatureCapture.recording`, so outputs of forwards outside a
training step (validation, a user's own call) are never kept, and :meth:`FeatureCapture.take` hands the recorded
tensors over and forgets them, so nothing outlives the step.

A capture is what the layer returned. Hooks keep a reference, not a copy, so an operation that changes the output
in place later in the forward (``ReLU(inplace=True)`` right after a BatchNorm, ``out += identity`` in a residual
block: how torchvision and timm ResNets are written) would change the captured value too. Each recorded tensor's
version counter is therefore remembered, and :meth:`FeatureCapture.take` compares it (one int comparison per tensor):
a layer found modified is switched to *copy mode*, where its hook records ``output.clone()`` (differentiable, so
gradients still reach the layer) instead; layers that are not modified are never cloned. A dry forward learns this
with ``take(learn=True)``; otherwise ``take`` raises :class:`ModifiedInPlaceError` (and the next forward copies).
Inside ``torch.inference_mode`` tensors carry no version counter: modifications are not detected there, while layers
already in copy mode are still copied.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_distill._layers import find_layer

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


def tensor_version(tensor: Tensor) -> int | None:
    """Return the version counter of ``tensor`` (bumped by every in-place change), ``None`` for inference tensors.

    Example::

        >>> import torch
        >>> t = torch.zeros(3)
        >>> before = tensor_version(t)
        >>> _ = t.add_(1)
        >>> tensor_version(t) == before + 1
        True
    """
    try:
        return tensor._version
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None


class ModifiedInPlaceError(RuntimeError):
    """A captured output was modified in place after its layer returned it, so the capture holds another value.

    The capture that raises has already switched those layers to copy mode: running the forward again gives the
    values the layers returned.

    Args:
        role: How the model is called in the message (``"teacher"``, ``"student"``, ``"backbone"``).
        keys: The capture keys found modified (layer names; ``"layer[sel]"`` for a part, ``"layer:input"`` for an
            input).
        hint: The fix to suggest; a generic one by default.

    Attributes:
        role: As given.
        keys: As given, as a tuple.
        hint: As given.
        layers: The layer names of ``keys``, without selectors or ``":input"``.
    """

    def __init__(self, role: str, keys: Iterable[str], hint: str | None = None) -> None:
        self.role = role
        self.keys = tuple(keys)
        self.layers = tuple(dict.fromkeys(_layer_of(key) for key in self.keys))
        self.hint = hint
        hint = hint or (
            "the capture keeps an unmodified copy from now on, so running the forward again gives the right values; "
            "to learn this before training, call `take(learn=True)` after one dry forward. Or capture a later layer, "
            "or make the in-place operation out of place (e.g. `inplace=False`)."
        )
        if len(self.keys) == 1:
            what = f"layer {self.keys[0]!r}: its output was modified in place after the layer returned it"
        else:
            what = f"layers {list(self.keys)}: their outputs were modified in place after the layers returned them"
        super().__init__(
            f"The {role}'s {what} (e.g. `ReLU(inplace=True)` or `x += ...` right after it), so the captured value is "
            f"not what the layer returned. HINT: {hint}"
        )

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (e.g. across processes) despite the extra arguments
        return (type(self), (self.role, self.keys, self.hint))


def _layer_of(key: str) -> str:
    if key.endswith(":input"):
        return key[: -len(":input")]
    return key.split("[", 1)[0]


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

    An output changed in place later in the forward is detected, and copied from then on::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True))
        >>> capture = FeatureCapture(role="student")
        >>> capture.add("0")
        '0'
        >>> capture.attach(net)
        >>> with capture.recording():
        ...     _ = net(torch.randn(3, 4))
        >>> _ = capture.take(learn=True)  # a dry forward: only the shapes are right
        >>> sorted(capture.copied)
        ['0']
        >>> with capture.recording():
        ...     out = net(torch.full((3, 4), -1.0))
        >>> bool((capture.take()["0"] == net[0](torch.full((3, 4), -1.0))).all())
        True
    """

    def __init__(self, role: str) -> None:
        self.role = role
        self._selectors: dict[str, list[Selector]] = {}
        self._input_layers: list[str] = []
        self._recorded: dict[str, Tensor] = {}
        self._versions: dict[str, int] = {}  # version counters of the recorded tensors that are not copies
        self._copied: set[str] = set()
        self._repeated: set[str] = set()  # keys recorded more than once since the recording started
        self._handles: list[RemovableHandle] = []
        self._recording = False
        self._keys: tuple[str, ...] = ()  # what `keys` returns, built when a feature is requested, not per step

    @property
    def keys(self) -> list[str]:
        """Keys of every requested feature, in the order they were added."""
        return list(self._keys)

    def _request_changed(self) -> None:
        outputs = [feature_key(layer, select) for layer, selects in self._selectors.items() for select in selects]
        self._keys = (*outputs, *(input_key(layer) for layer in self._input_layers))

    @property
    def attached(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    @property
    def copied(self) -> frozenset[str]:
        """Keys recorded as copies (``output.clone()``), because their outputs are modified in place later."""
        return frozenset(self._copied)

    def add_copies(self, keys: Iterable[str]) -> None:
        """Record the features under these ``keys`` as copies from now on (e.g. copy modes learned earlier).

        Raises:
            ValueError: For a key that was not requested (see :attr:`keys`).
        """
        keys = list(keys)
        unknown = sorted(set(keys) - set(self._keys))
        if unknown:
            raise ValueError(f"The {self.role}'s capture has no keys {unknown}; its keys are {self.keys}.")
        self._copied.update(keys)

    def add(self, layer: str, select: Selector = None) -> str:
        """Request the output of ``layer`` (or the part ``select`` of it) and return its key; idempotent."""
        select = check_selector(select, f"The selector of layer {layer!r}")
        if select not in self._selectors.get(layer, []):
            if self.attached:
                raise RuntimeError(f"Request the {self.role}'s features before its hooks are attached.")
            self._selectors.setdefault(layer, []).append(select)
            self._request_changed()
        return feature_key(layer, select)

    def add_input(self, layer: str) -> str:
        """Request the first positional input of ``layer`` and return its key (``"<layer>:input"``); idempotent."""
        if layer not in self._input_layers:
            if self.attached:
                raise RuntimeError(f"Request the {self.role}'s features before its hooks are attached.")
            self._input_layers.append(layer)
            self._request_changed()
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
        """Remove the hooks and forget anything recorded (the copy modes are kept)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._recorded.clear()
        self._versions.clear()

    @property
    def is_recording(self) -> bool:
        """Whether forwards are being recorded now."""
        return self._recording

    def start(self) -> None:
        """Record the requested outputs of every forward from now until :meth:`stop` (earlier records are dropped)."""
        self._recorded.clear()
        self._versions.clear()
        self._repeated.clear()
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

    def take(self, learn: bool = False) -> dict[str, Tensor]:
        """Return what was recorded and forget it.

        Args:
            learn: For a dry forward whose values matter only for their shapes: outputs found modified in place
                are switched to copy mode and returned as they are, instead of raising.

        Raises:
            RuntimeError: If a requested layer did not run, or ran more than once (the message names it).
            ModifiedInPlaceError: Without ``learn``, if a recorded output was modified in place after its layer
                returned it; those layers are switched to copy mode first, so a second forward gives the right values.
        """
        recorded, self._recorded = self._recorded, {}
        versions, self._versions = self._versions, {}
        repeated, self._repeated = sorted(self._repeated), set()
        missing = [key for key in self._keys if key not in recorded]
        if missing:
            raise RuntimeError(
                f"The {self.role}'s layers {missing} did not run in its forward, so their outputs could not be "
                "captured. HINT: name layers that every forward goes through."
            )
        if repeated:
            raise RuntimeError(
                f"The {self.role}'s layers {repeated} ran more than once while recording, so which output to match "
                "is ambiguous (only the last would be kept). A module object used at several places (e.g. one "
                "`nn.ReLU` shared by several blocks), or several forwards in one step, does this. HINT: give each use "
                "its own module and name that one, or name a layer that runs once per forward."
            )
        modified = [key for key, version in versions.items() if recorded[key]._version != version]
        if modified:
            self._copied.update(modified)
            if not learn:
                raise ModifiedInPlaceError(self.role, modified)
        return recorded

    def _hook(
        self, layer: str, selects: Sequence[Selector], record_input: bool
    ) -> Callable[[nn.Module, Any, Any], None]:
        where = f"The {self.role}'s layer {layer!r}"
        keys = [(feature_key(layer, select), select) for select in selects]
        in_key = input_key(layer)

        def keep(key: str, value: Tensor) -> None:
            if key in self._copied:
                value = value.clone()
            else:
                version = tensor_version(value)
                if version is not None:
                    self._versions[key] = version
                else:  # an inference tensor: not tracked (nor an earlier record of this key, now replaced)
                    self._versions.pop(key, None)
            if key in self._recorded:
                self._repeated.add(key)
            self._recorded[key] = value

        def hook(_module: nn.Module, inputs: Any, output: Any) -> None:
            if self._recording:
                plain = type(output) is Tensor  # the usual case: no selection to check
                for key, select in keys:
                    keep(key, output if plain and select is None else select_output(output, select, where))
                if record_input:
                    keep(in_key, select_output(inputs, 0, f"{where} (its inputs)"))

        return hook
