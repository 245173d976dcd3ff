"""Colour: which bands are red, green and blue, and how wider-than-8-bit data becomes uint8.

One home for the rules every reader applies (GeoTIFF tiles, photos stored as rasters, heatmap windows,
coregistration views), so that the same ground value gives the same colour wherever it is read.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InputError

log = logging.getLogger("skyloc.imagery")


def percentile_stretch_params(
    values: np.ndarray, low: float = 2.0, high: float = 98.0
) -> tuple[float, float]:
    """``(lo, hi)`` percentiles of the finite values, for a linear stretch to 0..255 (hi > lo always)."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, [low, high]))
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def apply_stretch(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``lo..hi`` linearly to 0..255 as uint8 (clipped; non-finite values become 0)."""
    scaled = (np.asarray(values, dtype=np.float32) - lo) * (255.0 / (hi - lo))
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


Stretch = tuple[tuple[float, float], ...] | None  # per band (lo, hi); None: uint8 data, kept as is

_COLOR_WORD = {"red": 0, "green": 1, "blue": 2}
_WORD_RE = re.compile(r"\b(red|green|blue)\b")
# Sentinel-2 (B04, B03, B02) and Landsat 8/9 (B4, B3, B2, also "SR_B4") names; Landsat 4-7 number
# their bands differently (red is B3 there), which a name alone cannot tell: pass bands= for those.
_BNAME_RE = re.compile(r"(?:^|[^a-z0-9])b0?([234])$")
_BNAME_SLOT = {"4": 0, "3": 1, "2": 2}


def _slots_from(descriptions: Sequence[str | None], pick: Any) -> tuple[int, int, int] | None:
    """1-based (red, green, blue) when ``pick(description) -> slot`` finds each colour exactly once."""
    slots: dict[int, int] = {}
    for index, desc in enumerate(descriptions, start=1):
        slot = pick((desc or "").strip().lower())
        if slot is not None:
            if slot in slots:
                return None  # ambiguous: two bands claim the same colour
            slots[slot] = index
    if len(slots) != 3:
        return None
    return slots[0], slots[1], slots[2]


def _word_slot(desc: str) -> int | None:
    if "edge" in desc:  # Sentinel-2 "red edge" bands are not red
        return None
    words = set(_WORD_RE.findall(desc))
    return _COLOR_WORD[words.pop()] if len(words) == 1 else None


def _bname_slot(desc: str) -> int | None:
    match = _BNAME_RE.search(desc)
    return _BNAME_SLOT[match.group(1)] if match else None


def choose_rgb_bands(ds: Any, bands: Sequence[int] | None = None) -> tuple[int, int, int]:
    """The 1-based band indexes read as (red, green, blue), first rule that applies:

    1. ``bands`` given by the user (3 indexes, or 1 to show as gray);
    2. band descriptions naming red/green/blue, or Sentinel-2 / Landsat 8-9 names B4, B3, B2 (also B04,
       SR_B4);
    3. colour interpretation red/green/blue (an RGB GeoTIFF, an RGBA with alpha);
    4. the first 3 non-alpha bands (NAIP's R, G, B, NIR -> 1, 2, 3); 1 or 2 bands: the first as gray.

    Descriptions come before the colour interpretation because GDAL writes red/green/blue for ANY 3- or
    4-band byte GeoTIFF created with default options, whatever the bands hold, whereas a description is
    set on purpose. Rule 4 is a guess: a file stored as B, G, R without metadata comes out with red and
    blue swapped (pass ``bands``); it is logged as a warning (a service job lists it in its ``warnings``).
    """
    from rasterio.enums import ColorInterp  # here: reading a JPEG photo must not import rasterio

    if bands is not None:
        return _explicit_bands(ds, bands)
    found = _slots_from(ds.descriptions, _word_slot) or _slots_from(ds.descriptions, _bname_slot)
    if found:
        return found
    interp = list(ds.colorinterp)
    by_interp = {ci: i for i, ci in enumerate(interp, start=1)}
    if all(ci in by_interp for ci in (ColorInterp.red, ColorInterp.green, ColorInterp.blue)):
        return by_interp[ColorInterp.red], by_interp[ColorInterp.green], by_interp[ColorInterp.blue]
    usable = [i for i, ci in enumerate(interp, start=1) if ci != ColorInterp.alpha] or [1]
    if len(usable) >= 3:
        log.warning(
            "%s: band order guessed: bands %d,%d,%d read as red, green, blue (no band names or colour "
            "interpretation say which is which; give the bands to choose)",
            getattr(ds, "name", "raster"),
            *usable[:3],
        )
        return usable[0], usable[1], usable[2]
    return usable[0], usable[0], usable[0]


def _explicit_bands(ds: Any, bands: Sequence[int]) -> tuple[int, int, int]:
    picked = tuple(int(b) for b in bands)
    if len(picked) not in (1, 3):
        raise InputError(f"{ds.name}: bands must be 3 band numbers (red, green, blue) or 1, got {bands!r}")
    bad = [b for b in picked if not 1 <= b <= ds.count]
    if bad:
        raise InputError(f"{ds.name}: band(s) {bad} do not exist; the raster has bands 1..{ds.count}")
    return (picked * 3)[:3] if len(picked) == 1 else picked  # type: ignore[return-value]


def compute_stretch(data: np.ndarray, valid: np.ndarray) -> Stretch:
    """Per-band 2-98 % percentiles over valid pixels of ``data`` (C, H, W); None for uint8 (kept as is)."""
    if data.dtype == np.uint8:
        return None
    return tuple(percentile_stretch_params(band[valid]) for band in data)


def apply_band_stretch(data: np.ndarray, stretch: Stretch) -> np.ndarray:
    """(C, H, W) data as uint8 with the given per-band stretch."""
    if stretch is None:
        return data.astype(np.uint8, copy=True)
    return np.stack([apply_stretch(band, lo, hi) for band, (lo, hi) in zip(data, stretch, strict=True)])


def stretch_to_uint8(data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(C, H, W) data to uint8, stretched from its own valid pixels (uint8 kept as is)."""
    return apply_band_stretch(data, compute_stretch(data, valid))
