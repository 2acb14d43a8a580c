"""Sparse-structure decoder (TRELLIS `ss_dec_conv3d_16l8`): occupancy latents -> occupancy logits.

    z [B, 8, 16^3] -> Conv3d -> middle ResBlocks -> per level: ResBlocks, then (but for the last level)
    Conv3d to 8x channels + 3D pixel shuffle (resolution x2) -> norm, SiLU, Conv3d -> logits [B, 1, 64^3]

Active voxels are the cells with a positive logit (`occupancy_to_coords`).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.layers import ChannelLayerNorm32, GroupNorm32
from .sparse_structure_flow_4d import unpatchify


def norm_layer(norm_type: str, channels: int) -> nn.Module:
    if norm_type == "layer":
        return ChannelLayerNorm32(channels)
    if norm_type == "group":
        return GroupNorm32(32, channels)
    raise ValueError(f"unknown norm_type {norm_type!r}")


class ResBlock3d(nn.Module):
    """norm -> SiLU -> conv3x3 -> norm -> SiLU -> conv3x3, plus (1x1 projected) input. [B, C, *] -> [B, C', *]."""

    def __init__(self, channels: int, out_channels: int, norm_type: str):
        super().__init__()
        self.norm1 = norm_layer(norm_type, channels)
        self.norm2 = norm_layer(norm_type, out_channels)
        self.conv1 = nn.Conv3d(channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip_connection = nn.Conv3d(channels, out_channels, 1) if channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip_connection(x)


class UpsampleBlock3d(nn.Module):
    """Conv3d to 8 * out channels, then 3D pixel shuffle: [B, C, R^3] -> [B, C', (2R)^3]."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels * 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(self.conv(x), 2)


class SparseStructureDecoder(nn.Module):
    """Args are the checkpoint json's `args`; `use_fp16`: how the reference ran (precision is chosen at
    load time)."""

    def __init__(self, out_channels: int, latent_channels: int, num_res_blocks: int, channels: list[int],
                 num_res_blocks_middle: int = 2, norm_type: Literal["group", "layer"] = "layer",
                 use_fp16: bool = False):
        super().__init__()
        self.latent_channels = latent_channels
        self.input_layer = nn.Conv3d(latent_channels, channels[0], 3, padding=1)
        self.middle_block = nn.Sequential(*[ResBlock3d(channels[0], channels[0], norm_type)
                                            for _ in range(num_res_blocks_middle)])
        blocks = []
        for i, ch in enumerate(channels):
            blocks += [ResBlock3d(ch, ch, norm_type) for _ in range(num_res_blocks)]
            if i < len(channels) - 1:
                blocks.append(UpsampleBlock3d(ch, channels[i + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.out_layer = nn.Sequential(norm_layer(norm_type, channels[-1]), nn.SiLU(),
                                       nn.Conv3d(channels[-1], out_channels, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, latent, r, r, r] -> logits [B, out, 4r, 4r, 4r] (with three levels) in z's dtype."""
        torso = self.blocks[0].conv1.weight.dtype if len(self.blocks) else z.dtype
        h = self.input_layer(z.to(self.input_layer.weight.dtype)).to(torso)
        h = self.middle_block(h)
        for block in self.blocks:
            h = block(h)
        return self.out_layer(h.to(self.out_layer[2].weight.dtype)).to(z.dtype)


def occupancy_to_coords(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, 1, R, R, R] -> int32 [N, 4] (batch, x, y, z) of the cells with logit > 0, in row-major
    order (grouped by batch index, as the samplers expect)."""
    if logits.dim() != 5 or logits.shape[1] != 1:
        raise ValueError(f"expected occupancy logits [B, 1, R, R, R], got {tuple(logits.shape)}")
    return torch.argwhere(logits[:, 0] > 0).int()
