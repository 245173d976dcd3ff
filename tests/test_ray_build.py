"""Index builds on Ray (``skyloc index --ray``): a real local Ray cluster started here, on loopback.

A Ray build of the bundled sample equals the local build (tile ids and order, descriptors, manifest apart
from timing and place); workers killed mid-build are replaced and their chunks re-run; cancel leaves no
index and the next run resumes from the chunks written; sources the workers cannot see, an unreachable
address and Ray missing are clear errors (exit 3) that write nothing. Without --ray, Ray is not imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from imagery import ROOT, SAMPLE

from engine import api
from engine.errors import CancelledError, InputError
from engine.imagery import open_source
from engine.progress import CancelToken
from engine.retrieval import faiss_index
from engine.retrieval.index_store import FAISS_FILE, TILES_FILE, build_index, is_index_folder
from engine.vector_io import read_layer

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'; `make venv` does)")

from engine.retrieval.ray_build import (  # noqa: E402
    WORKER_PREFIX,
    ClusterError,
    EncoderRecipe,
    RayCluster,
    SourcesNotOnWorker,
    resolve_address,
)

RASTER = SAMPLE / "naip_2018.tif"
#: small and quick: 35 tiles of 256 px encoded at 96 px, in chunks of 8 tiles (5 chunks for 2 workers)
TILES = {"tile_sizes": (256,), "overlap": 0.5}
SIZE = 96
CHUNK = 8


@pytest.fixture(scope="module")
def cluster():
    """A real local Ray instance with 2 CPUs for the module (builds reuse this connection)."""
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=100 * 2**20,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def encoder():
    return api.get_encoder("default", None, "onnx", SIZE, None)


@pytest.fixture(scope="module")
def local(tmp_path_factory, encoder):
    """The reference: the same sources built without Ray."""
    out = tmp_path_factory.mktemp("local") / "idx"
    src = open_source(RASTER, **TILES)
    build_index([src], encoder, out, chunk_tiles=CHUNK)
    src.close()
    return out


def ray_build(out, encoder, *, progress=None, cancel=None, workers=None, raster=RASTER):
    """``build_index`` with the Ray encode loop (what ``api.index(ray=...)`` does, with small chunks)."""
    messages: list[str] = []

    def record(fraction: float, message: str) -> None:
        messages.append(message)
        if progress is not None:
            progress(fraction, message)

    src = open_source(raster, **TILES)
    try:
        with RayCluster(True, workers=workers, progress=record, cancel=cancel) as rc:
            rc.start(EncoderRecipe.for_workers("default", None, "onnx", SIZE, None), [src], encoder)
            build_index(
                [src],
                encoder,
                out,
                chunk_tiles=CHUNK,
                progress=record,
                cancel=cancel,
                encode_with=rc.encode_all,
            )
    finally:
        src.close()
    return messages


def assert_same_index(a: Path, b: Path) -> None:
    """Same tile ids in the same order, descriptors within float tolerance, same manifest but timing/place."""
    ia, ib = faiss_index.read_index(a / FAISS_FILE), faiss_index.read_index(b / FAISS_FILE)
    assert ia.ntotal == ib.ntotal > 0
    np.testing.assert_allclose(ia.reconstruct_n(0, ia.ntotal), ib.reconstruct_n(0, ib.ntotal), atol=1e-5)
    ga, ca = read_layer(a / TILES_FILE, "tiles")
    gb, cb = read_layer(b / TILES_FILE, "tiles")
    for key in ("tile_id", "source", "scale", "minx", "miny", "maxx", "maxy"):
        assert list(ca[key]) == list(cb[key]), key
    assert all(x.equals(y) for x, y in zip(ga, gb, strict=True))
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    for m in (ma, mb):
        m.pop("created")
        m.pop("built_at")  # the folder it was written to
    assert ma == mb


def live_workers() -> list[str]:
    return [name for name in ray.util.list_named_actors() if name.startswith(WORKER_PREFIX)]


# ------------------------------------------------------------------------------------------- identity


def test_ray_build_equals_local_build(cluster, local, encoder, tmp_path):
    out = tmp_path / "idx"
    messages = ray_build(out, encoder)
    assert_same_index(local, out)
    assert any("2 Ray worker(s) ready" in m for m in messages), messages
    assert any("encoded 35 of 35 tiles" in m for m in messages), messages
    assert not live_workers()  # the workers are gone with the build
    assert not out.with_name("idx.partial").exists()


def test_api_and_cli_option(cluster, tmp_path):
    """``api.index(ray=True)`` (the CLI's ``--ray``) gives the index ``api.index`` gives without it."""
    kw = {"tile_sizes": (512,), "input_size": SIZE}
    api.index([str(RASTER)], str(tmp_path / "plain"), **kw)
    api.index([str(RASTER)], str(tmp_path / "on_ray"), ray=True, ray_workers=1, **kw)
    assert_same_index(tmp_path / "plain", tmp_path / "on_ray")
    with pytest.raises(InputError, match="needs ray"):
        api.index([str(RASTER)], str(tmp_path / "x"), ray_workers=2, **kw)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------- workers die, cancel, resume


def test_worker_killed_mid_build_is_replaced(cluster, local, encoder, tmp_path):
    killed: list[str] = []

    def kill_a_worker_once(fraction: float, message: str) -> None:
        if message.startswith("encoded") and not killed:
            name = live_workers()[0]
            ray.kill(ray.get_actor(name), no_restart=True)  # as if its node were lost
            killed.append(name)

    out = tmp_path / "idx"
    messages = ray_build(out, encoder, progress=kill_a_worker_once)
    assert len(killed) == 1
    assert any("a Ray worker died" in m for m in messages), messages
    assert_same_index(local, out)


def test_cancel_leaves_no_index_and_the_next_run_resumes(cluster, local, encoder, tmp_path):
    out = tmp_path / "idx"
    cancel = CancelToken()

    def cancel_after_two_chunks(fraction: float, message: str) -> None:
        if message.startswith("encoded 16 of"):
            cancel.cancel()

    with pytest.raises(CancelledError):
        ray_build(out, encoder, progress=cancel_after_two_chunks, cancel=cancel)
    assert not out.exists() and not is_index_folder(out)
    staged = out.with_name("idx.partial")
    chunks = sorted(p.name for p in (staged / "chunks").iterdir() if not p.name.startswith("."))
    assert 2 <= len(chunks) < 5  # two (or three) of the five chunks, atomically written
    assert not (staged / "manifest.json").exists() and not (staged / FAISS_FILE).exists()
    assert not live_workers()  # cancel stopped them

    # the chunks a Ray build wrote are those a local build writes: a local run resumes them too
    shutil.copytree(staged, tmp_path / "local_idx.partial")
    seen: list[str] = []
    src = open_source(RASTER, **TILES)
    build_index(
        [src], encoder, tmp_path / "local_idx", chunk_tiles=CHUNK, progress=lambda f, m: seen.append(m)
    )
    src.close()
    assert len([m for m in seen if m.startswith("resumed")]) == len(chunks), seen
    assert_same_index(local, tmp_path / "local_idx")

    messages = ray_build(out, encoder)
    resumed = [m for m in messages if m.startswith("resumed")]
    assert resumed == [f"resumed tiles {int(c[:9])}-{int(c[10:19])} of 35" for c in chunks], messages
    assert_same_index(local, out)
    assert not staged.exists()


# ------------------------------------------------------------------------------------------- bad input


def test_sources_only_on_the_driver_are_named(cluster, encoder, tmp_path):
    """The driver holds the raster open; the path is gone when the workers look: no index, no staging."""
    raster = tmp_path / "only_here.tif"
    shutil.copy(RASTER, raster)

    def hide_from_workers(fraction: float, message: str) -> None:
        if message.startswith("starting") and raster.exists():
            raster.rename(tmp_path / "moved.tif")

    out = tmp_path / "idx"
    with pytest.raises(SourcesNotOnWorker) as err:
        ray_build(out, encoder, progress=hide_from_workers, raster=raster)
    assert str(raster) in err.value.message and "cannot read the sources" in err.value.message
    assert err.value.exit_code == 3
    assert not out.exists() and not out.with_name("idx.partial").exists()


def test_ray_not_installed(tmp_path, monkeypatch, capsys):
    from engine.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    with pytest.raises(ClusterError, match=r"skyloc\[ray\]") as err:
        api.index([str(RASTER)], str(tmp_path / "idx"), tile_sizes=(512,), input_size=SIZE, ray=True)
    assert err.value.exit_code == 3
    args = ["index", str(RASTER), "--out", str(tmp_path / "idx"), "--tile-sizes", "512", "--quiet", "--ray"]
    assert main([*args, "--input-size", str(SIZE)]) == 3
    assert "--ray needs Ray" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def _cli(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from engine.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "RAY_ADDRESS": ""}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=180, cwd=ROOT, env=env
    )


def test_cli_unreachable_address(tmp_path):
    common = ["index", str(RASTER), "--tile-sizes", "512", "--input-size", str(SIZE), "--quiet"]
    with socket_closed_port() as port:
        proc = _cli(*common, "--out", str(tmp_path / "a"), "--ray", f"127.0.0.1:{port}")
    assert proc.returncode == 3, proc.stderr
    assert "no Ray cluster answers there" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing half-written, not even a staging folder


def test_addresses_that_would_hang_ray_are_resolved_first(tmp_path, monkeypatch):
    """Ray retries a dead address for minutes then exits: a stale ``ray_current_cluster`` (a cluster
    stopped since) is skipped, and a RAY_ADDRESS or HOST:PORT nobody answers on is a ClusterError at once."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert resolve_address(True) == "local"
    with socket_closed_port() as port:
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
        assert resolve_address(True) == "local"
        with pytest.raises(ClusterError, match="no running Ray cluster"):
            resolve_address("auto")
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        with pytest.raises(ClusterError, match="no Ray cluster answers there"):
            resolve_address(True)
    with pytest.raises(ClusterError, match="not a cluster address"):
        resolve_address("my-laptop")
    assert resolve_address("local") == "local"


def test_cli_with_a_head_node_on_loopback(tmp_path):
    """``ray start --head`` on loopback (stopped at the end), ``skyloc index --ray 127.0.0.1:PORT`` in
    another process: the index of a local build. Ray's token (on by default in 2.60) is sent."""
    with socket_closed_port() as port:
        pass
    head = subprocess.Popen(
        [
            Path(sys.executable).with_name("ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=1",
        ]
        + ["--include-dashboard=false", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and head.poll() is None, "ray start --head did not come up"
                time.sleep(0.3)
        args = ["index", str(RASTER), "--tile-sizes", "512", "--input-size", str(SIZE), "--quiet"]
        proc = _cli(*args, "--out", str(tmp_path / "on_ray"), "--ray", f"127.0.0.1:{port}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(60)
        current = Path("/tmp/ray/ray_current_cluster")  # `ray start` names its cluster there: not any more
        with contextlib.suppress(OSError):
            if current.read_text().strip().endswith(f":{port}"):
                current.unlink()
    api.index([str(RASTER)], str(tmp_path / "plain"), tile_sizes=(512,), input_size=SIZE)
    assert_same_index(tmp_path / "plain", tmp_path / "on_ray")


def test_without_ray_nothing_imports_it(tmp_path):
    code = (
        "import sys\n"
        "from engine import api, cli\n"
        "from engine.service import app\n"
        f"api.index([{str(RASTER)!r}], {str(tmp_path / 'idx')!r}, tile_sizes=(512,), input_size={SIZE})\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert is_index_folder(tmp_path / "idx")


class socket_closed_port:
    """A loopback port nobody listens on (bound, then closed)."""

    def __enter__(self) -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        pass


def test_service_index_with_ray(tmp_path):
    """The service passes ``ray``/``ray_workers`` on; an unreachable cluster fails the job (ray_cluster)."""
    from engine.client import ServiceError, SkylocClient, launch

    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(RASTER, root / "naip.tif")
    with (
        launch([sys.executable, "-m", "engine.cli", "serve"], roots=[str(root)]) as eng,
        SkylocClient(eng.url, token_file=eng.token_file) as client,
    ):
        with pytest.raises(ServiceError) as err:
            client.index(["naip.tif"], "idx", ray=True, ray_workers=0)
        assert err.value.status == 422
        with socket_closed_port() as port:
            job = client.index(
                ["naip.tif"], "idx", tile_sizes=[512], input_size=SIZE, ray=f"127.0.0.1:{port}"
            )
        job = client.wait(job, timeout=120, check=False)
        assert job.state == "failed" and job.error["code"] == "ray_cluster", job
        assert "no Ray cluster answers there" in job.error["message"]
    assert sorted(p.name for p in root.iterdir()) == ["naip.tif"]
