"""Diagnostic plots of a catalogue run (`galprof fit MODEL --catalog CAT --out DIR --plots`):
one PNG per fitted galaxy with the expected panels, drawn from the same rendering as the image
blocks; the catalogue's plots; a failing plot costs that plot only; a resumed run draws only the
plots that are missing; a clear error without matplotlib; the bundled SDSS galaxies.

The survey is three elliptical Gaussians (Sérsic n = 0.5) in one image with a TAN WCS, cut out
by RA/Dec (so stamps have offsets in the image), with a zeropoint that is not the model's; a
fourth source is off the image (not fitted, so no plot). References: astropy (WCS, FITS), the
PNG format (signature and IHDR chunk), the image blocks the same run writes.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from test_pipeline import FAST, MODEL, gaussian_galaxy, gaussian_psf

from conftest import EXAMPLES
from galprof.cli import main
from galprof.io.tables import read_table

pytest.importorskip("matplotlib")

from galprof import plots  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ZEROPOINT = 25.4  # the galaxies' (the model's is 25.0)
SCALE = 0.2  # arcsec / px, from the WCS
TRUTHS = [dict(x0=24.3, y0=25.6, mag=17.8, re=2.5), dict(x0=61.7, y0=40.2, mag=18.1, re=2.0),
          dict(x0=44.6, y0=52.4, mag=17.9, re=2.2)]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG file, after checking its signature and first chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR", path
    return struct.unpack(">II", head[16:24])


def write_field(folder: Path) -> list[str]:
    """The image, weight, PSF, model and catalogue; returns the ``galprof fit`` arguments."""
    from astropy.wcs import WCS

    rng = np.random.default_rng(9)
    shape = (70, 90)
    img = sum(gaussian_galaxy(shape, **t, zeropoint=ZEROPOINT) for t in TRUTHS)
    sigma = np.full(shape, 0.05)
    weight = 1.0 / sigma**2
    weight[:, 30] = 0.0  # a dead column: masked (shown in the mask panel)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crpix = [45.0, 35.0]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.cdelt = [-SCALE / 3600, SCALE / 3600]
    fits.writeto(folder / "big.fits", img + rng.normal(0, 1, shape) * sigma, w.to_header())
    fits.writeto(folder / "weight.fits", weight)
    fits.writeto(folder / "psf.fits", gaussian_psf(9))
    (folder / "model.yaml").write_text(MODEL)
    pix = [(t["x0"], t["y0"]) for t in TRUTHS] + [(130.0, 20.0)]
    radec = w.all_pix2world(np.array(pix), 1)
    Table({"id": [1, 2, 3, 4], "ra": radec[:, 0], "dec": radec[:, 1], "g_mag": [18.0] * 4,
           "g_re": [2.5] * 4}).write(folder / "sources.fits")
    return ["fit", str(folder / "model.yaml"), "--catalog", str(folder / "sources.fits"), "--image",
            str(folder / "big.fits"), "--weight", str(folder / "weight.fits"), "--psf", str(folder / "psf.fits"),
            "--cutout", "21", "--zeropoint", str(ZEROPOINT), *FAST]


class Recorder:
    """Wraps :func:`galprof.plots.galaxy_figure`: records its arguments and figures; raises for
    the ids in ``fail``."""

    def __init__(self, fail=()):
        self.real = plots.galaxy_figure
        self.calls: list[tuple[tuple, dict, object]] = []
        self.fail = set(fail)

    def __call__(self, *args, **kwargs):
        gid = kwargs["title"].split(":")[0]
        if gid in self.fail:
            self.calls.append((args, kwargs, None))
            raise RuntimeError(f"simulated plotting failure for {gid}")
        fig = self.real(*args, **kwargs)
        self.calls.append((args, kwargs, fig))
        return fig


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    """The run, with image blocks; galaxy 2's plot fails."""
    folder = tmp_path_factory.mktemp("field")
    args = write_field(folder)
    out = folder / "out"
    rec = Recorder(fail={"2"})
    mp = pytest.MonkeyPatch()
    mp.setattr(plots, "galaxy_figure", rec)
    try:
        assert main([*args, "--out", str(out), "--plots", "--save-images"]) == 0
    finally:
        mp.undo()
    return folder, args, out, rec


def test_a_plot_per_fitted_galaxy_and_the_catalogue_plots(field):
    folder, _, out, rec = field
    res = read_table(out / "results.fits")
    assert list(res["status"][:3]) == ["converged"] * 3 and res["status"][3] == "bad_input"
    # one PNG per fitted galaxy (13.5 x 3.4 inches at 100 dpi), none for the galaxy off the image
    for gid in (1, 3):
        assert png_size(out / "plots" / f"{gid}.png") == (1350, 340)
    assert sorted(p.name for p in (out / "plots").glob("*.png")) == ["1.png", "3.png"]
    for name in ("parameters", "chi2nu"):
        w, h = png_size(out / "plots" / "catalog" / f"{name}.png")
        assert 300 <= w <= 2000 and 200 <= h <= 2000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["plots"] == {"galaxies": 2, "missing": 1, "catalogue": ["parameters.png", "chi2nu.png"]}
    assert not list((out / "plots").rglob(".*.tmp"))


def test_a_failing_plot_costs_that_plot_only(field):
    """Galaxy 2's plot raised: a warning in the log; its results and image block are written, the
    other galaxies' plots are made, and it is not tried again at the end of the run."""
    _, _, out, rec = field
    res = read_table(out / "results.fits")
    assert res["status"][1] == "converged" and res["flags"][1] == 0 and res["message"][1] == ""
    assert np.isfinite(res["g_re_err"][1]) and (out / "images" / "2.fits").is_file()
    log = (out / "galprof.log").read_text()
    assert "WARNING galaxy 2: PLOT FAILED" in log and "simulated plotting failure for 2" in log
    assert [kw["title"].split(":")[0] for _, kw, _ in rec.calls] == ["1", "2", "3"]


def test_the_figure_shows_the_image_block_of_the_fit(field):
    """The per-galaxy figure: data, model, residual and mask panels on one stretch, in the image's
    pixel frame; the profile in mag/arcsec^2 with an arcsec axis; the same model and mask as the
    galaxy's image block; the galaxy's zeropoint, plate scale and fitted values."""
    _, _, out, rec = field
    res = read_table(out / "results.fits")
    drawn = [(k, c) for k, c in enumerate(rec.calls) if c[2] is not None]
    assert [k for k, _ in drawn] == [0, 2]
    for k, (args, kw, fig) in drawn:
        gid = k + 1
        titles = [ax.get_title() for ax in fig.axes]
        assert titles[:5] == ["data", "model", "residual", "mask", "profile"]
        data_ax, model_ax, resid_ax, mask_ax, prof_ax = fig.axes[:5]
        assert data_ax.images[0].norm is model_ax.images[0].norm is resid_ax.images[0].norm
        with fits.open(out / "images" / f"{gid}.fits") as block:
            h = block[0].header
            np.testing.assert_allclose(model_ax.images[0].get_array(), block["MODEL"].data, rtol=1e-6, atol=1e-7)
            np.testing.assert_array_equal(np.asarray(mask_ax.images[0].get_array()), block["MASK"].data != 0)
            dx, dy = h["XOFFSET"], h["YOFFSET"]
        assert (dx, dy) != (0, 0) and kw["offset"] == (dx, dy)
        ny, nx = args[2].shape
        assert data_ax.images[0].get_extent() == [dx + 0.5, dx + nx + 0.5, dy + 0.5, dy + ny + 0.5]
        # the values passed are the table's (image frame, the galaxy's zeropoint)
        values = args[1]
        for p in ("x0", "y0", "mag", "re"):
            assert values[f"g.{p}"] == res[f"g_{p}"][k]
        assert kw["zeropoint"] == ZEROPOINT and kw["plate_scale"] == pytest.approx(SCALE, rel=1e-9)
        labels = [line.get_label() for line in prof_ax.get_lines()] + [c.get_label() for c in prof_ax.containers]
        assert {"data", "model", "g"} <= set(labels)
        assert "px" in prof_ax.get_xlabel() and "mag" in prof_ax.get_ylabel()
        assert "arcsec" in prof_ax.child_axes[0].get_xlabel()
    # the dead column is in the first galaxy's mask panel
    assert rec.calls[0][2].axes[3].images[0].get_array().any()


def test_a_resumed_run_draws_only_the_missing_plots(field, tmp_path, monkeypatch):
    """Re-running the command (here with plots: also how plots asked for after a run are made)
    refits nothing and redraws nothing but the missing plots: galaxy 2's (failed before) and 3's
    (deleted), drawn from the table's values converted back to the fit's frame: the same picture."""
    import matplotlib.image

    _, args, out, _ = field
    out2 = tmp_path / "out"
    shutil.copytree(out, out2)
    before = matplotlib.image.imread(out2 / "plots" / "3.png")
    (out2 / "plots" / "3.png").unlink()
    kept = (out2 / "plots" / "1.png").stat().st_mtime_ns
    parts = sorted(p.name for p in (out2 / "parts").iterdir())
    rec = Recorder()
    monkeypatch.setattr(plots, "galaxy_figure", rec)
    assert main([*args, "--out", str(out2), "--plots", "--save-images"]) == 0
    assert sorted(p.name for p in (out2 / "parts").iterdir()) == parts  # nothing refitted
    assert [kw["title"].split(":")[0] for _, kw, _ in rec.calls] == ["2", "3"]
    assert (out2 / "plots" / "1.png").stat().st_mtime_ns == kept
    after = matplotlib.image.imread(out2 / "plots" / "3.png")
    assert after.shape == before.shape and np.mean(np.abs(after - before)) < 1e-3
    assert png_size(out2 / "plots" / "2.png") == (1350, 340)
    assert "making the 2 diagnostic plots missing" in (out2 / "galprof.log").read_text()
    assert json.loads((out2 / "summary.json").read_text())["plots"]["missing"] == 0


def test_plots_without_matplotlib_exit_2(field, tmp_path, monkeypatch, capsys):
    folder, args, _, _ = field
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = tmp_path / "out"
    assert main([*args, "--out", str(out), "--plots"]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "galprof[plots]" in err
    assert not (out / "parts").exists()  # refused before any fitting


def test_plots_of_the_bundled_sdss_galaxies(tmp_path):
    """`galprof fit examples/sersic.yaml --catalog examples/sdss/catalog.csv --plots` (two iterations:
    the plots, not the fit, are tested here)."""
    out = tmp_path / "sdss"
    assert main(["fit", str(EXAMPLES / "sersic.yaml"), "--catalog", str(EXAMPLES / "sdss" / "catalog.csv"),
                 "--out", str(out), "--pixel-scale", "0.396", "--max-iter", "2", "--plots"]) == 0
    ids = [str(i) for i in Table.read(EXAMPLES / "sdss" / "catalog.csv")["id"]]
    for gid in ids:
        assert png_size(out / "plots" / f"{gid}.png") == (1350, 340)
    assert json.loads((out / "summary.json").read_text())["plots"]["galaxies"] == len(ids)
    assert list(read_table(out / "results.fits")["id"]) == ids
