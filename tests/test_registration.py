"""Registration: one mesh through all frames.

Ground truth is built here: analytic motions (bend, twist, a travelling wave as a shear, as a swimming
bend and as radial bulges, a 90° joint bend, parts sliding past each other) of a sphere / capsule /
cylinder, every frame meshed independently (different resolution and a random rotation of the
parametrisation), so vertex counts and topology differ between frames; shape only, and with a colour
pattern painted on the material. The registered vertices are compared with the analytic map of the
reference frame's vertices. Some sequences are meshed instead as the pipeline meshes decoded frames
(signed distances on a voxel grid through the mesh decoder's FlexiCubes extraction and clean-up).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ss4d_blender.engine.errors import Cancelled, InputError
from ss4d_blender.engine.mesh.color import SH_C0, srgb_to_linear
from ss4d_blender.engine.progress import Progress
from ss4d_blender.engine.registration import register_sequence, smooth_trajectories
from ss4d_blender.engine.registration.deform import Deformer, FitSettings
from ss4d_blender.engine.registration.geometry import (SurfaceDistance, face_color_gradients, face_normals,
                                                       path_distances, sample_surface, smooth_vertex_colors,
                                                       unique_edges, unique_pairs)
from ss4d_blender.engine.registration.graph import DeformationGraph, SurfacePaths, interior_points, rodrigues
from ss4d_blender.engine.registration.knn import PointGrid, brute_force_nearest
from ss4d_blender.engine.registration.simplify import simplify_to_vertices
from ss4d_blender.testing.synthetic import (icosphere, make_sequence, material_points,
                                                        mesh_through_decoder, registration_errors, rest_positions)
from ss4d_blender.engine.types import Mesh

FRAMES = 32


def _meshes(seq):
    colors = seq.colors or [None] * len(seq.vertices)
    return [Mesh(v, f, c) for v, f, c in zip(seq.vertices, seq.faces, colors)]


# Motion tests: 32 frames (the length) at ~0.6k-1k vertices per frame (resolution 0.5), so
# the whole file runs in well under a minute on 2 cores. The 1% bound is ~1/3 of an edge here.
RESOLUTION = {"cylinder_bend90": 0.3}


def _xfail(measured: str):
    return pytest.mark.xfail(strict=True, reason=(
        "known gap, measured " + measured + " mean correspondence error (bound 1%); the surface fit "
        "and orientation pass, but the analytic motion is not the minimum of the rigidity prior "
        "(in one step it costs 2-59x the fit's regulariser energy, and a fit started from it slides "
        "back: bench/registration_accuracy.py --prior-energy), and the surface alone cannot tell"))


MOTIONS = [("sphere_bend", 1), ("capsule_bend", 1), ("capsule_bend", 2), ("capsule_bend", 3),
           ("capsule_twist", 1), ("capsule_wave", 1), ("capsule_swim", 1), ("capsule_pulse", 1),
           ("cylinder_bend90", 1), ("capsule_pair_slide", 1)]
# The same motions with a colour pattern painted on the material (as generated meshes carry colours):
# the fit then also matches colours, which pins the slides the shape alone cannot see.
TEXTURED = [("sphere_bend", 1), ("capsule_bend", 1), ("capsule_twist", 1), ("capsule_wave", 1),
            ("capsule_swim", 1), ("capsule_pulse", 1)]
KNOWN_GAPS = {   # shape only: measured max over the 32 frames at this resolution
    ("sphere_bend", 1): "3.3% at the end frames (the motion ends on a perfect sphere, so every rotation "
                        "fits the surface equally; the analytic motion's choice is a convention)",
    ("capsule_wave", 1): "1.9% (the wave shears cross-sections, which keep their orientation; the fit "
                         "turns them most of the way with the body)",
    ("capsule_swim", 1): "1.9% (the bending wave turns cross-sections with the body; the fit turns "
                         "them about half as far: the same compromise from the other side)",
    ("capsule_pulse", 1): "7.7% (bulges travel along the body while the material only moves radially; "
                          "a shape-keeping prior prefers the material to travel with the bulges)",
}


@pytest.mark.parametrize("kind,seed,textured",
                         [pytest.param(*m, False, marks=_xfail(KNOWN_GAPS[m])) if m in KNOWN_GAPS
                          else (*m, False) for m in MOTIONS] + [(*m, True) for m in TEXTURED])
def test_analytic_motion_is_followed(kind, seed, textured):
    _assert_followed(kind, make_sequence(kind, FRAMES, resolution=RESOLUTION.get(kind, 0.5), seed=seed,
                                         textured=textured))


# The shape-only gaps of the travelling waves grow in proportion to the wave (bench/RESULTS.md: at 0.25 /
# 0.5 / 0.75 / 1 of the motion above, the shear wave 0.47 / 0.93 / 1.46 / 1.87 %): a gentler wave, 0.4 of
# it (the body's axis tilting up to ±6° instead of ±14°), is within the bounds from the shape alone.
@pytest.mark.parametrize("kind", ["capsule_wave", "capsule_swim"])
def test_gentle_travelling_waves_are_followed_from_shape_alone(kind):
    _assert_followed(kind, make_sequence(kind, FRAMES, resolution=0.5, seed=1, amplitude=0.4))


def _assert_followed(kind, seq):
    counts = {v.shape[0] for v in seq.vertices}
    assert len(counts) > 1, "frames must be meshed independently"
    anim = register_sequence(_meshes(seq), target_vertices=100_000)
    assert anim.vertices.shape == (FRAMES, seq.vertices[anim.reference_frame].shape[0], 3)
    assert np.isfinite(anim.vertices).all() and np.isfinite(anim.fit_error).all()
    corr, surf, flips = registration_errors(seq, anim)
    print(f"{kind}: {anim.vertices.shape[1]} vertices, reference {anim.reference_frame}: corr max "
          f"{corr.max():.3%} (frame {corr.argmax()}), surface max {surf.max():.3%}, flips max {flips.max():.3%}")
    # the reported fit error is the same measure, in model units
    assert np.allclose(anim.fit_error / seq.diagonal, surf, atol=2e-4)
    assert anim.info["bad_frames"] == []
    assert surf.max() <= 0.005, surf
    assert flips.max() <= 0.005, flips
    assert corr.max() <= 0.01, corr


# Frames meshed as the pipeline meshes decoded frames: dual-grid triangulations with slivers, the
# grid fixed while the object moves through it, with and without noise on the decoded distances, and
# the reference simplified as the add-on does.
@pytest.mark.parametrize("kind,textured,sdf_noise", [("capsule_bend", False, 0.0), ("capsule_wave", True, 0.2)])
def test_frames_meshed_like_the_pipeline_are_followed(kind, textured, sdf_noise):
    seq = make_sequence(kind, FRAMES, seed=1, textured=textured, meshing="voxels", grid=48, sdf_noise=sdf_noise)
    counts = [v.shape[0] for v in seq.vertices]
    assert len(set(counts)) > 1
    anim = register_sequence(_meshes(seq), target_vertices=1500)
    assert anim.info["simplification"] != "none" and anim.vertices.shape[1] < min(counts)
    corr, surf, flips = registration_errors(seq, anim)
    print(f"{kind} (voxel-meshed, {min(counts)}-{max(counts)} vertices, sdf noise {sdf_noise}): "
          f"{anim.vertices.shape[1]} vertices, corr max {corr.max():.3%} (frame {corr.argmax()}), "
          f"surface max {surf.max():.3%}, flips max {flips.max():.3%}")
    assert anim.info["bad_frames"] == []
    assert surf.max() <= 0.005, surf
    assert flips.max() <= 0.005, flips
    assert corr.max() <= 0.01, corr


def test_mesh_through_decoder_remeshes_a_closed_surface():
    """The voxel mesher behind the pipeline-like sequences: a sphere comes back closed, outward,
    one piece (no shell around the inside of the band), on the sphere to a small share of a cell, with
    the volume of a ball, and triangulated anew; noise on the distances roughens it but keeps it whole."""
    from ss4d_blender.engine.mesh import is_consistently_oriented, is_watertight, signed_volume
    from ss4d_blender.engine.mesh.cleanup import face_components

    v, f = icosphere(5)
    grid, radius = 40, 0.7
    out_v, out_f = mesh_through_decoder(v * radius, f, grid, np.zeros(3), 0.5)   # the ball spans 0.7 of the box
    mesh = Mesh(out_v, out_f)
    assert is_watertight(mesh) and is_consistently_oriented(mesh)
    assert len(np.unique(face_components(mesh))) == 1
    cell = 1.0 / (grid * 0.5)
    assert np.abs(np.linalg.norm(out_v, axis=1) - radius).max() < 0.1 * cell
    assert signed_volume(mesh) == pytest.approx(4 / 3 * np.pi * radius ** 3, rel=0.01)
    assert out_v.shape[0] != v.shape[0]
    noisy_v, noisy_f = mesh_through_decoder(v * radius, f, grid, np.zeros(3), 0.5, 0.3, np.random.default_rng(0))
    noisy = Mesh(noisy_v, noisy_f)
    assert is_watertight(noisy) and signed_volume(noisy) > 0
    error = np.abs(np.linalg.norm(noisy_v, axis=1) - radius)
    assert 0.05 * cell < error.mean() < 0.5 * cell


def test_rest_positions_are_interpolated_on_the_closest_triangle():
    """The ground truth of a re-meshed frame: points on a moved surface get the rest positions of the
    closest surface point. Under an affine motion that is exactly the inverse map."""
    v, f = icosphere(3)
    a = np.array([[1.2, 0.3, 0.0], [0.0, 0.8, 0.2], [0.1, 0.0, 1.1]])
    moved = v @ a.T + [0.3, -0.2, 0.5]
    rng = np.random.default_rng(0)
    face = rng.integers(0, len(f), 500)
    w = rng.dirichlet(np.ones(3), 500)
    points = (w[:, :, None] * moved[f[face]]).sum(1)                 # on the moved surface
    rest = rest_positions(points, moved, f, v)
    np.testing.assert_allclose(rest, (points - [0.3, -0.2, 0.5]) @ np.linalg.inv(a).T, atol=1e-9)


def test_vertices_off_the_surface_are_followed_as_the_points_they_are():
    """The truth of a vertex a little off the smooth surface (distance noise, simplification) is the
    rest-space point the motion takes exactly to it, not its neighbour on the surface."""
    seq = make_sequence("capsule_swim", 8, resolution=0.3, seed=1)
    frame, rest = 5, seq.rest[5]
    rng = np.random.default_rng(0)
    off = seq.deform(rest, frame) + 0.01 * rng.normal(size=rest.shape)
    found = material_points(seq.deform, rest, off, frame)
    np.testing.assert_allclose(seq.deform(found, frame), off, atol=1e-9)
    assert np.abs(found - rest).max() > 0.005                        # it did move off the surface's point


def test_swimming_wave_keeps_the_axis_length_and_rigid_normal_sections():
    """The ground truth of 'capsule_swim' is what it claims: an inextensible axis, and cross-sections
    that move rigidly and stay normal to it."""
    from ss4d_blender.testing.synthetic import swim

    z = np.linspace(-1.5, 1.5, 601)
    axis = swim(np.stack([0 * z, 0 * z, z], 1), 0.25, 3.0, 0.3)
    assert abs(np.linalg.norm(np.diff(axis, axis=0), axis=1).sum() - 3.0) < 1e-5
    assert np.abs(axis[:, 0]).max() > 0.05                            # it does bend
    rng = np.random.default_rng(0)
    for i in (50, 300, 550):
        section = np.concatenate([[[0.0, 0.0, z[i]]], np.c_[rng.uniform(-0.5, 0.5, (20, 2)), np.full(20, z[i])]])
        moved = swim(section, 0.25, 3.0, 0.3)
        before = np.linalg.norm(section[:, None] - section[None], axis=-1)
        after = np.linalg.norm(moved[:, None] - moved[None], axis=-1)
        np.testing.assert_allclose(after, before, atol=1e-9)
        assert np.allclose(moved[0], axis[i])
        tangent = (axis[i + 1] - axis[i - 1]) / np.linalg.norm(axis[i + 1] - axis[i - 1])
        assert np.abs((moved[1:] - moved[0]) @ tangent).max() < 1e-5      # normal to the axis


def test_strong_shape_change_is_survived_and_reported():
    """A ball growing petals to 4x its radius (far from isometric, like a flower opening): no NaN,
    no explosion, and every frame either fits or is listed in bad_frames, never hidden."""
    seq = make_sequence("flower_open", FRAMES, resolution=0.4, seed=7)
    anim = register_sequence(_meshes(seq), reference_frame=0, target_vertices=100_000)
    assert np.isfinite(anim.vertices).all()
    extent = max(np.abs(v).max() for v in seq.vertices)
    assert np.abs(anim.vertices).max() < 1.5 * extent
    assert np.isfinite(anim.fit_error).all()
    threshold = anim.info["bad_frame_threshold"]
    assert anim.info["bad_frames"] == [t for t in range(FRAMES) if anim.fit_error[t] > threshold]
    # the reported fit error is the true distance to each frame's surface
    for t in (3, FRAMES - 1):
        dist = SurfaceDistance(torch.from_numpy(seq.vertices[t]), torch.from_numpy(seq.faces[t].astype(np.int64)))
        assert abs(float(dist(torch.from_numpy(anim.vertices[t])).mean()) - anim.fit_error[t]) < 1e-4
    # early frames (small change) still fit tightly
    assert (anim.fit_error[:8] / seq.diagonal).max() < 0.005
    print("flower fit error (% of diagonal):", np.round(100 * anim.fit_error / seq.diagonal, 2))


def test_graph_keeps_the_previous_frames_shape_blended_with_the_rest():
    """The regulariser's kept edge vectors: the rest's for the identity state, unchanged by a rigid
    motion of the whole graph, and for a deformed state the blend rest_share · rest + the rest share
    of the deformed shape (seen from each edge's first node)."""
    seq = make_sequence("capsule_bend", 1, resolution=0.3, seed=1)
    rest = torch.from_numpy(seq.vertices[0]).double()
    deformer = Deformer(rest, torch.from_numpy(seq.faces[0].astype(np.int64)), FitSettings(rest_share=0.25))
    g = deformer.graph
    rest_edges = g.nodes[g.edge_k] - g.nodes[g.edge_j]
    rot, trans = g.identity_state()
    assert torch.allclose(deformer.kept_edge_vectors(rot, trans), rest_edges, atol=1e-12)
    turn = rodrigues(torch.tensor([0.3, -1.1, 0.7], dtype=torch.float64))
    moved = g.nodes @ turn.T + torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64)
    rigid = (turn.expand(g.num_nodes, 3, 3).clone(), moved - g.nodes)
    assert torch.allclose(deformer.kept_edge_vectors(*rigid), rest_edges, atol=1e-12)
    stretched = torch.diag(torch.tensor([1.0, 1.0, 1.5], dtype=torch.float64))
    positions = g.nodes @ stretched.T
    deformed = (rot, positions - g.nodes)
    expected = 0.25 * rest_edges + 0.75 * (positions[g.edge_k] - positions[g.edge_j])
    assert torch.allclose(deformer.kept_edge_vectors(*deformed), expected, atol=1e-12)


@pytest.mark.parametrize("resolution", [0.5, 4.0])   # ~1.7k vertices (exact paths), ~13k (clustered)
def test_graph_nodes_do_not_reach_across_a_gap(resolution):
    """Two capsules 0.1 apart (a node spacing is ~0.25): no vertex follows a node of the other
    capsule and no regulariser edge joins them, although through space such nodes are among the
    nearest (which is what the old, Euclidean weights used)."""
    seq = make_sequence("capsule_pair_slide", 1, resolution=resolution, seed=2)
    rest = torch.from_numpy(seq.vertices[0])
    g = DeformationGraph(rest, torch.from_numpy(seq.faces[0].astype(np.int64)), 160)
    side_v, side_n = rest[:, 0] > 0, g.nodes[:, 0] > 0
    euclidean = torch.topk(torch.cdist(rest, g.nodes), 5, largest=False).indices
    assert (side_n[euclidean] != side_v[:, None]).any()
    crossing = (side_n[g.near] != side_v[:, None]) & (g.weights > 0)
    assert not crossing.any()
    assert torch.equal(side_n[g.edge_j], side_n[g.edge_k])
    assert g.num_surface >= 160 and int(side_n.sum()) > 40 and int((~side_n).sum()) > 40
    # built in row chunks (bounded memory on large meshes), the graph is the same
    chunked = DeformationGraph(rest, torch.from_numpy(seq.faces[0].astype(np.int64)), 160, chunk=1000)
    assert torch.equal(chunked.near, g.near) and torch.equal(chunked.weights, g.weights)
    assert torch.equal(chunked.edge_j, g.edge_j) and torch.equal(chunked.edge_k, g.edge_k)


def test_path_distances_match_dijkstra():
    import heapq

    v, f = icosphere(2)
    v = torch.from_numpy(v * np.array([1.0, 0.6, 1.4]))
    edges = unique_edges(torch.from_numpy(f))
    adjacency = {i: [] for i in range(v.shape[0])}
    for a, b in edges.tolist():
        length = float((v[a] - v[b]).norm())
        adjacency[a].append((b, length))
        adjacency[b].append((a, length))
    seeds = torch.tensor([0, 7, 7]), torch.tensor([0, 1, 1]), torch.tensor([0.0, 0.05, 0.3], dtype=v.dtype)
    got = path_distances(v, edges, *seeds, columns=2, reach=1.5)
    for column, (start, offset) in enumerate([(0, 0.0), (7, 0.05)]):
        best, heap = {}, [(offset, start)]
        while heap:
            d, i = heapq.heappop(heap)
            if i in best:
                continue
            best[i] = d
            for j, length in adjacency[i]:
                if j not in best:
                    heapq.heappush(heap, (d + length, j))
        expected = torch.tensor([best[i] if best[i] <= 1.5 else float("inf") for i in range(v.shape[0])],
                                dtype=v.dtype)
        finite = torch.isfinite(expected)
        assert 0 < int(finite.sum()) < v.shape[0]                        # the reach cuts some off
        assert torch.equal(torch.isfinite(got[:, column]), finite)
        assert torch.allclose(got[finite, column], expected[finite], atol=1e-9)


def test_surface_paths_on_clusters_follow_the_exact_paths():
    """Large meshes measure paths along the surface on ~3000 vertex clusters: close to the exact
    edge paths (a little longer on average), never much shorter (a shortcut would let a node across
    a gap count as near), and nothing the exact paths reach within most of the reach is lost."""
    seq = make_sequence("capsule_bend", 1, resolution=6, seed=3)
    v, f = torch.from_numpy(seq.vertices[0]).double(), torch.from_numpy(seq.faces[0].astype(np.int64))
    assert v.shape[0] > 8000
    seeds, cols, zero = torch.tensor([0, 500, 5000, 9000]), torch.arange(4), torch.zeros(4, dtype=v.dtype)
    exact = path_distances(v, unique_edges(f), seeds, cols, zero, 4, reach=1.0)
    paths = SurfacePaths(v, f, reach=1.0)
    assert 2500 < paths.points.shape[0] < 3500
    approx = paths.at(torch.arange(v.shape[0]), paths.from_seeds(seeds, cols, zero, 4))
    both = torch.isfinite(exact) & torch.isfinite(approx) & (exact > 0.2)
    rel = ((approx - exact) / exact)[both]
    assert both.sum() > 5000 and rel.abs().mean() < 0.15 and rel.min() > -0.2, (rel.mean(), rel.min())
    assert not (torch.isfinite(exact) & (exact < 0.8) & ~torch.isfinite(approx)).any()


def test_graph_ties_a_limb_loosely_along_its_axis_only():
    """On the straight part of a capsule, regulariser edges along the axis weigh about
    axial_stiffness, edges across it about 1; on a sphere no direction stands out."""
    seq = make_sequence("capsule_twist", 1, resolution=1, seed=0)
    capsule = DeformationGraph(torch.from_numpy(seq.vertices[0]).double(),
                               torch.from_numpy(seq.faces[0].astype(np.int64)), 160, axial_stiffness=0.1)
    j, k = capsule.edge_j, capsule.edge_k
    direction = torch.nn.functional.normalize(capsule.nodes[k] - capsule.nodes[j], dim=1)
    on_tube = (capsule.nodes[j, 2].abs() < 0.6) & (j < capsule.num_surface)
    along, across = on_tube & (direction[:, 2].abs() > 0.9), on_tube & (direction[:, 2].abs() < 0.3)
    assert along.sum() > 20 and across.sum() > 20
    assert capsule.edge_weight[along].mean() < 0.25 and capsule.edge_weight[across].mean() > 0.9
    v, f = icosphere(3)
    sphere = DeformationGraph(torch.from_numpy(v), torch.from_numpy(f), 160, axial_stiffness=0.1)
    assert sphere.edge_weight.mean() > 0.95
    isotropic = DeformationGraph(torch.from_numpy(seq.vertices[0]).double(),
                                 torch.from_numpy(seq.faces[0].astype(np.int64)), 160)
    assert torch.equal(isotropic.edge_weight, torch.ones_like(isotropic.edge_weight))


def _flat_sheet(n: int) -> tuple[np.ndarray, np.ndarray]:
    """A flat square sheet in z = 0: vertices [n*n, 3] float64, faces int64."""
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    v = np.stack([i.ravel(), j.ravel(), 0 * i.ravel()], 1) / (n - 1)
    q = (i[:-1, :-1] * n + j[:-1, :-1]).ravel()
    return v, np.concatenate([np.stack([q, q + n, q + 1], 1), np.stack([q + 1, q + n, q + n + 1], 1)])


def test_flat_sheet_registers():
    """A perfectly flat reference (a flag at rest, a card): the interior-node search once crashed on
    the zero thickness."""
    v, f = _flat_sheet(24)
    frames = []
    for t in range(6):
        moved = v.copy()
        moved[:, 2] = 0.08 * t * np.sin(np.pi * v[:, 0])            # the sheet bulges
        frames.append(Mesh(moved.astype(np.float32), f.astype(np.int32)))
    anim = register_sequence(frames, reference_frame=0, target_vertices=10 ** 9)
    assert np.isfinite(anim.vertices).all() and anim.info["bad_frames"] == []
    assert anim.fit_error.max() < 0.005 * np.sqrt(2.0)


def test_interior_of_a_thin_closed_slab_is_found_or_empty_never_a_crash():
    """A closed slab thicker than the first grid cell but thinner than the cells the grid grows to
    (its bounding box holds too many cells) once crashed building the coarser grid."""
    v, f = icosphere(3)
    slab = torch.from_numpy(v * np.array([2.0, 2.0, 0.15]))
    inner = interior_points(slab, torch.from_numpy(f), 0.25, max_points=4)
    assert inner.shape[1] == 3 and inner.shape[0] <= 4


def test_vertices_follow_the_body_core_as_core_binding_asks():
    """core_binding: vertices weigh the nodes inside the body as if they were that much nearer, so the
    surface moves with the core instead of sliding over it. Without it (1) a capsule's vertices put
    ~3 % of their weight on interior nodes; with the default (3) most of it. A flat sheet has no
    interior nodes, so nothing changes there."""
    seq = make_sequence("capsule_bend", 1, resolution=0.5, seed=1)
    v, f = torch.from_numpy(seq.vertices[0]).double(), torch.from_numpy(seq.faces[0].astype(np.int64))
    share = {}
    for binding in (1.0, FitSettings().core_binding):
        g = DeformationGraph(v, f, 96, core_binding=binding)
        assert g.num_nodes > g.num_surface
        assert torch.allclose(g.weights.sum(1), torch.ones(len(v), dtype=v.dtype))
        share[binding] = float((g.weights * (g.near >= g.num_surface)).sum(1).mean())
    assert share[1.0] < 0.1 and share[FitSettings().core_binding] > 0.4, share
    sheet_v, sheet_f = (torch.from_numpy(a) for a in _flat_sheet(20))
    plain, bound = (DeformationGraph(sheet_v, sheet_f, 40, core_binding=b) for b in (1.0, 3.0))
    assert plain.num_nodes == plain.num_surface
    assert torch.equal(plain.weights, bound.weights) and torch.equal(plain.near, bound.near)


def test_graph_weights_are_finite_on_crumpled_surfaces():
    """Generated meshes can be crumpled (the tiny random-weight pipeline's are): where every node is a
    long way round along the surface, a vertex still gets finite weights that sum to one (this was a
    NaN that stopped the run)."""
    v0, f = icosphere(4)
    for seed in range(8):
        v = v0 + np.random.default_rng(seed).normal(scale=0.15, size=v0.shape)
        g = DeformationGraph(torch.from_numpy(v).float(), torch.from_numpy(f), 160)
        assert torch.isfinite(g.weights).all(), seed
        assert torch.allclose(g.weights.sum(1), torch.ones(len(v)), atol=1e-5)


def test_unique_pairs_matches_torch_unique():
    g = torch.Generator().manual_seed(0)
    for high in (3, 50, 100_000):
        pairs = torch.randint(0, high, (2000, 2), generator=g)
        assert torch.equal(unique_pairs(pairs), torch.unique(pairs, dim=0))
    assert unique_pairs(torch.zeros(0, 2, dtype=torch.long)).shape == (0, 2)


def test_grid_nearest_neighbour_is_exact():
    g = torch.Generator().manual_seed(0)
    points = torch.nn.functional.normalize(torch.randn(3000, 3, generator=g), dim=1)
    queries = torch.randn(500, 3, generator=g) * 0.8
    idx, dist = PointGrid(points).query(queries)
    ref_idx, ref_d2 = brute_force_nearest(queries, points)
    assert torch.allclose(dist, ref_d2.sqrt(), atol=1e-6)


def test_grid_nearest_neighbour_is_exact_where_points_crowd():
    """More points in a cell than the grid's table holds per cell (a mesh's crowded pole, a cluster):
    the excess once went missing, so a query could get a farther point (colours from the wrong
    Gaussian, a wrong match in the fit)."""
    g = torch.Generator().manual_seed(1)
    sphere = torch.nn.functional.normalize(torch.randn(3000, 3, generator=g), dim=1)
    cluster = torch.tensor([0.0, 0.0, 1.0]) + 0.02 * torch.randn(400, 3, generator=g)
    points = torch.cat([sphere, cluster])
    queries = torch.cat([cluster + 0.001 * torch.randn(400, 3, generator=g), torch.randn(300, 3, generator=g)])
    grid = PointGrid(points)
    # exact=False promises the nearest only for queries with a point within half a cell: the cluster's
    for q, exact in ((queries, True), (queries[:400], False)):
        idx, dist = grid.query(q, exact=exact)
        ref_dist, ref_idx = ((q.double()[:, None] - points.double()[None]) ** 2).sum(-1).min(1)
        assert torch.allclose(dist.double(), ref_dist.sqrt(), atol=1e-6)
        assert (idx == ref_idx).float().mean() > 0.99      # ties aside
    # the brute force the grid falls back on agrees too (it once misordered candidates 1e-4 apart near
    # (0, 0, 1), rounding in |q|² − 2 q·p + |p|²)
    bf_idx, bf_d2 = brute_force_nearest(queries, points)
    ref_dist, _ = ((queries.double()[:, None] - points.double()[None]) ** 2).sum(-1).min(1)
    assert torch.allclose(bf_d2.double().sqrt(), ref_dist.sqrt(), atol=1e-6)


def test_reference_is_simplified_and_fit_still_tight():
    seq = make_sequence("capsule_bend", 6, resolution=1, seed=2)
    anim = register_sequence(_meshes(seq), target_vertices=600)
    assert 400 <= anim.vertices.shape[1] <= 800
    assert anim.info["simplification"] != "none"
    assert (anim.fit_error / seq.diagonal).max() < 0.005


def test_simplification_keeps_small_parts():
    """The reference frame's small separate parts (a held ball, a tail tip) stay in the registered mesh:
    a sphere of 2 % of the body's faces beside a capsule comes through the simplification."""
    seq = make_sequence("capsule_bend", 1, resolution=4, seed=1)
    body, body_f = seq.vertices[0], seq.faces[0]
    ball, ball_f = icosphere(2)
    ball = (0.2 * ball + np.array([1.2, 0.0, 0.0])).astype(np.float32)
    v = np.concatenate([body, ball])
    f = np.concatenate([body_f, ball_f + len(body)]).astype(np.int32)
    assert 0.01 < len(ball_f) / len(body_f) < 0.05
    sv, sf, _, method = simplify_to_vertices(v, f, target_vertices=len(v) // 4)
    assert method == "decimation" and len(sv) <= 0.3 * len(v)
    near_ball = np.linalg.norm(sv - [1.2, 0.0, 0.0], axis=1) < 0.25
    assert near_ball.sum() >= 12
    assert np.abs(np.linalg.norm(sv[near_ball] - [1.2, 0.0, 0.0], axis=1) - 0.2).max() < 0.02


def test_simplification_falls_back_to_clustering_where_decimation_cannot_reach():
    """Faces that share no vertices (a soup whose copies do not weld) are all boundary, which edge collapse
    leaves alone: vertex clustering brings the mesh down instead."""
    v, f = icosphere(4)
    soup = (v[f.reshape(-1)] + 1e-4 * np.random.default_rng(0).normal(size=(f.size, 3))).astype(np.float32)
    soup_f = np.arange(f.size, dtype=np.int32).reshape(-1, 3)
    target = len(v) // 2
    sv, sf, _, method = simplify_to_vertices(soup, soup_f, target_vertices=target)
    assert method == "vertex clustering"
    assert len(sv) <= 1.2 * target and len(sf) > 0
    assert np.abs(np.linalg.norm(sv, axis=1) - 1.0).max() < 0.1


def test_broken_frames_are_reported_not_hidden():
    seq = make_sequence("capsule_wave", 6, resolution=0.5, seed=3)
    meshes = _meshes(seq)
    # frame 4 is something else entirely (a far-away small sphere); frame 5 is empty; frame 3 collapsed
    # onto a line (no area to fit to: this once crashed the surface sampling)
    meshes[4] = Mesh(seq.vertices[4] * 0.2 + np.float32([3, 0, 0]), seq.faces[4])
    meshes[5] = Mesh(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32))
    meshes[3] = Mesh(seq.vertices[3] * np.float32([0, 0, 1]), seq.faces[3])
    anim = register_sequence(meshes, reference_frame=0, target_vertices=100_000)
    assert np.isfinite(anim.vertices).all()
    assert {3, 4, 5} <= set(anim.info["bad_frames"])
    assert anim.fit_error[5] == np.inf and anim.fit_error[3] == np.inf
    assert (anim.fit_error[:3] / seq.diagonal).max() < 0.005
    assert np.abs(anim.vertices).max() < 10


def test_colour_gradient_along_a_face_is_the_fields_tangential_part():
    """A linear colour field c(p) = A p + b painted on random triangles: samples carry c at their
    position, and each face's gradient is A restricted to the face's plane, A (I − n nᵀ)."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(60, 3, generator=g, dtype=torch.float64)
    f = torch.randperm(60, generator=g).reshape(20, 3)
    a, b = torch.randn(3, 3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    colors = v @ a.T + b
    n = face_normals(v, f)
    expected = a[None] @ (torch.eye(3, dtype=v.dtype) - n[:, :, None] * n[:, None, :])
    assert torch.allclose(face_color_gradients(v, f, colors), expected, atol=1e-9)
    found = sample_surface(v, f, 500, g, colors)
    assert torch.allclose(found.colors, found.points @ a.T + b, atol=1e-9)
    assert found.color_gradients.shape == (found.points.shape[0], 3, 3)


def test_colour_smoothing_turns_an_edge_into_a_ramp_and_keeps_flat_colour():
    """`smooth_vertex_colors`: a flat colour stays as it is; a sharp two-tone edge across a sphere becomes
    a ramp, wider for a larger radius, with the colours staying within the two tones."""
    v, f = icosphere(4)
    v, f = torch.from_numpy(v), torch.from_numpy(f)
    flat = torch.full((v.shape[0], 3), 0.3, dtype=v.dtype)
    assert torch.allclose(smooth_vertex_colors(v, f, flat, 0.3), flat)
    step = torch.where(v[:, :1] > 0, 0.8, 0.2).expand(-1, 3).contiguous()
    assert torch.equal(smooth_vertex_colors(v, f, step, 0.0), step)
    ramps = []
    for radius in (0.1, 0.3):
        c = smooth_vertex_colors(v, f, step, radius)[:, 0]
        assert float(c.min()) >= 0.2 - 1e-6 and float(c.max()) <= 0.8 + 1e-6
        between = (c > 0.25) & (c < 0.75)
        ramps.append(float(v[between, 0].abs().max()))        # how far from the edge it reaches
        assert ((c > 0.5) == (v[:, 0] > 0))[v[:, 0].abs() > 0.05].all()
    assert 0 < ramps[0] < ramps[1]


def _noisy_textured(kind, seed, noise, gain, rng):
    """A textured sequence whose frames' colours are re-lit (one random gain per frame, up to
    ±gain) and carry independent per-vertex noise, as the colours of generated frames would."""
    seq = make_sequence(kind, FRAMES, resolution=0.5, seed=seed, textured=True)
    seq.colors = [np.clip(c * rng.uniform(1 - gain, 1 + gain) + noise * rng.normal(size=c.shape), 0, 1)
                  .astype(np.float32) for c in seq.colors]
    return seq


def test_colour_pins_the_wave_with_noisy_relit_colours():
    """Per-vertex colour noise (0.05) and a brightness change of up to 10 % between frames: the travelling
    wave is still followed within the bounds (shape only: 1.9 %)."""
    seq = _noisy_textured("capsule_wave", 1, 0.05, 0.1, np.random.default_rng(5))
    corr, surf, flips = registration_errors(seq, register_sequence(_meshes(seq), target_vertices=100_000))
    print(f"corr {corr.max():.3%}, surface {surf.max():.3%}, flips {flips.max():.3%}")
    assert corr.max() <= 0.01 and surf.max() <= 0.005 and flips.max() <= 0.005


def test_colour_pins_a_bend_whose_shading_changes_with_it():
    """Generated colours bake in the video's lighting, which changes as a part turns: here 60 % of the
    colour is Lambert shading under a fixed light, recomputed for every frame's pose. Compared as raw
    RGB this moved the 90° cylinder off by 1.4 % with 0.9 % of its faces flipped; compared by
    chromaticity (plus a little brightness) the bounds hold."""
    from ss4d_blender.engine.registration.geometry import vertex_normals

    seq = make_sequence("cylinder_bend90", FRAMES, resolution=0.3, seed=1, textured=True)
    light = np.array([0.3, 0.5, 0.8]) / np.linalg.norm([0.3, 0.5, 0.8])
    for t, (v, f) in enumerate(zip(seq.vertices, seq.faces)):
        n = vertex_normals(torch.from_numpy(v).double(), torch.from_numpy(f.astype(np.int64))).numpy()
        seq.colors[t] = (seq.colors[t] * (0.4 + 0.6 * np.clip(n @ light, 0, 1))[:, None]).astype(np.float32)
    corr, surf, flips = registration_errors(seq, register_sequence(_meshes(seq), target_vertices=100_000))
    print(f"corr {corr.max():.3%}, surface {surf.max():.3%}, flips {flips.max():.3%}")
    assert corr.max() <= 0.01 and surf.max() <= 0.005 and flips.max() <= 0.005


def test_unrelated_colours_leave_the_fit_as_without_colours():
    """Colours that change randomly from frame to frame carry no correspondence: the colour term must
    fade out instead of pulling vertices around (the bend must score as without colours)."""
    rng = np.random.default_rng(3)
    seq = make_sequence("capsule_bend", FRAMES, resolution=0.5, seed=3)
    plain = registration_errors(seq, register_sequence(_meshes(seq), target_vertices=100_000))[0]
    seq.colors = [rng.uniform(0, 1, v.shape).astype(np.float32) for v in seq.vertices]
    scrambled, _, flips = registration_errors(seq, register_sequence(_meshes(seq), target_vertices=100_000))
    print(f"without colours {plain.max():.3%}, with unrelated colours {scrambled.max():.3%}")
    assert abs(scrambled.max() - plain.max()) <= 0.0005 and flips.max() <= 0.005


def test_colours_from_gaussians_pin_the_wave_too():
    """Meshes without colours, with per-frame Gaussians (as the pipeline makes): the fit takes each
    frame's colours from its Gaussians, and the mesh gets the reference frame's, converted to linear
    like mesh colours (the Gaussians' are in image space)."""
    from ss4d_blender.engine.types import GaussianSet

    seq = make_sequence("capsule_wave", FRAMES, resolution=0.5, seed=1, textured=True)
    gaussians = []
    for v, c in zip(seq.vertices, seq.colors):
        n = v.shape[0]
        gaussians.append(GaussianSet(xyz=v, features_dc=((c - 0.5) / SH_C0)[:, None, :].astype(np.float32),
                                     opacity=np.ones((n, 1), np.float32), scaling=np.full((n, 3), 0.01, np.float32),
                                     rotation=np.tile(np.float32([1, 0, 0, 0]), (n, 1))))
    meshes = [Mesh(v, f) for v, f in zip(seq.vertices, seq.faces)]
    anim = register_sequence(meshes, target_vertices=100_000, gaussians=gaussians)
    corr = registration_errors(seq, anim)[0]
    expected = srgb_to_linear(torch.from_numpy(seq.colors[anim.reference_frame])).numpy()
    assert np.allclose(anim.colors, expected, atol=1e-5)
    assert corr.max() <= 0.01, corr.max()


def test_gaussians_for_a_different_number_of_frames_are_refused():
    seq = make_sequence("capsule_bend", 3, resolution=0.3, seed=4)
    with pytest.raises(InputError, match="2 frames of Gaussians for 3 frames of meshes"):
        register_sequence(_meshes(seq), gaussians=[None, None])


def test_colours_of_the_wrong_shape_are_refused():
    seq = make_sequence("capsule_bend", 3, resolution=0.3, seed=4)
    meshes = _meshes(seq)
    meshes[1].colors = np.zeros((5, 3), np.float32)
    with pytest.raises(InputError, match="Frame 1: vertex colours"):
        register_sequence(meshes)


def test_colours_come_from_the_reference_frame():
    seq = make_sequence("capsule_bend", 3, resolution=0.3, seed=4)
    meshes = _meshes(seq)
    for m in meshes:
        m.colors = np.clip(0.5 + 0.5 * m.vertices, 0, 1).astype(np.float32)
    anim = register_sequence(meshes, reference_frame=1, target_vertices=100_000)
    assert np.allclose(anim.colors, meshes[1].colors)


def test_temporal_smoothing_removes_jitter_and_keeps_linear_motion():
    t = torch.arange(20, dtype=torch.float32)
    line = torch.stack([t, 2 * t, -t], 1)[:, None, :].repeat(1, 5, 1)
    assert torch.allclose(smooth_trajectories(line, 10.0), line, atol=1e-3)
    noisy = line + 0.1 * torch.randn(line.shape, generator=torch.Generator().manual_seed(0))
    smooth = smooth_trajectories(noisy, 10.0)
    assert (smooth - line).abs().mean() < 0.5 * (noisy - line).abs().mean()


def test_bad_input_and_cancel():
    with pytest.raises(InputError):
        register_sequence([])
    seq = make_sequence("capsule_bend", 3, resolution=0.3, seed=5)
    with pytest.raises(InputError):
        register_sequence(_meshes(seq), reference_frame=7)
    progress = Progress()
    progress.cancel()
    with pytest.raises(Cancelled):
        register_sequence(_meshes(seq), progress=progress)


def test_cli_module_runs(tmp_path):
    """`python -m ss4d_blender.engine register IN OUT` end to end, in a fresh process."""
    seq = make_sequence("capsule_bend", 3, resolution=0.3, seed=8)
    src, dst = tmp_path / "in.npz", tmp_path / "out.npz"
    arrays = {}
    for t, (v, f) in enumerate(zip(seq.vertices, seq.faces)):
        arrays[f"vertices_{t}"], arrays[f"faces_{t}"] = v, f
        arrays[f"colors_{t}"] = np.full_like(v, 0.25)
    np.savez(src, **arrays)
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "ss4d_blender.engine", "register", str(src), str(dst),
                          "--quiet", "--vertices", "300"], cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    out = np.load(dst)
    t, v, _ = out["vertices"].shape
    assert t == 3 and 200 <= v <= 400 and out["faces"].max() < v
    assert out["colors"].shape == (v, 3) and np.allclose(out["colors"], 0.25, atol=1e-5)
    assert out["fit_error"].shape == (3,) and np.isfinite(out["fit_error"]).all()


def test_cli_roundtrip(tmp_path):
    from ss4d_blender.engine.__main__ import main

    seq = make_sequence("capsule_wave", 4, resolution=0.3, seed=6, textured=True)
    arrays = {}
    for t, (v, f, c) in enumerate(zip(seq.vertices, seq.faces, seq.colors)):
        arrays[f"vertices_{t}"], arrays[f"faces_{t}"], arrays[f"colors_{t}"] = v, f, c
    src, dst = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(src, **arrays)
    assert main(["register", str(src), str(dst), "--quiet"]) == 0
    out = np.load(dst)
    assert out["vertices"].shape[0] == 4 and out["vertices"].shape[2] == 3
    assert out["faces"].dtype == np.int32 and out["faces"].shape[1] == 3
    assert out["fit_error"].shape == (4,)
    # colours in: the reference frame's come out on the mesh (not the smoothed ones the fit compares)
    assert np.allclose(out["colors"], seq.colors[int(out["reference_frame"])])
    assert main(["register", str(tmp_path / "missing.npz"), str(dst), "--quiet"]) == 2


def test_device_choice_never_uses_mps():
    """Registration needs batched SVD / Cholesky, which Apple MPS lacks: 'auto' means CUDA or the CPU and an
    explicit 'mps' (the add-on passes the generation device) runs on the CPU."""
    from ss4d_blender.engine.registration.sequence import resolve_device

    assert resolve_device("mps").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu" and resolve_device(torch.device("cpu")).type == "cpu"
