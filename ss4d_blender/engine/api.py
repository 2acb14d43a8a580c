"""The engine's high-level API, used by the command line, the worker process of the add-on and tests.

    generate(frames_rgba, settings, progress) -> GenerationResult    (the model stages)
    animate(result, ...) -> AnimatedMesh                                (one mesh through all frames)

Stages report through `Progress.update(stage, fraction)` with the stage names in `STAGES`; a cancel from
another thread stops at the next step. Errors are `engine.errors.*` with messages an artist can act on.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import hub
from .errors import InputError, SS4DError
from .memory import default_precision, out_of_memory_as_error, pick_device, should_offload
from .mesh.cleanup import MIN_COMPONENT_FRACTION
from .pipeline import PipelineSpec, SamplingOptions, SS4DPipeline
from .preprocess import check_frames, crop_box, pad_to_even, preprocess_frames
from .progress import Progress
from .result import GenerationResult, load_result  # noqa: F401 - re-exported
from .sparse import SparseTensor
from .types import AnimatedMesh

STAGES = ("Loading models", "Encoding frames", "Sampling structure", "Sampling latents", "Decoding", "Meshing",
          "Cleaning meshes", "Registering")


@dataclass
class GenerateSettings:
    pipeline: str = hub.SS4D_REPO          # hub repo id, or a local folder in the official layout
    revision: Optional[str] = None         # None = the pinned default of known repos
    mesh_decoder: Optional[str] = "auto"   # "auto" (the pipeline's own, else TRELLIS), repo id / folder, None = from Gaussians
    cache_dir: Optional[str] = None        # None = the standard Hugging Face cache
    seed: int = 0
    steps: Optional[int] = None            # None = pipeline.json's sampler params (both stages)
    cfg: Optional[float] = None            # structure-stage guidance (None = pipeline.json)
    latent_cfg: Optional[float] = None     # latent-stage guidance (None = pipeline.json)
    device: str = "auto"                   # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"                # auto | fp32 | fp16 | bf16
    low_vram: Optional[bool] = None        # None = offload when GPU memory < 24 GB
    mesh_target_faces: Optional[int] = 200000   # decimate each frame's raw mesh to at most this
    min_component_fraction: float = MIN_COMPONENT_FRACTION   # drop floating parts smaller than this share
    fill_holes: bool = True

    @classmethod
    def from_user(cls, **given) -> "GenerateSettings":
        """Settings from what a user gave (command line, Blender panel, job file). Only what was set counts:
        None, "" and, for `steps` / `cfg` / `latent_cfg`, 0 mean "not given", so the field keeps its
        default above. `mesh_decoder="none"` means no mesh decoder (meshes from the Gaussians)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - names)
        if unknown:
            raise InputError(f"Unknown generation setting(s): {', '.join(unknown)}.")
        values = {}
        for name, value in given.items():
            if isinstance(value, str):
                value = value.strip()
            if value is None or value == "" or (name in ("steps", "cfg", "latent_cfg") and value == 0):
                continue
            if name == "mesh_decoder" and str(value).lower() == "none":
                value = None
            values[name] = value
        return cls(**values)


def _image_encoder_folder(spec: PipelineSpec, settings: GenerateSettings, progress: Progress) -> tuple[Path, str]:
    local = spec.folder / spec.image_cond_model
    if local.is_dir():
        return local, "local"
    return hub.resolve(hub.DINOV2_REPO, cache_dir=settings.cache_dir)


def _mesh_decoder_path(spec: PipelineSpec, settings: GenerateSettings, pipeline_json: dict) -> tuple[Optional[Path], str]:
    choice = settings.mesh_decoder
    if choice is None:
        return None, "none (meshes from the Gaussians)"
    if choice == "auto":
        own = pipeline_json.get("args", {}).get("mesh_decoder")
        if own:
            return spec.folder / own, "pipeline folder"
        choice = hub.TRELLIS_REPO
    folder, revision = hub.resolve(choice, cache_dir=settings.cache_dir)
    path = folder / hub.MESH_DECODER_CKPT
    if not path.with_name(path.name + ".json").is_file():
        candidates = sorted(folder.glob("**/*mesh*.json"))
        if not candidates:
            raise SS4DError(f"No mesh decoder checkpoint found in {folder}.")
        path = candidates[0].with_suffix("")
    return path, f"{choice}@{revision}"


def generate(frames_rgba: np.ndarray, settings: GenerateSettings = GenerateSettings(),
             progress: Optional[Progress] = None) -> GenerationResult:
    """frames_rgba: uint8 [T, H, W, 4] sRGB with straight alpha (matting already done), T >= 2."""
    import json

    from .mesh import clean_mesh, mesh_from_gaussians
    from .models.dinov2 import image_condition, load_dinov2

    progress = progress or Progress()
    started = time.perf_counter()
    check_frames(frames_rgba)
    crop_box(frames_rgba[..., 3])  # an empty alpha fails here, before any weights are loaded
    frames, count = pad_to_even(frames_rgba)
    device = pick_device(settings.device)
    precision = default_precision(device, settings.precision)
    offload = should_offload(device, settings.low_vram)

    progress.update("Loading models", 0.0)
    folder, revision = hub.resolve(settings.pipeline, settings.revision, settings.cache_dir)
    spec = PipelineSpec.from_folder(folder)
    pipeline_json = json.loads((folder / "pipeline.json").read_text())
    mesh_path, mesh_source = _mesh_decoder_path(spec, settings, pipeline_json)
    pipe = SS4DPipeline(spec, device=device, precision=precision, offload=offload, mesh_decoder_path=mesh_path)
    options = SamplingOptions(steps=settings.steps, structure_cfg=settings.cfg, latent_cfg=settings.latent_cfg)
    report = progress.update

    with torch.inference_mode():
        with out_of_memory_as_error("Encoding frames", device):
            progress.update("Encoding frames", 0.0)
            images, crop = preprocess_frames(frames)
            encoder_folder, _ = _image_encoder_folder(spec, settings, progress)
            encoder = load_dinov2(encoder_folder, device=device, precision=precision)
            cond = torch.cat([image_condition(encoder, images[i:i + 8].to(device)) for i in range(0, len(images), 8)])
            del encoder
            progress.update("Encoding frames", 1.0)
        neg_cond = torch.zeros_like(cond)
        num_frames = frames.shape[0]
        torch.manual_seed(settings.seed)
        with out_of_memory_as_error("Sampling structure", device):
            progress.update("Sampling structure", 0.0)
            coords = pipe.sample_structure(cond, neg_cond, num_frames, options, report)
        counts = torch.bincount(coords[:, 0].long(), minlength=num_frames)
        if (counts == 0).any():
            raise SS4DError(f"The model produced no geometry for frame(s) {torch.nonzero(counts == 0).flatten().tolist()}. "
                            f"Try another seed or check that the object is clearly visible.")
        with out_of_memory_as_error("Sampling latents", device):
            progress.update("Sampling latents", 0.0)
            slat = pipe.sample_latents(cond, neg_cond, coords, num_frames, options, report)
        with out_of_memory_as_error("Decoding", device):
            progress.update("Decoding", 0.0)
            gaussians = [g.to_gaussian_set() for g in pipe.decode_gaussians(slat, num_frames, report)][:count]
        with out_of_memory_as_error("Meshing", device):
            progress.update("Meshing", 0.0)
            if mesh_path is not None:
                prefix = slice(0, slat.layout[count - 1].stop)  # rows are grouped by frame: drop the padding frame
                raw = pipe.decode_meshes(SparseTensor(slat.feats[prefix], slat.coords[prefix]), report)
            else:
                raw = []
                for i, g in enumerate(gaussians):
                    raw.append(mesh_from_gaussians(g))
                    progress.update("Meshing", (i + 1) / len(gaussians))
        # CPU work, up to ~15 s a frame at 400k faces (bench/decimation.py): reported, and cancellable, per frame
        meshes = []
        for i, m in enumerate(raw):
            progress.update("Cleaning meshes", i / len(raw))
            meshes.append(clean_mesh(m, min_component_fraction=settings.min_component_fraction,
                                     fill_holes=settings.fill_holes, target_faces=settings.mesh_target_faces))
        progress.update("Cleaning meshes", 1.0)
    keep = coords[:, 0] < count
    info = asdict(settings)
    info.update(pipeline_revision=revision, mesh_decoder_source=mesh_source, device=str(device), precision=precision,
                offload=offload, frames_used=count, padded_frame=count != num_frames, crop_box=list(crop),
                seconds=round(time.perf_counter() - started, 2))
    return GenerationResult(num_frames=count, coords=coords[keep].cpu().numpy().astype(np.int32),
                            slat_feats=slat.feats[keep.to(slat.feats.device)].float().cpu().numpy(),
                            gaussians=gaussians, meshes=meshes, settings=info, is_random_weights=spec.is_random_weights)


def animate(result: GenerationResult, *, target_vertices: int = 20000, reference_frame: Optional[int] = None,
            temporal_smoothing: float = 0.0, progress: Optional[Progress] = None, device: str = "cpu") -> AnimatedMesh:
    """One mesh through all frames of a result (non-rigid registration of the per-frame meshes)."""
    from .registration import register_sequence

    if len(result.meshes) < 2:
        raise InputError("At least 2 frames with geometry are needed to animate.")
    return register_sequence(result.meshes, reference_frame=reference_frame, target_vertices=target_vertices,
                             temporal_smoothing=temporal_smoothing, progress=progress, device=device,
                             gaussians=result.gaussians)
