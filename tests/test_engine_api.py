"""engine.api end to end on the tiny random-weight pipeline (CPU), result file, input checks, cancel,
hub resolution, frame reading (engine.video). The `network` test runs the released weights."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ss4d_blender.engine import hub
from ss4d_blender.engine.api import GenerateSettings, generate
from ss4d_blender.engine.errors import Cancelled, InputError, WeightsError
from ss4d_blender.engine.gaussians import load_ply, save_ply
from ss4d_blender.engine.preprocess import stack_frames
from ss4d_blender.engine.progress import Progress
from ss4d_blender.engine.result import load_result
from ss4d_blender.engine.video import natural_key, read_frames

from media import write_video

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def boxing(shared_dir) -> Path:
    return shared_dir / "samples" / "boxing"


def settings_for(tiny: Path, **kw) -> GenerateSettings:
    return GenerateSettings(pipeline=str(tiny), device="cpu", **kw)


def assert_results_equal(a, b):
    assert a.num_frames == b.num_frames and a.is_random_weights == b.is_random_weights
    assert a.settings == b.settings
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_array_equal(a.slat_feats, b.slat_feats)
    assert len(a.gaussians) == len(b.gaussians) and len(a.meshes) == len(b.meshes)
    for ga, gb in zip(a.gaussians, b.gaussians):
        for name in ("xyz", "features_dc", "opacity", "scaling", "rotation"):
            np.testing.assert_array_equal(getattr(ga, name), getattr(gb, name))
    for ma, mb in zip(a.meshes, b.meshes):
        np.testing.assert_array_equal(ma.vertices, mb.vertices)
        np.testing.assert_array_equal(ma.faces, mb.faces)
        assert (ma.colors is None) == (mb.colors is None)
        if ma.colors is not None:
            np.testing.assert_array_equal(ma.colors, mb.colors)


# ------------------------------------------------------------------------------------------ end to end
def test_generate_four_frames_end_to_end(tiny, boxing, tmp_path):
    started = time.perf_counter()
    frames = read_frames(boxing, frame_indices=range(4))
    stages = []
    result = generate(frames, settings_for(tiny), Progress(lambda s, f: stages.append((s, f))))
    path = result.save(tmp_path / "result.safetensors")
    loaded = load_result(path)
    elapsed = time.perf_counter() - started
    print(f"tiny pipeline, 4 frames 512x512 -> result + file round trip: {elapsed:.1f} s "
          f"(generate {result.settings['seconds']} s)")

    assert frames.shape == (4, 512, 512, 4) and frames.dtype == np.uint8
    assert result.num_frames == 4 and result.is_random_weights
    # structure: every frame has voxels, coordinates inside the 64^3 grid
    assert result.coords.dtype == np.int32 and result.coords.shape[1] == 4
    assert set(np.unique(result.coords[:, 0])) == {0, 1, 2, 3}
    assert result.coords[:, 1:].min() >= 0 and result.coords[:, 1:].max() < 64
    assert result.slat_feats.shape == (len(result.coords), 8) and np.isfinite(result.slat_feats).all()
    # Gaussians per frame, activated, inside (about) the model box
    assert len(result.gaussians) == 4
    for t, g in enumerate(result.gaussians):
        n = (result.coords[:, 0] == t).sum() * 8  # 8 Gaussians per voxel in the tiny decoder
        assert g.xyz.shape == (n, 3) and g.features_dc.shape == (n, 1, 3) and g.opacity.shape == (n, 1)
        assert np.abs(g.xyz).max() < 0.5 + 1.5 / 64
        assert ((g.opacity > 0) & (g.opacity < 1)).all() and (g.scaling > 0).all()
        np.testing.assert_allclose(np.linalg.norm(g.rotation, axis=1), 1, atol=1e-5)
    # meshes per frame from the tiny mesh decoder, cleaned
    assert len(result.meshes) == 4
    for m in result.meshes:
        assert len(m.faces) > 100 and m.faces.min() >= 0 and m.faces.max() < len(m.vertices)
        assert np.isfinite(m.vertices).all() and np.abs(m.vertices).max() < 0.6
        assert m.colors is not None and m.colors.shape == m.vertices.shape
        assert len(m.faces) <= GenerateSettings().mesh_target_faces
    # progress went through the stages in order, each ending at 1
    seen = list(dict.fromkeys(s for s, _ in stages))
    assert seen == ["Loading models", "Encoding frames", "Sampling structure", "Sampling latents", "Decoding",
                    "Meshing", "Cleaning meshes"]
    for stage in seen[1:]:
        assert max(f for s, f in stages if s == stage) == 1.0
    # what produced it is recorded
    s = result.settings
    assert s["pipeline_revision"] == "local" and s["device"] == "cpu" and s["precision"] == "fp32"
    assert s["frames_used"] == 4 and not s["padded_frame"] and s["mesh_decoder_source"] == "pipeline folder"
    # the result file gives back the same arrays and settings
    assert_results_equal(result, loaded)
    # one frame's Gaussians as a 3DGS .ply and back
    save_ply(tmp_path / "g.ply", result.gaussians[1])
    back = load_ply(tmp_path / "g.ply")
    np.testing.assert_allclose(back.xyz, result.gaussians[1].xyz, atol=1e-6)
    np.testing.assert_allclose(back.opacity, result.gaussians[1].opacity, rtol=1e-4, atol=1e-6)
    assert elapsed < 60, f"end to end took {elapsed:.1f} s"


def test_odd_frame_count_is_padded_and_trimmed(tiny, boxing):
    frames = read_frames(boxing, max_frames=5)  # evenly spaced over the 32 frames
    result = generate(frames, settings_for(tiny, steps=1, mesh_decoder=None))
    assert result.num_frames == 5 and len(result.gaussians) == 5 and len(result.meshes) == 5
    assert result.settings["padded_frame"] and result.settings["frames_used"] == 5
    assert result.settings["steps"] == 1
    assert result.coords[:, 0].max() == 4  # the padding frame's voxels are dropped
    assert set(np.unique(result.coords[:, 0])) == set(range(5))
    # meshes from the Gaussians (random-weight Gaussians are faint: these may be empty, but one per frame)
    assert all(m.vertices.ndim == 2 and m.faces.ndim == 2 for m in result.meshes)
    assert result.settings["mesh_decoder_source"].startswith("none")


def test_same_seed_same_result(tiny, boxing):
    frames = read_frames(boxing, frame_indices=[0, 9])
    fast = dict(steps=1, mesh_decoder=None, seed=3)
    a = generate(frames, settings_for(tiny, **fast))
    b = generate(frames, settings_for(tiny, **fast))
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_array_equal(a.slat_feats, b.slat_feats)
    np.testing.assert_array_equal(a.gaussians[1].xyz, b.gaussians[1].xyz)


# ------------------------------------------------------------------------------------------ bad input
def rgba_frames(count=2, size=32, alpha=255):
    frames = np.zeros((count, size, size, 4), np.uint8)
    frames[:, 8:24, 8:24, :3] = 120
    frames[:, 8:24, 8:24, 3] = alpha
    return frames


@pytest.mark.parametrize("frames, words", [
    (rgba_frames(count=1), ["at least 2 frames", "got 1"]),
    (rgba_frames()[..., :3], ["no alpha channel", "matting"]),
    (rgba_frames(alpha=0), ["no foreground", "alpha channel is empty"]),
    (rgba_frames().astype(np.float32), ["8-bit"]),
    (np.zeros((2, 32, 4), np.uint8), ["different sizes"]),
])
def test_bad_input_is_an_input_error_before_loading(tmp_path, frames, words):
    stages = []
    # a pipeline folder that does not exist: the input is checked before any weights are touched
    with pytest.raises(InputError) as err:
        generate(frames, GenerateSettings(pipeline=str(tmp_path), device="cpu"),
                 Progress(lambda s, f: stages.append(s)))
    message = str(err.value).lower()
    for word in words:
        assert word in message, message
    assert "Sampling structure" not in stages


def test_frames_of_different_sizes(tmp_path):
    with pytest.raises(InputError, match="same size"):
        stack_frames([np.zeros((4, 4, 4), np.uint8), np.zeros((4, 5, 4), np.uint8)])
    folder = tmp_path / "frames"
    folder.mkdir()
    Image.new("RGBA", (16, 16)).save(folder / "0.png")
    Image.new("RGBA", (20, 16)).save(folder / "1.png")
    with pytest.raises(InputError) as err:
        read_frames(folder)
    assert "same size" in str(err.value) and "1.png is 20x16" in str(err.value) and "0.png is 16x16" in str(err.value)


def test_cancel_from_the_progress_callback(tiny, boxing):
    frames = read_frames(boxing, frame_indices=[0, 1])
    stages = []
    progress = Progress()

    def callback(stage, fraction):
        stages.append(stage)
        if stage == "Sampling structure" and fraction > 0:
            progress.cancel()  # as the UI does from another thread; honoured at the next update

    progress.callback = callback
    with pytest.raises(Cancelled):
        generate(frames, settings_for(tiny, mesh_decoder=None), progress)
    assert "Sampling latents" not in stages and "Sampling structure" in stages
    # a cancelled Progress stops a new run at once
    with pytest.raises(Cancelled):
        generate(frames, settings_for(tiny), progress)


def test_cancel_while_cleaning_meshes_stops_between_frames(tiny, boxing, monkeypatch):
    """Cleaning and decimating the frames' meshes is CPU work of up to ~15 s a frame at full size: it
    reports per frame, and a cancel stops it before the next frame."""
    from ss4d_blender.engine import mesh as mesh_module

    cleaned, stages = [], []
    progress = Progress(callback=lambda stage, fraction: stages.append((stage, fraction)))
    real_clean = mesh_module.clean_mesh

    def clean_then_press_esc(m, **kwargs):     # the user cancels while the first frame is being cleaned
        cleaned.append(m)
        progress.cancel()
        return real_clean(m, **kwargs)

    monkeypatch.setattr(mesh_module, "clean_mesh", clean_then_press_esc)
    with pytest.raises(Cancelled):
        generate(read_frames(boxing, frame_indices=[0, 1, 2]), settings_for(tiny, mesh_decoder=None), progress)
    assert len(cleaned) == 1 and stages[-1] == ("Cleaning meshes", 0.0)


def test_out_of_memory_in_a_stage_says_what_to_lower(tiny, boxing):
    """An accelerator OOM inside a stage (raised here from the stage's own progress report) becomes
    DeviceOutOfMemory naming the stage and what to lower; other errors pass through unchanged."""
    import torch

    from ss4d_blender.engine.errors import DeviceOutOfMemory

    frames = read_frames(boxing, frame_indices=[0, 1])

    def fail_in(stage, error):
        def callback(current, fraction):
            if current == stage and fraction > 0:
                raise error
        return Progress(callback)

    with pytest.raises(DeviceOutOfMemory) as err:
        generate(frames, settings_for(tiny, mesh_decoder=None),
                 fail_in("Sampling latents", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")))
    message = str(err.value)
    assert "ran out of memory while sampling latents" in message
    assert "fewer frames" in message and "Low VRAM" in message and "lower precision" in message
    with pytest.raises(ValueError, match="not memory"):
        generate(frames, settings_for(tiny, mesh_decoder=None), fail_in("Sampling structure", ValueError("not memory")))


# ------------------------------------------------------------------------------------------ result file
def test_result_module_imports_without_torch():
    code = ("import sys; import ss4d_blender.engine.result as r; from safetensors.numpy import save_file; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_load_result_rejects_other_files(tmp_path):
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an SS4D result"):
        load_result(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        load_result(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------------------ hub
def test_hub_resolves_a_local_folder(tiny):
    folder, revision = hub.resolve(str(tiny))
    assert folder == tiny.resolve() and revision == "local"
    with pytest.raises(WeightsError, match="neither a folder nor a hub repository"):
        hub.resolve(str(tiny / "no" / "such" / "folder"))


def test_hub_offline_without_cache_is_a_clear_error(tmp_path):
    code = ("from ss4d_blender.engine import hub\n"
            "from ss4d_blender.engine.errors import WeightsError\n"
            "try:\n"
            f"    hub.resolve('lizb6626/SS4D', cache_dir={str(tmp_path / 'empty_cache')!r}, progress=False)\n"
            "except WeightsError as err:\n"
            "    print('WeightsError:', err)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("WeightsError:"), out.stdout + out.stderr
    assert "offline" in out.stdout and "lizb6626/SS4D" in out.stdout


def _fake_cached_repo(cache: Path, repo_id: str, files: dict, commit: str, branch: str = "main") -> None:
    """Writes repo files in the hub cache layout huggingface_hub uses (refs/<branch> -> snapshots/<commit>)."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / branch).write_text(commit)
    for name, text in files.items():
        path = root / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_weights_status_reads_the_hub_cache_without_network(tmp_path, tiny, monkeypatch):
    from huggingface_hub import try_to_load_from_cache

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cache = tmp_path / "cache"
    status = hub.weights_status(hub.SS4D_REPO, None, "auto", str(cache))
    assert [ready for ready, _ in status] == [False, False, False]
    assert all("not downloaded yet (click Download Weights)" in line for _, line in status)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "offline: set a local folder" in hub.weights_status(hub.SS4D_REPO, None, "auto", str(cache))[0][1]

    ss4d, dino, trellis = "a" * 40, "b" * 40, "c" * 40
    _fake_cached_repo(cache, hub.SS4D_REPO, {"pipeline.json": '{"args": {}}'}, ss4d)
    _fake_cached_repo(cache, hub.DINOV2_REPO, {"model.safetensors": "x"}, dino)
    _fake_cached_repo(cache, hub.TRELLIS_REPO, {hub.MESH_DECODER_CKPT + ".safetensors": "x"}, trellis)
    # our reading of the layout agrees with huggingface_hub's own
    assert try_to_load_from_cache(hub.SS4D_REPO, "pipeline.json", cache_dir=cache) == \
        str(hub.cached_snapshot(hub.SS4D_REPO, None, str(cache)) / "pipeline.json")
    status = hub.weights_status(hub.SS4D_REPO, None, "auto", str(cache))
    assert all(ready for ready, _ in status), status
    assert status[0][1] == "SS4D: lizb6626/SS4D downloaded (commit aaaaaaa)"
    assert "(commit ccccccc)" in status[2][1]
    # a pinned revision that is not in the cache, and 'none' for the mesh decoder
    status = hub.weights_status(hub.SS4D_REPO, "d" * 40, "none", str(cache))
    assert status[0][0] is False and status[2] == (True, "Mesh decoder: none (meshes from the Gaussians)")

    # a local pipeline folder (the tiny one carries its own DINOv2 and mesh decoder)
    status = hub.weights_status(str(tiny), None, "auto", str(tmp_path / "empty"))
    assert all(ready for ready, _ in status), status
    assert status[0][1] == "SS4D: local folder ready" and status[2][1] == "Mesh decoder: in the SS4D folder"
    assert hub.weights_status(str(tmp_path), None, "none", None)[0] == \
        (False, "SS4D: local folder has no pipeline.json")


# ------------------------------------------------------------------------------------------ frame reading
def test_read_frames_folder_natural_order_and_selection(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in (0, 1, 2, 10, 11):  # natural order: 0 1 2 10 11 (not 0 1 10 11 2)
        a = np.zeros((6, 8, 4), np.uint8)
        a[..., 0] = i
        a[..., 3] = 255
        Image.fromarray(a, "RGBA").save(folder / f"frame_{i}.png")
    (folder / "notes.txt").write_text("ignored")
    assert sorted(["f10.png", "f2.png", "f1.png"], key=natural_key) == ["f1.png", "f2.png", "f10.png"]
    frames = read_frames(folder)
    assert frames.shape == (5, 6, 8, 4) and frames.dtype == np.uint8
    assert frames[:, 0, 0, 0].tolist() == [0, 1, 2, 10, 11]
    assert read_frames(folder, max_frames=3)[:, 0, 0, 0].tolist() == [0, 2, 11]
    assert read_frames(folder, frame_indices=[4, 1])[:, 0, 0, 0].tolist() == [11, 1]
    with pytest.raises(InputError, match="out of range"):
        read_frames(folder, frame_indices=[5])


def test_read_frames_npz_and_other_image_modes(tmp_path):
    frames = rgba_frames(count=3)
    np.savez(tmp_path / "clip.npz", frames=frames)
    np.testing.assert_array_equal(read_frames(tmp_path / "clip.npz"), frames)
    np.testing.assert_array_equal(read_frames(tmp_path / "clip.npz", max_frames=2), frames[[0, 2]])
    np.savez(tmp_path / "rgb.npz", frames=frames[..., :3])
    with pytest.raises(InputError, match="no alpha channel"):
        read_frames(tmp_path / "rgb.npz")
    np.savez(tmp_path / "wrong.npz", images=frames)
    with pytest.raises(InputError, match="no array named 'frames'"):
        read_frames(tmp_path / "wrong.npz")
    # grey + alpha and a palette with a transparent index become RGBA
    folder = tmp_path / "modes"
    folder.mkdir()
    Image.fromarray(np.full((4, 4, 2), 200, np.uint8), "LA").save(folder / "a1.png")
    Image.fromarray(rgba_frames(count=1, size=4)[0], "RGBA").save(folder / "a2.webp", lossless=True)
    out = read_frames(folder)
    assert out.shape == (2, 4, 4, 4)
    assert (out[0] == 200).all()


@pytest.fixture(scope="module")
def boxing_small(shared_dir):
    files = sorted((shared_dir / "samples" / "boxing").glob("*.png"))[:6]
    return np.stack([np.asarray(Image.open(f).convert("RGBA").resize((96, 96))) for f in files])


@pytest.mark.parametrize("name,codec,pix_fmt", [("png.mov", "png", "rgba"), ("qtrle.mov", "qtrle", "argb"),
                                                ("ffv1.mkv", "ffv1", "bgra")])
def test_read_frames_lossless_videos_with_alpha(tmp_path, boxing_small, name, codec, pix_fmt):
    path = write_video(tmp_path / name, boxing_small, codec, pix_fmt)
    np.testing.assert_array_equal(read_frames(path), boxing_small)  # lossless: bit exact, alpha included
    np.testing.assert_array_equal(read_frames(path, frame_indices=[5, 0]), boxing_small[[5, 0]])
    np.testing.assert_array_equal(read_frames(path, max_frames=3), boxing_small[[0, 3, 5]])  # 2.5 rounds up
    with pytest.raises(InputError, match="out of range"):
        read_frames(path, frame_indices=[6])


def test_read_frames_webm_vp9_alpha_side_channel(tmp_path, boxing_small):
    """VP9 keeps alpha in a side channel only libvpx decodes; FFmpeg's own vp9 decoder would drop it."""
    path = write_video(tmp_path / "clip.webm", boxing_small, "libvpx-vp9", "yuva420p")
    out = read_frames(path)
    assert out.shape == boxing_small.shape
    alpha_error = np.abs(out[..., 3].astype(int) - boxing_small[..., 3]).mean()
    assert alpha_error < 2.0, alpha_error  # lossy, but the silhouette survives
    assert (out[..., 3] < 128).mean() > 0.3  # truly transparent background, not an opaque fallback
    opaque = boxing_small[..., 3] > 200
    assert np.abs(out[..., :3].astype(int) - boxing_small[..., :3])[opaque].mean() < 10


def test_read_frames_refuses_videos_and_unmatted_images(tmp_path, shared_dir):
    with pytest.raises(InputError) as err:  # H.264, no alpha: the engine does no matting
        read_frames(shared_dir / "samples" / "boxing_green.mp4")
    assert "no alpha channel (pixel format yuv420p)" in str(err.value)
    assert "python -m ss4d_blender generate" in str(err.value) and "--matting chroma" in str(err.value)
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    with pytest.raises(InputError, match="Cannot decode the video|no video stream|no decodable"):
        read_frames(tmp_path / "broken.mp4")
    folder = tmp_path / "rgb"
    folder.mkdir()
    Image.new("RGB", (8, 8), (0, 255, 0)).save(folder / "00.png")
    Image.new("RGB", (8, 8), (0, 255, 0)).save(folder / "01.png")
    with pytest.raises(InputError) as err:
        read_frames(folder)
    assert "no alpha channel" in str(err.value) and "matte" in str(err.value) and "00.png" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="No frame images"):
        read_frames(empty)
    with pytest.raises(InputError, match="not found"):
        read_frames(tmp_path / "missing")
    with pytest.raises(InputError, match="single image"):
        read_frames(folder / "00.png")


# ------------------------------------------------------------------------------------------ real weights
def best_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@pytest.mark.network
def test_released_weights_on_eight_boxing_frames(boxing, tmp_path):
    """Downloads lizb6626/SS4D, TRELLIS's mesh decoder and DINOv2-with-registers (standard HF cache) and runs
    8 evenly spaced boxing frames on the best device."""
    frames = read_frames(boxing, max_frames=8)
    settings = GenerateSettings(device=best_device())
    stages = []
    result = generate(frames, settings, Progress(lambda s, f: stages.append(s)))
    print(f"released weights, 8 frames on {result.settings['device']} ({result.settings['precision']}): "
          f"{result.settings['seconds']} s, {len(result.coords)} voxels, "
          f"faces per frame {[len(m.faces) for m in result.meshes]}")
    assert not result.is_random_weights and result.num_frames == 8
    assert re.fullmatch(r"[0-9a-f]{40}", result.settings["pipeline_revision"])
    assert hub.TRELLIS_REPO in result.settings["mesh_decoder_source"]
    assert len(result.gaussians) == 8 and len(result.meshes) == 8
    for m in result.meshes:
        assert len(m.faces) > 1000 and np.abs(m.vertices).max() < 0.6
    # a boxer is one connected body of similar size in every frame
    extents = np.array([np.ptp(m.vertices, axis=0) for m in result.meshes])
    assert (extents.max(axis=0) / extents.min(axis=0) < 1.5).all(), extents
    loaded = load_result(result.save(tmp_path / "result.safetensors"))
    assert_results_equal(result, loaded)
