"""Golden runner for the BiRefNet case (`../shared/golden/birefnet`): the encoder features after the 'cat'
pyramid and the context levels (`enc_x1..enc_x4`) and the final logits, in float32.

The model's configuration comes from the weights' shapes, as for the released checkpoints; the backbone
settings in `config.json` must agree with it (a check of its own), so a fixture and its weights cannot drift
apart unnoticed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ...engine.loading import read_state_dict
from ...engine.models.birefnet import config_from_state_dict, load_birefnet
from .common import Check, tensor_check

BACKBONE_ARGS = ("embed_dim", "depths", "num_heads", "window_size")


def _config_check(config: Optional[dict], inferred) -> Check:
    """config.json's backbone settings vs those read from the weights' shapes."""
    args = (config or {}).get("args", {})
    wrong = [f"{k}: config {args[k]} vs weights {getattr(inferred, k)}" for k in BACKBONE_ARGS
             if k in args and (tuple(args[k]) if isinstance(args[k], list) else args[k]) != getattr(inferred, k)]
    return Check("config_from_shapes", 0.0 if not wrong else float("inf"), 0.0, not wrong, "; ".join(wrong))


def run(case_dir: Path, config: Optional[dict], manifest: dict, io: dict) -> list[Check]:
    order = (config or {}).get("args", {}).get("patch_channel_order", "einops")
    state = read_state_dict(Path(case_dir) / "weights.safetensors")
    checks = [_config_check(config, config_from_state_dict(state, order))]
    model = load_birefnet(state, dtype=torch.float32, patch_channel_order=order)
    image = io["image"].float()
    tolerance = manifest["tolerance"]
    with torch.no_grad():
        features = model.encode(image)
        logits = model(image)
    for i, feature in enumerate(features, start=1):
        if f"enc_x{i}" in io:
            checks.append(tensor_check(f"enc_x{i}", feature, io[f"enc_x{i}"], tolerance))
    checks.append(tensor_check("logits", logits, io["logits"], tolerance))
    return checks
