"""lightning-distill: knowledge distillation for PyTorch Lightning as a one-line addition.

Add :class:`DistillationCallback` (it owns the frozen teacher) to the Trainer and train a :class:`DistillModule`
(it owns the loss) as the student. In a loop of your own (Lightning Fabric, plain PyTorch) use :class:`Distiller`;
both compose the same :class:`DistillationObjective`. The capabilities live in subpackages, each with its public
names in ``__all__``: :mod:`~lightning_distill.teacher`, :mod:`~lightning_distill.features`,
:mod:`~lightning_distill.losses`, :mod:`~lightning_distill.self_distill`, :mod:`~lightning_distill.quantization` and
:mod:`~lightning_distill.interop`; :mod:`~lightning_distill.demos` (demo data and models) is never imported by the
library. A language model's teacher can be run once ahead: :class:`TokenCachePass` writes a :class:`TokenCache`,
:class:`CachedTeacher` trains from it without the teacher. :class:`ResumableDataLoader` (:mod:`~lightning_distill.data`)
lets a fit resumed from a checkpoint saved inside an epoch continue with the batches it had not reached.
"""

from lightning_distill import schedules
from lightning_distill._on_policy import OnPolicy
from lightning_distill.cached_teacher import CachedTeacher
from lightning_distill.callback import DistillationCallback
from lightning_distill.data import ResumableDataLoader, ResumableSampler
from lightning_distill.distiller import Distiller
from lightning_distill.features import FeatureMap
from lightning_distill.module import DistillModule
from lightning_distill.objective import DistillationObjective
from lightning_distill.self_distill import SelfDistillModule
from lightning_distill.teacher import (
    IndexedDataset,
    TeacherCache,
    TeacherMixture,
    TeacherOutputs,
    TeacherRunner,
    TokenCache,
    TokenCachePass,
)

__version__ = "0.1.0"

__all__ = [
    "CachedTeacher",
    "DistillModule",
    "DistillationCallback",
    "DistillationObjective",
    "Distiller",
    "FeatureMap",
    "IndexedDataset",
    "OnPolicy",
    "ResumableDataLoader",
    "ResumableSampler",
    "SelfDistillModule",
    "TeacherCache",
    "TeacherMixture",
    "TeacherOutputs",
    "TeacherRunner",
    "TokenCache",
    "TokenCachePass",
    "__version__",
    "schedules",
]
