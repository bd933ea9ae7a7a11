"""Make the pyimfit golden fits of tests/test_vs_imfit.py (tests/data/imfit_golden/).

GalSim single-Sérsic galaxies with SDSS-like noise and an optical (pixel-free) PSF, fitted with
pyimfit (IMFIT's Levenberg–Marquardt, default pixel subsampling, the PSF image as given) from
perturbed starts. Images, sigma maps, PSFs, truths, starts and pyimfit's results (converted to
galprof's conventions) go into one compressed ``.npz`` with the versions that made it.

Simulation (fixed seeds):

* PSF per galaxy: a Moffat (FWHM U(3, 4) px, beta U(3, 5), truncated at 19 px so that all of it
  lies inside its 41 x 41 image, sheared by |g1|, |g2| < 0.03), sampled at pixel centres without
  pixel response (``method="no_pixel"``): an optical PSF.
* Galaxy: ``galsim.Sersic`` (r_e semi-major, q, PA counter-clockwise from +y, total flux; centre
  within half a pixel of the centre of a 64 x 64 stamp), convolved with the PSF and drawn with
  GalSim's default method (integrated over pixels): galaxy * optical PSF * pixel.
* A flat sky residual U(-1, 1) counts; Gaussian noise of variance ``5.3^2 + model / 4.7`` (SDSS
  r-band-like sky noise in counts, gain 4.7 e-/count, source Poisson term of the noiseless
  model); that sigma is the sigma map. Images and sigma maps are stored as float32 and pyimfit
  fits the stored values.
* Starts: r_e x or / 1.5, n = 2, q = 0.7, PA +- 20 deg, mag +- 0.5, centre +- 1.5 px, sky 0.

Two sets:

* ``all``: the SDSS-like distribution (n U(0.5, 6), r_e log-U(1.5, 8) px, q U(0.25, 0.9), flux
  log-U(5e3, 8e4) counts, S/N ~ 50-1000).
* ``right``: galaxies for which IMFIT's rendering is right at their noise level. IMFIT convolves
  the pixel-integrated model, sampled on the pixel grid, with the PSF samples; with an optical PSF
  that is exact only when the pixel-integrated galaxy is band-limited at the pixel scale, and
  IMFIT's pixel subsampling (20 x 20 within 3 px of the centre, fewer out to 10 px, none beyond)
  adds its own error. Candidates are drawn from n U(0.5, 1.5), r_e log-U(2.5, 8) px, q U(0.3,
  0.9), flux log-U(1e3, 1e4) counts and kept only if IMFIT, fitting the *noiseless* GalSim image
  (with the same sigma map) from the truth, recovers every parameter within 0.1 of its error and
  leaves chi2 <= 1e-4 — a test of IMFIT against GalSim alone. For both sets the same two numbers
  are recorded (``imfit_D``: chi2 distance of IMFIT's model at the truth from the noiseless GalSim
  image; ``imfit_Dperp``: the chi2 that IMFIT's fit of the noiseless image leaves).

Model: Sérsic + free flat sky (IMFIT ``Sersic`` + ``FlatSky``; galprof ``sersic`` + ``sky``),
zeropoint 0. IMFIT limits: ell [0, 0.98], n [0.25, 10], r_e [0.05, 1000] (galprof's default
bounds of q, n, re), I_e > 0; PA, centre and sky free. Conversion to galprof (docs/conventions.md):
x0, y0, pa unchanged (both: pixel (1, 1) is the centre of the first pixel; PA counter-clockwise
from +y); q = 1 - ell; mag = -2.5 log10 F with F = 2 pi q r_e^2 I_e n e^b Gamma(2n) / b^(2n),
b = gammaincinv(2n, 1/2). The mag error needs the covariance of (n, I_e, r_e, ell), which pyimfit
does not return: it is computed from IMFIT's own model images (central-difference Jacobian
through ``getModelImage``, ``(J^T W J)^-1``); its diagonal is recorded next to pyimfit's errors.

    python benchmarks/make_imfit_golden.py [--n-right 32] [--n-all 16] [--out tests/data/imfit_golden/imfit_golden.npz]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from scipy.special import gamma, gammaincinv

SKY_SIGMA = 5.3  # counts
GAIN = 4.7  # e-/count
SIZE = 64
PSF_SIZE = 41
PSF_TRUNC = 19.0
SEEDS = {"right": 20260611, "all": 20260612}
KEYS = ("x0", "y0", "mag", "re", "n", "q", "pa", "sky")
IMFIT_NAMES = ("X0", "Y0", "PA", "ell", "n", "I_e", "r_e", "I_sky")
#: parameter distributions (uniform, or log-uniform for re and flux)
REGIMES = {"all": {"n": (0.5, 6.0), "re": (1.5, 8.0), "q": (0.25, 0.9), "flux": (5e3, 8e4)},
           "right": {"n": (0.5, 1.5), "re": (3.0, 8.0), "q": (0.55, 0.9), "flux": (800.0, 3000.0)}}
#: a ``right`` galaxy: IMFIT's model differs from GalSim's rendering of the same values by a chi2
#: distance <= this, at the truth and at IMFIT's best fit of the noisy image, ...
RIGHT_D = 2.5e-4
#: ... and IMFIT's fit of the noiseless image recovers every parameter within this many errors
RIGHT_BIAS = 0.1


def sersic_flux_factor(n, re, q):
    """Total flux / I_e of a Sérsic profile: 2 pi q re^2 n e^b Gamma(2n) / b^(2n)."""
    b = gammaincinv(2 * n, 0.5)
    return 2 * math.pi * q * re**2 * n * math.exp(b) * gamma(2 * n) / b ** (2 * n)


def psf_object(desc):
    """The optical PSF: a Moffat truncated at 19 px (all of it inside the 41 x 41 image), sheared."""
    import galsim

    gsp = galsim.GSParams(folding_threshold=1e-4, maxk_threshold=1e-5, kvalue_accuracy=1e-8)
    m = galsim.Moffat(beta=desc["beta"], fwhm=desc["fwhm"], trunc=PSF_TRUNC, gsparams=gsp)
    return m.shear(g1=desc["g1"], g2=desc["g2"])


def psf_image(desc) -> np.ndarray:
    """The PSF sampled at pixel centres (no pixel response), centred on the middle pixel."""
    return psf_object(desc).drawImage(nx=PSF_SIZE, ny=PSF_SIZE, scale=1.0, method="no_pixel").array


def simulate_one(rng, regime: str) -> dict:
    """One galaxy of ``regime``: image, sigma, noiseless model, PSF, truth and start."""
    import galsim

    r = REGIMES[regime]
    gsp = galsim.GSParams(folding_threshold=1e-4, maxk_threshold=1e-5, kvalue_accuracy=1e-8,
                          maximum_fft_size=16384)
    psf_desc = {"fwhm": rng.uniform(3.0, 4.0), "beta": rng.uniform(3.0, 5.0),
                "g1": rng.uniform(-0.03, 0.03), "g2": rng.uniform(-0.03, 0.03)}
    c = (SIZE + 1) / 2
    t = {"x0": c + rng.uniform(-0.5, 0.5), "y0": c + rng.uniform(-0.5, 0.5),
         "re": float(np.exp(rng.uniform(*np.log(r["re"])))), "n": rng.uniform(*r["n"]),
         "q": rng.uniform(*r["q"]), "pa": rng.uniform(-90.0, 90.0),
         "flux": float(np.exp(rng.uniform(*np.log(r["flux"])))), "sky": rng.uniform(-1.0, 1.0)}
    g = galsim.Sersic(t["n"], half_light_radius=t["re"] * math.sqrt(t["q"]), flux=t["flux"], gsparams=gsp)
    g = g.shear(q=t["q"], beta=(t["pa"] + 90.0) * galsim.degrees)
    im = galsim.ImageD(SIZE, SIZE, scale=1.0)
    galsim.Convolve(g, psf_object(psf_desc), gsparams=gsp).drawImage(image=im,
                                                                   center=galsim.PositionD(t["x0"], t["y0"]))
    model = im.array
    sigma = np.sqrt(SKY_SIGMA**2 + np.clip(model, 0, None) / GAIN)
    image = model + t["sky"] + rng.normal(0.0, 1.0, model.shape) * sigma
    start = {"x0": t["x0"] + rng.uniform(-1.5, 1.5), "y0": t["y0"] + rng.uniform(-1.5, 1.5),
             "mag": -2.5 * math.log10(t["flux"]) + rng.uniform(-0.5, 0.5),
             "re": t["re"] * 1.5 ** rng.choice([-1, 1]), "n": 2.0, "q": 0.7,
             "pa": t["pa"] + rng.uniform(-20.0, 20.0), "sky": 0.0}
    truth = {k: t[k] for k in KEYS if k != "mag"}
    truth["mag"] = -2.5 * math.log10(t["flux"])
    return {"image": image.astype(np.float32), "sigma": sigma.astype(np.float32), "noiseless": model + t["sky"],
            "psf": psf_image(psf_desc).astype(np.float32), "psf_desc": psf_desc, "truth": truth, "start": start}


def imfit_description(start):
    """IMFIT model (Sersic + FlatSky) for galprof-convention starting values."""
    ie = 10 ** (-0.4 * start["mag"]) / sersic_flux_factor(start["n"], start["re"], start["q"])
    return {"function_sets": [{"X0": start["x0"], "Y0": start["y0"], "function_list": [
        {"name": "Sersic", "label": "galaxy", "parameters": {
            "PA": start["pa"], "ell": [1.0 - start["q"], 0.0, 0.98], "n": [start["n"], 0.25, 10.0],
            "I_e": [ie, 0.0, 1e12], "r_e": [start["re"], 0.05, 1000.0]}},
        {"name": "FlatSky", "label": "sky", "parameters": {"I_sky": start["sky"]}}]}]}


def imfit_vector(v) -> np.ndarray:
    """galprof values -> IMFIT parameter vector (X0, Y0, PA, ell, n, I_e, r_e, I_sky)."""
    ie = 10 ** (-0.4 * v["mag"]) / sersic_flux_factor(v["n"], v["re"], v["q"])
    return np.array([v["x0"], v["y0"], v["pa"], 1.0 - v["q"], v["n"], ie, v["re"], v["sky"]])


def to_galprof(p) -> dict:
    """IMFIT parameter vector -> galprof values (PA wrapped to [-90, 90))."""
    x0, y0, pa, ell, n, ie, re, sky = p
    q = 1.0 - ell
    flux = ie * sersic_flux_factor(n, re, q)
    return {"x0": x0, "y0": y0, "mag": -2.5 * math.log10(flux) if flux > 0 else math.nan, "re": re, "n": n,
            "q": q, "pa": (pa + 90.0) % 180.0 - 90.0, "sky": sky}


def imfit_covariance(fitter, p, sigma):
    """(J^T W J)^-1 of IMFIT's own model at ``p`` (central differences through getModelImage)."""
    w = 1.0 / sigma.astype(np.float64).ravel() ** 2
    cols = []
    for j in range(len(p)):
        h = 1e-5 * max(abs(p[j]), 1.0)
        up, dn = p.copy(), p.copy()
        up[j] += h
        dn[j] -= h
        diff = fitter.getModelImage(newParameters=up) - fitter.getModelImage(newParameters=dn)
        cols.append((diff / (2 * h)).ravel())
    J = np.stack(cols, axis=1)
    try:
        return np.linalg.inv(J.T @ (J * w[:, None]))
    except np.linalg.LinAlgError:  # a degenerate fit (e.g. ell = 0, where PA is undefined)
        return np.full((len(p), len(p)), np.nan)


def galprof_errors(p, perr, cov) -> dict:
    """pyimfit's errors in galprof's parameters; mag's from the covariance of (ell, n, I_e, r_e)."""
    grad = np.zeros(len(p))
    for j in (3, 4, 5, 6):
        h = 1e-6 * max(abs(p[j]), 1.0)
        up, dn = p.copy(), p.copy()
        up[j] += h
        dn[j] -= h
        grad[j] = (to_galprof(up)["mag"] - to_galprof(dn)["mag"]) / (2 * h)
    return {"x0": perr[0], "y0": perr[1], "pa": perr[2], "q": perr[3], "n": perr[4], "re": perr[6],
            "sky": perr[7], "mag": float(np.sqrt(grad @ cov @ grad))}


def fit_imfit(image, sigma, psf, start, threads: int = 0) -> dict:
    import pyimfit

    fitter = pyimfit.Imfit(imfit_description(start), psf=np.asarray(psf, dtype=np.float64), maxThreads=threads)
    t0 = time.perf_counter()
    res = fitter.fit(np.asarray(image, dtype=np.float64), error=np.asarray(sigma, dtype=np.float64), solver="LM")
    dt = time.perf_counter() - t0
    p = np.asarray(res.params, dtype=np.float64)
    perr = np.asarray(res.paramErrs, dtype=np.float64)
    cov = imfit_covariance(fitter, p, sigma)
    return {"fitter": fitter, "values": to_galprof(p), "errors": galprof_errors(p, perr, cov), "params": p,
            "param_errors": perr, "cov_errors": np.sqrt(np.diag(cov)), "chi2": float(res.fitStat),
            "converged": bool(res.fitConverged), "n_iter": int(res.nIter), "time": dt}


def imfit_accuracy(g) -> dict:
    """How right IMFIT's rendering is for this galaxy, judged against GalSim alone.

    ``D``: chi2 distance of IMFIT's model at the truth from the noiseless GalSim image;
    ``Dperp``: the chi2 IMFIT's fit of the noiseless image (from the truth) leaves;
    ``bias``: (that fit - truth) / its error, per parameter.
    """
    f = fit_imfit(g["noiseless"], g["sigma"], g["psf"], g["truth"], threads=1)
    D = float(f["fitter"].computeFitStatistic(imfit_vector(g["truth"])))
    bias = {}
    for k in KEYS:
        d = f["values"][k] - g["truth"][k]
        if k == "pa":
            d = (d + 90.0) % 180.0 - 90.0
        bias[k] = d / f["errors"][k]
    return {"D": D, "Dperp": f["chi2"], "bias": bias}


def galsim_image(v, psf_desc) -> np.ndarray:
    """GalSim's rendering (galaxy * optical PSF * pixel, plus sky) of galprof-convention values."""
    import galsim

    gsp = galsim.GSParams(folding_threshold=1e-4, maxk_threshold=1e-5, kvalue_accuracy=1e-8,
                          maximum_fft_size=16384)
    g = galsim.Sersic(v["n"], half_light_radius=v["re"] * math.sqrt(v["q"]), flux=10 ** (-0.4 * v["mag"]),
                      gsparams=gsp)
    g = g.shear(q=v["q"], beta=(v["pa"] + 90.0) * galsim.degrees)
    im = galsim.ImageD(SIZE, SIZE, scale=1.0)
    galsim.Convolve(g, psf_object(psf_desc), gsparams=gsp).drawImage(image=im,
                                                                   center=galsim.PositionD(v["x0"], v["y0"]))
    return im.array + v["sky"]


def make_set(regime: str, n: int, n_bound: int, threads: int) -> tuple[list[dict], list[dict], dict]:
    """Draw galaxies of ``regime`` and fit them with pyimfit. For ``right``, keep only those for which
    IMFIT's rendering is right (see the module docstring); set aside up to ``n_bound`` whose IMFIT
    fit ends with n on its lower limit (pegged; GalSim cannot render n < 0.3 to check it). Returns
    the kept galaxies, the set-aside ones and the count of every reason for rejection."""
    rng = np.random.default_rng(SEEDS[regime])
    kept, bound = [], []
    tally = {"drawn": 0, "D_truth": 0, "bias": 0, "pegged": 0, "D_opt": 0}
    while len(kept) < n:
        g = simulate_one(rng, regime)
        tally["drawn"] += 1
        g["accuracy"] = a = imfit_accuracy(g)
        if regime == "right" and a["D"] > RIGHT_D:
            tally["D_truth"] += 1
            continue
        if regime == "right" and not max(abs(b) for b in a["bias"].values()) <= RIGHT_BIAS:
            tally["bias"] += 1
            continue
        g["fit"] = f = fit_imfit(g["image"], g["sigma"], g["psf"], g["start"], threads)
        # chi2 distance of IMFIT's model at its own optimum from GalSim's rendering of the same values
        v = f["values"]
        ok = 0.3 <= v["n"] <= 6.2 and v["re"] <= 2 * SIZE and np.isfinite(v["mag"])
        a["D_opt"] = (float(np.sum(((f["fitter"].getModelImage(newParameters=f["params"])
                                     - galsim_image(v, g["psf_desc"])) / g["sigma"]) ** 2)) if ok else math.nan)
        if regime == "right":
            if np.any(f["param_errors"] == 0):
                tally["pegged"] += 1
                if f["params"][4] == 0.25 and len(bound) < n_bound:
                    bound.append(g)
                continue
            if not a["D_opt"] <= RIGHT_D or not all(np.isfinite(list(f["errors"].values()))):
                tally["D_opt"] += 1
                continue
        kept.append(g)
    return kept, bound, tally


def main(argv=None) -> int:
    import galsim
    import pyimfit

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-right", type=int, default=32)
    ap.add_argument("--n-all", type=int, default=16)
    ap.add_argument("--n-bound", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="pyimfit maxThreads for the timed fits (0: all)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests/data/imfit_golden"
                                                                             / "imfit_golden.npz"))
    args = ap.parse_args(argv)

    right, bound, tally = make_set("right", args.n_right, args.n_bound, args.threads)
    every, _, _ = make_set("all", args.n_all, 0, args.threads)
    sets = {"right": right, "bound": bound, "all": every}
    print(f"right: kept {len(right)}, set aside {len(bound)} with n pegged at 0.25; rejections {tally}")
    gals, labels = [], []
    for name, kept in sets.items():
        gals += kept
        labels += [name] * len(kept)
    fits = [g["fit"] for g in gals]

    out = {"zeropoint": np.float64(0.0), "keys": np.array(KEYS), "imfit_names": np.array(IMFIT_NAMES),
           "set": np.array(labels),
           "imfit_chi2": np.array([f["chi2"] for f in fits]),
           "imfit_converged": np.array([f["converged"] for f in fits]),
           "imfit_n_iter": np.array([f["n_iter"] for f in fits]),
           "imfit_time": np.array([f["time"] for f in fits]),
           "imfit_params": np.stack([f["params"] for f in fits]),
           "imfit_param_errors": np.stack([f["param_errors"] for f in fits]),
           "imfit_cov_errors": np.stack([f["cov_errors"] for f in fits]),
           "imfit_D": np.array([g["accuracy"]["D"] for g in gals]),
           "imfit_Dperp": np.array([g["accuracy"]["Dperp"] for g in gals]),
           "imfit_D_opt": np.array([g["accuracy"]["D_opt"] for g in gals]),
           "images": np.stack([g["image"] for g in gals]), "sigmas": np.stack([g["sigma"] for g in gals]),
           "psfs": np.stack([g["psf"] for g in gals])}
    for k in KEYS:
        out[f"truth_{k}"] = np.array([g["truth"][k] for g in gals])
        out[f"start_{k}"] = np.array([g["start"][k] for g in gals])
        out[f"imfit_{k}"] = np.array([f["values"][k] for f in fits])
        out[f"imfit_{k}_err"] = np.array([f["errors"][k] for f in fits])
        out[f"imfit_bias_{k}"] = np.array([g["accuracy"]["bias"][k] for g in gals])
    meta = {"pyimfit": pyimfit.__version__, "galsim": galsim.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "seeds": SEEDS, "regimes": REGIMES,
            "right_tally": tally, "right_criteria": {"D_max": RIGHT_D, "bias_max": RIGHT_BIAS},
            "pyimfit_threads": args.threads, "machine": platform.machine(),
            "command": " ".join(["python", "benchmarks/make_imfit_golden.py",
                                 *(argv if argv is not None else sys.argv[1:])])}
    out["meta"] = np.array(json.dumps(meta))
    out["psf_desc"] = np.array(json.dumps([g["psf_desc"] for g in gals]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)

    print(f"# pyimfit {pyimfit.__version__}, galsim {galsim.__version__}: {len(gals)} galaxies -> {args.out} "
          f"({Path(args.out).stat().st_size / 1e6:.2f} MB)")
    warnings.simplefilter("ignore", RuntimeWarning)  # the one-galaxy ``bound`` set has no spread
    for name in sets:
        m = out["set"] == name
        if not m.any():
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.abs(out["imfit_cov_errors"][m] / out["imfit_param_errors"][m] - 1)
        print(f"[{name}: {m.sum()}] converged {out['imfit_converged'][m].mean():.0%}, median iterations "
              f"{np.median(out['imfit_n_iter'][m]):.0f}, fit time {out['imfit_time'][m].sum():.1f} s; "
              f"IMFIT at the truth: D median {np.median(out['imfit_D'][m]):.3g} (max {out['imfit_D'][m].max():.3g}), "
              f"Dperp median {np.median(out['imfit_Dperp'][m]):.3g}, at IMFIT's optimum D median "
              f"{np.nanmedian(out['imfit_D_opt'][m]):.3g}; "
              f"covariance vs pyimfit errors: median rel. difference {np.nanmedian(rel):.1e}")
        for k in KEYS:
            b = out[f"imfit_bias_{k}"][m]
            d = out[f"imfit_{k}"][m] - out[f"truth_{k}"][m]
            if k == "pa":
                d = (d + 90) % 180 - 90
            with np.errstate(divide="ignore", invalid="ignore"):
                pull = d / out[f"imfit_{k}_err"][m]
            med = np.nanmedian(pull)
            print(f"  {k:>4}: noiseless bias/err max |{np.abs(b).max():.2f}|; noisy fit (fit - truth)/err median "
                  f"{med:+.2f}, robust std {1.4826 * np.nanmedian(np.abs(pull - med)):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
