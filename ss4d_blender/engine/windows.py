"""Clips longer than the model's native length, generated as overlapping windows.

SS4D was trained on 32-frame clips (its temporal RoPE has seen no later frame), so a longer clip runs as
windows of W frames. Window k > 0 starts O frames before window k-1 ends: those O frames are *known*,
held at window k-1's values while the new frames are sampled (see `sampler.KnownFrames`), so every window
continues the one before it. The last window is shifted back to end on the clip's last frame (it then
shares more than O frames with the one before), so no frame is ever repeated to fill a window.

    frames 0 ........................................... 71
    window 0 [0, 32)
    window 1            [24, 56)          (24..31 known)
    window 2                       [40, 72)   (40..55 known)

Each window's random draws come from its own seed (`window_seed`), so a re-run reproduces the clip, and
each finished window is stored in a `WindowCache` (one safetensors file per window, keyed by a hash of the
settings and checked against its frames), so a cancelled run resumes after its last finished window.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .errors import InputError
from .types import GaussianSet, Mesh

CACHE_FORMAT = "ss4d-window/1"
GAUSSIAN_FIELDS = ("xyz", "features_dc", "opacity", "scaling", "rotation")
# settings that change no generated value: left out of the cache key
KEY_IGNORES = ("cache_dir", "low_vram", "device")


def check_window_settings(window: int, overlap: int, step: int) -> None:
    """An InputError naming the bad value (window and overlap even, 0 <= overlap < window, step >= 1)."""
    if window < 2 or window % 2:
        raise InputError(f"The window must be an even number of frames of at least 2, got {window} (the latent "
                         f"model merges frame pairs; 32 is the length the model was trained on).")
    if overlap < 0 or overlap % 2 or overlap >= window:
        raise InputError(f"The overlap must be an even number of frames below the window ({window}), got "
                         f"{overlap} (8 is a good default).")
    if step < 1:
        raise InputError(f"The frame step must be 1 (every frame) or more, got {step}.")


def plan_windows(num_frames: int, window: int = 32, overlap: int = 8) -> list[tuple[int, int]]:
    """[start, stop) frame ranges covering 0..num_frames-1: one range when the clip fits in a window, else
    windows of `window` frames starting every `window - overlap` frames, the last one ending on the last
    frame."""
    check_window_settings(window, overlap, 1)
    if num_frames <= window:
        return [(0, num_frames)]
    stride = window - overlap
    starts = list(range(0, num_frames - window, stride)) + [num_frames - window]
    return [(s, s + window) for s in starts]


def known_frames(plan: list[tuple[int, int]], index: int) -> int:
    """How many leading frames of window `index` the window before it already generated."""
    return 0 if index == 0 else plan[index - 1][1] - plan[index][0]


def window_seed(seed: int, index: int) -> int:
    """The seed of window `index`: `seed` itself for the first window (a one-window clip draws exactly what
    a plain run draws), a hash of (seed, index) for the others."""
    if index == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, index]).generate_state(1, np.uint64)[0]) >> 1


def frames_digest(frames: np.ndarray) -> str:
    """Short content hash of a window's input frames."""
    return hashlib.blake2b(np.ascontiguousarray(frames).data, digest_size=16).hexdigest()


def settings_key(settings: dict, num_frames: int, frame_shape: tuple) -> str:
    """Hash of everything that decides the generated values (settings, clip length and frame size)."""
    kept = {k: v for k, v in settings.items() if k not in KEY_IGNORES}
    text = json.dumps([kept, int(num_frames), [int(s) for s in frame_shape]], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_folder_for(output: Union[str, Path]) -> Path:
    """Where a front end keeps the window cache of a run writing to `output` (a folder or file): beside it,
    outside any staging folder that replaces the output as a whole, so a cancelled run's windows survive."""
    output = Path(output).absolute()
    return output.parent / f".{output.name}.ss4d-windows"


def windows_finished(stage: str) -> Optional[tuple[int, int]]:
    """(finished windows, windows in all) of a run whose last progress stage was `stage` ("Window 3 of 8 ·
    Sampling latents" -> (2, 8)); None when the run was not windowed or had not reached its windows."""
    match = re.match(r"Window (\d+) of (\d+) ·", stage or "")
    return (int(match.group(1)) - 1, int(match.group(2))) if match else None


@dataclass
class WindowRecord:
    """One finished window: what the next window continues from and the frames it added to the clip.

    Window-local arrays (frame 0 = the window's first frame `start`): `structure_latent` / `structure_noise`
    float32 [W, C, R, R, R] (the structure flow's sample and the noise it started from), `coords` int32
    [N, 4] (frame, x, y, z), `latents` / `latent_noise` float32 [N, 8] (the latent flow's normalised sample
    and its noise). Per new frame (clip frames `first_new` .. `stop - 1`): `gaussians`, `meshes`, and
    `slat_feats` (denormalised) rows of `coords` for those frames."""

    index: int
    start: int
    stop: int
    first_new: int
    digest: str
    structure_latent: np.ndarray
    structure_noise: np.ndarray
    coords: np.ndarray
    latents: np.ndarray
    latent_noise: np.ndarray
    slat_feats: np.ndarray
    gaussians: list = field(default_factory=list)
    meshes: list = field(default_factory=list)

    def new_rows(self) -> np.ndarray:
        """Boolean [N]: the rows of `coords` that belong to the new frames (not to a padding frame)."""
        frame = self.coords[:, 0]
        return (frame >= self.first_new - self.start) & (frame < self.stop - self.start)

    def tensors(self) -> dict:
        out = {"structure_latent": self.structure_latent, "structure_noise": self.structure_noise,
               "coords": self.coords, "latents": self.latents, "latent_noise": self.latent_noise,
               "slat_feats": self.slat_feats}
        for i, g in enumerate(self.gaussians):
            for name in GAUSSIAN_FIELDS:
                out[f"gaussians.{i}.{name}"] = getattr(g, name)
        for i, m in enumerate(self.meshes):
            out[f"meshes.{i}.vertices"], out[f"meshes.{i}.faces"] = m.vertices, m.faces
            if m.colors is not None:
                out[f"meshes.{i}.colors"] = m.colors
        return {k: np.ascontiguousarray(v) for k, v in out.items()}


class WindowCache:
    """Finished windows of one clip and one set of settings: `folder/<key>/window_KKK.safetensors`."""

    def __init__(self, folder: Union[str, Path], key: str):
        self.folder = Path(folder) / key
        self.key = key

    def path(self, index: int) -> Path:
        return self.folder / f"window_{index:03d}.safetensors"

    def save(self, record: WindowRecord) -> Path:
        from safetensors.numpy import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {"format": CACHE_FORMAT, "key": self.key, "digest": record.digest,
                "range": json.dumps([record.index, record.start, record.stop, record.first_new]),
                "frames": json.dumps([len(record.gaussians), len(record.meshes)])}
        path = self.path(record.index)
        tmp = path.with_name(path.name + ".partial")
        save_file(record.tensors(), str(tmp), metadata=meta)
        tmp.replace(path)     # a window is either stored whole or not at all
        return path

    def load(self, index: int, digest: str, with_frames: bool = False) -> Optional[WindowRecord]:
        """The stored window `index` if it was made from frames with this digest, else None. Gaussians and
        meshes are read only `with_frames` (a `FrameFile` reads them one at a time otherwise)."""
        from safetensors import SafetensorError, safe_open

        path = self.path(index)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                if meta.get("format") != CACHE_FORMAT or meta.get("key") != self.key or meta.get("digest") != digest:
                    return None
                k, start, stop, first_new = json.loads(meta["range"])
                arrays = {n: f.get_tensor(n) for n in ("structure_latent", "structure_noise", "coords", "latents",
                                                       "latent_noise", "slat_feats")}
                record = WindowRecord(k, start, stop, first_new, digest, **arrays)
            if with_frames:
                frames = FrameFile(path)
                record.gaussians, record.meshes = list(frames.gaussians()), list(frames.meshes())
            return record
        except (OSError, ValueError, KeyError, SafetensorError):
            return None            # a damaged cache file: the window is generated again


class FrameFile:
    """Per-frame Gaussians and meshes stored in one safetensors file (a window's cache file or a result
    file), read one frame at a time."""

    def __init__(self, path: Union[str, Path]):
        from safetensors import safe_open

        self.path = Path(path)
        with safe_open(str(self.path), framework="numpy") as f:
            self.keys = set(f.keys())

    def count(self, kind: str) -> int:
        probe = "xyz" if kind == "gaussians" else "vertices"
        return sum(1 for k in self.keys if k.startswith(f"{kind}.") and k.endswith(f".{probe}"))

    def read(self, kind: str, i: int):
        from safetensors import safe_open

        with safe_open(str(self.path), framework="numpy") as f:
            if kind == "gaussians":
                return GaussianSet(**{n: f.get_tensor(f"gaussians.{i}.{n}") for n in GAUSSIAN_FIELDS})
            colors = f"meshes.{i}.colors"
            return Mesh(f.get_tensor(f"meshes.{i}.vertices"), f.get_tensor(f"meshes.{i}.faces"),
                        f.get_tensor(colors) if colors in self.keys else None)

    def specs(self, kind: str, i: int) -> list[tuple[str, str, list]]:
        """(field, safetensors dtype, shape) of frame i's arrays, without reading them."""
        from safetensors import safe_open

        prefix = f"{kind}.{i}."
        with safe_open(str(self.path), framework="numpy") as f:
            out = []
            for k in sorted(k for k in self.keys if k.startswith(prefix)):
                piece = f.get_slice(k)
                out.append((k[len(prefix):], piece.get_dtype(), list(piece.get_shape())))
        return out

    def array(self, key: str) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="numpy") as f:
            return f.get_tensor(key)

    def gaussians(self) -> "StoredFrames":
        return StoredFrames([(self, "gaussians", i) for i in range(self.count("gaussians"))])

    def meshes(self) -> "StoredFrames":
        return StoredFrames([(self, "meshes", i) for i in range(self.count("meshes"))])


class StoredFrames:
    """A read-only list of frames (GaussianSet or Mesh) that stay on disk until indexed; frames of several
    files chain into one list (`StoredFrames.chain`)."""

    def __init__(self, entries: list):
        self.entries = list(entries)       # (FrameFile, kind, index in that file)

    @classmethod
    def chain(cls, parts: list["StoredFrames"]) -> "StoredFrames":
        return cls([e for p in parts for e in p.entries])

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return StoredFrames(self.entries[i])
        file, kind, index = self.entries[i]
        return file.read(kind, index)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def specs(self, i: int) -> list[tuple[str, str, list]]:
        file, kind, index = self.entries[i]
        return file.specs(kind, index)

    def array(self, i: int, name: str) -> np.ndarray:
        """One array (`name`: e.g. "vertices") of frame i."""
        file, kind, index = self.entries[i]
        return file.array(f"{kind}.{index}.{name}")
