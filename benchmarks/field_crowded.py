"""Crowded fields: every source fitted jointly with a shared sky, galprof against pyimfit.

A 512 x 512 GalSim field (GalSim draws everything: Sérsic galaxies convolved with a Moffat
PSF, pixel response included; sky 100 counts per pixel, Poisson noise, gain 1; the sigma map
is the true one) holds N galaxies (n 0.5–4, half-light radius 1.5–8 px, q 0.3–1, any PA,
fluxes 10^3.3–10^4.7 counts); 30% of them are placed 8–20 px from one of the others (placed
uniformly), so that they overlap. The PSF image (star-like, 31 x 31) is GalSim's drawing of the same Moffat.

Both codes start from the same values: the truth perturbed (centre +-1 px, mag +-0.3, re
x/÷ 1.3, n = 2, q = 0.7, PA +-15 deg; Gaussian, seeded), sky at its true level + 1 count.
galprof: :func:`galprof.field.fit_field` (single Sérsic template + flat sky, float64). pyimfit:
one function set per galaxy (Sersic) plus a FlatSky, IMFIT's Levenberg–Marquardt, one thread,
the same PSF and sigma map, bounds as galprof's (re 0.3–100 px, n 0.3–8). Each fit runs in a
child process of its own, so that the peak memory (max RSS) is its own.

Accuracy: the fraction of galaxies whose fitted mag and re lie within 3 sigma (each code's
own errors) of the truth; galprof's sigma is the covariance of the whole field. A second
galprof row starts from the image alone (``fit_field_auto``: sep detection and moments, then one
more round with the sources found on the residual image; fits are matched to the truth within
2 px, and a galaxy without a match counts as a failure).

    python benchmarks/field_crowded.py [--n 10,25,50,100] [--pyimfit-max 25] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

SIZE = 512
ZP = 30.0
SKY = 100.0
KEYS = ["x0", "y0", "mag", "re", "n", "q", "pa"]
TEMPLATE = {"zeropoint": ZP, "components": {
    "g": {"profile": "sersic", "x0": 0, "y0": 0, "mag": 20, "re": {"value": 3, "bounds": [0.3, 100]},
          "n": {"value": 2, "bounds": [0.3, 8]}, "q": 0.7, "pa": 0},
    "sky": {"profile": "sky", "sky": 0}}}


def simulate(n_src: int, seed: int, size: int = SIZE):
    import galsim

    rng = np.random.default_rng(seed)
    psf_g = galsim.Moffat(beta=3.0, fwhm=3.5)
    psf = psf_g.drawImage(nx=31, ny=31, scale=1.0).array
    img = galsim.ImageD(size, size, scale=1.0)
    truth = []
    placed_alone = []
    for i in range(n_src):
        if placed_alone and rng.random() < 0.3:
            j = placed_alone[rng.integers(len(placed_alone))]
            d, a = rng.uniform(8, 20), rng.uniform(0, 2 * np.pi)
            x = float(np.clip(truth[j][0] + d * np.cos(a), 12, size - 12))
            y = float(np.clip(truth[j][1] + d * np.sin(a), 12, size - 12))
        else:
            x, y = rng.uniform(12, size - 12, 2)
            placed_alone.append(i)
        re = float(np.exp(rng.uniform(np.log(1.5), np.log(8.0))))
        n, q, pa = rng.uniform(0.5, 4.0), rng.uniform(0.3, 1.0), rng.uniform(-90, 90)
        flux = 10 ** rng.uniform(3.3, 4.7)
        g = galsim.Sersic(n=n, half_light_radius=re * math.sqrt(q), flux=flux)
        g = g.shear(q=q, beta=(pa + 90) * galsim.degrees)
        galsim.Convolve(g, psf_g).drawImage(image=img, add_to_image=True, center=galsim.PositionD(x, y))
        truth.append((x, y, ZP - 2.5 * math.log10(flux), re, n, q, pa))
    truth = np.array(truth)
    expect = img.array + SKY
    data = rng.poisson(np.clip(expect, 0, None)).astype(np.float64)
    sigma = np.sqrt(expect)
    starts = {"x0": truth[:, 0] + rng.normal(0, 1, n_src), "y0": truth[:, 1] + rng.normal(0, 1, n_src),
              "mag": truth[:, 2] + rng.normal(0, 0.3, n_src), "re": truth[:, 3] * 1.3 ** rng.choice([-1, 1], n_src),
              "n": np.full(n_src, 2.0), "q": np.full(n_src, 0.7), "pa": truth[:, 6] + rng.normal(0, 15, n_src)}
    return data, sigma, psf, truth, starts


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------- workers
def run_galprof(d, detect: bool) -> dict:
    import torch

    import galprof
    from galprof.field import fit_field, fit_field_auto

    torch.set_num_threads(1)
    model = galprof.load_model(TEMPLATE)
    t0, c0 = time.perf_counter(), time.process_time()
    if detect:
        res, _, _ = fit_field_auto(model, d["data"], d["sigma"], psf=d["psf"], rounds=2)
    else:
        sources = {f"g.{k}": d[f"start_{k}"] for k in KEYS}
        sources["sky.sky"] = SKY + 1.0
        res = fit_field(model, d["data"], d["sigma"], psf=d["psf"], sources=sources)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    r = res.result
    return {"values": {k: r.values[f"g.{k}"].tolist() for k in KEYS},
            "errors": {k: r.errors[f"g.{k}"].tolist() for k in KEYS},
            "chi2": float(r.chi2[0]), "status": int(r.status[0]), "n_iter": int(r.n_iter[0]), "time": dt, "cpu": cpu,
            "rss": max_rss_mb(), "passes": res.passes, "n_fitted": len(r.chi2)}


def run_pyimfit(d) -> dict:
    import pyimfit
    from make_imfit_golden import sersic_flux_factor

    n_src = len(d["start_x0"])
    sets = []
    for i in range(n_src):
        s = {k: float(d[f"start_{k}"][i]) for k in KEYS}
        ie = 10 ** (-0.4 * (s["mag"] - ZP)) / sersic_flux_factor(s["n"], s["re"], s["q"])
        fl = [{"name": "Sersic", "label": f"g{i}", "parameters": {
            "PA": s["pa"], "ell": [1.0 - s["q"], 0.0, 0.98], "n": [s["n"], 0.3, 8.0], "I_e": [ie, 0.0, 1e12],
            "r_e": [s["re"], 0.3, 100.0]}}]
        if i == 0:
            fl.append({"name": "FlatSky", "label": "sky", "parameters": {"I_sky": SKY + 1.0}})
        sets.append({"X0": s["x0"], "Y0": s["y0"], "function_list": fl})
    t0, c0 = time.perf_counter(), time.process_time()
    fitter = pyimfit.Imfit({"function_sets": sets}, psf=d["psf"], maxThreads=1)
    res = fitter.fit(d["data"], error=d["sigma"], solver="LM")
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    p = np.asarray(res.params, dtype=np.float64)
    perr = np.asarray(res.paramErrs, dtype=np.float64)
    vals = {k: [] for k in KEYS}
    errs = {k: [] for k in KEYS}
    pos = 0
    for i in range(n_src):
        x0, y0, pa, ell, n, ie, re = p[pos:pos + 7]
        e = perr[pos:pos + 7]
        pos += 7 + (1 if i == 0 else 0)
        q = 1 - ell
        flux = ie * sersic_flux_factor(n, re, q)

        def mag_of(ie_, re_, n_, q=q):
            return ZP - 2.5 * math.log10(ie_ * sersic_flux_factor(n_, re_, q))

        # mag's error from those of I_e, r_e and n (pyimfit reports no covariance: taken independent)
        m0, h = mag_of(ie, re, n), 1e-6
        grad = [(mag_of(ie * (1 + h), re, n) - m0) / (ie * h), (mag_of(ie, re * (1 + h), n) - m0) / (re * h),
                (mag_of(ie, re, n * (1 + h)) - m0) / (n * h)]
        dmag = [grad[0] * e[5], grad[1] * e[6], grad[2] * e[4]]
        for k, v, err in (("x0", x0, e[0]), ("y0", y0, e[1]), ("mag", ZP - 2.5 * math.log10(flux), math.hypot(*dmag)),
                          ("re", re, e[6]), ("n", n, e[4]), ("q", q, e[3]), ("pa", (pa + 90) % 180 - 90, e[2])):
            vals[k].append(float(v))
            errs[k].append(float(err))
    return {"values": vals, "errors": errs, "chi2": float(res.fitStat), "status": 0 if res.fitConverged else 1,
            "n_iter": int(res.nIter), "time": dt, "cpu": cpu, "rss": max_rss_mb(), "n_fitted": n_src}


def worker(argv) -> int:
    which, path, out = argv
    d = dict(np.load(path))
    r = run_pyimfit(d) if which == "pyimfit" else run_galprof(d, detect=which == "galprof-detect")
    with open(out, "w") as f:
        json.dump(r, f)
    return 0


# ---------------------------------------------------------------------------- driver
def score(r, truth) -> dict:
    v = {k: np.asarray(r["values"][k]) for k in KEYS}
    e = {k: np.asarray(r["errors"][k]) for k in KEYS}
    # match each true galaxy to the nearest fitted source within 2 px (detections come in their
    # own order; a start from the truth is its own galaxy's)
    idx = []
    for x, y in truth[:, :2]:
        d = np.hypot(v["x0"] - x, v["y0"] - y)
        idx.append(int(np.argmin(d)) if d.size and d.min() < 2 else -1)
    idx = np.array(idx)
    found = idx >= 0
    v = {k: np.where(found, a[np.clip(idx, 0, None)], np.nan) for k, a in v.items()}
    e = {k: np.where(found, a[np.clip(idx, 0, None)], np.nan) for k, a in e.items()}
    ok_mag = np.abs(v["mag"] - truth[:, 2]) < 3 * e["mag"]
    ok_re = np.abs(v["re"] - truth[:, 3]) < 3 * e["re"]
    return {"within3": float(np.mean(ok_mag & ok_re)), "mag3": float(np.mean(ok_mag)), "re3": float(np.mean(ok_re)),
            "med_dmag": float(np.nanmedian(np.abs(v["mag"] - truth[:, 2]))),
            "med_dre": float(np.nanmedian(np.abs(v["re"] / truth[:, 3] - 1)))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default="10,25,50,100", help="numbers of galaxies (comma-separated)")
    ap.add_argument("--pyimfit-max", type=int, default=25, help="run pyimfit up to this many galaxies")
    ap.add_argument("--no-detect", action="store_true", help="skip the galprof run from detection")
    ap.add_argument("--codes", help="only these of galprof, galprof-detect, pyimfit")
    ap.add_argument("--timeout", type=float, help="seconds each fit may take (then reported as not finished)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker)
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print(f"# machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f} at the start")
    print("| N | free params | code | status | iterations | wall s | CPU s | peak RSS MB | within 3σ (mag & re) "
          "| median abs Δmag | median abs Δre/re | chi2 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for n_src in [int(v) for v in a.n.split(",")]:
            data, sigma, psf, truth, starts = simulate(n_src, a.seed + n_src)
            path = os.path.join(tmp, f"field{n_src}.npz")
            np.savez(path, data=data, sigma=sigma, psf=psf, **{f"start_{k}": v for k, v in starts.items()})
            codes = ["galprof"] + ([] if a.no_detect else ["galprof-detect"])
            codes += ["pyimfit"] if n_src <= a.pyimfit_max else []
            if a.codes:
                codes = [c for c in dict.fromkeys(codes + ["pyimfit"]) if c in a.codes.split(",")]
            for code in codes:
                out = os.path.join(tmp, f"{code}{n_src}.json")
                t_start = time.perf_counter()
                try:
                    proc = subprocess.run([sys.executable, __file__, "--worker", code, path, out], env=env,
                                          capture_output=True, text=True, timeout=a.timeout)
                except subprocess.TimeoutExpired:
                    cpu = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
                    print(f"| {n_src} | {7 * n_src + 1} | {code} | not finished after {a.timeout:.0f} s wall "
                          f"({time.perf_counter() - t_start:.0f} s) | | | CPU of all children so far {cpu:.0f} s |")
                    continue
                if proc.returncode:
                    print(f"| {n_src} | | {code} | failed: {proc.stderr.strip().splitlines()[-1:]} |")
                    continue
                with open(out) as f:
                    r = json.load(f)
                s = score(r, truth)
                keep = ("status", "n_iter", "time", "cpu", "rss", "chi2")
                row = {"n": n_src, "code": code, **{k: r[k] for k in keep},
                       **s, "n_fitted": r["n_fitted"], "load": os.getloadavg()[0]}
                rows.append(row)
                print(f"| {n_src} | {7 * n_src + 1} | {code} | {'converged' if r['status'] == 0 else r['status']} "
                      f"| {r['n_iter']} | {r['time']:.1f} | {r['cpu']:.1f} | {r['rss']:.0f} | {s['within3']:.0%} "
                      f"| {s['med_dmag']:.3f} | {s['med_dre']:.3f} | {r['chi2']:.1f} |", flush=True)
    print(f"# load {os.getloadavg()[0]:.2f} at the end")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
