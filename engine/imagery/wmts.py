"""WMTS layers as tile services: the Web-Mercator quadtree case, read as an XYZ service.

A WMTS source is given either as QGIS writes a WMTS layer's source::

    contextualWMSLegend=0&crs=EPSG:3857&dpiMode=7&format=image/jpeg&layers=s2cloudless&styles=default&
    tileMatrixSet=GoogleMapsCompatible&url=https://host/wmts/1.0.0/WMTSCapabilities.xml

or as ``wmts:`` + the capabilities URL, the choices after ``#`` (each optional)::

    wmts:https://host/wmts/1.0.0/WMTSCapabilities.xml#layer=s2cloudless&tileMatrixSet=GoogleMapsCompatible&style=default&format=image/jpeg

The GetCapabilities document is fetched once (kept 10 minutes per process) and read with xml.etree (OWS 1.1,
WMTS 1.0). Without a layer, the only layer of the service; without a style, the layer's default style;
without a format, JPEG, else PNG, else the first image format; without a tile matrix set, the first linked
one that is the quadtree. Only the EPSG:3857 quadtree (``GoogleMapsCompatible`` or any set equal to it) is
read: CRS EPSG:3857 (or 900913, 102100), 256- or 512-px square tiles, top-left corner at (-20037508.34,
20037508.34) (either axis order), ``2^z`` x ``2^z`` tiles at the scale denominator of zoom z. The tile
matrix identifiers may be anything ("12", "EPSG:3857:12"): zoom z is the matrix ``2^z`` tiles wide. Tiles
are fetched from the layer's RESTful ``ResourceURL`` template when it offers one for the format, else by
KVP GetTile. The result is a :class:`WmtsTemplate`: an XYZ URL template as far as the downloader, the
cache and the manifests go, whose cache key is the layer, style, tile matrix set and format.
"""

from __future__ import annotations

import math
import re
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import requests

from ..errors import InputError
from .tile_service import DEFAULT_TIMEOUT, USER_AGENT, TileServiceError, UrlTemplate, is_wmts, redact

NS = {
    "wmts": "http://www.opengis.net/wmts/1.0",
    "ows": "http://www.opengis.net/ows/1.1",
    "xlink": "http://www.w3.org/1999/xlink",
}
#: Scale denominator of the quadtree's zoom 0 with 256-px tiles (OGC's 0.28 mm pixel).
SCALE0 = 559082264.0287178
HALF_WORLD = 20037508.342789244
#: Tolerances: the top-left corner (metres) and the scale denominators (relative).
CORNER_TOLERANCE_M = 1.0
SCALE_TOLERANCE = 1e-6
#: Largest capabilities document read (bytes), and how long one is kept (seconds).
MAX_CAPABILITIES_BYTES = 32 * 2**20
CAPABILITIES_TTL_S = 600.0
_CRS_3857 = re.compile(r"(?:^|[:/])(?:3857|900913|3785|102100|102113)$")
_CREDENTIAL_KEYS = ("username", "password", "authcfg")

_cache: dict[str, tuple[float, bytes]] = {}
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class WmtsRequest:
    """What a WMTS source asks for; None: the service's default (see the module docstring)."""

    capabilities: str
    layer: str | None = None
    style: str | None = None
    tile_matrix_set: str | None = None
    format: str | None = None


def parse_source(text: str) -> WmtsRequest:
    """The capabilities URL and the choices of a ``wmts:`` or QGIS WMTS source."""
    t = str(text).strip()
    if t[:5].lower() == "wmts:":
        url, _, frag = t[5:].partition("#")
        fields = {k.lower(): v for k, v in parse_qsl(frag, keep_blank_values=True)}
    else:
        fields = {k.lower(): v for k, v in parse_qsl(t, keep_blank_values=True)}
        url = fields.get("url", "")
        given = [k for k in _CREDENTIAL_KEYS if fields.get(k)]
        if given:
            raise InputError(
                f"WMTS source with {'/'.join(given)}: the engine cannot log in to a service (and would store "
                "the credentials in the index manifest); use a service that needs no login, or an API key "
                "in the capabilities URL"
            )
    url = url.strip()
    unknown = sorted(set(fields) - {"layer", "layers", "style", "styles", "tilematrixset", "format", "url"})
    if t[:5].lower() == "wmts:" and unknown:
        raise InputError(
            f"WMTS source {redact(t)!r}: unknown choice {unknown[0]!r} after '#' (known: layer, style, "
            "tileMatrixSet, format)"
        )
    if not url:
        raise InputError(f"WMTS source {redact(t)!r} has no capabilities URL")
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise InputError(
            f"WMTS capabilities {redact(url)!r}: only http:// and https:// services can be read "
            f"(got {scheme + ':' if scheme else 'no scheme'})"
        )
    parts = urlsplit(url)
    if not parts.hostname:
        raise InputError(f"WMTS capabilities {redact(url)!r}: no host name")
    if parts.username or parts.password:
        raise InputError(
            f"WMTS capabilities {redact(url)!r}: user names and passwords in the URL are not accepted "
            "(they would be stored in the index manifest)"
        )

    def pick(*keys: str) -> str | None:
        for k in keys:
            v = fields.get(k, "").strip()
            if v:
                return v.split(",")[0].strip()  # QGIS lists one layer (and one style) per WMTS layer
        return None

    return WmtsRequest(
        capabilities=url,
        layer=pick("layer", "layers"),
        style=pick("style", "styles"),
        tile_matrix_set=pick("tilematrixset"),
        format=pick("format"),
    )


def capabilities_url(url: str) -> str:
    """The GetCapabilities request of a service address: a ``...xml`` document or a URL already asking
    ``REQUEST=GetCapabilities`` as is, else the KVP request appended (as QGIS does)."""
    parts = urlsplit(url)
    query = {k.lower(): v for k, v in parse_qsl(parts.query, keep_blank_values=True)}
    if parts.path.lower().endswith(".xml") or query.get("request", "").lower() == "getcapabilities":
        return url
    extra = "SERVICE=WMTS&REQUEST=GetCapabilities&VERSION=1.0.0"
    if not parts.query:
        return f"{url.rstrip('?')}?{extra}"
    return f"{url}{'' if url.endswith('&') else '&'}{extra}"


def fetch_capabilities(url: str, timeout: tuple[float, float] = DEFAULT_TIMEOUT) -> bytes:
    """The capabilities document at ``url`` (kept a while: one fetch per source and process).
    TileServiceError when the host cannot be reached or answers anything but 200."""
    now = time.monotonic()
    with _cache_lock:
        held = _cache.get(url)
        if held is not None and now - held[0] < CAPABILITIES_TTL_S:
            return held[1]
    shown = redact(url)
    try:
        with requests.Session() as s:
            s.headers["User-Agent"] = USER_AGENT
            s.headers["Accept"] = "application/xml, text/xml;q=0.9, */*;q=0.1"
            s.max_redirects = 5
            with s.get(url, timeout=timeout, stream=True, allow_redirects=True) as resp:
                if urlsplit(resp.url).scheme not in ("http", "https"):
                    raise TileServiceError(f"WMTS capabilities {shown}: redirected off http(s)")
                body = bytearray()
                for chunk in resp.iter_content(65536):
                    body += chunk
                    if len(body) > MAX_CAPABILITIES_BYTES:
                        raise TileServiceError(
                            f"WMTS capabilities {shown}: over {MAX_CAPABILITIES_BYTES // 2**20} MB"
                        )
                if resp.status_code != 200:
                    raise TileServiceError(
                        f"WMTS service {urlsplit(url).hostname} cannot be used: its capabilities {shown} "
                        f"answered HTTP {resp.status_code} {resp.reason or ''}".rstrip()
                        + ". Check the address (and the service's terms)"
                    )
    except requests.exceptions.RequestException as exc:
        reason = re.search(r"\((Caused by [^)]*\)?)", str(exc))
        raise TileServiceError(
            f"WMTS service {urlsplit(url).hostname} cannot be reached: {shown}: "
            f"{(reason.group(1) if reason else str(exc))[:300]}. Nothing was indexed; check the address "
            "and your network (or proxy)"
        ) from None
    data = bytes(body)
    with _cache_lock:
        _cache[url] = (now, data)
    return data


def _parse_xml(data: bytes, url: str) -> ET.Element:
    shown = redact(url)
    head = data[:4096].lstrip()
    if b"<!ENTITY" in data[:65536]:
        raise TileServiceError(f"WMTS capabilities {shown}: XML entity declarations are not accepted")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        what = "an HTML page" if head[:200].lower().find(b"<html") >= 0 else "not XML"
        raise TileServiceError(
            f"WMTS capabilities {shown} is {what} ({exc}): not a WMTS service's GetCapabilities document"
        ) from None
    tag = root.tag.rsplit("}", 1)[-1]
    if tag == "Capabilities" and root.tag.startswith("{" + NS["wmts"]):
        return root
    if tag.endswith("ExceptionReport"):
        text = " ".join(t.strip() for t in root.itertext() if t.strip())[:300]
        raise TileServiceError(f"WMTS capabilities {shown}: the service answered an exception: {text}")
    if tag in ("WMS_Capabilities", "WMT_MS_Capabilities"):
        raise InputError(
            f"{shown} is a WMS service, not WMTS: Skyloc fetches tiles (XYZ, WMTS); save the area as a "
            "GeoTIFF first, or use the service's WMTS/XYZ address if it has one"
        )
    if tag.lower() == "html":
        raise TileServiceError(
            f"WMTS capabilities {shown} is an HTML page: not a WMTS service's GetCapabilities document"
        )
    raise TileServiceError(f"WMTS capabilities {shown}: root element {tag!r} is not a WMTS Capabilities")


def _text(el: ET.Element | None, path: str) -> str:
    if el is None:
        return ""
    found = el.find(path, NS)
    return (found.text or "").strip() if found is not None else ""


def quadtree(tms: ET.Element) -> tuple[dict[int, str], int] | str:
    """``({zoom: tile matrix identifier}, tile size)`` of a tile matrix set equal to the EPSG:3857 quadtree;
    else why it is not, as words."""
    crs = _text(tms, "ows:SupportedCRS")
    if not _CRS_3857.search(crs):
        return f"its CRS is {crs or 'not given'}, not EPSG:3857"
    zooms: dict[int, str] = {}
    sizes: set[int] = set()
    for m in tms.findall("wmts:TileMatrix", NS):
        ident = _text(m, "ows:Identifier")
        try:
            scale = float(_text(m, "wmts:ScaleDenominator"))
            corner = [float(v) for v in _text(m, "wmts:TopLeftCorner").split()]
            tw, th = int(_text(m, "wmts:TileWidth")), int(_text(m, "wmts:TileHeight"))
            mw, mh = int(_text(m, "wmts:MatrixWidth")), int(_text(m, "wmts:MatrixHeight"))
        except ValueError:
            return f"its tile matrix {ident!r} is incomplete"
        if tw != th or tw not in (256, 512):
            return f"its tiles are {tw}x{th} pixels, not 256x256 (or 512x512)"
        sizes.add(tw)
        if len(corner) != 2 or not (
            (
                abs(corner[0] + HALF_WORLD) <= CORNER_TOLERANCE_M
                and abs(corner[1] - HALF_WORLD) <= CORNER_TOLERANCE_M
            )
            or (
                abs(corner[0] - HALF_WORLD) <= CORNER_TOLERANCE_M
                and abs(corner[1] + HALF_WORLD) <= CORNER_TOLERANCE_M
            )
        ):
            return f"the top-left corner of its matrix {ident!r} is {' '.join(map(str, corner))}, not the world's"
        z = int(round(math.log2(mw))) if mw > 0 else -1
        if mw != mh or z < 0 or 2**z != mw:
            return f"its matrix {ident!r} is {mw}x{mh} tiles, not 2^z x 2^z"
        expected = SCALE0 * 256 / tw / 2**z
        if abs(scale / expected - 1) > SCALE_TOLERANCE:
            return f"the scale of its matrix {ident!r} ({scale:g}) is not that of zoom {z} ({expected:g})"
        if z in zooms:
            return f"it has two matrices at zoom {z}"
        zooms[z] = ident
    if not zooms:
        return "it has no tile matrix"
    if len(sizes) > 1:
        return "its tiles are not all of one size"
    return zooms, sizes.pop()


@dataclass(frozen=True)
class WmtsTemplate(UrlTemplate):
    """A WMTS layer in the quadtree, as an XYZ template: ``template`` is the canonical ``wmts:`` source
    (what manifests record and the cache is keyed by), ``tile_url`` the tile address with ``{z}`` (the
    matrix identifier of zoom z), ``{x}`` (column) and ``{y}`` (row)."""

    tile_url: str = ""
    matrices: tuple[tuple[int, str], ...] = ()
    layer: str = ""
    tile_matrix_set: str = ""
    tile_size: int = 256

    def __post_init__(self) -> None:
        UrlTemplate(self.tile_url)  # http(s), a host, no credentials, {z}/{x}/{y}
        if not self.matrices:
            raise InputError(f"WMTS layer {self.layer!r}: no zoom level")

    @property
    def zooms(self) -> list[int]:
        return sorted(z for z, _ in self.matrices)

    def check_zooms(self, zooms: list[int]) -> None:
        offered = self.zooms
        absent = [z for z in zooms if z not in offered]
        if absent:
            raise InputError(
                f"WMTS layer {self.layer!r} (tile matrix set {self.tile_matrix_set}) has no zoom {absent[0]}: "
                f"it offers zooms {_ranges(offered)}"
            )

    @property
    def host(self) -> str:
        return urlsplit(self.url(self.zooms[0], 0, 0)).hostname or "wmts"

    def url(self, z: int, x: int, y: int) -> str:
        ident = dict(self.matrices).get(z, str(z))
        return (
            self.tile_url.replace("{z}", quote(ident, safe=":")).replace("{x}", str(x)).replace("{y}", str(y))
        )


def _ranges(zooms: list[int]) -> str:
    out: list[str] = []
    for z in zooms:
        if out and out[-1].split("-")[-1] == str(z - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{z}"
        else:
            out.append(str(z))
    return ",".join(out)


def _value(v: str) -> str:
    return quote(v, safe=":@-._~!$'()*+,;")


def wmts_template(source: str, timeout: tuple[float, float] = DEFAULT_TIMEOUT) -> WmtsTemplate:
    """Read the service's capabilities and resolve ``source`` to the tiles of one layer in the quadtree;
    InputError (TileServiceError for a service that cannot be read) saying what to change."""
    req = parse_source(source)
    url = capabilities_url(req.capabilities)
    root = _parse_xml(fetch_capabilities(url, timeout), url)
    contents = root.find("wmts:Contents", NS)
    layers = contents.findall("wmts:Layer", NS) if contents is not None else []
    names = [_text(lyr, "ows:Identifier") for lyr in layers]
    shown = redact(req.capabilities)
    if not layers:
        raise InputError(f"WMTS service {shown} offers no layer")
    if req.layer is None:
        if len(layers) > 1:
            raise InputError(
                f"WMTS service {shown} offers {len(layers)} layers: name one (#layer=NAME): {_list(names)}"
            )
        layer = layers[0]
    elif req.layer in names:
        layer = layers[names.index(req.layer)]
    else:
        raise InputError(f"WMTS service {shown} has no layer {req.layer!r}: it offers {_list(names)}")
    name = _text(layer, "ows:Identifier")

    styles = layer.findall("wmts:Style", NS)
    style_ids = [_text(s, "ows:Identifier") for s in styles]
    if req.style is not None:
        if style_ids and req.style not in style_ids:
            raise InputError(f"WMTS layer {name!r} has no style {req.style!r}: it offers {_list(style_ids)}")
        style = req.style
    else:
        default = [s for s in styles if s.get("isDefault", "").lower() == "true"]
        style = _text((default or styles)[0], "ows:Identifier") if styles else "default"

    formats = [(f.text or "").strip() for f in layer.findall("wmts:Format", NS)]
    resources = [r for r in layer.findall("wmts:ResourceURL", NS) if r.get("resourceType") == "tile"]
    offered = [f for f in dict.fromkeys(formats + [r.get("format", "") for r in resources]) if f]
    images = [f for f in offered if f.lower().startswith("image/")]
    if req.format is not None:
        if offered and req.format not in offered:
            raise InputError(f"WMTS layer {name!r} has no format {req.format!r}: it offers {_list(offered)}")
        fmt = req.format
    else:
        fmt = next(
            (f for f in images if "jpeg" in f.lower() or "jpg" in f.lower()),
            next((f for f in images if "png" in f.lower()), images[0] if images else ""),
        )
    if not fmt.lower().startswith("image/"):
        raise InputError(
            f"WMTS layer {name!r}: format {fmt or 'none'!r} is not an image format (offered: {_list(offered)})"
        )

    sets = {
        _text(t, "ows:Identifier"): t
        for t in (contents.findall("wmts:TileMatrixSet", NS) if contents is not None else [])
    }
    links = layer.findall("wmts:TileMatrixSetLink", NS)
    linked = [_text(lk, "wmts:TileMatrixSet") for lk in links]
    verdicts = {s: (quadtree(sets[s]) if s in sets else "it is not described") for s in linked}
    good = [s for s in linked if not isinstance(verdicts[s], str)]
    if req.tile_matrix_set is not None:
        if req.tile_matrix_set not in linked:
            raise InputError(
                f"WMTS layer {name!r} has no tile matrix set {req.tile_matrix_set!r}: it offers {_list(linked)}"
                + _which_works(good)
            )
        tms_name = req.tile_matrix_set
    elif good:
        tms_name = good[0]
    else:
        tms_name = linked[0] if linked else ""
    verdict = verdicts.get(tms_name, "the layer links no tile matrix set")
    if isinstance(verdict, str):
        raise InputError(
            f"WMTS layer {name!r}: tile matrix set {tms_name!r} is not the Web-Mercator quadtree "
            f"(GoogleMapsCompatible) Skyloc reads: {verdict}. The layer offers {_list(linked)}"
            + _which_works(good)
        )
    zooms, size = verdict
    link = links[linked.index(tms_name)]
    limited = {
        _text(lim, "wmts:TileMatrix")
        for lim in link.findall("wmts:TileMatrixSetLimits/wmts:TileMatrixLimits", NS)
    }
    if limited:
        zooms = {z: ident for z, ident in zooms.items() if ident in limited}

    dims: dict[str, str] = {}
    for d in layer.findall("wmts:Dimension", NS):
        ident = _text(d, "ows:Identifier")
        default = _text(d, "wmts:Default") or _text(d, "wmts:Value")
        if ident:
            dims[ident] = default
    tile_url = _rest_url(resources, fmt, tms_name, style, dims, name) or _kvp_url(
        root, name, style, fmt, tms_name, dims
    )
    if not tile_url:
        raise InputError(
            f"WMTS layer {name!r}: the service offers neither a RESTful tile template (ResourceURL) for "
            f"{fmt} nor a KVP GetTile address"
        )
    choices = urlencode({"layer": name, "style": style, "tileMatrixSet": tms_name, "format": fmt}, safe=":/")
    return WmtsTemplate(
        f"wmts:{req.capabilities}#{choices}",
        tile_url=tile_url,
        matrices=tuple(sorted(zooms.items())),
        layer=name,
        tile_matrix_set=tms_name,
        tile_size=size,
    )


def _rest_url(
    resources: list[ET.Element], fmt: str, tms: str, style: str, dims: dict[str, str], layer: str
) -> str | None:
    chosen = [r for r in resources if r.get("format") == fmt]
    if not chosen:
        return None
    template = chosen[0].get("template", "")
    fixed = {
        "tilematrixset": _value(tms),
        "style": _value(style),
        "tilematrix": "{z}",
        "tilerow": "{y}",
        "tilecol": "{x}",
    }
    fixed.update({k.lower(): _value(v) for k, v in dims.items() if v})
    missing: list[str] = []

    def sub(m: re.Match[str]) -> str:
        value = fixed.get(m.group(1).lower())
        if value is None:
            missing.append(m.group(1))
            return m.group(0)
        return value

    out = re.sub(r"\{([^{}]*)\}", sub, template)
    if missing:
        raise InputError(
            f"WMTS layer {layer!r}: its tile template needs {{{missing[0]}}}, a dimension with no default value"
        )
    return out


def _kvp_url(
    root: ET.Element, layer: str, style: str, fmt: str, tms: str, dims: dict[str, str]
) -> str | None:
    href = ""
    for op in root.findall("ows:OperationsMetadata/ows:Operation", NS):
        if op.get("name") != "GetTile":
            continue
        for get in op.findall("ows:DCP/ows:HTTP/ows:Get", NS):
            encodings = [
                (v.text or "").strip().lower()
                for c in get.findall("ows:Constraint", NS)
                if c.get("name") == "GetEncoding"
                for v in c.findall(".//ows:Value", NS)
            ]
            if not encodings or "kvp" in encodings:
                href = get.get(f"{{{NS['xlink']}}}href", "")
                break
        if href:
            break
    if not href:
        return None
    params = [
        ("SERVICE", "WMTS"),
        ("REQUEST", "GetTile"),
        ("VERSION", "1.0.0"),
        ("LAYER", _value(layer)),
        ("STYLE", _value(style)),
        ("FORMAT", quote(fmt, safe="")),
        ("TILEMATRIXSET", _value(tms)),
        ("TILEMATRIX", "{z}"),
        ("TILEROW", "{y}"),
        ("TILECOL", "{x}"),
    ]
    params += [(k.upper(), _value(v)) for k, v in dims.items() if v]
    sep = "" if href.endswith(("?", "&")) else ("&" if "?" in href else "?")
    return href + sep + "&".join(f"{k}={v}" for k, v in params)


def _list(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:12])
    return (shown + f" and {len(names) - 12} more" if len(names) > 12 else shown) or "none"


def _which_works(good: list[str]) -> str:
    if good:
        return f"; use tileMatrixSet={good[0]} (the Web-Mercator quadtree)"
    return "; none of them is the Web-Mercator quadtree (GoogleMapsCompatible): Skyloc cannot read this layer"


__all__ = ["WmtsTemplate", "is_wmts", "parse_source", "wmts_template"]
