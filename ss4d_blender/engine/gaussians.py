"""3D Gaussians: from the Gaussian decoder's raw per-voxel output to activated attributes, and the
standard 3D Gaussian Splatting ``.ply`` file.

Raw decoder output
------------------
Each active voxel carries ``G`` Gaussians (``num_gaussians``), 14 raw numbers each, grouped by
attribute (not by Gaussian) in this channel order::

    xyz offsets   [0, 3G)     (G, 3)
    features_dc   [3G, 6G)    (G, 1, 3)  SH degree-0 colour coefficients
    scaling       [6G, 9G)    (G, 3)
    rotation      [9G, 13G)   (G, 4)     quaternion w, x, y, z
    opacity       [13G, 14G)  (G, 1)

Activation (``r`` is a raw value already multiplied by its per-attribute ``lr`` factor)::

    xyz      = (voxel + 0.5) / res + tanh(r + perturbation) * voxel_size / (2 res) - 0.5
    colour   = r
    opacity  = sigmoid(r + logit(opacity_bias))
    scaling  = sqrt(act(r + act^-1(scaling_bias))^2 + filter_3d^2)     act = softplus or exp
    rotation = normalize(r + (1, 0, 0, 0))

``perturbation`` (only with ``perturb_offset``) is a fixed per-Gaussian offset: a 3D Hammersley
point set mapped to ``[-1, 1]`` and pre-distorted by ``atanh(p / voxel_size)`` so that with zero raw
offsets the G Gaussians of a voxel spread evenly over it.  ``filter_3d`` (``3d_filter_kernel_size``)
is the 3D smoothing filter: no Gaussian is thinner than it.  The box is ``[-0.5, 0.5]^3``.

PLY storage
-----------
3DGS viewers read pre-activation values: ``opacity`` is the logit of the opacity, ``scale_i`` the log
of the scale, ``rot_0..3`` the quaternion (w, x, y, z), ``f_dc_0..2`` the SH DC coefficients, and
``nx ny nz`` are zero.  :func:`save_ply` writes that (binary little endian, float32);
:func:`load_ply` reads it back to activated values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .types import GaussianSet

# Rotation TRELLIS applies by default when it saves a .ply: the model box is Z up, most splat
# viewers are Y up.  Pass it as ``transform`` to :func:`save_ply` to get TRELLIS's files.
Z_UP_TO_Y_UP = ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0))

RAW_CHANNELS_PER_GAUSSIAN = 14
# attribute -> (numbers per Gaussian, shape per Gaussian), in the decoder's channel order
_ATTRIBUTES: Tuple[Tuple[str, int, Tuple[int, ...]], ...] = (
    ("xyz", 3, (3,)),
    ("features_dc", 3, (1, 3)),
    ("scaling", 3, (3,)),
    ("rotation", 4, (4,)),
    ("opacity", 1, (1,)),
)
# the reference's names of the per-attribute learning-rate factors in representation_config["lr"]
_LR_KEYS = {"xyz": "_xyz", "features_dc": "_features_dc", "scaling": "_scaling",
            "rotation": "_rotation", "opacity": "_opacity"}


# ------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class GaussianConfig:
    """The decoder's ``representation_config`` (reference key names in brackets).

    num_gaussians [num_gaussians]: Gaussians per voxel, G.
    voxel_size [voxel_size]: how far (in voxels) a Gaussian may move from its voxel centre: the
        offset range is ``voxel_size / 2`` voxels each way.
    perturb_offset [perturb_offset]: add the fixed Hammersley perturbation to the raw offsets.
    lr [lr]: per-attribute factor the raw values are multiplied by (keys xyz, features_dc, ...).
    scaling_bias [scaling_bias]: activated scale of a raw 0 (before the 3D filter).
    opacity_bias [opacity_bias]: opacity of a raw 0.
    scaling_activation [scaling_activation]: "softplus" or "exp".
    filter_3d [3d_filter_kernel_size]: minimum scale (3D smoothing filter).
    filter_2d [2d_filter_kernel_size]: screen-space filter of the renderer; not used by the
        attributes (kept so a config round-trips).
    """

    num_gaussians: int = 32
    voxel_size: float = 1.5
    perturb_offset: bool = False
    lr: Dict[str, float] = field(default_factory=lambda: {k: 1.0 for k in _LR_KEYS})
    scaling_bias: float = 0.01
    opacity_bias: float = 0.1
    scaling_activation: str = "exp"
    filter_3d: float = 0.0
    filter_2d: float = 0.0

    @classmethod
    def from_reference(cls, cfg: dict) -> "GaussianConfig":
        """Build from the reference's ``representation_config`` dict (unknown keys are an error)."""
        known = {"num_gaussians", "voxel_size", "perturb_offset", "lr", "scaling_bias", "opacity_bias",
                 "scaling_activation", "3d_filter_kernel_size", "2d_filter_kernel_size"}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"unknown representation_config keys: {sorted(unknown)}")
        lr = {name: 1.0 for name in _LR_KEYS}
        for name, ref_key in _LR_KEYS.items():
            if ref_key in cfg.get("lr", {}):
                lr[name] = float(cfg["lr"][ref_key])
        activation = cfg.get("scaling_activation", "exp")
        if activation not in ("exp", "softplus"):
            raise ValueError(f"unknown scaling_activation {activation!r}")
        return cls(
            num_gaussians=int(cfg["num_gaussians"]),
            voxel_size=float(cfg.get("voxel_size", 1.5)),
            perturb_offset=bool(cfg.get("perturb_offset", False)),
            lr=lr,
            scaling_bias=float(cfg.get("scaling_bias", 0.01)),
            opacity_bias=float(cfg.get("opacity_bias", 0.1)),
            scaling_activation=activation,
            filter_3d=float(cfg.get("3d_filter_kernel_size", 0.0)),
            filter_2d=float(cfg.get("2d_filter_kernel_size", 0.0)),
        )

    @property
    def raw_channels(self) -> int:
        """Width of the decoder's raw output per voxel: 14 G."""
        return RAW_CHANNELS_PER_GAUSSIAN * self.num_gaussians


def raw_channel_slices(num_gaussians: int) -> Dict[str, slice]:
    """attribute name -> its channel range in the raw decoder output (see the module docstring)."""
    slices, start = {}, 0
    for name, width, _ in _ATTRIBUTES:
        slices[name] = slice(start, start + width * num_gaussians)
        start += width * num_gaussians
    return slices


# ------------------------------------------------------------------------------- perturbation
def _radical_inverse(base: int, n: int) -> float:
    """Van der Corput radical inverse of n in the given base (digits mirrored behind the point)."""
    value, scale = 0.0, 1.0 / base
    while n > 0:
        n, digit = divmod(n, base)
        value += digit * scale
        scale /= base
    return value


def hammersley_points(num_points: int) -> torch.Tensor:
    """3D Hammersley set in [0, 1)^3: point i = (i / n, radical_inverse_2(i), radical_inverse_3(i)).
    Returns float32 [n, 3]."""
    points = [[i / num_points, _radical_inverse(2, i), _radical_inverse(3, i)] for i in range(num_points)]
    return torch.tensor(points, dtype=torch.float32)


def offset_perturbation(num_gaussians: int, voxel_size: float) -> torch.Tensor:
    """The fixed raw-offset perturbation ``atanh((2 p - 1) / voxel_size)`` of the Hammersley points p:
    float32 [G, 3] (the decoder's ``offset_perturbation`` buffer)."""
    return torch.atanh((hammersley_points(num_gaussians) * 2 - 1) / voxel_size)


# --------------------------------------------------------------------------------- activation
def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """x with softplus(x) = y (y > 0)."""
    return y + torch.log(-torch.expm1(-y))


def logit(p: torch.Tensor) -> torch.Tensor:
    """x with sigmoid(x) = p (0 < p < 1)."""
    return torch.log(p / (1 - p))


@dataclass
class GaussianFrame:
    """Activated Gaussians of one frame as torch tensors (n = voxels x G), model box [-0.5, 0.5]^3.

    xyz [n, 3]; features_dc [n, 1, 3]; opacity [n, 1] in (0, 1); scaling [n, 3] (world units, 3D filter
    applied); rotation [n, 4] unit quaternion (w, x, y, z)."""

    xyz: torch.Tensor
    features_dc: torch.Tensor
    opacity: torch.Tensor
    scaling: torch.Tensor
    rotation: torch.Tensor

    def __len__(self) -> int:
        return self.xyz.shape[0]

    def to_gaussian_set(self) -> GaussianSet:
        """numpy float32 copy (``engine.types.GaussianSet``)."""
        def arr(t: torch.Tensor) -> np.ndarray:
            return t.detach().to("cpu", torch.float32).numpy().copy()

        return GaussianSet(xyz=arr(self.xyz), features_dc=arr(self.features_dc), opacity=arr(self.opacity),
                           scaling=arr(self.scaling), rotation=arr(self.rotation))


def activate_gaussians(
    raw: torch.Tensor,
    voxel_coords: torch.Tensor,
    resolution: int,
    config: GaussianConfig,
    perturbation: Optional[torch.Tensor] = None,
) -> GaussianFrame:
    """Raw decoder output of one frame -> activated Gaussians.

    Args:
        raw: ``[n_vox, 14 G]`` raw decoder output (channel order in the module docstring).
        voxel_coords: ``[n_vox, 3]`` integer voxel x, y, z at ``resolution``.
        resolution: voxel grid resolution of the structured latent.
        config: the representation config.
        perturbation: ``[G, 3]`` offset perturbation (the decoder's buffer); required with
            ``config.perturb_offset``.
    Returns:
        GaussianFrame with ``n_vox * G`` Gaussians, voxel-major (the G Gaussians of voxel 0 first).
        Computed in float32.
    """
    G = config.num_gaussians
    if raw.shape[-1] != config.raw_channels:
        raise ValueError(f"raw output has {raw.shape[-1]} channels, expected 14 x {G} = {config.raw_channels}")
    raw = raw.float()
    n_vox = raw.shape[0]
    parts = {}
    for (name, _, shape), sl in zip(_ATTRIBUTES, raw_channel_slices(G).values()):
        parts[name] = raw[:, sl].reshape(n_vox, G, *shape) * config.lr[name]

    offset = parts["xyz"]  # [n_vox, G, 3]
    if config.perturb_offset:
        if perturbation is None:
            raise ValueError("perturb_offset needs the offset perturbation")
        offset = offset + perturbation.to(offset)
    offset = torch.tanh(offset) / resolution * 0.5 * config.voxel_size
    centres = (voxel_coords.float() + 0.5) / resolution  # [n_vox, 3], in [0, 1]^3
    xyz = (centres.unsqueeze(1) + offset).reshape(-1, 3) - 0.5

    opacity_bias = logit(torch.tensor(config.opacity_bias, dtype=torch.float32))
    opacity = torch.sigmoid(parts["opacity"].reshape(-1, 1) + opacity_bias.to(raw.device))

    raw_scaling = parts["scaling"].reshape(-1, 3)
    bias = torch.tensor(config.scaling_bias, dtype=torch.float32)
    if config.scaling_activation == "softplus":
        scaling = F.softplus(raw_scaling + inverse_softplus(bias).to(raw.device))
    else:
        scaling = torch.exp(raw_scaling + torch.log(bias).to(raw.device))
    scaling = torch.sqrt(scaling.square() + config.filter_3d ** 2)

    identity = torch.tensor([1.0, 0.0, 0.0, 0.0], device=raw.device)
    rotation = F.normalize(parts["rotation"].reshape(-1, 4) + identity, dim=-1)

    return GaussianFrame(xyz=xyz, features_dc=parts["features_dc"].reshape(-1, 1, 3), opacity=opacity,
                         scaling=scaling, rotation=rotation)


# -------------------------------------------------------------------------------- quaternions
def _quaternion_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product a * b of (w, x, y, z) quaternions (broadcasting)."""
    aw, ax, ay, az = np.moveaxis(a, -1, 0)
    bw, bx, by, bz = np.moveaxis(b, -1, 0)
    return np.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], axis=-1)


def _rotation_matrix_to_quaternion(m: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z) of a 3x3 rotation matrix (largest-component method)."""
    m = np.asarray(m, dtype=np.float64)
    if not np.allclose(m @ m.T, np.eye(3), atol=1e-6) or np.linalg.det(m) < 0:
        raise ValueError("transform must be a rotation matrix (orthonormal, determinant +1)")
    trace = np.trace(m)
    candidates = [trace, m[0, 0], m[1, 1], m[2, 2]]
    k = int(np.argmax(candidates))
    if k == 0:
        s = 2.0 * math.sqrt(1.0 + trace)
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif k == 1:
        s = 2.0 * math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif k == 2:
        s = 2.0 * math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2.0 * math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    return np.asarray(q)


# ------------------------------------------------------------------------------------------ PLY
_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


def _ply_field_names(num_dc: int = 3) -> list:
    return (["x", "y", "z", "nx", "ny", "nz"] + [f"f_dc_{i}" for i in range(num_dc)] + ["opacity"]
            + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)])


def save_ply(path: Union[str, Path], gaussians: GaussianSet,
             transform: Optional[Sequence[Sequence[float]]] = None) -> None:
    """Write activated Gaussians as a standard 3D Gaussian Splatting ``.ply`` (binary little endian).

    Args:
        path: output file.
        gaussians: activated Gaussians (``GaussianFrame.to_gaussian_set()``).
        transform: optional 3x3 rotation applied to positions and orientations (e.g.
            :data:`Z_UP_TO_Y_UP`, which is what TRELLIS's exporter does); None keeps the model box.
    """
    xyz = np.asarray(gaussians.xyz, dtype=np.float64).reshape(-1, 3)
    n = xyz.shape[0]
    f_dc = np.asarray(gaussians.features_dc, dtype=np.float64).reshape(n, -1)[:, :3]
    opacity = np.asarray(gaussians.opacity, dtype=np.float64).reshape(n, 1)
    scaling = np.asarray(gaussians.scaling, dtype=np.float64).reshape(n, 3)
    rotation = np.asarray(gaussians.rotation, dtype=np.float64).reshape(n, 4)
    rotation = rotation / np.linalg.norm(rotation, axis=1, keepdims=True).clip(min=1e-30)
    if transform is not None:
        matrix = np.asarray(transform, dtype=np.float64)
        xyz = xyz @ matrix.T
        rotation = _quaternion_multiply(_rotation_matrix_to_quaternion(matrix), rotation)

    # pre-activation storage: logit opacity, log scale (clamped so that 0 / 1 stay finite)
    eps = 1e-12
    p = opacity.clip(eps, 1 - 1e-7)
    stored_opacity = np.log(p / (1 - p))
    stored_scale = np.log(scaling.clip(min=eps))

    names = _ply_field_names()
    table = np.empty(n, dtype=[(name, "<f4") for name in names])
    columns = np.concatenate([xyz, np.zeros((n, 3)), f_dc, stored_opacity, stored_scale, rotation], axis=1)
    for i, name in enumerate(names):
        table[name] = columns[:, i]
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    header += [f"property float {name}" for name in names]
    header += ["end_header"]
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(table.tobytes())


def load_ply(path: Union[str, Path]) -> GaussianSet:
    """Read a 3D Gaussian Splatting ``.ply`` (binary little/big endian or ascii; other properties such
    as ``f_rest_*`` are ignored) back to activated Gaussians: opacity = sigmoid(stored), scaling =
    exp(stored), rotation normalised."""
    data = Path(path).read_bytes()
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise ValueError(f"{path}: not a PLY file")
    body_start = data.index(b"\n", end) + 1
    header = data[:body_start].decode("ascii").splitlines()
    fmt, fields, count, element = None, [], 0, None
    for line in header:
        words = line.split()
        if not words:
            continue
        if words[0] == "format":
            fmt = words[1]
        elif words[0] == "element":
            element = words[1]
            if element == "vertex":
                count = int(words[2])
        elif words[0] == "property" and element == "vertex":
            if words[1] == "list":
                raise ValueError(f"{path}: list properties in the vertex element are not supported")
            fields.append((words[2], _PLY_TYPES[words[1]]))
    if fmt == "ascii":
        values = np.loadtxt(data[body_start:].decode("ascii").splitlines()[:count], ndmin=2)
        table = {name: values[:, i] for i, (name, _) in enumerate(fields)}
    elif fmt in ("binary_little_endian", "binary_big_endian"):
        order = "<" if fmt == "binary_little_endian" else ">"
        dtype = np.dtype([(name, order + code) for name, code in fields])
        table = np.frombuffer(data, dtype=dtype, count=count, offset=body_start)
    else:
        raise ValueError(f"{path}: unknown PLY format {fmt!r}")

    def cols(*names):
        return np.stack([np.asarray(table[name], dtype=np.float64) for name in names], axis=1)

    rotation = cols("rot_0", "rot_1", "rot_2", "rot_3")
    rotation = rotation / np.linalg.norm(rotation, axis=1, keepdims=True).clip(min=1e-30)
    return GaussianSet(
        xyz=cols("x", "y", "z").astype(np.float32),
        features_dc=cols("f_dc_0", "f_dc_1", "f_dc_2").reshape(-1, 1, 3).astype(np.float32),
        opacity=(1.0 / (1.0 + np.exp(-cols("opacity")))).astype(np.float32),
        scaling=np.exp(cols("scale_0", "scale_1", "scale_2")).astype(np.float32),
        rotation=rotation.astype(np.float32),
    )
