"""The networks in ``galprof fit``'s automatic inputs (``--init {auto,moments,nn}``, ``--mask nn``).

:func:`network_inputs` takes a stamp's automatic inputs (:func:`galprof.detect.auto_inputs`:
detection, sep mask, moment starts) and replaces the starts by the network's (``init`` ``nn``,
or ``auto`` when the stamp matches the training survey: :meth:`galprof.nn.survey.Survey.matches`)
and/or the sep mask of the other sources by the mask network's (``mask_nn``). The network sees
the stamp with the mask that the fit will use, centred on the detected target.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from ..model import Model
from .grid import psf_fwhm
from .infer import INIT_MODES, Predictor, starts_for

__all__ = ["network_inputs", "INIT_MODES"]


def network_inputs(predictor: Predictor, *, image: np.ndarray, sigma: np.ndarray, bad: np.ndarray | None,
                   psf: np.ndarray | None, auto, model: Model, given: Iterable[str] = (), init: str = "moments",
                   mask_nn: bool = False, pixel_scale: float | None = None,
                   psf_fwhm_px: float | None = None) -> tuple[np.ndarray, dict[str, float], list[str]]:
    """``(mask, starts, notes)`` of one stamp: ``auto`` is its
    :class:`~galprof.detect.AutoResult`; ``bad`` the input mask (True = not used); ``mask``
    returned is the automatic mask (without ``bad``): the sep one, or the mask network's other
    sources; ``starts`` in the frame of ``auto.starts`` (stamp pixels, ``model``'s zeropoint).
    Fallbacks (no PSF, no mask network, a stamp outside the training ranges with ``auto``) keep
    the sep mask and moment starts, with a note."""
    notes: list[str] = []
    mask = auto.mask
    starts = dict(auto.starts)
    if init == "moments" and not mask_nn:
        return mask, starts, notes
    fwhm = psf_fwhm(psf) if psf_fwhm_px is None else float(psf_fwhm_px)
    bad = np.zeros(image.shape, bool) if bad is None else np.asarray(bad, bool)
    pos = (auto.target.x, auto.target.y) if auto.target is not None else None
    scale = pixel_scale if pixel_scale is not None and math.isfinite(pixel_scale) else None
    if mask_nn:
        if predictor.mask_net is None:
            notes.append("mask network: none in the weights, sep mask used")
        elif not math.isfinite(fwhm):
            notes.append("mask network: needs a PSF, sep mask used")
        else:
            mask = predictor.mask(image, sigma, psf_fwhm_px=fwhm, mask=bad, position=pos)
    if init == "moments":
        return mask, starts, notes
    ok, why = predictor.matches(stamp_shape=image.shape, psf_fwhm_px=fwhm, pixel_scale=scale)
    if not math.isfinite(fwhm):
        notes.append("network starts need a PSF: moment starts used")
        return mask, starts, notes
    if not ok and init == "auto":
        notes.append(f"moment starts ({why})")
        return mask, starts, notes
    if not ok:
        notes.append(f"network starts outside the training ranges ({why})")
    pred = predictor.predict([image], [sigma], psf_fwhm_px=[fwhm], masks=[bad | mask], positions=[pos],
                             zeropoint=model.zeropoint)
    nn = starts_for(model, pred, 0, given=given)
    if not nn:
        notes.append("network starts not finite: moment starts used")
        return mask, starts, notes
    starts.update(nn)
    return mask, starts, notes
