"""The files a running engine owns outside the user's folders, and the start-up sweep of dead engines' files.

``skyloc serve`` keeps its uploads (users' photos) and the temporary files of its work (memory-mapped
feature grids, GDAL scratch files) in one private folder, ``<tmp>/skyloc-serve-<pid>-<random>/``, whose
``owner.json`` names the process (pid and start time: a pid reused by another process is not taken for
the engine) and the token and ready files it wrote. A clean exit removes all of them; after a kill -9 or
a crash nothing could, so every ``skyloc serve`` first sweeps what engines that are gone left behind:

- only folders named ``skyloc-serve-*`` in the temporary folder, owned by this user, whose process is dead
  (a folder of a live engine, or whose owner cannot be told, is left alone);
- the token file only if it still holds the token that engine wrote (a later engine on the same port
  wrote its own), the ready file only if it still names that engine's pid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("skyloc.service")

PREFIX = "skyloc-serve-"
OWNER = "owner.json"
_NAME = re.compile(rf"^{PREFIX}(\d+)-")


def process_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, Linux ``/proc``), None where unknown."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    try:
        return data[data.rindex(")") + 2 :].split()[19]  # field 22; the name (field 2) may hold spaces
    except (ValueError, IndexError):
        return None


def _windows_process_alive(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return kernel32.GetLastError() != 87  # ERROR_INVALID_PARAMETER: no such process
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def process_alive(pid: int, start: str | None = None) -> bool:
    """True if ``pid`` runs and (when ``start`` is known) is the same process that started then."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return True  # cannot tell: never sweep on a doubt
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        try:
            return _windows_process_alive(pid)
        except (OSError, AttributeError):
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OSError:
        return True
    if start is not None:
        now = process_start(pid)
        if now is not None and now != start:
            return False  # the pid was reused by another process
    return True


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class RunDir:
    """This engine's private folder: ``uploads/``, ``tmp/`` and ``owner.json``."""

    path: Path

    @classmethod
    def create(cls, base: str | None = None) -> RunDir:
        path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base))
        run = cls(path)
        run.uploads.mkdir(mode=0o700)
        run.tmp.mkdir(mode=0o700)
        run.record(pid=os.getpid(), start=process_start(os.getpid()), created=time.time())
        return run

    @property
    def uploads(self) -> Path:
        return self.path / "uploads"

    @property
    def tmp(self) -> Path:
        return self.path / "tmp"

    def owner(self) -> dict[str, Any]:
        return _read_owner(self.path) or {}

    def record(self, **fields: Any) -> None:
        """Add ``fields`` to owner.json (atomically: a sweep never reads half a file)."""
        data = {**self.owner(), **fields}
        tmp = self.path / f".{OWNER}.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path / OWNER)

    def use_for_temporary_files(self) -> None:
        """Point Python's ``tempfile``, child processes and GDAL's scratch files into ``tmp/``."""
        tempfile.tempdir = str(self.tmp)
        os.environ["TMPDIR"] = str(self.tmp)
        os.environ["CPL_TMPDIR"] = str(self.tmp)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _read_owner(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / OWNER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _remove_token(path: str, digest: str) -> bool:
    p = Path(path)
    try:
        if token_digest(p.read_text().strip()) != digest:
            return False  # another engine (same port) wrote its own token there since
        p.unlink()
    except OSError:
        return False
    return True


def _remove_ready(path: str, pid: int) -> bool:
    p = Path(path)
    try:
        if json.loads(p.read_text()).get("pid") != pid:
            return False
        p.unlink()
    except (OSError, ValueError, AttributeError):
        return False
    return True


def sweep(base: str | None = None) -> list[str]:
    """Remove what dead engines left (folders, token and ready files); returns what was removed."""
    base_dir = Path(base or tempfile.gettempdir())
    removed: list[str] = []
    try:
        candidates = [p for p in base_dir.iterdir() if p.name.startswith(PREFIX)]
    except OSError:
        return removed
    for folder in candidates:
        with contextlib.suppress(OSError):
            st = folder.lstat()
            if not folder.is_dir() or folder.is_symlink():
                continue
            if hasattr(os, "getuid") and st.st_uid != os.getuid():
                continue  # another user's engine
            owner = _read_owner(folder)
            if owner is not None:
                pid, start = owner.get("pid"), owner.get("start")
            else:  # killed before owner.json was written: the pid is in the name
                match = _NAME.match(folder.name)
                if match is None:
                    continue
                pid, start = int(match.group(1)), None
                if time.time() - st.st_mtime < 60:
                    continue  # maybe an engine that is starting right now (it writes owner.json next)
            if pid == os.getpid() or process_alive(pid, start):
                continue
            if owner is not None:
                token, digest = owner.get("token_file"), owner.get("token_sha256")
                if isinstance(token, str) and isinstance(digest, str) and _remove_token(token, digest):
                    removed.append(token)
                ready = owner.get("ready_file")
                if isinstance(ready, str) and _remove_ready(ready, pid):
                    removed.append(ready)
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
    if removed:
        log.info("removed what stopped engines left behind: %s", ", ".join(removed))
    return removed
