"""Synthetic deforming shapes with known ground truth, for tests and the benchmark.

Each frame is meshed independently (different resolution, random rotation of the
parametrisation), so vertex counts and topology differ between frames, and the motion is an
analytic map of the rest shape: the true position of any rest point at any frame is known.
With `meshing="voxels"` each frame is instead meshed the way the pipeline meshes a decoded frame
(`mesh_through_decoder`: signed distances on a voxel grid, the mesh decoder's FlexiCubes extraction,
the pipeline's clean-up), which gives grid-aligned triangulations with slivers and staircases.
Shapes are built around the z axis; `rest_t` gives the rest-space position of every vertex of
frame t, so correspondence error can be measured against `deform(rest_point, t)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np


def icosphere(subdivisions: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit icosphere: vertices [V,3] float64, faces [F,3] int64 (counter-clockwise outside)."""
    t = (1.0 + 5 ** 0.5) / 2
    v = [(-1, t, 0), (1, t, 0), (-1, -t, 0), (1, -t, 0), (0, -1, t), (0, 1, t), (0, -1, -t), (0, 1, -t),
         (t, 0, -1), (t, 0, 1), (-t, 0, -1), (-t, 0, 1)]
    f = [(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4), (11, 10, 2),
         (10, 7, 6), (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9), (4, 9, 5),
         (2, 4, 11), (6, 2, 10), (8, 6, 7), (9, 8, 1)]
    verts = np.array(v, float)
    verts /= np.linalg.norm(verts, axis=1, keepdims=True)
    faces = np.array(f, np.int64)
    for _ in range(subdivisions):
        e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
        key = np.sort(e, axis=1)
        uniq, inv = np.unique(key, axis=0, return_inverse=True)
        mid = verts[uniq[:, 0]] + verts[uniq[:, 1]]
        mid /= np.linalg.norm(mid, axis=1, keepdims=True)
        m = inv.reshape(3, -1).T + verts.shape[0]           # midpoints of edges 01, 12, 20
        a, b, c = faces[:, 0], faces[:, 1], faces[:, 2]
        faces = np.concatenate([np.stack([a, m[:, 0], m[:, 2]], 1), np.stack([b, m[:, 1], m[:, 0]], 1),
                                np.stack([c, m[:, 2], m[:, 1]], 1), np.stack(m.T, 1)])
        verts = np.concatenate([verts, mid])
    return verts, faces


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def capsule_mesh(radius: float, half_length: float, rings: int, around: int, rng: np.random.Generator,
                 squash: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Capsule around z (hemispherical caps; half_length 0 gives a sphere), meshed by rings
    evenly spaced along the profile's arc length, each ring with a random angular phase.
    squash scales y (an elliptic cross-section makes twisting visible)."""
    arc = math.pi * radius + 2 * half_length
    s = (np.arange(1, rings) + rng.uniform(-0.25, 0.25, rings - 1)) * arc / rings
    cap = 0.5 * math.pi * radius
    rho = np.where(s < cap, radius * np.sin(s / radius),
                   np.where(s > arc - cap, radius * np.sin((arc - s) / radius), radius))
    z = np.where(s < cap, -half_length - radius * np.cos(s / radius),
                 np.where(s > arc - cap, half_length + radius * np.cos((arc - s) / radius),
                          -half_length + (s - cap)))
    phase = rng.uniform(0, 2 * math.pi)
    theta = phase + 2 * math.pi * np.arange(around) / around + (np.arange(rings - 1) * math.pi / around)[:, None]
    ring_v = np.stack([rho[:, None] * np.cos(theta), rho[:, None] * np.sin(theta) * squash,
                       np.broadcast_to(z[:, None], theta.shape)], -1).reshape(-1, 3)
    verts = np.concatenate([[[0, 0, -half_length - radius]], ring_v, [[0, 0, half_length + radius]]])
    top = verts.shape[0] - 1
    faces = []
    i = np.arange(around)
    j = (i + 1) % around
    faces.append(np.stack([np.zeros(around, int), 1 + j, 1 + i], 1))
    for k in range(rings - 2):
        a, b = 1 + k * around, 1 + (k + 1) * around
        faces.append(np.stack([a + i, a + j, b + i], 1))
        faces.append(np.stack([a + j, b + j, b + i], 1))
    last = 1 + (rings - 2) * around
    faces.append(np.stack([np.full(around, top), last + i, last + j], 1))
    return verts, np.concatenate(faces).astype(np.int64)


# ---- analytic motions (rest points [n,3] -> deformed [n,3], phase u in [0, 1]) --------------

def bend(points: np.ndarray, angle: float, start: float, end: float) -> np.ndarray:
    """Bend towards +x over z in [start, end] (circular arc), rigid above, identity below."""
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    if abs(angle) < 1e-9:
        return points.copy()
    k = angle / (end - start)
    r = 1.0 / k
    zc = np.clip(z, start, end)
    th = k * (zc - start)
    over = np.maximum(z - end, 0.0)
    nx = r - (r - x) * np.cos(th) + over * np.sin(th)
    nz = start + (r - x) * np.sin(th) + over * np.cos(th)
    below = z < start
    nx = np.where(below, x, nx)
    nz = np.where(below, z, nz)
    return np.stack([nx, y, nz], 1)


def twist(points: np.ndarray, angle: float, z0: float, z1: float) -> np.ndarray:
    th = angle * (points[:, 2] - z0) / (z1 - z0)
    c, s = np.cos(th), np.sin(th)
    x, y = points[:, 0], points[:, 1]
    return np.stack([c * x - s * y, s * x + c * y, points[:, 2]], 1)


def wave(points: np.ndarray, amplitude: float, wavelength: float, shift: float) -> np.ndarray:
    """Sideways travelling wave along z as a shear: every cross-section keeps its orientation and
    moves along x (compare `swim`, where the sections turn with the body)."""
    out = points.copy()
    out[:, 0] += amplitude * np.sin(2 * math.pi * (points[:, 2] / wavelength - shift))
    return out


def swim(points: np.ndarray, angle: float, wavelength: float, shift: float, samples: int = 4001) -> np.ndarray:
    """Bending wave travelling along z, the way an eel swims: the axis keeps its length (z is arc
    length along it) and bends into a serpenoid curve, whose direction turns by
    θ(s) = angle·sin(2π(s/λ − shift)) from z, with s = 0 fixed at the origin; every cross-section
    stays rigid and normal to the curve. The curve is integrated numerically (trapezoid rule on
    `samples` points), far finer than any mesh."""
    z = points[:, 2]
    s = np.linspace(min(z.min(), 0.0), max(z.max(), 0.0), samples)
    theta = angle * np.sin(2 * math.pi * (s / wavelength - shift))

    def integral(f):                         # ∫_0^s f, on the grid
        c = np.concatenate([[0.0], np.cumsum(0.5 * np.diff(s) * (f[1:] + f[:-1]))])
        return c - np.interp(0.0, s, c)

    axis_x, axis_z = np.interp(z, s, integral(np.sin(theta))), np.interp(z, s, integral(np.cos(theta)))
    th = angle * np.sin(2 * math.pi * (z / wavelength - shift))
    x = points[:, 0]                          # along the section's normal (cos θ, 0, −sin θ)
    return np.stack([axis_x + x * np.cos(th), points[:, 1], axis_z - x * np.sin(th)], 1)


def pulse(points: np.ndarray, amplitude: float, wavelength: float, shift: float) -> np.ndarray:
    """Radial travelling wave along z (peristalsis, a breathing bulge): every point moves straight away
    from or towards the z axis, by the factor 1 + amplitude·sin(2π(z/λ − shift)). The bulges travel
    along the body; the material does not."""
    out = points.copy()
    out[:, :2] *= (1.0 + amplitude * np.sin(2 * math.pi * (points[:, 2] / wavelength - shift)))[:, None]
    return out


def slide_right_part(points: np.ndarray, distance: float) -> np.ndarray:
    """Points with x > 0 move by `distance` along y; the rest stay (two parts sliding past each other)."""
    out = points.copy()
    out[points[:, 0] > 0, 1] += distance
    return out


def open_petals(points: np.ndarray, growth: float, petals: int = 5) -> np.ndarray:
    """Radial growth of a ball into petals on its upper half (far from isometric)."""
    rho = np.linalg.norm(points, axis=1, keepdims=True)
    d = points / np.maximum(rho, 1e-12)
    phi = np.arctan2(d[:, 1], d[:, 0])
    lobe = np.maximum(d[:, 2], 0.0) ** 2 * (0.5 + 0.5 * np.cos(petals * phi)) ** 4
    return points * (1.0 + growth * lobe)[:, None]


def texture(points: np.ndarray, seed: int = 0, wavelength: float = 1.0) -> np.ndarray:
    """A smooth colour pattern [n, 3] in 0.15..0.85 painted on rest-space points: each channel a
    sinusoid along its own random direction (features about `wavelength` across). The paint travels
    with the material, like the colours of a generated mesh."""
    rng = np.random.default_rng(10_000 + seed)
    directions = rng.normal(size=(3, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    phase = rng.uniform(0, 2 * math.pi, 3)
    return 0.5 + 0.35 * np.sin(2 * math.pi * points @ directions.T / wavelength + phase)


def mesh_through_decoder(vertices: np.ndarray, faces: np.ndarray, grid: int, centre: np.ndarray,
                         scale: float, sdf_noise: float = 0.0, rng: Optional[np.random.Generator] = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Mesh a closed surface as the pipeline meshes a decoded frame. The surface (vertices [n, 3],
    faces [m, 3], counter-clockwise outside, far finer than a grid cell) is mapped into the decoder's
    [-0.5, 0.5]^3 box by (p - centre) · scale; its signed distance on the corners of a grid^3 voxel grid
    becomes per-voxel mesh-decoder features (no deformation, neutral FlexiCubes weights) for the
    voxels near the surface and inside it; `mesh_from_decoder_features` and `clean_mesh` do the rest,
    as in the pipeline. sdf_noise: Gaussian noise (this many grid cells) on the distances near the
    surface, like a decoder's errors: bumps fixed to the grid, not to the material. Returns vertices
    [k, 3] float32 (back in the surface's units), faces [l, 3] int32: a dual-grid triangulation with
    nothing in common with the input's. For tests and benchmarks: it holds dense grid^3 arrays, which
    is fine up to grid ~128."""
    import torch

    from ..engine.mesh import clean_mesh
    from ..engine.mesh.decoder_to_mesh import NUM_CHANNELS_NO_COLOR, SDF, mesh_from_decoder_features
    from ..engine.mesh.grid import corner_offsets, pack, unpack
    from ..engine.registration.geometry import SurfaceDistance, face_normals
    from ..engine.registration.knn import PointGrid

    R = int(grid)
    v = (torch.from_numpy(np.asarray(vertices, np.float64)) - torch.from_numpy(np.asarray(centre, np.float64))) * scale
    f = torch.from_numpy(np.asarray(faces, np.int64))
    # corners of the cubes holding a surface vertex are "near": they get the exact signed distance. A
    # grid edge the surface crosses always has a near end (surface vertices are < half a cell apart)
    offsets = corner_offsets("cpu")
    held = torch.unique(pack(torch.floor((v + 0.5) * R).long().clamp(0, R - 1), R))
    near = torch.unique(pack(unpack(held, R)[:, None, :] + offsets[None], R + 1))
    q = unpack(near, R + 1).double() / R - 0.5
    point, face, dist = SurfaceDistance(v, f, PointGrid(v, cell=2.0 / R)).closest(q)
    side = ((q - point) * face_normals(v, f)[face.clamp(min=0)]).sum(1)
    sdf = torch.full(((R + 1) ** 3,), 2.0 / R, dtype=torch.float64)
    sdf[near] = torch.where(side < 0, -dist, dist)
    if sdf_noise > 0:
        sdf[near] += torch.from_numpy((rng or np.random.default_rng()).normal(0.0, sdf_noise / R, near.shape[0]))
    # every other corner is inside or outside as a whole: outside when reachable from the box's walls
    # along grid edges without passing a near corner
    free = torch.ones((R + 1) ** 3, dtype=torch.bool)
    free[near] = False
    free = free.reshape(R + 1, R + 1, R + 1)
    blocked = (~free).long()
    outside = torch.zeros_like(free)
    for axis in range(3):                                   # seen from a wall along a grid line ...
        outside |= (blocked.cumsum(axis) == 0) | (blocked.flip(axis).cumsum(axis).flip(axis) == 0)
    outside &= free
    while True:                                             # ... then spread along grid edges
        grown = outside.clone()
        for axis in range(3):
            grown[(slice(None),) * axis + (slice(1, None),)] |= outside[(slice(None),) * axis + (slice(None, -1),)]
            grown[(slice(None),) * axis + (slice(None, -1),)] |= outside[(slice(None),) * axis + (slice(1, None),)]
        grown &= free
        if bool((grown == outside).all()):
            break
        outside = grown
    sdf[(free & ~outside).reshape(-1)] = -2.0 / R
    # active voxels: every cube with a near or inside corner (their corners carry the values above)
    cubes = torch.stack(torch.meshgrid(*[torch.arange(R)] * 3, indexing="ij"), -1).reshape(-1, 3)
    corner_keys = pack(cubes[:, None, :] + offsets[None], R + 1)                # [R^3, 8]
    corner_sdf = sdf[corner_keys]
    active = (corner_sdf < 2.0 / R).any(1)
    cubes, sdf = cubes[active], corner_sdf[active]
    feats = torch.zeros(cubes.shape[0], NUM_CHANNELS_NO_COLOR)
    feats[:, SDF] = (sdf + 1.0 / R).float()                 # the decoder's sdf carries a bias of -1/R
    mesh = clean_mesh(mesh_from_decoder_features(cubes, feats, R), min_component_fraction=0.05)
    out = mesh.vertices.astype(np.float64) / scale + np.asarray(centre, np.float64)
    return out.astype(np.float32), mesh.faces.astype(np.int32)


def rest_positions(points: np.ndarray, surface: np.ndarray, faces: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """Rest-space positions [k, 3] of points [k, 3] on (or very near) a deformed surface (vertices
    [n, 3], faces [m, 3]) whose vertices have rest positions `rest` [n, 3]: the rest position at the
    closest surface point, interpolated barycentrically over its triangle."""
    import torch

    from ..engine.registration.geometry import SurfaceDistance, barycentric

    v = torch.from_numpy(np.asarray(surface, np.float64))
    f = torch.from_numpy(np.asarray(faces, np.int64))
    point, face, _ = SurfaceDistance(v, f).closest(torch.from_numpy(np.asarray(points, np.float64)))
    tri = f[face.clamp(min=0)]
    w = barycentric(point, v[tri[:, 0]], v[tri[:, 1]], v[tri[:, 2]])
    return (w[..., None] * torch.from_numpy(np.asarray(rest, np.float64))[tri]).sum(1).numpy()


PAIR_GAP = 0.1          # capsule_pair_slide: gap between the two capsules (radius 0.5)


@dataclass
class SyntheticSequence:
    vertices: list          # per frame float32 [n_t, 3]
    faces: list             # per frame int32 [m_t, 3]
    rest: list              # per frame float64 [n_t, 3] rest-space position of each vertex
    deform: Callable        # deform(rest_points [n,3], frame) -> [n,3]
    diagonal: float         # bounding-box diagonal over the whole sequence
    colors: Optional[list] = None   # per frame float32 [n_t, 3] when textured


def make_sequence(kind: str, frames: int = 32, resolution: float = 1, seed: int = 0,
                  textured: bool = False, meshing: str = "parametric", grid: int = 64,
                  sdf_noise: float = 0.0, amplitude: float = 1.0) -> SyntheticSequence:
    """kind: 'sphere_bend', 'capsule_bend', 'capsule_twist', 'capsule_wave', 'cylinder_bend90',
    'flower_open' (a ball growing five petals up to 4x its radius: strong, non-isometric change),
    'capsule_pair_slide' (two round capsules side by side, PAIR_GAP apart, one sliding past the other
    like scissoring legs: parts close in space that must not drag each other), 'capsule_swim' (the
    travelling wave as a bending wave: see `swim`; 'capsule_wave' is the shear version), 'capsule_pulse'
    (a radial travelling wave: bulges travel one wavelength along the body, see `pulse`).
    resolution scales the per-frame vertex count (1 -> roughly 0.7k-2.5k vertices, 0.5 -> half).
    textured: every frame's vertices get the colour of `texture` at their rest position.
    meshing: "parametric" (rings around the axis, see `capsule_mesh`) or "voxels": every frame is a
    fine parametric mesh moved by the motion, then meshed again by `mesh_through_decoder` on a
    grid^3 voxel grid over the whole sequence's bounding box (as the pipeline meshes decoded frames;
    `resolution` is then unused; sdf_noise: see `mesh_through_decoder`).
    amplitude scales how far the motion goes (bend and twist angles, the waves' amplitudes, petal growth,
    slide distance); 1 is the motion the tests use."""
    if meshing not in ("parametric", "voxels"):
        raise ValueError(f"unknown meshing {meshing!r}")
    rng = np.random.default_rng(seed)
    r, h, squash = 0.5, 1.0, 0.7
    a = amplitude
    if kind == "sphere_bend":
        r, h, squash = 1.0, 0.0, 1.0
        motion = lambda p, u: bend(p, a * 0.4 * math.sin(math.pi * u), -0.8, 0.8)
    elif kind == "capsule_bend":
        motion = lambda p, u: bend(p, a * 0.8 * u, -1.0, 1.0)
    elif kind == "capsule_twist":
        motion = lambda p, u: twist(p, a * math.pi / 3 * u, -1.5, 1.5)
    elif kind == "capsule_wave":
        motion = lambda p, u: wave(p, a * 0.12, 3.0, 0.5 * u)
    elif kind == "capsule_swim":
        motion = lambda p, u: swim(p, a * 0.25, 3.0, 0.5 * u)
    elif kind == "capsule_pulse":
        motion = lambda p, u: pulse(p, a * 0.15, 1.5, u)
    elif kind == "flower_open":
        r, h, squash = 0.5, 0.0, 1.0
        motion = lambda p, u: open_petals(p, a * 3.0 * u)
    elif kind == "capsule_pair_slide":
        r, h, squash = 0.5, 1.0, 1.0
        motion = lambda p, u: slide_right_part(p, a * 0.8 * u)
    elif kind == "cylinder_bend90":
        r, h, squash = 0.2, 1.0, 1.0
        motion = lambda p, u: bend(p, a * 0.5 * math.pi * u, -0.4, 0.4)
    else:
        raise ValueError(f"unknown synthetic sequence {kind!r}")

    def deform(points, t):
        return motion(points, t / max(frames - 1, 1))

    def mesh_once():
        if h == 0.0:
            around = int(rng.integers(50, 58) * resolution ** 0.5)
            v, f = capsule_mesh(r, 0.0, max(4, around // 2), around, rng)
            return v @ random_rotation(rng).T, f
        around = int(rng.integers(36, 44) * resolution ** 0.5)
        rings = int(rng.integers(44, 52) * resolution ** 0.5 * (1 + 2 * h / (math.pi * r)) / 2.3)
        v, f = capsule_mesh(r, h, rings, around, rng, squash)
        rot = rng.uniform(0, 2 * math.pi)
        if squash == 1.0:     # axisymmetric: any rotation about z is the same surface
            c, s = math.cos(rot), math.sin(rot)
            v = v @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).T
        return v, f

    if meshing == "voxels":
        verts, faces, rests = _voxel_frames(kind, frames, grid, seed, deform, r, h, squash, sdf_noise)
    else:
        verts, faces, rests = [], [], []
        for t in range(frames):
            v, f = _side_by_side(mesh_once(), mesh_once(), r) if kind == "capsule_pair_slide" else mesh_once()
            rests.append(v)
            verts.append(deform(v, t).astype(np.float32))
            faces.append(f.astype(np.int32))
    allv = np.concatenate(verts)
    diag = float(np.linalg.norm(allv.max(0) - allv.min(0)))
    colors = [texture(rest, seed).astype(np.float32) for rest in rests] if textured else None
    return SyntheticSequence(verts, faces, rests, deform, diag, colors)


def _side_by_side(a: tuple, b: tuple, r: float) -> tuple[np.ndarray, np.ndarray]:
    """Two meshes (vertices, faces) of radius r around the z axis, put PAIR_GAP apart along x."""
    (va, fa), (vb, fb) = a, b
    shift = np.array([r + 0.5 * PAIR_GAP, 0.0, 0.0])
    return np.concatenate([va - shift, vb + shift]), np.concatenate([fa, fb + len(va)])


def _voxel_frames(kind: str, frames: int, grid: int, seed: int, deform: Callable, r: float, h: float,
                  squash: float, sdf_noise: float) -> tuple[list, list, list]:
    """make_sequence(meshing="voxels"): one fine rest mesh, moved by the motion and voxel-meshed per
    frame. Returns per-frame vertices, faces and rest positions."""
    rng = np.random.default_rng(seed)

    def fine_mesh(spacing):
        around = int(math.ceil(2 * math.pi * r / spacing))
        rings = int(math.ceil((math.pi * r + 2 * h) / spacing))
        return capsule_mesh(r, h, rings, around, rng, squash)

    def shapes(spacing):
        if kind == "capsule_pair_slide":
            return _side_by_side(fine_mesh(spacing), fine_mesh(spacing), r)
        return fine_mesh(spacing)

    # the grid spans the whole sequence's bounding box (with a margin), like the decoder's fixed box
    coarse, _ = shapes(0.05)
    moved = np.concatenate([deform(coarse, t) for t in range(frames)])
    lo, hi = moved.min(0), moved.max(0)
    centre, scale = 0.5 * (lo + hi), 0.9 / float((hi - lo).max())
    fine, fine_faces = shapes(0.5 / (grid * scale))          # half a grid cell between fine vertices
    verts, faces, rests = [], [], []
    for t in range(frames):
        surface = deform(fine, t)
        v, f = mesh_through_decoder(surface, fine_faces, grid, centre, scale, sdf_noise, rng)
        verts.append(v)
        faces.append(f)
        rests.append(rest_positions(v, surface, fine_faces, fine))
    return verts, faces, rests


def material_points(deform: Callable, rest: np.ndarray, points: np.ndarray, frame: int, steps: int = 3) -> np.ndarray:
    """The rest-space points [n, 3] that the motion takes exactly to `points` [n, 3] at `frame`, found by
    Newton steps from `rest` (their rest positions on the smooth surface; Jacobians by central
    differences). A vertex a little off the surface (noise on the distances, a simplified mesh) is then
    followed as the point of space it is, so its own offset is not counted as an error, and its faces'
    true orientation is that of the faces themselves, moved."""
    x = np.asarray(rest, np.float64).copy()
    target = np.asarray(points, np.float64)
    h = 1e-6 * max(float(np.abs(x).max()), 1.0)
    for _ in range(steps):
        jac = np.stack([(deform(x + h * e, frame) - deform(x - h * e, frame)) / (2 * h) for e in np.eye(3)], -1)
        x += np.linalg.solve(jac, (target - deform(x, frame))[..., None])[..., 0]
    return x


def registration_errors(seq: SyntheticSequence, anim) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How well `anim` (an AnimatedMesh registered from `seq`) follows the
    analytic motion. Per frame [T]: mean correspondence error (registered vertex vs the analytic
    motion of that reference vertex) and mean distance to the frame's surface, both as fractions of
    the bounding-box diagonal, and the share of faces whose orientation flipped."""
    import torch

    from ..engine.registration.geometry import SurfaceDistance

    r = anim.reference_frame
    if anim.vertices.shape[1] == len(seq.vertices[r]) and np.allclose(anim.vertices[r], seq.vertices[r], atol=1e-6):
        rest = seq.rest[r]
    else:                     # a simplified reference: its vertices' rest positions, from the frame's surface
        rest = rest_positions(anim.vertices[r], seq.vertices[r], seq.faces[r], seq.rest[r])
    rest = material_points(seq.deform, rest, anim.vertices[r], r)
    f = anim.faces
    corr, surf, flips = [], [], []
    for t in range(len(seq.vertices)):
        truth = seq.deform(rest, t)
        x = anim.vertices[t]
        corr.append(np.linalg.norm(x - truth, axis=1).mean() / seq.diagonal)
        dist = SurfaceDistance(torch.from_numpy(seq.vertices[t]), torch.from_numpy(seq.faces[t].astype(np.int64)))
        surf.append(float(dist(torch.from_numpy(x)).mean()) / seq.diagonal)
        n_fit = np.cross(x[f[:, 1]] - x[f[:, 0]], x[f[:, 2]] - x[f[:, 0]])
        n_true = np.cross(truth[f[:, 1]] - truth[f[:, 0]], truth[f[:, 2]] - truth[f[:, 0]])
        flips.append(float(((n_fit * n_true).sum(1) <= 0).mean()))
    return np.array(corr), np.array(surf), np.array(flips)

