"""Total flux of every profile: rendered image sums and the closed-form normalisations against
independent quadrature (scipy) of the profile formulas as GALFIT's manual defines them."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.special import gammaincinv

import galprof


# Profile formulas, written here from their published definitions (not from galprof).
def sersic(r, re, n):
    return np.exp(-gammaincinv(2 * n, 0.5) * ((r / re) ** (1 / n) - 1))


FORMULAS = {
    "sersic": (lambda r, p: sersic(r, p["re"], p["n"]), {"re": 2.5, "n": 2.5}, math.inf),
    "devauc": (lambda r, p: sersic(r, p["re"], 4.0), {"re": 1.2}, math.inf),
    "expdisk": (lambda r, p: np.exp(-r / p["rs"]), {"rs": 3.0}, math.inf),
    "gaussian": (lambda r, p: np.exp(-4 * np.log(2) * r**2 / p["fwhm"] ** 2), {"fwhm": 5.0}, math.inf),
    "moffat": (lambda r, p: (1 + (2 * r * np.sqrt(2 ** (1 / p["beta"]) - 1) / p["fwhm"]) ** 2) ** -p["beta"],
               {"fwhm": 4.0, "beta": 4.5}, math.inf),
    "ferrer": (lambda r, p: np.where(r < p["rout"], np.clip(1 - (r / p["rout"]) ** (2 - p["beta"]), 0, None)
                                     ** p["alpha"], 0.0), {"rout": 30.0, "alpha": 2.5, "beta": 0.5}, None),
    "king": (lambda r, p: np.where(r < p["rt"], np.clip(1 / (1 + (r / p["rc"]) ** 2) ** (1 / p["alpha"])
                                                        - 1 / (1 + (p["rt"] / p["rc"]) ** 2) ** (1 / p["alpha"]),
                                                        0, None) ** p["alpha"], 0.0),
             {"rc": 3.0, "rt": 40.0, "alpha": 2.0}, None),
}


def quad_total(f, p, rmax):
    """int_0^rmax 2 pi r f(r) dr by adaptive quadrature, split at the profile's scales."""
    upper = rmax if rmax is not None else p.get("rout", p.get("rt"))
    pts = [0.0, 0.1, 1.0, 3.0, 10.0, 30.0]
    pts = [x for x in pts if x < upper] + [upper]
    total = 0.0
    for a, b in zip(pts[:-1], pts[1:]):
        total += integrate.quad(lambda r: 2 * np.pi * r * f(r, p), a, b, limit=400, epsabs=0, epsrel=1e-12)[0]
    return total


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_closed_form_normalisation_matches_quadrature(name):
    f, p, _ = FORMULAS[name]
    prof = galprof.get_profile(name)
    tp = {k: torch.tensor([v], dtype=torch.float64) for k, v in p.items()}
    ours = math.exp(float(prof.log_radial_integral(tp)[0]))
    # galprof's f(0) may differ from the formula's by a constant: compare f's too
    r = np.array([0.7, 2.0])
    ratio = prof.radial(torch.tensor(r), {k: v for k, v in tp.items()}).numpy() / f(r, p)
    assert ratio[0] == pytest.approx(ratio[1], rel=1e-10)
    ref = quad_total(f, p, math.inf if FORMULAS[name][2] else None) * ratio[0]
    assert ours == pytest.approx(ref, rel=1e-7)


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_image_sum_is_total_flux(name):
    """A large stamp holds the total flux (mag is the total magnitude) to 1e-4."""
    f, p, _ = FORMULAS[name]
    size = 301
    c = (size + 1) / 2 + 0.3
    comp = {"profile": name, "x0": c, "y0": c - 0.45, "mag": 10.0, "q": 1.0, "pa": 0.0, **p}
    model = galprof.load_model({"zeropoint": 10.0 + 2.5 * math.log10(1000.0), "components": {"g": comp}})
    img = galprof.render(model, (size, size))
    # light outside the inscribed circle, from the independent formula
    rin = (size - 1) / 2 - 0.5
    outside = 0.0
    if FORMULAS[name][2] is not None:
        outside = 1000.0 * (1 - quad_total(f, p, rin) / quad_total(f, p, math.inf))
    assert abs(img.sum() - 1000.0) <= 1e-4 * 1000.0 + outside
    assert outside < 1e-4 * 1000.0


@pytest.mark.parametrize("c0", [-0.6, 0.0, 0.8])
@pytest.mark.parametrize("name", ["sersic", "gaussian", "ferrer"])
def test_flux_conserved_for_any_shape(name, c0):
    """q, PA and boxiness change the shape, never the total (the boxy normalisation)."""
    f, p, _ = FORMULAS[name]
    p = dict(p)
    if name == "sersic":
        p["re"] = 1.5
    size = 201
    for q, pa in [(0.3, 20.0), (0.7, -65.0)]:
        comp = {"profile": name, "x0": 101.2, "y0": 100.7, "mag": 0.0, "q": q, "pa": pa, **p,
                "c0": {"value": c0, "fixed": True}}
        model = galprof.load_model({"zeropoint": 2.5 * math.log10(1000.0), "components": {"g": comp}})
        assert galprof.render(model, (size, size)).sum() == pytest.approx(1000.0, rel=1e-4)


def test_sky_and_tilted_sky():
    model = galprof.load_model({"components": {
        "s": {"profile": "tiltedsky", "sky": 2.0, "dsdx": 0.1, "dsdy": -0.05}}})
    img = galprof.render(model, (5, 7))
    y, x = np.mgrid[1:6, 1:8]
    np.testing.assert_allclose(img, 2.0 + 0.1 * (x - 4.0) - 0.05 * (y - 3.0), rtol=0, atol=1e-12)
    flat = galprof.load_model({"components": {"s": {"profile": "sky", "sky": 1.5}}})
    np.testing.assert_allclose(galprof.render(flat, (3, 4)), 1.5)
