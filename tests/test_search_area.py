"""Search areas select tiles by true geodesic distance / box intersection."""

import numpy as np
import pytest
import shapely

from engine.errors import InputError
from engine.geo.search_area import SearchArea, haversine_km


def square(lon, lat, half=0.05):
    return shapely.box(lon - half, lat - half, lon + half, lat + half)


def test_haversine_known_distance():
    # One degree of latitude is ~111.19 km on the mean sphere.
    assert haversine_km(0.0, 10.0, 1.0, 10.0) == pytest.approx(111.195, abs=0.01)


def test_near_selects_by_distance_not_degrees():
    # At 60N a degree of longitude is half a degree of latitude on the ground: 1.5 deg lon ~ 83 km.
    tiles = [square(10.0, 60.0), square(11.5, 60.0), square(10.0, 61.5)]
    area = SearchArea(near=(60.0, 10.0), radius_km=90)
    assert list(area.select(tiles)) == [0, 1]  # 1.5 deg north (~167 km) is out, 1.5 deg east is in


def test_near_counts_tiles_that_touch_the_circle():
    big = shapely.box(10.0, 60.0, 11.0, 61.0)  # centre ~60 km away, nearest edge ~1 km away
    area = SearchArea(near=(60.5, 9.98), radius_km=2)
    assert list(area.select([big])) == [0]


def test_bbox_and_antimeridian():
    tiles = [square(179.9, 0), square(-179.9, 0), square(0, 0)]
    assert list(SearchArea(bbox=(179.0, -1, -179.0, 1)).select(tiles)) == [0, 1]
    assert list(SearchArea(bbox=(-1, -1, 1, 1)).select(tiles)) == [2]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"near": (95.0, 0.0), "radius_km": 10},
        {"near": (0.0, 0.0)},
        {"near": (0.0, 0.0), "radius_km": -1},
        {"bbox": (0, 10, 1, 5)},
        {},
        {"near": (0.0, 0.0), "radius_km": 1, "bbox": (0, 0, 1, 1)},
    ],
)
def test_bad_areas_are_refused(kwargs):
    with pytest.raises(InputError):
        SearchArea(**kwargs)


def test_empty_selection_is_empty_array():
    out = SearchArea(near=(0.0, 0.0), radius_km=1).select([square(50, 50)])
    assert isinstance(out, np.ndarray) and out.size == 0
