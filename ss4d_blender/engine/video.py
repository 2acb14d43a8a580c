"""Reading input frames for the engine: a video with alpha, a folder of images with alpha, or an `.npz`.

    read_frames(path, frame_indices=None, max_frames=None) -> uint8 [T, H, W, 4] straight-alpha RGBA

A video (mov / mkv / webm / avi / ...): decoded with PyAV (FFmpeg's decoders in a wheel) when its pixel
format carries alpha: PNG, QuickTime Animation (qtrle), ProRes 4444, FFV1 or uncompressed RGBA in .mov/.mkv,
and VP8/VP9 with alpha in .webm (decoded with libvpx, which reads the alpha side channel FFmpeg's own VP9
decoder drops). A video without alpha (a typical H.264 .mp4) is refused with a pointer to matting, unless
`require_alpha=False` (learned matting removes the background afterwards: `engine generate --matting learned`);
`python -m ss4d_blender generate VIDEO --matting chroma` decodes with Blender and keys a green/blue screen.
A folder: every PNG / WebP / TIFF (and, to give a clear message, JPEG / BMP) in it, ordered by the
numbers in the file names ("frame_2.png" before "frame_10.png"). Images must carry transparency (an
alpha channel, or a palette/transparency key Pillow turns into one); images without it need matting
first (or `require_alpha=False`). An `.npz`: the array `frames` [T, H, W, 4] uint8 ([T, H, W, 3] too when
alpha is not required).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .errors import InputError

IMAGE_SUFFIXES = {".png", ".webp", ".tif", ".tiff"}
NO_ALPHA_SUFFIXES = {".jpg", ".jpeg", ".bmp"}       # listed only to say "matte first" instead of "no frames"
VIDEO_SUFFIXES = {".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".gif",
                  ".ogv", ".mts", ".m2ts", ".3gp"}

VIDEO_NO_ALPHA_MESSAGE = ("{path} has no alpha channel (pixel format {format}), so the object must be separated "
                          "from its background first: add --matting learned (background removal with BiRefNet), "
                          "use `python -m ss4d_blender generate {path} --matting chroma` for a green or blue "
                          "screen, or export the video with transparency (PNG/ProRes 4444 in .mov, VP9 with alpha "
                          "in .webm).")
NO_PYAV_MESSAGE = ("Reading videos needs PyAV (`pip install av`, listed in requirements.txt). Without it, give a "
                   "folder of PNG frames with transparency, or use `python -m ss4d_blender generate {path}`.")
MATTE_MESSAGE = ("{path} has no alpha channel (mode {mode}). SS4D needs the object separated from its "
                 "background: matte the frames first (--matting learned, `python -m ss4d_blender generate` with chroma "
                 "key, or any background remover and PNG frames with transparency).")


def natural_key(name: str) -> tuple:
    """'frame_10.png' -> ('frame_', 10, '.png'): numbers compare as numbers."""
    return tuple(int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name))


def frame_files(folder: Path) -> list[Path]:
    """The image files of a frame folder in natural order (hidden files skipped)."""
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
             and p.suffix.lower() in IMAGE_SUFFIXES | NO_ALPHA_SUFFIXES]
    return sorted(files, key=lambda p: natural_key(p.name))


def _selection(total: int, frame_indices: Optional[Sequence[int]], max_frames: Optional[int],
               source: Path, frame_range: Optional[tuple] = None) -> list[int]:
    """Which of `total` frames to read: the given indices, or the frames of `frame_range` (first, last),
    counted from 1 and inclusive, or all; then at most `max_frames` of them spread evenly (first and last
    kept)."""
    if frame_indices is not None:
        chosen = [int(i) for i in frame_indices]
        bad = [i for i in chosen if not 0 <= i < total]
        if bad:
            raise InputError(f"Frame index {bad[0]} is out of range: {source} has {total} frames (0..{total - 1}).")
    elif frame_range is not None and frame_range != (None, None):
        start, end = frame_range
        for flag, value in (("--start", start), ("--end", end)):
            if value is not None and not 1 <= value <= total:
                raise InputError(f"{flag} {value} is outside {source}, which has frames 1..{total}.")
        start, end = start or 1, end or total
        if end <= start:
            raise InputError(f"The range {start}..{end} of {source} holds fewer than 2 frames; at least 2 are "
                             f"needed to generate motion.")
        chosen = list(range(start - 1, end))
    else:
        chosen = list(range(total))
    if max_frames is not None:
        from .preprocess import select_evenly

        if max_frames < 1:
            raise InputError(f"The number of frames to use must be at least 1, got {max_frames}.")
        chosen = [chosen[i] for i in select_evenly(len(chosen), int(max_frames))]
    if not chosen:
        raise InputError(f"No frames selected from {source}.")
    return chosen


def read_image_rgba(path: Path, require_alpha: bool = True) -> np.ndarray:
    """One image -> uint8 [H, W, 4] straight alpha (fully decoded, so a truncated file is caught here).
    require_alpha: an image without transparency is refused (it needs matting first)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.seek(0)  # first page of a multi-page TIFF / animated WebP
            has_alpha = "A" in image.getbands() or "transparency" in image.info
            if require_alpha and not has_alpha:
                raise InputError(MATTE_MESSAGE.format(path=path, mode=image.mode))
            if image.mode == "RGBa":  # premultiplied TIFF: back to straight alpha
                image = image.convert("RGBA")
            rgba = np.asarray(image.convert("RGBA"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(f"Cannot read the image {path} ({err}). Re-export it as PNG with transparency.") from err
    return np.ascontiguousarray(rgba)


def _folder_frame_files(folder: Path) -> list[Path]:
    files = frame_files(folder)
    if not files:
        videos = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        hint = f" It contains video file(s) ({', '.join(videos[:3])}); give one of them instead." if videos else ""
        raise InputError(f"No frame images (PNG/WebP/TIFF with alpha) found in {folder}.{hint}")
    return files


def _check_same_size(path: Path, image: np.ndarray, first: Optional[tuple]) -> tuple:
    """first: (path, shape) of the folder's first frame read (None for the first). Returns it."""
    if first is None:
        return path, image.shape
    if image.shape != first[1]:
        raise InputError(f"All frames must have the same size: {path.name} is {image.shape[1]}x"
                         f"{image.shape[0]}, {first[0].name} is {first[1][1]}x{first[1][0]}.")
    return first


def check_frame_folder(folder: Union[str, Path], require_alpha: bool = True) -> list[Path]:
    """Every frame of an image folder decodes and all have the same size (the checks `read_frames` makes,
    with the same messages), before anything else reads them. Returns the files in frame order."""
    folder = Path(folder)
    files, first = _folder_frame_files(folder), None
    for path in files:
        first = _check_same_size(path, read_image_rgba(path, require_alpha), first)
    return files


def _read_folder(folder: Path, frame_indices, max_frames, frame_range=None, require_alpha=True) -> np.ndarray:
    files = _folder_frame_files(folder)
    frames, first = [], None
    for i in _selection(len(files), frame_indices, max_frames, folder, frame_range):
        image = read_image_rgba(files[i], require_alpha)
        first = _check_same_size(files[i], image, first)
        frames.append(image)
    return np.stack(frames)


def _read_npz(path: Path, frame_indices, max_frames, frame_range=None, require_alpha=True) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "frames" not in data.files:
                raise InputError(f"{path} has no array named 'frames' (found: {', '.join(data.files) or 'none'}).")
            frames = data["frames"]
    except (ValueError, OSError) as err:
        raise InputError(f"Cannot read {path} ({err}).") from err
    if frames.ndim != 4 or frames.shape[-1] not in (3, 4):
        raise InputError(f"{path}: 'frames' must be [frames, height, width, 4], got shape {frames.shape}.")
    if frames.shape[-1] == 3 and require_alpha:
        raise InputError(MATTE_MESSAGE.format(path=path, mode="RGB"))
    if frames.dtype != np.uint8:
        raise InputError(f"{path}: 'frames' must be uint8 (0..255), got {frames.dtype}.")
    chosen = _selection(frames.shape[0], frame_indices, max_frames, path, frame_range)
    return np.ascontiguousarray(frames[chosen])


def _format_has_alpha(video_format) -> bool:
    """A decoded pixel format carries transparency: an alpha component, or a palette (GIF-like)."""
    return video_format.has_palette or any(c.is_alpha for c in video_format.components)


def _open_decoder(stream):
    """The codec context to decode `stream` with. VP8/VP9 in WebM store alpha as a side channel
    (`alpha_mode=1` in the track's metadata) that only libvpx decodes, so those use libvpx."""
    import av

    name = stream.codec_context.name
    alpha_mode = {k.lower(): v for k, v in stream.metadata.items()}.get("alpha_mode") == "1"
    libvpx = {"vp9": "libvpx-vp9", "vp8": "libvpx"}.get(name)
    if alpha_mode and libvpx and libvpx in av.codecs_available:
        context = av.CodecContext.create(libvpx, "r")
        if stream.codec_context.extradata:
            context.extradata = stream.codec_context.extradata
        return context
    return stream.codec_context


def _decoded_frames(path: Path):
    """Yields PyAV video frames of the first video stream of `path`, in display order."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise InputError(f"{path} has no video stream.")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        decoder = _open_decoder(stream)
        for packet in container.demux(stream):
            yield from decoder.decode(packet)  # the last (empty) packet flushes the decoder


def _read_video(path: Path, frame_indices, max_frames, frame_range=None, require_alpha=True) -> np.ndarray:
    try:
        import av  # noqa: F401
    except ImportError as err:
        raise InputError(NO_PYAV_MESSAGE.format(path=path)) from err
    from av.error import FFmpegError

    try:
        total, first_format = 0, None
        for frame in _decoded_frames(path):  # pass 1: count (decoding only: keeps memory flat)
            first_format = first_format or frame.format
            total += 1
        if total == 0:
            raise InputError(f"{path} contains no decodable video frames.")
        if require_alpha and not _format_has_alpha(first_format):
            raise InputError(VIDEO_NO_ALPHA_MESSAGE.format(path=path, format=first_format.name))
        chosen = _selection(total, frame_indices, max_frames, path, frame_range)
        wanted = dict.fromkeys(chosen)
        for index, frame in enumerate(_decoded_frames(path)):  # pass 2: convert the chosen frames
            if index in wanted:
                wanted[index] = frame.to_ndarray(format="rgba")
    except FFmpegError as err:
        raise InputError(f"Cannot decode the video {path} ({err}). Re-export it (e.g. PNG or ProRes 4444 "
                         f"in .mov) or as a folder of PNG frames.") from err
    missing = [i for i in chosen if wanted[i] is None]
    if missing:
        raise InputError(f"{path}: frame {missing[0]} could not be decoded on the second read.")
    return np.ascontiguousarray(np.stack([wanted[i] for i in chosen]))


def read_frames(path: Union[str, Path], frame_indices: Optional[Sequence[int]] = None,
                max_frames: Optional[int] = None, frame_range: Optional[tuple] = None,
                require_alpha: bool = True) -> np.ndarray:
    """A video with alpha, a frame folder or an `.npz` -> uint8 [T, H, W, 4] straight-alpha RGBA.

    frame_indices: which frames (decoded video frames / natural file order / the npz's first axis), default all.
    frame_range: or (first, last) frame counted from 1, inclusive, either None for the clip's own.
    max_frames: then keep at most this many, spread evenly (first and last included).
    require_alpha: False reads sources without alpha too (opaque RGBA; an .npz may be [T, H, W, 3]), for
    learned matting.
    Raises InputError (video or images without alpha, undecodable, different sizes, nothing to read, ...)."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if not path.exists():
        raise InputError(f"Input not found: {path}")
    if suffix in VIDEO_SUFFIXES and path.is_file():
        return _read_video(path, frame_indices, max_frames, frame_range, require_alpha)
    if path.is_dir():
        return _read_folder(path, frame_indices, max_frames, frame_range, require_alpha)
    if suffix == ".npz":
        return _read_npz(path, frame_indices, max_frames, frame_range, require_alpha)
    if suffix in IMAGE_SUFFIXES | NO_ALPHA_SUFFIXES:
        raise InputError(f"{path} is a single image; SS4D needs a sequence. Give the folder that holds the frames.")
    raise InputError(f"Cannot read {path}: expected a video with alpha, a folder of RGBA frames (PNG/WebP/TIFF) "
                     f"or an .npz with 'frames'.")
