"""Masks by meaning and input routing (lightning_distill._positions), checked against hand-written expectations."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_distill import (
    DistillationCallback,
    Distiller,
    DistillModule,
    FeatureMap,
    TeacherMixture,
    TeacherOutputs,
)
from lightning_distill._positions import (
    TokenMasks,
    feature_mask,
    is_encoder_decoder,
    layer_side,
    logits_mask,
    route_inputs,
    token_masks,
)
from lightning_distill.losses.functional import feature_loss
from tests.helpers import hf
from tests.helpers.tiny import make_trainer

transformers = pytest.importorskip("transformers")


def _t5(seed: int = 0, size: str = "student") -> nn.Module:
    return hf.make_model("t5", size, seed)


def _seq2seq_batch(encoder_length: int = 6, decoder_length: int = 6) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, 32, (3, encoder_length), generator=g)
    attention_mask = torch.ones(3, encoder_length, dtype=torch.long)
    attention_mask[0, 2:] = 0  # a short source: its padding must never mask decoder positions
    labels = torch.randint(2, 32, (3, decoder_length), generator=g)
    labels[1, 4:] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _kl_ce(s: Tensor, t: Tensor, y: Tensor, counted: Tensor, alpha: float, temperature: float) -> float:
    """alpha T^2 KL(p_t || p_s) + (1 - alpha) CE over the counted positions, written out with plain torch."""
    s, t, y = s[counted].double(), t[counted].double(), y[counted]
    p_t = torch.softmax(t / temperature, -1)
    kl = (p_t * (torch.log_softmax(t / temperature, -1) - torch.log_softmax(s / temperature, -1))).sum(-1).mean()
    ce = F.cross_entropy(s, y)
    return float(alpha * temperature**2 * kl + (1 - alpha) * ce)


# ------------------------------------------------------------------------------------------------------- the rule
def test_sequence_level_logits_get_no_position_mask_even_with_an_attention_mask():
    masks = token_masks({"input_ids": torch.ones(4, 6), "attention_mask": torch.ones(4, 6)}, None, -100, None)
    assert logits_mask(masks, torch.zeros(4, 3)) is None
    assert torch.equal(logits_mask(masks, torch.zeros(4, 6, 9)), torch.ones(4, 6, dtype=torch.bool))


def test_token_logits_of_another_length_than_the_attention_mask_are_refused():
    masks = TokenMasks(encoder=torch.ones(4, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`attention_mask` has shape \(4, 6\) but the per-token logits \(4, 5, 9\)"):
        logits_mask(masks, torch.zeros(4, 5, 9))


def test_decoder_positions_use_the_decoder_mask_or_the_labels_never_the_encoder_mask():
    t5, batch = _t5(), _seq2seq_batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    masks = token_masks(inputs, batch["labels"], -100, t5)
    mask = logits_mask(masks, torch.zeros(3, 6, 32))
    assert torch.equal(mask, batch["labels"] != -100)  # equal lengths: the encoder's row-0 padding is not used
    decoder_mask = torch.ones(3, 6, dtype=torch.long)
    decoder_mask[2, 3:] = 0
    masks = token_masks({**inputs, "decoder_attention_mask": decoder_mask}, batch["labels"], -100, t5)
    assert torch.equal(logits_mask(masks, torch.zeros(3, 6, 32)), decoder_mask.bool())


def test_layers_inside_an_encoder_decoders_decoder_have_decoder_positions():
    t5 = _t5()
    assert is_encoder_decoder(t5) and not is_encoder_decoder(nn.Linear(2, 2))
    assert layer_side(t5, t5.get_submodule("decoder.block.0")) == "decoder"
    assert layer_side(t5, t5.get_submodule("encoder.block.0")) == "encoder"
    masks = TokenMasks(encoder=torch.ones(3, 6, dtype=torch.bool), decoder=torch.zeros(3, 4, dtype=torch.bool))
    assert feature_mask(masks, "decoder", torch.zeros(3, 4, 16), "map").shape == (3, 4)
    assert feature_mask(masks, "encoder", torch.zeros(3, 16), "map") is None  # pooled (B, D): no positions
    with pytest.raises(ValueError, match=r"read as token features \(B, L, D\).*`FeatureMap\(\.\.\., masked=False\)`"):
        feature_mask(masks, "encoder", torch.zeros(3, 5, 16), "map")


# ------------------------------------------------------------------------------------------------------ routing
def test_an_encoder_decoder_gets_decoder_inputs_built_from_the_labels_and_never_the_labels():
    t5, batch = _t5(), _seq2seq_batch(encoder_length=7, decoder_length=5)
    inputs, target = DistillModule(student=t5).split_batch(batch)
    assert "labels" not in inputs and target is batch["labels"]
    assert torch.equal(inputs["decoder_input_ids"], t5.prepare_decoder_input_ids_from_labels(labels=batch["labels"]))
    given = {**batch, "decoder_input_ids": torch.zeros(3, 5, dtype=torch.long)}
    assert DistillModule(student=t5).split_batch(given)[0]["decoder_input_ids"] is given["decoder_input_ids"]


def test_routing_refusals_name_the_fix():
    t5 = _t5()
    with pytest.raises(ValueError, match=r"neither `decoder_input_ids` nor `labels`"):
        route_inputs({"input_ids": torch.ones(1, 2)}, None, t5)

    class Seq2Seq(nn.Module):
        config = SimpleNamespace(is_encoder_decoder=True)

    with pytest.raises(ValueError, match=r"without `prepare_decoder_input_ids_from_labels`.*put `decoder_input_ids`"):
        route_inputs({"input_ids": torch.ones(1, 2)}, torch.ones(1, 2), Seq2Seq())


def test_t5_trains_through_the_trainer_with_the_decoder_mask_and_the_hand_written_loss(tmp_path):
    student, teacher = _t5(0), _t5(1, "teacher")
    batch = _seq2seq_batch(encoder_length=6, decoder_length=6)  # equal lengths: a wrong mask would fit silently
    module = DistillModule(student=student, alpha=0.7, temperature=2.0)
    seen: list[dict[str, Tensor]] = []
    teacher.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(kwargs), with_kwargs=True)
    make_trainer(tmp_path, limit_train_batches=1, callbacks=[DistillationCallback(teacher)]).fit(
        module, DataLoader([batch], batch_size=None)
    )
    assert seen and all("labels" not in kwargs and "decoder_input_ids" in kwargs for kwargs in seen)
    student.eval()
    inputs, target = module.split_batch(batch)
    with torch.no_grad():
        s, t = student(**inputs).logits, teacher(**inputs).logits
        terms = module.loss_terms(batch, TeacherOutputs(t))
    assert terms["loss"].item() == pytest.approx(_kl_ce(s, t, target, target != -100, 0.7, 2.0), rel=1e-5)


def test_distiller_gives_the_teacher_no_labels_and_the_trainer_paths_loss():
    student, teacher = _t5(0), _t5(1, "teacher")
    batch = _seq2seq_batch(encoder_length=7, decoder_length=5)
    seen: list[dict[str, Tensor]] = []
    teacher.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(kwargs), with_kwargs=True)
    distiller = Distiller(teacher, alpha=0.4, temperature=3.0)
    distiller.on_train_begin(student)
    inputs, target = distiller.split_batch(batch)
    assert set(inputs) == set(DistillModule(student=student).split_batch(batch)[0])
    student.eval()
    out = student(**inputs)
    loss = distiller.loss(batch, out)  # the whole batch: labels are split off, as on the Trainer path
    assert seen and "labels" not in seen[-1]
    with torch.no_grad():
        t = teacher(**inputs).logits
    assert loss.item() == pytest.approx(_kl_ce(out.logits.detach(), t, target, target != -100, 0.4, 3.0), rel=1e-5)


# ------------------------------------------------------------------------------------------------ feature masks
def test_masked_feature_losses_average_over_real_tokens_only():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    mask = torch.tensor([[True, True, True, False, False], [True, False, False, False, False]])
    real = [(0, 0), (0, 1), (0, 2), (1, 0)]
    diff = torch.stack([s[i, j] - t[i, j] for i, j in real])
    assert feature_loss(s, t, "mse", mask=mask).item() == pytest.approx(float((diff**2).mean()), rel=1e-6)
    assert feature_loss(s, t, "l1", mask=mask).item() == pytest.approx(float(diff.abs().mean()), rel=1e-6)
    cos = torch.stack([F.cosine_similarity(s[i, j], t[i, j], dim=0) for i, j in real])
    assert feature_loss(s, t, "cosine", mask=mask).item() == pytest.approx(float(1 - cos.mean()), rel=1e-6)
    with pytest.raises(ValueError, match=r"loss='attention' compares spatial attention maps"):
        feature_loss(s, t, "attention", mask=mask)
    with pytest.raises(ValueError, match=r"`mask` must be a bool tensor of the features' leading shape \(2, 5\)"):
        feature_loss(s, t, "mse", mask=mask.long())


def test_a_token_feature_map_counts_only_real_tokens_in_training():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    student, teacher = transformers.GPT2LMHeadModel(config), transformers.GPT2LMHeadModel(config)
    fmap = FeatureMap(student="transformer.h.0", teacher="transformer.h.0", projector="identity")
    module = DistillModule(student=student, alpha=1.0, feature_maps=[fmap], shift_labels=True)
    input_ids = torch.randint(0, 32, (2, 6))
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": input_ids.masked_fill(~attention_mask.bool(), -100),
    }
    captured: dict[str, Tensor] = {}
    student.transformer.h[0].register_forward_hook(lambda _m, _a, out: captured.__setitem__("s", out))
    teacher.transformer.h[0].register_forward_hook(lambda _m, _a, out: captured.__setitem__("t", out))
    with torch.no_grad():
        t_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
    terms = module.loss_terms(batch, TeacherOutputs(t_logits, {"transformer.h.0": captured["t"]}))
    expected = ((captured["s"] - captured["t"]) ** 2)[attention_mask.bool()].mean()
    assert terms["feature_loss/transformer.h.0"].item() == pytest.approx(expected.item(), rel=1e-5)
    unmasked = ((captured["s"] - captured["t"]) ** 2).mean()
    assert abs(expected.item() - unmasked.item()) > 1e-3 * expected.item()  # the padding would have changed it


# ------------------------------------------------------------------------------------------------ friction fixes
def test_a_compiled_student_exports_and_checkpoints_as_the_plain_network(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    module = DistillModule(student=torch.compile(net, backend="eager"), alpha=0.5)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    trainer = make_trainer(tmp_path, limit_train_batches=2, callbacks=[DistillationCallback(nn.Linear(8, 4))])
    trainer.fit(module, DataLoader(list(zip(x, y, strict=True)), batch_size=8))
    exported = module.export_student()
    assert type(exported) is nn.Sequential and exported is not net
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert sorted(state) == sorted(f"student.{k}" for k in net.state_dict())
    plain = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    plain.load_state_dict({k.removeprefix("student."): v for k, v in state.items()})
    torch.testing.assert_close(plain(x), exported(x))
    reloaded = DistillModule.load_from_checkpoint(
        path, student=nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    )
    torch.testing.assert_close(reloaded.student(x), exported(x))


def test_loading_a_wrapped_students_checkpoint_without_student_names_the_fix(tmp_path):
    module = DistillModule(student=nn.Linear(8, 4), alpha=0.0)
    trainer = make_trainer(tmp_path, limit_train_batches=1)
    trainer.fit(module, DataLoader(list(zip(torch.randn(4, 8), torch.randint(0, 4, (4,)), strict=True)), batch_size=4))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    with pytest.raises(TypeError, match=r"network itself is not saved.*load_from_checkpoint\(path, student=MyNet"):
        DistillModule.load_from_checkpoint(tmp_path / "m.ckpt")


def test_example_input_array_is_an_argument_and_never_a_saved_hyperparameter():
    x = torch.randn(2, 8)
    module = DistillModule(student=nn.Linear(8, 4), example_input_array=x)
    assert module.example_input_array is x
    assert "example_input_array" not in module.hparams and "example_input_array" not in module.hparams_initial


def test_mixture_feature_names_are_the_teachers_name_and_layer(tmp_path):
    torch.manual_seed(0)
    a, b = (
        nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)),
        nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 4)),
    )
    student = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    module = DistillModule(student=student, alpha=0.5, feature_maps=[FeatureMap(student="1", teacher="a.1")])
    callback = DistillationCallback(TeacherMixture({"a": a, "b": b}))
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    make_trainer(tmp_path, limit_train_batches=2, callbacks=[callback]).fit(
        module, DataLoader(list(zip(x, y, strict=True)), batch_size=8)
    )
    assert isinstance(module.projectors["1"], nn.Linear) and module.projectors["1"].out_features == 16
    with pytest.raises(ValueError, match=r"Teacher name 'weights' must be a plain identifier"):
        DistillationCallback(TeacherMixture({"weights": a, "b": b}))


def test_the_untrained_teacher_check_comes_after_the_shape_checks(tmp_path):
    torch.manual_seed(0)
    small = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    big = transformers.GPT2Config(vocab_size=48, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    module = DistillModule(student=transformers.GPT2LMHeadModel(small), alpha=0.5, shift_labels=True)
    ids = torch.randint(0, 32, (4, 8))
    loader = DataLoader([{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}], batch_size=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="vocab"):
            make_trainer(
                tmp_path, limit_train_batches=1, callbacks=[DistillationCallback(transformers.GPT2LMHeadModel(big))]
            ).fit(module, loader)
    assert not [w for w in caught if "looks untrained" in str(w.message)]
