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
        # image and mask side by side, so that one index_select reads both
        self.img = F.pad(image, (p, p, p, p)).reshape(-1)
        self.msk = F.pad(mask, (p, p, p, p)).reshape(-1) if self.has_mask else None
        self.ny, self.nx = ny.to(dt), nx.to(dt)
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
        self._colf = ar.to(dt).view(1, 1, w)
        self._rowf = ar.to(dt).view(1, w, 1)
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
        self.ring_valid = (torch.arange(k, device=dev)[None, :] < counts[:, None]).to(dt)
        self.ring_du = (order % w).to(dt) - h
        self.ring_dv = (order // w).to(dt) - h

    # -- the two windows: image/mask around the centre and their rotated versions --
    def _window(self, idx: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor):
        h, p, w = self.h, self.pad, self.win
        nx, ny = self.nx[idx], self.ny[idx]
        oob = (cx < 0) | (cx >= nx) | (cy < 0) | (cy >= ny)
        c = torch.stack([cx, cy]).masked_fill(oob, 0.0)  # (2, P)
        fl = torch.floor(c)
        frac = c - fl
        two = 2 * c
        n2 = torch.floor(two)
        g = (two - n2).view(2, -1, 1, 1)
        base = idx * (self.hp * self.wp)
        npts = idx.shape[0]
        o = (fl - (h - p)).to(torch.long)  # window origin in the padded canvas
        gidx = ((base + o[1] * self.wp + o[0]).view(-1, 1, 1) + self._grid).reshape(-1)
        im = self.img.index_select(0, gidx).view(npts, w, w)
        # rotated image: window of pixels floor(2c) - floor(c) - h - 1 + t (t = 0..W), read
        # backwards, then bilinear weights along x and along y (skimage's order of operations)
        so = (n2 - fl).to(torch.long) - (h + 1 - p)
        sidx = ((base + so[1] * self.wp + so[0]).view(-1, 1, 1) + self._sgrid).reshape(-1)
        src = self.img.index_select(0, sidx).view(npts, w + 1, w + 1)
        rows = torch.lerp(src[:, :, 1:], src[:, :, :-1], g[0])
        rot = torch.lerp(rows[:, 1:], rows[:, :-1], g[1])
        # usable pixels: inside the stamp and not masked in either orientation
        x0 = (fl[0] - h).view(-1, 1, 1) + self._colf
        y0 = (fl[1] - h).view(-1, 1, 1) + self._rowf
        valid = ((x0 >= 0) & (x0 < nx.view(-1, 1, 1))) & ((y0 >= 0) & (y0 < ny.view(-1, 1, 1)))
        # pixels off the stamp do not exist for the aperture sums (their mirror image may)
        rot = rot.masked_fill(~valid, 0.0)
        if self.has_mask:
            # nearest neighbour of the mask: pixel floor(2c + 1/2) - x
            sm = (torch.floor(two + 0.5) - fl).to(torch.long) - (h + 1 - p)
            midx = ((base + sm[1] * self.wp + sm[0]).view(-1, 1, 1) + self._bgrid).reshape(-1)
            msym = self.msk.index_select(0, gidx).view(npts, w, w) | self.msk.index_select(0, midx).view(npts, w, w)
            im = im.masked_fill(msym, 0.0)
            rot = rot.masked_fill(msym, 0.0)
            valid = valid & ~msym
        return im, rot, valid, frac, oob

    def __call__(self, idx: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
        """Asymmetry of stamps ``idx`` about ``(cx, cy)`` (pixels, stamp coordinates)."""
        if idx.numel() == 0:
            return torch.empty(0, dtype=self.dtype, device=self.device)
        im, rot, valid, frac, oob = self._window(idx, cx.to(self.dtype), cy.to(self.dtype))
        terms = torch.empty((im.shape[0], 3) + im.shape[1:], dtype=self.dtype, device=self.device)
        torch.sub(rot, im, out=terms[:, 0])
        if self.kind == "rms":
            terms[:, 0].square_()
            torch.square(im, out=terms[:, 1])
        else:
            terms[:, 0].abs_()
            torch.abs(im, out=terms[:, 1])
        terms[:, 2].copy_(valid)
        terms = terms.flatten(2)
        if self.kind == "outer":
            w = self._ellipse_weights(idx, frac[0], frac[1]).flatten(1)
            sums = torch.bmm(terms, w.unsqueeze(2)).squeeze(2)
        else:
            sums = torch.bmm(terms, self.interior[idx].unsqueeze(2)).squeeze(2)
            k = self.ring_idx.shape[1]
            ring = terms.gather(2, self.ring_idx[idx].unsqueeze(1).expand(-1, 3, k))
            wr = circle_pixel_overlap(self.ring_du[idx] - frac[0, :, None], self.ring_dv[idx] - frac[1, :, None],
                                      self.radius[idx, None]) * self.ring_valid[idx]
            sums = sums + torch.bmm(ring, wr.unsqueeze(2)).squeeze(2)
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
