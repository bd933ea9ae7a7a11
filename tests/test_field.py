"""Fitting a whole field: every source its own component, a shared sky, windowed Jacobians."""

import numpy as np
import pytest
import torch
from scipy.special import gammaincinv

import galprof
from galprof.errors import DataError, ModelError
from galprof.field import FieldOptions, FieldProblem, fit_field, plan_windows, source_radii, split_model
from galprof.fitting.data import make_batch
from galprof.fitting.problem import FitProblem
from galprof.render import Renderer

galsim = pytest.importorskip("galsim")

ZP = 25.0
TEMPLATE = {"zeropoint": ZP, "components": {
    "g": {"profile": "sersic", "x0": 0, "y0": 0, "mag": 20, "re": {"value": 3, "bounds": [0.3, 50]},
          "n": {"value": 2, "bounds": [0.3, 8]}, "q": 0.7, "pa": 0},
    "sky": {"profile": "sky", "sky": 0}}}
NAMES = ["x0", "y0", "mag", "re", "n", "q", "pa"]


def galsim_field(seed, n_src=6, size=128, sky=10.0, noise=5.0):
    """A GalSim field of Sérsic galaxies (Moffat PSF, star-like PSF image), sky and Gaussian noise."""
    rng = np.random.default_rng(seed)
    psf_g = galsim.Moffat(beta=3.5, fwhm=3.0)
    psf = psf_g.drawImage(nx=25, ny=25, scale=1.0).array
    img = galsim.ImageD(size, size, scale=1.0)
    truth = []
    for _ in range(n_src):
        x, y = rng.uniform(20, size - 20, 2)
        re, n, q, pa = rng.uniform(2, 6), rng.uniform(0.8, 3.5), rng.uniform(0.4, 0.95), rng.uniform(-90, 90)
        flux = 10 ** rng.uniform(3.3, 4.2)
        g = galsim.Sersic(n=n, half_light_radius=re * np.sqrt(q), flux=flux)
        g = g.shear(q=q, beta=(pa + 90) * galsim.degrees)     # GalSim's angle is from +x
        galsim.Convolve(g, psf_g).drawImage(image=img, add_to_image=True, center=galsim.PositionD(x, y))
        truth.append((x, y, ZP - 2.5 * np.log10(flux), re, n, q, pa))
    truth = np.array(truth)
    data = img.array + sky + rng.normal(0, noise, img.array.shape)
    starts = {"g.x0": truth[:, 0] + rng.normal(0, 0.7, n_src), "g.y0": truth[:, 1] + rng.normal(0, 0.7, n_src),
              "g.mag": truth[:, 2] + rng.normal(0, 0.3, n_src), "g.re": truth[:, 3] * 1.3,
              "g.n": np.full(n_src, 2.0), "g.q": np.full(n_src, 0.7), "g.pa": truth[:, 6] + 15}
    return data, np.full(data.shape, noise), psf, truth, starts


def test_field_recovers_galsim_truth():
    data, sigma, psf, truth, starts = galsim_field(5)
    res = fit_field(galprof.load_model(TEMPLATE), data, sigma, psf=psf, sources=starts)
    t = res.to_table()
    assert set(t["status"]) == {"converged"}
    assert abs(t["chi2_nu"][0] - 1) < 0.05
    assert abs(t["sky_sky"][0] - 10.0) < 3 * t["sky_sky_err"][0]
    for j, name in enumerate(NAMES):
        pull = (np.asarray(t["g_" + name]) - truth[:, j]) / np.asarray(t["g_" + name + "_err"])
        assert np.all(np.abs(pull) < 4), (name, pull)
    # the model image is the sum of the sources and the sky: the residual is noise
    assert abs(np.nanstd(res.residual_image) / 5.0 - 1) < 0.05


def test_float32_field_agrees_with_float64():
    """A field rendered in float32 (state and sums in float64) gives the float64 fit within a
    small fraction of its errors."""
    data, sigma, psf, truth, starts = galsim_field(5)
    model = galprof.load_model(TEMPLATE)
    r64 = fit_field(model, data, sigma, psf=psf, sources=starts).result
    r32 = fit_field(model, data, sigma, psf=psf, sources=starts, dtype=torch.float32).result
    assert r32.status[0] == 0
    for name in NAMES:
        k = f"g.{name}"
        assert np.all(np.abs(r32.values[k] - r64.values[k]) < 0.05 * r64.errors[k]), name
        np.testing.assert_allclose(r32.errors[k], r64.errors[k], rtol=0.02)


def test_windowed_normal_equations_equal_the_dense_ones():
    """With every window covering the field, J^T J and J^T r assembled from windows and overlaps
    equal those of one model holding every source as its own component."""
    data, sigma, psf, truth, starts = galsim_field(2, n_src=4, size=64)
    model = galprof.load_model(TEMPLATE)
    template, sky = split_model(model)
    N = 4
    src = template.layout(N)
    for k, v in starts.items():
        src.set_values(k, torch.as_tensor(v))
    sky_l = sky.layout(1)
    sky_l.set_values("sky.sky", torch.tensor([9.0]))
    batch = make_batch([data], [sigma])
    # windows of 32 px: each source sees part of the field, and pairs overlap in part
    windows = plan_windows(starts["g.x0"], starts["g.y0"], np.full(N, 3.0), 12, data.shape,
                           FieldOptions(min_size=32, max_size=32))
    prob = FieldProblem(template, sky, src, sky_l, batch.images[0], batch.weights[0], windows, psf)
    assert prob._pairs, "the test needs overlapping windows"
    z = prob.pack(src.initial(), sky_l.initial())
    A, g, chi2 = prob.normal_equations(z)
    # the dense reference: one model with N Sérsic components + sky, every window's pixels only
    comps = {f"s{i}": dict(TEMPLATE["components"]["g"]) for i in range(N)}
    comps["sky"] = {"profile": "sky", "sky": 9.0}
    big = galprof.load_model({"zeropoint": ZP, "components": comps})
    ren = Renderer(big, [data.shape], psf)
    lay = big.layout(1)
    for i in range(N):
        for k, v in starts.items():
            lay.set_values(f"s{i}.{k.split('.')[1]}", torch.tensor([float(v[i])]))
    fp = FitProblem(ren, lay, batch, jacobian="autodiff")
    z_big = lay.initial()
    Jcols = []
    from torch.func import jvp
    for p in range(z_big.shape[1]):
        tan = torch.zeros_like(z_big)
        tan[0, p] = 1.0
        _, d = jvp(lambda zz: fp.residuals(zz, torch.arange(1)), (z_big,), (tan,))
        Jcols.append(d[0])
    J = torch.stack(Jcols, 1)                        # (H*W, P): order s0.x0.. per component, sky last
    # cut every source column to its window (what the field model renders)
    H, W = data.shape
    inwin = torch.zeros(N, H * W, dtype=torch.bool)
    for i, (ox, oy, nx, ny) in enumerate(windows):
        m = torch.zeros(H, W, dtype=torch.bool)
        m[oy:oy + ny, ox:ox + nx] = True
        inwin[i] = m.reshape(-1)
    free_big = lay.free
    for p, key in enumerate(free_big):
        comp = key.split(".")[0]
        if comp != "sky":
            J[:, p] = J[:, p] * inwin[int(comp[1:])]
    # reorder the dense columns to the field's order (source-major, template free order, sky)
    order = [free_big.index(f"s{i}.{k.split('.')[1]}") for i in range(N) for k in src.free] + \
        [free_big.index("sky.sky")]
    J = J[:, order]
    A_ref = J.T @ J
    scale = torch.sqrt(torch.outer(torch.diagonal(A_ref), torch.diagonal(A_ref)))
    assert torch.allclose(A[0] / scale, A_ref / scale, atol=2e-6, rtol=0)
    # the residuals differ where a window cuts a source's light; compare J^T r with the field's r
    r = prob.residuals(z)[0]
    g_ref = J.T @ r
    assert torch.allclose(g[0], g_ref, atol=2e-6 * float(g_ref.abs().max()), rtol=0)
    assert torch.isclose(chi2[0], (r * r).sum())


@pytest.mark.parametrize("n", [0.5, 1.0, 2.5, 4.0, 6.0])
def test_source_radii_hold_the_asked_fraction(n):
    """The window radius of a Sérsic component is where its enclosed light reaches the fraction
    (analytic: b_n r^(1/n) = P^-1(2n, f))."""
    model = galprof.load_model({"components": {"g": {"profile": "sersic", "x0": 0, "y0": 0, "mag": 0, "re": 4.0,
                                                                "n": n}}})
    vals = model.layout(1).values()
    f = 0.995
    r = source_radii(model, vals, f)[0]
    b = gammaincinv(2 * n, 0.5)
    expect = 4.0 * (gammaincinv(2 * n, f) / b) ** n
    assert r == pytest.approx(expect, rel=0.02)


def test_windows_stay_in_the_field():
    w = plan_windows(np.array([1.0, 50.0, 99.0]), np.array([50.0, 1.0, 99.0]), np.array([5.0, 5.0, 500.0]), 6,
                     (100, 100), FieldOptions())
    assert np.all(w[:, 0] >= 0) and np.all(w[:, 1] >= 0)
    assert np.all(w[:, 0] + w[:, 2] <= 100) and np.all(w[:, 1] + w[:, 3] <= 100)
    assert tuple(w[2, 2:]) == (100, 100)       # larger than the field: the whole field
    assert w[0, 2] == 32 and w[1, 3] == 32     # 2 (5 + 6 + 2) + 1 = 27 -> 32


def test_bad_fields_are_errors():
    model = galprof.load_model(TEMPLATE)
    with pytest.raises(DataError, match="no usable pixel"):
        fit_field(model, np.full((32, 32), np.nan), sources={"g.x0": [10.0], "g.y0": [10.0]})
    tied = galprof.load_model({"components": {
        "g": {"profile": "sersic", "x0": 0, "y0": 0, "mag": {"tie": "sky.sky"}, "re": 3, "n": 1},
        "sky": {"profile": "sky", "sky": 0}}})
    with pytest.raises(ModelError, match="tied across"):
        fit_field(tied, np.zeros((32, 32)), sources={"g.x0": [10.0]})


def test_cli_field_from_detection(tmp_path):
    """galprof fit MODEL --image FIELD --field: sources detected, fitted together, one row each."""
    from astropy.io import fits
    from astropy.table import Table

    from galprof.cli import main

    pytest.importorskip("sep")
    data, sigma, psf, truth, _ = galsim_field(5)
    for name, arr in (("field", data), ("sigma", sigma), ("psf", psf)):
        fits.writeto(tmp_path / f"{name}.fits", arr)
    (tmp_path / "model.yaml").write_text(
        "zeropoint: 25\ncomponents:\n  g: {profile: sersic, x0: 0, y0: 0, mag: 20, re: {value: 3, bounds: [0.3, 50]},"
        " n: {value: 2, bounds: [0.3, 8]}, q: 0.7, pa: 0}\n  sky: {profile: sky, sky: 0}\n")
    out = tmp_path / "out"
    code = main(["fit", str(tmp_path / "model.yaml"), "--image", str(tmp_path / "field.fits"), "--sigma",
                 str(tmp_path / "sigma.fits"), "--psf", str(tmp_path / "psf.fits"), "--field", "--out", str(out)])
    assert code == 0
    t = Table.read(out / "results.csv")
    assert len(t) == len(truth)
    assert set(t["status"]) == {"converged"}
    # match detections to the truth by position; every source within 4 sigma in mag and re
    for row in t:
        d = np.hypot(truth[:, 0] - row["g_x0"], truth[:, 1] - row["g_y0"])
        k = int(np.argmin(d))
        assert d[k] < 1.0
        assert abs(row["g_mag"] - truth[k, 2]) < 4 * row["g_mag_err"]
        assert abs(row["g_re"] - truth[k, 3]) < 4 * row["g_re_err"]
    with fits.open(out / "field.fits") as h:
        assert [x.name for x in h[1:]] == ["DATA", "MODEL", "RESIDUAL", "SIGMA", "SEGMAP"]
        assert np.allclose(h["DATA"].data - h["MODEL"].data, h["RESIDUAL"].data, atol=1e-3)


def test_large_batches_render_in_cell_chunks():
    """A batch rendered a few stamps per call (the cell budget of large stamps) is the same batch
    (to rounding: torch's FFT of even lengths vectorises over the batch)."""
    from galprof.render import RenderOptions

    data, sigma, psf, truth, starts = galsim_field(3, n_src=3, size=64)
    model = galprof.load_model({"zeropoint": ZP, "components": {"g": TEMPLATE["components"]["g"]}})
    whole = Renderer(model, [(64, 64)] * 3, psf)
    vals = {**{k: v.expand(3) for k, v in whole.values().items()},
            **{f"g.{k}": torch.as_tensor(starts[f"g.{k}"]) for k in NAMES}}
    hr, wr = whole.render_shape
    chunked = Renderer(model, [(64, 64)] * 3, psf, options=RenderOptions(chunk_cells=hr * wr))
    a, b = whole(vals), chunked(vals)
    assert float((a - b).abs().max()) <= 1e-14 * float(a.abs().max())


def test_float32_fit_sums_in_float64():
    """A float32 fit of a large stamp agrees with the float64 fit within a small fraction of the
    errors: its pixel sums (chi2, J^T J, J^T r) are accumulated in float64."""
    data, sigma, psf, truth, starts = galsim_field(4, n_src=1, size=256, noise=2.0)
    model = galprof.load_model(TEMPLATE)
    init = {f"g.{k}": [float(starts[f"g.{k}"][0])] for k in NAMES}
    init["sky.sky"] = [10.5]
    r64 = galprof.fit(model, [data], [sigma], psf=psf, initial=init)
    r32 = galprof.fit(model, [data], [sigma], psf=psf, initial=init, dtype=torch.float32)
    assert r64.status[0] == 0 and r32.status[0] == 0
    for k in NAMES:
        key = f"g.{k}"
        assert abs(r32.values[key][0] - r64.values[key][0]) < 0.05 * r64.errors[key][0], key
    assert r32.chi2[0] == pytest.approx(r64.chi2[0], rel=1e-6)


def test_residual_round_finds_a_merged_neighbour():
    """Two galaxies 6.5 px apart are one detection; the second round finds the fainter one on the
    residual image and fits it as its own source."""
    from galprof.field import fit_field_auto

    pytest.importorskip("sep")
    rng = np.random.default_rng(0)
    psf_g = galsim.Moffat(beta=3.5, fwhm=3.0)
    psf = psf_g.drawImage(nx=25, ny=25, scale=1.0).array
    img = galsim.ImageD(96, 96, scale=1.0)
    for x, y, f, re in [(40.0, 48.0, 6000.0, 3.0), (46.5, 48.5, 2500.0, 2.0), (70, 70, 3000, 2.5)]:
        g = galsim.Sersic(n=1.0, half_light_radius=re, flux=f)
        galsim.Convolve(g, psf_g).drawImage(image=img, add_to_image=True, center=galsim.PositionD(x, y))
    data = img.array + 10 + rng.normal(0, 3.0, img.array.shape)
    sigma = np.full(data.shape, 3.0)
    model = galprof.load_model(TEMPLATE)
    one, _, _ = fit_field_auto(model, data, sigma, psf=psf, rounds=1)
    two, notes, _ = fit_field_auto(model, data, sigma, psf=psf, rounds=2)
    assert len(one.result.chi2) == 2 and len(two.result.chi2) == 3
    assert any("residual" in n for n in notes)
    t = two.to_table()
    d = np.hypot(np.asarray(t["g_x0"]) - 46.5, np.asarray(t["g_y0"]) - 48.5)
    assert d.min() < 1.5
    assert t["chi2"][0] < one.result.chi2[0] - 100


def test_cli_field_from_a_catalogue(tmp_path):
    """--field with --catalog: one source per row at its x, y, with the catalogue's starts."""
    from astropy.io import fits
    from astropy.table import Table

    from galprof.cli import main

    data, sigma, psf, truth, starts = galsim_field(5)
    for name, arr in (("field", data), ("sigma", sigma), ("psf", psf)):
        fits.writeto(tmp_path / f"{name}.fits", arr)
    Table({"id": [f"s{i}" for i in range(len(truth))], "x": starts["g.x0"], "y": starts["g.y0"],
           "g_re": starts["g.re"]}).write(tmp_path / "cat.csv")
    (tmp_path / "model.yaml").write_text(
        "zeropoint: 25\ncomponents:\n  g: {profile: sersic, x0: 0, y0: 0, mag: 19, re: {value: 3, bounds: [0.3, 50]},"
        " n: {value: 2, bounds: [0.3, 8]}, q: 0.7, pa: 0}\n  sky: {profile: sky, sky: 10}\n")
    out = tmp_path / "out"
    assert main(["fit", str(tmp_path / "model.yaml"), "--image", str(tmp_path / "field.fits"), "--sigma",
                 str(tmp_path / "sigma.fits"), "--psf", str(tmp_path / "psf.fits"), "--catalog",
                 str(tmp_path / "cat.csv"), "--field", "--out", str(out)]) == 0
    t = Table.read(out / "results.csv")
    assert list(t["id"]) == [f"s{i}" for i in range(len(truth))]
    assert set(t["status"]) == {"converged"}
    pull = (np.asarray(t["g_mag"]) - truth[:, 2]) / np.asarray(t["g_mag_err"])
    assert np.all(np.abs(pull) < 4)
    # a catalogue without positions is an error, not a crash
    Table({"id": [1]}).write(tmp_path / "bad.csv")
    assert main(["fit", str(tmp_path / "model.yaml"), "--image", str(tmp_path / "field.fits"), "--catalog",
                 str(tmp_path / "bad.csv"), "--field", "--out", str(tmp_path / "o2")]) == 2


def test_streamed_normal_equations_equal_the_whole_jacobian():
    """Above the Jacobian memory budget, J^T J and J^T r are accumulated group by group (pairs of
    groups rendered again): the same numbers as from the whole Jacobian."""
    from galprof.fitting.data import make_batch
    from galprof.fitting.problem import FitProblem

    data, sigma, psf, truth, starts = galsim_field(6, n_src=1, size=64)
    model = galprof.load_model({"zeropoint": ZP, "components": {
        "bulge": {"profile": "sersic", "x0": 32.4, "y0": 31.8, "mag": 20.5, "re": 2.5, "n": 3, "q": 0.8, "pa": 20},
        "disk": {"profile": "expdisk", "x0": {"tie": "bulge.x0"}, "y0": {"tie": "bulge.y0"}, "mag": 20, "rs": 5,
                 "q": 0.5, "pa": 40},
        "sky": {"profile": "sky", "sky": 9.5}}})
    batch = make_batch([data], [sigma])
    ren = Renderer(model, batch.shapes, psf)
    lay = model.layout(1)
    z = lay.initial()
    whole = FitProblem(ren, lay, batch, jacobian="finite-difference")
    small = FitProblem(ren, lay, batch, jacobian="finite-difference", max_jacobian_bytes=1)
    idx = torch.arange(1)
    A1, g1, c1 = whole.normal_equations(z, idx)
    A2, g2, c2 = small.normal_equations(z, idx)
    assert len(whole._fd_groups) > 1
    d = torch.diagonal(A1[0]).sqrt()
    assert float(((A1[0] - A2[0]).abs() / torch.outer(d, d)).max()) < 1e-10
    assert float(((g1[0] - g2[0]).abs() / (d * c1[0].sqrt())).max()) < 1e-10
    assert torch.equal(c1, c2)


def test_field_columns_of_a_source_parameter_at_its_bound_are_its_derivatives():
    """A source's Sérsic index pinned at either end of its interval (a saturated transform): the
    field's finite-difference gradient and J^T J for it equal a physical difference quotient times
    the transform's derivative (stepping in the optimiser's space gave rounding noise, of either
    sign)."""
    data, sigma, psf, truth, starts = galsim_field(2, n_src=4, size=64)
    template, sky = split_model(galprof.load_model(TEMPLATE))
    src, sky_l = template.layout(4), sky.layout(1)
    for k, v in starts.items():
        src.set_values(k, torch.as_tensor(v))
    sky_l.set_values("sky.sky", torch.tensor([9.0]))
    batch = make_batch([data], [sigma])
    windows = plan_windows(starts["g.x0"], starts["g.y0"], np.full(4, 3.0), 12, data.shape,
                           FieldOptions(min_size=32, max_size=32))
    prob = FieldProblem(template, sky, src, sky_l, batch.images[0], batch.weights[0], windows, psf)
    prob.freezing = False
    jn, t = src.free.index("g.n"), src.transform("g.n")
    for zn in (20.0, 22.0, -20.0):
        Z = src.initial()
        Z[0, jn] = zn
        A, g, _ = prob.normal_equations(prob.pack(Z, sky_l.initial()))
        x = t.forward(Z[0, jn])
        xs = x + (-1e-6 if zn > 0 else 1e-6)
        Zp = Z.clone()
        Zp[0, jn] = t.inverse(xs)
        r0 = prob.residuals(prob.pack(Z, sky_l.initial()))[0]
        r1 = prob.residuals(prob.pack(Zp, sky_l.initial()))[0]
        col = (r1 - r0) / (t.forward(Zp[0, jn]) - x) * t.derivative(Z[0, jn])
        np.testing.assert_allclose(float(g[0, jn]), float(col @ r0), rtol=1e-3)
        np.testing.assert_allclose(float(A[0, jn, jn]), float(col @ col), rtol=2e-3)
