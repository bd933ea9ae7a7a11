"""The fixed grid the networks see: every stamp is brought to ``GRID x GRID`` pixels around the
target (padded to ``GRID f`` pixels, ``f = ceil(side / GRID)``, then averaged over ``f x f``
blocks), and normalised by its noise.

Frames. The *canvas* is the ``N = GRID f`` square of stamp pixels whose centre is within half
a pixel of the target's nominal position; canvas pixel ``i`` (0-based) is stamp pixel
``i + offset``. Grid pixel ``k`` averages canvas pixels ``k f .. k f + f - 1``, so a FITS
coordinate ``X`` on the canvas is ``(X - 0.5) / f + 0.5`` on the grid. Stamp pixels outside
the stamp, masked or with a non-positive or non-finite sigma are left out of the averages; a
grid pixel with none left is invalid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DataError

__all__ = ["GRID", "Gridded", "to_grid", "stack", "network_input", "psf_fwhm", "grid_to_stamp", "stamp_to_grid"]

GRID = 64


@dataclass
class Gridded:
    """One stamp on the grid (numpy, float64): ``image``, ``sigma`` (0 where invalid),
    ``frac`` (fraction of the block's pixels used), ``factor`` f, ``offset`` (ox, oy): canvas
    pixel 0 is stamp pixel ``offset`` (0-based), ``shape`` of the stamp."""

    image: np.ndarray
    sigma: np.ndarray
    frac: np.ndarray
    factor: int
    offset: tuple[int, int]
    shape: tuple[int, int]


def to_grid(image: np.ndarray, sigma: np.ndarray, mask: np.ndarray | None = None,
            position: tuple[float, float] | None = None, *, grid: int = GRID) -> Gridded:
    """A stamp on the grid around ``position`` (FITS pixels; default the stamp centre)."""
    image = np.asarray(image, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if image.ndim != 2 or sigma.shape != image.shape:
        raise DataError(f"image {image.shape} and sigma {sigma.shape} must be 2-D of one shape")
    ny, nx = image.shape
    if position is None:
        position = ((nx + 1) / 2.0, (ny + 1) / 2.0)
    f = max(1, math.ceil(max(ny, nx) / grid))
    n = grid * f
    ox = int(round(position[0] - (n + 1) / 2.0))
    oy = int(round(position[1] - (n + 1) / 2.0))
    ok = np.isfinite(image) & np.isfinite(sigma) & (sigma > 0)
    if mask is not None:
        ok &= ~np.asarray(mask, dtype=bool)
    canvas_i = np.zeros((n, n))
    canvas_v = np.zeros((n, n))
    canvas_k = np.zeros((n, n))
    ys, xs = slice(max(0, oy), min(ny, oy + n)), slice(max(0, ox), min(nx, ox + n))
    yd, xd = slice(ys.start - oy, ys.stop - oy), slice(xs.start - ox, xs.stop - ox)
    if ys.stop > ys.start and xs.stop > xs.start:
        k = ok[ys, xs]
        canvas_k[yd, xd] = k
        canvas_i[yd, xd] = np.where(k, image[ys, xs], 0.0)
        canvas_v[yd, xd] = np.where(k, sigma[ys, xs] ** 2, 0.0)

    def block(a):
        return a.reshape(grid, f, grid, f).sum(axis=(1, 3))

    cnt = block(canvas_k)
    with np.errstate(invalid="ignore", divide="ignore"):
        img = np.where(cnt > 0, block(canvas_i) / cnt, 0.0)
        sig = np.where(cnt > 0, np.sqrt(block(canvas_v)) / cnt, 0.0)
    return Gridded(image=img, sigma=sig, frac=cnt / (f * f), factor=f, offset=(ox, oy), shape=(ny, nx))


def stamp_to_grid(x, y, g: Gridded):
    """Stamp FITS coordinates -> grid FITS coordinates."""
    f = g.factor
    return (x - g.offset[0] - 0.5) / f + 0.5, (y - g.offset[1] - 0.5) / f + 0.5


def grid_to_stamp(xg, yg, factor, offset):
    """Grid FITS coordinates -> stamp FITS coordinates."""
    return (xg - 0.5) * factor + 0.5 + offset[0], (yg - 0.5) * factor + 0.5 + offset[1]


def stack(items: list[Gridded], *, dtype=torch.float32, device="cpu"):
    """``(image, sigma, frac)`` tensors ``(B, GRID, GRID)`` of gridded stamps."""
    def t(name):
        return torch.as_tensor(np.stack([getattr(g, name) for g in items]), dtype=dtype, device=device)
    return t("image"), t("sigma"), t("frac")


def noise_scale(sigma: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
    """Per stamp: the median sigma of the valid grid pixels (B,)."""
    valid = frac > 0
    s = torch.where(valid, sigma, torch.full_like(sigma, float("nan"))).flatten(1)
    s0 = torch.nanmedian(s, dim=1).values
    return torch.where(torch.isfinite(s0) & (s0 > 0), s0, torch.ones_like(s0))


def network_input(image: torch.Tensor, sigma: torch.Tensor, frac: torch.Tensor, fwhm: torch.Tensor):
    """The networks' input: ``x`` (B, 3, G, G) and ``scalars`` (B, 1), and the noise scale
    ``s0`` (B,). Channels: ``asinh(image / s0) / 3`` (0 where invalid), the fraction of used
    pixels, ``log(sigma / s0)`` clipped to [-3, 3] (0 where invalid); scalar: the PSF FWHM in grid
    pixels over 4."""
    s0 = noise_scale(sigma, frac)
    valid = frac > 0
    sc = s0[:, None, None]
    x0 = torch.where(valid, torch.asinh(image / sc) / 3.0, torch.zeros_like(image))
    x2 = torch.where(valid, torch.log(torch.clamp(sigma, min=1e-30) / sc).clamp(-3, 3), torch.zeros_like(image))
    x = torch.stack([x0, frac, x2], dim=1)
    return x, (fwhm / 4.0)[:, None].to(image.dtype), s0


def psf_fwhm(psf: np.ndarray | None) -> float:
    """FWHM (pixels) of a PSF image: the diameter of the circle whose area is that of the region
    above half the peak, measured on the image interpolated 4 times finer (bilinear). NaN for
    no PSF."""
    if psf is None:
        return math.nan
    p = torch.as_tensor(np.asarray(psf, dtype=np.float64))[None, None]
    if p.ndim != 4 or not torch.isfinite(p).all() or not float(p.max()) > 0:
        return math.nan
    fine = torch.nn.functional.interpolate(p, scale_factor=4, mode="bilinear", align_corners=False)[0, 0]
    area = float((fine >= 0.5 * float(fine.max())).sum()) / 16.0
    return 2.0 * math.sqrt(area / math.pi)
