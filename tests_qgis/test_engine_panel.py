"""The Engine part: start and stop a local engine from the configured executable; status; diagnostics."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import ENGINE, process_events
from qgis.core import QgsApplication


def test_start_status_diagnostics_stop(plugin, skyloc_pkg, work_dir, engine_settings):
    from skyloc.engine_link import EngineLink

    panel, link = plugin.dock.engine, EngineLink.instance()
    panel.executable.setFilePath(str(ENGINE))
    panel.roots.setText(str(work_dir))
    try:
        panel.start()  # a background task: the dock stays responsive while the engine loads
        deadline = time.monotonic() + 120
        while panel._start_task is not None:
            QgsApplication.processEvents()
            time.sleep(0.02)
            assert time.monotonic() < deadline, "the local engine did not start"
        assert link.local_running()
        url = link.local.url
        assert link.connection()[0] == url  # the local engine comes before the configured URL
        status = panel.refresh()
        assert status["ok"] and status["local"]
        assert "local engine started by the plugin" in panel.status.text()
        assert "effnet-lite0-gem" in panel.models.toPlainText()
        text = panel.copy_diagnostics()
        for needed in ("QGIS: 3.", "Python: 3.", f"engine: {url}", "engine version: ", "models: "):
            assert needed in text, needed
        token = Path(link.local.token_file).read_text().strip()
        assert token not in text
    finally:
        panel.stop()
        process_events()
    assert not link.local_running()
    assert link.status()["url"] != url  # back to the configured engine
