# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # 05 · Your own loop: plain PyTorch and Lightning Fabric
#
# Not every training loop is a Lightning `Trainer`. `lightning_distill.Distiller` gives a loop you write yourself
# the same distillation as `DistillModule` + `DistillationCallback`, from the same engine: a frozen teacher, the
# same loss and terms, feature maps and their projectors, schedules. This notebook distills an MLP from a 1-D CNN
# on MNIST-1D in a plain PyTorch loop (with Intel Neural Compressor's hook names), then in a Lightning Fabric
# loop that logs through real loggers, and shows the errors a wrong call order gives.

# %%
import copy
import logging
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from lightning.fabric import Fabric
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_distill import Distiller, FeatureMap
from lightning_distill.demos import MLPStudent, MNIST1DDataModule, MNIST1DTeacher
from lightning_distill.demos.loggers import default_loggers, read_metric, where_logs_are

QUICK = os.environ.get("LIGHTNING_DISTILL_QUICK") == "1"  # the test suite's small-run switch
OUTPUT = Path("notebook_output") / "05_your_own_loop"
OUTPUT.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)  # tiny models: one thread is as fast as several and shares the machine well
logging.getLogger("lightning.fabric").setLevel(logging.WARNING)  # hide Fabric's start-up banner

EPOCHS = 2 if QUICK else 30
TEACHER_EPOCHS = 5 if QUICK else 30
ALPHA, TEMPERATURE = 0.9, 4.0  # the demo's recipe

# %% [markdown]
# ## Data and a teacher, trained in a plain loop
#
# The data module is only used here as a source of tensors and loaders (`setup()` builds the splits;
# `val_size=500` holds out a validation split from the training data). The teacher is trained with the most
# ordinary PyTorch loop there is.

# %%
dm = MNIST1DDataModule(data_seed=42, num_train=400 if QUICK else None, val_size=500, batch_size=100, shuffle_seed=0)
dm.setup()
x_val, y_val = dm.val_set.tensors


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    acc = (model(x).argmax(-1) == y).float().mean().item()
    model.train(was_training)
    return acc


torch.manual_seed(0)
teacher = MNIST1DTeacher()
optimizer = torch.optim.Adam(teacher.parameters(), lr=5e-3)
for _ in range(TEACHER_EPOCHS):
    for x, y in dm.train_dataloader():
        loss = F.cross_entropy(teacher(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
teacher.zero_grad()  # drop its last gradients, so the check below sees that distillation never makes new ones
print(f"teacher validation accuracy: {100 * accuracy(teacher, x_val, y_val):.1f} %")

# %% [markdown]
# ## Plain PyTorch, with INC-style hooks
#
# The `Distiller` is told where the loop is by hooks named after Intel Neural Compressor's distillation callbacks:
# `on_train_begin` (freezes and places the teacher), `on_epoch_begin` / `on_epoch_end` (the epoch counter that
# epoch schedules read), `on_step_begin` (before the student's forward; needed with feature maps),
# `on_after_optimizer_step` (checks the projectors were stepped), `on_train_end` (removes its hooks).
# `distiller.loss(inputs, student_output, target)` runs the teacher on the same inputs and returns
# α·T²·KL(teacher‖student) + (1−α)·CE, every term kept in `distiller.last_terms`.

# %%
teacher_before = copy.deepcopy(teacher.state_dict())
torch.manual_seed(0)
student = MLPStudent(hidden=256)
distiller = Distiller(teacher, alpha=ALPHA, temperature=TEMPERATURE)
optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)  # no feature maps: the distiller has no parameters
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)

plain_losses: list[float] = []
distiller.on_train_begin(student)
for epoch in range(EPOCHS):
    distiller.on_epoch_begin(epoch)
    for x, y in dm.train_dataloader():
        distiller.on_step_begin()
        loss = distiller.loss(x, student(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        distiller.on_after_optimizer_step()
        plain_losses.append(loss.item())
    scheduler.step()
    distiller.on_epoch_end()
distiller.on_train_end()
print(
    f"after {distiller.epoch} epochs, {distiller.step} steps: last terms",
    {k: round(v.item(), 4) for k, v in distiller.last_terms.items()},
)
plain_acc = accuracy(student, x_val, y_val)
print(f"distilled student validation accuracy: {100 * plain_acc:.1f} %")

# The teacher was never trained: bit-identical weights, no gradients, still in eval mode.
assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
assert all(p.grad is None and not p.requires_grad for p in teacher.parameters()) and not teacher.training
assert sorted(distiller.last_terms) == ["kd_loss", "loss", "task_loss"]
assert list(distiller.parameters()) == []

# %% [markdown]
# The loss is the textbook one. Checked on a batch against a hand-written formula (`kl_div` with `batchmean` is
# KL(teacher‖student) averaged over samples):

# %%
x, y = next(iter(dm.train_dataloader()))
distiller.on_train_begin(student)
with torch.no_grad():
    ours = distiller.loss(x, student(x), y)
    s, t = student(x), teacher(x)
    log_p_s, log_p_t = F.log_softmax(s / TEMPERATURE, -1), F.log_softmax(t / TEMPERATURE, -1)
    kd = TEMPERATURE**2 * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    by_hand = ALPHA * kd + (1 - ALPHA) * F.cross_entropy(s, y)
distiller.on_train_end()
print(f"Distiller.loss {ours.item():.6f}  by hand {by_hand.item():.6f}")
torch.testing.assert_close(ours, by_hand)

# %% [markdown]
# **Your own task loss.** `on_after_compute_loss(inputs, student_output, student_loss)` (INC's hook) puts a task
# loss you computed in place of the cross-entropy: α·KD + (1−α)·`student_loss`. Here, label smoothing:

# %%
distiller.on_train_begin(student)
output = student(x)
smoothed = F.cross_entropy(output, y, label_smoothing=0.1)
combined = distiller.on_after_compute_loss(x, output, smoothed)
torch.testing.assert_close(combined, ALPHA * distiller.last_terms["kd_loss"] + (1 - ALPHA) * smoothed.detach())
print(f"α·KD + (1−α)·smoothed CE = {combined.item():.4f}")
distiller.on_train_end()

# %% [markdown]
# ## Lightning Fabric, with a feature map and real loggers
#
# Fabric adds devices, precision and strategies to the same loop. `on_train_begin(..., fabric=fabric)` places the
# teacher on `fabric.device`, converts it for `*-true` precisions and runs it in `fabric.autocast()`. This time the
# student also matches the teacher's pooled features (FitNets): `FeatureMap(student="net.act2",
# teacher="flatten")` maps the student's 256-wide last hidden layer onto the teacher's 32 pooled channels through a
# linear projector built from one example batch. The projector is the distiller's only parameter, so it goes into
# the optimizer, and `fabric.setup_module(distiller)` would synchronize its gradients under DDP.
#
# Fabric takes the same loggers as the Trainer (`default_loggers` returns Lightning loggers, which are Fabric
# loggers too); `fabric.log_dict` writes to all of them. Fabric has no notion of epochs, so we log `epoch` beside the
# values: `read_metric` then pairs values with epochs (the default) or with steps (`by="step"`). Fabric has no
# Trainer to close the loggers either: `finalize` writes the CSV file.

# %%
fabric = Fabric(accelerator="cpu", devices=1, loggers=default_loggers(OUTPUT / "logs", "fabric"))
fabric.seed_everything(0, verbose=False)
student = MLPStudent(hidden=256)
distiller = Distiller(
    teacher,
    alpha=ALPHA,
    temperature=TEMPERATURE,
    feature_maps=[FeatureMap(student="net.act2", teacher="flatten", loss="mse", weight=0.1)],
)
x_example, _ = next(iter(dm.train_dataloader()))
distiller.on_train_begin(student, example_inputs=x_example, fabric=fabric)
print("the distiller's parameters:", {name: tuple(p.shape) for name, p in distiller.named_parameters()})
optimizer = torch.optim.Adam([*student.parameters(), *distiller.parameters()], lr=1e-2)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)
student, optimizer = fabric.setup(student, optimizer)
distiller = fabric.setup_module(distiller)
loader = fabric.setup_dataloaders(dm.train_dataloader())

for epoch in range(EPOCHS):
    for x, y in loader:
        distiller.on_step_begin()  # records the student's features during its forward
        loss = distiller(x, student(x), y)  # call the wrapped distiller: the loss goes through the wrapper
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        distiller.on_after_optimizer_step()
        terms = {f"train/{name}": value.item() for name, value in distiller.last_terms.items()}
        fabric.log_dict({**terms, "epoch": epoch}, step=distiller.step - 1)
    scheduler.step()
    distiller.on_epoch_end()
    fabric.log_dict({"val/acc": accuracy(student, x_val, y_val), "epoch": epoch}, step=distiller.step - 1)
distiller.on_train_end()
for logger in fabric.loggers:
    logger.finalize("success")
print(where_logs_are(fabric.loggers))

log_dir = fabric.loggers[0].log_dir
fabric_losses = [value for _, value in read_metric(log_dir, "train/loss", by="step")]
feature_losses = [value for _, value in read_metric(log_dir, "train/feature_loss/net.act2", by="step")]
val_curve = read_metric(log_dir, "val/acc")  # (epoch, value): we logged the epoch too
print(f"Fabric student validation accuracy: {100 * val_curve[-1][1]:.1f} %")
if not QUICK:  # measured: 70.8 % (plain loop) and 72.6 % (Fabric, with the feature map); chance is 10 %
    assert plain_acc > 0.6 and val_curve[-1][1] > 0.6
assert len(fabric_losses) == distiller.step == EPOCHS * len(loader)
assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training

# %% [markdown]
# ## Wrong call orders fail loudly
#
# A loop written by hand is easy to get subtly wrong. The two classic mistakes raise at once, saying what to do.
#
# **`loss` before `on_train_begin`**: the teacher has not been placed and frozen yet.

# %%
fresh = Distiller(teacher, alpha=ALPHA, temperature=TEMPERATURE)
try:
    fresh.loss(x_example, student(x_example), torch.zeros(len(x_example), dtype=torch.long))
except RuntimeError as error:
    print(error)
    assert "on_train_begin" in str(error)
else:
    raise AssertionError("expected a RuntimeError")

# %% [markdown]
# **Projectors that are never stepped**: an optimizer built from the student's parameters alone leaves the
# projector at its random initialization forever, so the feature term trains against noise (the lazily built
# projector of Intel Neural Compressor has exactly this problem). After the first optimizer step the distiller
# sees that its parameters did not change and names them.

# %%
torch.manual_seed(0)
student = MLPStudent(hidden=256)
distiller = Distiller(
    teacher, alpha=ALPHA, temperature=TEMPERATURE, feature_maps=[FeatureMap(student="net.act2", teacher="flatten")]
)
distiller.on_train_begin(student, example_inputs=x_example)
optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)  # the mistake: distiller.parameters() left out
x, y = next(iter(dm.train_dataloader()))
distiller.on_step_begin()
loss = distiller.loss(x, student(x), y)
optimizer.zero_grad()
loss.backward()
optimizer.step()
try:
    distiller.on_after_optimizer_step()
except RuntimeError as error:
    print(error)
    assert "projectors.net_act2.weight" in str(error)
else:
    raise AssertionError("expected a RuntimeError")

# %% [markdown]
# **A feature map without `on_step_begin`**: the student's features are recorded only between `on_step_begin` and
# `loss`, so forgetting it would silently give the loss no features; it raises instead.

# %%
try:
    distiller.loss(x, student(x), y)
except RuntimeError as error:
    print(error)
    assert "on_step_begin" in str(error)
else:
    raise AssertionError("expected a RuntimeError")
distiller.on_train_end()

# %% [markdown]
# ## Loss curves

# %%
fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
loss_ax.plot(plain_losses, label="plain PyTorch: KD + CE", alpha=0.8)
loss_ax.plot(fabric_losses, label="Fabric: KD + CE + 0.1·feature", alpha=0.8)
loss_ax.plot(feature_losses, label="Fabric: feature term (unweighted)", alpha=0.8)
loss_ax.set_xlabel("step")
loss_ax.set_ylabel("loss")
loss_ax.set_yscale("log")
loss_ax.set_title("training loss per step")
loss_ax.legend()
acc_ax.plot([epoch + 1 for epoch, _ in val_curve], [100 * acc for _, acc in val_curve], marker="o")
acc_ax.set_xlabel("epoch")
acc_ax.set_ylabel("validation accuracy (%)")
acc_ax.set_title("Fabric run, read back from metrics.csv")
fig.tight_layout()
fig.savefig(OUTPUT / "loss_curves.png", dpi=120)
plt.show()

# %% [markdown]
# Both loops run the teacher once per step under `torch.no_grad()` and never touch its weights; the curves are the
# same terms the Trainer API logs (`train/loss`, `train/kd_loss`, `train/task_loss`, `train/feature_loss/<name>`).
# Under several processes the Fabric loop is unchanged: `Fabric(strategy="ddp", devices=2)` and `fabric.launch()`
# (see `examples/fabric_loop.py`; the tests run it on two CPU processes and find both ranks' students and projectors
# identical, and the teacher never wrapped).
