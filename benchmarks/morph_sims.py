"""Simulated galaxy stamps for the morphology comparison with statmorph and its benchmark.

GalSim Sersic galaxies (n 0.5-5, half-light radius 1.5-10 px, axis ratio 0.2-1) convolved with
a Moffat PSF, with Poisson and read noise, rounded to integer ADU after subtracting the sky (as
sky-subtracted CCD data would be), some with a companion galaxy, star-forming knots, cosmic-ray
hits or a masked region. Segmentation maps come from photutils (threshold 1.5 sigma on the image
smoothed by a 3 px FWHM Gaussian, at least 10 pixels); the target is the segment at the centre.
GalSim and photutils are test/benchmark dependencies only.
"""

from __future__ import annotations

import numpy as np

GAIN = 2.0  # e-/ADU
SKY = 200.0  # ADU per pixel (subtracted)
READ_NOISE = 5.0  # e-


def make_stamp(rng: np.random.Generator, ny: int = 128, nx: int = 128):
    """One stamp: ``(image int16, segmap int16, label, mask bool or None, truth dict)``."""
    import galsim
    from astropy.convolution import Gaussian2DKernel, convolve
    from photutils.segmentation import detect_sources

    n = rng.uniform(0.5, 5.0)
    hlr = rng.uniform(1.5, min(10.0, 0.09 * min(ny, nx)))
    q = rng.uniform(0.2, 1.0)
    beta = rng.uniform(0, 180)
    flux = 10 ** rng.uniform(3.5, 5.3)
    psf = galsim.Moffat(beta=3.5, fwhm=rng.uniform(2.0, 3.5))
    gal = galsim.Sersic(n=n, half_light_radius=hlr).shear(q=q, beta=beta * galsim.degrees).withFlux(flux)
    parts = [gal]
    kind = rng.choice(["plain", "companion", "knots", "cosmic", "masked"], p=[0.35, 0.25, 0.2, 0.1, 0.1])
    if kind == "companion":
        ang = rng.uniform(0, 2 * np.pi)
        d = rng.uniform(0.22, 0.38) * min(ny, nx)
        comp = galsim.Sersic(n=rng.uniform(0.7, 3), half_light_radius=rng.uniform(1.5, 5)).withFlux(
            flux * rng.uniform(0.1, 0.6)).shift(d * np.cos(ang), d * np.sin(ang))
        parts.append(comp)
    if kind == "knots":
        for _ in range(rng.integers(2, 6)):
            r = rng.uniform(0.5, 2.0) * hlr
            ang = rng.uniform(0, 2 * np.pi)
            parts.append(galsim.Gaussian(sigma=rng.uniform(0.5, 1.2)).withFlux(flux * rng.uniform(0.01, 0.05))
                         .shift(r * np.cos(ang), r * np.sin(ang)))
    obj = galsim.Convolve(galsim.Add(parts), psf)
    off = rng.uniform(-1.5, 1.5, 2)
    img = obj.drawImage(nx=nx, ny=ny, scale=1.0, offset=off).array.astype(np.float64)
    electrons = rng.poisson(np.clip((img + SKY) * GAIN, 0, None)) + rng.normal(0, READ_NOISE, img.shape)
    adu = np.round(electrons / GAIN - SKY)
    mask = None
    if kind == "cosmic":
        for _ in range(rng.integers(2, 6)):
            y, x = rng.integers(0, ny), rng.integers(0, nx)
            adu[y, x] += rng.uniform(300, 3000)
    if kind == "masked":
        mask = np.zeros((ny, nx), dtype=bool)
        y, x = rng.integers(0, ny - 12), rng.integers(0, nx - 12)
        mask[y:y + rng.integers(4, 12), x:x + rng.integers(4, 12)] = True
    sigma_sky = np.sqrt(SKY * GAIN + READ_NOISE ** 2) / GAIN
    smooth = convolve(adu, Gaussian2DKernel(3.0 / 2.3548, x_size=7, y_size=7))
    seg = detect_sources(smooth, 1.5 * sigma_sky / 2.0, 10)  # at least 10 connected pixels
    segmap = np.zeros((ny, nx), dtype=np.int16) if seg is None else seg.data.astype(np.int16)
    label = int(segmap[ny // 2, nx // 2])
    truth = dict(n=n, hlr=hlr, q=q, beta=beta, flux=flux, kind=str(kind))
    return adu.astype(np.int16), segmap, label, mask, truth


def make_stamps(count: int, seed: int = 2024, sizes: tuple[int, ...] | None = None):
    """``count`` stamps with a detected target (stamps without one are redrawn). ``sizes``:
    possible sides (rows and columns drawn independently); default 128 x 128."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        ny = nx = 128
        if sizes:
            ny, nx = int(rng.choice(sizes)), int(rng.choice(sizes))
        img, seg, label, mask, truth = make_stamp(rng, ny, nx)
        if label > 0:
            out.append((img, seg, label, mask, truth))
    return out
