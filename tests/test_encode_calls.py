"""How an index build sizes its encoder calls: one tile (4 rotations) a call on the CPU, where large calls are
slower (engine/retrieval/index_store.py, ``CPU_TILES_PER_CALL``), the encoder's ``max_batch`` on a GPU; the
descriptors do not depend on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from imagery import SAMPLE

from engine import api
from engine.imagery import open_source
from engine.retrieval import faiss_index
from engine.retrieval.index_store import (
    CPU_TILES_PER_CALL,
    FAISS_FILE,
    ROTATIONS,
    build_index,
    encode_tiles,
    tiles_per_call,
)

SIZE = 96


@pytest.fixture(scope="module")
def encoder():
    return api.get_encoder("default", None, "onnx", SIZE, None)


@pytest.fixture(scope="module")
def tiles():
    src = open_source(SAMPLE / "naip_2018.tif", tile_sizes=(256,), overlap=0.5)
    return [(src, spec) for spec in src.specs()[:12]]


def test_cpu_encoders_get_one_tile_a_call_and_gpu_ones_their_max_batch(encoder) -> None:
    assert CPU_TILES_PER_CALL == 1
    assert tiles_per_call(encoder) == 1
    torch_encoder = api.get_encoder("default", None, "torch", SIZE, None)
    assert tiles_per_call(torch_encoder) == 1
    torch_encoder.device = "cuda:0"  # how a Ray GPU worker's encoder reads (TorchEncoder.to); not run here
    assert tiles_per_call(torch_encoder) == torch_encoder.max_batch // len(ROTATIONS) == 16


def test_the_descriptors_do_not_depend_on_the_call_size(encoder, tiles) -> None:
    whole = encode_tiles(tiles, encoder)
    one_by_one = np.concatenate([encode_tiles([t], encoder) for t in tiles])
    assert whole.shape == (len(tiles) * len(ROTATIONS), encoder.dim)
    np.testing.assert_allclose(one_by_one, whole, rtol=0, atol=1e-5)


class CallSizes:
    """The real encoder, recording the images of each call."""

    def __init__(self, encoder):
        self.inner, self.sizes = encoder, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, images):
        self.sizes.append(len(images))
        return self.inner.encode(images)


def test_a_build_on_the_cpu_encodes_a_tile_a_call_and_an_explicit_size_is_kept(encoder, tmp_path) -> None:
    src = open_source(SAMPLE / "naip_2018.tif", tile_sizes=(256,), overlap=0.5)
    n = len(src.specs())
    spy = CallSizes(encoder)
    build_index([src], spy, tmp_path / "one")
    assert spy.sizes == [len(ROTATIONS)] * n
    spy.sizes.clear()
    build_index([src], spy, tmp_path / "five", batch_tiles=5)
    assert spy.sizes[0] == 5 * len(ROTATIONS) and sum(spy.sizes) == n * len(ROTATIONS)
    a, b = (faiss_index.read_index(tmp_path / d / FAISS_FILE) for d in ("one", "five"))
    np.testing.assert_allclose(a.reconstruct_n(0, a.ntotal), b.reconstruct_n(0, b.ntotal), rtol=0, atol=1e-5)
    ma, mb = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "five"))
    assert ma["model"] == mb["model"] and ma["factory"] == mb["factory"]
