"""AstroLoc's network: DINOv2 ViT-B/14 + SALAD + a linear projection to 2048-d (MegaLoc's layout).

The module tree is ``backbone`` (a timm ``vit_base_patch14_dinov2``, whose parameter names match
DINOv2's and MegaLoc's ``backbone.*`` keys) and ``aggregator`` with ``agg`` (SALAD) and ``linear``,
so a MegaLoc/AstroLoc state dict loads without renaming; other published layouts go through
:mod:`engine.nets.checkpoints`. The ViT is built for 518 px (1370 position embeddings, as stored in
the checkpoints) and runs at any multiple of 14.

Position embeddings at another size are resampled the way DINOv2's own code (which MegaLoc and
AstroLoc build on) does it: bicubic, no antialiasing, scale factor (grid + 0.1) / 37. timm's dynamic
path antialiases instead, which gives slightly different embeddings from those the model was trained
with; ``pos_interp="timm"`` selects timm's behaviour if a checkpoint turns out to need it.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import InputError, WeightsError
from engine.nets.checkpoints import (
    LoadReport,
    infer_salad_config,
    load_checkpoint,
    load_into,
    map_keys,
    sha256_file,
)
from engine.nets.onnx_backend import IMAGENET_MEAN, IMAGENET_STD, Preprocess, TorchEncoder
from engine.nets.salad import SALAD, SaladConfig

NAME = "astroloc"
RANDOM_NAME = "astroloc-random"
VIT_NAME = "vit_base_patch14_dinov2"
PATCH = 14
TRAIN_IMG_SIZE = 518  # the checkpoints' 37x37 position grid
DEFAULT_INPUT_SIZE = 322
DEFAULT_OUT_DIM = 2048
POS_OFFSET = 0.1  # DINOv2's interpolate_offset
WEIGHTS_HELP = (
    "AstroLoc weights are not shipped with Skyloc: download the checkpoint published by the AstroLoc "
    "authors (Berton, Stoken, Masone, ICCV 2025, arXiv 2502.07003; see models/astroloc.md) and pass its "
    "path, e.g. load_encoder('astroloc', weights='astroloc.pth'). Any MegaLoc/SALAD-layout checkpoint "
    "also loads."
)


class Aggregator(nn.Module):
    """SALAD, then (AstroLoc/MegaLoc) a linear projection; output L2-normalised."""

    def __init__(self, salad: SaladConfig, out_dim: int | None):
        super().__init__()
        self.agg = SALAD(salad)
        self.linear = nn.Linear(salad.out_dim, out_dim) if out_dim else None
        self.out_dim = out_dim or salad.out_dim

    def forward(self, features: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        x = self.agg(features, token)
        if self.linear is not None:
            x = self.linear(x)
        return F.normalize(x, p=2, dim=-1)


def dinov2_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """(1, 1+M*M, C) -> (1, 1+grid_h*grid_w, C) as DINOv2 resamples: bicubic, no antialias, offset 0.1."""
    m = math.isqrt(pos_embed.shape[1] - 1)
    if grid_h == m and grid_w == m:
        return pos_embed
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]
    grid = grid.reshape(1, m, m, -1).permute(0, 3, 1, 2).float()
    scale = ((grid_h + POS_OFFSET) / m, (grid_w + POS_OFFSET) / m)
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False, antialias=False)
    if grid.shape[-2:] != (grid_h, grid_w):
        raise RuntimeError(f"position grid resampled to {tuple(grid.shape[-2:])}, wanted {(grid_h, grid_w)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1).to(pos_embed.dtype)
    return torch.cat([cls_pos, grid], dim=1)


class AstroLocNet(nn.Module):
    """Normalised image (B, 3, H, W), H and W multiples of 14 -> (B, out_dim) L2-normalised."""

    def __init__(
        self,
        salad: SaladConfig | None = None,
        out_dim: int | None = DEFAULT_OUT_DIM,
        pos_interp: str = "dinov2",
        init_weights: bool = True,
    ):
        """``init_weights=False`` skips timm's (slow) ViT initialisation when a checkpoint overwrites it."""
        super().__init__()
        import timm

        if pos_interp not in ("dinov2", "timm"):
            raise InputError(f"pos_interp must be 'dinov2' or 'timm', got {pos_interp!r}")
        salad = salad or SaladConfig()
        self.backbone = timm.create_model(
            VIT_NAME,
            pretrained=False,
            img_size=TRAIN_IMG_SIZE,
            dynamic_img_size=True,
            num_classes=0,
            weight_init="" if init_weights else "skip",
        )
        if not init_weights:  # timm leaves these as torch.empty when skipping its init: no garbage, ever
            for param in (self.backbone.cls_token, self.backbone.pos_embed, self.backbone.reg_token):
                if param is not None:
                    nn.init.zeros_(param)
        if salad.num_channels != self.backbone.embed_dim:
            raise WeightsError(
                f"SALAD expects {salad.num_channels} channels, ViT-B gives {self.backbone.embed_dim}"
            )
        self.aggregator = Aggregator(salad, out_dim)
        self.pos_interp = pos_interp
        self.dim = self.aggregator.out_dim

    def extra_repr(self) -> str:
        return f"pos_interp={self.pos_interp}, dim={self.dim}"

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Normalised ViT tokens (B, 1 + h*w, C) (CLS first) and the patch grid (h, w)."""
        vit = self.backbone
        if self.pos_interp == "timm":
            out = vit.forward_features(x)
            return out, x.shape[-2] // PATCH, x.shape[-1] // PATCH
        patches = vit.patch_embed(x)  # (B, h, w, C): timm's dynamic-size patch embedding is NHWC
        grid_h, grid_w = int(patches.shape[1]), int(patches.shape[2])
        t = torch.cat([vit.cls_token.expand(patches.shape[0], -1, -1), patches.flatten(1, 2)], dim=1)
        t = t + dinov2_pos_embed(vit.pos_embed, grid_h, grid_w)
        t = vit.norm_pre(vit.patch_drop(vit.pos_drop(t)))
        return vit.norm(vit.blocks(t)), grid_h, grid_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, grid_h, grid_w = self.tokens(x)
        cls_token, patches = t[:, 0], t[:, 1:]
        fmap = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], grid_h, grid_w)
        return self.aggregator(fmap, cls_token)


def check_input_size(size: int, num_clusters: int = 64) -> int:
    """A usable ViT-B/14 + SALAD input side: a multiple of 14 with more patches than clusters."""
    if size % PATCH:
        lower = max(PATCH, size // PATCH * PATCH)
        raise InputError(
            f"input_size must be a multiple of {PATCH} (e.g. {lower} or {lower + PATCH}), got {size}"
        )
    if (size // PATCH) ** 2 <= num_clusters or size > 2044:
        smallest = (math.isqrt(num_clusters) + 1) * PATCH
        raise InputError(
            f"input_size must be between {smallest} and 2044 for {num_clusters} clusters, got {size}"
        )
    return size


def astroloc_from_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[AstroLocNet, LoadReport]:
    """Build the network whose shapes the checkpoint implies (SALAD config, linear or not) and load it."""
    mapped = map_keys(state_dict)
    salad, out_dim = infer_salad_config(mapped)
    net = AstroLocNet(salad, out_dim, init_weights=False)
    report = load_into(net, mapped)
    return net.eval(), report


def _size_suffix(size: int) -> str:
    return "" if size == DEFAULT_INPUT_SIZE else f"@{size}"


def _encoder(
    net: AstroLocNet, name: str, model_id: str, size: int, report: LoadReport | None = None
) -> TorchEncoder:
    pre = Preprocess(size, IMAGENET_MEAN, IMAGENET_STD)
    return TorchEncoder(
        net.eval(), name=name, model_id=model_id, dim=net.dim, preprocess=pre, load_report=report
    )


def build_astroloc(
    weights: str | os.PathLike | None,
    input_size: int | None = None,
    sha256: str | None = None,
) -> TorchEncoder:
    """AstroLoc (or any MegaLoc/SALAD-layout checkpoint) from a local file; its LoadReport is ``.load_report``."""
    if not weights:
        raise WeightsError(WEIGHTS_HELP)
    size = input_size or DEFAULT_INPUT_SIZE
    check_input_size(size, num_clusters=0)  # fail fast on the multiple of 14, before reading the file
    net, report = astroloc_from_state_dict(load_checkpoint(weights, expected_sha256=sha256))
    check_input_size(size, net.aggregator.agg.config.num_clusters)
    model_id = f"{NAME}{_size_suffix(size)}/sha256:{sha256_file(weights)[:8]}"
    return _encoder(net, NAME, model_id, size, report)


def build_astroloc_random(input_size: int | None = None, seed: int = 0) -> TorchEncoder:
    """Same architecture with random weights from a fixed seed: the benchmark's floor, never a real model."""
    size = check_input_size(input_size or DEFAULT_INPUT_SIZE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = AstroLocNet()
    # DINOv2's own init_values=1.0: with timm's 1e-5 the random blocks would be bypassed, leaving a
    # patch-embedding + SALAD floor and an ONNX parity check that never exercises attention.
    with torch.no_grad():
        for name, param in net.backbone.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                param.fill_(1.0)
    model_id = f"{RANDOM_NAME}{_size_suffix(size)}/random-seed:{seed}"
    return _encoder(net, RANDOM_NAME, model_id, size)
