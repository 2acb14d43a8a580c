"""FlexiCubes surface extraction (inference mode) on a sparse set of cubes.

FlexiCubes (Shen et al., "Flexible Isosurface Extraction for Gradient-Based Mesh Optimization",
SIGGRAPH 2023) is Dual Marching Cubes with learnable weights:
- every cube that the surface crosses emits one to four *dual vertices*; the Dual Marching Cubes
  table says which crossed cube edges belong to which dual vertex;
- a dual vertex is the beta-weighted mean of the crossing points on its edges, where each crossing
  point is the zero of the alpha-scaled scalar field along the edge;
- every crossed grid edge shared by four cubes becomes a quad joining the four dual vertices that
  own it; the quad is split into two triangles along the diagonal with the larger gamma product.

This is our own implementation for a *sparse* set of cubes: the caller gives grid vertices, a
scalar value per vertex and, per cube, the indices of its eight corner vertices. No dense grid is
built; neighbouring cubes are found through shared corner vertices. Only inference mode
(training=False of the reference) is provided. The Dual Marching Cubes tables are data from
nv-tlabs/FlexiCubes (Apache-2.0), shipped unchanged in ``engine/data/flexicubes_tables.json``.

Conventions (the ones the tables are written for):
- corner ``k`` of a cube sits at offset ``(k & 1, (k >> 1) & 1, (k >> 2) & 1)`` (x, y, z);
- the twelve cube edges are numbered as in ``CUBE_EDGES``;
- the scalar field is negative inside; faces are wound counter-clockwise seen from the positive
  (outside) side, i.e. normals point towards increasing field.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Optional

import torch

TABLES_PATH = Path(__file__).resolve().parents[1] / "data" / "flexicubes_tables.json"

#: corner k -> integer offset inside the cube (bit 0 = x, bit 1 = y, bit 2 = z)
CORNER_OFFSETS = [[(k >> axis) & 1 for axis in range(3)] for k in range(8)]

#: the twelve cube edges as (lower corner, upper corner) in the numbering of the DMC tables
CUBE_EDGES = [(0, 1), (1, 5), (4, 5), (0, 4), (2, 3), (3, 7),
              (6, 7), (2, 6), (0, 2), (1, 3), (5, 7), (4, 6)]
EDGE_LO = [lo for lo, _ in CUBE_EDGES]
EDGE_HI = [hi for _, hi in CUBE_EDGES]

#: the order in which the four cubes around a crossed edge are joined into a quad.
#: Cubes around an edge along ``axis`` are numbered by their slot (see ``_edge_slot``);
#: ``QUAD_ORDER[axis][outside_at_upper_end]`` lists slots so that the quad's normal points to the
#: outside end of the edge. The starting slot also fixes which diagonal a tie in gamma splits along.
QUAD_ORDER = [
    {True: [2, 3, 1, 0], False: [0, 1, 3, 2]},   # x edges
    {True: [0, 1, 3, 2], False: [2, 3, 1, 0]},   # y edges
    {True: [2, 3, 1, 0], False: [0, 1, 3, 2]},   # z edges
]

#: how the reference maps raw weights to positive ones
WEIGHT_SCALE = 0.99


class FlexiCubesResult(NamedTuple):
    vertices: torch.Tensor               # [M, 3] dual vertices
    faces: torch.Tensor                  # int64 [F, 3]
    attributes: Optional[torch.Tensor]   # [M, C] interpolated per-vertex attributes, or None


@lru_cache(maxsize=None)
def _tables_cpu():
    with open(TABLES_PATH) as f:
        raw = json.load(f)
    return {
        "dmc": torch.tensor(raw["dmc_table"], dtype=torch.long),          # [256, 4, 7] edges per dual vertex
        "num_vd": torch.tensor(raw["num_vd_table"], dtype=torch.long),    # [256] dual vertices per case
        "check": torch.tensor(raw["check_table"], dtype=torch.long),      # [256, 5] ambiguity fix
    }


def _tables(device: torch.device):
    return {k: v.to(device) for k, v in _tables_cpu().items()}


def _edge_axis(edge: int) -> int:
    lo, hi = CUBE_EDGES[edge]
    return (lo ^ hi).bit_length() - 1


def _edge_slot(edge: int) -> int:
    """Which of the four cubes around a grid edge a cube is, seen from its local edge number.

    For an edge along ``axis`` with the two other axes a < b, the cube whose local copy of the
    edge sits at (bit_a, bit_b) lies at offset (-bit_a, -bit_b) from the edge; slots are numbered
    2 * (1 - bit_a) + (1 - bit_b), i.e. lexicographically by the cube's (a, b) position."""
    lo = CUBE_EDGES[edge][0]
    a, b = [ax for ax in range(3) if ax != _edge_axis(edge)]
    return 2 * (1 - ((lo >> a) & 1)) + (1 - ((lo >> b) & 1))


def normalize_weights(beta: Optional[torch.Tensor], alpha: Optional[torch.Tensor],
                      gamma: Optional[torch.Tensor], num_cubes: int, dtype, device):
    """Raw per-cube weights -> positive weights as FlexiCubes uses them (absent -> ones)."""
    if beta is None:
        beta = torch.ones(num_cubes, 12, dtype=dtype, device=device)
    else:
        beta = torch.tanh(beta.to(dtype)) * WEIGHT_SCALE + 1
    if alpha is None:
        alpha = torch.ones(num_cubes, 8, dtype=dtype, device=device)
    else:
        alpha = torch.tanh(alpha.to(dtype)) * WEIGHT_SCALE + 1
    if gamma is None:
        gamma = torch.ones(num_cubes, dtype=dtype, device=device)
    else:
        gamma = torch.sigmoid(gamma.to(dtype)) * WEIGHT_SCALE + (1 - WEIGHT_SCALE) / 2
    return beta, alpha, gamma


def _lookup(sorted_keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Position of each query in ``sorted_keys`` (ascending, unique), -1 where absent."""
    if sorted_keys.numel() == 0:
        return torch.full_like(query, -1)
    pos = torch.searchsorted(sorted_keys, query).clamp(max=sorted_keys.numel() - 1)
    return torch.where(sorted_keys[pos] == query, pos, torch.full_like(pos, -1))


def _resolve_ambiguous_cases(case_ids: torch.Tensor, corners: torch.Tensor, check: torch.Tensor):
    """Dual Marching Cubes ambiguity fix (cases C16/C19 of the FlexiCubes supplement).

    A cube whose case is ambiguous names the face-neighbour it must agree with (unit offset in the
    check table). If that neighbour exists among the crossed cubes and is itself ambiguous, the cube
    takes the alternative case from the table. Neighbours are found through shared corner vertices:
    the cube at +axis has as corner 0 our corner (1 << axis); the one at -axis has as corner
    (1 << axis) our corner 0."""
    config = check[case_ids]                      # [S, 5] flag, dx, dy, dz, alternative case
    ambiguous = torch.nonzero(config[:, 0] == 1).squeeze(1)
    if ambiguous.numel() == 0:
        return case_ids
    amb_corners = corners[ambiguous]              # [P, 8]
    offsets = config[ambiguous, 1:4]              # [P, 3], one non-zero entry of +-1
    axis = offsets.abs().argmax(dim=1)
    step = offsets.gather(1, axis[:, None]).squeeze(1)
    bit = 1 << axis                                # corner index of the unit step along axis
    # corner that identifies the neighbour, and which corner of the neighbour it must be
    query = torch.where(step > 0, amb_corners.gather(1, bit[:, None]).squeeze(1), amb_corners[:, 0])
    neighbour = torch.full_like(query, -1)
    for corner_slot in range(4):                   # 0 = corner 0, 1..3 = corner (1 << (slot - 1))
        if corner_slot == 0:
            want = step > 0
            keys_all = amb_corners[:, 0]
        else:
            a = corner_slot - 1
            want = (step < 0) & (axis == a)
            keys_all = amb_corners[:, 1 << a]
        if not bool(want.any()):
            continue
        sorted_keys, order = torch.sort(keys_all)
        found = _lookup(sorted_keys, query[want])
        neighbour[want] = torch.where(found >= 0, order[found.clamp(min=0)], torch.full_like(found, -1))
    flip = neighbour >= 0
    case_ids = case_ids.clone()
    case_ids[ambiguous[flip]] = config[ambiguous[flip], 4]
    return case_ids


def flexicubes_extract(grid_vertices: torch.Tensor, scalar_field: torch.Tensor,
                       cube_corners: torch.Tensor, beta: Optional[torch.Tensor] = None,
                       alpha: Optional[torch.Tensor] = None, gamma: Optional[torch.Tensor] = None,
                       vertex_attributes: Optional[torch.Tensor] = None) -> FlexiCubesResult:
    """Extract the zero level set of ``scalar_field`` with FlexiCubes (inference mode).

    Args:
        grid_vertices: [V, 3] (possibly deformed) positions of the grid vertices.
        scalar_field: [V] field value per vertex, negative inside.
        cube_corners: int [C, 8] vertex indices of each cube's corners (corner order above). The cubes
            may be any subset of a regular grid; edges of crossed cubes shared by fewer than four
            crossed cubes (the border of the subset) produce no faces.
        beta, alpha, gamma: raw per-cube weights [C, 12], [C, 8], [C] (tanh/sigmoid-normalised as in
            the reference); None = uniform.
        vertex_attributes: optional [V, K] values per grid vertex (e.g. colours), interpolated to the
            dual vertices exactly as their positions are.

    Returns:
        FlexiCubesResult(vertices [M, 3], faces int64 [F, 3], attributes [M, K] or None).
    """
    device = grid_vertices.device
    dtype = grid_vertices.dtype if grid_vertices.is_floating_point() else torch.float32
    grid_vertices = grid_vertices.to(dtype)
    scalar_field = scalar_field.to(dtype).reshape(-1)
    cube_corners = cube_corners.to(device=device, dtype=torch.long)
    num_attr = 0 if vertex_attributes is None else vertex_attributes.shape[-1]

    inside = scalar_field < 0
    corner_inside = inside[cube_corners]                                  # [C, 8]
    n_inside = corner_inside.sum(1)
    crossed = torch.nonzero((n_inside > 0) & (n_inside < 8)).squeeze(1)
    if crossed.numel() == 0:
        empty_attr = None if vertex_attributes is None else torch.zeros(0, num_attr, dtype=dtype, device=device)
        return FlexiCubesResult(torch.zeros(0, 3, dtype=dtype, device=device),
                                torch.zeros(0, 3, dtype=torch.long, device=device), empty_attr)

    def pick(w):
        return None if w is None else w.to(device)[crossed]
    beta, alpha, gamma = normalize_weights(pick(beta), pick(alpha), pick(gamma), crossed.numel(), dtype, device)
    corners = cube_corners[crossed]                                       # [S, 8]
    tables = _tables(device)
    attrs = None if vertex_attributes is None else vertex_attributes.to(device=device, dtype=dtype)

    case_ids = _cube_cases(corner_inside[crossed], corners, tables)
    v_lo, v_hi = corners[:, EDGE_LO], corners[:, EDGE_HI]                 # [S, 12] grid vertices of each edge
    edge_crossed = inside[v_lo] != inside[v_hi]                           # [S, 12]
    crossing, crossing_attr = _edge_crossings(grid_vertices, scalar_field, attrs, v_lo, v_hi, edge_crossed, alpha)
    groups, vd_valid, member = _dual_vertex_groups(case_ids, tables)
    vertices, attributes = _dual_vertices(groups, vd_valid, member, beta, crossing, crossing_attr)
    edge_owner = _edge_owners(groups, vd_valid, member)
    vd_gamma = gamma[:, None].expand(-1, 4)[vd_valid]                     # [M]
    quads = _quads(edge_crossed, v_lo, v_hi, inside, edge_owner)
    return FlexiCubesResult(vertices, _split_quads(quads, vd_gamma), attributes)



def _cube_cases(corner_inside: torch.Tensor, corners: torch.Tensor, tables: dict) -> torch.Tensor:
    """Topology case of every crossed cube: corner_inside bool [S, 8] -> case id [S] in 0..255, ambiguous
    cases resolved against their neighbours."""
    powers = (2 ** torch.arange(8, device=corners.device)).long()
    case_ids = (corner_inside.long() * powers).sum(1)
    return _resolve_ambiguous_cases(case_ids, corners, tables["check"])


def _edge_crossings(grid_vertices, scalar_field, attrs, v_lo, v_hi, edge_crossed, alpha):
    """Crossing point of every cube edge: the zero of the alpha-weighted linear field along it.
    Returns positions [S, 12, 3] and, with `attrs` [V, K], the attributes there [S, 12, K] (else None)."""
    device = v_lo.device
    edge_lo = torch.tensor(EDGE_LO, device=device)
    edge_hi = torch.tensor(EDGE_HI, device=device)
    s_lo = scalar_field[v_lo] * alpha[:, edge_lo]
    s_hi = scalar_field[v_hi] * alpha[:, edge_hi]
    denom = torch.where(edge_crossed, s_hi - s_lo, torch.ones_like(s_hi))
    t_lo = (s_hi / denom).unsqueeze(-1)                                   # weight of the lower end
    t_hi = (-s_lo / denom).unsqueeze(-1)
    crossing = grid_vertices[v_lo] * t_lo + grid_vertices[v_hi] * t_hi    # [S, 12, 3]
    crossing_attr = None if attrs is None else attrs[v_lo] * t_lo + attrs[v_hi] * t_hi
    return crossing, crossing_attr


def _dual_vertex_groups(case_ids: torch.Tensor, tables: dict):
    """Which cube edges make each of a cube's (up to four) dual vertices, from the DMC table.
    Returns groups [S, 4, 7] (edge ids, -1 = none), vd_valid bool [S, 4] (the cube has that dual vertex)
    and member bool [S, 4, 7] (a real edge of a real dual vertex)."""
    groups = tables["dmc"][case_ids]                                      # [S, 4, 7] edge ids or -1
    num_vd = tables["num_vd"][case_ids]                                   # [S]
    vd_valid = torch.arange(4, device=case_ids.device)[None, :] < num_vd[:, None]   # [S, 4]
    member = (groups >= 0) & vd_valid[:, :, None]                         # [S, 4, 7]
    return groups, vd_valid, member


def _dual_vertices(groups, vd_valid, member, beta, crossing, crossing_attr):
    """Dual vertices: the beta-weighted means of their edges' crossings. Returns vertices [M, 3] (cube-major)
    and their attributes [M, K] (None without `crossing_attr`)."""
    S = groups.shape[0]
    flat = groups.clamp(min=0).reshape(S, -1)                             # [S, 28]
    w = beta.gather(1, flat).reshape(S, 4, 7) * member                    # [S, 4, 7]
    w_sum = w.sum(2)                                                      # [S, 4]
    pts = crossing.gather(1, flat[..., None].expand(-1, -1, 3)).reshape(S, 4, 7, 3)
    vd_pos = (pts * w[..., None]).sum(2) / w_sum.clamp(min=1e-30)[..., None]   # [S, 4, 3]
    vertices = vd_pos[vd_valid]                                           # [M, 3], cube-major
    if crossing_attr is None:
        return vertices, None
    num_attr = crossing_attr.shape[-1]
    a = crossing_attr.gather(1, flat[..., None].expand(-1, -1, num_attr)).reshape(S, 4, 7, num_attr)
    return vertices, ((a * w[..., None]).sum(2) / w_sum.clamp(min=1e-30)[..., None])[vd_valid]


def _edge_owners(groups, vd_valid, member) -> torch.Tensor:
    """Index of the dual vertex that owns each (cube, edge): [S, 12], -1 for edges of no dual vertex."""
    S, device = groups.shape[0], groups.device
    vd_index = torch.full((S, 4), -1, dtype=torch.long, device=device)
    vd_index[vd_valid] = torch.arange(int(vd_valid.sum()), device=device)
    edge_owner = torch.full((S, 12), -1, dtype=torch.long, device=device)
    owner_of_member = vd_index[:, :, None].expand(-1, -1, 7)
    cube_of_member = torch.arange(S, device=device)[:, None, None].expand(-1, 4, 7)
    edge_owner[cube_of_member[member], groups[member]] = owner_of_member[member]
    return edge_owner


def _quads(edge_crossed, v_lo, v_hi, inside, edge_owner) -> torch.Tensor:
    """One quad of dual vertices [Q, 4] around each crossed grid edge shared by four crossed cubes, its
    corners ordered so that its normal points to the outside end of the edge."""
    device = edge_crossed.device
    axis_of_edge = torch.tensor([_edge_axis(e) for e in range(12)], device=device)
    slot_of_edge = torch.tensor([_edge_slot(e) for e in range(12)], device=device)
    cube_idx, local_edge = torch.nonzero(edge_crossed, as_tuple=True)
    edge_key = v_lo[cube_idx, local_edge] * 3 + axis_of_edge[local_edge]  # grid edge = (lower vertex, axis)
    keys, edge_id, counts = torch.unique(edge_key, return_inverse=True, return_counts=True)
    full = counts[edge_id] == 4
    quads = torch.full((keys.numel(), 4), -1, dtype=torch.long, device=device)
    quads[edge_id[full], slot_of_edge[local_edge[full]]] = edge_owner[cube_idx[full], local_edge[full]]
    complete = counts == 4
    quads = quads[complete]
    # which end of each grid edge is outside, and the edge's axis
    first = torch.zeros(keys.numel(), dtype=torch.long, device=device)
    first[edge_id] = torch.arange(edge_id.numel(), device=device)   # any one (cube, edge) per grid edge
    first = first[complete]
    q_axis = axis_of_edge[local_edge[first]]
    q_outside_hi = ~inside[v_hi[cube_idx[first], local_edge[first]]]
    order = torch.empty(quads.shape[0], 4, dtype=torch.long, device=device)
    for axis in range(3):
        for outside_hi in (True, False):
            sel = (q_axis == axis) & (q_outside_hi == outside_hi)
            order[sel] = torch.tensor(QUAD_ORDER[axis][outside_hi], device=device)
    return quads.gather(1, order)


def _split_quads(quads: torch.Tensor, vd_gamma: torch.Tensor) -> torch.Tensor:
    """Each quad [Q, 4] split into two triangles along the diagonal with the larger gamma product: [2Q, 3]."""
    g = vd_gamma[quads]
    along_02 = (g[:, 0] * g[:, 2]) > (g[:, 1] * g[:, 3])
    tri_02 = torch.stack([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]], 1)
    tri_13 = torch.stack([quads[:, [0, 1, 3]], quads[:, [3, 1, 2]]], 1)
    return torch.where(along_02[:, None, None], tri_02, tri_13).reshape(-1, 3)
