"""adaLN-modulated sparse transformer blocks (DiT-style conditioning on the flow timestep).

The structured-latent flow's torso is a stack of :class:`ModulatedSparseTransformerCross4DBlock`:

    x = x + gate_msa * SelfAttn(LN(x) * (1 + scale_msa) + shift_msa)     # per frame or over the clip
    x = x + CrossAttn(LN_affine(x), image tokens)
    x = x + gate_mlp * MLP(LN(x) * (1 + scale_mlp) + shift_mlp)

where ``shift/scale/gate`` come from the timestep embedding of each batch entry (``adaLN_modulation``)
and are broadcast to the voxels of that entry.
"""
from __future__ import annotations


import torch
import torch.nn as nn

from ..sparse import SparseTensor
from .layers import FeedForwardNet, LayerNorm32
from .sparse_attention import SparseMultiHeadAttention


def per_voxel(x: SparseTensor, per_entry: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-batch-entry tensor ``[B, ...]`` to the voxels of x: ``[N, ...]``."""
    return per_entry[x.coords[:, 0].long()]


class ModulatedSparseTransformerCross4DBlock(nn.Module):
    """Self-attention (per frame, or over all frames of a clip) + cross-attention + MLP, adaLN-modulated.

    Args:
        channels: C, voxel feature width.
        ctx_channels: width of the cross-attention context (image tokens).
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP is ``int(C * mlp_ratio)``.
        expand_self_attn: self-attention spans all frames of a clip (``type="temporal"``) instead of one frame.
        use_rope_t: rotary embedding of the frame index in the (temporal) self-attention.
        rope_base: base of the rope_t frequencies.
        qk_rms_norm / qk_rms_norm_cross: q/k RMS norm in the self- / cross-attention.
        qkv_bias: bias of the q/k/v projections.
    """

    def __init__(
        self,
        channels: int,
        ctx_channels: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        expand_self_attn: bool = False,
        use_rope_t: bool = False,
        rope_base: float = 10000.0,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
        qkv_bias: bool = True,
    ):
        super().__init__()
        self.channels = channels
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = SparseMultiHeadAttention(
            channels,
            num_heads,
            type="temporal" if expand_self_attn else "self",
            qkv_bias=qkv_bias,
            use_rope_t=use_rope_t and expand_self_attn,
            rope_base=rope_base,
            qk_rms_norm=qk_rms_norm,
        )
        self.cross_attn = SparseMultiHeadAttention(
            channels,
            num_heads,
            ctx_channels=ctx_channels,
            type="cross",
            qkv_bias=qkv_bias,
            qk_rms_norm=qk_rms_norm_cross,
        )
        self.mlp = FeedForwardNet(channels, mlp_ratio=mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels, bias=True))

    def forward(self, x: SparseTensor, emb: torch.Tensor, context: torch.Tensor, num_frames: int) -> SparseTensor:
        """
        Args:
            x: voxels, feats ``[N, C]``, B batch entries (``clips * num_frames``).
            emb: timestep embedding per batch entry ``[B, C]``.
            context: cross-attention tokens per batch entry ``[B, L, ctx_channels]``.
            num_frames: frames per clip (for the temporal self-attention and its rope_t).
        Returns:
            SparseTensor like x, feats ``[N, C]``.
        """
        mod = per_voxel(x, self.adaLN_modulation(emb))  # [N, 6C]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        feats = x.feats

        h = self.norm1(feats) * (1 + scale_msa) + shift_msa
        h = self.self_attn(x.replace(h), num_frames=num_frames).feats
        feats = feats + h * gate_msa

        h = self.cross_attn(x.replace(self.norm2(feats)), context).feats
        feats = feats + h

        h = self.norm3(feats) * (1 + scale_mlp) + shift_mlp
        feats = feats + self.mlp(h) * gate_mlp
        return x.replace(feats)
