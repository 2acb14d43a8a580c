"""Structured-latent flow (SLatFlow4DModel), its adaLN blocks and the sparse attention module."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ss4d_blender.testing.golden_runners.slat_flow import compare
from ss4d_blender.engine.models.slat_flow_4d import SLatFlow4DModel
from ss4d_blender.engine.nn.sparse_attention import (
    SparseMultiHeadAttention,
    context_attention,
    cross_frame_window_groups,
    grouped_attention,
    window_groups,
)
from ss4d_blender.engine.sparse import SparseTensor

CASES = ["slat_flow_4d", "slat_flow_4d_non"]

# ckpts/slat_flow_video_4d.json args of the released SS4D weights
RELEASED_ARGS = dict(
    resolution=64, in_channels=8, out_channels=8, model_channels=1024, cond_channels=1024, num_blocks=24,
    num_heads=16, mlp_ratio=4, patch_size=2, num_io_res_blocks=2, num_io_res4d_blocks=2,
    io_block_channels=[128], io_block_channels_t=[1024], pe_mode="rope_t", qk_rms_norm=True, use_fp16=True,
    expand_self_attn=True, conv_type="3D_1D",
)


def _case(shared_dir, case):
    d = shared_dir / "golden" / case
    config = json.loads((d / "config.json").read_text())
    manifest = json.loads((d / "manifest.json").read_text())
    return config, manifest, load_file(str(d / "io.safetensors")), load_file(str(d / "weights.safetensors"))


@pytest.mark.parametrize("case", CASES)
def test_golden_case_manifest_tolerance(shared_dir, case):
    checks = {c.name: c for c in compare(*_case(shared_dir, case))}
    assert set(checks) == {"out_feats", "out_coords"}
    failed = [c for c in checks.values() if not c.passed]
    assert not failed, f"{case}: {failed}"


def test_output_rows_follow_input_rows(shared_dir):
    """Shuffling the voxels inside each frame shuffles the velocity the same way."""
    config, manifest, io, weights = _case(shared_dir, "slat_flow_4d_non")
    model = SLatFlow4DModel(**config["args"]).eval()
    model.load_state_dict(weights, strict=True)
    coords, feats = io["coords"], io["feats"]
    g = torch.Generator().manual_seed(0)
    perm = []
    for b in range(int(coords[:, 0].max()) + 1):
        rows = torch.nonzero(coords[:, 0] == b).flatten()
        perm.append(rows[torch.randperm(len(rows), generator=g)])
    perm = torch.cat(perm)
    with torch.no_grad():
        base = model(SparseTensor(feats, coords), io["t"], io["cond"], num_frames=4)
        shuffled = model(SparseTensor(feats[perm], coords[perm]), io["t"], io["cond"], num_frames=4)
    assert torch.equal(shuffled.coords, coords[perm])
    torch.testing.assert_close(shuffled.feats, base.feats[perm], atol=1e-5, rtol=1e-5)


def test_released_config_structure_on_meta():
    with torch.device("meta"):
        model = SLatFlow4DModel(**RELEASED_ARGS)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(model.blocks) == 24
    stages = [model.input_blocks, model.input_blocks_t, model.out_blocks_t, model.out_blocks]
    assert [len(blocks) for blocks in stages] == [2, 2, 2, 2]
    expected = {
        "input_layer.weight": (128, 8),
        "input_blocks.0.conv1.conv.weight": (128, 3, 3, 3, 128),
        "input_blocks.1.conv1.conv.weight": (1024, 3, 3, 3, 128),
        "input_blocks.1.skip_connection.weight": (1024, 128),
        "input_blocks_t.0.conv1.conv.weight": (1024, 3, 1, 1, 1, 1024),
        "input_blocks_t.1.emb_layers.1.weight": (2048, 1024),
        "blocks.23.self_attn.to_qkv.weight": (3072, 1024),
        "blocks.0.self_attn.q_rms_norm.gamma": (16, 64),
        "blocks.0.self_attn.k_rms_norm.gamma": (16, 64),
        "blocks.0.cross_attn.to_q.weight": (1024, 1024),
        "blocks.0.cross_attn.to_kv.weight": (2048, 1024),
        "blocks.0.norm2.weight": (1024,),
        "blocks.0.adaLN_modulation.1.weight": (6144, 1024),
        "blocks.0.mlp.mlp.0.weight": (4096, 1024),
        "out_blocks_t.0.conv1.conv.weight": (1024, 3, 1, 1, 1, 2048),
        "out_blocks_t.1.skip_connection.weight": (1024, 2048),
        "out_blocks.0.conv1.conv.weight": (128, 3, 3, 3, 2048),
        "out_blocks.1.norm1.weight": (256,),
        "out_layer.weight": (8, 128),
        "t_embedder.mlp.0.weight": (1024, 256),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    assert not any("cross_attn.q_rms_norm" in k for k in shapes)  # qk_rms_norm_cross is off
    attn = model.blocks[0].self_attn
    assert attn.type == "temporal" and attn.use_rope_t and attn.qk_rms_norm
    # 20 tensors per transformer block, 74 in the eight res blocks, input/output layers and t_embedder
    assert len(shapes) == 24 * 20 + 74 + 2 + 2 + 4


def test_non_conv_type_has_no_temporal_parameters():
    model = SLatFlow4DModel(**{**RELEASED_ARGS, "model_channels": 64, "num_heads": 4, "num_blocks": 1,
                               "cond_channels": 32, "io_block_channels": [16], "io_block_channels_t": [64],
                               "conv_type": "non"})
    assert not any(k.startswith(("input_blocks_t", "out_blocks_t")) for k in model.state_dict())


def _dense_grouped(q, k, v, group):
    mask = group[:, None] == group[None, :]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask[None, None])
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("num_groups", [3, 40])  # few large groups (loop) and many small ones (padded)
def test_grouped_attention_matches_masked_dense(num_groups):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(120, 2, 8, generator=g) for _ in range(3))
    group = torch.randint(0, num_groups, (120,), generator=g) * 7 - 3
    torch.testing.assert_close(grouped_attention(q, k, v, group), _dense_grouped(q, k, v, group), atol=1e-5, rtol=1e-5)


def test_context_attention_per_batch_entry():
    g = torch.Generator().manual_seed(2)
    batch = torch.tensor([0, 0, 2, 2, 2, 1, 0, 2])
    q = torch.randn(8, 2, 4, generator=g)
    k, v = torch.randn(3, 5, 2, 4, generator=g), torch.randn(3, 5, 2, 4, generator=g)
    out = context_attention(q, batch, k, v)
    for i in range(8):
        b = int(batch[i])
        ref = F.scaled_dot_product_attention(q[i:i + 1].transpose(0, 1), k[b].transpose(0, 1), v[b].transpose(0, 1))
        torch.testing.assert_close(out[i], ref.transpose(0, 1)[0], atol=1e-6, rtol=1e-5)


def _random_coords(num_frames=4, clips=2, n=300, seed=3):
    g = torch.Generator().manual_seed(seed)
    c = torch.cat([torch.randint(0, clips * num_frames, (n, 1), generator=g),
                   torch.randint(0, 12, (n, 3), generator=g)], 1)
    c = torch.unique(c, dim=0)  # sorted by batch index, no duplicates
    return c.int()


def test_window_groups_are_shifted_cubes_within_a_frame():
    c = _random_coords()
    group = window_groups(c, 4, 2)
    key = torch.cat([c[:, :1], (c[:, 1:] + 2) // 4], 1)
    same = group[:, None] == group[None, :]
    assert torch.equal(same, (key[:, None] == key[None, :]).all(-1))


def test_cross_frame_windows_never_mix_clips():
    c = _random_coords()
    for shift in (0, 2):
        group = cross_frame_window_groups(c, 4, 2, shift)
        same = group[:, None] == group[None, :]
        clip = c[:, 0] // 4
        assert not (same & (clip[:, None] != clip[None, :])).any()
        frame_cell = (c[:, 0] + shift) // 2
        assert not (same & (frame_cell[:, None] != frame_cell[None, :])).any()
        cell = (c[:, 1:] + shift) // 2
        assert (cell[:, None] == cell[None, :]).all(-1)[same].all()


def test_temporal_attention_spans_the_clip_with_rope_t():
    """Temporal attention: rope_t changes the result, and every voxel sees all frames of its clip."""
    torch.manual_seed(4)
    attn = SparseMultiHeadAttention(32, 4, type="temporal", use_rope_t=True, qk_rms_norm=True).eval()
    c = _random_coords(num_frames=4, clips=1, n=80)
    x = SparseTensor(torch.randn(c.shape[0], 32), c)
    with torch.no_grad():
        out = attn(x, num_frames=4).feats
        plain = SparseMultiHeadAttention(32, 4, type="temporal", qk_rms_norm=True).eval()
        plain.load_state_dict(attn.state_dict())
        assert not torch.allclose(plain(x, num_frames=4).feats, out, atol=1e-4)
        # all voxels of a clip attend to each other: dropping one frame changes the others' outputs
        keep = c[:, 0] != 3
        y = SparseTensor(x.feats[keep], c[keep])
        assert not torch.allclose(attn(y, num_frames=4).feats, out[keep], atol=1e-4)


def test_large_groups_split_queries_exactly(monkeypatch):
    import ss4d_blender.engine.nn.sparse_attention as sa
    monkeypatch.setattr(sa, "SCORE_ELEMENTS_OFF_CUDA", 2 * 50 * 7)  # forces query chunks of 7 rows
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(100, 2, 8, generator=g) for _ in range(3))
    group = (torch.arange(100) >= 50).long()
    torch.testing.assert_close(grouped_attention(q, k, v, group), _dense_grouped(q, k, v, group), atol=1e-5, rtol=1e-5)
