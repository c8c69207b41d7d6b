# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # 10 · On-policy distillation (GKD): the student learns on what it generates
#
# Token-level KD (notebook 08) trains the student on the dataset's sequences: every context it learns from was written
# by the data, never by itself. When it then generates, its own tokens become its context, and it reaches states the
# data rarely or never showed it. **On-policy** distillation (Agarwal et al. 2024, GKD) closes that gap: the student
# samples continuations of the prompts, the teacher scores every token of them, and the KD term is computed on the
# student's own samples. In `lightning-distill` it is one argument, `DistillModule(on_policy=OnPolicy(...))`.
#
# This notebook uses a language whose rules are known exactly, so a generated token can be judged right or wrong
# without any teacher: it trains a teacher, distills a small student off-policy and on-policy with the same initial
# weights and the same number of optimizer steps, follows the rate of impossible tokens in the student's generations
# during training, and shows where the difference comes from.

# %%
import functools
import logging
import os
import statistics
import time
import warnings
from pathlib import Path

import lightning as L
import matplotlib.pyplot as plt
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_distill import DistillationCallback, DistillModule, OnPolicy, TeacherCache
from lightning_distill.demos import MarkovDataset, MarkovLanguage, TinyCausalLM, evaluate_generations, next_token_nll
from lightning_distill.demos.loggers import logged_trainer, read_metric, where_logs_are
from lightning_distill.generation import sample_completions

QUICK = os.environ.get("LIGHTNING_DISTILL_QUICK") == "1"  # the test suite's small-run switch
OUTPUT = Path("notebook_output") / "10_on_policy"
OUTPUT.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)  # tiny models: one thread is as fast as several and shares the machine well
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # hide the Trainer's start-up banner
warnings.filterwarnings("ignore", message=".*(LeafSpec|log_every_n_steps|val_dataloader|num_workers).*")

# %% [markdown]
# ## A language with an exact judge
#
# `MarkovLanguage(vocab_size=64, branching=4)` is a random first-order Markov chain over the tokens 1..63 (id 0 is
# padding): each token has exactly 4 possible successors, with random probabilities. Its transition table
# `language.transitions` is known, so every generated transition $x \to y$ can be checked: if
# `transitions[x, y] == 0`, the model has written something the language can never produce. 59 of the 63 real tokens
# (and the padding id) are impossible after any given token, so a model that knows nothing puts 60/64 = 94 % of its
# mass on them.
#
# `evaluate_generations(model, language, prompts, max_new_tokens=...)` samples continuations of fixed prompts with a
# fixed generator and returns:
#
# - `impossible_rate`: the share of sampled transitions that are impossible;
# - `impossible_mass`: the model's mean probability on the impossible next tokens, at the contexts its own sampling
#   reached (its full distribution, not only the token it drew);
# - `nll`: the next-token cross-entropy on fresh sequences of the chain (`next_token_nll`), beside `nll_chain`, the
#   chain's own on the same sequences (the floor).
#
# The judge is exact: the chain itself, written as a model (its log-transition table as logits), scores 0 and 0 and
# its own NLL, and a model with uniform logits scores exactly 60/64 impossible mass.

# %%
VOCAB, PROMPT, NEW = 64, 4, 28  # prompts of 4 tokens, 28 sampled after each: sequences of 32 tokens
language = MarkovLanguage(vocab_size=VOCAB, branching=4, seed=0)
row = language.transitions[5]
print(language)
print("token 5 can be followed by", {int(j): round(float(row[j]), 3) for j in row.nonzero().flatten()})


class ChainLM(nn.Module):
    """The true chain as a causal LM: the logits at t are log transitions[x_t, :] (-inf where impossible)."""

    def __init__(self, transitions: Tensor) -> None:
        super().__init__()
        self.register_buffer("log_table", transitions.float().log())

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.log_table[input_ids]


class UniformLM(nn.Module):
    """A model that knows nothing: the same logits for every token."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return torch.zeros(*input_ids.shape, VOCAB)


PROMPTS = language.sample(64, PROMPT, seed=10)  # fixed held-out prompts (the data below has other seeds)
NLL_SEED = 11  # the held-out sequences of the NLL


def judge(model: nn.Module) -> dict[str, float]:
    """``evaluate_generations`` on the fixed prompts with a fixed generator: only the model changes between calls."""
    generator = torch.Generator().manual_seed(0)
    return evaluate_generations(
        model, language, PROMPTS, max_new_tokens=NEW, generator=generator, nll_sequences=256, nll_seed=NLL_SEED
    )


for name, model in (("the chain itself", ChainLM(language.transitions)), ("uniform logits", UniformLM())):
    report = judge(model)
    print(
        f"{name:>16}: impossible rate {report['impossible_rate']:.3f}, impossible mass "
        f"{report['impossible_mass']:.4f}, NLL {report['nll']:.3f} (chain {report['nll_chain']:.3f})"
    )
chain_report = judge(ChainLM(language.transitions))
assert chain_report["impossible_rate"] == 0.0 and chain_report["impossible_mass"] == 0.0
assert abs(chain_report["nll"] - chain_report["nll_chain"]) < 1e-6
assert abs(judge(UniformLM())["impossible_mass"] - 60 / 64) < 1e-12

# %% [markdown]
# ## The teacher
#
# A `TinyCausalLM` of width 64 and 2 layers (112 k parameters), trained alone (`alpha=0.0`) on sequences of the chain.

# %%
TEACHER_SEQUENCES = 2048 if QUICK else 4096
TEACHER_EPOCHS = 3 if QUICK else 4
STEPS = 400 if QUICK else 800  # optimizer steps of every student
EVAL_EVERY = STEPS // 16
SEEDS = [0] if QUICK else [0, 1, 2]


def trainer(name: str, callbacks: list[L.Callback], epochs: int = 1000, **kwargs: object) -> L.Trainer:
    """A CPU Trainer that logs to OUTPUT/logs/<name>, stops after ``max_steps`` and has no validation loop."""
    return logged_trainer(OUTPUT / "logs", name, epochs, callbacks, limit_val_batches=0, **kwargs)


L.seed_everything(0, verbose=False)
teacher_module = DistillModule(
    student=TinyCausalLM(vocab_size=VOCAB, dim=64, layers=2, heads=4),
    alpha=0.0,
    shift_labels=True,
    optimizer=functools.partial(torch.optim.Adam, lr=3e-3),
)
teacher_data = MarkovDataset(language, num_sequences=TEACHER_SEQUENCES, max_length=32, seed=2)
start = time.perf_counter()
teacher_run = trainer("teacher", [], TEACHER_EPOCHS)
teacher_run.fit(teacher_module, DataLoader(teacher_data, batch_size=32, shuffle=True))
teacher = teacher_module.export_student()
teacher_report = judge(teacher)
print(f"teacher trained in {time.perf_counter() - start:.1f} s")
print(where_logs_are(teacher_run.loggers))
print(
    f"teacher: impossible rate {teacher_report['impossible_rate']:.3f}, impossible mass "
    f"{teacher_report['impossible_mass']:.3f}, NLL {teacher_report['nll']:.3f} "
    f"(chain {teacher_report['nll_chain']:.3f})"
)
assert teacher_report["impossible_rate"] < 0.05

# %% [markdown]
# ## Off-policy against on-policy
#
# The student is a `TinyCausalLM` of width 16 and one layer (6 k parameters) that gets only **32 training sequences**
# of random lengths between 8 and 32 tokens (`MarkovDataset`'s default), in batches of 8, and is asked to write
# 28 tokens after 4-token prompts. Two runs with the same initial weights, the same batches of the loader and the
# same number of optimizer steps:
#
# - **off-policy KD**: `alpha=1.0` (the KD term alone), forward KL on the dataset's sequences as they are;
# - **on-policy KD**: the same, plus `on_policy=OnPolicy(prompt_length=4, max_new_tokens=28)`: each batch keeps the
#   first 4 tokens of each of its sequences as the prompt, the student samples 28 tokens after it (temperature 1),
#   and the teacher scores the result. The loss is the KD term on the 28 sampled tokens only (no cross-entropy on
#   them: they are the student's guesses, not labels).
#
# A third run, **off-policy KD on 32 full-length sequences** (every sequence 32 tokens long), is a control that
# separates two reasons on-policy batches could help: they cover every position the student will generate at, and
# they are fresh samples in every step rather than the same 32 sequences again.
#
# A small callback judges the student (`judge` above: the fixed prompts, a fixed generator) every `EVAL_EVERY`
# steps.

# %%
student_data = MarkovDataset(language, num_sequences=32, max_length=32, seed=3)  # lengths 8..32
full_length_data = MarkovDataset(language, num_sequences=32, max_length=32, min_length=32, seed=3)
lengths = student_data.attention_mask.sum(-1)
print(f"training sequence lengths: mean {lengths.float().mean():.1f}, min {lengths.min()}, max {lengths.max()}")
print(f"tokens to learn from: {int(lengths.sum())} (variable lengths), {32 * 32} (full length)")


class Judge(L.Callback):
    """Judges the student at the start of the fit and every ``every`` optimizer steps."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.curve: list[tuple[int, dict[str, float]]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: DistillModule) -> None:
        self.curve.append((0, judge(pl_module.student)))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: DistillModule, *args: object) -> None:
        if trainer.global_step % self.every == 0:
            self.curve.append((trainer.global_step, judge(pl_module.student)))


def student() -> TinyCausalLM:
    """The student: width 16, one layer."""
    return TinyCausalLM(vocab_size=VOCAB, dim=16, layers=1, heads=2)


def distill(
    name: str, data: MarkovDataset, on_policy: OnPolicy | None, seed: int
) -> tuple[DistillModule, Judge, L.Trainer]:
    """Distill a fresh student (the same initial weights and batches for every run of a seed) for STEPS steps."""
    L.seed_everything(seed, verbose=False)
    module = DistillModule(
        student=student(),
        alpha=1.0,
        shift_labels=True,
        on_policy=on_policy,
        optimizer=functools.partial(torch.optim.Adam, lr=3e-3),
    )
    probe = Judge(EVAL_EVERY)
    callback = DistillationCallback(teacher)
    run = trainer(name, [callback, probe], max_steps=STEPS, log_every_n_steps=10)
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))
    run.fit(module, loader)
    assert run.global_step == STEPS
    return module, probe, run


RUNS = {  # name: (log folder, data, on_policy)
    "off-policy": ("off_policy", student_data, None),
    "on-policy": ("on_policy", student_data, OnPolicy(prompt_length=PROMPT, max_new_tokens=NEW)),
    "off-policy, full-length data": ("off_policy_full", full_length_data, None),
}
students: dict[str, list[nn.Module]] = {name: [] for name in RUNS}
curves: dict[str, list[tuple[int, dict[str, float]]]] = {}
runs: dict[str, L.Trainer] = {}
for seed in SEEDS:
    for name, (tag, data, on_policy) in RUNS.items():
        start = time.perf_counter()
        module, probe, run = distill(f"{tag}_seed{seed}", data, on_policy, seed)
        students[name].append(module.export_student())
        curves.setdefault(name, probe.curve)  # seed 0's, for the plot
        runs.setdefault(name, run)
        print(
            f"seed {seed}, {name:>29}: {time.perf_counter() - start:4.1f} s, final impossible rate "
            f"{probe.curve[-1][1]['impossible_rate']:.3f}"
        )
assert len({repr(curve[0][1]) for curve in curves.values()}) == 1  # the same initial student in every run
print(where_logs_are(runs["on-policy"].loggers))

# %% [markdown]
# What the on-policy run logged per step, read back from its CSV log: `train/on_policy/completion_length` (sampled
# tokens per row), `train/on_policy/completion_share` (sampled tokens / all real tokens: 28 of 32) and
# `train/on_policy/kd_loss` (the divergence on the sampled tokens).

# %%
log_dir = runs["on-policy"].log_dir
for key in ("train/on_policy/completion_length", "train/on_policy/completion_share", "train/on_policy/kd_loss"):
    points = read_metric(log_dir, key, by="step")
    print(f"{key:>34}: " + ", ".join(f"step {step}: {value:.3f}" for step, value in points[:: len(points) // 4]))
assert abs(read_metric(log_dir, "train/on_policy/completion_share", by="step")[-1][1] - NEW / (PROMPT + NEW)) < 1e-6

# %% [markdown]
# ## Impossible tokens during training
#
# Left: the impossible-transition rate of the student's generations (the fixed prompts, the fixed generator) against
# optimizer steps, seed 0. Right, for the final students: the impossible mass at each position of the generated
# sequence (512 prompts), beside the share of the 32 variable-length training sequences that reach that position:
# off-policy, the prediction of token t is trained only on the sequences longer than t.


# %%
def impossible_by_position(model: nn.Module, num_prompts: int = 512) -> Tensor:
    """Mean impossible mass at each generated position 4..31 (the model's own samples, a fixed generator)."""
    prompts = language.sample(num_prompts, PROMPT, seed=12)
    out = sample_completions(model, prompts, max_new_tokens=NEW, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        probs = model(out.input_ids, out.attention_mask).double().softmax(-1)[:, PROMPT - 1 : -1]
    impossible = language.transitions[out.input_ids[:, PROMPT - 1 : -1]] == 0  # after each context's last token
    return (probs * impossible).sum(-1).mean(0)


STYLE = {"off-policy": "C0", "on-policy": "C3", "off-policy, full-length data": "C2"}
fig, (curve_ax, position_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
for name, curve in curves.items():
    steps = [step for step, _ in curve]
    curve_ax.plot(steps, [report["impossible_rate"] for _, report in curve], color=STYLE[name], label=name)
curve_ax.axhline(teacher_report["impossible_rate"], color="grey", linestyle="--", label="teacher")
curve_ax.set_yscale("log")
curve_ax.set(xlabel="optimizer step", ylabel="impossible-transition rate", title="Student generations, seed 0")
curve_ax.legend(fontsize=8)

positions = torch.arange(PROMPT, PROMPT + NEW)
by_position = {name: impossible_by_position(models[0]) for name, models in students.items()}
for name, values in by_position.items():
    position_ax.plot(positions, values, color=STYLE[name], label=name)
position_ax.plot(positions, impossible_by_position(teacher), color="grey", linestyle="--", label="teacher")
position_ax.set(xlabel="position of the generated token", ylabel="impossible mass", title="Final students, seed 0")
position_ax.legend(fontsize=8, loc="upper left")
reach = position_ax.twinx()
reach.bar(positions, (lengths.unsqueeze(1) > positions).float().mean(0), color="grey", alpha=0.15)
reach.set(ylim=(0, 1.05), ylabel="share of variable-length training sequences this long")
position_ax.set_zorder(reach.get_zorder() + 1)  # the curves in front of the bars
position_ax.patch.set_visible(False)
fig.tight_layout()
fig.savefig(OUTPUT / "impossible_rate.png", dpi=120)
plt.show()

# %% [markdown]
# ## Results
#
# For each final student (mean ± std over seeds): the impossible rate and mass of its generations, and two NLLs on
# 256 fresh chain sequences of 32 tokens: over every position (`next_token_nll`) and over the positions that predict
# tokens 5..32, the ones on-policy training scores. On-policy training never scores a prediction *inside* the
# 4-token prompt, so it is not trained there.


# %%
def nll_by_part(model: nn.Module) -> tuple[float, float]:
    """Mean next-token NLL on fresh 32-token chain sequences: at the 3 predictions inside the prompt, and after it."""
    tokens = language.sample(256, PROMPT + NEW, seed=NLL_SEED)
    model.eval()
    with torch.no_grad():
        log_probs = model(tokens, torch.ones_like(tokens)).double().log_softmax(-1)[:, :-1]
    nll = -log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)  # (256, 31): position t predicts token t + 1
    assert abs(float(nll.mean()) - next_token_nll(model, language, length=32, seed=NLL_SEED)) < 1e-9
    return float(nll[:, : PROMPT - 1].mean()), float(nll[:, PROMPT - 1 :].mean())


def mean_std(values: list[float], digits: int = 3) -> str:
    """``mean ± std`` (only the mean for a single value)."""
    mean = f"{statistics.mean(values):.{digits}f}"
    return mean + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


rows = {"the chain itself": [ChainLM(language.transitions)], "teacher": [teacher], **students}
results: dict[str, dict[str, list[float]]] = {}
for name, models in rows.items():
    reports = [judge(model) for model in models]
    results[name] = {
        "rate": [report["impossible_rate"] for report in reports],
        "mass": [report["impossible_mass"] for report in reports],
        "nll": [report["nll"] for report in reports],
        "nll_completion": [nll_by_part(model)[1] for model in models],
    }
floor = chain_report["nll_chain"]
columns = ["impossible rate", "impossible mass", "NLL, all positions", "NLL, positions 5..32"]
print(f"| model ({len(SEEDS)} seed(s) for students) | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
for name, values in results.items():
    print(f"| {name} | " + " | ".join(mean_std(values[key]) for key in values) + " |")
print(f"\nthe floor of the NLL is the chain's own, {floor:.3f} nats per token")
inside = {name: mean_std([nll_by_part(model)[0] for model in models]) for name, models in students.items()}
print("NLL of the 3 predictions inside the prompt (never scored on-policy; uniform logits: log 64 = 4.159):")
print(", ".join(f"{name} {value}" for name, value in inside.items()))

off, on = results["off-policy"], results["on-policy"]
assert statistics.mean(on["rate"]) < statistics.mean(off["rate"])
assert statistics.mean(on["mass"]) < statistics.mean(off["mass"])
assert statistics.mean(on["nll_completion"]) < statistics.mean(off["nll_completion"])
if not QUICK:  # on every seed, on-policy leaves the language less often than off-policy
    assert max(on["rate"]) < min(off["rate"]) and max(on["mass"]) < min(off["mass"])

# %% [markdown]
# In the full run (3 seeds, 800 steps), on the same 32 sequences and the same steps, on-policy KD halves the
# impossible-transition rate of off-policy KD (0.023 ± 0.003 against 0.047 ± 0.004; the teacher's is 0.016) and
# lowers the NLL at the positions it trains (1.084 against 1.157 nats, the chain's own being 1.007). The plot on the
# right shows where off-policy falls behind: it leaves the language more often at every position, and most at the
# last ones, which fewer than one in five of its training sequences reach (an impossible mass of 0.12 at the last
# position against 0.03 on-policy). On-policy is flat: every step trains all 28 positions it generates at. The
# full-length control is about as good as on-policy here (0.026 ± 0.009, NLL 1.093): on this task the gain is
# coverage, the states the student reaches when it writes are the ones it is trained on, and on-policy gets that from
# prompts alone. The price is in the NLL over all positions (1.346 against 1.165): on-policy never scores the
# predictions inside the prompt, which stay near an untrained model's (about 3.8 nats against log 64 = 4.16), so mix
# in dataset batches (`fraction < 1`, below) when those positions matter.
#
# ## What the students write
#
# A few continuations of held-out prompts, sampled from the final students of seed 0 (the same generator for both):
# the prompt, `|`, then the sampled tokens; a token in brackets cannot follow the one before it in the chain.


# %%
def show(tokens: Tensor) -> tuple[str, int]:
    """The sequence as text, impossible transitions in brackets, and how many there are."""
    words, count = [str(int(tokens[0]))], 0
    for position in range(1, len(tokens)):
        word = str(int(tokens[position]))
        if language.transitions[tokens[position - 1], tokens[position]] == 0:
            word, count = f"[{word}]", count + 1
        words.append(("| " if position == PROMPT else "") + word)
    return " ".join(words), count


examples = language.sample(4, PROMPT, seed=13)
for name in ("off-policy", "on-policy"):
    out = sample_completions(
        students[name][0], examples, max_new_tokens=NEW, generator=torch.Generator().manual_seed(2)
    )
    print(f"{name}:")
    for tokens in out.input_ids:
        text, count = show(tokens)
        print(f"  {text}   ({count} impossible)")

# %% [markdown]
# ## Sampling with a KV cache
#
# On-policy steps spend most of their time sampling. `sample_completions` (in `lightning_distill.generation`, usable
# on its own) prefills a `TinyCausalLM`'s KV cache with the prompts once and then feeds one token per step; a Hugging
# Face model runs with its own key/value cache; any other causal LM is re-run on the whole sequence at every step.
# All randomness comes from the generator passed in, so the cached and uncached samplers draw the same tokens:

# %%
timings = {}
for use_cache in (True, False):
    start = time.perf_counter()
    sampled = sample_completions(
        teacher, PROMPTS, max_new_tokens=NEW, generator=torch.Generator().manual_seed(3), use_cache=use_cache
    )
    timings[use_cache] = (time.perf_counter() - start, sampled.input_ids)
(cached_s, cached), (full_s, full) = timings[True], timings[False]
print(f"64 prompts x {NEW} tokens from the teacher: KV cache {1000 * cached_s:.0f} ms, re-run {1000 * full_s:.0f} ms")
assert torch.equal(cached, full)

# %% [markdown]
# ## A teacher cache is refused
#
# A `TeacherCache` (notebook 07) stores the teacher's outputs per sample, but an on-policy batch is new in every
# step, so nothing could ever be read back: the combination is refused when the fit starts.

# %%
module = DistillModule(student=student(), shift_labels=True, on_policy=OnPolicy(prompt_length=PROMPT))
callback = DistillationCallback(teacher, cache=TeacherCache(OUTPUT / "cache"))
try:
    trainer("refused", [callback], max_steps=1).fit(module, DataLoader(student_data, batch_size=8))
except ValueError as error:
    refusal = error
    print(f"{type(error).__name__}: {error}")
else:
    raise AssertionError("a TeacherCache should have been refused on-policy")
assert "a TeacherCache can never hold" in str(refusal)

# %% [markdown]
# ## Notes
#
# - **`fraction`** is GKD's $\lambda$: each training batch is on-policy with this probability (a seeded draw per
#   batch), and the other batches are the dataset's sequences, used as usual (`alpha`-weighted KD and cross-entropy,
#   every position, prompts included). `fraction=1` (the default, used here) samples every batch.
# - **`seq_kd=True`** samples from the teacher instead of the student (sequence-level KD, GKD's `seq_kd`): the
#   student learns on the teacher's continuations. It is slower, as the teacher is re-run for every new token through
#   the callback's placement, with no KV cache.
# - **Divergences.** Any token-level divergence works on the sampled tokens: `divergence="js"` with `js_beta` is
#   GKD's generalized Jensen-Shannon divergence, `"reverse_kl"` is mode-seeking, as in MiniLLM; `"dkd"` is refused,
#   as its split needs a label.
# - **No cross-entropy on generated tokens.** They are the student's own guesses, so an on-policy batch trains the KD
#   term alone, whatever `alpha` is; `OnPolicy(task_loss=True)` adds the cross-entropy on them with weight
#   `1 - alpha`.
# - **DDP.** Each batch's sampling generator is seeded from `(seed, batch number, global rank)`, so every process
#   samples its own continuations of its own prompts, and a resumed fit samples what the uninterrupted one would have
#   (the seed is kept in the checkpoint).
# - **Teacher cache.** Refused, as above: the sequences change every step.
# - **KV cache.** Sampling uses it for `TinyCausalLM` and Hugging Face causal LMs; the teacher then scores each
#   sampled batch with one ordinary forward pass, as on any batch (its `TeacherRunner` precision, device and sharding
#   apply).
