"""Safe photo reading, shared by every entry point (CLI, service, plugin jobs, tile sources).

Why a module of its own: every path that opens a user's image must refuse decompression bombs before
decoding, honour the EXIF orientation the camera wrote, turn any mode into RGB, and fail with an InputError
that names the file instead of a PIL traceback. Every failure is a SkylocError, never a raw PIL/GDAL
exception: batch loops (localize, footprint) catch only SkylocError, so anything else would stop the whole
batch on one bad photo (e.g. PIL's ValueError for a PNG text/ICC chunk that decompresses past its limit).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageTooLargeError, InputError, SkylocError, from_os_error
from .stretch import apply_stretch, percentile_stretch_params

#: Default pixel budget of one photo (width x height); 100 MP is a large DSLR frame, not a bomb.
DEFAULT_MAX_PIXELS = 100_000_000
#: Heatmaps need the feature grid of the whole raster: refuse rasters declaring more (a 44,700-px square)
DEFAULT_MAX_RASTER_PIXELS = 2_000_000_000

# PIL's own bomb check runs inside Image.open, before ours: keep its threshold at least ours so that it
# never rejects (or warns about) an image we accept. read_image raises it further if a caller asks for more.
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < DEFAULT_MAX_PIXELS:
    Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS

_TIFF_SUFFIXES = {".tif", ".tiff"}
# PIL modes that hold more than 8 bits per sample: PIL's convert("RGB") would clip them, so we stretch.
_WIDE_MODES = {"I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
# EXIF orientations 5..8 swap width and height.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


def short_path(path: Path, limit: int = 200) -> str:
    """The path for a message, shortened: a 4,000-character name must not flood the terminal."""
    text = str(path)
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-limit // 2 :]}"


def _check_exists(path: Path) -> None:
    try:
        exists, is_file = path.exists(), path.is_file()
    except OSError as exc:  # ENAMETOOLONG, ELOOP, EACCES ...: Path.exists only hides ENOENT-like errors
        mapped = from_os_error(exc, f"opening photo {short_path(path)}")
        raise mapped or InputError(f"{short_path(path)}: cannot be opened ({exc.strerror or exc})") from exc
    if not exists:
        raise InputError(f"{path}: no such file")
    if not is_file:
        raise InputError(f"{path}: not a file")


def _check_pixels(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{path}: {width}x{height} = {width * height:,} pixels is over the limit of {max_pixels:,} pixels"
        )


def _open_lazy(path: Path, max_pixels: int) -> Image.Image:
    """Open without decoding: only the header is read, so the size check costs nothing."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels  # only ever raised, so concurrent callers stay safe
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"{path}: too many pixels to open safely ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{path}: not an image file (or a format Skyloc cannot read)") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc})") from exc
    except Exception as exc:  # PNG text/ICC chunks over PIL's limit: ValueError; bad headers: SyntaxError ...
        raise InputError(f"{path}: corrupt image header ({type(exc).__name__}: {exc})") from exc
    try:
        _check_pixels(path, img.width, img.height, max_pixels)
    except BaseException:
        img.close()
        raise
    return img


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode as (H, W, 3) uint8; >8-bit gray is stretched 2-98 % instead of clipped."""
    if img.mode in _WIDE_MODES:
        gray = np.asarray(img)
        lo, hi = percentile_stretch_params(gray)
        return np.repeat(apply_stretch(gray, lo, hi)[:, :, None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def _decode(img: Image.Image, path: Path) -> np.ndarray:
    try:
        img.load()  # full decode: a truncated file fails here, not later in a network
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{path}: too many pixels to decode safely ({exc})") from exc
    except SkylocError:
        raise
    except Exception as exc:  # PIL decoders raise OSError, SyntaxError, ValueError, struct.error ...
        raise InputError(f"{path}: the image is truncated or corrupt ({exc})") from exc


def _read_raster(path: Path, max_pixels: int) -> np.ndarray:
    """TIFFs PIL cannot handle (16-bit, float, > 4 bands) through GDAL, RGB chosen as for a GeoTIFF source."""
    import rasterio  # local: keeps `import engine.imagery.photos` light
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    from .stretch import choose_rgb_bands, stretch_to_uint8

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a photo is not georeferenced
            ds = rasterio.open(path)
        with ds:
            _check_pixels(path, ds.width, ds.height, max_pixels)
            bands = choose_rgb_bands(ds)
            data = ds.read(list(bands))
            valid = np.any(ds.read_masks(list(bands)) > 0, axis=0)
    except SkylocError:
        raise
    except (RasterioError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not an image file, or it is truncated or corrupt ({exc})") from exc
    rgb = stretch_to_uint8(data, valid)
    rgb[:, ~valid] = 0
    return np.ascontiguousarray(rgb.transpose(1, 2, 0))


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a photo as RGB uint8, shape (H, W, 3), upright (EXIF orientation applied).

    The pixel count is checked from the header before anything is decoded (ImageTooLargeError). Missing,
    non-image, truncated or corrupt files raise InputError naming the file. TIFF/GeoTIFF photos are read
    by PIL when it can (8-bit), otherwise by GDAL with a 2-98 percentile stretch per band.
    """
    path = Path(path)
    _check_exists(path)
    if path.suffix.lower() not in _TIFF_SUFFIXES:
        with _open_lazy(path, max_pixels) as img:
            return _decode(img, path)
    try:  # TIFF: PIL for ordinary 8-bit photos (it honours the orientation tag), GDAL for the rest
        with _open_lazy(path, max_pixels) as img:
            if img.mode not in _WIDE_MODES:
                return _decode(img, path)
    except ImageTooLargeError:
        raise
    except InputError:
        pass
    return _read_raster(path, max_pixels)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` as read_image would return it (EXIF orientation applied), without decoding."""
    path = Path(path)
    _check_exists(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{path}: too many pixels to open safely ({exc})") from exc
    except (UnidentifiedImageError, OSError) as exc:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            return _raster_size(path)
        raise InputError(f"{path}: not an image file (or a format Skyloc cannot read)") from exc
    except Exception as exc:  # ValueError (PNG chunk over PIL's limit), SyntaxError ...: see _open_lazy
        raise InputError(f"{path}: corrupt image header ({type(exc).__name__}: {exc})") from exc
    with img:
        try:
            orientation = _orientation_without_decoding(img)
        except Exception:  # a malformed EXIF block: the size is still right, only the rotation is unknown
            orientation = 1
        if orientation in _SWAPPING_ORIENTATIONS:
            return img.height, img.width
        return img.width, img.height


def _orientation_without_decoding(img: Image.Image) -> int:
    """EXIF orientation from the header only (PIL's PNG getexif() decodes the whole image to find it)."""
    if img.format in ("JPEG", "MPO", "TIFF"):
        return int(img.getexif().get(0x0112, 1))
    raw = img.info.get("exif")  # PNG/WebP: present when the eXIf chunk precedes the pixels
    if not raw:
        return 1
    exif = Image.Exif()
    exif.load(raw)
    return int(exif.get(0x0112, 1))


def _raster_size(path: Path) -> tuple[int, int]:
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(path)
        with ds:
            return ds.width, ds.height
    except (RasterioError, OSError) as exc:
        raise InputError(f"{path}: not an image file ({exc})") from exc
