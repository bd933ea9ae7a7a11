"""MID statistics (multimode, intensity, deviation; Freeman et al. 2013, Peth et al. 2016), with
statmorph's definitions, one stamp at a time on the CPU.

Optional (``MorphologyOptions(mid=True)``): they need SciPy (labelling, filters, Brent's method,
basin-hopping) and scikit-image (local maxima and watershed), and cost several times the other
statistics together. The steps follow statmorph 0.7's (Rodriguez-Gomez et al. 2019):

* **MID segmentation**: the pixels of the target (non-negative values, masked pixels 0) above the
  value at quantile ``q``, in the 8-connected region of the brightest pixel; ``q`` is the root of
  ``value(q) / mean(region(q)) - eta`` (Brent, ``xtol`` one pixel's share of the quantile range);
  the region is smoothed by a ``boxcar_size_mid`` boxcar (> 0.5) and its 8-connected part holding
  the brightest pixel kept. Where the ratio is positive already at ``q = 0`` the segmentation is
  undefined and the Gini segmentation is used.
* **Multimode** ``M = A2 / A1``, the areas of the two largest 8-connected regions above a
  quantile of the segmented image, at the quantile that maximises ``A2^2 / A1``: a grid of
  quantiles (step 0.02, halved while no quantile has two regions, down to 1e-3), then
  basin-hopping (Nelder-Mead, ``niter_bh_mid`` hops, temperature half the best grid value, the
  grid step, seed 0).
* **Intensity** ``I = F2 / F1``: the fluxes of the two brightest watershed regions of the image
  smoothed by a Gaussian of ``sigma_mid`` pixels, grown from all its local maxima.
* **Deviation** ``D = sqrt(pi / area) |peak - centroid|``: the distance between the brightest
  region's peak and the centroid of the segmented image, in units of the radius of a disc of the
  segmentation's area.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["MIDResult", "mid_statistics", "require", "require_option"]


def require() -> None:
    """Raise ImportError, saying what to install, where SciPy or scikit-image is missing."""
    try:
        import scipy.optimize  # noqa: F401
        import skimage.segmentation  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"the MID statistics need SciPy and scikit-image (pip install 'galprof[mid]'): {exc}") \
            from None


def require_option(option: str) -> None:
    """:func:`require` for a command-line option: a :class:`~galprof.errors.DataError` (exit code
    2, a message) before any work, not an ImportError after it."""
    from ..errors import DataError

    try:
        require()
    except ImportError as exc:
        raise DataError(f"{option}: {exc}") from None


@dataclass
class MIDResult:
    multimode: float
    intensity: float
    deviation: float
    segmap: np.ndarray      # the MID segmentation (bool)
    bad: list[str]          # reasons for a bad measurement (statmorph's flag 2)


def _quantile(sorted_values: np.ndarray, q: float) -> float:
    """Value at quantile ``q`` of sorted values: the lower neighbour, index ``int(q (n - 1))``."""
    if q < 0 or q > 1:
        raise ValueError("quantiles must be in [0, 1]")
    return sorted_values[int(q * (len(sorted_values) - 1))]


def mid_statistics(image: np.ndarray, valid: np.ndarray, gini_segmap: np.ndarray, *, eta: float = 0.2,
                   boxcar_size: float = 3.0, niter_bh: int = 5, sigma: float = 1.0) -> MIDResult:
    """MID statistics of one stamp.

    Parameters
    ----------
    image : (ny, nx) float64 array
        The target's pixels (others 0; masked pixels 0), not yet clipped at 0.
    valid : (ny, nx) bool array
        The target's unmasked pixels.
    gini_segmap : (ny, nx) bool array
        The Gini segmentation (used where the MID segmentation is undefined).
    """
    from scipy import ndimage as ndi
    from scipy import optimize
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    bad: list[str] = []
    eight = ndi.generate_binary_structure(2, 2)
    nonneg = np.where(image > 0, image, 0.0)
    sorted_vals = np.sort(nonneg[valid])
    # the brightest pixel (first in row-major order) of the target
    yc_max, xc_max = np.unravel_index(int(np.argmax(image)), image.shape)

    def main_clump(q):
        above = nonneg >= _quantile(sorted_vals, q)
        labels, _ = ndi.label(above, structure=eight)
        return labels == labels[yc_max, xc_max]

    def ratio(q):
        clump = main_clump(q)
        mean = np.mean(nonneg[clump])
        if mean == 0:
            bad.append("MID segmentation: zero flux")
            return 1.0 - eta
        return _quantile(sorted_vals, q) / mean - eta

    if ratio(0.0) > 0.0:
        segmap = np.asarray(gini_segmap, dtype=bool)
    else:
        q = optimize.brentq(ratio, 0.0, 1.0, xtol=1.0 / float(len(sorted_vals)))
        smooth = ndi.uniform_filter(main_clump(q).astype(np.float64), size=boxcar_size)
        seg = smooth > 0.5
        if not seg[yc_max, xc_max]:
            bad.append("MID segmentation: brightest pixel added")
            seg[yc_max, xc_max] = True
        labels, _ = ndi.label(seg, structure=eight)
        segmap = labels == labels[yc_max, xc_max]

    cut = np.where(segmap, nonneg, 0.0)
    sorted_mid = np.sort(cut[valid])

    # multimode
    def counts(q):
        labels, _ = ndi.label(cut >= _quantile(sorted_mid, q), structure=eight)
        _, c = np.unique(labels[labels != 0], return_counts=True)
        return np.sort(c)[::-1]

    invalid = float(np.sum(cut))

    def objective(q):
        q = float(np.ravel(q)[0])
        if q < 0 or q > 1:
            return invalid
        c = counts(q)
        return invalid if len(c) == 1 else -1.0 * float(c[1]) ** 2 / float(c[0])

    step = 0.02
    multimode = None
    while True:
        grid = np.arange(0.0, 1.0, step)
        vals = np.array([objective(q) for q in grid])
        k = int(np.argmin(vals))
        if vals[k] < 0:
            break
        if step < 1e-3:
            multimode = 0.0  # a single region at every quantile
            break
        step = step / 2.0
    if multimode is None:
        res = optimize.basinhopping(objective, grid[k], minimizer_kwargs={"method": "Nelder-Mead"},
                                    niter=niter_bh, T=-0.5 * vals[k], stepsize=step, interval=niter_bh / 2,
                                    disp=False, seed=0)
        c = counts(float(res.x[0]))
        multimode = float(c[1]) / float(c[0])

    # intensity and deviation
    smooth = ndi.gaussian_filter(cut, sigma)
    peaks = peak_local_max(smooth, num_peaks=np.inf)
    npk = peaks.shape[0]
    markers = np.zeros(smooth.shape, dtype=np.int64)
    markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, npk + 1)
    regions = watershed(-smooth, markers, connectivity=2, mask=smooth > 0)
    flux = np.array([np.sum(smooth[regions == lab]) for lab in range(1, npk + 1)], dtype=np.float64)
    order = np.argsort(flux)[::-1]
    flux = flux[order]
    intensity = 0.0 if npk <= 1 else float(flux[1] / flux[0])
    deviation = math.nan
    if npk == 0:
        bad.append("deviation: no peaks")
    else:
        yp, xp = peaks[order[0]]
        m00 = np.sum(cut)
        if m00 <= 0:
            bad.append("deviation: nonpositive flux in the MID segmentation")
        else:
            yy, xx = np.indices(cut.shape)
            yc, xc = np.sum(yy * cut) / m00, np.sum(xx * cut) / m00
            area = float(np.sum(segmap))
            d = math.sqrt(math.pi / area) * math.hypot(xp - xc, yp - yc) if area > 0 else math.inf
            if math.isfinite(d):
                deviation = d
            else:
                bad.append("deviation: not finite")
    return MIDResult(multimode, intensity, deviation, segmap, bad)
