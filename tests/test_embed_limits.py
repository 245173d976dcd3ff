"""Embeddings and heatmaps against resource bombs, nodata, the antimeridian, broken files and full disks.

Bombs are sparse GeoTIFFs made here (a 100000 x 100000-pixel raster with one written block is ~1 MB on
disk): nothing in these tests allocates gigabytes, and the one that measures memory runs in a subprocess.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from engine.embed import cache
from engine.embed import grid as grid_mod
from engine.embed.actions import embed_at, embed_cells, heatmap
from engine.embed.grid import FeatureGrid, sweep_stale_scratch
from engine.embed.models import load_embedding_model
from engine.embed.nili import NiliDecoder, NiliField, nili_reference
from engine.embed.raster import EmbedRaster
from engine.errors import CancelledError, DiskFullError, ImageTooLargeError, InputError, OutsideAreaError
from engine.progress import CancelToken

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample" / "naip_2018.tif"
BOMB_SIDE = 100_000


def make_bomb(path: Path, side: int = BOMB_SIDE, block: tuple[int, int] = (0, 0)) -> Path:
    """A sparse 3-band uint8 GeoTIFF of side x side pixels with one 512 x 512 block written (at block)."""
    profile = dict(
        driver="GTiff",
        width=side,
        height=side,
        count=3,
        dtype="uint8",
        crs="EPSG:32633",
        transform=from_origin(500000, 5000000, 0.5, 0.5),
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
        SPARSE_OK=True,
        BIGTIFF="YES",
    )
    with rasterio.open(path, "w", **profile) as dst:
        rng = np.random.default_rng(0)
        col, row = block
        dst.write(
            rng.integers(0, 255, size=(3, 512, 512), dtype=np.uint8),
            window=((row, row + 512), (col, col + 512)),
        )
    return path


@pytest.fixture(scope="module")
def model():
    return load_embedding_model("default")


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    limit = cache.cache_limit()
    cache.clear()
    yield
    cache.clear()
    cache.set_cache_limit(limit)


def _xy(path: Path, col: float, row: float) -> tuple[float, float]:
    with rasterio.open(path) as ds:
        x, y = ds.transform @ (col, row)
    return float(x), float(y)


# ------------------------------------------------------------------------------ bombs: bounded memory

_RSS_SCRIPT = r"""
import json, resource, sys
import numpy as np
from engine.embed.actions import embed_at
from engine.embed import cache
from engine.embed.models import load_embedding_model

path, side = sys.argv[1], int(sys.argv[2])
backbone = load_embedding_model("default", None, None, None).backbone  # the instance embed_at uses
for _ in range(3):  # onnxruntime's arena grows over the first runs: the network's memory, not the grid's
    backbone.features(np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pts = [(500000 + 0.5 * c, 5000000 - 0.5 * r) for c, r in [(300, 200), (side / 2, side / 2), (side - 3, side - 1)]]
res = embed_at(path, pts)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with cache.grid_for(path, load_embedding_model("default", None, None, None), None) as (_, grid):
    held = grid.nbytes if hasattr(grid, "nbytes") else grid.feat.nbytes  # (the latter: before the fix)
    dense = getattr(grid, "_dense", None) is not None
print(json.dumps({"base_kb": base, "peak_kb": peak, "held": held, "dense": dense,
                  "norms": [float(np.linalg.norm(p.vector)) for p in res.points]}))
"""


def _embed_rss(path: Path, side: int, tmp: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)}
    r = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(path), str(side)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_embed_on_a_100000_pixel_square_bomb_costs_a_few_windows(tmp_path: Path) -> None:
    """One click on a raster declaring 10^10 pixels: a few windows, not the 17.5 GB grid (issue 11, item 4)."""
    bomb = make_bomb(tmp_path / "bomb.tif")
    assert bomb.stat().st_size < 3 << 20  # the bomb itself is small
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = _embed_rss(bomb, BOMB_SIDE, scratch)
    grown_mb = (out["peak_kb"] - out["base_kb"]) / 1024
    assert grown_mb < 256, f"embedding 3 points grew the peak RSS by {grown_mb:.0f} MB"
    assert not out["dense"] and out["held"] < 64 << 20  # a few windows held, never the whole grid
    assert all(abs(n - 1) < 1e-5 for n in out["norms"])
    left = [
        p
        for p in scratch.rglob("*")
        if "skyloc-grid" in str(p) or (p.is_file() and p.stat().st_size > 1 << 20)
    ]
    assert left == []  # no grid file left in the temporary folder


def test_embed_never_allocates_the_whole_grid(tmp_path: Path, model) -> None:
    """Cheap in-process version of the bomb test: the grid holds the windows around the point only."""
    bomb = make_bomb(tmp_path / "bomb.tif", block=(50_000, 50_000))
    res = embed_at(str(bomb), [_xy(bomb, 50_100, 50_100)])
    assert res.points[0].vector is not None
    with cache.grid_for(str(bomb), model, None) as (_, grid):
        assert grid.dense_bytes > 10 << 30  # what the whole grid would take
        assert grid._dense is None and 0 < grid.nbytes <= 4 * 112 * 64 * 64 * 4
        assert len(grid.computed) <= 4


def test_heatmap_refuses_a_bomb_before_allocating(tmp_path: Path, model) -> None:
    import tracemalloc

    bomb = make_bomb(tmp_path / "bomb.tif")
    out = tmp_path / "out" / "heat.tif"
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLargeError, match="max-raster-pixels") as err:
            heatmap(str(bomb), str(out), at=_xy(bomb, 100, 100))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.exit_code == 3 and err.value.http_status == 413
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MB allocated before refusing"
    assert not out.parent.exists() or not list(out.parent.iterdir())
    # the limit is a parameter: the small sample is refused under a tiny one, and passes by default
    with pytest.raises(ImageTooLargeError):
        heatmap(str(SAMPLE), str(tmp_path / "h.tif"), at=_xy(SAMPLE, 400, 300), max_raster_pixels=1000)


# ---------------------------------------------------------------------- same results as the whole grid


def _mosaic(tmp_path: Path) -> Path:
    """1868x724 px: 3 windows of 64 cells across, i.e. 2 seams (as in test_embed.py)."""
    with rasterio.open(SAMPLE) as a, rasterio.open(ROOT / "sample" / "naip_2009.tif") as b:
        data = np.concatenate([a.read([1, 2, 3]), b.read([1, 2, 3])], axis=2)
        profile = dict(
            driver="GTiff",
            width=data.shape[2],
            height=data.shape[1],
            count=3,
            dtype="uint8",
            crs=a.crs,
            transform=a.transform,
        )
    path = tmp_path / "mosaic.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def _test_points(grid: FeatureGrid, w: int, h: int, n: int = 60) -> np.ndarray:
    """Pixel positions: random, the raster's corners and edges, and around the seams between windows."""
    rng = np.random.default_rng(7)
    pts = np.stack([rng.uniform(0, w, n), rng.uniform(0, h, n)], axis=1)
    edges = [[0, 0], [w, h], [w, 0], [0, h], [8, 8], [w - 8, h / 2]]
    seams = [
        [win.own_start * 16 + d, 300.0] for win in grid.plan_cols[1:] for d in (-24, -8, -7.5, 0, 0.5, 8, 24)
    ]
    return np.concatenate([pts, np.asarray(edges + seams, float)])


@pytest.mark.slow
def test_embeddings_are_the_whole_grids_at_any_cache_bound(tmp_path: Path, model) -> None:
    """Window by window, grouped, under a bound that evicts: the same vectors as NILI on the whole grid."""
    path = _mosaic(tmp_path)
    with EmbedRaster(path) as r:
        whole = FeatureGrid(r, model.backbone)
        whole.ensure()
        assert len(whole.plan_cols) == 3
        px = _test_points(whole, r.width, r.height)
        cells = whole.cell_coords(px[:, 0], px[:, 1])
        expected = NiliField(whole.feat, model.decoder).embed(cells)  # what embed_at computed until now
        expected /= np.linalg.norm(expected, axis=1, keepdims=True)
        xy = np.column_stack(r.transform @ (px[:, 0], px[:, 1]))
        # a trained decoder too: the literal released NILI on the whole grid is the reference
        rng = np.random.default_rng(3)
        c = model.backbone.channels
        dec = NiliDecoder(c, rng.normal(size=(16, 9 * c + 2)).astype(np.float32) * 0.05, rng.normal(size=16))
        ref = nili_reference(whole.feat, cells, dec)
        small = FeatureGrid(r, model.backbone, max_bytes=1)  # holds one window at a time
        got_trained = embed_cells(small, dec, cells)
        assert len(small.computed) <= 4 and small._dense is None  # the windows of the last group only
    assert np.abs(got_trained - ref).max() < 1e-4
    cache.set_cache_limit(2 << 20)  # less than the whole grid (3.6 MB): windows are evicted between groups
    got = np.asarray([p.vector for p in embed_at(str(path), xy).points])
    assert np.abs(got - expected).max() < 1e-6
    assert cache.cached_bytes() <= 2 << 20


# ------------------------------------------------------------------------------------- grid scratch


def test_scratch_of_a_killed_process_is_swept(tmp_path: Path) -> None:
    """A memory-mapped grid's folder outlives a kill -9; the next process removes it, never a live one's."""
    script = textwrap.dedent(
        """
        import os, signal
        from engine.embed import grid
        arr, path = grid._allocate_memmap((4, 64, 64), "a test grid")
        print(path, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == -signal.SIGKILL
    left = Path(r.stdout.strip())
    assert left.is_file() and left.parent.name.startswith(grid_mod.SCRATCH_PREFIX)
    live = tmp_path / f"{grid_mod.SCRATCH_PREFIX}1"  # pid 1 is always alive
    live.mkdir()
    removed = sweep_stale_scratch(tmp_path)
    assert removed == [left.parent] and not left.parent.exists() and live.exists()


def test_memory_mapped_grid_removed_on_cancel_and_after_use(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(grid_mod, "IN_MEMORY_BYTES", 0)  # every whole grid goes to a file
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(grid_mod, "_scratch", None)
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    token = CancelToken()

    def progress(f: float, msg: str) -> None:
        if msg.startswith("heatmap: row"):
            token.cancel()

    out = tmp_path / "out" / "c.tif"
    xy = _xy(SAMPLE, 400, 300)
    with pytest.raises(CancelledError):
        heatmap(str(SAMPLE), str(out), at=xy, progress=progress, cancel=token, resolution=2.0)
    files = [p for p in (tmp_path / "tmp").rglob("*") if p.is_file()]
    assert files == [], files
    heatmap(str(SAMPLE), str(out), at=xy, resolution=20.0)
    assert [p for p in (tmp_path / "tmp").rglob("*") if p.is_file()] == []
    assert out.is_file()


# ------------------------------------------------------------------------------------------ the cache


def test_grid_cache_is_bounded_in_bytes(tmp_path: Path, model, monkeypatch) -> None:
    monkeypatch.setenv(cache.CACHE_ENV, "3.5")
    assert cache._limit_from_env() == int(3.5 * 2**20)
    limit = 2 << 20  # one sample grid is 1.2 MB: at most one raster's windows fit with another's
    cache.set_cache_limit(limit)
    copies = []
    for n in range(4):
        p = tmp_path / f"copy{n}.tif"
        shutil.copy(SAMPLE, p)
        copies.append(p)
        embed_at(str(p), [_xy(p, 100, 100)])
        assert 0 < cache.cached_bytes() <= limit
    with cache.grid_for(str(copies[-1]), model, None) as (_, grid):
        assert grid.computed  # the most recent raster keeps its windows
    heatmap(str(copies[0]), str(tmp_path / "h.tif"), at=_xy(copies[0], 400, 300), resolution=20.0)
    assert cache.cached_bytes() <= limit  # a heatmap's whole grid is cut back after the call
    cache.set_cache_limit(0)
    assert cache.cached_bytes() == 0


# ------------------------------------------------------------------------------------------- nodata


def _float_raster(path: Path, nodata: float | None) -> Path:
    with rasterio.open(SAMPLE) as src:
        data = src.read([1, 2, 3]).astype(np.float32)
        profile = dict(
            driver="GTiff",
            width=src.width,
            height=src.height,
            count=3,
            dtype="float32",
            crs=src.crs,
            transform=src.transform,
            nodata=nodata,
        )
    data[:, 100:300, 200:500] = np.nan
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


@pytest.mark.parametrize("nodata", [float("nan"), None], ids=["nan-nodata", "undeclared-nan"])
def test_embedding_on_a_nodata_hole_is_flagged(tmp_path: Path, nodata: float | None) -> None:
    path = _float_raster(tmp_path / "holed.tif", nodata)
    hole, valid = _xy(path, 350, 200), _xy(path, 700, 500)
    res = embed_at(str(path), [hole, valid])
    assert res.points[0].vector is None and res.points[0].reason == "nodata"
    assert res.points[1].reason is None and abs(np.linalg.norm(res.points[1].vector) - 1) < 1e-5
    doc = json.loads(json.dumps(res.to_json()))
    assert doc["points"][0]["vector"] is None and doc["points"][0]["reason"] == "nodata"
    m = res.matrix()
    assert m.shape == (2, res.dim) and np.isnan(m[0]).all() and np.isfinite(m[1]).all()
    with pytest.raises(InputError, match="nodata"):  # a heatmap has nothing to compare with there
        heatmap(str(path), str(tmp_path / "h.tif"), at=hole)


def test_embedding_at_the_nodata_value_is_flagged(tmp_path: Path) -> None:
    with rasterio.open(SAMPLE) as src:  # nodata 0
        data, profile = src.read(), src.profile
    data[:, 100:300, 200:500] = 0
    path = tmp_path / "zero.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    res = embed_at(str(path), [_xy(path, 350, 200), _xy(path, 934, 724)])  # in the hole; the far corner
    assert [p.reason for p in res.points] == ["nodata", None]


# ------------------------------------------------------------------------------------ antimeridian


def _geographic(path: Path, west: float) -> Path:
    data = np.random.default_rng(0).integers(0, 255, size=(3, 200, 450), dtype=np.uint8)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=450,
        height=200,
        count=3,
        dtype="uint8",
        crs="EPSG:4326",
        transform=from_origin(west, 10.0, 0.001, 0.001),
    ) as dst:
        dst.write(data)
    return path


def test_longitudes_wrap_on_a_raster_across_the_antimeridian(tmp_path: Path) -> None:
    east = _geographic(tmp_path / "east.tif", 179.8)  # lon 179.8 .. 180.25
    a = embed_at(str(east), [(-179.9, 9.95)])
    assert abs(a.points[0].col - 300) < 1e-6 and abs(a.points[0].row - 50) < 1e-6
    b = embed_at(str(east), [(180.1, 9.95)])  # the same place
    assert np.allclose(a.points[0].vector, b.points[0].vector)
    # from a projected CRS too (pyproj answers in -180..180)
    from pyproj import Transformer

    x, y = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(-179.9, 9.95)
    c = embed_at(str(east), [(x, y)], crs="EPSG:3857")
    assert abs(c.points[0].col - 300) < 1e-4
    west = _geographic(tmp_path / "west.tif", -180.25)  # lon -180.25 .. -179.8: the other direction
    d = embed_at(str(west), [(179.9, 9.95)])
    assert abs(d.points[0].col - 150) < 1e-6
    with pytest.raises(OutsideAreaError):
        embed_at(str(east), [(-179.0, 9.95)])  # truly outside, either way round


# ------------------------------------------------------------------------------ broken input, full disk


def test_truncated_raster_is_an_input_error(tmp_path: Path) -> None:
    data = SAMPLE.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt") as err:
        embed_at(str(cut), [_xy(cut, 800, 600)])
    assert err.value.exit_code == 3 and err.value.http_status == 422
    out = tmp_path / "out" / "h.tif"
    with pytest.raises(InputError, match="truncated or corrupt"):
        heatmap(str(cut), str(out), location=(47.02, -99.15), resolution=20.0)
    assert not out.parent.exists() or not list(out.parent.iterdir())


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_during_a_heatmap_is_disk_full_error(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "small", "256k") as small:
        out = small / "heat.tif"
        with pytest.raises(DiskFullError, match="no space left") as err:
            heatmap(str(SAMPLE), str(out), at=_xy(SAMPLE, 400, 300))
        assert err.value.exit_code == 3 and err.value.http_status == 507
        assert list(small.iterdir()) == []  # no partial output, no scratch


def test_disk_full_on_the_style_sidecar_leaves_no_heatmap(tmp_path: Path, monkeypatch) -> None:
    from engine.embed import heatmap_io

    def full(*_a: object, **_k: object) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(heatmap_io, "_qml", full)
    out = tmp_path / "heat.tif"
    with pytest.raises(DiskFullError):
        heatmap(str(SAMPLE), str(out), at=_xy(SAMPLE, 400, 300), resolution=20.0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_corrupt_onnx_cache_of_the_feature_backbone_is_exported_again(tmp_path: Path, monkeypatch) -> None:
    """The heatmap backbone's cached ONNX export is checked against its recorded sha256 (issue 11, item 14)."""
    from engine.embed.backbones import EffnetBackbone

    monkeypatch.setenv("SKYLOC_CACHE", str(tmp_path))
    rgb = np.random.default_rng(0).integers(0, 255, size=(1024, 1024, 3), dtype=np.uint8)
    first = EffnetBackbone().features(rgb)  # exports into the empty cache
    (cached,) = (tmp_path / "onnx").glob("effnet-lite0-s16*.onnx")
    cached.write_bytes(cached.read_bytes()[:1000])  # a truncated cache file
    again = EffnetBackbone().features(rgb)
    assert np.abs(again - first).max() < 1e-5
    assert cached.stat().st_size > 1000
