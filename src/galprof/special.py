"""Special functions used by the profiles, written in torch so that autodiff works.

All functions take and return tensors; dtype and device follow the input.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

__all__ = [
    "SERSIC_N_RANGE",
    "sersic_bn",
    "boxy_area_factor",
    "gauss_legendre",
    "flux_to_mag",
    "mag_to_flux",
]

#: Range of Sérsic index over which :func:`sersic_bn` is accurate to 1e-13 (relative).
SERSIC_N_RANGE = (0.2, 20.0)

_LOG_N_LO = math.log(SERSIC_N_RANGE[0])
_LOG_N_HI = math.log(SERSIC_N_RANGE[1])

# Chebyshev coefficients (first kind) of  b(n) - 2n + 1/3  in the variable
# x = 2 (ln n - ln 0.2) / (ln 20 - ln 0.2) - 1, where b(n) = gammaincinv(2n, 1/2).
# Fitted by least squares on 4000 Chebyshev nodes against scipy.special.gammaincinv
# (scipy 1.17); the maximum relative error of b(n) on [0.2, 20] is 2e-13
# (tests/test_special.py checks it against scipy).
_BN_CHEB = (
    2.03535384405561307e-02,
    -3.17305326399525411e-02,
    1.70400032024053717e-02,
    -6.87040370436320467e-03,
    2.09543105920735086e-03,
    -4.12418233216012319e-04,
    -8.83408626699740818e-06,
    5.02982341805803621e-05,
    -2.46483192119373990e-05,
    6.81522255692637586e-06,
    -7.59777316912660421e-07,
    -2.80374482582960230e-07,
    1.74513286362736514e-07,
    -4.42069846556560651e-08,
    4.29586382278535964e-09,
    3.84494504352109588e-10,
    1.66390069777244172e-10,
    -1.94504124850422581e-10,
    2.24504239935016496e-11,
    3.19418341376245789e-11,
    -1.83523546734201041e-11,
    3.56449328945580209e-12,
    5.55838155644987790e-13,
    -4.29250519634429357e-13,
    3.71523648704220627e-14,
    3.05730287307784779e-14,
    -5.51619088851544034e-15,
)


def _clenshaw(x: torch.Tensor, coeffs: tuple[float, ...]) -> torch.Tensor:
    b1 = torch.zeros_like(x)
    b2 = torch.zeros_like(x)
    for c in coeffs[:0:-1]:
        b1, b2 = 2.0 * x * b1 - b2 + c, b1
    return x * b1 - b2 + coeffs[0]


def sersic_bn(n: torch.Tensor) -> torch.Tensor:
    """Sérsic ``b_n``: the solution of ``P(2n, b_n) = 1/2`` (half the light inside r_e).

    Accurate to better than 1e-13 (relative) for ``0.2 <= n <= 20`` and smooth
    (infinitely differentiable) in ``n``; above 20 the asymptotic series of
    Ciotti & Bertin (1999), accurate there to better than 1e-10, takes over.
    Values of ``n`` below 0.2 are outside the supported domain: the result is
    then an extrapolation and must not be used (parameter bounds prevent it).

    Parameters
    ----------
    n : Tensor
        Sérsic index (dimensionless), any shape.
    """
    log_n = torch.log(n)
    x = (2.0 * (log_n - _LOG_N_LO) / (_LOG_N_HI - _LOG_N_LO) - 1.0).clamp(-1.0, 1.0)
    inside = 2.0 * n - 1.0 / 3.0 + _clenshaw(x, _BN_CHEB)
    inv = 1.0 / n
    asym = (
        2.0 * n
        - 1.0 / 3.0
        + inv * (4.0 / 405.0 + inv * (46.0 / 25515.0 + inv * (131.0 / 1148175.0 - inv * 2194697.0 / 30690717750.0)))
    )
    return torch.where(n <= SERSIC_N_RANGE[1], inside, asym)


def boxy_area_factor(c0: torch.Tensor) -> torch.Tensor:
    """Area of the generalised ellipse ``|x|^C + |y/q|^C = 1`` (C = c0 + 2) divided by ``pi q``.

    GALFIT's boxiness convention: ``c0 < 0`` is disky, ``c0 > 0`` boxy, ``c0 = 0`` an ellipse
    (factor 1). The area of ``|x|^C + |y|^C <= 1`` is ``4 Gamma(1 + 1/C)^2 / Gamma(1 + 2/C)``.
    """
    C = c0 + 2.0
    log_area = math.log(4.0) + 2.0 * torch.lgamma(1.0 + 1.0 / C) - torch.lgamma(1.0 + 2.0 / C)
    return torch.exp(log_area) / math.pi


@functools.lru_cache(maxsize=64)
def _leggauss01(m: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(m)
    return (x + 1.0) / 2.0, w / 2.0


_GL_CACHE: dict = {}


def gauss_legendre(m: int, *, dtype: torch.dtype, device: torch.device | str | None = None):
    """Gauss–Legendre nodes and weights on [0, 1] (``m`` points, exact for degree 2m - 1).

    Cached per (m, dtype, device), so repeated calls copy nothing from the host.
    """
    key = (int(m), dtype, str(torch.device(device) if device is not None else torch.device("cpu")))
    hit = _GL_CACHE.get(key)
    if hit is None:
        x, w = _leggauss01(int(m))
        hit = (torch.as_tensor(x, dtype=dtype, device=device), torch.as_tensor(w, dtype=dtype, device=device))
        _GL_CACHE[key] = hit
    return hit


def mag_to_flux(mag, zeropoint):
    """Total flux from a magnitude: ``10 ** (-0.4 (mag - zeropoint))``."""
    return 10.0 ** (-0.4 * (mag - zeropoint))


def flux_to_mag(flux, zeropoint):
    """Magnitude from a total flux: ``-2.5 log10(flux) + zeropoint``."""
    if isinstance(flux, torch.Tensor):
        return -2.5 * torch.log10(flux) + zeropoint
    return -2.5 * np.log10(flux) + zeropoint
