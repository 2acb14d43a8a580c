"""Operators: Generate 4D, Cancel, Rebuild Mesh, Download Weights, Install Runtime.

Generate 4D reads the strip's frames and mattes them in Blender (fast, needs bpy), then runs the model in
a worker process (`engine.worker`, its own Python with PyTorch). In the UI it is a modal operator: a timer
polls the worker's progress (read on a background thread that never touches bpy), the panels show the
stage, Esc or Cancel stops it. Without a UI (the bpy module, `--background`, tests, batch) the same steps
run synchronously in `execute`. Nothing is added to the file until the worker succeeded; then the object is
built in one go: a failure or a cancel leaves `bpy.data` as it was, and the result is one undo step.
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
from bpy.props import BoolProperty

from .. import runtime_env
from ..engine.errors import InputError, SS4DError
from ..engine.matting import alpha_from_source, chroma_key
from ..engine.types import poor_fit_message
from ..engine.worker import WorkerClient
from . import frames as frame_source
from . import preferences, scene_build

_cancel_requested = threading.Event()
_active = {"client": None}


def request_cancel() -> None:
    """Stops the running job at its next step (the Cancel button, Esc, or tests)."""
    _cancel_requested.set()
    client = _active["client"]
    if client is not None:
        client.cancel()


def _engine_settings(context) -> dict:
    p = preferences.get(context)
    s = context.scene.ss4d
    mesh_decoder = p.mesh_decoder or "auto"
    return {
        "pipeline": p.pipeline or "lizb6626/SS4D",
        "revision": p.revision or None,
        "mesh_decoder": None if mesh_decoder.lower() == "none" else mesh_decoder,
        "cache_dir": bpy.path.abspath(p.cache_dir) or None if p.cache_dir else None,
        "seed": int(s.seed),
        "steps": int(s.steps) or None,
        "cfg": float(s.guidance) or None,
        "device": p.device,
        "precision": p.precision,
    }


def _animate_settings(context, scene_frames: list[int]) -> dict:
    """Registration settings; the reference is a timeline frame in the UI, the nearest generated
    frame's index for the engine."""
    s = context.scene.ss4d
    device = preferences.get(context).device   # 'auto', 'cuda:N', 'mps', 'cpu'; registration maps MPS to the CPU
    reference = None
    if not s.auto_reference:
        reference = min(range(len(scene_frames)), key=lambda i: abs(scene_frames[i] - s.reference_frame))
    return {"target_vertices": int(s.target_vertices), "reference_frame": reference,
            "temporal_smoothing": float(s.smoothing), "device": device}


def runtime_python(context) -> str:
    p = preferences.get(context)
    python = runtime_env.find_runtime_python(p.python, preferences.runtime_directory())
    if python is None:
        raise SS4DError("The PyTorch runtime is not installed. Open Preferences > Add-ons > SS4D and click "
                        "'Install Runtime' (or set 'Runtime Python' to a Python with PyTorch).")
    return python


OFFLINE_MESSAGE = ("Online access is disabled in Blender (Preferences > System > Network > Allow Online Access). "
                   "Allow it to download the weights, or set 'SS4D Weights' to a local folder.")


def worker_environment(context) -> dict:
    """The worker's environment: Blender's, plus HF_HUB_OFFLINE=1 when online access is not allowed, so
    the engine never touches the network then (missing weights become a clear 'offline' error)."""
    environment = dict(os.environ)
    if not preferences.online_access(context):
        environment["HF_HUB_OFFLINE"] = "1"
    return environment


def result_destination(obj_name: str) -> Path:
    """Where the engine result file of an object is kept: next to the .blend when it is saved."""
    if bpy.data.filepath:
        blend = Path(bpy.data.filepath)
        return blend.parent / f"{blend.stem}_{bpy.path.clean_name(obj_name)}_ss4d.safetensors"
    return preferences.user_directory() / "results" / f"{bpy.path.clean_name(obj_name)}_{int(time.time())}.safetensors"


class _GenerateJob:
    """One run: prepared in Blender, executed by the worker, finished back in Blender."""

    def __init__(self, context, kind: str, target_object=None):
        self.kind = kind
        self.target_object = target_object
        self.job_dir = Path(tempfile.mkdtemp(prefix="ss4d_job_"))
        self.client = None
        scene = context.scene
        settings = scene.ss4d
        if kind == "generate":
            strip = frame_source.active_strip(scene)
            start, end = frame_source.strip_range(strip)
            if not settings.use_strip_range:
                start, end = max(start, settings.frame_start), min(end, settings.frame_end)
            self.scene_frames = frame_source.pick_frames(start, end, settings.num_frames)
            self.strip_name = strip.name
            rgba = frame_source.extract_frames(scene, strip, self.scene_frames)
            if settings.matting == "CHROMA":
                rgba = chroma_key(rgba, tuple(settings.key_color), settings.tolerance, settings.softness)
            else:
                rgba = alpha_from_source(rgba)
            np.savez(self.job_dir / "frames.npz", frames=rgba)
            self.job = {"kind": "generate", "frames": "frames.npz", "settings": _engine_settings(context),
                        "animate": _animate_settings(context, self.scene_frames)}
        else:
            result_file = Path(bpy.path.abspath(target_object.get("ss4d_result_file", "")))
            if not result_file.is_file():
                raise InputError(f"The generation result of '{target_object.name}' was not found ({result_file}). "
                                 f"Rebuilding needs the .safetensors file saved next to the .blend.")
            self.scene_frames = json.loads(target_object["ss4d_scene_frames"])
            self.strip_name = target_object.get("ss4d_strip", "")
            self.job = {"kind": "animate", "result": str(result_file),
                        "animate": _animate_settings(context, self.scene_frames)}
        self.height = float(settings.height)
        self.collection = settings.collection

    def start(self, python: str, environment: Optional[dict] = None) -> None:
        self.client = WorkerClient(python, self.job_dir, self.job, env=environment)
        _active["client"] = self.client

    def finish(self, context):
        """Builds (or rebuilds) the object from the worker's output. Returns the object."""
        state = self.client.snapshot()
        data = np.load(state.done["animation"])
        colors = data["colors"] if len(data["colors"]) else None
        reference = int(data["reference_frame"])
        # how well the mesh follows each frame, on the timeline's frame numbers (a rebuild replaces them)
        quality = {"ss4d_fit_error": [float(x) for x in data["fit_error"]],
                   "ss4d_bad_frames": [int(self.scene_frames[i]) for i in data["bad_frames"]]}
        if self.kind == "animate":
            return scene_build.replace_animation(self.target_object, data["faces"], data["vertices"], colors,
                                                 self.scene_frames, reference, self.height, quality)
        name = f"SS4D_{self.strip_name}" if self.strip_name else "SS4D"
        settings = state.done.get("settings", {})
        props = {"ss4d_settings": settings, "ss4d_seed": int(settings.get("seed", 0)),
                 "ss4d_scene_frames": self.scene_frames, "ss4d_strip": self.strip_name,
                 "ss4d_random_weights": bool(state.done.get("is_random_weights", False)), **quality}
        obj = scene_build.build_animated_object(context, name, data["faces"], data["vertices"], colors,
                                                self.scene_frames, reference, self.height, self.collection, props)
        for other in context.selected_objects:              # like anything Blender adds: selected, active
            other.select_set(False)
        try:
            obj.select_set(True)
            context.view_layer.objects.active = obj
        except RuntimeError:                                # its collection is excluded from the view layer
            pass
        destination = result_destination(obj.name)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(state.done["result"], destination)
        obj["ss4d_result_file"] = bpy.path.relpath(str(destination)) if bpy.data.filepath else str(destination)
        return obj

    def cleanup(self) -> None:
        if _active["client"] is self.client:
            _active["client"] = None
        shutil.rmtree(self.job_dir, ignore_errors=True)


def _report_state(context, stage: str, fraction: float, running: bool, message: str = "") -> None:
    s = context.scene.ss4d
    s.stage, s.progress, s.running = stage, fraction, running
    if message:
        s.last_message = message
    for window in getattr(context.window_manager, "windows", []):
        for area in window.screen.areas:
            if area.type in ("SEQUENCE_EDITOR", "VIEW_3D"):
                area.tag_redraw()


class _JobOperator:
    """Shared modal / synchronous driver."""

    synchronous: BoolProperty(name="Synchronous", default=False, options={"SKIP_SAVE", "HIDDEN"},
                              description="Run without a modal loop (batch / headless)")

    def make_job(self, context) -> _GenerateJob:
        raise NotImplementedError

    def make_job_safely(self, context) -> _GenerateJob:
        before = set(Path(tempfile.gettempdir()).glob("ss4d_job_*"))
        try:
            return self.make_job(context)
        except Exception:
            for leftover in set(Path(tempfile.gettempdir()).glob("ss4d_job_*")) - before:
                shutil.rmtree(leftover, ignore_errors=True)
            raise

    def _prepare(self, context):
        _cancel_requested.clear()
        if _active["client"] is not None:
            raise SS4DError("A generation is already running; wait for it or cancel it.")
        job = self.make_job_safely(context)
        try:
            job.start(runtime_python(context), worker_environment(context))
        except Exception:
            job.cleanup()
            raise
        return job

    def _conclude(self, context, job: _GenerateJob):
        state = job.client.snapshot()
        try:
            if state.error is not None or state.done is None:
                message = state.error or "The generator stopped without a result."
                self.report({"WARNING"} if state.error_kind == "Cancelled" else {"ERROR"}, message)
                _report_state(context, "", 0.0, False, message)
                return {"CANCELLED"}
            obj = job.finish(context)
            poor_fit = poor_fit_message(json.loads(obj["ss4d_bad_frames"]))
            for warning in state.warnings + ([poor_fit] if poor_fit else []):
                self.report({"WARNING"}, warning)
            message = f"Created '{obj.name}' with {len(obj.data.shape_keys.key_blocks) - 1} shape keys."
            self.report({"INFO"}, message)
            if poor_fit:
                message += " " + poor_fit
            _report_state(context, "", 0.0, False, message)
            return {"FINISHED"}
        except SS4DError as err:
            self.report({"ERROR"}, str(err))
            _report_state(context, "", 0.0, False, str(err))
            return {"CANCELLED"}
        finally:
            job.cleanup()

    def execute(self, context):
        try:
            job = self._prepare(context)
        except SS4DError as err:
            self.report({"ERROR"}, str(err))
            _report_state(context, "", 0.0, False, str(err))
            return {"CANCELLED"}
        while not job.client.snapshot().finished:
            if _cancel_requested.is_set():
                job.client.cancel()
                _cancel_requested.clear()
            job.client.wait(0.1)
        return self._conclude(context, job)

    def invoke(self, context, event):
        if self.synchronous or bpy.app.background:
            return self.execute(context)
        try:
            self._job = self._prepare(context)
        except SS4DError as err:
            self.report({"ERROR"}, str(err))
            return {"CANCELLED"}
        wm = context.window_manager
        self._timer = wm.event_timer_add(0.25, window=context.window)
        wm.modal_handler_add(self)
        _report_state(context, "Starting", 0.0, True)
        return {"RUNNING_MODAL"}

    def modal(self, context, event):
        job = self._job
        if event.type == "ESC" or _cancel_requested.is_set():
            _cancel_requested.clear()
            job.client.cancel()
        if event.type != "TIMER":
            return {"PASS_THROUGH"}
        state = job.client.snapshot()
        if not state.finished:
            _report_state(context, state.stage, state.fraction, True)
            return {"RUNNING_MODAL"}
        context.window_manager.event_timer_remove(self._timer)
        return self._conclude(context, job)


class SS4D_OT_generate(_JobOperator, bpy.types.Operator):
    """Generate an animated mesh from the active movie or image strip"""

    bl_idname = "ss4d.generate"
    bl_label = "Generate 4D"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        return context.scene is not None and not context.scene.ss4d.running

    def make_job(self, context):
        return _GenerateJob(context, "generate")


class SS4D_OT_rebuild_mesh(_JobOperator, bpy.types.Operator):
    """Rebuild the animated mesh of the active SS4D object (vertex count, smoothing, reference frame)
    from its saved generation result, without running the model again"""

    bl_idname = "ss4d.rebuild_mesh"
    bl_label = "Rebuild Mesh"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        obj = context.active_object
        return obj is not None and "ss4d_result_file" in obj.keys() and not context.scene.ss4d.running

    def make_job(self, context):
        return _GenerateJob(context, "animate", target_object=context.active_object)


class SS4D_OT_cancel(bpy.types.Operator):
    """Stop the running generation at its next step"""

    bl_idname = "ss4d.cancel"
    bl_label = "Cancel"

    def execute(self, context):
        request_cancel()
        return {"FINISHED"}


class _BackgroundTask(bpy.types.Operator):
    """A long task in a thread; the modal timer shows its status in the preferences."""

    _thread = None
    _status = ""
    needs_network = True

    def run_task(self, prefs: dict, stop: threading.Event) -> None:
        raise NotImplementedError

    def execute(self, context):
        prefs = preferences.get(context)
        self._error = None
        stop = threading.Event()
        self._stop = stop

        def target():
            try:
                self.run_task(prefs_snapshot, stop)
            except Exception as err:  # noqa: BLE001 - shown in the UI
                self._error = str(err)
        prefs_snapshot = {k: getattr(prefs, k) for k in ("pipeline", "revision", "mesh_decoder", "cache_dir",
                                                           "python", "runtime_flavour")}
        prefs_snapshot["_runtime_dir"] = str(preferences.runtime_directory())
        if self.needs_network and not preferences.online_access(context):
            preferences.get(context).status = OFFLINE_MESSAGE
            self.report({"ERROR"}, OFFLINE_MESSAGE)
            return {"CANCELLED"}
        prefs_snapshot["_environment"] = worker_environment(context)
        self._thread = threading.Thread(target=target, daemon=True)
        self._thread.start()
        if bpy.app.background:
            self._thread.join()
            return self._done(context)
        wm = context.window_manager
        self._timer = wm.event_timer_add(0.5, window=context.window)
        wm.modal_handler_add(self)
        return {"RUNNING_MODAL"}

    def modal(self, context, event):
        if event.type == "ESC":
            self._stop.set()
        if event.type != "TIMER":
            return {"PASS_THROUGH"}
        preferences.get(context).status = type(self)._status
        if self._thread.is_alive():
            return {"RUNNING_MODAL"}
        context.window_manager.event_timer_remove(self._timer)
        return self._done(context)

    def _done(self, context):
        message = self._error or type(self)._status
        preferences.get(context).status = message
        self.report({"ERROR"} if self._error else {"INFO"}, message)
        return {"CANCELLED"} if self._error else {"FINISHED"}


class SS4D_OT_download_weights(_BackgroundTask):
    """Download the model weights (pinned revisions) into the cache, with progress; Esc cancels"""

    bl_idname = "ss4d.download_weights"
    bl_label = "Download Weights"

    def run_task(self, prefs: dict, stop: threading.Event) -> None:
        python = runtime_env.find_runtime_python(prefs.get("python", ""), Path(prefs["_runtime_dir"]))
        if python is None:
            raise SS4DError("Install the runtime first (button below).")
        job_dir = Path(tempfile.mkdtemp(prefix="ss4d_download_"))
        settings = {"pipeline": prefs.get("pipeline") or "lizb6626/SS4D", "revision": prefs.get("revision") or None,
                    "cache_dir": bpy.path.abspath(prefs.get("cache_dir", "")) or None,
                    "mesh_decoder": None if (prefs.get("mesh_decoder") or "auto").lower() == "none" else prefs.get("mesh_decoder") or "auto"}
        client = WorkerClient(python, job_dir, {"kind": "download", "settings": settings}, env=prefs["_environment"])
        while not client.snapshot().finished:
            if stop.is_set():
                client.cancel(grace_seconds=1.0)
            state = client.snapshot()
            type(self)._status = f"{state.stage} ({state.fraction:.0%})"
            client.wait(0.2)
        state = client.snapshot()
        shutil.rmtree(job_dir, ignore_errors=True)
        if state.error:
            raise SS4DError(state.error)
        type(self)._status = "Weights are downloaded and ready."


class SS4D_OT_install_runtime(_BackgroundTask):
    """Install PyTorch and the generator's packages into the add-on's own environment (not into
    Blender's Python); progress in the preferences, log in the add-on's user folder; Esc cancels"""

    bl_idname = "ss4d.install_runtime"
    bl_label = "Install Runtime"

    def run_task(self, prefs: dict, stop: threading.Event) -> None:
        runtime_dir = Path(prefs["_runtime_dir"])

        def progress(label):
            type(self)._status = label
        runtime_env.install_runtime(runtime_dir, flavour=prefs.get("runtime_flavour", "cpu"), progress=progress,
                                    log_path=runtime_dir.parent / "runtime-install.log", should_stop=stop.is_set)
        type(self)._status = "Runtime installed."


CLASSES = (SS4D_OT_generate, SS4D_OT_rebuild_mesh, SS4D_OT_cancel, SS4D_OT_download_weights, SS4D_OT_install_runtime)


def register():
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister():
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
