"""The teacher side: running a frozen teacher, mixing several, sharding it, and caching its outputs.

:class:`TeacherRunner` freezes, places and runs a teacher (what :class:`~lightning_distill.DistillationCallback`
and :class:`~lightning_distill.Distiller` both use); :class:`TeacherMixture` is several teachers as one;
:class:`TeacherCache` stores a teacher's logits so later epochs never run it, over an :class:`IndexedDataset`;
:class:`TokenCache` stores a language model's per-token top-k distributions, written once by :class:`TokenCachePass`.
"""

from lightning_distill._indexed import Augment, Indexed, IndexedDataset
from lightning_distill.teacher._cache import OnMismatch, TeacherCache
from lightning_distill.teacher._checkpoint import load_teacher_checkpoint
from lightning_distill.teacher._mixture import TeacherMixture
from lightning_distill.teacher._runner import TeacherOutputs, TeacherPrecision, TeacherRunner
from lightning_distill.teacher._sharding import TeacherSharding
from lightning_distill.teacher._token_cache import TokenCache
from lightning_distill.teacher._token_pass import TokenCachePass

__all__ = [
    "Augment",
    "Indexed",
    "IndexedDataset",
    "OnMismatch",
    "TeacherCache",
    "TeacherMixture",
    "TeacherOutputs",
    "TeacherPrecision",
    "TeacherRunner",
    "TeacherSharding",
    "TokenCache",
    "TokenCachePass",
    "load_teacher_checkpoint",
]
