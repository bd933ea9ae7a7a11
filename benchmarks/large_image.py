"""A large image: a 2048 x 2048 bulge + disk + bar galaxy, galprof against pyimfit.

GalSim draws the galaxy (pixel response included): a Sérsic bulge, an exponential disk and a
Ferrer bar ``(1 - (r / r_out)^2)^alpha`` (GalSim has no Ferrer profile: the bar is evaluated on a
4x finer grid and handed to GalSim as an InterpolatedImage with its analytic total flux), all
convolved with a Moffat PSF (star-like PSF image, 41 x 41, GalSim's drawing of the same
Moffat); sky 100 counts per pixel, Poisson noise (gain 1), the true sigma map.

Both codes fit the same model from the same starts (the truth moved by 5-20%): IMFIT's
configuration (one function block: Sersic, Exponential, FerrersBar2D, FlatSky; shared centre)
is written once and read by galprof (``galprof.io.imfit.read_imfit_config``), so the two models
are the same. galprof: ``galprof.fit`` on the one image (float64 and float32). pyimfit: IMFIT's
Levenberg–Marquardt, one thread. Each fit runs in a child process of its own so that its peak
memory (max RSS) is its own.

    python benchmarks/large_image.py [--size 2048] [--codes galprof-f64,galprof-f32,pyimfit]
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

ZP = 30.0
SKY = 100.0
# truth (galprof's conventions; centres relative to the image centre)
TRUTH = {"x0": 3.3, "y0": -2.6,
         "bulge": {"mag": 14.5, "re": 25.0, "n": 3.5, "q": 0.85, "pa": 30.0},
         "disk": {"mag": 12.5, "rs": 120.0, "q": 0.6, "pa": 35.0},
         "bar": {"mag": 14.0, "rout": 150.0, "alpha": 2.0, "q": 0.25, "pa": 80.0}}
STARTS = {"x0": 1.5, "y0": -1.0,
          "bulge": {"mag": 14.8, "re": 20.0, "n": 2.5, "q": 0.8, "pa": 20.0},
          "disk": {"mag": 12.3, "rs": 100.0, "q": 0.65, "pa": 30.0},
          "bar": {"mag": 14.3, "rout": 130.0, "alpha": 2.5, "q": 0.3, "pa": 75.0}}


def ferrer_flux_factor(rout, alpha, q):
    """Integral of (1 - (r/rout)^2)^alpha over the ellipse of axis ratio q (beta = 0)."""
    return math.pi * q * rout ** 2 / (alpha + 1.0)


def simulate(size: int, seed: int = 1):
    import galsim

    rng = np.random.default_rng(seed)
    c = (size + 1) / 2.0
    psf_g = galsim.Moffat(beta=3.0, fwhm=4.0)
    psf = psf_g.drawImage(nx=41, ny=41, scale=1.0).array
    t = TRUTH
    dx, dy = t["x0"], t["y0"]
    b, d, r = t["bulge"], t["disk"], t["bar"]
    bulge = galsim.Sersic(n=b["n"], half_light_radius=b["re"] * math.sqrt(b["q"]), flux=10 ** (-0.4 * (b["mag"] - ZP)))
    bulge = bulge.shear(q=b["q"], beta=(b["pa"] + 90) * galsim.degrees)
    disk = galsim.Exponential(scale_radius=d["rs"] * math.sqrt(d["q"]), flux=10 ** (-0.4 * (d["mag"] - ZP)))
    disk = disk.shear(q=d["q"], beta=(d["pa"] + 90) * galsim.degrees)
    # the bar on a 4x finer grid, centred on the profile's centre
    k = 4
    half = int(r["rout"]) + 4
    g = (np.arange(2 * half * k) + 0.5) / k - half
    X, Y = np.meshgrid(g, g)
    s, co = math.sin(math.radians(r["pa"])), math.cos(math.radians(r["pa"]))
    u = -s * X + co * Y
    v = (-co * X - s * Y) / r["q"]
    rr = np.hypot(u, v) / r["rout"]
    bar_img = np.where(rr < 1, np.clip(1 - rr ** 2, 0, None) ** r["alpha"], 0.0)
    bar = galsim.InterpolatedImage(galsim.ImageD(bar_img, scale=1.0 / k), flux=10 ** (-0.4 * (r["mag"] - ZP)))
    gal = galsim.Add([bulge, disk, bar]).shift(dx, dy)
    big = galsim.GSParams(maximum_fft_size=16384)
    img = galsim.Convolve(gal, psf_g, gsparams=big).drawImage(nx=size, ny=size, scale=1.0)
    expect = img.array + SKY
    data = rng.poisson(np.clip(expect, 0, None)).astype(np.float64)
    truth = {"x0": c + dx, "y0": c + dy}
    return data, np.sqrt(expect), psf, truth


def imfit_config(x0, y0, p, sky) -> str:
    b, d, r = p["bulge"], p["disk"], p["bar"]
    ie = 10 ** (-0.4 * (b["mag"] - ZP)) / sersic_flux(b["n"], b["re"], b["q"])
    i0d = 10 ** (-0.4 * (d["mag"] - ZP)) / (2 * math.pi * d["rs"] ** 2 * d["q"])
    i0b = 10 ** (-0.4 * (r["mag"] - ZP)) / ferrer_flux_factor(r["rout"], r["alpha"], r["q"])
    return "\n".join([
        f"X0 {x0} {x0 - 20},{x0 + 20}", f"Y0 {y0} {y0 - 20},{y0 + 20}",
        "FUNCTION Sersic # LABEL bulge", f"PA {b['pa']}", f"ell {1 - b['q']} 0,0.95", f"n {b['n']} 0.5,8",
        f"I_e {ie} 0,1e9", f"r_e {b['re']} 1,500",
        "FUNCTION Exponential # LABEL disk", f"PA {d['pa']}", f"ell {1 - d['q']} 0,0.95", f"I_0 {i0d} 0,1e9",
        f"h {d['rs']} 5,1000",
        "FUNCTION FerrersBar2D # LABEL bar", f"PA {r['pa']}", f"ell {1 - r['q']} 0,0.95", "c0 0 fixed",
        f"n {r['alpha']} 0.1,8", f"I_0 {i0b} 0,1e9", f"a_bar {r['rout']} 10,1000",
        "FUNCTION FlatSky # LABEL sky", f"I_sky {sky}", ""])


def sersic_flux(n, re, q):
    from scipy.special import gamma, gammaincinv

    b = gammaincinv(2 * n, 0.5)
    return 2 * math.pi * q * re ** 2 * n * math.exp(b) * gamma(2 * n) / b ** (2 * n)


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def flat(values: dict) -> dict:
    keys = ["bulge.x0", "bulge.y0"] + [f"{c}.{p}" for c in ("bulge", "disk", "bar") for p in TRUTH[c]]
    return {k: float(values[k]) for k in keys if k in values}


def run_galprof(d, dtype_name) -> dict:
    import torch

    import galprof
    from galprof.io.imfit import read_imfit_config

    torch.set_num_threads(1)
    cfg = read_imfit_config(str(d["config"]), zeropoint=ZP)
    t0, c0 = time.perf_counter(), time.process_time()
    res = galprof.fit(cfg.model, [d["data"]], [d["sigma"]], psf=d["psf"], dtype=getattr(torch, dtype_name))
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"values": flat({k: v[0] for k, v in res.values.items()}),
            "errors": flat({k: v[0] for k, v in res.errors.items()}), "chi2": float(res.chi2[0]),
            "status": int(res.status[0]), "n_iter": int(res.n_iter[0]), "time": dt, "cpu": cpu, "rss": max_rss_mb(),
            "free": len(res.free)}


def run_pyimfit(d, tmp) -> dict:
    import pyimfit

    from galprof.io.imfit import read_imfit_config

    path = os.path.join(tmp, "config_start.txt")
    with open(path, "w") as f:
        f.write(str(d["config"]))
    desc = pyimfit.ModelDescription.load(path)
    t0, c0 = time.perf_counter(), time.process_time()
    fitter = pyimfit.Imfit(desc, psf=d["psf"], maxThreads=1)
    res = fitter.fit(d["data"], error=d["sigma"], solver="LM")
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = os.path.join(tmp, "config_fit.txt")
    fitter.saveCurrentModelToFile(out)
    model = read_imfit_config(out, zeropoint=ZP).model
    fitted = model.layout(1).values()
    # the saved file has no labels: components in file order are bulge, disk, bar, sky
    names = dict(zip([c.name for c in model.components], ["bulge", "disk", "bar", "sky"]))
    values = {f"{names[k.split('.')[0]]}.{k.split('.')[1]}": float(v[0]) for k, v in fitted.items()}
    return {"values": flat(values), "errors": {}, "chi2": float(res.fitStat),
            "status": 0 if res.fitConverged else 1, "n_iter": int(res.nIter), "time": dt, "cpu": cpu,
            "rss": max_rss_mb()}


def worker(argv) -> int:
    code, path, out = argv
    d = dict(np.load(path, allow_pickle=False))
    d["config"] = str(d["config"])
    with tempfile.TemporaryDirectory() as tmp:
        r = run_pyimfit(d, tmp) if code == "pyimfit" else run_galprof(d, code.split("-")[1].replace("f", "float"))
    with open(out, "w") as f:
        json.dump(r, f)
    return 0


def truth_values(truth_xy) -> dict:
    v = {"bulge.x0": truth_xy["x0"], "bulge.y0": truth_xy["y0"]}
    for comp in ("bulge", "disk", "bar"):
        for p, x in TRUTH[comp].items():
            v[f"{comp}.{p}"] = x
    return v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--codes", default="galprof-f64,galprof-f32,pyimfit")
    ap.add_argument("--json")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    data, sigma, psf, truth_xy = simulate(a.size)
    print(f"# {a.size} x {a.size} image simulated by GalSim in {time.perf_counter() - t0:.0f} s; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    c = (a.size + 1) / 2.0
    config = imfit_config(c + STARTS["x0"], c + STARTS["y0"], STARTS, SKY + 1.0)
    truth = truth_values(truth_xy)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.npz")
        np.savez(path, data=data, sigma=sigma, psf=psf, config=np.array(config))
        for code in a.codes.split(","):
            out = os.path.join(tmp, f"{code}.json")
            proc = subprocess.run([sys.executable, __file__, "--worker", code, path, out], env=env,
                                  capture_output=True, text=True)
            if proc.returncode:
                print(f"{code} failed:\n{proc.stderr[-3000:]}")
                continue
            with open(out) as f:
                r = json.load(f)
            r["code"] = code
            rows.append(r)
            print(f"{code}: status {r['status']}, {r['n_iter']} iterations, wall {r['time']:.1f} s, "
                  f"CPU {r['cpu']:.1f} s, peak RSS {r['rss']:.0f} MB, chi2 {r['chi2']:.1f}", flush=True)
    print()
    print("| parameter | truth | " + " | ".join(r["code"] for r in rows) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in rows) + " |")
    for k, tv in truth.items():
        cells = []
        for r in rows:
            v, e = r["values"].get(k, math.nan), r["errors"].get(k, math.nan)
            pull = (v - tv) / e if e and math.isfinite(e) and e > 0 else math.nan
            cells.append(f"{v:.4g} ± {e:.2g} ({pull:+.1f}σ)" if math.isfinite(e) else f"{v:.4g}")
        print(f"| {k} | {tv:.4g} | " + " | ".join(cells) + " |")
    print("| time (wall s / CPU s) | | " + " | ".join(f"{r['time']:.0f} / {r['cpu']:.0f}" for r in rows) + " |")
    print("| peak RSS MB | | " + " | ".join(f"{r['rss']:.0f}" for r in rows) + " |")
    print("| chi2 | | " + " | ".join(f"{r['chi2']:.1f}" for r in rows) + " |")
    print(f"# load {os.getloadavg()[0]:.2f} at the end")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
