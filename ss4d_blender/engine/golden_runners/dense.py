"""Golden runners for the dense cases: the 4D sparse-structure flow (`ss_flow_4d*`), the sparse-structure
decoder (`ss_decoder`) and the Flow-Euler sampler with guidance interval (`sampler_guidance_interval`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..loading import load_model
from ..models.sparse_structure_decoder import occupancy_to_coords
from ..sampler import FlowEulerSampler
from .common import Check, coords_check, tensor_check


def _model(case_dir: Path, config: dict):
    return load_model(Path(case_dir) / "weights", config=config)


def run_flow(case_dir: Path, config: dict, manifest: dict, io: dict) -> list[Check]:
    model = _model(case_dir, config)
    with torch.no_grad():
        out = model(io["x"].float(), io["t"].float(), io["cond"].float(), num_frames=int(manifest["non_tensor_args"]["num_frames"]))
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
                      f"{int((ours_set != ref_set).sum())} voxels differ, all with |logit| <= 1e-4" if not disagree.any()
                      else f"{int(disagree.sum())} voxels differ away from the threshold")
    checks.append(check)
    return checks


def run_sampler(case_dir: Path, config: dict, manifest: dict, io: dict) -> list[Check]:
    model = _model(case_dir, config)
    params = dict(manifest["params"])
    sampler = FlowEulerSampler(sigma_min=1e-5, guidance="interval")
    out = sampler.sample(model, io["noise"].float(), io["cond"].float(), io["neg_cond"].float(), keep_history=True,
                         num_frames=int(manifest["non_tensor_args"]["num_frames"]), **params)
    tol = manifest["tolerance"]
    checks = [tensor_check("sample", out.samples, io["sample"], tol)]
    for k in range(params["steps"]):
        checks.append(tensor_check(f"step{k}_pred_x_t", out.pred_x_t[k], io[f"step{k}_pred_x_t"], tol))
        checks.append(tensor_check(f"step{k}_pred_x_0", out.pred_x_0[k], io[f"step{k}_pred_x_0"], tol))
    return checks


def run(case_dir: Path, config: Optional[dict], manifest: dict, io: dict) -> list[Check]:
    if "Sampler" in manifest.get("class", ""):
        return run_sampler(case_dir, config, manifest, io)
    if config["name"] == "SparseStructureDecoder":
        return run_decoder(case_dir, config, manifest, io)
    return run_flow(case_dir, config, manifest, io)
