"""The shape of the code: functions short enough to read in one sitting, the engine kept apart from Blender
(it never imports bpy or the add-on), and the add-on kept apart from PyTorch (it runs in Blender's Python)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ss4d_blender"
MAX_FUNCTION_LINES = 90


def python_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def test_no_function_runs_past_90_lines():
    long = []
    for path in python_files(PACKAGE):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                lines = node.end_lineno - first + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions longer than 90 lines:\n" + "\n".join(long)


def imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of every module a file imports (at any level, including inside functions)."""
    parts = package.split(".")
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = parts[:len(parts) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_engine_never_imports_bpy_or_the_addon():
    engine = PACKAGE / "engine"
    found = []
    for path in python_files(engine):
        package = ".".join(path.relative_to(PACKAGE.parent).parts[:-1])     # the package the file is in
        for name in imported_modules(path, package):
            if name.split(".")[0] in ("bpy", "bmesh", "mathutils") or name.startswith("ss4d_blender.blender"):
                found.append(f"{path.relative_to(PACKAGE.parent)}: {name}")
    assert not found, "the engine imports Blender code:\n" + "\n".join(found)


def test_the_import_check_sees_relative_imports(tmp_path):
    """The check above resolves `from ..blender import x` inside the engine to the add-on."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from ..blender import operators\n    import bpy.types\n")
    names = imported_modules(module, "ss4d_blender.engine")
    assert "ss4d_blender.blender.operators" in names and "bpy.types" in names


def test_importing_every_engine_module_loads_no_blender_module():
    code = """
import importlib, pkgutil, sys
import ss4d_blender.engine as engine
for info in pkgutil.walk_packages(engine.__path__, "ss4d_blender.engine."):
    if not info.name.endswith("__main__"):
        importlib.import_module(info.name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("bpy", "bmesh", "mathutils")
                or m.startswith("ss4d_blender.blender"))
print(loaded)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_the_addon_loads_without_torch():
    """The add-on runs inside Blender's Python, which has no PyTorch: every module of `blender/` (and the
    engine modules it uses) must import without it. The model runs in the worker process."""
    pytest.importorskip("bpy")
    code = """
import importlib, pkgutil, sys
import ss4d_blender.blender as addon
for info in pkgutil.walk_packages(addon.__path__, "ss4d_blender.blender."):
    importlib.import_module(info.name)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "safetensors", "av")))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
