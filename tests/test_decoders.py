"""Structured-latent decoders: golden fixtures, released configs, clip independence, subdivision."""
import json

import pytest
import torch
from safetensors.torch import load_file

from ss4d_blender.testing.golden_runners.decoders import compare
from ss4d_blender.engine.models.slat_gaussian_decoder_4d import SLatGaussianDecoder, to_gaussian_sets
from ss4d_blender.engine.models.slat_mesh_decoder import (
    SLatMeshDecoder, SpconvPointwise, SparseSubdivideBlock3d, feature_channels,
)
from ss4d_blender.engine.sparse import SparseTensor


def _case(shared_dir, name):
    d = shared_dir / "golden" / name
    return (json.loads((d / "config.json").read_text()), json.loads((d / "manifest.json").read_text()),
            load_file(str(d / "io.safetensors")), load_file(str(d / "weights.safetensors")))


def test_gaussian_decoder_golden(shared_dir):
    results = compare(*_case(shared_dir, "slat_gs_decoder_4d"))
    assert len(results) == 1 + 4 * 5
    failed = [r for r in results if not r.passed]
    assert not failed, failed


def test_mesh_decoder_golden_manifest_tolerance(shared_dir):
    """Coords as the same set in the same row order, features at the manifest tolerance."""
    results = {c.name: c for c in compare(*_case(shared_dir, "slat_mesh_decoder"))}
    assert results["out_coords"].passed and results["out_coords"].note == "", results["out_coords"]
    assert results["out_feats"].passed, results["out_feats"]


def test_spconv_pointwise_arrangement():
    """spconv's 1x1x1 conv multiplies by the weight memory viewed as [in, out] (not its transpose)."""
    layer = SpconvPointwise(3, 2)
    w = torch.arange(6, dtype=torch.float32).reshape(2, 1, 1, 1, 3)  # memory 0..5
    layer.conv.weight.data.copy_(w)
    layer.conv.bias.data.copy_(torch.tensor([10.0, 20.0]))
    x = SparseTensor(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0, 1, 2, 3]], dtype=torch.int32))
    out = layer(x).feats
    # [1, 2, 3] @ [[0, 1], [2, 3], [4, 5]] + [10, 20]
    assert torch.equal(out, torch.tensor([[1 * 0 + 2 * 2 + 3 * 4 + 10.0, 1 * 1 + 2 * 3 + 3 * 5 + 20.0]]))


def test_subdivide_block_children_and_order():
    torch.manual_seed(0)
    block = SparseSubdivideBlock3d(64, resolution=4, out_channels=32).eval()
    coords = torch.tensor([[0, 1, 2, 3], [0, 2, 2, 3], [1, 0, 0, 0]], dtype=torch.int32)
    x = SparseTensor(torch.randn(3, 64), coords)
    with torch.no_grad():
        out = block(x)
    assert out.feats.shape == (24, 32)
    child = torch.tensor([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=torch.int32)
    expected = torch.cat([torch.cat([c[:1].expand(8, 1), 2 * c[1:] + child], 1) for c in coords])
    assert torch.equal(out.coords.int(), expected)
    # entries are normalised separately: batch entry 1 alone gives the same rows
    with torch.no_grad():
        alone = block(SparseTensor(x.feats[2:], coords[2:] * torch.tensor([0, 1, 1, 1], dtype=torch.int32)))
    assert torch.allclose(alone.feats, out.feats[16:], atol=1e-5)


def _tiny_gs_decoder(**overrides):
    args = dict(resolution=16, model_channels=32, latent_channels=8, num_blocks=2, num_heads=2, mlp_ratio=2,
                attn_mode="swin", window_size=4, pe_mode="rope_t", use_fp16=False, use_checkpoint=False,
                expand_self_attn=True,
                representation_config={"lr": {"_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0, "_scaling": 1.0,
                                              "_rotation": 0.1},
                                       "perturb_offset": True, "voxel_size": 1.5, "num_gaussians": 4,
                                       "2d_filter_kernel_size": 0.1, "3d_filter_kernel_size": 0.0009,
                                       "scaling_bias": 0.004, "opacity_bias": 0.1, "scaling_activation": "softplus"})
    args.update(overrides)
    return SLatGaussianDecoder(**args).eval()


def _random_clip(num_frames, seed, batch_offset=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for f in range(num_frames):
        xyz = torch.unique(torch.randint(4, 12, (40, 3), generator=g), dim=0)
        rows.append(torch.cat([torch.full((len(xyz), 1), batch_offset + f), xyz], 1))
    coords = torch.cat(rows).int()
    return coords, torch.randn(len(coords), 8, generator=g)


def test_gaussian_decoder_clips_are_independent():
    """Two clips in one batch decode exactly as each clip alone (cross-frame windows never span clips)."""
    torch.manual_seed(0)
    model = _tiny_gs_decoder()
    for p in model.out_layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    c0, f0 = _random_clip(4, 1)
    c1, f1 = _random_clip(4, 2, batch_offset=4)
    with torch.no_grad():
        both = model(SparseTensor(torch.cat([f0, f1]), torch.cat([c0, c1])), num_frames=4)
        first = model(SparseTensor(f0, c0), num_frames=4)
        second = model(SparseTensor(f1, c1 - torch.tensor([4, 0, 0, 0], dtype=torch.int32)), num_frames=4)
    assert len(both) == 8
    for a, b in zip(both, first + second):
        for name in ("xyz", "features_dc", "opacity", "scaling", "rotation"):
            assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-5), name
    sets = to_gaussian_sets(both)
    assert sets[0].xyz.shape == (4 * int((c0[:, 0] == 0).sum()), 3)


def test_gaussian_decoder_rejects_unsupported_configs():
    with pytest.raises(ValueError):
        _tiny_gs_decoder(pe_mode="ape")  # cross-frame attention needs rope_t
    with pytest.raises(ValueError):
        _tiny_gs_decoder(attn_mode="full")  # the reference has no full cross-frame attention here
    with pytest.raises(ValueError):
        _tiny_gs_decoder(attn_mode="shift_window")


def test_released_configs_build_with_checkpoint_shapes():
    """TRELLIS's slat_dec_mesh_swin8_B_64l8m256c and SS4D's slat_dec_gs_4d sizes, on the meta device."""
    with torch.device("meta"):
        mesh = SLatMeshDecoder(resolution=64, model_channels=768, latent_channels=8, num_blocks=12, num_heads=12,
                               mlp_ratio=4, attn_mode="swin", window_size=8, use_fp16=True,
                               representation_config={"use_color": True})
    shapes = {k: tuple(v.shape) for k, v in mesh.state_dict().items()}
    assert shapes["upsample.0.out_layers.0.conv.weight"] == (192, 3, 3, 3, 768)
    assert shapes["upsample.0.skip_connection.conv.weight"] == (192, 1, 1, 1, 768)
    assert shapes["upsample.1.out_layers.3.conv.weight"] == (96, 3, 3, 3, 96)
    assert shapes["out_layer.weight"] == (101, 96) and feature_channels(False) == 53
    assert len([k for k in shapes if k.endswith("attn.to_qkv.weight")]) == 12
    with torch.device("meta"):
        gs = _tiny_gs_decoder(model_channels=768, num_blocks=12, num_heads=12, mlp_ratio=4, window_size=8,
                              resolution=64)
    assert tuple(gs.state_dict()["out_layer.weight"].shape) == (56, 768)
    assert "offset_perturbation" in gs.state_dict()
