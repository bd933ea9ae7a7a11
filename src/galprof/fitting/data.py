"""Batches of stamps: padding, validation, weights. All validation of pixel data happens here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from ..errors import DataError
from ..flags import Flag

__all__ = ["StampBatch", "flux_step", "make_batch"]


@dataclass
class StampBatch:
    """Images and weights of B galaxies, padded to a common (H, W).

    Attributes
    ----------
    images : (B, H, W) tensor
        Data; unusable pixels (and padding) hold 0 and have weight 0.
    weights : (B, H, W) tensor
        ``1 / sigma^2`` for usable pixels, 0 elsewhere.
    shapes : list of (ny, nx)
    flags : (B,) int64 tensor of :class:`~galprof.flags.Flag` bits
    messages : list of str, one per galaxy
    n_pixels : (B,) number of usable pixels
    """

    images: torch.Tensor
    weights: torch.Tensor
    shapes: list[tuple[int, int]]
    flags: torch.Tensor
    messages: list[str] = field(default_factory=list)
    n_pixels: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return len(self.shapes)

    @cached_property
    def flux_step(self) -> float:
        """:func:`flux_step` of the batch's weights (computed once: every problem on the batch,
        the bootstrap's included, uses it)."""
        return flux_step(self.weights)


def flux_step(weights: torch.Tensor) -> float:
    """A step per iteration for a level in the data's units: 10 times the median sigma of the
    pixels in use (``weights`` = 1 / sigma^2), so that a sky started hundreds of counts off in
    raw counts is not held to one count per iteration, nor one in images of nanomaggies allowed
    a hundred sigma; 1 when no pixel is in use (one host synchronisation, at set-up)."""
    good = weights[weights > 0]
    return float(10.0 * good.median().rsqrt()) if good.numel() else 1.0


def make_batch(images: Sequence, sigmas: Sequence | None = None, masks: Sequence | None = None, *,
               dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> StampBatch:
    """Validate and pad stamps into a :class:`StampBatch`.

    Parameters
    ----------
    images : sequence of 2-D arrays (counts per pixel)
    sigmas : sequence of 2-D arrays (1-sigma noise per pixel), or None for unit weights
    masks : sequence of 2-D arrays, nonzero = bad pixel, or None

    Pixels with non-finite data, or sigma not finite or <= 0, are masked and flagged
    (:attr:`Flag.BAD_PIXELS`), never repaired; a stamp with no usable pixel is flagged
    :attr:`Flag.NO_DATA`. A sigma or mask whose shape differs from its image is an error.
    """
    B = len(images)
    if B == 0:
        raise DataError("no images given")
    arrays = [np.asarray(im, dtype=np.float64) for im in images]
    for i, a in enumerate(arrays):
        if a.ndim != 2 or min(a.shape) < 1:
            raise DataError(f"image {i} must be 2-D, got shape {a.shape}")
    shapes = [a.shape for a in arrays]
    H, W = max(s[0] for s in shapes), max(s[1] for s in shapes)
    data = np.zeros((B, H, W))
    weights = np.zeros((B, H, W))
    flags = np.zeros(B, dtype=np.int64)
    messages = []
    for i, a in enumerate(arrays):
        ny, nx = a.shape
        good = np.isfinite(a)
        notes = []
        if sigmas is not None:
            s = np.asarray(sigmas[i], dtype=np.float64)
            if s.shape != a.shape:
                raise DataError(f"sigma {i} has shape {s.shape}, its image {a.shape}")
            good_sigma = np.isfinite(s) & (s > 0)
            if not good_sigma.all():
                notes.append(f"{int((~good_sigma).sum())} pixels with sigma <= 0 or non-finite masked")
            good &= good_sigma
            w = np.where(good, 1.0 / np.where(good_sigma, s, 1.0) ** 2, 0.0)
        else:
            w = good.astype(np.float64)
        if (~np.isfinite(a)).any():
            notes.append(f"{int((~np.isfinite(a)).sum())} non-finite data pixels masked")
        if masks is not None and masks[i] is not None:
            m = np.asarray(masks[i])
            if m.shape != a.shape:
                raise DataError(f"mask {i} has shape {m.shape}, its image {a.shape}")
            good &= m == 0
            w = np.where(good, w, 0.0)
        if notes:
            flags[i] |= Flag.BAD_PIXELS
        if not good.any():
            flags[i] |= Flag.NO_DATA
            notes.append("no usable pixel")
        data[i, :ny, :nx] = np.where(good, a, 0.0)
        weights[i, :ny, :nx] = w
        messages.append("; ".join(notes))
    t = lambda x: torch.as_tensor(x, dtype=dtype, device=device)
    weights_t = t(weights)
    return StampBatch(t(data), weights_t, [tuple(s) for s in shapes], torch.as_tensor(flags, device=device),
                      messages, (weights_t > 0).sum(dim=(1, 2)))
