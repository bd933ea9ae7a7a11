"""Batched Levenberg–Marquardt fits: recovery of noiseless GalSim galaxies, bad input in a batch."""

import math

import numpy as np
import pytest

import galprof
from galprof import Flag

galsim = pytest.importorskip("galsim")

GSP = galsim.GSParams(folding_threshold=1e-4, maxk_threshold=1e-5, kvalue_accuracy=1e-8)
MOFFAT = galsim.Moffat(beta=4.5, fwhm=3.5, gsparams=GSP)
SIZE = 48
TRUTHS = [dict(x0=24.3, y0=23.8, re=3.0, n=2.5, q=0.6, pa=30.0, flux=2000.0),
          dict(x0=23.7, y0=24.4, re=6.0, n=1.0, q=0.4, pa=-50.0, flux=5000.0),
          dict(x0=24.1, y0=24.0, re=1.5, n=4.0, q=0.8, pa=80.0, flux=1000.0)]
START = {"zeropoint": 0.0, "components": {"g": {"profile": "sersic", "x0": 24.0, "y0": 24.0, "mag": -8.0,
                                                "re": 4.0, "n": 2.0, "q": 0.7, "pa": 10.0}}}


def galsim_image(t):
    g = galsim.Sersic(t["n"], half_light_radius=t["re"] * math.sqrt(t["q"]), flux=t["flux"], gsparams=GSP)
    g = g.shear(q=t["q"], beta=(t["pa"] + 90) * galsim.degrees)
    im = galsim.ImageD(SIZE, SIZE, scale=1.0)
    galsim.Convolve(g, MOFFAT, gsparams=GSP).drawImage(image=im, center=galsim.PositionD(t["x0"], t["y0"]))
    return im.array


def psf_image(kind):
    obj = MOFFAT if kind == "optical" else galsim.Convolve(MOFFAT, galsim.Pixel(1.0), gsparams=GSP)
    return obj.drawImage(nx=31, ny=31, scale=1.0, method="no_pixel").array


@pytest.mark.parametrize("kind", ["star", "optical"])
def test_noiseless_galsim_galaxies_are_recovered(kind):
    images = [galsim_image(t) for t in TRUTHS]
    sigmas = [np.full((SIZE, SIZE), 0.01)] * len(TRUTHS)
    res = galprof.fit(galprof.load_model(START), images, sigmas, psf=psf_image(kind), psf_kind=kind,
                      initial={"g.pa": [20.0, -40.0, 70.0]})
    assert (res.status == 0).all(), res.messages
    for i, t in enumerate(TRUTHS):
        v = {k: res.values[f"g.{k}"][i] for k in ("x0", "y0", "mag", "re", "n", "q", "pa")}
        assert abs(v["re"] / t["re"] - 1) < 3e-3
        assert abs(v["n"] / t["n"] - 1) < 3e-3
        assert abs(v["q"] / t["q"] - 1) < 1e-3
        assert abs(v["mag"] + 2.5 * math.log10(t["flux"])) < 2e-3
        assert abs(v["x0"] - t["x0"]) < 0.01 and abs(v["y0"] - t["y0"]) < 0.01
        assert all(np.isfinite(res.errors[f"g.{k}"][i]) for k in ("x0", "y0", "mag", "re", "n", "q", "pa"))


def test_bad_galaxies_are_flagged_and_do_not_disturb_the_others():
    good = [galsim_image(t) for t in TRUTHS[:2]]
    psf = psf_image("star")
    sig = np.full((SIZE, SIZE), 0.01)
    alone = galprof.fit(galprof.load_model(START), good, [sig, sig], psf=psf)
    nan_image = np.full((SIZE, SIZE), np.nan)
    zero_psf = np.zeros_like(psf)
    images = [good[0], nan_image, good[1], good[0]]
    res = galprof.fit(galprof.load_model(START), images, [sig] * 4, psf=[psf, psf, psf, zero_psf],
                      initial={"g.re": [4.0, 4.0, 4.0, 4.0], "g.n": [2.0, 2.0, 2.0, 50.0]})
    assert res.status.tolist()[1] == 3 and res.flags[1] & Flag.NO_DATA
    assert res.status.tolist()[3] == 3 and res.flags[3] & Flag.BAD_PSF and res.flags[3] & Flag.BAD_START
    for i, j in [(0, 0), (2, 1)]:
        for key in res.keys:
            np.testing.assert_allclose(res.values[key][i], alone.values[key][j], rtol=1e-10, atol=1e-10)
    table = res.to_table()
    assert "no usable pixel" in table["message"][1] and table["status"][1] == "bad_input"
    assert "g.n = 50 is not inside its bounds" in table["message"][3] and "sums to 0" in table["message"][3]
    assert {"g_re", "g_re_err", "chi2", "dof", "chi2_nu", "n_iter", "status", "flags"} <= set(table.colnames)


def test_finite_difference_jacobian_gives_the_same_fit():
    images = [galsim_image(TRUTHS[0])]
    sig = [np.full((SIZE, SIZE), 0.01)]
    psf = psf_image("star")
    a = galprof.fit(galprof.load_model(START), images, sig, psf=psf)
    b = galprof.fit(galprof.load_model(START), images, sig, psf=psf, jacobian="finite-difference")
    for key in a.free:
        np.testing.assert_allclose(b.values[key], a.values[key], rtol=1e-7, atol=1e-7)
        np.testing.assert_allclose(b.errors[key], a.errors[key], rtol=1e-4)


BULGE_DISK = {"zeropoint": 0.0, "components": {
    "bulge": {"profile": "sersic", "x0": 24.0, "y0": 24.0, "mag": -7.0, "re": 2.0, "n": 3.0, "q": 0.8, "pa": 20.0},
    "disk": {"profile": "expdisk", "x0": {"tie": "bulge.x0"}, "y0": {"tie": "bulge.y0"}, "mag": -8.0, "rs": 5.0,
             "q": 0.5, "pa": 40.0},
    "sky": {"profile": "sky", "sky": 0.0}}}


def test_components_sum_to_the_model_and_ties_reach_every_component():
    from galprof.render import Renderer

    model = galprof.load_model(BULGE_DISK)
    r = Renderer(model, [(SIZE, SIZE)] * 2, psf_image("star"))
    values = {k: v.clone() for k, v in r.values().items()}
    values["sky.sky"] = values["sky.sky"] + 0.3
    parts = sum(r(values, components=[c]) for c in ("bulge", "disk", "sky"))
    full = r(values)
    assert float((parts - full).abs().max()) <= 1e-12 * float(full.abs().max())
    layout = model.layout(2)
    assert layout.reached_by("bulge.x0") == {"bulge.x0", "disk.x0"}
    assert layout.reached_by("disk.rs") == {"disk.rs"}
    with pytest.raises(galprof.errors.ParameterError, match="halo"):
        r(values, components=["halo"])


SERSIC_SKY = {"zeropoint": 0.0, "components": {"g": START["components"]["g"], "sky": {"profile": "sky", "sky": 0.1}}}


@pytest.mark.parametrize("spec, groups", [(BULGE_DISK, 4), (SERSIC_SKY, 2), (START, 1)])
def test_grouped_finite_differences_give_the_whole_model_jacobian(spec, groups, monkeypatch):
    """A column that renders only the components its parameter reaches (bulge, disk, the tied
    centre reaching both, the sky), or none for a lone component's magnitude (its image scaled),
    equals the column from rendering the whole model; masked pixels (NaN data) included. (The
    centre's columns by shift derivatives are left out here: they are not finite differences;
    test_fit_options.py checks them.)"""
    import torch

    from galprof.fitting import FitProblem, make_batch
    from galprof.render import Renderer

    monkeypatch.setattr(FitProblem, "_shift_plan", lambda self: False)

    model = galprof.load_model(spec)
    rng = np.random.default_rng(2)
    images = [rng.normal(1.0, 0.1, (SIZE, SIZE)) for _ in range(2)]
    images[1][:5, :7] = np.nan
    batch = make_batch(images, [np.full((SIZE, SIZE), 0.1)] * 2)
    problem = FitProblem(Renderer(model, batch.shapes, psf_image("star")), model.layout(2), batch,
                         jacobian="finite-difference")
    assert problem._fd_groups is not None and len(problem._fd_groups) == groups
    z = problem.layout.initial()
    index = torch.arange(2)
    A, g, chi2 = problem.normal_equations(z, index)
    problem._fd_groups = None
    A0, g0, chi20 = problem.normal_equations(z, index)
    scale = torch.sqrt(torch.diagonal(A0, dim1=1, dim2=2))
    np.testing.assert_allclose((A / (scale[:, :, None] * scale[:, None, :])).numpy(),
                               (A0 / (scale[:, :, None] * scale[:, None, :])).numpy(), atol=1e-6)
    np.testing.assert_allclose(g.numpy(), g0.numpy(), rtol=1e-5, atol=1e-6 * float(g0.abs().max()))
    assert torch.equal(chi2, chi20)


@pytest.mark.slow
def test_bulge_disk_fit_with_grouped_finite_differences_equals_autodiff():
    """Finite differences render only the components a column reaches (bulge, disk, both for the
    shared centre, the sky on its own): the fit and errors equal forward-mode autodiff's."""
    bulge = galsim.Sersic(3.0, half_light_radius=2.2 * math.sqrt(0.8), flux=800.0, gsparams=GSP)
    bulge = bulge.shear(q=0.8, beta=(25.0 + 90) * galsim.degrees)
    disk = galsim.Exponential(scale_radius=5.5 * math.sqrt(0.5), flux=2500.0, gsparams=GSP)
    disk = disk.shear(q=0.5, beta=(35.0 + 90) * galsim.degrees)
    im = galsim.ImageD(SIZE, SIZE, scale=1.0)
    galsim.Convolve(bulge + disk, MOFFAT, gsparams=GSP).drawImage(image=im, center=galsim.PositionD(24.3, 23.9))
    rng = np.random.default_rng(4)
    image = im.array + 0.5 + rng.normal(0, 0.05, im.array.shape)
    sig = [np.full((SIZE, SIZE), 0.05)]
    model = galprof.load_model(BULGE_DISK)
    start = {"bulge.re": 2.4, "bulge.pa": 30.0, "disk.rs": 5.0, "disk.pa": 30.0, "sky.sky": 0.4}
    a = galprof.fit(model, [image], sig, psf=psf_image("star"), jacobian="autodiff", initial=start)
    b = galprof.fit(model, [image], sig, psf=psf_image("star"), jacobian="finite-difference", initial=start)
    assert a.status[0] == 0 and b.status[0] == 0
    for key in a.free:
        assert abs(b.values[key][0] - a.values[key][0]) < 1e-3 * a.errors[key][0], key
        np.testing.assert_allclose(b.errors[key], a.errors[key], rtol=1e-3)


def test_finite_difference_columns_of_parameters_at_their_bounds_are_their_derivatives():
    """A parameter whose transform is saturated (n pinned at the top of its interval, r_e at its
    lower bound) still gets its true column: the finite-difference J^T J and J^T r equal forward-
    mode autodiff's (a step in the optimiser's space would move it by less than the model's
    rounding, and leave its column and gradient sign to noise)."""
    import torch

    from galprof.fitting import FitProblem, make_batch
    from galprof.render import Renderer

    spec = {"zeropoint": 0.0, "components": {"g": dict(START["components"]["g"],
                                                        n={"value": 1.9, "bounds": [0.3, 2.0]},
                                                        re={"value": 3.0, "bounds": [1.0, None]})}}
    model = galprof.load_model(spec)
    rng = np.random.default_rng(8)
    batch = make_batch([galsim_image(TRUTHS[0]) + rng.normal(0, 0.5, (SIZE, SIZE))], [np.full((SIZE, SIZE), 0.5)])
    problems = {j: FitProblem(Renderer(model, batch.shapes, psf_image("star")), model.layout(1), batch, jacobian=j)
                for j in ("finite-difference", "autodiff")}
    fd = problems["finite-difference"]
    z = fd.layout.initial()
    free = list(fd.layout.free)
    z[0, free.index("g.n")] = 22.0          # n = 2 - 5e-10: saturated
    z[0, free.index("g.re")] = -21.0        # r_e = 1 + 8e-10: saturated
    assert fd.at_bound(z)[0, [free.index("g.n"), free.index("g.re")]].all()
    index = torch.arange(1)
    A, g, _ = fd.normal_equations(z, index)
    A0, g0, _ = problems["autodiff"].normal_equations(z, index)
    for key in ("g.n", "g.re"):
        j = free.index(key)
        assert abs(float(g0[0, j])) > 0
        np.testing.assert_allclose(float(g[0, j]), float(g0[0, j]), rtol=1e-4)
        np.testing.assert_allclose(A[0, j].numpy(), A0[0, j].numpy(), rtol=1e-3,
                                   atol=1e-6 * float(torch.sqrt(A0[0, j, j] * torch.diagonal(A0[0]).max())))


def test_finite_difference_steps_stay_inside_every_interval():
    """The physical step of a bounded parameter never leaves its interval, however narrow (an
    interval narrower than the step gave NaN columns in float32, and NaN fits), and a fit with
    n bounded to [1.9995, 2.0005] in float32 ends finite."""
    import torch

    from galprof.fitting.problem import finite_difference_steps
    from galprof.params import Interval, LowerBound, UpperBound

    for dtype in (torch.float32, torch.float64):
        z = torch.tensor([[-30.0, -3.0, 0.0, 3.0, 30.0]], dtype=dtype).T.repeat(1, 4)
        transforms = [Interval(1000.0, 1000.5), Interval(-1e-4, 1e-4), LowerBound(0.05), UpperBound(1.0)]
        zs, h = finite_difference_steps(z, list(enumerate(transforms)))
        for j, t in enumerate(transforms):
            x = t.forward(zs[:, j])
            assert torch.isfinite(zs[:, j]).all() and not torch.isnan(h[:, j]).any(), (dtype, t)
            if isinstance(t, Interval):
                assert ((x >= t.lo) & (x <= t.hi)).all(), (dtype, t)
    spec = {"zeropoint": 0.0, "components": {"g": dict(START["components"]["g"],
                                                        n={"value": 2.0, "bounds": [1.9995, 2.0005]})}}
    images = [galsim_image(t) + np.random.default_rng(3).normal(0, 0.5, (SIZE, SIZE)) for t in TRUTHS]
    res = galprof.fit(galprof.load_model(spec), images, [np.full((SIZE, SIZE), 0.5)] * 3, psf=psf_image("star"),
                      dtype=torch.float32)
    assert (res.status == 0).all() and np.isfinite(res.chi2).all()


def test_a_sky_in_raw_counts_is_not_held_to_one_count_per_iteration():
    """Images in large units (a sky of 20,000 counts, sigma 500): a sky started 5,000 counts off
    converges to the fit started at the truth. Its step per iteration is 10 median sigma, not one
    data unit (which left these fits at the iteration cap, 50 counts from their start)."""
    rng = np.random.default_rng(3)
    unit = 1000.0
    images = [(galsim_image(t) + 20.0 + rng.normal(0, 0.5, (SIZE, SIZE))) * unit for t in TRUTHS]
    sig = [np.full((SIZE, SIZE), 0.5 * unit)] * 3
    fits = []
    for s0 in (15.0, 20.0):
        m = galprof.load_model({"zeropoint": 0.0, "components": {
            "g": dict(START["components"]["g"], mag=-8.0 - 2.5 * math.log10(unit)),
            "s": {"profile": "sky", "sky": s0 * unit}}})
        fits.append(galprof.fit(m, images, sig, psf=psf_image("star"), initial={"g.pa": [20.0, -40.0, 70.0]}))
    far, near = fits
    assert (far.status == 0).all() and (near.status == 0).all()
    for k in near.free:
        assert np.all(np.abs(far.values[k] - near.values[k]) <= 0.01 * near.errors[k]), k
