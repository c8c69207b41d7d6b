# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # 05 · Your own loop: plain PyTorch and Lightning Fabric
#
# Not every training loop is a `Trainer`. `Distiller` is the same engine as `DistillationCallback` +
# `DistillModule` (the teacher is frozen, placed and run the same way, the loss is composed by the same code) behind
# hooks you call from a loop of your own, named after Intel Neural Compressor's: `on_train_begin`, `on_epoch_begin`,
# `on_step_begin`, `on_after_compute_loss`, `on_epoch_end`, `on_train_end`. This notebook distills an MNIST-1D CNN
# into an MLP twice, in a plain PyTorch loop and in a Lightning Fabric loop with a feature map and a real logger,
# and shows the errors a wrong call order gets.

# %%
import logging
import os
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from lightning.fabric import Fabric
from torch import nn

from lightning_distill import Distiller, FeatureMap
from lightning_distill.data import MNIST1DDataModule
from lightning_distill.loggers import default_loggers, read_metric, where_logs_are
from lightning_distill.models import MLPStudent, MNIST1DTeacher

QUICK = os.environ.get("LIGHTNING_DISTILL_QUICK") == "1"  # the test suite's small-run switch
OUTPUT = Path("notebook_output") / "05_your_own_loop"
OUTPUT.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)  # tiny models: one thread is as fast as several and shares the machine well
logging.getLogger("lightning.fabric").setLevel(logging.WARNING)  # hide Fabric's start-up banner
warnings.filterwarnings("ignore", message=".*(LeafSpec|num_workers).*")  # version and tiny-data noise

NUM_TRAIN = 800 if QUICK else None  # None: all 4000 training samples
TEACHER_EPOCHS = 3 if QUICK else 30
STUDENT_EPOCHS = 2 if QUICK else 20

# %% [markdown]
# ## Data and a teacher, trained in a plain loop
#
# The data module is an ordinary `LightningDataModule`, but its loaders are plain `DataLoader`s: a loop of your own
# can use them directly.

# %%
data = MNIST1DDataModule(data_seed=42, num_train=NUM_TRAIN, batch_size=100)
data.setup("fit")
train_loader, test_loader = data.train_dataloader(), data.val_dataloader()  # val_dataloader serves the test split


def accuracy(model: nn.Module) -> float:
    """Top-1 accuracy of ``model`` on the MNIST-1D test split (eval mode, no gradients)."""
    model.eval()
    with torch.no_grad():
        hits = [(model(x).argmax(-1) == y).sum().item() for x, y in test_loader]
    model.train()
    return sum(hits) / len(test_loader.dataset)


torch.manual_seed(0)
teacher = MNIST1DTeacher()
optimizer = torch.optim.Adam(teacher.parameters(), lr=5e-3)
for _ in range(TEACHER_EPOCHS):
    for x, y in train_loader:
        loss = nn.functional.cross_entropy(teacher(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
teacher_acc = accuracy(teacher)
print(f"teacher test accuracy: {100 * teacher_acc:.1f} %")

# %% [markdown]
# ## A plain PyTorch loop
#
# `on_after_compute_loss(inputs, student_output, student_loss)` runs the teacher on `inputs` and returns
# `alpha * T^2 * KL(teacher || student) + (1 - alpha) * student_loss`: your task loss stays yours. The distiller
# freezes the teacher and puts it in eval mode in `on_train_begin`; `last_terms` holds the step's terms, detached.

# %%
torch.manual_seed(1)
student = MLPStudent(hidden=256)
distiller = Distiller(teacher, alpha=0.9, temperature=4.0)
optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
plain_curve: list[float] = []

distiller.on_train_begin(student)
for epoch in range(STUDENT_EPOCHS):
    distiller.on_epoch_begin(epoch)
    for x, y in train_loader:
        distiller.on_step_begin()
        output = student(x)
        loss = distiller.on_after_compute_loss(x, output, nn.functional.cross_entropy(output, y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        plain_curve.append(loss.item())
    distiller.on_epoch_end()
distiller.on_train_end()

print("last step's terms:", {k: round(float(v), 4) for k, v in distiller.last_terms.items()})
plain_acc = accuracy(student)
print(f"distilled MLP, plain loop: test accuracy {100 * plain_acc:.1f} %")
assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())  # frozen by the distiller
assert set(distiller.last_terms) >= {"loss", "kd_loss", "task_loss"}

# %% [markdown]
# ## Wrong call orders get a clear error
#
# A loss before `on_train_begin` (the teacher has not been prepared), and a feature-map projector that the
# optimizer never steps (it would stay at its random initialization while its loss is still added) are refused.

# %%
fresh = Distiller(teacher, alpha=0.9, temperature=4.0)
try:
    fresh.on_after_compute_loss(x, student(x), torch.tensor(0.0))
except RuntimeError as error:
    print("RuntimeError:", error)
else:
    raise AssertionError("a loss before on_train_begin must be refused")

feature_map = FeatureMap(student="net.act2", teacher="flatten")  # the MLP's last hidden layer -> the CNN's features
with_map = Distiller(teacher, alpha=0.9, temperature=4.0, feature_maps=[feature_map])
probe = MLPStudent(hidden=256)
with_map.on_train_begin(probe, example_inputs=x[:2])
forgot = torch.optim.SGD(probe.parameters(), lr=0.1)  # the projector's parameters are missing here
with_map.on_step_begin()
output = probe(x)
forgot.zero_grad()
with_map.loss(x, output, y).backward()
forgot.step()
try:
    with_map.on_after_optimizer_step()
except RuntimeError as error:
    print("RuntimeError:", error)
else:
    raise AssertionError("projectors that are never stepped must be reported")
with_map.on_train_end()

# %% [markdown]
# ## The same with Lightning Fabric, a feature map and a logger
#
# With Fabric the distiller places the teacher on `fabric.device` and runs it under Fabric's precision
# (`on_train_begin(..., fabric=fabric)`). A feature map adds a learnable projector, the distiller's only parameter:
# it goes into the optimizer, and `fabric.setup_module(distiller)` wraps it like the student (under DDP its
# gradients are synchronized). Fabric takes the same loggers as the Trainer; `fabric.log_dict` writes each step.

# %%
loggers = default_loggers(OUTPUT / "logs", "fabric")
fabric = Fabric(accelerator="cpu", devices=1, loggers=loggers)
fabric.seed_everything(1)
student = MLPStudent(hidden=256)
distiller = Distiller(
    teacher, alpha=0.9, temperature=4.0, feature_maps=[FeatureMap(student="net.act2", teacher="flatten", weight=0.1)]
)
distiller.on_train_begin(student, example_inputs=x[:2], fabric=fabric)
print("the distiller's parameters:", {name: tuple(p.shape) for name, p in distiller.named_parameters()})
optimizer = torch.optim.Adam([*student.parameters(), *distiller.parameters()], lr=1e-2)
student, optimizer = fabric.setup(student, optimizer)
distiller = fabric.setup_module(distiller)
loader = fabric.setup_dataloaders(train_loader)

step = 0
for epoch in range(STUDENT_EPOCHS):
    distiller.on_epoch_begin(epoch)
    for x, y in loader:
        distiller.on_step_begin()
        loss = distiller(x, student(x), y)  # call the wrapper: the projector's forward goes through it
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        distiller.on_after_optimizer_step()
        fabric.log_dict({f"train/{k}": float(v) for k, v in distiller.last_terms.items()}, step=step)
        step += 1
    distiller.on_epoch_end()
distiller.on_train_end()
for logger in loggers:
    logger.finalize("success")
print(where_logs_are(loggers))
fabric_acc = accuracy(student)
print(f"distilled MLP + feature map, Fabric loop: test accuracy {100 * fabric_acc:.1f} %")

feature_curve = read_metric(loggers[0].log_dir, "train/feature_loss/net.act2", by="step")
assert len(feature_curve) == step and distiller.last_terms.keys() >= {"loss", "kd_loss", "feature_loss/net.act2"}

# %% [markdown]
# ## Curves and results

# %%
fabric_curve = read_metric(loggers[0].log_dir, "train/loss", by="step")
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
left.plot(plain_curve, label="plain loop: loss", alpha=0.8)
left.plot([s for s, _ in fabric_curve], [v for _, v in fabric_curve], label="Fabric loop: loss (from the CSV log)")
left.set(xlabel="step", ylabel="loss", yscale="log", title="combined loss per step")
left.legend()
right.plot([s for s, _ in feature_curve], [v for _, v in feature_curve], color="C2")
right.set(xlabel="step", ylabel="MSE", yscale="log", title="feature loss net.act2 -> flatten (projected)")
fig.tight_layout()
fig.savefig(OUTPUT / "loop_losses.png", dpi=120)
plt.show()

print("| model | test accuracy |\n|---|---:|")
print(f"| teacher (CNN) | {100 * teacher_acc:.1f} % |")
print(f"| MLP, plain loop (logit KD) | {100 * plain_acc:.1f} % |")
print(f"| MLP, Fabric loop (logit KD + feature map) | {100 * fabric_acc:.1f} % |")
if not QUICK:
    assert plain_acc > 0.6 and fabric_acc > 0.6  # far above chance (10 %) on MNIST-1D

# %% [markdown]
# The loop API gives the same loss as the Trainer API for the same batch and weights (the test suite checks this
# term by term), so a recipe tuned with the `Trainer` carries over. `examples/plain_loop.py` and
# `examples/fabric_loop.py` are the same loops as scripts; the Fabric one also runs under 2-process DDP
# (`python examples/fabric_loop.py --devices 2`), where the teacher stays an unwrapped replica on every rank.
