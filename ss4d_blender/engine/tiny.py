"""A tiny random-weight pipeline in the official folder layout, for tests and offline demos.

Every network of the real pipeline is present (DINOv2 with registers, 4D structure flow + decoder, 4D
latent flow, 4D Gaussian decoder, mesh decoder, and the BiRefNet matting model in `birefnet/`) with the
released structural options but a few channels and blocks, and RANDOM weights: what it generates is noise.
It exercises the whole chain (loading, matting, sampling, decoding, meshing, registration, the Blender
layer) in seconds on a CPU. `pipeline.json` carries
`"is_random_weights": true`, so results made with it say so.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import save_file

from .background import PIPELINE_MATTING_FOLDER, write_tiny_birefnet
from .loading import build_model
from .models.dinov2 import DinoV2WithRegisters, save_config, tiny_dinov2_config

COND_CHANNELS = 64  # = the tiny DINOv2's width
GS_REPRESENTATION = {"lr": {"_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0, "_scaling": 1.0, "_rotation": 0.1},
                     "perturb_offset": True, "voxel_size": 1.5, "num_gaussians": 8, "2d_filter_kernel_size": 0.1,
                     "3d_filter_kernel_size": 0.0009, "scaling_bias": 0.004, "opacity_bias": 0.1,
                     "scaling_activation": "softplus"}

CONFIGS = {
    "sparse_structure_flow_model": {"name": "SparseStructureFlow4DModel", "args": dict(
        resolution=4, in_channels=8, out_channels=8, model_channels=64, cond_channels=COND_CHANNELS, num_blocks=2,
        num_heads=4, mlp_ratio=2, patch_size=1, pe_mode="rope_t", qk_rms_norm=True, use_fp16=False,
        expand_self_attn=True, window_size=2)},
    "sparse_structure_decoder": {"name": "SparseStructureDecoder", "args": dict(
        out_channels=1, latent_channels=8, num_res_blocks=1, num_res_blocks_middle=1, channels=[32, 32, 32],
        use_fp16=False)},
    "slat_flow_model": {"name": "SLatFlow4DModel", "args": dict(
        resolution=16, in_channels=8, out_channels=8, model_channels=64, cond_channels=COND_CHANNELS, num_blocks=2,
        num_heads=4, mlp_ratio=2, patch_size=2, num_io_res_blocks=1, num_io_res4d_blocks=1, io_block_channels=[16],
        io_block_channels_t=[64], pe_mode="rope_t", qk_rms_norm=True, use_fp16=False, expand_self_attn=True,
        conv_type="3D_1D")},
    "slat_decoder_gs": {"name": "SLatGaussianDecoder", "args": dict(
        resolution=16, model_channels=64, latent_channels=8, num_blocks=2, num_heads=4, mlp_ratio=2,
        attn_mode="swin", window_size=4, pe_mode="rope_t", use_fp16=False, use_checkpoint=False,
        expand_self_attn=True, representation_config=GS_REPRESENTATION)},
    "slat_decoder_mesh": {"name": "SLatMeshDecoder", "args": dict(
        resolution=16, model_channels=256, latent_channels=8, num_blocks=1, num_heads=4, mlp_ratio=1,
        attn_mode="swin", window_size=4, use_fp16=False, representation_config={"use_color": True})},
}

SAMPLER = {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": 1e-5}}


def _save(module: torch.nn.Module, config: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path.with_suffix(".safetensors")))


def _calibrate_structure(flow, decoder, occupancy: float = 0.03, frames: int = 4) -> None:
    """Shifts the decoder's output bias so that about `occupancy` of the grid is occupied for latents the
    flow produces (random weights would otherwise give an empty or a full grid)."""
    from .sampler import FlowEulerSampler

    g = torch.Generator().manual_seed(1)
    r = flow.resolution
    noise = torch.randn(frames, 8, r, r, r, generator=g)
    cond = torch.randn(frames, 16, COND_CHANNELS, generator=g)
    z = FlowEulerSampler(1e-5, "interval").sample(flow, noise, cond, torch.zeros_like(cond), steps=4,
                                                   rescale_t=3.0, cfg_strength=3.0, cfg_interval=(0.5, 1.0),
                                                   num_frames=frames).samples
    with torch.no_grad():
        logits = decoder(z)
        threshold = torch.quantile(logits.flatten().float(), 1 - occupancy)
        decoder.out_layer[2].bias -= threshold


def make_tiny_pipeline(folder: Union[str, Path], seed: int = 0) -> Path:
    """Writes the tiny random-weight pipeline into `folder` and returns it."""
    folder = Path(folder)
    torch.manual_seed(seed)
    models = {role: build_model(config).eval() for role, config in CONFIGS.items()}
    _calibrate_structure(models["sparse_structure_flow_model"], models["sparse_structure_decoder"])
    for role, module in models.items():
        _save(module, CONFIGS[role], folder / "ckpts" / role)
    dino_dir = folder / "dinov2"
    dino_dir.mkdir(parents=True, exist_ok=True)
    dino_config = tiny_dinov2_config()
    dino = DinoV2WithRegisters(dino_config)
    with torch.no_grad():
        for name, p in dino.named_parameters():
            if name.endswith("lambda1"):
                p.fill_(0.1)
            elif p.dim() == 1 or "token" in name or "position" in name:
                p.normal_(0, 0.02)
    save_file({k: v.contiguous() for k, v in dino.state_dict().items()}, str(dino_dir / "model.safetensors"))
    save_config(dino_config, dino_dir)
    write_tiny_birefnet(folder / PIPELINE_MATTING_FOLDER)  # the folder's own matting model (random weights)
    params = lambda cfg: {"steps": 3, "cfg_strength": cfg, "cfg_interval": [0.5, 1.0], "rescale_t": 3.0}  # noqa: E731
    pipeline = {"name": "TrellisVideoTo4DPipeline", "args": {
        "models": {role: f"ckpts/{role}" for role in CONFIGS if role != "slat_decoder_mesh"},
        "sparse_structure_sampler": {**SAMPLER, "params": params(7.5)},
        "slat_sampler": {**SAMPLER, "params": params(3.0)},
        "slat_normalization": {"mean": [0.0] * 8, "std": [1.0] * 8},
        "image_cond_model": "dinov2",
        "mesh_decoder": "ckpts/slat_decoder_mesh",
        "is_random_weights": True,
    }}
    (folder / "pipeline.json").write_text(json.dumps(pipeline, indent=2))
    return folder
