"""``lightning-distill cache --config C.yaml``: the token-cache pre-pass from a LightningCLI config.

The config's ``model:`` is a :class:`~lightning_distill.TokenCachePass` (its ``teacher:`` a network or a
``TeacherRunner`` with its ``checkpoint:``, its ``cache:`` a ``TokenCache``), ``data:`` the fit's LightningDataModule
and ``trainer:`` the Trainer (any devices and strategy: under DDP each process writes its own shard). The pass runs
over the datamodule's *training* set in dataset order, as ``Trainer.predict`` (whose sampler gives process r the
samples i with i % world_size == r); a cache already holding some samples (a pass that crashed, or ran before) is
completed, not rewritten. As :mod:`lightning_distill._lightning_cli`, importing this module imports jsonargparse.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_distill._lightning_cli import check_teacher_checkpoints
from lightning_distill.teacher._token_cache import TokenCache
from lightning_distill.teacher._token_files import SAMPLE_DTYPE
from lightning_distill.teacher._token_pass import TokenCachePass

__all__ = ["CacheCLI", "run_cache"]


class CacheCLI(LightningCLI):
    """``LightningCLI(TokenCachePass, LightningDataModule, run=False)`` that checks the teacher checkpoint first.

    A ``TeacherRunner`` ``checkpoint`` that does not exist stops it before anything is built, naming the config
    beside the given one whose ``ModelCheckpoint`` writes that file (as ``DistillCLI`` does).
    """

    @override
    def before_instantiate_classes(self) -> None:
        check_teacher_checkpoints(self.config, [self.config.get("model")])


def run_cache(args: list[str]) -> None:
    """Parse ``args`` (those after ``cache``), run the pre-pass over the training set, print what it wrote."""
    with warnings.catch_warnings():
        # `args` are always given (LightningCLI would read `cache` from sys.argv): its warning that sys.argv holds
        # arguments too says nothing here
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = _parse(args)
    model, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    assert isinstance(model, TokenCachePass) and datamodule is not None
    trainer.predict(model, dataloaders=_training_set_in_order(datamodule), return_predictions=False)
    totals = [model.rows_written, model.tokens_written, model.batches_skipped]
    rows, tokens, skipped = _sum_over_processes(trainer, totals)  # also waits for every shard
    if trainer.is_global_zero:
        print(f"Wrote {rows} samples, {tokens} tokens ({skipped} batches were already stored).")
        print(_describe(model.cache))


def _parse(args: list[str]) -> CacheCLI:
    """The parsed config, its model, datamodule and Trainer built (the teacher checkpoint checked first)."""
    return CacheCLI(
        TokenCachePass,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=None,  # the pass writes no run directory
        auto_configure_optimizers=False,
        seed_everything_default=False,  # the pass draws nothing random
        run=False,
        args=args,
        parser_kwargs={
            "prog": "lightning-distill cache",
            "description": "Run a teacher once over the training set of `data:` and write its per-token top-k "
            "distributions into a TokenCache (`model:` a lightning_distill.TokenCachePass).",
        },
    )


def _training_set_in_order(datamodule: L.LightningDataModule) -> DataLoader[Any]:
    """A loader over the datamodule's training set, unshuffled, batched and collated as its training loader."""
    datamodule.prepare_data()
    datamodule.setup("fit")
    train = datamodule.train_dataloader()
    if not isinstance(train, DataLoader):
        raise TypeError(
            f"lightning-distill cache runs over the training DataLoader's dataset, but "
            f"{type(datamodule).__name__}.train_dataloader() returned a {type(train).__name__}. HINT: return one "
            "torch.utils.data.DataLoader over an IndexedDataset."
        )
    if train.batch_size is None:
        raise TypeError(
            f"lightning-distill cache batches the training set as {type(datamodule).__name__}.train_dataloader() "
            "does, but that loader has a batch_sampler (no batch_size). HINT: give it a `batch_size`, or run "
            "`Trainer.predict(TokenCachePass(...), dataloaders=...)` over a loader of your own, in dataset order."
        )
    return DataLoader(
        train.dataset,
        batch_size=train.batch_size,
        collate_fn=train.collate_fn,
        num_workers=train.num_workers,
        shuffle=False,
    )


def _sum_over_processes(trainer: L.Trainer, values: list[int]) -> list[int]:
    """Each value summed over the processes (a collective: every process's pass has ended when it returns)."""
    local = torch.tensor(values, dtype=torch.int64, device=trainer.strategy.root_device)
    return [int(v) for v in trainer.strategy.reduce(local, reduce_op="sum")]


def _describe(cache: TokenCache) -> str:
    """One line on the cache as it is on disk now: its path, rows and tokens stored, bytes per token."""
    path = str(cache.path)
    if cache.path.resolve().is_relative_to(Path.cwd().resolve()):
        path = os.path.relpath(cache.path)
    reader = TokenCache(cache.path, top_k=cache.top_k)
    try:
        settings = reader.open_reader({})
    except FileNotFoundError:
        return f"Cache: {path} (empty)"
    try:
        rows = settings["num_samples"] * settings["views"]
        stored, tokens = round(reader.stored_fraction() * rows), reader.stored_tokens()
        per_token = reader.bytes_per_token(settings["vocab"])
    finally:
        reader.close()
    size = sum(f.stat().st_size for f in cache.path.rglob("*") if f.is_file())
    return (
        f"Cache: {path}: {stored} of {rows} samples, {tokens} tokens stored; {per_token} bytes per token "
        f"(+{SAMPLE_DTYPE.itemsize} per sample), {size / 2**20:.2f} MiB on disk."
    )
