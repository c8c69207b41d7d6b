"""The ``lightning-distill`` console script.

``lightning-distill demo [...]`` runs :mod:`lightning_distill.demos.run`; ``lightning-distill fit|validate|test|predict
--config CONFIG.yaml`` runs ``DistillCLI`` (Lightning's ``LightningCLI``) with any
:class:`~lightning_distill.DistillModule` (subclass or wrapped network) and any ``LightningDataModule``, the teacher
given as a ``DistillationCallback`` in ``trainer.callbacks``, or a ``CachedTeacher`` reading a token cache (see
``configs/``). ``fit`` ends by printing the final validation metrics and the checkpoint's path. ``lightning-distill
cache --config CONFIG.yaml`` (:mod:`lightning_distill._cache_cli`) runs a language-model teacher once over the
training set of the config's datamodule (``model:`` a :class:`~lightning_distill.TokenCachePass`) on every device of
its Trainer and writes a :class:`~lightning_distill.TokenCache`, so that a ``fit`` from the cache never loads the
teacher; it ends by printing what it wrote. A teacher checkpoint that does not exist yet stops any of these commands
before anything is built, naming the config that writes it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import lightning as L

from lightning_distill._quiet import quiet_lightning
from lightning_distill.module import DistillModule

__all__ = ["main"]

_USAGE = """usage: lightning-distill {demo,fit,validate,test,predict,cache} ...

  demo                     train a teacher, then a student alone and distilled, on MNIST-1D (see `demo --help`)
  fit|validate|test|predict --config CONFIG.yaml
                           LightningCLI over DistillModule (see `fit --help` and configs/ in the repository)
  cache --config CONFIG.yaml
                           run a teacher once over the training set and write its token cache, for a fit from
                           the cache alone (see `cache --help` and configs/markov_cache.yaml)
"""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-distill`` console script; ``argv`` replaces ``sys.argv[1:]`` when given."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_USAGE)
        return
    if args[0] == "demo":
        from lightning_distill.demos.run import main as demo_main

        demo_main(args[1:])
        return
    if args[0] == "cache":
        from lightning_distill._cache_cli import run_cache  # imports jsonargparse, as DistillCLI does

        with quiet_lightning(banners=True):
            run_cache(args[1:])  # always the arguments: a LightningCLI without subcommands would read `cache`
        return
    from lightning_distill._lightning_cli import DistillCLI  # imports jsonargparse: only for these commands

    with quiet_lightning(banners=True):  # Lightning's own deprecation noise only; its banners stay
        DistillCLI(
            DistillModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=None if argv is None else args,  # None: LightningCLI reads sys.argv itself, as it expects to
            save_config_kwargs={"overwrite": True},
        )


if __name__ == "__main__":
    main()
