"""Builds the installable Blender extension: one .zip per platform in dist/.

    .venv/bin/python build_addon.py [--platform linux-x64 ...] [--wheels-dir DIR] [--out dist]

Each zip holds the add-on package at its root (the extension's module) without its test-only `testing/`
package, the manifest with that platform and the wheels it lists, those wheels under wheels/, and the
LICENSE. Blender installs listed wheels into its own Python
(shared by every extension), so the list is kept to what the Blender side itself imports beyond Blender's
bundled numpy: `safetensors` (abi3: one wheel serves Python 3.11 and 3.13), used to read the result file's
metadata. PyTorch is not bundled: it is large, differs per GPU vendor, and must not go into Blender's
Python; the add-on's 'Install Runtime' button installs it into the extension's own environment.

Wheels come from PyPI (`pip download --only-binary=:all: --platform ...`) into wheels/, or from
`--wheels-dir` (offline builds, tests).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PACKAGE = ROOT / "ss4d_blender"
MANIFEST = ROOT / "addon_manifest" / "blender_manifest.toml"
LICENSE = ROOT / "LICENSE"  # GPL-3.0-or-later, as the manifest declares; shipped at the zip's root
BLENDER_WHEELS = ["safetensors==0.8.0"]
PLATFORM_TAGS = {  # Blender platform -> pip platform tags accepted for it
    "windows-x64": ["win_amd64"],
    "linux-x64": ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64"],
    "macos-arm64": ["macosx_11_0_arm64", "macosx_12_0_arm64"],
}
WHEEL_PLATFORM = {"windows-x64": "win_amd64", "linux-x64": "manylinux", "macos-arm64": "macosx"}
EXCLUDE = re.compile(r"(__pycache__|\.pyc$|^testing/)")  # testing/: parity runners, synthetic motions (dev only)


def download_wheels(platform: str, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps", "--dest", str(dest),
           "--python-version", "3.11", "--implementation", "cp"]
    for tag in PLATFORM_TAGS[platform]:
        cmd += ["--platform", tag]
    subprocess.run(cmd + BLENDER_WHEELS, check=True)


def wheels_for(platform: str, folder: Path) -> list[Path]:
    """The wheels of BLENDER_WHEELS for a platform found in folder (error if one is missing)."""
    found = []
    for requirement in BLENDER_WHEELS:
        name, version = requirement.split("==")
        stem = f"{name.replace('-', '_')}-{version}-"
        matches = [w for w in folder.glob("*.whl") if w.name.startswith(stem)
                   and (WHEEL_PLATFORM[platform] in w.name or w.name.endswith("-none-any.whl"))]
        if not matches:
            raise SystemExit(f"error: no {requirement} wheel for {platform} in {folder}")
        found.append(sorted(matches)[-1])
    return found


def manifest_for(platform: str, wheels: list[Path]) -> str:
    text = MANIFEST.read_text()
    text = re.sub(r"^platforms = .*$", f'platforms = ["{platform}"]', text, flags=re.M)
    listed = ", ".join(f'"./wheels/{w.name}"' for w in wheels)
    return re.sub(r"^wheels = .*$", f"wheels = [{listed}]", text, flags=re.M)


def build(platform: str, wheel_folder: Path, out: Path) -> Path:
    import tomllib

    wheels = wheels_for(platform, wheel_folder)
    manifest = manifest_for(platform, wheels)
    tomllib.loads(manifest)  # must stay valid TOML
    version = re.search(r'^version = "([^"]+)"', manifest, re.M).group(1)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"ss4d_blender-{version}-{platform}.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("blender_manifest.toml", manifest)
        z.write(LICENSE, "LICENSE")
        for path in sorted(PACKAGE.rglob("*")):
            name = path.relative_to(PACKAGE).as_posix()
            if path.is_file() and not EXCLUDE.search(name):
                z.write(path, name)
        for wheel in wheels:
            z.write(wheel, f"wheels/{wheel.name}")
    return target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--platform", action="append", choices=list(PLATFORM_TAGS), help="default: all")
    p.add_argument("--wheels-dir", type=Path, default=None, help="use these wheels instead of downloading")
    p.add_argument("--out", type=Path, default=ROOT / "dist")
    a = p.parse_args(argv)
    for platform in a.platform or list(PLATFORM_TAGS):
        folder = a.wheels_dir
        if folder is None:
            folder = ROOT / "wheels" / platform
            download_wheels(platform, folder)
        print(build(platform, folder, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
