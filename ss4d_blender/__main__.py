"""Headless SS4D: a video (or a folder of frames) in, an animated mesh .blend out, through Blender as a
Python module and the same operator the add-on's button runs.

    python -m ss4d_blender generate VIDEO -o out.blend [--export out.glb|out.fbx|out.abc] [options]

VIDEO: a movie file Blender can decode (mp4, mov, webm, ...) or a folder of images (PNG with alpha).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_color(text: str) -> tuple:
    text = text.strip()
    if text.startswith("#") and len(text) == 7:
        return tuple(int(text[i:i + 2], 16) / 255 for i in (1, 3, 5))
    parts = [float(x) for x in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("key colour: '#00ff00' or 'r,g,b' in 0..1")
    return tuple(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ss4d_blender", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="video -> animated mesh .blend")
    g.add_argument("video", type=Path)
    g.add_argument("-o", "--output", type=Path, required=True, help=".blend to write")
    g.add_argument("--export", type=Path, action="append", default=[], help="also export (.glb/.gltf/.fbx/.abc)")
    g.add_argument("--pipeline", default="lizb6626/SS4D", help="hub repo id or local pipeline folder")
    g.add_argument("--revision", default="")
    g.add_argument("--mesh-decoder", default="auto", help="auto | none | repo id | folder")
    g.add_argument("--cache-dir", default="")
    g.add_argument("--python", default="", help="Python with PyTorch for the generator (default: this one)")
    g.add_argument("--frames", type=int, default=32, help="frames to generate (evenly spaced)")
    g.add_argument("--start", type=int, default=None, help="first scene frame (default: the strip's)")
    g.add_argument("--end", type=int, default=None, help="last scene frame (default: the strip's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=0, help="0 = the model's default")
    g.add_argument("--guidance", type=float, default=0.0, help="0 = the model's default")
    g.add_argument("--matting", choices=["alpha", "chroma"], default="alpha")
    g.add_argument("--key-color", type=parse_color, default=(0.0, 1.0, 0.0))
    g.add_argument("--tolerance", type=float, default=0.12)
    g.add_argument("--softness", type=float, default=0.08)
    g.add_argument("--vertices", type=int, default=20000)
    g.add_argument("--reference-frame", type=int, default=None,
                   help="scene frame whose shape gives the topology (default: the most complete)")
    g.add_argument("--smoothing", type=float, default=0.0)
    g.add_argument("--height", type=float, default=1.8, help="object height in metres")
    g.add_argument("--device", default="auto")
    g.add_argument("--precision", default="auto")
    return parser


def load_source(scene, path: Path):
    """Adds a movie strip (or an image-sequence strip for a folder) at frame 1; sets the scene's frame
    range, frame rate and resolution to the source's."""
    editor = scene.sequence_editor_create()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".exr", ".tif", ".tiff", ".webp"))
        if not files:
            raise SystemExit(f"error: no image files in {path}")
        strip = editor.strips.new_image(path.name, str(files[0]), channel=1, frame_start=1)
        for f in files[1:]:
            strip.elements.append(f.name)
    else:
        if not path.is_file():
            raise SystemExit(f"error: {path} does not exist")
        try:
            strip = editor.strips.new_movie(path.stem, str(path), channel=1, frame_start=1)
        except RuntimeError as err:
            raise SystemExit(f"error: Blender cannot decode {path} ({err})")
        if strip.frame_duration <= 1:
            raise SystemExit(f"error: Blender cannot decode {path} as a video")
        scene.render.fps = max(1, round(strip.fps))
    element = strip.elements[0]
    if element.orig_width and element.orig_height:
        scene.render.resolution_x, scene.render.resolution_y = element.orig_width, element.orig_height
        scene.render.resolution_percentage = 100
    editor.active_strip = strip
    scene.frame_start, scene.frame_end = strip.frame_final_start, strip.frame_final_end - 1
    return strip


def export(path: Path, obj, scene_frames) -> None:
    import bpy

    from .blender.scene_build import to_relative_keys

    suffix = path.suffix.lower()
    bpy.ops.object.select_all(action="DESELECT")
    obj.select_set(True)
    bpy.context.view_layer.objects.active = obj
    if suffix in (".glb", ".gltf"):
        to_relative_keys(obj, scene_frames)  # glTF animates morph-target weights
        bpy.ops.export_scene.gltf(filepath=str(path), export_format="GLB" if suffix == ".glb" else "GLTF_SEPARATE",
                                  use_selection=True, export_morph=True, export_animations=True,
                                  export_apply=False)
    elif suffix == ".fbx":
        to_relative_keys(obj, scene_frames)
        # one baked take over the scene range: the per-action / NLA modes skip objects whose only animation
        # is on their shape keys, which would drop the morph weights
        bpy.ops.export_scene.fbx(filepath=str(path), use_selection=True, bake_anim=True,
                                 bake_anim_use_all_actions=False, bake_anim_use_nla_strips=False)
    elif suffix == ".abc":
        bpy.ops.wm.alembic_export(filepath=str(path), selected=True, start=bpy.context.scene.frame_start,
                                  end=bpy.context.scene.frame_end)
    else:
        raise SystemExit(f"error: unknown export format {suffix} (use .glb, .gltf, .fbx or .abc)")


def generate(args) -> int:
    import json

    import bpy

    from . import register
    from .blender import preferences
    from .engine.types import poor_fit_message

    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.context.preferences.filepaths.save_version = 0  # no .blend1 backups from the batch tool
    register()
    prefs = preferences.HEADLESS
    prefs.pipeline, prefs.revision, prefs.mesh_decoder = args.pipeline, args.revision, args.mesh_decoder
    prefs.cache_dir, prefs.python, prefs.device, prefs.precision = args.cache_dir, args.python, args.device, args.precision
    scene = bpy.context.scene
    strip = load_source(scene, args.video.resolve())
    s = scene.ss4d
    s.num_frames, s.seed, s.steps, s.guidance = args.frames, args.seed, args.steps, args.guidance
    s.matting, s.key_color = args.matting.upper(), args.key_color
    s.tolerance, s.softness = args.tolerance, args.softness
    s.target_vertices, s.smoothing, s.height = args.vertices, args.smoothing, args.height
    s.auto_reference = args.reference_frame is None
    if args.reference_frame is not None:
        s.reference_frame = args.reference_frame
    if args.start is not None or args.end is not None:
        s.use_strip_range = False
        s.frame_start = args.start if args.start is not None else strip.frame_final_start
        s.frame_end = args.end if args.end is not None else strip.frame_final_end - 1
    output = args.output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    bpy.ops.wm.save_as_mainfile(filepath=str(output))  # so the result file lands next to it
    try:
        result = bpy.ops.ss4d.generate(synchronous=True)
    except RuntimeError:  # Blender raises for operators that report an error
        result = {"CANCELLED"}
    if result != {"FINISHED"}:
        print(f"error: {s.last_message}", file=sys.stderr)
        output.unlink(missing_ok=True)
        return 2
    obj = bpy.data.objects[f"SS4D_{strip.name}"]
    bpy.ops.wm.save_as_mainfile(filepath=str(output))
    print(f"wrote {output} ({obj.name}: {len(obj.data.vertices)} vertices, "
          f"{len(obj.data.shape_keys.key_blocks) - 1} shape keys; result file {obj['ss4d_result_file']})")
    if obj.get("ss4d_random_weights"):
        print("warning: made with the tiny random-weight pipeline: the result is noise", file=sys.stderr)
    poor_fit = poor_fit_message(json.loads(obj["ss4d_bad_frames"]))
    if poor_fit:
        print(f"warning: {poor_fit}", file=sys.stderr)
    for path in args.export:
        export(path.resolve(), obj, json.loads(obj["ss4d_scene_frames"]))
        print(f"exported {path}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return generate(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
