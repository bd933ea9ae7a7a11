"""Fitting the galaxies of a catalogue (the ``galprof fit`` command)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from astropy.table import Table, vstack

from .errors import DataError
from .fitting import LMOptions, fit
from .fitting.result import column
from .flags import Flag, Status
from .io.fits import read_image
from .model import load_model

log = logging.getLogger("galprof")

_FILE_COLUMNS = ("image", "sigma", "psf", "mask")


def read_catalog(path: str | os.PathLike) -> Table:
    """Read a CSV, ECSV or FITS catalogue; it needs ``id`` and ``image`` columns."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"catalogue {str(path)!r} does not exist")
    fmt = {".csv": "ascii.csv", ".ecsv": "ascii.ecsv", ".fits": "fits", ".fit": "fits"}.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"catalogue {str(path)!r}: use a .csv, .ecsv or .fits file")
    table = Table.read(path, format=fmt)
    missing = {"id", "image"} - set(table.colnames)
    if missing:
        raise DataError(f"catalogue {str(path)!r} lacks column(s) {sorted(missing)}")
    return table


def _load(row, folder: Path, name: str):
    if name not in row.colnames:
        return None
    value = row[name]
    if np.ma.is_masked(value) or str(value).strip() in ("", "--", "nan", "None"):
        return None
    spec = str(value).strip()
    path = spec if os.path.isabs(spec) else str(folder / spec)
    return read_image(path)


def fit_catalog(args) -> int:
    """Run ``galprof fit`` (see ``galprof fit --help``); returns the exit code."""
    model = load_model(args.model)
    table = read_catalog(args.catalog)
    folder = Path(args.catalog).resolve().parent
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = model.parameter_names
    overrides = {k: column(k) for k in keys if column(k) in table.colnames}
    unknown = [c for c in table.colnames if "_" in c and c not in overrides.values()
               and c not in ("mask_label",) and not c.endswith("_err")]
    if unknown:
        log.warning("catalogue columns not used: %s", ", ".join(unknown))
    default_psf = read_image(args.psf) if args.psf else None
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    results = []
    t0 = time.perf_counter()
    for start in range(0, len(table), args.batch_size):
        rows = table[start:start + args.batch_size]
        results.append(_fit_rows(model, rows, folder, overrides, default_psf, args, dtype))
        done = start + len(rows)
        log.info("%d/%d galaxies, %.2f galaxies/s", done, len(table), done / (time.perf_counter() - t0))
    result = vstack(results) if len(results) > 1 else results[0]
    result.meta.update({"galprof": _version(), "model": str(args.model), "device": args.device,
                        "dtype": args.dtype, "jacobian": args.jacobian, "psf_kind": args.psf_kind,
                        "date": time.strftime("%Y-%m-%dT%H:%M:%S")})
    result.write(out / "results.fits", overwrite=True)
    result.write(out / "results.csv", format="ascii.csv", overwrite=True)
    status = list(result["status"])
    log.info("fitted %d galaxies: %d converged, %d not converged, %d not fitted (bad input)", len(result),
             status.count("converged"), status.count("max_iter") + status.count("nonfinite"),
             status.count("bad_input"))
    return 0


def _version() -> str:
    from . import __version__

    return __version__


def _fit_rows(model, rows, folder, overrides, default_psf, args, dtype) -> Table:
    images, sigmas, masks, psfs, problems = [], [], [], [], []
    for row in rows:
        note = ""
        try:
            image = _load(row, folder, "image")
            sigma = _load(row, folder, "sigma")
            mask = _load(row, folder, "mask")
            psf = _load(row, folder, "psf")
            psf = default_psf if psf is None else psf
            if mask is not None and "mask_label" in row.colnames and not np.ma.is_masked(row["mask_label"]):
                mask = (mask != 0) & (mask != int(row["mask_label"]))
            for name, arr in (("sigma", sigma), ("mask", mask)):
                if arr is not None and arr.shape != image.shape:
                    raise DataError(f"{name} has shape {arr.shape}, the image {image.shape}")
        except DataError as exc:
            image, sigma, mask, psf, note = np.full((3, 3), np.nan), None, None, None, (Flag.NO_DATA, str(exc))
        images.append(image)
        sigmas.append(np.ones_like(image) if sigma is None else sigma)
        masks.append(mask)
        psfs.append(psf)
        problems.append(note)
    psf_arg = None
    if any(p is not None for p in psfs):
        # a galaxy without a PSF in a catalogue that has PSFs is not fitted (not a whole-run error)
        delta = np.ones((1, 1))
        for i, p in enumerate(psfs):
            if p is None:
                psfs[i] = delta
                images[i] = np.full_like(images[i], np.nan)
                if not problems[i]:
                    problems[i] = (Flag.BAD_PSF, "no PSF for this galaxy (psf column empty and no --psf)")
        psf_arg = psfs
    initial = {k: np.asarray(rows[c], dtype=float) for k, c in overrides.items()}
    res = fit(model, images, sigmas, masks, psf_arg, psf_kind=args.psf_kind,
              psf_oversampling=args.psf_oversampling, initial=initial, ids=list(rows["id"]),
              options=LMOptions(max_iter=args.max_iter), jacobian=args.jacobian, dtype=dtype,
              device=args.device)
    t = res.to_table()
    messages, status = list(t["message"]), list(t["status"])
    for i, note in enumerate(problems):
        if note:
            flag, text = note
            messages[i], status[i] = text, Status.BAD_INPUT.name.lower()
            t["flags"][i] = int(flag)
    t["message"], t["status"] = messages, status  # new columns: no truncation to the old widths
    if args.uncertainty == "none":
        for c in t.colnames:
            if c.endswith("_err"):
                t[c] = np.nan
    return t
