"""Geography helpers: exact Web-Mercator XYZ tile geometry and CRS transforms through pyproj."""
