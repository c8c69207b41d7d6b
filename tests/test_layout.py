"""The package's layout keeps its promises (DESIGN.md, section 6).

- The library never imports its demos: neither ``lightning_distill.demos`` nor what only the demos need
  (``mnist1d``; ``matplotlib`` beyond what ``import lightning`` already loads: torchmetrics imports it when installed).
- The public surface is ``__all__``: every public module (no ``_``-prefixed part in its dotted name) defines it, every
  name it defines that is not in it starts with ``_``, and every name in it resolves.
- ``quantization/`` imports nothing of the rest of the library.
- No file of the package is longer than 600 lines.
- The library's doctests (every module outside ``demos/``) build their own models instead of importing the demos.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import json
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import pytest

import lightning_distill
from tests.helpers.processes import run_python

PACKAGE = Path(lightning_distill.__file__).parent
DEMOS = "lightning_distill.demos"
MAX_LINES = 600


def _module_names() -> list[str]:
    """Every module of the package, the package itself first."""
    walked = pkgutil.walk_packages(lightning_distill.__path__, prefix="lightning_distill.")
    return ["lightning_distill", *sorted(info.name for info in walked)]


def _is_public(name: str) -> bool:
    return not any(part.startswith("_") for part in name.split("."))


def _is_demo(name: str) -> bool:
    return name == DEMOS or name.startswith(f"{DEMOS}.")


MODULES = _module_names()
PUBLIC = [name for name in MODULES if _is_public(name)]
LIBRARY = [name for name in MODULES if not _is_demo(name)]


def _defined_names(module: ModuleType) -> set[str]:
    """The top-level names ``module`` defines itself: its functions and classes, and what it assigns (not imports)."""
    names = {
        name
        for name, obj in vars(module).items()
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == module.__name__
    }
    tree = ast.parse(Path(inspect.getfile(module)).read_text())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


# ------------------------------------------------------------------------------------------------ demos stay apart
_IMPORT_SCRIPT = """
import importlib, json, sys
import lightning  # what it imports (matplotlib, through torchmetrics, when installed) is not ours
seen = set(sys.modules)
report = {}
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
    new = set(sys.modules) - seen
    seen |= new
    report[name] = sorted(m for m in new
                          if m.startswith("lightning_distill.demos") or m.split(".")[0] in ("mnist1d", "matplotlib"))
print(json.dumps(report))
"""


def test_the_library_imports_no_demo_module() -> None:
    """``import lightning_distill``, then every other module outside ``demos/`` (subpackages, internals, the CLI)."""
    report = json.loads(run_python("-c", _IMPORT_SCRIPT, json.dumps(LIBRARY), timeout=300).strip().splitlines()[-1])
    assert list(report) == LIBRARY
    assert report["lightning_distill"] == [], f"`import lightning_distill` imports {report['lightning_distill']}"
    loaded = {name: found for name, found in report.items() if found}
    assert not loaded, f"library modules import demo-only modules (each: what its import added): {loaded}"


def test_the_walk_sees_the_subpackages() -> None:
    """The checks below walk what they should: every subpackage, and the demos only where they apply."""
    for sub in ("teacher", "features", "losses", "self_distill", "quantization", "interop", "demos"):
        assert f"lightning_distill.{sub}" in PUBLIC
    assert (
        "lightning_distill.self_distill._module" in MODULES and "lightning_distill.self_distill._module" not in PUBLIC
    )
    assert not any(_is_demo(name) for name in LIBRARY)


def test_quantization_imports_nothing_of_the_core() -> None:
    """A quantization-aware student is a plain ``nn.Module``: ``quantization/`` imports only itself (DESIGN.md, 6)."""
    outside = []
    for path in sorted((PACKAGE / "quantization").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            outside += [
                f"{path.name}: {n}"
                for n in names
                if n.split(".")[0] == "lightning_distill" and not n.startswith("lightning_distill.quantization")
            ]
    assert not outside, f"quantization/ imports the rest of the library: {outside}"


# -------------------------------------------------------------------------------------- the public surface: __all__
@pytest.mark.parametrize("name", PUBLIC)
def test_a_public_module_exports_exactly_its_public_names(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, (list, tuple)), f"{name} defines no `__all__`"
    assert len(set(exported)) == len(exported), f"{name}.__all__ repeats names: {exported}"
    undeclared = sorted(n for n in _defined_names(module) - set(exported) if not n.startswith("_"))
    assert not undeclared, (
        f"{name} defines {undeclared}, which are neither in its `__all__` nor `_`-prefixed. HINT: export them, or "
        "prefix them with `_` (and update their callers)."
    )


@pytest.mark.parametrize("name", [n for n in MODULES if hasattr(importlib.import_module(n), "__all__")])
def test_every_name_in_all_resolves(name: str) -> None:
    module = importlib.import_module(name)
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names {missing}, which the module does not have"


def test_the_top_level_api() -> None:
    expected = {
        "CachedTeacher",
        "DistillModule",
        "DistillationCallback",
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
    }
    if (PACKAGE / "objective.py").exists():
        expected.add("DistillationObjective")
    assert set(lightning_distill.__all__) == expected
    assert isinstance(lightning_distill.schedules, ModuleType)


# ------------------------------------------------------------------------------------------------------ file sizes
def test_no_file_is_longer_than_600_lines() -> None:
    lengths = {
        str(path.relative_to(PACKAGE.parent)): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")
    }
    assert lengths, "found no file"
    long = {path: n for path, n in sorted(lengths.items()) if n > MAX_LINES}
    assert not long, f"split these files (at most {MAX_LINES} lines each): {long}"


# -------------------------------------------------------------------------------------------- doctests of the library
_DEMO_IMPORT = re.compile(r"lightning_distill\.demos\b|from\s+lightning_distill\s+import[^\n]*\bdemos\b")


def test_library_doctests_import_no_demo() -> None:
    """What ``pytest --doctest-modules`` runs for each library module: no example imports the demos."""
    finder = doctest.DocTestFinder()
    offenders = []
    found = 0
    for name in LIBRARY:
        for test in finder.find(importlib.import_module(name)):
            found += len(test.examples)
            offenders.extend(
                f"{test.name}: {ex.source.strip()}" for ex in test.examples if _DEMO_IMPORT.search(ex.source)
            )
    assert found > 100, f"found only {found} doctest examples: the walk missed modules"
    assert not offenders, f"library doctests import the demos (build a small model inline instead): {offenders}"
