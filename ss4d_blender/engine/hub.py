"""Where the weights come from: a local folder, or a Hugging Face hub repository downloaded through
huggingface_hub (standard cache or a given cache folder, progress bars, resumable, `HF_HUB_OFFLINE=1`
honoured: then only the cache is used).

Revisions: `PINNED_REVISIONS` holds the commit each known repository is pinned to. The commit hashes
could not be looked up from the offline machine this was written on; until they are filled in, the
default is the branch "main" and the commit actually downloaded (the snapshot folder name) is recorded in
every result's settings, so a result always says exactly which weights made it. Pass `revision=` to pin.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .errors import WeightsError

SS4D_REPO = "lizb6626/SS4D"
TRELLIS_REPO = "microsoft/TRELLIS-image-large"
DINOV2_REPO = "facebook/dinov2-with-registers-large"
MESH_DECODER_CKPT = "ckpts/slat_dec_mesh_swin8_B_64l8m256c_fp16"

PINNED_REVISIONS: dict[str, Optional[str]] = {SS4D_REPO: None, TRELLIS_REPO: None, DINOV2_REPO: None}

# files needed from each repository (the rest of a repo, e.g. other decoders, is never downloaded)
NEEDED_FILES = {
    SS4D_REPO: ["pipeline.json", "ckpts/*.json", "ckpts/*.safetensors"],
    TRELLIS_REPO: [f"{MESH_DECODER_CKPT}.json", f"{MESH_DECODER_CKPT}.safetensors"],
    DINOV2_REPO: ["config.json", "model.safetensors"],
}


def is_local(source: str) -> bool:
    return Path(source).expanduser().is_dir()


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


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
        name = type(err).__name__
        if offline() or "LocalEntryNotFound" in name or "Offline" in name:
            raise WeightsError(
                f"The weights of {source} are not in the cache and downloading is disabled (offline). Connect "
                f"to the internet and use 'Download weights' (or run once without HF_HUB_OFFLINE), or point "
                f"the weights source at a local folder.") from err
        if "RepositoryNotFound" in name or "RevisionNotFound" in name or "GatedRepo" in name:
            raise WeightsError(f"Cannot access {source} at revision {revision} on the Hugging Face hub ({name}). "
                               f"Check the repository id / revision in the preferences.") from err
        raise WeightsError(f"Downloading {source} failed ({name}: {err}). Nothing was changed; try again - the "
                           f"download resumes where it stopped.") from err
    finally:
        if not progress:
            enable_progress_bars()
    folder = Path(folder)
    return folder, folder.name  # snapshots/<commit hash>


def require_files(folder: Path, relative: list[str], source: str) -> None:
    for rel in relative:
        if not (folder / rel).is_file():
            raise WeightsError(f"{folder / rel} is missing from {source}. Download the weights again "
                               f"('Download weights' in the preferences, or run with network access once).")
