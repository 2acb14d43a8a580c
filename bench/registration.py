"""Registration speed: 32 frames x ~20k vertices (a capsule bending, each frame meshed
independently), on the CPU or a GPU. Prints one result line; `--record` appends it to the
"Registration" section of bench/RESULTS.md.

    python bench/registration.py [--device cpu|cuda|mps] [--frames 32] [--vertices 20000] [--input-vertices N]
        [--textured] [--record]

--vertices is the registered mesh's size (the reference frame is simplified to it); --input-vertices the
size of every input frame (default 1.2x --vertices; the pipeline hands registration frames of up to ~100k
vertices: `GenerateSettings.mesh_target_faces`, 200k faces).

--textured paints a colour pattern on the material (`synthetic.texture`), so the fit matches colours too.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ss4d_blender.engine.registration import register_sequence  # noqa: E402
from ss4d_blender.testing.synthetic import make_sequence  # noqa: E402
from ss4d_blender.engine.types import Mesh  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Registration"


def record(line: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n"
    head, rest = text.split(SECTION, 1)
    nxt = rest.find("\n## ")
    body, tail = (rest, "") if nxt < 0 else (rest[:nxt], rest[nxt:])
    body = body.rstrip("\n") + f"\n- {line}\n"
    RESULTS.write_text(head + SECTION + body + tail)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--vertices", type=int, default=20000)
    ap.add_argument("--input-vertices", type=int, default=None)
    ap.add_argument("--kind", default="capsule_bend")
    ap.add_argument("--textured", action="store_true")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    # per-frame meshes of about --input-vertices; the reference is simplified to the target
    inputs = args.input_vertices or 1.2 * args.vertices
    seq = make_sequence(args.kind, args.frames, resolution=max(1, round(inputs / 1900)), seed=0,
                        textured=args.textured)
    meshes = [Mesh(v, f, c) for v, f, c in zip(seq.vertices, seq.faces, seq.colors or [None] * args.frames)]
    if args.device.startswith("cuda"):
        register_sequence(meshes[:2], target_vertices=args.vertices, device=args.device)  # warm-up
        torch.cuda.synchronize()
    start = time.perf_counter()
    anim = register_sequence(meshes, target_vertices=args.vertices, device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    rel = anim.fit_error / seq.diagonal
    dev = (torch.cuda.get_device_name() if args.device.startswith("cuda")
           else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    line = (f"{args.kind}{' (textured)' if args.textured else ''}: {args.frames} frames x "
            f"{anim.vertices.shape[1]} vertices (inputs "
            f"{min(v.shape[0] for v in seq.vertices)}-{max(v.shape[0] for v in seq.vertices)}) on {args.device} "
            f"({dev}): {seconds:.1f} s; fit error max {rel.max():.3%} of diagonal; torch {torch.__version__}")
    print(line)
    if args.record:
        record(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
