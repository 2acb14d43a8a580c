"""`python -m ss4d_blender.engine` through subprocesses, on the tiny random-weight pipeline (CPU)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ss4d_blender.engine.gaussians import load_ply
from ss4d_blender.engine.mesh_io import load_mesh_ply, save_mesh_ply
from ss4d_blender.engine.result import GenerationResult, load_result
from ss4d_blender.engine.types import Mesh

REPO = Path(__file__).resolve().parents[1]
NOISE_WARNING = "warning: made with the tiny random-weight pipeline: the result is noise"


def engine(*args, timeout=180, env=None):
    return subprocess.run([sys.executable, "-m", "ss4d_blender.engine", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(out, *words):
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out.stderr
    for word in words:
        assert word in errors[0], errors[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "tiny"
    out = engine("make-tiny-pipeline", folder)
    assert out.returncode == 0, out.stderr
    assert "results are noise" in out.stdout and (folder / "pipeline.json").is_file()
    return folder


@pytest.fixture(scope="module")
def generated(tiny, shared_dir, tmp_path_factory):
    """Input: a video with alpha (PNG codec in .mov, made with PyAV from 4 boxing frames)."""
    from PIL import Image

    from media import write_video

    base = tmp_path_factory.mktemp("cli_run")
    frames = np.stack([np.asarray(Image.open(shared_dir / "samples" / "boxing" / f"{i:02d}.png").convert("RGBA"))
                       for i in (0, 3, 6, 9)])
    video = write_video(base / "boxing_alpha.mov", frames, "png", "rgba")
    # an earlier, longer result in the output folder: replaced as a whole, nothing of it survives
    for name in ("meshes/frame_004.ply", "gaussians/frame_004.ply", "result.safetensors"):
        (base / "out" / name).parent.mkdir(parents=True, exist_ok=True)
        (base / "out" / name).write_text("stale")
    out = engine("generate", video, "-o", base / "out", "--pipeline", tiny, "--device", "cpu", "--seed", "1",
                 "--steps", "1")
    return base / "out", out


def test_generate_writes_result_gaussians_and_meshes(generated):
    folder, out = generated
    assert out.returncode == 0, out.stderr
    assert NOISE_WARNING in out.stderr
    for stage in ("Loading models", "Encoding frames", "Sampling structure", "Sampling latents", "Decoding",
                  "Meshing", "Cleaning meshes"):
        assert stage in out.stderr  # one tqdm bar per stage
    assert "100%" in out.stderr
    assert "4 frames" in out.stdout and "result.safetensors" in out.stdout

    result = load_result(folder / "result.safetensors")
    assert result.num_frames == 4 and result.is_random_weights and result.settings["seed"] == 1
    assert result.settings["steps"] == 1
    assert sorted(p.name for p in (folder / "gaussians").iterdir()) == [f"frame_{i:03d}.ply" for i in range(4)]
    assert sorted(p.name for p in (folder / "meshes").iterdir()) == [f"frame_{i:03d}.ply" for i in range(4)]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["boxing_alpha.mov", "out"]  # no staging left
    modes = {p.stat().st_mode & 0o777 for p in [folder / "result.safetensors", *folder.glob("*/frame_000.ply")]}
    assert len(modes) == 1, modes  # result.safetensors: the same file mode as the other outputs
    assert out.stderr.count(NOISE_WARNING) == 1
    for i in range(4):
        g = load_ply(folder / "gaussians" / f"frame_{i:03d}.ply")
        np.testing.assert_allclose(g.xyz, result.gaussians[i].xyz, atol=1e-6)
        np.testing.assert_allclose(g.scaling, result.gaussians[i].scaling, rtol=1e-4)
        m = load_mesh_ply(folder / "meshes" / f"frame_{i:03d}.ply")
        ref = result.meshes[i]
        assert len(m.faces) > 100
        np.testing.assert_array_equal(m.vertices, ref.vertices)
        np.testing.assert_array_equal(m.faces, ref.faces)
        # colours go through 8-bit sRGB: at most half a step of 1/255 in sRGB, less than 0.005 in linear
        np.testing.assert_allclose(m.colors, ref.colors, atol=5e-3)


def test_user_errors_exit_2_with_one_line(tmp_path, tiny, shared_dir):
    out = engine("generate", shared_dir / "samples" / "boxing_green.mp4", "-o", tmp_path / "o", "--pipeline", tiny)
    assert_one_line_error(out, "has no alpha channel", "python -m ss4d_blender generate")
    frames = tmp_path / "one"
    frames.mkdir()
    shutil.copy(shared_dir / "samples" / "boxing" / "00.png", frames / "00.png")
    out = engine("generate", frames, "-o", tmp_path / "o", "--pipeline", tiny)
    assert_one_line_error(out, "At least 2 frames")
    out = engine("generate", shared_dir / "samples" / "boxing", "-o", tmp_path / "o", "--frames", "2",
                 "--pipeline", tmp_path)
    assert_one_line_error(out, "no pipeline.json")
    assert not (tmp_path / "o").exists()  # nothing written on failure
    out = engine("animate", tmp_path / "missing.safetensors", tmp_path / "a.npz")
    assert_one_line_error(out, "Cannot read the result file")


def test_animate_writes_one_mesh_through_all_frames(tmp_path):
    from ss4d_blender.testing.synthetic import make_sequence

    seq = make_sequence("capsule_bend", 4, resolution=0.5, seed=2)
    meshes = [Mesh(v.astype(np.float32) * 0.3, f.astype(np.int32), np.full((len(v), 3), 0.25, np.float32))
              for v, f in zip(seq.vertices, seq.faces)]
    result = GenerationResult(num_frames=4, coords=np.zeros((0, 4), np.int32), slat_feats=np.zeros((0, 8), np.float32),
                              gaussians=[], meshes=meshes, settings={"seed": 0}, is_random_weights=False)
    result.save(tmp_path / "result.safetensors")
    out = engine("animate", tmp_path / "result.safetensors", tmp_path / "anim.npz", "--vertices", 300,
                 "--reference-frame", 1, "--quiet")
    assert out.returncode == 0, out.stderr
    assert NOISE_WARNING not in out.stderr
    with np.load(tmp_path / "anim.npz") as d:
        faces, vertices, colors, fit_error = d["faces"], d["vertices"], d["colors"], d["fit_error"]
        assert int(d["reference_frame"]) == 1
    V = vertices.shape[1]
    assert faces.dtype == np.int32 and faces.ndim == 2 and faces.shape[1] == 3 and faces.max() < V
    assert vertices.shape == (4, V, 3) and vertices.dtype == np.float32 and 150 < V < 600
    assert colors.shape == (V, 3) and np.allclose(colors, 0.25, atol=1e-3)
    assert fit_error.shape == (4,) and np.all(fit_error < 0.01), fit_error  # capsule ~1 unit: well fitted
    diagonal = np.linalg.norm(np.ptp(vertices[1], axis=0))
    percent = f"{float(np.mean(fit_error)) / diagonal * 100:.2f} % of the bounding-box diagonal"
    assert f"fit error {percent}" in out.stdout, out.stdout
    assert "could not follow" not in out.stderr
    # a frame the mesh cannot follow (something else entirely, far away) is named, not hidden
    result.meshes[3] = Mesh(meshes[3].vertices * 0.2 + np.float32([3, 0, 0]), meshes[3].faces)
    result.save(tmp_path / "result.safetensors")
    out = engine("animate", tmp_path / "result.safetensors", tmp_path / "anim.npz", "--vertices", 300,
                 "--reference-frame", 1, "--quiet")
    assert out.returncode == 0, out.stderr
    assert "warning: Frame 3: the mesh could not follow" in out.stderr, out.stderr


def test_help_documents_every_flag_with_its_default():
    out = engine("--help")
    assert out.returncode == 0
    for command in ("generate", "animate", "make-tiny-pipeline", "register"):
        assert command in out.stdout
    from ss4d_blender.engine.__main__ import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("generate", "animate", "register", "make-tiny-pipeline"):
        for action in commands[name]._actions:
            if action.option_strings and action.dest != "help" and not action.required:
                assert action.help and "default" in action.help, (name, action.option_strings)
    assert {"rig", "matte"} <= set(commands)  # other modules' subcommands plug into the one parser
    # register and animate: the same flags; register documents its input format
    flags = {name: {o for a in commands[name]._actions for o in a.option_strings} for name in ("animate", "register")}
    assert flags["animate"] == flags["register"] >= {"--vertices", "--smoothing", "--device", "--reference-frame"}
    out = engine("register", "--help")
    assert out.returncode == 0 and "vertices_t" in out.stdout and "faces_t" in out.stdout


@pytest.mark.parametrize("binary", [True, False])
def test_mesh_ply_round_trip(tmp_path, binary):
    rng = np.random.default_rng(0)
    mesh = Mesh(rng.normal(size=(7, 3)).astype(np.float32), rng.integers(0, 7, size=(5, 3)).astype(np.int32),
                rng.uniform(size=(7, 3)).astype(np.float32))
    path = save_mesh_ply(tmp_path / "m.ply", mesh, binary=binary)
    header = path.read_bytes().split(b"end_header")[0].decode()
    assert "element vertex 7" in header and "element face 5" in header and "property uchar red" in header
    back = load_mesh_ply(path)
    np.testing.assert_array_equal(back.vertices, mesh.vertices)
    np.testing.assert_array_equal(back.faces, mesh.faces)
    np.testing.assert_allclose(back.colors, mesh.colors, atol=5e-3)
    plain = load_mesh_ply(save_mesh_ply(tmp_path / "plain.ply", Mesh(mesh.vertices, mesh.faces), binary=binary))
    assert plain.colors is None and len(plain.faces) == 5
    with pytest.raises(ValueError, match="out of range"):
        save_mesh_ply(tmp_path / "bad.ply", Mesh(mesh.vertices, mesh.faces + 7))


@pytest.mark.parametrize("args, words", [
    (["--frames", "0"], ["--frames", "at least 1"]),
    (["--frames", "-3"], ["--frames", "at least 1"]),
    (["--frames", "1"], ["--frames", "at least 2"]),
    (["--device", "gpu"], ["--device", "invalid device 'gpu'"]),
    (["--precision", "fp8"], ["--precision", "fp8"]),
    (["--steps", "0"], ["--steps", "at least 1"]),
])
def test_generate_option_checks(tmp_path, args, words):
    out = engine("generate", tmp_path / "in", "-o", tmp_path / "o", *args)
    assert_one_line_error(out, *words)


@pytest.mark.parametrize("command", ["animate", "register"])
def test_animate_and_register_check_the_device(tmp_path, command):
    out = engine(command, tmp_path / "in.npz", tmp_path / "out.npz", "--device", "gpu")
    assert_one_line_error(out, "invalid device 'gpu'")
    import torch

    if not torch.cuda.is_available():  # a CPU-only torch: cuda is refused before anything is read
        out = engine(command, tmp_path / "in.npz", tmp_path / "out.npz", "--device", "cuda")
        assert_one_line_error(out, "CUDA was requested")
    out = engine(command, tmp_path / "in.npz", tmp_path / "out.obj")
    assert_one_line_error(out, "unsupported file type '.obj'")


def test_output_location_is_checked_before_any_work(tmp_path, shared_dir):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    out = engine("generate", shared_dir / "samples" / "boxing", "-o", blocker / "out")
    assert_one_line_error(out, "is a file, not a folder")
    out = engine("generate", shared_dir / "samples" / "boxing", "-o", "/proc/ss4d_out")
    assert_one_line_error(out, "not writable")
    keep = tmp_path / "photos"
    keep.mkdir()
    (keep / "holiday.jpg").write_text("precious")
    out = engine("generate", shared_dir / "samples" / "boxing", "-o", keep)
    assert_one_line_error(out, "not an SS4D result", "holiday.jpg")
    assert (keep / "holiday.jpg").read_text() == "precious"


def test_frame_range_outside_the_clip(tmp_path, tiny, shared_dir):
    out = engine("generate", shared_dir / "samples" / "boxing", "-o", tmp_path / "o", "--pipeline", tiny,
                 "--start", 30, "--end", 40)
    assert_one_line_error(out, "--end 40 is outside", "frames 1..32")
    out = engine("generate", shared_dir / "samples" / "boxing", "-o", tmp_path / "o", "--pipeline", tiny,
                 "--start", 33)
    assert_one_line_error(out, "--start 33 is outside")
    assert not (tmp_path / "o").exists()


def test_missing_weights_fail_fast_with_what_to_do(tmp_path, shared_dir):
    """Before any frame is decoded (the .mp4 without alpha would be refused otherwise), one line that names
    --pipeline DIR and the repository; 'offline' only when HF_HUB_OFFLINE is set."""
    video = shared_dir / "samples" / "boxing_green.mp4"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = engine("generate", video, "-o", tmp_path / "o", "--cache-dir", tmp_path / "cache", env=env)
    assert_one_line_error(out, "offline", "--pipeline DIR", "lizb6626/SS4D")
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens there: the hub is unreachable
    env.pop("HF_HUB_OFFLINE", None)
    out = engine("generate", video, "-o", tmp_path / "o", "--cache-dir", tmp_path / "cache", env=env)
    assert_one_line_error(out, "could not be reached", "--pipeline DIR", "lizb6626/SS4D")
    assert "offline" not in out.stderr
    assert not (tmp_path / "o").exists()


def test_pickle_checkpoint_is_named_as_such(tmp_path, tiny, shared_dir):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny, pickled)
    weights = pickled / "ckpts" / "slat_flow_model.safetensors"
    weights.rename(weights.with_suffix(".pt"))
    out = engine("generate", shared_dir / "samples" / "boxing", "-o", tmp_path / "o", "--pipeline", pickled)
    assert_one_line_error(out, "found slat_flow_model.pt", "only .safetensors is read")


def test_one_wrapper_maps_errors_to_exit_codes(capsys):
    from ss4d_blender.engine import cli_common
    from ss4d_blender.engine.errors import Cancelled, InputError

    parser = cli_common.Parser(prog="t")

    def failing(error):
        def dispatch(args):
            raise error
        return dispatch

    assert cli_common.run(parser, [], failing(InputError("bad\n input"))) == 2
    assert capsys.readouterr().err.strip() == "error: bad input"
    assert cli_common.run(parser, [], failing(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err.strip() == "cancelled"
    assert cli_common.run(parser, [], failing(Cancelled())) == 130
    capsys.readouterr()
    assert cli_common.run(parser, [], failing(ZeroDivisionError("boom"))) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: internal error (ZeroDivisionError")
    assert cli_common.run(parser, ["--nope"], failing(AssertionError())) == 2
    assert capsys.readouterr().err.strip().startswith("error: t: unrecognized arguments: --nope")


def test_settings_from_user_input_keep_their_one_default():
    """Front ends pass what the user set; "not given" spellings leave the dataclass's default."""
    import inspect

    from ss4d_blender.engine.api import GenerateSettings
    from ss4d_blender.engine.errors import InputError
    from ss4d_blender.engine.mesh import clean_mesh

    default = GenerateSettings()
    given = GenerateSettings.from_user(pipeline="", revision="", mesh_decoder="", cache_dir=None, steps=0, cfg=0.0,
                                       latent_cfg=None, device="", precision=None, seed=None)
    assert given == default
    assert GenerateSettings.from_user(mesh_decoder="None").mesh_decoder is None  # no mesh decoder
    assert GenerateSettings.from_user(steps=12, cfg=3.5, device="cpu", revision=" v1 ") == GenerateSettings(
        steps=12, cfg=3.5, device="cpu", revision="v1")
    with pytest.raises(InputError, match="Unknown generation setting"):
        GenerateSettings.from_user(target_vertices=3)
    assert inspect.signature(clean_mesh).parameters["min_component_fraction"].default == \
        default.min_component_fraction


def test_each_program_builds_one_parser_tree(monkeypatch, capsys):
    """`register` (and every other subcommand) is a subparser of the one root parser, not a parser of its own."""
    import argparse

    from ss4d_blender.__main__ import build_parser as headless_parser
    from ss4d_blender.engine.__main__ import main

    roots = []
    original = argparse.ArgumentParser.__init__

    def counting(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if not self.prog.startswith(("python -m ss4d_blender.engine ", "python -m ss4d_blender ")):
            roots.append(self.prog)
    monkeypatch.setattr(argparse.ArgumentParser, "__init__", counting)
    assert main(["register", "--help"]) == 0
    assert "vertices_t" in capsys.readouterr().out
    assert roots == ["python -m ss4d_blender.engine"]
    headless_parser()
    assert roots == ["python -m ss4d_blender.engine", "python -m ss4d_blender"]


def test_random_weights_flag_has_one_name_and_old_pipelines_still_read(tmp_path, tiny):
    import json

    from ss4d_blender.engine.pipeline import PipelineSpec

    config = json.loads((tiny / "pipeline.json").read_text())
    assert config["args"]["is_random_weights"] is True and "tiny_random_weights" not in config["args"]
    assert PipelineSpec.from_folder(tiny).is_random_weights
    config["args"]["tiny_random_weights"] = config["args"].pop("is_random_weights")  # a folder made earlier
    (tmp_path / "pipeline.json").write_text(json.dumps(config))
    assert PipelineSpec.from_folder(tmp_path).is_random_weights


# ------------------------------------------------------------------------------------------ long clips
def moving_disc(count: int, size: int = 40) -> np.ndarray:
    """uint8 [count, size, size, 4]: an opaque disc moving across a transparent background."""
    yy, xx = np.mgrid[0:size, 0:size]
    frames = np.zeros((count, size, size, 4), np.uint8)
    for t in range(count):
        inside = (xx - 12 - 16 * t / (count - 1)) ** 2 + (yy - size / 2) ** 2 < 80
        frames[t, inside] = (200, 90, 60 + 10 * t, 255)
    return frames


def test_generate_keeps_finished_windows_on_cancel_and_continues_from_them(tmp_path, tiny, monkeypatch, capsys):
    """8 frames in windows of 4 overlapping by 2 (3 windows, the tiny pipeline on the CPU): Ctrl-C in window 2
    keeps window 1 beside OUTDIR and says so; the same command then resumes after it, writes the result and
    removes the cache."""
    from ss4d_blender.engine import commands
    from ss4d_blender.engine.__main__ import main
    from ss4d_blender.engine.windows import cache_folder_for

    np.savez(tmp_path / "clip.npz", frames=moving_disc(8))
    out = tmp_path / "out"
    argv = ["generate", str(tmp_path / "clip.npz"), "-o", str(out), "--pipeline", str(tiny), "--device", "cpu",
            "--steps", "1", "--mesh-decoder", "none", "--frames", "all", "--window", "4", "--overlap", "2"]
    stages = []

    def ctrl_c_in_window_two(bars, stage, fraction):
        stages.append(stage)
        if stage.startswith("Window 2 of 3 · Sampling latents"):
            raise KeyboardInterrupt

    monkeypatch.setattr(commands.StageBars, "__call__", ctrl_c_in_window_two)
    assert main(argv) == 130
    cache = cache_folder_for(out)
    err = capsys.readouterr().err
    assert f"cancelled after window 1 of 3: the finished windows are kept in {cache}" in err
    assert "run the same command again to continue" in err and err.rstrip().endswith("cancelled")
    assert sorted(p.name for p in cache.glob("*/window_*")) == ["window_000.safetensors"]
    assert not out.exists()

    stages.clear()
    monkeypatch.setattr(commands.StageBars, "__call__", lambda bars, stage, fraction: stages.append(stage))
    assert main(argv) == 0, capsys.readouterr().err
    assert not any(s.startswith("Window 1 of 3") for s in stages) and "Window 2 of 3 · Encoding frames" in stages
    assert not cache.exists()                                   # everything is in the result now
    result = load_result(out / "result.safetensors")
    assert result.settings["windows"] == [[0, 4], [2, 6], [4, 8]] and result.num_frames == 8
    assert sorted(p.name for p in (out / "meshes").iterdir()) == [f"frame_{i:03d}.ply" for i in range(8)]


def test_frame_file_names_sort_in_frame_order_past_frame_999():
    from ss4d_blender.engine.commands import frame_name_width

    assert [frame_name_width(n) for n in (1, 4, 1000, 1001, 1440, 10001)] == [3, 3, 3, 4, 4, 5]
    width = frame_name_width(1440)
    names = [f"frame_{i:0{width}d}.ply" for i in range(1440)]
    assert sorted(names) == names


def test_a_cancelled_worker_says_which_windows_it_keeps(tmp_path):
    from ss4d_blender.engine.worker import _cancel_message

    assert _cancel_message("Window 3 of 8 · Sampling latents", tmp_path) == (
        "Cancelled after window 2 of 8; Generate 4D again with the same settings continues from there.")
    for stage in ("Window 1 of 8 · Encoding frames", "Sampling latents", "Loading models"):
        assert _cancel_message(stage, tmp_path) == "Cancelled."
    assert _cancel_message("Window 3 of 8 · Decoding", None) == "Cancelled."
