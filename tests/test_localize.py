"""Retrieval end to end on real imagery: index the bundled raster, localize warped crops of it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from imagery import SAMPLE, perspective_photo, read_window
from PIL import Image

from engine import api
from engine.errors import CancelledError, IndexNotFoundError, ModelMismatchError, OutsideAreaError
from engine.geo.search_area import SearchArea
from engine.imagery.geotiff import GeoTiffSource
from engine.progress import CancelToken
from engine.retrieval.index_store import build_index, open_index
from engine.vector_io import read_layer

WINDOW = (192, 192, 384)  # col, row, size: one of the indexed 384-px tiles


def window_footprint(idx, col, row, size):
    (tile,) = [
        i
        for i, b in enumerate(idx.tiles.native_bounds)
        if idx.tiles.scale[i] == size and np.allclose(b, _native_bounds(col, row, size))
    ]
    return tile, idx.tiles.footprints[tile]


def _native_bounds(col, row, size):
    import rasterio
    from rasterio.windows import Window, bounds

    with rasterio.open(SAMPLE / "naip_2018.tif") as ds:
        return bounds(Window(col, row, size, size), ds.transform)


def test_index_folder_is_complete_and_consistent(sample_index):
    idx = open_index(sample_index)
    m = idx.manifest
    assert m["model"]["model_id"].startswith("effnet-lite1-gem")  # the default since issue 17 part 1
    assert m["rotations"] == [0, 90, 180, 270]
    assert m["counts"]["vectors"] == idx.faiss.ntotal == 4 * len(idx.tiles) == 4 * m["counts"]["tiles"]
    geoms, cols = read_layer(sample_index / "tiles.gpkg", "tiles")
    assert cols["__crs__"] == "EPSG:4326"
    assert set(cols["native_crs"]) == {"EPSG:26914"}
    assert not (sample_index.parent / "naip2018.partial").exists()


@pytest.mark.parametrize("rot_k", [0, 1, 2, 3])
def test_warped_crop_comes_back_with_its_rotation(sample_index, tmp_path, rot_k):
    idx = open_index(sample_index)
    tile, truth = window_footprint(idx, *WINDOW)
    photo = perspective_photo(read_window(SAMPLE / "naip_2018.tif", *WINDOW), squeeze=0.1, rot_k=rot_k)
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=90)
    res = api.localize([str(tmp_path / "photo.jpg")], idx, top_k=3)
    cands = res.photos[0].candidates
    assert tile in [c.tile_id for c in cands], cands
    best = next(c for c in cands if c.tile_id == tile)
    assert best.rotation_deg == 90 * rot_k


def test_exif_rotated_photo_is_read_upright(sample_index, tmp_path):
    idx = open_index(sample_index)
    photo = perspective_photo(read_window(SAMPLE / "naip_2018.tif", *WINDOW), squeeze=0.0, rot_k=0)
    upright = tmp_path / "upright.jpg"
    Image.fromarray(photo).save(upright, quality=95)
    # Store the pixels turned 90 degrees clockwise, with EXIF orientation 6 ("rotate 90 CW to display"):
    # a viewer (and Skyloc) shows the upright image.
    tagged = tmp_path / "tagged.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(photo, 1).copy()).save(tagged, quality=95, exif=exif)
    a = api.localize([str(upright)], idx, top_k=1).photos[0].candidates[0]
    b = api.localize([str(tagged)], idx, top_k=1).photos[0].candidates[0]
    assert (a.tile_id, a.rotation_deg) == (b.tile_id, b.rotation_deg)


def test_search_area_restricts_and_outside_is_an_error(sample_index, tmp_path):
    idx = open_index(sample_index)
    tile, truth = window_footprint(idx, *WINDOW)
    photo = tmp_path / "p.jpg"
    Image.fromarray(read_window(SAMPLE / "naip_2018.tif", *WINDOW)).save(photo)
    c = truth.centroid
    near = SearchArea(near=(c.y, c.x), radius_km=0.5)
    res = api.localize([str(photo)], idx, top_k=50, area=near)
    ids = [x.tile_id for x in res.photos[0].candidates]
    allowed = set(near.select(idx.tiles.footprints))
    assert tile in ids and set(ids) <= allowed and len(allowed) < len(idx.tiles)
    with pytest.raises(OutsideAreaError, match="covers"):
        api.localize([str(photo)], idx, area=SearchArea(near=(0.0, 0.0), radius_km=10))


def test_top_k_is_deduplicated_per_tile(sample_index, tmp_path):
    photo = tmp_path / "p.jpg"
    Image.fromarray(read_window(SAMPLE / "naip_2018.tif", *WINDOW)).save(photo)
    idx = open_index(sample_index)
    res = api.localize([str(photo)], idx, top_k=len(idx.tiles))
    ids = [c.tile_id for c in res.photos[0].candidates]
    assert len(ids) == len(set(ids)) == len(idx.tiles)
    scores = [c.score for c in res.photos[0].candidates]
    assert scores == sorted(scores, reverse=True)


def test_model_alias_reuses_the_index_settings(sample_index, tmp_path):
    photo = tmp_path / "p.jpg"
    Image.fromarray(read_window(SAMPLE / "naip_2018.tif", *WINDOW)).save(photo)
    # The index was encoded at 224 px; naming the model by its alias must not fall back to 384 px.
    res = api.localize([str(photo)], str(sample_index), model="default", top_k=1)
    assert res.model_id == open_index(sample_index).model_id


def test_index_built_with_lite0_still_opens_and_searches(tmp_path):
    """An index built with effnet-lite0-gem (the default before Lite1) is queried with Lite0 when no model is
    named, finds the place as before, and asking it for the new default says which --model to use."""
    out = tmp_path / "lite0"
    api.index(
        [str(SAMPLE / "naip_2018.tif")], str(out), model="effnet-lite0-gem", tile_sizes=(384,), input_size=224
    )
    idx = open_index(out)
    assert idx.model_id == "effnet-lite0-gem@224+gray-clahe/sha256:57934424"
    assert idx.manifest["model"]["name"] == "effnet-lite0-gem+gray-clahe"
    tile, _ = window_footprint(idx, *WINDOW)
    photo = tmp_path / "p.jpg"
    Image.fromarray(read_window(SAMPLE / "naip_2018.tif", *WINDOW)).save(photo)
    res = api.localize([str(photo)], str(out), top_k=3)  # default model arguments: the index's model
    assert res.model_id == idx.model_id and res.photos[0].status == "ok"
    assert res.photos[0].candidates[0].tile_id == tile
    named = api.localize([str(photo)], str(out), model="effnet-lite0-gem", top_k=3)
    assert [c.score for c in named.photos[0].candidates] == [c.score for c in res.photos[0].candidates]
    with pytest.raises(ModelMismatchError, match=r"--model effnet-lite0-gem\+gray-clahe"):
        api.localize([str(photo)], str(out), model="default")


def test_other_model_is_refused(sample_index, tmp_path):
    photo = tmp_path / "p.jpg"
    Image.fromarray(read_window(SAMPLE / "naip_2018.tif", *WINDOW)).save(photo)
    with pytest.raises(ModelMismatchError, match="was built with model effnet-lite1-gem"):
        api.localize([str(photo)], str(sample_index), model="astroloc-random")


def test_interrupted_build_leaves_no_index_and_resumes(tmp_path):
    out = tmp_path / "idx"
    encoder = api.get_encoder("default", None, "torch", 128)
    src = GeoTiffSource(str(SAMPLE / "naip_2018.tif"), tile_sizes=(512,))  # 6 tiles
    token = CancelToken()

    def cancel_after_first_chunk(fraction, message):
        if message.startswith("encoded 2 of"):
            token.cancel()

    small = dict(batch_tiles=2, chunk_tiles=2)
    with pytest.raises(CancelledError):
        build_index([src], encoder, out, progress=cancel_after_first_chunk, cancel=token, **small)
    assert not out.exists()
    with pytest.raises(IndexNotFoundError, match="interrupted build"):
        open_index(out)
    partial = tmp_path / "idx.partial"
    assert len(list((partial / "chunks").glob("*.npy"))) == 1

    messages = []
    manifest = build_index([src], encoder, out, progress=lambda f, m: messages.append(m), **small)
    assert "resumed tiles 0-2 of 6" in messages
    assert not any(m.startswith("encoded 2 of") for m in messages)
    assert manifest["counts"]["tiles"] == 6 and not partial.exists()
    # Resumed descriptors are the same as freshly computed ones.
    fresh = build_index([src], encoder, tmp_path / "fresh", **small)
    a, b = open_index(out).faiss, open_index(tmp_path / "fresh").faiss
    assert np.allclose(a.reconstruct_n(0, a.ntotal), b.reconstruct_n(0, b.ntotal), atol=1e-6)
    assert fresh["counts"] == manifest["counts"]

    # Rebuilding over an existing index replaces it only when the new one is complete.
    before = (out / "manifest.json").read_text()
    token2 = CancelToken()
    token2.cancel()
    with pytest.raises(CancelledError):
        build_index([src], encoder, out, cancel=token2, **small)
    assert (out / "manifest.json").read_text() == before
    src.close()


def test_candidates_geopackage(sample_index, tmp_path):
    photo = tmp_path / "p.jpg"
    Image.fromarray(read_window(SAMPLE / "naip_2018.tif", *WINDOW)).save(photo)
    out = tmp_path / "cands.gpkg"
    res = api.localize([str(photo)], str(sample_index), top_k=4, out=str(out))
    geoms, cols = read_layer(out, "candidates")
    assert cols["__crs__"] == "EPSG:4326" and len(geoms) == 4
    assert list(cols["rank"]) == [1, 2, 3, 4]
    idx = open_index(sample_index)
    for g, tid in zip(geoms, cols["tile_id"], strict=True):
        assert shapely.equals_exact(g, idx.tiles.footprints[tid], tolerance=1e-9)
    assert res.out == str(out)


def test_xyz_mosaic_index_from_real_candidates(shared_data, tmp_path):
    """An ISS photo folder as an XYZ source: footprints from z/x/y, zoom kept, surrounding_* excluded."""
    folder = shared_data / "iss" / "ISS052-E-10192"
    meta = json.loads((folder / "meta.json").read_text())
    out = tmp_path / "xyz"
    manifest = api.index([str(folder)], str(out), exclude=["surrounding_*"], input_size=224)
    assert manifest["counts"]["tiles"] == len({c["tile_zyx"] for c in meta["candidates"]})  # one listed twice
    idx = open_index(out)
    by_name = {c["file"]: c for c in meta["candidates"]}
    for i, source in enumerate(idx.tiles.source):
        cand = by_name[source.rsplit("/", 1)[-1]]
        lat_min, lon_min, lat_max, lon_max = cand["bbox_latlon"]
        assert np.allclose(idx.tiles.footprints[i].bounds, (lon_min, lat_min, lon_max, lat_max), atol=1e-4)
        assert idx.tiles.zoom[i] == int(cand["tile_zyx"].split("_")[0])
    res = api.localize([str(folder / meta["query_file"])], idx, top_k=3)
    assert len(res.photos[0].candidates) == 3 and res.photos[0].candidates[0].zoom is not None
