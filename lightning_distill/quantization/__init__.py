"""Quantization-aware students (PyTorch eager-mode QAT) distilled like any other, then exported to real int8.

This package imports nothing of the rest of the library: a :class:`QuantizedStudent` is a plain ``nn.Module`` that
:class:`~lightning_distill.DistillModule` trains as its student.
"""

from lightning_distill.quantization._qat import (
    FloatIsland,
    FreezeQuantization,
    Int8InferenceError,
    QuantizedStudent,
    check_int8_inference,
    export_quantized,
    fusable_groups,
    model_bytes,
    observers_enabled,
    qat_qconfig,
    quantization_aware,
)

__all__ = [
    "FloatIsland",
    "FreezeQuantization",
    "Int8InferenceError",
    "QuantizedStudent",
    "check_int8_inference",
    "export_quantized",
    "fusable_groups",
    "model_bytes",
    "observers_enabled",
    "qat_qconfig",
    "quantization_aware",
]
