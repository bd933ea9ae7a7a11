"""galprof.nn: neural initial guesses and learned masks (docs/nn_init.md).

References: GalSim (PSF images and galaxies the guesses are checked on), numpy (block averages),
the bundled SDSS cutouts (the CLI runs).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import galprof
from conftest import EXAMPLES
from galprof.errors import DataError
from galprof.nn.grid import GRID, grid_to_stamp, network_input, psf_fwhm, stamp_to_grid, to_grid
from galprof.nn.infer import Predictor, load_predictor, starts_for
from galprof.nn.network import OUTPUTS, InitNet, MaskNet, decode, encode
from galprof.nn.simulate import moffat_psf, simulate_grid
from galprof.nn.survey import SHIPPED_WEIGHTS, load_survey, package_file, shipped_survey

SDSS_SCALE = 0.396


def _galsim_moffat(fwhm, beta=3.5):
    import galsim

    return galsim.Moffat(beta=beta, fwhm=fwhm)


def _galsim_stamp(size, x0, y0, flux, re, n, q, pa, fwhm, sky_sigma, rng, gain=700.0):
    """A GalSim Sérsic (galprof's conventions: re semi-major, PA from +y) convolved with a Moffat,
    with sky + Poisson noise; returns image, sigma, star-like PSF image."""
    import galsim

    psf = _galsim_moffat(fwhm)
    g = galsim.Sersic(n, half_light_radius=re * math.sqrt(q), flux=flux).shear(q=q, beta=(pa + 90) * galsim.degrees)
    im = galsim.ImageD(size, size, scale=1.0)
    galsim.Convolve(g, psf).drawImage(image=im, center=galsim.PositionD(x0, y0))
    model = im.array
    sigma = np.sqrt(sky_sigma ** 2 + np.clip(model, 0, None) / gain)
    image = model + rng.normal(0.0, 1.0, model.shape) * sigma
    psf_im = galsim.Convolve(psf, galsim.Pixel(1.0)).drawImage(nx=41, ny=41, scale=1.0, method="no_pixel").array
    return image, sigma, psf_im


# ---------------------------------------------------------------------------------------------
# survey, grid, PSF
def test_shipped_survey_and_matching():
    s = shipped_survey()
    assert s.pixel_scale == pytest.approx(SDSS_SCALE) and s.zeropoint == 22.5
    lo, hi = s.psf_fwhm_px
    ok, _ = s.matches(stamp_shape=(128, 128), psf_fwhm_px=0.5 * (lo + hi), pixel_scale=SDSS_SCALE)
    assert ok
    assert not s.matches(stamp_shape=(128, 128), psf_fwhm_px=2.0 * hi)[0]
    assert not s.matches(stamp_shape=(128, 128), psf_fwhm_px=0.5 * (lo + hi), pixel_scale=0.2)[0]
    assert not s.matches(stamp_shape=(600, 600), psf_fwhm_px=0.5 * (lo + hi))[0]
    assert not s.matches(stamp_shape=(128, 128), psf_fwhm_px=math.nan)[0]


def test_survey_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_survey(tmp_path / "none.yaml")
    bad = dict(shipped_survey().to_dict())
    bad["galaxy"] = {**bad["galaxy"], "n": [0.1, 9.0]}
    with pytest.raises(DataError, match="galaxy.n"):
        load_survey(bad)
    bad = dict(shipped_survey().to_dict())
    bad["psf"] = {**bad["psf"], "fwhm": [2.0, 1.0]}
    with pytest.raises(DataError, match="psf.fwhm"):
        load_survey(bad)


def test_psf_fwhm_and_moffat_against_galsim():
    import galsim

    for fwhm, beta in ((3.0, 3.5), (4.5, 2.5), (1.6, 4.5)):
        ref = galsim.Convolve(galsim.Moffat(beta=beta, fwhm=fwhm), galsim.Pixel(1.0)).drawImage(
            nx=41, ny=41, scale=1.0, method="no_pixel").array
        ours = moffat_psf(fwhm, beta, 41)
        assert np.abs(ours - ref / ref.sum()).max() < 1e-2 * ref.max() / ref.sum()  # 5 x 5 points per pixel
        # the estimator measures the pixel-convolved PSF: a bit above the optical FWHM
        opt = galsim.Moffat(beta=beta, fwhm=fwhm).drawImage(nx=81, ny=81, scale=0.25, method="no_pixel").array
        assert psf_fwhm(opt) * 0.25 == pytest.approx(fwhm, rel=0.04)
        assert fwhm <= psf_fwhm(ref) <= 1.15 * fwhm + 0.3


def test_to_grid_block_averages_and_frames(rng):
    ny, nx = 100, 90
    image = rng.normal(size=(ny, nx))
    sigma = rng.uniform(0.5, 2.0, (ny, nx))
    mask = rng.uniform(size=(ny, nx)) < 0.1
    g = to_grid(image, sigma, mask, (47.3, 52.8))
    assert g.factor == 2 and g.image.shape == (GRID, GRID)
    # the target lands within half a grid pixel of the grid centre
    xg, yg = stamp_to_grid(47.3, 52.8, g)
    assert abs(xg - (GRID + 1) / 2) <= 0.5 / g.factor + 1e-9 and abs(yg - (GRID + 1) / 2) <= 0.5 / g.factor + 1e-9
    assert np.allclose(grid_to_stamp(xg, yg, g.factor, g.offset), (47.3, 52.8))
    # one grid pixel against numpy: the mean of the used stamp pixels of its block
    k, j = 30, 31
    ys = slice(k * 2 + g.offset[1], k * 2 + 2 + g.offset[1])
    xs = slice(j * 2 + g.offset[0], j * 2 + 2 + g.offset[0])
    use = ~mask[ys, xs]
    assert g.image[k, j] == pytest.approx(image[ys, xs][use].mean())
    assert g.sigma[k, j] == pytest.approx(np.sqrt((sigma[ys, xs][use] ** 2).sum()) / use.sum())
    assert g.frac[k, j] == pytest.approx(use.mean())
    # grid pixels beyond the stamp are unused
    assert (g.frac == 0).any() and (g.frac[g.sigma == 0] == 0).all()


def test_encode_decode_round_trip():
    truth = {"x0": torch.tensor([32.7, 30.1]), "y0": torch.tensor([31.9, 33.3]), "re": torch.tensor([2.5, 8.0]),
             "n": torch.tensor([0.8, 4.2]), "q": torch.tensor([0.35, 0.9]), "pa": torch.tensor([-75.0, 40.0]),
             "flux": torch.tensor([12.0, 300.0]), "sky": torch.tensor([0.01, -0.02])}
    s0 = torch.tensor([0.05, 0.2])
    vals, _ = decode(encode(truth, s0), s0)
    for k in truth:
        assert torch.allclose(vals[k], truth[k], rtol=1e-5, atol=1e-4), k


def test_network_shapes():
    net = InitNet().eval()
    x = torch.zeros(5, 3, GRID, GRID)
    mu, ls = net(x, torch.ones(5, 1))
    assert mu.shape == ls.shape == (5, len(OUTPUTS))
    seg = MaskNet().eval()(x)
    assert seg.shape == (5, 3, GRID, GRID)


# ---------------------------------------------------------------------------------------------
# simulation
def test_grid_simulation_conventions():
    b = simulate_grid(shipped_survey(), 32, seed=3)
    # the target's light sums to its flux (up to the part beyond the grid) and is centred at its x0, y0
    tot = b.target.sum(dim=(1, 2))
    inside = (b.truth["re"] * 6 < GRID / 2) & (b.truth["n"] < 2)
    assert inside.sum() >= 3
    assert torch.allclose(tot[inside], b.truth["flux"][inside], rtol=0.02)
    yy, xx = torch.meshgrid(torch.arange(GRID) + 1.0, torch.arange(GRID) + 1.0, indexing="ij")
    cx = (b.target * xx).sum(dim=(1, 2)) / tot
    assert torch.allclose(cx[inside], b.truth["x0"][inside], atol=0.05)
    assert (b.image[b.frac == 0] == 0).all() and (b.sigma[b.frac > 0] > 0).all()


# ---------------------------------------------------------------------------------------------
# the shipped weights
def test_shipped_weights_load():
    path = package_file(SHIPPED_WEIGHTS)
    assert path.is_file() and path.stat().st_size < 10e6
    p = load_predictor()
    assert p.survey.name == "sdss-g" and p.mask_net is not None
    assert load_predictor() is p


def test_guesses_near_galsim_truth():
    """Isolated GalSim galaxies (SDSS-like PSF and noise): the network's guesses land near the
    truth (loose: an untrained or broken network fails)."""
    rng = np.random.default_rng(5)
    p = load_predictor()
    cases = [(96, 5.0, 1.0, 0.5, 30.0), (64, 2.5, 4.0, 0.8, -50.0), (128, 9.0, 1.5, 0.3, 75.0),
             (64, 3.5, 2.5, 0.6, 10.0), (96, 6.0, 0.7, 0.9, -20.0), (128, 7.0, 3.0, 0.45, -80.0)]
    images, sigmas, fw, truths = [], [], [], []
    for size, re, n, q, pa in cases:
        x0, y0 = (size + 1) / 2 + rng.uniform(-1, 1), (size + 1) / 2 + rng.uniform(-1, 1)
        flux = 10 ** (-0.4 * (17.5 - 22.5))
        im, sg, psf = _galsim_stamp(size, x0, y0, flux, re, n, q, pa, 3.8, 0.015, rng)
        images.append(im)
        sigmas.append(sg)
        fw.append(psf_fwhm(psf))
        truths.append({"x0": x0, "y0": y0, "mag": 17.5, "re": re, "n": n, "q": q, "pa": pa})
    pred = p.predict(images, sigmas, psf_fwhm_px=fw, zeropoint=22.5)
    for i, t in enumerate(truths):
        assert abs(pred["x0"][i] - t["x0"]) < 1.0 and abs(pred["y0"][i] - t["y0"]) < 1.0
        assert abs(pred["mag"][i] - t["mag"]) < 0.3
        assert abs(math.log(pred["re"][i] / t["re"])) < math.log(1.6)
        assert abs(math.log(pred["n"][i] / t["n"])) < math.log(2.0)
        assert abs(pred["q"][i] - t["q"]) < 0.25
        if t["q"] < 0.7:
            assert abs((pred["pa"][i] - t["pa"] + 90) % 180 - 90) < 15
        for k in ("x0", "mag", "re", "n", "q"):
            assert pred[k + "_err"][i] > 0
    # median errors well inside those bounds
    assert np.median(np.abs(np.log(pred["re"] / [t["re"] for t in truths]))) < math.log(1.2)
    assert np.median(np.abs(pred["q"] - [t["q"] for t in truths])) < 0.1


def test_mask_network_labels():
    rng = np.random.default_rng(9)
    p = load_predictor()
    im, sg, psf = _galsim_stamp(96, 48.5, 48.5, 200.0, 4.0, 1.5, 0.7, 20.0, 3.8, 0.015, rng)
    im2, _, _ = _galsim_stamp(96, 20.0, 75.0, 300.0, 3.0, 1.0, 0.8, 0.0, 3.8, 0.0, rng)
    im = im + im2  # a neighbour, noise-free on top
    lab = p.labels([im, im[:70, :80]], [sg, sg[:70, :80]], psf_fwhm_px=[psf_fwhm(psf)] * 2)
    assert lab[0].shape == (96, 96) and lab[1].shape == (70, 80)
    assert set(np.unique(lab[0])) <= {0, 1, 2}
    assert lab[0][47, 47] == 1 and lab[0][74, 19] == 2 and lab[0][5, 90] == 0
    m = p.mask(im, sg, psf_fwhm_px=psf_fwhm(psf))
    assert m[74, 19] and not m[47, 47]


def test_starts_for_bulge_disk_model():
    pred = {"x0": [40.0], "y0": [41.0], "mag": [17.0], "re": [5.0], "n": [3.0], "q": [0.6], "pa": [30.0],
            "sky": [0.001]}
    m = galprof.load_model(EXAMPLES / "bulge_disk.yaml")
    st = starts_for(m, {k: np.array(v) for k, v in pred.items()})
    flux = sum(10 ** (-0.4 * (st[k] - m.zeropoint)) for k in st if k.endswith(".mag"))
    assert flux == pytest.approx(10 ** (-0.4 * (17.0 - m.zeropoint)), rel=1e-6)
    assert all(st[k] == 40.0 for k in st if k.endswith(".x0"))


# ---------------------------------------------------------------------------------------------
# command line
def _catalog_without_starts(tmp_path: Path) -> Path:
    from astropy.table import Table

    t = Table.read(EXAMPLES / "sdss" / "catalog.csv")["id", "image", "sigma", "psf"]
    for c in ("image", "sigma", "psf"):
        t[c] = [str(EXAMPLES / "sdss" / v) for v in t[c]]
    path = tmp_path / "cat.csv"
    t.write(path)
    return path


def test_cli_fit_init_nn_on_sdss_examples(tmp_path):
    """The three SDSS galaxies from network starts reach the optimum that moment starts reach
    (same sep masks), and --mask nn and --init auto run."""
    pytest.importorskip("sep")
    from astropy.table import Table

    from galprof.cli import main

    cat = _catalog_without_starts(tmp_path)
    runs = {}
    for init in ("moments", "nn"):
        out = tmp_path / init
        assert main(["fit", str(EXAMPLES / "sersic.yaml"), "--catalog", str(cat), "--out", str(out), "--init", init,
                     "--format", "csv"]) == 0
        runs[init] = Table.read(out / "results.csv")
    a, b = runs["moments"], runs["nn"]
    assert len(b) == 3 and all(s == "converged" for s in b["status"])
    for p in ("x0", "y0", "mag", "re", "n", "q"):
        err = np.hypot(a[f"galaxy_{p}_err"], b[f"galaxy_{p}_err"])
        assert np.all(np.abs(a[f"galaxy_{p}"] - b[f"galaxy_{p}"]) < np.maximum(err, 1e-3)), p
    out = tmp_path / "auto_masknn"
    assert main(["fit", str(EXAMPLES / "sersic.yaml"), "--catalog", str(cat), "--out", str(out), "--init", "auto",
                 "--mask", "nn", "--format", "csv"]) == 0
    t = Table.read(out / "results.csv")
    assert len(t) == 3 and all(s == "converged" for s in t["status"])
    assert main(["fit", str(EXAMPLES / "sersic.yaml"), "--catalog", str(cat), "--out", str(tmp_path / "x"),
                 "--init", "nn", "--no-auto-starts"]) == 2


def test_cli_fit_image_init_nn(tmp_path):
    pytest.importorskip("sep")
    from astropy.table import Table

    from galprof.cli import main

    sdss = EXAMPLES / "sdss"
    out = tmp_path / "img"
    name = "J100247.00+042559.8"
    assert main(["fit", str(sdss / f"{name}_image.fits"), "--psf", str(sdss / f"{name}_psf.fits"),
                 "--sigma", str(sdss / f"{name}_sigma.fits"), "--zeropoint", "22.5", "--init", "nn",
                 "--out", str(out), "--format", "csv"]) == 0
    t = Table.read(out / "results.csv")
    assert t["status"][0] == "converged"
    assert abs(t["galaxy_mag"][0] - 18.06) < 0.5


def test_train_init_tiny_end_to_end(tmp_path):
    from galprof.cli import main

    out = tmp_path / "w.pt"
    assert main(["train-init", str(package_file("sdss_g.yaml")), "--out", str(out), "--n-train", "48", "--n-val",
                 "16", "--epochs", "1", "--mask-epochs", "1", "--batch", "16", "--seed", "3"]) == 0
    p = Predictor(out)
    assert p.mask_net is not None and p.survey.name == "sdss-g"
    w = torch.load(out, weights_only=True)
    assert w["config"]["n_train"] == 48 and len(w["init"]["history"]) == 1
    rng = np.random.default_rng(1)
    im, sg, psf = _galsim_stamp(64, 32.5, 32.5, 100.0, 3.0, 1.0, 0.7, 0.0, 3.8, 0.015, rng)
    pred = p.predict([im], [sg], psf_fwhm_px=[psf_fwhm(psf)], zeropoint=22.5)
    assert all(np.isfinite(pred[k][0]) for k in ("x0", "y0", "mag", "re", "n", "q", "pa"))
    assert main(["train-init", str(tmp_path / "missing.yaml"), "--out", str(out)]) == 2


def test_bad_weights_file(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"something": 1}, bad)
    with pytest.raises(DataError, match="not a galprof"):
        Predictor(bad)
    with pytest.raises(DataError, match="not found"):
        Predictor(tmp_path / "none.pt")


def test_network_input_normalisation():
    img = torch.randn(2, GRID, GRID) * 3.0
    sig = torch.full((2, GRID, GRID), 3.0)
    frac = torch.ones(2, GRID, GRID)
    frac[1, :10] = 0
    x, sc, s0 = network_input(img, sig, frac, torch.tensor([3.0, 4.0]))
    assert torch.allclose(s0, torch.tensor([3.0, 3.0]))
    assert x.shape == (2, 3, GRID, GRID) and (x[1, 0, :10] == 0).all()
    assert torch.allclose(x[0, 0], torch.asinh(img[0] / 3.0) / 3.0)


def test_training_is_reproducible():
    from galprof.nn.train import TrainConfig, train

    cfg = TrainConfig(n_train=32, n_val=8, epochs=1, mask_epochs=1, batch=16, seed=11, chi2_stamps=8)
    a = train(shipped_survey(), cfg)
    b = train(shipped_survey(), cfg)
    for part in ("init", "mask"):
        for k, v in a[part]["state"].items():
            assert torch.equal(v, b[part]["state"][k]), (part, k)
    c = train(shipped_survey(), TrainConfig(**{**cfg.__dict__, "seed": 12}))
    assert not torch.equal(a["init"]["state"]["head.2.weight"], c["init"]["state"]["head.2.weight"])
