"""One mesh through all frames: register the reference frame's mesh to every other frame.

Order of work:
1. pick the reference frame (the most complete surface: largest closed area) unless given;
2. simplify it to the target vertex count;
3. fit it to the neighbouring frames outward from the reference in both directions, each frame
   warm-started from its neighbour's result (coarse graph first, then every vertex);
4. optionally smooth the vertex trajectories over time;
5. measure the fit error of every frame (mean distance to that frame's surface) and flag bad ones.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..mesh.color import sh_dc_to_rgb, srgb_to_linear
from ..progress import Progress
from ..types import AnimatedMesh, GaussianSet, Mesh
from .deform import Deformer, FitSettings, Target
from .geometry import SurfaceDistance, face_areas
from .knn import PointGrid
from .simplify import simplify_to_vertices

BAD_FRAME_FRACTION = 0.01      # fit error above 1% of the bounding-box diagonal flags a frame


def resolve_device(device) -> torch.device:
    """'auto' -> CUDA when available, else the CPU. Apple MPS is never chosen (nor accepted): the fit needs
    batched SVD / Cholesky, which MPS does not implement, and its sizes run well on the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


def _validate(meshes: Sequence[Mesh]) -> list[bool]:
    if len(meshes) == 0:
        raise InputError("Registration needs at least one frame, got none.")
    usable = []
    for t, m in enumerate(meshes):
        v, f = np.asarray(m.vertices), np.asarray(m.faces)
        if v.ndim != 2 or v.shape[-1] != 3 or f.ndim != 2 or f.shape[-1] != 3:
            raise InputError(f"Frame {t}: mesh arrays have the wrong shape (vertices {v.shape}, "
                             f"faces {f.shape}); expected [n, 3] and [m, 3].")
        if m.colors is not None and (np.asarray(m.colors).shape != v.shape or not np.isfinite(m.colors).all()):
            raise InputError(f"Frame {t}: vertex colours of shape {np.asarray(m.colors).shape} for vertices "
                             f"{v.shape} (expected one finite RGB colour per vertex).")
        ok = v.shape[0] >= 3 and f.shape[0] >= 1 and bool(np.isfinite(v).all())
        if ok and (f.min() < 0 or f.max() >= v.shape[0]):
            raise InputError(f"Frame {t}: face indices point outside the vertex list.")
        usable.append(ok and _has_area(v, f))
    if not any(usable):
        raise InputError("No frame has a usable mesh (all are empty, flat to a line or point, or contain NaN).")
    return usable


def _area(v: np.ndarray, f: np.ndarray) -> float:
    vertices, faces = torch.from_numpy(np.asarray(v, np.float64)), torch.from_numpy(np.asarray(f, np.int64))
    return float(face_areas(vertices, faces).sum())


def _has_area(v: np.ndarray, f: np.ndarray) -> bool:
    """Whether the faces cover any area (a mesh collapsed to a line or a point has none to fit to)."""
    diag = float(np.linalg.norm(v.max(0) - v.min(0)))
    return diag > 0 and _area(v, f) > 1e-12 * diag * diag


def _completeness(mesh: Mesh) -> float:
    """Surface area with open boundaries penalised: area × (1 − boundary-edge share)."""
    f = np.asarray(mesh.faces, np.int64)
    area = _area(mesh.vertices, f)
    e = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    _, counts = np.unique(e[:, 0] * (int(f.max()) + 1) + e[:, 1], return_counts=True)   # edges as int64 keys
    boundary = float((counts == 1).sum()) / max(len(counts), 1)
    return float(area) * (1.0 - boundary)


def choose_reference_frame(meshes: Sequence[Mesh], usable: Optional[list[bool]] = None,
                           tolerance: float = 0.03) -> int:
    """The most complete surface (area × closed share). Frames within `tolerance` of the best
    count as equally complete; among those the one nearest the middle of the sequence wins, which
    halves the longest chain of frame-to-frame fits (and the drift that grows along it)."""
    usable = usable or [True] * len(meshes)
    scores = np.array([(_completeness(m) if ok else -1.0) for m, ok in zip(meshes, usable)])
    good = np.flatnonzero(scores >= (1.0 - tolerance) * scores.max())
    middle = 0.5 * (len(meshes) - 1)
    return int(good[np.argmin(np.abs(good - middle))])


def _gaussian_colors(g: GaussianSet) -> tuple[np.ndarray, np.ndarray]:
    """Positions [n, 3] and linear colours [n, 3] (as `Mesh` colours are) of one frame's Gaussians."""
    dc = torch.from_numpy(np.asarray(g.features_dc, np.float32).reshape(-1, 3))
    return np.asarray(g.xyz, np.float32), srgb_to_linear(sh_dc_to_rgb(dc)).numpy()


def _colors_from_gaussians(vertices: np.ndarray, gaussians: Optional[list[GaussianSet]], t: int
                           ) -> Optional[np.ndarray]:
    """Colour [V, 3] of each vertex from frame t's nearest Gaussian, or None without Gaussians for it."""
    if gaussians is None or gaussians[t] is None:
        return None
    gx, grgb = _gaussian_colors(gaussians[t])
    if gx.shape[0] == 0:
        return None
    idx, _ = PointGrid(torch.from_numpy(gx)).query(torch.from_numpy(np.asarray(vertices, np.float32)))
    return grgb[idx.numpy()]


def _tensor(a: Optional[np.ndarray], device) -> Optional[torch.Tensor]:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(device)


def smooth_trajectories(x: torch.Tensor, strength: float) -> torch.Tensor:
    """Minimise |y − x|² + strength · |second time difference of y|² per vertex ([T, V, 3])."""
    t = x.shape[0]
    if strength <= 0 or t < 3:
        return x
    d = torch.zeros(t - 2, t, dtype=torch.float64)
    idx = torch.arange(t - 2)
    d[idx, idx], d[idx, idx + 1], d[idx, idx + 2] = 1.0, -2.0, 1.0
    a = torch.eye(t, dtype=torch.float64) + strength * d.T @ d
    flat = x.reshape(t, -1).to("cpu", torch.float64)
    return torch.linalg.solve(a, flat).reshape(x.shape).to(x.device, x.dtype)


def _check_inputs(meshes, gaussians, reference_frame) -> tuple[list[bool], int]:
    """Which frames are usable, and the reference frame (chosen when None); InputError for bad input."""
    usable = _validate(meshes)
    num_frames = len(meshes)
    if gaussians is not None and len(gaussians) != num_frames:
        raise InputError(f"{len(gaussians)} frames of Gaussians for {num_frames} frames of meshes.")
    if reference_frame is None:
        reference_frame = choose_reference_frame(meshes, usable)
    if not (0 <= reference_frame < num_frames):
        raise InputError(f"Reference frame {reference_frame} is outside 0..{num_frames - 1}.")
    if not usable[reference_frame]:
        raise InputError(f"Reference frame {reference_frame} has no usable mesh; choose another.")
    return usable, reference_frame


def _mesh_tensors(mesh: Mesh, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A frame's vertices [n, 3] float32 and faces [m, 3] int64 on `device`."""
    return (torch.from_numpy(np.ascontiguousarray(mesh.vertices, np.float32)).to(device),
            torch.from_numpy(np.ascontiguousarray(mesh.faces, np.int64)).to(device))


def _fit_direction(deformer: Deformer, rest: torch.Tensor, frames, meshes, usable, gaussians, with_colors: bool,
                   samples: int, generator: torch.Generator, positions: list, stats: list, on_frame) -> None:
    """Fits `frames` (outward from the reference, in order) into `positions` [V, 3] and `stats`, each frame
    warm-started from its neighbour's result. A frame that diverges or has no usable mesh keeps its
    neighbour's shape. Frames are fitted by colour too when the reference and the frame both have colours."""
    previous, state = rest, deformer.graph.identity_state()
    for t in frames:
        if usable[t]:
            mesh = meshes[t]
            frame_colors = None
            if with_colors:
                frame_colors = (mesh.colors if mesh.colors is not None
                                else _colors_from_gaussians(mesh.vertices, gaussians, t))
            tv, tf = _mesh_tensors(mesh, rest.device)
            target = Target(tv, tf, samples, generator, _tensor(frame_colors, rest.device), deformer.color_blur)
            x, new_state, st = deformer.fit_coarse_to_fine(state, target)
            if st.get("diverged"):
                x = previous
            else:
                state = new_state
            positions[t], stats[t], previous = x, st, x
        else:
            positions[t], stats[t] = previous, {"empty": True}
        on_frame()


def _fit_errors(meshes, usable, x_all: torch.Tensor) -> np.ndarray:
    """Fit error per frame [T]: mean distance from the registered vertices to that frame's surface (inf for
    frames without a usable mesh)."""
    fit_error = np.full(len(meshes), np.inf, np.float32)
    for t, mesh in enumerate(meshes):
        if usable[t]:
            tv, tf = _mesh_tensors(mesh, x_all.device)
            fit_error[t] = float(SurfaceDistance(tv, tf)(x_all[t]).mean())
    return fit_error


def register_sequence(meshes: list[Mesh], *, reference_frame: Optional[int] = None,
                      target_vertices: int = 20000, temporal_smoothing: float = 0.0,
                      progress: Optional[Progress] = None, device="cpu",
                      gaussians: Optional[list[GaussianSet]] = None,
                      settings: Optional[FitSettings] = None, seed: int = 0) -> AnimatedMesh:
    """Register per-frame meshes (any vertex counts/topologies) into one animated mesh.

    meshes: per-frame `Mesh` (vertices [n_t,3], faces [m_t,3], optional colours).
    reference_frame: frame whose surface gives the topology; None = the most complete surface.
    target_vertices: the reference mesh is simplified to about this many vertices.
    temporal_smoothing: 0 = off; larger values smooth vertex trajectories over time (≈ frames²).
    gaussians: optional per-frame Gaussians, used for colours when the meshes have none.
    Returns AnimatedMesh(faces [F,3], vertices [T,V,3], colors [V,3]|None, fit_error [T],
    reference_frame, info) where info holds bad_frames, bad_frame_threshold, per-frame stats.
    Frames without a usable mesh copy their neighbour's shape and get fit_error = inf (flagged).
    """
    started = time.perf_counter()
    gaussians = gaussians if gaussians is not None and len(gaussians) else None   # read per frame; empty: none
    usable, reference_frame = _check_inputs(meshes, gaussians, reference_frame)
    num_frames = len(meshes)
    dev = resolve_device(device)
    progress = progress or Progress()
    progress.update("Registering", 0.0)

    # 1-2. the reference frame's mesh, simplified to the target vertex count
    ref = meshes[reference_frame]
    ref_colors = None if ref.colors is None else np.asarray(ref.colors, np.float32)
    v0, f0, c0, method = simplify_to_vertices(np.asarray(ref.vertices, np.float32),
                                              np.asarray(ref.faces, np.int32), int(target_vertices), ref_colors)
    colors = c0 if c0 is not None else _colors_from_gaussians(v0, gaussians, reference_frame)
    rest = torch.from_numpy(np.ascontiguousarray(v0, np.float32)).to(dev)
    faces = torch.from_numpy(np.ascontiguousarray(f0, np.int64)).to(dev)
    deformer = Deformer(rest, faces, settings, _tensor(colors, dev))
    generator = torch.Generator().manual_seed(seed)
    samples = int(min(max(2 * rest.shape[0], 2000), 200_000))

    # 3. fit outward from the reference, forwards then backwards
    positions: list[Optional[torch.Tensor]] = [None] * num_frames
    stats: list[dict] = [{} for _ in range(num_frames)]
    positions[reference_frame] = rest.clone()

    def on_frame():
        progress.update("Registering", 0.95 * sum(x is not None for x in positions) / num_frames)
    for frames in (range(reference_frame + 1, num_frames), range(reference_frame - 1, -1, -1)):
        _fit_direction(deformer, rest, frames, meshes, usable, gaussians, colors is not None, samples, generator,
                       positions, stats, on_frame)

    # 4-5. smoothing over time, then the fit error of every frame
    x_all = smooth_trajectories(torch.stack(positions), float(temporal_smoothing))     # [T, V, 3]
    fit_error = _fit_errors(meshes, usable, x_all)
    threshold = BAD_FRAME_FRACTION * deformer.diag
    bad = [t for t in range(num_frames) if not fit_error[t] <= threshold]

    progress.update("Registering", 1.0)
    info = {
        "bad_frames": bad,
        "bad_frame_threshold": threshold,
        "simplification": method,
        "reference_vertices_in": int(np.asarray(ref.vertices).shape[0]),
        "iterations": [s.get("iterations", 0) for s in stats],
        "matched_fraction": [s.get("matched", float("nan")) for s in stats],
        "diverged_frames": [t for t, s in enumerate(stats) if s.get("diverged")],
        "empty_frames": [t for t in range(num_frames) if not usable[t]],
        "seconds": time.perf_counter() - started,
        "device": str(dev),
    }
    return AnimatedMesh(faces=f0.astype(np.int32), vertices=x_all.cpu().numpy().astype(np.float32),
                        colors=None if colors is None else np.asarray(colors, np.float32),
                        fit_error=fit_error, reference_frame=int(reference_frame), info=info)
