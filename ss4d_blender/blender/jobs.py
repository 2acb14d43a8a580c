"""The jobs behind the operators, without operator or UI code: prepare in Blender, run in the worker, finish
back in Blender.

`generate_job` reads the active strip's frames and mattes them (fast, needs bpy); `rebuild_job` points at the
saved result of an SS4D object, whose mesh the `animate` stage builds again. Either way the worker process
(`engine.worker`, its own Python with PyTorch) does the heavy part, and `Job.finish` builds or replaces the
object from its output and places the result file next to the .blend. The download and install tasks of the
preferences are here too: plain functions that run on a thread, never touch bpy, and report through a
`TaskStatus`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import bpy
import numpy as np

from .. import runtime_env
from ..engine.background import source_has_alpha
from ..engine.errors import InputError, SS4DError
from ..engine.matting import alpha_from_source, chroma_key
from ..engine.windows import cache_folder_for
from ..engine.worker import WorkerClient
from . import frames as frame_source
from . import preferences, scene_build

OFFLINE_MESSAGE = ("Online access is disabled in Blender (Preferences > System > Network > Allow Online Access). "
                   "Allow it to download the weights, or set 'SS4D Weights' to a local folder.")


# ---------------------------------------------------------------------------------------------- settings

def weights_settings(prefs) -> dict:
    """Where the weights come from, as the user set it in the preferences (the add-on's or
    `preferences.HEADLESS`). The engine's settings class turns the user's spellings ("" for the default,
    "none" for no mesh decoder) into its own values."""
    return {"pipeline": prefs.pipeline, "revision": prefs.revision, "mesh_decoder": prefs.mesh_decoder,
            "cache_dir": bpy.path.abspath(prefs.cache_dir) if prefs.cache_dir else ""}


def engine_settings(context, matting: str = "alpha") -> dict:
    """The generation settings the user chose (preferences and the scene's SS4D panel), for
    `GenerateSettings.from_user`: values as the user spells them, the engine's defaults stay in the engine.
    matting: what the engine still does ("alpha": the frames were matted in Blender; "learned": BiRefNet)."""
    p, s = preferences.get(context), context.scene.ss4d
    return {**weights_settings(p), "seed": s.seed, "steps": s.steps, "cfg": s.guidance, "device": p.device,
            "precision": p.precision, "window": s.window, "overlap": s.overlap, "matting": matting,
            "matting_quality": s.matting_quality.lower(),
            "step": 1}   # Blender renders only the frames to generate (`_picked_frames` applies the panel's Step)


def animate_settings(context, scene_frames: list[int]) -> dict:
    """Arguments of the `animate` stage. The reference is a timeline frame in the UI, the nearest generated
    frame's index for the engine; the device is the preferences' (`animate` runs on the CPU for MPS)."""
    s = context.scene.ss4d
    reference = None
    if not s.auto_reference:
        reference = min(range(len(scene_frames)), key=lambda i: abs(scene_frames[i] - s.reference_frame))
    return {"target_vertices": s.target_vertices, "reference_frame": reference, "temporal_smoothing": s.smoothing,
            "device": preferences.get(context).device}


# ---------------------------------------------------------------------------------------------- the worker

def runtime_python(context) -> str:
    p = preferences.get(context)
    python = runtime_env.find_runtime_python(p.python, preferences.runtime_directory())
    if python is None:
        raise SS4DError("The PyTorch runtime is not installed. Open Preferences > Add-ons > SS4D and click "
                        "'Install Runtime' (or set 'Runtime Python' to a Python with PyTorch).")
    return python


def worker_environment(context) -> dict:
    """The worker's environment: Blender's, plus HF_HUB_OFFLINE=1 when online access is not allowed, so
    the engine never touches the network then (missing weights become a clear 'offline' error)."""
    environment = dict(os.environ)
    if not preferences.online_access(context):
        environment["HF_HUB_OFFLINE"] = "1"
    return environment


# where the headless command keeps its window caches (its .blend is written in a staging folder that a cancel
# removes); None: beside the .blend
WINDOW_CACHE_FOLDER: Optional[Path] = None


def window_cache_folder(strip_name: str) -> Path:
    """Where a long clip's finished windows wait until the run succeeds: beside the .blend (or in the add-on's
    user folder while the .blend is unsaved), one folder per strip, outliving the job folder, so Generate 4D
    with the same settings continues after a cancel."""
    if WINDOW_CACHE_FOLDER is not None:
        return WINDOW_CACHE_FOLDER
    name = bpy.path.clean_name(strip_name or "SS4D")
    if bpy.data.filepath:
        blend = Path(bpy.data.filepath)
        return cache_folder_for(blend.parent / f"{blend.stem}_{name}_ss4d")
    return cache_folder_for(preferences.user_directory() / "windows" / name)


def mesh_cache_path(obj_name: str) -> str:
    """A new .pc2 file for the Mesh Cache timeline: ss4d_cache/<object>.pc2 beside the .blend (a relative
    path, so the project can move), or in the add-on's user folder while the .blend is unsaved. An existing
    file (another object's, or the one a rebuilt object still uses) is never overwritten."""
    blend = Path(bpy.data.filepath) if bpy.data.filepath else None
    folder = blend.parent / "ss4d_cache" if blend else preferences.user_directory() / "ss4d_cache"
    name = bpy.path.clean_name(obj_name)
    path, n = folder / f"{name}.pc2", 1
    while path.exists():
        n += 1
        path = folder / f"{name}_{n}.pc2"
    return f"//ss4d_cache/{path.name}" if blend else str(path)


def animation_summary(obj) -> str:
    """'240 shape keys' or 'a Mesh Cache (//ss4d_cache/SS4D_clip.pc2)': how the object's animation is stored."""
    if obj.data.shape_keys is not None:
        return f"{len(obj.data.shape_keys.key_blocks) - 1} shape keys"
    caches = [m.filepath for m in obj.modifiers if m.type == "MESH_CACHE"]
    return f"a Mesh Cache ({caches[0]})" if caches else "no animation"


def result_destination(obj_name: str) -> Path:
    """Where the engine result file of an object is kept: next to the .blend when it is saved."""
    name = bpy.path.clean_name(obj_name)
    if bpy.data.filepath:
        blend = Path(bpy.data.filepath)
        return blend.parent / f"{blend.stem}_{name}_ss4d.safetensors"
    return preferences.user_directory() / "results" / f"{name}_{int(time.time())}.safetensors"


# ---------------------------------------------------------------------------------------------- jobs

class Job:
    """One run: prepared in Blender, executed by the worker, finished back in Blender.

    kind: "generate" (a new object) or "animate" (the mesh of `target_object` rebuilt from its result).
    request: the worker's job.json; job_dir: its folder (removed by `cleanup`)."""

    needs_worker = True  # the operator finds the runtime Python for it

    def __init__(self, context, kind: str, request: dict, job_dir: Path, scene_frames: list[int], strip_name: str,
                 target_object=None):
        self.kind, self.request, self.job_dir = kind, request, job_dir
        self.scene_frames, self.strip_name, self.target_object = scene_frames, strip_name, target_object
        self.height = context.scene.ss4d.height
        self.collection = context.scene.ss4d.collection
        self.timeline = context.scene.ss4d.timeline.lower()   # "shape_keys" or "mesh_cache" (scene_build.MODES)

    def start(self, python: str, environment: Optional[dict] = None) -> WorkerClient:
        return WorkerClient(python, self.job_dir, self.request, env=environment)

    def finish(self, context, done: dict):
        """Builds (or rebuilds) the object from the worker's output (`done`, its last message). Returns it."""
        data = np.load(done["animation"])
        colors = data["colors"] if len(data["colors"]) else None
        reference = int(data["reference_frame"])
        # how well the mesh follows each frame, on the timeline's frame numbers (a rebuild replaces them)
        quality = {"ss4d_fit_error": [float(x) for x in data["fit_error"]],
                   "ss4d_bad_frames": [int(self.scene_frames[i]) for i in data["bad_frames"]]}
        name = self.target_object.name if self.kind == "animate" else (
            f"SS4D_{self.strip_name}" if self.strip_name else "SS4D")
        timeline = {"mode": self.timeline, "cache_path": mesh_cache_path(name) if self.timeline == "mesh_cache" else ""}
        if self.kind == "animate":
            return scene_build.replace_animation(self.target_object, data["faces"], data["vertices"], colors,
                                                 self.scene_frames, reference, self.height, quality, **timeline)
        settings = done.get("settings", {})
        props = {"ss4d_settings": settings, "ss4d_seed": int(settings.get("seed", 0)),
                 "ss4d_scene_frames": self.scene_frames, "ss4d_strip": self.strip_name,
                 "ss4d_is_random_weights": bool(done.get("is_random_weights", False)), **quality}
        obj = scene_build.build_animated_object(context, name, data["faces"], data["vertices"], colors,
                                                self.scene_frames, reference, self.height, self.collection, props,
                                                **timeline)
        _select_only(context, obj)
        _keep_result_file(obj, Path(done["result"]))
        return obj

    def cleanup(self) -> None:
        shutil.rmtree(self.job_dir, ignore_errors=True)


def _select_only(context, obj) -> None:
    """Like anything Blender adds: the new object is selected and active."""
    for other in context.selected_objects:
        other.select_set(False)
    try:
        obj.select_set(True)
        context.view_layer.objects.active = obj
    except RuntimeError:                                # its collection is excluded from the view layer
        pass


def _keep_result_file(obj, result: Path) -> None:
    """Copies the worker's result next to the .blend and records it on the object (for Rebuild Mesh)."""
    destination = result_destination(obj.name)
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result, destination)
    obj["ss4d_result_file"] = bpy.path.relpath(str(destination)) if bpy.data.filepath else str(destination)


def _matted_frames(scene, strip, scene_frames: list[int]) -> tuple[np.ndarray, str]:
    """The strip's frames as Blender shows them, with the panel's matting: (uint8 [T, H, W, 4], what the
    engine still does). Alpha in the source and chroma keying happen here ("alpha" is left to do); learned
    matting, and Automatic on a clip without transparency, in the worker ("learned")."""
    settings = scene.ss4d
    rgba = frame_source.extract_frames(scene, strip, scene_frames)
    if settings.matting == "CHROMA":
        key_color = None if settings.auto_key_color else tuple(settings.key_color)
        return chroma_key(rgba, key_color, settings.tolerance, settings.softness, frame_numbers=scene_frames), "alpha"
    if settings.matting == "LEARNED" or (settings.matting == "AUTO" and not source_has_alpha(rgba)):
        return rgba, "learned"
    return alpha_from_source(rgba), "alpha"


def _picked_frames(scene, strip) -> list[int]:
    """The scene frames the panel's range and frame choice (All Frames with its Step, or a count spread
    evenly) pick from `strip`."""
    settings = scene.ss4d
    start, end = frame_source.strip_range(strip)
    if not settings.use_strip_range:
        start, end = max(start, settings.frame_start), min(end, settings.frame_end)
    if settings.frame_choice == "ALL":
        return frame_source.every_frame(start, end, settings.frame_step)
    return frame_source.pick_frames(start, end, settings.num_frames)


def _job_folder(arrays: dict) -> Path:
    """A new job folder holding `arrays` as frames.npz; nothing is left behind when writing fails."""
    job_dir = Path(tempfile.mkdtemp(prefix="ss4d_job_"))
    try:
        np.savez(job_dir / "frames.npz", **arrays)
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    return job_dir


def generate_job(context) -> Job:
    """A job generating a new object from the active strip, over the panel's frame range. Nothing is left
    behind when reading the frames fails."""
    scene = context.scene
    strip = frame_source.active_strip(scene)
    scene_frames = _picked_frames(scene, strip)
    rgba, matting = _matted_frames(scene, strip, scene_frames)
    job_dir = _job_folder({"frames": rgba})
    request = {"kind": "generate", "frames": "frames.npz", "settings": engine_settings(context, matting),
               "animate": animate_settings(context, scene_frames), "frame_numbers": scene_frames,
               "window_cache": str(window_cache_folder(strip.name))}
    return Job(context, "generate", request, job_dir, scene_frames, strip.name)


class MatteJob(Job):
    """Preview Matte: the panel's frames with the panel's matting, shown as an image strip above the source
    (`matte_preview`). Learned matting runs in the worker (kind "matte"); alpha and chroma are done in
    Blender already, so that job needs no worker (`needs_worker` False)."""

    def __init__(self, context, request: Optional[dict], job_dir: Path, scene_frames: list[int], strip):
        super().__init__(context, "matte", request, job_dir, scene_frames, strip.name)
        self.needs_worker = request is not None

    def start(self, python: Optional[str], environment: Optional[dict] = None):
        if self.needs_worker:
            return super().start(python, environment)
        return FinishedWork({"matte": str(self.job_dir / "frames.npz"), "matting": "alpha"})

    def finish(self, context, done: dict):
        """Writes the matted frames as PNGs and adds the preview strip. Returns the strip."""
        from . import matte_preview

        with np.load(done["matte"]) as data:
            frames = data["frames"]
        source = next(s for s in frame_source.sequencer_strips(context.scene) if s.name == self.strip_name)
        return matte_preview.add_preview_strip(context.scene, source, frames, self.scene_frames)


class FinishedWork:
    """Stands in for a worker whose work was done in Blender: finished, with `done` as its result."""

    def __init__(self, done: dict):
        from ..engine.worker import WorkerState

        self.state = WorkerState(stage="Done", fraction=1.0, done=done, finished=True, returncode=0)

    def snapshot(self):
        return self.state

    def wait(self, timeout: Optional[float] = None):
        return self.state

    def cancel(self, grace_seconds: float = 0.0) -> None:
        pass


def matte_job(context) -> MatteJob:
    """A job matting the panel's frames of the active strip for Preview Matte."""
    scene = context.scene
    strip = frame_source.active_strip(scene)
    scene_frames = _picked_frames(scene, strip)
    rgba, matting = _matted_frames(scene, strip, scene_frames)
    job_dir = _job_folder({"frames": rgba})
    request = None
    if matting == "learned":
        request = {"kind": "matte", "frames": "frames.npz", "settings": engine_settings(context, matting),
                   "frame_numbers": scene_frames, "matte": "matte.npz"}
    return MatteJob(context, request, job_dir, scene_frames, strip)


def rebuild_job(context, obj) -> Job:
    """A job running the `animate` stage again on the saved result of `obj`, with the panel's settings."""
    result_file = Path(bpy.path.abspath(obj.get("ss4d_result_file", "")))
    if not result_file.is_file():
        raise InputError(f"The generation result of '{obj.name}' was not found ({result_file}). "
                         f"Rebuilding needs the .safetensors file saved next to the .blend.")
    scene_frames = json.loads(obj["ss4d_scene_frames"])
    request = {"kind": "animate", "result": str(result_file), "animate": animate_settings(context, scene_frames)}
    job_dir = Path(tempfile.mkdtemp(prefix="ss4d_job_"))
    return Job(context, "animate", request, job_dir, scene_frames, obj.get("ss4d_strip", ""), target_object=obj)


# ---------------------------------------------------------------------------------------------- background tasks

class TaskStatus:
    """The state of a background task, written by its thread and read by the operator's timer (lock-guarded)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._text, self._error = "", None

    def set(self, text: str) -> None:
        with self._lock:
            self._text = text

    def fail(self, error: str) -> None:
        with self._lock:
            self._error = error

    @property
    def text(self) -> str:
        with self._lock:
            return self._text

    @property
    def error(self) -> Optional[str]:
        with self._lock:
            return self._error


def task_snapshot(context) -> dict:
    """What a background task needs from Blender, read on the main thread before the task starts."""
    prefs = preferences.get(context)
    return {"weights": weights_settings(prefs), "python": prefs.python, "runtime_flavour": prefs.runtime_flavour,
            "runtime_dir": preferences.runtime_directory(), "environment": worker_environment(context)}


def download_weights(task: dict, status: TaskStatus, stop: threading.Event) -> None:
    """Downloads every file generation needs into the cache, through the worker (thread; never touches bpy)."""
    _download(task, {"kind": "download", "settings": task["weights"]}, status, stop)


def download_matting_weights(task: dict, status: TaskStatus, stop: threading.Event) -> None:
    """Downloads one learned matting model (task["matting_repo"]) into the cache, through the worker."""
    _download(task, {"kind": "download_matting", "source": task["matting_repo"],
                     "cache_dir": task["weights"]["cache_dir"]}, status, stop)


def _download(task: dict, request: dict, status: TaskStatus, stop: threading.Event) -> None:
    python = runtime_env.find_runtime_python(task["python"], task["runtime_dir"])
    if python is None:
        raise SS4DError("Install the runtime first (button below).")
    job_dir = Path(tempfile.mkdtemp(prefix="ss4d_download_"))
    try:
        client = WorkerClient(python, job_dir, request, env=task["environment"])
        while not client.snapshot().finished:
            if stop.is_set():
                client.cancel(grace_seconds=1.0)
            state = client.snapshot()
            status.set(f"{state.stage} ({state.fraction:.0%})")
            client.wait(0.2)
        state = client.snapshot()
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
    if state.error:
        raise SS4DError(state.error)
    status.set("Weights are downloaded and ready.")


def install_runtime(task: dict, status: TaskStatus, stop: threading.Event) -> None:
    """Creates the add-on's own Python environment with PyTorch (thread; never touches bpy)."""
    runtime_dir = Path(task["runtime_dir"])
    runtime_env.install_runtime(runtime_dir, flavour=task["runtime_flavour"], progress=status.set,
                                log_path=runtime_dir.parent / "runtime-install.log", should_stop=stop.is_set)
    status.set("Runtime installed.")
