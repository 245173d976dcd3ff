"""Shared fixtures: the bundled sample, the real data folder, a small real index."""

from __future__ import annotations

from pathlib import Path

import pytest
from imagery import SAMPLE, SHARED_DATA


@pytest.fixture(scope="session")
def sample_index(tmp_path_factory):
    """A real index of the bundled 2018 NAIP raster (384-px tiles, 50% overlap, default model at 224 px)."""
    from engine import api

    out = tmp_path_factory.mktemp("idx") / "naip2018"
    api.index([str(SAMPLE / "naip_2018.tif")], str(out), tile_sizes=(384,), input_size=224)
    return out


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA
