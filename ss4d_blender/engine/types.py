"""Plain data passed between stages. numpy arrays only (no torch), so results can be saved,
cached and handed to the Blender layer without the model stack.

Coordinates: the engine works in the model's box [-0.5, 0.5]^3, Z up (as TRELLIS renders it).
The Blender layer scales/places the result.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class Mesh:
    """One triangle mesh. vertices float32 [V, 3], faces int32 [F, 3] (counter-clockwise seen
    from outside), colors float32 [V, 3] in 0..1 (linear) or None."""

    vertices: np.ndarray
    faces: np.ndarray
    colors: Optional[np.ndarray] = None


@dataclass
class GaussianSet:
    """Activated 3D Gaussians of one frame, in the model box.
    xyz [n, 3]; features_dc [n, 1, 3] (SH degree-0 coefficients); opacity [n, 1] in 0..1;
    scaling [n, 3] (activated, world units); rotation [n, 4] normalised quaternion (w, x, y, z)."""

    xyz: np.ndarray
    features_dc: np.ndarray
    opacity: np.ndarray
    scaling: np.ndarray
    rotation: np.ndarray


@dataclass
class AnimatedMesh:
    """One mesh through all frames (output of registration).
    faces int32 [F, 3]; vertices float32 [T, V, 3]; colors float32 [V, 3] or None;
    fit_error float32 [T] (mean distance to that frame's surface, model units);
    reference_frame: index of the frame the topology comes from."""

    faces: np.ndarray
    vertices: np.ndarray
    colors: Optional[np.ndarray]
    fit_error: np.ndarray
    reference_frame: int
    info: dict = field(default_factory=dict)


def frame_list(frames, limit: int = 12) -> str:
    """'Frame 7' / 'Frames 3, 9, 12, ...' (at most `limit` numbers)."""
    frames = [int(f) for f in frames]
    shown = ", ".join(str(f) for f in frames[:limit]) + (", ..." if len(frames) > limit else "")
    return f"{'Frame' if len(frames) == 1 else 'Frames'} {shown}"


def poor_fit_message(frames) -> str:
    """What an artist reads when registration flags frames (`AnimatedMesh.info["bad_frames"]`, given
    here as the numbers the artist knows them by); empty when there are none."""
    if len(frames) == 0:
        return ""
    return (f"{frame_list(frames)}: the mesh could not follow the generated shape there (off by more than 1% "
            f"of its size, or no shape was generated); check them, or try another reference frame.")
