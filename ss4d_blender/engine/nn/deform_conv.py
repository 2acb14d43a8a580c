"""Modulated deformable convolution (DCNv2, Zhu et al. 2019) in plain tensor ops.

Same contract as `torchvision.ops.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)`
with one offset group and one weight group: every output pixel `p` sums, over the kernel taps `k`,

    out[o, p] = bias[o] + sum_{c, k} weight[o, c, k] * mask[k, p] * bilinear(input[c], p0 + p_k + offset[k, p])

where `p0 + p_k` is the regular tap position (stride, padding, dilation) and `offset[k, p] = (dy, dx)` is
stored in channels `2k` (rows) and `2k + 1` (columns). Samples are bilinear; neighbours outside the image
count as zero (a sample one pixel or more outside is zero), as in torchvision.

The taps are sampled with `grid_sample` a few at a time, so the im2col buffer stays bounded however large
the image is; the same code runs on CUDA, MPS and the CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_SAMPLES_PER_CHUNK = 1 << 25  # floats of sampled taps held at once (128 MB in fp32)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _tap_grid(offset: torch.Tensor, in_hw: tuple[int, int], kernel: tuple[int, int], stride, padding,
              dilation) -> torch.Tensor:
    """Sampling positions of every tap, as `grid_sample` coordinates (align_corners=False).

    offset [B, 2K, Ho, Wo] -> grid [B, K, Ho, Wo, 2] (x, y in [-1, 1] inside the image)."""
    b, _, ho, wo = offset.shape
    kh, kw = kernel
    h, w = in_hw
    offset = offset.to(torch.promote_types(offset.dtype, torch.float32))  # fp16 has 1/4-pixel steps at 256
    dtype, device = offset.dtype, offset.device
    tap_y = (torch.arange(kh, device=device, dtype=dtype) * dilation[0]).repeat_interleave(kw)  # [K]
    tap_x = (torch.arange(kw, device=device, dtype=dtype) * dilation[1]).repeat(kh)  # [K]
    out_y = torch.arange(ho, device=device, dtype=dtype) * stride[0] - padding[0]  # [Ho]
    out_x = torch.arange(wo, device=device, dtype=dtype) * stride[1] - padding[1]  # [Wo]
    offset = offset.view(b, kh * kw, 2, ho, wo)
    y = out_y.view(1, 1, ho, 1) + tap_y.view(1, -1, 1, 1) + offset[:, :, 0]  # [B, K, Ho, Wo]
    x = out_x.view(1, 1, 1, wo) + tap_x.view(1, -1, 1, 1) + offset[:, :, 1]
    # pixel centre i sits at (2i + 1) / size - 1 with align_corners=False; size 1 needs no special case
    return torch.stack(((2 * x + 1) / w - 1, (2 * y + 1) / h - 1), dim=-1)


def deform_conv2d(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """input [B, C, H, W], offset [B, 2 kh kw, Ho, Wo], weight [O, C, kh, kw], mask [B, kh kw, Ho, Wo]
    (None = all ones) -> [B, O, Ho, Wo]."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    b, c, h, w = input.shape
    o, c_w, kh, kw = weight.shape
    if c_w != c:
        raise ValueError(f"deform_conv2d: weight expects {c_w} input channels, input has {c}")
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    taps = kh * kw
    if offset.shape != (b, 2 * taps, ho, wo):
        raise ValueError(f"deform_conv2d: offset has shape {tuple(offset.shape)}, expected {(b, 2 * taps, ho, wo)}")
    if mask is not None and mask.shape != (b, taps, ho, wo):
        raise ValueError(f"deform_conv2d: mask has shape {tuple(mask.shape)}, expected {(b, taps, ho, wo)}")
    grid = _tap_grid(offset, (h, w), (kh, kw), stride, padding, dilation)  # [B, K, Ho, Wo, 2], >= float32
    source = input.to(grid.dtype)  # sampled in float32 (or float64), multiplied in the input's precision
    weight = weight.reshape(o, c, taps)
    out = input.new_zeros(b, o, ho * wo)
    chunk = max(1, min(taps, _SAMPLES_PER_CHUNK // max(1, b * c * ho * wo)))
    for k0 in range(0, taps, chunk):
        k1 = min(taps, k0 + chunk)
        n = k1 - k0
        samples = F.grid_sample(source, grid[:, k0:k1].reshape(b, n * ho, wo, 2), mode="bilinear",
                                padding_mode="zeros", align_corners=False)  # [B, C, n Ho, Wo]
        samples = samples.view(b, c, n, ho * wo).to(input.dtype)
        if mask is not None:
            samples = samples * mask[:, k0:k1].reshape(b, 1, n, ho * wo)
        out = out + torch.einsum("ocn,bcnp->bop", weight[:, :, k0:k1], samples)  # [B, O, Ho Wo]
    out = out.view(b, o, ho, wo)
    if bias is not None:
        out = out + bias.view(1, o, 1, 1)
    return out
