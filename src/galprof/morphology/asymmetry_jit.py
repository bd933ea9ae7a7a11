"""Compiled (numba) kernels of the CPU morphology path, used when numba is installed: the
asymmetry and its centre search, the exact aperture sums of the curves of growth and the
elliptical weights of the outer-asymmetry annulus.

The same arithmetic as :class:`galprof.morphology.asymmetry_cpu.StampAsymmetry` and
:func:`~galprof.morphology.asymmetry_cpu.fmin2` (and as ``RadialProfile.sums`` and
``geometry.aperture_weights``), pixel by pixel in one pass instead of a few dozen
NumPy operations on the aperture: an evaluation of the asymmetry costs about as many nanoseconds
per aperture pixel as the NumPy path costs microseconds per call, and the simplex that follows
statmorph's path (``scipy.optimize.fmin``'s steps, about 125 evaluations per stamp) runs without
returning to Python. Results equal the NumPy path's to rounding (tests/test_morphology.py).

``ENABLED`` is False when numba is missing or ``GALPROF_NO_JIT`` is set to a true value (``1``,
``true``, ``yes``); the NumPy path is then used and nothing is compiled. The compiled code is
cached on disk next to this file, or, where that is read-only, in numba's user-wide cache (or
``NUMBA_CACHE_DIR``); where no cache can be written it is compiled in every process.
"""

from __future__ import annotations

import math
import os

import numpy as np

try:  # optional dependency: galprof[fast]
    import numba
except ImportError:  # pragma: no cover - exercised where numba is missing
    numba = None

__all__ = ["COMPILED", "ENABLED", "asym_eval", "fmin2_asym", "radial_sums"]

_OFF = os.environ.get("GALPROF_NO_JIT", "").strip().lower() in ("1", "true", "yes", "on")
#: whether the kernels below are compiled (numba present and not turned off)
COMPILED = numba is not None and not _OFF
#: whether galprof uses them (tests switch this to compare both paths)
ENABLED = COMPILED

_PI8 = 0.125 * math.pi
# Constants shared with the NumPy and torch paths, defined here (and imported there) because
# numba's on-disk cache is rebuilt only when this file changes: a constant imported from another
# module would stay frozen in the cached code.
#: asymmetry where it is undefined (statmorph's "high energy" for its simplex)
BAD_VALUE = 100.0
#: pixel overlaps below this are rounding noise of a pixel that does not overlap: 0
TINY_OVERLAP = 1e-12
#: > sqrt(2) / 2: the farthest point of a unit pixel from its centre
HALF_DIAG = 0.7071068


def _jit(f):
    if not COMPILED:
        return f
    try:
        return numba.njit(cache=True, nogil=True)(f)
    except RuntimeError:  # no writable cache location: compile in every process instead
        return numba.njit(nogil=True)(f)


@_jit
def _corner_terms(frac, n, h, inv_r, out):
    """Terms of the disc's signed area at the ``n`` pixel-corner coordinates ``c - (h + 0.5) -
    frac``: out[0] = u^2, out[1] = u sign, out[2] = sign (G(u) - pi/8), out[3] = sign, with
    ``u = min(|z| / r, 1)`` and ``G(u) = (u sqrt(1 - u^2) + asin u) / 2``."""
    for c in range(n):
        z = (c - (h + 0.5)) - frac
        s = 1.0 if z > 0 else (-1.0 if z < 0 else 0.0)
        u = min(abs(z) * inv_r, 1.0)
        u2 = u * u
        t = math.sqrt(max(1.0 - u2, 0.0)) * u
        t += math.asin(u)
        t *= 0.5
        t -= _PI8
        out[0, c] = u2
        out[1, c] = u * s
        out[2, c] = t * s
        out[3, c] = s


@_jit
def _f(qx, qy, i, j):
    if qx[0, i] + qy[0, j] <= 1.0:
        return qx[1, i] * qy[1, j]
    return qx[2, i] * qy[3, j] + qx[3, i] * qy[2, j]


@_jit
def asym_eval(img, usable, unmasked, has_mask, off, ni, ring_col, ring_row, h, p, wp, nx, ny, r2, inv_r, sky_a, sky_d,
              square, qx, qy, cx, cy):
    """The asymmetry at ``(cx, cy)`` (``StampAsymmetry.__call__``); ``qx``, ``qy``: (4, w + 1)
    scratch arrays."""
    if not (0.0 <= cx < nx and 0.0 <= cy < ny):
        return BAD_VALUE
    fx = math.floor(cx)
    fy = math.floor(cy)
    tx = cx + cx
    ty = cy + cy
    n2x = math.floor(tx)
    n2y = math.floor(ty)
    gx = tx - n2x
    gy = ty - n2y
    gxy = gx * gy
    origin = (p + fy - h) * wp + (p + fx - h)
    mirror = (p + n2y - fy + h) * wp + (p + n2x - fx + h)
    mbase = 0
    if has_mask:
        mbase = (p + math.floor(ty + 0.5) - fy + h) * wp + (p + math.floor(tx + 0.5) - fx + h)
    nc = qx.shape[1]
    _corner_terms(cx - fx, nc, h, inv_r, qx)
    _corner_terms(cy - fy, nc, h, inv_r, qy)
    num = 0.0
    den = 0.0
    area = 0.0
    nsup = off.size
    for j in range(nsup):
        o = off[j]
        valid = usable[origin + o]
        if has_mask:
            valid *= unmasked[mbase - o]
        im = img[origin + o]
        a = img[mirror - o]
        bx = img[mirror + 1 - o]
        cyv = img[mirror + wp - o]
        e = img[mirror + wp + 1 - o]
        t = (a - im) * valid + gx * ((bx - a) * valid) + gy * ((cyv - a) * valid) + gxy * ((e - cyv - bx + a) * valid)
        if square:
            t = t * t
            ai = im * im * valid
        else:
            t = abs(t)
            ai = abs(im) * valid
        if j < ni:
            num += t
            den += ai
            area += valid
        else:
            k = j - ni
            c0 = ring_col[k]
            r0 = ring_row[k]
            wr = _f(qx, qy, c0, r0) - _f(qx, qy, c0, r0 + 1)
            wr -= _f(qx, qy, c0 + 1, r0)
            wr += _f(qx, qy, c0 + 1, r0 + 1)
            wr *= r2
            wr = min(max(wr, 0.0), 1.0)
            if wr < TINY_OVERLAP:  # rounding noise of a pixel that does not overlap
                wr = 0.0
            num += t * wr
            den += ai * wr
            area += valid * wr
    if den == 0:
        return BAD_VALUE
    return (num - area * sky_a) / (den - area * sky_d)


@_jit
def _order3(fs):
    """Indices sorting three values ascending, NaN last, stable (as ``sorted`` with the key
    ``(f != f, f)``)."""
    idx = np.arange(3)
    for i in range(1, 3):
        j = i
        while j > 0:
            a, b = fs[idx[j - 1]], fs[idx[j]]
            a_nan, b_nan = a != a, b != b
            if (a_nan and not b_nan) or (not a_nan and not b_nan and b < a):
                idx[j - 1], idx[j] = idx[j], idx[j - 1]
                j -= 1
            else:
                break
    return idx


@_jit
def fmin2_asym(img, usable, unmasked, has_mask, off, ni, ring_col, ring_row, h, p, wp, nx, ny, r2, inv_r, sky_a, sky_d,
               square, qx, qy, x0, y0, xtol, ftol, maxiter, maxfun):
    """:func:`galprof.morphology.asymmetry_cpu.fmin2` on :func:`asym_eval`; returns
    ``(x, y, f)`` of the best vertex."""
    args = (img, usable, unmasked, has_mask, off, ni, ring_col, ring_row, h, p, wp, nx, ny, r2, inv_r, sky_a, sky_d,
            square, qx, qy)
    rho, chi, psi, sigma = 1.0, 2.0, 0.5, 0.5
    sx = np.empty(3)
    sy = np.empty(3)
    fs = np.empty(3)
    sx[0], sy[0] = x0, y0
    sx[1], sy[1] = ((1 + 0.05) * x0 if x0 != 0 else 0.00025), y0
    sx[2], sy[2] = x0, ((1 + 0.05) * y0 if y0 != 0 else 0.00025)
    for i in range(3):
        fs[i] = asym_eval(*args, sx[i], sy[i])
    nfev, nit = 3, 1
    o = _order3(fs)
    sx, sy, fs = sx[o], sy[o], fs[o]
    while True:
        x0_, y0_, x1_, y1_, x2_, y2_ = sx[0], sy[0], sx[1], sy[1], sx[2], sy[2]
        xdone = max(abs(x1_ - x0_), abs(y1_ - y0_), abs(x2_ - x0_), abs(y2_ - y0_)) <= xtol
        fdone = max(abs(fs[0] - fs[1]), abs(fs[0] - fs[2])) <= ftol
        if (xdone and fdone) or nfev >= maxfun or nit >= maxiter:
            break
        xb, yb = (x0_ + x1_) / 2, (y0_ + y1_) / 2
        xr, yr = (1 + rho) * xb - rho * x2_, (1 + rho) * yb - rho * y2_
        fxr = asym_eval(*args, xr, yr)
        nfev += 1
        shrink = False
        if fxr < fs[0]:
            xe, ye = (1 + rho * chi) * xb - rho * chi * x2_, (1 + rho * chi) * yb - rho * chi * y2_
            fxe = asym_eval(*args, xe, ye)
            nfev += 1
            if fxe < fxr:
                sx[2], sy[2], fs[2] = xe, ye, fxe
            else:
                sx[2], sy[2], fs[2] = xr, yr, fxr
        elif fxr < fs[1]:
            sx[2], sy[2], fs[2] = xr, yr, fxr
        else:
            if fxr < fs[2]:
                xc, yc = (1 + psi * rho) * xb - psi * rho * x2_, (1 + psi * rho) * yb - psi * rho * y2_
                fxc = asym_eval(*args, xc, yc)
                nfev += 1
                if fxc <= fxr:
                    sx[2], sy[2], fs[2] = xc, yc, fxc
                else:
                    shrink = True
            else:
                xcc, ycc = (1 - psi) * xb + psi * x2_, (1 - psi) * yb + psi * y2_
                fxcc = asym_eval(*args, xcc, ycc)
                nfev += 1
                if fxcc < fs[2]:
                    sx[2], sy[2], fs[2] = xcc, ycc, fxcc
                else:
                    shrink = True
            if shrink:
                for j in (1, 2):
                    sx[j] = x0_ + sigma * (sx[j] - x0_)
                    sy[j] = y0_ + sigma * (sy[j] - y0_)
                    fs[j] = asym_eval(*args, sx[j], sy[j])
                nfev += 2
        o = _order3(fs)
        sx, sy, fs = sx[o], sy[o], fs[o]
        nit += 1
    return sx[0], sy[0], fs[0]


# -- exact aperture sums (galprof.morphology.radial.RadialProfile.sums) ------------------------

@_jit
def _quadrant(x, y, r):
    """geometry._quadrant for one corner."""
    bx = min(x, r)
    by = min(y, r)
    r2 = r * r
    bx2 = bx * bx
    by2 = by * by
    if bx2 + by2 <= r2:
        return bx * by
    rs = r if r > 0 else 1.0
    vx = math.sqrt(max(r2 - bx2, 0.0))
    uy = math.sqrt(max(r2 - by2, 0.0))
    angles = math.asin(min(bx / rs, 1.0)) + math.asin(min(by / rs, 1.0)) - 0.5 * math.pi
    return 0.5 * (by * uy + bx * vx + r2 * angles)


@_jit
def _sign(v):
    return 1.0 if v > 0 else (-1.0 if v < 0 else 0.0)


@_jit
def circle_overlap(dx, dy, r):
    """geometry.circle_pixel_overlap for one pixel."""
    ax = abs(dx)
    ay = abs(dy)
    r = max(r, 0.0)
    q0 = _quadrant(abs(ax + 0.5), abs(ay + 0.5), r)
    q1 = _quadrant(abs(ax - 0.5), abs(ay + 0.5), r)
    q2 = _quadrant(abs(ax + 0.5), abs(ay - 0.5), r)
    q3 = _quadrant(abs(ax - 0.5), abs(ay - 0.5), r)
    sx = _sign(ax - 0.5)
    sy = _sign(ay - 0.5)
    v = q0 - sx * q1 - sy * q2 + (sx * sy) * q3
    return min(max(v, 0.0), 1.0)


@_jit
def _triangle(px, py, qx, qy, r):
    """geometry.circle_triangle_area for one edge."""
    dx = qx - px
    dy = qy - py
    a = dx * dx + dy * dy
    b = px * dx + py * dy
    r2 = r * r
    c = px * px + py * py - r2
    s = math.sqrt(max(b * b - a * c, 0.0))
    t1 = min(max((-b - s) / a, 0.0), 1.0)
    t2 = min(max((-b + s) / a, 0.0), 1.0)
    ax = px + t1 * dx
    ay = py + t1 * dy
    bx = px + t2 * dx
    by = py + t2 * dy
    sector1 = math.atan2(px * ay - py * ax, px * ax + py * ay)
    sector2 = math.atan2(bx * qy - by * qx, bx * qx + by * qy)
    tri = ax * by - ay * bx
    return 0.5 * (r2 * (sector1 + sector2) + tri)


@_jit
def ellipse_overlap(dx, dy, a, elong, cos_t, sin_t):
    """geometry.ellipse_pixel_overlap for one pixel."""
    us = np.empty(4)
    vs = np.empty(4)
    for k in range(4):
        ox = -0.5 if (k == 0 or k == 3) else 0.5
        oy = -0.5 if k < 2 else 0.5
        x = dx + ox
        y = dy + oy
        us[k] = x * cos_t + y * sin_t
        vs[k] = (y * cos_t - x * sin_t) * elong
    r = max(a, 0.0)
    total = _triangle(us[0], vs[0], us[1], vs[1], r)
    for k in range(1, 4):
        total += _triangle(us[k], vs[k], us[(k + 1) % 4], vs[(k + 1) % 4], r)
    return min(max(total / elong, 0.0), 1.0)


@_jit
def radial_sums(rho, order, vals, cum, xc, yc, width, delta, elong, cos_t, sin_t, circular, index, a, out):
    """``RadialProfile.sums``: ``out[i, :, j]`` = the exact sums of every channel of stamp
    ``index[i]`` over the ellipse of semi-major axis ``a[i, j]``: the prefix sum below the ring
    ``|rho - a| < delta`` plus the exact overlaps of the ring's pixels."""
    bq, q = a.shape
    c = vals.shape[2]
    ring = np.empty(c)
    for i in range(bq):
        b = index[i]
        row = rho[b]
        for j in range(q):
            aa = a[i, j]
            k0 = np.searchsorted(row, aa - delta[b])
            k1 = np.searchsorted(row, aa + delta[b])
            ring[:] = 0.0
            for pos in range(k0, k1):
                pix = order[b, pos]
                dx = (pix % width) - xc[b]
                dy = (pix // width) - yc[b]
                if circular:
                    wt = circle_overlap(dx, dy, aa)
                else:
                    wt = ellipse_overlap(dx, dy, aa, elong[b], cos_t[b], sin_t[b])
                for ch in range(c):
                    ring[ch] += vals[b, pos, ch] * wt
            for ch in range(c):
                out[i, ch, j] = cum[b, k0, ch] + ring[ch]


@_jit
def ellipse_weights(dx, dy, a, elong, cos_t, sin_t, out):
    """geometry.aperture_weights for ellipses, elementwise over 1-D arrays: 1 inside ``a - delta``
    (elliptical radius of the pixel centre), the exact overlap within ``delta`` of ``a``, else 0."""
    for i in range(dx.size):
        e = elong[i]
        u = dx[i] * cos_t[i] + dy[i] * sin_t[i]
        v = (dy[i] * cos_t[i] - dx[i] * sin_t[i]) * e
        rho = math.sqrt(u * u + v * v)
        delta = HALF_DIAG * e
        if abs(rho - a[i]) < delta:
            out[i] = ellipse_overlap(dx[i], dy[i], a[i], e, cos_t[i], sin_t[i])
        else:
            out[i] = 1.0 if rho < a[i] - delta else 0.0
