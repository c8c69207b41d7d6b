"""Self-distillation: a network's own deepest exit teaches exit heads on its shallower layers, and early exit.

:class:`SelfDistillModule` trains the exits (:class:`ExitHead`); :func:`run_early_exit` and
:func:`sweep_thresholds` measure inference that stops at the first confident exit; :class:`ExitModel` is one
exported exit.
"""

from lightning_distill.self_distill._early_exit import EarlyExitReport, ExitModel, run_early_exit, sweep_thresholds
from lightning_distill.self_distill._heads import ExitHead
from lightning_distill.self_distill._module import SelfDistillModule

__all__ = ["EarlyExitReport", "ExitHead", "ExitModel", "SelfDistillModule", "run_early_exit", "sweep_thresholds"]
