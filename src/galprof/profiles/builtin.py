"""Built-in profiles. Parameter names follow GALFIT where GALFIT has the profile."""

from __future__ import annotations

import math

import torch

from ..params import ParamSpec
from ..special import SERSIC_N_RANGE, gauss_legendre, sersic_bn
from .base import MAG, X0, Y0, EllipticalProfile, PointProfile, SkyProfile, register_profile

_LOG_2PI = math.log(2.0 * math.pi)
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))

RE = ParamSpec("re", kind="length", unit="px", bounds=(0.05, 1000.0), domain=(1e-4, None),
               doc="semi-major half-light radius")
N = ParamSpec("n", kind="other", unit="", bounds=(0.25, 10.0), domain=SERSIC_N_RANGE,
              doc="Sérsic index")


def _broadcasts_into(shape, target) -> bool:
    """Whether ``shape`` broadcasts to ``target`` without enlarging it (``torch.broadcast_shapes``
    costs far more, and its first call imports SymPy)."""
    return len(shape) <= len(target) and all(a in (1, b) for a, b in zip(reversed(shape), reversed(target)))


def _scaled_log(x, scale, shift):
    """``scale log(x) + shift``, in place on the fresh logarithm where the shapes allow."""
    z = torch.log(x)
    if _broadcasts_into(scale.shape, z.shape) and _broadcasts_into(shift.shape, z.shape):
        return z.mul_(scale).add_(shift)
    return z * scale + shift


def _sersic(r, re, n, bn=None):
    b = sersic_bn(n) if bn is None else bn
    inv = 1.0 / n
    # b (r / re)^(1/n) as exp(log b + (log r - log re) / n): a power with a tensor exponent is
    # about twice as slow as exp and log on a CPU
    return torch.exp(-torch.exp(_scaled_log(r, inv, torch.log(b) - inv * torch.log(re))))


def _sersic_squared(r2, re, n, bn=None):
    b = sersic_bn(n) if bn is None else bn
    inv = 0.5 / n
    return torch.exp(-torch.exp(_scaled_log(r2, inv, torch.log(b) - (2.0 * inv) * torch.log(re))))


def _sersic_log_integral(re, n):
    b = sersic_bn(n)
    return _LOG_2PI + 2.0 * torch.log(re) + torch.log(n) + torch.lgamma(2.0 * n) - 2.0 * n * torch.log(b)


@register_profile
class Sersic(EllipticalProfile):
    """``f(r) = exp(-b_n (r / r_e)^(1/n))``, ``b_n`` such that half the light is inside ``r_e``."""

    name = "sersic"
    smooth = True
    shape_params = (RE, N)

    def derived(self, p):
        return {"bn": sersic_bn(p["n"])}

    def radial(self, r, p):
        return _sersic(r, p["re"], p["n"], p.get("bn"))

    def radial_squared(self, r2, p):
        return _sersic_squared(r2, p["re"], p["n"], p.get("bn"))

    def radii(self, p):
        return [p["re"]]

    def cusp(self, p):
        return 1.0 / p["n"]

    def log_radial_integral(self, p):
        return _sersic_log_integral(p["re"], p["n"])


@register_profile
class DeVaucouleurs(EllipticalProfile):
    """Sérsic profile with ``n = 4``."""

    name = "devauc"
    smooth = True
    shape_params = (RE,)

    def _n(self, like):
        return torch.full_like(like, 4.0)

    def derived(self, p):
        return {"bn": sersic_bn(self._n(p["re"]))}

    def radial(self, r, p):
        return _sersic(r, p["re"], self._n(p["re"]), p.get("bn"))

    def radial_squared(self, r2, p):
        return _sersic_squared(r2, p["re"], self._n(p["re"]), p.get("bn"))

    def radii(self, p):
        return [p["re"]]

    def cusp(self, p):
        return 0.25

    def log_radial_integral(self, p):
        return _sersic_log_integral(p["re"], self._n(p["re"]))


@register_profile
class ExpDisk(EllipticalProfile):
    """``f(r) = exp(-r / r_s)``."""

    name = "expdisk"
    smooth = True
    shape_params = (ParamSpec("rs", kind="length", unit="px", bounds=(0.05, 1000.0), domain=(1e-4, None),
                              doc="disk scale length"),)

    def radial(self, r, p):
        return torch.exp(-r / p["rs"])

    def cusp(self, p):
        return 1.0

    def log_radial_integral(self, p):
        return _LOG_2PI + 2.0 * torch.log(p["rs"])


@register_profile
class Gaussian(EllipticalProfile):
    """``f(r) = exp(-r^2 / (2 sigma^2))`` with ``sigma = fwhm / (2 sqrt(2 ln 2))``."""

    name = "gaussian"
    smooth = True
    shape_params = (ParamSpec("fwhm", kind="length", unit="px", bounds=(0.05, 1000.0), domain=(1e-4, None),
                              doc="full width at half maximum (major axis)"),)

    def radial(self, r, p):
        sigma = p["fwhm"] * _FWHM_TO_SIGMA
        return torch.exp(-0.5 * (r / sigma) ** 2)

    def radial_squared(self, r2, p):
        sigma = p["fwhm"] * _FWHM_TO_SIGMA
        return torch.exp(r2 * (-0.5 / (sigma * sigma)))

    def radii(self, p):
        return [p["fwhm"] * 0.5]

    def log_radial_integral(self, p):
        sigma = p["fwhm"] * _FWHM_TO_SIGMA
        return _LOG_2PI + 2.0 * torch.log(sigma)


@register_profile
class Moffat(EllipticalProfile):
    """``f(r) = (1 + (r / alpha)^2)^(-beta)``, ``fwhm = 2 alpha sqrt(2^(1/beta) - 1)``."""

    name = "moffat"
    smooth = True
    shape_params = (
        ParamSpec("fwhm", kind="length", unit="px", bounds=(0.05, 1000.0), domain=(1e-4, None),
                  doc="full width at half maximum (major axis)"),
        ParamSpec("beta", kind="other", unit="", default=3.0, bounds=(1.05, 20.0), domain=(1.0 + 1e-6, None),
                  doc="power-law index (> 1 for a finite total flux)"),
    )

    @staticmethod
    def _alpha(p):
        return p["fwhm"] / (2.0 * torch.sqrt(torch.exp2(1.0 / p["beta"]) - 1.0))

    def radial(self, r, p):
        return (1.0 + (r / self._alpha(p)) ** 2) ** (-p["beta"])

    def radial_squared(self, r2, p):
        alpha = self._alpha(p)
        return (1.0 + r2 / (alpha * alpha)) ** (-p["beta"])

    def radii(self, p):
        return [self._alpha(p)]

    def log_radial_integral(self, p):
        alpha = self._alpha(p)
        return math.log(math.pi) + 2.0 * torch.log(alpha) - torch.log(p["beta"] - 1.0)


@register_profile
class Ferrer(EllipticalProfile):
    """``f(r) = (1 - (r / r_out)^(2 - beta))^alpha`` inside ``r_out``, 0 outside (GALFIT's Ferrer)."""

    name = "ferrer"
    shape_params = (
        ParamSpec("rout", kind="length", unit="px", bounds=(0.1, 5000.0), domain=(1e-4, None),
                  doc="outer truncation radius"),
        ParamSpec("alpha", kind="other", unit="", default=2.0, bounds=(0.0, 10.0), domain=(0.0, None),
                  doc="outer truncation sharpness"),
        ParamSpec("beta", kind="other", unit="", default=0.0, bounds=(0.0, 1.99), domain=(None, 1.999),
                  doc="central slope"),
    )

    def radial(self, r, p):
        x = r / p["rout"]
        inside = x < 1.0
        base = torch.where(inside, 1.0 - x.clamp(max=1.0) ** (2.0 - p["beta"]), torch.ones_like(x))
        return torch.where(inside, base ** p["alpha"], torch.zeros_like(x))

    def radii(self, p):
        return [p["rout"]]

    def cusp(self, p):
        return 2.0 - p["beta"]

    def log_radial_integral(self, p):
        # 2 pi r_out^2 B(2/gamma, alpha + 1) / gamma with gamma = 2 - beta
        gamma = 2.0 - p["beta"]
        a, b = 2.0 / gamma, p["alpha"] + 1.0
        log_beta_fn = torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)
        return _LOG_2PI + 2.0 * torch.log(p["rout"]) + log_beta_fn - torch.log(gamma)


@register_profile
class King(EllipticalProfile):
    """Modified King profile (Elmegreen et al. 1999, as in GALFIT), zero beyond ``rt``:

    ``f(r) = [(1 + (r/rc)^2)^(-1/alpha) - (1 + (rt/rc)^2)^(-1/alpha)]^alpha``.
    ``alpha = 2`` is the classical King (1962) profile.
    """

    name = "king"
    shape_params = (
        ParamSpec("rc", kind="length", unit="px", bounds=(0.05, 1000.0), domain=(1e-4, None), doc="core radius"),
        ParamSpec("rt", kind="length", unit="px", bounds=(0.5, 5000.0), domain=(1e-4, None), doc="truncation radius"),
        ParamSpec("alpha", kind="other", unit="", default=2.0, bounds=(0.1, 10.0), domain=(1e-3, None),
                  doc="power-law index"),
    )

    def radial(self, r, p):
        rc, rt, alpha = p["rc"], p["rt"], p["alpha"]
        edge = (1.0 + (rt / rc) ** 2) ** (-1.0 / alpha)
        inside = r < rt
        core = (1.0 + (r.clamp(max=rt) / rc) ** 2) ** (-1.0 / alpha) - edge
        core = torch.where(inside, core, torch.ones_like(core))
        return torch.where(inside, core ** alpha, torch.zeros_like(core))

    def radii(self, p):
        return [torch.minimum(p["rc"], p["rt"]), p["rt"]]

    def log_radial_integral(self, p):
        # Two Gauss–Legendre panels: [0, rc] (smooth core) and [rc, rt] with r = rt - (rt - rc) w^2,
        # which makes the (rt - r)^alpha edge smooth in w.
        rc, rt = p["rc"], p["rt"]
        t, w = gauss_legendre(64, dtype=rc.dtype, device=rc.device)
        pe = {k: v.unsqueeze(-1) for k, v in p.items()}
        r_mid = torch.minimum(rc, rt).unsqueeze(-1)
        rr = r_mid * t
        core = (r_mid * rr * self.radial(rr, pe) * w).sum(-1)
        span = rt.unsqueeze(-1) - r_mid
        rr = rt.unsqueeze(-1) - span * t**2
        outer = (2.0 * span * t * rr * self.radial(rr, pe) * w).sum(-1)
        return _LOG_2PI + torch.log(core + outer)


@register_profile
class Sky(SkyProfile):
    """A flat sky level (counts per pixel)."""

    name = "sky"
    params = (ParamSpec("sky", kind="flux", unit="counts/px", default=0.0, doc="sky level"),)

    def evaluate(self, dx, dy, p):
        return p["sky"] + torch.zeros_like(dx + dy)


@register_profile
class TiltedSky(SkyProfile):
    """``sky + dsdx (x - xc) + dsdy (y - yc)`` with ``(xc, yc)`` the stamp centre,
    ``((nx + 1) / 2, (ny + 1) / 2)`` in pixel coordinates."""

    name = "tiltedsky"
    params = (
        ParamSpec("sky", kind="flux", unit="counts/px", default=0.0, doc="sky level at the stamp centre"),
        ParamSpec("dsdx", kind="other", unit="counts/px^2", default=0.0, doc="sky gradient along x"),
        ParamSpec("dsdy", kind="other", unit="counts/px^2", default=0.0, doc="sky gradient along y"),
    )

    def evaluate(self, dx, dy, p):
        return p["sky"] + p["dsdx"] * dx + p["dsdy"] * dy


@register_profile
class PointSource(PointProfile):
    """A point source: the PSF image scaled to ``mag`` and shifted to ``(x0, y0)``."""


    name = "psf"
    params = (X0, Y0, MAG)
