"""GAIR networks and loader (checkpoints built here with the published key names and full ViT-B shapes),
CROMA's 2D-ALiBi encoder, and the GeoCLIP location encoder with the weights shipped in the geoclip wheel."""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import math
import pathlib

import numpy as np
import pytest
import torch

from engine.errors import InputError, WeightsError
from engine.nets import locenc
from engine.nets.checkpoints import sha256_file
from engine.nets.croma import S2_BANDS, S2_MEAN, S2_STD, CromaOptical, alibi_2d, normalize_s2
from engine.nets.gair import load_gair
from engine.nets.locenc import LocationEncoder, load_geoclip_location_encoder
from engine.nets.streetview import encode_photo, to_legacy_layout

D = 768

# ------------------------------------------------------------------------------------ checkpoint builder


def _gair_shapes(with_sv: bool = True) -> dict[str, tuple[int, ...]]:
    """GAIR's state-dict names and shapes, written from the published code (not from our modules)."""
    s: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out: int, inp: int) -> None:
        s[name + ".weight"], s[name + ".bias"] = (out, inp), (out,)

    def norm(name: str) -> None:
        s[name + ".weight"], s[name + ".bias"] = (D,), (D,)

    enc = "rs_encoder.s2_encoder."
    linear(enc + "linear_input", D, 8 * 8 * 10)
    for n in range(12):
        layer = f"{enc}transformer.layers.{n}."
        norm(layer + "0.input_norm")
        s[layer + "0.to_qkv.weight"] = (3 * D, D)
        linear(layer + "0.to_out", D, D)
        norm(layer + "1.input_norm")
        linear(layer + "1.net.0", 4 * D, D)
        linear(layer + "1.net.3", D, 4 * D)
    norm(enc + "transformer.norm_out")  # the training encoder's final norm
    norm("rs_encoder.layer_norm")
    linear("rs_encoder.head", 10, D)
    linear("imnet", D, 9 * D + 2)
    for i in range(3):
        cap = f"location_encoder.LocEnc{i}."
        s[cap + "capsule.0.b"] = (256, 2)
        linear(cap + "capsule.1", 1024, 512)
        linear(cap + "capsule.3", 1024, 1024)
        linear(cap + "capsule.5", 1024, 1024)
        linear(cap + "head.0", D, 1024)
    for proj in ("radar_proj", "optical_proj", "location_proj"):
        linear(proj, D, D)
    s["logit_scale"] = ()
    if with_sv:  # Hugging Face transformers 4.x ViTModel names
        sv = "sv_encoder."
        s[sv + "embeddings.cls_token"] = (1, 1, D)
        s[sv + "embeddings.position_embeddings"] = (1, 197, D)
        s[sv + "embeddings.patch_embeddings.projection.weight"] = (D, 3, 16, 16)
        s[sv + "embeddings.patch_embeddings.projection.bias"] = (D,)
        for n in range(12):
            layer = f"{sv}encoder.layer.{n}."
            for part in ("query", "key", "value"):
                linear(layer + "attention.attention." + part, D, D)
            linear(layer + "attention.output.dense", D, D)
            linear(layer + "intermediate.dense", 3072, D)
            linear(layer + "output.dense", D, 3072)
            norm(layer + "layernorm_before")
            norm(layer + "layernorm_after")
        norm(sv + "layernorm")
        linear(sv + "pooler.dense", D, D)
    return s


EXTRAS = {  # training-only tensors the loader must drop on purpose
    "nerf_fn.layers.0.0.create_qkv.weight": (3 * D, D),
    "nerf_fn.layers.0.0.out.weight": (D, D),
    "nerf_fn.norm_out.weight": (D,),
    "query_feature": (1, 1, D),
    "rs_patch_pos_encoding": (1, 144, D),
    "rs_encoder_teacher.s2_encoder.linear_input.weight": (D, 640),
    "sv_encoder_teacher.pooler.dense.weight": (D, D),
    "queue_for_location": (2, 4096),
    "queue_ptr_location": (1,),
    "ContrastLoss.optical_proj.weight": (D, D),
    "rs_student_projector.weight": (D, D),
}


def _tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name == "logit_scale":
            out[name] = torch.tensor(math.log(1 / 0.07))
        elif name.endswith("capsule.0.b"):
            out[name] = torch.randn(shape, generator=gen) * 16.0
        elif "norm" in name and name.endswith(".weight"):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            out[name] = 0.03 * torch.randn(shape, generator=gen)
    return out


def _save(path: pathlib.Path, state: dict[str, torch.Tensor], **entries) -> pathlib.Path:
    args = argparse.Namespace(model="vit_base_patch16_dec512d8b_liif", input_size=96, lr=1e-4, data_path="/d")
    ckpt = {
        "model": state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
        "epoch": 99,
        "args": args,
    }
    ckpt.update(entries)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="session")
def gair_state() -> dict[str, torch.Tensor]:
    return _tensors(_gair_shapes(with_sv=True), seed=0)


@pytest.fixture(scope="session")
def gair_ckpt(tmp_path_factory, gair_state) -> pathlib.Path:
    extras = _tensors(EXTRAS, seed=1)
    return _save(tmp_path_factory.mktemp("gair") / "checkpoint.pth", gair_state | extras)


@pytest.fixture(scope="session")
def gair(gair_ckpt):
    return load_gair(gair_ckpt)


@pytest.fixture(scope="session")
def no_sv_state(gair_state) -> dict[str, torch.Tensor]:
    return {k: v for k, v in gair_state.items() if not k.startswith("sv_encoder.")}


# --------------------------------------------------------------------------------------------- GAIR


def test_load_gair_matches_every_tensor_and_ignores_extras(gair, gair_ckpt, gair_state):
    report = gair.report
    assert report.ok, report.summary()
    assert report.loaded == len(gair.state_dict()) == len(gair_state) - 2  # minus the dropped norm_out pair
    for key in EXTRAS:
        assert key in report.ignored
    for entry in ("optimizer", "epoch", "args"):
        assert f"{entry} (checkpoint entry)" in report.ignored
    assert "rs_encoder.s2_encoder.transformer.norm_out.weight" in report.ignored
    assert gair.model_id == "gair/sha256:" + sha256_file(gair_ckpt)[:8]
    assert not gair.training

    own = gair.state_dict()
    for key in (
        "imnet.weight",
        "location_encoder.LocEnc2.capsule.0.b",
        "rs_encoder.head.weight",
        "logit_scale",
    ):
        assert torch.equal(own[key], gair_state[key])
    # the street-view encoder: each renamed tensor where the installed transformers keeps it (names written
    # here by hand for 4.x and 5.x, independent of engine.nets.streetview's tables), then all of them
    sv_own = gair.sv_encoder.state_dict()
    v5 = "layers.3.attention.q_proj.weight" in sv_own
    for legacy, renamed in [
        ("attention.attention.query.weight", "attention.q_proj.weight"),
        ("attention.attention.key.bias", "attention.k_proj.bias"),
        ("attention.attention.value.weight", "attention.v_proj.weight"),
        ("attention.output.dense.weight", "attention.o_proj.weight"),
        ("intermediate.dense.weight", "mlp.fc1.weight"),
        ("output.dense.bias", "mlp.fc2.bias"),
        ("layernorm_after.weight", "layernorm_after.weight"),
    ]:
        name = f"layers.3.{renamed}" if v5 else f"encoder.layer.3.{legacy}"
        assert torch.equal(sv_own[name], gair_state[f"sv_encoder.encoder.layer.3.{legacy}"]), name
    sv = to_legacy_layout(sv_own)
    assert len(sv) == sum(k.startswith("sv_encoder.") for k in gair_state)
    for key, value in sv.items():
        assert torch.equal(value, gair_state["sv_encoder." + key]), key


def test_gair_methods(gair, gair_state):
    x = torch.rand(2, 10, 96, 96)
    grid = gair.rs_patch_grid(x)
    assert grid.shape == (2, D, 12, 12)
    assert torch.isfinite(grid).all()

    lat, lon = np.array([48.85, -33.87, 10.0]), np.array([2.35, 151.21, -170.0])
    emb = gair.location_embed(lat, lon)
    assert emb.shape == (3, D) and emb.dtype == np.float32
    with torch.no_grad():  # GAIR's encoder takes [lon, lat]
        direct = gair.location_encoder(torch.tensor(np.stack([lon, lat], 1), dtype=torch.float32)).numpy()
    np.testing.assert_allclose(emb, direct, atol=1e-6)

    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (180, 260, 3), dtype=np.uint8)
    other = np.ascontiguousarray(photo[::-1])
    e1, e2 = gair.photo_embed(photo), gair.photo_embed(other)
    assert e1.shape == (D,) and e1.dtype == np.float32
    assert not np.allclose(e1, e2, atol=1e-4)  # depends on the image
    np.testing.assert_allclose(gair.photo_embed(photo), e1, atol=1e-6)
    pooled = encode_photo(gair.sv_encoder, photo)
    assert np.abs(pooled).max() <= 1.0  # tanh pooler
    w, b = gair_state["optical_proj.weight"].numpy(), gair_state["optical_proj.bias"].numpy()
    np.testing.assert_allclose(e1, w @ pooled + b, atol=1e-4)


def test_module_prefix_and_absent_street_view(tmp_path, no_sv_state):
    path = _save(tmp_path / "ddp.pth", {"module." + k: v for k, v in no_sv_state.items()})
    model = load_gair(path, final_norm=True)
    assert model.report.loaded == len(model.state_dict()) == len(no_sv_state)
    assert model.report.missing == ["sv_encoder.* (absent from the checkpoint)"]
    assert not model.report.unexpected and not model.report.shape_mismatch
    assert model.model_id.startswith("gair-finalnorm/sha256:")
    assert torch.equal(
        model.rs_encoder.s2_encoder.transformer.norm_out.weight,
        no_sv_state["rs_encoder.s2_encoder.transformer.norm_out.weight"],
    )
    with pytest.raises(WeightsError, match="street-view"):
        model.photo_embed(np.zeros((64, 64, 3), np.uint8))


def test_missing_or_misshapen_required_part_raises(tmp_path, no_sv_state):
    missing = {k: v for k, v in no_sv_state.items() if k != "imnet.bias"}
    with pytest.raises(WeightsError, match=r"1 missing: imnet\.bias"):
        load_gair(_save(tmp_path / "missing.pth", missing))
    misshapen = no_sv_state | {"imnet.weight": torch.zeros(D, 9 * D)}
    with pytest.raises(WeightsError, match=r"shape mismatch: imnet\.weight: checkpoint \(768, 6912\)"):
        load_gair(_save(tmp_path / "shape.pth", misshapen))


def test_checkpoint_with_other_python_objects_is_refused(tmp_path):
    path = tmp_path / "pathargs.pth"
    torch.save(
        {
            "model": {"imnet.bias": torch.zeros(D)},
            "args": argparse.Namespace(out=pathlib.PurePosixPath("/x")),
        },
        path,
    )
    with pytest.raises(WeightsError, match="PurePosixPath"):
        load_gair(path)
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        load_gair(path, sha256="0" * 64)


# --------------------------------------------------------------------------------------------- CROMA


def _reference_alibi(h: int, w: int, heads: int) -> torch.Tensor:
    """CROMA's published recipe, written out with loops: -slope * Euclidean distance, power-of-2 slopes."""
    start = 2 ** (-(2 ** -(math.log2(heads) - 3)))
    slopes = torch.tensor([start * start**i for i in range(heads)])
    points = list(itertools.product(range(h), range(w)))
    out = torch.empty(heads, len(points), len(points))
    for a, p1 in enumerate(points):
        for b, p2 in enumerate(points):
            out[:, a, b] = -slopes * math.dist(p1, p2)
    return out[None]


def test_alibi_matches_croma_recipe_and_depends_on_displacement_only():
    torch.testing.assert_close(alibi_2d(12, 12, 16), _reference_alibi(12, 12, 16))
    torch.testing.assert_close(alibi_2d(5, 9, 16), _reference_alibi(5, 9, 16))
    small, large = alibi_2d(6, 7, 16)[0], alibi_2d(11, 13, 16)[0]
    for (r1, c1), (r2, c2) in [((0, 0), (5, 6)), ((2, 3), (4, 1)), ((5, 0), (0, 6))]:
        for dr, dc in [(0, 0), (3, 4), (5, 6)]:  # the same pair moved anywhere in a bigger grid
            a, b = (r1 + dr) * 13 + c1 + dc, (r2 + dr) * 13 + c2 + dc
            torch.testing.assert_close(large[:, a, b], small[:, r1 * 7 + c1, r2 * 7 + c2])


def _patch_permuted(x: torch.Tensor, perm: str) -> torch.Tensor:
    """Move whole 8x8 patches (their pixels untouched) by a grid isometry."""
    b, c, height, width = x.shape
    h, w = height // 8, width // 8
    blocks = x.reshape(b, c, h, 8, w, 8)
    if perm == "flip_rows":
        blocks = blocks.flip(2)
    elif perm == "flip_cols":
        blocks = blocks.flip(4)
    elif perm == "transpose":
        blocks = blocks.permute(0, 1, 4, 3, 2, 5)
        h, w = w, h
    return blocks.reshape(b, c, h * 8, w * 8)


def _token_permuted(grid: torch.Tensor, perm: str) -> torch.Tensor:
    return {"flip_rows": grid.flip(2), "flip_cols": grid.flip(3), "transpose": grid.transpose(2, 3)}[perm]


@pytest.mark.parametrize("size", [(96, 96), (64, 136)])
def test_croma_position_is_relative_only(size):
    """Moving whole patches by an isometry of the grid moves their tokens the same way, exactly.

    On a finite grid a translation pushes patches across the border, so the exact symmetries of a model whose
    only position signal is the distance between patches are the grid's isometries (flips; transpose). Any
    absolute position embedding breaks them: the second half of the test adds one and sees the check fail.
    """
    torch.manual_seed(0)
    net = CromaOptical(dim=64, depth=2, heads=16).eval()
    x = torch.rand(1, 10, *size)
    perms = ["flip_rows", "flip_cols"] + (["transpose"] if size[0] == size[1] else [])
    with torch.no_grad():
        grid = net.patch_grid(x)
        assert grid.shape == (1, 64, size[0] // 8, size[1] // 8)
        for perm in perms:
            torch.testing.assert_close(net.patch_grid(_patch_permuted(x, perm)), _token_permuted(grid, perm))
        # ... but position does matter: swapping two patches (not an isometry) is not a mere swap of tokens
        h, w = size[0] // 8, size[1] // 8
        swapped = x.clone()
        a, b = (
            (slice(None), slice(None), slice(0, 8), slice(0, 8)),
            (slice(None), slice(None), slice(8, 16), slice(16, 24)),
        )
        swapped[a], swapped[b] = x[b], x[a]
        moved = net.patch_grid(swapped).reshape(1, 64, h * w)
        expected = grid.reshape(1, 64, h * w).clone()
        expected[..., [0, w + 2]] = expected[..., [w + 2, 0]]
        assert not torch.allclose(moved, expected, atol=1e-3)

        n = (size[0] // 8) * (size[1] // 8)
        absolute = 0.5 * torch.randn(1, n, 64)
        net.linear_input.register_forward_hook(lambda _m, _i, out: out + absolute)
        grid = net.patch_grid(x)
        for perm in perms:
            moved = net.patch_grid(_patch_permuted(x, perm))
            assert not torch.allclose(moved, _token_permuted(grid, perm), atol=1e-3)


def test_croma_patch_order_and_input_checks():
    torch.manual_seed(0)
    net = CromaOptical(dim=32, depth=1, heads=4).eval()
    seen = []
    net.linear_input.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0]))
    x = torch.rand(2, 10, 16, 24)
    with torch.no_grad():
        tokens, grid = net(x), net.patch_grid(x)
    assert tokens.shape == (2, 6, 32)
    r, c = 1, 2  # row-major token 1 * 3 + 2, channel-major pixels inside the patch
    torch.testing.assert_close(
        seen[0][1, r * 3 + c], x[1, :, r * 8 : r * 8 + 8, c * 8 : c * 8 + 8].reshape(-1)
    )
    torch.testing.assert_close(grid[:, :, r, c], tokens[:, r * 3 + c])
    assert len(net._bias_cache) == 1
    with pytest.raises(InputError, match="multiples of 8"):
        net(torch.rand(1, 10, 20, 24))
    with pytest.raises(InputError, match="10, H, W"):
        net(torch.rand(1, 12, 16, 16))


def test_normalize_s2():
    mean, std = np.array(S2_MEAN)[:, None, None], np.array(S2_STD)[:, None, None]
    assert len(S2_BANDS) == 10 and S2_BANDS[7] == "B8A"
    stack = np.concatenate(
        [mean - 3 * std, mean - 2 * std, mean, mean + 1.99 * std, mean + 5 * std, mean * np.nan], 2
    )
    stack = np.broadcast_to(stack, (10, 4, 6))
    out = normalize_s2(stack)
    assert out.shape == (10, 4, 6) and out.dtype == np.float32
    expected = np.array([0, 0, 127, np.floor(3.99 / 4 * 255), 255, 0]) / 255.0
    np.testing.assert_allclose(out[:, 0, :], np.broadcast_to(expected, (10, 6)), atol=1e-7)
    np.testing.assert_allclose(out * 255, np.round(out * 255), atol=1e-4)  # uint8 levels
    with pytest.raises(InputError):
        normalize_s2(np.zeros((12, 4, 4)))


# ------------------------------------------------------------------------------------------- GeoCLIP


@pytest.fixture(scope="module")
def geoclip():
    return load_geoclip_location_encoder()


def _destination(lat: float, lon: float, km: float, bearing: float) -> tuple[float, float]:
    """Point at ``km`` along a great circle from (lat, lon) with the given bearing (spherical Earth)."""
    d, b, p1, l1 = km / 6371.0088, math.radians(bearing), math.radians(lat), math.radians(lon)
    p2 = math.asin(math.sin(p1) * math.cos(d) + math.cos(p1) * math.sin(d) * math.cos(b))
    l2 = l1 + math.atan2(math.sin(b) * math.sin(d) * math.cos(p1), math.cos(d) - math.sin(p1) * math.sin(p2))
    return math.degrees(p2), (math.degrees(l2) + 540) % 360 - 180


@pytest.mark.filterwarnings("ignore::FutureWarning")  # geoclip's torch.jit.script
def test_geoclip_matches_the_geoclip_package(geoclip):
    from geoclip.model.location_encoder import LocationEncoder as GeoclipLocationEncoder

    reference = GeoclipLocationEncoder().eval()  # loads the same wheel file itself
    rng = np.random.default_rng(1)
    lat, lon = rng.uniform(-89, 89, 64), rng.uniform(-180, 180, 64)
    with torch.no_grad():
        expected = reference(torch.tensor(np.stack([lat, lon], 1), dtype=torch.float32)).numpy()
    got = geoclip.embed(lat, lon)
    assert got.shape == (64, 512) and got.dtype == np.float32
    assert np.abs(got - expected).max() < 1e-4
    assert geoclip.model_id == "geoclip-location/sha256:" + locenc.GEOCLIP_SHA256[:8]
    assert sha256_file(locenc.geoclip_weights_path()) == locenc.GEOCLIP_SHA256


PLACES = [(48.8566, 2.3522), (40.7128, -74.006), (-33.8688, 151.2093), (35.6762, 139.6503), (-1.29, 36.82)]


def test_geoclip_near_places_are_more_similar_than_far_ones(geoclip):
    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    for (lat, lon), bearing in itertools.product(PLACES, (0, 90, 200)):
        near, far = _destination(lat, lon, 10, bearing), _destination(lat, lon, 1000, bearing)
        emb = geoclip.embed(np.array([lat, near[0], far[0]]), np.array([lon, near[1], far[1]]))
        assert cos(emb[0], emb[1]) > cos(emb[0], emb[2]) + 0.1, (lat, lon, bearing)


def test_coordinate_order(geoclip):
    gair_order = LocationEncoder(out_dim=512, order="lonlat")
    gair_order.load_state_dict(geoclip.state_dict())
    lat, lon = np.array([p[0] for p in PLACES]), np.array([p[1] for p in PLACES])
    np.testing.assert_allclose(gair_order.embed(lat, lon), geoclip.embed(lat, lon), atol=1e-6)
    with torch.no_grad():  # forward takes each model's own order: the same pairs fed as [lat, lon] differ
        latlon = torch.tensor(np.stack([lat, lon], 1), dtype=torch.float32)
        assert not torch.allclose(gair_order(latlon), geoclip(latlon), atol=1e-3)
        torch.testing.assert_close(gair_order(latlon.flip(1)), geoclip(latlon))


def test_geoclip_errors(geoclip, monkeypatch):
    with pytest.raises(InputError):
        geoclip.embed(np.array([91.0]), np.array([0.0]))
    with pytest.raises(InputError):
        geoclip.embed(np.array([1.0, 2.0]), np.array([0.0]))
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        load_geoclip_location_encoder(sha256="de" * 32)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "geoclip" else real(name, *a)
    )
    with pytest.raises(WeightsError, match="pip install geoclip"):
        load_geoclip_location_encoder()


# ------------------------------------------------------------------ GAIR through the embedding actions


def test_gair_embeddings_and_heatmap_end_to_end(tmp_path, gair_ckpt):
    """--model gair on a 10-band raster: CROMA windows, the checkpoint's NILI decoder, location and photo."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    from engine.embed.actions import embed_at, heatmap
    from engine.embed.grid import FeatureGrid
    from engine.embed.models import load_embedding_model
    from engine.embed.nili import nili_reference
    from engine.embed.raster import EmbedRaster

    rng = np.random.default_rng(0)
    path = tmp_path / "s2.tif"
    names = ["B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"]
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=128,
        height=112,
        count=10,
        dtype="uint16",
        crs="EPSG:32633",
        transform=from_origin(500000, 4000000, 10, 10),
    ) as dst:
        dst.write(rng.integers(500, 4000, size=(10, 112, 128), dtype=np.uint16))
        for i, n in enumerate(reversed(names), 1):  # stored in reverse: the names must be honoured
            dst.set_band_description(i, n)
    model = load_embedding_model("gair", str(gair_ckpt))
    assert model.dim == 768 and model.location_in_feature_space
    x, y = 500000 + 10 * 61.3, 4000000 - 10 * 40.7
    got = np.asarray(embed_at(str(path), [(x, y)], model="gair", weights=str(gair_ckpt)).points[0].vector)
    # the same through the literal released NILI on the grid's features
    with EmbedRaster(path) as r:
        grid = FeatureGrid(r, model.backbone)
        assert model.backbone.bands_of(r) == list(range(10, 0, -1))
        grid.ensure()
        ref = nili_reference(grid.feat, grid.cell_coords(np.array([61.3]), np.array([40.7])), model.decoder)[
            0
        ]
    assert np.allclose(got, ref / np.linalg.norm(ref), atol=1e-4)
    out = tmp_path / "heat.tif"
    res = heatmap(str(path), str(out), at=(x, y), model="gair", weights=str(gair_ckpt))
    with rasterio.open(out) as ds:
        a = ds.read(1)
        row, col = ds.index(x, y)
    assert a[row, col] > 0.999 and res.model_id.startswith("gair:")
    loc = heatmap(
        str(path), str(tmp_path / "loc.tif"), location=(36.1, 15.0), model="gair", weights=str(gair_ckpt)
    )
    assert "location-encoder" not in loc.query  # GAIR compares the location with image embeddings
    photo = (rng.integers(0, 255, size=(300, 400, 3))).astype(np.uint8)
    assert model.photo_vector(photo).shape == (768,)
