"""Exact aperture photometry about a fixed centre, for many radii: curves of growth,
Petrosian radii and radii that enclose a fraction of the light.

For one centre (and ellipse shape) per stamp the pixels are sorted by their elliptical radius
``rho`` (semi-major axis of the ellipse through the pixel centre). A pixel whose centre has
``rho < a - delta`` lies wholly inside the ellipse of semi-major axis ``a`` and one with
``rho >= a + delta`` wholly outside, ``delta = sqrt(2) / 2 * a / b``; so the sum over the
aperture is a prefix sum plus the exact overlaps of the pixels of a thin ring, found by
``searchsorted``. This gives photutils' "exact" aperture sums at the cost of the ring only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import asymmetry_jit
from .asymmetry_jit import HALF_DIAG as _HALF_DIAG
from .geometry import circle_pixel_overlap, ellipse_pixel_overlap
from .kernels import brentq, sort_rows

__all__ = ["RadialProfile", "petrosian_radius", "fraction_radius"]



def _scan_chunk(device: torch.device) -> int:
    """Grid points evaluated per scan step: the cost of a point grows with its radius and most
    stamps stop early, so small steps on CPUs (less arithmetic wasted past the crossing), larger
    ones on GPUs (fewer host synchronisations)."""
    return 3 if torch.device(device).type == "cpu" else 10


class RadialProfile:
    """Sorted pixels of each stamp about ``(xc, yc)`` for exact sums over concentric ellipses.

    Parameters
    ----------
    channels : (B, C, H, W) tensor
        Images to sum (pixels outside the stamp must be zero).
    inside : (B, H, W) bool tensor
        Pixels that belong to the stamp (the others are never counted).
    xc, yc : (B,) tensors
        Centre (pixels; pixel ``[i, j]`` is centred at ``x = j``, ``y = i``).
    elongation, theta : (B,) tensors or None
        ``a / b`` and the angle of the major axis (radians, counter-clockwise from +x);
        None for circles.
    """

    def __init__(self, channels: torch.Tensor, inside: torch.Tensor, xc: torch.Tensor, yc: torch.Tensor,
                 elongation: torch.Tensor | None = None, theta: torch.Tensor | None = None):
        b, c, h, w = channels.shape
        dt, dev = channels.dtype, channels.device
        self.dtype, self.device = dt, dev
        yy = torch.arange(h, dtype=dt, device=dev).view(1, h, 1)
        xx = torch.arange(w, dtype=dt, device=dev).view(1, 1, w)
        dx = (xx - xc.view(b, 1, 1)).expand(b, h, w)
        dy = (yy - yc.view(b, 1, 1)).expand(b, h, w)
        if elongation is None:
            self.elong = torch.ones(b, dtype=dt, device=dev)
            self.cos = torch.ones(b, dtype=dt, device=dev)
            self.sin = torch.zeros(b, dtype=dt, device=dev)
            rho = torch.sqrt(dx * dx + dy * dy)
        else:
            self.elong, self.cos, self.sin = elongation.to(dt), torch.cos(theta.to(dt)), torch.sin(theta.to(dt))
            cs, sn, e = self.cos.view(b, 1, 1), self.sin.view(b, 1, 1), self.elong.view(b, 1, 1)
            u = dx * cs + dy * sn
            v = (dy * cs - dx * sn) * e
            rho = torch.sqrt(u * u + v * v)
        rho = torch.where(inside, rho, torch.full_like(rho, float("inf"))).reshape(b, h * w)
        self.rho, order = sort_rows(rho.contiguous())
        self.order = order  # (B, N) flat pixel index; offsets from the centre are recomputed from it
        self.w = w
        self.xc, self.yc = xc.to(dt), yc.to(dt)
        self.delta = _HALF_DIAG * self.elong
        # sorted channels laid out (B, N, C): a pixel's channels are contiguous
        chans = channels.reshape(b, c, h * w).transpose(1, 2)
        self.vals = torch.gather(chans, 1, order[:, :, None].expand(b, h * w, c))
        zero = torch.zeros(b, 1, c, dtype=dt, device=dev)
        self.cum = torch.cat([zero, torch.cumsum(self.vals, 1)], 1)  # (B, N + 1, C)
        self.circular = elongation is None
        # on a CPU in float64 with numba: the compiled sums (same arithmetic, one pass)
        self._compiled = (asymmetry_jit.ENABLED and dev.type == "cpu" and dt == torch.float64)

    def add_channel(self, image: torch.Tensor) -> int:
        """Append a (B, H, W) image as a new channel; returns its index."""
        b = image.shape[0]
        ch = torch.gather(image.reshape(b, -1), 1, self.order)[:, :, None]
        self.vals = torch.cat([self.vals, ch], 2)
        zero = torch.zeros(b, 1, 1, dtype=self.dtype, device=self.device)
        self.cum = torch.cat([self.cum, torch.cat([zero, torch.cumsum(ch, 1)], 1)], 2)
        return self.vals.shape[2] - 1

    def sums(self, a: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Exact sums of every channel over the ellipses of semi-major axis ``a`` (B', Q) of the
        stamps ``index`` (B',; default all). Returns (B', C, Q). ``a <= 0`` gives 0.

        The crossed pixels of all (stamp, radius) pairs are laid out end to end (no padding),
        their exact overlaps computed once and summed back per pair (one host read for the
        total count)."""
        b_all, n = self.rho.shape
        c = self.vals.shape[2]
        if index is None:
            index = torch.arange(b_all, device=self.device)
        a = a.to(self.dtype)
        bq, q = a.shape
        if bq == 0 or q == 0:
            return torch.zeros(bq, c, q, dtype=self.dtype, device=self.device)
        if self._compiled and not (self.vals.requires_grad or a.requires_grad):
            out = torch.empty(bq, c, q, dtype=self.dtype)
            asymmetry_jit.radial_sums(self.rho.numpy(), self.order.numpy(), self.vals.numpy(), self.cum.numpy(),
                                      self.xc.numpy(), self.yc.numpy(), self.w, self.delta.numpy(),
                                      self.elong.numpy(), self.cos.numpy(), self.sin.numpy(), self.circular,
                                      index.numpy(), a.contiguous().numpy(), out.numpy())
            return out
        # searchsorted on all rows (no copy of the sorted radii); rows not asked for get a = 0
        full = torch.zeros(b_all, q, dtype=self.dtype, device=self.device)
        full[index] = a
        delta = self.delta[:, None]
        k0 = torch.searchsorted(self.rho, (full - delta).contiguous())[index]
        k1 = torch.searchsorted(self.rho, (full + delta).contiguous())[index]
        # prefix sums below the ring, read from the flat cumulative table without copying rows
        pos0 = (index[:, None] * (n + 1) + k0)[:, None, :] * c  # (bq, 1, Q) into the flat (B, N + 1, C) table
        chan = torch.arange(c, device=self.device)[None, :, None]
        base = self.cum.reshape(-1).index_select(0, (pos0 + chan).reshape(-1)).view(bq, c, q)
        counts = (k1 - k0).reshape(-1)
        total = int(counts.sum())
        if total == 0:
            return base
        pair = torch.repeat_interleave(torch.arange(bq * q, device=self.device), counts, output_size=total)
        start = torch.cumsum(counts, 0) - counts
        pos = k0.reshape(-1)[pair] + torch.arange(total, device=self.device) - start[pair]
        stamp = index[pair // q]
        flat = stamp * n + pos
        pix = self.order.reshape(-1).index_select(0, flat)
        dx = (pix % self.w).to(self.dtype) - self.xc[stamp]
        dy = (pix // self.w).to(self.dtype) - self.yc[stamp]
        ap = a.reshape(-1)[pair]
        if self.circular:
            w = circle_pixel_overlap(dx, dy, ap)
        else:
            w = ellipse_pixel_overlap(dx, dy, ap, self.elong[stamp], self.cos[stamp], self.sin[stamp])
        vals = self.vals.reshape(b_all * n, c).index_select(0, flat)  # (T, C)
        ring = torch.zeros(bq * q, c, dtype=self.dtype, device=self.device)
        ring.index_add_(0, pair, vals * w[:, None])
        return base + ring.view(bq, q, c).transpose(1, 2)


def _linspace(lo: torch.Tensor, hi: torch.Tensor, num: int) -> torch.Tensor:
    """``numpy.linspace(lo, hi, num)`` for each element of ``lo``/``hi`` (B,) -> (B, num)."""
    k = torch.arange(num, dtype=lo.dtype, device=lo.device)
    step = (hi - lo) / (num - 1)
    out = lo[:, None] + k[None, :] * step[:, None]
    out[:, -1] = hi
    return out


def _scan(fun: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], grid: torch.Tensor, stop: Callable,
          active: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First grid index ``k`` where ``stop(fun(k))`` holds, for each active stamp, evaluating
    ``fun(index, radii)`` on chunks of grid points and only for stamps still searching.
    Returns ``(k, f[k - 1], f[k])``; ``k = num`` where no grid point stops, and then
    ``f[k - 1]`` is the last value."""
    b, num = grid.shape
    chunk = chunk or _scan_chunk(grid.device)
    first = torch.full((b,), num, dtype=torch.long, device=grid.device)
    fprev = torch.full((b,), float("nan"), dtype=grid.dtype, device=grid.device)
    fk = torch.full((b,), float("nan"), dtype=grid.dtype, device=grid.device)
    searching = active.clone()
    for s in range(0, num, chunk):
        idx = searching.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        vals = fun(idx, grid[idx, s:s + chunk])  # (M, G)
        hit = stop(vals)
        g = vals.shape[1]
        anyhit = hit.any(1)
        k_local = torch.where(anyhit, hit.to(torch.int8).argmax(1), torch.full_like(anyhit, g, dtype=torch.long))
        prev_vals = torch.cat([fprev[idx, None], vals], 1)  # value before each grid point
        kk = k_local.clamp_max(g - 1)
        fprev[idx] = torch.where(anyhit, torch.gather(prev_vals, 1, kk[:, None]).squeeze(1), vals[:, -1])
        fk[idx] = torch.where(anyhit, torch.gather(vals, 1, kk[:, None]).squeeze(1), fk[idx])
        first[idx] = torch.where(anyhit, s + k_local, first[idx])
        searching[idx] = ~anyhit
    return first, fprev, fk


def petrosian_radius(prof: RadialProfile, a_outer: torch.Tensor, active: torch.Tensor, eta: float = 0.2,
                     annulus_width: float = 1.0, npoints: int = 100, xtol: float = 1e-6
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Petrosian semi-major axis (pixels) about the profile's centre, as statmorph computes it.

    The ratio of the mean surface brightness in the annulus ``[a - w/2, a + w/2]`` to the mean
    inside ``a`` (masked and off-stamp pixels excluded from both areas: channel 1 of the profile
    holds 1 for usable pixels) minus ``eta`` is scanned on ``npoints`` semi-major axes from ``w``
    to ``a_outer``; the root is bracketed at the first negative value and refined with Brent's
    method. Returns ``(a_petro, at_limit, zero_mean)``: ``at_limit`` marks stamps where the ratio
    is below ``eta`` already at ``w`` (result ``w``) or never falls below it (result ``a_outer``);
    ``zero_mean`` where the mean inside the aperture was 0 at the result."""
    dt = prof.dtype
    b = a_outer.shape[0]
    zero_mean = torch.zeros(b, dtype=torch.bool, device=prof.device)

    def fun(idx, a):
        rad = torch.cat([a - 0.5 * annulus_width, a, a + 0.5 * annulus_width], 1)
        s = prof.sums(rad, idx)
        q = a.shape[1]
        s_in, s_ap, s_out = s[..., :q], s[..., q:2 * q], s[..., 2 * q:]
        ann_f, ann_a = s_out[:, 0] - s_in[:, 0], s_out[:, 1] - s_in[:, 1]
        ap_f, ap_a = s_ap[:, 0], s_ap[:, 1]
        ann_mean = torch.where(ann_a != 0, ann_f / torch.where(ann_a != 0, ann_a, torch.ones_like(ann_a)),
                               torch.zeros_like(ann_a)).abs()
        ap_mean = torch.where(ap_a != 0, ap_f / torch.where(ap_a != 0, ap_a, torch.ones_like(ap_a)),
                              torch.zeros_like(ap_a)).abs()
        ratio = torch.where(ap_mean != 0, ann_mean / torch.where(ap_mean != 0, ap_mean, torch.ones_like(ap_mean)),
                            (ann_mean != 0).to(dt))
        return ratio - eta, ap_mean == 0

    inner = torch.full((b,), float(annulus_width), dtype=dt, device=prof.device)
    grid = _linspace(inner, a_outer.to(dt), npoints)
    k, fprev, fk = _scan(lambda i, a: fun(i, a)[0], grid, lambda v: ~(v > 0), active)
    # statmorph: an exact zero is the answer; the first non-positive value ends the scan
    kk = k.clamp_max(npoints - 1)
    at_k = torch.gather(grid, 1, kk[:, None]).squeeze(1)
    result = torch.where(k >= npoints, a_outer.to(dt), at_k)
    at_limit = active & ((k >= npoints) | ((k == 0) & (fk != 0)))
    result = torch.where(active & (k == 0), inner, result)
    need = active & (k > 0) & (k < npoints) & (fk != 0)
    idx = need.nonzero().squeeze(1)
    if idx.numel():
        lo = torch.gather(grid[idx], 1, (k[idx] - 1)[:, None]).squeeze(1)
        hi = at_k[idx]
        root, _ = brentq(lambda i, x: fun(idx[i], x[:, None])[0][:, 0], lo, hi, fprev[idx], fk[idx], xtol=xtol)
        result[idx] = root
    ok = active.nonzero().squeeze(1)
    if ok.numel():
        zero_mean[ok] = fun(ok, result[ok, None])[1][:, 0]
    return result, at_limit, zero_mean


def fraction_radius(prof: RadialProfile, r_total: torch.Tensor, fractions: list[float], active: torch.Tensor,
                    npoints: int = 100, xtol: float = 1e-6, channel: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Semi-major axes (pixels) of the ellipses that hold ``fractions`` of the light inside
    ``r_total`` (statmorph's ``_radius_at_fraction_of_total_*``): the absolute value of the
    aperture sum divided by the absolute total is scanned on ``npoints`` axes from 0 to
    ``r_total`` and the first crossing refined with Brent's method.

    Returns ``(radii (B, F), zero_total (B,), negative_total (B,))``; with a zero total the
    radius is ``r_total`` (statmorph's convention)."""
    dt = prof.dtype
    b = r_total.shape[0]
    r_total = r_total.to(dt)
    nf = len(fractions)
    out = torch.full((b, nf), float("nan"), dtype=dt, device=prof.device)
    total = torch.zeros(b, dtype=dt, device=prof.device)
    idx = active.nonzero().squeeze(1)
    if idx.numel():
        total[idx] = prof.sums(r_total[idx, None], idx)[:, channel, 0]
    zero_total = active & (total == 0)
    negative = active & (total < 0)
    tot = total.abs()
    go = active & ~zero_total
    out[zero_total] = r_total[zero_total, None].expand(-1, nf)
    fr = torch.tensor(fractions, dtype=dt, device=prof.device)

    def growth(i, a):
        s = prof.sums(a, i)[:, channel].abs()
        return torch.where(a == 0, torch.zeros_like(s), s / tot[i, None])

    grid = _linspace(torch.zeros_like(r_total), r_total, npoints)
    # one scan for all fractions: stop when the largest fraction is exceeded
    need_k = torch.full((b, nf), npoints, dtype=torch.long, device=prof.device)
    vals_prev = torch.full((b, nf), float("nan"), dtype=dt, device=prof.device)
    vals_k = torch.full((b, nf), float("nan"), dtype=dt, device=prof.device)
    searching = go.clone()
    chunk = _scan_chunk(prof.device)
    last = torch.full((b,), float("nan"), dtype=dt, device=prof.device)
    for s in range(0, npoints, chunk):
        i = searching.nonzero().squeeze(1)
        if i.numel() == 0:
            break
        g = growth(i, grid[i, s:s + chunk])  # (M, G)
        gp = torch.cat([last[i, None], g], 1)
        for j in range(nf):
            open_j = need_k[i, j] >= npoints
            hit = g - fr[j] > 0
            anyhit = hit.any(1) & open_j
            kl = hit.to(torch.int8).argmax(1)
            need_k[i, j] = torch.where(anyhit, s + kl, need_k[i, j])
            vals_prev[i, j] = torch.where(anyhit, torch.gather(gp, 1, kl[:, None]).squeeze(1), vals_prev[i, j])
            vals_k[i, j] = torch.where(anyhit, torch.gather(g, 1, kl[:, None]).squeeze(1), vals_k[i, j])
        last[i] = g[:, -1]
        searching[i] = (need_k[i] >= npoints).any(1)
    for j in range(nf):
        ok = go & (need_k[:, j] < npoints)
        i = ok.nonzero().squeeze(1)
        if i.numel() == 0:
            continue
        k = need_k[i, j]
        hi = torch.gather(grid[i], 1, k[:, None]).squeeze(1)
        lo = torch.gather(grid[i], 1, (k - 1).clamp_min(0)[:, None]).squeeze(1)
        fa = torch.where(k == 0, -fr[j].expand_as(lo), vals_prev[i, j] - fr[j])
        fa = torch.where(lo == 0, -fr[j].expand_as(lo), fa)
        fb = vals_k[i, j] - fr[j]
        def fun(m, x, i=i, j=j):
            return growth(i[m], x[:, None])[:, 0] - fr[j]

        root, _ = brentq(fun, lo, hi, fa, fb, xtol=xtol)
        out[i, j] = root
    return out, zero_total, negative
