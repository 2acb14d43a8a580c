"""Preview Matte's output: the matted frames as an image-sequence strip in a new channel above the source.

Why an image strip: it is the sequencer's own way to show frames that exist as files. It plays, scrubs and
caches like any strip, lines up with the source on the timeline, can be muted or deleted, and adding it is
one undo step - while the source strip is never modified. The frames are PNGs (straight alpha) in a folder
next to the saved .blend (`<blend>_ss4d_matte/`), or in the add-on's user folder for an unsaved file. The
strip replaces what is below it in the preview ('Replace' blending), so the cut-out shows against the
preview's background instead of the source.

Only the frames the panel picks are matted (the frames Generate 4D would use); between two of them the strip
holds the earlier one, so every element sits at the scene frame it was made from.
"""
from __future__ import annotations

import shutil
import struct
import time
import zlib
from pathlib import Path

import bpy
import numpy as np

from ..engine.errors import SS4DError
from . import frames as frame_source
from . import preferences

PREVIEW_KEY = "ss4d_matte_preview"  # custom property of a preview strip: the folder of its PNGs


def write_png(path: Path, rgba: np.ndarray) -> None:
    """uint8 [H, W, 4] (top row first) -> an 8-bit RGBA PNG, without datablocks or third-party packages."""
    h, w = rgba.shape[:2]
    rows = np.concatenate([np.zeros((h, 1), np.uint8), np.ascontiguousarray(rgba).reshape(h, w * 4)], axis=1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0)  # 8 bits, colour type 6 = RGBA
    pixels = zlib.compress(rows.tobytes(), 6)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def preview_folder(strip_name: str) -> Path:
    """A new folder for one preview: next to the saved .blend, else in the add-on's user folder."""
    name = f"{bpy.path.clean_name(strip_name)}_{time.strftime('%Y%m%d_%H%M%S')}"
    if bpy.data.filepath:
        blend = Path(bpy.data.filepath)
        root = blend.parent / f"{blend.stem}_ss4d_matte"
    else:
        root = preferences.user_directory() / "matte_previews"
    folder, n = root / name, 1
    while folder.exists():
        n += 1
        folder = root / f"{name}_{n}"
    folder.mkdir(parents=True)
    return folder


def free_channel_above(scene, source, first: int, last: int) -> int:
    """The lowest channel above `source` with no strip over the scene frames first..last."""
    taken = {s.channel for s in frame_source.sequencer_strips(scene)
             if s != source and s.frame_final_start <= last and s.frame_final_end > first}
    channel = source.channel + 1
    while channel in taken:
        channel += 1
    return channel


def add_preview_strip(scene, source, frames_rgba: np.ndarray, scene_frames: list[int]):
    """Writes `frames_rgba` (uint8 [T, H, W, 4], made at `scene_frames`) as PNGs and adds an image strip
    showing them from the first to the last of those frames, in a new channel above `source`. On failure
    nothing is left: no strip, no folder (a file error is an SS4DError). Returns the strip."""
    folder = preview_folder(source.name)
    strip = None
    try:
        names = []
        for i, (frame, rgba) in enumerate(zip(scene_frames, frames_rgba)):
            names.append(f"matte_{i:04d}_f{frame:05d}.png")
            write_png(folder / names[-1], rgba)
        first, last = scene_frames[0], scene_frames[-1]
        editor = scene.sequence_editor_create()
        channel = free_channel_above(scene, source, first, last)
        strip = editor.strips.new_image(f"{source.name} matte", str(folder / names[0]), channel=channel,
                                        frame_start=first)
        shown = 0
        for frame in range(first + 1, last + 1):  # each scene frame shows the latest matted frame
            while shown + 1 < len(scene_frames) and scene_frames[shown + 1] <= frame:
                shown += 1
            strip.elements.append(names[shown])
        strip.blend_type = "REPLACE"
        strip[PREVIEW_KEY] = bpy.path.relpath(str(folder)) if bpy.data.filepath else str(folder)
        return strip
    except BaseException as err:
        if strip is not None:
            scene.sequence_editor.strips.remove(strip)
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(err, OSError):
            raise SS4DError(f"The matte preview could not be written to {folder} ({err}).") from err
        raise
