"""Skin weights: for every vertex, the convex combination of at most `max_influences` bones that best
reproduces its trajectory (the weight step of Le & Deng 2012), pulled towards the average of its mesh
neighbours' weights so that weights vary smoothly over the surface.

Per vertex v with candidate bones c_1..c_K, A_v [3T, K] stacks the candidates' motions of its rest position
and b_v [3T] its trajectory; the step minimises

    |A_v w - b_v|² + λ |w - w̄_v|²   subject to  w ≥ 0,  Σ w = 1,  at most `max_influences` non-zero,

with w̄_v the mean of the neighbours' current weights, by an active set method batched over all vertices.
"""
from __future__ import annotations

import torch

from ..registration.geometry import MeshNeighbours
from .skinning import Trajectories, bone_errors

CHUNK = 4096            # vertices per block when forming the per-vertex normal equations


def project_to_simplex(x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of x [N, K] onto {w ≥ 0, Σ w = 1, w = 0 where not allowed}."""
    masked = torch.where(allowed, x, torch.full_like(x, -1e9))
    u, _ = masked.sort(1, descending=True)
    k = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device)
    css = u.cumsum(1) - 1
    support = (u - css / k > 0) & (u > -1e8)
    rho = support.sum(1, keepdim=True).clamp_min(1)
    theta = css.gather(1, rho - 1) / rho.to(x.dtype)
    return torch.where(allowed, (x - theta).clamp_min(0), torch.zeros_like(x))


def normal_equations(traj: Trajectories, transforms: torch.Tensor, cross: torch.Tensor,
                     candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G_v = A_vᵀA_v [V, K, K] and h_v = A_vᵀb_v [V, K] for the candidate bones [V, K], from sums over the
    frames per pair of bones: (A_vᵀA_v)_kl = pᵀ(Σ_t R_kᵀR_l)p + pᵀΣ_t(R_kᵀt_l + R_lᵀt_k) + Σ_t t_k·t_l;
    h_v is the `cross` product [V, B] of the candidates."""
    R, t = transforms[..., :3], transforms[..., 3]
    RR = torch.einsum("tkai,tlaj->klij", R, R)                                 # [B, B, 3, 3]
    Rt = torch.einsum("tkai,tla->kli", R, t)                                   # [B, B, 3]
    tt = torch.einsum("tka,tla->kl", t, t)                                     # [B, B]
    V, K = candidates.shape
    G = traj.rest.new_empty(V, K, K)
    for start in range(0, V, CHUNK):
        c, p = candidates[start:start + CHUNK], traj.rest[start:start + CHUNK]
        k, m = c[:, :, None], c[:, None, :]
        quadratic = torch.einsum("ni,nklij,nj->nkl", p, RR[k, m], p)
        linear = ((Rt[k, m] + Rt[m, k]) * p[:, None, None, :]).sum(-1)
        G[start:start + CHUNK] = quadratic + linear + tt[k, m]
    return G, cross.gather(1, candidates)


def solve_on_support(Q: torch.Tensor, c: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """min wᵀQw - 2cᵀw with Σ w = 1 and w = 0 off the active set, per row, from the KKT system
    [Q 1; 1ᵀ 0] [w; ν] = [c; 1] restricted to the active set (other rows read w_i = 0). -> w [N, K]."""
    N, K = c.shape
    a = active.to(Q.dtype)
    system = Q.new_zeros(N, K + 1, K + 1)
    system[:, :K, :K] = Q * a[:, :, None] * a[:, None, :] + torch.diag_embed(1 - a)
    system[:, :K, K] = a
    system[:, K, :K] = a
    rhs = torch.cat([c * a, torch.ones_like(c[:, :1])], 1)
    return torch.linalg.solve(system, rhs[..., None])[:, :K, 0]


def solve_simplex_qp(G: torch.Tensor, h: torch.Tensor, prior: torch.Tensor, lam: float, allowed: torch.Tensor,
                     polish: int) -> torch.Tensor:
    """min wᵀGw - 2hᵀw + λ|w - prior|² on the simplex restricted to `allowed`, per row. An active set
    method (solve on the support, drop the most negative weight, repeat), then `polish` steps of projected
    gradient. G [N, K, K]; h, prior, allowed [N, K] -> w [N, K]."""
    K = G.shape[1]
    Q = G + lam * torch.eye(K, dtype=G.dtype, device=G.device)
    c = h + lam * prior
    active = allowed.clone()
    for _ in range(K):
        w = solve_on_support(Q, c, active)
        negative = (w < 0) & active
        if not bool(negative.any()):
            break
        worst = torch.where(negative, w, torch.zeros_like(w)).argmin(1, keepdim=True)
        drop = torch.zeros_like(active).scatter_(1, worst, True) & negative.any(1, keepdim=True)
        active &= ~drop
    w = project_to_simplex(w, active)
    x = torch.ones_like(h)
    for _ in range(8):                                                         # largest eigenvalue of Q
        x = torch.nn.functional.normalize((Q @ x[:, :, None]).squeeze(2), dim=1)
    step = 1.0 / ((Q @ x[:, :, None]).squeeze(2).norm(dim=1, keepdim=True) * 1.05 + 1e-12)
    for _ in range(polish):
        w = project_to_simplex(w - step * ((Q @ w[:, :, None]).squeeze(2) - c), allowed)
    return w


def solve_weights(traj: Trajectories, transforms: torch.Tensor, weights: torch.Tensor,
                  neighbours: MeshNeighbours, smoothness: float, max_influences: int, candidates: int,
                  iterations: int) -> torch.Tensor:
    """One weight step. Trajectories of V vertices, transforms [T, B, 3, 4], current weights [V, B]
    -> new weights [V, B], each row with at most `max_influences` non-zero entries summing to 1.

    Candidates are the bones that move the vertex best on their own, plus its current bones; λ is
    `smoothness` · T (coordinates are normalised to a unit diagonal), so a weight change that moves a
    vertex by less than about √smoothness of the diagonal is decided by the neighbours."""
    T, B = transforms.shape[:2]
    K = min(candidates, B)
    cross = traj.cross(transforms)
    errors = bone_errors(traj, transforms, cross)                              # [V, B]
    errors = errors - errors.max() * (weights > 0)                             # current bones first
    cand = errors.topk(K, dim=1, largest=False).indices                        # [V, K]
    G, h = normal_equations(traj, transforms, cross, cand)
    lam = smoothness * T
    degree = neighbours.degree[:, None]
    prior_dense = torch.where(degree > 0, neighbours.sum(weights) / degree.clamp_min(1), weights)
    prior = prior_dense.gather(1, cand)
    allowed = torch.ones_like(cand, dtype=torch.bool)
    w = solve_simplex_qp(G, h, prior, lam, allowed, iterations)
    if K > max_influences:
        top = w.topk(max_influences, dim=1).indices
        allowed = torch.zeros_like(allowed).scatter_(1, top, True)
        w = solve_simplex_qp(G, h, prior, lam, allowed, iterations)
    out = torch.zeros_like(weights).scatter_(1, cand, w)
    return out / out.sum(1, keepdim=True).clamp_min(1e-12)
