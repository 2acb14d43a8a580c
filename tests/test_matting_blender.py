"""Matting in the add-on (the `bpy` module, headless): the panel's choices, Preview Matte (an image strip in a
new channel above the source, the source untouched, nothing left behind on failure), the matting weights in
the preferences, and Generate 4D with Learned matting on the tiny pipeline (random weights: noise)."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")

from ss4d_blender.blender import matte_preview, operators, preferences  # noqa: E402
from blender_helpers import RecordingLayout  # noqa: E402

pytestmark = pytest.mark.blender
SOURCE_FIELDS = ("name", "channel", "frame_start", "frame_final_start", "frame_final_end", "filepath", "mute",
                 "blend_type", "type")


@pytest.fixture
def scene(addon):
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.ss4d.num_frames, scene.ss4d.target_vertices = 3, 1000
    return scene


def add_movie(scene, path, size=(160, 160)):
    editor = scene.sequence_editor_create()
    strip = editor.strips.new_movie("clip", str(path), channel=1, frame_start=1)
    editor.active_strip = strip
    scene.render.resolution_x, scene.render.resolution_y = size
    return strip


def described(strip) -> dict:
    return {name: getattr(strip, name, None) for name in SOURCE_FIELDS}


def read_png(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGBA"))


def test_matting_choices_in_the_panel(scene, shared_dir):
    from ss4d_blender.blender import panels

    s = scene.ss4d
    items = type(s).bl_rna.properties["matting"].enum_items
    assert [i.identifier for i in items] == ["AUTO", "ALPHA", "LEARNED", "CHROMA"]
    assert [i.name for i in items] == ["Automatic", "Alpha in Source", "Learned (BiRefNet)", "Chroma Key"]
    assert s.matting == "AUTO" and s.matting_quality == "BEST"
    quality = type(s).bl_rna.properties["matting_quality"].enum_items
    assert [i.name for i in quality] == ["Best", "Fast"]
    add_movie(scene, shared_dir / "samples" / "boxing_green.mp4")
    drawn = {}
    for mode in ("AUTO", "ALPHA", "LEARNED", "CHROMA"):
        s.matting = mode
        layout = RecordingLayout()
        panels.SS4D_PT_sequencer.draw(SimpleNamespace(layout=layout), bpy.context)
        drawn[mode] = layout
        assert "ss4d.preview_matte" in layout.operators
    assert "matting_quality" in drawn["AUTO"].props and "matting_quality" in drawn["LEARNED"].props
    assert "matting_quality" not in drawn["ALPHA"].props and "matting_quality" not in drawn["CHROMA"].props
    assert {"REGISTER", "UNDO"} <= operators.SS4D_OT_preview_matte.bl_options


def test_preview_matte_adds_a_strip_above_and_leaves_the_source(scene, shared_dir, tmp_path):
    """Chroma keying happens in Blender (no worker): the preview strip is the keyed frames, in the first free
    channel above the source, each picked frame at its scene frame; the file is saved, so the PNGs go next
    to it."""
    from ss4d_blender.blender import frames as frame_source
    from ss4d_blender.engine.matting import chroma_key

    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "shot.blend"))
    scene = bpy.context.scene
    source = add_movie(scene, shared_dir / "samples" / "boxing_green.mp4")
    blocker = scene.sequence_editor.strips.new_effect("blocker", "COLOR", channel=2, frame_start=5, length=4)
    scene.sequence_editor.active_strip = source
    scene.ss4d.matting = "CHROMA"
    before = described(source)
    assert bpy.ops.ss4d.preview_matte() == {"FINISHED"}
    assert described(source) == before and blocker.channel == 2
    previews = [s for s in scene.sequence_editor.strips_all if matte_preview.PREVIEW_KEY in s.keys()]
    assert len(previews) == 1
    strip = previews[0]
    picked = frame_source.pick_frames(1, 32, 3)
    assert strip.type == "IMAGE" and strip.channel == 3 and strip.blend_type == "REPLACE"
    assert (strip.frame_final_start, strip.frame_final_end - 1) == (picked[0], picked[-1])
    folder = Path(bpy.path.abspath(strip[matte_preview.PREVIEW_KEY]))
    assert folder.parent == tmp_path / "shot_ss4d_matte"
    names = [e.filename for e in strip.elements]
    assert len(names) == picked[-1] - picked[0] + 1
    for k, frame in enumerate(picked):
        assert names[frame - picked[0]] == f"matte_{k:04d}_f{frame:05d}.png"
    expected = chroma_key(frame_source.extract_frames(scene, source, picked), frame_numbers=picked)
    for k, frame in enumerate(picked):
        np.testing.assert_array_equal(read_png(folder / names[frame - picked[0]]), expected[k])
    assert 0.05 < (expected[..., 3] < 128).mean() < 0.95
    assert "added in channel 3" in scene.ss4d.last_message


def test_preview_matte_failure_leaves_nothing(scene, shared_dir, monkeypatch):
    """Undo cannot run in the headless module (bpy.ops.ed.undo's poll needs a window), so the operator's own
    clean-up is what is tested: a failure half-way through writing removes the folder and adds no strip."""
    source = add_movie(scene, shared_dir / "samples" / "boxing_green.mp4")
    scene.ss4d.matting = "CHROMA"
    written = []
    real = matte_preview.write_png

    def fail_on_second(path, rgba):
        if written:
            raise OSError("disk full")
        written.append(Path(path))
        real(path, rgba)
    monkeypatch.setattr(matte_preview, "write_png", fail_on_second)
    before = [described(s) for s in scene.sequence_editor.strips_all]
    with pytest.raises(RuntimeError, match="matte preview could not be written .*disk full"):
        bpy.ops.ss4d.preview_matte()  # the operator reports the error (Blender raises it in the module)
    assert [described(s) for s in scene.sequence_editor.strips_all] == before
    assert written and not written[0].parent.exists()
    assert described(source) == before[0]
    assert not scene.ss4d.running and operators.ACTIVE.client is None


def test_matting_weights_in_the_preferences(addon, tmp_path):
    """Each released matting model: downloaded (with its size and commit) or not (with a Download button);
    a pipeline folder's own model first. Read from the files on a thread, as the other weights."""
    commit = "a" * 40
    snapshot = tmp_path / "cache" / "models--ZhengPeng7--BiRefNet_lite" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(bytes(3 * 2 ** 20))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)
    fake = SimpleNamespace(**{**vars(preferences.HEADLESS), "python": "", "status": "",
                              "cache_dir": str(tmp_path / "cache")}, layout=RecordingLayout())
    preferences.SS4D_AddonPreferences.draw(fake, bpy.context)
    preferences.MATTING_STATUS.wait()
    fake.layout = RecordingLayout()
    preferences.SS4D_AddonPreferences.draw(fake, bpy.context)
    labels = fake.layout.labels
    assert ("Matting Weights (BiRefNet, MIT licence)", "NONE") in labels
    assert any(text.startswith("Pipeline folder's own model") and icon == "CHECKMARK" for text, icon in labels)
    assert ("Fast: ZhengPeng7/BiRefNet_lite downloaded, 3 MB (commit aaaaaaa)", "CHECKMARK") in labels
    assert ("Best: ZhengPeng7/BiRefNet not downloaded (about 885 MB)", "ERROR") in labels
    assert fake.layout.operators.count("ss4d.download_matting_weights") == 1


def test_download_matting_weights_respects_online_access(addon, monkeypatch):
    monkeypatch.setattr(preferences.HEADLESS, "online_access", False)
    with pytest.raises(RuntimeError, match="Online access is disabled"):
        bpy.ops.ss4d.download_matting_weights(quality="fast")  # reported as an error, nothing started
    assert "Online access is disabled" in preferences.HEADLESS.status


def test_learned_matting_preview_and_generate_on_the_tiny_pipeline(scene, shared_dir, tiny):
    """An ordinary video: Preview Matte runs BiRefNet in the worker (the tiny pipeline's own random-weight
    model, whose matte is noise), then Generate 4D with the same choice; the result names the model."""
    source = add_movie(scene, shared_dir / "samples" / "bird_fly_scene.mp4", size=(128, 128))
    scene.ss4d.matting, scene.ss4d.num_frames = "LEARNED", 2
    before = described(source)
    assert bpy.ops.ss4d.preview_matte() == {"FINISHED"}, scene.ss4d.last_message
    strip = next(s for s in scene.sequence_editor.strips_all if matte_preview.PREVIEW_KEY in s.keys())
    assert strip.channel == 2 and described(source) == before
    folder = Path(strip[matte_preview.PREVIEW_KEY])
    alpha = read_png(folder / strip.elements[0].filename)[..., 3]
    assert alpha.shape == (128, 128) and alpha.min() < 128 <= alpha.max()  # a cut-out, not the opaque frame
    scene.sequence_editor.active_strip = source
    assert bpy.ops.ss4d.generate(synchronous=True) == {"FINISHED"}, scene.ss4d.last_message
    obj = bpy.data.objects["SS4D_clip"]
    settings = json.loads(obj["ss4d_settings"])
    assert settings["matting"] == "learned" and Path(settings["matting_source"]) == tiny / "birefnet"
    assert settings["matting_quality"] == "best"


def test_panel_says_when_the_learned_matting_weights_are_missing(scene, tmp_path, monkeypatch):
    from ss4d_blender.blender import panels

    def drawn():
        panels._draw_run(RecordingLayout(), bpy.context)
        preferences.MATTING_STATUS.wait()
        layout = RecordingLayout()
        panels._draw_run(layout, bpy.context)
        return [text for text, icon in layout.labels if icon == "ERROR"]
    scene.ss4d.matting = "LEARNED"
    missing = "Matting weights not on disk: Preferences > Add-ons > SS4D > Matting Weights"
    assert missing not in drawn()  # the tiny pipeline has its own birefnet/
    monkeypatch.setattr(preferences.HEADLESS, "pipeline", str(tmp_path))
    monkeypatch.setattr(preferences.HEADLESS, "cache_dir", str(tmp_path / "empty_cache"))
    assert missing in drawn()
    scene.ss4d.matting = "CHROMA"
    assert missing not in drawn()
