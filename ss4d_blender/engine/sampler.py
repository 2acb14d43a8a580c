"""Flow-Euler sampling of rectified-flow models, as the SS4D / TRELLIS samplers do.

The model predicts the velocity v at flow time t (1 = noise, 0 = data; passed to the model as 1000 t).
Times t_0 = 1 > ... > t_S = 0 are evenly spaced, then warped by `rescale_t`:
t' = r t / (1 + (r - 1) t) (more steps near the noise end for r > 1). Each step: x <- x - (t - t_next) v.
Classifier-free guidance: v = (1 + w) v(cond) - w v(neg_cond); with a guidance interval it applies only
while lo <= t <= hi (outside, one conditional call). Also returned per step: the x_0 prediction
(1 - sigma_min) x_t - (sigma_min + (1 - sigma_min) t) v.

Works on dense tensors and on `SparseTensor`s (features updated, coordinates and their neighbour-map
cache shared by every step).

Known frames (continuing a clip from an earlier window, `KnownFrames`): before each model call their
entries are set to the flow's forward noising of their final values at that step's t,
x_t = (1 - t) x_0 + (sigma_min + (1 - sigma_min) t) noise, with the noise they were first drawn with, and
the result holds their x_0 exactly. The other entries are sampled as usual, attending to a consistent past.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .sparse import SparseTensor


@dataclass
class SamplerOutput:
    samples: Any
    pred_x_t: list = field(default_factory=list)   # x after each step
    pred_x_0: list = field(default_factory=list)   # x_0 prediction at each step


@dataclass
class KnownFrames:
    """Entries held at known final values: `index` long [K] along dim 0 of the values (frames of a dense
    [T, C, ...] latent, rows of sparse features [N, C]); `clean` [K, ...] their x_0; `noise` [K, ...]."""

    index: torch.Tensor
    clean: torch.Tensor
    noise: torch.Tensor

    def noised(self, t: float, sigma_min: float) -> torch.Tensor:
        """The flow's forward process at time t (t = 1: the noise itself)."""
        return (1 - t) * self.clean + (sigma_min + (1 - sigma_min) * t) * self.noise

    def hold(self, x, values: torch.Tensor):
        """x with the known entries set to `values`."""
        held = _values(x).index_copy(0, self.index, values.to(_values(x).dtype))
        return _like(x, held)


def flow_times(steps: int, rescale_t: float = 1.0) -> np.ndarray:
    """[steps + 1] float64 times from 1 to 0, warped by rescale_t."""
    t = np.linspace(1, 0, steps + 1)
    return rescale_t * t / (1 + (rescale_t - 1) * t)


def _values(x):
    return x.feats if isinstance(x, SparseTensor) else x


def _like(x, values):
    return x.replace(values) if isinstance(x, SparseTensor) else values


class FlowEulerSampler:
    """guidance: "none", "cfg" (always) or "interval" (cfg only for t in cfg_interval)."""

    def __init__(self, sigma_min: float, guidance: str = "none"):
        if guidance not in ("none", "cfg", "interval"):
            raise ValueError(f"unknown guidance {guidance!r}")
        self.sigma_min = sigma_min
        self.guidance = guidance

    def velocity(self, model, x_t, t: float, cond, neg_cond=None, cfg_strength: float = 0.0,
                 cfg_interval: Sequence[float] = (0.0, 1.0), **model_kwargs) -> torch.Tensor:
        """Guided velocity at time t (values: dense tensor or sparse features)."""
        n = x_t.batch_size if isinstance(x_t, SparseTensor) else x_t.shape[0]
        t_model = torch.full((n,), 1000 * t, device=_values(x_t).device, dtype=torch.float32)

        def run(c):
            if c is not None and c.shape[0] == 1 and n > 1:
                c = c.expand(n, *c.shape[1:])
            return _values(model(x_t, t_model, c, **model_kwargs))

        guided = self.guidance == "cfg" or (self.guidance == "interval" and cfg_interval[0] <= t <= cfg_interval[1])
        if not guided:
            return run(cond)
        return (1 + cfg_strength) * run(cond) - cfg_strength * run(neg_cond)

    @torch.no_grad()
    def sample(self, model, noise, cond, neg_cond=None, steps: int = 50, rescale_t: float = 1.0,
               cfg_strength: float = 3.0, cfg_interval: Sequence[float] = (0.0, 1.0),
               progress: Optional[Callable[[int, int], None]] = None, keep_history: bool = False,
               known: Optional[KnownFrames] = None, **model_kwargs) -> SamplerOutput:
        """noise: dense [B, ...] or SparseTensor; cond / neg_cond: [B or 1, L, C]; model_kwargs go to the
        model (e.g. num_frames). progress(step_done, steps) after each step (may raise Cancelled).
        known: entries held at their forward-noised final values (see `KnownFrames`); None = none."""
        if self.guidance != "none" and neg_cond is None:
            raise ValueError(f"classifier-free guidance ({self.guidance}) needs neg_cond")
        times = flow_times(steps, rescale_t)
        x = noise
        out = SamplerOutput(samples=None)
        for i in range(steps):
            t, t_next = float(times[i]), float(times[i + 1])
            if known is not None:
                x = known.hold(x, known.noised(t, self.sigma_min))
            v = self.velocity(model, x, t, cond, neg_cond, cfg_strength, cfg_interval, **model_kwargs)
            x_values = _values(x)
            if keep_history:
                x0 = (1 - self.sigma_min) * x_values - (self.sigma_min + (1 - self.sigma_min) * t) * v
                out.pred_x_0.append(_like(x, x0))
            x = _like(x, x_values - (t - t_next) * v)
            if keep_history:
                out.pred_x_t.append(x)
            if progress is not None:
                progress(i + 1, steps)
        out.samples = x if known is None else known.hold(x, known.clean)
        return out


# sampler names used in pipeline.json -> guidance mode
SAMPLER_GUIDANCE = {
    "FlowEulerSampler": "none",
    "FlowEulerCfgSampler": "cfg",
    "FlowEulerGuidanceIntervalSampler": "interval",
}


def make_sampler(name: str, args: dict) -> FlowEulerSampler:
    """pipeline.json's {"name", "args"} of a sampler -> FlowEulerSampler."""
    if name not in SAMPLER_GUIDANCE:
        raise ValueError(f"unknown sampler {name!r} (known: {', '.join(SAMPLER_GUIDANCE)})")
    return FlowEulerSampler(sigma_min=float(args["sigma_min"]), guidance=SAMPLER_GUIDANCE[name])
