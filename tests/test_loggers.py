"""``lightning_distill.demos.loggers``: CSV always, TensorBoard when installed, and reading the CSV log back."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_distill.demos import loggers as loggers_module
from lightning_distill.demos.loggers import (
    default_loggers,
    logged_trainer,
    read_metric,
    tensorboard_available,
    where_logs_are,
)


class EpochLogger(L.LightningModule):
    """Logs ``val/acc = 10 * epoch`` once per epoch and a training loss every step."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.log("val/acc", 10.0 * self.current_epoch)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(loggers: list) -> None:  # type: ignore[type-arg]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=4)
    trainer = L.Trainer(
        max_epochs=3, logger=loggers, log_every_n_steps=1, enable_progress_bar=False, enable_checkpointing=False
    )
    trainer.fit(EpochLogger(), loader, loader)


def test_csv_first_then_tensorboard_when_installed(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    loggers = default_loggers(tmp_path, "run")
    assert [type(lg) for lg in loggers] == [CSVLogger, TensorBoardLogger]
    fit(loggers)
    assert read_metric(tmp_path / "run", "val/acc") == [(0, 0.0), (1, 10.0), (2, 20.0)]
    assert list((tmp_path / "tensorboard" / "run").glob("events.out.tfevents.*"))
    text = where_logs_are(loggers)
    assert f"CSV: {tmp_path / 'run' / 'metrics.csv'}" in text
    assert f"tensorboard --logdir {tmp_path / 'tensorboard'}" in text


def test_csv_only_when_tensorboard_is_missing_or_declined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert [type(lg) for lg in default_loggers(tmp_path, "a", tensorboard=False)] == [CSVLogger]
    monkeypatch.setattr(loggers_module.importlib.util, "find_spec", lambda name: None)
    assert not tensorboard_available()
    assert [type(lg) for lg in default_loggers(tmp_path, "b")] == [CSVLogger]
    with pytest.raises(ModuleNotFoundError, match=r"tensorboard=True but neither .* HINT: `pip install tensorboard`"):
        default_loggers(tmp_path, "c", tensorboard=True)


def test_read_metric_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"No CSV log at .*metrics.csv"):
        read_metric(tmp_path, "val/acc")
    fit(default_loggers(tmp_path, "run", tensorboard=False))
    assert len(read_metric(tmp_path / "run", "train/loss")) == 6  # 2 steps x 3 epochs
    assert [step for step, _ in read_metric(tmp_path / "run", "train/loss", by="step")] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(KeyError, match=r"'val/loss' was never logged .* logged keys: \['train/loss', 'val/acc'\]"):
        read_metric(tmp_path / "run", "val/loss")


def test_read_metric_by_step_reads_a_fabric_log_and_by_epoch_says_why_not(tmp_path: Path) -> None:
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1, loggers=default_loggers(tmp_path, "loop", tensorboard=False))
    for step in range(3):
        fabric.log_dict({"loss": 1.0 / (step + 1)}, step=step)
    fabric.logger.finalize("success")
    assert read_metric(tmp_path / "loop", "loss", by="step") == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    with pytest.raises(KeyError, match=r"have no 'epoch' value. HINT: Fabric logs have no epoch: by='step'"):
        read_metric(tmp_path / "loop", "loss")


def test_logged_trainer_logs_where_default_loggers_say_and_takes_overrides(tmp_path: Path) -> None:
    trainer = logged_trainer(tmp_path, "run", 2, tensorboard=False, limit_train_batches=3, log_every_n_steps=1)
    assert (trainer.max_epochs, trainer.limit_train_batches, trainer.log_every_n_steps) == (2, 3, 1)
    assert [type(lg) for lg in trainer.loggers] == [CSVLogger] and Path(trainer.log_dir) == tmp_path / "run"
    assert trainer.checkpoint_callback is None and not trainer.progress_bar_callback


def test_a_rerun_under_the_same_name_replaces_its_logs_without_a_warning(tmp_path: Path, recwarn) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("tensorboard")
    for _ in range(2):
        fit(default_loggers(tmp_path, "run"))
    assert read_metric(tmp_path / "run", "val/acc") == [(0, 0.0), (1, 10.0), (2, 20.0)]  # the second run's only
    assert len(list((tmp_path / "tensorboard" / "run").glob("events.out.tfevents.*"))) == 1
    assert not [w for w in recwarn if "exists and is not empty" in str(w.message)]
    (tmp_path / "run" / "notes.txt").write_text("mine")
    default_loggers(tmp_path, "run")
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # only the loggers' own files are removed
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_quiet_lightning_hides_banners_and_known_warnings_and_restores_them(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import warnings

    from lightning_distill._quiet import quiet_lightning

    caplog.set_level(logging.INFO)
    lightning_logger = logging.getLogger("lightning.pytorch")
    before = lightning_logger.level
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        with quiet_lightning():
            lightning_logger.info("GPU available: False, used: False")
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", UserWarning, stacklevel=1)
            warnings.warn("anything else", UserWarning, stacklevel=1)
        with quiet_lightning(banners=True):
            lightning_logger.info("TPU available: False")
    assert [str(w.message) for w in recorded] == ["anything else"]
    assert [r.getMessage() for r in caplog.records if r.name == "lightning.pytorch"] == ["TPU available: False"]
    assert lightning_logger.level == before
