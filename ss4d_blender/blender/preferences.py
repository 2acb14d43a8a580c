"""Add-on preferences: device, precision, weights source, cache, runtime environment."""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import bpy
from bpy.props import EnumProperty, StringProperty

from .. import runtime_env
from ..engine import hub

ADDON_ID = __package__.rsplit(".", 1)[0]


# Blender needs the strings of dynamic enum items kept alive by Python: the items live here.
_DEVICE_ITEMS: list = []
# CUDA devices as the runtime's PyTorch numbers them, asked once in the background (None: not known yet)
_cuda_names: dict = {"names": None, "probing": False, "asked_at": -1e9}


def _probe_cuda(preferred_python: str, runtime_dir: Path) -> None:
    """Background thread (never touches bpy): finds the runtime and asks its PyTorch for the devices."""
    python = runtime_env.find_runtime_python(preferred_python, runtime_dir)
    names = runtime_env.cuda_device_names(python) if python is not None else None
    _cuda_names["names"] = names  # None (no runtime yet): asked again once one is installed
    _cuda_names["probing"] = False


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
    if (_cuda_names["names"] is None and not _cuda_names["probing"] and sys.platform != "darwin"
            and time.monotonic() - _cuda_names["asked_at"] > 30.0):   # no runtime yet: ask again later
        _cuda_names["probing"], _cuda_names["asked_at"] = True, time.monotonic()
        threading.Thread(target=_probe_cuda, args=(getattr(self, "python", ""), runtime_directory()),
                         daemon=True).start()
    _DEVICE_ITEMS[:] = device_items(_cuda_names["names"])
    return _DEVICE_ITEMS


def user_directory() -> Path:
    try:
        return Path(bpy.utils.extension_path_user(ADDON_ID, create=True))
    except (ValueError, AttributeError, RuntimeError):  # legacy add-on or headless module
        return Path(bpy.utils.user_resource("SCRIPTS", path="ss4d", create=True))


def runtime_directory() -> Path:
    return user_directory() / "runtime"


@dataclass
class HeadlessPreferences:
    """Stands in for the add-on preferences when the package is registered directly (the headless
    command, tests): same fields, set from the command line."""

    device: str = "auto"
    precision: str = "auto"
    pipeline: str = "lizb6626/SS4D"
    revision: str = ""
    mesh_decoder: str = "auto"
    cache_dir: str = ""
    python: str = ""
    runtime_flavour: str = "cpu"
    status: str = ""
    # the headless command was started on purpose by the user: downloads follow HF_HUB_OFFLINE only
    online_access: bool = True


HEADLESS = HeadlessPreferences()


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


def weights_status(prefs) -> list[tuple[bool, str]]:
    """Whether each weights source generation needs is on disk: [(ready, line)] (files only, no network)."""
    return hub.weights_status(prefs.pipeline, prefs.revision, prefs.mesh_decoder, prefs.cache_dir)


class SS4D_AddonPreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    device: EnumProperty(name="Device", items=_devices)
    precision: EnumProperty(name="Precision", default="auto", items=[
        ("auto", "Auto", "fp16 on GPUs (as the reference runs), fp32 on the CPU"), ("fp32", "fp32", ""),
        ("fp16", "fp16", ""), ("bf16", "bf16", "Wider range, less precise than fp16")])
    pipeline: StringProperty(name="SS4D Weights", default="lizb6626/SS4D",
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
        for ready, line in weights_status(self):
            box.label(text=line, icon="CHECKMARK" if ready else "ERROR")
        row = box.row()
        row.operator("ss4d.download_weights", icon="IMPORT")
        if bpy.app.online_access is False:
            box.label(text="Online access is disabled in Blender's preferences: use a local folder.", icon="INFO")
        box = layout.box()
        box.label(text="Runtime (PyTorch)")
        python = runtime_env.find_runtime_python(self.python, runtime_directory())
        box.label(text=f"Using: {python}" if python else "Not installed yet", icon="CHECKMARK" if python else "ERROR")
        box.prop(self, "runtime_flavour")
        box.prop(self, "python")
        box.operator("ss4d.install_runtime", icon="CONSOLE")
        if self.status:
            layout.label(text=self.status)


CLASSES = (SS4D_AddonPreferences,)


def register():
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister():
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
