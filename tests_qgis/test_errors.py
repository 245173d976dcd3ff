"""Errors reach the user as sentences in the message bar (or a Processing error), never as exceptions."""

from __future__ import annotations

import socket

import pytest
from conftest import SAMPLE, bar_texts, clear_bar, use_engine, wait_for
from qgis.core import Qgis, QgsPointXY, QgsProcessingException, QgsRasterLayer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def raster_on_canvas(qgis_canvas, clean_project):
    raster = QgsRasterLayer(str(SAMPLE / "naip_2018.tif"), "naip_2018")
    clean_project.addMapLayer(raster)
    qgis_canvas.setDestinationCrs(raster.crs())
    qgis_canvas.setExtent(raster.extent())
    qgis_canvas.setLayers([raster])
    return raster


def critical(qgis_iface) -> list[str]:
    return bar_texts(qgis_iface, Qgis.MessageLevel.Critical)


def test_engine_down_gives_message_bar_error(
    plugin, qgis_iface, raster_on_canvas, engine, work_dir, engine_settings
):
    use_engine(f"http://127.0.0.1:{free_port()}", engine.token_file, work_dir)  # nothing listens there
    task = plugin.map_tool.heatmap_at(QgsPointXY(488500.0, 5207000.0))
    assert task is not None
    wait_for(task, timeout=60)
    assert not task.ok
    messages = critical(qgis_iface)
    assert any("engine is not running" in m and "Engine tab" in m for m in messages), messages
    status = plugin.dock.engine.refresh()  # the Engine tab says it too, without raising
    assert not status["ok"] and "not running" in plugin.dock.engine.status.text()


def test_engine_down_in_processing_is_a_processing_error(plugin, engine, work_dir, tmp_path, engine_settings):
    import processing

    use_engine(f"http://127.0.0.1:{free_port()}", engine.token_file, work_dir)
    with pytest.raises(QgsProcessingException, match="engine is not running"):
        processing.run(
            "skyloc:heatmapatpoint",
            {
                "RASTER": str(SAMPLE / "naip_2018.tif"),
                "POINT": "488500,5207000",
                "OUTPUT": str(tmp_path / "h.tif"),
            },
        )


def test_wrong_token(plugin, qgis_iface, raster_on_canvas, engine, work_dir, tmp_path, engine_settings):
    token = tmp_path / "token"
    token.write_text("not-the-token\n")
    use_engine(engine.url, str(token), work_dir)
    task = plugin.map_tool.heatmap_at(QgsPointXY(488500.0, 5207000.0))
    wait_for(task, timeout=60)
    assert any("refused the token" in m for m in critical(qgis_iface)), critical(qgis_iface)


def test_unreadable_photo_and_unusable_raster(plugin, qgis_iface, clean_project, tmp_path, engine_settings):
    from skyloc.tasks import HeatmapTask, start_task

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    task = start_task(HeatmapTask(str(SAMPLE / "naip_2018.tif"), photo=str(bad), iface=qgis_iface))
    wait_for(task, timeout=60)
    assert not task.ok
    assert any("photo could not be read" in m for m in critical(qgis_iface)), critical(qgis_iface)

    clear_bar(qgis_iface)
    # a tile layer is read (issue 14), but not a local z/x/y template: the engine fetches over http(s)
    tiles = QgsRasterLayer("type=xyz&url=file:///tmp/tiles/{z}/{x}/{y}.png&zmax=5&zmin=0", "web tiles", "wms")
    assert tiles.isValid()
    clean_project.addMapLayer(tiles)
    plugin.dock.embeddings.raster.setLayer(tiles)
    plugin.dock.embeddings.lat.setText("47.02")
    plugin.dock.embeddings.lon.setText("-99.15")
    assert plugin.dock.embeddings.heatmap_from_location() is None
    messages = critical(qgis_iface)
    assert any("raster cannot be used" in m and "not an http(s) address" in m for m in messages), messages


def test_explain_codes(skyloc_pkg):
    from skyloc.client import ServiceError
    from skyloc.engine_link import explain

    assert "not running" in explain(
        ServiceError(None, "unreachable", "no answer from the engine at http://x:1: e")
    )
    assert "http://x:1" in explain(
        ServiceError(None, "unreachable", "no answer from the engine at http://x:1: e")
    )
    assert "token" in explain(ServiceError(401, "unauthorized", "missing or wrong token"))
    assert "Folders" in explain(ServiceError(403, "forbidden_path", "photo '/x' resolves to /x, outside"))
    assert explain(ServiceError(422, "bad_input", "photo /a.jpg: cannot identify image")).startswith(
        "A photo could not be read"
    )
    assert explain(ServiceError(422, "no_crs", "r.tif has no CRS")).startswith("The raster cannot be used")
    assert "Build index" in explain(ServiceError(404, "index_not_found", "no index"))
    assert "busy" in explain(ServiceError(503, "busy", "queue full"))
