"""A small decoder-only transformer in plain PyTorch, for sequence-distillation tests and demos.

:class:`TinyCausalLM` maps token ids ``(B, L)`` to next-token logits ``(B, L, vocab_size)``: the logits at position
``t`` depend only on tokens ``0 .. t`` and predict token ``t + 1`` (score them against labels shifted by one). It
pairs with :class:`lightning_distill.demos.MarkovDataset`, whose right-padded batches carry ``input_ids``,
``attention_mask`` and unshifted ``labels``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["CausalBlock", "TinyCausalLM"]


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
            attn_mask: Boolean mask, ``True`` where a query may *not* attend to a key: ``(L, L)`` or
                ``(B * heads, L, L)``, as :class:`torch.nn.MultiheadAttention` takes it. No row may be all ``True``.

        Returns:
            The updated hidden states ``(B, L, dim)``.
        """
        h = self.norm1(x)
        attended, _ = self.attn(h, h, h, attn_mask=attn_mask, need_weights=False)
        x = x + attended
        return x + self.mlp(self.norm2(x))


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

    def _attention_mask(self, batch: int, length: int, attention_mask: Tensor | None, device: torch.device) -> Tensor:
        """The boolean ``True``-is-blocked mask for :class:`torch.nn.MultiheadAttention` (see :meth:`forward`)."""
        blocked = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
        if attention_mask is None:
            return blocked
        padded_keys = attention_mask == 0  # (B, L)
        blocked = blocked.unsqueeze(0) | padded_keys.unsqueeze(1)  # (B, L, L)
        diagonal = torch.eye(length, dtype=torch.bool, device=device)
        blocked = blocked & ~diagonal  # every query may attend to itself: no fully masked row, no NaN
        return blocked.repeat_interleave(self.heads, dim=0)  # (B * heads, L, L), batch-major as MHA expects

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Compute next-token logits.

        Args:
            input_ids: Integer token ids of shape ``(B, L)`` with ``1 <= L <= max_length``.
            attention_mask: Optional ``(B, L)`` mask, nonzero (or ``True``) at real tokens, zero at padding.

        Returns:
            Float logits of shape ``(B, L, vocab_size)``; position ``t`` predicts token ``t + 1``.

        Raises:
            ValueError: If ``input_ids`` is not a 2-D integer tensor, is longer than ``max_length``, or
                ``attention_mask`` does not have its shape.
        """
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"`input_ids` must be a 2-D (batch, length) tensor, got {shape}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"`input_ids` must hold integer token ids, got dtype {input_ids.dtype}")
        batch, length = input_ids.shape
        if length < 1:
            raise ValueError(f"`input_ids` must have at least one position, got shape {tuple(input_ids.shape)}")
        if length > self.max_length:
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
        device = input_ids.device
        x = self.embed(input_ids) + self.positions(torch.arange(length, device=device))
        mask = self._attention_mask(batch, length, attention_mask, device)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))
