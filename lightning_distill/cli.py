"""The ``lightning-distill`` console script.

``lightning-distill demo [...]`` runs :mod:`lightning_distill.demo`; ``lightning-distill fit|validate|test|predict
--config CONFIG.yaml`` runs Lightning's :class:`~lightning.pytorch.cli.LightningCLI` with any
:class:`~lightning_distill.DistillModule` (subclass or wrapped network) and any ``LightningDataModule``, the teacher
given as a ``DistillationCallback`` in ``trainer.callbacks`` (see ``configs/``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import lightning as L

from lightning_distill.module import DistillModule

USAGE = """usage: lightning-distill {demo,fit,validate,test,predict} ...

  demo                     train a teacher, then a student alone and distilled, on MNIST-1D (see `demo --help`)
  fit|validate|test|predict --config CONFIG.yaml
                           LightningCLI over DistillModule (see `fit --help` and configs/ in the repository)
"""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-distill`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return
    if args[0] == "demo":
        from lightning_distill.demo import main as demo_main

        demo_main(args[1:])
        return
    from lightning.pytorch.cli import LightningCLI

    LightningCLI(
        DistillModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
