"""A profile written by a user (its formula in torch, nothing else) renders and fits like a
built-in one."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares

import galprof
from galprof import EllipticalProfile, ParamSpec, register_profile


@register_profile
class UserExponential(EllipticalProfile):
    """An exponential disk written as a user would: a formula, a length parameter."""

    name = "user_exponential"
    shape_params = (ParamSpec("h", kind="length", unit="px", bounds=(0.1, 100.0), domain=(1e-4, None),
                              doc="scale length"),)

    def radial(self, r, p):
        return torch.exp(-r / p["h"])


@register_profile
class Cored(EllipticalProfile):
    """The example of the documentation: no closed-form flux, no cusp information."""

    name = "cored_example"
    shape_params = (ParamSpec("rc", kind="length", unit="px", bounds=(0.05, 500), domain=(0, None)),)

    def radial(self, r, p):
        return (1 + (r / p["rc"]) ** 2) ** -2.0


def test_numeric_normalisation():
    h = torch.tensor([0.7, 3.0, 11.0], dtype=torch.float64)
    got = UserExponential().log_radial_integral({"h": h})
    assert torch.allclose(got, torch.log(2 * math.pi * h**2), rtol=0, atol=1e-7)
    rc = torch.tensor([2.0], dtype=torch.float64)
    assert float(Cored().log_radial_integral({"rc": rc})) == pytest.approx(math.log(math.pi * 4.0), abs=1e-7)


def test_renders_like_the_builtin():
    psf = np.exp(-np.add.outer((np.arange(21) - 10.0) ** 2, (np.arange(21) - 10.0) ** 2) / 4.5)
    psf /= psf.sum()
    common = {"x0": 16.3, "y0": 15.8, "mag": 0.0, "q": 0.6, "pa": 20.0}
    user = galprof.load_model({"components": {"d": {"profile": "user_exponential", "h": 2.5, **common}}})
    builtin = galprof.load_model({"components": {"d": {"profile": "expdisk", "rs": 2.5, **common}}})
    a = galprof.render(user, (32, 32), psf)
    b = galprof.render(builtin, (32, 32), psf)
    assert np.abs(a - b).sum() / np.abs(b).sum() < 1e-6
    cored = galprof.load_model({"components": {"c": {"profile": "cored_example", "rc": 2.0, **common}}})
    assert galprof.render(cored, (301, 301)).sum() > 0.99  # flux 1 (mag 0), a heavy r^-4 tail outside


def _fit(profile, scale_name, data, psf, start):
    """Least squares with the Jacobian from forward-mode autodiff through the renderer."""
    model = galprof.load_model({"components": {"d": {"profile": profile, "x0": 1.0, "y0": 1.0, "mag": 0.0,
                                                     scale_name: 1.0, "q": 0.5, "pa": 0.0}}})
    r = galprof.Renderer(model, [data.shape], psf, psf_kind="optical")
    base = r.values()
    keys = ["d.x0", "d.y0", "d.mag", f"d.{scale_name}", "d.q", "d.pa"]

    def residual(p):
        v = dict(base)
        for i, k in enumerate(keys):
            v[k] = p[i:i + 1]
        return (r(v, check=False)[0] - torch.as_tensor(data)).reshape(-1)

    fun = lambda p: residual(torch.as_tensor(p)).numpy()
    jac = lambda p: torch.func.jacfwd(residual)(torch.as_tensor(p)).numpy()
    return least_squares(fun, np.asarray(start, dtype=float), jac=jac, method="lm", xtol=1e-12, ftol=1e-12).x


def test_fits_like_the_builtin():
    galsim = pytest.importorskip("galsim")
    gsp = galsim.GSParams(folding_threshold=1e-4, maxk_threshold=1e-5)
    moffat = galsim.Moffat(beta=4.5, fwhm=3.0, gsparams=gsp)
    truth = dict(x0=16.4, y0=15.7, mag=-2.5 * math.log10(500.0), h=2.2, q=0.55, pa=25.0)
    disk = galsim.Exponential(scale_radius=truth["h"] * math.sqrt(truth["q"]), flux=500.0, gsparams=gsp)
    disk = disk.shear(q=truth["q"], beta=(truth["pa"] + 90) * galsim.degrees)
    im = galsim.ImageD(32, 32, scale=1.0)
    galsim.Convolve(disk, moffat, gsparams=gsp).drawImage(image=im, center=galsim.PositionD(truth["x0"], truth["y0"]))
    psf = moffat.drawImage(nx=21, ny=21, scale=1.0, method="no_pixel").array
    start = [16.0, 16.0, truth["mag"] + 0.3, 3.0, 0.7, 10.0]
    user = _fit("user_exponential", "h", im.array, psf, start)
    builtin = _fit("expdisk", "rs", im.array, psf, start)
    np.testing.assert_allclose(user, builtin, rtol=1e-6, atol=1e-6)
    expected = [truth[k] for k in ("x0", "y0", "mag", "h", "q", "pa")]
    np.testing.assert_allclose(builtin, expected, rtol=2e-3, atol=2e-3)
