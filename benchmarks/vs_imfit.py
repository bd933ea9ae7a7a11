"""galprof against pyimfit on the golden galaxies of tests/test_vs_imfit.py: agreement and timing.

Loads tests/data/imfit_golden/imfit_golden.npz, fits every set with galprof (optical PSF, the same
starts) and, if pyimfit is installed, re-fits it with pyimfit to time both on this machine. Prints
per set: chi2 differences (galprof - IMFIT), the fraction of galaxies whose eight parameters all
agree within 0.2 of galprof's error, and the wall times.

    python benchmarks/vs_imfit.py [--jacobian finite-difference] [--sets right,bound,all]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import galprof

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("x0", "y0", "mag", "re", "n", "q", "pa", "sky")


def key(k: str) -> str:
    return "s.sky" if k == "sky" else f"g.{k}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--golden", default=str(ROOT / "tests/data/imfit_golden/imfit_golden.npz"))
    ap.add_argument("--jacobian", default="finite-difference", choices=["autodiff", "finite-difference"])
    ap.add_argument("--sets", default="right,bound,all")
    ap.add_argument("--imfit-threads", type=int, default=0)
    args = ap.parse_args(argv)
    with np.load(args.golden) as f:
        g = {k: f[k] for k in f.files}
    model = galprof.load_model({"zeropoint": 0.0, "components": {
        "g": {"profile": "sersic", "x0": 32.5, "y0": 32.5, "mag": -8.0, "re": 4.0, "n": 2.0, "q": 0.7, "pa": 0.0},
        "s": {"profile": "sky", "sky": 0.0}}})
    try:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import make_imfit_golden as mig
        import pyimfit  # noqa: F401
    except ImportError:
        mig = None
    print(f"# galprof vs pyimfit, {args.jacobian} Jacobian, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for name in args.sets.split(","):
        index = np.nonzero(g["set"] == name)[0]
        if not len(index):
            continue
        t0 = time.perf_counter()
        res = galprof.fit(model, [g["images"][i].astype(np.float64) for i in index],
                          [g["sigmas"][i].astype(np.float64) for i in index],
                          psf=[g["psfs"][i].astype(np.float64) for i in index], psf_kind="optical",
                          initial={key(k): g[f"start_{k}"][index] for k in KEYS}, jacobian=args.jacobian)
        t_gp = time.perf_counter() - t0
        dchi = res.chi2 - g["imfit_chi2"][index]
        pulls = []
        for k in KEYS:
            d = res.values[key(k)] - g[f"imfit_{k}"][index]
            if k == "pa":
                d = (d + 90.0) % 180.0 - 90.0
            pulls.append(np.abs(d / res.errors[key(k)]))
        pulls = np.array(pulls)
        agree = np.all(pulls <= 0.2, axis=0)
        line = (f"[{name}] {len(index)} galaxies: chi2 galprof - IMFIT median {np.median(dchi):+.4f}, "
                f"min {dchi.min():+.3f}, max {dchi.max():+.3f}, > +0.1 for {int((dchi > 0.1).sum())}; "
                f"all parameters within 0.2 sigma: {agree.mean():.1%}; max |diff|/sigma per parameter "
                + " ".join(f"{k} {pulls[j].max():.2f}" for j, k in enumerate(KEYS))
                + f"; galprof {t_gp:.1f} s ({len(index) / t_gp:.2f} galaxies/s), iterations median "
                f"{np.median(res.n_iter):.0f} max {res.n_iter.max()}")
        if mig is not None:
            t_im = 0.0
            for i in index:
                start = {k: g[f"start_{k}"][i] for k in KEYS}
                t_im += mig.fit_imfit(g["images"][i], g["sigmas"][i], g["psfs"][i], start, args.imfit_threads)["time"]
            line += (f"; pyimfit {t_im:.1f} s ({len(index) / t_im:.2f} galaxies/s; "
                     f"{g['imfit_time'][index].sum():.1f} s when the golden file was made)")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
