"""Clips longer than the model's window (engine.windows): the window plan, known frames held by the sampler,
continuation between windows on the tiny random-weight pipeline (its output is noise, but the bookkeeping
is exact), cancel and resume, results on disk, and registration of a long synthetic clip."""
from dataclasses import asdict

import numpy as np
import pytest
import torch

from ss4d_blender.engine.api import GenerateSettings, animate, generate
from ss4d_blender.engine.errors import Cancelled, InputError
from ss4d_blender.engine.progress import Progress
from ss4d_blender.engine.result import GenerationResult, load_result
from ss4d_blender.engine.sampler import FlowEulerSampler, KnownFrames, flow_times
from ss4d_blender.engine.types import Mesh
from ss4d_blender.engine.windows import (WindowCache, WindowRecord, cache_folder_for, frames_digest, known_frames,
                                         plan_windows, settings_key, window_seed)
from ss4d_blender.testing.synthetic import make_sequence, registration_errors

from test_engine_api import assert_results_equal

CLIP = 72                                          # frames: three windows of 32 with an overlap of 8


# ------------------------------------------------------------------------------------------ plan
def test_window_plan_covers_the_clip_and_ends_on_its_last_frame():
    assert plan_windows(72) == [(0, 32), (24, 56), (40, 72)]
    assert plan_windows(32) == [(0, 32)] and plan_windows(5) == [(0, 5)]
    assert plan_windows(33) == [(0, 32), (1, 33)]
    assert plan_windows(240, 32, 8)[-1] == (208, 240)
    for total, window, overlap in [(72, 32, 8), (100, 16, 4), (257, 32, 0), (96, 32, 16)]:
        plan = plan_windows(total, window, overlap)
        assert plan[0][0] == 0 and plan[-1][1] == total
        assert all(stop - start == window for start, stop in plan)
        for k in range(1, len(plan)):          # every window continues the one before by >= overlap frames
            assert overlap <= known_frames(plan, k) < window
    assert known_frames(plan_windows(72), 2) == 16


@pytest.mark.parametrize("window,overlap,step,words", [(31, 8, 1, "even"), (32, 7, 1, "even"),
                                                      (32, 32, 1, "below"), (32, 8, 0, "step")])
def test_bad_window_settings_are_refused(window, overlap, step, words):
    frames = np.zeros((4, 8, 8, 4), np.uint8)
    frames[..., 3] = 255
    with pytest.raises(InputError, match=words):
        generate(frames, GenerateSettings(pipeline="/nonexistent", window=window, overlap=overlap, step=step))


def test_window_seeds_are_fixed_and_distinct():
    assert window_seed(7, 0) == 7
    seeds = [window_seed(7, k) for k in range(1, 50)]
    assert seeds == [window_seed(7, k) for k in range(1, 50)] and len(set(seeds)) == len(seeds)
    assert window_seed(8, 1) != window_seed(7, 1)


# ------------------------------------------------------------------------------------------ sampler
class RecordingModel(torch.nn.Module):
    """A velocity that depends on every entry (so held entries steer the others); records its inputs."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x, t, cond, **kw):
        self.inputs.append(x.clone())
        return 0.3 * x + 0.1 * x.mean(0, keepdim=True) + cond.mean() + t[:, None, None] * 1e-3


def test_known_frames_follow_the_forward_process_and_end_exact():
    g = torch.Generator().manual_seed(0)
    noise, clean = torch.randn(6, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    cond = torch.randn(1, 4, 8, generator=g)
    index = torch.tensor([0, 1])
    sampler = FlowEulerSampler(sigma_min=1e-5)
    model = RecordingModel()
    known = KnownFrames(index, clean, noise[:2])
    out = sampler.sample(model, noise, cond, steps=4, rescale_t=3.0, known=known).samples
    times = flow_times(4, 3.0)
    for x, t in zip(model.inputs, times[:-1]):
        expected = (1 - t) * clean + (1e-5 + (1 - 1e-5) * t) * noise[:2]
        torch.testing.assert_close(x[:2], expected, rtol=0, atol=1e-6)
    assert torch.equal(out[:2], clean)
    free = FlowEulerSampler(sigma_min=1e-5).sample(RecordingModel(), noise, cond, steps=4, rescale_t=3.0).samples
    assert not torch.allclose(out[2:], free[2:])   # the free frames see the known ones


# ------------------------------------------------------------------------------------------ tiny pipeline
@pytest.fixture(scope="module")
def clip():
    """A disc moving across 72 small frames at constant speed."""
    yy, xx = np.mgrid[0:48, 0:48]
    frames = np.zeros((CLIP, 48, 48, 4), np.uint8)
    for t in range(CLIP):
        cx, cy = 14 + 20 * t / (CLIP - 1), 24 + 4 * np.sin(t / 6)
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 < 100
        frames[t, inside] = (200, 80 + t, 60, 255)
    return frames


def settings_for(tiny, **kw):
    return GenerateSettings(**{"pipeline": str(tiny), "device": "cpu", "steps": 2, "mesh_decoder": None, **kw})


@pytest.fixture(scope="module")
def uninterrupted(tiny, clip, tmp_path_factory):
    folder = tmp_path_factory.mktemp("windows")
    stages = []
    result = generate(clip, settings_for(tiny), Progress(lambda s, f: stages.append(s)), window_cache=folder)
    return result, folder, stages


@pytest.mark.slow
def test_long_clip_runs_in_windows_that_continue_each_other(tiny, clip, uninterrupted):
    result, folder, stages = uninterrupted
    settings = settings_for(tiny)
    assert result.settings["windows"] == [[0, 32], [24, 56], [40, 72]]
    assert result.num_frames == CLIP and len(result.meshes) == CLIP and len(result.gaussians) == CLIP
    assert sorted(set(result.coords[:, 0].tolist())) == list(range(CLIP))
    assert "Window 2 of 3 · Sampling structure" in stages and "Window 3 of 3 · Cleaning meshes" in stages
    plan = plan_windows(CLIP)
    cache = WindowCache(folder, settings_key(asdict(settings), CLIP, clip.shape[1:]))
    records = [cache.load(k, frames_digest(clip[s:e])) for k, (s, e) in enumerate(plan)]
    assert all(r is not None for r in records)
    for k in range(1, len(plan)):
        before, after = records[k - 1], records[k]
        known = known_frames(plan, k)
        first = (before.stop - before.start) - known
        # structure: the held latent and the occupancy of the known frames are the previous window's
        np.testing.assert_array_equal(after.structure_latent[:known], before.structure_latent[first:])
        np.testing.assert_array_equal(after.structure_noise[:known], before.structure_noise[first:])
        prev = before.coords[before.coords[:, 0] >= first] - np.array([first, 0, 0, 0], np.int32)
        rows = after.coords[:, 0] < known
        np.testing.assert_array_equal(after.coords[rows], prev)
        # latents: same rows, same values (within 1e-5), same noise
        np.testing.assert_allclose(after.latents[rows], before.latents[before.coords[:, 0] >= first], atol=1e-5)
        np.testing.assert_array_equal(after.latent_noise[rows], before.latent_noise[before.coords[:, 0] >= first])
        # the new frames are generated, not copied: their noise is this window's own
        assert not np.allclose(after.structure_noise[known:], before.structure_noise[:len(after.structure_noise)
                                                                                      - known])


@pytest.mark.slow
def test_cancel_after_a_window_then_resume_gives_the_uninterrupted_result(tiny, clip, uninterrupted, tmp_path):
    expected = uninterrupted[0]
    stages = []

    def cancel_in_window_two(stage, fraction):
        stages.append(stage)
        if stage.startswith("Window 2 of 3 · Sampling latents"):
            progress.cancel()

    progress = Progress(cancel_in_window_two)
    with pytest.raises(Cancelled):
        generate(clip, settings_for(tiny), progress, window_cache=tmp_path)
    stored = sorted(p.name for p in tmp_path.glob("*/window_*.safetensors"))
    assert stored == ["window_000.safetensors"]          # the finished window is kept, nothing half-made
    stages.clear()
    resumed = generate(clip, settings_for(tiny), Progress(lambda s, f: stages.append(s)), window_cache=tmp_path)
    assert not any(s.startswith("Window 1 of 3") for s in stages)   # resumed after the finished window
    assert "Window 2 of 3 · Sampling structure" in stages
    resumed.settings["seconds"] = expected.settings["seconds"]
    assert_results_equal(resumed, expected)
    # the result file written from frames on disk reads back the same, eagerly and lazily
    path = resumed.save(tmp_path / "result.safetensors")
    for lazy in (False, True):
        loaded = load_result(path, lazy=lazy)
        assert_results_equal(loaded, expected)
        assert loaded.settings["windows"] == [[0, 32], [24, 56], [40, 72]]


def test_window_cache_only_answers_for_the_same_settings_and_frames(tmp_path):
    rng = np.random.default_rng(0)
    arrays = dict(structure_latent=rng.normal(size=(4, 8, 2, 2, 2)).astype(np.float32),
                  structure_noise=rng.normal(size=(4, 8, 2, 2, 2)).astype(np.float32),
                  coords=np.array([[0, 1, 1, 1], [2, 0, 1, 0], [3, 1, 0, 0]], np.int32),
                  latents=rng.normal(size=(3, 8)).astype(np.float32),
                  latent_noise=rng.normal(size=(3, 8)).astype(np.float32),
                  slat_feats=rng.normal(size=(2, 8)).astype(np.float32))
    mesh = Mesh(rng.normal(size=(5, 3)).astype(np.float32), np.array([[0, 1, 2], [2, 3, 4]], np.int32))
    record = WindowRecord(1, 6, 10, 8, "abc", meshes=[mesh, mesh], **arrays)
    WindowCache(tmp_path, "key1").save(record)
    assert WindowCache(tmp_path, "key1").load(1, "other frames") is None
    assert WindowCache(tmp_path, "key2").load(1, "abc") is None
    assert WindowCache(tmp_path, "key1").load(0, "abc") is None
    loaded = WindowCache(tmp_path, "key1").load(1, "abc", with_frames=True)
    for name, a in arrays.items():
        np.testing.assert_array_equal(getattr(loaded, name), a)
    assert (loaded.start, loaded.stop, loaded.first_new) == (6, 10, 8)
    np.testing.assert_array_equal(loaded.new_rows(), [False, True, True])
    np.testing.assert_array_equal(loaded.meshes[1].faces, mesh.faces)
    WindowCache(tmp_path, "key1").path(1).write_bytes(b"damaged")
    assert WindowCache(tmp_path, "key1").load(1, "abc") is None
    assert cache_folder_for(tmp_path / "out") == tmp_path / ".out.ss4d-windows"
    keyed = settings_key(asdict(GenerateSettings()), 72, (48, 48, 4))
    assert keyed == settings_key(asdict(GenerateSettings(device="cuda", low_vram=True)), 72, (48, 48, 4))
    assert keyed != settings_key(asdict(GenerateSettings(seed=1)), 72, (48, 48, 4))
    assert keyed != settings_key(asdict(GenerateSettings()), 73, (48, 48, 4))


@pytest.mark.slow
def test_step_and_small_windows_in_memory_and_on_disk_agree(tiny, clip, tmp_path):
    settings = settings_for(tiny, step=2, window=6, overlap=2, steps=1)
    in_memory = generate(clip[:20], settings)
    assert in_memory.num_frames == 10 and in_memory.settings["windows"] == [[0, 6], [4, 10]]
    assert isinstance(in_memory.meshes, list) and len(in_memory.meshes) == 10
    on_disk = generate(clip[:20], settings, window_cache=tmp_path)
    assert not isinstance(on_disk.meshes, list) and len(on_disk.meshes) == 10
    on_disk.settings["seconds"] = in_memory.settings["seconds"]
    assert_results_equal(on_disk, in_memory)


# ------------------------------------------------------------------------------------------ registration
@pytest.mark.slow
def test_registration_through_a_long_clip_keeps_one_mesh_without_drift_or_jumps(tmp_path):
    """96 frames of a bend at constant speed, every frame meshed on its own, registered from the result file
    one frame at a time: no drift at the end, no jump where windows meet."""
    frames = 96
    seq = make_sequence("capsule_bend", frames, resolution=0.5, seed=1)
    meshes = [Mesh(v, f) for v, f in zip(seq.vertices, seq.faces)]
    result = GenerationResult(num_frames=frames, coords=np.zeros((0, 4), np.int32),
                              slat_feats=np.zeros((0, 8), np.float32), gaussians=[], meshes=meshes)
    stored = load_result(result.save(tmp_path / "result.safetensors"), lazy=True)
    assert not isinstance(stored.meshes, list)
    anim = animate(stored, target_vertices=600)
    assert anim.vertices.shape[0] == frames and anim.info["bad_frames"] == []
    corr, surf, _ = registration_errors(seq, anim)
    print(f"96 frames: corr max {corr.max():.3%} (frame {corr.argmax()}), end {corr[-1]:.3%} / {corr[0]:.3%}, "
          f"surface max {surf.max():.3%}")
    assert corr[0] <= 0.01 and corr[-1] <= 0.01          # drift at either end <= 1 % of the diagonal
    motion = np.linalg.norm(np.diff(anim.vertices, axis=0), axis=-1).mean(-1)   # [T-1] mean vertex motion
    plan = plan_windows(frames)
    boundaries = [plan[k - 1][1] - 1 for k in range(1, len(plan))]   # last frame of window k-1 -> next frame
    print("motion median", np.median(motion), "at boundaries", motion[boundaries])
    assert (motion[boundaries] <= 2 * np.median(motion)).all()


# ------------------------------------------------------------------------------------------ timeline
@pytest.mark.blender
@pytest.mark.parametrize("mode", ["shape_keys", "mesh_cache"])
def test_every_generated_frame_plays_at_its_scene_frame_with_linear_in_betweens(mode, tmp_path):
    bpy = pytest.importorskip("bpy")
    from ss4d_blender.blender.scene_build import build_animated_object, placement

    bpy.ops.wm.read_factory_settings(use_empty=True)
    rng = np.random.default_rng(0)
    faces = np.array([[0, 1, 2], [0, 2, 3], [0, 3, 1], [1, 3, 2]], np.int32)
    vertices = (np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)[None]
                + 0.2 * rng.normal(size=(6, 4, 3)).astype(np.float32))
    scene_frames = [10, 12, 14, 16, 18, 20]                    # a strip from frame 10, every other frame (step 2)
    obj = build_animated_object(bpy.context, "clip", faces, vertices, None, scene_frames, 0, 2.0, mode=mode,
                                cache_path=str(tmp_path / "clip.pc2"))
    if mode == "shape_keys":
        assert [k.name for k in obj.data.shape_keys.key_blocks][1:] == [f"Frame {f}" for f in scene_frames]
    else:
        assert obj.data.shape_keys is None and obj.modifiers[0].type == "MESH_CACHE"
    scale, offset = placement(vertices, 2.0)
    local = (vertices - offset) * scale
    scene = bpy.context.scene
    co = np.empty(12, np.float32)
    for frame, expected in [(10, local[0]), (14, local[2]), (15, 0.5 * (local[2] + local[3])), (20, local[5])]:
        scene.frame_set(frame)
        evaluated = obj.evaluated_get(bpy.context.evaluated_depsgraph_get())
        mesh = evaluated.to_mesh()
        mesh.vertices.foreach_get("co", co)
        evaluated.to_mesh_clear()
        np.testing.assert_allclose(co.reshape(4, 3), expected, atol=1e-5)
