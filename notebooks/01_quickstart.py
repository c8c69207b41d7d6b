# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # 01 · Quickstart: a teacher, a student and one callback
#
# Knowledge distillation trains a small *student* to match the softened output distribution of a trained
# *teacher* as well as the labels. With lightning-distill that is one line added to an ordinary Lightning run: the
# teacher goes into a `DistillationCallback`, the student is a `DistillModule`. This notebook trains a 1-D CNN
# teacher on MNIST-1D, then the same MLP student alone and distilled with the same recipe, compares them in a table
# and in learning curves read from the logs, and checks that the teacher never ends up in the student's optimizer or
# checkpoint.

# %%
import functools
import logging
import os
import statistics
import warnings
from pathlib import Path

import lightning as L
import matplotlib.pyplot as plt
import torch

from lightning_distill import DistillationCallback, DistillModule
from lightning_distill.demos import MLPStudent, MNIST1DDataModule, MNIST1DTeacher
from lightning_distill.demos.loggers import logged_trainer, read_metric, where_logs_are

QUICK = os.environ.get("LIGHTNING_DISTILL_QUICK") == "1"  # the test suite's small-run switch
OUTPUT = Path("notebook_output") / "01_quickstart"
OUTPUT.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)  # tiny models: one thread is as fast as several and shares the machine well
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # hide the Trainer's start-up banner
warnings.filterwarnings("ignore", message=".*(LeafSpec|log_every_n_steps).*")  # version and tiny-data noise

# %% [markdown]
# ## Data and settings
#
# [MNIST-1D](https://github.com/greydanus/mnist1d) is a procedurally generated, 1-D stand-in for MNIST: 10 classes,
# signals of length 40, 4000 training and 1000 test samples. It is generated locally (nothing is downloaded) and
# is small enough to train everything here on a CPU in a minute, yet a CNN clearly beats an MLP on it, which leaves
# room for distillation to help. The recipe is the one of `lightning-distill demo`: the teacher is trained with
# Adam 5e-3 for 30 epochs, each student with Adam 1e-2 and a cosine schedule for 30 epochs, $\alpha = 0.9$, $T = 4$.

# %%
NUM_TRAIN = 1000 if QUICK else None  # None: all 4000 training samples
TEACHER_EPOCHS = 8 if QUICK else 30
STUDENT_EPOCHS = 2 if QUICK else 30
SEEDS = [0] if QUICK else [0, 1]
ALPHA, TEMPERATURE = 0.9, 4.0
LOG_EVERY_N_STEPS = 1 if QUICK else 10


def steps(values: list[float]) -> list[int]:
    """The training step of each per-step value read from the log (one every LOG_EVERY_N_STEPS steps)."""
    return [LOG_EVERY_N_STEPS * (i + 1) for i in range(len(values))]


def datamodule() -> MNIST1DDataModule:
    """MNIST-1D (data seed 42). Its validation loader serves the test split, as the published baselines do."""
    return MNIST1DDataModule(data_seed=42, num_train=NUM_TRAIN, batch_size=100)


def trainer(name: str, epochs: int, callbacks: list[L.Callback]) -> L.Trainer:
    """A CPU Trainer that logs to OUTPUT/logs/<name> (CSV, and TensorBoard when installed)."""
    return logged_trainer(OUTPUT / "logs", name, epochs, callbacks, log_every_n_steps=LOG_EVERY_N_STEPS)


# %% [markdown]
# ## 1. Train the teacher
#
# Any trained `nn.Module` that returns logits can be a teacher. Here we train one with the library itself:
# `DistillModule(student=net, alpha=0.0)` is plain cross-entropy training with no teacher, the same code path the
# students use. `export_student()` then hands back the bare `nn.Module`, in eval mode.

# %%
L.seed_everything(0, verbose=False)
teacher_module = DistillModule(
    student=MNIST1DTeacher(), alpha=0.0, optimizer=functools.partial(torch.optim.Adam, lr=5e-3)
)
teacher_trainer = trainer("teacher", TEACHER_EPOCHS, [])
teacher_trainer.fit(teacher_module, datamodule=datamodule())
(teacher_metrics,) = teacher_trainer.test(teacher_module, datamodule=datamodule(), verbose=False)
teacher = teacher_module.export_student()
teacher_state = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}  # to check it never changes
print(
    f"teacher: {sum(p.numel() for p in teacher.parameters()):,} parameters, test accuracy "
    f"{100 * teacher_metrics['test/acc']:.1f} %"
)
print(where_logs_are(teacher_trainer.loggers))
assert not teacher.training and isinstance(teacher, MNIST1DTeacher)

# %% [markdown]
# ## 2. The student, alone and distilled
#
# The student is an MLP (40 → 256 → 256 → 10), wrapped in a `DistillModule` that owns the loss
#
# $$\mathcal{L} = \alpha \, T^2 \, \mathrm{KL}\big(p_\mathrm{teacher}^{(T)} \,\|\, p_\mathrm{student}^{(T)}\big)
# + (1 - \alpha) \, \mathrm{CE}(z_\mathrm{student}, y), \qquad p^{(T)} = \mathrm{softmax}(z / T).$$
#
# The baseline is the very same module with `alpha=0.0`. Both runs of a seed start from the same initial weights
# and see the same batches (`seed_everything(seed)` right before each), so the only difference is the teacher. The
# one-line addition is `callbacks=[DistillationCallback(teacher)]`.


# %%
def student(seed: int, alpha: float) -> DistillModule:
    """The MLP student with the demo's recipe; ``alpha=0`` trains it alone."""
    L.seed_everything(seed, verbose=False)  # same initial weights and data order for both runs of a seed
    return DistillModule(
        student=MLPStudent(hidden=256),
        alpha=alpha,
        temperature=TEMPERATURE,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=STUDENT_EPOCHS),
    )


test_acc: dict[str, list[float]] = {"student alone": [], "student distilled": []}
runs: dict[str, list[L.Trainer]] = {"student alone": [], "student distilled": []}
for seed in SEEDS:
    alone = student(seed, alpha=0.0)
    alone_trainer = trainer(f"alone_seed{seed}", STUDENT_EPOCHS, [])
    alone_trainer.fit(alone, datamodule=datamodule())

    distilled = student(seed, alpha=ALPHA)
    callback = DistillationCallback(teacher)  # <- the one-line addition
    distilled_trainer = trainer(f"distilled_seed{seed}", STUDENT_EPOCHS, [callback])
    distilled_trainer.fit(distilled, datamodule=datamodule())

    for label, module, run in (
        ("student alone", alone, alone_trainer),
        ("student distilled", distilled, distilled_trainer),
    ):
        (metrics,) = run.test(module, datamodule=datamodule(), verbose=False)  # no teacher needed to test
        test_acc[label].append(metrics["test/acc"])
        runs[label].append(run)
    print(
        f"seed {seed}: alone {100 * test_acc['student alone'][-1]:.1f} %, "
        f"distilled {100 * test_acc['student distilled'][-1]:.1f} %"
    )
print(where_logs_are(distilled_trainer.loggers))

# %% [markdown]
# ## 3. Results
#
# Test accuracy on the 1000 MNIST-1D test samples (mean ± std over seeds when there are several).


# %%
def mean_std(values: list[float]) -> str:
    """``mean ± std`` in percent (std 0 for a single value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * std:.1f} %"


parameters = {
    "teacher (1-D CNN)": sum(p.numel() for p in teacher.parameters()),
    "student alone": sum(p.numel() for p in alone.student.parameters()),
    "student distilled": sum(p.numel() for p in distilled.student.parameters()),
}
accuracies = {"teacher (1-D CNN)": [teacher_metrics["test/acc"]], **test_acc}
print("| model | parameters | runs | test accuracy |\n|---|---:|---:|---:|")
for model, accs in accuracies.items():
    print(f"| {model} | {parameters[model]:,} | {len(accs)} | {mean_std(accs)} |")
gains = [d - a for d, a in zip(test_acc["student distilled"], test_acc["student alone"], strict=True)]
print(f"\ngain of distillation, paired by seed: {', '.join(f'{100 * g:+.1f}' for g in gains)} points")
if not QUICK:
    assert all(g > 0 for g in gains), "the distilled student should beat the same student trained alone"

# %% [markdown]
# In the full run (seeds 0 and 1) we measured 68.5 ± 0.6 % for the student alone and 74.5 ± 0.8 % distilled, a
# gain of +4.9 and +6.9 points per seed; `lightning-distill demo`, with 5 seeds, gives 68.5 → 73.0 %. The teacher is
# *smaller* than the student: what it passes on is the inductive bias of its convolutions (MNIST-1D digits are told
# apart by where their bumps lie), which an MLP cannot learn from 4000 labels alone.
#
# ## 4. Learning curves, read from the logs
#
# Every run wrote a CSV log (and a TensorBoard one when TensorBoard is installed). `read_metric(log_dir, key)` returns
# `(epoch, value)` pairs from the CSV, so the curves below come from the same files you would inspect yourself.
# With the callback present, the student also logs `val/teacher_acc` and `val/agreement` (top-1 agreement with the
# teacher).

# %%
fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
colors = {"teacher (1-D CNN)": "C0", "student alone": "C1", "student distilled": "C2"}
teacher_curve = read_metric(teacher_trainer.log_dir, "val/acc")
acc_ax.plot([e + 1 for e, _ in teacher_curve], [100 * v for _, v in teacher_curve], color="C0", label="teacher")
for label, label_runs in runs.items():
    for i, run in enumerate(label_runs):
        curve = read_metric(run.log_dir, "val/acc")
        acc_ax.plot(
            [e + 1 for e, _ in curve],
            [100 * v for _, v in curve],
            color=colors[label],
            alpha=0.8,
            label=label if i == 0 else None,
        )
acc_ax.set(xlabel="epoch", ylabel="held-out accuracy (%)", title="val/acc (one line per seed)")
acc_ax.legend()

# The logged loss terms of the distilled run (unweighted): kd_loss is T²·KL, task_loss the cross-entropy.
distilled_dir = runs["student distilled"][0].log_dir
for key, color in (("train/kd_loss", "C3"), ("train/task_loss", "C2")):
    values = [v for _, v in read_metric(distilled_dir, key)]
    loss_ax.plot(steps(values), values, color=color, label=f"distilled: {key}")
alone_task = [v for _, v in read_metric(runs["student alone"][0].log_dir, "train/task_loss")]
loss_ax.plot(steps(alone_task), alone_task, color="C1", linestyle="--", label="alone: train/task_loss")
loss_ax.set(xlabel="training step", ylabel="loss", title="logged loss terms, seed 0")
loss_ax.set_yscale("log")
loss_ax.legend()
fig.tight_layout()
fig.savefig(OUTPUT / "learning_curves.png", dpi=120)
plt.show()

# %% [markdown]
# On the right, the terms are logged unweighted: `train/kd_loss` is $T^2 \, \mathrm{KL}$, `train/task_loss` the
# cross-entropy on the labels, and `train/loss` (not drawn) their $\alpha$-weighted sum. In the full run the student
# alone drives its training cross-entropy towards zero, memorizing the 4000 training samples, while its held-out
# accuracy stalls; the distilled student keeps a higher training cross-entropy because it is also pulled towards the
# teacher's soft targets, and generalizes better.

# %%
logged = {
    key
    for key in ("train/loss", "train/kd_loss", "train/task_loss", "val/acc", "val/teacher_acc", "val/agreement")
    if read_metric(distilled_dir, key)
}
print("logged by the distilled run:", sorted(logged))
agreement = read_metric(distilled_dir, "val/agreement")[-1][1]
print(f"top-1 agreement with the teacher after the last epoch: {100 * agreement:.1f} %")
assert len(logged) == 6  # read_metric raises KeyError for a key that was never logged

# %% [markdown]
# ## 5. The teacher stays out of the student
#
# The callback owns the teacher: it is frozen, kept in eval mode and run under `torch.no_grad()`, and it is never
# registered as a submodule of the student. So it is in neither the optimizer nor the checkpoint, and saving,
# resuming or exporting the student never drags the teacher along. We check all of that on the last distilled run.

# %%
teacher_params = {id(p) for p in callback.teacher.parameters()}
optimized = {id(p) for group in distilled_trainer.optimizers[0].param_groups for p in group["params"]}
assert not teacher_params & optimized, "a teacher parameter is in the optimizer"
assert optimized == {id(p) for p in distilled.parameters()}  # exactly the student's parameters
assert all(not p.requires_grad for p in callback.teacher.parameters()) and not callback.teacher.training
assert callback.teacher is teacher  # the callback holds your module itself, frozen in place, not a copy
assert all(torch.equal(tensor, teacher_state[name]) for name, tensor in teacher.state_dict().items())  # unchanged
print(f"optimizer: {len(optimized)} tensors, all the student's; teacher: frozen, eval mode, unchanged")

# %%
checkpoint_path = OUTPUT / "distilled.ckpt"
distilled_trainer.save_checkpoint(checkpoint_path)
checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)  # our own file
keys = list(checkpoint["state_dict"])
print(f"{checkpoint_path} ({checkpoint_path.stat().st_size / 1e3:.0f} kB): {len(keys)} tensors")
print("  ", keys)
print("callback state in the checkpoint:", checkpoint["callbacks"])
assert all(key.startswith("student.") for key in keys)
assert not any("teacher" in key for key in keys)
saved = sum(checkpoint["state_dict"][key].numel() for key in keys)
assert saved == parameters["student distilled"]  # the student's 79 k numbers, none of the teacher's

# %% [markdown]
# The checkpoint holds the student's weights (`student.*`, plus Adam's state for them) and, for the callback, only a
# few hundred bytes: the teacher's class and a fingerprint of its weights, so resuming with a different teacher
# warns.
#
# ## 6. Export the student
#
# `export_student()` returns the trained network as a plain `nn.Module` in eval mode: no Lightning, no teacher, no
# distillation state. It predicts exactly what the tested module did.

# %%
net = distilled.export_student()
dm = datamodule()
dm.setup("test")
x_test, y_test = dm.test_set.tensors
with torch.no_grad():
    exported_acc = (net(x_test).argmax(-1) == y_test).float().mean().item()
print(
    type(net).__name__,
    f"{sum(p.numel() for p in net.parameters()):,} parameters, test accuracy {100 * exported_acc:.1f} %",
)
assert isinstance(net, MLPStudent) and not net.training
assert abs(exported_acc - test_acc["student distilled"][-1]) < 1e-6
torch.save(net.state_dict(), OUTPUT / "student.pt")  # ready to load into MLPStudent() anywhere
