"""Making per-frame mattes stable across a clip (numpy only).

A model that mattes each frame on its own flickers at the edges, and now and then it picks another object
for a frame or adds a stray blob. Three steps, each usable on its own:

- `keep_persistent_object`: the foreground of every frame is split into connected parts; parts of
  consecutive frames (or one frame apart) that overlap after a small dilation for motion belong to one
  track. The track with the most foreground is the subject; other tracks are kept only if they last at
  least `persist_fraction` of the clip, so blobs that appear for a frame or two are dropped.
- `smooth_static_alpha`: where the image does not change from one frame to the next, alpha is averaged
  over time (a forward and a backward exponential average, so nothing lags); where it changes, alpha is
  left as it is.
- `check_object_in_every_frame` raises an InputError naming the frames with no object; `border_warning`
  says when the subject touches the frame border in every frame.

`stabilise_alpha` runs them in that order. Alpha is float32 [T, H, W] in 0..1 throughout.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from .errors import InputError

FOREGROUND = 0.5  # alpha above this is foreground
MIN_VISIBLE_FRACTION = 1e-4  # a frame with less foreground than this has no object
TRACK_SIDE = 256  # parts are found and tracked on masks of at most this many pixels per side
LINK_RADIUS = 0.02  # parts of consecutive frames this close (fraction of the frame's larger side) are linked
MAX_GAP = 2  # parts are also linked across this many frames minus one (a part missing for a frame)


# ---------------------------------------------------------------------------------- connected parts
class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """mask bool [H, W] -> (labels int32 [H, W]: 0 background, 1..n the 8-connected parts, n).

    Works on horizontal runs of foreground: runs of neighbouring rows that touch (diagonals included) are
    joined, so the cost grows with the number of runs, not of pixels."""
    h, w = mask.shape
    edges = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)  # [H, W + 1]
    run_rows, run_starts = np.nonzero(edges == 1)
    _, run_ends = np.nonzero(edges == -1)  # exclusive; row-major order pairs them with the starts
    first_run = np.searchsorted(run_rows, np.arange(h + 1))
    runs = _UnionFind(len(run_rows))
    for row in range(1, h):
        i, i_end = first_run[row - 1], first_run[row]  # runs of the previous row
        j, j_end = first_run[row], first_run[row + 1]
        while i < i_end and j < j_end:
            if run_starts[i] <= run_ends[j] and run_starts[j] <= run_ends[i]:  # overlap or touch diagonally
                runs.union(i, j)
            if run_ends[i] < run_ends[j]:
                i += 1
            else:
                j += 1
    roots = np.array([runs.find(i) for i in range(len(run_rows))], np.int64)
    _, run_label = np.unique(roots, return_inverse=True)
    labels = np.zeros((h, w), np.int32)
    for row, start, end, label in zip(run_rows, run_starts, run_ends, run_label):
        labels[row, start:end] = label + 1
    return labels, int(run_label.max()) + 1 if len(run_label) else 0


def _block_max(mask: np.ndarray, factor: int) -> np.ndarray:
    """bool [T, H, W] -> [T, ceil(H/f), ceil(W/f)]: a block is set when any of its pixels is."""
    t, h, w = mask.shape
    padded = np.pad(mask, ((0, 0), (0, -h % factor), (0, -w % factor)))
    return padded.reshape(t, padded.shape[1] // factor, factor, padded.shape[2] // factor, factor).any(axis=(2, 4))


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """bool [..., H, W] dilated by a (2r+1) square."""
    out = mask.copy()
    for _ in range(radius):
        grown = out.copy()
        grown[..., 1:, :] |= out[..., :-1, :]
        grown[..., :-1, :] |= out[..., 1:, :]
        grown[..., :, 1:] |= grown[..., :, :-1].copy()
        grown[..., :, :-1] |= grown[..., :, 1:].copy()
        out = grown
    return out


def _linked_parts(before: np.ndarray, after: np.ndarray, radius: int) -> np.ndarray:
    """Pairs (part in `before`, part in `after`) [N, 2] whose pixels come within `radius` (a square) of
    each other; labels [H, W] as from `connected_components`.

    Overlap is read at every pixel of `after`, nearness only at its parts' edge pixels: a part of `before`
    near a part of `after` without overlapping it is nearest to an edge pixel."""
    fg = after > 0
    inner = fg.copy()
    inner[1:] &= after[1:] == after[:-1]
    inner[:-1] &= after[:-1] == after[1:]
    inner[:, 1:] &= after[:, 1:] == after[:, :-1]
    inner[:, :-1] &= after[:, :-1] == after[:, 1:]
    hits = np.zeros((int(before.max()) + 1, int(after.max()) + 1), bool)  # [part before, part after]
    hits[before[fg], after[fg]] = True
    ys, xs = np.nonzero(fg & ~inner)
    edge_parts = after[ys, xs]
    padded = np.pad(before, radius)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            hits[padded[ys + dy, xs + dx], edge_parts] = True
    return np.argwhere(hits[1:, 1:]) + 1


def _tracks(labels: list[np.ndarray], counts: list[int], link_radius: int) -> tuple[np.ndarray, list[int]]:
    """Parts of frames t and t + k (k <= MAX_GAP) that come within k * `link_radius` of each other -> one
    track (a subject missed in one frame stays one track). Returns the track id of every part (frame by
    frame) and the index of each frame's first part."""
    offsets = np.cumsum([0] + counts).tolist()
    tracks = _UnionFind(offsets[-1])
    for gap in range(1, MAX_GAP + 1):
        for t in range(len(labels) - gap):
            if counts[t] and counts[t + gap]:
                for a, b in _linked_parts(labels[t], labels[t + gap], gap * link_radius):
                    tracks.union(offsets[t] + int(a) - 1, offsets[t + gap] + int(b) - 1)
    return np.array([tracks.find(i) for i in range(offsets[-1])], np.int64), offsets


def keep_persistent_object(alpha: np.ndarray, persist_fraction: float = 0.5,
                           threshold: float = FOREGROUND) -> np.ndarray:
    """alpha [T, H, W] -> alpha with only the subject's track and the tracks lasting at least
    `persist_fraction` of the frames (and 2 frames) kept; everything else set to 0. One frame: unchanged."""
    t, h, w = alpha.shape
    if t < 2:
        return alpha
    factor = max(1, math.ceil(max(h, w) / TRACK_SIDE))
    small = _block_max(alpha > threshold, factor)
    found = [connected_components(m) for m in small]
    labels, counts = [f[0] for f in found], [f[1] for f in found]
    if not sum(counts):
        return alpha
    link = max(1, round(LINK_RADIUS * max(h, w) / factor))
    track_of, offsets = _tracks(labels, counts, link)
    area = np.zeros(len(track_of))
    frames_of: dict[int, set] = {}
    for frame in range(t):
        sizes = np.bincount(labels[frame].ravel(), minlength=counts[frame] + 1)[1:]
        for part in range(counts[frame]):
            track = int(track_of[offsets[frame] + part])
            area[track] += sizes[part]
            frames_of.setdefault(track, set()).add(frame)
    subject = int(np.argmax(area))
    needed = max(2, math.ceil(persist_fraction * t))
    kept_tracks = {k for k, frames in frames_of.items() if k == subject or len(frames) >= needed}
    keep = np.zeros(small.shape, bool)
    for frame in range(t):
        kept_parts = [p + 1 for p in range(counts[frame]) if int(track_of[offsets[frame] + p]) in kept_tracks]
        keep[frame] = np.isin(labels[frame], kept_parts)
    keep = _dilate(keep, 1)  # soft edges just outside the thresholded part stay
    keep = keep.repeat(factor, axis=1).repeat(factor, axis=2)[:, :h, :w]
    return np.where(keep, alpha, 0).astype(np.float32)


# ---------------------------------------------------------------------------------- smoothing over time
def _box_blur(x: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1) square (edges clamped) of the last two axes of a float array."""
    for axis in (-2, -1):
        n = x.shape[axis]
        padded = np.concatenate([np.take(x, [0] * (radius + 1), axis=axis), x,
                                 np.take(x, [n - 1] * radius, axis=axis)], axis=axis)
        total = np.cumsum(padded, axis=axis, dtype=np.float64)
        upper = np.take(total, np.arange(2 * radius + 1, n + 2 * radius + 1), axis=axis)
        lower = np.take(total, np.arange(0, n), axis=axis)
        x = ((upper - lower) / (2 * radius + 1)).astype(np.float32)
    return x


def stillness(frames_rgb: np.ndarray, still_threshold: float = 0.04, radius: int = 2) -> np.ndarray:
    """frames uint8 [T, H, W, 3+] -> float32 [T, H, W]: 1 where frame t looks like frame t-1 (the local mean
    brightness changed by 0), falling to 0 at a change of `still_threshold`. Frame 0: 0."""
    gray = frames_rgb[..., :3].astype(np.float32) @ np.full(3, 1 / 765, np.float32)  # [T, H, W] in 0..1
    still = np.zeros(gray.shape, np.float32)
    for t in range(1, len(gray)):
        change = _box_blur(np.abs(gray[t] - gray[t - 1])[None], radius)[0]
        still[t] = np.clip(1.0 - change / still_threshold, 0.0, 1.0)
    return still


def smooth_static_alpha(alpha: np.ndarray, frames_rgb: np.ndarray, strength: float = 0.7,
                        still_threshold: float = 0.04) -> np.ndarray:
    """alpha [T, H, W], frames uint8 [T, H, W, 3+] -> alpha averaged over time where the image is still.

    Forward:  f_t = a_t + strength * still_t * (f_{t-1} - a_t); backward likewise from the last frame;
    the result is their mean, so a pixel that stays still gets a symmetric temporal average and a pixel
    that changes keeps its own alpha."""
    still = strength * stillness(frames_rgb, still_threshold)  # [T, H, W]
    forward = alpha.astype(np.float32).copy()
    for t in range(1, len(alpha)):
        forward[t] += still[t] * (forward[t - 1] - forward[t])
    backward = alpha.astype(np.float32).copy()
    for t in range(len(alpha) - 2, -1, -1):
        backward[t] += still[t + 1] * (backward[t + 1] - backward[t])
    return 0.5 * (forward + backward)


# ---------------------------------------------------------------------------------- checks
def frame_list_text(frames: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    parts, start = [], None
    frames = sorted(frames)
    for i, f in enumerate(frames):
        if start is None:
            start = f
        if i + 1 == len(frames) or frames[i + 1] != f + 1:
            parts.append(str(start) if start == f else f"{start}-{f}")
            start = None
    return ", ".join(parts)


def frames_without_object(alpha: np.ndarray, min_fraction: float = MIN_VISIBLE_FRACTION) -> list[int]:
    visible = (alpha > FOREGROUND).reshape(alpha.shape[0], -1).mean(axis=1)
    return [int(t) for t in np.nonzero(visible < min_fraction)[0]]


def check_object_in_every_frame(alpha: np.ndarray, frame_numbers: Optional[Sequence[int]] = None,
                                what: str = "the learned matte") -> None:
    """InputError naming every frame (by `frame_numbers`, default counted from 0) in which `what` leaves
    no object."""
    empty = frames_without_object(alpha)
    if not empty:
        return
    numbers = list(frame_numbers) if frame_numbers is not None else list(range(alpha.shape[0]))
    counted = "" if frame_numbers is not None else " (counted from 0)"
    names = frame_list_text([numbers[t] for t in empty])
    if len(empty) == alpha.shape[0]:
        raise InputError(f"No object found in any frame by {what}. Use a clip in which one object is clearly "
                         f"separated from its background, or another matting (alpha in the source, chroma key).")
    raise InputError(f"No object found in frame{'s' if len(empty) > 1 else ''} {names}{counted} by {what}. "
                     f"Leave those frames out (choose the frame range) or use another matting; nothing was "
                     f"written.")


def border_warning(alpha: np.ndarray, margin: int = 2) -> Optional[str]:
    """A warning when the subject touches the frame border in every frame, else None."""
    fg = alpha > FOREGROUND
    touching = (fg[:, :margin].any(axis=(1, 2)) | fg[:, -margin:].any(axis=(1, 2))
                | fg[:, :, :margin].any(axis=(1, 2)) | fg[:, :, -margin:].any(axis=(1, 2)))
    if len(touching) and touching.all():
        return ("The subject touches the frame border in every frame: it is probably cut off, and the matting "
                "model was trained on whole objects, so the cut-out and the 3D result may be wrong there. Use "
                "footage in which the whole object is visible.")
    return None


def stabilise_alpha(alpha: np.ndarray, frames_rgb: np.ndarray, frame_numbers: Optional[Sequence[int]] = None,
                    persist_fraction: float = 0.5, smoothing: float = 0.7) -> tuple[np.ndarray, list[str]]:
    """Per-frame alpha [T, H, W] -> (stable alpha, warnings): persistent object kept, static areas smoothed
    over time, then every frame checked for an object (InputError naming the empty ones)."""
    alpha = keep_persistent_object(alpha, persist_fraction)
    if smoothing > 0 and len(alpha) > 1:
        alpha = smooth_static_alpha(alpha, frames_rgb, smoothing)
    check_object_in_every_frame(alpha, frame_numbers)
    warning = border_warning(alpha)
    return alpha, [warning] if warning else []
