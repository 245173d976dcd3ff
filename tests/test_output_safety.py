"""Nothing a user owns is lost: outputs never replace inputs or foreign files, index folders are recognised by
their full signature, batches give every photo its own files, markers survive a full disk, one writer per
output, indexes keep working from other folders (issue 11, items 1-3, 9-12, 14's file modes).

Every test here drives the real CLI or API on real rasters, GeoPackages and FAISS indexes.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from imagery import ROOT, SAMPLE, read_window
from PIL import Image

from engine import api
from engine.cli import main
from engine.errors import OutputExistsError, OutputLockedError
from engine.footprint.batch import georef_names
from engine.locking import output_lock
from engine.output_guard import check_output, is_skyloc_output
from engine.retrieval.index_store import FAISS_FILE, MANIFEST, TILES_FILE, is_index_folder

NAIP18, NAIP09 = SAMPLE / "naip_2018.tif", SAMPLE / "naip_2009.tif"
PHOTO09 = SAMPLE / "photo_2009_oblique.jpg"
INDEX_ARGS = ["--tile-sizes", 512, "--input-size", 128, "--quiet"]


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def digest(path: Path) -> bytes:
    return path.read_bytes()


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(read_window(NAIP18, 192, 192, 384)).save(path, quality=90)
    return path


# ----------------------------------------------------------------------------- 1. index folders


def test_a_planet_order_folder_with_a_manifest_is_never_replaced(tmp_path, capsys):
    order = tmp_path / "order"
    order.mkdir()
    (order / "manifest.json").write_text("{}")
    shutil.copy(NAIP18, order / "scene.tif")
    before = digest(order / "scene.tif")
    code, _, err = run_cli(["index", NAIP09, "--out", order, *INDEX_ARGS], capsys)
    assert code == 3 and "not a Skyloc index" in err and "scene.tif" in err
    assert digest(order / "scene.tif") == before and (order / "manifest.json").read_text() == "{}"
    assert not (tmp_path / "order.partial").exists()


def test_an_index_with_a_foreign_file_added_is_not_replaced(sample_index, tmp_path, capsys):
    idx = tmp_path / "idx"
    shutil.copytree(sample_index, idx)
    assert is_index_folder(idx)
    (idx / "notes.txt").write_text("my notes about this index")
    assert not is_index_folder(idx)
    code, _, err = run_cli(["index", NAIP09, "--out", idx, *INDEX_ARGS], capsys)
    assert code == 3 and "notes.txt" in err
    assert (idx / "notes.txt").is_file() and (idx / FAISS_FILE).is_file()


def test_a_skyloc_index_is_replaced_and_qgis_journals_are_allowed(sample_index, tmp_path, capsys):
    idx = tmp_path / "idx"
    shutil.copytree(sample_index, idx)
    (idx / f"{TILES_FILE}-wal").write_bytes(b"")  # QGIS had tiles.gpkg open
    code, _, _ = run_cli(["index", NAIP09, "--out", idx, *INDEX_ARGS], capsys)
    assert code == 0
    assert json.loads((idx / MANIFEST).read_text())["build"]["sources"] == [str(NAIP09)]


def test_a_manifest_with_the_wrong_schema_is_not_an_index(sample_index, tmp_path):
    idx = tmp_path / "idx"
    shutil.copytree(sample_index, idx)
    (idx / MANIFEST).write_text(json.dumps({"format": 1, "complete": True}))
    assert not is_index_folder(idx)


def test_a_foreign_partial_folder_is_never_deleted(tmp_path, capsys):
    (tmp_path / "idx.partial").mkdir()
    (tmp_path / "idx.partial" / "draft.docx").write_text("mine")
    code, _, err = run_cli(["index", NAIP09, "--out", tmp_path / "idx", *INDEX_ARGS], capsys)
    assert code == 3 and "idx.partial" in err
    assert (tmp_path / "idx.partial" / "draft.docx").read_text() == "mine"


# ----------------------------------------------------------------------------- 2. outputs over inputs / foreign files


def test_heatmap_never_writes_over_its_raster(tmp_path, capsys):
    victim = tmp_path / "victim.tif"
    shutil.copy(NAIP18, victim)
    before = digest(victim)
    for extra in ([], ["--overwrite"]):
        code, _, err = run_cli(
            ["heatmap", victim, "--at", "487904,5207745", "--out", victim, "--quiet", *extra], capsys
        )
        assert code == 3 and "input" in err
        assert digest(victim) == before


def test_heatmap_refuses_a_foreign_file_replaces_its_own_and_overwrite_says_yes(tmp_path, capsys):
    out = tmp_path / "heat.tif"
    shutil.copy(NAIP09, out)  # an orthophoto that happens to have the name
    args = ["heatmap", NAIP18, "--at", "487904,5207745", "--out", out, "--resolution", 20, "--quiet"]
    code, _, err = run_cli(args, capsys)
    assert code == 3 and "not written by Skyloc" in err and "--overwrite" in err
    assert digest(out) == digest(NAIP09)
    assert run_cli([*args, "--overwrite"], capsys)[0] == 0
    assert is_skyloc_output(out) and is_skyloc_output(out.with_suffix(".qml"))
    assert run_cli(args, capsys)[0] == 0  # its own output: replaced without asking
    with rasterio.open(out) as ds:
        assert ds.tags()["SKYLOC_OUTPUT"] == "similarity heatmap" and ds.width > 0


def test_a_user_style_beside_the_heatmap_is_kept(tmp_path, capsys):
    out = tmp_path / "heat.tif"
    out.with_suffix(".qml").write_text("<qgis><!-- my hand-made style --></qgis>")
    code, _, err = run_cli(
        ["heatmap", NAIP18, "--at", "487904,5207745", "--out", out, "--resolution", 20, "--quiet"], capsys
    )
    assert code == 3 and "heat.qml" in err
    assert not out.exists() and "hand-made" in out.with_suffix(".qml").read_text()


def test_footprint_geotiff_never_over_the_against_raster(tmp_path, capsys):
    against = tmp_path / "ortho.tif"
    shutil.copy(NAIP09, against)
    before = digest(against)
    code, _, err = run_cli(
        [
            "footprint",
            PHOTO09,
            "--against",
            against,
            "--out",
            tmp_path / "fp.gpkg",
            "--geotiff",
            against,
            "--quiet",
        ],
        capsys,
    )
    assert code == 3 and "input" in err
    assert digest(against) == before and not (tmp_path / "fp.gpkg").exists()


def test_localize_into_a_geopackage_keeps_its_other_layers(sample_index, photo, tmp_path, capsys):
    fields = tmp_path / "fields.gpkg"
    wkb = np.array([shapely.to_wkb(shapely.box(0, 0, 1, 1))], dtype=object)
    pyogrio.raw.write(
        fields, wkb, [np.array(["wheat"], dtype=object)], ["crop"], layer="fields", driver="GPKG",
        geometry_type="Polygon", crs="EPSG:4326",
    )  # fmt: skip
    args = ["localize", photo, "--index", sample_index, "--top-k", 3, "--out", fields, "--quiet"]
    for _ in range(2):  # adds its layer, then replaces only its own layer
        assert run_cli(args, capsys)[0] == 0
        layers = dict(pyogrio.list_layers(fields))
        assert set(layers) == {"fields", "candidates"}
        assert pyogrio.read_info(fields, layer="candidates")["features"] == 3
        assert pyogrio.read_info(fields, layer="fields")["features"] == 1


def test_a_foreign_layer_of_the_same_name_is_not_replaced(sample_index, photo, tmp_path, capsys):
    gpkg = tmp_path / "work.gpkg"
    wkb = np.array([shapely.to_wkb(shapely.box(0, 0, 1, 1))], dtype=object)
    pyogrio.raw.write(
        gpkg, wkb, [], [], layer="candidates", driver="GPKG", geometry_type="Polygon", crs="EPSG:4326"
    )
    args = ["localize", photo, "--index", sample_index, "--out", gpkg, "--quiet"]
    code, _, err = run_cli(args, capsys)
    assert code == 3 and "candidates" in err
    assert pyogrio.read_info(gpkg, layer="candidates")["features"] == 1
    assert run_cli([*args, "--overwrite"], capsys)[0] == 0
    assert pyogrio.read_info(gpkg, layer="candidates")["features"] == 10


def test_localize_never_writes_into_the_index_files(sample_index, photo, tmp_path, capsys):
    idx = tmp_path / "idx"
    shutil.copytree(sample_index, idx)
    before = digest(idx / TILES_FILE)
    for extra in ([], ["--overwrite"]):
        code, _, err = run_cli(
            ["localize", photo, "--index", idx, "--out", idx / TILES_FILE, "--quiet", *extra], capsys
        )
        assert code == 3 and "input" in err
    assert digest(idx / TILES_FILE) == before
    assert run_cli(["localize", photo, "--index", idx, "--quiet"], capsys)[0] == 0


def test_embed_out_refuses_foreign_files_and_replaces_its_own(tmp_path, capsys):
    args = ["embed", NAIP18, "--at", "487904,5207745", "--quiet"]
    for name in ("e.json", "e.npy"):
        out = tmp_path / name
        out.write_bytes(b"user data")
        code, _, err = run_cli([*args, "--out", out], capsys)
        assert code == 3 and out.read_bytes() == b"user data", err
        assert run_cli([*args, "--out", out, "--overwrite"], capsys)[0] == 0
        assert is_skyloc_output(out)
        assert run_cli([*args, "--out", out], capsys)[0] == 0  # its own: replaced
    assert np.load(tmp_path / "e.npy").shape[0] == 1


def test_a_points_file_refined_by_hand_is_the_users(tmp_path, capsys):
    out, pts = tmp_path / "fp.gpkg", tmp_path / "p.points"
    args = ["footprint", PHOTO09, "--against", NAIP09, "--out", out, "--points", pts, "--quiet"]
    assert run_cli(args, capsys)[0] == 0
    if not is_skyloc_output(pts):
        pytest.skip("this filesystem keeps no extended attributes: .points files are always the user's")
    assert run_cli(args, capsys)[0] == 0  # unchanged since written: replaced
    lines = pts.read_text().splitlines()
    lines[3] = lines[3].replace(",1,0,0,0", ",1,0.5,0.2,0.54")  # as the Georeferencer saves a refinement
    pts.write_text("\n".join(lines) + "\n")
    refined = pts.read_text()
    code, _, err = run_cli(args, capsys)
    assert code == 3 and "p.points" in err
    assert pts.read_text() == refined


def test_check_output_rules(tmp_path):
    src = tmp_path / "in.tif"
    shutil.copy(NAIP18, src)
    link = tmp_path / "link.tif"
    link.symlink_to(src)
    with pytest.raises(OutputExistsError, match="input"):
        check_output(link, inputs=[src], overwrite=True)
    with pytest.raises(OutputExistsError, match="input"):
        check_output(tmp_path / "sub" / ".." / "in.tif", inputs=[src])
    with pytest.raises(OutputExistsError, match="folder"):
        check_output(tmp_path, inputs=[])
    assert check_output(tmp_path / "new.tif", inputs=[src]) == tmp_path / "new.tif"


# ----------------------------------------------------------------------------- 3. same-named photos


def test_photos_sharing_a_stem_or_a_name_get_their_own_outputs(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    shutil.copy(PHOTO09, a / "p.jpg")
    Image.open(PHOTO09).save(a / "p.png")
    shutil.copy(PHOTO09, b / "p.jpg")
    out, geo = tmp_path / "fp.gpkg", tmp_path / "geo"
    code, _, err = run_cli(
        ["footprint", a / "p.jpg", a / "p.png", b / "p.jpg", "--against", NAIP09, "--out", out,
         "--georef-dir", geo, "--quiet"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    meta, _, _, fields = pyogrio.raw.read(out)
    col = dict(zip(meta["fields"], fields, strict=True))
    tifs, points = list(col["geotiff"]), list(col["points"])
    assert list(col["status"]) == ["localized"] * 3
    assert len(set(tifs)) == 3 and len(set(points)) == 3
    assert all(Path(t).is_file() for t in tifs + points)
    assert sorted(p.name for p in geo.iterdir()) == sorted(
        ["a__p.jpg.tif", "a__p.jpg.points", "p.png.tif", "p.png.points", "b__p.jpg.tif", "b__p.jpg.points"]
    )


def test_georef_names_are_stable_whatever_the_order(tmp_path):
    x, y = tmp_path / "x" / "same", tmp_path / "y" / "same"
    photos = [x / "q.jpg", y / "q.jpg", tmp_path / "q.png"]
    forward = georef_names(photos, tmp_path / "geo")
    backward = georef_names(photos[::-1], tmp_path / "geo")
    assert [forward[i] for i in range(3)] == [backward[2 - i] for i in range(3)]
    assert len({t for t, _ in forward.values()}) == 3


# ----------------------------------------------------------------------------- 9. markers after a full disk


def test_an_empty_build_marker_restarts_the_build(tmp_path, capsys):
    out = tmp_path / "idx"
    staged = tmp_path / "idx.partial"
    (staged / "chunks").mkdir(parents=True)
    (staged / "build_params.json").write_bytes(b"")  # what a full disk leaves
    code, _, err = run_cli(["index", NAIP09, "--out", out, "--tile-sizes", 512, "--input-size", 128], capsys)
    assert code == 0, err
    assert "unreadable" in err and "starting this build again" in err
    assert is_index_folder(out) and not staged.exists()


def test_an_empty_batch_marker_restarts_the_batch(tmp_path, capsys):
    out = tmp_path / "fp.gpkg"
    parts = tmp_path / "fp.gpkg.parts"
    parts.mkdir()
    (parts / "settings.json").write_bytes(b"")
    code, _, err = run_cli(["footprint", PHOTO09, "--against", NAIP09, "--out", out], capsys)
    assert code == 0, err
    assert "unreadable" in err
    assert pyogrio.read_info(out)["features"] == 1 and not parts.exists()


# ----------------------------------------------------------------------------- 10. one writer per output


def test_a_second_build_of_the_same_output_is_refused(tmp_path):
    out = tmp_path / "idx"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from engine.locking import output_lock
            with output_lock({str(out)!r}):
                print("locked", flush=True)
                time.sleep(60)
        """)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError, match=f"pid {holder.pid}"):
            api.index([str(NAIP09)], str(out), tile_sizes=(512,), input_size=128)
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without cleaning up: its lock died with it
    api.index([str(NAIP09)], str(out), tile_sizes=(512,), input_size=128)
    assert is_index_folder(out)


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with (
        output_lock(tmp_path / "fp.gpkg"),
        pytest.raises(OutputLockedError),
        output_lock(tmp_path / "fp.gpkg"),
    ):
        pass
    with output_lock(tmp_path / "fp.gpkg"):  # released
        pass


# ----------------------------------------------------------------------------- 11. temp files of a killed write


def test_temp_files_of_a_killed_write_do_not_reach_the_index(tmp_path, capsys):
    out = tmp_path / "idx"
    args = ["index", NAIP09, "--out", out, *INDEX_ARGS]
    assert run_cli(args, capsys)[0] == 0
    shutil.rmtree(out)
    staged = tmp_path / "idx.partial"
    (staged / "chunks").mkdir(parents=True)
    # what kill -9 during write_index leaves: a temp index file beside a resumable build
    (staged / ".index.faiss.k1ll3d.tmp").write_bytes(b"\0" * 1000)
    (staged / "chunks" / ".000000000-000000128.npy.abc.tmp.npy").write_bytes(b"\0" * 10)
    assert run_cli(args, capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, FAISS_FILE, TILES_FILE])


def test_index_files_share_one_mode(sample_index, tmp_path):
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in Path(sample_index).iterdir()}
    assert len(set(modes.values())) == 1, modes


# ----------------------------------------------------------------------------- 12. sources from anywhere


def test_an_index_built_with_relative_paths_works_from_another_folder(tmp_path):
    work = tmp_path / "project"
    (work / "imagery").mkdir(parents=True)
    shutil.copy(NAIP09, work / "imagery" / "ortho.tif")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    build = [sys.executable, "-m", "engine.cli", "index", "imagery/ortho.tif", "--out", "idx", "--quiet"]
    subprocess.run(build + ["--tile-sizes", "512", "--input-size", "128"], cwd=work, env=env, check=True)
    manifest = json.loads((work / "idx" / MANIFEST).read_text())
    assert manifest["build"]["sources"] == [str(work / "imagery" / "ortho.tif")]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    fp = subprocess.run(
        [sys.executable, "-m", "engine.cli", "localize", str(PHOTO09), "--index", str(work / "idx"),
         "--footprint", "--top-k", "3", "--out", "fp.gpkg", "--quiet"],
        cwd=elsewhere, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert fp.returncode == 0, fp.stdout + fp.stderr
    assert "is gone" not in fp.stdout
    # the project folder moves, index and imagery together: the imagery is found again
    moved = tmp_path / "moved"
    shutil.move(work, moved)
    idx = api.open_index(str(moved / "idx"))
    assert set(map(str, idx.tiles.source)) == {str(moved / "imagery" / "ortho.tif")}


def test_an_index_without_its_tile_table_is_a_clear_error(sample_index, tmp_path, photo, capsys):
    idx = tmp_path / "idx"
    shutil.copytree(sample_index, idx)
    (idx / TILES_FILE).unlink()
    code, _, err = run_cli(["localize", photo, "--index", idx, "--quiet"], capsys)
    assert code == 3 and "tiles.gpkg is missing" in err
    (idx / TILES_FILE).write_bytes(b"not a geopackage")
    code, _, err = run_cli(["localize", photo, "--index", idx, "--quiet"], capsys)
    assert code == 3 and "tile table" in err


def test_geopackage_layers_carry_the_skyloc_description(sample_index):
    con = sqlite3.connect(Path(sample_index) / TILES_FILE)
    (desc,) = con.execute("SELECT description FROM gpkg_contents WHERE table_name='tiles'").fetchone()
    con.close()
    assert desc.startswith("Skyloc")
