"""SS4D's 4D Gaussian decoder (registry name ``SLatGaussianDecoder``): structured latents of every frame
of a clip -> per-frame 3D Gaussians.

Data flow (released config ``slat_dec_gs_4d``: swin windows of 8, rope_t, cross-frame attention)::

    x [N, 8]  denormalised structured latent, voxels of clips * T frames at resolution R
      trunk (sparse_transformer_base, 4D): Linear -> + APE(x, y, z)
             -> blocks: spatio-temporal swin windows (window_size frames x window_size^3 voxels,
                odd blocks shifted by window_size // 2 in time and space), rope_t over the frame index
      layer norm (no affine), out_layer (Linear)   -> [N, 14 G]  raw Gaussian parameters
      per frame: activation (engine.gaussians)      -> G Gaussians per voxel

The raw channel layout and the activation formulas are documented in :mod:`engine.gaussians`.
"""
from __future__ import annotations

from typing import List, Optional

import torch.nn as nn
import torch.nn.functional as F

from ..gaussians import GaussianConfig, GaussianFrame, activate_gaussians, offset_perturbation
from ..sparse import SparseTensor
from ..types import GaussianSet
from .sparse_transformer_base import SparseTransformerBase


class SLatGaussianDecoder(SparseTransformerBase):
    """Args are the checkpoint json's ``args``:

    resolution: R, voxel grid resolution of the latents.
    model_channels, latent_channels, num_blocks, num_heads, num_head_channels, mlp_ratio, attn_mode,
    window_size, pe_mode, qk_rms_norm, expand_self_attn: see :class:`SparseTransformerBase`.
    representation_config: the reference's Gaussian settings (see :class:`engine.gaussians.GaussianConfig`).
    use_fp16: accepted; precision is chosen at load time.
    use_checkpoint: training only (gradient checkpointing); unused.

    Buffer ``offset_perturbation [G, 3]`` is part of the checkpoint.
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
        use_fp16: bool = True,
        use_checkpoint: bool = True,
        qk_rms_norm: bool = False,
        expand_self_attn: bool = True,
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
            frames=True,
            expand_self_attn=expand_self_attn,
        )
        if representation_config is None:
            raise ValueError("SLatGaussianDecoder needs representation_config")
        self.resolution = resolution
        self.gaussian_config = GaussianConfig.from_reference(representation_config)
        self.out_channels = self.gaussian_config.raw_channels
        self.out_layer = nn.Linear(model_channels, self.out_channels)
        self.register_buffer(
            "offset_perturbation",
            offset_perturbation(self.gaussian_config.num_gaussians, self.gaussian_config.voxel_size),
        )

    def decode_features(self, x: SparseTensor, num_frames: int) -> SparseTensor:
        """Raw Gaussian parameters per voxel.

        Args:
            x: structured latents, feats ``[N, latent_channels]``, coords ``[N, 4]`` of ``clips * num_frames``
                batch entries (``clip * num_frames + frame``), grouped by entry.
            num_frames: frames per clip.
        Returns:
            SparseTensor with x's coords and row order, float32 feats ``[N, 14 G]`` (channel order in
            :mod:`engine.gaussians`).
        """
        h = super().forward(x, num_frames)
        feats = F.layer_norm(h.feats.float(), h.feats.shape[-1:])
        feats = self.out_layer(feats.to(self.out_layer.weight.dtype)).float()
        return h.replace(feats)

    def to_gaussians(self, raw: SparseTensor) -> List[GaussianFrame]:
        """Activate the raw output of :meth:`decode_features`: one :class:`GaussianFrame` per batch entry
        ``0 .. max(coords[:, 0])`` (clip-major, frame-minor), G Gaussians per voxel in row order."""
        batch = raw.coords[:, 0].long()
        num_entries = int(batch.max()) + 1 if batch.numel() else 0
        frames = []
        for b in range(num_entries):
            rows = batch == b
            frames.append(activate_gaussians(raw.feats[rows], raw.coords[rows, 1:], self.resolution,
                                             self.gaussian_config, self.offset_perturbation))
        return frames

    def forward(self, x: SparseTensor, num_frames: int) -> List[GaussianFrame]:
        """Structured latents of ``clips * num_frames`` frames -> activated Gaussians per frame."""
        return self.to_gaussians(self.decode_features(x, num_frames))


def to_gaussian_sets(frames: List[GaussianFrame]) -> List[GaussianSet]:
    """numpy copies (``engine.types.GaussianSet``) of the decoder's per-frame output."""
    return [frame.to_gaussian_set() for frame in frames]
