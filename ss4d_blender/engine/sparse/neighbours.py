"""Neighbour maps of submanifold convolutions, built in torch by sorting lattice keys.

A neighbour map answers, for every active voxel i and every kernel offset k, "which row holds the voxel
at position(i) + offset(k)?" (`N` = none). Positions are integer points in a lattice of D axes: for 3D
convolutions (batch, x, y, z); for the 4D and 1D (temporal) convolutions (clip, frame, x, y, z), so that
time is a 4th axis inside a clip and clips never see each other.

Each point gets one int64 key (mixed-radix over the padded bounding box). Because the key is linear in
the position, key(p + o) = key(p) + key(o): all K * N lookups are plain indexing into a dense key -> row
table when the box is small enough (the usual case: a 64^3 grid times the frames), otherwise one
`searchsorted` in the sorted keys. Maps are cached in the tensor's shared cache (see tensor.py);
`STATS["builds"]` counts real builds.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch

from .tensor import SparseTensor

STATS = {"builds": 0}
DENSE_TABLE_CELLS = 1 << 25   # largest box looked up through a dense table (int32: 128 MB)


def kernel_offsets(kernel_shape: Sequence[int]) -> torch.Tensor:
    """All offsets of a centred kernel, C order over its axes (the order of spconv's weight axes).
    kernel_shape (k_0, ..., k_{D-1}), each odd -> int64 [prod(k), D]."""
    ranges = [range(-(k // 2), k // 2 + 1) for k in kernel_shape]
    return torch.tensor(list(itertools.product(*ranges)), dtype=torch.int64).reshape(-1, len(kernel_shape))


def lattice_points(coords: torch.Tensor, num_frames: int | None) -> torch.Tensor:
    """coords int32 [N, 4] -> int64 points [N, 4] (batch, x, y, z), or [N, 5] (clip, frame, x, y, z)
    when num_frames is given."""
    c = coords.long()
    if num_frames is None:
        return c
    return torch.cat([(c[:, :1] // num_frames), (c[:, :1] % num_frames), c[:, 1:]], dim=1)


def build_neighbour_map(points: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """points int64 [N, D] (unique), offsets int64 [K, D] -> int64 [N, K]: row of points[i] + offsets[k],
    or N where that position is inactive."""
    STATS["builds"] += 1
    n = points.shape[0]
    device = points.device
    offsets = offsets.to(device)
    reach = (offsets.abs().max(0).values if len(offsets)
             else torch.zeros(points.shape[1], dtype=torch.int64, device=device))
    low = points.min(0).values - reach
    span = points.max(0).values - low + reach + 1
    # mixed-radix strides: the last axis varies fastest
    strides = torch.ones_like(span)
    for d in range(points.shape[1] - 2, -1, -1):
        strides[d] = strides[d + 1] * span[d + 1]
    keys = ((points - low) * strides).sum(1)
    queries = keys[:, None] + (offsets * strides).sum(1)[None, :]  # [N, K], all inside [0, prod(span))
    cells = int(torch.prod(span))
    if cells <= min(DENSE_TABLE_CELLS, 64 * queries.numel()):
        table = torch.full((cells,), n, dtype=torch.int32 if n < 2 ** 31 - 1 else torch.int64, device=device)
        table[keys] = torch.arange(n, dtype=table.dtype, device=device)
        return table[queries].long()
    sorted_keys, order = torch.sort(keys)
    pos = torch.searchsorted(sorted_keys, queries).clamp_(max=max(n - 1, 0))
    found = sorted_keys[pos] == queries
    return torch.where(found, order[pos], torch.full_like(pos, n))


def neighbour_map(x: SparseTensor, kernel_shape: Sequence[int], num_frames: int | None) -> torch.Tensor:
    """Cached neighbour map of x for a kernel over (x, y, z) (3 axes) or (t, x, y, z) (4 axes, needs
    num_frames). Returns int64 [N, prod(kernel_shape)] with N for missing neighbours."""
    kernel_shape = tuple(int(k) for k in kernel_shape)
    key = ("neighbours", kernel_shape, num_frames)
    nbr = x.cache.get(key)
    if nbr is None:
        points = lattice_points(x.coords, num_frames)
        offsets = kernel_offsets(kernel_shape)
        # pad the offsets with zeros on the axes the kernel does not cover (batch, or clip)
        leading = torch.zeros(len(offsets), points.shape[1] - offsets.shape[1], dtype=torch.int64)
        offsets = torch.cat([leading, offsets], 1)
        nbr = build_neighbour_map(points, offsets)
        x.cache[key] = nbr
    return nbr
