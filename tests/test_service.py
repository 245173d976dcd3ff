"""The HTTP service (``skyloc serve``): a real server on loopback, started by the tests, real requests.

Token on every endpoint; paths (``../``, symlinks) kept inside the roots; oversize uploads and
decompression bombs refused; a corrupt image answered 422 with the server still working; jobs that can be
cancelled and leave no partial output; two clients at once; clients that go away mid-request; busy queue;
refusal of a non-loopback host; clean SIGTERM. The schemathesis fuzz run is in test_service_fuzz.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from imagery import ROOT, SAMPLE

from engine import __version__, api
from engine.client import ServiceError, SkylocClient, launch

SERVE = [sys.executable, "-m", "engine.cli", "serve"]
HAS_EMBED = hasattr(api, "embed_at") and hasattr(api, "heatmap")
needs_embed = pytest.mark.skipif(not HAS_EMBED, reason="engine.api has no embed_at/heatmap yet")


# ---------------------------------------------------------------------------------------------- helpers


def png_declaring(width: int, height: int) -> bytes:
    """A valid little PNG file whose header declares ``width`` x ``height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def raw_request(url: str, head: str, body: bytes = b"", *, read: bool = False) -> bytes:
    """Send bytes on a fresh socket and hang up (without reading the answer unless ``read``)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        s.sendall(head.encode() + body)
        if not read:
            return b""
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
        return b"".join(chunks)


def wait_state(client: SkylocClient, job_id: str, predicate, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.job(job_id)
        if predicate(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached the expected state: {client.job(job_id)}")


def status_of(fn) -> tuple[int | None, str]:
    with pytest.raises(ServiceError) as info:
        fn()
    return info.value.status, info.value.code


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """A root folder with the sample imagery and photos, and an outside folder the service must not touch."""
    base = tmp_path_factory.mktemp("service")
    root, outside = base / "root", base / "outside"
    (root / "photos").mkdir(parents=True)
    outside.mkdir()
    for name in ("naip_2018.tif", "naip_2009.tif"):
        shutil.copy(SAMPLE / name, root / name)
    shutil.copy(SAMPLE / "photo_2009_oblique.jpg", root / "photo.jpg")
    shutil.copy(SAMPLE / "photo_2009_oblique.jpg", root / "photos" / "a.jpg")
    shutil.copy(SAMPLE / "photo_2009_oblique.jpg", outside / "secret.jpg")
    shutil.copy(SAMPLE / "naip_2018.tif", outside / "naip.tif")
    return {"root": root, "outside": outside}


@pytest.fixture(scope="module")
def engine(workspace, sample_index, tmp_path_factory):
    """One real engine process for the module: 1 worker, 2 waiting jobs, uploads up to 1 MB.

    At the end: it stops with 0 on SIGTERM, and its log holds no traceback (no internal error happened).
    """
    roots = [str(workspace["root"]), str(sample_index.parent)]
    log = tmp_path_factory.mktemp("engine_log") / "engine.log"
    with log.open("wb") as stderr:
        eng = launch(
            SERVE,
            roots=roots,
            extra_args=["--workers", "1", "--queue", "2", "--max-upload-mb", "1"],
            stderr=stderr,
        )
        try:
            yield eng
        finally:
            assert eng.stop() == 0
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "internal error" not in text, text[-3000:]


@pytest.fixture
def client(engine):
    with SkylocClient(engine.url, token_file=engine.token_file) as c:
        yield c
        for job in c.jobs():  # leave no job running for the next test
            if not job.done:
                c.cancel(job)
        for job in c.jobs():
            if not job.done:
                c.wait(job, timeout=120, check=False)


# ------------------------------------------------------------------------------------------------ token


def test_token_required_on_every_endpoint(engine, client):
    schema = client.request("GET", "/openapi.json")
    operations = [(m.upper(), p) for p, ops in schema["paths"].items() for m in ops]
    assert len(operations) >= 12
    wanted = {"/health", "/version", "/models", "/index", "/localize", "/footprint", "/jobs/{job_id}"}
    assert wanted <= {p for _, p in operations}
    headers_cases = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}]
    for method, path in [*operations, ("GET", "/openapi.json"), ("GET", "/no/such/endpoint")]:
        url = engine.url + path.replace("{job_id}", "1-abc").replace("{upload_id}", "0" * 16)
        for headers in headers_cases:
            r = requests.request(method, url, headers=headers, json={}, timeout=10)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["code"] == "unauthorized"
            assert "Traceback" not in r.text
    assert client.health()["status"] == "ok"


def test_token_file_is_private(engine):
    mode = stat.S_IMODE(os.stat(engine.token_file).st_mode)
    assert mode == 0o600
    assert len(Path(engine.token_file).read_text().strip()) >= 40


def test_short_actions(client):
    health = client.health()
    assert health["status"] == "ok" and health["jobs"]["workers"] == 1
    version = client.version()
    assert version["version"] == __version__ and version["api_version"] == 1
    assert {"index", "localize", "footprint"} <= set(version["actions"])
    names = {m["name"] for m in client.models()}
    assert {"effnet-lite1-gem", "effnet-lite0-gem"} <= names  # the default (Lite1) and the one before it


# ------------------------------------------------------------------------------------------------ paths


def test_path_traversal_refused(client, workspace, sample_index):
    outside = workspace["outside"]
    cases = [
        lambda: client.localize(["../outside/secret.jpg"], str(sample_index)),
        lambda: client.localize(["photos/../../outside/secret.jpg"], str(sample_index)),
        lambda: client.localize([str(outside / "secret.jpg")], str(sample_index)),
        lambda: client.localize(["photo.jpg"], "../outside"),
        lambda: client.localize(["photo.jpg"], str(sample_index), out="../outside/cands.gpkg"),
        lambda: client.index(["naip_2018.tif"], "../outside/idx"),
        lambda: client.index(["../outside/naip.tif"], "idx_x"),
        lambda: client.footprint(["photo.jpg"], "../outside/fp.gpkg", against="naip_2009.tif"),
        lambda: client.footprint(["photo.jpg"], "fp.gpkg", against="../outside/naip.tif"),
        lambda: client.footprint(["photo.jpg"], "fp.gpkg", against="naip_2009.tif", georef_dir="/tmp"),
    ]
    if HAS_EMBED:
        cases += [
            lambda: client.embed("../outside/naip.tif", [[0, 0]]),
            lambda: client.heatmap("naip_2018.tif", "../outside/heat.tif", at=[0, 0]),
        ]
    for case in cases:
        assert status_of(case) == (403, "forbidden_path")
    assert sorted(p.name for p in outside.iterdir()) == ["naip.tif", "secret.jpg"]
    assert client.health()["status"] == "ok"


def test_symlinks_out_of_the_roots_refused(client, workspace, sample_index):
    root, outside = workspace["root"], workspace["outside"]
    links = root / "links"
    links.mkdir(exist_ok=True)
    (links / "secret.jpg").unlink(missing_ok=True)
    (links / "secret.jpg").symlink_to(outside / "secret.jpg")
    (links / "outdir").unlink(missing_ok=True)
    (links / "outdir").symlink_to(outside, target_is_directory=True)
    mixed = root / "mixed_photos"
    mixed.mkdir(exist_ok=True)
    shutil.copy(root / "photo.jpg", mixed / "ok.jpg")
    (mixed / "evil.jpg").unlink(missing_ok=True)
    (mixed / "evil.jpg").symlink_to(outside / "secret.jpg")
    cases = [
        lambda: client.localize(["links/secret.jpg"], str(sample_index)),  # a file link
        lambda: client.localize(["links/outdir/secret.jpg"], str(sample_index)),  # through a folder link
        lambda: client.localize(["mixed_photos"], str(sample_index)),  # a folder holding a link out
        lambda: client.localize(["photo.jpg"], str(sample_index), out="links/outdir/c.gpkg"),  # writing out
        lambda: client.index(["links/outdir/naip.tif"], "idx_y"),
    ]
    for case in cases:
        assert status_of(case) == (403, "forbidden_path")
    # a link that stays inside the roots is fine
    (links / "inside.jpg").unlink(missing_ok=True)
    (links / "inside.jpg").symlink_to(root / "photo.jpg")
    job = client.wait(client.localize(["links/inside.jpg"], str(sample_index), top_k=2), timeout=120)
    assert job.summary["photos"][0]["photo"] == str((root / "photo.jpg").resolve())
    assert not list(outside.glob("*.gpkg"))


def test_index_never_replaces_a_folder_that_is_not_an_index(client, workspace):
    folder = workspace["root"] / "my_documents"
    folder.mkdir(exist_ok=True)
    (folder / "thesis.txt").write_text("precious")
    assert status_of(lambda: client.index(["naip_2018.tif"], "my_documents")) == (422, "bad_input")
    assert status_of(lambda: client.index(["naip_2018.tif"], ".")) == (422, "bad_input")
    assert (folder / "thesis.txt").read_text() == "precious"
    order = workspace["root"] / "planet_order"  # a delivery with its own manifest.json
    order.mkdir(exist_ok=True)
    (order / "manifest.json").write_text("{}")
    (order / "scene.txt").write_text("imagery")
    assert status_of(lambda: client.index(["naip_2018.tif"], "planet_order")) == (422, "bad_input")
    assert (order / "scene.txt").read_text() == "imagery" and (order / "manifest.json").read_text() == "{}"


def test_outputs_never_replace_inputs_or_foreign_files(client, workspace):
    root = workspace["root"]
    raster = root / "naip_2018.tif"
    before = raster.stat().st_size, raster.stat().st_mtime_ns
    at = [488000.0, 5207000.0]
    for overwrite in (None, True):
        assert status_of(
            lambda ow=overwrite: client.heatmap("naip_2018.tif", "naip_2018.tif", at=at, overwrite=ow)
        ) == (
            409,
            "output_exists",
        )
    assert (raster.stat().st_size, raster.stat().st_mtime_ns) == before
    foreign = root / "notes_heat.tif"
    shutil.copy(SAMPLE / "naip_2009.tif", foreign)
    assert status_of(lambda: client.heatmap("naip_2018.tif", "notes_heat.tif", at=at)) == (
        409,
        "output_exists",
    )
    job = client.wait(
        client.heatmap("naip_2018.tif", "notes_heat.tif", at=at, resolution=30, overwrite=True), timeout=300
    )
    assert job.state == "succeeded" and job.summary["width"] > 0


# ---------------------------------------------------------------------------------------------- uploads


def test_upload_then_localize(client, sample_index):
    up = client.upload(SAMPLE / "photo_2009_oblique.jpg", name="../../my photo.JPG")
    assert (up.width, up.height) == (400, 400) and Path(up.path).name == "my_photo.jpg"
    job = client.wait(client.localize([up.path], str(sample_index), top_k=3), timeout=120)
    assert len(job.summary["photos"][0]["candidates"]) == 3
    client.delete_upload(up.id)
    assert not Path(up.path).exists()
    assert status_of(lambda: client.delete_upload(up.id)) == (404, "not_found")


def test_oversize_upload_refused(engine, client, tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(os.urandom(2 * 2**20))  # over the 1 MB limit of the test engine
    assert status_of(lambda: client.upload(big)) == (413, "too_large")

    # the same without a Content-Length (chunked): refused while streaming, not after storing it all
    boundary = "skylocboundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n\r\n'

    def body():
        yield head.encode()
        for _ in range(8):
            yield os.urandom(2**18)
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.session.post(
        engine.url + "/uploads",
        data=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        timeout=30,
    )
    assert r.status_code == 413 and r.json()["code"] == "too_large"
    # a JSON body over its own (smaller) limit
    r = client.session.post(engine.url + "/embed", data=b"[" + b"0," * 3_000_000 + b"0]", timeout=30)
    assert r.status_code == 413
    assert client.health()["status"] == "ok"


def test_decompression_bomb_refused_before_decoding(client, workspace, sample_index, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(50_000, 50_000))  # 2.5 gigapixels in 200 bytes
    assert bomb.stat().st_size < 300
    assert status_of(lambda: client.upload(bomb)) == (413, "too_large")
    # given as a path, refused at submission (header only), both over PIL's own limit and just over ours
    for name, size in (("bomb.png", (50_000, 50_000)), ("big.png", (12_000, 10_000))):
        (workspace["root"] / name).write_bytes(png_declaring(*size))
        assert status_of(lambda n=name: client.localize([n], str(sample_index))) == (413, "too_large")
    assert client.health()["status"] == "ok"


def test_corrupt_image_422_and_the_next_request_works(client, workspace, sample_index, tmp_path):
    good = (SAMPLE / "photo_2009_oblique.jpg").read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good[: len(good) // 3])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all" * 10)
    assert status_of(lambda: client.upload(truncated)) == (422, "bad_input")
    assert status_of(lambda: client.upload(garbage)) == (422, "bad_input")
    assert client.upload(SAMPLE / "photo_2009_oblique.jpg").width == 400

    # by path: the header is fine, the pixels are not: the job fails with the engine's code and status
    shutil.copy(truncated, workspace["root"] / "truncated.jpg")
    job = client.wait(client.localize(["truncated.jpg"], str(sample_index)), timeout=120, check=False)
    assert job.state == "failed"
    assert job.error["code"] == "bad_input" and job.error["http_status"] == 422
    assert "Traceback" not in json.dumps(job.error)
    # bad JSON, bad fields, unknown method: JSON errors too
    r = client.session.post(client.url + "/localize", data=b"{not json", timeout=10)
    assert r.status_code == 422 and r.json()["code"] == "bad_input"
    r = client.session.post(
        client.url + "/localize", json={"photos": [], "index": "x", "bogus": 1}, timeout=10
    )
    assert r.status_code == 422 and set(r.json()) == {"code", "message"}
    r = client.session.put(client.url + "/health", timeout=10)
    assert r.status_code == 405 and r.json()["code"] == "method_not_allowed"
    # and the next real request works
    job = client.wait(client.localize(["photo.jpg"], str(sample_index), top_k=2), timeout=120)
    assert job.state == "succeeded"


# ------------------------------------------------------------------------------------------------- jobs


def test_localize_and_index_jobs(client, workspace, sample_index):
    root = workspace["root"]
    seen = []
    job = client.localize(["photos", "photo.jpg"], str(sample_index), out="cands.gpkg", top_k=3)
    assert job.state in ("queued", "running")
    job = client.wait(job, timeout=120, on_progress=lambda f, m: seen.append((f, m)))
    assert job.files == [str(root / "cands.gpkg")] and (root / "cands.gpkg").exists()
    assert [len(p["candidates"]) for p in job.summary["photos"]] == [3, 3]
    assert seen and seen[-1][0] == 1.0

    job = client.wait(
        client.index(["naip_2018.tif"], "idx_small", tile_sizes=[512], input_size=96), timeout=300
    )
    assert sorted(Path(f).name for f in job.files) == ["index.faiss", "manifest.json", "tiles.gpkg"]
    assert job.summary["counts"]["tiles"] > 0
    assert not (root / "idx_small.partial").exists()


def test_not_found_and_model_mismatch(client, workspace, sample_index):
    assert status_of(lambda: client.job("1-deadbeef")) == (404, "job_not_found")
    assert status_of(lambda: client.cancel("nope")) == (404, "job_not_found")
    assert status_of(lambda: client.localize(["photo.jpg"], "no_such_index")) == (404, "index_not_found")
    assert status_of(lambda: client.localize(["photo.jpg"], "photos")) == (404, "index_not_found")
    mismatch = lambda: client.localize(["photo.jpg"], str(sample_index), model="astroloc-random")  # noqa: E731
    assert status_of(mismatch) == (409, "model_mismatch")
    assert status_of(lambda: client.localize(["photo.jpg"], str(sample_index), model="nope")) == (
        422,
        "bad_input",
    )
    assert status_of(lambda: client.localize(["nope.jpg"], str(sample_index))) == (422, "bad_input")
    # a model folder (skyloc train) is read like any input: never outside the roots, even to probe it
    outside = lambda: client.localize(["photo.jpg"], str(sample_index), model="/etc")  # noqa: E731
    assert status_of(outside)[0] == 403


def test_footprint_job_writes_the_georeferenced_photo(client, workspace, sample_index):
    root = workspace["root"]
    job = client.footprint(["photo.jpg"], "fp.gpkg", against="naip_2009.tif", top_k=1)
    job = client.wait(job, timeout=300)
    assert job.summary["localized"] == 1
    assert set(job.files) == {
        str(root / "fp.gpkg"),
        str(root / "fp_georef" / "photo.jpg.tif"),
        str(root / "fp_georef" / "photo.jpg.points"),
    }
    assert all(Path(f).is_file() for f in job.files)
    # NAIP has no band names: read with guessed bands, which the job says (the plugin lists it)
    assert any("band order guessed" in w for w in job.warnings), job.warnings
    # the bands the analyst's layer shows: nothing guessed, and they are in the job's parameters
    job = client.wait(
        client.footprint(["photo.jpg"], "fp_bands.gpkg", against="naip_2009.tif", top_k=1, bands=[1, 2, 3]),
        timeout=300,
    )
    assert job.summary["localized"] == 1 and job.params["bands"] == [1, 2, 3]
    assert not [w for w in job.warnings if "band order guessed" in w], job.warnings
    assert status_of(
        lambda: client.footprint(["photo.jpg"], "fp_b.gpkg", index=str(sample_index), bands=[1, 2, 3])
    ) == (422, "bad_input")
    # rerank is a compressed index's setting: refused before a job for this Flat index
    assert status_of(lambda: client.localize(["photo.jpg"], str(sample_index), rerank=8)) == (
        422,
        "bad_input",
    )


def test_footprint_job_with_the_learned_matcher(client, workspace):
    job = client.footprint(
        ["photo.jpg"], "fp_aliked.gpkg", against="naip_2009.tif", top_k=1, matcher="aliked"
    )
    job = client.wait(job, timeout=600)
    (photo,) = job.summary["photos"]
    assert job.summary["localized"] == 1 and photo["matcher"] == "aliked", photo
    assert status_of(
        lambda: client.footprint(["photo.jpg"], "fp_x.gpkg", against="naip_2009.tif", matcher="superpoint")
    ) == (422, "bad_input")


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_cancelled_index_leaves_no_partial_output(client, workspace):
    root = workspace["root"]
    before = _tree(root)
    # ~600 small tiles: long enough to be cancelled once descriptors are on disk
    job = client.index(["naip_2018.tif"], "idx_cancel", tile_sizes=[64], input_size=64)
    wait_state(client, job.id, lambda j: j.state == "running" and (root / "idx_cancel.partial").exists())
    wait_state(client, job.id, lambda j: j.progress >= 0.25 or j.done)
    assert list((root / "idx_cancel.partial").rglob("*")), "the build wrote nothing before the cancel"
    client.cancel(job)
    job = client.wait(job, timeout=120, check=False)
    assert job.state == "cancelled", job
    assert not (root / "idx_cancel").exists() and not (root / "idx_cancel.partial").exists()
    assert _tree(root) == before
    assert client.health()["status"] == "ok"


def test_cancelled_footprint_batch_leaves_no_partial_output(client, workspace):
    root = workspace["root"]
    batch = root / "batch"
    batch.mkdir(exist_ok=True)
    for name in ("p1.jpg", "p2.jpg"):
        shutil.copy(root / "photo.jpg", batch / name)
    before = _tree(root)
    job = client.footprint(["batch"], "batch_fp.gpkg", against="naip_2009.tif", top_k=1)
    # cancel while the second photo runs: the first one's GeoTIFF, .points and record are on disk
    wait_state(client, job.id, lambda j: "photo 2 of 2" in j.message or j.done, timeout=300)
    georef = root / "batch_fp_georef"
    assert (georef / "p1.jpg.tif").exists() and (root / "batch_fp.gpkg.parts").exists()
    job = client.cancel(job)
    job = client.wait(job, timeout=120, check=False)
    assert job.state == "cancelled", job
    assert not georef.exists() and not (root / "batch_fp.gpkg").exists()
    assert not (root / "batch_fp.gpkg.parts").exists()
    assert _tree(root) == before


def test_cancel_a_queued_job_and_delete_jobs(client, workspace):
    running = client.index(["naip_2018.tif"], "idx_q1", tile_sizes=[64], input_size=64)
    queued = client.index(["naip_2018.tif"], "idx_q2", tile_sizes=[64], input_size=64)
    assert client.cancel(queued).state == "cancelled"
    gone = client.delete_job(queued)
    assert gone.state == "cancelled"
    assert status_of(lambda: client.job(queued.id)) == (404, "job_not_found")
    client.delete_job(running)
    deadline = time.monotonic() + 120
    while running.id in {j.id for j in client.jobs()} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running.id not in {j.id for j in client.jobs()}
    for name in ("idx_q1", "idx_q2"):
        assert not (workspace["root"] / name).exists()
        assert not (workspace["root"] / f"{name}.partial").exists()


def test_busy_when_the_queue_is_full_and_conflicting_outputs(client, workspace):
    jobs = [client.index(["naip_2018.tif"], f"idx_busy{i}", tile_sizes=[64], input_size=64) for i in range(3)]
    # 1 running + 2 waiting: the next one is refused, and so is a second writer of the same output
    assert status_of(lambda: client.index(["naip_2018.tif"], "idx_busy9")) == (503, "busy")
    for job in jobs:
        client.cancel(job)
    client.wait(jobs[0], timeout=120, check=False)
    job = client.index(["naip_2018.tif"], "idx_busy0", tile_sizes=[64], input_size=64)
    assert status_of(lambda: client.index(["naip_2018.tif"], "idx_busy0")) == (409, "output_in_use")
    client.wait(client.cancel(job), timeout=120, check=False)
    assert not list(workspace["root"].glob("idx_busy*"))


# --------------------------------------------------------------------------------- concurrency, network


def test_two_clients_at_once(engine, workspace, sample_index):
    results: dict[str, object] = {}

    def first():
        with SkylocClient(engine.url, token_file=engine.token_file) as c:
            jobs = [c.localize(["photo.jpg"], str(sample_index), top_k=2) for _ in range(2)]
            results["first"] = [c.wait(j, timeout=300).state for j in jobs]

    def second():
        with SkylocClient(engine.url, token_file=engine.token_file) as c:
            out = []
            for _ in range(5):
                out.append(c.health()["status"])
                out.append(len(c.models()) > 0)
                if HAS_EMBED:
                    out.append(c.embed("naip_2018.tif", [[488000.0, 5207000.0]])["dim"] > 0)
            results["second"] = out

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results["first"] == ["succeeded", "succeeded"]
    assert results["second"] and all(v in ("ok", True) for v in results["second"])


def test_client_disconnect_mid_job(engine, client, workspace, sample_index):
    token = Path(engine.token_file).read_text().strip()
    body = json.dumps({"photos": ["photo.jpg"], "index": str(sample_index), "top_k": 2}).encode()
    head = (
        f"POST /localize HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    raw_request(engine.url, head, body)  # submit and hang up at once
    # an upload cut off in the middle of its body
    raw_request(
        engine.url,
        f"POST /uploads HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 500000\r\n\r\n",
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n\r\n' + b"\xff" * 1000,
    )
    # a long poll abandoned half way
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not client.jobs():
        time.sleep(0.05)
    job = next(j for j in client.jobs() if j.kind == "localize")
    raw_request(
        engine.url,
        f"GET /jobs/{job.id}?wait=20 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n",
    )
    # the job goes on without its client, and the server still answers everyone
    assert client.wait(job, timeout=120).state == "succeeded"
    assert client.health()["status"] == "ok"
    reply = raw_request(
        engine.url,
        f"GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n",
        read=True,
    )
    assert reply.startswith(b"HTTP/1.1 200")


@needs_embed
def test_embed_and_heatmap(client, workspace):
    root = workspace["root"]
    result = client.embed("naip_2018.tif", [[488000.0, 5207000.0], [489000.0, 5206000.0]])
    assert len(result["points"]) == 2 and len(result["points"][0]["vector"]) == result["dim"]
    lonlat = client.embed("naip_2018.tif", [[-99.16, 47.01]], crs="EPSG:4326")
    assert len(lonlat["points"]) == 1
    assert status_of(lambda: client.embed("naip_2018.tif", [[0.0, 0.0]]))[0] == 422  # outside the raster
    assert status_of(lambda: client.embed("photo.jpg.missing", [[0.0, 0.0]])) == (422, "bad_input")
    job = client.wait(client.heatmap("naip_2018.tif", "heat.tif", at=[488000.0, 5207000.0]), timeout=300)
    assert set(job.files) == {str(root / "heat.tif"), str(root / "heat.qml")}
    assert job.summary["width"] > 0
    job = client.wait(client.heatmap("naip_2018.tif", "heat2.tif", photo="photo.jpg"), timeout=300)
    assert (root / "heat2.tif").exists()
    bad = client.wait(client.heatmap("naip_2018.tif", "heat3.tif"), timeout=60, check=False)
    assert bad.state == "failed" and bad.error["http_status"] == 422
    assert not (root / "heat3.tif").exists()


# ------------------------------------------------------------------------------------- the serve command


def test_refuses_a_non_loopback_host_without_the_flag(tmp_path):
    from engine.service.serve import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.0.2.1")
    for host in ("0.0.0.0", "::"):
        proc = subprocess.run(
            [*SERVE, "--host", host, "--root", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert proc.returncode == 2, proc.stderr
        assert "--allow-remote" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())


def test_a_world_readable_token_file_is_refused(tmp_path):
    token = tmp_path / "token"
    token.write_text("x" * 43)
    token.chmod(0o644)
    proc = subprocess.run(
        [*SERVE, "--token-file", str(token), "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3 and "chmod 600" in proc.stderr


def test_sigterm_shuts_down_cleanly(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(SAMPLE / "naip_2018.tif", root / "naip.tif")
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [*SERVE, "--root", str(root), "--ready-file", str(ready)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=root,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        token_file = Path(info["token_file"])  # generated: ~/.cache/skyloc/serve-PORT.token
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        client = SkylocClient.from_ready_file(ready)
        job = client.index(["naip.tif"], "idx", tile_sizes=[64], input_size=64)
        wait_state(client, job.id, lambda j: j.state == "running" and (root / "idx.partial").exists())
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "listening on http://127.0.0.1:" in out and "stopped" in out
    assert "Traceback" not in err
    assert not token_file.exists() and not ready.exists()
    assert sorted(p.name for p in root.iterdir()) == ["naip.tif"]  # the running job left nothing


# -------------------------------------------------------------------------------------- client, internals


def test_client_is_importable_alone(tmp_path):
    """The plugin vendors engine/client.py: it must import with nothing but the stdlib and requests."""
    shutil.copy(ROOT / "engine" / "client.py", tmp_path / "skyloc_client.py")
    code = (
        "import sys, skyloc_client; "
        "heavy = {'numpy', 'torch', 'faiss', 'engine', 'rasterio', 'fastapi'} & set(sys.modules); "
        "assert not heavy, heavy; print(skyloc_client.SkylocClient.__name__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "SkylocClient"


def test_unexpected_exception_becomes_a_json_500_without_traceback():
    from engine.service.middleware import CatchAllMiddleware

    async def broken(scope, receive, send):
        raise RuntimeError("secret internals /etc/shadow")

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    asyncio.run(CatchAllMiddleware(broken)({"type": "http", "method": "GET", "path": "/x"}, receive, send))
    assert sent[0]["status"] == 500
    body = json.loads(sent[1]["body"])
    assert body["code"] == "internal_error" and "secret" not in body["message"]


def test_job_internal_error_and_cleanup(tmp_path):
    from engine.service.jobs import JobManager, JobOutcome

    jobs = JobManager(workers=1, queue_size=1)
    try:
        out = tmp_path / "out.txt"

        def crash(progress, cancel):
            out.write_text("half")
            raise RuntimeError("boom")

        job = jobs.submit("test", crash, params={}, outputs=[out])
        jobs.wait(job.id, 10)
        assert (
            job.state == "failed"
            and job.error["code"] == "internal_error"
            and job.error["http_status"] == 500
        )
        assert "boom" not in job.error["message"] and not out.exists()

        def fine(progress, cancel):
            progress(0.5, "half way")
            out.write_text("done")
            return JobOutcome([str(out)], {"ok": True})

        job = jobs.wait(jobs.submit("test", fine, params={}, outputs=[out]).id, 10)
        assert job.state == "succeeded" and job.result["files"] == [str(out)] and job.progress == 1.0
    finally:
        jobs.shutdown()


def test_launch_failures_leave_no_engine_and_no_folder(tmp_path, monkeypatch):
    import tempfile as _tempfile

    from engine.client import ServiceError, launch

    monkeypatch.setattr(_tempfile, "tempdir", str(tmp_path))
    for command, text in (([str(tmp_path / "no-such-skyloc")], "cannot start"), (["false"], "exited with 1")):
        with pytest.raises(ServiceError) as err:
            launch(command, roots=[str(tmp_path)], timeout=20)
        assert err.value.code == "engine_failed" and text in err.value.message
    slow = tmp_path / "slow-engine"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(0o755)
    with pytest.raises(ServiceError, match="did not start within"):
        launch([str(slow)], roots=[str(tmp_path)], timeout=0.5)
    assert not list(tmp_path.glob("skyloc-engine-*"))
