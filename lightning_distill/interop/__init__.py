"""Adapters from other libraries' distillation configs (Intel Neural Compressor) to this library's arguments."""

from lightning_distill.interop._inc import inc_self_distill_arguments

__all__ = ["inc_self_distill_arguments"]
