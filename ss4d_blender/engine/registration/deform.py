"""Non-rigid fit of one mesh (fixed topology) to a target surface.

Energy, minimised by alternating local/global steps (as-rigid-as-possible style):

    E(x) = Σ_i c_i · [ (n_i·(x_i − p_i))² + μ |x_i − p_i|² ]         data: forward (vertex → target)
         + Σ_k c_k · [ (m_k·(x_{i_k} − q_k))² + μ |x_{i_k} − q_k|² ]   data: reverse (target → vertex)
         + λ_r Σ_(i,j) |(x_i − x_j) − ½(R_i + R_j)(v_i − v_j)|²       rigidity (ARAP, R_i per vertex)
         + λ_e Σ_(i,j) |(x_i − x_j) − l_ij d_ij|²                       edge length (l_ij rest length)
         + ε |x − x_prev|²                                               damping
         + Σ_i w_i |c_p + G_p (x_i − p) − c_i|²                          colour (coloured meshes)

v are the rest (reference) positions. Local step: nearest-point correspondences, the best
rotation per vertex (SVD), edge directions d_ij. Global step: the normal equations, a sparse
symmetric positive definite system in all 3V unknowns (point-to-plane couples x, y, z), solved by
block-Jacobi preconditioned conjugate gradients warm-started from the current positions.

Coarse to fine: first an embedded deformation graph (a few hundred nodes, each with a rotation
and a translation, blended smoothly onto the vertices; Gauss-Newton, see graph.py) whose
regulariser keeps mostly the previous frame's shape; then the solver above on every vertex,
keeping the graph result's local shape, to settle the surface onto the target.

The colour term asks each vertex to sit where the frame has the vertex's own colour c_i (the
frame's colour field linearised at the nearest sample p, gradient G_p along the surface): it
pins the slides along the surface that shape alone cannot see (see `Deformer._color_term`).
Both stages use it; the graph stage at full weight, the per-vertex stage at a share.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .geometry import MeshNeighbours, face_areas, sample_surface, smooth_vertex_colors, vertex_normals
from .graph import DeformationGraph
from .knn import PointGrid


@dataclass
class FitSettings:
    iterations: int = 10
    stiffness: tuple = (8.0, 4.0, 2.0, 1.0, 0.5)   # λ_r per iteration (last value repeats)
    edge_weight: float = 0.5                        # λ_e relative to λ_r
    point_weight: float = 0.02                      # μ: point-to-point share of the data term
    reverse_weight: float = 1.0                     # reverse term, total weight relative to forward
    normal_cos: float = 0.3                         # reject pairs whose normals disagree more
    max_distance: float = 0.1                       # reject pairs further than this × diagonal
    damping: float = 1e-3
    cg_iterations: int = 25
    cg_tolerance: float = 1e-6
    converge: float = 2e-5                          # stop when no vertex moves more (× diagonal)
    graph_converge: float = 2e-4                    # the same for a Gauss-Newton step of the graph
    graph_nodes: int = 160                          # coarse stage: surface nodes, at most
    vertices_per_node: int = 10                     # one per this many vertices (small meshes)
    graph_iterations: int = 5                       # Gauss-Newton steps per frame
    graph_stiffness: float = 1.0                    # graph regulariser weight (scaled by V/edges)
    fine_stiffness: tuple = (1.0, 0.5)         # fine stage: λ_r schedule after the graph
    fine_iterations: int = 3
    graph_vertices: int = 3000                      # vertices (random subset) driving the graph stage
    interior_nodes: bool = True                     # graph nodes inside closed volumes too
    rest_share: float = 0.1                         # graph keeps the previous frame's shape, blended
                                                    # with this share of the rest shape
    axial_stiffness: float = 0.1                    # graph ties along a limb's axis this much (vs across)
    core_binding: float = 3.0                       # vertices weigh interior nodes as if this much nearer
    color_weight: float = 1.0                       # colour term (coloured meshes): pull along the surface
    fine_color_share: float = 0.3                   # ... of it in the fine stage (per vertex: noisier)
    color_blur: float = 0.05                        # colours smoothed over about this × diagonal first


# the colour term is trusted half when the typical colour mismatch at the matches is this share of the
# frame's colour variation (clean, consistent colours: ~0.02; per-vertex noise of 0.05: ~0.2; unrelated: ~1.6)
COLOR_TRUST = 0.3


class Target:
    """One frame's surface prepared for fitting: area-uniform samples with normals in a grid, and with
    colours and colour gradients when the frame has vertex colours [V, 3] (as `color_features`, smoothed
    over about `blur`, a length: `Deformer.color_blur`, so that all frames and the reference are
    smoothed alike)."""

    def __init__(self, v: torch.Tensor, f: torch.Tensor, samples: int, generator: torch.Generator,
                 colors: Optional[torch.Tensor] = None, blur: float = 0.0):
        self.v, self.f = v, f
        if colors is not None:
            colors = smooth_vertex_colors(v, f, color_features(colors), blur)
        found = sample_surface(v, f, samples, generator, colors)
        self.points, self.normals = found.points, found.normals
        self.colors, self.color_gradients = found.colors, found.color_gradients
        area = float(face_areas(v, f).sum())
        self.spacing = (area / max(self.points.shape[0], 1)) ** 0.5
        self.grid = PointGrid(self.points, cell=2.0 * self.spacing)
        self.color_scale = self.color_stats = None
        if self.color_gradients is not None:
            self.color_stats = color_statistics(self.colors)
            # a typical gradient: the colour term is scaled so that it pulls along the surface like the
            # point-to-plane term pulls across it where the colour changes this fast; a gradient below
            # a colour change of 0.05 over the whole surface's extent counts as no pattern at all
            extent = float((v.max(0).values - v.min(0).values).norm()) or 1.0
            g2 = (self.color_gradients ** 2).sum((1, 2))[::max(1, self.points.shape[0] // 100_000)]
            floor = (0.05 / extent) ** 2
            self.color_scale = max(float(torch.quantile(g2, 0.5)), floor)


LUMINANCE_SHARE = 0.3     # weight of brightness among the colour features (chromaticity weighs 1)


def color_features(rgb: torch.Tensor) -> torch.Tensor:
    """What the colour term compares [V, 4]: chromaticity, rgb / (its mean + 0.05) (hue and saturation;
    lighting that brightens or darkens a spot, like shading that changes as a limb turns, leaves it
    alone), and a little of the brightness itself (so grey patterns still count)."""
    brightness = rgb.mean(1, keepdim=True)
    return torch.cat([0.5 * rgb / (brightness + 0.05), LUMINANCE_SHARE * brightness], 1)


def color_statistics(colors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation [C] of colours sampled evenly over a surface."""
    return colors.mean(0), colors.std(0) if colors.shape[0] > 1 else torch.zeros_like(colors[0])


def _block_inverse(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.inv(m)


def best_rotations(cov: torch.Tensor) -> torch.Tensor:
    """Closest rotation R maximising tr(R cov) per [3,3] block: cov = U S Vᵀ -> R = V Uᵀ."""
    u, _, vh = torch.linalg.svd(cov)
    r = vh.transpose(1, 2) @ u.transpose(1, 2)
    flip = torch.det(r) < 0
    if flip.any():
        vh = vh.clone()
        vh[flip, 2, :] *= -1
        r = vh.transpose(1, 2) @ u.transpose(1, 2)
    return r


class Deformer:
    """A mesh with fixed topology and rest shape `rest` [V, 3] that can be fitted to targets."""

    def __init__(self, rest: torch.Tensor, faces: torch.Tensor, settings: Optional[FitSettings] = None,
                 colors: Optional[torch.Tensor] = None):
        """colors: the reference mesh's vertex colours [V, 3] (the material's own, which travel with it);
        with them, frames that have colours are fitted by colour as well as by shape."""
        self.rest, self.faces = rest, faces
        self.settings = settings or FitSettings()
        extent = float((rest.max(0).values - rest.min(0).values).norm())
        self.diag = extent or 1.0
        # colours are smoothed over a length (the same for every frame), then compared as the frames' are
        self.color_blur = self.settings.color_blur * extent
        self.neighbours = MeshNeighbours(faces, rest.shape[0], rest.dtype)
        self.colors = None if colors is None else smooth_vertex_colors(
            rest, faces, color_features(colors.to(rest.dtype)), self.color_blur, neighbours=self.neighbours)
        if self.colors is not None:
            self.color_stats = color_statistics(sample_surface(rest, faces, max(2 * rest.shape[0], 2000),
                                                               torch.Generator().manual_seed(0), self.colors).colors)
        self.src, self.dst, self.degree = self.neighbours.src, self.neighbours.dst, self.neighbours.degree
        self.rest_edge = rest[self.src] - rest[self.dst]                 # [2E, 3]
        self.rest_length = self.rest_edge.norm(dim=1)
        nv = rest.shape[0]
        self.mean_edge = float(self.rest_length.mean()) if self.rest_length.numel() else self.diag
        nodes = min(self.settings.graph_nodes, max(48, nv // self.settings.vertices_per_node))
        self.graph = DeformationGraph(rest, faces, nodes, interior=self.settings.interior_nodes,
                                      axial_stiffness=self.settings.axial_stiffness,
                                      core_binding=self.settings.core_binding)
        if nv > self.settings.graph_vertices:
            pick = torch.randperm(nv, generator=torch.Generator().manual_seed(0))[:self.settings.graph_vertices]
            self.graph_rows = torch.sort(pick).values.to(rest.device)
        else:
            self.graph_rows = torch.arange(nv, device=rest.device)
        self.graph_data = self.graph.restricted(self.graph_rows)

    # ---- linear algebra -------------------------------------------------------------------
    def laplacian(self, x: torch.Tensor) -> torch.Tensor:
        """(L x)_i = Σ_j (x_i − x_j) over mesh neighbours j."""
        return self.degree[:, None] * x - self.neighbours.sum(x)

    def _solve(self, rhs: torch.Tensor, x0: torch.Tensor, lam: float, data: torch.Tensor,
               damping: float) -> torch.Tensor:
        """Solve (λ L ⊗ I3 + blockdiag(data) + ε I) x = rhs by preconditioned CG."""
        s = self.settings
        eye = torch.eye(3, dtype=x0.dtype, device=x0.device)

        def apply(x):
            return lam * self.laplacian(x) + torch.einsum("vab,vb->va", data, x) + damping * x

        precond = _block_inverse(data + (lam * self.degree + damping)[:, None, None] * eye)
        x = x0.clone()
        r = rhs - apply(x)
        z = torch.einsum("vab,vb->va", precond, r)
        p = z.clone()
        rz = (r * z).sum()
        norm_b = float(rhs.norm()) or 1.0
        for _ in range(s.cg_iterations):
            ap = apply(p)
            alpha = rz / (p * ap).sum().clamp(min=1e-30)
            x = x + alpha * p
            r = r - alpha * ap
            if float(r.norm()) < s.cg_tolerance * norm_b:
                break
            z = torch.einsum("vab,vb->va", precond, r)
            rz_new = (r * z).sum()
            p = z + (rz_new / rz.clamp(min=1e-30)) * p
            rz = rz_new
        return x

    # ---- one fit ----------------------------------------------------------------------------
    def correspondences(self, x: torch.Tensor, target: Target, rows: Optional[torch.Tensor] = None
                        ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Data blocks D [V,3,3] and right-hand sides d [V,3] of the data term (for the vertices
        `rows` only when given: [R,3,3], [R,3]). x: all vertex positions [V, 3]."""
        s = self.settings
        eye = torch.eye(3, dtype=x.dtype, device=x.device)
        normals = vertex_normals(x, self.faces)
        if rows is not None:
            x, normals = x[rows], normals[rows]
        nv = x.shape[0]
        max_d = s.max_distance * self.diag

        # forward: every vertex to its nearest target sample
        j, d = target.grid.query(x, exact=False)
        n_t = target.normals[j]
        p = target.points[j]
        ok = ((normals * n_t).sum(1) > s.normal_cos) & (d < max_d)
        scale = torch.quantile(d[ok], 0.5) * 3.0 + target.spacing if ok.any() else torch.tensor(max_d)
        c = ok.to(x.dtype) / (1.0 + (d / scale) ** 2)
        block = n_t[:, :, None] * n_t[:, None, :] + s.point_weight * eye
        data = c[:, None, None] * block
        rhs = torch.einsum("vab,vb->va", data, p)

        # reverse: target samples to their nearest vertex (pulls the mesh into parts it misses); a
        # subset of about two per vertex when fitting a subset of the vertices (the graph stage)
        if s.reverse_weight > 0:
            src_grid = PointGrid(x, cell=1.5 * self.mean_edge * (self.rest.shape[0] / nv) ** 0.5)
            stride = max(1, target.points.shape[0] // (2 * nv)) if rows is not None else 1
            points, m = target.points[::stride], target.normals[::stride]   # they run face by face: spread
            i, d_r = src_grid.query(points, exact=False)
            ok_r = ((normals[i] * m).sum(1) > s.normal_cos) & (d_r < max_d)
            w = s.reverse_weight * nv / max(points.shape[0], 1)
            c_r = w * ok_r.to(x.dtype) / (1.0 + (d_r / scale) ** 2)
            block_r = c_r[:, None, None] * (m[:, :, None] * m[:, None, :] + s.point_weight * eye)
            data = data.index_add(0, i, block_r)
            rhs = rhs.index_add(0, i, torch.einsum("kab,kb->ka", block_r, points))
        if s.color_weight > 0 and self.colors is not None and target.colors is not None:
            block_c, rhs_c = self._color_term(x, c, j, target, rows)
            data, rhs = data + block_c, rhs + rhs_c
        stats = {"matched": float(ok.float().mean())}
        return data, rhs, stats

    def _color_term(self, x: torch.Tensor, weight: torch.Tensor, j: torch.Tensor, target: Target,
                    rows: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Data blocks [R,3,3] and right-hand sides [R,3] asking every vertex to sit where the target
        has its colour: the target's colour near the vertex's nearest sample p, linearised along the
        surface, c_p + G_p (x − p), should equal the vertex's own colour c_i:
            w_i |G_p x − (c_i − c_p + G_p p)|².
        G_p has no component across the surface, so this only moves vertices along it: it pins what
        the surface cannot see (a tube sliding along itself, a ball turning, a bulge travelling along
        a body). Per-vertex colour noise would jitter single vertices, so the fine stage uses a share
        `fine_color_share` of the weight; the graph stage averages it over many vertices per node.
        Robustness: `weight` carries the geometric match's robust weight; colour residuals far above
        the typical one (a different colour, not a small slide) are down-weighted; one sample's pull
        is capped at 4x the typical (a sharp colour edge on a sliver face would otherwise dominate);
        and the whole term fades out when the colours do not agree overall (`COLOR_TRUST`), so
        colours unrelated between frames leave the fit as it is without them."""
        own = self.colors if rows is None else self.colors[rows]
        # the frame's overall brightness and contrast per channel may differ (lighting, exposure):
        # compare after matching the reference's colour statistics to the frame's
        (mean_r, std_r), (mean_t, std_t) = self.color_stats, target.color_stats
        gain = (std_t / std_r.clamp(min=0.02)).clamp(0.5, 2.0)
        own = (own - mean_r) * gain + mean_t
        grad, colour, p = target.color_gradients[j], target.colors[j], target.points[j]
        residual = colour + torch.einsum("vca,va->vc", grad, x - p) - own            # [R, C]
        r = residual.norm(dim=1)
        used = weight > 0
        typical = float(torch.quantile(r[used], 0.5)) if bool(used.any()) else float("inf")
        spread = 3.0 * typical + 0.02
        mismatch = typical / max(float(std_t.norm()), 1e-6)
        trust = 1.0 / (1.0 + (mismatch / COLOR_TRUST) ** 4)
        g2 = (grad ** 2).sum((1, 2))
        cap = (4.0 * target.color_scale / g2.clamp(min=1e-30)).clamp(max=1.0)
        share = 1.0 if rows is not None else self.settings.fine_color_share
        w = (self.settings.color_weight * share * trust / target.color_scale) * weight * cap / (1.0 + (r / spread) ** 2)
        block = w[:, None, None] * torch.einsum("vca,vcb->vab", grad, grad)
        aim = own - colour + torch.einsum("vca,va->vc", grad, p)
        rhs = w[:, None] * torch.einsum("vca,vc->va", grad, aim)
        return block, rhs

    def fit(self, x: torch.Tensor, target: Target, stiffness: Optional[tuple] = None,
            iterations: Optional[int] = None, shape: Optional[torch.Tensor] = None
            ) -> tuple[torch.Tensor, dict]:
        """Fit from start positions x [V, 3]; returns the new positions and a few statistics.
        shape: positions [V, 3] whose local shape the rigidity term keeps (default: the rest)."""
        s = self.settings
        if shape is None:
            rest_edge, rest_length = self.rest_edge, self.rest_length
        else:
            rest_edge = shape[self.src] - shape[self.dst]
            rest_length = rest_edge.norm(dim=1)
        stiffness = stiffness or s.stiffness
        iterations = s.iterations if iterations is None else iterations
        stats = {}
        for it in range(iterations):
            lam_r = float(stiffness[min(it, len(stiffness) - 1)])
            lam_e = lam_r * s.edge_weight
            data, rhs_data, stats = self.correspondences(x, target)
            # local step: rotations and edge directions
            cur_edge = x[self.src] - x[self.dst]
            cov = torch.zeros(x.shape[0], 3, 3, dtype=x.dtype, device=x.device)
            cov = cov.index_add(0, self.src, rest_edge[:, :, None] * cur_edge[:, None, :])
            rot = best_rotations(cov)
            rot_edge = 0.5 * torch.einsum("eab,eb->ea", rot[self.src] + rot[self.dst], rest_edge)
            dir_edge = torch.nn.functional.normalize(cur_edge, dim=1, eps=1e-20) * rest_length[:, None]
            target_edge = (lam_r * rot_edge + lam_e * dir_edge) / (lam_r + lam_e)
            rhs_rigid = torch.zeros_like(x).index_add(0, self.src, target_edge)
            lam = lam_r + lam_e
            damping = s.damping * lam
            rhs = lam * rhs_rigid + rhs_data + damping * x
            x_new = self._solve(rhs, x, lam, data, damping)
            step = float((x_new - x).norm(dim=1).max()) if torch.isfinite(x_new).all() else float("inf")
            if not step < 0.5 * self.diag:            # a jump across half the object: stop here
                stats["diverged"] = True
                break
            x = x_new
            stats["iterations"] = it + 1
            if it >= len(stiffness) - 1 and step < s.converge * self.diag:
                break
        return x, stats

    def kept_edge_vectors(self, rot: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
        """Edge vectors [E, 3] the graph regulariser keeps, in node j's rest frame: the shape of the
        graph state (rot, trans) — the previous frame's fit, R_jᵀ(p_k − p_j) — blended with a share
        `rest_share` of the rest shape's g_k − g_j.

        Keeping the previous frame's shape lets the strain a motion demands build up frame by frame
        (a bend compresses its inside, a wave shears). Measured against the rest alone, that strain
        is cheaper to undo by sliding the surface tangentially, which the data term cannot see (on the
        synthetic bends: 0.96–1.04 % mean correspondence error instead of 0.85–0.92 %). The rest share
        keeps per-frame noise from accumulating in the kept shape."""
        g = self.graph
        pos = g.nodes + trans
        previous = torch.einsum("eba,eb->ea", rot[g.edge_j], pos[g.edge_k] - pos[g.edge_j])
        rest = g.nodes[g.edge_k] - g.nodes[g.edge_j]
        return self.settings.rest_share * rest + (1.0 - self.settings.rest_share) * previous

    def fit_coarse_to_fine(self, state: tuple, target: Target) -> tuple[torch.Tensor, tuple, dict]:
        """Graph stage (Gauss-Newton on node rotations/translations, warm-started from `state`)
        then per-vertex refinement. Returns (positions [V,3], new graph state, statistics)."""
        s = self.settings
        g, gd, rows = self.graph, self.graph_data, self.graph_rows
        rot, trans = state
        stiffness = s.graph_stiffness * rows.shape[0] / max(g.edge_j.shape[0], 1)
        graph_steps = 0
        kept = self.kept_edge_vectors(rot, trans)
        for _ in range(s.graph_iterations):
            x_all = g.apply(rot, trans)
            data, rhs, _ = self.correspondences(x_all, target, rows)
            x = x_all[rows]
            new_rot, new_trans = gd.gauss_newton_step(rot, trans, x, data, rhs, stiffness, kept)
            if not (torch.isfinite(new_rot).all() and torch.isfinite(new_trans).all()):
                break
            step = float((gd.apply(new_rot, new_trans) - x).norm(dim=1).max())
            rot, trans = new_rot, new_trans
            graph_steps += 1
            if step < s.graph_converge * self.diag:
                break
        x_graph = g.apply(rot, trans)
        # the fine stage keeps the graph result's local shape (not the rest's): it settles the surface
        # onto the target without undoing the graph's volumetric, tangentially faithful motion
        x, stats = self.fit(x_graph, target, s.fine_stiffness, s.fine_iterations, shape=x_graph)
        if stats.get("diverged"):
            x = x_graph
        stats["diverged"] = not bool(torch.isfinite(x).all())
        stats["graph_steps"] = graph_steps
        return x, (rot, trans), stats
