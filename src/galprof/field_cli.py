"""``galprof fit MODEL.yaml --image FIELD.fits --field``: fit every source of a field together.

Registered by :mod:`galprof.cli`. The model's non-sky components are the template copied for
every source; its sky components are shared by the field (:mod:`galprof.field`). Sources and
their starts come from ``--catalog`` (columns ``x``, ``y`` and any ``<component>_<param>``)
or, without one, from detection in the image (:func:`galprof.field.field_sources`). Writes
``results.csv`` / ``results.fits`` (one row per source) and ``field.fits`` (data, model,
residual, sigma, mask) to ``--out``. See docs/field.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from astropy.io import fits
from astropy.table import Table

from .errors import DataError
from .fitting.lm import LMOptions
from .io.fits import read_image, read_image_and_header
from .io.tables import TABLE_FORMATS, atomic_path, check_format, read_table, write_table

log = logging.getLogger("galprof")

__all__ = ["add_field_options", "run_field_fit"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def add_field_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("fields (docs/field.md)")
    g.add_argument("--field", action="store_true",
                   help="fit every source of --image (or of the FITS image given instead of a model) together, "
                        "with a shared sky: one component per source, from --catalog positions or from detection")
    g.add_argument("--window-flux", type=float, default=0.999,
                   help="fields: largest fraction of each source's light its window holds (default %(default)s)")
    g.add_argument("--field-rounds", type=int, default=2,
                   help="fields without a catalogue: detection rounds; each after the first adds the sources found "
                        "on the residual image and fits again (default %(default)s)")
    g.add_argument("--window-level", type=float, default=0.005,
                   help="fields: windows end where a source falls below this many sigma per pixel, holding at "
                        "least 80%% of its light (0: by --window-flux alone; default %(default)s)")


def _sky_and_sigma(image, mask, args, header):
    """sigma map when none is given: the background RMS (from detection) and, with a gain,
    the sources' Poisson noise."""
    from .detect import background_sigma, estimate_background

    bkg = estimate_background(image, mask)
    gain = args.gain if args.gain is not None else header.get("GAIN") if header is not None else None
    return background_sigma(image, bkg, float(gain) if gain else None), bkg


def run_field_fit(args, model) -> int:
    """Run ``galprof fit ... --field``; ``model`` is the loaded model (template + skies)."""
    from .detect_cli import detect_options
    from .field import FieldOptions, fit_field, fit_field_auto

    if args.out is None:
        raise DataError("--field needs --out")
    if args.image is None:
        raise DataError("--field needs the field image (--image FIELD.fits, or the image in place of the model)")
    formats = list(dict.fromkeys(f.strip() for item in (args.format or ["fits,csv"]) for f in item.split(",")
                                 if f.strip()))
    for fmt in formats:
        check_format(fmt)        # an unknown format or a missing writer: an error before the fit
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image, header = read_image_and_header(args.image)
    image = np.asarray(image, dtype=np.float64)
    mask = read_image(args.mask) != 0 if args.mask else None
    sigma = None
    if args.sigma:
        sigma = np.asarray(read_image(args.sigma), dtype=np.float64)
    elif args.weight:
        w = np.asarray(read_image(args.weight), dtype=np.float64)
        with np.errstate(divide="ignore"):
            sigma = np.where(w > 0, 1.0 / np.sqrt(np.where(w > 0, w, 1.0)), np.nan)
    notes = []
    if sigma is None:
        sigma, bkg = _sky_and_sigma(image, mask, args, header)
        notes.append(f"sigma from the background RMS ({bkg.sigma:.4g})")
    for name, arr in (("sigma", sigma), ("mask", mask)):
        if arr is not None and arr.shape != image.shape:
            raise DataError(f"the {name} map's shape {arr.shape} differs from the image's {image.shape}")
    psf = np.asarray(read_image(args.psf), dtype=np.float64) if args.psf else None
    if args.zeropoint is not None:
        from .model import Model

        model = Model(model.components, float(args.zeropoint))
    t0 = time.perf_counter()
    detection = None
    if args.catalog:
        cat = read_table(args.catalog)
        for c in ("x", "y"):
            if c not in cat.colnames:
                raise DataError(f"{args.catalog}: a field catalogue needs columns x and y (FITS pixels)")
        from .field import split_model

        template, _ = split_model(model)
        lay = template.layout(1)
        sources = {}
        for key in lay.free:
            col = key.replace(".", "_")
            kind = lay.spec(key).kind
            if col in cat.colnames:
                sources[key] = np.asarray(cat[col], dtype=np.float64)
            elif kind in ("x", "y"):
                sources[key] = np.asarray(cat[kind], dtype=np.float64)
        ids = list(cat["id"]) if "id" in cat.colnames else list(range(1, len(cat) + 1))
    lm = LMOptions(max_iter=args.max_iter, chi2_atol=0.01) if args.max_iter else None
    uncertainty = args.uncertainty if args.uncertainty in ("covariance", "none") else None
    if uncertainty is None:
        raise DataError(f"--uncertainty {args.uncertainty} is not available for fields (covariance or none)")
    if args.field_rounds < 1:
        raise DataError("--field-rounds must be at least 1")
    options = FieldOptions(window_flux=args.window_flux, window_level=args.window_level or None)
    common = dict(psf_kind=args.psf_kind, psf_oversampling=args.psf_oversampling, options=options, lm_options=lm,
                  uncertainty=uncertainty, dtype=_DTYPES[args.dtype], device=args.device)
    t_detect = time.perf_counter() - t0
    if args.catalog:
        log.info("field %s: %d sources from the catalogue, %d x %d pixels", args.image, len(ids), image.shape[1],
                 image.shape[0])
        res = fit_field(model, image, sigma, mask, psf, sources=sources, ids=ids, **common)
    else:
        res, more, detection = fit_field_auto(model, image, sigma, mask, psf, rounds=args.field_rounds,
                                              detect_options=detect_options(args), **common)
        notes += more
        ids = list(res.result.ids)
    t_fit = time.perf_counter() - t0 - t_detect
    table: Table = res.to_table()
    table.meta.update(image=str(args.image), psf=str(args.psf or ""), n_sources=len(ids),
                      fit_seconds=round(t_fit, 3))
    for fmt in formats:
        write_table(table, out / f"results{TABLE_FORMATS[fmt]}", fmt)
    hdus = [fits.PrimaryHDU()]
    for name, arr in (("DATA", image), ("MODEL", res.model_image), ("RESIDUAL", res.residual_image),
                      ("SIGMA", sigma)):
        hdus.append(fits.ImageHDU(np.asarray(arr, dtype=np.float32), name=name))
    if mask is not None:
        hdus.append(fits.ImageHDU(mask.astype(np.uint8), name="MASK"))
    if detection is not None:
        hdus.append(fits.ImageHDU(detection.segmap.astype(np.int32), name="SEGMAP"))
    with atomic_path(out / "field.fits") as tmp:
        fits.HDUList(hdus).writeto(tmp, overwrite=True)
    summary = {"n_sources": len(ids), "status": str(table["status"][0]), "chi2_nu": float(table["chi2_nu"][0]),
               "n_iter": int(table["n_iter"][0]), "seconds": t_fit,
               "passes": res.passes, "notes": notes}
    with atomic_path(out / "summary.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=1))
    log.info("field fit: %s, chi2_nu %.4g, %d iterations, %.1f s; wrote %s", summary["status"], summary["chi2_nu"],
             summary["n_iter"], t_fit, out)
    for n in notes:
        log.info("%s", n)
    return 0
