"""The fitted rig and its file (RIG.npz), in plain numpy.

RIG.npz holds `rest_vertices` [V, 3], `faces` [F, 3], `weights` [V, B] (dense float32), `transforms`
[T, B, 4, 4] (rest pose -> frame t, column vectors: v_t = Σ_b w_vb · transforms[t, b] · [v_rest, 1]),
`parents` [B] (-1 for the root), `heads` [B, 3], `tails` [B, 3], `rms_error` and `max_error` [T] (% of the
rest pose's bounding-box diagonal) and, when asked for, `correctives` [T, V, 3]: rest-pose offsets with
Σ_b w_vb · transforms[t, b] · [v_rest + correctives[t], 1] = the animation's frame t exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import InputError

FIELDS = ("rest_vertices", "faces", "weights", "transforms", "parents", "heads", "tails", "rms_error", "max_error")


@dataclass
class Rig:
    rest_vertices: np.ndarray           # [V, 3] float32
    faces: np.ndarray                   # [F, 3] int32
    weights: np.ndarray                 # [V, B] float32, ≤ 4 non-zero per row, rows sum to 1
    transforms: np.ndarray              # [T, B, 4, 4] float32, rest -> frame t
    parents: np.ndarray                 # [B] int32, -1 for the root
    heads: np.ndarray                   # [B, 3] float32
    tails: np.ndarray                   # [B, 3] float32
    rms_error: np.ndarray               # [T] float32, % of the diagonal
    max_error: np.ndarray               # [T] float32, % of the diagonal
    correctives: Optional[np.ndarray] = None    # [T, V, 3] float32 rest-pose offsets, or None
    info: dict = field(default_factory=dict)    # how it was made (bone count choice, seconds); not saved

    @property
    def num_bones(self) -> int:
        return self.weights.shape[1]

    @property
    def rms_overall(self) -> float:
        """RMS error over all frames and vertices, % of the diagonal."""
        return float(np.sqrt(np.mean(self.rms_error.astype(np.float64) ** 2)))

    @property
    def max_overall(self) -> float:
        return float(self.max_error.max())

    def skin(self, with_correctives: bool = False) -> np.ndarray:
        """The rig's animation [T, V, 3] by linear blend skinning (float64)."""
        rest = self.rest_vertices.astype(np.float64)
        if with_correctives and self.correctives is not None:
            rest = rest[None] + self.correctives
        else:
            rest = np.broadcast_to(rest, (self.transforms.shape[0],) + rest.shape)
        blended = np.einsum("vb,tbij->tvij", self.weights.astype(np.float64), self.transforms[:, :, :3])
        return np.einsum("tvij,tvj->tvi", blended[..., :3], rest) + blended[..., 3]

    def save(self, path) -> Path:
        path = Path(path)
        arrays = {name: getattr(self, name) for name in FIELDS}
        if self.correctives is not None:
            arrays["correctives"] = self.correctives
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **arrays)
        return path

    @classmethod
    def load(cls, path) -> "Rig":
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [name for name in FIELDS if name not in data.files]
                if missing:
                    raise InputError(f"{path} is not a rig file: it lacks {', '.join(missing)}.")
                arrays = {name: data[name] for name in FIELDS}
                correctives = data["correctives"] if "correctives" in data.files else None
        except (OSError, ValueError) as err:
            raise InputError(f"Cannot read the rig file {path}: {err}") from err
        return cls(**arrays, correctives=correctives)
