"""End-to-end survey benchmark: generate a catalogue of simulated galaxies, run `galprof fit` on it
in a child process, and report wall time, throughput, peak memory (maximum resident set of the
child, from /usr/bin/time -v, or getrusage of children where that is missing) and fit quality.

Galaxies: single Sérsic (re 1.5-6 px, n 0.6-4, q 0.3-1, any PA) rendered by galprof (float64)
with a 25 x 25 Moffat PSF (FWHM 3 px, beta 3, star-like image), on 48, 56 or 64 px stamps (the
catalogue sorted by stamp size, as a survey would), Gaussian noise of sigma 1 with S/N 50-300,
a sigma map per galaxy; starting values perturbed from the truth (centre +-1.5 px, mag +-0.4,
re x/ 1.4, n = 2, q = 0.7, PA +-20 deg).

    python benchmarks/pipeline_10k.py [--n 10000] [--work /tmp/galprof_10k] [--dtype float32]
        [--jacobian finite-difference] [--batch-size 64] [--generate-only] [--run-only] [--baseline N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MODEL = """\
zeropoint: 25.0
components:
  galaxy:
    profile: sersic
    x0: 32.5
    y0: 32.5
    mag: 18.0
    re: {value: 3.0, bounds: [0.3, 40]}
    n: {value: 2.0, bounds: [0.3, 8]}
    q: 0.7
    pa: 0.0
"""


def moffat_psf(n: int = 25, fwhm: float = 3.0, beta: float = 3.0) -> np.ndarray:
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    # integrate over each pixel (a star-like PSF includes the pixel response): 5 x 5 sub-samples
    k = 5
    off = (np.arange(k) + 0.5) / k - 0.5
    y, x = np.mgrid[0:n, 0:n] - n // 2
    img = np.zeros((n, n))
    for dy in off:
        for dx in off:
            img += (1 + ((x + dx) ** 2 + (y + dy) ** 2) / alpha**2) ** (-beta)
    return img / img.sum()


def generate(work: Path, n: int, seed: int = 11) -> None:
    import torch
    from astropy.io import fits
    from astropy.table import Table

    import galprof

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    stamps = work / "stamps"
    stamps.mkdir(parents=True, exist_ok=True)
    psf = moffat_psf()
    fits.writeto(work / "psf.fits", psf.astype(np.float32), overwrite=True)
    (work / "model.yaml").write_text(MODEL)
    model = galprof.load_model(MODEL)
    sizes = np.sort(rng.choice([48, 56, 64], n))
    rows = []
    chunk = 256
    for start in range(0, n, chunk):
        size_block = sizes[start:start + chunk]
        for size in np.unique(size_block):
            idx = start + np.nonzero(size_block == size)[0]
            m = len(idx)
            t = {"x0": size / 2 + 0.5 + rng.uniform(-1, 1, m), "y0": size / 2 + 0.5 + rng.uniform(-1, 1, m),
                 "re": np.exp(rng.uniform(np.log(1.5), np.log(6.0), m)), "n": rng.uniform(0.6, 4.0, m),
                 "q": rng.uniform(0.3, 1.0, m), "pa": rng.uniform(-90, 90, m), "c0": np.zeros(m)}
            snr = np.exp(rng.uniform(np.log(50), np.log(300), m))
            # S/N inside ~2 re for unit noise: flux ~ snr * sqrt(area)
            flux = snr * np.sqrt(4 * np.pi * (t["re"] ** 2 * t["q"] + 4.0))
            t["mag"] = -2.5 * np.log10(flux) + 25.0
            r = galprof.Renderer(model, [(int(size), int(size))] * m, psf)
            imgs = r({f"galaxy.{k}": torch.as_tensor(v) for k, v in t.items()}).numpy()
            for j, i in enumerate(idx):
                img = imgs[j, :size, :size] + rng.normal(0, 1.0, (size, size))
                gid = f"sim{i:06d}"
                fits.writeto(stamps / f"{gid}.fits", img.astype(np.float32), overwrite=True)
                fits.writeto(stamps / f"{gid}_sigma.fits", np.ones((size, size), np.float32), overwrite=True)
                rows.append({"id": gid, "image": f"stamps/{gid}.fits", "sigma": f"stamps/{gid}_sigma.fits",
                             "galaxy_x0": t["x0"][j] + rng.uniform(-1.5, 1.5),
                             "galaxy_y0": t["y0"][j] + rng.uniform(-1.5, 1.5),
                             "galaxy_mag": t["mag"][j] + rng.uniform(-0.4, 0.4),
                             "galaxy_re": t["re"][j] * 1.4 ** rng.choice([-1, 1]), "galaxy_n": 2.0,
                             "galaxy_q": 0.7, "galaxy_pa": t["pa"][j] + rng.uniform(-20, 20),
                             **{f"true_{k}": float(t[k][j]) for k in ("x0", "y0", "mag", "re", "n", "q", "pa")}})
    rows.sort(key=lambda r: r["id"])
    cat = Table(rows=rows)
    cat[[c for c in cat.colnames if not c.startswith("true_")]].write(work / "catalog.csv", overwrite=True)
    cat.write(work / "truth.fits", overwrite=True)
    print(f"generated {n} galaxies in {work} ({time.perf_counter() - t0:.0f} s)")


def run(work: Path, args) -> dict:
    out = work / "out"
    if out.exists() and not args.resume:
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "galprof.cli", "fit", str(work / "model.yaml"), "--catalog",
           str(work / "catalog.csv"), "--out", str(out), "--psf", str(work / "psf.fits"), "--dtype", args.dtype,
           "--jacobian", args.jacobian, "--batch-size", str(args.batch_size), "--read-threads", str(args.workers),
           "--no-progress"]
    timer = Path("/usr/bin/time")
    if timer.exists():
        cmd = [str(timer), "-v"] + cmd
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-4000:])
        raise SystemExit(f"galprof fit failed (exit {proc.returncode})")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_kb = int(m.group(1)) if m else usage.ru_maxrss
    cpu = usage.ru_utime + usage.ru_stime
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak_kb / 1024.0, "summary": summary,
            "load_average": os.getloadavg(), "log_tail": proc.stderr.splitlines()[-40:]}


def quality(work: Path) -> dict:
    from astropy.table import Table

    from galprof.io.tables import read_table

    res = read_table(work / "out" / "results.fits")
    truth = Table.read(work / "truth.fits")
    ok = np.asarray(res["status"]) == "converged"
    out = {"converged": float(ok.mean())}
    for k in ("x0", "y0", "mag", "re", "n", "q"):
        pull = np.asarray((res[f"galaxy_{k}"] - truth[f"true_{k}"]) / res[f"galaxy_{k}_err"])
        p = pull[ok & np.isfinite(pull)]  # (no error where the normal matrix is singular)
        med = np.median(p)
        out[k] = {"median_pull": float(med), "robust_std": float(1.4826 * np.median(np.abs(p - med)))}
    out["chi2_nu_median"] = float(np.median(np.asarray(res["chi2_nu"])[ok]))
    return out


def baseline(work: Path, n: int, args) -> float:
    """galprof.fit alone (no pipeline: stamps already in memory) on the first ``n`` galaxies, in the
    same batches: galaxies/s, for the pipeline's overhead."""
    import torch
    from astropy.io import fits
    from astropy.table import Table

    import galprof

    cat = Table.read(work / "catalog.csv")[:n]
    model = galprof.load_model(work / "model.yaml")
    psf = fits.getdata(work / "psf.fits").astype(float)
    keys = ("x0", "y0", "mag", "re", "n", "q", "pa")
    batches = []
    for start in range(0, n, args.batch_size):
        rows = cat[start:start + args.batch_size]
        batches.append(([fits.getdata(work / r["image"]).astype(float) for r in rows],
                        [fits.getdata(work / r["sigma"]).astype(float) for r in rows],
                        {f"galaxy.{k}": np.asarray(rows[f"galaxy_{k}"], float) for k in keys}))
    t0 = time.perf_counter()
    for images, sigmas, starts in batches:
        galprof.fit(model, images, sigmas, None, [psf] * len(images), initial=starts, jacobian=args.jacobian,
                    dtype=getattr(torch, args.dtype))
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--work", default="/tmp/galprof_10k")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--jacobian", default="finite-difference")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--run-only", action="store_true")
    ap.add_argument("--resume", action="store_true", help="keep a previous (interrupted) output folder")
    ap.add_argument("--baseline", type=int, default=0, metavar="N",
                    help="also time galprof.fit alone on the first N galaxies (stamps in memory)")
    args = ap.parse_args(argv)
    work = Path(args.work)
    if not args.run_only:
        generate(work, args.n)
    if args.generate_only:
        return 0
    r = run(work, args)
    q = quality(work)
    s = r["summary"]
    print(f"# galprof fit, {s['catalogue']} galaxies, {args.dtype}, {args.jacobian} Jacobian, batch {args.batch_size}, "
          f"{args.workers} reader threads, {os.cpu_count()} cores")
    n_run = s["this_run"]["galaxies"]
    print(f"this invocation: {n_run} galaxies fitted, wall {r['wall_s']:.0f} s (start-up and merge included): "
          f"{n_run / r['wall_s']:.2f} galaxies/s; CPU {r['cpu_s']:.0f} s: {n_run / r['cpu_s']:.2f} galaxies per CPU "
          f"second; peak RSS {r['peak_rss_mb']:.0f} MB; load average at the end {r['load_average'][1]:.1f} (5 min)")
    print(f"fitted {s['fitted']}, status {s['status']}, flags {s['flags']}")
    print(f"converged {q['converged']:.2%}; median chi2_nu {q['chi2_nu_median']:.3f}")
    for k in ("x0", "y0", "mag", "re", "n", "q"):
        print(f"  {k:>3}: median pull {q[k]['median_pull']:+.2f}, robust std {q[k]['robust_std']:.2f}")
    if args.baseline:
        r["baseline_galaxies_per_s"] = baseline(work, args.baseline, args)
        print(f"galprof.fit alone, first {args.baseline} galaxies in memory, same batches: "
              f"{r['baseline_galaxies_per_s']:.2f} galaxies/s")
    (work / "benchmark.json").write_text(json.dumps({"args": vars(args), **r, "quality": q}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
