"""Linear blend skinning and the rigid fits it is built from (torch, any device).

Transforms are kept as `[..., 3, 4]` matrices `[R | t]` acting on column vectors: `x' = R x + t`.
Shapes: rest `[V, 3]`, frames `[T, V, 3]`, weights `[V, B]`, transforms `[T, B, 3, 4]`.
"""
from __future__ import annotations

import torch


class Trajectories:
    """The rest pose [V, 3] and the frames, vertex-major [V, T, 3], with the per-vertex products that the
    bone errors and the weights' normal equations reuse: `outer` = v_t ⊗ p [V, T·9], `norms` = Σ_t |p|² + |v_t|²."""

    def __init__(self, rest: torch.Tensor, by_vertex: torch.Tensor):
        self.rest = rest
        self.by_vertex = by_vertex                                             # [V, T, 3]
        V, T, _ = by_vertex.shape
        self.outer = (by_vertex[..., :, None] * rest[:, None, None, :]).reshape(V, T * 9)
        self.norms = T * (rest * rest).sum(1) + (by_vertex * by_vertex).sum((1, 2))   # [V]

    @classmethod
    def from_frames(cls, rest: torch.Tensor, frames: torch.Tensor) -> "Trajectories":
        return cls(rest, frames.permute(1, 0, 2).contiguous())

    @property
    def num_frames(self) -> int:
        return self.by_vertex.shape[1]

    def subset(self, index: torch.Tensor) -> "Trajectories":
        part = Trajectories.__new__(Trajectories)
        part.rest, part.by_vertex = self.rest[index], self.by_vertex[index]
        part.outer, part.norms = self.outer[index], self.norms[index]
        return part

    def cross(self, transforms: torch.Tensor) -> torch.Tensor:
        """Σ_t v_tᵀ (R_tb p + t_tb) for every vertex and bone -> [V, B]."""
        T, B = transforms.shape[:2]
        R = transforms[..., :3].permute(1, 0, 2, 3).reshape(B, T * 9)
        t = transforms[..., 3].permute(1, 0, 2).reshape(B, T * 3)
        return self.outer @ R.T + self.by_vertex.reshape(len(self.rest), T * 3) @ t.T


def bone_errors(traj: Trajectories, transforms: torch.Tensor, cross: torch.Tensor | None = None) -> torch.Tensor:
    """E[v, b] = Σ_t |R_tb p_v + t_tb - v_t|², the error of moving vertex v rigidly with bone b alone -> [V, B],
    expanded as |p|² + |v|² + |t|² + 2 pᵀRᵀt - 2 vᵀ(Rp + t) so that nothing of size T·V·B is formed."""
    R, t = transforms[..., :3], transforms[..., 3]                             # [T, B, 3, 3], [T, B, 3]
    t2 = (t * t).sum((0, 2))[None]                                             # [1, B]
    rt = torch.einsum("tbij,tbi->bj", R, t)                                    # Σ_t Rᵀt  [B, 3]
    cross = traj.cross(transforms) if cross is None else cross
    errors = traj.norms[:, None] + t2 + 2 * traj.rest @ rt.T - 2 * cross
    return errors.clamp_min(0)


def blend_matrices(weights: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    """Per-vertex blended matrices Σ_b w_vb M_tb: weights [V, B], transforms [T, B, 3, 4] -> [V, T, 3, 4]."""
    T, B = transforms.shape[:2]
    flat = transforms.permute(1, 0, 2, 3).reshape(B, T * 12)                 # [B, T*12]
    return (weights @ flat).reshape(-1, T, 3, 4)


def apply_matrices(matrices: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """matrices [V, T, 3, 4] applied to rest [V, 3] -> [V, T, 3]."""
    return (matrices[..., :3] @ rest[:, None, :, None]).squeeze(-1) + matrices[..., 3]


def skin(weights: torch.Tensor, transforms: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """Linear blend skinning, vertex-major: v_t = Σ_b w_vb (R_tb p_v + t_tb) -> [V, T, 3]."""
    return apply_matrices(blend_matrices(weights, transforms), rest)


def move(transform: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """One bone's motion [T, 3, 4] of points [n, 3] -> [n, T, 3]."""
    return torch.einsum("tij,nj->nti", transform[..., :3], points) + transform[..., 3]


def kabsch(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For covariances H = Σ x yᵀ [..., 3, 3]: the rotation R = V diag(1, 1, d) Uᵀ maximising tr(R H), and
    that maximum σ1 + σ2 + d σ3 [...]."""
    device = H.device
    work = H.cpu() if device.type == "mps" else H                              # no batched SVD on MPS
    U, S, Vh = torch.linalg.svd(work.double())
    VU = Vh.transpose(-1, -2) @ U.transpose(-1, -2)
    d = torch.sign((VU[..., 0] * torch.linalg.cross(VU[..., 1], VU[..., 2])).sum(-1))   # det(V Uᵀ)
    d = torch.where(d == 0, torch.ones_like(d), d)
    D = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
    R = Vh.transpose(-1, -2) @ D @ U.transpose(-1, -2)
    trace = S[..., 0] + S[..., 1] + d * S[..., 2]
    return R.to(device=device, dtype=H.dtype), trace.to(device=device, dtype=H.dtype)


def rotation_from_covariance(H: torch.Tensor) -> torch.Tensor:
    """The rotation R maximising tr(R H) for covariances H = Σ x yᵀ [..., 3, 3] (Kabsch)."""
    return kabsch(H)[0]


def weighted_rigid_fit(rest: torch.Tensor, targets: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The rigid M_t minimising Σ_v |q_vt - w_v M_t [p_v, 1]|² per frame (the bone update of Le & Deng 2012,
    with q the part of the frame left to this bone); w = 1 is the ordinary least-squares rigid fit.

    With p* = Σ w²p / Σ w² and q*_t = Σ w q_t / Σ w²: t = q* - R p*, and R from H_t = Σ_v w_v (p_v - p*) q_vtᵀ.
    rest [n, 3], targets q [n, T, 3], w [n] -> [T, 3, 4].
    """
    n, T, _ = targets.shape
    total = (w * w).sum().clamp_min(1e-12)
    p_star = ((w * w)[:, None] * rest).sum(0) / total                         # [3]
    left = torch.cat([w[:, None] * (rest - p_star), w[:, None]], 1)            # [n, 4]
    sums = (left.T @ targets.reshape(n, T * 3)).reshape(4, T, 3)               # [4, T, 3]
    H = sums[:3].permute(1, 0, 2)                                              # [T, 3, 3]
    q_star = sums[3] / total                                                   # [T, 3]
    R = rotation_from_covariance(H)
    t = q_star - R @ p_star
    return torch.cat([R, t[..., None]], -1)


def identity_transforms(T: int, B: int, like: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(3, 4, dtype=like.dtype, device=like.device)
    return eye.expand(T, B, 3, 4).clone()
