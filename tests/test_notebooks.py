"""Every notebook in ``notebooks/`` runs top to bottom on CPU in its small-run mode, so none can silently rot.

The notebooks are jupytext percent-format sources (``notebooks/NN_name.py``); each is converted to an ``.ipynb``
in memory and executed by a real Jupyter kernel (nbclient + ipykernel) in a fresh folder, with
``LIGHTNING_DISTILL_QUICK=1`` (tiny data, one or two epochs). Each notebook asserts its own results in its cells; here
we check that it ran without an error, wrote its plots and logs, and printed where the logs are.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.processes import REPO_ROOT

jupytext = pytest.importorskip("jupytext", reason="pip install 'lightning-distill[notebooks]'")
nbclient = pytest.importorskip("nbclient", reason="pip install 'lightning-distill[notebooks]'")

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.py"))


def test_the_notebook_set_is_complete_and_listed_in_the_readme() -> None:
    names = [path.stem for path in NOTEBOOKS]
    for prefix in ("01_quickstart", "02_feature", "03_self_distill", "04_tuning"):
        assert any(name.startswith(prefix) for name in names), (prefix, names)
    assert len(names) >= 9, names  # 01-04 plus one per later capability
    readme = (REPO_ROOT / "README.md").read_text()
    for name in names:
        assert f"notebooks/{name}.py" in readme, f"README does not list notebooks/{name}.py"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_is_percent_format_that_round_trips(path: Path) -> None:
    notebook = jupytext.read(path, fmt="py:percent")
    assert notebook.cells[0].cell_type == "markdown" and notebook.cells[0].source.startswith("# ")
    assert sum(cell.cell_type == "code" for cell in notebook.cells) >= 3
    # the cells are what must round-trip; the YAML header is left out, as another test's imports can change how
    # PyYAML represents mappings in this process
    notebook.metadata = {}
    again = jupytext.reads(jupytext.writes(notebook, fmt="py:percent"), fmt="py:percent")
    assert [cell.source for cell in again.cells] == [cell.source for cell in notebook.cells]


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_executes_in_quick_mode(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_DISTILL_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = jupytext.read(path, fmt="py:percent")
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and the traceback, on the first failing cell
    output = tmp_path / "notebook_output" / path.stem
    assert sorted(output.glob("*.png")), f"{path.name} saved no plot under {output}"
    printed = "".join(
        out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    if "Trainer(" in path.read_text() or "demo" in path.stem:
        assert "metrics.csv" in printed, f"{path.name} never printed where its logs are"
