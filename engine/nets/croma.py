"""CROMA's optical encoder (ViT-B/8 with 2D-ALiBi) as GAIR uses it, and GAIR's Sentinel-2 normalisation.

Architecture (CROMA, Fuller et al. NeurIPS 2023; our own implementation of the published design):

- Patch embedding: 8x8 patches flattened channel-major (``c, i, j``: all 64 pixels of band 1, then band 2,
  ...) -> ``Linear(8*8*10 -> 768)``. No CLS token, no position embedding.
- 12 pre-LN blocks: ``x + Attention(LN(x))`` then ``x + FFN(LN(x))``; attention with 16 heads, one QKV
  projection without bias, and an additive 2D-ALiBi bias: ``-slope_h * ||p_i - p_j||``, the Euclidean distance
  between the (row, col) positions of the two patches times the power-of-2 ALiBi slope of head ``h``
  (``2^(-8 (h+1) / n_heads)``). Position information enters only through that relative bias, so any grid
  size works; the bias is built per grid size and cached.
- FFN: ``Linear(768 -> 3072)``, exact GELU, ``Linear(3072 -> 768)``.
- No final LayerNorm by default: CROMA's and GAIR's training code end the transformer with ``norm_out``, but
  the released GAIR inference encoder has none (its loader dropped the key). ``final_norm=True`` restores it.

Module names reproduce the published key layout (``linear_input``, ``transformer.layers.N.0.{to_qkv, to_out,
input_norm}``, ``transformer.layers.N.1.{net.0, net.3, input_norm}``, ``transformer.norm_out``), so GAIR's
``rs_encoder.s2_encoder.*`` tensors load without renaming.

Cost: attention is quadratic in the number of patches, and the bias alone is ``16 x N^2`` floats
(N = H/8 * W/8): 96x96 -> 144 patches (1.3 MB); 512x512 -> 4096 patches (1 GB). Tile large rasters.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import InputError

PATCH = 8
DIM = 768
DEPTH = 12
HEADS = 16
INPUT_SIZE = 96  # GAIR's training size: a 12 x 12 patch grid

#: GAIR's 10 Sentinel-2 L2A bands, in input order (a 12-band stack without B10: indices 1..8, 10, 11).
S2_BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
#: Per-band mean and std of GAIR's training data (reflectance DN, scale 10000).
S2_MEAN = (1172.94, 1378.08, 1509.33, 1750.03, 2073.28, 2207.33, 2245.16, 2284.64, 2231.73, 1899.19)
S2_STD = (706.63, 720.19, 783.14, 707.20, 714.28, 748.18, 852.36, 762.08, 690.02, 669.90)

_BIAS_CACHE_SIZE = 8


def normalize_s2(stack: np.ndarray) -> np.ndarray:
    """(10, H, W) Sentinel-2 DN in ``S2_BANDS`` order -> float32 in [0, 1], the way GAIR's data were prepared.

    Per band: clip to mean +- 2 std, map that range linearly to 0-255, convert to uint8 (truncation, as
    ``np.clip(x, 0, 255).astype(np.uint8)`` in the SSL4EO-lineage code), divide by 255. NaN (nodata) -> 0.
    No resampling: the caller chooses the size (GAIR was trained on 96 x 96).
    """
    arr = np.asarray(stack)
    if arr.ndim != 3 or arr.shape[0] != len(S2_BANDS):
        raise InputError(
            f"expected a ({len(S2_BANDS)}, H, W) stack of bands {S2_BANDS}, got shape {arr.shape}"
        )
    mean = np.asarray(S2_MEAN, dtype=np.float64)[:, None, None]
    std = np.asarray(S2_STD, dtype=np.float64)[:, None, None]
    lo, hi = mean - 2 * std, mean + 2 * std
    scaled = (np.nan_to_num(arr.astype(np.float64), nan=-np.inf) - lo) / (hi - lo) * 255.0
    as_uint8 = np.floor(np.clip(scaled, 0.0, 255.0))
    return (as_uint8 / 255.0).astype(np.float32)


def alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi head slopes: geometric from ``2^(-8/n)`` for a power-of-2 ``n``, else interleaved (as ALiBi)."""

    def power_of_2(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return power_of_2(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: n_heads - closest]


def alibi_2d(
    h: int, w: int, n_heads: int = HEADS, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """(1, n_heads, h*w, h*w) additive bias ``-slope * distance`` between row-major patch positions."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1).to(torch.float64)
    dist = torch.cdist(pos, pos)  # (N, N) Euclidean, in patch units
    slopes = torch.tensor(alibi_slopes(n_heads), dtype=torch.float64)
    bias = -slopes[:, None, None] * dist[None]
    return bias[None].to(device=device, dtype=dtype or torch.float32)


class Attention(nn.Module):
    """Pre-LN multi-head self-attention with an additive bias; QKV in one bias-free projection."""

    def __init__(self, dim: int = DIM, heads: int = HEADS):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.input_norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.to_qkv(self.input_norm(x)).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, d_head)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale 1/sqrt(d_head)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    """Pre-LN MLP; ``net`` keeps CROMA's indices (0: Linear, 1: GELU, 2: Dropout, 3: Linear)."""

    def __init__(self, dim: int = DIM, mult: int = 4):
        super().__init__()
        self.input_norm = nn.LayerNorm(dim)
        self.net = nn.Sequential(
            nn.Linear(dim, mult * dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(mult * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.input_norm(x))


class Transformer(nn.Module):
    """``layers.N.0`` attention, ``layers.N.1`` FFN, both residual; optional ``norm_out``."""

    def __init__(self, dim: int = DIM, depth: int = DEPTH, heads: int = HEADS, final_norm: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads), FeedForward(dim)]) for _ in range(depth)
        )
        self.norm_out = nn.LayerNorm(dim) if final_norm else None

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        for attn, ffn in self.layers:
            x = x + attn(x, bias)
            x = x + ffn(x)
        return self.norm_out(x) if self.norm_out is not None else x


class CromaOptical(nn.Module):
    """(B, 10, H, W) normalised Sentinel-2, H and W multiples of 8 -> (B, H/8 * W/8, 768) tokens, row-major."""

    def __init__(
        self,
        in_channels: int = len(S2_BANDS),
        dim: int = DIM,
        depth: int = DEPTH,
        heads: int = HEADS,
        final_norm: bool = False,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.dim = dim
        self.heads = heads
        self.linear_input = nn.Linear(PATCH * PATCH * in_channels, dim)
        self.transformer = Transformer(dim, depth, heads, final_norm)
        self._bias_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def extra_repr(self) -> str:
        final = self.transformer.norm_out is not None
        return f"patch={PATCH}, in_channels={self.in_channels}, heads={self.heads}, final_norm={final}"

    def attn_bias(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The 2D-ALiBi bias for an h x w patch grid, cached per (grid, device, dtype)."""
        key = (h, w, str(device), dtype)
        bias = self._bias_cache.get(key)
        if bias is None:
            bias = alibi_2d(h, w, self.heads, device=device, dtype=dtype)
            self._bias_cache[key] = bias
            while len(self._bias_cache) > _BIAS_CACHE_SIZE:
                self._bias_cache.popitem(last=False)
        else:
            self._bias_cache.move_to_end(key)
        return bias

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise InputError(f"expected (B, {self.in_channels}, H, W) Sentinel-2 input, got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if height % PATCH or width % PATCH or not height or not width:
            raise InputError(
                f"input height and width must be positive multiples of {PATCH}, got {height}x{width}"
            )
        return height // PATCH, width // PATCH

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self._grid(x)
        b, c = x.shape[:2]
        # (B, C, h*8, w*8) -> (B, h*w, C*8*8), channel-major inside each patch
        patches = (
            x.reshape(b, c, h, PATCH, w, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * PATCH * PATCH)
        )
        tokens = self.linear_input(patches)
        return self.transformer(tokens, self.attn_bias(h, w, tokens.device, tokens.dtype))

    def patch_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 10, H, W) -> (B, 768, H/8, W/8): the patch tokens laid out as a feature map."""
        h, w = self._grid(x)
        tokens = self.forward(x)
        return tokens.transpose(1, 2).reshape(x.shape[0], self.dim, h, w)
