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

from . import __version__, fitting
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
    f = sub.add_parser("fit", help="fit a model to the galaxies of a catalogue (streaming, resumable)",
                       description="Fit MODEL to every galaxy of a catalogue; write result tables (and image "
                                   "blocks) to --out DIR. Re-running the same command resumes. See docs/pipeline.md.")
    f.add_argument("model", help="YAML model file (its values are the fallback starting values), or a FITS image: "
                   "galprof fit IMAGE.fits [--psf PSF.fits] fits a single Sersic + sky to the source at the image "
                   "centre with automatic mask and starts (docs/automation.md)")
    f.add_argument("--catalog",
                   help="CSV, ECSV, FITS or Parquet table: id, image, and optional sigma or weight, psf, mask, "
                        "mask_label, mask_mode, zeropoint, pixel_scale, gain, read_noise, sky, exptime, ncombine, "
                        "x, y or ra, dec, cutout_size and <component>_<param> columns (paths relative to the "
                        "catalogue's folder; file.fits[N] selects an HDU)")
    f.add_argument("--out", help="output folder (results.*, parts/, images/, galprof.log); required with a catalogue, "
                                 "default galprof_<name> for an image")
    f.add_argument("--format", action="append", metavar="FMT",
                   help="result table format(s): fits, csv, parquet, h5 (comma-separated or repeated; "
                        "default fits,csv)")
    f.add_argument("--save-images", action="store_true",
                   help="write an image block per galaxy (images/<id>.fits: data, model, residual, sigma, mask, "
                        "one HDU per component)")
    f.add_argument("--plots", action="store_true",
                   help="write a diagnostic PNG per galaxy (plots/<id>.png: data, model, residual, mask, surface-"
                        "brightness profiles) and the catalogue's plots (plots/catalog/); needs galprof[plots]")
    f.add_argument("--resume", action="store_true",
                   help="resume a previous run in --out (the default whenever its model and options match)")
    f.add_argument("--overwrite", action="store_true", help="delete the previous results in --out first")
    f.add_argument("--retry-bad", action="store_true",
                   help="when resuming, fit again the galaxies whose input was bad (e.g. after fixing files)")
    g = f.add_argument_group("inputs (defaults for rows without the column)")
    g.add_argument("--image", help="one (large) image for every row: sources are cut out of it (see --cutout)")
    g.add_argument("--sigma", help="sigma map (same shape as the image)")
    g.add_argument("--weight", help="weight map, 1/sigma^2 (0 = no data)")
    g.add_argument("--mask", help="mask (nonzero = bad) or segmentation map (with mask_label); 'nn': the automatic "
                                  "mask of the other sources from the mask network (docs/nn_init.md)")
    g.add_argument("--mask-mode", choices=["background", "exclusive"], default="background",
                   help="with mask_label: mask the other sources (background) or all but the target (exclusive)")
    g.add_argument("--psf", help="PSF for every galaxy without a psf column")
    g.add_argument("--psf-kind", choices=PSF_KINDS, default="star")
    g.add_argument("--psf-oversampling", type=int, default=1)
    g.add_argument("--zeropoint", type=float, help="magnitude zeropoint (default: the model's)")
    g.add_argument("--pixel-scale", type=float, help="arcsec per pixel (default: from the image's WCS, if any)")
    g.add_argument("--gain", type=float, help="e-/ADU, to make sigma maps (default: GAIN in the image header)")
    g.add_argument("--read-noise", type=float, help="e- per exposure (default: RDNOISE in the header, else 0)")
    g.add_argument("--sky", type=float, help="sky level subtracted from the images (default 0)")
    g.add_argument("--exptime", type=float, help="exposure time, for images in ADU/s (default 1)")
    g.add_argument("--ncombine", type=float, help="exposures averaged per image (default: NCOMBINE, else 1)")
    g.add_argument("--cutout", type=_cutout_size, metavar="SIZE|auto",
                   help="cut a SIZE x SIZE stamp (or one sized from the starting radii: auto) around each "
                        "source's x, y or ra, dec; default auto with --image")
    g.add_argument("--cutout-factor", type=float, default=8.0,
                   help="auto cutouts: 2 ceil(factor r) + 1 pixels, r the largest starting radius (default 8)")
    g.add_argument("--cutout-min", type=int, default=33, help="auto cutouts: smallest size (default 33)")
    g.add_argument("--cutout-max", type=int, default=255, help="auto cutouts: largest size (default 255)")
    from .detect_cli import add_fit_options

    add_fit_options(f)
    h = f.add_argument_group("fitting")
    h.add_argument("--device", default="cpu")
    h.add_argument("--dtype", choices=sorted(_DTYPES), default="float64")
    h.add_argument("--batch-size", type=int, default=64)
    h.add_argument("--optimizer", choices=list(getattr(fitting, "OPTIMIZERS", ("lm", "adam"))), default="lm")
    h.add_argument("--jacobian", choices=["autodiff", "finite-difference"], default="finite-difference")
    h.add_argument("--uncertainty", choices=list(getattr(fitting, "UNCERTAINTIES", ("covariance", "bootstrap",
                                                                                    "none"))),
                   default="covariance")
    h.add_argument("--bootstrap-samples", type=int, default=100)
    h.add_argument("--statistic", choices=list(getattr(fitting, "STATISTICS", ("chi2", "cash"))), default="chi2")
    h.add_argument("--restarts", type=int, default=0)
    h.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and restarts (default 0)")
    h.add_argument("--max-iter", type=int, help="iteration cap (default: the optimiser's)")
    r = f.add_argument_group("running")
    r.add_argument("--read-threads", type=int, default=2, help="threads reading files ahead of the fit (default 2)")
    r.add_argument("--cluster", metavar="ADDRESS",
                   help="fit the batches on the workers of a running Dask scheduler (tcp://host:8786); "
                        "see docs/pipeline.md (needs galprof[dask])")
    r.add_argument("--workers", type=int, metavar="N",
                   help="fit the batches on a local Dask cluster of N worker processes (one thread each)")
    r.add_argument("--retries", type=int, default=2,
                   help="with --cluster/--workers: times a failed batch is tried again (default 2)")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when it is a terminal)")
    m = f.add_argument_group("morphology")
    m.add_argument("--morphology", action="store_true",
                   help="add statmorph's non-parametric statistics (concentration, asymmetry, smoothness, Gini, "
                        "M20, radii; docs/morphology.md) to the fit table, measured in float64 on --device")
    m.add_argument("--morphology-mid", action="store_true",
                   help="with --morphology: also the MID statistics (multimode, intensity, deviation; needs scipy "
                        "and scikit-image)")
    from .field_cli import add_field_options

    add_field_options(f)
    from .morphology.cli import add_parser as add_morph_parser

    add_morph_parser(sub)
    from .detect_cli import add_parser as add_detect_parser

    add_detect_parser(sub)
    from .nn.cli import add_parser as add_train_init_parser

    add_train_init_parser(sub)
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


def _cutout_size(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size in pixels or 'auto', got {text!r}") from None


def _fit(args) -> int:
    from .catalog import Catalog, InputOptions
    from .detect_cli import detect_options, is_image, run_image_fit

    if args.resume and args.overwrite:
        raise GalprofError("--resume and --overwrite contradict each other; give one")

    if args.field:
        from .detect_cli import default_model
        from .field_cli import run_field_fit

        if is_image(args.model):
            if args.image is not None:
                raise GalprofError("give the field image once: galprof fit FIELD.fits --field, or "
                                   "galprof fit MODEL.yaml --image FIELD.fits --field")
            args.image = args.model
            return run_field_fit(args, default_model(0.0 if args.zeropoint is None else args.zeropoint))
        return run_field_fit(args, load_model(args.model))
    if is_image(args.model):
        return run_image_fit(args)
    if args.catalog is None or args.out is None:
        raise GalprofError("galprof fit MODEL.yaml needs --catalog and --out (or give a FITS image to fit it alone)")
    for name in ("x", "y"):
        if getattr(args, name) is not None:
            raise GalprofError(f"--{name} is for galprof fit IMAGE.fits; a catalogue gives positions in x, y columns")
    model = load_model(args.model)
    cutout = args.cutout if args.cutout is not None else ("auto" if args.image else None)
    mask_nn = args.mask == "nn"
    inputs = InputOptions(image=args.image, sigma=args.sigma, weight=args.weight, psf=args.psf,
                          mask=None if mask_nn else args.mask, init=args.init, mask_nn=mask_nn,
                          nn_weights=args.init_weights,
                          mask_mode=args.mask_mode, zeropoint=args.zeropoint, pixel_scale=args.pixel_scale,
                          gain=args.gain, read_noise=args.read_noise, sky=args.sky, exptime=args.exptime,
                          ncombine=args.ncombine, cutout=cutout, cutout_factor=args.cutout_factor,
                          cutout_min=args.cutout_min, cutout_max=args.cutout_max, auto_starts=args.auto_starts,
                          auto_mask=args.auto_mask,
                          detect=detect_options(args, mask_mode=args.mask_mode, neighbours=args.fit_neighbours))
    catalog = Catalog(args.catalog, model, inputs)
    return run_fit(args, model, catalog, str(args.model), args.out)


def run_fit(args, model, catalog, model_source: str, out) -> int:
    """The fit part of ``galprof fit``: options from ``args``, then the pipeline (also used by
    ``galprof fit IMAGE.fits``)."""
    from .pipeline import FitOptions, Interrupted, PipelineOptions, run_pipeline

    formats = [f.strip() for item in (args.format or ["fits,csv"]) for f in item.split(",") if f.strip()]
    fit_options = FitOptions(dtype=args.dtype, device=args.device, psf_kind=args.psf_kind,
                             psf_oversampling=args.psf_oversampling, jacobian=args.jacobian,
                             optimizer=args.optimizer, max_iter=args.max_iter, uncertainty=args.uncertainty,
                             n_bootstrap=args.bootstrap_samples, seed=args.seed, statistic=args.statistic,
                             restarts=args.restarts)
    options = PipelineOptions(out=out, formats=formats, save_images=args.save_images, plots=args.plots,
                              batch_size=args.batch_size, read_threads=args.read_threads, overwrite=args.overwrite,
                              retry_bad=args.retry_bad, progress=args.progress, fit=fit_options)
    # extra per-galaxy columns plug in here: run_pipeline(..., hooks=[...])
    hooks = []
    if args.morphology:
        from .morphology.hook import catalog_segmaps, morphology_hook
        from .morphology.measure import MorphologyOptions

        if args.morphology_mid:  # a missing dependency stops the run before it starts
            from .morphology.mid import require_option

            require_option("--morphology-mid")
        opts = MorphologyOptions(mid=args.morphology_mid)
        hooks.append(morphology_hook(options=opts, gain=args.gain, device=args.device,
                                     segmaps=catalog_segmaps(catalog)))
    cluster = None
    if args.cluster is not None or args.workers is not None:
        from .pipeline.distributed import ClusterOptions

        cluster = ClusterOptions(address=args.cluster, n_workers=args.workers, retries=args.retries)
        cluster.validate()
    try:
        run_pipeline(model, catalog, options, model_source=model_source, hooks=hooks, cluster=cluster)
    except Interrupted as exc:
        print(f"galprof: {exc}", file=sys.stderr)
        return 130
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
        if args.command == "detect":
            from .detect_cli import run as run_detect

            return run_detect(args)
        if args.command == "train-init":
            from .nn.cli import run as run_train_init

            return run_train_init(args)
        if args.command == "fit":
            return _fit(args)
    except GalprofError as exc:
        print(f"galprof: error: {exc}", file=sys.stderr)
        return 2
    return 2


def entry_point() -> None:  # pragma: no cover - console script
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover - python -m galprof.cli
    entry_point()
