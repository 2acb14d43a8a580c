"""Convert to Armature inside Blender (the `bpy` module): the operator on a generated object (a capsule
made by known skinning, built as Generate 4D builds its objects), Blender's evaluated mesh against the
shape keys at every generated frame, correctives, the muted shape-key layer, failure leaving the file
untouched, the round trip through Blender's own glTF and FBX exporters and importers, and the headless
`rig_blend_file`."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")

import ss4d_blender  # noqa: E402
from rig_synthetic import skinned_capsule  # noqa: E402
from ss4d_blender.blender import armature, preferences, scene_build  # noqa: E402

pytestmark = pytest.mark.blender
FRAMES = [1, 4, 7, 10, 13, 16]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def addon():
    bpy.ops.wm.read_factory_settings(use_empty=True)
    ss4d_blender.register()
    yield
    ss4d_blender.unregister()


def generated_object(breathing: float = 0.0):
    """A fresh scene with one object built as Generate 4D builds it (absolute shape keys on scene frames)."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    capsule = skinned_capsule(bones=3, frames=len(FRAMES), rings=24, around=12, breathing=breathing)
    context = bpy.context
    obj = scene_build.build_animated_object(context, "SS4D_capsule", capsule.faces, capsule.vertices, None, FRAMES,
                                            0, 2.0, "", {"ss4d_scene_frames": FRAMES})
    obj.location = (0.5, -0.25, 0.1)
    obj.rotation_euler = (0.0, 0.0, 0.3)
    context.view_layer.objects.active = obj
    obj.select_set(True)
    return obj


def evaluated_world(obj, frame: int) -> np.ndarray:
    """Blender's evaluated mesh of an object at a scene frame, world coordinates [V, 3]."""
    bpy.context.scene.frame_set(frame)
    evaluated = obj.evaluated_get(bpy.context.evaluated_depsgraph_get())
    mesh = evaluated.to_mesh()
    co = np.empty(len(mesh.vertices) * 3, np.float32)
    mesh.vertices.foreach_get("co", co)
    matrix = np.array(evaluated.matrix_world)
    evaluated.to_mesh_clear()
    return co.reshape(-1, 3) @ matrix[:3, :3].T + matrix[:3, 3]


def shape_key_world(obj, index: int) -> np.ndarray:
    block = obj.data.shape_keys.key_blocks[index + 1]
    co = np.empty(len(block.data) * 3, np.float32)
    block.data.foreach_get("co", co)
    matrix = np.array(obj.matrix_world)
    return co.reshape(-1, 3) @ matrix[:3, :3].T + matrix[:3, 3]


def rebuild_relations() -> None:
    """Setting `NlaTrack.mute` from Python does not rebuild the dependency graph's relations (a track muted
    when they were built stays unevaluated on frame changes); linking an object does."""
    empty = bpy.data.objects.new("relations", None)
    bpy.context.scene.collection.objects.link(empty)
    bpy.data.objects.remove(empty)


def diagonal(points: np.ndarray) -> float:
    return float(np.linalg.norm(points.max(0) - points.min(0)))


def weights_of(obj) -> tuple[list[str], np.ndarray]:
    names = [g.name for g in obj.vertex_groups]
    weights = np.zeros((len(obj.data.vertices), len(names)))
    for v in obj.data.vertices:
        for g in v.groups:
            weights[v.index, g.group] = g.weight
    return names, weights


def test_convert_reproduces_the_animation(addon):
    obj = generated_object()
    assert bpy.ops.ss4d.convert_to_armature.poll()
    assert bpy.ops.ss4d.convert_to_armature() == {"FINISHED"}
    arm = bpy.data.objects[obj["ss4d_rig"]]
    assert arm.type == "ARMATURE" and len(arm.data.bones) == 3
    assert sum(b.parent is None for b in arm.data.bones) == 1
    assert obj.parent == arm and obj.modifiers[0].type == "ARMATURE" and obj.modifiers[0].object == arm
    names, weights = weights_of(obj)
    assert sorted(names) == sorted(b.name for b in arm.data.bones)
    assert ((weights > 0).sum(1) <= 4).all() and np.allclose(weights.sum(1), 1, atol=1e-5)
    action = arm.animation_data.action
    keyed = {tuple(kp.co[0] for kp in fc.keyframe_points) for bag in action.layers[0].strips[0].channelbags
             for fc in bag.fcurves}
    assert keyed == {tuple(float(f) for f in FRAMES)}           # one key per generated frame, same frames
    key = obj.data.shape_keys
    assert key.animation_data.action is None and key.use_relative
    assert all(b.value == 0 for b in key.key_blocks[1:])
    tracks = key.animation_data.nla_tracks
    assert [t.name for t in tracks] == [armature.SHAPE_KEY_TRACK] and tracks[0].mute
    rms = np.array(arm["ss4d_rig_rms_error"])
    for i, frame in enumerate(FRAMES):
        expected = shape_key_world(obj, i)
        error = np.linalg.norm(evaluated_world(obj, frame) - expected, axis=1) / diagonal(expected) * 100
        assert abs(np.sqrt((error ** 2).mean()) - rms[i]) < 0.01      # Blender shows what the rig reports
        assert error.max() < 0.5
    assert not bpy.ops.ss4d.convert_to_armature.poll()               # converted once

    tracks[0].mute = False                                          # the kept layer replays the old animation
    obj.modifiers[0].show_viewport = False
    rebuild_relations()
    for i, frame in enumerate(FRAMES):
        np.testing.assert_allclose(evaluated_world(obj, frame), shape_key_world(obj, i), atol=1e-5)


def test_correctives_are_exact_and_failure_changes_nothing(addon, monkeypatch):
    obj = generated_object(breathing=0.2)
    assert bpy.ops.ss4d.convert_to_armature(bones=3, keep_correctives=True) == {"FINISHED"}
    arm = bpy.data.objects[obj["ss4d_rig"]]
    assert max(arm["ss4d_rig_rms_error"]) > 0.1                       # the rig alone does not explain breathing
    for i, frame in enumerate(FRAMES):
        expected = shape_key_world(obj, i)
        assert np.abs(evaluated_world(obj, frame) - expected).max() / diagonal(expected) < 1e-5

    obj = generated_object()
    before = {kind: sorted(x.name for x in getattr(bpy.data, kind))
              for kind in ("objects", "armatures", "actions", "meshes", "shape_keys")}

    def broken_keys(*args, **kwargs):
        raise RuntimeError("keying failed")
    monkeypatch.setattr(armature, "animate_bones", broken_keys)
    with pytest.raises(RuntimeError):
        bpy.ops.ss4d.convert_to_armature()
    after = {kind: sorted(x.name for x in getattr(bpy.data, kind)) for kind in before}
    assert after == before
    assert not obj.vertex_groups and not obj.modifiers and obj.parent is None
    assert obj.data.shape_keys.animation_data.action is not None


def test_unusable_animation_is_reported_and_changes_nothing(addon):
    obj = generated_object()
    block = obj.data.shape_keys.key_blocks[3]
    block.data[5].co = (float("nan"), 0.0, 0.0)
    before = {kind: sorted(x.name for x in getattr(bpy.data, kind)) for kind in ("objects", "armatures", "actions")}
    with pytest.raises(RuntimeError, match="shape key 'Frame 7'.*NaN"):      # bpy raises on an ERROR report
        bpy.ops.ss4d.convert_to_armature()
    assert {kind: sorted(x.name for x in getattr(bpy.data, kind)) for kind in before} == before
    assert not obj.vertex_groups and not obj.modifiers and "ss4d_rig" not in obj.keys()


def test_panel_button(addon):
    """The 3D viewport's SS4D panel draws the button under its own content for a generated object."""
    from ss4d_blender.blender import panels

    obj = generated_object()
    drawn = []
    layout = type("Layout", (), {"operator": lambda self, idname, **kw: drawn.append(idname)})()
    armature.draw_convert_button(type("Panel", (), {"layout": layout})(), bpy.context)
    assert drawn == ["ss4d.convert_to_armature"]
    assert armature.draw_convert_button in getattr(panels.SS4D_PT_view3d.draw, "_draw_funcs", [])
    obj.select_set(False)
    bpy.context.view_layer.objects.active = None
    armature.draw_convert_button(type("Panel", (), {"layout": layout})(), bpy.context)
    assert drawn == ["ss4d.convert_to_armature"]


def test_operator_is_one_undo_step(addon):
    """Undo needs a window, which the headless `bpy` module has none of; what Undo restores is the state
    before the one step this operator registers, so check that it registers one and does its work in
    `execute` alone."""
    cls = armature.SS4D_OT_convert_to_armature
    assert {"REGISTER", "UNDO"} <= set(cls.bl_options)
    assert not hasattr(cls, "modal") and not hasattr(cls, "invoke")


def export_and_import(tmp_path: Path, kind: str, obj):
    """Exports the scene with Blender's own exporter, reads it back into an empty scene; returns the
    imported mesh object."""
    path = tmp_path / f"rig.{kind}"
    if kind == "glb":
        bpy.ops.export_scene.gltf(filepath=str(path), export_format="GLB")
    else:
        bpy.ops.export_scene.fbx(filepath=str(path), add_leaf_bones=False, bake_anim_use_nla_strips=False,
                                 bake_anim_use_all_actions=False)
    scene = bpy.context.scene
    start, end = scene.frame_start, scene.frame_end
    bpy.ops.wm.read_factory_settings(use_empty=True)
    if kind == "glb":
        bpy.ops.import_scene.gltf(filepath=str(path))
    else:
        bpy.ops.import_scene.fbx(filepath=str(path), anim_offset=0.0)   # (the importer shifts by 1 frame by default)
    bpy.context.scene.frame_start, bpy.context.scene.frame_end = start, end
    meshes = [o for o in bpy.context.scene.objects if o.type == "MESH" and o.find_armature() is not None]
    assert len(meshes) == 1                         # (the glTF importer adds an unskinned bone-shape mesh)
    return meshes[0]


@pytest.mark.parametrize("kind", ["glb", "fbx"])
def test_gltf_and_fbx_round_trip(addon, tmp_path, kind):
    obj = generated_object()
    assert bpy.ops.ss4d.convert_to_armature() == {"FINISHED"}
    arm = bpy.data.objects[obj["ss4d_rig"]]
    bones = len(arm.data.bones)
    names, weights = weights_of(obj)
    test_frames = (FRAMES[2], FRAMES[4])
    expected = {f: evaluated_world(obj, f) for f in test_frames}
    rest = evaluated_world(obj, FRAMES[0])
    size = diagonal(rest)

    imported = export_and_import(tmp_path, kind, obj)
    skeleton = imported.find_armature()
    assert skeleton is not None and len(skeleton.data.bones) == bones
    got_rest = evaluated_world(imported, FRAMES[0])
    assert len(got_rest) == len(rest)
    order = np.argmin(((rest[:, None] - got_rest[None]) ** 2).sum(2), axis=1)   # the importer's vertex order
    assert len(set(order.tolist())) == len(rest)
    assert np.abs(got_rest[order] - rest).max() / size < 1e-3
    got_names, got_weights = weights_of(imported)
    columns = [got_names.index(n) for n in names]
    assert np.abs(got_weights[order][:, columns] - weights).max() < 2e-3
    for f in test_frames:
        assert np.abs(evaluated_world(imported, f)[order] - expected[f]).max() / size < 1e-3, f


def test_headless_rig_blend_file(addon, tmp_path):
    obj = generated_object()
    source, target = tmp_path / "in.blend", tmp_path / "out.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(source))
    lines = armature.rig_blend_file(source, target, bones=2)
    assert len(lines) == 1 and "2 bones" in lines[0]
    bpy.ops.wm.open_mainfile(filepath=str(target))
    obj = bpy.data.objects["SS4D_capsule"]
    assert obj.parent is not None and len(obj.parent.data.bones) == 2
    assert json.loads(obj["ss4d_scene_frames"]) == FRAMES
    with pytest.raises(armature.InputError, match="no generated object"):
        armature.rig_blend_file(target, tmp_path / "again.blend")


def test_fit_in_the_runtime_process(addon, monkeypatch):
    """Blender's own Python has no PyTorch: the fit then runs in the runtime's Python through the rig
    command, and its errors come back as the user's errors."""
    capsule = skinned_capsule(bones=2, frames=4, rings=12, around=8)
    monkeypatch.setattr(preferences.HEADLESS, "python", sys.executable)
    rig = armature.fit_in_runtime(capsule.vertices, capsule.faces, capsule.vertices[1], 2, True)
    assert rig.num_bones == 2 and rig.correctives is not None
    np.testing.assert_array_equal(rig.rest_vertices, capsule.vertices[1])
    with pytest.raises(armature.InputError, match="at least 2 frames"):
        armature.fit_in_runtime(capsule.vertices[:1], capsule.faces, capsule.vertices[0], None, False)
    assert subprocess.run([sys.executable, "-c", "import ss4d_blender.engine.rig.rig_file, sys; "
                           "sys.exit('torch' in sys.modules)"], cwd=REPO).returncode == 0


def test_headless_rig_command(addon, tmp_path):
    """`python -m ss4d_blender rig IN.blend -o OUT.blend --bones 2`: exit 0 and the rigged file; a bad input
    is one line with exit 2 and leaves an existing output as it was, with no partial file beside it."""
    generated_object()
    source, target = tmp_path / "in.blend", tmp_path / "out" / "rigged.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(source))
    command = [sys.executable, "-m", "ss4d_blender", "rig"]
    done = subprocess.run(command + [str(source), "-o", str(target), "--bones", "2"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "2 bones" in done.stdout and target.is_file()
    before = target.read_bytes()
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "empty.blend"))  # nothing generated in it
    for bad in ([str(tmp_path / "missing.blend")], [str(target), "--bones", "zero"], [str(tmp_path / "empty.blend")]):
        failed = subprocess.run(command + bad + ["-o", str(target)], cwd=REPO, capture_output=True, text=True,
                                timeout=600)
        assert failed.returncode == 2 and failed.stderr.strip().count("\n") <= 1, failed.stderr
        assert "Traceback" not in failed.stderr
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["rigged.blend"]
