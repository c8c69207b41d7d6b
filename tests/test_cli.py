"""The console script: LightningCLI with the shipped configs, and the demo."""

from __future__ import annotations

import csv
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_distill.cli import main
from lightning_distill.demos import MNIST1DTeacher
from lightning_distill.demos.loggers import tensorboard_available

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICK = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.log_every_n_steps=1",
]
# The teacher gets two full epochs (about a second), so the students' runs see one clearly above chance.
TEACHER = ["--trainer.max_epochs=2", "--trainer.limit_val_batches=2"]
TEACHER_CKPT = "runs/teacher/checkpoints/teacher.ckpt"
STUDENT_CKPT = "runs/student/checkpoints/student.ckpt"
RUN_TEACHER_FIRST = (
    f"lightning-distill: the teacher checkpoint {TEACHER_CKPT} does not exist: run "
    "`lightning-distill fit --config configs/mnist1d_teacher.yaml` first, it writes it."
)


def shown_on_a_console(recorded: pytest.WarningsRecorder) -> list[str]:
    """The recorded warnings a console user sees (recwarn shows all, the suite's filters overridden).

    Python hides a DeprecationWarning unless `__main__` triggers it: jsonargparse's, raised through Lightning's CLI
    code, never reach a console.
    """
    return [str(w.message) for w in recorded if not issubclass(w.category, DeprecationWarning)]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    shutil.copytree(CONFIGS, tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-distill"])  # main(argv) gets the arguments, not pytest's sys.argv
    return tmp_path


def test_cli_trains_a_teacher_then_distills_from_its_checkpoint(workdir, capsys, recwarn):
    main(["fit", "--config", "configs/mnist1d_teacher.yaml", *TEACHER])
    assert (workdir / TEACHER_CKPT).is_file()
    out = capsys.readouterr().out
    assert "Final validation metrics: val/acc " in out and f"Checkpoint: {TEACHER_CKPT}\n" in out
    main(["fit", "--config", "configs/mnist1d_distill.yaml", *QUICK])
    out = capsys.readouterr().out
    assert "Final validation metrics: val/acc " in out and "val/teacher_acc " in out
    assert out.rstrip().endswith(f"Checkpoint: {STUDENT_CKPT}")
    checkpoint = torch.load(workdir / STUDENT_CKPT, weights_only=True)
    assert all(key.startswith("student.") for key in checkpoint["state_dict"])
    assert checkpoint["hyper_parameters"]["alpha"] == 0.9
    main(["test", "--config", "configs/mnist1d_distill.yaml", "--ckpt_path", STUDENT_CKPT])
    assert "test/acc" in capsys.readouterr().out
    main(["validate", "--config", "configs/mnist1d_distill.yaml", "--ckpt_path", STUDENT_CKPT])
    out = capsys.readouterr().out
    assert "val/acc" in out and "val/teacher_acc" in out
    main(["predict", "--config", "configs/mnist1d_distill.yaml", "--ckpt_path", STUDENT_CKPT])
    # no argument, checkpoint-folder, optimizer-override, LeafSpec or untrained-teacher warning
    assert shown_on_a_console(recwarn) == []


def test_cli_distill_config_before_the_teacher_names_the_config_to_run_first(workdir):
    with pytest.raises(SystemExit) as raised:
        main(["fit", "--config", "configs/mnist1d_distill.yaml"])
    assert str(raised.value) == RUN_TEACHER_FIRST
    assert not (workdir / "runs" / "student").exists()  # stopped before the Trainer was built


def test_cli_missing_teacher_checkpoint_no_config_writes_says_to_train_it(workdir):
    text = (workdir / "configs" / "mnist1d_distill.yaml").read_text().replace(TEACHER_CKPT, "elsewhere/teacher.ckpt")
    (workdir / "configs" / "mine.yaml").write_text(text)
    with pytest.raises(SystemExit) as raised:
        main(["test", "--config", "configs/mine.yaml"])
    assert str(raised.value).startswith(
        "lightning-distill: the teacher checkpoint elsewhere/teacher.ckpt does not exist: train the teacher first"
    )


def test_cli_config_with_the_deprecated_teacher_checkpoint_still_works(workdir, capsys):
    config = workdir / "configs" / "mnist1d_distill.yaml"
    runner = (
        "        teacher:  # a TeacherRunner holds the teacher with its placement: the checkpoint to load, precision, "
        "...\n"
        "          class_path: lightning_distill.teacher.TeacherRunner\n"
        "          init_args:\n"
        "            teacher:\n"
        "              class_path: lightning_distill.demos.MNIST1DTeacher\n"
        f"            checkpoint: {TEACHER_CKPT}\n"
    )
    old = (
        "        teacher:\n"
        "          class_path: lightning_distill.demos.MNIST1DTeacher\n"
        f"        teacher_checkpoint: {TEACHER_CKPT}\n"
    )
    assert runner in config.read_text()
    (workdir / "configs" / "old.yaml").write_text(config.read_text().replace(runner, old))
    with pytest.raises(SystemExit) as raised:
        main(["fit", "--config", "configs/old.yaml"])
    assert str(raised.value) == RUN_TEACHER_FIRST
    (workdir / TEACHER_CKPT).parent.mkdir(parents=True)
    torch.save(MNIST1DTeacher().state_dict(), workdir / TEACHER_CKPT)  # untrained: only the loading is tested
    with pytest.warns(DeprecationWarning, match=r"pass `DistillationCallback\(TeacherRunner\(teacher, checkpoint="):
        main(["fit", "--config", "configs/old.yaml", *QUICK])
    assert "val/teacher_acc " in capsys.readouterr().out


@pytest.mark.slow
def test_console_script_before_the_teacher_prints_one_line_and_no_warning(workdir):
    result = subprocess.run(
        [sys.executable, "-m", "lightning_distill.cli", "fit", "--config", "configs/mnist1d_distill.yaml"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line != "Seed set to 0"]
    assert lines == [RUN_TEACHER_FIRST], result.stderr[-3000:]


def test_cli_feature_maps_from_yaml_build_and_train_projectors(workdir, capsys):
    main(["fit", "--config", "configs/mnist1d_teacher.yaml", *TEACHER])
    main(["fit", "--config", "configs/mnist1d_features.yaml", *QUICK])
    checkpoint = torch.load(workdir / "runs/features/checkpoints/student.ckpt", weights_only=True)
    projectors = {k for k in checkpoint["state_dict"] if k.startswith("projectors.")}
    assert projectors == {f"projectors.features_act{i}.linear.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}
    assert checkpoint["hyper_parameters"]["feature_maps"][2]["weight"]["type"] == "linear_warmup"
    main(["test", "--config", "configs/mnist1d_features.yaml", "--ckpt_path", "runs/features/checkpoints/student.ckpt"])
    assert "test/acc" in capsys.readouterr().out


def test_usage_is_printed_without_arguments(capsys):
    main([])
    assert "demo" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_quick_writes_table_csv_and_plot(tmp_path, capsys, caplog, recwarn):
    caplog.set_level(logging.INFO)
    main(["demo", "--quick", "--output", str(tmp_path)])
    out, err = capsys.readouterr()
    assert out.startswith("Smoke run (--quick):")
    assert "| teacher | 1 |" in out and "| distilled | 2 |" in out
    assert out.splitlines()[-1] == f"Plot: {tmp_path / 'results.png'}"
    progress = err.splitlines()
    assert [line.split(" … ")[0] for line in progress] == [
        "run 1/5 teacher",
        "run 2/5 student_alone seed 0",
        "run 3/5 distilled seed 0",
        "run 4/5 student_alone seed 1",
        "run 5/5 distilled seed 1",
    ]
    assert all(line.endswith(" s") and " % in " in line for line in progress), progress
    lightning_lines = [r.getMessage() for r in caplog.records if r.name.startswith("lightning")]
    assert not [line for line in lightning_lines if "GPU available" in line or "stopped" in line], lightning_lines
    assert shown_on_a_console(recwarn) == []  # no LeafSpec, logging-interval, workers or untrained-teacher warning
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
