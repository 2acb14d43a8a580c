"""SS4D stage 1: the 4D sparse-structure flow transformer.

Predicts the flow velocity of the occupancy latents of every frame of a clip, a dense grid
`[clips * T, C, R, R, R]` (R = 16 in the release), conditioned on each frame's DINOv2 tokens:

    patchify (p^3 cells -> one token) -> Linear -> + 3D sinusoidal position embedding
    -> N x ModulatedTransformerCross4DBlock(adaLN from the flow time)
    -> LayerNorm (no affine) -> Linear -> unpatchify

Each block: self-attention (across the frames of a clip when `expand_self_attn`: "temporal", either over
all frames or within temporal windows of `window_size` frames, shifted by half a window every other
block), optionally a separate temporal attention (`insert_temporal`), cross-attention to the frame's
image tokens, feed-forward. The released model: patch 1, rope_t, qk RMS norm, expand_self_attn, window 8.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.attention import MultiHeadAttention
from ..nn.layers import AbsolutePositionEmbedder, FeedForwardNet, LayerNorm32, TimestepEmbedder


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, R, R, R] -> [B, C * p^3, R/p, R/p, R/p]; channel index = c * p^3 + (i * p + j) * p + k."""
    B, C, X, Y, Z = x.shape
    x = x.reshape(B, C, X // p, p, Y // p, p, Z // p, p).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(B, C * p ** 3, X // p, Y // p, Z // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of `patchify`."""
    B, Cp, X, Y, Z = x.shape
    C = Cp // p ** 3
    x = x.reshape(B, C, p, p, p, X, Y, Z).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(B, C, X * p, Y * p, Z * p)


class ModulatedTransformerCross4DBlock(nn.Module):
    """x [B, L, C], adaLN input [B, C], context [B, Lc, Cc] -> [B, L, C] (B = clips * num_frames)."""

    def __init__(self, channels: int, ctx_channels: int, num_heads: int, mlp_ratio: float,
                 self_attn_type: Literal["self", "temporal"], attn_mode: Literal["full", "windowed"],
                 window_size: Optional[int], shift_window_t: int, use_rope_t: bool, rope_base: float,
                 qk_rms_norm: bool, qk_rms_norm_cross: bool, insert_temporal: bool):
        super().__init__()
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = MultiHeadAttention(channels, num_heads, type=self_attn_type, attn_mode=attn_mode,
                                            window_size=window_size, shift_window_t=shift_window_t,
                                            use_rope_t=use_rope_t, rope_base=rope_base, qk_rms_norm=qk_rms_norm)
        self.cross_attn = MultiHeadAttention(channels, num_heads, ctx_channels=ctx_channels, type="cross",
                                             qk_rms_norm=qk_rms_norm_cross)
        self.mlp = FeedForwardNet(channels, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels))
        if insert_temporal:
            self.temp_attn = MultiHeadAttention(channels, num_heads, type="temporal", use_rope_t=use_rope_t,
                                                qk_rms_norm=qk_rms_norm)
            self.norm4 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
            self.adaLN_modulation_temporal = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    @staticmethod
    def modulate(h, shift, scale):
        return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        shift_sa, scale_sa, gate_sa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(emb).chunk(6, dim=1)
        h = self.self_attn(self.modulate(self.norm1(x), shift_sa, scale_sa), num_frames=num_frames)
        x = x + h * gate_sa.unsqueeze(1)
        h = self.norm2(x)
        if hasattr(self, "temp_attn"):
            shift_t, scale_t, gate_t = self.adaLN_modulation_temporal(emb).chunk(3, dim=1)
            h = self.temp_attn(self.modulate(h, shift_t, scale_t), num_frames=num_frames)
            x = x + h * gate_t.unsqueeze(1)
            h = self.norm4(x)
        x = x + self.cross_attn(h, context)
        h = self.mlp(self.modulate(self.norm3(x), shift_mlp, scale_mlp))
        return x + h * gate_mlp.unsqueeze(1)


class SparseStructureFlow4DModel(nn.Module):
    """Args are the checkpoint json's `args`. `pe_mode`: "ape" (position embedding only) or "rope_t"
    (position embedding + rotary frame index in temporal attention). `window_size`: temporal window of
    the (temporal) self-attention, None = all frames. `use_fp16`: how the reference ran (precision is
    chosen at load time); `use_checkpoint`: training only, unused."""

    def __init__(
        self,
        resolution: int,
        in_channels: int,
        model_channels: int,
        cond_channels: int,
        out_channels: int,
        num_blocks: int,
        num_heads: Optional[int] = None,
        num_head_channels: int = 64,
        mlp_ratio: float = 4,
        patch_size: int = 2,
        pe_mode: Literal["ape", "rope_t"] = "ape",
        rope_base: float = 10000.0,
        window_size: Optional[int] = None,
        use_fp16: bool = False,
        use_checkpoint: bool = False,
        share_mod: bool = False,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
        expand_self_attn: bool = False,
        insert_temporal: bool = False,
    ):
        super().__init__()
        if pe_mode not in ("ape", "rope_t"):
            raise ValueError(f"pe_mode {pe_mode!r} is not used by SS4D (expected 'ape' or 'rope_t')")
        if share_mod:
            raise ValueError("share_mod is not used by the SS4D checkpoints")
        if window_size is not None and not expand_self_attn:
            raise ValueError("temporal windows need expand_self_attn")
        self.resolution, self.in_channels, self.out_channels = resolution, in_channels, out_channels
        self.patch_size = patch_size
        heads = num_heads or model_channels // num_head_channels
        self.t_embedder = TimestepEmbedder(model_channels)
        grid = resolution // patch_size
        cells = torch.stack(torch.meshgrid(*[torch.arange(grid)] * 3, indexing="ij"), -1).reshape(-1, 3)
        self.register_buffer("pos_emb", AbsolutePositionEmbedder(model_channels, 3)(cells))
        self.input_layer = nn.Linear(in_channels * patch_size ** 3, model_channels)
        self.blocks = nn.ModuleList([
            ModulatedTransformerCross4DBlock(
                model_channels, cond_channels, heads, mlp_ratio,
                self_attn_type="temporal" if expand_self_attn else "self",
                attn_mode="full" if window_size is None else "windowed",
                window_size=window_size,
                shift_window_t=0 if window_size is None else window_size // 2 * (i % 2),
                use_rope_t=pe_mode == "rope_t", rope_base=rope_base,
                qk_rms_norm=qk_rms_norm, qk_rms_norm_cross=qk_rms_norm_cross, insert_temporal=insert_temporal)
            for i in range(num_blocks)
        ])
        self.out_layer = nn.Linear(model_channels, out_channels * patch_size ** 3)

    @property
    def blocks_dtype(self) -> torch.dtype:
        return self.blocks[0].mlp.mlp[0].weight.dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x [clips*T, in, R, R, R]; t [clips*T] (flow time x 1000); cond [clips*T, L, cond_channels]
        -> velocity [clips*T, out, R, R, R] in x's dtype."""
        B = x.shape[0]
        if tuple(x.shape[1:]) != (self.in_channels,) + (self.resolution,) * 3:
            raise ValueError(f"expected [B, {self.in_channels}, {self.resolution}^3] latents, got {tuple(x.shape)}")
        dtype = self.blocks_dtype
        h = patchify(x, self.patch_size).flatten(2).transpose(1, 2)  # [B, L, in * p^3]
        h = self.input_layer(h.to(self.input_layer.weight.dtype)) + self.pos_emb[None]
        emb = self.t_embedder(t).to(dtype)
        h, cond = h.to(dtype), cond.to(dtype)
        for block in self.blocks:
            h = block(h, emb, cond, num_frames)
        h = F.layer_norm(h.to(x.dtype), h.shape[-1:])
        h = self.out_layer(h.to(self.out_layer.weight.dtype))
        grid = self.resolution // self.patch_size
        h = h.transpose(1, 2).reshape(B, -1, grid, grid, grid)
        return unpatchify(h, self.patch_size).to(x.dtype)
