"""Analytic equivalences, conventions, batching and PSF handling of the renderer."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.special import gammaincinv

import galprof
from conftest import sersic_model
from galprof import GalprofWarning, ModelError, PSFError


def one(profile, **p):
    base = {"x0": 20.3, "y0": 19.6, "mag": 0.0, "q": 0.55, "pa": 35.0}
    base.update(p)
    return galprof.load_model({"zeropoint": 2.5 * math.log10(1000.0),
                               "components": {"g": {"profile": profile, **base}}})


def gaussian_psf(size=21, sigma=1.6, dx=0.0, dy=0.0):
    c = size // 2
    y, x = np.mgrid[0:size, 0:size]
    p = np.exp(-((x - c - dx) ** 2 + (y - c - dy) ** 2) / (2 * sigma**2))
    return p / p.sum()


@pytest.mark.parametrize("psf", [None, "psf"])
def test_sersic_half_is_gaussian(psf):
    p = None if psf is None else gaussian_psf()
    a = galprof.render(one("sersic", re=2.2, n=0.5), (40, 40), p)
    b = galprof.render(one("gaussian", fwhm=4.4), (40, 40), p)
    assert np.abs(a - b).sum() / 1000 < 1e-10


@pytest.mark.parametrize("psf", [None, "psf"])
def test_sersic_one_is_exponential(psf):
    p = None if psf is None else gaussian_psf()
    b1 = gammaincinv(2.0, 0.5)
    a = galprof.render(one("sersic", re=3.0, n=1.0), (40, 40), p)
    b = galprof.render(one("expdisk", rs=3.0 / b1), (40, 40), p)
    assert np.abs(a - b).sum() / 1000 < 1e-6


def test_devauc_is_sersic_four():
    a = galprof.render(one("sersic", re=2.0, n=4.0), (40, 40))
    b = galprof.render(one("devauc", re=2.0), (40, 40))
    assert np.abs(a - b).sum() / 1000 < 1e-10


def test_delta_psf_is_identity():
    """A delta function is not band-limited: the renderer applies it to the cell integrals
    directly, which reproduces the image without PSF exactly, however steep the galaxy."""
    delta = np.zeros((21, 21))
    delta[10, 10] = 1.0
    for steep in (one("sersic", re=0.7, n=5.0, q=0.3), one("gaussian", fwhm=0.8)):
        a = galprof.render(steep, (40, 40), delta, psf_kind="optical")
        b = galprof.render(steep, (40, 40))
        assert np.abs(a - b).max() < 1e-9 * b.max()
    smooth = one("gaussian", fwhm=6.0)
    a = galprof.render(smooth, (40, 40), delta, psf_kind="optical")
    b = galprof.render(smooth, (40, 40))
    assert np.abs(a - b).max() < 1e-9 * b.max()
    # an even-sized delta PSF, centre at index (n//2, n//2), too
    delta = np.zeros((20, 20))
    delta[10, 10] = 1.0
    a = galprof.render(smooth, (40, 40), delta, psf_kind="optical")
    assert np.abs(a - b).max() < 1e-9 * b.max()


def test_offset_psf_shifts_the_right_way():
    """A PSF whose light sits 3 px right and 2 px up of its centre moves the image right and up."""
    psf = np.zeros((21, 21))
    psf[10 + 2, 10 + 3] = 1.0
    model = one("gaussian", fwhm=4.0, x0=15.0, y0=16.0)
    a = galprof.render(model, (40, 40), psf, psf_kind="optical")
    b = galprof.render(one("gaussian", fwhm=4.0, x0=18.0, y0=18.0), (40, 40))
    assert np.abs(a - b).max() < 1e-9 * b.max()


def test_band_limited_psfs_use_the_fourier_core():
    r = galprof.Renderer(sersic_model(), [(40, 40)] * 3, [gaussian_psf(21, 1.5), gaussian_psf(21, 0.3),
                                                          gaussian_psf(21, 1.0)])
    assert r.fourier_core.tolist() == [True, False, True]


def test_asymmetric_psf_against_galsim():
    galsim = pytest.importorskip("galsim")
    gsp = galsim.GSParams(folding_threshold=1e-4, maxk_threshold=1e-5, kvalue_accuracy=1e-8)
    psf_obj = galsim.Moffat(beta=4.5, fwhm=3.0, gsparams=gsp).shear(q=0.7, beta=20 * galsim.degrees).shift(1.3, -0.8)
    psf = psf_obj.drawImage(nx=31, ny=31, scale=1.0, method="no_pixel").array
    gal = galsim.Sersic(1.5, half_light_radius=3.0 * math.sqrt(0.5), flux=1000.0, gsparams=gsp).shear(
        q=0.5, beta=(30 + 90) * galsim.degrees)
    im = galsim.ImageD(40, 40, scale=1.0)
    galsim.Convolve(gal, psf_obj, gsparams=gsp).drawImage(image=im, center=galsim.PositionD(20.3, 19.6))
    ours = galprof.render(one("sersic", re=3.0, n=1.5, q=0.5, pa=30.0), (40, 40), psf, psf_kind="optical")
    assert np.abs(ours - im.array).sum() / 1000 < 1e-3
    mirrored = galprof.render(one("sersic", re=3.0, n=1.5, q=0.5, pa=30.0), (40, 40), psf[::-1, ::-1],
                              psf_kind="optical")
    assert np.abs(mirrored - im.array).sum() / 1000 > 0.05  # the flipped kernel is clearly wrong


def test_pixel_convention_and_position_angle():
    # the centre pixel (x, y) = (3, 2) is array element [1, 2]
    img = galprof.render(one("gaussian", fwhm=1.5, x0=3.0, y0=2.0, q=1.0), (5, 6))
    assert np.unravel_index(np.argmax(img), img.shape) == (1, 2)
    y, x = np.mgrid[1:42, 1:42]

    def moments(pa):
        im = galprof.render(one("gaussian", fwhm=8.0, x0=21.0, y0=21.0, q=0.3, pa=pa), (41, 41))
        f = im / im.sum()
        return (f * (x - 21) ** 2).sum(), (f * (y - 21) ** 2).sum(), (f * (x - 21) * (y - 21)).sum()

    sxx, syy, _ = moments(0.0)
    assert syy > 5 * sxx  # PA = 0: major axis along +y (up)
    sxx, syy, _ = moments(90.0)
    assert sxx > 5 * syy  # PA = 90: along x
    _, _, sxy = moments(45.0)
    assert sxy < 0  # PA = 45: towards upper left (counter-clockwise from +y)


def test_pa_symmetries():
    a = galprof.render(one("sersic", re=2.5, n=3.0, pa=35.0), (40, 40))
    b = galprof.render(one("sersic", re=2.5, n=3.0, pa=215.0), (40, 40))
    assert np.abs(a - b).sum() / 1000 < 1e-6
    c = galprof.render(one("sersic", re=2.5, n=3.0, q=1.0, pa=0.0), (40, 40))
    d = galprof.render(one("sersic", re=2.5, n=3.0, q=1.0, pa=73.0), (40, 40))
    assert np.abs(c - d).sum() / 1000 < 1e-6


@pytest.mark.parametrize("kind, fourier_core", [("optical", False), ("optical", None), ("star", None)])
def test_mixed_batch_equals_singles(kind, fourier_core):
    """Stamps of different sizes and PSFs (odd and even) in one batch render as when alone, to
    1e-6 of the peak: what differs is only how far band-limited transforms (the Fourier-space
    core, a star-like PSF with the pixel response divided out, a point source's pixel response)
    are periodised by FFT boxes of different sizes. Extended components alone, convolved
    directly, agree to rounding (test_mixed_batch_extended_components_exact)."""
    tol = 1e-6
    model = galprof.load_model({"zeropoint": 25.0, "components": {
        "bulge": {"profile": "sersic", "x0": 20.0, "y0": 20.0, "mag": 18.0, "re": 2.0, "n": 4.0, "q": 0.8, "pa": 10.0},
        "disk": {"profile": "expdisk", "x0": {"tie": "bulge.x0"}, "y0": {"tie": "bulge.y0"}, "mag": 17.5,
                 "rs": 4.0, "q": 0.5, "pa": 15.0},
        "star": {"profile": "psf", "x0": 10.0, "y0": 12.0, "mag": 19.0},
        "sky": {"profile": "tiltedsky", "sky": 0.3, "dsdx": 0.01, "dsdy": 0.0},
    }})
    shapes = [(40, 40), (64, 51), (31, 77)]
    psfs = [gaussian_psf(41, 1.5), gaussian_psf(25, 2.0, dx=0.7), gaussian_psf(24, 1.2)]
    centres = [(20.2, 19.7), (26.5, 31.1), (40.0, 15.3)]
    options = galprof.RenderOptions(fourier_core=fourier_core)
    renderer = galprof.Renderer(model, shapes, psfs, psf_kind=kind, options=options)
    values = renderer.values()
    values["bulge.x0"] = torch.tensor([c[0] for c in centres], dtype=torch.float64)
    values["bulge.y0"] = torch.tensor([c[1] for c in centres], dtype=torch.float64)
    batch = renderer(values)
    for i, (shape, psf) in enumerate(zip(shapes, psfs)):
        single = galprof.Renderer(model, [shape], psf, psf_kind=kind, options=options)
        v = {k: t[i:i + 1] for k, t in values.items()}
        alone = single.crop(single(v), 0)
        np.testing.assert_allclose(renderer.crop(batch, i), alone, rtol=0, atol=tol * np.abs(alone).max())
        # nothing outside each galaxy's own stamp
        assert torch.all(batch[i][~renderer.valid[i]] == 0)


def test_mixed_batch_extended_components_exact():
    model = galprof.load_model({"components": {
        "bulge": {"profile": "sersic", "x0": 20.2, "y0": 19.7, "mag": -8.0, "re": 2.0, "n": 4.0, "q": 0.8, "pa": 10.0},
        "disk": {"profile": "expdisk", "x0": 21.0, "y0": 18.0, "mag": -8.5, "rs": 4.0, "q": 0.5, "pa": 15.0}}})
    shapes, psfs = [(40, 40), (64, 51), (31, 77)], [gaussian_psf(41, 1.5), gaussian_psf(25, 2.0, dx=0.7),
                                                     gaussian_psf(24, 1.2)]
    options = galprof.RenderOptions(fourier_core=False)
    batch = galprof.Renderer(model, shapes, psfs, psf_kind="optical", options=options)
    images = batch()
    for i, (shape, psf) in enumerate(zip(shapes, psfs)):
        single = galprof.Renderer(model, [shape], psf, psf_kind="optical", options=options)
        alone = single.crop(single(), 0)
        np.testing.assert_allclose(batch.crop(images, i), alone, rtol=0, atol=1e-12 * alone.max())


def test_float32_agrees_with_float64():
    psf = gaussian_psf()
    model = sersic_model(re=2.0, n=3.0)
    a = galprof.render(model, (40, 40), psf, dtype=torch.float64)
    b = galprof.render(model, (40, 40), psf, dtype=torch.float32)
    assert b.dtype == np.float32
    assert np.abs(a - b).max() < 2e-5 * a.max()


def test_components_sum_to_model():
    model = galprof.load_model({"components": {
        "a": {"profile": "sersic", "x0": 20.0, "y0": 20.0, "mag": -5.0, "re": 2.0, "n": 4.0},
        "b": {"profile": "expdisk", "x0": 21.0, "y0": 19.0, "mag": -6.0, "rs": 4.0, "q": 0.5},
        "s": {"profile": "sky", "sky": 0.5}}})
    r = galprof.Renderer(model, [(40, 40)], gaussian_psf())
    total = r()
    parts = r.components()
    assert set(parts) == {"a", "b", "s"}
    assert torch.allclose(sum(parts.values()), total, atol=1e-10)


def test_psf_validation():
    model = sersic_model()
    bad = gaussian_psf()
    bad[3, 3] = np.nan
    with pytest.raises(PSFError, match="non-finite"):
        galprof.render(model, (40, 40), bad)
    with pytest.raises(PSFError, match="sums to 0"):
        galprof.render(model, (40, 40), np.zeros((11, 11)))
    with pytest.raises(PSFError, match="psf_kind"):
        galprof.render(model, (40, 40), gaussian_psf(), psf_kind="airy")
    with pytest.raises(PSFError, match="galaxy 1"):
        galprof.Renderer(model, [(40, 40), (40, 40)], [gaussian_psf(), -gaussian_psf()])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        galprof.render(model, (40, 40), 3 * gaussian_psf())
    assert any(issubclass(x.category, GalprofWarning) and "normalised" in str(x.message) for x in w)


def test_point_source_needs_a_psf_and_values_are_checked():
    with pytest.raises(ModelError, match="need a PSF"):
        point = galprof.load_model({"components": {"s": {"profile": "psf", "x0": 5, "y0": 5, "mag": 0}}})
        galprof.render(point, (9, 9))
    with pytest.raises(galprof.ParameterError, match="g.n"):
        galprof.render(sersic_model(n=0.1), (20, 20))
    with pytest.raises(galprof.ParameterError, match="g.q"):
        galprof.render(sersic_model(q=0.0), (20, 20))


def test_centre_position_independence_of_flux():
    """The flux in the stamp does not depend on where the centre falls in a pixel."""
    psf = gaussian_psf()
    sums = [galprof.render(sersic_model(x0=20.0 + d, y0=20.0 + d, re=0.6, n=6.0, q=0.3), (40, 40), psf).sum()
            for d in np.linspace(0, 1, 9)]
    assert np.ptp(sums) / np.mean(sums) < 2e-4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n, c0", [(4.0, 0.0), (8.0, 0.0), (20.0, 0.0), (2.0, 0.5)])
def test_gradients_are_finite_for_steep_and_boxy_profiles(dtype, n, c0):
    """Quadrature nodes at the centre of a cusp must not produce 0 * inf in derivatives."""
    model = galprof.load_model({"components": {
        "b": {"profile": "sersic", "x0": 20.3, "y0": 21.7, "mag": -5.0, "re": 3.0, "n": n, "q": 0.7, "pa": 20.0,
              "c0": {"value": c0, "fixed": c0 == 0}},
        "d": {"profile": "expdisk", "x0": 20.0, "y0": 21.0, "mag": -5.0, "rs": 5.0, "q": 0.5}}})
    for psf in (gaussian_psf(41, 1.5), None):
        r = galprof.Renderer(model, [(40, 40)], psf, dtype=dtype)
        v = {k: t.clone().requires_grad_(True) for k, t in r.values().items()}
        grads = torch.autograd.grad(((r(v, check=False) - 1) ** 2).sum(), list(v.values()), allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in grads)
        fixed = {k: t.detach() for k, t in v.items()}
        jac = torch.func.jacfwd(lambda re, r=r, fixed=fixed: r({**fixed, "b.re": re}, check=False))(fixed["b.re"])
        assert torch.isfinite(jac).all()


def test_point_sources_outside_the_grid_do_not_wrap_around():
    psf = gaussian_psf(11, 1.2)
    for x0, expected in [(5.0, 1.0), (40.0, 0.0), (35.0, 0.0), (-20.0, 0.0)]:
        model = galprof.load_model({"components": {"s": {"profile": "psf", "x0": x0, "y0": 5.0, "mag": 0.0}}})
        assert galprof.render(model, (10, 10), psf).sum() == pytest.approx(expected, abs=1e-3)


def test_boxiness_needs_a_free_or_nonzero_c0_in_the_model():
    model = sersic_model()
    r = galprof.Renderer(model, [(20, 20)])
    values = r.values()
    values["g.c0"] = torch.tensor([0.5], dtype=torch.float64)
    with pytest.raises(galprof.ParameterError, match="c0 is fixed at 0"):
        r(values)


@pytest.mark.parametrize("kind,k", [("star", 1), ("optical", 2)])
def test_shift_derivatives_are_the_derivatives_of_the_render(kind, k):
    """The Fourier-space shift derivatives of a Sérsic galaxy and of a point source against
    central differences of the render (centres away from half-integer cells, where the refined
    windows would move between the two renders)."""
    size = 21 * k if k % 2 else 21 * k + 1
    c = size // 2
    y, x = np.mgrid[0:size, 0:size] / k
    psf = np.exp(-((x - c / k) ** 2 + (y - c / k) ** 2) / (2 * 1.6**2))
    m = galprof.load_model({"components": {"g": {"profile": "sersic", "x0": 20.3, "y0": 19.6, "mag": 0.0, "re": 2.5,
                                                 "n": 2.5, "q": 0.5, "pa": 35.0},
                                           "p": {"profile": "psf", "x0": 11.2, "y0": 29.4, "mag": 1.0}}})
    r = galprof.Renderer(m, [(40, 40), (36, 44)], psf / psf.sum(), psf_kind=kind, psf_oversampling=k)
    assert r.shift_derivatives_ok
    vals = {key: v.clone() for key, v in r.values().items()}
    vals["g.x0"] = torch.tensor([20.3, 22.15], dtype=torch.float64)
    for comp in ("g", "p"):
        _, dx, dy = r(vals, components=[comp], shift_derivatives=True)
        for axis, d in (("x0", dx), ("y0", dy)):
            h = 1e-5
            up, down = dict(vals), dict(vals)
            up[f"{comp}.{axis}"] = vals[f"{comp}.{axis}"] + h
            down[f"{comp}.{axis}"] = vals[f"{comp}.{axis}"] - h
            fd = (r(up, components=[comp]) - r(down, components=[comp])) / (2 * h)
            err = (d - fd).abs().amax(dim=(1, 2)) / fd.abs().amax(dim=(1, 2))
            assert (err < 2e-3).all(), (comp, axis, err)
    with pytest.raises(ModelError):
        galprof.Renderer(m, [(40, 40)], gaussian_psf(sigma=0.3))(shift_derivatives=True)


def test_shift_derivatives_with_a_sharp_band_limited_psf():
    """A 2 px FWHM PSF still counts as band-limited, and the core's mirror frequencies near
    Nyquist then matter: the shift derivatives take them into account (before the fold)."""
    psf = gaussian_psf(size=25, sigma=2.0 / 2.3548)
    m = galprof.load_model({"components": {"g": {"profile": "sersic", "x0": 20.3, "y0": 19.6, "mag": 0.0,
                                                 "re": 1.0, "n": 4.0, "q": 0.5, "pa": 35.0}}})
    r = galprof.Renderer(m, [(40, 40)], psf)
    assert r.shift_derivatives_ok
    vals = {key: v.clone() for key, v in r.values().items()}
    _, dx, dy = r(vals, shift_derivatives=True)
    for axis, d in (("x0", dx), ("y0", dy)):
        up, down = dict(vals), dict(vals)
        up[f"g.{axis}"] = vals[f"g.{axis}"] + 1e-5
        down[f"g.{axis}"] = vals[f"g.{axis}"] - 1e-5
        fd = (r(up) - r(down)) / 2e-5
        assert float((d - fd).abs().max() / fd.abs().max()) < 2e-3, axis


def test_stencil_only_for_smooth_profiles_and_not_too_flat_galaxies():
    """The default base rule keeps Gauss–Legendre cells for truncated profiles (Ferrer, King)
    and for galaxies flatter than q = 0.15, galaxy by galaxy in a batch; the stencil elsewhere."""
    from galprof import RenderOptions

    psf = gaussian_psf(size=25, sigma=1.6)
    specs = {"ferrer": {"rout": 15.0, "alpha": 0.5, "beta": 1.0}, "king": {"rc": 3.0, "rt": 15.0, "alpha": 0.5},
             "sersic": {"re": 8.0, "n": 1.0}}
    for prof, par in specs.items():
        m = galprof.load_model({"components": {"g": {"profile": prof, "x0": 30.3, "y0": 31.7, "mag": 0.0,
                                                     "q": 0.5, "pa": 30.0, **par}}})
        r = galprof.Renderer(m, [(60, 60)] * 2, psf)
        vals = {key: v.clone() for key, v in r.values().items()}
        vals["g.q"] = torch.tensor([0.05, 0.5], dtype=torch.float64)
        auto = r(vals)
        gauss = galprof.Renderer(m, [(60, 60)] * 2, psf, options=RenderOptions(base_rule="gauss"))(vals)
        stencil = galprof.Renderer(m, [(60, 60)] * 2, psf, options=RenderOptions(base_rule="stencil"))(vals)
        assert torch.equal(auto[0], gauss[0]), prof                   # q = 0.05: Gauss–Legendre
        assert torch.equal(auto[1], (stencil if prof == "sersic" else gauss)[1]), prof
        alone = r.__class__(m, [(60, 60)], psf)({k: v[1:] for k, v in vals.items()})
        assert float((alone[0] - auto[1]).abs().max()) <= 1e-13 * float(auto[1].abs().max()), prof
