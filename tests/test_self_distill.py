"""SelfDistillModule: heads by name, the loss and its gradients, metrics, early exit, export, checkpoints."""

from __future__ import annotations

import functools

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from lightning_distill import SelfDistillModule
from lightning_distill.demos import MNIST1DDeepCNN
from lightning_distill.self_distill import ExitModel
from tests.helpers.reference import ref_distillation_loss
from tests.helpers.tiny import make_trainer

EXITS = ["stages.0.act2", "stages.1"]  # a nested layer inside a ModuleList entry, and a whole stage


def data(n: int = 64, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 40, generator=g)
    return x, x[:, :4].argmax(-1)


def loader(n: int = 64, batch_size: int = 16) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data(n)), batch_size=batch_size)


def build(seed: int = 0, **kwargs) -> SelfDistillModule:
    torch.manual_seed(seed)
    kwargs.setdefault("example_input", data(2)[0])
    return SelfDistillModule(MNIST1DDeepCNN(4, 3, num_classes=4), exits=EXITS, num_classes=4, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Heads and the loss
# ---------------------------------------------------------------------------------------------------------------------
def test_heads_are_sized_from_the_nested_layers_and_the_deepest_feature():
    model = build()
    assert [head.in_shape for head in model.exit_heads] == [(4, 20), (8, 10)]
    assert model.hint_key == "backbone.head:input".removeprefix("backbone.")  # the classifier's input: (N, 16)
    assert all(head.hint_shape == (16,) for head in model.exit_heads)
    logits, hints, feature = model.exit_outputs(data(5)[0])
    assert [tuple(z.shape) for z in logits] == [(5, 4)] * 3
    assert [tuple(h.shape) for h in hints] == [(5, 16)] * 2 and feature.shape == (5, 16)
    torch.testing.assert_close(logits[-1], model(data(5)[0]))


def test_loss_equals_an_independent_composition():
    model = build(temperature=2.0, alpha=0.4, feature_weight=0.5, exit_weights=[0.5, 2.0, 1.5])
    x, y = data(6)
    logits, hints, feature = model.exit_outputs(x)
    terms = model.compute_loss(logits, hints, feature, y)
    deepest = logits[-1].detach().numpy()
    expected = 1.5 * ref_distillation_loss(deepest, deepest, y.numpy(), 0.0, 1.0, "kl")["task_loss"]
    for i, weight in enumerate([0.5, 2.0]):
        ref = ref_distillation_loss(logits[i].detach().numpy(), deepest, y.numpy(), 0.4, 2.0, "kl")
        hint = np.mean((hints[i].detach().double().numpy() - feature.detach().double().numpy()) ** 2)
        assert terms[f"exit{i}/feature_loss"].item() == pytest.approx(hint, rel=1e-5)
        assert terms[f"exit{i}/kd_loss"].item() == pytest.approx(ref["kd_loss"], rel=1e-4)  # float32 KL
        expected += weight * (ref["loss"] + 0.5 * hint)
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_every_head_trains_the_backbone_below_it_and_the_deepest_targets_are_detached():
    model = build(alpha=0.5, feature_weight=1.0)
    x, y = data(8)
    stem, stage1, stage2 = model.backbone.stem.conv.weight, model.backbone.stages[1].conv1.weight, None
    stage2 = model.backbone.stages[2].conv1.weight
    for i, below, above in [(0, [stem], [stage1, stage2]), (1, [stem, stage1], [stage2])]:
        model.zero_grad()
        logits, hints, feature = model.exit_outputs(x)
        model.compute_loss(logits, hints, feature, y)[f"exit{i}/loss"].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in below), f"exit {i} must reach the backbone"
        # KD and hint read the deepest exit detached: nothing flows into the layers after the exit
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in above), f"exit {i} leaked into deeper layers"
        assert all(p.grad is None for p in model.backbone.head.parameters())


def test_fit_logs_every_term_and_exact_per_exit_accuracy(tmp_path):
    model = build(example_input=None, optimizer=functools.partial(torch.optim.Adam, lr=1e-2))

    class Data(L.LightningDataModule):
        def train_dataloader(self):
            return loader()

        def val_dataloader(self):
            return loader(n=48, batch_size=16)

    trainer = make_trainer(tmp_path, max_epochs=2, limit_val_batches=None, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=Data())  # heads built in setup from the datamodule's first batch
    metrics = trainer.callback_metrics
    expected_train = {f"train/exit{i}/{t}" for i in (0, 1) for t in ("loss", "task_loss", "kd_loss", "feature_loss")}
    assert expected_train | {"train/loss", "train/exit2/task_loss"} <= set(metrics)
    x, y = data(48)
    with torch.no_grad():
        logits, _, _ = model.eval().exit_outputs(x)
    for i, z in enumerate(logits):
        assert metrics[f"val/acc_exit{i}"].item() == pytest.approx((z.argmax(-1) == y).float().mean().item())
    ensemble = torch.stack([z.softmax(-1) for z in logits]).mean(0).argmax(-1)
    assert metrics["val/acc_ensemble"].item() == pytest.approx((ensemble == y).float().mean().item())
    assert metrics["val/acc"] == metrics["val/acc_exit2"]
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in model.heads.parameters()} <= optimized


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # the resumed run saves no checkpoints
def test_crash_and_resume_equals_uninterrupted_run(tmp_path):
    class Crash(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                raise RuntimeError("simulated crash")

    def fresh(seed: int) -> SelfDistillModule:
        return build(seed, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))

    straight = fresh(0)
    make_trainer(tmp_path / "a", max_epochs=4, limit_train_batches=None).fit(straight, loader())
    crashed = fresh(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(
        tmp_path / "b", max_epochs=4, limit_train_batches=None, enable_checkpointing=True, callbacks=[ckpt, Crash()]
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(crashed, loader())
    resumed = fresh(1)
    make_trainer(tmp_path / "c", max_epochs=4, limit_train_batches=None).fit(
        resumed, loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name

    loaded = SelfDistillModule.load_from_checkpoint(
        tmp_path / "ckpt" / "last.ckpt", backbone=MNIST1DDeepCNN(4, 3, num_classes=4)
    )
    assert [h.spec() for h in loaded.exit_heads] == [h.spec() for h in crashed.exit_heads]  # rebuilt from the file
    for (name, a), b in zip(crashed.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_heads_left_out_of_the_optimizer_are_refused(tmp_path):
    class BackboneOnly(SelfDistillModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.backbone.parameters(), lr=0.1)

    model = BackboneOnly(MNIST1DDeepCNN(4, 3, num_classes=4), exits=EXITS, num_classes=4, example_input=data(2)[0])
    with pytest.raises(RuntimeError, match=r"\['heads.0.conv.0.weight'.* are in no optimizer"):
        make_trainer(tmp_path).fit(model, loader())


# ---------------------------------------------------------------------------------------------------------------------
# Early exit and export
# ---------------------------------------------------------------------------------------------------------------------
def test_threshold_zero_stops_everyone_at_the_first_exit_and_above_one_runs_the_full_network():
    model = build()
    x = data(20)[0]
    preds, exits = model.predict_early_exit(x, threshold=0.0)
    logits, _, _ = model.exit_outputs(x)
    assert exits.tolist() == [0] * 20 and torch.equal(preds, logits[0].argmax(-1))
    preds, exits = model.predict_early_exit(x, threshold=1.01)
    assert exits.tolist() == [2] * 20 and torch.equal(preds, model(x).argmax(-1))


def test_each_sample_stops_at_its_first_confident_exit_and_deeper_layers_skip_it():
    model = build()
    with torch.no_grad():  # the second head is never confident (uniform over 4 classes: 0.25)
        model.exit_heads[1].classifier.weight.zero_()
        model.exit_heads[1].classifier.bias.zero_()
    x = data(200)[0] * torch.linspace(0.1, 10.0, 200)[:, None]  # inputs of many scales: confidences spread out
    logits, _, _ = model.exit_outputs(x)
    confidence = torch.stack([z.softmax(-1).max(-1).values for z in logits])  # (exits, N)
    threshold = float(confidence[0].median().detach())
    expected_exit = torch.where(confidence[:2] >= threshold, torch.arange(2)[:, None], 2).min(0).values
    expected_pred = torch.stack([z.argmax(-1) for z in logits]).gather(0, expected_exit[None])[0]

    seen: list[int] = []
    handle = model.backbone.stages[2].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    preds, exits = model.predict_early_exit(x, threshold=threshold)
    handle.remove()
    assert torch.equal(exits, expected_exit) and torch.equal(preds, expected_pred)
    assert 0 < (exits == 0).sum() < 200 and (exits == 1).sum() == 0
    assert seen == [int((exits == 2).sum())]  # the last stage computed only for the samples still going


def test_export_exit_is_truncated_and_matches_the_exit():
    model = build()
    x = data(7)[0]
    logits, _, _ = model.exit_outputs(x)
    exported = model.export_exit(1)
    assert isinstance(exported, ExitModel)
    torch.testing.assert_close(exported(x), logits[1])
    assert type(exported.backbone.stages[2]).__name__ == "_Removed"
    assert type(exported.backbone.head).__name__ == "_Removed"
    assert isinstance(exported.backbone.stages[1], nn.Sequential)
    deepest = model.export_exit(2)
    torch.testing.assert_close(deepest(x), logits[2])
    assert not any(m._forward_hooks for m in deepest.modules())
    with pytest.raises(IndexError, match=r"Exit index must be in \[0, 2\]"):
        model.export_exit(3)


def test_sweep_reports_accuracy_and_exit_use():
    model = build()
    reports = model.sweep_thresholds(loader(n=32), [0.0, 2.0], repeats=1)
    x, y = data(32)
    assert reports[0].exit_fractions == (1.0, 0.0, 0.0) and reports[1].exit_fractions == (0.0, 0.0, 1.0)
    logits, _, _ = model.exit_outputs(x)
    assert reports[0].accuracy == pytest.approx((logits[0].argmax(-1) == y).float().mean().item())
    assert reports[1].accuracy == pytest.approx((logits[2].argmax(-1) == y).float().mean().item())
    assert reports[1].speedup > 0 and reports[0].latency_ms > 0


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(exits=["stages.1", "stages.0"]), ValueError, r"ran them as \['stages.0', 'stages.1'\]"),
        (dict(exits=["stages.5"]), ValueError, r"has no layer named 'stages.5'. Closest names"),
        (dict(exits=[]), ValueError, "`exits` must be a non-empty list"),
        (dict(exits=EXITS, exit_weights=[1.0]), ValueError, r"one weight per exit plus one .* \(3\), got 1"),
        (dict(exits=EXITS, alpha=1.5), ValueError, r"`alpha` must be in \[0, 1\]"),
        (dict(exits=EXITS, num_classes=1), ValueError, "`num_classes` must be an int >= 2, got 1"),
    ],
)
def test_bad_arguments_are_explained(kwargs, error, match):
    kwargs.setdefault("num_classes", 4)
    with pytest.raises(error, match=match):
        SelfDistillModule(MNIST1DDeepCNN(4, 3, num_classes=4), example_input=data(2)[0], **kwargs)


def test_a_plain_dataloader_sizes_the_heads_and_example_input_array_is_accepted(tmp_path):
    torch.manual_seed(0)
    model = SelfDistillModule(MNIST1DDeepCNN(4, 3, num_classes=4), exits=EXITS, num_classes=4)
    make_trainer(tmp_path).fit(model, loader())  # no example input: the first batch of the DataLoader sizes the heads
    assert len(model.heads) == len(EXITS) and tuple(model.example_input_array.shape) == (2, 40)
    given = SelfDistillModule(
        MNIST1DDeepCNN(4, 3, num_classes=4), exits=EXITS, num_classes=4, example_input_array=data(2)[0]
    )
    assert len(given.heads) == len(EXITS)


def test_missing_example_input_and_bad_threshold_are_explained(tmp_path):
    model = SelfDistillModule(MNIST1DDeepCNN(4, 3, num_classes=4), exits=EXITS, num_classes=4)
    with pytest.raises(RuntimeError, match="has no heads yet"):
        model.exit_outputs(data(2)[0])
    with pytest.raises(RuntimeError, match=r"has no example input\. HINT: pass `example_input=`"):
        make_trainer(tmp_path).validate(model, loader())  # no training data to size the heads from
    with pytest.raises(ValueError, match="Pass `example_input` or `example_input_array`"):
        SelfDistillModule(
            MNIST1DDeepCNN(4, 3), exits=EXITS, num_classes=10, example_input=data(2)[0], example_input_array=data(2)[0]
        )
    with pytest.raises(ValueError, match="`threshold` must be a number, got nan"):
        build().predict_early_exit(data(2)[0], threshold=float("nan"))


def test_inc_self_distillation_config_maps_each_group_once():
    torch.manual_seed(0)
    groups = [
        [["stages.0.act2", "pool"], ["stages.1", "pool"]],
        [["stages.0.act2", "head"], ["stages.1", "head"]],
        [["stages.0.act2", "head"], ["stages.1", "head"]],
    ]
    model = SelfDistillModule.from_inc_config(
        MNIST1DDeepCNN(4, 3, num_classes=4),
        4,
        layer_mappings=groups,
        loss_types=["L2", "KL", "CE"],
        loss_weights=[0.5, 0.05, 0.02],
        temperature=3.0,
        example_input=data(2)[0],
    )
    assert model.exits == tuple(EXITS) and model.feature_layer == "pool"
    x, y = data(6)
    logits, hints, feature = model.exit_outputs(x)
    terms = model.compute_loss(logits, hints, feature, y)
    deepest = logits[-1].detach().numpy()
    expected = ref_distillation_loss(deepest, deepest, y.numpy(), 0.0, 1.0, "kl")["task_loss"]  # add_origin_loss
    for i in range(2):  # every group once: L2 at 0.5, KL + soft CE at 0.05 + 0.02, no hard label on shallow exits
        kd = ref_distillation_loss(logits[i].detach().numpy(), deepest, y.numpy(), 1.0, 3.0, "kl")["kd_loss"]
        hint = np.mean((hints[i].detach().double().numpy() - feature.detach().double().numpy()) ** 2)
        expected += 0.07 * kd + 0.5 * hint
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="INC loss type must be 'L2', 'KL' or 'CE', got 'MSE'"):
        SelfDistillModule.from_inc_config(MNIST1DDeepCNN(), 10, [[["stages.0", "pool"]]], ["MSE"], [1.0])


def test_without_a_deepest_feature_heads_are_built_once_and_hints_are_off():
    class ScaledLogits(MNIST1DDeepCNN):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) * 2.0  # no layer returns the logits as they are: no deepest feature

    with pytest.raises(ValueError, match=r"Cannot find the deepest feature.*`feature_layer=`"):
        SelfDistillModule(ScaledLogits(4, 3, num_classes=4), EXITS, 4, example_input=data(2)[0])
    model = SelfDistillModule(ScaledLogits(4, 3, num_classes=4), EXITS, 4, feature_weight=0.0, example_input=data(2)[0])
    heads = list(model.heads)
    model.build_heads(data(2)[0])  # setup calls it again: the trained heads must survive
    assert list(model.heads) == heads and model.hint_key is None
    terms = model.compute_loss(*model.exit_outputs(data(4)[0]), data(4)[1])
    assert "exit0/feature_loss" not in terms and terms["loss"].isfinite()


def test_a_skip_connection_across_an_exit_is_explained():
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(40, 8), nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x: Tensor) -> Tensor:
            h = self.a(x)
            return self.head(self.b(h) + h)  # `h` from before the exit reaches past it

    model = SelfDistillModule(Skip(), exits=["b"], num_classes=4, example_input=data(2)[0])
    with torch.no_grad():
        model.exit_heads[0].classifier.bias.copy_(torch.tensor([50.0, 0.0, 0.0, 0.0]))  # confident: everyone stops
    assert model.predict_early_exit(data(6)[0], threshold=0.5)[1].tolist() == [0] * 6
    with torch.no_grad():
        model.exit_heads[0].classifier.weight.normal_(0, 30.0)  # confident for some samples only
        model.exit_heads[0].classifier.bias.zero_()
    with pytest.raises(RuntimeError, match="must depend on that exit's output alone"):
        model.predict_early_exit(data(64)[0] * torch.linspace(0.1, 10, 64)[:, None], threshold=0.9)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m: m.sweep_thresholds(loader(n=16), [0.5], repeats=0), ValueError, "`repeats` must be a positive int"),
        (lambda m: m.sweep_thresholds(loader(n=16), []), ValueError, "at least one threshold"),
        (lambda m: m.export_exit(-1), IndexError, r"Exit index must be in \[0, 2\] .*, got -1"),
    ],
)
def test_bad_early_exit_arguments_are_explained(call, error, match):
    with pytest.raises(error, match=match):
        call(build())


def test_exit_head_rejects_shapes_it_cannot_serve():
    from lightning_distill.self_distill import ExitHead

    with pytest.raises(ValueError, match=r"\(1-3 spatial dims\) or \(D,\) vectors: \(1, 2, 3, 4, 5\)"):
        ExitHead((1, 2, 3, 4, 5), width=8, num_classes=4)
    with pytest.raises(
        ValueError, match=r"A vector or token feature \(8,\) cannot give a hint shaped like the map \(16, 5\)"
    ):
        ExitHead((8,), width=16, num_classes=4, hint_shape=(16, 5))
