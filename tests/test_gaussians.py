"""Gaussian activation (hand-computed values, golden decoder fixture) and the 3DGS .ply writer/reader."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ss4d_blender.engine.gaussians import (
    Z_UP_TO_Y_UP, GaussianConfig, GaussianFrame, activate_gaussians, hammersley_points, load_ply,
    offset_perturbation, raw_channel_slices, save_ply,
)
from ss4d_blender.engine.types import GaussianSet

REF_CONFIG = {  # the fixture's / released decoder's representation_config
    "lr": {"_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0, "_scaling": 1.0, "_rotation": 0.1},
    "perturb_offset": True, "voxel_size": 1.5, "num_gaussians": 8, "2d_filter_kernel_size": 0.1,
    "3d_filter_kernel_size": 0.0009, "scaling_bias": 0.004, "opacity_bias": 0.1, "scaling_activation": "softplus",
}


def test_config_from_reference():
    c = GaussianConfig.from_reference(REF_CONFIG)
    assert c.num_gaussians == 8 and c.raw_channels == 112
    assert c.lr["rotation"] == 0.1 and c.lr["xyz"] == 1.0
    assert c.filter_3d == 0.0009 and c.scaling_activation == "softplus"
    with pytest.raises(ValueError):
        GaussianConfig.from_reference({**REF_CONFIG, "bogus": 1})


def test_channel_slices():
    s = raw_channel_slices(2)
    assert s == {"xyz": slice(0, 6), "features_dc": slice(6, 12), "scaling": slice(12, 18),
                 "rotation": slice(18, 26), "opacity": slice(26, 28)}


def test_hammersley_and_perturbation_by_hand():
    p = hammersley_points(4)
    # i/4, base-2 radical inverse (0, .5, .25, .75), base-3 radical inverse (0, 1/3, 2/3, 1/9)
    expected = [[0, 0, 0], [0.25, 0.5, 1 / 3], [0.5, 0.25, 2 / 3], [0.75, 0.75, 1 / 9]]
    assert torch.allclose(p, torch.tensor(expected), atol=1e-7)
    pert = offset_perturbation(4, 1.5)
    assert torch.allclose(pert[1], torch.tensor([math.atanh(-0.5 / 1.5), 0.0, math.atanh((2 / 3 - 1) / 1.5)]),
                          atol=1e-6)
    # zero raw offsets then put the Gaussians exactly at the Hammersley points inside the voxel
    c = GaussianConfig.from_reference({**REF_CONFIG, "num_gaussians": 4})
    g = activate_gaussians(torch.zeros(1, 56), torch.tensor([[3, 0, 7]]), 16, c, pert)
    expected_xyz = (torch.tensor([3.5, 0.5, 7.5]) + (p * 2 - 1) * 0.5 * 1.5 / 1.5) / 16 - 0.5
    assert torch.allclose(g.xyz, expected_xyz, atol=1e-6)


def test_activation_by_hand():
    """One voxel, one Gaussian, every raw value set by hand; expected values from the formulas."""
    cfg = GaussianConfig.from_reference({**REF_CONFIG, "num_gaussians": 1, "perturb_offset": False})
    raw = torch.tensor([[0.2, -0.4, 1.0,      # xyz offsets
                         0.3, -0.1, 0.7,      # features_dc
                         -1.0, 0.0, 2.0,      # scaling
                         1.0, 2.0, -3.0, 5.0,  # rotation (times lr 0.1)
                         0.5]])               # opacity
    g = activate_gaussians(raw, torch.tensor([[1, 2, 3]]), 4, cfg)
    res, vs = 4, 1.5
    xyz = [(c + 0.5) / res + math.tanh(o) * vs / (2 * res) - 0.5 for c, o in zip((1, 2, 3), (0.2, -0.4, 1.0))]
    assert torch.allclose(g.xyz, torch.tensor([xyz]), atol=1e-6)
    assert torch.allclose(g.features_dc, torch.tensor([[[0.3, -0.1, 0.7]]]))
    opacity = 1 / (1 + math.exp(-(0.5 + math.log(0.1 / 0.9))))
    assert abs(g.opacity.item() - opacity) < 1e-6
    s_bias = 0.004 + math.log(-math.expm1(-0.004))  # inverse softplus
    scales = [math.sqrt(math.log1p(math.exp(r + s_bias)) ** 2 + 0.0009 ** 2) for r in (-1.0, 0.0, 2.0)]
    assert torch.allclose(g.scaling, torch.tensor([scales]), rtol=1e-5)
    assert abs(g.scaling[0, 1].item() - math.sqrt(0.004 ** 2 + 0.0009 ** 2)) < 1e-7  # raw 0 -> the bias
    q = np.array([1 + 0.1, 0.2, -0.3, 0.5])
    assert torch.allclose(g.rotation, torch.from_numpy(q / np.linalg.norm(q)).float()[None], atol=1e-6)

    exp_cfg = GaussianConfig.from_reference({**REF_CONFIG, "num_gaussians": 1, "perturb_offset": False,
                                             "scaling_activation": "exp", "3d_filter_kernel_size": 0.0})
    g = activate_gaussians(raw, torch.tensor([[1, 2, 3]]), 4, exp_cfg)
    assert torch.allclose(g.scaling, torch.tensor([[0.004 * math.exp(-1), 0.004, 0.004 * math.exp(2)]]), rtol=1e-5)


def test_activation_rejects_wrong_width():
    cfg = GaussianConfig.from_reference(REF_CONFIG)
    with pytest.raises(ValueError):
        activate_gaussians(torch.zeros(2, 100), torch.zeros(2, 3, dtype=torch.int32), 16, cfg)
    with pytest.raises(ValueError):  # perturb_offset without the buffer
        activate_gaussians(torch.zeros(2, 112), torch.zeros(2, 3, dtype=torch.int32), 16, cfg)


def test_activation_matches_golden(shared_dir):
    """to_representation of the reference, frame by frame, from the fixture's raw decoder output."""
    case = shared_dir / "golden" / "slat_gs_decoder_4d"
    io = load_file(str(case / "io.safetensors"))
    buffer = load_file(str(case / "weights.safetensors"))["offset_perturbation"]
    args = json.loads((case / "config.json").read_text())["args"]
    cfg = GaussianConfig.from_reference(args["representation_config"])
    assert torch.allclose(offset_perturbation(cfg.num_gaussians, cfg.voxel_size), buffer, atol=1e-6)
    num_frames = json.loads((case / "manifest.json").read_text())["non_tensor_args"]["num_frames"]
    for k in range(num_frames):
        rows = io["coords"][:, 0] == k
        g = activate_gaussians(io["raw_feats"][rows], io["coords"][rows, 1:], args["resolution"], cfg, buffer)
        for name in ("xyz", "features_dc", "opacity", "scaling", "rotation"):
            ref = io[f"frame{k}_{name}"]
            assert getattr(g, name).shape == ref.shape
            assert (getattr(g, name) - ref).abs().max() < 1e-6, (k, name)


def _random_set(n=50, seed=0) -> GaussianSet:
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n, 4))
    return GaussianSet(
        xyz=rng.uniform(-0.5, 0.5, (n, 3)).astype(np.float32),
        features_dc=rng.normal(size=(n, 1, 3)).astype(np.float32),
        opacity=rng.uniform(0.01, 0.99, (n, 1)).astype(np.float32),
        scaling=np.exp(rng.uniform(-7, -2, (n, 3))).astype(np.float32),
        rotation=(q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32),
    )


def test_ply_round_trip_and_storage_convention(tmp_path):
    g = _random_set()
    path = tmp_path / "g.ply"
    save_ply(path, g)
    data = path.read_bytes()
    header = data[:data.index(b"end_header\n") + len(b"end_header\n")].decode()
    assert "format binary_little_endian 1.0" in header and "element vertex 50" in header
    props = [line.split()[-1] for line in header.splitlines() if line.startswith("property float")]
    assert props == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                     "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    # raw storage: logit opacity, log scale
    body = np.frombuffer(data[len(header):], dtype="<f4").reshape(50, 17)
    assert np.allclose(body[:, 9], np.log(g.opacity[:, 0] / (1 - g.opacity[:, 0])), atol=1e-5)
    assert np.allclose(body[:, 10:13], np.log(g.scaling), atol=1e-5)
    assert np.all(body[:, 3:6] == 0)

    back = load_ply(path)
    for name in ("xyz", "features_dc", "opacity", "scaling", "rotation"):
        assert getattr(back, name).shape == getattr(g, name).shape
        assert np.allclose(getattr(back, name), getattr(g, name), rtol=1e-5, atol=1e-6), name


def test_ply_transform_rotates_positions_and_orientations(tmp_path):
    g = _random_set(20, seed=1)
    save_ply(tmp_path / "y_up.ply", g, transform=Z_UP_TO_Y_UP)
    back = load_ply(tmp_path / "y_up.ply")
    R = np.array(Z_UP_TO_Y_UP)
    assert np.allclose(back.xyz, g.xyz @ R.T, atol=1e-6)

    def matrix(q):
        w, x, y, z = q
        return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                         [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                         [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])

    for q_in, q_out in zip(g.rotation, back.rotation):
        assert np.allclose(matrix(q_out), R @ matrix(q_in), atol=1e-5)
    with pytest.raises(ValueError):
        save_ply(tmp_path / "bad.ply", g, transform=np.diag([1.0, 1.0, -1.0]))


def test_frame_to_gaussian_set():
    frame = GaussianFrame(xyz=torch.zeros(3, 3, dtype=torch.float64), features_dc=torch.zeros(3, 1, 3),
                          opacity=torch.full((3, 1), 0.5), scaling=torch.ones(3, 3),
                          rotation=torch.tensor([[1.0, 0, 0, 0]] * 3))
    s = frame.to_gaussian_set()
    assert isinstance(s.xyz, np.ndarray) and s.xyz.dtype == np.float32 and len(frame) == 3
