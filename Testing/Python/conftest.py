"""Shared test set-up: offline, a private weight cache, the repository on sys.path, real data when present."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a failed hub look-up would hang ~45 s without network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("SSAM_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def private_weight_cache(tmp_path_factory, monkeypatch):
    """Tests never read or write the user's weight cache."""
    monkeypatch.setenv("SSAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "weight-cache"))


@pytest.fixture(scope="session")
def data_dir():
    if not DATA.is_dir():
        pytest.skip(f"real test images not found at {DATA} (set SSAM_TEST_DATA to the shared data folder)")
    return DATA
