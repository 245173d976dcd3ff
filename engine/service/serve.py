"""``skyloc serve``: the long-lived local engine (models and indexes stay loaded between requests).

Binds to loopback only unless ``--allow-remote``; ``--port 0`` (default) takes a free port. The token comes
from ``--token-file`` when that file exists, else it is generated and written there (or to
``~/.cache/skyloc/serve-PORT.token``, removed at exit) with mode 0600. Prints the URL and the token file,
writes ``--ready-file`` (JSON: url, port, token_file, pid) once it answers, and stops cleanly on
SIGINT/SIGTERM: running jobs are cancelled (leaving no partial output) and the process exits with 0.

Uploads and temporary files live in a private per-process folder (``runtime.py``); at start-up the folders,
token and ready files of engines that were killed are swept. GDAL's network access is turned off before
any GDAL call (``gdal_guard.py``), and connections that do not deliver a request in time are closed
(``protocol.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from ..imagery.photos import DEFAULT_MAX_PIXELS, DEFAULT_MAX_RASTER_PIXELS
from .protocol import HEADER_TIMEOUT_S, MAX_IDLE_CONNECTIONS
from .runtime import RunDir

EXIT_BAD_COMMAND_LINE = 2
#: GDAL's block cache, in MB, unless the user set GDAL_CACHEMAX (GDAL's default, 5% of the machine's RAM
#: per GDAL library, made the service's memory climb by gigabytes and stay there).
GDAL_CACHE_MB = 256


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="run the local HTTP engine the QGIS plugin talks to (loopback, token)",
        description=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: a free port, printed)")
    p.add_argument(
        "--token-file",
        metavar="PATH",
        help="read the token from PATH if it exists (it must be mode 0600), else write a new one there",
    )
    p.add_argument(
        "--root",
        action="append",
        metavar="DIR",
        help="folder whose files requests may read and write (repeatable; default: the current folder); "
        "relative paths in requests are taken relative to the first",
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --host (anyone who can reach it and has the token can use the engine)",
    )
    p.add_argument("--workers", type=int, default=1, help="jobs run at the same time (default 1)")
    p.add_argument("--queue", type=int, default=8, help="jobs that may wait; more get 503 busy (default 8)")
    p.add_argument("--max-upload-mb", type=float, default=100.0, help="largest upload (default 100 MB)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse larger photos, checked before decoding (default {DEFAULT_MAX_PIXELS:,})",
    )
    p.add_argument(
        "--max-raster-pixels",
        type=int,
        default=DEFAULT_MAX_RASTER_PIXELS,
        help=f"refuse heatmaps of larger rasters (default {DEFAULT_MAX_RASTER_PIXELS:,})",
    )
    p.add_argument(
        "--no-tile-urls",
        action="store_true",
        help="refuse http(s) tile URL templates as index sources (the engine then makes no web request)",
    )
    p.add_argument("--ready-file", metavar="PATH", help="write JSON {url, port, token_file, pid} when ready")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument(
        "--request-timeout",
        type=float,
        default=HEADER_TIMEOUT_S,
        metavar="S",
        help=f"close a connection that sends no complete request headers within S seconds, or pauses over "
        f"S seconds in a request body (default {HEADER_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--max-idle-connections",
        type=int,
        default=MAX_IDLE_CONNECTIONS,
        help=f"connections that may wait for a request at once; beyond, the oldest is closed "
        f"(default {MAX_IDLE_CONNECTIONS})",
    )
    return p


def is_loopback(host: str) -> bool:
    """True if every address ``host`` names is a loopback address."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (so ``--port 0`` is known before the server starts)."""
    family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def default_token_path(port: int) -> Path:
    root = os.environ.get("SKYLOC_CACHE") or os.path.join("~", ".cache", "skyloc")
    return Path(os.path.expanduser(root)) / f"serve-{port}.token"


def _write_json_atomically(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def raise_fd_limit(wanted: int = 8192) -> None:
    """Raise the soft limit of open files towards the hard one (a 1,024 default is quickly met)."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def prepare_process() -> None:
    """Process-wide settings, before anything imports or calls GDAL: no network, a bounded block cache."""
    from .gdal_guard import disable_gdal_network

    disable_gdal_network()
    os.environ.setdefault("GDAL_CACHEMAX", str(GDAL_CACHE_MB))
    raise_fd_limit()


def run(args: argparse.Namespace) -> int:
    from .auth import generate_token, read_token_file, write_token_file
    from .runtime import sweep, token_digest

    def fail(message: str) -> int:
        print(f"skyloc serve: error: {message}", file=sys.stderr)
        return EXIT_BAD_COMMAND_LINE

    if not is_loopback(args.host) and not args.allow_remote:
        return fail(
            f"--host {args.host} is not a loopback address: the engine reads and writes your files, so it "
            "only listens on 127.0.0.1/::1 unless you also give --allow-remote"
        )
    if args.workers < 1 or args.queue < 0 or args.max_upload_mb <= 0 or args.max_pixels < 1:
        return fail("--workers must be >= 1, --queue >= 0, --max-upload-mb and --max-pixels > 0")
    if not args.request_timeout > 0 or args.max_idle_connections < 1:
        return fail("--request-timeout must be > 0 and --max-idle-connections >= 1")
    roots = [os.path.realpath(r) for r in (args.root or [os.getcwd()])]
    for r in roots:
        if not os.path.isdir(r):
            return fail(f"--root {r} is not a folder")
    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        return fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    port = sock.getsockname()[1]

    prepare_process()
    rundir: RunDir | None = None
    token_file = Path(args.token_file).expanduser() if args.token_file else default_token_path(port)
    remove_token = args.token_file is None
    ready_file = Path(args.ready_file) if args.ready_file else None
    try:
        sweep()  # what killed engines left: their uploads, grid files, token and ready files
        rundir = RunDir.create()
        rundir.use_for_temporary_files()
        if args.token_file and token_file.exists():
            token = read_token_file(token_file)  # InputError: exit code 3 with the message
        else:
            token = generate_token()
            if remove_token:  # ours to remove at exit, and the sweep's if we are killed
                rundir.record(token_file=str(token_file), token_sha256=token_digest(token))
            write_token_file(token_file, token)
        return _serve(args, sock, roots, port, token, token_file, remove_token, ready_file, rundir)
    finally:
        sock.close()
        if rundir is not None:
            rundir.remove()


def _serve(
    args: argparse.Namespace,
    sock: socket.socket,
    roots: list[str],
    port: int,
    token: str,
    token_file: Path,
    remove_token: bool,
    ready_file: Path | None,
    rundir: RunDir,
) -> int:
    logging.basicConfig(
        level=logging.WARNING,  # the libraries' chatter (faiss, pyogrio) only when it matters
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("skyloc").setLevel(args.log_level.upper())
    host = f"[{args.host.strip('[]')}]" if ":" in args.host else args.host
    url = f"http://{host}:{port}"

    def on_ready() -> None:
        print(f"skyloc engine listening on {url}", flush=True)
        print(f"token file: {token_file}", flush=True)
        print(f"roots: {', '.join(roots)}", flush=True)
        if ready_file is not None:
            rundir.record(ready_file=str(ready_file.resolve()))
            _write_json_atomically(
                ready_file, {"url": url, "port": port, "token_file": str(token_file), "pid": os.getpid()}
            )

    import uvicorn

    from .app import ServiceConfig, create_app
    from .protocol import guarded_protocol

    try:
        app = create_app(
            ServiceConfig(
                roots=roots,
                token=token,
                workers=args.workers,
                queue_size=args.queue,
                max_upload_bytes=int(args.max_upload_mb * 2**20),
                max_upload_total_bytes=max(int(args.max_upload_mb * 2**20) * 10, 1024 * 2**20),
                max_pixels=args.max_pixels,
                max_raster_pixels=args.max_raster_pixels,
                upload_dir=str(rundir.uploads),
                body_idle_timeout_s=args.request_timeout,
                on_ready=on_ready,
                allow_tile_urls=not args.no_tile_urls,
            )
        )
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_level=args.log_level,
                access_log=args.access_log,
                lifespan="on",
                timeout_graceful_shutdown=10,
                server_header=False,
                http=guarded_protocol(args.request_timeout, args.max_idle_connections),
                timeout_keep_alive=5,
            )
        )
        # uvicorn re-raises the signal it caught once it has shut down; these no-op handlers make that
        # harmless, so a SIGTERM ends the process with 0 after the clean shutdown.
        previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.run(sockets=[sock])
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    finally:
        if remove_token:
            with contextlib.suppress(OSError):
                token_file.unlink()
        if ready_file is not None:
            with contextlib.suppress(OSError):
                ready_file.unlink()
    print("skyloc engine stopped", flush=True)
    return 0 if server.started else 1
