"""Background work as ``QgsTask``s: submit a job with the client, follow it, cancel it, add the results.

``run()`` happens in a worker thread with its own client: it submits the job, polls it (progress ->
``setProgress``) and, when the task is cancelled, asks the engine to cancel the job (the engine then
removes any partial output). ``finished()`` runs on the main thread: layers are added there, errors go
to the message bar. Keep a reference to a running task: :func:`start_task` does.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from qgis.core import Qgis, QgsApplication, QgsMapLayer, QgsProject, QgsTask

from .client import Job, ServiceError, SkylocClient
from .engine_link import MODEL_LOAD_TIMEOUT_S, EngineLink, outside_folders
from .layers import (
    HeatmapSlot,
    add_candidates,
    add_clicked_point,
    add_footprints,
    add_heatmap,
    add_photo_raster,
    heatmap_name,
    point_query,
    run_group,
    zoom_to,
)
from .messages import OUTCOME, clean, push, report_error
from .paths import engine_photos, engine_roots

#: key of the bar message with the engine's warnings about a run (band order guessed ...)
WARNINGS = "warnings"

#: Seconds of each long poll: the cancel button answers within this.
POLL_S = 0.5
_RUNNING: set[QgsTask] = set()


def follow_job(
    client: SkylocClient,
    job: Job,
    progress: Callable[[float, str], None],
    canceled: Callable[[], bool],
    poll: float = POLL_S,
    on_job: Callable[[Job], None] | None = None,
) -> Job:
    """Poll ``job`` until it ends; cancel it on the engine once ``canceled()``. The succeeded job, or
    ServiceError (``cancelled``, or the job's error). ``on_job`` sees every state of the job."""
    cancel_sent = False
    while not job.done:
        if not cancel_sent and canceled():
            job = client.cancel(job)
            cancel_sent = True
            continue
        job = client.job(job.id, wait=poll)
        if on_job is not None:
            on_job(job)
        progress(job.progress, job.message)
    return job.raise_for_state()


def paths_named(message: str) -> list[str]:
    """Absolute paths an engine message names: quoted (``raster '/x/r.tif' resolves to ...``) or as an
    index's imagery (``the imagery of its tiles, /x/r.tif, lies outside ...``)."""
    return re.findall(r"'(/[^']+)'", message or "") + re.findall(r", (/[^,]+), lies outside", message or "")


def stamp() -> str:
    """A name part unique to the second (and then some)."""
    return time.strftime("%Y%m%d_%H%M%S") + f"_{int(time.time() * 1000) % 1000:03d}"


def start_task(task: QgsTask) -> QgsTask:
    """Hand ``task`` to QGIS's task manager, keeping it alive until it finished."""
    _RUNNING.add(task)
    QgsApplication.taskManager().addTask(task)
    return task


class EngineTask(QgsTask):
    """Base: ``work(client)`` in the background, then ``succeeded(result)`` on the main thread.

    After it ended: ``ok`` (bool), ``result``, ``error`` (the exception), ``error_text`` and ``ended``;
    ``messages`` (every message it showed, in order) and ``warnings`` (the engine's, about the job).
    ``on_done(task)`` is called on the main thread at the end, whatever happened. ``retry`` (set by whoever
    started it) runs the same again: offered after an input outside the engine's folders (``outside``:
    the folders that would let it read them) once they are added.
    """

    #: read timeout of the task's requests (seconds); long polls add their wait to it
    timeout = 60.0

    def __init__(self, description: str, iface=None, on_done: Callable[[EngineTask], None] | None = None):
        super().__init__(description, QgsTask.Flag.CanCancel)
        self.iface = iface
        self.on_done = on_done
        self.job: Job | None = None
        #: the engine's latest progress message and since when (``time.monotonic()``) it stands
        self.message = ""
        self.message_since = time.monotonic()
        self.started_at = time.monotonic()
        self.result: Any = None
        self.error: BaseException | None = None
        self.error_text = ""
        self.ok = False
        self.ended = False
        self.was_canceled = False
        self.messages: list[str] = []
        self.warnings: list[str] = []
        self.outside: list[str] = []
        self.retry: Callable[[], Any] | None = None

    # ---------------------------------------------------------------------------------- worker thread

    def work(self, client: SkylocClient) -> Any:
        raise NotImplementedError

    def inputs(self) -> list[str]:
        """The files and folders the engine must read in place (rasters, indexes): for ``outside``."""
        return []

    def note(self, message: str) -> None:
        """Show ``message`` as what the task is doing now (the dock's progress line)."""
        if message and message != self.message:
            self.message, self.message_since = message, time.monotonic()
            self.messages.append(message)

    def follow(self, client: SkylocClient, job: Job, start: float = 0.0, end: float = 1.0) -> Job:
        """Follow a job, mapping its progress to ``start..end`` of this task's progress."""
        self.job = job

        def progress(fraction: float, message: str) -> None:
            self.note(message)
            self.setProgress(100.0 * (start + (end - start) * fraction))

        def seen(current: Job) -> None:
            self.job = current

        self.job = follow_job(client, job, progress, self.isCanceled, on_job=seen)
        self.warnings += [w for w in self.job.warnings if w not in self.warnings]
        return self.job

    def run(self) -> bool:
        try:
            with EngineLink.instance().client(timeout=self.timeout) as client:
                try:
                    self.result = self.work(client)
                except ServiceError as exc:
                    if exc.code == "forbidden_path":
                        given = self.inputs() + paths_named(exc.message)  # an index's imagery too
                        with contextlib.suppress(ServiceError):
                            self.outside = outside_folders(given, engine_roots(client))
                    raise
            return True
        except ServiceError as exc:
            self.error = exc
        except Exception as exc:  # never let an exception escape into the task manager
            self.error = exc
            self.error_text = traceback.format_exc()
        return False

    # ------------------------------------------------------------------------------------ main thread

    def succeeded(self, result: Any) -> None:
        """Add the results (main thread)."""

    def failed(self) -> None:
        """Clean up after a failure or a cancel (main thread)."""

    def finished(self, ok: bool) -> None:  # noqa: FBT001 (QGIS API)
        try:
            cancelled = self.isCanceled() or (
                isinstance(self.error, ServiceError) and self.error.code == "cancelled"
            )
            self.was_canceled = cancelled
            if ok:
                try:
                    self.succeeded(self.result)
                    self.ok = True
                except Exception as exc:
                    self.error = exc
                    self.error_text = report_error(exc, self.iface, self.description())
                if self.ok and self.warnings:  # beside the outcome, which it does not replace
                    push(
                        "the engine warns: " + "; ".join(self.warnings),
                        Qgis.MessageLevel.Warning,
                        self.iface,
                        key=WARNINGS,
                    )
            elif cancelled:
                self.error_text = f"{clean(self.description())}: cancelled"
                push(self.error_text, Qgis.MessageLevel.Info, self.iface, key=OUTCOME)
            elif self.error is not None:
                self.error_text = report_error(
                    self.error,
                    self.iface,
                    self.description(),
                    folders=self.outside,
                    retry=self.retry if self.outside else None,
                )
            if not self.ok:
                self.failed()
        finally:
            self.ended = True
            _RUNNING.discard(self)
            if self.on_done is not None:
                self.on_done(self)


class IndexTask(EngineTask):
    """Build an index from rasters (files, MBTiles, GeoPackage tiles), XYZ tile services (URL templates,
    with ``zooms`` and ``bbox``) and/or XYZ mosaic folders; ``out`` None: in the results folder."""

    def __init__(
        self,
        sources: Sequence[str],
        out: str | None = None,
        *,
        tile_sizes: Sequence[int] | None = None,
        overlap: float | None = None,
        model: str | None = None,
        weights: str | None = None,
        sha256: str | None = None,
        bands: Sequence[int] | None = None,
        span: int | None = None,
        exclude: Sequence[str] | None = None,
        recursive: bool | None = None,
        zooms: Sequence[int] | None = None,
        bbox: Sequence[float] | None = None,
        attribution: str | None = None,
        iface=None,
        on_done=None,
    ) -> None:
        super().__init__("Skyloc: build index", iface, on_done)
        self.sources = list(sources)
        self.out = out
        self.options = {
            "tile_sizes": tile_sizes,
            "overlap": overlap,
            "model": model,
            "weights": weights or None,
            "sha256": sha256 or None,
            "bands": None if bands is None else list(bands),
            "span": span,
            "exclude": list(exclude) if exclude else None,
            "recursive": recursive or None,
            "zooms": list(zooms) if zooms else None,
            "bbox": list(bbox) if bbox else None,
            "attribution": attribution or None,
        }

    def inputs(self) -> list[str]:
        files = [s for s in self.sources if not is_service_source(s)]
        return [*files, *([self.options["weights"]] if self.options["weights"] else [])]

    def work(self, client: SkylocClient) -> Job:
        if self.out is None:
            self.out = os.path.join(EngineLink.instance().output_dir(client), f"index_{stamp()}")
        return self.follow(client, client.index(self.sources, self.out, **self.options))

    def succeeded(self, result: Job) -> None:
        summary = result.summary or {}
        counts = summary.get("counts", {})
        push(
            f"index built: {self.out} ({counts.get('tiles', '?')} tiles){source_notes(summary)}",
            Qgis.MessageLevel.Success,
            self.iface,
            key=OUTCOME,
        )


def is_service_source(source: str | None) -> bool:
    """A tile service (URL template, ``wmts:``), not a file the engine reads in place."""
    return bool(source) and str(source).lower().startswith(("http://", "https://", "wmts:"))


def source_notes(manifest: dict) -> str:
    """What an index's tile services downloaded and whom to credit (the provider's attribution)."""
    notes = []
    for s in manifest.get("sources") or []:
        if not isinstance(s, dict):
            continue
        d = s.get("download") or {}
        if s.get("kind") == "tile_service" and d:
            notes.append(
                f"{d.get('downloaded', 0)} tiles downloaded, {d.get('cached_before', 0)} from the cache, "
                f"{d.get('missing', 0)} missing"
            )
        if s.get("attribution"):
            notes.append(f"imagery: {s['attribution']}")
    return ("; " + "; ".join(dict.fromkeys(notes))) if notes else ""


def remove_empty_folders(folder: str) -> None:
    """Remove ``folder`` and the folders in it when they hold no file (after a failed or cancelled run)."""
    if not folder or not os.path.isdir(folder):
        return
    for here, _dirs, files in os.walk(folder, topdown=False):
        if not files:
            try:
                os.rmdir(here)
            except OSError:
                continue


def photo_label(path: str) -> str:
    """A photo's file name (the unique name the engine got, for an upload)."""
    return os.path.basename(path.rstrip("/\\")) or path


class LocalizeTask(EngineTask):
    """Localize photos on an index (or footprints on a raster); adds candidates, footprints, photos.

    After it succeeded: ``outcome`` (what happened, in words), ``rows`` (one dict per photo: ``name``,
    ``photo``, ``status``, ``reason``, ``layer_id``/``fid`` of its feature) and ``group`` (the layer tree
    group of this run's layers).
    """

    def __init__(
        self,
        photos: Sequence[str],
        *,
        index: str | None = None,
        against: str | None = None,
        footprint: bool = True,
        top_k: int | None = None,
        matcher: str | None = None,
        near: Sequence[float] | None = None,
        radius_km: float | None = None,
        bbox: Sequence[float] | None = None,
        model: str | None = None,
        bands: Sequence[int] | None = None,
        model_options: dict[str, Any] | None = None,
        tiles: dict[str, Any] | None = None,
        iface=None,
        on_done=None,
    ) -> None:
        super().__init__("Skyloc: localize photos", iface, on_done)
        #: with ``against`` a tile layer: ``zooms`` and ``bbox`` of its tiles to read (fetch)
        self.tiles = {k: v for k, v in (tiles or {}).items() if v is not None}
        #: with ``against``: the raster's bands read as R,G,B (its renderer's), and model/weights/sha256
        #: of the retrieval over its windows (None: the engine's defaults)
        self.bands = list(bands) if bands else None
        self.model_options = {k: v for k, v in (model_options or {}).items() if v}
        self.photos = list(photos)
        self.index, self.against, self.footprint = index, against, footprint or against is not None
        self.area = {"near": near, "radius_km": radius_km, "bbox": bbox}
        self.top_k, self.model, self.matcher = top_k, model, matcher
        self.layers: list[QgsMapLayer] = []
        self.run_dir = ""
        self.outcome = ""
        self.outcome_level = Qgis.MessageLevel.Info
        self.rows: list[dict[str, Any]] = []
        #: the user's photo of every uploaded one: {engine path: original}
        self.origins: dict[str, str] = {}
        self.group = None
        names = [photo_label(p) for p in self.photos]
        self.run_name = (names[0] if len(names) == 1 else f"{len(names)} photo sources") + time.strftime(
            " %H:%M:%S"
        )

    def inputs(self) -> list[str]:
        return [p for p in (self.index, self.against) if p and not is_service_source(p)]

    def work(self, client: SkylocClient) -> Job:
        with engine_photos(client, self.photos, engine_roots(client), self.origins) as photos:
            self.run_dir = run_dir = os.path.join(EngineLink.instance().output_dir(client), f"run_{stamp()}")
            os.makedirs(run_dir, exist_ok=True)
            if not self.footprint:
                job = client.localize(
                    photos,
                    self.index or "",
                    out=os.path.join(run_dir, "candidates.gpkg"),
                    top_k=self.top_k,
                    model=self.model,
                    **self.area,
                )
            elif self.against is not None:
                job = client.footprint(
                    photos,
                    os.path.join(run_dir, "footprints.gpkg"),
                    against=self.against,
                    top_k=self.top_k,
                    matcher=self.matcher,
                    bands=self.bands,
                    **self.model_options,
                    **self.tiles,
                )
            else:
                job = client.footprint(
                    photos,
                    os.path.join(run_dir, "footprints.gpkg"),
                    index=self.index,
                    top_k=self.top_k,
                    matcher=self.matcher,
                    candidates_out=os.path.join(run_dir, "candidates.gpkg"),
                    **self.area,
                )
            return self.follow(client, job)

    def failed(self) -> None:
        remove_empty_folders(self.run_dir)

    def succeeded(self, result: Job) -> None:
        files = result.files
        self.group = run_group(f"Skyloc {self.run_name}")
        cands = feet = None
        for path in files:
            if path.endswith("candidates.gpkg"):
                cands = add_candidates(path, group=self.group)
                self.layers.append(cands)
        for path in files:
            if path.endswith(".tif"):
                self.layers.append(add_photo_raster(path, group=self.group))
        for path in files:
            if path.endswith("footprints.gpkg"):
                feet = add_footprints(path, group=self.group)
                self.layers.append(feet)
        summary = result.summary or {}
        if self.footprint:
            self.rows = footprint_rows(summary.get("photos", []), feet, cands, self.origins)
            self.outcome, self.outcome_level = footprint_outcome(self.rows)
        else:
            self.rows = candidate_rows(summary.get("photos", []), cands)
            self.outcome = f"candidates for {len(self.rows)} photo(s): click one to zoom to its best place"
            self.outcome_level = Qgis.MessageLevel.Success
        push(self.outcome, self.outcome_level, self.iface, key=OUTCOME)
        canvas = self.iface.mapCanvas() if self.iface is not None else None
        if canvas is not None and self.layers:
            zoom_to(canvas, self.layers[-1:])


def _features_by_photo(layer: QgsMapLayer | None, rank_one: bool = False) -> dict[str, int]:
    """Feature id by the ``photo`` attribute (candidates: the rank-1 one)."""
    out: dict[str, int] = {}
    if layer is None or layer.fields().indexOf("photo") < 0:
        return out
    has_rank = layer.fields().indexOf("rank") >= 0
    for f in layer.getFeatures():
        if rank_one and has_rank and f["rank"] != 1:
            continue
        out.setdefault(str(f["photo"]), f.id())
    return out


def footprint_rows(
    photos: list[dict[str, Any]], feet, cands, origins: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """One row per photo of a footprint job: name, status, reason, the feature to zoom to, the user's
    photo (``original``: the file uploaded, else the engine's path) and its Georeferencer ``points``."""
    fp_ids, cand_ids = _features_by_photo(feet), _features_by_photo(cands, rank_one=True)
    rows = []
    for p in photos:
        photo = str(p.get("photo", ""))
        points = p.get("points")
        if not points and feet is not None and photo in fp_ids and feet.fields().indexOf("points") >= 0:
            points = feet.getFeature(fp_ids[photo])["points"]
        row = {
            "photo": photo,
            "original": (origins or {}).get(photo, photo),
            "points": str(points) if points else None,
            "name": photo_label(photo),
            "status": p.get("status", "?"),
            "reason": p.get("reason") or "",
            "verified": p.get("verified"),
            "matcher": p.get("matcher"),
            "layer_id": None,
            "fid": None,
        }
        if row["status"] == "localized" and feet is not None and photo in fp_ids:
            row.update(layer_id=feet.id(), fid=fp_ids[photo])
        elif cands is not None and photo in cand_ids:  # not placed: show its best candidate place
            row.update(layer_id=cands.id(), fid=cand_ids[photo])
        rows.append(row)
    return rows


def candidate_rows(photos: list[dict[str, Any]], cands) -> list[dict[str, Any]]:
    cand_ids = _features_by_photo(cands, rank_one=True)
    rows = []
    for p in photos:
        photo = str(p.get("photo", ""))
        fid = cand_ids.get(photo)
        rows.append(
            {
                "photo": photo,
                "name": photo_label(photo),
                "status": "candidates" if fid is not None else "no candidate",
                "reason": "",
                "layer_id": None if fid is None or cands is None else cands.id(),
                "fid": fid,
            }
        )
    return rows


def row_text(row: dict[str, Any]) -> str:
    """One photo's outcome in words: ``name placed (N verified matches, matcher)`` or ``name rejected: why``."""
    if row["status"] == "localized":
        how = ", ".join(
            x
            for x in (
                f"{row['verified']} verified matches" if row.get("verified") is not None else "",
                row.get("matcher") or "",
            )
            if x
        )
        return f"{row['name']} placed" + (f" ({how})" if how else "")
    if row["status"] == "error":
        return f"{row['name']} unreadable: {row['reason']}"
    return f"{row['name']} {row['status']}" + (f": {row['reason']}" if row["reason"] else "")


def footprint_outcome(rows: list[dict[str, Any]]) -> tuple[str, Qgis.MessageLevel]:
    """``1 of 2 photos placed; photo_x.jpg rejected: why`` and the message level it deserves."""
    placed = sum(r["status"] == "localized" for r in rows)
    text = f"{placed} of {len(rows)} photo{'s' if len(rows) != 1 else ''} placed"
    others = [row_text(r) for r in rows if r["status"] != "localized"]
    if others:
        text += "; " + "; ".join(others)
    return text, Qgis.MessageLevel.Success if rows and placed == len(rows) else Qgis.MessageLevel.Warning


class HeatmapTask(EngineTask):
    """Embedding at a point (``at`` in the raster's CRS) and/or a similarity heatmap layer over the raster.

    Query: ``at`` [x, y], ``photo`` (a file) or ``location`` [lat, lon]. The heatmap, named after the
    raster and the query, is added just above ``layer`` (the raster layer) with the fixed-range colour ramp
    of :func:`style_heatmap`; ``slot`` (a :class:`HeatmapSlot`) replaces the previous heatmap unless pinned.
    A click (``at``) also adds a point with its embedding to the clicked-points layer (``point_fid``).
    Its first ``/embed`` in an engine loads the embedding model: the task says so and waits up to
    MODEL_LOAD_TIMEOUT_S for it (a timeout there used to read as "the engine is not running").
    """

    timeout = MODEL_LOAD_TIMEOUT_S

    def __init__(
        self,
        raster: str,
        *,
        layer: QgsMapLayer | None = None,
        at: Sequence[float] | None = None,
        photo: str | None = None,
        location: Sequence[float] | None = None,
        model: str | None = None,
        weights: str | None = None,
        sha256: str | None = None,
        bands: Sequence[int] | None = None,
        out: str | None = None,
        iface=None,
        on_done=None,
        on_embedding: Callable[[dict[str, Any]], None] | None = None,
        slot: HeatmapSlot | None = None,
        tiles: dict[str, Any] | None = None,
    ) -> None:
        super().__init__("Skyloc: similarity heatmap", iface, on_done)
        #: ``raster`` a tile layer (URL template, wmts:, MBTiles, GeoPackage): the ``zoom`` and ``bbox``
        #: the engine reads it at (rendered to a temporary GeoTIFF); points are then in the layer's CRS
        self.tiles = {k: v for k, v in (tiles or {}).items() if v is not None}
        self.weights, self.sha256 = weights or None, sha256 or None
        self.bands = None if bands is None else list(bands)
        self.raster = raster
        self.layer_id = None if layer is None else layer.id()
        self.raster_name = (
            layer.name() if layer is not None else os.path.splitext(os.path.basename(raster))[0]
        )
        self.raster_crs = layer.crs() if layer is not None else None
        self.slot = slot
        self.point_fid: int | None = None
        if at is not None:
            self.query = point_query(at[0], at[1], self.raster_crs)
        elif photo is not None:
            self.query = f"~ {os.path.basename(photo)}"
        elif location is not None:
            self.query = f"@ lat {location[0]:.5f}, lon {location[1]:.5f}"
        else:
            self.query = ""
        self.at, self.photo, self.location = at, photo, location
        self.model, self.out = model, out
        self.on_embedding = on_embedding
        self.embedding: dict[str, Any] | None = None
        self.heatmap_layer: QgsMapLayer | None = None

    def inputs(self) -> list[str]:
        raster = [] if is_service_source(self.raster) else [self.raster]
        return [*raster, *([self.weights] if self.weights else [])]

    def work(self, client: SkylocClient) -> Job:
        model = {"model": self.model, "weights": self.weights, "sha256": self.sha256, "bands": self.bands}
        if self.tiles:  # the points are in the layer's CRS, the engine's rendering in Web Mercator
            crs = self.raster_crs.authid() if self.raster_crs is not None else ""
            model.update(self.tiles, **({"crs": crs} if crs and self.at is not None else {}))
        if self.at is not None:
            link = EngineLink.instance()
            warm = (client.url, f"{self.model or 'default'} {self.weights or ''}")
            if warm in link.warm_models:
                self.note("embedding at the clicked point…")
            else:  # the engine's first /embed of this model loads it: say so, and wait for it
                self.note("loading the embedding model (its first use by this engine)…")
            self.embedding = client.embed(self.raster, [self.at], **model)
            link.warm_models.add(warm)
            self.setProgress(10.0)
        if self.out is None:
            stem = os.path.splitext(os.path.basename(self.raster))[0]
            if self.tiles:  # a URL template's last part ("{y}.png") says nothing: the layer's name
                stem = re.sub(r"[^\w.-]+", "_", self.raster_name).strip("_") or "tiles"
            folder = os.path.join(EngineLink.instance().output_dir(client), "heatmaps")
            os.makedirs(folder, exist_ok=True)
            self.out = os.path.join(folder, f"{stem}_{stamp()}.tif")
        given = [self.photo] if self.photo is not None else []
        with engine_photos(client, given, engine_roots(client) if given else []) as photos:
            job = client.heatmap(
                self.raster,
                self.out,
                at=self.at,
                photo=photos[0] if photos else None,
                location=self.location,
                **model,
            )
            return self.follow(client, job, 0.1 if self.at is not None else 0.0, 1.0)

    def succeeded(self, result: Job) -> None:
        summary = result.summary or {}
        above = None if self.layer_id is None else QgsProject.instance().mapLayer(self.layer_id)
        lo, hi = summary.get("min"), summary.get("max")
        self.heatmap_layer = add_heatmap(
            summary.get("out", self.out),
            above=above,
            name=heatmap_name(self.raster_name, self.query),
            lo=lo,
            hi=hi,
            query=self.query,
        )
        if self.slot is not None:
            self.slot.place(self.heatmap_layer)
        if self.embedding is not None:
            if self.at is not None and self.raster_crs is not None:
                _, self.point_fid = add_clicked_point(
                    list(self.at),
                    self.raster_crs,
                    self.raster_name,
                    self.embedding,
                    self.heatmap_layer.name(),
                )
            if self.on_embedding is not None:
                self.on_embedding(self.embedding)
        push(
            f"heatmap {self.raster_name} {self.query}: similarity {lo or 0:.2f} to {hi or 0:.2f} "
            "(colours over 0..1)",
            Qgis.MessageLevel.Success,
            self.iface,
            key=OUTCOME,
        )
