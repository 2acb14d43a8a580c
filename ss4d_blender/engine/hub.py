"""Where the weights come from: a local folder, or a Hugging Face hub repository downloaded through
huggingface_hub (standard cache or a given cache folder, progress bars, resumable, `HF_HUB_OFFLINE=1`
honoured: then only the cache is used).

Revisions: `PINNED_REVISIONS` holds the commit each known repository is pinned to; while an entry is None
the default is the branch "main", and the commit actually downloaded (the snapshot folder name) is recorded
in every result's settings, so a result always says exactly which weights made it. Pass `revision=` to pin.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

from .errors import WeightsError

SS4D_REPO = "lizb6626/SS4D"
TRELLIS_REPO = "microsoft/TRELLIS-image-large"
DINOV2_REPO = "facebook/dinov2-with-registers-large"
BIREFNET_REPO = "ZhengPeng7/BiRefNet"  # learned matting, "best" (Swin-L, ~885 MB)
BIREFNET_LITE_REPO = "ZhengPeng7/BiRefNet_lite"  # learned matting, "fast" (Swin-T, ~180 MB)
MATTING_FILES = ["model.safetensors"]  # all that is taken from a matting repository (never its Python files)
MESH_DECODER_CKPT = "ckpts/slat_dec_mesh_swin8_B_64l8m256c_fp16"

PINNED_REVISIONS: dict[str, Optional[str]] = {SS4D_REPO: None, TRELLIS_REPO: None, DINOV2_REPO: None,
                                               BIREFNET_REPO: None, BIREFNET_LITE_REPO: None}

# files needed from each repository (the rest of a repo, e.g. other decoders, is never downloaded)
NEEDED_FILES = {
    SS4D_REPO: ["pipeline.json", "ckpts/*.json", "ckpts/*.safetensors"],
    TRELLIS_REPO: [f"{MESH_DECODER_CKPT}.json", f"{MESH_DECODER_CKPT}.safetensors"],
    DINOV2_REPO: ["config.json", "model.safetensors"],
    BIREFNET_REPO: MATTING_FILES,
    BIREFNET_LITE_REPO: MATTING_FILES,
}


def is_local(source: str) -> bool:
    return Path(source).expanduser().is_dir()


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


LOCAL_HINTS = {  # how a command-line user points at a folder instead of the hub, per source
    SS4D_REPO: "--pipeline DIR (a folder with pipeline.json and ckpts/; 'SS4D Weights' in the add-on's "
               "preferences)",
    TRELLIS_REPO: "--mesh-decoder DIR, or --mesh-decoder none for meshes from the Gaussians",
    DINOV2_REPO: "a copy of it inside the pipeline folder, named after pipeline.json's image_cond_model",
    BIREFNET_REPO: "--matting-model DIR (a folder with BiRefNet's model.safetensors)",
    BIREFNET_LITE_REPO: "--matting-model DIR (a folder with BiRefNet_lite's model.safetensors)",
}
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")


def _download_error(source: str, revision: str, err: Exception) -> WeightsError:
    """What to tell the user when `source` could not be fetched: offline (only when HF_HUB_OFFLINE is
    set), the hub could not be reached, or the repository / revision does not exist."""
    name = type(err).__name__
    local = LOCAL_HINTS.get(source, "--pipeline DIR (a local folder)")
    if offline():
        return WeightsError(f"The weights of {source} are not in the cache and HF_HUB_OFFLINE is set (offline). "
                            f"Run once with network access to download them, or use {local}.")
    if "RepositoryNotFound" in name or "RevisionNotFound" in name or "GatedRepo" in name:
        return WeightsError(f"Cannot access {source} at revision {revision} on the Hugging Face hub ({name}). "
                            f"Check the repository id and revision, or use {local}.")
    if "LocalEntryNotFound" in name or "Connection" in name or "Timeout" in name or isinstance(err, OSError):
        return WeightsError(f"The weights of {source} are not in the cache and the Hugging Face hub could not be "
                            f"reached ({name}). Check the network connection and try again, or use {local}.")
    return WeightsError(f"Downloading {source} failed ({name}: {err}). Nothing was changed; try again (the "
                        f"download resumes where it stopped), or use {local}.")


def resolve(source: str, revision: Optional[str] = None, cache_dir: Optional[str] = None,
            allow_patterns: Optional[list] = None, progress: bool = True) -> tuple[Path, str]:
    """A local folder or a hub repo id -> (local folder, revision used: 'local' or the commit hash)."""
    if is_local(source):
        return Path(source).expanduser().resolve(), "local"
    if "/" not in source or source.count("/") > 1:
        raise WeightsError(f"'{source}' is neither a folder nor a hub repository id (owner/name).")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    revision = revision or PINNED_REVISIONS.get(source) or "main"
    patterns = allow_patterns or NEEDED_FILES.get(source)
    if not progress:
        disable_progress_bars()
    try:
        folder = snapshot_download(source, revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
    except Exception as err:  # noqa: BLE001 - every failure becomes an actionable message
        raise _download_error(source, revision, err) from err
    finally:
        if not progress:
            enable_progress_bars()
    folder = Path(folder)
    return folder, folder.name  # snapshots/<commit hash>


def check_checkpoint(path: Path, source: str) -> None:
    """`path` (a checkpoint name without suffix) has its `.json` and `.safetensors`; a pickle checkpoint in
    their place is named as such (it is never unpickled)."""
    weights = path.with_name(path.name + ".safetensors")
    if weights.is_file() and path.with_name(path.name + ".json").is_file():
        return
    pickles = [path.with_name(path.name + suffix) for suffix in PICKLE_SUFFIXES]
    found = next((p for p in pickles if p.is_file()), None)
    if found is not None:
        raise WeightsError(f"found {found.name} in {found.parent}: only .safetensors is read (pickle checkpoints "
                           f"are never unpickled). Use the .safetensors files of {source}.")
    missing = weights if not weights.is_file() else path.with_name(path.name + ".json")
    raise WeightsError(f"{missing} is missing from {source}. Download the weights again, or give a complete folder.")


def invalid_pipeline_json(folder: Path, err: Exception) -> WeightsError:
    return WeightsError(f"{Path(folder) / 'pipeline.json'} is not a valid SS4D pipeline.json ({err}).")


def pipeline_args(folder: Path) -> dict:
    """The `args` of a pipeline folder's pipeline.json (WeightsError when there is none or it is unreadable)."""
    path = Path(folder) / "pipeline.json"
    if not path.is_file():
        raise WeightsError(f"{folder} has no pipeline.json: not a pipeline folder. Use the folder downloaded from "
                           f"the hub ({SS4D_REPO}) or one written by `make-tiny-pipeline`.")
    try:
        return json.loads(path.read_text())["args"]
    except (KeyError, TypeError, ValueError) as err:
        raise invalid_pipeline_json(folder, err) from err


def check_pipeline_folder(folder: Path, source: str) -> dict:
    """The folder holds pipeline.json and every checkpoint it lists. Returns pipeline.json's `args`."""
    args = pipeline_args(folder)
    try:
        checkpoints = list(args["models"].values()) + ([args["mesh_decoder"]] if args.get("mesh_decoder") else [])
    except (KeyError, TypeError, AttributeError) as err:
        raise invalid_pipeline_json(folder, err) from err
    for name in checkpoints:
        check_checkpoint(folder / name, source)
    return args


def fetch_weights(pipeline: Optional[str] = None, revision: Optional[str] = None,
                  mesh_decoder: Optional[str] = "auto", cache_dir: Optional[str] = None,
                  report=None) -> dict[str, tuple[Path, str]]:
    """Every weight file generation reads, on disk before any other work (downloaded when missing and
    allowed): the pipeline, the image encoder unless the pipeline folder has its own, and the mesh decoder
    ('auto': the pipeline's own, else TRELLIS's; None or "none": none). Returns {source: (folder, revision
    used)}; `report(source, fraction)` is called before each source. Raises WeightsError with what to do."""
    pipeline = pipeline or SS4D_REPO
    if isinstance(mesh_decoder, str) and mesh_decoder.strip().lower() == "none":
        mesh_decoder = None
    if report is not None:
        report(pipeline, 0.0)
    fetched = {pipeline: resolve(pipeline, revision, cache_dir)}
    args = check_pipeline_folder(fetched[pipeline][0], pipeline)
    others = []
    if not (fetched[pipeline][0] / str(args.get("image_cond_model", "dinov2_vitl14_reg"))).is_dir():
        others.append(DINOV2_REPO)
    if mesh_decoder is not None and not (mesh_decoder == "auto" and args.get("mesh_decoder")):
        others.append(TRELLIS_REPO if mesh_decoder == "auto" else mesh_decoder)
    for i, source in enumerate(others):
        if report is not None:
            report(source, (i + 1) / (len(others) + 1))
        fetched[source] = resolve(source, cache_dir=cache_dir)
    return fetched


def require_files(folder: Path, relative: list[str], source: str) -> None:
    for rel in relative:
        if not (folder / rel).is_file():
            raise WeightsError(f"{folder / rel} is missing from {source}. Download the weights again "
                               f"('Download weights' in the preferences, or run with network access once).")


# ------------------------------------------------------------------ what is on disk (no network, no huggingface_hub)
# Read by Blender's own Python for the preferences and the panel, which has no huggingface_hub: the cache
# layout (`models--owner--name/refs/<branch>`, `snapshots/<commit>/...`) is read directly.
# File whose presence means a source is complete enough to try (the loader still checks every file).
MARKER_FILES = {SS4D_REPO: "pipeline.json", DINOV2_REPO: "model.safetensors",
                TRELLIS_REPO: f"{MESH_DECODER_CKPT}.safetensors", BIREFNET_REPO: "model.safetensors",
                BIREFNET_LITE_REPO: "model.safetensors"}


def hub_cache_dir(cache_dir: Optional[str] = None) -> Path:
    """The Hugging Face hub cache folder huggingface_hub would use (cache_dir, HF_HUB_CACHE, HF_HOME)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def cached_snapshot(repo_id: str, revision: Optional[str] = None, cache_dir: Optional[str] = None) -> Optional[Path]:
    """The cached snapshot folder of repo_id at revision (branch, tag or commit), or None."""
    root = hub_cache_dir(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    revision = revision or PINNED_REVISIONS.get(repo_id) or "main"
    ref = root / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = root / "snapshots" / commit
    return snapshot if re.fullmatch(r"[0-9a-f]{40}", commit) and snapshot.is_dir() else None


def _source_status(label: str, source: str, revision: Optional[str], cache_dir: Optional[str],
                   marker: Optional[str]) -> tuple[bool, str]:
    """marker: the file that must be there (None: any folder / cached snapshot will do)."""
    if is_local(source):
        ok = marker is None or (Path(source).expanduser() / marker).is_file()
        return ok, f"{label}: local folder " + ("ready" if ok else f"has no {marker}")
    snapshot = cached_snapshot(source, revision, cache_dir)
    if snapshot is not None and (marker is None or (snapshot / marker).is_file()):
        return True, f"{label}: {source} downloaded (commit {snapshot.name[:7]})"
    hint = "offline: set a local folder" if offline() else "click Download Weights"
    return False, f"{label}: {source} not downloaded yet ({hint})"


def weights_status(pipeline: str, revision: Optional[str] = None, mesh_decoder: Optional[str] = "auto",
                   cache_dir: Optional[str] = None) -> list[tuple[bool, str]]:
    """What generation needs and whether it is on disk: one (ready, line) per source - the SS4D weights,
    the DINOv2 image encoder and the mesh decoder ('auto', 'none'/'' or a repository id / folder).
    Looks at files only (cheap enough for a panel's draw)."""
    pipeline = pipeline or SS4D_REPO
    lines = [_source_status("SS4D", pipeline, revision or None, cache_dir, MARKER_FILES[SS4D_REPO])]
    args = {}
    folder = (Path(pipeline).expanduser() if is_local(pipeline)
              else cached_snapshot(pipeline, revision or None, cache_dir))
    if folder is not None and (folder / "pipeline.json").is_file():
        try:
            args = json.loads((folder / "pipeline.json").read_text()).get("args", {})
        except (OSError, ValueError, AttributeError):
            args = {}
    has_encoder = folder is not None and args.get("image_cond_model")
    encoder = folder / str(args["image_cond_model"]) if has_encoder else None
    if encoder is not None and encoder.is_dir():
        lines.append(_source_status("Image encoder", str(encoder), None, None, MARKER_FILES[DINOV2_REPO]))
    else:
        lines.append(_source_status("Image encoder", DINOV2_REPO, None, cache_dir, MARKER_FILES[DINOV2_REPO]))
    choice = (mesh_decoder or "").strip()
    if choice.lower() in ("", "none"):
        lines.append((True, "Mesh decoder: none (meshes from the Gaussians)"))
    elif choice == "auto" and folder is not None and args.get("mesh_decoder"):
        ok = (folder / f"{args['mesh_decoder']}.safetensors").is_file()
        lines.append((ok, "Mesh decoder: in the SS4D folder" + ("" if ok else " (file missing)")))
    else:
        source = TRELLIS_REPO if choice == "auto" else choice   # another repo / folder: its layout is free
        lines.append(_source_status("Mesh decoder", source, None, cache_dir, MARKER_FILES.get(source)))
    return lines
