"""FITS input and output."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from astropy.io import fits

from ..errors import DataError

__all__ = ["read_image", "read_image_and_header", "write_model_image"]

_HDU_SUFFIX = re.compile(r"^(?P<path>.*)\[(?P<hdu>[^\]]+)\]$")


def read_image(spec: str | os.PathLike) -> np.ndarray:
    """Read a 2-D image from a FITS file; ``file.fits[N]`` or ``file.fits[NAME]`` selects an HDU
    (default: the first HDU with 2-D data). Returns float64, array index ``[y, x]`` (FITS order,
    row 0 = first, lowest row = pixel y = 1)."""
    return read_image_and_header(spec)[0]


def read_image_and_header(spec: str | os.PathLike) -> tuple[np.ndarray, fits.Header]:
    """:func:`read_image`, also returning the header of the HDU that was read."""
    spec = str(spec)
    m = _HDU_SUFFIX.match(spec)
    path, hdu = (m.group("path"), m.group("hdu")) if m else (spec, None)
    if not Path(path).is_file():
        raise DataError(f"image file {path!r} does not exist")
    try:
        with fits.open(path, memmap=False) as hdul:
            if hdu is not None:
                key = int(hdu) if hdu.lstrip("-").isdigit() else hdu
                data, header = hdul[key].data, hdul[key].header
            else:
                data, header = next(((h.data, h.header) for h in hdul
                                     if h.data is not None and np.ndim(h.data) == 2), (None, None))
    except (OSError, KeyError, IndexError) as exc:
        raise DataError(f"cannot read {spec!r}: {exc}") from None
    if data is None or np.ndim(data) != 2:
        raise DataError(f"{spec!r} holds no 2-D image")
    return np.asarray(data, dtype=np.float64), header


def write_model_image(path: str | os.PathLike, image: np.ndarray, header_cards: list[tuple[str, object, str]]) -> None:
    """Write ``image`` as the primary HDU of ``path`` with the given header cards."""
    hdu = fits.PrimaryHDU(np.asarray(image, dtype=np.float32))
    for key, value, comment in header_cards:
        hdu.header[key] = (value, comment)
    hdu.writeto(path, overwrite=True)
