"""Feature maps in a Trainer: projectors built before the optimizer, trained, saved, not exported; schedules; DKD."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill import DistillationCallback, DistillModule, FeatureMap, TeacherOutputs
from lightning_distill.demos import MNIST1DTeacher
from lightning_distill.features import ChannelProjector
from lightning_distill.schedules import LinearWarmup
from tests.helpers.dkd_reference import dkd_reference_terms
from tests.helpers.reference import ref_distillation_loss
from tests.helpers.tiny import IN_DIM, make_data, make_loader, make_trainer, tiny_student, trained_teacher

# The tiny student's layer "1" (ReLU after Linear(8, 6)) is 6 wide, the tiny teacher's "body.1" 16 wide.
WIDTH_MAP = FeatureMap(student="1", teacher="body.1", weight=0.5)


def wrapped(feature_maps=(WIDTH_MAP,), **kwargs) -> DistillModule:
    torch.manual_seed(0)
    module = DistillModule(student=tiny_student(), alpha=0.5, temperature=2.0, feature_maps=feature_maps, **kwargs)
    module.example_input_array = make_data(2)[0]
    return module


class CNNStudent(DistillModule):
    """The subclass form: a narrow 1-D CNN whose layers are named relative to the module itself."""

    def __init__(self, **kwargs) -> None:
        super().__init__(
            alpha=0.5,
            feature_maps=[
                FeatureMap(student="net.features.act2", teacher="features.act2", name="fitnet"),
                FeatureMap(student="net.features.act3", teacher="features.act3", loss="attention", weight=100.0),
            ],
            **kwargs,
        )
        self.net = MNIST1DTeacher(channels=4)
        self.example_input_array = torch.randn(2, 40)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def cnn_loader(n: int = 64) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 40, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, (x[:, :10]).argmax(-1)), batch_size=16)


# ---------------------------------------------------------------------------------------------------------------------
# Projectors: optimizer, checkpoint, export
# ---------------------------------------------------------------------------------------------------------------------
def test_projectors_are_trained_and_saved_teacher_is_neither(tmp_path):
    teacher = trained_teacher()
    module = wrapped()
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[DistillationCallback(teacher)])
    trainer.fit(module, make_loader())
    projector = module.projectors["1"]
    assert isinstance(projector, nn.Linear) and (projector.in_features, projector.out_features) == (6, 16)

    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in projector.parameters()} <= optimized
    assert not {id(p) for p in teacher.parameters()} & optimized

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert {"projectors.1.weight", "projectors.1.bias"} <= set(state)
    assert not any(key.startswith(("body.", "head.")) for key in state)
    assert all(torch.equal(state[f"projectors.1.{k}"], v) for k, v in projector.state_dict().items())


def test_width_mismatched_cnn_pair_trains_end_to_end(tmp_path):
    torch.manual_seed(0)
    teacher = MNIST1DTeacher(channels=16)
    module = CNNStudent(optimizer=functools.partial(torch.optim.Adam, lr=1e-2))
    # the FitNets projector waits for the shapes; the attention map needs none, so its identity exists at once
    assert isinstance(module.projectors, nn.ModuleDict) and list(module.projectors) == ["net_features_act3"]
    assert isinstance(module.projectors["net_features_act3"], nn.Identity)
    losses: list[float] = []

    class Record(DistillationCallback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(trainer.callback_metrics["train/feature_loss/fitnet"]))
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    trainer = make_trainer(tmp_path, max_epochs=8, limit_train_batches=None, callbacks=[Record(teacher)])
    trainer.fit(module, cnn_loader())
    assert isinstance(module.projectors["fitnet"], ChannelProjector)  # 4 -> 16 channels
    assert isinstance(module.projectors["net_features_act3"], nn.Identity)  # attention needs none
    assert {"train/feature_loss/fitnet", "train/feature_loss/net.features.act3"} <= set(trainer.callback_metrics)
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])  # the student's features move towards the teacher's


def test_projector_missing_from_the_optimizer_is_refused(tmp_path):
    class OnlyStudentParams(DistillModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.student.parameters(), lr=0.1)

    module = OnlyStudentParams(student=tiny_student(), feature_maps=[WIDTH_MAP])
    module.example_input_array = make_data(2)[0]
    trainer = make_trainer(tmp_path, callbacks=[DistillationCallback(trained_teacher())])
    with pytest.raises(RuntimeError, match=r"\['projectors.1.weight', 'projectors.1.bias'\] are in no optimizer"):
        trainer.fit(module, make_loader())


def test_load_from_checkpoint_rebuilds_inferred_projectors(tmp_path):
    module = wrapped()
    trainer = make_trainer(
        tmp_path, enable_checkpointing=True, callbacks=[DistillationCallback(trained_teacher()), ModelCheckpoint()]
    )
    trainer.fit(module, make_loader())
    path = trainer.checkpoint_callback.best_model_path
    loaded = DistillModule.load_from_checkpoint(path, student=tiny_student())
    assert loaded.feature_maps == module.feature_maps  # saved as plain config dicts, rebuilt
    for (name, a), b in zip(module.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_export_drops_projectors_and_hooks(tmp_path):
    module = CNNStudent()
    trainer = make_trainer(tmp_path, callbacks=[DistillationCallback(MNIST1DTeacher(channels=16))])
    trainer.fit(module, cnn_loader())
    module.setup("fit")  # hooks attached again, as during a fit: export must still leave them behind
    exported = module.export_student()
    assert len(exported.projectors) == 0 and exported.feature_maps == ()
    assert not any(m._forward_hooks for m in exported.modules())
    assert not any(key.startswith("projectors.") for key in exported.state_dict())
    x = torch.randn(3, 40)
    torch.testing.assert_close(exported(x), module.eval()(x))
    assert module.net.features.act2._forward_hooks  # the original keeps its hooks
    module.teardown("fit")
    assert not module.net.features.act2._forward_hooks

    plain = wrapped().export_student()
    assert isinstance(plain, nn.Sequential)


# ---------------------------------------------------------------------------------------------------------------------
# Loss composition and capture
# ---------------------------------------------------------------------------------------------------------------------
def test_loss_equals_an_independent_composition():
    module = wrapped(feature_maps=(WIDTH_MAP, FeatureMap(student="0", teacher="body.0", loss="cosine", name="cos")))
    module.build_projectors({"body.1": torch.zeros(2, 16), "body.0": torch.zeros(2, 16)})
    g = torch.Generator().manual_seed(3)
    s_logits, t_logits = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    s1, t1, s0, t0 = (torch.randn(5, d, generator=g) for d in (6, 16, 6, 16))
    target = torch.tensor([0, 1, 2, 3, 0])
    terms = module.compute_loss(
        s_logits, TeacherOutputs(t_logits, {"body.1": t1, "body.0": t0}), target, student_features={"1": s1, "0": s0}
    )

    ref = ref_distillation_loss(s_logits.numpy(), t_logits.numpy(), target.numpy(), 0.5, 2.0, "kl")
    w1, b1 = (p.detach().numpy().astype(np.float64) for p in module.projectors["1"].parameters())
    w0, b0 = (p.detach().numpy().astype(np.float64) for p in module.projectors["cos"].parameters())
    mse = np.mean((s1.numpy() @ w1.T + b1 - t1.numpy()) ** 2)
    p0, q0 = s0.numpy() @ w0.T + b0, t0.numpy()
    cosine = np.mean([1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(p0, q0, strict=True)])
    assert terms["feature_loss/1"].item() == pytest.approx(mse, rel=1e-5)
    assert terms["feature_loss/cos"].item() == pytest.approx(cosine, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(ref["loss"] + 0.5 * mse + 1.0 * cosine, rel=1e-5)


def test_dkd_through_the_module_uses_its_weights():
    module = DistillModule(student=tiny_student(), alpha=0.7, temperature=3.0, divergence="dkd", tckd_weight=2.0)
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1, 2])
    terms = module.compute_loss(s, TeacherOutputs(t), y)
    tckd, nckd = dkd_reference_terms(s, t, y, 3.0)
    ce = torch.nn.functional.cross_entropy(s, y)
    torch.testing.assert_close(terms["loss"], 0.7 * (2.0 * tckd + 8.0 * nckd) + 0.3 * ce)
    torch.testing.assert_close(terms["tckd_loss"], tckd)


def test_only_requested_features_are_kept_and_only_for_the_step(tmp_path):
    seen: list[tuple[list[str], bool]] = []

    class Spy(DistillationCallback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((sorted(pl_module.teacher_outputs.features), bool(pl_module.objective.capture._recorded)))
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            seen.append((sorted(pl_module.teacher_outputs.features), bool(pl_module.objective.capture._recorded)))
            super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    teacher = trained_teacher()
    module = wrapped()
    make_trainer(tmp_path, num_sanity_val_steps=0, callbacks=[Spy(teacher)]).fit(module, make_loader(), make_loader())
    assert seen[:2] == [(["body.1"], False)] * 2  # training: the one requested layer; student records handed over
    assert seen[2:] == [([], False)] * 2  # validation: logits only, the student records nothing
    assert module.teacher_outputs is None
    assert not teacher.body[1]._forward_hooks and not module.student[1]._forward_hooks  # removed at teardown


def test_a_plain_dataloader_sizes_the_projectors_without_example_input_array(tmp_path):
    torch.manual_seed(0)
    module = DistillModule(student=tiny_student(), feature_maps=[WIDTH_MAP])
    loader = DataLoader(TensorDataset(*make_data(64)), batch_size=16, shuffle=True, generator=torch.Generator())
    loader.generator.manual_seed(7)
    expected_order = [y.tolist() for _, y in loader]  # what the loader yields from this generator state
    loader.generator.manual_seed(7)
    seen: list[list[int]] = []

    class Spy(DistillationCallback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch[1].tolist())
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    make_trainer(tmp_path, limit_train_batches=4, callbacks=[Spy(trained_teacher())]).fit(module, loader)
    projector = module.projectors[WIDTH_MAP.key]
    assert isinstance(projector, nn.Linear) and (projector.in_features, projector.out_features) == (6, 16)
    assert module.example_input_array is None
    assert seen == expected_order  # peeking at the first batch changed neither the data order nor its generator


def test_missing_example_input_or_callback_is_explained(tmp_path):
    module = DistillModule(student=tiny_student(), feature_maps=[WIDTH_MAP])
    with pytest.raises(RuntimeError, match=r"does not set\. HINT: inside `Trainer.fit` the first training batch"):
        module.build_projectors({WIDTH_MAP.teacher_key: torch.zeros(2, 16)})
    with pytest.raises(RuntimeError, match=r"need the teacher's feature shapes\. HINT: add `DistillationCallback"):
        make_trainer(tmp_path).fit(module, make_loader())


def test_unknown_teacher_layer_fails_at_setup_with_suggestions(tmp_path):
    module = wrapped(feature_maps=[FeatureMap(student="1", teacher="body.2")])
    trainer = make_trainer(tmp_path, callbacks=[DistillationCallback(trained_teacher())])
    with pytest.raises(ValueError, match=r"teacher \(TinyTeacher\) has no layer named 'body.2'. Closest names"):
        trainer.fit(module, make_loader())


def test_explicit_widths_build_projectors_at_construction():
    module = DistillModule(
        student=tiny_student(),
        feature_maps=[FeatureMap("1", "body.1", projector="linear", student_dim=6, teacher_dim=16)],
    )
    assert isinstance(module.projectors["1"], nn.Linear)
    with pytest.raises(ValueError, match="`student_dim=7` but the probed feature has width 6"):
        bad = wrapped(feature_maps=[FeatureMap("1", "body.1", student_dim=7)])
        bad.build_projectors({"body.1": torch.zeros(2, 16)})


def test_shape_no_projector_can_fix_fails_when_building():
    module = wrapped(feature_maps=[FeatureMap("1", "body.1", projector="identity")])
    with pytest.raises(ValueError, match=r"projector='identity' cannot match student feature \(2, 6\)"):
        module.build_projectors({"body.1": torch.zeros(2, IN_DIM * 2)})


# ---------------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------------
def test_scheduled_values_are_applied_and_logged(tmp_path):
    logged: list[dict[str, float]] = []

    class Spy(DistillationCallback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    module = wrapped(
        feature_maps=[FeatureMap("1", "body.1", weight=LinearWarmup(1.0, warmup=4, unit="step"))],
    )
    module2 = DistillModule(student=tiny_student(), alpha=LinearWarmup(0.8, warmup=2), temperature=2.0)
    make_trainer(tmp_path, max_epochs=3, callbacks=[Spy(trained_teacher())]).fit(module2, make_loader())
    assert [row["train/alpha"] for row in logged] == pytest.approx([0.0, 0.0, 0.4, 0.4, 0.8, 0.8])
    assert "train/temperature" not in logged[0]  # constants are not logged
    for row in logged:
        expected = row["train/alpha"] * row["train/kd_loss"] + (1 - row["train/alpha"]) * row["train/task_loss"]
        assert row["train/loss"] == pytest.approx(expected, rel=1e-5)

    logged.clear()
    make_trainer(tmp_path, max_epochs=1, limit_train_batches=4, callbacks=[Spy(trained_teacher())]).fit(
        module, make_loader()
    )
    assert [row["train/weight/1"] for row in logged] == pytest.approx([0.0, 0.25, 0.5, 0.75])


def test_without_example_input_the_first_datamodule_batch_is_used_rng_untouched(tmp_path):
    import lightning as L

    states: list[Tensor] = []

    class RecordRNG(L.Callback):
        def setup(self, trainer, pl_module, stage):
            states.append(torch.get_rng_state())

    class Data(L.LightningDataModule):
        def train_dataloader(self):
            x, y = make_data(64)
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)

    teacher = trained_teacher()
    for example in (None, make_data(2)[0]):  # first batch of the datamodule, then an explicit example
        module = DistillModule(student=tiny_student(), feature_maps=[WIDTH_MAP])
        module.example_input_array = example
        torch.manual_seed(0)
        make_trainer(tmp_path, callbacks=[DistillationCallback(teacher), RecordRNG()]).fit(module, datamodule=Data())
        assert isinstance(module.projectors["1"], nn.Linear)
    # reading the first batch of a shuffling loader consumed no random numbers (the projector's init did, equally)
    assert torch.equal(states[0], states[1])
