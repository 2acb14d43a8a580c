"""Embedded deformation graph: the coarse stage of the fit.

A few hundred nodes g_k (farthest-point samples of the rest mesh) each carry a rotation R_k and
a translation t_k. Every vertex follows its K nearest nodes (nearest through space among those
not a long way round along the surface, so separate parts stay apart) with smooth weights w_ik:

    x_i = Σ_k w_ik [ R_k (v_i − g_k) + g_k + t_k ]

Nodes that influence a common vertex are neighbours; the regulariser asks neighbours to agree,
    Σ_(j,k) | R_j e_jk + g_j + t_j − (g_k + t_k) |²,
so the graph bends like a chain of rigid pieces. e_jk is the edge vector the regulariser keeps:
g_k − g_j for the rest shape; the registration passes mostly the previous frame's shape (see
`Deformer.kept_edge_vectors`). Rotations are explicit parameters, so large rotations (a limb
bending 90°) are reached in a few Gauss-Newton steps, where vertex-level
local/global iterations only creep. The data term is the same per-vertex quadratic (blocks D_i,
right-hand sides d_i) as the fine stage, so both stages see the same correspondences.
"""
from __future__ import annotations

import copy
import math

import torch

from .geometry import face_areas, path_distances, unique_edges, unique_pairs, vertex_normals
from .knn import PointGrid
from .simplify import cluster_labels


def farthest_point_sampling(points: torch.Tensor, count: int) -> torch.Tensor:
    count = min(count, points.shape[0])
    chosen = torch.zeros(count, dtype=torch.long, device=points.device)
    dist = torch.full((points.shape[0],), float("inf"), dtype=points.dtype, device=points.device)
    centre = points.mean(0)
    chosen[0] = int(((points - centre) ** 2).sum(1).argmax())
    for i in range(1, count):
        dist = torch.minimum(dist, ((points - points[chosen[i - 1]]) ** 2).sum(1))
        chosen[i] = int(dist.argmax())
    return chosen


def _skew(a: torch.Tensor) -> torch.Tensor:
    """[..., 3] -> [..., 3, 3] cross-product matrices [a]x."""
    z = torch.zeros_like(a[..., 0])
    return torch.stack([torch.stack([z, -a[..., 2], a[..., 1]], -1),
                        torch.stack([a[..., 2], z, -a[..., 0]], -1),
                        torch.stack([-a[..., 1], a[..., 0], z], -1)], -2)


def rodrigues(w: torch.Tensor) -> torch.Tensor:
    """Axis-angle [..., 3] -> rotation matrices [..., 3, 3]."""
    theta = w.norm(dim=-1, keepdim=True)[..., None].clamp(min=1e-12)
    k = _skew(w) / theta
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand(k.shape)
    return eye + torch.sin(theta) * k + (1 - torch.cos(theta)) * (k @ k)


def winding_number(points: torch.Tensor, v: torch.Tensor, f: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Approximate generalised winding number of `points` [P,3] w.r.t. the mesh (v, f): every
    face is a dipole (area vector at its centroid). ≈1 inside a closed surface, ≈0 outside;
    accurate away from the surface (further than a face size), which is all it is used for."""
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    centre = (a + b + c) / 3.0
    area_vec = 0.5 * torch.cross(b - a, c - a, dim=1)                   # [F, 3]
    out = []
    for s in range(0, points.shape[0], chunk):
        d = centre[None] - points[s:s + chunk, None]                    # [p, F, 3]
        r3 = d.norm(dim=-1).clamp(min=1e-12) ** 3
        out.append(((d * area_vec[None]).sum(-1) / r3).sum(1) / (4.0 * math.pi))
    return torch.cat(out) if out else points.new_zeros(0)


def interior_points(rest: torch.Tensor, faces: torch.Tensor, spacing: float, max_points: int) -> torch.Tensor:
    """Points of a grid (cell `spacing`) inside the closed parts of the mesh and at least half a
    cell from its surface. Open sheets and parts thinner than a cell get none."""
    lo, hi = rest.min(0).values, rest.max(0).values
    for _ in range(4):                                    # coarser cells until the grid is small enough
        if bool(((hi - lo) < spacing).any()):             # flat or thinner than a cell: no interior
            return rest.new_zeros(0, 3)
        axes = [torch.arange(float(lo[i]) + 0.5 * spacing, float(hi[i]), spacing, dtype=rest.dtype,
                             device=rest.device) for i in range(3)]
        if axes[0].numel() * axes[1].numel() * axes[2].numel() <= 8 * max_points:
            break
        spacing *= 1.5
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    _, depth = PointGrid(rest).query(grid)
    grid = grid[depth >= 0.5 * spacing]
    if grid.shape[0] == 0:
        return grid
    inside = winding_number(grid, rest, faces) > 0.6
    grid = grid[inside]
    if grid.shape[0] > max_points:
        grid = grid[farthest_point_sampling(grid, max_points)]
    return grid


class SurfacePaths:
    """Distances along a mesh's surface from seed vertices, measured on a coarse version of it (vertex
    clusters that keep facing sides apart, see `cluster_labels`) when the mesh is large: the
    resolution only has to tell a short way along the surface from a long way round."""

    def __init__(self, v: torch.Tensor, faces: torch.Tensor, reach: float, coarse_vertices: int = 3000):
        edges = unique_edges(faces)
        if v.shape[0] > coarse_vertices:
            labels, count = cluster_labels(v, faces, coarse_vertices)
            size = torch.zeros(count, dtype=v.dtype, device=v.device).index_add_(0, labels, torch.ones_like(v[:, 0]))
            self.points = torch.zeros(count, 3, dtype=v.dtype, device=v.device).index_add_(0, labels, v) / size[:, None]
            e = labels[edges]
            edges = unique_pairs(torch.sort(e[e[:, 0] != e[:, 1]], dim=1).values)
        else:
            labels, self.points = torch.arange(v.shape[0], device=v.device), v
        self.labels, self.edges, self.reach = labels, edges, reach
        self.to_point = (v - self.points[labels]).norm(dim=1)             # vertex to its cluster [V]

    def from_seeds(self, vertex: torch.Tensor, column: torch.Tensor, distance: torch.Tensor,
                   columns: int) -> torch.Tensor:
        """Column c's distance from its seeds (vertex[s], starting at distance[s]) at every coarse
        point [P, columns]; `at` reads them off for vertices."""
        return path_distances(self.points, self.edges, self.labels[vertex], column,
                              distance + self.to_point[vertex], columns, self.reach)

    def at(self, rows: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """Distances [R, columns] of the vertices `rows` from coarse distances [P, columns]."""
        return coarse[self.labels[rows]] + self.to_point[rows, None]

    def unreached(self, coarse: torch.Tensor) -> torch.Tensor:
        """Vertices [V] bool that no column reaches."""
        return torch.isinf(coarse).all(1)[self.labels]


DETOUR = 2.0          # a node counts as near when the surface path is at most this times the straight line
AXIS_RADIUS = 2.0     # a node's limb axis comes from the surface within this many node spacings


class DeformationGraph:
    """Nodes on the surface (farthest-point samples of the rest vertices) and, where the mesh
    encloses a volume, inside it (a grid), so the graph bends and twists like a solid instead of
    letting the surface slide over itself.

    Nearness is measured along the surface, not through space: a vertex follows the K nodes nearest
    to it along the mesh (an interior node reaches the surface around it first), so parts that come
    close without being connected there (two legs, an arm at the body, separate objects) do not drag
    each other. Nodes are neighbours when they influence a common vertex; interior nodes also with
    nodes within ~1.75 grid cells that reach a common stretch of surface.

    On a limb (a tube-like part: the surface normals near a node all lie across one direction, its
    axis) the regulariser ties a node to neighbours along the axis with `axial_stiffness` (< 1)
    times the weight it gives neighbours across it: cross-sections stay rigid while the limb bends
    or twists, and the stretch and squeeze a bend puts along it (outside and inside) is cheap, so
    the fit no longer avoids it by sliding the surface along the limb. Elsewhere (spheres, flat or
    blobby parts) every direction weighs the same.

    Vertices weigh interior nodes as if they were `core_binding` times nearer than they are, so the
    surface is carried by the body's core (as skin by bones) instead of by the surface nodes around it
    alone, which can slide over the core where the surface cannot see it (on a capsule: ~3 % of the
    vertices' weight on interior nodes without it, ~60 % at 3). Sheets and parts thinner than a node
    spacing have no interior nodes and are unaffected."""

    def __init__(self, rest: torch.Tensor, faces: torch.Tensor, nodes: int = 256, neighbours: int = 4,
                 interior: bool = True, axial_stiffness: float = 1.0, core_binding: float = 1.0,
                 extra_nodes: int = 64, chunk: int = 65536):
        self.rest = rest
        normals = vertex_normals(rest, faces)
        idx = farthest_point_sampling(rest, nodes)
        area = float(face_areas(rest, faces).sum())
        diag = float((rest.max(0).values - rest.min(0).values).norm())
        self.spacing = max((area / idx.shape[0]) ** 0.5, 1e-6 * diag)
        paths = SurfacePaths(rest, faces, reach=3.0 * self.spacing)

        def from_vertices(vertices: torch.Tensor) -> torch.Tensor:
            cols = torch.arange(vertices.shape[0], device=rest.device)
            return paths.from_seeds(vertices, cols, torch.zeros_like(cols, dtype=rest.dtype), vertices.shape[0])

        coarse = from_vertices(idx)                                         # [P, N_surface]
        # a part no node reaches (a separate piece between the samples) gets nodes of its own
        for _ in range(extra_nodes):
            lost = torch.nonzero(paths.unreached(coarse))[:, 0]
            if lost.numel() == 0:
                break
            idx = torch.cat([idx, lost[:1]])
            coarse = torch.cat([coarse, from_vertices(lost[:1])], 1)
        surface_nodes = rest[idx]
        inner = rest.new_zeros(0, 3)
        if interior and faces.shape[0] and surface_nodes.shape[0] >= 8:
            inner = interior_points(rest, faces, self.spacing, max_points=surface_nodes.shape[0] // 2)
        if inner.shape[0]:
            # an interior node starts from the surface around it: vertices not much further than its
            # nearest that face away from it (the node is behind them, inside; not another part's)
            d = torch.cdist(inner, rest)                                     # [N_in, V]
            facing_away = (rest * normals).sum(1)[None] - inner @ normals.T > 0   # (v − node)·n_v > 0
            col, vert = torch.nonzero((d <= 1.25 * d.min(1, keepdim=True).values) & facing_away, as_tuple=True)
            coarse = torch.cat([coarse, paths.from_seeds(vert, col, d[col, vert], inner.shape[0])], 1)
        self.nodes = torch.cat([surface_nodes, inner])                     # [N, 3]
        self.num_surface = surface_nodes.shape[0]
        self.num_nodes = n = self.nodes.shape[0]
        k = min(neighbours, n)

        near, weights, shared = [], [], torch.zeros(inner.shape[0], n, dtype=torch.bool, device=rest.device)
        moments = torch.zeros(n, 3, 3, dtype=rest.dtype, device=rest.device)
        count = torch.zeros(n, dtype=rest.dtype, device=rest.device)
        for s in range(0, rest.shape[0], chunk):
            rows = torch.arange(s, min(s + chunk, rest.shape[0]), device=rest.device)
            dist = self._node_distances(rest[rows], paths.at(rows, coarse))
            near_k, w = self._blend_weights(torch.cat([dist[:, :self.num_surface],
                                                       dist[:, self.num_surface:] / core_binding], 1),
                                            k, paths.reach)
            near.append(near_k)
            weights.append(w)
            if inner.shape[0]:                                            # nodes reaching common vertices
                touches = torch.isfinite(dist).to(rest.dtype)
                shared |= (touches[:, self.num_surface:].T @ touches) > 0
            around = (dist <= AXIS_RADIUS * self.spacing).to(rest.dtype)    # [R, N] surface near each node
            moments += torch.einsum("rn,ra,rb->nab", around, normals[rows], normals[rows])
            count += around.sum(0)
        self.near = torch.cat(near)                                       # [V, K]
        self.weights = torch.cat(weights)                                 # [V, K]
        self.offset = rest[:, None, :] - self.nodes[self.near]            # v_i − g_k  [V, K, 3]
        self._connect(k, inner, shared, *self._axes(moments / count.clamp(min=1)[:, None, None]),
                      axial_stiffness)

    def _node_distances(self, v: torch.Tensor, along: torch.Tensor) -> torch.Tensor:
        """[R, N] distance of vertices v [R, 3] to every node through space, inf for nodes the surface
        path (`along`, [R, N]) takes a long way round to (across a tube: π/2 times the straight
        line; to the other leg: inf). A vertex every node is a long way round from (a crumpled spot)
        keeps the surface paths; one no node reaches at all (beyond extra_nodes), the straight lines."""
        straight = torch.cdist(v, self.nodes)
        near_enough = along <= DETOUR * straight + 0.5 * self.spacing
        dist = torch.where(near_enough, straight, torch.full_like(straight, float("inf")))
        lost = ~near_enough.any(1)
        dist[lost] = torch.where(torch.isfinite(along[lost]).any(1, keepdim=True), along[lost], straight[lost])
        return dist

    @staticmethod
    def _blend_weights(dist: torch.Tensor, k: int, reach: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The k nearest nodes [R, k] and their weights [R, k] (zero for unreachable ones, rows sum
        to one): (1 − d / d_(k+1))², d_(k+1) the next node's distance (or `reach`)."""
        n = dist.shape[1]
        near_d, near = torch.topk(dist, min(k + 1, n), largest=False)
        radius = near_d[:, k:k + 1] if n > k else near_d.new_full((near_d.shape[0], 1), float("inf"))
        radius = torch.where(torch.isfinite(radius), radius, near_d.new_tensor(reach)).clamp(min=1e-20)
        near_d, near = near_d[:, :k], near[:, :k]
        w = torch.where(torch.isfinite(near_d), (1 - near_d / radius).clamp(min=0) ** 2 + 1e-8,
                        torch.zeros_like(near_d))
        return near, w / w.sum(1, keepdim=True)

    def _connect(self, k: int, inner: torch.Tensor, shared: torch.Tensor, axis: torch.Tensor,
                 tubular: torch.Tensor, axial_stiffness: float) -> None:
        """Regulariser edges: nodes influencing a common vertex, and interior nodes with nodes within
        ~1.75 grid cells that reach a common vertex (`shared` [N_in, N]); and their weights."""
        a = self.near[:, :, None].expand(-1, k, k).reshape(-1)
        b = self.near[:, None, :].expand(-1, k, k).reshape(-1)
        active = self.weights > 0
        both = (active[:, :, None] & active[:, None, :]).reshape(-1)
        pairs = [torch.stack([a, b], 1)[(a != b) & both]]
        if inner.shape[0]:
            dn = torch.cdist(inner, self.nodes)
            ii, jj = torch.nonzero((dn <= 1.75 * self.spacing) & shared, as_tuple=True)
            ii = ii + self.num_surface
            keep = ii != jj
            pairs += [torch.stack([ii[keep], jj[keep]], 1), torch.stack([jj[keep], ii[keep]], 1)]
        pairs = unique_pairs(torch.cat(pairs))
        self.edge_j, self.edge_k = pairs[:, 0], pairs[:, 1]
        # along a limb's axis, neighbours are tied more loosely than across it (see the class notes)
        direction = torch.nn.functional.normalize(self.nodes[self.edge_k] - self.nodes[self.edge_j], dim=1)
        along = (direction * axis[self.edge_j]).sum(1) ** 2 * tubular[self.edge_j]
        self.edge_weight = 1.0 - (1.0 - axial_stiffness) * along           # [E]

    @staticmethod
    def _axes(normal_moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From Σ n nᵀ of the surface normals near each node [N, 3, 3]: the direction they vary least
        in (a limb's axis) [N, 3] and how clearly there is one [N] (1 on a tube; 0 on a sphere or a
        flat patch, where no direction stands out)."""
        values, vectors = torch.linalg.eigh(normal_moments)                # ascending
        tubular = torch.where(values[:, 1] > 0.02, 1.0 - values[:, 0] / values[:, 1].clamp(min=1e-12),
                              torch.zeros_like(values[:, 1]))
        return vectors[:, :, 0], tubular.clamp(0.0, 1.0)

    def restricted(self, rows: torch.Tensor) -> "DeformationGraph":
        """The same nodes and regulariser, driving only the vertices `rows` (a data subsample)."""
        sub = copy.copy(self)
        sub.near, sub.weights, sub.offset = self.near[rows], self.weights[rows], self.offset[rows]
        return sub

    def identity_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.num_nodes
        eye = torch.eye(3, dtype=self.rest.dtype, device=self.rest.device)
        return eye.expand(n, 3, 3).clone(), torch.zeros(n, 3, dtype=self.rest.dtype, device=self.rest.device)

    def apply(self, rot: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
        """Deformed vertex positions [V, 3] for node rotations [N,3,3] and translations [N,3]."""
        local = torch.einsum("vkab,vkb->vka", rot[self.near], self.offset)
        moved = local + self.nodes[self.near] + trans[self.near]
        return (self.weights[..., None] * moved).sum(1)

    def gauss_newton_step(self, rot, trans, x, data, rhs, stiffness: float, kept: torch.Tensor,
                          damping: float = 1e-4, max_turn: float = 0.3):
        """One damped Gauss-Newton step on data(x) + stiffness · regulariser. Returns (rot, trans).
        kept: the edge vectors e_jk [E, 3] the regulariser keeps (rest: g_k − g_j)."""
        n, dt, dev = self.num_nodes, x.dtype, x.device
        eye = torch.eye(3, dtype=dt, device=dev)
        # Jacobian of x_i w.r.t. (δω_k, δt_k): [V, K, 3, 6]
        a = torch.einsum("vkab,vkb->vka", rot[self.near], self.offset)
        jac = torch.cat([-_skew(a), eye.expand(a.shape[:-1] + (3, 3))], -1) * self.weights[..., None, None]
        grad_x = torch.einsum("vab,vb->va", data, x) - rhs                     # [V, 3]
        dj = torch.einsum("vab,vkbc->vkac", data, jac)                         # D_i J_ik  [V,K,3,6]
        hess_blocks = torch.einsum("vkab,vlac->vklbc", jac, dj)                # [V,K,K,6,6]
        pair = (self.near[:, :, None] * n + self.near[:, None, :]).reshape(-1)
        hess = torch.zeros(n * n, 6, 6, dtype=dt, device=dev)
        hess.index_add_(0, pair, hess_blocks.reshape(-1, 6, 6))
        grad = torch.zeros(n, 6, dtype=dt, device=dev)
        grad.index_add_(0, self.near.reshape(-1), torch.einsum("vkab,va->vkb", jac, grad_x).reshape(-1, 6))

        # regulariser residuals r = R_j e_jk + g_j + t_j − g_k − t_k
        j, kk = self.edge_j, self.edge_k
        b = torch.einsum("eab,eb->ea", rot[j], kept)
        res = b + self.nodes[j] + trans[j] - self.nodes[kk] - trans[kk]
        jj = torch.cat([-_skew(b), eye.expand(b.shape[:-1] + (3, 3))], -1)     # wrt node j  [E,3,6]
        jk = torch.cat([torch.zeros_like(jj[..., :3]), -eye.expand(b.shape[:-1] + (3, 3))], -1)
        s = stiffness * self.edge_weight
        for (ja, ia) in ((jj, j), (jk, kk)):
            grad.index_add_(0, ia, s[:, None] * torch.einsum("eab,ea->eb", ja, res))
            for (jb, ib) in ((jj, j), (jk, kk)):
                hess.index_add_(0, ia * n + ib, s[:, None, None] * torch.einsum("eab,eac->ebc", ja, jb))

        h = hess.reshape(n, n, 6, 6).permute(0, 2, 1, 3).reshape(6 * n, 6 * n)
        g = grad.reshape(-1)
        diag = torch.diagonal(h).clone()
        before = self.energy(rot, trans, data, rhs, stiffness, kept)
        # Levenberg-Marquardt: accept only steps that lower the (fixed-correspondence) energy
        for attempt in range(6):
            lm = damping * 10.0 ** attempt
            chol, info = torch.linalg.cholesky_ex(h + torch.diag(lm * diag.mean() + lm * diag))
            if int(info) != 0:
                continue
            step = torch.cholesky_solve(-g[:, None], chol)[:, 0].reshape(n, 6)
            if not torch.isfinite(step).all():
                continue
            turn = float(step[:, :3].norm(dim=1).max())
            if turn > max_turn:                       # never rotate a node more than this per step
                step = step * (max_turn / turn)
            new_rot = rodrigues(step[:, :3]) @ rot
            new_trans = trans + step[:, 3:]
            if self.energy(new_rot, new_trans, data, rhs, stiffness, kept) <= before:
                return new_rot, new_trans
        return rot, trans

    def energy(self, rot, trans, data, rhs, stiffness: float, kept: torch.Tensor) -> float:
        """Data quadratic (correspondences held fixed, constant dropped) + stiffness · regulariser."""
        x = self.apply(rot, trans)
        e_data = (torch.einsum("vab,vb->va", data, x) * x).sum() - 2.0 * (rhs * x).sum()
        return float(e_data) + stiffness * self.regulariser_energy(rot, trans, kept)

    def regulariser_energy(self, rot, trans, kept: torch.Tensor) -> float:
        """Σ_e w_e |R_j e_jk + g_j + t_j − g_k − t_k|² over the regulariser's edges."""
        j, k = self.edge_j, self.edge_k
        res = (torch.einsum("eab,eb->ea", rot[j], kept) + self.nodes[j] + trans[j]
               - self.nodes[k] - trans[k])
        return float((self.edge_weight * (res * res).sum(1)).sum())
