"""How inputs are fed to a model and logits read from what it returns (teacher and student alike)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lightning_distill._indexed import Indexed

TARGET_KEYS = ("labels", "label", "y", "target")


def call_with_inputs(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on the inputs part of a batch.

    A mapping is passed as keyword arguments (``model(**inputs)``, as Hugging Face models expect), anything else as
    the single positional argument.

    Example::

        >>> import torch
        >>> call_with_inputs(nn.Identity(), torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    if not isinstance(inputs, Tensor) and isinstance(inputs, Mapping):  # a tensor first: the common case is cheap
        return model(**inputs)
    return model(inputs)


def extract_logits(output: Any, *, role: str) -> Tensor:
    """Return the logits from a model's output.

    Accepted outputs: a tensor, an object with a ``.logits`` tensor attribute (Hugging Face ``ModelOutput``), or a
    mapping with a ``"logits"`` key.

    Args:
        output: What the model returned.
        role: ``"teacher"`` or ``"student"``, for the error message.

    Raises:
        TypeError: If no logits tensor can be found; the message says what was returned and how to fix it.

    Example::

        >>> import torch
        >>> extract_logits({"logits": torch.zeros(2, 3)}, role="teacher").shape
        torch.Size([2, 3])
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    hint = (
        " HINT: pass `logits_layer='<name of the layer that outputs the logits>'` to DistillationCallback."
        if role == "teacher"
        else " HINT: make `forward` return the logits tensor (or an object with `.logits`)."
    )
    raise TypeError(
        f"Cannot find logits in the {role}'s output of type {type(output).__name__}: expected a tensor, an object "
        f"with a `.logits` tensor, or a mapping with a 'logits' key.{hint}"
    )


def split_batch(batch: Any) -> tuple[Any, Tensor | None]:
    """Split a batch into ``(inputs, target)``; ``target`` is ``None`` for unlabeled batches.

    Handled: ``(x, y)`` tuples or lists, ``(x,)``, a bare tensor, an :class:`~lightning_distill.teacher.Indexed` batch
    (its ``sample`` is split), and mappings whose target is under one of
    ``"labels"``, ``"label"``, ``"y"``, ``"target"`` (the other entries are the inputs, passed to ``forward`` as
    keyword arguments). `DistillModule.split_batch` calls it; override that for any other structure.

    Raises:
        ValueError: For a sequence of another length or a mapping with several target keys.
        TypeError: For any other batch type.

    Example::

        >>> split_batch({"input_ids": 1, "labels": 2})
        ({'input_ids': 1}, 2)
    """
    if type(batch) in (tuple, list) and len(batch) == 2:  # the common `(x, y)` (exact types: not an `Indexed`)
        return batch[0], batch[1]
    if isinstance(batch, Indexed):  # sample identity for the teacher cache: the model sees only the sample
        return split_batch(batch.sample)
    if isinstance(batch, Mapping):
        keys = [k for k in TARGET_KEYS if k in batch]
        if len(keys) > 1:
            raise ValueError(
                f"The batch has several target keys {keys}; expected at most one of {list(TARGET_KEYS)}. "
                "HINT: override `DistillModule.split_batch`."
            )
        target = batch[keys[0]] if keys else None
        return {k: v for k, v in batch.items() if k not in keys}, target
    if isinstance(batch, (tuple, list)):
        if len(batch) in (1, 2):
            return batch[0], (batch[1] if len(batch) == 2 else None)
        raise ValueError(
            f"Cannot split a batch {type(batch).__name__} of length {len(batch)} into (inputs, target): expected "
            "(inputs, target) or (inputs,). HINT: override `DistillModule.split_batch`."
        )
    if isinstance(batch, Tensor):
        return batch, None
    raise TypeError(
        f"Cannot split a batch of type {type(batch).__name__} into (inputs, target): expected a tuple, list, "
        "mapping or tensor. HINT: override `DistillModule.split_batch`."
    )


def example_inputs(trainer: L.Trainer, module: Any) -> Any:
    """Inputs to infer shapes from: the module's ``example_input_array``, else the first batch ``fit`` trains on.

    The first batch comes from whatever the Trainer trains from: a ``DataLoader`` passed to ``fit``, a datamodule's
    or the module's own ``train_dataloader``. It is drawn from a fresh iterator under a forked RNG, with the
    loader's and its sampler's generators restored afterwards, so the run's random stream and data order are
    unchanged. ``module`` needs ``example_input_array`` and ``split_batch`` (this package's LightningModules have
    both). ``None`` when there is no training data source (e.g. outside ``fit``).
    """
    if module.example_input_array is not None:
        return module.example_input_array
    loader = _train_dataloader(trainer)
    if loader is None:
        return None
    batch = first_batch(loader)
    return None if batch is None else module.split_batch(batch)[0]


def _train_dataloader(trainer: L.Trainer) -> Any:
    """The training data the Trainer was given, or ``None``.

    Lightning exposes no public accessor before the fit loop loads its data (after ``setup``, when the optimizer
    already exists), so this reads the fit loop's data source, which resolves a ``DataLoader`` passed to ``fit``,
    a datamodule's and the module's ``train_dataloader`` alike; without it only a datamodule can be read.
    """
    source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
    if source is not None and getattr(source, "instance", None) is not None and source.is_defined():
        return source.dataloader()
    datamodule = getattr(trainer, "datamodule", None)
    return None if datamodule is None else datamodule.train_dataloader()


def first_batch(loader: Any) -> Any:
    """The first batch of ``loader`` without changing what the loader (or the global RNG) yields afterwards.

    Returns ``None`` for an empty loader.

    Example::

        >>> from torch.utils.data import DataLoader
        >>> loader = DataLoader(list(range(6)), batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0))
        >>> peeked = first_batch(loader)
        >>> torch.equal(peeked, next(iter(loader)))  # the loader still starts with the same batch
        True
    """
    generators = [
        g
        for g in (
            getattr(loader, "generator", None),
            getattr(getattr(loader, "sampler", None), "generator", None),
            getattr(getattr(getattr(loader, "batch_sampler", None), "sampler", None), "generator", None),
        )
        if isinstance(g, torch.Generator)
    ]
    states = [(g, g.get_state()) for g in dict.fromkeys(generators)]
    try:
        with torch.random.fork_rng(devices=[]):
            return next(iter(loader), None)
    finally:
        for generator, state in states:
            generator.set_state(state)


def next_token_view(
    logits: Tensor, target: Tensor | None, mask: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Align a causal LM's outputs with what they predict: logits at position t score token t + 1.

    Returns ``logits[..., :-1, :]``, ``target[..., 1:]`` and ``mask[..., 1:]`` (a position counts when the token it
    predicts is real).

    Raises:
        ValueError: For logits without a sequence dimension.

    Example::

        >>> z, y, m = next_token_view(torch.zeros(2, 5, 7), torch.zeros(2, 5, dtype=torch.long), None)
        >>> z.shape, y.shape, m
        (torch.Size([2, 4, 7]), torch.Size([2, 4]), None)
    """
    if logits.ndim < 3:
        raise ValueError(
            f"`shift_labels=True` needs sequence logits (B, L, V), got {tuple(logits.shape)}. HINT: shift_labels is "
            "for causal language models; leave it False for classification."
        )
    return (
        logits[..., :-1, :],
        None if target is None else target[..., 1:],
        None if mask is None else mask[..., 1:],
    )
