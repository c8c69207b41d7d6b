"""``lightning_distill.generation.sample_completions`` and the KV cache of ``TinyCausalLM``.

The cached decoding gives the logits of the full forward; the samples are laid out right-padded and contiguous with
the right masks; all randomness comes from the generator; the sampler draws from softmax(logits / T) cut to top-k /
top-p; EOS ends a row; every model family (TinyCausalLM with its cache, Hugging Face GPT-2 with its own, any causal
LM by re-running it) gives the same samples for the same seed as the plain re-forward loop.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lightning_distill.demos import KVCache, TinyCausalLM
from lightning_distill.generation import Completions, sample_completions

VOCAB = 16


def _tiny(heads: int = 2, layers: int = 2, max_length: int = 32, seed: int = 0) -> TinyCausalLM:
    torch.manual_seed(seed)
    model = TinyCausalLM(vocab_size=VOCAB, dim=16, layers=layers, heads=heads, max_length=max_length)
    for p in model.parameters():  # larger weights than the init: logits far from uniform, a real test of equality
        p.data.normal_(0, 0.5)
    return model


def _prompts(lengths: list[int], width: int | None = None, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Right-padded prompts of real tokens in [1, VOCAB) and their mask."""
    width = width or max(lengths)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=g)
    mask = (torch.arange(width) < torch.tensor(lengths).unsqueeze(1)).long()
    return ids.masked_fill(mask == 0, 0), mask


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Table(nn.Module):
    """A causal LM whose next-token logits depend on the current token only: ``table[input_ids]``."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.clone(), requires_grad=False)
        self.calls = 0

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        self.calls += 1
        return self.table[input_ids]


def _successor_table(vocab: int = VOCAB) -> Tensor:
    """Deterministic: token t is followed by t + 1 (and vocab - 1 by 1), by a wide margin."""
    table = torch.zeros(vocab, vocab)
    for t in range(vocab):
        table[t, t + 1 if t + 1 < vocab else 1] = 30.0
    return table


# ------------------------------------------------------------------------------------------- TinyCausalLM KV cache
@pytest.mark.parametrize(("heads", "layers"), [(2, 1), (4, 2)])
@pytest.mark.parametrize("hooked", [False, True])
def test_cached_decoding_gives_the_full_forward_logits_at_every_position(heads, layers, hooked):
    model = _tiny(heads, layers).eval()
    if hooked:  # a hook keeps every layer a module call (no functional fast path): the same numbers
        model.blocks[0].register_forward_hook(lambda *args: None)
    ids, mask = _prompts([12, 7, 3, 1], width=12)
    with torch.no_grad():
        full = model(ids, mask)
        cache = model.new_kv_cache(batch_size=4)
        assert (cache.plain is None) == hooked and cache.inference_mode is not hooked
        steps = [model(ids[:, :5], mask[:, :5], cache=cache)]  # prefill 5, then one position per call
        steps += [model(ids[:, t : t + 1], mask[:, t : t + 1], cache=cache) for t in range(5, 12)]
    assert cache.length == 12
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("via", ["forward", "decode"])
def test_cached_decoding_of_a_left_padded_batch_with_position_ids(via):
    """The path sample_completions takes: left-padded prefill with position ids, then real tokens one at a time."""
    model = _tiny(heads=4).eval()
    lengths = [6, 3, 1]
    ids, _ = _prompts(lengths, width=6)
    tails = torch.randint(1, VOCAB, (3, 5), generator=_gen(1))
    offset = 6 - torch.tensor(lengths).unsqueeze(1)
    source = (torch.arange(6) - offset).clamp_min(0)
    left_ids = ids.gather(1, source).masked_fill(torch.arange(6) < offset, 0)
    left_mask = (torch.arange(6) >= offset).long()
    with torch.no_grad():
        cache = model.new_kv_cache(3, capacity=11)
        got = [model(left_ids, left_mask, position_ids=source, cache=cache)[:, -1]]
        for t in range(5):
            position = torch.tensor(lengths) + t
            if via == "decode":  # the loop's hot path: (B,) tokens and positions, (B, V) logits
                got.append(cache.decode(tails[:, t], position))
            else:
                got.append(model(tails[:, t : t + 1], position_ids=position.unsqueeze(1), cache=cache)[:, -1])
        for row, length in enumerate(lengths):
            alone = model(torch.cat([ids[row, :length], tails[row]]).unsqueeze(0))[0]  # unpadded, no cache
            expected = alone[length - 1 : length + 5]
            torch.testing.assert_close(torch.stack([g[row] for g in got]), expected, atol=1e-5, rtol=1e-5)


def test_the_full_forward_still_computes_the_boolean_mask_attention():
    """The float mask of the full forward is the boolean one of before: same logits, state_dict keys unchanged."""
    model = _tiny(heads=2, layers=2).eval()
    ids, mask = _prompts([9, 4, 1], width=9)
    mask[2] = 0  # an all-padding row, as the padding test of test_sequence_data has
    length = ids.shape[1]
    blocked = torch.ones(length, length, dtype=torch.bool).triu(1).unsqueeze(0) | (mask == 0).unsqueeze(1)
    blocked = (blocked & ~torch.eye(length, dtype=torch.bool)).repeat_interleave(model.heads, dim=0)
    with torch.no_grad():
        x = model.embed(ids) + model.positions(torch.arange(length))
        for block in model.blocks:
            x = block(x, blocked)
        reference = model.head(model.norm(x))
        torch.testing.assert_close(model(ids, mask), reference, atol=1e-5, rtol=1e-5)
    model.train()  # training mode: MHA's own math path, gradients finite
    model(ids, mask).sum().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    keys = list(model.state_dict())
    assert keys[:2] == ["embed.weight", "positions.weight"] and keys[-4:] == [
        "norm.weight",
        "norm.bias",
        "head.weight",
        "head.bias",
    ]
    assert [k.split(".", 2)[2] for k in keys if k.startswith("blocks.0.")] == [
        "norm1.weight",
        "norm1.bias",
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
        "norm2.weight",
        "norm2.bias",
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.2.weight",
        "mlp.2.bias",
    ]


def test_kv_cache_layout_and_errors():
    model = _tiny(heads=2, layers=2, max_length=16)
    cache = model.new_kv_cache(3, capacity=5)
    assert isinstance(cache, KVCache) and (cache.batch_size, cache.capacity, cache.length) == (3, 5, 0)
    assert [k.shape for k in cache.keys] == [(3, 2, 5, 8)] * 2 and cache.values[1].shape == (3, 2, 5, 8)
    assert "capacity=5" in repr(cache)
    with torch.no_grad():
        model(torch.ones(3, 4, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match=r"4 cached \+ 2 new positions exceed the cache's capacity 5"):
            model(torch.ones(3, 2, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match=r"the cache holds 3 sequences, `input_ids` has 2 rows"):
            model(torch.ones(2, 1, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match=r"`tokens` must be \(3,\) and the cache not full \(4 of 5"):
            cache.decode(torch.ones(2, dtype=torch.long))
        assert cache.decode(torch.ones(3, dtype=torch.long)).shape == (3, VOCAB) and cache.length == 5
        with pytest.raises(ValueError, match=r"the cache not full \(5 of 5 positions\)"):
            cache.decode(torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`capacity` 17 exceeds the model's max_length 16"):
        model.new_kv_cache(1, capacity=17)
    with pytest.raises(ValueError, match=r"`batch_size` must be a positive integer, got 0"):
        model.new_kv_cache(0)
    with pytest.raises(ValueError, match=r"`position_ids` must have shape \(3, 2\) or \(2,\), got \(3, 3\)"):
        model(torch.ones(3, 2, dtype=torch.long), position_ids=torch.zeros(3, 3, dtype=torch.long))


# ---------------------------------------------------------------------------------------------- output and layout
def _check_layout(out: Completions, ids: Tensor, mask: Tensor, max_new_tokens: int, pad: int = 0) -> None:
    lengths = mask.sum(1)
    assert torch.equal(out.prompt_lengths, lengths)
    ends = lengths + out.completion_lengths
    assert out.input_ids.shape == (ids.shape[0], int(ends.max())) and out.input_ids.is_contiguous()
    assert out.attention_mask.dtype == torch.long and out.completion_mask.dtype == torch.bool
    assert bool((out.completion_lengths >= 1).all()) and bool((out.completion_lengths <= max_new_tokens).all())
    for row in range(ids.shape[0]):
        n, end = int(lengths[row]), int(ends[row])
        assert torch.equal(out.input_ids[row, :n], ids[row][mask[row].bool()])  # the prompt, unpadded, first
        assert out.attention_mask[row].tolist() == [1] * end + [0] * (out.input_ids.shape[1] - end)
        assert out.completion_mask[row].tolist() == [False] * n + [True] * (end - n) + [False] * (
            out.input_ids.shape[1] - end
        )
        assert bool((out.input_ids[row, end:] == pad).all())


@pytest.mark.parametrize("use_cache", [True, False])
def test_output_layout_with_prompts_of_different_lengths(use_cache):
    model = _tiny()
    ids, mask = _prompts([5, 2, 1, 4])
    out = sample_completions(model, ids, mask, max_new_tokens=6, generator=_gen(), use_cache=use_cache)
    _check_layout(out, ids, mask, 6)
    assert out.completion_lengths.tolist() == [6] * 4 and out.input_ids.shape == (4, 11)
    batch = out.as_batch()
    assert torch.equal(batch["labels"], out.input_ids.masked_fill(~out.completion_mask, -100))
    assert batch["input_ids"] is out.input_ids and batch["attention_mask"] is out.attention_mask
    assert out.as_batch(ignore_index=-1)["labels"].min() == -1


def test_the_padding_of_the_prompts_is_irrelevant():
    """Right-padded, left-padded or wider: the same real tokens give the same samples."""
    model = _tiny()
    ids, mask = _prompts([4, 2, 3])
    reference = sample_completions(model, ids, mask, max_new_tokens=5, generator=_gen(3))
    left_ids, left_mask = torch.zeros(3, 6, dtype=torch.long), torch.zeros(3, 6, dtype=torch.long)
    for row in range(3):
        n = int(mask[row].sum())
        left_ids[row, 6 - n :], left_mask[row, 6 - n :] = ids[row, :n], 1
    again = sample_completions(model, left_ids, left_mask, max_new_tokens=5, generator=_gen(3))
    assert torch.equal(again.input_ids, reference.input_ids)
    assert torch.equal(again.attention_mask, reference.attention_mask)
    full = torch.ones(1, 4, dtype=torch.long)  # attention_mask None: every token is real
    assert torch.equal(
        sample_completions(model, ids[:1], None, max_new_tokens=3, generator=_gen()).input_ids,
        sample_completions(model, ids[:1], full, max_new_tokens=3, generator=_gen()).input_ids,
    )


@pytest.mark.parametrize(
    "sampling",
    [{}, {"temperature": 0.7}, {"temperature": 1.5, "top_k": 4}, {"top_p": 0.8}, {"top_k": 6, "top_p": 0.5}],
)
def test_the_kv_cache_gives_the_samples_of_the_reforward_loop(sampling):
    model = _tiny(heads=4)
    ids, mask = _prompts([5, 1, 3, 5, 2, 4])
    cached = sample_completions(model, ids, mask, max_new_tokens=12, generator=_gen(7), **sampling)
    plain = sample_completions(model, ids, mask, max_new_tokens=12, generator=_gen(7), use_cache=False, **sampling)
    assert torch.equal(cached.input_ids, plain.input_ids)


def test_greedy_is_the_argmax_of_the_full_forward():
    model = _tiny().eval()
    ids, mask = _prompts([4, 2])
    out = sample_completions(model, ids, mask, max_new_tokens=6, temperature=0)  # no generator needed
    for row, n in enumerate([4, 2]):
        sequence = ids[row, :n].unsqueeze(0)
        with torch.no_grad():
            for _ in range(6):
                sequence = torch.cat([sequence, model(sequence)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(out.input_ids[row, : n + 6], sequence[0])
    top1 = sample_completions(model, ids, mask, max_new_tokens=6, top_k=1, generator=_gen())
    assert torch.equal(top1.input_ids, out.input_ids)


# ------------------------------------------------------------------------------------------------- randomness
def test_the_generator_alone_decides_the_samples():
    model = _tiny()
    ids, mask = _prompts([3, 3, 2, 1])
    state = torch.get_rng_state()
    first = sample_completions(model, ids, mask, max_new_tokens=10, generator=_gen(5))
    assert torch.equal(torch.get_rng_state(), state), "the global RNG was consumed"
    torch.manual_seed(123)  # another global state: no effect
    second = sample_completions(model, ids, mask, max_new_tokens=10, generator=_gen(5))
    other = sample_completions(model, ids, mask, max_new_tokens=10, generator=_gen(6))
    assert torch.equal(first.input_ids, second.input_ids)
    assert not torch.equal(first.input_ids, other.input_ids)
    greedy_state = torch.get_rng_state()
    sample_completions(model, ids, mask, max_new_tokens=3, temperature=0)
    assert torch.equal(torch.get_rng_state(), greedy_state)


def _empirical(logits: Tensor, n: int, **sampling) -> Tensor:
    """Token frequencies of n draws from a model whose next-token logits are always ``logits``."""
    model = Table(logits.expand(VOCAB, -1))
    ids = torch.ones(n, 1, dtype=torch.long)
    out = sample_completions(model, ids, max_new_tokens=1, generator=_gen(11), **sampling)
    return torch.bincount(out.input_ids[:, 1], minlength=VOCAB).double() / n


def _assert_close_to(freq: Tensor, probs: Tensor, n: int) -> None:
    bound = 5 * (probs * (1 - probs) / n).sqrt() + 1e-12  # five binomial standard deviations per token
    assert bool(((freq - probs).abs() <= bound).all()), (freq, probs)
    assert bool((freq[probs == 0] == 0).all()), "a token of probability 0 was drawn"


def test_the_sampler_draws_from_the_tempered_cut_softmax():
    n = 20000
    logits = torch.linspace(-2, 2, VOCAB)
    logits[3] = -math.inf  # a masked token is never drawn
    for temperature in (1.0, 0.5, 2.0):
        probs = (logits.double() / temperature).softmax(-1)
        _assert_close_to(_empirical(logits, n, temperature=temperature), probs, n)
    # top-k keeps the k most likely tokens, renormalised
    kept = logits.topk(4).indices
    probs = torch.zeros(VOCAB, dtype=torch.float64)
    probs[kept] = logits[kept].double().softmax(-1)
    _assert_close_to(_empirical(logits, n, top_k=4), probs, n)
    # top-p keeps the smallest set of most likely tokens whose mass reaches p
    full = logits.double().softmax(-1)
    order = full.argsort(descending=True)
    mass_before = full[order].cumsum(0) - full[order]
    nucleus = order[mass_before < 0.6]
    probs = torch.zeros(VOCAB, dtype=torch.float64)
    probs[nucleus] = full[nucleus] / full[nucleus].sum()
    assert 1 < len(nucleus) < VOCAB - 1
    _assert_close_to(_empirical(logits, n, top_p=0.6), probs, n)


def test_training_mode_and_grad_mode_are_restored():
    model = _tiny()
    model.train()
    model.blocks[1].eval()  # a frozen submodule stays frozen
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append((module.training, torch.is_grad_enabled())))
    out = sample_completions(model, *_prompts([2, 3]), max_new_tokens=3, generator=_gen())
    assert seen and all(flags == (False, False) for flags in seen)
    assert model.training and model.blocks[0].training and not model.blocks[1].training
    assert not out.input_ids.requires_grad and not out.input_ids.is_inference()
    model.eval()
    sample_completions(model, *_prompts([2, 3]), max_new_tokens=3, generator=_gen())
    assert not model.training


def test_the_samples_feed_a_training_step():
    """Tensors from the inference-mode decoding are ordinary: a student trains on them."""
    model = _tiny()
    out = sample_completions(model, *_prompts([3, 2]), max_new_tokens=4, generator=_gen())
    assert not any(t.is_inference() for t in (out.input_ids, out.attention_mask, out.completion_mask))
    batch = out.as_batch()
    logits = model(batch["input_ids"], batch["attention_mask"])
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    loss.backward()
    assert model.head.weight.grad is not None


def test_the_kv_cache_path_steps_one_token_at_a_time():
    model = _tiny()
    lengths = []

    def record(module, args, kwargs):
        lengths.append((args[0] if args else kwargs["input_ids"]).shape[1])

    model.register_forward_pre_hook(record, with_kwargs=True)
    sample_completions(model, *_prompts([4, 2]), max_new_tokens=5, generator=_gen())
    assert lengths == [4, 1, 1, 1, 1]  # prefill, then one token per call; the last sample is never fed
    lengths.clear()
    sample_completions(model, *_prompts([4, 2]), max_new_tokens=5, generator=_gen(), use_cache=False)
    assert lengths == [4, 5, 6, 7, 8]


# --------------------------------------------------------------------------------------------------------- EOS
def test_eos_ends_each_row_and_the_loop():
    model = Table(_successor_table())
    ids = torch.tensor([[3, 0, 0], [5, 6, 7], [9, 0, 0]])
    mask = (ids != 0).long()
    out = sample_completions(model, ids, mask, max_new_tokens=8, eos_token_id=10, generator=_gen())
    # row 0: 4 5 6 7 8 9 10 (EOS kept); row 1: 8 9 10; row 2: 10
    assert out.completion_lengths.tolist() == [7, 3, 1]
    assert out.input_ids.tolist() == [
        [3, 4, 5, 6, 7, 8, 9, 10],
        [5, 6, 7, 8, 9, 10, 0, 0],
        [9, 10, 0, 0, 0, 0, 0, 0],
    ]
    _check_layout(out, ids, mask, 8)
    assert model.calls == 7  # prefill + 6 steps: the loop stopped when the last row sampled EOS (re-forward path)
    several = sample_completions(model, ids, mask, max_new_tokens=8, eos_token_id=[12, 7], generator=_gen())
    assert several.completion_lengths.tolist() == [4, 5, 3]  # 4 5 6 7 | 8 9 10 11 12 | 10 11 12: the first EOS
    assert several.input_ids[1, 3:].tolist() == [8, 9, 10, 11, 12]


def test_eos_with_the_kv_cache_matches_the_reforward_loop():
    model = _tiny()
    ids, mask = _prompts([3, 1, 2, 3, 2, 1, 3, 2])
    kwargs = dict(max_new_tokens=10, eos_token_id=[2, 5], pad_token_id=0, temperature=1.5)
    cached = sample_completions(model, ids, mask, generator=_gen(2), **kwargs)
    plain = sample_completions(model, ids, mask, generator=_gen(2), use_cache=False, **kwargs)
    assert torch.equal(cached.input_ids, plain.input_ids)
    assert torch.equal(cached.completion_lengths, plain.completion_lengths)
    _check_layout(cached, ids, mask, 10)
    for row in range(8):
        completion = cached.input_ids[row][cached.completion_mask[row]].tolist()
        stops = [i for i, t in enumerate(completion) if t in (2, 5)]
        assert stops == ([len(completion) - 1] if stops else []) and (stops or len(completion) == 10)


# ------------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": 0}, r"`max_new_tokens` must be a positive integer, got 0"),
        ({"max_new_tokens": 2.0}, r"`max_new_tokens` must be a positive integer, got 2.0"),
        ({"temperature": -0.5}, r"`temperature` must be a finite number >= 0 \(0 is greedy\), got -0.5"),
        ({"temperature": math.nan}, r"`temperature` must be a finite number >= 0"),
        ({"top_k": 0}, r"`top_k` must be None or a positive integer, got 0"),
        ({"top_p": 0.0}, r"`top_p` must be None or a number in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"`top_p` must be None or a number in \(0, 1\], got 1.5"),
        ({"eos_token_id": -1}, r"`eos_token_id` must be non-negative, got -1"),
        ({"eos_token_id": "a"}, r"`eos_token_id` must be None, an integer or a sequence of integers, got 'a'"),
        ({"pad_token_id": None}, r"`pad_token_id` must be a non-negative integer, got None"),
        ({"max_new_tokens": 30}, r"prompt length 3 \+ max_new_tokens 30 = 33 exceeds the model's maximum length 32 "),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    ids, mask = _prompts([3, 2])
    with pytest.raises(ValueError, match=match):
        sample_completions(_tiny(), ids, mask, **{"max_new_tokens": 2, **kwargs})


def test_bad_inputs_are_named():
    model = _tiny()
    with pytest.raises(ValueError, match=r"`input_ids` must be a 2-D \(batch, length\) tensor, got \(4,\)"):
        sample_completions(model, torch.ones(4, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"`input_ids` must hold integer token ids, got dtype torch.float32"):
        sample_completions(model, torch.ones(2, 4), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"`attention_mask` must have the shape of `input_ids` \(2, 4\), got \(2, 3\)"):
        sample_completions(model, torch.ones(2, 4, dtype=torch.long), torch.ones(2, 3), max_new_tokens=2)
    mask = torch.ones(3, 4, dtype=torch.long)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"prompt rows \[1\] of `input_ids` are all padding"):
        sample_completions(model, torch.ones(3, 4, dtype=torch.long), mask, max_new_tokens=2)
    with pytest.raises(TypeError, match=r"`generator` must be a torch.Generator or None, got int"):
        sample_completions(model, torch.ones(1, 2, dtype=torch.long), max_new_tokens=2, generator=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`model` must be a torch.nn.Module, got function"):
        sample_completions(lambda x: x, torch.ones(1, 2, dtype=torch.long), max_new_tokens=2)  # type: ignore[arg-type]
    flat = Table(torch.zeros(VOCAB, VOCAB))
    flat.forward = lambda input_ids, attention_mask=None: torch.zeros(input_ids.shape[0], VOCAB)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=r"\(batch, length, vocab\) with \(batch, length\) = \(1, 2\), got \(1, 16\)"):
        sample_completions(flat, torch.ones(1, 2, dtype=torch.long), max_new_tokens=2)


# ----------------------------------------------------------------------------------------- any other causal LM
class IdsOnly(nn.Module):
    """A causal LM of its own: forward(input_ids) only, a `.logits` output, int32 ids are fine."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _tiny(layers=1)

    def forward(self, input_ids: Tensor):
        class Output:
            logits = self.inner(input_ids.long())

        return Output()


def test_a_model_of_ones_own_is_rerun_at_every_step():
    model = IdsOnly()
    ids, mask = _prompts([4, 2, 3])
    out = sample_completions(model, ids.int(), mask, max_new_tokens=5, generator=_gen(4))
    assert out.input_ids.dtype == torch.int32  # the dtype of the prompts
    _check_layout(out, ids.int(), mask, 5)
    reference = sample_completions(model.inner, ids, mask, max_new_tokens=5, generator=_gen(4))
    assert torch.equal(out.input_ids.long(), reference.input_ids)


# --------------------------------------------------------------------------------------------- Hugging Face GPT-2
@pytest.fixture(scope="module")
def gpt2():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64)
    config.pad_token_id = config.eos_token_id = config.bos_token_id = 0
    return transformers.GPT2LMHeadModel(config).eval()


def _gpt2_prompts() -> tuple[Tensor, Tensor]:
    ids = torch.randint(1, 64, (4, 6), generator=_gen(9))
    mask = (torch.arange(6) < torch.tensor([[6], [3], [1], [5]])).long()
    return ids.masked_fill(mask == 0, 0), mask


def test_gpt2_greedy_equals_hugging_face_generate(gpt2):
    ids, mask = _gpt2_prompts()
    out = sample_completions(gpt2, ids, mask, max_new_tokens=10, temperature=0)
    _check_layout(out, ids, mask, 10)
    for row in range(4):
        prompt = ids[row][mask[row].bool()].unsqueeze(0)
        expected = gpt2.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=10, pad_token_id=0
        )
        assert torch.equal(out.input_ids[row, : expected.shape[1]], expected[0])
    # and HF's own left-padded batch
    left = torch.zeros_like(ids)
    left_mask = torch.zeros_like(mask)
    for row in range(4):
        n = int(mask[row].sum())
        left[row, 6 - n :], left_mask[row, 6 - n :] = ids[row, :n], 1
    batched = gpt2.generate(left, attention_mask=left_mask, do_sample=False, max_new_tokens=10, pad_token_id=0)
    for row in range(4):
        n = int(mask[row].sum())
        assert torch.equal(out.input_ids[row, n : n + 10], batched[row, 6:])


def test_gpt2_sampling_is_reproducible_and_equals_the_reforward_loop(gpt2):
    ids, mask = _gpt2_prompts()
    state = torch.get_rng_state()
    kwargs = dict(max_new_tokens=12, temperature=1.2, top_k=20, top_p=0.9)
    first = sample_completions(gpt2, ids, mask, generator=_gen(1), **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    second = sample_completions(gpt2, ids, mask, generator=_gen(1), **kwargs)
    plain = sample_completions(gpt2, ids, mask, generator=_gen(1), use_cache=False, **kwargs)
    assert torch.equal(first.input_ids, second.input_ids) and torch.equal(first.input_ids, plain.input_ids)
    _check_layout(first, ids, mask, 12)
    assert not gpt2.training


def test_gpt2_eos_and_max_length(gpt2):
    ids, mask = _gpt2_prompts()
    free = sample_completions(gpt2, ids, mask, max_new_tokens=16, generator=_gen(3))
    completions = [free.input_ids[r][free.completion_mask[r]].tolist() for r in range(4)]
    eos = completions[0][2]  # a token row 0 samples third: with it as EOS, row 0 stops there
    out = sample_completions(gpt2, ids, mask, max_new_tokens=16, eos_token_id=eos, generator=_gen(3))
    _check_layout(out, ids, mask, 16)
    for row in range(4):
        expected = completions[row][: completions[row].index(eos) + 1] if eos in completions[row] else completions[row]
        assert out.input_ids[row][out.completion_mask[row]].tolist() == expected
    assert out.completion_lengths[0] <= 3
    with pytest.raises(ValueError, match=r"prompt length 6 \+ max_new_tokens 59 = 65 exceeds the model's maximum "):
        sample_completions(gpt2, ids, mask, max_new_tokens=59)


def test_encoder_decoder_models_are_refused():
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, decoder_start_token_id=0
    )
    with pytest.raises(ValueError, match=r"T5ForConditionalGeneration is an encoder-decoder model"):
        sample_completions(
            transformers.T5ForConditionalGeneration(config), torch.ones(1, 3, dtype=torch.long), max_new_tokens=2
        )
