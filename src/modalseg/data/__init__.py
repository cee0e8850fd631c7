"""Files -> arrays: image I/O with geometry, dataset layouts, integrity checks, preprocessing, slice cache."""
