"""Training the parameter and mask networks on simulated stamps of a survey (``galprof train-init``).

Parameter network (:class:`~galprof.nn.network.InitNet`), per batch:

* inputs: the simulated stamp on the grid, masked as a detection would mask it: the pixels
  where the other sources' true light exceeds ``t`` sigma (``t`` log-uniform in [0.3, 3] per
  stamp), except where the target is more than twice as bright; a quarter of the stamps
  unmasked;
* loss = MSE of the standardised transformed parameters (:data:`~galprof.nn.network.OUTPUTS`)
  + Gaussian negative log-likelihood of the predicted log-sigmas (with the means held fixed, so
  that the sigma head does not change the means) + ``lambda_chi2`` times the mean over stamps of
  ``ln chi2_nu``: the reduced chi^2 of the stamp against the single Sérsic + sky rendered from
  the prediction by :class:`galprof.Renderer` (the PSF of the stamp; pixels used: the unmasked
  ones where the other sources' light is below one sigma). ``ln`` keeps bright stamps, whose
  chi^2 is orders of magnitude larger, from dominating; ``lambda_chi2 = 0`` is MSE alone.

Mask network (:class:`~galprof.nn.network.MaskNet`): cross-entropy against the true labels of
each grid pixel: ``target`` where the target's light exceeds the sky sigma (of a stamp pixel)
and that of the other sources, ``other`` where the other sources' light exceeds the sky sigma
and the target's, ``sky`` elsewhere (the padding does not count).

Reproducible for a seed and thread count (the simulation, the initial weights and the batch
order are seeded).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch

from ..errors import DataError
from ..model import load_model
from ..render import Renderer
from .grid import GRID, network_input
from .network import OUTPUTS, InitNet, MaskNet, decode, encode
from .simulate import FAST_RENDER, GridBatch, simulate_grid
from .survey import Survey

log = logging.getLogger("galprof")

__all__ = ["TrainConfig", "train", "input_mask", "mask_labels", "save_weights", "evaluate_init"]

WEIGHTS_KIND = "galprof-nn"
WEIGHTS_VERSION = 1


@dataclass
class TrainConfig:
    """Settings of :func:`train` (the defaults: the shipped weights' training, about 25 minutes on
    one CPU thread)."""

    n_train: int = 12000
    n_val: int = 1000
    epochs: int = 12
    batch: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    lambda_chi2: float = 0.1
    chi2_stamps: int = 64  # stamps of each batch whose chi^2 is rendered (the cost of the physics term)
    mask_epochs: int = 4
    seed: int = 0
    threads: int = 1

    def validate(self) -> None:
        for name in ("n_train", "n_val", "epochs", "batch", "chi2_stamps", "threads"):
            if int(getattr(self, name)) < 1:
                raise DataError(f"training option {name} = {getattr(self, name)!r} must be >= 1")
        for name in ("lr", "weight_decay", "lambda_chi2"):
            v = float(getattr(self, name))
            if not (math.isfinite(v) and v >= 0):
                raise DataError(f"training option {name} = {v!r} must be >= 0")
        if self.mask_epochs < 0:
            raise DataError("mask_epochs must be >= 0")


def input_mask(b: GridBatch, gen: torch.Generator) -> torch.Tensor:
    """The training inputs' ``frac`` with other sources masked as a detection would (module
    docstring)."""
    B = len(b)
    t = torch.exp(torch.empty(B).uniform_(math.log(0.3), math.log(3.0), generator=gen)).to(b.image)
    on = (torch.rand(B, generator=gen) >= 0.25).to(b.image.device)
    masked = (b.other > t[:, None, None] * b.sigma) & ~(b.target > 2 * b.other) & on[:, None, None]
    return torch.where(masked, torch.zeros_like(b.frac), b.frac)


def mask_labels(b: GridBatch) -> torch.Tensor:
    """True labels (0 sky, 1 target, 2 other) of the grid pixels (module docstring)."""
    thr = b.sky_sigma[:, None, None]
    lab = torch.zeros(b.image.shape, dtype=torch.long, device=b.image.device)
    lab[(b.other > thr) & (b.other > b.target)] = 2
    lab[(b.target > thr) & (b.target >= b.other)] = 1
    return lab


_SERSIC_SKY = None


def _sersic_sky():
    global _SERSIC_SKY
    if _SERSIC_SKY is None:
        _SERSIC_SKY = load_model({"zeropoint": 0.0, "components": {
            "g": {"profile": "sersic", "x0": 32.5, "y0": 32.5, "mag": 0.0, "re": 2.0, "n": 1.0, "q": 1.0, "pa": 0.0},
            "sky": {"profile": "sky", "sky": 0.0}}})
    return _SERSIC_SKY


def render_prediction(vals: dict, psf: torch.Tensor, grid: int = GRID) -> torch.Tensor:
    """The single Sérsic + sky of grid values ``vals`` (differentiable), on the grid."""
    B = psf.shape[0]
    r = Renderer(_sersic_sky(), [(grid, grid)] * B, [p for p in psf.detach().cpu().numpy()],
                 options=FAST_RENDER, dtype=psf.dtype, device=psf.device)
    base = r.values()
    v = dict(base)
    v.update({"g.x0": vals["x0"].clamp(-grid, 2 * grid), "g.y0": vals["y0"].clamp(-grid, 2 * grid),
              "g.re": vals["re"].clamp(0.05, 4 * grid), "g.n": vals["n"], "g.q": vals["q"].clamp(0.03, 1.0),
              "g.pa": vals["pa"], "g.mag": -2.5 * torch.log10(vals["flux"].clamp(min=1e-30)), "sky.sky": vals["sky"]})
    return r(v, check=False)


def chi2_term(net: InitNet, mu, b: GridBatch, frac_in, s0, n: int) -> torch.Tensor:
    """Mean over the first ``n`` stamps of ``ln chi2_nu`` of the rendered prediction."""
    n = min(n, len(b))
    t, _ = net.physical(mu[:n], torch.zeros_like(mu[:n]))
    vals, _ = decode(t, s0[:n])
    model = render_prediction(vals, b.psf[:n])
    use = (frac_in[:n] > 0) & (b.other[:n] < b.sigma[:n])
    sig = torch.where(use, b.sigma[:n], torch.ones_like(b.sigma[:n]))
    r2 = torch.where(use, ((b.image[:n] - model) / sig) ** 2, torch.zeros_like(model))
    chi2_nu = r2.sum(dim=(1, 2)) / use.sum(dim=(1, 2)).clamp(min=1)
    return torch.log(chi2_nu.clamp(min=1e-3)).mean()


def _standardise(net: InitNet, b: GridBatch):
    _, _, s0 = network_input(b.image, b.sigma, b.frac, b.fwhm)
    y = encode(b.truth, s0)
    net.mean.copy_(y.mean(0))
    net.scale.copy_(y.std(0).clamp(min=1e-3))


def evaluate_init(net: InitNet, b: GridBatch, *, masked: bool = True, seed: int = 12345) -> dict:
    """Validation metrics on grid stamps: per output, the RMS error and the fraction within the
    predicted 1 sigma; and the median |error| of re (relative), mag, n (relative), q, PA (deg,
    q < 0.8) and centre (stamp px)."""
    gen = torch.Generator().manual_seed(seed)
    frac = input_mask(b, gen) if masked else b.frac
    net.eval()
    with torch.no_grad():
        x, sc, s0 = network_input(b.image, b.sigma, frac, b.fwhm)
        mu, ls = net(x, sc)
        t, sig = net.physical(mu, ls)
        y = encode(b.truth, s0)
        vals, _ = decode(t, s0)
    err = t - y
    out = {"rms": {k: float(err[:, i].pow(2).mean().sqrt()) for i, k in enumerate(OUTPUTS)},
           "within_1sigma": {k: float((err[:, i].abs() < sig[:, i]).float().mean()) for i, k in enumerate(OUTPUTS)}}
    tr = b.truth
    dpa = torch.remainder(vals["pa"] - tr["pa"] + 90.0, 180.0) - 90.0
    elong = tr["q"] < 0.8
    out["median_abs"] = {
        "re_rel": float((vals["re"] / tr["re"] - 1).abs().median()),
        "mag": float((2.5 * torch.log10(vals["flux"] / tr["flux"])).abs().median()),
        "n_rel": float((vals["n"] / tr["n"] - 1).abs().median()),
        "q": float((vals["q"] - tr["q"]).abs().median()),
        "pa_deg_q<0.8": float(dpa[elong].abs().median()) if elong.any() else math.nan,
        "centre_px": float((torch.hypot(vals["x0"] - tr["x0"], vals["y0"] - tr["y0"]) * b.factor).median())}
    return out


def _batches(n: int, size: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    return [perm[i:i + size] for i in range(0, n, size)]


def train_init(net: InitNet, data: GridBatch, cfg: TrainConfig, gen: torch.Generator, *, time_log=None) -> list:
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(data) / cfg.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
    history = []
    for epoch in range(cfg.epochs):
        net.train()
        t0 = time.perf_counter()
        tot = {"mse": 0.0, "nll": 0.0, "chi2": 0.0}
        nb = 0
        for idx in _batches(len(data), cfg.batch, gen):
            b = data.subset(idx)
            frac = input_mask(b, gen)
            x, sc, s0 = network_input(b.image, b.sigma, frac, b.fwhm)
            y = (encode(b.truth, s0) - net.mean) / net.scale
            mu, ls = net(x, sc)
            mse = (mu - y).pow(2).mean()
            nll = (ls + 0.5 * ((mu.detach() - y) * torch.exp(-ls)).pow(2)).mean()
            loss = mse + nll
            if cfg.lambda_chi2 > 0:
                c2 = chi2_term(net, mu, b, frac, s0, cfg.chi2_stamps)
                loss = loss + cfg.lambda_chi2 * c2
                tot["chi2"] += float(c2.detach())
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            sched.step()
            tot["mse"] += float(mse.detach())
            tot["nll"] += float(nll.detach())
            nb += 1
        row = {"epoch": epoch + 1, **{k: v / nb for k, v in tot.items()}, "seconds": time.perf_counter() - t0}
        history.append(row)
        log.info("init net epoch %d/%d: mse %.4f nll %.4f ln chi2_nu %.3f (%.0f s)", epoch + 1, cfg.epochs,
                 row["mse"], row["nll"], row["chi2"], row["seconds"])
    net.eval()
    return history


def train_mask(net: MaskNet, data: GridBatch, cfg: TrainConfig, gen: torch.Generator) -> list:
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(1, cfg.mask_epochs * math.ceil(len(data) / cfg.batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
    weights = torch.tensor([1.0, 2.0, 2.0], dtype=data.image.dtype)
    history = []
    for epoch in range(cfg.mask_epochs):
        net.train()
        t0 = time.perf_counter()
        tot, nb = 0.0, 0
        for idx in _batches(len(data), cfg.batch, gen):
            b = data.subset(idx)
            x, _, _ = network_input(b.image, b.sigma, b.frac, b.fwhm)
            lab = mask_labels(b)
            lab = torch.where(b.frac > 0, lab, torch.full_like(lab, -100))
            loss = torch.nn.functional.cross_entropy(net(x), lab, weight=weights, ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach())
            nb += 1
        history.append({"epoch": epoch + 1, "ce": tot / nb, "seconds": time.perf_counter() - t0})
        log.info("mask net epoch %d/%d: cross-entropy %.4f (%.0f s)", epoch + 1, cfg.mask_epochs, tot / nb,
                 history[-1]["seconds"])
    net.eval()
    return history


def mask_iou(net: MaskNet, b: GridBatch) -> float:
    """Median IoU of the predicted and true target footprints on grid stamps."""
    with torch.no_grad():
        x, _, _ = network_input(b.image, b.sigma, b.frac, b.fwhm)
        pred = net(x).argmax(1) == 1
    true = mask_labels(b) == 1
    inter = (pred & true).sum(dim=(1, 2)).float()
    union = (pred | true).sum(dim=(1, 2)).float().clamp(min=1)
    return float((inter / union).median())


def train(survey: Survey, cfg: TrainConfig | None = None, *, masks: bool = True, device="cpu",
          dtype: torch.dtype = torch.float32) -> dict:
    """Simulate, train both networks, validate; returns the weights dictionary
    (:func:`save_weights` writes it)."""
    cfg = cfg or TrainConfig()
    cfg.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(int(cfg.threads))
    try:
        return _train(survey, cfg, masks=masks, device=device, dtype=dtype)
    finally:
        torch.set_num_threads(threads)


def _train(survey: Survey, cfg: TrainConfig, *, masks: bool, device, dtype) -> dict:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    data = simulate_grid(survey, cfg.n_train, seed=cfg.seed, dtype=dtype, device=device)
    val = simulate_grid(survey, cfg.n_val, seed=cfg.seed + 10_000, dtype=dtype, device=device)
    t_sim = time.perf_counter() - t0
    log.info("simulated %d training and %d validation stamps in %.0f s", cfg.n_train, cfg.n_val, t_sim)
    net = InitNet().to(device=device, dtype=dtype)
    _standardise(net, data)
    t1 = time.perf_counter()
    hist = train_init(net, data, cfg, gen)
    t_init = time.perf_counter() - t1
    metrics = {"init": evaluate_init(net, val)}
    log.info("validation: %s", metrics["init"]["median_abs"])
    out = {"kind": WEIGHTS_KIND, "version": WEIGHTS_VERSION, "survey": survey.to_dict(), "config": asdict(cfg),
           "init": {"config": net.config, "state": {k: v.detach().cpu().float() for k, v in net.state_dict().items()},
                    "history": hist}, "metrics": metrics,
           "timing": {"simulate_s": t_sim, "init_s": t_init, "torch": str(torch.__version__), "threads": cfg.threads}}
    if masks and cfg.mask_epochs > 0:
        mnet = MaskNet().to(device=device, dtype=dtype)
        t2 = time.perf_counter()
        mhist = train_mask(mnet, data, cfg, gen)
        out["timing"]["mask_s"] = time.perf_counter() - t2
        metrics["mask_iou_median"] = mask_iou(mnet, val)
        log.info("validation: median target IoU of the mask network %.3f", metrics["mask_iou_median"])
        out["mask"] = {"config": mnet.config, "state": {k: v.detach().cpu().float() for k, v in
                                                         mnet.state_dict().items()}, "history": mhist}
    out["timing"]["total_s"] = time.perf_counter() - t0
    return out


def save_weights(weights: dict, path) -> None:
    """Write a weights dictionary (atomically)."""
    import os
    import tempfile
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(weights, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

