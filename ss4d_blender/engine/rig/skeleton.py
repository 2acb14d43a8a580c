"""The skeleton over the fitted bones: joints, a hierarchy, and bone heads and tails inside the mesh.

A joint of bones b and c is the rest-pose point that both move alike in every frame,
min_j Σ_t |M_tb [j, 1] - M_tc [j, 1]|², pulled lightly towards the centre of the region the two bones
share (where a hinge leaves the point free along its axis, this picks the point of the axis inside
that region). The hierarchy is the spanning tree of least joint error over the bones that touch on the
mesh (Le & Deng 2014), rooted at the bone that carries the most weight; a child's head is its joint with
its parent. Points that end up outside the rest mesh are moved inside it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..registration.geometry import unique_edges, vertex_normals

JOINT_PULL = 1e-3       # pull towards the shared region's centre, relative to T (unit-diagonal coordinates)
NOT_TOUCHING = 1.0      # extra cost (unit-diagonal lengths) for a parent/child pair that does not touch
MIN_LENGTH = 0.02       # shortest bone, × diagonal


@dataclass
class Skeleton:
    parents: torch.Tensor       # [B] long, -1 for the root
    heads: torch.Tensor         # [B, 3]
    tails: torch.Tensor         # [B, 3]


def contact(weights: torch.Tensor, rest: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How much each pair of bones touches [B, B] (shared weight plus mesh edges between their dominant
    vertices) and the centre of each pair's shared region [B, B, 3]."""
    B = weights.shape[1]
    overlap = weights.T @ weights                                              # [B, B]
    centre_sum = torch.einsum("vb,vc,vi->bci", weights, weights, rest)
    edges = unique_edges(faces)
    dominant = weights.argmax(1)
    a, b = dominant[edges[:, 0]], dominant[edges[:, 1]]
    crossing = a != b
    pair = a[crossing] * B + b[crossing]
    midpoint = 0.5 * (rest[edges[crossing, 0]] + rest[edges[crossing, 1]])
    counts = torch.zeros(B * B, dtype=rest.dtype, device=rest.device).index_add_(0, pair, torch.ones_like(pair,
                                                                                                 dtype=rest.dtype))
    sums = torch.zeros(B * B, 3, dtype=rest.dtype, device=rest.device).index_add_(0, pair, midpoint)
    counts, sums = counts.view(B, B), sums.view(B, B, 3)
    counts, sums = counts + counts.T, sums + sums.transpose(0, 1)
    strength = overlap * (1 - torch.eye(B, dtype=rest.dtype, device=rest.device)) + counts
    amount = (overlap + counts)[..., None]
    centroids = (weights.T @ rest) / weights.sum(0).clamp_min(1e-12)[:, None]  # [B, 3]
    apart = 0.5 * (centroids[:, None] + centroids[None])
    centre = torch.where(amount > 1e-9, (centre_sum + sums) / amount.clamp_min(1e-12), apart)
    return strength, centre


def fit_joints(transforms: torch.Tensor, centre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The joint of every pair of bones [B, B, 3] and its RMS mismatch over the frames [B, B]."""
    T, B = transforms.shape[:2]
    dR = transforms[:, :, None, :, :3] - transforms[:, None, :, :, :3]       # [T, B, B, 3, 3]
    dt = transforms[:, :, None, :, 3] - transforms[:, None, :, :, 3]         # [T, B, B, 3]
    pull = JOINT_PULL * T
    eye = torch.eye(3, dtype=transforms.dtype, device=transforms.device)
    lhs = torch.einsum("tbcki,tbckj->bcij", dR, dR) + pull * eye
    rhs = -torch.einsum("tbcki,tbck->bci", dR, dt) + pull * centre
    joints = torch.linalg.solve(lhs.double(), rhs.double()[..., None]).squeeze(-1).to(transforms.dtype)
    mismatch = torch.einsum("tbcij,bcj->tbci", dR, joints) + dt
    return joints, mismatch.pow(2).sum(-1).mean(0).sqrt()


def spanning_tree(cost: torch.Tensor, root: int) -> torch.Tensor:
    """Prim's minimum spanning tree of a complete graph with costs [B, B], as parents [B] from `root`."""
    B = cost.shape[0]
    parents = torch.full((B,), -1, dtype=torch.long)
    inside = torch.zeros(B, dtype=torch.bool)
    inside[root] = True
    best, via = cost[root].clone(), torch.full((B,), root, dtype=torch.long)
    for _ in range(B - 1):
        candidate = torch.where(inside, torch.full_like(best, math.inf), best)
        b = int(candidate.argmin())
        parents[b], inside[b] = via[b], True
        closer = cost[b] < best
        best = torch.where(closer, cost[b], best)
        via = torch.where(closer, torch.full_like(via, b), via)
    return parents


def winding_numbers(points: torch.Tensor, rest: torch.Tensor, faces: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Generalised winding number of each point [P, 3] for the mesh (≈ 1 inside a closed mesh, 0 outside)."""
    if len(points) > chunk:
        return torch.cat([winding_numbers(points[i:i + chunk], rest, faces) for i in range(0, len(points), chunk)])
    a = rest[faces[:, 0]][None] - points[:, None]                             # [P, F, 3]
    b = rest[faces[:, 1]][None] - points[:, None]
    c = rest[faces[:, 2]][None] - points[:, None]
    la, lb, lc = a.norm(dim=-1), b.norm(dim=-1), c.norm(dim=-1)
    det = (a * torch.cross(b, c, dim=-1)).sum(-1)
    div = la * lb * lc + (a * b).sum(-1) * lc + (b * c).sum(-1) * la + (c * a).sum(-1) * lb
    return (2 * torch.atan2(det, div)).sum(1) / (4 * math.pi)


def ray_hits(origins: torch.Tensor, directions: torch.Tensor, rest: torch.Tensor, faces: torch.Tensor
             ) -> torch.Tensor:
    """Distance along each ray [P, 3] to the nearest triangle in front of it (Möller-Trumbore); inf if none."""
    v0, v1, v2 = rest[faces[:, 0]], rest[faces[:, 1]], rest[faces[:, 2]]
    e1, e2 = (v1 - v0)[None], (v2 - v0)[None]
    d, e2 = torch.broadcast_tensors(directions[:, None], e2)                 # [P, F, 3]
    pvec = torch.cross(d, e2, dim=-1)
    det = (e1 * pvec).sum(-1)
    inv = 1.0 / torch.where(det.abs() < 1e-12, torch.full_like(det, 1e-12), det)
    s = origins[:, None] - v0[None]
    u = (s * pvec).sum(-1) * inv
    qvec = torch.cross(s, e1.expand_as(s), dim=-1)
    v = (d * qvec).sum(-1) * inv
    t = (e2 * qvec).sum(-1) * inv
    hit = (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 1e-6) & (det.abs() >= 1e-12)
    return torch.where(hit, t, torch.full_like(t, math.inf)).min(1).values


def move_inside(points: torch.Tensor, rest: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Points [P, 3] outside the rest mesh go to the middle of the mesh's thickness below the nearest
    vertex (a ray cast inwards along its normal); points inside, or where no ray hits, stay."""
    outside = winding_numbers(points, rest, faces) < 0.5
    if not bool(outside.any()):
        return points
    normals = vertex_normals(rest, faces)
    nearest = torch.cdist(points[outside], rest).argmin(1)
    start, inward = rest[nearest], -normals[nearest]
    depth = ray_hits(start + 1e-5 * inward, inward, rest, faces)
    moved = torch.where(torch.isfinite(depth)[:, None], start + 0.5 * depth.clamp_max(1e6)[:, None] * inward,
                        points[outside])
    points = points.clone()
    points[outside] = moved
    return points


def pull_inside(points: torch.Tensor, anchors: torch.Tensor, rest: torch.Tensor, faces: torch.Tensor,
                steps: int = 8) -> torch.Tensor:
    """Points [P, 3] outside the mesh slide towards their anchors [P, 3] (inside) until they are inside
    (bisection on the segment); then `move_inside` for any still out."""
    outside = winding_numbers(points, rest, faces) < 0.5
    if not bool(outside.any()):
        return points
    lo = torch.zeros(int(outside.sum()), dtype=points.dtype, device=points.device)   # share of the way back
    hi = torch.ones_like(lo)
    start, anchor = points[outside], anchors[outside]
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        inside = winding_numbers(start + mid[:, None] * (anchor - start), rest, faces) >= 0.5
        hi, lo = torch.where(inside, mid, hi), torch.where(inside, lo, mid)
    points = points.clone()
    points[outside] = start + hi[:, None] * (anchor - start)
    return move_inside(points, rest, faces)


def principal_axis(points: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    centred = points - (w[:, None] * points).sum(0) / w.sum().clamp_min(1e-12)
    cov = (w[:, None] * centred).T @ centred
    return torch.linalg.eigh(cov.double())[1][:, -1].to(points.dtype)


def bone_ends(rest: torch.Tensor, weights: torch.Tensor, parents: torch.Tensor, joints: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Heads [B, 3]: the joint with the parent (the root: its weighted centroid). Tails [B, 3]: the mean of
    the children's heads, else the farthest child head, else (leaves) the far end of the bone's region,
    1.5 times the head-to-centroid step; never shorter than MIN_LENGTH."""
    B = weights.shape[1]
    centroids = (weights.T @ rest) / weights.sum(0).clamp_min(1e-12)[:, None]
    heads = centroids.clone()
    for b in range(B):
        if parents[b] >= 0:
            heads[b] = joints[parents[b], b]
    tails = torch.empty_like(heads)
    for b in range(B):
        kids = torch.nonzero(parents == b).squeeze(1)
        tail = heads[kids].mean(0) if len(kids) else 1.5 * centroids[b] - 0.5 * heads[b]
        if len(kids) and (tail - heads[b]).norm() < MIN_LENGTH:
            tail = heads[kids[(heads[kids] - heads[b]).norm(dim=1).argmax()]]
        if (tail - heads[b]).norm() < MIN_LENGTH:
            tail = heads[b] + MIN_LENGTH * principal_axis(rest, weights[:, b])
        tails[b] = tail
    return heads, tails


def build_skeleton(rest: torch.Tensor, faces: torch.Tensor, weights: torch.Tensor,
                   transforms: torch.Tensor) -> Skeleton:
    """rest [V, 3] (unit-diagonal coordinates), faces [F, 3], weights [V, B], transforms [T, B, 3, 4]."""
    strength, centre = contact(weights, rest, faces)
    joints, mismatch = fit_joints(transforms, centre)
    cost = mismatch + NOT_TOUCHING * (strength <= 0).to(mismatch.dtype)
    root = int(weights.sum(0).argmax())
    parents = spanning_tree(cost.cpu(), root).to(rest.device)
    heads, tails = bone_ends(rest, weights, parents, joints)
    heads = move_inside(heads, rest, faces)
    tails = pull_inside(tails, heads, rest, faces)
    short = (tails - heads).norm(dim=1) < 0.5 * MIN_LENGTH
    if bool(short.any()):
        axes = torch.stack([principal_axis(rest, weights[:, b]) for b in torch.nonzero(short).squeeze(1)])
        tails[short] = heads[short] + MIN_LENGTH * axes
    return Skeleton(parents, heads, tails)
