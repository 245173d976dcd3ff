"""The plugin from the built zip: contents, load/unload, Processing provider, engine missing at load."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO, bar_texts, clear_bar, process_events
from qgis.core import Qgis, QgsApplication, QgsProcessingAlgorithm

ALGORITHMS = {"buildindex", "localizephotos", "heatmapatpoint", "embeddingsatpoints"}


def test_zip_contents(plugin_zip):
    names = zipfile.ZipFile(plugin_zip).namelist()
    assert all(n.startswith("skyloc/") for n in names)
    for needed in ("__init__.py", "plugin.py", "client.py", "metadata.txt", "LICENSE", "icon.png"):
        assert f"skyloc/{needed}" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    client = zipfile.ZipFile(plugin_zip).read("skyloc/client.py")
    assert client == (REPO / "engine" / "client.py").read_bytes()  # a copy of the engine's, not by hand


def test_plugin_loaded_from_zip(plugin, skyloc_pkg, plugin_zip):
    import skyloc.client

    here = Path(skyloc_pkg.__file__).parent
    assert Path(skyloc.client.__file__).parent == here  # the zip's client.py, not the checkout's engine/
    assert str(REPO / "qgis_plugin") not in Path(skyloc_pkg.__file__).as_posix()
    assert plugin.dock is not None
    tabs = [plugin.dock.tabs.tabText(i) for i in range(plugin.dock.tabs.count())]
    assert tabs == ["Localize", "Embed", "Engine"]
    assert plugin.dock_action is not None and plugin.tool_action is not None
    assert plugin.engine_status is not None and plugin.engine_status["ok"]  # checked right after load


def test_provider_and_algorithms(plugin):
    provider = QgsApplication.processingRegistry().providerById("skyloc")
    assert provider is not None and provider.name() == "Skyloc"
    algs = {a.name(): a for a in provider.algorithms()}
    assert set(algs) == ALGORITHMS
    for alg in algs.values():
        assert alg.flags() & QgsProcessingAlgorithm.Flag.FlagSupportsBatch
        assert alg.flags() & QgsProcessingAlgorithm.Flag.FlagCanCancel
        assert not alg.flags() & QgsProcessingAlgorithm.Flag.FlagHideFromModeler
        assert alg.shortHelpString()
        assert QgsApplication.processingRegistry().algorithmById(f"skyloc:{alg.name()}") is not None


def test_unload_then_load_without_engine(plugin, skyloc_pkg, qgis_iface, engine_settings):
    """unload removes everything; a fresh load with no engine configured explains what to do."""
    from skyloc.engine_link import EngineSettings

    plugin.unload()
    assert QgsApplication.processingRegistry().providerById("skyloc") is None
    assert plugin.dock is None and plugin.dock_action is None
    try:
        EngineSettings().save()  # nothing configured
        clear_bar(qgis_iface)
        other = skyloc_pkg.classFactory(qgis_iface)
        other.initGui()  # no exception
        process_events()
        assert other.engine_status is not None and other.engine_status["code"] == "not_configured"
        infos = bar_texts(qgis_iface, Qgis.MessageLevel.Info)
        assert any("Engine tab" in m and "skyloc" in m for m in infos), infos
        assert other.dock.line.text() == "Engine: not set up (Engine tab)"  # status line = Engine tab
        assert "No Skyloc engine is set up" in other.dock.engine.status.text()
        other.unload()
        assert QgsApplication.processingRegistry().providerById("skyloc") is None
    finally:
        plugin.initGui()
    assert QgsApplication.processingRegistry().providerById("skyloc") is not None


def test_source_checkout_loads_the_engine_client_file():
    """Without a client.py beside it (a source checkout), the package loads engine/client.py as its client."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import skyloc; skyloc._ensure_client(); "
        "import skyloc.client as c; print(c.__file__); print('engine' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "qgis_plugin")], capture_output=True, text=True, check=True
    ).stdout.split()
    assert Path(out[0]) == REPO / "engine" / "client.py"
    assert out[1] == "False"  # the file only, not the heavy engine package


def test_plugin_without_requests_says_why(skyloc_pkg):
    """If the plugin cannot import (here: no 'requests'), QGIS still loads it and the message bar says why."""
    code = (
        "import sys; sys.modules['requests'] = None; sys.path.insert(0, sys.argv[1]); "
        "from unittest import mock; import skyloc; iface = mock.MagicMock(); p = skyloc.classFactory(iface); "
        "p.initGui(); p.unload(); print(iface.messageBar().pushMessage.call_args)"
    )
    plugins = str(Path(skyloc_pkg.__file__).parents[1])
    out = subprocess.run(
        [sys.executable, "-c", code, plugins], capture_output=True, text=True, check=True
    ).stdout
    assert "cannot start" in out and "requests" in out
