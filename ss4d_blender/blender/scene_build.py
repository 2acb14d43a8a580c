"""Builds the Blender result: one mesh object whose absolute shape keys replay the generated frames.

Why absolute keys: one key per generated frame on a single `eval_time` axis (key k at 10 k) and one
F-curve (`eval_time`, linear) that maps every scene frame of the strip to the right place on that axis:
scene frames between two generated frames interpolate linearly between their shapes, frames outside
hold the first / last shape. Relative keys would need one F-curve per key (T curves of 0/1 keys) for
the same result; artists can still edit individual keys (each key block is named after its scene frame).
Key blocks use linear key interpolation, so a generated frame's shape is reproduced exactly.

Long clips: `mode="mesh_cache"` replaces the shape keys by a Mesh Cache modifier reading a PC2 point
cache written beside the .blend (one sample per scene frame from the first generated frame to the last,
linear between generated frames), for animations whose keys would make the .blend too large
(bench/RESULTS.md, "Long clips").

Coordinates: the engine's model box is Z-up; the mesh is scaled so that the object's height over the
whole animation equals the requested height, its bottom centre at the object origin, placed at the 3D
cursor. Everything is created in one go after the generator succeeded, and removed again if building
fails, so the scene is never left half-modified.
"""
from __future__ import annotations

import json
import os

import bpy
import numpy as np

COLOR_ATTRIBUTE = "Color"
MODES = ("shape_keys", "mesh_cache")


def placement(vertices: np.ndarray, height: float) -> tuple[float, np.ndarray]:
    """vertices [T, V, 3] -> (scale, offset) so that (v - offset) * scale has its bottom centre at 0 and
    the requested height."""
    lo, hi = vertices.reshape(-1, 3).min(0), vertices.reshape(-1, 3).max(0)
    extent = float(hi[2] - lo[2])
    scale = height / extent if extent > 1e-9 else 1.0
    offset = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2]], np.float32)
    return scale, offset


def _set_linear(action) -> None:
    """Linear interpolation on every key of the action (Blender 4.4+ slotted actions and older)."""
    curves = []
    if hasattr(action, "layers") and len(action.layers):
        for layer in action.layers:
            for strip in layer.strips:
                for bag in strip.channelbags:
                    curves.extend(bag.fcurves)
    elif hasattr(action, "fcurves"):
        curves.extend(action.fcurves)
    for fc in curves:
        for kp in fc.keyframe_points:
            kp.interpolation = "LINEAR"
        fc.extrapolation = "CONSTANT"


def _material(name: str):
    mat = bpy.data.materials.new(name)
    if getattr(mat, "node_tree", None) is None:
        mat.use_nodes = True
    nodes = mat.node_tree.nodes
    bsdf = next(n for n in nodes if n.type == "BSDF_PRINCIPLED")
    attr = nodes.new("ShaderNodeAttribute")
    attr.attribute_name = COLOR_ATTRIBUTE
    attr.location = (bsdf.location[0] - 300, bsdf.location[1])
    mat.node_tree.links.new(attr.outputs["Color"], bsdf.inputs["Base Color"])
    bsdf.inputs["Roughness"].default_value = 0.7
    return mat


def build_animated_object(context, name: str, faces: np.ndarray, vertices: np.ndarray, colors,
                          scene_frames: list[int], reference_frame: int, height: float,
                          collection_name: str = "", properties: dict | None = None,
                          mode: str = "shape_keys", cache_path: str = ""):
    """faces int [F, 3]; vertices float [T, V, 3] (engine units, Z-up); colors [V, 3] linear or None;
    scene_frames: the scene frame of each generated frame (increasing). mode: "shape_keys" (one absolute key
    per generated frame) or "mesh_cache" (a Mesh Cache modifier reading the PC2 file `cache_path`, written
    here). Returns the new object."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
    if mode == "mesh_cache" and not cache_path:
        raise ValueError("mode 'mesh_cache' needs a cache_path for the PC2 file")
    T, V, _ = vertices.shape
    scale, offset = placement(vertices, height)
    local = ((vertices - offset) * scale).astype(np.float32)
    created = []
    try:
        mesh = bpy.data.meshes.new(name)
        created.append(mesh)
        mesh.vertices.add(V)
        mesh.vertices.foreach_set("co", local[reference_frame].ravel())
        mesh.loops.add(3 * len(faces))
        mesh.loops.foreach_set("vertex_index", np.ascontiguousarray(faces, np.int32).ravel())
        mesh.polygons.add(len(faces))
        mesh.polygons.foreach_set("loop_start", np.arange(0, 3 * len(faces), 3, dtype=np.int32))
        mesh.update()
        mesh.validate(clean_customdata=False)
        if colors is not None and len(colors) == V:
            attr = mesh.color_attributes.new(COLOR_ATTRIBUTE, "FLOAT_COLOR", "POINT")
            rgba = np.concatenate([np.clip(colors, 0, None), np.ones((V, 1), np.float32)], 1).astype(np.float32)
            attr.data.foreach_set("color", rgba.ravel())
            mesh.color_attributes.active_color = attr
        mat = _material(f"{name}_material")
        created.append(mat)
        mesh.materials.append(mat)
        mesh.polygons.foreach_set("use_smooth", np.ones(len(faces), bool))

        obj = bpy.data.objects.new(name, mesh)
        created.append(obj)
        obj.location = context.scene.cursor.location.copy()
        if mode == "shape_keys":
            _add_shape_keys(obj, local, scene_frames, created)
        else:
            _add_mesh_cache(obj, local, scene_frames, cache_path)

        collection = _collection(context, collection_name, created)
        collection.objects.link(obj)
        for k, v in (properties or {}).items():
            obj[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
        obj["ss4d_scale"] = float(scale)
        obj["ss4d_offset"] = [float(x) for x in offset]
        return obj
    except Exception:
        for block in reversed(created):
            _remove(block)
        raise


def _add_shape_keys(obj, local: np.ndarray, scene_frames: list[int], created: list) -> None:
    """One absolute key per generated frame on the eval_time axis, keyed (linear) at its scene frame."""
    obj.shape_key_add(name="Basis", from_mix=False)
    for i in range(local.shape[0]):
        block = obj.shape_key_add(name=f"Frame {scene_frames[i]}", from_mix=False)
        block.data.foreach_set("co", local[i].ravel())
        block.interpolation = "KEY_LINEAR"
    key = obj.data.shape_keys
    created.append(key)
    key.use_relative = False
    for i, frame in enumerate(scene_frames):
        key.eval_time = 10.0 * (i + 1)
        key.keyframe_insert("eval_time", frame=frame)
    if key.animation_data and key.animation_data.action:
        created.append(key.animation_data.action)
        _set_linear(key.animation_data.action)


def per_scene_frame(local: np.ndarray, scene_frames: list[int]) -> np.ndarray:
    """[T, V, 3] at increasing scene frames -> [scene_frames[-1] - scene_frames[0] + 1, V, 3], one sample per
    scene frame, linear between generated frames (what the shape keys play)."""
    frames = np.arange(scene_frames[0], scene_frames[-1] + 1)
    upper = np.clip(np.searchsorted(scene_frames, frames, side="right"), 1, len(scene_frames) - 1)
    f0, f1 = np.asarray(scene_frames)[upper - 1], np.asarray(scene_frames)[upper]
    s = np.clip((frames - f0) / np.maximum(f1 - f0, 1), 0, 1).astype(np.float32)[:, None, None]
    return (1 - s) * local[upper - 1] + s * local[upper]


def write_pc2(path: str, samples: np.ndarray, start_frame: float) -> None:
    """A PC2 point cache: header ('POINTCACHE2', version 1, points, start frame, sample rate 1, samples),
    then float32 [samples, points, 3]."""
    header = np.zeros(1, dtype=[("magic", "S12"), ("version", "<i4"), ("points", "<i4"), ("start", "<f4"),
                                ("rate", "<f4"), ("samples", "<i4")])
    header[0] = (b"POINTCACHE2\0", 1, samples.shape[1], start_frame, 1.0, samples.shape[0])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.ascontiguousarray(samples, "<f4").tobytes())


def _add_mesh_cache(obj, local: np.ndarray, scene_frames: list[int], cache_path: str) -> None:
    """A Mesh Cache modifier playing a PC2 file with one sample per scene frame from the first generated one."""
    write_pc2(bpy.path.abspath(cache_path), per_scene_frame(local, scene_frames), float(scene_frames[0]))
    modifier = obj.modifiers.new("SS4D Mesh Cache", "MESH_CACHE")
    modifier.cache_format = "PC2"
    modifier.filepath = cache_path
    modifier.time_mode = "FRAME"
    modifier.play_mode = "SCENE"
    modifier.frame_start = float(scene_frames[0])
    modifier.frame_scale = 1.0
    modifier.interpolation = "LINEAR"
    modifier.forward_axis, modifier.up_axis = "POS_Y", "POS_Z"


def _collection(context, name: str, created: list):
    if not name:
        return context.scene.collection
    collection = bpy.data.collections.get(name)
    if collection is None:
        collection = bpy.data.collections.new(name)
        created.append(collection)
        context.scene.collection.children.link(collection)
    return collection


def _remove(block) -> None:
    for attr in ("objects", "meshes", "materials", "actions", "collections"):
        data = getattr(bpy.data, attr)
        try:
            if block in list(data):
                data.remove(block)
                return
        except (TypeError, ReferenceError):
            pass


def replace_animation(obj, faces, vertices, colors, scene_frames, reference_frame, height,
                      properties: dict | None = None, mode: str = "shape_keys", cache_path: str = ""):
    """Rebuild mesh: a new object built from a new animation takes the old one's place (same name,
    collections, location, custom properties with `properties` replacing theirs, selection and active
    state); the old object and its data are removed."""
    context = bpy.context
    was_active = context.view_layer.objects.active == obj
    was_selected = obj.select_get()
    props = {k: obj[k] for k in obj.keys() if k.startswith("ss4d") and k not in ("ss4d_scale", "ss4d_offset")}
    props.update(properties or {})
    collections = list(obj.users_collection)
    location = obj.location.copy()
    name = obj.name
    new = build_animated_object(context, name + "_rebuilt", faces, vertices, colors, scene_frames, reference_frame,
                                height, "", props, mode=mode, cache_path=cache_path)
    context.scene.collection.objects.unlink(new)
    for c in collections:
        c.objects.link(new)
    new.location = location
    old_mesh, old_key = obj.data, obj.data.shape_keys
    old_action = old_key.animation_data.action if old_key and old_key.animation_data else None
    old_materials = [m for m in old_mesh.materials if m is not None]
    bpy.data.objects.remove(obj)
    if old_mesh.users == 0:
        bpy.data.meshes.remove(old_mesh)
    for m in old_materials:
        if m.users == 0:
            bpy.data.materials.remove(m)
    if old_action is not None and old_action.users == 0:
        bpy.data.actions.remove(old_action)
    new.name = name
    new.data.name = name
    new.select_set(was_selected)
    if was_active:
        context.view_layer.objects.active = new
    return new


def to_relative_keys(obj, scene_frames: list[int]) -> None:
    """Converts the absolute-key animation into relative keys with one weight curve per key (for file
    formats that only know morph-target weights, e.g. glTF). Between generated frames i and i+1 the
    weights are (1 - s, s): the same linear blend of the two shapes as the absolute keys give."""
    key = obj.data.shape_keys
    if key.animation_data is not None:
        action = key.animation_data.action
        key.animation_data_clear()
        if action is not None and action.users == 0:
            bpy.data.actions.remove(action)
    key.use_relative = True
    blocks = key.key_blocks[1:]
    for i, block in enumerate(blocks):
        block.relative_key = key.key_blocks[0]
        for j, frame in enumerate(scene_frames):
            if abs(j - i) <= 1:
                block.value = 1.0 if j == i else 0.0
                block.keyframe_insert("value", frame=frame)
    if key.animation_data and key.animation_data.action:
        _set_linear(key.animation_data.action)
