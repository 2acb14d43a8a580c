"""`register IN OUT`: one mesh through all frames, from the command line.

IN  an `.npz` with, for each frame t = 0..T-1 (numbered without gaps):
      vertices_t  float32 [n_t, 3]   the frame's vertex positions
      faces_t     int32   [m_t, 3]   triangles (indices into vertices_t)
      colors_t    float32 [n_t, 3]   optional vertex colours, linear 0..1
    or a result file written by `generate` (result.safetensors).
OUT an `.npz` with faces [F,3] int32, vertices [T,V,3] float32, colors [V,3] (when available),
    fit_error [T] float32, reference_frame, bad_frames.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import InputError
from ..progress import Progress
from ..types import Mesh, poor_fit_message


def load_meshes(path: Path) -> tuple[list[Mesh], Optional[list]]:
    """Per-frame meshes (and Gaussians when the file has them) from an .npz or a result file."""
    if not path.exists():
        raise InputError(f"Input file not found: {path}")
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as data:
            frames = sorted(int(m.group(1)) for k in data.files if (m := re.fullmatch(r"vertices_(\d+)", k)))
            if not frames:
                raise InputError(f"{path} has no vertices_0.. arrays; expected vertices_i and faces_i per frame.")
            if frames != list(range(len(frames))):
                raise InputError(f"{path}: frame numbers must run 0..T-1 without gaps, got {frames}.")
            meshes = []
            for t in frames:
                if f"faces_{t}" not in data.files:
                    raise InputError(f"{path}: vertices_{t} has no matching faces_{t}.")
                colors = data[f"colors_{t}"].astype(np.float32) if f"colors_{t}" in data.files else None
                meshes.append(Mesh(data[f"vertices_{t}"].astype(np.float32),
                                   data[f"faces_{t}"].astype(np.int32), colors))
        return meshes, None
    from ..result import load_result

    try:
        result = load_result(path)
    except (ValueError, OSError) as err:
        raise InputError(f"Cannot read {path}: {err}") from err
    return list(result.meshes), list(getattr(result, "gaussians", None) or []) or None


def save_animation(path: Path, anim) -> None:
    arrays = {"faces": anim.faces.astype(np.int32), "vertices": anim.vertices.astype(np.float32),
              "fit_error": anim.fit_error.astype(np.float32),
              "reference_frame": np.int32(anim.reference_frame),
              "bad_frames": np.asarray(anim.info.get("bad_frames", []), np.int32)}
    if anim.colors is not None:
        arrays["colors"] = anim.colors.astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .. import cli_common

    parser.add_argument("input", type=Path, help="per-frame meshes: an .npz as described above, or a result file")
    parser.add_argument("output", type=Path, help="output .npz")
    cli_common.add_animate_flags(parser)
    cli_common.add_device_flags(parser, precision=False)
    parser.add_argument("--quiet", action="store_true", help="no progress (default: shown)")


def run(args: argparse.Namespace) -> int:
    from .. import cli_common
    from .sequence import register_sequence

    cli_common.check_writable(args.output, (".npz",), flag="OUTPUT")
    cli_common.check_device(args.device)

    def report(stage: str, fraction: float) -> None:
        if not args.quiet:
            print(f"\r{stage}: {100 * fraction:5.1f}%", end="", file=sys.stderr, flush=True)

    meshes, gaussians = load_meshes(args.input)
    anim = register_sequence(meshes, progress=Progress(report), device=args.device, gaussians=gaussians,
                             **cli_common.given(args, "target_vertices", "reference_frame", "temporal_smoothing"))
    save_animation(args.output, anim)
    if not args.quiet:
        print(file=sys.stderr)
    print(f"{anim.vertices.shape[0]} frames x {anim.vertices.shape[1]} vertices, reference frame "
          f"{anim.reference_frame} -> {args.output}")
    print(cli_common.fit_error_text(anim.vertices, anim.fit_error, anim.reference_frame))
    poor_fit = poor_fit_message(anim.info.get("bad_frames", []))
    cli_common.print_warnings([poor_fit + " (frames counted from 0)"] if poor_fit else [])
    return 0
