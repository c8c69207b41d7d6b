"""A small decoder-only transformer in plain PyTorch, for sequence-distillation tests and demos.

:class:`TinyCausalLM` maps token ids ``(B, L)`` to next-token logits ``(B, L, vocab_size)``: the logits at position
``t`` depend only on tokens ``0 .. t`` and predict token ``t + 1`` (score them against labels shifted by one). It
pairs with :class:`lightning_distill.demos.MarkovDataset`, whose right-padded batches carry ``input_ids``,
``attention_mask`` and unshifted ``labels``. :meth:`TinyCausalLM.new_kv_cache` and ``forward(..., cache=...)`` decode
incrementally (one new token per call, keys and values of the earlier ones kept in a preallocated :class:`KVCache`),
which :func:`lightning_distill.generation.sample_completions` uses.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CausalBlock", "KVCache", "TinyCausalLM"]

_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_module_call_hooks")


def _check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is a positive ``int`` (not a ``bool``), else raise a ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return value


class CausalBlock(nn.Module):
    """A pre-norm transformer decoder block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Args:
        dim: Width of the residual stream.
        heads: Number of attention heads (must divide ``dim``).

    Example::

        >>> import torch
        >>> block = CausalBlock(dim=16, heads=2)
        >>> mask = torch.ones(4, 4, dtype=torch.bool).triu(1)
        >>> block(torch.randn(3, 4, 16), mask).shape
        torch.Size([3, 4, 16])
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        _check_positive_int("dim", dim)
        _check_positive_int("heads", heads)
        if dim % heads:
            raise ValueError(f"`dim` must be divisible by `heads`, got dim={dim} and heads={heads}")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        """Apply the block.

        Args:
            x: Hidden states ``(B, L, dim)``.
            attn_mask: ``(L, L)`` or ``(B * heads, L, L)`` mask, as :class:`torch.nn.MultiheadAttention` takes it:
                boolean, ``True`` where a query may *not* attend to a key, or float, added to the attention scores
                (``-inf`` blocks; :class:`TinyCausalLM` passes this kind, the faster one in eval mode). No row may
                block every key.

        Returns:
            The updated hidden states ``(B, L, dim)``.
        """
        h = self.norm1(x)
        attended, _ = self.attn(h, h, h, attn_mask=attn_mask, need_weights=False)
        x = x + attended
        return x + self.mlp(self.norm2(x))

    def step(self, x: Tensor, keys: Tensor, values: Tensor, start: int, allowed: Tensor | None) -> Tensor:
        """Apply the block to new positions, attending to the cached ones too (incremental decoding).

        The same computation as :meth:`forward` (the attention's own ``in_proj`` and ``out_proj`` weights, through
        :func:`torch.nn.functional.scaled_dot_product_attention`), for the ``n`` positions ``start .. start + n - 1``
        of a sequence whose earlier keys and values sit in ``keys`` and ``values``; this call writes theirs there.

        Args:
            x: Hidden states of the new positions ``(B, n, dim)``.
            keys: The layer's key cache ``(B, heads, capacity, dim // heads)``, written in place.
            values: The layer's value cache, the shape of ``keys``, written in place.
            start: Number of positions already cached.
            allowed: Mask broadcastable to ``(B, heads, n, start + n)`` as
                :func:`~torch.nn.functional.scaled_dot_product_attention` takes it: boolean ``True`` where a query
                *may* attend to a key (the opposite of :meth:`forward`'s ``attn_mask``), or float added to the
                scores (``-inf`` blocks); ``None`` for all keys. No row may block every key.

        Returns:
            The updated hidden states ``(B, n, dim)``.
        """
        batch, length, dim = x.shape
        heads = self.attn.num_heads
        qkv = F.linear(self.norm1(x), self.attn.in_proj_weight, self.attn.in_proj_bias)
        qkv = qkv.view(batch, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)  # (3, B, heads, n, head_dim)
        end = start + length
        keys[:, :, start:end] = qkv[1]
        values[:, :, start:end] = qkv[2]
        attended = F.scaled_dot_product_attention(qkv[0], keys[:, :, :end], values[:, :, :end], attn_mask=allowed)
        x = x + self.attn.out_proj(attended.transpose(1, 2).reshape(batch, length, dim))
        return x + self.mlp(self.norm2(x))


class KVCache:
    """Preallocated keys and values of a :class:`TinyCausalLM`, for incremental decoding.

    Build one with :meth:`TinyCausalLM.new_kv_cache` and pass it as ``cache=`` to each forward call: the call
    attends to every cached position, appends its own keys and values and advances :attr:`length`. A cache serves
    inference (under :func:`torch.no_grad`): each call writes into tensors the earlier calls read.

    Attributes:
        kv: One ``(B, 2, heads, capacity, dim // heads)`` tensor per block: its keys (``[:, 0]``, also
            :attr:`keys`) and values (``[:, 1]``, :attr:`values`) side by side, written in one copy per step.
        bias: ``(B, 1, 1, capacity)`` float, added to the attention scores: ``-inf`` at the cached positions that
            were padding (no later query attends to them), ``0`` elsewhere (positions at or after :attr:`length`
            are ``0`` until written).
        length: Number of positions cached so far.
        plain: If the model was made of its stock layers with no hook when the cache was built, their tensors: a
            call with one new token then runs their functional form on ``(B, dim)`` rows (the same numbers, without
            the per-module call overhead, which dominates at these sizes). ``None``: every layer is called as a
            module (a replaced layer, such as a fake-quantized one, or a hook, such as a feature capture, stays in
            effect).
    """

    __slots__ = ("bias", "kv", "length", "model", "padded", "plain")

    def __init__(
        self, model: TinyCausalLM, kv: list[Tensor], bias: Tensor, plain: tuple[Any, ...] | None = None
    ) -> None:
        self.model = model
        self.kv = kv
        self.bias = bias
        self.length = 0
        self.plain = plain
        self.padded = False  # whether a cached position is padding (else the attention needs no mask)

    @property
    def keys(self) -> list[Tensor]:
        """Each block's ``(B, heads, capacity, dim // heads)`` keys (views of :attr:`kv`)."""
        return [kv[:, 0] for kv in self.kv]

    @property
    def values(self) -> list[Tensor]:
        """Each block's ``(B, heads, capacity, dim // heads)`` values (views of :attr:`kv`)."""
        return [kv[:, 1] for kv in self.kv]

    def decode(self, tokens: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Feed one real token per row and return the next-token logits ``(B, vocab_size)``.

        The same as ``model(tokens[:, None], position_ids=position_ids[:, None], cache=self)[:, -1]``, without the
        module call and its checks when the model is :attr:`plain` (the generation loop's hot path).

        Args:
            tokens: ``(B,)`` integer token ids.
            position_ids: ``(B,)`` positions (default: :attr:`length` for every row).

        Raises:
            ValueError: If the cache is full or ``tokens`` has another batch size.
        """
        if self.length >= self.capacity or tokens.shape != (self.batch_size,):
            raise ValueError(
                f"`tokens` must be ({self.batch_size},) and the cache not full ({self.length} of {self.capacity} "
                f"positions), got {tuple(tokens.shape)}"
            )
        if self.plain is not None:
            return self.model._decode_one(tokens, position_ids, self)
        positions = None if position_ids is None else position_ids.unsqueeze(1)
        return self.model(tokens.unsqueeze(1), position_ids=positions, cache=self)[:, -1]

    @property
    def inference_mode(self) -> bool:
        """Whether decoding with this cache may run under :func:`torch.inference_mode`.

        Its tensors then cannot enter autograd; that is safe when the model is :attr:`plain`: nothing it calls can
        keep a tensor of the decoding.
        """
        return self.plain is not None

    @property
    def batch_size(self) -> int:
        """Number of sequences the cache holds."""
        return int(self.bias.shape[0])

    @property
    def capacity(self) -> int:
        """Most positions the cache can hold."""
        return int(self.bias.shape[-1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch_size={self.batch_size}, capacity={self.capacity}, length={self.length})"


class TinyCausalLM(nn.Module):
    """A small decoder-only transformer language model.

    Layout::

        embed      Embedding(vocab_size, dim)   token embedding
        positions  Embedding(max_length, dim)   learned position embedding
        blocks     ModuleList of `layers` CausalBlock (norm1, attn, norm2, mlp), causal self-attention
        norm       LayerNorm(dim)
        head       Linear(dim, vocab_size)      -> logits (B, L, vocab_size)

    ``attention_mask`` (1 at real tokens, 0 at padding) keeps every query from attending to padded keys. Each
    query may always attend to itself, so no attention row is fully masked and padded positions (or an
    all-padding sequence) give finite logits rather than NaN; a real query never attends to a padded key, so
    the logits at real positions are those of the unpadded sequence. The logits at padded positions are
    meaningless and should be ignored (labels ``-100``).

    With ``cache=`` (a :class:`KVCache` from :meth:`new_kv_cache`) a call processes only new positions and attends
    to the cached ones as well: prefilling a prompt and then feeding one token per call gives, at every position,
    the logits the full forward gives for the whole sequence (to float rounding). ``position_ids`` let a
    left-padded batch use the positions of its unpadded rows.

    Args:
        vocab_size: Number of token ids (``PAD`` included).
        dim: Width of the residual stream (divisible by ``heads``).
        layers: Number of transformer blocks.
        heads: Number of attention heads.
        max_length: Longest sequence the position embedding covers.

    Raises:
        ValueError: If an argument is not a positive integer or ``dim`` is not divisible by ``heads``.

    Example::

        >>> import torch
        >>> model = TinyCausalLM(vocab_size=16, dim=32, layers=2, heads=4, max_length=12)
        >>> input_ids = torch.randint(1, 16, (3, 10))
        >>> attention_mask = torch.ones(3, 10, dtype=torch.long)
        >>> attention_mask[0, 6:] = 0
        >>> logits = model(input_ids, attention_mask)
        >>> logits.shape, logits.dtype, bool(logits.isfinite().all())
        (torch.Size([3, 10, 16]), torch.float32, True)

    Incremental decoding, one token at a time after the first six, gives the same logits::

        >>> model = model.eval()
        >>> cache = model.new_kv_cache(batch_size=3)
        >>> with torch.no_grad():
        ...     steps = [model(input_ids[:, :6], attention_mask[:, :6], cache=cache)]
        ...     for t in range(6, 10):
        ...         steps.append(model(input_ids[:, t : t + 1], attention_mask[:, t : t + 1], cache=cache))
        ...     full = model(input_ids, attention_mask)
        >>> real = attention_mask.bool()
        >>> torch.allclose(torch.cat(steps, dim=1)[real], full[real], atol=1e-5), cache.length
        (True, 10)
    """

    def __init__(
        self, vocab_size: int = 64, dim: int = 64, layers: int = 2, heads: int = 4, max_length: int = 64
    ) -> None:
        super().__init__()
        self.vocab_size = _check_positive_int("vocab_size", vocab_size)
        self.dim = _check_positive_int("dim", dim)
        self.layers = _check_positive_int("layers", layers)
        self.heads = _check_positive_int("heads", heads)
        self.max_length = _check_positive_int("max_length", max_length)
        if dim % heads:
            raise ValueError(f"`dim` must be divisible by `heads`, got dim={dim} and heads={heads}")
        self.embed = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(max_length, dim)
        self.blocks = nn.ModuleList(CausalBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)

    def _attention_mask(self, length: int, attention_mask: Tensor | None, dtype: torch.dtype) -> Tensor:
        """The additive mask for :class:`torch.nn.MultiheadAttention`, ``-inf`` where blocked (see :meth:`forward`).

        A float mask rather than a boolean one: the same attention (MHA turns a boolean mask into this one in
        training mode) and, in eval mode, a faster kernel than the boolean mask's masked softmax.
        """
        device = self.embed.weight.device
        blocked = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
        if attention_mask is not None:
            padded_keys = attention_mask.to(device) == 0  # (B, L)
            blocked = blocked.unsqueeze(0) | padded_keys.unsqueeze(1)  # (B, L, L)
            diagonal = torch.eye(length, dtype=torch.bool, device=device)
            blocked = blocked & ~diagonal  # every query may attend to itself: no fully masked row, no NaN
        mask = torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill_(blocked, -math.inf)
        if attention_mask is None:
            return mask  # (L, L)
        return mask.repeat_interleave(self.heads, dim=0)  # (B * heads, L, L), batch-major as MHA expects

    def new_kv_cache(
        self, batch_size: int, capacity: int | None = None, *, device: torch.device | str | None = None
    ) -> KVCache:
        """An empty :class:`KVCache` for ``batch_size`` sequences of up to ``capacity`` positions.

        Args:
            batch_size: Number of sequences decoded together.
            capacity: Most positions to cache (default and at most :attr:`max_length`).
            device: Where to allocate it (default: the model's parameters' device); the dtype is theirs.

        Raises:
            ValueError: If ``batch_size`` or ``capacity`` is not a positive integer, or ``capacity`` exceeds
                ``max_length``.
        """
        _check_positive_int("batch_size", batch_size)
        capacity = self.max_length if capacity is None else _check_positive_int("capacity", capacity)
        if capacity > self.max_length:
            raise ValueError(f"`capacity` {capacity} exceeds the model's max_length {self.max_length}")
        weight = self.embed.weight
        device = weight.device if device is None else torch.device(device)
        shape = (batch_size, 2, self.heads, capacity, self.dim // self.heads)
        kv = [torch.empty(shape, dtype=weight.dtype, device=device) for _ in self.blocks]
        bias = torch.zeros(batch_size, 1, 1, capacity, dtype=weight.dtype, device=device)
        return KVCache(self, kv, bias, plain=self._plain_layers())

    def _plain_layers(self) -> tuple[Any, ...] | None:
        """The layers' tensors and settings for :meth:`_decode_one`, or ``None``.

        ``None`` if a layer is not the stock one this class builds or something hooks a module (see :class:`KVCache`).
        """
        linear = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
        if any(getattr(nn.modules.module, name, None) for name in _GLOBAL_HOOKS):
            return None
        if any(m._forward_hooks or m._forward_pre_hooks for m in self.modules()):
            return None
        if any(type(e) is not nn.Embedding or e.max_norm is not None for e in (self.embed, self.positions)):
            return None
        layers: list[tuple[nn.Module, tuple[type, ...]]] = [(self.norm, (nn.LayerNorm,)), (self.head, linear)]
        blocks = []
        for block in self.blocks:
            attn, mlp = block.attn, block.mlp
            if type(block) is not CausalBlock or type(mlp) is not nn.Sequential or len(mlp) != 3:
                return None
            if type(attn) is not nn.MultiheadAttention or not attn._qkv_same_embed_dim or attn.dropout:
                return None
            layers += [(block.norm1, (nn.LayerNorm,)), (block.norm2, (nn.LayerNorm,)), (attn.out_proj, linear)]
            layers += [(mlp[0], linear), (mlp[1], (nn.GELU,)), (mlp[2], linear)]
            norm1, norm2, out_proj, fc1, gelu, fc2 = block.norm1, block.norm2, attn.out_proj, mlp[0], mlp[1], mlp[2]
            blocks.append(
                (
                    (norm1.normalized_shape, norm1.weight, norm1.bias, norm1.eps),
                    (attn.in_proj_weight, attn.in_proj_bias, out_proj.weight, out_proj.bias),
                    (norm2.normalized_shape, norm2.weight, norm2.bias, norm2.eps),
                    (fc1.weight, fc1.bias, gelu.approximate, fc2.weight, fc2.bias),
                )
            )
        if not all(type(module) in types for module, types in layers):
            return None
        norm = self.norm
        return (
            self.embed.weight,
            self.positions.weight,
            tuple(blocks),
            (norm.normalized_shape, norm.weight, norm.bias, norm.eps),
            (self.head.weight, self.head.bias),
        )

    def _decode_one(self, tokens: Tensor, position_ids: Tensor | None, cache: KVCache) -> Tensor:
        """One new real token per row, ``(B,)``, against the cache: the layers' functional form (see :class:`KVCache`).

        Returns the logits ``(B, vocab_size)``.
        """
        assert cache.plain is not None
        embed, positions, blocks, norm, head = cache.plain
        batch = tokens.shape[0]
        start = cache.length
        end = start + 1
        # the builtins that F.embedding and F.layer_norm call, without their Python checks
        x = torch.embedding(embed, tokens)  # (B, dim)
        x = x + (positions[start] if position_ids is None else torch.embedding(positions, position_ids))
        bias = cache.bias[..., :end] if cache.padded else None
        dim, heads = self.dim, self.heads
        for (norm1, attn, norm2, mlp), kv in zip(blocks, cache.kv, strict=True):
            qkv = F.linear(torch.layer_norm(x, *norm1), attn[0], attn[1]).view(batch, 3, heads, 1, dim // heads)
            kv[:, :, :, start:end] = qkv[:, 1:]
            attended = F.scaled_dot_product_attention(qkv[:, 0], kv[:, 0, :, :end], kv[:, 1, :, :end], attn_mask=bias)
            x = x + F.linear(attended.view(batch, dim), attn[2], attn[3])
            h = F.gelu(F.linear(torch.layer_norm(x, *norm2), mlp[0], mlp[1]), approximate=mlp[2])
            x = x + F.linear(h, mlp[3], mlp[4])
        cache.length = end
        return F.linear(torch.layer_norm(x, *norm), *head)

    def _cached_mask(self, cache: KVCache, length: int, attention_mask: Tensor | None, device: torch.device) -> Tensor:
        """The additive attention mask ``(B, 1, n or 1, start + n)`` of ``n`` new positions (see :meth:`forward`)."""
        start = cache.length
        end = start + length
        if attention_mask is not None:
            real = attention_mask != 0
            cache.bias[:, 0, 0, start:end] = torch.where(real, 0.0, -math.inf)
            cache.padded = cache.padded or not bool(real.all())
        bias = cache.bias[..., :end]  # (B, 1, 1, end): the padded keys blocked
        if length == 1 and attention_mask is None:
            return bias  # one real query: it may attend to every key the bias leaves open, itself included
        query = torch.arange(start, end, device=device).unsqueeze(1)  # (n, 1)
        key = torch.arange(end, device=device)  # (end,)
        # causal and not padded, or the query itself: no fully masked row, no NaN (as the full forward)
        return bias.masked_fill(key > query, -math.inf).masked_fill(key == query, 0.0)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Compute next-token logits.

        Args:
            input_ids: Integer token ids of shape ``(B, L)`` with ``1 <= L <= max_length``: with ``cache``, only
                the ``L`` new positions.
            attention_mask: Optional ``(B, L)`` mask, nonzero (or ``True``) at real tokens, zero at padding; with
                ``cache``, the mask of the new positions (the cache remembers the earlier ones).
            position_ids: Optional ``(B, L)`` or ``(L,)`` positions in ``[0, max_length)`` (default ``0 .. L - 1``,
                after the cached ones with ``cache``): a left-padded row gives its real tokens the positions they
                have unpadded.
            cache: A :class:`KVCache` from :meth:`new_kv_cache`: attend to its positions as well and append these.

        Returns:
            Float logits of shape ``(B, L, vocab_size)``; position ``t`` predicts token ``t + 1``.

        Raises:
            ValueError: If ``input_ids`` is not a 2-D integer tensor, is longer than ``max_length`` (with ``cache``:
                would overflow it), or ``attention_mask`` or ``position_ids`` does not have its shape.
        """
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"`input_ids` must be a 2-D (batch, length) tensor, got {shape}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"`input_ids` must hold integer token ids, got dtype {input_ids.dtype}")
        batch, length = input_ids.shape
        if length < 1:
            raise ValueError(f"`input_ids` must have at least one position, got shape {tuple(input_ids.shape)}")
        if cache is not None:
            if cache.batch_size != batch:
                raise ValueError(f"the cache holds {cache.batch_size} sequences, `input_ids` has {batch} rows")
            if cache.length + length > cache.capacity:
                raise ValueError(
                    f"{cache.length} cached + {length} new positions exceed the cache's capacity {cache.capacity}"
                )
        elif length > self.max_length:
            raise ValueError(
                f"sequence length {length} exceeds the model's max_length {self.max_length}. HINT: build the "
                "model with a larger `max_length` or truncate the inputs."
            )
        if attention_mask is not None and (
            not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape
        ):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask)
            raise ValueError(
                f"`attention_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}, got {shape}"
            )
        if position_ids is not None and (
            not isinstance(position_ids, Tensor) or position_ids.shape not in ((batch, length), (length,))
        ):
            shape = tuple(position_ids.shape) if isinstance(position_ids, Tensor) else type(position_ids).__name__
            raise ValueError(f"`position_ids` must have shape {(batch, length)} or {(length,)}, got {shape}")
        device = input_ids.device
        if cache is not None and cache.plain is not None and length == 1 and attention_mask is None:
            positions = None if position_ids is None else position_ids.reshape(-1).expand(batch)
            return self._decode_one(input_ids.select(1, 0), positions, cache).unsqueeze(1)
        if position_ids is None:
            start = 0 if cache is None else cache.length
            position_ids = torch.arange(start, start + length, device=device)
        x = self.embed(input_ids) + self.positions(position_ids)
        if cache is None:
            mask = self._attention_mask(length, attention_mask, x.dtype)
            for block in self.blocks:
                x = block(x, mask)
        else:
            allowed = self._cached_mask(cache, length, attention_mask, device)
            for block, kv in zip(cast("list[CausalBlock]", self.blocks), cache.kv, strict=True):
                x = block.step(x, kv[:, 0], kv[:, 1], cache.length, allowed)
            cache.length += length
        return self.head(self.norm(x))
