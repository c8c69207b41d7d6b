"""DistillationCallback: the teacher's lifecycle inside a real Trainer."""

from __future__ import annotations

import ast
import copy
import pickle
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

import lightning_distill.callback
from lightning_distill import DistillationCallback, DistillModule, TeacherOutputs
from lightning_distill._contract import TeacherConnection, TeacherNeeds, TeacherRequest
from lightning_distill.teacher import TeacherCache, TeacherMixture, TeacherRunner
from tests.helpers.tiny import (
    NUM_CLASSES,
    DictDataset,
    KwargsTeacher,
    SoftmaxTeacher,
    TinyTeacher,
    make_data,
    make_loader,
    make_trainer,
    tiny_student,
    trained_teacher,
)


class InstrumentedCallback(DistillationCallback):
    """Asserts the teacher's state inside the hooks, after the real hook ran."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.train_batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        assert not self.teacher.training
        assert all(not p.requires_grad for p in self.teacher.parameters())
        assert all(p.device == pl_module.device for p in self.teacher.parameters())
        outputs = pl_module.teacher_outputs
        assert isinstance(outputs, TeacherOutputs)
        assert not outputs.logits.requires_grad
        with torch.no_grad():
            expected = copy.deepcopy(self.teacher)(batch[0])
        torch.testing.assert_close(outputs.logits, expected, rtol=0, atol=0)
        self.train_batches += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        assert pl_module.teacher_outputs is None


def student_module(**kwargs: Any) -> DistillModule:
    torch.manual_seed(0)
    kwargs.setdefault("alpha", 0.7)
    kwargs.setdefault("temperature", 2.0)
    return DistillModule(student=tiny_student(), **kwargs)


def test_teacher_lifecycle_inside_hooks(tmp_path):
    teacher = trained_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    callback = InstrumentedCallback(teacher)
    module = student_module()
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[callback])
    trainer.fit(module, make_loader(), make_loader())
    assert callback.train_batches == 4
    assert module.teacher_outputs is None
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not teacher.training


def test_teacher_stays_out_of_optimizer_and_checkpoint(tmp_path):
    teacher = TinyTeacher()
    module = student_module()
    trainer = make_trainer(tmp_path, callbacks=[DistillationCallback(teacher)])
    trainer.fit(module, make_loader())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.parameters()}
    assert not optimized & {id(p) for p in teacher.parameters()}

    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert set(checkpoint["state_dict"]) == {f"student.{k}" for k in module.student.state_dict()}
    teacher_tensors = [v for v in teacher.state_dict().values()]
    for saved in checkpoint["state_dict"].values():
        assert not any(saved.shape == t.shape and torch.equal(saved, t) for t in teacher_tensors)
    (callback_state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("DistillationCallback")]
    assert callback_state["teacher_class"] == "TinyTeacher"
    assert len(pickle.dumps(callback_state)) < 1024


def test_training_loss_matches_an_independent_composition(tmp_path):
    teacher = trained_teacher()
    x, y = next(iter(make_loader()))
    module = student_module(alpha=0.6, temperature=3.0)
    with torch.no_grad():
        s, t = module(x), teacher(x)
        # written out here, independently of the package's loss code
        p_t = torch.softmax(t / 3.0, -1)
        kl = (p_t * (torch.log_softmax(t / 3.0, -1) - torch.log_softmax(s / 3.0, -1))).sum(-1).mean() * 9.0
        ce = -torch.log_softmax(s, -1).gather(1, y[:, None]).mean()
        expected = 0.6 * kl + 0.4 * ce
    seen: dict[str, torch.Tensor] = {}

    class Recording(DistillModule):
        def compute_loss(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
            terms = super().compute_loss(*args, **kwargs)
            seen.update({k: v.detach() for k, v in terms.items()})
            return terms

    torch.manual_seed(0)
    recording = Recording(student=tiny_student(), alpha=0.6, temperature=3.0)
    recording.student.load_state_dict(module.student.state_dict())
    make_trainer(tmp_path, limit_train_batches=1, callbacks=[DistillationCallback(teacher)]).fit(
        recording, make_loader()
    )
    torch.testing.assert_close(seen["loss"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["kd_loss"], kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["task_loss"], ce, rtol=1e-5, atol=1e-6)


def test_dict_batches_reach_teacher_and_student_as_keyword_arguments(tmp_path):
    class KwargsStudent(DistillModule):
        def __init__(self) -> None:
            super().__init__(alpha=0.5)
            self.net = tiny_student()

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.net(features)

    loader = torch.utils.data.DataLoader(DictDataset(), batch_size=8)
    module = KwargsStudent()
    trainer = make_trainer(tmp_path, callbacks=[DistillationCallback(KwargsTeacher())])
    trainer.fit(module, loader, loader)
    assert {"train/kd_loss", "val/agreement", "val/acc"} <= set(trainer.callback_metrics)


def test_logits_layer_takes_the_pre_softmax_output(tmp_path):
    teacher = SoftmaxTeacher()
    callback = DistillationCallback(TeacherRunner(teacher, logits_layer="head"))
    x, _ = next(iter(make_loader()))
    out = callback.runner.run(x)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, teacher.head(teacher.body(x)))
    make_trainer(tmp_path, callbacks=[callback]).fit(student_module(), make_loader())
    assert not callback.teacher.head._forward_hooks  # hooks removed at teardown


def test_validation_logs_teacher_accuracy_and_agreement(tmp_path):
    teacher = trained_teacher()
    module = student_module()
    trainer = make_trainer(tmp_path, callbacks=[DistillationCallback(teacher)])
    (metrics,) = trainer.validate(module, make_loader(n=64, batch_size=16), verbose=False)
    x, y = torch.cat([b[0] for b in make_loader()]), torch.cat([b[1] for b in make_loader()])
    with torch.no_grad():
        t_pred, s_pred = teacher(x).argmax(-1), module(x).argmax(-1)
    limited = slice(0, 32)  # limit_val_batches=2 of 16
    assert metrics["val/teacher_acc"] == pytest.approx((t_pred == y)[limited].float().mean().item())
    assert metrics["val/agreement"] == pytest.approx((t_pred == s_pred)[limited].float().mean().item())
    assert metrics["val/acc"] == pytest.approx((s_pred == y)[limited].float().mean().item())


def test_run_on_validation_false_skips_the_teacher(tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[DistillationCallback(TinyTeacher(), run_on_validation=False)])
    (metrics,) = trainer.validate(student_module(), make_loader(), verbose=False)
    assert "val/acc" in metrics and "val/agreement" not in metrics


def test_chance_level_teacher_warns_and_trained_teacher_does_not(tmp_path):
    torch.manual_seed(3)
    untrained = nn.Sequential(nn.Linear(8, NUM_CLASSES))
    with torch.no_grad():
        untrained[0].weight.mul_(1e-3)
    loader = make_loader(n=128, batch_size=128)
    with pytest.warns(UserWarning, match="looks untrained"):
        make_trainer(tmp_path, callbacks=[DistillationCallback(untrained)]).fit(student_module(), loader)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, callbacks=[DistillationCallback(trained_teacher())]).fit(student_module(), loader)
        # a teacher weak on purpose: the check can be turned off
        make_trainer(tmp_path, callbacks=[DistillationCallback(untrained, check_accuracy=False)]).fit(
            student_module(), loader
        )
    assert not [w for w in caught if "looks untrained" in str(w.message)]
    with pytest.raises(TypeError, match=r"`check_accuracy` must be True or False, got 'no'"):
        DistillationCallback(untrained, check_accuracy="no")  # type: ignore[arg-type]


def test_bf16_mixed_precision_runs_teacher_in_the_precision_context(tmp_path):
    seen_dtypes: list[torch.dtype] = []
    teacher = TinyTeacher()
    teacher.head.register_forward_hook(lambda m, i, o: seen_dtypes.append(o.dtype))
    module = student_module()
    make_trainer(tmp_path, precision="bf16-mixed", callbacks=[DistillationCallback(teacher)]).fit(module, make_loader())
    assert seen_dtypes and set(seen_dtypes) == {torch.bfloat16}
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert teacher.head.weight.dtype == torch.float32  # mixed precision does not convert the weights


def test_bf16_true_precision_converts_the_teacher(tmp_path):
    teacher = TinyTeacher()
    module = student_module()
    callback = DistillationCallback(teacher)
    make_trainer(tmp_path, precision="bf16-true", callbacks=[callback]).fit(module, make_loader())
    assert callback.teacher.head.weight.dtype == torch.bfloat16
    assert teacher.head.weight.dtype == torch.float32  # a copy is converted, never the model passed


def test_resuming_with_a_different_teacher_warns(tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[DistillationCallback(TinyTeacher())])
    trainer.fit(student_module(), make_loader())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    torch.manual_seed(123)
    other = make_trainer(tmp_path, max_epochs=2, callbacks=[DistillationCallback(TinyTeacher())])
    with pytest.warns(UserWarning, match="different teacher"):
        other.fit(student_module(), make_loader(), ckpt_path=tmp_path / "a.ckpt")


def test_resume_compares_every_weight_of_the_teacher(tmp_path):
    teacher = TinyTeacher()
    trainer = make_trainer(tmp_path, callbacks=[DistillationCallback(teacher)])
    trainer.fit(student_module(), make_loader())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    same = make_trainer(tmp_path, max_epochs=2, callbacks=[DistillationCallback(copy.deepcopy(teacher))])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*different teacher")
        same.fit(student_module(), make_loader(), ckpt_path=tmp_path / "a.ckpt")
    changed = copy.deepcopy(teacher)
    with torch.no_grad():
        next(changed.parameters()).view(-1)[1] += 1e-4  # one value, off a strided sample of the weights
    other = make_trainer(tmp_path, max_epochs=2, callbacks=[DistillationCallback(changed)])
    with pytest.warns(UserWarning, match="different teacher"):
        other.fit(student_module(), make_loader(), ckpt_path=tmp_path / "a.ckpt")


def test_test_stage_logs_teacher_metrics_too(tmp_path):
    trainer = make_trainer(tmp_path, limit_test_batches=2, callbacks=[DistillationCallback(trained_teacher())])
    (metrics,) = trainer.test(student_module(), make_loader(), verbose=False)
    assert {"test/acc", "test/teacher_acc", "test/agreement", "test/kd_loss"} <= set(metrics)
    assert metrics["test/teacher_acc"] > 0.8


def test_several_validation_dataloaders_get_their_own_metrics(tmp_path):
    teacher = trained_teacher()
    module = student_module()
    loaders = [make_loader(n=32, batch_size=16), make_loader(n=32, batch_size=16, seed=5)]
    trainer = make_trainer(tmp_path, callbacks=[DistillationCallback(teacher)])
    metrics = trainer.validate(module, loaders, verbose=False)
    assert len(metrics) == len(loaders)
    for index, logged in enumerate(metrics):
        x, y = next(iter(make_loader(n=32, batch_size=32, seed=index * 5)))
        with torch.no_grad():
            t_pred, s_pred = teacher(x).argmax(-1), module(x).argmax(-1)
        suffix = f"/dataloader_idx_{index}"
        assert logged[f"val/acc{suffix}"] == pytest.approx((s_pred == y).float().mean().item())
        assert logged[f"val/teacher_acc{suffix}"] == pytest.approx((t_pred == y).float().mean().item())
        assert logged[f"val/agreement{suffix}"] == pytest.approx((t_pred == s_pred).float().mean().item())


class MinimalClient(L.LightningModule):
    """A LightningModule that is no DistillModule, only a `TeacherClient`: all the callback may rely on.

    It records every call of the contract and trains on the KD term alone, from the outputs it was handed.
    """

    def __init__(self, temperature: float = 2.0, features: tuple[tuple[str, Any], ...] = ()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = tiny_student()
        self.temperature = temperature
        self.features = features
        self.connections: list[TeacherConnection | None] = []
        self.requests: list[TeacherRequest] = []
        self.training_requests: dict[int, bool] = {}  # id(request) -> asked in a training step
        self.received: list[TeacherOutputs] = []
        self.outputs: TeacherOutputs | None = None

    def teacher_needs(self) -> TeacherNeeds:
        return TeacherNeeds(features=self.features)

    def connect_teacher(self, connection: TeacherConnection | None) -> None:
        self.connections.append(connection)

    def teacher_request(self, batch: Any) -> TeacherRequest:
        x, y = batch
        request = TeacherRequest(x, y, self.temperature, features=True)
        self.requests.append(request)
        self.training_requests[id(request)] = self.training
        return request

    def set_teacher_outputs(self, outputs: TeacherOutputs | None) -> None:
        self.outputs = outputs
        if outputs is not None:
            self.received.append(outputs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        assert self.outputs is not None
        log_p = torch.log_softmax(self.net(batch[0]), -1)
        return -(torch.softmax(self.outputs.logits, -1) * log_p).sum(-1).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        assert self.outputs is not None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_callback_needs_only_the_teacher_contract(tmp_path):
    teacher = TinyTeacher()
    module = MinimalClient(features=(("body.0", None),))
    trainer = make_trainer(tmp_path, callbacks=[DistillationCallback(teacher)])
    trainer.fit(module, make_loader(), make_loader())
    first, last = module.connections[0], module.connections[-1]
    assert first is not None and last is None  # connected in setup, forgotten in teardown
    assert (first.mixture, first.cached, first.cache_top_k, first.owner) == (
        False,
        False,
        None,
        "DistillationCallback(TinyTeacher)",
    )
    # 2 training batches, 2 validation batches and Lightning's sanity check of 2: one request and one run each
    assert len(module.requests) == len(module.received) == 6
    for request, outputs in zip(module.requests, module.received, strict=True):
        with torch.no_grad():
            torch.testing.assert_close(outputs.logits, teacher(request.inputs), rtol=0, atol=0)
            expected = teacher.body[0](request.inputs)
        if module.training_requests[id(request)]:
            torch.testing.assert_close(outputs.features["body.0"], expected, rtol=0, atol=0)
        else:  # validation runs never capture features, whatever the module asks
            assert dict(outputs.features) == {}
    assert sum(module.training_requests.values()) == 2
    # and the connection's `run` is the teacher itself, for the module's own set-up
    x = make_data(4)[0]
    with torch.no_grad():
        torch.testing.assert_close(first.run(TeacherRequest(x, None, 1.0)).logits, teacher(x))


def test_callback_source_imports_nothing_of_the_module():
    tree = ast.parse((Path(lightning_distill.callback.__file__)).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "lightning_distill.module" not in imported and "lightning_distill" not in imported


def test_a_mixture_passed_as_the_teacher_mixes_at_the_requested_temperature(tmp_path):
    torch.manual_seed(0)
    a, b = TinyTeacher(), TinyTeacher()
    module = MinimalClient(temperature=3.0)
    callback = DistillationCallback(TeacherMixture({"a": a, "b": b}, weights={"a": 1.0, "b": 3.0}))
    make_trainer(tmp_path, callbacks=[callback]).fit(module, make_loader())
    assert module.connections[0] is not None and module.connections[0].mixture
    assert module.connections[0].owner == "DistillationCallback(a:TinyTeacher,b:TinyTeacher)"
    x = module.requests[0].inputs
    with torch.no_grad():  # T * log(sum_k w_k softmax(z_k / T)), written out here
        mixed = 0.25 * torch.softmax(a(x) / 3.0, -1) + 0.75 * torch.softmax(b(x) / 3.0, -1)
    torch.testing.assert_close(module.received[0].logits, 3.0 * torch.log(mixed))
    cached = DistillationCallback(TeacherMixture({"a": a, "b": b}), cache=TeacherCache(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"a mixture of teachers depends on the temperature.*HINT: remove `cache=`"):
        make_trainer(tmp_path, callbacks=[cached]).fit(MinimalClient(), make_loader())


def test_two_callbacks_are_refused_naming_both_teachers(tmp_path):
    module = student_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    callbacks = [DistillationCallback(TinyTeacher()), DistillationCallback(SoftmaxTeacher())]
    with pytest.raises(RuntimeError, match="2 DistillationCallbacks") as refused:
        make_trainer(tmp_path, callbacks=callbacks).fit(module, make_loader())
    message = str(refused.value)
    assert "teachers TinyTeacher, SoftmaxTeacher" in message
    assert "HINT: pass the teachers as one mixture, `DistillationCallback(TeacherMixture({'a': teacher_a" in message
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())  # refused before any step
    # nothing stays connected: the same module trains with one callback afterwards
    trainer = make_trainer(tmp_path, callbacks=[DistillationCallback(TinyTeacher())])
    trainer.fit(module, make_loader())
    assert torch.isfinite(trainer.callback_metrics["train/kd_loss"])


def test_a_module_that_is_no_teacher_client_is_refused_with_the_hint(tmp_path):
    from lightning.pytorch.demos.boring_classes import BoringModel

    refused = r"needs a DistillModule, got BoringModel \(a module that is no .*TeacherClient`\)\. HINT: subclass"
    with pytest.raises(TypeError, match=refused):
        make_trainer(tmp_path, callbacks=[DistillationCallback(TinyTeacher())]).fit(BoringModel())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(logits_layer="head"), r"takes no `logits_layer` as well\. HINT: .*`TeacherRunner\(teacher, logits_layer"),
        (dict(teacher_device="cpu"), r"takes no `teacher_device` as well\. HINT: .*`TeacherRunner\(teacher, device="),
        (dict(weights={"a": 1.0}), r"takes no `weights` as well"),
    ],
)
def test_an_old_keyword_with_a_runner_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillationCallback(TeacherRunner(TinyTeacher()), **kwargs)


def test_a_teacher_that_is_no_module_is_refused():
    with pytest.raises(TypeError, match=r"`teacher` must be a torch.nn.Module or a TeacherRunner, got str\. HINT"):
        DistillationCallback("resnet18")  # type: ignore[arg-type]
