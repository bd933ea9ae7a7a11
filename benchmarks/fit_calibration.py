"""Calibration of galprof's fits and errors on GalSim single-Sérsic galaxies (SDSS-like).

Simulations: benchmarks/galsim_sims.py (stamps 64-256 px sized to the galaxy, n 0.5-6,
re 1.5-15 px, star-like Moffat PSF image, sky + Poisson noise, perturbed starts). Prints,
per parameter, the median pull (bias in sigma) and the robust standard deviation of the pulls
(fit - truth) / sigma_cov, the convergence rate, and with ``--bootstrap N`` the median ratio of
bootstrap to covariance errors. The acceptance limits are printed beside the numbers.

    python benchmarks/fit_calibration.py [--n 200] [--bootstrap 0] [--psf-kind star]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from galsim_sims import PARAMS, pulls, robust_std, sersic_model, simulate  # noqa: E402

import galprof  # noqa: E402


def run(n: int = 200, *, seed: int = 1, n_bootstrap: int = 0, psf_kind: str = "star", sizes=(64, 128, 256),
        dtype=torch.float64, optimizer: str = "lm", verbose: bool = True) -> dict:
    """Fit ``n`` simulated galaxies; return a dict of per-parameter statistics."""
    sample = simulate(n, seed=seed, sizes=sizes, psf_kind=psf_kind)
    values = {k: np.zeros(n) for k in PARAMS}
    errors = {k: np.zeros(n) for k in PARAMS}
    boot = {k: np.full(n, np.nan) for k in PARAMS}
    status = np.zeros(n, dtype=int)
    n_iter = np.zeros(n, dtype=int)
    t0 = time.perf_counter()
    index = np.arange(n)
    sizes_of = np.array([im.shape[0] for im in sample.images])
    for size, group in sample.by_size().items():
        sel = index[sizes_of == size]
        kwargs = {} if optimizer == "lm" else {"optimizer": optimizer}
        if n_bootstrap:
            kwargs.update(uncertainty="bootstrap", n_bootstrap=n_bootstrap, seed=seed)
        res = galprof.fit(sersic_model(size), group.images, group.sigmas, psf=group.psf, psf_kind=psf_kind,
                          initial={f"g.{k}": v for k, v in group.starts.items()}, dtype=dtype, **kwargs)
        for k in PARAMS:
            values[k][sel] = res.values[f"g.{k}"]
            if n_bootstrap:
                errors[k][sel] = res.errors_covariance[f"g.{k}"]
                boot[k][sel] = res.errors[f"g.{k}"]
            else:
                errors[k][sel] = res.errors[f"g.{k}"]
        status[sel] = res.status
        n_iter[sel] = res.n_iter
        if verbose:
            print(f"  {len(sel):4d} galaxies of {size}x{size} px: {time.perf_counter() - t0:.0f} s", flush=True)
    elapsed = time.perf_counter() - t0
    ok = status == 0
    stats = {"n": n, "converged": float(ok.mean()), "time": elapsed, "median_iter": float(np.median(n_iter)),
             "params": {}}
    stats["per_galaxy"] = {"status": status, "n_iter": n_iter, "values": values, "errors": errors,
                           "truths": sample.truths}
    for k in PARAMS:
        p = pulls(values[k], errors[k], sample.truths, k)[ok]
        finite = np.isfinite(p)  # no error where the normal matrix is singular (flag SINGULAR)
        row = {"bias": float(np.median(p[finite])), "pull_std": robust_std(p), "no_error": int((~finite).sum())}
        if n_bootstrap:
            row["boot_over_cov"] = float(np.nanmedian(boot[k][ok] / errors[k][ok]))
        stats["params"][k] = row
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples (0: none)")
    ap.add_argument("--psf-kind", default="star", choices=["star", "optical"])
    ap.add_argument("--optimizer", default="lm")
    ap.add_argument("--dtype", default="float64")
    ap.add_argument("--save", metavar="NPZ", help="write each galaxy's truth, fit, error and status")
    args = ap.parse_args(argv)
    s = run(args.n, seed=args.seed, n_bootstrap=args.bootstrap, psf_kind=args.psf_kind,
            dtype=getattr(torch, args.dtype), optimizer=args.optimizer)
    print(f"# {s['n']} galaxies, {args.psf_kind} PSF, {args.optimizer}, {args.dtype}, "
          f"{torch.get_num_threads()} threads: {s['time']:.0f} s, converged {s['converged']:.1%} (>= 99%), "
          f"median iterations {s['median_iter']:.0f}")
    head = "| param | median pull (|.| < 0.1) | robust std of pulls (0.85-1.15) |"
    if args.bootstrap:
        head += " bootstrap / covariance (0.75-1.25) |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for k, r in s["params"].items():
        line = f"| {k} | {r['bias']:+.3f} | {r['pull_std']:.3f} |"
        if args.bootstrap:
            line += f" {r['boot_over_cov']:.3f} |"
        print(line)
    print("no error (singular normal matrix): " + ", ".join(f"{k} {r['no_error']}" for k, r in s["params"].items()))
    if args.save:
        g = s["per_galaxy"]
        np.savez(args.save, status=g["status"], n_iter=g["n_iter"],
                 **{f"fit_{k}": v for k, v in g["values"].items()}, **{f"err_{k}": v for k, v in g["errors"].items()},
                 **{f"true_{k}": np.array([t[k] for t in g["truths"]]) for k in g["truths"][0]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
