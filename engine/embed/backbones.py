"""Feature-map backbones: a window of raster pixels -> a grid of cell vectors (C, h, w), one per stride cell.

- :class:`EffnetBackbone` (the default, offline): ImageNet EfficientNet-Lite0 from the wheel, its last
  stride-16 stage (112 channels, one cell per 16x16 pixels) of any RGB raster (Sentinel-2 stacks through
  their B4, B3, B2 bands). Windows of 64 cells with 12 cells of context on each side.
- :class:`GairBackbone`: GAIR's CROMA optical ViT-B/8 on 10 Sentinel-2 bands, 96x96-pixel windows (12x12
  cells of 8 pixels, as trained) with 3 cells of context on each side.

Context: a cell's vector depends on pixels around it (convolutions, attention), so a window's outer cells
see less than a full neighbourhood. Each window keeps only its inner cells (``margin`` cells from its
edges, except along the raster's own edges): cells are then computed with the context they would have had
in one pass over the whole raster, and no seam appears at window borders (tests/test_embed.py checks it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from .raster import EmbedRaster


class Backbone(Protocol):
    model_id: str
    channels: int
    stride: int  # raster pixels per cell side
    window_cells: int  # cells per window side, context included
    margin_cells: int  # context cells dropped on each side of a window
    fixed_window: bool  # the network needs exactly window_cells (ViT trained at one size)

    def check(self, raster: EmbedRaster) -> None:
        """InputError when this backbone cannot use the raster (bands)."""

    def read(
        self, raster: EmbedRaster, col0: int, row0: int, width: int, height: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Model input for a pixel window (any layout the backbone wants) and its (height, width) validity."""
        ...

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """Model input of ``read`` -> (C, size/stride, size/stride) float32."""
        ...


# --------------------------------------------------------------------------------------------- default


class _Trunk(torch.nn.Module):
    """EfficientNet-Lite0 up to its last stride-16 block: (B, 3, S, S) -> (B, 112, S/16, S/16).

    A module of its own so that it exports to ONNX; the blocks after it (stride 32, conv head) never run.
    """

    def __init__(self, trunk: torch.nn.Module, last_block: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.last_block = last_block

    def extra_repr(self) -> str:
        return f"last_block={self.last_block}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        x = t._swish(t._bn0(t._conv_stem(x)))
        for block in list(t._blocks)[: self.last_block + 1]:
            x = block(x)
        return x


class EffnetBackbone:
    """EfficientNet-Lite0 (ImageNet, shipped in a wheel) stride-16 feature map of RGB rasters.

    Why the stride-16 stage (block 10, 112 channels) and not the 1280-channel conv head: on the NAIP samples,
    with water/land labels from NDWI, a click's heatmap separates the clicked class from the other with
    ROC AUC 0.62-0.71 (conv head: 0.50-0.63), at twice the spatial detail and a third of the memory
    (one-off measurement, 8 clicks per class and date, 300 m around each click left out).

    Full windows (1024 x 1024 px) run through ONNX Runtime (exported once, cached like the retrieval
    encoders): 0.5-0.9 s per window against 2.5-3 s for PyTorch on 2 shared cores, max abs difference 3e-5.
    Other sizes (rasters smaller than a window) run in PyTorch.
    """

    stride = 16
    #: 1024-px windows keeping 12 cells (192 px) of context (tests/test_embed.py: cells at a seam agree
    #: with one pass over the whole raster; without the context they do not).
    window_cells = 64
    margin_cells = 12
    fixed_window = False

    def __init__(self, backend: str = "onnx") -> None:
        from ..nets.checkpoints import sha256_file
        from ..nets.effnet_gem import (
            S16_DIM,
            S16_LAST_BLOCK,
            TF_LITE_MEAN,
            TF_LITE_STD,
            EffnetGem,
            load_effnet_weights,
            wheel_weights_path,
        )

        path = wheel_weights_path()
        self.net = EffnetGem("gem")
        load_effnet_weights(self.net, path)
        self.net.eval()
        self.mean = torch.tensor(TF_LITE_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(TF_LITE_STD).view(1, 3, 1, 1)
        self.channels = S16_DIM
        self.trunk = _Trunk(self.net.trunk, S16_LAST_BLOCK).eval()
        self.model_id = f"effnet-lite0-s16/sha256:{sha256_file(path)[:8]}"
        self.backend = backend
        self._session: object | None = None

    def _onnx(self) -> object:
        """The ONNX Runtime session for full windows, exported on first use (atomic, cached on disk).

        The cached file is used only if it matches the sha256 recorded at export (a corrupt or truncated
        cache file is exported again instead of failing every run), and once more if onnxruntime refuses it.
        """
        if self._session is None:
            import onnxruntime as ort

            from ..nets.onnx_backend import cached_onnx, export_onnx, onnx_path_for

            size = self.window_cells * self.stride
            path = cached_onnx(self.trunk, size, onnx_path_for(self.trunk, self.model_id, size))
            try:
                self._session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            except Exception:  # onnxruntime's own error types: a file it cannot load although hashed
                export_onnx(self.trunk, size, path)
                self._session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return self._session

    def check(self, raster: EmbedRaster) -> None:  # any raster GeoTiffSource can render as RGB
        return None

    def read(
        self, raster: EmbedRaster, col0: int, row0: int, width: int, height: int
    ) -> tuple[np.ndarray, np.ndarray]:
        return raster.read_rgb(col0, row0, width, height)

    def _tensor(self, rgb: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True)).permute(2, 0, 1)[None].float() / 255.0
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def features(self, pixels: np.ndarray) -> np.ndarray:
        full = self.window_cells * self.stride
        if self.backend == "onnx" and pixels.shape[:2] == (full, full):
            session = self._onnx()
            inputs = {session.get_inputs()[0].name: self._tensor(pixels).numpy()}  # type: ignore[attr-defined]
            from ..nets.onnx_backend import shrinking_run_options

            (out,) = session.run(None, inputs, shrinking_run_options())
            return out[0]
        return self.trunk(self._tensor(pixels))[0].numpy()

    @torch.inference_mode()
    def photo_vector(self, rgb: np.ndarray, max_side: int = 512) -> np.ndarray:
        """A photo's mean feature vector (same space as the cells), longer side resized to ``max_side``."""
        x = self._tensor(rgb)
        scale = max_side / max(x.shape[-2:])
        if scale < 1:
            x = F.interpolate(x, scale_factor=scale, mode="bilinear", antialias=True, align_corners=False)
        return self.trunk(x)[0].mean(dim=(1, 2)).numpy()


# ----------------------------------------------------------------------------------------------- GAIR

#: Sentinel-2 band names GAIR's CROMA encoder reads, in its order.
S2_BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
#: 0-based positions of those bands in common full stacks (REFERENCE.md): L2A without B10 (12 bands),
#: L1C with B10 (13 bands), or already the 10 bands in order.
S2_STACK_POSITIONS = {
    12: (1, 2, 3, 4, 5, 6, 7, 8, 10, 11),
    13: (1, 2, 3, 4, 5, 6, 7, 8, 11, 12),
    10: tuple(range(10)),
}
_BAND_NAME = re.compile(r"(?:^|[^a-z0-9])b0?(\d{1,2}a?)(?:$|[^a-z0-9])", re.IGNORECASE)


def s2_band_numbers(descriptions: Sequence[str | None], count: int, bands: Sequence[int] | None) -> list[int]:
    """1-based raster bands holding B2..B12 in GAIR's order: from ``bands``, band names, or the band count."""
    if bands is not None:
        picked = [int(b) for b in bands]
        if len(picked) != 10 or any(not 1 <= b <= count for b in picked):
            raise InputError(
                f"--bands for GAIR needs 10 band numbers between 1 and {count} "
                f"(the raster's {', '.join(S2_BANDS)}), got {picked}"
            )
        return picked
    names: dict[str, int] = {}
    for i, desc in enumerate(descriptions):
        m = _BAND_NAME.search(desc or "")
        if m:
            names.setdefault("B" + m.group(1).upper().lstrip("0"), i + 1)
    if all(b in names for b in S2_BANDS):
        return [names[b] for b in S2_BANDS]
    if count in S2_STACK_POSITIONS:
        return [p + 1 for p in S2_STACK_POSITIONS[count]]
    raise InputError(
        f"GAIR's encoder needs the 10 Sentinel-2 bands {', '.join(S2_BANDS)}; this raster has {count} band(s) "
        "without those names. Name the bands (B2...B12), give a 10/12/13-band Sentinel-2 stack, or pass "
        "--bands with the 10 band numbers; RGB rasters work with the default model"
    )


class GairBackbone:
    """GAIR's CROMA optical ViT-B/8 patch grid of Sentinel-2 stacks (needs the published checkpoint)."""

    stride = 8
    window_cells = 12
    margin_cells = 3
    fixed_window = True

    def __init__(self, model: object, model_id: str, bands: Sequence[int] | None = None) -> None:
        self.model = model
        self.model_id = model_id
        self.channels = 768
        self.bands_arg = bands
        self._bands: dict[str, list[int]] = {}  # per raster path: the model is shared between rasters

    def check(self, raster: EmbedRaster) -> None:
        self._bands[raster.path] = s2_band_numbers(raster.descriptions, raster.count, self.bands_arg)

    def bands_of(self, raster: EmbedRaster) -> list[int]:
        """1-based bands of ``raster`` holding GAIR's 10 Sentinel-2 bands, in its order."""
        if raster.path not in self._bands:
            self.check(raster)
        return self._bands[raster.path]

    def read(
        self, raster: EmbedRaster, col0: int, row0: int, width: int, height: int
    ) -> tuple[np.ndarray, np.ndarray]:
        from ..nets.croma import normalize_s2

        data, valid = raster.read_bands(self.bands_of(raster), col0, row0, width, height)
        return normalize_s2(data), valid

    @torch.inference_mode()
    def features(self, pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(pixels, np.float32))[None]
        return self.model.rs_patch_grid(x)[0].numpy()  # type: ignore[attr-defined]
