"""Separating the object from its background before generation (numpy only).

- `alpha_from_source`: the frames already carry alpha (PNG sequences, ProRes 4444, WebM with alpha);
  checks that there is transparency at all.
- `chroma_key`: green/blue screen. A pixel's distance to the key colour is measured in the CbCr plane of the
  colour scaled to full brightness (so shadows on the screen are keyed too); alpha ramps from 0 at `tolerance` to
  1 at `tolerance + softness`. Spill (key colour reflected onto the object) is suppressed on kept pixels by
  pulling the key channel down to the mean of the other two where it exceeds it.
Both raise InputError when no foreground is left, with what to change.
"""
from __future__ import annotations

import numpy as np

from .errors import InputError

# BT.601 chroma of sRGB values in 0..1
_CB = np.array([-0.168736, -0.331264, 0.5], np.float32)
_CR = np.array([0.5, -0.418688, -0.081312], np.float32)


def _chroma(rgb: np.ndarray) -> np.ndarray:
    """[..., 3] float 0..1 -> [..., 2] (Cb, Cr) of the colour scaled to full brightness (each pixel divided
    by its largest channel, floored at 0.05 so near-black stays black): shadows on the screen keep the
    screen's chroma."""
    bright = rgb / np.maximum(rgb.max(axis=-1, keepdims=True), 0.05)
    return np.stack([bright @ _CB, bright @ _CR], axis=-1)


def chroma_key(frames: np.ndarray, key_color=(0.0, 1.0, 0.0), tolerance: float = 0.12, softness: float = 0.08,
               despill: bool = True) -> np.ndarray:
    """frames uint8 [T, H, W, 3|4] sRGB -> uint8 [T, H, W, 4] with the keyed alpha (times any existing
    alpha). key_color: sRGB 0..1; tolerance, softness: chroma distances (0..~0.7)."""
    if frames.ndim != 4 or frames.shape[-1] not in (3, 4):
        raise InputError("Chroma key needs colour frames [frames, height, width, 3 or 4].")
    key = np.asarray(key_color, np.float32)[:3]
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
            rgb[..., key_channel] = np.minimum(rgb[..., key_channel], np.maximum(limit, rgb[..., key_channel] * (1 - alpha) + limit * alpha))
        out[t, ..., :3] = np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
        out[t, ..., 3] = np.clip(alpha * 255.0 + 0.5, 0, 255).astype(np.uint8)
    check_foreground(out, "Chroma keying removed everything. Lower the tolerance, or pick the key colour from "
                          "the background of the clip.")
    return out


def alpha_from_source(frames: np.ndarray) -> np.ndarray:
    """frames uint8 [T, H, W, 4] whose alpha separates the object -> the same frames (checked)."""
    if frames.ndim != 4 or frames.shape[-1] != 4:
        raise InputError("The source has no alpha channel. Choose 'Chroma key' matting, or use a clip with "
                         "transparency (PNG sequence, ProRes 4444, WebM with alpha).")
    if (frames[..., 3] == 255).all():
        raise InputError("The source's alpha is opaque everywhere, so the object cannot be separated from the "
                         "background. Choose 'Chroma key' matting, or use a clip with transparency.")
    check_foreground(frames, "The source's alpha is empty: there is no visible object in these frames.")
    return frames


def check_foreground(frames: np.ndarray, message: str, min_fraction: float = 1e-4) -> None:
    """InputError(message) when no frame has at least `min_fraction` of its pixels visible."""
    visible = (frames[..., 3] > 127).reshape(frames.shape[0], -1).mean(axis=1)
    if visible.max() < min_fraction:
        raise InputError(message)
