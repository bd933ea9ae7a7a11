"""Inference: starting values (with sigmas) and masks from the trained networks.

:class:`Predictor` loads a weights file (default: the SDSS-like weights shipped with galprof,
package data, no network access) and predicts, for stamps given in their own pixels:

* :meth:`Predictor.predict`: the single-Sérsic parameters in galprof's conventions (stamp FITS
  frame, PA in degrees from +y, ``q = b / a``, ``re`` semi-major in pixels, ``mag`` with the
  zeropoint given) and the sky, each with a predictive sigma (``<param>_err``);
* :meth:`Predictor.labels`: target (1) / other sources (2) / sky (0) per stamp pixel, and
  :meth:`Predictor.mask`: the mask of the other sources for a fit (True = not used).

:func:`starts_for` turns a prediction into starting values of any model by galprof.detect's
rules (:func:`galprof.detect.initial_values`: bulge + disk splits, size parameters by profile).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..model import Model
from .grid import GRID, Gridded, grid_to_stamp, network_input, psf_fwhm, stack, to_grid
from .network import InitNet, MaskNet, decode
from .survey import SHIPPED_WEIGHTS, Survey, load_survey, package_file

__all__ = ["Predictor", "load_predictor", "starts_for", "INIT_MODES", "PARAMS"]

INIT_MODES = ("auto", "moments", "nn")
PARAMS = ("x0", "y0", "mag", "re", "n", "q", "pa", "sky")
_CACHE: dict = {}


def _read_weights(spec) -> dict:
    path = package_file(SHIPPED_WEIGHTS) if spec is None else Path(spec)
    if not path.is_file():
        raise DataError(f"weights file {str(path)!r} not found" + (
            " (the shipped weights are missing from this installation)" if spec is None else ""))
    try:
        with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
            w = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a bad file
        raise DataError(f"cannot read weights file {str(path)!r}: {exc}") from None
    if not isinstance(w, dict) or w.get("kind") != "galprof-nn" or "init" not in w:
        raise DataError(f"{str(path)!r} is not a galprof train-init weights file")
    return w


class Predictor:
    """The trained networks of one weights file.

    Parameters
    ----------
    weights : path of a ``galprof train-init`` weights file, its loaded dictionary, or None for the
        shipped SDSS-like weights
    device, dtype : where and in which precision the networks run (float32 default)
    """

    def __init__(self, weights=None, *, device="cpu", dtype: torch.dtype = torch.float32):
        w = weights if isinstance(weights, dict) else _read_weights(weights)
        self.source = "shipped" if weights is None else ("<dict>" if isinstance(weights, dict) else str(weights))
        self.device = torch.device(device)
        self.dtype = dtype
        self.survey: Survey = load_survey(w["survey"])
        self.metrics = w.get("metrics", {})
        self.config = w.get("config", {})
        cfg = w["init"]["config"]
        self.grid = int(cfg.get("grid", GRID))
        self.init_net = InitNet(widths=tuple(cfg["widths"]), hidden=cfg["hidden"], grid=self.grid,
                                n_scalars=cfg.get("n_scalars", 1))
        self.init_net.load_state_dict(w["init"]["state"])
        self.init_net.to(device=self.device, dtype=dtype).eval()
        self.mask_net = None
        if w.get("mask"):
            self.mask_net = MaskNet(widths=tuple(w["mask"]["config"]["widths"]))
            self.mask_net.load_state_dict(w["mask"]["state"])
            self.mask_net.to(device=self.device, dtype=dtype).eval()

    # -- inputs -----------------------------------------------------------------------------
    def grid_inputs(self, images: Sequence[np.ndarray], sigmas: Sequence[np.ndarray],
                    masks: Sequence[np.ndarray | None] | None = None,
                    positions: Sequence[tuple[float, float] | None] | None = None) -> list[Gridded]:
        n = len(images)
        masks = masks if masks is not None else [None] * n
        positions = positions if positions is not None else [None] * n
        if not (len(sigmas) == len(masks) == len(positions) == n):
            raise DataError("give one sigma map, mask and position (or None) per image")
        return [to_grid(im, sg, mk, pos, grid=self.grid) for im, sg, mk, pos in zip(images, sigmas, masks, positions)]

    def _tensors(self, gridded: list[Gridded], fwhm_px: Sequence[float]):
        img, sig, frac = stack(gridded, dtype=self.dtype, device=self.device)
        f = torch.tensor([g.factor for g in gridded], dtype=self.dtype, device=self.device)
        fw = torch.as_tensor(np.asarray(fwhm_px, dtype=np.float64), dtype=self.dtype, device=self.device) / f
        return network_input(img, sig, frac, fw)

    @staticmethod
    def fwhm_of(psfs) -> list[float]:
        """PSF FWHMs (px) of PSF images (one per stamp, or one for all: pass a list)."""
        return [psf_fwhm(p) for p in psfs]

    # -- parameters -------------------------------------------------------------------------
    def predict(self, images: Sequence[np.ndarray], sigmas: Sequence[np.ndarray], *,
                psf_fwhm_px: Sequence[float], masks=None, positions=None, zeropoint: float = 0.0,
                batch: int = 512) -> dict[str, np.ndarray]:
        """Single-Sérsic starts of a list of stamps: ``{param: (N,), param_err: (N,)}`` for
        :data:`PARAMS` (module docstring), ``flux`` and ``flux_err`` too. ``psf_fwhm_px``: the PSF
        FWHM of each stamp in its pixels (:func:`galprof.nn.grid.psf_fwhm` of the PSF image);
        ``masks``: True = pixel not used; ``positions``: the target's (x, y) FITS pixels (default
        the stamp centre)."""
        gridded = self.grid_inputs(images, sigmas, masks, positions)
        return self.predict_gridded(gridded, psf_fwhm_px, zeropoint=zeropoint, batch=batch)

    def predict_gridded(self, gridded: list[Gridded], psf_fwhm_px: Sequence[float], *, zeropoint: float = 0.0,
                        batch: int = 512) -> dict[str, np.ndarray]:
        if len(psf_fwhm_px) != len(gridded):
            raise DataError(f"got {len(psf_fwhm_px)} PSF FWHMs for {len(gridded)} stamps")
        parts = []
        for b in range(0, len(gridded), batch):
            g = gridded[b:b + batch]
            with torch.no_grad():
                x, sc, s0 = self._tensors(g, psf_fwhm_px[b:b + batch])
                mu, ls = self.init_net(x, sc)
                t, sig = self.init_net.physical(mu, ls)
                vals, errs = decode(t, s0, sig, grid=self.grid)
            parts.append((g, {k: v.double().cpu().numpy() for k, v in vals.items()},
                          {k: v.double().cpu().numpy() for k, v in errs.items()}))
        out: dict[str, list] = {}
        for g, vals, errs in parts:
            f = np.array([gi.factor for gi in g], dtype=np.float64)
            off = np.array([gi.offset for gi in g], dtype=np.float64)
            x, y = grid_to_stamp(vals["x0"], vals["y0"], f, (off[:, 0], off[:, 1]))
            flux = vals["flux"] * f * f
            with np.errstate(divide="ignore", invalid="ignore"):
                mag = zeropoint - 2.5 * np.log10(flux)
                mag_err = 2.5 / math.log(10) * errs["flux"] / vals["flux"]
            cols = {"x0": x, "y0": y, "mag": mag, "re": vals["re"] * f, "n": vals["n"], "q": vals["q"],
                    "pa": vals["pa"], "sky": vals["sky"], "flux": flux,
                    "x0_err": errs["x0"] * f, "y0_err": errs["y0"] * f, "mag_err": mag_err, "re_err": errs["re"] * f,
                    "n_err": errs["n"], "q_err": errs["q"], "pa_err": errs["pa"], "sky_err": errs["sky"],
                    "flux_err": errs["flux"] * f * f}
            for k, v in cols.items():
                out.setdefault(k, []).append(v)
        return {k: np.concatenate(v) for k, v in out.items()}

    # -- masks ------------------------------------------------------------------------------
    def labels(self, images, sigmas, *, psf_fwhm_px, masks=None, positions=None, batch: int = 256) -> list[np.ndarray]:
        """Per stamp, int8 labels in its own pixels: 0 sky, 1 target, 2 other sources (grid
        labels repeated over each block; -1 where the stamp's pixels were not used)."""
        if self.mask_net is None:
            raise DataError(f"the weights ({self.source}) hold no mask network (train with --mask-epochs > 0)")
        gridded = self.grid_inputs(images, sigmas, masks, positions)
        out = []
        for b in range(0, len(gridded), batch):
            g = gridded[b:b + batch]
            with torch.no_grad():
                x, _, _ = self._tensors(g, psf_fwhm_px[b:b + batch])
                lab = self.mask_net(x).argmax(1).to(torch.int8).cpu().numpy()
            for gi, li in zip(g, lab):
                out.append(_to_stamp(li, gi))
        return out

    def mask(self, image, sigma, *, psf_fwhm_px: float, mask=None, position=None) -> np.ndarray:
        """The fit mask of one stamp from the mask network: True on the pixels labelled other
        sources (the target's and the sky's pixels are used)."""
        lab = self.labels([image], [sigma], psf_fwhm_px=[psf_fwhm_px], masks=[mask], positions=[position])[0]
        return lab == 2

    def matches(self, *, stamp_shape, psf_fwhm_px, pixel_scale=None) -> tuple[bool, str]:
        """:meth:`galprof.nn.survey.Survey.matches` of the training survey."""
        return self.survey.matches(stamp_shape=stamp_shape, psf_fwhm_px=psf_fwhm_px, pixel_scale=pixel_scale)


def _to_stamp(lab: np.ndarray, g: Gridded) -> np.ndarray:
    f = g.factor
    big = np.repeat(np.repeat(lab, f, axis=0), f, axis=1)
    ny, nx = g.shape
    ox, oy = g.offset
    out = np.full((ny, nx), -1, dtype=np.int8)
    n = big.shape[0]
    ys, xs = slice(max(0, oy), min(ny, oy + n)), slice(max(0, ox), min(nx, ox + n))
    out[ys, xs] = big[ys.start - oy:ys.stop - oy, xs.start - ox:xs.stop - ox]
    return out


def load_predictor(weights=None, *, device="cpu", dtype: torch.dtype = torch.float32) -> Predictor:
    """A cached :class:`Predictor` (one per weights file, device and dtype)."""
    key = (None if weights is None else str(Path(weights).resolve()), str(device), dtype)
    p = _CACHE.get(key)
    if p is None:
        p = _CACHE[key] = Predictor(weights, device=device, dtype=dtype)
    return p


def starts_for(model: Model, pred: dict, i: int = 0, *, given: Iterable[str] = ()) -> dict[str, float]:
    """Starting values ``{"comp.param": value}`` of ``model``'s free parameters not in ``given``
    from row ``i`` of a :meth:`Predictor.predict` result, by the rules of
    :func:`galprof.detect.initial_values` (the prediction takes the place of the moment
    measurement; ``mag`` must be in the model's zeropoint)."""
    from ..detect import Measurement, initial_values

    v = {k: float(pred[k][i]) for k in PARAMS}
    if not all(math.isfinite(x) for x in v.values()):
        return {}
    flux = 10 ** (-0.4 * (v["mag"] - model.zeropoint))
    m = Measurement(label=0, x=v["x0"], y=v["y0"], flux=flux, total_flux=flux, q=v["q"], pa=v["pa"], r20=math.nan,
                    r50=math.nan, r80=math.nan, re=v["re"], concentration=math.nan, n=v["n"], sky=v["sky"],
                    kron_radius=math.nan, snr=math.nan)
    return initial_values(model, m, given=given)
