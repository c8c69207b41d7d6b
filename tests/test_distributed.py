"""Several CPU processes (gloo): DDP keeps one frozen, unwrapped teacher per process; FSDP2 shards or replicates it;
the Fabric loop example under DDP."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from lightning_distill import DistillationCallback, DistillModule, FeatureMap
from tests.helpers.processes import run_python
from tests.helpers.tiny import TinyTeacher, make_data, make_loader, make_trainer, tiny_student


class RankChecks(L.Callback):
    """Runs inside every process; an assertion error fails the whole fit."""

    def __init__(self, teacher_callback: DistillationCallback) -> None:
        self.teacher_callback = teacher_callback

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        assert len(pl_module.teacher_outputs.features) == len(pl_module.feature_maps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        teacher = self.teacher_callback.teacher
        assert isinstance(trainer.strategy.model, DistributedDataParallel)
        assert not isinstance(teacher, DistributedDataParallel)
        assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
        wrapped = {id(p) for p in trainer.strategy.model.parameters()}
        assert not wrapped & {id(p) for p in teacher.parameters()}
        assert {id(p) for p in pl_module.projectors.parameters()} <= wrapped  # built before DDP wrapped the module

    def on_train_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = pl_module.all_gather(flat)
        assert gathered.shape[0] == 2 and torch.equal(gathered[0], gathered[1])
        teacher_flat = torch.cat([p.flatten() for p in self.teacher_callback.teacher.parameters()])
        teachers = pl_module.all_gather(teacher_flat)
        assert torch.equal(teachers[0], teachers[1])


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("features", [False, True], ids=["logits", "feature-maps"])
def test_ddp_spawn_two_processes_keeps_teacher_unwrapped_and_students_equal(tmp_path, features):
    torch.manual_seed(0)
    teacher_callback = DistillationCallback(TinyTeacher())
    # the tiny student's layer "1" is 6 wide, the teacher's "body.1" 16: each rank infers a Linear(6, 16) projector
    maps = [FeatureMap(student="1", teacher="body.1")] if features else None
    module = DistillModule(student=tiny_student(), alpha=0.5, temperature=2.0, feature_maps=maps)
    module.example_input_array = make_data(2)[0]
    trainer = make_trainer(
        tmp_path,
        strategy="ddp_spawn",
        devices=2,
        limit_train_batches=3,
        callbacks=[teacher_callback, RankChecks(teacher_callback)],
    )
    trainer.fit(module, make_loader(n=96, batch_size=8))
    assert trainer.state.finished


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_subprocess_two_ranks_teacher_outputs_match_a_local_teacher_on_each_shard(tmp_path):
    out = tmp_path / "ranks"
    run_python("-m", "tests.helpers.ddp_script", str(out), timeout=300)
    reports = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["world_size"] == 2 and report["ddp_module"] and not report["wrapped"]
        assert report["batches"] == 3 and report["max_teacher_diff"] == 0.0  # exactly the local teacher's outputs
        assert report["students_equal"]
        assert report["max_local_vs_mean"] > 1e-3  # the ranks' batches give different losses...
        assert report["max_logged_vs_mean"] < 1e-6  # ...and with sync_dist=True the logged value is their mean


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_sharded_teacher_gives_the_replicated_teachers_student_with_half_the_memory(tmp_path):
    out = tmp_path / "ranks"
    for sharding in ("shard", "replicate"):
        run_python("-m", "tests.helpers.fsdp2_script", str(out), sharding, timeout=300)
    reports = {s: [json.loads((out / f"{s}-rank{r}.json").read_text()) for r in (0, 1)] for s in ("shard", "replicate")}
    full_bytes = 4 * sum(p.numel() for p in TinyTeacher().parameters())
    for sharding, sharded in (("shard", True), ("replicate", False)):
        for report in reports[sharding]:
            assert report["world_size"] == 2 and report["batches"] == 3
            assert report["max_teacher_diff"] == 0.0  # exactly an unsharded teacher on this rank's own batch
            assert report["features"] == 1 and report["teacher_frozen_eval"] and not report["teacher_in_model"]
            assert report["teacher_sharded"] is sharded and report["teacher_dtensor"] is sharded
            assert report["teacher_bytes"] == (full_bytes // 2 if sharded else full_bytes)
    shard_state, replicate_state = (torch.load(out / f"{s}.pt") for s in ("shard", "replicate"))
    assert set(shard_state) == set(replicate_state) and any(k.startswith("projectors.") for k in shard_state)
    for key, value in shard_state.items():
        torch.testing.assert_close(value, replicate_state[key], rtol=0, atol=1e-7)


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_projectors_left_unsharded_are_refused_on_every_rank(tmp_path):
    out = tmp_path / "ranks"
    run_python("-m", "tests.helpers.fsdp2_script", str(out), "replicate", "--no-root-shard", timeout=300)
    for rank in (0, 1):
        message = (out / f"error-rank{rank}.txt").read_text()
        assert "['projectors.1.weight', 'projectors.1.bias'] are not sharded under ModelParallelStrategy" in message
        assert "fully_shard(self" in message


@pytest.mark.distributed
@pytest.mark.slow
def test_fabric_example_under_two_process_ddp_keeps_students_and_projectors_equal(tmp_path):
    out = tmp_path / "ranks"
    run_python("-m", "tests.helpers.fabric_ddp_script", str(out), timeout=300)
    reports = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["world_size"] == 2 and report["students_equal"] and report["projectors_equal"]
        assert report["student_is_ddp"] and report["distiller_is_ddp"] and not report["teacher_wrapped"]
        assert report["projectors_trained"] and report["teacher_frozen_eval"]


class ShareChecks(L.Callback):
    """Every process trains its own half of each epoch, from the ResumableSampler it was given."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        from lightning_distill import ResumableSampler

        sampler = trainer.train_dataloader.sampler
        assert isinstance(sampler, ResumableSampler)
        assert (sampler.num_replicas, sampler.rank) == (2, trainer.global_rank)
        inputs = pl_module.all_gather(batch[0])
        assert not torch.equal(inputs[0], inputs[1])


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_ddp_spawn_mid_epoch_resume_with_the_resumable_loader_is_bit_identical(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_distill import ResumableDataLoader
    from tests.test_resume_faults import CrashAtStep, dataset, distill_module

    teacher = TinyTeacher()

    def fit(name: str, module: L.LightningModule, callbacks: list[L.Callback], **kwargs: object) -> None:
        trainer = make_trainer(
            tmp_path / name,
            strategy="ddp_spawn",
            devices=2,
            max_epochs=2,
            limit_train_batches=None,
            callbacks=[DistillationCallback(teacher), ShareChecks(), *callbacks],
            enable_checkpointing=bool(callbacks),
        )
        trainer.fit(module, ResumableDataLoader(dataset(), batch_size=8, seed=3), ckpt_path=kwargs.get("ckpt_path"))

    straight = distill_module(0, features=False)  # 64 samples, 32 per process: 4 batches of 8 per epoch
    fit("a", straight, [])
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=3, save_last=True)
    with pytest.raises(Exception, match="simulated crash"):
        fit("b", distill_module(0, features=False), [checkpoint, CrashAtStep(6)])  # inside epoch 1
    resumed = distill_module(1, features=False)
    fit("c", resumed, [], ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


class SampleChecks(L.Callback):
    """In every process: the ranks agree on which batches are on-policy, sample different continuations of the same
    prompts on those, and end with equal students."""

    def __init__(self) -> None:
        self.kinds: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        sampled = pl_module._sampled is not None  # after DistillationCallback asked for this step's request
        kinds = pl_module.all_gather(torch.tensor(sampled))
        assert kinds[0] == kinds[1]  # the same kind of batch on both ranks (else sync_dist's all-reduces hang)
        self.kinds.append(sampled)
        if sampled:
            completions = pl_module.all_gather(pl_module.last_sampled_batch["input_ids"])
            assert completions.shape[-1] == 4 + 6 and torch.equal(completions[0, :, :4], completions[1, :, :4])
            assert not torch.equal(completions[0], completions[1])

    def on_train_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        assert any(self.kinds) and not all(self.kinds)  # fraction 0.5: both kinds of batches were trained
        gathered = pl_module.all_gather(torch.cat([p.detach().flatten() for p in pl_module.parameters()]))
        assert torch.equal(gathered[0], gathered[1])


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_spawn_on_policy_ranks_agree_on_the_batch_kind_sample_their_own_and_stay_equal(tmp_path):
    from lightning_distill import OnPolicy
    from lightning_distill.demos import TinyCausalLM

    torch.manual_seed(0)
    ids = torch.arange(1, 9).repeat(16, 1)
    same = {"input_ids": ids, "attention_mask": torch.ones(16, 8, dtype=torch.long), "labels": ids}
    data = [{k: v[i] for k, v in same.items()} for i in range(16)]  # one sequence: both ranks get the same prompts
    module = DistillModule(
        student=TinyCausalLM(vocab_size=16, dim=8, layers=1, heads=2, max_length=16),
        shift_labels=True,
        on_policy=OnPolicy(fraction=0.5, max_new_tokens=6, prompt_length=4, seed=0),
        sync_dist=True,  # every process logs the same keys each step: they agree on the batch's kind
    )
    teacher = TinyCausalLM(vocab_size=16, dim=16, layers=1, heads=2, max_length=16)
    trainer = make_trainer(
        tmp_path,
        strategy="ddp_spawn",
        devices=2,
        max_epochs=2,  # 2 batches an epoch per process; seed 0 makes batches 0, 1 on-policy and 2, 3 not
        callbacks=[DistillationCallback(teacher, check_accuracy=False), SampleChecks()],
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert trainer.state.finished


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:predict returned None")  # the pre-pass writes, it returns nothing
def test_ddp_token_cache_prepass_writes_one_shard_per_rank_equal_to_one_process_and_a_ddp_fit_learns_from_it(
    tmp_path,
):
    import numpy as np

    from lightning_distill import TokenCache
    from lightning_distill._batches import split_batch
    from lightning_distill.teacher._digest import input_digests
    from lightning_distill.teacher._token_files import map_samples, read_shard_meta
    from tests.helpers import hf, token_ddp_script

    if not hf.has_transformers():
        pytest.skip("needs transformers")
    torch.manual_seed(0)
    teacher = token_ddp_script.teacher()
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    token_ddp_script.prepass(teacher, tmp_path / "single", devices=1)  # the reference: one process

    run_python("-m", "tests.helpers.token_ddp_script", str(tmp_path), timeout=300)

    data = token_ddp_script.data()
    n = len(data)
    filled = []
    for rank in (0, 1):
        shard = tmp_path / "cache" / f"shard-{rank:05d}"
        meta = read_shard_meta(shard)
        assert meta is not None and meta["num_samples"] == n
        filled.append(np.asarray(map_samples(shard, meta, "r")["filled"]) == 1)
    assert sorted(p.name for p in (tmp_path / "cache").glob("shard-*")) == ["shard-00000", "shard-00001"]
    assert not (filled[0] & filled[1]).any() and (filled[0] | filled[1]).all()  # disjoint, every row once
    assert np.flatnonzero(filled[1]).tolist() == list(range(1, n, 2))  # rank r: the samples i = r mod 2

    # read back, the 2-process cache is the 1-process one, row by row
    expected = {"num_samples": n, "views": 1, "shift_labels": True, "ignore_index": -100}
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=n)))
    inputs, _ = split_batch(batch)
    rows = np.arange(n)
    digests = input_digests(inputs, n)
    loaded = []
    for name in ("cache", "single"):
        cache = TokenCache(tmp_path / name, top_k=token_ddp_script.TOP_K)
        settings = cache.open_reader(expected)
        assert cache.stored_fraction() == 1.0
        loaded.append((settings, cache.load(rows, digests, torch.device("cpu"))))
        cache.close()
    (ddp_settings, ddp), (single_settings, single) = loaded
    assert ddp_settings == single_settings  # the same teacher fingerprint and settings
    for field in ("positions", "indices", "values", "tail"):
        assert torch.equal(getattr(ddp, field), getattr(single, field)), field

    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rows_written"] for r in reports] == [24, 23]
    assert sum(r["tokens_written"] for r in reports) == len(single.positions)
    for report in reports:
        assert report["finished"] and report["world_size"] == 2 and report["ddp"] and report["students_equal"]
        assert not report["teacher_alive"] and report["connection"] == "CachedTeacher"
        kd = report["kd_loss"]
        assert len(kd) == 6 and all(np.isfinite(kd)) and min(kd) > 0  # 2 epochs x 3 batches of 8 per rank
