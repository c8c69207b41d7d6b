"""The console script: LightningCLI with the shipped configs, and the demo."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from lightning_distill.cli import main
from lightning_distill.loggers import tensorboard_available

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICK = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    shutil.copytree(CONFIGS, tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_cli_trains_a_teacher_then_distills_from_its_checkpoint(workdir, capsys):
    main(["fit", "--config", "configs/mnist1d_teacher.yaml", *QUICK])
    assert (workdir / "runs/teacher/teacher.ckpt").is_file()
    main(["fit", "--config", "configs/mnist1d_distill.yaml", *QUICK])
    checkpoint = torch.load(workdir / "runs/student/student.ckpt", weights_only=True)
    assert all(key.startswith("student.") for key in checkpoint["state_dict"])
    assert checkpoint["hyper_parameters"]["alpha"] == 0.9
    main(["test", "--config", "configs/mnist1d_distill.yaml", "--ckpt_path", "runs/student/student.ckpt"])
    assert "test/acc" in capsys.readouterr().out
    main(["validate", "--config", "configs/mnist1d_distill.yaml", "--ckpt_path", "runs/student/student.ckpt"])
    out = capsys.readouterr().out
    assert "val/acc" in out and "val/teacher_acc" in out
    main(["predict", "--config", "configs/mnist1d_distill.yaml", "--ckpt_path", "runs/student/student.ckpt"])


def test_cli_feature_maps_from_yaml_build_and_train_projectors(workdir, capsys):
    main(["fit", "--config", "configs/mnist1d_teacher.yaml", *QUICK])
    main(["fit", "--config", "configs/mnist1d_features.yaml", *QUICK])
    checkpoint = torch.load(workdir / "runs/features/student.ckpt", weights_only=True)
    projectors = {k for k in checkpoint["state_dict"] if k.startswith("projectors.")}
    assert projectors == {f"projectors.features_act{i}.linear.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}
    assert checkpoint["hyper_parameters"]["feature_maps"][2]["weight"]["type"] == "linear_warmup"
    main(["test", "--config", "configs/mnist1d_features.yaml", "--ckpt_path", "runs/features/student.ckpt"])
    assert "test/acc" in capsys.readouterr().out


def test_usage_is_printed_without_arguments(capsys):
    main([])
    assert "demo" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_quick_writes_table_csv_and_plot(tmp_path, capsys):
    main(["demo", "--quick", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| teacher | 1 |" in out and "| distilled | 2 |" in out
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["teacher", "student_alone", "distilled", "student_alone", "distilled"]
    assert all(0.0 <= float(r["test_acc"]) <= 1.0 for r in rows)
    assert (tmp_path / "results.png").stat().st_size > 10_000
    assert (tmp_path / "teacher.ckpt").is_file()
    tensorboard = tensorboard_available()  # CSV always, TensorBoard when installed (the [test] extra installs it)
    for run in ("teacher_seed0", "student_alone_seed1", "distilled_seed1"):
        assert (tmp_path / "logs" / run / "metrics.csv").is_file()
        assert bool(list((tmp_path / "logs" / "tensorboard" / run).glob("events.out.tfevents.*"))) == tensorboard
    assert f"CSV: {tmp_path / 'logs' / 'distilled_seed0' / 'metrics.csv'}" in out
    assert (f"tensorboard --logdir {tmp_path / 'logs' / 'tensorboard'}" in out) == tensorboard


@pytest.mark.slow
def test_demo_without_tensorboard_logs_csv_only(tmp_path, capsys):
    main(["demo", "--quick", "--no-tensorboard", "--output", str(tmp_path)])
    assert (tmp_path / "logs" / "distilled_seed1" / "metrics.csv").is_file()
    assert not (tmp_path / "logs" / "tensorboard").exists()
    assert "tensorboard --logdir" not in capsys.readouterr().out


def test_demo_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        main(["demo", "--seeds", "0"])
