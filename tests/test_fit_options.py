"""Fitting options: the Cash statistic, first-order optimisers, restarts and the bootstrap."""

import math

import numpy as np
import pytest
import torch

import galprof
from galprof import Flag
from galprof.fitting import poisson_deviance_residuals

galsim = pytest.importorskip("galsim")
scipy_special = pytest.importorskip("scipy.special")

SIZE = 40
GSP = galsim.GSParams(folding_threshold=1e-4, maxk_threshold=1e-5)
MOFFAT = galsim.Moffat(beta=4.5, fwhm=3.0, gsparams=GSP)
PSF = galsim.Convolve(MOFFAT, galsim.Pixel(1.0), gsparams=GSP).drawImage(nx=25, ny=25, scale=1.0,
                                                                         method="no_pixel").array


def galaxy(flux=800.0, re=3.0, n=1.5, q=0.6, pa=30.0, x0=20.4, y0=20.7):
    g = galsim.Sersic(n, half_light_radius=re * math.sqrt(q), flux=flux, gsparams=GSP)
    g = g.shear(q=q, beta=(pa + 90) * galsim.degrees)
    im = galsim.ImageD(SIZE, SIZE, scale=1.0)
    galsim.Convolve(g, MOFFAT, gsparams=GSP).drawImage(image=im, center=galsim.PositionD(x0, y0))
    return im.array


def model(**extra):
    comp = {"profile": "sersic", "x0": 20.5, "y0": 20.5, "mag": -7.0, "re": 4.0, "n": 2.0, "q": 0.7, "pa": 20.0}
    comps = {"g": comp}
    comps.update(extra)
    return galprof.load_model({"zeropoint": 0.0, "components": comps})


@pytest.fixture(scope="module")
def noisy():
    rng = np.random.default_rng(7)
    truth = galaxy()
    sigma = np.sqrt(1.0 + truth / 4.0)
    images = [truth + rng.normal(size=truth.shape) * sigma for _ in range(2)]
    return images, [sigma, sigma]


def test_poisson_deviance_residuals_square_to_the_cash_terms():
    rng = np.random.default_rng(1)
    m = rng.uniform(0.05, 20, 4000)
    d = rng.poisson(m).astype(float)
    d[:10] = m[:10] * (1 + 1e-5)                       # near m = d: the series branch
    r = poisson_deviance_residuals(torch.tensor(m), torch.tensor(d)).numpy()
    expected = 2 * (m - d + scipy_special.xlogy(d, d / m))
    np.testing.assert_allclose(r ** 2, expected, rtol=1e-9, atol=1e-14)
    assert np.all(np.sign(r[np.abs(m - d) > 1e-3]) == np.sign((m - d)[np.abs(m - d) > 1e-3]))
    # smooth at m = d: derivative 1/sqrt(d)
    mt = torch.tensor([4.0, 9.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(poisson_deviance_residuals(mt, torch.tensor([4.0, 9.0])).sum(), mt)
    np.testing.assert_allclose(g.numpy(), [0.5, 1 / 3], rtol=1e-12)


def test_cash_fit_of_a_flat_sky_is_the_poisson_maximum_likelihood():
    rng = np.random.default_rng(3)
    counts = rng.poisson(2.5, size=(32, 32)).astype(float)
    sky = galprof.load_model({"components": {"s": {"profile": "sky", "sky": 1.0}}})
    cash = galprof.fit(sky, [counts], statistic="cash")
    assert cash.status[0] == 0
    # the ML estimate of a constant Poisson mean is the sample mean (analytic)
    np.testing.assert_allclose(cash.values["s.sky"][0], counts.mean(), rtol=1e-5)  # LM tolerance
    # its error: sqrt(mean / N) from the Fisher information
    np.testing.assert_allclose(cash.errors["s.sky"][0], math.sqrt(counts.mean() / counts.size), rtol=1e-4)
    fd = galprof.fit(sky, [counts], statistic="cash", jacobian="finite-difference")
    np.testing.assert_allclose(fd.errors["s.sky"][0], cash.errors["s.sky"][0], rtol=1e-5)
    # chi2 with sigma^2 = max(data, 1) is biased low, as is well known
    chi2 = galprof.fit(sky, [counts], [np.sqrt(np.maximum(counts, 1.0))])
    assert chi2.values["s.sky"][0] < counts.mean() - 0.1


def test_cash_fit_recovers_a_low_count_galaxy():
    rng = np.random.default_rng(11)
    truth = galaxy(flux=600.0) + 2.0
    counts = rng.poisson(truth).astype(float)
    m = model(s={"profile": "sky", "sky": 1.5})
    res = galprof.fit(m, [counts], psf=PSF, statistic="cash")
    assert res.status[0] == 0 and res.statistic == "cash"
    for key, value in (("g.re", 3.0), ("g.n", 1.5), ("g.q", 0.6), ("s.sky", 2.0), ("g.mag", -2.5 * math.log10(600))):
        assert abs(res.values[key][0] - value) < 3.5 * res.errors[key][0], key
    # negative data cannot be Poisson counts: that galaxy is not fitted, the other is
    both = galprof.fit(m, [counts, counts - 5.0], psf=PSF, statistic="cash")
    assert both.status.tolist() == [0, 3] and both.flags[1] & Flag.NO_DATA
    assert "Cash statistic needs counts" in both.messages[1]
    np.testing.assert_allclose(both.values["g.re"][0], res.values["g.re"][0], rtol=1e-10)


@pytest.mark.parametrize("optimizer", ["adam", pytest.param("diffgrad", marks=pytest.mark.slow)])
def test_first_order_optimisers_reach_the_levenberg_marquardt_optimum(noisy, optimizer):
    images, sigmas = noisy[0][:1], noisy[1][:1]
    lm = galprof.fit(model(), images, sigmas, psf=PSF)
    first = galprof.fit(model(), images, sigmas, psf=PSF, optimizer=optimizer,
                        options=galprof.AdamOptions(max_iter=1500))
    assert (lm.status == 0).all()
    np.testing.assert_allclose(first.chi2, lm.chi2, atol=0.05)
    for key in lm.free:
        assert np.all(np.abs(first.values[key] - lm.values[key]) < 0.2 * lm.errors[key]), key
    assert (first.n_iter > 50).all() and (first.status == 0).all()


def test_restarts_never_end_worse(noisy):
    images, sigmas = noisy
    bad = {"g.re": [15.0, 1.0], "g.n": [6.0, 0.6]}
    one = galprof.fit(model(), images, sigmas, psf=PSF, initial=bad)
    more = galprof.fit(model(), images, sigmas, psf=PSF, initial=bad, restarts=2, seed=4)
    assert np.all(more.chi2 <= one.chi2 + 1e-9)
    assert np.all(more.n_iter > one.n_iter)


def test_bootstrap_errors_agree_with_the_covariance(noisy):
    images, sigmas = noisy
    nan = np.full_like(images[0], np.nan)
    res = galprof.fit(model(), [images[0], nan], [sigmas[0], sigmas[0]], psf=PSF, uncertainty="bootstrap",
                      n_bootstrap=40, seed=2)
    assert res.uncertainty == "bootstrap" and res.status.tolist() == [0, 3]
    for key in res.free:
        ratio = res.errors[key][0] / res.errors_covariance[key][0]
        assert 0.65 < ratio < 1.45, (key, ratio)
        lo, hi = res.percentiles[key][0]
        assert lo < res.values[key][0] < hi
        assert np.isnan(res.errors[key][1])
    assert res.bootstrap_samples["g.re"].shape == (2, 40)
    t = res.to_table()
    assert {"g_re_p16", "g_re_p84", "g_re_err"} <= set(t.colnames) and t.meta["uncertainty"] == "bootstrap"
    # centres held at the best fit: their samples do not vary, the others do
    fixed = galprof.fit(model(), images[:1], sigmas[:1], psf=PSF, uncertainty="bootstrap", n_bootstrap=16,
                        seed=2, bootstrap_fixed=("g.x0", "g.y0"))
    assert np.isnan(fixed.errors["g.x0"][0]) and np.isfinite(fixed.errors["g.re"][0])
    np.testing.assert_allclose(fixed.bootstrap_samples["g.x0"][0], fixed.values["g.x0"][0], rtol=1e-12)


def test_bad_options_are_errors():
    with pytest.raises(ValueError, match="optimizer"):
        galprof.fit(model(), [np.zeros((8, 8))], optimizer="bfgs")
    with pytest.raises(ValueError, match="uncertainty"):
        galprof.fit(model(), [np.zeros((8, 8))], uncertainty="jackknife")
    with pytest.raises(ValueError, match="statistic"):
        galprof.fit(model(), [np.zeros((8, 8))], statistic="poisson")


def test_newton_decrement_stop_moves_fits_by_a_negligible_amount():
    """Stopping on the Newton decrement (before the step that would only confirm convergence)
    gives the fits of the plain chi2-change test to within 0.01 sigma, with one galaxy whose n is
    pinned at its bound and with a model without free parameters; it saves iterations."""
    from galprof.fitting import LMOptions

    rng = np.random.default_rng(3)
    truths = [dict(re=3.0, n=1.5), dict(re=2.0, n=4.0), dict(re=5.0, n=0.8, q=0.4), dict(re=4.0, n=2.5, pa=-60)]
    images = [galaxy(**t) + rng.normal(0, 1.0, (SIZE, SIZE)) for t in truths]
    sig = [np.ones((SIZE, SIZE))] * len(images)
    m = galprof.load_model({"zeropoint": 0.0, "components": {"g": {
        "profile": "sersic", "x0": 20.5, "y0": 20.5, "mag": -7.0, "re": 4.0,
        "n": {"value": 2.0, "bounds": [0.3, 3.0]}, "q": 0.7, "pa": 20.0}}})
    on, off = (galprof.fit(m, images, sig, psf=PSF, options=LMOptions(decrement=d)) for d in (True, False))
    assert (on.status == 0).all() and (off.status == 0).all()
    assert on.values["g.n"][1] > 2.99                        # n = 4 galaxy: pinned at the bound
    # within 0.01 sigma, or further along than the plain test (lower chi2: the galaxy pinned at
    # its n bound creeps along a flat valley, where the plain test stops earlier)
    further = on.chi2 < off.chi2 - 1e-5
    for k in on.free:
        # (a galaxy pinned at a bound may have no covariance, flag SINGULAR, in either run)
        sigma = np.fmax(on.errors[k], off.errors[k])
        tol = np.where(np.isfinite(sigma), 0.01 * sigma, 1e-5 * np.abs(off.values[k]))
        assert np.all((np.abs(on.values[k] - off.values[k]) <= tol) | further), k
    assert further.sum() <= 1
    assert on.n_iter[~further].sum() < off.n_iter[~further].sum()
    fixed = galprof.load_model({"zeropoint": 0.0, "components": {"g": {
        "profile": "sersic", "x0": {"value": 20.4, "fixed": True}, "y0": {"value": 20.7, "fixed": True},
        "mag": {"value": -7.26, "fixed": True}, "re": {"value": 3.0, "fixed": True},
        "n": {"value": 1.5, "fixed": True}, "q": {"value": 0.6, "fixed": True}, "pa": {"value": 30.0, "fixed": True}}}})
    r = galprof.fit(fixed, images[:1], sig[:1], psf=PSF)
    assert r.status[0] == 0 and r.n_iter[0] == 0 and np.isfinite(r.chi2[0])


def test_shift_derivative_columns_give_the_finite_difference_fits(monkeypatch):
    """The centre's Jacobian columns taken from the model's Fourier-space shift derivatives
    (carried from the trial render) give the fits and errors of finite differences: same chi2,
    values within 0.01 sigma, errors within 1%; with a sky and a bounded, hence transformed, x0."""
    from galprof.fitting import problem as fp

    rng = np.random.default_rng(5)
    truths = [dict(re=3.0, n=1.5), dict(re=1.2, n=4.0, x0=19.8), dict(re=5.0, n=0.8, q=0.4)]
    images = [galaxy(**t) + 2.0 + rng.normal(0, 1.0, (SIZE, SIZE)) for t in truths]
    sig = [np.ones((SIZE, SIZE))] * len(images)
    m = galprof.load_model({"zeropoint": 0.0, "components": {
        "g": {"profile": "sersic", "x0": {"value": 20.5, "bounds": [15, 25]}, "y0": 20.5, "mag": -7.0, "re": 4.0,
              "n": 2.0, "q": 0.7, "pa": 20.0},
        "s": {"profile": "sky", "sky": 0.0}}})
    calls = []
    real = fp.FitProblem.residuals

    def spy(self, *a, **k):
        calls.append(bool(k.get("shift")))
        return real(self, *a, **k)

    monkeypatch.setattr(fp.FitProblem, "residuals", spy)
    on = galprof.fit(m, images, sig, psf=PSF)
    assert any(calls)                                     # the shift columns were carried
    monkeypatch.setattr(fp.FitProblem, "_shift_plan", lambda self: False)
    calls.clear()
    off = galprof.fit(m, images, sig, psf=PSF)
    assert not any(calls)
    assert (on.status == 0).all() and (off.status == 0).all()
    np.testing.assert_allclose(on.chi2, off.chi2, rtol=1e-7)
    for k in on.free:
        assert np.all(np.abs(on.values[k] - off.values[k]) <= 0.01 * off.errors[k]), k
        np.testing.assert_allclose(on.errors[k], off.errors[k], rtol=0.01, err_msg=k)


def test_covariance_reuses_the_solver_normal_matrix_only_where_it_is_at_the_optimum(monkeypatch):
    """Galaxies stopped by the Newton decrement leave J^T W J computed at their final point: the
    covariance takes it (no new Jacobian) and equals the one computed again."""
    import galprof.fitting.api as api
    from galprof.fitting import levenberg_marquardt

    rng = np.random.default_rng(11)
    truths = [dict(re=3.0, n=1.5), dict(re=2.0, n=3.0), dict(re=5.0, n=0.8, q=0.4)]
    images = [galaxy(**t) + rng.normal(0, 1.0, (SIZE, SIZE)) for t in truths]
    sig = [np.ones((SIZE, SIZE))] * len(images)
    seen = {}

    def keep(*a, **k):
        out = levenberg_marquardt(*a, **k)
        seen.update(a[4] if len(a) > 4 else k.get("state") or {})
        return out

    monkeypatch.setattr(api, "levenberg_marquardt", keep)
    reused = galprof.fit(model(), images, sig, psf=PSF)
    assert seen["fresh"].sum() >= 2          # (the others get theirs computed again)

    def stale(*a, **k):
        out = keep(*a, **k)
        st = a[4] if len(a) > 4 else k.get("state")
        st["fresh"] = torch.zeros_like(st["fresh"])
        return out

    monkeypatch.setattr(api, "levenberg_marquardt", stale)
    again = galprof.fit(model(), images, sig, psf=PSF)
    for k in reused.free:
        np.testing.assert_allclose(reused.errors[k], again.errors[k], rtol=1e-6, err_msg=k)
        np.testing.assert_array_equal(reused.values[k], again.values[k])


def test_start_deep_in_the_tail_of_a_bound_returns_inside_quickly():
    """A start a hair below an upper bound (n = 2.9999 of 3, its transform saturated) when the
    optimum is well inside: the fit returns to the fit from n = 2 (within 0.01 sigma) in a few
    iterations more, since the bounded parameter's long step back in is capped on its own instead of
    shrinking the whole step."""
    rng = np.random.default_rng(5)
    truths = [dict(re=3.0, n=1.5), dict(re=4.0, n=1.0, q=0.5), dict(re=2.5, n=2.0, pa=40)]
    images = [galaxy(**t) + rng.normal(0, 1.0, (SIZE, SIZE)) for t in truths]
    sig = [np.ones((SIZE, SIZE))] * len(images)
    fits = []
    for n0 in (2.0, 2.9999):
        m = galprof.load_model({"zeropoint": 0.0, "components": {"g": {
            "profile": "sersic", "x0": 20.5, "y0": 20.5, "mag": -7.0, "re": 4.0,
            "n": {"value": n0, "bounds": [0.3, 3.0]}, "q": 0.7, "pa": 20.0}}})
        fits.append(galprof.fit(m, images, sig, psf=PSF))
    near, far = fits
    assert (near.status == 0).all() and (far.status == 0).all()
    for k in near.free:
        assert np.all(np.abs(far.values[k] - near.values[k]) <= 0.01 * near.errors[k]), k
    assert np.median(far.n_iter) <= np.median(near.n_iter) + 4


def test_start_at_a_round_shape_turns_to_the_true_one():
    """A start at q = 0.99999, where the position angle barely changes the model (and q's
    transform is saturated): the fits equal those from q = 0.7 within 0.01 sigma (PA modulo 180).
    The position angle's long step in that nearly flat direction is capped on its own instead of
    scaling every other parameter's step down to nothing (which left such fits at q = 1, at the
    iteration cap, 230 to 1040 above the optimum's chi2)."""
    rng = np.random.default_rng(11)
    truths = [dict(q=0.8, pa=-40), dict(q=0.7, pa=60, n=3.0), dict(q=0.9, pa=10, re=4.0), dict(q=0.85, pa=80, n=1.0)]
    images = [galaxy(**t) + rng.normal(0, 1.0, (SIZE, SIZE)) for t in truths]
    sig = [np.ones((SIZE, SIZE))] * len(images)
    fits = [galprof.fit(galprof.load_model({"zeropoint": 0.0, "components": {"g": {
        "profile": "sersic", "x0": 20.5, "y0": 20.5, "mag": -7.0, "re": 4.0, "n": 2.0, "q": q0, "pa": 20.0}}}),
        images, sig, psf=PSF) for q0 in (0.7, 0.99999)]
    near, far = fits
    assert (near.status == 0).all() and (far.status == 0).all()
    for k in near.free:
        d = far.values[k] - near.values[k]
        if k == "g.pa":
            d = (d + 90.0) % 180.0 - 90.0
        assert np.all(np.abs(d) <= 0.01 * near.errors[k]), k


def test_fitted_position_angles_are_reported_in_the_half_open_interval():
    """pa and pa + 180 are the same ellipse: a galaxy at PA 100 (= -80), started at 95, is
    reported at -80 within its errors, its bootstrap refits gathered about that value (a small
    spread, not one of 180 degrees); a PA with bounds given by the user keeps them."""
    rng = np.random.default_rng(21)
    images = [galaxy(pa=100.0, q=0.5, flux=1500.0) + rng.normal(0, 1.0, (SIZE, SIZE)) for _ in range(2)]
    sig = [np.ones((SIZE, SIZE))] * 2
    spec = {"zeropoint": 0.0, "components": {"g": {
        "profile": "sersic", "x0": 20.5, "y0": 20.5, "mag": -7.0, "re": 4.0, "n": 2.0, "q": 0.6, "pa": 95.0}}}
    res = galprof.fit(galprof.load_model(spec), images, sig, psf=PSF, uncertainty="bootstrap", n_bootstrap=6, seed=1)
    pa = res.values["g.pa"]
    assert np.all((pa > -90) & (pa <= 90)), pa
    assert np.all(np.abs(pa + 80.0) < 3 * res.errors_covariance["g.pa"] + 0.5)
    assert np.all(res.errors["g.pa"] < 5.0) and np.all(np.abs(res.percentiles["g.pa"] - pa[:, None]) < 10.0)
    spec["components"]["g"]["pa"] = {"value": 95.0, "bounds": [0.0, 180.0]}
    bounded = galprof.fit(galprof.load_model(spec), images, sig, psf=PSF)
    assert np.all(np.abs(bounded.values["g.pa"] - 100.0) < 3 * bounded.errors["g.pa"] + 0.5)


class _Creeping:
    """A least-squares problem whose chi2 = 25 + 1/z creeps towards its infimum as z grows
    (residuals 1/sqrt(z) and 5): every step lowers chi2, by about 1/z^2."""

    dtype = torch.float64
    step_scale = torch.ones(1, dtype=torch.float64)

    def residuals(self, z, index):
        return torch.cat([z.clamp(min=1e-12).rsqrt(), torch.full_like(z, 5.0)], dim=1)

    def normal_equations(self, z, index, residuals=None):
        r = self.residuals(z, index)
        J = torch.cat([-0.5 * z.clamp(min=1e-12) ** -1.5, torch.zeros_like(z)], dim=1)[:, :, None]
        return J.transpose(1, 2) @ J, (J.transpose(1, 2) @ r[:, :, None])[:, :, 0], (r * r).sum(1)

    def at_bound(self, z, tol=1e-6):
        return torch.zeros_like(z, dtype=torch.bool)


def test_a_fit_creeping_along_a_flat_valley_stops_when_its_gains_fall_below_the_noise():
    """chi2 = 25 + 1/z: each step (capped at 1) lowers chi2 by about 1/z^2, more than the relative
    tolerance for thousands of iterations. The windowed test stops it once 20 iterations gain less
    than 0.01 (z about 45); without it the fit runs into the iteration cap."""
    from galprof import Status
    from galprof.fitting import LMOptions, levenberg_marquardt

    z0 = torch.tensor([[2.0], [5.0]], dtype=torch.float64)
    active = torch.ones(2, dtype=torch.bool)
    z, chi2, n_iter, status = levenberg_marquardt(_Creeping(), z0, active, LMOptions())
    assert (status == int(Status.CONVERGED)).all() and (n_iter < 100).all()
    assert torch.all(20.0 / z[:, 0] ** 2 < 0.01 * 1.5) and torch.all(chi2 - 25.0 < 0.05)
    z, chi2, n_iter, status = levenberg_marquardt(_Creeping(), z0, active, LMOptions(stall_window=0))
    assert (status == int(Status.MAX_ITER)).all() and (n_iter == 100).all()
