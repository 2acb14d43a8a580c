"""Golden runner for the decoder cases.

``slat_gs_decoder_4d``
    ``SLatGaussianDecoder(**args)`` with ``weights.safetensors`` loaded strictly; checks the raw decoder
    output ``raw_feats`` (rows in input order) and, per frame K, ``frameK_{xyz, features_dc, opacity,
    scaling, rotation}`` after activation.
``slat_mesh_decoder``
    ``SLatMeshDecoder(**args)``; checks the fine-voxel coords as a set and the features ``out_feats``
    matched row by row through their coords (our row order is the reference's: the note says so when
    it is not).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors.torch import load_file

from ...engine.sparse import SparseTensor
from .common import Check, coords_set_check, lexicographic_order, tensor_check

CASES = ("slat_gs_decoder_4d", "slat_mesh_decoder")
GAUSSIAN_ATTRIBUTES = ("xyz", "features_dc", "opacity", "scaling", "rotation")


def _load_model(name: str, config: dict, weights: Dict[str, torch.Tensor]):
    if name == "SLatGaussianDecoder":
        from ...engine.models.slat_gaussian_decoder_4d import SLatGaussianDecoder as cls
    elif name == "SLatMeshDecoder":
        from ...engine.models.slat_mesh_decoder import SLatMeshDecoder as cls
    else:
        raise ValueError(f"not a decoder case: {name}")
    model = cls(**config["args"]).eval()
    model.load_state_dict(weights, strict=True)
    return model


def compare_gaussian_decoder(config: dict, manifest: dict, io: dict, weights: dict) -> List[Check]:
    model = _load_model("SLatGaussianDecoder", config, weights)
    num_frames = int(manifest["non_tensor_args"]["num_frames"])
    tol = manifest["tolerance"]
    x = SparseTensor(io["feats"].float(), io["coords"].int())
    with torch.no_grad():
        raw = model.decode_features(x, num_frames)
        frames = model.to_gaussians(raw)
    results = [tensor_check("raw_feats", raw.feats, io["raw_feats"], tol)]
    k = 0
    while f"frame{k}_xyz" in io:
        if k >= len(frames):
            results.append(Check(f"frame{k}", float("inf"), float("inf"), False, "frame missing from our output"))
        else:
            for attr in GAUSSIAN_ATTRIBUTES:
                results.append(tensor_check(f"frame{k}_{attr}", getattr(frames[k], attr), io[f"frame{k}_{attr}"], tol))
        k += 1
    if len(frames) != k:
        results.append(Check("num_frames", float("inf"), 0.0, False,
                             f"{len(frames)} frames decoded, reference has {k}"))
    return results


def compare_mesh_decoder(config: dict, manifest: dict, io: dict, weights: dict) -> List[Check]:
    """Coords as sorted sets (the manifest's rule), then the features matched row by row through them."""
    model = _load_model("SLatMeshDecoder", config, weights)
    x = SparseTensor(io["feats"].float(), io["coords"].int())
    with torch.no_grad():
        out = model(x)
    coords = coords_set_check("out_coords", out.coords, io["out_coords"])
    if not coords.passed:
        return [coords, Check("out_feats", float("inf"), float("inf"), False, "not compared: coords differ")]
    ours, ref = lexicographic_order(out.coords.int().cpu()), lexicographic_order(io["out_coords"].int())
    return [coords,
            tensor_check("out_feats", out.feats[ours], io["out_feats"][ref], manifest["tolerance"], coords.note)]


def compare(config: dict, manifest: dict, io: dict, weights: dict) -> List[Check]:
    """Run one decoder case; returns (name, max_abs, rel_l2, passed, note) per check."""
    if config["name"] == "SLatGaussianDecoder":
        return compare_gaussian_decoder(config, manifest, io, weights)
    if config["name"] == "SLatMeshDecoder":
        return compare_mesh_decoder(config, manifest, io, weights)
    raise ValueError(f"not a decoder case: {config['name']}")


def run(case_dir: Path, config: Optional[dict], manifest: dict, io: dict) -> List[Check]:
    return compare(config, manifest, io, load_file(str(Path(case_dir) / "weights.safetensors")))
