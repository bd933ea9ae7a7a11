"""galprof on a CUDA GPU: the same answers as on the CPU, and how fast and how large it goes.

Sections (``--sections``, comma-separated; each runs on its own, a failure is reported and the
next one runs):

``consistency``
    The same inputs on the GPU and on the CPU of the same machine: renders of every built-in
    profile (batch of mixed stamp sizes and PSFs), Levenberg–Marquardt fits in float64 and
    float32, Adam, the Cash statistic, the autodiff Jacobian, bootstrap, a crowded-field fit,
    morphology and the neural initializer. Reports the largest difference in units of the
    parameter errors (or relative, for images).
``cli``
    The README's quick start (``galprof fit`` on the three bundled SDSS galaxies) with
    ``--device cuda`` and ``--device cpu``: the largest difference in units of the errors.
``throughput``
    ``--n`` SDSS-like galaxies (single Sérsic, 128 x 128 px, Moffat PSF FWHM 3.5 px as a 41 x 41
    star-like image, S/N ~ 100) rendered by galprof in float64 with Gaussian noise, fitted from
    starts perturbed from the truth (re x/ 1.5, n = 2, q = 0.7, PA +-20 deg, mag +-0.5, centre
    +-1.5 px): LM float32 in batches of ``--batch-size``, and LM float64 and Adam float32 on the
    first batch; the CPU of the same machine fits ``--cpu-n`` of them for comparison.
``field``
    The 512 x 512 GalSim field of ``benchmarks/field_crowded.py`` (``--field-npz``, made on a
    machine with GalSim by ``--make-field-npz N``), fitted on the GPU in float64 and float32 (and
    on the CPU with ``--field-cpu``).
``large``
    A ``--size`` x ``--size`` image of a nearby galaxy with 23 components (bulge, disk, bar,
    lens, nucleus, 17 companions and a tilted sky; 153 free parameters) rendered by galprof with
    Poisson-like noise, fitted in float32 from perturbed starts with the Jacobian budget
    ``--large-jacobian-gb``; reports time, iterations, peak GPU memory and the share of
    parameters within 3 sigma of the truth.

    python benchmarks/gpu_check.py [--sections consistency,cli,throughput,field,large] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))

from galsim_sims import PARAMS, robust_std  # noqa: E402
from galsim_sims import pulls as galsim_pulls  # noqa: E402
from pipeline_10k import moffat_psf as pipeline_moffat  # noqa: E402

import galprof  # noqa: E402

ROWS: list[dict] = []
JSON_PATH = None


def emit(section: str, name: str, **kw) -> None:
    row = {"section": section, "name": name, **kw}
    ROWS.append(row)
    print(json.dumps(row, default=float), flush=True)
    if JSON_PATH:
        with open(JSON_PATH, "w") as f:
            json.dump(ROWS, f, indent=1, default=float)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(device, fn):
    sync(device)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if torch.device(device).type == "cuda" else float("nan")
    return out, dt, peak


def mb(x: float):
    return None if not np.isfinite(x) else round(x)


def moffat_psf(n: int = 41, fwhm: float = 3.5, beta: float = 4.5) -> np.ndarray:
    """A star-like Moffat PSF image (that of ``pipeline_10k.py``), with this script's defaults."""
    return pipeline_moffat(n, fwhm, beta)


def max_pull_diff(a, b) -> float:
    """Largest |a - b| / error over galaxies and free parameters of two FitResults."""
    worst = 0.0
    for k in a.free:
        e = np.where(np.isfinite(a.errors[k]) & (a.errors[k] > 0), a.errors[k], np.nan)
        d = np.abs(a.values[k] - b.values[k]) / e
        if np.isfinite(d).any():
            worst = max(worst, float(np.nanmax(d)))
    return worst


# ------------------------------------------------------------------------------ simulations
SERSIC = {"zeropoint": 0.0, "components": {"g": {
    "profile": "sersic", "x0": 64.5, "y0": 64.5, "mag": -7.0, "re": {"value": 4.0, "bounds": [0.3, 60]},
    "n": {"value": 2.0, "bounds": [0.3, 8]}, "q": 0.7, "pa": 0.0}}}


def sersic_sample(n: int, size: int = 128, seed: int = 3, device="cpu"):
    """Truths, noisy images (numpy float32), sigma (per galaxy, scalar) and perturbed starts."""
    rng = np.random.default_rng(seed)
    c = (size + 1) / 2
    t = {"x0": c + rng.uniform(-0.5, 0.5, n), "y0": c + rng.uniform(-0.5, 0.5, n),
         "re": np.exp(rng.uniform(np.log(1.5), np.log(15), n)), "n": rng.uniform(0.5, 6.0, n),
         "q": rng.uniform(0.2, 1.0, n), "pa": rng.uniform(-90, 90, n)}
    flux = 10 ** rng.uniform(2.5, 3.5, n)
    t["mag"] = -2.5 * np.log10(flux)
    sky_sigma = flux / 100.0 / np.sqrt(4 * np.pi * (t["re"] ** 2 + 2.0))
    psf = moffat_psf()
    model = galprof.load_model(SERSIC)
    images = np.empty((n, size, size), np.float32)
    chunk = 1024
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        r = galprof.Renderer(model, [(size, size)] * (e - s), psf, dtype=torch.float64, device=device,
                             options=galprof.RenderOptions())
        vals = r.values()
        vals.update({f"g.{k}": torch.as_tensor(v[s:e], device=device) for k, v in t.items()})
        img = r(vals).cpu().numpy()
        images[s:e] = img + rng.normal(0, 1, img.shape) * sky_sigma[s:e, None, None]
    start = {"x0": t["x0"] + rng.uniform(-1.5, 1.5, n), "y0": t["y0"] + rng.uniform(-1.5, 1.5, n),
             "mag": t["mag"] + rng.uniform(-0.5, 0.5, n), "re": t["re"] * 1.5 ** rng.choice([-1, 1], n),
             "n": np.full(n, 2.0), "q": np.full(n, 0.7), "pa": t["pa"] + rng.uniform(-20, 20, n)}
    return t, images, sky_sigma, psf, {f"g.{k}": v for k, v in start.items()}


def pulls(res, truth, ok) -> dict:
    """Median and robust standard deviation of (fit - truth) / error per parameter (converged
    galaxies ``ok``; PA differences wrapped, as in ``galsim_sims.py``)."""
    truths = [dict(zip(truth, row)) for row in zip(*truth.values())]
    out = {}
    for k in PARAMS:
        p = galsim_pulls(res.values[f"g.{k}"], res.errors[f"g.{k}"], truths, k)[ok]
        p = p[np.isfinite(p)]
        out[k] = (round(float(np.median(p)), 3), round(robust_std(p), 3)) if p.size else (None, None)
    return out


# ------------------------------------------------------------------------------ sections
def section_consistency(dev, args) -> None:
    S = "consistency"
    from galprof.fitting import AdamOptions

    def check(name, fn):
        try:
            t0 = time.perf_counter()
            kw = fn()
            emit(S, name, ok=True, seconds=round(time.perf_counter() - t0, 2), **kw)
        except Exception as exc:  # report and go on
            emit(S, name, ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-1500:])

    every = {"zeropoint": 25.0, "components": {
        "s": {"profile": "sersic", "x0": 30.3, "y0": 28.8, "mag": 17, "re": 5.0, "n": 2.7, "q": 0.6, "pa": 30,
              "c0": 0.3},
        "e": {"profile": "expdisk", "x0": 30.3, "y0": 28.8, "mag": 17.5, "rs": 7.0, "q": 0.4, "pa": -20},
        "d": {"profile": "devauc", "x0": 20.1, "y0": 40.2, "mag": 19, "re": 3.0, "q": 0.8, "pa": 70},
        "f": {"profile": "ferrer", "x0": 30.3, "y0": 28.8, "mag": 18.5, "rout": 12.0, "alpha": 1.5, "beta": 0.3,
              "q": 0.3, "pa": 80},
        "k": {"profile": "king", "x0": 40.0, "y0": 22.0, "mag": 19.5, "rc": 1.5, "rt": 15.0, "alpha": 2.0, "q": 0.9,
              "pa": 0},
        "m": {"profile": "moffat", "x0": 12.0, "y0": 15.0, "mag": 20, "fwhm": 3.0, "beta": 3.0, "q": 1.0, "pa": 0},
        "g": {"profile": "gaussian", "x0": 45.0, "y0": 45.0, "mag": 20, "fwhm": 2.5, "q": 0.7, "pa": 10},
        "p": {"profile": "psf", "x0": 30.6, "y0": 29.1, "mag": 20},
        "sky": {"profile": "tiltedsky", "sky": 1.0, "dsdx": 0.01, "dsdy": -0.02}}}

    def render_all():
        model = galprof.load_model(every)
        shapes = [(60, 60), (64, 50), (48, 64), (61, 59)]
        psfs = [moffat_psf(25, 3.0, 3.0), moffat_psf(31, 4.0, 2.5), moffat_psf(21, 2.5, 4.5), moffat_psf(24, 3.5, 3.0)]
        out = {}
        for kind in ("star", "optical"):
            imgs = [galprof.Renderer(model, shapes, psfs, psf_kind=kind, device=d)().cpu().numpy()
                    for d in ("cpu", dev)]
            out[kind] = float(np.abs(imgs[0] - imgs[1]).max() / np.abs(imgs[0]).max())
        return {"max_rel_diff": out}

    check("render every profile (float64)", render_all)

    t, images, sky_sigma, psf, start = sersic_sample(24, size=96, seed=5)
    sig = [np.full(im.shape, s, np.float32) for im, s in zip(images, sky_sigma)]
    model = galprof.load_model(SERSIC)

    def lm(dtype):
        def go():
            r = [galprof.fit(model, list(images), sig, psf=psf, initial=start, dtype=dtype, device=d)
                 for d in ("cpu", dev)]
            return {"max_diff_sigma": max_pull_diff(*r), "same_status": bool((r[0].status == r[1].status).all()),
                    "n_iter_cpu_gpu": [float(np.median(r[0].n_iter)), float(np.median(r[1].n_iter))],
                    "converged_cpu_gpu": [float(np.mean(r[0].status == 0)), float(np.mean(r[1].status == 0))]}
        return go

    check("LM float64", lm(torch.float64))
    check("LM float32", lm(torch.float32))

    def adam():
        opts = AdamOptions(max_iter=300)
        r = [galprof.fit(model, list(images[:8]), sig[:8], psf=psf, initial={k: v[:8] for k, v in start.items()},
                         optimizer="adam", options=opts, dtype=torch.float32, device=d) for d in ("cpu", dev)]
        return {"max_diff_sigma": max_pull_diff(*r)}

    check("Adam float32", adam)

    def autodiff():
        r = [galprof.fit(model, list(images[:6]), sig[:6], psf=psf, initial={k: v[:6] for k, v in start.items()},
                         jacobian=j, device=dev) for j in ("finite-difference", "autodiff")]
        return {"max_diff_sigma_fd_vs_autodiff": max_pull_diff(*r)}

    check("autodiff Jacobian on the GPU", autodiff)

    def cash():
        sky = 20.0
        counts = [np.random.default_rng(i).poisson(np.clip(im / s * 3 + sky, 0, None)).astype(float)
                  for i, (im, s) in enumerate(zip(images[:6], sky_sigma[:6]))]
        m = galprof.load_model({"zeropoint": 0.0, "components": {**SERSIC["components"],
                                                                  "sky": {"profile": "sky", "sky": sky}}})
        ini = {k: v[:6] for k, v in start.items()}
        ini["g.mag"] = ini["g.mag"] - 2.5 * np.log10(3 / sky_sigma[:6])
        r = [galprof.fit(m, counts, None, psf=psf, initial=ini, statistic="cash", device=d) for d in ("cpu", dev)]
        return {"max_diff_sigma": max_pull_diff(*r)}

    check("Cash statistic", cash)

    def bootstrap():
        r = galprof.fit(model, list(images[:4]), sig[:4], psf=psf, initial={k: v[:4] for k, v in start.items()},
                        uncertainty="bootstrap", n_bootstrap=32, seed=1, device=dev)
        c = galprof.fit(model, list(images[:4]), sig[:4], psf=psf, initial={k: v[:4] for k, v in start.items()},
                        device=dev)
        ratio = {k: float(np.median(r.errors[k] / c.errors[k])) for k in ("g.re", "g.n", "g.mag")}
        return {"boot_over_cov_median": ratio, "max_value_diff_sigma": max_pull_diff(c, r)}

    check("bootstrap on the GPU", bootstrap)

    small = args.field_npz.replace("100", "10")  # made by --make-field-npz 10 --field-npz .gpu/field10.npz
    if os.path.exists(small):
        def field():
            from galprof.field import fit_field

            d = dict(np.load(small))
            src = {f"g.{p}": d[f"start_{p}"] for p in ("x0", "y0", "mag", "re", "n", "q", "pa")}
            src["sky.sky"] = 101.0
            fm = galprof.load_model(FIELD_TEMPLATE)
            r = [fit_field(fm, d["data"], d["sigma"], psf=d["psf"], sources=src, device=dv).result
                 for dv in ("cpu", dev)]
            return {"max_diff_sigma": max_pull_diff(*r), "n_iter_cpu_gpu": [int(r[0].n_iter[0]), int(r[1].n_iter[0])]}

        check("field fit (10 sources)", field)

    def morphology():
        from galprof.morphology import measure_morphology

        imgs = [im / s for im, s in zip(images[:12], sky_sigma[:12])]
        seg = [np.ones(im.shape, int) for im in imgs]
        tabs = [measure_morphology(imgs, seg, [1] * 12, device=d) for d in ("cpu", dev)]
        cols = ("concentration", "asymmetry", "smoothness", "gini", "m20", "rpetro_circ")
        return {"max_abs_diff": {c: float(np.nanmax(np.abs(np.asarray(tabs[0][c], float)
                                                          - np.asarray(tabs[1][c], float)))) for c in cols}}

    check("morphology", morphology)

    def nn():
        from galprof.nn.infer import Predictor

        imgs, sg = list(images), sig
        out = [Predictor(device=d).predict(imgs, sg, psf_fwhm_px=[3.5] * len(imgs)) for d in ("cpu", dev)]
        return {"max_abs_diff": {k: float(np.nanmax(np.abs(out[0][k] - out[1][k]))) for k in ("re", "n", "q")}}

    check("neural initializer", nn)


def section_throughput(dev, args) -> None:
    S = "throughput"
    n = args.n
    (t, images, sky_sigma, psf, start), dt, _ = timed(dev, lambda: sersic_sample(n, seed=3, device=dev))
    emit(S, "simulate", n=n, seconds=round(dt, 1))
    model = galprof.load_model(SERSIC)
    truth = t

    def run(name, idx, device, dtype, optimizer="lm", batch=None):
        batch = batch or len(idx)
        vals, errs, st, it = {}, {}, [], []
        parts = []

        def go():
            for s in range(0, len(idx), batch):
                j = idx[s:s + batch]
                sig = [np.full(images[i].shape, sky_sigma[i], np.float32) for i in j]
                parts.append(galprof.fit(model, [images[i] for i in j], sig, psf=psf,
                                         initial={k: v[j] for k, v in start.items()}, optimizer=optimizer,
                                         dtype=dtype, device=device))
        _, dt, peak = timed(device, go)
        for k in parts[0].values:
            vals[k] = np.concatenate([p.values[k] for p in parts])
            errs[k] = np.concatenate([p.errors[k] for p in parts])
        st = np.concatenate([p.status for p in parts])
        it = np.concatenate([p.n_iter for p in parts])

        class R:
            values, errors = vals, errs
        tr = {k: v[idx] for k, v in truth.items()}
        emit(S, name, galaxies=len(idx), batch=batch, seconds=round(dt, 2), galaxies_per_s=round(len(idx) / dt, 1),
             peak_gpu_mb=mb(peak), converged=float(np.mean(st == 0)), median_iter=float(np.median(it)),
             pulls_median_robuststd=pulls(R, tr, st == 0))

    idx = np.arange(n)
    first = idx[:args.batch_size]
    # warm-up (CUDA context, cuFFT plans)
    run("warm-up LM float32 (64 galaxies)", idx[:64], dev, torch.float32)
    run("LM float32", idx, dev, torch.float32, batch=args.batch_size)
    run("LM float64", first, dev, torch.float64)
    run("Adam float32", first, dev, torch.float32, optimizer="adam")
    if args.cpu_n:
        run(f"LM float32 on this machine's CPU ({torch.get_num_threads()} threads)", idx[:args.cpu_n], "cpu",
            torch.float32)


def section_cli(dev, args) -> None:
    """The README's quick start (three SDSS galaxies, Sérsic + sky) with --device cuda and cpu."""
    import subprocess
    import tempfile

    from astropy.table import Table

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for device in (dev, "cpu"):
            cmd = [sys.executable, "-m", "galprof.cli", "fit", "examples/sersic.yaml", "--catalog",
                   "examples/sdss/catalog.csv", "--out", f"{tmp}/{device}", "--pixel-scale", "0.396",
                   "--device", device, "--no-progress"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                emit("cli", f"galprof fit --device {device}", ok=False, error=proc.stderr[-1500:])
                return
            out[device] = (Table.read(f"{tmp}/{device}/results.csv"), time.perf_counter() - t0)
    a, b = out[dev][0], out["cpu"][0]
    worst = 0.0
    for c in a.colnames:
        if c.endswith("_err") and c[:-4] in a.colnames:
            d = np.abs(np.asarray(a[c[:-4]], float) - np.asarray(b[c[:-4]], float)) / np.asarray(b[c], float)
            worst = max(worst, float(np.nanmax(d)))
    emit("cli", "README quick start, cuda vs cpu", ok=True, max_diff_sigma=worst,
         chi2_nu=[list(np.round(np.asarray(t["chi2_nu"], float), 4)) for t in (a, b)],
         status=[list(a["status"]), list(b["status"])], seconds=[round(out[dev][1], 1), round(out["cpu"][1], 1)])


FIELD_TEMPLATE = {"zeropoint": 30.0, "components": {
    "g": {"profile": "sersic", "x0": 0, "y0": 0, "mag": 20, "re": {"value": 3, "bounds": [0.3, 100]},
          "n": {"value": 2, "bounds": [0.3, 8]}, "q": 0.7, "pa": 0},
    "sky": {"profile": "sky", "sky": 0}}}


def section_field(dev, args) -> None:
    from field_crowded import score

    from galprof.field import fit_field

    d = dict(np.load(args.field_npz))
    truth = d["truth"]
    fm = galprof.load_model(FIELD_TEMPLATE)
    src = {f"g.{p}": d[f"start_{p}"] for p in ("x0", "y0", "mag", "re", "n", "q", "pa")}
    src["sky.sky"] = 101.0
    for device in [dev] + (["cpu"] if args.field_cpu else []):
        for dtype in ((torch.float64, torch.float32) if device != "cpu" else (torch.float64,)):
            res, dt, peak = timed(device, lambda dtype=dtype, device=device: fit_field(
                fm, d["data"], d["sigma"], psf=d["psf"], sources=src, dtype=dtype, device=device))
            r = res.result
            sc = score({"values": {k: r.values[f"g.{k}"] for k in ("x0", "y0", "mag", "re", "n", "q", "pa")},
                        "errors": {k: r.errors[f"g.{k}"] for k in ("x0", "y0", "mag", "re", "n", "q", "pa")}}, truth)
            emit("field", f"{len(truth)} sources on {device} {str(dtype)[6:]}", seconds=round(dt, 2),
                 peak_gpu_mb=mb(peak), n_iter=int(r.n_iter[0]), status=int(r.status[0]), chi2=float(r.chi2[0]),
                 passes=res.passes, **sc)


def large_model(size: int, rng):
    c = (size + 1) / 2
    comps = {
        "bulge": {"profile": "sersic", "x0": c + 3.3, "y0": c - 2.6, "mag": 14.5, "re": 50.0, "n": 3.5, "q": 0.85,
                  "pa": 30.0, "c0": 0.05},
        "disk": {"profile": "expdisk", "x0": c + 3.0, "y0": c - 2.4, "mag": 12.5, "rs": 240.0, "q": 0.6, "pa": 35.0,
                 "c0": -0.05},
        "bar": {"profile": "ferrer", "x0": c + 3.4, "y0": c - 2.5, "mag": 14.0, "rout": 300.0, "alpha": 2.0,
                "beta": 0.5, "q": 0.25, "pa": 80.0, "c0": 0.4},
        "lens": {"profile": "sersic", "x0": c + 3.2, "y0": c - 2.7, "mag": 14.2, "re": 150.0, "n": 0.4, "q": 0.8,
                 "pa": 60.0, "c0": 0.0},
        "nucleus": {"profile": "psf", "x0": c + 3.3, "y0": c - 2.6, "mag": 16.5},
        "sky": {"profile": "tiltedsky", "sky": 100.0, "dsdx": 0.002, "dsdy": -0.001},
    }
    for i in range(17):
        a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.45) * size
        comps[f"c{i:02d}"] = {"profile": "sersic", "x0": c + d * np.cos(a), "y0": c + d * np.sin(a),
                              "mag": rng.uniform(15.5, 18.0), "re": float(np.exp(rng.uniform(np.log(4), np.log(30)))),
                              "n": rng.uniform(0.7, 4.0), "q": rng.uniform(0.3, 1.0), "pa": rng.uniform(-90, 90)}
    for name, p in comps.items():
        if name == "sky":
            continue
        for k in ("re", "rs", "rout", "n", "q", "alpha", "beta", "c0"):
            if k in p:
                lo = {"re": 0.5, "rs": 1.0, "rout": 5.0, "n": 0.3, "q": 0.1, "alpha": 0.1, "beta": 0.0, "c0": -0.9}[k]
                hi = {"re": 2000.0, "rs": 3000.0, "rout": 3000.0, "n": 8.0, "q": 1.0, "alpha": 8.0, "beta": 1.9,
                      "c0": 1.9}[k]
                p[k] = {"value": float(p[k]), "bounds": [lo, hi]}
    return {"zeropoint": 30.0, "components": comps}


def section_large(dev, args) -> None:
    from galprof.fitting import LMOptions

    size = args.size
    rng = np.random.default_rng(7)
    spec = large_model(size, rng)
    model = galprof.load_model(spec)
    psf = moffat_psf(41, 4.0, 3.0)

    def simulate():
        r = galprof.Renderer(model, [(size, size)], psf, dtype=torch.float64, device=dev)
        return r()[0].cpu().numpy()

    expect, dt, peak = timed(dev, simulate)
    g = np.random.default_rng(8)
    sigma = np.sqrt(np.clip(expect, 1, None)).astype(np.float32)
    data = (expect + g.normal(0, 1, expect.shape) * sigma).astype(np.float32)
    emit("large", "simulate", size=size, seconds=round(dt, 1), peak_gpu_mb=mb(peak))
    truth = model.layout(1).values()
    start = {}
    for key, v in truth.items():
        comp, p = key.split(".")
        x = float(v[0])
        if p in ("x0", "y0"):
            x += g.uniform(-1.5, 1.5)
        elif p == "mag":
            x += g.uniform(-0.3, 0.3)
        elif p in ("re", "rs", "rout"):
            x *= 1.2 ** g.choice([-1, 1])
        elif p == "n":
            x = 2.0 if comp.startswith("c") else x * 1.2
        elif p == "q":
            x = min(0.95, x * 1.15)
        elif p == "pa":
            x += g.uniform(-10, 10)
        elif p == "sky":
            x += 1.0
        start[key] = [x]
    free = len(model.layout(1).free)
    from galprof.fitting.problem import FitProblem

    original = FitProblem.normal_equations
    t_start = [time.perf_counter()]
    calls = [0]

    def traced(self, *a, **kw):  # progress, in case the run is cut short
        out = original(self, *a, **kw)
        calls[0] += 1
        sync(dev)
        print(f"  large: normal equations #{calls[0]} done at {time.perf_counter() - t_start[0]:.1f} s", flush=True)
        return out

    FitProblem.normal_equations = traced
    for dtype in (torch.float32,):
        t_start[0] = time.perf_counter()
        res, dt, peak = timed(dev, lambda dtype=dtype: galprof.fit(
            model, [data], [sigma], psf=psf, initial=start, dtype=dtype, device=dev,
            options=LMOptions(max_iter=args.large_max_iter),
            max_jacobian_bytes=int(args.large_jacobian_gb * 2 ** 30)))
        within, worst = [], 0.0
        for k in res.free:
            e = res.errors[k][0]
            z = abs(res.values[k][0] - float(truth[k][0])) / e if e > 0 else float("nan")
            within.append(z < 3)
            worst = max(worst, z) if np.isfinite(z) else worst
        emit("large", f"{size}x{size}, {len(model.components)} components, {free} free, {str(dtype)[6:]}",
             seconds=round(dt, 1), peak_gpu_mb=mb(peak), n_iter=int(res.n_iter[0]), status=int(res.status[0]),
             chi2_nu=float(res.chi2[0] / res.dof[0]), within3=float(np.mean(within)), worst_sigma=round(worst, 2),
             jacobian_budget_gb=args.large_jacobian_gb, normal_equation_calls=calls[0])
    FitProblem.normal_equations = original


def make_field_npz(n_src: int, path: str) -> None:
    from field_crowded import simulate

    data, sigma, psf, truth, starts = simulate(n_src, seed=1)
    np.savez_compressed(path, data=data.astype(np.int32), sigma=sigma.astype(np.float32), psf=psf, truth=truth,
                        **{f"start_{k}": v for k, v in starts.items()})
    print(f"wrote {path} ({os.path.getsize(path) / 2 ** 20:.1f} MB)")


def main(argv=None) -> int:
    global JSON_PATH
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="consistency,cli,throughput,field,large")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=8192, help="galaxies in the throughput section")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--cpu-n", type=int, default=256, help="galaxies fitted on the CPU for comparison (0: none)")
    ap.add_argument("--field-npz", default=".gpu/field100.npz")
    ap.add_argument("--field-cpu", action="store_true", help="fit the field on the CPU too")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--large-jacobian-gb", type=float, default=24.0)
    ap.add_argument("--large-max-iter", type=int, default=60)
    ap.add_argument("--make-field-npz", type=int, help="write --field-npz with this many sources and stop")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.make_field_npz:
        make_field_npz(args.make_field_npz, args.field_npz)
        return 0
    JSON_PATH = args.json
    dev = args.device
    info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.device(dev).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    emit("machine", "info", **info)
    for s in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            globals()[f"section_{s}"](dev, args)
        except Exception as exc:
            emit(s, "section failed", ok=False, error=f"{type(exc).__name__}: {exc}",
                 trace=traceback.format_exc()[-2000:])
        emit(s, "section time", seconds=round(time.perf_counter() - t0, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
