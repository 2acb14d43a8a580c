"""Mesh cleanup in numpy: duplicate vertices, small floating parts, hole filling, decimation, and
topology checks (Euler characteristic, orientation).

Decimation is quadric-error-metric edge collapse (Garland & Heckbert 1997) run in parallel
rounds: every round scores all edges with the summed plane quadrics of their endpoints, keeps
the collapses that pass the link condition (no non-manifold result, topology and Euler
characteristic preserved) and do not flip or degenerate a neighbouring face, and applies the
cheapest ones whose one-ring patches do not overlap, all at once. Boundary and non-manifold
vertices are never moved. Because patches are disjoint, every collapse of a round is checked
against the mesh exactly as it will be when the collapse happens.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Union

import numpy as np

from ..types import Mesh


# ------------------------------------------------------------------------------------------ basics
def _edges_of(faces: np.ndarray) -> np.ndarray:
    """Directed half-edges [3F, 2] (a->b for each face corner, in winding order)."""
    return np.stack([faces, np.roll(faces, -1, axis=1)], axis=2).reshape(-1, 2)


def _undirected(faces: np.ndarray, num_vertices: int):
    """Unique undirected edges [E, 2] (a < b), and for each edge the number of faces using it."""
    he = _edges_of(faces).astype(np.int64)
    lo, hi = np.minimum(he[:, 0], he[:, 1]), np.maximum(he[:, 0], he[:, 1])
    keys, counts = np.unique(lo * num_vertices + hi, return_counts=True)
    return np.stack([keys // num_vertices, keys % num_vertices], axis=1), counts


def remove_unused_vertices(mesh: Mesh) -> Mesh:
    used = np.zeros(len(mesh.vertices), dtype=bool)
    used[mesh.faces.reshape(-1)] = True
    remap = np.cumsum(used) - 1
    return Mesh(mesh.vertices[used], remap[mesh.faces].astype(np.int32),
                None if mesh.colors is None else mesh.colors[used])


def remove_degenerate_faces(mesh: Mesh) -> Mesh:
    """Drop faces with a repeated vertex and exact duplicate faces (same vertex set)."""
    f = mesh.faces
    ok = (f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0])
    f = f[ok]
    _, first = np.unique(np.sort(f, axis=1), axis=0, return_index=True)
    return replace(mesh, faces=f[np.sort(first)].astype(np.int32))


def merge_duplicate_vertices(mesh: Mesh, tolerance: float = 1e-7) -> Mesh:
    """Weld vertices whose positions agree to ``tolerance`` (grid quantisation), then drop faces that
    became degenerate and vertices no face uses."""
    if len(mesh.vertices) == 0:
        return mesh
    q = np.round(mesh.vertices.astype(np.float64) / tolerance).astype(np.int64)
    _, first, inverse = np.unique(q, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    merged = Mesh(mesh.vertices[first], inverse[mesh.faces].astype(np.int32),
                  None if mesh.colors is None else mesh.colors[first])
    return remove_unused_vertices(remove_degenerate_faces(merged))


# ------------------------------------------------------------------------------------ topology
def euler_characteristic(mesh: Mesh) -> int:
    """V - E + F over the vertices used by faces."""
    used = np.unique(mesh.faces)
    edges, _ = _undirected(mesh.faces, len(mesh.vertices))
    return int(len(used) - len(edges) + len(mesh.faces))


def boundary_edge_count(mesh: Mesh) -> int:
    _, counts = _undirected(mesh.faces, len(mesh.vertices))
    return int((counts == 1).sum())


def is_watertight(mesh: Mesh) -> bool:
    """Every edge is shared by exactly two faces."""
    if len(mesh.faces) == 0:
        return False
    _, counts = _undirected(mesh.faces, len(mesh.vertices))
    return bool((counts == 2).all())


def is_consistently_oriented(mesh: Mesh) -> bool:
    """Every directed half-edge appears once and, where it is interior, its twin appears too
    (neighbouring faces traverse their shared edge in opposite directions)."""
    he = _edges_of(mesh.faces).astype(np.int64)
    n = len(mesh.vertices)
    keys = he[:, 0] * n + he[:, 1]
    if len(np.unique(keys)) != len(keys):
        return False
    twins = he[:, 1] * n + he[:, 0]
    _, counts = _undirected(mesh.faces, n)
    interior_twin_found = np.isin(twins, keys)
    lo, hi = np.minimum(he[:, 0], he[:, 1]), np.maximum(he[:, 0], he[:, 1])
    ukeys, inv = np.unique(lo * n + hi, return_inverse=True)
    is_interior = counts[inv.reshape(-1)] >= 2
    return bool(np.all(interior_twin_found[is_interior]))


def signed_volume(mesh: Mesh, face_mask: Optional[np.ndarray] = None) -> float:
    """Enclosed volume (positive when faces are wound counter-clockwise seen from outside)."""
    f = mesh.faces if face_mask is None else mesh.faces[face_mask]
    v = mesh.vertices.astype(np.float64)
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


def vertex_components(num_vertices: int, faces: np.ndarray) -> np.ndarray:
    """Connected-component label per vertex (vertices joined by face edges), by parallel
    union-find (hook roots to the smaller root, then pointer jumping until stable)."""
    parent = np.arange(num_vertices)
    if len(faces) == 0:
        return parent
    edges = _edges_of(faces)
    while True:
        pu, pv = parent[edges[:, 0]], parent[edges[:, 1]]
        differ = pu != pv
        if not differ.any():
            return parent
        lo, hi = np.minimum(pu[differ], pv[differ]), np.maximum(pu[differ], pv[differ])
        np.minimum.at(parent, hi, lo)
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped


def face_components(mesh: Mesh) -> np.ndarray:
    """Connected-component label per face (labels are vertex indices of the component's root)."""
    return vertex_components(len(mesh.vertices), mesh.faces)[mesh.faces[:, 0]]


def drop_small_components(mesh: Mesh, min_fraction: float) -> Mesh:
    """Keep the connected components having at least ``min_fraction`` of the largest one's faces."""
    if len(mesh.faces) == 0:
        return mesh
    labels = face_components(mesh)
    uniq, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    keep = counts[inv.reshape(-1)] >= min_fraction * counts.max()
    return remove_unused_vertices(replace(mesh, faces=mesh.faces[keep]))


def drop_inverted_components(mesh: Mesh) -> Mesh:
    """Drop closed components with negative signed volume (inner walls of cavities: their normals
    face inwards, e.g. the inside of a hollow shell)."""
    if len(mesh.faces) == 0:
        return mesh
    labels = face_components(mesh)
    uniq, inv = np.unique(labels, return_inverse=True)
    inv = inv.reshape(-1)
    v = mesh.vertices.astype(np.float64)
    f = mesh.faces
    vol = np.einsum("ij,ij->i", v[f[:, 0]], np.cross(v[f[:, 1]], v[f[:, 2]])) / 6.0
    comp_vol = np.bincount(inv, weights=vol, minlength=len(uniq))
    keep = comp_vol[inv] >= 0
    return remove_unused_vertices(replace(mesh, faces=mesh.faces[keep]))


# ---------------------------------------------------------------------------------- hole filling
def boundary_loops(mesh: Mesh) -> list[np.ndarray]:
    """Closed loops of boundary half-edges, each as the vertex sequence in the direction of the
    faces' winding. Vertices where the boundary is not a simple curve end loops early (skipped)."""
    he = _edges_of(mesh.faces).astype(np.int64)
    n = len(mesh.vertices)
    keys = he[:, 0] * n + he[:, 1]
    twins = he[:, 1] * n + he[:, 0]
    boundary = he[~np.isin(twins, keys)]
    if len(boundary) == 0:
        return []
    starts, counts = np.unique(boundary[:, 0], return_counts=True)
    simple = set(starts[counts == 1].tolist())
    nxt = {int(a): int(b) for a, b in boundary if int(a) in simple}
    loops, seen = [], set()
    for start in nxt:
        if start in seen:
            continue
        loop, cur = [], start
        while cur in nxt and cur not in seen:
            seen.add(cur)
            loop.append(cur)
            cur = nxt[cur]
        if cur == start and len(loop) >= 3:
            loops.append(np.array(loop, dtype=np.int64))
    return loops


def close_holes(mesh: Mesh, max_loop_edges: int = 64) -> Mesh:
    """Close every boundary loop of at most ``max_loop_edges`` edges: triangles and quads directly,
    longer loops with a fan around a new vertex at the loop's centroid. New faces continue the
    neighbouring faces' orientation (each boundary edge a->b gets a face using b->a)."""
    loops = [loop for loop in boundary_loops(mesh) if len(loop) <= max_loop_edges]
    if not loops:
        return mesh
    verts, cols = [mesh.vertices], [mesh.colors] if mesh.colors is not None else None
    new_faces, next_index = [mesh.faces], len(mesh.vertices)
    for loop in loops:
        if len(loop) == 3:
            new_faces.append(loop[::-1][None].astype(np.int32))
            continue
        if len(loop) == 4:
            a, b, c, d = loop[::-1]
            new_faces.append(np.array([[a, b, c], [a, c, d]], dtype=np.int32))
            continue
        centre = mesh.vertices[loop].mean(0, keepdims=True)
        verts.append(centre.astype(mesh.vertices.dtype))
        if cols is not None:
            cols.append(mesh.colors[loop].mean(0, keepdims=True).astype(mesh.colors.dtype))
        a, b = loop, np.roll(loop, -1)
        new_faces.append(np.stack([b, a, np.full_like(a, next_index)], 1).astype(np.int32))
        next_index += 1
    return Mesh(np.concatenate(verts), np.concatenate(new_faces).astype(np.int32),
                None if cols is None else np.concatenate(cols))


# ------------------------------------------------------------------------------------ decimation
def _face_normals(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    return np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])


def _plane_quadrics(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Area-weighted sum of face plane quadrics per vertex, [V, 4, 4]."""
    n = _face_normals(v, f)
    double_area = np.linalg.norm(n, axis=1)
    unit = n / np.maximum(double_area, 1e-30)[:, None]
    plane = np.concatenate([unit, -(unit * v[f[:, 0]]).sum(1, keepdims=True)], 1)    # [F, 4]
    k = plane[:, :, None] * plane[:, None, :] * (0.5 * double_area)[:, None, None]    # [F, 4, 4]
    q = np.zeros((len(v), 16))
    for corner in range(3):
        for j in range(16):
            q[:, j] += np.bincount(f[:, corner], weights=k[:, j // 4, j % 4], minlength=len(v))
    return q.reshape(-1, 4, 4)


def _csr(faces: np.ndarray, num_vertices: int):
    """Vertex -> incident faces as (pointer [V+1], face ids)."""
    flat = faces.reshape(-1)
    order = np.argsort(flat, kind="stable")
    ptr = np.zeros(num_vertices + 1, dtype=np.int64)
    ptr[1:] = np.cumsum(np.bincount(flat, minlength=num_vertices))
    return ptr, order // 3


def _expand(ptr: np.ndarray, items: np.ndarray, rows: np.ndarray):
    """For each row index, all items of that CSR row: (owner position [K], item [K])."""
    deg = ptr[rows + 1] - ptr[rows]
    owner = np.repeat(np.arange(len(rows)), deg)
    offset = np.arange(deg.sum()) - np.repeat(np.cumsum(deg) - deg, deg)
    return owner, items[np.repeat(ptr[rows], deg) + offset]


def _collapse_placement(v: np.ndarray, quadric: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where collapsing each edge [E, 2] puts the merged vertex, minimising x^T Q x over the summed
    quadrics (regularised towards the edge's midpoint), and that cost: ([E, 3], [E])."""
    u, w = edges[:, 0], edges[:, 1]
    q = quadric[u] + quadric[w]
    a, b = q[:, :3, :3], q[:, :3, 3]
    mid = 0.5 * (v[u] + v[w])
    lam = 1e-6 * np.trace(a, axis1=1, axis2=2)[:, None] + 1e-15
    x = np.linalg.solve(a + lam[:, :, None] * np.eye(3), (-b + lam * mid)[..., None])[..., 0]
    xh = np.concatenate([x, np.ones((len(x), 1))], 1)
    return x, np.einsum("ei,eij,ej->e", xh, q, xh)


class _CollapseChecks:
    """The tests a collapse of edge (u, w) to position x must pass on the mesh (v, f) of one round:
    the link condition (u and w share exactly two neighbours, which do not both form a face with u
    and with w: no non-manifold result, topology kept) and no neighbouring face flipping or
    degenerating. Built once per round; `valid` checks any subset of the round's candidates."""

    def __init__(self, v: np.ndarray, f: np.ndarray, edges: np.ndarray, edge_keys: np.ndarray,
                 min_normal_cos: float):
        """edges [E, 2] (a < b) and their keys a * V + b [E], sorted (as `_undirected` gives them)."""
        nv = len(v)
        self.v, self.f, self.nv, self.min_normal_cos = v, f, nv, min_normal_cos
        self.edge_keys = edge_keys
        both = np.concatenate([edges, edges[:, ::-1]])
        both = both[np.argsort(both[:, 0], kind="stable")]
        self.neighbour_ptr = np.zeros(nv + 1, dtype=np.int64)
        self.neighbour_ptr[1:] = np.cumsum(np.bincount(both[:, 0], minlength=nv))
        self.neighbours = both[:, 1]
        keys = np.sort(f, axis=1)
        self.face_keys = np.sort((keys[:, 0] * nv + keys[:, 1]) * nv + keys[:, 2])
        self.face_ptr, self.vertex_faces = _csr(f, nv)

    def _has_face(self, p: np.ndarray, r: np.ndarray, s: np.ndarray) -> np.ndarray:
        t = np.sort(np.stack([p, r, s], 1), axis=1)
        key = (t[:, 0] * self.nv + t[:, 1]) * self.nv + t[:, 2]
        pos = np.clip(np.searchsorted(self.face_keys, key), 0, len(self.face_keys) - 1)
        return self.face_keys[pos] == key

    def valid(self, u: np.ndarray, w: np.ndarray, x: np.ndarray) -> np.ndarray:
        """[k] bool for the collapses of edges (u[i], w[i]) to x[i]."""
        k, nv = len(u), self.nv
        owner, nb = _expand(self.neighbour_ptr, self.neighbours, u)
        other = w[owner]
        keep = nb != other
        owner, nb, other = owner[keep], nb[keep], other[keep]
        common = np.isin(np.minimum(nb, other) * nv + np.maximum(nb, other), self.edge_keys)
        ok = np.bincount(owner[common], minlength=k) == 2
        # the two common neighbours must not form a face with both u and w (tetrahedron-like case)
        co_owner, co_nb = owner[common], nb[common]
        first = np.searchsorted(co_owner, np.arange(k))                   # owner is non-decreasing
        idx = np.nonzero(ok)[0]
        a, b = co_nb[first[idx]], co_nb[first[idx] + 1]
        ok[idx[self._has_face(u[idx], a, b) & self._has_face(w[idx], a, b)]] = False

        # no neighbouring face may flip or degenerate
        o1, f1 = _expand(self.face_ptr, self.vertex_faces, u)
        o2, f2 = _expand(self.face_ptr, self.vertex_faces, w)
        owner, fid = np.concatenate([o1, o2]), np.concatenate([f1, f2])
        tri = self.f[fid]
        moves = (tri == u[owner][:, None]) | (tri == w[owner][:, None])
        survives = moves.sum(1) == 1
        owner, tri, moves = owner[survives], tri[survives], moves[survives]
        old_pts = self.v[tri]
        new_pts = np.where(moves[..., None], x[owner][:, None, :], old_pts)
        n_old = np.cross(old_pts[:, 1] - old_pts[:, 0], old_pts[:, 2] - old_pts[:, 0])
        n_new = np.cross(new_pts[:, 1] - new_pts[:, 0], new_pts[:, 2] - new_pts[:, 0])
        len_old, len_new = np.linalg.norm(n_old, axis=1), np.linalg.norm(n_new, axis=1)
        cos = (n_old * n_new).sum(1) / np.maximum(len_old * len_new, 1e-30)
        bad = (cos < self.min_normal_cos) | (len_new <= 1e-12 * np.maximum(len_old, 1e-30))
        ok[owner[bad]] = False
        return ok


def decimate(mesh: Mesh, target_faces: int, max_rounds: int = 400, min_normal_cos: float = 0.2,
             passes: int = 4) -> Mesh:
    """Quadric edge-collapse decimation to about ``target_faces`` faces (see module docstring).
    Every round picks collapses whose patches do not overlap in up to `passes` passes, cheapest
    first; only the edges a pass would pick are checked (`_CollapseChecks`), which is what keeps a
    round cheap: most candidates never come up."""
    v = mesh.vertices.astype(np.float64)
    f = mesh.faces.astype(np.int64)
    colors = None if mesh.colors is None else mesh.colors.astype(np.float64)
    nv = len(v)
    if nv ** 3 >= 2 ** 62:
        raise ValueError("mesh too large for decimation keys")
    quadric = _plane_quadrics(v, f)
    # every edge's collapse position and cost, kept from round to round: only edges at a vertex that
    # the last round moved (a collapse's survivor) change
    known = (np.zeros(0, dtype=np.int64), np.zeros((0, 3)), np.zeros(0))
    moved = np.ones(nv, dtype=bool)
    for _ in range(max_rounds):
        needed = (len(f) - target_faces) // 2
        if needed <= 0:
            break
        edges, counts = _undirected(f, nv)
        keys = edges[:, 0] * nv + edges[:, 1]
        x_all, cost_all = _round_placements(v, quadric, edges, keys, moved, known)
        known = (keys, x_all, cost_all)
        candidates = _cheapest_candidates(edges, counts, x_all, cost_all, nv, 12 * needed + 256)
        if candidates is None:
            break
        u, w, x = candidates
        checks = _CollapseChecks(v, f, edges, keys, min_normal_cos)
        chosen = _pick_disjoint_collapses(u, w, x, f, nv, checks, needed, passes)
        if len(chosen) == 0:
            break
        cu, cw = u[chosen], w[chosen]
        v[cu] = x[chosen]
        quadric[cu] += quadric[cw]
        if colors is not None:
            colors[cu] = 0.5 * (colors[cu] + colors[cw])
        moved = np.zeros(nv, dtype=bool)
        moved[cu] = True
        remap = np.arange(nv)
        remap[cw] = cu
        f = remap[f]
        f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0])]
    out = Mesh(v.astype(np.float32), f.astype(np.int32),
               None if colors is None else colors.astype(np.float32))
    return remove_unused_vertices(out)


def _round_placements(v, quadric, edges, keys, moved, known) -> tuple[np.ndarray, np.ndarray]:
    """Collapse position [E, 3] and cost [E] of every edge of this round: recomputed for edges at a moved
    vertex, taken from `known` (keys, positions, costs of the last round; keys sorted) for the others."""
    known_keys, known_x, known_cost = known
    fresh = moved[edges[:, 0]] | moved[edges[:, 1]]
    x_all, cost_all = np.empty((len(edges), 3)), np.empty(len(edges))
    kept = np.searchsorted(known_keys, keys[~fresh])
    x_all[~fresh], cost_all[~fresh] = known_x[kept], known_cost[kept]
    x_all[fresh], cost_all[fresh] = _collapse_placement(v, quadric, edges[fresh])
    return x_all, cost_all


def _cheapest_candidates(edges, counts, x_all, cost_all, nv: int, limit: int):
    """The `limit` cheapest collapses of edges with no endpoint on a border or non-manifold edge (edges with
    other than two faces): (u [k], w [k], x [k, 3]) sorted by cost, or None when no edge may collapse."""
    locked = np.zeros(nv, dtype=bool)
    locked[edges[counts != 2].reshape(-1)] = True
    is_cand = ~(locked[edges[:, 0]] | locked[edges[:, 1]])
    if not is_cand.any():
        return None
    u, w, x, cost = edges[is_cand, 0], edges[is_cand, 1], x_all[is_cand], cost_all[is_cand]
    order = np.argsort(cost, kind="stable")[: min(len(u), limit)]
    return u[order], w[order], x[order]


def _pick_disjoint_collapses(u, w, x, f, nv: int, checks: _CollapseChecks, needed: int, passes: int) -> np.ndarray:
    """Indices of the candidates (u, w, x), sorted cheapest first, to collapse this round: at most `needed`,
    with patches that do not overlap. In each pass an edge wins if no face around its endpoints touches a
    cheaper eligible edge; winners that fail the checks drop out, and the next pass lets others win in their
    place, excluding the patches taken so far. At most `passes` passes that pick something."""
    k = len(u)
    chosen = np.zeros(k, dtype=bool)
    eligible = np.ones(k, dtype=bool)
    picking = 0
    for _pass in range(4 * passes):
        rank = np.where(eligible, np.arange(k), k)
        vrank = np.full(nv, k)
        np.minimum.at(vrank, u, rank)
        np.minimum.at(vrank, w, rank)
        frank = vrank[f].min(1)
        patch_min = np.full(nv, k)
        for corner in range(3):
            np.minimum.at(patch_min, f[:, corner], frank)
        win = np.nonzero(eligible & (patch_min[u] == rank) & (patch_min[w] == rank))[0]
        if len(win) == 0:
            break
        ok = checks.valid(u[win], w[win], x[win])
        eligible[win[~ok]] = False
        win = win[ok]
        if len(win) == 0:
            continue
        picking += 1
        chosen[win] = True
        near = _near_patches(u[win], w[win], f, nv)       # edges touching a taken patch are no longer eligible
        eligible &= ~(near[u] | near[w])
        if picking >= passes or chosen.sum() >= needed or not eligible.any():
            break
    return np.nonzero(chosen)[0][:needed]


def _near_patches(u: np.ndarray, w: np.ndarray, f: np.ndarray, nv: int) -> np.ndarray:
    """[nv] bool: vertices of the faces around the collapsing edges (u, w) (their patches are taken)."""
    taken_vertex = np.zeros(nv, dtype=bool)
    taken_vertex[u] = True
    taken_vertex[w] = True
    taken_face = taken_vertex[f].any(1)
    near_taken = np.zeros(nv, dtype=bool)
    near_taken[f[taken_face].reshape(-1)] = True
    return near_taken


# ------------------------------------------------------------------------------------- pipeline
MIN_COMPONENT_FRACTION = 0.02  # floating parts smaller than this share of the largest part (faces) are dropped


def clean_mesh(mesh: Mesh, min_component_fraction: float = MIN_COMPONENT_FRACTION,
               fill_holes: Union[bool, int] = False, target_faces: Optional[int] = None) -> Mesh:
    """Weld duplicate vertices, drop degenerate faces, drop floating parts smaller than
    ``min_component_fraction`` of the largest part (by face count; 0 keeps all), optionally close
    holes (True = loops up to 64 edges, an int = that many edges), optionally decimate to
    ``target_faces``."""
    out = merge_duplicate_vertices(mesh)
    if min_component_fraction > 0:
        out = drop_small_components(out, min_component_fraction)
    if fill_holes:
        max_edges = 64 if fill_holes is True else int(fill_holes)
        out = close_holes(out, max_edges)
    if target_faces is not None and len(out.faces) > target_faces:
        out = decimate(out, int(target_faces))
    return out
