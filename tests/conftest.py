import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SS4D_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared (golden fixtures, samples). Missing is a failure, not a skip."""
    assert SHARED.is_dir(), f"shared fixtures folder not found at {SHARED}"
    return SHARED


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny random-weight pipeline folder (its outputs are noise), one per test module."""
    from ss4d_blender.engine.tiny import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipeline")


@pytest.fixture(scope="module")
def addon(tiny):
    """The add-on registered in a fresh factory scene (the `bpy` module), generating with `tiny` on the CPU."""
    bpy = pytest.importorskip("bpy")
    import ss4d_blender
    from ss4d_blender.blender import preferences

    bpy.ops.wm.read_factory_settings(use_empty=True)
    ss4d_blender.register()
    saved = vars(preferences.HEADLESS).copy()
    preferences.HEADLESS.pipeline, preferences.HEADLESS.device = str(tiny), "cpu"
    yield
    vars(preferences.HEADLESS).update(saved)
    ss4d_blender.unregister()


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: one torch thread is fastest and immune to a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
