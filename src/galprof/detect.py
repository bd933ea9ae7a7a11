"""Zero-touch inputs: sky, noise, detection, segmentation, masks and starting values from the image.

What a person would otherwise do by hand with SExtractor before a fit (see docs/automation.md):

1. **Background** (:func:`estimate_background`): a mesh background and RMS (sep, SExtractor's
   algorithm: ``back_size`` px meshes, 3 x 3 median filter) for detection; after detection, one
   global sky level and RMS from the pixels outside every (dilated) segment, by SExtractor's mode
   estimator on 3-sigma clipped pixels (:func:`sky_statistics`).
2. **Detection** (:func:`detect`): sep's extraction (filtered with SExtractor's default 3 x 3
   kernel, threshold ``thresh`` times the background RMS, ``minarea`` pixels, multi-threshold
   deblending), its segmentation map, and the target: the segment under the catalogue position
   (the stamp centre by default), else the nearest source within ``target_radius`` pixels.
3. **Masks** (:meth:`Detection.mask`): ``background`` masks the other sources' segments, each
   grown by ``dilate`` pixels (a disk), but never over the target's own segment, and the pixels
   where the other sources' extrapolated light (:func:`wings_image`) exceeds ``wings`` times
   the background RMS; ``exclusive`` masks all but the target's segment grown by ``dilate``
   pixels into the sky.
4. **Starting values** (:func:`measure`, :func:`initial_values`): windowed centroid; axis ratio
   and PA from the PSF-corrected second moments; Kron ("auto") flux; half-light radius from the
   elliptical curve of growth; Sérsic index from the concentration ``r80 / r20``; documented
   rules for bulge + disk models and for the sky.

Everything is in galprof's conventions: pixel (1, 1) is the centre of the first pixel, PA in
degrees counter-clockwise from +y, ``q = b / a``, radii along the semi-major axis in pixels.

sep (https://github.com/sep-developers/sep) is SExtractor's own C code as a library: the same
background, filtering, thresholding and deblending as SExtractor (so masks and catalogues
match what surveys already use), at SExtractor's speed (about a millisecond for a 128 x 128
stamp). It is an optional dependency (``pip install 'galprof[auto]'``); without it the automatic
steps raise :class:`~galprof.errors.DataError` naming the remedy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import DataError, ModelError
from .model import Model
from .params import wrap_pa

__all__ = ["AutoResult", "Background", "DetectOptions", "Detection", "Measurement", "auto_inputs", "detect",
           "estimate_background", "initial_values", "measure", "psf_radii", "sersic_concentration",
           "sersic_n_from_concentration", "sky_statistics", "with_neighbours", "MASK_MODES"]

MASK_MODES = ("background", "exclusive")
#: profiles whose size parameter is derived from the half-light radius, and how (see docs/automation.md)
_EXP_RE_OVER_RS = 1.6783469900166608  # half-light radius of an exponential disk in scale lengths
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def _sep():
    try:
        import sep
    except ImportError:
        raise DataError("automatic detection needs the sep package (SExtractor as a library): "
                        "pip install 'galprof[auto]' (or pip install sep)") from None
    return sep


def _c(a, dtype=np.float64) -> np.ndarray:
    """A C-contiguous, native byte order copy (sep's requirement)."""
    return np.ascontiguousarray(a, dtype=dtype)


@dataclass
class DetectOptions:
    """Settings of the automatic steps (defaults: SExtractor's, except where noted).

    Attributes
    ----------
    thresh : detection threshold, in units of the background RMS (SExtractor's DETECT_THRESH;
        default 2.0, see docs/automation.md for why not SExtractor's 1.5)
    minarea : smallest detection, pixels (DETECT_MINAREA)
    deblend_nthresh, deblend_cont : deblending levels and minimum contrast (DEBLEND_NTHRESH,
        DEBLEND_MINCONT; default 0.001, finer than SExtractor's 0.005, which leaves close pairs
        of galaxies in one segment: docs/automation.md)
    clean, clean_param : remove spurious detections near bright sources (CLEAN, CLEAN_PARAM)
    back_size, back_filter : mesh size (px) and median filter (meshes) of the detection
        background (BACK_SIZE, BACK_FILTERSIZE); meshes larger than the image shrink to it
    target_radius : the target is the segment under the position, else the nearest source whose
        centre is within this many pixels
    mask_mode : ``background`` or ``exclusive`` (module docstring)
    dilate : growth of the masked segments (background) or of the target's (exclusive), pixels
    wings : background mode also masks the pixels where the other sources' extrapolated light
        (:func:`wings_image`) exceeds this many background RMS (0: off)
    neighbours : at most this many bright overlapping neighbours are fitted as extra Sérsic
        components instead of being masked (0: mask them all)
    neighbour_flux : a neighbour is fitted (the ``neighbours`` brightest such) when its Kron flux
        is at least this fraction of the target's and its Kron ellipse, scaled by
        ``neighbour_scale``, overlaps the target's (GALAPAGOS's rule for simultaneous fits)
    neighbour_scale : see ``neighbour_flux``
    """

    thresh: float = 2.0
    minarea: int = 5
    deblend_nthresh: int = 32
    deblend_cont: float = 0.001
    clean: bool = True
    clean_param: float = 1.0
    back_size: int = 64
    back_filter: int = 3
    target_radius: float = 5.0
    mask_mode: str = "background"
    dilate: float = 2.0
    wings: float = 0.2
    neighbours: int = 0
    neighbour_flux: float = 0.1
    neighbour_scale: float = 1.0

    def validate(self) -> None:
        rules = {"thresh": (lambda v: v > 0, "> 0"), "minarea": (lambda v: v >= 1, ">= 1"),
                 "deblend_nthresh": (lambda v: v >= 1, ">= 1"), "deblend_cont": (lambda v: 0 <= v <= 1, "in [0, 1]"),
                 "back_size": (lambda v: v >= 8, ">= 8"), "back_filter": (lambda v: v >= 1, ">= 1")}
        for name in ("clean_param", "target_radius", "dilate", "wings", "neighbours", "neighbour_flux",
                     "neighbour_scale"):
            rules[name] = (lambda v: v >= 0, ">= 0")
        for name, (ok, allowed) in rules.items():
            v = getattr(self, name)
            try:
                good = math.isfinite(float(v)) and ok(v)
            except (TypeError, ValueError):
                good = False
            if not good:
                raise DataError(f"detection option {name} = {v!r} must be {allowed}")
        if self.mask_mode not in MASK_MODES:
            raise DataError(f"mask mode {self.mask_mode!r} is not one of {MASK_MODES}")


# ---------------------------------------------------------------------------------------------
# background
@dataclass
class Background:
    """Sky level and noise of an image.

    ``back``, ``rms``: the mesh maps used for detection (same shape as the image); ``level``,
    ``sigma``: the global sky level and RMS from the pixels outside every source (set by
    :func:`detect`; before detection, sep's global values).
    """

    back: np.ndarray
    rms: np.ndarray
    level: float
    sigma: float


def sky_statistics(values: np.ndarray, *, nsigma: float = 3.0, max_iter: int = 10) -> tuple[float, float]:
    """SExtractor's sky estimate of a set of pixel values: ``(level, rms)``.

    The values are clipped at ``nsigma`` standard deviations around the median until nothing
    changes (at most ``max_iter`` rounds); the level is the mode estimate
    ``2.5 median - 1.5 mean``, or the median when the clipped distribution is skewed
    (``|mean - median| > 0.3 std``, SExtractor's crowded-field rule); the RMS is the clipped
    standard deviation. NaN for no finite value.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    for _ in range(max_iter):
        med, std = float(np.median(v)), float(np.std(v))
        keep = np.abs(v - med) <= nsigma * std
        if keep.all() or keep.sum() < 3:
            break
        v = v[keep]
    med, mean, std = float(np.median(v)), float(np.mean(v)), float(np.std(v))
    level = med if std == 0 or abs(mean - med) > 0.3 * std else 2.5 * med - 1.5 * mean
    return level, std


def background_sigma(image: np.ndarray, background: Background, gain: float | None = None) -> np.ndarray:
    """A sigma map from the background RMS and, with ``gain`` (electrons per image unit), the
    sources' Poisson noise ``(data - sky) / gain`` where positive; NaN where the data are not
    finite."""
    data = np.asarray(image, dtype=np.float64)
    var = np.full(data.shape, background.sigma ** 2)
    if gain is not None:
        var = var + np.clip(data - background.level, 0.0, None) / gain
    return np.where(np.isfinite(data), np.sqrt(var), np.nan)


def estimate_background(image: np.ndarray, mask: np.ndarray | None = None, *,
                        options: DetectOptions | None = None) -> Background:
    """Mesh background and RMS maps of ``image`` (pixels in ``mask`` or non-finite are ignored)."""
    sep = _sep()
    o = options or DetectOptions()
    data, bad = _data_and_bad(image, mask)
    ny, nx = data.shape
    bw, bh = min(o.back_size, nx), min(o.back_size, ny)
    try:
        bkg = sep.Background(data, mask=bad, bw=bw, bh=bh, fw=o.back_filter, fh=o.back_filter)
    except Exception as exc:  # sep raises plain Exceptions for its C errors
        raise DataError(f"background estimation failed: {exc}") from None
    return Background(back=np.asarray(bkg.back()), rms=np.asarray(bkg.rms()), level=float(bkg.globalback),
                      sigma=float(bkg.globalrms))


def _data_and_bad(image, mask):
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise DataError(f"detection needs a 2-D image, got shape {image.shape}")
    bad = ~np.isfinite(image)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != image.shape:
            raise DataError(f"mask shape {m.shape} differs from the image's {image.shape}")
        bad = bad | m
    return _c(np.where(bad, 0.0, image)), _c(bad, dtype=bool)


# ---------------------------------------------------------------------------------------------
# detection
@dataclass
class Detection:
    """Sources found in one image.

    Attributes
    ----------
    objects : sep's catalogue (structured array; positions 0-based, as sep gives them)
    segmap : int32 map, 0 = sky, ``k`` = ``objects[k - 1]``
    target : the target's label, or 0 when no source was found at the position
    background : :class:`Background` (``level`` and ``sigma`` from the pixels outside the
        dilated segments)
    bad : pixels not used (masked on input or non-finite)
    position : the (x, y) the target was looked for at (FITS pixels)
    """

    objects: np.ndarray
    segmap: np.ndarray
    target: int
    background: Background
    bad: np.ndarray
    position: tuple[float, float]

    @property
    def labels(self) -> np.ndarray:
        return np.arange(1, len(self.objects) + 1)

    def mask(self, mode: str = "background", *, dilate: float = 2.0, keep: Iterable[int] = (),
             wings: np.ndarray | None = None, level: float = 0.2) -> np.ndarray:
        """Boolean mask (True = not used) of the other sources (``background``) or of all but the
        target (``exclusive``); see the module docstring. Labels in ``keep`` are not masked
        (neighbours fitted as components). ``background`` also masks the pixels where ``wings``
        (the other sources' extrapolated light, :func:`wings_image`) exceeds ``level`` times the
        background RMS, wherever they are (the target's segment included: there the neighbours'
        light would bias the fit); the grown segments never cover the target's. Input bad
        pixels are not included."""
        if mode not in MASK_MODES:
            raise DataError(f"mask mode {mode!r} is not one of {MASK_MODES}")
        target = self.segmap == self.target if self.target else np.zeros(self.segmap.shape, bool)
        keep = set(int(k) for k in keep)
        if mode == "background":
            other = (self.segmap != 0) & ~target
            for k in keep:
                other &= self.segmap != k
            out = dilate_mask(other, dilate) & ~target
            if wings is not None and level > 0:
                out |= wings > level * self.background.sigma
            return out
        kept = target.copy()
        for k in keep:
            kept |= self.segmap == k
        grown = dilate_mask(kept, dilate) & ((self.segmap == 0) | kept)
        return ~grown

    def table(self, *, zeropoint: float = 0.0):
        """The detections as an astropy Table in galprof's frame: ``label``, ``x``, ``y`` (FITS
        pixels), isophotal ``flux`` and ``mag``, ``a``, ``b`` (px), ``q``, ``pa`` (deg, from +y),
        ``npix``, sep's ``flag`` and ``target`` (bool)."""
        from astropy.table import Table

        o = self.objects
        t = Table()
        t["label"] = self.labels.astype(np.int32)
        t["x"] = o["x"] + 1.0
        t["y"] = o["y"] + 1.0
        t["flux"] = o["flux"]
        with np.errstate(invalid="ignore", divide="ignore"):
            t["mag"] = np.where(o["flux"] > 0, zeropoint - 2.5 * np.log10(np.abs(o["flux"])), np.nan)
            t["q"] = o["b"] / o["a"]
        t["a"] = o["a"]
        t["b"] = o["b"]
        t["pa"] = pa_from_theta(o["theta"])
        t["npix"] = o["npix"]
        t["flag"] = o["flag"]
        t["target"] = t["label"] == self.target
        return t


def pa_from_theta(theta) -> np.ndarray:
    """sep/SExtractor's angle (radians, counter-clockwise from +x) as galprof's PA (degrees,
    counter-clockwise from +y), in (-90, 90]."""
    return wrap_pa(np.degrees(np.asarray(theta, dtype=np.float64)) - 90.0)


def dilate_mask(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation of ``mask`` by a disk of ``radius`` pixels (offsets with
    ``dx^2 + dy^2 <= radius^2``)."""
    mask = np.asarray(mask, dtype=bool)
    r = int(math.floor(radius))
    if r < 1 or not mask.any():
        return mask.copy()
    out = mask.copy()
    ny, nx = mask.shape
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if (dx or dy) and dx * dx + dy * dy <= radius * radius:
                ys, yd = (slice(0, ny - dy), slice(dy, ny)) if dy >= 0 else (slice(-dy, ny), slice(0, ny + dy))
                xs, xd = (slice(0, nx - dx), slice(dx, nx)) if dx >= 0 else (slice(-dx, nx), slice(0, nx + dx))
                out[yd, xd] |= mask[ys, xs]
    return out


def detect(image: np.ndarray, *, mask: np.ndarray | None = None, position: tuple[float, float] | None = None,
           options: DetectOptions | None = None, segmap: np.ndarray | None = None,
           target: int | None = None) -> Detection:
    """Find the sources of ``image`` and the target among them.

    Parameters
    ----------
    image : 2-D array (not sky-subtracted is fine: the mesh background is removed first)
    mask : True = pixel not to be used (also non-finite pixels)
    position : (x, y) of the target in FITS pixels; default the image centre ``((nx + 1) / 2,
        (ny + 1) / 2)``
    options : :class:`DetectOptions`
    segmap, target : a segmentation map to use instead of detecting (e.g. one given with the
        data; 0 = sky) and the target's label in it (default: the label under ``position``).
        sep still measures each segment's moments.

    Returns
    -------
    Detection
        ``target`` is 0 when no source is at the position.
    """
    sep = _sep()
    o = options or DetectOptions()
    o.validate()
    data, bad = _data_and_bad(image, mask)
    ny, nx = data.shape
    if position is None:
        position = ((nx + 1) / 2.0, (ny + 1) / 2.0)
    bkg = estimate_background(data, bad, options=o)
    sub = _c(data - bkg.back)
    if segmap is not None:
        segmap = np.asarray(segmap)
        if segmap.shape != data.shape:
            raise DataError(f"segmentation map shape {segmap.shape} differs from the image's {data.shape}")
        objects, seg = _from_segmap(sub, bad, segmap)
        if target is not None:
            labels = np.unique(segmap[segmap != 0])
            if target not in labels:
                raise DataError(f"label {target} is not in the segmentation map (labels {labels[:10].tolist()})")
            given = sorted(int(v) for v in labels)
            target = given.index(int(target)) + 1
    else:
        sep.set_extract_pixstack(max(300000, 2 * data.size))
        try:
            objects, seg = sep.extract(sub, o.thresh, err=_c(bkg.rms), mask=bad, minarea=o.minarea,
                                       deblend_nthresh=o.deblend_nthresh, deblend_cont=o.deblend_cont,
                                       clean=o.clean, clean_param=o.clean_param, filter_type="conv",
                                       segmentation_map=True)
        except Exception as exc:
            raise DataError(f"source extraction failed: {exc}") from None
        seg = np.asarray(seg, dtype=np.int32)
    if target is None:
        target = _find_target(objects, seg, position, o.target_radius)
    # the global sky from the pixels outside every source (segments grown by 2 px and by dilate)
    sources = dilate_mask(seg != 0, max(2.0, o.dilate))
    level, sigma = sky_statistics(data[~(sources | bad)])
    if not math.isfinite(level):
        level, sigma = sky_statistics(data[~bad])
    background = Background(back=bkg.back, rms=bkg.rms, level=level, sigma=sigma)
    return Detection(objects=objects, segmap=seg, target=int(target), background=background, bad=bad,
                     position=(float(position[0]), float(position[1])))


def _from_segmap(sub, bad, segmap):
    """sep-like object records for the segments of a given map (relabelled 1..K in label order)."""
    sep = _sep()
    labels = np.unique(segmap[segmap != 0])
    seg = np.zeros(segmap.shape, np.int32)
    for k, lab in enumerate(labels, start=1):
        seg[segmap == lab] = k
    # sep measures the segments of a given map (its own thresholding is bypassed)
    try:
        objects, _ = sep.extract(sub, 0.0, mask=bad, minarea=1, segmentation_map=_c(seg, np.int32),
                                 filter_kernel=None, clean=False)
    except Exception as exc:
        raise DataError(f"measuring the given segments failed: {exc}") from None
    return objects, seg


def _find_target(objects, seg, position, radius) -> int:
    ny, nx = seg.shape
    ix = int(math.floor(position[0] + 0.5)) - 1
    iy = int(math.floor(position[1] + 0.5)) - 1
    if 0 <= ix < nx and 0 <= iy < ny and seg[iy, ix] != 0:
        return int(seg[iy, ix])
    if len(objects) == 0:
        return 0
    d2 = (objects["x"] + 1.0 - position[0]) ** 2 + (objects["y"] + 1.0 - position[1]) ** 2
    k = int(np.argmin(d2))
    return k + 1 if d2[k] <= radius * radius else 0


# ---------------------------------------------------------------------------------------------
# measurements of one source
@dataclass
class Measurement:
    """Starting-value measurements of one source (galprof's frame; see :func:`measure`).

    ``x, y`` FITS pixels; ``flux`` the Kron flux and ``total_flux`` the Sérsic-corrected total
    (image units, sky removed); ``q``, ``pa`` (deg) PSF-corrected; ``r20, r50, r80``: semi-major
    radii (px) holding those fractions of the Kron flux, as observed; ``re``: PSF-corrected
    half-light radius; ``concentration``: PSF-corrected ``r80 / r20``; ``n``: Sérsic index from
    it; ``sky``: sky level; ``kron_radius``: semi-major radius of the Kron aperture (px);
    ``snr``: Kron flux over its noise (from the background RMS).
    """

    label: int
    x: float
    y: float
    flux: float
    total_flux: float
    q: float
    pa: float
    r20: float
    r50: float
    r80: float
    re: float
    concentration: float
    n: float
    sky: float
    kron_radius: float
    snr: float
    notes: list[str] = field(default_factory=list)

    def mag(self, zeropoint: float) -> float:
        return zeropoint - 2.5 * math.log10(self.total_flux) if self.total_flux > 0 else math.nan


#: fractions of the curve of growth that define the concentration
_C_LO, _C_HI = 0.2, 0.8
N_RANGE = (0.5, 6.0)


def _gammaincinv(a: np.ndarray, p: float) -> np.ndarray:
    """x with P(a, x) = p (regularised lower incomplete gamma), by bisection in log x (float64)."""
    a_t = torch.as_tensor(a, dtype=torch.float64)
    lo = torch.full_like(a_t, -30.0)
    hi = torch.full_like(a_t, 8.0)
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        below = torch.special.gammainc(a_t, torch.exp(mid)) < p
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return torch.exp(0.5 * (lo + hi)).numpy()


def sersic_concentration(n) -> np.ndarray:
    """``r80 / r20`` of a Sérsic profile of index ``n`` (fractions of the total flux):
    ``(x80 / x20)^n`` with ``P(2n, x_f) = f``."""
    n = np.asarray(n, dtype=np.float64)
    return (_gammaincinv(2 * n, _C_HI) / _gammaincinv(2 * n, _C_LO)) ** n


_N_GRID = np.exp(np.linspace(math.log(0.2), math.log(10.0), 400))
_C_GRID: np.ndarray | None = None


def sersic_n_from_concentration(c) -> np.ndarray:
    """Inverse of :func:`sersic_concentration` (monotonic), clipped to ``N_RANGE`` = (0.5, 6)."""
    global _C_GRID
    if _C_GRID is None:
        _C_GRID = sersic_concentration(_N_GRID)
    c = np.asarray(c, dtype=np.float64)
    n = np.exp(np.interp(c, _C_GRID, np.log(_N_GRID)))
    return np.clip(np.where(np.isfinite(c), n, 2.0), *N_RANGE)


def _sersic_fraction(n: float, r_over_re: float) -> float:
    """Fraction of a Sérsic profile's flux inside ``r_over_re`` half-light radii."""
    nt = torch.tensor([n], dtype=torch.float64)
    from .special import sersic_bn

    b = sersic_bn(nt)
    return float(torch.special.gammainc(2 * nt, b * torch.tensor(r_over_re, dtype=torch.float64) ** (1 / nt))[0])


def psf_radii(psf: np.ndarray | None) -> dict[str, float]:
    """``{"r20", "r50", "r80", "sigma"}`` of a PSF image (centred at ``[ny // 2, nx // 2]``):
    radii of the circular curve of growth normalised to the image's sum, and the standard
    deviation of the Gaussian with the same half-light radius (``r50 / 1.1774``). All 0 for no
    PSF."""
    if psf is None:
        return {"r20": 0.0, "r50": 0.0, "r80": 0.0, "sigma": 0.0}
    sep = _sep()
    p = _c(psf)
    p = p / p.sum()
    ny, nx = p.shape
    cx, cy = nx // 2, ny // 2
    rmax = max(1.0, min(cx, cy, nx - 1 - cx, ny - 1 - cy) + 0.5)
    radii = np.linspace(0.05, rmax, 200)
    flux, _, _ = sep.sum_circle(p, np.full(radii.size, float(cx)), np.full(radii.size, float(cy)), radii,
                                subpix=5)
    out = {f"r{int(f * 100)}": float(np.interp(f, np.maximum.accumulate(flux), radii)) for f in (0.2, 0.5, 0.8)}
    out["sigma"] = out["r50"] / math.sqrt(2.0 * math.log(2.0))
    return out


def _symmetric_fill(sub: np.ndarray, unusable: np.ndarray, x0: float, y0: float) -> np.ndarray:
    """``sub`` with unusable pixels replaced by the pixel mirrored through (x0, y0) (0-based),
    when that one is usable, else 0 (SExtractor's MASK_TYPE CORRECT)."""
    out = np.where(unusable, 0.0, sub)
    iy, ix = np.nonzero(unusable)
    if iy.size:
        my = np.rint(2 * y0 - iy).astype(int)
        mx = np.rint(2 * x0 - ix).astype(int)
        ny, nx = sub.shape
        inside = (my >= 0) & (my < ny) & (mx >= 0) & (mx < nx)
        ok = np.zeros(iy.size, bool)
        ok[inside] = ~unusable[my[inside], mx[inside]]
        out[iy[ok], ix[ok]] = sub[my[ok], mx[ok]]
    return out


def measure(image: np.ndarray, detection: Detection, label: int | None = None, *,
            psf: np.ndarray | None = None, psf_stats: Mapping[str, float] | None = None) -> Measurement:
    """Starting-value measurements of source ``label`` (default: the target).

    The image minus the global sky level; pixels of other sources and bad pixels replaced by
    their mirror image through the source's centre (0 when that is unusable too). Then:

    - centre: the windowed centroid (sep.winpos, Gaussian window of sigma ``2 r50 / 2.355``,
      SExtractor's XWIN/YWIN);
    - q, PA: the isophotal second moments (sep's a, b, theta) minus the PSF's variance
      ``sigma_psf^2`` on each axis (b^2 at least 4% of a^2, so q >= 0.2 from the moments);
    - flux: inside the Kron ellipse of 2.5 Kron radii (at least 3.5 px; SExtractor's
      FLUX_AUTO); the total flux adds the part of a Sérsic profile of the estimated n and re
      outside that ellipse (at most 0.3 mag);
    - r20, r50, r80: semi-major radii of the elliptical apertures (observed shape) holding those
      fractions of the Kron flux; re = sqrt(r50^2 - r50_psf^2) and the concentration
      ``C = sqrt(r80^2 - r80_psf^2) / sqrt(r20^2 - r20_psf^2)`` (each radius at least 30% of
      its observed value); n from C by the Sérsic relation (:func:`sersic_n_from_concentration`).

    Raises :class:`~galprof.errors.DataError` when sep cannot measure the source.
    """
    try:
        return _measure(image, detection, label, psf=psf, psf_stats=psf_stats)
    except DataError:
        raise
    except Exception as exc:  # sep raises plain Exceptions for its C errors
        raise DataError(f"cannot measure source {label or detection.target}: {exc}") from None


def _measure(image, detection, label, *, psf, psf_stats) -> Measurement:
    """The body of :func:`measure`."""
    sep = _sep()
    label = detection.target if label is None else int(label)
    if not 1 <= label <= len(detection.objects):
        raise DataError(f"no source {label} to measure ({len(detection.objects)} detected)")
    obj = detection.objects[label - 1]
    notes: list[str] = []
    seg = detection.segmap
    data = np.asarray(image, dtype=np.float64)
    sky = detection.background.level
    sub = np.where(detection.bad, 0.0, data - sky)
    others = ((seg != 0) & (seg != label)) | detection.bad
    x0, y0 = float(obj["x"]), float(obj["y"])
    if not (math.isfinite(x0) and math.isfinite(y0)):
        raise DataError(f"source {label} has no centroid (no positive flux in its segment)")
    filled = _c(_symmetric_fill(sub, others, x0, y0))
    ps = dict(psf_stats) if psf_stats is not None else psf_radii(psf)
    a, b, theta = float(obj["a"]), float(obj["b"]), float(obj["theta"])
    if not (math.isfinite(a) and math.isfinite(b) and math.isfinite(theta)):
        a, b, theta = 1.0, 1.0, 0.0
        notes.append(f"source {label}: no second moments (round start)")
    a, b = max(a, 0.3), min(max(b, 0.3), max(a, 0.3))
    q_obs = b / a
    # Kron radius and flux (SExtractor's 6 isophotal radii for the first moment)
    xs, ys = np.array([x0]), np.array([y0])
    kr, _ = sep.kron_radius(filled, xs, ys, np.array([a]), np.array([b]), np.array([theta]), 6.0)
    kr = float(kr[0]) if np.isfinite(kr[0]) and kr[0] > 0 else 2.5
    r_kron = max(2.5 * kr * a, 3.5 * math.sqrt(a / b) if b > 0 else 3.5)  # semi-major, px
    # curve of growth in ellipses of the observed shape
    radii = np.exp(np.linspace(math.log(0.25), math.log(r_kron), 60))
    m = radii.size
    flux, _, _ = sep.sum_ellipse(filled, np.full(m, x0), np.full(m, y0), np.ones(m), np.full(m, q_obs),
                                 np.full(m, theta), radii, subpix=5)
    f_kron = float(flux[-1])
    rms = detection.background.sigma
    area = math.pi * r_kron * r_kron * q_obs
    snr = f_kron / (rms * math.sqrt(area)) if rms > 0 else math.inf
    if not f_kron > 0:
        notes.append("no positive flux in the Kron aperture")
        f_kron = float(max(obj["flux"], 1e-30))
    cog = np.maximum.accumulate(flux / f_kron)
    r20, r50, r80 = (float(np.interp(f, cog, radii)) for f in (_C_LO, 0.5, _C_HI))
    intrinsic = lambda r, rp: math.sqrt(max(r * r - rp * rp, (0.3 * r) ** 2))
    re = intrinsic(r50, ps["r50"])
    conc = intrinsic(r80, ps["r80"]) / intrinsic(r20, ps["r20"])
    n = float(sersic_n_from_concentration(conc))
    # windowed centroid
    sig = 2.0 * max(r50 * math.sqrt(q_obs), 0.5) / _FWHM_PER_SIGMA
    xw, yw, wflag = sep.winpos(filled, xs, ys, np.array([sig]))
    moved = (xw[0] - x0) ** 2 + (yw[0] - y0) ** 2
    if wflag[0] == 0 and np.isfinite(moved) and moved < 4 * a * a:
        x0, y0 = float(xw[0]), float(yw[0])
    else:
        notes.append("windowed centroid failed: isophotal centroid used")
    # PSF-corrected shape
    s2 = ps["sigma"] ** 2
    a2 = max(a * a - s2, 0.09)
    b2 = min(max(b * b - s2, 0.04 * a2), a2)
    q = math.sqrt(b2 / a2)
    pa = float(pa_from_theta(theta))
    # Sérsic correction of the Kron flux to a total
    frac = _sersic_fraction(n, r_kron / max(re, 1e-3))
    corr = min(1.0 / frac, 10 ** (0.4 * 0.3)) if frac > 0 else 1.0
    return Measurement(label=label, x=x0 + 1.0, y=y0 + 1.0, flux=f_kron, total_flux=f_kron * corr, q=q,
                       pa=pa, r20=r20, r50=r50, r80=r80, re=re, concentration=conc, n=n, sky=sky, kron_radius=r_kron,
                       snr=snr, notes=notes)


def sersic_image(shape: tuple[int, int], *, x: float, y: float, flux: float, re: float, n: float, q: float,
                 pa: float) -> np.ndarray:
    """A Sérsic profile sampled at pixel centres (no PSF, no sub-pixel integration: for masks,
    not for fitting). ``x, y`` FITS pixels, ``re`` semi-major (px), ``pa`` degrees from +y."""
    from .special import sersic_bn

    b = float(sersic_bn(torch.tensor([n], dtype=torch.float64))[0])
    yy, xx = np.indices(shape, dtype=np.float64)
    dx, dy = xx + 1.0 - x, yy + 1.0 - y
    t = math.radians(pa)
    u = -dx * math.sin(t) + dy * math.cos(t)   # along the major axis
    v = -dx * math.cos(t) - dy * math.sin(t)
    r = np.sqrt(u * u + (v / q) ** 2)
    log_norm = (math.log(2 * math.pi * q * re * re * n) + b + math.lgamma(2 * n) - 2 * n * math.log(b))
    return flux * np.exp(-log_norm - b * ((r / re) ** (1.0 / n) - 1.0))


def source_light(image: np.ndarray, detection: Detection, label: int, *,
                 psf_stats: Mapping[str, float] | None = None,
                 convolved: bool = False) -> tuple[Measurement | None, np.ndarray | None]:
    """A source's measurement and its extrapolated light (None when it has no positive flux;
    both None when it cannot be measured).

    ``convolved`` True: the light *before* the PSF, to be convolved with it (:func:`wings_image`):
    a Sérsic with the measured total flux and the PSF-corrected re, n (within 0.5-6), q and PA,
    sampled at pixel centres and rescaled to the total flux; a point (its flux shared between the
    four nearest pixels) when re < 0.5 px. ``convolved`` False (no PSF): a Sérsic with the
    observed half-light radius, index from the observed concentration (within 0.5-4) and
    observed shape (sep's isophotal a, b, theta)."""
    try:
        m = measure(image, detection, label, psf_stats=psf_stats)
    except DataError:
        return None, None
    if not (m.total_flux > 0 and m.r50 > 0):
        return m, None
    shape = detection.segmap.shape
    if convolved:
        if m.re < 0.5:
            return m, _point(shape, m.x, m.y, m.total_flux)
        light = sersic_image(shape, x=m.x, y=m.y, flux=m.total_flux, re=m.re, n=float(np.clip(m.n, 0.5, 6.0)),
                             q=m.q, pa=m.pa)
        total = light.sum()
        return m, light * (m.total_flux / total) if total > 0 else None
    o = detection.objects[label - 1]
    n = float(np.clip(sersic_n_from_concentration(m.r80 / max(m.r20, 1e-3)), 0.5, 4.0))
    q = float(np.clip(o["b"] / o["a"], 0.05, 1.0)) if o["a"] > 0 else 1.0
    return m, sersic_image(shape, x=m.x, y=m.y, flux=m.total_flux, re=m.r50, n=n, q=q,
                           pa=float(pa_from_theta(o["theta"])))


def _point(shape, x: float, y: float, flux: float) -> np.ndarray:
    """``flux`` at (x, y) (FITS pixels), shared bilinearly between the four nearest pixels."""
    out = np.zeros(shape)
    fx, fy = x - 1.0, y - 1.0
    ix, iy = int(math.floor(fx)), int(math.floor(fy))
    for dy in (0, 1):
        for dx in (0, 1):
            w = (1 - abs(fx - ix - dx)) * (1 - abs(fy - iy - dy))
            if 0 <= iy + dy < shape[0] and 0 <= ix + dx < shape[1]:
                out[iy + dy, ix + dx] += flux * w
    return out


def convolve_psf(image: np.ndarray, psf: np.ndarray) -> np.ndarray:
    """``image`` convolved with the unit-sum ``psf`` (centre at ``[ny // 2, nx // 2]``), zero
    outside the image, same shape (FFT)."""
    p = np.asarray(psf, dtype=np.float64)
    p = p / p.sum()
    ny, nx = image.shape
    py, px = p.shape
    sy, sx = ny + py, nx + px
    f = np.fft.irfft2(np.fft.rfft2(image, (sy, sx)) * np.fft.rfft2(p, (sy, sx)), (sy, sx))
    return f[py // 2:py // 2 + ny, px // 2:px // 2 + nx]


def wings_image(image: np.ndarray, detection: Detection, labels: Iterable[int], *,
                psf: np.ndarray | None = None, psf_stats: Mapping[str, float] | None = None) -> np.ndarray:
    """The summed extrapolated light (:func:`source_light`) of sources ``labels``: with a PSF,
    their PSF-corrected profiles convolved with it; without, their observed profiles."""
    out = np.zeros(detection.segmap.shape)
    for lab in labels:
        _, light = source_light(image, detection, lab, psf_stats=psf_stats, convolved=psf is not None)
        if light is not None:
            out += light
    return out if psf is None else convolve_psf(out, psf)


# ---------------------------------------------------------------------------------------------
# starting values for a model
_BULGE_PROFILES = ("sersic", "devauc")
_DISK_PROFILES = ("expdisk",)


def _size_of(profile: str, pname: str, re: float, values: Mapping[str, float]) -> float | None:
    """The size parameter ``pname`` of ``profile`` whose half-light radius is ``re``."""
    if pname == "re":
        return re
    if profile == "expdisk" and pname == "rs":
        return re / _EXP_RE_OVER_RS
    if profile == "gaussian" and pname == "fwhm":
        return 2.0 * re
    if profile == "moffat" and pname == "fwhm":
        beta = float(values.get("beta", 3.0))
        return 2.0 * re * math.sqrt(2 ** (1 / beta) - 1) / math.sqrt(2 ** (1 / (beta - 1)) - 1)
    return None


def _shares(model: Model, n: float) -> dict[str, tuple[float, float]]:
    """Flux share and half-light radius factor of each luminous component (docs/automation.md):
    one component takes everything; a bulge (sersic/devauc) + disk (expdisk) pair splits with
    B/T = clip((n - 1) / 3, 0.2, 0.8), bulge re 0.4 re, disk re 1.0 re (rs = re / 1.678);
    otherwise equal shares at the same re."""
    lum = [c for c in model.components if c.profile.kind in ("elliptical", "point")]
    if len(lum) == 1:
        return {lum[0].name: (1.0, 1.0)}
    if len(lum) == 2:
        kinds = [c.profile.name for c in lum]
        for i, j in ((0, 1), (1, 0)):
            if kinds[i] in _BULGE_PROFILES and kinds[j] in _DISK_PROFILES:
                bt = float(np.clip((n - 1.0) / 3.0, 0.2, 0.8))
                return {lum[i].name: (bt, 0.4), lum[j].name: (1.0 - bt, 1.0)}
    return {c.name: (1.0 / len(lum), 1.0) for c in lum}


def initial_values(model: Model, m: Measurement, *, given: Iterable[str] = (),
                   neighbours: Sequence[Measurement] = ()) -> dict[str, float]:
    """Starting values ``{"comp.param": value}`` of every free, untied parameter of ``model``
    not in ``given``, from the target's measurement ``m`` (and neighbours' for the ``nb<k>``
    components added by :func:`with_neighbours`). Frames: the fit's (stamp pixels, the model's
    zeropoint). Values are moved strictly inside the parameter's bounds.

    Rules (docs/automation.md): every centre at the windowed centroid; magnitudes from the total
    flux, split between luminous components by :func:`_shares`; sizes from the half-light radius
    by profile (sersic/devauc re, expdisk rs = re / 1.678, gaussian fwhm = 2 re, moffat from
    beta); Sérsic n from the concentration (a bulge of a bulge + disk pair: max(n, 2));
    q and PA from the moments (a bulge's q: (1 + q) / 2); sky: the global sky level (sky
    gradients 0). Other parameters (c0, Moffat beta, Ferrer and King shapes) keep the model's
    values.
    """
    layout = model.layout(1)
    given = set(given)
    free = [k for k in layout.free if k not in given]
    base = {k: float(v.reshape(-1)[0]) for k, v in layout.values().items()}
    nb = {f"nb{i + 1}": mm for i, mm in enumerate(neighbours)}
    shares = _shares(Model([c for c in model.components if c.name not in nb], model.zeropoint), m.n)
    out: dict[str, float] = {}
    for comp in model.components:
        src = nb.get(comp.name, m)
        share, rfac = (1.0, 1.0) if comp.name in nb else shares.get(comp.name, (1.0, 1.0))
        bulge_of_pair = comp.name not in nb and rfac < 1.0
        comp_vals = {s.name: base[f"{comp.name}.{s.name}"] for s in comp.profile.params}
        for spec in comp.profile.params:
            key = f"{comp.name}.{spec.name}"
            if key not in free:
                continue
            v = None
            if spec.kind == "x":
                v = src.x
            elif spec.kind == "y":
                v = src.y
            elif spec.kind == "mag":
                f = src.total_flux * share
                v = model.zeropoint - 2.5 * math.log10(f) if f > 0 else None
            elif spec.kind == "length":
                v = _size_of(comp.profile.name, spec.name, src.re * rfac, comp_vals)
            elif spec.kind == "angle" and spec.name == "pa":
                v = src.pa
            elif spec.name == "q" and comp.profile.kind == "elliptical":
                v = 0.5 * (1.0 + src.q) if bulge_of_pair else src.q
            elif spec.name == "n" and comp.profile.name == "sersic":
                v = max(src.n, 2.0) if bulge_of_pair else src.n
            elif comp.profile.kind == "sky":
                v = m.sky if spec.name == "sky" else 0.0
            if v is None or not math.isfinite(v):
                continue
            out[key] = _inside(v, layout.bounds(key))
    return out


def _inside(v: float, bounds) -> float:
    lo, hi = bounds
    if lo is not None and hi is not None:
        span = hi - lo
        return min(max(v, lo + 1e-3 * span), hi - 1e-3 * span)
    if lo is not None and v <= lo:
        return lo + 1e-3 * max(abs(lo), 1.0)
    if hi is not None and v >= hi:
        return hi - 1e-3 * max(abs(hi), 1.0)
    return v


def with_neighbours(model: Model, k: int) -> Model:
    """``model`` plus ``k`` free Sérsic components ``nb1 .. nbk`` (for neighbours fitted
    instead of masked; re in [0.3, 200] px, n in [0.3, 8])."""
    if k <= 0:
        return model
    data = model.to_dict()
    names = set(data["components"])
    for i in range(1, k + 1):
        name = f"nb{i}"
        if name in names:
            raise ModelError(f"the model already has a component {name!r}; rename it to fit neighbours")
        data["components"][name] = {"profile": "sersic", "x0": 1.0, "y0": 1.0, "mag": 20.0,
                                    "re": {"value": 3.0, "bounds": [0.3, 200.0]},
                                    "n": {"value": 1.5, "bounds": [0.3, 8.0]}, "q": 0.7, "pa": 0.0}
    return Model.from_dict(data)


# ---------------------------------------------------------------------------------------------
# everything for one stamp
@dataclass
class AutoResult:
    """Automatic inputs of one stamp (:func:`auto_inputs`).

    ``model``: the model to fit (the one given, plus ``nb1 ..`` Sérsic components for the
    neighbours fitted instead of masked); ``mask``: the automatic mask (True = not used; input
    bad pixels not included); ``starts``: ``{"comp.param": value}`` for the free parameters
    that were not given; ``sigma``: a sigma map when none was given (else None);
    ``detection``; ``target``: the target's :class:`Measurement` (None: no source at the
    position); ``neighbours``: the fitted neighbours' measurements; ``notes``: messages for the
    galaxy's message column.
    """

    model: Model
    mask: np.ndarray
    starts: dict[str, float]
    sigma: np.ndarray | None
    detection: Detection
    target: Measurement | None
    neighbours: list[Measurement]
    notes: list[str]


def _kron_ellipse(det: Detection, m: Measurement, scale: float) -> np.ndarray:
    """Pixels inside a source's Kron ellipse (semi-major ``scale`` times its Kron radius, the
    observed shape)."""
    o = det.objects[m.label - 1]
    q = float(np.clip(o["b"] / o["a"], 0.05, 1.0)) if o["a"] > 0 else 1.0
    yy, xx = np.indices(det.segmap.shape, dtype=np.float64)
    dx, dy = xx + 1.0 - m.x, yy + 1.0 - m.y
    c, s_ = math.cos(float(o["theta"])), math.sin(float(o["theta"]))
    u = dx * c + dy * s_
    v = -dx * s_ + dy * c
    r = scale * m.kron_radius
    return u * u + (v / q) ** 2 <= r * r


def auto_inputs(image: np.ndarray, *, model: Model, sigma: np.ndarray | None = None, mask: np.ndarray | None = None,
                psf: np.ndarray | None = None, position: tuple[float, float] | None = None,
                given: Iterable[str] = (), options: DetectOptions | None = None, segmap: np.ndarray | None = None,
                segmap_label: int | None = None, psf_stats: Mapping[str, float] | None = None,
                gain: float | None = None) -> AutoResult:
    """Detection, mask, starts and (when ``sigma`` is None) a sigma map for one stamp.

    Parameters
    ----------
    image : 2-D array
    model : the model to fit (its free parameters not in ``given`` get starts)
    sigma : 1-sigma noise map, or None: then the sigma map is the global background RMS, plus
        the source's Poisson noise ``(data - sky) / gain`` where positive when ``gain``
        (electrons per image unit) is given
    mask : pixels not to be used (not detected on either)
    psf : the PSF image (for the PSF corrections of the measurements) or None
    position : (x, y) of the target, FITS pixels (default: the stamp centre)
    given : parameters whose starts the caller has
    options : :class:`DetectOptions` (``neighbours`` > 0 adds up to that many Sérsic components
        ``nb1 ..`` for bright overlapping neighbours, which are then not masked)
    segmap, segmap_label : a given segmentation map and the target's label in it: its segments
        are used instead of detecting
    psf_stats : :func:`psf_radii` of ``psf``, when already computed (one PSF for many stamps)
    """
    o = options or DetectOptions()
    det = detect(image, mask=mask, position=position, options=o, segmap=segmap, target=segmap_label)
    notes: list[str] = []
    ps = dict(psf_stats) if psf_stats is not None else psf_radii(psf)
    target = None
    nbs: list[Measurement] = []
    others = [k for k in range(1, len(det.objects) + 1) if k != det.target]
    lights = {}
    if det.target:
        try:
            target = measure(image, det, psf_stats=ps)
            notes += target.notes
        except DataError as exc:
            notes.append(f"the target cannot be measured ({exc}): starting values from the model")
    else:
        x, y = det.position
        notes.append(f"no source detected at ({x:.1f}, {y:.1f}): starting values from the model")
    if (o.mask_mode == "background" and o.wings > 0) or (o.neighbours and target is not None):
        lights = {k: source_light(image, det, k, psf_stats=ps) for k in others}
    if o.neighbours and target is not None:
        t_ellipse = _kron_ellipse(det, target, o.neighbour_scale)
        chosen = [m for m, _ in lights.values() if m is not None and m.flux >= o.neighbour_flux * target.flux
                  and (t_ellipse & _kron_ellipse(det, m, o.neighbour_scale)).any()]
        nbs = sorted(chosen, key=lambda m: -m.flux)[:o.neighbours]
    fit_model = with_neighbours(model, len(nbs))
    keep = [mm.label for mm in nbs]
    wings = None
    if o.mask_mode == "background" and o.wings > 0:
        wings = np.zeros(det.segmap.shape)
        for k, (_, light) in lights.items():
            if light is not None and k not in keep:
                wings += light
    auto_mask = det.mask(o.mask_mode, dilate=o.dilate, keep=keep, wings=wings, level=o.wings)
    starts: dict[str, float] = {}
    if target is not None:
        starts = initial_values(fit_model, target, given=given, neighbours=nbs)
    out_sigma = None
    if sigma is None:
        out_sigma = background_sigma(image, det.background, gain)
        notes.append(f"sigma from the background RMS ({det.background.sigma:.4g})"
                     + (f" and Poisson noise (gain {gain:g})" if gain is not None else ""))
    return AutoResult(model=fit_model, mask=auto_mask, starts=starts, sigma=out_sigma, detection=det,
                      target=target, neighbours=nbs, notes=notes)
