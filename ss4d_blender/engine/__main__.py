"""The engine's command line (plain Python + PyTorch, no Blender):

    python -m ss4d_blender.engine generate FRAMES -o OUTDIR [--frames N|all] [--start I] [--end J] [--seed S] ...
    python -m ss4d_blender.engine animate RESULT OUT.npz [--vertices N] [--reference-frame I] [--smoothing S]
    python -m ss4d_blender.engine register IN OUT.npz [--vertices N] ...
    python -m ss4d_blender.engine make-tiny-pipeline DIR

`COMMAND --help` lists every flag with its default. FRAMES is a video with alpha (PNG / QuickTime Animation /
ProRes 4444 in .mov, FFV1 in .mkv, VP8/VP9 with alpha in .webm; decoded with PyAV), a folder of RGBA images
(PNG/WebP/TIFF with alpha, natural number order) or an .npz with `frames` [T,H,W,4] uint8. With `--matting learned`
(or auto) any video or image folder works: BiRefNet removes the background first ("Removing background");
a green/blue screen goes through `python -m ss4d_blender generate VIDEO --matting chroma`.

`generate` writes OUTDIR/result.safetensors (everything later steps need; `engine.result.load_result`),
OUTDIR/gaussians/frame_XXX.ply (3D Gaussian Splatting files) and OUTDIR/meshes/frame_XXX.ply (per-frame
meshes with vertex colours; XXX counts from 000, with 4 digits from 1000 frames on, so names sort in frame
order); an earlier result in OUTDIR is replaced as a whole once the new one is complete. A clip longer than
`--window` runs in overlapping windows; the finished ones wait in .OUTDIR.ss4d-windows beside OUTDIR until the
result is written, so a cancelled run continues where it stopped when the same command runs again.
`animate` turns a result into one mesh through all frames (.npz with faces [F,3], vertices [T,V,3],
colors [V,3], fit_error [T], reference_frame).

Exit codes: 0 done, 2 bad input or settings (one line `error: ...`), 1 internal error, 130 cancelled.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Optional

from . import cli_common
from .commands import cmd_animate, cmd_generate, cmd_make_tiny_pipeline

# subcommands other modules add: (name, module, help); wired when the module is present
PLUGIN_COMMANDS = (("rig", "rig.cli", "rig an animated mesh"),
                   ("matte", "matte_cli", "separate the object from the background of a video"))


# ------------------------------------------------------------------------------------------ parser
def add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="run the model on a video with alpha / frame folder / .npz",
                       description="Run SS4D on a video with alpha, a folder of RGBA frames or an .npz with "
                                   "'frames'. Every flag's default is in its help.")
    g.add_argument("input", type=Path, help="video with alpha (.mov/.mkv/.webm), folder of RGBA frames "
                   "(PNG/WebP/TIFF) or .npz with 'frames'; a video without alpha (.mp4) needs --matting learned "
                   "(or `python -m ss4d_blender generate VIDEO --matting chroma` for a green/blue screen)")
    g.add_argument("-o", "--output", type=Path, required=True,
                   help="output folder (new, empty, or holding an earlier result, which is replaced)")
    cli_common.add_frame_flags(g, frames_default="all", start_help="counted from 1 (default: the clip's first)")
    cli_common.add_matting_flags(g, ("auto", "alpha", "learned"), default="alpha")
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
    cli_common.add_animate_flags(a)
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
