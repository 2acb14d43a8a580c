"""Learned background removal for ordinary video: BiRefNet (MIT code and weights) on every frame, then made
stable across frames (`matte_temporal`).

    remove_background(frames_rgb, model_source, quality, progress) -> MatteResult (RGBA frames, warnings, ...)

Weights: `ZhengPeng7/BiRefNet` (Swin-L, "best") or `ZhengPeng7/BiRefNet_lite` (Swin-T, "fast") from the
Hugging Face hub, only their `model.safetensors` (the repositories' Python files are never downloaded, let
alone run); a local folder holding `model.safetensors` or a `.safetensors` file; or the `birefnet/` folder
of a pipeline folder (`make-tiny-pipeline` writes a random-weight one there). The variant is read from the
checkpoint's shapes. Preprocessing is the reference's: RGB resized to 1024 x 1024 (bilinear, antialiased),
ImageNet mean / std; alpha = sigmoid of the last output, resized back to the frame (bilinear).

Torch is imported when a model is loaded, so the constants here can be read without it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .errors import DeviceOutOfMemory, InputError, WeightsError
from .hub import BIREFNET_LITE_REPO, BIREFNET_REPO, MATTING_FILES, PICKLE_SUFFIXES

MATTING_QUALITIES = {"best": BIREFNET_REPO, "fast": BIREFNET_LITE_REPO}
DEFAULT_QUALITY = "best"
PIPELINE_MATTING_FOLDER = "birefnet"  # a pipeline folder's own matting model: DIR/birefnet/model.safetensors
STAGE = "Removing background"
INPUT_SIZE = 1024  # the released models' input side
RANDOM_WEIGHTS_KEY = "is_random_weights"  # safetensors metadata of random-weight test models
INPUT_SIZE_KEY = "input_size"  # safetensors metadata: a test model's input side (released models: absent)
DEFAULT_BATCH = {"cuda": 4, "mps": 2, "cpu": 1}  # frames per model call


@dataclass
class MattingModel:
    model: object  # engine.models.birefnet.BiRefNet, in eval mode
    source: str  # repository id, folder or file it was loaded from
    revision: str  # commit hash, or "local"
    variant: str  # swin_v1_l | swin_v1_t | custom
    input_size: int = INPUT_SIZE
    is_random_weights: bool = False


@dataclass
class MatteResult:
    frames: np.ndarray  # uint8 [T, H, W, 4]: the source RGB with the stabilised alpha
    alpha_raw: np.ndarray  # float32 [T, H, W]: the model's alpha before the temporal steps
    source: str
    revision: str
    variant: str
    is_random_weights: bool
    warnings: list[str] = field(default_factory=list)


def source_has_alpha(frames: np.ndarray, min_transparent: float = 0.01) -> bool:
    """Whether frames uint8 [T, H, W, 3|4] carry usable alpha ("Automatic" matting picks it then, else the
    learned matte): a 4th channel that is transparent (< 128) in at least `min_transparent` of the pixels of
    some frame and opaque somewhere."""
    if frames.ndim != 4 or frames.shape[-1] != 4:
        return False
    alpha = frames[..., 3]
    transparent = (alpha < 128).reshape(len(frames), -1).mean(axis=1)
    return bool(transparent.max() >= min_transparent and (alpha >= 128).any())


MATTING_MODES = ("auto", "alpha", "learned", "chroma")


def resolve_matting_mode(mode: Optional[str], frames: np.ndarray) -> str:
    """"auto" (or None) -> "alpha" when the frames carry usable alpha (`source_has_alpha`), else "learned";
    the other modes are returned as given."""
    mode = mode or "auto"
    if mode not in MATTING_MODES:
        raise InputError(f"Matting must be one of {', '.join(MATTING_MODES)}, got {mode!r}.")
    if mode != "auto":
        return mode
    return "alpha" if source_has_alpha(frames) else "learned"


def matting_source(model: Optional[str] = None, quality: Optional[str] = None,
                   pipeline: Optional[str] = None) -> str:
    """Which weights to use: `model` when given; else the pipeline folder's own `birefnet/` when it has one;
    else the released repository for `quality` ("best" | "fast"; None: DEFAULT_QUALITY)."""
    quality = quality or DEFAULT_QUALITY
    if quality not in MATTING_QUALITIES:
        raise InputError(f"Matting quality must be one of {', '.join(MATTING_QUALITIES)}, got {quality!r}.")
    if model:
        return model
    if pipeline and (Path(pipeline).expanduser() / PIPELINE_MATTING_FOLDER / "model.safetensors").is_file():
        return str(Path(pipeline).expanduser() / PIPELINE_MATTING_FOLDER)
    return MATTING_QUALITIES[quality]


def resolve_matting_weights(source: str, revision: Optional[str] = None, cache_dir: Optional[str] = None,
                            progress_bars: bool = True) -> tuple[Path, str]:
    """A repository id, folder or `.safetensors` file -> (the `.safetensors` file, revision used).
    Downloads (resumable, progress bars, `HF_HUB_OFFLINE` honoured) through `hub.resolve`."""
    from .hub import resolve

    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise WeightsError(f"{path}: only .safetensors matting weights are read (never pickles).")
        return path, "local"
    folder, used = resolve(source, revision, cache_dir, allow_patterns=MATTING_FILES, progress=progress_bars)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
        if pickles:
            raise WeightsError(f"{folder} holds {pickles[0]} but no model.safetensors: only .safetensors is read "
                               f"(pickle checkpoints are never unpickled).")
        raise WeightsError(f"{weights} is missing: the matting model folder must hold BiRefNet's model.safetensors "
                           f"({BIREFNET_REPO} or {BIREFNET_LITE_REPO} on the Hugging Face hub).")
    return weights, used


def load_matting_model(source: str, device="cpu", precision: str = "auto", revision: Optional[str] = None,
                       cache_dir: Optional[str] = None, patch_channel_order: str = "einops",
                       progress_bars: bool = True) -> MattingModel:
    """Resolves and loads a BiRefNet (variant from the shapes) on `device`; precision "auto" is fp16 on
    GPUs and fp32 on the CPU."""
    import torch
    from safetensors import safe_open

    from .loading import precision_dtype
    from .memory import default_precision
    from .models.birefnet import load_birefnet, variant_name

    weights, used = resolve_matting_weights(source, revision, cache_dir, progress_bars)
    device = torch.device(device)
    dtype = precision_dtype(default_precision(device, precision))
    model = load_birefnet(weights, device=device, dtype=dtype, patch_channel_order=patch_channel_order)
    with safe_open(str(weights), "pt") as f:  # readable: load_birefnet has read it
        metadata = f.metadata() or {}
    return MattingModel(model, source, used, variant_name(model.config),
                        int(metadata.get(INPUT_SIZE_KEY, INPUT_SIZE)),
                        metadata.get(RANDOM_WEIGHTS_KEY, "false").lower() == "true")


def _predict_batch(matting: MattingModel, frames: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3+] -> alpha float32 [B, H, W] (the reference's pre- and postprocessing)."""
    import torch
    import torch.nn.functional as F

    from .models.birefnet import IMAGENET_MEAN, IMAGENET_STD

    model = matting.model
    weight = next(model.parameters())
    h, w = frames.shape[1:3]
    size = matting.input_size
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(frames[..., :3])).to(weight.device)
        x = x.permute(0, 3, 1, 2).float() / 255.0  # [B, 3, H, W]
        x = _resize_antialiased(x, size)  # [B, 3, size, size]
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        logits = model(((x - mean) / std).to(weight.dtype))  # [B, 1, size, size]
        alpha = torch.sigmoid(logits.float())
        alpha = F.interpolate(alpha, size=(h, w), mode="bilinear", align_corners=True)
    return alpha[:, 0].clamp(0, 1).cpu().numpy()


def _resize_antialiased(x, size: int):
    """Bilinear resize with antialiasing (as PIL, which the reference's transforms use) to size x size; on
    the CPU where the device has no antialiased kernel."""
    import torch.nn.functional as F

    try:
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    except (NotImplementedError, RuntimeError):
        if x.device.type == "cpu":
            raise
        return F.interpolate(x.cpu(), size=(size, size), mode="bilinear", align_corners=False,
                             antialias=True).to(x.device)


def predict_alpha(matting: MattingModel, frames_rgb: np.ndarray, batch_size: Optional[int] = None,
                  progress=None) -> np.ndarray:
    """frames uint8 [T, H, W, 3+] -> the model's alpha float32 [T, H, W], `batch_size` frames per call
    (default by device). `progress`: an engine `Progress` (updated per batch; cancel stops between
    batches). Out of accelerator memory, the batch is halved; at one frame it is a DeviceOutOfMemory."""
    from .memory import is_out_of_memory

    device = next(matting.model.parameters()).device
    batch = batch_size or DEFAULT_BATCH.get(device.type, 1)
    total = frames_rgb.shape[0]
    alpha = np.empty(frames_rgb.shape[:3], np.float32)
    start = 0
    while start < total:
        if progress is not None:
            progress.update(STAGE, start / total)
        end = min(total, start + batch)
        try:
            alpha[start:end] = _predict_batch(matting, frames_rgb[start:end])
        except Exception as err:  # noqa: BLE001 - re-raised unless it is an out-of-memory error
            if not is_out_of_memory(err):
                raise
            _release(device)
            if batch > 1:
                batch //= 2
                continue
            raise DeviceOutOfMemory(
                f"The {device.type.upper()} ran out of memory while {STAGE.lower()} (BiRefNet {matting.variant}, "
                f"one frame at a time). Use Fast matting quality (BiRefNet_lite), or the CPU.") from err
        start = end
    if progress is not None:
        progress.update(STAGE, 1.0)
    return alpha


def _release(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def remove_background(frames_rgb: np.ndarray, model_source: Optional[str] = None, quality: Optional[str] = None,
                      progress=None, *, pipeline: Optional[str] = None, device: str = "auto",
                      precision: str = "auto", batch_size: Optional[int] = None, revision: Optional[str] = None,
                      cache_dir: Optional[str] = None, frame_numbers: Optional[Sequence[int]] = None,
                      matting: Optional[MattingModel] = None) -> MatteResult:
    """The matting stage: frames uint8 [T, H, W, 3|4] (any alpha is ignored) -> MatteResult with RGBA frames.

    model_source: repository id, folder or file (default: `matting_source(None, quality, pipeline)`).
    quality: "best" (BiRefNet) | "fast" (BiRefNet_lite) | None (DEFAULT_QUALITY), used when no source is given.
    progress: an engine `Progress` ("Removing background", cancellable between batches).
    frame_numbers: how error messages name the frames (default: counted from 0).
    matting: an already loaded model (then the source arguments are ignored).
    Raises InputError naming the frames where no object is found; nothing is returned half-made."""
    from .matte_temporal import stabilise_alpha
    from .memory import pick_device

    if frames_rgb.ndim != 4 or frames_rgb.shape[-1] not in (3, 4) or frames_rgb.dtype != np.uint8:
        raise InputError("Background removal needs colour frames: uint8 [frames, height, width, 3 or 4].")
    if matting is None:
        source = matting_source(model_source, quality, pipeline)
        matting = load_matting_model(source, pick_device(device), precision, revision, cache_dir)
    raw = predict_alpha(matting, frames_rgb, batch_size, progress)
    alpha, warnings = stabilise_alpha(raw, frames_rgb, frame_numbers)
    rgba = np.empty(frames_rgb.shape[:3] + (4,), np.uint8)
    rgba[..., :3] = frames_rgb[..., :3]
    rgba[..., 3] = np.clip(alpha * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if matting.is_random_weights:
        warnings.insert(0, f"The matting model {matting.source} has RANDOM weights (a test model): its matte is "
                           f"noise.")
    return MatteResult(rgba, raw, matting.source, matting.revision, matting.variant, matting.is_random_weights,
                       warnings)


# ------------------------------------------------------------------------------ what is on disk (no network)
DOWNLOAD_MB = {BIREFNET_REPO: 885, BIREFNET_LITE_REPO: 180}  # size of each released model.safetensors (fp32)
QUALITY_LABELS = {"best": "Best", "fast": "Fast"}


def matting_weights_status(pipeline: Optional[str] = None, cache_dir: Optional[str] = None
                           ) -> list[tuple[str, bool, str]]:
    """(quality, ready, line) for each learned matting model, from the files on disk only (no network, no
    huggingface_hub: Blender's own Python reads it for the preferences): the released models in the hub
    cache, and first a local pipeline folder's own birefnet/ (quality "pipeline"), which Learned then uses."""
    from .hub import cached_snapshot

    rows = []
    own = Path(pipeline).expanduser() / PIPELINE_MATTING_FOLDER / "model.safetensors" if pipeline else None
    if own is not None and own.is_file():
        rows.append(("pipeline", True, f"Pipeline folder's own model: {own.parent} (used by Learned)"))
    for quality, repo in MATTING_QUALITIES.items():
        snapshot = cached_snapshot(repo, None, cache_dir)
        weights = snapshot / "model.safetensors" if snapshot is not None else None
        label = f"{QUALITY_LABELS[quality]}: {repo}"
        if weights is not None and weights.is_file():
            size = weights.stat().st_size / 2 ** 20
            rows.append((quality, True, f"{label} downloaded, {size:.0f} MB (commit {snapshot.name[:7]})"))
        else:
            rows.append((quality, False, f"{label} not downloaded (about {DOWNLOAD_MB[repo]} MB)"))
    return rows


# ------------------------------------------------------------------------------ the matting step of generation
ENGINE_MATTING_MODES = ("auto", "alpha", "learned")  # chroma keying happens before the engine (Blender side)


def matte_clip(frames: np.ndarray, mode: Optional[str] = "auto", progress=None, *, quality: Optional[str] = None,
               model_source: Optional[str] = None, pipeline: Optional[str] = None, device: str = "auto",
               precision: str = "auto", cache_dir: Optional[str] = None,
               frame_numbers: Optional[Sequence[int]] = None) -> tuple[np.ndarray, dict, list[str]]:
    """The matting step of generation: frames uint8 [T, H, W, 3|4] -> (RGBA frames, what was used, warnings).

    mode "alpha": the frames' own alpha, with an object in every frame; "learned": BiRefNet
    (`remove_background`, stage "Removing background"); "auto" / None: alpha when the frames carry it
    (`source_has_alpha`), else learned. What was used: {"matting": "alpha" | "learned"} and, when learned,
    the model's source, revision and variant. Frames that are not uint8 [T, H, W, 3|4] are returned as
    they are, for the caller's own checks to name the problem."""
    if mode not in (None,) + ENGINE_MATTING_MODES:
        raise InputError(f"The engine's matting is one of {', '.join(ENGINE_MATTING_MODES)}, got {mode!r}; a "
                         f"green or blue screen is keyed by `python -m ss4d_blender generate VIDEO --matting chroma`.")
    well_formed = (isinstance(frames, np.ndarray) and frames.ndim == 4 and frames.shape[-1] in (3, 4)
                   and frames.dtype == np.uint8 and frames.shape[0] >= 2)
    if not well_formed:
        return frames, {"matting": mode or "auto"}, []
    from .matte_temporal import check_object_in_every_frame

    if resolve_matting_mode(mode, frames) == "alpha":
        if frames.shape[-1] == 4 and frames[..., 3].any():  # an alpha empty everywhere: the crop names it
            check_object_in_every_frame(frames[..., 3] > 127, frame_numbers, what="the source's alpha")
        return frames, {"matting": "alpha"}, []
    result = remove_background(frames, model_source, quality, progress, pipeline=pipeline, device=device,
                               precision=precision, cache_dir=cache_dir, frame_numbers=frame_numbers)
    used = {"matting": "learned", "matting_source": result.source, "matting_revision": result.revision,
            "matting_variant": result.variant}
    return result.frames, used, list(result.warnings)


# ------------------------------------------------------------------------------ tiny random-weight model
TINY_INPUT_SIZE = 256


def tiny_birefnet_config():
    """A BiRefNet small in bytes (~1 MB in fp16) with the released structure: tiny Swin, narrow decoder."""
    from .models.birefnet import BiRefNetConfig

    return BiRefNetConfig(embed_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), window_size=4,
                          dec_channels=8, aspp_channels=8, ipt_inter_channels=8)


def _calibration_image(size: int = TINY_INPUT_SIZE):
    """[1, 3, size, size] normalised: a bright disc on a darker vertical gradient."""
    import torch

    from .models.birefnet import IMAGENET_MEAN, IMAGENET_STD

    ramp = torch.linspace(0.2, 0.5, size)
    yy, xx = torch.meshgrid(ramp, ramp, indexing="ij")
    disc = ((yy - 0.35) ** 2 + (xx - 0.35) ** 2 < 0.01).float()
    image = torch.stack([yy, yy * 0.8 + 0.1, xx]) * (1 - disc) + disc * torch.tensor([0.9, 0.7, 0.4])[:, None, None]
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((image - mean) / std)[None]


def _calibrate_tiny(model, foreground: float = 0.25, contrast: float = 4.0) -> None:
    """Rescales the output layer of a random-weight model so that about `foreground` of the calibration
    image's pixels come out above 0.5, with logits spread over +-`contrast` (random weights would give a
    flat alpha near 0.45 everywhere)."""
    import torch

    with torch.no_grad():
        logits = model(_calibration_image()).flatten()
        threshold = torch.quantile(logits, 1 - foreground)
        scale = contrast / logits.std().clamp(min=1e-6)
        out = model.decoder.conv_out1[0]
        out.weight *= scale
        out.bias.copy_((out.bias - threshold) * scale)


def write_tiny_birefnet(folder: Union[str, Path], seed: int = 0) -> Path:
    """Writes a random-weight BiRefNet as `folder/model.safetensors` (fp16, marked `is_random_weights`,
    input side 256) and returns the file. Its matte is noise; it exercises the matting stage offline."""
    import torch
    from safetensors.torch import save_file

    from .models.birefnet import build_birefnet

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = build_birefnet(tiny_birefnet_config())
    finally:
        torch.random.set_rng_state(generator_state)
    _calibrate_tiny(model)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    path = folder / "model.safetensors"
    save_file(state, str(path), metadata={RANDOM_WEIGHTS_KEY: "true", INPUT_SIZE_KEY: str(TINY_INPUT_SIZE)})
    return path
