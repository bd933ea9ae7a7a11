"""IMFIT configuration files -> galprof models; IMFIT's noise recipe; galprof results -> IMFIT
parameters.

IMFIT's conventions (docs/galfit_imfit.md) and galprof's are the same for centres (pixel (1, 1) is
the centre of the first pixel), position angles (degrees counter-clockwise from +y) and radii
(semi-major, pixels). They differ in three places, converted here:

* ellipticity ``ell = 1 - q``;
* surface brightness (``I_e`` at ``r_e``, ``I_0`` at the centre, counts/pixel) instead of total
  magnitude: ``mag = zeropoint - 2.5 log10(F)`` with ``F`` the profile's analytic total flux (the
  renderer's own normalisation, boxiness included). IMFIT has no zero point; pass the one you want
  (default 0, so that ``mag = -2.5 log10(F)`` with ``F`` in image units). Limits on an intensity
  cannot become bounds on ``mag`` (they depend on the shape too) and are dropped, with a
  :class:`~galprof.errors.GalprofWarning` (a lower limit <= 0 is implied anyway); a fixed intensity
  becomes a tie of ``mag`` to the shape parameters, so the model is IMFIT's exactly;
* Gaussian ``sigma`` -> ``fwhm = 2 sqrt(2 ln 2) sigma``; FerrersBar2D ``n`` is the Ferrer ``alpha``
  with ``beta = 0``; TiltedSkyPlane's gradient is about the function block's ``X0, Y0``, galprof's
  ``tiltedsky`` about the stamp centre (its level is moved there; this needs the image shape).

A function IMFIT has and galprof does not raises :class:`~galprof.errors.ModelError` naming it.
IMFIT's noise from the data (``GAIN``, ``READNOISE``, ``ORIGINAL_SKY``, ``NCOMBINED``, ``EXPTIME``) is
:func:`galprof.noise.sigma_from_gain`, the same recipe.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import GalprofWarning, ModelError
from ..model import Component, Model
from ..params import Parameter, Tie
from ..profiles import get_profile
from ..special import flux_to_mag, mag_to_flux
from ._surface import intensity_from_mag, intensity_tie, mag_from_intensity

__all__ = ["ImfitConfig", "ImfitFunction", "read_imfit_config", "is_imfit_config", "imfit_parameters",
           "IMFIT_OPTIONS"]

#: image-description keywords of a configuration file (and their command-line options)
IMFIT_OPTIONS = {"GAIN": "gain", "READNOISE": "readnoise", "ORIGINAL_SKY": "sky", "NCOMBINED": "ncombined",
                 "NCOMBINE": "ncombined", "EXPTIME": "exptime"}

_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

# IMFIT function -> (galprof profile, {IMFIT parameter: galprof parameter}, intensity parameter,
# radius of that intensity (galprof shape-parameter name, None = centre), fixed galprof values)
_FUNCTIONS = {
    "Sersic": ("sersic", {"n": "n", "r_e": "re"}, "I_e", "re", {}),
    "Sersic_GenEllipse": ("sersic", {"c0": "c0", "n": "n", "r_e": "re"}, "I_e", "re", {}),
    "Exponential": ("expdisk", {"h": "rs"}, "I_0", None, {}),
    "Exponential_GenEllipse": ("expdisk", {"c0": "c0", "h": "rs"}, "I_0", None, {}),
    "Gaussian": ("gaussian", {"sigma": "fwhm"}, "I_0", None, {}),
    "Moffat": ("moffat", {"fwhm": "fwhm", "beta": "beta"}, "I_0", None, {}),
    "FerrersBar2D": ("ferrer", {"c0": "c0", "n": "alpha", "a_bar": "rout"}, "I_0", None, {"beta": 0.0}),
    "ModifiedKing": ("king", {"r_c": "rc", "r_t": "rt", "alpha": "alpha"}, "I_0", None, {}),
    "FlatSky": ("sky", {"I_sky": "sky"}, None, None, {}),
    "TiltedSkyPlane": ("tiltedsky", {"I_0": "sky", "m_x": "dsdx", "m_y": "dsdy"}, None, None, {}),
    "PointSource": ("psf", {}, "I_tot", None, {}),
}
#: IMFIT parameter order per function (as IMFIT prints it)
_ORDER = {
    "Sersic": ["PA", "ell", "n", "I_e", "r_e"],
    "Sersic_GenEllipse": ["PA", "ell", "c0", "n", "I_e", "r_e"],
    "Exponential": ["PA", "ell", "I_0", "h"],
    "Exponential_GenEllipse": ["PA", "ell", "c0", "I_0", "h"],
    "Gaussian": ["PA", "ell", "I_0", "sigma"],
    "Moffat": ["PA", "ell", "I_0", "fwhm", "beta"],
    "FerrersBar2D": ["PA", "ell", "c0", "n", "I_0", "a_bar"],
    "ModifiedKing": ["PA", "ell", "I_0", "r_c", "r_t", "alpha"],
    "FlatSky": ["I_sky"],
    "TiltedSkyPlane": ["I_0", "m_x", "m_y"],
    "PointSource": ["I_tot"],
}


@dataclass
class _Value:
    value: float
    fixed: bool = False
    limits: tuple[float, float] | None = None


@dataclass
class ImfitFunction:
    """One FUNCTION of a configuration file and the galprof component made from it."""

    name: str                  #: IMFIT function name
    component: str             #: galprof component name
    block: int                 #: function-block number (1-based: X0_1, Y0_1 ...)
    index: int                 #: function number (1-based: the suffix of IMFIT's parameter names)
    params: dict[str, _Value] = field(default_factory=dict)


@dataclass
class ImfitConfig:
    """A configuration file read into a galprof model.

    Attributes
    ----------
    model : Model
    functions : list of ImfitFunction (file order)
    options : image-description values given in the file (``GAIN``, ``READNOISE``,
        ``ORIGINAL_SKY``, ``NCOMBINED``, ``EXPTIME``), by IMFIT keyword
    blocks : per function block, its ``(X0, Y0)`` values
    notes : what the conversion changed (dropped intensity limits, bounds narrowed to galprof's
        validity domains)
    """

    model: Model
    functions: list[ImfitFunction]
    options: dict[str, float]
    blocks: list[tuple[_Value, _Value]]
    notes: list[str] = field(default_factory=list)

    @property
    def zeropoint(self) -> float:
        return self.model.zeropoint


def is_imfit_config(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a text file that reads like an IMFIT configuration (``X0``, ``Y0`` and
    ``FUNCTION`` lines)."""
    p = Path(path)
    if not p.is_file() or p.suffix.lower() in (".fits", ".fit", ".fz", ".yaml", ".yml", ".csv", ".ecsv"):
        return False
    try:
        text = p.read_text(errors="strict")[:200_000]
    except (UnicodeDecodeError, OSError):
        return False
    words = {line.split("#", 1)[0].split()[0] for line in text.splitlines() if line.split("#", 1)[0].split()}
    return {"X0", "Y0", "FUNCTION"} <= words


def _parse_value(tokens: list[str], where: str) -> _Value:
    try:
        value = float(tokens[0])
    except (IndexError, ValueError):
        raise ModelError(f"{where}: expected a number, got {' '.join(tokens)!r}") from None
    rest = "".join(tokens[1:])
    if not rest:
        return _Value(value)
    if rest.lower() == "fixed":
        return _Value(value, fixed=True)
    m = re.fullmatch(r"([-+0-9.eE]+),([-+0-9.eE]+)", rest)
    if not m:
        raise ModelError(f"{where}: limits must be 'lower,upper' or 'fixed', got {rest!r}")
    lo, hi = float(m.group(1)), float(m.group(2))
    if not hi > lo:
        raise ModelError(f"{where}: upper limit {hi} must exceed the lower limit {lo}")
    return _Value(value, limits=(lo, hi))


def read_imfit_config(source: str | os.PathLike, *, zeropoint: float = 0.0,
                      shape: tuple[int, int] | None = None) -> ImfitConfig:
    """Read an IMFIT configuration file (a path, or the text itself) into a galprof model.

    Parameters
    ----------
    source : path or str
    zeropoint : float
        Magnitude zero point of the model (IMFIT has none): ``mag = zeropoint - 2.5 log10(F)``,
        ``F`` the total flux in image units.
    shape : (ny, nx), optional
        Image shape; needed only by ``TiltedSkyPlane`` (whose level galprof takes at the stamp
        centre).

    Raises
    ------
    ModelError
        For a function galprof does not have, an unknown parameter, a missing value, or a line
        that is not IMFIT syntax.
    """
    if isinstance(source, os.PathLike) or (isinstance(source, str) and "\n" not in source):
        path = Path(source)
        if not path.is_file():
            raise ModelError(f"IMFIT configuration {str(path)!r} does not exist")
        text, where = path.read_text(), str(path)
    else:
        text, where = str(source), "IMFIT configuration"
    options: dict[str, float] = {}
    blocks: list[tuple[_Value, _Value]] = []
    functions: list[ImfitFunction] = []
    pending_x: _Value | None = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        label = None
        if "# LABEL" in raw:
            label = raw.split("# LABEL", 1)[1].strip() or None
        if not line:
            continue
        tokens = line.split()
        key, rest = tokens[0], tokens[1:]
        at = f"{where}, line {lineno}"
        if key in IMFIT_OPTIONS and not functions and pending_x is None and not blocks:
            options[key] = _parse_value(rest, at).value
        elif key == "X0":
            pending_x = _parse_value(rest, at)
        elif key == "Y0":
            if pending_x is None:
                raise ModelError(f"{at}: Y0 without a preceding X0")
            blocks.append((pending_x, _parse_value(rest, at)))
            pending_x = None
        elif key == "FUNCTION":
            if not blocks or pending_x is not None:
                raise ModelError(f"{at}: FUNCTION before its block's X0 and Y0")
            if not rest:
                raise ModelError(f"{at}: FUNCTION needs a name")
            name = rest[0]
            if name not in _FUNCTIONS:
                raise ModelError(f"{at}: IMFIT function {name!r} has no galprof equivalent; galprof reads "
                                 f"{', '.join(sorted(_FUNCTIONS))}")
            index = len(functions) + 1
            cname = _component_name(label, name, index, {f.component for f in functions})
            functions.append(ImfitFunction(name, cname, len(blocks), index))
        elif functions and key in _ORDER[functions[-1].name]:
            f = functions[-1]
            if key in f.params:
                raise ModelError(f"{at}: parameter {key} given twice for FUNCTION {f.name}")
            f.params[key] = _parse_value(rest, at)
        elif functions:
            f = functions[-1]
            raise ModelError(f"{at}: {key!r} is not a parameter of IMFIT's {f.name} "
                             f"(it has {', '.join(_ORDER[f.name])})")
        else:
            raise ModelError(f"{at}: unexpected {key!r} (expected an image option "
                             f"{sorted(set(IMFIT_OPTIONS))}, X0, Y0 or FUNCTION)")
    if not functions:
        raise ModelError(f"{where}: no FUNCTION found")
    for f in functions:
        missing = [p for p in _ORDER[f.name] if p not in f.params]
        if missing:
            raise ModelError(f"{where}: FUNCTION {f.name} ({f.component}) lacks {', '.join(missing)}")
    notes: list[str] = []
    components = _components(functions, blocks, zeropoint, shape, notes)
    model = Model(components, float(zeropoint))
    model.layout(1)  # validates ties and values
    dropped = [n for n in notes if n.startswith("limits")]
    if dropped:
        warnings.warn(f"{where}: " + "; ".join(dropped), GalprofWarning, stacklevel=2)
    return ImfitConfig(model, functions, options, blocks, notes)


def _component_name(label, function, index, taken) -> str:
    if label:
        name = re.sub(r"[^A-Za-z0-9_]+", "_", label).strip("_")
        if name and name not in taken:
            return name
    return f"{function.lower().replace('_', '')}{index}"


def _bounds(spec, limits, convert, key, notes):
    """galprof bounds from IMFIT limits through the monotonic ``convert``, intersected with the
    profile's validity domain (never widened)."""
    if limits is None:
        return None
    a, b = sorted((convert(limits[0]), convert(limits[1])))
    dlo, dhi = spec.domain
    lo, hi = a, b
    if dlo is not None and lo < dlo:
        lo = dlo
    if dhi is not None and hi > dhi:
        hi = dhi
    if (lo, hi) != (a, b):
        notes.append(f"bounds of {key}: IMFIT's limits give [{a:g}, {b:g}], narrowed to [{lo:g}, {hi:g}] "
                     f"(the validity domain of {spec.name})")
    if not hi > lo:
        raise ModelError(f"{key}: IMFIT's limits {limits} leave nothing inside galprof's domain {spec.domain}")
    return (lo, hi)


def _param(profile, pname, v: _Value, convert, key, notes) -> Parameter:
    spec = profile.spec(pname)
    value = convert(v.value)
    if v.fixed:
        return Parameter(value=value, fixed=True)
    return Parameter(value=value, fixed=False, bounds=_bounds(spec, v.limits, convert, key, notes))


def _components(functions, blocks, zeropoint, shape, notes) -> list[Component]:
    comps = []
    owner: dict[int, str] = {}  # block -> component holding x0, y0
    identity = lambda v: v
    for f in functions:
        prof_name, mapping, ipar, radius, fixed_values = _FUNCTIONS[f.name]
        profile = get_profile(prof_name)
        params: dict[str, Parameter] = {}
        X, Y = blocks[f.block - 1]
        has_centre = any(s.name == "x0" for s in profile.params)
        if has_centre:
            if f.block in owner:
                params["x0"] = Parameter(tie=Tie(f"{owner[f.block]}.x0"))
                params["y0"] = Parameter(tie=Tie(f"{owner[f.block]}.y0"))
            else:
                owner[f.block] = f.component
                params["x0"] = _param(profile, "x0", X, identity, f"{f.component}.x0", notes)
                params["y0"] = _param(profile, "y0", Y, identity, f"{f.component}.y0", notes)
        p = f.params
        if "PA" in p:
            params["pa"] = _param(profile, "pa", p["PA"], identity, f"{f.component}.pa", notes)
        if "ell" in p:
            params["q"] = _param(profile, "q", p["ell"], lambda e: 1.0 - e, f"{f.component}.q", notes)
        for ipn, gpn in mapping.items():
            conv = (lambda s: s * _FWHM_PER_SIGMA) if ipn == "sigma" else identity
            params[gpn] = _param(profile, gpn, p[ipn], conv, f"{f.component}.{gpn}", notes)
        if "c0" in mapping.values() and "c0" not in params:
            params["c0"] = Parameter(value=0.0, fixed=True)
        for gpn, val in fixed_values.items():
            params[gpn] = Parameter(value=val, fixed=True)
        if f.name == "TiltedSkyPlane":
            _tilted_sky(f, params, X, Y, shape, notes)
        if ipar is not None:
            params["mag"] = _mag_parameter(f, profile, params, ipar, radius, zeropoint, notes)
        comps.append(Component(f.component, profile, params))
    return comps


def _tilted_sky(f, params, X, Y, shape, notes):
    if shape is None:
        raise ModelError(f"{f.component}: TiltedSkyPlane needs the image shape (read_imfit_config(..., shape=))")
    ny, nx = shape
    xc, yc = (nx + 1) / 2.0, (ny + 1) / 2.0
    sky, mx, my = params["sky"], params["dsdx"], params["dsdy"]
    shift = float(mx.value) * (xc - X.value) + float(my.value) * (yc - Y.value)
    if not (mx.fixed and my.fixed) and sky.bounds is not None:
        raise ModelError(f"{f.component}: limits on a TiltedSkyPlane's I_0 with free slopes cannot be carried to "
                         "galprof's level at the stamp centre; remove them")
    bounds = None if sky.bounds is None else (sky.bounds[0] + shift, sky.bounds[1] + shift)
    params["sky"] = Parameter(value=float(sky.value) + shift, fixed=sky.fixed, bounds=bounds)
    if not (X.fixed and Y.fixed):
        notes.append(f"{f.component}: the block's X0, Y0 only set where I_0 is measured; galprof's tiltedsky "
                     "has no centre, they are not fitted for it")


def _mag_parameter(f, profile, params, ipar, radius, zeropoint, notes) -> Parameter:
    v = f.params[ipar]
    if not v.value > 0:
        raise ModelError(f"{f.component}: {ipar} = {v.value:g}; galprof's magnitude needs a positive intensity")
    if f.name == "PointSource":
        mag = float(flux_to_mag(v.value, zeropoint))
        if v.fixed:
            return Parameter(value=mag, fixed=True)
        if v.limits is not None and v.limits[0] > 0:
            return Parameter(value=mag, bounds=tuple(sorted(float(flux_to_mag(x, zeropoint)) for x in v.limits)))
        if v.limits is not None and v.limits[1] < math.inf:
            notes.append(f"{ipar} ({f.component}): the upper limit {v.limits[1]:g} is a lower bound on mag, the "
                         f"lower limit {v.limits[0]:g} is implied")
            return Parameter(value=mag, bounds=(float(flux_to_mag(v.limits[1], zeropoint)), None))
        return Parameter(value=mag)
    shape_keys = {s.name: f"{f.component}.{s.name}" for s in profile.shape_params}
    shape_keys["q"] = f"{f.component}.q"
    shape_keys["c0"] = f"{f.component}.c0"
    values = {}
    for name in shape_keys:
        par = params.get(name)
        values[name] = par.value if par is not None and par.value is not None else profile.spec(name).default
    mag = float(mag_from_intensity(profile, values, v.value, zeropoint, radius))
    shape_free = any(params.get(n) is not None and not params[n].fixed for n in shape_keys)
    if v.fixed and shape_free:
        return Parameter(tie=intensity_tie(f.component, profile.name, v.value, zeropoint, radius, shape_keys))
    if v.fixed:
        return Parameter(value=mag, fixed=True)
    if v.limits is not None and not (v.limits[0] <= 0 and math.isinf(v.limits[1])):
        notes.append(f"limits of {ipar} ({f.component}): {v.limits[0]:g},{v.limits[1]:g} are not carried over "
                     "(galprof fits the total magnitude; a limit on a surface brightness depends on the shape)")
    return Parameter(value=mag)


# ----------------------------------------------------------------------------------------------
# Back to IMFIT's parameters


def imfit_parameters(config: ImfitConfig, values: Mapping[str, float],
                     covariance: np.ndarray | None = None, keys: Sequence[str] | None = None,
                     shape: tuple[int, int] | None = None) -> dict[str, tuple[float, float]]:
    """galprof values of a model read by :func:`read_imfit_config` as IMFIT's numbered parameters
    (``X0_1``, ``PA_1``, ``I_e_1`` ..., the names pyimfit's ``numberedParameterNames`` gives).

    Returns ``{name: (value, error)}``; errors (NaN without ``covariance``) follow from galprof's
    covariance (``keys`` order, as in :class:`~galprof.fitting.FitResult`) by the delta method.
    """
    out: dict[str, tuple[float, float]] = {}
    keys = list(keys) if keys is not None else list(values)
    cov = None if covariance is None else np.asarray(covariance, dtype=np.float64)
    pos = {k: i for i, k in enumerate(keys)}

    def err_linear(key, scale=1.0):
        if cov is None or key not in pos:
            return float("nan")
        return math.sqrt(max(cov[pos[key], pos[key]], 0.0)) * abs(scale)

    seen_blocks = set()
    for f in config.functions:
        c = f.component
        prof_name, mapping, ipar, radius, _ = _FUNCTIONS[f.name]
        profile = get_profile(prof_name)
        if f.block not in seen_blocks:
            seen_blocks.add(f.block)
            if f"{c}.x0" in values:
                out[f"X0_{f.block}"] = (float(values[f"{c}.x0"]), err_linear(f"{c}.x0"))
                out[f"Y0_{f.block}"] = (float(values[f"{c}.y0"]), err_linear(f"{c}.y0"))
            else:
                X, Y = config.blocks[f.block - 1]
                out[f"X0_{f.block}"] = (X.value, float("nan"))
                out[f"Y0_{f.block}"] = (Y.value, float("nan"))
        i = f.index
        for ip in _ORDER[f.name]:
            name = f"{ip}_{i}"
            if ip == "PA":
                out[name] = (float(values[f"{c}.pa"]), err_linear(f"{c}.pa"))
            elif ip == "ell":
                out[name] = (1.0 - float(values[f"{c}.q"]), err_linear(f"{c}.q"))
            elif ip == ipar:
                out[name] = _intensity_with_error(profile, c, values, config.zeropoint, radius, cov, pos,
                                                  point=f.name == "PointSource")
            elif f.name == "TiltedSkyPlane" and ip == "I_0":
                if shape is None:
                    raise ModelError("TiltedSkyPlane: imfit_parameters needs the image shape")
                X, Y = config.blocks[f.block - 1]
                ny, nx = shape
                level = float(values[f"{c}.sky"]) - float(values[f"{c}.dsdx"]) * ((nx + 1) / 2 - X.value) \
                    - float(values[f"{c}.dsdy"]) * ((ny + 1) / 2 - Y.value)
                out[name] = (level, err_linear(f"{c}.sky"))
            else:
                gpn = mapping[ip]
                scale = 1.0 / _FWHM_PER_SIGMA if ip == "sigma" else 1.0
                out[name] = (float(values[f"{c}.{gpn}"]) * scale, err_linear(f"{c}.{gpn}", scale))
    return out


def _intensity_with_error(profile, comp, values, zeropoint, radius, cov, pos, point=False):
    names = ["mag"] + ([] if point else [s.name for s in profile.shape_params] + ["q", "c0"])
    keys = [f"{comp}.{n}" for n in names]
    x = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, requires_grad=True)

    def fn(v):
        if point:
            return mag_to_flux(v[0], zeropoint)
        p = {n: v[j] for j, n in enumerate(names) if n != "mag"}
        return intensity_from_mag(profile, p, v[0], zeropoint, radius)

    val = fn(x)
    if cov is None:
        return float(val.detach()), float("nan")
    (grad,) = torch.autograd.grad(val, x)
    g = np.zeros(len(pos))
    for j, k in enumerate(keys):
        if k in pos:
            g[pos[k]] = float(grad[j])
    var = float(g @ np.nan_to_num(cov) @ g)
    return float(val.detach()), math.sqrt(max(var, 0.0))
