"""Nearest-neighbour search on point sets in pure torch (CPU, CUDA, MPS), no scipy.

`PointGrid` bins the points into a uniform grid (cells sorted by a linear key, located with
`searchsorted`, so empty space costs nothing). A query looks at the 2x2x2 block of cells around
it, which is guaranteed to hold the true nearest point when that point is closer than half a cell.
Queries that are further away go to a grid with 4x larger cells, then to chunked brute force,
so the answer is always the exact nearest neighbour. A cell holding more than `max_per_cell` points
keeps the excess in an overflow list that queries near it search by brute force (the cell size is
chosen so that this is rare).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

_CORNERS = torch.tensor([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=torch.int64)


class _Level:
    """One uniform grid over the points: occupied cells sorted by key, and their points in a padded
    table [cells + 1, cap, 3] (unused slots and the extra last "empty" cell at +inf), so a query
    gathers whole cells without masks. A cell holding more than `cap` points (where a mesh crowds its
    vertices, like the poles of a UV sphere) keeps the rest in an overflow list, which the queries
    that touch such a cell also search, so nothing is ever left out."""

    def __init__(self, points: torch.Tensor, origin: torch.Tensor, cell: float, max_per_cell: int):
        self.cell = float(cell)
        self.origin = origin
        ijk = torch.floor((points - origin) / self.cell).long()
        self.dims = (ijk.max(0).values + 2).clamp(min=1)
        key_sorted, order = torch.sort(self._key(ijk))
        self.keys, counts = torch.unique_consecutive(key_sorted, return_counts=True)
        self.cap = int(min(int(counts.max()), max_per_cell))
        starts = torch.cumsum(counts, 0) - counts
        cell_of = torch.repeat_interleave(torch.arange(counts.shape[0], device=points.device), counts)
        slot = torch.arange(points.shape[0], device=points.device) - starts[cell_of]
        keep = slot < self.cap                                   # the rest of a crowded cell: overflow
        n_cells = counts.shape[0]
        self.table = torch.full((n_cells + 1, self.cap, 3), float("inf"), dtype=points.dtype, device=points.device)
        self.table[cell_of[keep], slot[keep]] = points[order[keep]]
        self.index = torch.zeros((n_cells + 1, self.cap), dtype=torch.long, device=points.device)
        self.index[cell_of[keep], slot[keep]] = order[keep]
        self.crowded = torch.zeros(n_cells + 1, dtype=torch.bool, device=points.device)
        self.crowded[:n_cells] = counts > self.cap
        self.overflow_index = order[~keep]
        self.overflow = points[self.overflow_index]

    def _key(self, ijk: torch.Tensor) -> torch.Tensor:
        d = self.dims
        return (ijk[..., 0] * d[1] + ijk[..., 1]) * d[2] + ijk[..., 2]

    def query(self, q: torch.Tensor, chunk: int, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest point (index into the original points, squared distance) or (-1, inf) when
        the result cannot be guaranteed (nearest further than half a cell; with exact=False
        any point found in the 2x2x2 block is accepted)."""
        idx_out = torch.full((q.shape[0],), -1, dtype=torch.long, device=q.device)
        d2_out = torch.full((q.shape[0],), float("inf"), dtype=q.dtype, device=q.device)
        corners = _CORNERS.to(q.device)
        empty = self.keys.shape[0]                                          # the all-inf cell
        half2 = (0.5 * self.cell) ** 2 if exact else float("inf")
        for s in range(0, q.shape[0], chunk):
            qc = q[s:s + chunk]
            base = torch.floor((qc - self.origin) / self.cell - 0.5).long()
            cells = base[:, None, :] + corners[None]                      # [m, 8, 3]
            inside = ((cells >= 0) & (cells < self.dims)).all(-1)
            key = self._key(cells.clamp(min=0))
            pos = torch.searchsorted(self.keys, key).clamp(max=empty - 1)
            pos = torch.where(inside & (self.keys[pos] == key), pos, empty).reshape(-1)
            cand = self.table.index_select(0, pos).reshape(qc.shape[0], -1, 3)   # [m, 8·cap, 3]
            diff = cand - qc[:, None, :]
            best_d2, best = (diff * diff).sum(-1).min(1)
            best_idx = self.index.index_select(0, pos).reshape(qc.shape[0], -1).gather(1, best[:, None])[:, 0]
            touches = self.crowded[pos].reshape(qc.shape[0], -1).any(1)   # a crowded cell in the block
            if self.overflow.shape[0] and bool(touches.any()):
                rows = torch.nonzero(touches)[:, 0]
                i, d = brute_force_nearest(qc[rows], self.overflow)
                closer = d < best_d2[rows]
                best_d2[rows] = torch.where(closer, d, best_d2[rows])
                best_idx[rows] = torch.where(closer, self.overflow_index[i], best_idx[rows])
            ok = torch.isfinite(best_d2) & (best_d2 <= half2)             # inf: nothing in the block
            idx_out[s:s + chunk] = torch.where(ok, best_idx, -1)
            d2_out[s:s + chunk] = torch.where(ok, best_d2, float("inf"))
        return idx_out, d2_out


class PointGrid:
    """Exact nearest-neighbour queries against a fixed point set.

    points: [N, 3] float tensor. cell: grid cell size (default: about twice the mean spacing of
    a surface sampled by N points).
    """

    def __init__(self, points: torch.Tensor, cell: Optional[float] = None, max_per_cell: int = 24,
                 chunk: int = 8192):
        if points.ndim != 2 or points.shape[1] != 3 or points.shape[0] == 0:
            raise ValueError("PointGrid needs a non-empty [N, 3] point set")
        self.points = points
        self.chunk = chunk
        lo = points.min(0).values
        hi = points.max(0).values
        diag = float((hi - lo).norm()) or 1.0
        if cell is None:
            cell = 2.0 * diag / math.sqrt(points.shape[0])
        cell = max(float(cell), diag * 1e-6)
        origin = lo - 2.0 * cell
        self.levels = [_Level(points, origin, cell, max_per_cell)]
        coarse = cell * 3.0
        if coarse < diag:
            self.levels.append(_Level(points, origin - 2.0 * coarse, coarse, 6 * max_per_cell))

    def query(self, q: torch.Tensor, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """q [M, 3] -> (index [M] long, distance [M]) of the nearest point. exact=False accepts
        a point from the 2x2x2 cell block around the query (nearest in that block), which is the
        nearest overall except in rare cases; used for fitting correspondences."""
        idx = torch.full((q.shape[0],), -1, dtype=torch.long, device=q.device)
        d2 = torch.full((q.shape[0],), float("inf"), dtype=q.dtype, device=q.device)
        todo = torch.arange(q.shape[0], device=q.device)
        for level in self.levels:
            if todo.numel() == 0:
                break
            i, d = level.query(q[todo], self.chunk, exact)
            found = i >= 0
            idx[todo[found]] = i[found]
            d2[todo[found]] = d[found]
            todo = todo[~found]
        if todo.numel():
            i, d = brute_force_nearest(q[todo], self.points)
            idx[todo] = i
            d2[todo] = d
        return idx, d2.clamp(min=0).sqrt()


def brute_force_nearest(q: torch.Tensor, points: torch.Tensor, budget: int = 2 ** 24
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest neighbour by chunked squared distances. Returns (index, squared distance).
    Each chunk is measured from its queries' mean: the expanded form |q|² − 2 q·p + |p|² loses the
    small differences between close candidates to rounding when the coordinates are large."""
    chunk = max(1, budget // max(points.shape[0], 1))
    idx, d2 = [], []
    for s in range(0, q.shape[0], chunk):
        qc = q[s:s + chunk]
        centre = qc.mean(0)
        qs, ps = qc - centre, points - centre
        dd = (qs * qs).sum(1)[:, None] - 2.0 * qs @ ps.T + (ps * ps).sum(1)[None]
        m, i = dd.min(1)
        # refine the winner exactly
        diff = points[i] - qc
        idx.append(i)
        d2.append((diff * diff).sum(1))
    return torch.cat(idx), torch.cat(d2)
