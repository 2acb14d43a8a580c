"""The engine's command line (plain Python + PyTorch, no Blender):

    python -m ss4d_blender.engine generate FRAMES -o OUTDIR [--frames N|all] [--start I] [--end J] [--seed S] ...
    python -m ss4d_blender.engine animate RESULT OUT.npz [--vertices N] [--reference-frame I] [--smoothing S]
    python -m ss4d_blender.engine register IN OUT.npz [--vertices N] ...
    python -m ss4d_blender.engine make-tiny-pipeline DIR

`COMMAND --help` lists every flag with its default. FRAMES is a video with alpha (PNG / QuickTime Animation /
ProRes 4444 in .mov, FFV1 in .mkv, VP8/VP9 with alpha in .webm; decoded with PyAV), a folder of RGBA images
(PNG/WebP/TIFF with alpha, natural number order) or an .npz with `frames` [T,H,W,4] uint8. The engine does no
matting: videos without alpha (a usual .mp4) go through `python -m ss4d_blender generate VIDEO --matting chroma`.

`generate` writes OUTDIR/result.safetensors (everything later steps need; `engine.result.load_result`),
OUTDIR/gaussians/frame_XXX.ply (3D Gaussian Splatting files) and OUTDIR/meshes/frame_XXX.ply (per-frame
meshes with vertex colours); an earlier result in OUTDIR is replaced as a whole once the new one is complete.
`animate` turns a result into one mesh through all frames (.npz with faces [F,3], vertices [T,V,3],
colors [V,3], fit_error [T], reference_frame).

Exit codes: 0 done, 2 bad input or settings (one line `error: ...`), 1 internal error, 130 cancelled.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from . import cli_common
from .cli_common import given
from .errors import InputError

RESULT_ENTRIES = {"result.safetensors", "gaussians", "meshes"}  # what `generate` writes into OUTDIR
# subcommands other modules add: (name, module, help); wired when the module is present
PLUGIN_COMMANDS = (("rig", "rig.cli", "rig an animated mesh"),
                   ("matte", "matte_cli", "separate the object from the background of a video"))


class StageBars:
    """A `Progress` callback drawing one tqdm bar per stage (percent of the stage) on stderr."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.stage: Optional[str] = None
        self.bar = None

    def __call__(self, stage: str, fraction: float) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=100, desc=f"{stage:<18}", unit="%", file=sys.stderr, dynamic_ncols=True,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}]")
        self.bar.n = round(100 * fraction, 1)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ------------------------------------------------------------------------------------------ generate
def check_result_folder(out: Path) -> Path:
    """OUTDIR can be written, and holds nothing but an earlier result (which the new one replaces)."""
    out = cli_common.check_writable(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"-o {out} is a file; give a folder for the result.")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in RESULT_ENTRIES)
        if others:
            raise InputError(f"-o {out} holds files that are not an SS4D result ({', '.join(others[:3])}); the "
                             f"result replaces the folder's contents, so give an empty or new folder.")
    return out


def settings_from_args(args: argparse.Namespace):
    """GenerateSettings from the flags the user set (each default lives on the dataclass)."""
    from dataclasses import fields

    from .api import GenerateSettings

    names = {f.name for f in fields(GenerateSettings)}
    windows = given(args, "window", "overlap", "step")
    missing = [name for name in windows if name not in names]
    if missing:
        raise InputError(f"--{missing[0]} is not available in this version of the engine.")
    return GenerateSettings.from_user(**given(args, "pipeline", "revision", "mesh_decoder", "cache_dir", "seed",
                                              "steps", "cfg", "latent_cfg", "device", "precision", "low_vram"),
                                      **windows)


def write_result_folder(out: Path, result) -> None:
    """Writes the result, Gaussians and meshes into a new folder beside `out`, then swaps it in: an
    earlier result disappears as a whole, and a half-written set never appears under `out`."""
    from .gaussians import save_ply
    from .mesh_io import save_mesh_ply

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    try:
        result.save(staging / "result.safetensors")
        (staging / "gaussians").mkdir()
        for i, g in enumerate(result.gaussians):
            save_ply(staging / "gaussians" / f"frame_{i:03d}.ply", g)
        for i, m in enumerate(result.meshes):
            save_mesh_ply(staging / "meshes" / f"frame_{i:03d}.ply", m)
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the result folder is an ordinary one
        (staging / "result.safetensors").chmod(0o666 & ~umask)
        if out.exists():
            os.replace(out, old)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def cmd_generate(args: argparse.Namespace) -> int:
    from . import hub
    from .api import generate
    from .progress import Progress
    from .video import read_frames

    if not args.input.expanduser().exists():
        raise InputError(f"Input not found: {args.input}")
    out = check_result_folder(args.output)
    settings = settings_from_args(args)
    cli_common.check_device(settings.device)
    hub.fetch_weights(settings.pipeline, settings.revision, settings.mesh_decoder, settings.cache_dir)
    max_frames = None if args.frames in (None, "all") else args.frames
    frames = read_frames(args.input, max_frames=max_frames, frame_range=(args.start, args.end))
    if not args.quiet:
        print(f"{frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]} from {args.input}", file=sys.stderr)
    bars = StageBars(enabled=not args.quiet)
    try:
        result = generate(frames, settings, Progress(bars))
    finally:
        bars.close()
    write_result_folder(out, result)

    s = result.settings
    gaussian_counts = [len(g.xyz) for g in result.gaussians]
    face_counts = [len(m.faces) for m in result.meshes]
    print(f"{result.num_frames} frames in {s.get('seconds', 0):.1f} s on {s.get('device')} ({s.get('precision')}), "
          f"pipeline {s.get('pipeline')}@{s.get('pipeline_revision')}, meshes: {s.get('mesh_decoder_source')}")
    print(f"gaussians per frame {min(gaussian_counts)}..{max(gaussian_counts)}, "
          f"mesh faces per frame {min(face_counts, default=0)}..{max(face_counts, default=0)}")
    print(f"wrote {out / 'result.safetensors'}, {out / 'gaussians'}/frame_*.ply, {out / 'meshes'}/frame_*.ply")
    cli_common.print_warnings(result.warnings)
    return 0


# ------------------------------------------------------------------------------------------ animate
def cmd_animate(args: argparse.Namespace) -> int:
    from .api import animate
    from .progress import Progress
    from .registration.cli import save_animation
    from .result import load_result
    from .types import poor_fit_message

    cli_common.check_writable(args.output, (".npz",), flag="OUTPUT")
    cli_common.check_device(args.device)
    try:
        result = load_result(args.result)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise InputError(f"Cannot read the result file {args.result}: {err}") from err
    bars = StageBars(enabled=not args.quiet)
    try:
        anim = animate(result, progress=Progress(bars), device=args.device,
                       **given(args, "target_vertices", "reference_frame", "temporal_smoothing"))
    finally:
        bars.close()
    save_animation(Path(args.output), anim)
    print(f"{anim.vertices.shape[0]} frames x {anim.vertices.shape[1]} vertices, {len(anim.faces)} faces, "
          f"reference frame {anim.reference_frame} -> {args.output}")
    print(cli_common.fit_error_text(anim.vertices, anim.fit_error, anim.reference_frame))
    poor_fit = poor_fit_message(anim.info["bad_frames"])
    cli_common.print_warnings(list(result.warnings) + ([poor_fit + " (frames counted from 0)"] if poor_fit else []))
    return 0


def cmd_make_tiny_pipeline(args: argparse.Namespace) -> int:
    from .tiny import make_tiny_pipeline

    cli_common.check_writable(args.folder)
    started = time.perf_counter()
    folder = make_tiny_pipeline(args.folder, seed=args.seed)
    print(f"wrote the tiny random-weight pipeline to {folder} in {time.perf_counter() - started:.1f} s "
          f"(use --pipeline {folder}; its results are noise, for testing only)")
    return 0


# ------------------------------------------------------------------------------------------ parser
def add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="run the model on a video with alpha / frame folder / .npz",
                       description="Run SS4D on a video with alpha, a folder of RGBA frames or an .npz with "
                                   "'frames'. Every flag's default is in its help.")
    g.add_argument("input", type=Path, help="video with alpha (.mov/.mkv/.webm), folder of RGBA frames "
                   "(PNG/WebP/TIFF) or .npz with 'frames'; a video without alpha (.mp4) needs "
                   "`python -m ss4d_blender generate VIDEO --matting chroma`")
    g.add_argument("-o", "--output", type=Path, required=True,
                   help="output folder (new, empty, or holding an earlier result, which is replaced)")
    cli_common.add_frame_flags(g, frames_default="all", start_help="counted from 1 (default: the clip's first)")
    cli_common.add_sampling_flags(g)
    g.add_argument("--latent-cfg", type=cli_common.non_negative_float, default=None,
                   help="guidance strength of the latent stage (default: the pipeline's pipeline.json)")
    cli_common.add_device_flags(g)
    cli_common.add_weights_flags(g)
    g.add_argument("--low-vram", action=argparse.BooleanOptionalAction, default=None,
                   help="load one model at a time (default: automatic, when GPU memory < 24 GB)")
    g.add_argument("--quiet", action="store_true", help="no progress bars (default: shown)")
    g.set_defaults(run=cmd_generate)


def add_animate_parser(sub) -> None:
    a = sub.add_parser("animate", help="one mesh through all frames of a result",
                       description="Register the per-frame meshes of a result into one animated mesh (.npz).")
    a.add_argument("result", type=Path, help="result.safetensors written by `generate`")
    a.add_argument("output", type=Path, help="output .npz")
    cli_common.add_animate_flags(a, reference_help="frame (counted from 0) whose shape gives the topology "
                                                   "(default: the most complete)")
    cli_common.add_device_flags(a, precision=False)
    a.add_argument("--quiet", action="store_true", help="no progress bars (default: shown)")
    a.set_defaults(run=cmd_animate)


def add_plugin_parsers(sub) -> None:
    """Subcommands of other engine modules (`add_arguments(parser)`, `run(args) -> int`), when present."""
    for name, module_name, help_text in PLUGIN_COMMANDS:
        full_name = f"{__package__}.{module_name}"
        try:
            module = importlib.import_module(full_name)
        except ModuleNotFoundError as err:
            if err.name is not None and full_name.startswith(err.name):
                continue  # that module is not part of this version
            raise
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(run=module.run)


def build_parser() -> argparse.ArgumentParser:
    from .registration import cli as register_cli

    parser = cli_common.Parser(prog="python -m ss4d_blender.engine", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate_parser(sub)
    add_animate_parser(sub)
    r = sub.add_parser("register", help="one mesh through per-frame meshes (.npz or result file)",
                       description=register_cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    register_cli.add_arguments(r)
    r.set_defaults(run=register_cli.run)
    t = sub.add_parser("make-tiny-pipeline", help="write the tiny random-weight pipeline (tests, offline demos)",
                       description="Write a tiny pipeline with RANDOM weights (its results are noise).")
    t.add_argument("folder", type=Path, help="folder to write (created)")
    t.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    t.set_defaults(run=cmd_make_tiny_pipeline)
    add_plugin_parsers(sub)
    return parser


def main(argv: Optional[list] = None) -> int:
    return cli_common.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
