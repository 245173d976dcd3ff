"""The service under attack and bad luck (issue 11): real servers on loopback, real sockets, real VRTs.

- uploads and DELETEs at the same time never answer 500 (the quota check used to walk a folder that was
  being deleted from);
- a finished job keeps no reference to what its function held, finished jobs are pruned by count and
  age, and a full disk is 507 ``no_space``, not 500;
- the path policy covers what GDAL really opens: VRT sources (also in a VRT named ``.tif``, nested, in an
  ``.ovr``), OGR VRT sources, an index's tile imagery; a VRT pointing to ``/vsicurl/http://...`` makes
  no HTTP request (a counting loopback server receives none), and GDAL's network access is off;
- a killed engine's uploads, token, ready file and temporary folder are swept by the next one, never a
  live engine's;
- silent connections, a slowloris sending its headers byte by byte, and a trickled body are cut; the
  bearer scheme is case-insensitive.
"""

from __future__ import annotations

import errno
import gc
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

import numpy as np
import pytest
import rasterio
import requests
from imagery import ROOT, SAMPLE
from PIL import Image

from engine.client import ServiceError, SkylocClient, launch

SERVE = [sys.executable, "-m", "engine.cli", "serve"]
REQUEST_TIMEOUT = 1.5
MAX_IDLE = 16


# ---------------------------------------------------------------------------------------------- helpers


def status_of(fn) -> tuple[int | None, str]:
    with pytest.raises(ServiceError) as info:
        fn()
    return info.value.status, info.value.code


def vrt_of(source: str, like: Path, *, relative: bool) -> str:
    """A georeferenced VRT with the bands of ``like``, read from ``source``."""
    with rasterio.open(like) as ds:
        gt = ", ".join(repr(v) for v in ds.transform.to_gdal())
        wkt, width, height, count = escape(ds.crs.to_wkt()), ds.width, ds.height, ds.count
    bands = "".join(
        f'<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource>'
        f'<SourceFilename relativeToVRT="{int(relative)}">{escape(source)}</SourceFilename>'
        f"<SourceBand>{b}</SourceBand></SimpleSource></VRTRasterBand>"
        for b in range(1, count + 1)
    )
    return (
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>{wkt}</SRS>'
        f"<GeoTransform>{gt}</GeoTransform>{bands}</VRTDataset>"
    )


def centre(path: Path) -> list[float]:
    with rasterio.open(path) as ds:
        b = ds.bounds
    return [(b.left + b.right) / 2, (b.bottom + b.top) / 2]


class CountingServer:
    """A loopback HTTP server that counts every request it receives (it must receive none)."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        hits = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                hits.append(f"{self.command} {self.path}")
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD = do_POST = _any

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def closed_by_peer(sock: socket.socket) -> bool:
    """True if the other side closed (or reset) the connection; never blocks."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def wait_ready(proc: subprocess.Popen, ready: Path, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while not ready.exists():
        assert proc.poll() is None, f"the engine exited with {proc.returncode}"
        assert time.monotonic() < deadline, "the engine did not start"
        time.sleep(0.05)
    return json.loads(ready.read_text())


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def http_counter():
    server = CountingServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def ws(tmp_path_factory, http_counter) -> dict[str, Path]:
    """A root with imagery and hostile VRTs, and an outside folder they point to."""
    base = tmp_path_factory.mktemp("hardening")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    naip = root / "naip.tif"
    shutil.copy(SAMPLE / "naip_2018.tif", naip)
    shutil.copy(SAMPLE / "photo_2009_oblique.jpg", root / "photo.jpg")
    secret = outside / "secret.tif"
    shutil.copy(SAMPLE / "naip_2009.tif", secret)
    (outside / "pts.geojson").write_text(
        json.dumps({"type": "FeatureCollection", "features": []})  # a vector file outside the roots
    )
    (root / "good.vrt").write_text(vrt_of("naip.tif", naip, relative=True))
    (root / "evil.vrt").write_text(vrt_of(str(secret), naip, relative=False))
    (root / "evil_named.tif").write_text(vrt_of(str(secret), naip, relative=False))  # a VRT called .tif
    (root / "up.vrt").write_text(vrt_of("../outside/secret.tif", naip, relative=True))
    (root / "nested.vrt").write_text(vrt_of("evil_named.tif", naip, relative=True))
    url = f"/vsicurl/http://127.0.0.1:{http_counter.port}/secret.tif"
    (root / "curl.vrt").write_text(vrt_of(url, naip, relative=False))
    (root / "curl_named.tif").write_text(vrt_of(url, naip, relative=False))
    shutil.copy(naip, root / "ovr.tif")  # a real GeoTIFF whose external overview is a VRT to outside
    (root / "ovr.tif.ovr").write_text(vrt_of(str(secret), naip, relative=False))
    (root / "wms.tif").write_text(
        f"<GDAL_WMS><Service name='TMS'><ServerUrl>http://127.0.0.1:{http_counter.port}/${{z}}/${{x}}/${{y}}"
        "</ServerUrl></Service></GDAL_WMS>"
    )
    (root / "pts.vrt").write_text(
        f"<OGRVRTDataSource><OGRVRTLayer name='pts'><SrcDataSource>{outside / 'pts.geojson'}"
        "</SrcDataSource></OGRVRTLayer></OGRVRTDataSource>"
    )
    return {"root": root, "outside": outside, "base": base}


@pytest.fixture(scope="module")
def hard(ws, tmp_path_factory):
    """One engine: short request timeout, few idle connections allowed, uploads up to 1 MB."""
    log = tmp_path_factory.mktemp("hard_log") / "engine.log"
    with log.open("wb") as stderr:
        eng = launch(
            SERVE,
            roots=[str(ws["root"])],
            extra_args=[
                "--request-timeout",
                str(REQUEST_TIMEOUT),
                "--max-idle-connections",
                str(MAX_IDLE),
                "--max-upload-mb",
                "1",
            ],
            stderr=stderr,
        )
        try:
            yield eng
        finally:
            assert eng.stop() == 0
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "internal error" not in text, text[-3000:]


@pytest.fixture
def client(hard):
    with SkylocClient(hard.url, token_file=hard.token_file) as c:
        yield c


# ------------------------------------------------------------------------- 6: uploads and deletes at once


def test_concurrent_uploads_and_deletes_never_fail(hard, client):
    photo = SAMPLE / "photo_2009_oblique.jpg"
    kept = [client.upload(photo) for _ in range(150)]  # a full folder: the old quota walk took a while
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def worker(n: int) -> None:
        with SkylocClient(hard.url, token_file=hard.token_file) as c:
            for _ in range(n):
                try:
                    up = c.upload(photo)
                    c.delete_upload(up.id)
                    result = "ok"
                except ServiceError as exc:
                    result = f"{exc.status} {exc.code}"
                with lock:
                    outcomes[result] += 1

    threads = [threading.Thread(target=worker, args=(40,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert outcomes == Counter({"ok": 320}), outcomes
    for up in kept:
        client.delete_upload(up.id)
    assert status_of(lambda: client.delete_upload(kept[0].id)) == (404, "not_found")
    up = client.upload(photo)  # the bookkeeping is right: the folder is usable as before
    assert Path(up.path).is_file()
    client.delete_upload(up.id)


# ---------------------------------------------------------------------------------- 7: memory, disk full


def test_finished_jobs_release_their_function_and_are_pruned():
    from engine.service.jobs import JobManager, JobOutcome

    class Big:
        """Stands for what a job's closure holds: an opened index, decoded photos, feature windows."""

    jobs = JobManager(workers=1, queue_size=4, keep=2, keep_seconds=3600)
    try:
        refs = []

        def make(outcome: str):
            big = Big()
            refs.append(weakref.ref(big))

            def fn(progress, cancel):
                assert big is not None
                if outcome == "fail":
                    raise RuntimeError("boom")
                return JobOutcome([], {"ok": True})

            return fn

        done = [jobs.wait(jobs.submit("t", make(o), params={}, outputs=[]).id, 10) for o in ("ok", "fail")]
        assert [j.state for j in done] == ["succeeded", "failed"]
        gate = threading.Event()
        blocker = jobs.submit("t", lambda p, c: gate.wait(10) and JobOutcome([], None), params={}, outputs=[])
        queued = jobs.submit("t", make("ok"), params={}, outputs=[])
        jobs.cancel(queued.id)  # cancelled before it started
        gate.set()
        jobs.wait(blocker.id, 10)
        gc.collect()
        assert [r() for r in refs] == [None, None, None]  # nothing a finished job's function held is kept
        assert len([j for j in jobs.list() if j.state in ("succeeded", "failed", "cancelled")]) == 2
        jobs.keep_seconds = 0.2
        time.sleep(0.3)
        assert jobs.list() == []  # and none older than keep_seconds
    finally:
        jobs.shutdown()


def test_a_full_disk_in_a_job_is_507_not_500(tmp_path):
    from engine.service.jobs import JobManager

    jobs = JobManager(workers=1, queue_size=1)
    try:
        out = tmp_path / "out.tif"

        def fill(progress, cancel):
            out.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device", str(out))

        job = jobs.wait(jobs.submit("heatmap", fill, params={}, outputs=[out]).id, 10)
        assert job.state == "failed" and job.error["code"] == "no_space"
        assert job.error["http_status"] == 507 and not out.exists()
    finally:
        jobs.shutdown()


def test_a_full_disk_during_an_upload_is_507(tmp_path):
    """A real engine whose files may not grow past 256 KB (RLIMIT_FSIZE: writes fail with EFBIG)."""
    import resource

    root = tmp_path / "root"
    root.mkdir()
    big = tmp_path / "big.jpg"
    noise = np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    Image.fromarray(noise).save(big, quality=95)
    assert big.stat().st_size > 300_000
    ready = tmp_path / "ready.json"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    env = dict(os.environ, SKYLOC_CACHE=str(tmp_path / "cache"), TMPDIR=str(tmp_path))
    proc = subprocess.Popen(
        [*SERVE, "--root", str(root), "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=limit,
        env=env,
    )
    try:
        wait_ready(proc, ready)
        with SkylocClient.from_ready_file(ready) as c:
            assert status_of(lambda: c.upload(big)) == (507, "no_space")
            up = c.upload(SAMPLE / "photo_2009_oblique.jpg")  # the service goes on
            assert Path(up.path).is_file()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and b"Traceback" not in err, err[-2000:]


# ------------------------------------------------------------------------------------- 8: the path policy


HOSTILE = ["evil.vrt", "evil_named.tif", "up.vrt", "nested.vrt", "curl.vrt", "curl_named.tif", "ovr.tif"]


def test_vrts_pointing_out_of_the_roots_are_refused(client, ws, http_counter):
    root = ws["root"]
    at = centre(root / "naip.tif")
    assert len(client.embed("good.vrt", [at])["points"]) == 1  # a VRT inside the roots is fine
    for name in HOSTILE:
        assert status_of(lambda n=name: client.embed(n, [at])) == (403, "forbidden_path"), name
    assert status_of(lambda: client.embed("wms.tif", [at])) == (403, "forbidden_path")
    for name in ("evil_named.tif", "curl.vrt", "ovr.tif"):
        assert status_of(lambda n=name: client.heatmap(n, f"heat_{n}.tif", at=at)) == (403, "forbidden_path")
        assert not (root / f"heat_{name}.tif").exists()
    assert status_of(lambda: client.heatmap("naip.tif", "heat_v.tif", vector="pts.vrt")) == (
        403,
        "forbidden_path",
    )
    assert status_of(lambda: client.index(["evil_named.tif"], "idx_evil")) == (403, "forbidden_path")
    assert status_of(lambda: client.footprint(["photo.jpg"], "fp_evil.gpkg", against="nested.vrt")) == (
        403,
        "forbidden_path",
    )
    assert status_of(lambda: client.localize(["curl_named.tif"], "nowhere")) == (403, "forbidden_path")
    assert http_counter.requests == []  # no request ever left the engine
    assert client.health()["status"] == "ok"


def test_an_uploaded_vrt_cannot_point_out_of_the_roots(client, ws, http_counter, tmp_path):
    for name in ("evil_named.tif", "curl_named.tif"):
        src = tmp_path / name
        shutil.copy(ws["root"] / name, src)
        assert status_of(lambda s=src: client.upload(s)) == (403, "forbidden_path")
    assert http_counter.requests == []


def test_an_index_whose_imagery_is_outside_the_roots_is_refused(client, ws, sample_index):
    idx = ws["root"] / "idx_outside"
    shutil.copytree(sample_index, idx)  # its tiles name sample/naip_2018.tif, outside this engine's root
    assert status_of(
        lambda: client.footprint(["photo.jpg"], "fp_idx.gpkg", index="idx_outside", top_k=1)
    ) == (403, "forbidden_path")
    assert not (ws["root"] / "fp_idx.gpkg").exists()
    job = client.wait(client.localize(["photo.jpg"], "idx_outside", top_k=2), timeout=120)
    assert len(job.summary["photos"][0]["candidates"]) == 2  # retrieval reads only the index: allowed


def test_gdal_network_access_is_off_in_the_service_process(http_counter, tmp_path):
    """Whatever slips past the checks, GDAL itself sends no request (also through pyogrio's GDAL)."""
    port = http_counter.port
    (tmp_path / "curl.vrt").write_text(
        vrt_of(f"/vsicurl/http://127.0.0.1:{port}/a.tif", SAMPLE / "naip_2018.tif", relative=False)
    )
    code = f"""
import rasterio, pyogrio
from engine.service.serve import prepare_process
prepare_process()
tried = 0
for path in ["/vsicurl/http://127.0.0.1:{port}/b.tif", "/vsis3/bucket/c.tif", "{tmp_path / "curl.vrt"}"]:
    try:
        with rasterio.open(path) as ds:
            ds.read(1)
    except Exception:
        tried += 1
for path in ["/vsicurl/http://127.0.0.1:{port}/d.geojson", "http://127.0.0.1:{port}/e.geojson"]:
    try:
        pyogrio.read_info(path)
    except Exception:
        tried += 1
print(tried)
"""
    before = len(http_counter.requests)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "5"
    assert http_counter.requests[before:] == []


# ------------------------------------------------------------------------------ 11: sweep after kill -9


def test_a_killed_engines_files_are_swept_by_the_next_one_never_a_live_ones(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    tmp, cache = tmp_path / "tmp", tmp_path / "cache"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), SKYLOC_CACHE=str(cache))
    procs: list[subprocess.Popen] = []

    def start(name: str) -> tuple[subprocess.Popen, dict, Path]:
        ready = tmp_path / f"{name}.json"
        proc = subprocess.Popen(
            [*SERVE, "--root", str(root), "--ready-file", str(ready)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        procs.append(proc)
        return proc, wait_ready(proc, ready), ready

    def own_dirs(pid: int) -> list[Path]:
        return list(tmp.glob(f"skyloc-serve-{pid}-*"))

    # leftovers the sweep must leave alone: a folder of a live process (pid 1), another user's kind of name
    live_other = tmp / "skyloc-serve-1-keepme"
    live_other.mkdir()
    (live_other / "owner.json").write_text(json.dumps({"pid": 1}))
    try:
        a, a_info, a_ready = start("a")
        b, b_info, b_ready = start("b")
        with SkylocClient(b_info["url"], token_file=b_info["token_file"]) as c:
            up = c.upload(SAMPLE / "photo_2009_oblique.jpg")
        assert Path(up.path).is_file() and Path(up.path).is_relative_to(own_dirs(b.pid)[0])
        b.send_signal(signal.SIGKILL)
        b.wait(30)
        left = [Path(up.path), Path(b_info["token_file"]), b_ready, *own_dirs(b.pid)]
        assert all(p.exists() for p in left)  # what a kill -9 leaves

        c_proc, c_info, _ = start("c")
        assert not any(p.exists() for p in left), [p for p in left if p.exists()]
        # the live engine's folder, token and ready file are untouched, and it still answers
        assert own_dirs(a.pid) and Path(a_info["token_file"]).exists() and a_ready.exists()
        with SkylocClient(a_info["url"], token_file=a_info["token_file"]) as c:
            assert c.health()["status"] == "ok"
        assert live_other.exists()
        for proc in (a, c_proc):
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        assert not own_dirs(a.pid) and not own_dirs(c_proc.pid)  # a clean exit removes its own
        assert not Path(a_info["token_file"]).exists()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_launch_sweeps_folders_of_engines_killed_with_their_launcher(tmp_path, monkeypatch):
    """The plugin's side: launch()'s folder (token, ready file, log) of a dead engine and dead launcher."""
    import tempfile as _tempfile

    from engine.client import sweep_workdirs

    monkeypatch.setattr(_tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / "skyloc-engine-dead"
    dead.mkdir()
    for name in ("token", "ready.json", "engine.log"):
        (dead / name).write_text("x")
    (dead / "owners.json").write_text(json.dumps({"client_pid": gone.pid, "engine_pid": gone.pid}))
    alive = tmp_path / "skyloc-engine-alive"  # its launcher runs (this process): kept
    alive.mkdir()
    (alive / "owners.json").write_text(json.dumps({"client_pid": os.getpid(), "engine_pid": gone.pid}))
    unknown = tmp_path / "skyloc-engine-old"  # no owners recorded (an older client): kept
    unknown.mkdir()
    with pytest.raises(ServiceError):
        launch(["false"], roots=[str(tmp_path)], timeout=20)
    assert not dead.exists() and alive.exists() and unknown.exists()
    assert sweep_workdirs() == []


# ------------------------------------------------------------------------ 15: slow clients, bearer case


def test_silent_and_slowloris_connections_are_cut(hard, client):
    parts = urlsplit(hard.url)
    address = (parts.hostname, parts.port)
    fd_dir = Path(f"/proc/{hard.process.pid}/fd")
    fds_before = len(list(fd_dir.iterdir())) if fd_dir.exists() else None
    t0 = time.monotonic()
    silent = [socket.create_connection(address, timeout=5) for _ in range(3 * MAX_IDLE)]
    slow = socket.create_connection(address, timeout=5)
    cut = threading.Event()

    def trickle() -> None:  # headers one byte at a time, never finished
        for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 400:
            try:
                slow.send(bytes([byte]))
            except OSError:
                cut.set()
                return
            time.sleep(0.05)

    def until(predicate, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return predicate()

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        # the cap: the oldest waiting connections are closed at once, well before the timeout
        capped = until(
            lambda: sum(not closed_by_peer(s) for s in silent) <= MAX_IDLE, t0 + 0.8 * REQUEST_TIMEOUT
        )
        assert capped, "more connections than --max-idle-connections were left waiting"
        assert client.health()["status"] == "ok"  # the plugin is not locked out meanwhile
        # the timeout: every silent connection, and the trickling one, is closed
        assert until(lambda: all(closed_by_peer(s) for s in silent), time.monotonic() + REQUEST_TIMEOUT + 8)
        assert until(lambda: cut.is_set() or closed_by_peer(slow), time.monotonic() + REQUEST_TIMEOUT + 8)
        assert client.health()["status"] == "ok"
        if fds_before is not None:
            assert until(lambda: len(list(fd_dir.iterdir())) <= fds_before + 2, time.monotonic() + 5)
    finally:
        for s in [*silent, slow]:
            s.close()


def test_a_trickled_body_is_cut_with_408(hard):
    parts = urlsplit(hard.url)
    token = Path(hard.token_file).read_text().strip()
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        s.sendall(
            (
                "POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {token}\r\nContent-Length: 100\r\n\r\n"
                '{"raster": '
            ).encode()
        )
        t0 = time.monotonic()
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        elapsed = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"timeout"' in answer and elapsed < REQUEST_TIMEOUT + 3


def test_the_bearer_scheme_is_case_insensitive(hard):
    token = Path(hard.token_file).read_text().strip()
    for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
        r = requests.get(hard.url + "/health", headers={"Authorization": f"{scheme} {token}"}, timeout=10)
        assert r.status_code == 200, scheme
    for header in (f"bearer {token}x", f"Basic {token}", "bearer", f"bearer{token}"):
        r = requests.get(hard.url + "/health", headers={"Authorization": header}, timeout=10)
        assert r.status_code == 401 and r.json()["code"] == "unauthorized", header
