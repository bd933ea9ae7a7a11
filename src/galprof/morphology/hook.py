"""Morphology columns for the fit pipeline (``galprof fit --morphology``).

:func:`morphology_hook` returns a column hook for :func:`galprof.pipeline.run_pipeline`
(``hook(stamps, table, result) -> {column: values}``, called once per batch): it measures the
morphology of the batch's stamps (the fit's image, sigma and mask) and returns the columns of
:data:`~galprof.morphology.measure.COLUMNS` (and ``MID_COLUMNS`` with ``mid=True``) plus
``morph_flag`` and ``morph_message``, one entry per row. The target's segment is the
catalogue's segmentation map where the row has one (see
:func:`catalog_segmaps`: the ``mask`` column with the target's ``mask_label``, as for
``galprof morph``); otherwise the target is segmented automatically, with the fit's masked pixels
(e.g. other sources) excluded. Positions are in the frame of each stamp's image.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from astropy.table import Column

from .detect import DetectOptions
from .flags import MorphFlag
from .measure import MorphologyOptions, measure_morphology, output_columns

__all__ = ["morphology_hook", "catalog_segmaps"]


def catalog_segmaps(catalog) -> Callable:
    """``segmap(stamp) -> (segmentation map, label) | None`` for the stamps of a
    :class:`~galprof.catalog.Catalog`: the row's ``mask`` file (or the run's ``--mask``) when the
    row has a ``mask_label``, read whole for stamps that are whole files. Cutouts of a large
    image, rows without a label and unreadable maps give None (automatic segmentation)."""
    from ..io.fits import read_image

    rows = {sid: i for i, sid in enumerate(catalog.ids)}

    def segmap(stamp):
        i = rows.get(stamp.id)
        if i is None or stamp.image is None or stamp.section:
            return None
        label = catalog._number("mask_label", i)
        spec = catalog._file("mask", i)
        if label is None or spec is None:
            return None
        try:
            seg = np.asarray(read_image(spec))
        except Exception:  # the fit has flagged an unreadable mask already
            return None
        if seg.shape != stamp.image.shape:
            return None
        return seg, int(label)

    return segmap


def morphology_hook(options: MorphologyOptions | None = None, detect_options: DetectOptions | None = None,
                    gain: float | None = None, device="cpu", dtype=torch.float64,
                    segmaps: Callable | None = None) -> Callable:
    """A pipeline column hook that adds the morphology columns (see the module docstring).

    ``segmaps(stamp)`` may give a stamp's ``(segmentation map, target label)`` (None: segment
    automatically), e.g. :func:`catalog_segmaps`."""

    def hook(stamps, table, result) -> dict[str, object]:
        n = len(stamps)
        columns = output_columns(options)
        cols: dict[str, object] = {k: np.full(n, np.nan) for k in columns}
        flag = np.full(n, int(MorphFlag.NO_DATA), dtype=np.int64)
        message = ["bad: not measured (no image)"] * n
        idx = [i for i, s in enumerate(stamps) if getattr(s, "image", None) is not None]
        if idx:
            sub = [stamps[i] for i in idx]
            segs = [segmaps(s) if segmaps is not None else None for s in sub]
            t = measure_morphology([s.image for s in sub], [None if g is None else g[0] for g in segs],
                                   [None if g is None else g[1] for g in segs], [s.mask for s in sub],
                                   [s.sigma for s in sub] if all(s.sigma is not None for s in sub) else None,
                                   gain=gain, ids=[s.id for s in sub], options=options,
                                   detect_options=detect_options, device=device, dtype=dtype)
            for key in columns:
                vals = np.asarray(t[key], dtype=float)
                if key.startswith("xc_") or key.startswith("yc_"):
                    axis = 0 if key.startswith("xc_") else 1
                    vals = vals + np.array([float(s.offset[axis]) for s in sub])
                cols[key][idx] = vals
            flag[idx] = np.asarray(t["morph_flag"])
            for k, i in enumerate(idx):
                message[i] = t["morph_message"][k]
        for key, unit in columns.items():
            if unit:
                cols[key] = Column(cols[key], unit=unit)
        cols["morph_flag"] = flag
        cols["morph_message"] = message
        return cols

    return hook
