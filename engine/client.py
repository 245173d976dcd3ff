"""Typed Python client of the Skyloc engine service (``skyloc serve``), for the QGIS plugin and the tests.

This file is self-contained: it needs only the standard library and ``requests`` (no torch, numpy or
other engine module), so the plugin can ship a copy of it inside its zip and run it in QGIS's Python.

    engine = launch(["/path/to/engine/.venv/bin/skyloc", "serve"], roots=["/data"])  # or connect:
    client = SkylocClient("http://127.0.0.1:8765", token_file="~/.cache/skyloc/serve-8765.token")
    job = client.localize(["/data/photo.jpg"], index="/data/my_index", out="/data/cands.gpkg")
    job = client.wait(job, on_progress=lambda f, m: print(f"{f:.0%} {m}"))
    print(job.files, job.summary)
    engine.stop()

Every error the service answers raises :class:`ServiceError` with its HTTP ``status``, its stable
``code`` (``bad_input``, ``too_large``, ``forbidden_path``, ``index_not_found``, ``model_mismatch``,
``busy`` ...) and a human ``message``; a job that failed raises it from :meth:`SkylocClient.wait` too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import requests

__all__ = ["Job", "LocalEngine", "ServiceError", "SkylocClient", "Upload", "launch"]

#: Longest long-poll the service accepts on ``GET /jobs/{id}?wait=`` (seconds).
MAX_POLL_S = 30.0


class ServiceError(Exception):
    """An error answer: ``status`` (HTTP, None when the service could not be reached), ``code``, ``message``."""

    def __init__(self, status: int | None, code: str, message: str, job: Job | None = None) -> None:
        super().__init__(f"{code}: {message}" + (f" (HTTP {status})" if status else ""))
        self.status, self.code, self.message, self.job = status, code, message, job


@dataclass
class Job:
    """A long action on the service. ``state``: queued, running, succeeded, failed or cancelled."""

    id: str
    kind: str
    state: str
    progress: float = 0.0
    message: str = ""
    cancel_requested: bool = False
    created: float | None = None
    started: float | None = None
    finished: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    #: what the engine warned about on the way (e.g. a raster's band order guessed)
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Job:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def done(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")

    @property
    def files(self) -> list[str]:
        """Paths the job wrote (empty until it succeeded)."""
        return list((self.result or {}).get("files", []))

    @property
    def summary(self) -> Any:
        """The engine's JSON summary of the action (None until it succeeded)."""
        return (self.result or {}).get("summary")

    def raise_for_state(self) -> Job:
        """The job itself if it succeeded; ServiceError (code ``cancelled`` or the job's error) otherwise."""
        if self.state == "failed":
            err = self.error or {}
            raise ServiceError(err.get("http_status"), err.get("code", "error"), err.get("message", ""), self)
        if self.state == "cancelled":
            raise ServiceError(None, "cancelled", self.message or "cancelled", self)
        return self


@dataclass
class Upload:
    id: str
    path: str  # give this path to the other calls
    name: str
    bytes: int
    width: int
    height: int


def _drop_none(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def _pair(value: Sequence[float] | None) -> list[float] | None:
    return None if value is None else [float(v) for v in value]


def _tile_fields(**fields: Any) -> dict[str, Any]:
    """Tile options of a request body: sequences as lists (``zooms``, ``subdomains``)."""
    return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in fields.items()}


class SkylocClient:
    """One service at ``url`` (``http://127.0.0.1:PORT``), authenticated by ``token`` or ``token_file``."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        token_file: str | os.PathLike[str] | None = None,
        timeout: float = 60.0,
        session: requests.Session | None = None,
    ) -> None:
        if token is None:
            if token_file is None:
                raise ValueError("give token or token_file")
            token = Path(token_file).expanduser().read_text().strip()
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = session or requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.session.trust_env = False  # loopback: never through a proxy from the environment

    @classmethod
    def from_ready_file(cls, path: str | os.PathLike[str], **kwargs: Any) -> SkylocClient:
        """A client for the service that wrote ``skyloc serve --ready-file PATH``."""
        info = json.loads(Path(path).read_text())
        return cls(info["url"], token_file=info["token_file"], **kwargs)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> SkylocClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------- plumbing

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        files: Any = None,
        timeout: float | None = None,
    ) -> Any:
        """Send one request; the decoded JSON answer, or ServiceError."""
        try:
            r = self.session.request(
                method,
                self.url + path,
                json=json_body,
                params=params,
                files=files,
                timeout=timeout or self.timeout,
            )
        except requests.RequestException as exc:
            raise ServiceError(
                None, "unreachable", f"no answer from the engine at {self.url}: {exc}"
            ) from exc
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code >= 400:
            if isinstance(data, dict) and "code" in data:
                raise ServiceError(r.status_code, str(data["code"]), str(data.get("message", "")))
            raise ServiceError(r.status_code, "http_error", r.text[:500])
        return data

    def _job(self, path: str, body: Mapping[str, Any]) -> Job:
        return Job.from_json(self.request("POST", path, json_body=_drop_none(body)))

    # ------------------------------------------------------------------------------------------ service

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/health")

    def version(self) -> dict[str, Any]:
        return self.request("GET", "/version")

    def models(self) -> list[dict[str, Any]]:
        return self.request("GET", "/models")

    def upload(self, path: str | os.PathLike[str], name: str | None = None) -> Upload:
        """Send a local image to the service's upload folder; use ``.path`` in the other calls."""
        path = Path(path)
        with path.open("rb") as f:
            data = self.request("POST", "/uploads", files={"file": (name or path.name, f)})
        return Upload(**data)

    def delete_upload(self, upload_id: str) -> None:
        self.request("DELETE", f"/uploads/{upload_id}")

    # ---------------------------------------------------------------------------------------- actions

    def index(
        self,
        sources: Sequence[str],
        out: str,
        *,
        model: str | None = None,
        weights: str | None = None,
        sha256: str | None = None,
        backend: str | None = None,
        input_size: int | None = None,
        factory: str | None = None,
        tile_sizes: Sequence[int] | None = None,
        overlap: float | None = None,
        bands: Sequence[int] | None = None,
        span: int | None = None,
        exclude: Sequence[str] | None = None,
        recursive: bool | None = None,
        ray: bool | str | None = None,
        ray_workers: int | None = None,
        zooms: Sequence[int] | None = None,
        near: Sequence[float] | None = None,
        radius_km: float | None = None,
        bbox: Sequence[float] | None = None,
        max_tiles: int | None = None,
        tile_cache: str | None = None,
        attribution: str | None = None,
        subdomains: Sequence[str] | None = None,
        retry_missing: bool | None = None,
    ) -> Job:
        """Build a tile database (a job); ``recursive``: XYZ mosaic folders with their subfolders; ``ray``:
        encode on a Ray cluster (True, "local", "auto" or the head's HOST:PORT), ``ray_workers`` workers.

        Sources may be http(s) tile URL templates (with ``zooms`` and ``bbox`` or ``near``+``radius_km``),
        MBTiles files or GeoPackage tile tables; see :meth:`index_plan` for the download before starting."""
        body = dict(locals())
        body.pop("self")
        return self._job("/index", {k: list(v) if isinstance(v, tuple) else v for k, v in body.items()})

    def index_plan(
        self,
        sources: Sequence[str],
        *,
        zooms: Sequence[int] | None = None,
        near: Sequence[float] | None = None,
        radius_km: float | None = None,
        bbox: Sequence[float] | None = None,
        span: int | None = None,
        overlap: float | None = None,
        max_tiles: int | None = None,
        tile_cache: str | None = None,
        subdomains: Sequence[str] | None = None,
        retry_missing: bool | None = None,
    ) -> list[dict[str, Any]]:
        """Per tile source: mosaics, tiles needed/cached/to download, estimated_download_bytes (no download)."""
        body = dict(locals())
        body.pop("self")
        body = {k: list(v) if isinstance(v, tuple) else v for k, v in body.items()}
        return self.request("POST", "/index/plan", json_body=_drop_none(body))

    def localize(
        self,
        photos: Sequence[str],
        index: str,
        *,
        out: str | None = None,
        top_k: int | None = None,
        near: Sequence[float] | None = None,
        radius_km: float | None = None,
        bbox: Sequence[float] | None = None,
        model: str | None = None,
        weights: str | None = None,
        sha256: str | None = None,
        backend: str | None = None,
        overwrite: bool | None = None,
        nprobe: int | None = None,
        rerank: int | None = None,
    ) -> Job:
        """The ``top_k`` most similar tiles of ``index`` for each photo (a job). ``near`` is [lat, lon]."""
        return self._job(
            "/localize",
            {
                "photos": list(photos),
                "index": index,
                "out": out,
                "top_k": top_k,
                "near": _pair(near),
                "radius_km": radius_km,
                "bbox": None if bbox is None else [float(v) for v in bbox],
                "model": model,
                "weights": weights,
                "sha256": sha256,
                "backend": backend,
                "overwrite": overwrite,
                "nprobe": nprobe,
                "rerank": rerank,
            },
        )

    def footprint(
        self,
        photos: Sequence[str],
        out: str,
        *,
        against: str | None = None,
        index: str | None = None,
        top_k: int | None = None,
        georef_dir: str | None = None,
        geotiff: str | None = None,
        points: str | None = None,
        candidates_out: str | None = None,
        near: Sequence[float] | None = None,
        radius_km: float | None = None,
        bbox: Sequence[float] | None = None,
        model: str | None = None,
        backend: str | None = None,
        resume: bool | None = None,
        overwrite: bool | None = None,
        matcher: str | None = None,
        zooms: Sequence[int] | None = None,
        max_tiles: int | None = None,
        tile_cache: str | None = None,
        subdomains: Sequence[str] | None = None,
        retry_missing: bool | None = None,
        bands: Sequence[int] | None = None,
        weights: str | None = None,
        sha256: str | None = None,
        max_fetch_zoom: int | None = None,
        nprobe: int | None = None,
        rerank: int | None = None,
    ) -> Job:
        """Footprints of photos on a raster (``against``) or on an index's candidates (a job). ``against``
        may be tiles (an http(s) URL template with ``zooms`` and ``bbox`` or ``near``+``radius_km``, an
        MBTiles or a GeoPackage of tiles). ``bands``: a raster ``against``'s bands read as R,G,B;
        ``model``/``weights``/``sha256``: the retrieval over its windows."""
        return self._job(
            "/footprint",
            {
                "photos": list(photos),
                "out": out,
                "against": against,
                "index": index,
                "top_k": top_k,
                "georef_dir": georef_dir,
                "geotiff": geotiff,
                "points": points,
                "candidates_out": candidates_out,
                "near": _pair(near),
                "radius_km": radius_km,
                "bbox": None if bbox is None else [float(v) for v in bbox],
                "model": model,
                "backend": backend,
                "resume": resume,
                "overwrite": overwrite,
                "matcher": matcher,
                **_tile_fields(
                    zooms=zooms, max_tiles=max_tiles, tile_cache=tile_cache, subdomains=subdomains
                ),
                "retry_missing": retry_missing,
                "bands": None if bands is None else [int(b) for b in bands],
                "weights": weights,
                "sha256": sha256,
                "max_fetch_zoom": max_fetch_zoom,
                "nprobe": nprobe,
                "rerank": rerank,
            },
        )

    def embed(
        self,
        raster: str,
        points: Sequence[Sequence[float]],
        *,
        crs: str | None = None,
        model: str | None = None,
        weights: str | None = None,
        sha256: str | None = None,
        bands: Sequence[int] | None = None,
        zoom: int | None = None,
        near: Sequence[float] | None = None,
        radius_km: float | None = None,
        bbox: Sequence[float] | None = None,
        max_tiles: int | None = None,
        tile_cache: str | None = None,
        subdomains: Sequence[str] | None = None,
        retry_missing: bool | None = None,
    ) -> dict[str, Any]:
        """Embeddings at points ([x, y] in ``crs``, default the raster's), answered at once. ``raster`` may
        be tiles (URL template, MBTiles, GeoPackage) read at ``zoom`` over ``bbox`` or ``near``+``radius_km``."""
        body = {
            "zoom": zoom,
            "near": _pair(near),
            "radius_km": radius_km,
            "bbox": None if bbox is None else [float(v) for v in bbox],
            **_tile_fields(max_tiles=max_tiles, tile_cache=tile_cache, subdomains=subdomains),
            "retry_missing": retry_missing,
            "raster": raster,
            "points": [[float(x), float(y)] for x, y in points],
            "crs": crs,
            "model": model,
            "weights": weights,
            "sha256": sha256,
            "bands": None if bands is None else list(bands),
        }
        return self.request("POST", "/embed", json_body=_drop_none(body))

    def heatmap(
        self,
        raster: str,
        out: str,
        *,
        at: Sequence[float] | None = None,
        crs: str | None = None,
        photo: str | None = None,
        location: Sequence[float] | None = None,
        vector: str | None = None,
        resolution: float | None = None,
        model: str | None = None,
        weights: str | None = None,
        sha256: str | None = None,
        bands: Sequence[int] | None = None,
        overwrite: bool | None = None,
        zoom: int | None = None,
        near: Sequence[float] | None = None,
        radius_km: float | None = None,
        bbox: Sequence[float] | None = None,
        max_tiles: int | None = None,
        tile_cache: str | None = None,
        subdomains: Sequence[str] | None = None,
        retry_missing: bool | None = None,
    ) -> Job:
        """Similarity heatmap (COG at ``out``) to a point ``at``, a ``photo``, a ``location`` [lat, lon]
        or a ``vector`` layer (a job); ``raster`` may be tiles, read at ``zoom`` over the area (as :meth:`embed`)."""
        return self._job(
            "/heatmap",
            {
                "raster": raster,
                "out": out,
                "at": _pair(at),
                "crs": crs,
                "photo": photo,
                "location": _pair(location),
                "vector": vector,
                "resolution": resolution,
                "model": model,
                "weights": weights,
                "sha256": sha256,
                "bands": None if bands is None else list(bands),
                "overwrite": overwrite,
                "zoom": zoom,
                "near": _pair(near),
                "radius_km": radius_km,
                "bbox": None if bbox is None else [float(v) for v in bbox],
                **_tile_fields(max_tiles=max_tiles, tile_cache=tile_cache, subdomains=subdomains),
                "retry_missing": retry_missing,
            },
        )

    # -------------------------------------------------------------------------------------------- jobs

    def job(self, job_id: str, wait: float = 0.0) -> Job:
        """The job now, or once it finished if that happens within ``wait`` seconds (at most 30)."""
        params = {"wait": min(wait, MAX_POLL_S)} if wait > 0 else None
        timeout = self.timeout + (wait or 0)
        return Job.from_json(self.request("GET", f"/jobs/{job_id}", params=params, timeout=timeout))

    def jobs(self) -> list[Job]:
        return [Job.from_json(j) for j in self.request("GET", "/jobs")]

    def cancel(self, job: Job | str) -> Job:
        """Ask the job to stop; it ends ``cancelled`` and leaves no partial output."""
        job_id = job.id if isinstance(job, Job) else job
        return Job.from_json(self.request("POST", f"/jobs/{job_id}/cancel"))

    def delete_job(self, job: Job | str) -> Job:
        """Cancel the job if it still runs, and make the service forget it."""
        job_id = job.id if isinstance(job, Job) else job
        return Job.from_json(self.request("DELETE", f"/jobs/{job_id}"))

    def wait(
        self,
        job: Job | str,
        *,
        timeout: float | None = None,
        poll: float = 1.0,
        on_progress: Callable[[float, str], None] | None = None,
        check: bool = True,
    ) -> Job:
        """Follow the job until it ends; ``on_progress(fraction, message)`` on the way.

        ``check``: raise ServiceError if it failed or was cancelled. TimeoutError after ``timeout`` s.
        """
        job_id = job.id if isinstance(job, Job) else job
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = MAX_POLL_S if deadline is None else max(0.0, deadline - time.monotonic())
            current = self.job(job_id, wait=min(poll, left))
            if on_progress is not None:
                on_progress(current.progress, current.message)
            if current.done:
                return current.raise_for_state() if check else current
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {current.state} after {timeout} s")


# ------------------------------------------------------------------------------------- a local engine


@dataclass
class LocalEngine:
    """An engine process started by :func:`launch`, and a client for it."""

    process: subprocess.Popen
    client: SkylocClient
    url: str
    token_file: str
    workdir: str

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (clean shutdown: jobs cancelled, no partial output), then kill after ``timeout``."""
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM if os.name == "posix" else signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(OSError):
            for name in os.listdir(self.workdir):
                os.unlink(os.path.join(self.workdir, name))
            os.rmdir(self.workdir)
        return self.process.returncode

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _start(
    args: list[str],
    extra_args: Sequence[str],
    workdir: str,
    env: Mapping[str, str] | None,
    stdout: Any,
    stderr: Any,
) -> subprocess.Popen:
    log = open(os.path.join(workdir, "engine.log"), "wb") if stderr is None else None  # noqa: SIM115
    try:
        return subprocess.Popen(
            [*args, *extra_args],
            stdout=stdout,
            stderr=log if log is not None else stderr,
            env=None if env is None else dict(env),
            # its own process group: Ctrl-C in the parent's terminal does not reach it; stop() does
            **(
                {"start_new_session": True}
                if os.name == "posix"
                else {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
            ),
        )
    except OSError as exc:  # no such executable, not executable
        raise ServiceError(None, "engine_failed", f"cannot start the engine {args[0]!r}: {exc}") from exc
    finally:
        if log is not None:
            log.close()


def _wait_ready(process: subprocess.Popen, ready: str, workdir: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(ready):
        if process.poll() is not None:
            tail = ""
            with contextlib.suppress(OSError):
                tail = Path(workdir, "engine.log").read_text(errors="replace")[-2000:]
            raise ServiceError(None, "engine_failed", f"the engine exited with {process.returncode}: {tail}")
        if time.monotonic() > deadline:
            raise ServiceError(None, "engine_failed", f"the engine did not start within {timeout} s")
        time.sleep(0.05)


WORKDIR_PREFIX = "skyloc-engine-"
OWNERS = "owners.json"


def _pid_alive(pid: object) -> bool:
    """True unless ``pid`` is certainly not running (POSIX; elsewhere: assumed running, never swept)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def sweep_workdirs(base: str | None = None) -> list[str]:
    """Remove the folders of earlier :func:`launch` calls whose client AND engine processes are both gone.

    Such a folder (token, ready file, engine log) stays behind when the engine was killed (kill -9, a
    crash) and the program that launched it (QGIS) ended without :meth:`LocalEngine.stop`. A folder whose
    client or engine may still run, or that names no owners, is left alone.
    """
    removed = []
    root = Path(base or tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for folder in root.glob(WORKDIR_PREFIX + "*"):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                if folder.is_symlink() or not folder.is_dir():
                    continue
                if hasattr(os, "getuid") and folder.stat().st_uid != os.getuid():
                    continue
                owners = json.loads((folder / OWNERS).read_text())
                pids = [owners.get("client_pid"), owners.get("engine_pid")]
                if any(p is None or _pid_alive(p) for p in pids):
                    continue
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(str(folder))
    return removed


def launch(
    command: Sequence[str],
    *,
    roots: Sequence[str],
    extra_args: Sequence[str] = (),
    timeout: float = 180.0,
    env: Mapping[str, str] | None = None,
    stdout: Any = subprocess.DEVNULL,
    stderr: Any = None,
) -> LocalEngine:
    """Start ``command`` (e.g. ``["/venv/bin/skyloc", "serve"]``) on a free loopback port with a fresh
    token, and wait until it answers. ``stderr`` None: a log file in the engine's private folder."""
    sweep_workdirs()  # what engines killed together with their launcher left behind
    workdir = tempfile.mkdtemp(prefix=WORKDIR_PREFIX)
    owners = Path(workdir, OWNERS)
    owners.write_text(json.dumps({"client_pid": os.getpid()}))
    ready = os.path.join(workdir, "ready.json")
    token_file = os.path.join(workdir, "token")
    args = [*command, "--host", "127.0.0.1", "--port", "0", "--token-file", token_file, "--ready-file", ready]
    for root in roots:
        args += ["--root", str(root)]
    process = None
    try:
        process = _start(args, extra_args, workdir, env, stdout, stderr)
        owners.write_text(json.dumps({"client_pid": os.getpid(), "engine_pid": process.pid}))
        _wait_ready(process, ready, workdir, timeout)
    except BaseException:  # failed, timed out or interrupted: no engine left behind, no folder either
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)  # the error message carries the log's end
        raise
    info = json.loads(Path(ready).read_text())
    client = SkylocClient(info["url"], token_file=info["token_file"])
    return LocalEngine(process, client, info["url"], info["token_file"], workdir)
