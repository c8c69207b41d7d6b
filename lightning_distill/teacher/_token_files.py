"""The on-disk layout of a token cache: one shard per writing process, each a directory of its own.

``<cache>/shard-<rank>/`` (the global rank of the process that writes it; a pre-pass resumed with another number of
processes adds shards and keeps the old ones):

- ``meta.json``: the settings the shard was written for (format, teacher fingerprint, samples, views, vocabulary,
  ``top_k``, temperature, ``shift_labels``, ``ignore_index``), written once, atomically, before any row.
- ``tokens.bin``: the stored tokens, appended sample after sample (the packed records of
  :func:`~lightning_distill.teacher._token_codec.token_dtype`, little-endian).
- ``samples.bin``: one preallocated 25-byte record per (sample, view) row: ``offset`` (int64, in tokens),
  ``count`` (uint32), ``digest`` (uint64, of the inputs the teacher ran on), ``crc`` (uint32, CRC-32 of the row's
  digest, its row number and its tokens' bytes) and ``filled`` (uint8), written in that order after the tokens.
- ``.lock``: locked (``fcntl.flock``) by the one process that writes the shard, for as long as it writes.

A process killed mid-write leaves tokens past the last filled row; the next writer cuts them off.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from lightning_distill.teacher._cache_files import DamagedCacheError, creation_lock, write_meta
from lightning_distill.teacher._cache_files import differences as setting_differences
from lightning_distill.teacher._token_codec import token_dtype

if sys.platform != "win32":
    pass

FORMAT = 1
SAMPLE_DTYPE = np.dtype(
    [("offset", "<i8"), ("count", "<u4"), ("digest", "<u8"), ("crc", "<u4"), ("filled", "u1")]
)  # packed: 25 bytes
WHY = {
    "format": "written by another version of lightning-distill",
    "teacher": "another teacher than the one the cache was written with (its weights, their dtype, its logits layer)",
    "num_samples": "the training dataset has another length",
    "views": "the dataset has another number of views (`IndexedDataset(views=)`)",
    "vocab": "the teacher has another vocabulary",
    "top_k": "`TokenCache(top_k=)` differs",
    "temperature": "the cache stores probabilities at one temperature, and the module's differs",
    "shift_labels": "the positions stored are those a module with this `shift_labels` counts",
    "ignore_index": "the positions stored are those whose label is not this `ignore_index`",
}


def shard_dirs(directory: Path) -> list[Path]:
    """The shard directories of a cache, by rank."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("shard-*") if p.is_dir() and p.name[6:].isdigit())


def read_shard_meta(shard: Path) -> dict[str, Any] | None:
    """A shard's settings, or ``None`` when it has none yet (a writer died before its first row).

    Raises:
        DamagedCacheError: If ``meta.json`` is not a JSON object.
    """
    file = shard / "meta.json"
    try:
        found = json.loads(file.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedCacheError(
            f"Token cache file {str(file)!r} cannot be read ({err}). HINT: delete the shard {str(shard)!r} (the next "
            "pre-pass writes its rows again)."
        ) from err
    if not isinstance(found, dict):
        raise DamagedCacheError(f"Token cache file {str(file)!r} holds a {type(found).__name__}, not settings.")
    return found


def differences(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Each setting of ``expected`` that a shard's ``found`` differs in, with what that means."""
    return setting_differences(found, expected, WHY)


def samples_size(meta: dict[str, Any]) -> int:
    """Bytes of a shard's ``samples.bin``."""
    return int(meta["num_samples"]) * int(meta["views"]) * SAMPLE_DTYPE.itemsize


def map_samples(shard: Path, meta: dict[str, Any], mode: str) -> np.memmap:
    """Memory-map a shard's per-row records (``"r"`` or ``"r+"``).

    Raises:
        DamagedCacheError: If the file is missing or has the wrong size.
    """
    file = shard / "samples.bin"
    size = file.stat().st_size if file.is_file() else None
    if size != samples_size(meta):
        raise DamagedCacheError(
            f"Token cache file {str(file)!r} is truncated or damaged: {'missing' if size is None else size} bytes, "
            f"expected {samples_size(meta)}. HINT: delete the shard {str(shard)!r} (the next pre-pass writes its "
            "rows again)."
        )
    rows = int(meta["num_samples"]) * int(meta["views"])
    return np.memmap(file, dtype=SAMPLE_DTYPE, mode=mode, shape=(rows,))  # type: ignore[call-overload]


def map_tokens(shard: Path, meta: dict[str, Any]) -> np.ndarray:
    """A shard's stored tokens, memory-mapped read-only (an empty array when none are stored)."""
    dtype = token_dtype(int(meta["top_k"]), int(meta["vocab"]))
    file = shard / "tokens.bin"
    count = file.stat().st_size // dtype.itemsize if file.is_file() else 0
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(file, dtype=dtype, mode="r", shape=(count,))


def create_shard(shard: Path, meta: dict[str, Any]) -> None:
    """Write a new shard's zero-filled ``samples.bin``, an empty ``tokens.bin``, then ``meta.json`` last."""
    shard.mkdir(parents=True, exist_ok=True)
    with open(shard / "samples.bin", "wb") as handle:
        handle.truncate(samples_size(meta))
    (shard / "tokens.bin").write_bytes(b"")
    write_meta(shard, meta)


def remove_shard(shard: Path, keep_lock: bool = False) -> None:
    """Delete a shard (``meta.json`` first, so that it reads as absent).

    With ``keep_lock`` (the shard this process writes, its lock held) the directory and its ``.lock`` stay: a lock
    on a deleted file would lock nothing, and a second writer would create and lock another ``.lock``.
    """
    with contextlib.suppress(FileNotFoundError):
        (shard / "meta.json").unlink()
    if not keep_lock:
        shutil.rmtree(shard, ignore_errors=True)
        return
    for entry in shard.iterdir():
        if entry.name == ".lock":
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def open_tokens_for_append(shard: Path, samples: np.ndarray, itemsize: int) -> IO[bytes]:
    """Open ``tokens.bin`` for appending, cut after the last filled row's tokens (a killed writer's leftovers)."""
    filled = samples["filled"] == 1
    end = int((samples["offset"][filled] + samples["count"][filled]).max()) if filled.any() else 0
    handle = open(shard / "tokens.bin", "r+b")
    handle.truncate(end * itemsize)
    handle.seek(end * itemsize)
    return handle


@contextlib.contextmanager
def writer_lock(shard: Path) -> Iterator[None]:
    """Hold a shard's lock for the whole pre-pass: a second writer of the same shard fails at once.

    Raises:
        RuntimeError: If another process holds it.
    """
    shard.mkdir(parents=True, exist_ok=True)
    try:
        with creation_lock(shard, wait=False):
            yield
    except BlockingIOError as err:
        raise RuntimeError(
            f"Token cache shard {str(shard)!r} is being written by another process (its lock is held). "
            "HINT: wait for that pre-pass to finish, or write this cache to another directory."
        ) from err


def row_heads(digests: np.ndarray, rows: np.ndarray) -> list[bytes]:
    """What each row's CRC starts from: its inputs digest and its row number, 16 little-endian bytes."""
    heads = np.empty(len(rows), dtype=[("digest", "<u8"), ("row", "<i8")])
    heads["digest"], heads["row"] = digests, rows
    raw = heads.tobytes()
    return [raw[i : i + 16] for i in range(0, len(raw), 16)]


def row_checksum(head: bytes, data: Any) -> int:
    """CRC-32 of a row's head (:func:`row_heads`) followed by its tokens' bytes."""
    return zlib.crc32(data, zlib.crc32(head))
