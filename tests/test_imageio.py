"""Safe photo reading: sizes checked before decoding, EXIF orientation, every mode to RGB, clear errors."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image, ImageFile
from rasterio.errors import NotGeoreferencedWarning

from engine.errors import ImageTooLargeError, InputError
from engine.imagery.photos import image_size, read_image


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_png_header_only_big(path: Path, width: int, height: int) -> None:
    """A valid 1-bit PNG of width x height, all zero: a few hundred KB on disk, width*height pixels decoded."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(1)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any image gets decoded."""

    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_reads_rgb_jpeg(tmp_path: Path) -> None:
    p = tmp_path / "a.jpg"
    Image.fromarray(noise(48, 64)).save(p, quality=95)
    rgb = read_image(p)
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    assert image_size(p) == (64, 48)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "CMYK", "I;16"])
def test_every_mode_becomes_rgb_uint8(tmp_path: Path, mode: str) -> None:
    img = Image.fromarray(noise(20, 30)).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        img = Image.fromarray((np.arange(600, dtype=np.uint16).reshape(20, 30) * 7).astype(np.uint16))
        assert img.mode == "I;16"
    p = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    img.save(p)
    rgb = read_image(p)
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8


def test_16bit_png_is_stretched_not_clipped(tmp_path: Path) -> None:
    values = np.linspace(1000, 3000, 40 * 50).reshape(40, 50).astype(np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(values).save(p)
    gray = read_image(p)[:, :, 0]
    assert gray.min() == 0 and gray.max() == 255  # clipping would give 255 everywhere
    assert np.all(np.diff(gray.astype(int).ravel()) >= 0)  # monotonic


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_6_is_applied(tmp_path: Path, suffix: str) -> None:
    stored = np.zeros((30, 60, 3), np.uint8)  # H=30, W=60 as stored
    stored[:10, :10] = (255, 0, 0)  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = tmp_path / f"rot{suffix}"
    Image.fromarray(stored).save(p, exif=exif, **({"quality": 100} if suffix == ".jpg" else {}))
    rgb = read_image(p)
    assert rgb.shape == (60, 30, 3)
    assert image_size(p) == (30, 60)
    assert rgb[:10, -10:, 0].mean() > 200 and rgb[:10, -10:, 1:].mean() < 60  # top-left went top-right
    assert rgb[:10, :10, 0].mean() < 60


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        read_image(tmp_path / "nope.jpg")
    with pytest.raises(InputError, match="not a file"):
        read_image(tmp_path)


@pytest.mark.parametrize("name", ["junk.jpg", "junk.tif", "junk.png", "junk"])
def test_random_bytes_are_not_an_image(tmp_path: Path, name: str) -> None:
    p = tmp_path / name
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match=name) as info:
        read_image(p)
    assert not isinstance(info.value, ImageTooLargeError)
    with pytest.raises(InputError):
        image_size(p)


def test_truncated_jpeg(tmp_path: Path) -> None:
    p = tmp_path / "cut.jpg"
    Image.fromarray(noise(256, 256)).save(p, quality=90)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt") as info:
        read_image(p)
    assert "cut.jpg" in str(info.value)


def test_truncated_16bit_tiff(tmp_path: Path) -> None:
    p = tmp_path / "cut.tif"
    write_plain_tiff(p, np.random.default_rng(2).integers(0, 5000, (3, 200, 200)).astype(np.uint16))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.tif"):
        read_image(p)


def test_huge_header_is_refused_without_decoding(tmp_path: Path, no_decoding: None) -> None:
    p = tmp_path / "bomb.png"
    write_png_header_only_big(p, 20000, 20000)
    assert p.stat().st_size < 2_000_000
    with pytest.raises(ImageTooLargeError, match="bomb.png"):
        read_image(p)


def test_low_max_pixels_is_refused_without_decoding(tmp_path: Path, no_decoding: None) -> None:
    p = tmp_path / "small.png"
    Image.fromarray(noise(30, 40)).save(p)
    with pytest.raises(ImageTooLargeError, match="1,200 pixels"):
        read_image(p, max_pixels=1000)
    assert image_size(p) == (40, 30)


def write_plain_tiff(path: Path, data: np.ndarray) -> None:
    """A TIFF photo without georeferencing, (bands, H, W)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        count, h, w = data.shape
        with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=count, dtype=data.dtype) as ds:
            ds.write(data)


def test_16bit_tiff_photo_is_stretched(tmp_path: Path) -> None:
    ramp = np.linspace(1000, 3000, 64 * 64).reshape(64, 64)
    p = tmp_path / "deep.tif"
    write_plain_tiff(p, np.stack([ramp, ramp * 0.5, ramp * 0.25]).astype(np.uint16))
    rgb = read_image(p)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    for c in range(3):
        assert rgb[..., c].min() == 0 and rgb[..., c].max() == 255
    assert image_size(p) == (64, 64)


def test_six_band_tiff_photo_uses_first_three(tmp_path: Path) -> None:
    data = np.stack([np.full((32, 48), v, np.uint8) for v in (10, 20, 30, 40, 50, 60)])
    p = tmp_path / "six.tif"
    write_plain_tiff(p, data)
    rgb = read_image(p)
    assert rgb.shape == (32, 48, 3)
    assert rgb[0, 0].tolist() == [10, 20, 30]


def test_8bit_tiff_photo_through_pil(tmp_path: Path) -> None:
    p = tmp_path / "plain.tif"
    arr = noise(20, 25)
    Image.fromarray(arr).save(p)
    assert np.array_equal(read_image(p), arr)


def test_tiff_over_max_pixels_through_gdal(tmp_path: Path) -> None:
    p = tmp_path / "deep.tif"
    write_plain_tiff(p, np.ones((1, 100, 100), np.uint16))
    with pytest.raises(ImageTooLargeError):
        read_image(p, max_pixels=5000)
