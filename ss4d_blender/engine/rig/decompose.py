"""Skinning decomposition: bones with rigid per-frame motions and sparse skin weights that reproduce a
vertex animation by linear blend skinning (smooth skinning decomposition with rigid bones, Le & Deng
2012; bone growing and skeleton extraction after Le & Deng 2014).

1. Rigid clustering, grown by splitting the worst cluster, gives the bones (`clustering`).
2. Weight steps (`weights`) and bone steps (`bone_motion`) alternate.
3. Joints and a hierarchy are fitted to the bones' motions (`skeleton`).
4. Optionally, per-frame corrective offsets in the rest pose make the result exact.

Everything runs in coordinates normalised to the rest pose's bounding box (unit diagonal); errors are
reported in % of that diagonal.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ..errors import InputError
from ..registration.geometry import MeshNeighbours, unique_edges
from .bone_motion import update_bones
from .clustering import fit_clusters, grow, refine, relabel, rms_of
from .rig_file import Rig
from .skeleton import build_skeleton
from .skinning import Trajectories, apply_matrices, blend_matrices, identity_transforms, skin
from .weights import solve_weights


@dataclass
class RigSettings:
    bones: Optional[int] = None          # bone count; None: the smallest count ≤ max_bones meeting target_rms
    max_bones: int = 32                  # most bones the automatic count may use
    target_rms: float = 0.5              # automatic count: RMS error to reach, % of the diagonal
    correctives: bool = False            # per-frame corrective offsets that make the result exact
    max_influences: int = 4              # non-zero weights per vertex, at most
    candidates: int = 8                  # bones a vertex's weights are chosen among
    smoothness: float = 1e-4             # pull of the neighbours' weights (see weights.solve_weights)
    iterations: int = 6                  # weight / bone alternations once the count is chosen
    trial_iterations: int = 1            # ... when trying a count
    cluster_iterations: int = 8          # rigid k-means passes after each split
    refine_rounds: int = 3               # split-and-merge attempts at a candidate bone count
    qp_iterations: int = 5               # projected-gradient steps polishing a weight step
    converged: float = 0.02              # stop alternating when a round lowers the RMS error by less (share)
    min_cluster: float = 0.002           # smallest bone at the start, share of the vertices (at least 4)
    static_motion: float = 1e-6          # motion below this × diagonal is no motion
    cpu_threads: int | None = 1          # torch CPU threads while fitting (None: torch's setting); the batched
                                         # ops are small, threads cost more than they bring (bench/RESULTS.md)

    def __post_init__(self):
        if self.bones is not None and not 1 <= int(self.bones) <= 256:
            raise InputError(f"The bone count must be between 1 and 256, got {self.bones}.")
        if not 1 <= self.max_bones <= 256:
            raise InputError(f"max_bones must be between 1 and 256, got {self.max_bones}.")


def check_animation(vertices: np.ndarray, faces: np.ndarray, rest: np.ndarray) -> None:
    """Clear errors for what cannot be rigged."""
    if vertices.ndim != 3 or vertices.shape[2] != 3:
        raise InputError(f"The animation must be vertices [T, V, 3], got shape {tuple(vertices.shape)}.")
    T, V, _ = vertices.shape
    if T < 2:
        raise InputError(f"Rigging needs an animation of at least 2 frames; this one has {T}.")
    if V < 4:
        raise InputError(f"Rigging needs a mesh of at least 4 vertices; this one has {V}.")
    if not np.isfinite(vertices).all():
        bad = sorted({int(t) for t in np.nonzero(~np.isfinite(vertices).all(axis=(1, 2)))[0]})
        raise InputError(f"The animation has NaN or infinite coordinates (frames {bad[:10]} counted from 0); "
                         f"rebuild the animation before rigging.")
    if rest.shape != (V, 3) or not np.isfinite(rest).all():
        raise InputError(f"The rest pose must be finite [{V}, 3], got {tuple(rest.shape)}.")
    if faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0:
        raise InputError(f"Rigging needs triangle faces [F, 3]; got shape {tuple(faces.shape)}.")
    if faces.min() < 0 or faces.max() >= V:
        raise InputError(f"Face indices must lie in 0..{V - 1}; found {faces.min()}..{faces.max()}.")
    extent = rest.max(0) - rest.min(0)
    if not np.linalg.norm(extent) > 0:
        raise InputError("The rest pose has no extent (all vertices at one point).")


def initial_bones(traj: Trajectories, edges: torch.Tensor, neighbours: MeshNeighbours,
                  settings: RigSettings, report: Callable[[float], None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Grows rigid clusters until the bone count is reached (fixed count) or a trial solve of the weights
    meets `target_rms` (automatic). Returns weights [V, B] and transforms [T, B, 3, 4]."""
    V, T, _ = traj.by_vertex.shape
    auto, limit = settings.bones is None, settings.bones or settings.max_bones
    min_size, passes = max(4, int(settings.min_cluster * V)), settings.cluster_iterations
    labels = torch.zeros(V, dtype=torch.long, device=traj.rest.device)
    labels, transforms, errors = relabel(traj, fit_clusters(traj, labels, 1), min_size, 1)
    target = settings.target_rms / 100
    while True:
        B = transforms.shape[1]
        report(min(B / limit, 1.0))
        near = rms_of(errors, T) <= 3 * target if auto else False
        if near or B >= limit:
            labels, transforms, errors = refine(traj, labels, transforms, errors, edges, min_size, passes,
                                                settings.refine_rounds)
            B = transforms.shape[1]
        weights = torch.nn.functional.one_hot(labels, B).to(traj.rest.dtype)
        if auto and rms_of(errors, T) <= target:
            return weights, transforms
        if auto and (near or B >= limit):
            weights, trial = alternate(traj, weights, transforms, neighbours, settings, settings.trial_iterations)
            if float(lbs_errors(traj, weights, trial)[0].pow(2).mean().sqrt()) <= target:
                return weights, trial
        if B >= limit:
            return weights, transforms
        splits = min(limit - B, 1 if near else max(1, B // 2))
        labels, grown, errors = grow(traj, transforms, labels, errors, splits, min_size, passes)
        if grown.shape[1] <= B:                     # nothing left to split (clusters too small)
            return torch.nn.functional.one_hot(labels, grown.shape[1]).to(traj.rest.dtype), grown
        transforms = grown


def alternate(traj: Trajectories, weights, transforms, neighbours, settings: RigSettings, iterations: int,
              report: Callable[[float], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `iterations` rounds of a weight step then a bone step; stops early once a round lowers the RMS
    error by less than `settings.converged` of it."""
    previous = float("inf")
    for i in range(iterations):
        weights = solve_weights(traj, transforms, weights, neighbours, settings.smoothness,
                                settings.max_influences, settings.candidates, settings.qp_iterations)
        transforms, rms = update_bones(traj, weights, transforms)
        if report is not None:
            report((i + 1) / iterations)
        if rms > (1 - settings.converged) * previous:
            break
        previous = rms
    return weights, transforms


def lbs_errors(traj: Trajectories, weights, transforms) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame RMS and max vertex error [T] each, in the normalised (unit-diagonal) units."""
    distance = (skin(weights, transforms, traj.rest) - traj.by_vertex).norm(dim=2)     # [V, T]
    return distance.pow(2).mean(0).sqrt(), distance.max(0).values


def drop_unused(weights: torch.Tensor, transforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    used = weights.max(0).values > 0
    return weights[:, used], transforms[:, used]


def corrective_offsets(traj: Trajectories, weights, transforms) -> torch.Tensor:
    """Rest-pose offsets δ_t [T, V, 3] with Σ_b w_vb M_tb [p_v + δ_tv, 1] = v_tv exactly:
    δ_t = (Σ_b w_vb R_tb)⁻¹ (v_t - LBS_t(p))."""
    blended = blend_matrices(weights, transforms)                              # [V, T, 3, 4]
    residual = traj.by_vertex - apply_matrices(blended, traj.rest)             # [V, T, 3]
    precise = torch.float32 if blended.device.type == "mps" else torch.float64   # no float64 on MPS
    A, b = blended[..., :3].to(precise), residual.to(precise)[..., None]
    delta, info = torch.linalg.solve_ex(A, b)
    singular = info != 0
    if bool(singular.any()):
        delta[singular] = torch.linalg.pinv(A[singular]) @ b[singular]
    return delta.squeeze(-1).transpose(0, 1).to(traj.rest.dtype)


def fit_rig(vertices: np.ndarray, faces: np.ndarray, rest_vertices: Optional[np.ndarray] = None,
            rest_frame: int = 0, settings: Optional[RigSettings] = None, device: str = "cpu",
            progress=None) -> Rig:
    """Fits bones and skin weights to a vertex animation.

    Args:
        vertices: the animation [T, V, 3] (`vertices` of what `engine animate` / `engine register` write).
        faces: triangles [F, 3] (weights are smoothed over the mesh's edges; joints are kept inside it).
        rest_vertices: the rest pose [V, 3]; default the animation's frame `rest_frame`.
        settings: `RigSettings` (bone count, correctives, ...).
        device: "cpu", "cuda", "mps" or "auto".
        progress: an `engine.progress.Progress` (stage "Rigging"), or None.
    """
    from ..memory import pick_device

    settings = settings or RigSettings()
    vertices, faces = np.asarray(vertices), np.asarray(faces)
    if vertices.ndim == 3 and not 0 <= rest_frame < vertices.shape[0]:
        raise InputError(f"The rest frame {rest_frame} is not a frame of the animation (0..{len(vertices) - 1}).")
    rest = np.asarray(vertices[rest_frame] if rest_vertices is None and vertices.ndim == 3 else rest_vertices)
    check_animation(vertices, faces, rest)
    started = time.perf_counter()

    def report(fraction: float, stage_from: float = 0.0, stage_to: float = 1.0) -> None:
        if progress is not None:
            progress.update("Rigging", stage_from + (stage_to - stage_from) * fraction)

    dev = pick_device(device)
    threads = torch.get_num_threads()
    if dev.type == "cpu" and settings.cpu_threads:
        torch.set_num_threads(settings.cpu_threads)
    try:
        return _fit(vertices, faces, rest, settings, dev, report, started)
    finally:
        torch.set_num_threads(threads)


def _fit(vertices, faces, rest, settings: RigSettings, dev, report, started: float) -> Rig:
    """`fit_rig` after its checks: normalise, fit, build the skeleton, back to the animation's units."""
    lo, hi = rest.min(0).astype(np.float64), rest.max(0).astype(np.float64)
    centre, diagonal = (lo + hi) / 2, float(np.linalg.norm(hi - lo))
    P = torch.as_tensor((rest - centre) / diagonal, dtype=torch.float32, device=dev)
    X = torch.as_tensor((vertices - centre) / diagonal, dtype=torch.float32, device=dev)
    F = torch.as_tensor(faces.astype(np.int64), device=dev)
    T, V, _ = X.shape
    traj = Trajectories.from_frames(P, X)
    del X
    if float((traj.by_vertex - P[:, None]).norm(dim=2).max()) <= settings.static_motion:
        W, M, chosen = torch.ones(V, 1, device=dev), identity_transforms(T, 1, P), "static"
    else:
        neighbours = MeshNeighbours(F, V, torch.float32)
        W, M = initial_bones(traj, unique_edges(F), neighbours, settings, lambda f: report(f, 0.0, 0.5))
        W, M = alternate(traj, W, M, neighbours, settings, settings.iterations, lambda f: report(f, 0.5, 0.95))
        W, M = drop_unused(W, M)
        chosen = "given" if settings.bones else "auto"
    rms, worst = lbs_errors(traj, W, M)
    skeleton = build_skeleton(P.cpu(), F.cpu(), W.cpu(), M.cpu())
    delta = corrective_offsets(traj, W, M) * diagonal if settings.correctives else None
    report(1.0)
    return _to_model_units(rest, F, W, M, skeleton, rms, worst, delta, centre, diagonal,
                           {"bone_count": chosen, "seconds": time.perf_counter() - started, "device": str(dev)})


def _to_model_units(rest, F, W, M, skeleton, rms, worst, delta, centre, diagonal, info) -> Rig:
    """The rig in the animation's own coordinates (x = diagonal · x_n + centre), on the given rest pose."""
    T, B = M.shape[:2]
    R, t = M[..., :3].double().cpu().numpy(), M[..., 3].double().cpu().numpy()
    out = np.zeros((T, B, 4, 4))
    out[..., :3, :3] = R
    out[..., :3, 3] = diagonal * t + centre - R @ centre
    out[..., 3, 3] = 1
    return Rig(rest_vertices=np.asarray(rest, np.float32),
               faces=F.cpu().numpy().astype(np.int32),
               weights=W.cpu().numpy().astype(np.float32),
               transforms=out.astype(np.float32),
               parents=skeleton.parents.numpy().astype(np.int32),
               heads=(skeleton.heads.double().numpy() * diagonal + centre).astype(np.float32),
               tails=(skeleton.tails.double().numpy() * diagonal + centre).astype(np.float32),
               rms_error=(100 * rms).cpu().numpy().astype(np.float32),
               max_error=(100 * worst).cpu().numpy().astype(np.float32),
               correctives=None if delta is None else delta.cpu().numpy().astype(np.float32),
               info=info)
