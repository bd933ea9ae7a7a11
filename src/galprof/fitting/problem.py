"""The least-squares problem of a batch: weighted residuals and their Jacobian."""

from __future__ import annotations

import torch
from torch.func import jvp

from ..params import Interval, ParameterLayout, UpperBound
from ..render import Renderer
from .data import StampBatch

__all__ = ["FitProblem", "finite_difference_steps", "step_scales"]

#: per-iteration step limits of unbounded parameters, by kind (pixels, magnitudes, degrees)
_UNBOUNDED_STEP = {"x": 2.0, "y": 2.0, "mag": 0.5, "angle": 20.0, "length": 2.0}


STATISTICS = ("chi2", "cash")


def step_scales(layout: ParameterLayout, dtype: torch.dtype, device, flux: float = 1.0) -> torch.Tensor:
    """(P,) largest step per iteration of each free parameter of ``layout``, in the optimiser's
    space: 1 for bounded (transformed) parameters, a physical scale for unbounded ones; ``flux``
    for an unbounded level in the data's units (a sky), e.g. ``StampBatch.flux_step``."""
    scales = []
    for key in layout.free:
        lo, hi = layout.bounds(key)
        if lo is not None or hi is not None:
            scales.append(1.0)
        else:
            kind = layout.spec(key).kind
            scales.append(flux if kind == "flux" else _UNBOUNDED_STEP.get(kind, 1.0))
    return torch.tensor(scales, dtype=dtype, device=device)


def finite_difference_steps(z: torch.Tensor, bounded, scale: torch.Tensor | None = None, eps: float | None = None):
    """Perturbed values ``zs`` (b, P) of each free parameter for its forward-difference column,
    and the step ``h`` (b, P) that column is divided by.

    An unbounded parameter steps by ``sqrt(eps) max(|scale|, 1)`` (``scale``: ``z`` by default; a
    field passes each position relative to its window; ``eps``: the rendering precision's, that of
    ``z`` by default). A bounded one (``bounded``: pairs of
    column and :class:`~galprof.params.Transform`) steps by that much *physically*, towards the
    inside of its interval and by at most a quarter of the interval's width, and
    ``h = (x(zs) - x(z)) / x'(z)``: its column is then the physical derivative times ``x'(z)``,
    exact by the chain rule. A step in ``z`` would move a parameter near its bound (a saturated
    transform) by less than the rounding of the model, and leave its column, and the sign of its
    gradient, to noise.
    """
    eps = torch.finfo(z.dtype).eps if eps is None else eps
    zs = z + eps ** 0.5 * torch.maximum((z if scale is None else scale).abs(), torch.ones_like(z))
    h = zs - z                      # the step taken, rounding included
    for j, t in bounded:
        zj = z[:, j]
        x = t.forward(zj)
        hx = eps ** 0.5 * torch.clamp(x.abs(), min=1.0)
        # towards the inside: down from the upper half of an interval or from an upper bound,
        # up otherwise
        if isinstance(t, Interval):
            inward = torch.where(zj > 0, -1.0, 1.0).to(z.dtype)
            hx = hx.clamp(max=0.25 * (t.hi - t.lo))
        else:
            inward = torch.full_like(zj, -1.0 if isinstance(t, UpperBound) else 1.0)
        zj_s = t.inverse(x + inward * hx)
        zs[:, j] = zj_s
        # (a transform saturated in this precision has x'(z) = 0: an infinite h, a zero column)
        h[:, j] = (t.forward(zj_s) - x) / t.derivative(zj)
    return zs, h


def poisson_deviance_residuals(model: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Signed square roots of the Poisson deviance terms, ``sign(m - d) sqrt(2 (m - d - d ln(m/d)))``.

    Their squares sum to the Cash statistic ``2 sum(m - d ln m)`` up to a constant of the data
    (IMFIT's "modified Cash" / Poisson maximum-likelihood-ratio statistic), so least squares on
    them is maximum likelihood for Poisson counts. Written as ``(m - d) sqrt(f(m/d) / d)``
    with ``f(u) = 2 (u - 1 - ln u) / (u - 1)^2`` (a series near u = 1), smooth at m = d.
    Pixels with d = 0 give ``sqrt(2 m)``; a model <= 0 where d > 0 gives NaN (rejected step).
    """
    pos = data > 0
    d = torch.where(pos, data, torch.ones_like(data))
    u = model / d
    e = u - 1
    near = e.abs() < 1e-3
    e_far = torch.where(near, torch.ones_like(e), e)
    f_far = 2 * (e_far - torch.log(torch.where(near, torch.full_like(u, 2.0), u))) / (e_far * e_far)
    f_near = 1 + e * (-2.0 / 3 + e * (0.5 + e * (-0.4 + e / 3)))
    f = torch.where(near, f_near, f_far)
    r_pos = (model - d) * torch.sqrt(f / d)
    m0 = torch.where(pos, torch.ones_like(model), model)
    r_zero = torch.sqrt(2 * m0)
    return torch.where(pos, r_pos, r_zero)


class FitProblem:
    """Residuals of a batch as a function of the unconstrained free parameters ``z`` (B, P),
    and their Jacobian through the renderer (the PSF is part of the model).

    With ``statistic="chi2"`` the residuals are ``sqrt(w) (model - data)`` (w = 1/sigma^2 on
    good pixels); with ``"cash"`` they are the signed Poisson deviance terms of
    :func:`poisson_deviance_residuals` on good pixels (data and model in counts). Either way
    the fit minimises their sum of squares.

    Every method takes ``index``, the rows of the problem that ``z`` holds (compacted active
    sets): rows are independent, so a subset costs only its own share. A row is a galaxy of
    the batch, unless ``rows`` maps rows to galaxies (bootstrap resamples), each row then
    weighting its pixels by ``multiplicity`` (rows, H, W) as well.
    """

    def __init__(self, renderer: Renderer, layout: ParameterLayout, batch: StampBatch, *,
                 jacobian: str = "autodiff", statistic: str = "chi2", rows: torch.Tensor | None = None,
                 multiplicity: torch.Tensor | None = None, max_jacobian_bytes: int = 2 ** 31):
        if jacobian not in ("autodiff", "finite-difference"):
            raise ValueError(f"jacobian must be 'autodiff' or 'finite-difference', got {jacobian!r}")
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        self.jacobian = jacobian
        self.statistic = statistic
        self.renderer = renderer
        self.layout = layout
        self.batch = batch
        self.rows = rows
        self.multiplicity = multiplicity
        self.sqrt_w = batch.weights.sqrt() if statistic == "chi2" else (batch.weights > 0).to(batch.weights.dtype)
        self.n_free = len(layout.free)
        #: largest step per iteration of each free parameter, in the optimiser's space:
        #: 1 for bounded (transformed) parameters, a physical scale for unbounded ones
        self.step_scale = step_scales(layout, batch.images.dtype, batch.images.device, flux=batch.flux_step)
        self._bounded = [(j, layout.transform(key)) for j, key in enumerate(layout.free)
                         if any(b is not None for b in layout.bounds(key))]
        self._fd_groups = self._component_groups() if jacobian == "finite-difference" else None
        #: with a single flux component and a band-limited PSF, the Jacobian columns of its free
        #: centre are the model's shift derivatives (Fourier space, no render of their own); the
        #: optimiser may carry them from its trial render (``residuals(..., shift=True)``)
        self.carries_shift = self._fd_groups is not None and statistic == "chi2" and self._shift_plan()
        #: above this size the finite-difference Jacobian of a batch is not held whole: its normal
        #: equations are accumulated group by group (:meth:`_streamed_normal_equations`)
        self.max_jacobian_bytes = max_jacobian_bytes

    def _component_groups(self):
        """How the finite-difference Jacobian renders its columns (chi2 statistic): columns are
        grouped by the components their parameter reaches, and a group renders only those
        components (the residuals are linear in the model, itself a sum of components): a
        column of a bulge parameter renders the bulge, one of the sky next to nothing. Each
        group's base image comes from the residuals when the group is the whole model, or as
        the model minus the other components when those are cheaper to render (a sky). The
        column of the ``mag`` of a group's only component is that base image scaled, with no
        render. Returns ``[(components, columns, base, mag_column)]`` with ``base`` one of
        ``"model"``, ``"minus"``, ``"render"``, or ``None`` when the whole model per column is
        as cheap."""
        comp_of = {k: k.split(".", 1)[0] for k in self.layout.keys}
        groups: dict[frozenset, list[int]] = {}
        for j, key in enumerate(self.layout.free):
            reach = frozenset(comp_of[k] for k in self.layout.reached_by(key))
            groups.setdefault(reach, []).append(j)
        cost = self.renderer.render_cost
        model = self.renderer.model
        everything = frozenset(c.name for c in model.components)
        flux_like = {c.name for c in model.components if c.profile.kind in ("elliptical", "point")}

        def mag_column(comps, cols):
            if len(comps) != 1 or next(iter(comps)) not in flux_like:
                return None
            name = f"{next(iter(comps))}.mag"
            hits = [j for j in cols if self.layout.free[j] == name]
            return hits[0] if hits else None

        plan, total = [], 0.0
        for comps, cols in groups.items():
            rest = everything - comps
            if not rest:
                base, base_cost = "model", 0.0
            elif cost(sorted(rest)) < cost(sorted(comps)):
                base, base_cost = "minus", cost(sorted(rest))
            else:
                base, base_cost = "render", cost(sorted(comps))
            mag = mag_column(comps, cols)
            rendered = [j for j in cols if j != mag]
            total += base_cost + len(rendered) * cost(sorted(comps))
            plan.append((sorted(comps), sorted(rest), base, mag,
                         torch.tensor(rendered, dtype=torch.long, device=self.batch.images.device)))
        if total >= 0.95 * self.n_free * cost(sorted(everything)):
            return None
        return plan

    def _shift_plan(self) -> bool:
        """Mark the finite-difference groups whose columns include the free centre of the model's
        only flux component (see ``carries_shift``); True when there is one."""
        flux = [c for c in self.renderer.model.components if c.profile.kind in ("elliptical", "point")]
        if len(flux) != 1 or not self.renderer.shift_derivatives_ok:
            return False
        name = flux[0].name
        found = False
        for i, (comps, rest, base, mag, cols) in enumerate(self._fd_groups):
            if comps != [name]:
                continue
            shift = []
            for axis, key in enumerate((f"{name}.x0", f"{name}.y0")):
                if key in self.layout.free and self.layout.reached_by(key) == {key}:
                    shift.append((self.layout.free.index(key), axis))
            if shift:
                # a batch mixing band-limited PSFs with others keeps rendering the centre's
                # finite differences, for the others (a galaxy's fit never depends on its batch)
                mixed = not bool(self.renderer.shift_exact.all())
                if not mixed:
                    drop = {j for j, _ in shift}
                    cols = torch.tensor([j for j in cols.tolist() if j not in drop], dtype=torch.long,
                                        device=cols.device)
                self._fd_groups[i] = (comps, rest, base, mag, cols, shift, mixed)
                found = True
        return found

    def at_bound(self, z: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
        """(b, P) bool: free parameters that sit at a bound, where the derivative of their
        transform has fallen below ``tol`` times its largest value (an interval's sigmoid is
        saturated; a one-sided bound's softplus is flat). In the optimiser's space such a
        parameter can only creep towards the bound, never reach it."""
        out = torch.zeros_like(z, dtype=torch.bool)
        for j, t in self._bounded:
            d = t.derivative(z[:, j]).abs()
            peak = 0.25 * abs(t.hi - t.lo) if hasattr(t, "hi") and hasattr(t, "lo") else 1.0
            out[:, j] = d < tol * peak
        return out

    def values(self, z: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.layout.subset(index).physical(z)

    def model(self, z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(b, H, W) model images of the rows ``index``."""
        g = index if self.rows is None else self.rows[index]
        return self.renderer(self.values(z, index), check=False, index=g)

    def _sqrt_weights(self, index: torch.Tensor) -> torch.Tensor:
        g = index if self.rows is None else self.rows[index]
        sw = self.sqrt_w[g]
        if self.multiplicity is not None:
            sw = sw * self.multiplicity[index].to(sw.dtype).sqrt()
        return sw

    def residuals(self, z: torch.Tensor, index: torch.Tensor, pearson: torch.Tensor | None = None,
                  shift: bool = False):
        """(b, H*W) residuals of the rows ``index``.

        ``shift=True`` (where ``carries_shift``) returns ``(residuals, shift)``, ``shift``
        (b, H*W, 2) the weighted derivatives of the model with respect to moving it by one pixel
        along x and y, to hand back to :meth:`normal_equations` at the same point.

        ``pearson`` (b, H, W), a fixed model image, replaces the statistic by Pearson's
        ``(model - data) / sqrt(pearson)``, whose ``J^T J`` is the Poisson Fisher information
        (used for the covariance of Cash fits).
        """
        g = index if self.rows is None else self.rows[index]
        if shift:
            model, dx, dy = self.renderer(self.values(z, index), check=False, index=g, shift_derivatives=True)
        else:
            model = self.renderer(self.values(z, index), check=False, index=g)
        data = self.batch.images[g]
        sw = self._sqrt_weights(index)
        if pearson is not None:
            tiny = torch.finfo(model.dtype).tiny
            r = (model - data) * sw / torch.sqrt(pearson.clamp(min=tiny))
        elif self.statistic == "cash":
            # masked pixels: data and model replaced by 1 so the (zero-weighted) term is finite
            good = sw > 0
            one = torch.ones_like(model)
            r = poisson_deviance_residuals(torch.where(good, model, one), torch.where(good, data, one)) * sw
        else:
            r = (model - data) * sw
        r = r.reshape(r.shape[0], -1)
        if shift:
            return r, torch.stack([(dx * sw).reshape(r.shape), (dy * sw).reshape(r.shape)], dim=2)
        return r

    def _group_columns(self, z, index, zp, h, r, group, values, sw, model_sw, shift=None):
        """(b, N, k) forward-difference columns of one group of :meth:`_component_groups` (its
        columns ``cols``, ``mag`` and the centre's shift columns together, in that order) and
        their indices. ``shift`` (b, N, 2): the weighted shift derivatives at ``z``, if known."""
        comps, rest, base, mag, cols = group[:5]
        centre, mixed = group[5:] if len(group) > 5 else ([], False)
        b, P = z.shape
        g = index if self.rows is None else self.rows[index]

        def render(vals, rows, comps):
            return self.renderer(vals, check=False, index=rows, components=comps).reshape(rows.shape[0], -1)

        if centre and shift is None:
            img, dx, dy = self.renderer(values, check=False, index=g, components=comps, shift_derivatives=True)
            shift = torch.stack([(dx.reshape(b, -1) * sw), (dy.reshape(b, -1) * sw)], dim=2)
            base_sw = img.reshape(b, -1) * sw
        elif base == "model":
            base_sw = model_sw
        elif base == "minus":
            base_sw = model_sw - render(values, g, rest) * sw
        else:
            base_sw = render(values, g, comps) * sw
        out, idx = [], []
        k = cols.numel()
        if k:
            zk = zp[cols].reshape(k * b, P)
            img = render(self.values(zk, index.repeat(k)), g.repeat(k), comps)
            diff = img.reshape(k, b, -1) * sw - base_sw
            out.append((diff / h.T[cols][:, :, None]).permute(1, 2, 0))
            idx += cols.tolist()
        if mag is not None:
            # the component's image is proportional to its flux
            key = self.layout.free[mag]
            dm = self.values(zp[mag], index)[key] - values[key]
            out.append((base_sw * (torch.pow(10.0, -0.4 * dm) - 1.0)[:, None] / h[:, mag][:, None])[:, :, None])
            idx.append(mag)
        if mixed:
            use = self.renderer.shift_exact.expand(self.renderer.batch_size)[g].view(-1, 1)
        for j, axis in centre:
            # d model / d z = (d model / d x0) (d x0 / d z)
            dxdz = self.layout.transform(self.layout.free[j]).derivative(z[:, j])
            col = shift[:, :, axis] * dxdz[:, None]
            if not mixed:
                out.append(col[:, :, None])
                idx.append(j)
            else:
                at = idx.index(j)
                out[0][:, :, at] = torch.where(use, col, out[0][:, :, at])
        return torch.cat(out, dim=2), idx

    def _jacobian_parts(self, z, index, zp, h, r, shift=None):
        """Yields ``(columns (b, N, k), their indices)`` group by group (see :meth:`_component_groups`)."""
        b = z.shape[0]
        g = index if self.rows is None else self.rows[index]
        sw = self._sqrt_weights(index).reshape(b, -1)
        model_sw = r + self.batch.images[g].reshape(b, -1) * sw     # sqrt(w) model, from r
        values = self.values(z, index)
        for group in self._fd_groups:
            yield lambda group=group: self._group_columns(z, index, zp, h, r, group, values, sw, model_sw, shift)

    def _grouped_jacobian(self, z, index, zp, h, r, shift=None):
        """(b, N, P) forward differences by component groups (see :meth:`_component_groups`);
        ``zp`` (P, b, P) holds the perturbed points, ``r`` the residuals at ``z``."""
        b, P = z.shape
        J = torch.empty(b, r.shape[1], P, dtype=z.dtype, device=z.device)
        for part in self._jacobian_parts(z, index, zp, h, r, shift):
            cols, idx = part()
            J[:, :, idx] = cols
        return J

    def _streamed_normal_equations(self, z, index, zp, h, r, shift=None):
        """``J^T J`` and ``J^T r`` group by group, holding at most two groups' columns: each pair of
        groups is rendered again (about G / 2 times the renders of the whole Jacobian, for G
        groups), so that memory stays bounded for large stamps with many parameters."""
        b, P = z.shape
        f64 = torch.float64
        A = torch.zeros(b, P, P, dtype=f64, device=z.device)
        g = torch.zeros(b, P, dtype=f64, device=z.device)
        parts = list(self._jacobian_parts(z, index, zp, h, r, shift))
        for i, part in enumerate(parts):
            Ji, ii = part()
            Ji = Ji.to(f64)
            ti = torch.tensor(ii, device=z.device)
            A[:, ti[:, None], ti[None, :]] = Ji.transpose(1, 2) @ Ji
            g[:, ti] = (Ji.transpose(1, 2) @ r.to(f64)[..., None])[..., 0]
            for other in parts[i + 1:]:
                Jj, jj = other()
                tj = torch.tensor(jj, device=z.device)
                blk = Ji.transpose(1, 2) @ Jj.to(f64)
                A[:, ti[:, None], tj[None, :]] = blk
                A[:, tj[:, None], ti[None, :]] = blk.transpose(1, 2)
        return A.to(z.dtype), g.to(z.dtype), (r.to(f64) ** 2).sum(1).to(z.dtype)

    def normal_equations(self, z: torch.Tensor, index: torch.Tensor, *, fisher: bool = False,
                         residuals: torch.Tensor | None = None, shift: torch.Tensor | None = None):
        """``J^T J`` (b, P, P), ``J^T r`` (b, P) and ``chi2`` (b,) at ``z``.

        J is built one column at a time (forward mode), so memory is that of P residual
        vectors, never of a dense (pixels x pixels) object. ``fisher=True`` (for the
        covariance) makes ``J^T J`` the Fisher information of the statistic: for chi2 it is
        already; for Cash it is ``sum (dm/dtheta)^2 / m`` (Pearson weights at ``z``), and the
        returned chi2 and gradient are then Pearson's. ``residuals`` (b, N), those at ``z``
        when the caller has them (the optimiser's accepted trial step), spares one render;
        ``shift`` (b, N, 2), the shift derivatives from the same render (``residuals(...,
        shift=True)``), spares the renders of the centre's columns.
        """
        b, P = z.shape
        resid = self.residuals
        if fisher and self.statistic == "cash":
            base = self.model(z, index).detach()
            resid = lambda zz, ii: self.residuals(zz, ii, pearson=base.repeat(ii.numel() // b, 1, 1))
        if P == 0:
            r = resid(z, index)
            return (torch.zeros(b, 0, 0, dtype=z.dtype, device=z.device),
                    torch.zeros(b, 0, dtype=z.dtype, device=z.device), (r * r).sum(1))
        if self.jacobian == "finite-difference":
            # forward differences, all P perturbed copies rendered as one batch
            zs, h = finite_difference_steps(z, self._bounded)                     # (b, P) each
            zp = z[None].repeat(P, 1, 1)                                          # (P, b, P)
            eye = torch.eye(P, dtype=z.dtype, device=z.device)
            zp = zp + eye[:, None, :] * (zs - z)[None]
            r = resid(z, index) if residuals is None or fisher else residuals
            shift = None if residuals is None or fisher else shift
            # (for chi2 the Fisher information is J^T J itself)
            grouped = self._fd_groups is not None and self.statistic == "chi2"
            if grouped and b * r.shape[1] * P * z.element_size() > self.max_jacobian_bytes and len(self._fd_groups) > 1:
                return self._streamed_normal_equations(z, index, zp, h, r, shift)
            if grouped:
                J = self._grouped_jacobian(z, index, zp, h, r, shift)
            else:
                rp = resid(zp.reshape(P * b, P), index.repeat(P)).reshape(P, b, -1)
                J = ((rp - r[None]) / h.T[:, :, None]).permute(1, 2, 0)           # (b, N, P)
        else:
            cols = []
            for p in range(P):
                tangent = torch.zeros_like(z)
                tangent[:, p] = 1.0
                r, dr = jvp(lambda zz: resid(zz, index), (z,), (tangent,))
                cols.append(dr)
            J = torch.stack(cols, dim=-1)                 # (b, N, P)
        if J.dtype == torch.float64:
            return J.transpose(1, 2) @ J, (J.transpose(1, 2) @ r[..., None])[..., 0], (r * r).sum(1)
        # lower precision: the sums over pixels are accumulated in float64, in chunks of pixels
        # (a float32 sum over a large stamp keeps only a few digits of J^T J)
        f64 = torch.float64
        A = torch.zeros(b, P, P, dtype=f64, device=z.device)
        g = torch.zeros(b, P, dtype=f64, device=z.device)
        step = max(1, 2 ** 22 // max(1, b * P))
        for s in range(0, J.shape[1], step):
            Jc = J[:, s:s + step].to(f64)
            A += Jc.transpose(1, 2) @ Jc
            g += (Jc.transpose(1, 2) @ r[:, s:s + step, None].to(f64))[..., 0]
        return A.to(J.dtype), g.to(J.dtype), (r.to(f64) ** 2).sum(1).to(J.dtype)
