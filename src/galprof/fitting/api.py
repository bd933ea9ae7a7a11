"""``galprof.fit``: fit a model to a batch of galaxies."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.func import jvp

from ..errors import PSFError
from ..flags import Flag, Status
from ..model import Model
from ..render import Renderer, RenderOptions, prepare_psf
from .data import make_batch
from .lm import LMOptions, levenberg_marquardt
from .problem import FitProblem
from .result import FitResult

__all__ = ["fit"]


def fit(model: Model, images: Sequence, sigmas: Sequence | None = None, masks: Sequence | None = None,
        psf=None, *, psf_kind: str = "star", psf_oversampling: int = 1,
        initial: Mapping[str, Sequence[float]] | None = None, ids: Sequence | None = None,
        options: LMOptions | None = None, render_options: RenderOptions | None = None,
        scale_errors: bool = False, jacobian: str = "autodiff", dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu") -> FitResult:
    """Fit ``model`` to every galaxy of a batch with Levenberg–Marquardt.

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
    scale_errors : multiply the covariance by chi2_nu
    jacobian : "autodiff" (forward mode, exact) or "finite-difference" (forward differences in the
        optimiser's space, step sqrt(eps) max(|z|, 1): one render of all P perturbed copies)

    Returns
    -------
    FitResult
        A galaxy whose data, PSF or starting values cannot be used is not fitted: it gets a
        flag, a message and status ``bad_input``, and the others are fitted as if it were not
        there.
    """
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
    fatal = int(Flag.NO_DATA | Flag.BAD_PSF | Flag.BAD_START)
    active = (flags & fatal) == 0
    z0 = layout.initial()
    z0 = torch.where(active[:, None] & torch.isfinite(z0), z0, torch.zeros_like(z0))

    problem = FitProblem(renderer, layout, batch, jacobian=jacobian)
    z, chi2, n_iter, status = levenberg_marquardt(problem, z0, active, options)

    # covariance at the optimum, from the same forward model (PSF included)
    keys = layout.keys
    K = len(keys)
    cov = torch.full((B, K, K), float("nan"), dtype=dtype, device=device)
    fitted = torch.nonzero(status != int(Status.BAD_INPUT)).reshape(-1)
    if fitted.numel() and P:
        A, _, chi2_f = problem.normal_equations(z[fitted], fitted)
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
    var = torch.diagonal(cov, dim1=1, dim2=2)
    errors = {}
    for i, k in enumerate(keys):
        e = to_np(var[:, i].clamp(min=0).sqrt())
        errors[k] = np.where(np.isfinite(e) & (k in layout.free or k in layout.tied), e, np.nan)
    chi2_np = to_np(chi2)
    chi2_np[to_np(status) == int(Status.BAD_INPUT)] = np.nan
    return FitResult(keys=keys, free=list(layout.free), values=values, errors=errors, covariance=to_np(cov),
                     chi2=chi2_np, dof=to_np(batch.n_pixels - P), n_iter=to_np(n_iter), status=to_np(status),
                     flags=to_np(flags), messages=messages, ids=list(ids) if ids is not None else None)


def _physical_jacobian(layout, z, index, keys):
    """d(physical value)/dz for every parameter in ``keys``: (b, K, P), by forward mode."""
    sub = layout.subset(index)
    cols = []
    for p in range(z.shape[1]):
        tangent = torch.zeros_like(z)
        tangent[:, p] = 1.0
        _, d = jvp(lambda zz: torch.stack([sub.physical(zz)[k] for k in keys], dim=-1), (z,), (tangent,))
        cols.append(d)
    return torch.stack(cols, dim=-1)
