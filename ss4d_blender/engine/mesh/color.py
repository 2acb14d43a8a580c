"""Colour conversions used when meshes get vertex colours."""
from __future__ import annotations

import torch

#: degree-0 spherical harmonic constant (SH DC coefficient -> colour: 0.5 + SH_C0 * f_dc)
SH_C0 = 0.28209479177387814


def srgb_to_linear(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB-encoded values in 0..1 -> linear 0..1 (IEC 61966-2-1 transfer curve).

    The models predict colours in image (sRGB) space; ``engine.types.Mesh`` stores linear colours."""
    rgb = rgb.clamp(0.0, 1.0)
    return torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)


def sh_dc_to_rgb(features_dc: torch.Tensor) -> torch.Tensor:
    """SH degree-0 coefficients [..., 3] -> colour in image space (not clamped)."""
    return 0.5 + SH_C0 * features_dc
