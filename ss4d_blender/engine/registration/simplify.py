"""Simplification of the reference frame to a target vertex count.

`simplify_to_vertices` welds the mesh and decimates it by quadric edge collapse
(`mesh.cleanup.decimate`), keeping every part, however small. Decimation leaves boundary and
non-manifold vertices alone, so a mesh made mostly of them (a triangle soup that does not weld, torn
sheets) cannot get near the target that way; it then falls back to vertex clustering on a uniform grid
(`cluster_simplify`: cell size found by bisection so the count lands near the target; vertices of one
cell that face the same way, 6 normal buckets, merge into their mean, so the two sides of a thin sheet
are not welded; faces that collapse are dropped). `cluster_labels` also gives `graph.SurfacePaths` its
coarse version of a mesh.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..mesh.cleanup import clean_mesh
from ..types import Mesh
from .geometry import vertex_normals


def _cluster(v: torch.Tensor, bucket: torch.Tensor, cell: float) -> tuple[torch.Tensor, int]:
    ijk = torch.floor((v - v.min(0).values) / cell).long()
    dims = ijk.max(0).values + 1
    key = ((ijk[:, 0] * dims[1] + ijk[:, 1]) * dims[2] + ijk[:, 2]) * 6 + bucket
    _, inverse = torch.unique(key, return_inverse=True)
    return inverse, int(inverse.max()) + 1


def cluster_labels(v: torch.Tensor, f: torch.Tensor, target_vertices: int) -> tuple[torch.Tensor, int]:
    """Cluster index of every vertex [V] and the number of clusters (about `target_vertices`, within
    ~2 %): grid cells (size found by bisection) split by 6 normal buckets, so the two sides of a
    thin sheet, or two parts facing each other across a small gap, stay apart."""
    n = vertex_normals(v, f)
    axis = n.abs().argmax(1)
    bucket = axis * 2 + (n.gather(1, axis[:, None])[:, 0] < 0).long()
    diag = float((v.max(0).values - v.min(0).values).norm()) or 1.0
    lo, hi = diag * 1e-5, diag
    best = None
    for _ in range(30):
        cell = (lo * hi) ** 0.5
        inverse, count = _cluster(v, bucket, cell)
        if best is None or abs(count - target_vertices) < abs(best[1] - target_vertices):
            best = (inverse, count)
        if count > target_vertices:
            lo = cell
        else:
            hi = cell
        if abs(count - target_vertices) <= 0.02 * target_vertices or hi / lo < 1.001:
            break
    return best


def cluster_simplify(vertices: np.ndarray, faces: np.ndarray, target_vertices: int,
                     colors: Optional[np.ndarray] = None
                     ) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Vertex-clustering simplification to about `target_vertices` (within ~10%)."""
    v = torch.from_numpy(np.ascontiguousarray(vertices, dtype=np.float32)).double()
    f = torch.from_numpy(np.ascontiguousarray(faces, dtype=np.int64))
    inverse, count = cluster_labels(v, f, target_vertices)
    ones = torch.ones(v.shape[0], dtype=v.dtype)
    weight = torch.zeros(count, dtype=v.dtype).index_add_(0, inverse, ones)
    new_v = torch.zeros(count, 3, dtype=v.dtype).index_add_(0, inverse, v) / weight[:, None]
    new_c = None
    if colors is not None:
        c = torch.from_numpy(np.asarray(colors, dtype=np.float64))
        new_c = torch.zeros(count, 3, dtype=v.dtype).index_add_(0, inverse, c) / weight[:, None]
    nf = inverse[f]
    ok = (nf[:, 0] != nf[:, 1]) & (nf[:, 1] != nf[:, 2]) & (nf[:, 2] != nf[:, 0])
    nf = nf[ok]
    # drop duplicated faces (same vertex set), keeping the first one's orientation
    key = torch.sort(nf, dim=1).values
    _, inv, counts = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
    first = torch.full((counts.shape[0],), nf.shape[0], dtype=torch.long)
    first = first.scatter_reduce(0, inv, torch.arange(nf.shape[0]), reduce="amin")
    nf = nf[torch.sort(first).values]
    used = torch.zeros(count, dtype=torch.bool)
    used[nf.reshape(-1)] = True
    remap = torch.cumsum(used.long(), 0) - 1
    nf = remap[nf]
    new_v = new_v[used]
    if new_c is not None:
        new_c = new_c[used].float().numpy()
    return new_v.float().numpy(), nf.int().numpy(), new_c


def simplify_to_vertices(vertices: np.ndarray, faces: np.ndarray, target_vertices: int,
                         colors: Optional[np.ndarray] = None
                         ) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray], str]:
    """Reduce a mesh to about `target_vertices` vertices. Returns (vertices, faces, colors, method),
    method "none" (already small enough: unchanged), "decimation" or "vertex clustering" (decimation
    stayed above 1.5x the target: see the module notes)."""
    if vertices.shape[0] <= target_vertices:
        return vertices, faces, colors, "none"
    out = clean_mesh(Mesh(vertices, faces, colors), min_component_fraction=0.0, target_faces=2 * target_vertices)
    if 0 < out.vertices.shape[0] <= 1.5 * target_vertices:
        return (np.asarray(out.vertices, np.float32), np.asarray(out.faces, np.int32),
                None if out.colors is None else np.asarray(out.colors, np.float32), "decimation")
    v, f, c = cluster_simplify(vertices, faces, target_vertices, colors)
    return v, f, c, "vertex clustering"
