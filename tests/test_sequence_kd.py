"""Token-level KD: masks, next-token shift, generalized JSD, chunking, vocabulary mismatch, a mixture of teachers."""

from __future__ import annotations

import copy
import functools

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_distill import DistillationCallback, Distiller, DistillModule, TeacherCache, TeacherOutputs
from lightning_distill.demos import MarkovDataset, MarkovLanguage, TinyCausalLM
from lightning_distill.losses.functional import distillation_loss_terms, kd_loss
from lightning_distill.teacher import TeacherMixture
from tests.helpers.reference import ref_kd_loss
from tests.helpers.tiny import TinyTeacher, make_loader, make_trainer, random_logits, tiny_student

SHAPE = (3, 9, 40)  # (B, L, V)


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def ref_js_beta(student: np.ndarray, teacher: np.ndarray, mask: np.ndarray, beta: float, temperature: float) -> float:
    """GKD's JSD(beta) with T², averaged over masked-in positions, one position at a time in float64."""
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if not mask[b, t]:
                continue
            p = np.exp(_np_log_softmax(teacher[b, t] / temperature))
            q = np.exp(_np_log_softmax(student[b, t] / temperature))
            m = beta * p + (1 - beta) * q
            total += beta * np.sum(p * np.log(p / m)) + (1 - beta) * np.sum(q * np.log(q / m))
            count += 1
    return temperature**2 * total / count


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_matches_a_per_token_reference(beta):
    s, t, _, mask = random_logits(SHAPE, seed=1, dtype=torch.float64)
    got = kd_loss(s, t, temperature=2.0, divergence="js", js_beta=beta, mask=mask)
    assert got.item() == pytest.approx(ref_js_beta(s.numpy(), t.numpy(), mask.numpy(), beta, 2.0), rel=1e-9)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
def test_token_kd_with_padding_labels_matches_an_independent_loop(divergence):
    s, t, target, mask = random_logits(SHAPE, seed=2, dtype=torch.float64)
    target[:, -3:] = -100  # padding
    got = kd_loss(s, t, temperature=3.0, divergence=divergence, mask=mask, target=target)
    expected = ref_kd_loss(s.numpy(), t.numpy(), 3.0, divergence, mask.numpy(), target.numpy())
    assert got.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "js", "soft_ce", "mse"])
@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_chunked_equals_unchunked_in_value_and_gradient(divergence, chunk_size):
    s, t, target, mask = random_logits(SHAPE, seed=3)
    s.requires_grad_(True)
    t.requires_grad_(True)  # gradients flow into both logits, chunked or not
    kwargs = dict(temperature=2.0, divergence=divergence, mask=mask, target=target, js_beta=0.3)
    whole, chunked = kd_loss(s, t, **kwargs), kd_loss(s, t, chunk_size=chunk_size, **kwargs)
    g_whole, g_chunked = torch.autograd.grad(2 * whole, (s, t)), torch.autograd.grad(2 * chunked, (s, t))
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_chunked, g_whole, rtol=1e-5, atol=1e-7)  # float32 sums in another order


def test_masked_positions_change_neither_value_nor_gradient_in_either_path():
    s, t, target, mask = random_logits(SHAPE, seed=4)
    noisy_s, noisy_t = s.clone(), t.clone()
    noisy_s[~mask], noisy_t[~mask] = 50.0, -50.0
    for chunk in (None, 4):
        values = []
        for student, teacher in ((s, t), (noisy_s, noisy_t)):
            leaf = student.clone().requires_grad_(True)
            loss = distillation_loss_terms(leaf, teacher, target, alpha=0.7, mask=mask, chunk_size=chunk)["loss"]
            (grad,) = torch.autograd.grad(loss, leaf)
            values.append((loss.detach(), grad[mask]))
            assert torch.all(grad[~mask] == 0)
        torch.testing.assert_close(values[0], values[1])


def test_a_vocabulary_mismatch_is_named_and_nothing_is_truncated():
    with pytest.raises(ValueError, match=r"class counts differ \(40 vs 48\); nothing is truncated.*tokenizer"):
        kd_loss(torch.zeros(2, 5, 40), torch.zeros(2, 5, 48))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(divergence="js", js_beta=1.0), ValueError, r"`js_beta` must be a number in \(0, 1\).*got 1.0"),
        (dict(chunk_size=0), ValueError, r"`chunk_size` must be None or a positive int .*got 0"),
        (dict(divergence="dkd", chunk_size=4, target=torch.zeros(2, 5, dtype=torch.long)), ValueError, "dkd"),
    ],
)
def test_bad_sequence_options_are_explained(kwargs, error, match):
    with pytest.raises(error, match=match):
        kd_loss(torch.zeros(2, 5, 40), torch.zeros(2, 5, 40), **kwargs)


def test_module_options_are_checked():
    with pytest.raises(TypeError, match="`shift_labels` must be True or False, got 1"):
        DistillModule(student=tiny_student(), shift_labels=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`shift_labels=True` needs sequence logits \(B, L, V\), got \(4, 4\)"):
        DistillModule(student=tiny_student(), shift_labels=True).compute_loss(torch.zeros(4, 4), None, torch.zeros(4))


# ------------------------------------------------------------------------------------------------ causal LM module
def _lm_batch(vocab: int = 16, n: int = 4) -> dict[str, torch.Tensor]:
    dataset = MarkovDataset(MarkovLanguage(vocab_size=vocab, branching=2, seed=0), num_sequences=n, max_length=12)
    return next(iter(DataLoader(dataset, batch_size=n)))


def test_shifted_module_loss_equals_the_hand_written_next_token_objective():
    torch.manual_seed(0)
    batch = _lm_batch()
    student, teacher = TinyCausalLM(vocab_size=16, dim=16, heads=2), TinyCausalLM(vocab_size=16, dim=32, heads=2)
    module = DistillModule(student=student, alpha=0.6, temperature=2.0, shift_labels=True, kd_chunk_size=7)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    s, t = student(**inputs), teacher(**inputs).detach()
    terms = module.compute_loss(s, module_teacher(t), batch["labels"], inputs["attention_mask"].bool())
    mask = batch["attention_mask"][:, 1:].bool()
    labels = batch["labels"][:, 1:]
    kd = ref_kd_loss(
        s[:, :-1].detach().double().numpy(), t[:, :-1].double().numpy(), 2.0, "kl", mask.numpy(), labels.numpy()
    )
    ce = torch.nn.functional.cross_entropy(s[:, :-1][mask], labels[mask])
    assert terms["kd_loss"].item() == pytest.approx(kd, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(0.6 * kd + 0.4 * ce.item(), rel=1e-5)


def module_teacher(logits: torch.Tensor) -> TeacherOutputs:
    return TeacherOutputs(logits)


@pytest.mark.slow
def test_causal_lm_distillation_fits_end_to_end_with_the_callback(tmp_path):
    torch.manual_seed(0)
    language = MarkovLanguage(vocab_size=16, branching=2, seed=0)
    loader = DataLoader(MarkovDataset(language, num_sequences=64, max_length=12), batch_size=16)
    teacher = TinyCausalLM(vocab_size=16, dim=32, heads=2)
    module = DistillModule(
        student=TinyCausalLM(vocab_size=16, dim=16, heads=2),
        alpha=0.5,
        temperature=2.0,
        divergence="js",
        js_beta=0.5,
        shift_labels=True,
        kd_chunk_size=32,
        optimizer=functools.partial(torch.optim.Adam, lr=3e-3),
    )
    trainer = make_trainer(tmp_path, max_epochs=2, limit_train_batches=None, limit_val_batches=2)
    trainer.callbacks.append(DistillationCallback(teacher))
    trainer.fit(module, loader, loader)
    metrics = trainer.callback_metrics
    assert all(torch.isfinite(metrics[k]) for k in ("train/loss", "val/kd_loss", "val/acc", "val/agreement"))


class NextTokenOracle(torch.nn.Module):
    """A perfect causal-LM teacher (it peeks at the sequence): its logits at t put all mass on token t + 1."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.scale = torch.nn.Parameter(torch.tensor(10.0))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        following = torch.roll(input_ids, -1, dims=1)
        return self.scale * torch.nn.functional.one_hot(following, self.vocab_size).float()


def test_a_perfect_causal_lm_teacher_is_not_called_untrained_under_shift_labels(tmp_path):
    import warnings

    language = MarkovLanguage(vocab_size=64, branching=4, seed=0)
    loader = DataLoader(MarkovDataset(language, num_sequences=64, max_length=12), batch_size=64)
    module = DistillModule(student=TinyCausalLM(vocab_size=64, dim=16, heads=2), alpha=0.5, shift_labels=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, limit_val_batches=0, callbacks=[DistillationCallback(NextTokenOracle(64))]).fit(
            module, loader
        )
    assert not [w for w in caught if "looks untrained" in str(w.message)]
    # scored without the shift it is at chance, but it predicts the next token: the hint names the shift, not weights
    with pytest.warns(UserWarning, match=r"a causal language model scored without the shift.*shift_labels=True"):
        make_trainer(tmp_path, limit_val_batches=0, callbacks=[DistillationCallback(NextTokenOracle(64))]).fit(
            DistillModule(student=TinyCausalLM(vocab_size=64, dim=16, heads=2), alpha=0.5), loader
        )


# -------------------------------------------------------------------------------------------------- teachers mix
def test_mixture_of_teachers_matches_a_numpy_reference_at_the_temperature():
    torch.manual_seed(0)
    a, b, x = TinyTeacher(), TinyTeacher(), torch.randn(6, 8)
    mix = TeacherMixture({"a": a, "b": b}, weights={"a": 1.0, "b": 3.0})
    mix.temperature = 2.5
    with torch.no_grad():
        za, zb, zm = a(x).double().numpy(), b(x).double().numpy(), mix(x).double()
    p_mix = 0.25 * np.exp(_np_log_softmax(za / 2.5)) + 0.75 * np.exp(_np_log_softmax(zb / 2.5))
    np.testing.assert_allclose(torch.softmax(zm / 2.5, -1).numpy(), p_mix, rtol=1e-5)
    student = torch.randn(6, 4, dtype=torch.float64)
    q = np.exp(_np_log_softmax(student.numpy() / 2.5))
    expected = 2.5**2 * np.mean(np.sum(p_mix * (np.log(p_mix) - np.log(q)), -1))
    assert kd_loss(student, zm, temperature=2.5).item() == pytest.approx(expected, rel=1e-5)


class Seen(L.Callback):
    """Runs after the DistillationCallback and keeps what it handed to the module."""

    def __init__(self) -> None:
        self.outputs: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.outputs.append(pl_module.teacher_outputs)


def test_callback_distills_from_the_mixture_at_the_modules_temperature(tmp_path):
    torch.manual_seed(0)
    teachers = {"a": TinyTeacher(), "b": TinyTeacher()}
    reference = {k: copy.deepcopy(v) for k, v in teachers.items()}
    callback = DistillationCallback(TeacherMixture(teachers, weights={"a": 0.2, "b": 0.8}))
    module = DistillModule(student=tiny_student(), alpha=1.0, temperature=3.0)
    seen = Seen()
    make_trainer(tmp_path, limit_train_batches=1, limit_val_batches=0, callbacks=[callback, seen]).fit(
        module, make_loader()
    )
    x = make_loader().dataset.tensors[0][:16]
    with torch.no_grad():
        p = 0.2 * torch.softmax(reference["a"](x) / 3, -1) + 0.8 * torch.softmax(reference["b"](x) / 3, -1)
    torch.testing.assert_close(torch.softmax(seen.outputs[0].logits / 3.0, -1), p, rtol=1e-5, atol=1e-6)
    assert (
        callback.state_key.startswith("DistillationCallback{") and "a:TinyTeacher,b:TinyTeacher" in callback.state_key
    )


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: DistillationCallback(), ValueError, "Pass exactly one of `teacher`"),
        (lambda: DistillationCallback(TeacherMixture({"a": TinyTeacher()})), ValueError, "at least two names"),
        (
            lambda: DistillationCallback(TeacherMixture({"a": TinyTeacher(), "b": TinyTeacher()}, weights={"a": 1.0})),
            ValueError,
            r"one weight per teacher \['a', 'b'\]",
        ),
        (
            lambda: DistillationCallback(
                TeacherMixture({"a": TinyTeacher(), "b": TinyTeacher()}, weights={"a": -1, "b": 1})
            ),
            ValueError,
            "finite, non-negative and not all zero",
        ),
        (
            lambda: DistillationCallback(TeacherMixture({"a": TinyTeacher(), "b": "x"})),  # type: ignore[dict-item]
            TypeError,
            "Teacher 'b' must be",
        ),
    ],
)
def test_bad_teacher_sets_are_explained(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: DistillationCallback(TinyTeacher(), teachers={"a": TinyTeacher()}), "exactly one"),
        (lambda: DistillationCallback(TinyTeacher(), weights={"a": 1.0}), "with one `teacher`"),
    ],
)
def test_the_deprecated_teachers_keywords_refuse_a_teacher_beside_them(make, match):
    # refused before the keywords' DeprecationWarning would be raised; they go with the keywords
    with pytest.raises(ValueError, match=match):
        make()


def test_the_deprecated_teachers_keyword_still_checks_the_mixture():
    with pytest.raises(ValueError, match="at least two names"), pytest.warns(DeprecationWarning):
        DistillationCallback(teachers={"a": TinyTeacher()})


@pytest.mark.parametrize(
    ("module_kwargs", "cache", "match"),
    [(dict(divergence="mse"), False, "divergence='mse' compares raw logits"), ({}, True, "a mixture of teachers")],
)
def test_a_mixture_refuses_what_it_cannot_serve(tmp_path, module_kwargs, cache, match):
    teachers = {"a": TinyTeacher(), "b": TinyTeacher()}
    callback = DistillationCallback(TeacherMixture(teachers), cache=TeacherCache(tmp_path / "c") if cache else None)
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, callbacks=[callback]).fit(
            DistillModule(student=tiny_student(), **module_kwargs), make_loader()
        )


def test_mixed_teachers_of_different_vocabularies_are_named():
    mix = TeacherMixture({"a": TinyTeacher(num_classes=4), "b": TinyTeacher(num_classes=5)})
    with pytest.raises(ValueError, match=r"differ in shape \{'a': \(2, 4\), 'b': \(2, 5\)\}"):
        mix(torch.zeros(2, 8))


def test_a_transformers_model_distills_through_the_same_module(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=16, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    student, teacher = transformers.GPT2LMHeadModel(config), transformers.GPT2LMHeadModel(config)
    module = DistillModule(student=student, alpha=0.5, temperature=2.0, shift_labels=True)
    loader = DataLoader(MarkovDataset(MarkovLanguage(16, 2, seed=0), num_sequences=8, max_length=12), batch_size=4)
    make_trainer(tmp_path, limit_val_batches=0, callbacks=[DistillationCallback(teacher)]).fit(module, loader)


def test_the_loop_api_gives_the_modules_sequence_loss():
    torch.manual_seed(0)
    batch = _lm_batch()
    student, teacher = TinyCausalLM(vocab_size=16, dim=16, heads=2), TinyCausalLM(vocab_size=16, dim=32, heads=2)
    kwargs = dict(alpha=0.4, temperature=2.0, divergence="js", js_beta=0.3, kd_chunk_size=5, shift_labels=True)
    module = DistillModule(student=student, **kwargs)
    distiller = Distiller(teacher, **kwargs)
    distiller.on_train_begin(student)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    out = student(**inputs)
    mask = inputs["attention_mask"].bool()
    expected = module.compute_loss(out, TeacherOutputs(teacher(**inputs)), batch["labels"], mask)
    assert distiller.loss(inputs, out, batch["labels"]).item() == pytest.approx(expected["loss"].item(), rel=1e-6)


def test_the_chunked_loss_refuses_a_second_backward():
    student = torch.randn(2, 5, 40, requires_grad=True)
    loss = kd_loss(student, torch.randn(2, 5, 40), chunk_size=3)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="back-propagated twice"):
        loss.backward()
