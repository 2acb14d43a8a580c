"""Extension packaging and the managed runtime environment (installed from a local wheel)."""
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import build_addon
from ss4d_blender import runtime_env

REPO = Path(__file__).resolve().parents[1]


def fake_wheel(folder: Path, name: str, version: str, platform_tag: str, module_code: str = "VALUE = 42\n") -> Path:
    """A minimal valid wheel (what pip needs: METADATA, WHEEL, RECORD)."""
    dist = f"{name}-{version}"
    path = folder / f"{dist}-py3-none-{platform_tag}.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}.py", module_code)
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def test_manifest_template_is_valid():
    manifest = tomllib.loads((REPO / "addon_manifest" / "blender_manifest.toml").read_text())
    for key in ("schema_version", "id", "version", "name", "maintainer", "type", "blender_version_min", "license"):
        assert key in manifest
    assert manifest["blender_version_min"] == "4.2.0" and manifest["id"] == "ss4d_blender"
    assert set(manifest["permissions"]) == {"files", "network"}


def test_built_zip_has_manifest_package_and_listed_wheels(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "safetensors", "0.8.0", "manylinux_2_17_x86_64")
    fake_wheel(wheels, "safetensors", "0.8.0", "win_amd64")
    out = tmp_path / "dist"
    subprocess.run([sys.executable, str(REPO / "build_addon.py"), "--platform", "linux-x64", "--platform", "windows-x64",
                    "--wheels-dir", str(wheels), "--out", str(out)], check=True, capture_output=True)
    for platform in ("linux-x64", "windows-x64"):
        with zipfile.ZipFile(out / f"ss4d_blender-0.1.0-{platform}.zip") as z:
            names = set(z.namelist())
            manifest = tomllib.loads(z.read("blender_manifest.toml").decode())
            assert manifest["platforms"] == [platform]
            assert manifest["wheels"] and all(w[2:] in names for w in manifest["wheels"])
            assert "__init__.py" in names and "blender/operators.py" in names and "engine/worker.py" in names
            assert "engine/data/flexicubes_tables.json" in names
            assert not any("__pycache__" in n for n in names)
            init = z.read("__init__.py").decode()
            assert "import bpy" not in init.split("def register")[0]  # importable without bpy at module level


def test_missing_platform_wheel_is_an_error(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "build_addon.py"), "--platform", "macos-arm64",
                           "--wheels-dir", str(tmp_path), "--out", str(tmp_path / "d")], capture_output=True, text=True)
    assert proc.returncode != 0 and "no safetensors==0.8.0 wheel for macos-arm64" in proc.stderr


def test_runtime_install_from_a_local_wheel(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "ss4d_probe", "1.0", "any")
    env = tmp_path / "runtime"
    stages = []
    python = runtime_env.install_runtime(env, base_python=sys.executable, packages=["ss4d_probe==1.0"],
                                         find_links=str(wheels), log_path=tmp_path / "install.log", progress=stages.append)
    assert python == runtime_env.env_python(env) and python.is_file()
    out = subprocess.run([str(python), "-c", "import ss4d_probe; print(ss4d_probe.VALUE)"], capture_output=True, text=True)
    assert out.stdout.strip() == "42"
    assert stages[0] == "Creating the environment" and "ss4d_probe" in stages[1]
    assert "pip" in (tmp_path / "install.log").read_text()
    # the environment has no torch, so it is not offered as the engine's runtime
    assert not runtime_env.has_engine_dependencies(str(python))


def test_failed_install_reports_the_log(tmp_path):
    env = tmp_path / "runtime"
    try:
        runtime_env.install_runtime(env, base_python=sys.executable, packages=["does_not_exist==9.9"],
                                    find_links=str(tmp_path), log_path=tmp_path / "install.log")
    except RuntimeError as err:
        assert "failed" in str(err) and "install.log" in str(err)
    else:
        raise AssertionError("install of a missing package succeeded")
