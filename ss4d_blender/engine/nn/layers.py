"""Small dense building blocks shared by every model: norms that compute in float32, position
embeddings (3D sinusoidal absolute, 1D/3D rotary), the diffusion timestep embedding and the
transformer feed-forward net.

Parameter names follow the official checkpoints (e.g. `gamma` of the RMS norm, `mlp.0` / `mlp.2`
of the feed-forward net), so state dicts load unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm32(nn.LayerNorm):
    """LayerNorm evaluated in float32 whatever the input precision; output in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in float32; output in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class ChannelLayerNorm32(LayerNorm32):
    """LayerNorm over the channel axis of a channels-first tensor [B, C, *spatial]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.movedim(1, -1)
        return super().forward(channels_last).movedim(-1, 1).contiguous()


class MultiHeadRMSNorm(nn.Module):
    """RMS norm per attention head: x / ||x|| * sqrt(dim) * gamma[head].

    x: [..., heads, dim] -> same shape. `gamma` is [heads, dim].
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(x.float(), dim=-1) * self.gamma * self.scale).to(x.dtype)


def sinusoid_frequencies(channels: int, in_channels: int, base: float = 10000.0) -> torch.Tensor:
    """Frequencies base^(-i / n) for i < n, n = channels // in_channels // 2 (float32 [n])."""
    n = channels // in_channels // 2
    return 1.0 / (base ** (torch.arange(n, dtype=torch.float32) / n))


class RotaryPositionEmbedder(nn.Module):
    """Rotary position embedding of queries and keys.

    Consecutive channel pairs (x[2i], x[2i+1]) are rotated by angle position_c * freq_j, the
    frequencies of each position coordinate c filling hidden_size // in_channels // 2 pairs; pairs
    left over (when hidden_size is not a multiple of 2 * in_channels) are not rotated.
    SS4D uses in_channels = 1 with the frame index as position ("rope_t").

    forward(q, k, indices): q, k [..., N, hidden_size]; indices [..., N, in_channels] (or None:
    0..N-1) -> rotated (q, k), same shapes and dtypes; rotation evaluated in float32.
    """

    def __init__(self, hidden_size: int, in_channels: int = 3, base: float = 10000.0):
        super().__init__()
        if hidden_size % 2:
            raise ValueError("rotary hidden size must be even")
        self.hidden_size = hidden_size
        self.in_channels = in_channels
        self.freqs = sinusoid_frequencies(hidden_size, in_channels, base)

    def angles(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [..., N, in_channels] -> rotation angles [..., N, hidden_size // 2] (float32)."""
        freqs = self.freqs.to(indices.device)
        angles = (indices.float().unsqueeze(-1) * freqs).flatten(-2)
        missing = self.hidden_size // 2 - angles.shape[-1]
        if missing > 0:
            angles = F.pad(angles, (0, missing))
        return angles

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
        return rotated.reshape(x.shape).to(x.dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, indices: torch.Tensor | None = None):
        if indices is None:
            indices = torch.arange(q.shape[-2], device=q.device).expand(q.shape[:-2] + (-1,))[..., None]
        angles = self.angles(indices)
        while angles.dim() < q.dim() - 1:  # broadcast over head axes placed before the token axis
            angles = angles.unsqueeze(-3)
        cos, sin = angles.cos(), angles.sin()
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)


class AbsolutePositionEmbedder(nn.Module):
    """Sinusoidal embedding of integer positions, [sin | cos] per coordinate, zero padded.

    forward(positions [N, in_channels]) -> [N, channels] (float32).
    """

    def __init__(self, channels: int, in_channels: int = 3):
        super().__init__()
        self.channels = channels
        self.in_channels = in_channels
        self.freqs = sinusoid_frequencies(channels, in_channels)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        n, d = positions.shape
        if d != self.in_channels:
            raise ValueError(f"expected {self.in_channels} position coordinates, got {d}")
        phase = torch.outer(positions.reshape(-1).float(), self.freqs.to(positions.device))
        embed = torch.cat([phase.sin(), phase.cos()], dim=-1).reshape(n, -1)
        return F.pad(embed, (0, self.channels - embed.shape[1]))


class TimestepEmbedder(nn.Module):
    """Flow time t (scaled to 0..1000 by the samplers) -> [B, hidden_size] through a 2-layer MLP
    on a [cos | sin] embedding of `frequency_embedding_size` channels."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        phase = t[:, None].float() * freqs[None]
        embed = torch.cat([phase.cos(), phase.sin()], dim=-1)
        return F.pad(embed, (0, dim % 2))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        embed = self.sinusoid(t, self.frequency_embedding_size)
        return self.mlp(embed.to(self.mlp[0].weight.dtype))


class FeedForwardNet(nn.Module):
    """Linear -> GELU(tanh) -> Linear, hidden width channels * mlp_ratio. [..., C] -> [..., C]."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)
