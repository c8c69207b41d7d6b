"""TeacherCache: the teacher's outputs stored once per (sample, view) and read back in later epochs.

Layout of a cache directory (all arrays preallocated, memory-mapped, one row per ``index * views + view``):

- ``meta.json``: format version, teacher fingerprint, number of samples, views, classes, ``top_k``, temperature
  (top-k only); written atomically (temporary file + rename).
- ``values.bin``: float16 logits ``(rows, C)``, or float16 top-k log-probabilities ``(rows, k)``.
- ``indices.bin`` (top-k): int16/int32 class indices ``(rows, k)``; ``tail.bin`` (top-k): float32 tail mass.
- ``crc.bin``: uint32 CRC-32 of each row's bytes; ``filled.bin``: uint8, 1 once a row is complete.

A row counts only when its ``filled`` flag is set, and the flag is written after the row's data and checksum, so a
process killed mid-epoch leaves rows that read as missing (they are filled again on resume), never as valid. Every
read row is checked against its checksum (a torn or corrupted row raises); files of the wrong size (truncated)
are refused when the cache is opened.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from lightning_distill._indexed import Indexed
from lightning_distill.losses.functional.topk import topk_log_probs
from lightning_distill.teacher._runner import TeacherOutputs, TopKTeacher

# 2: only finite rows are stored (rows are read back unchecked); a format-1 cache may hold non-finite rows.
_FORMAT = 2
OnMismatch = Literal["refuse", "rebuild"]


class TeacherCache:
    """Where and how :class:`~lightning_distill.DistillationCallback` caches the teacher's logits.

    ``DistillationCallback(teacher, cache=TeacherCache("runs/cache", top_k=8))``: in the first epoch every batch runs
    the teacher and its logits are written; in later epochs (and later runs with the same teacher and data) batches
    whose samples are all cached never run the teacher. The batches must carry sample identity: wrap the training
    dataset in :class:`~lightning_distill.teacher.IndexedDataset` (or return
    :class:`~lightning_distill.teacher.Indexed` items yourself).

    Args:
        path: Directory of the cache (created if missing). Under DDP every process on the machine shares it: each
            writes the rows of its own samples.
        top_k: ``None`` stores the full logits in float16 (any divergence, any temperature). An int stores the top-k
            log-probabilities at the module's temperature and the tail mass (``divergence="kl"`` only, constant
            temperature; see :mod:`lightning_distill.losses.functional.topk` for the error bound).
        on_mismatch: What to do when the directory holds a cache for another teacher, dataset size or settings:
            ``"refuse"`` (default, raise naming the differences) or ``"rebuild"`` (delete it and start again).
        verify: At the first fully cached batch of every epoch also run the teacher and compare, so inputs that
            changed (a random augmentation outside ``IndexedDataset``'s seeded views) raise instead of training on
            stale outputs. Costs one teacher forward per epoch.

    Raises:
        ValueError: For a bad ``top_k`` or ``on_mismatch``.
    """

    def __init__(
        self, path: str | Path, *, top_k: int | None = None, on_mismatch: OnMismatch = "refuse", verify: bool = True
    ) -> None:
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"`top_k` must be None (full logits) or an int >= 1, got {top_k!r}.")
        if on_mismatch not in ("refuse", "rebuild"):
            raise ValueError(f"`on_mismatch` must be 'refuse' or 'rebuild', got {on_mismatch!r}.")
        if not isinstance(verify, bool):
            raise TypeError(f"`verify` must be True or False, got {verify!r}.")
        self.path = Path(path)
        self.top_k = top_k
        self.on_mismatch = on_mismatch
        self.verify = verify
        self.teacher_runs = 0  # batches the teacher had to run on (for reports and tests)
        self._meta: dict[str, Any] | None = None
        self._arrays: dict[str, np.memmap] = {}
        self._views: dict[str, np.ndarray] = {}
        self._verified_epoch = -1

    # ------------------------------------------------------------------------------------------------------- files
    @property
    def is_open(self) -> bool:
        """Whether the cache files are open."""
        return self._meta is not None

    def bytes_per_sample(self) -> int:
        """Bytes stored per (sample, view), all files included."""
        if self._meta is None:
            raise RuntimeError("The cache is not open yet.")
        return sum(a.dtype.itemsize * int(np.prod(a.shape[1:], dtype=np.int64)) for a in self._arrays.values())

    def filled_fraction(self) -> float:
        """Fraction of (sample, view) rows stored."""
        return float(np.asarray(self._arrays["filled"]).mean()) if self._meta is not None else 0.0

    def open(self, expected: dict[str, Any], create: bool, barrier: Callable[[], None] = lambda: None) -> bool:
        """Open the cache for ``expected`` settings; with ``create`` (rank 0) make or rebuild it first.

        Returns ``False`` when there is no cache yet and ``create`` is false.

        Raises:
            ValueError: If an existing cache was made for other settings and ``on_mismatch="refuse"``, or a file has
                the wrong size.
        """
        meta_path = self.path / "meta.json"
        if create:
            if meta_path.is_file():
                found = json.loads(meta_path.read_text())
                if _differences(found, expected) and self.on_mismatch == "rebuild":
                    shutil.rmtree(self.path)
            if not meta_path.is_file():
                self._allocate(expected)
        barrier()
        if not meta_path.is_file():
            return False
        found = json.loads(meta_path.read_text())
        differences = _differences(found, expected)
        if differences:
            raise ValueError(
                f"The teacher cache in {str(self.path)!r} was made for other settings: {'; '.join(differences)}. "
                "HINT: pass `TeacherCache(..., on_mismatch='rebuild')` to rebuild it, or use another directory."
            )
        self._meta = found
        self._arrays = {name: self._map(name, shape, dtype, "r+") for name, (shape, dtype) in _layout(found).items()}
        # plain ndarray views of the same mapped memory: indexing them skips np.memmap's per-result bookkeeping
        self._views = {name: np.asarray(array) for name, array in self._arrays.items()}
        return True

    def _allocate(self, meta: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        for name, (shape, dtype) in _layout(meta).items():
            self._map(name, shape, dtype, "w+").flush()
        tmp = self.path / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, sort_keys=True))
        os.replace(tmp, self.path / "meta.json")  # the cache exists only once every file does

    def _map(self, name: str, shape: tuple[int, ...], dtype: str, mode: Literal["r+", "w+"]) -> np.memmap:
        file = self.path / f"{name}.bin"
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if mode == "r+" and (not file.is_file() or file.stat().st_size != expected):
            size = file.stat().st_size if file.is_file() else "missing"
            raise ValueError(
                f"Teacher cache file {str(file)!r} is truncated or damaged: {size} bytes, expected {expected}. "
                "HINT: delete the cache directory, or pass `on_mismatch='rebuild'`."
            )
        return np.memmap(file, dtype=dtype, mode=mode, shape=shape)

    def flush(self) -> None:
        """Write every mapped page to disk (called at epoch end)."""
        for array in self._arrays.values():
            array.flush()

    # -------------------------------------------------------------------------------------------------- entries
    def rows(self, batch: Any) -> np.ndarray:
        """The cache rows of a batch's samples (``index * views + view``).

        Raises:
            TypeError: If the batch carries no sample identity.
            IndexError: If an index or view is out of range.
        """
        if not isinstance(batch, Indexed):
            raise TypeError(
                f"TeacherCache needs each batch's sample indices, but the batch is a {type(batch).__name__}. HINT: "
                "wrap the training dataset: `IndexedDataset(dataset)` (from lightning_distill.demos)."
            )
        index, view = _flat_int64(batch[0]), _flat_int64(batch[1])
        assert self._meta is not None
        samples, views = self._meta["num_samples"], self._meta["views"]
        if index.shape != view.shape:
            raise IndexError(f"A batch has {index.size} sample indices but {view.size} views.")
        if index.size and index.min() >= 0 and index.max() < samples and view.min() >= 0 and view.max() < views:
            return index * views + view
        bad = (index < 0) | (index >= samples) | (view < 0) | (view >= views)
        if bad.any():
            raise IndexError(
                f"Sample index/view out of the cache's range ({samples} samples x {views} views): index "
                f"{index[bad][:5].tolist()}, view {view[bad][:5].tolist()}."
            )
        return index * views + view

    def filled(self, rows: np.ndarray) -> np.ndarray:
        """Which of ``rows`` are stored."""
        return self._views["filled"][rows].astype(bool)

    def store(self, rows: np.ndarray, logits: Tensor) -> None:
        """Encode the teacher's logits ``(B, C)`` and write the rows: data, then checksum, then the filled flag.

        Only finite rows are stored, so every row read back (its checksum verified) is finite without a check.

        Raises:
            FloatingPointError: If an encoded row holds NaN or inf: the teacher's logits did, or exceed float16's
                range (about 65504).
        """
        with np.errstate(over="ignore"):  # an overflow to inf is refused just below, with the reason
            parts = self._encode(logits)
        finite = np.logical_and.reduce([np.isfinite(p).reshape(len(rows), -1).all(axis=1) for p in parts.values()])
        if not finite.all():
            values = logits.detach().float()
            raise FloatingPointError(
                f"Teacher cache {str(self.path)!r}: the teacher's outputs for {int((~finite).sum())} of {len(rows)} "
                f"samples are not finite once stored as float16 (rows {rows[~finite][:5].tolist()}; the logits hold "
                f"{int(values.isnan().sum())} NaN, {int(values.isinf().sum())} inf, largest |logit| "
                f"{float(values.nan_to_num(nan=0.0).abs().max()):.4g}). HINT: check the teacher and its precision; "
                "float16 holds at most 65504 (for larger logits pass `TeacherCache(..., top_k=k)`)."
            )
        for name, part in parts.items():
            self._arrays[name][rows] = part
        self._arrays["crc"][rows] = _crc(parts)
        self._arrays["filled"][rows] = 1

    def load(self, rows: np.ndarray, device: torch.device) -> TeacherOutputs:
        """Read stored rows (checksums verified) and return them as teacher outputs on ``device``.

        Raises:
            ValueError: If a row's checksum does not match (a corrupted or torn row).
        """
        views = self._views
        names = ("values",) if self.top_k is None else ("values", "indices", "tail")
        parts = {name: views[name][rows] for name in names}
        bad = _crc(parts) != views["crc"][rows]
        if bad.any():
            raise ValueError(
                f"Teacher cache {str(self.path)!r}: rows {rows[bad][:5].tolist()} fail their checksum (corrupted "
                "files). HINT: delete the cache directory, or pass `on_mismatch='rebuild'` after deleting meta.json."
            )
        return self._decode(parts, device)

    def encode_decode(self, logits: Tensor) -> TeacherOutputs:
        """What a stored-then-loaded copy of ``logits`` reads as (the same rounding as the cache)."""
        return self._decode({k: np.asarray(v) for k, v in self._encode(logits).items()}, logits.device)

    def _encode(self, logits: Tensor) -> dict[str, np.ndarray]:
        if self.top_k is None:
            return {"values": logits.detach().float().cpu().numpy().astype(np.float16)}
        assert self._meta is not None
        values, indices, tail = topk_log_probs(logits.detach(), self.top_k, self._meta["temperature"])
        index_dtype = _layout(self._meta)["indices"][1]
        return {
            "values": values.cpu().numpy().astype(np.float16),
            "indices": indices.cpu().numpy().astype(index_dtype),
            "tail": tail.cpu().numpy().astype(np.float32),
        }

    def _decode(self, parts: dict[str, np.ndarray], device: torch.device) -> TeacherOutputs:
        values = torch.from_numpy(parts["values"].astype(np.float32)).to(device)
        if self.top_k is None:
            return TeacherOutputs(logits=values)
        assert self._meta is not None
        indices = torch.from_numpy(parts["indices"].astype(np.int64)).to(device)
        tail = torch.from_numpy(parts["tail"]).to(device)
        rest = max(self._meta["num_classes"] - self.top_k, 1)
        spread = torch.log((tail / rest).clamp(min=1e-30)).unsqueeze(-1)
        dense = spread.expand(-1, self._meta["num_classes"]).clone().scatter(-1, indices, values)
        topk = TopKTeacher(values=values, indices=indices, tail=tail, temperature=float(self._meta["temperature"]))
        return TeacherOutputs(logits=dense, topk=topk)

    def outputs(self, rows: np.ndarray, run: Callable[[], Tensor], epoch: int, device: torch.device) -> TeacherOutputs:
        """The teacher outputs of a batch: read when every row is stored, else ``run()`` the teacher and store them.

        Either way the outputs are the cache's rounding of the teacher's (float16 logits, or top-k), so the
        objective is the same in every epoch. The first fully cached batch of each epoch is also compared with a
        fresh teacher run when ``verify``.
        """
        if self._views["filled"][rows].all():
            stored = self.load(rows, device)
            if self.verify and self._verified_epoch != epoch:
                self._check_fresh(stored, run(), epoch)
            return stored
        logits = run()
        self.teacher_runs += 1
        self.store(rows, logits)
        return self.encode_decode(logits)

    def _check_fresh(self, stored: TeacherOutputs, fresh_logits: Tensor, epoch: int) -> None:
        """Raise if the stored outputs of a batch differ from the teacher's on the same inputs (stale entries)."""
        self._verified_epoch = epoch
        expected = self.encode_decode(fresh_logits)
        same_top1, got, want = True, stored.logits, expected.logits
        if stored.topk is not None and expected.topk is not None:
            same_top1 = bool(torch.equal(stored.topk.indices[:, 0], expected.topk.indices[:, 0]))
            got, want = stored.topk.values, expected.topk.values
        if not same_top1 or not torch.allclose(got, want, atol=2e-2, rtol=1e-2):
            diff = float((got - want).abs().max())
            raise RuntimeError(
                f"Cached teacher outputs no longer match the teacher on the same samples (max difference {diff:.3g} at "
                f"epoch {epoch}): the inputs changed since they were cached. A random augmentation must draw from "
                "the generator `IndexedDataset(augment=fn(sample, generator), views=K)` gives it, so that each "
                "(sample, view) is the same every epoch. HINT: or turn the cache off for this data."
            )


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


def _differences(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    return [
        f"{key}: cache {found.get(key)!r}, now {value!r}" for key, value in expected.items() if found.get(key) != value
    ]


def _layout(meta: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    rows = meta["num_samples"] * meta["views"]
    top_k, classes = meta["top_k"], meta["num_classes"]
    layout: dict[str, tuple[tuple[int, ...], str]] = {
        "values": ((rows, classes if top_k is None else top_k), "float16")
    }
    if top_k is not None:
        layout["indices"] = ((rows, top_k), "int16" if classes <= np.iinfo(np.int16).max else "int32")
        layout["tail"] = ((rows,), "float32")
    layout["crc"] = ((rows,), "uint32")
    layout["filled"] = ((rows,), "uint8")
    return layout


def _crc(parts: dict[str, np.ndarray]) -> np.ndarray:
    """CRC-32 of each row over every part's bytes, in a fixed order."""
    count = len(next(iter(parts.values())))
    flat = [np.ascontiguousarray(parts[name]).reshape(count, -1).view(np.uint8) for name in sorted(parts)]
    joined = flat[0] if len(flat) == 1 else np.concatenate(flat, axis=1)
    return np.fromiter(map(zlib.crc32, joined), dtype=np.uint32, count=count)  # each row through its buffer


def _flat_int64(value: Any) -> np.ndarray:
    """A batch's sample indices (or views) as a flat int64 array on the CPU (shared with a CPU tensor, no copy)."""
    if isinstance(value, Tensor):
        if value.device.type != "cpu":
            value = value.cpu()
        return (value if value.dtype is torch.int64 else value.long()).detach().numpy().reshape(-1)
    return np.asarray(value, dtype=np.int64).reshape(-1)
