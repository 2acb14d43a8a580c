"""`engine rig ANIM.npz RIG.npz [--bones auto|N] [--correctives]`: bones and skin weights for an animation.

ANIM.npz is what `engine animate` and `engine register` write (`vertices` [T, V, 3], `faces` [F, 3],
`reference_frame`); the rest pose is the reference frame (the frame whose mesh the animation is built on),
or `rest_vertices` [V, 3] when the file has them (the add-on passes its mesh's basis shape so).
RIG.npz is described in `engine/rig/rig_file.py`. `add_arguments` and `run` are the subcommand's parser
and body; `python -m ss4d_blender.engine.rig.cli` runs it on its own (the add-on runs it so in its runtime).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .. import cli_common
from ..errors import InputError



def bone_count(text: str):
    """'auto' -> None, else a positive bone count."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bones must be 'auto' or a whole number, got '{text}'") from None
    if not 1 <= value <= 256:
        raise argparse.ArgumentTypeError(f"bones must be between 1 and 256, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("animation", type=Path, help="ANIM.npz written by `engine animate` or `engine register`")
    parser.add_argument("output", type=Path, help="RIG.npz to write")
    parser.add_argument("--bones", type=bone_count, default=None, metavar="auto|N",
                        help="bone count; auto: the fewest (up to 32) with an RMS error of at most 0.5 %% of the "
                             "diagonal (default: auto)")
    parser.add_argument("--correctives", action="store_true",
                        help="also store per-frame corrective offsets that make the rig reproduce every frame exactly")
    cli_common.add_device_flags(parser, precision=False)


def load_animation(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """vertices [T, V, 3], faces [F, 3], rest_vertices [V, 3] or None, and the reference frame of an ANIM.npz."""
    if not path.is_file():
        raise InputError(f"Animation file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("vertices", "faces") if k not in data.files]
            if missing:
                raise InputError(f"{path} is not an animation file (no {' or '.join(missing)}); write one with "
                                 f"`engine animate` or `engine register`.")
            reference = int(data["reference_frame"]) if "reference_frame" in data.files else 0
            rest = data["rest_vertices"] if "rest_vertices" in data.files else None
            return data["vertices"], data["faces"], rest, reference
    except (OSError, ValueError) as err:
        raise InputError(f"Cannot read the animation file {path}: {err}") from err


def run(args: argparse.Namespace) -> int:
    from . import RigSettings, fit_rig

    cli_common.check_device(args.device)
    cli_common.check_writable(args.output, (".npz",))
    vertices, faces, rest, reference = load_animation(args.animation)
    if vertices.ndim == 3 and not 0 <= reference < len(vertices):
        reference = 0
    settings = RigSettings(bones=args.bones, correctives=args.correctives)
    rig = fit_rig(vertices, faces, rest_vertices=rest, rest_frame=reference, settings=settings, device=args.device)
    rig.save(args.output)
    T = rig.transforms.shape[0]
    how = {"auto": "chosen automatically", "given": "as asked", "static": "no motion"}[rig.info["bone_count"]]
    if args.bones is not None and rig.num_bones < args.bones and rig.info["bone_count"] == "given":
        how = f"fewer than the {args.bones} asked: no cluster was left to split, or a bone got no weight"
    print(f"{rig.num_bones} bones ({how}) for {T} frames x {len(rig.rest_vertices)} vertices in "
          f"{rig.info['seconds']:.1f} s: RMS error {rig.rms_overall:.3f} %, max {rig.max_overall:.3f} % of the "
          f"diagonal (worst frame {int(np.argmax(rig.rms_error))})"
          + (", correctives stored (exact)" if rig.correctives is not None else "") + f" -> {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m ss4d_blender.engine.rig.cli` (the add-on's runtime runs it so): the same parser and exit
    codes as `engine rig`."""
    parser = cli_common.Parser(prog="python -m ss4d_blender.engine.rig.cli", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.set_defaults(run=run)
    return cli_common.run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
