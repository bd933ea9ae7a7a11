"""Batched Levenberg–Marquardt: per-galaxy damping, acceptance and convergence."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..flags import Status
from .problem import FitProblem

__all__ = ["LMOptions", "levenberg_marquardt"]


@dataclass(frozen=True)
class LMOptions:
    """Settings of :func:`levenberg_marquardt`.

    Attributes
    ----------
    max_iter : int
        Iteration cap (each iteration is one trial step per galaxy).
    ftol : float
        Converged when an accepted step lowers chi2 by less than ``ftol`` (relative) or by
        less than ``chi2_atol`` (absolute; 0 by default, set for fields whose chi2 sums
        hundreds of thousands of pixels, where a relative change means nothing; at least 0.02
        for a model rendered in float32, whose chi2 is not known better) ...
    xtol : float
        ... or moves every unconstrained parameter by less than ``xtol (|z| + xtol)``.
    decrement : bool
        ... or (True, the default) before a step, when the Gauss–Newton model of chi2 at the
        current point predicts that no step can lower it by more than those tolerances (the
        Newton decrement ``g^T A^-1 g``, with ``A = J^T W J`` undamped and ``g = J^T W r``,
        parameters pinned at a bound left out): the test above, one iteration earlier, without
        the step that would only confirm it.
    stall_window, stall_atol : int, float
        ... or, every ``stall_window`` iterations, when chi2 has fallen by less than
        ``stall_atol`` (absolute; at least the float32 floor above) over the last
        ``stall_window`` iterations: a fit creeping along a flat valley (most often towards a
        bound: a component turning into a line or a point) whose remaining gains are far below
        the noise (``stall_window = 0``: never).
    lambda0, lambda_up, lambda_down, lambda_max : float
        Initial damping, its factors after a rejected / accepted step, and the damping above
        which a galaxy whose chi2 no longer decreases is taken as converged.
    """

    max_iter: int = 100
    ftol: float = 1e-9
    chi2_atol: float = 0.0
    xtol: float = 1e-8
    decrement: bool = True
    stall_window: int = 20
    stall_atol: float = 0.01
    lambda0: float = 1e-3
    lambda_up: float = 10.0
    lambda_down: float = 10.0
    lambda_max: float = 1e10


def levenberg_marquardt(problem: FitProblem, z0: torch.Tensor, active: torch.Tensor,
                        options: LMOptions | None = None, state: dict | None = None):
    """Minimise chi2 for every galaxy of the batch at once.

    Damping is Marquardt's (``A + lambda diag(A)``), one per galaxy; each iteration makes one
    trial step per active galaxy, accepts it where chi2 decreases, and compacts the set of
    active galaxies, so converged galaxies stop costing compute. ``J^T J`` and ``J^T r`` are
    recomputed only for galaxies whose step was accepted.

    Returns ``(z, chi2, n_iter, status)``; galaxies not ``active`` at the start keep their
    start and status ``BAD_INPUT``. A dict ``state`` receives the last normal equations,
    ``"A"`` (B, P, P) and ``"fresh"`` (B,): where they were computed at the returned ``z``
    (a galaxy stopped by the Newton decrement, or after a rejected step), so that a caller
    needing ``J^T J`` there (the covariance) need not compute it again.
    """
    o = options or LMOptions()
    z = z0.clone()
    B, P = z.shape
    dev, dt = z.device, z.dtype
    status = torch.full((B,), int(Status.MAX_ITER), dtype=torch.int64, device=dev)
    status[~active] = int(Status.BAD_INPUT)
    n_iter = torch.zeros(B, dtype=torch.int64, device=dev)
    lam = torch.full((B,), o.lambda0, dtype=dt, device=dev)
    chi2 = torch.full((B,), float("inf"), dtype=dt, device=dev)
    A = torch.zeros(B, P, P, dtype=dt, device=dev)
    g = torch.zeros(B, P, dtype=dt, device=dev)
    scale = torch.zeros(B, P, dtype=dt, device=dev)  # damping scale: the largest diag(A) so far
    stale = active.clone()            # galaxies whose normal equations must be (re)computed
    resid = None                      # residuals at z of the galaxies whose step was accepted
    carry = bool(getattr(problem, "carries_shift", False))
    shift = None                      # ... and the model's shift derivatives there (see FitProblem)
    active = active.clone()
    eye = torch.eye(P, dtype=dt, device=dev)
    # a float32 model's chi2 and finite-difference Jacobian are too noisy to see changes below a
    # few hundredths: without this floor a float32 fit spends its last iterations chasing
    # rounding noise (absolute, so that it means the same distance from the optimum, at most
    # 0.14 sigma, on a stamp of a thousand pixels or a field of millions)
    atol = max(o.chi2_atol, 0.02 if getattr(problem, "dtype", dt) == torch.float32 else 0.0)
    stall_tol = max(o.stall_atol, atol)
    window_start = torch.full((B,), float("inf"), dtype=dt, device=dev)   # chi2 when the window began
    # a problem with independent blocks of parameters (the sources of a field) limits each block's
    # step on its own: the largest of each block, for each of its parameters
    groups = getattr(problem, "step_groups", None)

    def block_max(v):
        if groups is None:
            return v.amax(dim=1, keepdim=True)
        gi_ = groups.expand_as(v)
        per = torch.zeros(v.shape[0], problem.n_step_groups, dtype=dt, device=dev)
        return per.scatter_reduce(1, gi_, v, "amax").gather(1, gi_)

    for _ in range(o.max_iter):
        # three host synchronisations per iteration: which galaxies need new normal equations,
        # which are near their optimum, and which are still running
        todo = torch.nonzero(stale & active).reshape(-1)
        if todo.numel():
            extra = {"shift": shift[todo]} if carry and shift is not None else {}
            Ai, gi, c2 = problem.normal_equations(z[todo], todo, residuals=None if resid is None else resid[todo],
                                                  **extra)
            A[todo], g[todo], chi2[todo] = Ai, gi, c2
            window_start[todo] = torch.where(torch.isinf(window_start[todo]), c2, window_start[todo])
            stale[todo] = False
            scale[todo] = torch.maximum(scale[todo], torch.diagonal(Ai, dim1=1, dim2=2))
            bad = ~torch.isfinite(c2) | ~torch.isfinite(Ai).all(dim=(1, 2)) | ~torch.isfinite(gi).all(dim=1)
            status[todo[bad]] = int(Status.NONFINITE)
            active[todo[bad]] = False
        idx = torch.nonzero(active).reshape(-1)
        if idx.numel() == 0:
            break
        Ai, gi, lami = A[idx], g[idx], lam[idx]
        # Marquardt's damping, scaled as in MINPACK by the largest diag(A) seen so far: a
        # parameter running towards a bound (where its column of J vanishes) keeps the damping
        # of its healthy past instead of taking an unbounded step that the trust region below
        # would have to shrink, together with every other parameter's
        diag = scale[idx].clamp(min=torch.finfo(dt).tiny)
        # a parameter at its bound that the gradient pushes further out is held for this step
        # (as bounded LM codes peg a parameter at its limit); the others are solved without it
        zi = z[idx]
        # (or whose gradient is exactly zero: a transform saturated in this precision)
        pinned = problem.at_bound(zi) & (gi * zi <= 0)
        keep = (~pinned).to(dt)
        A0 = Ai * keep[:, :, None] * keep[:, None, :] + torch.diag_embed(pinned.to(dt))
        M = A0 + lami[:, None, None] * torch.diag_embed(diag * keep)
        gi = gi * keep
        if o.decrement:
            # the Newton decrement: the most any step could lower chi2 by the Gauss–Newton model
            L0, info0 = torch.linalg.cholesky_ex(A0)
            L0 = torch.where((info0 == 0)[:, None, None], L0, eye.expand_as(L0))
            dec = (gi * torch.cholesky_solve(gi[..., None], L0)[..., 0]).sum(1)
            near = (info0 == 0) & torch.isfinite(dec) & (dec <= torch.clamp(o.ftol * chi2[idx], min=atol))
            status[idx[near]] = int(Status.CONVERGED)
            active[idx[near]] = False
            far = ~near
            idx, Ai, gi, lami, zi, M = idx[far], Ai[far], gi[far], lami[far], zi[far], M[far]
            if idx.numel() == 0:
                break
        L, info = torch.linalg.cholesky_ex(M)
        solvable = info == 0
        L = torch.where(solvable[:, None, None], L, eye.expand_as(L))
        step = torch.cholesky_solve(-gi[..., None], L)[..., 0]
        step = torch.where(solvable[:, None], step, torch.zeros_like(step))
        # trust region in the scaled max-norm: no parameter moves more than its scale per step.
        # A bounded parameter in the tail of its transform (within a few units of saturation) is
        # capped on its own, at doubling its distance from the centre of the transform when it
        # steps further out, at halving it when it steps back in: its model derivative is weak
        # there (its Gauss-Newton step long), and scaling the whole step down for it would stall
        # every other parameter. So is, at its usual scale, any parameter whose largest step would
        # change the model by less than 1e-3 of what another's can (a position angle of a round
        # galaxy, the centre of a component whose flux has vanished): its long step in a nearly
        # flat direction says nothing about the others'.
        tail = problem.at_bound(zi, tol=0.1)
        out = step * zi > 0
        cap = torch.where(tail, torch.maximum(problem.step_scale.expand_as(zi), zi.abs() * torch.where(out, 1.0, 0.5)),
                          problem.step_scale)
        reach = torch.diagonal(Ai, dim1=1, dim2=2) * cap * cap   # |model change|^2 of a full step (linear model)
        weak = reach < 1e-6 * block_max(reach)
        step = torch.where(tail | weak, step.clamp(-cap, cap), step)
        step = step / block_max(step.abs() / cap).clamp(min=1.0)
        z_try = z[idx] + step
        if carry:
            r_try, s_try = problem.residuals(z_try, idx, shift=True)
        else:
            r_try = problem.residuals(z_try, idx)
        chi2_try = (r_try * r_try).sum(1)
        old = chi2[idx]
        accept = solvable & torch.isfinite(chi2_try) & (chi2_try <= old)
        small_f = (old - chi2_try) <= torch.clamp(o.ftol * old, min=atol)
        small_x = (step.abs() <= o.xtol * (z[idx].abs() + o.xtol)).all(dim=1)
        done = (accept & (small_f | small_x)) | (~accept & (lami * o.lambda_up > o.lambda_max))
        z[idx] = torch.where(accept[:, None], z_try, z[idx])
        chi2[idx] = torch.where(accept, chi2_try, old)
        lam[idx] = torch.where(accept, (lami / o.lambda_down).clamp(min=1e-12), lami * o.lambda_up)
        stale[idx] = accept
        if resid is None:
            resid = torch.zeros(B, r_try.shape[1], dtype=dt, device=dev)
        resid[idx] = torch.where(accept[:, None], r_try, resid[idx])
        if carry:
            if shift is None:
                shift = torch.zeros(B, *s_try.shape[1:], dtype=dt, device=dev)
            shift[idx] = torch.where(accept[:, None, None], s_try, shift[idx])
        n_iter[idx] += 1
        if o.stall_window > 0:
            # the end of a window: converged if chi2 has crept down by less than stall_tol in it
            end = n_iter[idx] % o.stall_window == 0
            done = done | (end & (window_start[idx] - chi2[idx] < stall_tol))
            window_start[idx] = torch.where(end, chi2[idx], window_start[idx])
        status[idx[done]] = int(Status.CONVERGED)
        active[idx[done]] = False
    if state is not None:
        started = status != int(Status.BAD_INPUT)
        state["A"] = A
        state["fresh"] = started & ~stale & torch.isfinite(A).all(dim=(1, 2)) & torch.isfinite(chi2)
    return z, chi2, n_iter, status
