"""Survey descriptions: the distributions the training stamps are drawn from, and the ranges a
network trained on them is trusted in (:meth:`Survey.matches`).

A survey file is YAML (see ``galprof/nn/data/sdss_g.yaml`` for every key and its meaning):
pixel scale (arcsec/px), zeropoint, PSF (Moffat FWHM and beta ranges), noise (sky sigma range,
gain, sky residual), the target galaxy's magnitude, size, index and axis-ratio distributions,
stamp sizes, and the neighbours and stars that share the stamp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from ..errors import DataError

__all__ = ["Survey", "load_survey", "shipped_survey", "SHIPPED_SURVEY", "SHIPPED_WEIGHTS"]

#: the survey and weights that ship with galprof (package data)
SHIPPED_SURVEY = "sdss_g.yaml"
SHIPPED_WEIGHTS = "sdss_g.pt"


def _range(d: dict, key: str, where: str, *, positive: bool = True) -> tuple[float, float]:
    v = d.get(key)
    if not (isinstance(v, (list, tuple)) and len(v) == 2):
        raise DataError(f"survey {where}.{key} must be a [low, high] pair, got {v!r}")
    try:
        lo, hi = float(v[0]), float(v[1])
    except (TypeError, ValueError):
        raise DataError(f"survey {where}.{key} = {v!r} is not a pair of numbers") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi) or (positive and lo <= 0):
        raise DataError(f"survey {where}.{key} = {v!r} must be finite, low <= high" + (", > 0" if positive else ""))
    return lo, hi


def _number(d: dict, key: str, where: str, default=None, *, positive: bool = True) -> float:
    v = d.get(key, default)
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise DataError(f"survey {where}.{key} = {v!r} is not a number") from None
    if not math.isfinite(v) or (positive and v <= 0):
        raise DataError(f"survey {where}.{key} = {v!r} must be finite" + (" and > 0" if positive else ""))
    return v


@dataclass
class Survey:
    """A survey description (units: arcsec for sizes and FWHM, the image's units for noise).

    Build it with :func:`load_survey`; the attributes mirror the YAML keys.
    """

    name: str
    pixel_scale: float
    zeropoint: float
    psf_fwhm: tuple[float, float]
    psf_beta: tuple[float, float]
    sky_sigma: tuple[float, float]
    gain: float
    sky_residual: float
    mag: tuple[float, float]
    re: tuple[float, float]
    n: tuple[float, float]
    q: tuple[float, float]
    centre_offset: float
    stamp_size: tuple[float, float]
    re_ratio: tuple[float, float]
    neighbour_count: tuple[int, int]
    neighbour_flux: tuple[float, float]
    neighbour_re: tuple[float, float]
    min_separation: float
    star_count: tuple[int, int]
    star_flux: tuple[float, float]
    source: str = ""
    raw: dict = field(default_factory=dict, repr=False)

    # derived ranges, in pixels
    @property
    def psf_fwhm_px(self) -> tuple[float, float]:
        return self.psf_fwhm[0] / self.pixel_scale, self.psf_fwhm[1] / self.pixel_scale

    def matches(self, *, stamp_shape: tuple[int, int], psf_fwhm_px: float | None,
                pixel_scale: float | None = None, tolerance: float = 0.1) -> tuple[bool, str]:
        """Whether a network trained on this survey is to be trusted on a stamp: ``(ok, reason)``.

        It matches when the stamp's longer side is within the training stamp sizes, the PSF
        (required) has its FWHM within the training range widened by ``tolerance`` (10%) on each
        side, and the pixel scale, when known, is within ``tolerance`` of the survey's. The noise
        level and the galaxy's size and flux are not tested: the network sees the stamp in units
        of its noise and predicts sizes in units of the stamp.
        """
        side = max(stamp_shape)
        lo, hi = self.stamp_size
        if not lo <= side <= hi:
            return False, f"stamp side {side} px outside the training range [{lo:g}, {hi:g}]"
        if psf_fwhm_px is None or not math.isfinite(psf_fwhm_px):
            return False, "no PSF"
        flo, fhi = self.psf_fwhm_px
        if not flo * (1 - tolerance) <= psf_fwhm_px <= fhi * (1 + tolerance):
            return False, (f"PSF FWHM {psf_fwhm_px:.2f} px outside the training range [{flo:.2f}, {fhi:.2f}] px "
                           f"(+-{100 * tolerance:g}%)")
        if pixel_scale is not None and math.isfinite(pixel_scale):
            if abs(pixel_scale / self.pixel_scale - 1) > tolerance:
                return False, f"pixel scale {pixel_scale:g} arcsec/px, the survey's {self.pixel_scale:g}"
        return True, f"matches survey {self.name}"

    def to_dict(self) -> dict:
        return dict(self.raw)


def _parse(d: dict, source: str) -> Survey:
    if not isinstance(d, dict):
        raise DataError(f"survey {source!r} must be a YAML mapping")
    sections = {k: d.get(k) or {} for k in ("psf", "noise", "galaxy", "stamp", "neighbours", "stars")}
    for k, v in sections.items():
        if not isinstance(v, dict):
            raise DataError(f"survey {source!r}: {k} must be a mapping")
    psf, noise, gal, stamp, nb, st = (sections[k] for k in ("psf", "noise", "galaxy", "stamp", "neighbours", "stars"))
    if psf.get("profile", "moffat") != "moffat":
        raise DataError(f"survey {source!r}: psf.profile must be moffat (got {psf.get('profile')!r})")
    n_lo, n_hi = _range(gal, "n", "galaxy")
    q_lo, q_hi = _range(gal, "q", "galaxy")
    if not (0.3 <= n_lo and n_hi <= 8.0):
        raise DataError(f"survey {source!r}: galaxy.n must lie within [0.3, 8]")
    if not (0.05 <= q_lo and q_hi <= 1.0):
        raise DataError(f"survey {source!r}: galaxy.q must lie within [0.05, 1]")
    size = _range(stamp, "size", "stamp")
    if size[0] < 16:
        raise DataError(f"survey {source!r}: stamp.size must be at least 16 px")
    nbc = _range(nb, "count", "neighbours", positive=False) if nb else (0, 0)
    stc = _range(st, "count", "stars", positive=False) if st else (0, 0)
    return Survey(
        name=str(d.get("name", Path(source).stem)),
        pixel_scale=_number(d, "pixel_scale", "survey"),
        zeropoint=_number(d, "zeropoint", "survey", positive=False),
        psf_fwhm=_range(psf, "fwhm", "psf"), psf_beta=_range(psf, "beta", "psf"),
        sky_sigma=_range(noise, "sky_sigma", "noise"), gain=_number(noise, "gain", "noise"),
        sky_residual=_number(noise, "sky_residual", "noise", 0.0, positive=False),
        mag=_range(gal, "mag", "galaxy", positive=False), re=_range(gal, "re", "galaxy"), n=(n_lo, n_hi),
        q=(q_lo, q_hi), centre_offset=_number(gal, "centre_offset", "galaxy", 1.0, positive=False),
        stamp_size=size, re_ratio=_range(stamp, "re_ratio", "stamp"),
        neighbour_count=(int(nbc[0]), int(nbc[1])),
        neighbour_flux=_range(nb, "flux_ratio", "neighbours") if nbc[1] > 0 else (1.0, 1.0),
        neighbour_re=_range(nb, "re", "neighbours") if nbc[1] > 0 else (1.0, 1.0),
        min_separation=_number(nb, "min_separation", "neighbours", 1.5, positive=False),
        star_count=(int(stc[0]), int(stc[1])),
        star_flux=_range(st, "flux_ratio", "stars") if stc[1] > 0 else (1.0, 1.0),
        source=source, raw=d)


def load_survey(spec: str | Path | dict) -> Survey:
    """A :class:`Survey` from a YAML file, a YAML string or a dict."""
    if isinstance(spec, dict):
        return _parse(spec, "<dict>")
    text = str(spec)
    path = Path(text)
    if "\n" not in text and path.suffix.lower() in (".yaml", ".yml"):
        if not path.is_file():
            raise DataError(f"survey file {text!r} not found")
        try:
            return _parse(yaml.safe_load(path.read_text()), text)
        except yaml.YAMLError as exc:
            raise DataError(f"survey file {text!r} is not valid YAML: {exc}") from None
    try:
        return _parse(yaml.safe_load(text), "<string>")
    except yaml.YAMLError as exc:
        raise DataError(f"survey is not valid YAML: {exc}") from None


def package_file(name: str) -> Path:
    """Path of a file shipped in ``galprof/nn/data``."""
    return Path(str(resources.files("galprof.nn").joinpath("data", name)))


def shipped_survey() -> Survey:
    """The SDSS-like survey the shipped weights were trained on."""
    return load_survey(package_file(SHIPPED_SURVEY))
