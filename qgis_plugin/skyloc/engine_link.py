"""Where the engine is and how to reach it: settings, a local engine started by the plugin, errors in words.

Settings (``QgsSettings``, group ``skyloc/``): ``url`` and ``token_file`` of a running ``skyloc serve``;
``executable`` (the engine's ``skyloc`` program) and ``roots`` (folders the engine may read and write) to
start one; ``output_dir`` (where results go; default ``<first engine root>/skyloc_results``); ``model``.
A local engine started here (:meth:`EngineLink.start_local`, through the client's ``launch``) takes
precedence over ``url``/``token_file`` while it runs, and is stopped when the plugin unloads.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from qgis.core import Qgis, QgsSettings
from qgis.PyQt.QtCore import QObject, pyqtSignal

from .client import LocalEngine, ServiceError, SkylocClient, launch

GROUP = "skyloc"
RESULTS_FOLDER = "skyloc_results"
SETUP_HINT = (
    "Open the Skyloc dock, Engine tab: give the engine executable (the 'skyloc' program of the engine's "
    "Python environment, e.g. /path/to/skyloc/.venv/bin/skyloc) and press Start, or give the URL and the "
    "token file printed by a running 'skyloc serve'."
)
#: the same for Processing, which may run without the dock (qgis_process): the settings by name
PROCESSING_HINT = (
    "Set the engine executable, the 'skyloc' program of the engine's Python environment (e.g. "
    "/path/to/skyloc/.venv/bin/skyloc): in QGIS in the Skyloc dock, Engine tab (Save settings); for "
    "qgis_process in the QGIS profile's settings as skyloc/executable (QGIS/QGIS3.ini: [skyloc] "
    "executable=...); the algorithms then start the engine themselves. Or run 'skyloc serve' and set "
    "skyloc/url and skyloc/token_file to the URL and token file it printed."
)
#: seconds to wait for a first connection to a configured URL before starting the saved engine instead
PROBE_S = 0.5
#: Seconds a synchronous request that may load a model (``/embed``) may take: its first call in an engine
#: loads the embedding model (and reads the raster around the point) before it answers. With the plugin's
#: former 60 s for every request, that first answer could come too late on a slow machine: the request
#: ended in a read timeout, which the plugin then called "the engine is not running" (issue 13).
MODEL_LOAD_TIMEOUT_S = 600.0


@dataclass
class EngineSettings:
    """The plugin's settings (see the module docstring)."""

    url: str = ""
    token_file: str = ""
    executable: str = ""
    roots: list[str] = field(default_factory=list)
    output_dir: str = ""
    model: str = "default"

    @classmethod
    def load(cls) -> EngineSettings:
        s = QgsSettings()
        roots = s.value(f"{GROUP}/roots", "", type=str)
        return cls(
            url=s.value(f"{GROUP}/url", "", type=str),
            token_file=s.value(f"{GROUP}/token_file", "", type=str),
            executable=s.value(f"{GROUP}/executable", "", type=str),
            roots=[r for r in roots.split(os.pathsep) if r.strip()] if roots else [],
            output_dir=s.value(f"{GROUP}/output_dir", "", type=str),
            model=s.value(f"{GROUP}/model", "default", type=str) or "default",
        )

    def save(self) -> None:
        s = QgsSettings()
        s.setValue(f"{GROUP}/url", self.url.strip())
        s.setValue(f"{GROUP}/token_file", self.token_file.strip())
        s.setValue(f"{GROUP}/executable", self.executable.strip())
        s.setValue(f"{GROUP}/roots", os.pathsep.join(r.strip() for r in self.roots if r.strip()))
        s.setValue(f"{GROUP}/output_dir", self.output_dir.strip())
        s.setValue(f"{GROUP}/model", self.model.strip() or "default")

    def with_roots(self, folders: list[str]) -> EngineSettings:
        """These settings with ``folders`` added to the engine's folders (the home folder stays when the
        folders were the default)."""
        roots = list(self.roots) or [str(Path.home())]
        for folder in folders:
            if not inside(folder, roots):
                roots.append(folder)
        return EngineSettings(
            url=self.url,
            token_file=self.token_file,
            executable=self.executable,
            roots=roots,
            output_dir=self.output_dir,
            model=self.model,
        )

    def start_roots(self) -> list[str]:
        """Folders a local engine gets: the configured roots (default: the home folder) + the output folder."""
        roots = [os.path.expanduser(r) for r in self.roots] or [str(Path.home())]
        if self.output_dir:
            out = os.path.expanduser(self.output_dir)
            os.makedirs(out, exist_ok=True)
            if not any(inside(out, [r]) for r in roots):
                roots.append(out)
        return roots


# ------------------------------------------------------------------------------------------ errors


def _engine_message(exc: ServiceError) -> str:
    return (exc.message or "").strip().rstrip(".")


def _timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a read timeout: the engine accepted but did not answer."""
    seen = exc
    while seen is not None:
        if type(seen).__name__ in ("ReadTimeout", "ReadTimeoutError", "TimeoutError", "socket.timeout"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def cause_chain(exc: BaseException) -> str:
    """``Type: message`` of ``exc`` and of what caused it, for the diagnostics text."""
    parts, seen = [], exc
    while seen is not None and len(parts) < 4:
        parts.append(f"{type(seen).__module__}.{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    return " <- ".join(parts)


def explain(exc: BaseException, processing: bool = False) -> str:
    """A sentence for the user: what went wrong and what to do (``processing``: without the dock)."""
    if not isinstance(exc, ServiceError):
        return f"{type(exc).__name__}: {exc}"
    code, msg = exc.code, _engine_message(exc)
    low = msg.lower()
    setup = PROCESSING_HINT if processing else SETUP_HINT
    if code == "not_configured":
        return "No Skyloc engine is set up. " + setup
    if code == "unreachable":
        found = re.search(r"at (https?://[\w.\-\[\]]+(?::\d+)?)", msg)
        where = found.group(1) if found else "its URL"
        if _timed_out(exc):
            return (
                f"The Skyloc engine at {where} is running but did not answer in time (it may be loading a "
                "model or busy with a long job): try again in a moment."
            )
        if processing:
            return f"The Skyloc engine is not running (no answer at {where}). " + setup
        return (
            f"The Skyloc engine is not running (no answer at {where}). Start it in the Skyloc dock "
            "(Engine tab), or run 'skyloc serve' and set its URL and token file there."
        )
    if code == "stopped":
        return (
            "The Skyloc engine was stopped in this session: press Start in the Skyloc dock (Engine tab)."
            if not processing
            else "The Skyloc engine was stopped in this session (Engine tab: Start)."
        )
    if code == "engine_failed":
        return (
            f"The Skyloc engine could not be started: {msg}. Check the engine executable in the Engine tab."
        )
    if code == "token_file":
        return f"The engine's token cannot be read: {msg}. " + SETUP_HINT
    if code == "unauthorized":
        return (
            "The engine refused the token: the token file does not belong to the engine running at this URL "
            "(a new token is written each time 'skyloc serve' starts). Set the token file it printed, in the "
            "Skyloc dock (Engine tab)."
        )
    if code == "forbidden_path":
        return (
            f"The engine may not use this path: {msg}. Add that folder to the engine's folders (Skyloc "
            "dock, Engine tab: Folders) and restart the engine."
        )
    if code == "no_crs":
        return f"The raster cannot be used: it has no coordinate reference system ({msg}). Georeference it first."
    if code == "raster_unusable":
        return f"The raster cannot be used: {msg}."
    if code in ("bad_input", "empty_input"):
        if "photo" in low or "image" in low:
            return f"A photo could not be read: {msg}."
        if any(w in low for w in ("raster", "source", "against", "band", "crs")):
            return f"The raster cannot be used: {msg}."
        return f"The engine could not use the input: {msg}."
    if code == "too_large":
        return f"Too large for the engine: {msg}."
    if code == "index_not_found":
        return (
            f"No Skyloc index there: {msg}. Build one first (Localize photos: Build index, or "
            "Processing: Skyloc > Build index)."
        )
    if code == "model_mismatch":
        return f"The index was built with another model: {msg}."
    if code == "outside_area":
        return f"Outside the imagery: {msg}."
    if code == "bad_weights":
        return f"The model weights cannot be loaded: {msg}."
    if code == "busy":
        return "The engine is busy (its job queue is full): try again when the current jobs end."
    if code == "output_in_use":
        return f"Another running job writes the same output: {msg}. Wait for it or choose another output."
    if code == "cancelled":
        return "Cancelled: the engine removed the partial output."
    if code == "internal_error":
        return (
            "The engine hit an internal error (a bug): its log has the details; please report it with the "
            "diagnostics text (Skyloc dock, Engine tab)."
        )
    return f"{code}: {msg}" if msg else code


def _answers(url: str, timeout: float = PROBE_S) -> bool:
    """Whether something accepts connections at ``url`` (a quick TCP probe, no request)."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=timeout):
            return True
    except OSError:
        return False


def outside_folders(paths: list[str], roots: list[str]) -> list[str]:
    """The folders to give the engine so that it may read ``paths``: the folder of each file (the folder
    itself for a folder) that lies outside ``roots``, without repeats."""
    out: list[str] = []
    for path in paths:
        if not path or inside(path, roots):
            continue
        real = os.path.realpath(os.path.expanduser(path))
        folder = real if os.path.isdir(real) else os.path.dirname(real)
        if folder and folder not in out and not inside(folder, out):
            out.append(folder)
    return out


def inside(path: str, roots: list[str]) -> bool:
    """Whether ``path`` (resolved) lies inside one of ``roots`` (resolved)."""
    real = os.path.realpath(os.path.expanduser(path))
    for root in roots:
        r = os.path.realpath(os.path.expanduser(root))
        try:
            if real == r or os.path.commonpath([real, r]) == r:
                return True
        except ValueError:  # different drives on Windows
            continue
    return False


# -------------------------------------------------------------------------------------------- link


class EngineLink(QObject):
    """The one place the plugin asks for a client; holds the local engine it started, if any."""

    changed = pyqtSignal()
    _instance: EngineLink | None = None

    def __init__(self) -> None:
        super().__init__()
        self.local: LocalEngine | None = None
        self.local_roots: list[str] = []
        self.local_executable = ""
        #: Stop was pressed in this session: no automatic start until Start is pressed again
        self.stopped = False
        self.errors: deque[str] = deque(maxlen=20)
        self._lock = threading.RLock()
        #: (engine URL, model) pairs whose embedding model an engine has loaded (answered an /embed)
        self.warm_models: set[tuple[str, str]] = set()
        #: the engine's model list as its last status reported it (for weights file and sha256)
        self.models: list[dict[str, Any]] = []
        #: set by the dock: ``add_folders(folders, then)`` adds folders to the engine's and restarts it
        self.folder_adder = None

    @classmethod
    def instance(cls) -> EngineLink:
        """The plugin-wide link (created on first use)."""
        if cls._instance is None:
            cls._instance = EngineLink()
        return cls._instance

    # --------------------------------------------------------------------------------- connection

    def local_running(self) -> bool:
        return self.local is not None and self.local.process.poll() is None

    def can_autostart(self) -> bool:
        """Whether a saved engine executable may be started without a click (not after Stop)."""
        return bool(EngineSettings.load().executable) and not self.stopped

    def connection(self, start: bool = False) -> tuple[str, str]:
        """(url, token file) of the engine to use; ServiceError ``not_configured`` when there is none.

        ``start``: when no engine answers at the configured URL (or none is configured) and an engine
        executable is saved, start it now (blocks while it loads, so: from a worker thread).
        """
        if self.local_running():
            assert self.local is not None
            return self.local.url, self.local.token_file
        s = EngineSettings.load()
        configured = bool(s.url and s.token_file)
        autostart = start and self.can_autostart()
        if configured and (not autostart or _answers(s.url)):
            return s.url, os.path.expanduser(s.token_file)
        if autostart:
            engine = self.start_local()
            return engine.url, engine.token_file
        if start and self.stopped and s.executable:
            raise ServiceError(None, "stopped", "the local engine was stopped")
        raise ServiceError(None, "not_configured", "no engine URL and token file, no engine executable")

    def client(self, timeout: float = 60.0, start: bool = True) -> SkylocClient:
        """A new client (one per task or thread: clients are not shared between threads). ``start``:
        start the saved engine if none answers (see :meth:`connection`)."""
        url, token_file = self.connection(start=start)
        try:
            return SkylocClient(url, token_file=token_file, timeout=timeout)
        except OSError as exc:
            raise ServiceError(None, "token_file", f"{token_file}: {exc.strerror or exc}") from exc

    def record_error(self, message: str, exc: BaseException | None = None) -> None:
        """Keep ``message`` (and the exception behind it: type, message, URL, timeout) for diagnostics."""
        if exc is not None:
            message += f"\n      cause: {cause_chain(exc)}"
        self.errors.append(message)

    # ------------------------------------------------------------------------------ local engine

    def start_local(self, executable: str | None = None, roots: list[str] | None = None) -> LocalEngine:
        """Start ``EXECUTABLE serve`` on a free loopback port (blocks until it answers, up to 3 minutes).

        An engine this plugin started with other folders or another executable is stopped first (its
        folders are fixed at start): Start after changing the folders restarts it with the new ones.
        """
        s = EngineSettings.load()
        exe = os.path.expanduser(executable or s.executable)
        if not exe:
            raise ServiceError(None, "not_configured", "no engine executable configured")
        if not os.path.isfile(exe):
            raise ServiceError(None, "engine_failed", f"{exe}: no such program")
        wanted = list(roots or s.start_roots())
        old = None
        with self._lock:
            self.stopped = False
            if self.local_running():
                assert self.local is not None
                if self.local_roots == wanted and self.local_executable == exe:
                    return self.local
                old, self.local = self.local, None
            if old is not None:
                old.stop()
            engine = launch([exe, "serve"], roots=wanted)
            self.local, self.local_roots, self.local_executable = engine, wanted, exe
        self.changed.emit()
        return engine

    def stop_local(self) -> int | None:
        """Stop the engine this plugin started (clean shutdown: its jobs are cancelled); its exit code.
        The settings stay as they are; no automatic start follows until Start is pressed."""
        with self._lock:
            engine, self.local = self.local, None
            self.stopped = True
        if engine is None:
            return None
        code = engine.stop()
        self.changed.emit()
        return code

    def local_log(self, chars: int = 4000) -> str:
        """The end of the local engine's log (empty when the plugin did not start one)."""
        if self.local is None:
            return ""
        try:
            return Path(self.local.workdir, "engine.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # ------------------------------------------------------------------------------------- status

    def status(self, timeout: float = 3.0) -> dict[str, Any]:
        """Health, version and models of the engine, or the error in words (never raises)."""
        out: dict[str, Any] = {"ok": False, "local": self.local_running()}
        try:
            url, token_file = self.connection(start=False)
            out.update(url=url, token_file=token_file)
            with self.client(timeout=timeout) as c:
                out["health"] = c.health()
                out["version"] = c.version()
                out["models"] = c.models()
            self.models = list(out["models"])
            out["ok"] = True
        except ServiceError as exc:
            out["error"] = explain(exc)
            out["code"] = exc.code
            out["cause"] = cause_chain(exc)
        except Exception as exc:  # a broken answer: say so rather than raise into the GUI
            out["error"] = explain(exc)
            out["code"] = "error"
            out["cause"] = cause_chain(exc)
        out["timeout"] = timeout
        return out

    def output_dir(self, client: SkylocClient) -> str:
        """Folder for results (created): the setting, or ``<first engine root>/skyloc_results``."""
        s = EngineSettings.load()
        folder = os.path.expanduser(s.output_dir) if s.output_dir else ""
        if not folder:
            roots = client.version().get("roots") or [str(Path.home())]
            folder = os.path.join(roots[0], RESULTS_FOLDER)
        os.makedirs(folder, exist_ok=True)
        return folder

    def diagnostics(self) -> str:
        """A text to paste into a bug report (no token: only the token file's path)."""
        from qgis.PyQt.QtCore import PYQT_VERSION_STR, QT_VERSION_STR

        s = EngineSettings.load()
        st = self.status()
        lines = [
            "Skyloc QGIS plugin diagnostics",
            f"plugin: {plugin_version()} ({Path(__file__).parent})",
            f"QGIS: {Qgis.version()}; Qt {QT_VERSION_STR}; PyQt {PYQT_VERSION_STR}",
            f"Python: {sys.version.split()[0]} ({sys.executable}); {platform.platform()}",
            f"settings: url={s.url or '-'} token_file={s.token_file or '-'} executable={s.executable or '-'}",
            f"          roots={os.pathsep.join(s.roots) or '(home)'} output_dir={s.output_dir or '(default)'}"
            f" model={s.model}",
            f"local engine: {'running' if st['local'] else 'not started by the plugin'}",
            f"engine: {st.get('url', '-')}",
        ]
        if st["ok"]:
            v = st["version"]
            lines += [
                f"engine version: {v.get('version')} (API {v.get('api_version')}); actions: "
                + ", ".join(v.get("actions", [])),
                f"engine roots: {', '.join(v.get('roots', []))}",
                f"limits: {v.get('limits')}",
                f"jobs: {st['health'].get('jobs')}",
                "models: " + ", ".join(f"{m.get('name')} ({m.get('kind')})" for m in st["models"]),
            ]
        else:
            lines.append(f"engine status: {st.get('error')}")
            lines.append(f"  cause (timeout {st.get('timeout')} s): {st.get('cause', '-')}")
        if self.errors:
            lines.append("recent errors:")
            lines += [f"  - {e}" for e in self.errors]
        log = self.local_log()
        if log:
            lines += ["local engine log (end):", log]
        return "\n".join(lines)


def plugin_version() -> str:
    """``version`` from metadata.txt (next to the package in the zip), or 'source checkout'."""
    here = Path(__file__).parent
    for meta in (here / "metadata.txt", here.parents[1] / "metadata.txt"):
        try:
            for line in meta.read_text(encoding="utf-8").splitlines():
                if line.startswith("version="):
                    return line.split("=", 1)[1].strip()
        except OSError:
            continue
    return "unknown"
