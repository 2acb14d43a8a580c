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
