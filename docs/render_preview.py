"""Renders an SS4D result .blend at three frames (first, middle, last generated frame) with Cycles on the
CPU, so a person can look at it. Adds a camera and lights in memory only (the .blend is not modified).

    .venv/bin/python docs/render_preview.py out.blend preview_dir [--resolution 512] [--samples 16]
"""
import argparse
import json
import sys
from pathlib import Path


def main(argv=None):
    import bpy
    from mathutils import Vector

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("blend", type=Path)
    p.add_argument("outdir", type=Path)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--samples", type=int, default=16)
    a = p.parse_args(argv)
    bpy.ops.wm.open_mainfile(filepath=str(a.blend.resolve()))
    scene = bpy.context.scene
    objects = [o for o in bpy.data.objects if "ss4d_scene_frames" in o.keys()]
    if not objects:
        sys.exit(f"error: no SS4D object in {a.blend}")
    obj = objects[0]
    frames = json.loads(obj["ss4d_scene_frames"])
    picks = [frames[0], frames[len(frames) // 2], frames[-1]]
    height = max(obj.dimensions.z, 1e-3)
    target = obj.location + Vector((0, 0, height / 2))
    cam_data = bpy.data.cameras.new("preview_camera")
    cam = bpy.data.objects.new("preview_camera", cam_data)
    scene.collection.objects.link(cam)
    cam.location = target + Vector((0, -3.2 * height, 0.6 * height))
    cam.rotation_euler = (target - cam.location).to_track_quat("-Z", "Y").to_euler()
    scene.camera = cam
    for name, loc, energy in (("key", (2, -2, 3), 800), ("fill", (-3, -1, 2), 300)):
        light = bpy.data.objects.new(name, bpy.data.lights.new(name, "AREA"))
        light.data.energy = energy * height * height
        light.data.size = 2 * height
        light.location = obj.location + Vector(loc) * height
        towards_object = obj.location + Vector((0, 0, height / 2)) - light.location
        light.rotation_euler = towards_object.to_track_quat("-Z", "Y").to_euler()
        scene.collection.objects.link(light)
    if scene.world is None:
        scene.world = bpy.data.worlds.new("preview_world")
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = a.samples
    scene.render.resolution_x = scene.render.resolution_y = a.resolution
    scene.render.resolution_percentage = 100
    scene.render.use_sequencer = False
    scene.render.image_settings.file_format = "PNG"
    a.outdir.mkdir(parents=True, exist_ok=True)
    for f in picks:
        scene.frame_set(f)
        scene.render.filepath = str(a.outdir / f"frame_{f:04d}.png")
        bpy.ops.render.render(write_still=True)
        print(f"wrote {scene.render.filepath}")
    if obj.get("ss4d_is_random_weights"):
        print("note: this result was made with the tiny random-weight pipeline (noise)")


if __name__ == "__main__":
    main()
