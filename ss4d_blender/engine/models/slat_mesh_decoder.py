"""TRELLIS's mesh decoder (registry name ``SLatMeshDecoder``) up to the features handed to FlexiCubes.

SS4D does not ship a mesh decoder; TRELLIS-image-large's ``slat_dec_mesh_swin8_B_64l8m256c`` decodes each
frame's structured latent on its own (3D, no time axis).

Data flow (released config: R = 64, C = 768, swin 8, 12 blocks)::

    x [N, 8]   structured latent, voxels at resolution R (one batch entry per frame / object)
      trunk (sparse_transformer_base, 3D): Linear -> + APE(x, y, z) -> swin transformer blocks  [N, C]
      upsample[0]: SparseSubdivideBlock3d  C   -> C/4,  every voxel -> its 8 children    [8N,  C/4]  at 2R
      upsample[1]: SparseSubdivideBlock3d  C/4 -> C/8                                   [64N, C/8]  at 4R
      out_layer (Linear)                                                                 [64N, 101]  at 4R

Output feature layout (what `engine.mesh.decoder_to_mesh` turns into FlexiCubes input; TRELLIS ``SparseFeatures2Mesh``)
-------------------------------------------------------------------------------------------------
Every output row is one active *cube* (fine voxel) of the 4R grid at integer ``(x, y, z)``; its eight
corners are grid vertices ``(x, y, z) + corner``, corners numbered ``c = dx + 2 dy + 4 dz``::

    c: 0 (0,0,0)  1 (1,0,0)  2 (0,1,0)  3 (1,1,0)  4 (0,0,1)  5 (1,0,1)  6 (0,1,1)  7 (1,1,1)

    channels   size  shape    meaning
    [0, 8)       8   (8,)     sdf at corner c -> channel c          (TRELLIS then adds -1 / (4R))
    [8, 32)     24   (8, 3)   deform: corner c, axis a -> 8 + 3c + a (raw; position
                              v / (4R) - 0.5 + (1 - 1e-8) / (2 * 4R) * tanh(deform))
    [32, 53)    21   (21,)    per-cube FlexiCubes weights: beta [32, 44) (12, one per cube edge),
                              alpha [44, 52) (8, one per corner), gamma_f [52] (1)
    [53, 101)   48   (8, 6)   colour: corner c, k -> 53 + 6c + k; k 0..2 RGB, k 3..5 normal map
                              (only with representation_config use_color; otherwise 53 channels)

Per-vertex quantities (sdf, deform, colour) are predicted per cube corner; TRELLIS averages the values
that the active cubes sharing a vertex predict for it (vertices touched by no active cube: sdf 1, i.e.
outside, deform 0), weights of inactive cubes are 0.  This module returns the raw per-cube features;
the averaging, biases and activations live in ``engine.mesh.decoder_to_mesh``.

Row order of the output: parent-major, as the reference produces it.  Each subdivision replaces a row by
its 8 children ``2 * (x, y, z) + (i, j, k)`` in the order ``(i, j, k)`` = (0,0,0), (0,0,1), (0,1,0), (0,1,1),
(1,0,0), ... (z fastest), so output row ``64 n + 8 a + b`` is child b of child a of input voxel n.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..sparse import SparseConv3d, SparseSubdivide, SparseTensor
from .sparse_transformer_base import SparseTransformerBase

# channel ranges of the output features (see the module docstring)
SDF = slice(0, 8)
DEFORM = slice(8, 32)
WEIGHTS = slice(32, 53)
COLOR = slice(53, 101)


def feature_channels(use_color: bool) -> int:
    """Output width: sdf 8 + deform 24 + weights 21 (+ colour 48)."""
    return 8 + 24 + 21 + (48 if use_color else 0)


class SparseGroupNorm32(nn.GroupNorm):
    """Group norm over the voxels of each batch entry separately, computed in float32 (only this
    decoder normalises sparse features by groups, so it lives here)."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        feats = x.feats.float()
        out = torch.empty_like(feats)
        batch = x.coords[:, 0]
        for b in torch.unique(batch).tolist():
            rows = batch == b
            # [n, C] -> [1, C, n]: the group statistics run over channels-in-group x voxels
            out[rows] = super().forward(feats[rows].t().unsqueeze(0)).squeeze(0).t()
        return x.replace(out.to(x.feats.dtype))


class SparseSubdivideBlock3d(nn.Module):
    """Residual block that doubles the resolution: every voxel becomes its 8 children::

        h = subdivide(SiLU(GroupNorm(x)))
        h = conv3(SiLU(GroupNorm(conv3(h))))         3x3x3 submanifold convolutions at the new resolution
        out = h + skip(subdivide(x))                  skip: 1x1x1 convolution when the width changes
                                                      (as spconv computes it, see SpconvPointwise)

    Args:
        channels: input width.
        resolution: input grid resolution (the output is at ``2 * resolution``).
        out_channels: output width (default ``channels``).
        num_groups: group norm groups.
    """

    def __init__(self, channels: int, resolution: int, out_channels: Optional[int] = None, num_groups: int = 32):
        super().__init__()
        self.channels = channels
        self.resolution = resolution
        self.out_resolution = resolution * 2
        self.out_channels = out_channels or channels
        self.act_layers = nn.Sequential(SparseGroupNorm32(num_groups, channels), _SparseSiLU())
        self.subdivide = SparseSubdivide()
        self.out_layers = nn.Sequential(
            SparseConv3d(channels, self.out_channels, 3),
            SparseGroupNorm32(num_groups, self.out_channels),
            _SparseSiLU(),
            SparseConv3d(self.out_channels, self.out_channels, 3),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = SpconvPointwise(channels, self.out_channels)

    def forward(self, x: SparseTensor) -> SparseTensor:
        """x: feats ``[N, channels]`` at ``resolution`` -> feats ``[8N, out_channels]`` at ``2 * resolution``."""
        h = self.subdivide(self.act_layers(x))
        x = self.subdivide(x)
        h = self.out_layers(h)
        return h.replace(h.feats + self.skip_connection(x).feats)


class SpconvPointwise(nn.Module):
    """The 1x1x1 submanifold convolution of the skip connection, computed as spconv 2.x computes it.

    The weight is stored as a spconv kernel ``conv.weight [out, 1, 1, 1, in]``, but spconv's 1x1 fast path
    multiplies the features by that memory *viewed as* ``[in, out]`` (not by its transpose).  The
    official TRELLIS checkpoints were trained that way (and the golden fixture was made that way), so
    this layer does the same: ``out = feats @ weight.reshape(in, out) + bias``.  With in == out this is a
    plain linear map by a differently arranged matrix; the reshape is not a transpose. Any other
    implementation of this layer (e.g. a kernel-size-1 `SparseConv3d`) must keep this arrangement.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.conv = nn.Module()
        self.conv.weight = nn.Parameter(torch.empty(out_channels, 1, 1, 1, in_channels))
        self.conv.bias = nn.Parameter(torch.zeros(out_channels))
        bound = 1.0 / in_channels ** 0.5
        nn.init.uniform_(self.conv.weight, -bound, bound)

    def forward(self, x: SparseTensor) -> SparseTensor:
        """feats ``[N, in]`` -> ``[N, out]``, same coords."""
        weight = self.conv.weight.reshape(self.in_channels, self.out_channels)
        return x.replace(x.feats @ weight.to(x.feats.dtype) + self.conv.bias.to(x.feats.dtype))


class _SparseSiLU(nn.Module):
    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(torch.nn.functional.silu(x.feats))


class SLatMeshDecoder(SparseTransformerBase):
    """Args are the checkpoint json's ``args``:

    resolution: R, voxel grid resolution of the latents (output at 4R).
    model_channels, latent_channels, num_blocks, num_heads, num_head_channels, mlp_ratio, attn_mode,
    window_size, pe_mode ("ape"), qk_rms_norm: see :class:`SparseTransformerBase`.
    representation_config: ``{"use_color": bool}`` (101 output channels with colour, 53 without).
    use_fp16: accepted; precision is chosen at load time.
    use_checkpoint: training only (gradient checkpointing); unused.
    """

    def __init__(
        self,
        resolution: int,
        model_channels: int,
        latent_channels: int,
        num_blocks: int,
        num_heads: Optional[int] = None,
        num_head_channels: Optional[int] = 64,
        mlp_ratio: float = 4,
        attn_mode: str = "swin",
        window_size: int = 8,
        pe_mode: str = "ape",
        use_fp16: bool = False,
        use_checkpoint: bool = False,
        qk_rms_norm: bool = False,
        representation_config: Optional[dict] = None,
    ):
        super().__init__(
            in_channels=latent_channels,
            model_channels=model_channels,
            num_blocks=num_blocks,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            mlp_ratio=mlp_ratio,
            attn_mode=attn_mode,
            window_size=window_size,
            pe_mode=pe_mode,
            qk_rms_norm=qk_rms_norm,
            frames=False,
        )
        representation_config = dict(representation_config or {})
        unknown = set(representation_config) - {"use_color"}
        if unknown:
            raise ValueError(f"unknown representation_config keys: {sorted(unknown)}")
        self.resolution = resolution
        self.use_color = bool(representation_config.get("use_color", False))
        self.out_channels = feature_channels(self.use_color)
        self.upsample = nn.ModuleList([
            SparseSubdivideBlock3d(model_channels, resolution, out_channels=model_channels // 4),
            SparseSubdivideBlock3d(model_channels // 4, resolution * 2, out_channels=model_channels // 8),
        ])
        self.out_layer = nn.Linear(model_channels // 8, self.out_channels)

    @property
    def output_resolution(self) -> int:
        """Resolution of the output cubes: 4R."""
        return self.resolution * 4

    def forward(self, x: SparseTensor) -> SparseTensor:
        """
        Args:
            x: structured latent, feats ``[N, latent_channels]``, coords ``[N, 4]`` at resolution R.
        Returns:
            SparseTensor of the fine cubes at 4R: coords ``[64N, 4]`` (batch index kept), float32 feats
            ``[64N, 101]`` (or 53 without colour) in the layout of the module docstring.
        """
        h = super().forward(x)
        for block in self.upsample:
            h = block(h)
        return h.replace(self.out_layer(h.feats).float())
