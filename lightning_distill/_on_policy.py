r"""On-policy distillation for causal language models (GKD): the student learns on continuations it samples itself.

With :class:`OnPolicy` given to :class:`~lightning_distill.DistillModule`, each training batch of prompts is
replaced **before the teacher sees it** (when the callback asks the module for the teacher's request in
``on_train_batch_start``, the module splits the batch once a step, and the split of an on-policy batch is that of the
new batch): with probability ``fraction`` (GKD's :math:`\lambda`) the current student samples a continuation of every
prompt (eval mode, no gradient), and the batch becomes prompt + completion with ``labels`` set on the completion
tokens only; the teacher then scores every token of it and the loss is the token-level divergence on the completion,

.. math::
    \mathcal{L} = T^2 \, \frac{1}{|C|} \sum_{(b, t) \in C} D\big(p_t(\cdot \mid y_{b, \le t}),\,
    p_s(\cdot \mid y_{b, \le t})\big), \qquad y_b \sim p_s(\cdot \mid x_b)

(:math:`C` the positions that predict a completion token). The other batches are the dataset's own sequences and
count as usual (KD and cross-entropy). The cross-entropy on generated tokens is off by default: the sampled tokens
are the student's own guesses, not labels (``task_loss=True`` turns it on, weighted ``1 - alpha`` as usual).

Sampling is reproducible and resumable without any state but one seed: each batch's generator is seeded from
``(seed, batch number, global rank)``, so a resumed fit samples what the uninterrupted one would, and each DDP
process samples its own continuations.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_distill._contract import TeacherConnection, TeacherRequest
from lightning_distill.generation import Completions, sample_completions
from lightning_distill.losses.functional._common import is_real_number

if TYPE_CHECKING:
    from lightning_distill.module import DistillModule
    from lightning_distill.objective import DistillationObjective

__all__ = ["OnPolicy"]

_MIX = 0x9E3779B97F4A7C15  # the golden-ratio constant of splitmix64: spreads neighbouring batch numbers apart


@dataclass(frozen=True)
class OnPolicy:
    r"""How a :class:`~lightning_distill.DistillModule` samples the sequences it is distilled on (GKD).

    Attributes:
        fraction: GKD's :math:`\lambda`: the share of training batches whose continuations are sampled (each batch
            decides with this probability); the other batches are the dataset's own sequences, used as given.
        max_new_tokens: Tokens sampled after each prompt (fewer where a row reaches ``eos_token_id``).
        temperature: Sampling temperature (``0`` is greedy decoding). Independent of the KD ``temperature``.
        top_k: Sample among the ``top_k`` most likely tokens only (``None``: all).
        top_p: Nucleus sampling: among the most likely tokens whose probabilities sum to ``top_p`` (``None``: all).
        prompt_length: The prompt is the first ``prompt_length`` real tokens of each sequence of the batch; ``None``:
            every real token of ``input_ids`` (a loader of prompts). Explicit, never guessed from the labels.
        eos_token_id: A row stops at this token (kept, and scored); the positions after it are padding.
        pad_token_id: The token id written at padding positions (masked out by ``attention_mask``).
        seq_kd: Sample from the **teacher** instead (sequence-level KD, GKD's ``seq_kd``): slower, as the teacher is
            re-run for every new token through the callback's placement (no KV cache).
        task_loss: Also train cross-entropy (weight ``1 - alpha``) on the generated tokens. Off by default.
        seed: The seed of the sampling; ``None`` takes ``torch.initial_seed()`` at the start of the fit (set by
            ``L.seed_everything``), and the seed in use is kept in the checkpoint.

    Raises:
        ValueError: For a value outside its range, naming it.

    Example::

        >>> OnPolicy(fraction=0.5, max_new_tokens=16).fraction
        0.5
        >>> OnPolicy(fraction=1.5)
        Traceback (most recent call last):
        ...
        ValueError: `OnPolicy(fraction=1.5)`: the share of on-policy batches must be in [0, 1].
    """

    fraction: float = 1.0
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    prompt_length: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int = 0
    seq_kd: bool = False
    task_loss: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"`OnPolicy({name}={getattr(self, name)!r})`: {why}.")

        if not is_real_number(self.fraction) or not 0.0 <= float(self.fraction) <= 1.0:
            raise bad("fraction", "the share of on-policy batches must be in [0, 1]")
        if not is_real_number(self.temperature) or not 0.0 <= float(self.temperature) < math.inf:
            raise bad("temperature", "the sampling temperature must be >= 0 (0 is greedy)")
        for name, minimum in (("max_new_tokens", 1), ("top_k", 1), ("prompt_length", 1), ("pad_token_id", 0)):
            value = getattr(self, name)
            if value is None and name not in ("max_new_tokens", "pad_token_id"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise bad(
                    name, f"must be an int >= {minimum}" + (" or None" if name in ("top_k", "prompt_length") else "")
                )
        if self.eos_token_id is not None and (
            isinstance(self.eos_token_id, bool) or not isinstance(self.eos_token_id, int)
        ):
            raise bad("eos_token_id", "must be a token id (int) or None")
        if self.top_p is not None and (not is_real_number(self.top_p) or not 0.0 < float(self.top_p) <= 1.0):
            raise bad("top_p", "the nucleus mass must be in (0, 1] or None")
        for name in ("seq_kd", "task_loss"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be True or False")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad("seed", "must be an int or None")


@dataclass(frozen=True)
class Rewritten:
    """An on-policy batch and what to log about it."""

    batch: dict[str, Tensor]
    completion_length: Tensor  # mean sampled tokens per row
    completion_share: Tensor  # sampled tokens / real tokens

    def figures(self, terms: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The step's on-policy figures, logged as ``train/on_policy/*``; ``kd_loss`` is on generated tokens only."""
        figures = {
            "on_policy/completion_length": self.completion_length,
            "on_policy/completion_share": self.completion_share,
        }
        if "kd_loss" in terms:
            figures["on_policy/kd_loss"] = terms["kd_loss"]
        return figures


def check_on_policy(config: OnPolicy | Mapping[str, Any] | None, objective: DistillationObjective) -> OnPolicy | None:
    """Return ``config`` if the objective can learn from sampled sequences with it, else raise naming the clash."""
    if config is None:
        return None
    if isinstance(config, Mapping):  # its config dict: from a checkpoint's hyper-parameters or a YAML file
        known = [field.name for field in dataclasses.fields(OnPolicy)]
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise ValueError(f"`on_policy` has unknown keys {unknown}; OnPolicy takes {', '.join(known)}.")
        config = OnPolicy(**config)
    if not isinstance(config, OnPolicy):
        raise TypeError(f"`on_policy` must be an OnPolicy, its config dict or None, got {type(config).__name__}.")
    if not objective.shift_labels:
        raise ValueError(
            "`on_policy` samples continuations from a causal language model, whose logits at t predict token t + 1. "
            "HINT: pass `shift_labels=True` too."
        )
    if objective.divergence == "dkd":
        raise ValueError(
            "divergence='dkd' splits the distributions at the target token, but a sampled token is the student's "
            "guess, not a label. HINT: use divergence='kl', 'reverse_kl' or 'js' (GKD's generalized JSD) on-policy."
        )
    return config


def sample_batch(module: DistillModule, config: OnPolicy, batch: Any, seed: int | None) -> tuple[int, Rewritten | None]:
    """Decide whether this training batch is on-policy and, if so, sample it; returns the seed in use and the batch.

    Raises:
        RuntimeError: For ``seq_kd=True`` without a connected teacher.
    """
    trainer = module.trainer
    if seed is None:  # the first batch of the fit (a resumed fit has the checkpoint's)
        seed = torch.initial_seed() % 2**63 if config.seed is None else config.seed
    batch_number = trainer.fit_loop.epoch_loop.total_batch_idx
    if not takes_this_batch(config, batch_seed(seed, batch_number, 0)):  # every process decides alike
        if module.hparam_values()["alpha"] < 1.0 and module.split_batch(batch)[1] is None:
            raise ValueError(
                f"`OnPolicy(fraction={config.fraction})` trains the other batches as the dataset's own sequences, "
                f"weighted alpha={module.hparam_values()['alpha']} KD + (1 - alpha) cross-entropy, but this batch "
                "has no labels. HINT: give `labels` in the batches, or pass `alpha=1.0` (KD only)."
            )
        return seed, None
    this = batch_seed(seed, batch_number, trainer.global_rank)  # each process samples its own continuations
    model: nn.Module
    if config.seq_kd:
        if module._teacher is None:
            raise RuntimeError(
                "`OnPolicy(seq_kd=True)` samples from the teacher, but none is connected. HINT: add "
                "`DistillationCallback(teacher)` to the Trainer."
            )
        model = _ConnectedTeacher(module._teacher)
    else:
        model = module.student if module.student is not None else module
    limit = None if module._teacher is None else module._teacher.max_length
    return seed, rewrite(config, batch, model, this, module.ignore_index, limit)


def batch_seed(seed: int, batch_number: int, rank: int) -> int:
    """A 63-bit seed for one batch of one process (splitmix64 of the three numbers): neighbours land far apart.

    Example::

        >>> batch_seed(0, 1, 0) != batch_seed(0, 2, 0) != batch_seed(0, 1, 1)
        True
    """
    z = (seed * _MIX + batch_number * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) >> 1


def prompts_of(batch: Any, prompt_length: int | None) -> tuple[Tensor, Tensor]:
    """The prompts ``(input_ids, attention_mask)`` of a batch of sequences (see :attr:`OnPolicy.prompt_length`).

    Raises:
        TypeError: If the batch is not a mapping with an integer ``input_ids`` tensor.
        ValueError: If a prompt would be empty or a row is shorter than ``prompt_length``.
    """
    if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), Tensor):
        raise TypeError(
            f"On-policy distillation samples continuations of `input_ids`, but the batch is a "
            f"{type(batch).__name__}{'' if not isinstance(batch, Mapping) else ' with keys ' + str(sorted(batch))}. "
            "HINT: give batches as dicts with `input_ids` (and `attention_mask`), as a tokenizer returns them."
        )
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else (mask != 0).to(input_ids.dtype)
    lengths = mask.sum(-1)
    if prompt_length is None:
        return input_ids, mask
    short = (lengths < prompt_length).nonzero().flatten()
    if short.numel():
        raise ValueError(
            f"`OnPolicy(prompt_length={prompt_length})` takes the first {prompt_length} tokens of every sequence, but "
            f"rows {short.tolist()[:8]} have only {lengths[short].tolist()[:8]} real tokens. HINT: lower "
            "`prompt_length`, or give a loader of prompts with `prompt_length=None`."
        )
    return input_ids, mask * (mask.cumsum(-1) <= prompt_length)  # the first real tokens, whichever side pads


class _ConnectedTeacher(nn.Module):
    """The connected teacher as a causal LM for sampling: run through the callback's placement and precision."""

    def __init__(self, connection: TeacherConnection) -> None:
        super().__init__()
        self.connection = connection
        self.max_length = connection.max_length  # read by the sampler's length check

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        return self.connection.run(TeacherRequest(inputs, None, 1.0, features=False)).logits


def rewrite(
    config: OnPolicy,
    batch: Any,
    model: nn.Module,
    seed: int,
    ignore_index: int,
    teacher_max_length: int | None = None,
) -> Rewritten:
    """Sample a continuation of each prompt of ``batch`` from ``model`` and return the training batch built of them.

    ``labels`` hold the completion tokens and ``ignore_index`` elsewhere (with ``shift_labels`` the logits at t are
    scored against token t + 1, so the last prompt position predicts the first completion token).
    """
    input_ids, attention_mask = prompts_of(batch, config.prompt_length)
    if teacher_max_length is not None:
        longest = int(attention_mask.sum(-1).max()) + config.max_new_tokens
        if longest > teacher_max_length:
            raise ValueError(
                f"On-policy sequences reach {longest} tokens (prompts + `max_new_tokens={config.max_new_tokens}`), "
                f"but the teacher takes at most {teacher_max_length}. HINT: lower `max_new_tokens` or shorten the "
                "prompts (`prompt_length`)."
            )
    generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    completions: Completions = sample_completions(
        model,
        input_ids,
        attention_mask,
        max_new_tokens=config.max_new_tokens,
        temperature=float(config.temperature),
        top_k=config.top_k,
        top_p=None if config.top_p is None else float(config.top_p),
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        generator=generator,
    )
    new = completions.as_batch(ignore_index=ignore_index)
    real = completions.attention_mask.sum().clamp_min(1)
    sampled = completions.completion_mask.sum()
    rows = max(completions.input_ids.shape[0], 1)
    return Rewritten(new, sampled / rows, sampled / real)


def takes_this_batch(config: OnPolicy, seed: int) -> bool:
    """Whether a batch with this seed is on-policy: a draw below ``fraction`` (always for 1, never for 0)."""
    if config.fraction >= 1.0:
        return True
    if config.fraction <= 0.0:
        return False
    draw = torch.rand((), generator=torch.Generator().manual_seed(seed ^ 0x5DEECE66D))
    return bool(draw < config.fraction)
