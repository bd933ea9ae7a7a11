"""The documented conversions (docs/conventions.md) from IMFIT's and GalSim's parameters."""

import math

import numpy as np
import pytest
from scipy.special import gamma, gammaincinv

import galprof


def test_imfit_sersic_conversion_reads_back_ie():
    n, ie, re, ell = 1.5, 15.0, 25.0, 0.2
    q = 1 - ell
    b = gammaincinv(2 * n, 0.5)
    flux = 2 * math.pi * q * re**2 * ie * n * math.exp(b) * gamma(2 * n) / b ** (2 * n)
    assert -2.5 * math.log10(flux) == pytest.approx(-12.5754, abs=1e-4)  # the documented number
    model = galprof.load_model({"components": {"g": {"profile": "sersic", "x0": 129, "y0": 129, "pa": 0.0,
                                                     "q": q, "n": n, "re": re, "mag": -2.5 * math.log10(flux)}}})
    img = galprof.render(model, (256, 256))
    # PA = 0: the major axis is along +y; the pixel at r_e above the centre is (129, 154)
    assert img[154 - 1, 129 - 1] == pytest.approx(ie, rel=5e-4)
    # and at r_e along the minor axis (q r_e to the side): the same isophote
    assert img[129 - 1, 129 - 1 + 20] == pytest.approx(ie, rel=5e-4)


def test_imfit_exponential_conversion_reads_back_i0():
    h, i0, q = 25.0, 100.0, 0.8
    flux = 2 * math.pi * q * h**2 * i0
    assert -2.5 * math.log10(flux) == pytest.approx(-13.7429, abs=1e-4)
    model = galprof.load_model({"components": {"d": {"profile": "expdisk", "x0": 129, "y0": 129, "pa": 18.0,
                                                     "q": q, "rs": h, "mag": -2.5 * math.log10(flux)}}})
    img = galprof.render(model, (256, 256))
    # the centre pixel averages the cusp of exp(-r/h) over the pixel: I_0 (1 - ~0.38 / h)
    assert img[128, 128] == pytest.approx(i0, rel=2e-2)
    assert img[128, 128] < i0


def test_galsim_worked_example():
    galsim = pytest.importorskip("galsim")
    gsp = galsim.GSParams(realspace_relerr=1e-7, realspace_abserr=1e-10)
    gal = galsim.Sersic(2.0, half_light_radius=3.0, flux=1000.0, gsparams=gsp).shear(q=0.5, beta=60 * galsim.degrees)
    im = galsim.ImageD(50, 48, scale=1.0)
    gal.drawImage(image=im, center=galsim.PositionD(25.3, 24.8), method="real_space")
    model = galprof.load_model({"components": {"g": {"profile": "sersic", "x0": 25.3, "y0": 24.8,
                                                     "re": 3.0 / math.sqrt(0.5), "n": 2.0, "q": 0.5,
                                                     "pa": -30.0, "mag": -7.5}}})
    assert np.abs(galprof.render(model, (48, 50)) - im.array).sum() / 1000 < 1e-3
