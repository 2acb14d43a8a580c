"""Model-stage benchmark of the SS4D pipeline with the RELEASED network sizes and random weights.

For each stage it builds the network at the released configuration (random weights: speed and memory
only), feeds inputs of the real shapes (T frames of conditioning tokens; ~V voxels per frame on a surface
shell at 64^3, coordinates supplied, not sampled), times one forward pass, counts its FLOPs
(torch.utils.flop_counter) and extrapolates to a full run (steps x 2 forwards for the CFG stages; the
guidance interval makes the real count somewhat lower, so the totals are an upper bound). With
`--offload` (default) each stage's model is moved to the device for its stage only and freed afterwards;
the peak GPU memory per stage and overall is printed.

    .venv/bin/python bench/pipeline.py --device cuda --frames 32 --voxels 20000            # the target run
    .venv/bin/python bench/pipeline.py --device cpu --frames 4 --voxels 1500 --blocks 2     # reduced, CPU

`--blocks N` replaces every model's block count with N (a REDUCED model, labelled in the output).
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sparse_conv import shell_voxels  # noqa: E402

from ss4d_blender.engine.sparse import SparseTensor  # noqa: E402

GS_REPRESENTATION = {"lr": {"_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0, "_scaling": 1.0, "_rotation": 0.1},
                     "perturb_offset": True, "voxel_size": 1.5, "num_gaussians": 32, "2d_filter_kernel_size": 0.1,
                     "3d_filter_kernel_size": 9e-4, "scaling_bias": 4e-3, "opacity_bias": 0.1,
                     "scaling_activation": "softplus"}

RELEASED = {
    "ss_flow": ("SparseStructureFlow4DModel", dict(
        resolution=16, in_channels=8, out_channels=8, model_channels=1024, cond_channels=1024, num_blocks=24,
        num_heads=16, mlp_ratio=4, patch_size=1, pe_mode="rope_t", qk_rms_norm=True, use_fp16=True,
        expand_self_attn=True, window_size=8)),
    "ss_decoder": ("SparseStructureDecoder", dict(
        out_channels=1, latent_channels=8, num_res_blocks=2, num_res_blocks_middle=2, channels=[512, 128, 32],
        use_fp16=True)),
    "slat_flow": ("SLatFlow4DModel", dict(
        resolution=64, in_channels=8, out_channels=8, model_channels=1024, cond_channels=1024, num_blocks=24,
        num_heads=16, mlp_ratio=4, patch_size=2, num_io_res_blocks=2, num_io_res4d_blocks=2,
        io_block_channels=[128], io_block_channels_t=[1024], pe_mode="rope_t", qk_rms_norm=True, use_fp16=True,
        expand_self_attn=True, conv_type="3D_1D")),
    "gs_decoder": ("SLatGaussianDecoder", dict(
        resolution=64, model_channels=768, latent_channels=8, num_blocks=12, num_heads=12, mlp_ratio=4,
        attn_mode="swin", window_size=8, pe_mode="rope_t", use_fp16=True, expand_self_attn=True,
        representation_config=GS_REPRESENTATION)),
    "mesh_decoder": ("SLatMeshDecoder", dict(
        resolution=64, model_channels=768, latent_channels=8, num_blocks=12, num_heads=12, mlp_ratio=4,
        attn_mode="swin", window_size=8, use_fp16=True, representation_config={"use_color": True})),
}


MODULES = {"SparseStructureFlow4DModel": "sparse_structure_flow_4d",
           "SparseStructureDecoder": "sparse_structure_decoder", "SLatFlow4DModel": "slat_flow_4d",
           "SLatGaussianDecoder": "slat_gaussian_decoder_4d", "SLatMeshDecoder": "slat_mesh_decoder"}


def model_class(name: str):
    import importlib
    return getattr(importlib.import_module(f"ss4d_blender.engine.models.{MODULES[name]}"), name)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--voxels", type=int, default=20000, help="active voxels per frame at 64^3")
    p.add_argument("--steps", type=int, default=25, help="sampling steps of each flow stage")
    p.add_argument("--blocks", type=int, default=None, help="REDUCED model: this many blocks per network")
    p.add_argument("--mesh-frames", type=int, default=None, help="frames sent through the mesh decoder (default all)")
    p.add_argument("--no-offload", action="store_true")
    p.add_argument("--stages", nargs="+", default=list(RELEASED))
    a = p.parse_args()
    device = torch.device(a.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.precision]
    T = a.frames
    label = "RELEASED sizes" if a.blocks is None else f"REDUCED: {a.blocks} blocks per network"
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{device.type} ({torch.get_num_threads()} threads)")
    print(f"device {name} | torch {torch.__version__} | {a.precision} | {T} frames x ~{a.voxels} voxels | "
          f"{a.steps} steps | {label} | random weights | offload {'off' if a.no_offload else 'on'}")

    coords = shell_voxels(a.voxels, 64, T, device)
    g = torch.Generator(device="cpu").manual_seed(0)
    cond = torch.randn(T, 1374, 1024, generator=g).to(device, dtype)
    t = torch.full((T,), 500.0, device=device)
    mesh_frames = a.mesh_frames or T

    def inputs(stage):
        if stage == "ss_flow":
            return (lambda m: m(torch.randn(T, 8, 16, 16, 16, device=device, dtype=dtype), t, cond, num_frames=T),
                    2 * a.steps)
        if stage == "ss_decoder":
            return lambda m: m(torch.randn(T, 8, 16, 16, 16, device=device, dtype=dtype)), 1
        x = SparseTensor(torch.randn(len(coords), 8, device=device, dtype=dtype), coords)
        if stage == "slat_flow":
            return lambda m: m(x.replace(x.feats), t, cond, num_frames=T), 2 * a.steps
        if stage == "gs_decoder":
            return lambda m: m(x.replace(x.feats), num_frames=T), 1
        one = coords[coords[:, 0] == 0]
        frame = SparseTensor(torch.randn(len(one), 8, device=device, dtype=dtype), one)
        return lambda m: m(frame.replace(frame.feats)), mesh_frames

    resident = []
    rows, total_time, total_flops, peak_all = [], 0.0, 0.0, 0
    for stage in a.stages:
        cls_name, args = RELEASED[stage]
        args = dict(args)
        if a.blocks is not None and "num_blocks" in args:
            args["num_blocks"] = a.blocks
        model = model_class(cls_name)(**args).eval().to(device, dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        forward, calls = inputs(stage)
        with torch.no_grad():
            forward(model)  # warm-up (also builds the neighbour maps, reused by every later call)
            sync(device)
            start = time.perf_counter()
            forward(model)
            sync(device)
            seconds = time.perf_counter() - start
            flops = count_flops(lambda: forward(model))
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        peak_all = max(peak_all, peak)
        rows.append((stage, seconds, calls, flops, peak))
        total_time += seconds * calls
        total_flops += flops * calls
        if a.no_offload:
            resident.append(model)
        else:
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print(f"{'stage':13} {'1 call s':>9} {'calls':>5} {'stage s':>8} {'GFLOP/call':>11} {'TFLOP/s':>8} {'peak GB':>8}")
    for stage, seconds, calls, flops, peak in rows:
        print(f"{stage:13} {seconds:9.3f} {calls:5d} {seconds * calls:8.1f} {flops / 1e9:11.1f} "
              f"{flops / seconds / 1e12:8.2f} {peak / 2**30:8.2f}")
    print(f"total (model stages, extrapolated) {total_time:.1f} s, {total_flops / 1e12:.1f} TFLOP, "
          f"{total_flops / max(total_time, 1e-9) / 1e12:.2f} TFLOP/s, peak {peak_all / 2**30:.2f} GB")


if __name__ == "__main__":
    main()
