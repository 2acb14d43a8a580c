"""Golden runner for whole-pipeline cases (../shared/golden_pipeline/pipeline_tiny): a pipeline folder in
the official layout; the image encoder is bypassed (cond given, neg_cond zeros). Checks the random draws
(structure noise, then latent noise, after torch.manual_seed(seed)), the coordinates, the denormalised
latents and the decoded Gaussians per frame."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ...engine.pipeline import PipelineSpec, SS4DPipeline
from .common import Check, coords_check, tensor_check


class _RecordRandn:
    """Records every torch.randn result while active (to compare the draws with the fixture's)."""

    def __enter__(self):
        self.draws, self._randn = [], torch.randn

        def recording(*args, **kwargs):
            out = self._randn(*args, **kwargs)
            self.draws.append(out.clone())
            return out
        torch.randn = recording
        return self

    def __exit__(self, *exc):
        torch.randn = self._randn


def run(case_dir: Path, config: Optional[dict], manifest: dict, io: dict) -> list[Check]:
    pipe = SS4DPipeline(PipelineSpec.from_folder(case_dir))
    num_frames = int(manifest["num_frames"])
    cond, neg_cond = io["cond"].float(), io["neg_cond"].float()
    tol = manifest["tolerance"]
    torch.manual_seed(int(manifest["seed"]))
    with _RecordRandn() as rec:
        coords = pipe.sample_structure(cond, neg_cond, num_frames)
        slat = pipe.sample_latents(cond, neg_cond, coords, num_frames)
    checks = []
    exact = {"max_abs": 0.0}
    if len(rec.draws) >= 2:
        checks.append(tensor_check("ss_noise", rec.draws[0], io["ss_noise"], exact))
        checks.append(tensor_check("slat_noise", rec.draws[1], io["slat_noise"], exact))
    else:
        checks.append(Check("noise draws", float("inf"), float("inf"), False, f"{len(rec.draws)} randn calls"))
    checks.append(coords_check("coords", coords, io["coords"]))
    if not checks[-1].passed:
        return checks
    checks.append(tensor_check("slat_feats", slat.feats, io["slat_feats"], tol["slat_feats"]))
    frames = pipe.decode_gaussians(slat, num_frames)
    for k, frame in enumerate(frames):
        for attr in ("xyz", "opacity", "features_dc"):
            key = f"frame{k}_{attr}"
            if key in io:
                checks.append(tensor_check(key, getattr(frame, attr), io[key], tol["gaussians"]))
    return checks
