"""Resolution changes of sparse tensors: spatial mean-pool x2 with its paired unpool, temporal
frame-pair pool/unpool, and subdivision (every voxel -> its 8 children).

Pooling follows the reference exactly, including its mean, which also counts the zero the reduction
starts from: a coarse voxel receives sum(children) / (number of children + 1). Coarse voxels come out
sorted by (batch, x, y, z).

The coarse coordinates and the way back are stored in the fine tensor's cache and the fine tensor is
remembered by the coarse one, so `Upsample` after `Downsample` restores the fine voxels in their order,
and a second pass with the same coordinates (next sampling step) reuses everything.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .tensor import SparseTensor


def _unique_rows(points: torch.Tensor):
    """points int64 [N, 4] -> (unique rows sorted lexicographically [M, 4], inverse [N])."""
    low = points.min(0).values
    span = points.max(0).values - low + 1
    strides = torch.ones_like(span)
    for d in range(points.shape[1] - 2, -1, -1):
        strides[d] = strides[d + 1] * span[d + 1]
    keys = ((points - low) * strides).sum(1)
    unique_keys, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    rows = []
    rest = unique_keys
    for d in range(points.shape[1]):
        rows.append(rest // strides[d] + low[d])
        rest = rest % strides[d]
    return torch.stack(rows, 1), inverse


def _pool(x: SparseTensor, kind: str, merge) -> SparseTensor:
    key = (kind,)
    if key not in x.cache:
        coarse_points, inverse = _unique_rows(merge(x.coords.long()))
        counts = torch.bincount(inverse, minlength=len(coarse_points))
        coarse_cache = {("unpool", kind): (x.coords, inverse, x.cache)}
        x.cache[key] = (coarse_points.to(torch.int32), inverse, counts, coarse_cache)
    coarse_coords, inverse, counts, coarse_cache = x.cache[key]
    sums = x.feats.new_zeros(len(coarse_coords), *x.feats.shape[1:]).index_add_(0, inverse, x.feats)
    mean = sums / (counts + 1).to(sums.dtype).reshape(-1, *([1] * (sums.dim() - 1)))
    return SparseTensor(mean, coarse_coords, coarse_cache)


def _unpool(x: SparseTensor, kind: str, name: str) -> SparseTensor:
    entry = x.cache.get(("unpool", kind))
    if entry is None:
        raise ValueError(f"{name} must be applied to the output of the matching downsample layer")
    fine_coords, inverse, fine_cache = entry
    return SparseTensor(x.feats[inverse], fine_coords, fine_cache)


def _check_factor(factor) -> None:
    if factor != 2:
        raise ValueError(f"only factor 2 is supported (the released models use 2), got {factor}")


class SparseDownsample(nn.Module):
    """Mean-pool 2x2x2 blocks of each frame: [N, C] -> [M, C], coords (b, x//2, y//2, z//2)."""

    def __init__(self, factor: int = 2):
        super().__init__()
        _check_factor(factor)

    def forward(self, x: SparseTensor) -> SparseTensor:
        def merge(c):
            return torch.cat([c[:, :1], c[:, 1:] // 2], 1)
        return _pool(x, "spatial", merge)


class SparseUpsample(nn.Module):
    """Inverse of SparseDownsample: every fine voxel takes its coarse voxel's features."""

    def __init__(self, factor: int = 2):
        super().__init__()
        _check_factor(factor)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return _unpool(x, "spatial", "SparseUpsample")


class SparseDownsample_t(nn.Module):
    """Mean-pool frame pairs (2k, 2k+1) voxel by voxel: batch index b -> b // 2 (num_frames must be even)."""

    def __init__(self, factor: int = 2):
        super().__init__()
        _check_factor(factor)

    def forward(self, x: SparseTensor) -> SparseTensor:
        def merge(c):
            return torch.cat([c[:, :1] // 2, c[:, 1:]], 1)
        return _pool(x, "temporal", merge)


class SparseUpsample_t(nn.Module):
    """Inverse of SparseDownsample_t: both frames of a pair take the pooled features."""

    def __init__(self, factor: int = 2):
        super().__init__()
        _check_factor(factor)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return _unpool(x, "temporal", "SparseUpsample_t")


class SparseSubdivide(nn.Module):
    """Every voxel -> its 8 children at twice the resolution, features copied.
    [N, C] -> [8N, C]; child j of voxel i is row 8i + j, j over (dx, dy, dz) in C order."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        key = ("subdivide",)
        if key not in x.cache:
            corner = torch.tensor([[0, dx, dy, dz] for dx in (0, 1) for dy in (0, 1) for dz in (0, 1)],
                                  dtype=torch.int32, device=x.coords.device)
            parent = x.coords * torch.tensor([1, 2, 2, 2], dtype=torch.int32, device=x.coords.device)
            x.cache[key] = ((parent[:, None] + corner[None]).reshape(-1, 4), {})
        coords, child_cache = x.cache[key]
        feats = x.feats.repeat_interleave(8, dim=0)
        return SparseTensor(feats, coords, child_cache)
