"""Database tiles from a folder of Web-Mercator XYZ mosaics named ``..._Z_ROW_COL.jpg|jpeg|png``.

Each file is a square mosaic of ``span x span`` XYZ tiles of zoom Z whose top-left tile is (ROW, COL); its
extent comes from the exact XYZ formulas (engine.geo.xyz), whatever the file's pixel size.

Naming convention of the EarthMatch/AstroLoc data (../shared/data/iss): ``surrounding_Z_ROW_COL.jpg`` is
the 3x context of candidate ``cand_Z_ROW_COL.jpg``: tiles ROW-span .. ROW+2*span, COL-span .. COL+2*span,
i.e. its name gives the *candidate's* top-left tile, not its own. Read with a plain span those files would
get a footprint one third of the truth, so they are placed by that convention (``surrounding=True``) unless
the caller turns it off or excludes them (``exclude=["surrounding_*"]``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from ..errors import EmptyInputError, InputError
from ..geo.xyz import mosaic_bounds_3857, mosaic_corners_lonlat, parse_xyz_name
from .base import TileSpec
from .photos import DEFAULT_MAX_PIXELS, read_image

DEFAULT_SPAN = 4
SURROUNDING_PREFIX = "surrounding_"
SURROUNDING_FACTOR = 3
NAME_PATTERN = "<anything>_Z_ROW_COL.jpg|jpeg|png (e.g. cand_14_4726_0344.jpg or 12_1302_0186.png)"

Span = int | Mapping[str, int]


def _folder_span(span: Span, folder: str) -> int:
    """Span for files in ``folder`` (relative, posix, "." for the top level).

    ``span`` is one int for every file, or a mapping from relative folders (or fnmatch globs of them) to
    spans, first match wins, DEFAULT_SPAN for a folder no key matches.
    """
    if not isinstance(span, Mapping):
        return int(span)
    for key, value in span.items():
        if fnmatch.fnmatchcase(folder, key.strip("/") or "."):
            return int(value)
    return DEFAULT_SPAN


def _excluded(rel: PurePosixPath, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(rel.name, p) or fnmatch.fnmatch(rel.as_posix(), p) for p in patterns)


class XyzMosaicSource:
    """Every XYZ mosaic file in a folder, one tile per distinct (z, row, col, span).

    Attributes after construction: ``files`` (kept, sorted), ``duplicates`` ((dropped, kept) path pairs:
    the same mosaic found twice, e.g. one candidate in two photo folders; the first in sorted order is
    kept), ``duplicates_dropped`` (their count) and ``skipped`` ((path, reason) for mosaics that would
    reach beyond the Web-Mercator latitude limit).
    """

    kind = "xyz"

    def __init__(
        self,
        folder: str | Path,
        span: Span = DEFAULT_SPAN,
        exclude: str | Sequence[str] | None = None,
        recursive: bool = False,
        surrounding: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.path = str(folder)
        self.max_pixels = max_pixels
        root = Path(folder)
        if not root.is_dir():
            raise InputError(f"{folder}: no such folder" if not root.exists() else f"{folder}: not a folder")
        patterns = [exclude] if isinstance(exclude, str) else list(exclude or [])
        self.files: list[str] = []
        self.duplicates: list[tuple[str, str]] = []
        self.skipped: list[tuple[str, str]] = []
        self._specs: list[TileSpec] = []
        seen: dict[tuple[int, int, int, int], str] = {}
        for path in _candidate_files(root, recursive):
            rel = PurePosixPath(path.relative_to(root).as_posix())
            parsed = parse_xyz_name(rel.name)
            if parsed is None or _excluded(rel, patterns):
                continue
            z, row, col = parsed
            n = _folder_span(span, rel.parent.as_posix())
            if surrounding and rel.name.lower().startswith(SURROUNDING_PREFIX):
                row, col, n = row - n, col - n, n * SURROUNDING_FACTOR
            if row < 0 or row + n > 2**z or n < 1:
                self.skipped.append((str(path), f"rows {row}..{row + n} are outside 0..{2**z} at zoom {z}"))
                continue
            key = (z, row, col, n)
            if key in seen:
                self.duplicates.append((str(path), seen[key]))
                continue
            seen[key] = str(path)
            self.files.append(str(path))
            self._specs.append(_spec(str(path), z, row, col, n))
        if not self._specs:
            where = " (and its subfolders)" if recursive else ""
            excl = f", excluding {patterns}" if patterns else ""
            raise EmptyInputError(f"{folder}{where} holds no XYZ mosaic named {NAME_PATTERN}{excl}")

    @property
    def duplicates_dropped(self) -> int:
        return len(self.duplicates)

    def specs(self) -> list[TileSpec]:
        return list(self._specs)

    def read(self, spec: TileSpec, size: int) -> np.ndarray:
        """The mosaic image as (size, size, 3) uint8: area-aware Lanczos when shrinking, bilinear when growing."""
        rgb = read_image(spec.source, max_pixels=self.max_pixels)
        h, w = rgb.shape[:2]
        if (h, w) == (size, size):
            return rgb
        shrinking = size < min(h, w)
        resample = Image.Resampling.LANCZOS if shrinking else Image.Resampling.BILINEAR
        return np.asarray(Image.fromarray(rgb).resize((size, size), resample), dtype=np.uint8)

    def close(self) -> None:
        """Nothing held open: each read opens its file."""

    def __enter__(self) -> XyzMosaicSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _candidate_files(root: Path, recursive: bool) -> Iterable[Path]:
    paths = root.rglob("*") if recursive else root.iterdir()
    return sorted((p for p in paths if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def _spec(path: str, z: int, row: int, col: int, span: int) -> TileSpec:
    corners = mosaic_corners_lonlat(z, row, col, span)
    return TileSpec(
        source=path,
        kind="xyz",
        scale=span,
        zoom=z,
        window=None,
        crs="EPSG:3857",
        bounds=mosaic_bounds_3857(z, row, col, span),
        corners_lonlat=corners,
        # Web-Mercator edges are meridians and parallels: the 4 corners are the exact outline in lon/lat.
        footprint_lonlat=(*corners, corners[0]),
        xyz=(z, row, col),
    )
