"""CPU fast path of the asymmetries: one stamp at a time in NumPy.

The simplex that finds the asymmetry centre has to follow statmorph's path (``scipy.optimize.fmin``
with its tolerances), about 60 steps and 125 evaluations per stamp. Batched in torch, a step
costs a few hundred tensor operations whatever the number of stamps, and on a CPU the fixed cost
of each (microseconds) dominates. Here the simplex runs in plain Python floats (the steps of
:func:`galprof.morphology.kernels.nelder_mead`, i.e. of ``fmin``) and each evaluation is a few
dozen NumPy operations on the pixels of one stamp's aperture only.

The evaluation is :class:`galprof.morphology.asymmetry.AsymmetryFunction`'s: the "rotated minus
original" planes of the quarter-pixel cell of the centre, kept until the centre leaves the cell,
combined with the sub-pixel parts of ``2 c``; pixels wholly inside the circle for every sub-pixel
position weigh 1, the exact overlaps of a ring of the others are mixed differences of the signed
area of the disc over the pixel corners. The same class gives the single evaluations of the RMS,
shape and outer asymmetries. Results equal the torch path's to rounding (tests/test_morphology.py).
"""

from __future__ import annotations

import copy
import math

import numpy as np

from . import asymmetry_jit
from .asymmetry_jit import BAD_VALUE
from .asymmetry_jit import TINY_OVERLAP as _TINY_OVERLAP

__all__ = ["StampAsymmetry", "fmin2"]

_PI8 = 0.125 * math.pi


def _pad(a: np.ndarray, p: int, value: float) -> np.ndarray:
    """``a`` (2-D) padded by ``p`` pixels of ``value`` on every side, flattened."""
    out = np.full((a.shape[0] + 2 * p, a.shape[1] + 2 * p), value)
    out[p:p + a.shape[0], p:p + a.shape[1]] = a
    return out.ravel()


class StampAsymmetry:
    """Asymmetry ``A(cx, cy)`` of one stamp (statmorph's CAS asymmetry with sky correction).

    Parameters
    ----------
    image : (ny, nx) float64 array
        Stamp with masked pixels set to zero.
    mask : (ny, nx) bool array
        Masked pixels.
    radius : float
        Aperture radius (pixels, finite and positive).
    sky : float
        Asymmetry per pixel of the sky box (kind "cas") or the sky standard deviation (kind
        "rms"); NaN: no correction.
    kind : {"cas", "rms", "shape", "outer"}
        As :class:`galprof.morphology.asymmetry.AsymmetryFunction`'s kinds ("outer": evaluate
        with :meth:`weighted`; ``radius`` is the outer semi-major axis).

    Pixels are addressed by flat indices into the zero-padded stamp: the window pixel at offset
    ``o`` from the window's origin is at ``origin + o`` and its mirror (through ``2 c``) at
    ``mirror - o``, so the pixels of the aperture and their mirrors are read with one ``take``.
    """

    def __init__(self, image: np.ndarray, mask: np.ndarray, radius: float, sky: float, kind: str = "cas"):
        ny, nx = image.shape
        self.ny, self.nx = ny, nx
        self.r = r = float(radius)
        h = min(int(math.ceil(r)) + 1, max(ny, nx))
        self.h, self.w = h, w = h, 2 * h + 2
        self.p = p = h + 3
        self.wp = wp = nx + 2 * p
        self.img = _pad(np.asarray(image, dtype=np.float64), p, 0.0)
        mask = np.asarray(mask, dtype=bool)
        self.has_mask = bool(mask.any())
        keep = (~mask).astype(np.float64)
        self.usable = _pad(keep, p, 0.0)  # inside the stamp and not masked
        self.unmasked = _pad(keep, p, 1.0) if self.has_mask else None
        self._set_kind(kind, sky)
        # static split of the window: interior (weight 1 for any sub-pixel centre), ring, rest
        u = np.arange(w, dtype=np.float64) - h
        far = np.maximum(np.abs(u), np.abs(u - 1)) + 0.5
        near = np.maximum(np.maximum(u - 1.5, -(u + 0.5)), 0.0)
        far2 = far[:, None] ** 2 + far[None, :] ** 2
        near2 = near[:, None] ** 2 + near[None, :] ** 2
        r2 = r * r
        interior = far2 <= r2
        ring = ~interior & ~(near2 >= r2)
        ii = np.flatnonzero(interior)
        ri = np.flatnonzero(ring)
        self.ni = ii.size
        sup = np.concatenate([ii, ri])
        self.sup_x = (sup % w - h).astype(np.float64)  # offsets from floor(c)
        self.sup_y = (sup // w - h).astype(np.float64)
        off = (sup // w) * wp + sup % w  # offsets in the padded stamp
        # image here, and at the four neighbours of the mirror pixel (a, bx, cy, e)
        self.offs = np.stack([off, -off, 1 - off, wp - off, wp + 1 - off])
        self.off = off
        self.base = np.zeros((5, 1), dtype=np.int64)
        # ring pixels: flat indices of their corners in the (4, 2, w + 1) corner table
        k = ri.size
        col, row = ri % w, ri // w
        self.gidx = np.concatenate([col, col + 1, (w + 1) + row, (w + 1) + row + 1])
        self.k = k
        self.corner = np.tile(np.arange(w + 1, dtype=np.float64) - (h + 0.5), (2, 1))
        self.fr = np.zeros((2, 1))
        self.z = np.empty((2, w + 1))
        self.tmp = np.empty((2, w + 1))
        self.q = np.empty((4, 2, w + 1))
        self.coef = np.ones(4)
        self.inv_r = 1.0 / max(r, np.finfo(np.float64).tiny)
        self.r2 = r2
        self.wbuf = np.ones(sup.size)
        self.ring_vals = np.empty((2, k))
        self.key = None
        self.ring_col, self.ring_row = col.astype(np.int64), row.astype(np.int64)
        self._jargs = None

    def _set_kind(self, kind: str, sky: float):
        sky = 0.0 if not math.isfinite(sky) else float(sky)
        # background terms of (num - area a) / (den - area d)
        self.sky_a, self.sky_d = {"cas": (sky, 0.0), "outer": (sky, 0.0), "rms": (2 * sky * sky, sky * sky),
                                  "shape": (0.0, 0.0)}[kind]
        self.square = kind == "rms"

    def as_kind(self, kind: str, sky: float) -> StampAsymmetry:
        """The same stamp and aperture with another circular kind and sky term (shares the
        padded stamp and the aperture's layout)."""
        other = copy.copy(self)
        other._set_kind(kind, sky)
        other.key = None
        other.coef = np.ones(4)
        other.wbuf = np.ones(self.wbuf.size)
        other.ring_vals = np.empty_like(self.ring_vals)
        other.fr, other.z, other.tmp, other.q = (np.empty_like(a) for a in (self.fr, self.z, self.tmp, self.q))
        other.base = np.zeros_like(self.base)
        other._jargs = None
        return other

    def jit_args(self) -> tuple:
        """The state that :func:`galprof.morphology.asymmetry_jit.asym_eval` reads (the
        arguments before ``cx, cy``)."""
        if self._jargs is None:
            w1 = self.w + 1
            unmasked = self.unmasked if self.has_mask else self.usable  # (not read without a mask)
            self._jargs = (self.img, self.usable, unmasked, self.has_mask, self.off, self.ni, self.ring_col,
                           self.ring_row, self.h, self.p, self.wp, self.nx, self.ny, self.r2, self.inv_r, self.sky_a,
                           self.sky_d, self.square, np.empty((4, w1)), np.empty((4, w1)))
        return self._jargs

    # -- planes of a quarter-pixel cell --
    def _build(self, fx: int, fy: int, n2x: int, n2y: int, m2x: int, m2y: int):
        h, p, wp, ni = self.h, self.p, self.wp, self.ni
        origin = (p + fy - h) * wp + (p + fx - h)
        mirror = (p + n2y - fy + h) * wp + (p + n2x - fx + h)
        base = self.base
        base[0, 0] = origin
        base[1:, 0] = mirror
        v = self.img.take(self.offs + base)  # (5, S): image, a, bx, cy, e
        im, a, bx, cy, e = v
        valid = self.usable.take(self.off + origin)
        if self.has_mask:
            valid *= self.unmasked.take((p + m2y - fy + h) * wp + (p + m2x - fx + h) - self.off)
        planes = np.empty((4, im.size))
        np.subtract(a, im, out=planes[0])
        np.subtract(bx, a, out=planes[1])
        np.subtract(cy, a, out=planes[2])
        np.subtract(e, cy, out=planes[3])
        planes[3] -= bx
        planes[3] += a
        planes *= valid
        self.planes = planes
        absim = np.square(im, out=im) if self.square else np.abs(im, out=im)
        absim *= valid
        self.absim, self.valid = absim, valid
        self.fixed_den = float(absim[:ni].sum())
        self.fixed_area = float(valid[:ni].sum())
        self.ring_vals[0] = absim[ni:]
        self.ring_vals[1] = valid[ni:]

    def _ring_weights(self, fx: float, fy: float) -> np.ndarray:
        fr, z, q, tmp = self.fr, self.z, self.q, self.tmp
        fr[0, 0] = fx
        fr[1, 0] = fy
        np.subtract(self.corner, fr, out=z)
        np.sign(z, out=q[3])
        u = np.abs(z, out=z)
        u *= self.inv_r
        np.minimum(u, 1.0, out=u)
        np.multiply(u, u, out=q[0])
        np.subtract(1.0, q[0], out=tmp)
        np.maximum(tmp, 0.0, out=tmp)
        np.sqrt(tmp, out=tmp)
        tmp *= u
        tmp += np.arcsin(u)
        tmp *= 0.5
        tmp -= _PI8
        np.multiply(tmp, q[3], out=q[2])
        np.multiply(u, q[3], out=q[1])
        g = q.reshape(4, -1).take(self.gidx, axis=1).reshape(4, 4, self.k)  # q; x lo, x hi, y lo, y hi
        x, y = g[:, 0:2, None, :], g[:, None, 2:4, :]
        inside = (x[0] + y[0]) <= 1.0
        f = x[2] * y[3]
        f += x[3] * y[2]
        np.copyto(f, x[1] * y[1], where=inside)
        area = f[0, 0] - f[0, 1]
        area -= f[1, 0]
        area += f[1, 1]
        area *= self.r2
        np.maximum(area, 0.0, out=area)
        np.minimum(area, 1.0, out=area)
        area[area < _TINY_OVERLAP] = 0.0  # rounding noise of a pixel that does not overlap
        return area

    def offsets(self, cx: float, cy: float) -> tuple[np.ndarray, np.ndarray]:
        """Offsets (x, y) of the support's pixels from the centre ``(cx, cy)`` (for weights
        computed outside, e.g. those of kind "outer", all stamps together)."""
        return self.sup_x - (cx - math.floor(cx)), self.sup_y - (cy - math.floor(cy))

    def weighted(self, cx: float, cy: float, wgt: np.ndarray) -> float:
        """The asymmetry about ``(cx, cy)`` with the support's pixels weighted by ``wgt`` (kind
        "outer": the exact overlaps with the elliptical annulus, which lies within the circle
        of the outer semi-major axis)."""
        if not (0.0 <= cx < self.nx and 0.0 <= cy < self.ny):
            return BAD_VALUE
        fx, fy = math.floor(cx), math.floor(cy)
        tx, ty = cx + cx, cy + cy
        n2x, n2y = math.floor(tx), math.floor(ty)
        gx, gy = tx - n2x, ty - n2y
        self._build(fx, fy, n2x, n2y, math.floor(tx + 0.5), math.floor(ty + 0.5))
        t = np.array([1.0, gx, gy, gx * gy]) @ self.planes
        np.abs(t, out=t)
        num, den, area = float(t @ wgt), float(self.absim @ wgt), float(self.valid @ wgt)
        if den == 0:
            return BAD_VALUE
        return (num - area * self.sky_a) / (den - area * self.sky_d)

    def __call__(self, cx: float, cy: float) -> float:
        if asymmetry_jit.ENABLED:
            return float(asymmetry_jit.asym_eval(*self.jit_args(), float(cx), float(cy)))
        if not (0.0 <= cx < self.nx and 0.0 <= cy < self.ny):
            return BAD_VALUE
        fx, fy = math.floor(cx), math.floor(cy)
        tx, ty = cx + cx, cy + cy
        n2x, n2y = math.floor(tx), math.floor(ty)
        gx, gy = tx - n2x, ty - n2y
        if self.has_mask:
            m2x, m2y = math.floor(tx + 0.5), math.floor(ty + 0.5)
            key = (n2x + m2x, n2y + m2y)
        else:
            m2x = m2y = 0
            key = (n2x, n2y)
        if key != self.key:
            self._build(fx, fy, n2x, n2y, m2x, m2y)
            self.key = key
        coef = self.coef
        coef[1] = gx
        coef[2] = gy
        coef[3] = gx * gy
        t = coef @ self.planes
        if self.square:
            np.square(t, out=t)
        else:
            np.abs(t, out=t)
        wr = self._ring_weights(cx - fx, cy - fy)
        wb = self.wbuf
        wb[self.ni:] = wr
        num = float(t @ wb)
        den, area = (self.ring_vals @ wr).tolist()
        den += self.fixed_den
        area += self.fixed_area
        if den == 0:
            return BAD_VALUE
        return (num - area * self.sky_a) / (den - area * self.sky_d)


def fmin2(f, x0: tuple[float, float], xtol: float = 1e-4, ftol: float = 1e-4, maxiter: int = 400,
          maxfun: int = 400) -> tuple[tuple[float, float], float]:
    """Minimise ``f(x, y)`` from ``x0`` with the downhill simplex of ``scipy.optimize.fmin``
    (same initial simplex, coefficients, stable ordering and stopping rule), in Python floats;
    the steps of :func:`galprof.morphology.kernels.nelder_mead`. Returns ``(x, f(x))``."""
    rho, chi, psi, sigma = 1.0, 2.0, 0.5, 0.5
    x0 = (float(x0[0]), float(x0[1]))
    sim = [x0, ((1 + 0.05) * x0[0] if x0[0] != 0 else 0.00025, x0[1]),
           (x0[0], (1 + 0.05) * x0[1] if x0[1] != 0 else 0.00025)]
    fs = [f(*p) for p in sim]
    nfev, nit = 3, 1
    order = sorted(range(3), key=lambda k: (fs[k] != fs[k], fs[k]))  # NaN last, stable
    sim = [sim[k] for k in order]
    fs = [fs[k] for k in order]
    while True:
        (x0_, y0_), (x1_, y1_), (x2_, y2_) = sim
        xdone = max(abs(x1_ - x0_), abs(y1_ - y0_), abs(x2_ - x0_), abs(y2_ - y0_)) <= xtol
        fdone = max(abs(fs[0] - fs[1]), abs(fs[0] - fs[2])) <= ftol
        if (xdone and fdone) or nfev >= maxfun or nit >= maxiter:
            break
        xb, yb = (x0_ + x1_) / 2, (y0_ + y1_) / 2
        xr = ((1 + rho) * xb - rho * x2_, (1 + rho) * yb - rho * y2_)
        fxr = f(*xr)
        nfev += 1
        shrink = False
        if fxr < fs[0]:
            xe = ((1 + rho * chi) * xb - rho * chi * x2_, (1 + rho * chi) * yb - rho * chi * y2_)
            fxe = f(*xe)
            nfev += 1
            if fxe < fxr:
                sim[2], fs[2] = xe, fxe
            else:
                sim[2], fs[2] = xr, fxr
        elif fxr < fs[1]:
            sim[2], fs[2] = xr, fxr
        else:
            if fxr < fs[2]:
                xc = ((1 + psi * rho) * xb - psi * rho * x2_, (1 + psi * rho) * yb - psi * rho * y2_)
                fxc = f(*xc)
                nfev += 1
                if fxc <= fxr:
                    sim[2], fs[2] = xc, fxc
                else:
                    shrink = True
            else:
                xcc = ((1 - psi) * xb + psi * x2_, (1 - psi) * yb + psi * y2_)
                fxcc = f(*xcc)
                nfev += 1
                if fxcc < fs[2]:
                    sim[2], fs[2] = xcc, fxcc
                else:
                    shrink = True
            if shrink:
                for j in (1, 2):
                    sim[j] = (x0_ + sigma * (sim[j][0] - x0_), y0_ + sigma * (sim[j][1] - y0_))
                    fs[j] = f(*sim[j])
                nfev += 2
        order = sorted(range(3), key=lambda k: (fs[k] != fs[k], fs[k]))  # NaN last, stable
        sim = [sim[k] for k in order]
        fs = [fs[k] for k in order]
        nit += 1
    return sim[0], fs[0]
