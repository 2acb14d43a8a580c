"""Time per layer of our submanifold convolutions vs. a dense conv3d over the same grid.

For each voxel count (default 20k and 100k in a 64^3 grid, one frame for 3D; 8 frames for 4D / 1D) it
prints: neighbour-map build time (once per coordinate set), time of a cached sparse layer, time of the
dense layer over the whole grid (torch conv3d; for 8 frames a batch of 8 grids), and their ratio
(dense / sparse: > 1 means the sparse layer is faster).

    .venv/bin/python bench/sparse_conv.py [--device cpu|cuda|mps] [--channels 64] [--voxels 20000 100000]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ss4d_blender.engine.sparse import NEIGHBOUR_STATS, SparseConv1d, SparseConv3d, SparseConv4d, SparseTensor
from ss4d_blender.engine.sparse.neighbours import neighbour_map  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn, device, repeats):
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def shell_voxels(n: int, res: int, frames: int, device, seed=0) -> torch.Tensor:
    """~n voxels per frame on a thick wobbly shell (surface-like, as SS4D structures are)."""
    g = torch.Generator().manual_seed(seed)
    axis = (torch.arange(res) + 0.5) / res - 0.5
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1)
    radius = grid.norm(dim=-1)
    coords = []
    for f in range(frames):
        wobble = 0.02 * torch.sin(6 * grid[..., 0] + f) + 0.01 * torch.rand(res, res, res, generator=g)
        dist = (radius + wobble - 0.35).abs()
        keep = torch.argsort(dist.flatten())[:n]
        c = torch.stack(torch.unravel_index(keep, (res, res, res)), 1)
        c = c[torch.argsort((c * torch.tensor([res * res, res, 1])).sum(1))]
        coords.append(torch.cat([torch.full((len(c), 1), f), c], 1))
    return torch.cat(coords).int().to(device)


def bench(kind, n, frames, channels, res, device, dtype, repeats):
    coords = shell_voxels(n, res, frames, device)
    feats = torch.randn(len(coords), channels, device=device, dtype=dtype)
    conv = {"3d": SparseConv3d, "4d": SparseConv4d, "1d": SparseConv1d}[kind](channels, channels).to(device, dtype)
    kernel = conv.conv.weight.shape[1:-1]
    num_frames = frames if kind != "3d" else None

    def build_map():  # on a fresh tensor each time: an empty cache, so the map is really built
        neighbour_map(SparseTensor(feats, coords), kernel, num_frames)

    builds = NEIGHBOUR_STATS["builds"]
    map_build = timed(build_map, device, repeats)
    assert NEIGHBOUR_STATS["builds"] > builds
    x = SparseTensor(feats, coords)
    with torch.no_grad():
        conv(x, frames)  # builds and caches the map; every later call reuses it
        builds = NEIGHBOUR_STATS["builds"]
        sparse = timed(lambda: conv(x.replace(feats), frames), device, repeats)
        assert NEIGHBOUR_STATS["builds"] == builds
        dense_in = torch.randn(frames, channels, res, res, res, device=device, dtype=dtype)
        weight = torch.randn(channels, channels, 3, 3, 3, device=device, dtype=dtype)
        dense = timed(lambda: F.conv3d(dense_in, weight, padding=1), device, repeats)
    return map_build, sparse, dense


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--voxels", type=int, nargs="+", default=[20000, 100000])
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    device = torch.device(a.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name}, torch {torch.__version__}, {a.dtype}, channels {a.channels}, grid {a.res}^3")
    print(f"{'layer':6} {'voxels/frame':>12} {'frames':>6} {'map build ms':>12} {'sparse ms':>10} {'dense ms':>10} "
          f"{'dense/sparse':>12}")
    for n in a.voxels:
        for kind, frames in (("3d", 1), ("4d", a.frames), ("1d", a.frames)):
            build, sparse, dense = bench(kind, n, frames, a.channels, a.res, device, dtype, a.repeats)
            print(f"{kind:6} {n:12d} {frames:6d} {build * 1e3:12.1f} {sparse * 1e3:10.1f} {dense * 1e3:10.1f} "
                  f"{dense / sparse:12.2f}")


if __name__ == "__main__":
    main()
