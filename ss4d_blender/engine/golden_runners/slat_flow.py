"""Golden runner for the structured-latent flow cases (``slat_flow_4d``, ``slat_flow_4d_non``).

Builds ``SLatFlow4DModel(**config["args"])``, loads ``weights.safetensors`` strictly, runs
``model(SparseTensor(feats, coords), t, cond, num_frames)`` and compares the velocity (same row order as
the input, per the manifest) and the output coords (exact).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from ..models.slat_flow_4d import SLatFlow4DModel
from ..sparse import SparseTensor


def compare(config: dict, manifest: dict, io: dict, weights: dict) -> list[tuple[str, float, float, bool, str]]:
    """Run the case; returns (name, max_abs, rel_l2, passed, note) per check."""
    model = SLatFlow4DModel(**config["args"]).eval()
    model.load_state_dict(weights, strict=True)
    x = SparseTensor(io["feats"].float(), io["coords"].int())
    with torch.no_grad():
        out = model(x, io["t"].float(), io["cond"].float(), num_frames=int(manifest["non_tensor_args"]["num_frames"]))

    tol = manifest["tolerance"]
    ref = io["out_feats"].float()
    err = out.feats.float() - ref
    max_abs = float(err.abs().max())
    rel_l2 = float(err.norm() / ref.norm().clamp(min=1e-30))
    feats_ok = max_abs <= tol["max_abs"] and rel_l2 <= tol["rel_l2"]
    coords_ok = torch.equal(out.coords.int(), io["out_coords"].int())
    return [
        ("out_feats", max_abs, rel_l2, feats_ok, ""),
        ("out_coords", 0.0 if coords_ok else float("inf"), 0.0, coords_ok, "" if coords_ok else "coords / row order differ"),
    ]


def run(case_dir: Path, config: Optional[dict], manifest: dict, io: dict):
    from .common import Check  # owned by [dense]

    weights = load_file(str(Path(case_dir) / "weights.safetensors"))
    return [Check(name, max_abs, rel, passed, note) for name, max_abs, rel, passed, note in compare(config, manifest, io, weights)]
