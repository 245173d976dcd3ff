"""GAIR's street-view (ground photo) encoder: a Hugging Face ``ViTModel``, ViT-B/16 at 224 px, pooler output.

- Architecture: ``transformers.ViTModel(ViTConfig(224, patch 16, 768, 12 layers, 12 heads, MLP 3072,
  exact GELU, LayerNorm eps 1e-12), add_pooling_layer=True)``, the configuration GAIR builds.
- Output: the pooler, ``tanh(dense(CLS token after the final layernorm))``, 768-d, not normalised. GAIR
  projects it with ``optical_proj`` for retrieval (see ``engine.nets.gair``).
- Input: RGB resized to 224 x 224 (square, aspect ratio not kept) with bilinear interpolation and
  antialiasing (what ``torchvision.transforms.Resize((224, 224))`` does to a tensor); then, on the 0-255
  scale, ``(x - (135.47, 142.29, 145.12)) / (59.20, 59.35, 72.02)``. GAIR's exact resize in its data
  pipeline was not available to check.

Key layouts: GAIR's checkpoint was saved with transformers 4.x names (``embeddings.*``,
``encoder.layer.N.attention.attention.{query,key,value}``, ``attention.output.dense``,
``intermediate.dense``, ``output.dense``, ``layernorm_before/after``, ``layernorm``, ``pooler.dense``).
transformers 5 renamed the layers (``layers.N.attention.{q,k,v,o}_proj``, ``mlp.fc1/fc2``) and converts only
inside ``from_pretrained``. :func:`to_model_layout` maps either layout onto the installed ``ViTModel``.

``transformers`` is imported lazily (it takes seconds to import).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import InputError

SV_SIZE = 224
SV_DIM = 768
SV_MEAN = (135.47, 142.29, 145.12)  # on the 0-255 scale
SV_STD = (59.20, 59.35, 72.02)

# transformers 4.x ("legacy") -> 5.x names, per layer; applied in this order (mirrors transformers' own table)
_LEGACY_TO_V5 = (
    (re.compile(r"^encoder\.layer\.(\d+)\."), r"layers.\1."),
    (re.compile(r"\.attention\.attention\.(query|key|value)\."), None),  # -> attention.{q,k,v}_proj
    (re.compile(r"\.attention\.output\.dense\."), ".attention.o_proj."),
    (re.compile(r"\.intermediate\.dense\."), ".mlp.fc1."),
    (re.compile(r"\.output\.dense\."), ".mlp.fc2."),
)
_QKV = {"query": "q", "key": "k", "value": "v"}
_V5_TO_LEGACY = (
    (re.compile(r"^layers\.(\d+)\."), r"encoder.layer.\1."),
    (re.compile(r"\.attention\.([qkv])_proj\."), None),  # -> attention.attention.{query,key,value}
    (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
    (re.compile(r"\.mlp\.fc1\."), ".intermediate.dense."),
    (re.compile(r"\.mlp\.fc2\."), ".output.dense."),
)
_QKV_BACK = {v: k for k, v in _QKV.items()}


def vit_b16_config():
    """GAIR's ``ViTConfig`` for the street-view encoder (dropouts are irrelevant in eval mode)."""
    from transformers import ViTConfig

    return ViTConfig(
        image_size=SV_SIZE,
        patch_size=16,
        num_channels=3,
        hidden_size=SV_DIM,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        qkv_bias=True,
    )


def build_sv_encoder() -> nn.Module:
    """An untrained ``ViTModel`` with the pooler, in eval mode; load GAIR's ``sv_encoder.*`` into it."""
    from transformers import ViTModel

    return ViTModel(vit_b16_config(), add_pooling_layer=True).eval()


def _rename(key: str, rules, qkv: Mapping[str, str], qkv_fmt: str) -> str:
    for pattern, repl in rules:
        if repl is None:
            key = pattern.sub(lambda m: qkv_fmt.format(qkv[m.group(1)]), key)
        else:
            key = pattern.sub(repl, key)
    return key


def to_model_layout(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """ViT keys (no ``sv_encoder.`` prefix) in either transformers layout -> the names ``model`` uses."""
    own = model.state_dict().keys()
    model_is_v5 = any(k.startswith("layers.") for k in own)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if model_is_v5 and key.startswith("encoder.layer."):
            key = _rename(key, _LEGACY_TO_V5, _QKV, ".attention.{}_proj.")
        elif not model_is_v5 and key.startswith("layers."):
            key = _rename(key, _V5_TO_LEGACY, _QKV_BACK, ".attention.attention.{}.")
        out[key] = value
    return out


def to_legacy_layout(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ViT keys in either layout -> transformers 4.x names (the layout of GAIR's checkpoint)."""
    return {
        (
            _rename(k, _V5_TO_LEGACY, _QKV_BACK, ".attention.attention.{}.") if k.startswith("layers.") else k
        ): v
        for k, v in state.items()
    }


def preprocess_photo(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, 224, 224) float32, resized (bilinear, antialiased) and normalised."""
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise InputError(f"expected an (H, W, 3) uint8 RGB photo, got {arr.dtype} {arr.shape}")
    if min(arr.shape[:2]) < 2:
        raise InputError(f"photo too small: {arr.shape[1]}x{arr.shape[0]} px")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None].float()
    if x.shape[-2:] != (SV_SIZE, SV_SIZE):
        x = F.interpolate(x, size=(SV_SIZE, SV_SIZE), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(SV_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(SV_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def encode_photo(model: nn.Module, rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (768,) float32: the ViT pooler output (CLS -> dense -> tanh), not normalised."""
    param = next(model.parameters())
    x = preprocess_photo(rgb).to(device=param.device, dtype=param.dtype)
    out = model(pixel_values=x)
    return out.pooler_output[0].float().cpu().numpy()
