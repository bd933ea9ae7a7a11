"""Batched first-order optimisers (Adam, DiffGrad) with per-galaxy step sizes and early stopping."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..flags import Status
from .problem import FitProblem

__all__ = ["AdamOptions", "adam"]


@dataclass(frozen=True)
class AdamOptions:
    """Settings of :func:`adam`.

    Attributes
    ----------
    variant : "adam" or "diffgrad"
        DiffGrad (Dubey et al. 2020) scales Adam's first moment by a friction
        ``sigmoid(|g_t - g_{t-1}|)``, slowing down where the gradient stops changing.
    lr : float
        Step size in units of each parameter's scale (the same scales that bound LM's steps:
        1 for bounded parameters in their unconstrained space; pixels, magnitudes and degrees
        for unbounded ones).
    beta1, beta2, eps : Adam's moment decays and denominator guard.
    max_iter : int
        Iteration cap (one gradient evaluation each).
    check_every : int
        Every ``check_every`` iterations, a galaxy whose best chi2 improved by less than
        ``ftol`` (relative) since the last check halves its step size; it is converged once
        its step size falls below ``lr * min_lr_factor``. Checks are the only host
        synchronisations of the loop.
    """

    variant: str = "adam"
    lr: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_iter: int = 3000
    check_every: int = 25
    ftol: float = 1e-7
    min_lr_factor: float = 1e-3


def adam(problem: FitProblem, z0: torch.Tensor, active: torch.Tensor, options: AdamOptions | None = None):
    """Minimise chi2 of every galaxy with Adam (or DiffGrad), gradients by reverse-mode autodiff.

    Galaxies are independent: the gradient of the summed chi2 is each galaxy's own gradient, and
    each galaxy keeps its own moments, step size and best point. Converged galaxies leave the
    active set at the next check. Returns ``(z, chi2, n_iter, status)`` like
    :func:`~galprof.fitting.lm.levenberg_marquardt`, ``z`` being each galaxy's best point.
    """
    o = options or AdamOptions()
    if o.variant not in ("adam", "diffgrad"):
        raise ValueError(f"variant must be 'adam' or 'diffgrad', got {o.variant!r}")
    z = z0.clone()
    B, P = z.shape
    dev, dt = z.device, z.dtype
    status = torch.full((B,), int(Status.MAX_ITER), dtype=torch.int64, device=dev)
    status[~active] = int(Status.BAD_INPUT)
    n_iter = torch.zeros(B, dtype=torch.int64, device=dev)
    best_z = z.clone()
    best = torch.full((B,), float("inf"), dtype=dt, device=dev)
    last_check = torch.full((B,), float("inf"), dtype=dt, device=dev)
    m = torch.zeros_like(z)
    v = torch.zeros_like(z)
    g_prev = torch.zeros_like(z)
    t = torch.zeros(B, dtype=dt, device=dev)
    lr = torch.full((B,), o.lr, dtype=dt, device=dev)
    scale = problem.step_scale
    idx = torch.nonzero(active).reshape(-1)
    if P == 0:
        if idx.numel():
            r = problem.residuals(z[idx], idx)
            best[idx] = (r * r).sum(1)
            status[idx] = int(Status.CONVERGED)
        return z, best, n_iter, status
    for it in range(1, o.max_iter + 1):
        if idx.numel() == 0:
            break
        zi = z[idx].detach().requires_grad_(True)
        r = problem.residuals(zi, idx)
        chi2 = (r * r).sum(1)
        (grad,) = torch.autograd.grad(chi2.sum(), zi)
        chi2 = chi2.detach()
        finite = torch.isfinite(chi2) & torch.isfinite(grad).all(dim=1)
        improved = finite & (chi2 < best[idx])
        best[idx] = torch.where(improved, chi2, best[idx])
        best_z[idx] = torch.where(improved[:, None], z[idx], best_z[idx])
        # a non-finite point: go back to the best one with a smaller step
        grad = torch.where(finite[:, None], grad, torch.zeros_like(grad))
        gs = grad * scale                                  # gradient in scaled units
        ti = t[idx] + 1
        t[idx] = ti
        mi = o.beta1 * m[idx] + (1 - o.beta1) * gs
        vi = o.beta2 * v[idx] + (1 - o.beta2) * gs * gs
        m[idx], v[idx] = mi, vi
        mhat = mi / (1 - o.beta1 ** ti)[:, None]
        vhat = vi / (1 - o.beta2 ** ti)[:, None]
        if o.variant == "diffgrad":
            mhat = mhat * torch.sigmoid((g_prev[idx] - gs).abs())
            g_prev[idx] = gs
        step = -lr[idx][:, None] * scale * mhat / (vhat.sqrt() + o.eps)
        lr[idx] = torch.where(finite, lr[idx], lr[idx] * 0.5)
        z[idx] = torch.where(finite[:, None], z[idx] + step, best_z[idx])
        n_iter[idx] += 1
        if it % o.check_every == 0:
            b = best[idx]
            stalled = (last_check[idx] - b) <= o.ftol * b
            lr[idx] = torch.where(stalled, lr[idx] * 0.5, lr[idx])
            last_check[idx] = b
            done = lr[idx] < o.lr * o.min_lr_factor
            nonfinite = ~torch.isfinite(b) & (n_iter[idx] >= 4 * o.check_every)
            status[idx[done]] = int(Status.CONVERGED)
            status[idx[nonfinite]] = int(Status.NONFINITE)
            idx = idx[~(done | nonfinite)]
    # the best point seen, and its chi2
    z = torch.where(torch.isfinite(best)[:, None], best_z, z)
    return z, best, n_iter, status
