"""DINOv2 ViT with register tokens (ViT-L/14 + 4 registers in SS4D): the image encoder.

    image [B, 3, H, W] (ImageNet-normalised) -> 14x14 patches -> Linear (as a strided conv)
    -> [cls | registers | patches] (+ position embedding on cls and patches) -> N x (pre-norm attention
    with layer scale, pre-norm MLP with layer scale) -> tokens [B, 1 + R + HW/196, C]

Parameter names are those of the Hugging Face checkpoint `facebook/dinov2-with-registers-large`
(`embeddings.*`, `encoder.layer.{i}.*`, `layernorm.*`), so its model.safetensors loads unchanged.
SS4D conditions on all tokens BEFORE the final norm, followed by a layer norm without affine
(`image_condition`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DinoV2Config:
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 14
    image_size: int = 518
    num_register_tokens: int = 4
    layer_norm_eps: float = 1e-6
    num_channels: int = 3

    @classmethod
    def from_dict(cls, d: dict) -> "DinoV2Config":
        if d.get("hidden_act", "gelu") != "gelu" or d.get("use_swiglu_ffn", False):
            raise WeightsError("Only the GELU-MLP DINOv2 variants (ViT-S/B/L with registers) are supported.")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def tiny_dinov2_config() -> DinoV2Config:
    """A small random-weight encoder for tests and the tiny pipeline."""
    return DinoV2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2.0,
                        image_size=518, num_register_tokens=4)


class PatchEmbeddings(nn.Module):
    def __init__(self, c: DinoV2Config):
        super().__init__()
        self.projection = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, (H/p)(W/p), C]."""
        return self.projection(x).flatten(2).transpose(1, 2)


class Embeddings(nn.Module):
    def __init__(self, c: DinoV2Config):
        super().__init__()
        self.patch_size = c.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, c.hidden_size))  # training only; kept for the checkpoint
        self.register_tokens = nn.Parameter(torch.zeros(1, c.num_register_tokens, c.hidden_size))
        grid = c.image_size // c.patch_size
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + grid * grid, c.hidden_size))
        self.patch_embeddings = PatchEmbeddings(c)

    def position_table(self, rows: int, cols: int) -> torch.Tensor:
        """[1, 1 + rows*cols, C]: the trained table, bicubically resized (antialiased) for other grids."""
        table = self.position_embeddings
        trained = int(round((table.shape[1] - 1) ** 0.5))
        if rows == trained and cols == trained:
            return table
        patches = table[:, 1:].reshape(1, trained, trained, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches.float(), size=(rows, cols), mode="bicubic", align_corners=False,
                                antialias=True).to(table.dtype)
        return torch.cat([table[:, :1], patches.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        B, _, H, W = pixels.shape
        patches = self.patch_embeddings(pixels.to(self.patch_embeddings.projection.weight.dtype))
        x = torch.cat([self.cls_token.expand(B, -1, -1), patches], dim=1)
        x = x + self.position_table(H // self.patch_size, W // self.patch_size)
        return torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)


class SelfAttention(nn.Module):
    def __init__(self, c: DinoV2Config):
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape

        def heads(t):
            return t.reshape(B, L, self.heads, C // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)))
        return out.transpose(1, 2).reshape(B, L, C)


class Attention(nn.Module):
    def __init__(self, c: DinoV2Config):
        super().__init__()
        self.attention = SelfAttention(c)
        self.output = nn.Module()
        self.output.dense = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.dense(self.attention(x))


class LayerScale(nn.Module):
    def __init__(self, c: DinoV2Config):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(c.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


class MLP(nn.Module):
    def __init__(self, c: DinoV2Config):
        super().__init__()
        hidden = int(c.hidden_size * c.mlp_ratio)
        self.fc1 = nn.Linear(c.hidden_size, hidden)
        self.fc2 = nn.Linear(hidden, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, c: DinoV2Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.attention = Attention(c)
        self.layer_scale1 = LayerScale(c)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = MLP(c)
        self.layer_scale2 = LayerScale(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class DinoV2WithRegisters(nn.Module):
    def __init__(self, config: DinoV2Config):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([Layer(config) for _ in range(config.num_hidden_layers)])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixels: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        """pixels [B, 3, H, W] ImageNet-normalised, H and W multiples of the patch size
        -> tokens [B, 1 + registers + (H/p)(W/p), C] (after the final norm unless final_norm=False)."""
        x = self.embeddings(pixels)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x) if final_norm else x


def image_condition(model: DinoV2WithRegisters, images: torch.Tensor) -> torch.Tensor:
    """SS4D's conditioning: images [B, 3, 518, 518] in 0..1 -> tokens before the final norm, layer-normed
    without affine: [B, 1374, C] float32."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=images.device)[:, None, None]
    with torch.no_grad():
        tokens = model((images - mean) / std, final_norm=False).float()
    return F.layer_norm(tokens, tokens.shape[-1:])


# newer transformers exports name the attention projections differently from the hub checkpoint
_RENAMED = {".attention.q_proj.": ".attention.attention.query.", ".attention.k_proj.": ".attention.attention.key.",
            ".attention.v_proj.": ".attention.attention.value.", ".attention.o_proj.": ".attention.output.dense."}


def checkpoint_key(key: str) -> str:
    """A state-dict key of either naming (and with or without a model-name prefix) -> ours."""
    if key.startswith("dinov2_with_registers."):
        key = key[len("dinov2_with_registers."):]
    for new, old in _RENAMED.items():
        key = key.replace(new, old)
    return key


def load_dinov2(folder: Union[str, Path], device: Union[str, torch.device] = "cpu",
                precision: str = "fp32") -> DinoV2WithRegisters:
    """A Hugging Face DINOv2-with-registers folder (config.json + model.safetensors) -> our module."""
    from ..loading import DTYPES, _NoInit, check_state_dict, read_state_dict

    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file():
        raise WeightsError(f"Missing image encoder file {config_path}. Download the weights again "
                           f"(facebook/dinov2-with-registers-large).")
    config = DinoV2Config.from_dict(json.loads(config_path.read_text()))
    state = read_state_dict(weights_path)
    state = {checkpoint_key(k): v for k, v in state.items()}
    with _NoInit(), torch.device(device):
        model = DinoV2WithRegisters(config)
    check_state_dict(model, state, weights_path)
    model.load_state_dict(state, strict=True)
    return model.to(DTYPES[precision]).eval()


def save_config(config: DinoV2Config, folder: Union[str, Path]) -> None:
    """Writes a Hugging Face style config.json (used by the tiny pipeline)."""
    d = {k: getattr(config, k) for k in config.__dataclass_fields__}
    d.update(model_type="dinov2_with_registers", hidden_act="gelu", architectures=["Dinov2WithRegistersModel"])
    (Path(folder) / "config.json").write_text(json.dumps(d, indent=2))
