"""`lightning-distill cache`: the token-cache pre-pass from a config, then a fit from the cache with no teacher."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_distill import DistillationCallback
from lightning_distill.cli import main
from lightning_distill.demos import MarkovDataModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TEACHER_CKPT = "runs/markov_teacher/checkpoints/teacher.ckpt"
STUDENT_CKPT = "runs/markov_student/checkpoints/student.ckpt"
RUN_TEACHER_FIRST = (
    f"lightning-distill: the teacher checkpoint {TEACHER_CKPT} does not exist: run "
    "`lightning-distill fit --config configs/markov_teacher.yaml` first, it writes it."
)
SMALL = ["--data.init_args.num_train=48", "--data.init_args.num_val=16"]  # the pass and the fit: the same set
ONE_EPOCH = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    shutil.copytree(CONFIGS, tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-distill"])  # main(argv) gets the arguments, not pytest's sys.argv
    return tmp_path


def test_cache_chain_teacher_then_cache_then_a_fit_from_the_cache_alone(workdir, capsys, monkeypatch):
    main(["fit", "--config", "configs/markov_teacher.yaml", *SMALL, *ONE_EPOCH])
    assert (workdir / TEACHER_CKPT).is_file()
    capsys.readouterr()

    main(["cache", "--config", "configs/markov_cache.yaml", *SMALL])
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("Wrote 48 samples, ") and out[-2].endswith(" tokens (0 batches were already stored).")
    assert out[-1].startswith("Cache: runs/markov_cache: 48 of 48 samples, ")
    assert " bytes per token (+25 per sample), " in out[-1]
    assert [p.name for p in (workdir / "runs/markov_cache").glob("shard-*")] == ["shard-00000"]

    # the fit never builds a teacher: no DistillationCallback is made, and its config names none
    config = yaml.safe_load((workdir / "configs/markov_from_cache.yaml").read_text())
    assert "teacher" not in str(config).replace("lightning_distill.CachedTeacher", "").lower()
    monkeypatch.setattr(DistillationCallback, "__init__", _no_teacher_allowed)
    main(["fit", "--config", "configs/markov_from_cache.yaml", *SMALL, *ONE_EPOCH])
    out = capsys.readouterr().out
    assert "Final validation metrics: val/acc " in out and "val/teacher_" not in out
    assert out.rstrip().endswith(f"Checkpoint: {STUDENT_CKPT}")
    checkpoint = torch.load(workdir / STUDENT_CKPT, weights_only=True)
    assert all(key.startswith("student.") for key in checkpoint["state_dict"])
    assert checkpoint["hyper_parameters"]["alpha"] == 0.5

    # run again: every sample is stored, nothing is written (a pass resumed after a crash writes only the rest)
    main(["cache", "--config", "configs/markov_cache.yaml", *SMALL])
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("Wrote 0 samples, 0 tokens (")
    assert out[-1].startswith("Cache: runs/markov_cache: 48 of 48 samples, ")


def _no_teacher_allowed(*args: object, **kwargs: object) -> None:
    raise AssertionError("a fit from the token cache built a teacher callback")


def test_cache_help_lists_the_pass_and_its_data(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["cache", "--help"])
    assert raised.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lightning-distill cache ")
    assert "--config" in out and "--model" in out and "--data" in out and "--trainer.devices" in out


def test_usage_names_the_cache_command(capsys):
    main(["--help"])
    assert "  cache --config CONFIG.yaml" in capsys.readouterr().out


def test_cache_before_the_teacher_names_the_config_to_run_first(workdir):
    with pytest.raises(SystemExit) as raised:
        main(["cache", "--config", "configs/markov_cache.yaml"])
    assert str(raised.value) == RUN_TEACHER_FIRST
    assert not (workdir / "runs").exists()  # stopped before anything was built


@pytest.mark.slow
def test_console_cache_before_the_teacher_prints_one_line_and_no_warning(workdir):
    result = subprocess.run(
        [sys.executable, "-m", "lightning_distill.cli", "cache", "--config", "configs/markov_cache.yaml"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [RUN_TEACHER_FIRST], result.stderr[-3000:]


def test_fit_from_a_cache_never_written_says_to_run_the_pre_pass(workdir):
    with pytest.raises(FileNotFoundError, match=r"holds no shard\. HINT: run the pre-pass \(`lightning-distill cache"):
        main(["fit", "--config", "configs/markov_from_cache.yaml", *SMALL, *ONE_EPOCH])


def test_the_three_markov_configs_agree():
    teacher, cache, student = (
        yaml.safe_load((CONFIGS / f"markov_{name}.yaml").read_text()) for name in ("teacher", "cache", "from_cache")
    )
    runner = cache["model"]["init_args"]["teacher"]["init_args"]
    assert runner["teacher"] == teacher["model"]["init_args"]["student"]  # the pass loads the network trained
    callbacks = {c["class_path"]: c["init_args"] for c in student["trainer"]["callbacks"]}
    assert callbacks["lightning_distill.CachedTeacher"]["cache"] == cache["model"]["init_args"]["cache"]
    shared = ("vocab_size", "branching", "num_train", "max_length")
    data = [config["data"]["init_args"] for config in (teacher, cache, student)]
    assert all({k: d.get(k) for k in shared} == {k: data[0].get(k) for k in shared} for d in data)
    assert cache["model"]["init_args"]["shift_labels"] is student["model"]["init_args"]["shift_labels"] is True


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_train": 0}, r"`num_train` must be an integer >= 1, got 0"),
        ({"max_length": 4, "min_length": 8}, r"`max_length` must be an integer >= 8, got 4"),
        ({"batch_size": True}, r"`batch_size` must be an integer, got True"),
        ({"shuffle": "yes"}, r"`shuffle` must be True or False, got 'yes'"),
        ({"branching": 64}, r"`branching` must be an integer in \[1, 63\], got 64"),
    ],
)
def test_markov_datamodule_names_a_bad_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MarkovDataModule(**kwargs)


def test_markov_datamodule_train_set_is_indexed_and_its_order_seeded():
    def orders(**kwargs: object) -> list[list[int]]:
        dm = MarkovDataModule(num_train=20, num_val=4, batch_size=5, **kwargs)
        with pytest.raises(RuntimeError, match="has not been set up"):
            dm.train_dataloader()
        dm.setup("fit")
        return [batch.index.tolist() for batch in dm.train_dataloader()]

    in_order = [list(range(i, i + 5)) for i in (0, 5, 10, 15)]
    shuffled = orders(shuffle_seed=3)
    assert sorted(i for batch in shuffled for i in batch) == list(range(20)) and shuffled != in_order
    assert orders(shuffle_seed=3) == shuffled and orders(shuffle_seed=4) != shuffled
    assert orders(shuffle=False) == in_order
