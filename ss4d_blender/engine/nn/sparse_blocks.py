"""Plain (not modulated) sparse transformer blocks: the torso of the structured-latent decoders.

Both blocks are pre-norm residual blocks::

    x = x + SelfAttn(LN(x))
    x = x + MLP(LN(x))            MLP: Linear(C, rC) -> GELU(tanh) -> Linear(rC, C)

They differ only in which voxels attend to each other:

:class:`SparseTransformerBlock` (TRELLIS, 3D)
    each batch entry on its own: all its voxels (``attn_mode="full"``) or only those in the same
    ``window_size``^3 swin cube (``"windowed"``, grid offset by ``shift_window``).
:class:`SparseTransformer4DBlock` (SS4D)
    with ``expand_self_attn`` the windows are spatio-temporal: ``window_size`` consecutive frames of one
    clip x ``window_size``^3 voxels (the frame axis is shifted along with the space axes), and the
    frame index is encoded with a rotary embedding (rope_t, required by the reference in this mode).
    Without ``expand_self_attn`` it is the 3D block.

Parameter names follow the checkpoints: ``norm1``, ``norm2`` (no parameters unless ``ln_affine``),
``attn.to_qkv``, ``attn.to_out`` (``attn.q_rms_norm`` / ``attn.k_rms_norm`` with ``qk_rms_norm``),
``mlp.mlp.0``, ``mlp.mlp.2``.
"""
from __future__ import annotations

from typing import Literal, Optional, Tuple, Union

import torch.nn as nn

from ..sparse import SparseTensor
from .layers import FeedForwardNet, LayerNorm32
from .sparse_attention import SparseMultiHeadAttention

AttentionMode = Literal["full", "windowed"]


class SparseTransformerBlock(nn.Module):
    """Self-attention within each batch entry + MLP (TRELLIS's decoder block).

    Args:
        channels: C, voxel feature width.
        num_heads: attention heads (head width C / num_heads).
        mlp_ratio: hidden width of the MLP is ``int(C * mlp_ratio)``.
        attn_mode: "full" (all voxels of the entry) or "windowed" (swin cubes).
        window_size: edge of the swin cubes in voxels ("windowed").
        shift_window: offset of the swin grid (voxels, all axes).
        qk_rms_norm: per-head RMS norm of queries and keys.
        qkv_bias: bias of the q/k/v projection.
        ln_affine: learned gain/bias in the two layer norms.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attn_mode: AttentionMode = "full",
        window_size: Optional[int] = None,
        shift_window: Union[int, Tuple[int, int, int], None] = None,
        qk_rms_norm: bool = False,
        qkv_bias: bool = True,
        ln_affine: bool = False,
    ):
        super().__init__()
        self.norm1 = LayerNorm32(channels, elementwise_affine=ln_affine, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=ln_affine, eps=1e-6)
        self.attn = self._attention(channels, num_heads, attn_mode, window_size, shift_window, qk_rms_norm, qkv_bias)
        self.mlp = FeedForwardNet(channels, mlp_ratio=mlp_ratio)

    def _attention(self, channels, num_heads, attn_mode, window_size, shift_window, qk_rms_norm, qkv_bias):
        return SparseMultiHeadAttention(
            channels, num_heads, type="self", attn_mode=attn_mode, window_size=window_size,
            shift_window=shift_window, qkv_bias=qkv_bias, qk_rms_norm=qk_rms_norm,
        )

    def _residual(self, x: SparseTensor, num_frames: Optional[int]) -> SparseTensor:
        feats = x.feats
        feats = feats + self.attn(x.replace(self.norm1(feats)), num_frames=num_frames).feats
        feats = feats + self.mlp(self.norm2(feats))
        return x.replace(feats)

    def forward(self, x: SparseTensor) -> SparseTensor:
        """x: feats ``[N, C]`` -> feats ``[N, C]``, same coords and row order."""
        return self._residual(x, None)


class SparseTransformer4DBlock(SparseTransformerBlock):
    """SS4D's decoder block: like :class:`SparseTransformerBlock`, but with ``expand_self_attn`` the
    attention spans spatio-temporal windows of a clip (see the module docstring).

    Extra args:
        expand_self_attn: attention across frames (spatio-temporal swin windows).
        use_rope_t: rotary embedding of the frame index in the cross-frame attention.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attn_mode: AttentionMode = "full",
        window_size: Optional[int] = None,
        shift_window: Union[int, Tuple[int, int, int], None] = None,
        qk_rms_norm: bool = False,
        qkv_bias: bool = True,
        ln_affine: bool = False,
        expand_self_attn: bool = False,
        use_rope_t: bool = False,
    ):
        if expand_self_attn and attn_mode != "windowed":
            raise ValueError("cross-frame attention of the 4D decoder block exists only as swin windows "
                             "(the reference implements no full / serialized variant)")
        if expand_self_attn and not use_rope_t:
            raise ValueError("cross-frame attention of the 4D decoder block needs rope_t (pe_mode='rope_t')")
        self.expand_self_attn = expand_self_attn
        self.use_rope_t = use_rope_t and expand_self_attn
        super().__init__(channels, num_heads, mlp_ratio, attn_mode, window_size, shift_window, qk_rms_norm,
                         qkv_bias, ln_affine)

    def _attention(self, channels, num_heads, attn_mode, window_size, shift_window, qk_rms_norm, qkv_bias):
        return SparseMultiHeadAttention(
            channels, num_heads, type="temporal" if self.expand_self_attn else "self", attn_mode=attn_mode,
            window_size=window_size, shift_window=shift_window, qkv_bias=qkv_bias,
            use_rope_t=self.use_rope_t, qk_rms_norm=qk_rms_norm,
        )

    def forward(self, x: SparseTensor, num_frames: int) -> SparseTensor:
        """x: feats ``[N, C]`` of ``clips * num_frames`` entries -> feats ``[N, C]``, same coords and order."""
        return self._residual(x, num_frames)
