"""Golden runner for `sparse_ops`: submanifold 3D / 4D / 1D convolutions with spconv weight layout and
spatial / temporal pooling and unpooling (see the case's manifest for the calls).

Features are checked at the manifest tolerance; coordinates exactly, or as sets when only the row order
differs (the manifest allows it, and the note says so).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from ...engine.sparse import (SparseConv1d, SparseConv3d, SparseConv4d, SparseDownsample, SparseDownsample_t,
                              SparseTensor, SparseUpsample, SparseUpsample_t)
from .common import Check, coords_set_check, tensor_check

CONVS = {"conv3d": SparseConv3d, "conv4d": SparseConv4d, "conv1d": SparseConv1d}


def compare(config: dict, manifest: dict, io: dict, weights: dict) -> list[Check]:
    tol = manifest["tolerance"]
    num_frames = int(manifest["non_tensor_args"]["num_frames"])
    x = SparseTensor(io["feats"].float(), io["coords"].int())
    checks = []
    for name, cls in CONVS.items():
        prefix = f"{name}.conv."
        conv = cls(int(config["args"]["in_channels"]), int(config["args"]["out_channels"]),
                   int(config["args"]["kernel_size"]))
        conv.load_state_dict({k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(prefix)}, strict=True)
        with torch.no_grad():
            out = conv(x, num_frames)
        checks.append(tensor_check(f"{name}_out", out.feats, io[f"{name}_out"], tol))
        if f"{name}_out_coords" in io:
            checks.append(coords_set_check(f"{name}_out_coords", out.coords, io[f"{name}_out_coords"]))

    for kind, down_cls, up_cls in (("", SparseDownsample, SparseUpsample),
                                   ("_t", SparseDownsample_t, SparseUpsample_t)):
        down = down_cls(2)(x)
        up = up_cls(2)(down.replace(down.feats * 2))
        checks.append(tensor_check(f"down{kind}_feats", down.feats, io[f"down{kind}_feats"], tol))
        checks.append(coords_set_check(f"down{kind}_coords", down.coords, io[f"down{kind}_coords"]))
        checks.append(tensor_check(f"up{kind}_feats", up.feats, io[f"up{kind}_feats"], tol))
        checks.append(coords_set_check(f"up{kind}_coords", up.coords, io[f"up{kind}_coords"]))
    return checks


def run(case_dir: Path, config: Optional[dict], manifest: dict, io: dict) -> list[Check]:
    return compare(config, manifest, io, load_file(str(Path(case_dir) / "weights.safetensors")))
