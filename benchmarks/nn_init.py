"""Neural initial guesses and learned masks (galprof.nn) against galprof.detect's moments and sep masks.

Four tables (docs/nn_init.md, the "done when" of the neural-initial-guess work):

1. **LM iterations and convergence** from the network's starts against the moment starts, on
   held-out stamps of the training survey (SDSS-like, ``galprof/nn/data/sdss_g.yaml``) simulated
   at their own pixels by galprof's renderer (seed 1000: not a training seed): neighbours, stars,
   sky residual, Moffat PSF, sky + Poisson noise, the true sigma map. Both start from the same sep
   detection and mask (galprof.detect defaults); single Sérsic + free sky, LM, float64,
   finite-difference Jacobian, batches of up to 16 stamps of similar size. Also the median
   |error| of the final re and mag of the targets with S/N > 50 (convergence to the same optimum),
   and, for reference, the same fits started at the true parameters (the floor of the iteration
   count: LM still needs steps to meet its tolerances). ``--tables 1c``: the same on the crowded
   GalSim stamps of ``auto_crowded.py`` (uniform placement, seed 7).
2. **Physics-informed loss against MSE alone**: the shipped (PINN) weights and weights trained the
   same way with ``--lambda-chi2 0``, on held-out grid stamps of the training survey and of a
   shifted survey (PSF FWHM 2.2-3.2 arcsec instead of 1.0-2.2; sky noise three times higher):
   median |error| of the guesses and the fraction of errors within the predicted 1 sigma.
3. **Inference speed** (stamps/s, ``--threads`` torch threads): the network alone on batches of 512 grid
   stamps, and including the gridding of native stamps (numpy).
4. **Mask IoU**: the IoU of the target footprint (pixels where the target's true light exceeds the
   sky sigma and that of every other source) with sep's target segment and with the mask
   network's target label, on the crowded GalSim stamps of ``benchmarks/auto_crowded.py``
   (uniform placement, seed 7) and on held-out survey stamps.

Run with one thread::

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/nn_init.py --mse-weights W.pt [--n 200]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import galprof  # noqa: E402
from galprof.detect import auto_inputs, psf_radii  # noqa: E402
from galprof.nn.grid import psf_fwhm  # noqa: E402
from galprof.nn.hook import network_inputs  # noqa: E402
from galprof.nn.infer import Predictor  # noqa: E402
from galprof.nn.simulate import simulate_grid, simulate_stamps  # noqa: E402
from galprof.nn.survey import load_survey, shipped_survey  # noqa: E402
from galprof.nn.train import evaluate_init  # noqa: E402


def model_for(zp: float):
    return galprof.load_model({"zeropoint": zp, "components": {
        "g": {"profile": "sersic", "x0": 32.5, "y0": 32.5, "mag": 18.0, "re": {"value": 4.0, "bounds": [0.3, 500.0]},
              "n": {"value": 2.0, "bounds": [0.3, 8.0]}, "q": 0.7, "pa": 0.0},
        "sky": {"profile": "sky", "sky": 0.0}}})


def fit_all(stamps, masks, starts, zp, batch=16):
    model = model_for(zp)
    order = np.argsort([s.image.shape[0] for s in stamps], kind="stable")
    out = [None] * len(stamps)
    base = {k: float(v.reshape(-1)[0]) for k, v in model.layout(1).values().items()}
    t0 = time.perf_counter()
    for b in range(0, len(order), batch):
        idx = order[b:b + batch]
        init = {k: [starts[i].get(k, base[k]) for i in idx] for k in model.layout(1).free}
        res = galprof.fit(model, [stamps[i].image for i in idx], [stamps[i].sigma for i in idx],
                          [masks[i] for i in idx], [stamps[i].psf for i in idx],
                          initial={k: np.array(v) for k, v in init.items()}, dtype=torch.float64)
        for j, i in enumerate(idx):
            out[i] = {"status": int(res.status[j]), "n_iter": int(res.n_iter[j]),
                      "re": float(res.values["g.re"][j]), "mag": float(res.values["g.mag"][j])}
    return out, time.perf_counter() - t0


def snr(s) -> float:
    """Matched-filter S/N of the target's true light."""
    return float(np.sqrt(np.sum((s.target / s.sigma) ** 2)))


def crowded_stamps(n: int, seed: int = 7):
    """auto_crowded.py's GalSim stamps as galprof.nn.simulate.Stamp objects (zeropoint 0)."""
    from auto_crowded import simulate as crowded

    from galprof.nn.simulate import Stamp

    stamps, psf = crowded(n, seed, "uniform")
    return [Stamp(image=s.image, sigma=s.sigma, psf=psf, target=s.target_light, other=s.other, sky_sigma=1.0,
                  truth={k: s.truth[k] for k in ("x0", "y0", "mag", "re", "n", "q", "pa", "flux", "sky")})
            for s in stamps]


def table1(pred: Predictor, n: int, seed: int, limit: int | None, crowded: bool = False):
    survey = pred.survey
    t0 = time.perf_counter()
    if crowded:
        stamps, zp, what = crowded_stamps(n, seed), 0.0, "crowded GalSim stamps (auto_crowded.py, uniform)"
    else:
        stamps, zp, what = simulate_stamps(survey, n, seed=seed), survey.zeropoint, f"held-out stamps of {survey.name}"
    print(f"\n[1] {n} {what} simulated in {time.perf_counter() - t0:.0f} s", flush=True)
    model = model_for(zp)
    masks, st_mom, st_nn, detected = [], [], [], []
    t_nn = t_mom = 0.0
    for s in stamps:
        t1 = time.perf_counter()
        r = auto_inputs(s.image, model=model, sigma=s.sigma, psf=s.psf, psf_stats=psf_radii(s.psf))
        t_mom += time.perf_counter() - t1
        detected.append(r.target is not None)
        t1 = time.perf_counter()
        _, nn, _ = network_inputs(pred, image=s.image, sigma=s.sigma, bad=None, psf=s.psf, auto=r, model=model,
                                  init="nn")
        t_nn += time.perf_counter() - t1
        masks.append(r.mask)
        st_mom.append(r.starts)
        st_nn.append(nn)
    keep = [i for i in range(n) if detected[i]][:limit]
    stamps = [stamps[i] for i in keep]
    masks = [masks[i] for i in keep]
    rows = []
    truth = [{**{f"g.{k}": s.truth[k] for k in ("x0", "y0", "mag", "re", "n", "q", "pa")}, "sky.sky": s.truth["sky"]}
             for s in stamps]
    for name, starts in (("moments (galprof.detect)", [st_mom[i] for i in keep]),
                         ("network (galprof.nn)", [st_nn[i] for i in keep]),
                         ("the true parameters (reference)", truth)):
        res, t_fit = fit_all(stamps, masks, starts, zp)
        it = np.array([r["n_iter"] for r in res])
        conv = np.array([r["status"] == 0 for r in res])
        bright = np.array([snr(s) > 50 for s in stamps])
        dre = np.array([abs(r["re"] / s.truth["re"] - 1) for r, s in zip(res, stamps)])
        dmag = np.array([abs(r["mag"] - s.truth["mag"]) for r, s in zip(res, stamps)])
        rows.append((name, np.median(it), np.mean(it), np.median(it[conv]) if conv.any() else math.nan, conv.mean(),
                     np.median(dre[bright & conv]), np.median(dmag[bright & conv]), t_fit / len(stamps)))
        print(f"  {name}: fitted {len(stamps)} in {t_fit:.0f} s", flush=True)
    print(f"  guesses: moments (detection + measurement) {1e3 * t_mom / n:.1f} ms/stamp, network on top "
          f"{1e3 * t_nn / n:.1f} ms/stamp (one at a time)")
    print(f"\n{len(stamps)} stamps with a detected target ({n - sum(detected)} without), "
          f"{int(sum(snr(s) > 50 for s in stamps))} with S/N > 50")
    print("| starts | median LM iterations | mean | median (converged) | converged | median abs(re/re_true - 1), "
          "S/N > 50 | median abs(dmag), S/N > 50 | fit s/galaxy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, med, mean, medc, cv, dre, dmag, tf in rows:
        print(f"| {name} | {med:.0f} | {mean:.1f} | {medc:.0f} | {100 * cv:.1f}% | {dre:.3f} | {dmag:.3f} | "
              f"{tf:.2f} |")
    return rows


def shifted(survey):
    d = dict(survey.to_dict())
    d["name"] = survey.name + "-shifted"
    d["psf"] = {**d["psf"], "fwhm": [2.2, 3.2]}
    d["noise"] = {**d["noise"], "sky_sigma": [3 * v for v in d["noise"]["sky_sigma"]]}
    return load_survey(d)


def table2(nets: dict, n: int, seed: int):
    base = shipped_survey()
    print("\n[2] guesses on held-out grid stamps (errors: |prediction - truth|, medians)")
    print("| survey | loss | re (relative) | mag | n (relative) | q | PA (deg, q < 0.8) | centre (px) | "
          "within 1 sigma (mean over outputs) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for sv in (base, shifted(base)):
        data = simulate_grid(sv, n, seed=seed)
        for name, p in nets.items():
            m = evaluate_init(p.init_net, data)
            a = m["median_abs"]
            cover = np.mean(list(m["within_1sigma"].values()))
            print(f"| {sv.name} | {name} | {a['re_rel']:.3f} | {a['mag']:.3f} | {a['n_rel']:.3f} | {a['q']:.3f} | "
                  f"{a['pa_deg_q<0.8']:.1f} | {a['centre_px']:.2f} | {cover:.2f} |", flush=True)


def table3(pred: Predictor, n: int = 512, seed: int = 3):
    stamps = simulate_stamps(pred.survey, 64, seed=seed)
    reps = (n + len(stamps) - 1) // len(stamps)
    images = [s.image for s in stamps] * reps
    sigmas = [s.sigma for s in stamps] * reps
    fw = [psf_fwhm(s.psf) for s in stamps] * reps
    images, sigmas, fw = images[:n], sigmas[:n], fw[:n]
    gridded = pred.grid_inputs(images, sigmas)
    pred.predict_gridded(gridded[:32], fw[:32])  # warm up
    best_net = best_all = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        pred.predict_gridded(gridded, fw, batch=n)
        best_net = min(best_net, time.perf_counter() - t0)
        t0 = time.perf_counter()
        pred.predict(images, sigmas, psf_fwhm_px=fw, batch=n)
        best_all = min(best_all, time.perf_counter() - t0)
    sizes = np.array([im.shape[0] for im in images])
    print(f"\n[3] inference, {n} stamps (sides {sizes.min()}-{sizes.max()} px, median {np.median(sizes):.0f}), "
          f"torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}")
    print("| step | stamps/s |")
    print("| --- | --- |")
    print(f"| network (grid stamps in, parameters and sigmas out) | {n / best_net:.0f} |")
    print(f"| gridding + network (native stamps in) | {n / best_all:.0f} |")


def iou(a, b) -> float:
    u = (a | b).sum()
    return float((a & b).sum() / u) if u else math.nan


def table4(pred: Predictor, n_crowded: int, n_survey: int):
    from auto_crowded import simulate as crowded

    from galprof.detect import detect

    rows = []
    t0 = time.perf_counter()
    stamps, psf = crowded(n_crowded, 7, "uniform")
    print(f"\n[4] {n_crowded} crowded GalSim stamps simulated in {time.perf_counter() - t0:.0f} s", flush=True)
    fw = psf_fwhm(psf)
    sep_iou, nn_iou = [], []
    for s in stamps:
        target = s.target_light
        true = (target > 1.0) & (target >= s.other)
        det = detect(s.image)
        seg = det.segmap == det.target if det.target else np.zeros(true.shape, bool)
        lab = pred.labels([s.image], [s.sigma], psf_fwhm_px=[fw])[0]
        sep_iou.append(iou(seg, true))
        nn_iou.append(iou(lab == 1, true))
    rows.append(("crowded GalSim (auto_crowded, uniform)", len(stamps), sep_iou, nn_iou))
    sv = simulate_stamps(pred.survey, n_survey, seed=2000)
    sep_iou, nn_iou = [], []
    for s in sv:
        true = (s.target > s.sky_sigma) & (s.target >= s.other)
        det = detect(s.image)
        seg = det.segmap == det.target if det.target else np.zeros(true.shape, bool)
        lab = pred.labels([s.image], [s.sigma], psf_fwhm_px=[psf_fwhm(s.psf)])[0]
        sep_iou.append(iou(seg, true))
        nn_iou.append(iou(lab == 1, true))
    rows.append((f"held-out {pred.survey.name} stamps", len(sv), sep_iou, nn_iou))
    print("| stamps | n | sep target segment: median IoU | mean IoU | mask network: median IoU | mean IoU |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, n, a, b in rows:
        a, b = np.nan_to_num(np.array(a)), np.nan_to_num(np.array(b))
        print(f"| {name} | {n} | {np.median(a):.3f} | {a.mean():.3f} | {np.median(b):.3f} | {b.mean():.3f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", help="PINN weights (default: the shipped ones)")
    p.add_argument("--mse-weights", help="weights trained with --lambda-chi2 0 (table 2)")
    p.add_argument("--n", type=int, default=200, help="stamps fitted in table 1")
    p.add_argument("--n-grid", type=int, default=2000, help="grid stamps per survey in table 2")
    p.add_argument("--n-crowded", type=int, default=300, help="crowded GalSim stamps in table 4")
    p.add_argument("--tables", default="1,2,3,4")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1, help="torch threads of table 3 (the others use one)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pred = Predictor(args.weights)
    print(f"weights: {pred.source}; torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, load {os.getloadavg()}")
    tables = set(args.tables.split(","))
    if "3" in tables:
        torch.set_num_threads(args.threads)
        table3(pred)
        torch.set_num_threads(1)
    if "2" in tables:
        nets = {"PINN (MSE + chi2)": pred}
        if args.mse_weights:
            nets["MSE only"] = Predictor(args.mse_weights)
        table2(nets, args.n_grid, args.seed + 1)
    if "4" in tables:
        table4(pred, args.n_crowded, 300)
    if "1" in tables:
        table1(pred, args.n, args.seed, None)
    if "1c" in tables:
        table1(pred, args.n, 7, None, crowded=True)
    print(f"\nload average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
