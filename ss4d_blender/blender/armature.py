"""Convert to Armature: bones and skin weights fitted to a generated object's shape-key animation.

The object's absolute shape keys (one per generated frame, see `scene_build`) are read back as the
animation; the rig is fitted by `engine.rig` (in this Python when it has PyTorch, as the headless command
and the tests do, else in the add-on's runtime through `python -m ss4d_blender.engine.rig.cli`). Built:

- an Armature object with the bone hierarchy (heads and tails inside the mesh), at the object's place;
- an action with one key per generated frame for every bone (location + quaternion), on the scene frames
  of the shape keys; a bone's key is its local pose, rest⁻¹ · M_parent⁻¹ · M_bone · rest, so that the
  Armature modifier reproduces M_bone (the rig's rest -> frame transform) in the mesh's own space;
- a vertex group per bone with the weights, an Armature modifier, and the mesh parented to the armature;
- the shape keys turned into relative keys at value 0 (the mesh's basis is the rest pose) with their
  animation on a muted NLA track ("SS4D shape keys") for comparison; with correctives, one more key per
  frame (rest + corrective offset) with its weight curve, so that armature and keys together reproduce
  every generated frame exactly.

Everything is added in one go after the fit succeeded, and removed again if building fails; the operator
is one undo step.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import bpy
import numpy as np
from bpy.props import BoolProperty, IntProperty
from mathutils import Matrix

from ..engine.errors import InputError, SS4DError
from . import jobs, scene_build

MODIFIER_NAME = "SS4D Armature"
SHAPE_KEY_TRACK = "SS4D shape keys"
CORRECTIVE_PREFIX = "Corrective"


# ------------------------------------------------------------------------------------------ the animation
def is_generated(obj) -> bool:
    """A mesh with absolute shape keys (Basis + one per frame, as Generate 4D builds it), not converted yet."""
    if obj is None or obj.type != "MESH" or obj.data.shape_keys is None:
        return False
    key = obj.data.shape_keys
    return (not key.use_relative and len(key.key_blocks) >= 3
            and not any(m.type == "ARMATURE" and m.name == MODIFIER_NAME for m in obj.modifiers))


def read_animation(obj) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """vertices [T, V, 3] (the frame keys, in the object's space), rest [V, 3] (the basis), faces [F, 3] and
    the scene frame of each key."""
    mesh = obj.data
    blocks = [b for b in mesh.shape_keys.key_blocks[1:] if not b.name.startswith(CORRECTIVE_PREFIX)]
    V = len(mesh.vertices)
    vertices = np.empty((len(blocks), V * 3), np.float32)
    for i, block in enumerate(blocks):
        block.data.foreach_get("co", vertices[i])
        if not np.isfinite(vertices[i]).all():
            raise InputError(f"The shape key '{block.name}' of '{obj.name}' has NaN or infinite coordinates; "
                             f"rebuild the mesh before converting it to an armature.")
    rest = np.empty(V * 3, np.float32)
    mesh.shape_keys.key_blocks[0].data.foreach_get("co", rest)
    if any(len(p.vertices) != 3 for p in mesh.polygons):
        mesh.calc_loop_triangles()
        faces = np.empty(len(mesh.loop_triangles) * 3, np.int32)
        mesh.loop_triangles.foreach_get("vertices", faces)
    else:
        faces = np.empty(len(mesh.polygons) * 3, np.int32)
        mesh.polygons.foreach_get("vertices", faces)
    return vertices.reshape(len(blocks), V, 3), rest.reshape(V, 3), faces.reshape(-1, 3), scene_frames_of(obj, blocks)


def scene_frames_of(obj, blocks) -> list[int]:
    """The scene frame of each frame key: the object's record when it matches, else the keys' names."""
    recorded = json.loads(obj["ss4d_scene_frames"]) if "ss4d_scene_frames" in obj.keys() else None
    if recorded is not None and len(recorded) == len(blocks):
        return [int(f) for f in recorded]
    frames = []
    for i, block in enumerate(blocks):
        found = re.search(r"(-?\d+)\s*$", block.name)
        frames.append(int(found.group(1)) if found else i + 1)
    if sorted(set(frames)) != frames:
        return list(range(1, len(blocks) + 1))
    return frames


# ------------------------------------------------------------------------------------------ the fit
def fit(vertices: np.ndarray, faces: np.ndarray, rest: np.ndarray, bones: int | None, correctives: bool,
        context=None):
    """The `engine.rig.Rig` of an animation: here when this Python has PyTorch, else in the runtime."""
    if importlib.util.find_spec("torch") is not None:
        from ..engine.rig import RigSettings, fit_rig

        return fit_rig(vertices, faces, rest_vertices=rest, settings=RigSettings(bones=bones, correctives=correctives))
    return fit_in_runtime(vertices, faces, rest, bones, correctives, context)


def fit_in_runtime(vertices, faces, rest, bones, correctives, context=None):
    """Runs `python -m ss4d_blender.engine.rig.cli` with the add-on's runtime Python and reads its RIG.npz."""
    from ..engine.rig.rig_file import Rig

    python = jobs.runtime_python(context)
    folder = Path(tempfile.mkdtemp(prefix="ss4d_rig_"))
    try:
        np.savez(folder / "anim.npz", vertices=vertices, faces=faces, rest_vertices=rest)
        command = [python, "-m", "ss4d_blender.engine.rig.cli", str(folder / "anim.npz"), str(folder / "rig.npz"),
                   "--bones", "auto" if bones is None else str(bones)] + (["--correctives"] if correctives else [])
        environment = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        environment["PYTHONPATH"] = package_root + os.pathsep + environment.get("PYTHONPATH", "")
        done = subprocess.run(command, capture_output=True, text=True, env=environment)
        if done.returncode != 0:
            lines = [x for x in done.stderr.strip().splitlines() if x.strip()]
            message = next((x[len("error: "):] for x in lines if x.startswith("error: ")), None)
            if message is not None:
                raise InputError(message)
            raise SS4DError(f"The rig fit stopped unexpectedly (exit code {done.returncode}). " + " ".join(lines[-3:]))
        return Rig.load(folder / "rig.npz")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------ building
def bone_names(count: int) -> list[str]:
    return [f"Bone_{b:02d}" for b in range(count)]


def create_armature(context, obj, rig, names: list[str], created: list):
    """The Armature object at the mesh's place, its bones from the rig's heads, tails and parents
    (in the mesh's space). Returns the object."""
    data = bpy.data.armatures.new(f"{obj.name}_rig")
    created.append(data)
    arm = bpy.data.objects.new(f"{obj.name}_rig", data)
    created.append(arm)
    collection = obj.users_collection[0] if obj.users_collection else context.scene.collection
    collection.objects.link(arm)
    arm.matrix_world = obj.matrix_world.copy()
    selected = list(context.selected_objects)
    active = context.view_layer.objects.active
    for other in selected:
        other.select_set(False)
    arm.select_set(True)
    context.view_layer.objects.active = arm
    bpy.ops.object.mode_set(mode="EDIT")
    try:
        edit_bones = [data.edit_bones.new(name) for name in names]
        for bone, head, tail in zip(edit_bones, rig.heads, rig.tails):
            bone.head, bone.tail = head.tolist(), tail.tolist()
            bone.use_deform = True
        for bone, parent in zip(edit_bones, rig.parents):
            if parent >= 0:
                bone.parent = edit_bones[parent]
    finally:
        bpy.ops.object.mode_set(mode="OBJECT")
        arm.select_set(False)
        for other in selected:
            other.select_set(True)
        context.view_layer.objects.active = active
    return arm


def pose_keys(rig, rest_matrices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Local pose of every bone per frame: locations [B, T, 3] and quaternions (w, x, y, z) [B, T, 4], from
    basis = rest⁻¹ · M_parent⁻¹ · M · rest (rest_matrices [B, 4, 4]: the bones' rest in armature space)."""
    M = rig.transforms.astype(np.float64)                                      # [T, B, 4, 4]
    B = M.shape[1]
    locations, quaternions = [], []
    for b in range(B):
        relative = M[:, b] if rig.parents[b] < 0 else np.linalg.inv(M[:, rig.parents[b]]) @ M[:, b]
        basis = np.linalg.inv(rest_matrices[b]) @ relative @ rest_matrices[b]  # [T, 4, 4]
        q = np.array([list(Matrix(m[:3, :3].tolist()).to_quaternion()) for m in basis])
        for t in range(1, len(q)):                                             # no flips between keys
            if np.dot(q[t], q[t - 1]) < 0:
                q[t] = -q[t]
        locations.append(basis[:, :3, 3])
        quaternions.append(q)
    return np.stack(locations), np.stack(quaternions)


def key_channels(id_block, name: str, channels: list[tuple[str, int, str, np.ndarray]], frames: list[int],
                 created: list):
    """A new action on `id_block` with one F-curve per (data path, index, group, values [T]) keyed at
    `frames`, linear."""
    from bpy_extras import anim_utils

    action = bpy.data.actions.new(name)
    created.append(action)
    id_block.animation_data_create()
    id_block.animation_data.action = action
    slot = id_block.animation_data.action_slot
    if slot is None:
        slot = action.slots.new(id_block.id_type, id_block.name)
        id_block.animation_data.action_slot = slot
    bag = anim_utils.action_ensure_channelbag_for_slot(action, slot)
    times = np.asarray(frames, np.float32)
    for path, index, group, values in channels:
        curve = bag.fcurves.new(path, index=index, group_name=group) if group else bag.fcurves.new(path, index=index)
        curve.keyframe_points.add(len(times))
        curve.keyframe_points.foreach_set("co", np.stack([times, values.astype(np.float32)], 1).ravel())
        curve.update()
    scene_build._set_linear(action)
    return action


def animate_bones(arm, rig, names: list[str], frames: list[int], created: list):
    rest = np.array([np.array(arm.data.bones[n].matrix_local) for n in names])
    locations, quaternions = pose_keys(rig, rest)
    channels = []
    for b, name in enumerate(names):
        arm.pose.bones[name].rotation_mode = "QUATERNION"
        channels += [(f'pose.bones["{name}"].location', i, name, locations[b, :, i]) for i in range(3)]
        channels += [(f'pose.bones["{name}"].rotation_quaternion', i, name, quaternions[b, :, i]) for i in range(4)]
    return key_channels(arm, f"{arm.name}_action", channels, frames, created)


def add_skin(obj, arm, rig, names: list[str]) -> None:
    """Vertex groups with the weights, the Armature modifier, the mesh parented to the armature."""
    for b, name in enumerate(names):
        group = obj.vertex_groups.new(name=name)
        column = rig.weights[:, b]
        for v in np.nonzero(column > 0)[0].tolist():
            group.add([v], float(column[v]), "REPLACE")
    modifier = obj.modifiers.new(MODIFIER_NAME, "ARMATURE")
    modifier.object = arm
    modifier.use_vertex_groups = True
    modifier.use_bone_envelopes = False
    if len(obj.modifiers) > 1:
        obj.modifiers.move(len(obj.modifiers) - 1, 0)
    world = obj.matrix_world.copy()
    obj.parent = arm
    obj.matrix_parent_inverse = arm.matrix_world.inverted()
    obj.matrix_world = world


def mute_shape_keys(obj, rig, frames: list[int], correctives: bool, created: list) -> None:
    """The shape keys become relative keys at value 0 (the mesh shows its basis, the rest pose, and file
    formats that know only blend shapes export them as inactive); their animation, the same linear blend
    between neighbouring frames as before (`scene_build.to_relative_keys`), goes onto a muted NLA track.
    With correctives, one more key per frame (rest + offset) with its own weight curves (1 at its frame,
    0 at the others) as the active action."""
    key = obj.data.shape_keys
    scene_build.to_relative_keys(obj, frames)
    data = key.animation_data
    if data is not None and data.action is not None:
        action, slot = data.action, data.action_slot
        track = data.nla_tracks.new()
        track.name = SHAPE_KEY_TRACK
        strip = track.strips.new(action.name, int(action.frame_range[0]), action)
        if slot is not None and hasattr(strip, "action_slot"):
            strip.action_slot = slot
        data.action = None
        track.mute = True
    for block in key.key_blocks[1:]:
        block.value = 0.0
    if not correctives or rig.correctives is None:
        return
    channels = []
    for t, frame in enumerate(frames):
        block = obj.shape_key_add(name=f"{CORRECTIVE_PREFIX} {frame}", from_mix=False)
        block.data.foreach_set("co", (rig.rest_vertices + rig.correctives[t]).astype(np.float32).ravel())
        block.relative_key = key.key_blocks[0]
        channels.append((f'key_blocks["{block.name}"].value', 0, "", (np.arange(len(frames)) == t).astype(np.float32)))
    key_channels(key, f"{obj.name}_correctives", channels, frames, created)


def build_rig(context, obj, rig, frames: list[int], correctives: bool):
    """Adds the armature, its action, the skin and the shape-key layers for a fitted rig. Returns the
    armature object; on failure everything added is removed again."""
    names = bone_names(rig.num_bones)
    created: list = []
    try:
        arm = create_armature(context, obj, rig, names, created)
        animate_bones(arm, rig, names, frames, created)
        arm["ss4d_rig_rms_error"] = [float(x) for x in rig.rms_error]
        arm["ss4d_rig_max_error"] = [float(x) for x in rig.max_error]
    except Exception:
        for block in reversed(created):
            _remove(block)
        raise
    add_skin(obj, arm, rig, names)
    mute_shape_keys(obj, rig, frames, correctives, created)
    obj["ss4d_rig"] = arm.name
    return arm


def _remove(block) -> None:
    for kind in ("objects", "armatures", "actions"):
        collection = getattr(bpy.data, kind)
        if isinstance(block, getattr(bpy.types, {"objects": "Object", "armatures": "Armature",
                                                 "actions": "Action"}[kind])):
            collection.remove(block)
            return


def convert_to_armature(context, obj, bones: int | None = None, correctives: bool = False):
    """Fits and builds the rig of a generated object. Returns (armature object, rig)."""
    if not is_generated(obj):
        raise InputError(f"'{obj.name if obj else None}' has no shape-key animation to convert (select an object "
                         f"made by Generate 4D that is not converted yet).")
    vertices, rest, faces, frames = read_animation(obj)
    rig = fit(vertices, faces, rest, bones, correctives, context)
    return build_rig(context, obj, rig, frames, correctives), rig


def summary(obj, arm, rig) -> str:
    return (f"'{obj.name}': {rig.num_bones} bones ({arm.name}), error RMS {rig.rms_overall:.3f} %, "
            f"max {rig.max_overall:.3f} % of the size"
            + (" (exact with correctives)" if rig.correctives is not None else ""))


# ------------------------------------------------------------------------------------------ operator, headless
class SS4D_OT_convert_to_armature(bpy.types.Operator):
    """Fit an armature with skin weights to the active generated object's animation (the shape-key
    animation is kept on a muted layer for comparison)"""

    bl_idname = "ss4d.convert_to_armature"
    bl_label = "Convert to Armature"
    bl_options = {"REGISTER", "UNDO"}

    bones: IntProperty(name="Bones", default=0, min=0, max=256,
                       description="Bone count; 0 chooses the fewest (up to 32) with an error of at most 0.5 %")
    keep_correctives: BoolProperty(name="Keep Correctives", default=False,
                                   description="Add per-frame corrective shape keys so that every generated frame "
                                               "is reproduced exactly")

    @classmethod
    def poll(cls, context):
        return context.mode == "OBJECT" and is_generated(context.active_object)

    def execute(self, context):
        obj = context.active_object
        try:
            arm, rig = convert_to_armature(context, obj, self.bones or None, self.keep_correctives)
        except SS4DError as err:
            self.report({"ERROR"}, str(err))
            return {"CANCELLED"}
        self.report({"INFO"}, "Rigged " + summary(obj, arm, rig))
        return {"FINISHED"}


def rig_blend_file(in_path, out_path, bones: int | None = None, correctives: bool = False) -> list[str]:
    """Headless `rig IN.blend -o OUT.blend`: converts every generated object of the file's scene and saves
    the result; returns one summary line per object."""
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise InputError(f"Blend file not found: {in_path}")
    bpy.ops.wm.open_mainfile(filepath=str(in_path))
    context = bpy.context
    targets = [o for o in context.scene.objects if is_generated(o)]
    if not targets:
        raise InputError(f"{in_path} has no generated object with a shape-key animation to rig.")
    lines = []
    for obj in targets:
        arm, rig = convert_to_armature(context, obj, bones, correctives)
        lines.append(summary(obj, arm, rig))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    bpy.ops.wm.save_as_mainfile(filepath=str(out_path))
    return lines


def draw_convert_button(self, context) -> None:
    """Appended to the 3D viewport's SS4D panel: the button, for the active generated object."""
    if is_generated(context.active_object):
        self.layout.operator(SS4D_OT_convert_to_armature.bl_idname, icon="ARMATURE_DATA")


def _viewport_panel():
    from . import panels

    return getattr(panels, "SS4D_PT_view3d", None)


CLASSES = (SS4D_OT_convert_to_armature,)


def register():
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    panel = _viewport_panel()
    if panel is not None:
        panel.append(draw_convert_button)


def unregister():
    panel = _viewport_panel()
    if panel is not None:
        panel.remove(draw_convert_button)
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
