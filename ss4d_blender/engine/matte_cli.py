"""`matte VIDEO -o DIR`: learned background removal from the command line.

Writes one RGBA PNG per frame of the clip into DIR, numbered from 0 (`00000.png`, ...), and
`contact_sheet.png` (8 frames spread over the clip, over a checkerboard) for a quick look. The weights are
`--matting-model` (a hub repository, a folder with model.safetensors, or a .safetensors file), else the
`birefnet/` folder of `--pipeline DIR` when it has one, else the released BiRefNet for `--matting-quality`.
Everything is computed before the first file is written: an error leaves DIR as it was.

    add_arguments(parser)   adds the flags to an argparse (sub)parser
    run(args) -> int        0 when done; raises SS4DError (InputError, WeightsError, ...) otherwise
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import InputError

CONTACT_FRAMES = 8
CONTACT_COLUMNS = 4
CONTACT_THUMB_WIDTH = 256
IMAGE_SUFFIXES = {".png", ".webp", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .background import MATTING_QUALITIES

    parser.add_argument("video", type=Path, help="a video (any format FFmpeg reads) or a folder of images")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="folder for the RGBA frames and contact_sheet.png (new, or empty)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--pipeline", default=None,
                        help="a pipeline folder whose own birefnet/ model is used when it has one")
    source.add_argument("--matting-model", default=None,
                        help="BiRefNet weights: hub repository id, folder with model.safetensors, or a .safetensors")
    parser.add_argument("--matting-quality", choices=sorted(MATTING_QUALITIES), default=None,
                        help="best: BiRefNet (Swin-L); fast: BiRefNet_lite (Swin-T, less memory) (default: best)")
    parser.add_argument("--revision", default=None, help="hub revision (commit) of the matting weights")
    parser.add_argument("--frames", type=int, default=None, help="at most this many frames, spread evenly "
                                                                 "(default: all)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    parser.add_argument("--batch-size", type=int, default=None, help="frames per model call (default: by device)")
    parser.add_argument("--quiet", action="store_true", help="no progress (default: shown)")


# ---------------------------------------------------------------------------------- reading frames
def _video_frames(path: Path):
    """PyAV frames of the first video stream of `path`, in display order."""
    try:
        import av
    except ImportError as err:
        raise InputError(f"Reading {path} needs PyAV (`pip install av`); or give a folder of images.") from err
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise InputError(f"{path} has no video stream.")
        yield from container.decode(video=0)


def _read_video_rgb(path: Path, max_frames: Optional[int]) -> tuple[list[np.ndarray], list[int]]:
    """Decodes twice: once to count, once to convert only the frames kept (memory stays that of the kept
    frames, however long the clip)."""
    from av.error import FFmpegError

    from .preprocess import select_evenly

    try:
        total = sum(1 for _ in _video_frames(path))
        kept = select_evenly(total, max_frames) if max_frames else list(range(total))
        wanted = set(kept)
        frames = [f.to_ndarray(format="rgb24") for i, f in enumerate(_video_frames(path)) if i in wanted]
    except FFmpegError as err:
        raise InputError(f"Cannot decode the video {path} ({err}).") from err
    return frames, kept[:len(frames)]


def _read_folder_rgb(folder: Path, max_frames: Optional[int]) -> tuple[list[np.ndarray], list[int]]:
    from PIL import Image, UnidentifiedImageError

    from .preprocess import select_evenly
    from .video import natural_key

    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: natural_key(p.name))
    kept = select_evenly(len(files), max_frames) if max_frames else list(range(len(files)))
    frames = []
    for i in kept:
        try:
            with Image.open(files[i]) as image:
                frames.append(np.asarray(image.convert("RGB"), np.uint8))
        except (UnidentifiedImageError, OSError) as err:
            raise InputError(f"Cannot read the image {files[i]} ({err}).") from err
    return frames, kept


def read_frames_rgb(path: Path, max_frames: Optional[int] = None) -> tuple[np.ndarray, list[int]]:
    """A video or a folder of images -> (uint8 [T, H, W, 3], the frame numbers kept, counted from 0);
    `max_frames`: at most this many, spread evenly (first and last kept)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"Input not found: {path}")
    if max_frames is not None and max_frames < 1:
        raise InputError(f"--frames must be at least 1, got {max_frames}.")
    frames, kept = _read_folder_rgb(path, max_frames) if path.is_dir() else _read_video_rgb(path, max_frames)
    if not frames:
        raise InputError(f"{path} holds no frames to read.")
    if len({f.shape for f in frames}) > 1:
        raise InputError(f"The frames of {path} differ in size; all frames must have the same size.")
    return np.stack(frames), kept


# ---------------------------------------------------------------------------------- writing
def contact_sheet(frames_rgba: np.ndarray, count: int = CONTACT_FRAMES, columns: int = CONTACT_COLUMNS,
                  thumb_width: int = CONTACT_THUMB_WIDTH) -> np.ndarray:
    """uint8 [T, H, W, 4] -> uint8 RGB [rows * h, columns * w, 3]: `count` frames spread over the clip,
    composited over a grey checkerboard, left to right then top to bottom."""
    from PIL import Image

    from .preprocess import select_evenly

    t, h, w = frames_rgba.shape[:3]
    tw = min(thumb_width, w)
    th = max(1, round(h * tw / w))
    chosen = select_evenly(t, count)
    rows = -(-len(chosen) // columns)
    yy, xx = np.mgrid[0:th, 0:tw]
    checker = np.where(((yy // 16 + xx // 16) % 2)[..., None] == 0, 200, 150).astype(np.float32)
    sheet = np.full((rows * th, columns * tw, 3), 255, np.uint8)
    for k, i in enumerate(chosen):
        thumb = np.asarray(Image.fromarray(frames_rgba[i], "RGBA").resize((tw, th), Image.BILINEAR), np.float32)
        alpha = thumb[..., 3:] / 255.0
        r, c = divmod(k, columns)
        sheet[r * th:(r + 1) * th, c * tw:(c + 1) * tw] = np.clip(thumb[..., :3] * alpha + checker * (1 - alpha)
                                                                  + 0.5, 0, 255).astype(np.uint8)
    return sheet


def check_output_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} exists and is not a folder; give a new or empty folder with -o.")
    if folder.is_dir() and any(folder.iterdir()):
        raise InputError(f"{folder} is not empty; give a new or empty folder with -o (nothing is overwritten).")


def write_matte(folder: Path, frames_rgba: np.ndarray) -> list[Path]:
    """`00000.png`, ... and `contact_sheet.png` into `folder` (created). Returns the frame files."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(frames_rgba):
        paths.append(folder / f"{i:05d}.png")
        Image.fromarray(frame, "RGBA").save(paths[-1])
    Image.fromarray(contact_sheet(frames_rgba), "RGB").save(folder / "contact_sheet.png")
    return paths


def _printing_progress(quiet: bool):
    from .progress import Progress

    if quiet:
        return Progress()

    def show(stage: str, fraction: float) -> None:
        print(f"\r{stage}: {100 * fraction:5.1f} %", end="\n" if fraction >= 1 else "", flush=True)

    return Progress(show)


def run(args: argparse.Namespace) -> int:
    from .background import remove_background

    check_output_folder(args.output)
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", args.device):
        raise InputError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {args.device!r}.")
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}.")
    frames, numbers = read_frames_rgb(args.video, args.frames)
    result = remove_background(frames, args.matting_model, args.matting_quality, _printing_progress(args.quiet),
                               pipeline=args.pipeline, device=args.device, batch_size=args.batch_size,
                               revision=args.revision, frame_numbers=numbers)
    write_matte(args.output, result.frames)
    print(f"wrote {len(result.frames)} RGBA frames and contact_sheet.png to {args.output} "
          f"(BiRefNet {result.variant} from {result.source}, revision {result.revision})")
    for warning in result.warnings:
        print(f"warning: {warning}")
    return 0
