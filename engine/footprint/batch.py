"""A folder of photos in, one footprint layer out: progress, per-photo outputs, and resume.

Each finished photo is recorded at once in ``<OUT>.parts/`` (one small JSON per photo). The layer itself is
written atomically at the end, from those records, and the parts folder is removed. If the run is
interrupted (Ctrl-C, a cancelled job, a crash), the records stay; running the same command again skips the
photos already done, as long as the settings are the same (a fingerprint of them is kept beside the
records; other settings start afresh).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path
from ..errors import CancelledError, InputError, SkylocError, os_errors_as_user_errors
from ..imagery.base import CORNER_ORDER
from ..locking import output_lock
from ..output_guard import check_output
from ..progress import CancelToken, ProgressFn, no_progress
from ..vector_io import driver_for, write_polygons
from .estimate import CandidateCheck, Footprint
from .outputs import write_geotiff, write_points

FOOTPRINT_LAYER = "footprints"

#: ``locate(photo_path) -> (Footprint, rgb or None)``: the per-photo work, supplied by the API. A locate
#: with a ``progress`` parameter gets a ProgressFn for its photo (0..1 of that photo's share of the batch).
Locate = Callable[[Path], tuple[Footprint, np.ndarray | None]]


def _call_locate(locate: Locate, photo: Path, progress: ProgressFn) -> tuple[Footprint, np.ndarray | None]:
    try:
        takes_progress = "progress" in inspect.signature(locate).parameters
    except (TypeError, ValueError):  # a callable without a signature
        takes_progress = False
    return locate(photo, progress=progress) if takes_progress else locate(photo)  # type: ignore[call-arg]


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
    inputs: Sequence[str | os.PathLike[str]] = (),
    overwrite: bool = False,
    resume: bool = True,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> list[Footprint]:
    """Localize every photo, write per-photo GeoTIFF/.points, then the layer; resumable (see module doc).

    ``geotiff``/``points`` name the files for a single photo; otherwise each localized photo gets
    ``<georef_dir>/<photo file name>.tif`` and ``.points`` (see :func:`georef_names`; no georef_dir: none
    written). Every output is checked before any work (:func:`engine.output_guard.check_output`): never an
    input (the photos, ``inputs``), never a file Skyloc did not write unless ``overwrite``.
    """
    out = Path(out)
    driver_for(out)  # refuse a bad extension before any work
    if (geotiff or points) and len(photos) != 1:
        raise InputError("--geotiff/--points name the files of ONE photo; for several use --georef-dir")
    every_input = [*photos, *inputs]
    check_output(out, inputs=every_input, overwrite=overwrite, layer=FOOTPRINT_LAYER, what="footprint layer")
    names = georef_names(photos, georef_dir, geotiff, points)
    for tif, pts in names.values():
        for target in (tif, pts):
            if target is not None:
                check_output(target, inputs=every_input, overwrite=overwrite, what="georeferenced output")
    with output_lock(out), os_errors_as_user_errors(f"writing the footprints of {out.name}"):
        return _run_locked(
            photos, out, locate, settings, names, resume, progress, cancel, overwrite, every_input
        )


def _run_locked(
    photos: Sequence[Path],
    out: Path,
    locate: Locate,
    settings: dict[str, Any],
    names: dict[int, tuple[str | None, str | None]],
    resume: bool,
    progress: ProgressFn,
    cancel: CancelToken | None,
    overwrite: bool,
    every_input: Sequence[str | os.PathLike[str]],
) -> list[Footprint]:
    parts = parts_dir(out)
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    stamp = parts / "settings.json"
    if parts.exists():
        recorded = _read_stamp(stamp)
        if not resume or recorded != fingerprint:
            if resume and recorded is None and stamp.exists():
                progress(0.0, f"the resume record {stamp} is unreadable: starting this batch again")
            _remove_parts(parts)
    parts.mkdir(parents=True, exist_ok=True)
    if _read_stamp(stamp) != fingerprint:
        with atomic_path(stamp, suffix=".json") as tmp:
            tmp.write_text(json.dumps({"fp": fingerprint, "settings": settings}, default=str))

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
        head = f"photo {i + 1} of {len(photos)}: {photo.name}"
        progress(i / len(photos), head)

        def within(fraction: float, message: str, i: int = i, head: str = head) -> None:
            progress((i + min(max(fraction, 0.0), 1.0)) / len(photos), f"{head}: {message}")

        try:
            fp, rgb = _call_locate(locate, photo, within)
        except CancelledError:
            raise
        except SkylocError as exc:
            fp, rgb = Footprint(photo=str(photo), status="error", reason=f"{exc.code}: {exc.message}"), None
        if fp.status == "localized" and rgb is not None:
            tif, pts = names[i]
            within(1.0, "writing its georeferenced GeoTIFF and .points")
            _write_georef(fp, rgb, tif, pts, overwrite, every_input)
        with atomic_path(record, suffix=".json") as tmp:
            tmp.write_text(json.dumps(asdict(fp), default=str))
        results.append(fp)
    progress(1.0, f"writing {out.name}" + (f" ({resumed} photos resumed)" if resumed else ""))
    write_footprints(out, results, inputs=every_input, overwrite=overwrite)
    _remove_parts(parts)
    return results


def _read_stamp(stamp: Path) -> str | None:
    """The settings fingerprint of a previous run, or None when absent or unreadable (e.g. a disk that filled)."""
    try:
        return json.loads(stamp.read_text()).get("fp")
    except (OSError, ValueError, AttributeError):
        return None


def _remove_parts(parts: Path) -> None:
    """Remove a resume folder, but only if it holds nothing but Skyloc's own records."""
    if not parts.is_dir():
        return
    foreign = [p.name for p in parts.iterdir() if not _is_record_file(p.name)]
    if foreign:
        raise InputError(
            f"{parts} holds files Skyloc did not write ({', '.join(sorted(foreign)[:3])}): it will not be "
            "removed; move them away or choose another output name"
        )
    shutil.rmtree(parts, ignore_errors=True)


_RECORD = re.compile(r"^(settings\.json|\d{6}-[0-9a-f]{12}\.json|\..+\.tmp(\.json)?)$")


def _is_record_file(name: str) -> bool:
    return _RECORD.match(name) is not None


def georef_names(
    photos: Sequence[Path],
    georef_dir: str | os.PathLike[str] | None,
    geotiff: str | None = None,
    points: str | None = None,
) -> dict[int, tuple[str | None, str | None]]:
    """Unique, stable GeoTIFF / .points names for every photo of a batch: ``{i: (tif, points)}``.

    ``<georef_dir>/<photo file name>.tif`` and ``.points`` (``p.jpg.points`` is also the name QGIS's
    Georeferencer looks for beside ``p.jpg``), so ``p.jpg`` and ``p.png`` never share a name. Photos with
    the same file name from different folders get their folder's name in front (``a__query.jpg.tif``),
    and, should that still collide, a short hash of the folder's full path: the names depend only on the
    photos' paths, never on their order.
    """
    if georef_dir is None:
        return {i: (geotiff, points) for i in range(len(photos))}
    folder = Path(georef_dir)
    by_name: dict[str, list[Path]] = {}
    for p in photos:
        by_name.setdefault(p.name, []).append(p)
    names: dict[int, tuple[str | None, str | None]] = {}
    for i, p in enumerate(photos):
        base = p.name
        clashes = {os.path.realpath(q.parent) for q in by_name[p.name]}
        if len(clashes) > 1:
            parents = [Path(os.path.realpath(q.parent)).name for q in by_name[p.name]]
            base = f"{Path(os.path.realpath(p.parent)).name}__{p.name}"
            if parents.count(Path(os.path.realpath(p.parent)).name) > 1:
                digest = hashlib.sha256(os.path.realpath(p.parent).encode()).hexdigest()[:8]
                base = f"{Path(os.path.realpath(p.parent)).name}-{digest}__{p.name}"
        names[i] = (geotiff or str(folder / f"{base}.tif"), points or str(folder / f"{base}.points"))
    return names


def _write_georef(
    fp: Footprint,
    rgb: np.ndarray,
    geotiff: str | None,
    points: str | None,
    overwrite: bool,
    inputs: Sequence[str | os.PathLike[str]],
) -> None:
    h = np.array(fp.h)
    if geotiff:
        check_output(geotiff, inputs=inputs, overwrite=overwrite, what="georeferenced GeoTIFF")
        fp.geotiff = str(write_geotiff(geotiff, rgb, h, fp.crs))
    if points:
        check_output(points, inputs=inputs, overwrite=overwrite, what="GCP file")
        fp.points = str(write_points(points, h, rgb.shape[:2], fp.crs))


def write_footprints(
    out: str | os.PathLike[str],
    results: Sequence[Footprint],
    *,
    inputs: Sequence[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> Path:
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
            "matcher": [r.matcher for r in results],
        },
        layer=FOOTPRINT_LAYER,
        inputs=inputs,
        overwrite=overwrite,
    )
