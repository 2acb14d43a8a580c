"""Small triangle-mesh helpers in torch: normals, edges, surface sampling, point-to-surface
distance. Vertices [V, 3] float, faces [F, 3] long."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from .knn import PointGrid


def face_normals(v: torch.Tensor, f: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """[F, 3] face normals (length = 2 x area when not normalised)."""
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    n = torch.cross(b - a, c - a, dim=1)
    return torch.nn.functional.normalize(n, dim=1, eps=1e-20) if normalize else n


def face_areas(v: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return 0.5 * face_normals(v, f, normalize=False).norm(dim=1)


def vertex_normals(v: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Area-weighted vertex normals [V, 3] (zero vector for unreferenced vertices)."""
    fn = face_normals(v, f, normalize=False)
    n = torch.zeros_like(v)
    for k in range(3):
        n.index_add_(0, f[:, k], fn)
    return torch.nn.functional.normalize(n, dim=1, eps=1e-20)


def unique_pairs(pairs: torch.Tensor) -> torch.Tensor:
    """The distinct rows of a non-negative integer tensor [E, 2], sorted: what torch.unique(dim=0) gives,
    but with each row packed into one int64 key first, so that the unique is one-dimensional (cheaper)."""
    if pairs.shape[0] == 0:
        return pairs
    n = int(pairs.max()) + 1
    keys = torch.unique(pairs[:, 0] * n + pairs[:, 1])
    return torch.stack([keys // n, keys % n], 1)


def unique_edges(f: torch.Tensor) -> torch.Tensor:
    """Undirected edges [E, 2] (i < j) of a face list."""
    e = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]], 0)
    e = torch.sort(e, dim=1).values
    return unique_pairs(e[e[:, 0] != e[:, 1]])


def path_distances(points: torch.Tensor, edges: torch.Tensor, seed_point: torch.Tensor,
                   seed_column: torch.Tensor, seed_distance: torch.Tensor, columns: int,
                   reach: float) -> torch.Tensor:
    """Shortest-path distances along the edges [E, 2] of a graph of `points` [P, 3], for `columns`
    sources at once: column c starts from its seeds (point seed_point[s] at distance seed_distance[s]
    where seed_column[s] == c). Returns [P, columns]; inf further than `reach` or on another
    connected part. Every column relaxes together (Bellman-Ford) until nothing changes."""
    num = points.shape[0]
    to, frm = torch.cat([edges[:, 0], edges[:, 1]]), torch.cat([edges[:, 1], edges[:, 0]])
    length = (points[to] - points[frm]).norm(dim=1)[:, None]
    inf = torch.tensor(float("inf"), dtype=points.dtype, device=points.device)
    dist = torch.full((num * columns,), float("inf"), dtype=points.dtype, device=points.device)
    dist = dist.scatter_reduce(0, seed_point * columns + seed_column, seed_distance.to(points.dtype), "amin")
    dist = dist.reshape(num, columns)
    dist = torch.where(dist <= reach, dist, inf)
    index = to[:, None].expand(-1, columns)
    for _ in range(num):
        relaxed = dist.scatter_reduce(0, index, dist[frm] + length, "amin")
        relaxed = torch.where(relaxed <= reach, relaxed, inf)
        if torch.equal(relaxed, dist):
            break
        dist = relaxed
    return dist


@dataclass
class SurfaceSamples:
    """Points spread over a surface: positions [S, 3], face normals [S, 3]; for a coloured mesh also
    the colour there [S, C] and the colour's gradient along the surface [S, C, 3] (of the face's
    linear interpolation: how the colour changes per unit of movement along the face)."""

    points: torch.Tensor
    normals: torch.Tensor
    colors: Optional[torch.Tensor] = None
    color_gradients: Optional[torch.Tensor] = None


def face_color_gradients(v: torch.Tensor, f: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
    """[F, C, 3]: gradient along each face of its linearly interpolated vertex colours [V, C].
    Barycentric coordinate λ_a has the gradient n × (c − b) / (2·area) (the opposite edge turned
    inwards); the colour's is Σ colour_a ⊗ ∇λ_a. Faces without area get zero."""
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    n2 = torch.cross(b - a, c - a, dim=1)                               # normal × 2·area
    denom = (n2 * n2).sum(1, keepdim=True)                              # (2·area)²
    denom = torch.where(denom > 0, denom, torch.full_like(denom, float("inf")))
    grads = [torch.cross(n2, c - b, dim=1) / denom, torch.cross(n2, a - c, dim=1) / denom,
             torch.cross(n2, b - a, dim=1) / denom]                     # ∇λ_a, ∇λ_b, ∇λ_c  [F, 3]
    return sum(colors[f[:, k], :, None] * grads[k][:, None, :] for k in range(3))


class MeshNeighbours:
    """The edges of a mesh in both directions (src[k] -> dst[k], [2E] each), with sums over each
    vertex's neighbours, (A x)_i = Σ_{j ~ i} x_j for x [V, C]: a sparse CSR product on the CPU and
    CUDA, `index_add` on MPS (no sparse CSR product there)."""

    def __init__(self, f: torch.Tensor, num_vertices: int, dtype: torch.dtype):
        e = unique_edges(f)
        self.src = torch.cat([e[:, 0], e[:, 1]])
        self.dst = torch.cat([e[:, 1], e[:, 0]])
        self.degree = torch.bincount(self.src, minlength=num_vertices).to(dtype)   # [V]
        self.matrix = None
        if f.device.type in ("cpu", "cuda") and self.src.numel():
            with warnings.catch_warnings():           # "sparse CSR is beta" notices
                warnings.simplefilter("ignore")
                adj = torch.sparse_coo_tensor(torch.stack([self.src, self.dst]),
                                              torch.ones_like(self.src, dtype=dtype), (num_vertices, num_vertices))
                self.matrix = adj.coalesce().to_sparse_csr()

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.matrix is not None:
            return self.matrix @ x
        return torch.zeros_like(x).index_add_(0, self.src, x[self.dst])


def smooth_vertex_colors(v: torch.Tensor, f: torch.Tensor, colors: torch.Tensor, radius: float,
                         max_steps: int = 50, neighbours: Optional[MeshNeighbours] = None) -> torch.Tensor:
    """Vertex colours [V, C] smoothed over about `radius` along the mesh: repeated steps of
    c ← ½ c + ½ (mean of the neighbours' c), (radius / mean edge length)² of them (at most `max_steps`).

    For the fit's colour term: noise between neighbouring vertices no longer reads as a steep
    gradient, and a sharp colour edge becomes a ramp about `radius` wide, which the faces on either
    side of it feel too (a two-tone pattern otherwise has gradients only on the faces the edge crosses)."""
    if radius <= 0:
        return colors
    neighbours = neighbours or MeshNeighbours(f, v.shape[0], colors.dtype)
    if neighbours.src.numel() == 0:
        return colors
    length = float((v[neighbours.src] - v[neighbours.dst]).norm(dim=1).mean())
    steps = min(int(round((radius / max(length, 1e-12)) ** 2)), max_steps)
    degree = neighbours.degree.clamp(min=1).to(colors.dtype)[:, None]
    for _ in range(steps):
        colors = 0.5 * colors + 0.5 * neighbours.sum(colors) / degree
    return colors


def sample_surface(v: torch.Tensor, f: torch.Tensor, count: int, generator: torch.Generator,
                   colors: Optional[torch.Tensor] = None) -> SurfaceSamples:
    """`count` points spread over the surface in proportion to area, with their face normals (and,
    given vertex colours [V, C], the colours and colour gradients there).
    Stratified: every face gets floor(expected) samples, the remainder is drawn by area."""
    fn = face_normals(v, f, normalize=False)
    area = 0.5 * fn.norm(dim=1)
    keep = area > 0
    f, fn, area = f[keep], fn[keep], area[keep]
    expected = area / area.sum() * count
    base = torch.floor(expected).long()
    rest = count - int(base.sum())
    extra = torch.zeros_like(base)
    if rest > 0:
        frac = (expected - base).clamp(min=0)
        pick = torch.multinomial(frac.cpu() + 1e-12, rest, replacement=False, generator=generator)
        extra[pick.to(extra.device)] = 1
    face_id = torch.repeat_interleave(torch.arange(f.shape[0], device=f.device), base + extra)
    r = torch.rand(face_id.shape[0], 2, generator=generator).to(v.device, v.dtype)
    s = r[:, :1].sqrt()
    w0, w1 = 1 - s, s * (1 - r[:, 1:])
    w2 = s * r[:, 1:]
    tri = f[face_id]
    p = w0 * v[tri[:, 0]] + w1 * v[tri[:, 1]] + w2 * v[tri[:, 2]]
    n = torch.nn.functional.normalize(fn[face_id], dim=1, eps=1e-20)
    if colors is None:
        return SurfaceSamples(p, n)
    colors = colors.to(v.dtype)
    c = w0 * colors[tri[:, 0]] + w1 * colors[tri[:, 1]] + w2 * colors[tri[:, 2]]
    return SurfaceSamples(p, n, c, face_color_gradients(v, f, colors)[face_id])


def closest_point_on_triangles(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor
                               ) -> torch.Tensor:
    """Closest point to p on triangle (a, b, c), all [..., 3]; handles degenerate triangles.
    Region tests on barycentric coordinates (vertex, edge, interior regions)."""
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = (ab * ap).sum(-1), (ac * ap).sum(-1)
    bp = p - b
    d3, d4 = (ab * bp).sum(-1), (ac * bp).sum(-1)
    cp = p - c
    d5, d6 = (ab * cp).sum(-1), (ac * cp).sum(-1)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    eps = 1e-30
    denom = va + vb + vc
    v_in = vb / torch.where(denom.abs() > eps, denom, torch.full_like(denom, eps))
    w_in = vc / torch.where(denom.abs() > eps, denom, torch.full_like(denom, eps))
    result = a + v_in[..., None] * ab + w_in[..., None] * ac

    def on_edge(out, cond, start, direction, t):
        return torch.where(cond[..., None], start + t.clamp(0, 1)[..., None] * direction, out)

    out = result
    # edge bc
    t_bc = (d4 - d3) / torch.where(((d4 - d3) + (d5 - d6)).abs() > eps, (d4 - d3) + (d5 - d6),
                                   torch.full_like(d4, eps))
    out = on_edge(out, (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0), b, c - b, t_bc)
    # edge ac
    t_ac = d2 / torch.where((d2 - d6).abs() > eps, d2 - d6, torch.full_like(d2, eps))
    out = on_edge(out, (vb <= 0) & (d2 >= 0) & (d6 <= 0), a, ac, t_ac)
    # edge ab
    t_ab = d1 / torch.where((d1 - d3).abs() > eps, d1 - d3, torch.full_like(d1, eps))
    out = on_edge(out, (vc <= 0) & (d1 >= 0) & (d3 <= 0), a, ab, t_ab)
    # vertex regions
    out = torch.where(((d6 >= 0) & (d5 <= d6))[..., None], c, out)
    out = torch.where(((d3 >= 0) & (d4 <= d3))[..., None], b, out)
    out = torch.where(((d1 <= 0) & (d2 <= 0))[..., None], a, out)
    bad = ~torch.isfinite(out).all(-1)
    if bad.any():
        out = torch.where(bad[..., None], a, out)
    return out


def vertex_face_table(f: torch.Tensor, num_vertices: int, cap: int = 16) -> torch.Tensor:
    """[V, cap] faces incident to each vertex, padded with -1 (faces beyond `cap` are dropped)."""
    vid = f.reshape(-1)
    fid = torch.arange(f.shape[0], device=f.device).repeat_interleave(3)
    order = torch.argsort(vid, stable=True)
    vid, fid = vid[order], fid[order]
    counts = torch.bincount(vid, minlength=num_vertices)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(vid.shape[0], device=f.device) - starts[vid]
    table = torch.full((num_vertices, cap), -1, dtype=torch.long, device=f.device)
    keep = rank < cap
    table[vid[keep], rank[keep]] = fid[keep]
    return table


class SurfaceDistance:
    """Distance from points to a triangle mesh: the nearest mesh vertex is found exactly, then
    the closest point over the triangles around it. This is the true distance whenever the closest
    surface point lies on a triangle touching the nearest vertex (nearly always on reasonable
    meshes); otherwise it is a slight over-estimate, never an under-estimate."""

    def __init__(self, v: torch.Tensor, f: torch.Tensor, grid: Optional[PointGrid] = None):
        self.v, self.f = v, f
        self.grid = grid if grid is not None else PointGrid(v)
        self.table = vertex_face_table(f, v.shape[0])

    def __call__(self, q: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
        return self.closest(q, chunk)[2]

    def closest(self, q: torch.Tensor, chunk: int = 16384
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Closest surface point [M, 3], its face [M] (-1 where it is a vertex without faces) and the
        distance [M] for points q [M, 3]."""
        nearest, dist_v = self.grid.query(q)
        points, faces_out, dists = [], [], []
        for s in range(0, q.shape[0], chunk):
            qc = q[s:s + chunk]
            faces = self.table[nearest[s:s + chunk]]                 # [m, cap]
            valid = faces >= 0
            tri = self.f[faces.clamp(min=0)]                         # [m, cap, 3]
            a, b, c = self.v[tri[..., 0]], self.v[tri[..., 1]], self.v[tri[..., 2]]
            cp = closest_point_on_triangles(qc[:, None, :].expand_as(a), a, b, c)
            d = (cp - qc[:, None, :]).norm(dim=-1).masked_fill(~valid, float("inf"))
            best = d.argmin(1, keepdim=True)
            points.append(cp.gather(1, best[..., None].expand(-1, 1, 3))[:, 0])
            faces_out.append(faces.gather(1, best)[:, 0])
            dists.append(d.gather(1, best)[:, 0])
        if not points:
            return self.v[nearest], torch.full_like(nearest, -1), dist_v
        point, face, d = torch.cat(points), torch.cat(faces_out), torch.cat(dists)
        at_vertex = ~(d < dist_v)               # the nearest vertex itself is as close (or has no faces)
        point = torch.where(at_vertex[:, None], self.v[nearest], point)
        face = torch.where(at_vertex & ~torch.isfinite(d), torch.full_like(face, -1), face)
        return point, face, torch.minimum(d, dist_v)


def barycentric(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Barycentric coordinates [..., 3] of points p in the planes of triangles (a, b, c), all [..., 3]
    (degenerate triangles: all weight on a)."""
    ab, ac, ap = b - a, c - a, p - a
    d00, d01, d11 = (ab * ab).sum(-1), (ab * ac).sum(-1), (ac * ac).sum(-1)
    d20, d21 = (ap * ab).sum(-1), (ap * ac).sum(-1)
    den = d00 * d11 - d01 * d01
    ok = den > 1e-12 * d00 * d11                 # Cauchy-Schwarz: den >= 0, ~0 for slivers
    den = torch.where(ok, den, torch.ones_like(den))
    v = torch.where(ok, (d11 * d20 - d01 * d21) / den, torch.zeros_like(den))
    w = torch.where(ok, (d00 * d21 - d01 * d20) / den, torch.zeros_like(den))
    return torch.stack([1 - v - w, v, w], -1)
