"""Exact evaluation of a causal language model against the :class:`~lightning_distill.demos.MarkovLanguage` it learns.

The chain's transition table is known, so a model's samples and predictions can be judged exactly rather than
against a teacher: :func:`evaluate_generations` samples continuations of prompts with
:func:`lightning_distill.generation.sample_completions` and measures how often, and with how much probability, the
model leaves the language; :func:`next_token_nll` scores it on fresh sequences of the chain.

Token ``0`` is :data:`~lightning_distill.demos.markov.PAD`: it never occurs in the chain (its column of the
transition table is zero), so a model that emits it makes an impossible transition. ``PAD`` is no state of the
chain either (its row is zero), so the token *after* a generated ``PAD`` is not scored.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_distill.demos.markov import PAD, MarkovLanguage, _check_int
from lightning_distill.generation import _causal_lm_logits, _eval_mode, sample_completions

__all__ = ["evaluate_generations", "next_token_nll"]


def next_token_nll(
    model: nn.Module, language: MarkovLanguage, *, num_sequences: int = 256, length: int = 32, seed: int = 0
) -> float:
    """The model's mean next-token negative log-likelihood on fresh sequences of the chain, in nats per token.

    ``num_sequences`` sequences of ``length`` tokens are drawn with ``language.sample(num_sequences, length, seed)``
    (pick a seed that did not make the training data) and the model is run on each whole sequence (no padding);
    the result is the mean of ``-log p_model(x[t + 1] | x[0 .. t])`` over the positions ``t = 0 .. length - 2`` of
    every sequence, ``p_model`` the softmax of the logits in float64. That is the cross-entropy at the positions a
    model trained on sequences of ``length`` tokens was trained on. The best possible value on the same sequences
    is ``-language.log_likelihood(tokens)`` (the true chain), close to :meth:`MarkovLanguage.entropy_rate`.

    The model runs in eval mode under :func:`torch.no_grad` (its training flags are restored), on its own device.

    Args:
        model: A causal LM returning ``(B, L, vocab_size)`` logits (see
            :func:`~lightning_distill.generation.sample_completions` for the accepted outputs).
        language: The chain.
        num_sequences: Number of sequences (``>= 1``).
        length: Tokens per sequence (``>= 2``).
        seed: Seed of the sequences.

    Raises:
        TypeError: If ``language`` is not a :class:`MarkovLanguage`.
        ValueError: If an argument is out of range or the model's vocabulary is not the language's.

    Example::

        >>> import math
        >>> import torch
        >>> from torch import nn
        >>> class Uniform(nn.Module):
        ...     def forward(self, input_ids, attention_mask=None):
        ...         return torch.zeros(*input_ids.shape, 8)
        >>> language = MarkovLanguage(vocab_size=8, branching=2, seed=0)
        >>> math.isclose(next_token_nll(Uniform(), language, num_sequences=4, length=6), math.log(8))
        True
    """
    _check_language(language)
    _check_int("num_sequences", num_sequences, minimum=1)
    _check_int("length", length, minimum=2)
    _check_int("seed", seed)
    tokens = language.sample(num_sequences, length, seed=seed).to(_device(model))
    with _eval_mode(model), torch.no_grad():
        logits = _causal_lm_logits(model, tokens, torch.ones_like(tokens))
    _check_vocab(logits, language)
    log_probs = logits[:, :-1].double().log_softmax(dim=-1)
    return float(-log_probs.gather(-1, tokens[:, 1:].unsqueeze(-1)).mean())


def evaluate_generations(
    model: nn.Module,
    language: MarkovLanguage,
    prompts: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    nll_sequences: int = 256,
    nll_length: int | None = None,
    nll_seed: int = 0,
) -> dict[str, float]:
    """Sample continuations of ``prompts`` from ``model`` and judge them, and the model, against the true chain.

    The continuations come from :func:`~lightning_distill.generation.sample_completions` (with ``max_new_tokens``,
    ``temperature``, ``top_k``, ``top_p`` and ``generator``; no end-of-sequence token). A *scored transition* is a
    sampled token ``y`` together with the token ``x`` right before it (for the first sampled token, the last real
    prompt token), when ``x`` is a real token (not ``PAD``; see the module docstring). The returned dict holds:

    - ``"impossible_rate"``: the share of scored transitions with ``language.transitions[x, y] == 0`` (``y`` cannot
      follow ``x`` in the chain; ``y == PAD`` included).
    - ``"impossible_mass"``: the mean, over the scored transitions, of the probability the model puts on the tokens
      that cannot follow ``x``: ``sum_j p_model(j | prefix) [transitions[x, j] == 0]``, where ``p_model`` is the
      softmax of the logits of a full forward of prompt + continuation (temperature 1, no top-k / top-p cut: the
      model's own distribution, at the contexts its sampling reached), in float64.
    - ``"transitions"``: the number of scored transitions.
    - ``"nll"``: :func:`next_token_nll` on ``nll_sequences`` fresh sequences of ``nll_length`` tokens (default:
      the prompt width plus ``max_new_tokens``) drawn with seed ``nll_seed``.
    - ``"nll_chain"``: the true chain's NLL on the same sequences, ``-language.log_likelihood(tokens)``: the floor
      of ``"nll"`` (their difference estimates the model's mean KL divergence from the chain).
    - ``"entropy_rate"``: :meth:`MarkovLanguage.entropy_rate`, the long-sequence limit of ``"nll_chain"``.

    A model that has learned the chain has ``impossible_rate`` and ``impossible_mass`` near 0 and ``nll`` near
    ``nll_chain``; a model with uniform logits has ``impossible_mass = (V - b) / V`` exactly and
    ``impossible_rate`` near it, for ``V = vocab_size`` and ``b = branching``.

    Args:
        model: A causal LM returning ``(B, L, vocab_size)`` logits.
        language: The chain.
        prompts: ``(B, P)`` prompt tokens, real ones in ``[1, vocab_size - 1]`` (e.g. ``language.sample(B, P,
            seed)``), padded where ``attention_mask`` is 0.
        attention_mask: ``(B, P)``, nonzero at real prompt tokens (default: all real).
        max_new_tokens: Tokens sampled per prompt (``>= 1``).
        temperature: Sampling temperature (``0``: greedy).
        top_k: Top-k cut of the sampling, or ``None``.
        top_p: Nucleus cut of the sampling, or ``None``.
        generator: Source of the sampling's randomness.
        nll_sequences: Sequences for ``"nll"`` (``>= 1``).
        nll_length: Their length (``>= 2``; default ``P + max_new_tokens``).
        nll_seed: Their seed (pick one that did not make the training data).

    Returns:
        The dict above, of Python floats.

    Raises:
        TypeError: If ``language`` is not a :class:`MarkovLanguage`.
        ValueError: If a prompt token is out of range, the model's vocabulary is not the language's, or another
            argument is out of range (those of :func:`~lightning_distill.generation.sample_completions` included).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> class Uniform(nn.Module):
        ...     def forward(self, input_ids, attention_mask=None):
        ...         return torch.zeros(*input_ids.shape, 8)
        >>> language = MarkovLanguage(vocab_size=8, branching=2, seed=0)
        >>> prompts = language.sample(num_sequences=16, length=3, seed=1)
        >>> report = evaluate_generations(
        ...     Uniform(), language, prompts, max_new_tokens=5, generator=torch.Generator().manual_seed(0)
        ... )
        >>> sorted(report)
        ['entropy_rate', 'impossible_mass', 'impossible_rate', 'nll', 'nll_chain', 'transitions']
        >>> round(report["impossible_mass"], 6)  # (8 - 2) / 8
        0.75
    """
    _check_language(language)
    _check_prompts(prompts, attention_mask, language)
    device = _device(model)
    if isinstance(prompts, Tensor) and prompts.dim() == 2 and prompts.numel():  # else sample_completions says why
        prompts = prompts.to(device)
        # the vocabulary first: a sampled id past the language's would be no token of it
        with _eval_mode(model), torch.no_grad():
            _check_vocab(_causal_lm_logits(model, prompts[:1], torch.ones_like(prompts[:1])), language)
    if isinstance(attention_mask, Tensor):
        attention_mask = attention_mask.to(device)
    completions = sample_completions(
        model,
        prompts,
        attention_mask,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        pad_token_id=PAD,
        generator=generator,
    )
    with _eval_mode(model), torch.no_grad():
        logits = _causal_lm_logits(model, completions.input_ids, completions.attention_mask)
    _check_vocab(logits, language)
    input_ids = completions.input_ids.long()
    previous, sampled = input_ids[:, :-1], input_ids[:, 1:]
    scored = completions.completion_mask[:, 1:] & (previous != PAD)
    transitions = language.transitions.to(device)
    impossible = transitions[previous[scored]] == 0  # (N, V): the tokens that cannot follow each scored x
    probs = logits[:, :-1][scored].double().softmax(dim=-1)
    count = int(scored.sum())
    rate = float(impossible.gather(1, sampled[scored].unsqueeze(1)).double().mean())
    mass = float((probs * impossible).sum(dim=1).mean())
    length = prompts.shape[1] + max_new_tokens if nll_length is None else nll_length
    nll = next_token_nll(model, language, num_sequences=nll_sequences, length=length, seed=nll_seed)
    floor = -language.log_likelihood(language.sample(nll_sequences, length, seed=nll_seed))
    return {
        "impossible_rate": rate,
        "impossible_mass": mass,
        "transitions": float(count),
        "nll": nll,
        "nll_chain": floor,
        "entropy_rate": language.entropy_rate(),
    }


# ---------------------------------------------------------------------------------------------------------- helpers
def _check_language(language: object) -> None:
    if not isinstance(language, MarkovLanguage):
        raise TypeError(f"`language` must be a MarkovLanguage, got {type(language).__name__}")


def _check_prompts(prompts: object, attention_mask: object, language: MarkovLanguage) -> None:
    """Raise if a real prompt token is no token of the language; other faults are left to sample_completions."""
    if not isinstance(prompts, Tensor) or prompts.dim() != 2 or prompts.dtype.is_floating_point:
        return
    if attention_mask is None:
        tokens = prompts.flatten()
    elif isinstance(attention_mask, Tensor) and attention_mask.shape == prompts.shape:
        tokens = prompts[attention_mask.to(prompts.device) != 0]
    else:
        return
    if tokens.numel() and (int(tokens.min()) < 1 or int(tokens.max()) >= language.vocab_size):
        raise ValueError(
            f"the real prompt tokens must be ids of the language, in [1, {language.vocab_size - 1}] (PAD is {PAD}); "
            f"got ids in [{int(tokens.min())}, {int(tokens.max())}]"
        )


def _check_vocab(logits: Tensor, language: MarkovLanguage) -> None:
    if logits.shape[-1] != language.vocab_size:
        raise ValueError(
            f"the model's logits have {logits.shape[-1]} classes, the language {language.vocab_size} tokens: the "
            "model must predict over the language's vocabulary"
        )


def _device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model with neither."""
    tensor: Tensor | None = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device
