"""Skin weights: for every vertex, the convex combination of at most `max_influences` bones that best
reproduces its trajectory (the weight step of Le & Deng 2012), pulled towards the average of its mesh
neighbours' weights so that weights vary smoothly over the surface.

Per vertex v with candidate bones c_1..c_K, A_v [3T, K] stacks the candidates' motions of its rest position
and b_v [3T] its trajectory; the step minimises

    |A_v w - b_v|² + λ |w - w̄_v|²   subject to  w ≥ 0,  Σ w = 1,  at most `max_influences` non-zero,

with w̄_v the mean of the neighbours' current weights, by accelerated projected gradient on the simplex,
batched over all vertices.
"""
from __future__ import annotations

import torch

from ..registration.geometry import MeshNeighbours
from .skinning import bone_errors

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


def normal_equations(rest: torch.Tensor, frames: torch.Tensor, transforms: torch.Tensor,
                     candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G_v = A_vᵀA_v [V, K, K] and h_v = A_vᵀb_v [V, K] for the candidate bones [V, K]."""
    V, K = candidates.shape
    G = rest.new_empty(V, K, K)
    h = rest.new_empty(V, K)
    for start in range(0, V, CHUNK):
        idx = slice(start, start + CHUNK)
        M = transforms[:, candidates[idx]]                                     # [T, n, K, 3, 4]
        A = torch.einsum("tnkij,nj->tnki", M[..., :3], rest[idx]) + M[..., 3]  # [T, n, K, 3]
        A = A.permute(1, 2, 0, 3).flatten(2)                                   # [n, K, 3T]
        b = frames[:, idx].permute(1, 0, 2).flatten(1)                         # [n, 3T]
        G[idx] = A @ A.transpose(1, 2)
        h[idx] = (A @ b[:, :, None]).squeeze(2)
    return G, h


def solve_simplex_qp(G: torch.Tensor, h: torch.Tensor, prior: torch.Tensor, lam: float, start: torch.Tensor,
                     allowed: torch.Tensor, iterations: int) -> torch.Tensor:
    """min wᵀGw - 2hᵀw + λ|w - prior|² on the (masked) simplex, per row: FISTA with a step from the largest
    eigenvalue of G + λI (power iteration). G [N, K, K]; h, prior, start, allowed [N, K] -> w [N, K]."""
    Q = G + lam * torch.eye(G.shape[1], dtype=G.dtype, device=G.device)
    c = h + lam * prior
    x = torch.ones_like(h)
    for _ in range(12):
        x = torch.nn.functional.normalize((Q @ x[:, :, None]).squeeze(2), dim=1)
    step = 1.0 / ((Q @ x[:, :, None]).squeeze(2).norm(dim=1, keepdim=True) * 1.05 + 1e-12)
    w = project_to_simplex(start, allowed)
    y, momentum = w, 1.0
    for _ in range(iterations):
        gradient = (Q @ y[:, :, None]).squeeze(2) - c
        w_next = project_to_simplex(y - step * gradient, allowed)
        momentum_next = 0.5 * (1 + (1 + 4 * momentum * momentum) ** 0.5)
        y = w_next + ((momentum - 1) / momentum_next) * (w_next - w)
        w, momentum = w_next, momentum_next
    return w


def solve_weights(rest: torch.Tensor, frames: torch.Tensor, transforms: torch.Tensor, weights: torch.Tensor,
                  neighbours: MeshNeighbours, smoothness: float, max_influences: int, candidates: int,
                  iterations: int) -> torch.Tensor:
    """One weight step. rest [V, 3], frames [T, V, 3], transforms [T, B, 3, 4], current weights [V, B]
    -> new weights [V, B], each row with at most `max_influences` non-zero entries summing to 1.

    Candidates are the bones that move the vertex best on their own, plus its current bones; λ is
    `smoothness` · T (coordinates are normalised to a unit diagonal), so a weight change that moves a
    vertex by less than about √smoothness of the diagonal is decided by the neighbours."""
    T, B = transforms.shape[:2]
    K = min(candidates, B)
    errors = bone_errors(rest, frames, transforms)                             # [V, B]
    errors = errors - errors.max() * (weights > 0)                             # current bones first
    cand = errors.topk(K, dim=1, largest=False).indices                        # [V, K]
    G, h = normal_equations(rest, frames, transforms, cand)
    lam = smoothness * T
    degree = neighbours.degree[:, None]
    prior_dense = torch.where(degree > 0, neighbours.sum(weights) / degree.clamp_min(1), weights)
    prior = prior_dense.gather(1, cand)
    allowed = torch.ones_like(cand, dtype=torch.bool)
    w = solve_simplex_qp(G, h, prior, lam, weights.gather(1, cand), allowed, iterations)
    if K > max_influences:
        top = w.topk(max_influences, dim=1).indices
        allowed = torch.zeros_like(allowed).scatter_(1, top, True)
        w = solve_simplex_qp(G, h, prior, lam, w, allowed, iterations // 2)
    out = torch.zeros_like(weights).scatter_(1, cand, w)
    return out / out.sum(1, keepdim=True).clamp_min(1e-12)
