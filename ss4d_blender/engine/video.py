"""Reading input frames for the engine: a folder of images with alpha, or an `.npz` with `frames`.

    read_frames(path, frame_indices=None, max_frames=None) -> uint8 [T, H, W, 4] straight-alpha RGBA

A folder: every PNG / WebP / TIFF (and, to give a clear message, JPEG / BMP) in it, ordered by the
numbers in the file names ("frame_2.png" before "frame_10.png"). Images must carry transparency (an
alpha channel, or a palette/transparency key Pillow turns into one); images without it need matting
first. An `.npz`: the array `frames` [T, H, W, 4] uint8.

Videos are not decoded here (the engine stays free of video codecs): the engine command line reads frame
folders, and `python -m ss4d_blender generate VIDEO` decodes videos with Blender's decoder and mattes them.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .errors import InputError
from .preprocess import select_evenly

IMAGE_SUFFIXES = {".png", ".webp", ".tif", ".tiff"}
NO_ALPHA_SUFFIXES = {".jpg", ".jpeg", ".bmp"}       # listed only to say "matte first" instead of "no frames"
VIDEO_SUFFIXES = {".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".gif",
                  ".ogv", ".mts", ".m2ts", ".3gp"}

VIDEO_MESSAGE = ("{path} is a video. The engine command line reads folders of RGBA frames (PNG/WebP/TIFF with "
                 "alpha) or an .npz with 'frames'; to start from a video use `python -m ss4d_blender generate "
                 "VIDEO` (Blender's video decoder and matting), or export the frames as PNG with transparency.")
MATTE_MESSAGE = ("{path} has no alpha channel (mode {mode}). SS4D needs the object separated from its "
                 "background: matte the frames first (e.g. `python -m ss4d_blender generate` with chroma key, or "
                 "any background remover) and save them as PNG with transparency.")


def natural_key(name: str) -> tuple:
    """'frame_10.png' -> ('frame_', 10, '.png'): numbers compare as numbers."""
    return tuple(int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name))


def frame_files(folder: Path) -> list[Path]:
    """The image files of a frame folder in natural order (hidden files skipped)."""
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
             and p.suffix.lower() in IMAGE_SUFFIXES | NO_ALPHA_SUFFIXES]
    return sorted(files, key=lambda p: natural_key(p.name))


def _selection(total: int, frame_indices: Optional[Sequence[int]], max_frames: Optional[int],
               source: Path) -> list[int]:
    """Which of `total` frames to read: the given indices (or all), then at most `max_frames` of them
    spread evenly (first and last kept)."""
    if frame_indices is None:
        chosen = list(range(total))
    else:
        chosen = [int(i) for i in frame_indices]
        bad = [i for i in chosen if not 0 <= i < total]
        if bad:
            raise InputError(f"Frame index {bad[0]} is out of range: {source} has {total} frames (0..{total - 1}).")
    if max_frames is not None:
        if max_frames < 1:
            raise InputError(f"The number of frames to use must be at least 1, got {max_frames}.")
        chosen = [chosen[i] for i in select_evenly(len(chosen), int(max_frames))]
    if not chosen:
        raise InputError(f"No frames selected from {source}.")
    return chosen


def read_image_rgba(path: Path) -> np.ndarray:
    """One image with transparency -> uint8 [H, W, 4] straight alpha."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.seek(0)  # first page of a multi-page TIFF / animated WebP
            has_alpha = "A" in image.getbands() or "transparency" in image.info
            if not has_alpha:
                raise InputError(MATTE_MESSAGE.format(path=path, mode=image.mode))
            if image.mode == "RGBa":  # premultiplied TIFF: back to straight alpha
                image = image.convert("RGBA")
            rgba = np.asarray(image.convert("RGBA"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"Cannot read the image {path} ({err}). Re-export it as PNG with transparency.") from err
    return np.ascontiguousarray(rgba)


def _read_folder(folder: Path, frame_indices, max_frames) -> np.ndarray:
    files = frame_files(folder)
    if not files:
        videos = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        hint = f" It contains video file(s) ({', '.join(videos[:3])}): " + VIDEO_MESSAGE.format(path="that") \
            if videos else ""
        raise InputError(f"No frame images (PNG/WebP/TIFF with alpha) found in {folder}.{hint}")
    frames, first = [], None
    for i in _selection(len(files), frame_indices, max_frames, folder):
        image = read_image_rgba(files[i])
        if first is None:
            first = (files[i], image.shape)
        elif image.shape != first[1]:
            raise InputError(f"All frames must have the same size: {files[i].name} is {image.shape[1]}x"
                             f"{image.shape[0]}, {first[0].name} is {first[1][1]}x{first[1][0]}.")
        frames.append(image)
    return np.stack(frames)


def _read_npz(path: Path, frame_indices, max_frames) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "frames" not in data.files:
                raise InputError(f"{path} has no array named 'frames' (found: {', '.join(data.files) or 'none'}).")
            frames = data["frames"]
    except (ValueError, OSError) as err:
        raise InputError(f"Cannot read {path} ({err}).") from err
    if frames.ndim != 4 or frames.shape[-1] not in (3, 4):
        raise InputError(f"{path}: 'frames' must be [frames, height, width, 4], got shape {frames.shape}.")
    if frames.shape[-1] == 3:
        raise InputError(MATTE_MESSAGE.format(path=path, mode="RGB"))
    if frames.dtype != np.uint8:
        raise InputError(f"{path}: 'frames' must be uint8 (0..255), got {frames.dtype}.")
    chosen = _selection(frames.shape[0], frame_indices, max_frames, path)
    return np.ascontiguousarray(frames[chosen])


def read_frames(path: Union[str, Path], frame_indices: Optional[Sequence[int]] = None,
                max_frames: Optional[int] = None) -> np.ndarray:
    """A frame folder or an `.npz` -> uint8 [T, H, W, 4] straight-alpha RGBA.

    frame_indices: which frames (positions in natural file order / along the npz's first axis), default all.
    max_frames: then keep at most this many, spread evenly (first and last included).
    Raises InputError (video file, images without alpha, different sizes, nothing to read, ...)."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        raise InputError(VIDEO_MESSAGE.format(path=path))
    if not path.exists():
        raise InputError(f"Input not found: {path}")
    if path.is_dir():
        return _read_folder(path, frame_indices, max_frames)
    if suffix == ".npz":
        return _read_npz(path, frame_indices, max_frames)
    if suffix in IMAGE_SUFFIXES | NO_ALPHA_SUFFIXES:
        raise InputError(f"{path} is a single image; SS4D needs a sequence. Give the folder that holds the frames.")
    raise InputError(f"Cannot read {path}: expected a folder of RGBA frames (PNG/WebP/TIFF) or an .npz with "
                     f"'frames'.")
