"""Fit throughput of galprof's batched Levenberg–Marquardt on SDSS-like GalSim galaxies.

Single Sérsic + Moffat PSF (FWHM 3.5 px, beta 4.5, star-like 41 x 41 image), 128 x 128 px stamps,
Gaussian noise (sky sigma chosen for S/N ~ 100 per galaxy), starts perturbed from the truth
(re x/ 1.5, n = 2, q = 0.7, PA +- 20 deg, mag +- 0.5, centre +- 1.5 px). Prints galaxies/s,
iterations, convergence and the median |fit - truth| / error per parameter.

    python benchmarks/fit_throughput.py [--n 32] [--dtype float64]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch

import galprof


def simulate(n: int, seed: int = 3):
    import galsim

    rng = np.random.default_rng(seed)
    gsp = galsim.GSParams(folding_threshold=1e-4, maxk_threshold=1e-5)
    moffat = galsim.Moffat(beta=4.5, fwhm=3.5, gsparams=gsp)
    psf = galsim.Convolve(moffat, galsim.Pixel(1.0), gsparams=gsp).drawImage(nx=41, ny=41, scale=1.0,
                                                                             method="no_pixel").array
    truths, images, sigmas = [], [], []
    for _ in range(n):
        t = {"x0": 64.5 + rng.uniform(-0.5, 0.5), "y0": 64.5 + rng.uniform(-0.5, 0.5),
             "re": float(np.exp(rng.uniform(np.log(1.5), np.log(15)))), "n": rng.uniform(0.5, 6.0),
             "q": rng.uniform(0.2, 1.0), "pa": rng.uniform(-90, 90), "flux": 10 ** rng.uniform(2.5, 3.5)}
        g = galsim.Sersic(t["n"], half_light_radius=t["re"] * math.sqrt(t["q"]), flux=t["flux"], gsparams=gsp)
        g = g.shear(q=t["q"], beta=(t["pa"] + 90) * galsim.degrees)
        im = galsim.ImageD(128, 128, scale=1.0)
        galsim.Convolve(g, moffat, gsparams=gsp).drawImage(image=im, center=galsim.PositionD(t["x0"], t["y0"]))
        sky_sigma = t["flux"] / 100.0 / math.sqrt(4 * math.pi * (t["re"] ** 2 + 2.0))  # S/N ~ 100
        images.append(im.array + rng.normal(0, sky_sigma, im.array.shape))
        sigmas.append(np.full(im.array.shape, sky_sigma))
        truths.append(t)
    return truths, images, sigmas, psf, rng


def perturbed_starts(truths, rng) -> dict[str, list[float]]:
    """Starts perturbed from the truths (galprof conventions, zeropoint 0): re x/ 1.5, n = 2,
    q = 0.7, PA +- 20 deg, mag +- 0.5, centre +- 1.5 px. ``rng`` continues the one of :func:`simulate`."""
    start = {k: [] for k in ("x0", "y0", "mag", "re", "n", "q", "pa")}
    for t in truths:
        start["x0"].append(t["x0"] + rng.uniform(-1.5, 1.5))
        start["y0"].append(t["y0"] + rng.uniform(-1.5, 1.5))
        start["mag"].append(-2.5 * math.log10(t["flux"]) + rng.uniform(-0.5, 0.5))
        start["re"].append(t["re"] * 1.5 ** rng.choice([-1, 1]))
        start["n"].append(2.0)
        start["q"].append(0.7)
        start["pa"].append(t["pa"] + rng.uniform(-20, 20))
    return start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--dtype", default="float64")
    ap.add_argument("--jacobian", default="finite-difference", choices=["autodiff", "finite-difference"])
    ap.add_argument("--optimizer", default="lm", choices=["lm", "adam", "diffgrad"])
    args = ap.parse_args(argv)
    truths, images, sigmas, psf, rng = simulate(args.n)
    start = perturbed_starts(truths, rng)
    model = galprof.load_model({"zeropoint": 0.0, "components": {"g": {
        "profile": "sersic", "x0": 64.5, "y0": 64.5, "mag": -7.0, "re": 4.0, "n": 2.0, "q": 0.7, "pa": 0.0}}})
    t0 = time.perf_counter()
    res = galprof.fit(model, images, sigmas, psf=psf, initial={f"g.{k}": v for k, v in start.items()},
                      dtype=getattr(torch, args.dtype), jacobian=args.jacobian, optimizer=args.optimizer)
    dt = time.perf_counter() - t0
    ok = res.status == 0
    print(f"# galprof {args.optimizer}, {args.n} galaxies 128x128, {args.dtype}, {args.jacobian} Jacobian, "
          f"{torch.get_num_threads()} threads")
    print(f"time {dt:.1f} s, {args.n / dt:.2f} galaxies/s, converged {ok.mean():.0%}, "
          f"median iterations {np.median(res.n_iter):.0f}")
    for k in ("x0", "y0", "re", "n", "q", "pa"):
        truth = np.array([t[k] for t in truths])
        pull = (res.values[f"g.{k}"] - truth) / res.errors[f"g.{k}"]
        med = np.median(pull[ok])
        print(f"  {k:>3}: median pull {med:+.2f}, robust std {1.4826 * np.median(np.abs(pull[ok] - med)):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
