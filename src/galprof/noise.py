"""Sigma maps from the detector's gain and read noise (GALFIT's and IMFIT's recipe).

An image whose pixel values ``D`` are in ADU (or in ADU per second, with ``exptime`` the exposure
time), the average of ``ncombine`` exposures, from which a sky level ``sky`` (same units) was
subtracted, holds in each pixel ``E = (D + sky) * gain * exptime * ncombine`` photo-electrons
summed over the exposures, with variance ``E + ncombine * read_noise^2`` (read noise in electrons
per exposure). In image units::

    sigma^2 = max(D + sky, 0) / (gain * exptime * ncombine) + read_noise^2 / ((gain * exptime)^2 * ncombine)

(``gain * ncombine`` is GALFIT's effective gain, and the second term IMFIT's
``N_c sigma_rdn^2 / A_eff^2``). The Poisson term uses ``max(D + sky, 0)``: a pixel whose value
plus sky is negative (noise in the sky) contributes only read noise. A pixel with ``sigma = 0``
(no read noise and no counts) is left at 0, which the fit masks and flags: nothing is repaired.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ParameterError

__all__ = ["sigma_from_gain"]


def sigma_from_gain(image: np.ndarray, *, gain: float, read_noise: float = 0.0, sky: float = 0.0,
                    ncombine: float = 1.0, exptime: float = 1.0) -> np.ndarray:
    """1-sigma noise per pixel of ``image`` (same units), from the detector's characteristics.

    Parameters
    ----------
    image : 2-D array
        Pixel values in ADU (or ADU/s with ``exptime``), sky-subtracted by ``sky``.
    gain : float
        Electrons per ADU (> 0).
    read_noise : float
        Read noise of one exposure, in electrons (>= 0).
    sky : float
        Sky level that was subtracted from the image, in image units (0 if none was).
    ncombine : float
        Number of exposures that were averaged into the image (>= 1).
    exptime : float
        Exposure time by which image values must be multiplied to get ADU (1 if the image is
        in ADU; > 0).

    Non-finite pixels give non-finite sigma.
    """
    checks = {"gain": (gain, lambda v: v > 0), "read_noise": (read_noise, lambda v: v >= 0),
              "ncombine": (ncombine, lambda v: v >= 1), "exptime": (exptime, lambda v: v > 0),
              "sky": (sky, lambda v: True)}
    for name, (value, ok) in checks.items():
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ParameterError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(v) or not ok(v):
            allowed = {"gain": "> 0", "read_noise": ">= 0", "ncombine": ">= 1", "exptime": "> 0",
                       "sky": "finite"}[name]
            raise ParameterError(f"{name} = {value!r} is not allowed (must be {allowed})")
    image = np.asarray(image, dtype=np.float64)
    g = float(gain) * float(exptime)
    n = float(ncombine)
    with np.errstate(invalid="ignore"):
        counts = np.maximum(image + float(sky), 0.0)
        counts = np.where(np.isfinite(image), counts, np.nan)
    var = counts / (g * n) + float(read_noise) ** 2 / (g * g * n)
    return np.sqrt(var)
