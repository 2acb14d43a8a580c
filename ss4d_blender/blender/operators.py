"""Operators: Generate 4D, Preview Matte, Cancel, Rebuild Mesh, Download Weights, Install Runtime.

The operators poll, start, watch and report; the jobs they run live in `jobs.py`. Generate 4D and Rebuild
Mesh run a job's worker process: in the UI as a modal operator (a timer reads the worker's progress, which a
background thread collects without touching bpy; the panels show the stage; Esc or Cancel stops it), and
without a UI (the bpy module, `--background`, tests, batch), where timers never fire, synchronously in
`execute`. Nothing is added to the file until the worker succeeded; then the object is built in one go: a
failure or a cancel leaves `bpy.data` as it was, and the result is one undo step.
"""
from __future__ import annotations

import json
import threading
from typing import Optional

import bpy
from bpy.props import BoolProperty, EnumProperty

from ..engine.errors import SS4DError
from ..engine.types import poor_fit_message
from ..engine.worker import WorkerClient
from . import jobs, preferences
from .jobs import OFFLINE_MESSAGE, worker_environment


class ActiveJob:
    """The one worker the add-on runs at a time (lock-guarded: the Cancel button, Esc and tests may ask
    from any thread)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._client: Optional[WorkerClient] = None

    @property
    def client(self) -> Optional[WorkerClient]:
        with self._lock:
            return self._client

    def ensure_idle(self) -> None:
        if self.client is not None:
            raise SS4DError("A generation is already running; wait for it or cancel it.")

    def claim(self, client: WorkerClient) -> None:
        with self._lock:
            self._client = client

    def release(self, client: Optional[WorkerClient]) -> None:
        with self._lock:
            if self._client is client:
                self._client = None

    def cancel(self) -> None:
        client = self.client
        if client is not None:
            client.cancel()


ACTIVE = ActiveJob()


def request_cancel() -> None:
    """Stops the running job at its next step (the Cancel button, Esc, or tests)."""
    ACTIVE.cancel()


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
    """Runs a job from `jobs.py`: modal in the UI, synchronous without one."""

    synchronous: BoolProperty(name="Synchronous", default=False, options={"SKIP_SAVE", "HIDDEN"},
                              description="Run without a modal loop (batch / headless)")

    def make_job(self, context) -> jobs.Job:
        raise NotImplementedError

    def _start(self, context) -> None:
        """Prepares the job and starts its worker; sets `self._job` and `self._client`."""
        ACTIVE.ensure_idle()
        job = self.make_job(context)
        try:
            python = jobs.runtime_python(context) if job.needs_worker else None
            client = job.start(python, worker_environment(context))
        except BaseException:
            job.cleanup()
            raise
        ACTIVE.claim(client)
        self._job, self._client = job, client

    def _refuse(self, context, err: SS4DError) -> set:
        self.report({"ERROR"}, str(err))
        _report_state(context, "", 0.0, False, str(err))
        return {"CANCELLED"}

    def _conclude(self, context) -> set:
        job, client = self._job, self._client
        state = client.snapshot()
        try:
            if state.error is not None or state.done is None:
                message = state.error or "The generator stopped without a result."
                self.report({"WARNING"} if state.error_kind == "Cancelled" else {"ERROR"}, message)
                _report_state(context, "", 0.0, False, message)
                return {"CANCELLED"}
            obj = job.finish(context, state.done)
            self._report_result(context, obj, state.warnings)
            return {"FINISHED"}
        except SS4DError as err:
            return self._refuse(context, err)
        finally:
            ACTIVE.release(client)
            job.cleanup()

    def _report_result(self, context, obj, warnings: list) -> None:
        poor_fit = poor_fit_message(json.loads(obj["ss4d_bad_frames"]))
        for warning in warnings + ([poor_fit] if poor_fit else []):
            self.report({"WARNING"}, warning)
        message = f"Created '{obj.name}' with {jobs.animation_summary(obj)}."
        self.report({"INFO"}, message)
        if poor_fit:
            message += " " + poor_fit
        _report_state(context, "", 0.0, False, message)

    def execute(self, context):
        try:
            self._start(context)
        except SS4DError as err:
            return self._refuse(context, err)
        while not self._client.wait(0.1).finished:
            pass
        return self._conclude(context)

    def invoke(self, context, event):
        if self.synchronous or bpy.app.background:
            return self.execute(context)
        try:
            self._start(context)
        except SS4DError as err:
            return self._refuse(context, err)
        wm = context.window_manager
        self._timer = wm.event_timer_add(0.25, window=context.window)
        wm.modal_handler_add(self)
        _report_state(context, "Starting", 0.0, True)
        return {"RUNNING_MODAL"}

    def modal(self, context, event):
        if event.type == "ESC":
            self._client.cancel()
        if event.type != "TIMER":
            return {"PASS_THROUGH"}
        state = self._client.snapshot()
        if not state.finished:
            _report_state(context, state.stage, state.fraction, True)
            return {"RUNNING_MODAL"}
        context.window_manager.event_timer_remove(self._timer)
        return self._conclude(context)


class SS4D_OT_generate(_JobOperator, bpy.types.Operator):
    """Generate an animated mesh from the active movie or image strip"""

    bl_idname = "ss4d.generate"
    bl_label = "Generate 4D"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        return context.scene is not None and not context.scene.ss4d.running

    def make_job(self, context):
        return jobs.generate_job(context)


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
        return jobs.rebuild_job(context, context.active_object)


class SS4D_OT_preview_matte(_JobOperator, bpy.types.Operator):
    """Show the panel's matting of the active strip (the frames Generate 4D would use) as an image strip in
    a new channel above it; the source strip is not changed. Learned matting runs in the generator process"""

    bl_idname = "ss4d.preview_matte"
    bl_label = "Preview Matte"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        return context.scene is not None and not context.scene.ss4d.running

    def make_job(self, context):
        return jobs.matte_job(context)

    def _report_result(self, context, strip, warnings: list) -> None:
        for warning in warnings:
            self.report({"WARNING"}, warning)
        message = f"Matte preview '{strip.name}' added in channel {strip.channel}."
        self.report({"INFO"}, message)
        _report_state(context, "", 0.0, False, message)


class SS4D_OT_cancel(bpy.types.Operator):
    """Stop the running generation at its next step"""

    bl_idname = "ss4d.cancel"
    bl_label = "Cancel"

    def execute(self, context):
        request_cancel()
        return {"FINISHED"}


def _run_task(task, snapshot: dict, status: jobs.TaskStatus, stop: threading.Event) -> None:
    """A background task's thread (plain data in and out, never bpy); its error is kept for the UI."""
    try:
        task(snapshot, status, stop)
    except Exception as err:  # noqa: BLE001 - the thread's boundary: every failure is shown in the UI
        status.fail(str(err))


class _BackgroundTask(bpy.types.Operator):
    """A long task (a function of `jobs.py`) on a thread; the modal timer shows its status in the preferences."""

    needs_network = True

    @staticmethod
    def task(snapshot: dict, status: jobs.TaskStatus, stop: threading.Event) -> None:
        raise NotImplementedError

    def after(self) -> None:
        """Runs on the main thread once the task ended."""

    def snapshot(self, context) -> dict:
        """What the task needs from Blender, read on the main thread."""
        return jobs.task_snapshot(context)

    def execute(self, context):
        if self.needs_network and not preferences.online_access(context):
            preferences.get(context).status = OFFLINE_MESSAGE
            self.report({"ERROR"}, OFFLINE_MESSAGE)
            return {"CANCELLED"}
        self._status, self._stop = jobs.TaskStatus(), threading.Event()
        self._thread = threading.Thread(target=_run_task, daemon=True,
                                        args=(self.task, self.snapshot(context), self._status, self._stop))
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
        preferences.get(context).status = self._status.text
        if self._thread.is_alive():
            return {"RUNNING_MODAL"}
        context.window_manager.event_timer_remove(self._timer)
        return self._done(context)

    def _done(self, context):
        self.after()
        error = self._status.error
        message = error or self._status.text
        preferences.get(context).status = message
        self.report({"ERROR"} if error else {"INFO"}, message)
        return {"CANCELLED"} if error else {"FINISHED"}


class SS4D_OT_download_weights(_BackgroundTask):
    """Download the model weights (pinned revisions) into the cache, with progress; Esc cancels"""

    bl_idname = "ss4d.download_weights"
    bl_label = "Download Weights"
    task = staticmethod(jobs.download_weights)

    def after(self) -> None:
        preferences.WEIGHTS_STATUS.forget()


class SS4D_OT_download_matting_weights(_BackgroundTask):
    """Download a learned matting model (BiRefNet, MIT licence) into the cache, with progress; Esc cancels"""

    bl_idname = "ss4d.download_matting_weights"
    bl_label = "Download"
    task = staticmethod(jobs.download_matting_weights)
    quality: EnumProperty(name="Quality", items=[("best", "Best", "BiRefNet"), ("fast", "Fast", "BiRefNet_lite")])

    def snapshot(self, context) -> dict:
        from ..engine.background import MATTING_QUALITIES

        return {**jobs.task_snapshot(context), "matting_repo": MATTING_QUALITIES[self.quality]}

    def after(self) -> None:
        preferences.MATTING_STATUS.forget()


class SS4D_OT_install_runtime(_BackgroundTask):
    """Install PyTorch and the generator's packages into the add-on's own environment (not into
    Blender's Python); progress in the preferences, log in the add-on's user folder; Esc cancels"""

    bl_idname = "ss4d.install_runtime"
    bl_label = "Install Runtime"
    task = staticmethod(jobs.install_runtime)

    def after(self) -> None:
        preferences.RUNTIME.forget()


CLASSES = (SS4D_OT_generate, SS4D_OT_rebuild_mesh, SS4D_OT_preview_matte, SS4D_OT_cancel, SS4D_OT_download_weights,
           SS4D_OT_download_matting_weights, SS4D_OT_install_runtime)


def register():
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister():
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
