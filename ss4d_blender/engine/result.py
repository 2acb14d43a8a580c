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
    gaussians: list                    # GaussianSet per frame
    meshes: list                       # Mesh per frame (cleaned)
    settings: dict = field(default_factory=dict)
    is_random_weights: bool = False    # tiny random-weight pipeline: the result is noise
    warnings: list = field(default_factory=list)   # what every front end shows the user after the run

    def __post_init__(self):
        if self.is_random_weights and RANDOM_WEIGHTS_WARNING not in self.warnings:
            self.warnings = [RANDOM_WEIGHTS_WARNING] + list(self.warnings)

    def save(self, path: Union[str, Path]) -> Path:
        from safetensors.numpy import save_file

        path = Path(path)
        tensors = {"coords": np.ascontiguousarray(self.coords, np.int32),
                   "slat_feats": np.ascontiguousarray(self.slat_feats, np.float32)}
        for i, g in enumerate(self.gaussians):
            for name in GAUSSIAN_FIELDS:
                tensors[f"gaussians.{i}.{name}"] = np.ascontiguousarray(getattr(g, name), np.float32)
        for i, m in enumerate(self.meshes):
            tensors[f"meshes.{i}.vertices"] = np.ascontiguousarray(m.vertices, np.float32)
            tensors[f"meshes.{i}.faces"] = np.ascontiguousarray(m.faces, np.int32)
            if m.colors is not None:
                tensors[f"meshes.{i}.colors"] = np.ascontiguousarray(m.colors, np.float32)
        meta = {"format": FORMAT, "num_frames": str(self.num_frames),
                "num_gaussian_frames": str(len(self.gaussians)), "num_mesh_frames": str(len(self.meshes)),
                "settings": json.dumps(self.settings), "is_random_weights": json.dumps(self.is_random_weights),
                "warnings": json.dumps(list(self.warnings))}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)  # never leave a half-written result under the real name
        return path


def load_result(path: Union[str, Path]) -> GenerationResult:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No SS4D result file at {path}")
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not an SS4D result file (format {meta.get('format')!r})")
        get = f.get_tensor
        keys = set(f.keys())
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
