"""Dense multi-head attention of the sparse-structure flow (tokens on a regular grid), through
`torch.nn.functional.scaled_dot_product_attention` only.

A batch holds `clips * num_frames` frames of L tokens each (frames of one clip consecutive). Three kinds:
- "self": each frame attends to itself;
- "temporal": the tokens of all frames of a clip attend to each other ("full"), or only within windows of
  consecutive frames ("windowed", `temporal_window_attention`), frame index encoded by rope_t;
- "cross": tokens attend to the frame's conditioning tokens.
Order of operations as the reference: rope_t is applied to q, k first, then the per-head RMS norm.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import MultiHeadRMSNorm, RotaryPositionEmbedder


# Off CUDA, SDPA may materialise the [B, H, Lq, Lk] score matrix (e.g. on MPS: at the released size one
# temporal window is 8 frames x 4096 tokens, 16 heads -> 17e9 scores). Bound it by splitting the batch,
# then the queries, into chunks; the result is exact.
SCORE_ELEMENTS_OFF_CUDA = 1 << 27


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, Lq, H, D], k, v [B, Lk, H, D] -> [B, Lq, H, D]."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D]
    B, H, Lq, _ = q.shape
    per_query = H * k.shape[2]  # score elements of one query of one batch entry
    if q.device.type == "cuda" or B * Lq * per_query <= SCORE_ELEMENTS_OFF_CUDA:
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    queries = max(1, SCORE_ELEMENTS_OFF_CUDA // per_query)  # per call
    if queries >= Lq:  # whole batch entries per call
        step = queries // Lq
        out = [F.scaled_dot_product_attention(q[i:i + step], k[i:i + step], v[i:i + step]) for i in range(0, B, step)]
        return torch.cat(out).transpose(1, 2)
    out = [torch.cat([F.scaled_dot_product_attention(qc, k[i:i + 1], v[i:i + 1])
                      for qc in q[i:i + 1].split(queries, dim=2)], dim=2)
           for i in range(B)]
    return torch.cat(out).transpose(1, 2)


def temporal_windows(num_frames: int, window_size: int, shift: int) -> list[range]:
    """Frames of a clip cut into windows of `window_size` consecutive frames after shifting by `shift`
    (no wrap-around: with a shift the first and last windows are shorter). E.g. T=4, size 2, shift 1:
    [0], [1, 2], [3]."""
    windows: list[list[int]] = []
    for frame in range(num_frames):
        cell = (frame + shift) // window_size
        if windows and (windows[-1][0] + shift) // window_size == cell:
            windows[-1].append(frame)
        else:
            windows.append([frame])
    windows = [range(w[0], w[-1] + 1) for w in windows]
    return windows


def temporal_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: int,
                              shift: int) -> torch.Tensor:
    """Attention among all tokens of the frames of one temporal window.

    q, k, v: [clips, T, L, H, D] -> [clips, T, L, H, D]. Windows of equal length are batched into one
    SDPA call."""
    clips, frames, tokens, heads, dim = q.shape
    out = torch.empty_like(q)
    by_length: dict[int, list[range]] = {}
    for window in temporal_windows(frames, window_size, shift):
        by_length.setdefault(len(window), []).append(window)
    for length, windows in by_length.items():
        index = torch.tensor([list(w) for w in windows], device=q.device)  # [W, length]

        def gather(t):
            return t[:, index].reshape(clips * len(windows), length * tokens, heads, dim)

        h = sdpa(gather(q), gather(k), gather(v))
        out[:, index] = h.reshape(clips, len(windows), length, tokens, heads, dim)
    return out


class MultiHeadAttention(nn.Module):
    """x [B, L, C] (B = clips * num_frames) -> [B, L, C]. Parameter names as the checkpoints:
    `to_qkv` (self / temporal) or `to_q` + `to_kv` (cross), `q_rms_norm`, `k_rms_norm`, `to_out`."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        ctx_channels: Optional[int] = None,
        type: Literal["self", "cross", "temporal"] = "self",
        attn_mode: Literal["full", "windowed"] = "full",
        window_size: Optional[int] = None,
        shift_window_t: int = 0,
        use_rope_t: bool = False,
        rope_base: float = 10000.0,
        qk_rms_norm: bool = False,
    ):
        super().__init__()
        if channels % num_heads:
            raise ValueError("channels must be a multiple of num_heads")
        if attn_mode == "windowed" and (type != "temporal" or window_size is None):
            raise ValueError("windowed attention is temporal, with a window size")
        self.channels, self.num_heads, self.head_dim = channels, num_heads, channels // num_heads
        self.type, self.attn_mode = type, attn_mode
        self.window_size, self.shift_window_t = window_size, shift_window_t
        if type == "cross":
            self.to_q = nn.Linear(channels, channels)
            self.to_kv = nn.Linear(ctx_channels or channels, 2 * channels)
        else:
            self.to_qkv = nn.Linear(channels, 3 * channels)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
        self.qk_rms_norm = qk_rms_norm
        # rope_t only acts in temporal attention (frame index inside the clip)
        use_rope = use_rope_t and type == "temporal"
        self.rope_t = RotaryPositionEmbedder(self.head_dim, 1, base=rope_base) if use_rope else None
        self.to_out = nn.Linear(channels, channels)

    def _norm(self, q, k):
        if self.qk_rms_norm:
            return self.q_rms_norm(q), self.k_rms_norm(k)
        return q, k

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                num_frames: Optional[int] = None) -> torch.Tensor:
        B, L, C = x.shape
        H, D = self.num_heads, self.head_dim
        if self.type == "cross":
            q = self.to_q(x).reshape(B, L, H, D)
            k, v = self.to_kv(context).reshape(B, context.shape[1], 2, H, D).unbind(2)
            q, k = self._norm(q, k)
            h = sdpa(q, k, v)
        elif self.type == "self":
            q, k, v = self.to_qkv(x).reshape(B, L, 3, H, D).unbind(2)
            q, k = self._norm(q, k)
            h = sdpa(q, k, v)
        else:
            if num_frames is None or B % num_frames:
                raise ValueError(f"temporal attention needs num_frames dividing the batch ({B})")
            clips = B // num_frames
            q, k, v = self.to_qkv(x).reshape(clips, num_frames, L, 3, H, D).unbind(3)  # [clips, T, L, H, D]
            if self.rope_t is not None:
                frame = torch.arange(num_frames, device=x.device)[:, None]  # [T, 1]
                # rotate with the frame axis next to the channel axis: [clips, L, H, T, D]
                q, k = self.rope_t(q.permute(0, 2, 3, 1, 4), k.permute(0, 2, 3, 1, 4), frame)
                q, k = q.permute(0, 3, 1, 2, 4), k.permute(0, 3, 1, 2, 4)
            q, k = self._norm(q, k)
            if self.attn_mode == "full":
                h = sdpa(*(t.reshape(clips, num_frames * L, H, D) for t in (q, k, v)))
            else:
                h = temporal_window_attention(q, k, v, self.window_size, self.shift_window_t)
        return self.to_out(h.reshape(B, L, C))
