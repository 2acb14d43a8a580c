"""Frames -> the 518x518 images the image encoder sees, as the SS4D reference prepares them.

1. The union bounding box of alpha > 0 over ALL frames (so the object keeps its size and place across the
   clip); a square crop of 1.2x its half-size around its centre (corners truncated to integers as the
   reference does; parts outside the frame are transparent black).
2. Resize to 518x518 with a Lanczos-3 filter (antialiased when shrinking, Pillow's filter and sample
   positions), on premultiplied colour.
3. RGB premultiplied by alpha on black, quantised to 8 bits by truncation (the reference round-trips
   through an 8-bit image), as float in 0..1.

Frame count: the structured-latent model merges frame pairs, so an odd number of frames is padded by
repeating the last frame (`pad_to_even`); the extra frame's output is dropped by the caller.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .errors import InputError

SIZE = 518
CROP_SCALE = 1.2


def check_frames(frames: np.ndarray) -> None:
    """frames: uint8 [T, H, W, 4] straight-alpha RGBA."""
    if not isinstance(frames, np.ndarray) or frames.ndim != 4:
        raise InputError("Frames must be an array [frames, height, width, channels]; "
                         "frames of different sizes cannot be used together.")
    if frames.shape[-1] != 4:
        raise InputError("The frames have no alpha channel. Use a clip with transparency, or choose a matting "
                         "method (e.g. chroma key) so the object can be separated from its background.")
    if frames.shape[0] < 2:
        raise InputError(f"At least 2 frames are needed to generate motion, got {frames.shape[0]}. "
                         f"Select a longer frame range.")
    if frames.dtype != np.uint8:
        raise InputError(f"Frames must be 8-bit (uint8), got {frames.dtype}.")


def stack_frames(frames: list) -> np.ndarray:
    """List of [H, W, 4] arrays -> [T, H, W, 4]; a clear error when sizes differ."""
    shapes = {tuple(f.shape) for f in frames}
    if len(shapes) > 1:
        raise InputError(f"All frames must have the same size, got {sorted(shapes)}.")
    return np.stack(frames)


def crop_box(alpha: np.ndarray) -> tuple[int, int, int, int]:
    """alpha [T, H, W] -> (left, top, right, bottom) of the square crop (right/bottom exclusive, may lie
    outside the frame)."""
    rows = np.nonzero(alpha.max(axis=0) > 0)
    if rows[0].size == 0:
        raise InputError("No foreground found in any frame (the alpha channel is empty). Check the matting "
                         "settings (key colour / tolerance) or use a clip with transparency.")
    y0, y1, x0, x1 = rows[0].min(), rows[0].max(), rows[1].min(), rows[1].max()
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = max(x1 - x0, y1 - y0) / 2 * CROP_SCALE
    return int(cx - half), int(cy - half), int(cx + half), int(cy + half)


def lanczos_weights(in_size: int, out_size: int, a: int = 3) -> torch.Tensor:
    """[out_size, in_size] float64 resampling matrix of a Lanczos-a filter, stretched by the scale when
    shrinking, with Pillow's sample centres ((i + 0.5) * scale) and support bounds; rows sum to 1."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = a * filter_scale
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        x = (torch.arange(lo, hi, dtype=torch.float64) - center + 0.5) / filter_scale
        k = torch.where(x.abs() < a, torch.sinc(x) * torch.sinc(x / a), torch.zeros_like(x))
        total = k.sum()
        weights[i, lo:hi] = k / total if total != 0 else k
    return weights


def crop_padded(image: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """image [C, H, W] -> [C, bottom-top, right-left], zeros outside the image."""
    left, top, right, bottom = box
    _, h, w = image.shape
    out = image.new_zeros(image.shape[0], bottom - top, right - left)
    sx0, sy0, sx1, sy1 = max(left, 0), max(top, 0), min(right, w), min(bottom, h)
    if sx1 > sx0 and sy1 > sy0:
        out[:, sy0 - top:sy1 - top, sx0 - left:sx1 - left] = image[:, sy0:sy1, sx0:sx1]
    return out


def preprocess_frames(frames: np.ndarray, size: int = SIZE, box: Optional[tuple[int, int, int, int]] = None
                      ) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """uint8 [T, H, W, 4] -> (float32 [T, 3, size, size] premultiplied RGB in 0..1, crop box). box: the crop
    box to use (e.g. the whole clip's, when these frames are one window of it); None = these frames' own."""
    check_frames(frames)
    box = crop_box(frames[..., 3]) if box is None else box
    side = box[2] - box[0]
    if side <= 0:
        raise InputError("The foreground is too small (a single pixel) to be used.")
    wy = lanczos_weights(box[3] - box[1], size).float()
    wx = lanczos_weights(side, size).float()
    out = torch.empty(frames.shape[0], 3, size, size)
    for t in range(frames.shape[0]):
        rgba = torch.from_numpy(frames[t]).permute(2, 0, 1).float() / 255.0
        rgba = crop_padded(rgba, box)
        premultiplied = torch.cat([rgba[:3] * rgba[3:], rgba[3:]])
        resized = (wy @ premultiplied @ wx.T).clamp_(0, 1)  # [4, size, size]
        out[t] = torch.floor(resized[:3] * 255.0 + 1e-4) / 255.0
    return out, box


def pad_to_even(frames: np.ndarray) -> tuple[np.ndarray, int]:
    """Repeat the last frame when the count is odd. Returns (frames, original count)."""
    count = frames.shape[0]
    if count % 2:
        frames = np.concatenate([frames, frames[-1:]], axis=0)
    return frames, count


def select_evenly(total: int, count: int) -> list[int]:
    """`count` frame indices spread evenly over 0..total-1 (first and last included)."""
    if count >= total:
        return list(range(total))
    if count == 1:
        return [0]
    return [int(math.floor(i * (total - 1) / (count - 1) + 0.5)) for i in range(count)]
