"""Shared pieces of the golden-fixture runners.

A runner module exposes `run(case_dir, config, manifest, io) -> list[Check]`; `verify_golden` picks the
runner for a case (see `RUNNERS` there) and reports the worst check per case.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Check:
    name: str
    max_abs: float
    rel_l2: float
    passed: bool
    note: str = ""


def errors(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs error, relative L2 error) in float64."""
    diff = ours.detach().double().cpu() - ref.detach().double().cpu()
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    return max_abs, float(diff.norm() / ref.double().norm().clamp(min=1e-30))


def tensor_check(name: str, ours: torch.Tensor, ref: torch.Tensor, tolerance: dict, note: str = "") -> Check:
    """Passes when both the max abs and (if the tolerance names one) the relative L2 error are within it."""
    if tuple(ours.shape) != tuple(ref.shape):
        return Check(name, float("inf"), float("inf"), False, f"shape {tuple(ours.shape)} vs {tuple(ref.shape)}")
    max_abs, rel = errors(ours, ref)
    ok = max_abs <= tolerance.get("max_abs", float("inf")) and rel <= tolerance.get("rel_l2", float("inf"))
    return Check(name, max_abs, rel, ok, note)


def coords_check(name: str, ours: torch.Tensor, ref: torch.Tensor) -> Check:
    """Exact equality; if only the row order differs it fails and says so."""
    ours, ref = ours.int().cpu(), ref.int().cpu()
    if ours.shape == ref.shape and torch.equal(ours, ref):
        return Check(name, 0.0, 0.0, True)
    note = f"{len(ours)} vs {len(ref)} rows"
    if ours.shape == ref.shape and torch.equal(torch.unique(ours, dim=0), torch.unique(ref, dim=0)):
        note = "same voxels, different row order"
    return Check(name, float("inf"), 0.0, False, note)


def coords_set_check(name: str, ours: torch.Tensor, ref: torch.Tensor) -> Check:
    """Same voxel set in any row order (for fixtures whose manifest allows it); the note says when the
    order differs. Duplicate rows count: both must hold the same multiset."""
    ours, ref = ours.int().cpu(), ref.int().cpu()
    if ours.shape != ref.shape:
        return Check(name, float("inf"), 0.0, False, f"{tuple(ours.shape)} vs {tuple(ref.shape)} coordinates")
    if torch.equal(ours, ref):
        return Check(name, 0.0, 0.0, True)
    same = torch.equal(_sorted_rows(ours), _sorted_rows(ref))
    return Check(name, 0.0 if same else float("inf"), 0.0, same,
                 "same voxels, different row order (compared as sets)" if same else "different voxel sets")


def lexicographic_order(coords: torch.Tensor) -> torch.Tensor:
    """Row indices that sort the rows of coords lexicographically."""
    order = torch.arange(len(coords))
    for col in reversed(range(coords.shape[1])):  # stable sorts, last key first
        order = order[torch.sort(coords[order, col], stable=True).indices]
    return order


def _sorted_rows(coords: torch.Tensor) -> torch.Tensor:
    return coords[lexicographic_order(coords)]
