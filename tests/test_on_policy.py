"""On-policy distillation (GKD): the student is distilled on continuations it samples itself (issue 19)."""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_distill import DistillationCallback, DistillModule, OnPolicy, TeacherCache
from lightning_distill._on_policy import batch_seed, takes_this_batch
from lightning_distill.demos import MarkovDataset, MarkovLanguage, TinyCausalLM
from lightning_distill.generation import sample_completions
from tests.helpers.tiny import make_trainer

VOCAB, PROMPT, NEW = 16, 4, 6


def _loader(num: int = 16, batch_size: int = 8) -> DataLoader:
    language = MarkovLanguage(vocab_size=VOCAB, branching=2, seed=0)
    data = MarkovDataset(language, num_sequences=num, max_length=8, min_length=8, seed=1)
    return DataLoader(data, batch_size=batch_size)


def _lm(dim: int, seed: int) -> TinyCausalLM:
    torch.manual_seed(seed)
    return TinyCausalLM(vocab_size=VOCAB, dim=dim, layers=1, heads=2, max_length=16)


class Recorder(L.Callback):
    """Keeps every training batch the teacher and the loss saw, and each step's loss."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Tensor]] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        seen = pl_module.last_sampled_batch if pl_module.on_policy.fraction > 0 else batch  # 1 or 0 here
        self.batches.append({k: v.clone() for k, v in seen.items()})
        self.losses.append(float(outputs["loss"]))


def _fit(
    tmp_path: Any, on_policy: OnPolicy, teacher: nn.Module | None = None, lr: float = 1e-2, **module_args: Any
) -> tuple[DistillModule, Recorder]:
    student = _lm(8, seed=1)
    module = DistillModule(
        student=student,
        shift_labels=True,
        on_policy=on_policy,
        optimizer=functools.partial(torch.optim.SGD, lr=lr),
        **module_args,
    )
    recorder = Recorder()
    teacher = _lm(16, seed=2) if teacher is None else teacher
    callback = DistillationCallback(teacher, check_accuracy=False)
    make_trainer(tmp_path, callbacks=[callback, recorder]).fit(module, _loader())
    return module, recorder


def _reference_kd(student: nn.Module, teacher: nn.Module, batch: dict[str, Tensor], temperature: float) -> float:
    """KL(teacher ‖ student) at T, times T², averaged over the positions that predict a completion token."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    s = torch.log_softmax(student(ids, mask).double() / temperature, -1)[:, :-1]
    t = torch.log_softmax(teacher(ids, mask).double() / temperature, -1)[:, :-1]
    counted = batch["labels"][:, 1:] != -100
    per_position = (t.exp() * (t - s)).sum(-1)
    return float(temperature**2 * per_position[counted].mean())


def test_each_batch_is_the_students_completion_of_its_prompt_scored_on_the_completion_only(tmp_path):
    teacher = _lm(16, seed=2)
    config = OnPolicy(max_new_tokens=NEW, prompt_length=PROMPT, seed=7)
    module, recorder = _fit(tmp_path, config, teacher=teacher, lr=0.0, alpha=0.3, temperature=2.0)
    loader_batches = list(_loader())
    assert len(recorder.batches) == 2
    for step, (batch, original) in enumerate(zip(recorder.batches, loader_batches, strict=True)):
        ids, labels = batch["input_ids"], batch["labels"]
        assert ids.shape == (8, PROMPT + NEW)
        assert torch.equal(ids[:, :PROMPT], original["input_ids"][:, :PROMPT])  # the prompts, kept
        assert (labels[:, :PROMPT] == -100).all() and torch.equal(labels[:, PROMPT:], ids[:, PROMPT:])
        # the completion is what the student samples with the step's seed (lr 0: the student never changes)
        generator = torch.Generator().manual_seed(batch_seed(7, step, 0))
        expected = sample_completions(
            module.student,
            original["input_ids"][:, :PROMPT],
            original["attention_mask"][:, :PROMPT],
            max_new_tokens=NEW,
            generator=generator,
        )
        assert torch.equal(ids, expected.input_ids)
        # no cross-entropy on generated tokens, whatever alpha is: the loss is the KD term alone
        assert recorder.losses[step] == pytest.approx(_reference_kd(module.student, teacher, batch, 2.0), rel=1e-5)


def test_task_loss_on_generated_tokens_is_weighted_one_minus_alpha(tmp_path):
    teacher = _lm(16, seed=2)
    config = OnPolicy(max_new_tokens=NEW, prompt_length=PROMPT, seed=7, task_loss=True)
    module, recorder = _fit(tmp_path, config, teacher=teacher, lr=0.0, alpha=0.3)
    batch = recorder.batches[0]
    logits = module.student(batch["input_ids"], batch["attention_mask"]).double()[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1))
    expected = 0.3 * _reference_kd(module.student, teacher, batch, 1.0) + 0.7 * float(ce)
    assert recorder.losses[0] == pytest.approx(expected, rel=1e-5)


def test_fraction_chooses_per_batch_and_off_policy_batches_count_as_usual(tmp_path):
    _, recorder = _fit(tmp_path, OnPolicy(fraction=0.0, max_new_tokens=NEW, prompt_length=PROMPT))
    assert [b["input_ids"].shape[1] for b in recorder.batches] == [8, 8]  # the dataset's own sequences
    assert torch.equal(recorder.batches[0]["input_ids"], next(iter(_loader()))["input_ids"])
    config = OnPolicy(fraction=0.3, seed=0)
    share = sum(takes_this_batch(config, batch_seed(0, n, 0)) for n in range(4000)) / 4000
    assert abs(share - 0.3) < 4 * (0.3 * 0.7 / 4000) ** 0.5


def test_the_same_seed_samples_the_same_run_and_another_seed_another(tmp_path):
    config = OnPolicy(max_new_tokens=NEW, prompt_length=PROMPT, seed=3)
    a, ra = _fit(tmp_path, config)
    b, rb = _fit(tmp_path, config)
    _, rc = _fit(tmp_path, OnPolicy(max_new_tokens=NEW, prompt_length=PROMPT, seed=4))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(ra.batches, rb.batches, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(ra.batches, rc.batches, strict=True))


def test_crash_and_resume_equals_an_uninterrupted_run(tmp_path):
    def fit(epochs: int, ckpt: Any = None, seed: int | None = None) -> tuple[DistillModule, L.Trainer]:
        torch.manual_seed(0)
        module = DistillModule(
            student=_lm(8, seed=1), shift_labels=True, on_policy=OnPolicy(max_new_tokens=NEW, prompt_length=PROMPT)
        )
        trainer = make_trainer(tmp_path, max_epochs=epochs, callbacks=[DistillationCallback(_lm(16, 2))])
        trainer.fit(module, _loader(), ckpt_path=ckpt)
        return module, trainer

    whole, _ = fit(3)
    first, trainer = fit(1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    torch.manual_seed(12345)  # another process: the seed in use comes from the checkpoint, not from here
    resumed, _ = fit(3, tmp_path / "epoch1.ckpt")
    assert all(torch.equal(p, q) for p, q in zip(whole.parameters(), resumed.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(whole.parameters(), first.parameters(), strict=True))


def test_the_figures_of_sampling_are_logged(tmp_path):
    module, recorder = _fit(tmp_path, OnPolicy(max_new_tokens=NEW, prompt_length=PROMPT, eos_token_id=3))
    metrics = module.trainer.callback_metrics
    batch = recorder.batches[-1]
    completion = (batch["labels"] != -100).sum()
    assert float(metrics["train/on_policy/completion_length"]) == pytest.approx(float(completion) / 8)
    share = float(completion) / float(batch["attention_mask"].sum())
    assert float(metrics["train/on_policy/completion_share"]) == pytest.approx(share)
    assert float(metrics["train/on_policy/kd_loss"]) == pytest.approx(float(metrics["train/kd_loss"]))


def test_seq_kd_samples_from_the_teacher(tmp_path):
    teacher = _lm(16, seed=2)
    config = OnPolicy(max_new_tokens=NEW, prompt_length=PROMPT, seq_kd=True, temperature=0.0)
    _, recorder = _fit(tmp_path, config, teacher=teacher)
    prompts = next(iter(_loader()))
    greedy = sample_completions(
        teacher,
        prompts["input_ids"][:, :PROMPT],
        prompts["attention_mask"][:, :PROMPT],
        max_new_tokens=NEW,
        temperature=0.0,
    )
    assert torch.equal(recorder.batches[0]["input_ids"], greedy.input_ids)


def test_a_hugging_face_gpt2_student_and_teacher(tmp_path):
    transformers = pytest.importorskip("transformers")

    def gpt2(layers: int, width: int, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=width, n_layer=layers, n_head=2)
        return transformers.GPT2LMHeadModel(config)

    student, teacher = gpt2(1, 16, 0), gpt2(2, 32, 1)
    module = DistillModule(
        student=student,
        shift_labels=True,
        divergence="js",
        on_policy=OnPolicy(max_new_tokens=NEW, prompt_length=PROMPT),
    )
    recorder = Recorder()
    before = copy.deepcopy(student.state_dict())
    make_trainer(tmp_path, callbacks=[DistillationCallback(teacher, check_accuracy=False), recorder]).fit(
        module, _loader()
    )
    assert recorder.batches[0]["input_ids"].shape == (8, PROMPT + NEW)
    assert all(torch.isfinite(torch.tensor(recorder.losses)))
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_bad_combinations_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"`OnPolicy\(fraction=1.5\)`: the share of on-policy batches"):
        OnPolicy(fraction=1.5)
    with pytest.raises(ValueError, match=r"`OnPolicy\(max_new_tokens=0\)`: must be an int >= 1"):
        OnPolicy(max_new_tokens=0)
    with pytest.raises(ValueError, match=r"`OnPolicy\(top_p=0.0\)`: the nucleus mass must be in \(0, 1\]"):
        OnPolicy(top_p=0.0)
    with pytest.raises(ValueError, match=r"`OnPolicy\(temperature=-1\)`"):
        OnPolicy(temperature=-1)
    with pytest.raises(ValueError, match=r"HINT: pass `shift_labels=True` too"):
        DistillModule(student=_lm(8, 0), on_policy=OnPolicy())
    with pytest.raises(ValueError, match=r"divergence='dkd' splits .* HINT: use divergence='kl'"):
        DistillModule(student=_lm(8, 0), shift_labels=True, divergence="dkd", on_policy=OnPolicy())
    with pytest.raises(TypeError, match=r"`on_policy` must be an OnPolicy, its config dict or None, got float"):
        DistillModule(student=_lm(8, 0), shift_labels=True, on_policy=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`on_policy` has unknown keys \['lambda'\]"):
        DistillModule(student=_lm(8, 0), shift_labels=True, on_policy={"lambda": 1.0})
    as_dict = DistillModule(student=_lm(8, 0), shift_labels=True, on_policy={"fraction": 0.5, "max_new_tokens": 3})
    assert as_dict.on_policy == OnPolicy(fraction=0.5, max_new_tokens=3)
    module = DistillModule(student=_lm(8, 0), shift_labels=True, on_policy=OnPolicy(prompt_length=PROMPT))
    callback = DistillationCallback(_lm(16, 2), cache=TeacherCache(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"samples new sequences every step, so a TeacherCache can never"):
        make_trainer(tmp_path, callbacks=[callback]).fit(module, _loader())
    module = DistillModule(student=_lm(8, 0), shift_labels=True, on_policy=OnPolicy(prompt_length=9))
    with pytest.raises(ValueError, match=r"`OnPolicy\(prompt_length=9\)` takes the first 9 tokens .* rows \[0, 1"):
        make_trainer(tmp_path, callbacks=[DistillationCallback(_lm(16, 2))]).fit(module, _loader())


@pytest.mark.parametrize(
    ("runner_args", "module_args"),
    [({"precision": "bf16"}, {}), ({"device": "cpu"}, {"kd_chunk_size": 5}), ({}, {"divergence": "reverse_kl"})],
    ids=["bf16-teacher", "teacher-device-chunked", "reverse-kl"],
)
def test_teacher_placement_and_chunking_apply_to_sampled_batches(tmp_path, runner_args, module_args):
    from lightning_distill import TeacherRunner

    teacher = _lm(16, seed=2)
    module = DistillModule(
        student=_lm(8, seed=1),
        shift_labels=True,
        on_policy=OnPolicy(max_new_tokens=NEW, prompt_length=PROMPT, seed=1),
        optimizer=functools.partial(torch.optim.SGD, lr=0.0),
        **module_args,
    )
    recorder = Recorder()
    callback = DistillationCallback(TeacherRunner(teacher, **runner_args), check_accuracy=False)
    make_trainer(tmp_path, callbacks=[callback, recorder]).fit(module, _loader())
    batch = recorder.batches[0]
    assert batch["input_ids"].shape == (8, PROMPT + NEW)
    if module_args.get("divergence") is None:  # forward KL against the teacher as it ran (bf16 weights, if so)
        expected = _reference_kd(module.student, callback.teacher.float(), batch, 1.0)
        rel = 2e-2 if "precision" in runner_args else 1e-5
        assert recorder.losses[0] == pytest.approx(expected, rel=rel)
    assert all(torch.isfinite(torch.tensor(recorder.losses)))


def test_a_datamodule_with_its_own_batch_hook_keeps_it_and_the_batches_are_still_sampled(tmp_path):
    class Prompts(L.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def train_dataloader(self) -> DataLoader:
            return _loader()

        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            self.calls += 1  # Lightning runs the datamodule's hook, never the module's, when both exist
            return batch

    module = DistillModule(
        student=_lm(8, seed=1), shift_labels=True, on_policy=OnPolicy(max_new_tokens=NEW, prompt_length=PROMPT)
    )
    data, recorder = Prompts(), Recorder()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="You have overridden `on_after_batch_transfer`")
        callbacks = [DistillationCallback(_lm(16, 2), check_accuracy=False), recorder]
        make_trainer(tmp_path, callbacks=callbacks).fit(module, datamodule=data)
    assert data.calls == 2 and recorder.batches[0]["input_ids"].shape == (8, PROMPT + NEW)


def test_the_teacher_is_never_scored_against_the_students_samples(tmp_path):
    # the first batch's sampled tokens made a trained teacher look untrained ("accuracy 1.3 %, chance 1.6 %")
    def fit(fraction: float) -> list[str]:
        module = DistillModule(
            student=_lm(8, 1),
            shift_labels=True,
            on_policy=OnPolicy(fraction=fraction, prompt_length=PROMPT, max_new_tokens=NEW),
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer(tmp_path, callbacks=[DistillationCallback(_lm(16, 2))]).fit(module, _loader())
        return [str(w.message) for w in caught if "looks untrained" in str(w.message)]

    assert fit(1.0) == []  # no labels on any batch: nothing to score
    assert len(fit(0.0)) == 1  # the dataset's own batches are: an untrained teacher is still named


def test_the_prompt_is_the_first_real_tokens_whichever_side_pads():
    from lightning_distill._on_policy import prompts_of

    ids = torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    mask = (ids != 0).long()
    _, prompt_mask = prompts_of({"input_ids": ids, "attention_mask": mask}, 2)
    assert prompt_mask.tolist() == [[0, 0, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]]
    out = sample_completions(_lm(8, 0), ids, prompt_mask, max_new_tokens=3, generator=torch.Generator().manual_seed(0))
    assert out.input_ids[:, :2].tolist() == [[5, 6], [5, 6], [5, 6]] and out.prompt_lengths.tolist() == [2, 2, 2]


def test_off_policy_batches_without_labels_are_refused_at_once_unless_alpha_is_1(tmp_path):
    # it failed at a random later step, at the first batch the coin left off-policy
    items = [{k: v for k, v in item.items() if k != "labels"} for item in _loader().dataset]
    unlabelled = DataLoader(items, batch_size=8)
    for alpha, refused in ((0.5, True), (1.0, False)):
        module = DistillModule(
            student=_lm(8, 1), alpha=alpha, shift_labels=True, on_policy=OnPolicy(fraction=0.0, prompt_length=PROMPT)
        )
        trainer = make_trainer(tmp_path, callbacks=[DistillationCallback(_lm(16, 2), check_accuracy=False)])
        if refused:
            with pytest.raises(ValueError, match=r"OnPolicy\(fraction=0.0\)` trains .* has no labels\. HINT"):
                trainer.fit(module, unlabelled)
        else:
            trainer.fit(module, unlabelled)


def test_a_new_fit_takes_its_own_seed_and_a_resumed_one_the_checkpoints(tmp_path):
    module = DistillModule(
        student=_lm(8, 1), shift_labels=True, on_policy=OnPolicy(max_new_tokens=NEW, prompt_length=PROMPT)
    )
    seeds = []
    for seed in (11, 22):
        callback = DistillationCallback(_lm(16, 2), check_accuracy=False)
        L.seed_everything(seed)
        make_trainer(tmp_path, callbacks=[callback]).fit(module, _loader())
        seeds.append(module._sampling_seed)
    assert seeds == [11, 22]  # the second fit reused the first one's samples


@pytest.mark.parametrize("seq_kd", [False, True])
def test_sequences_longer_than_the_teacher_takes_are_refused_by_name(tmp_path, seq_kd):
    # the teacher's position embedding failed with a bare `IndexError: index out of range in self`
    torch.manual_seed(2)
    short_teacher = TinyCausalLM(vocab_size=VOCAB, dim=16, layers=1, heads=2, max_length=12)
    config = OnPolicy(max_new_tokens=10, prompt_length=PROMPT, seq_kd=seq_kd)
    module = DistillModule(student=_lm(8, 1), shift_labels=True, on_policy=config)
    match = r"sequences reach 14 tokens .*max_new_tokens=10.*teacher takes at most 12\. HINT: lower `max_new_tokens`"
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, callbacks=[DistillationCallback(short_teacher, check_accuracy=False)]).fit(
            module, _loader()
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 0}, r"`OnPolicy\(top_k=0\)`: must be an int >= 1 or None"),
        ({"prompt_length": 2.5}, r"`OnPolicy\(prompt_length=2.5\)`: must be an int >= 1 or None"),
        ({"pad_token_id": -1}, r"`OnPolicy\(pad_token_id=-1\)`: must be an int >= 0"),
        ({"eos_token_id": "2"}, r"`OnPolicy\(eos_token_id='2'\)`: must be a token id \(int\) or None"),
        ({"seq_kd": 1}, r"`OnPolicy\(seq_kd=1\)`: must be True or False"),
        ({"task_loss": "yes"}, r"`OnPolicy\(task_loss='yes'\)`: must be True or False"),
        ({"seed": 1.0}, r"`OnPolicy\(seed=1.0\)`: must be an int or None"),
        ({"max_new_tokens": True}, r"`OnPolicy\(max_new_tokens=True\)`: must be an int >= 1"),
    ],
)
def test_every_bad_on_policy_value_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OnPolicy(**kwargs)
