"""GALFIT files: feedme (input) files and constraint files -> galprof models; feedme and image
block (``imgblock.fits``) writers.

GALFIT and galprof share their conventions (pixel (1, 1) at the centre of the first pixel, PA
counter-clockwise from +y, ``q = b/a``, semi-major radii in pixels, boxiness ``C0``); the differences
converted here (docs/galfit_imfit.md):

* GALFIT's magnitudes are ``J - 2.5 log10(flux / EXPTIME)`` (``J`` the zero point of line ``J)``,
  ``EXPTIME`` from the image header, 1 if absent); galprof's are ``zeropoint - 2.5 log10(flux)``, so
  the model's zero point is ``J + 2.5 log10(EXPTIME)``.
* Ferrer and King give the central surface brightness ``mu(0)`` in mag/arcsec^2 (plate scale ``K)``);
  galprof fits the total magnitude, computed with the profile's own normalisation. A fixed ``mu(0)``
  with a free shape becomes a tie of ``mag`` to the shape, so the model is GALFIT's exactly.
* The sky's gradient is about the centre of the fitting region, which is galprof's stamp centre once
  the region is cut out.

What GALFIT has and galprof does not (nuker, edgedisk, Fourier modes, bending modes, spiral
rotation, truncations, diffusion kernels, constraints on differences or ratios within a range)
raises :class:`~galprof.errors.ModelError` naming it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError, ModelError
from ..model import Component, Model
from ..params import Parameter, Tie
from ..profiles import get_profile
from ._surface import intensity_from_mag, intensity_tie, log10_pixel_area, mag_from_intensity

__all__ = ["GalfitSetup", "GalfitFeedme", "read_feedme", "read_constraints", "write_feedme", "write_imgblock",
           "is_feedme", "galfit_header_cards", "GALFIT_TYPES"]

#: GALFIT component type -> (galprof profile, {GALFIT parameter number: galprof parameter}); the
#: position (1), axis ratio (9), PA (10) and C0 lines are common to all but psf and sky
GALFIT_TYPES: dict[str, tuple[str, dict[str, str]]] = {
    "sersic": ("sersic", {"3": "mag", "4": "re", "5": "n"}),
    "devauc": ("devauc", {"3": "mag", "4": "re"}),
    "expdisk": ("expdisk", {"3": "mag", "4": "rs"}),
    "gaussian": ("gaussian", {"3": "mag", "4": "fwhm"}),
    "moffat": ("moffat", {"3": "mag", "4": "fwhm", "5": "beta"}),
    "ferrer": ("ferrer", {"3": "mu0", "4": "rout", "5": "alpha", "6": "beta"}),
    "king": ("king", {"3": "mu0", "4": "rc", "5": "rt", "6": "alpha"}),
    "psf": ("psf", {"3": "mag"}),
    "sky": ("sky", {"1": "sky", "2": "dsdx", "3": "dsdy"}),
}
_SHAPE_NUMBERS = {"9": "q", "10": "pa", "C0": "c0"}
_PROFILE_TO_TYPE = {"sersic": "sersic", "devauc": "devauc", "expdisk": "expdisk", "gaussian": "gaussian",
                    "moffat": "moffat", "ferrer": "ferrer", "king": "king", "psf": "psf", "sky": "sky",
                    "tiltedsky": "sky"}
#: GALFIT component types galprof does not have
_UNSUPPORTED = ("nuker", "edgedisk", "sersic2", "devauc2", "expdisk2", "lorentz", "gaussian2")
#: header keyword stems of each galprof parameter (GALFIT's where its documentation names them)
_HEADER_KEYS = {"x0": "XC", "y0": "YC", "mag": "MAG", "re": "RE", "n": "N", "rs": "RS", "fwhm": "FWHM",
                "beta": "BETA", "mu0": "MU0", "rout": "ROUT", "alpha": "ALPHA", "rc": "RC", "rt": "RT",
                "q": "AR", "pa": "PA", "c0": "C0", "sky": "SKY", "dsdx": "DSDX", "dsdy": "DSDY"}
_COMMENTS = {
    "mag": "Integrated magnitude", "re": "R_e (effective radius)   [pix]", "n": "Sersic index n",
    "rs": "R_s (disk scale-length)   [pix]", "fwhm": "FWHM   [pix]", "beta": "Moffat powerlaw",
    "mu0": "Central surface brightness [mag/arcsec^2]", "rout": "Outer truncation radius   [pix]",
    "alpha": "Alpha", "rc": "Core radius Rc   [pix]", "rt": "Truncation radius Rt   [pix]",
    "q": "Axis ratio (b/a)", "pa": "Position angle (PA) [deg: Up=0, Left=90]", "c0": "Diskyness(-)/Boxyness(+)",
    "sky": "Sky background at center of fitting region [ADUs]", "dsdx": "dsky/dx (sky gradient in x)  [ADUs/pix]",
    "dsdy": "dsky/dy (sky gradient in y)  [ADUs/pix]",
}


@dataclass
class GalfitSetup:
    """The control lines (``A)`` to ``P)``) of a feedme file.

    Paths are as written in the file; :meth:`path` resolves one (relative to the feedme's folder,
    then to the working directory). ``region`` is ``(xmin, xmax, ymin, ymax)`` (1-based, inclusive;
    None: the whole image); ``zeropoint`` is GALFIT's ``J)``; ``exptime`` the image's ``EXPTIME``
    (1 if absent), so that galprof's model zero point is ``zeropoint + 2.5 log10(exptime)``.
    """

    image: str | None = None
    output: str | None = "imgblock.fits"
    sigma: str | None = None
    psf: str | None = None
    psf_sampling: int = 1
    mask: str | None = None
    constraints: str | None = None
    region: tuple[int, int, int, int] | None = None
    conv_box: tuple[int, int] | None = None
    zeropoint: float = 0.0
    plate_scale: tuple[float, float] = (1.0, 1.0)
    display: str = "regular"
    option: int = 0
    exptime: float = 1.0
    min_sigma: float | None = None
    folder: Path = field(default_factory=Path.cwd)
    #: component name -> GALFIT's ``Z)`` (True: left out of the output model image)
    skip: dict[str, bool] = field(default_factory=dict)

    @property
    def model_zeropoint(self) -> float:
        return self.zeropoint + 2.5 * math.log10(self.exptime)

    def path(self, name: str | None) -> Path | None:
        """The file ``name`` (as written in the feedme), or None for ``none``/blank."""
        if name is None or name.strip().lower() in ("", "none"):
            return None
        p = Path(name)
        if p.is_absolute():
            return p
        for base in (self.folder, Path.cwd()):
            if (base / p).exists():
                return base / p
        return self.folder / p


@dataclass
class GalfitFeedme:
    """A feedme file read into galprof: the setup, the model, and GALFIT's component numbering."""

    setup: GalfitSetup
    model: Model
    #: (GALFIT component number, GALFIT type, galprof component name), in file order
    components: list[tuple[int, str, str]]
    notes: list[str] = field(default_factory=list)


def is_feedme(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a GALFIT feedme: a ``.feedme``/``.galfit`` file, or a text file with
    ``A)`` and ``0)`` lines (GALFIT's own output ``galfit.NN`` included)."""
    p = Path(path)
    if p.suffix.lower() in (".feedme", ".galfit"):
        return True
    if not p.is_file() or p.suffix.lower() in (".fits", ".fit", ".yaml", ".yml", ".csv", ".ecsv"):
        return False
    try:
        text = p.read_text(errors="strict")[:200_000]
    except (UnicodeDecodeError, OSError):
        return False
    keys = {m.group(1) for m in re.finditer(r"^\s*([A-Z0-9]+)\)", text, flags=re.M)}
    return {"A", "0"} <= keys


# ----------------------------------------------------------------------------------------------
# Reading


def _split(line: str) -> tuple[str, list[str]] | None:
    body = line.split("#", 1)[0].strip()
    m = re.match(r"^([A-Za-z0-9]+)\)\s*(.*)$", body)
    if not m:
        return None
    return m.group(1), m.group(2).split()


def read_feedme(source: str | os.PathLike, *, exptime: float | None = None) -> GalfitFeedme:
    """Read a GALFIT feedme file (or GALFIT's output ``galfit.NN``) into a galprof model.

    Parameters
    ----------
    source : path to the file (or the text itself)
    exptime : float, optional
        ``EXPTIME`` of the image; by default read from the image's header (1 if the image or the
        keyword is missing), as GALFIT does.

    Raises
    ------
    ModelError
        For component types, parameters or constraints galprof does not have, and malformed lines.
    """
    if isinstance(source, os.PathLike) or (isinstance(source, str) and "\n" not in source):
        path = Path(source)
        if not path.is_file():
            raise ModelError(f"feedme file {str(path)!r} does not exist")
        text, where, folder = path.read_text(), str(path), path.resolve().parent
    else:
        text, where, folder = str(source), "feedme", Path.cwd()
    setup = GalfitSetup(folder=folder)
    blocks: list[tuple[int, dict[str, tuple[list[str], int]]]] = []
    current: dict[str, tuple[list[str], int]] | None = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        parsed = _split(raw)
        if parsed is None:
            continue
        key, tokens = parsed
        at = f"{where}, line {lineno}"
        if key == "0":
            if not tokens:
                raise ModelError(f"{at}: component type missing after '0)'")
            current = {"0": (tokens, lineno)}
            blocks.append((lineno, current))
        elif current is None and key.isalpha() and len(key) == 1:
            _setup_line(setup, key, tokens, at)
        elif current is not None:
            if key in current:
                raise ModelError(f"{at}: parameter {key}) given twice in one component")
            current[key] = (tokens, lineno)
        else:
            raise ModelError(f"{at}: parameter line {key}) before any component ('0) type')")
    if not blocks:
        raise ModelError(f"{where}: no component ('0) type' line) found")
    if exptime is None:
        exptime = _image_exptime(setup)
    if not exptime > 0:
        raise ModelError(f"{where}: EXPTIME must be positive, got {exptime}")
    setup.exptime = float(exptime)
    zp = setup.model_zeropoint
    components, numbering, notes = [], [], []
    raw_values: dict[str, dict[str, float]] = {}
    for number, (_, block) in enumerate(blocks, start=1):
        comp, gtype, values = _component(number, block, setup, zp, where, notes)
        components.append(comp)
        numbering.append((number, gtype, comp.name))
        raw_values[comp.name] = values
    model = Model(components, zp)
    if setup.constraints is not None and setup.path(setup.constraints) is not None:
        cpath = setup.path(setup.constraints)
        if not cpath.is_file():
            raise ModelError(f"{where}: constraint file {str(cpath)!r} (line G) does not exist")
        read_constraints(cpath, model, numbering, raw_values)
    model.layout(1)
    return GalfitFeedme(setup, model, numbering, notes)


def _image_exptime(setup: GalfitSetup) -> float:
    path = setup.path(setup.image)
    if path is None or not path.is_file():
        return 1.0
    from astropy.io import fits

    try:
        header = fits.getheader(path)
    except OSError:
        return 1.0
    value = header.get("EXPTIME", 1.0)
    try:
        return float(value)
    except (TypeError, ValueError):
        return 1.0


def _setup_line(setup: GalfitSetup, key: str, tokens: list[str], at: str) -> None:
    first = tokens[0] if tokens else None

    def nums(n, kind=float):
        try:
            vals = [kind(t) for t in tokens[:n]]
        except ValueError:
            raise ModelError(f"{at}: {key}) expects {n} number(s), got {' '.join(tokens)!r}") from None
        if len(vals) != n:
            raise ModelError(f"{at}: {key}) expects {n} number(s), got {' '.join(tokens)!r}")
        return vals

    none = lambda v: None if v is None or v.lower() == "none" else v
    if key == "A":
        setup.image = none(first)
    elif key == "B":
        setup.output = first
    elif key == "C":
        setup.sigma = none(first)
        if len(tokens) > 1:
            try:
                setup.min_sigma = float(tokens[1])
            except ValueError:
                raise ModelError(f"{at}: C) minimum sigma must be a number, got {tokens[1]!r}") from None
    elif key == "D":
        setup.psf = none(first)
        if len(tokens) > 1:
            raise ModelError(f"{at}: D) gives a charge-diffusion kernel ({tokens[1]}); galprof has no "
                             "diffusion kernel: convolve the PSF with it instead")
    elif key == "E":
        (setup.psf_sampling,) = nums(1, int)
    elif key == "F":
        setup.mask = none(first)
    elif key == "G":
        setup.constraints = none(first)
    elif key == "H":
        xmin, xmax, ymin, ymax = nums(4, int)
        if xmin < 1 or ymin < 1 or xmax < xmin or ymax < ymin:
            raise ModelError(f"{at}: H) region {xmin} {xmax} {ymin} {ymax} is not xmin xmax ymin ymax with "
                             "1 <= min <= max")
        setup.region = (xmin, xmax, ymin, ymax)
    elif key == "I":
        setup.conv_box = tuple(nums(2, int))
    elif key == "J":
        (setup.zeropoint,) = nums(1)
    elif key == "K":
        vals = [float(t) for t in tokens[:2]] if tokens else []
        if len(vals) == 1:
            vals = vals * 2
        if len(vals) != 2 or min(vals) <= 0:
            raise ModelError(f"{at}: K) plate scale must be 'dx dy' (arcsec/pixel, positive)")
        setup.plate_scale = (vals[0], vals[1])
    elif key == "O":
        setup.display = first or "regular"
    elif key == "P":
        (setup.option,) = nums(1, int)
    # other control letters (S, U, W: interactive and output options of newer GALFIT versions)
    # do not change the model or the fit


def _number(tokens: list[str], at: str, what: str) -> float:
    try:
        return float(tokens[0])
    except (IndexError, ValueError):
        raise ModelError(f"{at}: {what} must be a number, got {' '.join(tokens)!r}") from None


def _flag(tokens: list[str], i: int, at: str) -> bool:
    """GALFIT's fit toggle: 1 = free, 0 = fixed (absent: free)."""
    if len(tokens) <= i:
        return True
    t = tokens[i]
    if t not in ("0", "1"):
        raise ModelError(f"{at}: fit toggle must be 0 or 1, got {t!r}")
    return t == "1"


def _component(number, block, setup, zp, where, notes):
    tokens, lineno = block["0"]
    gtype = tokens[0].lower()
    at = f"{where}, line {lineno}"
    if gtype not in GALFIT_TYPES:
        known = ", ".join(sorted(GALFIT_TYPES))
        what = "has no galprof equivalent" if gtype in _UNSUPPORTED else "is not a GALFIT component type"
        raise ModelError(f"{at}: component {number} ({gtype}) {what}; galprof reads {known}")
    prof_name, numbers = GALFIT_TYPES[gtype]
    name = f"{gtype}{number}"
    params: dict[str, Parameter] = {}
    values: dict[str, float] = {}
    free: dict[str, bool] = {}
    for key, (toks, ln) in block.items():
        here = f"{where}, line {ln}"
        if key == "0":
            continue
        if key == "Z":
            setup.skip[name] = bool(toks) and toks[0] == "1"
        elif gtype != "sky" and key == "1":
            if len(toks) < 2:
                raise ModelError(f"{here}: 1) needs 'x y' (and fit toggles)")
            values["x0"], values["y0"] = _number(toks, here, "x"), _number(toks[1:], here, "y")
            free["x0"], free["y0"] = _flag(toks, 2, here), _flag(toks, 3, here)
        elif key in numbers:
            pname = numbers[key]
            values[pname] = _number(toks, here, f"{key})")
            free[pname] = _flag(toks, 1, here)
        elif key in _SHAPE_NUMBERS and gtype not in ("psf", "sky"):
            pname = _SHAPE_NUMBERS[key]
            values[pname] = _number(toks, here, f"{key})")
            free[pname] = _flag(toks, 1, here)
        elif re.fullmatch(r"[0-9]+", key):
            # unused numbered lines of GALFIT's templates ("6) 0.0000 0 # -----"): GALFIT ignores them
            continue
        elif re.fullmatch(r"[FBRT][0-9]*[a-z]*|R[0-9]+|To[0-9]*|Ti[0-9]*", key):
            kind = {"F": "Fourier mode", "B": "bending mode", "R": "coordinate rotation (spiral)",
                    "T": "truncation"}[key[0]]
            raise ModelError(f"{here}: component {number} ({gtype}) has a {kind} ({key}); galprof has no "
                             "equivalent")
        else:
            raise ModelError(f"{here}: unknown parameter {key}) for component {number} ({gtype})")
    profile = get_profile(prof_name)
    required = [p for p in numbers.values()] + ([] if gtype == "sky" else ["x0", "y0"])
    missing = [p for p in required if p not in values and (p != "beta" or gtype != "ferrer")]
    if missing:
        raise ModelError(f"{where}: component {number} ({gtype}) lacks {', '.join(missing)}")
    if gtype == "ferrer" and "beta" not in values:
        values["beta"], free["beta"] = 0.0, False
    if gtype == "sky" and (values.get("dsdx", 0.0) != 0.0 or values.get("dsdy", 0.0) != 0.0
                           or free.get("dsdx") or free.get("dsdy")):
        profile = get_profile("tiltedsky")
    elif gtype == "sky":
        values.pop("dsdx", None), values.pop("dsdy", None)
    for pname, v in values.items():
        if pname == "mu0":
            continue
        params[pname] = Parameter(value=v, fixed=not free[pname])
    if "c0" in params and params["c0"].fixed and params["c0"].value == 0.0:
        params["c0"] = Parameter(value=0.0, fixed=True)
    if "mu0" in values:
        params["mag"] = _mag_from_mu0(name, profile, params, values["mu0"], free["mu0"], setup, zp)
    return Component(name, profile, params), gtype, values


def _shape_values(profile, params):
    out = {}
    for s in (*profile.shape_params, profile.spec("q"), profile.spec("c0")):
        p = params.get(s.name)
        out[s.name] = p.value if p is not None and p.value is not None else s.default
    return out


def _mag_from_mu0(name, profile, params, mu0, free, setup: GalfitSetup, zp) -> Parameter:
    """GALFIT's central surface brightness (mag/arcsec^2) as galprof's total magnitude."""
    intensity = 10.0 ** (-0.4 * (mu0 - zp - 2.5 * log10_pixel_area(setup.plate_scale)))
    mag = float(mag_from_intensity(profile, _shape_values(profile, params), intensity, zp))
    shape_free = any(not p.fixed for k, p in params.items() if k not in ("x0", "y0", "pa"))
    if not free and shape_free:
        keys = {s: f"{name}.{s}" for s in _shape_values(profile, params)}
        return Parameter(tie=intensity_tie(name, profile.name, intensity, zp, None, keys))
    return Parameter(value=mag, fixed=not free)


def mu0_from_mag(profile, values: Mapping[str, float], mag: float, zeropoint: float,
                 plate_scale: tuple[float, float]) -> float:
    """Central surface brightness (mag/arcsec^2) of a profile of total magnitude ``mag``."""
    intensity = float(intensity_from_mag(profile, values, mag, zeropoint))
    return zeropoint - 2.5 * math.log10(intensity) + 2.5 * log10_pixel_area(plate_scale)


# ----------------------------------------------------------------------------------------------
# Constraint files

_NAME_TO_NUMBER = {"x": "1x", "y": "1y", "mag": "3", "re": "4", "rs": "4", "n": "5", "q": "9", "pa": "10",
                   "c": "C0", "c0": "C0", "sky": "1", "mu": "3", "mu0": "3", "fwhm": "4", "rt": "5", "rc": "4",
                   "rout": "4", "beta": None, "alpha": None, "powerlaw": "5", "pl": "5"}


def _constraint_param(gtype: str, pname: str, at: str) -> str:
    """galprof parameter of a constraint's parameter column (GALFIT's name or number)."""
    p = pname.lower()
    if p in ("alpha", "beta"):
        table = {("ferrer", "alpha"): "alpha", ("ferrer", "beta"): "beta", ("king", "alpha"): "alpha",
                 ("moffat", "beta"): "beta"}
        if (gtype, p) not in table:
            raise ModelError(f"{at}: {gtype} has no parameter {pname!r}")
        return table[(gtype, p)]
    number = _NAME_TO_NUMBER.get(p, p)
    if number in ("1x", "1y"):
        if gtype == "sky":
            raise ModelError(f"{at}: the sky has no {p} position")
        return "x0" if number == "1x" else "y0"
    if re.fullmatch(r"f[0-9]+[ap]|b[0-9]+|r[0-9]+", p):
        raise ModelError(f"{at}: constraint on {pname!r} (Fourier/bending/rotation mode): galprof has no such mode")
    prof, numbers = GALFIT_TYPES[gtype]
    if number in numbers:
        g = numbers[number]
        if g == "mu0":
            raise ModelError(f"{at}: constraint on {gtype}'s mu(0): galprof fits the total magnitude, on which a "
                             "range or tie of the central surface brightness has no exact form")
        return g
    if number in _SHAPE_NUMBERS and gtype not in ("psf", "sky"):
        return _SHAPE_NUMBERS[number]
    raise ModelError(f"{at}: {gtype} has no parameter {pname!r}")


def read_constraints(path: str | os.PathLike, model: Model, numbering: Sequence[tuple[int, str, str]],
                     start_values: Mapping[str, Mapping[str, float]] | None = None) -> None:
    """Apply a GALFIT constraint file to ``model`` (in place).

    Forms read (GALFIT's documentation, ``EXAMPLE.CONSTRAINTS``):

    * ``1_2_5 x offset``: components 2 and 5 keep their offsets from component 1 (as in the
      feedme): ties ``c2.x0 = c1.x0 + (x2 - x1)``;
    * ``1_5 re ratio``: ties ``c5.re = c1.re * (re5 / re1)``;
    * ``3 n 0.7 to 5``: bounds [0.7, 5] on component 3's ``n``;
    * ``2 x -1 0.5``: bounds [x - 1, x + 0.5] about the feedme's value.

    Ranges on differences or ratios of two components (``3-7 mag -0.5 3``, ``3/5 re 1 3``) have no
    galprof equivalent (they need a parameter that is not a profile's) and raise ModelError.
    """
    path = Path(path)
    comps = {number: (gtype, name) for number, gtype, name in numbering}
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        body = raw.split("#", 1)[0].strip()
        if not body:
            continue
        at = f"{path}, line {lineno}"
        tokens = body.split()
        if len(tokens) < 3:
            raise ModelError(f"{at}: a constraint needs components, a parameter and a range or operation")
        spec, pname, rest = tokens[0], tokens[1], tokens[2:]
        if re.fullmatch(r"[0-9]+[-/][0-9]+", spec):
            raise ModelError(f"{at}: {spec} {pname} constrains a difference or ratio of two components to a "
                             "range; galprof has no equivalent (tie them with 'offset'/'ratio', or bound each)")
        try:
            numbers = [int(t) for t in spec.split("_")]
        except ValueError:
            raise ModelError(f"{at}: components must be numbers joined by '_', got {spec!r}") from None
        for n in numbers:
            if n not in comps:
                raise ModelError(f"{at}: component {n} is not in the feedme (it has {sorted(comps)})")
        targets = []
        for n in numbers:
            gtype, name = comps[n]
            targets.append((name, _constraint_param(gtype, pname, at)))
        op = " ".join(rest).lower()
        if op in ("offset", "ratio"):
            if len(targets) < 2:
                raise ModelError(f"{at}: '{op}' needs at least two components")
            ref_name, ref_p = targets[0]
            ref_v = float(model[ref_name].params[ref_p].value)
            for name, p in targets[1:]:
                v = float(model[name].params[p].value)
                if op == "offset":
                    expr = f"{ref_name}.{ref_p}" if v == ref_v else f"{ref_name}.{ref_p} + ({v - ref_v!r})"
                else:
                    if ref_v == 0:
                        raise ModelError(f"{at}: ratio to a parameter whose value is 0")
                    expr = f"{ref_name}.{ref_p}" if v == ref_v else f"{ref_name}.{ref_p} * ({v / ref_v!r})"
                model[name].params[p] = Parameter(tie=Tie(expr))
            continue
        nums = [t for t in rest if t.lower() != "to"]
        try:
            lo, hi = float(nums[0]), float(nums[1])
        except (IndexError, ValueError):
            raise ModelError(f"{at}: expected 'offset', 'ratio', 'lo to hi' or 'dlo dhi', got {op!r}") from None
        if len(targets) != 1:
            raise ModelError(f"{at}: a range applies to one component, got {spec}")
        name, p = targets[0]
        par = model[name].params[p]
        if par.tie is not None:
            raise ModelError(f"{at}: {name}.{p} is tied; it cannot also have a range")
        if "to" not in [t.lower() for t in rest]:
            lo, hi = float(par.value) + lo, float(par.value) + hi
        if not hi > lo:
            raise ModelError(f"{at}: range [{lo}, {hi}] is empty")
        par.bounds = (lo, hi)


# ----------------------------------------------------------------------------------------------
# Writing


def _fmt(v: float) -> str:
    return f"{float(v):.8g}"


def write_feedme(path: str | os.PathLike, model: Model, setup: GalfitSetup | None = None,
                 values: Mapping[str, float] | None = None, *, header: Sequence[str] = ()) -> list[Path]:
    """Write ``model`` (with ``values`` replacing its own, e.g. a fit's) as a GALFIT feedme.

    Ties of the form ``other.p`` / ``other.p + c`` / ``other.p * c`` and explicit bounds go to a
    constraint file written next to it (``<path>.constraints``, line ``G)``); other ties raise
    ModelError. ``mag`` of Ferrer and King components is written as GALFIT's ``mu(0)``. Returns the
    files written.
    """
    path = Path(path)
    setup = setup or GalfitSetup(zeropoint=model.zeropoint, folder=path.parent)
    if setup.region is None:
        raise ModelError("write_feedme: the setup needs a fitting region (line H); give the image size")
    vals = _values(model, values)
    zp = model.zeropoint
    lines = [f"# {h}" for h in header]
    constraints, names = [], {}
    for number, comp in enumerate(model.components, start=1):
        names[comp.name] = number
    comp_lines = []
    for number, comp in enumerate(model.components, start=1):
        gtype = _PROFILE_TO_TYPE.get(comp.profile.name)
        if gtype is None:
            raise ModelError(f"component {comp.name!r}: profile {comp.profile.name!r} has no GALFIT equivalent")
        comp_lines += ["", f"# Component number: {number}", f" 0) {gtype:<22s} #  Component type"]
        free = {s.name: not _is_fixed(comp, s.name) for s in comp.profile.params}
        v = {s.name: vals[f"{comp.name}.{s.name}"] for s in comp.profile.params}
        for s in comp.profile.params:
            c = _constraint_line(model, comp, s.name, number, names)
            if c:
                constraints.append(c)
        if gtype == "sky":
            for key, p in (("1", "sky"), ("2", "dsdx"), ("3", "dsdy")):
                comp_lines.append(_line(key, v.get(p, 0.0), free.get(p, False), _COMMENTS[p]))
        else:
            comp_lines.append(f" 1) {_fmt(v['x0'])}  {_fmt(v['y0'])}  {int(free['x0'])} {int(free['y0'])}"
                              "   #  Position x, y")
            for key, p in GALFIT_TYPES[gtype][1].items():
                if p == "mu0":
                    shape = {n: v[n] for n in v if n not in ("x0", "y0", "mag", "pa")}
                    mu0 = mu0_from_mag(comp.profile, shape, v["mag"], zp, setup.plate_scale)
                    comp_lines.append(_line(key, mu0, free["mag"], _COMMENTS["mu0"]))
                else:
                    comp_lines.append(_line(key, v[p], free[p], _COMMENTS[p]))
            if gtype != "psf":
                comp_lines.append(_line("9", v["q"], free["q"], _COMMENTS["q"]))
                comp_lines.append(_line("10", v["pa"], free["pa"], _COMMENTS["pa"]))
                if free["c0"] or v["c0"] != 0.0:
                    comp_lines.append(_line("C0", v["c0"], free["c0"], _COMMENTS["c0"]))
        skip = setup.skip.get(comp.name, False)
        comp_lines.append(f" Z) {int(skip):<22d} #  Skip this model in output image?  (yes=1, no=0)")
    written = [path]
    cons = setup.constraints
    if constraints:
        cpath = path.with_name(path.name + ".constraints")
        cpath.write_text("# GALFIT constraint file written by galprof\n"
                         "# components    parameter    operation\n" + "\n".join(constraints) + "\n")
        cons = cpath.name
        written.append(cpath)
    elif cons is not None:
        cons = None  # the model has no constraints (any the input had are in the values now)
    exptime_zp = zp - 2.5 * math.log10(setup.exptime)
    region = setup.region
    box = setup.conv_box
    lines += [
        "",
        "# IMAGE and GALFIT CONTROL PARAMETERS",
        f"A) {setup.image or 'none'}   # Input data image (FITS file)",
        f"B) {setup.output or 'imgblock.fits'}   # Output data image block",
        f"C) {setup.sigma or 'none'}" + (f" {setup.min_sigma}" if setup.min_sigma is not None else "")
        + "   # Sigma image name (made from data if blank or \"none\")",
        f"D) {setup.psf or 'none'}   # Input PSF image and (optional) diffusion kernel",
        f"E) {setup.psf_sampling}   # PSF fine sampling factor relative to data",
        f"F) {setup.mask or 'none'}   # Bad pixel mask (FITS image or ASCII coord list)",
        f"G) {cons or 'none'}   # File with parameter constraints (ASCII file)",
        "H) " + " ".join(str(int(r)) for r in region) + "   # Image region to fit (xmin xmax ymin ymax)",
        ("I) " + " ".join(str(int(b)) for b in box) if box else "I) 100 100")
        + "   # Size of the convolution box (x y)",
        f"J) {_fmt(exptime_zp)}   # Magnitude photometric zeropoint",
        f"K) {_fmt(setup.plate_scale[0])} {_fmt(setup.plate_scale[1])}   # Plate scale (dx dy) [arcsec per pixel]",
        f"O) {setup.display}   # Display type (regular, curses, both)",
        f"P) {setup.option}   # Options: 0=normal run; 1,2=make model/imgblock & quit",
    ]
    path.write_text("\n".join(lines + comp_lines) + "\n\n" + "=" * 80 + "\n")
    return written


def _line(key: str, value: float, free: bool, comment: str) -> str:
    return f"{key:>2s}) {_fmt(value):<14s} {int(free)}      #  {comment}"


def _is_fixed(comp: Component, pname: str) -> bool:
    p = comp.params[pname]
    if p.tie is not None:
        return True
    if p.fixed is not None:
        return bool(p.fixed)
    return comp.profile.spec(pname).fixed


def _values(model: Model, values: Mapping[str, float] | None) -> dict[str, float]:
    layout_vals = model.layout(1).values()
    out = {k: float(v[0]) for k, v in layout_vals.items()}
    if values:
        for k, v in values.items():
            if k in out:
                out[k] = float(v)
    return out


_TIE_FORMS = (re.compile(r"^\s*([A-Za-z_][\w]*)\.(\w+)\s*$"),
              re.compile(r"^\s*([A-Za-z_][\w]*)\.(\w+)\s*\+\s*\(?\s*([-+0-9.eE]+)\s*\)?\s*$"),
              re.compile(r"^\s*([A-Za-z_][\w]*)\.(\w+)\s*\*\s*\(?\s*([-+0-9.eE]+)\s*\)?\s*$"))


def _galfit_param_name(gtype: str, pname: str) -> str:
    return {"x0": "x", "y0": "y", "mag": "mag", "re": "re", "rs": "rs", "n": "n", "q": "q", "pa": "pa",
            "c0": "c", "fwhm": "4", "beta": "beta" if gtype != "ferrer" else "beta", "alpha": "alpha",
            "rout": "4", "rc": "4", "rt": "5", "sky": "1", "dsdx": "2", "dsdy": "3"}[pname]


def _constraint_line(model, comp, pname, number, names) -> str | None:
    p = comp.params[pname]
    gtype = _PROFILE_TO_TYPE[comp.profile.name]
    gp = _galfit_param_name(gtype, pname)
    if p.tie is not None:
        expr = p.tie.expr
        if not isinstance(expr, str) and pname == "mag" and gtype in ("ferrer", "king"):
            return None  # a fixed mu(0) with a free shape: written as mu(0) with toggle 0
        if not isinstance(expr, str):
            raise ModelError(f"{comp.name}.{pname}: a tie written as a function cannot go to a GALFIT constraint file")
        for i, form in enumerate(_TIE_FORMS):
            m = form.match(expr)
            if m and m.group(2) == pname and m.group(1) in names:
                op = "ratio" if i == 2 else "offset"
                return f"{names[m.group(1)]}_{number}    {gp}    {op}"
        raise ModelError(f"{comp.name}.{pname}: tie {expr!r} has no GALFIT form (same parameter of another "
                         "component, plus or times a constant)")
    if p.bounds is not None and not _is_fixed(comp, pname):
        lo, hi = p.bounds
        if lo is None or hi is None:
            raise ModelError(f"{comp.name}.{pname}: GALFIT constraints need both bounds, got {p.bounds}")
        if pname == "mag" and gtype in ("ferrer", "king"):
            raise ModelError(f"{comp.name}.mag: bounds on a Ferrer/King magnitude have no GALFIT form "
                             "(GALFIT fits mu(0))")
        return f"{number}    {gp}    {_fmt(lo)} to {_fmt(hi)}"
    return None


# ----------------------------------------------------------------------------------------------
# Image blocks


def _card_value(value: float, error: float | None, state: str, bad: bool = False) -> str:
    """GALFIT's header value: ``'v +/- e'`` (free), ``'[v]'`` (fixed), ``'{v}'`` (tied); ``*...*``
    marks a problem (at a bound, no finite error)."""
    v = f"{value:.4f}"
    if state == "fixed":
        return f"[{v}]"
    if state == "tied":
        return f"{{{v}}}"
    e = f"{error:.4f}" if error is not None and np.isfinite(error) else "nan"
    if bad:
        return f"*{v}* +/- *{e}*"
    return f"{v} +/- {e}"


def galfit_header_cards(model: Model, values: Mapping[str, float], errors: Mapping[str, float],
                        *, setup: GalfitSetup | None = None, bad: Sequence[str] = (),
                        region_shape: tuple[int, int] | None = None) -> list[tuple[str, object, str]]:
    """Per-component GALFIT header cards (``COMP_1``, ``1_XC``, ``1_MAG`` ...) of fitted values.

    Ferrer and King components get GALFIT's ``MU0`` (central surface brightness, mag/arcsec^2,
    its error by the delta method through the magnitude only) besides galprof's ``MAG``; sky
    components get ``XC, YC`` (the centre of the fitting region) like GALFIT's.
    """
    setup = setup or GalfitSetup(zeropoint=model.zeropoint)
    cards: list[tuple[str, object, str]] = []
    for i, comp in enumerate(model.components, start=1):
        gtype = _PROFILE_TO_TYPE.get(comp.profile.name, comp.profile.name)
        cards.append((f"COMP_{i}", gtype, f"Component type ({comp.name})"))
        if gtype == "sky" and region_shape is not None:
            ny, nx = region_shape
            x1 = setup.region[0] if setup.region else 1
            y1 = setup.region[2] if setup.region else 1
            cards.append((f"{i}_XC", _card_value(x1 - 1 + (nx + 1) / 2, None, "fixed"), "X center of the sky [pixel]"))
            cards.append((f"{i}_YC", _card_value(y1 - 1 + (ny + 1) / 2, None, "fixed"), "Y center of the sky [pixel]"))
        for s in comp.profile.params:
            if s.name == "c0" and _is_fixed(comp, "c0") and float(values[f"{comp.name}.c0"]) == 0.0:
                continue
            key = f"{comp.name}.{s.name}"
            p = comp.params[s.name]
            state = "tied" if p.tie is not None else ("fixed" if _is_fixed(comp, s.name) else "free")
            cards.append((f"{i}_{_HEADER_KEYS.get(s.name, s.name.upper())}",
                          _card_value(float(values[key]), errors.get(key), state, key in bad),
                          f"{comp.name}.{s.name} [{s.unit}]" if s.unit else f"{comp.name}.{s.name}"))
        if comp.profile.name == "sky":  # GALFIT writes the gradients of every sky
            cards.append((f"{i}_DSDX", _card_value(0.0, None, "fixed"), "Sky gradient in x [ADUs/pixel]"))
            cards.append((f"{i}_DSDY", _card_value(0.0, None, "fixed"), "Sky gradient in y [ADUs/pixel]"))
        if gtype in ("ferrer", "king"):
            shape = {s.name: float(values[f"{comp.name}.{s.name}"]) for s in comp.profile.params
                     if s.name not in ("x0", "y0", "mag", "pa")}
            mu0 = mu0_from_mag(comp.profile, shape, float(values[f"{comp.name}.mag"]), model.zeropoint,
                               setup.plate_scale)
            err = errors.get(f"{comp.name}.mag")
            state = "free" if not _is_fixed(comp, "mag") else "fixed"
            cards.append((f"{i}_MU0", _card_value(mu0, err, state), "Central surface brightness [mag/arcsec^2]"))
    return cards


def write_imgblock(path: str | os.PathLike, data: np.ndarray, model_image: np.ndarray,
                   cards: Sequence[tuple[str, object, str]], *, data_header=None,
                   components: Mapping[str, np.ndarray] | None = None) -> None:
    """Write a GALFIT-style image block: HDU 0 empty, 1 data, 2 model (with ``cards``),
    3 residual (data - model); with ``components``, one more HDU per component (like GALFIT's
    ``subcomps.fits``, appended here)."""
    from astropy.io import fits

    data = np.asarray(data, dtype=np.float32)
    model_image = np.asarray(model_image, dtype=np.float32)
    if data.shape != model_image.shape:
        raise DataError(f"imgblock: data {data.shape} and model {model_image.shape} differ in shape")
    primary = fits.PrimaryHDU()
    h1 = fits.ImageHDU(data, name="INPUT")
    if data_header is not None:
        for card in data_header.cards:
            if card.keyword and card.keyword not in ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND",
                                                     "PCOUNT", "GCOUNT", "XTENSION", "EXTNAME", "BSCALE",
                                                     "BZERO", "COMMENT", "HISTORY", ""):
                try:
                    h1.header[card.keyword] = (card.value, card.comment)
                except (ValueError, KeyError):
                    continue
    h2 = fits.ImageHDU(model_image, name="MODEL")
    h2.header["OBJECT"] = ("model", "")
    h2.header.add_comment("GALFIT-compatible image block written by galprof")
    for key, value, comment in cards:
        h2.header[key] = (value, comment)
    h3 = fits.ImageHDU(data - model_image, name="RESIDUAL")
    h3.header["OBJECT"] = ("residual map", "")
    hdus = [primary, h1, h2, h3]
    for name, img in (components or {}).items():
        hdus.append(fits.ImageHDU(np.asarray(img, dtype=np.float32), name=name.upper()[:68]))
    fits.HDUList(hdus).writeto(path, overwrite=True)


def mask_from_file(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """GALFIT's bad-pixel mask: a FITS image (non-zero = bad) or an ASCII list of ``x y`` pixels."""
    if path.suffix.lower() in (".fits", ".fit", ".fz") or path.name.lower().endswith(".fits.gz"):
        from .fits import read_image

        m = read_image(path)
        if m.shape != shape:
            raise DataError(f"mask {str(path)!r} has shape {m.shape}, the image {shape}")
        return m != 0
    mask = np.zeros(shape, dtype=bool)
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        body = raw.split("#", 1)[0].split()
        if not body:
            continue
        try:
            x, y = int(round(float(body[0]))), int(round(float(body[1])))
        except (IndexError, ValueError):
            raise DataError(f"{path}, line {lineno}: expected 'x y' of a bad pixel") from None
        if 1 <= x <= shape[1] and 1 <= y <= shape[0]:
            mask[y - 1, x - 1] = True
    return mask

