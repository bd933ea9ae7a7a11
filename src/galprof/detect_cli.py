"""``galprof detect`` and ``galprof fit IMAGE.fits``: detection products, and zero-touch fits.

Registered by :mod:`galprof.cli`. ``galprof detect IMAGE.fits ... --out DIR`` writes, per image,
the detection catalogue, the segmentation map, the automatic mask and a one-row catalogue of
starting values (for ``galprof fit MODEL --catalog``); ``galprof fit IMAGE.fits --psf PSF.fits``
does the same and fits a single Sérsic + sky (plus any neighbours fitted as components) with the
survey pipeline, writing its tables to ``--out``. See docs/automation.md.
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from .detect import DetectOptions, auto_inputs, psf_radii
from .errors import DataError
from .fitting.result import column
from .io.fits import read_image, read_image_and_header
from .model import Model, load_model

log = logging.getLogger("galprof")

__all__ = ["IMAGE_SUFFIXES", "add_detect_options", "add_parser", "default_model", "is_image", "run",
           "run_image_fit", "detect_options"]

IMAGE_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fz")
_HDU = re.compile(r"^(?P<path>.*)\[[^\]]+\]$")
#: header keywords read for the zeropoint when --zeropoint is not given
ZEROPOINT_KEYWORDS = ("MAGZP", "MAGZPT", "ZEROPT", "MAGZERO", "ZP")


def is_image(spec: str) -> bool:
    """Whether a command-line argument names a FITS image (rather than a YAML model)."""
    m = _HDU.match(spec)
    name = (m.group("path") if m else spec).lower()
    return name.endswith(IMAGE_SUFFIXES)


def default_model(zeropoint: float = 0.0) -> Model:
    """The model of ``galprof fit IMAGE.fits``: one Sérsic (``galaxy``; re in [0.3, 500] px, n in
    [0.3, 8]) and a free flat sky (``sky``); its values are replaced by the measured starts."""
    return load_model({"zeropoint": float(zeropoint), "components": {
        "galaxy": {"profile": "sersic", "x0": 1.0, "y0": 1.0, "mag": 20.0, "re": {"value": 5.0, "bounds": [0.3, 500.0]},
                   "n": {"value": 2.0, "bounds": [0.3, 8.0]}, "q": 0.7, "pa": 0.0},
        "sky": {"profile": "sky", "sky": 0.0}}})


def add_detect_options(parser: argparse.ArgumentParser) -> None:
    """The detection settings shared by ``galprof detect`` and ``galprof fit``."""
    d = DetectOptions()
    g = parser.add_argument_group("automatic detection, masks and starts (docs/automation.md)")
    g.add_argument("--detect-thresh", type=float, default=d.thresh,
                   help="detection threshold in background RMS (default %(default)s)")
    g.add_argument("--detect-minarea", type=int, default=d.minarea,
                   help="smallest source, pixels (default %(default)s)")
    g.add_argument("--deblend-cont", type=float, default=d.deblend_cont,
                   help="deblending minimum contrast (default %(default)s)")
    g.add_argument("--back-size", type=int, default=d.back_size, help="background mesh, pixels (default %(default)s)")
    g.add_argument("--mask-dilate", type=float, default=d.dilate,
                   help="growth of masked segments, pixels (default %(default)s)")
    g.add_argument("--mask-wings", type=float, default=d.wings,
                   help="also mask where other sources' extrapolated light exceeds this many background RMS "
                        "(0: off; default %(default)s)")
    g.add_argument("--target-radius", type=float, default=d.target_radius,
                   help="the target is the segment under the position, else the nearest source within this many "
                        "pixels (default %(default)s)")


def add_fit_options(parser: argparse.ArgumentParser) -> None:
    """``galprof fit``'s options for automatic inputs (and for fitting one image)."""
    a = parser.add_argument_group("automatic inputs (docs/automation.md)")
    a.add_argument("--auto-starts", action=argparse.BooleanOptionalAction, default=None,
                   help="measure the start of every free parameter the catalogue does not give (default: on when "
                        "sep is installed)")
    a.add_argument("--auto-mask", action=argparse.BooleanOptionalAction, default=None,
                   help="mask the other sources of galaxies without a mask (default: on when sep is installed)")
    a.add_argument("--x", type=float, help="image mode: target x, FITS pixels (default: the image centre)")
    a.add_argument("--y", type=float, help="image mode: target y, FITS pixels (default: the image centre)")
    a.add_argument("--fit-neighbours", type=int, default=0, metavar="N",
                   help="image mode: up to N bright overlapping neighbours become Sersic components (nb1..) "
                        "instead of being masked (default 0)")
    a.add_argument("--init", choices=["auto", "moments", "nn"], default="moments",
                   help="starting values of the automatic starts: moments (galprof.detect's measurements; default), "
                        "nn (the neural network of galprof.nn) or auto (the network where the stamp matches its "
                        "training survey: docs/nn_init.md)")
    a.add_argument("--init-weights", metavar="WEIGHTS.pt",
                   help="weights of the networks from galprof train-init (default: the shipped SDSS-like weights)")
    add_detect_options(parser)


def detect_options(args, *, mask_mode: str = "background", neighbours: int = 0) -> DetectOptions:
    o = DetectOptions(thresh=args.detect_thresh, minarea=args.detect_minarea, deblend_cont=args.deblend_cont,
                      back_size=args.back_size, dilate=args.mask_dilate, wings=args.mask_wings,
                      target_radius=args.target_radius, mask_mode=mask_mode, neighbours=neighbours)
    o.validate()
    return o


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``galprof detect``."""
    p = subparsers.add_parser(
        "detect", help="detect sources; write the detection catalogue, segmentation map, mask and starting values",
        description="For each image: background, sep detection and deblending, the target (the source at --x --y, "
                    "default the image centre), its mask and its starting values. Writes to --out: "
                    "<name>_detections.csv, <name>_seg.fits, <name>_mask.fits and <name>_catalog.csv (a catalogue "
                    "row for galprof fit MODEL --catalog). See docs/automation.md.")
    p.add_argument("images", nargs="+", help="FITS images (file.fits[N] selects an HDU)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", help="YAML model whose starting values to write (default: single Sersic + sky)")
    p.add_argument("--psf", help="PSF image (for the PSF corrections of the starting values)")
    p.add_argument("--sigma", help="sigma map (default: from the background RMS, and --gain)")
    p.add_argument("--mask", help="bad-pixel mask (nonzero = bad): not detected on, kept masked")
    p.add_argument("--gain", type=float, help="electrons per image unit (Poisson term of the automatic sigma map)")
    p.add_argument("--x", type=float, help="target x, FITS pixels (default: the image centre)")
    p.add_argument("--y", type=float, help="target y, FITS pixels (default: the image centre)")
    p.add_argument("--zeropoint", type=float, help="magnitude zeropoint (default: the header's MAGZP, ZEROPT..., "
                                                   "else the model's)")
    p.add_argument("--mask-mode", choices=["background", "exclusive"], default="background")
    p.add_argument("--fit-neighbours", type=int, default=0, metavar="N",
                   help="up to N bright overlapping neighbours become model components (nb1..) instead of masked")
    add_detect_options(p)
    return p


@dataclass
class _Products:
    catalog_row: dict
    model: Model
    stem: str


def _stem(spec: str) -> str:
    m = _HDU.match(spec)
    name = Path(m.group("path") if m else spec).name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _absolute(spec: str) -> str:
    """``spec`` with its file path made absolute (an HDU suffix kept)."""
    m = _HDU.match(spec)
    path = m.group("path") if m else spec
    return str(Path(path).resolve()) + spec[len(path):]


def _zeropoint(args, header, model: Model | None) -> float:
    if getattr(args, "zeropoint", None) is not None:
        return float(args.zeropoint)
    for key in ZEROPOINT_KEYWORDS:
        if header is not None and key in header:
            try:
                return float(header[key])
            except (TypeError, ValueError):
                raise DataError(f"header {key} = {header[key]!r} is not a number") from None
    return model.zeropoint if model is not None else 0.0


def detect_one(spec: str, out: Path, args, *, model: Model | None, options: DetectOptions) -> _Products:
    """Detection products of one image, written to ``out``; returns its catalogue row and model."""
    image, header = read_image_and_header(spec)
    zp = _zeropoint(args, header, model)
    base = model if model is not None else default_model(zp)
    if model is not None and zp != model.zeropoint:
        base = Model(model.components, zp)
    sigma = read_image(args.sigma) if args.sigma else None
    bad = (read_image(args.mask) != 0) if args.mask and args.mask != "nn" else None
    psf = read_image(args.psf) if args.psf else None
    for name, arr in (("sigma", sigma), ("mask", bad)):
        if arr is not None and arr.shape != image.shape:
            raise DataError(f"--{name} has shape {arr.shape}, the image {image.shape}")
    position = None
    if (args.x is None) != (args.y is None):
        raise DataError("give both --x and --y (or neither: the image centre)")
    if args.x is not None:
        position = (args.x, args.y)
    r = auto_inputs(image, model=base, sigma=sigma, mask=bad, psf=psf, position=position, options=options,
                    psf_stats=psf_radii(psf), gain=args.gain)
    init, mask_nn = getattr(args, "init", "moments"), args.mask == "nn"
    if init != "moments" or mask_nn:
        from .nn.hook import network_inputs
        from .nn.infer import load_predictor

        mask, starts, notes = network_inputs(
            load_predictor(getattr(args, "init_weights", None)), image=image,
            sigma=sigma if sigma is not None else r.sigma, bad=bad, psf=psf, auto=r, model=r.model, init=init,
            mask_nn=mask_nn, pixel_scale=getattr(args, "pixel_scale", None))
        r.mask, r.starts = mask, starts
        for note in notes:
            log.info("%s: %s", _stem(spec), note)
    stem = _stem(spec)
    out.mkdir(parents=True, exist_ok=True)
    det = r.detection
    table = det.table(zeropoint=zp)
    table.write(out / f"{stem}_detections.csv", overwrite=True)
    fits.PrimaryHDU(det.segmap.astype(np.int32)).writeto(out / f"{stem}_seg.fits", overwrite=True)
    full_mask = r.mask | det.bad
    hdu = fits.PrimaryHDU(full_mask.astype(np.uint8))
    hdu.header["MASKMODE"] = (options.mask_mode, "background or exclusive")
    hdu.header["DILATE"] = (options.dilate, "segment growth, px")
    hdu.header["WINGS"] = (options.wings, "wings mask level, background RMS")
    hdu.header["TARGET"] = (det.target, "target label in the seg map (0: none)")
    hdu.writeto(out / f"{stem}_mask.fits", overwrite=True)
    row = {"id": stem, "image": _absolute(spec), "mask": str((out / f"{stem}_mask.fits").resolve()), "zeropoint": zp}
    if args.psf:
        row["psf"] = _absolute(args.psf)
    if args.sigma:
        row["sigma"] = _absolute(args.sigma)
    if r.sigma is not None:
        fits.PrimaryHDU(r.sigma.astype(np.float32)).writeto(out / f"{stem}_sigma.fits", overwrite=True)
        row["sigma"] = str((out / f"{stem}_sigma.fits").resolve())
    for key, value in r.starts.items():
        row[column(key)] = value
    if r.target is not None:
        t = r.target
        log.info("%s: %d sources; target %d at (%.2f, %.2f): mag %.2f, re %.2f px, n %.2f, q %.2f, PA %.1f, "
                 "sky %.4g, S/N %.0f%s", stem, len(det.objects), det.target, t.x, t.y, t.mag(zp), t.re, t.n, t.q,
                 t.pa, t.sky, t.snr, f"; {len(r.neighbours)} neighbour(s) fitted" if r.neighbours else "")
    else:
        log.warning("%s: %s", stem, "; ".join(r.notes))
    return _Products(catalog_row=row, model=r.model, stem=stem)


def _write_row(row: dict, path: Path) -> None:
    t = Table(rows=[row], names=list(row))
    t.write(path, overwrite=True)


def run(args) -> int:
    """``galprof detect``."""
    out = Path(args.out)
    model = load_model(args.model) if args.model else None
    options = detect_options(args, mask_mode=args.mask_mode, neighbours=args.fit_neighbours)
    for spec in args.images:
        if not is_image(spec):
            raise DataError(f"{spec!r} is not a FITS image (.fits, .fit, .fts, .fits.gz, .fz)")
        prod = detect_one(spec, out, args, model=model, options=options)
        _write_row(prod.catalog_row, out / f"{prod.stem}_catalog.csv")
        if prod.model is not model and len(prod.model.components) != len((model or default_model()).components):
            import yaml

            (out / f"{prod.stem}_model.yaml").write_text(yaml.safe_dump(prod.model.to_dict(), sort_keys=False))
        log.info("wrote %s_{detections.csv,seg.fits,mask.fits,catalog.csv} to %s", prod.stem, out)
    return 0


def run_image_fit(args) -> int:
    """``galprof fit IMAGE.fits``: detection products in ``OUT/detect``, then the pipeline on
    the one-row catalogue they make."""
    from .catalog import Catalog, InputOptions
    from .cli import run_fit

    spec = args.model
    if args.catalog:
        raise DataError("galprof fit IMAGE.fits takes no --catalog (give a model file to fit a catalogue)")
    for name in ("image", "weight", "cutout"):
        if getattr(args, name, None) is not None:
            raise DataError(f"--{name} is not used by galprof fit IMAGE.fits")
    if args.auto_starts is False or args.auto_mask is False:
        raise DataError("galprof fit IMAGE.fits measures its starts and mask; to give them, use a model file and "
                        "a catalogue")
    out = Path(args.out) if args.out else Path(f"galprof_{_stem(spec)}")
    options = detect_options(args, mask_mode=args.mask_mode, neighbours=args.fit_neighbours)
    prod = detect_one(spec, out / "detect", args, model=None, options=options)
    cat_path = out / "detect" / f"{prod.stem}_catalog.csv"
    _write_row(prod.catalog_row, cat_path)
    row = Table(rows=[prod.catalog_row], names=list(prod.catalog_row))
    inputs = InputOptions(gain=args.gain, auto_starts=False, auto_mask=False)
    catalog = Catalog(cat_path, prod.model, inputs, table=row)
    code = run_fit(args, prod.model, catalog, f"automatic ({spec})", out)
    results = out / "results.csv"
    if code == 0 and results.is_file():
        t = Table.read(results)
        parts = [f"{p} = {float(t['galaxy_' + p][0]):.4g} +- {float(t['galaxy_' + p + '_err'][0]):.2g}"
                 for p in ("x0", "y0", "mag", "re", "n", "q", "pa")]
        log.info("%s: %s (%s)", prod.stem, ", ".join(parts), t["status"][0])
    return code
