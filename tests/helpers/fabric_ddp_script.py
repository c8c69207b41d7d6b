"""Run by ``tests/test_distiller.py`` as ``python -m tests.helpers.fabric_ddp_script OUT_DIR``.

Runs ``examples/fabric_loop.py``'s ``train`` under Fabric's 2-process CPU ``ddp`` (Fabric relaunches this module for
rank 1) and writes what each rank saw to ``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.fabric import Fabric
from torch.nn.parallel import DistributedDataParallel

from tests.helpers.processes import REPO_ROOT


def main(out: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    namespace: dict[str, object] = {"__name__": "example_fabric_loop"}
    source = (REPO_ROOT / "examples" / "fabric_loop.py").read_text()
    exec(compile(source, "examples/fabric_loop.py", "exec"), namespace)
    student, distiller = namespace["train"](fabric, epochs=2)  # type: ignore[operator]
    inner = distiller.module  # the Distiller inside Fabric's wrapper
    flat = torch.cat([p.detach().flatten() for p in student.parameters()])
    projectors = torch.cat([p.detach().flatten() for p in inner.parameters()])
    students, projector_copies = fabric.all_gather(flat), fabric.all_gather(projectors)
    report = {
        "world_size": fabric.world_size,
        "students_equal": bool(torch.equal(students[0], students[1])),
        "projectors_equal": bool(torch.equal(projector_copies[0], projector_copies[1])),
        "student_is_ddp": isinstance(student._forward_module, DistributedDataParallel),
        "distiller_is_ddp": isinstance(distiller._forward_module, DistributedDataParallel),
        "teacher_wrapped": isinstance(inner.teacher, DistributedDataParallel),
        "teacher_frozen_eval": not inner.teacher.training
        and not any(p.requires_grad for p in inner.teacher.parameters()),
        "projectors_trained": inner._snapshot is None,  # cleared once the projector's weights changed
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{fabric.global_rank}.json").write_text(json.dumps(report))
    # Fabric leaves the process group open; tearing gloo down at interpreter exit can abort one rank
    # ("terminate called without an active exception"), so both ranks meet and close it explicitly.
    fabric.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
