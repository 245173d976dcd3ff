"""`skyloc train` (issue 17 part 2): a model folder that loads everywhere, cancel, resume, bad inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
from imagery import SAMPLE

from engine import api
from engine import train as training
from engine.cli import main
from engine.errors import CancelledError, EmptyInputError, ModelMismatchError, OutputExistsError, SkylocError
from engine.imagery.photos import read_image
from engine.nets.registry import load_encoder, resolve_name
from engine.progress import CancelToken
from engine.vector_io import write_polygons

PHOTO = SAMPLE / "photo_2009_oblique.jpg"
ROOT = Path(__file__).resolve().parents[1]


def _footprints(path: Path, localized: bool = True, empty: bool = False) -> Path:
    """A footprint layer as `skyloc footprint` writes it: the sample photo placed, one photo that failed."""
    corners = json.loads((SAMPLE / "photo_2009_oblique.json").read_text())["ground_corners_lonlat"]
    polys = [] if empty else [shapely.Polygon(corners) if localized else None, None]
    n = len(polys)
    write_polygons(
        path,
        polys,
        {
            "photo": [str(PHOTO), str(SAMPLE / "missing.jpg")][:n],
            "status": ["localized" if localized else "rejected", "error"][:n],
        },
        layer="footprints",
    )
    return path


@pytest.fixture(scope="module")
def trained(sample_index, tmp_path_factory):
    work = tmp_path_factory.mktemp("train")
    out = work / "model"
    result = api.train(
        str(_footprints(work / "fp.gpkg")), str(sample_index), str(out), steps=2, batch_photos=1
    )
    return out, result


def test_train_writes_a_model_folder_that_loads_and_changes_descriptors(trained, sample_index):
    out, result = trained
    assert {p.name for p in out.iterdir()} == set(training.MODEL_FILES)
    card = json.loads((out / training.CARD_FILE).read_text())
    assert card["weights_sha256"] == result.weights_sha256
    assert (out / "weights.pth.sha256").read_text().split()[0] == result.weights_sha256
    assert card["frontend"] == "gray-clahe" and card["input_size"] == 224
    assert result.photos == 1 and result.pairs >= 1 and len(result.losses) == 2
    assert all(np.isfinite(result.losses))

    ft = load_encoder(str(out), backend="torch")
    base = load_encoder("default", backend="torch", input_size=224)
    assert ft.model_id.startswith("effnet-lite1-gem-ft@224+gray-clahe/sha256:")  # the default's base: Lite1
    assert card["base"] == "effnet-lite1-gem" and "EfficientNet-Lite1" in (out / "MODEL.md").read_text()
    assert ft.model_id != base.model_id and ft.frontend == base.frontend
    assert resolve_name(str(out)) == str(out.resolve())
    img = read_image(PHOTO)[None]
    a, b = ft.encode(img), base.encode(img)
    assert np.isfinite(a).all() and abs(np.linalg.norm(a) - 1) < 1e-4
    assert float((a * b).sum()) < 0.99999  # trained: the descriptors moved
    assert float((a * b).sum()) > 0.5  # a few steps: not destroyed
    onnx = load_encoder(str(out), backend="onnx")
    assert onnx.model_id == ft.model_id
    assert float((onnx.encode(img) * a).sum()) > 0.999

    # the index built with the untrained default refuses the fine-tuned model (and says so)
    from engine.retrieval.index_store import open_index

    with pytest.raises(ModelMismatchError):
        open_index(sample_index).check_encoder(ft)
    assert main(["localize", str(PHOTO), "--index", str(sample_index), "--model", str(out), "--quiet"]) == 4


def test_cli_train_refuses_to_replace_without_overwrite(trained, sample_index, tmp_path, capsys):
    out, _ = trained
    fp = _footprints(tmp_path / "fp.gpkg")
    args = ["train", "--footprints", str(fp), "--index", str(sample_index), "--out", str(out), "--quiet"]
    assert main([*args, "--steps", "1", "--batch-photos", "1"]) == 3
    assert "--overwrite" in capsys.readouterr().err
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("x")
    assert main(["train", "--footprints", str(fp), "--index", str(sample_index), "--out", str(other)]) == 3
    assert (other / "mine.txt").exists()


def test_cancel_leaves_nothing(sample_index, tmp_path):
    token = CancelToken()

    def progress(fraction, message):
        if message.startswith("step"):
            token.cancel()

    out = tmp_path / "model"
    with pytest.raises(CancelledError):
        api.train(
            str(_footprints(tmp_path / "fp.gpkg")),
            str(sample_index),
            str(out),
            steps=3,
            batch_photos=1,
            progress=progress,
            cancel=token,
        )
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp.gpkg"]


def test_resume_continues_from_the_checkpoint(sample_index, tmp_path):
    fp, out = _footprints(tmp_path / "fp.gpkg"), tmp_path / "model"
    params = training.TrainParams(steps=2, batch_photos=1, mined_tiles=2, checkpoint_every=1)

    def crash(fraction, message):
        if message.startswith("step 2"):
            raise KeyboardInterrupt  # a killed run: its checkpoint stays

    with pytest.raises(KeyboardInterrupt):
        training.train(fp, sample_index, out, params=params, progress=crash)
    assert not out.exists() and (tmp_path / ".model.train-partial" / "checkpoint.pt").is_file()
    result = training.train(fp, sample_index, out, params=params, resume=True)
    assert result.resumed_from == 1 and len(result.losses) == 2
    assert training.is_model_folder(out) and not (tmp_path / ".model.train-partial").exists()


def test_bad_inputs_are_clear_errors(sample_index, tmp_path, capsys):
    out = str(tmp_path / "model")
    with pytest.raises(EmptyInputError, match="no feature"):
        api.train(str(_footprints(tmp_path / "empty.gpkg", empty=True)), str(sample_index), out)
    with pytest.raises(EmptyInputError, match="no localized feature"):
        api.train(str(_footprints(tmp_path / "none.gpkg", localized=False)), str(sample_index), out)
    fp = str(_footprints(tmp_path / "fp.gpkg"))
    with pytest.raises(SkylocError):
        api.train(fp, str(tmp_path / "no-index"), out)
    assert main(["train", "--footprints", fp, "--index", str(tmp_path / "no-index"), "--out", out]) == 3
    assert (
        main(
            ["train", "--footprints", str(tmp_path / "nope.gpkg"), "--index", str(sample_index), "--out", out]
        )
        == 3
    )
    assert "no such file" in capsys.readouterr().err
    assert not Path(out).exists()
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    with pytest.raises(SkylocError, match="not a Skyloc model folder"):
        load_encoder(str(folder))


def test_damaged_weights_are_refused(trained, tmp_path):
    out, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / "weights.pth", "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\0" * 16)
    with pytest.raises(SkylocError, match="sha256"):
        load_encoder(str(copy), backend="torch")


@pytest.mark.slow
@pytest.mark.shared_data
def test_iss_leave_photos_out_evaluation(shared_data, tmp_path):
    """The CV script runs end to end on the ISS photos (1 fold x 2 steps here: the real figures are in
    bench/results/train_iss.txt, measured with more steps)."""
    if not (shared_data / "iss").is_dir():
        pytest.skip(f"{shared_data / 'iss'} is absent")
    cmd = [sys.executable, str(ROOT / "bench" / "train_iss.py"), "--work", str(tmp_path), "--folds", "4"]
    cmd += ["--run-folds", "1", "--steps", "2", "--report", str(tmp_path / "report.txt")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "report.txt").read_text()
    assert "untrained" in report and "trained" in report and "R@1" in report


def test_a_foreign_partial_folder_is_never_removed(sample_index, tmp_path):
    """The staging folder's name taken by something that is not a training run: refused, left as it is."""
    fp, out = _footprints(tmp_path / "fp.gpkg"), tmp_path / "model"
    foreign = tmp_path / ".model.train-partial"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not made by skyloc train"):
        training.train(fp, sample_index, out, params=training.TrainParams(steps=1, batch_photos=1))
    assert (foreign / "notes.txt").read_text() == "mine" and not out.exists()


def test_an_unreadable_photo_is_a_clear_error_that_leaves_nothing(sample_index, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg" * 20)
    corners = json.loads((SAMPLE / "photo_2009_oblique.json").read_text())["ground_corners_lonlat"]
    fp = tmp_path / "fp.gpkg"
    write_polygons(
        fp, [shapely.Polygon(corners)], {"photo": [str(bad)], "status": ["localized"]}, layer="footprints"
    )
    with pytest.raises(SkylocError, match="not an image file"):
        api.train(str(fp), str(sample_index), str(tmp_path / "model"), steps=1, batch_photos=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jpg", "fp.gpkg"]


def test_train_fine_tunes_an_index_built_with_lite0(tmp_path):
    """An index built with effnet-lite0-gem (the default before Lite1) fine-tunes its own network, Lite0."""
    index = tmp_path / "idx"
    api.index(
        [str(SAMPLE / "naip_2018.tif")],
        str(index),
        model="effnet-lite0-gem",
        input_size=128,
        tile_sizes=(512,),
    )
    out = tmp_path / "model"
    api.train(str(_footprints(tmp_path / "fp.gpkg")), str(index), str(out), steps=1, batch_photos=1)
    card = json.loads((out / training.CARD_FILE).read_text())
    assert card["base"] == "effnet-lite0-gem" and card["base_model_id"].endswith("/sha256:57934424")
    ft = load_encoder(str(out), backend="torch")
    assert ft.model_id.startswith("effnet-lite0-gem-ft@128+gray-clahe/sha256:") and ft.dim == 1280
    base = load_encoder("effnet-lite0-gem", input_size=128)
    img = read_image(PHOTO)[None]
    assert 0.5 < float((ft.encode(img) * base.encode(img)).sum()) < 0.99999


def test_train_fine_tunes_astroloc_from_its_checkpoint(tmp_path):
    """An index built with AstroLoc (a checkpoint in the published MegaLoc layout; random weights here, as
    the real one is not shipped) is fine-tuned into a model folder that loads and moves the descriptors."""
    import torch

    from engine.nets.astroloc import AstroLocNet

    torch.manual_seed(3)
    net = AstroLocNet(init_weights=False)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                p.fill_(0.1)  # make the blocks matter (timm's LayerScale init would hide them)
    ckpt = tmp_path / "astroloc.pth"
    torch.save(net.state_dict(), ckpt)
    index = tmp_path / "idx"
    api.index(
        [str(SAMPLE / "naip_2018.tif")],
        str(index),
        model="astroloc",
        weights=str(ckpt),
        input_size=126,
        tile_sizes=(768,),
    )
    out = tmp_path / "model"
    result = api.train(str(_footprints(tmp_path / "fp.gpkg")), str(index), str(out), steps=2, batch_photos=1)
    card = json.loads((out / training.CARD_FILE).read_text())
    assert card["base"] == "astroloc" and card["input_size"] == 126 and card["base_weights"] == str(ckpt)
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))

    ft = load_encoder(str(out))
    base = load_encoder("astroloc", weights=str(ckpt), input_size=126)
    assert ft.model_id.startswith("astroloc-ft@126/sha256:") and ft.dim == base.dim
    img = read_image(PHOTO)[None]
    a, b = ft.encode(img), base.encode(img)
    assert 0.5 < float((a * b).sum()) < 0.99999  # moved, not destroyed
    # only what training may touch moved: the first ViT blocks are frozen
    saved = torch.load(out / training.WEIGHTS_FILE, weights_only=True)
    original = net.state_dict()
    assert torch.equal(
        saved["backbone.blocks.0.attn.qkv.weight"], original["backbone.blocks.0.attn.qkv.weight"]
    )
    assert not torch.equal(saved["aggregator.linear.weight"], original["aggregator.linear.weight"])

    # the checkpoint the index names must still be that checkpoint
    torch.save({k: v + 1 if k == "aggregator.linear.bias" else v for k, v in original.items()}, ckpt)
    with pytest.raises(SkylocError, match="not the checkpoint"):
        api.train(str(tmp_path / "fp.gpkg"), str(index), str(tmp_path / "m2"), steps=1, batch_photos=1)
    assert not (tmp_path / "m2").exists()
