"""Multi-head attention over the voxels of a sparse tensor.

A sparse tensor holds ``N`` voxels of ``B = clips * num_frames`` batch entries (one entry = one frame of
one clip, ``coords[:, 0] = clip * num_frames + frame``).  The attention module decides which voxels see
each other:

``type="self"``
    the voxels of one batch entry (one frame) attend to each other.  With ``attn_mode="windowed"``
    (the reference's "swin" blocks) only voxels inside the same ``window_size``³ cube attend to each
    other; ``shift_window`` offsets the cube grid.
``type="temporal"``
    the reference's ``expand_self_attn``: the voxels of *all frames of one clip* attend to each other
    (``attn_mode="full"``, the structured-latent flow) or, with ``attn_mode="windowed"`` (the 4D decoder),
    only those inside the same spatio-temporal window (``window_size`` frames × ``window_size``³ voxels).
    With ``use_rope_t`` the frame index inside the clip is encoded by a rotary embedding over each head.
``type="cross"``
    every voxel attends to the dense context tokens of its own batch entry (image features).

Parameter names follow the official checkpoints: ``to_qkv`` (self / temporal) or ``to_q`` + ``to_kv``
(cross), ``to_out``, and with ``qk_rms_norm`` ``q_rms_norm.gamma`` / ``k_rms_norm.gamma`` ``[H, D]``.
All attention goes through ``torch.nn.functional.scaled_dot_product_attention`` (via engine.sparse).
"""
from __future__ import annotations

from typing import Literal, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..sparse import (
    SparseTensor,
    sparse_cross_attention,
    sparse_frame_attention,
    sparse_clip_attention,
    sparse_window_attention,
    sparse_cross_frame_window_attention,
)
from .layers import MultiHeadRMSNorm, RotaryPositionEmbedder

AttentionType = Literal["self", "temporal", "cross"]
AttentionMode = Literal["full", "windowed"]


class SparseMultiHeadAttention(nn.Module):
    """Multi-head attention whose queries are the voxels of a :class:`SparseTensor`.

    Args:
        channels: C, width of the voxel features (and of the output).
        num_heads: H; the head width is ``D = C // H``.
        ctx_channels: width of the dense context (``type="cross"`` only; default ``channels``).
        type: which voxels / tokens attend to each other, see the module docstring.
        attn_mode: ``"full"`` or ``"windowed"`` (swin windows; ``self`` and ``temporal`` only).
        window_size: edge of the attention windows in voxels (and in frames for ``temporal``).
        shift_window: offset of the window grid (int, or one value per axis; for ``temporal`` the first
            value also shifts the frame axis).
        qkv_bias: whether the q/k/v projections have a bias (``to_out`` always has one).
        use_rope_t: rotary embedding of the frame index inside the clip (``temporal`` only, applied
            before the q/k RMS norm, as the reference does).
        rope_base: base of the rope_t frequencies.
        qk_rms_norm: per-head RMS norm of queries and keys, learned gain ``gamma [H, D]``.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        ctx_channels: Optional[int] = None,
        type: AttentionType = "self",
        attn_mode: AttentionMode = "full",
        window_size: Optional[int] = None,
        shift_window: Union[int, Tuple[int, ...], None] = None,
        qkv_bias: bool = True,
        use_rope_t: bool = False,
        rope_base: float = 10000.0,
        qk_rms_norm: bool = False,
    ):
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        if type not in ("self", "temporal", "cross"):
            raise ValueError(f"unknown attention type {type!r}")
        if attn_mode not in ("full", "windowed"):
            raise ValueError(f"unknown attention mode {attn_mode!r}")
        if type == "cross" and attn_mode != "full":
            raise ValueError("cross-attention is always full attention")
        if attn_mode == "windowed" and window_size is None:
            raise ValueError("windowed attention needs window_size")
        if use_rope_t and type != "temporal":
            raise ValueError("rope_t only applies to temporal (cross-frame) attention")

        self.channels = channels
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.ctx_channels = channels if ctx_channels is None else ctx_channels
        self.type = type
        self.attn_mode = attn_mode
        self.window_size = window_size
        self.shift_window = 0 if shift_window is None else shift_window
        self.use_rope_t = use_rope_t
        self.qk_rms_norm = qk_rms_norm

        if type == "cross":
            self.to_q = nn.Linear(channels, channels, bias=qkv_bias)
            self.to_kv = nn.Linear(self.ctx_channels, 2 * channels, bias=qkv_bias)
        else:
            self.to_qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
        self.to_out = nn.Linear(channels, channels)
        if use_rope_t:
            # one rotary axis (the frame index) spread over the whole head width
            self.rope_t = RotaryPositionEmbedder(self.head_dim, 1, base=rope_base)

    # ------------------------------------------------------------------ pieces
    def _split_heads(self, feats: torch.Tensor, parts: int) -> Tuple[torch.Tensor, ...]:
        """[N, parts*C] -> parts tensors [N, H, D]."""
        return feats.reshape(*feats.shape[:-1], parts, self.num_heads, self.head_dim).unbind(-3)

    def _rotate_by_frame(self, q: torch.Tensor, k: torch.Tensor, coords: torch.Tensor, num_frames: int):
        """rope_t: rotate q, k [N, H, D] by the frame index ``coords[:, 0] % num_frames`` of each voxel."""
        frame = (coords[:, 0].long() % num_frames).unsqueeze(-1)  # [N, 1]
        q, k = self.rope_t(q.transpose(0, 1), k.transpose(0, 1), frame)  # heads first: [H, N, D]
        return q.transpose(0, 1), k.transpose(0, 1)

    def _normalize_qk(self, q: torch.Tensor, k: torch.Tensor):
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        return q, k

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        x: SparseTensor,
        context: Optional[torch.Tensor] = None,
        num_frames: Optional[int] = None,
    ) -> SparseTensor:
        """
        Args:
            x: voxels, feats ``[N, C]``, coords ``[N, 4]`` grouped by batch index.
            context: ``type="cross"`` only: dense tokens ``[B, L, ctx_channels]`` (B = batch entries of x).
            num_frames: frames per clip; needed by ``type="temporal"``.
        Returns:
            SparseTensor with the coords (and row order) of ``x``, feats ``[N, C]``.
        """
        if self.type == "cross":
            if context is None:
                raise ValueError("cross-attention needs a context tensor")
            q = self.to_q(x.feats).reshape(-1, self.num_heads, self.head_dim)
            k, v = self._split_heads(self.to_kv(context), 2)  # [B, L, H, D]
            q, k = self._normalize_qk(q, k)
            out = sparse_cross_attention(x.replace(q), k, v).feats
        else:
            q, k, v = self._split_heads(self.to_qkv(x.feats), 3)  # [N, H, D]
            if self.type == "temporal":
                if num_frames is None:
                    raise ValueError("temporal attention needs num_frames")
                if self.use_rope_t:
                    q, k = self._rotate_by_frame(q, k, x.coords, num_frames)
            q, k = self._normalize_qk(q, k)
            out = self._attend(x, q, k, v, num_frames)
        return x.replace(self.to_out(out.reshape(out.shape[0], self.channels)))

    def _attend(self, x: SparseTensor, q, k, v, num_frames: Optional[int]) -> torch.Tensor:
        """q, k, v [N, H, D] of the voxels of x -> attention output [N, H, D]."""
        qkv = x.replace(torch.stack([q, k, v], dim=1))  # [N, 3, H, D]
        if self.type == "self" and self.attn_mode == "full":
            out = sparse_frame_attention(qkv)
        elif self.type == "self":
            out = sparse_window_attention(qkv, self.window_size, self.shift_window)
        elif self.attn_mode == "full":
            out = sparse_clip_attention(qkv, num_frames)
        else:
            out = sparse_cross_frame_window_attention(qkv, num_frames, self.window_size, self.shift_window)
        return out.feats
