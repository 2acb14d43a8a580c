"""The engine in its own process, and the client the add-on uses to drive it.

The add-on never imports torch into Blender's Python. It writes a job folder and starts

    <runtime python> -m ss4d_blender.engine.worker JOB_DIR/job.json

job.json: {"kind": "generate" | "animate" | "matte" | "download" | "download_matting", "frames": "frames.npz",
"frame_numbers": [...] (how messages name the frames), "result": "result.safetensors",
"animation": "animation.npz", "settings": {GenerateSettings fields}, "animate": {target_vertices,
reference_frame, temporal_smoothing, device}, "cancel_file": "cancel", "window_cache": a folder that outlives
the job folder, where a long clip's finished windows wait (removed after success, kept on cancel so the next
run with the same settings continues from them)} (paths relative to the job folder or
absolute). The worker prints one JSON object per line on stdout:
    {"stage": "Sampling latents", "fraction": 0.4}
    {"warning": "..."}                                                 one per entry of the result's warnings
    {"error": "message for the artist", "kind": "InputError"}      then exits 1 (3 when cancelled)
    {"done": {"result": path, "animation": path}}                      then exits 0
Cancelling = creating the cancel file: the worker stops at its next progress step. `WorkerClient` is the
parent side: it starts the process, reads its lines on a thread (never touching bpy), exposes the latest
progress, and cancels (cancel file first, terminate as the last resort).
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

EXIT_ERROR, EXIT_CANCELLED = 1, 3


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _path(job_dir: Path, value: Optional[str]) -> Optional[Path]:
    if value is None:
        return None
    p = Path(value)
    return p if p.is_absolute() else job_dir / p


def _download(settings: dict, report) -> int:
    """Fetches every file generation needs into the cache (pinned revisions)."""
    from . import hub
    from .api import GenerateSettings

    s = GenerateSettings.from_user(**settings)
    fetched = hub.fetch_weights(s.pipeline, s.revision, s.mesh_decoder, s.cache_dir,
                                report=lambda source, fraction: report(f"Downloading {source}", fraction))
    report("Downloaded", 1.0)
    _emit({"done": {"downloaded": {source: {"folder": str(folder), "revision": used}
                                   for source, (folder, used) in fetched.items()}}})
    return 0


def _download_matting(job: dict, report) -> int:
    """Fetches one learned matting model (job["source"]: a repository id) into the cache."""
    from .background import resolve_matting_weights

    report(f"Downloading {job['source']}", 0.0)
    weights, used = resolve_matting_weights(job["source"], cache_dir=job.get("cache_dir") or None)
    report("Downloaded", 1.0)
    _emit({"done": {"downloaded": {job["source"]: {"folder": str(weights.parent), "revision": used}}}})
    return 0


def _matte(job_dir: Path, job: dict, progress) -> int:
    """Preview Matte: frames.npz -> matte.npz (`frames`, RGBA) with the settings' matting, no generation."""
    import numpy as np

    from .api import GenerateSettings
    from .background import matte_clip

    with np.load(_path(job_dir, job.get("frames", "frames.npz"))) as data:
        frames = data["frames"]
    s = GenerateSettings.from_user(**job.get("settings", {}))
    rgba, used, warnings = matte_clip(frames, s.matting, progress, quality=s.matting_quality,
                                      model_source=s.matting_model, pipeline=s.pipeline, device=s.device,
                                      precision=s.precision, cache_dir=s.cache_dir,
                                      frame_numbers=job.get("frame_numbers"))
    out = _path(job_dir, job.get("matte", "matte.npz"))
    np.savez(out, frames=rgba)
    for warning in warnings:
        _emit({"warning": warning})
    _emit({"done": {"matte": str(out), "warnings": warnings, **used}})
    return 0


def run_job(job_file: Path) -> int:
    """Runs one job; returns the exit status. All output goes through _emit."""
    import numpy as np

    from .api import GenerateSettings, animate, generate
    from .errors import Cancelled, SS4DError
    from .progress import Progress
    from .result import load_result

    job_dir = job_file.parent
    job = json.loads(job_file.read_text())
    cancel_file = _path(job_dir, job.get("cancel_file", "cancel"))

    def report(stage: str, fraction: float) -> None:
        if cancel_file is not None and cancel_file.exists():
            raise Cancelled()
        _emit({"stage": stage, "fraction": round(fraction, 4)})

    progress = Progress(report)
    window_cache = _path(job_dir, job.get("window_cache"))
    try:
        result_path = _path(job_dir, job.get("result", "result.safetensors"))
        if job["kind"] == "generate":
            with np.load(_path(job_dir, job.get("frames", "frames.npz"))) as data:
                frames = data["frames"]
            settings = GenerateSettings.from_user(**job.get("settings", {}))
            result = generate(frames, settings, progress, window_cache=window_cache,
                              frame_numbers=job.get("frame_numbers"))
            result.save(result_path)
        elif job["kind"] == "animate":
            result = load_result(result_path, lazy=True)     # a long clip's frames are read one at a time
        elif job["kind"] == "download":
            return _download(job.get("settings", {}), report)
        elif job["kind"] == "download_matting":
            return _download_matting(job, report)
        elif job["kind"] == "matte":
            return _matte(job_dir, job, progress)
        else:
            raise SS4DError(f"Unknown job kind {job['kind']!r}.")
        anim_args = dict(job.get("animate", {}))
        animation = animate(result, progress=progress, **anim_args)
        animation_path = _path(job_dir, job.get("animation", "animation.npz"))
        tmp = animation_path.with_name(animation_path.name + ".partial.npz")
        np.savez(tmp, faces=animation.faces, vertices=animation.vertices,
                 colors=animation.colors if animation.colors is not None else np.zeros((0, 3), np.float32),
                 fit_error=animation.fit_error, reference_frame=np.int32(animation.reference_frame),
                 bad_frames=np.asarray(animation.info.get("bad_frames", []), np.int32))
        os.replace(tmp, animation_path)
        if window_cache is not None:        # the result file holds everything now
            shutil.rmtree(window_cache, ignore_errors=True)
        for warning in result.warnings:
            _emit({"warning": warning})
        _emit({"done": {"result": str(result_path), "animation": str(animation_path),
                        "is_random_weights": bool(result.is_random_weights), "warnings": list(result.warnings),
                        "settings": result.settings}})
        return 0
    except Cancelled:
        _emit({"error": _cancel_message(progress.stage, window_cache), "kind": "Cancelled"})
        return EXIT_CANCELLED
    except SS4DError as err:
        _emit({"error": str(err), "kind": type(err).__name__})
        return EXIT_ERROR
    except Exception as err:  # noqa: BLE001 - an unexpected failure still reaches the artist as words
        import traceback
        traceback.print_exc(file=sys.stderr)
        _emit({"error": f"Unexpected error in the generator: {type(err).__name__}: {err}", "kind": "InternalError"})
        return EXIT_ERROR


def _cancel_message(stage: str, window_cache: Optional[Path]) -> str:
    """'Cancelled.', or which windows of a long clip are kept and how to continue from them."""
    from .windows import windows_finished

    finished = windows_finished(stage)
    if window_cache is None or finished is None or finished[0] == 0:
        return "Cancelled."
    return (f"Cancelled after window {finished[0]} of {finished[1]}; Generate 4D again with the same settings "
            f"continues from there.")


@dataclass
class WorkerState:
    stage: str = "Starting"
    fraction: float = 0.0
    warnings: list = field(default_factory=list)
    error: Optional[str] = None
    error_kind: Optional[str] = None
    done: Optional[dict] = None
    finished: bool = False
    returncode: Optional[int] = None


class WorkerClient:
    """Parent side of a worker process. Thread-safe reads of `state`; never touches bpy."""

    def __init__(self, python: str, job_dir: Path, job: dict, env: Optional[dict] = None):
        self.job_dir = Path(job_dir)
        self.job_dir.mkdir(parents=True, exist_ok=True)
        job = dict(job)
        job.setdefault("cancel_file", "cancel")
        (self.job_dir / "job.json").write_text(json.dumps(job))
        self.cancel_file = _path(self.job_dir, job["cancel_file"])
        self.state = WorkerState()
        self._lock = threading.Lock()
        self._lines: "queue.Queue[dict]" = queue.Queue()
        package_root = str(Path(__file__).resolve().parents[2])
        environment = dict(os.environ if env is None else env)
        environment["PYTHONPATH"] = package_root + os.pathsep + environment.get("PYTHONPATH", "")
        environment.setdefault("PYTHONUNBUFFERED", "1")
        self.stderr_path = self.job_dir / "worker.log"
        self._stderr = open(self.stderr_path, "w")
        self.process = subprocess.Popen([python, "-m", "ss4d_blender.engine.worker", str(self.job_dir / "job.json")],
                                        stdout=subprocess.PIPE, stderr=self._stderr, env=environment, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                if "stage" in msg:
                    self.state.stage, self.state.fraction = msg["stage"], float(msg["fraction"])
                elif "warning" in msg:
                    self.state.warnings.append(msg["warning"])
                elif "error" in msg:
                    self.state.error, self.state.error_kind = msg["error"], msg.get("kind")
                elif "done" in msg:
                    self.state.done = msg["done"]
        code = self.process.wait()
        self._stderr.close()
        with self._lock:
            self.state.returncode = code
            if code != 0 and self.state.error is None:
                tail = self.stderr_path.read_text(errors="replace").strip().splitlines()[-3:]
                self.state.error = ("The generator process stopped unexpectedly (exit code "
                                    f"{code}). " + " ".join(tail))
                self.state.error_kind = "InternalError"
            self.state.finished = True

    def snapshot(self) -> WorkerState:
        with self._lock:
            return WorkerState(**vars(self.state))

    def cancel(self, grace_seconds: float = 20.0) -> None:
        """Asks the worker to stop at its next step; terminates it if it does not within the grace time."""
        self.cancel_file.touch()

        def enforce():
            deadline = time.monotonic() + grace_seconds
            while time.monotonic() < deadline and self.process.poll() is None:
                time.sleep(0.1)
            if self.process.poll() is None:
                self.process.terminate()
        threading.Thread(target=enforce, daemon=True).start()

    def wait(self, timeout: Optional[float] = None) -> WorkerState:
        self._reader.join(timeout)
        return self.snapshot()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m ss4d_blender.engine.worker JOB.json", file=sys.stderr)
        return 2
    # Ctrl-C in a terminal reaches the whole process group; the parent decides, and cancels through the
    # cancel file (or terminates after a grace time), so the worker never dies half-way on its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return run_job(Path(argv[0]).resolve())


if __name__ == "__main__":
    sys.exit(main())
