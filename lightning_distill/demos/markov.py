"""A synthetic "language" for sequence-distillation tests and demos: a random first-order Markov chain over tokens.

Token ``0`` is reserved for padding (:data:`PAD`); the real tokens are ``1 .. vocab_size - 1``. Because the chain is
known exactly, so is the best achievable next-token cross-entropy: the chain's entropy rate
(:meth:`MarkovLanguage.entropy_rate`). A causal language model trained on :class:`MarkovDataset` can therefore be
checked against that floor, and a distilled student against both the floor and its teacher.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["IGNORE_INDEX", "PAD", "MarkovDataset", "MarkovLanguage"]

PAD = 0
"""The padding token id; it never occurs inside a sequence."""

IGNORE_INDEX = -100
"""The label at padded positions, ``torch.nn.functional.cross_entropy``'s default ``ignore_index``."""

_POWER_ITERATION_TOL = 1e-13
_POWER_ITERATION_MAX_STEPS = 1_000_000


def _check_int(name: str, value: object, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` if it is an ``int`` (not a ``bool``) in ``[minimum, maximum]``, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{name}` must be an integer, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if maximum is None:
            valid = f">= {minimum}"
        elif minimum is None:
            valid = f"<= {maximum}"
        else:
            valid = f"in [{minimum}, {maximum}]"
        raise ValueError(f"`{name}` must be an integer {valid}, got {value!r}")
    return value


class MarkovLanguage:
    """A random first-order Markov chain over the tokens ``1 .. vocab_size - 1`` (token ``0`` is :data:`PAD`).

    Every real token has exactly ``branching`` possible next tokens, with probabilities drawn from a flat Dirichlet
    distribution (normalised exponential draws) by a :class:`torch.Generator` seeded with ``seed``. One of the
    ``branching`` successors of each token is its successor on a random cycle through all real tokens, so the
    chain is irreducible and has a unique stationary distribution; the others are distinct tokens drawn uniformly
    (a token may follow itself). With ``branching=1`` the language is that deterministic cycle (entropy rate 0).

    Attributes:
        vocab_size: Number of token ids, ``PAD`` included.
        branching: Number of possible next tokens of each real token.
        seed: Seed of the chain.
        transitions: The dense ``(vocab_size, vocab_size)`` float64 transition matrix: ``transitions[i, j]`` is
            the probability that token ``j`` follows token ``i``. Row and column ``PAD`` are zero; every other row
            has ``branching`` nonzero entries summing to one.

    Args:
        vocab_size: Number of token ids including ``PAD`` (``>= 2``).
        branching: Number of possible next tokens per token, in ``[1, vocab_size - 1]``.
        seed: Seed of the random chain.

    Raises:
        ValueError: If an argument is not an integer in its range.

    Example::

        >>> import math
        >>> language = MarkovLanguage(vocab_size=8, branching=2, seed=0)
        >>> language.transitions.shape, language.transitions.dtype
        (torch.Size([8, 8]), torch.float64)
        >>> [int(n) for n in (language.transitions[1:] > 0).sum(dim=1)]
        [2, 2, 2, 2, 2, 2, 2]
        >>> tokens = language.sample(num_sequences=3, length=10, seed=1)
        >>> tokens.shape, tokens.dtype, bool((tokens > 0).all())
        (torch.Size([3, 10]), torch.int64, True)
        >>> 0.0 <= language.entropy_rate() <= math.log(2)
        True
    """

    def __init__(self, vocab_size: int = 64, branching: int = 4, seed: int = 0) -> None:
        self.vocab_size = _check_int("vocab_size", vocab_size, minimum=2)
        self.branching = _check_int("branching", branching, minimum=1, maximum=vocab_size - 1)
        self.seed = _check_int("seed", seed)
        self.transitions = self._build(vocab_size, branching, seed)
        self._stationary: Tensor | None = None

    @staticmethod
    def _build(vocab_size: int, branching: int, seed: int) -> Tensor:
        """Draw the transition matrix (see the class docstring)."""
        generator = torch.Generator().manual_seed(seed)
        num_real = vocab_size - 1
        cycle = torch.randperm(num_real, generator=generator) + 1
        cycle_next = torch.empty(vocab_size, dtype=torch.long)
        cycle_next[cycle] = cycle.roll(-1)
        transitions = torch.zeros(vocab_size, vocab_size, dtype=torch.float64)
        real_tokens = torch.arange(1, vocab_size)
        for token in range(1, vocab_size):
            forced = int(cycle_next[token])
            others = real_tokens[real_tokens != forced]
            others = others[torch.randperm(others.numel(), generator=generator)[: branching - 1]]
            successors = torch.cat([torch.tensor([forced]), others])
            weights = torch.empty(branching, dtype=torch.float64).exponential_(generator=generator)
            transitions[token, successors] = weights / weights.sum()
        return transitions

    def stationary_distribution(self) -> Tensor:
        """The stationary distribution over the token ids, by power iteration (cached).

        Iterates the lazy chain ``(I + P) / 2`` from the uniform distribution over the real tokens: it has the same
        stationary distribution as ``P`` and is aperiodic, so the iteration converges even if ``P`` is periodic.

        Returns:
            A ``(vocab_size,)`` float64 probability vector, zero at ``PAD``.
        """
        if self._stationary is None:
            distribution = torch.zeros(self.vocab_size, dtype=torch.float64)
            distribution[1:] = 1.0 / (self.vocab_size - 1)
            for _ in range(_POWER_ITERATION_MAX_STEPS):
                updated = 0.5 * (distribution + distribution @ self.transitions)
                change = float((updated - distribution).abs().sum())
                distribution = updated
                if change < _POWER_ITERATION_TOL:
                    break
            self._stationary = distribution / distribution.sum()
        return self._stationary.clone()

    def entropy_rate(self) -> float:
        """The entropy rate of the chain in nats per token.

        This is ``-sum_i pi_i sum_j P_ij log P_ij`` with ``pi`` the stationary distribution
        (:meth:`stationary_distribution`): the expected negative log-likelihood of the next token given the
        current one, i.e. the lowest per-token cross-entropy (log-perplexity) any model can reach on long samples.

        Returns:
            The entropy rate, in ``[0, log(branching)]``.
        """
        transitions = self.transitions
        row_entropy = -torch.where(transitions > 0, transitions * transitions.log(), 0.0).sum(dim=1)
        return float(self.stationary_distribution() @ row_entropy)

    def sample(self, num_sequences: int, length: int, seed: int) -> Tensor:
        """Sample sequences from the chain.

        The first token of each sequence is drawn uniformly from the real tokens, every next one from the
        transition row of its predecessor; all randomness comes from a generator seeded with ``seed``.

        Args:
            num_sequences: Number of sequences (``>= 1``).
            length: Tokens per sequence (``>= 1``).
            seed: Seed of the sampling.

        Returns:
            An int64 tensor of shape ``(num_sequences, length)`` with tokens in ``[1, vocab_size - 1]``.

        Raises:
            ValueError: If an argument is not an integer in its range.
        """
        _check_int("num_sequences", num_sequences, minimum=1)
        _check_int("length", length, minimum=1)
        _check_int("seed", seed)
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.empty(num_sequences, length, dtype=torch.long)
        tokens[:, 0] = torch.randint(1, self.vocab_size, (num_sequences,), generator=generator)
        for position in range(1, length):
            rows = self.transitions[tokens[:, position - 1]]
            tokens[:, position] = torch.multinomial(rows, 1, generator=generator).squeeze(1)
        return tokens

    def log_likelihood(self, tokens: Tensor) -> float:
        """Mean log-probability per transition of the given sequences under the chain.

        Transitions from or to ``PAD`` are skipped, so right-padded ``input_ids`` (e.g. from
        :class:`MarkovDataset`) can be passed as they are. The first token of a sequence is not scored.

        Args:
            tokens: Integer tensor of shape ``(length,)`` or ``(num_sequences, length)`` with ids in
                ``[0, vocab_size - 1]``.

        Returns:
            The mean of ``log transitions[x_t, x_{t+1}]`` over all scored transitions (``-inf`` if one of them is
            impossible under the chain). Its negation is the per-token cross-entropy of the true model.

        Raises:
            ValueError: If ``tokens`` is not a 1-D or 2-D integer tensor, has an id out of range, or holds no
                transition between real tokens.
        """
        if not isinstance(tokens, Tensor):
            raise ValueError(f"`tokens` must be an integer tensor, got {type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"`tokens` must be an integer tensor, got dtype {tokens.dtype}")
        if tokens.dim() not in (1, 2):
            raise ValueError(
                f"`tokens` must be a 1-D or 2-D integer tensor, got dtype {tokens.dtype} and shape "
                f"{tuple(tokens.shape)}"
            )
        tokens = tokens.detach().to("cpu", torch.long)
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.numel() > 0:
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= self.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"`tokens` must hold ids in [0, {self.vocab_size - 1}], got {bad}")
        current, following = tokens[:, :-1], tokens[:, 1:]
        scored = (current != PAD) & (following != PAD)
        if not bool(scored.any()):
            raise ValueError(f"`tokens` of shape {tuple(tokens.shape)} hold no transition between real tokens to score")
        probabilities = self.transitions[current[scored], following[scored]]
        return float(probabilities.log().mean())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, branching={self.branching}, seed={self.seed})"


class MarkovDataset(Dataset):
    """Right-padded sequences of random lengths sampled from a :class:`MarkovLanguage`, for causal LM training.

    Sequence ``i`` has a length drawn uniformly from ``[min_length, max_length]`` and is padded with ``PAD`` up to
    ``max_length``. Each item is a dict of three ``(max_length,)`` int64 tensors:

    - ``input_ids``: the tokens, ``PAD`` (0) after the end of the sequence;
    - ``attention_mask``: 1 at real tokens, 0 at padding;
    - ``labels``: ``input_ids`` with :data:`IGNORE_INDEX` (-100) at padding. Labels are *not* shifted (the
      causal-LM convention): position ``t``'s logits are scored against ``labels[t + 1]``.

    All randomness (lengths and tokens) comes from ``seed``, so the same arguments give the same data.

    Args:
        language: The language to sample from.
        num_sequences: Number of sequences (``>= 1``).
        max_length: Longest sequence and padded length (``>= min_length``).
        min_length: Shortest sequence (``>= 2``, so that every sequence has a transition to predict).
        seed: Seed of the lengths and tokens.

    Raises:
        TypeError: If ``language`` is not a :class:`MarkovLanguage`.
        ValueError: If another argument is not an integer in its range.

    Example::

        >>> language = MarkovLanguage(vocab_size=16, branching=2, seed=0)
        >>> dataset = MarkovDataset(language, num_sequences=100, max_length=12, min_length=4, seed=0)
        >>> len(dataset)
        100
        >>> item = dataset[0]
        >>> sorted(item), item["input_ids"].shape
        (['attention_mask', 'input_ids', 'labels'], torch.Size([12]))
        >>> bool((item["labels"] == item["input_ids"].masked_fill(item["attention_mask"] == 0, -100)).all())
        True
    """

    def __init__(
        self,
        language: MarkovLanguage,
        num_sequences: int,
        max_length: int = 32,
        min_length: int = 8,
        seed: int = 0,
    ) -> None:
        if not isinstance(language, MarkovLanguage):
            raise TypeError(f"`language` must be a MarkovLanguage, got {type(language).__name__}")
        self.language = language
        self.num_sequences = _check_int("num_sequences", num_sequences, minimum=1)
        self.min_length = _check_int("min_length", min_length, minimum=2)
        self.max_length = _check_int("max_length", max_length)
        if max_length < min_length:
            raise ValueError(
                f"`max_length` must be >= `min_length`, got max_length={max_length!r} < min_length={min_length!r}"
            )
        self.seed = _check_int("seed", seed)
        generator = torch.Generator().manual_seed(seed)
        self.lengths = torch.randint(min_length, max_length + 1, (num_sequences,), generator=generator)
        token_seed = int(torch.randint(2**62, (), generator=generator))
        tokens = language.sample(num_sequences, max_length, seed=token_seed)
        self.attention_mask = (torch.arange(max_length) < self.lengths.unsqueeze(1)).long()
        self.input_ids = tokens.masked_fill(self.attention_mask == 0, PAD)
        self.labels = tokens.masked_fill(self.attention_mask == 0, IGNORE_INDEX)

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {
            "input_ids": self.input_ids[index].clone(),
            "attention_mask": self.attention_mask[index].clone(),
            "labels": self.labels[index].clone(),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.language!r}, num_sequences={self.num_sequences}, "
            f"max_length={self.max_length}, min_length={self.min_length}, seed={self.seed})"
        )
