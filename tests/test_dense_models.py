"""Dense models of stage 1: the 4D sparse-structure flow (all fixture modes), its attention (temporal
windows with alternating shift, rope_t, qk RMS norm), the sparse-structure decoder and the
occupancy -> coords rule."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ss4d_blender.testing.golden_runners import dense
from ss4d_blender.engine.loading import build_model
from ss4d_blender.engine.models.sparse_structure_decoder import SparseStructureDecoder, occupancy_to_coords
from ss4d_blender.engine.models.sparse_structure_flow_4d import SparseStructureFlow4DModel, patchify, unpatchify
from ss4d_blender.engine.nn.attention import MultiHeadAttention, temporal_window_attention, temporal_windows

FLOW_CASES = ["ss_flow_4d", "ss_flow_4d_full_temporal", "ss_flow_4d_insert_temporal", "ss_flow_4d_patch2_ape"]

# ckpts/ss_flow_video_4d.json of the released SS4D weights (golden README)
RELEASED_SS_FLOW = {"name": "SparseStructureFlow4DModel", "args": dict(
    resolution=16, in_channels=8, out_channels=8, model_channels=1024, cond_channels=1024, num_blocks=24,
    num_heads=16, mlp_ratio=4, patch_size=1, pe_mode="rope_t", qk_rms_norm=True, use_fp16=True,
    expand_self_attn=True, window_size=8)}
# TRELLIS ckpts/ss_dec_conv3d_16l8_fp16.json (configs/vae/ss_vae_conv3d_16l8_fp16.json)
RELEASED_SS_DECODER = {"name": "SparseStructureDecoder", "args": dict(
    out_channels=1, latent_channels=8, num_res_blocks=2, num_res_blocks_middle=2, channels=[512, 128, 32],
    use_fp16=True)}


def _case(shared_dir, name):
    d = shared_dir / "golden" / name
    config = json.loads((d / "config.json").read_text())
    manifest = json.loads((d / "manifest.json").read_text())
    return d, config, manifest, load_file(str(d / "io.safetensors"))


@pytest.mark.parametrize("case", FLOW_CASES + ["ss_decoder"])
def test_golden_case_within_manifest_tolerance(shared_dir, case):
    checks = dense.run(*_case(shared_dir, case))
    assert checks
    for c in checks:
        print(f"{case}/{c.name}: max_abs {c.max_abs:.3g} rel_l2 {c.rel_l2:.3g} {c.note}")
    assert all(c.passed for c in checks), checks


def test_ss_decoder_golden_coords_exact(shared_dir):
    _, config, _, io = _case(shared_dir, "ss_decoder")
    coords = occupancy_to_coords(io["logits"])  # the rule alone, on the reference logits
    assert coords.dtype == torch.int32 and torch.equal(coords, io["coords"].int())


# ---- temporal windows ---------------------------------------------------------------------------------

def test_temporal_windows_by_hand():
    assert [list(w) for w in temporal_windows(4, 2, 0)] == [[0, 1], [2, 3]]
    assert [list(w) for w in temporal_windows(4, 2, 1)] == [[0], [1, 2], [3]]
    assert [list(w) for w in temporal_windows(5, 2, 1)] == [[0], [1, 2], [3, 4]]
    assert [list(w) for w in temporal_windows(16, 8, 4)] == [list(range(0, 4)), list(range(4, 12)), list(range(12, 16))]
    assert [list(w) for w in temporal_windows(3, 8, 4)] == [[0, 1, 2]]
    assert [list(w) for w in temporal_windows(6, 8, 0)] == [list(range(6))]


def _window_mask(num_frames, tokens, window_size, shift):
    cell = (torch.arange(num_frames) + shift) // window_size
    cell = cell.repeat_interleave(tokens)
    return cell[:, None] == cell[None, :]


@pytest.mark.parametrize("frames,size,shift", [(4, 2, 0), (4, 2, 1), (5, 2, 1), (6, 4, 2), (3, 8, 4)])
def test_temporal_window_attention_equals_masked_attention(frames, size, shift):
    g = torch.Generator().manual_seed(frames * 10 + shift)
    clips, tokens, heads, dim = 2, 3, 2, 4
    q, k, v = (torch.randn(clips, frames, tokens, heads, dim, generator=g) for _ in range(3))
    out = temporal_window_attention(q, k, v, size, shift)

    def flat(t):  # [clips, heads, T*L, D]
        return t.reshape(clips, frames * tokens, heads, dim).transpose(1, 2)

    mask = _window_mask(frames, tokens, size, shift)
    ref = F.scaled_dot_product_attention(flat(q), flat(k), flat(v), attn_mask=mask)
    ref = ref.transpose(1, 2).reshape(clips, frames, tokens, heads, dim)
    assert torch.allclose(out, ref, atol=1e-5)


def _tiny_flow(**overrides):
    args = dict(resolution=4, in_channels=4, out_channels=4, model_channels=32, cond_channels=16, num_blocks=3,
                num_heads=2, mlp_ratio=2, patch_size=1, pe_mode="rope_t", qk_rms_norm=True, use_fp16=False,
                expand_self_attn=True, window_size=2)
    args.update(overrides)
    torch.manual_seed(0)
    model = SparseStructureFlow4DModel(**args).eval()
    with torch.no_grad():  # the reference zero-initialises modulation/output layers: randomise everything
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def test_windows_shift_by_half_a_window_every_other_block():
    model = _tiny_flow(window_size=4, num_blocks=4)
    assert [b.self_attn.shift_window_t for b in model.blocks] == [0, 2, 0, 2]
    assert all(b.self_attn.attn_mode == "windowed" and b.self_attn.type == "temporal" for b in model.blocks)
    full = _tiny_flow(window_size=None)
    assert all(b.self_attn.attn_mode == "full" for b in full.blocks)
    plain = _tiny_flow(window_size=None, expand_self_attn=False)
    assert all(b.self_attn.type == "self" for b in plain.blocks)


def _inputs(clips, frames, model, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = clips * frames
    x = torch.randn(n, model.in_channels, *(model.resolution,) * 3, generator=g)
    t = torch.rand(n, generator=g) * 1000
    cond = torch.randn(n, 5, 16, generator=g)
    return x, t, cond


@pytest.mark.parametrize("overrides", [{}, {"window_size": None}, {"window_size": None, "expand_self_attn": False,
                                                                      "insert_temporal": True}])
def test_clips_are_independent(overrides):
    """Two clips in one batch give what each clip gives alone (no attention across clips)."""
    model = _tiny_flow(**overrides)
    x, t, cond = _inputs(2, 4, model)
    with torch.no_grad():
        both = model(x, t, cond, num_frames=4)
        first = model(x[:4], t[:4], cond[:4], num_frames=4)
        second = model(x[4:], t[4:], cond[4:], num_frames=4)
    assert torch.allclose(both, torch.cat([first, second]), atol=1e-5)


def test_windowed_model_mixes_frames_only_through_windows():
    """One block with window 2, shift 0: frames {0,1} never see frames {2,3}."""
    model = _tiny_flow(num_blocks=1)
    x, t, cond = _inputs(1, 4, model)
    with torch.no_grad():
        out = model(x, t, cond, num_frames=4)
        x2 = x.clone()
        x2[2:] = torch.randn_like(x2[2:])
        out2 = model(x2, t, cond, num_frames=4)
    assert torch.allclose(out[:2], out2[:2], atol=1e-6)
    assert not torch.allclose(out[2:], out2[2:], atol=1e-3)
    # with two blocks the shifted window {1, 2} carries frame 2 into frame 1
    model2 = _tiny_flow(num_blocks=2)
    with torch.no_grad():
        a, b = model2(x, t, cond, num_frames=4), model2(x2, t, cond, num_frames=4)
    assert torch.allclose(a[0], b[0], atol=1e-6) and not torch.allclose(a[1], b[1], atol=1e-3)


def test_rope_t_makes_temporal_attention_order_aware():
    """Without rope_t (ape) full temporal attention is blind to the frame order; with rope_t it is not."""
    x = torch.randn(1 * 4, 6, 32)
    perm = torch.tensor([2, 0, 3, 1])
    for use_rope_t, order_blind in [(False, True), (True, False)]:
        torch.manual_seed(0)
        attn = MultiHeadAttention(32, 2, type="temporal", use_rope_t=use_rope_t, qk_rms_norm=True).eval()
        with torch.no_grad():
            out, out_perm = attn(x, num_frames=4), attn(x[perm], num_frames=4)
        assert torch.allclose(out[perm], out_perm, atol=1e-5) == order_blind


def test_patchify_roundtrip_and_channel_order():
    x = torch.randn(2, 3, 4, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (2, 24, 2, 2, 2)
    assert torch.equal(unpatchify(p, 2), x)
    # channel c * 8 + (i * 2 + j) * 2 + k holds x[c, 2X + i, 2Y + j, 2Z + k]
    assert p[1, 2 * 8 + (1 * 2 + 0) * 2 + 1, 1, 0, 1] == x[1, 2, 3, 0, 3]


def test_rejects_options_ss4d_does_not_use():
    with pytest.raises(ValueError):
        _tiny_flow(pe_mode="rope")
    with pytest.raises(ValueError):
        _tiny_flow(expand_self_attn=False)  # windows without temporal self-attention
    with pytest.raises(ValueError):
        _tiny_flow(share_mod=True)


# ---- decoder and occupancy ----------------------------------------------------------------------------

def test_occupancy_to_coords_rule():
    logits = torch.full((3, 1, 4, 4, 4), -1.0)
    logits[0, 0, 1, 2, 3] = 0.5
    logits[2, 0, 0, 0, 1] = 2.0
    logits[2, 0, 3, 0, 0] = 1e-3
    logits[1, 0, 2, 2, 2] = 0.0  # not > 0
    coords = occupancy_to_coords(logits)
    assert coords.dtype == torch.int32
    assert coords.tolist() == [[0, 1, 2, 3], [2, 0, 0, 1], [2, 3, 0, 0]]
    with pytest.raises(ValueError):
        occupancy_to_coords(logits.expand(3, 2, 4, 4, 4))


def test_decoder_upsamples_by_two_per_level():
    torch.manual_seed(0)
    dec = SparseStructureDecoder(out_channels=1, latent_channels=4, num_res_blocks=1, num_res_blocks_middle=1,
                                 channels=[8, 8, 8]).eval()
    with torch.no_grad():
        out = dec(torch.randn(2, 4, 3, 3, 3))
    assert out.shape == (2, 1, 12, 12, 12)


# ---- released configurations ---------------------------------------------------------------------------

def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_released_ss_flow_and_decoder_on_meta():
    flow = build_model(RELEASED_SS_FLOW, device="meta")
    shapes = {k: tuple(v.shape) for k, v in flow.state_dict().items()}
    assert shapes["pos_emb"] == (16 ** 3, 1024)
    assert shapes["input_layer.weight"] == (1024, 8) and shapes["out_layer.weight"] == (8, 1024)
    assert shapes["blocks.23.self_attn.to_qkv.weight"] == (3072, 1024)
    assert shapes["blocks.0.self_attn.q_rms_norm.gamma"] == (16, 64)
    assert shapes["blocks.0.cross_attn.to_kv.weight"] == (2048, 1024)
    assert shapes["blocks.0.adaLN_modulation.1.weight"] == (6144, 1024)
    assert "blocks.0.cross_attn.q_rms_norm.gamma" not in shapes  # qk_rms_norm_cross is off
    assert [b.self_attn.shift_window_t for b in flow.blocks[:4]] == [0, 4, 0, 4]
    n_flow = _count(flow)
    # per block: qkv+out 4C^2, cross q/out 2C^2 + kv 2C^2, mlp 8C^2, adaLN 6C^2 (+ biases, norms)
    assert abs(n_flow - 24 * 22 * 1024 ** 2) / n_flow < 0.01

    dec = build_model(RELEASED_SS_DECODER, device="meta")
    shapes = {k: tuple(v.shape) for k, v in dec.state_dict().items()}
    assert shapes["input_layer.weight"] == (512, 8, 3, 3, 3)
    assert shapes["blocks.2.conv.weight"] == (128 * 8, 512, 3, 3, 3)  # upsample 512 -> 128
    assert shapes["out_layer.2.weight"] == (1, 32, 3, 3, 3)
    n_dec = _count(dec)
    print(f"\nSS flow 4D (released config): {n_flow:,} parameters; SS decoder: {n_dec:,} parameters")
    with torch.device("meta"):
        out = dec(torch.empty(1, 8, 16, 16, 16))
    assert out.shape == (1, 1, 64, 64, 64)


def test_query_chunking_off_cuda_is_exact(monkeypatch):
    from ss4d_blender.engine.nn import attention

    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 2, type="temporal", attn_mode="windowed", window_size=2, shift_window_t=1,
                              use_rope_t=True, qk_rms_norm=True).eval()
    cross = MultiHeadAttention(32, 2, ctx_channels=16, type="cross").eval()
    x, ctx = torch.randn(8, 7, 32), torch.randn(8, 5, 16)
    with torch.no_grad():
        whole = attn(x, num_frames=4), cross(x, ctx)
        monkeypatch.setattr(attention, "SCORE_ELEMENTS_OFF_CUDA", 2 * 2 * 14 * 3)  # 3 queries per chunk
        chunked = attn(x, num_frames=4), cross(x, ctx)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, chunked))


@pytest.mark.parametrize("limit", [4 * 5 * 2, 4 * 5 * 7 * 3])  # 2 queries per call / 3 batch entries per call
def test_sdpa_splits_batch_or_queries_exactly(monkeypatch, limit):
    from ss4d_blender.engine.nn import attention

    q, k, v = torch.randn(8, 7, 4, 6), torch.randn(8, 5, 4, 6), torch.randn(8, 5, 4, 6)
    whole = attention.sdpa(q, k, v)
    monkeypatch.setattr(attention, "SCORE_ELEMENTS_OFF_CUDA", limit)
    assert torch.allclose(attention.sdpa(q, k, v), whole, atol=1e-6)
