"""The headless command's work (`python -m ss4d_blender generate`), through Blender as a Python module and
the same operator the add-on's button runs; `ss4d_blender/__main__.py` only parses the flags.

Everything that can be checked is checked before any work: the output locations, every frame of an image
folder, the device, the weights (downloaded first when missing). The .blend, the result file beside it and
the exports are written to a temporary folder beside the output and moved into place only when everything
succeeded, so a failure or Ctrl-C leaves an earlier result as it was.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..engine import cli_common
from ..engine.errors import InputError

EXPORT_SUFFIXES = (".glb", ".gltf", ".fbx", ".abc")
INTERNAL_FAILURES = ("Unexpected error in the generator", "The generator process stopped unexpectedly")


# ------------------------------------------------------------------------------------------ checks before work
def check_before_work(args) -> list:
    """Output locations, input frames, device and weights, before Blender loads anything. Returns the frame
    files of an image folder (empty for a movie)."""
    from ..engine import hub
    from ..engine.video import check_frame_folder

    args.output = cli_common.check_writable(args.output, (".blend",))
    args.export = [cli_common.check_writable(path, EXPORT_SUFFIXES, flag="--export") for path in args.export]
    video = args.video.expanduser().absolute()
    if not video.exists():
        raise InputError(f"{video} does not exist.")
    files = check_frame_folder(video, require_alpha=args.matting == "alpha") if video.is_dir() else []
    if files:
        cli_common.check_frame_range(args.start, args.end, len(files), f"the folder {video.name}")
    if args.python is None:  # the model runs in this Python: what it would refuse is refused now
        cli_common.check_device(args.device)
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:  # another Python runs the model: it fetches the weights itself
        return files
    hub.fetch_weights(args.pipeline, args.revision, args.mesh_decoder or "auto", args.cache_dir)
    if args.matting == "learned":
        from ..engine.background import matting_source, resolve_matting_weights

        resolve_matting_weights(matting_source(None, args.matting_quality, args.pipeline), cache_dir=args.cache_dir)
    return files


# ------------------------------------------------------------------------------------------ Blender side
def exact_frame_rate(rate: float) -> tuple[int, float]:
    """A clip's frame rate as Blender's scene (fps, fps_base), fps / fps_base == rate: 29.97 -> (30, 1.001)."""
    fps = max(1, int(-(-(rate - 1e-6) // 1)))
    return fps, fps / rate


def load_source(scene, path: Path, files: list):
    """Adds a movie strip (or an image-sequence strip for the checked files of a folder) at frame 1; sets the
    scene's frame range, frame rate and resolution to the source's."""
    editor = scene.sequence_editor_create()
    if files:
        strip = editor.strips.new_image(path.name, str(files[0]), channel=1, frame_start=1)
        for f in files[1:]:
            strip.elements.append(f.name)
    else:
        try:
            strip = editor.strips.new_movie(path.stem, str(path), channel=1, frame_start=1)
        except RuntimeError as err:
            raise InputError(f"Blender cannot decode {path} ({err}).") from None
        if strip.frame_duration <= 1:
            raise InputError(f"Blender cannot decode {path} as a video.")
        scene.render.fps, scene.render.fps_base = exact_frame_rate(strip.fps)
    element = strip.elements[0]
    if element.orig_width and element.orig_height:
        scene.render.resolution_x, scene.render.resolution_y = element.orig_width, element.orig_height
        scene.render.resolution_percentage = 100
    editor.active_strip = strip
    scene.frame_start, scene.frame_end = strip.frame_final_start, strip.frame_final_end - 1
    return strip


def apply_settings(args, scene, strip) -> None:
    """The flags the user set, onto the add-on's preferences and the scene's SS4D panel (their defaults
    stay there)."""
    from . import preferences

    prefs = preferences.HEADLESS
    for name in ("pipeline", "revision", "mesh_decoder", "cache_dir", "python", "device", "precision"):
        if getattr(args, name, None) is not None:
            setattr(prefs, name, str(getattr(args, name)))
    s = scene.ss4d
    panel = [("--seed", "seed", args.seed), ("--steps", "steps", args.steps), ("--cfg", "guidance", args.cfg),
             ("--tolerance", "tolerance", args.tolerance), ("--softness", "softness", args.softness),
             ("--vertices", "target_vertices", args.target_vertices),
             ("--smoothing", "smoothing", args.temporal_smoothing), ("--height", "height", args.height),
             ("--window", "window", args.window), ("--overlap", "overlap", args.overlap)]
    for flag, name, value in panel:
        if value is not None:
            set_panel_value(s, name, value, flag)
    s.matting = args.matting.upper()
    if args.matting_quality is not None:
        s.matting_quality = args.matting_quality.upper()
    if args.key_color is not None:
        s.auto_key_color, s.key_color = False, args.key_color
    if args.reference_frame is not None:
        s.auto_reference, s.reference_frame = False, args.reference_frame
    _apply_frames(args, s, strip)


def set_panel_value(s, name: str, value, flag: str) -> None:
    """Sets a panel setting, refusing a value outside its range (Blender would clamp it silently)."""
    prop = type(s).bl_rna.properties.get(name)
    if prop is None:
        raise InputError(f"{flag} is not available in this version of the add-on.")
    low, high = getattr(prop, "hard_min", None), getattr(prop, "hard_max", None)
    if low is not None and not low <= value <= high:
        raise InputError(f"{flag} {value} is outside the add-on's range {low:g}..{high:g}.")
    setattr(s, name, value)


def _apply_frames(args, s, strip) -> None:
    first, last = strip.frame_final_start, strip.frame_final_end - 1
    cli_common.check_frame_range(args.start, args.end, last - first + 1, "the clip")
    if args.start is not None or args.end is not None:
        s.use_strip_range = False
        s.frame_start = args.start if args.start is not None else first
        s.frame_end = args.end if args.end is not None else last
    if args.step is not None and args.frames != "all":
        raise InputError(f"--step {args.step} needs --frames all (--frames N spreads N frames evenly over the "
                         f"range).")
    if args.frames == "all":       # every (step-th) frame, however long the clip: it runs in windows
        s.frame_choice = "ALL"
        if args.step is not None:
            set_panel_value(s, "frame_step", args.step, "--step")
    elif args.frames is not None:
        s.frame_choice = "COUNT"
        set_panel_value(s, "num_frames", args.frames, f"--frames {args.frames}:")


class CtrlC:
    """Ctrl-C while the add-on's operator runs stops its work at the next step (frame extraction, then the
    worker through its cancel file) instead of raising inside Blender's operator code; anywhere else it
    raises KeyboardInterrupt. Either way the command ends with exit code 130."""

    def __init__(self):
        self.pressed = False
        self.in_operator = False

    def __call__(self, signum, frame) -> None:
        self.pressed = True
        if not self.in_operator:
            raise KeyboardInterrupt
        from . import frames

        frames.STOP.set()
        threading.Thread(target=self._cancel_worker, daemon=True).start()

    def _cancel_worker(self) -> None:
        from . import operators

        while self.in_operator:
            if operators.ACTIVE.client is not None:
                operators.request_cancel()
                return
            time.sleep(0.05)


def run_operator(scene, ctrl_c: CtrlC) -> None:
    """Generate 4D, synchronously. Raises InputError with the add-on's message when it fails."""
    import bpy

    from . import frames, jobs

    frames.STOP.clear()
    ctrl_c.in_operator = True
    try:
        result = bpy.ops.ss4d.generate(synchronous=True)
    except RuntimeError:  # Blender raises for operators that report an error
        result = {"CANCELLED"}
    finally:
        ctrl_c.in_operator = False
    if ctrl_c.pressed:
        if scene.ss4d.last_message.startswith("Cancelled after window"):
            print(f"{scene.ss4d.last_message.split(';')[0]}: the finished windows are kept in "
                  f"{jobs.WINDOW_CACHE_FOLDER}; run the same command again to continue from there",
                  file=sys.stderr, flush=True)
        raise KeyboardInterrupt
    if result != {"FINISHED"}:
        message = scene.ss4d.last_message or "Generation failed."
        if message.startswith(INTERNAL_FAILURES):
            raise RuntimeError(message)
        raise InputError(message)


def export(path: Path, obj, scene_frames) -> None:
    import bpy

    from .scene_build import to_relative_keys

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
    else:
        bpy.ops.wm.alembic_export(filepath=str(path), selected=True, start=bpy.context.scene.frame_start,
                                  end=bpy.context.scene.frame_end)


# ------------------------------------------------------------------------------------------ output placement
class Staging:
    """A temporary folder beside the output. Everything is written there; `publish` moves it into place
    (the .blend last), and `discard` removes whatever is left, including the folders made for it."""

    def __init__(self, output: Path):
        self.made, folder = [], output.parent   # folders this run creates, innermost first
        while not folder.exists():
            self.made.append(folder)
            folder = folder.parent
        output.parent.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
        self.output = output

    def path(self, final: Path) -> Path:
        """Where `final` is written until it is published (exports keep their own subfolder)."""
        if final == self.output:
            return self.folder / final.name
        folder = self.folder / f"export_{abs(hash(str(final)))}"
        folder.mkdir(exist_ok=True)
        return folder / final.name

    def publish(self, exports: list) -> None:
        umask = os.umask(0)
        os.umask(umask)
        for final in exports:
            for produced in self.path(final).parent.iterdir():  # .gltf writes a .bin beside it
                produced.chmod(0o666 & ~umask)
                os.replace(produced, final.parent / produced.name)
        for produced in sorted(self.folder.iterdir(), key=lambda p: p.name == self.output.name):
            if produced.is_file():
                produced.chmod(0o666 & ~umask)
                os.replace(produced, self.output.parent / produced.name)
        self.made = []

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        for folder in self.made:  # innermost first: only folders made for this run, and only when empty
            try:
                folder.rmdir()
            except OSError:
                break


# ------------------------------------------------------------------------------------------ generate
def generate(args) -> int:
    import json

    import bpy

    from .. import register
    from ..engine.result import read_metadata
    from ..engine.types import poor_fit_message
    from ..engine.windows import cache_folder_for
    from . import jobs

    ctrl_c = CtrlC()
    signal.signal(signal.SIGINT, ctrl_c)
    files = check_before_work(args)
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.context.preferences.filepaths.save_version = 0  # no .blend1 backups from the batch tool
    register()
    scene = bpy.context.scene
    strip = load_source(scene, args.video.expanduser().absolute(), files)
    apply_settings(args, scene, strip)
    staging = Staging(args.output)
    jobs.WINDOW_CACHE_FOLDER = cache_folder_for(args.output)   # outside the staging folder: kept on cancel
    try:
        # saved first so the add-on keeps its result file beside the .blend, in the staging folder
        bpy.ops.wm.save_as_mainfile(filepath=str(staging.path(args.output)))
        run_operator(scene, ctrl_c)
        obj = bpy.data.objects[f"SS4D_{strip.name}"]
        bpy.ops.wm.save_as_mainfile(filepath=str(staging.path(args.output)))
        for path in args.export:
            export(staging.path(path), obj, json.loads(obj["ss4d_scene_frames"]))
        result_file = Path(bpy.path.abspath(obj["ss4d_result_file"]))
        warnings = read_metadata(result_file)["warnings"]
        staging.publish(args.export)
    finally:
        staging.discard()
    print(f"wrote {args.output} ({obj.name}: {len(obj.data.vertices)} vertices, "
          f"{jobs.animation_summary(obj)}; result file "
          f"{args.output.parent / result_file.name})")
    for path in args.export:
        print(f"exported {path}")
    poor_fit = poor_fit_message(json.loads(obj["ss4d_bad_frames"]))
    cli_common.print_warnings(list(warnings) + ([poor_fit] if poor_fit else []))
    return 0


def rig(args) -> int:
    """`rig IN.blend -o OUT.blend`: the armature fit of every generated object, written to a partial file
    beside the target (so relative paths stay right) and moved over it only when everything succeeded."""
    import bpy

    from .. import register
    from .armature import rig_blend_file

    source = Path(args.input).expanduser().absolute()
    if not source.is_file() or source.suffix.lower() != ".blend":
        raise InputError(f"{args.input}: not a .blend file.")
    output = cli_common.check_writable(args.output, (".blend",))
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.context.preferences.filepaths.save_version = 0  # no .blend1 backups from the batch tool
    register()
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.stem}.partial-{os.getpid()}.blend")
    try:
        lines = rig_blend_file(source, partial, bones=args.bones, correctives=args.correctives)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    for line in lines:
        print(line)
    print(f"wrote {output}")
    return 0
