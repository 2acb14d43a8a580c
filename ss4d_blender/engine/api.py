"""The engine's high-level API, used by the command line, the worker process of the add-on and tests.

    generate(frames_rgba, settings, progress) -> GenerationResult    (the model stages)
    animate(result, ...) -> AnimatedMesh                                (one mesh through all frames)

Stages report through `Progress.update(stage, fraction)` with the stage names in `STAGES`; a cancel from
another thread stops at the next step. Errors are `engine.errors.*` with messages an artist can act on.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from . import hub
from .background import DEFAULT_QUALITY
from .errors import InputError, SS4DError
from .memory import default_precision, out_of_memory_as_error, pick_device, should_offload
from .mesh.cleanup import MIN_COMPONENT_FRACTION
from .pipeline import LatentSample, PipelineSpec, SamplingOptions, SS4DPipeline, StructureSample
from .preprocess import check_frames, crop_box, pad_to_even, preprocess_frames
from .progress import Progress
from .result import GenerationResult, load_result  # noqa: F401 - re-exported
from .sparse import SparseTensor
from .types import AnimatedMesh
from .windows import (FrameFile, StoredFrames, WindowCache, WindowRecord, check_window_settings, frames_digest,
                      known_frames, plan_windows, settings_key, window_seed)

STAGES = ("Removing background", "Loading models", "Encoding frames", "Sampling structure", "Sampling latents",
          "Decoding", "Meshing", "Cleaning meshes", "Registering")


@dataclass
class GenerateSettings:
    pipeline: str = hub.SS4D_REPO          # hub repo id, or a local folder in the official layout
    revision: Optional[str] = None         # None = the pinned default of known repos
    mesh_decoder: Optional[str] = "auto"   # "auto" (pipeline's own, else TRELLIS), repo/folder; None = from Gaussians
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
    window: int = 32                       # frames per window: even, 32 = the length the model was trained on
    overlap: int = 8                       # frames a window shares with the one before (even, below window)
    step: int = 1                          # use every step-th input frame (2 = every other frame)
    matting: str = "alpha"                 # alpha (the frames' own) | learned (BiRefNet) | auto (alpha if present)
    matting_quality: str = DEFAULT_QUALITY  # learned matting: best (BiRefNet) | fast (BiRefNet_lite)
    matting_model: Optional[str] = None    # learned matting weights: repo/folder/file; None = the pipeline's, else
                                           # the released model for matting_quality

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


def _mesh_decoder_path(spec: PipelineSpec, settings: GenerateSettings,
                       pipeline_json: dict) -> tuple[Optional[Path], str]:
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
             progress: Optional[Progress] = None, window_cache: Optional[Union[str, Path]] = None,
             frame_numbers: Optional[list] = None) -> GenerationResult:
    """frames_rgba: uint8 [T, H, W, 4] sRGB with straight alpha, T >= 2; with `settings.matting` "learned"
    (or "auto" on frames without usable alpha) uint8 [T, H, W, 3|4], whose background is removed first
    (stage "Removing background"). frame_numbers: how messages name the frames (default: counted from 0).

    Every `settings.step`-th frame is used. A clip longer than `settings.window` runs as overlapping windows
    (`engine.windows`), each continuing the one before; progress stages then read "Window 2 of 8 · Sampling
    structure". window_cache: a folder for finished windows. With it, every window's frames go to disk as
    soon as it is done (the result's Gaussians and meshes are read back one frame at a time), and a run with
    the same settings and frames resumes after the last finished window, e.g. after a cancel."""
    progress = progress or Progress()
    started = time.perf_counter()
    # 1. Check the inputs, before any weights are loaded; remove the background when asked
    if settings.matting == "alpha":
        check_frames(frames_rgba)
    check_window_settings(settings.window, settings.overlap, settings.step)
    clip, matting, warnings = _matted_clip(frames_rgba, settings, progress, frame_numbers)
    check_frames(clip)
    box = crop_box(clip[..., 3])  # an empty alpha fails here, before any weights are loaded; one box for all windows
    # 2. Plan the windows and load the pipeline
    plan = plan_windows(clip.shape[0], settings.window, settings.overlap)
    run = _WindowRun.start(settings, progress, box, plan)
    cache = None
    if window_cache is not None and len(plan) > 1:
        cache = WindowCache(window_cache, settings_key(asdict(settings), clip.shape[0], clip.shape[1:]))
    # 3. Generate each window (`_WindowRun.window`), or read it back from the window cache
    records, gaussians, meshes = [], [], []
    with torch.inference_mode():
        previous = None
        for k, (start, stop) in enumerate(plan):
            digest = frames_digest(clip[start:stop])
            record = cache.load(k, digest) if cache is not None else None
            if record is None:
                record = run.window(k, clip[start:stop], previous, digest)
                if cache is not None:
                    cache.save(record)
            if cache is not None:      # the frames stay on disk; the next window needs only the arrays
                stored = FrameFile(cache.path(k))
                record.gaussians, record.meshes = stored.gaussians(), stored.meshes()
            gaussians.append(record.gaussians)
            meshes.append(record.meshes)
            records.append(_without_frames(record))
            previous = record
    # 4. All windows' new frames as one result
    return run.result(records, gaussians, meshes, clip.shape[0], started, matting, warnings)


def _matted_clip(frames: np.ndarray, settings: GenerateSettings, progress: Progress,
                 frame_numbers: Optional[list]) -> tuple[np.ndarray, dict, list]:
    """Every `settings.step`-th frame, matted as the settings say (`background.matte_clip`): (RGBA frames,
    the matting used, its warnings)."""
    from .background import matte_clip

    if not isinstance(frames, np.ndarray) or frames.ndim != 4:
        return frames, {}, []          # check_frames names the problem
    if frame_numbers is None and settings.step > 1:
        frame_numbers = list(range(frames.shape[0]))
    numbers = list(frame_numbers)[::settings.step] if frame_numbers is not None else None
    return matte_clip(frames[::settings.step], settings.matting, progress, quality=settings.matting_quality,
                      model_source=settings.matting_model, pipeline=settings.pipeline, device=settings.device,
                      precision=settings.precision, cache_dir=settings.cache_dir, frame_numbers=numbers)


def _without_frames(record: WindowRecord) -> WindowRecord:
    """The record with its window-sized arrays dropped, keeping the new frames' coords and latents."""
    rows = record.new_rows()
    coords = record.coords[rows].copy()
    coords[:, 0] += record.start
    return replace(record, structure_latent=None, structure_noise=None, latents=None, latent_noise=None,
                   coords=coords, slat_feats=record.slat_feats, gaussians=[], meshes=[])


@dataclass
class _WindowRun:
    """What every window of one `generate` call shares: the loaded pipeline, the crop box, the plan."""

    settings: GenerateSettings
    progress: Progress
    box: tuple
    plan: list
    pipe: SS4DPipeline
    options: SamplingOptions
    encoder_folder: Path
    info: dict

    @classmethod
    def start(cls, settings: GenerateSettings, progress: Progress, box: tuple, plan: list) -> "_WindowRun":
        import json

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
        encoder_folder, _ = _image_encoder_folder(spec, settings, progress)
        info = dict(pipeline_revision=revision, mesh_decoder_source=mesh_source, device=str(device),
                    precision=precision, offload=offload)
        return cls(settings, progress, box, plan, pipe, options, encoder_folder, info)

    def report(self, index: int):
        """progress(stage, fraction) of window `index`: plain stage names when the clip is one window."""
        prefix = f"Window {index + 1} of {len(self.plan)} · " if len(self.plan) > 1 else ""
        return lambda stage, fraction: self.progress.update(prefix + stage, fraction)

    def encode(self, frames: np.ndarray, report) -> torch.Tensor:
        """The window's own frames -> DINOv2 conditioning [T, L, C]."""
        from .models.dinov2 import image_condition, load_dinov2

        device = self.pipe.device
        with out_of_memory_as_error("Encoding frames", device):
            report("Encoding frames", 0.0)
            images, _ = preprocess_frames(frames, box=self.box)
            encoder = load_dinov2(self.encoder_folder, device=device, precision=self.pipe.precision)
            cond = torch.cat([image_condition(encoder, images[i:i + 8].to(device)) for i in range(0, len(images), 8)])
            del encoder
            report("Encoding frames", 1.0)
        return cond

    def window(self, index: int, frames: np.ndarray, previous: Optional[WindowRecord], digest: str) -> WindowRecord:
        """Generates window `index` (frames: its uint8 frames); its first frames continue `previous`."""
        start, stop = self.plan[index]
        known = known_frames(self.plan, index)
        report = self.report(index)
        frames, count = pad_to_even(frames)       # a one-window clip of odd length: the last frame repeated
        num_frames, device, pipe = frames.shape[0], self.pipe.device, self.pipe
        # 3.1 Encode the frames (DINOv2)
        cond = self.encode(frames, report)
        neg_cond = torch.zeros_like(cond)
        structure_known, latent_known = _continuation(previous, known, device)
        torch.manual_seed(window_seed(self.settings.seed, index))
        # 3.2 Sample the sparse structure of every frame
        with out_of_memory_as_error("Sampling structure", device):
            report("Sampling structure", 0.0)
            structure = pipe.sample_structure_frames(cond, neg_cond, num_frames, self.options, report, structure_known)
        counts = torch.bincount(structure.coords[:, 0].long(), minlength=num_frames)
        if (counts == 0).any():
            empty = [start + int(i) for i in torch.nonzero(counts == 0).flatten()]
            raise SS4DError(f"The model produced no geometry for frame(s) {empty}. Try another seed or check that "
                            f"the object is clearly visible.")
        # 3.3 Sample the structured latents on that structure
        with out_of_memory_as_error("Sampling latents", device):
            report("Sampling latents", 0.0)
            latents = pipe.sample_latent_frames(cond, neg_cond, structure.coords, num_frames, self.options, report,
                                                latent_known)
        # 3.4 Decode Gaussians and meshes, and clean the meshes (`decode`)
        slat = pipe.denormalise(latents)
        gaussians, meshes = self.decode(slat, num_frames, known, count, report)
        new = (latents.coords[:, 0] >= known) & (latents.coords[:, 0] < count)
        return WindowRecord(index, start, stop, start + known, digest,
                            structure_latent=structure.latent.cpu().numpy(),
                            structure_noise=structure.noise.cpu().numpy(),
                            coords=latents.coords.cpu().numpy().astype(np.int32),
                            latents=latents.feats.cpu().numpy(), latent_noise=latents.noise.cpu().numpy(),
                            slat_feats=slat.feats[new].float().cpu().numpy(), gaussians=gaussians, meshes=meshes)

    def decode(self, slat: SparseTensor, num_frames: int, first: int, count: int, report) -> tuple[list, list]:
        """Gaussians and cleaned meshes of the window's frames first..count-1 (the new, unpadded ones)."""
        from .mesh import clean_mesh, mesh_from_gaussians

        device, settings = self.pipe.device, self.settings
        with out_of_memory_as_error("Decoding", device):
            report("Decoding", 0.0)
            gaussians = [g.to_gaussian_set() for g in self.pipe.decode_gaussians(slat, num_frames, report)]
            gaussians = gaussians[first:count]
        with out_of_memory_as_error("Meshing", device):
            report("Meshing", 0.0)
            if self.pipe.mesh_decoder_path is not None:
                layout = slat.layout       # rows are grouped by frame: the new frames, without the padding
                rows = slice(layout[first].start, layout[count - 1].stop)
                coords = slat.coords[rows].clone()
                coords[:, 0] -= first
                raw = self.pipe.decode_meshes(SparseTensor(slat.feats[rows], coords), report)
            else:
                raw = []
                for i, g in enumerate(gaussians):
                    raw.append(mesh_from_gaussians(g))
                    report("Meshing", (i + 1) / len(gaussians))
        # CPU work that grows with the mesh (bench/decimation.py): reported, and cancellable, per frame
        meshes = []
        for i, m in enumerate(raw):
            report("Cleaning meshes", i / len(raw))
            meshes.append(clean_mesh(m, min_component_fraction=settings.min_component_fraction,
                                     fill_holes=settings.fill_holes, target_faces=settings.mesh_target_faces))
        report("Cleaning meshes", 1.0)
        return gaussians, meshes

    def result(self, records: list, gaussians: list, meshes: list, num_frames: int, started: float,
               matting: Optional[dict] = None, warnings: tuple = ()) -> GenerationResult:
        """All windows' new frames as one result (frames on disk stay there); `matting`: what removed the
        background (recorded in the settings), `warnings`: its warnings."""
        if all(isinstance(g, list) for g in gaussians):
            gaussians, meshes = [g for part in gaussians for g in part], [m for part in meshes for m in part]
        else:
            gaussians, meshes = StoredFrames.chain(gaussians), StoredFrames.chain(meshes)
        info = asdict(self.settings)
        info.update(self.info, frames_used=num_frames, padded_frame=num_frames % 2 == 1 and len(self.plan) == 1,
                    crop_box=list(self.box), windows=[[s, e] for s, e in self.plan],
                    seconds=round(time.perf_counter() - started, 2), **(matting or {}))
        return GenerationResult(num_frames=num_frames, coords=np.concatenate([r.coords for r in records]),
                                slat_feats=np.concatenate([r.slat_feats for r in records]), gaussians=gaussians,
                                meshes=meshes, settings=info, is_random_weights=self.pipe.spec.is_random_weights,
                                warnings=list(warnings))


def _continuation(previous: Optional[WindowRecord], known: int, device: torch.device):
    """(StructureSample, LatentSample) of the last `known` frames of the previous window, or (None, None)."""
    if previous is None:
        return None, None
    window = previous.stop - previous.start
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    structure = StructureSample(t(previous.coords), t(previous.structure_latent), t(previous.structure_noise))
    latents = LatentSample(t(previous.coords), t(previous.latents), t(previous.latent_noise))
    return structure.last_frames(known), latents.last_frames(known, window)


def animate(result: GenerationResult, *, target_vertices: int = 20000, reference_frame: Optional[int] = None,
            temporal_smoothing: float = 0.0, progress: Optional[Progress] = None, device: str = "cpu") -> AnimatedMesh:
    """One mesh through all frames of a result (non-rigid registration of the per-frame meshes)."""
    from .registration import register_sequence

    if len(result.meshes) < 2:
        raise InputError("At least 2 frames with geometry are needed to animate.")
    return register_sequence(result.meshes, reference_frame=reference_frame, target_vertices=target_vertices,
                             temporal_smoothing=temporal_smoothing, progress=progress, device=device,
                             gaussians=result.gaussians)
