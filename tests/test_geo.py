"""XYZ tile geometry and CRS helpers, checked against independent formulas, pyproj and the ISS meta.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from pyproj import CRS, Transformer
from rasterio.crs import CRS as RioCRS
from shapely.geometry import Polygon

from engine.errors import InputError
from engine.geo.crs import (
    crosses_antimeridian,
    crs_label,
    densified_ring_lonlat,
    to_lonlat,
    unwrap_lons,
)
from engine.geo.xyz import (
    mosaic_bounds_3857,
    mosaic_bounds_lonlat,
    parse_xyz_name,
    tile_lat,
    tile_lon,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ISS = SHARED / "iss"
R = 6378137.0


def readme_lon(col: float, z: int) -> float:
    """The formula of ../shared/data/README.md, typed again here."""
    return col / 2**z * 360 - 180


def readme_lat(row: float, z: int) -> float:
    return math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * row / 2**z))))


def gudermannian_lat(row: float, z: int) -> float:
    """Independent form of the inverse Mercator: lat = 2 atan(exp(y/R)) - pi/2."""
    y = math.pi * (1 - 2 * row / 2**z)
    return math.degrees(2 * math.atan(math.exp(y)) - math.pi / 2)


# --- XYZ -----------------------------------------------------------------------------------------------


def test_tile_edges_known_values() -> None:
    assert tile_lon(0, 0) == -180.0
    assert tile_lon(1, 0) == 180.0
    assert tile_lat(1, 1) == 0.0
    assert tile_lat(0, 0) == pytest.approx(85.0511287798066, abs=1e-12)
    assert tile_lat(1, 0) == pytest.approx(-85.0511287798066, abs=1e-12)


@pytest.mark.parametrize(
    "z,row,col", [(14, 4726, 344), (12, 1302, 186), (10, 330, 918), (3, 0, 7), (18, 100000, 2)]
)
def test_mosaic_bounds_lonlat_match_formula(z: int, row: int, col: int) -> None:
    w, s, e, n = mosaic_bounds_lonlat(z, row, col, span=4)
    assert (w, s, e, n) == (
        readme_lon(col, z),
        readme_lat(row + 4, z),
        readme_lon(col + 4, z),
        readme_lat(row, z),
    )
    assert s == pytest.approx(gudermannian_lat(row + 4, z), abs=1e-10)
    assert n == pytest.approx(gudermannian_lat(row, z), abs=1e-10)
    assert w < e and s < n


@pytest.mark.parametrize(
    "z,row,col,span", [(14, 4726, 344, 4), (12, 1302, 186, 4), (5, 3, 30, 1), (0, 0, 0, 1)]
)
def test_mosaic_bounds_3857_exact_and_agree_with_pyproj(z: int, row: int, col: int, span: int) -> None:
    minx, miny, maxx, maxy = mosaic_bounds_3857(z, row, col, span)
    world = 2 * math.pi * R
    assert minx == col / 2**z * world - math.pi * R
    assert maxy == math.pi * R - row / 2**z * world
    assert maxx - minx == pytest.approx(span * world / 2**z, rel=1e-12)
    to_merc = Transformer.from_crs(4326, 3857, always_xy=True)
    w, s, e, n = mosaic_bounds_lonlat(z, row, col, span)
    xs, ys = to_merc.transform([w, e], [s, n])
    assert xs == pytest.approx([minx, maxx], abs=1e-6)
    assert ys == pytest.approx([miny, maxy], abs=1e-6)


def test_whole_world_in_3857() -> None:
    assert mosaic_bounds_3857(0, 0, 0, 1) == pytest.approx(
        (-20037508.342789244, -20037508.342789244, 20037508.342789244, 20037508.342789244)
    )


@pytest.mark.parametrize(
    "name,expected",
    [
        ("cand_14_4726_0344.jpg", (14, 4726, 344)),
        ("surrounding_14_4726_0344.jpg", (14, 4726, 344)),
        ("12_1302_0186.png", (12, 1302, 186)),
        ("x-10_0330_0918.JPEG", (10, 330, 918)),
        ("/some/dir/cand_14_4726_0344.jpg", (14, 4726, 344)),
        ("query.jpg", None),
        ("meta.json", None),
        ("cand_14_4726_0344.tif", None),
        ("cand_14_4726_0344.jpg.bak", None),
        ("DSC_12_3456_7890.jpg", None),  # column 7890 does not exist at zoom 12
        ("c14_4726_0344.jpg", None),  # no separator before the zoom
        ("40_1_1.png", None),  # zoom beyond 30
    ],
)
def test_parse_xyz_name(name: str, expected: tuple[int, int, int] | None) -> None:
    assert parse_xyz_name(name) == expected


def _iss_metas() -> list[Path]:
    if not ISS.is_dir():
        pytest.skip(f"real data absent: {ISS} (see ../shared/data/README.md)")
    metas = sorted(ISS.glob("*/meta.json"))
    if not metas:
        pytest.skip(f"no meta.json under {ISS}")
    return metas


@pytest.mark.shared_data
def test_candidate_bounds_match_meta_json() -> None:
    checked = 0
    for meta in _iss_metas():
        for cand in json.loads(meta.read_text())["candidates"]:
            z, row, col = (int(v) for v in cand["tile_zyx"].split("_"))
            assert parse_xyz_name(cand["file"]) == (z, row, col)
            w, s, e, n = mosaic_bounds_lonlat(z, row, col, span=4)
            assert (s, w, n, e) == pytest.approx(cand["bbox_latlon"], abs=1e-4), (meta, cand["file"])
            checked += 1
    assert checked > 100


# --- CRS -----------------------------------------------------------------------------------------------


def test_crs_label_from_every_kind_of_input() -> None:
    assert crs_label(RioCRS.from_epsg(32618)) == "EPSG:32618"
    assert crs_label(CRS.from_epsg(4326)) == "EPSG:4326"
    assert crs_label("EPSG:26914") == "EPSG:26914"
    custom = "+proj=tmerc +lat_0=10 +lon_0=12.3 +k=0.9 +x_0=1000 +y_0=7 +ellps=GRS80 +units=m +no_defs"
    label = crs_label(custom)
    assert label.startswith(("PROJCRS", "PROJCS")), label[:40]  # WKT, no authority code to give
    assert CRS.from_user_input(label).equals(CRS.from_user_input(custom))


def test_to_lonlat_utm_and_axis_order() -> None:
    lon, lat = to_lonlat("EPSG:32618", [500000.0, 500000.0], [0.0, 1_000_000.0])
    assert lon[0] == pytest.approx(-75.0, abs=1e-9) and lat[0] == pytest.approx(0.0, abs=1e-9)
    assert lat[1] > 8.9  # north, so (lon, lat) order and not EPSG:4326's (lat, lon)
    lon, lat = to_lonlat(RioCRS.from_epsg(4326), 12.5, 41.9)
    assert (float(lon), float(lat)) == pytest.approx((12.5, 41.9))


def test_densified_ring_follows_true_curved_edges() -> None:
    crs = "EPSG:32633"  # 200 km tile in the north of zone 33
    bounds = (300000.0, 7400000.0, 500000.0, 7600000.0)
    ring = densified_ring_lonlat(crs, bounds, points_per_edge=8)
    assert len(ring) == 33 and ring[0] == ring[-1]
    back = Transformer.from_crs(4326, 32633, always_xy=True)
    native = [(300000, 7600000), (500000, 7600000), (500000, 7400000), (300000, 7400000)]
    for i, (x, y) in enumerate(native):
        bx, by = back.transform(*ring[8 * i])
        assert (bx, by) == pytest.approx((x, y), abs=1e-6)
    # the top edge's midpoint in degrees is NOT the average of its corner degrees: the edge is curved
    mid = ring[4]
    straight = np.mean([ring[0], ring[8]], axis=0)
    assert abs(mid[1] - straight[1]) > 0.01
    poly = Polygon(ring)
    assert poly.is_valid and poly.area > 0


def test_densified_ring_from_corners_equals_from_bounds() -> None:
    bounds = (300000.0, 4000000.0, 301000.0, 4001000.0)
    corners = [(300000.0, 4001000.0), (301000.0, 4001000.0), (301000.0, 4000000.0), (300000.0, 4000000.0)]
    assert densified_ring_lonlat("EPSG:32618", bounds, 4) == densified_ring_lonlat("EPSG:32618", corners, 4)


def test_unwrap_lons() -> None:
    assert unwrap_lons([179.0, -179.0, -178.0, 179.5]).tolist() == [179.0, 181.0, 182.0, 179.5]
    assert unwrap_lons([10.0, 20.0]).tolist() == [10.0, 20.0]


def test_ring_across_antimeridian_is_unwrapped_not_world_spanning() -> None:
    # UTM zone 60 (central meridian 177E): x = 800..900 km at the equator straddles 180 degrees
    ring = densified_ring_lonlat("EPSG:32660", (800000.0, 0.0, 900000.0, 100000.0))
    lons = [p[0] for p in ring]
    assert max(lons) - min(lons) < 2.0
    assert max(lons) > 180.0
    assert crosses_antimeridian(ring)
    # what a naive point-by-point transform gives: flagged too
    raw = [((lon + 180) % 360 - 180, lat) for lon, lat in ring]
    assert max(p[0] for p in raw) - min(p[0] for p in raw) > 180
    assert crosses_antimeridian(raw)


def test_ordinary_ring_does_not_cross_antimeridian() -> None:
    ring = densified_ring_lonlat("EPSG:32618", (300000.0, 4000000.0, 301000.0, 4001000.0))
    assert not crosses_antimeridian(ring)
    assert all(-180 <= lon <= 180 for lon, _ in ring)


def test_ring_around_a_pole_is_refused() -> None:
    with pytest.raises(InputError, match="pole"):
        densified_ring_lonlat("EPSG:3413", (-100000.0, -100000.0, 100000.0, 100000.0), what="polar tile")
