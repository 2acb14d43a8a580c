"""BiRefNet (background removal): golden parity, the deformable convolution against a per-pixel loop,
the configuration read from checkpoint shapes, the patch channel order option and non-square inputs.
Models here have random weights (tiny Swin backbones); only the golden case is checked against numbers."""
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from ss4d_blender.engine.errors import WeightsError
from ss4d_blender.engine.models.birefnet import (SWIN_V1_L, SWIN_V1_T, BiRefNetConfig, build_birefnet,
                                                 config_from_state_dict, image_patches, load_birefnet,
                                                 variant_name)
from ss4d_blender.engine.nn.deform_conv import deform_conv2d
from ss4d_blender.testing.golden_runners import birefnet as birefnet_runner



pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = BiRefNetConfig(embed_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), window_size=3)


def test_golden_case_passes_at_manifest_tolerance(shared_dir):
    from safetensors.torch import load_file

    case = shared_dir / "golden" / "birefnet"
    manifest = json.loads((case / "manifest.json").read_text())
    config = json.loads((case / "config.json").read_text())
    checks = birefnet_runner.run(case, config, manifest, load_file(str(case / "io.safetensors")))
    names = {c.name for c in checks}
    assert {"enc_x1", "enc_x2", "enc_x3", "enc_x4", "logits", "config_from_shapes"} <= names
    assert all(c.passed for c in checks), [(c.name, c.max_abs, c.rel_l2, c.note) for c in checks]


def test_golden_runner_catches_a_changed_weight(shared_dir, tmp_path):
    """The runner is not blind: one BatchNorm statistic changed makes the logits check fail."""
    from safetensors.torch import load_file

    case = shared_dir / "golden" / "birefnet"
    state = load_file(str(case / "weights.safetensors"))
    state["decoder.decoder_block1.bn_out.running_mean"] = state["decoder.decoder_block1.bn_out.running_mean"] + 0.5
    save_file(state, str(tmp_path / "weights.safetensors"))
    manifest = json.loads((case / "manifest.json").read_text())
    checks = birefnet_runner.run(tmp_path, None, manifest, load_file(str(case / "io.safetensors")))
    assert not next(c for c in checks if c.name == "logits").passed


# ---- deformable convolution -------------------------------------------------------------------------------

def _bilinear_zero_outside(img, y, x):
    """torchvision's sampling rule for one channel: 0 a pixel or more outside, else bilinear with the
    neighbours outside the image counting as 0."""
    h, w = len(img), len(img[0])
    if y <= -1 or y >= h or x <= -1 or x >= w:
        return 0.0
    y0, x0 = math.floor(y), math.floor(x)
    total = 0.0
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                total += wy * wx * img[yy][xx]
    return total


def _naive_deform_conv(inp, offset, weight, bias, stride, pad, dil, mask):
    b, c, h, w = inp.shape
    o, _, kh, kw = weight.shape
    ho = (h + 2 * pad - dil * (kh - 1) - 1) // stride + 1
    wo = (w + 2 * pad - dil * (kw - 1) - 1) // stride + 1
    x, off, m, wt = inp.tolist(), offset.tolist(), mask.tolist(), weight.tolist()
    out = torch.zeros(b, o, ho, wo, dtype=torch.float64)
    for n in range(b):
        for oy in range(ho):
            for ox in range(wo):
                acc = [bias[i].item() for i in range(o)]
                for i in range(kh):
                    for j in range(kw):
                        k = i * kw + j
                        y = oy * stride - pad + i * dil + off[n][2 * k][oy][ox]
                        xx = ox * stride - pad + j * dil + off[n][2 * k + 1][oy][ox]
                        for ch in range(c):
                            v = _bilinear_zero_outside(x[n][ch], y, xx) * m[n][k][oy][ox]
                            for oc in range(o):
                                acc[oc] += wt[oc][ch][i][j] * v
                out[n, :, oy, ox] = torch.tensor(acc, dtype=torch.float64)
    return out


@pytest.mark.parametrize("kernel,stride,pad,dil,size", [(3, 1, 1, 1, (5, 6)), (1, 1, 0, 1, (4, 3)),
                                                         (3, 2, 2, 2, (7, 5)), (2, 1, 1, 1, (1, 4))])
def test_deform_conv_matches_naive_loop(kernel, stride, pad, dil, size):
    g = torch.Generator().manual_seed(kernel * 10 + stride)
    h, w = size
    inp = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
    ho = (h + 2 * pad - dil * (kernel - 1) - 1) // stride + 1
    wo = (w + 2 * pad - dil * (kernel - 1) - 1) // stride + 1
    k2 = kernel * kernel
    offset = torch.randn(2, 2 * k2, ho, wo, generator=g, dtype=torch.float64) * 2.0  # many taps fall outside
    offset[0, 0, 0, 0] = -1.0 - (-pad)  # exactly one pixel above the image: sampled as 0
    mask = torch.rand(2, k2, ho, wo, generator=g, dtype=torch.float64) * 2
    weight = torch.randn(4, 3, kernel, kernel, generator=g, dtype=torch.float64)
    bias = torch.randn(4, generator=g, dtype=torch.float64)
    ours = deform_conv2d(inp, offset, weight, bias, stride=stride, padding=pad, dilation=dil, mask=mask)
    ref = _naive_deform_conv(inp, offset, weight, bias, stride, pad, dil, mask)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_deform_conv_zero_offsets_is_a_plain_conv():
    g = torch.Generator().manual_seed(3)
    inp, weight = torch.randn(1, 4, 9, 11, generator=g), torch.randn(5, 4, 7, 7, generator=g)
    offset = torch.zeros(1, 98, 9, 11)
    torch.testing.assert_close(deform_conv2d(inp, offset, weight, padding=3),
                               torch.nn.functional.conv2d(inp, weight, padding=3), rtol=1e-5, atol=1e-5)


def test_deform_conv_chunked_taps_equal_one_pass(monkeypatch):
    from ss4d_blender.engine.nn import deform_conv

    g = torch.Generator().manual_seed(4)
    inp, weight = torch.randn(2, 3, 6, 6, generator=g), torch.randn(2, 3, 3, 3, generator=g)
    offset, mask = torch.randn(2, 18, 6, 6, generator=g), torch.rand(2, 9, 6, 6, generator=g)
    whole = deform_conv2d(inp, offset, weight, padding=1, mask=mask)
    monkeypatch.setattr(deform_conv, "_SAMPLES_PER_CHUNK", 2 * 3 * 36 * 2)  # two taps per pass
    torch.testing.assert_close(deform_conv2d(inp, offset, weight, padding=1, mask=mask), whole)


# ---- configuration from shapes ----------------------------------------------------------------------------

def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,config", [("swin_v1_l", SWIN_V1_L), ("swin_v1_t", SWIN_V1_T)])
def test_released_variants_recognised_from_shapes(name, config):
    model = build_birefnet(config, device="meta")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    inferred = config_from_state_dict(shapes)
    assert inferred == config and variant_name(inferred) == name
    if name == "swin_v1_l":
        assert shapes["bb.patch_embed.proj.weight"] == (192, 3, 4, 4)
        assert shapes["bb.layers.2.blocks.17.attn.relative_position_bias_table"] == (23 * 23, 24)
        assert shapes["squeeze_module.0.conv_in.weight"] == (64, 3072 + 1536 + 768 + 384, 3, 3)
        assert shapes["decoder.ipt_blk5.conv_out.weight"] == (384, 64, 3, 3)
        assert shapes["decoder.ipt_blk5.conv1.weight"] == (64, 3072, 3, 3)
        assert 215e6 < _params(model) < 225e6  # model.safetensors is ~885 MB in fp32
    else:
        assert shapes["bb.layers.2.blocks.5.attn.relative_position_bias_table"] == (13 * 13, 12)
        assert shapes["decoder.conv_out1.0.weight"] == (1, 96 + 24, 1, 1)
        assert 40e6 < _params(model) < 48e6  # BiRefNet_lite is ~180 MB in fp32


def test_fixed_width_image_branches_read_from_shapes():
    """Ports whose image branches are 64 wide everywhere load with that width."""
    config = BiRefNetConfig(embed_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), window_size=3,
                            ipt_channels=(64, 64, 64, 64))
    shapes = {k: tuple(v.shape) for k, v in build_birefnet(config, "meta").state_dict().items()}
    assert shapes["decoder.decoder_block4.conv_in.weight"][1] == config.channels[0] + 64
    assert config_from_state_dict(shapes) == config
    assert config_from_state_dict({k: v for k, v in shapes.items()}, "columns").patch_channel_order == "columns"


def test_not_a_birefnet_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="not a BiRefNet"):
        config_from_state_dict({"encoder.weight": (3, 3)})
    state = build_birefnet(TINY).state_dict()
    state.pop("decoder.lateral_block2.conv.bias")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match="lateral_block2.conv.bias"):
        load_birefnet(tmp_path)


# ---- patch order, sizes -----------------------------------------------------------------------------------

def test_patch_channel_orders():
    image = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    ein = image_patches(image, (2, 3), "einops")  # grid 2 x 2 of 2 x 3 patches
    col = image_patches(image, (2, 3), "columns")
    assert ein.shape == col.shape == (2, 12, 2, 3)
    for c in range(3):
        for i in range(2):
            for j in range(2):
                patch = image[:, c, 2 * i:2 * i + 2, 3 * j:3 * j + 3]
                assert torch.equal(ein[:, (c * 2 + i) * 2 + j], patch)
                assert torch.equal(col[:, (j * 2 + i) * 3 + c], patch)


def test_patch_order_option_changes_the_output():
    torch.manual_seed(0)
    model = build_birefnet(TINY)
    state = model.state_dict()
    other = load_birefnet(state, patch_channel_order="columns")
    same = load_birefnet(state)
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b, c = model(image), same(image), other(image)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-4
    with pytest.raises(ValueError, match="patch_channel_order"):
        BiRefNetConfig(patch_channel_order="rows")


def test_non_square_input_and_batch_consistency():
    torch.manual_seed(1)
    model = build_birefnet(TINY)
    image = torch.randn(2, 3, 96, 64)  # sides multiples of 32; x4 is 3 x 2, the half pyramid's 2 x 1
    with torch.no_grad():
        logits = model(image)
        single = model(image[1:])
        x1, x2, x3, x4 = model.encode(image)
    assert logits.shape == (2, 1, 96, 64) and torch.isfinite(logits).all()
    assert x1.shape[2:] == (24, 16) and x4.shape[2:] == (3, 2)
    assert x4.shape[1] == sum(TINY.channels)
    torch.testing.assert_close(single, logits[1:], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 96, 100))
