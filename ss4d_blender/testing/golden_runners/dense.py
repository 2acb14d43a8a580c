"""Golden runners for the dense cases: the 4D sparse-structure flow (`ss_flow_4d*`), the sparse-structure
decoder (`ss_decoder`, logits and the occupancy -> coords rule) and the Flow-Euler samplers
(`sampler_guidance_interval`: every step's x_t and x_0 prediction)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from ...engine.loading import load_model
from ...engine.models.sparse_structure_decoder import occupancy_to_coords
from ...engine.sampler import make_sampler
from ...engine.sparse import SparseTensor
from .common import Check, coords_check, tensor_check


def _model(case_dir: Path, config: dict):
    return load_model(Path(case_dir) / "weights", config=config)


def run_flow(case_dir: Path, config: dict, manifest: dict, io: dict) -> list[Check]:
    model = _model(case_dir, config)
    with torch.no_grad():
        num_frames = int(manifest["non_tensor_args"]["num_frames"])
        out = model(io["x"].float(), io["t"].float(), io["cond"].float(), num_frames=num_frames)
    return [tensor_check("out", out, io["out"], manifest["tolerance"])]


def run_decoder(case_dir: Path, config: dict, manifest: dict, io: dict) -> list[Check]:
    model = _model(case_dir, config)
    with torch.no_grad():
        logits = model(io["z"].float())
    checks = [tensor_check("logits", logits, io["logits"], manifest["tolerance"])]
    coords = occupancy_to_coords(logits)
    check = coords_check("coords", coords, io["coords"])
    if not check.passed:
        # the manifest allows disagreement on voxels whose logit is within 1e-4 of 0
        ref_logits = io["logits"][:, 0]
        near_zero = ref_logits.abs() <= 1e-4
        ours_set = torch.zeros_like(near_zero)
        ours_set[tuple(coords.long().t())] = True
        ref_set = torch.zeros_like(near_zero)
        ref_set[tuple(io["coords"].long().t())] = True
        disagree = (ours_set != ref_set) & ~near_zero
        check = Check("coords", 0.0 if not disagree.any() else float("inf"), 0.0, not bool(disagree.any()),
                      f"{int((ours_set != ref_set).sum())} voxels differ, all with |logit| <= 1e-4"
                      if not disagree.any() else f"{int(disagree.sum())} voxels differ away from the threshold")
    checks.append(check)
    return checks


SAMPLER_CLASS = re.compile(r"(FlowEuler\w*Sampler)(?:\(sigma_min=([0-9.eE+-]+)\))?")


def run_sampler(case_dir: Path, config: dict, manifest: dict, io: dict) -> list[Check]:
    """manifest["class"] names the sampler (and sigma_min, default 1e-5); the model is the folder's.
    A sparse model's noise comes as `noise` feats + `coords`; the outputs are compared as feats."""
    match = SAMPLER_CLASS.search(manifest["class"])
    if match is None:
        raise ValueError(f"no Flow-Euler sampler named in manifest class {manifest['class']!r}")
    sampler = make_sampler(match.group(1), {"sigma_min": float(match.group(2) or 1e-5)})
    model = _model(case_dir, config)
    params = dict(manifest["params"])
    noise = io["noise"].float()
    if "coords" in io:
        noise = SparseTensor(noise, io["coords"].int())
    neg_cond = io["neg_cond"].float() if "neg_cond" in io else None
    out = sampler.sample(model, noise, io["cond"].float(), neg_cond, keep_history=True,
                         **manifest.get("non_tensor_args", {}), **params)

    def values(x):
        return x.feats if isinstance(x, SparseTensor) else x

    tol = manifest["tolerance"]
    checks = [tensor_check("sample", values(out.samples), io["sample"], tol)]
    for k in range(params["steps"]):
        for name, history in (("pred_x_t", out.pred_x_t), ("pred_x_0", out.pred_x_0)):
            key = f"step{k}_{name}"
            if key in io:
                checks.append(tensor_check(key, values(history[k]), io[key], tol))
    return checks


def run(case_dir: Path, config: Optional[dict], manifest: dict, io: dict) -> list[Check]:
    if "Sampler" in manifest.get("class", ""):
        return run_sampler(case_dir, config, manifest, io)
    if config["name"] == "SparseStructureDecoder":
        return run_decoder(case_dir, config, manifest, io)
    return run_flow(case_dir, config, manifest, io)
