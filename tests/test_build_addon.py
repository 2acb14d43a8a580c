"""Extension packaging and the managed runtime environment (installed from a local wheel)."""
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

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
        z.writestr(f"{dist}.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def test_manifest_template_is_valid():
    manifest = tomllib.loads((REPO / "addon_manifest" / "blender_manifest.toml").read_text())
    for key in ("schema_version", "id", "version", "name", "maintainer", "type", "blender_version_min", "license"):
        assert key in manifest
    assert manifest["blender_version_min"] == "4.2.0" and manifest["id"] == "ss4d_blender"
    assert set(manifest["permissions"]) == {"files", "network"}
    # the licence the manifest declares is the one in the repository (and in every zip, below)
    assert manifest["license"] == ["SPDX:GPL-3.0-or-later"]
    license_text = (REPO / "LICENSE").read_text()
    assert "GNU GENERAL PUBLIC LICENSE" in license_text and "Version 3, 29 June 2007" in license_text
    assert "later version" in license_text  # the "or (at your option) any later version" terms
    # the website, when there is one, is this add-on's documentation, not the research code's repository
    assert "Lizb6626/SS4D" not in manifest.get("website", "")


def test_built_zip_has_manifest_package_and_listed_wheels(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "safetensors", "0.8.0", "manylinux_2_17_x86_64")
    fake_wheel(wheels, "safetensors", "0.8.0", "win_amd64")
    out = tmp_path / "dist"
    subprocess.run([sys.executable, str(REPO / "build_addon.py"), "--platform", "linux-x64",
                    "--platform", "windows-x64",
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
            assert z.read("LICENSE") == (REPO / "LICENSE").read_bytes()
            # only what users run: the add-on package without its test-only `testing/` package
            assert {n.split("/")[0] for n in names} == {"blender_manifest.toml", "LICENSE", "wheels", "__init__.py",
                                                        "__main__.py", "runtime_env.py", "blender", "engine"}
            assert not any(word in n for n in names for word in ("testing/", "golden_runners", "verify_golden",
                                                                  "synthetic.py"))
            shipped = {n for n in names if n.endswith(".py")}
            package = {p.relative_to(REPO / "ss4d_blender").as_posix() for p in (REPO / "ss4d_blender").rglob("*.py")
                       if "testing" not in p.parts}
            assert shipped == package
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
                                         find_links=str(wheels), log_path=tmp_path / "install.log",
                                         progress=stages.append)
    assert python == runtime_env.env_python(env) and python.is_file()
    out = subprocess.run([str(python), "-c", "import ss4d_probe; print(ss4d_probe.VALUE)"], capture_output=True,
                         text=True)
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


INSTALL_SCRIPT = r'''
import json, sys
import bpy
import addon_utils
from importlib import import_module
out = {"install": sorted(bpy.ops.extensions.package_install_files(filepath=sys.argv[1], repo="user_default",
                                                                    enable_on_install=True))}
module = "bl_ext.user_default.ss4d_blender"
out["enabled"] = bpy.context.preferences.addons.get(module) is not None
out["operators"] = sorted(n for n in dir(bpy.types) if n.startswith("SS4D_OT"))
prefs = import_module(module + ".blender.preferences")
out["real_preferences"] = prefs.get() is not prefs.HEADLESS
try:
    bpy.ops.ss4d.download_weights()
    out["download"] = "ran"
except RuntimeError as err:
    out["download"] = str(err)
if len(sys.argv) > 2:  # Generate 4D through the installed extension, as an artist would
    pipeline, frames = sys.argv[2], sorted(__import__("pathlib").Path(sys.argv[3]).glob("*.png"))
    p = prefs.get()
    p.pipeline, p.python, p.device, p.mesh_decoder = pipeline, sys.executable, "cpu", "auto"
    scene = bpy.context.scene
    editor = scene.sequence_editor_create()
    strip = editor.strips.new_image("rose", str(frames[0]), channel=1, frame_start=1)
    for f in frames[1:]:
        strip.elements.append(f.name)
    editor.active_strip = strip
    scene.render.resolution_x, scene.render.resolution_y = strip.elements[0].orig_width, strip.elements[0].orig_height
    scene.ss4d.num_frames, scene.ss4d.target_vertices, scene.ss4d.matting = 4, 1000, "ALPHA"
    out["generate"] = sorted(bpy.ops.ss4d.generate(synchronous=True))
    obj = next(o for o in bpy.data.objects if o.name.startswith("SS4D_"))
    out["shape_keys"] = len(obj.data.shape_keys.key_blocks)
addon_utils.disable(module)
out["after_disable"] = sorted(n for n in dir(bpy.types) if n.startswith("SS4D"))
print("RESULT " + json.dumps(out))
'''


def test_extension_validates_installs_and_enables_in_blender(tmp_path, shared_dir):
    """The built zip, with the real safetensors wheel it bundles, passes Blender's own extension validator,
    installs through Blender's extension system (wheel included), enables (real AddonPreferences), refuses
    to download with online access off (the bpy module's default), generates from an image strip with the
    tiny random-weight pipeline through the installed copy (worker in a separate Python, as with the managed
    runtime) and disables cleanly."""
    import platform

    import bpy

    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip("builds and installs the linux-x64 package; runs on Linux x86-64 only")
    wheels = tmp_path / "wheels"
    build_addon.download_wheels("linux-x64", wheels)  # the real pinned wheel, from PyPI (pip download)
    assert [w.name.split("-")[:2] for w in wheels.glob("*.whl")] == [["safetensors", "0.8.0"]]
    subprocess.run([sys.executable, str(REPO / "build_addon.py"), "--platform", "linux-x64", "--wheels-dir",
                    str(wheels), "--out", str(tmp_path / "dist")], check=True, capture_output=True)
    package = tmp_path / "dist" / "ss4d_blender-0.1.0-linux-x64.zip"
    validator = Path(bpy.utils.system_resource("SCRIPTS")) / "addons_core" / "bl_pkg" / "cli" / "blender_ext.py"
    check = subprocess.run([sys.executable, str(validator), "validate", str(package)], capture_output=True, text=True)
    assert check.returncode == 0 and "Success" in check.stdout, check.stdout + check.stderr

    from ss4d_blender.engine.tiny import make_tiny_pipeline

    pipeline = make_tiny_pipeline(tmp_path / "tiny")
    frames = tmp_path / "rose"
    frames.mkdir()
    for name in sorted(p.name for p in (shared_dir / "samples" / "rose").glob("*.png"))[:4]:
        shutil.copy(shared_dir / "samples" / "rose" / name, frames / name)
    env = dict(os.environ, BLENDER_USER_RESOURCES=str(tmp_path / "blender_user"))
    env.pop("PYTHONPATH", None)  # the worker must run the installed copy, not this checkout
    run = subprocess.run([sys.executable, "-c", INSTALL_SCRIPT, str(package), str(pipeline), str(frames)], env=env,
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout + run.stderr
    out = json.loads(lines[0][len("RESULT "):])
    assert out["install"] == ["FINISHED"] and out["enabled"] and out["real_preferences"]
    assert {"SS4D_OT_generate", "SS4D_OT_download_weights", "SS4D_OT_install_runtime"} <= set(out["operators"])
    assert "Online access is disabled" in out["download"]
    assert out["generate"] == ["FINISHED"] and out["shape_keys"] == 1 + 4  # basis + one per frame (noise: tiny weights)
    assert out["after_disable"] == []
    extensions = tmp_path / "blender_user" / "extensions"
    assert (extensions / "user_default" / "ss4d_blender" / "blender_manifest.toml").is_file()
    assert (extensions / "user_default" / "ss4d_blender" / "LICENSE").is_file()
    # Blender installed the bundled wheel itself (the compiled safetensors extension module)
    assert list(extensions.glob(".local/lib/python3*/site-packages/safetensors/_safetensors_rust*.so"))


def test_cuda_device_names_come_from_the_runtime(tmp_path):
    """The device list asks the runtime's PyTorch (here: a CPU build, so no CUDA device) and copes with a
    runtime that cannot answer."""
    assert runtime_env.cuda_device_names(sys.executable) == []
    fake = tmp_path / "fake_python"
    fake.write_text("#!/bin/sh\necho '[\"NVIDIA H100 80GB HBM3\", \"NVIDIA RTX 4090\"]'\n")
    fake.chmod(0o755)
    assert runtime_env.cuda_device_names(str(fake)) == ["NVIDIA H100 80GB HBM3", "NVIDIA RTX 4090"]
    broken = tmp_path / "broken_python"
    broken.write_text("#!/bin/sh\nexit 1\n")
    broken.chmod(0o755)
    assert runtime_env.cuda_device_names(str(broken)) is None
    assert runtime_env.cuda_device_names(str(tmp_path / "missing")) is None
