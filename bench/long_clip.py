"""Long clips: time and peak memory per window, and the cost of a shape-key timeline.

`pipeline` runs `engine.api.generate` on clips of 32, 64, 128 and 256 frames (a disc moving across small
frames) in overlapping windows, each clip in a fresh process, with a window cache folder so every
window's frames go to disk as soon as it is done. Per window it prints the seconds and the peak resident
memory of the process while that window ran (sampled every 10 ms from /proc/self/statm); time should grow
with the number of windows and the peak stay flat. With the tiny random-weight pipeline (its output is
noise) this measures the windowing's bookkeeping, not the model; give `--pipeline` a real pipeline folder
and `--device cuda` for full size.

`timeline` builds the Blender object (`blender.scene_build.build_animated_object`: one absolute shape key
per frame) for F frames x V vertices, saves it, and scrubs through every frame: seconds to build, .blend
size, seconds per scrubbed frame.

    .venv/bin/python bench/long_clip.py pipeline --device cpu                 # tiny pipeline, CPU
    .venv/bin/python bench/long_clip.py pipeline --pipeline DIR --device cuda --steps 25
    .venv/bin/python bench/long_clip.py timeline --frames 240 --vertices 20000
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class PeakMemory:
    """Peak resident memory of this process since the last `take()`, sampled in a background thread."""

    def __init__(self, interval: float = 0.01):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self.interval = interval
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def take(self) -> int:
        peak, self.peak = max(self.peak, self.rss()), self.rss()
        return peak


def moving_disc(frames: int, size: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.zeros((frames, size, size, 4), np.uint8)
    for t in range(frames):
        cx, cy = size * (0.3 + 0.4 * t / max(frames - 1, 1)), size * (0.5 + 0.08 * np.sin(t / 6))
        out[t, (xx - cx) ** 2 + (yy - cy) ** 2 < (size * 0.2) ** 2] = (200, 90, 60, 255)
    return out


def run_clip(args) -> None:
    """One clip length in this process; prints one JSON line per window."""
    import torch

    from ss4d_blender.engine.api import GenerateSettings, generate
    from ss4d_blender.engine.progress import Progress

    torch.set_num_threads(args.threads)
    memory = PeakMemory()
    windows, state = [], {"window": None, "since": time.perf_counter()}

    def on_progress(stage: str, fraction: float) -> None:
        if " · " in stage:
            window = stage.split(" · ")[0]
        else:   # a one-window clip's stages carry no window; "Loading models" comes before any window
            window = "loading" if stage == "Loading models" else "Window 1 of 1"
        if window != state["window"]:
            now = time.perf_counter()
            if state["window"] is not None:
                windows.append((state["window"], now - state["since"], memory.take()))
            else:
                memory.take()
            state.update(window=window, since=now)

    settings = GenerateSettings(pipeline=args.pipeline, device=args.device, steps=args.steps,
                                mesh_decoder=None if args.no_mesh_decoder else "auto")
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        result = generate(moving_disc(args.clip), settings, Progress(on_progress), window_cache=cache)
        windows.append((state["window"], time.perf_counter() - state["since"], memory.take()))
        total = time.perf_counter() - started
        saved = result.save(Path(cache) / "result.safetensors")
        size = saved.stat().st_size
    for name, seconds, peak in windows:
        print(json.dumps({"clip": args.clip, "window": name, "seconds": round(seconds, 2),
                          "peak_mb": round(peak / 2 ** 20, 1)}))
    print(json.dumps({"clip": args.clip, "total_seconds": round(total, 2), "windows": len(result.settings["windows"]),
                      "result_mb": round(size / 2 ** 20, 2)}))


def bench_pipeline(args) -> None:
    pipeline = args.pipeline
    with tempfile.TemporaryDirectory() as folder:
        if pipeline is None:
            from ss4d_blender.engine.tiny import make_tiny_pipeline

            pipeline = str(make_tiny_pipeline(Path(folder) / "tiny"))
            print("tiny random-weight pipeline (output is noise; this times the windowing, not the model)")
        print(f"{'frames':>6} {'windows':>7} {'window':>16} {'seconds':>8} {'peak MB':>8}")
        for clip in args.clips:
            cmd = [sys.executable, __file__, "clip", "--clip", str(clip), "--pipeline", pipeline, "--device",
                   args.device, "--steps", str(args.steps), "--threads", str(args.threads)]
            cmd += ["--no-mesh-decoder"] if args.no_mesh_decoder else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            summary = rows[-1]
            for row in rows[:-1]:
                print(f"{clip:>6} {summary['windows']:>7} {row['window']:>16} {row['seconds']:>8.2f} "
                      f"{row['peak_mb']:>8.1f}")
            print(f"{clip:>6} {summary['windows']:>7} {'total':>16} {summary['total_seconds']:>8.2f}  "
                  f"(result file {summary['result_mb']} MB)")


def test_mesh(vertices: int) -> tuple[np.ndarray, np.ndarray]:
    """A closed tube (torus) with about `vertices` vertices: [V, 3], faces [F, 3]."""
    around = int(np.sqrt(vertices / 4))
    along = vertices // around
    u, v = np.meshgrid(np.linspace(0, 2 * np.pi, along, endpoint=False),
                       np.linspace(0, 2 * np.pi, around, endpoint=False), indexing="ij")
    pts = np.stack([(1 + 0.3 * np.cos(v)) * np.cos(u), (1 + 0.3 * np.cos(v)) * np.sin(u), 0.3 * np.sin(v)], -1)
    i, j = np.meshgrid(np.arange(along), np.arange(around), indexing="ij")
    a, b = i * around + j, ((i + 1) % along) * around + j
    c, d = ((i + 1) % along) * around + (j + 1) % around, i * around + (j + 1) % around
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    return pts.reshape(-1, 3).astype(np.float32), faces.astype(np.int32)


def bench_timeline(args) -> None:
    import bpy

    from ss4d_blender.blender.scene_build import build_animated_object, placement

    rest, faces = test_mesh(args.vertices)
    frames = np.arange(args.frames)
    wobble = 0.05 * np.sin(frames[:, None] / 5.0 + rest[None, :, 0] * 3)
    vertices = rest[None] + wobble[..., None] * np.array([0, 0, 1], np.float32)
    vertices = vertices.astype(np.float32)
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.frame_start, scene.frame_end = 1, args.frames
    started = time.perf_counter()
    folder = tempfile.mkdtemp()
    cache = str(Path(folder) / "bench.pc2")
    obj = build_animated_object(bpy.context, "bench", faces, vertices, None, list(range(1, args.frames + 1)),
                                0, 2.0, mode=args.mode, cache_path=cache)
    build = time.perf_counter() - started
    path = Path(folder) / "bench.blend"
    started = time.perf_counter()
    bpy.ops.wm.save_as_mainfile(filepath=str(path), compress=False)
    save = time.perf_counter() - started
    size = path.stat().st_size
    extra = f"; PC2 {Path(cache).stat().st_size / 2 ** 20:.1f} MB beside it" if args.mode == "mesh_cache" else ""
    depsgraph = bpy.context.evaluated_depsgraph_get()
    co = np.empty(len(rest) * 3, np.float32)
    scale, offset = placement(vertices, 2.0)
    started, error = time.perf_counter(), 0.0
    for f in range(1, args.frames + 1):
        scene.frame_set(f)
        evaluated = obj.evaluated_get(depsgraph).to_mesh()     # the deformed mesh the viewport draws
        evaluated.vertices.foreach_get("co", co)
        error = max(error, float(np.abs(co.reshape(-1, 3) - (vertices[f - 1] - offset) * scale).max()))
        obj.evaluated_get(depsgraph).to_mesh_clear()
    scrub = (time.perf_counter() - started) / args.frames
    print(f"{args.frames} frames x {len(rest)} vertices ({len(faces)} faces), {args.mode}: build {build:.2f} s, "
          f".blend {size / 2 ** 20:.1f} MB (save {save:.2f} s{extra}), scrub {1000 * scrub:.1f} ms/frame "
          f"(evaluated mesh read back; max deviation from the generated frames {error:.1e})")
    shutil.rmtree(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pipeline", help="time and peak memory per window for several clip lengths")
    p.add_argument("--clips", type=int, nargs="+", default=[32, 64, 128, 256])
    for q in (p, sub.add_parser("clip", help="one clip length in this process (used by `pipeline`)")):
        q.add_argument("--pipeline", default=None, help="pipeline folder (default: a fresh tiny one)")
        q.add_argument("--device", default="cpu")
        q.add_argument("--steps", type=int, default=3)
        q.add_argument("--threads", type=int, default=2)
        q.add_argument("--no-mesh-decoder", action="store_true", help="meshes from the Gaussians")
        if q is not p:
            q.add_argument("--clip", type=int, required=True)
    t = sub.add_parser("timeline", help="shape-key object of F frames x V vertices: build, .blend size, scrub")
    t.add_argument("--frames", type=int, default=240)
    t.add_argument("--vertices", type=int, default=20000)
    t.add_argument("--mode", default="shape_keys", choices=["shape_keys", "mesh_cache"])
    args = parser.parse_args()
    {"pipeline": bench_pipeline, "clip": run_clip, "timeline": bench_timeline}[args.command](args)


if __name__ == "__main__":
    main()
