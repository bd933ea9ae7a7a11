"""Batched image and numerical kernels used by the morphology measurements.

Pure functions on tensors: images are ``(B, H, W)`` canvases (one stamp per row of the batch,
zero-padded to a common size), per-stamp extents ``ny``, ``nx`` say how much of each canvas is
the stamp. dtype and device follow the inputs. The few loops that run to convergence (component
labelling, root finding, simplex, sigma clipping) read back to the host once per iteration to
know which stamps are still active; each function says so.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "sort_rows",
    "sort_values",
    "reflect_index",
    "gaussian_filter",
    "uniform_filter",
    "connected_component",
    "label_components",
    "brentq",
    "nelder_mead",
    "sorted_range_stats",
    "SortedRanges",
]


# --------------------------------------------------------------------------------------------
# sorting (on CPU through NumPy: several times faster than torch's CPU sort for these shapes)
# --------------------------------------------------------------------------------------------

def _numpy_sortable(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dim() == 2 and not x.requires_grad


def sort_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and indices of each row of ``x`` (B, N) sorted ascending (NaN last); the order of
    equal values is unspecified."""
    if _numpy_sortable(x):
        a = x.numpy()
        idx = np.argsort(a, axis=1)
        return torch.from_numpy(np.take_along_axis(a, idx, 1)), torch.from_numpy(idx)
    out = torch.sort(x, dim=1)
    return out.values, out.indices


def sort_values(x: torch.Tensor) -> torch.Tensor:
    """Each row of ``x`` (B, N) sorted ascending (NaN last)."""
    if _numpy_sortable(x):
        return torch.from_numpy(np.sort(x.numpy(), axis=1))
    return torch.sort(x, dim=1).values


# --------------------------------------------------------------------------------------------
# filters
# --------------------------------------------------------------------------------------------

def reflect_index(t: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Index ``t`` folded into ``[0, n)`` by mirror reflection about the pixel edges
    (``d c b a | a b c d | d c b a``, scipy.ndimage's "reflect"), for any distance outside."""
    period = 2 * n
    t = torch.remainder(t, period)
    return torch.where(t >= n, period - 1 - t, t)


def _banded(kernels: torch.Tensor, n_in: int, n_out: int) -> torch.Tensor:
    """(B, n_in, n_out) matrices M with ``M[b, j + k, j] = kernels[b, k]``: ``x @ M`` correlates
    the rows of ``x`` (length n_in) with each stamp's kernel (valid part, length n_out)."""
    k = kernels.shape[1]
    off = torch.arange(n_in, device=kernels.device).view(-1, 1) - torch.arange(n_out, device=kernels.device).view(1, -1)
    band = (off >= 0) & (off < k)
    m = kernels[:, off.clamp(0, k - 1)]
    return m * band.to(kernels.dtype)


def _conv_axis(x: torch.Tensor, kernels: torch.Tensor, axis: int, pad: int) -> torch.Tensor:
    """Correlate every row (axis=-1) or column (axis=-2) of stamp ``b`` of ``x`` (B, H, W)
    with ``kernels[b]`` (B, K), zero padding ``pad`` on both sides (one batched matrix product
    with a banded matrix per stamp)."""
    b, h, w = x.shape
    if axis == -2:
        xp = F.pad(x, (0, 0, pad, pad)) if pad else x
        m = _banded(kernels, h + 2 * pad, h)
        return torch.bmm(m.transpose(1, 2), xp)
    xp = F.pad(x, (pad, pad)) if pad else x
    return torch.bmm(xp, _banded(kernels, w + 2 * pad, w))


def gaussian_filter(x: torch.Tensor, sigma: torch.Tensor, truncate: float = 4.0) -> torch.Tensor:
    """Gaussian smoothing of each stamp with its own ``sigma`` (pixels), zero outside the
    canvas ("constant" boundary, value 0), kernel truncated at ``int(truncate * sigma + 0.5)``
    pixels and normalised to unit sum, as ``scipy.ndimage.gaussian_filter(mode="constant")``.
    Pixels of the canvas outside a stamp must already be zero. On CPU with SciPy installed,
    ``scipy.ndimage.gaussian_filter`` itself (stamp by stamp)."""
    ndi = _ndimage() if _numpy_sortable(x.flatten(1)) else None
    if ndi is not None:
        xn = x.numpy()
        out = np.empty_like(xn)
        for i, si in enumerate(sigma.tolist()):
            ndi.gaussian_filter(xn[i], si, mode="constant", truncate=truncate, output=out[i])
        return torch.from_numpy(out)
    radius = torch.floor(truncate * sigma + 0.5).to(torch.long)
    rmax = int(radius.max())
    k = torch.arange(-rmax, rmax + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.dtype).clamp_min(torch.finfo(x.dtype).tiny)[:, None]
    w = torch.exp(-0.5 / (s * s) * (k * k)[None, :])
    w = torch.where(k.abs()[None, :] <= radius[:, None], w, torch.zeros_like(w))
    w = w / w.sum(1, keepdim=True)
    out = _conv_axis(x, w, -2, rmax)
    return _conv_axis(out, w, -1, rmax)


def uniform_filter(x: torch.Tensor, size: torch.Tensor, ny: torch.Tensor, nx: torch.Tensor) -> torch.Tensor:
    """Box (mean) filter of width ``size[b]`` pixels on each stamp, reflected at the stamp's own
    edges (``ny[b]`` rows, ``nx[b]`` columns), as ``scipy.ndimage.uniform_filter(mode="reflect")``;
    the window of output pixel ``j`` is ``[j - size // 2, j - size // 2 + size - 1]``. Stamps with
    ``size <= 1`` are returned unchanged. Canvas pixels outside a stamp come back as garbage.
    On CPU with SciPy installed, ``scipy.ndimage.uniform_filter`` itself (stamp by stamp)."""
    size = size.to(torch.long)
    smax = int(size.max())
    if smax <= 1:
        return x.clone()
    ndi = _ndimage() if _numpy_sortable(x.flatten(1)) else None
    if ndi is not None:
        xn = x.numpy()
        out = xn.copy()
        for i, (si, yi, xi) in enumerate(zip(size.tolist(), ny.tolist(), nx.tolist())):
            if si > 1 and yi > 0 and xi > 0:
                ndi.uniform_filter(xn[i, :yi, :xi], si, mode="reflect", output=out[i, :yi, :xi])
        return torch.from_numpy(out)
    out = x
    for axis, n in ((-2, ny), (-1, nx)):
        out = _box_axis(out, size, n.to(torch.long), smax, axis)
    return torch.where((size > 1)[:, None, None], out, x)


def _box_axis(x: torch.Tensor, size: torch.Tensor, n: torch.Tensor, smax: int, axis: int) -> torch.Tensor:
    if axis == -2:
        return _box_axis(x.transpose(1, 2), size, n, smax, -1).transpose(1, 2)
    b, h, w = x.shape
    lo = smax // 2 + 1  # extension on the left; the window of stamp b starts at j - size//2
    hi = smax + 1
    t = torch.arange(-lo, w + hi, device=x.device)
    idx = reflect_index(t[None, :], n[:, None].clamp_min(1))  # (B, L)
    ext = torch.gather(x, 2, idx[:, None, :].expand(b, h, idx.shape[1]))
    # per-stamp box kernel inside a common support: taps -lo .. hi, ones on [-size//2, size-1-size//2]
    k = torch.arange(-lo, hi + 1, device=x.device)
    start = -(size // 2)
    kern = ((k[None, :] >= start[:, None]) & (k[None, :] <= (start + size - 1)[:, None])).to(x.dtype)
    kern = kern / size.clamp_min(1).to(x.dtype)[:, None]
    return torch.bmm(ext, _banded(kern, ext.shape[-1], w))


# --------------------------------------------------------------------------------------------
# connected components (8-connectivity)
# --------------------------------------------------------------------------------------------

def _min3(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Minimum over the 3-pixel neighbourhood along ``dim`` (edges: existing neighbours only)."""
    n = x.shape[dim]
    out = x.clone()
    torch.minimum(out.narrow(dim, 1, n - 1), x.narrow(dim, 0, n - 1), out=out.narrow(dim, 1, n - 1))
    torch.minimum(out.narrow(dim, 0, n - 1), x.narrow(dim, 1, n - 1), out=out.narrow(dim, 0, n - 1))
    return out


def label_components(fg: torch.Tensor, max_iter: int = 10000) -> torch.Tensor:
    """Label the 8-connected components of ``fg`` (B, H, W): every pixel of a component gets
    the same label, the flat index (into B*H*W) of one of its pixels; the background -1.

    Parent pointers start at each pixel's own index; each round hooks the root of every pixel's
    tree onto the smallest label in the pixel's 3x3 neighbourhood (a scatter-min) and then
    shortens the trees by pointer jumping, so the number of rounds grows only slowly with the
    size of the components; one host read per round checks convergence."""
    b, h, w = fg.shape
    big = b * h * w
    fgf = fg.reshape(-1)
    parent = torch.arange(big + 1, device=fg.device)  # parent[big]: sentinel for the background
    parent[:-1].masked_fill_(~fgf, big)
    for _ in range(max_iter):
        img = parent[:-1].view(b, h, w)
        nb = _min3(_min3(img, 2), 1) if h > 1 and w > 1 else img
        nb = nb.reshape(-1).masked_fill(~fgf, big)
        old = parent.clone()
        parent.scatter_reduce_(0, old[:-1], nb, "amin")
        parent[big] = big
        for _ in range(3):
            parent = parent[parent]
        if torch.equal(parent, old):
            break
    lab = parent[:-1].view(b, h, w)
    return torch.where(fg, lab, torch.full_like(lab, -1))


def connected_component(fg: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the 8-connected component of ``fg`` (B, H, W) that holds pixel ``seed[b]``
    (flat index into H*W; a seed outside ``fg`` gives an empty mask). On CPU with SciPy
    installed the labelling is ``scipy.ndimage.label``'s (much faster there), else
    :func:`label_components`."""
    b, h, w = fg.shape
    ndi = _ndimage() if fg.device.type == "cpu" else None
    if ndi is not None:  # same labelling, one pass in C (SciPy is optional)
        structure = np.zeros((3, 3, 3), dtype=bool)
        structure[1] = True  # 8-connected within each stamp, never across stamps
        lab = torch.from_numpy(ndi.label(fg.numpy(), structure=structure)[0].astype(np.int64, copy=False))
        at = lab.reshape(b, -1).gather(1, seed.view(b, 1).to(torch.long)).view(b, 1, 1)
        return (lab == at) & (at > 0)
    lab = label_components(fg)
    at = lab.reshape(b, -1).gather(1, seed.view(b, 1).to(torch.long))
    return (lab == at.view(b, 1, 1)) & fg


_NDIMAGE: list = []


def _ndimage():
    """scipy.ndimage if installed (used for connected components on CPU), else None."""
    if not _NDIMAGE:
        try:
            from scipy import ndimage
        except ImportError:  # pragma: no cover - scipy is optional
            ndimage = None
        _NDIMAGE.append(ndimage)
    return _NDIMAGE[0]


# --------------------------------------------------------------------------------------------
# batched Brent root finder (scipy.optimize.brentq's algorithm, one problem per element)
# --------------------------------------------------------------------------------------------

def brentq(f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], xa: torch.Tensor, xb: torch.Tensor,
           fa: torch.Tensor, fb: torch.Tensor, xtol: float = 1e-6, rtol: float = 8.881784197001252e-16,
           maxiter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Roots of ``f`` bracketed by ``[xa, xb]`` (``fa``, ``fb`` of opposite signs), the steps of
    scipy's ``brentq`` (inverse quadratic interpolation / secant / bisection) taken elementwise.

    ``f(index, x)`` evaluates the problems ``index`` at ``x``. Returns ``(root, converged)``;
    elements that start on a root return it. One host read per iteration (all converged?)."""
    xpre, xcur, fpre, fcur = xa.clone(), xb.clone(), fa.clone(), fb.clone()
    xblk = torch.zeros_like(xa)
    fblk = torch.zeros_like(xa)
    spre = torch.zeros_like(xa)
    scur = torch.zeros_like(xa)
    root = torch.where(fpre == 0, xpre, xcur)
    done = (fpre == 0) | (fcur == 0)
    converged = done.clone()
    index = torch.arange(xa.shape[0], device=xa.device)
    for _ in range(maxiter):
        if bool(done.all()):
            break
        flip = (fpre != 0) & (fcur != 0) & (torch.signbit(fpre) != torch.signbit(fcur))
        xblk = torch.where(flip, xpre, xblk)
        fblk = torch.where(flip, fpre, fblk)
        spre = torch.where(flip, xcur - xpre, spre)
        scur = torch.where(flip, xcur - xpre, scur)
        swap = fblk.abs() < fcur.abs()
        xpre, xcur, xblk = torch.where(swap, xcur, xpre), torch.where(swap, xblk, xcur), torch.where(swap, xcur, xblk)
        fpre, fcur, fblk = torch.where(swap, fcur, fpre), torch.where(swap, fblk, fcur), torch.where(swap, fcur, fblk)
        delta = (xtol + rtol * xcur.abs()) / 2
        sbis = (xblk - xcur) / 2
        now = ~done & ((fcur == 0) | (sbis.abs() < delta))
        root = torch.where(now, xcur, root)
        converged = converged | now
        done = done | now
        with torch.no_grad():
            interp = xpre == xblk
            den_i = torch.where(fcur - fpre == 0, torch.ones_like(fcur), fcur - fpre)
            s_interp = -fcur * (xcur - xpre) / den_i
            dx_pre = torch.where(xpre - xcur == 0, torch.ones_like(xcur), xpre - xcur)
            dx_blk = torch.where(xblk - xcur == 0, torch.ones_like(xcur), xblk - xcur)
            dpre = (fpre - fcur) / dx_pre
            dblk = (fblk - fcur) / dx_blk
            den_e = dblk * dpre * (fblk - fpre)
            den_e = torch.where(den_e == 0, torch.ones_like(den_e), den_e)
            s_extrap = -fcur * (fblk * dblk - fpre * dpre) / den_e
            stry = torch.where(interp, s_interp, s_extrap)
            try_step = (spre.abs() > delta) & (fcur.abs() < fpre.abs())
            good = try_step & (2 * stry.abs() < torch.minimum(spre.abs(), 3 * sbis.abs() - delta))
            spre = torch.where(good, scur, sbis)
            scur = torch.where(good, stry, sbis)
        xpre, fpre = xcur, fcur
        step = torch.where(scur.abs() > delta, scur, torch.where(sbis > 0, delta, -delta))
        xnew = torch.where(done, xcur, xcur + step)
        act = (~done).nonzero().squeeze(1)
        fnew = fcur.clone()
        if act.numel():
            fnew[act] = f(index[act], xnew[act])
        xcur, fcur = xnew, fnew
    root = torch.where(done, root, xcur)
    return root, converged


# --------------------------------------------------------------------------------------------
# batched Nelder-Mead simplex (scipy.optimize.fmin's algorithm, one 2-D problem per element)
# --------------------------------------------------------------------------------------------

def nelder_mead(f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor, xtol: float = 1e-4,
                ftol: float = 1e-4, maxiter: int | None = None, maxfun: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimise ``f`` from ``x0`` (P, N) with the downhill simplex of ``scipy.optimize.fmin``:
    the same initial simplex (5 % steps, 0.00025 for zero coordinates), reflection, expansion,
    contraction and shrink coefficients (1, 2, 1/2, 1/2), ordering (stable), stopping rule
    (simplex within ``xtol`` and values within ``ftol`` of the best) and default limits
    (200 N iterations and evaluations).

    ``f(index, x)`` evaluates problems ``index`` (M,) at points ``x`` (M, N). Only the problems
    that need a point are evaluated at each step (host reads of the masks, about three per
    iteration). Returns ``(x, fval, iterations, evaluations)``.
    """
    p, n = x0.shape
    maxiter = 200 * n if maxiter is None else maxiter
    maxfun = 200 * n if maxfun is None else maxfun
    rho, chi, psi, sigma = 1.0, 2.0, 0.5, 0.5
    dev = x0.device
    sim = x0[:, None, :].repeat(1, n + 1, 1)
    for k in range(n):
        v = x0[:, k]
        sim[:, k + 1, k] = torch.where(v != 0, 1.05 * v, torch.full_like(v, 0.00025))
    allp = torch.arange(p, device=dev)
    fsim = torch.stack([f(allp, sim[:, k]) for k in range(n + 1)], 1)
    nfev = torch.full((p,), n + 1, dtype=torch.long, device=dev)
    nit = torch.ones(p, dtype=torch.long, device=dev)
    order = torch.sort(fsim, dim=1, stable=True).indices
    fsim = torch.gather(fsim, 1, order)
    sim = torch.gather(sim, 1, order[..., None].expand(-1, -1, n))
    active = torch.ones(p, dtype=torch.bool, device=dev)
    while True:
        xdone = (sim[:, 1:] - sim[:, :1]).abs().flatten(1).amax(1) <= xtol
        fdone = (fsim[:, :1] - fsim[:, 1:]).abs().amax(1) <= ftol
        active = active & ~(xdone & fdone) & (nfev < maxfun) & (nit < maxiter)
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        s, fs = sim[idx], fsim[idx]
        xbar = s[:, :-1].sum(1) / n
        worst = s[:, -1]
        xr = (1 + rho) * xbar - rho * worst
        fxr = f(idx, xr)
        expand = fxr < fs[:, 0]
        accept = ~expand & (fxr < fs[:, -2])
        outside = ~expand & ~accept & (fxr < fs[:, -1])
        inside = ~expand & ~accept & ~outside
        x2 = torch.where(expand[:, None], (1 + rho * chi) * xbar - rho * chi * worst,
                         torch.where(outside[:, None], (1 + psi * rho) * xbar - psi * rho * worst,
                                     (1 - psi) * xbar + psi * worst))
        need = ~accept
        f2 = torch.full_like(fxr, float("inf"))
        sub = need.nonzero().squeeze(1)
        if sub.numel():
            f2[sub] = f(idx[sub], x2[sub])
        new_x = torch.where((expand & (f2 < fxr))[:, None], x2, xr)
        new_f = torch.where(expand & (f2 < fxr), f2, fxr)
        take_c = (outside & (f2 <= fxr)) | (inside & (f2 < fs[:, -1]))
        new_x = torch.where(take_c[:, None], x2, new_x)
        new_f = torch.where(take_c, f2, new_f)
        shrink = (outside | inside) & ~take_c
        replace = ~shrink
        s[:, -1] = torch.where(replace[:, None], new_x, s[:, -1])
        fs[:, -1] = torch.where(replace, new_f, fs[:, -1])
        nfev[idx] += 1 + need.to(torch.long)
        sh = shrink.nonzero().squeeze(1)
        if sh.numel():
            pts = s[sh, :1] + sigma * (s[sh, 1:] - s[sh, :1])  # (S, n, N)
            s[sh, 1:] = pts
            vals = f(idx[sh].repeat_interleave(n), pts.reshape(-1, pts.shape[-1])).view(-1, n)
            fs[sh, 1:] = vals
            nfev[idx[sh]] += n
        order = torch.sort(fs, dim=1, stable=True).indices
        fs = torch.gather(fs, 1, order)
        s = torch.gather(s, 1, order[..., None].expand(-1, -1, n))
        sim[idx], fsim[idx] = s, fs
        nit[idx] += 1
    return sim[:, 0], fsim[:, 0], nit, nfev


# --------------------------------------------------------------------------------------------
# statistics of contiguous ranges of sorted values; iterative sigma clipping
# --------------------------------------------------------------------------------------------

def sorted_range_stats(values: torch.Tensor, csum: torch.Tensor, csum2: torch.Tensor, lo: torch.Tensor,
                       hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, median (mean of the two middle values for even counts) and standard deviation
    (ddof = 0) of ``values[b, lo:hi]`` of sorted ``values`` (B, N), from prefix sums
    ``csum``/``csum2`` (B, N + 1) of the values and their squares (taken about any constant)."""
    m = (hi - lo).clamp_min(1)
    mf = m.to(values.dtype)
    s1 = torch.gather(csum, 1, hi[:, None]).squeeze(1) - torch.gather(csum, 1, lo[:, None]).squeeze(1)
    s2 = torch.gather(csum2, 1, hi[:, None]).squeeze(1) - torch.gather(csum2, 1, lo[:, None]).squeeze(1)
    mean_c = s1 / mf
    var = (s2 / mf - mean_c * mean_c).clamp_min(0.0)
    i1 = (lo + (m - 1) // 2).clamp_max(values.shape[1] - 1)
    i2 = (lo + m // 2).clamp_max(values.shape[1] - 1)
    med = 0.5 * (torch.gather(values, 1, i1[:, None]) + torch.gather(values, 1, i2[:, None])).squeeze(1)
    return mean_c, med, torch.sqrt(var)


class SortedRanges:
    """Sorted values (B, N) (valid ones first, the rest +inf) with prefix sums, for statistics of
    contiguous ranges ``[lo, hi)``: mean, median (mean of the two middle values for even counts)
    and standard deviation (ddof = 0)."""

    def __init__(self, values: torch.Tensor, n: torch.Tensor):
        b, nn = values.shape
        self.values, self.n = values, n
        mid = (n // 2).clamp(0, max(nn - 1, 0))[:, None]
        shift = torch.gather(values, 1, mid)
        self.shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        v = torch.where(torch.isfinite(values), values - self.shift, torch.zeros_like(values))
        zero = torch.zeros(b, 1, dtype=values.dtype, device=values.device)
        self.csum = torch.cat([zero, torch.cumsum(v, 1)], 1)
        self.csum2 = torch.cat([zero, torch.cumsum(v * v, 1)], 1)

    def stats(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, med, std = sorted_range_stats(self.values, self.csum, self.csum2, lo, hi)
        return mean + self.shift.squeeze(1), med, std

    def clip(self, center: Callable, sigma: float = 3.0, maxiters: int = 10, lo: torch.Tensor | None = None,
             hi: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Iterative sigma clipping (astropy's ``SigmaClip`` without ``axis``): keep the values
        within ``[c - sigma * std, c + sigma * std]`` (inclusive) until nothing changes or
        ``maxiters`` rounds. Kept values of sorted data are always a contiguous range, so the
        state is ``[lo, hi)``; ``center(lo, hi)`` gives the centre of each range. One host read
        per round."""
        b = self.values.shape[0]
        lo = torch.zeros(b, dtype=torch.long, device=self.values.device) if lo is None else lo
        hi = self.n.clone() if hi is None else hi
        for _ in range(int(maxiters)):
            cen = center(lo, hi)
            std = self.stats(lo, hi)[2]
            lo_v = (cen - std * sigma)[:, None].contiguous()
            hi_v = (cen + std * sigma)[:, None].contiguous()
            new_lo = torch.maximum(torch.searchsorted(self.values, lo_v, right=False).squeeze(1), lo)
            new_hi = torch.minimum(torch.searchsorted(self.values, hi_v, right=True).squeeze(1), hi)
            new_hi = torch.maximum(new_hi, new_lo)
            changed = (new_lo != lo) | (new_hi != hi)
            lo, hi = new_lo, new_hi
            if not bool(changed.any()):
                break
        return lo, hi
