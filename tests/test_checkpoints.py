"""Checkpoint loading with the published key layouts at full ViT-B/14 shapes (built here, never downloaded)."""

from __future__ import annotations

import argparse
import hashlib

import numpy as np
import pytest
import torch

from engine.errors import WeightsError
from engine.nets.astroloc import AstroLocNet, astroloc_from_state_dict
from engine.nets.checkpoints import infer_salad_config, load_checkpoint, load_into, map_keys
from engine.nets.registry import load_encoder
from engine.nets.salad import SaladConfig

SIZE = 126  # 9x9 patches: the smallest input with more patches than SALAD's 64 clusters


def _image(seed: int = 0) -> np.ndarray:
    """Deterministic textured RGB images: the outputs only need to be compared, not to mean anything."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:150, 0:170]
    base = np.stack([np.sin(xx / 7.0), np.cos(yy / 5.0), np.sin((xx + yy) / 11.0)], axis=-1)
    img = (base + 0.3 * rng.standard_normal(base.shape)) * 60 + 128
    return np.clip(img, 0, 255).astype(np.uint8)[None]


def _perturbed(net: AstroLocNet, seed: int) -> AstroLocNet:
    """Make every part of the net matter (timm initialises LayerScale to 1e-5, which hides the blocks)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                p.copy_(0.05 + 0.1 * torch.rand(p.shape, generator=gen))
        net.aggregator.agg.dust_bin.fill_(0.7)
    return net.eval()


def _reference(net: AstroLocNet, img: np.ndarray) -> np.ndarray:
    from engine.nets.onnx_backend import IMAGENET_MEAN, IMAGENET_STD, Preprocess

    x = torch.from_numpy(Preprocess(SIZE, IMAGENET_MEAN, IMAGENET_STD)(img))
    with torch.inference_mode():
        return net(x).numpy()


def _assert_params_equal(net: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    own = net.state_dict()
    assert set(own) == set(expected)
    for key, value in expected.items():
        assert torch.equal(own[key], value), key


@pytest.fixture(scope="module")
def ref_net() -> AstroLocNet:
    torch.manual_seed(1)
    return _perturbed(AstroLocNet(init_weights=False), seed=1)  # PyTorch's default init: random enough


@pytest.fixture(scope="module")
def megaloc_ckpt(ref_net, tmp_path_factory):
    """MegaLoc/AstroLoc layout as published: backbone.*, aggregator.agg.*, aggregator.linear.*."""
    sd = ref_net.state_dict()
    assert sd["backbone.pos_embed"].shape == (1, 1370, 768)
    assert sd["aggregator.linear.weight"].shape == (2048, 64 * 256 + 256)
    path = tmp_path_factory.mktemp("ckpt") / "megaloc.pth"
    torch.save(sd, path)
    return path


def test_megaloc_layout_loads_exactly(megaloc_ckpt, ref_net):
    enc = load_encoder("astroloc", weights=str(megaloc_ckpt), input_size=SIZE)
    digest = hashlib.sha256(megaloc_ckpt.read_bytes()).hexdigest()
    assert enc.model_id == f"astroloc@{SIZE}/sha256:{digest[:8]}"
    assert enc.dim == 2048 and enc.load_report.ok and enc.load_report.loaded == len(ref_net.state_dict())
    _assert_params_equal(enc.net, ref_net.state_dict())
    img = _image()
    np.testing.assert_allclose(enc.encode(img), _reference(ref_net, img), atol=1e-6)


def test_salad_original_layout(ref_net, tmp_path):
    """SALAD's own: backbone.model.*, aggregator.<part> without linear, cluster_dim 128 -> 8448-d."""
    torch.manual_seed(2)
    salad_ref = AstroLocNet(SaladConfig(cluster_dim=128), out_dim=None, init_weights=False)
    backbone = {k: v for k, v in ref_net.state_dict().items() if k.startswith("backbone.")}
    salad_ref.load_state_dict(backbone, strict=False)
    salad_ref = _perturbed(salad_ref, seed=2)
    ours = salad_ref.state_dict()
    published = {
        k.replace("backbone.", "backbone.model.", 1).replace("aggregator.agg.", "aggregator."): v
        for k, v in ours.items()
    }
    published["backbone.model.mask_token"] = torch.zeros(1, 768)
    path = tmp_path / "dino_salad.ckpt"
    torch.save({"state_dict": published, "epoch": 3}, path)

    enc = load_encoder("astroloc", weights=str(path), input_size=SIZE)
    assert enc.dim == 8448
    assert enc.load_report.ignored == ["backbone.mask_token"] and enc.load_report.ok
    _assert_params_equal(enc.net, ours)
    img = _image(1)
    np.testing.assert_allclose(enc.encode(img), _reference(salad_ref, img), atol=1e-6)


def test_module_prefix_and_model_wrapper(ref_net, tmp_path):
    sd = ref_net.state_dict()
    path = tmp_path / "ddp.pth"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "epoch": 7, "args": {"lr": 5e-5}}, path)
    loaded = load_checkpoint(path)
    assert set(loaded) == set(sd)
    net, report = astroloc_from_state_dict(loaded)
    assert report.ok
    _assert_params_equal(net, sd)


def test_dinov2_original_names_chunked_blocks(ref_net):
    """Bare DINOv2 keys, block_chunks=4 (blocks.C.N.*, N global) and mask_token map onto the timm ViT."""
    backbone = {
        k.removeprefix("backbone."): v for k, v in ref_net.state_dict().items() if k.startswith("backbone.")
    }
    dinov2 = {}
    for key, value in backbone.items():
        if key.startswith("blocks."):
            idx = int(key.split(".")[1])
            key = f"blocks.{idx // 3}.{idx}." + key.split(".", 2)[2]
        dinov2[key] = value
    dinov2["mask_token"] = torch.zeros(1, 768)
    assert "blocks.3.11.mlp.fc2.weight" in dinov2

    mapped = map_keys(dinov2)
    assert "backbone.blocks.11.mlp.fc2.weight" in mapped and "backbone.mask_token" in mapped
    net = AstroLocNet(init_weights=False)
    report = load_into(net, mapped, allow_missing=True)
    assert report.ignored == ["backbone.mask_token"] and not report.unexpected
    assert report.missing and all(k.startswith("aggregator.") for k in report.missing)
    assert report.loaded == len(backbone)
    for key, value in backbone.items():
        assert torch.equal(net.state_dict()["backbone." + key], value), key


def test_wrong_shape_names_the_key(ref_net):
    sd = dict(ref_net.state_dict())
    sd["backbone.blocks.5.attn.qkv.weight"] = torch.zeros(1152, 768)
    with pytest.raises(WeightsError, match=r"backbone\.blocks\.5\.attn\.qkv\.weight.*\(1152, 768\)"):
        astroloc_from_state_dict(sd)


def test_linear_not_matching_salad_is_refused(ref_net):
    sd = dict(ref_net.state_dict())
    sd["aggregator.linear.weight"] = torch.zeros(2048, 8448)
    with pytest.raises(WeightsError, match=r"aggregator\.linear\.weight"):
        infer_salad_config(sd)


def test_sha256_mismatch_and_match(megaloc_ckpt):
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        load_encoder("astroloc", weights=str(megaloc_ckpt), sha256="0" * 64)
    digest = hashlib.sha256(megaloc_ckpt.read_bytes()).hexdigest()
    assert "backbone.norm.weight" in load_checkpoint(megaloc_ckpt, expected_sha256="sha256:" + digest)
    assert "backbone.norm.weight" in load_checkpoint(megaloc_ckpt, expected_sha256=digest.upper())


@pytest.mark.parametrize("short", [8, 12, 63])
def test_sha256_prefix_is_refused(megaloc_ckpt, short):
    """A prefix proves little (8 hex digits = 32 bits): only the full digest pins a file."""
    digest = hashlib.sha256(megaloc_ckpt.read_bytes()).hexdigest()
    with pytest.raises(WeightsError, match="64 hex digits"):
        load_checkpoint(megaloc_ckpt, expected_sha256=digest[:short])
    with pytest.raises(WeightsError, match="64 hex digits"):
        load_encoder("astroloc", weights=str(megaloc_ckpt), sha256=digest[:short])


def test_unexpected_keys_warn_and_are_reported(ref_net):
    sd = dict(ref_net.state_dict())
    sd["aggregator.agg.temperature"] = torch.ones(())
    with pytest.warns(UserWarning, match="temperature"):
        net, report = astroloc_from_state_dict(sd)
    assert report.unexpected == ["aggregator.agg.temperature"] and not report.missing
    assert not report.ok and "1 unexpected" in report.summary()


def test_missing_keys_raise_unless_allowed(ref_net):
    sd = {k: v for k, v in ref_net.state_dict().items() if k != "backbone.norm.weight"}
    with pytest.raises(WeightsError, match=r"backbone\.norm\.weight"):
        astroloc_from_state_dict(sd)
    report = load_into(AstroLocNet(init_weights=False), sd, allow_missing=True)
    assert report.missing == ["backbone.norm.weight"]


def test_most_backbone_missing_is_a_clear_error(ref_net):
    sd = {k: v for k, v in ref_net.state_dict().items() if k.startswith("aggregator.")}
    sd["rs_encoder.s2_encoder.linear_input.weight"] = torch.zeros(768, 640)
    with pytest.raises(WeightsError, match=r"backbone weights are missing.*rs_encoder"):
        astroloc_from_state_dict(sd)


def test_refuses_pickled_objects(tmp_path):
    path = tmp_path / "with_args.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(WeightsError, match=r"argparse\.Namespace.*weights_only=True"):
        load_checkpoint(path)


def test_unreadable_or_absent_checkpoint(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        load_checkpoint(bad)
    with pytest.raises(WeightsError, match="not found"):
        load_checkpoint(tmp_path / "absent.pth")


def test_astroloc_without_weights_says_where_to_get_them():
    with pytest.raises(WeightsError, match="not shipped"):
        load_encoder("astroloc")
