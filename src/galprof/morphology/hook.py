"""Morphology columns for the fit pipeline (``galprof fit --morphology``).

:func:`morphology_hook` returns a column hook for :func:`galprof.pipeline.run_pipeline`
(``hook(stamps, table, result) -> {column: values}``, called once per batch): it measures the
morphology of the batch's stamps (the fit's image, sigma and mask; the target is segmented
automatically, with the fit's masked pixels, e.g. other sources, excluded) and returns the
columns of :data:`~galprof.morphology.measure.COLUMNS` plus ``morph_flag`` and
``morph_message``, one entry per row. Positions are in the frame of each stamp's image.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .detect import DetectOptions
from .flags import MorphFlag
from .measure import COLUMNS, MorphologyOptions, measure_morphology

__all__ = ["morphology_hook"]


def morphology_hook(options: MorphologyOptions | None = None, detect_options: DetectOptions | None = None,
                    gain: float | None = None, device="cpu", dtype=torch.float64) -> Callable:
    """A pipeline column hook that adds the morphology columns (see the module docstring)."""

    def hook(stamps, table, result) -> dict[str, object]:
        n = len(stamps)
        cols: dict[str, object] = {k: np.full(n, np.nan) for k in COLUMNS}
        flag = np.full(n, int(MorphFlag.NO_DATA), dtype=np.int64)
        message = ["bad: not measured (no image)"] * n
        idx = [i for i, s in enumerate(stamps) if getattr(s, "image", None) is not None]
        if idx:
            sub = [stamps[i] for i in idx]
            t = measure_morphology([s.image for s in sub], None, None, [s.mask for s in sub],
                                   [s.sigma for s in sub] if all(s.sigma is not None for s in sub) else None,
                                   gain=gain, ids=[s.id for s in sub], options=options,
                                   detect_options=detect_options, device=device, dtype=dtype)
            for key in COLUMNS:
                vals = np.asarray(t[key], dtype=float)
                if key.startswith("xc_") or key.startswith("yc_"):
                    axis = 0 if key.startswith("xc_") else 1
                    vals = vals + np.array([float(s.offset[axis]) for s in sub])
                cols[key][idx] = vals
            flag[idx] = np.asarray(t["morph_flag"])
            for k, i in enumerate(idx):
                message[i] = t["morph_message"][k]
        cols["morph_flag"] = flag
        cols["morph_message"] = message
        return cols

    return hook
