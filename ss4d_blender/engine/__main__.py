"""The engine's command line (plain Python + PyTorch, no Blender):

    python -m ss4d_blender.engine generate FRAMES -o OUTDIR [--frames N] [--seed S] [--steps K] [--cfg G]
        [--latent-cfg G] [--device auto|cpu|cuda|cuda:N|mps] [--precision auto|fp32|fp16|bf16]
        [--pipeline REPO_OR_DIR] [--revision REV] [--mesh-decoder auto|none|REPO_OR_DIR] [--cache-dir DIR]
        [--low-vram | --no-low-vram] [--quiet]
    python -m ss4d_blender.engine animate RESULT OUT.npz [--vertices N] [--reference-frame I] [--smoothing S]
    python -m ss4d_blender.engine make-tiny-pipeline DIR
    python -m ss4d_blender.engine register IN OUT [...]     (see `register --help`)

FRAMES is a video with alpha (PNG / QuickTime Animation / ProRes 4444 in .mov, FFV1 in .mkv, VP8/VP9 with
alpha in .webm; decoded with PyAV), a folder of RGBA images (PNG/WebP/TIFF with alpha, natural number
order) or an .npz with `frames` [T,H,W,4] uint8. The engine does no matting: videos without alpha (a usual
.mp4) go through the add-on's command line (`python -m ss4d_blender generate VIDEO --matting chroma`).

`generate` writes OUTDIR/result.safetensors (everything later steps need; `engine.result.load_result`),
OUTDIR/gaussians/frame_XXX.ply (3D Gaussian Splatting files) and OUTDIR/meshes/frame_XXX.ply (per-frame
meshes with vertex colours). `animate` turns a result into one mesh through all frames (.npz with faces
[F,3], vertices [T,V,3], colors [V,3], fit_error [T], reference_frame).

Errors meant for the user (bad input, missing weights, out of memory) print one line `error: ...` and exit
with code 2; Ctrl-C exits with 130.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

from .errors import InputError, SS4DError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
NOISE_WARNING = "tiny random-weight pipeline: results are noise"


class StageBars:
    """A `Progress` callback drawing one tqdm bar per stage (percent of the stage) on stderr."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.stage: Optional[str] = None
        self.bar = None

    def __call__(self, stage: str, fraction: float) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=100, desc=f"{stage:<18}", unit="%", file=sys.stderr, dynamic_ncols=True,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}]")
        self.bar.n = round(100 * fraction, 1)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _warn(message: str) -> None:
    line = "!" * (len(message) + 12)
    print(f"{line}\n!!  WARNING: {message}\n{line}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ commands
def cmd_generate(args: argparse.Namespace) -> int:
    from .api import GenerateSettings, generate
    from .gaussians import save_ply
    from .mesh_io import save_mesh_ply
    from .progress import Progress
    from .video import read_frames

    frames = read_frames(args.input, max_frames=args.frames)
    if not args.quiet:
        print(f"{frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]} from {args.input}", file=sys.stderr)
    mesh_decoder = None if args.mesh_decoder.lower() == "none" else args.mesh_decoder
    settings = GenerateSettings(pipeline=args.pipeline, revision=args.revision, mesh_decoder=mesh_decoder,
                                cache_dir=args.cache_dir, seed=args.seed, steps=args.steps, cfg=args.cfg,
                                latent_cfg=args.latent_cfg, device=args.device, precision=args.precision,
                                low_vram=args.low_vram)
    bars = StageBars(enabled=not args.quiet)
    try:
        result = generate(frames, settings, Progress(bars))
    finally:
        bars.close()

    out = Path(args.output)
    result_path = result.save(out / "result.safetensors")
    (out / "gaussians").mkdir(parents=True, exist_ok=True)
    for i, g in enumerate(result.gaussians):
        save_ply(out / "gaussians" / f"frame_{i:03d}.ply", g)
    for i, m in enumerate(result.meshes):
        save_mesh_ply(out / "meshes" / f"frame_{i:03d}.ply", m)

    s = result.settings
    gaussian_counts = [len(g.xyz) for g in result.gaussians]
    face_counts = [len(m.faces) for m in result.meshes]
    print(f"{result.num_frames} frames in {s.get('seconds', 0):.1f} s on {s.get('device')} ({s.get('precision')}), "
          f"pipeline {s.get('pipeline')}@{s.get('pipeline_revision')}, meshes: {s.get('mesh_decoder_source')}")
    print(f"gaussians per frame {min(gaussian_counts)}..{max(gaussian_counts)}, "
          f"mesh faces per frame {min(face_counts, default=0)}..{max(face_counts, default=0)}")
    print(f"wrote {result_path}, {out / 'gaussians'}/frame_*.ply, {out / 'meshes'}/frame_*.ply")
    if result.is_random_weights:
        _warn(NOISE_WARNING)
    return 0


def cmd_animate(args: argparse.Namespace) -> int:
    from .api import animate
    from .progress import Progress
    from .registration.cli import save_animation
    from .result import load_result
    from .types import poor_fit_message

    try:
        result = load_result(args.result)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise InputError(f"Cannot read the result file {args.result}: {err}") from err
    bars = StageBars(enabled=not args.quiet)
    try:
        anim = animate(result, target_vertices=args.vertices, reference_frame=args.reference_frame,
                       temporal_smoothing=args.smoothing, progress=Progress(bars), device=args.device)
    finally:
        bars.close()
    save_animation(Path(args.output), anim)
    print(f"{anim.vertices.shape[0]} frames x {anim.vertices.shape[1]} vertices, {len(anim.faces)} faces, "
          f"reference frame {anim.reference_frame}, fit error max {float(anim.fit_error.max()):.5f} -> {args.output}")
    if anim.info["bad_frames"]:
        _warn(poor_fit_message(anim.info["bad_frames"]) + " (frames counted from 0)")
    if result.is_random_weights:
        _warn(NOISE_WARNING)
    return 0


def cmd_make_tiny_pipeline(args: argparse.Namespace) -> int:
    from .tiny import make_tiny_pipeline

    started = time.perf_counter()
    folder = make_tiny_pipeline(args.folder, seed=args.seed)
    print(f"wrote the tiny random-weight pipeline to {folder} in {time.perf_counter() - started:.1f} s "
          f"(use --pipeline {folder}; its results are noise, for testing only)")
    return 0


# ------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    from .hub import SS4D_REPO

    parser = argparse.ArgumentParser(prog="python -m ss4d_blender.engine",
                                     description="SS4D engine: frames with alpha -> 4D Gaussians and meshes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="run the model on a video with alpha / frame folder / .npz",
                       description="Run SS4D on a video with alpha, a folder of RGBA frames or an .npz with "
                                   "'frames'.")
    g.add_argument("input", type=Path, help="video with alpha (.mov/.mkv/.webm), folder of RGBA frames "
                   "(PNG/WebP/TIFF) or .npz with 'frames'")
    g.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    g.add_argument("--frames", type=int, default=None, help="use at most N frames, evenly spaced (default all)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=None, help="sampler steps of both stages (default pipeline.json)")
    g.add_argument("--cfg", type=float, default=None, help="structure-stage guidance (default pipeline.json)")
    g.add_argument("--latent-cfg", type=float, default=None, help="latent-stage guidance (default pipeline.json)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    g.add_argument("--pipeline", default=SS4D_REPO, help=f"hub repo id or local folder (default {SS4D_REPO})")
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of the pipeline")
    g.add_argument("--mesh-decoder", default="auto",
                   help="auto (the pipeline's own, else TRELLIS's) | none (meshes from the Gaussians) | repo id "
                        "or folder")
    g.add_argument("--cache-dir", default=None, help="weights cache (default: the Hugging Face cache)")
    g.add_argument("--low-vram", action=argparse.BooleanOptionalAction, default=None,
                   help="load one model at a time (default: automatic, when GPU memory < 24 GB)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.set_defaults(run=cmd_generate)

    a = sub.add_parser("animate", help="one mesh through all frames of a result",
                       description="Register the per-frame meshes of a result into one animated mesh (.npz).")
    a.add_argument("result", type=Path, help="result.safetensors written by `generate`")
    a.add_argument("output", type=Path, help="output .npz")
    a.add_argument("--vertices", type=int, default=20000, help="target vertex count of the animated mesh")
    a.add_argument("--reference-frame", type=int, default=None, help="frame whose topology is used (default auto)")
    a.add_argument("--smoothing", type=float, default=0.0, help="temporal smoothing of the trajectories (0..1)")
    a.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.set_defaults(run=cmd_animate)

    t = sub.add_parser("make-tiny-pipeline", help="write the tiny random-weight pipeline (tests, offline demos)")
    t.add_argument("folder", type=Path)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(run=cmd_make_tiny_pipeline)

    sub.add_parser("register", help="register per-frame meshes (.npz or result file): register IN OUT [...]",
                   add_help=False)
    return parser


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "register":
        from .registration.cli import main as register_main

        return register_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except SS4DError as err:
        message = " ".join(str(err).split())  # one line
        print(f"error: {message}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\ncancelled", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
