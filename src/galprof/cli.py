"""Command-line interface: ``galprof <command> ...``.

Every command is a thin layer over the library; :func:`main` takes ``argv`` and returns an
exit code (0 success, 2 bad input), so it is testable in-process.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import numpy as np
import torch

from . import __version__
from .errors import GalprofError
from .io.fits import read_image, write_model_image
from .model import load_model
from .render import PSF_KINDS, Renderer

log = logging.getLogger("galprof")

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="galprof", description="Fast, batched galaxy profile fitting.")
    p.add_argument("--version", action="version", version=f"galprof {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("render", help="render a model image (like IMFIT's makeimage)")
    r.add_argument("model", help="YAML model file")
    r.add_argument("--shape", nargs=2, type=int, metavar=("NY", "NX"), required=True,
                   help="image size in pixels (rows, columns)")
    r.add_argument("--psf", help="PSF image (FITS; file.fits[N] selects an HDU)")
    r.add_argument("--psf-kind", choices=PSF_KINDS, default="star",
                   help="star: the PSF is a star-like image that includes the pixel response (default); "
                        "optical: sampled at pixel centres, no pixel response")
    r.add_argument("--psf-oversampling", type=int, default=1, help="PSF sampling relative to the image")
    r.add_argument("--out", required=True, help="output FITS file")
    r.add_argument("--components", action="store_true", help="also write one HDU per component")
    r.add_argument("--device", default="cpu")
    r.add_argument("--dtype", choices=sorted(_DTYPES), default="float64")

    sub.add_parser("export", add_help=False, help="write a fitted galaxy as a GALFIT feedme: galprof export --galfit "
                   "RESULTS --id ID --out F.feedme (see galprof export --help)")
    sub.add_parser("plot", add_help=False, help="catalogue diagnostics of a results table: galprof plot RESULTS "
                   "--out DIR [--compare OTHER] (see galprof plot --help)")
    f = sub.add_parser("fit", help="fit a model to the galaxies of a catalogue")
    f.add_argument("model", help="YAML model file (its values are the starting values)")
    f.add_argument("--catalog", required=True,
                   help="CSV or FITS table: id, image, and optional sigma, psf, mask, mask_label and "
                        "<component>_<param> columns (paths relative to the catalogue's folder)")
    f.add_argument("--out", required=True, help="output folder (results.fits, results.csv)")
    f.add_argument("--psf", help="PSF for every galaxy without a psf column")
    f.add_argument("--psf-kind", choices=PSF_KINDS, default="star")
    f.add_argument("--psf-oversampling", type=int, default=1)
    f.add_argument("--device", default="cpu")
    f.add_argument("--dtype", choices=sorted(_DTYPES), default="float64")
    f.add_argument("--batch-size", type=int, default=64)
    f.add_argument("--optimizer", choices=["lm"], default="lm")
    f.add_argument("--jacobian", choices=["autodiff", "finite-difference"], default="autodiff")
    f.add_argument("--uncertainty", choices=["covariance", "none"], default="covariance")
    f.add_argument("--max-iter", type=int, default=100)
    from .morphology.cli import add_parser as add_morph_parser

    add_morph_parser(sub)
    return p


def _render(args) -> int:
    from astropy.io import fits

    model = load_model(args.model)
    psf = read_image(args.psf) if args.psf else None
    ny, nx = args.shape
    renderer = Renderer(model, [(ny, nx)], psf, psf_kind=args.psf_kind, psf_oversampling=args.psf_oversampling,
                        dtype=_DTYPES[args.dtype], device=args.device)
    values = renderer.values()
    image = renderer.crop(renderer(values), 0)
    cards = [("GALPROF", __version__, "galprof version"), ("MODEL", str(args.model)[-60:], "model file"),
             ("ZEROPT", model.zeropoint, "magnitude zeropoint"),
             ("PSFKIND", args.psf_kind if psf is not None else "none", "PSF kind"),
             ("PSFOVER", args.psf_oversampling, "PSF oversampling")]
    if args.psf:
        cards.append(("PSF", str(args.psf)[-60:], "PSF file"))
    for i, comp in enumerate(model.components, start=1):
        cards.append((f"COMP_{i}", comp.name, f"component {i} name"))
        cards.append((f"PROF_{i}", comp.profile.name, f"component {i} profile"))
        for s in comp.profile.params:
            v = float(values[f"{comp.name}.{s.name}"][0])
            cards.append((f"{i}_{s.name.upper()}"[:8], v, f"{comp.name}.{s.name} [{s.unit}]"))
    write_model_image(args.out, image, cards)
    if args.components:
        comps = renderer.components(values)
        with fits.open(args.out, mode="append") as hdul:
            for name, img in comps.items():
                hdul.append(fits.ImageHDU(renderer.crop(img, 0).astype(np.float32), name=name.upper()))
    log.info("wrote %s (%d x %d, total %.6g)", args.out, ny, nx, float(image.sum()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    from .single import single_command  # fit of a GALFIT feedme / IMFIT configuration, export

    command = single_command(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv) if command is None else None
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if command is not None:
            return command()
        if args.command == "morph":
            from .morphology.cli import run as run_morph

            return run_morph(args)
        if args.command == "render":
            return _render(args)
        if args.command == "fit":
            from .catalog import fit_catalog

            return fit_catalog(args)
    except GalprofError as exc:
        print(f"galprof: error: {exc}", file=sys.stderr)
        return 2
    return 2


def entry_point() -> None:  # pragma: no cover - console script
    sys.exit(main())
