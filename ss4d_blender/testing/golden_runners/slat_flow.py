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

from ...engine.models.slat_flow_4d import SLatFlow4DModel
from ...engine.sparse import SparseTensor
from .common import Check, coords_check, tensor_check


def compare(config: dict, manifest: dict, io: dict, weights: dict) -> list[Check]:
    """Run the case: the velocity at the manifest tolerance, the output coords exactly."""
    model = SLatFlow4DModel(**config["args"]).eval()
    model.load_state_dict(weights, strict=True)
    x = SparseTensor(io["feats"].float(), io["coords"].int())
    with torch.no_grad():
        out = model(x, io["t"].float(), io["cond"].float(), num_frames=int(manifest["non_tensor_args"]["num_frames"]))
    return [tensor_check("out_feats", out.feats, io["out_feats"], manifest["tolerance"]),
            coords_check("out_coords", out.coords, io["out_coords"])]


def run(case_dir: Path, config: Optional[dict], manifest: dict, io: dict) -> list[Check]:
    return compare(config, manifest, io, load_file(str(Path(case_dir) / "weights.safetensors")))
