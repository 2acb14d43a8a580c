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
from typing import Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file

from ..sparse import SparseTensor

CASES = ("slat_gs_decoder_4d", "slat_mesh_decoder")
GAUSSIAN_ATTRIBUTES = ("xyz", "features_dc", "opacity", "scaling", "rotation")

Result = Tuple[str, float, float, bool, str]  # name, max_abs, rel_l2, passed, note


def _tensor_check(name: str, ours: torch.Tensor, ref: torch.Tensor, tol: dict, note: str = "") -> Result:
    ours, ref = ours.detach().double().cpu(), ref.double()
    if ours.shape != ref.shape:
        return (name, float("inf"), float("inf"), False, f"shape {tuple(ours.shape)} != {tuple(ref.shape)}")
    err = ours - ref
    max_abs = float(err.abs().max()) if err.numel() else 0.0
    rel_l2 = float(err.norm() / ref.norm().clamp(min=1e-30)) if err.numel() else 0.0
    return (name, max_abs, rel_l2, max_abs <= tol["max_abs"] and rel_l2 <= tol["rel_l2"], note)


def _load_model(name: str, config: dict, weights: Dict[str, torch.Tensor]):
    if name == "SLatGaussianDecoder":
        from ..models.slat_gaussian_decoder_4d import SLatGaussianDecoder as cls
    elif name == "SLatMeshDecoder":
        from ..models.slat_mesh_decoder import SLatMeshDecoder as cls
    else:
        raise ValueError(f"not a decoder case: {name}")
    model = cls(**config["args"]).eval()
    model.load_state_dict(weights, strict=True)
    return model


def compare_gaussian_decoder(config: dict, manifest: dict, io: dict, weights: dict) -> List[Result]:
    model = _load_model("SLatGaussianDecoder", config, weights)
    num_frames = int(manifest["non_tensor_args"]["num_frames"])
    tol = manifest["tolerance"]
    x = SparseTensor(io["feats"].float(), io["coords"].int())
    with torch.no_grad():
        raw = model.decode_features(x, num_frames)
        frames = model.to_gaussians(raw)
    results = [_tensor_check("raw_feats", raw.feats, io["raw_feats"], tol)]
    k = 0
    while f"frame{k}_xyz" in io:
        if k >= len(frames):
            results.append((f"frame{k}", float("inf"), float("inf"), False, "frame missing from our output"))
        else:
            for attr in GAUSSIAN_ATTRIBUTES:
                results.append(_tensor_check(f"frame{k}_{attr}", getattr(frames[k], attr), io[f"frame{k}_{attr}"], tol))
        k += 1
    if len(frames) != k:
        results.append(("num_frames", float("inf"), 0.0, False, f"{len(frames)} frames decoded, reference has {k}"))
    return results


def _row_keys(coords: torch.Tensor) -> torch.Tensor:
    c = coords.long()
    span = int(c.max()) + 1 if c.numel() else 1
    return ((c[:, 0] * span + c[:, 1]) * span + c[:, 2]) * span + c[:, 3]


def compare_mesh_decoder(config: dict, manifest: dict, io: dict, weights: dict) -> List[Result]:
    model = _load_model("SLatMeshDecoder", config, weights)
    tol = manifest["tolerance"]
    x = SparseTensor(io["feats"].float(), io["coords"].int())
    with torch.no_grad():
        out = model(x)
    ref_coords = io["out_coords"]
    same_order = out.coords.shape == ref_coords.shape and torch.equal(out.coords.int(), ref_coords.int())
    ours_key, ref_key = _row_keys(out.coords), _row_keys(ref_coords)
    ours_order, ref_order = torch.argsort(ours_key), torch.argsort(ref_key)
    coords_ok = ours_key.shape == ref_key.shape and torch.equal(ours_key[ours_order], ref_key[ref_order])
    order_note = "" if same_order else "row order differs from the reference (compared as sorted sets)"
    results = [("out_coords", 0.0 if coords_ok else float("inf"), 0.0, coords_ok,
                order_note if coords_ok else "coordinate sets differ")]
    if coords_ok:
        results.append(_tensor_check("out_feats", out.feats[ours_order], io["out_feats"][ref_order], tol, order_note))
    else:
        results.append(("out_feats", float("inf"), float("inf"), False, "not compared: coords differ"))
    return results


def compare(config: dict, manifest: dict, io: dict, weights: dict) -> List[Result]:
    """Run one decoder case; returns (name, max_abs, rel_l2, passed, note) per check."""
    if config["name"] == "SLatGaussianDecoder":
        return compare_gaussian_decoder(config, manifest, io, weights)
    if config["name"] == "SLatMeshDecoder":
        return compare_mesh_decoder(config, manifest, io, weights)
    raise ValueError(f"not a decoder case: {config['name']}")


def run(case_dir: Path, config: Optional[dict], manifest: dict, io: dict):
    from .common import Check  # owned by [dense]

    weights = load_file(str(Path(case_dir) / "weights.safetensors"))
    return [Check(name, max_abs, rel, passed, note) for name, max_abs, rel, passed, note in compare(config, manifest, io, weights)]
