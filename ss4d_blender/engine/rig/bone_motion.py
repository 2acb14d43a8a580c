"""The bone step: with the weights fixed, each bone's rigid motion per frame is refitted in turn to what
the other bones leave unexplained (block coordinate descent of Le & Deng 2012)."""
from __future__ import annotations

import torch

from .skinning import skin, weighted_rigid_fit


def update_bones(rest: torch.Tensor, frames: torch.Tensor, weights: torch.Tensor,
                 transforms: torch.Tensor) -> torch.Tensor:
    """rest [V, 3], frames [T, V, 3], weights [V, B], transforms [T, B, 3, 4] -> refitted transforms."""
    transforms = transforms.clone()
    recon = skin(weights, transforms, rest)                                    # [T, V, 3]
    for b in range(transforms.shape[1]):
        members = torch.nonzero(weights[:, b] > 0).squeeze(1)
        if len(members) == 0:
            continue
        w = weights[members, b]
        p = rest[members]
        own = w[None, :, None] * (p @ transforms[:, b, :, :3].transpose(1, 2) + transforms[:, b, None, :, 3])
        target = frames[:, members] - recon[:, members] + own                 # [T, n, 3]
        fitted = weighted_rigid_fit(p, target, w)                              # [T, 3, 4]
        transforms[:, b] = fitted
        new_own = w[None, :, None] * (p @ fitted[:, :, :3].transpose(1, 2) + fitted[:, None, :, 3])
        recon[:, members] += new_own - own
    return transforms
