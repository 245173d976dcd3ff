"""Input at fault, never "a bug": PNG chunk bombs, truncated GeoTIFFs, huge names, absurd factories, full disks.

Each case must end as a SkylocError (exit 3 / a 4xx), with one clear line, and a batch must go on with the
other photos. Issue 11, item 5.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyogrio
import pytest
from imagery import ROOT, SAMPLE, read_window
from PIL import Image, PngImagePlugin
from PIL.PngImagePlugin import PngInfo

from engine.cli import main
from engine.errors import DiskFullError, InputError, SkylocError
from engine.imagery.photos import image_size, read_image

SKYLOC = Path(sys.executable).parent / "skyloc"
LONG_NAME = "x" * 4000


def run_cli(args: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_clean_line(err: str, prefix: str = "skyloc: error:") -> None:
    """A user error is said in one line, with no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, err
    assert len(lines[0]) < 1000, lines[0][:300]  # a 4,000-character name is not printed whole


# --------------------------------------------------------------------------------------- PNG chunk bombs


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _good_png(width: int = 16, height: int = 12) -> bytes:
    rows = b"".join(b"\x00" + bytes(range(width * 3)) for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(rows))
        + _chunk(b"IEND", b"")
    )


def write_png_chunk_bomb(path: Path, where: str) -> None:
    """A tiny valid PNG whose zTXt or iCCP chunk inflates past PIL's MAX_TEXT_CHUNK (1 MB): ~1 KB on disk."""
    big = PngImagePlugin.MAX_TEXT_CHUNK + 1024
    rgb = np.zeros((12, 16, 3), np.uint8)
    if where == "zTXt":
        info = PngInfo()
        info.add_text("Comment", "A" * big, zip=True)  # PIL writes it before IDAT
        Image.fromarray(rgb).save(path, pnginfo=info)
    elif where == "iCCP":
        Image.fromarray(rgb).save(path, icc_profile=b"\0" * big)
    else:  # a zTXt after the pixels: only met when the image is decoded
        png = _good_png()
        ztxt = _chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"A" * big, 9))
        path.write_bytes(png[: -len(_chunk(b"IEND", b""))] + ztxt + _chunk(b"IEND", b""))
    assert path.stat().st_size < 20_000


@pytest.mark.parametrize("where", ["zTXt", "iCCP"])
def test_png_chunk_bomb_in_the_header_is_an_input_error(tmp_path: Path, where: str) -> None:
    bomb = tmp_path / f"bomb_{where}.png"
    write_png_chunk_bomb(bomb, where)
    with pytest.raises(InputError, match="bomb_"):
        read_image(bomb)
    with pytest.raises(InputError, match="bomb_"):
        image_size(bomb)  # the service's upload check: header only, must not answer 500


def test_png_chunk_bomb_after_the_pixels_is_an_input_error(tmp_path: Path) -> None:
    bomb = tmp_path / "late.png"
    write_png_chunk_bomb(bomb, "after IDAT")
    assert image_size(bomb) == (16, 12)
    with pytest.raises(InputError, match="late.png"):
        read_image(bomb)


@pytest.fixture
def good_photo(tmp_path: Path) -> Path:
    path = tmp_path / "photos" / "b_good.jpg"
    path.parent.mkdir()
    Image.fromarray(read_window(SAMPLE / "naip_2018.tif", 192, 192, 384)).save(path, quality=90)
    return path


def test_batch_with_a_png_chunk_bomb_goes_on_in_the_real_cli(sample_index, good_photo, tmp_path) -> None:
    bomb = good_photo.parent / "a_bomb.png"  # first in the folder: the batch must go on after it
    write_png_chunk_bomb(bomb, "zTXt")
    out = tmp_path / "cands.gpkg"
    proc = subprocess.run(
        [SKYLOC, "localize", bomb, good_photo, "--index", sample_index, "--top-k", "2", "--out", out]
        + ["--json", "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 3, proc.stderr
    assert_one_clean_line(proc.stderr, prefix=f"skyloc: {bomb}:")  # the batch's line for the failed photo
    summary = json.loads(proc.stdout)
    assert [p["status"] for p in summary["photos"]] == ["error", "ok"]
    failed = summary["photos"][0]
    assert failed["error_code"] == "bad_input" and "a_bomb.png" in failed["message"]
    assert pyogrio.read_info(out, layer="candidates")["features"] == 2  # the good photo's candidates


# ---------------------------------------------------------------------------------------- truncated rasters


@pytest.fixture
def truncated_tif(tmp_path: Path) -> Path:
    """The bundled NAIP GeoTIFF cut in half: its header opens, its pixel blocks fail."""
    cut = tmp_path / "cut.tif"
    shutil.copy(SAMPLE / "naip_2018.tif", cut)
    with open(cut, "r+b") as fh:
        fh.truncate(cut.stat().st_size // 2)
    return cut


def test_truncated_geotiff_as_tile_source_is_an_input_error(truncated_tif: Path) -> None:
    from engine.imagery.geotiff import GeoTiffSource

    src = GeoTiffSource(truncated_tif, tile_sizes=(256,))  # opening reads the header only
    with src, pytest.raises(InputError, match="cut.tif.*truncated or corrupt"):
        for spec in src.specs():
            src.read(spec, 64)


def test_truncated_geotiff_as_footprint_ground_is_an_input_error(truncated_tif: Path) -> None:
    from engine.imagery.views import RasterGround

    ground = RasterGround(truncated_tif)
    try:
        to_crs = ground.transform.copy()  # the whole raster, pixel for pixel
        with pytest.raises(InputError, match="cut.tif"):
            ground.view(to_crs, (ground.height, ground.width))
    finally:
        ground.close()


def test_truncated_geotiff_in_the_cli(truncated_tif: Path, good_photo: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(
        ["index", truncated_tif, "--out", tmp_path / "idx"]
        + ["--tile-sizes", 256, "--input-size", 64, "--quiet"],
        capsys,
    )
    assert code == 3 and "cut.tif" in err, err
    assert_one_clean_line(err)
    code, _, err = run_cli(
        ["footprint", good_photo, "--against", truncated_tif, "--out", tmp_path / "fp.gpkg", "--quiet"],
        capsys,
    )
    assert code == 3 and "cut.tif" in err, err
    assert_one_clean_line(err)


# ---------------------------------------------------------------------------------- 4,000-character names


def test_long_file_name_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="too long"):
        read_image(tmp_path / f"{LONG_NAME}.jpg")
    with pytest.raises(InputError, match="too long"):
        image_size(tmp_path / f"{LONG_NAME}.png")
    from engine.imagery.geotiff import GeoTiffSource

    with pytest.raises(InputError, match="too long"):
        GeoTiffSource(tmp_path / f"{LONG_NAME}.tif")


def test_long_file_names_anywhere_in_the_cli_are_exit_3(sample_index, good_photo, tmp_path, capsys) -> None:
    long = tmp_path / f"{LONG_NAME}.tif"
    cheap = ["--tile-sizes", 512, "--input-size", 64, "--quiet"]
    commands = [
        ["localize", tmp_path / f"{LONG_NAME}.jpg", "--index", sample_index, "--quiet"],
        ["localize", good_photo, "--index", sample_index, "--out", tmp_path / f"{LONG_NAME}.gpkg", "--quiet"],
        ["index", long, "--out", tmp_path / "idx", *cheap],
        ["index", SAMPLE / "naip_2018.tif", "--out", tmp_path / LONG_NAME, *cheap],
        ["footprint", good_photo, "--against", long, "--out", tmp_path / "fp.gpkg", "--quiet"],
        ["embed", long, "--at", "0,0"],
    ]
    for args in commands:
        code, _, err = run_cli(args, capsys)
        assert code == 3, (args[0], err[-2000:])
        assert "too long" in err, (args[0], err[-2000:])
        assert_one_clean_line(err)


def test_os_errors_reaching_main_are_mapped_and_bugs_stay_exit_1(monkeypatch, capsys) -> None:
    """main()'s last resort: ENOSPC/ENAMETOOLONG from any code path -> exit 3; other errors remain bugs."""
    import errno

    from engine import cli

    def raising(exc: BaseException):
        def run(args: object) -> int:
            raise exc

        return run

    monkeypatch.setattr(cli, "_run", raising(OSError(errno.ENOSPC, "No space left on device", "/x/y")))
    code, _, err = run_cli(["models"], capsys)
    assert code == 3 and "no space left on device" in err
    assert_one_clean_line(err)
    monkeypatch.setattr(cli, "_run", raising(OSError(errno.ENAMETOOLONG, "File name too long", LONG_NAME)))
    code, _, err = run_cli(["models"], capsys)
    assert code == 3 and "too long" in err
    assert_one_clean_line(err)
    monkeypatch.setattr(cli, "_run", raising(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError):
        run_cli(["models"], capsys)  # not a user-side cause: a traceback to report (exit 1)


# ------------------------------------------------------------------------------------- absurd factories


def _run_limited(code: str, memory_gb: int = 6) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child whose address space is capped: a regression that tries to allocate a
    billion IVF lists fails there with MemoryError instead of calling the OOM killer on the test machine."""
    prelude = textwrap.dedent(
        f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, ({memory_gb} << 30, {memory_gb} << 30))
        """
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
    )


def test_absurd_factories_are_refused_before_allocating() -> None:
    proc = _run_limited(
        """
        from engine.retrieval import faiss_index
        from engine.errors import InputError

        cases = [
            ("check", 1000, "IVF1000000000,Flat"),
            ("check", 100, "IVF4096,Flat"),
            ("make", 0, "IVF1000000000,Flat"),
            ("make", 0, "IMI2x20,Flat"),
            ("make", 0, "HNSW100000000"),
            ("make", 0, "PQ8x24"),
            ("make", 0, "PCAR100000000,Flat"),
        ]
        for kind, n, factory in cases:
            try:
                if kind == "check":
                    faiss_index.check_buildable(n, 64, factory)
                else:
                    faiss_index.make_index(64, factory)
            except InputError as exc:
                print("refused", factory, "|", exc.message)
            else:
                print("ACCEPTED", factory)
        print("sane", faiss_index.make_index(64, "IVF1024,PQ8").nlist)
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert not [line for line in lines if line.startswith("ACCEPTED")], proc.stdout
    assert sum(line.startswith("refused") for line in lines) == 7, proc.stdout
    assert "needs at least" in lines[0] and "needs at least" in lines[1]
    assert lines[-1] == "sane 1024"


def test_absurd_factory_in_the_cli_is_exit_3(tmp_path: Path) -> None:
    proc = subprocess.run(
        [SKYLOC, "index", SAMPLE / "naip_2018.tif", "--out", tmp_path / "idx"]
        + ["--factory", "IVF1000000000,Flat", "--tile-sizes", "512", "--input-size", "64", "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        preexec_fn=lambda: __import__("resource").setrlimit(
            __import__("resource").RLIMIT_AS, (16 << 30, 16 << 30)
        ),
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "IVF1000000000,Flat" in proc.stderr
    assert_one_clean_line(proc.stderr)


# -------------------------------------------------------------------------------------------- full disks


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only); skipped where mounting is not allowed. Always unmounted."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(folder: Path, leave: int) -> None:
    """Fill the filesystem of ``folder`` until about ``leave`` bytes are free."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with contextlib.suppress(OSError), open(folder / "filler", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))


def test_faiss_index_write_on_a_full_disk(small_tmpfs: Path) -> None:
    import faiss

    from engine.retrieval import faiss_index

    index = faiss.IndexFlatIP(256)
    index.add(np.random.default_rng(0).random((1200, 256), dtype=np.float32))  # 1.2 MB: more than the disk
    with pytest.raises(DiskFullError, match="no space left on device"):
        faiss_index.write_index(index, small_tmpfs / "index.faiss")
    assert sorted(p.name for p in small_tmpfs.iterdir()) == []  # no temp file, no truncated index


def test_small_faiss_index_write_on_a_full_disk_is_not_a_silent_empty_file(small_tmpfs: Path) -> None:
    """FAISS's own file writer only prints a failed fclose: an index that fits in its stdio buffer came out
    as a 0-byte file, renamed into place as if written."""
    import faiss

    from engine.retrieval import faiss_index

    index = faiss.IndexFlatIP(64)
    index.add(np.random.default_rng(0).random((8, 64), dtype=np.float32))  # 2 KB: inside one stdio buffer
    fill(small_tmpfs, leave=0)
    with pytest.raises(SkylocError, match="no space left on device"):
        faiss_index.write_index(index, small_tmpfs / "index.faiss")
    assert not (small_tmpfs / "index.faiss").exists()


def test_index_build_on_a_full_disk_is_exit_3(small_tmpfs: Path, capsys) -> None:
    fill(small_tmpfs, leave=48 << 10)  # room for the markers, not for a chunk of descriptors
    code, _, err = run_cli(
        ["index", SAMPLE / "naip_2018.tif", "--out", small_tmpfs / "idx", "--tile-sizes", 256]
        + ["--input-size", 64, "--quiet"],
        capsys,
    )
    assert code == 3, err[-3000:]
    assert "no space left on device" in err
    assert_one_clean_line(err)
    assert not (small_tmpfs / "idx").exists()


# ------------------------------------------------------------------------------------------- --sha256


@pytest.mark.parametrize("given", ["57934424", "sha256:57934424", "579344248a93e23026e6b78f1f6faf0bc1d28238"])
def test_cli_refuses_a_sha256_prefix(tmp_path: Path, capsys, given: str) -> None:
    """Only the full digest pins a file: a prefix is a bad command line (exit 2), said before any work."""
    with pytest.raises(SystemExit) as exit_info:
        main(["index", str(SAMPLE / "naip_2018.tif"), "--out", str(tmp_path / "i"), "--sha256", given])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "64 hex digits" in err, err
    assert not (tmp_path / "i").exists()
