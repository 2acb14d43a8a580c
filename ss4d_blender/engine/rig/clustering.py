"""Initial bones by rigid clustering: every vertex belongs to the one bone that moves it best, and a
cluster that fits badly is split in two (the initialisation of Le & Deng 2012 / 2014, grown one split
at a time so that the bone count can be chosen automatically).

Shapes: `Trajectories` of V vertices over T frames, labels [V] (bone of each vertex), transforms [T, B, 3, 4].
"""
from __future__ import annotations

import torch

from .skinning import Trajectories, bone_errors, rotation_from_covariance, weighted_rigid_fit


def rigid_fit(traj: Trajectories, members: torch.Tensor) -> torch.Tensor:
    """The least-squares rigid motion of some vertices -> [T, 3, 4]."""
    ones = torch.ones(len(members), dtype=traj.rest.dtype, device=traj.rest.device)
    return weighted_rigid_fit(traj.rest[members], traj.by_vertex[members], ones)


def fit_clusters(traj: Trajectories, labels: torch.Tensor, count: int) -> torch.Tensor:
    """The least-squares rigid motion of each cluster, all at once -> [T, count, 3, 4]: with one-hot
    membership O [V, B], t = mean(v) - R p* and R from H = Σ p vᵀ - p* (Σ v)ᵀ per cluster and frame."""
    V, T, _ = traj.by_vertex.shape
    member = torch.nn.functional.one_hot(labels, count).to(traj.rest.dtype)    # [V, B]
    size = member.sum(0).clamp_min(1)[:, None]                                 # [B, 1]
    p_star = member.T @ traj.rest / size                                       # [B, 3]
    sum_v = (member.T @ traj.by_vertex.reshape(V, T * 3)).reshape(count, T, 3)
    sum_pv = (member.T @ traj.outer).reshape(count, T, 3, 3).transpose(-1, -2)  # Σ p vᵀ  [B, T, 3, 3]
    H = sum_pv - p_star[:, None, :, None] * sum_v[:, :, None, :]
    R = rotation_from_covariance(H)                                            # [B, T, 3, 3]
    t = sum_v / size[:, :, None] - (R @ p_star[:, None, :, None]).squeeze(-1)
    return torch.cat([R, t[..., None]], -1).transpose(0, 1)


def relabel(traj: Trajectories, transforms: torch.Tensor, min_size: int,
            iterations: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Alternates assigning each vertex to its best bone and refitting the bones (rigid k-means); clusters
    smaller than `min_size` are dissolved. Returns labels [V], transforms [T, B', 3, 4], errors [V]."""
    for _ in range(iterations):
        errors = bone_errors(traj, transforms)                                  # [V, B]
        labels = errors.argmin(1)
        sizes = torch.bincount(labels, minlength=transforms.shape[1])
        keep = sizes >= min_size
        if not bool(keep.all()):
            transforms = transforms[:, keep]
            labels = bone_errors(traj, transforms).argmin(1)
        previous = transforms
        transforms = fit_clusters(traj, labels, transforms.shape[1])
        if torch.allclose(previous, transforms, atol=1e-6):
            break
    best, labels = bone_errors(traj, transforms).min(1)
    return labels, transforms, best


def split_cluster(traj: Trajectories, labels: torch.Tensor, errors: torch.Tensor,
                  bone: int) -> torch.Tensor:
    """Splits one cluster: the vertex it explains worst seeds a new bone, fitted to the half of the cluster
    nearest to that vertex; the old bone is refitted to the other half. Returns the two motions [T, 2, 3, 4]."""
    members = torch.nonzero(labels == bone).squeeze(1)
    seed = members[errors[members].argmax()]
    distance = (traj.rest[members] - traj.rest[seed]).norm(dim=1)
    near = distance <= distance.median()
    return torch.stack([rigid_fit(traj, members[~near]), rigid_fit(traj, members[near])], 1)


def rms_of(errors: torch.Tensor, num_frames: int) -> float:
    """RMS vertex distance from per-vertex squared errors summed over frames [V]."""
    return float((errors.sum() / (errors.numel() * num_frames)).sqrt())


def grow(traj: Trajectories, transforms: torch.Tensor, labels: torch.Tensor,
         errors: torch.Tensor, splits: int, min_size: int, iterations: int
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Splits the `splits` clusters with the largest total error (those big enough to halve), then
    re-clusters. Returns labels, transforms, per-vertex errors."""
    B = transforms.shape[1]
    totals = torch.zeros(B, dtype=errors.dtype, device=errors.device).index_add_(0, labels, errors)
    sizes = torch.bincount(labels, minlength=B)
    totals[sizes < 2 * min_size] = -1
    order = [int(b) for b in totals.argsort(descending=True)[:splits] if totals[b] > 0]
    if not order:
        return labels, transforms, errors
    kept, added = transforms.clone(), []
    for b in order:
        pair = split_cluster(traj, labels, errors, b)
        kept[:, b] = pair[:, 0]
        added.append(pair[:, 1:])
    return relabel(traj, torch.cat([kept, *added], 1), min_size, iterations)


def merge_cheapest(traj: Trajectories, labels: torch.Tensor, transforms: torch.Tensor,
                   errors: torch.Tensor, edges: torch.Tensor, min_size: int, iterations: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merges the two touching clusters (a mesh edge between them) whose union a single rigid motion
    explains with the least extra error, then re-clusters."""
    B = transforms.shape[1]
    a, b = labels[edges[:, 0]], labels[edges[:, 1]]
    keys = torch.unique((torch.minimum(a, b) * B + torch.maximum(a, b))[a != b])
    if len(keys) == 0:
        return labels, transforms, errors
    best, best_cost = None, None
    for i, j in zip((keys // B).tolist(), (keys % B).tolist()):
        members = torch.nonzero((labels == i) | (labels == j)).squeeze(1)
        motion = rigid_fit(traj, members)
        cost = float(bone_errors(traj.subset(members), motion[:, None]).sum() - errors[members].sum())
        if best_cost is None or cost < best_cost:
            best, best_cost = (i, j, motion), cost
    i, j, motion = best
    keep = torch.ones(B, dtype=torch.bool, device=transforms.device)
    keep[j] = False
    merged = transforms.clone()
    merged[:, i] = motion
    return relabel(traj, merged[:, keep], min_size, iterations)


def refine(traj: Trajectories, labels: torch.Tensor, transforms: torch.Tensor,
           errors: torch.Tensor, edges: torch.Tensor, min_size: int, iterations: int, rounds: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Escapes poor local minima of the clustering at a fixed bone count: splits the worst cluster and
    merges the cheapest touching pair, kept while the total error drops."""
    for _ in range(rounds):
        B = transforms.shape[1]
        split = grow(traj, transforms, labels, errors, 1, min_size, iterations)
        if split[1].shape[1] <= B:
            break
        trial = merge_cheapest(traj, *split, edges, min_size, iterations)
        if trial[1].shape[1] != B or float(trial[2].sum()) >= 0.999 * float(errors.sum()):
            break
        labels, transforms, errors = trial
    return labels, transforms, errors
