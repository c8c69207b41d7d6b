"""Quiet Lightning runs: its start-up banners and the warnings its own code raises whatever the caller does."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

# Raised by Lightning's own code whatever the caller does: its pytree helper (lightning 2.6) still tests
# `isinstance(treespec, LeafSpec)`, which torch 2.13 deprecates; once per process.
KNOWN_LIGHTNING_WARNINGS = (r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",)


@contextlib.contextmanager
def quiet_lightning(*, banners: bool = False) -> Iterator[None]:
    """Hide Lightning's start-up banners and its known one-off warnings inside the block; restore them after.

    For scripts that run many small fits (the demo): the ``lightning.pytorch`` and ``lightning.fabric`` loggers show
    warnings and errors only, so no "GPU available…", "TPU available…", litlogger tip or "`Trainer.fit` stopped"
    lines, and the warnings in ``KNOWN_LIGHTNING_WARNINGS`` (raised by Lightning's own code whatever the caller does)
    are ignored. Every other warning still shows.

    Args:
        banners: Keep Lightning's information lines; hide only the known warnings (the command line does this).

    Example:
        >>> with quiet_lightning():
        ...     logging.getLogger("lightning.pytorch").isEnabledFor(logging.INFO)
        False
    """
    names = () if banners else ("lightning.pytorch", "lightning.fabric")
    levels = {name: logging.getLogger(name).level for name in names}
    with warnings.catch_warnings():
        for message in KNOWN_LIGHTNING_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        try:
            for name in names:
                logging.getLogger(name).setLevel(logging.WARNING)
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
