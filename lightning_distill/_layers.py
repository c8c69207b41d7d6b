"""Finding layers of a model by dotted name, with errors that suggest the closest names."""

from __future__ import annotations

import difflib

from torch import nn

_STRATEGY_WRAPPER_PREFIXES = ("module.", "_forward_module.", "_orig_mod.")


def find_layer(model: nn.Module, name: str, *, role: str = "model") -> nn.Module:
    """Return the submodule of ``model`` at the dotted path ``name``.

    Paths use the names of :meth:`torch.nn.Module.named_modules`: nested attributes joined by dots, with
    ``Sequential`` / ``ModuleList`` indices as plain numbers (``"features.2"``). A path written for the unwrapped
    model also resolves inside a strategy or ``torch.compile`` wrapper (``module.``, ``_forward_module.`` and
    ``_orig_mod.`` prefixes are tried).

    Args:
        model: The model to search.
        name: Dotted path of the layer, e.g. ``"encoder.layers.3.mlp"``.
        role: How to call ``model`` in the error message (``"teacher"``, ``"student"``).

    Returns:
        The submodule.

    Raises:
        ValueError: If no such layer exists; the message lists the closest existing names.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> find_layer(net, "2")
        Linear(in_features=8, out_features=2, bias=True)
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"A layer name must be a non-empty dotted path such as 'features.2', got {name!r}.")
    modules = dict(model.named_modules())
    for prefix in ("", *_STRATEGY_WRAPPER_PREFIXES):
        if prefix + name in modules:
            return modules[prefix + name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
    hint = (
        f" Closest names: {close}." if close else f" Its layers are: {names[:20]}{' ...' if len(names) > 20 else ''}."
    )
    raise ValueError(f"The {role} ({type(model).__name__}) has no layer named {name!r}.{hint}")
