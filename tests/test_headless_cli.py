"""`python -m ss4d_blender generate` (Blender as a module) through subprocesses: bad input refused before any
work with the engine command's checks and exit codes, nothing lost on failure or Ctrl-C, no temporary
folders left behind. Runs use the tiny random-weight pipeline on the CPU (its output is noise)."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
EARLIER = b"an earlier result the user wants to keep"


def command(program, *args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", program, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def headless(*args, **kw):
    return command("ss4d_blender", "generate", *args, **kw)


def error_line(out) -> str:
    """The one `error: ...` line of a refused run (exit code 2, no traceback)."""
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out.stderr
    return errors[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("headless") / "tiny"
    out = command("ss4d_blender.engine", "make-tiny-pipeline", folder)
    assert out.returncode == 0, out.stderr
    return folder


@pytest.fixture
def earlier(tmp_path) -> Path:
    """An output file that holds an earlier result."""
    path = tmp_path / "out" / "clip.blend"
    path.parent.mkdir()
    path.write_bytes(EARLIER)
    return path


def assert_untouched(earlier: Path) -> None:
    assert earlier.read_bytes() == EARLIER
    assert sorted(p.name for p in earlier.parent.iterdir()) == [earlier.name]  # no staging folder left


@pytest.mark.parametrize("flags, words", [
    (["--frames", "0"], "argument --frames: must be at least 1, got 0"),
    (["--frames", "-2"], "argument --frames: must be at least 1, got -2"),
    (["--device", "gpu"], "argument --device: invalid device 'gpu'"),
    (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["--vertices", "0"], "argument --vertices: must be at least 1, got 0"),
])
def test_options_are_checked_the_same_in_both_commands(tmp_path, flags, words):
    engine = error_line(command("ss4d_blender.engine", "generate", tmp_path / "in", "-o", tmp_path / "o", *flags)
                        if "--vertices" not in flags else
                        command("ss4d_blender.engine", "animate", tmp_path / "r", tmp_path / "a.npz", *flags))
    blender = error_line(headless(tmp_path / "in", "-o", tmp_path / "o.blend", *flags))
    assert words in engine and words in blender
    assert engine.split(": ", 2)[2] == blender.split(": ", 2)[2]  # the same words after the program's name


def test_cuda_on_a_cpu_only_torch_is_refused_up_front(tmp_path, shared_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    line = error_line(headless(shared_dir / "samples" / "rose", "-o", tmp_path / "o.blend", "--device", "cuda"))
    assert "CUDA was requested" in line


def test_key_colour_shows_how_to_write_one(tmp_path):
    line = error_line(headless(tmp_path / "in", "-o", tmp_path / "o.blend", "--key-color", "green"))
    assert "'green' is not a colour" in line and "'#RRGGBB'" in line


def test_output_locations_are_checked_before_any_work(tmp_path, shared_dir):
    rose = shared_dir / "samples" / "rose"
    assert "unsupported file type '.obj'" in error_line(
        headless(rose, "-o", tmp_path / "r.blend", "--export", tmp_path / "r.obj"))
    assert "unsupported file type '.txt'" in error_line(headless(rose, "-o", tmp_path / "r.txt"))
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    assert "is a file, not a folder" in error_line(headless(rose, "-o", blocker / "r.blend"))
    assert "not writable" in error_line(headless(rose, "-o", "/proc/ss4d/r.blend"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def frame_folder(tmp_path, shared_dir, count=4) -> Path:
    folder = tmp_path / "frames"
    folder.mkdir()
    for name in sorted(p.name for p in (shared_dir / "samples" / "rose").glob("*.png"))[:count]:
        shutil.copy(shared_dir / "samples" / "rose" / name, folder / name)
    return folder


def test_a_corrupt_or_odd_sized_frame_is_refused_by_name(tmp_path, shared_dir, tiny, earlier):
    """Every frame of a folder is checked before Blender reads any (the engine's checks and words); exit 2,
    and the file already at -o stays as it was."""
    from PIL import Image

    folder = frame_folder(tmp_path, shared_dir)
    frames = sorted(folder.iterdir())
    good = frames[2].read_bytes()
    frames[2].write_bytes(good[:200])  # truncated PNG
    line = error_line(headless(folder, "-o", earlier, "--pipeline", tiny))
    assert f"Cannot read the image {frames[2]}" in line
    assert_untouched(earlier)
    frames[2].write_bytes(b"\x89PNG not really")
    assert f"Cannot read the image {frames[2]}" in error_line(headless(folder, "-o", earlier, "--pipeline", tiny))
    frames[2].write_bytes(good)
    with Image.open(frames[1]) as image:
        image.resize((image.width // 2, image.height // 2)).save(frames[1])
    line = error_line(headless(folder, "-o", earlier, "--pipeline", tiny))
    assert "All frames must have the same size" in line and frames[1].name in line
    assert_untouched(earlier)


def test_missing_weights_fail_fast_before_decoding(tmp_path, shared_dir, earlier):
    video = shared_dir / "samples" / "boxing_green.mp4"
    started = time.monotonic()
    out = headless(video, "--matting", "chroma", "-o", earlier, "--cache-dir", tmp_path / "cache",
                   env=dict(os.environ, HF_HUB_OFFLINE="1"))
    line = error_line(out)
    assert "offline" in line and "--pipeline DIR" in line and "lizb6626/SS4D" in line
    assert "Fra:" not in out.stdout and time.monotonic() - started < 60  # nothing rendered
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens there
    env.pop("HF_HUB_OFFLINE", None)
    line = error_line(headless(video, "--matting", "chroma", "-o", earlier, "--cache-dir", tmp_path / "cache",
                               env=env))
    assert "could not be reached" in line and "offline" not in line and "--pipeline DIR" in line
    assert_untouched(earlier)


def test_chroma_key_on_a_scene_that_is_no_screen_is_refused(shared_dir, tiny, earlier):
    out = headless(shared_dir / "samples" / "bird_fly_scene.mp4", "--matting", "chroma", "--frames", "4",
                   "-o", earlier, "--pipeline", tiny, "--device", "cpu")
    line = error_line(out)
    assert "not a green or blue screen" in line and "--matting alpha" in line and "engine matte" in line
    assert_untouched(earlier)


@pytest.mark.parametrize("during", ["ss4d_frames_*", "ss4d_job_*/worker.log"])
def test_ctrl_c_prints_cancelled_exits_130_and_leaves_nothing(tmp_path, shared_dir, tiny, earlier, during):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while Blender renders the frames,
    or while the worker runs: one line, exit 130, the earlier output intact, the temp directory empty."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    cmd = [sys.executable, "-m", "ss4d_blender", "generate", str(shared_dir / "samples" / "rose"), "-o", str(earlier),
           "--pipeline", str(tiny), "--frames", "all", "--vertices", "500", "--device", "cpu"]
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, TMPDIR=str(temp)), start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(temp.glob(during)):  # rendering the frames / the worker started
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    time.sleep(0.5)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stdout[-2000:] + stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "cancelled" and "Traceback" not in stderr, stderr
    assert sorted(temp.iterdir()) == []
    assert_untouched(earlier)


def write_clip(path: Path, rate) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(6):
            frame = np.full((64, 64, 3), (40 * i, 120, 60), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_non_integer_frame_rates_are_set_exactly(tmp_path):
    from fractions import Fraction

    clips = [write_clip(tmp_path / f"clip_{i}.mp4", Fraction(n, 1001)) for i, n in enumerate((30000, 24000))]
    code = ("import sys, bpy\nfrom pathlib import Path\nfrom ss4d_blender.blender.headless import load_source\n"
            "for p in sys.argv[1:]:\n    bpy.ops.wm.read_factory_settings(use_empty=True)\n"
            "    s = bpy.context.scene\n    load_source(s, Path(p), [])\n"
            "    print('RATE', s.render.fps, repr(s.render.fps_base))\n")
    out = subprocess.run([sys.executable, "-c", code, *map(str, clips)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    rates = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("RATE ")]
    assert len(rates) == 2, out.stdout + out.stderr
    for (fps, base), expected in zip(rates, (30000 / 1001, 24000 / 1001)):
        assert int(fps) == round(expected + 0.5) and float(base) == pytest.approx(1.001, abs=1e-6)
        assert int(fps) / float(base) == pytest.approx(expected, rel=1e-6)


def test_help_documents_every_flag_with_its_default():
    from ss4d_blender.__main__ import build_parser

    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    for action in generate._actions:
        if action.option_strings and action.dest != "help" and not action.required:
            assert action.help and "default" in action.help, action.option_strings
    matting = next(a for a in generate._actions if "--matting" in a.option_strings)
    assert ".mp4 has no alpha" in matting.help


def test_frame_range_outside_the_clip_is_refused(tmp_path, shared_dir, tiny):
    line = error_line(headless(shared_dir / "samples" / "rose", "-o", tmp_path / "r.blend", "--pipeline", tiny,
                               "--start", 500))
    assert "--start 500 is outside the folder rose" in line


def test_success_replaces_the_earlier_output_and_leaves_the_temp_directory_as_it_was(tmp_path, shared_dir, tiny,
                                                                                     earlier):
    temp = tmp_path / "tmp"
    temp.mkdir()
    gltf = earlier.parent / "clip.gltf"
    out = headless(frame_folder(tmp_path, shared_dir), "-o", earlier, "--export", gltf, "--pipeline", tiny,
                   "--frames", "all", "--vertices", "500", "--device", "cpu", env=dict(os.environ, TMPDIR=str(temp)))
    assert out.returncode == 0, out.stderr[-3000:]
    assert earlier.read_bytes() != EARLIER and earlier.stat().st_size > 10000  # the new .blend
    assert sorted(p.name for p in earlier.parent.iterdir()) == ["clip.bin", "clip.blend", "clip.gltf",
                                                                 "clip_SS4D_frames_ss4d.safetensors"]
    modes = {p.stat().st_mode & 0o777 for p in earlier.parent.iterdir()}
    assert len(modes) == 1, modes
    assert sorted(temp.iterdir()) == []
    assert out.stderr.count("warning: made with the tiny random-weight pipeline") == 1


def test_panel_ranges_are_refused_not_clamped(tmp_path, shared_dir, tiny, earlier):
    rose = frame_folder(tmp_path, shared_dir)
    line = error_line(headless(rose, "-o", earlier, "--pipeline", tiny, "--vertices", 300))
    assert "--vertices 300 is outside the add-on's range 500..500000" in line
    line = error_line(headless(rose, "-o", earlier, "--pipeline", tiny, "--window", 1000))
    assert "--window 1000 is outside the add-on's range" in line
    assert_untouched(earlier)
