"""Surface brightness <-> total magnitude for elliptical profiles, shared by the GALFIT and IMFIT
importers (GALFIT's Ferrer and King give a central surface brightness, IMFIT gives ``I_e`` or
``I_0`` for every profile; galprof's parameter is the total magnitude).

Everything uses the profile's own normalisation (``log_radial_integral``, the boxiness area factor),
so the conversion is exactly the one the renderer uses; values are torch tensors (so that the
conversions can be ties, differentiable like every other tie).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..errors import ModelError
from ..params import Tie
from ..profiles import EllipticalProfile, get_profile
from ..special import boxy_area_factor, flux_to_mag, mag_to_flux

__all__ = ["log_light_per_intensity", "mag_from_intensity", "intensity_from_mag", "intensity_tie"]


def _tensor(v, like=None) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    dtype = like.dtype if isinstance(like, torch.Tensor) else torch.float64
    return torch.as_tensor(v, dtype=dtype)


def log_light_per_intensity(profile: EllipticalProfile, params: Mapping[str, object],
                            radius: str | None) -> torch.Tensor:
    """``log(F / I(r_ref))``: total flux per unit surface brightness at the reference radius.

    ``params`` holds the shape parameters, ``q`` and ``c0`` (pixels, plain numbers or tensors);
    ``radius`` names the shape parameter at which the surface brightness is given (``"re"`` for
    IMFIT's ``I_e``), or is None for the central surface brightness.
    """
    ref = next((v for v in params.values() if isinstance(v, torch.Tensor)), None)
    shape = {s.name: _tensor(params[s.name], ref) for s in profile.shape_params}
    q = _tensor(params.get("q", 1.0), ref)
    c0 = _tensor(params.get("c0", 0.0), ref)
    log_norm = profile.log_radial_integral(shape) + torch.log(q) + torch.log(boxy_area_factor(c0))
    full = {**shape, **profile.derived(shape)}
    r = full[radius] if radius is not None else torch.zeros_like(log_norm)
    f_ref = profile.radial(r, full)
    if not bool(torch.all(f_ref > 0)):
        raise ModelError(f"{profile.name}: the profile is zero at the reference radius; a surface brightness "
                         "there does not define a total magnitude")
    return log_norm - torch.log(f_ref)


def mag_from_intensity(profile, params, intensity, zeropoint: float, radius: str | None = None):
    """Total magnitude of a profile whose surface brightness at ``radius`` (None: the centre) is
    ``intensity`` (counts per pixel)."""
    log_f = torch.log(_tensor(intensity)) + log_light_per_intensity(profile, params, radius)
    return flux_to_mag(torch.exp(log_f), zeropoint)


def intensity_from_mag(profile, params, mag, zeropoint: float, radius: str | None = None):
    """Surface brightness (counts per pixel) at ``radius`` (None: the centre) of a profile of total
    magnitude ``mag``."""
    flux = mag_to_flux(_tensor(mag), zeropoint)
    return flux * torch.exp(-log_light_per_intensity(profile, params, radius))


def intensity_tie(comp: str, profile_name: str, intensity: float, zeropoint: float, radius: str | None,
                  names: Mapping[str, str]) -> Tie:
    """A tie ``comp.mag = f(shape, q, c0)`` that keeps the surface brightness at ``radius`` fixed at
    ``intensity``, for a model file that fixes a surface brightness but frees the shape.

    ``names`` maps the profile's parameter names (shape, ``q``, ``c0``) to the model's keys.
    """
    profile = get_profile(profile_name)
    keys = dict(names)

    def fn(values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        p = {name: values[key] for name, key in keys.items()}
        return mag_from_intensity(profile, p, torch.full_like(p["q"], intensity), zeropoint, radius)

    fn.__name__ = f"{comp}_mag_from_fixed_intensity"
    return Tie(fn, depends=tuple(keys.values()))


def log10_pixel_area(scale: tuple[float, float]) -> float:
    """``log10`` of the area of one pixel in arcsec^2 (plate scale ``dx, dy``)."""
    return math.log10(scale[0] * scale[1])

