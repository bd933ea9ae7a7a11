"""One image, one model: ``galprof fit FILE.feedme`` and ``galprof fit CONFIG.dat --image IMG.fits``,
and ``galprof export --galfit``.

The driver reads a GALFIT feedme (image, sigma, PSF, mask, fitting region, zero point, plate scale,
constraints) or an IMFIT configuration plus IMFIT's command-line options, cuts out the fitting
region (the centres of the model move with it; the renderer pads the region by the PSF's half-size
so that light from outside it is scattered in, so the convolution is the same as on the whole
image), fits with :func:`galprof.fit`, and writes the results in full-image coordinates.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from astropy.io.fits.verify import VerifyWarning

from .errors import DataError, ModelError
from .fitting import FitResult, LMOptions, fit
from .fitting.result import column
from .flags import Flag, Status
from .io.fits import read_image
from .io.galfit import (
    GalfitSetup,
    galfit_header_cards,
    is_feedme,
    mask_from_file,
    read_feedme,
    write_feedme,
    write_imgblock,
)
from .io.imfit import ImfitConfig, is_imfit_config, read_imfit_config
from .model import Component, Model, load_model
from .noise import sigma_from_gain
from .params import Parameter
from .render import PSF_KINDS, Renderer

log = logging.getLogger("galprof")

__all__ = ["SingleImage", "SingleFit", "from_feedme", "from_imfit", "fit_single", "fit_main", "export_main",
           "wants_single", "single_command"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class SingleImage:
    """Everything one fit needs, in full-image pixel coordinates.

    ``region`` is ``(xmin, xmax, ymin, ymax)`` (1-based, inclusive) or None for the whole image.
    """

    model: Model
    image: np.ndarray
    sigma: np.ndarray | None
    mask: np.ndarray | None
    psf: np.ndarray | None
    psf_kind: str = "optical"
    psf_oversampling: int = 1
    region: tuple[int, int, int, int] | None = None
    name: str = "galaxy"
    plate_scale: tuple[float, float] | None = None
    setup: GalfitSetup | None = None
    imfit: ImfitConfig | None = None
    meta: dict = field(default_factory=dict)

    @property
    def offset(self) -> tuple[int, int]:
        """(dx, dy): full-image pixel coordinate = region coordinate + offset."""
        if self.region is None:
            return 0, 0
        return self.region[0] - 1, self.region[2] - 1

    def cut(self, array: np.ndarray | None) -> np.ndarray | None:
        if array is None or self.region is None:
            return array
        x1, x2, y1, y2 = self.region
        return array[y1 - 1:y2, x1 - 1:x2]


@dataclass
class SingleFit:
    """A fit of one image: galprof's result (full-image coordinates) and the images of the region."""

    result: FitResult
    data: np.ndarray
    model_image: np.ndarray
    components: dict[str, np.ndarray]
    mask: np.ndarray | None
    sigma: np.ndarray | None
    fitted: bool = True

    @property
    def values(self) -> dict[str, float]:
        return {k: float(v[0]) for k, v in self.result.values.items()}

    @property
    def errors(self) -> dict[str, float]:
        return {k: float(v[0]) for k, v in self.result.errors.items()}


# ----------------------------------------------------------------------------------------------
# Inputs


def _normalised_psf(psf: np.ndarray | None, what: str) -> np.ndarray | None:
    if psf is None:
        return None
    total = float(np.sum(psf))
    if not np.isfinite(total) or total <= 0:
        return psf  # prepare_psf reports it
    if abs(total - 1.0) > 1e-3:
        log.info("%s sums to %.6g; normalised to unit sum (as GALFIT and IMFIT do)", what, total)
    return psf / total


def from_feedme(path: str | os.PathLike, *, psf_kind: str = "optical", gain: float | None = None,
                readnoise: float = 0.0, sky: float = 0.0, ncombined: int = 1) -> SingleImage:
    """A :class:`SingleImage` from a GALFIT feedme (images resolved relative to its folder).

    GALFIT builds a sigma image itself when ``C)`` is ``none``; galprof does not guess one: give
    ``gain`` (and ``readnoise``, ``sky``) to use IMFIT's recipe (:func:`galprof.noise.sigma_from_gain`),
    or a sigma image in the feedme.
    """
    fm = read_feedme(path)
    s = fm.setup
    image_path = s.path(s.image)
    if image_path is None:
        raise DataError(f"{path}: line A) names no input image")
    image = read_image(image_path)
    sigma_path = s.path(s.sigma)
    if sigma_path is not None:
        sigma = read_image(sigma_path)
        if sigma.shape != image.shape:
            raise DataError(f"sigma image {str(sigma_path)!r} has shape {sigma.shape}, the image {image.shape}")
    elif gain is not None:
        sigma = sigma_from_gain(image, gain=gain, read_noise=readnoise, sky=sky, ncombine=ncombined,
                                exptime=s.exptime)
        if s.min_sigma is not None:  # "C) none 0.1": sigma at least 0.1 times the data
            sigma = np.maximum(sigma, s.min_sigma * np.abs(image))
    else:
        raise DataError(f"{path}: C) gives no sigma image. GALFIT would build one from the image; galprof does "
                        "not guess it: give a sigma image, or --gain (and --readnoise, --sky) for IMFIT's "
                        "recipe sigma^2 = (data + sky) / gain + (readnoise / gain)^2")
    mask_path = s.path(s.mask)
    mask = None
    if mask_path is not None:
        if not mask_path.is_file():
            raise DataError(f"mask {str(mask_path)!r} (line F) does not exist")
        mask = mask_from_file(mask_path, image.shape)
    psf_path = s.path(s.psf)
    psf = _normalised_psf(read_image(psf_path), str(psf_path)) if psf_path is not None else None
    region = s.region
    if region is not None:
        ny, nx = image.shape
        if region[1] > nx or region[3] > ny:
            raise DataError(f"{path}: H) region {region} exceeds the image ({nx} x {ny} pixels)")
        if region == (1, nx, 1, ny):
            region = None
    return SingleImage(fm.model, image, sigma, mask, psf, psf_kind=psf_kind, psf_oversampling=s.psf_sampling,
                       region=region, name=Path(path).stem, plate_scale=s.plate_scale, setup=s,
                       meta={"input": str(path), "format": "galfit"})


def from_imfit(config: str | os.PathLike, image: str, *, mask: str | None = None, psf: str | None = None,
               noise: str | None = None, noise_type: str = "sigma", gain: float | None = None,
               readnoise: float | None = None, sky: float | None = None, ncombined: int | None = None,
               exptime: float | None = None, mask_zero_is_bad: bool = False, zeropoint: float = 0.0,
               psf_kind: str = "optical", plate_scale: float | None = None) -> SingleImage:
    """A :class:`SingleImage` from an IMFIT configuration and IMFIT's command-line options (their
    IMFIT meaning: ``gain`` e-/ADU, ``readnoise`` e-, ``sky`` the original sky already subtracted,
    ``noise`` an error image of ``noise_type`` sigma/variance/weight, a mask non-zero = bad unless
    ``mask_zero_is_bad``; options override the configuration's GAIN, READNOISE, ORIGINAL_SKY,
    NCOMBINED, EXPTIME). The PSF is normalised to unit sum, as IMFIT does."""
    data = read_image(image)
    cfg = read_imfit_config(config, zeropoint=zeropoint, shape=data.shape)
    opts = cfg.options
    gain = gain if gain is not None else opts.get("GAIN", 1.0)
    readnoise = readnoise if readnoise is not None else opts.get("READNOISE", 0.0)
    sky = sky if sky is not None else opts.get("ORIGINAL_SKY", 0.0)
    ncombined = ncombined if ncombined is not None else int(opts.get("NCOMBINED", opts.get("NCOMBINE", 1)))
    exptime = exptime if exptime is not None else opts.get("EXPTIME", 1.0)
    if noise is not None:
        err = read_image(noise)
        if err.shape != data.shape:
            raise DataError(f"noise image {noise!r} has shape {err.shape}, the image {data.shape}")
        with np.errstate(divide="ignore", invalid="ignore"):
            if noise_type == "sigma":
                sigma = err
            elif noise_type == "variance":
                sigma = np.where(err > 0, np.sqrt(np.where(err > 0, err, 1.0)), 0.0)
            elif noise_type == "weight":
                sigma = np.where(err > 0, 1.0 / np.sqrt(np.where(err > 0, err, 1.0)), 0.0)
            else:
                raise DataError(f"noise_type must be sigma, variance or weight, got {noise_type!r}")
    else:
        sigma = sigma_from_gain(data, gain=gain, read_noise=readnoise, sky=sky, ncombine=ncombined, exptime=exptime)
    m = None
    if mask is not None:
        mm = read_image(mask)
        if mm.shape != data.shape:
            raise DataError(f"mask {mask!r} has shape {mm.shape}, the image {data.shape}")
        m = (mm == 0) if mask_zero_is_bad else (mm != 0)
    p = _normalised_psf(read_image(psf), psf) if psf is not None else None
    scale = (plate_scale, plate_scale) if plate_scale else None
    return SingleImage(cfg.model, data, sigma, m, p, psf_kind=psf_kind, name=Path(config).stem, imfit=cfg,
                       plate_scale=scale,
                       meta={"input": str(config), "format": "imfit", "image": str(image), "gain": gain,
                             "readnoise": readnoise, "sky": sky, "ncombined": ncombined, "exptime": exptime})


# ----------------------------------------------------------------------------------------------
# Fitting


_OFFSET_TIE = re.compile(r"^\s*([A-Za-z_]\w*)\.(x0|y0)\s*(?:\+\s*\(?\s*[-+0-9.eE]+\s*\)?)?\s*$")


def shift_model(model: Model, dx: float, dy: float) -> Model:
    """A copy of ``model`` with every centre (``x0``, ``y0``: values and bounds) moved by
    ``(-dx, -dy)``: the model of a cut-out whose first pixel is pixel ``(dx + 1, dy + 1)`` of the
    image. Ties between centres must be ``other.x0`` or ``other.x0 + c`` (they move together)."""
    comps = []
    for c in model.components:
        params = {}
        for name, p in c.params.items():
            if name not in ("x0", "y0") or (dx == 0 and dy == 0):
                params[name] = p
                continue
            d = dx if name == "x0" else dy
            if p.tie is not None:
                if not (isinstance(p.tie.expr, str) and _OFFSET_TIE.match(p.tie.expr)):
                    raise ModelError(f"{c.name}.{name} is tied by {p.tie.expr!r}; with a fitting region the centres "
                                     "must be free, fixed, or tied as other.x0 (+ constant)")
                params[name] = p
                continue
            value = None if p.value is None else np.asarray(p.value, dtype=np.float64) - d
            if value is not None and value.ndim == 0:
                value = float(value)
            bounds = None if p.bounds is None else tuple(None if b is None else b - d for b in p.bounds)
            params[name] = Parameter(value=value, fixed=p.fixed, bounds=bounds, tie=p.tie)
        comps.append(Component(c.name, c.profile, params))
    return Model(comps, model.zeropoint)


def fit_single(job: SingleImage, *, options: LMOptions | None = None, jacobian: str = "autodiff",
               dtype: torch.dtype = torch.float64, device: str = "cpu", fit_it: bool = True) -> SingleFit:
    """Fit ``job`` (its fitting region cut out) and return the result in full-image coordinates.
    ``fit_it=False`` renders the starting model instead (GALFIT's ``P) 1``/``2``)."""
    dx, dy = job.offset
    model = shift_model(job.model, dx, dy)
    image, sigma, mask = job.cut(job.image), job.cut(job.sigma), job.cut(job.mask)
    if fit_it:
        res = fit(model, [image], [sigma] if sigma is not None else None, [mask] if mask is not None else None,
                  job.psf, psf_kind=job.psf_kind, psf_oversampling=job.psf_oversampling, ids=[job.name],
                  options=options, jacobian=jacobian, dtype=dtype, device=device)
        values = {k: torch.as_tensor(v, dtype=dtype, device=device) for k, v in res.values.items()}
    else:
        res = None
        values = None
    renderer = Renderer(model, [image.shape], job.psf, psf_kind=job.psf_kind, psf_oversampling=job.psf_oversampling,
                        dtype=dtype, device=device)
    if values is None:
        values = renderer.values()
    model_image = renderer.crop(renderer(values, check=False), 0)
    comps = {name: renderer.crop(img, 0) for name, img in renderer.components(values, check=False).items()}
    if res is None:
        res = _unfitted_result(model, values, image, sigma, mask, model_image, job.name)
    for key in res.keys:
        comp, pname = key.split(".")
        if pname == "x0":
            res.values[key] = res.values[key] + dx
        elif pname == "y0":
            res.values[key] = res.values[key] + dy
    return SingleFit(res, image, model_image, comps, mask, sigma, fitted=fit_it)


def _unfitted_result(model, values, image, sigma, mask, model_image, name) -> FitResult:
    keys = model.parameter_names
    good = np.isfinite(image)
    if sigma is not None:
        good &= np.isfinite(sigma) & (sigma > 0)
    if mask is not None:
        good &= ~np.asarray(mask, dtype=bool)
    w = np.where(good, 1.0 / np.where(good, sigma if sigma is not None else 1.0, 1.0) ** 2, 0.0)
    chi2 = float(np.sum(w * np.where(good, image - model_image, 0.0) ** 2))
    free = list(model.layout(1).free)
    nan = np.full(1, np.nan)
    return FitResult(keys=keys, free=free, values={k: values[k].detach().cpu().numpy().copy() for k in keys},
                     errors={k: nan.copy() for k in keys}, covariance=np.full((1, len(keys), len(keys)), np.nan),
                     chi2=np.array([chi2]), dof=np.array([int(good.sum()) - len(free)]), n_iter=np.array([0]),
                     status=np.array([int(Status.MAX_ITER)]), flags=np.array([int(Flag.NOT_CONVERGED)]),
                     messages=["not fitted: the starting model is rendered (GALFIT's P option)"],
                     ids=[name])


# ----------------------------------------------------------------------------------------------
# Outputs


def model_to_dict(model: Model, values: Mapping[str, float]) -> tuple[dict, list[str]]:
    """The model file (YAML structure) of ``model`` with ``values``; parameters tied by a function
    (e.g. IMFIT's fixed intensity) are written as fixed values, listed in the second item."""
    out = {"zeropoint": float(model.zeropoint), "components": {}}
    frozen = []
    for c in model.components:
        d: dict = {"profile": c.profile.name}
        for s in c.profile.params:
            p = c.params[s.name]
            key = f"{c.name}.{s.name}"
            v = float(values[key])
            if p.tie is not None and isinstance(p.tie.expr, str):
                d[s.name] = {"tie": p.tie.expr}
                continue
            entry: dict = {"value": v}
            if p.tie is not None:
                entry["fixed"] = True
                frozen.append(key)
            elif p.fixed is not None:
                entry["fixed"] = bool(p.fixed)
            if p.bounds is not None and p.tie is None:
                entry["bounds"] = [None if b is None else float(b) for b in p.bounds]
            d[s.name] = v if set(entry) == {"value"} else entry
        out["components"][c.name] = d
    return out, frozen


def write_outputs(job: SingleImage, fitres: SingleFit, out: Path, *, imgblock: str | None = None,
                  plots: bool = False) -> list[Path]:
    """Write ``<name>_results.fits/.csv``, ``<name>_model.yaml`` and, for a feedme,
    ``<name>_fit.feedme``; optionally the image block and the diagnostic plot."""
    from . import __version__

    out.mkdir(parents=True, exist_ok=True)
    stem = job.name
    written = []
    table = fitres.result.to_table()
    values = fitres.values
    model_dict, frozen = model_to_dict(job.model, values)
    model_path = out / f"{stem}_model.yaml"
    head = f"# best fit of {job.meta.get('input', stem)} by galprof {__version__}\n"
    if frozen:
        head += f"# fixed here (tied by a function in the fit): {', '.join(frozen)}\n"
    model_path.write_text(head + yaml.safe_dump(model_dict, sort_keys=False))
    written.append(model_path)
    table.meta.update({"galprof": __version__, "model": model_path.name, "input": str(job.meta.get("input", "")),
                       "format": job.meta.get("format", ""), "psf_kind": job.psf_kind,
                       "date": time.strftime("%Y-%m-%dT%H:%M:%S")})
    if job.region is not None:
        table.meta["region"] = " ".join(str(int(r)) for r in job.region)
    feedme_path = None
    if job.setup is not None:
        feedme_path = out / f"{stem}_fit.feedme"
        chi2, dof = float(fitres.result.chi2[0]), int(fitres.result.dof[0])
        write_feedme(feedme_path, job.model, _absolute_setup(job.setup, out, job.image.shape), values,
                     header=[f"Input menu file: {job.meta.get('input', '')}",
                             f"Chi^2/nu = {chi2 / max(dof, 1):.3f},  Chi^2 = {chi2:.3f},  Ndof = {dof}",
                             f"written by galprof {__version__}"])
        table.meta["feedme"] = feedme_path.name
        written.append(feedme_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VerifyWarning)  # long metadata keys become HIERARCH cards
        table.write(out / f"{stem}_results.fits", overwrite=True)
    table.write(out / f"{stem}_results.csv", format="ascii.csv", overwrite=True)
    written += [out / f"{stem}_results.fits", out / f"{stem}_results.csv"]
    if imgblock is not None:
        ib = Path(imgblock)
        if not ib.is_absolute():
            ib = out / ib
        write_imgblock_for(job, fitres, ib)
        written.append(ib)
    if plots:
        from .plots import galaxy_figure

        png = out / f"{stem}_fit.png"
        fig = galaxy_figure(job.model, values, fitres.data, fitres.model_image, fitres.components, mask=fitres.mask,
                            sigma=fitres.sigma, offset=job.offset, plate_scale=job.plate_scale, title=stem)
        fig.savefig(png, dpi=110)
        written.append(png)
    return written


def _absolute_setup(setup: GalfitSetup, out: Path, shape) -> GalfitSetup:
    """The setup with its file names made valid from ``out`` (absolute where needed)."""
    import copy

    s = copy.copy(setup)
    for attr in ("image", "sigma", "psf", "mask"):
        name = getattr(s, attr)
        p = s.path(name)
        if p is not None:
            p = p.resolve()
            try:
                rel = os.path.relpath(p, out.resolve())
            except ValueError:
                rel = str(p)
            setattr(s, attr, rel)
    if s.region is None:
        ny, nx = shape
        s.region = (1, nx, 1, ny)
    s.folder = out.resolve()
    s.constraints = None
    return s


def write_imgblock_for(job: SingleImage, fitres: SingleFit, path: Path) -> None:
    """The GALFIT image block of a fit: data, model (Z = 1 components left out), residual of the
    fitting region; GALFIT's keywords for every component and the fit statistics."""
    setup = job.setup or GalfitSetup(zeropoint=job.model.zeropoint,
                                     plate_scale=job.plate_scale or (1.0, 1.0))
    res = fitres.result
    skip = setup.skip
    model_image = sum((img for name, img in fitres.components.items() if not skip.get(name, False)),
                      np.zeros_like(fitres.data))
    bad = [k for k in res.free if not np.isfinite(res.errors[k][0])]
    if "at a bound" in (res.messages[0] or ""):
        bad += [m.split(" at a bound")[0].strip() for m in res.messages[0].split(";") if "at a bound" in m]
    cards = [("INITFILE", str(job.meta.get("input", ""))[-44:], "input file"),
             ("DATAIN", str(setup.image or job.meta.get("image", ""))[-44:], "data image"),
             ("SIGMA", str(setup.sigma or "none")[-44:], "sigma image"),
             ("PSF", str(setup.psf or "none")[-44:], "PSF"),
             ("CONSTRNT", str(setup.constraints or "none")[-44:], "constraints"),
             ("MASK", str(setup.mask or "none")[-44:], "mask")]
    ny, nx = fitres.data.shape
    x1, y1 = job.offset[0] + 1, job.offset[1] + 1
    cards += [("FITSECT", f"[{x1}:{x1 + nx - 1},{y1}:{y1 + ny - 1}]", "Image section fitted"),
              ("CONVBOX", ", ".join(str(b) for b in (setup.conv_box or (nx, ny))), "Convolution box size"),
              ("MAGZPT", float(setup.zeropoint), "Magnitude zeropoint"),
              ("PSFKIND", job.psf_kind, "galprof PSF kind")]
    shifted = dict(fitres.values)
    cards += galfit_header_cards(job.model, shifted, fitres.errors, setup=setup, bad=bad, region_shape=(ny, nx))
    from . import __version__
    from .flags import describe_flags

    flags = int(res.flags[0])
    chi2, dof = float(res.chi2[0]), int(res.dof[0])
    nfree = len(res.free)
    cards += [("FLAGS", describe_flags(flags).replace(",", " ") or "0", "galprof flags"),
              ("GPFLAGS", flags, "galprof flag bits"),
              ("CHISQ", chi2, "Chi^2 of fit"), ("NDOF", dof, "Degrees of freedom"),
              ("NFREE", nfree, "Number of free parameters"),
              ("NFIX", len(res.keys) - nfree, "Number of fixed (or tied) parameters"),
              ("CHI2NU", chi2 / dof if dof > 0 else float("nan"), "Reduced Chi^2"),
              ("GALPROF", __version__, "galprof version")]
    header = None
    path.parent.mkdir(parents=True, exist_ok=True)
    write_imgblock(path, fitres.data, model_image, cards, data_header=header,
                   components=fitres.components if (job.setup and job.setup.option == 3) else None)


# ----------------------------------------------------------------------------------------------
# Command line


def wants_single(argv: Sequence[str]) -> bool:
    """Whether ``galprof fit ARGS`` is a single-image fit (its first argument a GALFIT feedme or an
    IMFIT configuration) rather than a catalogue fit (a YAML model)."""
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is None:
        return False
    return is_feedme(first) or is_imfit_config(first)


def _fit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="galprof fit",
        description="Fit one image from a GALFIT feedme file (galprof fit FILE.feedme) or an IMFIT configuration "
                    "(galprof fit CONFIG.dat --image IMG.fits ...; the options mean what they mean to IMFIT).")
    p.add_argument("input", help="GALFIT feedme (.feedme, .galfit, galfit.NN) or IMFIT configuration file")
    p.add_argument("--out", default=".", help="output folder (default: the working directory)")
    p.add_argument("--image", help="IMFIT: image to fit (FITS; file.fits[N] selects an HDU)")
    p.add_argument("--mask", help="IMFIT: mask image (non-zero = bad, unless --mask-zero-is-bad)")
    p.add_argument("--mask-zero-is-bad", action="store_true", help="IMFIT: zero pixels of the mask are bad")
    p.add_argument("--psf", help="IMFIT: PSF image (normalised to unit sum)")
    p.add_argument("--noise", help="IMFIT: noise image (sigma; see --errors-are-variances/--errors-are-weights)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--errors-are-variances", action="store_true", help="IMFIT: --noise holds variances")
    g.add_argument("--errors-are-weights", action="store_true", help="IMFIT: --noise holds weights 1/sigma^2")
    p.add_argument("--gain", type=float, help="A/D gain (e-/ADU) for the noise from the data (also for a feedme "
                                              "whose C) is none)")
    p.add_argument("--readnoise", type=float, help="read noise (e-)")
    p.add_argument("--sky", type=float, help="original sky level already subtracted (ADU)")
    p.add_argument("--ncombined", type=int, help="number of images averaged")
    p.add_argument("--exptime", type=float, help="IMFIT: exposure time (image in ADU/s)")
    p.add_argument("--zeropoint", type=float, default=0.0, help="IMFIT: magnitude zero point of galprof's mag "
                                                                "(IMFIT has none; default 0)")
    p.add_argument("--plate-scale", type=float, help="IMFIT: arcsec per pixel (for the plot's arcsec axis)")
    p.add_argument("--psf-kind", choices=PSF_KINDS, default="optical",
                   help="optical (default: what GALFIT and IMFIT do, the pixel-integrated model convolved with "
                        "the PSF image) or star (the PSF already holds the pixel response; right for PSFs "
                        "measured from stars)")
    p.add_argument("--imgblock", nargs="?", const="", default=None,
                   help="write a GALFIT image block (default name: the feedme's B), else <name>_imgblock.fits)")
    p.add_argument("--plots", action="store_true", help="write <name>_fit.png (needs galprof[plots])")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float64")
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--jacobian", choices=["autodiff", "finite-difference"], default="autodiff")
    return p


def fit_main(argv: Sequence[str]) -> int:
    """``galprof fit`` for one image; returns the exit code (errors propagate as GalprofError)."""
    args = _fit_parser().parse_args(list(argv))
    if is_feedme(args.input):
        job = from_feedme(args.input, psf_kind=args.psf_kind, gain=args.gain,
                          readnoise=args.readnoise or 0.0, sky=args.sky or 0.0, ncombined=args.ncombined or 1)
        fit_it = job.setup.option == 0
        default_block = job.setup.output or f"{job.name}_imgblock.fits"
    elif is_imfit_config(args.input):
        if not args.image:
            raise DataError(f"{args.input} is an IMFIT configuration: give the image with --image")
        noise_type = "variance" if args.errors_are_variances else ("weight" if args.errors_are_weights else "sigma")
        job = from_imfit(args.input, args.image, mask=args.mask, psf=args.psf, noise=args.noise,
                         noise_type=noise_type, gain=args.gain, readnoise=args.readnoise, sky=args.sky,
                         ncombined=args.ncombined, exptime=args.exptime, mask_zero_is_bad=args.mask_zero_is_bad,
                         zeropoint=args.zeropoint, psf_kind=args.psf_kind, plate_scale=args.plate_scale)
        fit_it = True
        default_block = f"{job.name}_imgblock.fits"
    else:
        raise DataError(f"{args.input!r} is neither a GALFIT feedme nor an IMFIT configuration "
                        "(for a catalogue fit give a YAML model and --catalog)")
    t0 = time.perf_counter()
    res = fit_single(job, options=LMOptions(max_iter=args.max_iter), jacobian=args.jacobian,
                     dtype=_DTYPES[args.dtype], device=args.device, fit_it=fit_it)
    block = None if args.imgblock is None else (args.imgblock or default_block)
    if not fit_it and block is None:
        block = default_block  # GALFIT's P) 1/2/3: make the image block and stop
    files = write_outputs(job, res, Path(args.out), imgblock=block, plots=args.plots)
    r = res.result
    log.info("%s: %s, chi2_nu = %.4f, %d iterations, %.1f s", job.name,
             "fitted" if fit_it else "rendered (P option)", float(r.chi2_nu[0]), int(r.n_iter[0]),
             time.perf_counter() - t0)
    if r.messages[0]:
        log.warning("%s: %s", job.name, r.messages[0])
    for f in files:
        log.info("wrote %s", f)
    return 0


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="galprof export", description="Write a fitted galaxy in another format.")
    p.add_argument("results", help="results table of galprof fit (FITS or CSV)")
    p.add_argument("--galfit", action="store_true", required=True, help="write a GALFIT feedme")
    p.add_argument("--id", help="the galaxy (value of the id column; default: the only row)")
    p.add_argument("--out", required=True, help="output feedme file")
    p.add_argument("--model", help="the YAML model of the fit (default: the one named in the table's metadata)")
    p.add_argument("--feedme", help="take the image, sigma, PSF, mask, region, zero point and plate scale from "
                                    "this feedme (default: the one named in the table's metadata)")
    p.add_argument("--image", help="input image for line A) (when no feedme gives it)")
    p.add_argument("--plate-scale", type=float, nargs=2, metavar=("DX", "DY"), help="arcsec per pixel for K)")
    return p


def _meta(table, key):
    for k, v in table.meta.items():
        if k.lower() == key:
            return v
    return None


def export_main(argv: Sequence[str]) -> int:
    """``galprof export --galfit RESULTS --id ID --out F.feedme``; returns the exit code."""

    args = _export_parser().parse_args(list(argv))
    rpath = Path(args.results)
    if not rpath.is_file():
        raise DataError(f"results table {str(rpath)!r} does not exist")
    table = _read_results(str(rpath))
    if args.id is not None:
        rows = [r for r in table if str(r["id"]).strip() == str(args.id)]
        if not rows:
            raise DataError(f"no galaxy with id {args.id!r} in {rpath}")
        row = rows[0]
    elif len(table) == 1:
        row = table[0]
    else:
        raise DataError(f"{rpath} holds {len(table)} galaxies: choose one with --id")
    model_ref = args.model or _meta(table, "model")
    if model_ref is None:
        raise DataError(f"{rpath} names no model: give --model")
    mpath = Path(model_ref)
    if not mpath.is_absolute() and not mpath.is_file():
        mpath = rpath.parent / mpath
    model = load_model(mpath)
    values = {}
    for key in model.parameter_names:
        col = column(key)
        if col not in table.colnames:
            raise DataError(f"{rpath} has no column {col} for {key} (is {mpath} the model of this fit?)")
        values[key] = float(row[col])
    feedme_ref = args.feedme or _meta(table, "feedme")
    if feedme_ref is not None:
        fpath = Path(feedme_ref)
        if not fpath.is_absolute() and not fpath.is_file():
            fpath = rpath.parent / fpath
        setup = read_feedme(fpath).setup
        shape = None
        if setup.region is None:
            image_path = setup.path(setup.image)
            if image_path is None or not image_path.is_file():
                raise DataError(f"{fpath} has no fitting region (H) and its image cannot be read for its size")
            shape = read_image(image_path).shape
        setup = _absolute_setup(setup, Path(args.out).resolve().parent, shape)
    else:
        setup = GalfitSetup(image=args.image, zeropoint=model.zeropoint)
        image_path = setup.path(args.image)
        if image_path is None or not image_path.is_file():
            raise DataError("no feedme gives the image and fitting region: give --feedme or --image")
        ny, nx = read_image(image_path).shape
        setup.region = (1, nx, 1, ny)
    if args.plate_scale:
        setup.plate_scale = tuple(args.plate_scale)
    chi2 = float(row["chi2"]) if "chi2" in table.colnames else float("nan")
    dof = int(row["dof"]) if "dof" in table.colnames else 0
    files = write_feedme(args.out, model, setup, values,
                         header=[f"galaxy {row['id']} of {rpath}",
                                 f"Chi^2/nu = {chi2 / max(dof, 1):.3f},  Chi^2 = {chi2:.3f},  Ndof = {dof}"])
    for f in files:
        log.info("wrote %s", f)
    return 0



def _plot_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="galprof plot",
                                description="Catalogue diagnostics of a results table: parameter distributions, "
                                            "reduced chi^2 histogram and, with --compare, a comparison of two runs "
                                            "(docs/plots.md).")
    p.add_argument("results", help="results table (FITS, CSV)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--compare", help="a second results table of the same galaxies")
    p.add_argument("--labels", nargs=2, default=("this run", "other run"), metavar=("A", "B"))
    return p


def _read_results(path: str):
    from astropy.table import Table

    p = Path(path)
    if not p.is_file():
        raise DataError(f"results table {str(p)!r} does not exist")
    return Table.read(p) if p.suffix.lower() in (".fits", ".fit") else Table.read(p, format="ascii.csv")


def plot_main(argv: Sequence[str]) -> int:
    """``galprof plot RESULTS --out DIR [--compare OTHER]``; returns the exit code."""
    from .plots import catalog_plots

    args = _plot_parser().parse_args(list(argv))
    table = _read_results(args.results)
    other = _read_results(args.compare) if args.compare else None
    for path in catalog_plots(table, args.out, compare=other, labels=tuple(args.labels)):
        log.info("wrote %s", path)
    return 0


def single_command(argv: Sequence[str]):
    """The command-line action for ``argv`` if it is one of this module's (``fit`` of a feedme or an
    IMFIT configuration, ``export``, ``plot``): a function returning the exit code; None otherwise."""
    argv = list(argv)
    if argv[:1] == ["fit"] and wants_single(argv[1:]):
        return lambda: fit_main(argv[1:])
    if argv[:1] == ["export"]:
        return lambda: export_main(argv[1:])
    if argv[:1] == ["plot"]:
        return lambda: plot_main(argv[1:])
    return None
