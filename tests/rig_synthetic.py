"""Synthetic animations made by known linear blend skinning, for the rig tests and bench/rig.py: a capsule
along z cut into a chain of segments, each bending at its joint about an axis that changes over time, while
the whole body turns and moves; optionally breathing (non-rigid)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ss4d_blender.testing.synthetic import capsule_mesh


@dataclass
class SkinnedCapsule:
    vertices: np.ndarray        # [T, V, 3]
    faces: np.ndarray           # [F, 3]
    weights: np.ndarray         # [V, B] the true weights
    joints: np.ndarray          # [B - 1, 3] the true joints in the rest pose (frame 0)


def rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    x, y, z = axis / np.linalg.norm(axis)
    c, s, C = math.cos(angle), math.sin(angle), 1 - math.cos(angle)
    return np.array([[c + x * x * C, x * y * C - z * s, x * z * C + y * s],
                     [y * x * C + z * s, c + y * y * C, y * z * C - x * s],
                     [z * x * C - y * s, z * y * C + x * s, c + z * z * C]])


def about(point: np.ndarray, R: np.ndarray) -> np.ndarray:
    """4x4 rotation R about a point."""
    M = np.eye(4)
    M[:3, :3], M[:3, 3] = R, point - R @ point
    return M


def skinned_capsule(bones: int = 3, frames: int = 12, rings: int = 40, around: int = 16, seed: int = 0,
                    breathing: float = 0.0, blend: float = 0.08) -> SkinnedCapsule:
    """A chain of `bones` segments along z; segment k bends at joint k-1 relative to segment k-1 (a
    ball joint: the axis turns over time), the whole body turns and moves; `breathing` swells the middle
    radially by up to that share. Frame 0 is the rest pose."""
    rng = np.random.default_rng(seed)
    half = 0.3 * bones
    rest, faces = capsule_mesh(0.15, half, rings, around, rng)
    z_joints = np.linspace(-half, half, bones + 1)[1:-1]
    joints = np.stack([np.zeros_like(z_joints), np.zeros_like(z_joints), z_joints], 1)
    steps = [np.clip((rest[:, 2] - z + blend) / (2 * blend), 0, 1) for z in z_joints]
    steps = [s * s * (3 - 2 * s) for s in steps]                                 # smoothstep at each joint
    cumulative = [np.ones(len(rest))] + steps + [np.zeros(len(rest))]
    weights = np.stack([cumulative[k] - cumulative[k + 1] for k in range(bones)], 1)
    vertices = []
    for t in range(frames):
        u = t / max(frames - 1, 1)
        body = about(np.zeros(3), rotation(np.array([0.3, 0.2, 1.0]), 1.2 * u))
        body[:3, 3] += np.array([0.4 * u, -0.2 * u, 0.1 * math.sin(3 * u)])
        chain = [body]
        for k, j in enumerate(joints):
            axis = np.array([math.cos(2 * u + k), math.sin(2 * u + k), 0.2])
            chain.append(chain[-1] @ about(j, rotation(axis, (0.9 if k % 2 == 0 else -0.7) * math.sin(math.pi * u))))
        homogeneous = np.concatenate([rest, np.ones((len(rest), 1))], 1)
        moved = np.einsum("vb,bij,vj->vi", weights, np.stack(chain)[:, :3], homogeneous)
        if breathing:
            swell = breathing * math.sin(2 * math.pi * u) * np.exp(-(rest[:, 2] / (0.5 * half)) ** 2)
            radial = rest * np.array([1, 1, 0])
            moved += np.einsum("ij,vj->vi", body[:3, :3], swell[:, None] * radial)
        vertices.append(moved)
    return SkinnedCapsule(np.stack(vertices).astype(np.float32), faces.astype(np.int32),
                          weights.astype(np.float32), joints.astype(np.float32))
