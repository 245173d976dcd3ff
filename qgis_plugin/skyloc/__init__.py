"""Skyloc QGIS plugin: localize photos taken from above, footprints, embeddings and heatmaps.

The plugin talks to the Skyloc engine (``skyloc serve``) over loopback HTTP with ``skyloc.client``, the
engine's own ``engine/client.py`` (standard library + ``requests`` only). That module is never written by
hand here:

- in the installable zip, ``scripts/build_plugin.py`` copies ``engine/client.py`` to ``skyloc/client.py``;
- in a source checkout (``qgis_plugin/skyloc`` linked into QGIS's plugin folder) there is no
  ``client.py`` beside this file, so :func:`_ensure_client` loads the checkout's ``engine/client.py`` file
  under the name ``skyloc.client`` (the file only: the heavy ``engine`` package is never imported).

Either way the other modules just write ``from .client import SkylocClient, ServiceError``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__all__ = ["classFactory"]


def _ensure_client() -> None:
    """Make ``<this package>.client`` importable (see the module docstring)."""
    name = f"{__name__}.client"
    if name in sys.modules or (Path(__file__).with_name("client.py")).exists():
        return
    source = Path(__file__).resolve().parents[2] / "engine" / "client.py"
    if not source.is_file():
        raise ImportError(
            f"{Path(__file__).with_name('client.py')} is missing and there is no engine/client.py in a "
            "source checkout around it: install the plugin from the zip built by scripts/build_plugin.py"
        )
    spec = importlib.util.spec_from_file_location(name, source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


class _UnavailablePlugin:
    """Stands in when the plugin cannot be imported (e.g. no ``requests``): says why, raises nothing."""

    def __init__(self, iface, reason: str) -> None:
        self.iface = iface
        self.reason = reason

    def initGui(self) -> None:  # noqa: N802 (QGIS API)
        from qgis.core import Qgis

        self.iface.messageBar().pushMessage(
            "Skyloc",
            f"the plugin cannot start: {self.reason}",
            level=Qgis.MessageLevel.Critical,
            duration=0,
        )

    def unload(self) -> None:
        pass


def classFactory(iface):  # noqa: N802 (QGIS API)
    """QGIS entry point: the plugin object for ``iface``."""
    try:
        _ensure_client()
        from .plugin import SkylocPlugin
    except ImportError as exc:
        return _UnavailablePlugin(iface, str(exc))
    return SkylocPlugin(iface)
