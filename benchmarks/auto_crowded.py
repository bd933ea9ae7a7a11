"""Zero-touch fits of crowded GalSim stamps: automatic masks and starts vs truth-based ones.

Simulations (GalSim, SDSS-like; the PSF, noise and target distribution of benchmarks/galsim_sims.py):
each stamp holds a target Sérsic galaxy (re 1.5-10 px log-uniform, n 0.5-5, q 0.2-1, any PA,
matched-filter S/N 30-300 log-uniform, centre within half a pixel of the stamp centre; stamps
of 64, 96, 128 or 192 px, the smallest at least 20 re wide) plus

- 0-6 neighbour galaxies (uniform number): Sérsic, re 1-8 px, n 0.5-4, q 0.3-1, flux 0.03-3 times
  the target's (log-uniform), placed (``--placement``) either ``uniform``: anywhere in the
  stamp, as sources fall on the sky, but with centres at least u = 1.5 (re_target +
  re_neighbour) from the target's (closer pairs are one blend, not a target and a neighbour),
  or ``clustered`` (a stress test): at u (re_target + re_neighbour) with u log-uniform in
  [1.5, 8], so that about one neighbour in six overlaps heavily (u < 2);
- 0-3 stars (PSF point sources), flux 0.05-5 times the target's, at least 1.5 re_target + 3 px
  from it;
- a constant sky residual, uniform in [-0.3, 0.3] sky sigma; Moffat PSF (beta 4.5, FWHM 3.5 px)
  given as a 41 x 41 star-like image; sky noise sigma 1 plus Poisson noise (gain 4.7), with the
  true sigma map.

Each stamp is fitted with a single Sérsic + free sky (LM, float64, finite-difference Jacobian),
three ways:

``auto``
    galprof.detect with its defaults on the stamp alone: sep detection, background-mode masks
    (segments grown by 2 px, neighbours' extrapolated wings above 0.5 RMS), all starts measured
    (centre, mag, re, n, q, PA, sky). Nothing from the truth.
``truth``
    truth-perturbed starts as in benchmarks/galsim_sims.py (re x/ 1.5, n = 2, q = 0.7,
    PA +- 20 deg, mag +- 0.5, centre +- 1.5 px, sky 0) and perfect masks: every pixel where the
    true light of the other sources exceeds 0.5 sky sigma.
``auto+nb``
    as ``auto``, with up to 3 bright overlapping neighbours fitted as extra Sérsic components
    (``DetectOptions(neighbours=3)``: Kron flux at least 10% of the target's, Kron ellipses
    overlapping) instead of masked.

Success for a target with S/N > 50: |re_fit / re_true - 1| < max(10%, 3 sigma_re / re) and
|mag_fit - mag_true| < max(0.05, 3 sigma_mag). Also printed: convergence rates (status
converged) for all stamps, and the time of detection + guessing per galaxy against the fit time
per galaxy (batched by stamp size). Run with one thread::

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/auto_crowded.py --n 300 [--placement clustered]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from galsim_sims import GAIN, PSF_BETA, PSF_FWHM, SKY_SIGMA, psf_image, stamp_size  # noqa: E402

import galprof  # noqa: E402
from galprof.detect import DetectOptions, auto_inputs, psf_radii  # noqa: E402

#: stamp sizes: the smallest holding 20 re (192 px for re > 9.6 px)
SIZES = (64, 96, 128, 192)


@dataclass
class Stamp:
    image: np.ndarray
    sigma: np.ndarray
    truth: dict
    perfect_mask: np.ndarray
    n_neighbours: int
    n_stars: int
    min_overlap: float  # smallest u = distance / (re_t + re_nb) among neighbours (inf if none)
    other: np.ndarray  # the true light of the neighbours and stars
    starts_truth: dict = field(default_factory=dict)
    target_light: np.ndarray | None = None  # the true light of the target


def simulate(n: int, seed: int = 7, placement: str = "clustered") -> tuple[list[Stamp], np.ndarray]:
    import galsim

    rng = np.random.default_rng(seed)
    gsp = galsim.GSParams(folding_threshold=1e-4, maxk_threshold=1e-5)
    moffat = galsim.Moffat(beta=PSF_BETA, fwhm=PSF_FWHM, gsparams=gsp)
    psf = psf_image("star")
    out = []

    def draw(obj, size, x, y):
        im = galsim.ImageD(size, size, scale=1.0)
        galsim.Convolve(obj, moffat, gsparams=gsp).drawImage(image=im, center=galsim.PositionD(x, y))
        return im.array

    def sersic(n_, re, q, pa, flux):
        g = galsim.Sersic(n_, half_light_radius=re * math.sqrt(q), flux=flux, gsparams=gsp)
        return g.shear(q=q, beta=(pa + 90) * galsim.degrees)

    for _ in range(n):
        re = float(np.exp(rng.uniform(np.log(1.5), np.log(10.0))))
        size = stamp_size(re, SIZES)
        c = size / 2 + 0.5
        t = {"x0": c + rng.uniform(-0.5, 0.5), "y0": c + rng.uniform(-0.5, 0.5), "re": re,
             "n": rng.uniform(0.5, 5.0), "q": rng.uniform(0.2, 1.0), "pa": rng.uniform(-90, 90)}
        unit = draw(sersic(t["n"], re, t["q"], t["pa"], 1.0), size, t["x0"], t["y0"])
        snr = float(np.exp(rng.uniform(np.log(30.0), np.log(300.0))))
        flux = snr * SKY_SIGMA / math.sqrt(float((unit ** 2).sum()))
        target = flux * unit
        t.update(flux=flux, mag=-2.5 * math.log10(flux), snr=snr, sky=rng.uniform(-0.3, 0.3) * SKY_SIGMA)
        other = np.zeros_like(target)
        k = int(rng.integers(0, 7))
        overlaps = []
        for _ in range(k):
            for _try in range(50):
                re_n = float(np.exp(rng.uniform(0.0, np.log(8.0))))
                if placement == "clustered":
                    u = float(np.exp(rng.uniform(np.log(1.5), np.log(8.0))))
                    ang = rng.uniform(0, 2 * np.pi)
                    x = t["x0"] + u * (re + re_n) * np.cos(ang)
                    y = t["y0"] + u * (re + re_n) * np.sin(ang)
                else:
                    x, y = rng.uniform(3, size - 2, 2)
                    u = math.hypot(x - t["x0"], y - t["y0"]) / (re + re_n)
                if 3 <= x <= size - 2 and 3 <= y <= size - 2 and u >= 1.5:
                    break
            else:
                continue
            overlaps.append(u)
            f = flux * float(np.exp(rng.uniform(np.log(0.03), np.log(3.0))))
            t.setdefault("neighbours", []).append((round(x, 1), round(y, 1), round(re_n, 2), round(f / flux, 3),
                                                   round(u, 2)))
            other += draw(sersic(rng.uniform(0.5, 4.0), re_n, rng.uniform(0.3, 1.0), rng.uniform(-90, 90), f),
                          size, x, y)
        s_count = int(rng.integers(0, 4))
        for _ in range(s_count):
            for _try in range(50):
                x, y = rng.uniform(3, size - 2, 2)
                if math.hypot(x - t["x0"], y - t["y0"]) >= 1.5 * re + 3:
                    break
            f = flux * float(np.exp(rng.uniform(np.log(0.05), np.log(5.0))))
            other += draw(galsim.DeltaFunction(flux=f), size, x, y)
        model = target + other
        sigma = np.sqrt(SKY_SIGMA ** 2 + np.clip(model, 0, None) / GAIN)
        image = model + t["sky"] + rng.normal(0.0, 1.0, model.shape) * sigma
        st = {"g.x0": t["x0"] + rng.uniform(-1.5, 1.5), "g.y0": t["y0"] + rng.uniform(-1.5, 1.5),
              "g.mag": t["mag"] + rng.uniform(-0.5, 0.5), "g.re": re * 1.5 ** rng.choice([-1.0, 1.0]),
              "g.n": 2.0, "g.q": 0.7, "g.pa": t["pa"] + rng.uniform(-20, 20), "sky.sky": 0.0}
        out.append(Stamp(image=image, sigma=sigma, truth=t, perfect_mask=other > 0.5 * SKY_SIGMA, n_neighbours=k,
                         n_stars=s_count, min_overlap=min(overlaps) if overlaps else math.inf, other=other,
                         starts_truth=st, target_light=target))
    return out, psf


def base_model():
    return galprof.load_model({"zeropoint": 0.0, "components": {
        "g": {"profile": "sersic", "x0": 32.5, "y0": 32.5, "mag": -5.0, "re": {"value": 4.0, "bounds": [0.3, 200.0]},
              "n": {"value": 2.0, "bounds": [0.3, 8.0]}, "q": 0.7, "pa": 0.0},
        "sky": {"profile": "sky", "sky": 0.0}}})


def _fit_groups(groups, psf, dtype):
    """Fit each group {key: (model, [indices], images, sigmas, masks, starts)}; returns per-index results."""
    out = {}
    t_fit = 0.0
    for model, idx, images, sigmas, masks, starts in groups:
        t0 = time.perf_counter()
        res = galprof.fit(model, images, sigmas, masks, psf, initial={k: np.array(v) for k, v in starts.items()},
                          dtype=dtype)
        t_fit += time.perf_counter() - t0
        for j, i in enumerate(idx):
            out[i] = {"status": int(res.status[j]), "n_iter": int(res.n_iter[j]),
                      **{k: float(res.values[k][j]) for k in ("g.re", "g.mag")},
                      **{k + "_err": float(res.errors[k][j]) for k in ("g.re", "g.mag")}}
    return out, t_fit


def run_mode(stamps, psf, mode: str, dtype=torch.float64, batch: int = 32, verbose=True, detect_kw=None):
    model0 = base_model()
    t_auto = 0.0
    prepared = []
    ps = psf_radii(psf)
    opts = DetectOptions(**{**(detect_kw or {}), "neighbours": 3 if mode == "auto+nb" else 0})
    for s in stamps:
        if mode == "truth":
            prepared.append((model0, s.perfect_mask, dict(s.starts_truth), ""))
            continue
        t0 = time.perf_counter()
        r = auto_inputs(s.image, model=model0, sigma=s.sigma, psf=psf, psf_stats=ps, options=opts)
        t_auto += time.perf_counter() - t0
        starts = r.starts
        if r.target is None:  # nothing detected at the centre: the model's generic starts
            starts = {"g.x0": s.image.shape[1] / 2 + 0.5, "g.y0": s.image.shape[0] / 2 + 0.5}
        prepared.append((r.model, r.mask, starts, "; ".join(r.notes)))
    # group by stamp size and model (number of components)
    keys = {}
    for i, entry in enumerate(prepared):
        keys.setdefault((stamps[i].image.shape, len(entry[0].components)), []).append(i)
    groups = []
    for (_, _), idx in sorted(keys.items()):
        for b in range(0, len(idx), batch):
            sub = idx[b:b + batch]
            model = prepared[sub[0]][0]
            names = model.parameter_names
            starts = {k: [prepared[i][2].get(k, np.nan) for i in sub] for k in names
                      if any(k in prepared[i][2] for i in sub)}
            layout = model.layout(1)
            base = {k: float(v.reshape(-1)[0]) for k, v in layout.values().items()}
            starts = {k: [base[k] if not np.isfinite(v) else v for v in vals] for k, vals in starts.items()}
            groups.append((model, sub, [stamps[i].image for i in sub], [stamps[i].sigma for i in sub],
                           [prepared[i][1] for i in sub], starts))
    res, t_fit = _fit_groups(groups, psf, dtype)
    if verbose:
        print(f"  {mode}: detection+guess {t_auto:.1f} s, fit {t_fit:.1f} s", flush=True)
    return [res[i] for i in range(len(stamps))], t_auto, t_fit


def evaluate(stamps, results):
    ok = []
    conv = []
    for s, r in zip(stamps, results):
        conv.append(r["status"] == 0)
        t = s.truth
        if t["snr"] <= 50:
            continue
        dre = abs(r["g.re"] / t["re"] - 1.0)
        dmag = abs(r["g.mag"] - t["mag"])
        tol_re = max(0.10, 3 * r["g.re_err"] / t["re"]) if np.isfinite(r["g.re_err"]) else 0.10
        tol_mag = max(0.05, 3 * r["g.mag_err"]) if np.isfinite(r["g.mag_err"]) else 0.05
        ok.append(dre < tol_re and dmag < tol_mag)
    return np.array(ok), np.array(conv)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--modes", default="auto+nb,truth,auto")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--failures", action="store_true", help="list the failed targets of each mode")
    p.add_argument("--placement", choices=["clustered", "uniform"], default="uniform",
                   help="neighbours at u (re_t + re_nb) from the target, u log-uniform in [1.5, 8] (clustered), or "
                        "uniform over the stamp, u >= 1.5 (uniform)")
    p.add_argument("--deblend-cont", type=float, default=DetectOptions.deblend_cont)
    p.add_argument("--wings", type=float, default=DetectOptions.wings)
    p.add_argument("--dilate", type=float, default=DetectOptions.dilate)
    args = p.parse_args(argv)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    t0 = time.perf_counter()
    stamps, psf = simulate(args.n, args.seed, args.placement)
    detect_kw = {"deblend_cont": args.deblend_cont, "wings": args.wings, "dilate": args.dilate}
    n_bright = sum(s.truth["snr"] > 50 for s in stamps)
    print(f"placement {args.placement}, detection {detect_kw}")
    print(f"{args.n} stamps simulated in {time.perf_counter() - t0:.0f} s ({n_bright} targets with S/N > 50); "
          f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for mode in args.modes.split(","):
        results, t_auto, t_fit = run_mode(stamps, psf, mode, dtype=dtype, batch=args.batch, detect_kw=detect_kw)
        ok, conv = evaluate(stamps, results)
        n = len(stamps)
        rows.append((mode, ok.mean(), ok.size, conv.mean(), 1e3 * t_auto / n, 1e3 * t_fit / n,
                     t_auto / t_fit if mode != "truth" else math.nan))
        print(f"  {mode}: {100 * ok.mean():.1f}% of {ok.size} targets within tolerance, converged "
              f"{100 * conv.mean():.1f}%", flush=True)
        if args.failures:
            for i, r in enumerate(results):
                if r["status"] != 0:
                    s = stamps[i]
                    print(f"    {mode} not converged #{i}: snr {s.truth['snr']:.0f} re {s.truth['re']:.2f}->"
                          f"{r['g.re']:.2f} n {s.truth['n']:.1f} status {r['status']} iterations {r['n_iter']}")
            bright = [i for i, s in enumerate(stamps) if s.truth["snr"] > 50]
            for j, i in enumerate(bright):
                if not ok[j]:
                    s, r = stamps[i], results[i]
                    print(f"    {mode} fail #{i}: snr {s.truth['snr']:.0f} re {s.truth['re']:.2f}->{r['g.re']:.2f} "
                          f"n {s.truth['n']:.1f} mag {s.truth['mag']:.2f}->{r['g.mag']:.2f} nb {s.n_neighbours} "
                          f"stars {s.n_stars} min u {s.min_overlap:.2f} status {r['status']}")
    print(f"\nload average at the end: {os.getloadavg()}")
    print("| mode | targets S/N>50 within tolerance | n | converged (all stamps) | detect+guess ms/gal "
          "| fit ms/gal | detect / fit |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode, acc, nb, cv, ta, tf, ratio in rows:
        print(f"| {mode} | {100 * acc:.1f}% | {nb} | {100 * cv:.1f}% | {ta:.1f} | {tf:.0f} | "
              f"{'' if not np.isfinite(ratio) else f'{100 * ratio:.1f}%'} |")


if __name__ == "__main__":
    main()
