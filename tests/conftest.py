"""Shared fixtures: tiny synthetic datasets and an isolated cache folder."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's ~/.cache/covid_ray from tests."""
    monkeypatch.setenv("COVID_RAY_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
