"""FlexiCubes: golden cases (reference outputs), sparse == dense, analytic sphere."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ss4d_blender.testing.golden_runners.flexicubes import compare
from ss4d_blender.engine.mesh import (euler_characteristic, flexicubes_extract, is_consistently_oriented,
                                      is_watertight, signed_volume)
from ss4d_blender.engine.mesh.flexicubes import CORNER_OFFSETS
from ss4d_blender.engine.types import Mesh


@pytest.mark.parametrize("case", ["flexicubes_plain", "flexicubes_weighted"])
def test_golden_case(shared_dir, case):
    io = load_file(str(shared_dir / "golden_flexicubes" / case / "io.safetensors"))
    checks = compare(io)
    assert [c[0] for c in checks] == ["counts", "vertices", "faces"]
    for name, max_abs, rel, passed, note in checks:
        assert passed, f"{case}/{name}: max_abs={max_abs} rel={rel} {note}"


def dense_grid(res):
    size = res + 1
    ijk = torch.stack(torch.meshgrid(*[torch.arange(size)] * 3, indexing="ij"), -1).reshape(-1, 3)
    vid = torch.arange(size ** 3).reshape(size, size, size)
    offs = torch.tensor([(c[0] * size + c[1]) * size + c[2] for c in CORNER_OFFSETS])
    cubes = vid[:res, :res, :res].reshape(-1, 1) + offs[None]
    return ijk, cubes


def to_mesh(result):
    return Mesh(result.vertices.numpy(), result.faces.numpy().astype(np.int32))


def test_sphere_sparse_matches_dense_and_is_closed():
    res, radius = 24, 0.3
    ijk, cubes = dense_grid(res)
    x = ijk.float() / res - 0.5
    sdf = x.norm(dim=1) - radius
    dense = flexicubes_extract(x, sdf, cubes)
    # the same surface from only the cubes within two cells of it (a sparse, unordered subset)
    near = sdf[cubes].abs().min(1).values < 2.0 / res
    subset = cubes[near][torch.randperm(int(near.sum()), generator=torch.Generator().manual_seed(0))]
    sparse = flexicubes_extract(x, sdf, subset)
    assert sparse.vertices.shape == dense.vertices.shape and sparse.faces.shape == dense.faces.shape
    key = lambda v: np.round(v.numpy(), 6)
    assert set(map(tuple, key(sparse.vertices))) == set(map(tuple, key(dense.vertices)))

    mesh = to_mesh(sparse)
    r = np.linalg.norm(mesh.vertices, axis=1)
    assert np.abs(r - radius).max() < 0.01 * radius
    assert is_watertight(mesh) and is_consistently_oriented(mesh)
    assert euler_characteristic(mesh) == 2
    assert signed_volume(mesh) == pytest.approx(4 / 3 * np.pi * radius ** 3, rel=0.03)  # outward normals


def test_flat_attribute_interpolation_and_empty():
    res = 8
    ijk, cubes = dense_grid(res)
    x = ijk.float() / res
    sdf = x[:, 2] - 0.43                      # plane z = 0.43, inside below
    attrs = torch.stack([x[:, 0], x[:, 1], x[:, 2] * 0 + 7.0], 1)
    out = flexicubes_extract(x, sdf, cubes, vertex_attributes=attrs)
    assert torch.allclose(out.vertices[:, 2], torch.full_like(out.vertices[:, 2], 0.43), atol=1e-6)
    # linear attributes are reproduced exactly at the dual vertices
    assert torch.allclose(out.attributes[:, :2], out.vertices[:, :2], atol=1e-6)
    assert torch.allclose(out.attributes[:, 2], torch.full_like(out.attributes[:, 2], 7.0))
    # faces point to +z (the outside)
    v, f = out.vertices, out.faces
    n = torch.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]], dim=1)
    assert (n[:, 2] > 0).all() and f.shape[0] == 2 * (res - 1) ** 2
    nothing = flexicubes_extract(x, sdf.abs() + 1, cubes, vertex_attributes=attrs)
    assert nothing.vertices.shape == (0, 3) and nothing.faces.shape == (0, 3) and nothing.attributes.shape == (0, 3)
