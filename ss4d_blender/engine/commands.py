"""The engine command line's commands (`generate`, `animate`, `make-tiny-pipeline`); `__main__.py` wires
them into its one parser and maps their errors to exit codes."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from . import cli_common
from .cli_common import given
from .errors import Cancelled, InputError

RESULT_ENTRIES = {"result.safetensors", "gaussians", "meshes"}  # what `generate` writes into OUTDIR


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


# ------------------------------------------------------------------------------------------ generate
def check_result_folder(out: Path) -> Path:
    """OUTDIR can be written, and holds nothing but an earlier result (which the new one replaces)."""
    out = cli_common.check_writable(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"-o {out} is a file; give a folder for the result.")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in RESULT_ENTRIES)
        if others:
            raise InputError(f"-o {out} holds files that are not an SS4D result ({', '.join(others[:3])}); the "
                             f"result replaces the folder's contents, so give an empty or new folder.")
    return out


def settings_from_args(args: argparse.Namespace):
    """GenerateSettings from the flags the user set (each default lives on the dataclass)."""
    from dataclasses import fields

    from .api import GenerateSettings

    names = {f.name for f in fields(GenerateSettings)}
    windows = given(args, "window", "overlap", "step")
    missing = [name for name in windows if name not in names]
    if missing:
        raise InputError(f"--{missing[0]} is not available in this version of the engine.")
    return GenerateSettings.from_user(**given(args, "pipeline", "revision", "mesh_decoder", "cache_dir", "seed",
                                              "steps", "cfg", "latent_cfg", "device", "precision", "low_vram",
                                              "matting", "matting_quality", "matting_model"),
                                      **windows)


def frame_name_width(num_frames: int) -> int:
    """Digits of the per-frame file numbers: at least 3, and the same for every frame of a clip, so the
    files sort by name in frame order (frame_000 .. frame_999, frame_0000 .. frame_1439)."""
    return max(3, len(str(max(num_frames - 1, 0))))


def write_result_folder(out: Path, result) -> None:
    """Writes the result, Gaussians and meshes into a new folder beside `out`, then swaps it in: an
    earlier result disappears as a whole, and a half-written set never appears under `out`."""
    from .gaussians import save_ply
    from .mesh_io import save_mesh_ply

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    try:
        result.save(staging / "result.safetensors")
        (staging / "gaussians").mkdir()
        width = frame_name_width(len(result.gaussians))
        for i, g in enumerate(result.gaussians):
            save_ply(staging / "gaussians" / f"frame_{i:0{width}d}.ply", g)
        for i, m in enumerate(result.meshes):
            save_mesh_ply(staging / "meshes" / f"frame_{i:0{width}d}.ply", m)
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the result folder is an ordinary one
        (staging / "result.safetensors").chmod(0o666 & ~umask)
        if out.exists():
            os.replace(out, old)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def fetch_matting_weights(settings) -> None:
    """The learned matting's weights on disk before any work (downloaded when missing and allowed)."""
    from .background import matting_source, resolve_matting_weights

    source = matting_source(settings.matting_model, settings.matting_quality, settings.pipeline)
    resolve_matting_weights(source, cache_dir=settings.cache_dir)


def print_kept_windows(stage: str, window_cache: Path) -> None:
    """After a cancel: which windows are finished and kept, and how to continue from them."""
    from .windows import windows_finished

    finished = windows_finished(stage)
    if finished is None or finished[0] == 0 or not window_cache.is_dir():
        return
    done, total = finished
    print(f"cancelled after window {done} of {total}: the finished windows are kept in {window_cache}; run the "
          f"same command again to continue from there", file=sys.stderr, flush=True)


def cmd_generate(args: argparse.Namespace) -> int:
    from . import hub
    from .api import generate
    from .progress import Progress
    from .video import read_frames
    from .windows import cache_folder_for

    if not args.input.expanduser().exists():
        raise InputError(f"Input not found: {args.input}")
    out = check_result_folder(args.output)
    settings = settings_from_args(args)
    cli_common.check_device(settings.device)
    hub.fetch_weights(settings.pipeline, settings.revision, settings.mesh_decoder, settings.cache_dir)
    if settings.matting == "learned":
        fetch_matting_weights(settings)
    max_frames = None if args.frames in (None, "all") else args.frames
    frames = read_frames(args.input, max_frames=max_frames, frame_range=(args.start, args.end),
                         require_alpha=settings.matting == "alpha")
    if not args.quiet:
        print(f"{frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]} from {args.input}", file=sys.stderr)
    bars = StageBars(enabled=not args.quiet)
    progress = Progress(bars)
    window_cache = cache_folder_for(out)      # finished windows of a long clip: a re-run continues from them
    try:
        result = generate(frames, settings, progress, window_cache=window_cache)
    except (KeyboardInterrupt, Cancelled):
        bars.close()
        print_kept_windows(progress.stage, window_cache)
        raise
    finally:
        bars.close()
    write_result_folder(out, result)

    s = result.settings
    gaussian_counts = [len(g.xyz) for g in result.gaussians]
    face_counts = [len(m.faces) for m in result.meshes]
    print(f"{result.num_frames} frames in {s.get('seconds', 0):.1f} s on {s.get('device')} ({s.get('precision')}), "
          f"pipeline {s.get('pipeline')}@{s.get('pipeline_revision')}, meshes: {s.get('mesh_decoder_source')}")
    if s.get("matting") == "learned":
        print(f"background removed with BiRefNet {s.get('matting_variant')} from {s.get('matting_source')}"
              f"@{s.get('matting_revision')}")
    print(f"gaussians per frame {min(gaussian_counts)}..{max(gaussian_counts)}, "
          f"mesh faces per frame {min(face_counts, default=0)}..{max(face_counts, default=0)}")
    print(f"wrote {out / 'result.safetensors'}, {out / 'gaussians'}/frame_*.ply, {out / 'meshes'}/frame_*.ply")
    cli_common.print_warnings(result.warnings)
    shutil.rmtree(window_cache, ignore_errors=True)     # read from until here: the result's frames live there
    return 0


# ------------------------------------------------------------------------------------------ animate
def cmd_animate(args: argparse.Namespace) -> int:
    from .api import animate
    from .progress import Progress
    from .registration.cli import save_animation
    from .result import load_result
    from .types import poor_fit_message

    cli_common.check_writable(args.output, (".npz",), flag="OUTPUT")
    cli_common.check_device(args.device)
    try:
        result = load_result(args.result)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise InputError(f"Cannot read the result file {args.result}: {err}") from err
    bars = StageBars(enabled=not args.quiet)
    try:
        anim = animate(result, progress=Progress(bars), device=args.device,
                       **given(args, "target_vertices", "reference_frame", "temporal_smoothing"))
    finally:
        bars.close()
    save_animation(Path(args.output), anim)
    print(f"{anim.vertices.shape[0]} frames x {anim.vertices.shape[1]} vertices, {len(anim.faces)} faces, "
          f"reference frame {anim.reference_frame} -> {args.output}")
    print(cli_common.fit_error_text(anim.vertices, anim.fit_error, anim.reference_frame))
    poor_fit = poor_fit_message(anim.info["bad_frames"])
    cli_common.print_warnings(list(result.warnings) + ([poor_fit + " (frames counted from 0)"] if poor_fit else []))
    return 0


def cmd_make_tiny_pipeline(args: argparse.Namespace) -> int:
    from .tiny import make_tiny_pipeline

    cli_common.check_writable(args.folder)
    started = time.perf_counter()
    folder = make_tiny_pipeline(args.folder, seed=args.seed)
    print(f"wrote the tiny random-weight pipeline to {folder} in {time.perf_counter() - started:.1f} s "
          f"(use --pipeline {folder}; its results are noise, for testing only)")
    return 0
