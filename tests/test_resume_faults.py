"""Resume under the faults a review found (issue 17 item 1): inside an epoch, shuffled, with dropout.

A fit resumed from a checkpoint saved inside an epoch continues bit-identical to an uninterrupted one when it trains
from a :class:`~lightning_distill.ResumableDataLoader`; one resumed at an epoch's end is bit-identical with a plain
``DataLoader(shuffle=True)`` and a Dropout student, because the checkpoint holds the global RNG states; a mid-epoch
resume with a plain loader warns naming the fix. And the sampler's orders and states, on their own.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_distill import (
    DistillationCallback,
    DistillModule,
    FeatureMap,
    ResumableDataLoader,
    ResumableSampler,
    SelfDistillModule,
)
from lightning_distill._rng import CHECKPOINT_KEY, collect_rng_states, restore_rng_states
from tests.helpers.tiny import IN_DIM, NUM_CLASSES, make_data, make_trainer, trained_teacher

EPOCHS, BATCHES = 3, 4  # 64 samples in batches of 16
MID_EPOCH_STEP = 6  # checkpoints every 3 steps; the crash comes before step 7: after 2 of epoch 1's 4 batches

pytestmark = [
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),  # the resumed fits save nothing
    # Lightning's own notice about mid-epoch checkpoints of loaders it cannot resume (ours says more)
    pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended"),
    pytest.mark.filterwarnings("ignore:.*shuffling enabled"),  # the validation loader shuffles on purpose
]


class CrashAtStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


class CrashAtEpoch(L.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def dropout_student() -> nn.Module:
    return nn.Sequential(nn.Linear(IN_DIM, 6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, NUM_CLASSES))


def dataset(n: int = 64) -> TensorDataset:
    return TensorDataset(*make_data(n))


def distill_module(seed: int, features: bool) -> DistillModule:
    torch.manual_seed(seed)
    module = DistillModule(
        student=dropout_student(),
        alpha=0.8,
        temperature=3.0,
        # student layer "1" is 6 wide, the teacher's "body.1" 16: an inferred linear projector
        feature_maps=[FeatureMap(student="1", teacher="body.1")] if features else None,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
    )
    module.example_input_array = make_data(2)[0]
    return module


def self_distill_module(seed: int) -> SelfDistillModule:
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Linear(IN_DIM, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES)
    )
    return SelfDistillModule(
        backbone,
        exits=["1", "4"],
        num_classes=NUM_CLASSES,
        example_input=make_data(2)[0],
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
    )


def crash_and_resume(
    tmp_path: Any,
    build: Any,
    loader: Any,
    crash: L.Callback,
    checkpoint: ModelCheckpoint,
    teacher: nn.Module | None,
    val: Any = None,
    extra: tuple[L.Callback, ...] = (),
) -> tuple[L.LightningModule, L.LightningModule, L.Trainer]:
    """An uninterrupted fit, a fit that crashes, and one resumed from the crashed fit's ``last.ckpt``."""

    def trainer(name: str, callbacks: list[L.Callback], **kwargs: Any) -> L.Trainer:
        distill = [] if teacher is None else [DistillationCallback(teacher)]
        return make_trainer(
            tmp_path / name,
            max_epochs=EPOCHS,
            limit_train_batches=None,
            callbacks=[*distill, *callbacks, *extra],
            **kwargs,
        )

    straight = build(0)
    trainer("a", []).fit(straight, loader(), val)
    crashed = build(0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer("b", [checkpoint, crash], enable_checkpointing=True).fit(crashed, loader(), val)
    resumed = build(1)  # other initial weights and another RNG stream: all of it must come from the checkpoint
    resuming = trainer("c", [])
    resuming.fit(resumed, loader(), val, ckpt_path=f"{checkpoint.dirpath}/last.ckpt")
    return straight, resumed, resuming


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    assert len(list(a.parameters())) == len(list(b.parameters()))
    for (name, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(x, y), f"{name}: max |diff| {float((x - y).abs().max()):.2e}"


# --------------------------------------------------------------------------------- (a) mid-epoch, resumable loader
@pytest.mark.parametrize("kind", ["plain", "features", "self-distill"])
def test_mid_epoch_resume_with_the_resumable_loader_is_bit_identical(tmp_path, kind):
    if kind == "self-distill":
        build, teacher = self_distill_module, None
    else:
        build, teacher = functools.partial(distill_module, features=kind == "features"), trained_teacher()
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=3, save_last=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(cannot restore its position|holds no random-number state)")
        straight, resumed, trainer = crash_and_resume(
            tmp_path,
            build,
            lambda: ResumableDataLoader(dataset(), batch_size=16, seed=7),  # shuffled, seeded
            CrashAtStep(MID_EPOCH_STEP),
            checkpoint,
            teacher,
        )
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)  # the RNG states load weights-only too
    (state,) = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # the loader's, saved by Lightning
    assert saved["global_step"] == MID_EPOCH_STEP and (state["epoch"], state["position"]) == (1, 32)
    assert trainer.global_step == EPOCHS * BATCHES
    assert_same_weights(straight, resumed)


# ----------------------------------------------------------------------- (b) epoch boundary, shuffle=True, Dropout
@pytest.mark.parametrize("kind", ["distill", "self-distill"])
def test_epoch_boundary_resume_with_a_shuffling_dataloader_and_dropout_is_bit_identical(tmp_path, kind):
    """The RNG states in the checkpoint are restored neither too early nor too late.

    ``configure_optimizers`` draws after the states are loaded (restoring them at load would be too early); the
    validation set makes the resumed fit run a sanity check, which draws (a shuffled loader) after they are restored,
    under Lightning's isolated RNG; the training iterator draws its worker seed after that, as in the uninterrupted
    fit (restoring at ``on_train_start`` would be too late).
    """
    sanity = []

    class Sanity(L.Callback):
        def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            sanity.append(trainer.global_step)

    def build(seed: int) -> L.LightningModule:
        module = self_distill_module(seed) if kind == "self-distill" else distill_module(seed, features=False)
        configure = module.configure_optimizers

        def configure_and_draw() -> Any:
            torch.rand(3)  # e.g. a lazily initialised layer or an optimizer with noise
            return configure()

        module.configure_optimizers = configure_and_draw  # type: ignore[method-assign]
        return module

    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(cannot restore its position|holds no random-number state)")
        straight, resumed, _ = crash_and_resume(
            tmp_path,
            build,
            lambda: DataLoader(dataset(), batch_size=16, shuffle=True),  # the global generator orders each epoch
            CrashAtEpoch(2),
            checkpoint,
            None if kind == "self-distill" else trained_teacher(),
            val=DataLoader(dataset(32), batch_size=16, shuffle=True),
            extra=(Sanity(),),
        )
    assert len(sanity) == 3  # the resumed fit ran its sanity check too
    assert_same_weights(straight, resumed)


# --------------------------------------------------------------------------- (c) mid-epoch, plain DataLoader: warned
@pytest.mark.parametrize("kind", ["distill", "self-distill"])
def test_mid_epoch_resume_with_a_plain_dataloader_warns_naming_the_fix(tmp_path, kind):
    build = self_distill_module if kind == "self-distill" else functools.partial(distill_module, features=False)
    teacher = None if kind == "self-distill" else trained_teacher()
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=3, save_last=True)
    with pytest.warns(UserWarning, match=r"inside epoch 1, after 2 of its batches.*ResumableDataLoader"):
        straight, resumed, _ = crash_and_resume(
            tmp_path,
            build,
            lambda: DataLoader(dataset(), batch_size=16),
            CrashAtStep(MID_EPOCH_STEP),
            checkpoint,
            teacher,
        )
    assert not all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters(), strict=True))


def test_rng_states_are_restored_only_by_a_resumed_fit_and_their_absence_is_warned(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    loader = ResumableDataLoader(dataset(), batch_size=16, seed=0)  # draws nothing from the global generator
    make_trainer(tmp_path / "a", max_epochs=1, callbacks=[checkpoint], enable_checkpointing=True).fit(
        self_distill_module(0), loader
    )
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    states = saved[CHECKPOINT_KEY]
    seen = []

    class Record(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            seen.append(torch.equal(torch.get_rng_state(), states["torch"]))

    # loaded weights, then a new fit (no ckpt_path): this process's stream, not the checkpoint's
    loaded = SelfDistillModule.load_from_checkpoint(
        tmp_path / "ckpt" / "last.ckpt", backbone=self_distill_module(0).backbone
    )
    make_trainer(tmp_path / "b", max_epochs=1, callbacks=[Record()]).fit(loaded, loader)
    # resumed: the checkpoint's stream (nothing draws between on_fit_start and on_train_start here)
    make_trainer(tmp_path / "c", max_epochs=2, callbacks=[Record()]).fit(
        self_distill_module(1), loader, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    assert seen == [False, True]
    del saved[CHECKPOINT_KEY]  # as an older lightning-distill wrote it
    torch.save(saved, tmp_path / "old.ckpt")
    with pytest.warns(
        UserWarning, match=r"old.ckpt' holds no random-number state \(an older lightning-distill or a fit"
    ):
        make_trainer(tmp_path / "d", max_epochs=2).fit(self_distill_module(1), loader, ckpt_path=tmp_path / "old.ckpt")


# ------------------------------------------------------------------------------------------ (d) the sampler itself
def orders(sampler: ResumableSampler, epochs: range) -> list[list[int]]:
    result = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        result.append(list(sampler))
    return result


@pytest.mark.parametrize("shuffle", [True, False])
def test_orders_are_permutations_that_change_per_epoch_and_repeat_per_seed(shuffle):
    epochs = orders(ResumableSampler(range(50), seed=3, shuffle=shuffle), range(4))
    assert all(sorted(order) == list(range(50)) for order in epochs)
    assert len({tuple(order) for order in epochs}) == (4 if shuffle else 1)
    assert orders(ResumableSampler(range(50), seed=3, shuffle=shuffle), range(4)) == epochs  # same seed, same orders
    assert (orders(ResumableSampler(range(50), seed=4, shuffle=shuffle), range(4)) == epochs) is not shuffle
    torch.manual_seed(123)  # the global generator plays no part
    assert orders(ResumableSampler(range(50), seed=3, shuffle=shuffle), range(4)) == epochs


def test_a_complete_pass_without_set_epoch_moves_to_the_next_epoch_an_interrupted_one_does_not():
    sampler = ResumableSampler(range(10), seed=0)
    expected = orders(ResumableSampler(range(10), seed=0), range(3))
    sampler.set_epoch(0)
    assert [list(sampler), list(sampler)] == expected[:2]
    iterator = iter(sampler)
    head = [next(iterator) for _ in range(3)]
    del iterator
    assert head == expected[2][:3] and list(sampler) == expected[2]  # the interrupted pass repeats its epoch


@pytest.mark.parametrize("replicas, drop_last", [(2, False), (3, False), (3, True)])
def test_processes_split_each_epoch_as_distributed_sampler_does(replicas, drop_last):
    for epoch in range(3):
        shares = []
        for rank in range(replicas):
            sampler = ResumableSampler(range(10), seed=5, drop_last=drop_last, num_replicas=replicas, rank=rank)
            reference = DistributedSampler(range(10), replicas, rank, seed=5, drop_last=drop_last)  # type: ignore[arg-type]
            reference.set_epoch(epoch)
            assert orders(sampler, range(epoch, epoch + 1)) == [list(reference)] and len(sampler) == len(reference)
            shares.append(list(reference))
        merged = [index for share in shares for index in share]
        assert set(merged) == set(range(10)) if not drop_last else len(set(merged)) == len(merged) == 9


def test_the_process_group_is_read_when_an_epoch_starts(monkeypatch):
    sampler = ResumableSampler(range(10), seed=5)  # built before the process group exists, as in a DDP script
    assert len(sampler) == 10
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    assert list(sampler) == list(DistributedSampler(range(10), 2, 1, seed=5)) and len(sampler) == 5  # type: ignore[arg-type]


def test_lightning_leaves_the_sampler_in_place_under_ddp():
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    resumable = ResumableDataLoader(dataset(), batch_size=16)
    assert not trainer._data_connector._requires_distributed_sampler(resumable)  # kept, and it splits itself
    assert trainer._data_connector._requires_distributed_sampler(DataLoader(dataset(), shuffle=True))  # replaced


def test_the_sampler_state_round_trips_and_resumes_inside_the_epoch():
    sampler = ResumableSampler(range(20), seed=9)
    sampler.set_epoch(2)
    iterator = iter(sampler)
    head = [next(iterator) for _ in range(7)]
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (2, 7)
    resumed = ResumableSampler(range(20), seed=9)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    resumed.set_epoch(2)  # as Lightning does before the resumed epoch: the position stays
    assert head + list(resumed) == orders(ResumableSampler(range(20), seed=9), range(2, 3))[0]
    assert list(resumed) == orders(ResumableSampler(range(20), seed=9), range(3, 4))[0]  # then the next epoch
    other = ResumableSampler(range(20), seed=9)
    other.load_state_dict(state)
    other.set_epoch(3)  # a later epoch drops the position
    assert list(other) == orders(ResumableSampler(range(20), seed=9), range(3, 4))[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_saves_the_batches_consumed_not_those_its_workers_prefetched(workers):
    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(list(range(40)), batch_size=4, seed=1, num_workers=workers, drop_last=True)

    uninterrupted = [batch.tolist() for batch in loader()]
    first = loader()
    iterator = iter(first)
    head = [next(iterator).tolist() for _ in range(3)]  # the workers have fetched further ahead
    state = first.state_dict()
    assert (state["epoch"], state["position"]) == (0, 12)
    del iterator
    resumed = loader()
    resumed.load_state_dict(state)
    assert head + [batch.tolist() for batch in resumed] == uninterrupted
    assert resumed.state_dict()["position"] == 40  # complete: the next pass is epoch 1
    reference = loader()
    reference.sampler.set_epoch(1)  # type: ignore[attr-defined]
    assert [batch.tolist() for batch in resumed] == [batch.tolist() for batch in reference]


def test_a_state_of_other_data_warns_and_restarts_the_epoch():
    state = ResumableSampler(range(20), seed=9).state_dict() | {"epoch": 1, "position": 5}
    sampler = ResumableSampler(range(30), seed=9)
    with pytest.warns(UserWarning, match=r"dataset_size 20 -> 30.*Epoch 1 restarts from its first batch"):
        sampler.load_state_dict(state)
    assert list(sampler) == orders(ResumableSampler(range(30), seed=9), range(1, 2))[0]
    with pytest.raises(ValueError, match=r"lacks \['position'"):
        sampler.load_state_dict({"epoch": 0})


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ResumableSampler(range(4), seed=-1), r"`seed` must be an integer in \[0, .*got -1"),
        (lambda: ResumableSampler(range(4), seed=True), r"`seed` .* got True"),
        (lambda: ResumableSampler(range(4), shuffle="yes"), r"`shuffle` must be True or False, got 'yes'"),
        (lambda: ResumableSampler(range(4), num_replicas=0), r"`num_replicas` must be an integer >= 1, got 0"),
        (lambda: ResumableSampler(range(4), num_replicas=2, rank=2), r"`rank` must be below `num_replicas=2`, got 2"),
        (lambda: ResumableSampler(range(4)).set_epoch(-3), r"`epoch` must be an integer >= 0, got -3"),
        (lambda: ResumableDataLoader(range(4), batch_size=0), r"`batch_size` must be an integer >= 1, got 0"),
        (lambda: ResumableDataLoader(range(4), generator=torch.Generator()), r"no `generator`"),
        (lambda: ResumableDataLoader(range(4), batch_sampler=[[0]]), r"no `batch_sampler` \(got \[\[0\]\]\)"),
        (
            lambda: ResumableDataLoader(range(4), seed=1, sampler=ResumableSampler(range(4))),
            r"not beside it \(got shuffle=None, seed=1\)",
        ),
    ],
)
def test_bad_arguments_are_refused_naming_the_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_wrong_types_are_refused():
    with pytest.raises(TypeError, match="must have a length"):
        ResumableSampler(iter(range(4)))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a ResumableSampler, got SequentialSampler"):
        ResumableDataLoader(range(4), sampler=torch.utils.data.SequentialSampler(range(4)))  # type: ignore[arg-type]


def test_rng_states_round_trip_every_generator():
    import random

    import numpy as np

    states = collect_rng_states()
    drawn = torch.rand(2), np.random.rand(2), random.random()
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    restore_rng_states(states)
    again = torch.rand(2), np.random.rand(2), random.random()
    assert torch.equal(drawn[0], again[0]) and (drawn[1] == again[1]).all() and drawn[2] == again[2]
