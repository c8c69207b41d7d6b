"""Loading a teacher's weights from a Lightning ``.ckpt`` or a plain ``state_dict`` file, strictly."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn


def check_prefix(prefix: object) -> str | None:
    """Validate a ``checkpoint_prefix``: ``None`` (find it), ``""`` (the top-level keys), or a key prefix.

    A prefix is given its trailing ``"."``.

    Example::

        >>> check_prefix("teacher"), check_prefix("model.teacher."), check_prefix(""), check_prefix(None)
        ('teacher.', 'model.teacher.', '', None)
    """
    if prefix is None or prefix == "":
        return prefix
    if not isinstance(prefix, str) or not prefix.strip(". ") or prefix != prefix.strip():
        raise ValueError(
            f"`checkpoint_prefix` must be a key prefix such as 'teacher.', '' (the keys without a prefix) or None "
            f"(find it), got {prefix!r}. HINT: `TeacherRunner(teacher, checkpoint='run.ckpt', "
            "checkpoint_prefix='teacher.')`."
        )
    return prefix if prefix.endswith(".") else f"{prefix}."


def load_teacher_checkpoint(teacher: nn.Module, path: str | Path, *, prefix: str | None = None) -> None:
    """Load a Lightning ``.ckpt`` or a plain ``state_dict`` file into ``teacher``, strictly.

    A Lightning checkpoint's ``"state_dict"`` entry is used. When the teacher was trained inside a LightningModule
    that held it as an attribute (``self.net = teacher``), the keys carry that prefix (``"net.conv.weight"``): a
    single leading prefix is stripped when that makes the keys match the teacher's exactly. When several prefixes do
    (a checkpoint holding ``student.*`` and ``teacher.*``, or ``model.*`` and ``ema_model.*``, of the same
    architecture), nothing is guessed: ``prefix`` names the one to load. Anything else must match exactly. A teacher
    whose weights are on the ``meta`` device (built without memory) receives the checkpoint's tensors.

    Args:
        teacher: The model to load into (in place).
        path: File written by ``trainer.save_checkpoint`` / ``ModelCheckpoint`` or ``torch.save(model.state_dict())``.
        prefix: The key prefix to take the teacher's weights from (``"teacher."``, or nested: ``"model.teacher."``),
            stripped from the keys; ``""`` takes the teacher's keys at the top level (ignoring other models' keys);
            ``None`` finds it as described above.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is empty, truncated or no checkpoint (the message names the file and the error), holds
            no state dict, matches the teacher under several prefixes (naming them), holds no key under ``prefix``, or
            its keys or shapes do not match the teacher's; the message lists missing, unexpected and mis-shaped keys.
    """
    path = Path(path)
    prefix = check_prefix(prefix)
    loaded = _read(path)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"The teacher checkpoint {str(path)!r} holds no state dict (got {type(loaded).__name__}). HINT: pass a "
            "Lightning checkpoint or a file written by `torch.save(teacher.state_dict(), path)`."
        )
    expected = teacher.state_dict()
    state = dict(state)
    if prefix is not None:
        state = _take_prefix(state, prefix, path, set(expected))
    else:
        state = _match_prefix(state, set(expected), path, type(teacher).__name__)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs teacher {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mis_shaped:
        chosen = "" if prefix is None else f" under `checkpoint_prefix={prefix!r}`"
        raise ValueError(
            f"The teacher checkpoint {str(path)!r}{chosen} does not match the teacher ({type(teacher).__name__}): "
            f"missing keys {missing[:10]}, unexpected keys {unexpected[:10]}, shape mismatches {mis_shaped[:10]}. "
            "HINT: build the teacher with the same architecture and arguments it was trained with."
        )
    on_meta = any(t.is_meta for t in (*teacher.parameters(), *teacher.buffers()))
    teacher.load_state_dict(state, strict=True, assign=on_meta)  # copying into a meta tensor would keep no value


def _read(path: Path) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU; every way it fails names the file and what is wrong."""
    if not path.is_file():
        raise FileNotFoundError(f"The teacher checkpoint {str(path)!r} does not exist or is not a file.")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(
            f"The teacher checkpoint {str(path)!r} is empty (0 bytes): the save or copy that wrote it did not finish. "
            "HINT: save the teacher again (`trainer.save_checkpoint(path)` or `torch.save(teacher.state_dict(), "
            "path)`), or copy the file again."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as err:  # an empty, truncated or foreign file: EOFError, OSError, RuntimeError, UnpicklingError
        detail = str(err).split("WeightsUnpickler error:")[-1].strip()  # torch's own advice is not the point here
        detail = detail.splitlines()[0].split(". ")[0][:200] if detail else ""  # its first sentence says it
        error = f"{type(err).__name__}: {detail}" if detail else type(err).__name__
        if "Unsupported global" in detail:
            what = "it holds objects other than tensors, which `torch.load(weights_only=True)` refuses"
            hint = "save the teacher's weights with `torch.save(teacher.state_dict(), path)`"
        else:
            what = "the file is truncated (a save or copy that did not finish) or is not a PyTorch checkpoint"
            hint = "save the teacher again, or copy the file again, and check it loads with `torch.load(path)`"
        raise ValueError(
            f"The teacher checkpoint {str(path)!r} ({size} bytes) could not be read ({error}): {what}. HINT: {hint}."
        ) from err


def _take_prefix(state: dict[str, Tensor], prefix: str, path: Path, expected: set[str]) -> dict[str, Tensor]:
    """The entries under ``prefix``, with it stripped (for ``""``: the teacher's own keys at the top level).

    Raises:
        ValueError: Naming the prefixes there are, when no key is under ``prefix``.
    """
    if prefix:
        taken = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    else:
        taken = {k: v for k, v in state.items() if k in expected}
    if not taken:
        found = sorted({k.split(".", 1)[0] + "." for k in state if "." in k})
        raise ValueError(
            f"The teacher checkpoint {str(path)!r} holds no key under `checkpoint_prefix={prefix!r}`; its keys start "
            f"with {found[:10]}. HINT: pass one of them, or `checkpoint_prefix=None` to find the teacher's keys."
        )
    return taken


def _match_prefix(state: dict[str, Tensor], expected: set[str], path: Path, teacher: str) -> dict[str, Tensor]:
    """Strip one leading ``"<name>."`` from the keys when exactly that makes them equal ``expected``.

    Raises:
        ValueError: If several prefixes do, or one does and the teacher's keys are also there without a prefix (which
            weights are the teacher's cannot be told from the keys).
    """
    if set(state) == expected:
        return state
    matches: dict[str, dict[str, Tensor]] = {}
    if expected and expected <= set(state):  # the teacher's own keys, beside other models' keys
        matches[""] = {k: state[k] for k in expected}
    for prefix in sorted({k.split(".", 1)[0] + "." for k in state if "." in k}):
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if set(stripped) == expected:
            matches[prefix] = stripped
    if len(matches) > 1:
        names = ", ".join(repr(p) if p else "'' (no prefix)" for p in matches)
        suggested = "teacher." if "teacher." in matches else next(p for p in matches if p)
        raise ValueError(
            f"The teacher checkpoint {str(path)!r} holds {len(matches)} models whose keys all match the teacher "
            f"({teacher}), under the prefixes {names}: which of them is the teacher cannot be told from the keys, "
            f"and loading the wrong one (a student's or an unaveraged model's weights) would go unnoticed. HINT: "
            f"choose one: `TeacherRunner(teacher, checkpoint={str(path)!r}, checkpoint_prefix={suggested!r})`."
        )
    return state if "" in matches else next(iter(matches.values()), state)  # unprefixed extras fail strictly
