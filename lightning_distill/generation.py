"""Sample continuations of prompts from a causal language model: the sampling engine of on-policy distillation.

:func:`sample_completions` takes a batch of (padded) prompts and returns :class:`Completions`: each row's prompt
immediately followed by its sampled continuation, right-padded, with the masks a training step needs. One sampler
(temperature, top-k, top-p) serves every model family, and all its randomness comes from the
:class:`torch.Generator` passed in, so a seed reproduces the samples. How the model is stepped depends on what it
offers:

- a model with ``new_kv_cache(batch_size, capacity, device=...)`` whose forward takes ``position_ids=`` and
  ``cache=`` (as :class:`lightning_distill.demos.TinyCausalLM`): the (left-padded) prompt is prefilled once, then
  one token per step is fed against the cache, through ``cache.decode(tokens, position_ids)`` (``(B,)`` in,
  ``(B, V)`` logits out) when the cache has that method;
- a Hugging Face causal LM (it has ``generate`` and ``config``): the same loop over its own ``forward`` with its
  key/value cache, position ids counted from the attention mask (the prompts are left-padded inside);
- any other causal LM returning ``(B, L, V)`` logits (a tensor, ``.logits`` or ``{"logits": ...}``): the whole
  sequence so far is re-run at every step (no cache: slower, but nothing is asked of the model beyond causality).

Hugging Face models are stepped here rather than through their ``generate``, which draws from the global RNG and
filters logits its own way: so top-k, top-p and temperature mean the same for every family and one generator
seeds them all. Greedy decoding (``temperature=0``) gives what ``generate(do_sample=False)`` gives.

A cache that reports ``cache.inference_mode is True`` (a :class:`~lightning_distill.demos.TinyCausalLM` of stock
layers with no hook) is decoded under :func:`torch.inference_mode` (a fifth less per-token dispatch overhead on CPU);
everything else runs under :func:`torch.no_grad`. Either way the returned tensors are ordinary ones that a training
step can use.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
from torch import Tensor, nn

from lightning_distill._batches import extract_logits

__all__ = ["Completions", "max_sequence_length", "sample_completions"]


@dataclass(frozen=True)
class Completions:
    """Prompts and their sampled continuations, as :func:`sample_completions` returns them.

    Row ``b`` holds its ``prompt_lengths[b]`` prompt tokens, then its ``completion_lengths[b]`` sampled tokens (the
    end-of-sequence token included when one was sampled), then padding: right-padded and contiguous, so any causal
    LM scores it correctly without position ids.

    Attributes:
        input_ids: ``(B, L_out)`` token ids (the dtype of the prompts); the pad id after each row's end.
        attention_mask: ``(B, L_out)`` int64, 1 at prompt and sampled tokens, 0 at padding.
        completion_mask: ``(B, L_out)`` bool, ``True`` at the sampled tokens only.
        prompt_lengths: ``(B,)`` int64, the real tokens of each prompt.
        completion_lengths: ``(B,)`` int64, the sampled tokens of each row (``<= max_new_tokens``).
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    prompt_lengths: Tensor
    completion_lengths: Tensor

    def as_batch(self, ignore_index: int = -100) -> dict[str, Tensor]:
        """A causal-LM training batch: ``input_ids``, ``attention_mask`` and unshifted ``labels``.

        ``labels`` is ``input_ids`` at the sampled tokens and ``ignore_index`` elsewhere (prompt and padding), so a
        next-token (``shift_labels``) loss scores the completion only: the logits at position ``t`` against
        ``labels[t + 1]``, the first scored one being the last prompt token's prediction of the first sampled token.
        """
        labels = self.input_ids.long().masked_fill(~self.completion_mask, ignore_index)
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": labels}


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Completions:
    """Sample up to ``max_new_tokens`` tokens after each prompt from a causal language model.

    The model is put in eval mode for the sampling (every submodule's training flag is restored afterwards) and run
    under :func:`torch.no_grad`. At each step the next-token logits are divided by ``temperature``, cut to the
    ``top_k`` most likely tokens, then to the smallest set of most likely tokens whose probability reaches ``top_p``
    (nucleus), and a token is drawn from the softmax of what is left, by inverse-CDF sampling of one uniform number
    per row and step. The ``(max_new_tokens, B)`` uniforms are drawn up front from ``generator`` (whatever the
    early stop), so the same seed gives the same samples and the global RNG is left alone. ``temperature=0`` is
    greedy decoding (the argmax; ``top_k``, ``top_p`` and ``generator`` are then unused).

    A row stops at its first ``eos_token_id`` (kept, counted in the completion) and is padding after it; the loop
    stops when every row has stopped or after ``max_new_tokens`` steps.

    Args:
        model: A causal LM: position ``t`` of its ``(B, L, V)`` logits predicts token ``t + 1`` (see the module
            docstring for how each kind is stepped).
        input_ids: ``(B, L)`` integer prompt tokens, padded (right padding as in
            :class:`~lightning_distill.demos.MarkovDataset`; a row's real tokens are those where ``attention_mask``
            is nonzero, in order, wherever the padding is).
        attention_mask: ``(B, L)`` mask, nonzero at real tokens (default: all real). No row may be all padding.
        max_new_tokens: Most tokens to sample per row (``>= 1``). The longest prompt plus this must fit the
            model's maximum length (``max_length`` attribute, or ``n_positions`` / ``max_position_embeddings`` of
            a Hugging Face config) when it has one.
        temperature: ``>= 0``; ``0`` is greedy.
        top_k: Keep only the ``top_k`` most likely tokens (ties with the ``top_k``-th kept too); ``None``: all.
        top_p: In ``(0, 1]``, the nucleus mass; ``None`` or ``1``: no cut.
        eos_token_id: The end-of-sequence id, or several; ``None`` samples ``max_new_tokens`` tokens in every row.
        pad_token_id: The id written at padding (prompt padding included) and fed for the rows that stopped.
        generator: Source of all the randomness; ``None`` draws from the global RNG (on the inputs' device).
        use_cache: ``False`` re-runs the whole sequence at every step even for a model with a cache.

    Returns:
        The :class:`Completions`, on the device of ``input_ids``; ``L_out`` is the longest prompt plus completion.

    Raises:
        ValueError: If an argument is out of its range, ``input_ids`` is not a 2-D integer tensor, the mask's
            shape differs from it, a prompt row is all padding, the sequences would exceed the model's maximum
            length, or the model is an encoder-decoder or returns logits of another shape.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> class Bigram(nn.Module):  # the next token's logits depend on the current one only: a causal LM
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.table = nn.Embedding(8, 8)
        ...
        ...     def forward(self, input_ids, attention_mask=None):
        ...         return self.table(input_ids)
        >>> _ = torch.manual_seed(0)
        >>> model = Bigram()
        >>> prompts = torch.tensor([[3, 5, 1], [2, 0, 0]])  # right-padded: 3 and 1 real tokens
        >>> out = sample_completions(
        ...     model, prompts, prompts != 0, max_new_tokens=4, generator=torch.Generator().manual_seed(0)
        ... )
        >>> out.input_ids.shape, out.attention_mask.tolist()
        (torch.Size([2, 7]), [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
        >>> out.completion_mask.int().tolist(), out.completion_lengths.tolist()
        ([[0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0, 0]], [4, 4])
        >>> again = sample_completions(
        ...     model, prompts, prompts != 0, max_new_tokens=4, generator=torch.Generator().manual_seed(0)
        ... )
        >>> torch.equal(out.input_ids, again.input_ids)
        True
        >>> (out.as_batch()["labels"][1] == -100).tolist()  # scored: the sampled tokens only
        [True, False, False, False, False, True, True]
    """
    _check_arguments(model, max_new_tokens, temperature, top_k, top_p, pad_token_id, generator)
    eos = _eos_ids(eos_token_id)
    prompt, lengths = _compact(input_ids, attention_mask, pad_token_id)
    batch, width = prompt.shape
    limit, source = max_sequence_length(model)
    if limit is not None and width + max_new_tokens > limit:
        raise ValueError(
            f"prompt length {width} + max_new_tokens {max_new_tokens} = {width + max_new_tokens} exceeds the "
            f"model's maximum length {limit} ({source}). HINT: lower `max_new_tokens` or shorten the prompts."
        )
    device = prompt.device
    if isinstance(eos, Tensor):
        eos = eos.to(device)
    uniforms = None
    if temperature != 0:
        draw_on = generator.device if generator is not None else device
        uniforms = torch.rand(max_new_tokens, batch, 1, generator=generator, device=draw_on).to(device)
    with _eval_mode(model):
        decoder = _decoder(model, prompt, lengths, max_new_tokens, pad_token_id, use_cache)
        sampled: list[Tensor] = []
        # not inference_mode(False): that would turn grad mode back on
        with torch.inference_mode() if decoder.inference_mode else torch.no_grad():
            finished = torch.zeros(batch, dtype=torch.bool, device=device) if eos is not None else None
            logits = decoder.prefill()
            for step in range(max_new_tokens):
                if uniforms is None:
                    tokens = logits.argmax(dim=-1)
                else:
                    tokens = _sample(logits, uniforms[step], temperature, top_k, top_p)
                if finished is not None:
                    tokens = tokens.masked_fill(finished, pad_token_id)
                    finished |= (tokens == eos) if not isinstance(eos, Tensor) else torch.isin(tokens, eos)
                sampled.append(tokens)
                if step == max_new_tokens - 1 or (finished is not None and bool(finished.all())):
                    break
                logits = decoder.step(tokens, step + 1)
    generated = torch.stack(sampled, dim=1).to(prompt.dtype)  # outside inference mode: a tensor autograd may use
    return _assemble(prompt, lengths, generated, eos, pad_token_id)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block, then every training flag as it was.

    Afterwards the model's own ``train(mode)`` runs (an override of it too), then each submodule's flag is set back
    (a frozen submodule stays frozen).
    """
    modes = [(module, module.training) for module in model.modules()]  # the model first
    model.eval()
    try:
        yield
    finally:
        model.train(modes[0][1])
        for module, training in modes:
            module.training = training


# ------------------------------------------------------------------------------------------------------ arguments
def _check_arguments(
    model: object,
    max_new_tokens: object,
    temperature: object,
    top_k: object,
    top_p: object,
    pad_token_id: object,
    generator: object,
) -> None:
    """Raise a ``ValueError`` (``TypeError`` for the model and generator) naming the first bad argument."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be a positive integer, got {max_new_tokens!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, Real)
        or not math.isfinite(float(temperature))
        or float(temperature) < 0
    ):
        raise ValueError(f"`temperature` must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"`top_k` must be None or a positive integer, got {top_k!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, Real) or not 0 < float(top_p) <= 1  # NaN fails too
    ):
        raise ValueError(f"`top_p` must be None or a number in (0, 1], got {top_p!r}")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
        raise ValueError(f"`pad_token_id` must be a non-negative integer, got {pad_token_id!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}")


def _eos_ids(eos_token_id: object) -> int | Tensor | None:
    """``None``, one id, or a 1-D tensor of ids (moved to the device where it is compared)."""
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    if not isinstance(ids, Sequence) or not ids or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise ValueError(f"`eos_token_id` must be None, an integer or a sequence of integers, got {eos_token_id!r}")
    if any(i < 0 for i in ids):
        raise ValueError(f"`eos_token_id` must be non-negative, got {eos_token_id!r}")
    return ids[0] if len(ids) == 1 else torch.tensor(list(ids))


def _compact(input_ids: object, attention_mask: object, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """The prompts right-padded (real tokens first, in order, then ``pad_token_id``) and their lengths."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"`input_ids` must be a 2-D (batch, length) tensor, got {shape}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"`input_ids` must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ValueError(f"`input_ids` must hold at least one token per row, got shape {tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        return input_ids.clone(), torch.full((batch,), length, dtype=torch.long, device=device)
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise ValueError(f"`attention_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}, got {shape}")
    real = attention_mask.to(device) != 0
    lengths = real.sum(dim=1)
    empty = (lengths == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"prompt rows {empty} of `input_ids` are all padding (`attention_mask` is 0 everywhere): each prompt "
            "needs at least one real token"
        )
    order = torch.sort(real.to(torch.uint8), dim=1, descending=True, stable=True).indices
    width = int(lengths.max())
    prompt = input_ids.gather(1, order[:, :width])
    prompt = prompt.masked_fill(torch.arange(width, device=device) >= lengths.unsqueeze(1), pad_token_id)
    return prompt, lengths


def max_sequence_length(model: nn.Module) -> tuple[int | None, str]:
    """The longest sequence a model takes and where it was read, or ``(None, "")`` when it does not say.

    Read from the model's ``max_length``, ``n_positions`` or ``max_position_embeddings``, then its ``config``'s.

    Example::

        >>> max_sequence_length(nn.Linear(2, 2))
        (None, '')
    """
    for name in ("max_length", "n_positions", "max_position_embeddings"):
        value = getattr(model, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value, f"{type(model).__name__}.{name}"
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value, f"config.{name}"
    return None, ""


# -------------------------------------------------------------------------------------------------------- sampling
def _sample(logits: Tensor, uniform: Tensor, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
    """Draw one token per row of ``logits`` ``(B, V)`` with the uniforms ``uniform`` ``(B, 1)`` in ``[0, 1)``."""
    logits = logits.float()
    if temperature != 1:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    order = None
    if top_p is not None and top_p < 1:
        logits, order = logits.sort(dim=-1, descending=True)
        probs = logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens: < top_p keeps the nucleus
        logits = logits.masked_fill(before >= top_p, -math.inf)  # the most likely token always stays (before 0)
    cdf = logits.softmax(dim=-1).cumsum_(dim=-1)
    # The first index whose cdf exceeds u * total (right=True): never a zero-probability token, whose cdf equals its
    # left neighbour's. A float32 uniform is at most 1 - 2**-24, so u * total rounds below total: always in range.
    index = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)
    return (index if order is None else order.gather(1, index)).squeeze(1)


# -------------------------------------------------------------------------------------------------------- decoders
class _Decoder(ABC):
    """Gives the next-token logits ``(B, V)`` of every row: after the prompt, then after each sampled token."""

    inference_mode = False  # whether the decoding may run under torch.inference_mode (nothing keeps its tensors)

    @abstractmethod
    def prefill(self) -> Tensor:
        """The logits after each row's prompt."""

    @abstractmethod
    def step(self, tokens: Tensor, generated: int) -> Tensor:
        """The logits after ``tokens`` ``(B,)``, the ``generated``-th sampled token of each row."""


def _left_padded(prompt: Tensor, lengths: Tensor, pad_token_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """The right-padded ``prompt`` left-padded: ``(input_ids, attention_mask, position_ids)``."""
    width = prompt.shape[1]
    offset = (width - lengths).unsqueeze(1)  # (B, 1)
    positions = torch.arange(width, device=prompt.device) - offset  # (B, width), negative in the padding
    real = positions >= 0
    positions = positions.clamp_min(0)
    input_ids = prompt.gather(1, positions).masked_fill(~real, pad_token_id)
    return input_ids, real.long(), positions


class _CacheDecoder(_Decoder):
    """A model with ``new_kv_cache`` (:class:`~lightning_distill.demos.TinyCausalLM`): prefill, then one token."""

    def __init__(self, model: nn.Module, prompt: Tensor, lengths: Tensor, max_new_tokens: int, pad: int) -> None:
        self.model = model
        self.input_ids, self.attention_mask, self.position_ids = _left_padded(prompt, lengths, pad)
        capacity = prompt.shape[1] + max_new_tokens - 1  # the last sampled token is never fed
        self.cache = model.new_kv_cache(prompt.shape[0], capacity, device=prompt.device)  # type: ignore[operator]
        self.inference_mode = getattr(self.cache, "inference_mode", False) is True
        self.decode = getattr(self.cache, "decode", None)  # one token per row, (B,) -> (B, V): no module call
        # the position of each row's t-th sampled token, fed at step t + 1: (max_new_tokens, B)
        self.positions = lengths + torch.arange(max_new_tokens, device=lengths.device).unsqueeze(1)

    def prefill(self) -> Tensor:
        logits = self.model(self.input_ids, self.attention_mask, position_ids=self.position_ids, cache=self.cache)
        return extract_logits(logits, role="model")[:, -1]

    def step(self, tokens: Tensor, generated: int) -> Tensor:
        position = self.positions[generated - 1]
        if self.decode is not None:
            return self.decode(tokens, position)
        logits = self.model(tokens.unsqueeze(1), position_ids=position.unsqueeze(1), cache=self.cache)
        return extract_logits(logits, role="model")[:, -1]


class _HuggingFaceDecoder(_Decoder):
    """A Hugging Face causal LM: its own forward and key/value cache, the prompts left-padded."""

    def __init__(self, model: nn.Module, prompt: Tensor, lengths: Tensor, max_new_tokens: int, pad: int) -> None:
        self.model = model
        self.lengths = lengths.unsqueeze(1)
        self.input_ids, mask, self.position_ids = _left_padded(prompt, lengths, pad)
        self.width = prompt.shape[1]
        ones = torch.ones(prompt.shape[0], max_new_tokens, dtype=mask.dtype, device=mask.device)
        self.attention_mask = torch.cat([mask, ones], dim=1)  # sliced per step: no mask built in the loop
        parameters = inspect.signature(model.forward).parameters
        self.cache_name = "cache" if "cache" in parameters else "past_key_values"  # renamed `cache` in transformers 5
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        self.cache: Any = None

    def _run(self, input_ids: Tensor, length: int, position_ids: Tensor) -> Tensor:
        inputs: dict[str, Any] = {self.cache_name: self.cache} if self.cache is not None else {}
        output = self.model(
            input_ids=input_ids,
            attention_mask=self.attention_mask[:, :length],
            position_ids=position_ids,
            use_cache=True,
            **inputs,
            **self.extra,
        )
        cache = getattr(output, "cache", None)
        self.cache = cache if cache is not None else output.past_key_values
        return extract_logits(output, role="model")[:, -1]

    def prefill(self) -> Tensor:
        return self._run(self.input_ids, self.width, self.position_ids)

    def step(self, tokens: Tensor, generated: int) -> Tensor:
        return self._run(tokens.unsqueeze(1), self.width + generated, self.lengths + (generated - 1))


class _ReforwardDecoder(_Decoder):
    """Any causal LM: the right-padded sequence so far is run whole at every step, the logits read at its end."""

    def __init__(self, model: nn.Module, prompt: Tensor, lengths: Tensor, max_new_tokens: int, pad: int) -> None:
        self.model = model
        self.lengths = lengths.unsqueeze(1)
        batch, self.width = prompt.shape
        self.buffer = torch.full((batch, self.width + max_new_tokens), pad, dtype=prompt.dtype, device=prompt.device)
        self.buffer[:, : self.width] = prompt
        self.positions = torch.arange(self.buffer.shape[1], device=prompt.device)

    def _run(self, generated: int) -> Tensor:
        end = self.width + generated
        ends = self.lengths + generated  # (B, 1)
        logits = _causal_lm_logits(self.model, self.buffer[:, :end], (self.positions[:end] < ends).long())
        index = (ends - 1).unsqueeze(-1).expand(-1, 1, logits.shape[-1])
        return logits.gather(1, index).squeeze(1)

    def prefill(self) -> Tensor:
        return self._run(0)

    def step(self, tokens: Tensor, generated: int) -> Tensor:
        self.buffer.scatter_(1, self.lengths + (generated - 1), tokens.unsqueeze(1).to(self.buffer.dtype))
        return self._run(generated)


def _causal_lm_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The ``(B, L, V)`` logits of a full forward: ``model(input_ids=..., attention_mask=...)``.

    The mask is passed only if ``forward`` takes it (or ``**kwargs``): right padding changes nothing at the real
    positions of a causal model, so one that takes ``input_ids`` alone is run on them alone.

    Raises:
        TypeError: If the output holds no logits tensor.
        ValueError: If the logits are not ``(B, L, V)``.
    """
    if _accepts(model, "attention_mask"):
        output = model(input_ids=input_ids, attention_mask=attention_mask)
    else:
        output = model(input_ids)
    logits = extract_logits(output, role="model")
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            "the model must return next-token logits of shape (batch, length, vocab) with (batch, length) = "
            f"{tuple(input_ids.shape)}, got {tuple(logits.shape)}"
        )
    return logits


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes a keyword argument ``name`` (or any keyword)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a builtin forward
        return True
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _decoder(
    model: nn.Module, prompt: Tensor, lengths: Tensor, max_new_tokens: int, pad: int, use_cache: bool
) -> _Decoder:
    """The decoder for ``model`` (see the module docstring)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model: sample_completions continues prompts of a "
            "decoder-only (causal) language model"
        )
    if use_cache and callable(getattr(model, "new_kv_cache", None)):
        return _CacheDecoder(model, prompt, lengths, max_new_tokens, pad)
    if use_cache and config is not None and callable(getattr(model, "generate", None)):
        return _HuggingFaceDecoder(model, prompt, lengths, max_new_tokens, pad)
    return _ReforwardDecoder(model, prompt, lengths, max_new_tokens, pad)


# -------------------------------------------------------------------------------------------------------- assembly
def _assemble(
    prompt: Tensor, lengths: Tensor, generated: Tensor, eos: int | Tensor | None, pad_token_id: int
) -> Completions:
    """Put each row's sampled tokens right after its prompt and build the masks."""
    batch, width = prompt.shape
    steps = generated.shape[1]
    device = prompt.device
    completion_lengths = torch.full((batch,), steps, dtype=torch.long, device=device)
    if eos is not None:
        hits = (generated == eos) if isinstance(eos, int) else torch.isin(generated, eos)
        first = hits.int().argmax(dim=1) + 1  # the position after the first EOS (argmax: first maximum)
        completion_lengths = torch.where(hits.any(dim=1), first, completion_lengths)
    input_ids = torch.full((batch, width + steps), pad_token_id, dtype=prompt.dtype, device=device)
    input_ids[:, :width] = prompt
    offsets = torch.arange(steps, device=device)
    input_ids.scatter_(1, lengths.unsqueeze(1) + offsets, generated)
    ends = lengths + completion_lengths
    total = int(ends.max())
    input_ids = input_ids[:, :total].contiguous()
    positions = torch.arange(total, device=device)
    attention_mask = positions < ends.unsqueeze(1)
    completion_mask = attention_mask & (positions >= lengths.unsqueeze(1))
    return Completions(input_ids, attention_mask.long(), completion_mask, lengths, completion_lengths)
