"""``benchmarks/run_all.py``: runs the scripts, writes reports and the index, replaces exactly the README blocks."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import pytest

from tests.helpers.processes import REPO_ROOT, run_python


@functools.cache
def load_run_all():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("run_all", REPO_ROOT / "benchmarks" / "run_all.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_all"] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


REPORT = """## Title

- CPU: something

| a | b |
|---|---|
| 1 | 2 |

caption

| c |
|---|
| 3 |
| 4 |
Total wall time 3 s.
"""


def test_tables_keeps_only_the_tables_in_order_and_selects_by_position() -> None:
    run_all = load_run_all()
    first, second = "| a | b |\n|---|---|\n| 1 | 2 |", "| c |\n|---|\n| 3 |\n| 4 |"
    assert run_all.tables(REPORT) == f"{first}\n\n{second}"
    assert run_all.tables(REPORT, "2") == second
    assert run_all.tables(REPORT, "2,1") == f"{second}\n\n{first}"
    with pytest.raises(ValueError, match=r"The report has 2 table\(s\); a README block asks for tables 3"):
        run_all.tables(REPORT, "3")


def test_every_benchmark_script_has_an_entry_and_a_readme_block() -> None:
    run_all = load_run_all()
    # gpu_model.py needs a GPU: benchmarks/gpu_check.sh runs it, and its figures get a README block once it has run;
    # common.py, overhead_variants.py and token_cache_measures.py are modules the scripts import, not benchmarks
    helpers = {"common", "overhead_variants", "token_cache_measures", "run_all", "gpu_model"}
    scripts = {p.stem for p in (REPO_ROOT / "benchmarks").glob("*.py")} - helpers
    assert scripts | {"demo"} == set(run_all.NAMES)
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = {match["name"] for match in run_all.BLOCK.finditer(readme)}
    assert blocks == set(run_all.NAMES)


@pytest.mark.slow
def test_quick_run_writes_report_and_index_and_replaces_only_its_readme_blocks(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    untouched = "<!-- bench:cache -->\n| stale cache |\n<!-- /bench:cache -->"
    readme.write_text(
        "intro\n<!-- bench:features#2 -->\n| old |\n<!-- /bench:features -->\nmiddle\n"
        f"<!-- bench:features#1 -->\n| old |\n<!-- /bench:features -->\n{untouched}\nend\n"
    )
    results = tmp_path / "results"
    out = run_python(
        "benchmarks/run_all.py", "--quick", "--only", "features", "--results", str(results), "--readme", str(readme)
    )
    assert "1 of 1 benchmarks ok" in out
    report = (results / "features.md").read_text()
    assert "| feature maps (+ logit KD) |" in report and (results / "features.png").stat().st_size > 0
    text = readme.read_text()
    assert text.startswith("intro\n<!-- bench:features#2 -->\n| feature maps (+ logit KD) |")
    first = text.index("<!-- bench:features#1 -->")
    assert text[first:].split("\n")[1].startswith("| student (CNN, 8 channels) |")
    assert "| old |" not in text and untouched in text and text.endswith("end\n")
    assert "`benchmarks/results/features.md`" in text
    index = (results / "README.md").read_text()
    assert "| `features` | `python benchmarks/features.py --quick --plot" in index and "| ok |" in index
    assert "- CPU:" in index


def test_quick_figures_are_never_written_into_the_real_readme() -> None:
    run_all = load_run_all()
    with pytest.raises(SystemExit) as exit_info:
        run_all.main(["--quick", "--only", "ddp"])
    assert exit_info.value.code == 2
