"""The least-squares problem of a batch: weighted residuals and their Jacobian."""

from __future__ import annotations

import torch
from torch.func import jvp

from ..params import ParameterLayout
from ..render import Renderer
from .data import StampBatch

__all__ = ["FitProblem"]

#: per-iteration step limits of unbounded parameters, by kind (pixels, magnitudes, degrees)
_UNBOUNDED_STEP = {"x": 2.0, "y": 2.0, "mag": 0.5, "angle": 20.0, "length": 2.0}


class FitProblem:
    """Weighted residuals ``sqrt(w) (model - data)`` of a batch as a function of the
    unconstrained free parameters ``z`` (B, P), and their Jacobian by forward-mode autodiff
    through the renderer (one pass per free parameter; the PSF is part of the model).

    Every method takes ``index``, the galaxies of the batch that ``z`` holds (compacted
    active sets): galaxies are independent, so a subset costs only its own share.
    """

    def __init__(self, renderer: Renderer, layout: ParameterLayout, batch: StampBatch, *,
                 jacobian: str = "autodiff"):
        if jacobian not in ("autodiff", "finite-difference"):
            raise ValueError(f"jacobian must be 'autodiff' or 'finite-difference', got {jacobian!r}")
        self.jacobian = jacobian
        self.renderer = renderer
        self.layout = layout
        self.batch = batch
        self.sqrt_w = batch.weights.sqrt()
        self.n_free = len(layout.free)
        #: largest step per iteration of each free parameter, in the optimiser's space:
        #: 1 for bounded (transformed) parameters, a physical scale for unbounded ones
        scales = []
        for key in layout.free:
            spec = layout.spec(key)
            lo, hi = layout.bounds(key)
            if lo is not None or hi is not None:
                scales.append(1.0)
            else:
                scales.append(_UNBOUNDED_STEP.get(spec.kind, 1.0))
        self.step_scale = torch.tensor(scales, dtype=batch.images.dtype, device=batch.images.device)

    def values(self, z: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.layout.subset(index).physical(z)

    def residuals(self, z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(b, H*W) weighted residuals of the galaxies ``index``."""
        model = self.renderer(self.values(z, index), check=False, index=index)
        r = (model - self.batch.images[index]) * self.sqrt_w[index]
        return r.reshape(r.shape[0], -1)

    def normal_equations(self, z: torch.Tensor, index: torch.Tensor):
        """``J^T J`` (b, P, P), ``J^T r`` (b, P) and ``chi2`` (b,) at ``z``.

        J is built one column at a time (forward mode), so memory is that of P residual
        vectors, never of a dense (pixels x pixels) object.
        """
        b, P = z.shape
        if P == 0:
            r = self.residuals(z, index)
            return (torch.zeros(b, 0, 0, dtype=z.dtype, device=z.device),
                    torch.zeros(b, 0, dtype=z.dtype, device=z.device), (r * r).sum(1))
        if self.jacobian == "finite-difference":
            # forward differences, all P perturbed copies rendered as one batch
            eps = torch.finfo(z.dtype).eps
            h = eps ** 0.5 * torch.maximum(z.abs(), torch.ones_like(z))           # (b, P)
            zp = z[None].repeat(P, 1, 1)                                          # (P, b, P)
            eye = torch.eye(P, dtype=z.dtype, device=z.device)
            zp = zp + eye[:, None, :] * h[None]
            r = self.residuals(z, index)
            rp = self.residuals(zp.reshape(P * b, P), index.repeat(P)).reshape(P, b, -1)
            J = ((rp - r[None]) / h.T[:, :, None]).permute(1, 2, 0)               # (b, N, P)
        else:
            cols = []
            for p in range(P):
                tangent = torch.zeros_like(z)
                tangent[:, p] = 1.0
                r, dr = jvp(lambda zz: self.residuals(zz, index), (z,), (tangent,))
                cols.append(dr)
            J = torch.stack(cols, dim=-1)                 # (b, N, P)
        return J.transpose(1, 2) @ J, (J.transpose(1, 2) @ r[..., None])[..., 0], (r * r).sum(1)
