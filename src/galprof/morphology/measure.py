"""Non-parametric morphology of batches of stamps: the driver.

Data flow: host arrays -> per-stamp cutouts and masks (NumPy, :func:`prepare_stamps`) -> padded
canvases on the device -> batched statistics (torch) -> one astropy Table row per stamp.
The definitions, and every difference from statmorph, are in docs/morphology.md.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from astropy.table import Table

from .asymmetry import AsymmetryFunction
from .flags import BAD, MorphFlag
from .geometry import aperture_weights
from .kernels import (
    SortedRanges,
    connected_component,
    gaussian_filter,
    nelder_mead,
    sort_values,
    uniform_filter,
)
from .radial import RadialProfile, fraction_radius, petrosian_radius

log = logging.getLogger("galprof")

__all__ = ["MorphologyOptions", "measure_morphology", "COLUMNS"]


@dataclass
class MorphologyOptions:
    """Settings of the measurements (statmorph's names and defaults).

    Attributes
    ----------
    cutout_extent : size of the working cutout relative to the bounding box of the segment (>= 1)
    min_cutout_size : smallest cutout side (pixels; rounded down to even)
    n_sigma_outlier : pixels deviating from the mean of their 8 neighbours by more than this many
        standard deviations of the neighbours are masked (<= 0: off)
    annulus_width : width of the annuli of the Petrosian ratio (pixels)
    eta : Petrosian ratio that defines the Petrosian radius
    petro_fraction_gini : smoothing scale of the Gini segmentation, in elliptical Petrosian radii
    skybox_size : side of the sky box (pixels; halved until a clean box is found, down to 2)
    petro_extent_cas : radius of the asymmetry and concentration apertures, in circular Petrosian radii
    petro_fraction_cas : inner radius of the smoothness annulus and width of its boxcar, in
        circular Petrosian radii
    petro_extent_flux : radius of the flux apertures, in Petrosian radii
    boxcar_size_shape_asym : boxcar of the shape-asymmetry segmentation (pixels)
    asym_xtol, asym_ftol : stopping tolerances of the asymmetry-centre simplex (pixels; asymmetry)
    root_xtol : absolute tolerance of the radii (pixels)
    chunk : stamps per asymmetry-centre search (sorted by aperture size)
    mid : also the MID statistics (``multimode``, ``intensity``, ``deviation``; one stamp at a time
        on the CPU, needs SciPy and scikit-image; :mod:`galprof.morphology.mid`)
    boxcar_size_mid, niter_bh_mid, sigma_mid : statmorph's MID settings (boxcar of the MID
        segmentation, basin-hopping hops of the multimode, Gaussian smoothing of the intensity)
    segmap_overlap_ratio : Gini and MID segmentations overlapping by less than this (of the larger)
        make the measurement suspect (with ``mid`` only)
    cpu_fast_path : on CPU in float64, search the asymmetry centres one stamp at a time in NumPy
        (:mod:`galprof.morphology.asymmetry_cpu`; same results to rounding, several times faster
        than the batched tensor code there); False: the batched code everywhere
    """

    cutout_extent: float = 2.5
    min_cutout_size: int = 48
    n_sigma_outlier: float = 10.0
    annulus_width: float = 1.0
    eta: float = 0.2
    petro_fraction_gini: float = 0.2
    skybox_size: int = 32
    petro_extent_cas: float = 1.5
    petro_fraction_cas: float = 0.25
    petro_extent_flux: float = 2.0
    boxcar_size_shape_asym: float = 3.0
    asym_xtol: float = 1e-6
    asym_ftol: float = 1e-4
    root_xtol: float = 1e-6
    chunk: int = 16
    cpu_fast_path: bool = True
    mid: bool = False
    boxcar_size_mid: float = 3.0
    niter_bh_mid: int = 5
    sigma_mid: float = 1.0
    segmap_overlap_ratio: float = 0.25


#: output columns (after ``id``), in order, with units
COLUMNS: dict[str, str] = {
    "xc_centroid": "pix", "yc_centroid": "pix", "ellipticity_centroid": "", "elongation_centroid": "",
    "pa_centroid": "deg",
    "xc_asymmetry": "pix", "yc_asymmetry": "pix", "ellipticity_asymmetry": "", "elongation_asymmetry": "",
    "pa_asymmetry": "deg",
    "flux_circ": "", "flux_ellip": "", "rpetro_circ": "pix", "rpetro_ellip": "pix", "rmax_circ": "pix",
    "rmax_ellip": "pix", "rhalf_circ": "pix", "rhalf_ellip": "pix", "r20": "pix", "r50": "pix", "r80": "pix",
    "gini": "", "m20": "", "gini_m20_bulge": "", "gini_m20_merger": "", "sn_per_pixel": "",
    "concentration": "", "asymmetry": "", "smoothness": "", "rms_asymmetry2": "", "outer_asymmetry": "",
    "shape_asymmetry": "", "sky_mean": "", "sky_median": "", "sky_sigma": "",
}
#: columns added with ``MorphologyOptions(mid=True)``
MID_COLUMNS: dict[str, str] = {"multimode": "", "intensity": "", "deviation": ""}


def output_columns(options: MorphologyOptions | None = None) -> dict[str, str]:
    """The statistics' columns (with units) that ``options`` give: :data:`COLUMNS`, and
    :data:`MID_COLUMNS` with ``mid=True``."""
    return {**COLUMNS, **MID_COLUMNS} if options is not None and options.mid else COLUMNS


# ============================================================================================
# host side: cutouts and masks
# ============================================================================================

@dataclass
class _Stamp:
    image: np.ndarray            # cutout with masked pixels set to 0 (float64)
    mask: np.ndarray             # statmorph's _mask_stamp (bool)
    target: np.ndarray           # pixels of the target segment
    segany: np.ndarray           # pixels of any segment (for the sky box)
    usermask: np.ndarray         # the user's mask (for the sky box)
    raw: np.ndarray              # cutout of the input image (for the gain weight map)
    weight: np.ndarray | None    # cutout of the sigma image
    x0: int = 0                  # cutout origin in the input stamp (0-based columns)
    y0: int = 0
    flag: int = 0
    notes: list[str] = field(default_factory=list)


def _outliers(image: np.ndarray, nsigma: float) -> np.ndarray:
    """statmorph's bad-pixel test: |x - mean of the 8 neighbours| > nsigma * their std
    (edge pixels replicated outwards, non-finite values counted as 0)."""
    x = np.where(np.isfinite(image), image, 0.0)
    p = np.pad(x, 1, mode="edge")
    p2 = p * p
    ny, nx = x.shape
    s1 = np.zeros_like(x)
    s2 = np.zeros_like(x)
    for dy in range(3):
        for dx in range(3):
            if dy == 1 and dx == 1:
                continue
            s1 += p[dy:dy + ny, dx:dx + nx]
            s2 += p2[dy:dy + ny, dx:dx + nx]
    mean = s1 / 8.0
    with np.errstate(invalid="ignore"):
        std = np.sqrt(s2 / 8.0 - mean * mean)
        return np.abs(image - mean) > nsigma * std


def prepare_stamp(image: np.ndarray, segmap: np.ndarray, label: int, mask: np.ndarray | None,
                  sigma: np.ndarray | None, opts: MorphologyOptions) -> _Stamp:
    """Cut the working stamp around segment ``label`` as statmorph does (``cutout_extent``
    times the bounding box, at least ``min_cutout_size``) and build its masks."""
    image = np.asarray(image, dtype=np.float64)
    segmap = np.asarray(segmap)
    sel = segmap == label
    rows = np.flatnonzero(sel.any(1))
    cols = np.flatnonzero(sel.any(0))
    if rows.size == 0:
        raise ValueError(f"segment label {label} is not in the segmentation map")
    ymin, ymax, xmin, xmax = rows[0], rows[-1], cols[0], cols[-1]
    dx, dy = xmax + 1 - xmin, ymax + 1 - ymin
    xc, yc = xmin + dx // 2, ymin + dy // 2
    dist = int(max(dx, dy) * opts.cutout_extent / 2.0)
    dist = max(dist, (opts.min_cutout_size - opts.min_cutout_size % 2) // 2)
    ny, nx = image.shape
    ys = slice(max(0, yc - dist), min(ny, yc + dist))
    xs = slice(max(0, xc - dist), min(nx, xc + dist))
    img = image[ys, xs]
    seg = segmap[ys, xs]
    m = (seg != 0) & (seg != label)
    um = np.zeros(img.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)[ys, xs]
    m |= um
    m |= ~np.isfinite(img)
    w = None
    if sigma is not None:
        w = np.asarray(sigma, dtype=np.float64)[ys, xs]
        m |= ~np.isfinite(w)
    if opts.n_sigma_outlier > 0:
        m |= _outliers(img, opts.n_sigma_outlier)
    return _Stamp(image=np.where(m, 0.0, img), mask=m, target=seg == label, segany=seg != 0, usermask=um,
                  raw=img, weight=w, x0=xs.start, y0=ys.start)


# ============================================================================================
# device side: the batch
# ============================================================================================

class _Batch:
    """Padded canvases of a list of prepared stamps."""

    def __init__(self, stamps: list[_Stamp], device, dtype):
        b = len(stamps)
        self.b = b
        h = max(s.image.shape[0] for s in stamps)
        w = max(s.image.shape[1] for s in stamps)
        self.h, self.w = h, w

        def canvas(attr, fill, np_dtype):
            out = np.full((b, h, w), fill, dtype=np_dtype)
            for i, s in enumerate(stamps):
                a = getattr(s, attr)
                out[i, :a.shape[0], :a.shape[1]] = a
            return out

        t = lambda a, dt=dtype: torch.as_tensor(a, device=device, dtype=dt)  # noqa: E731
        self.img = t(canvas("image", 0.0, np.float64))
        self.mask = t(canvas("mask", False, bool), torch.bool)
        self.target = t(canvas("target", False, bool), torch.bool)
        self.segany = t(canvas("segany", True, bool), torch.bool)
        self.usermask = t(canvas("usermask", True, bool), torch.bool)
        raw = canvas("raw", 0.0, np.float64)
        self.raw = t(np.where(np.isfinite(raw), raw, 0.0))
        self.has_weight = all(s.weight is not None for s in stamps)
        if self.has_weight:
            wgt = canvas("weight", 0.0, np.float64)
            self.weight = t(np.where(np.isfinite(wgt), wgt, 0.0))
        self.ny = torch.as_tensor([s.image.shape[0] for s in stamps], device=device)
        self.nx = torch.as_tensor([s.image.shape[1] for s in stamps], device=device)
        yy = torch.arange(h, device=device).view(1, h, 1)
        xx = torch.arange(w, device=device).view(1, 1, w)
        self.inside = (yy < self.ny.view(b, 1, 1)) & (xx < self.nx.view(b, 1, 1))
        self.x = xx.to(dtype)
        self.y = yy.to(dtype)
        self.flag = torch.as_tensor([s.flag for s in stamps], device=device, dtype=torch.long)
        self.dtype, self.device = dtype, device


def _set(flag: torch.Tensor, where: torch.Tensor, bit: MorphFlag) -> torch.Tensor:
    return flag | torch.where(where, torch.full_like(flag, int(bit)), torch.zeros_like(flag))


def _moments(img: torch.Tensor, x: torch.Tensor, y: torch.Tensor, xc: torch.Tensor, yc: torch.Tensor):
    """Second central moments (x2, xy, y2) of ``img`` about (xc, yc), normalised by its sum."""
    dx = x - xc.view(-1, 1, 1)
    dy = y - yc.view(-1, 1, 1)
    m0 = img.sum((1, 2))
    m0s = torch.where(m0 != 0, m0, torch.ones_like(m0))
    return (img * dx * dx).sum((1, 2)) / m0s, (img * dx * dy).sum((1, 2)) / m0s, (img * dy * dy).sum((1, 2)) / m0s


def _shape(x2, xy, y2):
    """statmorph's regularised covariance -> ellipticity, elongation, orientation (radians)."""
    rho = 1.0 / 12.0
    bad = (x2 <= 0) | (y2 <= 0)
    for it in range(200):
        small = (x2 * y2 - xy * xy).abs() < rho * rho
        if it % 8 == 0 and not bool(small.any()):  # nothing left to regularise (a host read every 8 rounds)
            break
        x2 = torch.where(small, x2 + torch.where(x2 >= 0, rho, -rho), x2)
        y2 = torch.where(small, y2 + torch.where(y2 >= 0, rho, -rho), y2)
    half = 0.5 * (x2 + y2)
    root = torch.sqrt(0.25 * (x2 - y2) ** 2 + xy * xy)
    e1, e2 = (half + root).abs(), (half - root).abs()
    big, small = torch.maximum(e1, e2), torch.minimum(e1, e2)
    a, b = torch.sqrt(big), torch.sqrt(small)
    theta = 0.5 * torch.atan2(2.0 * xy, x2 - y2)
    return 1.0 - b / a, a / b, theta, bad


def _first_true(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat index of the first True of each row of (B, N), and whether there is one."""
    anyt = mask.any(1)
    return mask.to(torch.int8).argmax(1), anyt


def _skybox(bt: _Batch, size0: int):
    """statmorph's sky box: the first (row-major) square of side 32, 16, ... 2 pixels that holds no
    segment and no user-masked pixel; start positions ``0 <= i < ny - s``, ``0 <= j < nx - s``."""
    b, h, w = bt.b, bt.h, bt.w
    bad = (bt.segany | bt.usermask | ~bt.inside).to(bt.dtype)
    c = torch.zeros(b, h + 1, w + 1, dtype=bt.dtype, device=bt.device)
    c[:, 1:, 1:] = bad.cumsum(1).cumsum(2)
    found = torch.zeros(b, dtype=torch.bool, device=bt.device)
    size = torch.zeros(b, dtype=torch.long, device=bt.device)
    i0 = torch.zeros(b, dtype=torch.long, device=bt.device)
    j0 = torch.zeros(b, dtype=torch.long, device=bt.device)
    s = int(size0)
    while True:
        if s <= h and s <= w:
            box = c[:, s:, s:] - c[:, :-s, s:] - c[:, s:, :-s] + c[:, :-s, :-s]  # (B, h-s+1, w-s+1)
            hh, ww = box.shape[1:]
            ii = torch.arange(hh, device=bt.device).view(1, hh, 1)
            jj = torch.arange(ww, device=bt.device).view(1, 1, ww)
            ok = (box == 0) & (ii < (bt.ny - s).view(b, 1, 1)) & (jj < (bt.nx - s).view(b, 1, 1))
            first, anyok = _first_true(ok.reshape(b, -1))
            new = ~found & anyok
            size = torch.where(new, torch.full_like(size, s), size)
            i0 = torch.where(new, first // ww, i0)
            j0 = torch.where(new, first % ww, j0)
            found = found | anyok
        if s <= 2 or bool(found.all()):  # smaller boxes only for stamps without one
            break
        s //= 2
    return found, size, i0, j0


def _box_values(img: torch.Tensor, found, size, i0, j0, smax: int):
    """(B, smax, smax) sky boxes (zero beyond each box's size) and their validity."""
    b, h, w = img.shape
    r = torch.arange(smax, device=img.device)
    rr = (i0.view(b, 1, 1) + r.view(1, smax, 1)).clamp(0, h - 1)
    cc = (j0.view(b, 1, 1) + r.view(1, 1, smax)).clamp(0, w - 1)
    vals = img.reshape(b, -1).gather(1, (rr * w + cc).reshape(b, -1)).view(b, smax, smax)
    valid = (r.view(1, smax, 1) < size.view(b, 1, 1)) & (r.view(1, 1, smax) < size.view(b, 1, 1)) & found.view(b, 1, 1)
    return torch.where(valid, vals, torch.zeros_like(vals)), valid


def _sorted_masked(values: torch.Tensor, keep: torch.Tensor):
    """Sort each row of (B, N) keeping only ``keep`` (others to +inf); returns (sorted, count)."""
    v = torch.where(keep, values, torch.full_like(values, float("inf")))
    return sort_values(v), keep.sum(1)


def _mode_clip_threshold(values: torch.Tensor, n: torch.Tensor):
    """statmorph's shape-asymmetry threshold: sigma-clipped statistics (3 sigma, to convergence)
    with photutils' mode estimator (2.5 median - 1.5 mean of the 3-sigma, 10-iteration clipped
    data) as centre; returns mode + std of the final data, mode = 2.5 median - 1.5 mean."""
    sr = SortedRanges(values, n)

    def median_center(lo, hi):
        return sr.stats(lo, hi)[1]

    def mode_center(lo, hi):
        lo2, hi2 = sr.clip(median_center, 3.0, 10, lo, hi)
        mean, med, _ = sr.stats(lo2, hi2)
        return 2.5 * med - 1.5 * mean

    lo, hi = sr.clip(mode_center, 3.0, 10_000)
    mean, med, std = sr.stats(lo, hi)
    return 2.5 * med - 1.5 * mean + std


# ============================================================================================
# the measurements
# ============================================================================================

class _Clock:
    """CPU time per stage (logged at DEBUG level)."""

    def __init__(self):
        self.t = time.process_time()
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        now = time.process_time()
        self.times[name] = self.times.get(name, 0.0) + now - self.t
        self.t = now


def _measure_batch(bt: _Batch, opts: MorphologyOptions, gain: float | None) -> dict[str, torch.Tensor]:
    dt, dev, b = bt.dtype, bt.device, bt.b
    clock = _Clock()
    out: dict[str, torch.Tensor] = {}
    nan = lambda: torch.full((b,), float("nan"), dtype=dt, device=dev)  # noqa: E731
    flag = bt.flag.clone()
    img, mask, inside = bt.img, bt.mask, bt.inside
    x, y = bt.x, bt.y
    nyf, nxf = bt.ny.to(dt), bt.nx.to(dt)
    valid_area = (inside & ~mask).to(dt)

    # --- segment flux and centroid --------------------------------------------------------
    nobg = torch.where(bt.target & ~mask, img, torch.zeros_like(img))
    total = nobg.sum((1, 2))
    ok = (flag & int(MorphFlag.NO_DATA) == 0) & (total > 0)
    flag = _set(flag, ~ok & (flag & int(MorphFlag.NO_DATA) == 0), MorphFlag.NO_DATA)
    tot = torch.where(total > 0, total, torch.ones_like(total))
    xc = (nobg * x).sum((1, 2)) / tot
    yc = (nobg * y).sum((1, 2)) / tot
    out_range = (yc < 0) | (yc >= nyf) | (xc < 0) | (xc >= nxf)
    xc = torch.where(out_range, nxf / 2, xc)
    yc = torch.where(out_range, nyf / 2, yc)
    flag = _set(flag, ok & out_range, MorphFlag.CENTROID)
    flat = img.reshape(b, -1)
    w = bt.w
    cidx = (yc.floor().long().clamp(0, bt.h - 1) * w + xc.floor().long().clamp(0, w - 1))
    flag = _set(flag, ok & (flat.gather(1, cidx[:, None]).squeeze(1) == 0), MorphFlag.CENTROID)
    bright = torch.where(bt.inside, nobg, torch.full_like(nobg, -float("inf"))).reshape(b, -1).argmax(1)
    xb, yb = (bright % w).to(dt), (bright // w).to(dt)
    e_c, el_c, th_c, badmom_c = _shape(*_moments(nobg, x, y, xc, yc))
    flag = _set(flag, ok & badmom_c, MorphFlag.NONPOSITIVE)  # statmorph: bad, as about the asymmetry centre

    clock("centroid")
    # --- sky box ----------------------------------------------------------------------------
    sky_ok, sky_size, si0, sj0 = _skybox(bt, opts.skybox_size)
    flag = _set(flag, ok & ~sky_ok, MorphFlag.NO_SKYBOX)
    smax = max(2, int(opts.skybox_size))
    bkg, bkg_valid = _box_values(img, sky_ok, sky_size, si0, sj0, smax)
    npx = (sky_size * sky_size).to(dt).clamp_min(1)
    sky_mean = torch.where(sky_ok, bkg.sum((1, 2)) / npx, nan())
    sky_sorted, _ = _sorted_masked(bkg.reshape(b, -1), bkg_valid.reshape(b, -1))
    m = (sky_size * sky_size).clamp_min(1)
    med = 0.5 * (sky_sorted.gather(1, ((m - 1) // 2)[:, None]) + sky_sorted.gather(1, (m // 2)[:, None])).squeeze(1)
    sky_median = torch.where(sky_ok, med, nan())
    dev_b = torch.where(bkg_valid, bkg - sky_mean.view(b, 1, 1), torch.zeros_like(bkg))
    sky_sigma = torch.where(sky_ok, torch.sqrt((dev_b * dev_b).sum((1, 2)) / npx), nan())
    # 180-degree rotation of each box within its own size
    r = torch.arange(smax, device=dev)
    rr = (sky_size.view(b, 1, 1) - 1 - r.view(1, smax, 1)).clamp(0, smax - 1)
    cc = (sky_size.view(b, 1, 1) - 1 - r.view(1, 1, smax)).clamp(0, smax - 1)
    bkg180 = bkg.reshape(b, -1).gather(1, (rr * smax + cc).reshape(b, -1)).view(b, smax, smax)
    sky_adiff = torch.where(bkg_valid, (bkg180 - bkg).abs(), torch.zeros_like(bkg)).sum((1, 2))
    sky_asym = torch.where(sky_ok, sky_adiff / npx, nan())
    flag = _set(flag, ok & ~(sky_mean.abs() <= sky_sigma), MorphFlag.SKY_NOT_SUBTRACTED)

    clock("skybox")
    # --- Petrosian radius about the centroid (sets the asymmetry aperture) -------------------
    diag = torch.sqrt(nxf * nxf + nyf * nyf)
    chans = torch.stack([img, valid_area], 1)
    prof_c = RadialProfile(chans, inside, xc, yc)
    rp_c, lim, zm = petrosian_radius(prof_c, diag, ok, opts.eta, opts.annulus_width, xtol=opts.root_xtol)
    flag = _set(flag, ok & (lim | zm), MorphFlag.PETROSIAN)
    del prof_c

    clock("rpetro_centroid")
    # --- asymmetry centre ------------------------------------------------------------------
    radius = opts.petro_extent_cas * rp_c
    cas_funs: dict = {}  # CPU path: each stamp's asymmetry function, reused for the RMS asymmetry
    xa, ya, a_val, flag = _asymmetry_center(bt, opts, ok, radius, sky_asym, xc, yc, xb, yb, rp_c, flag, cas_funs)
    aidx = ya.floor().long().clamp(0, bt.h - 1) * w + xa.floor().long().clamp(0, w - 1)
    flag = _set(flag, ok & (flat.gather(1, aidx[:, None]).squeeze(1) == 0), MorphFlag.ASYM_CENTROID)
    e_a, el_a, th_a, badmom = _shape(*_moments(nobg, x, y, xa, ya))
    flag = _set(flag, ok & badmom, MorphFlag.NONPOSITIVE)

    clock("asymmetry_centre")
    # --- Petrosian radii about the asymmetry centre -------------------------------------------
    prof = RadialProfile(chans, inside, xa, ya)
    rpc, lim, zm = petrosian_radius(prof, diag, ok, opts.eta, opts.annulus_width, xtol=opts.root_xtol)
    flag = _set(flag, ok & (lim | zm), MorphFlag.PETROSIAN)
    prof_e = RadialProfile(chans, inside, xa, ya, el_a, th_a)
    rpe, lim, zm = petrosian_radius(prof_e, diag * el_a, ok, opts.eta, opts.annulus_width, xtol=opts.root_xtol)
    flag = _set(flag, ok & (lim | zm), MorphFlag.PETROSIAN)
    ext = opts.petro_extent_flux
    flux_circ = prof.sums((ext * rpc)[:, None])[:, 0, 0].abs()
    flux_ellip = prof_e.sums((ext * rpe)[:, None])[:, 0, 0].abs()

    clock("rpetro")
    # --- concentration ------------------------------------------------------------------------
    r_cas = opts.petro_extent_cas * rpc
    radii, zt, neg = fraction_radius(prof, r_cas, [0.2, 0.5, 0.8], ok, xtol=opts.root_xtol)
    flag = _set(flag, ok & (zt | neg), MorphFlag.NONPOSITIVE)
    radii = torch.where(radii > 0, radii, torch.full_like(radii, float("nan")))
    r20, r50, r80 = radii.unbind(1)
    conc = 5.0 * torch.log10(r80 / r20)

    clock("concentration")
    # --- smoothness ---------------------------------------------------------------------------
    box = torch.floor(opts.petro_fraction_cas * rpc).nan_to_num(0.0).long().clamp_min(0)
    box = torch.where(ok, box, torch.zeros_like(box))
    smooth = uniform_filter(img, box, bt.ny, bt.nx)
    diffimg = torch.where(inside, (img - smooth).clamp_min(0.0), torch.zeros_like(img))
    k = prof.add_channel(diffimg)
    r_in, r_out = opts.petro_fraction_cas * rpc, opts.petro_extent_cas * rpc
    s = prof.sums(torch.stack([r_in, r_out], 1))
    ap_flux = s[:, 0, 1] - s[:, 0, 0]
    ap_diff = s[:, k, 1] - s[:, k, 0]
    area = math.pi * (r_out * r_out - r_in * r_in)
    sky_box_size = torch.where(sky_ok, sky_size, torch.ones_like(sky_size))
    bsmooth = uniform_filter(bkg, box, sky_box_size, sky_box_size)
    bdiff = torch.where(bkg_valid, (bkg - bsmooth).clamp_min(0.0), torch.zeros_like(bkg))
    sky_smooth = torch.where(sky_ok, bdiff.sum((1, 2)) / npx, nan())
    smooth_val = torch.where(sky_ok, (ap_diff - area * sky_smooth) / ap_flux, ap_diff / ap_flux)
    bad_s = ok & ((ap_flux <= 0) | ~torch.isfinite(smooth_val))
    flag = _set(flag, bad_s, MorphFlag.NONPOSITIVE)
    smooth_val = torch.where(bad_s, nan(), smooth_val)

    clock("smoothness")
    # --- shape-asymmetry segmentation, rmax, rhalf ---------------------------------------------
    dxa = x - xa.view(b, 1, 1)
    dya = y - ya.view(b, 1, 1)
    dist = torch.sqrt(dxa * dxa + dya * dya)
    ann = (dist >= ext * rpe.view(b, 1, 1)) & (dist < 2 * ext * rpe.view(b, 1, 1))
    use = inside & ann & ~mask
    few = use.sum((1, 2)) < opts.skybox_size ** 2
    in_box = torch.zeros_like(inside)
    rr_ = (y >= si0.view(b, 1, 1).to(dt)) & (y < (si0 + sky_size).view(b, 1, 1).to(dt))
    cc_ = (x >= sj0.view(b, 1, 1).to(dt)) & (x < (sj0 + sky_size).view(b, 1, 1).to(dt))
    in_box = rr_ & cc_ & sky_ok.view(b, 1, 1)
    use = torch.where(few.view(b, 1, 1), in_box, use)
    undefined = few & ~sky_ok
    vals, nvals = _sorted_masked(img.reshape(b, -1), use.reshape(b, -1))
    thresh = _mode_clip_threshold(vals, nvals)
    sm3 = uniform_filter(img, torch.full((b,), int(opts.boxcar_size_shape_asym), device=dev), bt.ny, bt.nx)
    sm3 = torch.where(inside, sm3, torch.full_like(sm3, -float("inf")))
    above = sm3 >= thresh.view(b, 1, 1)
    top = sm3.reshape(b, -1).argmax(1)
    top_in = above.reshape(b, -1).gather(1, top[:, None]).squeeze(1)
    flag = _set(flag, ok & ~top_in & ~undefined, MorphFlag.SHAPE_SEGMAP)
    above = above.reshape(b, -1).scatter(1, top[:, None], True).view(b, bt.h, bt.w)
    seg_shape = connected_component(above, top)
    seg_shape = torch.where(undefined.view(b, 1, 1), bt.target & ~mask, seg_shape)
    flag = _set(flag, ok & undefined, MorphFlag.SHAPE_SEGMAP)
    ninf = torch.full_like(dist, -float("inf"))
    rmax_circ = torch.where(seg_shape, dist, ninf).amax((1, 2))
    cs, sn = torch.cos(th_a).view(b, 1, 1), torch.sin(th_a).view(b, 1, 1)
    xp = dxa * cs + dya * sn
    yp = -dxa * sn + dya * cs
    rell = torch.sqrt(xp * xp + (yp * el_a.view(b, 1, 1)) ** 2)
    rmax_ellip = torch.where(seg_shape, rell, ninf).amax((1, 2))
    rmax_circ = torch.where(torch.isfinite(rmax_circ), rmax_circ, nan())
    rmax_ellip = torch.where(torch.isfinite(rmax_ellip), rmax_ellip, nan())
    pos_c = ok & (rmax_circ > 0)
    rh, zt, neg = fraction_radius(prof, rmax_circ, [0.5], pos_c, xtol=opts.root_xtol)
    rhalf_circ = torch.where(pos_c, rh[:, 0], torch.where(rmax_circ == 0, torch.zeros_like(rmax_circ), nan()))
    pos_e = ok & (rmax_ellip > 0)
    rh, zt2, neg2 = fraction_radius(prof_e, rmax_ellip, [0.5], pos_e, xtol=opts.root_xtol)
    rhalf_ellip = torch.where(pos_e, rh[:, 0], torch.where(rmax_ellip == 0, torch.zeros_like(rmax_ellip), nan()))
    flag = _set(flag, ok & (zt | neg | zt2 | neg2), MorphFlag.NONPOSITIVE)
    flag = _set(flag, ok & ~(rmax_circ > 0), MorphFlag.SHAPE_SEGMAP)
    del prof, prof_e

    clock("shape_segmap_rhalf")
    # --- asymmetries in other apertures -------------------------------------------------------
    fast = opts.cpu_fast_path and torch.device(dev).type == "cpu" and dt == torch.float64
    shape_asym = _asymmetry_once("shape", ok & (rmax_circ > 0), seg_shape.to(dt), mask, bt, rmax_circ, xa, ya,
                                 fast=fast)
    outer_asym = _asymmetry_once("outer", ok & (rhalf_ellip > 0) & (rmax_ellip > 0), img, mask, bt, rmax_ellip, xa,
                                 ya, sky_asym, inner=rhalf_ellip, elongation=el_a, theta=th_a, fast=fast)
    rms_asym = _asymmetry_once("rms", ok, img, mask, bt, radius, xa, ya, sky_sigma, fast=fast, reuse=cas_funs)

    clock("other_asymmetries")
    # --- Gini segmentation, Gini, M20 ---------------------------------------------------------
    sig = (opts.petro_fraction_gini * rpe).nan_to_num(1.0).clamp_min(1e-3)
    gsm = gaussian_filter(img, sig)
    gsm = torch.where(inside, gsm, torch.zeros_like(gsm))
    a_in, a_out = rpe - 0.5 * opts.annulus_width, rpe + 0.5 * opts.annulus_width
    gdx, gdy = x - xc.view(b, 1, 1), y - yc.view(b, 1, 1)
    e3, c3, s3 = el_a.view(b, 1, 1), torch.cos(th_a).view(b, 1, 1), torch.sin(th_a).view(b, 1, 1)
    wann = (aperture_weights(gdx, gdy, a_out.view(b, 1, 1), e3, c3, s3)
            - aperture_weights(gdx, gdy, a_in.view(b, 1, 1), e3, c3, s3))
    ann_sum = (wann * gsm).sum((1, 2))
    b_out = a_out / el_a
    b_in = b_out * a_in / a_out
    gthresh = ann_sum / (math.pi * (a_out * b_out - a_in * b_in))
    above = (gsm >= gthresh.view(b, 1, 1)) & inside
    count = above.sum((1, 2))
    empty = count == 0
    full = count == (bt.ny * bt.nx)
    gtop = torch.where(inside, gsm, torch.full_like(gsm, -float("inf"))).reshape(b, -1).argmax(1)
    comp = connected_component(above, gtop)
    disjoint = ~empty & ~full & (comp.sum((1, 2)) != count)
    seg_gini = torch.where((empty | full).view(b, 1, 1), above, comp)
    flag = _set(flag, ok & (empty | full), MorphFlag.GINI_SEGMAP)
    flag = _set(flag, ok & disjoint, MorphFlag.GINI_DISJOINT)
    # Gini
    gv, gn = _sorted_masked(img.abs().reshape(b, -1), seg_gini.reshape(b, -1))
    n = gn.to(dt)
    ii = torch.arange(1, gv.shape[1] + 1, device=dev, dtype=dt)
    gvz = torch.where(torch.isfinite(gv), gv, torch.zeros_like(gv))
    gsum = gvz.sum(1)
    gini = ((2 * ii - n.view(b, 1) - 1) * gvz).sum(1) / ((n - 1) * gsum)
    bad_g = ok & ((gn <= 1) | (gsum == 0))
    gini = torch.where(bad_g, nan(), gini)
    flag = _set(flag, bad_g, MorphFlag.NONPOSITIVE)
    # M20
    gi = torch.where(seg_gini, img, torch.zeros_like(img))
    m00 = gi.sum((1, 2))
    m00s = torch.where(m00 != 0, m00, torch.ones_like(m00))
    gxc, gyc = (gi * x).sum((1, 2)) / m00s, (gi * y).sum((1, 2)) / m00s
    r2 = (x - gxc.view(b, 1, 1)) ** 2 + (y - gyc.view(b, 1, 1)) ** 2
    mtot = (gi * r2).sum((1, 2))
    sv = sort_values(gi.reshape(b, -1))
    frac = torch.cumsum(sv, 1) / m00s.view(b, 1)
    ge = frac >= 0.8
    first, anyge = _first_true(ge)
    thr20 = sv.gather(1, first[:, None]).squeeze(1)
    i20 = torch.where(gi >= thr20.view(b, 1, 1), gi, torch.zeros_like(gi))
    m20tot = (i20 * r2).sum((1, 2))
    bad_m = ok & ((m00 <= 0) | ~anyge | (m20tot <= 0) | (mtot <= 0) | (seg_gini.sum((1, 2)) == 0))
    m20 = torch.where(bad_m, nan(), torch.log10(m20tot / torch.where(mtot > 0, mtot, torch.ones_like(mtot))))
    flag = _set(flag, bad_m, MorphFlag.NONPOSITIVE)
    # signal-to-noise per pixel
    if bt.has_weight:
        wmap = bt.weight
    elif gain is not None:
        wmap = torch.sqrt(bt.raw.abs() / gain + sky_sigma.view(b, 1, 1) ** 2)
    else:
        wmap = None
    if wmap is not None:
        wmap = torch.where(mask | ~inside, torch.zeros_like(wmap), wmap).abs()
        locs = seg_gini & (img >= 0) & (wmap > 0)
        cnt = locs.sum((1, 2))
        snp = torch.where(locs, img / torch.where(wmap > 0, wmap, torch.ones_like(wmap)), torch.zeros_like(img))
        sn = torch.where(cnt > 0, snp.sum((1, 2)) / cnt.clamp_min(1), nan())
    else:
        sn = nan()

    clock("gini_m20")
    if opts.mid:
        out.update(_mid_batch(bt, ok, nobg, bt.target & ~mask, seg_gini, opts, flag))
        clock("mid")
    deg = 180.0 / math.pi
    out.update(
        xc_centroid=xc, yc_centroid=yc, ellipticity_centroid=e_c, elongation_centroid=el_c,
        pa_centroid=90.0 - torch.remainder(180.0 - th_c * deg, 180.0),  # (-90, 90], as params.wrap_pa
        xc_asymmetry=xa, yc_asymmetry=ya, ellipticity_asymmetry=e_a, elongation_asymmetry=el_a,
        pa_asymmetry=90.0 - torch.remainder(180.0 - th_a * deg, 180.0),
        flux_circ=flux_circ, flux_ellip=flux_ellip, rpetro_circ=rpc, rpetro_ellip=rpe, rmax_circ=rmax_circ,
        rmax_ellip=rmax_ellip, rhalf_circ=rhalf_circ, rhalf_ellip=rhalf_ellip, r20=r20, r50=r50, r80=r80,
        gini=gini, m20=m20, gini_m20_bulge=-0.693 * m20 + 4.95 * gini - 3.96,
        gini_m20_merger=0.139 * m20 + 0.990 * gini - 0.327, sn_per_pixel=sn, concentration=conc,
        asymmetry=a_val, smoothness=smooth_val, rms_asymmetry2=rms_asym, outer_asymmetry=outer_asym,
        shape_asymmetry=shape_asym, sky_mean=sky_mean, sky_median=sky_median, sky_sigma=sky_sigma,
    )
    for key, v in out.items():
        out[key] = torch.where(ok, v, torch.full_like(v, float("nan")))
    out["_flag"] = flag
    log.debug("morphology stage CPU times (s): %s", ", ".join(f"{k} {v:.3f}" for k, v in clock.times.items()))
    return out


def _mid_batch(bt: _Batch, ok: torch.Tensor, nobg: torch.Tensor, valid: torch.Tensor, seg_gini: torch.Tensor,
               opts: MorphologyOptions, flag: torch.Tensor) -> dict[str, torch.Tensor]:
    """The MID statistics of the batch's measurable stamps, one at a time on the CPU (sets the
    MID flags of ``flag`` in place)."""
    from .mid import mid_statistics

    b = bt.b
    res = {k: torch.full((b,), float("nan"), dtype=torch.float64) for k in MID_COLUMNS}
    ny, nx = bt.ny.tolist(), bt.nx.tolist()
    okl = ok.tolist()
    img = nobg.detach().to("cpu", torch.float64).numpy()
    val = valid.cpu().numpy()
    gseg = seg_gini.cpu().numpy()
    bits = [0] * b
    for k in range(b):
        if not okl[k]:
            continue
        sl = (slice(0, ny[k]), slice(0, nx[k]))
        try:
            r = mid_statistics(img[k][sl], val[k][sl], gseg[k][sl], eta=opts.eta, boxcar_size=opts.boxcar_size_mid,
                               niter_bh=opts.niter_bh_mid, sigma=opts.sigma_mid)
        except Exception as exc:  # noqa: BLE001 - a stamp's failure stays its own (flagged, NaN)
            log.warning("MID statistics of a stamp failed: %s: %s", type(exc).__name__, exc)
            bits[k] |= int(MorphFlag.MID)
            continue
        res["multimode"][k], res["intensity"][k], res["deviation"][k] = r.multimode, r.intensity, r.deviation
        if r.bad:
            bits[k] |= int(MorphFlag.MID)
        g = gseg[k][sl]
        area_max = max(int(g.sum()), int(r.segmap.sum()))
        if area_max == 0:
            bits[k] |= int(MorphFlag.MID)
        elif int((g & r.segmap).sum()) / float(area_max) < opts.segmap_overlap_ratio:
            bits[k] |= int(MorphFlag.MID_SEGMAP)
    flag |= torch.tensor(bits, dtype=flag.dtype, device=flag.device)
    return {k: v.to(device=nobg.device, dtype=nobg.dtype) for k, v in res.items()}


def _groups(radius: torch.Tensor, sel: torch.Tensor, budget: int, most: int | None = None) -> list[torch.Tensor]:
    """Stamps ``sel`` sorted by aperture radius and cut into groups whose asymmetry windows
    (side ``2 ceil(r) + 4``) hold at most ``budget`` pixels together (and ``most`` stamps)."""
    if sel.numel() == 0:
        return []
    order = sel[torch.argsort(radius[sel])]
    side = [2 * math.ceil(r) + 4 if math.isfinite(r) else 4 for r in radius[order].tolist()]
    groups, start = [], 0
    for i in range(1, len(side) + 1):
        if i == len(side) or (i + 1 - start) * side[i] ** 2 > budget or (most and i - start >= most):
            groups.append(order[start:i])
            start = i
    return groups


def _asymmetry_once_cpu(kind, idx, img, mask, bt, radius, xa, ya, sky, out, inner=None, elongation=None,
                        theta=None, reuse=None):
    """:func:`_asymmetry_once` for the stamps ``idx``, one stamp at a time in NumPy
    (:mod:`.asymmetry_cpu`); writes into ``out``. ``reuse``: stamp -> asymmetry function of the
    same image and aperture (another kind), whose layout is shared."""
    from . import asymmetry_jit
    from .asymmetry_cpu import StampAsymmetry

    if idx.numel() == 0:
        return
    im, mk = img[idx].numpy(), mask[idx].numpy()
    ny, nx = bt.ny[idx].tolist(), bt.nx[idx].tolist()
    rad, cx, cy = radius[idx].tolist(), xa[idx].tolist(), ya[idx].tolist()
    sk = [float("nan")] * len(rad) if sky is None else sky[idx].tolist()
    reuse = reuse or {}
    ids = idx.tolist()
    fun = [reuse[i].as_kind(kind, sk[k]) if i in reuse and reuse[i].r == rad[k] else
           StampAsymmetry(im[k, :ny[k], :nx[k]], mk[k, :ny[k], :nx[k]], rad[k], sk[k], kind=kind)
           for k, i in enumerate(ids)]
    if kind == "outer":  # the annulus' exact weights for all stamps in one call
        off = [f.offsets(cx[k], cy[k]) for k, f in enumerate(fun)]
        sizes = [o[0].size for o in off]
        dx = torch.from_numpy(np.concatenate([o[0] for o in off]))
        dy = torch.from_numpy(np.concatenate([o[1] for o in off]))
        rep = lambda v: torch.repeat_interleave(v[idx].to(torch.float64), torch.tensor(sizes))  # noqa: E731
        e, cs, sn = rep(elongation), rep(torch.cos(theta)), rep(torch.sin(theta))
        if asymmetry_jit.ENABLED:
            w_out, w_in = torch.empty_like(dx), torch.empty_like(dx)
            args = (e.numpy(), cs.numpy(), sn.numpy())
            asymmetry_jit.ellipse_weights(dx.numpy(), dy.numpy(), rep(radius).numpy(), *args, w_out.numpy())
            asymmetry_jit.ellipse_weights(dx.numpy(), dy.numpy(), rep(inner).numpy(), *args, w_in.numpy())
            wgt = w_out - w_in
        else:
            wgt = aperture_weights(dx, dy, rep(radius), e, cs, sn) - aperture_weights(dx, dy, rep(inner), e, cs, sn)
        parts = torch.split(wgt, sizes)
        vals = [f.weighted(cx[k], cy[k], parts[k].numpy()) for k, f in enumerate(fun)]
    else:
        vals = [f(cx[k], cy[k]) for k, f in enumerate(fun)]
    out[idx] = torch.tensor(vals, dtype=out.dtype)


def _asymmetry_once(kind, sel, img, mask, bt, radius, xa, ya, sky=None, inner=None, elongation=None, theta=None,
                    budget: int = 2 ** 20, fast: bool = False, reuse: dict | None = None):
    """Asymmetry of kind ``kind`` of the stamps ``sel`` (mask) about ``(xa, ya)``; NaN elsewhere
    and where it is undefined. ``fast``: one stamp at a time in NumPy (CPU, float64)."""
    out = torch.full((bt.b,), float("nan"), dtype=bt.dtype, device=bt.device)
    pick = lambda t, g: None if t is None else t[g]  # noqa: E731
    if fast:
        sel = sel.clone()
        todo = sel & torch.isfinite(radius) & (radius > 0)
        if kind == "outer":
            todo &= torch.isfinite(inner) & torch.isfinite(elongation) & torch.isfinite(theta)
        _asymmetry_once_cpu(kind, todo.nonzero().squeeze(1), img, mask, bt, radius, xa, ya, sky, out, inner,
                            elongation, theta, reuse)
        sel &= ~todo
    for g in _groups(radius, sel.nonzero().squeeze(1), budget):
        f = AsymmetryFunction(img[g], mask[g], bt.ny[g], bt.nx[g], radius[g], pick(sky, g), kind=kind,
                              inner=pick(inner, g), elongation=pick(elongation, g), theta=pick(theta, g), cache=False)
        out[g] = f(torch.arange(g.numel(), device=bt.device), xa[g], ya[g])
    return out.masked_fill_(out == 100.0, float("nan"))


def _asymmetry_center(bt, opts, ok, radius, sky_asym, xc, yc, xb, yb, rp_c, flag, keep=None):
    """statmorph's asymmetry centre: simplex from the centroid; if it ends farther than
    ``petro_fraction_cas * rpetro`` away, again from the brightest pixel; if that drifts too,
    the centroid (flagged). Stamps are searched in chunks of similar aperture size."""
    dt, dev, b = bt.dtype, bt.device, bt.b
    xa, ya = xc.clone(), yc.clone()
    aval = torch.full((b,), float("nan"), dtype=dt, device=dev)
    idx_all = ok.nonzero().squeeze(1)
    if idx_all.numel() == 0:
        return xa, ya, aval, flag
    drift = opts.petro_fraction_cas * rp_c
    keep = {} if keep is None else keep
    if opts.cpu_fast_path and torch.device(dev).type == "cpu" and dt == torch.float64:
        fin = torch.isfinite(radius[idx_all]) & (radius[idx_all] > 0)
        _asymmetry_center_cpu(bt, opts, idx_all[fin], radius, sky_asym, xc, yc, xb, yb, drift, xa, ya, aval, flag,
                              keep)
        idx_all = idx_all[~fin]
    order = idx_all[torch.argsort(radius[idx_all])]
    for s in range(0, order.numel(), opts.chunk):
        sel = order[s:s + opts.chunk]
        fun = AsymmetryFunction(bt.img[sel], bt.mask[sel], bt.ny[sel], bt.nx[sel], radius[sel], sky_asym[sel])
        call = fun.at
        x0 = torch.stack([xc[sel], yc[sel]], 1)
        best, fbest, _, _ = nelder_mead(call, x0, xtol=opts.asym_xtol, ftol=opts.asym_ftol)
        far = torch.linalg.vector_norm(best - x0, dim=1) > drift[sel]
        exited = fbest >= 100.0
        again = far.nonzero().squeeze(1)
        if again.numel():
            x1 = torch.stack([xb[sel][again], yb[sel][again]], 1)
            sub = AsymmetryFunction(bt.img[sel][again], bt.mask[sel][again], bt.ny[sel][again], bt.nx[sel][again],
                                    radius[sel][again], sky_asym[sel][again])
            call2 = sub.at
            best2, fbest2, _, _ = nelder_mead(call2, x1, xtol=opts.asym_xtol, ftol=opts.asym_ftol)
            far2 = torch.linalg.vector_norm(best2 - x1, dim=1) > drift[sel][again]
            best2 = torch.where(far2[:, None], x0[again], best2)
            best[again] = best2
            fbest[again] = torch.where(far2, fun(again, x0[again, 0], x0[again, 1]), fbest2)
            g = sel[again]
            flag[g] = flag[g] | int(MorphFlag.ASYM_CENTER)
            flag[g[far2]] = flag[g[far2]] | int(MorphFlag.ASYM_CENTROID)
        flag[sel[exited]] = flag[sel[exited]] | int(MorphFlag.ASYM_CENTER)
        xa[sel], ya[sel] = best[:, 0], best[:, 1]
        aval[sel] = fun(torch.arange(sel.numel(), device=dev), best[:, 0], best[:, 1])
    aval = torch.where(aval >= 100.0, torch.full_like(aval, float("nan")), aval)
    return xa, ya, aval, flag


def _asymmetry_center_cpu(bt, opts, idx, radius, sky_asym, xc, yc, xb, yb, drift, xa, ya, aval, flag, keep):
    """:func:`_asymmetry_center` for the stamps ``idx``, one stamp at a time in NumPy
    (:mod:`.asymmetry_cpu`); fills ``xa``, ``ya``, ``aval``, ``flag`` and ``keep`` (stamp ->
    its asymmetry function, for the RMS asymmetry in the same aperture) in place."""
    from . import asymmetry_jit
    from .asymmetry_cpu import StampAsymmetry, fmin2

    xt, ft = opts.asym_xtol, opts.asym_ftol
    if asymmetry_jit.ENABLED:  # the whole simplex compiled
        def search(fun, x0):
            x, y, f = asymmetry_jit.fmin2_asym(*fun.jit_args(), float(x0[0]), float(x0[1]), xt, ft, 400, 400)
            return (x, y), f
    else:
        def search(fun, x0):
            return fmin2(fun, x0, xtol=xt, ftol=ft)

    if idx.numel() == 0:
        return
    ids = idx.tolist()
    img, mask = bt.img[idx].numpy(), bt.mask[idx].numpy()
    ny, nx = bt.ny[idx].tolist(), bt.nx[idx].tolist()
    rad, sky, dr = radius[idx].tolist(), sky_asym[idx].tolist(), drift[idx].tolist()
    x0s, y0s, x1s, y1s = xc[idx].tolist(), yc[idx].tolist(), xb[idx].tolist(), yb[idx].tolist()
    res = []
    fl = []
    for k in range(len(ids)):
        fun = StampAsymmetry(img[k, :ny[k], :nx[k]], mask[k, :ny[k], :nx[k]], rad[k], sky[k])
        x0 = (x0s[k], y0s[k])
        best, fbest = search(fun, x0)
        bits = int(MorphFlag.ASYM_CENTER) if fbest >= 100.0 else 0
        if math.sqrt((best[0] - x0[0]) ** 2 + (best[1] - x0[1]) ** 2) > dr[k]:
            bits |= int(MorphFlag.ASYM_CENTER)
            x1 = (x1s[k], y1s[k])
            best2, _ = search(fun, x1)
            if math.sqrt((best2[0] - x1[0]) ** 2 + (best2[1] - x1[1]) ** 2) > dr[k]:
                best = x0
                bits |= int(MorphFlag.ASYM_CENTROID)
            else:
                best = best2
        res.append((best[0], best[1], fun(*best)))
        fl.append(bits)
        keep[ids[k]] = fun
    r = torch.tensor(res, dtype=bt.dtype)
    xa[idx], ya[idx], aval[idx] = r[:, 0], r[:, 1], r[:, 2]
    flag[idx] = flag[idx] | torch.tensor(fl, dtype=flag.dtype)


# ============================================================================================
# public entry point
# ============================================================================================

def measure_morphology(images: Sequence[np.ndarray], segmaps: Sequence[np.ndarray | None] | None = None,
                       labels: Sequence[int | None] | None = None, masks: Sequence[np.ndarray | None] | None = None,
                       sigmas: Sequence[np.ndarray | None] | None = None, *, gain: float | None = None,
                       ids: Sequence | None = None, options: MorphologyOptions | None = None,
                       detect_options=None, batch_size: int = 64, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float64, workers: int = 1) -> Table:
    """Non-parametric morphology (CAS, Gini-M20, radii) of each stamp, statmorph's definitions.

    Parameters
    ----------
    images : sequence of 2-D arrays
        Background-subtracted stamps (any sizes; counts or any linear unit).
    segmaps : sequence of 2-D integer arrays or None
        Segmentation maps (0 = sky, one label per source). Pixels of other labels are masked.
        Where a stamp has none, the target is segmented automatically (see
        :func:`galprof.morphology.detect.segment_stamps`).
    labels : sequence of int or None
        Label of the target in each segmentation map (default: the label at the stamp centre).
    masks : sequence of 2-D bool arrays or None
        Bad pixels (True = ignore).
    sigmas : sequence of 2-D arrays or None
        1-sigma images (only used for ``sn_per_pixel``; else ``gain`` builds one).
    gain : float, optional
        Electrons per image unit, for the Poisson weight map of ``sn_per_pixel`` when there is
        no sigma image.
    ids : sequence, optional
        Identifiers (default 0..N-1).
    options : MorphologyOptions, optional
    detect_options : galprof.morphology.detect.DetectOptions, optional
        Settings of the automatic segmentation.
    batch_size : int
        Stamps measured together.
    device, dtype :
        Where and in which precision to compute (float64 recommended; see docs/morphology.md).
    workers : int
        Processes measuring batches side by side on a CPU (1: in this process). Each worker
        runs one torch thread; the table is the same as with one. Not for a GPU device.

    Returns
    -------
    astropy.table.Table
        ``id``, ``morph_flag`` (bits of :class:`~galprof.morphology.flags.MorphFlag`),
        ``morph_message`` and the columns of :data:`COLUMNS` (and :data:`MID_COLUMNS` with
        ``mid=True``; NaN where not measured). Positions
        follow galprof's convention (pixel (1, 1) is the centre of the first pixel) and position
        angles are degrees counter-clockwise from +y.
    """
    from .detect import DetectOptions, segment_stamps

    opts = options or MorphologyOptions()
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    if opts.mid:
        from .mid import require

        require()
    if workers > 1 and torch.device(device).type != "cpu":
        raise ValueError(f"workers > 1 runs on the CPU only (device {device!r}): use one process per GPU")
    n = len(images)
    ids = list(range(n)) if ids is None else list(ids)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} images")
    segmaps = [None] * n if segmaps is None else list(segmaps)
    labels = [None] * n if labels is None else list(labels)
    masks = [None] * n if masks is None else list(masks)
    sigmas = [None] * n if sigmas is None else list(sigmas)
    for name, seq in (("segmaps", segmaps), ("labels", labels), ("masks", masks), ("sigmas", sigmas)):
        if len(seq) != n:
            raise ValueError(f"{len(seq)} {name} for {n} images")
    t0 = time.perf_counter()
    stamps: list[_Stamp | None] = [None] * n
    notes: list[tuple[int, str]] = [(0, "")] * n
    # automatic segmentation where there is no segmentation map
    todo = [i for i in range(n) if segmaps[i] is None]
    if todo:
        det = segment_stamps([images[i] for i in todo], [masks[i] for i in todo],
                             detect_options or DetectOptions(), device=device, dtype=dtype)
        for k, i in enumerate(todo):
            segmaps[i], labels[i] = det[k]
    for i in range(n):
        try:
            image = np.asarray(images[i], dtype=np.float64)
            if image.ndim != 2 or min(image.shape) < 3:
                raise ValueError(f"image has shape {image.shape}; a 2-D stamp of at least 3 x 3 pixels is needed")
            seg = segmaps[i]
            if seg is None:
                raise ValueError("no source found at the stamp centre")
            seg = np.asarray(seg)
            for name, arr in (("segmentation map", seg), ("mask", masks[i]), ("sigma", sigmas[i])):
                if arr is not None and np.shape(arr) != image.shape:
                    raise ValueError(f"{name} has shape {np.shape(arr)}, the image {image.shape}")
            label = labels[i]
            if label is None:
                label = int(seg[image.shape[0] // 2, image.shape[1] // 2])
                if label == 0:
                    raise ValueError("the segmentation map has no source at the stamp centre (label 0)")
            stamps[i] = prepare_stamp(image, seg, int(label), masks[i], sigmas[i], opts)
        except ValueError as exc:
            notes[i] = (int(MorphFlag.NO_DATA), str(exc))
    # measure in batches of similar sizes
    columns = output_columns(opts)
    results: dict[str, np.ndarray] = {k: np.full(n, np.nan) for k in columns}
    flags = np.zeros(n, dtype=np.int64)
    good = [i for i in range(n) if stamps[i] is not None]
    good.sort(key=lambda i: stamps[i].image.size)
    parts = [good[s:s + batch_size] for s in range(0, len(good), batch_size)]
    for part, res in zip(parts, _run_batches([[stamps[i] for i in p] for p in parts], opts, gain, device, dtype,
                                             workers)):
        flags[part] = res.pop("_flag")
        for key, v in res.items():
            results[key][part] = v
    for i in range(n):
        flags[i] |= notes[i][0]
        st = stamps[i]
        if st is not None:
            for key, off in (("xc_centroid", st.x0), ("xc_asymmetry", st.x0), ("yc_centroid", st.y0),
                             ("yc_asymmetry", st.y0)):
                results[key][i] += off + 1.0  # galprof convention: first pixel centred at 1
    table = Table()
    table["id"] = ids
    table["morph_flag"] = flags
    table["morph_message"] = [_message(int(f), notes[i][1]) for i, f in enumerate(flags)]
    for key, unit in columns.items():
        table[key] = results[key]
        if unit:
            table[key].unit = unit
    table.meta["MORPHOPT"] = json.dumps(asdict(opts))
    log.info("morphology of %d stamps in %.2f s", n, time.perf_counter() - t0)
    return table


def _measure_numpy(stamps: list[_Stamp], opts: MorphologyOptions, gain: float | None, device,
                   dtype: torch.dtype) -> dict[str, np.ndarray]:
    """One batch measured, as NumPy arrays (``_flag`` as integers)."""
    bt = _Batch(stamps, device, dtype)
    with torch.no_grad():
        res = _measure_batch(bt, opts, gain)
    out = {"_flag": res.pop("_flag").cpu().numpy().astype(np.int64)}
    out.update({key: v.detach().to(torch.float64).cpu().numpy() for key, v in res.items()})
    return out


def _worker_init() -> None:
    torch.set_num_threads(1)


def _worker_batch(stamps, opts, gain, dtype):
    return _measure_numpy(stamps, opts, gain, "cpu", dtype)


def _run_batches(batches: list[list[_Stamp]], opts: MorphologyOptions, gain: float | None, device, dtype, workers: int):
    """Yield the measurements of each batch in order, in this process or in ``workers`` processes.

    A batch whose worker fails (a process killed for memory, say) is measured again here, so
    that a broken worker costs time, never results.
    """
    if workers == 1 or len(batches) < 2:
        for b in batches:
            yield _measure_numpy(b, opts, gain, device, dtype)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    def here(why):
        log.warning("morphology workers unavailable (%s); measuring in this process", why)
        for b in batches:
            yield _measure_numpy(b, opts, gain, device, dtype)

    if multiprocessing.current_process().daemon:  # a daemonic process (a pool's or a Dask worker) has no children
        yield from here("this is a daemonic process")
        return
    # fork where the platform has it (no re-import of torch per worker); each worker one thread
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=min(workers, len(batches)), mp_context=multiprocessing.get_context(method),
                             initializer=_worker_init) as pool:
        try:
            futures = [pool.submit(_worker_batch, b, opts, gain, dtype) for b in batches]
        except Exception as exc:  # noqa: BLE001 - no worker could start: this process does the work
            yield from here(f"{type(exc).__name__}: {exc}")
            return
        for b, fut in zip(batches, futures):
            try:
                res = fut.result()
            except Exception as exc:  # noqa: BLE001 - a worker's failure must not lose the batch
                log.warning("a morphology worker failed (%s: %s); measuring its batch in this process",
                            type(exc).__name__, exc)
                res = _measure_numpy(b, opts, gain, "cpu", dtype)
            yield res


_TEXT = {
    MorphFlag.NO_DATA: "not measured",
    MorphFlag.CENTROID: "centroid outside the stamp or masked",
    MorphFlag.ASYM_CENTER: "asymmetry-centre search drifted or left the stamp",
    MorphFlag.ASYM_CENTROID: "asymmetry centre failed or masked (centroid used where it failed)",
    MorphFlag.PETROSIAN: "Petrosian radius at a search limit or zero mean flux",
    MorphFlag.NO_SKYBOX: "no sky box: no background corrections",
    MorphFlag.SKY_NOT_SUBTRACTED: "sky box mean exceeds its standard deviation",
    MorphFlag.GINI_SEGMAP: "Gini segmentation empty or full",
    MorphFlag.NONPOSITIVE: "nonpositive flux or moment in a statistic (NaN)",
    MorphFlag.SHAPE_SEGMAP: "shape-asymmetry segmentation undefined or brightest pixel added",
    MorphFlag.GINI_DISJOINT: "Gini segmentation disjoint (brightest part kept)",
    MorphFlag.MID: "MID segmentation fixed or MID statistic undefined",
    MorphFlag.MID_SEGMAP: "Gini and MID segmentations differ",
}


def _message(value: int, note: str) -> str:
    parts = [note] if note else []
    parts += [_TEXT[f] for f in MorphFlag if value & f and not (f == MorphFlag.NO_DATA and note)]
    quality = "bad" if value & int(BAD) else ("suspect" if value else "")
    return (quality + ": " if quality else "") + "; ".join(parts)
