"""Small helpers for sparse regular grids: integer vertex/cube coordinates packed into int64 keys,
sorted-key lookup, and the cubes around a set of vertices. Everything stays sparse (no dense
volume is allocated)."""
from __future__ import annotations

import torch

from .flexicubes import CORNER_OFFSETS


def corner_offsets(device) -> torch.Tensor:
    """[8, 3] int64 offsets of a cube's corners, in FlexiCubes corner order."""
    return torch.tensor(CORNER_OFFSETS, dtype=torch.long, device=device)


def pack(ijk: torch.Tensor, size: int) -> torch.Tensor:
    """int64 key of integer coordinates [..., 3] in 0..size-1 (x slowest, z fastest)."""
    ijk = ijk.long()
    return (ijk[..., 0] * size + ijk[..., 1]) * size + ijk[..., 2]


def unpack(keys: torch.Tensor, size: int) -> torch.Tensor:
    """Inverse of ``pack``: [...] keys -> [..., 3] int64 coordinates."""
    return torch.stack([keys // (size * size), (keys // size) % size, keys % size], dim=-1)


def lookup(sorted_keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Index of every query key in ``sorted_keys`` (ascending, unique), -1 where absent."""
    if sorted_keys.numel() == 0:
        return torch.full_like(query, -1)
    pos = torch.searchsorted(sorted_keys, query).clamp(max=sorted_keys.numel() - 1)
    return torch.where(sorted_keys[pos] == query, pos, torch.full_like(pos, -1))


def cubes_around_vertices(vertex_ijk: torch.Tensor, num_cubes_per_axis: int) -> torch.Tensor:
    """Unique integer coordinates [K, 3] of all cubes (cells 0..R-1 per axis) having one of the
    given grid vertices [N, 3] as a corner."""
    offsets = corner_offsets(vertex_ijk.device)
    cubes = (vertex_ijk.long()[:, None, :] - offsets[None]).reshape(-1, 3)
    valid = ((cubes >= 0) & (cubes < num_cubes_per_axis)).all(1)
    keys = torch.unique(pack(cubes[valid], num_cubes_per_axis))
    return unpack(keys, num_cubes_per_axis)


def cube_corner_vertices(cube_ijk: torch.Tensor):
    """Grid vertices of the given cubes.

    Returns (vertex_ijk [V, 3] unique, sorted by packed key; corners int64 [C, 8] indices into it).
    Coordinates must be >= 0; the key size is taken from their maximum."""
    offsets = corner_offsets(cube_ijk.device)
    corner_ijk = cube_ijk.long()[:, None, :] + offsets[None]                  # [C, 8, 3]
    size = int(corner_ijk.max()) + 1 if corner_ijk.numel() else 1
    keys, inverse = torch.unique(pack(corner_ijk, size).reshape(-1), return_inverse=True)
    return unpack(keys, size), inverse.reshape(-1, 8)
