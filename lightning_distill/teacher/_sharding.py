"""Where the teacher lives under each Lightning strategy: replicated per process, or sharded with FSDP2.

The teacher is never handed to the strategy (it would wrap, partition or optimize it). Under data-parallel
strategies every process holds a full frozen replica; under the FSDP family it may instead be sharded across all
processes with ``torch.distributed.fsdp.fully_shard`` in its own units: no optimizer, no gradients, each unit's
weights gathered for its forward and freed right after.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)
from torch import nn
from torch.distributed.tensor import DTensor

TeacherSharding = Literal["auto", "replicate", "shard"]
"""How the teacher is held under a sharding strategy: ``"replicate"`` (a full copy per process), ``"shard"`` (FSDP2
across all processes) or ``"auto"`` (shard when the teacher is at least :data:`AUTO_SHARD_BYTES`)."""

StrategyKind = Literal["single", "ddp", "deepspeed", "fsdp", "model_parallel", "untested"]

AUTO_SHARD_BYTES = 1 << 30
"""``TeacherRunner(sharding="auto")`` shards a teacher whose weights take at least this many bytes (1 GiB) under
FSDP."""

_SHARDING_OPTIONS = ("auto", "replicate", "shard")
_SHARDABLE: tuple[StrategyKind, ...] = ("fsdp", "model_parallel")


def strategy_kind(strategy: Strategy) -> StrategyKind:
    """Classify a Lightning strategy by how the teacher is handled under it.

    ``DeepSpeedStrategy`` is tested before ``DDPStrategy``, its base class.
    """
    if isinstance(strategy, SingleDeviceStrategy):
        return "single"
    if isinstance(strategy, DeepSpeedStrategy):
        return "deepspeed"
    if isinstance(strategy, DDPStrategy):
        return "ddp"
    if isinstance(strategy, FSDPStrategy):
        return "fsdp"
    if isinstance(strategy, ModelParallelStrategy):
        return "model_parallel"
    return "untested"


def check_sharding_option(sharding: object) -> TeacherSharding:
    """Return ``sharding`` if it is one of ``"auto"``, ``"replicate"``, ``"shard"``; raise ``ValueError`` otherwise."""
    if sharding not in _SHARDING_OPTIONS:
        raise ValueError(
            f"`sharding` must be one of {list(_SHARDING_OPTIONS)}, got {sharding!r}. HINT: leave the default "
            "`TeacherRunner(teacher, sharding='auto')` to shard only a large teacher under FSDP."
        )
    return sharding  # type: ignore[return-value]


def resolve_sharding(sharding: TeacherSharding, kind: StrategyKind, strategy_name: str, teacher_bytes: int) -> bool:
    """Decide whether the teacher is sharded: the option, the strategy and the teacher's size.

    Args:
        sharding: The :class:`~lightning_distill.teacher.TeacherRunner`'s ``sharding`` option.
        kind: The strategy's :func:`strategy_kind`.
        strategy_name: The strategy's class name, for the error message.
        teacher_bytes: The bytes of the teacher's parameters and buffers.

    Returns:
        ``True`` to shard, ``False`` to keep a full replica per process.

    Raises:
        ValueError: For ``"shard"`` under a strategy that does not shard (single device, DDP, DeepSpeed, other).

    Example::

        >>> resolve_sharding("auto", "fsdp", "FSDPStrategy", teacher_bytes=4 << 30)
        True
        >>> resolve_sharding("auto", "fsdp", "FSDPStrategy", teacher_bytes=1 << 20)
        False
    """
    if sharding == "replicate":
        return False
    if kind not in _SHARDABLE:
        if sharding == "auto":
            return False
        hint = (
            "under DeepSpeed the teacher is kept out of the ZeRO engine as a full inference replica per process; "
            "`TeacherRunner(teacher, precision='bf16')` halves its memory"
            if kind == "deepspeed"
            else "use `strategy='fsdp'` or `ModelParallelStrategy`, or `TeacherRunner(teacher, sharding='replicate')`"
        )
        raise ValueError(
            f"`sharding='shard'` needs a sharding strategy (FSDPStrategy or ModelParallelStrategy), but the "
            f"Trainer's strategy is {strategy_name}. HINT: {hint}."
        )
    return sharding == "shard" or teacher_bytes >= AUTO_SHARD_BYTES


def module_bytes(module: nn.Module) -> int:
    """Return the bytes of ``module``'s parameters and buffers held by this process (the local shard of a DTensor).

    Example::

        >>> module_bytes(nn.Linear(4, 2))  # 10 float32 values
        40
    """
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


def shard_teacher(teacher: nn.Module, device: torch.device, units: Iterable[type[nn.Module]] = ()) -> nn.Module:
    """Shard a frozen teacher across every process of the default process group with FSDP2 ``fully_shard``.

    Each module whose class is in ``units`` becomes its own FSDP unit (innermost first), then the whole teacher;
    every unit's full weights exist only during its forward (``reshard_after_forward=True``). Without ``units`` the
    whole teacher is one unit: memory at rest is 1/world-size of the teacher, but its forward gathers all of it. Module
    names are unchanged, so feature hooks still find their layers. A teacher that is already sharded is returned as is.

    Args:
        teacher: The frozen teacher, already on ``device`` and in its precision.
        device: This process's device (its type selects the mesh's backend).
        units: Module classes to shard as separate units, e.g. a transformer's block class.

    Returns:
        The same module, sharded in place.

    Raises:
        RuntimeError: If no process group is initialized.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(teacher, FSDPModule):
        return teacher
    if not torch.distributed.is_initialized():
        raise RuntimeError("Sharding the teacher needs an initialized process group; the strategy has not set one up.")
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    unit_types = tuple(units)
    if unit_types:
        # named_modules() lists parents before children: reversed, every inner unit is sharded before its parent.
        for _, module in reversed(list(teacher.named_modules())):
            if module is not teacher and isinstance(module, unit_types):
                fully_shard(module, mesh=mesh, reshard_after_forward=True)
    fully_shard(teacher, mesh=mesh, reshard_after_forward=True)
    return teacher


def unsharded_projectors(module: nn.Module) -> list[str]:
    """Names of trainable projector parameters left as plain tensors (not DTensors) by ``configure_model``.

    Under ``ModelParallelStrategy`` nothing synchronizes the gradients of a parameter that ``configure_model`` did
    not shard, so such a projector would drift apart across processes.
    """
    projectors = getattr(module, "projectors", None)
    if not isinstance(projectors, nn.Module):
        return []
    return [
        f"projectors.{name}"
        for name, p in projectors.named_parameters()
        if p.requires_grad and not isinstance(p, DTensor)
    ]
