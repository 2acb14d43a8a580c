"""Learned matting inside generation: the engine API ("Removing background" before the model loads, what
was used recorded, cancel), bad mattes refused before anything is written, and the headless command on an
ordinary video with the tiny pipeline's own random-weight BiRefNet (no network; its matte is noise)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ss4d_blender.engine.api import STAGES, GenerateSettings, generate
from ss4d_blender.engine.errors import Cancelled, InputError
from ss4d_blender.engine.progress import Progress
from ss4d_blender.engine.video import read_frames

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bird(shared_dir) -> np.ndarray:
    """4 frames of an ordinary (opaque) video, halved to 256 x 256."""
    frames = read_frames(shared_dir / "samples" / "bird_fly_scene.mp4", max_frames=4, require_alpha=False)
    return np.ascontiguousarray(frames[:, ::2, ::2, :3])


def test_generate_removes_the_background_first_and_records_it(tiny, bird):
    stages = []
    settings = GenerateSettings(pipeline=str(tiny), device="cpu", matting="learned", steps=2, mesh_decoder=None)
    clip = np.ascontiguousarray(bird[[0, 3], ::2, ::2])  # 2 frames of 128 x 128
    result = generate(clip, settings, Progress(lambda s, f: stages.append((s, f))))
    seen = list(dict.fromkeys(s for s, _ in stages))
    assert seen[:2] == ["Removing background", "Loading models"] and STAGES[0] == "Removing background"
    assert max(f for s, f in stages if s == "Removing background") == 1.0
    s = result.settings
    assert s["matting"] == "learned" and Path(s["matting_source"]) == tiny / "birefnet"
    assert s["matting_revision"] == "local" and s["matting_variant"]
    assert any("matting model" in w and "RANDOM" in w for w in result.warnings)
    assert result.num_frames == 2


def test_auto_uses_the_source_alpha_when_there_is_one(tmp_path):
    frames = np.zeros((2, 32, 32, 4), np.uint8)
    frames[:, 8:24, 8:24] = 200
    frames[1, ..., 3] = 0  # frame 1 has no object: named, before any weights are touched
    stages = []
    with pytest.raises(InputError) as err:
        generate(frames, GenerateSettings(pipeline=str(tmp_path / "none"), device="cpu", matting="auto"),
                 Progress(lambda s, f: stages.append(s)), frame_numbers=[10, 11])
    assert "No object found in frame 11 by the source's alpha" in str(err.value) and stages == []


def test_a_learned_matte_without_object_names_the_frames(tiny, bird):
    blank = bird.copy()
    blank[:] = 128  # nothing to separate: the stable matte keeps no object in some or all frames
    stages = []
    with pytest.raises(InputError, match=r"No object found in (any frame|frames? [0-9, -]+) .*learned matte"):
        generate(blank, GenerateSettings(pipeline=str(tiny), device="cpu", matting="learned"),
                 Progress(lambda s, f: stages.append(s)))
    assert "Loading models" not in stages


def test_cancel_during_background_removal(tiny, bird):
    progress = Progress()

    def cancel_in_matting(stage, fraction):
        assert stage == "Removing background", stage
        progress.cancel()
    progress.callback = cancel_in_matting
    with pytest.raises(Cancelled):
        generate(bird, GenerateSettings(pipeline=str(tiny), device="cpu", matting="learned"), progress)


def test_engine_matting_flags_and_video_message():
    from ss4d_blender.engine.__main__ import build_parser
    from ss4d_blender.engine.video import VIDEO_NO_ALPHA_MESSAGE

    args = build_parser().parse_args(["generate", "clip.mp4", "-o", "out", "--matting", "learned",
                                      "--matting-quality", "fast"])
    assert (args.matting, args.matting_quality) == ("learned", "fast")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "clip.mp4", "-o", "out", "--matting", "chroma"])
    assert "--matting learned" in VIDEO_NO_ALPHA_MESSAGE
    from ss4d_blender.__main__ import build_parser as headless_parser

    args = headless_parser().parse_args(["generate", "clip.mp4", "-o", "o.blend"])
    assert (args.matting, args.matting_quality) == ("auto", None)  # the panel's default: Automatic, Best
    for mode in ("auto", "alpha", "learned", "chroma"):
        args = headless_parser().parse_args(["generate", "clip.mp4", "-o", "o.blend", "--matting", mode,
                                             "--matting-quality", "fast"])
        assert (args.matting, args.matting_quality) == (mode, "fast")


def test_headless_auto_on_an_ordinary_video_offline(tiny, shared_dir, tmp_path):
    """`./ss4d generate ../shared/samples/bird_fly_scene.mp4 --matting auto --pipeline DIR --frames 4 -o
    out.blend` (./ss4d runs `python -m ss4d_blender` in .venv), with the network off."""
    from ss4d_blender.engine.result import read_metadata

    out = tmp_path / "out.blend"
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "ss4d_blender", "generate",
                          str(shared_dir / "samples" / "bird_fly_scene.mp4"), "--matting", "auto", "--pipeline",
                          str(tiny), "--frames", "4", "-o", str(out)], cwd=REPO, capture_output=True, text=True,
                         timeout=900, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert out.is_file()
    meta = read_metadata(tmp_path / "out_SS4D_bird_fly_scene_ss4d.safetensors")
    assert meta["settings"]["matting"] == "learned" and meta["num_frames"] == 4
    assert Path(meta["settings"]["matting_source"]) == tiny / "birefnet"
    assert "matting model" in run.stdout + run.stderr and "RANDOM weights" in run.stdout + run.stderr


def test_headless_empty_alpha_frames_named_and_nothing_written(tiny, shared_dir, tmp_path):
    from PIL import Image

    folder = tmp_path / "frames"
    folder.mkdir()
    for i, path in enumerate(sorted((shared_dir / "samples" / "boxing").glob("*.png"))[:4]):
        image = np.asarray(Image.open(path).convert("RGBA").resize((64, 64))).copy()
        if i == 2:
            image[..., 3] = 0
        Image.fromarray(image, "RGBA").save(folder / f"{i:02d}.png")
    out = tmp_path / "out" / "clip.blend"
    run = subprocess.run([sys.executable, "-m", "ss4d_blender", "generate", str(folder), "--matting", "alpha",
                          "--pipeline", str(tiny), "-o", str(out)], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    error = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert error and "No object found in frame 3 by the source's alpha" in error[0], run.stderr
    assert not out.parent.exists() or not any(out.parent.iterdir())
