"""Separating the object from its background before generation (numpy only).

- `alpha_from_source`: the frames already carry alpha (PNG sequences, ProRes 4444, WebM with alpha);
  checks that there is transparency at all.
- `chroma_key`: green/blue screen. The key colour is measured from the frame border (`measure_key_color`:
  the screen colour most of the border shows, over the first frames) unless the user gives one. A pixel's
  distance to the key colour is measured in the CbCr plane of the colour scaled to full brightness (so
  shadows on the screen are keyed too); alpha ramps from 0 at `tolerance` to 1 at `tolerance + softness`.
  Spill (key colour reflected onto the object) is suppressed on kept pixels by pulling the key channel down
  to the mean of the other two where it exceeds it.
Both raise InputError with what to change: when the border is no screen, and when keying removes almost
nothing (the key colour does not match the background) or almost everything, naming the frames.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .errors import InputError

# BT.601 chroma of sRGB values in 0..1
_CB = np.array([-0.168736, -0.331264, 0.5], np.float32)
_CR = np.array([0.5, -0.418688, -0.081312], np.float32)

MEASURE_FRAMES = 8          # the key colour is measured on the border of the first frames
BORDER_FRACTION = 0.03      # border band: this share of the frame's smaller side (at least 2 pixels)
MIN_SCREEN_SHARE = 0.6      # the measured colour must cover this share of the border ...
MIN_SCREEN_CHROMA = 0.12    # ... and be this saturated (green screen ~0.33, grey 0) to be a screen
MIN_REMOVED = 0.05          # a keyed frame must lose at least this share of its pixels ...
MIN_KEPT = 0.001            # ... and keep at least this share
NO_SCREEN_ADVICE = ("Chroma keying needs an even green or blue screen behind the object. Remove the background "
                    "with learned matting instead (`python -m ss4d_blender.engine matte VIDEO -o FRAMES`, then "
                    "generate from the FRAMES folder with --matting alpha), or use a clip with transparency "
                    "(--matting alpha / 'Alpha in Source': PNG frames, ProRes 4444 .mov, WebM with alpha).")


def _chroma(rgb: np.ndarray) -> np.ndarray:
    """[..., 3] float 0..1 -> [..., 2] (Cb, Cr) of the colour scaled to full brightness (each pixel divided
    by its largest channel, floored at 0.05 so near-black stays black): shadows on the screen keep the
    screen's chroma."""
    bright = rgb / np.maximum(rgb.max(axis=-1, keepdims=True), 0.05)
    return np.stack([bright @ _CB, bright @ _CR], axis=-1)


def hex_color(rgb) -> str:
    return "#" + "".join(f"{int(round(float(c) * 255)):02x}" for c in rgb)


def _frame_names(indices, frame_numbers: Optional[Sequence[int]]) -> str:
    numbers = [int(frame_numbers[i]) if frame_numbers is not None else int(i) + 1 for i in indices]
    shown = ", ".join(str(n) for n in numbers[:8]) + (", ..." if len(numbers) > 8 else "")
    return ("frame " if len(numbers) == 1 else "frames ") + shown


def border_pixels(frames: np.ndarray) -> np.ndarray:
    """float32 [N, 3] in 0..1: the pixels of a band along the four edges of the first frames."""
    first = frames[:MEASURE_FRAMES, ..., :3]
    band = max(2, int(round(BORDER_FRACTION * min(first.shape[1:3]))))
    edges = [first[:, :band], first[:, -band:], first[:, band:-band, :band], first[:, band:-band, -band:]]
    return np.concatenate([e.reshape(-1, 3) for e in edges]).astype(np.float32) / 255.0


def measure_key_color(frames: np.ndarray, tolerance: float = 0.12,
                      frame_numbers: Optional[Sequence[int]] = None) -> tuple:
    """The screen colour at the frame border: the median colour of the border pixels whose chroma is near
    the border's median chroma (an object touching the edge, or the screen's shadows, do not move it).
    Raises InputError when the border is no screen: too grey, or too uneven to be one colour."""
    pixels = border_pixels(frames)
    chroma = _chroma(pixels)
    centre = np.median(chroma, axis=0)
    for _ in range(3):  # re-centre on the pixels that agree, away from whatever else touches the border
        near = np.linalg.norm(chroma - centre, axis=-1) < tolerance
        if not near.any():
            break
        centre = np.median(chroma[near], axis=0)
    near = np.linalg.norm(chroma - centre, axis=-1) < tolerance
    key = tuple(float(c) for c in np.median(pixels[near] if near.any() else pixels, axis=0))
    share = float(near.mean())
    if np.linalg.norm(centre) < MIN_SCREEN_CHROMA or share < MIN_SCREEN_SHARE:
        raise InputError(f"The border of {_frame_names(range(min(len(frames), MEASURE_FRAMES)), frame_numbers)} "
                         f"is not a green or blue screen (measured colour {hex_color(key)}, "
                         f"{share:.0%} of the border near it). {NO_SCREEN_ADVICE}")
    return key


def chroma_key(frames: np.ndarray, key_color=None, tolerance: float = 0.12, softness: float = 0.08,
               despill: bool = True, frame_numbers: Optional[Sequence[int]] = None) -> np.ndarray:
    """frames uint8 [T, H, W, 3|4] sRGB -> uint8 [T, H, W, 4] with the keyed alpha (times any existing
    alpha). key_color: sRGB 0..1, None = measured from the frame border; tolerance, softness: chroma
    distances (0..~0.7). frame_numbers: how errors name the frames (default: counted from 1)."""
    if frames.ndim != 4 or frames.shape[-1] not in (3, 4):
        raise InputError("Chroma key needs colour frames [frames, height, width, 3 or 4].")
    measured = key_color is None
    key = np.asarray(measure_key_color(frames, tolerance, frame_numbers) if measured else key_color, np.float32)[:3]
    key_chroma = _chroma(key)
    if np.linalg.norm(key_chroma) < 0.05:
        raise InputError("The key colour is grey: chroma keying needs a saturated screen colour "
                         "(e.g. green or blue). Pick the colour of the background.")
    out = np.empty(frames.shape[:3] + (4,), np.uint8)
    key_channel = int(np.argmax(key))
    others = [c for c in range(3) if c != key_channel]
    for t in range(frames.shape[0]):
        rgb = frames[t, ..., :3].astype(np.float32) / 255.0
        dist = np.linalg.norm(_chroma(rgb) - key_chroma, axis=-1)
        alpha = np.clip((dist - tolerance) / max(softness, 1e-6), 0.0, 1.0)
        if frames.shape[-1] == 4:
            alpha *= frames[t, ..., 3].astype(np.float32) / 255.0
        if despill:
            limit = rgb[..., others].mean(axis=-1)
            spill_free = np.maximum(limit, rgb[..., key_channel] * (1 - alpha) + limit * alpha)
            rgb[..., key_channel] = np.minimum(rgb[..., key_channel], spill_free)
        out[t, ..., :3] = np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
        out[t, ..., 3] = np.clip(alpha * 255.0 + 0.5, 0, 255).astype(np.uint8)
    check_keyed(out, key, measured, frame_numbers)
    return out


def check_keyed(keyed: np.ndarray, key, measured: bool, frame_numbers: Optional[Sequence[int]] = None) -> None:
    """A keyed clip must lose its background and keep an object in every frame: frames where keying removed
    less than `MIN_REMOVED` of the pixels, or kept less than `MIN_KEPT`, are an InputError naming them."""
    kept = (keyed[..., 3] > 127).reshape(keyed.shape[0], -1).mean(axis=1)
    source = "measured from the frame border" if measured else "given"
    colour = f"the key colour {hex_color(key)} ({source})"
    too_little = np.flatnonzero(1.0 - kept < MIN_REMOVED)
    if len(too_little):
        worst = float(1.0 - kept[too_little].min())
        raise InputError(f"Chroma keying with {colour} removed only {worst:.1%} of the pixels of "
                         f"{_frame_names(too_little, frame_numbers)}: the background does not have that colour. "
                         f"Give the screen's colour (--key-color / Key Color), leave it to be measured from the "
                         f"frame border, or raise the tolerance.")
    too_much = np.flatnonzero(kept < MIN_KEPT)
    if len(too_much):
        raise InputError(f"Chroma keying with {colour} removed everything in "
                         f"{_frame_names(too_much, frame_numbers)}: no object is left. Lower the tolerance, or "
                         f"pick the key colour from the background of the clip.")


def alpha_from_source(frames: np.ndarray) -> np.ndarray:
    """frames uint8 [T, H, W, 4] whose alpha separates the object -> the same frames (checked)."""
    if frames.ndim != 4 or frames.shape[-1] != 4:
        raise InputError("The source has no alpha channel. Choose 'Chroma key' matting, or use a clip with "
                         "transparency (PNG sequence, ProRes 4444, WebM with alpha).")
    if (frames[..., 3] == 255).all():
        raise InputError("The source's alpha is opaque everywhere, so the object cannot be separated from the "
                         "background. Choose 'Chroma key' matting (a green or blue screen), or use a clip with "
                         "transparency; a usual .mp4 has no alpha.")
    check_foreground(frames, "The source's alpha is empty: there is no visible object in these frames.")
    return frames


def check_foreground(frames: np.ndarray, message: str, min_fraction: float = 1e-4) -> None:
    """InputError(message) when no frame has at least `min_fraction` of its pixels visible."""
    visible = (frames[..., 3] > 127).reshape(frames.shape[0], -1).mean(axis=1)
    if visible.max() < min_fraction:
        raise InputError(message)
