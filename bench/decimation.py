"""Decimation speed and quality (`engine.mesh.cleanup.decimate`, quadric edge collapse in numpy), on
independently meshed capsules like registration's inputs. The pipeline decimates every frame to at most
`GenerateSettings.mesh_target_faces` (200k faces); registration decimates its reference frame to twice
its target vertex count (40k faces for 20k vertices). Prints one line per case: time, faces reached,
and the mean / max distance of the result's vertices to the input surface (% of the bounding-box diagonal).

    python bench/decimation.py [--cases 100000:40000 200000:200000 ...]   (input vertices : target faces)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ss4d_blender.engine.mesh.cleanup import decimate, euler_characteristic, is_watertight  # noqa: E402
from ss4d_blender.engine.registration.geometry import SurfaceDistance  # noqa: E402
from ss4d_blender.engine.registration.knn import PointGrid  # noqa: E402
from ss4d_blender.testing.synthetic import make_sequence  # noqa: E402
from ss4d_blender.engine.types import Mesh  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=["25000:40000", "100000:40000", "200000:200000"],
                    help="input vertices:target faces")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, numpy {np.__version__}, {torch.get_num_threads()} threads")
    for case in args.cases:
        size, target = (int(x) for x in case.split(":"))
        seq = make_sequence("capsule_bend", 1, resolution=max(1, round(size / 1900)), seed=0, textured=True)
        mesh = Mesh(seq.vertices[0], seq.faces[0], seq.colors[0])
        start = time.perf_counter()
        out = decimate(mesh, target)
        seconds = time.perf_counter() - start
        v = torch.from_numpy(mesh.vertices).double()
        f = torch.from_numpy(mesh.faces.astype(np.int64))
        _, _, dist = SurfaceDistance(v, f, PointGrid(v)).closest(torch.from_numpy(out.vertices).double())
        diag = float(np.linalg.norm(mesh.vertices.max(0) - mesh.vertices.min(0)))
        print(f"{len(mesh.vertices)} vertices / {len(mesh.faces)} faces -> {len(out.faces)} faces (target {target}): "
              f"{seconds:.2f} s; distance to the input mean {float(dist.mean()) / diag:.4%} max "
              f"{float(dist.max()) / diag:.4%}; watertight {is_watertight(out)}, Euler {euler_characteristic(out)}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
