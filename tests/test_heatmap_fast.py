"""The fast heatmap post-processing (separable cosine grid, row-box masks, COG settings) against the reference.

The reference is the pointwise path (:meth:`CosineField.__call__` on every pixel centre, ``valid_at``) and,
below it, the released NILI algorithm (:func:`nili_reference`). Rasters here are not a multiple of the
cell size (16 px), have nodata holes, and are sampled on their own grid and on coarser/finer ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from engine.embed.actions import cosine_rows, embed_cells, heatmap
from engine.embed.cache import grid_for
from engine.embed.heatmap_io import NODATA, REFERENCE_COG, output_grid, write_heatmap
from engine.embed.models import load_embedding_model
from engine.embed.nili import NiliDecoder, NiliField, _grid_points, nili_reference, scalar_on_grid
from engine.embed.raster import EmbedRaster

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample" / "naip_2018.tif"


def _axis(n: int, rng: np.random.Generator) -> np.ndarray:
    """Positions along an axis of n cells: a sweep, the outermost centres and points a hair from them."""
    special = [-0.5, 0.0, 1e-7, 0.004, n - 1.0, n - 1 - 1e-9, n - 1.003, n - 0.5, 0.5, 1.5]
    return np.concatenate([rng.uniform(-0.5, n - 0.5, 37), np.linspace(-0.5, n - 0.5, 61), special])


@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.parametrize("shape", [(9, 13), (1, 6), (5, 1), (70, 3)])
def test_cosine_on_grid_equals_pointwise_and_released_algorithm(
    trained: bool, shape: tuple[int, int]
) -> None:
    rng = np.random.default_rng(sum(shape) + trained)
    c, d = 12, 8
    h, w = shape
    feat = rng.normal(size=(c, h, w)).astype(np.float32)
    dec = (
        NiliDecoder(
            c, rng.normal(size=(d, 9 * c + 2)).astype(np.float32) * 0.3, rng.normal(size=d).astype(np.float32)
        )
        if trained
        else NiliDecoder.identity(c)
    )
    v = rng.normal(size=dec.dim)
    field = NiliField(feat, dec).cosine(v)
    xs, ys = _axis(w, rng), _axis(h, rng)
    grid = field.on_grid(field.blend_x(xs), field.blend_y(ys))
    pts = _grid_points(xs, ys)
    assert grid.shape == (len(ys), len(xs)) and grid.dtype == np.float32
    assert np.abs(grid - field(pts).reshape(grid.shape)).max() <= 1e-6
    ref = nili_reference(feat, pts, dec)
    expected = (ref @ v / np.linalg.norm(ref, axis=1) / np.linalg.norm(v)).reshape(grid.shape)
    assert np.abs(grid - expected).max() <= 1e-5


def test_separable_weights_that_do_not_factor_are_flagged() -> None:
    feat = np.random.default_rng(0).normal(size=(4, 6, 6)).astype(np.float32)
    field = NiliField(feat, NiliDecoder.identity(4)).cosine(np.ones(4))
    blend = field.blend_x(np.array([2.3, 0.0, 5.0, 5.0 + 1e-4, -0.2, 5.0 - 1e-4]))
    # interior: exact; the outermost cell centres (and a hair from them), where the ensemble weights are
    # the 1e-9 floor's: not exact, computed pointwise
    assert blend.exact.tolist() == [True, True, False, False, True, True]


def _odd_raster(tmp: Path, kind: str) -> Path:
    """A 301 x 203 crop of the sample (not a multiple of 16) with a nodata hole and a ragged nodata edge."""
    with rasterio.open(SAMPLE) as src:
        data = src.read((1, 2, 3), window=Window(211, 157, 301, 203))
        profile = src.profile
    profile.update(width=301, height=203, count=3, transform=src.window_transform(Window(211, 157, 301, 203)))
    profile.pop("photometric", None)
    if kind == "float":
        data = data.astype(np.float32)
        data[:, 40:90, 120:170] = np.nan  # a NaN hole, no nodata value declared
        profile.update(dtype="float32", nodata=None)
    else:
        data[:, 40:90, 120:170] = 0
        data[:, 180:, :37] = 0
        profile.update(nodata=0)
    path = tmp / f"odd_{kind}.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


@pytest.mark.parametrize("kind", ["uint8", "float"])
@pytest.mark.parametrize("resolution", [None, 5.0 * 3.7, 5.0 * 0.61])
def test_fast_strips_equal_reference_on_a_raster_not_a_multiple_of_the_cell(
    tmp_path: Path, kind: str, resolution: float | None
) -> None:
    path = _odd_raster(tmp_path, kind)
    model = load_embedding_model("default")
    with grid_for(str(path), model, None) as (r, grid):
        assert r.width % grid.backbone.stride and r.height % grid.backbone.stride
        grid.ensure()
        v = grid.feat[:, 5, 7].astype(np.float64)
        field = NiliField(grid.feat, model.decoder).cosine(v)
        og = output_grid(r, resolution)
        assert og.axes_in_raster(r) is not None  # the fast path is taken
        fast = cosine_rows(field, r, grid.backbone.stride, og)
        ref = cosine_rows(field, r, grid.backbone.stride, og, pointwise=True)
        for row0 in range(0, og.height, 100):  # strips of 100 rows, the last one short
            rows = min(100, og.height - row0)
            a, b = fast(row0, rows), ref(row0, rows)
            assert a.shape == b.shape == (rows, og.width)
            assert np.array_equal(np.isnan(a), np.isnan(b))  # the same nodata pixels
            assert np.nanmax(np.abs(a - b)) <= 1e-5
        assert np.isnan(ref(0, og.height)).any()  # the hole is there


def test_valid_grid_equals_valid_at_also_on_sparse_rows(tmp_path: Path) -> None:
    path = _odd_raster(tmp_path, "uint8")
    with EmbedRaster(path) as r:
        assert not r.all_valid()
        rng = np.random.default_rng(3)
        for step in (1.0, 2.0, 7.3):  # row boxes, and single rows far apart
            cols = np.concatenate([np.arange(-3, r.width + 3, step) + 0.5, [r.width, 0.0]])
            rows = np.concatenate([np.arange(-2, r.height + 2, step) + 0.25, [r.height]])
            rows = rng.permutation(rows)
            jj, ii = np.meshgrid(cols, rows)
            expected = r.valid_at(jj.ravel(), ii.ravel()).reshape(jj.shape)
            assert np.array_equal(r.valid_grid(cols, rows), expected)
            assert not expected.all() and expected.any()
    with EmbedRaster(SAMPLE) as r:
        assert not r.all_valid()  # nodata 0 declared
    with rasterio.open(SAMPLE) as src:
        profile = src.profile
        data = src.read((1, 2, 3))
    profile.update(count=3, nodata=None)
    profile.pop("photometric", None)
    clean = tmp_path / "clean.tif"
    with rasterio.open(clean, "w", **profile) as dst:
        dst.write(data)
    with EmbedRaster(clean) as r:
        assert r.all_valid()
        assert r.valid_grid(np.array([0.5, r.width + 1.0]), np.array([-1.0, 3.5])).tolist() == [
            [False, False],
            [True, False],
        ]


def test_heatmap_file_equals_reference_values_and_reference_writer(tmp_path: Path) -> None:
    path = _odd_raster(tmp_path, "uint8")
    with rasterio.open(path) as ds:
        at = ds.xy(60, 250)
    out = tmp_path / "fast.tif"
    res = heatmap(str(path), str(out), at=at)
    model = load_embedding_model("default")
    with grid_for(str(path), model, None) as (r, grid):
        pp = r.to_pixels(np.asarray([at]))
        v = embed_cells(grid, model.decoder, grid.cell_coords(pp.cols, pp.rows))[0]
        field = NiliField(grid.feat, model.decoder).cosine(v)
        og = output_grid(r, None)
        ref_rows = cosine_rows(field, r, grid.backbone.stride, og, pointwise=True)
        expected = ref_rows(0, og.height)
        old = tmp_path / "old.tif"
        write_heatmap(old, og, r.crs.to_wkt(), ref_rows, {}, cog=REFERENCE_COG)
    for name in (out, old):
        with rasterio.open(name) as ds:
            assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
            got = ds.read(1)
            assert ds.nodata == NODATA
        assert np.array_equal(got == NODATA, np.isnan(expected))
        assert np.abs(got - expected)[~np.isnan(expected)].max() <= 1e-5
    assert abs(res.max - np.nanmax(expected)) <= 1e-5 and abs(res.min - np.nanmin(expected)) <= 1e-5


@pytest.mark.parametrize("shape", [(7, 11), (1, 4), (3, 1)])
def test_scalar_on_grid_equals_nili_embed(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(len(shape) + shape[0])
    h, w = shape
    coarse = rng.normal(size=(h, w)).astype(np.float32)
    xs, ys = _axis(w, rng), _axis(h, rng)
    got = scalar_on_grid(coarse, xs, ys)
    expected = NiliField(coarse[None], NiliDecoder.identity(1)).embed(_grid_points(xs, ys))[:, 0]
    assert np.abs(got - expected.reshape(got.shape)).max() <= 1e-6
