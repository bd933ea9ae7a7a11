"""GALFIT files: feedme and constraint files read into galprof, feedme and image-block writers, and
the round trip of a feedme written from GALFIT's documentation through ``galprof fit`` and
``galprof export --galfit``."""

import math
import re

import numpy as np
import pytest
from astropy.io import fits
from scipy import integrate

import galprof
from conftest import ROOT
from galprof import ModelError
from galprof.cli import main
from galprof.io.galfit import GalfitSetup, galfit_header_cards, is_feedme, read_feedme, write_feedme

DATA = ROOT / "tests" / "data" / "galfit"
FEEDME = DATA / "J162123_sersic.feedme"

HEAD = """A) {image}
B) out.fits
C) none
D) none
E) 1
F) none
G) {constraints}
H) 1 {nx} 1 {ny}
I) 50 50
J) {zp}
K) {scale} {scale}
O) regular
P) 0
"""


def feedme_text(components, image="none", constraints="none", nx=80, ny=80, zp=25.0, scale=0.5):
    return HEAD.format(image=image, constraints=constraints, nx=nx, ny=ny, zp=zp, scale=scale) + components


def test_documented_feedme_is_read():
    fm = read_feedme(FEEDME)
    s = fm.setup
    assert s.region == (36, 95, 36, 95) and s.conv_box == (60, 60)
    assert s.zeropoint == 22.5 and s.plate_scale == (0.396, 0.396) and s.exptime == 1.0
    assert s.path(s.image).name == "J162123.19+322056.4_image.fits" and s.path(s.image).is_file()
    assert s.skip == {"sersic1": False, "sky2": False}
    assert fm.components == [(1, "sersic", "sersic1"), (2, "sky", "sky2")]
    g = fm.model["sersic1"].params
    assert (g["x0"].value, g["y0"].value, g["mag"].value, g["re"].value, g["n"].value) == (65.5, 65.0, 17.4, 13.0, 2.7)
    assert (g["q"].value, g["pa"].value) == (0.63, 99.0)
    assert not any(g[k].fixed for k in ("x0", "y0", "mag", "re", "n", "q", "pa"))
    assert g["n"].bounds == (0.3, 8.0) and g["re"].bounds == (0.3, 60.0)  # the constraint file
    sky = fm.model["sky2"]
    assert sky.profile.name == "sky" and sky.params["sky"].fixed is True and sky.params["sky"].value == 0.0
    assert fm.model.zeropoint == 22.5
    assert is_feedme(FEEDME) and not is_feedme(ROOT / "examples" / "sersic.yaml")


def test_exptime_enters_the_zeropoint(tmp_path):
    fits.PrimaryHDU(np.zeros((80, 80)), header=fits.Header([("EXPTIME", 100.0)])).writeto(tmp_path / "im.fits")
    comp = " 0) psf\n 1) 40 40 1 1\n 3) 20.0 1\n Z) 0\n"
    (tmp_path / "a.feedme").write_text(feedme_text(comp, image="im.fits"))
    fm = read_feedme(tmp_path / "a.feedme")
    assert fm.setup.exptime == 100.0
    assert fm.model.zeropoint == pytest.approx(25.0 + 5.0)  # GALFIT: mag = J - 2.5 log10(counts / EXPTIME)
    assert read_feedme(tmp_path / "a.feedme", exptime=1.0).model.zeropoint == 25.0


def _pixel_average(f, x, y):
    return integrate.dblquad(lambda yy, xx: f(xx, yy), x - 0.5, x + 0.5, y - 0.5, y + 0.5, epsabs=1e-13,
                             epsrel=1e-11)[0]


@pytest.mark.parametrize("gtype, lines, radial", [
    ("ferrer", " 4) 20.0 1\n 5) 2.0 1\n 6) 0.5 1\n", lambda r: np.clip(1 - (r / 20.0) ** 1.5, 0, None) ** 2.0),
    ("king", " 4) 6.0 1\n 5) 30.0 1\n 6) 2.0 1\n",
     lambda r: np.where(r < 30, ((1 + (r / 6) ** 2) ** -0.5 - (1 + 25.0) ** -0.5), 0.0) ** 2.0),
])
def test_central_surface_brightness_of_ferrer_and_king(gtype, lines, radial):
    mu0, zp, scale, q, pa = 19.0, 25.0, 0.5, 0.7, 30.0
    comp = f" 0) {gtype}\n 1) 40.3 39.8 1 1\n 3) {mu0} 1\n{lines} 9) {q} 1\n10) {pa} 1\n Z) 0\n"
    fm = read_feedme(feedme_text(comp, zp=zp, scale=scale))
    img = galprof.render(fm.model, (80, 80))
    i0 = 10 ** (-0.4 * (mu0 - zp)) * scale**2  # counts/pixel where mu = mu0 (mag/arcsec^2)
    t = math.radians(pa)

    def f(x, y):
        dx, dy = x - 40.3, y - 39.8
        u = -dx * math.sin(t) + dy * math.cos(t)
        v = -dx * math.cos(t) - dy * math.sin(t)
        return i0 * radial(math.hypot(u, v / q)) / radial(0.0)

    for x, y in ((40, 40), (43, 38), (35, 44)):
        assert img[y - 1, x - 1] == pytest.approx(_pixel_average(f, x, y), rel=2e-5)


# Component blocks as GALFIT's documentation lays them out (its example input file and user's manual):
# every line 1) to 10) present, the unused ones zero and fixed, comments after "#". Numbering:
# moffat 3) total magnitude, 4) FWHM [pix], 5) powerlaw; ferrer 3) central surface brightness
# [mag/arcsec^2], 4) outer truncation radius [pix], 5) alpha (outer truncation sharpness), 6) beta
# (central slope); king 3) mu(0) [mag/arcsec^2], 4) R_c [pix], 5) R_t [pix], 6) alpha (powerlaw, 2
# for King's profile). The profiles (GALFIT's manual): Moffat I0 / (1 + (r/a)^2)^beta with FWHM =
# 2 a sqrt(2^(1/beta) - 1); Ferrer S0 (1 - (r/R_out)^(2 - beta))^alpha inside R_out; King
# S0 [1 - 1/(1 + (R_t/R_c)^2)^(1/alpha)]^-alpha [1/(1 + (r/R_c)^2)^(1/alpha) - 1/(1 + (R_t/R_c)^2)^(1/alpha)]^alpha
# inside R_t.
DOCUMENTED_BLOCKS = """
# Moffat function
 0) moffat             #  Component type
 1) 40.3 41.6  1 1     #  Position x, y
 3) 19.5       1       #  Total magnitude
 4) 3.2        1       #  FWHM               [pix]
 5) 2.7        1       #  powerlaw
 6) 0.0000     0       #     -----
 7) 0.0000     0       #     -----
 8) 0.0000     0       #     -----
 9) 0.85       1       #  Axis ratio (b/a)
10) 20.0       1       #  Position angle (PA) [deg: Up=0, Left=90]
 Z) 0                  #  Skip this model in output image?  (yes=1, no=0)

# Ferrer function
 0) ferrer             #  Component type
 1) 50.2 49.7  1 1     #  Position x, y
 3) 20.5       1       #  Central surface brghtness [mag/arcsec^2]
 4) 25.0       1       #  Outer truncation radius  [pix]
 5) 2.5        1       #  Alpha (outer truncation sharpness)
 6) 0.3        0       #  Beta (central slope)
 7) 0.0000     0       #     -----
 8) 0.0000     0       #     -----
 9) 0.4        1       #  Axis ratio (b/a)
10) 30.0       1       #  Position angle (PA) [deg: Up=0, Left=90]
 Z) 0                  #  Skip this model in output image?  (yes=1, no=0)

# King function
 0) king               #  Component type
 1) 60.4 59.5  1 1     #  position x, y
 3) 18.0       1       #  mu(0)  [mag/arcsec^2]
 4) 3.0        1       #  R_c  [pix]
 5) 40.0       1       #  R_t  [pix]
 6) 1.5        0       #  alpha (powerlaw)
 7) 0.0000     0       #     -----
 8) 0.0000     0       #     -----
 9) 0.9        1       #  axis ratio (b/a)
10) -10.0      1       #  position angle (PA)  [Degrees: Up=0, Left=90]
 Z) 0                  #  Skip this model in output image?  (yes=1, no=0)
"""


def test_moffat_ferrer_and_king_blocks_as_documented():
    zp, scale = 25.0, 0.5
    fm = read_feedme(feedme_text(DOCUMENTED_BLOCKS, nx=100, ny=100, zp=zp, scale=scale))
    assert fm.components == [(1, "moffat", "moffat1"), (2, "ferrer", "ferrer2"), (3, "king", "king3")]
    m = fm.model
    mo, fe, ki = (m[c].params for c in ("moffat1", "ferrer2", "king3"))
    assert (mo["mag"].value, mo["fwhm"].value, mo["beta"].value, mo["q"].value, mo["pa"].value) == \
        (19.5, 3.2, 2.7, 0.85, 20.0)
    assert (fe["rout"].value, fe["alpha"].value, fe["beta"].value) == (25.0, 2.5, 0.3) and fe["beta"].fixed
    assert not fe["alpha"].fixed and not fe["rout"].fixed
    assert (ki["rc"].value, ki["rt"].value, ki["alpha"].value) == (3.0, 40.0, 1.5) and ki["alpha"].fixed
    r = galprof.Renderer(m, [(100, 100)])
    comps = {k: r.crop(v, 0) for k, v in r.components(r.values()).items()}

    def moffat(r):  # counts per pixel area, from the total magnitude
        beta, fwhm, q = 2.7, 3.2, 0.85
        a = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
        total = 10 ** (-0.4 * (19.5 - zp))
        return total * (beta - 1) / (math.pi * a * a * q) * (1 + (r / a) ** 2) ** -beta

    def ferrer(r):
        s0 = 10 ** (-0.4 * (20.5 - zp)) * scale**2
        return s0 * max(1 - (r / 25.0) ** (2 - 0.3), 0.0) ** 2.5

    def king(r):
        s0 = 10 ** (-0.4 * (18.0 - zp)) * scale**2
        a, t = 1.5, (1 + (40.0 / 3.0) ** 2) ** (-1 / 1.5)
        inner = (1 + (r / 3.0) ** 2) ** (-1 / a) - t if r < 40.0 else 0.0
        return s0 * (1 - t) ** -a * inner**a

    for name, radial, (xc, yc, q, pa) in (("moffat1", moffat, (40.3, 41.6, 0.85, 20.0)),
                                          ("ferrer2", ferrer, (50.2, 49.7, 0.4, 30.0)),
                                          ("king3", king, (60.4, 59.5, 0.9, -10.0))):
        t = math.radians(pa)

        def f(x, y, xc=xc, yc=yc, q=q, t=t, radial=radial):
            dx, dy = x - xc, y - yc
            return radial(math.hypot(-dx * math.sin(t) + dy * math.cos(t), (-dx * math.cos(t) - dy * math.sin(t)) / q))

        for ox, oy in ((0, 0), (3, -2), (-5, 4)):
            x, y = round(xc) + ox, round(yc) + oy
            assert comps[name][y - 1, x - 1] == pytest.approx(_pixel_average(f, x, y), rel=2e-5), (name, x, y)


def test_constraints(tmp_path):
    comps = (" 0) sersic\n 1) 40 41 1 1\n 3) 18 1\n 4) 5 1\n 5) 2 1\n 9) 0.8 1\n10) 10 1\n Z) 0\n"
             " 0) expdisk\n 1) 40.5 41 1 1\n 3) 17 1\n 4) 10 1\n 9) 0.5 1\n10) 12 1\n Z) 0\n"
             " 0) gaussian\n 1) 40 41 1 1\n 3) 19 1\n 4) 2 1\n 9) 0.9 1\n10) 0 1\n Z) 1\n")
    (tmp_path / "c.constraints").write_text("# comment\n1_2  x  offset\n1_2_3  y  offset\n1_2  re  ratio\n"
                                            "1  n  0.5 to 6\n3  x  -1  0.5\n2  q  0.2 to 0.9\n")
    (tmp_path / "c.feedme").write_text(feedme_text(comps, constraints="c.constraints"))
    fm = read_feedme(tmp_path / "c.feedme")
    m = fm.model
    assert m["expdisk2"].params["x0"].tie.expr == "sersic1.x0 + (0.5)"
    assert m["expdisk2"].params["y0"].tie.expr == "sersic1.y0"
    assert m["gaussian3"].params["y0"].tie.expr == "sersic1.y0"
    assert m["expdisk2"].params["rs"].tie.expr == "sersic1.re * (2.0)"  # GALFIT: "re (or rs)"
    assert m["sersic1"].params["n"].bounds == (0.5, 6.0)
    assert m["gaussian3"].params["x0"].bounds == (39.0, 40.5)  # relative to the input value
    assert m["expdisk2"].params["q"].bounds == (0.2, 0.9)
    assert fm.setup.skip["gaussian3"] is True
    values = m.layout(1).values()
    assert float(values["expdisk2.x0"][0]) == 40.5 and float(values["expdisk2.rs"][0]) == 10.0


@pytest.mark.parametrize("line, match", [
    ("3-1 mag -0.5 3", "difference or ratio"),
    ("1/2 re 1 3", "difference or ratio"),
    ("1_9 x offset", "component 9"),
    ("1 f1a 0 1", "Fourier"),
    ("1 n 3 to 1", "empty"),
    ("2 mu 15 to 20", "mu\\(0\\)"),
])
def test_constraints_galprof_refuses(tmp_path, line, match):
    comps = (" 0) sersic\n 1) 40 41 1 1\n 3) 18 1\n 4) 5 1\n 5) 2 1\n 9) 0.8 1\n10) 10 1\n"
             " 0) ferrer\n 1) 40 41 1 1\n 3) 18 1\n 4) 15 1\n 5) 2 1\n 6) 0 1\n 9) 0.5 1\n10) 10 1\n")
    (tmp_path / "c.constraints").write_text(line + "\n")
    (tmp_path / "c.feedme").write_text(feedme_text(comps, constraints="c.constraints"))
    with pytest.raises(ModelError, match=match):
        read_feedme(tmp_path / "c.feedme")


@pytest.mark.parametrize("extra, match", [
    (" 0) nuker\n 1) 40 40 1 1\n 3) 18 1\n", "nuker"),
    (" 0) sersic\n 1) 40 40 1 1\n 3) 18 1\n 4) 5 1\n 5) 2 1\n 9) 1 1\n10) 0 1\nF1) 0.1 20 1 1\n", "Fourier mode"),
    (" 0) sersic\n 1) 40 40 1 1\n 3) 18 1\n 4) 5 1\n 5) 2 1\n 9) 1 1\n10) 0 1\nB2) 0.1 1\n", "bending"),
    (" 0) sersic\n 1) 40 40 1 1\n 3) 18 1\n 9) 1 1\n10) 0 1\n", "lacks re, n"),
    (" 0) sersic\n 1) 40 40 2 1\n 3) 18 1\n 4) 5 1\n 5) 2 1\n", "toggle"),
    (" 0) blob\n 1) 40 40 1 1\n", "not a GALFIT component type"),
])
def test_components_galprof_refuses(extra, match):
    with pytest.raises(ModelError, match=match):
        read_feedme(feedme_text(extra))


def test_diffusion_kernel_is_refused():
    text = feedme_text(" 0) psf\n 1) 40 40 1 1\n 3) 20 1\n").replace("D) none", "D) psf.fits kernel.fits")
    with pytest.raises(ModelError, match="diffusion"):
        read_feedme(text)


def _same_models(a, b, rel=1e-7):
    assert [c.name for c in a.components] == [c.name for c in b.components]
    assert [c.profile.name for c in a.components] == [c.profile.name for c in b.components]
    assert a.zeropoint == pytest.approx(b.zeropoint, abs=1e-9)
    va, vb = a.layout(1).values(), b.layout(1).values()
    la, lb = a.layout(1), b.layout(1)
    assert la.free == lb.free and la.tied == lb.tied
    for k in a.parameter_names:
        assert float(va[k][0]) == pytest.approx(float(vb[k][0]), rel=rel, abs=1e-9), k
        comp, p = k.split(".")
        pa, pb = a[comp].params[p], b[comp].params[p]
        if pa.bounds is not None or pb.bounds is not None:
            assert pa.bounds == pytest.approx(pb.bounds), k


def test_write_and_read_back_every_component(tmp_path):
    comps = (" 0) sersic\n 1) 40.25 41.5 1 1\n 3) 18.5 1\n 4) 5.5 1\n 5) 2.5 1\n 9) 0.8 1\n10) 10 1\nC0) -0.3 1\n"
             " 0) expdisk\n 1) 40.75 41.5 1 1\n 3) 17.25 1\n 4) 10 1\n 9) 0.5 1\n10) 12 0\n"
             " 0) devauc\n 1) 30 30 0 0\n 3) 19 1\n 4) 3 1\n 9) 0.9 1\n10) -40 1\n"
             " 0) gaussian\n 1) 50 50 1 1\n 3) 21 1\n 4) 2.5 1\n 9) 0.6 1\n10) 80 1\n Z) 1\n"
             " 0) moffat\n 1) 20 60 1 1\n 3) 20 1\n 4) 3 1\n 5) 2.5 1\n 9) 1 0\n10) 0 0\n"
             " 0) ferrer\n 1) 40 40 1 1\n 3) 20.5 1\n 4) 25 1\n 5) 2 1\n 6) 0.5 0\n 9) 0.4 1\n10) 30 1\n"
             " 0) king\n 1) 60 20 1 1\n 3) 18 0\n 4) 2 1\n 5) 20 1\n 6) 2 0\n 9) 0.9 1\n10) 5 1\n"
             " 0) psf\n 1) 70 70 1 1\n 3) 22 1\n"
             " 0) sky\n 1) 0.5 1\n 2) 0.001 1\n 3) -0.002 1\n")
    (tmp_path / "c.constraints").write_text("1_2 x offset\n1_2 y offset\n1 n 0.5 to 8\n")
    (tmp_path / "in.feedme").write_text(feedme_text(comps, constraints="c.constraints"))
    fm = read_feedme(tmp_path / "in.feedme")
    assert fm.model["king7"].params["mag"].tie is not None  # fixed mu(0), free shape: tied to keep mu(0)
    assert fm.model["sky9"].profile.name == "tiltedsky"
    written = write_feedme(tmp_path / "out.feedme", fm.model, fm.setup)
    assert written[1].name == "out.feedme.constraints"
    back = read_feedme(tmp_path / "out.feedme")
    # the function tie of the king's magnitude is written as mu(0), fixed, and read back as the same tie
    _same_models(fm.model, back.model)
    assert back.setup.skip["gaussian4"] is True
    text = (tmp_path / "out.feedme").read_text()
    assert re.search(r"^ 3\) 18\s+0", text, flags=re.M)  # king's mu(0), as written in the input


def test_header_cards():
    fm = read_feedme(feedme_text(" 0) sersic\n 1) 40 41 1 0\n 3) 18 1\n 4) 5 1\n 5) 2 1\n 9) 0.8 1\n10) 10 1\n"
                                 " 0) ferrer\n 1) 40 40 1 1\n 3) 20.5 1\n 4) 25 1\n 5) 2 1\n 6) 0 0\n 9) 0.4 1\n"
                                 "10) 30 1\n 0) sky\n 1) 0.5 1\n 2) 0 0\n 3) 0 0\n"))
    values = {k: float(v[0]) for k, v in fm.model.layout(1).values().items()}
    errors = {k: 0.01 for k in values}
    cards = dict((k, v) for k, v, _ in galfit_header_cards(fm.model, values, errors, setup=fm.setup,
                                                          bad=["sersic1.n"], region_shape=(80, 80)))
    assert cards["COMP_1"] == "sersic" and cards["COMP_2"] == "ferrer" and cards["COMP_3"] == "sky"
    assert cards["1_XC"] == "40.0000 +/- 0.0100" and cards["1_YC"] == "[41.0000]"
    assert cards["1_N"] == "*2.0000* +/- *0.0100*"
    assert {"1_MAG", "1_RE", "1_AR", "1_PA"} <= set(cards) and "1_C0" not in cards
    assert cards["2_MU0"].startswith("20.5000 +/- ")  # the central surface brightness as given
    assert cards["3_SKY"] == "0.5000 +/- 0.0100" and cards["3_XC"] == "[40.5000]" and cards["3_DSDX"] == "[0.0000]"


# ------------------------------------------------------------------------------------------------
# The round trip: feedme -> galprof fit -> galprof export --galfit -> feedme


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    out = tmp_path_factory.mktemp("galfit_fit")
    assert main(["fit", str(FEEDME), "--out", str(out), "--imgblock", "--plots"]) == 0
    return out


def test_fit_writes_galfit_outputs(fitted):
    from astropy.table import Table

    t = Table.read(fitted / "J162123_sersic_results.fits")
    assert len(t) == 1 and t["status"][0] == "converged" and t["flags"][0] == 0
    assert 1.0 < t["chi2_nu"][0] < 3.0
    with fits.open(fitted / "J162123_imgblock.fits") as hdul:
        assert len(hdul) == 4 and hdul[0].data is None
        data, model, resid = (hdul[i].data.astype(float) for i in (1, 2, 3))
        h = hdul[2].header
    assert data.shape == (60, 60)  # the fitting region H) 36 95 36 95
    image = fits.getdata(ROOT / "examples" / "sdss" / "J162123.19+322056.4_image.fits")
    np.testing.assert_allclose(data, image[35:95, 35:95], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(resid, data - model, atol=1e-5)
    assert h["FITSECT"] == "[36:95,36:95]" and h["MAGZPT"] == 22.5 and h["COMP_1"] == "sersic"
    assert h["NDOF"] == t["dof"][0] and h["CHISQ"] == pytest.approx(t["chi2"][0])
    assert h["CHI2NU"] == pytest.approx(t["chi2_nu"][0])
    # every value 'v +/- e' equals the table's (full-image pixel coordinates)
    for key, col in (("1_XC", "sersic1_x0"), ("1_YC", "sersic1_y0"), ("1_MAG", "sersic1_mag"), ("1_RE", "sersic1_re"),
                     ("1_N", "sersic1_n"), ("1_AR", "sersic1_q"), ("1_PA", "sersic1_pa")):
        v, e = (float(s) for s in h[key].split("+/-"))
        assert v == pytest.approx(t[col][0], abs=6e-5) and e == pytest.approx(t[col + "_err"][0], abs=6e-5)
    assert h["2_SKY"] == "[0.0000]"
    assert (fitted / "J162123_sersic_fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_feedme_round_trip(fitted, tmp_path):
    from astropy.table import Table

    t = Table.read(fitted / "J162123_sersic_results.fits")
    # export copies the setup from the fit's feedme; write it somewhere else to check the paths
    out = tmp_path / "sub" / "exported.feedme"
    out.parent.mkdir()
    assert main(["export", str(fitted / "J162123_sersic_results.fits"), "--galfit", "--id", "J162123_sersic",
                 "--out", str(out)]) == 0
    exported = read_feedme(out)
    original = read_feedme(FEEDME)
    # the same model: components, types, free/fixed/tied parameters, bounds (from the constraint
    # file written next to it), setup ...
    assert exported.components == original.components
    assert exported.setup.region == original.setup.region and exported.setup.conv_box == original.setup.conv_box
    assert exported.setup.zeropoint == 22.5 and exported.setup.plate_scale == (0.396, 0.396)
    for attr in ("image", "sigma", "psf", "mask"):
        assert exported.setup.path(getattr(exported.setup, attr)).resolve() == \
            original.setup.path(getattr(original.setup, attr)).resolve()
    lo, le = original.model.layout(1), exported.model.layout(1)
    assert lo.free == le.free and lo.tied == le.tied
    for k in original.model.parameter_names:
        comp, p = k.split(".")
        assert exported.model[comp].params[p].bounds == original.model[comp].params[p].bounds
    # ... with the fitted values
    ve = le.values()
    for k in original.model.parameter_names:
        assert float(ve[k][0]) == pytest.approx(float(t[k.replace(".", "_")][0]), rel=1e-7, abs=1e-9), k
    # and the feedme galprof fit wrote itself reads back the same
    _same_models(read_feedme(fitted / "J162123_sersic_fit.feedme").model, exported.model)


def test_export_needs_a_galaxy(fitted, tmp_path, capsys):
    assert main(["export", str(fitted / "J162123_sersic_results.fits"), "--galfit", "--id", "nope",
                 "--out", str(tmp_path / "x.feedme")]) == 2
    assert "no galaxy with id 'nope'" in capsys.readouterr().err


def test_feedme_without_sigma_needs_a_noise_model(tmp_path, capsys):
    text = FEEDME.read_text().replace("C) ../../../examples/sdss/J162123.19+322056.4_sigma.fits", "C) none")
    text = text.replace("../../../examples", str(ROOT / "examples"))
    text = text.replace("J162123_badpix", str(DATA / "J162123_badpix"))
    text = text.replace("G) J162123.constraints", "G) none")
    (tmp_path / "nosigma.feedme").write_text(text)
    assert main(["fit", str(tmp_path / "nosigma.feedme"), "--out", str(tmp_path)]) == 2
    assert "--gain" in capsys.readouterr().err


def test_setup_defaults():
    s = GalfitSetup(zeropoint=20.0, exptime=10.0)
    assert s.model_zeropoint == pytest.approx(22.5)
    assert s.path("none") is None and s.path("") is None


def test_option_p_renders_the_starting_model(tmp_path):
    """``P) 2``: GALFIT makes the image block of the input model and stops; so does galprof."""
    text = FEEDME.read_text().replace("P) 0 ", "P) 2 ").replace("../../../examples", str(ROOT / "examples"))
    text = text.replace("F) J162123_badpix", f"F) {DATA / 'J162123_badpix'}")
    text = text.replace("G) J162123.constraints", f"G) {DATA / 'J162123.constraints'}")
    (tmp_path / "p2.feedme").write_text(text)
    assert main(["fit", str(tmp_path / "p2.feedme"), "--out", str(tmp_path)]) == 0
    from astropy.table import Table

    t = Table.read(tmp_path / "p2_results.fits")
    assert t["status"][0] == "max_iter" and t["n_iter"][0] == 0 and "not fitted" in t["message"][0]
    assert t["sersic1_re"][0] == 13.0 and t["sersic1_x0"][0] == 65.5
    fm = read_feedme(tmp_path / "p2.feedme")
    psf = fits.getdata(ROOT / "examples" / "sdss" / "J162123.19+322056.4_psf.fits").astype(float)
    values = {k: float(v[0]) for k, v in fm.model.layout(1).values().items()}
    full = galprof.render(fm.model, (128, 128), psf / psf.sum(), psf_kind="optical", values=values)
    with fits.open(tmp_path / "J162123_imgblock.fits") as hdul:
        model = hdul[2].data.astype(float)
        assert hdul[2].header["1_RE"] == "*13.0000* +/- *nan*"  # no error: not fitted
    # the region's model is the full image's model, cut out (light from outside the region included)
    np.testing.assert_allclose(model, full[35:95, 35:95], rtol=2e-6, atol=1e-7 * full.max())


def test_which_fit_command():
    from galprof.single import wants_single

    assert wants_single([str(FEEDME), "--out", "x"])
    assert wants_single([str(ROOT / "tests" / "data" / "ic3478" / "config_sersic_ic3478_256.dat"), "--image", "i"])
    # a YAML model is the catalogue fit, even with --image (the catalogue's large image)
    assert not wants_single([str(ROOT / "examples" / "sersic.yaml"), "--catalog", "c.csv", "--image", "big.fits"])
