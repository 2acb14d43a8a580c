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
All attention goes through ``torch.nn.functional.scaled_dot_product_attention``.
"""
from __future__ import annotations

from typing import Literal, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..sparse import SparseTensor
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
            out = context_attention(q, x.coords[:, 0], k, v)
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
        if self.type == "self" and self.attn_mode == "full":
            group = frame_groups(x.coords)
        elif self.type == "self":
            group = window_groups(x.coords, self.window_size, self.shift_window)
        elif self.attn_mode == "full":
            group = clip_groups(x.coords, num_frames)
        else:
            group = cross_frame_window_groups(x.coords, num_frames, self.window_size, self.shift_window)
        return grouped_attention(q, k, v, group)


# ------------------------------------------------------------------------------------------------------
# Attention kernels over groups of voxels (used only by the attention above, so they live beside it).
# ------------------------------------------------------------------------------------------------------
def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Attention among the rows that share a group id.

    Args:
        q, k, v: ``[N, H, D]``.
        group: ``[N]`` int group id of each row (any order, any values).
    Returns:
        ``[N, H, D]`` in the row order of q.
    """
    order = torch.argsort(group, stable=True)
    _, counts = torch.unique_consecutive(group[order], return_counts=True)
    q, k, v = q[order], k[order], v[order]
    num_groups, longest = counts.numel(), int(counts.max())
    if num_groups * longest <= 2 * q.shape[0] and num_groups > 4:
        # many small groups (windows): one padded batch with a key mask
        first_row = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        slot = torch.arange(q.shape[0], device=q.device) - first_row
        row = torch.repeat_interleave(torch.arange(num_groups, device=q.device), counts)

        def padded(t):
            out = t.new_zeros(num_groups, longest, *t.shape[1:])
            out[row, slot] = t
            return out.transpose(1, 2)  # [G, H, Lmax, D]

        valid = torch.zeros(num_groups, longest, dtype=torch.bool, device=q.device)
        valid[row, slot] = True
        out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=valid[:, None, None, :])
        out = out.transpose(1, 2)[row, slot]
    else:
        # few large groups (frames, clips): unmasked calls per group
        out = torch.cat([
            _unmasked_attention(qg, kg, vg)
            for qg, kg, vg in zip(q.split(counts.tolist()), k.split(counts.tolist()), v.split(counts.tolist()))
        ])
    result = torch.empty_like(out)
    result[order] = out
    return result


# Off CUDA, SDPA materialises the [H, Lq, Lk] score matrix: bound it by splitting the queries (exact).
SCORE_ELEMENTS_OFF_CUDA = 1 << 27


def _unmasked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """All of q ``[Lq, H, D]`` attend to all of k, v ``[Lk, H, D]`` -> ``[Lq, H, D]``."""
    k, v = k.transpose(0, 1), v.transpose(0, 1)
    chunk = q.shape[0]
    if q.device.type != "cuda":
        chunk = max(1, SCORE_ELEMENTS_OFF_CUDA // max(1, k.shape[0] * k.shape[1]))
    return torch.cat([
        F.scaled_dot_product_attention(qc.transpose(0, 1), k, v).transpose(0, 1) for qc in q.split(chunk)
    ])


def context_attention(q: torch.Tensor, batch: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Each voxel attends to the dense tokens of its own batch entry.

    Args:
        q: ``[N, H, D]`` voxel queries; batch: ``[N]`` their batch index.
        k, v: ``[B, L, H, D]`` context keys / values.
    Returns:
        ``[N, H, D]``.
    """
    batch = batch.long()
    counts = torch.bincount(batch, minlength=k.shape[0])
    order = torch.argsort(batch, stable=True)
    slot = torch.arange(q.shape[0], device=q.device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rows = batch[order]
    padded = q.new_zeros(k.shape[0], int(counts.max()), *q.shape[1:])
    padded[rows, slot] = q[order]
    out = F.scaled_dot_product_attention(padded.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    result = torch.empty_like(q)
    result[order] = out[rows, slot]
    return result


def _per_axis(value: Union[int, Tuple[int, ...]]) -> Tuple[int, int, int]:
    return (value,) * 3 if isinstance(value, int) else tuple(value)


def _group_ids(keys: torch.Tensor) -> torch.Tensor:
    """[N, K] integer keys -> [N] dense group id (rows with equal keys share an id)."""
    return torch.unique(keys, dim=0, return_inverse=True)[1]


def frame_groups(coords: torch.Tensor) -> torch.Tensor:
    """One group per batch entry (frame)."""
    return coords[:, 0].long()


def clip_groups(coords: torch.Tensor, num_frames: int) -> torch.Tensor:
    """One group per clip: all frames ``clip * num_frames + f`` together."""
    return coords[:, 0].long() // num_frames


def window_groups(coords: torch.Tensor, window_size, shift_window) -> torch.Tensor:
    """Swin windows inside each frame: voxels with equal ``(b, (xyz + shift) // window)``."""
    shift = torch.tensor(_per_axis(shift_window), device=coords.device)
    size = torch.tensor(_per_axis(window_size), device=coords.device)
    cells = (coords[:, 1:].long() + shift) // size
    return _group_ids(torch.cat([coords[:, :1].long(), cells], dim=1))


def cross_frame_window_groups(coords: torch.Tensor, num_frames: int, window_size, shift_window) -> torch.Tensor:
    """Spatio-temporal windows as the SS4D reference forms them: the frame axis (the batch index, shifted
    by ``shift[0]`` and cut every ``window[0]`` entries, offset by the clip index so that clips never
    share a window) times the swin cells of x, y, z."""
    shift, size = _per_axis(shift_window), _per_axis(window_size)
    batch = coords[:, :1].long()
    time_cell = (batch + shift[0]) // size[0] + batch // num_frames
    cells = ((coords[:, 1:].long() + torch.tensor(shift, device=coords.device))
             // torch.tensor(size, device=coords.device))
    return _group_ids(torch.cat([time_cell, cells], dim=1))
