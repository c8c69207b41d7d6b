# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # 06 · Scale out: DDP, precision and where the teacher lives
#
# Under every strategy the callback keeps the teacher out of the student's strategy wrapper, optimizer and
# checkpoint. This notebook runs a 2-process DDP fit on CPU from the notebook itself and checks on each rank that the
# teacher was never wrapped and that both ranks end with the same student; then it runs the teacher under
# `bf16-mixed` and with its own precision (`TeacherRunner(teacher, precision="bf16")`), shows when the teacher is
# replicated or sharded (`TeacherRunner(teacher, sharding=...)`), and the refusals for combinations that cannot work.
# The README's "Strategies and precision" table lists every strategy (FSDP, DeepSpeed, ...).

# %%
import copy
import functools
import json
import logging
import os
import warnings
from pathlib import Path

import lightning as L
import matplotlib.pyplot as plt
import torch
from torch.nn.parallel import DistributedDataParallel

from lightning_distill import DistillationCallback, DistillModule, TeacherRunner
from lightning_distill.demos import MLPStudent, MNIST1DDataModule, MNIST1DTeacher
from lightning_distill.demos.loggers import logged_trainer, read_metric, where_logs_are
from lightning_distill.teacher._sharding import AUTO_SHARD_BYTES, module_bytes, resolve_sharding

QUICK = os.environ.get("LIGHTNING_DISTILL_QUICK") == "1"  # the test suite's small-run switch
OUTPUT = Path("notebook_output") / "06_scale_out"
OUTPUT.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)  # one thread per process: two DDP processes share the two cores of a small machine
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # hide the Trainer's start-up banner
# torch deprecating APIs Lightning calls (LeafSpec, the all_gather of `strategy.all_gather`), and tiny data
warnings.filterwarnings("ignore", message=".*(LeafSpec|all_gather is deprecated|log_every_n_steps|num_workers).*")

NUM_TRAIN = 800 if QUICK else None  # None: all 4000 training samples
EPOCHS = 1 if QUICK else 5
LIMIT_BATCHES = 4 if QUICK else 1.0


def datamodule() -> MNIST1DDataModule:
    """MNIST-1D (data seed 42); under DDP each rank gets its own shard of every epoch's batches."""
    return MNIST1DDataModule(data_seed=42, num_train=NUM_TRAIN, batch_size=100)


def student_module() -> DistillModule:
    """The MLP student of the quickstart, distilled with alpha 0.9 and T 4."""
    torch.manual_seed(1)
    return DistillModule(
        student=MLPStudent(hidden=256),
        alpha=0.9,
        temperature=4.0,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
    )


def trainer(
    name: str, callbacks: list[L.Callback], epochs: int = EPOCHS, limit_batches: float = LIMIT_BATCHES, **kwargs: object
) -> L.Trainer:
    """A CPU Trainer logging to OUTPUT/logs/<name>; keyword arguments choose the strategy, devices, precision."""
    return logged_trainer(
        OUTPUT / "logs",
        name,
        epochs,
        callbacks,
        limit_train_batches=limit_batches,
        limit_val_batches=limit_batches,
        log_every_n_steps=1,
        **kwargs,
    )


# The teacher: MNIST1DTeacher trained alone (alpha=0, no callback), as in the quickstart, then exported frozen.
torch.manual_seed(0)
teacher_module = DistillModule(
    student=MNIST1DTeacher(), alpha=0.0, optimizer=functools.partial(torch.optim.Adam, lr=5e-3)
)
teacher_trainer = trainer("teacher", [], epochs=5 if QUICK else 20, limit_batches=1.0, devices=1)
teacher_trainer.fit(teacher_module, datamodule=datamodule())
print(f"teacher held-out accuracy: {100 * teacher_trainer.callback_metrics['val/acc'].item():.1f} %")
teacher = teacher_module.export_student()

# %% [markdown]
# ## DDP with 2 processes, from the notebook
#
# `strategy="ddp_notebook"` forks the notebook's process once per device, so it works in Jupyter where plain `ddp`
# (which relaunches a script) cannot; the test suite runs this very cell in a Jupyter kernel. The forked processes
# inherit everything defined above (data, teacher, the callback class), so nothing needs to be pickled. On a GPU
# machine the notebook must not touch CUDA before the fit (a forked process cannot reuse a CUDA context).
# A small callback records on every rank what the teacher and the student look like after the fit; the ranks write
# it to files because a forked process cannot hand objects back to the notebook (Lightning returns only rank 0's
# trained weights to it).


# %%
class RankReport(L.Callback):
    """Writes, per rank, whether the teacher was wrapped or trained and a checksum of the student's weights."""

    def __init__(self, teacher_callback: DistillationCallback) -> None:
        self.teacher_callback = teacher_callback

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        teacher = self.teacher_callback.teacher
        weights = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "student_wrapped_in_ddp": isinstance(trainer.strategy.model, DistributedDataParallel),
            "teacher_wrapped_in_ddp": isinstance(teacher, DistributedDataParallel),
            "teacher_frozen_eval": not teacher.training and not any(p.requires_grad for p in teacher.parameters()),
            "teacher_in_optimizer": any(
                p is q
                for group in trainer.optimizers[0].param_groups
                for p in group["params"]
                for q in teacher.parameters()
            ),
            "teacher_sharded": self.teacher_callback.teacher_sharded,  # what the default sharding="auto" chose
            "student_checksum": weights.double().sum().item(),
            "student_equal_on_all_ranks": bool(
                torch.equal(*trainer.strategy.all_gather(weights).unbind(0))  # rank 0's copy == rank 1's copy
            ),
        }
        (OUTPUT / f"ddp_rank{trainer.global_rank}.json").write_text(json.dumps(report))


teacher_callback = DistillationCallback(teacher)
ddp_trainer = trainer("ddp", [teacher_callback, RankReport(teacher_callback)], strategy="ddp_notebook", devices=2)
ddp_trainer.fit(student_module(), datamodule=datamodule())
print(where_logs_are(ddp_trainer.loggers))

reports = [json.loads((OUTPUT / f"ddp_rank{rank}.json").read_text()) for rank in (0, 1)]
print("| rank | student in DDP | teacher in DDP | teacher frozen, eval | teacher in optimizer | same student |")
print("|---:|---|---|---|---|---|")
for r in reports:
    print(
        f"| {r['rank']} | {r['student_wrapped_in_ddp']} | {r['teacher_wrapped_in_ddp']} | {r['teacher_frozen_eval']} "
        f"| {r['teacher_in_optimizer']} | {r['student_equal_on_all_ranks']} |"
    )
for r in reports:
    assert r["world_size"] == 2 and r["student_wrapped_in_ddp"] and r["student_equal_on_all_ranks"]
    assert not r["teacher_wrapped_in_ddp"] and r["teacher_frozen_eval"] and not r["teacher_in_optimizer"]
    assert not r["teacher_sharded"]  # "auto" replicates under DDP
assert reports[0]["student_checksum"] == reports[1]["student_checksum"]

# %% [markdown]
# Each rank runs its own frozen replica of the teacher on its own batch: the teacher has no gradients, so there is
# nothing to synchronize and no `find_unused_parameters` to set. Logged metrics are averaged over the ranks with
# `DistillModule(sync_dist=True)`. A teacher too big for one replica per rank is sharded under FSDP
# (`TeacherRunner(teacher, sharding="shard")`, README "Strategies and precision").
#
# ## Precision: the Trainer's, or the teacher's own
#
# Under `precision="bf16-mixed"` the teacher runs inside the Trainer's autocast, like the student. With
# `TeacherRunner(teacher, precision="bf16")` its weights are stored in bfloat16 (half the memory) and it runs outside
# autocast, for a float32 student. Either way the KD loss is computed in float32. A forward hook on the teacher's head
# records the dtype of its logits.

# %%
runs = {}
for name, trainer_kwargs, runner_kwargs in (
    ("32-true", {}, {}),
    ("bf16-mixed", {"precision": "bf16-mixed"}, {}),
    ("teacher bf16", {}, {"precision": "bf16"}),
):
    seen: list[torch.dtype] = []
    run_teacher = copy.deepcopy(teacher)  # each run hooks a fresh teacher (a conversion copies it, hooks included)
    run_teacher.head.register_forward_hook(lambda module, args, output, seen=seen: seen.append(output.dtype))
    run_callback = DistillationCallback(TeacherRunner(run_teacher, **runner_kwargs))
    run = trainer(name.replace(" ", "_"), [run_callback], devices=1, **trainer_kwargs)
    run.fit(student_module(), datamodule=datamodule())
    kd_loss = read_metric(run.log_dir, "train/kd_loss")
    runs[name] = {"logits": seen[0], "teacher_mib": module_bytes(run_callback.teacher) / 2**20, "kd_loss": kd_loss}
    print(
        f"{name:>12}: teacher logits {seen[0]}, teacher {runs[name]['teacher_mib']:.3f} MiB, "
        f"last train/kd_loss {kd_loss[-1][1]:.4f}"
    )
print(where_logs_are(run.loggers))

assert runs["32-true"]["logits"] == torch.float32
assert runs["bf16-mixed"]["logits"] == torch.bfloat16  # inside the Trainer's autocast
assert runs["teacher bf16"]["logits"] == torch.bfloat16  # its own precision, weights stored in bf16
assert runs["teacher bf16"]["teacher_mib"] == runs["32-true"]["teacher_mib"] / 2

# %%
fig, (memory, losses) = plt.subplots(1, 2, figsize=(11, 3.8))
memory.bar(list(runs), [r["teacher_mib"] for r in runs.values()], color=["C0", "C1", "C2"])
memory.set(ylabel="MiB", title="teacher weights held per process")
for name, r in runs.items():
    losses.plot([v for _, v in r["kd_loss"]], label=name)
losses.set(xlabel="step", ylabel="train/kd_loss", title="KD loss per step (float32 math in every run)")
losses.legend()
fig.tight_layout()
fig.savefig(OUTPUT / "precision.png", dpi=120)
plt.show()

# %% [markdown]
# ## Replicate or shard: what `sharding="auto"` decides
#
# A full teacher replica per process is the simplest and fastest choice while the teacher fits. Under the FSDP family
# (`strategy="fsdp"`, `ModelParallelStrategy`) it can instead be sharded across the processes with FSDP2, each unit
# gathered only for its forward. `TeacherRunner(teacher, sharding="auto")` (the default) shards there from 1 GiB of
# teacher weights and replicates everywhere else; `"replicate"` and `"shard"` force a choice, and `"shard"` is refused
# where nothing can shard. The decision is a pure function of the option, the strategy's kind and the teacher's bytes,
# so the table below is what `DistillationCallback.setup` would decide (the 2-process FSDP2 run itself is in the test
# suite and in `benchmarks/sharding.py`: half the teacher's bytes per rank). `resolve_sharding`, `module_bytes` and
# `AUTO_SHARD_BYTES` are the library's internals (`lightning_distill.teacher._sharding`, imported above to show the
# rule), not its API: a program only chooses the option.

# %%
small, large = module_bytes(teacher), 4 << 30  # this teacher (~27 KB) and a 4 GiB one
kinds = {
    "single": "SingleDeviceStrategy",
    "ddp": "DDPStrategy",
    "deepspeed": "DeepSpeedStrategy",
    "fsdp": "FSDPStrategy",
    "model_parallel": "ModelParallelStrategy",
}
decisions = {}
print("| strategy | auto, this teacher | auto, 4 GiB teacher | replicate | shard |\n|---|---|---|---|---|")
for kind, strategy_name in kinds.items():
    cells = []
    for option, size in (("auto", small), ("auto", large), ("replicate", large), ("shard", large)):
        try:
            cells.append("shard" if resolve_sharding(option, kind, strategy_name, size) else "replicate")
        except ValueError:
            cells.append("refused")
    decisions[kind] = cells
    print(f"| {strategy_name} | " + " | ".join(cells) + " |")
assert decisions["ddp"] == ["replicate", "replicate", "replicate", "refused"]
assert decisions["fsdp"] == decisions["model_parallel"] == ["replicate", "shard", "replicate", "shard"]
assert AUTO_SHARD_BYTES == 1 << 30

# %% [markdown]
# ## Combinations that cannot work are refused, with the reason
#
# Some are caught when the `TeacherRunner` is built: an unknown option, or a sharded teacher that should also stay on
# one `device`.

# %%
for name, kwargs in (
    ("an unknown option", {"sharding": "half"}),
    ("shard and a device", {"sharding": "shard", "device": "cpu"}),
):
    try:
        DistillationCallback(TeacherRunner(teacher, **kwargs))
    except ValueError as error:
        print(f"{name}: ValueError: {error}\n")
    else:
        raise AssertionError(f"{name} must be refused")

# %% [markdown]
# Others depend on the Trainer, so they are caught in `setup`, before any training step: sharding under a strategy
# that does not shard (with the strategy's name and the fix), and a device this machine does not have.

# %%
for name, runner, expected in (
    ("shard under a single device", TeacherRunner(teacher, sharding="shard"), "SingleDeviceStrategy"),
    ("a device that is not here", TeacherRunner(teacher, device="cuda:3"), "cuda:3"),
):
    try:
        trainer("refused", [DistillationCallback(runner)], devices=1).fit(student_module(), datamodule=datamodule())
    except (ValueError, RuntimeError) as error:
        print(f"{name}: {type(error).__name__}: {error}\n")
        assert expected in str(error)
    else:
        raise AssertionError(f"{name} must be refused")
