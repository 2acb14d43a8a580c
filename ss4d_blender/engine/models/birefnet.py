"""BiRefNet: Bilateral Reference for High-Resolution Dichotomous Image Segmentation (Zheng et al., CAAI AIR
2024; code and weights MIT, github.com/ZhengPeng7/BiRefNet). Used here for background removal.

    image [B, 3, H, W] (ImageNet-normalised, H and W multiples of 32)
    encoder:  Swin-v1 on the image and on the image at half resolution ('cat' pyramid)
              -> x1..x4 at H/4..H/32, each [full | half resized] along channels
              -> context: x4 <- [x1, x2, x3 resized to x4's size | x4] along channels
              -> squeeze block (BasicDecBlk) back to x4's width
    decoder:  at every level, the image cut into a grid of patches stacked along channels (the patch size is
              the level's size) feeds a small conv branch whose output joins the level's features;
              BasicDecBlk (conv, BN, ReLU, ASPPDeformable, conv, BN), gated by the gradient-attention head,
              upsampled and added to the lateral 1x1 conv of the next encoder level
    output:   logits [B, 1, H, W]; alpha = sigmoid(logits)

Parameter and buffer names equal the reference's state dict (`bb.*`, `squeeze_module.*`, `decoder.*`), so the
released `model.safetensors` files load unchanged. The configuration is read from the checkpoint's shapes
(`config_from_state_dict`); nothing from the model hub is executed. Training-only heads
(`conv_ms_spvn_*`, `gdt_convs_pred_*`) are kept so the checkpoints load; inference does not run them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import WeightsError
from ..nn.deform_conv import deform_conv2d
from .dinov2 import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 - the normalisation BiRefNet's inputs use too

SIZE_MULTIPLE = 32  # input sides must be multiples of the encoder's coarsest stride

# how the image patches are stacked along channels for the decoder's image branches:
#   "einops":  channel = (c * grid_h + i) * grid_w + j   (`b c (hg h) (wg w) -> b (c hg wg) h w`, current reference)
#   "columns": channel = (j * grid_h + i) * 3 + c        (2024 code: patches column by column, colours innermost)
PATCH_CHANNEL_ORDERS = ("einops", "columns")

ASPP_KERNELS = (1, 3, 7)  # parallel deformable branches beside the 1x1 one
GRADIENT_CHANNELS = 16


@dataclass(frozen=True)
class BiRefNetConfig:
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    ipt_channels: Optional[tuple[int, int, int, int]] = None  # image-branch widths at x4..x1 (None: channels // 8)
    patch_channel_order: str = "einops"
    # decoder widths, as released; smaller only in random-weight test models
    dec_channels: int = 64  # inside every BasicDecBlk ('fixed')
    aspp_channels: int = 256  # each ASPP branch
    ipt_inter_channels: int = 64  # inside the image-patch branches

    def __post_init__(self):
        if self.patch_channel_order not in PATCH_CHANNEL_ORDERS:
            raise ValueError(f"patch_channel_order must be one of {PATCH_CHANNEL_ORDERS}, "
                             f"got {self.patch_channel_order!r}")

    @property
    def channels(self) -> list[int]:
        """Encoder widths at x4, x3, x2, x1, doubled by the 'cat' pyramid."""
        return [2 * self.embed_dim * 2 ** i for i in (3, 2, 1, 0)]

    @property
    def image_branch_channels(self) -> tuple[int, int, int, int]:
        return self.ipt_channels or tuple(c // 8 for c in self.channels)


SWIN_V1_L = BiRefNetConfig()  # ZhengPeng7/BiRefNet
SWIN_V1_T = BiRefNetConfig(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7)  # _lite
VARIANTS = {"swin_v1_l": SWIN_V1_L, "swin_v1_t": SWIN_V1_T}


def variant_name(config: BiRefNetConfig) -> str:
    """'swin_v1_l' / 'swin_v1_t' when the backbone is a released one, else 'custom'."""
    for name, known in VARIANTS.items():
        if replace(config, ipt_channels=None, patch_channel_order="einops") == known:
            return name
    return "custom"


# ----------------------------------------------------------------------------------------------------------
# Swin Transformer v1 backbone

class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def relative_position_index(window: int) -> torch.Tensor:
    """[N, N] index into the (2w-1)^2 bias table for every pair of tokens of a w x w window (N = w^2)."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return dy * (2 * window - 1) + dx


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads = heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, batch: int, shift_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x [batch * nW, N, C], shift_mask [nW, N, N] (0 / -inf) or None -> [batch * nW, N, C]."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # [bw, h, N, d]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, self.heads).permute(2, 0, 1).to(q.dtype)  # [h, N, N]
        if shift_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None])
        else:  # windows join the head axis so that one mask per window broadcasts over the batch
            windows = shift_mask.shape[0]
            mask = (bias[None] + shift_mask[:, None].to(q.dtype)).reshape(1, windows * self.heads, n, n)

            def fold(t):
                return t.reshape(batch, windows * self.heads, n, -1)

            out = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), attn_mask=mask)
            out = out.view(bw, self.heads, n, -1)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] (H, W multiples of window) -> [B * nW, window^2, C], windows row by row per image."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_merge(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `window_partition`: [B * nW, window^2, C] -> [B, H, W, C]."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shifted_window_mask(hp: int, wp: int, window: int, shift: int, device) -> torch.Tensor:
    """[nW, N, N]: 0 between tokens that were neighbours before the cyclic shift, -inf between tokens that
    the roll brought together from opposite borders (regions split at -window and -shift)."""
    def regions(size):
        idx = torch.arange(size, device=device)
        return (idx >= size - window).long() + (idx >= size - shift).long()

    label = (regions(hp)[:, None] * 3 + regions(wp)[None, :]).float()  # [Hp, Wp]
    label = window_partition(label[None, :, :, None], window)[..., 0]  # [nW, N]
    same = label[:, :, None] == label[:, None, :]
    return torch.zeros(same.shape, device=device).masked_fill(~same, float("-inf"))


class SwinBlock(nn.Module):
    """Pre-norm (shifted) window attention and MLP, each with a residual connection."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, h: int, w: int, shift_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x [B, H*W, C] -> [B, H*W, C]; the normalised map is zero-padded to whole windows (bottom/right)."""
        b, _, c = x.shape
        ws = self.window
        y = F.pad(self.norm1(x).view(b, h, w, c), (0, 0, 0, -w % ws, 0, -h % ws))
        hp, wp = y.shape[1:3]
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, ws), b, shift_mask if self.shift else None)
        y = window_merge(y, ws, hp, wp)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y[:, :h, :w].reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbourhoods -> one token: [B, H*W, C] -> [B, ceil(H/2)*ceil(W/2), 2C]."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c = x.shape
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, window: int, downsample: bool):
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList(SwinBlock(dim, heads, window, 0 if i % 2 == 0 else window // 2)
                                    for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """x [B, H*W, C] -> the stage's output [B, H*W, C] (before any downsampling)."""
        ws = self.window
        mask = shifted_window_mask(h + (-h % ws), w + (-w % ws), ws, ws // 2, x.device)
        for block in self.blocks:
            x = block(x, h, w, mask)
        return x


class PatchEmbed(nn.Module):
    """4x4 patches -> embed_dim channels, layer-normed: [B, 3, H, W] -> [B, C, H/4, W/4]."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, 4, stride=4)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, -x.shape[-1] % 4, 0, -x.shape[-2] % 4))
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SwinTransformer(nn.Module):
    """image [B, 3, H, W] -> 4 feature maps [B, C * 2^i, H / 2^(i+2), W / 2^(i+2)] (sizes rounded up)."""

    def __init__(self, c: BiRefNetConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(c.embed_dim)
        stages = len(c.depths)
        self.widths = [c.embed_dim * 2 ** i for i in range(stages)]
        self.layers = nn.ModuleList(SwinStage(self.widths[i], c.depths[i], c.num_heads[i], c.window_size,
                                              downsample=i < stages - 1) for i in range(stages))
        for i in range(stages):
            self.add_module(f"norm{i}", nn.LayerNorm(self.widths[i]))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(image)
        h, w = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)  # [B, H*W, C]
        outs = []
        for i, stage in enumerate(self.layers):
            x = stage(x, h, w)
            out = getattr(self, f"norm{i}")(x)
            outs.append(out.view(-1, h, w, self.widths[i]).permute(0, 3, 1, 2).contiguous())
            if stage.downsample is not None:
                x = stage.downsample(x, h, w)
                h, w = (h + 1) // 2, (w + 1) // 2
        return outs


# ----------------------------------------------------------------------------------------------------------
# decoder modules

def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize with align_corners=True, as everywhere in BiRefNet (identity at the same size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class DeformableConv2d(nn.Module):
    """Modulated deformable conv: offsets and a 0..2 modulation per tap are predicted by plain convs."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, padding: int):
        super().__init__()
        self.padding = padding
        self.offset_conv = nn.Conv2d(in_channels, 2 * kernel * kernel, kernel, padding=padding)
        self.modulator_conv = nn.Conv2d(in_channels, kernel * kernel, kernel, padding=padding)
        self.regular_conv = nn.Conv2d(in_channels, out_channels, kernel, padding=padding, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.offset_conv(x)  # [B, 2 k^2, H, W]
        modulation = 2 * torch.sigmoid(self.modulator_conv(x))  # [B, k^2, H, W]
        return deform_conv2d(x, offset, self.regular_conv.weight, self.regular_conv.bias, padding=self.padding,
                             mask=modulation)


class DeformableASPPBranch(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel: int):
        super().__init__()
        self.atrous_conv = DeformableConv2d(in_channels, out_channels, kernel, padding=kernel // 2)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.atrous_conv(x)))


class ASPPDeformable(nn.Module):
    """Atrous-spatial-pyramid pooling with deformable branches: a 1x1 branch, branches of kernel 1, 3 and 7,
    and the global average, concatenated and fused by a 1x1 conv. [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, channels: int, branch_channels: int):
        super().__init__()
        self.aspp1 = DeformableASPPBranch(channels, branch_channels, 1)
        self.aspp_deforms = nn.ModuleList(DeformableASPPBranch(channels, branch_channels, k) for k in ASPP_KERNELS)
        self.global_avg_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                             nn.Conv2d(channels, branch_channels, 1, bias=False),
                                             nn.BatchNorm2d(branch_channels), nn.ReLU())
        self.conv1 = nn.Conv2d(branch_channels * (2 + len(ASPP_KERNELS)), channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.aspp1(x)] + [branch(x) for branch in self.aspp_deforms]
        branches.append(self.global_avg_pool(x).expand_as(branches[0]))
        return F.relu(self.bn1(self.conv1(torch.cat(branches, dim=1))))


class BasicDecBlk(nn.Module):
    """conv 3x3 -> BN -> ReLU -> ASPPDeformable -> conv 3x3 -> BN: [B, in, H, W] -> [B, out, H, W]."""

    def __init__(self, in_channels: int, out_channels: int, inter_channels: int, aspp_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, inter_channels, 3, padding=1)
        self.bn_in = nn.BatchNorm2d(inter_channels)
        self.dec_att = ASPPDeformable(inter_channels, aspp_channels)
        self.conv_out = nn.Conv2d(inter_channels, out_channels, 3, padding=1)
        self.bn_out = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn_in(self.conv_in(x)))
        return self.bn_out(self.conv_out(self.dec_att(x)))


class LateralBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ImageBranch(nn.Module):
    """Two 3x3 convs on the stacked image patches (the reference's `SimpleConvs`)."""

    def __init__(self, in_channels: int, out_channels: int, inter_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, inter_channels, 3, padding=1)
        self.conv_out = nn.Conv2d(inter_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv1(x))


def image_patches(image: torch.Tensor, size: Sequence[int], order: str) -> torch.Tensor:
    """image [B, C, H, W] -> its (H/h) x (W/w) grid of h x w patches stacked along channels
    [B, C * gh * gw, h, w], (h, w) = size, in the given `PATCH_CHANNEL_ORDERS` order."""
    b, c, height, width = image.shape
    gh, gw = height // size[0], width // size[1]
    h, w = height // gh, width // gw
    grid = image.view(b, c, gh, h, gw, w)
    if order == "einops":
        grid = grid.permute(0, 1, 2, 4, 3, 5)  # [B, C, gh, gw, h, w]
    else:
        grid = grid.permute(0, 4, 2, 1, 3, 5)  # [B, gw, gh, C, h, w]
    return grid.reshape(b, c * gh * gw, h, w)


def gradient_head(in_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, GRADIENT_CHANNELS, 3, padding=1),
                         nn.BatchNorm2d(GRADIENT_CHANNELS), nn.ReLU())


def conv1x1_to_map(in_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, 1, 1))


class Decoder(nn.Module):
    """x4 (squeezed), x3, x2, x1 and the image -> logits at the image's size.

    Level n (4 = coarsest) joins the image patches' branch `ipt_blk{n+1}` to its input, runs
    `decoder_block{n}` and, for n >= 2, gates the result with sigmoid(gradient attention) before it is
    upsampled and added to `lateral_block{n}` of the next encoder level."""

    def __init__(self, c: BiRefNetConfig):
        super().__init__()
        self.patch_channel_order = c.patch_channel_order
        ch = c.channels  # x4, x3, x2, x1
        ipt = c.image_branch_channels
        grids = (32, 16, 8, 4, 1)  # patches per side at x4, x3, x2, x1 and the full image
        ipt_out = (ipt[0], ipt[0], ipt[1], ipt[2], ipt[3])
        for n, grid, width in zip((5, 4, 3, 2, 1), grids, ipt_out):
            self.add_module(f"ipt_blk{n}", ImageBranch(3 * grid * grid, width, c.ipt_inter_channels))
        dec_out = [ch[1], ch[2], ch[3], ch[3] // 2]
        for n, i in zip((4, 3, 2, 1), range(4)):
            self.add_module(f"decoder_block{n}", BasicDecBlk(ch[i] + ipt_out[i], dec_out[i], c.dec_channels,
                                                             c.aspp_channels))
        self.conv_out1 = conv1x1_to_map(dec_out[3] + ipt_out[4])
        for n, i in zip((4, 3, 2), range(3)):
            self.add_module(f"lateral_block{n}", LateralBlock(ch[i + 1], dec_out[i]))
        for n, i in zip((4, 3, 2), range(3)):
            self.add_module(f"conv_ms_spvn_{n}", nn.Conv2d(dec_out[i], 1, 1))  # training-only side outputs
            self.add_module(f"gdt_convs_{n}", gradient_head(dec_out[i]))
            self.add_module(f"gdt_convs_pred_{n}", conv1x1_to_map(GRADIENT_CHANNELS))  # training only
            self.add_module(f"gdt_convs_attn_{n}", conv1x1_to_map(GRADIENT_CHANNELS))

    def with_image(self, features: torch.Tensor, image: torch.Tensor, branch: int) -> torch.Tensor:
        """features [B, C, h, w] -> [B, C + branch width, h, w]: the image patches' branch joined."""
        size = features.shape[2:]
        patches = resize(image_patches(image, size, self.patch_channel_order), size)
        return torch.cat([features, getattr(self, f"ipt_blk{branch}")(patches)], dim=1)

    def gated(self, p: torch.Tensor, level: int) -> torch.Tensor:
        """p * sigmoid(gradient attention) at decoder level 4, 3 or 2."""
        attention = getattr(self, f"gdt_convs_attn_{level}")(getattr(self, f"gdt_convs_{level}")(p))
        return p * torch.sigmoid(attention)

    def forward(self, image: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor,
                x4: torch.Tensor) -> torch.Tensor:
        p = self.gated(self.decoder_block4(self.with_image(x4, image, 5)), 4)  # [B, ch1, H/32, W/32]
        p = resize(p, x3.shape[2:]) + self.lateral_block4(x3)
        p = self.gated(self.decoder_block3(self.with_image(p, image, 4)), 3)  # [B, ch2, H/16, W/16]
        p = resize(p, x2.shape[2:]) + self.lateral_block3(x2)
        p = self.gated(self.decoder_block2(self.with_image(p, image, 3)), 2)  # [B, ch3, H/8, W/8]
        p = resize(p, x1.shape[2:]) + self.lateral_block2(x1)
        p = self.decoder_block1(self.with_image(p, image, 2))  # [B, ch3/2, H/4, W/4]
        p = resize(p, image.shape[2:])
        return self.conv_out1(self.with_image(p, image, 1))  # [B, 1, H, W]


class BiRefNet(nn.Module):
    def __init__(self, config: BiRefNetConfig = SWIN_V1_L):
        super().__init__()
        self.config = config
        ch = config.channels
        self.bb = SwinTransformer(config)
        # x4 and the 3 context levels -> x4's width
        self.squeeze_module = nn.Sequential(BasicDecBlk(sum(ch), ch[0], config.dec_channels, config.aspp_channels))
        self.decoder = Decoder(config)

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """image [B, 3, H, W] -> [x1, x2, x3, x4]: backbone features of the image and of the image at half
        resolution, concatenated; x4 also has x1..x3 resized to its size in front (before the squeeze)."""
        half = resize(image, (image.shape[2] // 2, image.shape[3] // 2))
        features = [torch.cat([full, resize(coarse, full.shape[2:])], dim=1)
                    for full, coarse in zip(self.bb(image), self.bb(half))]
        x1, x2, x3, x4 = features
        context = [resize(x, x4.shape[2:]) for x in (x1, x2, x3)]
        return [x1, x2, x3, torch.cat(context + [x4], dim=1)]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image [B, 3, H, W] ImageNet-normalised, H and W multiples of 32 -> logits [B, 1, H, W]."""
        if image.shape[2] % SIZE_MULTIPLE or image.shape[3] % SIZE_MULTIPLE:
            raise ValueError(f"BiRefNet input sides must be multiples of {SIZE_MULTIPLE}, got {tuple(image.shape[2:])}")
        x1, x2, x3, x4 = self.encode(image)
        return self.decoder(image, x1, x2, x3, self.squeeze_module(x4))


# ----------------------------------------------------------------------------------------------------------
# configuration from checkpoint shapes, loading

def _shape(shapes: Mapping[str, Sequence[int]], key: str, source: str) -> tuple[int, ...]:
    if key not in shapes:
        raise WeightsError(f"{source}: no key '{key}'; this is not a BiRefNet (Swin-v1) checkpoint.")
    return tuple(shapes[key])


def config_from_state_dict(state: Mapping[str, object], patch_channel_order: str = "einops",
                           source: str = "checkpoint") -> BiRefNetConfig:
    """The configuration a BiRefNet state dict was made with, from its shapes alone. `state` maps keys to
    tensors or to shapes. The patch channel order cannot be seen in shapes and is passed through."""
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in state.items()}
    embed_dim = _shape(shapes, "bb.patch_embed.proj.weight", source)[0]
    depths, heads, windows = [], [], set()
    for i in range(4):
        blocks = {k.split(".")[4] for k in shapes if k.startswith(f"bb.layers.{i}.blocks.")}
        if not blocks:
            raise WeightsError(f"{source}: backbone stage {i} has no blocks; not a BiRefNet (Swin-v1) checkpoint.")
        depths.append(len(blocks))
        rows, n_heads = _shape(shapes, f"bb.layers.{i}.blocks.0.attn.relative_position_bias_table", source)
        heads.append(n_heads)
        side = math.isqrt(rows)
        if side * side != rows or side % 2 == 0:
            raise WeightsError(f"{source}: relative position table of stage {i} has {rows} rows, not (2w-1)^2.")
        windows.add((side + 1) // 2)
    if len(windows) != 1:
        raise WeightsError(f"{source}: stages use different window sizes {sorted(windows)}.")
    ipt = tuple(_shape(shapes, f"decoder.ipt_blk{n}.conv_out.weight", source)[0] for n in (5, 3, 2, 1))
    block = "decoder.decoder_block4."
    config = BiRefNetConfig(
        embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(heads), window_size=windows.pop(),
        ipt_channels=ipt, patch_channel_order=patch_channel_order,
        dec_channels=_shape(shapes, block + "conv_in.weight", source)[0],
        aspp_channels=_shape(shapes, block + "dec_att.aspp1.atrous_conv.regular_conv.weight", source)[0],
        ipt_inter_channels=_shape(shapes, "decoder.ipt_blk5.conv1.weight", source)[0])
    if ipt == tuple(c // 8 for c in config.channels):  # the current reference's widths
        config = replace(config, ipt_channels=None)
    return config


def build_birefnet(config: BiRefNetConfig, device: Union[str, torch.device] = "cpu") -> BiRefNet:
    """A BiRefNet with random weights in eval mode (device="meta" only to inspect shapes)."""
    with torch.device(device):
        model = BiRefNet(config)
    return model.eval()


def load_birefnet(state: Union[str, Path, Mapping[str, torch.Tensor]], device: Union[str, torch.device] = "cpu",
                  dtype: torch.dtype = torch.float32, patch_channel_order: str = "einops") -> BiRefNet:
    """A safetensors file (or a folder holding `model.safetensors`, or a state dict already read) -> BiRefNet
    in eval mode on `device` in `dtype`, its configuration read from the shapes. Loading is strict."""
    from ..loading import check_state_dict, read_state_dict

    source = "state dict"
    if not isinstance(state, Mapping):
        path = Path(state)
        path = path / "model.safetensors" if path.is_dir() else path
        source = str(path)
        state = read_state_dict(path)
    config = config_from_state_dict(state, patch_channel_order, source)
    model = build_birefnet(config, device="meta")
    check_state_dict(model, state, source)
    model.load_state_dict(dict(state), strict=True, assign=True)
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(dtype)
    return model.to(device).eval()
