"""The local HTTP service the QGIS plugin talks to (``skyloc serve``).

- ``app.py``: the FastAPI application (one endpoint per ``engine.api`` function, JSON errors).
- ``jobs.py``: the bounded job queue (progress, cancel, result, cleanup of partial outputs).
- ``auth.py``: the token (generated, written 0600, compared in constant time).
- ``paths.py``: every path a request names must resolve (symlinks included) inside the served roots.
- ``serve.py``: the ``skyloc serve`` command (loopback only unless ``--allow-remote``, clean SIGTERM).

Nothing here is imported by ``engine.api``; ``import engine.service`` stays light (the heavy engine
modules are imported when the app is built).
"""
