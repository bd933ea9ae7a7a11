"""galprof vs pyimfit on IMFIT's IC 3478 example: every configuration, without and with the PSF.

galprof runs each configuration the way ``galprof fit CONFIG --image ... --mask ... --gain 4.725
--readnoise 4.3 --sky 130.14 [--psf psf_moffat_51.fits]`` does (from the configuration's own starting
values, IMFIT's noise recipe, the PSF as an optical kernel like IMFIT), converts its best fit to
IMFIT's parameters (``galprof.io.imfit.imfit_parameters``: ell = 1 - q, I_e / I_0 from the total
magnitude, errors by the delta method) and prints, per parameter, pyimfit's value and error (the
golden file tests/data/ic3478_golden.json), galprof's, the difference in units of pyimfit's error,
and the ratio of the errors; then chi^2 of both. ``--star`` also fits the PSF fits with
``psf_kind="star"`` (the PSF image as a star-like image, its pixel response divided out) and prints
how far that moves each parameter, in the same units.

    python benchmarks/ic3478_vs_pyimfit.py [--only sersic] [--star] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "ic3478"
GOLDEN = ROOT / "tests" / "data" / "ic3478_golden.json"


def run(key: str, golden: dict, psf_kind: str = "optical", dtype=torch.float64):
    from galprof import GalprofWarning
    from galprof.io.imfit import imfit_parameters
    from galprof.single import fit_single, from_imfit

    g = golden["fits"][key]
    noise = golden["noise"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GalprofWarning)  # the configurations' I_e / I_0 limits
        job = from_imfit(DATA / g["config"], str(DATA / "ic3478rss_256.fits"),
                         mask=str(DATA / "ic3478rss_256_mask.fits"),
                         psf=str(DATA / g["psf"]) if g["psf"] else None, gain=noise["gain"],
                         readnoise=noise["read_noise"], sky=noise["original_sky"], psf_kind=psf_kind)
    t0 = time.perf_counter()
    fr = fit_single(job, dtype=dtype)
    dt = time.perf_counter() - t0
    res = fr.result
    pars = imfit_parameters(job.imfit, fr.values, res.covariance[0], res.keys)
    return {"parameters": {k: {"value": v, "error": e} for k, (v, e) in pars.items()},
            "chi2": float(res.chi2[0]), "dof": int(res.dof[0]), "n_iter": int(res.n_iter[0]),
            "status": int(res.status[0]), "flags": int(res.flags[0]), "message": res.messages[0], "seconds": dt}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="substring of the configurations to run")
    ap.add_argument("--star", action="store_true", help="also fit the PSF fits with psf_kind='star'")
    ap.add_argument("--json", help="write the numbers to this file")
    args = ap.parse_args(argv)
    golden = json.loads(GOLDEN.read_text())
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    out = {"machine": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "fits": {}}
    for key, g in golden["fits"].items():
        if args.only and args.only not in key:
            continue
        kinds = ["optical"] + (["star"] if args.star and g["psf"] else [])
        for kind in kinds:
            r = run(key, golden, kind)
            out["fits"][f"{key}|{kind}"] = r
            print(f"\n== {g['config']}  PSF: {g['psf'] or 'none'}  psf_kind={kind}  "
                  f"({r['seconds']:.0f} s, {r['n_iter']} iterations, status {r['status']}, flags {r['flags']})")
            print(f"{'param':8s} {'pyimfit':>12s} {'+/-':>9s} {'galprof':>12s} {'+/-':>9s} {'diff/sigma':>10s} "
                  f"{'err ratio':>9s}")
            for name, p in g["parameters"].items():
                q = r["parameters"][name]
                diff = (q["value"] - p["value"]) / p["error"] if p["error"] > 0 else float("nan")
                ratio = q["error"] / p["error"] if p["error"] > 0 else float("nan")
                print(f"{name:8s} {p['value']:12.5f} {p['error']:9.5f} {q['value']:12.5f} {q['error']:9.5f} "
                      f"{diff:10.3f} {ratio:9.3f}")
            print(f"chi2: pyimfit {g['chi2']:.3f}  galprof {r['chi2']:.3f}  "
                  f"(pyimfit valid pixels {g['n_valid_pixels']}, galprof dof {r['dof']})")
            sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
