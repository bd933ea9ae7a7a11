"""SDSS-like single-Sérsic galaxies simulated with GalSim, shared by benchmarks and tests.

Every galaxy is a GalSim Sérsic (its own implementation: an independent simulator), sheared to
axis ratio q at position angle PA (galprof's convention: counter-clockwise from +y), convolved
with a Moffat PSF (beta 4.5, FWHM 3.5 px, roughly SDSS r-band seeing at 0.396"/px) and drawn
with the pixel response. Noise is sky-dominated Gaussian noise plus the source's Poisson noise
(gain 4.7 e-/DN, sky sigma 1 DN per pixel): the sigma map is the true one. Starts are the
truth perturbed as a survey's catalogue guesses would be: re x/÷ 1.5, n = 2, q = 0.7,
PA ± 20 deg, mag ± 0.5, centre ± 1.5 px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

#: the Moffat PSF of every simulation
PSF_BETA, PSF_FWHM = 4.5, 3.5
GAIN, SKY_SIGMA = 4.7, 1.0
PARAMS = ("x0", "y0", "mag", "re", "n", "q", "pa")


@dataclass
class Sample:
    truths: list[dict] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    sigmas: list[np.ndarray] = field(default_factory=list)
    starts: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in PARAMS})
    psf: np.ndarray | None = None
    psf_kind: str = "star"

    def subset(self, index) -> Sample:
        s = Sample(psf=self.psf, psf_kind=self.psf_kind)
        s.truths = [self.truths[i] for i in index]
        s.images = [self.images[i] for i in index]
        s.sigmas = [self.sigmas[i] for i in index]
        s.starts = {k: [v[i] for i in index] for k, v in self.starts.items()}
        return s

    def by_size(self) -> dict[int, Sample]:
        sizes = sorted({im.shape[0] for im in self.images})
        return {n: self.subset([i for i, im in enumerate(self.images) if im.shape[0] == n]) for n in sizes}


def psf_image(kind: str = "star", size: int = 41) -> np.ndarray:
    """The PSF as a star-like image (PSF ⊗ pixel, sampled) or an optical one (PSF sampled)."""
    import galsim

    gsp = galsim.GSParams(folding_threshold=1e-4, maxk_threshold=1e-5)
    moffat = galsim.Moffat(beta=PSF_BETA, fwhm=PSF_FWHM, gsparams=gsp)
    obj = galsim.Convolve(moffat, galsim.Pixel(1.0), gsparams=gsp) if kind == "star" else moffat
    return obj.drawImage(nx=size, ny=size, scale=1.0, method="no_pixel").array


def stamp_size(re: float, sizes=(64, 128, 256)) -> int:
    """A stamp about 20 re wide (GALFIT's advice is well beyond the galaxy), 64-256 px."""
    for s in sizes:
        if 20 * re <= s:
            return s
    return sizes[-1]


def simulate(n: int, *, seed: int = 1, sizes=(64, 128, 256), fixed_size: int | None = None,
             snr=(30.0, 300.0), psf_kind: str = "star") -> Sample:
    """``n`` galaxies: re 1.5-15 px (log-uniform), n 0.5-6, q 0.2-1, any PA, matched-filter S/N
    log-uniform in ``snr``, centre within half a pixel of the stamp centre."""
    import galsim

    rng = np.random.default_rng(seed)
    gsp = galsim.GSParams(folding_threshold=1e-4, maxk_threshold=1e-5)
    moffat = galsim.Moffat(beta=PSF_BETA, fwhm=PSF_FWHM, gsparams=gsp)
    out = Sample(psf=psf_image(psf_kind), psf_kind=psf_kind)
    for _ in range(n):
        re = float(np.exp(rng.uniform(np.log(1.5), np.log(15.0))))
        size = fixed_size or stamp_size(re, sizes)
        t = {"x0": size / 2 + 0.5 + rng.uniform(-0.5, 0.5), "y0": size / 2 + 0.5 + rng.uniform(-0.5, 0.5),
             "re": re, "n": rng.uniform(0.5, 6.0), "q": rng.uniform(0.2, 1.0), "pa": rng.uniform(-90, 90)}
        g = galsim.Sersic(t["n"], half_light_radius=re * math.sqrt(t["q"]), flux=1.0, gsparams=gsp)
        g = g.shear(q=t["q"], beta=(t["pa"] + 90) * galsim.degrees)
        im = galsim.ImageD(size, size, scale=1.0)
        # GalSim's image centre convention matches galprof's: pixel (1, 1) is the first pixel's centre
        galsim.Convolve(g, moffat, gsparams=gsp).drawImage(image=im, center=galsim.PositionD(t["x0"], t["y0"]))
        unit = im.array
        # flux giving the drawn S/N with sky noise only: S/N = flux sqrt(sum unit^2) / sky_sigma
        target = float(np.exp(rng.uniform(np.log(snr[0]), np.log(snr[1]))))
        flux = target * SKY_SIGMA / math.sqrt(float((unit ** 2).sum()))
        model = flux * unit
        sigma = np.sqrt(SKY_SIGMA ** 2 + np.clip(model, 0, None) / GAIN)
        t["flux"], t["mag"], t["snr"] = flux, -2.5 * math.log10(flux), target
        out.truths.append(t)
        out.images.append(model + rng.normal(0.0, 1.0, model.shape) * sigma)
        out.sigmas.append(sigma)
        s = out.starts
        s["x0"].append(t["x0"] + rng.uniform(-1.5, 1.5))
        s["y0"].append(t["y0"] + rng.uniform(-1.5, 1.5))
        s["mag"].append(t["mag"] + rng.uniform(-0.5, 0.5))
        s["re"].append(re * 1.5 ** rng.choice([-1.0, 1.0]))
        s["n"].append(2.0)
        s["q"].append(0.7)
        s["pa"].append(t["pa"] + rng.uniform(-20, 20))
    return out


def sersic_model(size: int = 64):
    """The single-Sérsic model fitted to these galaxies (its values are overridden by the starts)."""
    import galprof

    c = size / 2 + 0.5
    return galprof.load_model({"zeropoint": 0.0, "components": {"g": {
        "profile": "sersic", "x0": c, "y0": c, "mag": -5.0, "re": 4.0, "n": 2.0, "q": 0.7, "pa": 0.0}}})


def pulls(values, errors, truths, key: str) -> np.ndarray:
    """(fit - truth) / error, with PA differences wrapped to (-90, 90]."""
    truth = np.array([t[key] for t in truths])
    d = np.asarray(values) - truth
    if key == "pa":
        d = (d + 90.0) % 180.0 - 90.0
    return d / np.asarray(errors)


def robust_std(x) -> float:
    x = np.asarray(x)
    x = x[np.isfinite(x)]
    return float(1.4826 * np.median(np.abs(x - np.median(x))))
