"""Initial bones by rigid clustering: every vertex belongs to the one bone that moves it best, and a
cluster that fits badly is split in two (the initialisation of Le & Deng 2012 / 2014, grown one split
at a time so that the bone count can be chosen automatically).

Shapes: `Trajectories` of V vertices over T frames, labels [V] (bone of each vertex), transforms [T, B, 3, 4].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .skinning import Trajectories, bone_errors, kabsch, weighted_rigid_fit


def rigid_fit(traj: Trajectories, members: torch.Tensor) -> torch.Tensor:
    """The least-squares rigid motion of some vertices -> [T, 3, 4]."""
    ones = torch.ones(len(members), dtype=traj.rest.dtype, device=traj.rest.device)
    return weighted_rigid_fit(traj.rest[members], traj.by_vertex[members], ones)


SETTLED = 1e-3          # k-means stops when at most this share of the vertices changes bone


@dataclass
class ClusterSums:
    """Per-cluster sums that a rigid fit needs; sums of two clusters are the sums of their union."""
    size: torch.Tensor          # [B]
    p: torch.Tensor             # Σ p  [B, 3]
    pp: torch.Tensor            # Σ |p|²  [B]
    v: torch.Tensor             # Σ v_t  [B, T, 3]
    vv: torch.Tensor            # Σ_t Σ |v_t|²  [B]
    pv: torch.Tensor            # Σ p v_tᵀ  [B, T, 3, 3]

    def pick(self, index) -> "ClusterSums":
        return ClusterSums(*(x[index] for x in vars(self).values()))

    def __add__(self, other: "ClusterSums") -> "ClusterSums":
        return ClusterSums(*(a + b for a, b in zip(vars(self).values(), vars(other).values())))


def cluster_sums(traj: Trajectories, labels: torch.Tensor, count: int) -> ClusterSums:
    V, T, _ = traj.by_vertex.shape

    def total(x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros((count,) + x.shape[1:]).index_add_(0, labels, x)
    return ClusterSums(size=total(torch.ones_like(traj.rest[:, 0])), p=total(traj.rest),
                       pp=total((traj.rest * traj.rest).sum(1)), v=total(traj.by_vertex),
                       vv=total((traj.by_vertex * traj.by_vertex).sum((1, 2))),
                       pv=total(traj.outer).reshape(count, T, 3, 3).transpose(-1, -2))


def rigid_from_sums(sums: ClusterSums) -> tuple[torch.Tensor, torch.Tensor]:
    """Each cluster's least-squares rigid motion [T, B, 3, 4] and its total squared error [B]: with
    p* = Σp / n and H = Σ p vᵀ - p* (Σ v)ᵀ, R = Kabsch(H), t = Σv / n - R p*, and the error
    T Σ|p - p*|² + Σ|v - v*|² - 2 tr(R H) summed over the frames."""
    T = sums.v.shape[1]
    size = sums.size.clamp_min(1)
    p_star = sums.p / size[:, None]                                            # [B, 3]
    H = sums.pv - p_star[:, None, :, None] * sums.v[:, :, None, :]             # [B, T, 3, 3]
    R, trace = kabsch(H)
    t = sums.v / size[:, None, None] - (R @ p_star[:, None, :, None]).squeeze(-1)
    spread_p = sums.pp - (sums.p * sums.p).sum(1) / size
    spread_v = sums.vv - (sums.v * sums.v).sum((1, 2)) / size
    error = (T * spread_p + spread_v - 2 * trace.sum(1)).clamp_min(0)
    return torch.cat([R, t[..., None]], -1).transpose(0, 1), error


def fit_clusters(traj: Trajectories, labels: torch.Tensor, count: int) -> torch.Tensor:
    """The least-squares rigid motion of each cluster, all at once -> [T, count, 3, 4]."""
    return rigid_from_sums(cluster_sums(traj, labels, count))[0]


def relabel(traj: Trajectories, transforms: torch.Tensor, min_size: int,
            iterations: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Alternates assigning each vertex to its best bone and refitting the bones (rigid k-means) until
    (almost) no vertex changes bone; clusters smaller than `min_size` are dissolved. Returns labels [V], transforms
    [T, B', 3, 4], errors [V]."""
    labels = None
    for _ in range(iterations):
        errors = bone_errors(traj, transforms)                                  # [V, B]
        new_labels = errors.argmin(1)
        sizes = torch.bincount(new_labels, minlength=transforms.shape[1])
        keep = sizes >= min_size
        if not bool(keep.all()):
            transforms = transforms[:, keep]
            new_labels = bone_errors(traj, transforms).argmin(1)
        elif labels is not None and int((new_labels != labels).sum()) <= SETTLED * len(labels):
            break
        labels = new_labels
        transforms = fit_clusters(traj, labels, transforms.shape[1])
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
    explains with the least extra error (all pairs at once, from the clusters' sums), then re-clusters."""
    B = transforms.shape[1]
    a, b = labels[edges[:, 0]], labels[edges[:, 1]]
    keys = torch.unique((torch.minimum(a, b) * B + torch.maximum(a, b))[a != b])
    if len(keys) == 0:
        return labels, transforms, errors
    first, second = keys // B, keys % B
    sums = cluster_sums(traj, labels, B)
    merged, merged_error = rigid_from_sums(sums.pick(first) + sums.pick(second))
    current = torch.zeros(B, dtype=errors.dtype, device=errors.device).index_add_(0, labels, errors)
    best = int((merged_error - current[first] - current[second]).argmin())
    i, j = int(first[best]), int(second[best])
    keep = torch.ones(B, dtype=torch.bool, device=transforms.device)
    keep[j] = False
    joined = transforms.clone()
    joined[:, i] = merged[:, best]
    return relabel(traj, joined[:, keep], min_size, iterations)


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
