"""The sparse voxel tensor every sparse model passes around.

A `SparseTensor` holds N active voxels: `feats [N, C...]` and int32 `coords [N, 4]` =
(batch index, x, y, z). For SS4D the batch index is `clip * num_frames + frame`, so one batch entry is
one frame of one clip; rows are grouped by batch index in increasing order.

`cache` is a plain dict shared by every tensor with the same coordinates (`replace` keeps it): the
convolutions store their neighbour maps there and the pooling layers store the coarse coordinates and
the way back, so a map is built once per coordinate set and reused by every layer and every sampling
step (the sampler feeds `x.replace(new_feats)` at each step).
"""
from __future__ import annotations

from typing import Optional

import torch


class SparseTensor:
    __slots__ = ("feats", "coords", "cache")

    def __init__(self, feats: torch.Tensor, coords: torch.Tensor, cache: Optional[dict] = None):
        if coords.dim() != 2 or coords.shape[1] != 4:
            raise ValueError(f"coords must be [N, 4] (batch, x, y, z), got {tuple(coords.shape)}")
        if feats.shape[0] != coords.shape[0]:
            raise ValueError(f"{feats.shape[0]} feature rows for {coords.shape[0]} coordinates")
        self.feats = feats
        self.coords = coords if coords.dtype == torch.int32 else coords.to(torch.int32)
        self.cache = {} if cache is None else cache

    def replace(self, feats: torch.Tensor) -> "SparseTensor":
        """Same voxels (and shared cache), new features."""
        return SparseTensor(feats, self.coords, self.cache)

    @property
    def shape(self) -> torch.Size:
        return self.feats.shape

    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    @property
    def batch_size(self) -> int:
        if "batch_size" not in self.cache:
            self.cache["batch_size"] = int(self.coords[:, 0].max()) + 1 if len(self.coords) else 0
        return self.cache["batch_size"]

    @property
    def layout(self) -> list[slice]:
        """Row range of each batch index 0..B-1 (rows are grouped by batch index)."""
        if "layout" not in self.cache:
            counts = torch.bincount(self.coords[:, 0].long(), minlength=self.batch_size).tolist()
            slices, start = [], 0
            for n in counts:
                slices.append(slice(start, start + n))
                start += n
            self.cache["layout"] = slices
        return self.cache["layout"]

    def to(self, *args, **kwargs) -> "SparseTensor":
        """Moves/casts features (coords follow the device). The cache is dropped on a device change."""
        feats = self.feats.to(*args, **kwargs)
        if feats.device == self.feats.device:
            return SparseTensor(feats, self.coords, self.cache)
        return SparseTensor(feats, self.coords.to(feats.device))

    def __repr__(self) -> str:
        return (f"SparseTensor(feats={tuple(self.feats.shape)} {self.feats.dtype}, voxels={len(self.coords)}, "
                f"batch={self.batch_size})")
