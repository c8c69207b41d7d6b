# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # 07 · Teacher cache: pay for the teacher once
#
# A frozen teacher gives the same logits for the same sample in every epoch, so running it on every batch wastes
# compute. `TeacherCache` stores its logits during the first epoch and reads them back afterwards. This notebook
# distills a wide 1-D CNN into an MLP on MNIST-1D with and without the cache, counts how often the teacher really
# runs, times every epoch, compares full-logit and top-k storage, and shows the two ways a cache can go stale
# (a random augmentation, a changed teacher) and how the library refuses them.

# %%
import copy
import functools
import json
import logging
import os
import statistics
import time
import warnings
from pathlib import Path

import lightning as L
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_distill import DistillationCallback, DistillModule, TeacherCache
from lightning_distill.demos import MLPStudent, MNIST1DDataModule, MNIST1DTeacher
from lightning_distill.demos.loggers import logged_trainer, where_logs_are
from lightning_distill.teacher import IndexedDataset

QUICK = os.environ.get("LIGHTNING_DISTILL_QUICK") == "1"  # the test suite's small-run switch
OUTPUT = Path("notebook_output") / "07_teacher_cache"
OUTPUT.mkdir(parents=True, exist_ok=True)
CACHES = OUTPUT / "caches"
torch.set_num_threads(1)  # tiny models: one thread is as fast as several and shares the machine well
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # hide the Trainer's start-up banner
warnings.filterwarnings("ignore", message=".*(LeafSpec|log_every_n_steps|val_dataloader|num_workers).*")

# %% [markdown]
# ## Data, teacher and settings
#
# The teacher is a *wide* CNN, `MNIST1DTeacher(channels=128)`: 100 k parameters against the 6.7 k of the default
# 32-channel one, so its forward pass costs more than the MLP student's whole training step. That is the situation a
# cache is for. The student is the MLP of the quickstart (40 → 256 → 256 → 10), distilled with $\alpha = 0.5$,
# $T = 4$.

# %%
NUM_TRAIN = 1000 if QUICK else None  # None: all 4000 training samples
BATCH_SIZE = 100
TEACHER_EPOCHS = 3 if QUICK else 10
STUDENT_EPOCHS = 3 if QUICK else 15
VIEW_EPOCHS = 3 if QUICK else 12
ALPHA, TEMPERATURE = 0.5, 4.0

dm = MNIST1DDataModule(data_seed=42, num_train=NUM_TRAIN, batch_size=BATCH_SIZE)
dm.setup("fit")
train_set, (x_test, y_test) = dm.train_set, dm.test_set.tensors
BATCHES = -(-len(train_set) // BATCH_SIZE)  # training batches per epoch
print(f"{len(train_set)} training samples ({BATCHES} batches of {BATCH_SIZE}), {len(y_test)} test samples")


def trainer(name: str, epochs: int, callbacks: list[L.Callback]) -> L.Trainer:
    """A CPU Trainer that logs to OUTPUT/logs/<name>; no validation loop, so epoch times are training only."""
    return logged_trainer(OUTPUT / "logs", name, epochs, callbacks, limit_val_batches=0, log_every_n_steps=1)


def accuracy(model: nn.Module) -> float:
    """Top-1 accuracy on the MNIST-1D test split."""
    model.eval()
    with torch.no_grad():
        return float((model(x_test).argmax(-1) == y_test).float().mean())


L.seed_everything(0, verbose=False)
teacher_module = DistillModule(
    student=MNIST1DTeacher(channels=128), alpha=0.0, optimizer=functools.partial(torch.optim.Adam, lr=3e-3)
)
teacher_trainer = trainer("teacher", TEACHER_EPOCHS, [])
teacher_trainer.fit(teacher_module, DataLoader(train_set, batch_size=BATCH_SIZE, shuffle=True))
teacher = teacher_module.export_student()
print(
    f"teacher: {sum(p.numel() for p in teacher.parameters()):,} parameters, "
    f"test accuracy {100 * accuracy(teacher):.1f} %"
)
print(where_logs_are(teacher_trainer.loggers))

# %% [markdown]
# ## Sample identity: `IndexedDataset`
#
# A cache is keyed by *which sample* a batch holds, not by its position in the epoch (the loader shuffles).
# `IndexedDataset(dataset)` makes every item `Indexed(index, view, sample)`; the default collate function batches it
# field by field. `DistillModule.split_batch` hands the student only `sample`, so the model code does not change.

# %%
indexed = IndexedDataset(train_set)
batch = next(iter(DataLoader(indexed, batch_size=4, shuffle=True)))
print(type(batch).__name__, "| index:", batch.index.tolist(), "| view:", batch.view.tolist())
print("sample:", [tuple(t.shape) for t in batch.sample])

# %% [markdown]
# ## Cached against uncached
#
# Five runs of the same student, with the same initial weights and the same batches:
#
# - **student alone**: no teacher at all ($\alpha = 0$), the floor for the step time;
# - **uncached KD**: the teacher runs on every batch;
# - **cached, full logits**: `TeacherCache(path)` stores the 10 logits per sample as float16;
# - **cached, top-3**: `TeacherCache(path, top_k=3)` stores the 3 largest log-probabilities at T, their classes and
#   the remaining tail mass; the KD term treats the tail as one bucket (`divergence="kl"` only);
# - **full logits, second run**: a new fit on the already filled directory, as a rerun or a sweep would do.
#
# A small callback measures every epoch's wall time and counts the teacher's forward passes with a forward hook.
# `cache.teacher_runs` counts the batches whose logits had to be computed and stored; `cache.filled_fraction()` is the
# share of samples stored.


# %%
class EpochProbe(L.Callback):
    """Per training epoch: wall time per step, teacher forwards, and the cache's counters."""

    def __init__(self, teacher: nn.Module | None = None, cache: TeacherCache | None = None) -> None:
        self.cache = cache
        self.ms_per_step: list[float] = []
        self.teacher_forwards: list[int] = []
        self.teacher_runs: list[int] = []  # cumulative, as the cache counts them
        self.filled: list[float] = []
        self.losses: list[float] = []  # every training step's loss
        self._forwards = 0
        self._hook = None if teacher is None else teacher.register_forward_hook(self._count)

    def _count(self, *args: object) -> None:
        self._forwards += 1

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._forwards, self._start = 0, time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: dict, batch: object, batch_idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ms_per_step.append(1e3 * (time.perf_counter() - self._start) / trainer.num_training_batches)
        self.teacher_forwards.append(self._forwards)
        if self.cache is not None:
            self.teacher_runs.append(self.cache.teacher_runs)
            self.filled.append(self.cache.filled_fraction())

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()


def distill(
    name: str,
    cache: TeacherCache | None = None,
    *,
    from_teacher: nn.Module | None = teacher,
    dataset: Dataset = indexed,
    epochs: int = STUDENT_EPOCHS,
    seed: int = 0,
) -> tuple[DistillModule, EpochProbe, L.Trainer]:
    """Fit the MLP student, alone (``from_teacher=None``) or distilled through ``cache``, and probe every epoch."""
    L.seed_everything(seed, verbose=False)  # same initial weights in every run
    module = DistillModule(
        student=MLPStudent(hidden=256),
        alpha=0.0 if from_teacher is None else ALPHA,
        temperature=TEMPERATURE,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
    )
    probe = EpochProbe(from_teacher, cache)
    callbacks = [] if from_teacher is None else [DistillationCallback(from_teacher, cache=cache)]
    loader = DataLoader(dataset, BATCH_SIZE, shuffle=True, generator=torch.Generator().manual_seed(seed))
    run = trainer(name, epochs, [*callbacks, probe])  # the probe last: its epoch time includes the cache's flush
    run.fit(module, loader)
    return module, probe, run


full_cache, topk_cache = TeacherCache(CACHES / "full"), TeacherCache(CACHES / "top3", top_k=3)
results = {
    "student alone": distill("alone", from_teacher=None),
    "uncached KD": distill("uncached"),
    "cached, full logits": distill("cached_full", full_cache),
    "cached, top-3": distill("cached_top3", topk_cache),
}
rerun_cache = TeacherCache(CACHES / "full")  # a new object on the same, already filled, directory
results["full logits, second run"] = distill("cached_full_rerun", rerun_cache)
print(where_logs_are(results["cached, full logits"][2].loggers))

# %% [markdown]
# ### How often did the teacher run?

# %%
print("| run | teacher forwards per epoch | cache.teacher_runs (cumulative) | filled fraction |")
print("|---|---|---|---|")
for name, (_, probe, _) in results.items():
    print(f"| {name} | {probe.teacher_forwards} | {probe.teacher_runs or '—'} | {probe.filled or '—'} |")

uncached, cached = results["uncached KD"][1], results["cached, full logits"][1]
later = STUDENT_EPOCHS - 1
assert uncached.teacher_forwards == [BATCHES] * STUDENT_EPOCHS  # every batch, every epoch
assert cached.teacher_runs == [BATCHES] * STUDENT_EPOCHS  # all stored in epoch 1, nothing computed after
assert cached.teacher_forwards == [BATCHES] + [1] * later  # epoch >= 2: one verification forward per epoch
assert cached.filled == [1.0] * STUDENT_EPOCHS
assert results["cached, top-3"][1].teacher_runs == [BATCHES] * STUDENT_EPOCHS
rerun = results["full logits, second run"][1]
assert rerun.teacher_runs == [0] * STUDENT_EPOCHS and rerun.teacher_forwards == [1] * STUDENT_EPOCHS

# %% [markdown]
# In epoch 1 the cached runs compute and store every batch; from epoch 2 on they read the stored rows, and the second
# run never computes a single batch. The one teacher forward per later epoch is the cache's **verification**
# (`TeacherCache(verify=True)`, the default): the first fully cached batch of every epoch is also run through the
# teacher and compared with what is stored. Changed inputs are caught without it, on every read: each row is stored
# with a digest of its sample's inputs and read back only for the same inputs (see the augmentation section below);
# the verification forward catches what the digests and the teacher's fingerprint cannot, a teacher whose forward
# changed without its weights. `verify=False` drops that forward.
#
# The cached logits are rounded to float16, and the training objective is that rounding in every epoch, epoch 1
# included. So a cached fit starts out on the uncached one's loss curve; over many steps the two drift apart, as any
# two runs whose targets differ in the fourth digit do, while the final accuracies stay alike (table below). A rerun
# on the filled directory reads the very same rows and repeats the first cached run exactly.

# %%
losses = {name: np.array(probe.losses) for name, (_, probe, _) in results.items()}
relative = np.abs(losses["cached, full logits"] / losses["uncached KD"] - 1)
print(f"per-step loss, cached vs uncached: max relative difference {relative[:BATCHES].max():.1e} in epoch 1,")
print(f"  {relative.max():.1e} over all {len(relative)} steps")
assert relative[:BATCHES].max() < 1e-2
assert np.array_equal(losses["full logits, second run"], losses["cached, full logits"])  # the same stored rows

# %% [markdown]
# ### Step time and storage
#
# Step time is the epoch's wall time divided by its batches; epoch 1 pays for filling the cache, so the summary is the
# median over epochs ≥ 2. Bytes per sample count every file of the cache: full logits are 10 float16 values, the
# 8-byte digest of the sample's inputs, a CRC-32 and a filled flag (33 bytes); top-3 stores 3 float16
# log-probabilities, 3 int16 classes, the float32 tail mass, the digest, the CRC and the flag (29 bytes). With 10
# classes top-k saves little; it pays off for large vocabularies.

# %%
alone_ms = statistics.median(results["student alone"][1].ms_per_step[1:])
print("| run | median ms per step (epochs ≥ 2) | vs student alone | test accuracy | bytes per sample |")
print("|---|---:|---:|---:|---:|")
step_ms, accuracies = {}, {}
for name, (module, probe, _) in results.items():
    step_ms[name] = statistics.median(probe.ms_per_step[1:])
    accuracies[name] = accuracy(module.export_student())
    stored = probe.cache.bytes_per_sample() if probe.cache is not None else "—"
    print(
        f"| {name} | {step_ms[name]:.2f} | {step_ms[name] / alone_ms:.2f}x | {100 * accuracies[name]:.1f} % | "
        f"{stored} |"
    )
assert full_cache.bytes_per_sample() == 10 * 2 + 8 + 4 + 1
assert topk_cache.bytes_per_sample() == 3 * 2 + 3 * 2 + 4 + 8 + 4 + 1
print("\nfiles of the full-logits cache:")
for file in sorted((CACHES / "full").iterdir()):
    print(f"  {file.name:<12} {file.stat().st_size:>8,} bytes")
if not QUICK:  # timings of a few 10-batch epochs are too noisy to assert on, accuracies of 3 epochs too
    assert step_ms["cached, full logits"] < step_ms["uncached KD"]
    assert accuracies["cached, full logits"] > accuracies["student alone"] + 0.03

# %%
fig, (time_ax, runs_ax) = plt.subplots(1, 2, figsize=(11, 4))
epochs = range(1, STUDENT_EPOCHS + 1)
for name, (_, probe, _) in results.items():
    time_ax.plot(epochs, probe.ms_per_step, marker="o", label=name)
time_ax.set(xlabel="epoch", ylabel="ms per step (epoch time / batches)", title="Step time per epoch")
time_ax.set_ylim(bottom=0)
time_ax.legend(fontsize=8)
shown = ["uncached KD", "cached, full logits", "full logits, second run"]
width = 0.8 / len(shown)
for i, name in enumerate(shown):
    forwards = results[name][1].teacher_forwards
    runs_ax.bar([e + (i - 1) * width for e in epochs], forwards, width, label=name)
runs_ax.set(xlabel="epoch", ylabel="teacher forward passes", title=f"Teacher forwards per epoch ({BATCHES} batches)")
runs_ax.set_xticks(list(epochs))
runs_ax.set_ylim(0, 1.4 * BATCHES)  # room for the legend above the bars
runs_ax.legend(fontsize=8, loc="upper right")
fig.tight_layout()
fig.savefig(OUTPUT / "step_time.png", dpi=120)
plt.show()

# %% [markdown]
# The cached epochs cost well under the uncached ones (the teacher's forward is gone), but still more than the
# student alone: what is left is the KD term itself (two temperature softmaxes and a KL on top of the cross-entropy)
# and the logging of its terms. On the 2-core machine this notebook was written on, the full run measured about
# 7.3 ms per step uncached, 4.8 ms cached and 3.7 ms alone, and the cached student reached the uncached one's
# accuracy (73.4 % vs 72.9 %, against 63.8 % alone); the benchmark (`python benchmarks/cache.py`, README section
# "Teacher cache") gives the same picture over 3 seeds.
#
# ## Augmentation: seeded views
#
# A random augmentation makes every epoch's input different, so a cached output would be stale. The cache supports
# augmentation through a fixed number of **views**: `IndexedDataset(dataset, augment=fn, views=K)` picks one of K views
# per access and calls `fn(sample, generator)` with a generator seeded by `(seed, index, view)`. View v of sample i is
# then the same signal in every epoch, and the cache holds one row per (sample, view).


# %%
def jitter(sample: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random circular shift by up to 3 positions plus a little noise, all drawn from ``generator``."""
    x, y = sample
    shift = int(torch.randint(-3, 4, (), generator=generator))
    return torch.roll(x, shift) + 0.05 * torch.randn(x.shape, generator=generator), y


views_cache = TeacherCache(CACHES / "views")
_, views, _ = distill(
    "views", views_cache, dataset=IndexedDataset(train_set, augment=jitter, views=2), epochs=VIEW_EPOCHS
)
meta = json.loads((CACHES / "views" / "meta.json").read_text())
print("meta.json:", meta)
print("epoch | teacher forwards | batches computed | rows filled")
computed = np.diff(views.teacher_runs, prepend=0)  # teacher_runs is cumulative
for epoch in range(VIEW_EPOCHS):
    print(f"{epoch + 1:>5} | {views.teacher_forwards[epoch]:>16} | {computed[epoch]:>16} | {views.filled[epoch]:.1%}")
assert meta["views"] == 2 and meta["num_samples"] == len(train_set)
assert views.filled[0] == 0.5  # epoch 1 sees exactly one view of every sample
assert np.all(np.diff(views.filled) >= 0) and views.filled[-1] <= 1.0

# %% [markdown]
# Each epoch draws one of the 2 views per sample, so after epoch e about $1 - 2^{-e}$ of the rows are stored. A batch
# skips the teacher only when *every* one of its 100 (sample, view) rows is stored, so with K views the teacher keeps
# running for several epochs: in the full run the first batch is skipped in epoch 6, and by epoch 11-12 only 2-3
# of the 40 batches still need the teacher. Fewer views, smaller batches or longer training make the cache pay off
# sooner.
#
# ### An augmentation that ignores the generator is caught
#
# If the augmentation draws from the global random generator instead of the one it is given, view 0 of sample i is a
# different signal every epoch and the stored logits are stale. The first cached batch of epoch 2 reads rows whose
# inputs digests differ from the batch's and stops the fit, naming the samples, instead of silently training on
# outputs for other inputs.


# %%
def unseeded_jitter(
    sample: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same jitter, but drawn from torch's global generator: a new signal in every epoch (the bug)."""
    x, y = sample
    return torch.roll(x, int(torch.randint(-3, 4, ()))) + 0.05 * torch.randn(x.shape), y


try:
    distill("unseeded", TeacherCache(CACHES / "unseeded"), dataset=IndexedDataset(train_set, augment=unseeded_jitter))
except RuntimeError as error:
    stale_error = error
    print(f"{type(error).__name__}: {error}")
else:
    raise AssertionError("an unseeded augmentation should have been caught")
assert "the inputs changed since they were cached" in str(stale_error) and "at epoch 1" in str(stale_error)

# %% [markdown]
# ## A cache belongs to one teacher
#
# `meta.json` records the teacher's fingerprint (a hash of every byte of its weights and buffers), the
# dataset length, the views, the classes and the top-k settings. Pointing a run with a *different* teacher at the
# directory is refused, naming each difference. Here the "different teacher" is our teacher with every weight moved by
# 10⁻³, as a little more fine-tuning would do: its logits would differ from the stored ones, and the cache knows.

# %%
tuned = copy.deepcopy(teacher)
with torch.no_grad():
    for parameter in tuned.parameters():
        parameter.add_(1e-3 * torch.randn_like(parameter))

try:
    distill("other_teacher", TeacherCache(CACHES / "full"), from_teacher=tuned, epochs=1)
except ValueError as error:
    mismatch_error = error
    print(f"{type(error).__name__}: {error}")
else:
    raise AssertionError("a cache of another teacher should have been refused")
assert "was made for other settings: teacher:" in str(mismatch_error)

rebuilt = TeacherCache(CACHES / "full", on_mismatch="rebuild")
_, rebuilt_probe, _ = distill("other_teacher_rebuilt", rebuilt, from_teacher=tuned, epochs=1)
print(
    f"on_mismatch='rebuild': {rebuilt_probe.teacher_runs[-1]} batches computed, filled {rebuilt.filled_fraction():.0%}"
)
assert rebuilt_probe.teacher_runs == [BATCHES] and rebuilt.filled_fraction() == 1.0

# %% [markdown]
# ## What to take away
#
# - Wrap the training set in `IndexedDataset` and pass `cache=TeacherCache(path)` to the callback: the teacher runs in
#   epoch 1 (plus one verification forward per later epoch) and never again, in this fit or in later ones.
# - Full logits (`top_k=None`) work with every divergence and temperature; `top_k=k` stores less per sample for large
#   vocabularies, for `divergence="kl"` at a constant temperature.
# - Augment through `IndexedDataset(augment=fn, views=K)` with a generator-driven `fn`; anything else is caught.
# - A cache is tied to its teacher and data; a mismatch is refused unless you ask for `on_mismatch="rebuild"`.
# - Not cached: feature maps (they need the teacher's forward) and token-level `(B, L, V)` logits.
