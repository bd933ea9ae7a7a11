"""Diagnostic plots of the bundled SDSS galaxies and of result tables: the files are PNGs, and the
figures have the panels they should (checked through their axes, not their pixels)."""

import numpy as np
import pytest
from astropy.table import Table

import galprof
from conftest import EXAMPLES
from galprof.io.fits import read_image

pytest.importorskip("matplotlib")

from galprof import plots  # noqa: E402

SDSS = EXAMPLES / "sdss"
PNG = b"\x89PNG\r\n\x1a\n"


def sdss_galaxies():
    cat = Table.read(SDSS / "catalog.csv")
    model = galprof.load_model(EXAMPLES / "sersic.yaml")
    out = []
    for row in cat:
        image = read_image(SDSS / row["image"])
        sigma = read_image(SDSS / row["sigma"])
        seg = read_image(SDSS / row["mask"])
        mask = (seg != 0) & (seg != row["mask_label"])
        psf = read_image(SDSS / row["psf"])
        values = {k: float(v[0]) for k, v in model.layout(1).values().items()}
        for p in ("x0", "y0", "mag", "re", "q", "pa"):
            values[f"galaxy.{p}"] = float(row[f"galaxy_{p}"])
        r = galprof.Renderer(model, [image.shape], psf)
        total = r.crop(r(values), 0)
        comps = {k: r.crop(v, 0) for k, v in r.components(values).items()}
        out.append((row["id"], model, values, image, sigma, mask, total, comps))
    return out


@pytest.mark.parametrize("index", [0, 1, 2])
def test_galaxy_figure_of_each_sdss_galaxy(index, tmp_path):
    gid, model, values, image, sigma, mask, total, comps = sdss_galaxies()[index]
    fig = plots.galaxy_figure(model, values, image, total, comps, mask=mask, sigma=sigma, plate_scale=0.396,
                              title=str(gid))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:5] == ["data", "model", "residual", "mask", "profile"]
    data_ax, model_ax, resid_ax, mask_ax, prof_ax = fig.axes[:5]
    # one shared stretch for data, model and residual
    norms = [ax.images[0].norm for ax in (data_ax, model_ax, resid_ax)]
    assert norms[0] is norms[1] is norms[2]
    assert mask_ax.images[0].get_array().shape == image.shape
    np.testing.assert_array_equal(np.asarray(mask_ax.images[0].get_array()), mask)
    # the profile: data, model and every component, radius in px below and arcsec above
    labels = [line.get_label() for line in prof_ax.get_lines()] + [c.get_label() for c in prof_ax.containers]
    assert {"data", "model", "galaxy", "sky"} <= set(labels)
    assert "px" in prof_ax.get_xlabel() and "mag" in prof_ax.get_ylabel()
    top = prof_ax.child_axes[0]
    assert "arcsec" in top.get_xlabel()
    path = tmp_path / f"{gid}.png"
    fig.savefig(path, dpi=60)
    assert path.read_bytes()[:8] == PNG


def test_profile_is_the_annulus_mean():
    # the profile is the mean in each elliptical annulus at the mean radius of its pixels: exact
    # for an image linear in the elliptical radius
    model = galprof.load_model({"zeropoint": 0, "components": {"g": {"profile": "expdisk", "x0": 20, "y0": 20,
                                                                     "mag": -5, "rs": 3, "q": 0.5, "pa": 30}}})
    values = {k: float(v[0]) for k, v in model.layout(1).values().items()}
    r = plots.elliptical_radius((40, 40), plots._ellipse_geometry(model, values))
    assert r[19, 19] == 0.0
    img = 10.0 - 0.2 * r
    good = np.ones_like(img, bool)
    good[5:9, 30:34] = False
    radii, means, err = plots.surface_brightness_profile({"x": img}, r, good, sigma=np.full_like(img, 2.0))
    np.testing.assert_allclose(means["x"], 10.0 - 0.2 * radii, rtol=1e-12)
    assert radii[0] == 0.0 and np.all(np.diff(radii) > 0)
    counts = (2.0 / err) ** 2  # sqrt(N sigma^2) / N
    assert counts.sum() == pytest.approx(good.sum())


def test_profile_zeropoint_and_unknown_plate_scale():
    """The profile in mag/arcsec^2 uses the image's zero point (given, else the model's): one more
    magnitude of zero point moves every point down by exactly one magnitude; a NaN plate scale is
    an unknown one (counts per pixel, no arcsec axis)."""
    gid, model, values, image, sigma, mask, total, comps = sdss_galaxies()[0]

    def data_points(**kw):
        fig = plots.galaxy_figure(model, values, image, total, comps, mask=mask, sigma=sigma, **kw)
        prof = fig.axes[4]
        return prof, next(c for c in prof.containers if c.get_label() == "data")[0].get_ydata()

    _, mu = data_points(plate_scale=0.396)
    _, mu1 = data_points(plate_scale=0.396, zeropoint=model.zeropoint + 1.0)
    ok = np.isfinite(mu)
    assert ok.sum() > 10 and np.array_equal(ok, np.isfinite(mu1))
    np.testing.assert_allclose(mu1[ok] - mu[ok], 1.0, rtol=0, atol=1e-12)
    prof, counts = data_points(plate_scale=float("nan"))
    assert "counts" in prof.get_ylabel() and not prof.child_axes


def results_table(n=40, seed=1, shift=0.0):
    rng = np.random.default_rng(seed)
    t = Table()
    t["id"] = [f"g{i}" for i in range(n)]
    for col, mu, sd in (("galaxy_re", 5.0, 1.0), ("galaxy_n", 2.0, 0.5), ("galaxy_mag", 17.0, 0.7)):
        t[col] = rng.normal(mu, sd, n) + shift
        t[col + "_err"] = np.full(n, 0.1)
    t["galaxy_c0"] = np.zeros(n)
    t["galaxy_c0_err"] = np.full(n, np.nan)
    t["chi2"] = rng.chisquare(1000, n)
    t["dof"] = np.full(n, 1000)
    t["chi2_nu"] = t["chi2"] / t["dof"]
    t["status"] = ["converged"] * (n - 2) + ["max_iter"] * 2
    return t


def test_catalogue_plots(tmp_path):
    a, b = results_table(), results_table(seed=1, shift=0.05)
    fig = plots.parameter_distributions(a)
    visible = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert visible == ["galaxy_re", "galaxy_n", "galaxy_mag"]  # c0 is fixed: left out
    assert sum(p.get_height() for p in fig.axes[0].patches) == 38  # converged galaxies only
    fig = plots.chi2nu_histogram(a)
    assert fig.axes[0].get_title() == "chi2_nu"
    fig = plots.compare_runs(a, b, labels=("A", "B"))
    ax = fig.axes[0]
    assert ax.get_title() == "galaxy_re" and ax.get_xlabel() == "A" and ax.get_ylabel() == "B"
    assert any("median pull +0.35" in t.get_text() for t in ax.texts)  # 0.05 / sqrt(0.1^2 + 0.1^2)
    paths = plots.catalog_plots(a, tmp_path, compare=b)
    assert [p.name for p in paths] == ["parameters.png", "chi2nu.png", "compare.png"]
    assert all(p.read_bytes()[:8] == PNG for p in paths)


def test_corner_plot_of_bootstrap_samples(tmp_path):
    rng = np.random.default_rng(3)
    samples = rng.multivariate_normal([5, 2, 17], [[0.04, 0.01, 0], [0.01, 0.01, 0], [0, 0, 0.0025]], size=200)
    fig = plots.corner_plot(samples, ["re", "n", "mag"], truths=[5, 2, 17])
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 6  # 3 histograms + 3 pairs
    assert [ax.get_title() for ax in visible if ax.get_title()] == ["re", "n", "mag"]
    fig.savefig(tmp_path / "corner.png", dpi=50)
    assert (tmp_path / "corner.png").read_bytes()[:8] == PNG
    with pytest.raises(galprof.GalprofError):
        plots.corner_plot(samples, ["re", "n"])


def test_plot_command(tmp_path):
    from galprof.cli import main

    a, b = results_table(), results_table(seed=2)
    a.write(tmp_path / "a.fits")
    b.write(tmp_path / "b.csv", format="ascii.csv")
    assert main(["plot", str(tmp_path / "a.fits"), "--compare", str(tmp_path / "b.csv"), "--out",
                 str(tmp_path / "plots")]) == 0
    for name in ("parameters.png", "chi2nu.png", "compare.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == PNG
    assert main(["plot", str(tmp_path / "missing.fits"), "--out", str(tmp_path)]) == 2


def test_corner_plot_of_a_bootstrap_result():
    from galprof.fitting import FitResult

    rng = np.random.default_rng(4)
    keys, free = ["g.re", "g.n", "g.c0"], ["g.re", "g.n"]
    samples = {"g.re": rng.normal(5, 0.2, (2, 50)), "g.n": rng.normal(2, 0.1, (2, 50))}
    one = np.ones(2)
    res = FitResult(keys=keys, free=free, values={"g.re": np.array([5.0, 6.0]), "g.n": np.array([2.0, 3.0]),
                                                  "g.c0": np.zeros(2)},
                    errors={k: one * 0.1 for k in keys}, covariance=np.zeros((2, 3, 3)), chi2=one, dof=one,
                    n_iter=one, status=np.zeros(2), flags=np.zeros(2), uncertainty="bootstrap",
                    bootstrap_samples=samples)
    fig = plots.bootstrap_corner(res, index=1)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible if ax.get_title()] == ["g.re", "g.n"]
    # the best fit of galaxy 1 is marked on the diagonal histograms
    assert visible[0].get_lines()[0].get_xdata()[0] == 6.0
    res.bootstrap_samples = None
    with pytest.raises(galprof.GalprofError, match="bootstrap"):
        plots.bootstrap_corner(res)
