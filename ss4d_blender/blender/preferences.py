"""Add-on preferences: device, precision, weights source, cache, runtime environment."""
from __future__ import annotations

import inspect
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import bpy
from bpy.props import EnumProperty, StringProperty

from .. import runtime_env
from ..engine import hub
from ..engine.background import matting_weights_status

ADDON_ID = __package__.rsplit(".", 1)[0]


# Blender needs the strings of dynamic enum items kept alive by Python: the items live here.
_DEVICE_ITEMS: list = []


class BackgroundValue:
    """Something slow to find out (a subprocess, files on disk), found on a thread and kept per key, so that
    draw functions only read stored state. `get(key)` returns what is known (None until the first answer)
    and asks again on a thread when nothing is known or the answer is older than `refresh_after(answer)`
    seconds. `compute(*key)` runs on that thread: plain data in and out, never bpy."""

    RETRY_SECONDS = 30.0     # after a question that failed

    def __init__(self, compute: Callable, refresh_after: Callable[[object], float]):
        self._compute, self._refresh_after = compute, refresh_after
        self._lock = threading.Lock()
        self._answers: dict = {}       # key -> (answer, time.monotonic() when found)
        self._threads: dict = {}       # key -> the thread asking

    def get(self, key):
        with self._lock:
            answer, found_at = self._answers.get(key, (None, None))
            max_age = self._refresh_after(answer) if answer is not None else self.RETRY_SECONDS
            stale = found_at is None or time.monotonic() - found_at > max_age
            asking = key in self._threads and self._threads[key].is_alive()
            if stale and not asking:
                thread = threading.Thread(target=self._ask, args=(key,), daemon=True)
                self._threads[key] = thread
                thread.start()
                _redraw_when_done(thread)
            return answer

    def _ask(self, key) -> None:
        try:
            answer = self._compute(*key)
        except Exception:  # noqa: BLE001 - a question that fails is asked again later; the UI shows what it knows
            answer = None
        with self._lock:
            self._answers[key] = (answer, time.monotonic())
            self._threads.pop(key, None)

    def wait(self, timeout: Optional[float] = None) -> None:
        """Waits for the questions under way (tests, and before reading an answer right after `get`)."""
        with self._lock:
            threads = list(self._threads.values())
        for thread in threads:
            thread.join(timeout)

    def forget(self) -> None:
        """Marks every answer as stale (kept until the new one arrives): after a download or an install."""
        with self._lock:
            self._answers = {key: (answer, float("-inf")) for key, (answer, _) in self._answers.items()}


def _redraw_when_done(thread: threading.Thread) -> None:
    """Redraws Blender's windows once `thread` ended (a timer on the main thread; never fires headless)."""
    def check():
        if thread.is_alive():
            return 0.25
        for window in getattr(bpy.context.window_manager, "windows", []):
            for area in window.screen.areas:
                area.tag_redraw()
        return None
    if not bpy.app.background:
        bpy.app.timers.register(check, first_interval=0.25)


@dataclass(frozen=True)
class RuntimeInfo:
    python: Optional[str]                 # the interpreter the worker runs with; None: no runtime yet
    cuda_names: Optional[tuple] = None    # CUDA devices as its PyTorch numbers them; None: not known


def _find_runtime(preferred_python: str, runtime_dir: str) -> RuntimeInfo:
    """Finds the runtime and asks its PyTorch for the CUDA devices (subprocesses: on a thread only)."""
    python = runtime_env.find_runtime_python(preferred_python, Path(runtime_dir))
    if python is None:
        return RuntimeInfo(None)
    names = runtime_env.cuda_device_names(python) if sys.platform != "darwin" else None
    return RuntimeInfo(python, tuple(names) if names is not None else None)


# the runtime, asked again every 30 s while none is installed
RUNTIME = BackgroundValue(_find_runtime, lambda info: 30.0 if info.python is None else float("inf"))
# whether each weights source is on disk, looked at again every 10 s while one is missing, else every minute
WEIGHTS_STATUS = BackgroundValue(
    lambda *source: hub.weights_status(*source), lambda lines: 60.0 if all(ready for ready, _ in lines) else 10.0)


# the learned matting models on disk, looked at again every 10 s while one is missing, else every minute
MATTING_STATUS = BackgroundValue(
    lambda *key: matting_weights_status(*key), lambda rows: 60.0 if all(ready for _, ready, _ in rows) else 10.0)


def matting_status(prefs) -> Optional[list[tuple[str, bool, str]]]:
    """[(quality, ready, line)] of the learned matting models (`background.matting_weights_status`), as last
    looked at on a thread; None until known."""
    return MATTING_STATUS.get((prefs.pipeline, prefs.cache_dir))


def runtime_info(prefs) -> Optional[RuntimeInfo]:
    """What is known about the runtime of these preferences (None: not known yet)."""
    return RUNTIME.get((prefs.python, str(runtime_directory())))


def device_items(cuda_names, platform: str = sys.platform) -> list:
    """Enum items: Auto, CPU, one per CUDA device (by name when the runtime has been asked, else a few
    numbered ones), Apple MPS on macOS."""
    items = [("auto", "Auto", "CUDA if available, else Apple MPS, else CPU"), ("cpu", "CPU", "")]
    if platform != "darwin":
        if cuda_names is None:
            count = int(os.environ.get("SS4D_CUDA_DEVICES", "4"))
            items += [(f"cuda:{i}", f"CUDA {i}", "") for i in range(count)]
        else:
            items += [(f"cuda:{i}", f"CUDA {i}: {name}", name) for i, name in enumerate(cuda_names)]
    else:
        items.append(("mps", "Apple MPS", "The Apple GPU"))
    return items


def _devices(self, context):
    info = runtime_info(self)
    _DEVICE_ITEMS[:] = device_items(info.cuda_names if info is not None else None)
    return _DEVICE_ITEMS


def user_directory() -> Path:
    try:
        return Path(bpy.utils.extension_path_user(ADDON_ID, create=True))
    except (ValueError, AttributeError, RuntimeError):  # legacy add-on or headless module
        return Path(bpy.utils.user_resource("SCRIPTS", path="ss4d", create=True))


def runtime_directory() -> Path:
    return user_directory() / "runtime"


def get(context=None):
    """The add-on preferences, or `HEADLESS` when the add-on is not enabled as an extension."""
    context = context or bpy.context
    addon = context.preferences.addons.get(ADDON_ID)
    return addon.preferences if addon else HEADLESS


def online_access(context=None) -> bool:
    """May the add-on use the network? Inside Blender: the user's *Allow Online Access* setting (extensions
    must respect it); for the headless command: `HEADLESS.online_access` (on; HF_HUB_OFFLINE still applies)."""
    prefs = get(context)
    return prefs.online_access if prefs is HEADLESS else bool(bpy.app.online_access)


def weights_status(prefs) -> Optional[list[tuple[bool, str]]]:
    """Whether each weights source generation needs is on disk: [(ready, line)], as last looked at on a
    thread (files only, no network); None until known."""
    return WEIGHTS_STATUS.get((prefs.pipeline, prefs.revision, prefs.mesh_decoder, prefs.cache_dir))


class SS4D_AddonPreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    device: EnumProperty(name="Device", items=_devices)
    precision: EnumProperty(name="Precision", default="auto", items=[
        ("auto", "Auto", "fp16 on GPUs (as the reference runs), fp32 on the CPU"), ("fp32", "fp32", ""),
        ("fp16", "fp16", ""), ("bf16", "bf16", "Wider range, less precise than fp16")])
    pipeline: StringProperty(name="SS4D Weights", default=hub.SS4D_REPO,
                             description="Hugging Face repository id, or a local folder in the official layout")
    revision: StringProperty(name="Revision", default="", description="Commit or branch to pin (empty = default)")
    mesh_decoder: StringProperty(name="Mesh Decoder", default="auto",
                                 description="'auto' (TRELLIS-image-large), 'none' (meshes from the Gaussians), "
                                             "a repository id or a folder")
    cache_dir: StringProperty(name="Cache Folder", subtype="DIR_PATH", default="",
                              description="Where downloaded weights are kept (empty = the standard Hugging Face cache)")
    python: StringProperty(name="Runtime Python", subtype="FILE_PATH", default="",
                           description="Python with PyTorch to run the generator (empty = the managed runtime)")
    runtime_flavour: EnumProperty(name="PyTorch Build", default="cpu", items=[
        ("cuda", "NVIDIA CUDA", ""), ("cpu", "CPU only", ""), ("apple", "Apple (MPS)", "")])
    status: StringProperty(default="", options={"SKIP_SAVE"})

    def draw(self, context):
        layout = self.layout
        col = layout.column()
        col.prop(self, "device")
        col.prop(self, "precision")
        box = layout.box()
        box.label(text="Weights")
        box.prop(self, "pipeline")
        box.prop(self, "revision")
        box.prop(self, "mesh_decoder")
        box.prop(self, "cache_dir")
        status = weights_status(self)
        if status is None:
            box.label(text="Looking for the weights...", icon="TIME")
        for ready, line in status or []:
            box.label(text=line, icon="CHECKMARK" if ready else "ERROR")
        row = box.row()
        row.operator("ss4d.download_weights", icon="IMPORT")
        if bpy.app.online_access is False:
            box.label(text="Online access is disabled in Blender's preferences: use a local folder.", icon="INFO")
        draw_matting_weights(self, layout)
        box = layout.box()
        box.label(text="Runtime (PyTorch)")
        info = runtime_info(self)
        if info is None:
            box.label(text="Looking for the runtime...", icon="TIME")
        elif info.python:
            box.label(text=f"Using: {info.python}", icon="CHECKMARK")
        else:
            box.label(text="Not installed yet", icon="ERROR")
        box.prop(self, "runtime_flavour")
        box.prop(self, "python")
        box.operator("ss4d.install_runtime", icon="CONSOLE")
        if self.status:
            layout.label(text=self.status)


def draw_matting_weights(prefs, layout) -> None:
    """The learned matting models (Matting: Learned / Automatic): on disk or not, size, Download."""
    box = layout.box()
    box.label(text="Matting Weights (BiRefNet, MIT licence)")
    rows = matting_status(prefs)
    if rows is None:
        box.label(text="Looking for the matting weights...", icon="TIME")
    for quality, ready, line in rows or []:
        row = box.row()
        row.label(text=line, icon="CHECKMARK" if ready else "ERROR")
        if not ready:
            row.operator("ss4d.download_matting_weights", text="Download", icon="IMPORT").quality = quality
    if bpy.app.online_access is False:
        box.label(text="Online access is disabled in Blender's preferences: Download is unavailable.", icon="INFO")


def property_defaults(cls) -> dict:
    """The default of every property a Blender class declares (an enum without one: its first item)."""
    defaults = {}
    for name, prop in inspect.get_annotations(cls, eval_str=True).items():
        keywords = getattr(prop, "keywords", {})
        if "default" in keywords:
            defaults[name] = keywords["default"]
        elif prop.function is EnumProperty:
            items = keywords["items"]
            defaults[name] = (items if isinstance(items, list) else device_items(None))[0][0]
    return defaults


class HeadlessPreferences(SimpleNamespace):
    """Stands in for the add-on preferences when the package is registered directly (the headless
    command, tests): the same fields with the same defaults, set from the command line."""

    def __init__(self, **changes):
        # the headless command was started on purpose by the user: downloads follow HF_HUB_OFFLINE only
        super().__init__(**{**property_defaults(SS4D_AddonPreferences), "online_access": True, **changes})


HEADLESS = HeadlessPreferences()

CLASSES = (SS4D_AddonPreferences,)


def register():
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister():
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
