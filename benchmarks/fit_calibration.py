"""Calibration of galprof's fits and errors on GalSim single-Sérsic galaxies (SDSS-like).

Simulations: benchmarks/galsim_sims.py (stamps 64-256 px sized to the galaxy, n 0.5-6,
re 1.5-15 px, star-like Moffat PSF image, sky + Poisson noise, perturbed starts). Prints,
per parameter, the median pull (bias in sigma) and the robust standard deviation of the pulls
(fit - truth) / sigma_cov, the convergence rate, and with ``--bootstrap N`` the median ratio of
bootstrap to covariance errors. The acceptance limits are printed beside the numbers.

    python benchmarks/fit_calibration.py [--n 200] [--bootstrap 0] [--psf-kind star] [--device cpu]
        [--sample SAMPLE.npz]

``--sample``: the simulated sample is read from that file when it exists, else simulated and
written there (float32 images and sigma maps), so that a machine without GalSim (a GPU machine)
can fit the same galaxies.
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


def save_sample(sample, path) -> None:
    """Write a simulated sample (float32 images and sigma maps) to an ``.npz`` file."""
    arrays = {"psf": sample.psf, "psf_kind": np.array(sample.psf_kind),
              "truth_keys": np.array(list(sample.truths[0])),
              "truths": np.array([[t[k] for k in sample.truths[0]] for t in sample.truths])}
    for i, (im, sg) in enumerate(zip(sample.images, sample.sigmas)):
        arrays[f"image_{i}"] = np.asarray(im, np.float32)
        arrays[f"sigma_{i}"] = np.asarray(sg, np.float32)
    for k, v in sample.starts.items():
        arrays[f"start_{k}"] = np.asarray(v)
    np.savez_compressed(path, **arrays)


def load_sample(path):
    """The sample written by :func:`save_sample`."""
    from galsim_sims import Sample

    d = np.load(path)
    keys = [str(k) for k in d["truth_keys"]]
    s = Sample(psf=d["psf"], psf_kind=str(d["psf_kind"]))
    s.truths = [dict(zip(keys, map(float, row))) for row in d["truths"]]
    n = len(s.truths)
    s.images = [d[f"image_{i}"].astype(np.float64) for i in range(n)]
    s.sigmas = [d[f"sigma_{i}"].astype(np.float64) for i in range(n)]
    s.starts = {k: list(d[f"start_{k}"]) for k in PARAMS}
    return s


def run(n: int = 200, *, seed: int = 1, n_bootstrap: int = 0, psf_kind: str = "star", sizes=(64, 128, 256),
        dtype=torch.float64, optimizer: str = "lm", verbose: bool = True, device="cpu",
        sample_path: str | None = None) -> dict:
    """Fit ``n`` simulated galaxies; return a dict of per-parameter statistics."""
    if sample_path and Path(sample_path).exists():
        sample = load_sample(sample_path)
        n = len(sample.truths)
    else:
        sample = simulate(n, seed=seed, sizes=sizes, psf_kind=psf_kind)
        if sample_path:
            save_sample(sample, sample_path)
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
                          initial={f"g.{k}": v for k, v in group.starts.items()}, dtype=dtype, device=device,
                          **kwargs)
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
                           "boot": boot, "truths": sample.truths}
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
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sample", metavar="NPZ", help="read the simulated sample from this file, or write it there")
    args = ap.parse_args(argv)
    s = run(args.n, seed=args.seed, n_bootstrap=args.bootstrap, psf_kind=args.psf_kind,
            dtype=getattr(torch, args.dtype), optimizer=args.optimizer, device=args.device, sample_path=args.sample)
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
                 **{f"boot_{k}": v for k, v in g["boot"].items()},
                 **{f"true_{k}": np.array([t[k] for t in g["truths"]]) for k in g["truths"][0]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
