"""Rotational asymmetry of batches of stamps about arbitrary centres (pure tensor code).

The image rotated by 180 degrees about ``(xc, yc)`` is sampled by bilinear interpolation with
zeros outside the stamp, and the mask by nearest-neighbour sampling (``floor(x + 1/2)``), as
statmorph obtains them from ``skimage.transform.rotate``. Pixels masked in either orientation
are set to zero in both images. Sums run over an exact circular (or elliptical) aperture.

Only a window around the centre is touched: ``2 h + 2`` pixels on a side, ``h = ceil(R) + 1``.
For the search of the asymmetry centre the aperture radius is fixed per stamp, so the pixels
that lie wholly inside the circle for every sub-pixel position of the centre are known in
advance (their weight is 1) and the exact overlap is computed only on the thin ring of the
others.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .geometry import aperture_weights, circle_pixel_overlap

__all__ = ["AsymmetryFunction"]

#: value returned for centres outside the stamp or with no flux in the aperture (statmorph's)
BAD_VALUE = 100.0


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
    """

    def __init__(self, image: torch.Tensor, mask: torch.Tensor, ny: torch.Tensor, nx: torch.Tensor,
                 radius: torch.Tensor, sky: torch.Tensor | None = None, kind: str = "cas",
                 inner: torch.Tensor | None = None, elongation: torch.Tensor | None = None,
                 theta: torch.Tensor | None = None):
        b, hh, ww = image.shape
        dt, dev = image.dtype, image.device
        self.kind = kind
        self.dtype, self.device = dt, dev
        self.radius = radius.to(dt)
        finite_r = torch.where(torch.isfinite(self.radius), self.radius, torch.zeros_like(self.radius))
        self.h = int(math.ceil(float(finite_r.max()))) + 1 if b else 1
        h = self.h
        self.win = 2 * h + 2
        self.pad = h + 3
        p = self.pad
        self.hp, self.wp = hh + 2 * p, ww + 2 * p
        self.has_mask = bool(mask.any())
        self.img = F.pad(image, (p, p, p, p)).reshape(-1)
        # pixel state: 1 = inside the stamp, 2 = masked (a masked pixel is inside)
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
        w = self.win
        ar = torch.arange(w, device=dev)
        self._grid = ar.view(w, 1) * self.wp + ar.view(1, w)
        src = torch.arange(w, -1, -1, device=dev)  # the rotated window is read backwards
        self._sgrid = src.view(w + 1, 1) * self.wp + src.view(1, w + 1)
        back = torch.arange(w - 1, -1, -1, device=dev)
        self._bgrid = back.view(w, 1) * self.wp + back.view(1, w)
        if kind in ("cas", "rms", "shape"):
            self._static_ring()

    # -- static split of the window into "always inside" pixels and a ring of partial ones --
    def _static_ring(self):
        w, h, dt, dev = self.win, self.h, self.dtype, self.device
        u = torch.arange(w, device=dev, dtype=dt) - h  # offset of the pixel from floor(centre)
        far = torch.maximum(u.abs(), (u - 1).abs()) + 0.5
        near = torch.clamp(torch.maximum(u - 1.5, -(u + 0.5)), min=0.0)
        far2 = far.view(w, 1) ** 2 + far.view(1, w) ** 2
        near2 = near.view(w, 1) ** 2 + near.view(1, w) ** 2
        r2 = (self.radius ** 2).view(-1, 1, 1)
        self.interior = (far2[None] <= r2).to(dt).flatten(1)
        ring = ~(far2[None] <= r2) & ~(near2[None] >= r2)
        ring = ring.reshape(ring.shape[0], -1)
        counts = ring.sum(1)
        k = int(counts.max()) if counts.numel() else 0
        k = max(k, 1)
        order = torch.sort(ring.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :k]
        self.ring_idx = order
        valid = (torch.arange(k, device=dev)[None, :] < counts[:, None]).to(dt)
        self.ring = torch.stack([(order % w).to(dt) - h, (order // w).to(dt) - h, valid], 1)

    # -- evaluation --
    def __call__(self, idx: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
        """Asymmetry of stamps ``idx`` about ``(cx, cy)`` (pixels, stamp coordinates)."""
        npts = idx.numel()
        if npts == 0:
            return torch.empty(0, dtype=self.dtype, device=self.device)
        w = self.win
        c = torch.stack([cx, cy]).to(self.dtype)  # (2, P)
        oob = ((c < 0) | (c >= self.lim[:, idx])).any(0)
        c = c.masked_fill(oob, 0.0)
        fl = torch.floor(c)
        frac = c - fl
        two = c + c
        n2 = torch.floor(two)
        g = (two - n2).view(2, -1, 1, 1)
        # integer parts: floor(c) (window), floor(2c) - floor(c) (rotated image), floor(2c + 1/2) - floor(c) (mask)
        ints = torch.stack([fl, n2 - fl, torch.floor(two + 0.5) - fl]).to(torch.long) + self._off  # (3, 2, P)
        starts = (self.base[idx] + ints[:, 1] * self.wp + ints[:, 0]).view(3, -1, 1, 1)
        gidx = (starts[0] + self._grid).view(-1)
        im = self.img.index_select(0, gidx).view(npts, w, w)
        st = self.state.index_select(0, gidx).view(npts, w, w)
        # rotated image: bilinear weights along x, then along y (skimage's order of operations)
        src = self.img.index_select(0, (starts[1] + self._sgrid).view(-1)).view(npts, w + 1, w + 1)
        rot = self._bilinear(src, g)
        if self.has_mask:
            # usable: inside the stamp, not masked here nor at the mirror pixel floor(2c + 1/2) - x
            srot = self.state.index_select(0, (starts[2] + self._bgrid).view(-1)).view(npts, w, w)
            valid = (st == 1) & (srot < 2)
            im = im.masked_fill(~valid, 0.0)
        else:
            valid = st == 1
        rot = rot.masked_fill(~valid, 0.0)  # off-stamp pixels do not exist for the sums
        terms = torch.empty((npts, 3, w, w), dtype=self.dtype, device=self.device)
        torch.sub(rot, im, out=terms[:, 0])
        if self.kind == "rms":
            terms[:, 0].square_()
            torch.square(im, out=terms[:, 1])
        else:
            terms[:, 0].abs_()
            torch.abs(im, out=terms[:, 1])
        terms[:, 2].copy_(valid)
        terms = terms.view(npts, 3, w * w)
        if self.kind == "outer":
            wgt = self._ellipse_weights(idx, frac[0], frac[1]).view(npts, w * w, 1)
            sums = torch.bmm(terms, wgt).squeeze(2)
        else:
            ring = self.ring[idx]  # (P, 3, K): offsets from floor(c) and validity
            k = ring.shape[2]
            wr = circle_pixel_overlap(ring[:, 0] - frac[0, :, None], ring[:, 1] - frac[1, :, None],
                                      self.radius[idx, None]) * ring[:, 2]
            vals = terms.gather(2, self.ring_idx[idx].unsqueeze(1).expand(-1, 3, k))
            sums = (torch.bmm(terms, self.interior[idx].unsqueeze(2)) + torch.bmm(vals, wr.unsqueeze(2))).squeeze(2)
        num, den, area = sums.unbind(1)
        sky = self.sky[idx]
        has_sky = torch.isfinite(sky)
        if self.kind == "shape":
            value = num / den
        elif self.kind == "rms":
            s2 = sky * sky
            value = torch.where(has_sky, (num - 2 * area * s2) / (den - area * s2), num / den)
        else:
            value = torch.where(has_sky, (num - area * sky) / den, num / den)
        return torch.where(oob | (den == 0), torch.full_like(value, BAD_VALUE), value)

    @staticmethod
    def _bilinear(src: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        rows = torch.lerp(src[:, :, 1:], src[:, :, :-1], g[0])
        return torch.lerp(rows[:, 1:], rows[:, :-1], g[1])

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
