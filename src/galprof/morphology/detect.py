"""Automatic segmentation of the source at the centre of each stamp (when no map is given).

A deliberately simple detector, documented so that results can be reproduced elsewhere:

1. sky level and noise: median and standard deviation of the finite, unmasked pixels after
   iterative 3-sigma clipping (median centre, at most 10 rounds; astropy's ``sigma_clipped_stats``);
2. detection: pixels above ``median + nsigma * std``, 8-connected, at least ``npixels`` pixels;
3. target: the detection that holds the stamp's centre pixel (``[ny // 2, nx // 2]``), else the
   one with a pixel nearest to it within ``center_radius`` pixels; every other detection becomes
   a second label, so that it is masked as statmorph masks other sources.

The result is a segmentation map with 1 = target, 2 = other sources, 0 = sky. For crowded
fields, deblended maps from a dedicated tool (SExtractor, sep, photutils) are better inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .kernels import SortedRanges, label_components, sort_values

__all__ = ["DetectOptions", "segment_stamps"]


@dataclass
class DetectOptions:
    """Settings of :func:`segment_stamps`: threshold in sky standard deviations, smallest
    detection (pixels), and how far from the centre the target may start (pixels)."""

    nsigma: float = 1.5
    npixels: int = 10
    center_radius: float = 5.0


def segment_stamps(images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None], opts: DetectOptions,
                   device="cpu", dtype=torch.float64) -> list[tuple[np.ndarray | None, int | None]]:
    """Segment each stamp; returns ``(segmap, 1)`` per stamp, or ``(None, None)`` where no
    source was found near the centre."""
    n = len(images)
    if n == 0:
        return []
    shapes = [np.shape(im) for im in images]
    h = max(s[0] for s in shapes)
    w = max(s[1] for s in shapes)
    canvas = np.full((n, h, w), np.nan)
    for i, im in enumerate(images):
        a = np.asarray(im, dtype=np.float64)
        if masks[i] is not None:
            a = np.where(np.asarray(masks[i], dtype=bool), np.nan, a)
        canvas[i, :a.shape[0], :a.shape[1]] = a
    x = torch.as_tensor(canvas, device=device, dtype=dtype)
    good = torch.isfinite(x)
    flat = torch.where(good, x, torch.full_like(x, float("inf"))).reshape(n, -1)
    vals = sort_values(flat)
    cnt = good.reshape(n, -1).sum(1)

    sr = SortedRanges(vals, cnt)
    lo, hi = sr.clip(lambda lo, hi: sr.stats(lo, hi)[1], 3.0, 10)
    _, med, std = sr.stats(lo, hi)
    det = good & (x > (med + opts.nsigma * std).view(n, 1, 1))
    lab = label_components(det) + 1  # 0 = sky
    sizes = torch.bincount(lab.reshape(-1), minlength=n * h * w + 1)
    keep = det & (sizes[lab] >= opts.npixels)
    lab = torch.where(keep, lab, torch.zeros_like(lab))
    out: list[tuple[np.ndarray | None, int | None]] = []
    lab_np = lab.cpu().numpy()
    for i, (ny, nx) in enumerate(shapes):
        li = lab_np[i, :ny, :nx]
        cy, cx = ny // 2, nx // 2
        target = li[cy, cx]
        if target == 0:
            yy, xx = np.nonzero(li)
            if yy.size:
                d2 = (yy - cy) ** 2 + (xx - cx) ** 2
                k = int(np.argmin(d2))
                if d2[k] <= opts.center_radius ** 2:
                    target = li[yy[k], xx[k]]
        if target == 0:
            out.append((None, None))
            continue
        seg = np.where(li == target, 1, np.where(li != 0, 2, 0)).astype(np.int32)
        out.append((seg, 1))
    return out
