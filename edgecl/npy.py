"""A .npy header read without its data: what every loader of user arrays judges (shape, dtype) before reading
them — the runtime's input files, training's starting weights. numpy only."""
from __future__ import annotations

from typing import IO

import numpy as np


def read_npy_header(f: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) from the current position of `f`; ValueError for a damaged header or a format
    version numpy does not write (1.0 and 2.0 only)."""
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"unsupported .npy version {version}")
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return tuple(shape), fortran, dtype
