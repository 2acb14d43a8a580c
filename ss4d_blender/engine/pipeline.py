"""The SS4D video-to-4D pipeline as explicit stages on plain data.

    frames [T,518,518] -> encode_frames -> cond [T, 1374, 1024]
    -> sample_structure (4D sparse-structure flow + decoder) -> coords int32 [N, 4] (frame, x, y, z)
    -> sample_latents (4D structured-latent flow, denormalised) -> SparseTensor [N, 8]
    -> decode_gaussians -> per-frame Gaussians;  decode_meshes -> per-frame meshes

A pipeline folder has the official layout: `pipeline.json` (models, sampler names/args/params,
`slat_normalization`) + `ckpts/{name}.json|.safetensors`. Random draws follow the reference: after
`torch.manual_seed(seed)`, `randn(T, 8, R, R, R)` for the structure, then `randn(N, 8)` for the latents,
both on the CPU, so a seed gives the reference's noise on every device.

Continuing a clip (`engine.windows`): both flow stages take the samples of the frames an earlier window
already made (`StructureSample` / `LatentSample` of those frames) and hold them fixed while the other
frames are sampled; those frames keep their occupancy, coordinates and latents exactly.

Memory: with `offload` each model is on the device only during its stage and freed afterwards.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from . import hub
from .errors import WeightsError
from .loading import load_model
from .models.sparse_structure_decoder import occupancy_to_coords
from .sampler import KnownFrames, make_sampler
from .sparse import SparseTensor
from .types import Mesh

# progress(stage, fraction)
ProgressFn = Optional[Callable[[str, float], None]]


@dataclass
class SamplerSpec:
    name: str
    args: dict
    params: dict


@dataclass
class PipelineSpec:
    """What pipeline.json says."""

    folder: Path
    models: dict                      # role -> checkpoint path relative to folder (without extension)
    structure_sampler: SamplerSpec
    latent_sampler: SamplerSpec
    latent_mean: list
    latent_std: list
    image_cond_model: str = "dinov2_vitl14_reg"
    is_random_weights: bool = False   # the tiny random-weight pipeline of tests / offline demos

    @classmethod
    def from_folder(cls, folder) -> "PipelineSpec":
        folder = Path(folder)
        args = hub.pipeline_args(folder)
        try:
            spec = cls(
                folder=folder,
                models=dict(args["models"]),
                structure_sampler=SamplerSpec(**args["sparse_structure_sampler"]),
                latent_sampler=SamplerSpec(**args["slat_sampler"]),
                latent_mean=list(args["slat_normalization"]["mean"]),
                latent_std=list(args["slat_normalization"]["std"]),
                image_cond_model=args.get("image_cond_model", "dinov2_vitl14_reg"),
                # tiny pipelines on disk may carry the flag as "tiny_random_weights"
                is_random_weights=bool(args.get("is_random_weights", args.get("tiny_random_weights", False))),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise hub.invalid_pipeline_json(folder, err) from err
        for role in ("sparse_structure_flow_model", "sparse_structure_decoder", "slat_flow_model", "slat_decoder_gs"):
            if role not in spec.models:
                raise WeightsError(f"{folder / 'pipeline.json'} lists no '{role}' model.")
        return spec


@dataclass
class SamplingOptions:
    """Overrides of pipeline.json's sampler params (None = keep)."""

    steps: Optional[int] = None
    structure_cfg: Optional[float] = None
    latent_cfg: Optional[float] = None

    def apply(self, params: dict, cfg: Optional[float]) -> dict:
        out = dict(params)
        if self.steps is not None:
            out["steps"] = int(self.steps)
        if cfg is not None:
            out["cfg_strength"] = float(cfg)
        return out


@dataclass
class StructureSample:
    """The structure stage's outcome for a run of frames: coords int32 [N, 4] (frame, x, y, z);
    latent / noise float32 [T, C, R, R, R] (the flow's sample and the noise it started from)."""

    coords: torch.Tensor
    latent: torch.Tensor
    noise: torch.Tensor

    def last_frames(self, count: int) -> "StructureSample":
        """The last `count` frames, renumbered from 0."""
        first = self.latent.shape[0] - count
        coords = self.coords[self.coords[:, 0] >= first].clone()
        coords[:, 0] -= first
        return StructureSample(coords, self.latent[first:], self.noise[first:])


@dataclass
class LatentSample:
    """The latent stage's outcome: coords int32 [N, 4]; feats / noise float32 [N, C] (the flow's normalised
    sample and its noise), rows grouped by frame."""

    coords: torch.Tensor
    feats: torch.Tensor
    noise: torch.Tensor

    def last_frames(self, count: int, num_frames: int) -> "LatentSample":
        first = num_frames - count
        rows = self.coords[:, 0] >= first
        coords = self.coords[rows].clone()
        coords[:, 0] -= first
        return LatentSample(coords, self.feats[rows], self.noise[rows])


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


@dataclass
class SS4DPipeline:
    spec: PipelineSpec
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    offload: bool = False
    mesh_decoder_path: Optional[Path] = None    # ckpt path (no extension) of TRELLIS's mesh decoder, or None
    _loaded: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- models
    def model(self, role: str) -> torch.nn.Module:
        if role not in self._loaded:
            if role == "slat_decoder_mesh":
                if self.mesh_decoder_path is None:
                    raise WeightsError("No mesh decoder configured.")
                path = self.mesh_decoder_path
            else:
                path = self.spec.folder / self.spec.models[role]
            self._loaded[role] = load_model(path, device=self.device, precision=self.precision)
        return self._loaded[role]

    def done_with(self, *roles: str) -> None:
        """End of a stage: with offloading, drop its models from the device."""
        if not self.offload:
            return
        for role in roles:
            self._loaded.pop(role, None)
        release_memory(self.device)

    # ---------------------------------------------------------------- stages
    def sample_structure(self, cond: torch.Tensor, neg_cond: torch.Tensor, num_frames: int,
                         options: SamplingOptions = SamplingOptions(), progress: ProgressFn = None) -> torch.Tensor:
        """cond / neg_cond [T, L, C] -> coords int32 [N, 4] (frame, x, y, z) at the decoder's resolution.
        Draws randn(T, C, R, R, R) from torch's default CPU generator."""
        return self.sample_structure_frames(cond, neg_cond, num_frames, options, progress).coords

    def sample_structure_frames(self, cond: torch.Tensor, neg_cond: torch.Tensor, num_frames: int,
                                options: SamplingOptions = SamplingOptions(), progress: ProgressFn = None,
                                known: Optional[StructureSample] = None) -> StructureSample:
        """As `sample_structure`, returning the sample and its noise too. known: the first K frames' sample
        (K = known.latent.shape[0]), held fixed; their noise replaces the first K of the T drawn, and their
        coords are returned unchanged (only the other frames are decoded)."""
        flow = self.model("sparse_structure_flow_model")
        r = flow.resolution
        noise = torch.randn(num_frames, flow.in_channels, r, r, r).to(self.device, torch.float32)
        held, k = None, 0
        if known is not None:
            k = known.latent.shape[0]
            noise[:k] = known.noise.to(noise)
            held = KnownFrames(torch.arange(k, device=self.device), known.latent.to(noise), noise[:k].clone())
        spec = self.spec.structure_sampler
        sampler = make_sampler(spec.name, spec.args)
        params = options.apply(spec.params, options.structure_cfg)
        report = (lambda i, n: progress("Sampling structure", i / n)) if progress else None
        z = sampler.sample(flow, noise, cond.to(self.device), neg_cond.to(self.device), num_frames=num_frames,
                           progress=report, known=held, **params).samples
        self.done_with("sparse_structure_flow_model")
        decoder = self.model("sparse_structure_decoder")
        with torch.no_grad():
            coords = occupancy_to_coords(decoder(z[k:]))
        self.done_with("sparse_structure_decoder")
        if known is not None:
            coords[:, 0] += k
            coords = torch.cat([known.coords.to(coords), coords])
        return StructureSample(coords, z.float(), noise)

    def sample_latents(self, cond: torch.Tensor, neg_cond: torch.Tensor, coords: torch.Tensor, num_frames: int,
                       options: SamplingOptions = SamplingOptions(), progress: ProgressFn = None) -> SparseTensor:
        """coords [N, 4] -> denormalised structured latents [N, 8] (same rows). Draws randn(N, 8)."""
        sample = self.sample_latent_frames(cond, neg_cond, coords, num_frames, options, progress)
        return self.denormalise(sample)

    def sample_latent_frames(self, cond: torch.Tensor, neg_cond: torch.Tensor, coords: torch.Tensor,
                             num_frames: int, options: SamplingOptions = SamplingOptions(),
                             progress: ProgressFn = None, known: Optional[LatentSample] = None) -> LatentSample:
        """As `sample_latents`, returning the normalised sample and its noise. known: the first frames'
        sample; `coords` must start with `known.coords` (as `sample_structure_frames` returns them), whose
        rows are held at `known.feats` with `known.noise`."""
        flow = self.model("slat_flow_model")
        noise = torch.randn(coords.shape[0], flow.in_channels).to(self.device, torch.float32)
        coords = coords.to(self.device).int()
        held = None
        if known is not None:
            n = known.coords.shape[0]
            if not torch.equal(coords[:n].cpu(), known.coords.cpu().int()):
                raise ValueError("coords must start with the known frames' coords")
            noise[:n] = known.noise.to(noise)
            held = KnownFrames(torch.arange(n, device=self.device), known.feats.to(noise), noise[:n].clone())
        spec = self.spec.latent_sampler
        sampler = make_sampler(spec.name, spec.args)
        params = options.apply(spec.params, options.latent_cfg)
        report = (lambda i, n: progress("Sampling latents", i / n)) if progress else None
        slat = sampler.sample(flow, SparseTensor(noise, coords), cond.to(self.device), neg_cond.to(self.device),
                              num_frames=num_frames, progress=report, known=held, **params).samples
        self.done_with("slat_flow_model")
        return LatentSample(coords, slat.feats.float(), noise)

    def denormalise(self, sample: LatentSample) -> SparseTensor:
        """Normalised latents -> the decoders' input: feats * std + mean (pipeline.json's slat_normalization)."""
        mean = torch.tensor(self.spec.latent_mean, device=self.device)[None]
        std = torch.tensor(self.spec.latent_std, device=self.device)[None]
        return SparseTensor(sample.feats * std + mean, sample.coords)

    def decode_gaussians(self, slat: SparseTensor, num_frames: int, progress: ProgressFn = None):
        """-> list of GaussianFrame (torch, on the device), one per frame."""
        decoder = self.model("slat_decoder_gs")
        with torch.no_grad():
            frames = decoder(slat, num_frames)
        self.done_with("slat_decoder_gs")
        if progress:
            progress("Decoding", 1.0)
        return frames

    def decode_meshes(self, slat: SparseTensor, progress: ProgressFn = None) -> list[Mesh]:
        """TRELLIS's mesh decoder, one frame at a time, then sparse FlexiCubes -> raw meshes."""
        from .mesh import mesh_from_decoder_features

        decoder = self.model("slat_decoder_mesh")
        meshes = []
        frames = slat.layout
        for i, rows in enumerate(frames):
            coords = slat.coords[rows].clone()
            coords[:, 0] = 0
            with torch.no_grad():
                out = decoder(SparseTensor(slat.feats[rows], coords))
            meshes.append(mesh_from_decoder_features(out.coords, out.feats.float(), resolution=4 * decoder.resolution))
            del out
            if progress:
                progress("Meshing", (i + 1) / len(frames))
        self.done_with("slat_decoder_mesh")
        return meshes

