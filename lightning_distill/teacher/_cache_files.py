"""The on-disk layout of a teacher cache directory: its settings, its preallocated row files, and their checks.

Layout (all arrays preallocated, memory-mapped, one row per ``index * views + view``, native byte order):

- ``meta.json``: format version, teacher fingerprint (every byte of its weights), number of samples, views, classes,
  ``top_k``, temperature (top-k only); written last, atomically (temporary file + rename): the cache exists only
  once every file does.
- ``values.bin``: float16 logits ``(rows, C)``, or float16 top-k log-probabilities ``(rows, k)``.
- ``indices.bin`` (top-k): int16/int32 class indices ``(rows, k)``; ``tail.bin`` (top-k): float32 tail mass.
- ``inputs.bin``: uint64 digest of the inputs the row's teacher outputs were computed from.
- ``crc.bin``: uint32 CRC-32 of each row's data, its inputs digest and its row number; ``filled.bin``: uint8, 1 once
  a row is complete.
- ``.lock``: an empty file, locked (``fcntl.flock``) while a process creates, checks or rebuilds the cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

if sys.platform != "win32":
    import fcntl

# 3: each row binds its sample (inputs digest, row number in the CRC); the fingerprint covers every weight.
# 2: only finite rows are stored (rows are read back unchecked); a format-1 cache may hold non-finite rows.
_FORMAT = 3
_FILES = ("values", "indices", "tail", "inputs", "crc", "filled")  # every row file a cache may hold
_WHY = {
    "format": "written by another version of lightning-distill",
    "teacher": "the teacher differs from the one the cache was made with: its weights or buffers (every byte), their "
    "dtype, or its logits layer",
    "num_samples": "the training dataset has another length",
    "views": "the dataset has another number of views (`IndexedDataset(views=)`)",
    "num_classes": "the teacher has another number of classes",
    "top_k": "`TeacherCache(top_k=)` differs",
    "temperature": "a top-k cache stores probabilities at one temperature, and the module's differs",
}


class DamagedCacheError(ValueError):
    """A cache file that cannot be read: unreadable ``meta.json``, or a row file of the wrong size."""


def cache_settings(
    fingerprint: str, num_samples: int, views: int, num_classes: int, top_k: int | None, temperature: float | None
) -> dict[str, Any]:
    """The settings a cache is valid for (its ``meta.json``)."""
    return {
        "format": _FORMAT,
        "teacher": fingerprint,
        "num_samples": int(num_samples),
        "views": int(views),
        "num_classes": int(num_classes),
        "top_k": top_k,
        "temperature": None if top_k is None else float(temperature),  # type: ignore[arg-type]
    }


def differences(found: dict[str, Any], expected: dict[str, Any], why: Mapping[str, str] | None = None) -> list[str]:
    """Each setting the cache was made for that differs from ``expected``, with what that means (``why``, by key)."""
    why = _WHY if why is None else why
    return [
        f"{key}: cache {found.get(key)!r}, now {value!r} ({why.get(key, 'another setting')})"
        for key, value in expected.items()
        if found.get(key) != value
    ]


def layout(meta: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each row file's shape and dtype for a cache's settings."""
    rows = meta["num_samples"] * meta["views"]
    top_k, classes = meta["top_k"], meta["num_classes"]
    files: dict[str, tuple[tuple[int, ...], str]] = {"values": ((rows, classes if top_k is None else top_k), "float16")}
    if top_k is not None:
        files["indices"] = ((rows, top_k), "int16" if classes <= np.iinfo(np.int16).max else "int32")
        files["tail"] = ((rows,), "float32")
    files["inputs"] = ((rows,), "uint64")
    files["crc"] = ((rows,), "uint32")
    files["filled"] = ((rows,), "uint8")
    return files


def _rebuild_hint(directory: Path) -> str:
    return (
        f"HINT: pass `TeacherCache(..., on_mismatch='rebuild')` to rebuild it, or delete "
        f"{str(directory / 'meta.json')!r} (the next fit rebuilds the cache)."
    )


def read_meta(directory: Path) -> dict[str, Any] | None:
    """The settings in ``meta.json``, or ``None`` when there is none (no cache yet).

    Raises:
        DamagedCacheError: If the file cannot be read as a JSON object.
    """
    file = directory / "meta.json"
    try:
        text = file.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise DamagedCacheError(
            f"Teacher cache file {str(file)!r} cannot be read ({err.strerror or err}). {_rebuild_hint(directory)}"
        ) from err
    try:
        found = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedCacheError(
            f"Teacher cache file {str(file)!r} is damaged: {len(text)} bytes that are not valid JSON ({err}). "
            f"{_rebuild_hint(directory)}"
        ) from err
    if not isinstance(found, dict):
        raise DamagedCacheError(
            f"Teacher cache file {str(file)!r} is damaged: it holds a {type(found).__name__}, not the cache's "
            f"settings. {_rebuild_hint(directory)}"
        )
    return found


def _check_size(directory: Path, name: str, shape: tuple[int, ...], dtype: str) -> None:
    file = directory / f"{name}.bin"
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    size = file.stat().st_size if file.is_file() else None
    if size != expected:
        raise DamagedCacheError(
            f"Teacher cache file {str(file)!r} is truncated or damaged: {'missing' if size is None else size} bytes, "
            f"expected {expected}. {_rebuild_hint(directory)}"
        )


def is_intact(directory: Path, meta: dict[str, Any]) -> bool:
    """Whether every row file has the size ``meta`` gives it."""
    try:
        for name, (shape, dtype) in layout(meta).items():
            _check_size(directory, name, shape, dtype)
    except DamagedCacheError:
        return False
    return True


def map_rows(directory: Path, meta: dict[str, Any]) -> dict[str, np.memmap]:
    """Memory-map every row file of an existing cache for reading and writing.

    Raises:
        DamagedCacheError: If a file is missing or has the wrong size (truncated).
    """
    files = layout(meta)
    for name, (shape, dtype) in files.items():
        _check_size(directory, name, shape, dtype)
    return {
        name: np.memmap(directory / f"{name}.bin", dtype=dtype, mode="r+", shape=shape)
        for name, (shape, dtype) in files.items()
    }


def remove(directory: Path) -> None:
    """Delete the cache's own files (``meta.json`` first, so that it reads as absent); nothing else in the folder."""
    for name in ("meta.json", "meta.json.tmp", *(f"{n}.bin" for n in _FILES)):
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()


def allocate(directory: Path, meta: dict[str, Any]) -> None:
    """Create zero-filled row files for ``meta`` (no row filled), then ``meta.json`` last."""
    for name, (shape, dtype) in layout(meta).items():
        with open(directory / f"{name}.bin", "wb") as handle:
            handle.truncate(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
    write_meta(directory, meta)


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """Write ``meta.json`` atomically (a temporary file, then a rename): it exists whole or not at all."""
    tmp = directory / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, sort_keys=True))
    os.replace(tmp, directory / "meta.json")


@contextlib.contextmanager
def creation_lock(directory: Path, wait: bool = True) -> Iterator[None]:
    """Hold the cache's lock file: processes that create or rebuild one cache do it one after the other.

    Without ``fcntl`` (Windows) the files are still created before ``meta.json``, but two fits creating one cache at
    the same moment are not kept apart.

    Raises:
        BlockingIOError: With ``wait=False``, if another process holds the lock.
    """
    with open(directory / ".lock", "a") as handle:
        if sys.platform != "win32":
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)  # released at close
        yield


def prepare_directory(directory: Path) -> None:
    """Create the cache directory if missing and check that this process can write in it.

    Raises:
        OSError: (its original subclass) naming the directory and the operating system's reason.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=directory)
        os.close(handle)
        os.remove(probe)
    except OSError as err:
        where = f" ({err.filename!r})" if err.filename and str(err.filename) != str(directory) else ""
        raise type(err)(
            f"Teacher cache directory {str(directory)!r} cannot be created or written: {err.strerror or err}{where}. "
            "HINT: give the cache (`TeacherCache(path)`, `TokenCache(path)`) a directory this process can create and "
            "write (its parent must be a directory, on a writable file system)."
        ) from err


def row_checksums(parts: dict[str, np.ndarray], digests: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """CRC-32 of each row over every part's bytes (in a fixed order), its inputs digest and its row number."""
    count = len(rows)
    flat = [np.ascontiguousarray(parts[name]).reshape(count, -1).view(np.uint8) for name in sorted(parts)]
    flat.append(np.ascontiguousarray(digests, dtype=np.uint64).reshape(count, 1).view(np.uint8))
    flat.append(np.ascontiguousarray(rows, dtype=np.int64).reshape(count, 1).view(np.uint8))
    joined = np.concatenate(flat, axis=1)
    return np.fromiter(map(zlib.crc32, joined), dtype=np.uint32, count=count)  # each row through its buffer
