"""The ``galprof morph`` command: non-parametric morphology of the galaxies of a catalogue.

Registered by :func:`galprof.cli.main` through :func:`add_parser` and :func:`run`.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from astropy.table import Table

from ..errors import DataError
from ..io.fits import read_image
from .detect import DetectOptions
from .flags import MorphFlag
from .measure import COLUMNS, MID_COLUMNS, MorphologyOptions, measure_morphology

log = logging.getLogger("galprof")

__all__ = ["add_parser", "run", "morphology_columns"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_MISSING = {"", "--", "nan", "none", "null"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``morph`` sub-command to an ``argparse`` sub-parser collection."""
    m = subparsers.add_parser(
        "morph", help="non-parametric morphology (concentration, asymmetry, smoothness, Gini, M20, radii)",
        description="Measure statmorph's non-parametric statistics for every galaxy of a catalogue and write "
                    "morphology.csv and morphology.fits to --out. See docs/morphology.md.")
    m.add_argument("--catalog", required=True,
                   help="table with id, image and optional sigma, mask, mask_label columns (paths relative to "
                        "the catalogue's folder; file.fits[N] selects an HDU). With mask_label the mask is a "
                        "segmentation map; without it, a bad-pixel mask (nonzero = bad) and the target is "
                        "segmented automatically")
    m.add_argument("--out", required=True, help="output folder (morphology.csv, morphology.fits)")
    m.add_argument("--gain", type=float, help="e-/image unit, for sn_per_pixel when there is no sigma map")
    m.add_argument("--nsigma", type=float, default=DetectOptions.nsigma,
                   help="automatic segmentation: threshold in sky standard deviations (default %(default)s)")
    m.add_argument("--npixels", type=int, default=DetectOptions.npixels,
                   help="automatic segmentation: smallest source in pixels (default %(default)s)")
    m.add_argument("--asym-xtol", type=float, default=MorphologyOptions.asym_xtol,
                   help="stopping tolerance of the asymmetry-centre simplex, pixels (default %(default)s)")
    m.add_argument("--mid", action="store_true",
                   help="also the MID statistics (multimode, intensity, deviation); needs scipy and scikit-image")
    m.add_argument("--device", default="cpu")
    m.add_argument("--dtype", choices=sorted(_DTYPES), default="float64")
    m.add_argument("--batch-size", type=_positive, default=64)
    m.add_argument("--workers", type=_positive, default=1,
                   help="processes measuring batches side by side on the CPU, one thread each (default 1)")
    return m


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {value}")
    return value


def _path(folder: Path, value) -> str | None:
    if value is None or np.ma.is_masked(value) or str(value).strip().lower() in _MISSING:
        return None
    spec = str(value).strip()
    return spec if os.path.isabs(spec) else str(folder / spec)


def _label(value) -> int | None:
    if value is None or np.ma.is_masked(value) or str(value).strip().lower() in _MISSING:
        return None
    try:
        return int(float(value))
    except ValueError:
        raise DataError(f"mask_label {value!r} is not an integer") from None


def morphology_columns(images, masks, ids, mask_labels=None, sigmas=None, *, gain: float | None = None,
                       options: MorphologyOptions | None = None, detect_options: DetectOptions | None = None,
                       device="cpu", dtype=torch.float64, batch_size: int = 64, workers: int = 1) -> Table:
    """Morphology columns for a set of galaxies, to be joined with a fit table on ``id``.

    ``masks[i]`` is a segmentation map when ``mask_labels[i]`` is given (its other labels are
    masked), else a bad-pixel mask (nonzero = bad) and the target is segmented automatically;
    None: no mask, automatic segmentation. Returns the table of :func:`measure_morphology`
    (``id``, ``morph_flag``, ``morph_message`` and the statistics)."""
    n = len(images)
    masks = [None] * n if masks is None else list(masks)
    labels = [None] * n if mask_labels is None else list(mask_labels)
    segmaps, user_masks = [], []
    for m, lab in zip(masks, labels):
        if m is not None and lab is not None:
            segmaps.append(np.asarray(m))
            user_masks.append(None)
        else:
            segmaps.append(None)
            user_masks.append(None if m is None else np.asarray(m) != 0)
    return measure_morphology(images, segmaps, labels, user_masks, sigmas, gain=gain, ids=ids, options=options,
                              detect_options=detect_options, batch_size=batch_size, device=device, dtype=dtype,
                              workers=workers)


def run(args) -> int:
    """Run ``galprof morph`` (see ``galprof morph --help``); returns the exit code."""
    from ..catalog import read_catalog

    if args.mid:
        from .mid import require_option

        require_option("--mid")
    if args.workers > 1 and torch.device(args.device).type != "cpu":
        raise DataError(f"--workers {args.workers} runs on the CPU only (--device {args.device}): "
                        "use one process per GPU")
    table = read_catalog(args.catalog)
    if "image" not in table.colnames:
        raise DataError(f"catalogue {args.catalog!r} lacks an 'image' column")
    folder = Path(args.catalog).resolve().parent
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ids = list(table["id"])
    images, masks, labels, sigmas, good, problems = [], [], [], [], [], {}
    for i, row in enumerate(table):
        try:
            path = _path(folder, row["image"])
            if path is None:
                raise DataError("no image file")
            image = read_image(path)
            sig = _path(folder, row["sigma"]) if "sigma" in table.colnames else None
            msk = _path(folder, row["mask"]) if "mask" in table.colnames else None
            lab = _label(row["mask_label"]) if "mask_label" in table.colnames else None
            images.append(image)
            sigmas.append(read_image(sig) if sig else None)
            masks.append(read_image(msk) if msk else None)
            labels.append(lab if msk else None)
            good.append(i)
        except DataError as exc:
            problems[i] = str(exc)
    t0 = time.perf_counter()
    opts = MorphologyOptions(asym_xtol=args.asym_xtol, mid=args.mid)
    det = DetectOptions(nsigma=args.nsigma, npixels=args.npixels)
    part = morphology_columns(images, masks, [ids[i] for i in good], labels,
                              sigmas if any(s is not None for s in sigmas) else None, gain=args.gain, options=opts,
                              detect_options=det, device=args.device, dtype=_DTYPES[args.dtype],
                              batch_size=args.batch_size, workers=args.workers)
    result = _in_catalogue_order(part, ids, good, problems)
    from .. import __version__

    result.meta.update({"galprof": __version__, "catalog": str(args.catalog), "device": str(args.device),
                        "dtype": args.dtype, "date": time.strftime("%Y-%m-%dT%H:%M:%S")})
    result.write(out / "morphology.fits", overwrite=True)
    result.write(out / "morphology.csv", format="ascii.csv", overwrite=True)
    flags = np.asarray(result["morph_flag"])
    log.info("morphology of %d galaxies in %.1f s: %d not measured, %d flagged", len(result),
             time.perf_counter() - t0, int(np.sum(flags & int(MorphFlag.NO_DATA) != 0)), int(np.sum(flags != 0)))
    return 0


def _in_catalogue_order(part: Table, ids: list, good: list[int], problems: dict[int, str]) -> Table:
    """Rows of ``part`` (the loadable galaxies) and flagged rows for the others, in catalogue order."""
    n = len(ids)
    result = Table()
    result["id"] = ids
    flag = np.full(n, int(MorphFlag.NO_DATA), dtype=np.int64)
    message = [f"bad: {problems.get(i, 'not measured')}" for i in range(n)]
    flag[good] = np.asarray(part["morph_flag"])
    for k, i in enumerate(good):
        message[i] = part["morph_message"][k]
    result["morph_flag"] = flag
    result["morph_message"] = message
    for key in [k for k in part.colnames if k in COLUMNS or k in MID_COLUMNS]:
        col = np.full(n, np.nan)
        col[good] = np.asarray(part[key], dtype=float)
        result[key] = col
        if part[key].unit is not None:
            result[key].unit = part[key].unit
    result.meta.update(part.meta)
    return result
