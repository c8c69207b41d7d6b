"""Tests for the synthetic Markov language, its padded dataset and the tiny causal transformer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_distill.demos import TinyCausalLM
from lightning_distill.demos.markov import IGNORE_INDEX, PAD, MarkovDataset, MarkovLanguage

# ---------------------------------------------------------------------------------------------------------------
# MarkovLanguage


@pytest.mark.parametrize(("vocab_size", "branching", "seed"), [(64, 4, 0), (16, 2, 3), (5, 4, 1), (2, 1, 0)])
def test_transition_matrix_structure(vocab_size: int, branching: int, seed: int) -> None:
    language = MarkovLanguage(vocab_size=vocab_size, branching=branching, seed=seed)
    transitions = language.transitions
    assert transitions.shape == (vocab_size, vocab_size)
    assert transitions.dtype == torch.float64
    assert (transitions >= 0).all()
    assert (transitions[PAD] == 0).all() and (transitions[:, PAD] == 0).all()
    torch.testing.assert_close(transitions[1:].sum(dim=1), torch.ones(vocab_size - 1, dtype=torch.float64))
    assert ((transitions[1:] > 0).sum(dim=1) == branching).all()


def test_stationary_distribution_is_stationary() -> None:
    language = MarkovLanguage(vocab_size=32, branching=3, seed=5)
    pi = language.stationary_distribution()
    assert pi[PAD] == 0
    assert math.isclose(float(pi.sum()), 1.0, abs_tol=1e-12)
    torch.testing.assert_close(pi @ language.transitions, pi, atol=1e-10, rtol=0)


def test_samples_follow_allowed_transitions() -> None:
    language = MarkovLanguage(vocab_size=32, branching=3, seed=1)
    tokens = language.sample(num_sequences=50, length=40, seed=7)
    assert tokens.shape == (50, 40)
    assert tokens.dtype == torch.int64
    assert ((tokens >= 1) & (tokens < 32)).all()
    probabilities = language.transitions[tokens[:, :-1], tokens[:, 1:]]
    assert (probabilities > 0).all()


def test_same_seed_same_data_different_seed_different_data() -> None:
    first, second = MarkovLanguage(32, 3, seed=4), MarkovLanguage(32, 3, seed=4)
    assert torch.equal(first.transitions, second.transitions)
    assert not torch.equal(first.transitions, MarkovLanguage(32, 3, seed=5).transitions)
    assert torch.equal(first.sample(8, 20, seed=1), second.sample(8, 20, seed=1))
    assert not torch.equal(first.sample(8, 20, seed=1), first.sample(8, 20, seed=2))
    a, b = MarkovDataset(first, 20, seed=3), MarkovDataset(second, 20, seed=3)
    for key in ("input_ids", "attention_mask", "labels"):
        assert all(torch.equal(a[i][key], b[i][key]) for i in range(20))
    c = MarkovDataset(first, 20, seed=4)
    assert not all(torch.equal(a[i]["input_ids"], c[i]["input_ids"]) for i in range(20))


@pytest.mark.parametrize(("vocab_size", "branching", "seed"), [(64, 4, 0), (16, 2, 0)])
def test_entropy_rate_matches_empirical_negative_log_likelihood(vocab_size: int, branching: int, seed: int) -> None:
    language = MarkovLanguage(vocab_size=vocab_size, branching=branching, seed=seed)
    rate = language.entropy_rate()
    assert 0.0 < rate < math.log(branching)
    empirical = -language.log_likelihood(language.sample(num_sequences=64, length=4000, seed=11))
    assert empirical == pytest.approx(rate, rel=0.02)


def test_deterministic_cycle_has_zero_entropy_rate() -> None:
    language = MarkovLanguage(vocab_size=10, branching=1, seed=2)
    assert language.entropy_rate() == pytest.approx(0.0, abs=1e-12)
    assert language.log_likelihood(language.sample(4, 30, seed=0)) == pytest.approx(0.0, abs=1e-12)


def test_log_likelihood_skips_padding_and_accepts_1d() -> None:
    language = MarkovLanguage(vocab_size=16, branching=2, seed=0)
    tokens = language.sample(1, 12, seed=0)
    expected = float(language.transitions[tokens[0, :-1], tokens[0, 1:]].log().mean())
    assert language.log_likelihood(tokens[0]) == pytest.approx(expected)
    padded = torch.cat([tokens, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    assert language.log_likelihood(padded) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------------------------
# MarkovDataset


def test_dataset_items_padding_mask_and_labels() -> None:
    language = MarkovLanguage(vocab_size=16, branching=2, seed=0)
    dataset = MarkovDataset(language, num_sequences=200, max_length=20, min_length=5, seed=0)
    assert len(dataset) == 200
    lengths = []
    for index in range(len(dataset)):
        item = dataset[index]
        assert set(item) == {"input_ids", "attention_mask", "labels"}
        input_ids, mask, labels = item["input_ids"], item["attention_mask"], item["labels"]
        for tensor in (input_ids, mask, labels):
            assert tensor.shape == (20,) and tensor.dtype == torch.int64
        length = int(mask.sum())
        lengths.append(length)
        assert 5 <= length <= 20
        assert (mask[:length] == 1).all() and (mask[length:] == 0).all()  # right padding
        assert (input_ids[:length] >= 1).all() and (input_ids[length:] == PAD).all()
        assert torch.equal(labels[:length], input_ids[:length])  # not shifted
        assert (labels[length:] == IGNORE_INDEX).all()
        assert (language.transitions[input_ids[: length - 1], input_ids[1:length]] > 0).all()
    assert min(lengths) == 5 and max(lengths) == 20  # both ends of the range occur
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=8)))
    assert batch["input_ids"].shape == (8, 20)


def test_dataset_items_are_copies() -> None:
    dataset = MarkovDataset(MarkovLanguage(16, 2), num_sequences=4, max_length=10, min_length=4)
    item = dataset[0]
    item["labels"].fill_(7)
    assert not (dataset[0]["labels"] == 7).all()


# ---------------------------------------------------------------------------------------------------------------
# Bad arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vocab_size": 1}, r"`vocab_size` must be an integer >= 2, got 1"),
        ({"vocab_size": 8.0}, r"`vocab_size` must be an integer, got 8.0"),
        ({"vocab_size": True}, r"`vocab_size` must be an integer, got True"),
        ({"vocab_size": 8, "branching": 0}, r"`branching` must be an integer in \[1, 7\], got 0"),
        ({"vocab_size": 8, "branching": 8}, r"`branching` must be an integer in \[1, 7\], got 8"),
        ({"seed": "0"}, r"`seed` must be an integer, got '0'"),
    ],
)
def test_language_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MarkovLanguage(**kwargs)


def test_language_method_bad_arguments() -> None:
    language = MarkovLanguage(vocab_size=8, branching=2)
    with pytest.raises(ValueError, match=r"`num_sequences` must be an integer >= 1, got 0"):
        language.sample(0, 10, seed=0)
    with pytest.raises(ValueError, match=r"`length` must be an integer >= 1, got -3"):
        language.sample(2, -3, seed=0)
    with pytest.raises(ValueError, match=r"`seed` must be an integer, got None"):
        language.sample(2, 3, seed=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ids in \[0, 7\], got 8"):
        language.log_likelihood(torch.tensor([[1, 8]]))
    with pytest.raises(ValueError, match=r"ids in \[0, 7\], got -1"):
        language.log_likelihood(torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match=r"integer tensor, got dtype torch.float32"):
        language.log_likelihood(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"integer tensor, got list"):
        language.log_likelihood([[1, 2]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"1-D or 2-D integer tensor, got dtype torch.int64 and shape \(1, 1, 2\)"):
        language.log_likelihood(torch.ones(1, 1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"no transition between real tokens"):
        language.log_likelihood(torch.tensor([[3, 0, 0]]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_sequences": 0}, r"`num_sequences` must be an integer >= 1, got 0"),
        ({"num_sequences": 4, "min_length": 1}, r"`min_length` must be an integer >= 2, got 1"),
        ({"num_sequences": 4, "max_length": 2.5}, r"`max_length` must be an integer, got 2.5"),
        (
            {"num_sequences": 4, "max_length": 6, "min_length": 7},
            r"`max_length` must be >= `min_length`, got max_length=6 < min_length=7",
        ),
        ({"num_sequences": 4, "seed": 1.0}, r"`seed` must be an integer, got 1.0"),
    ],
)
def test_dataset_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MarkovDataset(MarkovLanguage(8, 2), **kwargs)


def test_dataset_rejects_non_language() -> None:
    with pytest.raises(TypeError, match=r"`language` must be a MarkovLanguage, got dict"):
        MarkovDataset({}, num_sequences=4)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vocab_size": 0}, r"`vocab_size` must be a positive integer, got 0"),
        ({"dim": -8}, r"`dim` must be a positive integer, got -8"),
        ({"layers": 1.5}, r"`layers` must be a positive integer, got 1.5"),
        ({"heads": 0}, r"`heads` must be a positive integer, got 0"),
        ({"max_length": False}, r"`max_length` must be a positive integer, got False"),
        ({"dim": 30, "heads": 4}, r"`dim` must be divisible by `heads`, got dim=30 and heads=4"),
    ],
)
def test_model_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TinyCausalLM(**kwargs)


def test_model_bad_inputs() -> None:
    model = TinyCausalLM(vocab_size=16, dim=16, layers=1, heads=2, max_length=8)
    with pytest.raises(ValueError, match=r"sequence length 9 exceeds the model's max_length 8"):
        model(torch.ones(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"2-D \(batch, length\) tensor, got \(5,\)"):
        model(torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"integer token ids, got dtype torch.float32"):
        model(torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"shape of `input_ids` \(2, 5\), got \(2, 4\)"):
        model(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------
# TinyCausalLM


def test_model_output_shape_and_layout() -> None:
    model = TinyCausalLM(vocab_size=16, dim=32, layers=3, heads=4, max_length=24)
    logits = model(torch.randint(1, 16, (5, 24)))
    assert logits.shape == (5, 24, 16) and logits.dtype == torch.float32
    assert len(model.blocks) == 3
    block = model.blocks[0]
    assert isinstance(block.attn, torch.nn.MultiheadAttention) and block.attn.batch_first
    assert [name for name, _ in block.named_children()] == ["norm1", "attn", "norm2", "mlp"]
    assert [name for name, _ in model.named_children()] == ["embed", "positions", "blocks", "norm", "head"]
    assert model(torch.randint(1, 16, (2, 1))).shape == (2, 1, 16)  # a single position works


def test_model_is_causal() -> None:
    torch.manual_seed(0)
    model = TinyCausalLM(vocab_size=16, dim=32, layers=2, heads=4, max_length=16).eval()
    input_ids = torch.randint(1, 16, (3, 12))
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        reference = model(input_ids, mask)
        for t in (0, 4, 10):
            changed = input_ids.clone()
            changed[:, t + 1] = changed[:, t + 1] % 15 + 1  # a different real token
            logits = model(changed, mask)
            torch.testing.assert_close(logits[:, : t + 1], reference[:, : t + 1], atol=1e-5, rtol=1e-5)
            assert not torch.allclose(logits[:, t + 1], reference[:, t + 1])


def test_padding_gives_no_nan_and_does_not_change_real_positions() -> None:
    torch.manual_seed(0)
    model = TinyCausalLM(vocab_size=16, dim=32, layers=2, heads=4, max_length=16).eval()
    input_ids = torch.randint(1, 16, (4, 16))
    mask = torch.ones_like(input_ids)
    lengths = [16, 9, 3, 1]
    for row, length in enumerate(lengths):
        input_ids[row, length:] = PAD
        mask[row, length:] = 0
    with torch.no_grad():
        logits = model(input_ids, mask)
        assert torch.isfinite(logits).all()
        for row, length in enumerate(lengths):
            alone = model(input_ids[row : row + 1, :length])
            torch.testing.assert_close(logits[row, :length], alone[0], atol=1e-5, rtol=1e-5)
        # Degenerate inputs: an all-padding row, and left padding (query 0 sees only a padded key).
        weird_mask = mask.clone()
        weird_mask[0] = 0
        weird_mask[1, :2] = 0
        assert torch.isfinite(model(input_ids, weird_mask)).all()
        assert torch.isfinite(model(input_ids, mask.bool())).all()
    model.train()
    loss = model(input_ids, mask).sum()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )


def test_training_reaches_the_entropy_rate() -> None:
    torch.manual_seed(0)
    language = MarkovLanguage(vocab_size=16, branching=2, seed=0)
    rate = language.entropy_rate()
    train = MarkovDataset(language, num_sequences=2048, max_length=32, min_length=8, seed=1)
    held_out = MarkovDataset(language, num_sequences=512, max_length=32, min_length=8, seed=2)
    model = TinyCausalLM(vocab_size=16, dim=32, layers=1, heads=2, max_length=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def held_out_loss() -> float:
        with torch.no_grad():
            logits = model(held_out.input_ids, held_out.attention_mask)
            return float(_shifted_cross_entropy(logits, held_out.labels))

    initial = held_out_loss()
    assert initial > rate + 1.0
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        index = torch.randint(len(train), (64,), generator=generator)
        logits = model(train.input_ids[index], train.attention_mask[index])
        loss = _shifted_cross_entropy(logits, train.labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = held_out_loss()
    assert abs(final - rate) < 0.15, f"held-out cross-entropy {final:.4f} vs entropy rate {rate:.4f}"
