"""Catalogues of galaxies to fit: reading them, their column conventions, and loading each
galaxy's stamp (image, sigma, mask, PSF, starting values) as a :class:`Stamp`.

A galaxy whose files or values cannot be used becomes a :class:`Stamp` with a flag and a message
(never an exception): the pipeline records it and goes on. Problems with the catalogue as a whole
(missing file or ``id`` column, duplicate ids, a bad option) raise :class:`~galprof.errors.DataError`.

Columns (see docs/pipeline.md for the full description):

``id`` (required), ``image`` (or ``--image``), ``sigma`` or ``weight``, ``psf``, ``mask``
    File names relative to the catalogue's folder; ``file.fits[N]`` selects an HDU.
``mask_label``, ``mask_mode``
    The target's label when the mask is a segmentation map; ``background`` masks the other
    sources, ``exclusive`` keeps only the target's pixels.
``zeropoint``, ``pixel_scale``, ``gain``, ``read_noise``, ``sky``, ``exptime``, ``ncombine``
    Per-galaxy photometric and detector values (sigma maps are made from the last five when no
    sigma or weight map is given; see :mod:`galprof.noise`).
``x``, ``y`` or ``ra``, ``dec``; ``cutout_size``
    The source's position in its image (pixels, FITS convention, or degrees through the image's
    WCS): the starting centre, and where a cutout is made (with ``--cutout``).
``<component>_<param>``
    Starting values (free parameters) or values (fixed parameters), in the same units as the
    output table (the galaxy's zeropoint, the image's pixel frame).
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from .detect import DetectOptions
from .errors import DataError, GalprofError, PSFError
from .fitting.result import column
from .flags import Flag
from .io.fits import read_image_and_header
from .io.tables import read_table
from .model import Model
from .noise import sigma_from_gain
from .render import prepare_psf

__all__ = ["CATALOG_FORMATS", "MASK_MODES", "Catalog", "InputOptions", "Stamp", "read_catalog"]

#: catalogue file suffixes and the astropy reader used for each
CATALOG_FORMATS = {".csv": "ascii.csv", ".ecsv": "ascii.ecsv", ".fits": "fits", ".fit": "fits",
                   ".fits.gz": "fits", ".parquet": "parquet", ".pq": "parquet"}
MASK_MODES = ("background", "exclusive")
FILE_COLUMNS = ("image", "sigma", "weight", "psf", "mask")
NUMBER_COLUMNS = ("mask_label", "zeropoint", "pixel_scale", "gain", "read_noise", "sky", "exptime", "ncombine",
                  "x", "y", "ra", "dec", "cutout_size")
#: header keywords read (GALFIT's) when neither the catalogue nor an option gives the value
HEADER_KEYWORDS = {"gain": ("GAIN",), "read_noise": ("RDNOISE", "READNOIS"), "ncombine": ("NCOMBINE",)}
_MISSING = {"", "--", "nan", "none", "null"}
log = logging.getLogger("galprof")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".fits.gz" if name.endswith(".fits.gz") else path.suffix.lower()


def read_catalog(path: str | os.PathLike) -> Table:
    """Read a CSV, ECSV, FITS or Parquet catalogue (by file suffix); it needs an ``id`` column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"catalogue {str(path)!r} does not exist")
    fmt = CATALOG_FORMATS.get(_suffix(path))
    if fmt is None:
        raise DataError(f"catalogue {str(path)!r}: use a .csv, .ecsv, .fits or .parquet file")
    try:
        table = read_table(path, "parquet") if fmt == "parquet" else Table.read(path, format=fmt)
    except DataError:
        raise
    except Exception as exc:  # astropy raises many kinds for malformed tables
        raise DataError(f"cannot read catalogue {str(path)!r}: {exc}") from None
    if "id" not in table.colnames:
        raise DataError(f"catalogue {str(path)!r} lacks an 'id' column (has {table.colnames})")
    return table


@dataclass
class InputOptions:
    """Run-wide defaults for galaxies whose catalogue row lacks a value, and the cutout settings.

    File options (``image``, ``sigma``, ``weight``, ``psf``, ``mask``) are paths as given (relative
    to the working directory). ``cutout``: ``None`` (each image is the galaxy's stamp), a size in
    pixels, or ``"auto"`` (``2 ceil(cutout_factor r) + 1`` pixels, ``r`` the largest starting
    radius, clipped to ``[cutout_min, cutout_max]``).
    """

    image: str | None = None
    sigma: str | None = None
    weight: str | None = None
    psf: str | None = None
    mask: str | None = None
    mask_mode: str = "background"
    zeropoint: float | None = None
    pixel_scale: float | None = None
    gain: float | None = None
    read_noise: float | None = None
    sky: float | None = None
    exptime: float | None = None
    ncombine: float | None = None
    cutout: int | str | None = None
    cutout_factor: float = 8.0
    cutout_min: int = 33
    cutout_max: int = 255
    auto_starts: bool | None = None
    auto_mask: bool | None = None
    detect: DetectOptions = field(default_factory=DetectOptions)
    #: starting values: ``moments`` (galprof.detect), ``nn`` (the network of galprof.nn), ``auto``
    #: (the network where the stamp matches its training survey); ``mask_nn``: the mask network's
    #: mask of the other sources instead of sep's; ``nn_weights``: weights file (None: shipped)
    init: str = "moments"
    mask_nn: bool = False
    nn_weights: str | None = None

    def validate(self) -> None:
        self.detect.validate()
        if self.init not in ("auto", "moments", "nn"):
            raise DataError(f"--init {self.init!r} is not one of auto, moments, nn")
        if self.detect.neighbours:
            raise DataError("fitting neighbours as components needs a model per galaxy: use galprof fit IMAGE.fits "
                            "(one image) or galprof.detect.auto_inputs, not a catalogue run")
        if self.mask_mode not in MASK_MODES:
            raise DataError(f"mask mode {self.mask_mode!r} is not one of {MASK_MODES}")
        if sum(x is not None for x in (self.sigma, self.weight)) > 1:
            raise DataError("give a sigma map or a weight map, not both")
        positive = {"pixel_scale": self.pixel_scale, "gain": self.gain, "exptime": self.exptime,
                    "cutout_factor": self.cutout_factor}
        for name, v in positive.items():
            if v is not None and not (math.isfinite(v) and v > 0):
                raise DataError(f"--{name.replace('_', '-')} must be > 0, got {v}")
        if self.read_noise is not None and not (math.isfinite(self.read_noise) and self.read_noise >= 0):
            raise DataError(f"--read-noise must be >= 0, got {self.read_noise}")
        if self.ncombine is not None and not (math.isfinite(self.ncombine) and self.ncombine >= 1):
            raise DataError(f"--ncombine must be >= 1, got {self.ncombine}")
        if isinstance(self.cutout, str) and self.cutout != "auto":
            raise DataError(f"--cutout must be a size in pixels or 'auto', got {self.cutout!r}")
        if isinstance(self.cutout, int) and self.cutout < 3:
            raise DataError(f"--cutout must be at least 3 pixels, got {self.cutout}")
        if not 3 <= self.cutout_min <= self.cutout_max:
            raise DataError(f"need 3 <= --cutout-min <= --cutout-max, got {self.cutout_min}, {self.cutout_max}")


@dataclass
class Stamp:
    """One galaxy, ready to fit (or flagged as not fittable).

    Attributes
    ----------
    index : row of the catalogue; id : its ``id``
    image, sigma : 2-D float64 arrays (``None`` when the galaxy cannot be fitted)
    mask : 2-D bool array, True = pixel not to be used, or None
    psf : 2-D array or None (no PSF in this run)
    starts : ``{"comp.param": value}`` in the fit's frame (stamp pixels, the model's zeropoint)
    zeropoint, pixel_scale : the galaxy's (pixel scale in arcsec/px, NaN if unknown)
    offset : ``(dx, dy)``: pixel ``(x, y)`` of the stamp is pixel ``(x + dx, y + dy)`` of its image
    section : the cutout's region of its image, ``[x1:x2,y1:y2]`` (FITS, inclusive), or ""
    source : the image file it came from
    flags, message : problems (:class:`~galprof.flags.Flag` bits, text)
    fatal : the galaxy cannot be fitted
    """

    index: int
    id: object
    image: np.ndarray | None = None
    sigma: np.ndarray | None = None
    mask: np.ndarray | None = None
    psf: np.ndarray | None = None
    starts: dict[str, float] = field(default_factory=dict)
    zeropoint: float = 0.0
    pixel_scale: float = math.nan
    offset: tuple[float, float] = (0.0, 0.0)
    section: str = ""
    source: str = ""
    flags: int = 0
    message: str = ""
    fatal: bool = False

    def note(self, flag: Flag, text: str) -> None:
        self.flags |= int(flag)
        self.message = "; ".join(m for m in (self.message, text) if m)

    @property
    def shape(self) -> tuple[int, int] | None:
        return None if self.image is None else tuple(self.image.shape)


class _Bad(Exception):
    """A problem with one galaxy's input: it is flagged and not fitted."""

    def __init__(self, flag: Flag, message: str):
        super().__init__(message)
        self.flag = flag


class _LRU:
    """A small thread-safe cache of files read from disk (shared PSFs, big images)."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict = {}

    def get(self, key, load):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one reader per file; the others wait for it
            with self._lock:
                if key in self._items:
                    return self._items[key]
            value = load(key)
            with self._lock:
                self._items[key] = value
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
                self._key_locks.pop(key, None)
            return value


_HDU_SUFFIX = re.compile(r"^(?P<path>.*)\[(?P<hdu>[^\]]+)\]$")


def _open_big(spec: str):
    """A large image for cutouts, memory-mapped: ``(data, header)`` (a failure is cached too)."""
    m = _HDU_SUFFIX.match(spec)
    path, hdu = (m.group("path"), m.group("hdu")) if m else (spec, None)
    if not Path(path).is_file():
        return _Bad(Flag.BAD_FILE, f"image file {path!r} does not exist")
    try:
        hdul = fits.open(path, memmap=True)
        if hdu is not None:
            h = hdul[int(hdu) if hdu.lstrip("-").isdigit() else hdu]
        else:
            h = next((h for h in hdul if h.header.get("NAXIS", 0) == 2), None)
        if h is None or h.data is None or h.data.ndim != 2:
            return _Bad(Flag.BAD_FILE, f"{spec!r} holds no 2-D image")
        return h.data, h.header
    except Exception as exc:
        return _Bad(Flag.BAD_FILE, f"cannot read {spec!r}: {exc}")


class Catalog:
    """A catalogue of galaxies and how to load each one (see the module docstring).

    Parameters
    ----------
    path : catalogue file (CSV, ECSV, FITS or Parquet)
    model : the model that will be fitted (its parameters name the start columns)
    options : :class:`InputOptions`

    Raises
    ------
    DataError
        For problems with the catalogue as a whole.
    """

    def __init__(self, path: str | os.PathLike, model: Model, options: InputOptions | None = None,
                 table: Table | None = None):
        self.path = Path(path)
        self.options = options or InputOptions()
        self.options.validate()
        self.folder = self.path.resolve().parent
        table = read_catalog(self.path) if table is None else table
        n = len(table)
        if n == 0:
            raise DataError(f"catalogue {str(self.path)!r} has no rows")
        self.model = model
        layout = model.layout(1)
        self.keys = model.parameter_names
        self.kinds = {k: layout.spec(k).kind for k in self.keys}
        self.tied = set(layout.tied)
        self.model_values = {k: float(v.reshape(-1)[0]) for k, v in layout.values().items()}
        cols = set(table.colnames)
        if "image" not in cols and self.options.image is None:
            raise DataError("the catalogue has no 'image' column and no --image was given")
        self.cutout = self.options.cutout
        if self.cutout is None and "cutout_size" in cols:
            self.cutout = "column"
        self.has_xy = {"x", "y"} <= cols
        self.has_radec = {"ra", "dec"} <= cols
        if ({"x", "y"} & cols and not self.has_xy) or ({"ra", "dec"} & cols and not self.has_radec):
            raise DataError("positions need both columns: x and y, or ra and dec")
        if self.cutout is not None and not (self.has_xy or self.has_radec):
            raise DataError("cutouts need each source's position: x and y, or ra and dec columns")
        if "sigma" in cols and "weight" in cols:
            raise DataError("the catalogue has both 'sigma' and 'weight' columns; keep one")
        self.use_psf = "psf" in cols or self.options.psf is not None

        # columns as plain arrays, with their missing-value masks
        self._cols: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in table.colnames:
            c = table[name]
            data = np.asarray(c.data if not hasattr(c, "filled") else c.filled(c.dtype.type()))
            if data.dtype.kind == "S":  # FITS strings
                data = np.char.decode(data, "utf-8", errors="replace")
            missing = np.asarray(np.ma.getmaskarray(c)) if hasattr(c, "mask") else np.zeros(n, bool)
            if data.dtype.kind in "US":
                text = np.char.lower(np.char.strip(data.astype(str)))
                missing = missing | np.isin(text, list(_MISSING))
            elif data.dtype.kind == "f":
                missing = missing | ~np.isfinite(data)
            if data.ndim != 1:
                continue
            self._cols[name] = (data, missing)
        ids, id_missing = self._cols["id"]
        if id_missing.any():
            raise DataError(f"catalogue {str(self.path)!r}: row(s) {np.nonzero(id_missing)[0][:5].tolist()} "
                            "have no id")
        self.ids = [v.item() if hasattr(v, "item") else v for v in ids]
        if ids.dtype.kind == "U":
            self.ids = [str(v).strip() for v in self.ids]
        seen, dups = set(), []
        for v in self.ids:
            if v in seen:
                dups.append(v)
            seen.add(v)
        if dups:
            raise DataError(f"catalogue ids must be unique (resuming relies on them); repeated: {dups[:5]}")

        # start columns: <component>_<param>
        self.start_columns = {}
        known = set(FILE_COLUMNS) | set(NUMBER_COLUMNS) | {"id", "mask_mode"}
        self.ignored = []
        for name in table.colnames:
            key = next((k for k in self.keys if column(k) == name), None)
            if key is None:
                if name not in known:
                    self.ignored.append(name)
            elif key in self.tied:
                self.ignored.append(f"{name} ({key} is tied in the model)")
            else:
                self.start_columns[key] = name
        self._caches()

    def _caches(self) -> None:
        self.auto_starts, self.auto_mask = _resolve_auto(self.options)
        self._detect = DetectOptions(**{**self.options.detect.__dict__, "mask_mode": self.options.mask_mode})
        self._psf_stats: dict = {}
        self._psfs = _LRU(64)
        self._big = _LRU(8)
        self._wcs_lock = threading.Lock()
        self._wcs: dict = {}
        self._nn = None
        self._nn_lock = threading.Lock()
        o = self.options
        if o.init != "moments" and not self.auto_starts:
            raise DataError(f"--init {o.init} gives automatic starts: it needs them on (not --no-auto-starts)")
        if o.mask_nn and not self.auto_mask:
            raise DataError("--mask nn is an automatic mask: it needs them on (not --no-auto-mask)")

    def _predictor(self):
        """The networks of galprof.nn (loaded once per process)."""
        with self._nn_lock:
            if self._nn is None:
                from .nn.infer import load_predictor

                self._nn = load_predictor(self.options.nn_weights)
            return self._nn

    def __len__(self) -> int:
        return len(self.ids)

    def __getstate__(self) -> dict:  # picklable: the caches (open files, locks) stay behind
        return {k: v for k, v in self.__dict__.items() if k not in ("_psfs", "_big", "_wcs_lock", "_wcs", "_nn",
                                                                    "_nn_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._caches()
        self.__dict__.update(state)  # what the pickling process had resolved wins over fresh defaults

    def subset(self, rows) -> Catalog:
        """Catalogue rows ``rows`` as a catalogue of their own: the same model, options and folder,
        row ``k`` being row ``rows[k]`` of this one (small and picklable: what a cluster worker
        gets to fit a batch)."""
        idx = np.asarray(rows, dtype=np.intp)
        new = Catalog.__new__(Catalog)
        new.__setstate__(self.__getstate__())
        new._cols = {name: (data[idx], missing[idx]) for name, (data, missing) in self._cols.items()}
        new.ids = [self.ids[i] for i in idx]
        return new

    # -- cell access ------------------------------------------------------------------------
    def _text(self, name: str, i: int) -> str | None:
        if name not in self._cols:
            return None
        data, missing = self._cols[name]
        return None if missing[i] else str(data[i]).strip()

    def _number(self, name: str, i: int, default: float | None = None) -> float | None:
        if name not in self._cols:
            return default
        data, missing = self._cols[name]
        if missing[i]:
            return default
        try:
            v = float(data[i])
        except (TypeError, ValueError):
            raise _Bad(Flag.BAD_VALUE, f"{name} = {data[i]!r} is not a number") from None
        if not math.isfinite(v):
            return default
        return v

    def _file(self, name: str, i: int) -> str | None:
        """The file named in column ``name`` (relative to the catalogue), else the run option."""
        spec = self._text(name, i)
        if spec is not None:
            return spec if os.path.isabs(spec) else str(self.folder / spec)
        return getattr(self.options, name)

    # -- one galaxy -------------------------------------------------------------------------
    def load(self, i: int) -> Stamp:
        """Read galaxy ``i`` (catalogue row); never raises for problems with its input."""
        stamp = Stamp(index=i, id=self.ids[i])
        try:
            self._load(stamp, i)
        except _Bad as bad:
            stamp.note(bad.flag, str(bad))
            stamp.fatal = True
        except GalprofError as exc:  # defensive: any other input problem of this galaxy
            stamp.note(Flag.BAD_VALUE, str(exc))
            stamp.fatal = True
        if stamp.fatal:
            stamp.image = stamp.sigma = stamp.mask = stamp.psf = None
        return stamp

    def _load(self, s: Stamp, i: int) -> None:
        o = self.options
        s.zeropoint = self._number("zeropoint", i, o.zeropoint if o.zeropoint is not None else self.model.zeropoint)
        scale = self._number("pixel_scale", i, o.pixel_scale)
        if scale is not None and not scale > 0:
            raise _Bad(Flag.BAD_VALUE, f"pixel_scale = {scale:g} must be > 0")
        starts = self._starts(i, s.zeropoint)
        given = set(starts)
        spec = self._file("image", i)
        if spec is None:
            raise _Bad(Flag.BAD_FILE, "no image (empty image column and no --image)")
        s.source = spec
        if self.cutout is None:
            image, header = _read(spec, "image")
            window = None
            xy = self._position(i, header)
            target_xy = xy
            if xy is not None:
                starts.update(self._centre_starts(xy, i))
        else:
            big = self._big.get(spec, _open_big)
            if isinstance(big, _Bad):
                raise big
            data, header = big
            xy = self._position(i, header)
            size = self._cutout_size(i, starts)
            window = _window(xy, size, data.shape)
            image, outside = _cut(data, window, 0.0)  # pixels outside: masked (EDGE), not bad data
            if outside.all():
                raise _Bad(Flag.BAD_VALUE, f"position ({xy[0]:g}, {xy[1]:g}) is outside the image "
                                           f"({data.shape[1]} x {data.shape[0]} px)")
            if outside.any():
                s.note(Flag.EDGE, f"the {size} x {size} cutout runs off the image: {int(outside.sum())} "
                                  "pixels outside it masked")
            x1, y1 = window[0] + 1, window[1] + 1  # FITS pixel of the cutout's first pixel
            s.offset = (float(window[0]), float(window[1]))
            s.section = f"[{x1}:{x1 + size - 1},{y1}:{y1 + size - 1}]"
            target_xy = (xy[0] - s.offset[0], xy[1] - s.offset[1])
            starts.update(self._centre_starts(xy, i))
            for k in starts:  # positions: image frame -> stamp frame
                if self.kinds[k] in ("x", "y"):
                    starts[k] -= s.offset[0] if self.kinds[k] == "x" else s.offset[1]
        if scale is None and header is not None:
            scale = _wcs_scale(header)
        s.pixel_scale = math.nan if scale is None else scale
        s.image = image
        mask = np.zeros(image.shape, bool) if window is None else outside.copy()
        # noise
        sigma_spec, weight_spec = self._file("sigma", i), self._file("weight", i)
        if self._text("sigma", i) is not None:
            weight_spec = None
        elif self._text("weight", i) is not None:
            sigma_spec = None
        if sigma_spec is not None:
            s.sigma = self._read_map(sigma_spec, "sigma", image.shape, window)
        elif weight_spec is not None:
            w = self._read_map(weight_spec, "weight", image.shape, window)
            with np.errstate(divide="ignore", invalid="ignore"):
                s.sigma = np.where(w > 0, 1.0 / np.sqrt(w), np.where(w == 0, 1.0, np.nan))
            mask |= w == 0  # zero weight: no data there (not a problem to flag)
        else:
            gain = self._detector("gain", i, header)
            if gain is None and not (self.auto_starts or self.auto_mask):
                raise _Bad(Flag.BAD_VALUE, "no sigma map, and no gain to make one: give a sigma or weight map, "
                                           "or the gain (column, --gain or GAIN in the image header)")
            try:  # without a gain: the background RMS, from the automatic inputs below
                s.sigma = None if gain is None else sigma_from_gain(
                    image, gain=gain, read_noise=self._detector("read_noise", i, header) or 0.0,
                    sky=self._number("sky", i, o.sky) or 0.0, ncombine=self._detector("ncombine", i, header) or 1.0,
                    exptime=self._number("exptime", i, o.exptime) or 1.0)
            except GalprofError as exc:
                raise _Bad(Flag.BAD_VALUE, f"cannot make the sigma map: {exc}") from None
        # mask
        mask_spec = self._file("mask", i)
        label = self._number("mask_label", i)
        mode = self._text("mask_mode", i) or o.mask_mode
        if mode not in MASK_MODES:
            raise _Bad(Flag.BAD_VALUE, f"mask_mode {mode!r} is not one of {MASK_MODES}")
        segmap = None
        if mask_spec is not None:
            m = self._read_map(mask_spec, "mask", image.shape, window, fill=0.0)
            segmap = m if label is not None else None
            if label is None:
                if self._text("mask_mode", i) is not None and mode == "exclusive":
                    raise _Bad(Flag.BAD_VALUE, "mask_mode exclusive needs the target's mask_label")
                mask |= m != 0
            elif mode == "background":
                mask |= (m != 0) & (m != label)
            else:
                mask |= m != label
        elif label is not None:
            raise _Bad(Flag.BAD_VALUE, f"mask_label {label:g} given but no mask (segmentation map)")
        s.mask = mask
        # PSF
        if self.use_psf:
            psf_spec = self._file("psf", i)
            if psf_spec is None:
                raise _Bad(Flag.BAD_PSF, "no PSF (empty psf column and no --psf), in a run with PSFs")
            psf = self._psfs.get(psf_spec, _read_psf)
            if isinstance(psf, _Bad):
                raise psf
            s.psf = psf
        if self.auto_starts or (self.auto_mask and mask_spec is None) or s.sigma is None:
            self._auto(s, starts, given, target_xy, segmap, label, psf_spec if self.use_psf else None,
                       use_mask=self.auto_mask and mask_spec is None)
        s.starts = starts

    def _auto(self, s: Stamp, starts: dict, given: set, xy, segmap, label, psf_spec, use_mask: bool) -> None:
        """Automatic mask, starts and sigma of one stamp (galprof.detect); a failure to detect
        is flagged (NO_DETECTION) and the model's or catalogue's starts are kept."""
        from .detect import auto_inputs, psf_radii

        stats = None
        if s.psf is not None:
            stats = self._psf_stats.get(psf_spec)
            if stats is None:
                stats = self._psf_stats[psf_spec] = psf_radii(s.psf)
        try:
            r = auto_inputs(s.image, model=self.model, sigma=s.sigma, mask=s.mask, psf=s.psf, position=xy,
                            given=given | self.tied, options=self._detect, segmap=segmap,
                            segmap_label=None if label is None else int(label), psf_stats=stats)
        except Exception as exc:  # any failure costs this galaxy its automatic inputs, not the run
            if isinstance(exc, (KeyboardInterrupt, MemoryError)):
                raise
            if s.sigma is None:
                raise _Bad(Flag.BAD_VALUE, f"no sigma map, no gain, and no automatic noise estimate: {exc}") from None
            s.note(Flag.NO_DETECTION, f"automatic inputs failed: {exc}")
            return
        if r.sigma is not None:
            s.sigma = r.sigma
        for note in r.notes:
            s.message = "; ".join(m for m in (s.message, note) if m)
        if r.target is None:
            s.note(Flag.NO_DETECTION, "")
            return
        mask, auto_starts = r.mask, r.starts
        if self.options.init != "moments" or (self.options.mask_nn and use_mask):
            from .nn.hook import network_inputs

            try:
                mask, auto_starts, notes = network_inputs(
                    self._predictor(), image=s.image, sigma=s.sigma, bad=s.mask, psf=s.psf, auto=r,
                    model=self.model, given=given | self.tied, init=self.options.init,
                    mask_nn=self.options.mask_nn and use_mask,
                    pixel_scale=None if not math.isfinite(s.pixel_scale) else s.pixel_scale)
            except GalprofError as exc:
                notes = [f"networks not used ({exc})"]
            for note in notes:
                s.message = "; ".join(m for m in (s.message, note) if m)
        if use_mask:
            s.mask = s.mask | mask
        if self.auto_starts:
            starts.update(auto_starts)

    def _read_map(self, spec: str, what: str, shape, window, fill=1.0) -> np.ndarray:
        """A sigma, weight or mask map: the whole file (stamps) or the cutout's window of it."""
        if window is None:
            arr, _ = _read(spec, what)
        else:
            big = self._big.get(spec, _open_big)
            if isinstance(big, _Bad):
                raise _Bad(big.flag, f"{what}: {big}")
            data, _ = big
            if data.shape != window[3]:
                raise _Bad(Flag.BAD_FILE, f"{what} map {spec!r} has shape {data.shape}, its image {window[3]}")
            arr, _ = _cut(data, window, fill)
        if arr.shape != shape:
            raise _Bad(Flag.BAD_FILE, f"{what} {spec!r} has shape {arr.shape}, the image {shape}")
        return arr

    def _detector(self, name: str, i: int, header) -> float | None:
        v = self._number(name, i, getattr(self.options, name))
        if v is None and header is not None:
            for key in HEADER_KEYWORDS.get(name, ()):
                if key in header:
                    try:
                        return float(header[key])
                    except (TypeError, ValueError):
                        raise _Bad(Flag.BAD_VALUE, f"header {key} = {header[key]!r} is not a number") from None
        return v

    def _starts(self, i: int, zeropoint: float) -> dict[str, float]:
        """Catalogue starting values, mags converted to the model's zeropoint (positions still in
        the image frame: the caller moves them to the stamp's)."""
        out = {}
        for key, name in self.start_columns.items():
            v = self._number(name, i)
            if v is None:
                continue
            if self.kinds[key] == "mag":
                v -= zeropoint - self.model.zeropoint
            out[key] = v
        return out

    def _position(self, i: int, header) -> tuple[float, float] | None:
        """The source's (x, y) pixel position in its image (FITS convention), or None."""
        if self.has_xy:
            x, y = self._number("x", i), self._number("y", i)
            if x is not None and y is not None:
                return x, y
        if self.has_radec:
            ra, dec = self._number("ra", i), self._number("dec", i)
            # a stamp without WCS: ra, dec are the catalogue's information, not a starting centre
            if ra is not None and dec is not None and (self.cutout is not None or _has_wcs(header)):
                return _world_to_pixel(header, ra, dec)
        if self.cutout is not None:
            raise _Bad(Flag.BAD_VALUE, "no position (x, y or ra, dec) for the cutout")
        return None

    def _centre_starts(self, xy: tuple[float, float], i: int) -> dict[str, float]:
        """The position as the start of every centre parameter the catalogue does not give."""
        out = {}
        for key in self.keys:
            if key in self.tied or key in self.start_columns and self._number(self.start_columns[key], i) is not None:
                continue
            if self.kinds[key] == "x":
                out[key] = xy[0]
            elif self.kinds[key] == "y":
                out[key] = xy[1]
        return out

    def _cutout_size(self, i: int, starts: Mapping[str, float]) -> int:
        o = self.options
        if self.cutout == "column" or (self.cutout is not None and "cutout_size" in self._cols):
            v = self._number("cutout_size", i)
            if v is not None:
                if not v >= 3:
                    raise _Bad(Flag.BAD_VALUE, f"cutout_size = {v:g} must be at least 3")
                return int(round(v))
            if self.cutout == "column":
                raise _Bad(Flag.BAD_VALUE, "no cutout_size for this source")
        if isinstance(self.cutout, int):
            return self.cutout
        radii = [starts.get(k, self.model_values[k]) for k in self.keys
                 if self.kinds[k] == "length" and k not in self.tied]
        r = max(radii) if radii else 0.0
        size = 2 * math.ceil(o.cutout_factor * r) + 1
        lo, hi = o.cutout_min | 1, o.cutout_max if o.cutout_max % 2 else o.cutout_max - 1
        return int(min(max(size, lo), hi))


def _resolve_auto(o: InputOptions) -> tuple[bool, bool]:
    """``(auto_starts, auto_mask)``: None means on when sep is installed."""
    try:
        import sep  # noqa: F401

        have_sep = True
    except ImportError:
        have_sep = False
    if not have_sep:
        if o.auto_starts or o.auto_mask:
            raise DataError("automatic starts and masks need the sep package: pip install 'galprof[auto]' "
                            "(or turn them off: --no-auto-starts --no-auto-mask)")
        if o.auto_starts is None or o.auto_mask is None:
            log.warning("sep is not installed: automatic starts, masks and sigma maps are off "
                        "(pip install 'galprof[auto]')")
        return False, False
    return o.auto_starts is not False, o.auto_mask is not False


def _read(spec: str, what: str):
    try:
        return read_image_and_header(spec)
    except DataError as exc:
        raise _Bad(Flag.BAD_FILE, f"{what}: {exc}") from None
    except Exception as exc:  # corrupt files raise beyond OSError
        raise _Bad(Flag.BAD_FILE, f"{what}: cannot read {spec!r}: {exc}") from None


def _read_psf(spec: str):
    """A PSF file, checked (a failure is returned, so that it is cached too)."""
    try:
        data, _ = _read(spec, "psf")
        prepare_psf(data)
    except _Bad as bad:
        return bad
    except PSFError as exc:
        return _Bad(Flag.BAD_PSF, f"PSF {spec!r}: {exc}")
    return data


def _window(xy, size: int, shape) -> tuple[int, int, int, tuple[int, int]]:
    """``(x0, y0, size, image shape)``: 0-based index of the cutout's first column and row, the
    cutout centred on the pixel that holds (x, y)."""
    ix = int(math.floor(xy[0] + 0.5)) - 1  # 0-based index of the pixel holding x
    iy = int(math.floor(xy[1] + 0.5)) - 1
    return ix - size // 2, iy - size // 2, size, tuple(shape)


def _cut(data: np.ndarray, window, fill) -> tuple[np.ndarray, np.ndarray]:
    """The cutout ``window`` of ``data`` (float64, ``fill`` outside the image) and where it is outside."""
    x0, y0, size, _ = window
    ny, nx = data.shape
    out = np.full((size, size), fill, dtype=np.float64)
    outside = np.ones((size, size), dtype=bool)
    xa, xb = max(x0, 0), min(x0 + size, nx)
    ya, yb = max(y0, 0), min(y0 + size, ny)
    if xa < xb and ya < yb:
        out[ya - y0:yb - y0, xa - x0:xb - x0] = data[ya:yb, xa:xb]
        outside[ya - y0:yb - y0, xa - x0:xb - x0] = False
    return out, outside


def _has_wcs(header) -> bool:
    return header is not None and "CTYPE1" in header and "CTYPE2" in header


def _world_to_pixel(header, ra: float, dec: float) -> tuple[float, float]:
    from astropy.wcs import WCS

    if not _has_wcs(header):
        raise _Bad(Flag.BAD_VALUE, "ra/dec given, but the image header has no WCS")
    try:
        w = WCS(header).celestial
        if not w.has_celestial:
            raise ValueError("no celestial axes")
        x, y = w.all_world2pix([[ra, dec]], 1)[0]
    except _Bad:
        raise
    except Exception as exc:
        raise _Bad(Flag.BAD_VALUE, f"cannot convert ra, dec = ({ra:g}, {dec:g}) to pixels: {exc}") from None
    return float(x), float(y)


def _wcs_scale(header) -> float | None:
    """Pixel scale (arcsec/px, geometric mean of the two axes) from a celestial WCS, if any."""
    if header is None or "CTYPE1" not in header:
        return None
    try:
        from astropy.wcs import WCS
        from astropy.wcs.utils import proj_plane_pixel_scales

        w = WCS(header).celestial
        if not w.has_celestial:
            return None
        sx, sy = proj_plane_pixel_scales(w)
        return float(math.sqrt(sx * sy) * 3600.0)
    except Exception:
        return None
