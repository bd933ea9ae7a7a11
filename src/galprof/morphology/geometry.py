"""Exact overlap of ellipses and circles with square pixels (pure tensor kernels).

A pixel is the unit square centred on its integer coordinates (pixel ``[i, j]`` covers
``x in [j - 1/2, j + 1/2]``, ``y in [i - 1/2, i + 1/2]``), as in photutils' "exact" aperture
method that statmorph uses. The ellipse is mapped to a circle of radius ``a`` by the affine map
that rotates by ``-theta`` and stretches the minor axis by ``a / b``; the pixel becomes a
parallelogram and the overlap is the sum, over its four edges, of the signed area of the
circle's intersection with the triangle (centre, edge start, edge end), divided by ``a / b``.
Everything is elementwise and branch-free, so the functions broadcast over any batch shape.
"""

from __future__ import annotations

import math

import torch

from .asymmetry_jit import HALF_DIAG as _HALF_DIAG

__all__ = ["ellipse_pixel_overlap", "circle_pixel_overlap", "circle_triangle_area", "aperture_weights"]

# corners of the unit pixel, counter-clockwise, relative to its centre
_CORNERS = ((-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5))


def circle_triangle_area(px: torch.Tensor, py: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor,
                         r: torch.Tensor) -> torch.Tensor:
    """Signed area of the intersection of the disc ``|z| <= r`` with the triangle (0, P, Q).

    Positive when P -> Q turns counter-clockwise about the origin.
    """
    dx, dy = qx - px, qy - py
    a = dx * dx + dy * dy  # > 0: pixel edges have non-zero length
    b = px * dx + py * dy
    r2 = r * r
    c = px * px + py * py - r2
    s = torch.sqrt((b * b - a * c).clamp_min(0.0))
    # no crossing (s = 0): A = B is a point of the edge and the two sectors make up P -> Q
    t1 = ((-b - s) / a).clamp(0.0, 1.0)
    t2 = ((-b + s) / a).clamp(0.0, 1.0)
    ax, ay = px + t1 * dx, py + t1 * dy
    bx, by = px + t2 * dx, py + t2 * dy
    # P -> A and B -> Q lie outside the disc (circular sectors), A -> B inside (a triangle)
    sector1 = torch.atan2(px * ay - py * ax, px * ax + py * ay)
    sector2 = torch.atan2(bx * qy - by * qx, bx * qx + by * qy)
    tri = ax * by - ay * bx
    return 0.5 * (r2 * (sector1 + sector2) + tri)


def ellipse_pixel_overlap(dx: torch.Tensor, dy: torch.Tensor, a: torch.Tensor, elongation: torch.Tensor | float = 1.0,
                          cos_t: torch.Tensor | float = 1.0, sin_t: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Area of the unit pixel centred at ``(dx, dy)`` (relative to the ellipse centre, pixels)
    inside the ellipse of semi-major axis ``a`` (pixels), ``elongation = a / b >= 1`` and major
    axis at angle ``theta`` counter-clockwise from +x (``cos_t``, ``sin_t``). With the defaults
    the ellipse is a circle of radius ``a``. ``a <= 0`` gives 0."""
    total = None
    cx, cy = [], []
    for ox, oy in _CORNERS:
        x, y = dx + ox, dy + oy
        u = x * cos_t + y * sin_t
        v = (y * cos_t - x * sin_t) * elongation
        cx.append(u)
        cy.append(v)
    r = torch.clamp(torch.as_tensor(a, dtype=dx.dtype, device=dx.device), min=0.0)
    for k in range(4):
        t = circle_triangle_area(cx[k], cy[k], cx[(k + 1) % 4], cy[(k + 1) % 4], r)
        total = t if total is None else total + t
    return (total / elongation).clamp(0.0, 1.0)


def _quadrant(x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Area of ``{0 <= u <= x, 0 <= v <= y}`` inside the disc of radius ``r`` (x, y >= 0)."""
    bx, by = torch.minimum(x, r), torch.minimum(y, r)
    r2 = r * r
    bx2, by2 = bx * bx, by * by
    rs = torch.where(r > 0, r, torch.ones_like(r))
    vx = torch.sqrt((r2 - bx2).clamp_min(0.0))
    uy = torch.sqrt((r2 - by2).clamp_min(0.0))
    angles = torch.asin((bx / rs).clamp(max=1.0)) + torch.asin((by / rs).clamp(max=1.0)) - 0.5 * math.pi
    part = 0.5 * (by * uy + bx * vx + r2 * angles)
    return torch.where(bx2 + by2 <= r2, bx * by, part)


def circle_pixel_overlap(dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Area of the unit pixel centred at ``(dx, dy)`` (relative to the circle's centre) inside
    the circle of radius ``r`` (pixels): inclusion-exclusion of the four corner quadrants
    ``[0, x] x [0, y]``, whose area within the disc has a closed form. The pixel is first
    reflected into the first quadrant (same area)."""
    ax, ay = dx.abs(), dy.abs()
    shape = (4,) + (1,) * ax.dim()
    off_x = torch.tensor([0.5, -0.5, 0.5, -0.5], dtype=ax.dtype, device=ax.device).view(shape)
    off_y = torch.tensor([0.5, 0.5, -0.5, -0.5], dtype=ax.dtype, device=ax.device).view(shape)
    cx = ax.unsqueeze(0) + off_x
    cy = ay.unsqueeze(0) + off_y
    r = torch.as_tensor(r, dtype=ax.dtype, device=ax.device).clamp_min(0.0)
    q = _quadrant(cx.abs(), cy.abs(), r.unsqueeze(0) if r.dim() else r)
    sx = torch.sign(cx[1])  # the low edges may lie left of / below the centre
    sy = torch.sign(cy[2])
    return (q[0] - sx * q[1] - sy * q[2] + (sx * sy) * q[3]).clamp(0.0, 1.0)


def aperture_weights(dx: torch.Tensor, dy: torch.Tensor, a: torch.Tensor, elongation: torch.Tensor | None = None,
                     cos_t: torch.Tensor | None = None, sin_t: torch.Tensor | None = None) -> torch.Tensor:
    """Dense exact weights of the pixels centred at ``(dx, dy)`` for the ellipse (circle when
    ``elongation`` is None) of semi-major axis ``a``; the exact overlap is computed only for the
    pixels that the boundary crosses (arguments broadcast together)."""
    if elongation is None:
        dx, dy, a = torch.broadcast_tensors(dx, dy, torch.as_tensor(a, dtype=dx.dtype, device=dx.device))
        rho = torch.sqrt(dx * dx + dy * dy)
        delta = torch.full_like(rho, _HALF_DIAG)
        e = cs = sn = None
    else:
        dx, dy, a, e, cs, sn = torch.broadcast_tensors(dx, dy, a, elongation, cos_t, sin_t)
        u = dx * cs + dy * sn
        v = (dy * cs - dx * sn) * e
        rho = torch.sqrt(u * u + v * v)
        delta = _HALF_DIAG * e
    w = (rho < a - delta).to(dx.dtype)
    part = ((rho - a).abs() < delta).nonzero(as_tuple=True)
    if part[0].numel():
        if e is None:
            w[part] = circle_pixel_overlap(dx[part], dy[part], a[part])
        else:
            w[part] = ellipse_pixel_overlap(dx[part], dy[part], a[part], e[part], cs[part], sn[part])
    return w


