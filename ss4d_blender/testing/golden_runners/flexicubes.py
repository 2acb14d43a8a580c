"""Golden runner for the FlexiCubes cases (/work/shared/golden_flexicubes/flexicubes_*).

Runs our sparse ``flexicubes_extract`` on the case's dense grid (every cube given explicitly) and
compares with the reference output: exact vertex and face counts, vertices within tolerance after
matching each of ours to the nearest reference vertex (row order may differ; the matching must be
one-to-one), and faces equal as sets of matched vertex cycles (winding included).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ...engine.mesh.flexicubes import flexicubes_extract

VERTEX_TOLERANCE = 1e-5


def _canonical_cycles(faces: torch.Tensor) -> set:
    """Faces as rotation-normalised index triples (same winding = same triple)."""
    out = set()
    for a, b, c in faces.tolist():
        m = min(a, b, c)
        out.add((a, b, c) if m == a else (b, c, a) if m == b else (c, a, b))
    return out


def compare(io: dict) -> list[tuple[str, float, float, bool, str]]:
    """Run the case and compare; returns (name, max_abs, rel_l2, passed, note) per check."""
    weights = [io.get(k) for k in ("beta", "alpha", "gamma")]
    ours = flexicubes_extract(io["grid_vertices"].float(), io["sdf"].float(), io["cube_idx"].long(), *weights)
    ref_v, ref_f = io["vertices"].float(), io["faces"].long()
    checks = []
    counts_ok = ours.vertices.shape[0] == ref_v.shape[0] and ours.faces.shape[0] == ref_f.shape[0]
    checks.append(("counts", 0.0 if counts_ok else float("inf"), 0.0, counts_ok,
                   f"V {ours.vertices.shape[0]} vs {ref_v.shape[0]}, F {ours.faces.shape[0]} vs {ref_f.shape[0]}"))
    if ours.vertices.shape[0] == 0 or ref_v.shape[0] == 0:
        return checks
    dist = torch.cdist(ours.vertices.double(), ref_v.double())
    nearest = dist.argmin(1)
    matched = ref_v[nearest]
    err = (ours.vertices - matched).abs()
    max_abs = float(err.max())
    rel = float((ours.vertices - matched).norm() / ref_v.norm().clamp(min=1e-30))
    one_to_one = nearest.unique().numel() == nearest.numel()
    checks.append(("vertices", max_abs, rel, max_abs <= VERTEX_TOLERANCE and one_to_one and counts_ok,
                   "" if one_to_one else "vertex matching is not one-to-one"))
    mine = _canonical_cycles(nearest[ours.faces])
    theirs = _canonical_cycles(ref_f)
    differ = len(mine ^ theirs)
    checks.append(("faces", float(differ), 0.0, differ == 0 and counts_ok,
                   f"{differ} faces differ (as matched vertex cycles, winding included)"))
    return checks


def run(case_dir: Path, config: Optional[dict], manifest: dict, io: dict):
    from .common import Check
    return [Check(name, max_abs, rel, passed, note) for name, max_abs, rel, passed, note in compare(io)]
