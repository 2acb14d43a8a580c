"""Headless SS4D: a video (or a folder of frames) in, an animated mesh .blend out, through Blender as a
Python module and the same operator the add-on's button runs.

    python -m ss4d_blender generate VIDEO -o out.blend [--export out.glb|out.gltf|out.fbx|out.abc] [options]
    python -m ss4d_blender rig IN.blend -o OUT.blend [--bones auto|N] [--correctives]

VIDEO: a movie file Blender can decode (mp4, mov, webm, ...) or a folder of images (PNG/WebP/TIFF; with
alpha for --matting alpha). `generate --help` lists every flag with its default.

Everything that can be checked is checked before any work, and the outputs are moved into place only when
everything succeeded (`blender/headless.py` does the work; this module only parses the flags).

Exit codes: 0 done, 2 bad input or settings (one line `error: ...`), 1 internal error, 130 cancelled.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .engine import cli_common


# ------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = cli_common.Parser(prog="python -m ss4d_blender", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    g = sub.add_parser("generate", help="video -> animated mesh .blend",
                       description="Video (or image folder) -> one animated mesh with shape keys in a .blend.")
    g.add_argument("video", type=Path, help="a movie file Blender decodes (mp4, mov, webm, ...) or a folder of "
                                            "images (PNG/WebP/TIFF)")
    g.add_argument("-o", "--output", type=Path, required=True,
                   help=".blend to write (an existing file is replaced only when the run succeeds)")
    g.add_argument("--export", type=Path, action="append", default=[], metavar="FILE",
                   help="also export to FILE: .glb, .gltf, .fbx or .abc; repeatable (default: none)")
    cli_common.add_frame_flags(g, frames_default="32",
                               start_help="scene frame; the clip starts at frame 1 (default: the clip's first)",
                               step_help="with --frames all: use every STEP-th frame of the range; the timeline "
                                         "blends linearly between them")
    cli_common.add_matting_flags(g, ("auto", "alpha", "learned", "chroma"), default="auto", model=False)
    g.add_argument("--key-color", type=cli_common.parse_color, default=None, metavar="COLOUR",
                   help="the screen's colour for --matting chroma, '#RRGGBB' or 'r,g,b' in 0..1 (default: "
                        "measured from the frame border)")
    g.add_argument("--tolerance", type=cli_common.non_negative_float, default=None,
                   help="chroma distance to the key colour that is keyed out fully (default: 0.12)")
    g.add_argument("--softness", type=cli_common.non_negative_float, default=None,
                   help="width of the soft edge beyond the tolerance (default: 0.08)")
    cli_common.add_sampling_flags(g)
    cli_common.add_animate_flags(g, reference_help="scene frame whose generated shape gives the mesh's topology "
                                                   "(default: the most complete)")
    g.add_argument("--height", type=cli_common.non_negative_float, default=None,
                   help="object height in metres (default: 1.8)")
    cli_common.add_device_flags(g)
    cli_common.add_weights_flags(g)
    g.add_argument("--python", default=None,
                   help="a Python with PyTorch that runs the model (default: this one)")
    g.set_defaults(run=generate)

    r = sub.add_parser("rig", help="shape-key animation in a .blend -> armature with skin weights",
                       description="Fits an armature with skin weights to every generated object of IN.blend "
                                   "(as the add-on's Convert to Armature button does) and writes OUT.blend.")
    r.add_argument("input", type=Path, metavar="IN.blend", help="a .blend holding generated objects")
    r.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.blend",
                   help=".blend to write (an existing file is replaced only when the run succeeds)")
    r.add_argument("--bones", type=bone_count, default=None, metavar="auto|N",
                   help="bone count; auto = the fewest (up to 32) whose error is within 0.5 %% of the size "
                        "(default: auto)")
    r.add_argument("--correctives", action="store_true",
                   help="keep what the bones cannot explain as corrective shape keys (default: off)")
    r.set_defaults(run=rig)
    return parser


def bone_count(text: str):
    from .engine.rig.cli import bone_count as parse

    return parse(text)


def generate(args) -> int:
    from .blender.headless import generate as run  # Blender loads only when a command runs

    return run(args)


def rig(args) -> int:
    from .blender.headless import rig as run

    return run(args)


def main(argv=None) -> int:
    return cli_common.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
