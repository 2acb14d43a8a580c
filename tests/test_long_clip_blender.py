"""Long clips in the add-on and the headless command (the `bpy` module, the tiny random-weight pipeline on the
CPU): All Frames with a Step picks the scene frames however long the strip is, Generate 4D runs them in
windows through the worker, a cancel keeps the finished windows and the next run continues from them, and
the Mesh Cache timeline builds a Mesh Cache modifier reading a .pc2 beside the .blend (on rebuild too)."""
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")

from ss4d_blender.blender import jobs, operators, preferences, scene_build  # noqa: E402
from ss4d_blender.engine.errors import InputError  # noqa: E402
from blender_helpers import add_images  # noqa: E402

pytestmark = pytest.mark.blender


def test_headless_frames_all_takes_every_frame_of_a_strip_longer_than_256(addon, tmp_path, monkeypatch):
    from PIL import Image

    from ss4d_blender.__main__ import build_parser
    from ss4d_blender.blender.headless import apply_settings

    monkeypatch.setattr(preferences, "HEADLESS", preferences.HeadlessPreferences())
    files = []
    for i in range(300):
        files.append(tmp_path / f"{i:03d}.png")
        Image.new("RGBA", (8, 8), (i % 256, 0, 0, 255)).save(files[-1])
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    strip = add_images(scene, files, "long")

    def picked(*flags):
        args = build_parser().parse_args(["generate", str(tmp_path), "-o", str(tmp_path / "o.blend"), *flags])
        apply_settings(args, scene, strip)
        return jobs._picked_frames(scene, strip)

    assert picked("--frames", "all") == list(range(1, 301))                    # past the panel's 256 cap
    assert picked("--frames", "all", "--step", "2") == list(range(1, 301, 2))
    assert picked("--frames", "all", "--start", "11", "--end", "290", "--step", "3") == list(range(11, 291, 3))
    assert len(picked("--frames", "8")) == 8                                    # N still spreads N frames
    with pytest.raises(InputError, match="--step 2 needs --frames all"):
        picked("--frames", "8", "--step", "2")
    with pytest.raises(InputError, match="outside the add-on's range"):
        picked("--frames", "300")


def evaluated(obj, frame) -> np.ndarray:
    bpy.context.scene.frame_set(frame)
    depsgraph = bpy.context.evaluated_depsgraph_get()
    mesh = obj.evaluated_get(depsgraph).to_mesh()
    co = np.empty(len(mesh.vertices) * 3, np.float32)
    mesh.vertices.foreach_get("co", co)
    obj.evaluated_get(depsgraph).to_mesh_clear()
    return co.reshape(-1, 3)


def cancel_in_window(number: int) -> threading.Thread:
    def watch():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            client = operators.ACTIVE.client
            if client is not None and client.snapshot().stage.startswith(f"Window {number} of"):
                operators.request_cancel()
                return
            time.sleep(0.02)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_all_frames_in_windows_cancel_resume_and_mesh_cache(addon, shared_dir, tmp_path, monkeypatch):
    """Scene frames 1, 3, .., 11 of the rose strip (All Frames, Step 2) in windows of 4 overlapping by 2
    (2 windows): cancelled in window 2, window 1 is kept and the report says how to continue; Generate 4D
    again continues and builds a Mesh Cache object; Rebuild Mesh writes a new .pc2."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    s = scene.ss4d
    s.target_vertices, s.matting, s.steps = 600, "ALPHA", 1
    s.use_strip_range, s.frame_start, s.frame_end = False, 1, 12
    s.frame_choice, s.frame_step, s.window, s.overlap = "ALL", 2, 4, 2
    s.timeline = "MESH_CACHE"
    add_images(scene, sorted((shared_dir / "samples" / "rose").glob("*.png")), "rose")
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "long.blend"))
    cache = jobs.window_cache_folder("rose")
    assert cache.parent == tmp_path

    cancel_in_window(2)
    assert bpy.ops.ss4d.generate(synchronous=True) == {"CANCELLED"}
    assert s.last_message == ("Cancelled after window 1 of 2; Generate 4D again with the same settings continues "
                              "from there.")
    assert sorted(p.name for p in cache.glob("*/window_*")) == ["window_000.safetensors"]
    assert not bpy.data.objects

    captured = {}
    original = scene_build.build_animated_object

    def capture(context, name, faces, vertices, *a, **k):
        captured.update(vertices=np.array(vertices), mode=k.get("mode"))
        return original(context, name, faces, vertices, *a, **k)
    monkeypatch.setattr(scene_build, "build_animated_object", capture)
    stages = []
    watching = True

    def watch_stages():
        while watching:
            client = operators.ACTIVE.client
            if client is not None:
                stages.append(client.snapshot().stage)
            time.sleep(0.01)
    threading.Thread(target=watch_stages, daemon=True).start()
    assert bpy.ops.ss4d.generate(synchronous=True) == {"FINISHED"}
    watching = False
    assert not any(stage.startswith("Window 1 of 2") for stage in stages)   # continued after window 1
    assert not cache.exists()                                             # the result file holds everything
    obj = bpy.data.objects["SS4D_rose"]
    assert json.loads(obj["ss4d_scene_frames"]) == [1, 3, 5, 7, 9, 11]
    settings = json.loads(obj["ss4d_settings"])
    assert settings["windows"] == [[0, 4], [2, 6]] and settings["step"] == 1
    assert captured["mode"] == "mesh_cache" and obj.data.shape_keys is None
    modifier = next(m for m in obj.modifiers if m.type == "MESH_CACHE")
    assert modifier.filepath == "//ss4d_cache/SS4D_rose.pc2"
    assert (tmp_path / "ss4d_cache" / "SS4D_rose.pc2").is_file()
    assert "a Mesh Cache (//ss4d_cache/SS4D_rose.pc2)" in s.last_message
    scale, offset = obj["ss4d_scale"], np.array(obj["ss4d_offset"])
    engine = (captured["vertices"] - offset) * scale
    np.testing.assert_allclose(evaluated(obj, 5), engine[2], atol=1e-4)          # generated frame 2 at scene 5
    np.testing.assert_allclose(evaluated(obj, 6), (engine[2] + engine[3]) / 2, atol=1e-4)

    # Rebuild Mesh keeps the chosen timeline and never overwrites the .pc2 the old object reads
    assert bpy.ops.ss4d.rebuild_mesh(synchronous=True) == {"FINISHED"}
    rebuilt = bpy.data.objects["SS4D_rose"]
    assert [m.filepath for m in rebuilt.modifiers if m.type == "MESH_CACHE"] == ["//ss4d_cache/SS4D_rose_2.pc2"]
    s.timeline = "SHAPE_KEYS"
    assert bpy.ops.ss4d.rebuild_mesh(synchronous=True) == {"FINISHED"}
    rebuilt = bpy.data.objects["SS4D_rose"]
    assert len(rebuilt.data.shape_keys.key_blocks) == 1 + 6 and not rebuilt.modifiers
    assert Path(bpy.path.abspath(rebuilt["ss4d_result_file"])).is_file()
