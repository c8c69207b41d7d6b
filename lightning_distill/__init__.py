"""lightning-distill: knowledge distillation for PyTorch Lightning as a one-line addition.

Add :class:`DistillationCallback` (it owns the frozen teacher) to the Trainer and train a :class:`DistillModule`
(it owns the loss) as the student. In a loop of your own (Lightning Fabric, plain PyTorch) use :class:`Distiller`,
the same engine.
"""

from lightning_distill.callback import DistillationCallback
from lightning_distill.distiller import Distiller
from lightning_distill.features._map import FeatureMap
from lightning_distill.module import DistillModule
from lightning_distill.self_distill._module import SelfDistillModule
from lightning_distill.teacher._cache import TeacherCache
from lightning_distill.teacher._runner import TeacherOutputs

__version__ = "0.1.0"

__all__ = [
    "DistillModule",
    "DistillationCallback",
    "Distiller",
    "FeatureMap",
    "SelfDistillModule",
    "TeacherCache",
    "TeacherOutputs",
    "__version__",
]
