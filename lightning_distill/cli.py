"""The ``lightning-distill`` console script.

``lightning-distill demo [...]`` runs :mod:`lightning_distill.demos.run`; ``lightning-distill fit|validate|test|predict
--config CONFIG.yaml`` runs ``DistillCLI`` (Lightning's ``LightningCLI``) with any
:class:`~lightning_distill.DistillModule` (subclass or wrapped network) and any ``LightningDataModule``, the teacher
given as a ``DistillationCallback`` in ``trainer.callbacks`` (see ``configs/``). ``fit`` ends by printing the final
validation metrics and the checkpoint's path; a teacher checkpoint that does not exist yet stops the command before
anything is built, naming the config that writes it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import lightning as L

from lightning_distill._quiet import quiet_lightning
from lightning_distill.module import DistillModule

__all__ = ["main"]

_USAGE = """usage: lightning-distill {demo,fit,validate,test,predict} ...

  demo                     train a teacher, then a student alone and distilled, on MNIST-1D (see `demo --help`)
  fit|validate|test|predict --config CONFIG.yaml
                           LightningCLI over DistillModule (see `fit --help` and configs/ in the repository)
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
