"""The exact frames a sequencer strip shows, as uint8 RGBA arrays (sRGB, straight alpha).

Blender's own sequencer renders them: whatever the strip does (trims, offsets, speed, the scene frame
rate, crop/transform, colour space) is what we get, with no second video decoder to disagree with it.
For the duration of the extraction every other strip is muted and the view transform is 'Standard'
(so the PNG holds plain sRGB), then everything is restored - including removing the 'Render Result'
image if it did not exist before. Frames are rendered to a temporary folder and read back.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import threading

import bpy
import numpy as np

from ..engine.errors import Cancelled, InputError

STRIP_TYPES = {"MOVIE", "IMAGE"}
# set from another thread or a signal handler (the headless command's Ctrl-C) to stop an extraction at its
# next frame; whoever starts an extraction that may be stopped clears it first
STOP = threading.Event()


def sequencer_strips(scene):
    editor = scene.sequence_editor
    if editor is None:
        return []
    return list(getattr(editor, "strips_all", None) or getattr(editor, "sequences_all", []))


def active_strip(scene):
    """The active movie or image strip, or an InputError saying what to select."""
    editor = scene.sequence_editor
    strip = None
    if editor is not None:
        strip = getattr(editor, "active_strip", None)
    if strip is None:
        raise InputError("No strip selected. In the Video Sequencer, click the movie or image strip to use.")
    if strip.type not in STRIP_TYPES:
        raise InputError(f"The active strip '{strip.name}' is a {strip.type.lower()} strip; select a movie or "
                         f"image strip.")
    return strip


def strip_range(strip) -> tuple[int, int]:
    """Scene frames the strip shows: [start, end] inclusive."""
    return int(strip.frame_final_start), int(strip.frame_final_end) - 1


def pick_frames(start: int, end: int, count: int) -> list[int]:
    """`count` scene frames spread evenly over [start, end] (first and last included)."""
    total = end - start + 1
    if total < 2:
        raise InputError("The frame range holds fewer than 2 frames; at least 2 are needed to generate motion.")
    if count >= total:
        return list(range(start, end + 1))
    if count < 2:
        raise InputError("Generate at least 2 frames.")
    return [start + int(i * (total - 1) / (count - 1) + 0.5) for i in range(count)]


def every_frame(start: int, end: int, step: int = 1) -> list[int]:
    """Every `step`-th scene frame of [start, end] from `start` on, however long the range (a long range is
    generated in overlapping windows)."""
    if step < 1:
        raise InputError(f"The frame step must be 1 (every frame) or more, got {step}.")
    frames = list(range(start, end + 1, step))
    if len(frames) < 2:
        raise InputError(f"Frames {start}-{end} with a step of {step} give fewer than 2 frames; at least 2 are "
                         f"needed to generate motion.")
    return frames


@contextlib.contextmanager
def _isolated_render(scene, strip, folder):
    render, image_settings, view = scene.render, scene.render.image_settings, scene.view_settings
    saved = {
        "frame": scene.frame_current, "filepath": render.filepath, "use_sequencer": render.use_sequencer,
        "use_compositing": render.use_compositing, "format": image_settings.file_format,
        "color_mode": image_settings.color_mode, "color_depth": image_settings.color_depth,
        "view": view.view_transform, "look": view.look, "exposure": view.exposure, "gamma": view.gamma,
        "use_curve": view.use_curve_mapping,
    }
    muted = [(s, s.mute) for s in sequencer_strips(scene) if s != strip]
    had_render_result = "Render Result" in bpy.data.images
    try:
        for s, _ in muted:
            s.mute = True
        render.use_sequencer, render.use_compositing = True, False
        image_settings.file_format, image_settings.color_mode, image_settings.color_depth = "PNG", "RGBA", "8"
        view.view_transform, view.look, view.exposure = "Standard", "None", 0.0
        view.gamma, view.use_curve_mapping = 1.0, False
        yield
    finally:
        for s, was in muted:
            s.mute = was
        render.use_sequencer, render.use_compositing = saved["use_sequencer"], saved["use_compositing"]
        image_settings.file_format, image_settings.color_mode = saved["format"], saved["color_mode"]
        image_settings.color_depth = saved["color_depth"]
        view.view_transform, view.look, view.exposure = saved["view"], saved["look"], saved["exposure"]
        view.gamma, view.use_curve_mapping = saved["gamma"], saved["use_curve"]
        render.filepath = saved["filepath"]
        scene.frame_current = saved["frame"]
        if not had_render_result and "Render Result" in bpy.data.images:
            bpy.data.images.remove(bpy.data.images["Render Result"])


def read_png(path: str) -> np.ndarray:
    """PNG -> uint8 [H, W, 4] top row first, through a temporary image datablock (removed again)."""
    image = bpy.data.images.load(path, check_existing=False)
    try:
        w, h = image.size
        if w == 0 or h == 0:
            raise InputError(f"Could not decode the frame rendered from the strip ({path}).")
        pixels = np.empty(w * h * 4, np.float32)
        image.pixels.foreach_get(pixels)
    finally:
        bpy.data.images.remove(image)
    return (np.clip(pixels.reshape(h, w, 4)[::-1], 0, 1) * 255 + 0.5).astype(np.uint8)


def extract_frames(scene, strip, frames: list[int], progress=None) -> np.ndarray:
    """Renders the strip alone at each scene frame -> uint8 [T, H, W, 4] (render resolution)."""
    unreadable = getattr(strip, "frame_duration", 1) <= 1 and not os.path.isfile(bpy.path.abspath(strip.filepath))
    if strip.type == "MOVIE" and unreadable:
        raise InputError(f"The video file of strip '{strip.name}' cannot be read: {strip.filepath}")
    out = []
    with tempfile.TemporaryDirectory(prefix="ss4d_frames_") as folder, _isolated_render(scene, strip, folder):
        for i, f in enumerate(frames):
            if STOP.is_set():
                raise Cancelled()
            scene.frame_current = f
            scene.render.filepath = os.path.join(folder, f"frame_{i:04d}.png")
            bpy.ops.render.render(write_still=True)
            if not os.path.isfile(scene.render.filepath):
                raise InputError(f"Blender could not render frame {f} of strip '{strip.name}'.")
            out.append(read_png(scene.render.filepath))
            if progress is not None:
                progress((i + 1) / len(frames))
    frames_rgba = np.stack(out)
    if frames_rgba[..., :3].max() == 0 and frames_rgba[..., 3].max() == 0:
        raise InputError(f"The strip '{strip.name}' shows nothing at the chosen frames (is the file missing or "
                         f"the video undecodable?).")
    return frames_rgba
