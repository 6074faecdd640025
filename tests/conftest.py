"""Test setup: offline, run folders in a temporary folder, the workbench cache under .cache/test."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SLMOPS_CACHE", str(ROOT/".cache"/"test"))


@pytest.fixture(autouse=True)
def runs_root(tmp_path, monkeypatch):
    "Every test writes run folders into its own temporary folder, never into the repository."
    monkeypatch.setenv("SLMOPS_RUNS_ROOT", str(tmp_path/"runs"))
    return tmp_path/"runs"
