"""One entry for a tile service given by the user: an XYZ URL template or a WMTS layer.

Above both tile_service.py (XYZ templates, downloads) and wmts.py (capabilities -> a template), so that
neither imports the other in a circle.
"""

from __future__ import annotations

from collections.abc import Sequence

from .tile_service import UrlTemplate, is_wmts
from .wmts import wmts_template


def parse_template(text: str, subdomains: Sequence[str] | None = None) -> UrlTemplate:
    """The template of a service: a WMTS source reads the service's capabilities (once per process), an XYZ
    template (or a QGIS XYZ layer source) is parsed as it is. InputError / TileServiceError when unusable."""
    if is_wmts(text):
        return wmts_template(text.strip())
    return UrlTemplate.parse(text, tuple(subdomains) if subdomains else None)
