"""Throughput of galprof's morphology against statmorph on the same stamps and CPU.

    python3 benchmarks/morphology_throughput.py [--n 512] [--threads 1] [--workers 1,2] [--statmorph-count N]

Stamps: benchmarks/morph_sims.py (GalSim Sersic galaxies, 128 x 128 px, integer ADU, photutils
segmentation maps, some companions, knots, cosmic rays and masked regions). galprof measures all of
them in one call (``measure_morphology``, batches of ``--batch-size``); statmorph
(``SourceMorphology`` with its defaults, which also runs its MID statistics and a Sersic fit) one
after the other on the first ``--statmorph-count`` stamps (default: all), then again restricted to
the statistics galprof computes (no MID statistics or Sersic fit; same values, checked). Both are timed in wall-clock
and process CPU seconds; the table also gives the largest difference between the two on the common
stamps for the main statistics. galprof runs once per entry of ``--workers`` (worker processes of
one torch thread each; CPU seconds include the workers'). CPU seconds compare the work done per
core; wall-clock throughput is what a user of the whole 2-core CPU gets (statmorph runs one stamp
after the other in one process). Needs galsim, photutils and statmorph.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from morph_sims import GAIN, make_stamps  # noqa: E402

KEYS = ["concentration", "asymmetry", "smoothness", "gini", "m20", "rpetro_circ", "rpetro_ellip", "rhalf_circ",
        "r20", "r80", "shape_asymmetry"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads for galprof")
    p.add_argument("--workers", default="1,2", help="comma-separated worker-process counts for galprof")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--asym-xtol", type=float, default=1e-6)
    p.add_argument("--statmorph-count", type=int, default=None, help="statmorph on the first N stamps only")
    p.add_argument("--no-like-for-like", action="store_true",
                   help="skip the second statmorph run restricted to galprof's statistics")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import statmorph

    from galprof.morphology import MorphologyOptions, measure_morphology

    t = time.time()
    stamps = make_stamps(args.n, seed=args.seed, sizes=(args.size,))
    print(f"{args.n} stamps of {args.size} x {args.size} px made in {time.time() - t:.0f} s")
    images = [s[0].astype(np.float64) for s in stamps]
    segmaps, labels, masks = [s[1] for s in stamps], [s[2] for s in stamps], [s[3] for s in stamps]
    opts = MorphologyOptions(asym_xtol=args.asym_xtol)
    dtype = getattr(torch, args.dtype)
    measure_morphology(images[:4], segmaps[:4], labels[:4], masks[:4], gain=GAIN, options=opts, dtype=dtype)  # warm-up

    load0 = os.getloadavg()[0]
    runs = []
    for workers in [int(w) for w in args.workers.split(",")]:
        w0, c0, k0 = time.perf_counter(), time.process_time(), _children_cpu()
        tab = measure_morphology(images, segmaps, labels, masks, gain=GAIN, options=opts, dtype=dtype,
                                 batch_size=args.batch_size, workers=workers)
        runs.append((workers, time.perf_counter() - w0, time.process_time() - c0 + _children_cpu() - k0))

    m = args.n if args.statmorph_count is None else min(args.n, args.statmorph_count)
    ref = {k: np.full(m, np.nan) for k in KEYS}
    w0, c0 = time.perf_counter(), time.process_time()
    for i in range(m):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sm = statmorph.SourceMorphology(images[i], segmaps[i].astype(np.int64), labels[i], mask=masks[i],
                                            gain=GAIN)
        for k in KEYS:
            ref[k][i] = np.nan if sm[k] == -99.0 else sm[k]
    sm_wall, sm_cpu = time.perf_counter() - w0, time.process_time() - c0
    like = None
    if not args.no_like_for_like:
        # statmorph restricted to the statistics galprof computes (no MID statistics, no Sersic
        # fit, no comparison of the Gini and MID segmentation maps): the same work on both sides
        import statmorph.statmorph as smod

        names, check = smod._quantity_names, smod.SourceMorphology._check_segmaps
        smod._quantity_names = [q for q in names if q not in ("multimode", "intensity", "deviation")
                                and not q.startswith("sersic_")]
        smod.SourceMorphology._check_segmaps = lambda self: None
        try:
            w0, c0 = time.perf_counter(), time.process_time()
            for i in range(m):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    sm = statmorph.SourceMorphology(images[i], segmaps[i].astype(np.int64), labels[i],
                                                    mask=masks[i], gain=GAIN)
                for k in KEYS:  # the same values as the full run's
                    v = np.nan if sm[k] == -99.0 else sm[k]
                    assert v == ref[k][i] or (np.isnan(v) and np.isnan(ref[k][i])), (i, k)
            like = (time.perf_counter() - w0, time.process_time() - c0)
        finally:
            smod._quantity_names, smod.SourceMorphology._check_segmaps = names, check
    load1 = os.getloadavg()[0]

    print(f"\nMachine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} with {args.threads} "
          f"thread(s), statmorph {statmorph.__version__}; load average {load0:.1f} -> {load1:.1f}")
    print(f"galprof: dtype {args.dtype}, batch {args.batch_size}, asym_xtol {args.asym_xtol:g}\n")
    print("| code | stamps | wall s | CPU s | stamps/s (wall) | stamps/s (CPU) |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| statmorph | {m} | {sm_wall:.1f} | {sm_cpu:.1f} | {m / sm_wall:.2f} | {m / sm_cpu:.2f} |")
    if like is not None:
        print(f"| statmorph, galprof's statistics only | {m} | {like[0]:.1f} | {like[1]:.1f} | {m / like[0]:.2f} | "
              f"{m / like[1]:.2f} |")
    for workers, gp_wall, gp_cpu in runs:
        print(f"| galprof, {workers} process{'es' if workers > 1 else ''} | {args.n} | {gp_wall:.1f} | {gp_cpu:.1f} | "
              f"{args.n / gp_wall:.2f} | {args.n / gp_cpu:.2f} |")
    for workers, gp_wall, gp_cpu in runs:
        print(f"\nthroughput ratio galprof ({workers} process{'es' if workers > 1 else ''}) / statmorph: "
              f"{(args.n / gp_wall) / (m / sm_wall):.1f} (wall), {(args.n / gp_cpu) / (m / sm_cpu):.1f} (CPU)")
        if like is not None:
            print(f"  ... / statmorph with galprof's statistics only: {(args.n / gp_wall) / (m / like[0]):.1f} (wall), "
                  f"{(args.n / gp_cpu) / (m / like[1]):.1f} (CPU)")
    print("\n| statistic | max abs difference | max rel difference |")
    print("| --- | --- | --- |")
    for k in KEYS:
        got = np.asarray(tab[k][:m], dtype=float)
        d = np.abs(got - ref[k])
        with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0 where both are exactly 0
            rel = np.nanmax(np.where(d == 0, 0.0, d / np.abs(ref[k])))
        print(f"| {k} | {np.nanmax(d):.2e} | {rel:.2e} |")
    return 0


def _children_cpu() -> float:
    """CPU seconds of this process's finished child processes (galprof's workers)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


if __name__ == "__main__":
    raise SystemExit(main())
