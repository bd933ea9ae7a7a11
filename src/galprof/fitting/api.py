"""``galprof.fit``: fit a model to a batch of galaxies."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.func import jvp

from ..errors import PSFError
from ..flags import Flag, Status
from ..model import Model
from ..params import wrap_pa
from ..render import Renderer, RenderOptions, prepare_psf
from .data import make_batch
from .gradient import AdamOptions, adam
from .lm import LMOptions, levenberg_marquardt
from .problem import STATISTICS, FitProblem
from .result import FitResult

__all__ = ["fit", "OPTIMIZERS", "UNCERTAINTIES"]

OPTIMIZERS = ("lm", "adam", "diffgrad")
UNCERTAINTIES = ("covariance", "bootstrap", "none")


def fit(model: Model, images: Sequence, sigmas: Sequence | None = None, masks: Sequence | None = None,
        psf=None, *, psf_kind: str = "star", psf_oversampling: int = 1,
        initial: Mapping[str, Sequence[float]] | None = None, ids: Sequence | None = None,
        optimizer: str = "lm", options: LMOptions | AdamOptions | None = None,
        statistic: str = "chi2", restarts: int = 0, restart_scale: float = 0.5,
        uncertainty: str = "covariance", n_bootstrap: int = 100, bootstrap_fixed: Sequence[str] = (),
        seed: int | None = None, render_options: RenderOptions | None = None,
        scale_errors: bool = False, jacobian: str = "finite-difference", max_jacobian_bytes: int = 2 ** 31,
        dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> FitResult:
    """Fit ``model`` to every galaxy of a batch.

    Parameters
    ----------
    model : Model
        Its values are the starting values (and the values of fixed parameters).
    images, sigmas, masks : sequences of 2-D arrays (one per galaxy; any sizes)
        Data, 1-sigma noise (None: unit weights) and masks (nonzero = bad pixel).
    psf : one 2-D array, a sequence of them (one per galaxy), or None
    psf_kind, psf_oversampling : see :class:`~galprof.render.Renderer`
    initial : mapping ``"comp.param" -> per-galaxy values`` overriding the model's starts
    ids : galaxy identifiers for the result table
    optimizer : "lm" (Levenberg–Marquardt, :class:`LMOptions`), "adam" or "diffgrad"
        (first order, :class:`AdamOptions`); ``options`` are the optimiser's settings.
    statistic : "chi2" (Gaussian errors, the sigma maps) or "cash" (Poisson counts: data and
        model in counts, sky included; sigma maps unused, masks used; a galaxy with negative
        data is not fitted). The ``chi2`` of the result is then the Poisson deviance.
    restarts : extra fits per galaxy from perturbed starts (Gaussian, ``restart_scale`` times
        each parameter's step scale in the unconstrained space, seeded by ``seed``); the fit
        with the lowest statistic is kept.
    uncertainty : "covariance" ((J^T W J)^-1 at the optimum, PSF included, carried to the
        physical parameters), "bootstrap" (``n_bootstrap`` refits per galaxy on pixel-resampled
        data, started at the best fit; errors are the resamples' standard deviation and the
        16/84 percentiles are kept; the parameters named in ``bootstrap_fixed``, e.g.
        ``("g.x0", "g.y0")``, are held at their best fit in the refits) or "none".
    scale_errors : multiply the covariance by chi2_nu
    jacobian : "finite-difference" (default: forward differences, step sqrt(eps) max(|z|, 1) in
        the optimiser's space, or as much physically for a bounded parameter, all P perturbed
        copies rendered as one batch) or "autodiff"
        (forward-mode autodiff through the renderer: exact, but each column costs several
        renders on CPU; see docs/fitting.md)
    max_jacobian_bytes : above this size (pixels x free parameters x batch) the
        finite-difference Jacobian is not held whole: its normal equations are accumulated by
        groups of components, rendering pairs of groups again (bounded memory for large stamps
        with many parameters, at a cost in time)

    Returns
    -------
    FitResult
        A galaxy whose data, PSF or starting values cannot be used is not fitted: it gets a
        flag, a message and status ``bad_input``, and the others are fitted as if it were not
        there.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if uncertainty not in UNCERTAINTIES:
        raise ValueError(f"uncertainty must be one of {UNCERTAINTIES}, got {uncertainty!r}")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if restarts < 0 or (uncertainty == "bootstrap" and n_bootstrap < 2):
        raise ValueError("restarts must be >= 0 and n_bootstrap >= 2")
    batch = make_batch(images, sigmas, masks, dtype=dtype, device=device)
    B = batch.batch_size
    flags = batch.flags.clone()
    messages = list(batch.messages)

    def note(i, flag, text):
        flags[i] |= int(flag)
        messages[i] = "; ".join(m for m in (messages[i], text) if m)

    psfs = None
    if psf is not None:
        single = isinstance(psf, (np.ndarray, torch.Tensor)) and np.ndim(psf) == 2
        psfs = [psf] * B if single else list(psf)
        if len(psfs) != B:
            raise PSFError(f"got {len(psfs)} PSFs for {B} galaxies; give one, or one per galaxy")
        for i, p in enumerate(psfs):
            try:
                prepare_psf(p, index=i)
            except PSFError as exc:
                note(i, Flag.BAD_PSF, str(exc))
                delta = np.zeros((1, 1))
                delta[0, 0] = 1.0
                psfs[i] = delta  # placeholder for a galaxy that is not fitted
    renderer = Renderer(model, batch.shapes, psfs, psf_kind=psf_kind, psf_oversampling=psf_oversampling,
                        options=render_options, dtype=dtype, device=device)
    layout = model.layout(B, dtype=dtype, device=device)
    for key, v in (initial or {}).items():
        layout.set_values(key, v)
    starts = layout.values()
    for key, bad in layout.out_of_bounds().items():
        lo, hi = layout.bounds(key)
        for i in torch.nonzero(bad).reshape(-1).tolist():
            note(i, Flag.BAD_START, f"start {key} = {float(starts[key][i]):g} is not inside its "
                                    f"bounds ({lo}, {hi}); start strictly inside them")
    P = len(layout.free)
    for i in torch.nonzero(batch.n_pixels <= P).reshape(-1).tolist():
        if not flags[i] & Flag.NO_DATA:
            note(i, Flag.NO_DATA, f"{int(batch.n_pixels[i])} usable pixels for {P} free parameters")
    if statistic == "cash":
        negative = ((batch.images < 0) & (batch.weights > 0)).any(dim=(1, 2))
        for i in torch.nonzero(negative).reshape(-1).tolist():
            note(i, Flag.NO_DATA, "negative data: the Cash statistic needs counts (sky included, times the gain)")
    fatal = int(Flag.NO_DATA | Flag.BAD_PSF | Flag.BAD_START)
    active = (flags & fatal) == 0
    z0 = layout.initial()
    z0 = torch.where(active[:, None] & torch.isfinite(z0), z0, torch.zeros_like(z0))

    problem = FitProblem(renderer, layout, batch, jacobian=jacobian, statistic=statistic,
                         max_jacobian_bytes=max_jacobian_bytes)
    solve = _solver(optimizer, options)
    state: dict = {}
    z, chi2, n_iter, status = solve(problem, z0, active, state)
    if restarts:
        gen = torch.Generator(device=device)
        gen.manual_seed(0 if seed is None else int(seed))
        for _ in range(restarts):
            noise = torch.randn(z0.shape, generator=gen, dtype=dtype, device=device)
            z_r, chi2_r, n_r, status_r = solve(problem, z0 + restart_scale * problem.step_scale * noise, active, None)
            better = (chi2_r < chi2) & (status_r != int(Status.NONFINITE)) | ~torch.isfinite(chi2)
            better &= active
            z = torch.where(better[:, None], z_r, z)
            chi2 = torch.where(better, chi2_r, chi2)
            status = torch.where(better, status_r, status)
            n_iter = n_iter + n_r
            if "fresh" in state:
                state["fresh"] = state["fresh"] & ~better

    # covariance at the optimum, from the same forward model (PSF included)
    keys = layout.keys
    K = len(keys)
    cov = torch.full((B, K, K), float("nan"), dtype=dtype, device=device)
    fitted = torch.nonzero(status != int(Status.BAD_INPUT)).reshape(-1)
    if fitted.numel() and P and uncertainty != "none":
        if statistic == "chi2" and "fresh" in state:
            # J^T W J where the optimiser left it at the optimum; computed again elsewhere
            fresh = state["fresh"][fitted]
            A, chi2_f = state["A"][fitted].clone(), chi2[fitted].clone()
            redo = torch.nonzero(~fresh).reshape(-1)
            if redo.numel():
                A[redo], _, chi2_f[redo] = problem.normal_equations(z[fitted[redo]], fitted[redo], fisher=True)
        else:
            A, _, chi2_f = problem.normal_equations(z[fitted], fitted, fisher=True)
        L, info = torch.linalg.cholesky_ex(A)
        eye = torch.eye(P, dtype=dtype, device=device)
        good = (info == 0) & torch.isfinite(chi2_f)
        L = torch.where(good[:, None, None], L, eye.expand_as(L))
        cz = torch.cholesky_inverse(L)
        G = _physical_jacobian(layout, z[fitted], fitted, keys)      # (b, K, P)
        cp = G @ cz @ G.transpose(1, 2)
        if scale_errors:
            dof_f = (batch.n_pixels[fitted] - P).clamp(min=1).to(dtype)
            cp = cp * (chi2_f / dof_f)[:, None, None]
        cp = torch.where(good[:, None, None], cp, torch.full_like(cp, float("nan")))
        cov[fitted] = cp
        for j in fitted[~good].tolist():
            note(j, Flag.SINGULAR, "singular normal matrix: no covariance")

    values_t = layout.physical(z)
    for key in layout.free:
        lo, hi = layout.bounds(key)
        v = values_t[key]
        span = (hi - lo) if (lo is not None and hi is not None) else 1.0 + v.abs()
        near = torch.zeros_like(v, dtype=torch.bool)
        if lo is not None:
            near |= (v - lo) <= 1e-6 * span
        if hi is not None:
            near |= (hi - v) <= 1e-6 * span
        for j in torch.nonzero(near & (status != int(Status.BAD_INPUT))).reshape(-1).tolist():
            note(j, Flag.AT_BOUND, f"{key} at a bound")
    for j in torch.nonzero(status == int(Status.MAX_ITER)).reshape(-1).tolist():
        note(j, Flag.NOT_CONVERGED, "iteration cap reached")
    for j in torch.nonzero(status == int(Status.NONFINITE)).reshape(-1).tolist():
        note(j, Flag.NONFINITE, "model or chi2 became non-finite")

    to_np = lambda t: t.detach().cpu().numpy()
    values = {k: to_np(values_t[k]) for k in keys}
    angles = _wrapped_angles(layout)
    for k in angles:
        values[k] = wrap_pa(values[k])
    var = torch.diagonal(cov, dim1=1, dim2=2)
    errors = {}
    for i, k in enumerate(keys):
        e = to_np(var[:, i].clamp(min=0).sqrt())
        errors[k] = np.where(np.isfinite(e) & (k in layout.free or k in layout.tied), e, np.nan)
    errors_cov, percentiles, samples = dict(errors), None, None
    if uncertainty == "bootstrap" and fitted.numel() and P:
        lm_options = options if isinstance(options, LMOptions) else LMOptions()
        samples_t = _bootstrap(model, renderer, layout, batch, z, fitted, n=n_bootstrap, fixed=bootstrap_fixed,
                               seed=seed, statistic=statistic, jacobian=jacobian, options=lm_options)
        samples = {k: to_np(v) for k, v in samples_t.items()}
        for k in angles:   # each refit's angle taken within 90 degrees of the best fit's
            samples[k] = values[k][:, None] + wrap_pa(samples[k] - values[k][:, None])
        percentiles = {}
        for k in keys:
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN rows: galaxies not fitted
                # parameters held at their best fit in the refits have no bootstrap error
                varying = (k in layout.free or k in layout.tied) and k not in bootstrap_fixed
                errors[k] = np.nanstd(samples[k], axis=1, ddof=1) if varying else np.full(B, np.nan)
                percentiles[k] = (np.nanpercentile(samples[k], [16, 84], axis=1).T if varying
                                  else np.full((B, 2), np.nan))
        n_ok = np.isfinite(samples[keys[0]]).sum(axis=1) if keys else np.zeros(B)
        for j in fitted.tolist():
            if n_ok[j] < n_bootstrap:
                note(j, Flag.NOT_CONVERGED if n_ok[j] else Flag.SINGULAR,
                     f"{n_bootstrap - int(n_ok[j])} of {n_bootstrap} bootstrap refits failed")
    chi2_np = to_np(chi2)
    chi2_np[to_np(status) == int(Status.BAD_INPUT)] = np.nan
    return FitResult(keys=keys, free=list(layout.free), values=values, errors=errors, covariance=to_np(cov),
                     chi2=chi2_np, dof=to_np(batch.n_pixels - P), n_iter=to_np(n_iter), status=to_np(status),
                     flags=to_np(flags), messages=messages, ids=list(ids) if ids is not None else None,
                     uncertainty=uncertainty, statistic=statistic, errors_covariance=errors_cov,
                     percentiles=percentiles, bootstrap_samples=samples)


def _wrapped_angles(layout) -> list[str]:
    """The position angles reported in (-90, 90]: fitted (free or tied) and without bounds (an
    ellipse and the one turned by 180 degrees are the same model; bounds given by the user keep
    the values inside them)."""
    return [k for k in layout.keys if layout.spec(k).kind == "angle" and (k in layout.free or k in layout.tied)
            and layout.bounds(k) == (None, None)]


def _solver(optimizer, options):
    if optimizer == "lm":
        if options is not None and not isinstance(options, LMOptions):
            raise TypeError("optimizer 'lm' takes LMOptions")
        return lambda problem, z0, active, state=None: levenberg_marquardt(problem, z0, active, options, state)
    if options is not None and not isinstance(options, AdamOptions):
        raise TypeError(f"optimizer {optimizer!r} takes AdamOptions")
    o = options or AdamOptions()
    o = AdamOptions(**{**o.__dict__, "variant": optimizer})
    return lambda problem, z0, active, state=None: adam(problem, z0, active, o)


def _bootstrap(model, renderer, layout, batch, z, fitted, *, n, fixed, seed, statistic, jacobian, options,
               max_pixels: int = 2 ** 23):
    """Refit each galaxy of ``fitted`` on ``n`` pixel-resampled versions of its data.

    A resample draws the galaxy's N usable pixels N times with replacement (multinomial
    multiplicity weights: a pixel drawn k times counts k times in chi2), and is refitted with
    LM from the best fit. Resamples of all galaxies are fitted together, in chunks of at most
    ``max_pixels`` pixels. Returns ``{key: (B, n)}`` physical values (NaN where not fitted or
    where a refit failed).
    """
    B = layout.batch_size
    dtype, device = z.dtype, z.device
    best = layout.physical(z)
    if fixed:
        data = model.to_dict()
        for key in fixed:
            comp, _, par = key.partition(".")
            if key not in layout.keys:
                raise ValueError(f"bootstrap_fixed: {key!r} is not a parameter of the model")
            entry = data["components"][comp].get(par, {})
            entry = dict(entry) if isinstance(entry, Mapping) else {"value": entry}
            if "tie" not in entry:
                entry.update(value=0.0, fixed=True)
            data["components"][comp][par] = entry
        lay = Model.from_dict(data).layout(B, dtype=dtype, device=device)
        for k in lay.keys:
            if k not in lay.tied:
                lay.set_values(k, best[k].detach())
        zb = lay.initial()
    else:
        lay, zb = layout, z
    zb = zb.detach()
    H, W = batch.images.shape[1:]
    rows_all = fitted.repeat_interleave(n)
    chunk = max(1, max_pixels // (H * W))
    gen = torch.Generator(device=device)
    gen.manual_seed(0 if seed is None else int(seed))
    out = {k: torch.full((B, n), float("nan"), dtype=dtype, device=device) for k in layout.keys}
    for start in range(0, rows_all.numel(), chunk):
        rows = rows_all[start:start + chunk]
        r = rows.numel()
        good = (batch.weights[rows] > 0).reshape(r, -1)
        n_good = good.sum(1)
        draws = torch.multinomial(good.to(dtype), int(n_good.max()), replacement=True, generator=gen)
        use = torch.arange(draws.shape[1], device=device)[None] < n_good[:, None]
        counts = torch.zeros(r, H * W, dtype=dtype, device=device).scatter_add_(1, draws, use.to(dtype))
        sub = lay.subset(rows)
        prob = FitProblem(renderer, sub, batch, jacobian=jacobian, statistic=statistic, rows=rows,
                          multiplicity=counts.reshape(r, H, W))
        zr, _, _, st = levenberg_marquardt(prob, zb[rows], torch.ones(r, dtype=torch.bool, device=device),
                                           options)
        ok = st == int(Status.CONVERGED)
        vals = sub.physical(zr)
        col = (start + torch.arange(r, device=device)) % n
        for k in layout.keys:
            out[k][rows, col] = torch.where(ok, vals[k].detach(), torch.full_like(vals[k], float("nan")))
    return out


def _physical_jacobian(layout, z, index, keys):
    """d(physical value)/dz for every parameter in ``keys``: (b, K, P): the transforms'
    derivatives, and forward mode through the ties when there are any."""
    sub = layout.subset(index)
    if not layout.tied:
        G = torch.zeros(z.shape[0], len(keys), z.shape[1], dtype=z.dtype, device=z.device)
        for p, key in enumerate(layout.free):
            G[:, keys.index(key), p] = layout.transform(key).derivative(z[:, p])
        return G
    cols = []
    for p in range(z.shape[1]):
        tangent = torch.zeros_like(z)
        tangent[:, p] = 1.0
        _, d = jvp(lambda zz: torch.stack([sub.physical(zz)[k] for k in keys], dim=-1), (z,), (tangent,))
        cols.append(d)
    return torch.stack(cols, dim=-1)
