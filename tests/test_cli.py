"""`galprof render`, run in-process on the bundled SDSS example."""

import numpy as np
import pytest
from astropy.io import fits

import galprof
from conftest import EXAMPLES
from galprof.cli import main

PSF = EXAMPLES / "sdss" / "J162123.19+322056.4_psf.fits"
MODEL = EXAMPLES / "J162123_sersic.yaml"


def test_render_writes_model_with_parameters(tmp_path):
    out = tmp_path / "model.fits"
    assert main(["render", str(MODEL), "--shape", "128", "128", "--psf", str(PSF), "--out", str(out),
                 "--components"]) == 0
    with fits.open(out) as hdul:
        data = hdul[0].data.astype(float)
        header = hdul[0].header
        assert [h.name for h in hdul] == ["PRIMARY", "GALAXY", "SKY"]
    assert data.shape == (128, 128)
    assert header["COMP_1"] == "galaxy" and header["PROF_1"] == "sersic"
    assert header["1_RE"] == 7.6 and header["1_PA"] == 63.0 and header["ZEROPT"] == 22.5
    # the same image as the library's, within float32 storage
    model = galprof.load_model(MODEL)
    ref = galprof.render(model, (128, 128), fits.getdata(PSF))
    np.testing.assert_allclose(data, ref, rtol=1e-6, atol=1e-7 * ref.max())
    # its light sits where the galaxy is in the real image
    image = fits.getdata(EXAMPLES / "sdss" / "J162123.19+322056.4_image.fits")
    assert np.unravel_index(np.argmax(data), data.shape) == np.unravel_index(np.argmax(image), image.shape)


@pytest.mark.parametrize("argv, message", [
    (["render", "missing.yaml", "--shape", "10", "10", "--out", "x.fits"], "does not exist"),
    (["render", str(MODEL), "--shape", "10", "10", "--psf", "nope.fits", "--out", "x.fits"], "does not exist"),
])
def test_bad_input_exits_2_with_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_model_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("components:\n  g: {profile: sersic, x0: 1}\n")
    assert main(["render", str(bad), "--shape", "8", "8", "--out", str(tmp_path / "o.fits")]) == 2
    assert "needs a value" in capsys.readouterr().err


def test_fit_catalogue_of_sdss_galaxies(tmp_path):
    """`galprof fit` on the bundled SDSS galaxies (segmentation maps as masks, per-galaxy starts from
    the catalogue), plus a row whose image is missing: that row is flagged, the others fit."""
    from astropy.table import Table

    cat = Table.read(EXAMPLES / "sdss" / "catalog.csv", format="ascii.csv")
    for name in ("image", "sigma", "psf", "mask"):
        cat[name] = [str(EXAMPLES / "sdss" / v) for v in cat[name]]
    cat.add_row(["missing", str(tmp_path / "nope.fits"), "", "", "", 1, 65.0, 65.0, 18.0, 5.0, 0.7, 0.0])
    cat.write(tmp_path / "cat.csv", format="ascii.csv")
    out = tmp_path / "out"
    assert main(["fit", str(EXAMPLES / "sersic.yaml"), "--catalog", str(tmp_path / "cat.csv"), "--out", str(out),
                 "--jacobian", "finite-difference"]) == 0
    res = Table.read(out / "results.fits")
    assert list(res["id"]) == ["J162123", "J100247", "J092800", "missing"]
    assert list(res["status"][:3]) == ["converged"] * 3
    assert res["status"][3] == "bad_input" and "does not exist" in res["message"][3]
    # sensible fits of real data: reduced chi2 near 1, centres near the stamp centre
    assert np.all((res["chi2_nu"][:3] > 0.8) & (res["chi2_nu"][:3] < 2.0))
    assert np.all(np.abs(res["galaxy_x0"][:3] - 65.5) < 1.5) and np.all(np.abs(res["galaxy_y0"][:3] - 65.5) < 1.5)
    assert np.all(np.isfinite(res["galaxy_mag_err"][:2]))
    assert Table.read(out / "results.csv", format="ascii.csv")["id"][0] == "J162123"
