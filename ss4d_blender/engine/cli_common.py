"""What the two command lines share: the flags they have in common, the checks made before any work,
and the one `main()` wrapper that turns errors into exit codes.

    python -m ss4d_blender generate ...           (Blender as a module: video in, .blend out)
    python -m ss4d_blender.engine COMMAND ...     (plain PyTorch: generate, animate, register, ...)

Exit codes, everywhere: 0 done, 2 the user's input or settings (one line `error: ...`), 1 an internal
error (with its traceback), 130 cancelled (Ctrl-C; one line `cancelled`).

Imports neither torch nor bpy at module level: the headless command parses its flags before Blender loads.
Defaults live on the engine's settings (`GenerateSettings`, `animate`); flags only restate the ones the help
text shows.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable, Optional, Sequence

from .errors import Cancelled, InputError, SS4DError

EXIT_OK, EXIT_INTERNAL, EXIT_USER_ERROR, EXIT_CANCELLED = 0, 1, 2, 130

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICE_HELP = "auto (CUDA, else Apple MPS, else the CPU) | cpu | cuda | cuda:N | mps (default: auto)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line `error: ...` (exit code 2), like every other
    error of the command lines. Its subcommand parsers are of the same class."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {message} (see --help)\n")


# ------------------------------------------------------------------------------------------ value types
def _number(text: str, kind: type, minimum: float, rule: str):
    """`text` as an int or float that is at least `minimum`; argparse's one-line error otherwise."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'a whole number' if kind is int else 'a number'}, got '{text}'") from None
    if not value >= minimum:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, 1, "at least 1")


def non_negative_int(text: str) -> int:
    return _number(text, int, 0, "0 or more")


def non_negative_float(text: str) -> float:
    return _number(text, float, 0.0, "0 or more")


def frame_count(text: str):
    """`all` (every frame of the range) or a count of at least 2."""
    if text.strip().lower() == "all":
        return "all"
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"at least 2 frames are needed to generate motion, got {value}")
    return value


def device_name(text: str) -> str:
    text = text.strip().lower()
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"invalid device '{text}': choose auto, cpu, cuda, cuda:N or mps")
    return text


def parse_color(text: str) -> tuple:
    """'#00ff00', '00ff00' or 'r,g,b' in 0..1 -> (r, g, b) in 0..1."""
    usage = "a key colour is '#RRGGBB' (e.g. '#38a042') or 'r,g,b' in 0..1 (e.g. '0.22,0.63,0.26')"
    text = text.strip()
    digits = text[1:] if text.startswith("#") else text
    if re.fullmatch(r"[0-9a-fA-F]{6}", digits):
        return tuple(int(digits[i:i + 2], 16) / 255 for i in (0, 2, 4))
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a colour: {usage}") from None
    if len(parts) != 3 or not all(0.0 <= x <= 1.0 for x in parts):
        raise argparse.ArgumentTypeError(f"'{text}' is not a colour: {usage}")
    return parts


# ------------------------------------------------------------------------------------------ shared flags
def add_weights_flags(parser: argparse.ArgumentParser) -> None:
    """Where the weights come from (`GenerateSettings.pipeline`, `revision`, `mesh_decoder`, `cache_dir`)."""
    from .hub import SS4D_REPO, TRELLIS_REPO

    parser.add_argument("--pipeline", default=None, metavar="REPO_OR_DIR",
                        help=f"hub repository id or local folder with pipeline.json and ckpts/ (default: {SS4D_REPO})")
    parser.add_argument("--revision", default=None,
                        help="hub revision (branch, tag or commit) of the pipeline (default: main)")
    parser.add_argument("--mesh-decoder", default=None, metavar="auto|none|REPO_OR_DIR",
                        help=f"auto: the pipeline's own, else {TRELLIS_REPO}'s; none: meshes from the Gaussians; "
                             f"or a repository id / folder (default: auto)")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="weights cache (default: the Hugging Face cache, HF_HOME / HF_HUB_CACHE)")


MATTING_HELP = {
    "auto": "the source's alpha when it has transparency, else learned",
    "alpha": "the source carries transparency (PNG frames, ProRes 4444 .mov, WebM with alpha; a usual .mp4 has "
             "no alpha)",
    "learned": "remove the background with BiRefNet (any ordinary video)",
    "chroma": "key out a green or blue screen",
}


def add_matting_flags(parser: argparse.ArgumentParser, modes: tuple, default: str, model: bool = True) -> None:
    """`--matting MODE` (one of `modes`, keys of MATTING_HELP), `--matting-quality` and, with `model`,
    `--matting-model` (`GenerateSettings.matting`, `matting_quality`, `matting_model`)."""
    from .hub import BIREFNET_LITE_REPO, BIREFNET_REPO

    described = "; ".join(f"{mode}: {MATTING_HELP[mode]}" for mode in modes)
    parser.add_argument("--matting", choices=list(modes), default=default,
                        help=f"how the object is separated from its background: {described} (default: {default})")
    parser.add_argument("--matting-quality", choices=["best", "fast"], default=None,
                        help=f"learned matting: best ({BIREFNET_REPO}) or fast ({BIREFNET_LITE_REPO}, less memory) "
                             f"(default: best; a --pipeline folder's own birefnet/ model is used when it has one)")
    if not model:
        return
    parser.add_argument("--matting-model", default=None, metavar="REPO_OR_DIR",
                        help="learned matting weights: hub repository id, folder with model.safetensors or a "
                             ".safetensors file (default: from --matting-quality)")


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """`GenerateSettings.seed`, `steps`, `cfg`."""
    parser.add_argument("--seed", type=non_negative_int, default=None, help="random seed (default: 0)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="sampler steps of both stages (default: the pipeline's pipeline.json)")
    parser.add_argument("--cfg", type=non_negative_float, default=None,
                        help="guidance strength of the structure stage (default: the pipeline's pipeline.json)")


def add_device_flags(parser: argparse.ArgumentParser, precision: bool = True) -> None:
    parser.add_argument("--device", type=device_name, default="auto", help=DEVICE_HELP)
    if precision:
        parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                            help="auto (fp16 on GPUs, fp32 on the CPU) | fp32 | fp16 | bf16 (default: auto)")


def add_frame_flags(parser: argparse.ArgumentParser, frames_default: str, start_help: str,
                    step_help: str = "use every STEP-th frame of the range") -> None:
    """Which frames of the clip: `--frames N|all`, `--start`, `--end`, `--step`; and the windows of a long
    clip (`GenerateSettings.window`, `overlap`, `step`)."""
    parser.add_argument("--frames", type=frame_count, default=None, metavar="N|all",
                        help=f"N frames spread evenly over the range, or all of them (default: {frames_default})")
    parser.add_argument("--start", type=positive_int, default=None, help=f"first frame to use ({start_help})")
    parser.add_argument("--end", type=positive_int, default=None, help="last frame to use (default: the clip's last)")
    parser.add_argument("--window", type=positive_int, default=None,
                        help="frames the model generates at once; a longer clip is generated in windows "
                             "(default: 32)")
    parser.add_argument("--overlap", type=non_negative_int, default=None,
                        help="frames shared by neighbouring windows (default: 8)")
    parser.add_argument("--step", type=positive_int, default=None, help=f"{step_help} (default: 1)")


def add_animate_flags(parser: argparse.ArgumentParser,
                      reference_help: str = "frame (counted from 0) whose shape gives the topology "
                                            "(default: the most complete)") -> None:
    """Registration (`api.animate`): `target_vertices`, `reference_frame`, `temporal_smoothing`."""
    parser.add_argument("--vertices", dest="target_vertices", type=positive_int, default=None, metavar="N",
                        help="vertex count of the animated mesh (default: 20000)")
    parser.add_argument("--reference-frame", type=int, default=None, metavar="FRAME", help=reference_help)
    parser.add_argument("--smoothing", dest="temporal_smoothing", type=non_negative_float, default=None, metavar="S",
                        help="temporal smoothing of the vertex trajectories, 0 = off (default: 0)")


def given(args: argparse.Namespace, *names: str) -> dict:
    """The flags among `names` the user set (not None), as keyword arguments."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


# ------------------------------------------------------------------------------------------ checks before work
def check_device(name: str) -> None:
    """A GPU device that this PyTorch cannot use is refused before any work (needs torch; skipped when
    torch is not importable here, e.g. when another Python runs the model)."""
    if name in ("auto", "cpu"):
        return
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    from .memory import pick_device

    pick_device(name)


def check_frame_range(start: Optional[int], end: Optional[int], total: int, what: str) -> None:
    """--start / --end (1-based, inclusive) inside a clip of `total` frames."""
    for flag, value in (("--start", start), ("--end", end)):
        if value is not None and not 1 <= value <= total:
            raise InputError(f"{flag} {value} is outside {what}, which has frames 1..{total}.")
    if start is not None and end is not None and end <= start:
        raise InputError(f"--end {end} must come after --start {start} (at least 2 frames are needed).")


def check_writable(path: Path, suffixes: Optional[Sequence[str]] = None, flag: str = "-o") -> Path:
    """The place `path` will be written: its suffix is one of `suffixes`, its folder exists or can be
    created, and is writable. Checked before any work, so a bad location costs nothing. Returns the
    absolute path. Creates nothing."""
    path = Path(path).expanduser().absolute()
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise InputError(f"{flag} {path.name}: unsupported file type '{path.suffix or '(none)'}'; use "
                         f"{', '.join(suffixes)}.")
    if path.is_dir() and suffixes is not None:
        raise InputError(f"{flag} {path} is a folder; give a file name.")
    folder = path if suffixes is None else path.parent
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"Cannot write {path}: {existing} is a file, not a folder.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise InputError(f"Cannot write {path}: the folder {existing} is not writable "
                         f"({err.strerror or err}).") from None
    return path


# ------------------------------------------------------------------------------------------ reporting
def print_warnings(warnings: Sequence[str]) -> None:
    """The run's warnings (`GenerationResult.warnings` and the like), each on its own line on stderr."""
    for warning in dict.fromkeys(warnings):
        print(f"warning: {warning}", file=sys.stderr, flush=True)


def fit_error_text(vertices, fit_error, reference_frame: int) -> str:
    """'0.31 % (worst 0.52 % at frame 3)' in % of the animated mesh's bounding-box diagonal (at its
    reference frame), the unit the documentation uses; frames counted from 0."""
    import numpy as np

    reference = np.asarray(vertices[reference_frame], np.float64)
    diagonal = float(np.linalg.norm(reference.max(axis=0) - reference.min(axis=0))) if len(reference) else 0.0
    errors = np.asarray(fit_error, np.float64) / max(diagonal, 1e-12) * 100
    finite = errors[np.isfinite(errors)]
    if not len(finite):
        return "no frame could be fitted"
    worst = int(np.argmax(np.where(np.isfinite(errors), errors, np.inf)))
    return (f"fit error {float(finite.mean()):.2f} % of the bounding-box diagonal on average, worst "
            f"{errors[worst]:.2f} % at frame {worst}")


# ------------------------------------------------------------------------------------------ main wrapper
def run(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None,
        dispatch: Optional[Callable[[argparse.Namespace], int]] = None) -> int:
    """Parses `argv`, runs the chosen command (`args.run(args)` or `dispatch(args)`) and maps what
    happened to the exit code: SS4DError -> 2 (one line), Ctrl-C / Cancelled -> 130, anything else -> 1."""
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as stop:  # --help (0) or a usage error (2, already printed)
        return int(stop.code or 0)
    try:
        return int((dispatch or args.run)(args) or 0)
    except (KeyboardInterrupt, Cancelled):
        print("\ncancelled", file=sys.stderr, flush=True)
        return EXIT_CANCELLED
    except SS4DError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except Exception as err:  # noqa: BLE001 - the one place an unexpected failure becomes exit code 1
        traceback.print_exc(file=sys.stderr)
        print(f"error: internal error ({type(err).__name__}: {err}); please report it with the traceback above",
              file=sys.stderr, flush=True)
        return EXIT_INTERNAL
