"""Sidebar panels (tab "SS4D") in the Video Sequencer and the 3D viewport."""
from __future__ import annotations

import json
import re

import bpy

from ..engine.errors import SS4DError
from ..engine.types import frame_list
from . import frames as frame_source
from . import preferences


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def first_sentence(message: str) -> str:
    """The first sentence of a message, for a one-line label: it ends at a full stop followed by a space
    (a file name such as 'music.wav' does not end it)."""
    return _SENTENCE_END.split(message.strip(), maxsplit=1)[0]


def _draw_source(layout, context):
    scene = context.scene
    try:
        strip = frame_source.active_strip(scene)
    except SS4DError as err:
        layout.label(text=first_sentence(str(err)), icon="ERROR")
        return False
    start, end = frame_source.strip_range(strip)
    layout.label(text=f"{strip.name}  ({strip.type.lower()}, frames {start}-{end})", icon="SEQUENCE")
    return True


def _draw_settings(layout, context):
    s = context.scene.ss4d
    col = layout.column(align=True)
    col.prop(s, "use_strip_range")
    if not s.use_strip_range:
        row = col.row(align=True)
        row.prop(s, "frame_start")
        row.prop(s, "frame_end")
    col.row(align=True).prop(s, "frame_choice", expand=True)
    col.prop(s, "num_frames" if s.frame_choice == "COUNT" else "frame_step")
    row = col.row(align=True)
    row.prop(s, "window")
    row.prop(s, "overlap")
    box = layout.box()
    box.prop(s, "matting")
    if s.matting in ("AUTO", "LEARNED"):
        box.prop(s, "matting_quality", expand=True)
    if s.matting == "CHROMA":
        box.prop(s, "auto_key_color")
        if not s.auto_key_color:
            box.prop(s, "key_color")
        box.prop(s, "tolerance")
        box.prop(s, "softness")
    box.operator("ss4d.preview_matte", icon="IMAGE_ALPHA")
    col = layout.column(align=True)
    col.prop(s, "seed")
    col.prop(s, "steps")
    col.prop(s, "guidance")
    col = layout.column(align=True)
    col.prop(s, "target_vertices")
    col.prop(s, "auto_reference")
    if not s.auto_reference:
        col.prop(s, "reference_frame")
    col.prop(s, "smoothing")
    col = layout.column(align=True)
    col.prop(s, "height")
    col.prop(s, "collection")
    layout.prop(s, "timeline", expand=True)


def _draw_run(layout, context):
    s = context.scene.ss4d
    if s.running:
        layout.progress(factor=s.progress, type="BAR", text=f"{s.stage} {s.progress:.0%}")
        layout.operator("ss4d.cancel", icon="CANCEL")
    else:
        prefs = preferences.get(context)
        runtime = preferences.runtime_info(prefs)
        if runtime is not None and runtime.python is None:
            layout.label(text="PyTorch runtime not installed: Preferences > Add-ons > SS4D > Install Runtime",
                         icon="ERROR")
        missing = [line for ready, line in preferences.weights_status(prefs) or [] if not ready]
        if missing:
            layout.label(text="Weights not on disk: Preferences > Add-ons > SS4D > Download Weights", icon="ERROR")
            for line in missing:
                layout.label(text=line)
        if context.scene.ss4d.matting == "LEARNED" and not _matting_weights_ready(context):
            layout.label(text="Matting weights not on disk: Preferences > Add-ons > SS4D > Matting Weights",
                         icon="ERROR")
        layout.operator("ss4d.generate", icon="PLAY")
        obj = context.active_object
        if obj is not None and "ss4d_result_file" in obj.keys():
            layout.operator("ss4d.rebuild_mesh", icon="FILE_REFRESH")
            _draw_result_info(layout, obj)
    if s.last_message:
        layout.label(text=s.last_message, icon="INFO")


def _matting_weights_ready(context) -> bool:
    """Whether the learned matting the panel asks for is on disk (True while not known yet)."""
    rows = preferences.matting_status(preferences.get(context))
    if rows is None:
        return True
    wanted = {"pipeline", context.scene.ss4d.matting_quality.lower()}
    return any(ready for quality, ready, _ in rows if quality in wanted)


_result_info_cache: dict = {}


def result_info(path: str):
    """Header of a result file (via the bundled safetensors wheel), cached per path; None if unreadable."""
    if path not in _result_info_cache:
        try:
            from ..engine.result import read_metadata
            _result_info_cache[path] = read_metadata(bpy.path.abspath(path))
        except Exception:  # noqa: BLE001 - missing file or wheel: the panel just shows less
            _result_info_cache[path] = None
    return _result_info_cache[path]


def _draw_result_info(layout, obj):
    info = result_info(obj["ss4d_result_file"])
    if info is None:
        layout.label(text="Generation result file not found: Rebuild is unavailable.", icon="ERROR")
        return
    settings = info["settings"]
    layout.label(text=f"{info['num_frames']} frames, seed {settings.get('seed', '?')}, {settings.get('device', '')}")
    if info["is_random_weights"]:
        layout.label(text="Random-weight test pipeline: the shape is noise.", icon="ERROR")
    bad = json.loads(obj.get("ss4d_bad_frames", "[]"))
    if bad:
        layout.label(text=f"Poor fit: {frame_list(bad, limit=8)}", icon="ERROR")


class _SS4DPanel:
    bl_region_type = "UI"
    bl_category = "SS4D"
    bl_label = "SS4D Generate 4D"

    def draw(self, context):
        layout = self.layout
        _draw_source(layout, context)
        _draw_settings(layout, context)
        _draw_run(layout, context)


class SS4D_PT_sequencer(_SS4DPanel, bpy.types.Panel):
    bl_space_type = "SEQUENCE_EDITOR"
    bl_idname = "SS4D_PT_sequencer"


class SS4D_PT_view3d(_SS4DPanel, bpy.types.Panel):
    bl_space_type = "VIEW_3D"
    bl_idname = "SS4D_PT_view3d"


CLASSES = (SS4D_PT_sequencer, SS4D_PT_view3d)


def register():
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister():
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
