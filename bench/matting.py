"""Learned background removal: speed of BiRefNet and the effect of the temporal steps.

precision: the golden case (`../shared/golden/birefnet`, tiny Swin) run in fp32 / fp16 / bf16, logits and
          alpha compared with the reference's float32 output (GPUs run the matting in fp16).
speed:    seconds per frame at 1024 x 1024 for "best" (BiRefNet, Swin-L) and "fast" (BiRefNet_lite, Swin-T),
          built to the released shapes with RANDOM weights (the cost does not depend on the values); fp16 on a
          GPU, fp32 on the CPU; peak memory (GPU: max allocated; CPU: peak resident set of a fresh process,
          and what it was before the first frame). Each quality runs in its own process.
temporal: on ../shared/samples bird_fly_scene.mp4 and boxing_green.mp4 (composites whose true alpha are the
          RGBA folders beside them): IoU with the true alpha (> 0.5), mean absolute alpha error and the mean
          frame-to-frame alpha change, for
            - the true alpha degraded like a per-frame matte (edge flicker, stray blobs for a frame, holes),
              before and after `stabilise_alpha`;
            - the tiny random-weight BiRefNet of `make-tiny-pipeline`, before and after (its matte is noise:
              this only shows that the temporal steps run on real frames).
          The released weights could not be downloaded here, so the model's own accuracy is not measured.

    .venv/bin/python bench/matting.py [precision|speed|temporal|all] [--device cpu|cuda|mps] [--frames 1]
                                      [--batch 1] [--repeats 1] [--golden ../shared/golden]
    GPU target (issue 15): bench/matting.py speed --device cuda --frames 32 --batch 4 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from ss4d_blender.engine.models.birefnet import SWIN_V1_L, SWIN_V1_T, build_birefnet  # noqa: E402

SAMPLES = REPO.parent / "shared" / "samples"
CLIPS = {"bird_fly_scene.mp4": "bird_fly", "boxing_green.mp4": "boxing"}
CONFIGS = {"best": SWIN_V1_L, "fast": SWIN_V1_T}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def speed_one(quality: str, device: str, frames: int, batch: int, repeats: int) -> dict:
    """Runs in its own process: builds the model, times `repeats` passes over `frames` frames at 1024^2,
    `batch` frames per call (as the matting stage calls it)."""
    device = torch.device(device)
    dtype = torch.float16 if device.type in ("cuda", "mps") else torch.float32
    model = build_birefnet(CONFIGS[quality]).to(device=device, dtype=dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    image = torch.randn(min(batch, frames), 3, 1024, 1024, device=device, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = rss_mb()
    times = []
    with torch.no_grad():
        for _ in range(repeats + (device.type != "cpu")):  # one untimed warm-up pass on accelerators
            sync(device)
            start = time.perf_counter()
            for first in range(0, frames, batch):
                model(image[:min(batch, frames - first)])
            sync(device)
            times.append(time.perf_counter() - start)
    times = times[1:] if device.type != "cpu" else times
    out = {"quality": quality, "params_M": params / 1e6, "device": device.type, "dtype": str(dtype)[6:],
           "frames": frames, "batch": batch, "s_total": min(times), "s_per_frame": min(times) / frames,
           "s_per_frame_first": times[0] / frames}
    if device.type == "cuda":
        out["peak_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:
        out["rss_before_mb"], out["rss_peak_mb"] = before, rss_mb()
    return out


def speed(device: str, frames: int, batch: int, repeats: int) -> list[dict]:
    rows = []
    for quality in CONFIGS:
        proc = subprocess.run([sys.executable, __file__, "_speed_one", quality, "--device", device, "--frames",
                               str(frames), "--batch", str(batch), "--repeats", str(repeats)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    return rows


def precision(device: str, golden: Path) -> list[dict]:
    from safetensors.torch import load_file

    from ss4d_blender.engine.models.birefnet import load_birefnet

    case = golden / "birefnet"
    io = load_file(str(case / "io.safetensors"))
    ref = io["logits"].double()
    rows = []
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        model = load_birefnet(case / "weights.safetensors", device=device, dtype=dtype)
        with torch.no_grad():
            out = model(io["image"].to(device=device, dtype=dtype)).double().cpu()
        rows.append({"dtype": name, "logits_max_abs": float((out - ref).abs().max()),
                     "logits_rel_l2": float((out - ref).norm() / ref.norm()),
                     "alpha_max_abs": float((out.sigmoid() - ref.sigmoid()).abs().max())})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------------------------- temporal
def read_clip(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(frames uint8 [T, H, W, 3], true alpha float32 [T, H, W])."""
    from PIL import Image

    from ss4d_blender.engine.matte_cli import read_frames_rgb

    frames, _ = read_frames_rgb(SAMPLES / name)
    files = sorted((SAMPLES / CLIPS[name]).glob("*.png"))
    alpha = np.stack([np.asarray(Image.open(f).convert("RGBA"))[..., 3] for f in files]).astype(np.float32) / 255
    return frames, alpha


def degrade(alpha: np.ndarray, seed: int = 0) -> np.ndarray:
    """The true alpha made to look like a per-frame matte: the edge moves in and out by a pixel or two
    from frame to frame, a stray blob appears in every fourth frame (for that frame only), and small holes
    open inside the object in every fifth frame."""
    from ss4d_blender.engine.matte_temporal import _box_blur

    rng = np.random.default_rng(seed)
    t, h, w = alpha.shape
    out = np.empty_like(alpha)
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(t):
        soft = _box_blur(alpha[i][None], 2)[0]
        level = rng.uniform(0.25, 0.75)
        out[i] = np.clip((soft - level) * 4 + 0.5, 0, 1)
        if i % 4 == 1:
            cy, cx = rng.integers(0, h), rng.integers(0, w)
            far = alpha[i][max(0, cy - 40):cy + 40, max(0, cx - 40):cx + 40].max() < 0.5
            if far:
                out[i] = np.maximum(out[i], (((yy - cy) ** 2 + (xx - cx) ** 2) < rng.integers(8, 25) ** 2) * 0.9)
        if i % 5 == 2:
            inside = np.argwhere(alpha[i] > 0.99)
            for cy, cx in inside[rng.integers(0, len(inside), 3)]:
                out[i][((yy - cy) ** 2 + (xx - cx) ** 2) < 9] = 0.1
    return out.astype(np.float32)


def scores(alpha: np.ndarray, truth: np.ndarray) -> dict:
    a, g = alpha > 0.5, truth > 0.5
    iou = (a & g).sum(axis=(1, 2)) / np.maximum((a | g).sum(axis=(1, 2)), 1)
    return {"iou": float(iou.mean()), "iou_min": float(iou.min()), "mae": float(np.abs(alpha - truth).mean()),
            "change": float(np.abs(np.diff(alpha, axis=0)).mean())}


def temporal() -> list[dict]:
    from ss4d_blender.engine.background import load_matting_model, predict_alpha, write_tiny_birefnet
    from ss4d_blender.engine.matte_temporal import stabilise_alpha

    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = load_matting_model(str(write_tiny_birefnet(tmp)))
        for name in CLIPS:
            frames, truth = read_clip(name)
            row = {"clip": name, "truth_change": float(np.abs(np.diff(truth, axis=0)).mean())}
            raw = degrade(truth)
            start = time.perf_counter()
            stable, _ = stabilise_alpha(raw, frames)
            row["stabilise_s"] = time.perf_counter() - start
            row["degraded"], row["degraded_stable"] = scores(raw, truth), scores(stable, truth)
            raw = predict_alpha(tiny, frames, batch_size=4)
            row["tiny_random"] = scores(raw, truth)
            try:
                row["tiny_random_stable"] = scores(stabilise_alpha(raw, frames)[0], truth)
            except Exception as err:  # noqa: BLE001 - noise may leave frames empty; reported as such
                row["tiny_random_stable"] = str(err)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="all",
                        choices=["precision", "speed", "temporal", "all", "_speed_one"])
    parser.add_argument("quality", nargs="?", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=1, help="frames timed (speed)")
    parser.add_argument("--batch", type=int, default=1, help="frames per model call (speed)")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes (speed; the fastest is reported)")
    parser.add_argument("--golden", type=Path, default=REPO.parent / "shared" / "golden",
                        help="folder holding the birefnet parity case (precision)")
    args = parser.parse_args()
    if args.what == "_speed_one":
        print(json.dumps(speed_one(args.quality, args.device, args.frames, args.batch, args.repeats)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.what in ("precision", "all"):
        precision(args.device, args.golden)
    if args.what in ("speed", "all"):
        speed(args.device, args.frames, args.batch, args.repeats)
    if args.what in ("temporal", "all"):
        temporal()


if __name__ == "__main__":
    main()
