"""The renderer against GalSim (an independent code) drawing the same Sérsic galaxies.

GalSim's half-light radius is circularised (r_e sqrt(q)); its shear angle beta is measured from
+x, galprof's PA from +y (beta = PA + 90 deg); both put pixel (1, 1)'s centre at (1, 1).
Without a PSF, GalSim integrates over pixels in real space (adaptive quadrature, tight
tolerances); with a PSF it draws galaxy x Moffat x pixel by FFT (folding and k-value
tolerances tightened). The PSF handed to galprof is GalSim's own Moffat image: star-like
(Moffat x pixel, sampled) or optical (Moffat sampled at pixel centres).
"""

import itertools
import warnings

import numpy as np
import pytest
import torch

import galprof

galsim = pytest.importorskip("galsim")

NY, NX = 40, 40
RE = [0.5, 1.0, 2.0, 5.0]
N = [0.5, 1.0, 2.0, 4.0, 6.0]
Q = [0.2, 0.5, 1.0]
OFFSETS = [0.0, 0.25, 0.5]
PAS = [17.0, 63.0, -40.0]
CASES = [(re, n, q, d, PAS[i % 3]) for i, (re, n, q, d) in enumerate(itertools.product(RE, N, Q, OFFSETS))]

REAL = galsim.GSParams(realspace_relerr=1e-7, realspace_abserr=1e-10, xvalue_accuracy=1e-8,
                       kvalue_accuracy=1e-8)
FFT = galsim.GSParams(folding_threshold=1e-4, maxk_threshold=1e-5, kvalue_accuracy=1e-8,
                      xvalue_accuracy=1e-8, maximum_fft_size=8192)
FLUX = 1000.0


def centre(d):
    return 20.0 + d, 21.0 + d


def galsim_galaxy(re, n, q, pa, gsparams):
    g = galsim.Sersic(n, half_light_radius=re * np.sqrt(q), flux=FLUX, gsparams=gsparams)
    return g.shear(q=q, beta=(pa + 90.0) * galsim.degrees)


def galprof_batch(cases, psf=None, **kw):
    model = galprof.load_model({"components": {"g": {"profile": "sersic", "x0": 1.0, "y0": 1.0, "mag": 0.0,
                                                     "re": 1.0, "n": 1.0, "q": 1.0, "pa": 0.0}}})
    r = galprof.Renderer(model, [(NY, NX)] * len(cases), psf, **kw)
    cols = np.array([(*centre(d), -2.5 * np.log10(FLUX), re, n, q, pa) for re, n, q, d, pa in cases]).T
    names = ["x0", "y0", "mag", "re", "n", "q", "pa"]
    values = {f"g.{k}": torch.as_tensor(v, dtype=r.dtype) for k, v in zip(names, cols)}
    values["g.c0"] = torch.zeros(len(cases), dtype=r.dtype)
    return r(values).numpy()


def moffat_psf(kind, k=1):
    moffat = galsim.Moffat(beta=4.5, fwhm=3.5, gsparams=FFT)
    obj = moffat if kind == "optical" else galsim.Convolve(moffat, galsim.Pixel(1.0), gsparams=FFT)
    size = 41 * k if k % 2 else 41 * k + 1
    return moffat, obj.drawImage(nx=size, ny=size, scale=1.0 / k, method="no_pixel").array


def test_no_psf_matches_galsim_pixel_integration():
    ours = galprof_batch(CASES)
    worst = {}
    for img, (re, n, q, d, pa) in zip(ours, CASES):
        im = galsim.ImageD(NX, NY, scale=1.0)
        galsim_galaxy(re, n, q, pa, REAL).drawImage(image=im, center=galsim.PositionD(*centre(d)),
                                                    method="real_space")
        err = np.abs(img - im.array).sum() / FLUX
        worst[re] = max(worst.get(re, 0.0), err)
        assert err <= (1e-3 if re >= 2 else 5e-3), (re, n, q, d, pa, err)
    print("worst sum|model - galsim| / flux by re:", worst)


@pytest.mark.parametrize("kind", ["star", "optical"])
def test_moffat_psf_matches_galsim(kind):
    moffat, psf = moffat_psf(kind)
    ours = galprof_batch(CASES, psf, psf_kind=kind)
    worst = 0.0
    for img, (re, n, q, d, pa) in zip(ours, CASES):
        im = galsim.ImageD(NX, NY, scale=1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a GalSim FFT-size warning would make the reference unsafe
            galsim.Convolve(galsim_galaxy(re, n, q, pa, FFT), moffat, gsparams=FFT).drawImage(
                image=im, center=galsim.PositionD(*centre(d)))
        err = np.abs(img - im.array).sum() / FLUX
        worst = max(worst, err)
        assert err <= 1e-3, (re, n, q, d, pa, err)
    print(f"worst sum|model - galsim| / flux with a {kind} Moffat PSF:", worst)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("kind", ["star", "optical"])
def test_oversampled_psf_matches_galsim(kind, k):
    moffat, psf = moffat_psf(kind, k)
    cases = [(0.5, 2.0, 0.2, 0.5, 63.0), (1.0, 6.0, 0.5, 0.25, 17.0), (2.0, 1.0, 1.0, 0.0, -40.0),
             (5.0, 4.0, 0.2, 0.5, 63.0)]
    ours = galprof_batch(cases, psf, psf_kind=kind, psf_oversampling=k)
    for img, (re, n, q, d, pa) in zip(ours, cases):
        im = galsim.ImageD(NX, NY, scale=1.0)
        galsim.Convolve(galsim_galaxy(re, n, q, pa, FFT), moffat, gsparams=FFT).drawImage(
            image=im, center=galsim.PositionD(*centre(d)))
        assert np.abs(img - im.array).sum() / FLUX <= 5e-4, (re, n, q, d, pa)


def test_point_source_is_the_shifted_psf():
    """At whole-pixel shifts the point source is the PSF image itself; at sub-pixel shifts it
    matches GalSim's Moffat x pixel to the accuracy that a 3.5 px FWHM sampling allows."""
    moffat, psf = moffat_psf("star")
    psf = psf / psf.sum()
    model = galprof.load_model({"components": {"s": {"profile": "psf", "x0": 21.0, "y0": 20.0, "mag": -7.5}}})
    img = galprof.render(model, (NY, NX), psf)
    # pixel (x=21, y=20) is array [19, 20]; the PSF centre pixel is index (20, 20)
    ref = np.zeros((NY, NX))
    ys, xs = np.mgrid[0:41, 0:41]
    rows, cols = ys - 20 + 19, xs - 20 + 20
    ok = (rows >= 0) & (rows < NY) & (cols >= 0) & (cols < NX)
    ref[rows[ok], cols[ok]] = psf[ok] * FLUX
    np.testing.assert_allclose(img, ref, atol=1e-9 * FLUX)
    for d in (0.25, 0.5):
        model = galprof.load_model({"components": {"s": {"profile": "psf", "x0": 21.0 + d, "y0": 20.0 + d,
                                                         "mag": -7.5}}})
        img = galprof.render(model, (NY, NX), psf)
        im = galsim.ImageD(NX, NY, scale=1.0)
        (moffat * FLUX).drawImage(image=im, center=galsim.PositionD(21.0 + d, 20.0 + d))
        assert np.abs(img - im.array).sum() / FLUX < 2e-3


def test_large_galaxies_with_the_stencil_base_rule_match_galsim():
    """Large and flat galaxies in 128 x 128 stamps, where most of the light lies in cells that the
    default rule (with a band-limited PSF) integrates by the sixth-order stencil, not Gauss–Legendre:
    against GalSim, and against the Gauss–Legendre rule."""
    moffat, psf = moffat_psf("star")
    cases = [(re, n, 0.2, 0.3, 17.0) for re in (8.0, 15.0) for n in (0.5, 1.0, 4.0)] + [(15.0, 6.0, 1.0, 0.0, 63.0)]
    model = galprof.load_model({"components": {"g": {"profile": "sersic", "x0": 1.0, "y0": 1.0, "mag": 0.0,
                                                     "re": 1.0, "n": 1.0, "q": 1.0, "pa": 0.0}}})
    x0, y0 = 64.3, 64.8
    images = {}
    for rule in (None, "gauss"):
        r = galprof.Renderer(model, [(128, 128)] * len(cases), psf, options=galprof.RenderOptions(base_rule=rule))
        cols = np.array([(x0, y0, -2.5 * np.log10(FLUX), re, n, q, pa) for re, n, q, d, pa in cases]).T
        values = {f"g.{k}": torch.as_tensor(v) for k, v in zip(["x0", "y0", "mag", "re", "n", "q", "pa"], cols)}
        values["g.c0"] = torch.zeros(len(cases), dtype=torch.float64)
        images[rule] = r(values).numpy()
    stencil = galprof.Renderer(model, [(128, 128)] * len(cases), psf,
                               options=galprof.RenderOptions(base_rule="stencil"))(values).numpy()
    np.testing.assert_array_equal(images[None], stencil)         # the default rule is the stencil here
    for i, (re, n, q, _d, pa) in enumerate(cases):
        im = galsim.ImageD(128, 128, scale=1.0)
        galsim.Convolve(galsim_galaxy(re, n, q, pa, FFT), moffat, gsparams=FFT).drawImage(
            image=im, center=galsim.PositionD(x0, y0))
        assert np.abs(images[None][i] - im.array).sum() / FLUX <= 5e-4, (re, n, q)
        assert np.abs(images[None][i] - images["gauss"][i]).sum() / FLUX <= 1e-5, (re, n, q)
