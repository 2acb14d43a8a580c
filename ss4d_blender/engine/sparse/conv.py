"""Submanifold sparse convolutions (output sites = input sites) with spconv's weight layout.

Weights are stored as `conv.weight [out, k..., in]` and `conv.bias [out]`, exactly as the official
checkpoints hold them, so state dicts load unchanged. The computation gathers each voxel's neighbours
through the cached neighbour map (missing ones read a zero row) and multiplies by the weight viewed as
`[K * in, out]`: one GEMM per chunk of rows.

- `SparseConv3d`: kernel over (x, y, z) inside each batch entry (frame).
- `SparseConv4d`: kernel over (t, x, y, z): frames of one clip are a 4th axis.
- `SparseConv1d`: kernel (3, 1, 1, 1): along time only.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from .neighbours import neighbour_map
from .tensor import SparseTensor

# upper bound on gathered elements per GEMM chunk (memory of the im2col buffer)
_CHUNK_ELEMENTS = {"cuda": 1 << 27, "mps": 1 << 25, "cpu": 1 << 23}


def submanifold_conv(x: SparseTensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     num_frames: Optional[int]) -> torch.Tensor:
    """x feats [N, in]; weight [out, k..., in] (3 kernel axes: xyz, 4: txyz) -> feats [N, out]."""
    out_channels, *kernel_shape, in_channels = weight.shape
    if x.feats.shape[1] != in_channels:
        raise ValueError(f"convolution expects {in_channels} input channels, got {x.feats.shape[1]}")
    nbr = neighbour_map(x, kernel_shape, num_frames)  # [N, K]
    k = nbr.shape[1]
    dtype = x.feats.dtype
    matrix = weight.to(dtype).reshape(out_channels, k, in_channels).permute(1, 2, 0)
    matrix = matrix.reshape(k * in_channels, out_channels)
    padded = torch.cat([x.feats, x.feats.new_zeros(1, in_channels)])
    n = nbr.shape[0]
    if n <= (_CHUNK_ELEMENTS.get(x.device.type, 1 << 23) // (k * in_channels)):
        gathered = padded[nbr].reshape(n, k * in_channels)
        return torch.addmm(bias.to(dtype), gathered, matrix) if bias is not None else gathered @ matrix
    out = x.feats.new_empty(n, out_channels)
    rows = max(1, _CHUNK_ELEMENTS.get(x.device.type, 1 << 23) // (k * in_channels))
    for start in range(0, n, rows):
        idx = nbr[start:start + rows]
        gathered = padded[idx].reshape(idx.shape[0], k * in_channels)
        if bias is not None:
            out[start:start + rows] = torch.addmm(bias.to(dtype), gathered, matrix)
        else:
            out[start:start + rows] = gathered @ matrix
    return out


class _Weights(nn.Module):
    """Holds `weight` and `bias` under the names the checkpoints use (`<conv>.conv.weight`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_shape: tuple, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, *kernel_shape, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        fan_in = in_channels * math.prod(kernel_shape)
        nn.init.uniform_(self.weight, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class _SparseConv(nn.Module):
    kernel_axes = 3
    needs_frames = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError("submanifold convolutions need an odd kernel size")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.conv = _Weights(in_channels, out_channels, self.kernel_shape(kernel_size), bias)

    def kernel_shape(self, kernel_size: int) -> tuple:
        return (kernel_size,) * self.kernel_axes

    def forward(self, x: SparseTensor, num_frames: Optional[int] = None) -> SparseTensor:
        if self.needs_frames and num_frames is None:
            raise ValueError(f"{type(self).__name__} needs num_frames")
        frames = num_frames if self.needs_frames else None
        return x.replace(submanifold_conv(x, self.conv.weight, self.conv.bias, frames))


class SparseConv3d(_SparseConv):
    """3D submanifold conv per frame. feats [N, in] -> [N, out]; `num_frames` is accepted and unused."""


class SparseConv4d(_SparseConv):
    """4D submanifold conv over (t, x, y, z) within each clip. feats [N, in] -> [N, out]."""

    kernel_axes = 4
    needs_frames = True


class SparseConv1d(_SparseConv):
    """Temporal conv, kernel (k, 1, 1, 1): each voxel mixes itself at frames t-1, t, t+1 of its clip."""

    needs_frames = True

    def kernel_shape(self, kernel_size: int) -> tuple:
        return (kernel_size, 1, 1, 1)
