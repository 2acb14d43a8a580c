"""FLOPs of the full-size DENSE stages (structure flow and decoder) without a GPU: the released
configurations are built on the `meta` device and run under `torch.utils.flop_counter` (shapes only, no
data, no time). The sparse stages need real coordinates and are counted by bench/pipeline.py instead.

    .venv/bin/python bench/flops.py [--frames 32] [--steps 25] [--cfg-interval 0.5 1.0] [--rescale-t 3]

Sampler calls = steps + the steps whose rescaled time lies in the guidance interval (those run the
model twice: with and without the condition), as the released FlowEulerGuidanceIntervalSampler.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import RELEASED, count_flops, model_class  # noqa: E402

from ss4d_blender.engine.sampler import flow_times  # noqa: E402


def sampler_calls(steps: int, interval: tuple[float, float], rescale_t: float) -> int:
    """Model calls of the guidance-interval sampler: one per step, two where its time is in the interval."""
    t = flow_times(steps, rescale_t)[:-1]   # the times the sampler evaluates the model at
    return steps + int(((t >= interval[0]) & (t <= interval[1])).sum())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg-interval", type=float, nargs=2, default=(0.5, 1.0))
    p.add_argument("--rescale-t", type=float, default=3.0)
    a = p.parse_args()
    T = a.frames
    calls = sampler_calls(a.steps, tuple(a.cfg_interval), a.rescale_t)
    print(f"FULL-SIZE released configs on meta | {T} frames | sampler: {a.steps} steps, {calls} model calls")
    total = 0.0
    for stage, n in (("ss_flow", calls), ("ss_decoder", 1)):
        name, args = RELEASED[stage]
        with torch.device("meta"):
            model = model_class(name)(**args).eval().to(torch.bfloat16)
            x = torch.randn(T, 8, 16, 16, 16, dtype=torch.bfloat16)
            t = torch.full((T,), 500.0)
            cond = torch.randn(T, 1374, 1024, dtype=torch.bfloat16)
        with torch.no_grad():
            flops = count_flops(lambda: model(x, t, cond, num_frames=T) if stage == "ss_flow" else model(x))
        total += flops * n
        print(f"{stage:11} {flops / 1e12:9.1f} TFLOP/call x {n:3d} calls = {flops * n / 1e15:7.2f} PFLOP")
    print(f"dense stages total {total / 1e15:.2f} PFLOP; "
          f"at 990 TFLOP/s (H100 dense fp16/bf16 peak) >= {total / 990e12:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
