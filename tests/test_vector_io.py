"""GeoPackage/Shapefile writing through OGR: CRS, attributes, atomicity."""

import numpy as np
import pyogrio
import pytest
import shapely

from engine.errors import InputError
from engine.vector_io import read_layer, write_polygons


def polys(n):
    return [shapely.box(i, 0, i + 1, 1) for i in range(n)]


@pytest.mark.parametrize("name", ["out.gpkg", "out.shp"])
def test_round_trip_with_crs(tmp_path, name):
    path = write_polygons(
        tmp_path / name, polys(3), {"photo_name": ["a", "b", "c"], "rank": np.arange(3)}, layer="candidates"
    )
    info = pyogrio.read_info(path)
    assert info["crs"] == "EPSG:4326"
    assert info["features"] == 3
    geoms, cols = read_layer(path)
    assert [g.bounds[0] for g in geoms] == [0, 1, 2]
    assert list(cols["photo_name"]) == ["a", "b", "c"]
    assert list(cols["rank"]) == [0, 1, 2]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_failed_write_keeps_previous_file(tmp_path):
    path = write_polygons(tmp_path / "out.gpkg", polys(2), {"rank": np.arange(2)}, layer="x")
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_polygons(path, polys(2), {"rank": np.arange(3)}, layer="x")  # inconsistent attributes
    with pytest.raises(ValueError):
        write_polygons(
            path, [shapely.Point(0, 0), shapely.box(0, 0, 1, 1)], {"rank": np.arange(2)}, layer="x"
        )
    with pytest.raises(Exception):  # noqa: B017 - OGR fails mid-write on a column type it cannot store
        write_polygons(path, polys(2), {"rank": np.array([1 + 1j, 2j])}, layer="x")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gpkg"]


def test_unknown_format_refused(tmp_path):
    with pytest.raises(InputError, match="gpkg"):
        write_polygons(tmp_path / "out.kml", polys(1), {}, layer="x")


def test_geopackage_is_version_1_3_for_qgis_3_22(tmp_path):
    """GDAL >= 3.9 writes GeoPackage 1.4, which QGIS 3.22 LTR (GDAL 3.6) opens with warnings."""
    import sqlite3

    import shapely

    from engine.vector_io import write_polygons

    path = write_polygons(tmp_path / "v.gpkg", [shapely.box(0, 0, 1, 1)], {"n": [1]}, layer="v")
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 10300
