"""Decoder features -> mesh (TRELLIS layout, sparse) and Gaussians -> mesh."""
import numpy as np
import pytest
import torch

from ss4d_blender.engine.mesh import (euler_characteristic, flexicubes_extract, is_consistently_oriented,
                                      is_watertight, mesh_from_decoder_features, mesh_from_gaussians,
                                      signed_volume)
from ss4d_blender.engine.mesh.color import SH_C0, srgb_to_linear
from ss4d_blender.engine.mesh.flexicubes import CORNER_OFFSETS
from ss4d_blender.engine.types import GaussianSet

RES, RADIUS = 32, 0.3


def synthetic_decoder_output(res=RES, radius=RADIUS, seed=0):
    """Active fine voxels of a solid ball with a sphere sdf in the sdf channels (compensating the
    -1/res bias), small random deformations and weights, colour = position in the colour channels."""
    g = torch.Generator().manual_seed(seed)
    ijk = torch.stack(torch.meshgrid(*[torch.arange(res)] * 3, indexing="ij"), -1).reshape(-1, 3)
    corner_pos = (ijk[:, None, :] + torch.tensor(CORNER_OFFSETS)[None]).float() / res - 0.5   # [N, 8, 3]
    sdf = corner_pos.norm(dim=-1) - radius
    active = sdf.min(1).values < 1.5 / res
    coords, corner_pos, sdf = ijk[active], corner_pos[active], sdf[active]
    n = coords.shape[0]
    feats = torch.zeros(n, 101)
    feats[:, 0:8] = sdf + 1.0 / res
    feats[:, 8:32] = 0.2 * torch.randn(n, 24, generator=g)
    feats[:, 32:53] = 0.5 * torch.randn(n, 21, generator=g)
    rgb = (corner_pos + 0.5).clamp(0.02, 0.98)
    feats[:, 53:101] = torch.cat([torch.logit(rgb), torch.randn(n, 8, 3, generator=g)], -1).reshape(n, 48)
    coords4 = torch.cat([torch.zeros(n, 1, dtype=torch.long), coords], 1).int()
    return coords4, feats


def dense_reference(coords4, feats, res):
    """The TRELLIS construction on a dense (res+1)^3 grid, written out independently."""
    size = res + 1
    coords = coords4[:, 1:].long()
    n = coords.shape[0]
    corners = torch.tensor(CORNER_OFFSETS)
    stride = torch.tensor([size * size, size, 1])
    keys = ((coords[:, None] + corners[None]) * stride).sum(-1).reshape(-1)
    per_corner = torch.cat([feats[:, :8].reshape(n, 8, 1) - 1.0 / res, feats[:, 8:32].reshape(n, 8, 3),
                            feats[:, 53:].reshape(n, 8, 6)], -1).reshape(-1, 10)
    acc = torch.zeros(size ** 3, 10).index_add_(0, keys, per_corner)
    cnt = torch.zeros(size ** 3).index_add_(0, keys, torch.ones(keys.numel()))
    attrs = torch.zeros(size ** 3, 10)
    attrs[:, 0] = 1.0
    attrs[cnt > 0] = acc[cnt > 0] / cnt[cnt > 0, None]
    weights = torch.zeros(res ** 3, 21)
    weights[(coords * torch.tensor([res * res, res, 1])).sum(1)] = feats[:, 32:53]
    vid = torch.arange(size ** 3)
    ijk = torch.stack([vid // size ** 2, vid // size % size, vid % size], 1)
    cubes = vid.reshape(size, size, size)[:res, :res, :res].reshape(-1, 1) + (corners * stride).sum(1)[None]
    x = ijk / res - 0.5 + (1 - 1e-8) / (2 * res) * torch.tanh(attrs[:, 1:4])
    return flexicubes_extract(x, attrs[:, 0], cubes, weights[:, :12], weights[:, 12:20], weights[:, 20],
                              torch.sigmoid(attrs[:, 4:]))


def test_decoder_features_match_dense_trellis_construction():
    coords4, feats = synthetic_decoder_output()
    mesh = mesh_from_decoder_features(coords4, feats, RES)
    ref = dense_reference(coords4, feats, RES)
    used = torch.unique(ref.faces)
    assert len(mesh.vertices) == used.numel() and len(mesh.faces) == ref.faces.shape[0]
    ours = {tuple(p) for p in np.round(mesh.vertices, 5)}
    theirs = {tuple(p) for p in np.round(ref.vertices[used].numpy(), 5)}
    assert len(ours ^ theirs) <= 2          # rounding-boundary tolerance on a few thousand vertices
    # colours: sigmoid(colour) interpolated, first three channels, then sRGB -> linear
    expected = srgb_to_linear(ref.attributes[used][:, :3]).numpy()
    order_ours = np.lexsort(np.round(mesh.vertices, 5).T)
    order_ref = np.lexsort(np.round(ref.vertices[used].numpy(), 5).T)
    np.testing.assert_allclose(mesh.colors[order_ours], expected[order_ref], atol=1e-5)


def test_decoder_features_sphere_is_closed_in_box():
    coords4, feats = synthetic_decoder_output(seed=1)
    mesh = mesh_from_decoder_features(coords4.numpy(), feats.numpy(), RES)
    r = np.linalg.norm(mesh.vertices, axis=1)
    assert np.abs(r - RADIUS).max() < 1.0 / RES          # within a cell (random deformation/weights)
    assert abs(r.mean() - RADIUS) < 0.01 * RADIUS
    assert is_watertight(mesh) and is_consistently_oriented(mesh) and euler_characteristic(mesh) == 2
    assert signed_volume(mesh) > 0 and np.abs(mesh.vertices).max() <= 0.5
    # colour channels held the (sRGB) position: vertex colours follow it
    want = srgb_to_linear(torch.from_numpy(mesh.vertices + 0.5).clamp(0.02, 0.98)).numpy()
    assert np.abs(mesh.colors - want).mean() < 0.02
    with pytest.raises(ValueError):
        mesh_from_decoder_features(coords4, feats[:, :100], RES)


def gaussian_ball(radius=0.3, spacing=0.03, seed=0):
    rng = np.random.default_rng(seed)
    ax = np.arange(-radius, radius + 1e-9, spacing)
    p = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    p = p + rng.uniform(-0.3 * spacing, 0.3 * spacing, p.shape)
    p = p[np.linalg.norm(p, axis=1) < radius - 0.5 * spacing]
    n = len(p)
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scale = np.stack([0.7, 0.5, 0.5]) * spacing * rng.uniform(0.9, 1.1, (n, 3))
    f_dc = np.zeros((n, 1, 3))
    f_dc[:, 0] = (np.array([0.8, 0.5, 0.2]) - 0.5) / SH_C0
    return GaussianSet(p.astype(np.float32), f_dc.astype(np.float32), np.full((n, 1), 0.8, np.float32),
                       scale.astype(np.float32), q.astype(np.float32))


def test_gaussian_blob_recovered():
    radius = 0.3
    g = gaussian_ball(radius)
    mesh = mesh_from_gaussians(g, resolution=48)
    r = np.linalg.norm(mesh.vertices, axis=1)
    assert abs(r.mean() - radius) < 0.03 * radius
    assert np.abs(r - radius).max() < 0.03          # one sampling step (the blob is a jittered lattice)
    assert is_watertight(mesh) and is_consistently_oriented(mesh) and euler_characteristic(mesh) == 2
    assert signed_volume(mesh) > 0
    np.testing.assert_allclose(mesh.colors.mean(0), srgb_to_linear(torch.tensor([0.8, 0.5, 0.2])).numpy(), atol=0.01)


def test_hollow_gaussian_shell_gives_outer_surface_only():
    radius = 0.3
    g = gaussian_ball(radius)
    shell = np.linalg.norm(g.xyz, axis=1) > radius - 0.1
    hollow = GaussianSet(*(a[shell] for a in (g.xyz, g.features_dc, g.opacity, g.scaling, g.rotation)))
    raw = mesh_from_gaussians(hollow, resolution=48, remove_cavities=False)
    assert euler_characteristic(raw) == 4                 # outer sphere + inner cavity wall
    mesh = mesh_from_gaussians(hollow, resolution=48)
    assert euler_characteristic(mesh) == 2 and signed_volume(mesh) > 0
    assert np.linalg.norm(mesh.vertices, axis=1).min() > 0.8 * radius
