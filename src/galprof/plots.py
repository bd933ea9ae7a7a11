"""Diagnostic plots (matplotlib, an optional dependency: ``pip install 'galprof[plots]'``).

Per galaxy, :func:`galaxy_figure`: data, model, residual and mask panels on one shared stretch, and
the 1-D surface-brightness profile of the data, the model and each component in elliptical annuli
(radius in pixels, and in arcsec on the top axis when the plate scale is known). Per catalogue:
:func:`parameter_distributions`, :func:`chi2nu_histogram`, :func:`compare_runs` (two runs of the
same galaxies) and :func:`corner_plot` (e.g. bootstrap samples); :func:`catalog_plots` writes them.

Figures are :class:`matplotlib.figure.Figure` objects made without pyplot (no global state, no
interactive backend); save them with ``fig.savefig(path)``. Every panel has a title (``"data"``,
``"model"``, ``"residual"``, ``"mask"``, ``"profile"``, a column name ...), so a figure can be
inspected by its axes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .errors import GalprofError

__all__ = ["PlotsUnavailable", "check_available", "galaxy_figure", "surface_brightness_profile",
           "parameter_distributions", "chi2nu_histogram", "compare_runs", "corner_plot", "bootstrap_corner",
           "catalog_plots"]


class PlotsUnavailable(GalprofError, ImportError):
    """matplotlib is not installed."""


def check_available() -> None:
    """Raise :class:`PlotsUnavailable` if matplotlib cannot be imported (call it before a long
    run that will plot, to fail at the start rather than at the end)."""
    _figure((1, 1))


def _figure(figsize):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotsUnavailable("galprof's plots need matplotlib: pip install 'galprof[plots]'") from None
    return Figure(figsize=figsize, layout="constrained")


# ----------------------------------------------------------------------------------------------
# One galaxy


def _ellipse_geometry(model, values: Mapping[str, float]):
    """Centre, q and PA of the brightest elliptical component (None if the model has none)."""
    best = None
    for c in model.components:
        if c.profile.kind != "elliptical":
            continue
        mag = float(values[f"{c.name}.mag"])
        if best is None or mag < best[0]:
            best = (mag, c.name)
    if best is None:
        return None
    n = best[1]
    return (float(values[f"{n}.x0"]), float(values[f"{n}.y0"]), float(values[f"{n}.q"]), float(values[f"{n}.pa"]))


def elliptical_radius(shape: tuple[int, int], geometry, offset=(0, 0)) -> np.ndarray:
    """Elliptical radius (pixels, semi-major) of every pixel of a stamp whose first pixel is pixel
    ``(offset[0] + 1, offset[1] + 1)`` of the image (docs/conventions.md)."""
    x0, y0, q, pa = geometry
    ny, nx = shape
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    dx = x + 1 + offset[0] - x0
    dy = y + 1 + offset[1] - y0
    t = math.radians(pa)
    u = -dx * math.sin(t) + dy * math.cos(t)
    v = -dx * math.cos(t) - dy * math.sin(t)
    return np.sqrt(u * u + (v / q) ** 2)


def surface_brightness_profile(images: Mapping[str, np.ndarray], radius: np.ndarray, good: np.ndarray,
                               sigma: np.ndarray | None = None, *, growth: float = 1.25):
    """Mean surface brightness (counts/pixel) of each image in elliptical annuli of ``radius``
    over the ``good`` pixels: ``(r_mid, {name: mean}, error of the first image's mean)``.

    Annuli are 1 px wide out to 4 px and grow by ``growth`` beyond; the error is
    ``sqrt(sum sigma^2) / N`` (NaN without ``sigma``).
    """
    rmax = float(radius[good].max()) if good.any() else 1.0
    edges = [0.0, 1.0, 2.0, 3.0, 4.0]
    while edges[-1] < rmax:
        edges.append(edges[-1] * growth)
    edges = np.asarray(edges)
    idx = np.digitize(radius, edges) - 1
    nb = len(edges) - 1
    sel = good & (idx >= 0) & (idx < nb)
    counts = np.bincount(idx[sel], minlength=nb).astype(float)
    r_sum = np.bincount(idx[sel], weights=radius[sel], minlength=nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        r_mid = r_sum / counts
        means = {name: np.bincount(idx[sel], weights=img[sel], minlength=nb) / counts for name, img in images.items()}
        if sigma is not None:
            err = np.sqrt(np.bincount(idx[sel], weights=sigma[sel] ** 2, minlength=nb)) / counts
        else:
            err = np.full(nb, np.nan)
    keep = counts > 0
    return r_mid[keep], {k: v[keep] for k, v in means.items()}, err[keep]


def galaxy_figure(model, values: Mapping[str, float], data: np.ndarray, model_image: np.ndarray,
                  components: Mapping[str, np.ndarray] | None = None, *, mask: np.ndarray | None = None,
                  sigma: np.ndarray | None = None, offset: tuple[int, int] = (0, 0),
                  plate_scale: tuple[float, float] | float | None = None, zeropoint: float | None = None,
                  title: str | None = None):
    """Data, model, residual and mask panels (one shared asinh stretch: the residual is shown on
    the data's scale) and the surface-brightness profile of the data, the model and each component.

    Parameters
    ----------
    model : Model; values : its (fitted) values ``{"comp.param": value}`` in image coordinates
    data, model_image : 2-D arrays of the fitted region; components : per-component images
    mask : bad pixels (True / non-zero); sigma : 1-sigma noise (for the profile's error bars)
    offset : (dx, dy) of the region in the image (pixel (1, 1) of the region is (dx + 1, dy + 1))
    plate_scale : arcsec per pixel (a number or (dx, dy)): adds the arcsec axis, and the profile in
        mag/arcsec^2; counts/pixel otherwise (NaN counts as unknown)
    zeropoint : magnitude zero point of the image's counts (default: the model's)
    """
    from matplotlib.colors import AsinhNorm

    data = np.asarray(data, dtype=np.float64)
    model_image = np.asarray(model_image, dtype=np.float64)
    bad = np.zeros(data.shape, bool) if mask is None else np.asarray(mask, bool)
    good = ~bad & np.isfinite(data)
    if sigma is not None:
        good &= np.isfinite(sigma) & (sigma > 0)
    fig = _figure((13.5, 3.4))
    axes = fig.subplots(1, 5, gridspec_kw={"width_ratios": [1, 1, 1, 1, 1.5]})
    vals = data[good] if good.any() else np.zeros(1)
    noise = float(np.median(sigma[good])) if sigma is not None and good.any() else float(np.std(vals))
    vmax = float(np.percentile(vals, 99.7))
    noise = noise if noise > 0 else max(abs(vmax), 1.0) * 1e-3
    vmin = -3.0 * noise
    norm = AsinhNorm(linear_width=max(noise, 1e-12), vmin=vmin, vmax=max(vmax, vmin + noise))
    extent = (offset[0] + 0.5, offset[0] + data.shape[1] + 0.5, offset[1] + 0.5, offset[1] + data.shape[0] + 0.5)
    shown = np.where(bad, np.nan, data)
    for ax, img, name in ((axes[0], shown, "data"), (axes[1], model_image, "model"),
                          (axes[2], np.where(bad, np.nan, data - model_image), "residual")):
        im = ax.imshow(img, origin="lower", cmap="viridis", norm=norm, extent=extent, interpolation="nearest")
        ax.set_title(name)
        ax.set_xlabel("x [px]")
    axes[0].set_ylabel("y [px]")
    fig.colorbar(im, ax=axes[:3], shrink=0.8, label="counts / px (asinh stretch)")
    axes[3].imshow(bad, origin="lower", cmap="gray_r", vmin=0, vmax=1, extent=extent, interpolation="nearest")
    axes[3].set_title("mask")
    axes[3].set_xlabel("x [px]")
    zp = float(model.zeropoint) if zeropoint is None else float(zeropoint)
    _profile_panel(axes[4], model, values, data, model_image, components or {}, good, sigma, offset, plate_scale,
                   zp)
    if title:
        fig.suptitle(title)
    return fig


def _scale(plate_scale):
    if plate_scale is None:
        return None
    if np.ndim(plate_scale) == 0:
        scale = (float(plate_scale), float(plate_scale))
    else:
        scale = (float(plate_scale[0]), float(plate_scale[1]))
    return scale if all(math.isfinite(s) and s > 0 for s in scale) else None


def _profile_panel(ax, model, values, data, model_image, components, good, sigma, offset, plate_scale, zp):
    ax.set_title("profile")
    geometry = _ellipse_geometry(model, values)
    if geometry is None:
        ax.text(0.5, 0.5, "no elliptical component", ha="center", transform=ax.transAxes)
        return
    radius = elliptical_radius(data.shape, geometry, offset)
    images = {"data": data, "model": model_image, **{f"{k}": v for k, v in components.items()}}
    r, means, err = surface_brightness_profile(images, radius, good, sigma)
    scale = _scale(plate_scale)
    if scale is not None:
        area = scale[0] * scale[1]

        def conv(sb):
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(sb > 0, zp - 2.5 * np.log10(np.where(sb > 0, sb, 1.0) / area), np.nan)

        d = conv(means["data"])
        with np.errstate(invalid="ignore", divide="ignore"):
            derr = 2.5 / np.log(10) * err / means["data"]
        ax.errorbar(r, d, yerr=np.where(np.isfinite(derr), np.abs(derr), 0), fmt="o", ms=3, color="k", label="data")
        ax.plot(r, conv(means["model"]), "-", color="C3", lw=1.5, label="model")
        for i, name in enumerate(components):
            ax.plot(r, conv(means[name]), "--", lw=1, color=f"C{i % 10}", label=name)
        ax.invert_yaxis()
        ax.set_ylabel("mu [mag / arcsec^2]")
        s = math.sqrt(area)
        top = ax.secondary_xaxis("top", functions=(lambda x: x * s, lambda a: a / s))
        top.set_xlabel("semi-major radius [arcsec]")
    else:
        ax.errorbar(r, means["data"], yerr=np.where(np.isfinite(err), err, 0), fmt="o", ms=3, color="k",
                    label="data")
        ax.plot(r, means["model"], "-", color="C3", lw=1.5, label="model")
        for i, name in enumerate(components):
            ax.plot(r, means[name], "--", lw=1, color=f"C{i % 10}", label=name)
        ax.set_yscale("symlog", linthresh=max(float(np.nanmedian(np.abs(err))) if np.isfinite(err).any() else 1e-3,
                                             1e-12))
        ax.set_ylabel("counts / px")
    ax.set_xlim(0, None)
    ax.set_xlabel("semi-major radius [px]")
    ax.legend(fontsize=7, loc="best")


# ----------------------------------------------------------------------------------------------
# Catalogues


_STAT_COLUMNS = ("id", "chi2", "dof", "chi2_nu", "n_iter", "status", "flags", "message")


def parameter_columns(table) -> list[str]:
    """The ``<component>_<param>`` columns of a results table that vary (fixed ones are left out)."""
    cols = []
    for c in table.colnames:
        if c in _STAT_COLUMNS or c.endswith("_err") or f"{c}_err" not in table.colnames:
            continue
        v = np.asarray(table[c], dtype=float)
        v = v[np.isfinite(v)]
        if v.size and np.ptp(v) > 0:
            cols.append(c)
    return cols


def _grid(n):
    ncol = min(4, max(n, 1))
    return int(math.ceil(n / ncol)), ncol


def parameter_distributions(table, columns: Sequence[str] | None = None, *, bins: int = 30, converged_only=True):
    """Histograms of the fitted parameters of a results table (one panel per column)."""
    columns = list(columns) if columns is not None else parameter_columns(table)
    rows, ncol = _grid(len(columns))
    fig = _figure((3.2 * ncol, 2.6 * rows))
    axes = np.atleast_1d(fig.subplots(rows, ncol)).reshape(-1)
    ok = _converged(table) if converged_only else np.ones(len(table), bool)
    for ax, c in zip(axes, columns):
        v = np.asarray(table[c], dtype=float)[ok]
        v = v[np.isfinite(v)]
        ax.hist(v, bins=bins, color="C0", alpha=0.8)
        ax.set_title(c)
        ax.set_ylabel("galaxies")
    for ax in axes[len(columns):]:
        ax.set_visible(False)
    fig.suptitle(f"parameter distributions ({int(ok.sum())} of {len(table)} galaxies)")
    return fig


def _converged(table) -> np.ndarray:
    if "status" not in table.colnames:
        return np.ones(len(table), bool)
    return np.array([str(s).strip() == "converged" for s in table["status"]])


def chi2nu_histogram(table, *, bins: int = 40):
    """Histogram of the reduced chi^2 of a results table, with its median."""
    fig = _figure((5, 3.4))
    ax = fig.subplots()
    v = np.asarray(table["chi2_nu"], dtype=float)
    v = v[np.isfinite(v)]
    ax.hist(v, bins=bins, color="C0", alpha=0.8)
    if v.size:
        ax.axvline(float(np.median(v)), color="C3", ls="--", label=f"median {np.median(v):.3g}")
        ax.legend()
    ax.set_title("chi2_nu")
    ax.set_xlabel("reduced chi^2")
    ax.set_ylabel("galaxies")
    return fig


def compare_runs(a, b, columns: Sequence[str] | None = None, *, labels: tuple[str, str] = ("run A", "run B")):
    """Parameters of two runs on the same galaxies (matched by ``id``): run B against run A with the
    1:1 line; each panel notes the median of ``(B - A) / sqrt(err_A^2 + err_B^2)``."""
    ids_a = {str(i).strip(): k for k, i in enumerate(a["id"])}
    pairs = [(ids_a[str(i).strip()], k) for k, i in enumerate(b["id"]) if str(i).strip() in ids_a]
    if not pairs:
        raise GalprofError("compare_runs: the two tables share no id")
    ia, ib = (np.array(x) for x in zip(*pairs))
    if columns is None:
        columns = [c for c in parameter_columns(a) if c in b.colnames]
    rows, ncol = _grid(len(columns))
    fig = _figure((3.2 * ncol, 3.0 * rows))
    axes = np.atleast_1d(fig.subplots(rows, ncol)).reshape(-1)
    for ax, c in zip(axes, columns):
        va = np.asarray(a[c], dtype=float)[ia]
        vb = np.asarray(b[c], dtype=float)[ib]
        ea = np.asarray(a[c + "_err"], dtype=float)[ia] if c + "_err" in a.colnames else np.full(len(ia), np.nan)
        eb = np.asarray(b[c + "_err"], dtype=float)[ib] if c + "_err" in b.colnames else np.full(len(ib), np.nan)
        ax.errorbar(va, vb, xerr=np.nan_to_num(ea), yerr=np.nan_to_num(eb), fmt="o", ms=3, alpha=0.7)
        finite = np.isfinite(va) & np.isfinite(vb)
        if finite.any():
            lo, hi = float(min(va[finite].min(), vb[finite].min())), float(max(va[finite].max(), vb[finite].max()))
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        with np.errstate(invalid="ignore", divide="ignore"):
            pull = (vb - va) / np.sqrt(ea**2 + eb**2)
        pull = pull[np.isfinite(pull)]
        if pull.size:
            ax.text(0.04, 0.92, f"median pull {np.median(pull):+.2f}", transform=ax.transAxes, fontsize=8)
        ax.set_title(c)
        ax.set_xlabel(labels[0])
        ax.set_ylabel(labels[1])
    for ax in axes[len(columns):]:
        ax.set_visible(False)
    return fig


def corner_plot(samples: np.ndarray, names: Sequence[str], *, truths: Sequence[float] | None = None,
                bins: int = 30):
    """A corner plot of samples ``(N, P)`` (e.g. bootstrap fits): histograms on the diagonal,
    2-D histograms below it."""
    samples = np.asarray(samples, dtype=float)
    if samples.ndim != 2 or samples.shape[1] != len(names):
        raise GalprofError(f"corner_plot: samples must be (N, {len(names)}), got {samples.shape}")
    P = samples.shape[1]
    fig = _figure((2.2 * P, 2.2 * P))
    axes = np.atleast_2d(fig.subplots(P, P, squeeze=False))
    for i in range(P):
        for j in range(P):
            ax = axes[i, j]
            if j > i:
                ax.set_visible(False)
                continue
            xi = samples[:, j]
            if i == j:
                ax.hist(xi[np.isfinite(xi)], bins=bins, color="C0", histtype="step")
                ax.set_title(names[i], fontsize=8)
            else:
                yi = samples[:, i]
                ok = np.isfinite(xi) & np.isfinite(yi)
                ax.hist2d(xi[ok], yi[ok], bins=bins, cmap="Greys")
                if truths is not None:
                    ax.axhline(truths[i], color="C3", lw=0.8)
            if truths is not None:
                ax.axvline(truths[j], color="C3", lw=0.8)
            if i == P - 1:
                ax.set_xlabel(names[j], fontsize=8)
            if j == 0 and i > 0:
                ax.set_ylabel(names[i], fontsize=8)
    return fig


def bootstrap_corner(result, index: int = 0, keys: Sequence[str] | None = None, *, bins: int = 30):
    """The corner plot of one galaxy's bootstrap fits (``galprof.fit(..., uncertainty="bootstrap")``):
    its refitted values of the free parameters (or ``keys``), the best fit marked."""
    samples = getattr(result, "bootstrap_samples", None)
    if not samples:
        raise GalprofError("bootstrap_corner: the result has no bootstrap samples (fit with uncertainty='bootstrap')")
    keys = list(keys) if keys is not None else [k for k in result.free if k in samples]
    data = np.stack([np.asarray(samples[k])[index] for k in keys], axis=1)
    truths = [float(np.asarray(result.values[k])[index]) for k in keys]
    return corner_plot(data, keys, truths=truths, bins=bins)


def catalog_plots(table, out: str | os.PathLike, *, compare=None, labels=("this run", "other run"),
                  prefix: str = "") -> list[Path]:
    """Write ``parameters.png``, ``chi2nu.png`` and, with ``compare`` (another results table),
    ``compare.png`` to folder ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in (("parameters", parameter_distributions(table)), ("chi2nu", chi2nu_histogram(table))):
        p = out / f"{prefix}{name}.png"
        fig.savefig(p, dpi=100)
        paths.append(p)
    if compare is not None:
        p = out / f"{prefix}compare.png"
        compare_runs(table, compare, labels=labels).savefig(p, dpi=100)
        paths.append(p)
    return paths
