"""Build ``dist/skyloc.zip``, installable through QGIS "Plugins > Install from ZIP".

    python scripts/build_plugin.py            # -> dist/skyloc.zip (prints the path)
    python scripts/build_plugin.py --out /tmp/skyloc.zip

The zip holds one top folder ``skyloc/``: the package ``qgis_plugin/skyloc`` (Python files only, no
``__pycache__``), ``client.py`` copied from ``engine/client.py`` (the plugin's only way to talk to the
engine; never kept as a hand copy in the source tree), and ``metadata.txt``, ``LICENSE`` (repository root)
and ``icon.png`` (``qgis_plugin/icon.png``). Standard library only: any Python 3 runs it.
"""

from __future__ import annotations

import argparse
import configparser
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qgis_plugin" / "skyloc"
CLIENT = ROOT / "engine" / "client.py"
TOP = "skyloc"
REQUIRED_METADATA = ("name", "qgisMinimumVersion", "description", "about", "version", "author", "email")
#: Files taken from the package folder (code only: no caches, no editor leftovers).
PACKAGE_SUFFIXES = (".py",)


def check_metadata(path: Path) -> configparser.ConfigParser:
    """``metadata.txt`` must have a [general] section with the keys QGIS needs and ``icon=icon.png``."""
    meta = configparser.ConfigParser(interpolation=None)
    meta.optionxform = str  # keep key case (qgisMinimumVersion)
    meta.read(path, encoding="utf-8")
    if "general" not in meta:
        raise SystemExit(f"{path}: no [general] section")
    missing = [k for k in REQUIRED_METADATA if not meta["general"].get(k, "").strip()]
    if missing:
        raise SystemExit(f"{path}: missing {', '.join(missing)}")
    if meta["general"].get("icon", "").strip() != "icon.png":
        raise SystemExit(f"{path}: expected icon=icon.png")
    return meta


def plugin_files() -> list[tuple[Path, str]]:
    """(source file, name inside the zip) for everything the zip holds."""
    extra = {
        "metadata.txt": ROOT / "metadata.txt",
        "LICENSE": ROOT / "LICENSE",
        "icon.png": ROOT / "qgis_plugin" / "icon.png",
        "client.py": CLIENT,
    }
    for name, path in extra.items():
        if not path.is_file():
            raise SystemExit(f"build_plugin: {path} is missing (needed as {TOP}/{name})")
    files = []
    for path in sorted(PACKAGE.rglob("*")):
        rel = path.relative_to(PACKAGE)
        if not path.is_file() or "__pycache__" in rel.parts or path.suffix not in PACKAGE_SUFFIXES:
            continue
        if rel.as_posix() == "client.py":
            continue  # always the engine's own file, below
        files.append((path, f"{TOP}/{rel.as_posix()}"))
    files += [(path, f"{TOP}/{name}") for name, path in extra.items()]
    return files


def build(out: Path) -> Path:
    """Write the zip at ``out`` (replaced if it exists); its path."""
    check_metadata(ROOT / "metadata.txt")
    files = plugin_files()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(zipfile.ZipInfo(f"{TOP}/"), "")
        for path, name in files:
            zf.write(path, name)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "dist" / "skyloc.zip", help="zip to write")
    args = ap.parse_args(argv)
    print(build(args.out.resolve()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
