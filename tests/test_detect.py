"""Automatic inputs (galprof.detect): conventions and measurements against GalSim truths, the
Sérsic relations against scipy, masks against scipy.ndimage, and the bundled SDSS galaxies
against their provided segmentation maps and the fits that use them."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("sep")

import galprof  # noqa: E402
from conftest import EXAMPLES  # noqa: E402
from galprof.detect import (  # noqa: E402
    DetectOptions,
    auto_inputs,
    detect,
    dilate_mask,
    initial_values,
    measure,
    pa_from_theta,
    psf_radii,
    sersic_concentration,
    sersic_n_from_concentration,
    sky_statistics,
)

SDSS = [("J162123.19+322056.4", 2), ("J100247.00+042559.8", 1), ("J092800.99+014011.9", 1)]
PSF_FWHM = 3.5


def _galsim_psf():
    import galsim

    return galsim.Moffat(beta=4.5, fwhm=PSF_FWHM)


def _draw(size, objects, psf_obj):
    """GalSim Sérsics ``(x, y, flux, re, n, q, pa)`` (galprof's conventions: re semi-major, PA from
    +y) convolved with the PSF and drawn with the pixel response."""
    import galsim

    im = galsim.ImageD(size, size, scale=1.0)
    for x, y, flux, re, n, q, pa in objects:
        g = galsim.Sersic(n, half_light_radius=re * math.sqrt(q), flux=flux).shear(q=q, beta=(pa + 90) * galsim.degrees)
        galsim.Convolve(g, psf_obj).drawImage(image=im, center=galsim.PositionD(x, y), add_to_image=True)
    return im.array


def _psf_image():
    import galsim

    return galsim.Convolve(_galsim_psf(), galsim.Pixel(1.0)).drawImage(nx=41, ny=41, scale=1.0,
                                                                       method="no_pixel").array


def test_sersic_concentration_matches_scipy():
    from scipy.special import gammaincinv

    n = np.array([0.5, 1.0, 2.0, 4.0, 6.0])
    ref = (gammaincinv(2 * n, 0.8) / gammaincinv(2 * n, 0.2)) ** n
    np.testing.assert_allclose(sersic_concentration(n), ref, rtol=1e-7)
    # the inverse, inside its range
    np.testing.assert_allclose(sersic_n_from_concentration(ref[:4]), n[:4], rtol=1e-3)
    assert sersic_n_from_concentration(1.0) == 0.5 and sersic_n_from_concentration(1e4) == 6.0


def test_pa_from_theta_convention():
    # sep/SExtractor: counter-clockwise from +x; galprof: counter-clockwise from +y, in (-90, 90]
    np.testing.assert_allclose(pa_from_theta(np.radians([0.0, 90.0, 45.0, -45.0, 10.0])), [90.0, 0.0, -45.0, 45.0,
                                                                                          -80.0])


def test_dilate_mask_matches_scipy():
    from scipy.ndimage import binary_dilation

    rng = np.random.default_rng(3)
    m = rng.random((40, 50)) > 0.97
    for r in (1.0, 2.0, 3.5):
        k = int(r)
        yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
        ref = binary_dilation(m, structure=xx ** 2 + yy ** 2 <= r * r)
        np.testing.assert_array_equal(dilate_mask(m, r), ref)


def test_sky_statistics_of_noise_with_sources():
    rng = np.random.default_rng(5)
    v = 3.0 + rng.normal(0.0, 2.0, 40000)
    level, rms = sky_statistics(v)
    assert abs(level - 3.0) < 0.06 and abs(rms - 2.0) < 0.05
    # a positive tail of faint sources: the mode estimate stays near the sky, the mean does not
    v2 = np.concatenate([v, 3.0 + rng.exponential(6.0, 4000)])
    level2, _ = sky_statistics(v2)
    assert abs(level2 - 3.0) < 0.25 < abs(np.mean(v2) - 3.0)


@pytest.mark.parametrize("pa", [-60.0, 0.0, 35.0, 80.0])
def test_measurements_against_galsim_truth(pa):
    """Centre, PA, q, size, index and magnitude starts of a GalSim galaxy with sky and noise."""
    rng = np.random.default_rng(int(pa) + 100)
    truth = dict(x=64.3, y=63.8, flux=3000.0, re=6.0, n=1.5, q=0.45, pa=pa)
    image = _draw(128, [tuple(truth.values())], _galsim_psf()) + 0.2 + rng.normal(0.0, 1.0, (128, 128))
    psf = _psf_image()
    det = detect(image)
    assert det.target
    m = measure(image, det, psf=psf)
    assert abs(m.x - truth["x"]) < 0.1 and abs(m.y - truth["y"]) < 0.1
    assert abs((m.pa - pa + 90) % 180 - 90) < 3.0
    assert abs(m.q - truth["q"]) < 0.1
    assert abs(m.re / truth["re"] - 1) < 0.25
    assert 0.7 < m.n < 3.0
    assert abs(m.mag(0.0) + 2.5 * math.log10(truth["flux"])) < 0.15
    assert abs(m.sky - 0.2) < 0.05


def test_psf_radii_of_a_gaussian():
    yy, xx = np.mgrid[-20:21, -20:21]
    s = 2.0
    psf = np.exp(-(xx ** 2 + yy ** 2) / (2 * s * s))
    r = psf_radii(psf)
    # a circular Gaussian holds fraction f inside s sqrt(-2 ln(1 - f)); sampled values spread over
    # pixels (the apertures' model) add a variance of 1/12 px^2
    se = math.sqrt(s * s + 1 / 12)
    for f in (0.2, 0.5, 0.8):
        assert abs(r[f"r{int(100 * f)}"] - se * math.sqrt(-2 * math.log(1 - f))) < 0.03
    assert abs(r["sigma"] - se) < 0.03


def test_masks_of_two_galaxies():
    rng = np.random.default_rng(8)
    image = _draw(96, [(48.2, 47.9, 2000.0, 4.0, 1.0, 0.7, 20.0), (72.0, 60.0, 3000.0, 3.0, 1.0, 0.8, -40.0)],
                  _galsim_psf()) + rng.normal(0.0, 1.0, (96, 96))
    det = detect(image)
    assert len(det.objects) >= 2 and det.target == det.segmap[47, 48]
    back = det.mask("background", dilate=2.0)
    assert back[59, 71] and not back[47, 48]                # the neighbour's centre masked, the target's not
    other = (det.segmap != 0) & (det.segmap != det.target)
    assert back[other & (det.segmap != det.target)].all()    # every other segment pixel
    excl = det.mask("exclusive", dilate=2.0)
    target = det.segmap == det.target
    assert not excl[target].any() and excl[other].all() and excl[0, 0]
    kept = det.mask("background", keep=[int(det.segmap[59, 71])])
    assert not kept[59, 71]


def test_neighbours_become_components():
    rng = np.random.default_rng(9)
    psf = _psf_image()
    image = _draw(96, [(48.2, 47.9, 2000.0, 4.0, 1.0, 0.7, 20.0), (60.0, 52.0, 3000.0, 3.0, 1.0, 0.8, -40.0)],
                  _galsim_psf()) + rng.normal(0.0, 1.0, (96, 96))
    model = galprof.load_model(EXAMPLES / "sersic.yaml")
    r = auto_inputs(image, model=model, sigma=np.ones_like(image), psf=psf, options=DetectOptions(neighbours=2))
    assert [c.name for c in r.model.components] == ["galaxy", "sky", "nb1"]
    assert abs(r.starts["nb1.x0"] - 60.0) < 1.0 and abs(r.starts["nb1.y0"] - 52.0) < 1.0
    assert not r.mask[51, 59]
    res = galprof.fit(r.model, [image], [np.ones_like(image)], [r.mask], psf,
                      initial={k: [v] for k, v in r.starts.items()})
    assert res.status[0] == 0
    assert abs(res.values["galaxy.re"][0] / 4.0 - 1) < 0.1 and abs(res.values["nb1.re"][0] / 3.0 - 1) < 0.1


def test_initial_values_bulge_disk_rules():
    model = galprof.load_model(EXAMPLES / "bulge_disk.yaml")
    rng = np.random.default_rng(4)
    image = _draw(96, [(48.2, 47.9, 2000.0, 5.0, 2.5, 0.6, 30.0)], _galsim_psf()) + rng.normal(0, 1.0, (96, 96))
    det = detect(image)
    m = measure(image, det, psf=_psf_image())
    starts = initial_values(model, m, given={"bulge.q"})
    assert "bulge.q" not in starts and "disk.x0" not in starts        # given; tied
    f = 10 ** (-0.4 * (starts["bulge.mag"] - model.zeropoint)) + 10 ** (-0.4 * (starts["disk.mag"] - model.zeropoint))
    assert abs(f / m.total_flux - 1) < 1e-9                           # the flux is shared, not duplicated
    bt = 10 ** (-0.4 * (starts["bulge.mag"] - model.zeropoint)) / f
    assert abs(bt - np.clip((m.n - 1) / 3, 0.2, 0.8)) < 1e-9
    assert abs(starts["disk.rs"] - m.re / 1.6783469900166608) < 1e-9
    assert abs(starts["bulge.re"] - 0.4 * m.re) < 1e-9 and starts["bulge.n"] >= 2.0
    layout = model.layout(1)
    for k, v in starts.items():
        lo, hi = layout.bounds(k)
        assert (lo is None or v > lo) and (hi is None or v < hi)


def _sdss(name):
    from astropy.io import fits

    base = EXAMPLES / "sdss" / name
    return [np.asarray(fits.getdata(f"{base}_{k}.fits"), dtype=np.float64) for k in ("image", "sigma", "psf", "mask")]


@pytest.mark.parametrize("name,label", SDSS)
def test_sdss_target_segment_matches_the_given_map(name, label):
    image, _, _, seg = _sdss(name)
    det = detect(image)
    a, b = det.segmap == det.target, seg == label
    assert (a & b).sum() / (a | b).sum() >= 0.8


def test_sdss_fits_with_automatic_inputs_agree_with_given_masks():
    """The bundled SDSS galaxies, single Sérsic (examples/sersic.yaml, sky held at 0): automatic mask and starts
    against the provided segmentation maps and catalogue starts; agreement within the errors."""
    from galprof.catalog import Catalog, InputOptions

    data = galprof.load_model(EXAMPLES / "sersic.yaml").to_dict()
    data["components"]["sky"]["sky"] = {"value": 0.0, "fixed": True}   # sky-subtracted SDSS frames
    model = galprof.load_model(data)
    given = Catalog(EXAMPLES / "sdss" / "catalog.csv", model, InputOptions(auto_starts=False, auto_mask=False))
    for i, (name, _) in enumerate(SDSS):
        s = given.load(i)
        r = auto_inputs(s.image, model=model, sigma=s.sigma, psf=s.psf)
        assert set(r.starts) == set(model.layout(1).free)
        fa = galprof.fit(model, [s.image], [s.sigma], [r.mask], s.psf, initial={k: [v] for k, v in r.starts.items()})
        fg = galprof.fit(model, [s.image], [s.sigma], [s.mask], s.psf, initial={k: [v] for k, v in s.starts.items()})
        assert fa.status[0] == 0 and fg.status[0] == 0, name
        for k in fa.free:
            d = fa.values[k][0] - fg.values[k][0]
            if k.endswith(".pa"):
                d = (d + 90) % 180 - 90
            assert abs(d) < math.hypot(fa.errors[k][0], fg.errors[k][0]), (name, k, d)


def test_catalogue_run_fills_starts_masks_and_sigma(tmp_path):
    """A catalogue with only ids and images (no sigma, no mask, no starts, no gain): every free
    parameter gets a measured start, the other sources a mask, and sigma the background RMS."""
    from astropy.table import Table

    from galprof.catalog import Catalog, InputOptions

    t = Table({"id": [name[:7] for name, _ in SDSS], "image": [f"{name}_image.fits" for name, _ in SDSS],
               "psf": [f"{name}_psf.fits" for name, _ in SDSS]})
    path = tmp_path / "cat.csv"
    t["image"] = [str(EXAMPLES / "sdss" / v) for v in t["image"]]
    t["psf"] = [str(EXAMPLES / "sdss" / v) for v in t["psf"]]
    t.write(path)
    model = galprof.load_model(EXAMPLES / "sersic.yaml")
    cat = Catalog(path, model, InputOptions())
    for i, (name, label) in enumerate(SDSS):
        s = cat.load(i)
        assert not s.fatal and s.flags == 0, s.message
        assert set(s.starts) == set(model.layout(1).free)
        assert "sigma from the background RMS" in s.message
        _, _, _, seg = _sdss(name)
        other = (seg != 0) & (seg != label)
        assert not other.any() or s.mask[other].mean() > 0.9     # other sources masked
        assert not s.mask[64, 64]


def test_no_source_is_flagged_not_fatal(tmp_path):
    from astropy.io import fits
    from astropy.table import Table

    from galprof.catalog import Catalog, InputOptions
    from galprof.flags import Flag

    rng = np.random.default_rng(1)
    fits.PrimaryHDU(rng.normal(0.0, 1.0, (48, 48))).writeto(tmp_path / "noise.fits")
    Table({"id": [1], "image": ["noise.fits"]}).write(tmp_path / "cat.csv")
    model = galprof.load_model(EXAMPLES / "sersic.yaml")
    s = Catalog(tmp_path / "cat.csv", model, InputOptions()).load(0)
    assert not s.fatal and s.flags & Flag.NO_DETECTION and "no source detected" in s.message


def test_cli_fit_image_and_detect(tmp_path):
    from astropy.io import fits
    from astropy.table import Table

    from galprof.cli import main

    name = SDSS[1][0]
    image = str(EXAMPLES / "sdss" / f"{name}_image.fits")
    psf = str(EXAMPLES / "sdss" / f"{name}_psf.fits")
    out = tmp_path / "fit"
    assert main(["fit", image, "--psf", psf, "--zeropoint", "22.5", "--out", str(out)]) == 0
    res = Table.read(out / "results.csv")
    assert res["status"][0] == "converged"
    assert abs(res["galaxy_x0"][0] - 65.93) < 0.2 and abs(res["galaxy_mag"][0] - 17.88) < 0.1
    assert main(["detect", image, "--psf", psf, "--out", str(tmp_path / "det")]) == 0
    stem = f"{name}_image"
    det = Table.read(tmp_path / "det" / f"{stem}_detections.csv")
    assert np.sum(np.asarray(det["target"]).astype(str) == "True") == 1
    seg = fits.getdata(tmp_path / "det" / f"{stem}_seg.fits")
    mask = fits.getdata(tmp_path / "det" / f"{stem}_mask.fits")
    target = int(det["label"][np.asarray(det["target"]).astype(str) == "True"][0])
    assert not mask[64, 64] and mask[(seg != 0) & (seg != target)].all()
    row = Table.read(tmp_path / "det" / f"{stem}_catalog.csv")
    assert {"galaxy_x0", "galaxy_re", "galaxy_n", "sky_sky", "mask"} <= set(row.colnames)
