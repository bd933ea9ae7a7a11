"""Simulated stamps of a survey, rendered by galprof's own engine (:class:`galprof.Renderer`).

Each stamp holds a target Sérsic galaxy drawn from the survey's distributions, neighbour
galaxies and stars (the crowded stamps of ``benchmarks/auto_crowded.py``, with the survey's
numbers), a constant sky residual, a Moffat PSF and Gaussian noise with the sky and source
Poisson terms, and the true sigma map.

Two forms:

* :func:`simulate_grid` (training): stamps drawn directly on the network grid. A stamp of side
  ``S`` is padded to ``GRID f`` pixels (``f = ceil(S / GRID)``) and averaged over ``f x f``
  blocks at inference (:mod:`galprof.nn.grid`); here the same stamp is rendered on the grid at
  once: sizes and PSF FWHM divided by ``f``, flux by ``f^2`` (block means), noise variance by
  the number of pixels averaged. Rendering 64 x 64 instead of up to 256 x 256 pixels is what
  makes training on a CPU practical.
* :func:`simulate_stamps` (benchmarks, tests): the same distributions rendered at the stamps'
  own pixels, as numpy arrays with their PSF images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..model import load_model
from ..render import Renderer, RenderOptions
from .grid import GRID, psf_fwhm
from .survey import Survey

__all__ = ["GridBatch", "Stamp", "draw", "moffat_psf", "simulate_grid", "simulate_stamps", "FAST_RENDER"]

#: cheaper quadrature for training stamps (cell integrals to a few per cent, ample for guesses)
FAST_RENDER = RenderOptions(base_order=1, refine=(), window=2, angular_order=8, radial_order=6)
_ABSENT_MAG = 60.0  # magnitude (zeropoint 0) of an unused neighbour or star slot


def moffat_psf(fwhm: float, beta: float, size: int | None = None, sub: int = 5) -> np.ndarray:
    """A star-like (pixel-integrated) circular Moffat PSF image of unit sum, centred at
    ``[size // 2, size // 2]`` (odd ``size``; default about 4 FWHM, at least 15 px)."""
    if size is None:
        size = max(15, 2 * int(math.ceil(2.5 * fwhm)) + 1)
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    c = size // 2
    off = (np.arange(sub) + 0.5) / sub - 0.5
    u = (np.arange(size)[:, None] - c + off[None, :]).ravel()
    r2 = u[None, :] ** 2 + u[:, None] ** 2
    img = (1.0 + r2 / alpha ** 2) ** (-beta)
    img = img.reshape(size, sub, size, sub).mean(axis=(1, 3))
    return img / img.sum()


def _logu(rng, lo, hi, size=None):
    return np.exp(rng.uniform(math.log(lo), math.log(hi), size))


@dataclass
class Draw:
    """The drawn content of one stamp, in its own pixels (FITS frame)."""

    size: int
    fwhm: float
    beta: float
    sky_sigma: float
    sky: float
    target: dict  # x0, y0, flux, re, n, q, pa, mag
    neighbours: list  # (x, y, flux, re, n, q, pa)
    stars: list  # (x, y, flux)


def draw(survey: Survey, rng: np.random.Generator, *, shift: tuple[float, float] = (0.0, 0.0)) -> Draw:
    """One stamp's content. ``shift``: the stamp centre's offset from the target's, px, added to
    the survey's random offset (the target sits within the stamp's central pixel plus that)."""
    s = survey
    ps = s.pixel_scale
    re = float(_logu(rng, *s.re)) / ps
    ratio = float(_logu(rng, *s.re_ratio))
    size = int(np.clip(round(ratio * re), s.stamp_size[0], s.stamp_size[1]))
    re = min(re, size / s.re_ratio[0])
    mag = float(rng.uniform(*s.mag))
    flux = 10 ** (-0.4 * (mag - s.zeropoint))
    c = (size + 1) / 2.0
    d = rng.normal(0.0, s.centre_offset, 2).clip(-3 * s.centre_offset, 3 * s.centre_offset) if s.centre_offset else 0
    x0, y0 = c + np.asarray(d) + np.asarray(shift) + rng.uniform(-0.5, 0.5, 2)
    t = {"x0": float(x0), "y0": float(y0), "flux": flux, "mag": mag, "re": re, "n": float(rng.uniform(*s.n)),
         "q": float(rng.uniform(*s.q)), "pa": float(rng.uniform(-90.0, 90.0))}
    sky_sigma = float(_logu(rng, *s.sky_sigma))
    nbs = []
    for _ in range(int(rng.integers(s.neighbour_count[0], s.neighbour_count[1] + 1))):
        re_n = float(_logu(rng, *s.neighbour_re)) / ps
        for _try in range(30):
            x, y = rng.uniform(0.5, size + 0.5, 2)
            if math.hypot(x - t["x0"], y - t["y0"]) >= s.min_separation * (re + re_n):
                nbs.append((float(x), float(y), flux * float(_logu(rng, *s.neighbour_flux)), re_n,
                            float(rng.uniform(0.5, 4.0)), float(rng.uniform(0.3, 1.0)), float(rng.uniform(-90, 90))))
                break
    stars = []
    fwhm = float(rng.uniform(*s.psf_fwhm)) / ps
    for _ in range(int(rng.integers(s.star_count[0], s.star_count[1] + 1))):
        for _try in range(30):
            x, y = rng.uniform(0.5, size + 0.5, 2)
            if math.hypot(x - t["x0"], y - t["y0"]) >= 1.5 * re + fwhm:
                stars.append((float(x), float(y), flux * float(_logu(rng, *s.star_flux))))
                break
    return Draw(size=size, fwhm=fwhm, beta=float(rng.uniform(*s.psf_beta)), sky_sigma=sky_sigma,
                sky=float(rng.uniform(-1, 1) * s.sky_residual * sky_sigma), target=t, neighbours=nbs, stars=stars)


def _model(k_nb: int, k_st: int):
    comps = {"g": {"profile": "sersic", "x0": 1.0, "y0": 1.0, "mag": 0.0, "re": 1.0, "n": 1.0, "q": 1.0, "pa": 0.0}}
    for i in range(k_nb):
        comps[f"nb{i}"] = dict(comps["g"])
    for i in range(k_st):
        comps[f"st{i}"] = {"profile": "psf", "x0": 1.0, "y0": 1.0, "mag": 0.0}
    return load_model({"zeropoint": 0.0, "components": comps})


def _render(draws_scaled, shapes, psfs, *, options, dtype, device):
    """Target and other light ``(B, H, W)`` of scaled draws: dicts with keys target, neighbours,
    stars (positions in the frame rendered)."""
    k_nb = max((len(d["neighbours"]) for d in draws_scaled), default=0)
    k_st = max((len(d["stars"]) for d in draws_scaled), default=0)
    model = _model(k_nb, k_st)
    r = Renderer(model, shapes, psfs, dtype=dtype, device=device, options=options)
    vals = {k: [] for k in model.parameter_names}
    for d in draws_scaled:
        t = d["target"]
        for p in ("x0", "y0", "re", "n", "q", "pa"):
            vals[f"g.{p}"].append(t[p])
        vals["g.mag"].append(-2.5 * math.log10(t["flux"]))
        for i in range(k_nb):
            x, y, fl, re, n, q, pa = d["neighbours"][i] if i < len(d["neighbours"]) else (1, 1, 0, 1, 1, 1, 0)
            for p, v in zip(("x0", "y0", "re", "n", "q", "pa"), (x, y, re, n, q, pa)):
                vals[f"nb{i}.{p}"].append(v)
            vals[f"nb{i}.mag"].append(-2.5 * math.log10(fl) if fl > 0 else _ABSENT_MAG)
        for i in range(k_st):
            x, y, fl = d["stars"][i] if i < len(d["stars"]) else (1, 1, 0)
            vals[f"st{i}.x0"].append(x)
            vals[f"st{i}.y0"].append(y)
            vals[f"st{i}.mag"].append(-2.5 * math.log10(fl) if fl > 0 else _ABSENT_MAG)
    base = r.values()
    vals = {k: torch.tensor(v, dtype=dtype, device=device) if v else base[k] for k, v in vals.items()}
    with torch.no_grad():
        target = r(vals, check=False, components=["g"])
        others = [c.name for c in model.components if c.name != "g"]
        other = r(vals, check=False, components=others) if others else torch.zeros_like(target)
    return target, other


@dataclass
class GridBatch:
    """Simulated stamps on the network grid (tensors, first axis the stamp).

    ``image``, ``sigma``, ``frac`` (B, G, G) as :func:`galprof.nn.grid.to_grid` makes them
    (``frac`` 0 on the padding); ``target``, ``other`` the true light of the target and of the
    rest; ``sky_sigma`` (B,) the sky noise per stamp pixel; ``factor`` (B,) f; ``fwhm`` (B,) the
    PSF FWHM measured on the grid PSF; ``psf`` (B, P, P) the grid PSFs; ``truth``: the target's
    parameters on the grid: ``x0, y0`` (grid FITS), ``re`` (grid px), ``n``, ``q``, ``pa``,
    ``flux`` (grid units: stamp flux / f^2), ``sky``.
    """

    image: torch.Tensor
    sigma: torch.Tensor
    frac: torch.Tensor
    target: torch.Tensor
    other: torch.Tensor
    sky_sigma: torch.Tensor
    factor: torch.Tensor
    fwhm: torch.Tensor
    psf: torch.Tensor
    truth: dict

    def __len__(self) -> int:
        return self.image.shape[0]

    def subset(self, idx) -> GridBatch:
        return GridBatch(**{k: getattr(self, k)[idx] for k in ("image", "sigma", "frac", "target", "other",
                                                               "sky_sigma", "factor", "fwhm", "psf")},
                         truth={k: v[idx] for k, v in self.truth.items()})


def _overlap(k0, f, a, b):
    """Length of [k0, k0 + f) within [a, b) for each block start k0."""
    return np.clip(np.minimum(k0 + f, b) - np.maximum(k0, a), 0, f)


def simulate_grid(survey: Survey, n: int, *, seed: int = 0, grid: int = GRID, chunk: int = 128,
                  options: RenderOptions = FAST_RENDER, dtype: torch.dtype = torch.float32,
                  device="cpu", psf_size: int = 25) -> GridBatch:
    """``n`` stamps of ``survey`` drawn on the network grid (module docstring)."""
    rng = np.random.default_rng(seed)
    parts = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        draws, scaled, psfs, fracs, info = [], [], [], [], []
        for _ in range(m):
            d = draw(survey, rng)
            f = max(1, math.ceil(d.size / grid))
            big = grid * f
            t = d.target
            # canvas: the target within half a pixel of its centre (as to_grid places it)
            ox = int(round(t["x0"] - (big + 1) / 2.0))
            oy = int(round(t["y0"] - (big + 1) / 2.0))

            def g(x, o, f=f):
                return (x - o - 0.5) / f + 0.5

            k0 = np.arange(grid) * f
            fx = _overlap(k0, f, -ox, d.size - ox) / f
            fy = _overlap(k0, f, -oy, d.size - oy) / f
            fracs.append(np.outer(fy, fx))
            sc = {"target": {"x0": g(t["x0"], ox), "y0": g(t["y0"], oy), "re": t["re"] / f, "n": t["n"],
                             "q": t["q"], "pa": t["pa"], "flux": t["flux"] / f ** 2},
                  "neighbours": [(g(x, ox), g(y, oy), fl / f ** 2, re / f, nn, q, pa)
                                 for x, y, fl, re, nn, q, pa in d.neighbours],
                  "stars": [(g(x, ox), g(y, oy), fl / f ** 2) for x, y, fl in d.stars]}
            scaled.append(sc)
            psfs.append(moffat_psf(d.fwhm / f, d.beta, psf_size))
            draws.append(d)
            info.append(f)
        target, other = _render(scaled, [(grid, grid)] * m, psfs, options=options, dtype=dtype, device=device)
        fac = torch.tensor(info, dtype=dtype, device=device)
        frac = torch.as_tensor(np.stack(fracs), dtype=dtype, device=device)
        sky_sigma = torch.tensor([d.sky_sigma for d in draws], dtype=dtype, device=device)
        sky = torch.tensor([d.sky for d in draws], dtype=dtype, device=device)
        npix = (fac ** 2)[:, None, None] * frac
        model = target + other
        var = (sky_sigma[:, None, None] ** 2 + torch.clamp(model, min=0) / survey.gain) / torch.clamp(npix, min=1e-6)
        sigma = torch.where(frac > 0, torch.sqrt(var), torch.zeros_like(var))
        gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(2 ** 62)))
        noise = torch.randn(model.shape, generator=gen, dtype=dtype).to(device)
        image = torch.where(frac > 0, model + sky[:, None, None] + noise * sigma, torch.zeros_like(model))
        truth = {k: torch.tensor([s["target"][k] for s in scaled], dtype=dtype, device=device)
                 for k in ("x0", "y0", "re", "n", "q", "pa", "flux")}
        truth["sky"] = sky
        fwhm = torch.tensor([psf_fwhm(p) for p in psfs], dtype=dtype, device=device)
        parts.append(GridBatch(image=image, sigma=sigma, frac=frac, target=target, other=other, sky_sigma=sky_sigma,
                               factor=fac, fwhm=fwhm, psf=torch.as_tensor(np.stack(psfs), dtype=dtype, device=device),
                               truth=truth))
    return GridBatch(**{k: torch.cat([getattr(p, k) for p in parts]) for k in
                        ("image", "sigma", "frac", "target", "other", "sky_sigma", "factor", "fwhm", "psf")},
                     truth={k: torch.cat([p.truth[k] for p in parts]) for k in parts[0].truth})


@dataclass
class Stamp:
    """A simulated stamp at its own pixels (numpy, float64): ``image``, ``sigma``, ``psf``,
    ``target`` and ``other`` (true light), ``sky_sigma``, ``truth`` (x0, y0, mag, re, n, q, pa,
    flux, sky in the survey's zeropoint and the stamp's FITS frame)."""

    image: np.ndarray
    sigma: np.ndarray
    psf: np.ndarray
    target: np.ndarray
    other: np.ndarray
    sky_sigma: float
    truth: dict


def simulate_stamps(survey: Survey, n: int, *, seed: int = 0, psf_size: int = 41,
                    options: RenderOptions | None = None, dtype: torch.dtype = torch.float64,
                    device="cpu") -> list[Stamp]:
    """``n`` stamps of ``survey`` at their own pixels (module docstring); rendered with the
    renderer's default accuracy."""
    rng = np.random.default_rng(seed)
    draws = [draw(survey, rng) for _ in range(n)]
    out: list[Stamp | None] = [None] * n
    by_size: dict[int, list[int]] = {}
    for i, d in enumerate(draws):
        by_size.setdefault(d.size, []).append(i)
    noise_rng = np.random.default_rng(seed + 1)
    for size, idx in sorted(by_size.items()):
        for b in range(0, len(idx), 32):
            sub = idx[b:b + 32]
            ds = [draws[i] for i in sub]
            psfs = [moffat_psf(d.fwhm, d.beta, psf_size) for d in ds]
            sc = [{"target": d.target, "neighbours": d.neighbours, "stars": d.stars} for d in ds]
            target, other = _render(sc, [(size, size)] * len(ds), psfs, options=options, dtype=dtype,
                                    device=device)
            for j, i in enumerate(sub):
                d = ds[j]
                t = target[j].cpu().numpy().astype(np.float64)
                o = other[j].cpu().numpy().astype(np.float64)
                model = t + o
                sigma = np.sqrt(d.sky_sigma ** 2 + np.clip(model, 0, None) / survey.gain)
                image = model + d.sky + noise_rng.normal(0.0, 1.0, model.shape) * sigma
                truth = {**{k: d.target[k] for k in ("x0", "y0", "mag", "re", "n", "q", "pa", "flux")}, "sky": d.sky}
                out[i] = Stamp(image=image, sigma=sigma, psf=psfs[j], target=t, other=o, sky_sigma=d.sky_sigma,
                               truth=truth)
    return out
