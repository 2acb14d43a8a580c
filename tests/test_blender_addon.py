"""The add-on inside Blender (the `bpy` module, headless) with the tiny random-weight pipeline on the CPU:
registration, the real Generate 4D operator on a movie strip and on an image sequence, failure paths that
must leave the file untouched, cancel, rebuild, and the headless command (.blend, glTF, preview render)."""
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")

import ss4d_blender  # noqa: E402
from ss4d_blender.blender import operators, preferences, scene_build  # noqa: E402
from blender_helpers import RecordingLayout, add_images  # noqa: E402

pytestmark = pytest.mark.blender
REPO = Path(__file__).resolve().parents[1]
DATA_KINDS = ("objects", "meshes", "materials", "images", "actions", "collections", "scenes", "movieclips",
              "shape_keys", "node_groups", "texts", "worlds", "cameras", "lights")


def data_snapshot():
    state = {kind: sorted(x.name for x in getattr(bpy.data, kind)) for kind in DATA_KINDS}
    scene = bpy.context.scene
    state["scene"] = (scene.frame_current, scene.render.filepath, scene.view_settings.view_transform,
                      scene.render.image_settings.color_mode, scene.render.use_sequencer,
                      tuple(s.mute for s in scene.sequence_editor.strips_all) if scene.sequence_editor else ())
    return state


@pytest.fixture
def scene(addon):
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    s = scene.ss4d
    s.num_frames, s.target_vertices, s.matting = 4, 1200, "ALPHA"
    return scene


def add_movie(scene, path):
    editor = scene.sequence_editor_create()
    strip = editor.strips.new_movie("clip", str(path), channel=1, frame_start=1)
    editor.active_strip = strip
    element = strip.elements[0]
    scene.render.resolution_x, scene.render.resolution_y = element.orig_width, element.orig_height
    return strip


def refused(operator=None, **kwargs) -> str:
    """Runs an operator (default: Generate 4D, synchronously) expecting a refusal; returns the message
    (Blender raises RuntimeError for ERROR reports)."""
    if operator is None:
        operator, kwargs = bpy.ops.ss4d.generate, {"synchronous": True, **kwargs}
    with pytest.raises(RuntimeError) as err:
        operator(**kwargs)
    return str(err.value)


def test_register_unregister_leaves_nothing_behind(addon):
    def names():
        return {n for n in dir(bpy.types) if n.startswith("SS4D")}

    def handlers():
        lists = [k for k in dir(bpy.app.handlers) if not k.startswith("_")
                 and isinstance(getattr(bpy.app.handlers, k), list)]
        return {k: len(getattr(bpy.app.handlers, k)) for k in lists}
    registered, handlers_on = names(), handlers()
    assert {"SS4D_OT_generate", "SS4D_OT_cancel", "SS4D_OT_rebuild_mesh", "SS4D_PT_sequencer",
            "SS4D_PT_view3d"} <= registered
    assert hasattr(bpy.types.Scene, "ss4d")
    ss4d_blender.unregister()
    assert names() == set() and not hasattr(bpy.types.Scene, "ss4d")
    assert handlers() == handlers_on
    ss4d_blender.register()
    assert names() == registered


def test_movie_strip_with_chroma_key_end_to_end(scene, shared_dir, monkeypatch):
    captured = {}
    original = scene_build.build_animated_object

    def capture(context, name, faces, vertices, colors, scene_frames, reference_frame, height, *a, **k):
        captured.update(vertices=np.array(vertices), frames=list(scene_frames), height=height)
        return original(context, name, faces, vertices, colors, scene_frames, reference_frame, height, *a, **k)
    monkeypatch.setattr(scene_build, "build_animated_object", capture)
    add_movie(scene, shared_dir / "samples" / "boxing_green.mp4")
    scene.ss4d.matting = "CHROMA"
    scene.ss4d.height = 2.0
    scene.ss4d.collection = "SS4D results"
    scene.cursor.location = (1.0, -2.0, 0.5)
    assert bpy.ops.ss4d.generate(synchronous=True) == {"FINISHED"}
    obj = bpy.data.objects["SS4D_clip"]
    assert tuple(obj.location) == pytest.approx((1.0, -2.0, 0.5))          # at the 3D cursor
    assert [c.name for c in obj.users_collection] == ["SS4D results"]       # in the output collection
    assert bpy.data.collections["SS4D results"].name in scene.collection.children
    key = obj.data.shape_keys
    frames = captured["frames"]
    assert len(frames) == 4 and frames[0] == 1 and frames[-1] == 32  # the strip's whole range
    assert len(key.key_blocks) == 1 + 4 and not key.use_relative
    assert key.animation_data is not None and key.animation_data.action is not None
    assert obj.data.materials[0] is not None and obj.data.color_attributes.get("Color") is not None
    assert obj["ss4d_is_random_weights"] and json.loads(obj["ss4d_scene_frames"]) == frames
    assert Path(obj["ss4d_result_file"]).is_file()
    # the evaluated mesh at a generated frame equals the engine's vertices there (scaled/placed), and halfway
    # between two generated frames it is their linear blend
    scale, offset = obj["ss4d_scale"], np.array(obj["ss4d_offset"])
    engine = (captured["vertices"] - offset) * scale
    heights = engine[..., 2].max() - engine[..., 2].min()
    assert heights == pytest.approx(2.0, rel=1e-4)

    def evaluated(frame):
        scene.frame_set(frame)
        mesh = obj.evaluated_get(bpy.context.evaluated_depsgraph_get()).to_mesh()
        co = np.empty(len(mesh.vertices) * 3, np.float32)
        mesh.vertices.foreach_get("co", co)
        obj.evaluated_get(bpy.context.evaluated_depsgraph_get()).to_mesh_clear()
        return co.reshape(-1, 3)
    np.testing.assert_allclose(evaluated(frames[1]), engine[1], atol=1e-5)
    np.testing.assert_allclose(evaluated(frames[3]), engine[3], atol=1e-5)
    for between in (frames[1] + 1, frames[2] - 1):  # scene frames between two generated ones: linear blend
        s = (between - frames[1]) / (frames[2] - frames[1])
        np.testing.assert_allclose(evaluated(between), (1 - s) * engine[1] + s * engine[2], atol=1e-4)
    # outside the generated range the first / last shape holds
    np.testing.assert_allclose(evaluated(frames[-1] + 5), engine[3], atol=1e-5)


def test_image_strip_frames_honour_trims_and_position(scene, tmp_path):
    """Source image i has red = 20 i + 10 and a transparent left half. The strip starts at scene frame 10 and
    is trimmed by 2 frames at the start and 1 at the end: scene frames 12..16 must show sources 2..6, alpha
    intact, with an overlapping strip above it ignored and the scene restored afterwards."""
    from PIL import Image

    from ss4d_blender.blender import frames

    for i in range(8):
        image = np.zeros((16, 16, 4), np.uint8)
        image[:, 8:] = (20 * i + 10, 100, 50, 255)
        Image.fromarray(image, "RGBA").save(tmp_path / f"src_{i:02d}.png")
    strip = add_images(scene, tmp_path)
    strip.frame_start = 10
    strip.frame_offset_start, strip.frame_offset_end = 2, 1
    cover = scene.sequence_editor.strips.new_effect("cover", "COLOR", channel=2, frame_start=1, length=40)
    cover.color = (0.0, 0.0, 1.0)
    scene.sequence_editor.active_strip = strip
    scene.frame_current = 3
    assert frames.strip_range(strip) == (12, 16)
    assert frames.pick_frames(12, 16, 3) == [12, 14, 16]
    out = frames.extract_frames(scene, strip, [12, 14, 16])
    assert out.shape == (3, 16, 16, 4)
    assert out[:, :, 8:, 0].reshape(3, -1).mean(1).round().tolist() == [50, 90, 130]   # sources 2, 4, 6
    assert (np.abs(out[:, :, 8:, 1].astype(int) - 100) <= 1).all()                     # sRGB kept as is
    assert (out[:, :, :8, 3] == 0).all() and (out[:, :, 8:, 3] == 255).all()           # alpha kept
    assert scene.frame_current == 3 and not cover.mute                                  # scene restored


def test_movie_strip_frames_are_the_source_frames_blender_shows(scene, shared_dir):
    """A trimmed movie strip: each extracted frame is closer to the source frame it should show (decoded
    independently with PyAV) than to that frame's neighbours."""
    import av

    from ss4d_blender.blender import frames

    path = shared_dir / "samples" / "boxing_green.mp4"
    with av.open(str(path)) as container:
        source = [f.to_ndarray(format="rgb24").astype(np.float32) for f in container.decode(video=0)]
        fps = container.streams.video[0].average_rate
    scene.render.fps, scene.render.fps_base = int(fps), 1.0
    strip = add_movie(scene, path)
    strip.frame_start, strip.frame_offset_start = 1, 5           # scene frame f shows source frame f - 1
    assert frames.strip_range(strip)[0] == 6
    picked = [6, 15, 24]
    out = frames.extract_frames(scene, strip, picked)
    for frame, image in zip(picked, out):
        diffs = {k: float(np.abs(image[..., :3].astype(np.float32) - source[k]).mean()) for k in
                 range(frame - 3, frame + 2)}
        assert min(diffs, key=diffs.get) == frame - 1, diffs


@pytest.mark.parametrize("name,codec,pix_fmt", [("png.mov", "png", "rgba"), ("qtrle.mov", "qtrle", "argb"),
                                                ("prores4444.mov", "prores_ks", "yuva444p10le"),
                                                ("vp9.webm", "libvpx-vp9", "yuva420p")])
def test_movie_strips_with_alpha_keep_it(scene, shared_dir, tmp_path, name, codec, pix_fmt):
    """'Alpha in source' with movie files: Blender's decoder keeps the alpha of the usual alpha codecs."""
    from PIL import Image
    from media import write_video

    from ss4d_blender.blender import frames

    files = sorted((shared_dir / "samples" / "boxing").glob("*.png"))[:6]
    source = np.stack([np.asarray(Image.open(f).convert("RGBA").resize((96, 96))) for f in files])
    strip = add_movie(scene, write_video(tmp_path / name, source, codec, pix_fmt))
    scene.render.fps, scene.render.fps_base = 24, 1.0
    out = frames.extract_frames(scene, strip, [1, 3, 6])
    alpha_error = np.abs(out[..., 3].astype(int) - source[[0, 2, 5], ..., 3]).mean()
    assert alpha_error < (1.0 if codec == "libvpx-vp9" else 0.01), alpha_error


def drawn_after_probes(draw, *args) -> RecordingLayout:
    """Draws once (which starts the background probes of what is on disk), waits for the probes, and
    returns what a second draw shows."""
    draw(RecordingLayout(), *args)
    preferences.WEIGHTS_STATUS.wait()
    preferences.RUNTIME.wait()
    layout = RecordingLayout()
    draw(layout, *args)
    return layout


def test_panel_says_when_weights_are_missing(scene, tmp_path, tiny):
    from ss4d_blender.blender import panels

    saved = preferences.HEADLESS.pipeline
    try:
        preferences.HEADLESS.pipeline = str(tmp_path)            # a folder without pipeline.json
        layout = drawn_after_probes(panels._draw_run, bpy.context)
        assert ("Weights not on disk: Preferences > Add-ons > SS4D > Download Weights", "ERROR") in layout.labels
        assert ("SS4D: local folder has no pipeline.json", "NONE") in layout.labels
        assert "ss4d.generate" in layout.operators
        preferences.HEADLESS.pipeline = str(tiny)
        layout = drawn_after_probes(panels._draw_run, bpy.context)
        assert not any("Weights not on disk" in text for text, _ in layout.labels)
        # the preferences list every source with its state
        fake = SimpleNamespace(**{**vars(preferences.HEADLESS), "python": "", "status": ""}, layout=RecordingLayout())
        fake.mesh_decoder = "none"

        def draw_preferences(layout, context):
            fake.layout = layout
            preferences.SS4D_AddonPreferences.draw(fake, context)
        drawn_after_probes(draw_preferences, bpy.context)
        assert ("SS4D: local folder ready", "CHECKMARK") in fake.layout.labels
        assert ("Mesh decoder: none (meshes from the Gaussians)", "CHECKMARK") in fake.layout.labels
        assert "ss4d.download_weights" in fake.layout.operators
    finally:
        preferences.HEADLESS.pipeline = saved


def draw_panel(context) -> RecordingLayout:
    from ss4d_blender.blender import panels

    fake = SimpleNamespace(layout=RecordingLayout())
    panels.SS4D_PT_sequencer.draw(fake, context)
    return fake.layout


def test_panel_draws_in_every_state(scene, shared_dir, tiny):
    """The sidebar panel: no strip -> the reason; a strip -> its name, range and every setting; chroma
    settings only with chroma matting; after a run, Rebuild and the result's facts (random weights said)."""
    layout = draw_panel(bpy.context)
    assert any("No strip selected" in text and icon == "ERROR" for text, icon in layout.labels)
    add_movie(scene, shared_dir / "samples" / "boxing_green.mp4")
    layout = draw_panel(bpy.context)
    assert ("clip  (movie, frames 1-32)", "SEQUENCE") in layout.labels
    for name in ("num_frames", "matting", "seed", "steps", "guidance", "target_vertices", "auto_reference",
                 "smoothing", "height", "collection"):
        assert name in layout.props
    assert "key_color" not in layout.props and "ss4d.generate" in layout.operators
    assert "reference_frame" not in layout.props
    scene.ss4d.auto_reference = False
    assert "reference_frame" in draw_panel(bpy.context).props
    scene.ss4d.matting = "CHROMA"
    props = set(draw_panel(bpy.context).props)
    assert {"auto_key_color", "tolerance", "softness"} <= props and "key_color" not in props  # measured
    scene.ss4d.auto_key_color = False
    assert "key_color" in draw_panel(bpy.context).props
    scene.ss4d.auto_key_color = True
    scene.ss4d.num_frames = 2
    assert bpy.ops.ss4d.generate(synchronous=True) == {"FINISHED"}
    bpy.context.view_layer.objects.active = bpy.data.objects["SS4D_clip"]
    layout = draw_panel(bpy.context)
    assert "ss4d.rebuild_mesh" in layout.operators
    assert any(text.startswith("2 frames, seed") for text, _ in layout.labels)
    assert ("Random-weight test pipeline: the shape is noise.", "ERROR") in layout.labels


def test_drawing_never_waits_for_the_runtime_or_the_disk(scene, tmp_path, monkeypatch):
    """Drawing the preferences and the panel only reads stored state: finding the runtime (a subprocess that
    imports torch, up to 120 s) and looking at the weights on disk happen on background threads, and the
    next draw shows their answers."""
    from ss4d_blender import runtime_env
    from ss4d_blender.blender import panels
    from ss4d_blender.engine import hub

    calls = []

    def slow(kind, answer):
        def probe(*args, **kwargs):
            calls.append((kind, threading.current_thread(), str(args)))
            time.sleep(1.0)
            return answer
        return probe
    monkeypatch.setattr(runtime_env, "find_runtime_python", slow("runtime", None))
    monkeypatch.setattr(hub, "weights_status", slow("weights", [(False, "SS4D: not on disk (probed)")]))
    monkeypatch.setattr(preferences.HEADLESS, "pipeline", str(tmp_path / "weights"))   # keys never asked before
    fake = SimpleNamespace(**{**vars(preferences.HEADLESS), "python": str(tmp_path / "python"), "status": ""},
                           layout=RecordingLayout())
    started = time.monotonic()
    preferences.SS4D_AddonPreferences.draw(fake, bpy.context)
    panel = RecordingLayout()
    panels._draw_run(panel, bpy.context)
    assert time.monotonic() - started < 0.5
    assert ("Looking for the runtime...", "TIME") in fake.layout.labels
    assert ("Looking for the weights...", "TIME") in fake.layout.labels
    assert "ss4d.generate" in panel.operators
    preferences.RUNTIME.wait()
    preferences.WEIGHTS_STATUS.wait()
    assert {kind for kind, _, _ in calls} == {"runtime", "weights"}
    assert threading.main_thread() not in {thread for _, thread, _ in calls}
    fake.layout = RecordingLayout()
    preferences.SS4D_AddonPreferences.draw(fake, bpy.context)
    assert ("Not installed yet", "ERROR") in fake.layout.labels
    assert ("SS4D: not on disk (probed)", "ERROR") in fake.layout.labels
    panel = RecordingLayout()
    panels._draw_run(panel, bpy.context)
    assert ("SS4D: not on disk (probed)", "NONE") in panel.labels
    # one question per key: the answers are kept for the next draws (and shared by the panel and preferences)
    assert len(calls) == len({(kind, key) for kind, _, key in calls})


def test_panel_names_a_refused_strip_in_full(scene, tmp_path):
    """A strip the panel refuses keeps its whole name in the message: a strip named like a file is not cut
    at its first '.' (which once showed "The active strip 'music.")."""
    import wave

    with wave.open(str(tmp_path / "music.wav"), "wb") as sound:
        sound.setnchannels(1)
        sound.setsampwidth(2)
        sound.setframerate(8000)
        sound.writeframes(bytes(8000))
    editor = scene.sequence_editor_create()
    editor.active_strip = editor.strips.new_sound("music.wav", str(tmp_path / "music.wav"), channel=1, frame_start=1)
    errors = [text for text, icon in draw_panel(bpy.context).labels if icon == "ERROR"]
    assert len(errors) == 1 and "'music.wav' is a sound strip" in errors[0], errors


def test_panel_shows_the_engine_errors_and_nothing_else(scene, monkeypatch):
    """Only SS4DError messages are meant for the artist; a bug elsewhere is not turned into a label."""
    from ss4d_blender.blender import frames

    def broken(scene):
        raise AttributeError("'NoneType' object has no attribute 'strips'")
    monkeypatch.setattr(frames, "active_strip", broken)
    with pytest.raises(AttributeError):
        draw_panel(bpy.context)


def test_labels_show_a_message_up_to_its_first_full_stop():
    from ss4d_blender.blender.panels import first_sentence

    assert first_sentence("No strip selected. In the Video Sequencer, click the strip.") == "No strip selected."
    assert first_sentence("The strip 'music.wav' is a sound strip. Select a movie.") == \
        "The strip 'music.wav' is a sound strip."
    assert first_sentence("Version 1.5 of clip.mp4 failed!  Try again.") == "Version 1.5 of clip.mp4 failed!"
    assert first_sentence("No full stop at all") == "No full stop at all"


def test_default_settings_are_the_engines_defaults(scene, monkeypatch):
    """The add-on passes the engine what the user set, in the user's spellings; untouched panel and
    preferences give exactly the engine's default settings (no default is restated on the way)."""
    from ss4d_blender.blender import jobs
    from ss4d_blender.engine.api import GenerateSettings

    monkeypatch.setattr(preferences, "HEADLESS", preferences.HeadlessPreferences())
    assert GenerateSettings.from_user(**jobs.engine_settings(bpy.context)) == GenerateSettings()
    # the stand-in preferences have the add-on preferences' fields and defaults
    assert {k: v for k, v in vars(preferences.HEADLESS).items() if k != "online_access"} == \
        preferences.property_defaults(preferences.SS4D_AddonPreferences)
    scene.ss4d.steps, scene.ss4d.guidance = 12, 3.5
    preferences.HEADLESS.mesh_decoder, preferences.HEADLESS.revision = "none", "abc123"
    settings = GenerateSettings.from_user(**jobs.engine_settings(bpy.context))
    assert (settings.steps, settings.cfg, settings.mesh_decoder, settings.revision) == (12, 3.5, None, "abc123")


def test_background_tasks_run_on_a_thread_and_report_their_status(scene, monkeypatch):
    """Install Runtime runs its task on a thread (which never gets bpy objects, only a snapshot of the
    preferences); its status and its error reach the preferences and the operator's report."""
    from ss4d_blender import runtime_env

    seen = []

    def install(runtime_dir, flavour, progress, log_path, should_stop):
        seen.append((threading.current_thread(), type(runtime_dir), flavour))
        progress("Installing torch")
    monkeypatch.setattr(runtime_env, "install_runtime", install)
    monkeypatch.setattr(preferences.HEADLESS, "status", "")
    assert bpy.ops.ss4d.install_runtime() == {"FINISHED"}
    assert seen == [(seen[0][0], type(preferences.runtime_directory()), preferences.HEADLESS.runtime_flavour)]
    assert seen[0][0] is not threading.main_thread()
    assert preferences.HEADLESS.status == "Runtime installed."

    def fail(*args, **kwargs):
        raise RuntimeError("Installing torch failed (see runtime-install.log): no space left on device")
    monkeypatch.setattr(runtime_env, "install_runtime", fail)
    assert "no space left on device" in refused(bpy.ops.ss4d.install_runtime)
    assert preferences.HEADLESS.status.endswith("no space left on device")


def test_without_online_access_nothing_touches_the_network(scene):
    """Blender's 'Allow Online Access' off: the worker runs with HF_HUB_OFFLINE=1 and the two operators that
    download (weights, runtime) refuse with a message, changing nothing."""
    import os

    saved = preferences.HEADLESS.online_access
    try:
        preferences.HEADLESS.online_access = False
        assert operators.worker_environment(bpy.context)["HF_HUB_OFFLINE"] == "1"
        before = data_snapshot()
        for operator in (bpy.ops.ss4d.download_weights, bpy.ops.ss4d.install_runtime):
            assert "Online access is disabled" in refused(operator)
        assert data_snapshot() == before
        preferences.HEADLESS.online_access = True
        assert operators.worker_environment(bpy.context).get("HF_HUB_OFFLINE") == os.environ.get("HF_HUB_OFFLINE")
    finally:
        preferences.HEADLESS.online_access = saved


def test_no_strip_leaves_file_unchanged(scene):
    before = data_snapshot()
    message = refused()
    assert "No strip selected" in message and "No strip selected" in scene.ss4d.last_message
    assert data_snapshot() == before


def test_rgb_strip_without_alpha_is_refused(scene, tmp_path):
    from PIL import Image
    for i in range(3):
        Image.fromarray(np.full((64, 64, 3), 40 * i + 20, np.uint8), "RGB").save(tmp_path / f"f{i}.png")
    add_images(scene, tmp_path)
    before = data_snapshot()
    message = refused().lower()
    assert "alpha" in message and "chroma" in message
    assert data_snapshot() == before


def test_cancel_during_generation_leaves_file_unchanged(scene, shared_dir):
    add_images(scene, shared_dir / "samples" / "rose")
    before = data_snapshot()

    def cancel_when_running():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            client = operators.ACTIVE.client
            if client is not None and client.snapshot().stage not in ("Starting",):
                operators.request_cancel()
                return
            time.sleep(0.05)
    threading.Thread(target=cancel_when_running, daemon=True).start()
    assert bpy.ops.ss4d.generate(synchronous=True) == {"CANCELLED"}
    assert scene.ss4d.last_message == "Cancelled."
    assert data_snapshot() == before
    assert operators.ACTIVE.client is None


class ModalContext:
    """bpy.context with a window manager that records removed timers (the bpy module has no windows)."""

    def __init__(self):
        self.removed_timers = []
        self.window_manager = SimpleNamespace(windows=[], event_timer_remove=self.removed_timers.append)

    def __getattr__(self, name):
        return getattr(bpy.context, name)


class ModalDriver(operators._JobOperator):
    """The operators' modal loop without Blender's event system: `modal` is called with timer and key events
    as Blender would (the bpy module cannot run modal operators)."""

    def __init__(self):
        self.reports = []

    def report(self, kind, message):
        self.reports.append((set(kind), message))

    def make_job(self, context):
        return operators.jobs.generate_job(context)

    def run(self, context, cancel_after_events: int = -1) -> tuple[set, list]:
        self._start(context)
        self._timer = "timer"
        stages, events = [], 0
        while True:
            assert self.modal(context, SimpleNamespace(type="MOUSEMOVE")) == {"PASS_THROUGH"}
            if events == cancel_after_events:
                self.modal(context, SimpleNamespace(type="ESC"))
            result = self.modal(context, SimpleNamespace(type="TIMER"))
            events += 1
            if result != {"RUNNING_MODAL"}:
                return result, stages
            stages.append((context.scene.ss4d.running, context.scene.ss4d.stage))
            time.sleep(0.05)


def test_modal_loop_shows_progress_finishes_and_cancels_with_esc(scene, shared_dir):
    add_images(scene, shared_dir / "samples" / "rose", name="rose")
    scene.ss4d.num_frames = 2
    context = ModalContext()
    before = data_snapshot()
    result, stages = ModalDriver().run(context, cancel_after_events=0)
    assert result == {"CANCELLED"} and scene.ss4d.last_message == "Cancelled."
    assert data_snapshot() == before and operators.ACTIVE.client is None
    result, stages = ModalDriver().run(context)
    assert result == {"FINISHED"} and "SS4D_rose" in bpy.data.objects
    assert context.removed_timers == ["timer", "timer"]
    # the panel follows the worker: the stages it shows (sampled every 50 ms, so quick ones can pass unseen)
    # are the engine's, in pipeline order
    from ss4d_blender.engine.api import STAGES

    assert stages and all(running for running, _ in stages)
    shown = [stage for _, stage in stages if stage != "Starting"]
    assert set(shown) <= set(STAGES) and len(set(shown)) >= 2, shown
    assert [STAGES.index(s) for s in shown] == sorted(STAGES.index(s) for s in shown), shown
    assert not scene.ss4d.running and scene.ss4d.last_message.startswith("Created 'SS4D_rose'")


def test_rebuild_mesh_reuses_the_result(scene, shared_dir, monkeypatch):
    add_images(scene, shared_dir / "samples" / "rose", name="rose")
    assert bpy.ops.ss4d.generate(synchronous=True) == {"FINISHED"}
    obj = bpy.data.objects["SS4D_rose"]
    first = len(obj.data.vertices)
    # a new object is selected and active, as anything Blender adds
    assert bpy.context.view_layer.objects.active == obj and bpy.context.selected_objects == [obj]
    scene.ss4d.target_vertices = 600
    # the reference is chosen on the timeline: the generated frame nearest to it gives the topology
    timeline = json.loads(obj["ss4d_scene_frames"])
    scene.ss4d.auto_reference, scene.ss4d.reference_frame = False, timeline[2] + 1
    references = []
    original = scene_build.replace_animation
    monkeypatch.setattr(scene_build, "replace_animation",
                        lambda *a, **k: references.append(a[5]) or original(*a, **k))
    assert bpy.ops.ss4d.rebuild_mesh(synchronous=True) == {"FINISHED"}
    assert references == [2]
    rebuilt = bpy.data.objects["SS4D_rose"]
    assert len(bpy.data.objects) == 1 and len(bpy.data.meshes) == 1
    assert len(rebuilt.data.vertices) < first
    assert len(rebuilt.data.shape_keys.key_blocks) == 5
    # it takes the old object's place in the selection too
    assert bpy.context.view_layer.objects.active == rebuilt and rebuilt.select_get()


def test_frames_that_fit_poorly_are_named_on_the_timeline(scene, shared_dir):
    """Registration's bad frames reach the artist: the message after Rebuild Mesh, the panel and the
    object's properties name them by timeline frame; the fit errors are the new run's. The result file
    is replaced by a clean synthetic sequence whose third frame is a far-away, small other shape."""
    from ss4d_blender.blender import panels
    from ss4d_blender.testing.synthetic import make_sequence
    from ss4d_blender.engine.result import load_result
    from ss4d_blender.engine.types import Mesh

    add_images(scene, shared_dir / "samples" / "rose", name="rose")
    assert bpy.ops.ss4d.generate(synchronous=True) == {"FINISHED"}
    obj = bpy.data.objects["SS4D_rose"]
    timeline = json.loads(obj["ss4d_scene_frames"])
    path = Path(bpy.path.abspath(obj["ss4d_result_file"]))
    result = load_result(path)
    seq = make_sequence("capsule_bend", result.num_frames, resolution=0.3, seed=1)
    result.meshes = [Mesh(v, f) for v, f in zip(seq.vertices, seq.faces)]
    result.meshes[2] = Mesh(seq.vertices[2] * 0.2 + np.float32([3, 0, 0]), seq.faces[2])
    result.save(path)
    panels._result_info_cache.clear()
    bpy.context.view_layer.objects.active = obj
    assert bpy.ops.ss4d.rebuild_mesh(synchronous=True) == {"FINISHED"}
    obj = bpy.data.objects["SS4D_rose"]
    assert json.loads(obj["ss4d_bad_frames"]) == [timeline[2]]
    errors = json.loads(obj["ss4d_fit_error"])
    assert errors[2] > 0.01 * seq.diagonal and max(errors[:2] + errors[3:]) < 0.005 * seq.diagonal
    assert f"Frame {timeline[2]}: the mesh could not follow" in scene.ss4d.last_message
    assert (f"Poor fit: Frame {timeline[2]}", "ERROR") in draw_panel(bpy.context).labels


FBX_CHECK = """
bpy.ops.import_scene.fbx(filepath=path)
keys = [o for o in bpy.data.objects if o.type == "MESH"][0].data.shape_keys
values = []
for frame in range(1, 40):
    bpy.context.scene.frame_set(frame)
    values += [b.value for b in keys.key_blocks[1:]]
animated = keys.animation_data is not None and keys.animation_data.action is not None
print(len(keys.key_blocks), animated, max(values) > 0.99, min(values) < 0.01)
"""
ABC_CHECK = """
bpy.ops.wm.alembic_import(filepath=path)
obj = [o for o in bpy.data.objects if o.type == "MESH"][0]
def positions(frame):
    bpy.context.scene.frame_set(frame)
    return [tuple(v.co) for v in obj.evaluated_get(bpy.context.evaluated_depsgraph_get()).to_mesh().vertices]
a, b = positions(1), positions(32)
print(len(a) == len(b) > 0, max(abs(p - q) for u, w in zip(a, b) for p, q in zip(u, w)) > 1e-3)
"""
BLEND_CHECK = """
bpy.ops.wm.open_mainfile(filepath=path)
keys = bpy.data.objects["SS4D_rose"].data.shape_keys
print(len(keys.key_blocks), keys.use_relative, keys.animation_data.action is not None)
"""


def in_fresh_blender(snippet: str, path: Path) -> str:
    """Runs a bpy snippet (with `path` set) in a new process on an empty file; returns its last line."""
    code = "import sys, bpy\nbpy.ops.wm.read_factory_settings(use_empty=True)\npath = sys.argv[1]\n" + snippet
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return lines[-1]


def test_headless_command_blend_gltf_and_preview(tmp_path, tiny, shared_dir):
    out = tmp_path / "rose.blend"
    glb, fbx, abc = tmp_path / "rose.glb", tmp_path / "rose.fbx", tmp_path / "rose.abc"
    cmd = [sys.executable, "-m", "ss4d_blender", "generate", str(shared_dir / "samples" / "rose"), "-o", str(out),
           "--export", str(glb), "--export", str(fbx), "--export", str(abc), "--pipeline", str(tiny),
           "--frames", "4", "--vertices", "1000", "--device", "cpu", "--height", "0.5"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "random-weight" in proc.stderr
    assert out.is_file() and glb.is_file()
    assert (tmp_path / "rose_SS4D_rose_ss4d.safetensors").is_file()
    # glTF keeps the 4 morph targets and animates their weights
    data = glb.read_bytes()
    length = int.from_bytes(data[12:16], "little")
    gltf = json.loads(data[20:20 + length])
    primitive = gltf["meshes"][0]["primitives"][0]
    assert len(primitive["targets"]) == 4
    assert any(ch["target"]["path"] == "weights" for a in gltf.get("animations", []) for ch in a["channels"])
    # FBX keeps the 4 blend shapes and their animated weights (read back with Blender's importer)
    assert in_fresh_blender(FBX_CHECK, fbx) == "5 True True True"
    # Alembic bakes the vertex positions per frame: the imported mesh moves
    assert in_fresh_blender(ABC_CHECK, abc) == "True True"
    # the .blend reopens with the animated object
    assert in_fresh_blender(BLEND_CHECK, out) == "5 False True"
    # the preview script renders three frames with Cycles on the CPU
    previews = tmp_path / "preview"
    proc = subprocess.run([sys.executable, str(REPO / "docs" / "render_preview.py"), str(out), str(previews),
                           "--resolution", "64", "--samples", "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(previews.glob("*.png"))) == 3


def test_headless_command_unreadable_video_is_a_clear_error(tmp_path, tiny):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video")
    proc = subprocess.run([sys.executable, "-m", "ss4d_blender", "generate", str(bad), "-o", str(tmp_path / "x.blend"),
                           "--pipeline", str(tiny)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "cannot decode" in (proc.stderr + proc.stdout)
    assert not (tmp_path / "x.blend").exists()


def test_device_choices_name_the_runtime_gpus():
    items = preferences.device_items(["NVIDIA H100 80GB HBM3", "NVIDIA RTX 4090"], platform="linux")
    assert [i[0] for i in items] == ["auto", "cpu", "cuda:0", "cuda:1"]
    assert items[2][1] == "CUDA 0: NVIDIA H100 80GB HBM3"
    assert [i[0] for i in preferences.device_items([], platform="linux")] == ["auto", "cpu"]
    assert [i[0] for i in preferences.device_items(None, platform="darwin")] == ["auto", "cpu", "mps"]
    assert "cuda:0" in [i[0] for i in preferences.device_items(None, platform="linux")]  # not asked yet
