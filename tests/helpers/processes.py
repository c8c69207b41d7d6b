"""Running a Python command from the repository root in a child process, for end-to-end tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_python(*args: str, timeout: int = 600) -> str:
    """Run ``python *args`` from the repository root; fail with the end of stderr unless it exits 0; return stdout."""
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
