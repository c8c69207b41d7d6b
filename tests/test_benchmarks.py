"""The benchmark scripts run end to end (smoke tests only: timings are never asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_overhead_quick_runs_and_prints_the_table() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/overhead.py", "--quick", "--threads", "1"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| variant | median step ms | median epoch s | peak RSS MB (Δ fit) |" in result.stdout
    for label in ("plain PyTorch loop", "hand-written LightningModule", "DistillModule + DistillationCallback"):
        assert label in result.stdout
