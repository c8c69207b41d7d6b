"""TokenCache: a language-model teacher's per-token top-k distributions, written once by a pre-pass, read by fits.

The layout is in :mod:`lightning_distill.teacher._token_files`, the 8-bit encoding and its error bound in
:mod:`lightning_distill.teacher._token_codec`. A row (one sample and view) counts only once its ``filled`` flag is
set, after its tokens, inputs digest and checksum, so a pre-pass killed at any point leaves rows that read as missing
(the next pre-pass writes them), never as valid. Every row read is checked against its checksum (covering its row
number: a torn, corrupted or moved row raises) and against the digest of the inputs the student's batch gives the
teacher now (a row written for other inputs raises).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from lightning_distill._indexed import sample_rows
from lightning_distill.teacher._cache_files import DamagedCacheError, prepare_directory
from lightning_distill.teacher._digest import input_digests
from lightning_distill.teacher._runner import TopKTeacher
from lightning_distill.teacher._token_codec import decode_tokens, encode_tokens, token_dtype
from lightning_distill.teacher._token_files import (
    FORMAT,
    SAMPLE_DTYPE,
    create_shard,
    differences,
    map_samples,
    map_tokens,
    open_tokens_for_append,
    read_shard_meta,
    remove_shard,
    row_checksum,
    row_heads,
    shard_dirs,
    writer_lock,
)

ENCODE_TOKENS = 4096
"""Positions the pre-pass encodes at once (their float32 softmaxes over the vocabulary are alive together)."""
_MISSING_HINT = (
    "HINT: run the pre-pass (`lightning-distill cache --config ...`, or `Trainer.predict(TokenCachePass(teacher, "
    "cache), dataloaders=...)`) over this training set: it writes only the rows that are missing."
)


class MissingRowsError(KeyError):
    """Rows a fit reads that the pre-pass has not written (a ``KeyError`` whose message prints as it is)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def token_digests(inputs: Any, count: int) -> np.ndarray:
    """The inputs digests of a batch's samples with their padding left out, so any padding id and length agree.

    Positions whose ``attention_mask`` is 0 are zeroed in every tensor of the inputs with the mask's ``(B, L)``
    leading shape (``decoder_*`` tensors by ``decoder_attention_mask``), and trailing zeros do not change a digest
    (:func:`~lightning_distill.teacher._digest.input_digests`): a sample padded to another length, or with another
    padding id, by a collator that pads each batch to its longest sequence gets the same digest.

    Example::

        >>> ids = torch.tensor([[5, 6, 7, 7]])  # padded with 7 (GPT-2 pads with its end-of-text token)
        >>> a = token_digests({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 0, 0]])}, 1)
        >>> b = token_digests({"input_ids": ids[:, :2], "attention_mask": torch.tensor([[1, 1]])}, 1)
        >>> bool(a == b)
        True

    Raises:
        ValueError: If no tensor of the inputs has the batch's ``count`` samples first (nothing to bind a row to).
    """
    if isinstance(inputs, Mapping):
        inputs = _padding_zeroed(inputs)
    digests = input_digests(inputs, count)
    if digests is None:
        raise ValueError(
            "TokenCache binds each row to its sample's inputs, but the teacher's inputs hold no tensor whose first "
            f"dimension is the batch's {count} samples (got {type(inputs).__name__}). HINT: give the teacher "
            "batch-first tensors, in the pre-pass and in the fit."
        )
    return digests


def _padding_zeroed(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """``inputs`` with every position whose attention mask is 0 zeroed (see :func:`token_digests`)."""
    masks = {side: inputs.get(f"{side}attention_mask") for side in ("", "decoder_")}
    padded = {}
    for key, value in inputs.items():
        mask = masks["decoder_" if str(key).startswith("decoder_") else ""]
        if isinstance(value, Tensor) and isinstance(mask, Tensor) and mask.ndim == 2 and value.shape[:2] == mask.shape:
            value = value.masked_fill((mask == 0).reshape(*mask.shape, *([1] * (value.ndim - 2))), 0)
        padded[key] = value
    return padded


def token_cache_settings(
    fingerprint: str,
    num_samples: int,
    views: int,
    vocab: int,
    top_k: int,
    temperature: float,
    shift_labels: bool,
    ignore_index: int,
) -> dict[str, Any]:
    """The settings a token cache's shard is written for (its ``meta.json``)."""
    return {
        "format": FORMAT,
        "teacher": fingerprint,
        "num_samples": int(num_samples),
        "views": int(views),
        "vocab": int(vocab),
        "top_k": int(top_k),
        "temperature": float(temperature),
        "shift_labels": bool(shift_labels),
        "ignore_index": int(ignore_index),
    }


class TokenCache:
    """A language-model teacher's per-token top-k log-probabilities on disk, at about 58 bytes a token (k = 16).

    Written once by the pre-pass (:class:`~lightning_distill.TokenCachePass` under ``Trainer.predict``, or
    ``lightning-distill cache --config ...``), one shard per process; read by
    :class:`~lightning_distill.CachedTeacher`, so a fit never loads the teacher. Per stored token: its position, the
    k class indices (uint8/uint16/uint32, the narrowest the vocabulary needs), their log-probabilities on 8 bits with
    a float16 top and step, and the float16 log of the tail mass (see
    :mod:`~lightning_distill.teacher._token_codec` for the error bound); per sample 25 bytes (offset, count, inputs
    digest, checksum, flag). Only the positions the loss counts are stored: padding and ``ignore_index`` labels are
    not.

    The batches must carry sample identity: wrap the training dataset in
    :class:`~lightning_distill.IndexedDataset`.

    Args:
        path: The cache's directory (created if missing); under DDP every process must see it.
        top_k: Classes kept per token (``>= 1``; at most the vocabulary).
        on_mismatch: What the pre-pass does with shards written for another teacher or other settings:
            ``"refuse"`` (default: raise naming the differences) or ``"rebuild"`` (delete them and write anew).

    Raises:
        ValueError: For a bad ``top_k`` or ``on_mismatch``.

    Example::

        >>> cache = TokenCache("runs/token-cache", top_k=16)
        >>> cache.bytes_per_token(vocab=50257)
        58
    """

    def __init__(self, path: str | Path, *, top_k: int = 16, on_mismatch: str = "refuse") -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"`top_k` must be an int >= 1, got {top_k!r}.")
        if on_mismatch not in ("refuse", "rebuild"):
            raise ValueError(f"`on_mismatch` must be 'refuse' or 'rebuild', got {on_mismatch!r}.")
        self.path = Path(path)
        self.top_k = top_k
        self.on_mismatch = on_mismatch
        self._meta: dict[str, Any] | None = None
        # writing: this process's shard
        self._shard: Path | None = None
        self._samples: np.memmap | None = None
        self._tokens_file: IO[bytes] | None = None
        self._lock: contextlib.ExitStack | None = None  # holds the shard's writer lock
        self._end = 0
        self._done: np.ndarray | None = None  # rows stored in any shard, as seen when the writer opened
        # reading: every shard
        self._table: dict[str, np.ndarray] | None = None  # each field of the rows' records, a plain array
        self._table_shard: np.ndarray | None = None
        self._tokens: list[np.ndarray] = []  # per shard: its stored tokens as (tokens, record bytes) uint8

    def __repr__(self) -> str:
        return f"TokenCache({str(self.path)!r}, top_k={self.top_k}, on_mismatch={self.on_mismatch!r})"

    def _require(self, name: str, call: str) -> Any:
        """The open state ``name``, or a ``RuntimeError`` naming the call that opens it."""
        value = getattr(self, name)
        if value is None:
            raise RuntimeError(f"{self!r} is not open for this: call `{call}` first (or `close()` was called).")
        return value

    def __getstate__(self) -> dict[str, Any]:
        """The cache's settings only: open files, maps and locks stay with their process (reopened where needed)."""
        return {"path": self.path, "top_k": self.top_k, "on_mismatch": self.on_mismatch}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], top_k=state["top_k"], on_mismatch=state["on_mismatch"])  # type: ignore[misc]

    def bytes_per_token(self, vocab: int) -> int:
        """Bytes of one stored token for a vocabulary (the 25 bytes per sample come on top)."""
        return token_dtype(self.top_k, vocab).itemsize

    @property
    def settings(self) -> dict[str, Any] | None:
        """The settings of the open cache (its shards' ``meta.json``), or ``None`` when it is not open."""
        return None if self._meta is None else dict(self._meta)

    # --------------------------------------------------------------------------------------------------- writing
    def open_writer(self, settings: dict[str, Any], rank: int, world_size: int = 1) -> None:
        """Open (or create) the shard of global rank ``rank`` for ``settings``, and learn which rows are stored.

        Shards written for other settings, or damaged (an unreadable ``meta.json``, a ``samples.bin`` of the wrong
        size), are refused, or deleted and written anew with ``on_mismatch="rebuild"``: each process deletes only
        its own shard, and rank 0 those of ranks beyond ``world_size`` (left by a pass with more processes), so no
        process deletes a shard another one is writing. A shard without settings (a writer killed before its first
        row) is written anew. The rows stored in any matching shard are not written again.

        Raises:
            ValueError: If a shard was written for other settings or is damaged, and ``on_mismatch="refuse"``.
            RuntimeError: If another process writes this rank's shard now.
            OSError: If the directory cannot be created or written.
        """
        if settings["top_k"] > settings["vocab"]:
            raise ValueError(
                f"`TokenCache(top_k={self.top_k})` keeps more classes than the teacher's vocabulary "
                f"({settings['vocab']}). HINT: pass `top_k` below {settings['vocab']}."
            )
        self.close()
        prepare_directory(self.path)
        shard = self.path / f"shard-{rank:05d}"
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(writer_lock(shard))
        try:
            done = np.zeros(settings["num_samples"] * settings["views"], dtype=bool)
            for other in shard_dirs(self.path):
                mine = other == shard or (rank == 0 and _shard_rank(other) >= world_size)
                filled = self._stored_rows(other, settings, rebuild=mine and self.on_mismatch == "rebuild")
                if filled is None and mine:
                    remove_shard(other, keep_lock=other == shard)
                elif filled is not None and other != shard:
                    done |= filled
            if read_shard_meta(shard) is None:
                create_shard(shard, settings)
            self._samples = map_samples(shard, settings, "r+")
            done |= np.asarray(self._samples["filled"]) == 1
            itemsize = token_dtype(settings["top_k"], settings["vocab"]).itemsize
            self._tokens_file = open_tokens_for_append(shard, np.asarray(self._samples), itemsize)
            self._end = self._tokens_file.tell() // itemsize
        except BaseException:
            self.close()
            raise
        self._meta, self._shard, self._done = settings, shard, done

    def _stored_rows(self, shard: Path, settings: dict[str, Any], rebuild: bool) -> np.ndarray | None:
        """The rows a shard holds for ``settings``; ``None`` for a shard to write anew (or another's, to leave).

        Raises:
            ValueError: For a shard of other settings, or a damaged one, unless it is to be rebuilt or to be left
                (``on_mismatch="rebuild"``: its own process rebuilds it).
        """
        try:
            found = read_shard_meta(shard)
            if found is None:
                return None
            if differences(found, settings):
                if self.on_mismatch == "refuse":
                    raise ValueError(_mismatch_message(self.path, shard, found, settings))
                return None
            return np.asarray(map_samples(shard, found, "r")["filled"]) == 1
        except DamagedCacheError:
            if rebuild or self.on_mismatch == "rebuild":
                return None
            raise
        except FileNotFoundError:  # deleted by its own process while this one looked
            return None

    def missing(self, rows: np.ndarray) -> np.ndarray:
        """Which of ``rows`` no shard held when the writer opened, nor this writer has written since."""
        done: np.ndarray = self._require("_done", "open_writer(settings, rank)")
        return ~done[rows]

    def write(self, rows: np.ndarray, logits: Tensor, counted: Tensor, digests: np.ndarray) -> int:
        """Encode and append the counted positions of per-token logits ``(B, L, V)``; returns the tokens written.

        Rows already stored (:meth:`missing` is false) are left as they are. The logits are encoded
        :data:`ENCODE_TOKENS` positions at a time, so the pass never holds more than that many ``(V,)`` float32
        softmaxes at once, and no copy of the batch's logits.

        Args:
            rows: The ``B`` rows of the batch (:meth:`rows`).
            logits: The teacher's logits for them.
            counted: Bool ``(B, L)``: the positions to store (those the loss counts).
            digests: The ``(B,)`` digests of the inputs the teacher ran on.

        Raises:
            FloatingPointError: If a stored position's logits hold NaN or +inf or are all -inf.
        """
        self._require("_tokens_file", "open_writer(settings, rank)")
        assert self._meta is not None and self._samples is not None and self._tokens_file is not None
        meta = self._meta
        new = self.missing(rows)
        if not new.any():
            return 0
        counted = counted & torch.from_numpy(new).to(counted.device).unsqueeze(-1)
        rows, digests = rows[new], digests[new]
        counts = counted.sum(-1).cpu().numpy().astype(np.int64)[new]
        records = np.empty(int(counts.sum()), dtype=token_dtype(meta["top_k"], meta["vocab"]))
        where = counted.nonzero()
        records["position"] = where[:, 1].cpu().numpy()
        for start in range(0, len(records), ENCODE_TOKENS):
            part = where[start : start + ENCODE_TOKENS]
            fields = encode_tokens(logits[part[:, 0], part[:, 1]], meta["top_k"], meta["temperature"])
            for name, value in fields.items():
                records[name][start : start + ENCODE_TOKENS] = value
        self._tokens_file.write(records.tobytes())
        self._tokens_file.flush()
        ends = np.cumsum(counts)
        starts = ends - counts
        entries = np.zeros(len(rows), dtype=SAMPLE_DTYPE)
        entries["offset"] = self._end + starts
        entries["count"] = counts
        entries["digest"] = digests
        data, size, heads = records.view(np.uint8).data, records.dtype.itemsize, row_heads(digests, rows)
        entries["crc"] = [
            row_checksum(heads[i], data[a * size : b * size])
            for i, (a, b) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True))
        ]
        self._samples[rows] = entries  # filled 0: the flag comes last
        self._samples["filled"][rows] = 1
        self._end += len(records)
        assert self._done is not None
        self._done[rows] = True
        return len(records)

    def close(self) -> None:
        """Flush and close the writer and forget what was read (the files stay)."""
        if self._samples is not None:
            self._samples.flush()
        if self._tokens_file is not None:
            self._tokens_file.close()
        if self._lock is not None:
            self._lock.close()
        self._meta = self._shard = self._samples = self._tokens_file = self._lock = self._done = None
        self._table = self._table_shard = None
        self._tokens = []

    # --------------------------------------------------------------------------------------------------- reading
    def open_reader(self, expected: dict[str, Any]) -> dict[str, Any]:
        """Open every shard for reading; they must agree with each other and with ``expected``; return the settings.

        Args:
            expected: Settings the fit knows (``num_samples``, ``views``, ``shift_labels``, ``ignore_index``, ...);
                the teacher's fingerprint is taken from the shards (a fit from the cache has no teacher).

        Raises:
            FileNotFoundError: If the directory holds no shard.
            ValueError: If shards disagree with each other (two teachers) or with ``expected``.
        """
        self.close()
        found = [(shard, read_shard_meta(shard)) for shard in shard_dirs(self.path)]
        shards = [(shard, meta) for shard, meta in found if meta is not None]
        if not shards:
            raise FileNotFoundError(f"Token cache {str(self.path)!r} holds no shard. {_MISSING_HINT}")
        first_shard, meta = shards[0]
        for shard, other in shards[1:]:
            if differences(other, meta):
                raise ValueError(
                    f"Token cache {str(self.path)!r}: its shards were written for different settings ("
                    f"{shard.name} vs {first_shard.name}: {'; '.join(differences(other, meta))}). HINT: delete the "
                    "cache directory and run the pre-pass again, or pass `TokenCache(..., on_mismatch='rebuild')` "
                    "to the pre-pass."
                )
        wanted = {"top_k": self.top_k, **expected}
        if differences(meta, wanted):
            raise ValueError(_mismatch_message(self.path, first_shard, meta, wanted))
        table = np.zeros(meta["num_samples"] * meta["views"], dtype=SAMPLE_DTYPE)
        owner = np.full(len(table), -1, dtype=np.int32)
        for number, (shard, shard_meta) in enumerate(shards):
            samples = np.asarray(map_samples(shard, shard_meta, "r"))
            take = (samples["filled"] == 1) & (owner < 0)
            table[take], owner[take] = samples[take], number
            tokens = np.asarray(map_tokens(shard, shard_meta))
            self._tokens.append(tokens.view(np.uint8).reshape(len(tokens), tokens.dtype.itemsize))  # rows of bytes
        self._meta, self._table_shard = meta, owner
        self._table = {name: np.ascontiguousarray(table[name]) for name in ("offset", "count", "digest", "crc")}
        return dict(meta)

    def stored_fraction(self) -> float:
        """Fraction of rows stored (reader open)."""
        self._require("_table_shard", "open_reader(expected)")
        assert self._table_shard is not None
        return float((self._table_shard >= 0).mean())

    def stored_tokens(self) -> int:
        """Tokens stored over every row (reader open)."""
        self._require("_table", "open_reader(expected)")
        assert self._table is not None
        return int(self._table["count"].sum())

    def load(self, rows: np.ndarray, digests: np.ndarray, device: torch.device) -> TopKTeacher:
        """The stored distributions of ``rows`` as a token-level :class:`TopKTeacher` (rows checked first).

        Raises:
            KeyError: If a row is not stored (the pre-pass did not reach it).
            ValueError: If a row fails its checksum (corrupted, torn, or moved).
            RuntimeError: If a row was written for other inputs than ``digests`` (the data changed since).
        """
        self._require("_table", "open_reader(expected)")
        assert self._table is not None and self._table_shard is not None and self._meta is not None
        owner = self._table_shard[rows]
        if (owner < 0).any():
            absent = rows[owner < 0]
            raise MissingRowsError(
                f"Token cache {str(self.path)!r} holds no teacher distributions for {len(absent)} of {len(rows)} "
                f"samples of this batch ({_describe_rows(absent, self._meta['views'])}). {_MISSING_HINT}"
            )
        entries = {name: values[rows] for name, values in self._table.items()}
        records, bad = self._gather(rows, owner, entries)
        if bad.any():
            raise ValueError(
                f"Token cache {str(self.path)!r}: rows {rows[bad][:5].tolist()} fail their checksum "
                f"({_describe_rows(rows[bad], self._meta['views'])}; it covers each row's tokens, inputs digest "
                "and row number): the files are corrupted or truncated, or rows were moved within them. HINT: delete "
                "the cache directory and run the pre-pass again."
            )
        changed = entries["digest"] != digests
        if changed.any():
            raise RuntimeError(
                f"Token cache {str(self.path)!r}: the inputs of {int(changed.sum())} of {len(rows)} samples "
                f"({_describe_rows(rows[changed], self._meta['views'])}) are not those the teacher's distributions "
                "were cached for (the inputs digests differ): the dataset changed since the pre-pass, or a collator "
                "pads a sample differently (pad on the right, with zeros, or to a fixed length). HINT: run the "
                "pre-pass again into a new directory (or with `on_mismatch='rebuild'` after deleting this one)."
            )
        values, indices, tail = decode_tokens(records, device)
        where = np.empty((len(records), 2), dtype=np.int64)  # (row of the batch, position) of every token
        where[:, 0] = np.repeat(np.arange(len(rows)), entries["count"].astype(np.int64))
        where[:, 1] = records["position"]
        return TopKTeacher(
            values=values,
            indices=indices,
            tail=tail,
            temperature=float(self._meta["temperature"]),
            positions=torch.from_numpy(where).to(device),
            num_classes=int(self._meta["vocab"]),
        )

    def _gather(
        self, rows: np.ndarray, owner: np.ndarray, entries: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The rows' stored tokens, concatenated in row order (one gather per shard), and which rows fail their CRC."""
        counts = entries["count"].astype(np.int64)
        ends = np.cumsum(counts)
        starts = ends - counts
        size = self._tokens[0].shape[1]
        raw = np.empty((int(ends[-1]) if len(ends) else 0, size), dtype=np.uint8)  # the records' bytes, row by row
        bad = np.zeros(len(rows), dtype=bool)
        for shard in np.unique(owner):
            tokens, mine = self._tokens[int(shard)], owner == shard
            bad |= mine & (entries["offset"] + counts > len(tokens))  # past the end of a truncated tokens.bin
            take = mine & ~bad
            # a row's tokens are contiguous on both sides: token j of row i is at offset_i + j in the shard and at
            # start_i + j in the batch; `within` is j for every token of the taken rows, in order
            n = counts[take]
            within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
            raw[np.repeat(starts[take], n) + within] = np.take(
                tokens, np.repeat(entries["offset"][take], n) + within, 0
            )
        data, heads = raw.reshape(-1).data, row_heads(entries["digest"], rows)
        stored = entries["crc"].tolist()
        for i, (start, end) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
            bad[i] |= row_checksum(heads[i], data[start * size : end * size]) != stored[i]
        assert self._meta is not None
        return raw.view(token_dtype(self._meta["top_k"], self._meta["vocab"])).reshape(-1), bad

    # --------------------------------------------------------------------------------------------------- batches
    def rows(self, batch: Any, num_samples: int, views: int, owner: str = "TokenCache") -> np.ndarray:
        """The rows (``index * views + view``) of a batch's samples (``owner``: who asks, for the message).

        Raises:
            TypeError: If the batch carries no sample identity.
            IndexError: If an index or view is out of range.
        """
        return sample_rows(batch, num_samples, views, owner)


def _shard_rank(shard: Path) -> int:
    """The rank in a shard directory's name (``shard-00003``: 3)."""
    return int(shard.name.removeprefix("shard-"))


def _describe_rows(rows: np.ndarray, views: int) -> str:
    return f"sample index {(rows[:5] // views).tolist()}, view {(rows[:5] % views).tolist()}"


def _mismatch_message(path: Path, shard: Path, found: dict[str, Any], expected: dict[str, Any]) -> str:
    return (
        f"Token cache {str(path)!r} ({shard.name}) was written for other settings: "
        f"{'; '.join(differences(found, expected))}. HINT: write it again with `TokenCache(..., "
        "on_mismatch='rebuild')` in the pre-pass, or use another directory."
    )
