"""A folder of photos in, one footprint layer out: progress, per-photo outputs, and resume.

Each finished photo is recorded at once in ``<OUT>.parts/`` (one small JSON per photo). The layer itself is
written atomically at the end, from those records, and the parts folder is removed. If the run is
interrupted (Ctrl-C, a cancelled job, a crash), the records stay; running the same command again skips the
photos already done, as long as the settings are the same (a fingerprint of them is kept beside the
records; other settings start afresh).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path
from ..errors import CancelledError, InputError, SkylocError
from ..progress import CancelToken, ProgressFn, no_progress
from ..tiles.base import CORNER_ORDER
from ..vector_io import driver_for, write_polygons
from .estimate import CandidateCheck, Footprint
from .outputs import write_geotiff, write_points

FOOTPRINT_LAYER = "footprints"

#: ``locate(photo_path) -> (Footprint, rgb or None)``: the per-photo work, supplied by the API.
Locate = Callable[[Path], tuple[Footprint, np.ndarray | None]]


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _record_name(i: int, photo: Path) -> str:
    digest = hashlib.sha256(str(photo.resolve()).encode()).hexdigest()[:12]
    return f"{i:06d}-{digest}.json"


def _load(record: Path) -> Footprint | None:
    try:
        data = json.loads(record.read_text())
        checks = [CandidateCheck(**c) for c in data.pop("checks", [])]
        fp = Footprint(**data)
        fp.checks = checks
        return fp
    except (OSError, ValueError, TypeError):
        return None  # a record cut short by a crash: that photo is simply done again


def run_batch(
    photos: Sequence[Path],
    out: str | os.PathLike[str],
    locate: Locate,
    settings: dict[str, Any],
    *,
    georef_dir: str | os.PathLike[str] | None = None,
    geotiff: str | None = None,
    points: str | None = None,
    resume: bool = True,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> list[Footprint]:
    """Localize every photo, write per-photo GeoTIFF/.points, then the layer; resumable (see module doc).

    ``geotiff``/``points`` name the files for a single photo; otherwise each localized photo gets
    ``<georef_dir>/<photo stem>.tif`` and ``<photo stem>.points`` (no georef_dir: none written).
    """
    out = Path(out)
    driver_for(out)  # refuse a bad extension before any work
    if (geotiff or points) and len(photos) != 1:
        raise InputError("--geotiff/--points name the files of ONE photo; for several use --georef-dir")
    parts = parts_dir(out)
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    stamp = parts / "settings.json"
    if parts.exists() and (
        not resume or not stamp.exists() or json.loads(stamp.read_text()).get("fp") != fingerprint
    ):
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    if not stamp.exists():
        stamp.write_text(json.dumps({"fp": fingerprint, "settings": settings}, default=str))

    results: list[Footprint] = []
    resumed = 0
    for i, photo in enumerate(photos):
        record = parts / _record_name(i, photo)
        done = _load(record) if record.exists() else None
        if done is not None:
            results.append(done)
            resumed += 1
            continue
        if cancel is not None:
            cancel.check()
        progress(i / len(photos), f"photo {i + 1} of {len(photos)}: {photo.name}")
        try:
            fp, rgb = locate(photo)
        except CancelledError:
            raise
        except SkylocError as exc:
            fp, rgb = Footprint(photo=str(photo), status="error", reason=f"{exc.code}: {exc.message}"), None
        if fp.status == "localized" and rgb is not None:
            _write_georef(fp, rgb, photo, georef_dir, geotiff, points)
        with atomic_path(record, suffix=".json") as tmp:
            tmp.write_text(json.dumps(asdict(fp), default=str))
        results.append(fp)
    progress(1.0, f"writing {out.name}" + (f" ({resumed} photos resumed)" if resumed else ""))
    write_footprints(out, results)
    shutil.rmtree(parts, ignore_errors=True)
    return results


def _write_georef(
    fp: Footprint,
    rgb: np.ndarray,
    photo: Path,
    georef_dir: str | os.PathLike[str] | None,
    geotiff: str | None,
    points: str | None,
) -> None:
    h = np.array(fp.h)
    if georef_dir is not None:
        folder = Path(georef_dir)
        geotiff = geotiff or str(folder / f"{photo.stem}.tif")
        points = points or str(folder / f"{photo.stem}.points")
    if geotiff:
        fp.geotiff = str(write_geotiff(geotiff, rgb, h, fp.crs))
    if points:
        fp.points = str(write_points(points, h, rgb.shape[:2], fp.crs))


def write_footprints(out: str | os.PathLike[str], results: Sequence[Footprint]) -> Path:
    """One feature per photo (no geometry when not localized), EPSG:4326; field names fit a Shapefile."""
    order = ",".join(CORNER_ORDER)
    return write_polygons(
        out,
        [r.polygon() for r in results],
        {
            "photo": [r.photo for r in results],
            "photo_name": [Path(r.photo).name for r in results],
            "status": [r.status for r in results],
            "reason": [r.reason for r in results],
            "inliers": np.array([r.inliers for r in results], dtype=np.int32),
            "verified": np.array([r.verified for r in results], dtype=np.int32),
            "confidence": np.array([r.confidence for r in results], dtype=np.float64),
            "candidate": [r.candidate for r in results],
            "cand_rank": np.array([r.candidate_rank or 0 for r in results], dtype=np.int32),
            "tile_id": np.array([-1 if r.tile_id is None else r.tile_id for r in results], dtype=np.int64),
            "corner_ord": [order if r.corners_lonlat else None for r in results],
            "corners": [json.dumps(r.corners_lonlat) if r.corners_lonlat else None for r in results],
            "src_crs": [r.crs for r in results],
            "geotiff": [r.geotiff for r in results],
            "points": [r.points for r in results],
            "seconds": np.array([r.seconds for r in results], dtype=np.float64),
        },
        layer=FOOTPRINT_LAYER,
    )
