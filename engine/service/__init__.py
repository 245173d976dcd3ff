"""The local HTTP service the QGIS plugin talks to (``skyloc serve``).

- ``app.py``: the FastAPI application (one endpoint per ``engine.api`` function, JSON errors).
- ``jobs.py``: the bounded job queue (progress, cancel, result, cleanup of partial outputs).
- ``auth.py``: the token (generated, written 0600, compared in constant time).
- ``paths.py``: every path a request names must resolve (symlinks included) inside the served roots.
- ``gdal_guard.py``: ... and so must every file GDAL would open for it (VRT sources, sidecars); GDAL's
  network access is off.
- ``protocol.py``: uvicorn's HTTP/1.1 protocol with a deadline for request headers and a cap on idle
  connections (silent clients and slowloris are cut).
- ``runtime.py``: the engine's private folder (uploads, temporary files) and the start-up sweep of what
  killed engines left behind.
- ``serve.py``: the ``skyloc serve`` command (loopback only unless ``--allow-remote``, clean SIGTERM).

Nothing here is imported by ``engine.api``; ``import engine.service`` stays light (the heavy engine
modules are imported when the app is built).
"""
