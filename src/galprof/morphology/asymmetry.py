"""Rotational asymmetry of batches of stamps about arbitrary centres (pure tensor code).

The image rotated by 180 degrees about ``(xc, yc)`` is sampled by bilinear interpolation with
zeros outside the stamp, and the mask by nearest-neighbour sampling (``floor(x + 1/2)``), as
statmorph obtains them from ``skimage.transform.rotate``. Pixels masked in either orientation
are set to zero in both images. Sums run over an exact circular (or elliptical) aperture.

Only a window around the centre is touched: ``2 h + 2`` pixels on a side, ``h = ceil(R) + 1``
(at most the stamp's size: farther pixels are off the stamp).

With ``n = floor(2 c)`` and ``g = 2 c - n`` (per axis), the rotated image is
``s11 + g_x (s10 - s11) + g_y (s01 - s11) + g_x g_y (s00 - s01 - s10 + s11)`` with the four
neighbours ``s`` of the mirrored pixel fixed by ``n``; the window (``floor(c) = floor(n / 2)``)
and the mirrored mask pixel (``floor(2 c + 1/2)``) are fixed by ``floor(4 c)`` too. So for each
quarter-pixel cell of the centre the difference "rotated minus original" is a fixed combination
of four planes, which are kept per stamp (one cell each): a simplex converging on the asymmetry
centre evaluates most of its points in the cell of the previous one, at the cost of one
four-term combination, an absolute value and a weighted sum per pixel.

For the search of the asymmetry centre the aperture radius is fixed per stamp, so the pixels
that lie wholly inside the circle for every sub-pixel position of the centre are known in
advance (weight 1), and so are those wholly outside (weight 0); the exact overlap of the others
(a thin ring) is the mixed difference, over the pixel's corners, of the signed area ``F(x, y)``
of the disc within ``[0, x] x [0, y]``: ``F = x y`` inside the disc, else a term in ``x`` plus a
term in ``y``, so ``F`` on the whole grid of corners costs a few outer products.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .asymmetry_jit import BAD_VALUE
from .asymmetry_jit import TINY_OVERLAP as _TINY_OVERLAP
from .geometry import aperture_weights

__all__ = ["AsymmetryFunction"]

#: value returned for centres outside the stamp or with no flux in the aperture (statmorph's)


class AsymmetryFunction:
    """Asymmetry of each stamp about a centre, ``A(index, xc, yc)``.

    Parameters
    ----------
    image : (B, H, W) tensor
        Stamps with masked pixels set to zero (and zero outside each stamp).
    mask : (B, H, W) bool tensor
        Masked pixels (other sources, bad pixels); False outside the stamp.
    ny, nx : (B,) tensors
        Stamp sizes (rows, columns).
    radius : (B,) tensor
        Aperture radius (pixels); for ``kind="outer"`` the outer semi-major axis.
    sky : (B,) tensor or None
        Background term: the asymmetry per pixel of a sky box (kinds "cas", "outer") or the
        sky standard deviation (kind "rms"); NaN where there is none (no correction).
    kind : {"cas", "rms", "shape", "outer"}
        Lotz et al. (2004) asymmetry; Sazonova et al. (2024) RMS asymmetry (its square);
        asymmetry without sky correction (shape asymmetry, on a binary image); asymmetry in an
        elliptical annulus ``[inner, radius]`` (outer asymmetry).
    inner, elongation, theta : (B,) tensors
        Only for ``kind="outer"``.
    cache : bool
        Keep per stamp the planes of the last cell evaluated (for repeated evaluations, e.g. by a
        simplex; circular kinds only).
    """

    def __init__(self, image: torch.Tensor, mask: torch.Tensor, ny: torch.Tensor, nx: torch.Tensor,
                 radius: torch.Tensor, sky: torch.Tensor | None = None, kind: str = "cas",
                 inner: torch.Tensor | None = None, elongation: torch.Tensor | None = None,
                 theta: torch.Tensor | None = None, cache: bool = True):
        b, hh, ww = image.shape
        dt, dev = image.dtype, image.device
        self.kind = kind
        self.dtype, self.device = dt, dev
        self.radius = radius.to(dt)
        finite_r = torch.where(torch.isfinite(self.radius), self.radius, torch.zeros_like(self.radius))
        h = int(math.ceil(float(finite_r.max()))) + 1 if b else 1
        self.h = h = min(h, max(hh, ww))  # farther pixels are off every stamp
        self.win = w = 2 * h + 2
        self.pad = p = h + 3
        self.hp, self.wp = hh + 2 * p, ww + 2 * p
        self.has_mask = bool(mask.any())
        self.img = F.pad(image, (p, p, p, p)).reshape(-1)
        # pixel state: 1 = inside the stamp and not masked, 3 = masked (inside), 0 = off the stamp
        yy = torch.arange(hh, device=dev).view(1, hh, 1)
        xx = torch.arange(ww, device=dev).view(1, 1, ww)
        inside = (yy < ny.view(-1, 1, 1)) & (xx < nx.view(-1, 1, 1))
        state = inside.to(torch.uint8) + 2 * (mask & inside).to(torch.uint8)
        self.state = F.pad(state, (p, p, p, p)).reshape(-1)
        self.lim = torch.stack([nx, ny]).to(dt)  # (2, B)
        self.base = torch.arange(b, device=dev) * (self.hp * self.wp)
        # window origin, rotated-image source window, rotated-mask window (added to the integer parts)
        self._off = torch.tensor([p - h, p - h - 1, p - h - 1], device=dev).view(3, 1, 1)
        self.sky = torch.full((b,), float("nan"), dtype=dt, device=dev) if sky is None else sky.to(dt)
        self.inner = inner.to(dt) if inner is not None else None
        self.elong = elongation.to(dt) if elongation is not None else None
        self.theta = theta.to(dt) if theta is not None else None
        ar = torch.arange(w, device=dev)
        self._grid = ar.view(w, 1) * self.wp + ar.view(1, w)
        src = torch.arange(w, -1, -1, device=dev)  # the rotated window is read backwards
        self._sgrid = src.view(w + 1, 1) * self.wp + src.view(1, w + 1)
        back = torch.arange(w - 1, -1, -1, device=dev)
        self._bgrid = back.view(w, 1) * self.wp + back.view(1, w)
        self.cache = cache and kind != "outer"
        # per stamp: stamp size (x, y), and the sky terms of ``(num - area a) / (den - area d)``
        sky = torch.where(torch.isfinite(self.sky), self.sky, torch.zeros_like(self.sky))
        zero = torch.zeros_like(sky)
        a, d = {"cas": (sky, zero), "outer": (sky, zero), "rms": (2 * sky * sky, sky * sky),
                "shape": (zero, zero)}[kind]
        self._info = torch.stack([self.lim[0], self.lim[1], a, d, (mask & inside).flatten(1).any(1).to(dt)], 1)
        if kind in ("cas", "rms", "shape"):
            self._static_ring()
        if self.cache:
            # per stamp: the cell of the centre whose planes are kept (floor(2 c), and floor(2 c + 1/2)
            # for stamps with masked pixels), the planes, the interior sums of |image| and of the
            # usable pixels, and both at the ring pixels (with the padding flag)
            self._key = torch.full((b, 2), -(2 ** 40), dtype=torch.long, device=dev)
            self._planes = torch.zeros((b, 4, w * w), dtype=dt, device=dev)
            self._fixed = torch.zeros((b, 2), dtype=dt, device=dev)
            self._ringf = torch.stack([self.ring_pad, torch.zeros_like(self.ring_pad),
                                       torch.zeros_like(self.ring_pad)], 1)  # (B, 3, K): pad, |image|, usable
            self._buf4 = torch.empty_like(self._planes)
            self._buf = torch.empty((b, w * w), dtype=dt, device=dev)

    # -- static split of the window into "always inside" pixels and a ring of partial ones --
    def _static_ring(self):
        w, h, dt, dev = self.win, self.h, self.dtype, self.device
        u = torch.arange(w, device=dev, dtype=dt) - h  # offset of the pixel from floor(centre)
        far = torch.maximum(u.abs(), (u - 1).abs()) + 0.5
        near = torch.clamp(torch.maximum(u - 1.5, -(u + 0.5)), min=0.0)
        far2 = far.view(w, 1) ** 2 + far.view(1, w) ** 2
        near2 = near.view(w, 1) ** 2 + near.view(1, w) ** 2
        r2 = (self.radius ** 2).view(-1, 1, 1)
        inner = far2[None] <= r2
        self.interior = inner.to(dt).flatten(1)
        ring = (~inner & ~(near2[None] >= r2)).flatten(1)
        self._support = self.interior + ring.to(dt)
        counts = ring.sum(1)
        k = max(int(counts.max()) if counts.numel() else 0, 1)
        order = torch.sort(ring.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :k]
        self.ring_idx = order  # (B, K) flat window index of the ring pixels (then padding)
        self.ring_pad = (torch.arange(k, device=dev)[None, :] < counts[:, None]).to(dt)
        # per ring pixel: its window index, and its rows (x, then y) of the corner table of _ring_weights
        self._ringi = torch.cat([order, order % w, w + order // w], 1)  # (B, 3 K)
        self._arange = torch.arange(ring.shape[0], device=dev)
        r = self.radius.clamp_min(torch.finfo(dt).tiny)
        self._rq = torch.stack([1.0 / r, r * r], 1)  # (B, 2)
        self._corner = torch.arange(w + 1, device=dev, dtype=dt) - (h + 0.5)  # corners, from floor(c)
        self._mix = torch.tensor([[1.0, -1.0, -1.0, 1.0]], device=dev, dtype=dt)  # LL, LH, HL, HH

    # -- evaluation --
    def __call__(self, idx: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
        """Asymmetry of stamps ``idx`` about ``(cx, cy)`` (pixels, stamp coordinates)."""
        return self.at(idx, torch.stack([cx, cy], 1))

    def at(self, idx: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Asymmetry of stamps ``idx`` (P,) about the centres ``c`` (P, 2) (x, y; pixels)."""
        npts = idx.numel()
        if npts == 0:
            return torch.empty(0, dtype=self.dtype, device=self.device)
        info = self._info[idx]  # (P, 5)
        c = c.to(self.dtype)
        inb = ((c >= 0) & (c < info[:, :2])).all(1)
        c = torch.where(inb.unsqueeze(1), c, torch.zeros_like(c))
        fl = c.floor()
        frac = c - fl
        two = c + c
        n2 = two.floor()
        g = two - n2  # (P, 2)
        m2 = (two + 0.5).floor()
        if self.kind == "outer":
            planes, absim, valid = self._build(idx, fl, n2, m2)
            wgt = self._ellipse_weights(idx, frac[:, 0], frac[:, 1]).view(npts, -1)
            t = self._norm(self._combine(planes, g))
            num = torch.linalg.vecdot(t, wgt)
            den = torch.linalg.vecdot(absim, wgt)
            area = torch.linalg.vecdot(valid, wgt)
        else:
            # interior pixels weigh 1, ring pixels their exact overlap, the others 0 (their planes
            # are zero: the pixels of the window outside the interior and the ring do not count)
            if self.cache and not (npts > 1 and int(torch.bincount(idx).max()) > 1):
                planes, fixed, ringf, buf = self._cached(idx, fl, n2, m2, info[:, 4])
            else:  # single evaluations (or a stamp named twice)
                planes, absim, valid = self._build(idx, fl, n2, m2, self._support[idx])
                fixed, ringabs, ringvalid = self._reduced(idx, absim, valid)
                ringf, buf = torch.stack([self.ring_pad[idx], ringabs, ringvalid], 1), None
            t = self._norm(self._combine(planes, g, out=buf))
            ringi = self._ringi[idx]
            k = ringi.shape[1] // 3
            wr = self._ring_weights(idx, frac, ringi[:, k:]) * ringf[:, 0]  # (P, K), 0 on the padding
            tr = t.gather(1, ringi[:, :k])
            num = t.sum(1) + torch.linalg.vecdot(tr, wr - ringf[:, 0])
            ring = torch.bmm(ringf[:, 1:], wr.unsqueeze(2)).squeeze(2)  # (P, 2)
            den, area = (fixed + ring).unbind(1)
        value = (num - area * info[:, 2]) / (den - area * info[:, 3])
        return torch.where(inb & (den != 0), value, torch.full_like(value, BAD_VALUE))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        """|x| (x squared for kind "rms"), in place."""
        return x.square_() if self.kind == "rms" else x.abs_()

    @staticmethod
    def _combine(planes: torch.Tensor, g: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rotated minus original image (P, w * w) from the planes (P, 4, w * w) at the sub-pixel
        parts ``g`` (P, 2) of ``2 c``."""
        gx, gy = g[:, :1], g[:, 1:]
        out = torch.addcmul(planes[:, 0], planes[:, 1], gx, out=out)
        out.addcmul_(planes[:, 2], gy)
        return out.addcmul_(planes[:, 3], gx * gy)

    def _build(self, idx, fl, n2, m2, support=None):
        """For the cells of the points: the planes (P, 4, w * w) of the rotated minus the original
        image, |image| (its square for kind "rms") and the usable pixels, all zero where a pixel
        is not usable (off the stamp, masked here or at the mirror pixel ``floor(2 c + 1/2) - x``,
        or outside ``support`` (P, w * w), if given)."""
        npts, w = idx.numel(), self.win
        ints = torch.stack([fl.T, (n2 - fl).T, (m2 - fl).T]).to(torch.long) + self._off  # (3, 2, P)
        starts = (self.base[idx] + ints[:, 1] * self.wp + ints[:, 0]).view(3, -1, 1, 1)
        gidx = (starts[0] + self._grid).view(-1)
        im = self.img.index_select(0, gidx).view(npts, w, w)
        src = self.img.index_select(0, (starts[1] + self._sgrid).view(-1)).view(npts, w + 1, w + 1)
        st = self.state.index_select(0, gidx).view(npts, w, w)
        # usable: state 1 here and not 3 at the mirror pixel (uint8 arithmetic: boolean tensors are
        # slow on CPUs)
        if self.has_mask:
            srot = self.state.index_select(0, (starts[2] + self._bgrid).view(-1)).view(npts, w, w)
            valid = (st & 1).bitwise_and_(((st | srot) >> 1) ^ 1).to(self.dtype)
        else:
            valid = st.to(self.dtype)
        if support is not None:
            valid.mul_(support.view(npts, w, w))
        a, bx, cy, e = src[:, 1:, 1:], src[:, 1:, :-1], src[:, :-1, 1:], src[:, :-1, :-1]
        planes = torch.empty((npts, 4, w, w), dtype=self.dtype, device=self.device)
        torch.sub(a, im, out=planes[:, 0])
        torch.sub(bx, a, out=planes[:, 1])
        torch.sub(cy, a, out=planes[:, 2])
        torch.sub(e, cy, out=planes[:, 3])
        planes[:, 3].sub_(bx).add_(a)
        planes.mul_(valid.unsqueeze(1))
        absim = self._norm(im).mul_(valid)
        return planes.view(npts, 4, w * w), absim.view(npts, w * w), valid.view(npts, w * w)

    def _cached(self, idx, fl, n2, m2, masked):
        """For points ``idx`` (each stamp at most once): the planes, the interior sums of |image|
        and of the usable pixels (P, 2), the ring's padding flag, |image| and usable flag
        (P, 3, K), and a buffer for the combination; from those kept per stamp, rebuilt (and
        kept) for the points whose cell differs from their stamp's."""
        npts = idx.numel()
        key = (n2 + n2 + masked.unsqueeze(1) * (m2 - n2)).to(torch.long)  # floor(4 c) where masked
        mi = (key != self._key[idx]).any(1).nonzero().squeeze(1)
        if mi.numel():
            j = idx[mi]
            planes, absim, valid = self._build(j, fl[mi], n2[mi], m2[mi], self._support[j])
            self._key[j] = key[mi]
            self._planes[j] = planes
            fixed, ringabs, ringvalid = self._reduced(j, absim, valid)
            self._fixed[j] = fixed
            self._ringf[j, 1] = ringabs
            self._ringf[j, 2] = ringvalid
        buf = self._buf[:npts]
        if npts == self._key.shape[0] and bool((idx == self._arange).all()):
            return self._planes, self._fixed, self._ringf, buf
        # (into a reused buffer: fresh large tensors at every call are slow on CPUs)
        planes = torch.index_select(self._planes, 0, idx, out=self._buf4[:npts])
        return planes, self._fixed[idx], self._ringf[idx], buf

    def _reduced(self, idx, absim, valid):
        """Interior sums (P, 2) of |image| and of the usable pixels, and both at the ring pixels
        (P, K) (zero on the padding)."""
        interior = self.interior[idx]
        fixed = torch.stack([torch.linalg.vecdot(absim, interior), torch.linalg.vecdot(valid, interior)], 1)
        ring, pad = self.ring_idx[idx], self.ring_pad[idx]
        return fixed, absim.gather(1, ring) * pad, valid.gather(1, ring) * pad

    def _ring_weights(self, idx: torch.Tensor, frac: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Exact overlaps (P, K) of the ring pixels with the circle about the centre (``frac``:
        its offsets (P, 2) from ``floor(c)``; ``rows``: the ring pixels' rows in the corner table,
        x then y, (P, 2 K)): the mixed difference of ``F`` over each pixel's corners. ``F`` is
        evaluated in units of the radius; 0/1 floats and blends stand in for ``torch.where``,
        much slower on CPUs."""
        w = self.win
        npts = idx.numel()
        rq = self._rq[idx]  # (P, 2): 1 / r, r^2
        # per axis and corner: u = |z| / r clipped at 1, z the corner's offset from the centre
        z = self._corner - frac.unsqueeze(2)  # (P, 2, w + 1)
        sz = z.sign()
        u = z.abs_().mul_(rq[:, :1, None]).clamp_(max=1.0)
        u2 = u * u
        # F / r^2 = (u_x s_x) (u_y s_y) inside the disc, else h(u_x) s_x s_y + s_x h(u_y) s_y
        h = torch.sqrt((1.0 - u2).clamp_(min=0.0)).mul_(u).add_(torch.asin(u)).mul_(0.5).sub_(0.125 * math.pi)
        q = torch.stack([u2, u.mul_(sz), h.mul_(sz), sz])  # (4, P, 2, w + 1)
        table = torch.stack([q[..., :-1], q[..., 1:]], 1).view(-1)  # (4, corner, P, 2, w) flat
        k = rows.shape[1] // 2
        base = torch.arange(0, 8 * npts * 2 * w, 2 * w, device=self.device).view(8, npts, 1)
        at = table.index_select(0, (base + rows).view(-1)).view(4, 2, npts, 2, k)  # q, corner, point, axis
        x, y = at[:, :, :, 0].unsqueeze(2), at[:, :, :, 1].unsqueeze(1)  # (4, 2, 1, P, K), (4, 1, 2, P, K)
        d2 = x[0] + y[0]  # (x corner, y corner, P, K)
        inside = torch.le(d2, 1.0, out=torch.empty_like(d2))  # 1.0: the corner is in the disc
        f = torch.mul(x[2], y[3])
        f.addcmul_(x[3], y[2])
        f = torch.lerp(f, x[1] * y[1], inside, out=d2)
        area = torch.mm(self._mix, f.view(4, -1)).view(npts, k)
        # below 1e-12 of a pixel an overlap is rounding noise of a pixel that does not overlap
        # (statmorph's exact weights give 0 there): with every usable pixel of that kind the
        # denominator would be noise instead of 0
        area = area.mul_(rq[:, 1:]).clamp_(0.0, 1.0)
        return area.masked_fill_(area < _TINY_OVERLAP, 0.0)

    def _ellipse_weights(self, idx, fx, fy):
        w, h = self.win, self.h
        u = torch.arange(w, device=self.device, dtype=self.dtype) - h
        dx = u.view(1, 1, w) - fx.view(-1, 1, 1)
        dy = u.view(1, w, 1) - fy.view(-1, 1, 1)
        e = self.elong[idx].view(-1, 1, 1)
        th = self.theta[idx].view(-1, 1, 1)
        cs, sn = torch.cos(th), torch.sin(th)
        outer = aperture_weights(dx, dy, self.radius[idx].view(-1, 1, 1), e, cs, sn)
        inner = aperture_weights(dx, dy, self.inner[idx].view(-1, 1, 1), e, cs, sn)
        return outer - inner
