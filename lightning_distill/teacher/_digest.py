"""Digests that bind a teacher cache to its teacher, and each cached row to its sample's inputs.

:func:`teacher_weights_fingerprint` hashes every byte of the teacher's parameters and buffers (the cache is made for
one teacher); :func:`input_digests` gives each sample of a batch a 64-bit digest of the inputs the teacher runs on
(each row is stored for one sample's inputs, and read back only for the same inputs).
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

# A sample's input words w_j (its tensors' bytes as uint8 words for 1-byte elements, else as int16 words) reduce to
# two sums  S = sum_j w_j * c_j  with fixed pseudo-random coefficients c_j in [1, 2**20) that depend on the position j
# alone, one float64 matrix product per batch. Every product and partial sum is an integer below 2**53 (at most
# _CHUNK words at once), so the sums are exact in any order: a digest is the same on every device, BLAS, thread count
# and library version. The two sums are reduced modulo the two largest primes below 2**32 (32 bits each). A change of
# one word always changes them; trailing zeros (zero padding) leave them as they are.
_PRIMES = np.array([4294967291, 4294967279], dtype=np.int64)
_CHUNK = 1 << 17  # words per sample in one product: |w * c| < 2**35, so a sum of 2**17 of them stays below 2**53
_SCRATCH = 1 << 22  # float64 elements converted at once: bounds the scratch memory of large inputs
_WORDS = {1: torch.uint8}  # element size -> word dtype; 2 bytes and more: int16 words

_table = np.zeros((0, 2), dtype=np.float64)  # the coefficients of positions 0..len-1, grown on demand
_device_tables: dict[tuple[str, int | None], Tensor] = {}
_device_primes: dict[tuple[str, int | None], Tensor] = {}


def teacher_weights_fingerprint(teacher: nn.Module, logits_layer: str | None = None) -> str:
    """A hash of every parameter and buffer of the teacher, all their bytes, and the logits layer.

    Each tensor's name, shape, dtype and every byte of its values enter a SHA-256 (non-persistent buffers too, such
    as input normalization), so any change of any weight gives another fingerprint. The cost is one pass over the
    weights (copied to the CPU one tensor at a time): about 0.02 s for a 10-million-parameter float32 teacher (40 MB)
    on a 2-core virtual machine (measured with a ``Linear(3162, 3162)``; SHA-256 runs at about 1.8 GB/s there), paid
    at most once per fit (see :attr:`lightning_distill.DistillationCallback.fingerprint`).

    Args:
        teacher: The teacher, as it runs (after its precision conversion: its dtype is part of the fingerprint).
        logits_layer: The layer whose output are the logits, if not the teacher's output.

    Returns:
        32 hexadecimal digits.

    Example::

        >>> a = nn.Linear(3000, 2)
        >>> b = nn.Linear(3000, 2)
        >>> b.load_state_dict(a.state_dict())
        <All keys matched successfully>
        >>> with torch.no_grad():
        ...     b.weight[1, 2999] += 1e-6  # one value, which a sampled fingerprint would miss
        >>> teacher_weights_fingerprint(a) == teacher_weights_fingerprint(b)
        False
    """
    digest = hashlib.sha256(f"logits_layer={logits_layer!r}".encode())
    named: list[tuple[str, Tensor]] = [("parameter " + n, p) for n, p in teacher.named_parameters()]
    named += [("buffer " + n, b) for n, b in teacher.named_buffers()]
    for name, tensor in named:
        value = tensor.detach()
        digest.update(f"\0{name}\0{tuple(value.shape)}\0{value.dtype}\0".encode())
        digest.update(_tensor_bytes(value))
    return digest.hexdigest()[:32]


def _tensor_bytes(value: Tensor) -> bytes | memoryview:
    """Every byte of a tensor's values, in a fixed order (a view of a CPU copy)."""
    full = getattr(value, "full_tensor", None)  # a DTensor shard: the whole tensor (every process calls this)
    if callable(full):
        value = full()
    if value.device.type == "meta":
        return b"meta"
    if value.layout is not torch.strided:
        value = value.to_dense()
    if value.is_quantized:
        value = value.dequantize()
    flat = value.cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data if flat.numel() else b""  # a view, no copy


def input_digests(inputs: Any, count: int) -> np.ndarray | None:
    """A 64-bit digest of each sample's inputs: every tensor whose first dimension is the ``count`` samples.

    The tensors of a mapping are taken by sorted key, those of a tuple or list in order (nested alike); each enters
    with a weight derived from its key, so the same values under another key give another digest. Tensors without the
    batch's leading dimension and other values (strings, numbers) are not part of it. Computed on the tensors' device
    in a handful of vectorized operations over the batch (no loop over samples), then ``count`` values are copied to
    the CPU.

    Args:
        inputs: What the teacher runs on: a tensor, or a mapping / tuple / list of them.
        count: The number of samples (the batch's rows in the cache).

    Returns:
        ``(count,)`` uint64 digests, or ``None`` when no tensor has the batch's leading dimension.

    Example::

        >>> x = torch.arange(12.0).reshape(3, 4)
        >>> d = input_digests({"x": x}, 3)
        >>> y = x.clone()
        >>> y[1, 2] += 1
        >>> (d == input_digests({"x": y}, 3)).tolist(), bool((d == input_digests({"z": x}, 3)).any())
        ([True, False, True], False)
    """
    total: np.ndarray | None = None
    leaves = 0
    for key, tensor in [("", inputs)] if isinstance(inputs, Tensor) else _leaves(inputs, ""):
        if tensor.ndim == 0 or tensor.shape[0] != count:
            continue
        residues = _residues(tensor.detach(), count)
        if key:  # a weight in [1, 2**31) from the key: its products with residues fit in int64
            residues = residues * ((zlib.crc32(key.encode()) >> 1) | 1) % _PRIMES
        total = residues if total is None else total + residues
        leaves += 1
    if total is None:
        return None
    if leaves > 1:
        total %= _PRIMES
    return total.astype(np.uint32).view(np.uint64).reshape(count)  # the two 32-bit residues side by side


def _leaves(value: Any, key: str) -> Iterator[tuple[str, Tensor]]:
    """The tensors in ``value`` with their keys (``"input_ids"``, ``"0"``, ``"a.b"``), in a fixed order."""
    if isinstance(value, Tensor):
        yield key, value
    elif isinstance(value, Mapping):
        for name in sorted(value, key=str):
            yield from _leaves(value[name], f"{key}.{name}" if key else str(name))
    elif isinstance(value, (tuple, list)):
        for position, item in enumerate(value):
            yield from _leaves(item, f"{key}.{position}" if key else str(position))


def _words(tensor: Tensor, count: int) -> Tensor:
    """The tensor's bytes per sample as ``(count, words)`` integers (a view when the tensor is contiguous)."""
    flat = tensor.reshape(count, -1)
    if flat.dtype is torch.bool:
        flat = flat.view(torch.uint8)
    word = _WORDS.get(flat.element_size(), torch.int16)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    return flat if flat.dtype is word else flat.view(word)


def _residues(tensor: Tensor, count: int) -> np.ndarray:
    """``(count, 2)`` int64: each sample's two sums of words times coefficients, modulo the primes (module notes)."""
    words = _words(tensor, count)
    if words.device.type == "mps":  # no float64 there
        words = words.cpu()
    if words.device.type == "cpu":
        return _residues_numpy(words.numpy(), count)
    return _residues_torch(words, count)


def _step(count: int) -> int:
    return max(1, min(_CHUNK, _SCRATCH // max(count, 1)))


def _residues_numpy(words: np.ndarray, count: int) -> np.ndarray:
    """:func:`_residues` of CPU words in NumPy (fewer microseconds per call than torch)."""
    width, step = words.shape[1], _step(count)
    table = _coefficients(width)
    if width <= step:  # one product (the usual case)
        return (words.astype(np.float64) @ table).astype(np.int64) % _PRIMES
    total = np.zeros((count, 2), dtype=np.int64)
    for start in range(0, width, step):
        sums = words[:, start : start + step].astype(np.float64) @ table[start : start + step]
        total = (total + sums.astype(np.int64)) % _PRIMES
    return total


def _residues_torch(words: Tensor, count: int) -> np.ndarray:
    """:func:`_residues` on the words' device; only ``(count, 2)`` values are copied to the CPU."""
    width, step = words.shape[1], _step(count)
    _coefficients(width)
    place = (words.device.type, words.device.index)
    if place not in _device_tables or len(_device_tables[place]) < width:
        _device_tables[place] = torch.from_numpy(_table).to(words.device)
        _device_primes[place] = torch.from_numpy(_PRIMES).to(words.device)
    table, primes = _device_tables[place], _device_primes[place]
    total = torch.zeros((count, 2), dtype=torch.int64, device=words.device)
    for start in range(0, width, step):
        end = min(start + step, width)
        sums = words[:, start:end].to(torch.float64) @ table[start:end]
        total = (total + sums.to(torch.int64)).remainder_(primes)
    return total.cpu().numpy()


def _coefficients(width: int) -> np.ndarray:
    """The ``(width, 2)`` float64 coefficients of positions ``0..width-1``: two 20-bit parts of splitmix64(position)."""
    global _table
    if len(_table) < width:
        size = 1 << max(10, (width - 1).bit_length())
        z = np.arange(1, size + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
        parts = np.stack([z >> np.uint64(44), (z >> np.uint64(20)) & np.uint64(0xFFFFF)], axis=1)
        _table = (parts | np.uint64(1)).astype(np.float64)  # odd, in [1, 2**20): exact in float64
    return _table[:width]
