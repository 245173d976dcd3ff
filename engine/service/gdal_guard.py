"""What GDAL will really open for a file a request names, checked before GDAL opens anything.

The path policy (``paths.py``) checks the path given; GDAL may then open other files on its own: a VRT's
sources (whatever the VRT is called, ``x.tif`` included, and VRTs nested in VRTs), an external overview
``x.tif.ovr`` or mask ``x.tif.msk`` (which may themselves be VRTs), the ``OVERVIEW_FILE`` an ``.aux.xml``
names, and remote data (``/vsicurl/http://...``, a ``<GDAL_WMS>`` description). So:

1. the file and its sidecars are sniffed and their XML parsed here, in Python, WITHOUT letting GDAL open
   anything: every file they reference is resolved as GDAL would (``relativeToVRT``, the process's working
   folder otherwise) and must lie inside the roots (403 ``forbidden_path``), recursively; anything remote
   or that the service cannot verify (``/vsi*``, URLs, connection strings, WMS/WMTS/MRF descriptions, STAC
   JSON as a raster, Python pixel functions) is refused the same way;
2. rasters are then opened once with a list of local-file drivers only, and every file GDAL lists for the
   dataset (``dataset.files``: sidecars, direct sources) is checked against the roots too;
3. :func:`disable_gdal_network` turns GDAL's network access off for the whole process (environment
   variables, so worker threads and both GDAL copies, rasterio's and pyogrio's, see it), in case a format
   slips through the first two.
"""

from __future__ import annotations

import os
import re
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from ..errors import InputError
from .errors import ForbiddenPathError

#: GDAL configuration that cuts every network access of GDAL (set before GDAL registers its drivers).
NO_NETWORK_ENV = {
    # /vsicurl/ and every handler built on it (/vsis3/, /vsigs/, /vsiaz/ ...) accept only this name
    "CPL_VSIL_CURL_ALLOWED_FILENAME": "/nonexistent/skyloc-network-disabled",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".skyloc-network-disabled",
    # CPLHTTPFetch (WMS, WCS, schema downloads ...) goes to a proxy that refuses at once, and gives up fast
    "GDAL_HTTP_PROXY": "127.0.0.1:1",
    "GDAL_HTTPS_PROXY": "127.0.0.1:1",
    "GDAL_HTTP_TIMEOUT": "1",
    "GDAL_HTTP_CONNECTTIMEOUT": "1",
    "GDAL_HTTP_MAX_RETRY": "0",
    "GML_DOWNLOAD_WFS_SCHEMA": "NO",
    "GDAL_VRT_ENABLE_PYTHON": "NO",
    # drivers whose only purpose is to fetch remote data (one list for rasters and vectors)
    "GDAL_SKIP": "WMS,WMTS,WCS,HTTP,DAAS,EEDA,EEDAI,OGCAPI,PLMOSAIC,STACTA,STACIT,NGW,WFS,OAPIF,CSW,Elasticsearch,"
    "Carto,AmigoCloud,PLSCENES",
}

#: Raster drivers the service lets GDAL use for a request's raster (local files only, no references out
#: of the file other than the sidecars GDAL lists, which are checked).
RASTER_DRIVERS = [
    "GTiff", "COG", "VRT", "PNG", "JPEG", "JP2OpenJPEG", "WEBP", "GPKG", "HFA", "ENVI", "EHdr", "NITF",
    "PCIDSK", "AAIGrid", "SAGA", "BMP", "GIF", "ECW", "JP2ECW", "MrSID", "JP2MrSID", "JP2KAK",
]  # fmt: skip
#: Sidecars GDAL may open beside a raster (appended to the file name).
SIDECARS = (".ovr", ".msk", ".aux.xml")
#: Tags of VRT (raster and vector) and PAM XML elements that name a file GDAL opens.
FILE_TAGS = {"SourceFilename", "SourceDataset", "SrcDataSource", "OverviewFile"}
#: The largest VRT/PAM XML parsed (a 10,000-source mosaic VRT is ~5 MB).
MAX_XML_BYTES = 64 * 2**20
#: VRTs nested deeper than this, or more referenced files than this in all, are refused.
MAX_DEPTH = 8
MAX_FILES = 20_000

_SNIFF_BYTES = 4096
_ROOT_TAG = re.compile(rb"<\s*([A-Za-z_][\w.-]*)")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CONNECTION = re.compile(r"^[A-Za-z][A-Za-z0-9_]*:")  # WMS:..., NETCDF:"f":v, PG:..., vrt://...
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")
_SQLITE = b"SQLite format 3\x00"
#: Magic numbers of self-contained image formats (no reference to another file): not probed when nested.
_PLAIN_IMAGES = (
    b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+",  # TIFF, BigTIFF
    b"\xff\xd8\xff", b"\x89PNG", b"\x00\x00\x00\x0cjP  ", b"\xffO\xffQ", b"GIF8", b"BM", _SQLITE,
)  # fmt: skip


def _is_webp(head: bytes) -> bool:
    return head[:4] == b"RIFF" and head[8:12] == b"WEBP"


def disable_gdal_network() -> None:
    """Turn GDAL's network access off for this process (before the first GDAL call, for ``*_SKIP``).

    Environment variables, not ``rasterio.Env`` (thread-local): the job and request threads, and both
    GDAL libraries of the process (rasterio's and pyogrio's may differ), read them.
    """
    os.environ.update(NO_NETWORK_ENV)


def is_remote(name: str) -> bool:
    """True for anything GDAL would not read as a plain local file: /vsi*, URLs, connection strings."""
    s = name.strip()
    if s.startswith(("/vsi", "\\vsi")) or _URL.match(s):
        return True
    return bool(_CONNECTION.match(s)) and not _WINDOWS_DRIVE.match(s)


Signature = dict[str, tuple[int, int, int] | None]  # path -> (inode, mtime_ns, size), None: absent


def _stat(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class GdalGuard:
    """Checks a request's GDAL inputs against ``allowed(real_path) -> bool`` (the path policy).

    A passed check is remembered with the state (inode, mtime, size; or absence) of every file it looked at,
    sidecar candidates included, and reused while none of them changed: a click on the map (``/embed``)
    costs a few ``stat`` calls, not a parse and a GDAL open.
    """

    CACHE_SIZE = 256

    def __init__(self, allowed: Callable[[str], bool], describe: Callable[[], str]) -> None:
        self.allowed = allowed
        self.describe = describe
        self._cache: OrderedDict[tuple[str, str], Signature] = OrderedDict()
        self._lock = threading.Lock()

    def raster(self, path: Path, what: str) -> None:
        """A raster for GDAL (rasterio): references checked, then opened with local drivers only."""
        self._check("raster", Path(path), what)

    def image(self, path: Path, what: str) -> None:
        """A photo: PIL reads it, but GDAL reads the TIFFs PIL cannot, so those are checked like rasters."""
        if Path(path).suffix.lower() in (".tif", ".tiff"):
            self._check("image", Path(path), what)

    def vector(self, path: Path, what: str) -> None:
        """A vector file for OGR: an OGR VRT's sources checked; remote descriptions refused."""
        self._check("vector", Path(path), what)

    @staticmethod
    def geopackage(path: Path, what: str) -> None:
        """A file that must be a GeoPackage (an index's tiles.gpkg): anything else (a VRT ...) is refused."""
        try:
            with open(path, "rb") as f:
                head = f.read(len(_SQLITE))
        except OSError as exc:
            raise InputError(f"{what} {path}: cannot read it ({exc.strerror})") from exc
        if head != _SQLITE:
            raise InputError(f"{what} {path} is not a GeoPackage")

    def _check(self, mode: str, path: Path, what: str) -> None:
        key = (mode, os.path.realpath(path))
        with self._lock:
            known = self._cache.get(key)
        if known is not None and all(_stat(p) == st for p, st in known.items()):
            with self._lock:
                self._cache.move_to_end(key)
            return
        walk = _Walk(self.allowed, self.describe)
        if mode == "image":
            walk.file(path, what, kind="raster", depth=1)  # depth 1: probed unless a plain image
        else:
            walk.file(path, what, kind=mode, depth=0)
            if mode == "raster":
                walk.probe(path, what)
        with self._lock:
            self._cache[key] = walk.seen
            self._cache.move_to_end(key)
            while len(self._cache) > self.CACHE_SIZE:
                self._cache.popitem(last=False)


class _Walk:
    """One check: the files visited (with their state, for the cache)."""

    def __init__(self, allowed: Callable[[str], bool], describe: Callable[[], str]) -> None:
        self.allowed = allowed
        self.describe = describe
        self.seen: Signature = {}

    def _refuse(self, what: str, path: Path, detail: str) -> ForbiddenPathError:
        return ForbiddenPathError(f"{what} {path}: {detail}")

    def _reference(self, what: str, owner: Path, name: str, relative: bool) -> Path:
        """The real path GDAL opens for ``name`` met in ``owner``, or ForbiddenPathError."""
        if not name.strip():
            raise self._refuse(what, owner, "an empty source file name")
        if "\x00" in name:
            raise self._refuse(what, owner, "a source file name with a NUL character")
        if is_remote(name):
            raise self._refuse(
                what,
                owner,
                f"refers to {name[:200]!r}, which is not a local file: the service reads local files only",
            )
        base = owner.parent if relative else Path(os.getcwd())
        real = os.path.realpath(os.path.join(base, name))
        if not self.allowed(real):
            raise self._refuse(
                what,
                owner,
                f"refers to {name[:200]!r} = {real}, outside the folders this service may read "
                f"({self.describe()})",
            )
        return Path(real)

    def file(self, path: Path, what: str, *, kind: str, depth: int) -> None:
        real = os.path.realpath(path)
        if real in self.seen:
            return
        self.seen[real] = _stat(real)
        if len(self.seen) > MAX_FILES:
            raise InputError(f"{what}: more than {MAX_FILES:,} files referenced")
        if depth > MAX_DEPTH:
            raise self._refuse(what, path, f"VRTs nested more than {MAX_DEPTH} deep")
        if not self.allowed(real):  # a sidecar or a source reached through a symlink
            raise self._refuse(what, path, f"resolves to {real}, outside the folders this service may read")
        try:
            with open(real, "rb") as f:
                head = f.read(_SNIFF_BYTES)
        except IsADirectoryError:
            if depth > 0:  # a folder a VRT names (a shapefile folder): its entries, one level
                self._folder(Path(real), what)
            return  # a folder given directly: the path policy checks its entries
        except FileNotFoundError:
            return  # the engine says it is missing
        except OSError as exc:
            raise InputError(f"{what} {path}: cannot read it ({exc.strerror})") from exc
        text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
        if text.startswith(b"<"):
            self._xml(Path(real), text, what, kind=kind, depth=depth)
        elif text.startswith((b"{", b"[")) and kind == "raster":
            raise self._refuse(
                what, path, "a JSON raster description (STAC, tile index ...): the service reads local files"
            )
        elif kind == "raster" and depth > 0 and not text.startswith(_PLAIN_IMAGES) and not _is_webp(text):
            self.probe(Path(real), what)  # some other format: only local drivers, their file lists checked
        if kind == "raster":
            for suffix in SIDECARS:
                side = real + suffix
                if os.path.lexists(side):
                    self.file(Path(side), what, kind="raster", depth=depth + 1)
                else:
                    self.seen[side] = None  # a sidecar added later invalidates the cached check

    def _folder(self, folder: Path, what: str) -> None:
        try:
            with os.scandir(folder) as it:
                for count, entry in enumerate(it):
                    if count >= MAX_FILES:
                        raise InputError(f"{what} {folder}: more than {MAX_FILES:,} entries")
                    real = os.path.realpath(entry.path)
                    if not self.allowed(real):
                        raise self._refuse(
                            what, folder, f"{entry.name} resolves to {real}, outside the roots"
                        )
        except OSError as exc:
            raise InputError(f"{what} {folder}: cannot list it ({exc.strerror})") from exc

    def _xml(self, path: Path, head: bytes, what: str, *, kind: str, depth: int) -> None:
        root = _root_tag(head)
        if root in ("VRTDataset", "OGRVRTDataSource", "PAMDataset"):
            tree = self._parse(path, what)
            for elem, relative in _file_elements(tree):
                name = (elem.text or "").strip()
                target = self._reference(what, path, name, relative)
                self.file(target, what, kind="vector" if elem.tag == "SrcDataSource" else "raster",
                           depth=depth + 1)  # fmt: skip
            for elem in tree.iter("PixelFunctionLanguage"):
                if (elem.text or "").strip().lower() == "python":
                    raise self._refuse(what, path, "a VRT with Python pixel functions")
        elif kind == "raster":  # GDAL_WMS, GDAL_WMTS, WCS_GDAL, MRF_META, PDS4 labels ...
            raise self._refuse(
                what,
                path,
                f"an XML raster description <{root}> that the service cannot verify (only VRTs are)",
            )
        # vectors: GML/KML/GPX are plain data; OGR's remote fetches are turned off (disable_gdal_network)

    def _parse(self, path: Path, what: str) -> ET.Element:
        try:
            size = path.stat().st_size
            if size > MAX_XML_BYTES:
                raise InputError(f"{what} {path}: an XML description over {MAX_XML_BYTES // 2**20} MB")
            data = path.read_bytes()
        except OSError as exc:
            raise InputError(f"{what} {path}: cannot read it ({exc.strerror})") from exc
        if b"<!ENTITY" in data or b"<!DOCTYPE" in data:
            raise self._refuse(what, path, "XML with a DOCTYPE/entities (GDAL's own XML never has one)")
        try:
            return ET.fromstring(data)
        except ET.ParseError as exc:
            raise self._refuse(what, path, f"XML the service cannot verify ({exc})") from exc

    def probe(self, path: Path, what: str) -> None:
        """Open with local drivers only and check every file GDAL lists for the dataset."""
        import warnings

        import rasterio
        from rasterio.errors import NotGeoreferencedWarning, RasterioError
        from rasterio.io import DatasetReader

        if path.is_dir():
            return
        try:
            with warnings.catch_warnings(), rasterio.Env():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                # rasterio.open takes one driver name; the reader takes the list (GDAL's allowed drivers)
                ds = DatasetReader(str(path), driver=RASTER_DRIVERS)
                try:
                    files = list(ds.files)
                finally:
                    ds.close()
        except RasterioError as exc:
            raise InputError(
                f"{what} {path}: not a raster the service reads (local GeoTIFF, VRT, JPEG 2000, PNG ...): {exc}"
            ) from exc
        for f in files:
            real = os.path.realpath(f)
            if not self.allowed(real):
                raise self._refuse(
                    what, path, f"GDAL would also read {real}, outside the folders this service may read"
                )


def _root_tag(head: bytes) -> str:
    """The first element's name of an XML file (after the prolog and comments)."""
    body = re.sub(rb"<\?.*?\?>|<!--.*?-->", b"", head, flags=re.S)
    match = _ROOT_TAG.search(body)
    return match.group(1).decode("ascii", "replace") if match else ""


def _file_elements(tree: ET.Element) -> list[tuple[ET.Element, bool]]:
    """Elements naming a file, with whether the name is relative to the XML file's folder."""
    found: list[tuple[ET.Element, bool]] = []
    for elem in tree.iter():
        if elem.tag in FILE_TAGS:
            found.append((elem, elem.get("relativeToVRT", "0").strip() == "1"))
        elif elem.tag == "MDI" and (elem.get("key") or "").upper() == "OVERVIEW_FILE":
            text = (elem.text or "").strip()
            if text.startswith(":::BASE:::"):  # GDAL's marker for "relative to the dataset"
                elem.text = text[len(":::BASE:::") :]
                found.append((elem, True))
            else:
                found.append((elem, False))
    return found
