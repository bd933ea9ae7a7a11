"""Fitting every source of a field together: one image, many sources, a shared sky.

Each source is a copy of a *template* — the model's components other than its skies, ties
between them included — with parameters of its own; the model's sky components are shared
by the whole field. All sources and the sky are fitted jointly by Levenberg–Marquardt
(:func:`galprof.fitting.lm.levenberg_marquardt`), exploiting that each source touches only
its own neighbourhood:

* every source is rendered on its own *window* (a square of the field around it, large
  enough to hold ``window_flux`` of its light plus the PSF's half-size); windows of similar
  size are rendered as one batch, and the field model is the sum of the windows plus the sky;
* a Jacobian column of a source parameter is non-zero only on that source's window, and one
  perturbation of (say) every source's ``re`` at once gives all the ``re`` columns (the
  sources are independent), so a Jacobian costs ``1 + P_template`` batched window renders
  whatever the number of sources;
* ``J^T W J`` is assembled block by block: a source's own block, the blocks of pairs of
  sources whose windows overlap, and the sky's rows; pairs that do not overlap are zero.

The cost of an iteration is therefore linear in the number of sources (at a fixed density of
sources), instead of growing with its square as a dense Jacobian over the whole field would;
memory holds one window per source and parameter, and the dense normal matrix of
``(N P_template + P_sky)^2`` numbers (8 MB for 1,000 free parameters).

Windows are planned from the current parameters, and re-planned after convergence (at most
``passes`` times) when a source's window has to grow; light beyond a source's window (less
than ``1 - window_flux`` of it) is not modelled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import DataError, ModelError
from .fitting.api import _physical_jacobian, _wrapped_angles
from .fitting.data import flux_step, make_batch
from .fitting.lm import LMOptions, levenberg_marquardt
from .fitting.problem import finite_difference_steps, step_scales
from .fitting.result import FitResult
from .flags import Flag, Status
from .model import Model
from .params import Identity, ParameterLayout, wrap_pa
from .profiles import EllipticalProfile
from .render import Renderer, RenderOptions, prepare_psf

__all__ = ["FieldOptions", "FieldResult", "FieldProblem", "fit_field", "fit_field_auto", "field_sources",
           "split_model", "source_radii",
           "plan_windows", "WINDOW_SIZES"]

#: side lengths (pixels) of the windows; a source gets the smallest that holds it
WINDOW_SIZES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


@dataclass(frozen=True)
class FieldOptions:
    """Settings of :func:`fit_field`.

    Attributes
    ----------
    window_flux : fraction of each component's light (along its major axis) that its source's
        window holds at most; the window's half-size is that radius plus the PSF's half-size ...
    window_level : ... or, when smaller, the radius where the component's surface brightness
        falls below ``window_level`` times the field's median sigma per pixel (but at least the
        radius holding 80% of its light). None: by ``window_flux`` alone. Light left out is
        then below half a percent of the noise in every pixel.
    min_size, max_size : smallest and largest window side (pixels).
    passes : times the windows are re-planned from the fitted parameters (each pass continues
        the fit from where the previous one ended; it stops early when no window changes).
    """

    window_flux: float = 0.999
    window_level: float | None = 0.005
    min_size: int = 16
    max_size: int = 1024
    passes: int = 3

    def validate(self) -> None:
        if not 0.5 <= self.window_flux < 1:
            raise ValueError(f"window_flux must be in [0.5, 1), got {self.window_flux}")
        if self.min_size < 8 or self.max_size < self.min_size:
            raise ValueError("need 8 <= min_size <= max_size")
        if self.passes < 1:
            raise ValueError("passes must be >= 1")


def split_model(model: Model) -> tuple[Model, Model | None]:
    """``(template, sky)``: the model's non-sky components (copied for every source) and its sky
    components (shared), as two models. A tie from a source component to a sky parameter (or
    back) cannot be represented and is an error."""
    src = [c for c in model.components if c.profile.kind != "sky"]
    sky = [c for c in model.components if c.profile.kind == "sky"]
    if not src:
        raise ModelError("a field model needs at least one source component (not only skies)")
    src_names, sky_names = {c.name for c in src}, {c.name for c in sky}
    for group, other in ((src, sky_names), (sky, src_names)):
        for c in group:
            for pname, p in c.params.items():
                if p.tie is not None and {r.split(".")[0] for r in p.tie.depends} & other:
                    raise ModelError(f"{c.name}.{pname} is tied across sources and sky ({p.tie.expr!r}); "
                                     "a field model can tie parameters only within the source template "
                                     "or within the sky")
    return Model(src, model.zeropoint), (Model(sky, model.zeropoint) if sky else None)


def source_radii(template: Model, values: Mapping[str, torch.Tensor], fraction: float, *,
                 level: float | None = None, floor: float = 0.8) -> np.ndarray:
    """(N,) semi-major radius (pixels) of each source's window, the largest over its components.

    A component's radius holds ``fraction`` of its light (by numerical integration of its
    radial profile; infinite when more than ``1 - fraction`` lies beyond 10^4 core radii).
    With ``level`` (surface brightness per pixel, e.g. a small fraction of the noise), the
    radius stops where the component falls below that level along its major axis, but holds at
    least ``floor`` of its light: faint sources get small windows, bright ones large.
    """
    n = next(iter(values.values())).shape[0]
    out = torch.zeros(n, dtype=torch.float64)
    for comp in template.components:
        prof = comp.profile
        if not isinstance(prof, EllipticalProfile):
            continue
        p = {s.name: values[f"{comp.name}.{s.name}"].detach().to("cpu", torch.float64)
             for s in prof.shape_params}
        p = {**p, **prof.derived(p)}
        r0 = prof.radii(p)[0].clamp(min=1e-3)
        grid = r0[:, None] * torch.logspace(-4, 4, 1601, dtype=torch.float64)[None]
        pe = {k: v[:, None] for k, v in p.items()}
        f = prof.radial(grid, pe)
        dflux = f * grid * grid        # d(flux)/d(ln r), up to 2 pi
        seg = 0.5 * (dflux[:, 1:] + dflux[:, :-1]) * torch.diff(torch.log(grid), dim=1)
        cum = torch.cat([torch.zeros(n, 1, dtype=torch.float64), torch.cumsum(seg, dim=1)], dim=1)
        log_norm = prof.log_radial_integral(p)
        total = torch.exp(log_norm) / (2 * math.pi)

        def radius_at(reached, grid=grid):
            first = torch.where(reached.any(dim=1), reached.to(torch.int64).argmax(dim=1),
                                torch.full((n,), -1, dtype=torch.int64))
            return torch.where(first >= 0, grid[torch.arange(n), first.clamp(min=0)],
                               torch.full((n,), float("inf"), dtype=torch.float64))

        r = radius_at(cum >= fraction * total[:, None])
        if level is not None:
            flux = 10 ** (-0.4 * (values[f"{comp.name}.mag"].detach().to("cpu", torch.float64) - template.zeropoint))
            q = values[f"{comp.name}.q"].detach().to("cpu", torch.float64)
            sb = (flux / (q * torch.exp(log_norm)))[:, None] * f            # per pixel, on the major axis
            r_sb = radius_at((sb < level) & (grid > r0[:, None]))
            r_min = radius_at(cum >= floor * total[:, None])
            r = torch.minimum(r, torch.maximum(r_sb, r_min))
        out = torch.maximum(out, r)
    return out.numpy()


def plan_windows(x: np.ndarray, y: np.ndarray, radius: np.ndarray, psf_half: int, shape: tuple[int, int],
                 options: FieldOptions) -> np.ndarray:
    """(N, 4) int windows ``(x_origin, y_origin, nx, ny)``: the 0-based field pixel of the
    window's first pixel and its size. A window is a square, the smallest side of
    :data:`WINDOW_SIZES` (within the options' limits) holding ``radius + psf_half`` on every
    side of the centre ``(x, y)`` (FITS), moved inside the field where it sticks out, and cut
    to the field's size where it is larger."""
    H, W = shape
    sizes = [s for s in WINDOW_SIZES if options.min_size <= s <= options.max_size] or [options.max_size]
    need = 2 * (np.ceil(np.nan_to_num(radius, nan=np.inf, posinf=1e9)) + psf_half + 2) + 1
    side = np.array([next((s for s in sizes if s >= n), sizes[-1]) for n in need], dtype=np.int64)
    nx, ny = np.minimum(side, W), np.minimum(side, H)
    cx = np.rint(np.asarray(x, dtype=np.float64) - 1).astype(np.int64)
    cy = np.rint(np.asarray(y, dtype=np.float64) - 1).astype(np.int64)
    ox = np.clip(cx - side // 2, 0, W - nx)
    oy = np.clip(cy - side // 2, 0, H - ny)
    return np.stack([ox, oy, nx, ny], axis=1)


class FieldProblem:
    """The least-squares problem of one field: residuals over the field as a function of
    ``z`` (1, N P_t + P_s) — every source's unconstrained template parameters (source-major),
    then the sky's — and the normal equations assembled from windowed Jacobians (see the
    module docstring). It offers what :func:`~galprof.fitting.lm.levenberg_marquardt` uses
    of a :class:`~galprof.fitting.problem.FitProblem`, with one row (the field) and
    ``step_groups`` so that the trust region limits each source's step on its own.

    ``z`` and the optimiser's state are float64, and sums over pixels (chi2, ``J^T J``,
    ``J^T r``) are accumulated in float64, whatever the rendering dtype (the image's): a
    float32 render is accurate to ~1e-7 per pixel, but chi2 over a field, and its changes
    near the optimum, need more digits than float32 sums keep.
    """

    def __init__(self, template: Model, sky: Model | None, src_layout: ParameterLayout,
                 sky_layout: ParameterLayout | None, image: torch.Tensor, weights: torch.Tensor,
                 windows: np.ndarray, psf=None, *, psf_kind: str = "star", psf_oversampling: int = 1,
                 render_options: RenderOptions | None = None):
        self.template, self.sky = template, sky
        self.src_layout, self.sky_layout = src_layout, sky_layout
        self.dtype, self.device = image.dtype, image.device
        dt, dev = self.dtype, self.device
        self.H, self.W = H, W = image.shape
        self.N = N = src_layout.batch_size
        self.Pt = len(src_layout.free)
        self.Ps = len(sky_layout.free) if sky_layout is not None else 0
        self.n_free = N * self.Pt + self.Ps
        self.statistic = "chi2"
        # the field, flattened, with one extra pixel of weight 0 where window pixels outside the
        # field are sent
        self.data = torch.cat([image.reshape(-1), image.new_zeros(1)])
        self.sqrt_w = torch.cat([weights.reshape(-1).sqrt(), weights.new_zeros(1)])
        self.windows = np.asarray(windows, dtype=np.int64)
        self._keys_x = [k for k in src_layout.keys if src_layout.spec(k).kind == "x"]
        self._keys_y = [k for k in src_layout.keys if src_layout.spec(k).kind == "y"]
        # finite-difference steps scale with |value - origin|: a free unbounded position is
        # measured from its window's origin, as the renderer sees it
        origin = np.zeros((N, len(src_layout.free)))
        for a, k in enumerate(src_layout.free):
            if isinstance(src_layout.transform(k), Identity) and (k in self._keys_x or k in self._keys_y):
                origin[:, a] = self.windows[:, 0 if k in self._keys_x else 1]
        self._step_origin = torch.as_tensor(origin, dtype=torch.float64, device=dev)
        self.buckets = []
        self._where = np.zeros((N, 2), dtype=np.int64)          # (bucket, position in it)
        shapes = sorted({(int(a), int(b)) for a, b in self.windows[:, 2:]})
        for bi, (sx, sy) in enumerate(shapes):
            members = np.nonzero((self.windows[:, 2] == sx) & (self.windows[:, 3] == sy))[0]
            self._where[members, 0] = bi
            self._where[members, 1] = np.arange(members.size)
            ox = torch.as_tensor(self.windows[members, 0], device=dev)
            oy = torch.as_tensor(self.windows[members, 1], device=dev)
            gx = ox[:, None, None] + torch.arange(sx, device=dev)[None, None, :]
            gy = oy[:, None, None] + torch.arange(sy, device=dev)[None, :, None]
            inside = (gx >= 0) & (gx < W) & (gy >= 0) & (gy < H)
            flat = torch.where(inside, gy * W + gx, torch.full_like(gx, H * W)).reshape(members.size, -1)
            renderer = Renderer(template, [(sy, sx)] * members.size, psf, psf_kind=psf_kind,
                                psf_oversampling=psf_oversampling, options=render_options, dtype=dt, device=dev)
            self.buckets.append(dict(index=torch.as_tensor(members, device=dev), flat=flat, renderer=renderer,
                                     ox=ox.to(dt), oy=oy.to(dt), shape=(sy, sx), sw=self.sqrt_w[flat]))
        self.psf_half = self.buckets[0]["renderer"].hy if self.buckets else 0
        self._sky_renderer = Renderer(sky, [(H, W)], None, dtype=dt, device=dev) if sky is not None else None
        self._pairs = self._overlapping_pairs()
        f64 = torch.float64
        flux = flux_step(weights)
        sky_scales = step_scales(sky_layout, f64, dev, flux) if self.Ps else torch.zeros(0, dtype=f64, device=dev)
        scales = torch.cat([step_scales(src_layout, f64, dev, flux).repeat(N), sky_scales])
        self.step_scale = scales
        #: trust-region groups: a source's parameters, and the sky's
        self.step_groups = torch.cat([torch.arange(N, device=dev).repeat_interleave(self.Pt),
                                      torch.full((self.Ps,), N, device=dev)])
        self.n_step_groups = N + 1
        self._bounded_src = [(j, src_layout.transform(k)) for j, k in enumerate(src_layout.free)
                             if any(b is not None for b in src_layout.bounds(k))]
        self._bounded_sky = ([(j, sky_layout.transform(k)) for j, k in enumerate(sky_layout.free)
                              if any(b is not None for b in sky_layout.bounds(k))] if self.Ps else [])
        self._mag_col = self._single_flux_mag()
        #: sources whose parameters stopped moving are frozen: their Jacobian columns are not
        #: rendered (and are zero, so that they do not step) until the problem is unfrozen
        self.freezing = True
        self.freeze_tol = 0.03
        self.frozen = torch.zeros(N, dtype=torch.bool, device=dev)
        self.ever_frozen = False
        self._calm = torch.zeros(N, dtype=torch.int64, device=dev)
        self._last = None
        self._images = None           # the window images of the last normal equations

    # -- layout -----------------------------------------------------------------------------
    def _single_flux_mag(self) -> int | None:
        """Index of the template's free ``mag`` when the template is one luminous component (its
        column is then the source's image scaled, with no render)."""
        lum = [c for c in self.template.components if c.profile.kind in ("elliptical", "point")]
        if len(lum) != 1:
            return None
        key = f"{lum[0].name}.mag"
        return self.src_layout.free.index(key) if key in self.src_layout.free else None

    def _overlapping_pairs(self):
        """Pairs of sources whose windows overlap inside the field, with the overlap's slices in
        each window: ``[(i, j, (y0i, y1i, x0i, x1i), (y0j, y1j, x0j, x1j))]``."""
        w = self.windows
        x0 = np.maximum(w[:, 0], 0)
        y0 = np.maximum(w[:, 1], 0)
        x1 = np.minimum(w[:, 0] + w[:, 2], self.W)
        y1 = np.minimum(w[:, 1] + w[:, 3], self.H)
        order = np.argsort(x0, kind="stable")
        pairs = []
        for a, i in enumerate(order):            # sweep along x: only windows starting before i ends
            for j in order[a + 1:]:
                if x0[j] >= x1[i]:
                    break
                ox0, ox1 = max(x0[i], x0[j]), min(x1[i], x1[j])
                oy0, oy1 = max(y0[i], y0[j]), min(y1[i], y1[j])
                if ox1 <= ox0 or oy1 <= oy0:
                    continue
                i_, j_ = (int(i), int(j)) if i < j else (int(j), int(i))
                si = (oy0 - w[i_, 1], oy1 - w[i_, 1], ox0 - w[i_, 0], ox1 - w[i_, 0])
                sj = (oy0 - w[j_, 1], oy1 - w[j_, 1], ox0 - w[j_, 0], ox1 - w[j_, 0])
                pairs.append((i_, j_, tuple(int(v) for v in si), tuple(int(v) for v in sj)))
        return pairs

    def pack(self, Z: torch.Tensor, zs: torch.Tensor | None) -> torch.Tensor:
        parts = [Z.reshape(-1)] + ([zs.reshape(-1)] if self.Ps else [])
        return torch.cat(parts)[None]

    def unpack(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = z.reshape(-1)
        Z = z[:self.N * self.Pt].reshape(self.N, self.Pt)
        zs = z[self.N * self.Pt:].reshape(1, self.Ps) if self.Ps else None
        return Z, zs

    def at_bound(self, z: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
        Z, zs = self.unpack(z)
        out = torch.zeros(z.shape[-1], dtype=torch.bool, device=z.device)
        a = torch.zeros_like(Z, dtype=torch.bool)
        for j, t in self._bounded_src:
            a[:, j] = _saturated(t, Z[:, j], tol)
        out[:self.N * self.Pt] = a.reshape(-1)
        if self.Ps:
            s = torch.zeros_like(zs, dtype=torch.bool)
            for j, t in self._bounded_sky:
                s[:, j] = _saturated(t, zs[:, j], tol)
            out[self.N * self.Pt:] = s.reshape(-1)
        return out[None]

    # -- rendering ------------------------------------------------------------------------
    def _render_bucket(self, b, values, rows=None) -> torch.Tensor:
        """(n_b, ny*nx) images of the sources of bucket ``b`` on their windows (``rows``: only
        those positions in the bucket)."""
        idx = b["index"] if rows is None else b["index"][rows]
        ox, oy = (b["ox"], b["oy"]) if rows is None else (b["ox"][rows], b["oy"][rows])
        vals = {k: v[idx] for k, v in values.items()}
        for k in self._keys_x:
            vals[k] = vals[k] - ox
        for k in self._keys_y:
            vals[k] = vals[k] - oy
        return b["renderer"](vals, check=False, index=rows).reshape(idx.numel(), -1)

    def unfreeze(self, freezing: bool = False) -> None:
        """Make every source active again (and stop freezing unless ``freezing``)."""
        self.freezing = freezing
        self.frozen = torch.zeros_like(self.frozen)
        self._calm = torch.zeros_like(self._calm)
        self._last = None
        self._images = None

    def _sky_image(self, zs) -> torch.Tensor:
        if self._sky_renderer is None:
            return self.data.new_zeros(self.H * self.W)
        return self._sky_renderer(self.sky_layout.physical(zs), check=False).reshape(-1)

    def model_image(self, z: torch.Tensor, images=None) -> torch.Tensor:
        """(H, W) model of the field at ``z``."""
        Z, zs = self.unpack(z)
        values = self.src_layout.physical(Z)
        if images is None:
            images = self._source_images(values)
        flat = self.data.new_zeros(self.H * self.W + 1)
        for b, img in zip(self.buckets, images):
            flat.index_add_(0, b["flat"].reshape(-1), img.reshape(-1))
        return (flat[:-1] + self._sky_image(zs)).reshape(self.H, self.W)

    def _source_images(self, values, stale=None) -> list[torch.Tensor]:
        """Every source's window image, per bucket. A frozen source does not move (its step is
        zero), so its image from the last normal equations is reused (except for the sources
        ``stale``, just frozen: theirs is from before their last step)."""
        if self._images is None or not bool(self.frozen.any()):
            return [self._render_bucket(b, values) for b in self.buckets]
        live = ~self.frozen if stale is None else ~self.frozen | stale
        out = []
        for b, cached, in zip(self.buckets, self._images):
            rows = torch.nonzero(live[b["index"]]).reshape(-1)
            img = cached.clone()
            if rows.numel():
                img[rows] = self._render_bucket(b, values, rows)
            out.append(img)
        return out

    def residuals(self, z: torch.Tensor, index=None, images=None) -> torch.Tensor:
        """(1, H*W) residuals ``sqrt(w) (model - data)``."""
        m = self.model_image(z, images).reshape(-1)
        return ((m - self.data[:-1]) * self.sqrt_w[:-1]).to(torch.float64)[None]

    # -- normal equations -------------------------------------------------------------------
    def normal_equations(self, z: torch.Tensor, index=None, *, fisher: bool = False, residuals=None):
        """``J^T J`` (1, P, P), ``J^T r`` (1, P), chi2 (1,) at ``z``, float64."""
        f64 = torch.float64
        N, Pt, Ps = self.N, self.Pt, self.Ps
        Z, zs = self.unpack(z)
        stale = None
        if self.freezing and self._last is not None:
            # a source whose every parameter moved by less than freeze_tol of its (conditional)
            # error at two accepted steps in a row is frozen
            Z_last, sd = self._last
            moved = ((Z - Z_last).abs() * sd).amax(dim=1)
            self._calm = torch.where(moved < self.freeze_tol, self._calm + 1, torch.zeros_like(self._calm))
            stale = (self._calm >= 2) & ~self.frozen
            self.frozen = self.frozen | stale
            self.ever_frozen = self.ever_frozen or bool(self.frozen.any())
        values = self.src_layout.physical(Z)
        base = self._source_images(values, stale)
        self._images = [img.detach() for img in base]
        r = self.residuals(z, images=base)[0]
        live = [torch.nonzero(~self.frozen[b["index"]]).reshape(-1) for b in self.buckets]
        active = (~self.frozen).to(self.dtype)
        r_ext = torch.cat([r, r.new_zeros(1)])
        # forward differences with the step of the rendering precision, scaled by each value as
        # the renderer sees it: a position relative to its window, not to the field (a float32
        # step at x = 4000 would be 1.4 px)
        Zs, h = finite_difference_steps(Z, self._bounded_src, scale=Z - self._step_origin,
                                        eps=torch.finfo(self.dtype).eps)               # (N, Pt) each
        cols = [torch.zeros(b["index"].numel(), b["shape"][0] * b["shape"][1], Pt, dtype=self.dtype, device=z.device)
                for b in self.buckets]
        for a in range(Pt):
            if a == self._mag_col:
                key = self.src_layout.free[a]
                Zp = Z.clone()
                Zp[:, a] = Zs[:, a]
                dm = self.src_layout.physical(Zp)[key] - values[key]
                factor = (torch.pow(10.0, -0.4 * dm) - 1.0) / h[:, a] * active
                for b, img, c in zip(self.buckets, base, cols):
                    c[:, :, a] = img * factor[b["index"]][:, None]
                continue
            Zp = Z.clone()
            Zp[:, a] = Zs[:, a]
            vp = self.src_layout.physical(Zp)
            for b, img, c, rows in zip(self.buckets, base, cols, live):
                if rows.numel():
                    step = h[b["index"][rows], a].to(self.dtype)
                    c[rows, :, a] = (self._render_bucket(b, vp, rows) - img[rows]) / step[:, None]
        # weighted, float64
        Jb = [(c * b["sw"][:, :, None]).to(f64) for b, c in zip(self.buckets, cols)]
        A_src = torch.zeros(N, N, Pt, Pt, dtype=f64, device=z.device)
        g_src = torch.zeros(N, Pt, dtype=f64, device=z.device)
        for b, J in zip(self.buckets, Jb):
            idx = b["index"]
            A_src[idx, idx] = J.transpose(1, 2) @ J
            g_src[idx] = (J.transpose(1, 2) @ r_ext[b["flat"]].to(f64)[:, :, None])[:, :, 0]
        if self._pairs:
            views = [J.reshape(J.shape[0], *b["shape"], Pt) for b, J in zip(self.buckets, Jb)]
            where = self._where
            for i, j, si, sj in self._pairs:
                Ji = views[where[i, 0]][where[i, 1], si[0]:si[1], si[2]:si[3]].reshape(-1, Pt)
                Jj = views[where[j, 0]][where[j, 1], sj[0]:sj[1], sj[2]:sj[3]].reshape(-1, Pt)
                blk = Ji.T @ Jj
                A_src[i, j] = blk
                A_src[j, i] = blk.T
        if self.freezing:
            # 1 / marginal error of each parameter within its source's block (a faint source's
            # mag, re and n are strongly correlated: its conditional errors would be far smaller)
            blocks = A_src[torch.arange(N), torch.arange(N)]
            ridge = 1e-9 * torch.diagonal(blocks, dim1=1, dim2=2).clamp(min=1e-300)
            L, info = torch.linalg.cholesky_ex(blocks + torch.diag_embed(ridge))
            inv = torch.cholesky_inverse(L)
            sd = torch.where((info == 0)[:, None], torch.diagonal(inv, dim1=1, dim2=2).clamp(min=1e-300).rsqrt(),
                             torch.diagonal(blocks, dim1=1, dim2=2).sqrt())
            if self._last is not None:
                sd = torch.where(self.frozen[:, None], self._last[1], sd)
            self._last = (Z.detach().clone(), sd)
        P = N * Pt + Ps
        A = torch.zeros(P, P, dtype=f64, device=z.device)
        A[:N * Pt, :N * Pt] = A_src.permute(0, 2, 1, 3).reshape(N * Pt, N * Pt)
        g = torch.zeros(P, dtype=f64, device=z.device)
        g[:N * Pt] = g_src.reshape(-1)
        if Ps:
            Js = self._sky_jacobian(zs)                                            # (H*W, Ps), weighted
            Js_ext = torch.cat([Js, Js.new_zeros(1, Ps)]).to(f64)
            A[N * Pt:, N * Pt:] = Js_ext.T @ Js_ext
            g[N * Pt:] = Js_ext.T @ r_ext.to(f64)
            cross = torch.zeros(N, Ps, Pt, dtype=f64, device=z.device)
            for b, J in zip(self.buckets, Jb):
                cross[b["index"]] = Js_ext[b["flat"]].transpose(1, 2) @ J
            cross = cross.permute(1, 0, 2).reshape(Ps, N * Pt)
            A[N * Pt:, :N * Pt] = cross
            A[:N * Pt, N * Pt:] = cross.T
        chi2 = (r.to(f64) ** 2).sum()
        return A[None], g[None], chi2[None]

    def _sky_jacobian(self, zs) -> torch.Tensor:
        zsp, h = finite_difference_steps(zs, self._bounded_sky, eps=torch.finfo(self.dtype).eps)
        base = self._sky_image(zs)
        cols = []
        for a in range(self.Ps):
            zp = zs.clone()
            zp[:, a] = zsp[:, a]
            cols.append(((self._sky_image(zp) - base) / h[0, a]).to(self.dtype))
        return torch.stack(cols, dim=1) * self.sqrt_w[:-1, None]


def _centre_keys(layout: ParameterLayout) -> tuple[str | None, str | None]:
    """The template's first ``x`` and ``y`` parameters (a source's position), or None."""
    xk = next((k for k in layout.keys if layout.spec(k).kind == "x"), None)
    yk = next((k for k in layout.keys if layout.spec(k).kind == "y"), None)
    return xk, yk


def _saturated(t, zj, tol):
    d = t.derivative(zj).abs()
    peak = 0.25 * abs(t.hi - t.lo) if hasattr(t, "hi") and hasattr(t, "lo") else 1.0
    return d < tol * peak


@dataclass
class FieldResult:
    """A field fit: one row per source (:class:`~galprof.fitting.result.FitResult`, every row
    with the shared sky's parameters, the field's chi2, dof, iterations and status), and the
    field's images.

    Attributes
    ----------
    result : FitResult (keys: the template's and the sky's parameters)
    model_image, residual_image : (H, W) arrays (residual = data - model)
    windows : (N, 4) the final windows ``(x_origin, y_origin, nx, ny)``
    passes : window passes run
    """

    result: FitResult
    model_image: np.ndarray
    residual_image: np.ndarray
    windows: np.ndarray
    passes: int

    def to_table(self):
        t = self.result.to_table()
        t["window_nx"] = self.windows[:, 2]
        t["window_ny"] = self.windows[:, 3]
        t.meta["field_passes"] = self.passes
        return t


def fit_field(model: Model, image, sigma=None, mask=None, psf=None, *,
              sources: Mapping[str, Sequence[float]] | None = None, ids: Sequence | None = None,
              psf_kind: str = "star", psf_oversampling: int = 1, options: FieldOptions | None = None,
              lm_options: LMOptions | None = None, render_options: RenderOptions | None = None,
              uncertainty: str = "covariance", dtype: torch.dtype = torch.float64,
              device: torch.device | str = "cpu") -> FieldResult:
    """Fit every source of one image together with a shared sky.

    Parameters
    ----------
    model : the template (its non-sky components, copied for every source, their values the
        fallback starts) and the shared sky components.
    image, sigma, mask : the field (2-D arrays; sigma None: unit weights; mask nonzero = bad).
    psf : 2-D array or None (one PSF for the whole field).
    sources : starting values per source, ``{"comp.param": (N,) values}`` in the field's
        frame; every source gets the template's own values for the parameters not given.
        The sky's starts are the model's (``"sky.sky"`` etc. may be given as one value).
        See :func:`galprof.detect.field_sources` for starts from the image itself.
    ids : one identifier per source (default 1..N).
    uncertainty : "covariance" ((J^T W J)^-1 of the whole field, so that each source's errors
        include its correlations with its neighbours and the sky) or "none".

    Returns
    -------
    FieldResult
    """
    o = options or FieldOptions()
    o.validate()
    if uncertainty not in ("covariance", "none"):
        raise ValueError(f"uncertainty must be 'covariance' or 'none' for a field, got {uncertainty!r}")
    template, sky = split_model(model)
    batch = make_batch([image], None if sigma is None else [sigma], None if mask is None else [mask],
                       dtype=dtype, device=device)
    if int(batch.flags[0]) & int(Flag.NO_DATA):
        raise DataError(f"the field has no usable pixel: {batch.messages[0]}")
    img, wts = batch.images[0], batch.weights[0]
    if psf is not None:
        psf = prepare_psf(psf)
    given = dict(sources or {})
    sky_names = {c.name for c in sky.components} if sky is not None else set()
    sky_given = {k: v for k, v in given.items() if k.split(".")[0] in sky_names}
    src_given = {k: v for k, v in given.items() if k not in sky_given}
    unknown = set(src_given) - set(template.parameter_names)
    if unknown:
        raise ModelError(f"starting values for unknown parameters {sorted(unknown)}")
    lengths = {len(np.atleast_1d(v)) for v in src_given.values()}
    if len(lengths) > 1:
        raise DataError("every source parameter needs one starting value per source")
    N = lengths.pop() if lengths else (len(ids) if ids is not None else 1)
    ids = list(ids) if ids is not None else list(range(1, N + 1))
    if len(ids) != N:
        raise DataError(f"{len(ids)} ids for {N} sources")
    f64 = torch.float64
    src_layout = template.layout(N, dtype=f64, device=device)
    for k, v in src_given.items():
        src_layout.set_values(k, torch.as_tensor(np.asarray(v, dtype=np.float64), dtype=f64, device=device))
    sky_layout = sky.layout(1, dtype=f64, device=device) if sky is not None else None
    for k, v in sky_given.items():
        sky_layout.set_values(k, torch.as_tensor(np.atleast_1d(np.asarray(v, dtype=np.float64)), dtype=f64,
                                                 device=device))
    flags = np.zeros(N, dtype=np.int64)
    messages = [""] * N
    for key, bad in src_layout.out_of_bounds().items():
        for i in torch.nonzero(bad).reshape(-1).tolist():
            raise DataError(f"source {ids[i]}: start {key} is outside its bounds {src_layout.bounds(key)}")
    Z = src_layout.initial()
    zs = sky_layout.initial() if sky_layout is not None else None
    psf_half = 0
    if psf is not None:
        psf_half = int(math.ceil(max(psf.shape) / 2 / int(psf_oversampling)))
    H, W = img.shape
    good = wts > 0
    noise = float(torch.median(wts[good].rsqrt())) if bool(good.any()) else 1.0
    if lm_options is None:
        # a field's chi2 sums many pixels: stop when a step gains less than 0.01 in chi2
        lm_options = LMOptions(chi2_atol=0.01)
    total_iter = 0
    windows, status, chi2 = None, int(Status.MAX_ITER), float("nan")
    problem = None
    passes = 0
    xk, yk = _centre_keys(src_layout)
    for passes in range(1, o.passes + 1):
        vals = src_layout.physical(Z)
        x = vals[xk].detach().cpu().numpy() if xk else np.full(N, (W + 1) / 2)
        y = vals[yk].detach().cpu().numpy() if yk else np.full(N, (H + 1) / 2)
        level = None if o.window_level is None else o.window_level * noise
        radii = source_radii(template, vals, o.window_flux, level=level)
        new = plan_windows(x, y, radii, psf_half, (H, W), o)
        if windows is not None:
            # a window that is large enough and still about centred on its source is kept
            centre_new = new[:, :2] + new[:, 2:] // 2
            centre_old = windows[:, :2] + windows[:, 2:] // 2
            keep = np.all(new[:, 2:] <= windows[:, 2:], axis=1) & \
                np.all(np.abs(centre_new - centre_old) <= windows[:, 2:] // 8, axis=1)
            new[keep] = windows[keep]
            if keep.all() and status == int(Status.CONVERGED):
                passes -= 1
                break
        windows = new
        problem = FieldProblem(template, sky, src_layout, sky_layout, img, wts, windows, psf, psf_kind=psf_kind,
                               psf_oversampling=psf_oversampling, render_options=render_options)
        z0 = problem.pack(Z, zs)
        z, c2, n_it, st = levenberg_marquardt(problem, z0, torch.ones(1, dtype=torch.bool, device=z0.device),
                                              lm_options)
        Z, zs = problem.unpack(z)
        total_iter += int(n_it[0])
        status, chi2 = int(st[0]), float(c2[0])
        if status == int(Status.NONFINITE):
            break
    if problem.ever_frozen and status != int(Status.NONFINITE):
        # sources frozen while their neighbours moved: a last fit with every source free
        problem.unfreeze()
        z, c2, n_it, st = levenberg_marquardt(problem, problem.pack(Z, zs),
                                              torch.ones(1, dtype=torch.bool, device=Z.device), lm_options)
        Z, zs = problem.unpack(z)
        total_iter += int(n_it[0])
        status, chi2 = int(st[0]), float(c2[0])
    problem.unfreeze()
    z = problem.pack(Z, zs)
    keys_src, keys_sky = src_layout.keys, (sky_layout.keys if sky_layout is not None else [])
    keys = keys_src + keys_sky
    K = len(keys)
    vals = src_layout.physical(Z)
    sky_vals = sky_layout.physical(zs) if sky_layout is not None else {}
    values = {k: vals[k].detach().cpu().numpy() for k in keys_src}
    for k in _wrapped_angles(src_layout):
        values[k] = wrap_pa(values[k])
    values.update({k: np.full(N, float(sky_vals[k][0])) for k in keys_sky})
    cov = np.full((N, K, K), np.nan)
    n_pix = int(batch.n_pixels[0])
    P = problem.n_free
    if uncertainty == "covariance" and P and status != int(Status.NONFINITE):
        A, _, _ = problem.normal_equations(z)
        # parameters pinned at a bound (saturated transform: no information in z) are held
        # fixed, so that one source at a bound leaves every other source its errors
        pinned = problem.at_bound(z)[0]
        keep = torch.nonzero(~pinned).reshape(-1)
        L, info = torch.linalg.cholesky_ex(A[0][keep][:, keep])
        if int(info) == 0:
            cz = torch.zeros(P, P, dtype=torch.float64, device=z.device)
            cz[keep[:, None], keep[None, :]] = torch.cholesky_inverse(L)
            Pt, Ps = problem.Pt, problem.Ps
            pinned_np = pinned.cpu().numpy()
            Gs = _physical_jacobian(src_layout, Z.to(torch.float64), torch.arange(N, device=Z.device),
                                    keys_src)                                          # (N, Ks, Pt)
            if Ps:
                Gk = _physical_jacobian(sky_layout, zs.to(torch.float64), torch.arange(1, device=Z.device),
                                        keys_sky)[0]                                   # (Kk, Ps)
            for i in range(N):
                rows = list(range(i * Pt, (i + 1) * Pt)) + list(range(N * Pt, N * Pt + Ps))
                c = cz[rows][:, rows]
                G = torch.zeros(K, Pt + Ps, dtype=torch.float64, device=Z.device)
                G[:len(keys_src), :Pt] = Gs[i]
                if Ps:
                    G[len(keys_src):, Pt:] = Gk
                ci = (G @ c @ G.T).cpu().numpy()
                for j in np.nonzero(pinned_np[rows])[0]:         # no error for a pinned parameter
                    hit = (G[:, j] != 0).cpu().numpy()
                    ci[hit, :] = np.nan
                    ci[:, hit] = np.nan
                cov[i] = ci
        else:
            flags |= int(Flag.SINGULAR)
            messages = ["singular normal matrix: no covariance"] * N
    free_keys = set(src_layout.free) | set(src_layout.tied) | \
        (set(sky_layout.free) | set(sky_layout.tied) if sky_layout is not None else set())
    errors = {}
    for a, k in enumerate(keys):
        e = np.sqrt(np.clip(cov[:, a, a], 0, None))
        errors[k] = np.where(np.isfinite(e) & (k in free_keys), e, np.nan)

    def note(i, flag, text):
        flags[i] |= int(flag)
        messages[i] = "; ".join(m for m in (messages[i], text) if m)

    for key in src_layout.free:
        lo, hi = src_layout.bounds(key)
        v = values[key]
        span = (hi - lo) if (lo is not None and hi is not None) else 1.0 + np.abs(v)
        near = np.zeros(N, dtype=bool)
        if lo is not None:
            near |= (v - lo) <= 1e-6 * span
        if hi is not None:
            near |= (hi - v) <= 1e-6 * span
        for i in np.nonzero(near)[0]:
            note(i, Flag.AT_BOUND, f"{key} at a bound")
    if xk and yk:
        xs, ys = values[xk], values[yk]
        for i in np.nonzero((xs < 0.5) | (xs > W + 0.5) | (ys < 0.5) | (ys > H + 0.5))[0]:
            note(i, Flag.BAD_VALUE, "the source's centre left the field")
    if status == int(Status.MAX_ITER):
        for i in range(N):
            note(i, Flag.NOT_CONVERGED, "iteration cap reached")
    elif status == int(Status.NONFINITE):
        for i in range(N):
            note(i, Flag.NONFINITE, "model or chi2 became non-finite")
    model_img = problem.model_image(z).detach().cpu().numpy()
    resid = np.where(batch.weights[0].cpu().numpy() > 0, batch.images[0].cpu().numpy() - model_img, np.nan)
    res = FitResult(keys=keys, free=list(src_layout.free) + (list(sky_layout.free) if sky_layout else []),
                    values=values, errors=errors, covariance=cov, chi2=np.full(N, chi2),
                    dof=np.full(N, n_pix - P), n_iter=np.full(N, total_iter), status=np.full(N, status),
                    flags=flags, messages=messages, ids=ids, uncertainty=uncertainty, statistic="chi2",
                    errors_covariance=dict(errors))
    return FieldResult(result=res, model_image=model_img, residual_image=resid, windows=windows, passes=passes)


def field_sources(image, model: Model, *, mask=None, psf=None, options=None):
    """Starting values of every source detected in a field, for :func:`fit_field`.

    Detection, deblending and measurements are :mod:`galprof.detect`'s (sep): each detected
    source gets the starts of :func:`galprof.detect.initial_values` for the template's
    components (centre, magnitude, size, n, q, PA), the sky the global background level. A
    source that cannot be measured is left out (and named in the notes).

    Returns ``(sources, ids, detection, notes)``: ``sources`` maps ``"comp.param"`` to (N,)
    values (the sky's to one value), ``ids`` the detection labels.
    """
    from .detect import detect, initial_values, measure, psf_radii

    template, sky = split_model(model)
    det = detect(np.asarray(image, dtype=np.float64), mask=mask, options=options)
    stats = psf_radii(None if psf is None else np.asarray(psf, dtype=np.float64))
    lay = template.layout(1)
    base = {k: float(v.reshape(-1)[0]) for k, v in lay.values().items()}
    rows, ids, notes = [], [], []
    for label in det.labels:
        try:
            m = measure(image, det, int(label), psf_stats=stats)
        except DataError as exc:
            notes.append(f"source {int(label)} left out: {exc}")
            continue
        starts = initial_values(template, m)
        rows.append({k: starts.get(k, base[k]) for k in lay.free})
        ids.append(int(label))
    if not rows:
        raise DataError("no source detected in the field")
    sources = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    if sky is not None:
        lay = sky.layout(1)
        for k in lay.free:
            if sky[k.split(".")[0]].profile.name in ("sky", "tiltedsky") and k.endswith(".sky"):
                sources[k] = det.background.level
    return sources, ids, det, notes


def fit_field_auto(model: Model, image, sigma=None, mask=None, psf=None, *, rounds: int = 2,
                   detect_options=None, min_snr: float = 5.0, min_separation: float = 3.0,
                   **kwargs) -> tuple[FieldResult, list[str], object]:
    """Detect, fit, and look again: :func:`field_sources` and :func:`fit_field`, then up to
    ``rounds - 1`` more rounds in which sources detected on the residual image (data minus the
    fitted model: galaxies that detection merged with a neighbour, or missed next to a bright
    one) farther than ``min_separation`` px from every fitted centre and with an isophotal S/N
    above ``min_snr`` are added, and the field is fitted again from the previous round's values.
    ``kwargs`` go to :func:`fit_field`. Returns ``(result, notes, detection)`` (the first
    round's :class:`~galprof.detect.Detection`).
    """
    from .detect import _inside, detect, initial_values, measure, psf_radii

    sources, ids, first, notes = field_sources(image, model, mask=mask, psf=psf, options=detect_options)
    res = fit_field(model, image, sigma, mask, psf, sources=sources, ids=ids, **kwargs)
    template, sky = split_model(model)
    lay = template.layout(1)
    xk, yk = _centre_keys(lay)
    stats = psf_radii(None if psf is None else np.asarray(psf, dtype=np.float64))
    for _ in range(1, rounds):
        r = res.result
        resid = np.asarray(image, dtype=np.float64) - res.model_image
        try:
            det = detect(resid, mask=mask, options=detect_options)
        except DataError:
            break
        added = []
        for label in det.labels:
            obj = det.objects[int(label) - 1]
            # significance of the isophotal flux (the residual around a new source is not flat:
            # apertures there can hold negative light)
            snr = float(obj["flux"]) / (det.background.sigma * math.sqrt(max(float(obj["npix"]), 1.0)))
            if not snr >= min_snr:
                continue
            try:
                m = measure(resid, det, int(label), psf_stats=stats)
            except DataError:
                continue
            d = np.hypot(r.values[xk] - m.x, r.values[yk] - m.y)
            if d.size and d.min() <= min_separation:
                continue
            if not m.total_flux > 0:
                m = dataclasses.replace(m, flux=float(obj["flux"]), total_flux=float(obj["flux"]))
            added.append(m)
        if not added:
            break
        base = {k: float(v.reshape(-1)[0]) for k, v in lay.values().items()}
        new = [initial_values(template, m) for m in added]
        # the previous round's values, moved strictly inside their bounds (a value at a bound is
        # not a valid start), and the new sources' measured starts
        merged = {k: np.array([_inside(float(v), lay.bounds(k)) for v in r.values[k]]
                              + [s.get(k, base[k]) for s in new]) for k in lay.free}
        if sky is not None:
            for k in sky.layout(1).free:
                merged[k] = float(r.values[k][0])
        next_id = max([int(i) for i in r.ids] + [0]) + 1
        ids = list(r.ids) + list(range(next_id, next_id + len(added)))
        notes.append(f"{len(added)} source(s) found on the residual image added: ids {ids[-len(added)]}..{ids[-1]}")
        res = fit_field(model, image, sigma, mask, psf, sources=merged, ids=ids, **kwargs)
    return res, notes, first
