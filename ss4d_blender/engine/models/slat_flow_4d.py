"""SS4D structured-latent flow (``SLatFlow4DModel``): predicts the flow velocity of the per-frame
structured latents (sparse voxels with 8 features) of a clip, conditioned on per-frame image tokens.

Data flow (released config: patch 2, io_block_channels [128], io_block_channels_t [1024], conv 3D_1D)::

    x [N, 8] voxels of B*T frames at resolution R
      input_layer                        -> [N, 128]
      input_blocks   (3D res blocks)     -> the last one pools space 2x   -> [N', 1024] at R/2
      input_blocks_t (1D res blocks over frames, or plain pooling for conv_type 'non')
                                          -> the last one pools frame pairs -> [N'', 1024], B*T/2 entries
      + absolute position embedding of x, y, z
      blocks (adaLN transformer; self-attention over all frames of a clip with rope_t,
              cross-attention to the image tokens of both frames of each pair)
      out_blocks_t   (unpool frames, 1D res blocks with skips)
      out_blocks     (unpool space,  3D res blocks with skips)
      layer norm, out_layer               -> [N, 8] velocity, rows in the order of x

Each res block is conditioned on the timestep embedding of its batch entry (adaLN scale/shift after the
first convolution); after frame pooling, entries (and their embeddings / image tokens) are frame pairs.
"""
from __future__ import annotations

from typing import List, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.layers import AbsolutePositionEmbedder, LayerNorm32, TimestepEmbedder
from ..nn.modulated_sparse_blocks import ModulatedSparseTransformerCross4DBlock, per_voxel
from ..sparse import (
    SparseConv1d,
    SparseConv3d,
    SparseConv4d,
    SparseDownsample,
    SparseDownsample_t,
    SparseTensor,
    SparseUpsample,
    SparseUpsample_t,
)

Resample = Optional[Literal["down", "up"]]


def pair_frames(per_frame: torch.Tensor) -> torch.Tensor:
    """Average consecutive frame pairs: ``[B*T, ...] -> [B*T/2, ...]`` (matches frame pooling)."""
    return per_frame.reshape(per_frame.shape[0] // 2, 2, *per_frame.shape[1:]).mean(dim=1)


class SparseResBlock(nn.Module):
    """Timestep-conditioned residual block around two sparse convolutions::

        x = resample(x)
        h = conv1(SiLU(LN_affine(x)))
        h = conv2(SiLU(LN(h) * (1 + scale) + shift))         # scale, shift from the timestep embedding
        out = h + skip(x)                                    # skip: linear when the width changes

    Subclasses pick the convolution (3D over space, 1D over frames, 4D over both) and the resampling.
    """

    conv_class: type = None

    def __init__(self, channels: int, emb_channels: int, out_channels: Optional[int] = None, resample: Resample = None):
        super().__init__()
        out_channels = out_channels or channels
        self.channels = channels
        self.out_channels = out_channels
        self.resample = resample
        self.norm1 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm2 = LayerNorm32(out_channels, elementwise_affine=False, eps=1e-6)
        self.conv1 = self.conv_class(channels, out_channels, 3)
        self.conv2 = self.conv_class(out_channels, out_channels, 3)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels, bias=True))
        self.skip_connection = nn.Linear(channels, out_channels) if channels != out_channels else nn.Identity()

    def _resample(self, x: SparseTensor, emb: torch.Tensor, num_frames: int):
        """Returns (x, emb, num_frames) after this block's resampling."""
        return x, emb, num_frames

    def forward(self, x: SparseTensor, emb: torch.Tensor, num_frames: int) -> SparseTensor:
        """
        Args:
            x: feats ``[N, channels]``, B batch entries (``clips * num_frames``).
            emb: timestep embedding per batch entry ``[B, emb_channels]``.
            num_frames: frames per clip of x (before this block's resampling).
        Returns:
            feats ``[N_out, out_channels]`` (N_out, B_out after resampling).
        """
        x, emb, num_frames = self._resample(x, emb, num_frames)
        scale, shift = per_voxel(x, self.emb_layers(emb)).chunk(2, dim=1)
        h = F.silu(self.norm1(x.feats))
        h = self.conv1(x.replace(h), num_frames).feats
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        h = self.conv2(x.replace(h), num_frames).feats
        return x.replace(h + self.skip_connection(x.feats))


class SparseResBlock3d(SparseResBlock):
    """Res block with 3x3x3 spatial convolutions (within each frame); resampling pools / unpools space 2x."""

    conv_class = SparseConv3d

    def __init__(self, channels, emb_channels, out_channels=None, resample: Resample = None):
        super().__init__(channels, emb_channels, out_channels, resample)
        self.pool = {None: None, "down": SparseDownsample(2), "up": SparseUpsample(2)}[resample]

    def _resample(self, x, emb, num_frames):
        if self.pool is not None:
            x = self.pool(x)
        return x, emb, num_frames


class _TemporalResBlock(SparseResBlock):
    """Res block whose resampling pools / unpools frame pairs (entries ``2i, 2i+1`` of a clip)."""

    def __init__(self, channels, emb_channels, out_channels=None, resample: Resample = None):
        super().__init__(channels, emb_channels, out_channels, resample)
        self.pool_t = {None: None, "down": SparseDownsample_t(2), "up": SparseUpsample_t(2)}[resample]

    def _resample(self, x, emb, num_frames):
        if self.resample == "down":
            # the pooled voxels belong to frame pairs: average the pair's embeddings too
            return self.pool_t(x), pair_frames(emb), num_frames // 2
        if self.resample == "up":
            # unpooling restores the full frame rate the caller's emb and num_frames describe
            return self.pool_t(x), emb, num_frames
        return x, emb, num_frames


class SparseResBlock1d(_TemporalResBlock):
    """Res block with size-3 convolutions along the frame axis (same voxel in neighbouring frames)."""

    conv_class = SparseConv1d


class SparseResBlock4d(_TemporalResBlock):
    """Res block with 3x3x3x3 convolutions over frames and space."""

    conv_class = SparseConv4d


_TEMPORAL_BLOCKS = {"3D_1D": SparseResBlock1d, "3D_4D": SparseResBlock4d}


def _check_config(pe_mode, conv_type, share_mod, io_block_channels_t, io_block_channels, patch_size) -> None:
    """Refuses the configurations the model does not implement."""
    if pe_mode not in ("ape", "rope_t"):
        raise ValueError(f"SLatFlow4DModel: pe_mode {pe_mode!r} is not supported (ape, rope_t)")
    if conv_type not in ("3D_1D", "3D_4D", "non"):
        raise ValueError(f"SLatFlow4DModel: conv_type {conv_type!r} is not supported (3D_1D, 3D_4D, non)")
    if share_mod:
        raise ValueError("SLatFlow4DModel: share_mod=True is not supported")
    if not io_block_channels_t:
        raise ValueError("SLatFlow4DModel: io_block_channels_t is required (the torso runs on frame pairs)")
    if len(io_block_channels_t) != 1:
        raise ValueError("SLatFlow4DModel: exactly one temporal stage is supported (frames are paired once)")
    if patch_size != 2 ** len(io_block_channels or []):
        raise ValueError(f"SLatFlow4DModel: patch_size {patch_size} needs {patch_size.bit_length() - 1} io stages")


def _spatial_encoder(io_block_channels: List[int], model_channels: int, num_res_blocks: int) -> nn.ModuleList:
    """Spatial encoder stages: (n-1) res blocks, then one that pools space and widens."""
    blocks = nn.ModuleList()
    for chs, next_chs in zip(io_block_channels, io_block_channels[1:] + [model_channels]):
        blocks.extend(SparseResBlock3d(chs, model_channels) for _ in range(num_res_blocks - 1))
        blocks.append(SparseResBlock3d(chs, model_channels, next_chs, resample="down"))
    return blocks


def _temporal_encoder(io_block_channels_t: List[int], model_channels: int, num_res_blocks: int,
                      conv_type: str) -> nn.ModuleList:
    """Temporal encoder stages: res blocks over frames then frame-pair pooling (or plain pooling)."""
    blocks = nn.ModuleList()
    for chs, next_chs in zip(io_block_channels_t, io_block_channels_t[1:] + [model_channels]):
        if conv_type == "non":
            blocks.append(SparseDownsample_t(2))
            continue
        block = _TEMPORAL_BLOCKS[conv_type]
        blocks.extend(block(chs, model_channels) for _ in range(num_res_blocks - 1))
        blocks.append(block(chs, model_channels, next_chs, resample="down"))
    return blocks


def _temporal_decoder(io_block_channels_t: List[int], model_channels: int, num_res_blocks: int, conv_type: str,
                      skip: int) -> nn.ModuleList:
    """Temporal decoder stages: unpool frames (taking the skip), then res blocks."""
    blocks = nn.ModuleList()
    for chs, prev_chs in zip(reversed(io_block_channels_t), [model_channels] + io_block_channels_t[:0:-1]):
        if conv_type == "non":
            blocks.append(SparseUpsample_t(2))
            continue
        block = _TEMPORAL_BLOCKS[conv_type]
        blocks.append(block(prev_chs * skip, model_channels, chs, resample="up"))
        blocks.extend(block(chs * skip, model_channels, chs) for _ in range(num_res_blocks - 1))
    return blocks


def _spatial_decoder(io_block_channels: List[int], model_channels: int, num_res_blocks: int,
                     skip: int) -> nn.ModuleList:
    """Spatial decoder stages: unpool space (taking the skip), then res blocks."""
    blocks = nn.ModuleList()
    for chs, prev_chs in zip(reversed(io_block_channels), [model_channels] + io_block_channels[:0:-1]):
        blocks.append(SparseResBlock3d(prev_chs * skip, model_channels, chs, resample="up"))
        blocks.extend(SparseResBlock3d(chs * skip, model_channels, chs) for _ in range(num_res_blocks - 1))
    return blocks


class SLatFlow4DModel(nn.Module):
    """Structured-latent flow transformer over the voxels of all frames of a clip.

    Args (the checkpoint json's ``args``):
        resolution: voxel grid edge (64 released); informational.
        in_channels / out_channels: latent width (8).
        model_channels: transformer width C.
        cond_channels: width of the image tokens.
        num_blocks: transformer blocks.
        num_heads / num_head_channels: heads (default ``C // num_head_channels``).
        mlp_ratio: transformer MLP width ratio.
        patch_size: spatial pooling factor of the io blocks, must be ``2 ** len(io_block_channels)``.
        num_io_res_blocks: res blocks per spatial stage, and per temporal input stage.
        num_io_res4d_blocks: res blocks per temporal output stage.
        io_block_channels: widths of the spatial stages (each ends / starts with 2x space pooling).
        io_block_channels_t: widths of the temporal stages (each pools frame pairs); required, the
            transformer always runs on frame pairs.
        pe_mode: ``"rope_t"`` (absolute x,y,z embedding + rotary frame index in the temporal attention)
            or ``"ape"`` (absolute x,y,z embedding only).
        rope_base: base of the rope_t frequencies.
        use_skip_connection: U-Net skips between io stages.
        qk_rms_norm / qk_rms_norm_cross: q/k RMS norm in self- / cross-attention.
        expand_self_attn: self-attention over all frames of a clip (else within each frame pair).
        conv_type: temporal io stages: ``"3D_1D"`` (1D convs over frames), ``"3D_4D"`` (4D convs),
            ``"non"`` (frame pooling / unpooling without convolutions).
        use_fp16, use_checkpoint: training / reference-precision flags, accepted and unused (precision is
            chosen when loading).
        share_mod: must be False (the reference cannot combine it with io res blocks).
    """

    def __init__(
        self,
        resolution: int,
        in_channels: int,
        model_channels: int,
        cond_channels: int,
        out_channels: int,
        num_blocks: int,
        num_heads: Optional[int] = None,
        num_head_channels: Optional[int] = 64,
        mlp_ratio: float = 4,
        patch_size: int = 2,
        num_io_res_blocks: int = 2,
        num_io_res4d_blocks: int = 2,
        io_block_channels: Optional[List[int]] = None,
        io_block_channels_t: Optional[List[int]] = None,
        pe_mode: Literal["ape", "rope_t"] = "ape",
        rope_base: float = 10000.0,
        use_fp16: bool = False,
        use_checkpoint: bool = False,
        use_skip_connection: bool = True,
        share_mod: bool = False,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
        expand_self_attn: bool = False,
        conv_type: Literal["3D_1D", "3D_4D", "non"] = "3D_1D",
    ):
        super().__init__()
        _check_config(pe_mode, conv_type, share_mod, io_block_channels_t, io_block_channels, patch_size)
        io_block_channels = list(io_block_channels or [])
        self.resolution = resolution
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.cond_channels = cond_channels
        self.out_channels = out_channels
        self.num_blocks = num_blocks
        self.num_heads = num_heads or model_channels // num_head_channels
        self.patch_size = patch_size
        self.pe_mode = pe_mode
        self.use_skip_connection = use_skip_connection
        self.conv_type = conv_type
        skip = 2 if use_skip_connection else 1
        io_width = io_block_channels[0] if io_block_channels else model_channels

        self.t_embedder = TimestepEmbedder(model_channels)
        self.pos_embedder = AbsolutePositionEmbedder(model_channels)
        self.input_layer = nn.Linear(in_channels, io_width)
        self.input_blocks = _spatial_encoder(io_block_channels, model_channels, num_io_res_blocks)
        self.input_blocks_t = _temporal_encoder(io_block_channels_t, model_channels, num_io_res_blocks, conv_type)
        self.blocks = nn.ModuleList(
            ModulatedSparseTransformerCross4DBlock(
                model_channels,
                cond_channels,
                num_heads=self.num_heads,
                mlp_ratio=mlp_ratio,
                expand_self_attn=expand_self_attn,
                use_rope_t=pe_mode == "rope_t",
                rope_base=rope_base,
                qk_rms_norm=qk_rms_norm,
                qk_rms_norm_cross=qk_rms_norm_cross,
            )
            for _ in range(num_blocks)
        )
        self.out_blocks_t = _temporal_decoder(io_block_channels_t, model_channels, num_io_res4d_blocks, conv_type, skip)
        self.out_blocks = _spatial_decoder(io_block_channels, model_channels, num_io_res_blocks, skip)
        self.out_layer = nn.Linear(io_width, out_channels)

    def _with_skip(self, h: SparseTensor, skip: torch.Tensor) -> SparseTensor:
        return h.replace(torch.cat([h.feats, skip], dim=1)) if self.use_skip_connection else h

    def forward(self, x: SparseTensor, t: torch.Tensor, cond: torch.Tensor, num_frames: int) -> SparseTensor:
        """
        Args:
            x: noisy latents, feats ``[N, in_channels]``, coords ``[N, 4]`` with
               ``coords[:, 0] = clip * num_frames + frame`` (B*T batch entries, grouped).
            t: flow time per frame ``[B*T]`` (x1000, as the sampler passes it).
            cond: image tokens per frame ``[B*T, L, cond_channels]``.
            num_frames: T, frames per clip (even).
        Returns:
            velocity, feats ``[N, out_channels]`` with the coords and row order of x.
        """
        if num_frames % 2:
            raise ValueError(f"SLatFlow4DModel needs an even number of frames, got {num_frames}")
        dtype = self.input_layer.weight.dtype
        h = x.replace(self.input_layer(x.feats.to(dtype)))
        t_emb = self.t_embedder(t).to(dtype)  # [B*T, C]
        cond = cond.to(dtype)

        skips = []
        for block in self.input_blocks:
            h = block(h, t_emb, num_frames)
            skips.append(h.feats)
        skips_t = []
        for block in self.input_blocks_t:
            h = block(h) if self.conv_type == "non" else block(h, t_emb, num_frames)
            skips_t.append(h.feats)

        # transformer on frame pairs: entries, embeddings and image tokens of both frames merged
        h = h.replace(h.feats + self.pos_embedder(h.coords[:, 1:]).to(dtype))
        pair_emb = pair_frames(t_emb)  # [B*T/2, C]
        pair_cond = cond.reshape(cond.shape[0] // 2, 2 * cond.shape[1], cond.shape[2])  # [B*T/2, 2L, C_cond]
        for block in self.blocks:
            h = block(h, pair_emb, pair_cond, num_frames // 2)

        for block, skip in zip(self.out_blocks_t, reversed(skips_t)):
            h = block(h) if self.conv_type == "non" else block(self._with_skip(h, skip), t_emb, num_frames)
        for block, skip in zip(self.out_blocks, reversed(skips)):
            h = block(self._with_skip(h, skip), t_emb, num_frames)

        out = self.out_layer(F.layer_norm(h.feats, h.feats.shape[-1:]))
        return h.replace(out.to(x.feats.dtype))
