"""Image blocks: one multi-extension FITS file per fitted galaxy (like GALFIT's imgblock).

HDUs, in order: ``PRIMARY`` (no data; the fit's results in its header), ``DATA``, ``MODEL``,
``RESIDUAL`` (data - model), ``SIGMA``, ``MASK`` (1 = pixel not used in the fit: masked, or bad
data or sigma), then one ``COMP_<NAME>`` per model component (its PSF-convolved image). Images
are float32 (the mask uint8), in the stamp's pixel frame.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from astropy.io import fits

from .tables import atomic_path

__all__ = ["IMAGE_BLOCK_HDUS", "component_hdu_name", "write_image_block"]

#: the HDUs every image block has, in order (then one per component)
IMAGE_BLOCK_HDUS = ("PRIMARY", "DATA", "MODEL", "RESIDUAL", "SIGMA", "MASK")


def component_hdu_name(component: str) -> str:
    """HDU name of a component's image: ``COMP_<NAME>``."""
    return f"COMP_{component.upper()}"


def write_image_block(path: str | os.PathLike, *, data: np.ndarray, model: np.ndarray, sigma: np.ndarray,
                      mask: np.ndarray, components: Mapping[str, np.ndarray],
                      cards: Sequence[tuple[str, object, str]]) -> None:
    """Write one image block atomically. ``cards`` are ``(keyword, value, comment)`` for the
    primary header (keywords longer than 8 characters become HIERARCH cards)."""
    primary = fits.PrimaryHDU()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HIERARCH and long-string notes
        for key, value, comment in cards:
            if isinstance(value, (float, np.floating)) and not np.isfinite(value):
                value = str(value)  # FITS headers cannot hold NaN or inf as numbers
            primary.header[key] = (value.item() if hasattr(value, "item") else value, comment)
        hdus = [primary]
        data = np.asarray(data, dtype=np.float64)
        model = np.asarray(model, dtype=np.float64)
        for name, arr, kind in (("DATA", data, np.float32), ("MODEL", model, np.float32),
                                ("RESIDUAL", data - model, np.float32), ("SIGMA", sigma, np.float32),
                                ("MASK", mask, np.uint8)):
            hdus.append(fits.ImageHDU(np.asarray(arr).astype(kind), name=name))
        for comp, arr in components.items():
            hdus.append(fits.ImageHDU(np.asarray(arr, dtype=np.float32), name=component_hdu_name(comp)))
        with atomic_path(path) as tmp:
            fits.HDUList(hdus).writeto(tmp, overwrite=True)
