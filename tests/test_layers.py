"""Layers point one way: engine ← registry ← core ← service / worker ← cli. Every import counts, lazy ones too."""

import ast
from pathlib import Path

import pytest
from conftest import ROOT

# what each installed package may import from the project, and the third-party packages it may not
ALLOWED = {
    "crispedit": set(),
    "registry": {"crispedit"},
    "core": {"crispedit", "registry"},
    "service": {"crispedit", "registry", "core"},
    "worker": {"crispedit", "registry", "core"},
    "cli": {"crispedit", "registry", "core", "service", "worker", "lab"},
}
SERVING_STACK = {"fastapi", "starlette", "uvicorn", "redis", "rq"}


def imported(path: Path) -> set[str]:
    """The top-level names of every module ``path`` imports, anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_layers_below_it(package):
    project = set(ALLOWED) | {"lab"}
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    for path in files:
        wrong = (imported(path) & project) - ALLOWED[package] - {package}
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_the_engine_needs_no_serving_stack():
    for path in sorted((ROOT / "crispedit").rglob("*.py")):
        assert not imported(path) & SERVING_STACK, path.relative_to(ROOT)


def test_the_check_sees_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from service.app import app\n    import worker.main\n")
    assert imported(module) == {"service", "worker"}
