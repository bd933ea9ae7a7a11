"""The survey pipeline (`galprof fit`): tables, image blocks, bad input, resume after SIGKILL,
cutouts from a large image, sigma maps.

Simulated galaxies are elliptical Gaussians (a Sérsic n = 0.5 profile) convolved with a Gaussian
PSF, both analytic, sampled at pixel centres, with Gaussian noise: small stamps, four free
parameters, so that every fit is quick. References: the library's own `galprof.fit` on the same
arrays, astropy (WCS, tables), numpy (Poisson and Gaussian noise).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

import galprof
from conftest import ROOT
from galprof.cli import main
from galprof.io.imgblock import IMAGE_BLOCK_HDUS
from galprof.io.tables import read_table
from galprof.noise import sigma_from_gain

MODEL = """\
zeropoint: 25.0
components:
  g:
    profile: sersic
    x0: 10.5
    y0: 10.5
    mag: 18.0
    re: {value: 3.0, bounds: [0.3, 30]}
    n: {value: 0.5, fixed: true}
    q: {value: 0.7, fixed: true}
    pa: {value: 30.0, fixed: true}
"""
PSF_SIGMA = 1.0
FAST = ["--jacobian", "finite-difference", "--batch-size", "3"]


def gaussian_galaxy(shape, x0, y0, mag, re, q=0.7, pa=30.0, zeropoint=25.0, psf_sigma=PSF_SIGMA, step=1.0):
    """An elliptical Gaussian of half-light radius ``re`` (semi-major) convolved with a circular
    Gaussian PSF, per unit area, at the centres of pixels of size ``step`` (pixel (1, 1) = first
    pixel's centre when ``step`` is 1); times ``step**2``: the light in each pixel."""
    s_major = re / math.sqrt(2 * math.log(2.0))  # Gaussian: half the light inside sqrt(2 ln 2) sigma
    a2, b2 = s_major**2 + psf_sigma**2, (q * s_major) ** 2 + psf_sigma**2
    y, x = (np.mgrid[0:shape[0], 0:shape[1]] * step + 0.5 + step / 2).astype(float)
    t = math.radians(pa)
    u = -(x - x0) * math.sin(t) + (y - y0) * math.cos(t)  # along the major axis (PA from +y, CCW)
    v = (x - x0) * math.cos(t) + (y - y0) * math.sin(t)
    flux = 10 ** (-0.4 * (mag - zeropoint))
    return step**2 * flux / (2 * math.pi * math.sqrt(a2 * b2)) * np.exp(-0.5 * (u**2 / a2 + v**2 / b2))


def gaussian_psf(n: int) -> np.ndarray:
    c = (n // 2)  # GALFIT's centre for odd and even sizes
    y, x = np.mgrid[0:n, 0:n] - c
    p = np.exp(-0.5 * (x**2 + y**2) / PSF_SIGMA**2)
    return p / p.sum()


def write_survey(folder: Path, n: int, seed: int = 0) -> Table:
    """``n`` galaxies on 20 x 20 and 24 x 24 stamps, PSFs 5 x 5 and 6 x 6 (odd and even), sigma maps,
    a catalogue with perturbed starting values; returns the catalogue with the truth."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    (folder / "model.yaml").write_text(MODEL)
    for k in (5, 6):
        fits.writeto(folder / f"psf{k}.fits", gaussian_psf(k), overwrite=True)
    rows = []
    for i in range(n):
        size = 20 if i % 2 == 0 else 24
        t = {"x0": size / 2 + rng.uniform(0, 1), "y0": size / 2 + rng.uniform(0, 1), "mag": rng.uniform(17.5, 18.5),
             "re": rng.uniform(1.5, 3.5)}
        img = gaussian_galaxy((size, size), **t)
        sigma = np.full(img.shape, 0.01 * img.max())
        fits.writeto(folder / f"g{i}.fits", img + rng.normal(0.0, 1.0, img.shape) * sigma, overwrite=True)
        fits.writeto(folder / f"g{i}_sigma.fits", sigma, overwrite=True)
        rows.append({"id": f"g{i:02d}", "image": f"g{i}.fits", "sigma": f"g{i}_sigma.fits",
                     "psf": "psf5.fits" if i % 3 else "psf6.fits",
                     "g_x0": round(t["x0"] + rng.uniform(-0.4, 0.4), 2),
                     "g_y0": round(t["y0"] + rng.uniform(-0.4, 0.4), 2),
                     "g_mag": round(t["mag"] + 0.2, 2), "g_re": round(t["re"] * 1.2, 2),
                     "true_x0": t["x0"], "true_y0": t["y0"], "true_mag": t["mag"], "true_re": t["re"]})
    cat = Table(rows=rows)
    cat[[c for c in cat.colnames if not c.startswith("true_")]].write(folder / "cat.csv", overwrite=True)
    return cat


def fit_args(folder: Path, out: Path, *extra: str, catalog: str = "cat.csv") -> list[str]:
    return ["fit", str(folder / "model.yaml"), "--catalog", str(folder / catalog), "--out", str(out), *FAST, *extra]


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """A clean run of 12 galaxies (4 batches), written in all four formats with image blocks."""
    folder = tmp_path_factory.mktemp("survey")
    truth = write_survey(folder, 12)
    out = folder / "out"
    assert main(fit_args(folder, out, "--format", "fits,csv", "--format", "parquet,h5", "--save-images",
                         "--pixel-scale", "0.25")) == 0
    return folder, truth, out


def test_results_equal_the_library_fit_and_recover_the_truth(survey):
    folder, truth, out = survey
    res = read_table(out / "results.fits")
    assert list(res["id"]) == list(truth["id"])
    assert list(res["status"]) == ["converged"] * len(truth)
    # the same numbers as galprof.fit on the same arrays (the first batch of 3 rows)
    model = galprof.load_model(folder / "model.yaml")
    for start in (0,):
        rows = truth[start:start + 3]
        ref = galprof.fit(model, [fits.getdata(folder / r["image"]).astype(float) for r in rows],
                          [fits.getdata(folder / r["sigma"]).astype(float) for r in rows], None,
                          [fits.getdata(folder / r["psf"]).astype(float) for r in rows],
                          initial={f"g.{k}": np.array(rows[f"g_{k}"], float) for k in ("x0", "y0", "mag", "re")},
                          jacobian="finite-difference").to_table()
        for c in ref.colnames:
            if ref[c].dtype.kind == "f":
                np.testing.assert_array_equal(res[c][start:start + 3], ref[c])
    # and the truth, within 4 sigma (Gaussian noise; 12 galaxies x 4 parameters)
    for k in ("x0", "y0", "mag", "re"):
        pull = (res[f"g_{k}"] - truth[f"true_{k}"]) / res[f"g_{k}_err"]
        assert np.all(np.abs(pull) < 4.0), (k, pull)
    assert np.all(np.abs(res["chi2_nu"] - 1) < 0.25)
    # metadata
    meta = res.meta
    assert meta["GALPROF"] == galprof.__version__ and meta["MODEL"].endswith("model.yaml")
    assert "cpu" in meta["DEVICE"] and meta["NGAL"] == len(truth) and "finite-difference" in meta["OPTIONS"]


def test_derived_columns(survey):
    """re in arcsec, and the mean surface brightness inside re checked against the light of the
    fitted model (rendered without PSF, finely sampled) inside the ellipse of semi-major axis re."""
    folder, truth, out = survey
    res = read_table(out / "results.fits")
    scale = 0.25
    np.testing.assert_allclose(res["g_re_arcsec"], res["g_re"] * scale, rtol=1e-12)
    np.testing.assert_allclose(res["g_re_arcsec_err"], res["g_re_err"] * scale, rtol=1e-12)
    r = res[0]
    k = 10  # sub-pixels per pixel, over +-8 re about the centre (the grid's own frame, in pixels)
    n = int(16 * r["g_re"] * k)
    light = gaussian_galaxy((n, n), 8 * r["g_re"] + 0.5, 8 * r["g_re"] + 0.5, r["g_mag"], r["g_re"], psf_sigma=0.0,
                            step=1.0 / k)
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / k
    t = math.radians(30.0)
    u = -(x - 8 * r["g_re"]) * math.sin(t) + (y - 8 * r["g_re"]) * math.cos(t)
    v = (x - 8 * r["g_re"]) * math.cos(t) + (y - 8 * r["g_re"]) * math.sin(t)
    inside = u**2 + (v / 0.7) ** 2 <= r["g_re"] ** 2
    area_arcsec2 = inside.sum() * (scale / k) ** 2
    mu = -2.5 * np.log10(light[inside].sum() / area_arcsec2) + 25.0
    assert abs(mu - r["g_mu_e"]) < 0.01
    assert np.all(np.isfinite(res["g_mu_e_err"])) and np.all(res["g_mu_e_err"] > 0)


def test_tables_round_trip_in_all_formats(survey):
    _, _, out = survey
    ref = read_table(out / "results.fits")
    for name in ("results.csv", "results.parquet", "results.h5"):
        t = read_table(out / name)
        assert t.colnames == ref.colnames, name
        for c in ref.colnames:
            if ref[c].dtype.kind == "f":
                np.testing.assert_array_equal(t[c], ref[c], err_msg=f"{name}: {c}")
            else:
                assert list(t[c]) == list(ref[c]), (name, c)
        assert {k: t.meta[k] for k in ref.meta} == dict(ref.meta), name
    # results.csv is plain CSV: any reader gets the columns
    plain = Table.read(out / "results.csv", format="ascii.csv")
    assert plain.colnames == ref.colnames and len(plain) == len(ref)


def test_image_blocks(survey):
    folder, truth, out = survey
    res = read_table(out / "results.fits")
    for r in res:
        with fits.open(out / "images" / f"{r['id']}.fits") as hdul:
            assert [h.name for h in hdul] == list(IMAGE_BLOCK_HDUS) + ["COMP_G"]
            data = hdul["DATA"].data.astype(float)
            model = hdul["MODEL"].data.astype(float)
            np.testing.assert_array_equal(data, fits.getdata(folder / f"g{int(r['id'][1:])}.fits").astype(np.float32))
            np.testing.assert_allclose(hdul["RESIDUAL"].data, data - model, atol=1e-6 * np.abs(data).max())
            np.testing.assert_allclose(hdul["COMP_G"].data, model, rtol=1e-6)
            assert not hdul["MASK"].data.any()
            h = hdul[0].header
            assert h["ID"] == r["id"] and h["STATUS"] == "converged" and h["COMP_1"] == "g"
            assert h["1_RE"] == r["g_re"] and h["1_RE_ERR"] == r["g_re_err"] and h["CHI2"] == r["chi2"]
            # the model is the fit: its chi2 over the stamp is the table's (float32 storage)
            chi2 = np.sum((hdul["RESIDUAL"].data.astype(float) / hdul["SIGMA"].data.astype(float)) ** 2)
            assert abs(chi2 - r["chi2"]) < 1e-3 * r["chi2"]


def test_bad_input_is_flagged_and_the_rest_unchanged(survey, tmp_path):
    folder, truth, out = survey
    cat = Table.read(folder / "cat.csv", format="ascii.csv")
    rows = [{c: (str(folder / r[c]) if c in ("image", "sigma", "psf") else r[c]) for c in cat.colnames} for r in cat]
    for row in rows:
        row["mask"] = ""
    img = fits.getdata(folder / "g0.fits")
    sig = fits.getdata(folder / "g0_sigma.fits")
    psf = gaussian_psf(5)
    bad = {}

    def add(name, expect_status, flag, text, **changes):
        rows.append({**rows[0], "id": name, **changes})
        bad[name] = (expect_status, flag, text)

    def write(name, arr):
        fits.writeto(tmp_path / name, arr)
        return str(tmp_path / name)

    (tmp_path / "garbage.fits").write_bytes(b"this is not FITS " * 200)
    nan_pix = img.copy()
    nan_pix[2:5, 2:5] = np.nan
    zero_sig = sig.copy()
    zero_sig[0] = 0.0
    zero_sig[1] = -1.0
    nan_psf = psf.copy()
    nan_psf[0, 0] = np.nan
    F = galprof.Flag
    add("missing", "bad_input", F.BAD_FILE, "does not exist", image=str(tmp_path / "nope.fits"))
    add("unreadable", "bad_input", F.BAD_FILE, "cannot read", image=str(tmp_path / "garbage.fits"))
    add("wrong_shape", "bad_input", F.BAD_FILE, "has shape (7, 7), the image (20, 20)",
        sigma=write("small.fits", sig[:7, :7]))
    add("nan_pixels", "converged", F.BAD_PIXELS, "9 non-finite data pixels masked", image=write("nanpix.fits", nan_pix))
    add("all_nan", "bad_input", F.NO_DATA, "no usable pixel", image=write("allnan.fits", img * np.nan))
    add("bad_sigma", "converged", F.BAD_PIXELS, "40 pixels with sigma <= 0", sigma=write("zsig.fits", zero_sig))
    add("all_masked", "bad_input", F.NO_DATA, "no usable pixel", mask=write("ones.fits", np.ones_like(img)))
    add("psf_nan", "bad_input", F.BAD_PSF, "non-finite", psf=write("psfnan.fits", nan_psf))
    add("psf_zero_sum", "bad_input", F.BAD_PSF, "sums to 0", psf=write("psfzero.fits", psf * 0))
    add("start_outside", "bad_input", F.BAD_START, "g.re = 100 is not inside its bounds", g_re=100.0)
    cat = Table(rows=rows)
    cat.write(tmp_path / "bad.csv", format="ascii.csv")
    out_bad = tmp_path / "out"
    assert main(["fit", str(folder / "model.yaml"), "--catalog", str(tmp_path / "bad.csv"), "--out", str(out_bad),
                 *FAST, "--batch-size", "32"]) == 0
    res = read_table(out_bad / "results.fits")
    assert len(res) == len(cat)
    for r in res[len(truth):]:
        status, flag, text = bad[r["id"]]
        assert r["status"] == status, r["id"]
        assert r["flags"] & flag, r["id"]
        assert text in r["message"], (r["id"], r["message"])
        if status == "bad_input":
            assert np.isnan(r["g_re"]) and np.isnan(r["chi2"])
    # the good galaxies: as in the clean run (other batch neighbours: equal to rounding, far
    # below their errors)
    clean = read_table(out / "results.fits")
    good = res[:len(truth)]
    assert list(good["id"]) == list(clean["id"]) and list(good["status"]) == list(clean["status"])
    for k in ("x0", "y0", "mag", "re"):
        c = f"g_{k}"
        assert np.all(np.abs(good[c] - clean[c]) < 1e-5 * clean[c + "_err"]), c
        np.testing.assert_allclose(good[c + "_err"], clean[c + "_err"], rtol=1e-6)
    import json

    summary = json.loads((out_bad / "summary.json").read_text())
    assert summary["not_fitted"] == 8 and summary["fitted"] == len(truth) + 2
    assert summary["flags"]["BAD_FILE"] == 3 and summary["flags"]["BAD_PSF"] == 2 and summary["flags"]["NO_DATA"] == 2
    assert "BAD_FILE 3" in (out_bad / "galprof.log").read_text()
    # the missing file appears: --retry-bad fits it (the newest row wins), the rest stays as it was
    fits.writeto(tmp_path / "nope.fits", img)
    assert main(["fit", str(folder / "model.yaml"), "--catalog", str(tmp_path / "bad.csv"), "--out", str(out_bad),
                 *FAST, "--batch-size", "32", "--retry-bad"]) == 0
    again = read_table(out_bad / "results.fits")
    assert list(again["id"]) == list(res["id"])
    assert again["status"][list(again["id"]).index("missing")] == "converged"
    for name in again.colnames:
        keep = np.array([i != "missing" for i in again["id"]])
        if again[name].dtype.kind == "f":
            np.testing.assert_array_equal(again[name][keep], res[name][keep])


def _parts(out: Path) -> int:
    return len(list((out / "parts").glob("part-*.fits"))) if (out / "parts").is_dir() else 0


def test_sigkill_at_random_moments_then_resume(survey, tmp_path):
    """Killed with SIGKILL three times (seeded random delays: during start-up, and while batches
    are fitted), each followed by a resume: the final table is the uninterrupted run's."""
    folder, truth, out = survey
    ref = read_table(out / "results.fits")
    run_out = tmp_path / "out"
    argv = [sys.executable, "-m", "galprof.cli", *fit_args(folder, run_out, "--pixel-scale", "0.25")]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    rng = np.random.default_rng(2024)
    # how long one batch takes on this machine: the spacing of the reference run's parts (kills
    # later than that could let the run finish on a fast machine)
    stamps = sorted(p.stat().st_mtime for p in (out / "parts").glob("part-*.fits"))
    batch_s = float(np.median(np.diff(stamps))) if len(stamps) > 2 else 0.3
    parts_seen = []
    for target in (0, 1, 1):  # kill once `target` more parts have appeared, after a random delay
        before = _parts(run_out)
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while _parts(run_out) < before + target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        # start-up (importing torch) takes longer than 0.5 s; after a part, less than a batch
        time.sleep(rng.uniform(0.0, 0.5) if target == 0 else rng.uniform(0.0, 0.8) * batch_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        parts_seen.append(_parts(run_out))
        for p in (run_out / "parts").glob("part-*.fits"):  # every part on disk is whole
            assert len(read_table(p)) >= 1
        assert not (run_out / "results.fits").exists() or len(read_table(run_out / "results.fits")) == len(ref)
    assert parts_seen[-1] < 4, "the kills came too late to interrupt the run"  # 4 batches in all
    done = subprocess.run(argv + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    res = read_table(run_out / "results.fits")
    assert list(res["id"]) == list(ref["id"])  # complete, in order, no duplicates
    for c in ref.colnames:
        if ref[c].dtype.kind == "f":
            # to rounding: a galaxy's FFTs round according to how many galaxies share the call
            np.testing.assert_allclose(res[c], ref[c], rtol=1e-12, atol=1e-12, err_msg=c)
        else:
            assert list(res[c]) == list(ref[c]), c


def test_cutouts_from_a_large_image_by_ra_dec(tmp_path):
    """Sources in one 90 x 70 image with a TAN WCS, given by RA/Dec; a weight map with a dead
    column; one source near the edge (cutout partly off the image) and one off the image."""
    from astropy.wcs import WCS

    rng = np.random.default_rng(5)
    shape = (70, 90)
    truths = [dict(x0=24.3, y0=25.6, mag=17.8, re=2.5), dict(x0=61.7, y0=40.2, mag=18.1, re=2.0),
              dict(x0=86.6, y0=52.4, mag=17.9, re=2.2)]
    img = sum(gaussian_galaxy(shape, **t) for t in truths)
    sigma = np.full(shape, 0.05)
    weight = 1.0 / sigma**2
    weight[:, 30] = 0.0  # a dead column: no data, not a problem
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crpix = [45.0, 35.0]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    fits.writeto(tmp_path / "big.fits", img + rng.normal(0, 1, shape) * sigma, w.to_header())
    fits.writeto(tmp_path / "weight.fits", weight)
    fits.writeto(tmp_path / "psf.fits", gaussian_psf(9))  # wide enough that the truth's PSF is not truncated
    (tmp_path / "model.yaml").write_text(MODEL)
    pix = [(t["x0"], t["y0"]) for t in truths] + [(130.0, 20.0)]
    radec = w.all_pix2world(np.array(pix), 1)
    Table({"id": [1, 2, 3, 4], "ra": radec[:, 0], "dec": radec[:, 1], "g_mag": [18.0] * 4,
           "g_re": [2.5] * 4}).write(tmp_path / "sources.fits")
    out = tmp_path / "out"
    assert main(["fit", str(tmp_path / "model.yaml"), "--catalog", str(tmp_path / "sources.fits"), "--out", str(out),
                 "--image", str(tmp_path / "big.fits"), "--weight", str(tmp_path / "weight.fits"),
                 "--psf", str(tmp_path / "psf.fits"), "--cutout", "21", "--save-images", *FAST]) == 0
    res = read_table(out / "results.fits")
    assert list(res["id"]) == [1, 2, 3, 4]
    assert list(res["status"][:3]) == ["converged"] * 3
    for r, t in zip(res[:3], truths):  # positions in the large image's pixel frame
        assert abs(r["g_x0"] - t["x0"]) < 5 * r["g_x0_err"] and abs(r["g_y0"] - t["y0"]) < 5 * r["g_y0_err"]
        assert abs(r["g_re"] - t["re"]) < 5 * r["g_re_err"]
    assert res["flags"][0] == 0  # the dead column is masked without a flag
    assert res["flags"][2] & galprof.Flag.EDGE and "runs off the image" in res["message"][2]
    assert res["status"][3] == "bad_input" and res["flags"][3] & galprof.Flag.BAD_VALUE
    assert "outside the image" in res["message"][3]
    np.testing.assert_allclose(res["g_re_arcsec"][:3], res["g_re"][:3] * 0.2, rtol=1e-9)  # scale from the WCS
    with fits.open(out / "images" / "1.fits") as hdul:
        h = hdul[0].header
        x1, y1 = int(round(truths[0]["x0"])) - 10, int(round(truths[0]["y0"])) - 10
        assert h["FITSECT"] == f"[{x1}:{x1 + 20},{y1}:{y1 + 20}]" and h["XOFFSET"] == x1 - 1
        assert hdul["MASK"].data[:, 30 - (x1 - 1)].all() and hdul["MASK"].data.sum() == 21


def test_sigma_from_gain_matches_simulated_noise():
    """Monte Carlo: ncombine exposures of Poisson electrons plus Gaussian read noise, averaged,
    in ADU per second, sky subtracted."""
    rng = np.random.default_rng(1)
    gain, rdn, ncomb, exptime, sky = 2.5, 6.0, 4, 30.0, 40.0  # sky and data in ADU/s
    levels = np.array([-5.0, 0.0, 10.0, 300.0])  # sky-subtracted values
    trials = 200_000
    e_per_exposure = (levels + sky) * exptime * gain
    e = rng.poisson(np.clip(e_per_exposure, 0, None)[:, None, None], (4, ncomb, trials)) + rng.normal(
        0, rdn, (4, ncomb, trials))
    measured = (e / gain / exptime).mean(axis=1) - sky
    predicted = sigma_from_gain(levels, gain=gain, read_noise=rdn, sky=sky, ncombine=ncomb, exptime=exptime)
    np.testing.assert_allclose(measured.std(axis=1), predicted, rtol=0.01)
    with pytest.raises(galprof.ParameterError, match="gain"):
        sigma_from_gain(levels, gain=0.0)


def test_sigma_maps_made_from_gain_columns(tmp_path):
    folder = tmp_path
    write_survey(folder, 2)
    cat = Table.read(folder / "cat.csv", format="ascii.csv")
    cat.remove_column("sigma")
    cat["gain"] = [4.0, 4.0]
    cat["read_noise"] = [5.0, 5.0]
    cat["sky"] = [0.5, 0.5]
    cat.write(folder / "gain.csv", format="ascii.csv")
    out = folder / "out"
    assert main(fit_args(folder, out, "--save-images", catalog="gain.csv")) == 0
    res = read_table(out / "results.fits")
    assert list(res["status"]) == ["converged"] * 2
    with fits.open(out / "images" / "g00.fits") as hdul:
        expected = sigma_from_gain(fits.getdata(folder / "g0.fits"), gain=4.0, read_noise=5.0, sky=0.5)
        np.testing.assert_allclose(hdul["SIGMA"].data, expected, rtol=1e-6)


@pytest.mark.parametrize("change, message", [
    (["--format", "xls"], "table format 'xls'"),
    (["--batch-size", "0"], "batch size"),
    (["--cutout", "5"], "cutouts need each source's position"),
    (["--gain", "-1"], "--gain must be > 0"),
])
def test_bad_options_exit_2(survey, tmp_path, capsys, change, message):
    folder, _, _ = survey
    assert main(fit_args(folder, tmp_path / "o", *change)) == 2
    assert message in capsys.readouterr().err


def test_bad_model_or_catalogue_exit_2(survey, tmp_path, capsys):
    folder, _, out = survey
    bad = tmp_path / "bad.yaml"
    bad.write_text("components:\n  g: {profile: sersc, x0: 1}\n")
    assert main(["fit", str(bad), "--catalog", str(folder / "cat.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "sersc" in capsys.readouterr().err
    Table({"id": ["a", "a"], "image": ["x.fits", "y.fits"]}).write(tmp_path / "dup.csv", format="ascii.csv")
    assert main(fit_args(folder, tmp_path / "o", catalog=str(tmp_path / "dup.csv"))) == 2
    assert "unique" in capsys.readouterr().err
    Table({"name": ["a"]}).write(tmp_path / "noid.csv", format="ascii.csv")
    assert main(fit_args(folder, tmp_path / "o", catalog=str(tmp_path / "noid.csv"))) == 2
    assert "'id'" in capsys.readouterr().err
    # the survey's folder holds another run's results: refused, not mixed
    assert main(fit_args(folder, out, "--max-iter", "7")) == 2
    assert "different run" in capsys.readouterr().err


def test_column_hooks(survey, tmp_path):
    """Extra per-galaxy columns (e.g. morphology) plug into the pipeline, for fitted and unreadable
    galaxies alike."""
    from galprof.catalog import Catalog
    from galprof.pipeline import FitOptions, PipelineOptions, run_pipeline

    folder, truth, _ = survey
    rows = Table.read(folder / "cat.csv", format="ascii.csv")[:2]
    rows.add_row({**{c: rows[0][c] for c in rows.colnames}, "id": "gone", "image": "gone.fits"})
    rows.write(folder / "hooks.csv", format="ascii.csv", overwrite=True)

    def total_light(stamps, table, result):
        assert [s.id for s in stamps] == list(table["id"])
        return {"light": [np.nan if s.image is None else float(np.sum(s.image)) for s in stamps]}

    model = galprof.load_model(folder / "model.yaml")
    run_pipeline(model, Catalog(folder / "hooks.csv", model),
                 PipelineOptions(out=tmp_path / "o", fit=FitOptions(max_iter=2), progress=False),
                 hooks=[total_light])
    res = read_table(tmp_path / "o" / "results.fits")
    np.testing.assert_allclose(res["light"][:2], [np.sum(fits.getdata(folder / f"g{i}.fits")) for i in (0, 1)])
    assert np.isnan(res["light"][2]) and res["status"][2] == "bad_input"
    assert res.colnames[-7:] == ["chi2", "dof", "chi2_nu", "n_iter", "status", "flags", "message"]


def test_an_error_inside_the_fit_costs_one_galaxy(survey, tmp_path, monkeypatch):
    """A fit that raises for one galaxy: that galaxy is flagged FIT_ERROR, the others are fitted;
    a fit that raises for every galaxy stops the run (a problem of the run, not of the data)."""
    import functools

    from galprof.catalog import Catalog
    from galprof.pipeline import FitOptions, PipelineOptions, run_pipeline

    folder, _, _ = survey
    real_fit = galprof.fitting.fit

    @functools.wraps(real_fit)
    def fragile_fit(model, images, *args, ids=None, **kwargs):
        if "g01" in ids:
            raise RuntimeError("simulated failure")
        return real_fit(model, images, *args, ids=ids, **kwargs)

    monkeypatch.setattr(galprof.fitting, "fit", fragile_fit)
    model = galprof.load_model(folder / "model.yaml")
    Table.read(folder / "cat.csv", format="ascii.csv")[:3].write(folder / "three.csv", format="ascii.csv",
                                                                 overwrite=True)
    options = PipelineOptions(out=tmp_path / "o", fit=FitOptions(max_iter=2), progress=False)
    run_pipeline(model, Catalog(folder / "three.csv", model), options)
    res = read_table(tmp_path / "o" / "results.fits")
    assert list(res["status"]) == ["max_iter", "bad_input", "max_iter"]
    assert res["flags"][1] == galprof.Flag.FIT_ERROR and "RuntimeError: simulated failure" in res["message"][1]

    def broken_fit(*args, **kwargs):
        raise RuntimeError("broken")

    monkeypatch.setattr(galprof.fitting, "fit", functools.wraps(real_fit)(broken_fit))
    options = PipelineOptions(out=tmp_path / "o2", fit=FitOptions(max_iter=2), progress=False)
    with pytest.raises(RuntimeError, match="every galaxy of batch 0"):
        run_pipeline(model, Catalog(folder / "three.csv", model), options)


def test_atomic_writes_have_the_usual_permissions(tmp_path):
    """Files written atomically are readable as a plainly created file is (not mkstemp's 0600)."""
    from galprof.io.tables import atomic_path

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    with atomic_path(tmp_path / "atomic.txt") as tmp:
        tmp.write_text("x")
    assert (tmp_path / "atomic.txt").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
