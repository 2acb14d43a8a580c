"""Flow-Euler sampler: golden guidance-interval case, time schedule (rescale_t), CFG and its interval,
x_0 predictions, sparse inputs, progress / cancellation."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ss4d_blender.engine.errors import Cancelled
from ss4d_blender.testing.golden_runners import dense
from ss4d_blender.engine.sampler import FlowEulerSampler, flow_times, make_sampler
from ss4d_blender.engine.sparse import SparseTensor


def test_golden_guidance_interval_every_step(shared_dir):
    d = shared_dir / "golden" / "sampler_guidance_interval"
    manifest = json.loads((d / "manifest.json").read_text())
    checks = dense.run(d, json.loads((d / "config.json").read_text()), manifest, load_file(str(d / "io.safetensors")))
    assert len(checks) == 1 + 2 * manifest["params"]["steps"]
    worst = max(checks, key=lambda c: c.max_abs)
    print(f"\nsampler_guidance_interval worst: {worst.name} max_abs {worst.max_abs:.3g} rel_l2 {worst.rel_l2:.3g}")
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]


def test_flow_times_by_hand():
    assert np.allclose(flow_times(4), [1, 0.75, 0.5, 0.25, 0])
    # r t / (1 + (r - 1) t) with r = 3: t = 0.5 -> 0.75, t = 0.25 -> 0.5
    assert np.allclose(flow_times(4, 3.0), [1, 0.9, 0.75, 0.5, 0])


class ConstantVelocity:
    """v = cond[:, 0, 0] broadcast over x; records every call (t values, cond batch)."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond, **kwargs):
        values = x.feats if isinstance(x, SparseTensor) else x
        self.calls.append((t.clone(), cond, kwargs))
        if isinstance(x, SparseTensor):
            v = cond[x.coords[:, 0].long(), 0, 0][:, None].expand_as(values)
            return x.replace(v.contiguous())
        return cond[:, 0, 0].reshape(-1, *[1] * (values.dim() - 1)).expand_as(values)


def test_euler_integrates_a_constant_velocity_exactly():
    model = ConstantVelocity()
    noise = torch.randn(3, 2, 5)
    cond = torch.tensor([1.0, -2.0, 0.5]).reshape(3, 1, 1)
    out = FlowEulerSampler(1e-5).sample(model, noise, cond, steps=5, rescale_t=3.0, keep_history=True, num_frames=3)
    assert torch.allclose(out.samples, noise - cond.reshape(3, 1, 1), atol=1e-6)
    assert len(model.calls) == 5 and all(c[2] == {"num_frames": 3} for c in model.calls)
    times = flow_times(5, 3.0)
    for i, (t, _, _) in enumerate(model.calls):
        assert t.dtype == torch.float32 and t.shape == (3,) and torch.allclose(t, torch.tensor(1000 * times[i]).float())
    # x_0 prediction (1 - s) x_t - (s + (1 - s) t) v and the x after each step
    s = 1e-5
    x = noise
    for i in range(5):
        v = cond.reshape(3, 1, 1).expand_as(x)
        assert torch.allclose(out.pred_x_0[i], (1 - s) * x - (s + (1 - s) * times[i]) * v, atol=1e-6)
        x = x - (times[i] - times[i + 1]) * v
        assert torch.allclose(out.pred_x_t[i], x, atol=1e-6)


def test_cfg_combination_and_interval():
    noise = torch.zeros(2, 4)
    cond, neg = torch.full((1, 1, 1), 1.0), torch.full((1, 1, 1), 0.25)  # batch 1 is expanded to the batch
    w = 2.0
    guided_v = (1 + w) * 1.0 - w * 0.25

    model = ConstantVelocity()
    out = FlowEulerSampler(1e-5, guidance="cfg").sample(model, noise, cond, neg, steps=4, cfg_strength=w,
                                                        cfg_interval=(0.5, 1.0))
    assert len(model.calls) == 8  # always guided, interval ignored
    assert all(c[1].shape[0] == 2 for c in model.calls)
    assert torch.allclose(out.samples, torch.full_like(noise, -guided_v))

    model = ConstantVelocity()
    out = FlowEulerSampler(1e-5, guidance="interval").sample(model, noise, cond, neg, steps=4, rescale_t=1.0,
                                                             cfg_strength=w, cfg_interval=(0.5, 1.0))
    # t = 1, 0.75, 0.5 lie in [0.5, 1] (inclusive): guided; t = 0.25: conditional only
    assert len(model.calls) == 3 * 2 + 1
    assert torch.allclose(out.samples, torch.full_like(noise, -(0.75 * guided_v + 0.25 * 1.0)))

    model = ConstantVelocity()
    out = FlowEulerSampler(1e-5).sample(model, noise, cond, neg, steps=4, cfg_strength=w)
    assert len(model.calls) == 4 and torch.allclose(out.samples, torch.full_like(noise, -1.0))

    with pytest.raises(ValueError, match="neg_cond"):
        FlowEulerSampler(1e-5, guidance="cfg").sample(ConstantVelocity(), noise, cond, None, steps=2)


def test_sparse_noise_keeps_coords_and_cache():
    coords = torch.tensor([[0, 1, 1, 1], [0, 2, 1, 1], [1, 0, 0, 0]], dtype=torch.int32)
    noise = SparseTensor(torch.randn(3, 2), coords)
    noise.cache["marker"] = object()
    cond = torch.tensor([1.0, 3.0]).reshape(2, 1, 1)
    out = FlowEulerSampler(1e-5).sample(ConstantVelocity(), noise, cond, steps=3, keep_history=True)
    assert isinstance(out.samples, SparseTensor) and out.samples.coords is coords
    assert out.samples.cache is noise.cache
    assert torch.allclose(out.samples.feats, noise.feats - torch.tensor([1.0, 1.0, 3.0])[:, None], atol=1e-6)
    assert all(isinstance(p, SparseTensor) for p in out.pred_x_0 + out.pred_x_t)


def test_progress_per_step_and_cancel():
    seen = []
    FlowEulerSampler(1e-5).sample(ConstantVelocity(), torch.zeros(1, 2), torch.ones(1, 1, 1), steps=3,
                                  progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]

    model = ConstantVelocity()

    def cancel_at_two(done, total):
        if done == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        FlowEulerSampler(1e-5).sample(model, torch.zeros(1, 2), torch.ones(1, 1, 1), steps=5, progress=cancel_at_two)
    assert len(model.calls) == 2


def test_make_sampler_from_pipeline_names():
    s = make_sampler("FlowEulerGuidanceIntervalSampler", {"sigma_min": 1e-5})
    assert s.guidance == "interval" and s.sigma_min == 1e-5
    assert make_sampler("FlowEulerCfgSampler", {"sigma_min": 1e-5}).guidance == "cfg"
    assert make_sampler("FlowEulerSampler", {"sigma_min": 1e-5}).guidance == "none"
    with pytest.raises(ValueError):
        make_sampler("DDIMSampler", {"sigma_min": 1e-5})
