"""Fitting speed and accuracy of galprof against GALMOSS and pyimfit, in one run on the same data.

The galaxies, PSF and starts are those of benchmarks/fit_throughput.py (imported from it): GalSim
single-Sérsic galaxies on 128 x 128 px stamps (n 0.5-6, r_e 1.5-15 px, q 0.2-1), a star-like
Moffat PSF (FWHM 3.5 px, 41 x 41, pixel response included), Gaussian noise for S/N ~ 100, starts
perturbed from the truth (r_e x/ 1.5, n = 2, q = 0.7, PA +- 20 deg, mag +- 0.5, centre +- 1.5 px).
Model: one Sérsic convolved with that PSF, zeropoint 0, no sky. Fitters:

* ``galprof-lm-f64``, ``galprof-lm-f32``: :func:`galprof.fit`, default options (LM, covariance errors
  included in the time), float64 / float32;
* ``galprof-adam``: :func:`galprof.fit` with ``optimizer="adam"`` (default :class:`AdamOptions`), float64;
* ``galmoss``: GALMOSS (the pip package) as its README sets it up (``pa`` an angle, ``ser_n`` fitted
  in log, ``mag`` with M0 = zeropoint; everything else, DiffGrad, step 0.015, early stop, float32,
  its defaults), on the CPU, batches of up to 32, ``iteration=1000`` as in its README, images read
  from FITS files as it requires. Only its ``fit()`` is timed, not its ``uncertainty()``.
  Conventions, checked on a noiseless rendering: GALMOSS's pixel centres are at 0.5, 1.5, ... so
  ``cen = x0 - 0.5`` (both axes; its y grid runs downwards but its centre is measured upwards),
  its PA is GALFIT's (counter-clockwise from +y), ``axis_r`` = q and ``eff_r`` = r_e (semi-major);
  a fit that ends with ``axis_r`` > 1 is turned into the same ellipse with q = 1 / axis_r,
  r_e x axis_r, PA + 90. "Converged": the galaxy met GALMOSS's own early-stopping criterion.
* ``pyimfit``: IMFIT's Levenberg–Marquardt through pyimfit, one galaxy at a time (``maxThreads`` =
  ``--threads``, 1 by default, although its process then still uses about 1.4 CPUs on 2 cores;
  the time includes setting up each fit), the PSF image given as is, Sersic with the
  starts converted to IMFIT's parameters by benchmarks/make_imfit_golden.py (ell = 1 - q, I_e
  from mag; same centres and PA) and the same limits as there (ell <= 0.98, n in [0.25, 10]).

Each fitter runs in its own fresh subprocess with OMP_NUM_THREADS=MKL_NUM_THREADS=``--threads``
(default 1; run the script under ``taskset -c 1`` to hold every fitter to one core); its peak
memory is that process's maximum resident set size (VmHWM; ``+`` the increase over the
process's high-water mark just before fitting, after imports and loading the data). Times are wall
and CPU seconds of the fitting alone (the CPU time is the fairer number on a loaded machine).

Accuracy, the same for every fitter: per parameter, the median over galaxies of
``|fit - truth| / sigma``, where sigma is galprof's covariance error *at the true parameters*
(the same yardstick for all, whatever each fitter returns as its own errors); and
``dchi2 = chi2(fit) - chi2(truth)``, both evaluated with galprof's renderer (float64): a fitter
that reaches the optimum of a model close to GalSim's gets dchi2 ~ -7 (seven free parameters);
a positive dchi2 means its solution fits the data worse than the truth does.

    python benchmarks/fit_vs_peers.py [--n 32] [--galmoss-n 8] [--fitters galprof-lm-f64,pyimfit,...]
                                      [--json out.json]; --report out.json re-prints the tables

GALMOSS 2.2 imports pandas, tqdm and torch-optimizer without declaring them; install
torch-optimizer and pytorch-ranger with ``pip install --no-deps`` so that pip leaves the pinned
torch alone. A fitter whose package is missing is reported as failed and the others still run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

KEYS = ("x0", "y0", "mag", "re", "n", "q", "pa")
FITTERS = ("galprof-lm-f64", "galprof-lm-f32", "galprof-adam", "galmoss", "pyimfit")
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
MODEL = {"zeropoint": 0.0, "components": {"g": {
    "profile": "sersic", "x0": 64.5, "y0": 64.5, "mag": -7.0, "re": 4.0, "n": 2.0, "q": 0.7, "pa": 0.0}}}


def max_rss_mb() -> float:
    """This process's peak resident set size (MB). On Linux, VmHWM of /proc/self/status: getrusage's
    ru_maxrss would carry the parent's peak across fork and exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def wrap_pa(d):
    """Position-angle differences wrapped to [-90, 90) degrees."""
    return (np.asarray(d) + 90.0) % 180.0 - 90.0


# ---------------------------------------------------------------------------- workers
def run_galprof(data, optimizer: str, dtype_name: str) -> dict:
    import torch

    import galprof

    model = galprof.load_model(MODEL)
    images, sigmas, psf = list(data["images"]), list(data["sigmas"]), data["psf"]
    initial = {f"g.{k}": data[f"start_{k}"] for k in KEYS}
    rss0 = max_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    res = galprof.fit(model, images, sigmas, psf=psf, initial=initial, optimizer=optimizer,
                      dtype=getattr(torch, dtype_name))
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"values": {k: res.values[f"g.{k}"] for k in KEYS}, "converged": res.status == 0, "time": dt,
            "cpu": cpu, "rss0": rss0, "threads": torch.get_num_threads(), "dtype": dtype_name,
            "note": f"median iterations {np.median(res.n_iter):.0f}"}


def run_pyimfit(data) -> dict:
    import pyimfit
    from make_imfit_golden import imfit_description, to_galprof

    psf = np.asarray(data["psf"], dtype=np.float64)
    B = len(data["images"])
    values = {k: np.full(B, np.nan) for k in KEYS}
    converged = np.zeros(B, dtype=bool)
    n_iter = []
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    rss0 = max_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(B):
        start = {k: float(data[f"start_{k}"][i]) for k in KEYS}
        desc = imfit_description({**start, "sky": 0.0})
        fs = desc["function_sets"][0]
        fs["function_list"] = [f for f in fs["function_list"] if f["name"] != "FlatSky"]  # no sky in this model
        fitter = pyimfit.Imfit(desc, psf=psf, maxThreads=threads)
        res = fitter.fit(np.asarray(data["images"][i], dtype=np.float64),
                         error=np.asarray(data["sigmas"][i], dtype=np.float64), solver="LM")
        v = to_galprof([*np.asarray(res.params, dtype=np.float64), 0.0])
        for k in KEYS:
            values[k][i] = v[k]
        converged[i] = bool(res.fitConverged)
        n_iter.append(int(res.nIter))
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"values": values, "converged": converged, "time": dt, "cpu": cpu, "rss0": rss0, "threads": threads,
            "dtype": "float64", "note": f"median iterations {np.median(n_iter):.0f}"}


def run_galmoss(data, n: int, batch: int, iteration: int, workdir: str) -> dict:
    import galmoss as gm
    import torch
    from astropy.io import fits

    stamps = Path(workdir)
    stamps.mkdir(parents=True, exist_ok=True)
    psf_path = str(stamps / "psf.fits")
    fits.writeto(psf_path, np.asarray(data["psf"], dtype=np.float64), overwrite=True)
    names, image_paths, sigma_paths = [], [], []
    for i in range(n):
        names.append(f"g{i:04d}")
        image_paths.append(str(stamps / f"g{i:04d}_image.fits"))
        sigma_paths.append(str(stamps / f"g{i:04d}_sigma.fits"))
        fits.writeto(image_paths[-1], np.asarray(data["images"][i], dtype=np.float64), overwrite=True)
        fits.writeto(sigma_paths[-1], np.asarray(data["sigmas"][i], dtype=np.float64), overwrite=True)
    s = {k: np.asarray(data[f"start_{k}"][:n], dtype=np.float64) for k in KEYS}
    # GALMOSS's pixel centres are at 0.5, 1.5, ...: its centre is galprof's minus half a pixel
    sersic = gm.lp.Sersic(cen_x=gm.p(s["x0"] - 0.5), cen_y=gm.p(s["y0"] - 0.5), pa=gm.p(s["pa"], angle=True),
                          axis_r=gm.p(s["q"]), eff_r=gm.p(s["re"]), ser_n=gm.p(s["n"], log=True),
                          mag=gm.p(s["mag"], M0=0.0))
    dataset = gm.DataSet(names, image_path=image_paths, sigma_path=sigma_paths, psf_path=[psf_path] * n,
                         device="cpu")
    dataset.define_profiles(sersic=sersic)

    stopped = []

    class Recorded(gm.Fitting):
        """GALMOSS's Fitting, recording which galaxies met its early-stopping criterion."""

        def detect_update(self, fitting_metrics, chi_mu, iter):
            update, metrics = super().detect_update(fitting_metrics, chi_mu, iter)
            self._stopped = (metrics[0] >= self.early_stop).clone()
            return update, metrics

        def fitting_metrics_append(self, batched_eff_iter, batched_best_chi_mu):
            stopped.append(self._stopped.numpy())
            super().fitting_metrics_append(batched_eff_iter, batched_best_chi_mu)

    fitting = Recorded(dataset=dataset, batch_size=min(batch, n), iteration=iteration)
    rss0 = max_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    fitting.fit()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    get = lambda p: p.total_best_value.detach().cpu().numpy().reshape(-1).astype(np.float64)
    x0, y0 = get(sersic.cen_x) + 0.5, get(sersic.cen_y) + 0.5
    q, re, pa = get(sersic.axis_r), get(sersic.eff_r), get(sersic.pa)
    # axis_r > 1: the same ellipse with the axes swapped
    swap = q > 1
    re = np.where(swap, re * q, re)
    pa = np.where(swap, wrap_pa(pa + 90.0), pa)
    q = np.where(swap, 1.0 / q, q)
    values = {"x0": x0, "y0": y0, "mag": get(sersic.mag), "re": re, "n": get(sersic.ser_n), "q": q, "pa": pa}
    bad = ~(q > 0) | ~(re > 0) | ~np.all([np.isfinite(v) for v in values.values()], axis=0)
    raw = {k: v.tolist() for k, v in values.items()}
    values = {k: np.where(bad, np.nan, v) for k, v in values.items()}
    eff_iter = fitting.total_eff_iter.detach().cpu().numpy()
    return {"values": values, "converged": np.concatenate(stopped) & ~bad, "time": dt, "cpu": cpu, "rss0": rss0,
            "threads": torch.get_num_threads(), "dtype": "float32",
            "note": f"batch {min(batch, n)}, iteration cap {iteration}, median iteration of the best chi2 "
                    f"{np.median(eff_iter):.0f}, axis_r > 1 for {int(swap.sum())}, non-finite or q, r_e <= 0 for "
                    f"{int(bad.sum())}", "raw": raw}


def worker(args) -> int:
    with np.load(args.data) as f:
        data = {k: f[k] for k in f.files}
    name = args.worker
    if name != "galmoss":
        data = {k: v[:args.n] if k != "psf" else v for k, v in data.items()}
    if name.startswith("galprof-"):
        out = run_galprof(data, "adam" if name == "galprof-adam" else "lm",
                          "float32" if name.endswith("f32") else "float64")
    elif name == "pyimfit":
        out = run_pyimfit(data)
    elif name == "galmoss":
        n = min(args.galmoss_n, len(data["images"]))
        out = run_galmoss({k: v[:n] if k != "psf" else v for k, v in data.items()}, n, args.galmoss_batch,
                          args.galmoss_iterations, str(Path(args.result).parent / "galmoss_stamps"))
    else:
        raise ValueError(f"unknown fitter {name!r}; choose from {FITTERS}")
    out.pop("raw", None)
    out["peak_rss"] = max_rss_mb()
    out["n"] = len(out["converged"])
    values = out.pop("values")
    np.savez(args.result, converged=out.pop("converged"), **{f"v_{k}": values[k] for k in KEYS})
    Path(args.result).with_suffix(".json").write_text(json.dumps(out))
    return 0


# ---------------------------------------------------------------------------- parent
def peer_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("galprof", "torch", "galmoss", "pyimfit", "galsim", "numpy"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out


def git_state() -> str:
    """The commit of galprof's source tree, and whether src/galprof differs from it."""
    root = HERE.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src/galprof"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}" + (" with uncommitted changes in src/galprof" if dirty else "")


def chi2_with_galprof(model, data, values: dict, index: np.ndarray) -> np.ndarray:
    """chi2 of galprof's float64 rendering at ``values`` for galaxies ``index`` (NaN where a value
    is non-finite or outside the profile's validity domain)."""
    import torch

    from galprof.render import Renderer

    images = data["images"][index]
    renderer = Renderer(model, [im.shape for im in images], data["psf"], psf_kind="star", dtype=torch.float64)
    ok = np.ones(len(index), dtype=bool)
    vals = {}
    comp = model.components[0]
    for spec in comp.profile.params:
        key = f"{comp.name}.{spec.name}"
        if spec.name not in values:
            continue
        v = np.asarray(values[spec.name], dtype=np.float64)
        lo, hi = spec.domain
        good = np.isfinite(v)
        if lo is not None:
            good &= v >= lo
        if hi is not None:
            good &= v <= hi
        ok &= good
        vals[key] = v
    safe = renderer.values()  # the model's own values for parameters not fitted (c0)
    safe.update({k: torch.as_tensor(np.where(ok, v, data[f"truth_{k.split('.')[1]}"][index]))
                 for k, v in vals.items()})
    with torch.no_grad():
        m = renderer(safe).numpy()
    chi2 = np.sum(((images - m) / data["sigmas"][index]) ** 2, axis=(1, 2))
    return np.where(ok, chi2, np.nan)


def table(rows, subset=None) -> str:
    """The markdown table of ``rows`` (accuracy over the first ``subset`` galaxies of each, or all)."""
    head = ("| fitter | dtype | threads | galaxies | wall s | CPU s | galaxies/s (wall) | galaxies/s (CPU) "
            "| peak RSS MB (+ fitting) | converged | median dchi2 | " + " | ".join(KEYS) + " |")
    lines = [head, "|" + "---|" * (11 + len(KEYS))]
    m = slice(None) if subset is None else slice(0, subset)
    for r in rows:
        # a galaxy left with non-finite or invalid values counts as +inf (not skipped) in the medians
        dchi2 = np.where(np.isnan(r["dchi2"][m]), np.inf, r["dchi2"][m])
        lines.append(
            f"| {r['fitter']} | {r['dtype']} | {r['threads']} | {len(dchi2)} | {r['time']:.1f} | {r['cpu']:.1f} "
            f"| {r['n'] / r['time']:.3g} | {r['n'] / r['cpu']:.3g} "
            f"| {r['peak_rss']:.0f} (+{r['peak_rss'] - r['rss0']:.0f}) "
            f"| {np.mean(r['converged'][m]):.0%} | {np.median(dchi2):+.1f} | "
            + " | ".join(f"{np.median(r['absdev'][k][m]):.2f}" for k in KEYS) + " |")
    return "\n".join(lines)


def report(rows) -> None:
    """Print the tables and the speed ratios against the targets."""
    print("\nLast columns: median over galaxies of |fit - truth| / sigma, sigma = galprof's covariance error at "
          "the truth; dchi2 = chi2(fit) - chi2(truth), both with galprof's renderer (a galaxy whose fit is "
          "non-finite or invalid counts as +inf).")
    print(table(rows))
    sub = min((r["n"] for r in rows), default=0)
    if any(r["n"] != sub for r in rows):
        print(f"\nAccuracy on the {sub} galaxies that every fitter fitted (the first {sub}; speed columns as above):")
        print(table(rows, subset=sub))
    by = {r["fitter"]: r for r in rows}
    for clock in ("time", "cpu"):
        def rate(f, clock=clock):
            return by[f]["n"] / by[f][clock]

        for lm in ("galprof-lm-f64", "galprof-lm-f32"):
            if lm not in by:
                continue
            parts = [f"{lm}: {rate(lm):.3g} galaxies/{'s' if clock == 'time' else 'CPU s'}"]
            for peer, target in (("pyimfit", 10), ("galmoss", 100)):
                if peer in by:
                    ratio = rate(lm) / rate(peer)
                    verdict = "met" if ratio >= target else "NOT met"
                    parts.append(f"{ratio:.3g}x {peer} (target >= {target}x: {verdict})")
            print("; ".join(parts))


def load_rows(path) -> list[dict]:
    """Rows saved by ``--json``, with their arrays back as NumPy arrays."""
    rows = json.loads(Path(path).read_text())["rows"]
    for r in rows:
        for k in ("converged", "dchi2"):
            r[k] = np.asarray(r[k], dtype=bool if k == "converged" else float)
        r["absdev"] = {k: np.asarray(v, dtype=float) for k, v in r["absdev"].items()}
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, help="galaxies for galprof and pyimfit")
    ap.add_argument("--galmoss-n", type=int, default=8, help="galaxies for GALMOSS (the first ones of the set)")
    ap.add_argument("--galmoss-batch", type=int, default=32)
    ap.add_argument("--galmoss-iterations", type=int, default=1000, help="GALMOSS's iteration cap (its README: 1000)")
    ap.add_argument("--fitters", default=",".join(FITTERS))
    ap.add_argument("--threads", type=int, default=1,
                    help="threads per fitter (torch's, pyimfit's maxThreads, BLAS); default 1")
    ap.add_argument("--json", help="also write the results as JSON to this path")
    ap.add_argument("--report", metavar="JSON", help="only print the tables of results saved with --json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.report:
        report(load_rows(args.report))
        return 0
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        THREAD_ENV[k] = str(args.threads)
    for k, v in THREAD_ENV.items():
        os.environ[k] = v
    from fit_throughput import perturbed_starts, simulate

    import galprof
    from galprof.fitting.lm import LMOptions

    fitters = [f for f in args.fitters.split(",") if f]
    for f in fitters:
        if f not in FITTERS:
            ap.error(f"unknown fitter {f!r}; choose from {', '.join(FITTERS)}")
    n = max(args.n, args.galmoss_n if "galmoss" in fitters else 0)
    t0 = time.perf_counter()
    truths, images, sigmas, psf, rng = simulate(n)
    starts = perturbed_starts(truths, rng)
    data = {"images": np.stack(images), "sigmas": np.stack(sigmas), "psf": psf}
    for k in KEYS:
        data[f"truth_{k}"] = np.array([-2.5 * math.log10(t["flux"]) if k == "mag" else t[k] for t in truths])
        data[f"start_{k}"] = np.asarray(starts[k], dtype=np.float64)
    t_sim = time.perf_counter() - t0

    # the yardstick: galprof's covariance errors at the true parameters (no iteration)
    model = galprof.load_model(MODEL)
    at_truth = galprof.fit(model, list(data["images"]), list(data["sigmas"]), psf=psf,
                           initial={f"g.{k}": data[f"truth_{k}"] for k in KEYS}, options=LMOptions(max_iter=0))
    sigma = {k: at_truth.errors[f"g.{k}"] for k in KEYS}
    all_index = np.arange(n)
    chi2_truth = chi2_with_galprof(model, data, {k: data[f"truth_{k}"] for k in KEYS}, all_index)

    load = os.getloadavg()
    print(f"# fit_vs_peers: {n} GalSim single-Sérsic galaxies, 128x128 px, star-like Moffat PSF, S/N ~ 100 "
          f"(simulated in {t_sim:.0f} s); machine {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the start")
    print("# versions: " + ", ".join(f"{k} {v}" for k, v in peer_versions().items())
          + f"; galprof source {git_state()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fit_vs_peers_") as tmp:
        path = Path(tmp) / "data.npz"
        np.savez(path, **data)
        for name in fitters:
            out = Path(tmp) / f"{name}.npz"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--data", str(path),
                   "--result", str(out), "--n", str(args.n), "--galmoss-n", str(args.galmoss_n),
                   "--galmoss-batch", str(args.galmoss_batch), "--galmoss-iterations", str(args.galmoss_iterations)]
            env = {**os.environ, **THREAD_ENV}
            w0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"[{name}] failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
                continue
            info = json.loads(out.with_suffix(".json").read_text())
            with np.load(out) as f:
                values = {k: f[f"v_{k}"] for k in KEYS}
                converged = f["converged"]
            index = np.arange(info["n"])
            absdev = {}
            for k in KEYS:
                d = values[k] - data[f"truth_{k}"][index]
                if k == "pa":
                    d = wrap_pa(d)
                absdev[k] = np.where(np.isfinite(d), np.abs(d) / sigma[k][index], np.inf)
            dchi2 = chi2_with_galprof(model, data, values, index) - chi2_truth[index]
            row = {"fitter": name, **info, "wall_process": time.perf_counter() - w0, "converged": converged,
                   "absdev": absdev, "dchi2": dchi2, "load_after": os.getloadavg()[0]}
            rows.append(row)
            print(f"[{name}] {info['n']} galaxies in {info['time']:.1f} s; {info['note']}; load average after "
                  f"{row['load_after']:.2f}", flush=True)

    report(rows)
    if args.json:
        js = [{k: (v.tolist() if isinstance(v, np.ndarray) else
                   {kk: vv.tolist() for kk, vv in v.items()} if isinstance(v, dict) else v)
               for k, v in r.items()} for r in rows]
        Path(args.json).write_text(json.dumps({"rows": js, "versions": peer_versions(), "load_start": load,
                                               "sigma_at_truth": {k: v.tolist() for k, v in sigma.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
