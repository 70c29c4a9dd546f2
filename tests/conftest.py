"""Shared test set-up: one intra-op thread (2-core hosts), fixture paths, tiny checkpoints."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden"
AUDIO = FIXTURES / "audio"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def audio_dir() -> Path:
    return AUDIO


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny random-weight model root per test session (about 10 s to write, ~36 MB)."""
    from stepaudio.tiny import ensure_tiny_models

    return ensure_tiny_models(tmp_path_factory.mktemp("tiny") / "models")


# The realtime server and its speech fixture, defined once here so that every server test module
# shares one warmed-up server (a fixture imported into each module would be one per module).
from realtime_helpers import server, speech  # noqa: E402, F401
