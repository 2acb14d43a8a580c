"""Linear blend skinning and the rigid fits it is built from (torch, any device).

Transforms are kept as `[..., 3, 4]` matrices `[R | t]` acting on column vectors: `x' = R x + t`.
Shapes: rest `[V, 3]`, frames `[T, V, 3]`, weights `[V, B]`, transforms `[T, B, 3, 4]`.
"""
from __future__ import annotations

import torch


def blend_matrices(weights: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    """Per-vertex blended matrices Σ_b w_vb M_tb: weights [V, B], transforms [T, B, 3, 4] -> [T, V, 3, 4]."""
    T, B = transforms.shape[:2]
    flat = transforms.permute(1, 0, 2, 3).reshape(B, T * 12)                 # [B, T*12]
    return (weights @ flat).reshape(-1, T, 3, 4).permute(1, 0, 2, 3)          # [T, V, 3, 4]


def apply_matrices(matrices: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """matrices [T, V, 3, 4] applied to rest [V, 3] -> [T, V, 3]."""
    return torch.einsum("tvij,vj->tvi", matrices[..., :3], rest) + matrices[..., 3]


def skin(weights: torch.Tensor, transforms: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """Linear blend skinning: v_t = Σ_b w_vb (R_tb p_v + t_tb) -> [T, V, 3]."""
    return apply_matrices(blend_matrices(weights, transforms), rest)


def bone_errors(rest: torch.Tensor, frames: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    """E[v, b] = Σ_t |R_tb p_v + t_tb - v_t|², the error of moving vertex v rigidly with bone b alone -> [V, B].

    Expanded so that nothing of size T·V·B is formed: |Rp + t - v|² = |p|² + |t|² + |v|² + 2 pᵀRᵀt - 2 vᵀRp - 2 tᵀv.
    """
    T, V, _ = frames.shape
    R, t = transforms[..., :3], transforms[..., 3]                             # [T, B, 3, 3], [T, B, 3]
    p2 = T * (rest * rest).sum(1, keepdim=True)                                # [V, 1]
    v2 = (frames * frames).sum((0, 2))[:, None]                                # [V, 1]
    t2 = (t * t).sum((0, 2))[None]                                             # [1, B]
    rt = torch.einsum("tbij,tbi->bj", R, t)                                    # Σ_t Rᵀt  [B, 3]
    vp = torch.einsum("tvi,vj->vtij", frames, rest).reshape(V, -1)             # v ⊗ p  [V, T*9]
    vrp = vp @ R.permute(1, 0, 2, 3).reshape(R.shape[1], -1).T                 # Σ_t vᵀRp  [V, B]
    tv = frames.permute(1, 0, 2).reshape(V, -1) @ t.permute(1, 0, 2).reshape(t.shape[1], -1).T   # [V, B]
    return (p2 + v2 + t2 + 2 * rest @ rt.T - 2 * vrp - 2 * tv).clamp_min(0)


def rotation_from_covariance(H: torch.Tensor) -> torch.Tensor:
    """The rotation R maximising tr(R H) for covariances H = Σ x yᵀ [..., 3, 3] (Kabsch): R = V diag(1, 1, d) Uᵀ."""
    device = H.device
    work = H.cpu() if device.type == "mps" else H                              # no batched SVD on MPS
    U, _, Vh = torch.linalg.svd(work.double())
    d = torch.sign(torch.linalg.det(Vh.transpose(-1, -2) @ U.transpose(-1, -2)))
    d = torch.where(d == 0, torch.ones_like(d), d)
    D = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
    R = Vh.transpose(-1, -2) @ D @ U.transpose(-1, -2)
    return R.to(device=device, dtype=H.dtype)


def weighted_rigid_fit(rest: torch.Tensor, targets: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The rigid M_t minimising Σ_v |q_tv - w_v M_t [p_v, 1]|² per frame (the bone update of Le & Deng 2012,
    with q the part of the frame left to this bone); w = 1 is the ordinary least-squares rigid fit.

    rest [N, 3], targets q [T, N, 3], w [N] -> [T, 3, 4].
    """
    w2 = w * w
    total = w2.sum().clamp_min(1e-12)
    p_star = (w2[:, None] * rest).sum(0) / total                              # [3]
    q_star = (w[None, :, None] * targets).sum(1) / total                      # [T, 3]
    p_c = w[:, None] * (rest - p_star)                                         # [N, 3]
    q_c = targets - w[None, :, None] * q_star[:, None]                         # [T, N, 3]
    H = torch.einsum("ni,tnj->tij", p_c, q_c)                                  # [T, 3, 3]
    R = rotation_from_covariance(H)
    t = q_star - R @ p_star
    return torch.cat([R, t[..., None]], -1)


def identity_transforms(T: int, B: int, like: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(3, 4, dtype=like.dtype, device=like.device)
    return eye.expand(T, B, 3, 4).clone()
