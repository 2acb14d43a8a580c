"""Shared trunk of the structured-latent decoders::

    x [N, latent_channels]  (voxels of one or more batch entries)
      input_layer (Linear)                       -> [N, C]
      + absolute sin/cos embedding of x, y, z    (pe_mode "ape" or "rope_t")
      blocks: num_blocks plain sparse transformer blocks
              attn_mode "swin": swin windows of window_size, odd blocks shifted by window_size // 2
              attn_mode "full": all voxels of an entry
    -> [N, C], coords and row order of x

``frames=False`` builds TRELLIS's 3D blocks (each batch entry on its own); ``frames=True`` builds SS4D's
4D blocks, which with ``expand_self_attn`` attend across the frames of a clip (spatio-temporal swin
windows, frame index by rope_t).

The trunk runs in the dtype of its parameters (the model is cast at load time; ``use_fp16`` of the
reference configs only says the reference ran the blocks in half precision).
"""
from __future__ import annotations

from typing import Literal, Optional

import torch.nn as nn

from ..nn.layers import AbsolutePositionEmbedder
from ..nn.sparse_blocks import SparseTransformer4DBlock, SparseTransformerBlock
from ..sparse import SparseTensor

AttnMode = Literal["full", "swin"]
PeMode = Literal["ape", "rope_t"]


def block_attention(attn_mode: str, window_size: Optional[int], index: int) -> dict:
    """Attention settings of block ``index``: swin blocks alternate unshifted / half-window shifted."""
    if attn_mode == "full":
        return {"attn_mode": "full", "window_size": None, "shift_window": None}
    if attn_mode == "swin":
        if window_size is None:
            raise ValueError("attn_mode 'swin' needs window_size")
        return {"attn_mode": "windowed", "window_size": window_size, "shift_window": window_size // 2 * (index % 2)}
    # "shift_window", "shift_sequence", "shift_order" (serialized attention) appear in no released decoder
    raise ValueError(f"attn_mode {attn_mode!r} is not supported (released decoders use 'swin')")


class SparseTransformerBase(nn.Module):
    """Input projection + position embedding + transformer blocks (no output layer).

    Args:
        in_channels: latent channels of the input voxels.
        model_channels: C.
        num_blocks: transformer blocks.
        num_heads: attention heads (default ``model_channels // num_head_channels``).
        num_head_channels: head width when num_heads is not given.
        mlp_ratio: MLP hidden width factor.
        attn_mode: "swin" or "full".
        window_size: swin window edge.
        pe_mode: "ape" (absolute x, y, z embedding) or "rope_t" (the same, plus a rotary frame-index
            embedding in the cross-frame attention; 4D only).
        qk_rms_norm: q/k RMS norm in the attention.
        frames: build SS4D's 4D blocks (forward takes ``num_frames``).
        expand_self_attn: 4D only: attention across the frames of a clip.
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        num_blocks: int,
        num_heads: Optional[int] = None,
        num_head_channels: Optional[int] = 64,
        mlp_ratio: float = 4.0,
        attn_mode: AttnMode = "full",
        window_size: Optional[int] = None,
        pe_mode: PeMode = "ape",
        qk_rms_norm: bool = False,
        frames: bool = False,
        expand_self_attn: bool = False,
    ):
        super().__init__()
        if pe_mode not in ("ape", "rope_t"):
            raise ValueError(f"pe_mode {pe_mode!r} is not supported (released decoders use 'ape' / 'rope_t')")
        if pe_mode == "rope_t" and not frames:
            raise ValueError("pe_mode 'rope_t' needs the 4D (frames) trunk")
        if expand_self_attn and not frames:
            raise ValueError("expand_self_attn needs the 4D (frames) trunk")
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.num_heads = num_heads or model_channels // num_head_channels
        self.pe_mode = pe_mode
        self.frames = frames

        self.pos_embedder = AbsolutePositionEmbedder(model_channels)
        self.input_layer = nn.Linear(in_channels, model_channels)
        blocks = []
        for i in range(num_blocks):
            common = dict(num_heads=self.num_heads, mlp_ratio=mlp_ratio, qk_rms_norm=qk_rms_norm,
                          **block_attention(attn_mode, window_size, i))
            if frames:
                blocks.append(SparseTransformer4DBlock(model_channels, expand_self_attn=expand_self_attn,
                                                       use_rope_t=pe_mode == "rope_t", **common))
            else:
                blocks.append(SparseTransformerBlock(model_channels, **common))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: SparseTensor, num_frames: Optional[int] = None) -> SparseTensor:
        """
        Args:
            x: feats ``[N, in_channels]``, coords ``[N, 4]``.
            num_frames: frames per clip (4D trunk only).
        Returns:
            feats ``[N, C]`` in the parameters' dtype, coords and row order of x.
        """
        if self.frames and num_frames is None:
            raise ValueError("the 4D decoder trunk needs num_frames")
        dtype = self.input_layer.weight.dtype
        h = self.input_layer(x.feats.to(dtype))
        h = h + self.pos_embedder(x.coords[:, 1:].float()).to(dtype)
        h = x.replace(h)
        for block in self.blocks:
            h = block(h, num_frames) if self.frames else block(h)
        return h
