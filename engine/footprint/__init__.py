"""Footprint estimation: iterative coregistration of a photo against candidate places (EarthMatch-style)."""
