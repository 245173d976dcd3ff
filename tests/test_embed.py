"""Embeddings at coordinates (NILI) and similarity heatmaps: the math, the geography, the files, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from engine.embed.actions import embed_at, heatmap
from engine.embed.backbones import EffnetBackbone, s2_band_numbers
from engine.embed.grid import FeatureGrid, plan_axis
from engine.embed.models import load_embedding_model
from engine.embed.nili import NiliDecoder, NiliField, bilinear_reference, nili_reference
from engine.embed.raster import EmbedRaster
from engine.errors import CancelledError, InputError, OutsideAreaError
from engine.progress import CancelToken

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample" / "naip_2018.tif"


def _points(rng: np.random.Generator, n: int, w: int, h: int) -> np.ndarray:
    pts = np.stack([rng.uniform(-0.5, w - 0.5, n), rng.uniform(-0.5, h - 0.5, n)], axis=1)
    # corners, edges, exact cell centres and half-cell boundaries: where clamping and rounding bite
    special = [
        [-0.5, -0.5],
        [w - 0.5, h - 0.5],
        [0, 0],
        [w - 1, h - 1],
        [1.5, 0.5],
        [w / 2, h / 2],
        [0.2, h - 0.7],
    ]
    return np.concatenate([np.asarray(special, float), pts])


def _cos(a: np.ndarray, b: np.ndarray, axis: int = 0) -> np.ndarray:
    return (a * b).sum(axis) / np.linalg.norm(a, axis=axis) / np.linalg.norm(b, axis=axis)


# ------------------------------------------------------------------------------------------- NILI math


@pytest.mark.parametrize("order", ["xy", "yx"])
@pytest.mark.parametrize("shape", [(12, 12), (7, 9), (1, 5), (4, 1)])
def test_fast_nili_equals_reference(order: str, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    c, d = 24, 16
    h, w = shape
    feat = rng.normal(size=(c, h, w)).astype(np.float32)
    dec = NiliDecoder(
        c,
        rng.normal(size=(d, 9 * c + 2)).astype(np.float32) * 0.2,
        rng.normal(size=d).astype(np.float32),
        order,
    )
    pts = _points(rng, 2000, w, h)
    ref = nili_reference(feat, pts, dec)
    fast = NiliField(feat, dec).embed(pts)
    assert np.abs(ref - fast).max() <= 1e-4
    # the offset input matters (a decoder ignoring it, or reading x for y, would not match)
    other = NiliDecoder(c, dec.weight, dec.bias, "yx" if order == "xy" else "xy")
    if h > 1 and w > 1:
        assert np.abs(NiliField(feat, other).embed(pts) - ref).max() > 1e-2


def test_identity_decoder_is_bilinear_interpolation() -> None:
    rng = np.random.default_rng(1)
    feat = rng.normal(size=(8, 6, 11)).astype(np.float32)
    pts = _points(rng, 3000, 11, 6)
    expected = bilinear_reference(feat, pts)
    ident = NiliDecoder.identity(8)
    assert np.abs(nili_reference(feat, pts, ident) - expected).max() < 1e-5  # the released algorithm itself
    assert np.abs(NiliField(feat, ident).embed(pts) - expected).max() < 1e-5
    # at a cell centre, the embedding is that cell's feature
    assert np.allclose(NiliField(feat, ident).embed(np.array([[4.0, 3.0]]))[0], feat[:, 3, 4], atol=1e-5)


def test_cosine_field_equals_cosine_of_reference_embeddings() -> None:
    rng = np.random.default_rng(2)
    c, d = 16, 10
    feat = rng.normal(size=(c, 9, 150)).astype(np.float32)  # > 64 rows... columns; rows chunked below too
    dec = NiliDecoder(
        c, rng.normal(size=(d, 9 * c + 2)).astype(np.float32) * 0.3, rng.normal(size=d).astype(np.float32)
    )
    v = rng.normal(size=d)
    pts = _points(rng, 3000, 150, 9)
    ref = nili_reference(feat, pts, dec)
    expected = ref @ v / np.linalg.norm(ref, axis=1) / np.linalg.norm(v)
    got = NiliField(feat, dec).cosine(v)(pts)
    assert np.abs(got - expected).max() < 1e-5
    tall = rng.normal(size=(c, 150, 5)).astype(np.float32)  # more rows than one chunk of the precomputation
    pts = _points(rng, 2000, 5, 150)
    ref = nili_reference(tall, pts, dec)
    expected = ref @ v / np.linalg.norm(ref, axis=1) / np.linalg.norm(v)
    assert np.abs(NiliField(tall, dec).cosine(v)(pts) - expected).max() < 1e-5


@pytest.mark.parametrize("n", [1, 5, 12, 13, 30, 31, 59, 100, 257])
@pytest.mark.parametrize(("window", "margin"), [(12, 3), (32, 6), (24, 4)])
def test_window_plan_partitions_with_context(n: int, window: int, margin: int) -> None:
    plan = plan_axis(n, window, margin)
    owned = np.concatenate([np.arange(w.own_start, w.own_end) for w in plan])
    assert np.array_equal(owned, np.arange(n))  # every cell exactly once, in order
    for w in plan:
        assert w.offset >= 0 and w.offset + min(window, n) <= n
        for cell in (w.own_start, w.own_end - 1):
            if cell >= margin:  # not at the raster's start
                assert cell - w.offset >= margin
            if cell < n - margin:
                assert w.offset + min(window, n) - 1 - cell >= margin


# ------------------------------------------------------------------------------------ on real imagery


@pytest.fixture(scope="module")
def model():
    return load_embedding_model("default")


@pytest.fixture(scope="module")
def sample_centre() -> tuple[float, float]:
    with rasterio.open(SAMPLE) as ds:
        return ds.xy(362, 467)  # row, col of a pixel centre


def test_embedding_at_a_cell_centre_is_that_cells_feature(model) -> None:
    with EmbedRaster(SAMPLE) as r:
        grid = FeatureGrid(r, model.backbone)
        grid.ensure()
        i, j = 14, 22
        s = model.backbone.stride
        x, y = r.transform @ ((j + 0.5) * s, (i + 0.5) * s)
        expected = grid.feat[:, i, j] / np.linalg.norm(grid.feat[:, i, j])
        # independently: the network on a window read straight from the raster around that cell
        rgb, _ = r.read_rgb(0, 0, 1024, 1024)
        direct = model.backbone.features(rgb)[:, i, j]
    got = np.asarray(embed_at(str(SAMPLE), [(x, y)]).points[0].vector)
    assert np.allclose(got, expected, atol=1e-4)
    assert _cos(got, direct) > 0.999
    # a neighbouring cell's centre gives a different vector (the coordinate chain is not ignored)
    x2, y2 = r.transform @ ((j + 1.5) * s, (i + 0.5) * s)
    assert _cos(got, np.asarray(embed_at(str(SAMPLE), [(x2, y2)]).points[0].vector)) < 0.99


def test_crs_round_trip(sample_centre) -> None:
    from pyproj import Transformer

    x, y = sample_centre
    lon, lat = Transformer.from_crs("EPSG:26914", "EPSG:4326", always_xy=True).transform(x, y)
    native = embed_at(str(SAMPLE), [(x, y)])
    geographic = embed_at(str(SAMPLE), [(lon, lat)], crs="EPSG:4326")
    assert geographic.crs == "EPSG:4326" and native.crs == "EPSG:26914"
    assert abs(geographic.points[0].col - native.points[0].col) < 1e-6
    assert abs(geographic.points[0].row - native.points[0].row) < 1e-6
    assert np.allclose(native.points[0].vector, geographic.points[0].vector, atol=1e-6)
    # lat, lon swapped is another place: outside the raster, said clearly
    with pytest.raises(OutsideAreaError, match="lon, lat"):
        embed_at(str(SAMPLE), [(lat, lon)], crs="EPSG:4326")


def _mosaic(tmp_path: Path) -> Path:
    """1868x724 px (117 x 46 cells of 16 px): wide enough for 3 windows of 64 cells, i.e. 2 seams."""
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


@pytest.mark.slow
def test_no_seams_across_windows(tmp_path: Path, model) -> None:
    path = _mosaic(tmp_path)
    backbone = EffnetBackbone()
    with EmbedRaster(path) as r:
        grid = FeatureGrid(r, backbone)
        assert len(grid.plan_cols) == 3  # the test needs seams
        grid.ensure()
        rgb, _ = r.read_rgb(0, 0, grid.cols * backbone.stride, grid.rows * backbone.stride)
        one_pass = backbone.features(rgb)  # the whole raster at once: no windows, no seams
        agree = _cos(grid.feat, one_pass)
        seams = [w.own_start for w in grid.plan_cols[1:]]
        assert agree.min() > 0.95, f"windowed features differ from one pass: min cos {agree.min():.3f}"
        for s in seams:
            assert agree[:, s - 1 : s + 1].min() > 0.95
        # control: windows that meet edge to edge, without context, do show seams (so this test can fail)
        backbone.window_cells, backbone.margin_cells = 39, 0
        bare = FeatureGrid(r, backbone)
        assert [w.own_start for w in bare.plan_cols] == [0, 39, 78]  # seams at window edges
        bare.ensure()
        assert _cos(bare.feat, one_pass).min() < 0.8


def test_heatmap_peaks_at_the_clicked_point(tmp_path: Path, sample_centre) -> None:
    out = tmp_path / "heat.tif"
    res = heatmap(str(SAMPLE), str(out), at=sample_centre)
    with rasterio.open(out) as ds, rasterio.open(SAMPLE) as src:
        assert (
            ds.crs == src.crs
            and ds.transform == src.transform
            and (ds.width, ds.height) == (src.width, src.height)
        )
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.overviews(1)  # COG with overviews
        assert ds.nodata == res.nodata and ds.dtypes[0] == "float32"
        a = ds.read(1, masked=True)
        row, col = ds.index(*sample_centre)
    peak = np.unravel_index(np.argmax(a), a.shape)
    assert abs(peak[0] - row) <= 1 and abs(peak[1] - col) <= 1
    assert a[row, col] > 0.999 and a.max() <= 1.0 + 1e-5 and a.min() < 0.5
    style = ET.parse(out.with_suffix(".qml")).getroot()
    renderer = style.find(".//rasterrenderer")
    assert renderer is not None and renderer.get("type") == "singlebandpseudocolor"
    assert float(renderer.get("opacity")) < 1  # semi-transparent over the raster
    assert not list(tmp_path.glob(".*"))  # no scratch files left


def test_heatmap_nodata_resolution_and_vector_query(tmp_path: Path, sample_centre) -> None:
    # a copy of the sample with a nodata block (value 0 in all bands = nodata 0)
    with rasterio.open(SAMPLE) as src:
        data, profile = src.read(), src.profile
    data[:, 100:300, 200:500] = 0
    holed = tmp_path / "holed.tif"
    with rasterio.open(holed, "w", **profile) as dst:
        dst.write(data)
    out = tmp_path / "h20.tif"
    res = heatmap(str(holed), str(out), at=sample_centre, resolution=20.0)
    with rasterio.open(out) as ds:
        assert ds.res == (20.0, 20.0) and res.width == ds.width == 234
        a = ds.read(1, masked=True)
        r0, c0 = ds.index(*rasterio.open(holed).xy(150, 300))
        assert a.mask[r0, c0] and not a.mask[ds.index(*sample_centre)]
    # a polygon around the click as the query: same neighbourhood lights up
    import shapely

    from engine.vector_io import write_polygons

    x, y = sample_centre
    poly = tmp_path / "area.gpkg"
    write_polygons(
        str(poly),
        [shapely.box(x - 100, y - 100, x + 100, y + 100)],
        {"name": ["a"]},
        layer="a",
        crs="EPSG:26914",
    )
    out2 = tmp_path / "hv.tif"
    res2 = heatmap(str(SAMPLE), str(out2), vector=str(poly))
    assert "points" in res2.query
    with rasterio.open(out2) as ds:
        a = ds.read(1, masked=True)
        assert a[ds.index(x, y)] >= np.percentile(a.compressed(), 95)  # among the most similar places


def test_heatmap_from_photo_and_location(tmp_path: Path) -> None:
    ph = heatmap(
        str(SAMPLE),
        str(tmp_path / "p.tif"),
        photo=str(ROOT / "sample" / "photo_2009_oblique.jpg"),
        resolution=40,
    )
    assert -1 <= ph.min < ph.max <= 1
    loc = heatmap(str(SAMPLE), str(tmp_path / "l.tif"), location=(47.02, -99.15), resolution=40)
    assert "location-encoder" in loc.query and loc.max > loc.min  # varies across the raster, location space
    with pytest.raises(InputError, match="LAT,LON"):
        heatmap(str(SAMPLE), str(tmp_path / "x.tif"), location=(-99.15, 147.02))


def test_location_embeddings_nearby_more_similar_than_far(model) -> None:
    enc = model.location_encoder
    lat = np.array([47.02, 47.11, 30.0, 48.85, 48.93, 35.0])
    lon = np.array([-99.15, -99.15, -95.0, 2.35, 2.35, 139.0])
    e = enc.embed(lat, lon)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    near_nd, far_nd = e[0] @ e[1], e[0] @ e[2]  # 10 km vs ~2000 km
    near_paris, far_paris = e[3] @ e[4], e[3] @ e[5]
    assert near_nd > far_nd and near_paris > far_paris


def test_cancel_leaves_nothing(tmp_path: Path, sample_centre) -> None:
    token = CancelToken()

    def progress(f: float, msg: str) -> None:
        if msg.startswith("heatmap: row"):
            token.cancel()

    out = tmp_path / "c.tif"
    with pytest.raises(CancelledError):
        heatmap(str(SAMPLE), str(out), at=sample_centre, progress=progress, cancel=token, resolution=2.0)
    assert list(tmp_path.iterdir()) == []


def test_sentinel2_stack_uses_its_rgb_bands_with_default_model(tmp_path: Path, sample_centre) -> None:
    with rasterio.open(SAMPLE) as src:
        rgb, profile = src.read([1, 2, 3]).astype(np.uint16) * 10, src.profile
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 3000, size=(12, *rgb.shape[1:]), dtype=np.uint16)
    stack[3], stack[2], stack[1] = (
        rgb[0],
        rgb[1],
        rgb[2],
    )  # B4, B3, B2 of a 12-band L2A stack (B1..B12, no B10)
    names = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12"]
    profile.update(count=12, dtype="uint16", nodata=None)
    s2 = tmp_path / "s2.tif"
    with rasterio.open(s2, "w", **profile) as dst:
        dst.write(stack)
        for i, n in enumerate(names, 1):
            dst.set_band_description(i, n)
    three = tmp_path / "rgb16.tif"
    profile.update(count=3)
    with rasterio.open(three, "w", **profile) as dst:
        dst.write(rgb)
    a = embed_at(str(s2), [sample_centre]).points[0].vector
    b = embed_at(str(three), [sample_centre]).points[0].vector
    assert np.allclose(a, b, atol=1e-5)
    assert s2_band_numbers(names, 12, None) == [2, 3, 4, 5, 6, 7, 8, 9, 11, 12]
    assert s2_band_numbers([None] * 13, 13, None) == [2, 3, 4, 5, 6, 7, 8, 9, 12, 13]
    with pytest.raises(InputError, match="10 Sentinel-2 bands"):
        s2_band_numbers([None] * 3, 3, None)
    with pytest.raises(InputError, match="10 band numbers"):
        s2_band_numbers(names, 12, [1, 2, 3])


# ----------------------------------------------------------------------------------------- bad input


def _skyloc(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.slow
def test_cli_embed_and_heatmap(tmp_path: Path, sample_centre) -> None:
    x, y = sample_centre
    pts = tmp_path / "pts.csv"
    pts.write_text(f"x,y\n{x},{y}\n{x + 300},{y - 200}\n")
    r = _skyloc(
        "embed", str(SAMPLE), "--points", str(pts), "--out", str(tmp_path / "e.npy"), "--quiet", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    m = np.load(tmp_path / "e.npy")
    assert m.shape == (2, 112) and np.allclose(np.linalg.norm(m, axis=1), 1, atol=1e-5)
    r = _skyloc("embed", str(SAMPLE), "--at", "-99.15,47.02", "--crs", "EPSG:4326", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # negative coordinates without '='
    doc = json.loads(r.stdout)
    assert doc["dim"] == 112 and len(doc["points"][0]["vector"]) == 112 and doc["crs"] == "EPSG:4326"
    r = _skyloc(
        "heatmap",
        str(SAMPLE),
        "--at",
        f"{x},{y}",
        "--out",
        str(tmp_path / "h.tif"),
        "--json",
        "--quiet",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["max"] > 0.999

    bad = [
        (["embed", str(SAMPLE), "--at", "0,0"], 5, "outside"),
        (["embed", str(SAMPLE), "--at", "1,2,3"], 3, "expected 2"),
        (["embed", str(tmp_path / "none.tif"), "--at", "0,0"], 3, "no such file"),
        (["heatmap", str(SAMPLE), "--at", f"{x},{y}", "--out", str(tmp_path / "h.png")], 3, ".tif"),
        (["heatmap", str(SAMPLE), "--out", str(tmp_path / "q.tif")], 2, "one of the arguments"),
        (
            ["heatmap", str(SAMPLE), "--at", f"{x},{y}", "--photo", "p.jpg", "--out", "q.tif"],
            2,
            "not allowed",
        ),
        (["heatmap", str(SAMPLE), "--photo", str(pts), "--out", str(tmp_path / "q.tif")], 3, ""),
        (
            ["heatmap", str(SAMPLE), "--at", f"{x},{y}", "--model", "gair", "--out", str(tmp_path / "q.tif")],
            3,
            "checkpoint",
        ),
        (["embed", str(SAMPLE), "--at", "x,y"], 3, "expected 2"),
    ]
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00" + b"\x00" * 100)
    bad.append((["embed", str(corrupt), "--at", "0,0"], 3, ""))
    nocrs = tmp_path / "nocrs.tif"
    with rasterio.open(nocrs, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8") as dst:
        dst.write(np.zeros((3, 64, 64), np.uint8))
    bad.append(
        (["heatmap", str(nocrs), "--at", "1,1", "--out", str(tmp_path / "n.tif")], 3, "coordinate reference")
    )
    far = tmp_path / "far.gpkg"
    import shapely

    from engine.vector_io import write_polygons

    write_polygons(str(far), [shapely.box(0, 0, 1, 1)], {"name": ["far"]}, layer="far", crs="EPSG:4326")
    bad.append(
        (["heatmap", str(SAMPLE), "--vector", str(far), "--out", str(tmp_path / "v.tif")], 5, "no feature")
    )
    for args, code, text in bad:
        r = _skyloc(*args, "--quiet", cwd=tmp_path)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        assert text in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert (
        not list(tmp_path.glob("q.*")) and not list(tmp_path.glob("n.*")) and not list(tmp_path.glob("v.*"))
    )


def test_points_in_another_crs_than_a_geographic_raster(tmp_path: Path) -> None:
    """A raster in EPSG:4326 (degrees): points transform through pyproj, not a linear map."""
    data = np.random.default_rng(0).integers(0, 255, size=(3, 256, 256), dtype=np.uint8)
    path = tmp_path / "deg.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=256,
        height=256,
        count=3,
        dtype="uint8",
        crs="EPSG:4326",
        transform=from_origin(10.0, 50.0, 0.001, 0.001),
    ) as dst:
        dst.write(data)
    from pyproj import Transformer

    x, y = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(10.1, 49.9)
    a = embed_at(str(path), [(x, y)], crs="EPSG:3857")
    b = embed_at(str(path), [(10.1, 49.9)])
    assert abs(a.points[0].col - 100) < 1e-6 and abs(a.points[0].row - 100) < 1e-6
    assert np.allclose(a.points[0].vector, b.points[0].vector, atol=1e-6)


def test_onnx_and_torch_feature_maps_agree() -> None:
    rgb = np.random.default_rng(3).integers(0, 255, size=(1024, 1024, 3), dtype=np.uint8)
    onnx = EffnetBackbone("onnx").features(rgb)
    torch_ = EffnetBackbone("torch").features(rgb)
    assert onnx.shape == torch_.shape == (112, 64, 64)
    assert np.abs(onnx - torch_).max() < 1e-3 and _cos(onnx, torch_).min() > 0.9999


def test_feature_grid_is_cached_between_calls_and_refreshed_when_the_file_changes(tmp_path: Path) -> None:
    import shutil

    from engine.embed import cache

    path = tmp_path / "copy.tif"
    shutil.copy(SAMPLE, path)
    model = load_embedding_model("default")
    with rasterio.open(path) as ds:
        xy = ds.xy(100, 100)
    first = embed_at(str(path), [xy]).points[0].vector
    with cache.grid_for(str(path), model, None) as (_, grid):
        assert grid.done.any()  # the windows computed by the first call are still there
        grid.feat[:] = 0  # poison: a second call that recomputed would not see this
    assert np.allclose(embed_at(str(path), [xy]).points[0].vector, 0)
    import os

    shutil.copy(SAMPLE, path)  # the file is written again: the cache must not serve the old grid
    os.utime(path, ns=(1, 1))
    assert np.allclose(embed_at(str(path), [xy]).points[0].vector, first, atol=1e-6)
    cache.clear()
