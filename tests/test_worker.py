"""The worker process protocol (JSON lines, result files, errors, cancel) with the tiny pipeline."""
import sys

import numpy as np
from PIL import Image

from ss4d_blender.engine.result import load_result
from ss4d_blender.engine.worker import WorkerClient


def frames_npz(folder, shared_dir, n=4):
    files = sorted((shared_dir / "samples" / "boxing").glob("*.png"))[:n]
    np.savez(folder / "frames.npz", frames=np.stack([np.array(Image.open(f).convert("RGBA")) for f in files]))


def test_generate_job_writes_result_and_animation(tmp_path, shared_dir, tiny):
    frames_npz(tmp_path, shared_dir)
    client = WorkerClient(sys.executable, tmp_path, {
        "kind": "generate", "settings": {"pipeline": str(tiny), "device": "cpu", "seed": 3},
        "animate": {"target_vertices": 800}})
    state = client.wait(600)
    assert state.error is None and state.returncode == 0, (state.error, (tmp_path / "worker.log").read_text()[-2000:])
    assert any("random-weight" in w for w in state.warnings)
    result = load_result(state.done["result"])
    assert result.num_frames == 4 and result.settings["seed"] == 3 and result.is_random_weights
    anim = np.load(state.done["animation"])
    assert anim["vertices"].shape[0] == 4 and anim["faces"].shape[1] == 3 and anim["fit_error"].shape == (4,)
    # the animate-only job reuses the result without the model
    job2 = tmp_path / "again"
    client = WorkerClient(sys.executable, job2, {"kind": "animate", "result": state.done["result"],
                                                 "animate": {"target_vertices": 500, "reference_frame": 1}})
    state2 = client.wait(600)
    assert state2.error is None, state2.error
    assert int(np.load(state2.done["animation"])["reference_frame"]) == 1


def test_input_error_is_reported_in_words(tmp_path, tiny):
    np.savez(tmp_path / "frames.npz", frames=np.zeros((3, 32, 32, 4), np.uint8))
    state = WorkerClient(sys.executable, tmp_path, {"kind": "generate", "settings": {"pipeline": str(tiny)}}).wait(300)
    assert state.returncode == 1 and state.error_kind == "InputError" and "No foreground" in state.error


def test_cancel_stops_the_worker(tmp_path, shared_dir, tiny):
    frames_npz(tmp_path, shared_dir)
    (tmp_path / "cancel").touch()  # cancelled before the first step
    state = WorkerClient(sys.executable, tmp_path, {"kind": "generate", "settings": {"pipeline": str(tiny)}}).wait(300)
    assert state.returncode == 3 and state.error == "Cancelled." and state.done is None
    assert not (tmp_path / "result.safetensors").exists()


def test_missing_weights_is_a_weights_error(tmp_path, shared_dir):
    frames_npz(tmp_path, shared_dir, n=2)
    state = WorkerClient(sys.executable, tmp_path, {"kind": "generate",
                                                    "settings": {"pipeline": str(tmp_path / "nowhere")}}).wait(300)
    assert state.returncode == 1 and state.error_kind == "WeightsError"
