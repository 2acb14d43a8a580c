"""The rig fit (engine/rig): bones and skin weights recovered from animations made by known linear blend
skinning, non-rigid motion with and without correctives, the weights' constraints, the RIG.npz format,
degenerate input and the `rig` command line. Small meshes; bench/rig.py measures 32 frames x 20k vertices."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rig_synthetic import skinned_capsule
from ss4d_blender.engine.errors import InputError
from ss4d_blender.engine.registration.cli import save_animation
from ss4d_blender.engine.rig import Rig, RigSettings, fit_rig
from ss4d_blender.engine.rig.cli import main as rig_main
from ss4d_blender.engine.rig.rig_file import FIELDS
from ss4d_blender.engine.rig.skeleton import move_inside, pull_inside, winding_numbers


def diagonal(points: np.ndarray) -> float:
    return float(np.linalg.norm(points.max(0) - points.min(0)))


def check_weights(weights: np.ndarray, max_influences: int = 4) -> None:
    assert weights.dtype == np.float32
    assert (weights >= 0).all()
    assert ((weights > 0).sum(1) <= max_influences).all()
    np.testing.assert_allclose(weights.sum(1), 1, atol=1e-5)


def check_tree(parents: np.ndarray) -> None:
    assert (parents == -1).sum() == 1
    for b in range(len(parents)):                       # every bone reaches the root without a cycle
        seen, node = set(), b
        while parents[node] != -1:
            assert node not in seen
            seen.add(node)
            node = parents[node]


def measured_errors(rig: Rig, vertices: np.ndarray, correctives: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """RMS and max per frame (% of the rest diagonal) of the rig, recomputed from the saved arrays alone."""
    rest = rig.rest_vertices.astype(np.float64)
    points = rest[None] + (rig.correctives if correctives else 0)
    homogeneous = np.concatenate([points, np.ones(points.shape[:2] + (1,))], -1) if correctives else \
        np.concatenate([np.broadcast_to(rest, vertices.shape), np.ones(vertices.shape[:2] + (1,))], -1)
    moved = np.einsum("vb,tbij,tvj->tvi", rig.weights.astype(np.float64), rig.transforms.astype(np.float64),
                      homogeneous)[..., :3]
    distance = np.linalg.norm(moved - vertices, axis=2) / diagonal(rest) * 100
    return np.sqrt((distance ** 2).mean(1)), distance.max(1)


@pytest.mark.parametrize("bones", [3, 4])
def test_recovers_known_skinning(bones):
    """A capsule bending at its joints (ball joints) while the whole body turns and moves: the automatic
    count finds the true bones, RMS <= 0.3 %, the joints within 3 % of the diagonal of the true ones."""
    capsule = skinned_capsule(bones=bones, frames=10, rings=8 * bones, around=12)
    rig = fit_rig(capsule.vertices, capsule.faces)
    diag = diagonal(capsule.vertices[0])
    assert rig.num_bones == bones
    assert rig.rms_overall <= 0.3, rig.rms_error
    rms, worst = measured_errors(rig, capsule.vertices)
    np.testing.assert_allclose(rig.rms_error, rms, atol=1e-3)
    np.testing.assert_allclose(rig.max_error, worst, atol=1e-3)
    check_weights(rig.weights)
    check_tree(rig.parents)
    joints = rig.heads[rig.parents >= 0]                # a child's head is its joint with its parent
    distance = np.linalg.norm(capsule.joints[:, None] - joints[None], axis=2)
    assert distance.min(1).max() / diag <= 0.03, distance.min(1) / diag
    ends = torch.as_tensor(np.concatenate([rig.heads, rig.tails]), dtype=torch.float64)
    inside = winding_numbers(ends, torch.as_tensor(rig.rest_vertices, dtype=torch.float64),
                             torch.as_tensor(rig.faces, dtype=torch.long))
    assert (inside > 0.5).all(), inside
    assert (np.linalg.norm(rig.tails - rig.heads, axis=1) > 0.005 * diag).all()


def test_points_outside_are_moved_inside():
    """A bone end outside the mesh goes into the middle of the mesh under its nearest vertex, or slides
    towards its (inside) anchor until it is in."""
    capsule = skinned_capsule(bones=2, frames=2, rings=16, around=12)
    rest = torch.as_tensor(capsule.vertices[0], dtype=torch.float64)
    faces = torch.as_tensor(capsule.faces, dtype=torch.long)
    outside = torch.tensor([[0.4, 0.0, 0.0], [0.0, 0.0, 1.2], [0.05, 0.0, 0.1]], dtype=torch.float64)
    moved = move_inside(outside, rest, faces)
    assert (winding_numbers(moved, rest, faces) > 0.5).all()
    torch.testing.assert_close(moved[2], outside[2])                  # already inside: unchanged
    assert abs(float(moved[0, 0])) < 0.05                             # middle of the 0.15 radius tube
    slid = pull_inside(outside[:2], torch.zeros(2, 3, dtype=torch.float64), rest, faces)
    assert (winding_numbers(slid, rest, faces) > 0.5).all()
    assert float(slid[1, 2]) > 0.6                                    # stays near the end it came from


def test_weights_are_smooth_over_the_mesh():
    """Along mesh edges the fitted weights change no more abruptly than the true (smoothstep) weights do."""
    capsule = skinned_capsule(bones=3, frames=10, rings=24, around=12)
    rig = fit_rig(capsule.vertices, capsule.faces, settings=RigSettings(bones=3))
    edges = np.concatenate([capsule.faces[:, [0, 1]], capsule.faces[:, [1, 2]], capsule.faces[:, [2, 0]]])
    # match the fitted bones to the true ones by their overlap, then compare the jumps along edges
    order = np.argmax(capsule.weights.T @ rig.weights, axis=1)
    fitted, true = rig.weights[:, order], capsule.weights
    jump = np.abs(fitted[edges[:, 0]] - fitted[edges[:, 1]]).sum(1).mean()
    true_jump = np.abs(true[edges[:, 0]] - true[edges[:, 1]]).sum(1).mean()
    assert jump <= 1.5 * true_jump + 1e-3, (jump, true_jump)
    assert np.abs(fitted - true).max() < 0.35


def test_fewer_bones_than_needed_reports_the_error():
    capsule = skinned_capsule(bones=3, frames=8, rings=24, around=12)
    rig = fit_rig(capsule.vertices, capsule.faces, settings=RigSettings(bones=2))
    assert rig.num_bones == 2
    rms, worst = measured_errors(rig, capsule.vertices)
    np.testing.assert_allclose(rig.rms_error, rms, atol=1e-3)
    np.testing.assert_allclose(rig.max_error, worst, atol=1e-3)
    assert rig.rms_overall > 0.5                        # two bones cannot bend at two joints


def test_breathing_is_bounded_and_correctives_make_it_exact():
    """Non-rigid swelling: the rig carries the motion with a reported, bounded error; with correctives the
    reconstruction is exact."""
    capsule = skinned_capsule(bones=3, frames=10, rings=24, around=12, breathing=0.25)
    rig = fit_rig(capsule.vertices, capsule.faces, settings=RigSettings(bones=3, correctives=True))
    rms, worst = measured_errors(rig, capsule.vertices)
    np.testing.assert_allclose(rig.rms_error, rms, atol=1e-3)
    np.testing.assert_allclose(rig.max_error, worst, atol=1e-3)
    assert 0.05 < rig.rms_overall < 2.0 and rig.max_overall < 5.0
    assert rig.correctives.shape == capsule.vertices.shape and rig.correctives.dtype == np.float32
    exact_rms, exact_max = measured_errors(rig, capsule.vertices, correctives=True)
    assert exact_max.max() < 1e-3                       # % of the diagonal: float32 rounding only
    auto = fit_rig(capsule.vertices, capsule.faces, settings=RigSettings(max_bones=6))
    assert auto.rms_overall <= rig.rms_overall + 1e-3 and auto.num_bones <= 6


def test_static_mesh_gives_one_static_bone():
    capsule = skinned_capsule(bones=2, frames=4, rings=12, around=8)
    still = np.repeat(capsule.vertices[:1], 4, axis=0)
    rig = fit_rig(still, capsule.faces)
    assert rig.num_bones == 1 and rig.parents.tolist() == [-1]
    np.testing.assert_allclose(rig.transforms, np.broadcast_to(np.eye(4), (4, 1, 4, 4)), atol=1e-6)
    assert rig.max_overall < 1e-4
    check_weights(rig.weights)


@pytest.mark.parametrize("case, message", [
    ("one frame", "at least 2 frames"),
    ("nan", "NaN"),
    ("bad faces", "Face indices"),
    ("no faces", "triangle faces"),
    ("rest frame", "rest frame"),
])
def test_degenerate_input_is_refused(case, message):
    capsule = skinned_capsule(bones=2, frames=4, rings=12, around=8)
    vertices, faces, kwargs = capsule.vertices.copy(), capsule.faces.copy(), {}
    if case == "one frame":
        vertices = vertices[:1]
    elif case == "nan":
        vertices[2, 5, 1] = np.nan
    elif case == "bad faces":
        faces[0, 0] = len(vertices[0])
    elif case == "no faces":
        faces = faces[:0]
    elif case == "rest frame":
        kwargs["rest_frame"] = 9
    with pytest.raises(InputError, match=message):
        fit_rig(vertices, faces, **kwargs)


def test_rig_file_and_command_line(tmp_path, capsys):
    """`rig ANIM.npz RIG.npz` reads what `engine animate` / `register` write (the rest pose is the reference
    frame) and writes exactly the documented arrays; bad input exits with 2 and one error line."""
    capsule = skinned_capsule(bones=3, frames=6, rings=24, around=12)
    anim = tmp_path / "anim.npz"
    save_animation(anim, SimpleNamespace(faces=capsule.faces, vertices=capsule.vertices, colors=None,
                                         fit_error=np.zeros(6, np.float32), reference_frame=2,
                                         info={"bad_frames": []}))              # the writer `animate` uses
    out = tmp_path / "rig.npz"
    assert rig_main([str(anim), str(out), "--bones", "3", "--correctives"]) == 0
    assert "3 bones" in capsys.readouterr().out
    with np.load(out) as data:
        assert sorted(data.files) == sorted(FIELDS + ("correctives",))
        T, V, B = 6, capsule.vertices.shape[1], 3
        expected = {"rest_vertices": (V, 3), "weights": (V, B), "transforms": (T, B, 4, 4), "parents": (B,),
                    "heads": (B, 3), "tails": (B, 3), "rms_error": (T,), "max_error": (T,), "correctives": (T, V, 3)}
        for name, shape in expected.items():
            assert data[name].shape == shape, name
        assert data["weights"].dtype == np.float32
        np.testing.assert_array_equal(data["rest_vertices"], capsule.vertices[2])
        np.testing.assert_array_equal(data["faces"], capsule.faces)
        np.testing.assert_allclose(data["transforms"][:, :, 3], np.broadcast_to([0, 0, 0, 1], (T, B, 4)))
    rig = Rig.load(out)
    rms, _ = measured_errors(rig, capsule.vertices)
    np.testing.assert_allclose(rig.rms_error, rms, atol=1e-3)

    assert rig_main([str(anim), str(tmp_path / "auto.npz")]) == 0
    with np.load(tmp_path / "auto.npz") as data:
        assert "correctives" not in data.files
    bad = tmp_path / "bad.npz"
    np.savez(bad, vertices=capsule.vertices[:1], faces=capsule.faces)
    assert rig_main([str(bad), str(tmp_path / "x.npz")]) == 2
    assert "at least 2 frames" in capsys.readouterr().err
    assert rig_main([str(tmp_path / "missing.npz"), str(tmp_path / "x.npz")]) == 2
    assert rig_main([str(anim), str(out), "--bones", "zero"]) == 2
    assert rig_main([str(anim), str(out), "--device", "gpu"]) == 2
    assert "invalid device 'gpu'" in capsys.readouterr().err
