"""The bone step: with the weights fixed, each bone's rigid motion per frame is refitted in turn to what
the other bones leave unexplained (block coordinate descent of Le & Deng 2012)."""
from __future__ import annotations

import torch

from .skinning import Trajectories, move, skin, weighted_rigid_fit


def update_bones(traj: Trajectories, weights: torch.Tensor, transforms: torch.Tensor
                 ) -> tuple[torch.Tensor, float]:
    """weights [V, B], transforms [T, B, 3, 4] -> refitted transforms [T, B, 3, 4] and the RMS error after."""
    transforms = transforms.clone()
    recon = skin(weights, transforms, traj.rest)                               # [V, T, 3]
    for b in range(transforms.shape[1]):
        members = torch.nonzero(weights[:, b] > 0).squeeze(1)
        if len(members) == 0:
            continue
        w, p = weights[members, b], traj.rest[members]
        own = w[:, None, None] * move(transforms[:, b], p)                    # [n, T, 3]
        target = traj.by_vertex[members] - recon[members] + own
        fitted = weighted_rigid_fit(p, target, w)                              # [T, 3, 4]
        transforms[:, b] = fitted
        recon[members] += w[:, None, None] * move(fitted, p) - own
    return transforms, float((recon - traj.by_vertex).pow(2).sum(2).mean().sqrt())
