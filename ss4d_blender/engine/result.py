"""The engine's result file: everything later stages need, without re-running the model.

One `.safetensors` file: arrays (structure coordinates, latents, per-frame Gaussians and meshes) as
tensors, and the settings that produced it as JSON in the header's metadata. It is read with numpy only
(`safetensors.numpy`): no torch import, so the Blender side can read it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np

from .types import GaussianSet, Mesh

FORMAT = "ss4d-result/1"
GAUSSIAN_FIELDS = ("xyz", "features_dc", "opacity", "scaling", "rotation")
RANDOM_WEIGHTS_WARNING = "made with the tiny random-weight pipeline: the result is noise (for tests and demos only)"


@dataclass
class GenerationResult:
    num_frames: int
    coords: np.ndarray                 # int32 [N, 4] (frame, x, y, z) at 64^3
    slat_feats: np.ndarray             # float32 [N, 8], denormalised
    gaussians: list                    # GaussianSet per frame (a list, or `windows.StoredFrames` on disk)
    meshes: list                       # Mesh per frame (cleaned; a list, or `windows.StoredFrames` on disk)
    settings: dict = field(default_factory=dict)
    is_random_weights: bool = False    # tiny random-weight pipeline: the result is noise
    warnings: list = field(default_factory=list)   # what every front end shows the user after the run

    def __post_init__(self):
        if self.is_random_weights and RANDOM_WEIGHTS_WARNING not in self.warnings:
            self.warnings = [RANDOM_WEIGHTS_WARNING] + list(self.warnings)

    def save(self, path: Union[str, Path]) -> Path:
        """Writes the result file one array at a time: frames kept on disk (`windows.StoredFrames`) are
        copied frame by frame, so saving a long clip never holds all its frames in memory."""
        path = Path(path)
        arrays = [("coords", "I32", list(self.coords.shape), lambda: np.ascontiguousarray(self.coords, np.int32)),
                  ("slat_feats", "F32", list(self.slat_feats.shape),
                   lambda: np.ascontiguousarray(self.slat_feats, np.float32))]
        arrays += _frame_arrays("gaussians", self.gaussians)
        arrays += _frame_arrays("meshes", self.meshes)
        meta = {"format": FORMAT, "num_frames": str(self.num_frames),
                "num_gaussian_frames": str(len(self.gaussians)), "num_mesh_frames": str(len(self.meshes)),
                "settings": json.dumps(self.settings), "is_random_weights": json.dumps(self.is_random_weights),
                "warnings": json.dumps(list(self.warnings))}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        _write_safetensors(tmp, arrays, meta)
        tmp.replace(path)  # never leave a half-written result under the real name
        return path


SAFETENSORS_DTYPES = {"F32": np.float32, "I32": np.int32}


def _frame_arrays(kind: str, frames) -> list:
    """(name, dtype, shape, read) of every array of every frame: GaussianSet / Mesh objects in memory, or
    frames on disk (anything with `specs(i)` and `array(i, name)`, e.g. `windows.StoredFrames`)."""
    out = []
    for i in range(len(frames)):
        if hasattr(frames, "specs"):
            for name, dtype, shape in frames.specs(i):
                out.append((f"{kind}.{i}.{name}", dtype, shape, lambda i=i, name=name: frames.array(i, name)))
            continue
        item = frames[i]
        if kind == "gaussians":
            fields = [(n, getattr(item, n), "F32") for n in GAUSSIAN_FIELDS]
        else:
            fields = [("vertices", item.vertices, "F32"), ("faces", item.faces, "I32")]
            fields += [("colors", item.colors, "F32")] if item.colors is not None else []
        for name, a, dtype in fields:
            a = np.ascontiguousarray(a, SAFETENSORS_DTYPES[dtype])
            out.append((f"{kind}.{i}.{name}", dtype, list(a.shape), lambda a=a: a))
    return out


def _write_safetensors(path: Path, arrays: list, metadata: dict) -> None:
    """The safetensors layout (8-byte little-endian header size, JSON header padded to 8 bytes, then the
    raw arrays back to back in header order), written one array at a time."""
    header, offset = {"__metadata__": metadata}, 0
    for name, dtype, shape, _ in arrays:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
        header[name] = {"dtype": dtype, "shape": [int(s) for s in shape], "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name, dtype, shape, read in arrays:
            a = np.ascontiguousarray(read(), SAFETENSORS_DTYPES[dtype])
            if list(a.shape) != [int(s) for s in shape]:
                raise ValueError(f"{name}: shape {list(a.shape)} differs from the announced {shape}")
            f.write(a.tobytes())


def load_result(path: Union[str, Path], lazy: bool = False) -> GenerationResult:
    """lazy: Gaussians and meshes stay in the file and are read one frame at a time when indexed (a long
    clip's frames need not fit in memory together)."""
    from safetensors import safe_open

    from .windows import FrameFile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No SS4D result file at {path}")
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not an SS4D result file (format {meta.get('format')!r})")
        get = f.get_tensor
        keys = set(f.keys())
        if lazy:
            frames = FrameFile(path)
            return GenerationResult(num_frames=int(meta["num_frames"]), coords=get("coords"),
                                    slat_feats=get("slat_feats"), gaussians=frames.gaussians(),
                                    meshes=frames.meshes(), settings=json.loads(meta["settings"]),
                                    is_random_weights=json.loads(meta["is_random_weights"]),
                                    warnings=json.loads(meta.get("warnings", "[]")))
        gaussians = [GaussianSet(**{n: get(f"gaussians.{i}.{n}") for n in GAUSSIAN_FIELDS})
                     for i in range(int(meta["num_gaussian_frames"]))]
        meshes = [Mesh(get(f"meshes.{i}.vertices"), get(f"meshes.{i}.faces"),
                       get(f"meshes.{i}.colors") if f"meshes.{i}.colors" in keys else None)
                  for i in range(int(meta["num_mesh_frames"]))]
        return GenerationResult(num_frames=int(meta["num_frames"]), coords=get("coords"), slat_feats=get("slat_feats"),
                                gaussians=gaussians, meshes=meshes, settings=json.loads(meta["settings"]),
                                is_random_weights=json.loads(meta["is_random_weights"]),
                                warnings=json.loads(meta.get("warnings", "[]")))


def read_metadata(path: Union[str, Path]) -> dict:
    """The header of a result file (frame count, settings, random-weights flag, warnings) without reading
    arrays."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an SS4D result file")
    is_random_weights = json.loads(meta["is_random_weights"])
    warnings = json.loads(meta.get("warnings", "[]"))
    if is_random_weights and RANDOM_WEIGHTS_WARNING not in warnings:
        warnings.insert(0, RANDOM_WEIGHTS_WARNING)
    return {"num_frames": int(meta["num_frames"]), "settings": json.loads(meta["settings"]),
            "is_random_weights": is_random_weights, "warnings": warnings}
