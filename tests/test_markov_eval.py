"""``lightning_distill.demos.markov_eval``: the exact evaluation against the Markov chain, on closed-form cases.

The true chain as a model: no impossible transition, no mass on one, NLL = the chain's own. Uniform logits: mass
(V - b) / V exactly, the impossible share within a binomial bound of it, NLL log V. Deterministic models pin the
alignment (the first sampled token follows the last real prompt token) and the PAD rules.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lightning_distill.demos import MarkovDataset, MarkovLanguage, TinyCausalLM, evaluate_generations, next_token_nll
from lightning_distill.demos.markov import PAD

V, B = 24, 3


@pytest.fixture(scope="module")
def language() -> MarkovLanguage:
    return MarkovLanguage(vocab_size=V, branching=B, seed=3)


class TableModel(nn.Module):
    """Logits ``table[current token]``: a first-order model, causal by construction."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.table[input_ids]


def oracle(language: MarkovLanguage) -> TableModel:
    """The chain's true log transition probabilities; PAD's (all-zero) row uniform, never reached."""
    table = language.transitions.log().float()
    table[PAD] = 0.0
    return TableModel(table)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_true_chain_makes_no_impossible_transition_and_reaches_the_chains_nll(language):
    prompts = language.sample(64, 4, seed=10)
    report = evaluate_generations(
        oracle(language), language, prompts, max_new_tokens=20, generator=_generator(), nll_sequences=128, nll_seed=7
    )
    assert report["impossible_rate"] == 0.0 and report["impossible_mass"] == 0.0
    assert report["transitions"] == 64 * 20  # no PAD sampled: every sampled token is scored
    held_out = language.sample(128, 24, seed=7)  # nll_length defaults to 4 + 20
    chain_nll = -language.log_likelihood(held_out)  # computed separately: the chain's conditional entropy estimate
    assert report["nll"] == pytest.approx(chain_nll, abs=1e-6)
    assert report["nll_chain"] == pytest.approx(chain_nll, rel=1e-12)
    assert report["entropy_rate"] == language.entropy_rate()
    assert abs(report["nll"] - language.entropy_rate()) < 0.1  # a finite sample of the entropy rate


def test_uniform_logits_have_the_closed_form_mass_and_share(language):
    uniform = TableModel(torch.zeros(V, V))
    prompts = language.sample(200, 3, seed=11)
    report = evaluate_generations(uniform, language, prompts, max_new_tokens=25, generator=_generator(1))
    p = (V - B) / V  # V - B impossible next tokens out of V (PAD among them: the chain never emits it)
    assert report["impossible_mass"] == pytest.approx(p, abs=1e-12)
    n = report["transitions"]
    assert 0.9 * 200 * 25 < n < 200 * 25  # tokens after a sampled PAD are not scored (about 1 in V)
    assert abs(report["impossible_rate"] - p) <= 5 * math.sqrt(p * (1 - p) / n)
    assert report["nll"] == pytest.approx(math.log(V), abs=1e-12)


def test_the_first_sampled_token_follows_the_last_real_prompt_token(language):
    """A deterministic model whose every step is possible (or impossible): the alignment leaves no slack."""
    transitions = language.transitions
    best = transitions.argmax(dim=1)  # the most likely successor of each real token
    never = (transitions[:, 1:] == 0).float().argmax(dim=1) + 1  # a real token that cannot follow it
    assert bool((transitions[torch.arange(1, V), never[1:]] == 0).all())
    for successor, expected in ((best, 0.0), (never, 1.0)):
        table = torch.full((V, V), -40.0)
        table[torch.arange(V), successor] = 40.0
        prompts = language.sample(6, 5, seed=12)
        mask = (torch.arange(5) < torch.tensor([[5], [1], [3], [2], [5], [4]])).long()
        report = evaluate_generations(
            TableModel(table), language, prompts.masked_fill(mask == 0, PAD), mask, max_new_tokens=7, temperature=0
        )
        assert report["impossible_rate"] == expected and report["transitions"] == 6 * 7
        assert report["impossible_mass"] == pytest.approx(expected, abs=1e-12)


def test_a_sampled_pad_is_impossible_and_what_follows_it_is_not_scored(language):
    table = torch.full((V, V), -40.0)
    table[:, PAD] = 40.0  # always PAD
    report = evaluate_generations(
        TableModel(table), language, language.sample(5, 2, seed=13), max_new_tokens=4, temperature=0
    )
    assert report["transitions"] == 5 and report["impossible_rate"] == 1.0  # only real token -> PAD is scored
    assert report["impossible_mass"] == pytest.approx(1.0, abs=1e-12)


def test_a_trained_student_beats_an_untrained_one(language):
    torch.manual_seed(0)
    data = MarkovDataset(language, num_sequences=1024, max_length=16, min_length=8, seed=1)
    model = TinyCausalLM(vocab_size=V, dim=32, layers=1, heads=2, max_length=32)
    prompts = language.sample(64, 2, seed=14)
    kwargs = dict(max_new_tokens=14, generator=_generator(2), nll_sequences=128, nll_seed=15)
    before = evaluate_generations(model, language, prompts, **kwargs)
    assert model.training  # restored
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(150):
        index = torch.arange(64) + 64 * (step % 16)
        logits = model(data.input_ids[index], data.attention_mask[index])
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), data.labels[index, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate_generations(model, language, prompts, **{**kwargs, "generator": _generator(2)})
    assert after["impossible_mass"] < before["impossible_mass"] / 2
    assert after["impossible_rate"] < before["impossible_rate"] / 2
    assert after["nll_chain"] < after["nll"] < before["nll"]
    assert next_token_nll(model, language, num_sequences=128, length=16, seed=15) == pytest.approx(
        after["nll"], abs=0.05
    )  # the same positions' NLL at length 16 as at 16 (nll_length 2 + 14)


def test_bad_arguments_are_named(language):
    uniform = TableModel(torch.zeros(V, V))
    prompts = language.sample(2, 3, seed=0)
    with pytest.raises(TypeError, match=r"`language` must be a MarkovLanguage, got dict"):
        evaluate_generations(uniform, {}, prompts, max_new_tokens=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"real prompt tokens must be ids of the language, in \[1, 23\]"):
        evaluate_generations(uniform, language, prompts.masked_fill(prompts > 0, 0), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"the model's logits have 30 classes, the language 24 tokens"):
        evaluate_generations(TableModel(torch.zeros(V, 30)), language, prompts, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"`max_new_tokens` must be a positive integer, got 0"):
        evaluate_generations(uniform, language, prompts, max_new_tokens=0)
    with pytest.raises(ValueError, match=r"`length` must be an integer >= 2, got 1"):
        next_token_nll(uniform, language, length=1)
