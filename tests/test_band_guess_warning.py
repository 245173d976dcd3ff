"""The engine warns when it guesses a raster's band order (issue 13), and a service job lists the warnings
logged while it ran, so the plugin can show them (the sample NAIP rasters have no band names and a gray /
undefined colour interpretation: bands 1,2,3 are a guess)."""

from __future__ import annotations

import logging
from pathlib import Path

import rasterio
from imagery import SAMPLE

from engine.imagery.stretch import choose_rgb_bands
from engine.service.jobs import JobManager, JobOutcome

NAIP09 = SAMPLE / "naip_2009.tif"


def test_choose_rgb_bands_warns_only_when_it_guesses(caplog):
    with rasterio.open(NAIP09) as ds, caplog.at_level(logging.WARNING, logger="skyloc.imagery"):
        assert choose_rgb_bands(ds) == (1, 2, 3)
        guessed = [r.getMessage() for r in caplog.records]
        caplog.clear()
        assert choose_rgb_bands(ds, [3, 2, 1]) == (3, 2, 1)  # given by the user: no guess, no warning
        assert not caplog.records
    assert len(guessed) == 1 and ": band order guessed: bands 1,2,3 read as red, green, blue (" in guessed[0]
    assert Path(guessed[0].split(":")[0]).name == NAIP09.name


def test_a_job_lists_the_warnings_logged_while_it_ran():
    jobs = JobManager(workers=1, queue_size=2)
    try:

        def run(progress, cancel):
            with rasterio.open(NAIP09) as ds:
                choose_rgb_bands(ds)
                choose_rgb_bands(ds)  # the same warning twice: listed once
            logging.getLogger("skyloc.service").warning("the service's own log: not a job warning")
            return JobOutcome([], {})

        job = jobs.submit("index", run, params={}, outputs=[])
        done = jobs.wait(job.id, timeout=60)
        quiet = jobs.wait(jobs.submit("index", lambda p, c: JobOutcome([], {}), params={}, outputs=[]).id, 60)
    finally:
        jobs.shutdown()
    snap = done.snapshot()
    assert snap["state"] == "succeeded"
    assert len(snap["warnings"]) == 1 and "band order guessed" in snap["warnings"][0], snap["warnings"]
    assert quiet.snapshot()["warnings"] == []  # the next job on the same thread starts clean
    logging.getLogger("skyloc.imagery").warning("outside any job")  # no job: nowhere to go, no error
    assert done.snapshot()["warnings"] == snap["warnings"]


def test_footprint_against_a_raster_warns_once_and_takes_bands(tmp_path, caplog):
    """``footprint --against`` read the raster twice (windows and ground), warning twice; with bands given
    (the dock passes the layer's renderer bands) nothing is guessed and both reads use them."""
    from engine import api
    from engine.footprint.places import RasterPlaces

    encoder = api.get_encoder("default", None, "onnx", None, None)
    with caplog.at_level(logging.WARNING, logger="skyloc.imagery"):
        places = RasterPlaces(str(NAIP09), encoder)
        places.close()
    assert [r.getMessage() for r in caplog.records if "band order guessed" in r.getMessage()].__len__() == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="skyloc.imagery"):
        places = RasterPlaces(str(NAIP09), encoder, bands=[3, 2, 1])
        try:
            assert places.source.rgb_bands == (3, 2, 1)
            assert places.ground.source.rgb_bands == (3, 2, 1)
        finally:
            places.close()
    assert not caplog.records
