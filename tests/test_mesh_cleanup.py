"""Cleanup: welding, floating parts, hole filling, decimation, topology checks."""
import numpy as np
import pytest
import torch

from ss4d_blender.engine.mesh import (boundary_edge_count, clean_mesh, close_holes, decimate,
                                      euler_characteristic, flexicubes_extract, is_consistently_oriented,
                                      is_watertight, merge_duplicate_vertices, signed_volume)
from ss4d_blender.engine.mesh.cleanup import face_components, remove_unused_vertices
from ss4d_blender.engine.mesh.flexicubes import CORNER_OFFSETS
from ss4d_blender.engine.types import Mesh


def sphere(res=28, radius=0.3, centre=(0.0, 0.0, 0.0)):
    size = res + 1
    ijk = torch.stack(torch.meshgrid(*[torch.arange(size)] * 3, indexing="ij"), -1).reshape(-1, 3)
    vid = torch.arange(size ** 3).reshape(size, size, size)
    offs = torch.tensor([(c[0] * size + c[1]) * size + c[2] for c in CORNER_OFFSETS])
    cubes = vid[:res, :res, :res].reshape(-1, 1) + offs[None]
    x = ijk.float() / res - 0.5
    out = flexicubes_extract(x, (x - torch.tensor(centre)).norm(dim=1) - radius, cubes)
    v = out.vertices.numpy()
    return Mesh(v, out.faces.numpy().astype(np.int32), (v + 0.5).astype(np.float32))


def test_topology_helpers_on_sphere_and_flipped_face():
    m = sphere()
    assert is_watertight(m) and is_consistently_oriented(m) and euler_characteristic(m) == 2
    bad = m.faces.copy()
    bad[0] = bad[0][::-1]
    assert not is_consistently_oriented(Mesh(m.vertices, bad))
    inverted = Mesh(m.vertices, m.faces[:, ::-1].copy())
    assert is_consistently_oriented(inverted) and signed_volume(inverted) < 0


def test_merge_duplicate_vertices_welds_split_triangle_soup():
    m = sphere(res=16)
    soup = Mesh(m.vertices[m.faces.reshape(-1)], np.arange(3 * len(m.faces), dtype=np.int32).reshape(-1, 3),
                m.colors[m.faces.reshape(-1)])
    assert not is_watertight(soup)
    welded = merge_duplicate_vertices(soup)
    assert len(welded.vertices) == len(m.vertices) and len(welded.faces) == len(m.faces)
    assert is_watertight(welded) and euler_characteristic(welded) == 2


def test_floating_component_removed():
    big = sphere(res=28, radius=0.3)
    small = sphere(res=28, radius=0.06, centre=(0.38, 0.38, 0.38))
    both = Mesh(np.concatenate([big.vertices, small.vertices]),
                np.concatenate([big.faces, small.faces + len(big.vertices)]).astype(np.int32),
                np.concatenate([big.colors, small.colors]))
    assert len(np.unique(face_components(both))) == 2
    cleaned = clean_mesh(both, min_component_fraction=0.1)
    assert len(cleaned.faces) == len(big.faces) and len(cleaned.vertices) == len(big.vertices)
    assert euler_characteristic(cleaned) == 2
    assert np.linalg.norm(cleaned.vertices, axis=1).max() < 0.31
    kept = clean_mesh(both, min_component_fraction=0.0)
    assert len(kept.faces) == len(both.faces)


@pytest.mark.parametrize("target", [1500, 400])
def test_decimation_reaches_target_and_keeps_topology(target):
    m = sphere()
    out = decimate(m, target)
    assert abs(len(out.faces) - target) <= 0.05 * target
    assert is_watertight(out) and is_consistently_oriented(out) and euler_characteristic(out) == 2
    assert signed_volume(out) == pytest.approx(signed_volume(m), rel=0.05)
    r = np.linalg.norm(out.vertices, axis=1)
    assert np.abs(r - 0.3).max() < 0.03
    assert out.colors.shape == out.vertices.shape
    assert len(np.unique(np.sort(out.faces, axis=1), axis=0)) == len(out.faces)   # no duplicate faces


def test_hole_filling_closes_cut_sphere():
    m = sphere()
    keep = m.vertices[m.faces].mean(1)[:, 2] < 0.25          # cut off the cap
    cut = remove_unused_vertices(Mesh(m.vertices, m.faces[keep], m.colors))
    assert boundary_edge_count(cut) > 0 and euler_characteristic(cut) == 1
    assert close_holes(cut, max_loop_edges=3) is cut          # hole too large: untouched
    filled = clean_mesh(cut, min_component_fraction=0.0, fill_holes=True)
    assert is_watertight(filled) and is_consistently_oriented(filled) and euler_characteristic(filled) == 2
    assert signed_volume(filled) > 0 and filled.colors.shape == filled.vertices.shape
