"""The Python environment the generator runs in (bpy-free, usable from the add-on and from tests).

Blender's own Python never gets torch (installing it there is behind most bug reports of peer add-ons).
Instead the add-on manages a virtual environment in its user directory, created from Blender's Python and
filled by pip with the PyTorch build for the machine (CUDA / CPU / Apple), on request from the preferences
(progress and a log file). The headless command and the tests use the current interpreter when it already
has the engine's dependencies.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

RUNTIME_PACKAGES = ["torch==2.13.0", "numpy==1.26.4", "safetensors==0.8.0", "huggingface_hub==2.4.0",
                    "tqdm==4.70.1", "pillow==13.0.0"]
TORCH_INDEX = {
    "cuda": "https://download.pytorch.org/whl/cu128",
    "cpu": "https://download.pytorch.org/whl/cpu",
    "apple": None,  # the PyPI wheel has MPS
}
_CHECKED: dict[str, bool] = {}


def env_python(env_dir: Path) -> Path:
    env_dir = Path(env_dir)
    return env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def has_engine_dependencies(python: str) -> bool:
    """True if `python` can import what the engine needs (checked once per interpreter)."""
    if python not in _CHECKED:
        try:
            ok = subprocess.run([python, "-c", "import torch, numpy, safetensors, huggingface_hub"],
                                capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        _CHECKED[python] = ok
    return _CHECKED[python]


_CUDA_PROBE = ("import json, torch; print(json.dumps([torch.cuda.get_device_name(i) for i in "
               "range(torch.cuda.device_count())] if torch.cuda.is_available() else []))")


def cuda_device_names(python: str, timeout: float = 60.0) -> Optional[list[str]]:
    """Names of the CUDA devices the runtime's PyTorch sees, in its index order (what `cuda:N` means
    to the worker); [] without CUDA; None when the runtime cannot be asked."""
    try:
        out = subprocess.run([python, "-c", _CUDA_PROBE], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    try:
        names = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


def find_runtime_python(preferred: str = "", env_dir: Optional[Path] = None) -> Optional[str]:
    """The interpreter to run the engine with: the one set in the preferences, else the managed
    environment, else the current interpreter if it has the dependencies; None if there is none."""
    candidates = []
    if preferred:
        candidates.append(preferred)
    if env_dir is not None and env_python(env_dir).is_file():
        candidates.append(str(env_python(env_dir)))
    candidates.append(sys.executable)
    for python in candidates:
        if python and Path(python).is_file() and has_engine_dependencies(python):
            return python
    return None


def default_flavour() -> str:
    if sys.platform == "darwin":
        return "apple"
    try:
        found = subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        found = False
    return "cuda" if found else "cpu"


def install_runtime(env_dir: Path, base_python: str = sys.executable, flavour: str = "cpu",
                    packages: Optional[list] = None, find_links: Optional[str] = None,
                    log_path: Optional[Path] = None, progress: Optional[Callable[[str], None]] = None,
                    should_stop: Optional[Callable[[], bool]] = None) -> Path:
    """Creates (or reuses) the environment and installs the packages; returns its python.
    find_links: a folder of wheels to install from without an index (offline install / tests).
    Raises RuntimeError with the log's last lines when pip fails; stops early if should_stop()."""
    env_dir = Path(env_dir)
    log_path = Path(log_path or env_dir.parent / "runtime-install.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    packages = list(packages or RUNTIME_PACKAGES)
    steps = []
    if not env_python(env_dir).is_file():
        steps.append(("Creating the environment", [base_python, "-m", "venv", str(env_dir)]))
    pip = [str(env_python(env_dir)), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
    if find_links:
        pip += ["--no-index", "--find-links", str(find_links)]
    elif TORCH_INDEX.get(flavour):
        pip += ["--extra-index-url", TORCH_INDEX[flavour]]
    steps.append((f"Installing {', '.join(p.split('==')[0] for p in packages)}", pip + packages))
    with open(log_path, "a") as log:
        for label, command in steps:
            if should_stop is not None and should_stop():
                raise RuntimeError("Installation cancelled.")
            if progress is not None:
                progress(label)
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            while proc.poll() is None:
                if should_stop is not None and should_stop():
                    proc.terminate()
                    proc.wait()
                    raise RuntimeError("Installation cancelled.")
                try:
                    proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    pass
            if proc.returncode != 0:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"{label} failed (see {log_path}): " + " | ".join(tail))
    _CHECKED.pop(str(env_python(env_dir)), None)
    return env_python(env_dir)
