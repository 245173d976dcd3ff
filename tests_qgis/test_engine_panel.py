"""The Engine part: start and stop a local engine from the configured executable; status; diagnostics."""

from __future__ import annotations

import os
import time
from pathlib import Path

from conftest import ENGINE, SAMPLE, process_events
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
        assert "effnet-lite1-gem" in panel.models.toPlainText()
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


def wait_started(panel, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while panel._start_task is not None:
        QgsApplication.processEvents()
        time.sleep(0.02)
        assert time.monotonic() < deadline, "the local engine did not start"
    process_events()


def test_start_with_new_folders_restarts_and_stop_keeps_the_settings(plugin, work_dir, engine_settings):
    from skyloc.engine_link import EngineLink, EngineSettings

    panel, link = plugin.dock.engine, EngineLink.instance()
    panel.executable.setFilePath(str(ENGINE))
    panel.roots.setText(str(work_dir))
    try:
        panel.start()
        wait_started(panel)
        first = link.local.url
        assert not any(Path(r) == SAMPLE.resolve() for r in link.status()["version"]["roots"])
        panel.roots.setText(os.pathsep.join([str(work_dir), str(SAMPLE)]))  # another folder, then Start
        panel.start()
        wait_started(panel)
        assert link.local_running() and link.local.url != first  # a new engine...
        roots = link.status()["version"]["roots"]
        assert any(Path(r) == SAMPLE.resolve() for r in roots), roots  # ...with the new folders
        assert plugin.dock.line.text().startswith("Engine: running (plugin's) at 127.0.0.1:")
        assert "local engine started by the plugin" in panel.status.text()
    finally:
        panel.stop()
        process_events()
    s = EngineSettings.load()  # Stop leaves the configuration (and the fields) as they were
    assert s.executable == str(ENGINE) and s.roots == [str(work_dir), str(SAMPLE)]
    assert panel.executable.filePath() == str(ENGINE)
    assert panel.roots.text() == os.pathsep.join([str(work_dir), str(SAMPLE)])
    assert not link.local_running()


def test_saved_engine_starts_without_a_click(plugin, work_dir, engine_settings, tmp_path):
    """A new session (plugin load) and Processing without the dock start the saved engine themselves."""
    import processing
    from skyloc.engine_link import EngineLink, EngineSettings

    link = EngineLink.instance()
    EngineSettings(executable=str(ENGINE), roots=[str(work_dir), str(SAMPLE)]).save()
    link.stopped = False  # as in a new QGIS session
    status_at_load = plugin.engine_status
    try:
        st = plugin.check_engine()  # what initGui runs at load
        assert st.get("starting")
        assert plugin.dock.line.text() == "Engine: starting…"
        assert "starting the engine" in plugin.dock.engine.status.text()  # line and tab agree
        wait_started(plugin.dock.engine)
        assert link.local_running(), list(link.errors)
        assert plugin.dock.line.text().startswith("Engine: running (plugin's) at 127.0.0.1:")
        link.stop_local()
        link.stopped = False  # a new session again, this time no dock: Processing alone
        out = tmp_path / "h.tif"
        processing.run(
            "skyloc:heatmapatpoint",
            {"RASTER": str(SAMPLE / "naip_2018.tif"), "POINT": "488500,5207000", "OUTPUT": str(out)},
        )
        assert out.is_file(), out
        assert link.local is not None, "no local engine"
        assert link.local_running(), (link.local.process.poll(), link.local_log())
    finally:
        link.stop_local()
        link.stopped = False
        plugin.engine_status = status_at_load
        process_events()


def test_processing_without_any_engine_says_what_to_configure(plugin, engine_settings, tmp_path):
    import processing
    import pytest
    from qgis.core import QgsProcessingException
    from skyloc.engine_link import EngineSettings

    EngineSettings().save()
    with pytest.raises(QgsProcessingException) as err:
        processing.run(
            "skyloc:heatmapatpoint",
            {
                "RASTER": str(SAMPLE / "naip_2018.tif"),
                "POINT": "488500,5207000",
                "OUTPUT": str(tmp_path / "h.tif"),
            },
        )
    text = str(err.value)
    assert "skyloc/executable" in text and "qgis_process" in text
    assert "press Start" not in text
