"""TeacherCache: the teacher's outputs stored once per (sample, view) and read back in later epochs.

The files are described in :mod:`lightning_distill.teacher._cache_files`. A row counts only when its ``filled`` flag
is set, and the flag is written after the row's data, inputs digest and checksum, so a process killed mid-epoch leaves
rows that read as missing (they are filled again on resume), never as valid. Every read row is checked twice: against
its checksum, which covers its row number (a torn, corrupted or moved row raises), and against the digest of the
inputs the teacher would run on now (a row cached for other inputs raises). Files of the wrong size (truncated) and
an unreadable ``meta.json`` are refused when the cache is opened, or rebuilt with ``on_mismatch="rebuild"``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_distill._indexed import sample_rows
from lightning_distill.losses.functional.topk import topk_log_probs
from lightning_distill.teacher._cache_files import (
    DamagedCacheError,
    allocate,
    creation_lock,
    differences,
    is_intact,
    layout,
    map_rows,
    prepare_directory,
    read_meta,
    remove,
    row_checksums,
)
from lightning_distill.teacher._digest import input_digests
from lightning_distill.teacher._runner import TeacherOutputs, TopKTeacher

OnMismatch = Literal["refuse", "rebuild"]


class TeacherCache:
    """Where and how :class:`~lightning_distill.DistillationCallback` caches the teacher's logits.

    ``DistillationCallback(teacher, cache=TeacherCache("runs/cache", top_k=8))``: in the first epoch every batch runs
    the teacher and its logits are written; in later epochs (and later runs with the same teacher and data) batches
    whose samples are all cached never run the teacher. The batches must carry sample identity: wrap the training
    dataset in :class:`~lightning_distill.teacher.IndexedDataset` (or return
    :class:`~lightning_distill.teacher.Indexed` items yourself).

    Every row read is bound to its sample: it is stored with a 64-bit digest of the inputs the teacher ran on and
    read back only when the batch's inputs have the same digest (else a ``RuntimeError`` names the samples), and its
    checksum covers its row number. The cache is made for one teacher: a fingerprint of every byte of its weights.

    Args:
        path: Directory of the cache (created if missing). Under DDP every process on the machine shares it: each
            writes the rows of its own samples.
        top_k: ``None`` stores the full logits in float16 (any divergence, any temperature). An int stores the top-k
            log-probabilities at the module's temperature and the tail mass (``divergence="kl"`` only, constant
            temperature; see :mod:`lightning_distill.losses.functional.topk` for the error bound).
        on_mismatch: What to do when the directory holds a cache for another teacher, dataset size or settings, or a
            damaged one (a truncated file, an unreadable ``meta.json``): ``"refuse"`` (default, raise naming the
            differences or the file) or ``"rebuild"`` (delete the cache's files and start again).
        verify: At the first fully cached batch of every epoch also run the teacher and compare. The inputs and the
            weights are checked anyway; this catches a teacher whose forward changed without its weights (its code,
            precision or device) or that is not deterministic. Costs one teacher forward per epoch.

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
        self._warned_unbound = False

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

    def prepare(self) -> None:
        """Create the cache directory if missing and check that this process can write in it (before any batch).

        Raises:
            OSError: Naming the directory and the operating system's reason (a parent that is a file, no
                permission, a read-only file system).
        """
        prepare_directory(self.path)

    def close(self) -> None:
        """Forget the open files (the next :meth:`open` checks the directory again); filled rows stay on disk."""
        self._meta, self._arrays, self._views = None, {}, {}
        self._verified_epoch = -1

    def open(self, expected: dict[str, Any], create: bool, barrier: Callable[[], None] = lambda: None) -> bool:
        """Open the cache for ``expected`` settings; with ``create`` (rank 0) make, repair or rebuild it first.

        Creation holds the directory's lock file, so fits that open one new cache at once create it one after the
        other (the second opens the first one's cache). An open that raises leaves the cache closed.

        Returns ``False`` when there is no cache yet and ``create`` is false.

        Raises:
            ValueError: If ``top_k`` exceeds the teacher's classes, or an existing cache was made for other settings,
                a file has the wrong size or ``meta.json`` is unreadable, and ``on_mismatch="refuse"``.
            OSError: If the directory cannot be created or written (with ``create``).
        """
        self.close()
        classes = expected.get("num_classes")
        if self.top_k is not None and isinstance(classes, int) and self.top_k > classes:
            raise ValueError(
                f"`TeacherCache(top_k={self.top_k})` keeps more classes than the teacher has ({classes}). HINT: pass "
                f"`top_k` below {classes}, or `top_k=None` to store the full logits."
            )
        failure: Exception | None = None
        if create:
            try:
                self.prepare()
                with creation_lock(self.path):
                    self._create_or_rebuild(expected)
            except Exception as err:  # the other processes wait at the barrier: let them pass, then raise
                failure = err
        barrier()
        if failure is not None:
            raise failure
        found = read_meta(self.path)
        if found is None:
            return False
        found_differences = differences(found, expected)
        if found_differences:
            raise ValueError(
                f"The teacher cache in {str(self.path)!r} was made for other settings: {'; '.join(found_differences)}. "
                "HINT: pass `TeacherCache(..., on_mismatch='rebuild')` to rebuild it, or use another directory."
            )
        arrays = map_rows(self.path, found)
        # plain ndarray views of the same mapped memory: indexing them skips np.memmap's per-result bookkeeping
        self._meta, self._arrays = found, arrays
        self._views = {name: np.asarray(array) for name, array in arrays.items()}
        return True

    def _create_or_rebuild(self, expected: dict[str, Any]) -> None:
        """Under the lock: allocate a missing cache; rebuild a mismatched or damaged one when ``on_mismatch`` says so.

        A cache left as it is (intact and matching, or refused) is checked again by :meth:`open`, which raises.
        """
        try:
            found = read_meta(self.path)
        except DamagedCacheError:
            if self.on_mismatch == "refuse":
                return
            found = None
        if found is not None:
            if differences(found, expected) or not is_intact(self.path, found):
                if self.on_mismatch == "refuse":
                    return
            else:
                return
        remove(self.path)
        allocate(self.path, expected)

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
        assert self._meta is not None
        return sample_rows(batch, self._meta["num_samples"], self._meta["views"], "TeacherCache")

    def filled(self, rows: np.ndarray) -> np.ndarray:
        """Which of ``rows`` are stored."""
        return self._views["filled"][rows].astype(bool)

    def digests(self, inputs: Any, count: int) -> np.ndarray:
        """The ``(count,)`` uint64 digests of a batch's inputs that its rows are stored with and checked against.

        Every tensor of ``inputs`` whose first dimension is the batch's enters (see
        :func:`~lightning_distill.teacher._digest.input_digests`); inputs without one bind no row to its sample (all
        digests 0, with a warning).
        """
        digests = input_digests(inputs, count)
        if digests is not None:
            return digests
        if not self._warned_unbound:
            self._warned_unbound = True
            rank_zero_warn(
                f"Teacher cache {str(self.path)!r}: the teacher's inputs hold no tensor whose first dimension is the "
                f"batch's {count} samples (got {type(inputs).__name__}), so cached rows are not checked against "
                "their samples' inputs. HINT: give the teacher batch-first tensors."
            )
        return np.zeros(count, dtype=np.uint64)

    def store(self, rows: np.ndarray, logits: Tensor, digests: np.ndarray) -> None:
        """Encode the teacher's logits ``(B, C)`` and write the rows: data and digests, checksums, filled flags.

        Only finite rows are stored, so every row read back (its checksum verified) is finite without a check.

        Args:
            rows: The batch's cache rows (:meth:`rows`).
            logits: The teacher's logits for them.
            digests: The digests of the inputs the logits were computed from (:meth:`digests`).

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
        self._arrays["inputs"][rows] = digests
        self._arrays["crc"][rows] = row_checksums(parts, digests, rows)
        self._arrays["filled"][rows] = 1

    def load(self, rows: np.ndarray, device: torch.device, digests: np.ndarray, epoch: int = -1) -> TeacherOutputs:
        """Read stored rows and return them as teacher outputs on ``device``, once each row passed both checks.

        Args:
            rows: The batch's cache rows (:meth:`rows`).
            device: Where the outputs go.
            digests: The digests of the batch's inputs now (:meth:`digests`).
            epoch: The epoch, for the message.

        Raises:
            ValueError: If a row's checksum does not match: a corrupted or torn row, or one moved to another row.
            RuntimeError: If a row was stored for other inputs than the batch's (the inputs changed since).
        """
        views = self._views
        names = ("values",) if self.top_k is None else ("values", "indices", "tail")
        parts = {name: views[name][rows] for name in names}
        stored = views["inputs"][rows]
        bad = row_checksums(parts, stored, rows) != views["crc"][rows]
        if bad.any():
            raise ValueError(
                f"Teacher cache {str(self.path)!r}: rows {rows[bad][:5].tolist()} fail their checksum "
                f"({self._samples(rows[bad])}; it covers each row's data, inputs digest and row number): the cache "
                "files are corrupted, or rows were moved within them. HINT: delete "
                f"{str(self.path / 'meta.json')!r} (the next fit rebuilds the cache), or use another directory."
            )
        changed = stored != digests
        if changed.any():
            raise RuntimeError(
                f"Teacher cache {str(self.path)!r}: the inputs of {int(changed.sum())} of {len(rows)} samples at epoch "
                f"{epoch} ({self._samples(rows[changed])}) are not those their teacher outputs were cached for (the "
                "inputs digests differ): the inputs changed since they were cached. The dataset changed (other "
                "samples at the same indices), or a random augmentation ignores the generator that "
                "`IndexedDataset(augment=fn(sample, generator), views=K)` gives it, or a collator pads a sample "
                "differently in different batches (pad to a fixed length). HINT: for new data rebuild the cache: "
                f"delete {str(self.path / 'meta.json')!r} or use another directory; otherwise make each (sample, view) "
                "the same every epoch, or remove `cache=`."
            )
        return self._decode(parts, device)

    def _samples(self, rows: np.ndarray) -> str:
        """``"sample index [..], view [..]"`` of up to five rows."""
        assert self._meta is not None
        views = self._meta["views"]
        return f"sample index {(rows[:5] // views).tolist()}, view {(rows[:5] % views).tolist()}"

    def encode_decode(self, logits: Tensor) -> TeacherOutputs:
        """What a stored-then-loaded copy of ``logits`` reads as (the same rounding as the cache)."""
        return self._decode({k: np.asarray(v) for k, v in self._encode(logits).items()}, logits.device)

    def _encode(self, logits: Tensor) -> dict[str, np.ndarray]:
        if self.top_k is None:
            return {"values": logits.detach().float().cpu().numpy().astype(np.float16)}
        assert self._meta is not None
        values, indices, tail = topk_log_probs(logits.detach(), self.top_k, self._meta["temperature"])
        index_dtype = layout(self._meta)["indices"][1]
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

    def outputs(
        self,
        rows: np.ndarray,
        run: Callable[[], Tensor],
        epoch: int,
        device: torch.device,
        inputs: Any,
        fingerprint: Callable[[], str] | None = None,
    ) -> TeacherOutputs:
        """The teacher outputs of a batch: read when every row is stored, else ``run()`` the teacher and store them.

        Either way the outputs are the cache's rounding of the teacher's (float16 logits, or top-k), so the
        objective is the same in every epoch. Read rows are checked against their checksums and the digests of
        ``inputs``; the first fully cached batch of each epoch is also compared with a fresh teacher run when
        ``verify``.

        Args:
            rows: The batch's cache rows (:meth:`rows`).
            run: Runs the teacher on the batch and returns its logits ``(B, C)``.
            epoch: The current epoch.
            device: Where the outputs go.
            inputs: What the teacher runs on (a tensor, or a mapping / tuple of tensors).
            fingerprint: Computes the teacher's weights fingerprint now, to name the cause when ``verify`` fails.
        """
        digests = self.digests(inputs, len(rows))
        if self._views["filled"][rows].all():
            stored = self.load(rows, device, digests, epoch)
            if self.verify and self._verified_epoch != epoch:
                self._check_fresh(stored, run(), epoch, fingerprint)
            return stored
        logits = run()
        self.teacher_runs += 1
        self.store(rows, logits, digests)
        return self.encode_decode(logits)

    def _check_fresh(
        self, stored: TeacherOutputs, fresh_logits: Tensor, epoch: int, fingerprint: Callable[[], str] | None
    ) -> None:
        """Raise if the stored outputs of a batch (inputs digests verified) differ from the teacher's now."""
        assert self._meta is not None
        self._verified_epoch = epoch
        expected = self.encode_decode(fresh_logits)
        same_top1, got, want = True, stored.logits, expected.logits
        if stored.topk is not None and expected.topk is not None:
            same_top1 = bool(torch.equal(stored.topk.indices[:, 0], expected.topk.indices[:, 0]))
            got, want = stored.topk.values, expected.topk.values
        if same_top1 and torch.allclose(got, want, atol=2e-2, rtol=1e-2):
            return
        diff = float((got - want).abs().max())
        made_for, now = self._meta["teacher"], None if fingerprint is None else fingerprint()
        if now is not None and now != made_for:
            cause = (
                f"the teacher's weights changed during the fit (fingerprint {made_for!r} when the cache was opened, "
                f"{now!r} now), but a cache holds one teacher's outputs"
            )
        else:
            cause = (
                f"the inputs are those the rows were cached for (their digests match) and the weights those the cache "
                f"was made for (fingerprint {made_for!r}), so the teacher's forward computes something else on the "
                "same inputs: its code, precision or device changed, or it is not deterministic"
            )
        raise RuntimeError(
            f"Teacher cache {str(self.path)!r}: the teacher's outputs on a fully cached batch at epoch {epoch} differ "
            f"from the cached ones (max difference {diff:.3g}): {cause}. HINT: to cache this teacher's outputs, delete "
            f"{str(self.path / 'meta.json')!r} (the next fit rebuilds the cache) or use another directory; a teacher "
            "that changes during training cannot be cached: remove `cache=`."
        )
