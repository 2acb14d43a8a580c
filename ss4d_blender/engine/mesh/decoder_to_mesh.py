"""Mesh decoder output -> triangle mesh, as TRELLIS does it, but on sparse cubes.

The TRELLIS mesh decoder (SLatMeshDecoder) predicts, for every active fine voxel at resolution
R = 4 x 64 = 256, 101 channels in this order:

    sdf      [0:8]     one value per cube corner
    deform   [8:32]    (8, 3) one offset per cube corner
    weights  [32:53]   FlexiCubes beta (12), alpha (8), gamma (1) of the cube
    color    [53:101]  (8, 6) per corner: rgb + normal (pre-sigmoid)

Turning this into FlexiCubes input (the reference builds a dense (R+1)^3 grid; we never do):
1. every voxel's eight corners are grid vertices; a vertex shared by several active voxels takes
   the mean of their per-corner values (sdf gets a bias of -1/R first);
2. grid vertices no active voxel touches read sdf = +1 (outside), deform = 0, colour = 0;
   cubes that are not active voxels read raw weights 0;
3. vertex positions: p = ijk / R - 0.5 + tanh(deform) / (2R), i.e. in the [-0.5, 0.5]^3 box, each
   vertex moving at most half a cell;
4. colours are sigmoid(color) interpolated like the vertex positions; the first three channels
   are RGB.

Only cubes with an inside corner can be crossed by the surface, and inside corners are always
vertices of active voxels, so the cubes handed to FlexiCubes are those around inside vertices.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..types import Mesh
from .color import srgb_to_linear
from .flexicubes import flexicubes_extract
from .grid import corner_offsets, cube_corner_vertices, cubes_around_vertices, lookup, pack, unpack

SDF = slice(0, 8)
DEFORM = slice(8, 32)
WEIGHTS = slice(32, 53)
COLOR = slice(53, 101)
NUM_CHANNELS = 101          # with colour
NUM_CHANNELS_NO_COLOR = 53  # TRELLIS use_color=False


def _as_tensor(x, dtype=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(dtype) if dtype is not None else t


def deformed_positions(vertex_ijk: torch.Tensor, deform: torch.Tensor, resolution: int) -> torch.Tensor:
    """Grid vertex ijk [V, 3] + raw deformation [V, 3] -> positions in the [-0.5, 0.5]^3 box."""
    return vertex_ijk.to(deform.dtype) / resolution - 0.5 + (1 - 1e-8) / (2 * resolution) * torch.tanh(deform)


@torch.no_grad()
def mesh_from_decoder_features(coords, feats, resolution: int = 256, *,
                               drop_unused_vertices: bool = True) -> Mesh:
    """Mesh from the mesh decoder's per-fine-voxel features.

    Args:
        coords: int [N, 4] (batch, x, y, z) fine voxel coordinates at ``resolution`` (one mesh: a single
            batch index), or [N, 3] without the batch column. Numpy or torch; any device.
        feats: [N, 101] (or [N, 53] without colour) in the channel layout of the module docstring.
        resolution: fine grid resolution R (TRELLIS: 4 * 64 = 256).
        drop_unused_vertices: remove dual vertices no face uses (the reference keeps them).

    Returns:
        engine.types.Mesh with vertices in [-0.5, 0.5]^3, counter-clockwise faces seen from outside,
        and linear vertex colours (None without colour channels).
    """
    coords, feats = _check_inputs(coords, feats)
    use_color = feats.shape[1] == NUM_CHANNELS
    device = feats.device
    R = int(resolution)
    size = R + 1                                            # vertices per axis

    # 1. per-vertex attributes: mean over the active voxels sharing the vertex
    active_keys, active_attr = _shared_vertex_attributes(coords, feats, R)
    # 2. crossed cubes: they have an inside corner, and inside corners are active vertices
    cube_ijk = _crossed_cubes(active_keys, active_attr, R)
    vertex_ijk, cube_corners = cube_corner_vertices(cube_ijk)
    if cube_ijk.shape[0] == 0:
        return Mesh(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32),
                    np.zeros((0, 3), np.float32) if use_color else None)

    # 3. attributes of the candidate cubes' vertices (defaults where no active voxel touches them)
    found = lookup(active_keys, pack(vertex_ijk, size))
    defaults = torch.zeros(active_attr.shape[-1], device=device)
    defaults[0] = 1.0                                      # outside
    vertex_attr = torch.where((found >= 0)[:, None], active_attr[found.clamp(min=0)], defaults)
    positions = deformed_positions(vertex_ijk, vertex_attr[:, 1:4], R)
    sdf = vertex_attr[:, 0]
    colors = torch.sigmoid(vertex_attr[:, 4:]) if use_color else None

    # 4. FlexiCubes, with the per-cube weights of the active voxels
    weights = _cube_weights(coords, feats, cube_ijk, size)
    result = flexicubes_extract(positions, sdf, cube_corners, beta=weights[:, :12], alpha=weights[:, 12:20],
                                gamma=weights[:, 20], vertex_attributes=colors)
    vertices, faces, attrs = result
    if drop_unused_vertices and faces.numel():
        vertices, faces, attrs = _drop_unused_vertices(vertices, faces, attrs)
    mesh_colors = None
    if attrs is not None:
        mesh_colors = srgb_to_linear(attrs[:, :3]).cpu().numpy().astype(np.float32)
    return Mesh(vertices=vertices.cpu().numpy().astype(np.float32),
                faces=faces.cpu().numpy().astype(np.int32), colors=mesh_colors)


def _check_inputs(coords, feats) -> tuple[torch.Tensor, torch.Tensor]:
    """coords int64 [N, 3] (the batch column dropped) and feats float32 [N, 101 or 53] on feats' device."""
    feats = _as_tensor(feats)
    device = feats.device
    feats = feats.float()
    coords = _as_tensor(coords).to(device)
    if coords.shape[1] == 4:
        if coords.shape[0] and bool((coords[:, 0] != coords[0, 0]).any()):
            raise ValueError("mesh_from_decoder_features makes one mesh: coords hold several batch indices")
        coords = coords[:, 1:]
    if feats.shape[1] not in (NUM_CHANNELS, NUM_CHANNELS_NO_COLOR):
        raise ValueError(f"expected {NUM_CHANNELS} (or {NUM_CHANNELS_NO_COLOR}) feature channels, got {feats.shape[1]}")
    return coords.long(), feats


def _shared_vertex_attributes(coords: torch.Tensor, feats: torch.Tensor, R: int):
    """Per grid vertex of the active voxels: packed keys [Va] (sorted) and the mean of the voxels'
    per-corner values there [Va, A] (sdf with its -1/R bias, deform xyz, then the 6 colour channels)."""
    n, device = coords.shape[0], feats.device
    per_corner = [feats[:, SDF].reshape(n, 8, 1) - 1.0 / R, feats[:, DEFORM].reshape(n, 8, 3)]
    if feats.shape[1] == NUM_CHANNELS:
        per_corner.append(feats[:, COLOR].reshape(n, 8, 6))
    per_corner = torch.cat(per_corner, dim=-1)             # [N, 8, A]
    corner_keys = pack(coords[:, None, :] + corner_offsets(device)[None], R + 1).reshape(-1)
    active_keys, inverse = torch.unique(corner_keys, return_inverse=True)
    num_attr = per_corner.shape[-1]
    sums = torch.zeros(active_keys.numel(), num_attr, device=device).index_add_(
        0, inverse, per_corner.reshape(-1, num_attr))
    counts = torch.zeros(active_keys.numel(), device=device).index_add_(
        0, inverse, torch.ones_like(inverse, dtype=torch.float32))
    return active_keys, sums / counts[:, None]


def _crossed_cubes(active_keys: torch.Tensor, active_attr: torch.Tensor, R: int) -> torch.Tensor:
    """ijk [C, 3] of the cubes with an inside and an outside corner (inside corners are active vertices)."""
    size = R + 1
    inside_keys = active_keys[active_attr[:, 0] < 0]
    cube_ijk = cubes_around_vertices(unpack(inside_keys, size), R)
    corner_is_inside = lookup(inside_keys, pack(cube_ijk[:, None, :] + corner_offsets(active_keys.device)[None],
                                                size)) >= 0
    return cube_ijk[~corner_is_inside.all(1)]


def _cube_weights(coords: torch.Tensor, feats: torch.Tensor, cube_ijk: torch.Tensor, size: int) -> torch.Tensor:
    """Raw FlexiCubes weights [C, 21] per cube: the active voxels carry theirs, the others zeros."""
    voxel_keys, voxel_order = torch.sort(pack(coords, size))
    cube_hit = lookup(voxel_keys, pack(cube_ijk, size))
    weights = torch.zeros(cube_ijk.shape[0], 21, device=feats.device)
    has = cube_hit >= 0
    weights[has] = feats[voxel_order[cube_hit[has]], WEIGHTS]
    return weights


def _drop_unused_vertices(vertices: torch.Tensor, faces: torch.Tensor, attrs: Optional[torch.Tensor]):
    """Removes the vertices no face uses (and their attributes), renumbering the faces."""
    used = torch.zeros(vertices.shape[0], dtype=torch.bool, device=vertices.device)
    used[faces.reshape(-1)] = True
    remap = torch.cumsum(used.long(), 0) - 1
    return vertices[used], remap[faces], attrs[used] if attrs is not None else None
