"""`register IN OUT`: one mesh through all frames, from the command line.

IN  an `.npz` with vertices_0..vertices_{T-1} (float32 [n,3]), faces_0..faces_{T-1} (int32 [m,3])
    and optionally colors_0.. (float32 [n,3]); or the pipeline's result file (read with
    `engine.result.load_result`, when that module is present).
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

from ..errors import InputError, SS4DError
from ..progress import Progress
from ..types import Mesh


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

    result = load_result(path)
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


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="register", description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--reference-frame", type=int, default=None)
    parser.add_argument("--target-vertices", type=int, default=20000)
    parser.add_argument("--temporal-smoothing", type=float, default=0.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    from .sequence import register_sequence

    def report(stage: str, fraction: float) -> None:
        if not args.quiet:
            print(f"\r{stage}: {100 * fraction:5.1f}%", end="", file=sys.stderr, flush=True)

    try:
        meshes, gaussians = load_meshes(args.input)
        anim = register_sequence(meshes, reference_frame=args.reference_frame,
                                 target_vertices=args.target_vertices,
                                 temporal_smoothing=args.temporal_smoothing,
                                 progress=Progress(report), device=args.device, gaussians=gaussians)
        save_animation(args.output, anim)
    except SS4DError as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(file=sys.stderr)
    bad = anim.info.get("bad_frames", [])
    print(f"{anim.vertices.shape[0]} frames x {anim.vertices.shape[1]} vertices, reference frame "
          f"{anim.reference_frame}, fit error max {float(np.max(anim.fit_error)):.5f}, "
          f"bad frames {bad if bad else 'none'} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
