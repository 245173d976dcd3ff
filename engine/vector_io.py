"""Vector outputs (GeoPackage by default, Shapefile on request) written through GDAL/OGR (pyogrio).

Every layer carries its CRS. Writes are atomic: the file appears complete or not at all.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio
import shapely

from .atomic import atomic_path
from .errors import InputError, os_errors_as_user_errors
from .output_guard import GPKG_DESCRIPTION, check_output, is_geopackage, mark_written

DRIVERS = {".gpkg": "GPKG", ".shp": "ESRI Shapefile"}


def driver_for(path: str | os.PathLike[str]) -> str:
    ext = Path(path).suffix.lower()
    if ext not in DRIVERS:
        raise InputError(f"unsupported vector output {path}: use a .gpkg (default) or .shp file name")
    return DRIVERS[ext]


def write_polygons(
    path: str | os.PathLike[str],
    polygons: Sequence[shapely.Geometry | None],
    attributes: dict[str, Sequence[Any]],
    *,
    layer: str,
    crs: str = "EPSG:4326",
    inputs: Sequence[str | os.PathLike[str] | None] = (),
    overwrite: bool = False,
) -> Path:
    """Write one polygon layer with its attribute columns, atomically. Returns the path written.

    A ``None`` polygon is written as a feature without geometry (e.g. a photo that could not be placed).
    Into an existing GeoPackage only ``layer`` is added or replaced (its other layers are kept): the file is
    copied beside, the layer written into the copy, and the copy renamed over the original. What may be
    written over follows :func:`engine.output_guard.check_output` (``inputs`` of the action are never).
    """
    path = Path(path)
    driver = driver_for(path)
    check_output(path, inputs=inputs, overwrite=overwrite, layer=layer, what="output layer")
    n = len(polygons)
    for name, values in attributes.items():
        if len(values) != n:
            raise ValueError(f"attribute {name} has {len(values)} values for {n} polygons")
    kinds = {g.geom_type for g in polygons if g is not None}
    if not kinds <= {"Polygon", "MultiPolygon"}:
        raise ValueError(f"polygon layer {layer} got {sorted(kinds)} geometries")
    geometry_type = "MultiPolygon" if "MultiPolygon" in kinds else "Polygon"
    geometry = np.array([None if g is None else shapely.to_wkb(g) for g in polygons], dtype=object)
    fields = list(attributes)
    field_data = [_column(attributes[name]) for name in fields]
    with os_errors_as_user_errors(f"writing {path}"):
        if driver == "ESRI Shapefile":
            written = _write_shapefile(path, geometry, field_data, fields, layer, crs, geometry_type)
            mark_written(written)
            return written
        keep_other_layers = path.is_file() and is_geopackage(path)
        with atomic_path(path, suffix=path.suffix) as tmp:
            if keep_other_layers:
                shutil.copyfile(path, tmp)
            pyogrio.raw.write(
                tmp,
                geometry,
                field_data,
                fields,
                layer=layer,
                driver=driver,
                geometry_type=geometry_type,
                crs=crs,
                promote_to_multi=geometry_type == "MultiPolygon",
                # GeoPackage 1.3: what QGIS 3.22 LTR's GDAL (3.6) reads without "partially supported" warnings
                dataset_options={"VERSION": "1.3"} if not keep_other_layers else None,
                layer_options={"DESCRIPTION": f"{GPKG_DESCRIPTION} {layer} layer"},
            )
    return path


def _write_shapefile(
    path: Path, geometry, field_data, fields, layer: str, crs: str, geometry_type: str
) -> Path:
    """A Shapefile is several files: write them all under a temporary stem, then rename each one."""
    stem_tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.shp")
    parts = [".shp", ".shx", ".dbf", ".prj", ".cpg"]
    try:
        pyogrio.raw.write(
            stem_tmp,
            geometry,
            field_data,
            [f[:10] for f in fields],  # dBase field names are limited to 10 characters
            layer=layer,
            driver="ESRI Shapefile",
            geometry_type=geometry_type,
            crs=crs,
        )
        for ext in parts:
            src = stem_tmp.with_suffix(ext)
            if src.exists():
                os.replace(src, path.with_suffix(ext))
    finally:
        for ext in parts:
            stem_tmp.with_suffix(ext).unlink(missing_ok=True)
    return path


def _column(values: Sequence[Any]) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind in "US" or arr.dtype == object:
        return np.array([None if v is None else str(v) for v in values], dtype=object)
    if arr.dtype.kind == "b":
        return arr.astype(np.int32)
    return arr


def read_layer(path: str | os.PathLike[str], layer: str | None = None) -> tuple[list[shapely.Geometry], dict]:
    """Read a polygon layer back: (geometries, {field: array, "__crs__": crs})."""
    meta, _fids, geometry, field_data = pyogrio.raw.read(path, layer=layer)
    geoms = list(shapely.from_wkb(geometry)) if geometry is not None else []
    cols = {name: field_data[i] for i, name in enumerate(meta["fields"])}
    cols["__crs__"] = meta["crs"]
    return geoms, cols
