"""IMFIT's IC 3478 example through galprof, against pyimfit's fits of the same configurations
(tests/data/ic3478_golden.json, made by benchmarks/make_ic3478_golden.py).

galprof reads each configuration (read_imfit_config), builds IMFIT's noise from gain, read noise and
original sky, uses the PSF as IMFIT does (an optical kernel: IMFIT convolves its pixel-integrated
model with the PSF image; see docs/galfit_imfit.md), fits, and converts its best fit back to IMFIT's
parameters (imfit_parameters: ell, I_e / I_0 from the magnitude). Every parameter must agree with
pyimfit's within pyimfit's 1-sigma error.

The default test starts at pyimfit's optimum (is it galprof's optimum too?); the fits from the
configurations' own starting values, through ``galprof fit CONFIG --image ...``, run with --runslow
(minutes each on two cores; benchmarks/ic3478_vs_pyimfit.py prints the same comparison).
"""

import json
import warnings

import pytest

from conftest import ROOT
from galprof import GalprofWarning
from galprof.cli import main
from galprof.io.imfit import imfit_parameters, read_imfit_config
from galprof.single import fit_single, from_imfit

DATA = ROOT / "tests" / "data" / "ic3478"
GOLDEN = json.loads((ROOT / "tests" / "data" / "ic3478_golden.json").read_text())
NOISE = GOLDEN["noise"]


def config_at(golden: dict, tmp_path):
    """The configuration file with its starting values replaced by pyimfit's best fit (limits kept)."""
    params = golden["parameters"]
    lines, function, block = [], 0, 0
    for raw in (DATA / golden["config"]).read_text().splitlines():
        tokens = raw.split("#", 1)[0].split()
        if tokens and tokens[0] == "FUNCTION":
            function += 1
        elif tokens and tokens[0] == "X0":
            block += 1
        if tokens and tokens[0] not in ("FUNCTION",):
            key = f"{tokens[0]}_{block if tokens[0] in ('X0', 'Y0') else function}"
            if key in params:
                tokens[1] = repr(params[key]["value"])
                raw = " ".join(tokens)
        lines.append(raw)
    path = tmp_path / golden["config"]
    path.write_text("\n".join(lines) + "\n")
    return path


def fit_config(config, golden, psf_kind="optical"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GalprofWarning)  # the configurations' limits on I_e / I_0
        job = from_imfit(config, str(DATA / "ic3478rss_256.fits"), mask=str(DATA / "ic3478rss_256_mask.fits"),
                         psf=str(DATA / golden["psf"]) if golden["psf"] else None, gain=NOISE["gain"],
                         readnoise=NOISE["read_noise"], sky=NOISE["original_sky"], psf_kind=psf_kind)
    fr = fit_single(job)
    r = fr.result
    return job, fr, imfit_parameters(job.imfit, fr.values, r.covariance[0], r.keys)


def test_pyimfits_optimum_is_galprofs(tmp_path):
    golden = GOLDEN["fits"]["config_exponential_ic3478_256.dat|nopsf"]
    job, fr, pars = fit_config(config_at(golden, tmp_path), golden)
    assert fr.result.status[0] == 0 and fr.result.flags[0] == 0
    # IMFIT and galprof use the same pixels and the same noise
    assert fr.result.dof[0] + len(fr.result.free) == golden["n_valid_pixels"]
    for name, p in golden["parameters"].items():
        value, error = pars[name]
        assert abs(value - p["value"]) < 0.2 * p["error"], (name, value, p)
        assert error == pytest.approx(p["error"], rel=0.02), name  # the same covariance
    # the optimum: galprof's chi^2 within 0.01% of IMFIT's (pixel integration differs: IMFIT
    # sub-samples only within 10 px of the centre)
    assert fr.result.chi2[0] == pytest.approx(golden["chi2"], rel=1e-4)


#: IMFIT pegs the disk's PA at its limit of 90 degrees there; galprof's PA runs into the same limit
#: (its transform saturates; the solver holds it there and fits the rest), and from pyimfit's optimum
#: it stays there (the slow test below).
_AT_PA_LIMIT = "config_sersic+exponential_ic3478_256.dat|nopsf"


def _cases():
    for key in GOLDEN["fits"]:
        yield pytest.param(key, id=key)


@pytest.mark.slow
@pytest.mark.parametrize("key", _cases())
def test_galprof_fit_of_each_configuration_agrees_with_pyimfit(key, tmp_path):
    golden = GOLDEN["fits"][key]
    args = ["fit", str(DATA / golden["config"]), "--image", str(DATA / "ic3478rss_256.fits"),
            "--mask", str(DATA / "ic3478rss_256_mask.fits"), "--gain", str(NOISE["gain"]),
            "--readnoise", str(NOISE["read_noise"]), "--sky", str(NOISE["original_sky"]), "--out", str(tmp_path)]
    if golden["psf"]:
        args += ["--psf", str(DATA / golden["psf"])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GalprofWarning)
        assert main(args) == 0
        cfg = read_imfit_config(DATA / golden["config"])
    from astropy.table import Table

    stem = golden["config"].rsplit(".", 1)[0]
    t = Table.read(tmp_path / f"{stem}_results.fits")
    assert t["status"][0] == "converged", t["message"][0]
    values = {k: float(t[k.replace(".", "_")][0]) for k in cfg.model.parameter_names}
    pars = imfit_parameters(cfg, values)
    for name, p in golden["parameters"].items():
        if p["error"] == 0:  # pegged at a limit by IMFIT: no error to compare with
            continue
        assert abs(pars[name][0] - p["value"]) < p["error"], (name, pars[name][0], p)


@pytest.mark.slow
def test_two_component_optimum_at_the_pa_limit(tmp_path):
    """The Sérsic + exponential fit without PSF: IMFIT's optimum has the disk's PA at its limit (90);
    started just inside the limit, galprof stays at that optimum, with a chi^2 as low."""
    golden = GOLDEN["fits"][_AT_PA_LIMIT]
    path = config_at(golden, tmp_path)
    path.write_text(path.read_text().replace("PA 90.0 0,90", "PA 89.9 0,90"))
    job, fr, pars = fit_config(path, golden)
    assert fr.result.status[0] == 0
    for name, p in golden["parameters"].items():
        if p["error"] > 0:
            assert abs(pars[name][0] - p["value"]) < 0.1 * p["error"], name
    assert pars["PA_2"][0] == pytest.approx(90.0, abs=1e-3)
    assert fr.result.chi2[0] <= golden["chi2"] + 1.0
