"""Speed and accuracy of the rig fit (engine/rig) on 32 frames x 20k vertices.

    .venv/bin/python bench/rig.py [--frames 32] [--vertices 20000] [--device cpu|cuda|auto] [--repeat 1]
        [--threads N]

Cases: a capsule skinned by known linear blend skinning (5 bones bending at four joints while the whole
body turns and moves) with an automatic bone count and with the count given, and the same with breathing
(non-rigid: the gentler ones stay within the target with the true bones, the strongest needs many more)
with correctives. Prints bones, RMS / max error
(% of the diagonal), joint error against the true joints, wall-clock seconds and the process's CPU
seconds per case (on a shared machine the wall clock depends on the load, printed first).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from rig_synthetic import skinned_capsule  # noqa: E402
from ss4d_blender.engine.rig import RigSettings, fit_rig  # noqa: E402


def joint_error(rig, true_joints: np.ndarray, diagonal: float) -> float:
    """Largest distance from a true joint to the nearest fitted head (% of the diagonal)."""
    heads = rig.heads[rig.parents >= 0]
    if len(heads) == 0:
        return float("nan")
    return float(np.linalg.norm(true_joints[:, None] - heads[None], axis=2).min(1).max() / diagonal * 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--vertices", type=int, default=20000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads while fitting (RigSettings.cpu_threads, default 1)")
    args = parser.parse_args()
    around = 80
    rings = max(4, round(args.vertices / around))
    cases = [("5-bone LBS, auto", 0.0, RigSettings()), ("5-bone LBS, --bones 5", 0.0, RigSettings(bones=5)),
             ("breathing 5 %, auto + correctives", 0.05, RigSettings(correctives=True)),
             ("breathing 25 %, auto + correctives", 0.25, RigSettings(correctives=True)),
             ("breathing 300 %, auto + correctives", 3.0, RigSettings(correctives=True))]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f}, "
          f"torch {torch.__version__}, {args.threads or RigSettings().cpu_threads} threads, device {args.device}")
    for name, breathing, settings in cases:
        if args.threads:
            settings = dataclasses.replace(settings, cpu_threads=args.threads)
        capsule = skinned_capsule(bones=5, frames=args.frames, rings=rings, around=around, breathing=breathing)
        T, V, _ = capsule.vertices.shape
        diagonal = float(np.linalg.norm(np.ptp(capsule.vertices[0], axis=0)))
        times, cpu = [], []
        for _ in range(args.repeat):
            started, started_cpu = time.perf_counter(), time.process_time()
            rig = fit_rig(capsule.vertices, capsule.faces, settings=settings, device=args.device)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
        print(f"{name:<36} {T} x {V}: {rig.num_bones:2d} bones, RMS {rig.rms_overall:.3f} %, "
              f"max {rig.max_overall:.3f} %, joints {joint_error(rig, capsule.joints, diagonal):.2f} %, "
              f"{min(times):6.2f} s (process CPU time {min(cpu):.1f} s)"
              + (f" (best of {args.repeat})" if args.repeat > 1 else ""), flush=True)


if __name__ == "__main__":
    main()
