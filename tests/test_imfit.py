"""IMFIT configuration files: every function read into galprof renders IMFIT's own image (pyimfit
golden images, benchmarks/make_imfit_functions_golden.py); the file's syntax, limits, fixed values and
what galprof refuses; IMFIT's parameters back from galprof's."""

import json
import math
import warnings

import numpy as np
import pytest
from scipy.special import gamma, gammaincinv

import galprof
from conftest import ROOT
from galprof import GalprofWarning, ModelError
from galprof.io.imfit import imfit_parameters, is_imfit_config, read_imfit_config

DATA = ROOT / "tests" / "data"
GOLDEN = np.load(DATA / "imfit_functions_golden.npz")
CONFIGS = json.loads(str(GOLDEN["configs"]))
SHAPE = tuple(json.loads(str(GOLDEN["meta"]))["shape"])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_function_renders_imfits_image(name):
    cfg = read_imfit_config(CONFIGS[name], shape=SHAPE)
    psf = GOLDEN["psf"] if name == "PointSource" else None
    img = galprof.render(cfg.model, SHAPE, psf, psf_kind="optical")
    ref = GOLDEN[f"image_{name}"]
    peak = np.abs(ref).max()
    if name == "PointSource":
        # same flux; the shapes differ by IMFIT's PSF interpolation vs galprof's Fourier shift
        assert img.sum() == pytest.approx(ref.sum(), rel=1e-6)
        assert np.abs(img - ref).max() < 0.05 * peak
    elif name in ("FlatSky", "TiltedSkyPlane"):
        np.testing.assert_allclose(img, ref, rtol=1e-12, atol=1e-12)
    else:
        # IMFIT integrates over pixels only within 10 px of the centre (sub-sampling), galprof
        # everywhere: 0.2% in total flux, 0.5% of the peak in any pixel. A wrong conversion (q for
        # ell, sigma for FWHM, a PA sign, I_e at the wrong radius) is off by tens of percent.
        assert img.sum() == pytest.approx(ref.sum(), rel=3e-3)
        assert np.abs(img - ref).max() < 6e-3 * peak


def test_ic3478_configs_read_as_documented():
    with pytest.warns(GalprofWarning, match="I_e"):
        cfg = read_imfit_config(DATA / "ic3478" / "config_sersic_ic3478_256.dat")
    c = cfg.model["sersic1"]
    # docs/conventions.md: X0 129, PA 18, ell 0.2, n 1.5, I_e 15, r_e 25 is mag -12.5754 (zeropoint 0)
    b = gammaincinv(3.0, 0.5)
    flux = 2 * math.pi * 0.8 * 25**2 * 15 * 1.5 * math.exp(b) * gamma(3.0) / b**3
    assert c.params["mag"].value == pytest.approx(-2.5 * math.log10(flux), abs=1e-9)
    assert c.params["q"].value == pytest.approx(0.8)
    assert c.params["q"].bounds == (1e-3, 1.0)  # ell 0,1 -> q (0, 1], narrowed to q's domain
    assert c.params["x0"].bounds == (125.0, 135.0) and c.params["pa"].bounds == (0.0, 90.0)
    assert c.params["n"].bounds == (0.2, 5.0)
    assert any("narrowed" in n for n in cfg.notes)
    with pytest.warns(GalprofWarning):
        cfg2 = read_imfit_config(DATA / "ic3478" / "config_sersic+exponential_ic3478_256.dat", zeropoint=25.0)
    assert cfg2.model["exponential2"].params["x0"].tie.expr == "sersic1.x0"  # one X0/Y0 block
    assert cfg2.model["exponential2"].params["mag"].value == pytest.approx(-13.7429 + 25.0, abs=1e-4)


def test_fixed_intensity_with_free_shape_keeps_imfits_model():
    text = "X0 50 fixed\nY0 50 fixed\nFUNCTION Sersic\nPA 10\nell 0.3\nn 2 fixed\nI_e 5 fixed\nr_e 8 1,20\n"
    cfg = read_imfit_config(text)
    mag = cfg.model["sersic1"].params["mag"]
    assert mag.tie is not None and set(mag.tie.depends) >= {"sersic1.re", "sersic1.q"}
    layout = cfg.model.layout(1)
    layout.set_values("sersic1.re", 12.0)
    values = {k: float(v[0]) for k, v in layout.values().items()}
    # I_e stays 5 whatever r_e: read back from the image at r_e on the major axis (PA 10)
    img = galprof.render(cfg.model, (101, 101), values=values)
    x = 50 - 12 * math.sin(math.radians(10))
    y = 50 + 12 * math.cos(math.radians(10))
    assert img[round(y) - 1, round(x) - 1] == pytest.approx(5.0, rel=0.03)
    back = imfit_parameters(cfg, values)
    assert back["I_e_1"][0] == pytest.approx(5.0, rel=1e-10)


def test_labels_options_and_back_to_imfit_names():
    text = """# a comment
GAIN 4.7
READNOISE 5.0
ORIGINAL_SKY 120
X0 30 20,40
Y0 31 20,40
FUNCTION Sersic  # LABEL bulge
PA 10 0,90
ell 0.2 0,0.9
n 3 fixed
I_e 20
r_e 4
FUNCTION Gaussian
PA 40
ell 0.5
I_0 10
sigma 2 1,5

X0 60 fixed
Y0 61 fixed
FUNCTION PointSource
I_tot 500 0,1e4
"""
    cfg = read_imfit_config(text)
    assert cfg.options == {"GAIN": 4.7, "READNOISE": 5.0, "ORIGINAL_SKY": 120.0}
    assert [c.name for c in cfg.model.components] == ["bulge", "gaussian2", "pointsource3"]
    g = cfg.model["gaussian2"]
    assert g.params["fwhm"].value == pytest.approx(2 * 2 * math.sqrt(2 * math.log(2)))
    assert g.params["fwhm"].bounds == pytest.approx((2.3548200450309493, 11.774100225154747))
    assert g.params["x0"].tie.expr == "bulge.x0"
    assert cfg.model["bulge"].params["n"].fixed is True
    assert cfg.model["pointsource3"].params["x0"].fixed is True
    # upper limit of I_tot: a lower bound on mag
    assert cfg.model["pointsource3"].params["mag"].bounds == (pytest.approx(-10.0), None)
    values = {k: float(v[0]) for k, v in cfg.model.layout(1).values().items()}
    back = imfit_parameters(cfg, values)
    assert list(back)[:9] == ["X0_1", "Y0_1", "PA_1", "ell_1", "n_1", "I_e_1", "r_e_1", "PA_2", "ell_2"]
    assert back["I_e_1"][0] == pytest.approx(20.0, rel=1e-10)
    assert back["sigma_2"][0] == pytest.approx(2.0, rel=1e-12)
    assert back["I_0_2"][0] == pytest.approx(10.0, rel=1e-10)
    assert back["I_tot_3"][0] == pytest.approx(500.0, rel=1e-10)
    assert back["X0_2"][0] == 60.0 and back["ell_1"][0] == pytest.approx(0.2)


def test_intensity_error_by_the_delta_method():
    cfg = read_imfit_config("X0 10\nY0 10\nFUNCTION Exponential\nPA 0\nell 0.2\nI_0 100\nh 5\n")
    values = {k: float(v[0]) for k, v in cfg.model.layout(1).values().items()}
    keys = list(values)
    cov = np.zeros((len(keys), len(keys)))
    i, j = keys.index("exponential1.mag"), keys.index("exponential1.rs")
    cov[i, i], cov[j, j], cov[i, j] = 0.01**2, 0.1**2, 0.3 * 0.01 * 0.1
    cov[j, i] = cov[i, j]
    _, err = imfit_parameters(cfg, values, cov, keys)["I_0_1"]
    # I_0 = F / (2 pi q h^2): dlnI = -0.4 ln10 dmag - 2 dh / h
    a, b = -0.4 * math.log(10), -2 / 5.0
    expected = 100 * math.sqrt(a**2 * 0.01**2 + b**2 * 0.1**2 + 2 * a * b * 0.3 * 0.01 * 0.1)
    assert err == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("text, match", [
    ("X0 1\nY0 1\nFUNCTION EdgeOnDisk\nPA 0\nL_0 1\nh 1\nn 1\nz_0 1\n", "EdgeOnDisk"),
    ("X0 1\nY0 1\nFUNCTION Sersic\nPA 0\nell 0\nn 1\nI_e 1\n", "lacks r_e"),
    ("X0 1\nY0 1\nFUNCTION Sersic\nPA 0\nell 0\nn 1\nI_e 1\nr_e 2\nh 4\n", "not a parameter"),
    ("X0 1\nY0 1\nFUNCTION Sersic\nPA 0\nell 0\nn 1\nI_e 1\nr_e 2 5,1\n", "upper limit"),
    ("X0 1\nFUNCTION Sersic\n", "FUNCTION before"),
    ("X0 1\nY0 1\nFUNCTION Sersic\nPA 0\nell 0\nn 1\nI_e -3\nr_e 2\n", "positive intensity"),
    ("X0 1\nY0 1\nFUNCTION TiltedSkyPlane\nI_0 1\nm_x 0\nm_y 0\n", "image shape"),
    ("GAINS 3\nX0 1\nY0 1\nFUNCTION FlatSky\nI_sky 1\n", "unexpected"),
])
def test_what_galprof_refuses(text, match):
    with pytest.raises(ModelError, match=match):
        read_imfit_config(text)


def test_config_detection(tmp_path):
    assert is_imfit_config(DATA / "ic3478" / "config_exponential_ic3478_256.dat")
    assert not is_imfit_config(ROOT / "examples" / "sersic.yaml")
    assert not is_imfit_config(DATA / "galfit" / "J162123_sersic.feedme")
    assert not is_imfit_config(tmp_path / "missing.dat")


def test_no_warning_without_intensity_limits():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_imfit_config("X0 10\nY0 10\nFUNCTION Exponential\nPA 0\nell 0.2\nI_0 100\nh 5 1,50\n")


def test_galprof_fit_of_an_imfit_config_recovers_imfits_image(tmp_path):
    """``galprof fit CONFIG --image --mask --noise --errors-are-variances`` on pyimfit's own noiseless
    Sérsic image, from other starting values: IMFIT's parameters come back (the options reach the
    fit: masked pixels and the variance image)."""
    from astropy.io import fits
    from astropy.table import Table

    from galprof.cli import main

    truth = read_imfit_config(CONFIGS["Sersic"])
    fits.PrimaryHDU(GOLDEN["image_Sersic"]).writeto(tmp_path / "img.fits")
    fits.PrimaryHDU(np.full(SHAPE, 1e-4)).writeto(tmp_path / "var.fits")
    mask = np.zeros(SHAPE, np.int16)
    mask[5:9, 60:66] = 1
    fits.PrimaryHDU(mask).writeto(tmp_path / "mask.fits")
    # starting values near IMFIT's (X0 36.3, Y0 31.6, PA 30, ell 0.4, n 2.5, I_e 10, r_e 6), to keep it short
    (tmp_path / "start.dat").write_text("X0 36.2 30,40\nY0 31.7 25,40\nFUNCTION Sersic\nPA 29 -90,90\n"
                                        "ell 0.41 0,0.9\nn 2.4 0.5,6\nI_e 10.5\nr_e 6.1 1,30\n")
    assert main(["fit", str(tmp_path / "start.dat"), "--image", str(tmp_path / "img.fits"), "--mask",
                 str(tmp_path / "mask.fits"), "--noise", str(tmp_path / "var.fits"), "--errors-are-variances",
                 "--out", str(tmp_path / "out")]) == 0
    t = Table.read(tmp_path / "out" / "start_results.fits")
    assert t["status"][0] == "converged"
    assert t["dof"][0] == SHAPE[0] * SHAPE[1] - mask.sum() - 7
    cfg = read_imfit_config(tmp_path / "start.dat")
    values = {k: float(t[k.replace(".", "_")][0]) for k in cfg.model.parameter_names}
    got = imfit_parameters(cfg, values)
    want = imfit_parameters(truth, {k: float(v[0]) for k, v in truth.model.layout(1).values().items()})
    # the images differ by IMFIT's partial pixel integration (1e-4 of the peak): so do the parameters
    for name, tol in (("X0_1", 1e-3), ("Y0_1", 1e-3), ("PA_1", 0.02), ("ell_1", 1e-3), ("n_1", 3e-3),
                      ("I_e_1", 3e-3), ("r_e_1", 3e-3)):
        assert got[name][0] == pytest.approx(want[name][0], rel=tol, abs=tol), name
