"""Plugin tests inside a real QGIS (headless: ``QT_QPA_PLATFORM=offscreen``), with pytest-qgis fixtures.

    QT_QPA_PLATFORM=offscreen .venv-qgis/bin/python -m pytest -q tests_qgis

The session builds ``skyloc.zip`` with ``scripts/build_plugin.py``, extracts it into a temporary plugins
folder and imports the plugin from there (never from the source tree), then starts a real engine on
loopback (``.venv/bin/skyloc serve``, roots: a temporary work folder and the repository's ``sample/``).
One index of ``sample/naip_2009.tif`` (tiles of 256 px) is built once, by the plugin's own algorithm.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample"
ENGINE = REPO / ".venv" / "bin" / "skyloc"
PHOTO = SAMPLE / "photo_2009_oblique.jpg"

# QGIS computes statistics when it opens a raster and GDAL would store them in NAME.aux.xml beside the
# file, i.e. in the repository's sample/: keep GDAL's side files off (read at use time, so this is in time).
os.environ["GDAL_PAM_ENABLED"] = "NO"

qgis = pytest.importorskip("qgis.core", reason="QGIS's Python (python3-qgis) is not installed")


def wait_for(task, timeout: float = 180.0):
    """Process Qt events until a plugin task has ended (its ``finished`` ran on the main thread)."""
    from qgis.core import QgsApplication

    deadline = time.monotonic() + timeout
    while not task.ended:
        QgsApplication.processEvents()
        time.sleep(0.01)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{task.description()} still running after {timeout} s")
    return task


def process_events(seconds: float = 0.2) -> None:
    from qgis.core import QgsApplication

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QgsApplication.processEvents()
        time.sleep(0.01)


@pytest.fixture(scope="session")
def plugin_zip(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "skyloc.zip"
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_plugin.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert run.stdout.strip() == str(out)
    return out


@pytest.fixture(scope="session")
def skyloc_pkg(plugin_zip, tmp_path_factory):
    """The plugin package, imported from the extracted zip."""
    plugins = tmp_path_factory.mktemp("plugins")
    with zipfile.ZipFile(plugin_zip) as zf:
        zf.extractall(plugins)
    sys.path.insert(0, str(plugins))
    import skyloc

    assert Path(skyloc.__file__).resolve().parent == (plugins / "skyloc").resolve()
    return skyloc


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory) -> Path:
    """The engine's first root (results, indexes, photos inside the roots)."""
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="session")
def engine(skyloc_pkg, work_dir):
    """A real engine on loopback, started with the plugin's own client."""
    if not ENGINE.exists():
        pytest.skip(f"no engine at {ENGINE}: run `make venv` first")
    from skyloc.client import launch

    env = {k: v for k, v in os.environ.items() if k != "GDAL_PAM_ENABLED"}  # the engine as users run it
    env["SKYLOC_TILE_CACHE"] = str(work_dir / "tile-cache")  # not the user's ~/.cache
    eng = launch([str(ENGINE), "serve"], roots=[str(work_dir), str(SAMPLE)], env=env)
    yield eng
    eng.stop()


def use_engine(url: str, token_file: str, work_dir: Path) -> None:
    from skyloc.engine_link import EngineSettings

    EngineSettings(url=url, token_file=token_file, output_dir=str(work_dir / "results")).save()


@pytest.fixture
def engine_settings(engine, work_dir):
    """Plugin settings pointing at the test engine (restored after tests that change them)."""
    use_engine(engine.url, engine.token_file, work_dir)
    yield engine
    use_engine(engine.url, engine.token_file, work_dir)


@pytest.fixture(scope="session")
def plugin(skyloc_pkg, qgis_iface, qgis_processing, engine, work_dir):
    """The plugin from the zip, loaded like QGIS does (classFactory + initGui), unloaded at the end."""
    use_engine(engine.url, engine.token_file, work_dir)
    p = skyloc_pkg.classFactory(qgis_iface)
    p.initGui()
    process_events()
    yield p
    p.unload()


@pytest.fixture(scope="session")
def built_index(plugin, work_dir) -> str:
    """One index of sample/naip_2009.tif (256 px tiles), built by the plugin's Processing algorithm."""
    import processing

    out = work_dir / "index_2009"
    result = processing.run(
        "skyloc:buildindex",
        {"SOURCES": [str(SAMPLE / "naip_2009.tif")], "TILE_SIZES": "256", "OVERLAP": 0.5, "OUTPUT": str(out)},
    )
    assert Path(result["OUTPUT"]) == out
    assert (out / "manifest.json").is_file()
    return str(out)


@pytest.fixture
def photo_folder(work_dir) -> Path:
    folder = work_dir / "photos"
    folder.mkdir(exist_ok=True)
    shutil.copy(PHOTO, folder / PHOTO.name)
    return folder


def clear_bar(qgis_iface) -> None:
    """Empty the message bar: the mock's record and the plugin's items."""
    qgis_iface.messageBar().clear_messages()
    qgis_iface.messageBar().clearWidgets()


def bar_texts(qgis_iface, level) -> list[str]:
    """``Skyloc:<text>`` of the messages of ``level`` in the bar (the plugin pushes items, full text)."""
    from skyloc.messages import bar_messages

    return qgis_iface.messageBar().get_messages(level) + bar_messages(qgis_iface, level)


@pytest.fixture
def clean_project(qgis_iface):
    """An empty project and message bar."""
    from qgis.core import QgsProject

    QgsProject.instance().clear()
    clear_bar(qgis_iface)
    yield QgsProject.instance()
    QgsProject.instance().clear()
