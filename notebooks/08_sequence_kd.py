# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # 08 · Sequence models: token-level KD, divergences and several teachers
#
# The same `DistillModule` and `DistillationCallback` distill causal language models token by token: logits of shape
# `(B, L, V)`, dict batches with `input_ids`, `attention_mask` and `labels`, and `shift_labels=True` so that position
# t is scored against token t + 1. This notebook trains a small transformer teacher on a synthetic language whose best
# possible perplexity is known, distills it into a much smaller student with three divergences (forward KL, reverse
# KL, generalized Jensen-Shannon), checks that masks and chunking change nothing they should not, and distills from a
# weighted mixture of two teachers.

# %%
import functools
import logging
import math
import os
import statistics
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_distill import (
    CachedTeacher,
    DistillationCallback,
    DistillModule,
    IndexedDataset,
    TeacherMixture,
    TeacherOutputs,
    TokenCache,
    TokenCachePass,
)
from lightning_distill.demos import MarkovDataset, MarkovLanguage, TinyCausalLM
from lightning_distill.demos.loggers import logged_trainer, read_metric, where_logs_are

QUICK = os.environ.get("LIGHTNING_DISTILL_QUICK") == "1"  # the test suite's small-run switch
OUTPUT = Path("notebook_output") / "08_sequence_kd"
OUTPUT.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)  # tiny models: one thread is as fast as several and shares the machine well
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # hide the Trainer's start-up banner
warnings.filterwarnings("ignore", message=".*(LeafSpec|log_every_n_steps|num_workers).*")  # version and tiny-data noise

# %% [markdown]
# ## A language with a known floor
#
# `MarkovLanguage` is a random first-order Markov chain over 63 tokens (id 0 is padding), each with 4 possible
# successors. Because the chain is known, so is the best perplexity any model can reach: $\exp$ of its entropy rate.
# `MarkovDataset` samples right-padded sequences of random length (8 to 32 tokens) as dict items: `input_ids` (0 at
# padding), `attention_mask` (1 at real tokens) and `labels` (`-100` at padding, **not** shifted, the causal-LM
# convention). The teacher learns from 4096 sequences; the student gets only 256, so the teacher's soft next-token
# distributions carry information that the student's few hard tokens only sample.

# %%
VOCAB = 64
TEACHER_SEQUENCES = 1024 if QUICK else 4096
TEACHER_EPOCHS = 2 if QUICK else 8
STUDENT_SEQUENCES = 256
STUDENT_EPOCHS = 4 if QUICK else 30
HELD_OUT = 128 if QUICK else 512
SEEDS = [0] if QUICK else [0, 1, 2]
ALPHA, TEMPERATURE = 0.5, 1.0

language = MarkovLanguage(vocab_size=VOCAB, branching=4, seed=0)
teacher_data = MarkovDataset(language, num_sequences=TEACHER_SEQUENCES, max_length=32, seed=2)
student_data = MarkovDataset(language, num_sequences=STUDENT_SEQUENCES, max_length=32, seed=3)
held_out = MarkovDataset(language, num_sequences=HELD_OUT, max_length=32, seed=1)
floor = math.exp(language.entropy_rate())
print(language, f"| best achievable perplexity: {floor:.2f}")

item = held_out[0]
length = int(item["attention_mask"].sum())
for key, values in item.items():
    print(f"{key:>14}: {values[length - 4 : length + 3].tolist()}  (positions {length - 4}..{length + 2})")

# %% [markdown]
# Around the end of the first held-out sequence: the last real tokens, then padding (`input_ids` 0,
# `attention_mask` 0, `labels` -100).
#
# ## The recipe
#
# Every model is a `TinyCausalLM` (a pre-norm decoder-only transformer in plain torch), trained through
# `DistillModule` with `shift_labels=True`: the logits at position t are scored against the label at t + 1, and a
# position counts only when the token it predicts is real. `alpha=0.0` without a callback trains a model alone (the
# teachers and the baseline student). Validation runs every epoch on the held-out sequences, so `val/loss` (the
# next-token cross-entropy) gives the learning curves; the table below uses the exact held-out perplexity.


# %%
def trainer(name: str, epochs: int, callbacks: list[L.Callback], **kwargs: object) -> L.Trainer:
    """A CPU Trainer that logs to OUTPUT/logs/<name> (CSV, and TensorBoard when installed)."""
    return logged_trainer(OUTPUT / "logs", name, epochs, callbacks, **kwargs)


def fit_lm(
    name: str,
    make_model: Callable[[], nn.Module],
    data: MarkovDataset | IndexedDataset,
    epochs: int,
    callback: L.Callback | None = None,
    seed: int = 0,
    **module_kwargs: object,
) -> tuple[DistillModule, L.Trainer]:
    """Train ``make_model()`` on ``data``: alone, or distilled (alpha 0.5, T 1) through ``callback`` (a teacher's)."""
    L.seed_everything(seed, verbose=False)  # same initial weights and batches for every variant of a seed
    module = DistillModule(
        student=make_model(),
        alpha=0.0 if callback is None else ALPHA,
        temperature=TEMPERATURE,
        shift_labels=True,
        optimizer=functools.partial(torch.optim.Adam, lr=3e-3),
        **module_kwargs,
    )
    loader = DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    run = trainer(name, epochs, [] if callback is None else [callback])
    run.fit(module, loader, DataLoader(held_out, batch_size=128))
    return module, run


def perplexity(model: nn.Module, dataset: MarkovDataset = held_out) -> float:
    """Exact held-out perplexity: exp of the mean next-token cross-entropy over every real predicted token."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=dataset.input_ids, attention_mask=dataset.attention_mask)[:, :-1]
        labels = dataset.labels[:, 1:]  # -100 at padding: ignored by cross_entropy
        return math.exp(float(nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))))


def student() -> TinyCausalLM:
    """The student: width 16, one layer (about 6 k parameters)."""
    return TinyCausalLM(vocab_size=VOCAB, dim=16, layers=1, heads=2)


# %% [markdown]
# ## Two teachers
#
# The main teacher is 4 times wider and twice as deep as the student. A second, smaller teacher (width 32, one layer)
# is trained on the same data with another seed; it is used for the mixture at the end.

# %%
teacher_module, teacher_run = fit_lm(
    "teacher", lambda: TinyCausalLM(vocab_size=VOCAB, dim=64, layers=2, heads=4), teacher_data, TEACHER_EPOCHS
)
small_module, _ = fit_lm(
    "teacher_small",
    lambda: TinyCausalLM(vocab_size=VOCAB, dim=32, layers=1, heads=2),
    teacher_data,
    TEACHER_EPOCHS,
    seed=1,
)
teacher, small_teacher = teacher_module.export_student(), small_module.export_student()
print(where_logs_are(teacher_run.loggers))
for name, model in (("teacher", teacher), ("small teacher", small_teacher), ("student", student())):
    print(f"{name:>13}: {sum(p.numel() for p in model.parameters()):>7,} parameters")
print(f"held-out perplexity: teacher {perplexity(teacher):.2f}, small teacher {perplexity(small_teacher):.2f}")

# %% [markdown]
# ## Student alone and distilled, three divergences
#
# The KD term compares the teacher's and the student's next-token distributions at every counted position:
#
# - `"kl"`: forward $\mathrm{KL}(p_t \| p_s)$, mass-covering (Hinton et al.);
# - `"reverse_kl"`: $\mathrm{KL}(p_s \| p_t)$, mode-seeking (as in MiniLLM);
# - `"js"`: the generalized Jensen-Shannon divergence of GKD with `js_beta`
#   $\beta$: $\beta\,\mathrm{KL}(p_t \| m) + (1 - \beta)\,\mathrm{KL}(p_s \| m)$, $m = \beta p_t + (1 - \beta) p_s$;
#   $\beta = 0.5$ is the symmetric JSD.
#
# Each variant uses the same initial weights and batches per seed; only the loss differs.

# %%
VARIANTS: dict[str, tuple[str, dict[str, object]]] = {  # name: (log folder, DistillModule arguments)
    "student alone": ("alone", {}),
    "distilled, kl": ("kl", {"divergence": "kl"}),
    "distilled, reverse_kl": ("reverse_kl", {"divergence": "reverse_kl"}),
    "distilled, js (beta 0.5)": ("js", {"divergence": "js", "js_beta": 0.5}),
}
ppl: dict[str, list[float]] = {name: [] for name in VARIANTS}
runs: dict[str, L.Trainer] = {}
for seed in SEEDS:
    for name, (tag, kwargs) in VARIANTS.items():
        callback = None if name == "student alone" else DistillationCallback(teacher)
        module, run = fit_lm(f"{tag}_seed{seed}", student, student_data, STUDENT_EPOCHS, callback, seed, **kwargs)
        ppl[name].append(perplexity(module.export_student()))
        runs.setdefault(name, run)  # seed 0's run, for the learning curves
    print(f"seed {seed}: " + ", ".join(f"{name} {values[-1]:.2f}" for name, values in ppl.items()))
print(where_logs_are(runs["distilled, kl"].loggers))

# %% [markdown]
# ## A mixture of two teachers
#
# `DistillationCallback(TeacherMixture({...}, weights={...}))` runs every teacher (each frozen and placed like a single
# one) and hands the module the logits of their weighted mixture at the module's temperature,
# $z_\mathrm{mix} = T \log \sum_k w_k \,\mathrm{softmax}(z_k / T)$, so every divergence on probabilities targets
# exactly the mixture. Here the big teacher gets weight 0.7 and the small one 0.3.

# %%
WEIGHTS = {"big": 0.7, "small": 0.3}
mixture = TeacherMixture({"big": teacher, "small": small_teacher}, weights=WEIGHTS)  # what each callback below runs
batch = next(iter(DataLoader(held_out, batch_size=8)))
inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
with torch.no_grad():
    expected = 0.7 * teacher(**inputs).softmax(-1) + 0.3 * small_teacher(**inputs).softmax(-1)
    torch.testing.assert_close(mixture(**inputs).softmax(-1), expected)  # at T = 1: the mixture's distribution
print(f"held-out perplexity of the mixture itself: {perplexity(mixture):.2f}")

ppl["distilled, mixture 0.7/0.3"] = []
for seed in SEEDS:
    callback = DistillationCallback(TeacherMixture({"big": teacher, "small": small_teacher}, weights=WEIGHTS))
    module, run = fit_lm(f"mixture_seed{seed}", student, student_data, STUDENT_EPOCHS, callback, seed)
    ppl["distilled, mixture 0.7/0.3"].append(perplexity(module.export_student()))
    runs.setdefault("distilled, mixture 0.7/0.3", run)
print(where_logs_are(run.loggers))

# %% [markdown]
# ## Results
#
# Held-out perplexity (exp of the mean next-token cross-entropy over every real predicted token of the held-out
# sequences; mean ± std over seeds).


# %%
def mean_std(values: list[float]) -> str:
    """``mean ± std`` (only the mean for a single value)."""
    return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


table = {
    "the chain itself (floor)": [floor],
    "teacher (dim 64, 2 layers)": [perplexity(teacher)],
    "small teacher (dim 32, 1 layer)": [perplexity(small_teacher)],
    "mixture of the two (0.7/0.3)": [perplexity(mixture)],
    **ppl,
}
print(f"| model | held-out perplexity ({len(SEEDS)} seed(s) for students) |\n|---|---:|")
for name, values in table.items():
    print(f"| {name} | {mean_std(values)} |")
gap = statistics.mean(ppl["student alone"]) - floor
closed = (statistics.mean(ppl["student alone"]) - statistics.mean(ppl["distilled, kl"])) / gap
print(f"\nforward-KL distillation closes {closed:.0%} of the gap between the student alone and the floor")
chain = math.exp(-language.log_likelihood(held_out.input_ids))  # the true model, on these very tokens
print(f"the chain's own perplexity on the held-out sequences: {chain:.2f}")
assert min(min(values) for name, values in table.items() if name != "the chain itself (floor)") > chain
if not QUICK:  # every divergence and the mixture beat the student alone, on every seed
    assert all(max(values) < min(ppl["student alone"]) for name, values in ppl.items() if name != "student alone")

# %% [markdown]
# In the full run (3 seeds) every distilled student beats the student trained alone on every seed, whichever the
# divergence: 3.87 ± 0.10 alone; 3.21 ± 0.03 with forward KL, 3.28 ± 0.03 with reverse KL, 3.55 ± 0.05 with JSD(0.5)
# and 3.19 ± 0.03 from the mixture, against a floor of 2.75 (the README's benchmark, `python benchmarks/sequence.py`,
# gives the same 3.87 and 3.21). Forward KL closes about 60 % of the gap between the student alone and the floor. The
# ranking among the divergences is a property of this small task (a student that can match its teacher's full
# next-token distribution gains most from the mass-covering forward KL); compare them on your own data.

# %%
fig, (bar_ax, curve_ax) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1.3, 1]})
names = list(table)
means = [statistics.mean(v) for v in table.values()]
stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in table.values()]
colors = ["grey", "C0", "C0", "C0", "C1", "C2", "C3", "C4", "C5"]
bar_ax.barh(range(len(names)), means, xerr=stds, color=colors[: len(names)], alpha=0.7, capsize=3)
for i, (mean, std) in enumerate(zip(means, stds, strict=True)):
    bar_ax.annotate(f"{mean:.2f}", (mean + std, i), xytext=(4, -3), textcoords="offset points", fontsize=8)
bar_ax.set_yticks(range(len(names)), names, fontsize=8)
bar_ax.invert_yaxis()
bar_ax.set_xlim(0.9 * floor, max(m + s for m, s in zip(means, stds, strict=True)) * 1.08)
bar_ax.set(xlabel="held-out perplexity (lower is better)", title="Perplexity (students: mean ± std over seeds)")

for (name, run), color in zip(runs.items(), colors[4:], strict=False):
    curve = read_metric(run.log_dir, "val/loss")
    curve_ax.plot([e + 1 for e, _ in curve], [math.exp(v) for _, v in curve], color=color, label=name)
curve_ax.axhline(floor, color="grey", linestyle="--", label="floor (the chain)")
final = max(math.exp(read_metric(run.log_dir, "val/loss")[-1][1]) for run in runs.values())
curve_ax.set_ylim(0.95 * floor, 1.5 * final)  # the first epochs, far above, are cut off
curve_ax.set(xlabel="epoch", ylabel="exp(val/loss)", title="Student learning curves, seed 0")
curve_ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(OUTPUT / "perplexity.png", dpi=120)
plt.show()

# %% [markdown]
# ## Masks and the next-token shift
#
# `compute_loss` is what `training_step` calls. With `shift_labels=True` it drops the last position's logits and the
# first label, and keeps a position when the token it predicts is real (`attention_mask[t + 1]`). Padded positions are
# out of both terms: filling them with garbage changes nothing, and the task term equals the next-token cross-entropy
# written by hand.

# %%
net = student()
module = DistillModule(student=net, alpha=0.5, temperature=2.0, shift_labels=True)
mask = batch["attention_mask"].bool()
student_logits = net(**inputs)
with torch.no_grad():
    teacher_logits = teacher(**inputs)
terms = module.compute_loss(student_logits, TeacherOutputs(teacher_logits), batch["labels"], mask)

garbage_student, garbage_teacher = student_logits.detach().clone(), teacher_logits.clone()
garbage_student[~mask], garbage_teacher[~mask] = 1e4, -1e4
noisy = module.compute_loss(garbage_student, TeacherOutputs(garbage_teacher), batch["labels"], mask)
counted = mask[:, 1:]
by_hand = nn.functional.cross_entropy(student_logits[:, :-1][counted], batch["labels"][:, 1:][counted])
print({key: round(float(value.detach()), 5) for key, value in terms.items()})
print(f"{int(counted.sum())} of {counted.numel()} shifted positions count; hand-written next-token CE {by_hand:.5f}")
torch.testing.assert_close(noisy["loss"], terms["loss"].detach())
torch.testing.assert_close(terms["task_loss"], by_hand)

# %% [markdown]
# ## Chunking: the same loss with less memory
#
# With a large vocabulary the KD term's float32 probabilities are the biggest tensors of a step (4 sequences of 512
# positions over 32 000 tokens are 250 MB each). `kd_chunk_size=N` computes the divergence, and its gradient, over N
# positions at a time, so only one chunk's probabilities exist at once (the README's benchmark: 1750 MB -> 447 MB
# peak, and faster). # The value and the gradient are the unchunked ones, for every divergence:

# %%
print("| divergence | unchunked loss | kd_chunk_size=7 | max gradient difference |\n|---|---:|---:|---:|")
for divergence in ("kl", "reverse_kl", "js"):
    losses, grads = [], []
    for chunk in (None, 7):
        chunked = DistillModule(
            student=net, alpha=0.5, temperature=2.0, divergence=divergence, shift_labels=True, kd_chunk_size=chunk
        )
        logits = student_logits.detach().requires_grad_(True)
        loss = chunked.compute_loss(logits, TeacherOutputs(teacher_logits), batch["labels"], mask)["loss"]
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, logits)[0])
    difference = float((grads[0] - grads[1]).abs().max())
    print(f"| {divergence} | {losses[0]:.6f} | {losses[1]:.6f} | {difference:.1e} |")
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-8)

# %% [markdown]
# ## A vocabulary mismatch is refused
#
# KD compares distributions over the same tokens, so a teacher with another vocabulary (another tokenizer, or an
# embedding matrix padded to a multiple of 64) cannot be distilled from as it is. The loss refuses it on the first
# batch (here the validation sanity check that starts every fit), naming both sizes, instead of silently truncating
# the larger one.

# %%
other_vocabulary = TinyCausalLM(vocab_size=VOCAB + 16, dim=32, layers=1, heads=2)
try:
    fit_lm("vocab_mismatch", student, student_data, 1, DistillationCallback(other_vocabulary))
except ValueError as error:
    mismatch = error
    print(f"{type(error).__name__}: {error}")
else:
    raise AssertionError("a teacher with another vocabulary should have been refused")
assert "class counts differ (64 vs 80); nothing is truncated" in str(mismatch)

# %% [markdown]
# ## Pay for the teacher once: a token cache
#
# For a large language model the teacher's forward is the cost of distillation, and it is the same in every epoch.
# `TokenCachePass` runs the teacher once over the training set under `Trainer.predict` (on every device of a DDP run,
# each process writing its own shard) and stores, for every position the loss counts, the top-16 next-token
# log-probabilities on 8 bits, their token ids, and the remaining mass: 42 bytes a token here (one byte a token id for
# this 64-token vocabulary; 58 for GPT-2's 50 257). `CachedTeacher` then
# trains the student from the cache alone: the teacher is never built in that fit. The training set is wrapped in
# `IndexedDataset` so that every batch says which samples it holds; each row is checked against its checksum and
# against a digest of the inputs it was computed from. The fits below use the same seeds, initial weights and batches
# as the online `"kl"` runs above, so the only difference is where the teacher's distributions come from.

# %%
cached_data = IndexedDataset(student_data)
cache = TokenCache(OUTPUT / "token_cache", top_k=16, on_mismatch="rebuild")
pre_pass = TokenCachePass(teacher, cache, temperature=TEMPERATURE, shift_labels=True)
L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).predict(
    pre_pass, DataLoader(cached_data, batch_size=64), return_predictions=False
)
stored = sum(f.stat().st_size for f in (OUTPUT / "token_cache").glob("shard-*/*.bin"))
tokens = pre_pass.tokens_written
print(
    f"pre-pass: {pre_pass.rows_written} sequences, {tokens} tokens, {stored / tokens:.1f} bytes a token on disk, "
    f"{tokens / pre_pass.seconds:,.0f} tokens/s"
)
again = TokenCachePass(teacher, cache, temperature=TEMPERATURE, shift_labels=True)  # a resumed or repeated pass
L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).predict(
    again, DataLoader(cached_data, batch_size=64), return_predictions=False
)
assert again.rows_written == 0 and stored / tokens <= 64

ppl["distilled from the top-16 cache"] = []
for seed in SEEDS:
    callback = CachedTeacher(TokenCache(OUTPUT / "token_cache", top_k=16))
    module, run = fit_lm(f"token_cache_seed{seed}", student, cached_data, STUDENT_EPOCHS, callback, seed)
    ppl["distilled from the top-16 cache"].append(perplexity(module.export_student()))
online, cached = ppl["distilled, kl"], ppl["distilled from the top-16 cache"]
print(f"held-out perplexity, online kl: {mean_std(online)}; from the cache: {mean_std(cached)}")
if not QUICK:  # within noise of the online teacher: the seeds' spread, not the cache, decides
    assert abs(statistics.mean(cached) - statistics.mean(online)) < 2 * max(statistics.stdev(online), 0.01)

# %% [markdown]
# The same from the command line: `lightning-distill cache --config configs/markov_cache.yaml` runs the pre-pass
# (add `--trainer.devices 2 --trainer.strategy ddp` for two processes), `lightning-distill fit --config
# configs/markov_from_cache.yaml` trains from it; `configs/markov_teacher.yaml` trains the teacher they load.
#
# ## What to take away
#
# - Causal LMs need only `shift_labels=True`; dict batches with `attention_mask` and `-100` labels are masked in both
#   loss terms and in the metrics (`val/acc`, `val/agreement` and `val/kd_loss` are per token).
# - `divergence="kl"`, `"reverse_kl"` or `"js"` (with `js_beta`) picks the KD term; `kd_chunk_size` bounds its memory
#   without changing the loss.
# - `DistillationCallback(TeacherMixture({...}, weights={...}))` distills from a weighted mixture of teachers that
#   share a vocabulary.
# - A teacher you pay for once: `TokenCachePass` under `Trainer.predict` writes its top-k distributions (58 bytes a
#   token at k = 16), `CachedTeacher(TokenCache(path))` trains from them without loading it.
