"""Footprint outputs: QGIS Georeferencer .points files and the photo warped onto the ground as a COG."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import rasterio
from pyproj import CRS
from rasterio.enums import ColorInterp

from engine.errors import InputError
from engine.footprint import outputs
from engine.footprint.outputs import read_points, write_geotiff, write_points
from engine.geo.homography import apply_h, corners, scaling, translation

ROWS, COLS = 480, 640
UTM = "EPSG:32614"
SQUARE = (437, 121)  # (col, row) of the painted square's centre pixel
BACKGROUND = (30, 60, 90)


def rotation(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def oblique_h() -> np.ndarray:
    """Photo pixel -> UTM 14N metres: ~1.5 m pixels, rotated 30 degrees, with a clear perspective."""
    perspective = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [2e-4, -3e-4, 1.0]])
    return translation(512_345.6, 4_012_345.6) @ rotation(30) @ scaling(1.5, -1.5) @ perspective


def photo() -> np.ndarray:
    rgb = np.empty((ROWS, COLS, 3), np.uint8)
    rgb[:] = BACKGROUND
    c, r = SQUARE
    rgb[r - 4 : r + 5, c - 4 : c + 5] = (255, 0, 0)
    return rgb


def ground_to_pixel(ds, xy: np.ndarray) -> np.ndarray:
    """Ground points (n, 2) -> output raster (col, row), GDAL convention (fractional)."""
    inv = ~ds.transform
    return np.array([inv @ (float(x), float(y)) for x, y in np.atleast_2d(xy)])


# --- .points -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [2, 3, 5])
def test_points_file_round_trips_the_homography(tmp_path, grid):
    h = oblique_h()
    path = write_points(tmp_path / "photo.jpg.points", h, (ROWS, COLS), UTM, grid=grid)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#CRS: ") and lines[1] == "mapX,mapY,sourceX,sourceY,enable,dX,dY,residual"
    assert all(line.endswith(",1,0,0,0") for line in lines[2:])
    crs, map_xy, pixel_xy = read_points(path)
    assert CRS.from_wkt(crs) == CRS.from_user_input(UTM) and CRS.from_wkt(crs).to_epsg() == 32614
    assert len(map_xy) == len(pixel_xy) == grid * grid
    corners = {(0.0, 0.0), (COLS, 0.0), (COLS, ROWS), (0.0, ROWS)}
    assert corners <= {tuple(p) for p in pixel_xy.tolist()}
    np.testing.assert_allclose(map_xy, apply_h(h, pixel_xy), rtol=1e-6)
    # QGIS's convention for a non-georeferenced raster: sourceX = column, sourceY = -row
    first = lines[2 + grid].split(",")  # second lattice row, first column: pixel (0, ROWS / (grid - 1))
    assert float(first[2]) == 0.0 and float(first[3]) == pytest.approx(-ROWS / (grid - 1))


def test_points_keep_every_digit_of_degrees(tmp_path):
    h = scaling(1.37e-6, -1.37e-6)
    h[:2, 2] = (-97.123456789012, 32.98765432109876)
    path = write_points(tmp_path / "deg.points", h, (ROWS, COLS), "EPSG:4326", grid=4)
    _, map_xy, pixel_xy = read_points(path)
    assert np.array_equal(map_xy, apply_h(h, pixel_xy))  # exact: shortest round-trip text, no exponent
    assert "e" not in "".join(path.read_text().splitlines()[2:]).lower()


def test_read_points_without_crs_line_and_old_tab_format(tmp_path):
    path = tmp_path / "old.points"
    path.write_text(
        "mapX,mapY,sourceX,sourceY,enable,dX,dY,residual\n"
        "500000.5,4000000.25,10,-20,1,0,0,0\n"
        "500100,4000100,30,-40,0,0,0,0\n"
        "500200\t4000200\t50\t-60\n"
    )
    crs, map_xy, pixel_xy = read_points(path)
    assert crs is None
    np.testing.assert_array_equal(map_xy, [[500000.5, 4000000.25], [500200, 4000200]])  # disabled: left out
    np.testing.assert_array_equal(pixel_xy, [[10, 20], [50, 60]])
    path.write_text("mapX,mapY,sourceX,sourceY\n1,2,3\n")
    with pytest.raises(InputError, match="malformed"):
        read_points(path)


def test_points_reject_bad_grid_and_degenerate_h(tmp_path):
    with pytest.raises(InputError):
        write_points(tmp_path / "a.points", oblique_h(), (ROWS, COLS), UTM, grid=1)
    with pytest.raises(InputError):
        write_points(tmp_path / "b.points", np.zeros((3, 3)), (ROWS, COLS), UTM)
    assert list(tmp_path.iterdir()) == []


# --- GeoTIFF -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cog(tmp_path_factory):
    path = tmp_path_factory.mktemp("cog") / "footprint.tif"
    assert write_geotiff(path, photo(), oblique_h(), UTM) == path
    return path


def test_geotiff_grid_crs_and_bounds(cog):
    h = oblique_h()
    quad = apply_h(h, corners((ROWS, COLS)))
    with rasterio.open(cog) as ds:
        assert ds.crs.to_epsg() == 32614
        assert ds.transform.b == 0 and ds.transform.d == 0 and ds.transform.e < 0  # north up
        res = ds.res[0]
        assert res == pytest.approx(ds.res[1])
        assert res == pytest.approx(float(np.median(outputs.local_scale(h, (ROWS, COLS)))))
        left, bottom, right, top = ds.bounds
        assert left <= quad[:, 0].min() < left + res and top - res < quad[:, 1].max() <= top
        assert right - res < quad[:, 0].max() <= right and bottom <= quad[:, 1].min() < bottom + res
        tags = ds.tags()
        assert tags["SKYLOC_CORNER_ORDER"] == "upper_left,upper_right,lower_right,lower_left"
        np.testing.assert_allclose(json.loads(tags["SKYLOC_HOMOGRAPHY"]), h, rtol=0, atol=0)
        np.testing.assert_allclose(json.loads(tags["SKYLOC_CORNERS"]), quad)


def test_geotiff_is_rgba_cog_with_overviews(cog):
    with rasterio.open(cog) as ds:
        assert ds.count == 4 and ds.dtypes == ("uint8",) * 4
        assert ds.colorinterp == (ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha)
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert ds.profile["tiled"] and ds.block_shapes[0] == (512, 512)
        assert ds.compression.name == "deflate"
        assert max(ds.width, ds.height) > 512 and ds.overviews(1) and ds.overviews(4)


def test_geotiff_alpha_marks_the_photo_quad(cog):
    h = oblique_h()
    with rasterio.open(cog) as ds:
        alpha = ds.read(4)
        rgb = ds.read([1, 2, 3])
        for r, c in [(0, 0), (0, ds.width - 1), (ds.height - 1, 0), (ds.height - 1, ds.width - 1)]:
            assert alpha[r, c] == 0 and not rgb[:, r, c].any()
        col, row = np.floor(ground_to_pixel(ds, apply_h(h, [[COLS / 2, ROWS / 2]]))[0]).astype(int)
        assert alpha[row, col] == 255 and tuple(rgb[:, row, col]) == BACKGROUND
        # the valid area is the projected quad: its area matches the quad's, to a pixel's width of outline
        quad = ground_to_pixel(ds, apply_h(h, corners((ROWS, COLS))))
        x, y = quad[:, 0], quad[:, 1]
        area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
        perimeter = np.sum(np.hypot(*(np.roll(quad, -1, axis=0) - quad).T))
        assert abs(np.count_nonzero(alpha) - area) < 0.5 * perimeter
        # no dark fringe along the outline: away from the red square, every valid pixel is the background
        sc, sr = ground_to_pixel(ds, apply_h(h, [[SQUARE[0] + 0.5, SQUARE[1] + 0.5]]))[0]
        rr, cc = np.mgrid[0 : ds.height, 0 : ds.width]
        plain = (alpha == 255) & (np.hypot(cc - sc, rr - sr) > 20)
        assert np.all(rgb[:, plain] == np.array(BACKGROUND)[:, None])


def test_geotiff_puts_a_photo_feature_where_h_says(cog):
    h = oblique_h()
    centre = np.array([[SQUARE[0] + 0.5, SQUARE[1] + 0.5]])  # GDAL convention: centre of the painted pixel
    with rasterio.open(cog) as ds:
        expected = ground_to_pixel(ds, apply_h(h, centre))[0]  # (col, row), fractional
        col, row = np.floor(expected).astype(int)
        red, green = ds.read(1).astype(float), ds.read(2)
        assert red[row, col] == 255 and green[row, col] == 0
        # intensity-weighted centroid of the square: within a quarter of an output pixel of the prediction
        r0, c0 = row - 12, col - 12
        patch = np.clip(red[r0 : row + 13, c0 : col + 13] - BACKGROUND[0], 0, None)
        rr, cc = np.mgrid[r0 : row + 13, c0 : col + 13] + 0.5  # pixel centres
        found = np.array([(patch * cc).sum(), (patch * rr).sum()]) / patch.sum()
        assert np.hypot(*(found - expected)) < 0.25, (found, expected)


def test_geotiff_resolution_and_max_side(tmp_path):
    h = oblique_h()
    path = write_geotiff(tmp_path / "coarse.tif", photo(), h, UTM, max_side=200)
    with rasterio.open(path) as ds:
        assert max(ds.width, ds.height) == 200 and ds.overviews(1) == []
        assert ds.read(4).max() == 255
    path = write_geotiff(tmp_path / "fixed.tif", photo(), h, UTM, resolution=5.0, cog=False)
    with rasterio.open(path) as ds:
        assert ds.res == (5.0, 5.0) and ds.profile["tiled"]
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") != "COG"
        assert ds.colorinterp[3] == ColorInterp.alpha


def test_geotiff_other_crs_labels(tmp_path):
    wkt = CRS.from_epsg(26914).to_wkt()
    h = translation(600_000.0, 3_500_000.0) @ scaling(2.0, -2.0)
    path = write_geotiff(tmp_path / "wkt.tif", photo(), h, wkt)
    with rasterio.open(path) as ds:
        assert ds.crs.to_epsg() == 26914
        assert ds.bounds == pytest.approx(
            (600_000.0, 3_500_000.0 - 2 * ROWS, 600_000.0 + 2 * COLS, 3_500_000.0)
        )
        assert ds.read(4).min() == 255  # an axis-aligned photo fills its grid exactly


RANK_DEFICIENT = np.array([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
FOLDING = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0 / 300, 0.0, 1.0]])  # horizon at column 300


@pytest.mark.parametrize(
    "h",
    [
        RANK_DEFICIENT,
        FOLDING,
        np.full((3, 3), np.nan),
        np.zeros((3, 3)),
        np.eye(2),
        translation(500_000.0, 4_000_000.0) @ scaling(1.0, 0.0),  # everything on one ground line
    ],
    ids=["rank-deficient", "folding", "nan", "zero", "not-3x3", "collapsed"],
)
def test_degenerate_homography_raises_and_writes_nothing(tmp_path, h):
    target = tmp_path / "out" / "bad.tif"
    with pytest.raises(InputError):
        write_geotiff(target, photo(), h, UTM)
    assert not target.exists()
    assert not target.parent.exists() or list(target.parent.iterdir()) == []


@pytest.mark.parametrize(
    ("rgb", "kwargs"),
    [
        (np.zeros((ROWS, COLS), np.uint8), {}),
        (np.zeros((ROWS, COLS, 3), np.float32), {}),
        (np.zeros((0, COLS, 3), np.uint8), {}),
        (photo(), {"resolution": -1.0}),
        (photo(), {"crs": "EPSG:999999"}),
    ],
    ids=["grey", "float", "empty", "bad-resolution", "bad-crs"],
)
def test_bad_inputs_raise_input_error(tmp_path, rgb, kwargs):
    crs = kwargs.pop("crs", UTM)
    with pytest.raises(InputError):
        write_geotiff(tmp_path / "bad.tif", rgb, oblique_h(), crs, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    real_open = rasterio.open

    def half_written(path, mode="r", **kwargs):
        ds = real_open(path, mode, **kwargs)
        ds.close()  # the file now exists on disk, then the writer dies
        raise OSError("disk full")

    monkeypatch.setattr(outputs.rasterio, "open", half_written)
    with pytest.raises(OSError, match="disk full"):
        write_geotiff(tmp_path / "out.tif", photo(), oblique_h(), UTM)
    assert list(tmp_path.iterdir()) == []


def test_failed_rename_keeps_what_was_there(tmp_path):
    occupied = tmp_path / "taken.tif"
    occupied.mkdir()  # the final rename fails after a complete write
    with pytest.raises(OSError):
        write_geotiff(occupied, photo(), oblique_h(), UTM)
    assert [p.name for p in tmp_path.iterdir()] == ["taken.tif"] and occupied.is_dir()
    previous = tmp_path / "previous.tif"
    previous.write_bytes(b"old")
    with pytest.raises(InputError):
        write_geotiff(previous, photo(), FOLDING, UTM)
    assert previous.read_bytes() == b"old"
