"""Mesh from a set of 3D Gaussians (used when no mesh decoder is available).

The Gaussians define an opacity field. At a point x each Gaussian i contributes
alpha_i(x) = o_i * exp(-1/2 d^T Sigma_i^-1 d) (d = x - mu_i), and the accumulated opacity is
1 - prod_i (1 - alpha_i(x)). We extract its ``level`` set (default 0.5) with the sparse
FlexiCubes (uniform weights): the field stored on the grid is the optical depth
tau = -sum log(1 - alpha_i), and the scalar handed to FlexiCubes is -log(1 - level) - tau
(negative inside).

The field is only evaluated at grid vertices within 3 standard deviations of a Gaussian, in
chunks of Gaussians, and kept sparse (sorted vertex keys); untouched vertices are empty space.
Each Gaussian is widened by a small isotropic low-pass of a quarter cell (its opacity scaled to
keep its integral) so that Gaussians smaller than a cell still land on the grid.

Vertex colours: the opacity-weighted mean of the Gaussians' DC colours (0.5 + C0 * f_dc, image
space) is stored on the grid and interpolated like the positions, then converted to linear.
Closed components wound inside out (walls of internal cavities, e.g. the inside of a hollow
shell of Gaussians) are removed by default.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ..types import GaussianSet, Mesh
from .cleanup import drop_inverted_components, remove_unused_vertices
from .color import sh_dc_to_rgb, srgb_to_linear
from .flexicubes import flexicubes_extract
from .grid import corner_offsets, cube_corner_vertices, cubes_around_vertices, lookup, pack, unpack


def _rotation_matrices(quat_wxyz: torch.Tensor) -> torch.Tensor:
    q = torch.nn.functional.normalize(quat_wxyz, dim=-1)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).reshape(*q.shape[:-1], 3, 3)


@torch.no_grad()
def splat_opacity(xyz: torch.Tensor, opacity: torch.Tensor, scaling: torch.Tensor, rotation: torch.Tensor,
                  rgb: torch.Tensor, origin: torch.Tensor, cell: float, grid_size: int,
                  max_radius_cells: int = 12, chunk_pairs: int = 4_000_000):
    """Accumulate optical depth and opacity-weighted colour at the grid vertices near each Gaussian.

    Grid vertex ijk sits at origin + ijk * cell, 0 <= ijk < grid_size.
    Returns (keys int64 [K] sorted, tau [K], rgb [K, 3])."""
    device = xyz.device
    rot = _rotation_matrices(rotation)                                   # [n, 3, 3]
    filt2 = (0.25 * cell) ** 2
    var = scaling ** 2 + filt2                                           # widened variances
    # keep each Gaussian's integral: o' = o * sqrt(prod s^2 / prod (s^2 + f^2))
    o = opacity.reshape(-1) * torch.sqrt(torch.prod(scaling ** 2 / var, dim=-1))
    o = o.clamp(max=0.999)
    inv_cov = rot @ torch.diag_embed(1.0 / var) @ rot.transpose(1, 2)    # [n, 3, 3]
    radius = (3.0 * var.max(-1).values.sqrt() / cell).ceil().long().clamp(1, max_radius_cells)
    centre = torch.round((xyz - origin) / cell).long()

    keys_out, tau_out, col_out = [], [], []
    for r in torch.unique(radius).tolist():
        members = torch.nonzero(radius == r).squeeze(1)
        ax = torch.arange(-r, r + 1, device=device)
        offsets = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
        per_chunk = max(1, chunk_pairs // offsets.shape[0])
        for start in range(0, members.numel(), per_chunk):
            g = members[start:start + per_chunk]
            ijk = centre[g][:, None, :] + offsets[None]                  # [m, P, 3]
            d = origin + ijk.to(xyz.dtype) * cell - xyz[g][:, None, :]
            m2 = torch.einsum("mpi,mij,mpj->mp", d, inv_cov[g], d)
            alpha = o[g][:, None] * torch.exp(-0.5 * m2)
            ok = (alpha > 1e-4) & ((ijk >= 0) & (ijk < grid_size)).all(-1)
            a = alpha[ok]
            key = pack(ijk[ok], grid_size)
            tau = -torch.log1p(-a)
            colw = a[:, None] * rgb[g][:, None, :].expand(-1, offsets.shape[0], -1)[ok]
            uk, inv = torch.unique(key, return_inverse=True)
            keys_out.append(uk)
            tau_out.append(torch.zeros(uk.numel(), device=device, dtype=xyz.dtype).index_add_(0, inv, tau))
            col_out.append(torch.zeros(uk.numel(), 4, device=device, dtype=xyz.dtype).index_add_(
                0, inv, torch.cat([colw, a[:, None]], 1)))
    if not keys_out:
        return (torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, device=device),
                torch.zeros(0, 3, device=device))
    keys, inv = torch.unique(torch.cat(keys_out), return_inverse=True)
    tau = torch.zeros(keys.numel(), device=device, dtype=xyz.dtype).index_add_(0, inv, torch.cat(tau_out))
    col = torch.zeros(keys.numel(), 4, device=device, dtype=xyz.dtype).index_add_(0, inv, torch.cat(col_out))
    rgb_mean = col[:, :3] / col[:, 3:].clamp(min=1e-12)
    return keys, tau, rgb_mean


@torch.no_grad()
def mesh_from_gaussians(gaussians: GaussianSet, resolution: int = 128, level: float = 0.5,
                        min_opacity: float = 0.05, remove_cavities: bool = True,
                        device: Optional[str] = None) -> Mesh:
    """Mesh of the ``level`` set of the Gaussians' accumulated opacity.

    Args:
        gaussians: activated Gaussians of one frame (model box).
        resolution: grid cells per unit length (the model box is 1 unit wide).
        level: accumulated-opacity level of the surface, in (0, 1).
        min_opacity: Gaussians below this opacity are ignored.
        remove_cavities: drop closed components wound inside out (inner walls of hollow parts).
        device: torch device for the computation (default: CPU).
    Returns:
        engine.types.Mesh (counter-clockwise from outside, linear vertex colours).
    """
    dev = torch.device(device or "cpu")
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32, device=dev)
    xyz, opacity = t(gaussians.xyz).reshape(-1, 3), t(gaussians.opacity).reshape(-1)
    scaling, rotation = t(gaussians.scaling).reshape(-1, 3), t(gaussians.rotation).reshape(-1, 4)
    rgb = sh_dc_to_rgb(t(gaussians.features_dc).reshape(-1, 3)).clamp(0, 1)
    keep = opacity >= min_opacity
    xyz, opacity, scaling, rotation, rgb = xyz[keep], opacity[keep], scaling[keep], rotation[keep], rgb[keep]
    empty = Mesh(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32), np.zeros((0, 3), np.float32))
    if xyz.shape[0] == 0:
        return empty

    cell = 1.0 / resolution
    max_radius_cells = 12
    margin = (max_radius_cells + 2) * cell
    origin = xyz.min(0).values - margin
    grid_size = int(math.ceil(float((xyz.max(0).values - origin).max() + margin) / cell)) + 1
    keys, tau, vertex_rgb = splat_opacity(xyz, opacity, scaling, rotation, rgb, origin, cell, grid_size,
                                          max_radius_cells=max_radius_cells)
    tau_level = -math.log1p(-level)
    inside_keys = keys[tau > tau_level]
    if inside_keys.numel() == 0:
        return empty

    # crossed cubes have an inside corner; keep those that also have an outside one
    cube_ijk = cubes_around_vertices(unpack(inside_keys, grid_size), grid_size - 1)
    inside_corner = lookup(inside_keys, pack(cube_ijk[:, None, :] + corner_offsets(dev)[None], grid_size)) >= 0
    cube_ijk = cube_ijk[~inside_corner.all(1)]
    vertex_ijk, cube_corners = cube_corner_vertices(cube_ijk)
    found = lookup(keys, pack(vertex_ijk, grid_size))
    hit = found >= 0
    sdf = torch.full((vertex_ijk.shape[0],), tau_level, device=dev)
    sdf[hit] = tau_level - tau[found[hit]]
    colors = torch.full((vertex_ijk.shape[0], 3), 0.5, device=dev)
    colors[hit] = vertex_rgb[found[hit]]
    positions = origin + vertex_ijk.float() * cell

    vertices, faces, attrs = flexicubes_extract(positions, sdf, cube_corners, vertex_attributes=colors)
    mesh = Mesh(vertices.cpu().numpy().astype(np.float32), faces.cpu().numpy().astype(np.int32),
                srgb_to_linear(attrs).cpu().numpy().astype(np.float32))
    if remove_cavities:
        mesh = drop_inverted_components(mesh)
    return remove_unused_vertices(mesh)
