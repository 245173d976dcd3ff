"""XYZ tile services: URL templates, and downloading tiles into a local MBTiles cache.

A template is what QGIS's XYZ layers and web maps use: ``https://host/path/{z}/{x}/{y}.jpg``, with ``{-y}``
for TMS rows (``2^z - 1 - y``), ``{q}`` for Bing-style quadkeys, and subdomains either as ``{s}`` (with a
subdomain list, default ``a,b,c``) or QGIS's ``{switch:a,b,c}``. Only ``http`` and ``https`` are accepted.

Downloads: one :class:`requests.Session` per worker thread (connections are reused), a small thread pool,
retries with exponential backoff on connection errors, 429 and 5xx (a ``Retry-After`` header is honoured,
capped), a User-Agent naming Skyloc and its version, connect/read timeouts. Every body is decoded before
it is cached: an HTML error page, a truncated JPEG or anything else that is not an image is never stored.
404, 410, 204, empty bodies and fully transparent tiles mean "no tile here" (ocean, outside coverage): they
are recorded as missing, with the time, and counted, not fatal. Tiles already cached or known missing are
not requested again, so an interrupted build resumes where it stopped; a missing record older than
MISSING_RETRY_AFTER_S (or any, with ``retry_missing``: ``--retry-missing``) is asked again.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from .. import __version__
from ..errors import InputError
from ..progress import CancelToken, ProgressFn, no_progress
from .tile_store import MAX_TILE_BYTES, MBTiles, NotATileError, Tile, decode_tile

USER_AGENT = (
    f"Skyloc/{__version__} (satellite-photo localization engine; python-requests/{requests.__version__})"
)
#: Concurrent downloads (polite to public services; most allow 2-6 connections per client).
DEFAULT_WORKERS = 4
#: (connect, read) timeouts in seconds.
DEFAULT_TIMEOUT = (10.0, 30.0)
#: Retries per tile on connection errors, 429 and 5xx.
DEFAULT_RETRIES = 4
#: Backoff factor (seconds): waits 0.5, 1, 2, 4 ... between retries (urllib3's exponential backoff).
DEFAULT_BACKOFF = 0.5
#: Longest ``Retry-After`` honoured (seconds); a longer one is waited this long.
MAX_RETRY_AFTER = 60.0
RETRY_STATUSES = (429, 500, 502, 503, 504)
#: Answers that mean "there is no tile here": skipped and counted, not an error.
MISSING_STATUSES = (204, 404, 410)
DEFAULT_SUBDOMAINS = ("a", "b", "c")
#: A tile recorded missing is asked again once its record is this old (seconds): coverage grows.
MISSING_RETRY_AFTER_S = 30 * 86400.0


def missing_since(retry_missing: bool = False, max_age_s: float = MISSING_RETRY_AFTER_S) -> float:
    """The time from which missing records still hold (``MBTiles.missing(z, since=...)``): records made
    before it are asked again; ``retry_missing``: none holds (every missing tile is asked again)."""
    return float("inf") if retry_missing else time.time() - max_age_s


_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
#: Query parameters whose values are secrets: shown as *** in manifests and messages.
_SECRET_KEYS = re.compile(r"(key|token|secret|signature|sig|password|passwd|auth|access)", re.IGNORECASE)


class TileServiceError(InputError):
    """The tile service cannot be used: unreachable, refusing access, or failing to deliver tiles."""

    code = "tile_service_error"
    http_status = 502


class TooManyTilesError(InputError):
    """The request needs more tiles than the cap (``--max-tiles``)."""

    code = "too_many_tiles"
    http_status = 413


def is_url(text: str) -> bool:
    """True for anything with a URL scheme (``http:``, ``file:``, ``ftp:``, ``wmts:`` ...), not a Windows drive
    letter; and for a QGIS WMTS layer source (``...&tileMatrixSet=...&url=...``, see wmts.py)."""
    return (
        re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", str(text)) is not None
        and not re.match(r"^[A-Za-z]:[\\/]", str(text))
    ) or is_wmts(text)


def is_wmts(text: str) -> bool:
    """True for a ``wmts:`` source, and for a QGIS WMTS layer source (``...&tileMatrixSet=...&url=...``)."""
    t = str(text).strip()
    if t[:5].lower() == "wmts:":
        return True
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", t) or "=" not in t:
        return False  # a URL, a path
    keys = {k.lower() for k, _ in parse_qsl(t, keep_blank_values=True)}
    return "tilematrixset" in keys and "url" in keys


def redact(url: str) -> str:
    """``url`` with secret-looking query values (``api_key=...``, ``token=...``) replaced by ***."""
    head, sep, query = url.partition("?")
    if not sep:
        return url

    def hide(m: re.Match[str]) -> str:
        return f"{m.group(1)}=***" if _SECRET_KEYS.search(m.group(1)) else m.group(0)

    return head + sep + re.sub(r"([^&=#]+)=([^&#]*)", hide, query)


@dataclass(frozen=True)
class UrlTemplate:
    """A validated XYZ URL template (see the module docstring)."""

    template: str
    subdomains: tuple[str, ...] = DEFAULT_SUBDOMAINS

    def __post_init__(self) -> None:
        t = self.template
        if not isinstance(t, str) or not t.strip():
            raise InputError("empty tile URL template")
        scheme = t.split(":", 1)[0].lower() if ":" in t else ""
        if scheme not in ("http", "https"):
            raise InputError(
                f"tile URL {redact(t)!r}: only http:// and https:// tile services can be fetched "
                f"(got {scheme + ':' if scheme else 'no scheme'}); give a local MBTiles/GeoPackage as a file path"
            )
        names = _PLACEHOLDER.findall(t)
        known = {"z", "x", "y", "-y", "q", "s"}
        unknown = [n for n in names if n not in known and not n.startswith("switch:")]
        if unknown:
            raise InputError(
                f"tile URL {redact(t)!r}: unknown placeholder {{{unknown[0]}}} (known: {{z}} {{x}} {{y}} {{-y}} "
                "{q} {s} {switch:a,b,c})"
            )
        has_xyz = "z" in names and "x" in names and ("y" in names or "-y" in names)
        if not has_xyz and "q" not in names:
            raise InputError(
                f"tile URL {redact(t)!r} has no {{z}}/{{x}}/{{y}} (or {{-y}}, or {{q}}) placeholders: it would "
                "fetch the same image for every tile; e.g. https://host/tiles/{z}/{x}/{y}.png"
            )
        switches = [n for n in names if n.startswith("switch:")]
        if switches and not [s for s in switches[0][len("switch:") :].split(",") if s.strip()]:
            raise InputError(f"tile URL {redact(t)!r}: {{switch:}} needs a comma-separated list")
        if "s" in names and not [s for s in self.subdomains if s]:
            raise InputError(f"tile URL {redact(t)!r} uses {{s}}: give at least one subdomain")
        probe = urlsplit(self.url(0, 0, 0))
        if not probe.hostname:
            raise InputError(f"tile URL {redact(t)!r}: no host name")
        if probe.username or probe.password:
            raise InputError(
                f"tile URL {redact(t)!r}: user names and passwords in the URL are not accepted (they would be "
                "stored in the index manifest); use an API key parameter if the service offers one"
            )

    @classmethod
    def parse(cls, text: str, subdomains: tuple[str, ...] | None = None) -> UrlTemplate:
        """From a template, a percent-encoded template (``%7Bz%7D``), or a QGIS XYZ layer source
        (``type=xyz&url=https://...&zmax=19``). WMTS sources: ``tile_template.parse_template``."""
        text = text.strip()
        if is_wmts(text):  # read through its capabilities: tile_template.parse_template
            raise InputError("a WMTS source is read through its capabilities (tile_template.parse_template)")
        if text.startswith("type=xyz") and "url=" in text:
            fields = dict(parse_qsl(text, keep_blank_values=True))
            text = fields.get("url", "")
        if "%7B" in text.upper():
            text = re.sub(r"%7[Bb]([^%]*)%7[Dd]", lambda m: "{" + unquote(m.group(1)) + "}", text)
        return cls(text, tuple(subdomains) if subdomains else DEFAULT_SUBDOMAINS)

    def check_zooms(self, zooms: list[int]) -> None:
        """InputError for a zoom the service does not offer (an XYZ template: any is asked)."""

    @property
    def host(self) -> str:
        return urlsplit(self.url(0, 0, 0)).hostname or "tiles"

    @property
    def redacted(self) -> str:
        return redact(self.template)

    @property
    def key(self) -> str:
        """A stable short hash of the template (the default cache file name)."""
        return hashlib.sha256(self.template.encode()).hexdigest()[:12]

    def url(self, z: int, x: int, y: int) -> str:
        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name == "z":
                return str(z)
            if name == "x":
                return str(x)
            if name == "y":
                return str(y)
            if name == "-y":
                return str(2**z - 1 - y)
            if name == "q":
                return quadkey(z, x, y)
            if name == "s":
                return self.subdomains[(x + y) % len(self.subdomains)]
            choices = [c for c in name[len("switch:") :].split(",") if c.strip()]
            return choices[(x + y) % len(choices)].strip()

        return _PLACEHOLDER.sub(sub, self.template)


def quadkey(z: int, x: int, y: int) -> str:
    """Bing Maps quadkey of tile (z, x, y)."""
    digits = []
    for i in range(z, 0, -1):
        mask = 1 << (i - 1)
        digits.append(str((1 if x & mask else 0) + (2 if y & mask else 0)))
    return "".join(digits)


def default_cache_dir() -> Path:
    """``$SKYLOC_TILE_CACHE``, else ``$SKYLOC_CACHE/tiles``, else ``~/.cache/skyloc/tiles``."""
    if os.environ.get("SKYLOC_TILE_CACHE"):
        return Path(os.path.expanduser(os.environ["SKYLOC_TILE_CACHE"]))
    root = os.environ.get("SKYLOC_CACHE") or os.path.join("~", ".cache", "skyloc")
    return Path(os.path.expanduser(root)) / "tiles"


def default_cache_path(template: UrlTemplate, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """One MBTiles cache per URL template: ``<cache dir>/<host>-<hash of the template>.mbtiles``."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", template.host)[:60]
    return Path(cache_dir or default_cache_dir()) / f"{host}-{template.key}.mbtiles"


class _CappedRetry(Retry):
    """urllib3's Retry, with ``Retry-After`` honoured up to MAX_RETRY_AFTER seconds."""

    max_retry_after = MAX_RETRY_AFTER

    def parse_retry_after(self, retry_after: str) -> float:
        return min(super().parse_retry_after(retry_after), self.max_retry_after)


@dataclass
class FetchResult:
    tile: Tile
    status: str  # "ok" | "missing" | "failed"
    data: bytes | None = None
    reason: str = ""
    url: str = ""
    connection_error: bool = False


@dataclass
class FetchReport:
    """What a download pass did (also what ``plan`` reports before it starts)."""

    needed: int = 0
    cached: int = 0
    known_missing: int = 0
    downloaded: int = 0
    missing: int = 0
    failed: int = 0
    bytes: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


class TileFetcher:
    """Downloads tiles of one URL template into one MBTiles cache."""

    def __init__(
        self,
        template: UrlTemplate,
        cache: MBTiles,
        *,
        workers: int = DEFAULT_WORKERS,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        max_retry_after: float = MAX_RETRY_AFTER,
        retry_missing: bool = False,
    ) -> None:
        if workers < 1:
            raise InputError(f"tile download workers must be >= 1, got {workers}")
        self.template = template
        self.cache = cache
        self.workers = workers
        self.retry_missing = retry_missing  # ask again tiles recorded missing, however recent the record
        self.timeout = timeout
        capped = type("CappedRetry", (_CappedRetry,), {"max_retry_after": max_retry_after})
        retry = capped(
            total=retries,
            connect=retries,
            read=retries,
            status=retries,
            other=0,
            backoff_factor=backoff,
            backoff_max=30.0,
            status_forcelist=RETRY_STATUSES,
            allowed_methods=frozenset({"GET"}),
            respect_retry_after_header=True,
            raise_on_status=False,
            raise_on_redirect=False,
        )
        self.retry = retry
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()

    def _session(self, probe: bool = False) -> requests.Session:
        name = "probe" if probe else "session"
        s = getattr(self._local, name, None)
        if s is None:
            s = requests.Session()
            retry = self.retry
            if probe:
                retry = self.retry.new(total=1, connect=1, read=1, status=1)
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=2, max_retries=retry)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            s.headers["User-Agent"] = USER_AGENT
            s.headers["Accept"] = "image/*;q=1.0, */*;q=0.1"
            s.max_redirects = 5
            setattr(self._local, name, s)
            with self._sessions_lock:
                self._sessions.append(s)
        return s

    def fetch_one(self, tile: Tile, probe: bool = False) -> FetchResult:
        z, x, y = tile
        url = self.template.url(z, x, y)
        shown = redact(url)
        try:
            with self._session(probe).get(
                url, timeout=self.timeout, stream=True, allow_redirects=True
            ) as resp:
                if urlsplit(resp.url).scheme not in ("http", "https"):
                    return FetchResult(tile, "failed", reason="redirected off http(s)", url=shown)
                # the body is read to its end whatever the status: only then is the connection reused
                body = bytearray()
                for chunk in resp.iter_content(65536):
                    body += chunk
                    if len(body) > MAX_TILE_BYTES:
                        return FetchResult(tile, "failed", reason=f"over {MAX_TILE_BYTES} bytes", url=shown)
                ctype = resp.headers.get("Content-Type", "?")
                if resp.status_code in MISSING_STATUSES:
                    return FetchResult(tile, "missing", reason=f"HTTP {resp.status_code}", url=shown)
                if resp.status_code != 200:
                    return FetchResult(
                        tile,
                        "failed",
                        reason=f"HTTP {resp.status_code} {resp.reason or ''}".strip(),
                        url=shown,
                    )
        except requests.exceptions.RetryError as exc:
            return FetchResult(tile, "failed", reason=f"gave up after retries ({_short(exc)})", url=shown)
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            return FetchResult(tile, "failed", reason=_short(exc), url=shown, connection_error=True)
        except requests.exceptions.RequestException as exc:
            return FetchResult(tile, "failed", reason=_short(exc), url=shown)
        if not body:
            return FetchResult(tile, "missing", reason="empty body", url=shown)
        try:
            _, empty = decode_tile(bytes(body))
        except NotATileError as exc:
            return FetchResult(tile, "failed", reason=f"not an image tile ({ctype}): {exc}", url=shown)
        if empty:
            return FetchResult(tile, "missing", reason="fully transparent", url=shown)
        return FetchResult(tile, "ok", data=bytes(body), url=shown)

    def _store(self, result: FetchResult, report: FetchReport) -> None:
        z, x, y = result.tile
        if result.status == "ok":
            self.cache.put(z, x, y, result.data or b"")
            report.downloaded += 1
            report.bytes += len(result.data or b"")
        elif result.status == "missing":
            self.cache.put_missing(z, x, y, result.reason)
            report.missing += 1
        else:
            report.failed += 1
            if len(report.failures) < 5:
                report.failures.append(f"{result.url}: {result.reason}")

    def fetch(
        self,
        tiles: list[Tile],
        *,
        progress: ProgressFn = no_progress,
        cancel: CancelToken | None = None,
    ) -> FetchReport:
        """Download every tile of ``tiles`` not cached yet (nor known missing: a record newer than
        MISSING_RETRY_AFTER_S, none with ``retry_missing``). Never fetches one twice in a call.

        The first tile is fetched alone: a host that cannot be reached (or refuses access) is reported
        before anything else is asked. On cancel (or an exception from ``progress``) downloads in flight are
        finished and stored, queued ones dropped, then the cancellation propagates.
        """
        t0 = time.monotonic()
        report = FetchReport(needed=len(tiles))
        self.cache.refresh()  # another source (or process) may have filled the cache since it was read
        todo: list[Tile] = []
        for z in sorted({t[0] for t in tiles}):
            have, gone = self.cache.present(z), self.cache.missing(z, since=missing_since(self.retry_missing))
            for t in (t for t in tiles if t[0] == z):
                if (t[1], t[2]) in have:
                    report.cached += 1
                elif (t[1], t[2]) in gone:
                    report.known_missing += 1
                else:
                    todo.append(t)
        if not todo:
            progress(
                1.0, f"all {len(tiles)} tiles already in the cache ({report.known_missing} known missing)"
            )
            report.seconds = time.monotonic() - t0
            return report
        if cancel is not None:
            cancel.check()
        progress(0.0, f"downloading {len(todo)} tiles from {self.template.host} ({report.cached} cached)")
        # the probe: one tile, connection errors retried once only, so that an unreachable host or a
        # refusal is said in seconds, before the pool starts
        first = self.fetch_one(todo[0], probe=True)
        if first.status == "failed" and (
            first.connection_error or first.reason.startswith(("HTTP 401", "HTTP 403"))
        ):
            raise TileServiceError(
                f"tile service {self.template.host} cannot be used: {first.url}: {first.reason}. Nothing was "
                "indexed; check the URL, your network (or proxy) and the service's terms"
            )
        if first.status == "failed":  # e.g. a 503: the pool tries it again, with the full retries
            todo = [*todo[1:], todo[0]]
        else:
            self._store(first, report)
            self._report(progress, report, len(todo))
            todo = todo[1:]
        futures: dict[Future[FetchResult], Tile] = {}
        stored: set[Future[FetchResult]] = set()
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="skyloc-tiles")
        try:
            futures = {pool.submit(self.fetch_one, t): t for t in todo}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when="FIRST_COMPLETED")
                for fut in done:
                    self._store(fut.result(), report)
                    stored.add(fut)
                if done:
                    self._report(progress, report, len(todo))
                if cancel is not None:
                    cancel.check()
        finally:
            for fut in futures:
                fut.cancel()
            pool.shutdown(wait=True)  # downloads in flight finish ...
            for fut in futures:  # ... and are kept: a re-run never asks for them again
                if fut not in stored and fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._store(fut.result(), report)
            self.cache.refresh()
        report.seconds = time.monotonic() - t0
        return report

    def _report(self, progress: ProgressFn, r: FetchReport, n: int) -> None:
        done = r.downloaded + r.missing + r.failed
        progress(
            done / n,
            f"tiles: {done} of {n} fetched ({r.downloaded} new, {r.missing} missing, {r.failed} failed, "
            f"{r.bytes / 2**20:.1f} MB), {r.cached} cached",
        )

    def close(self) -> None:
        with self._sessions_lock:
            for s in self._sessions:
                s.close()
            self._sessions.clear()


def _short(exc: BaseException) -> str:
    text = str(exc)
    reason = re.search(r"\((Caused by [^)]*\)?)", text)
    return (reason.group(1) if reason else text)[:300]


def check_fetch_report(report: FetchReport, template: UrlTemplate, cache: Path) -> None:
    """Raise TileServiceError when tiles failed (after their retries): no partial index is built."""
    if report.failed:
        raise TileServiceError(
            f"{report.failed} of {report.needed} tiles could not be downloaded from {template.host} "
            f"(e.g. {'; '.join(report.failures[:3])}). The {report.cached + report.downloaded} good tiles are "
            f"kept in the cache {cache}: run the same command again to fetch only the rest. No index was written"
        )


__all__ = [
    "TileFetcher",
    "TileServiceError",
    "TooManyTilesError",
    "UrlTemplate",
    "check_fetch_report",
    "default_cache_path",
    "is_url",
    "redact",
]
