"""The project's layout rules, read from the source with `ast`: a library module never imports a script, and no
code edits `sys.path` (the package is installed; scripts and benchmarks run against it)."""

import ast
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
LIBRARY = sorted((ROOT / "rcp_llava").rglob("*.py"))
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))
# Scripts: the training script and every benchmark script (importable by name only while their folder is on
# sys.path, which is exactly what a library module must not rely on).
SCRIPTS = {"train_rcp", "benchmarks"} | {path.stem for path in BENCHMARKS}
NO_SYS_PATH = LIBRARY + BENCHMARKS + sorted((ROOT / "examples").glob("*.py")) + sorted(ROOT.glob("*.py"))


def _relative(path):
    return str(path.relative_to(ROOT))


def imported_modules(tree):
    """Absolute names of the modules `tree` imports: import statements, and `importlib.import_module("...")` /
    `__import__("...")` with a literal name."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.args[0].value


def sys_path_uses(tree):
    """Line numbers where `tree` touches `sys.path` (insert, append, assignment, slicing...)."""
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr == "path"
            and isinstance(node.value, ast.Name) and node.value.id == "sys"]


@pytest.mark.parametrize("path", LIBRARY, ids=_relative)
def test_library_modules_import_no_script(path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    scripts = sorted({name for name in imported_modules(tree) if name.split(".")[0] in SCRIPTS})
    assert not scripts, (
        f"{_relative(path)} imports {scripts}: a library module must not import a script; move what it needs into "
        "rcp_llava/ and let the script import it from there."
    )


@pytest.mark.parametrize("path", NO_SYS_PATH, ids=_relative)
def test_no_code_edits_sys_path(path):
    lines = sys_path_uses(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    assert not lines, (
        f"{_relative(path)} uses sys.path (line(s) {lines}): the package is installed (`pip install -e .`), so "
        "import it by name; load a benchmark script by path with importlib in tests."
    )


def test_the_checks_see_a_violation():
    """The two detectors flag what they are meant to flag (so an empty result above means something)."""
    tree = ast.parse("import sys\nsys.path.insert(0, 'x')\nfrom train_rcp import RcpTrainer\n"
                     "import importlib\nimportlib.import_module('ablations')\n")
    assert sys_path_uses(tree) == [2]
    assert {"train_rcp", "ablations"} <= set(imported_modules(tree))
    assert len(LIBRARY) > 10 and BENCHMARKS
