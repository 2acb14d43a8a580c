"""Models from checkpoint files: `{name}.json` (`{"name": <class>, "args": {...}}`) + `{name}.safetensors`,
the layout of the official SS4D / TRELLIS repositories.

Loading is strict: every key of the file must be a parameter or buffer of the module and vice versa, with
the same shape; otherwise a `WeightsError` names the key and the file. Only safetensors are read (never
pickles). Precision is chosen here (fp32 / fp16 / bf16): the transformer bodies run in it, norms compute in
float32 inside the modules.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from .errors import WeightsError

# reference class name (as found in the json) -> "module:Class" under engine.models, imported when used
MODEL_CLASSES: dict[str, str] = {
    "SparseStructureFlow4DModel": "sparse_structure_flow_4d:SparseStructureFlow4DModel",
    "SparseStructureDecoder": "sparse_structure_decoder:SparseStructureDecoder",
    "SLatFlow4DModel": "slat_flow_4d:SLatFlow4DModel",
    "SLatGaussianDecoder": "slat_gaussian_decoder_4d:SLatGaussianDecoder",
    "SLatMeshDecoder": "slat_mesh_decoder:SLatMeshDecoder",
    # TRELLIS's training configs name the decoders' memory-elastic subclasses (same parameters)
    "ElasticSLatGaussianDecoder": "slat_gaussian_decoder_4d:SLatGaussianDecoder",
    "ElasticSLatMeshDecoder": "slat_mesh_decoder:SLatMeshDecoder",
}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def model_class(name: str) -> type:
    if name not in MODEL_CLASSES:
        raise WeightsError(f"Unknown model class {name!r} (known: {', '.join(MODEL_CLASSES)}).")
    module, cls = MODEL_CLASSES[name].split(":")
    return getattr(importlib.import_module(f"{__package__}.models.{module}"), cls)


def build_model(config: dict, device: Union[str, torch.device] = "cpu") -> nn.Module:
    """{"name", "args"} -> module with uninitialised/random weights (use device="meta" to only inspect)."""
    cls = model_class(config["name"])
    try:
        with torch.device(device):
            return cls(**config.get("args", {}))
    except TypeError as err:  # an argument the class does not know
        raise WeightsError(f"{config['name']}: configuration not understood ({err}).") from err


def checkpoint_paths(path: Union[str, Path]) -> tuple[Path, Path]:
    """'ckpts/name', 'ckpts/name.json' or 'ckpts/name.safetensors' -> (json, safetensors)."""
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".json"), p.with_name(p.name + ".safetensors")


def read_config(json_path: Path) -> dict:
    if not json_path.is_file():
        raise WeightsError(f"Missing model file {json_path}. Download the weights again (Preferences > "
                           f"Download weights, or `python -m ss4d_blender.engine generate` with network access).")
    try:
        config = json.loads(json_path.read_text())
    except (OSError, ValueError) as err:
        raise WeightsError(f"Model file {json_path} is not valid JSON ({err}); download it again.") from err
    if "name" not in config:
        raise WeightsError(f"Model file {json_path} has no 'name' of a model class.")
    return config


def read_state_dict(weights_path: Path, device: Union[str, torch.device] = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not weights_path.is_file():
        raise WeightsError(f"Missing weights file {weights_path}. Download the weights again (Preferences > "
                           f"Download weights, or run with network access once).")
    try:
        return load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"Weights file {weights_path} is damaged or incomplete ({err}); delete it and "
                           f"download it again.") from err


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], source: Union[str, Path]) -> None:
    """Raises WeightsError naming the first missing / unexpected / wrongly shaped key and the file."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise WeightsError(f"{source}: missing key '{missing[0]}'"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                           + ". These weights do not belong to this model; check the weights source.")
    if unexpected:
        raise WeightsError(f"{source}: unexpected key '{unexpected[0]}'"
                           + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                           + ". These weights do not belong to this model; check the weights source.")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise WeightsError(f"{source}: key '{k}' has shape {tuple(v.shape)}, the model expects "
                               f"{tuple(expected[k].shape)}. Check the weights source.")


def _norm_modules() -> tuple[type, ...]:
    from .nn.layers import MultiHeadRMSNorm

    return (nn.LayerNorm, nn.GroupNorm, MultiHeadRMSNorm)


def precision_dtype(precision: Union[str, torch.dtype]) -> torch.dtype:
    """"fp32" | "fp16" | "bf16" (or the torch dtype itself) -> torch dtype."""
    if isinstance(precision, torch.dtype) and precision in DTYPES.values():
        return precision
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    return DTYPES[precision]


def cast_precision(module: nn.Module, precision: Union[str, torch.dtype]) -> nn.Module:
    """fp32: everything float32. fp16 / bf16: the parameters of every layer except the normalisation
    layers (LayerNorm / GroupNorm / per-head RMS norm, which compute in float32 as in the reference) move
    to that dtype. Buffers (fixed tables: position embeddings, Gaussian offsets) stay float32; the models
    cast them where they are used."""
    dtype = precision_dtype(precision)
    module.float()
    if dtype == torch.float32:
        return module
    norms = _norm_modules()
    for sub in module.modules():
        if isinstance(sub, norms):
            continue
        for p in sub.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    return module


class _NoInit:
    """Context in which modules are constructed without random initialisation (the weights are about
    to be overwritten by the checkpoint; initialising ~1B parameters would cost seconds)."""

    _inits = ("uniform_", "normal_", "xavier_uniform_", "xavier_normal_", "constant_", "zeros_", "ones_",
              "kaiming_uniform_", "kaiming_normal_", "trunc_normal_")
    _modules = (nn.Linear, nn.Conv3d, nn.LayerNorm, nn.GroupNorm)

    def __enter__(self):
        self._saved = [(nn.init, n, getattr(nn.init, n)) for n in self._inits]
        self._saved += [(m, "reset_parameters", m.reset_parameters) for m in self._modules]
        for n in self._inits:
            setattr(nn.init, n, lambda tensor, *a, **k: tensor)
        for m in self._modules:
            m.reset_parameters = lambda self: None
        return self

    def __exit__(self, *exc):
        for owner, name, value in self._saved:
            setattr(owner, name, value)


def load_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
               precision: Union[str, torch.dtype] = "fp32", config: Optional[dict] = None) -> nn.Module:
    """Loads `{path}.json` + `{path}.safetensors` strictly (path with or without either extension);
    returns the module in eval mode on `device`, its layers in `precision` (norms in float32).

    The module is built on the CPU without initialisation, takes the file's tensors as its own (no copy),
    is cast, then moved: peak host memory is about one copy of the weights."""
    json_path, weights_path = checkpoint_paths(path)
    config = config if config is not None else read_config(json_path)
    dtype = precision_dtype(precision)
    cls = model_class(config["name"])
    state = read_state_dict(weights_path)
    try:
        with _NoInit(), torch.device("cpu"):
            module = cls(**config.get("args", {}))
    except TypeError as err:
        raise WeightsError(f"{json_path}: configuration not understood ({err}).") from err
    check_state_dict(module, state, weights_path)
    module.load_state_dict(state, strict=True, assign=True)
    return cast_precision(module, dtype).to(device).eval()
