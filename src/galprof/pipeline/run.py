"""The survey pipeline: a catalogue in; result tables, image blocks, diagnostic plots, a log and a
summary out.

Data flow: catalogue rows are cut into batches of consecutive rows (the same batches on every
run, so a resumed run fits exactly what an uninterrupted one would); background threads read
the next batches' files while the current one is fitted; each batch's table goes to disk
atomically as soon as it is done (:class:`~galprof.pipeline.store.ResultStore`); at the end the
parts are merged, in catalogue order, into the requested table formats. Memory holds the
catalogue, the batches in flight and, at the end, the result table: never all the images.

Per-galaxy problems never stop the run: the galaxy gets a flag and a message (see
:mod:`galprof.flags`). Problems with the run as a whole (model, options, catalogue) raise
:class:`~galprof.errors.GalprofError` before any fitting starts.

Extra per-galaxy columns (for example morphology) plug in as *column hooks*: callables
``hook(stamps, table, result) -> {column: values}`` called once per batch, after the fit, with the
batch's :class:`~galprof.catalog.Stamp` list, its result table (rows in the same order) and the
:class:`~galprof.fitting.FitResult` of the fitted galaxies (``None`` if none was); ``values`` hold
one entry per row (NaN where not defined, e.g. for galaxies that could not be read).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import platform
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from astropy.table import Table, vstack

from .. import fitting
from ..catalog import Catalog, Stamp
from ..errors import DataError, GalprofError
from ..fitting.result import column
from ..flags import Flag, Status
from ..io.imgblock import write_image_block
from ..io.tables import TABLE_FORMATS, atomic_path, check_format, write_table
from ..model import Model
from ..render import Renderer
from .progress import Progress
from .store import ResultStore

__all__ = ["FitOptions", "PipelineOptions", "Interrupted", "run_pipeline"]

log = logging.getLogger("galprof")

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_LN10 = math.log(10.0)


class Interrupted(GalprofError):
    """The run was interrupted (Ctrl-C); what was finished is on disk and the run resumes."""


@dataclass
class FitOptions:
    """What :func:`galprof.fit` is asked to do for every batch (see its documentation).

    ``max_iter`` None keeps the optimiser's default; ``seed`` seeds the bootstrap and restarts,
    batch by batch (each batch's seed derives from it and the batch number, so that a resumed
    run draws the same numbers).
    """

    dtype: str = "float64"
    device: str = "cpu"
    psf_kind: str = "star"
    psf_oversampling: int = 1
    jacobian: str = "finite-difference"
    optimizer: str = "lm"
    max_iter: int | None = None
    uncertainty: str = "covariance"
    n_bootstrap: int = 100
    seed: int = 0
    statistic: str = "chi2"
    restarts: int = 0


@dataclass
class PipelineOptions:
    """How the run is organised (none of these change the fitted values, except ``batch_size``
    at the level of rounding, which is why it is part of the run's fingerprint).

    ``save_images``: an image block per fitted galaxy (``images/<id>.fits``); ``plots``: a
    diagnostic PNG per fitted galaxy (``plots/<id>.png``, :func:`galprof.plots.galaxy_figure`) and
    the catalogue's plots (``plots/catalog/``) at the end (needs matplotlib).
    """

    out: str | os.PathLike
    formats: Sequence[str] = ("fits", "csv")
    save_images: bool = False
    plots: bool = False
    batch_size: int = 64
    read_threads: int = 2
    overwrite: bool = False
    retry_bad: bool = False
    progress: bool | None = None
    fit: FitOptions = field(default_factory=FitOptions)


# ---------------------------------------------------------------------------------------------
def _fit_keywords(fo: FitOptions) -> dict:
    """Keyword arguments for :func:`galprof.fit`: only those it accepts, and an error naming
    any requested setting it does not support."""
    accepted = inspect.signature(fitting.fit).parameters
    if fo.dtype not in _DTYPES:
        raise DataError(f"dtype must be one of {sorted(_DTYPES)}, got {fo.dtype!r}")
    kw = {"psf_kind": fo.psf_kind, "psf_oversampling": fo.psf_oversampling, "jacobian": fo.jacobian,
          "dtype": _DTYPES[fo.dtype], "device": fo.device}
    wanted = {"optimizer": (fo.optimizer, "lm"), "statistic": (fo.statistic, "chi2"),
              "restarts": (fo.restarts, 0), "uncertainty": (fo.uncertainty, "covariance")}
    for name, (value, default) in wanted.items():
        if name in accepted:
            kw[name] = value
        elif value != default and not (name == "uncertainty" and value == "none"):
            raise DataError(f"{name} {value!r} is not supported by this version of galprof.fit")
    if fo.uncertainty == "bootstrap":
        if fo.n_bootstrap < 2:
            raise DataError(f"the bootstrap needs at least 2 samples, got {fo.n_bootstrap}")
        kw["n_bootstrap"] = fo.n_bootstrap
    if fo.max_iter is not None:
        if fo.max_iter < 1:
            raise DataError(f"max_iter must be >= 1, got {fo.max_iter}")
        if fo.optimizer == "lm":
            kw["options"] = fitting.LMOptions(max_iter=fo.max_iter)
        elif hasattr(fitting, "AdamOptions"):
            kw["options"] = fitting.AdamOptions(max_iter=fo.max_iter)
    return kw


def _batch_seed(seed: int, batch: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(batch)]).generate_state(1)[0])


def describe_device(device: str) -> str:
    """The machine that fits, in words (for the table's metadata)."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(dev)} (cuda), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"cpu {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def _safe_name(ident) -> str:
    """A file name for an id (characters other than letters, digits, ``.``, ``_``, ``+``, ``-``
    replaced, with a short hash of the id to keep names unique)."""
    text = str(ident)
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", text)
    if safe != text or safe.startswith("."):
        import hashlib

        safe = f"{safe.lstrip('.')}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return safe


class _Run:
    """One invocation of the pipeline (state shared by the steps below)."""

    def __init__(self, model: Model, catalog: Catalog, options: PipelineOptions, model_source: str,
                 hooks: Sequence[Callable]):
        self.model = model
        self.catalog = catalog
        self.opts = options
        self.fo = options.fit
        self.model_source = model_source
        self.hooks = list(hooks)
        self.fit_kw = _fit_keywords(self.fo)
        self.accepts_seed = "seed" in inspect.signature(fitting.fit).parameters
        layout = model.layout(1)
        self.keys = model.parameter_names
        self.kinds = {k: layout.spec(k).kind for k in self.keys}
        self.model_values = catalog.model_values
        self.store = ResultStore(options.out)
        self._template: Table | None = None
        self._plot_failed: set = set()  # ids whose diagnostic plot failed in this process
        self.device_text = describe_device(self.fo.device)  # the table's DEVICE (a cluster run sets its own)

    # -- fitting one batch ----------------------------------------------------------------------
    def fit_batch(self, number: int, stamps: list[Stamp]) -> Table:
        good = [s for s in stamps if not s.fatal]
        fitted = self._fit_isolating(number, good) if good else []
        if len(good) > 1 and not fitted:
            # every galaxy failed on its own: a problem of the run (a bug, the device), not of the data
            raise RuntimeError(f"the fit raised for every galaxy of batch {number} ({good[0].message}); stopping "
                               "(the batches done so far are kept: fix the cause and run again to resume)")
        rows = {}
        for group, result in fitted:
            t = result.to_table()
            if self.fo.uncertainty == "none" and "uncertainty" not in self.fit_kw:
                for c in t.colnames:
                    if c.endswith("_err"):
                        t[c] = np.nan
            not_fitted = np.asarray(result.status) == int(Status.BAD_INPUT)
            if not_fitted.any():  # values of galaxies not fitted are not results (fit() returns the starts)
                for c in t.colnames:
                    if t[c].dtype.kind == "f":
                        t[c][not_fitted] = np.nan
            messages = [str(m) for m in t["message"]]
            for j, s in enumerate(group):
                if s.flags:  # input notes (e.g. EDGE) beside the fit's own
                    t["flags"][j] |= s.flags
                    messages[j] = "; ".join(m for m in (s.message, messages[j]) if m)
            t["message"] = messages
            self._to_output_frame(t, group)
            self._derived(t, group, result)
            self._hooks(t, group, result)
            t = _statistics_last(t)
            if self.opts.save_images or self.opts.plots:
                self._per_galaxy_outputs(t, group, result)
            for j, s in enumerate(group):
                rows[s.index] = (t, j)
        bad = [s for s in stamps if s.index not in rows]
        tables = [t for t in {id(t): t for t, _ in rows.values()}.values()]
        if bad:
            tb = self._bad_rows(bad)
            self._hooks(tb, bad, None)
            tb = _statistics_last(tb)
            tables.append(tb)
            for j, s in enumerate(bad):
                rows[s.index] = (tb, j)
        for t in tables:
            t["message"] = np.asarray(t["message"], dtype=str)
            t.meta.clear()
        merged = vstack(tables, join_type="outer", metadata_conflicts="silent") if len(tables) > 1 else tables[0]
        # catalogue order within the batch
        offsets, k = {}, 0
        for t in tables:
            offsets[id(t)] = k
            k += len(t)
        order = [offsets[id(rows[s.index][0])] + rows[s.index][1] for s in stamps]
        out = merged[order]
        return _fill_masked(out)

    def _fit_isolating(self, number: int, stamps: list[Stamp]):
        """Fit the stamps together; if that raises, fit halves, down to single galaxies, which
        are flagged FIT_ERROR (so one unexpected failure costs one galaxy, not the run)."""
        try:
            return [(stamps, self._fit(number, stamps))]
        except Exception as exc:
            if isinstance(exc, (KeyboardInterrupt, MemoryError)):
                raise
            if len(stamps) == 1:
                s = stamps[0]
                log.warning("galaxy %s: the fit raised %s: %s", s.id, type(exc).__name__, exc)
                s.note(Flag.FIT_ERROR, f"the fit raised {type(exc).__name__}: {exc}")
                s.fatal = True
                return []
            log.debug("batch %d: fit raised %r, fitting halves", number, exc)
            half = len(stamps) // 2
            return self._fit_isolating(number, stamps[:half]) + self._fit_isolating(number, stamps[half:])

    def _fit(self, number: int, stamps: list[Stamp]):
        starts = {}
        for key in self.keys:
            if any(key in s.starts for s in stamps):
                starts[key] = np.array([s.starts.get(key, self.model_values[key]) for s in stamps])
        kw = dict(self.fit_kw)
        if self.accepts_seed:
            kw["seed"] = _batch_seed(self.fo.seed, number)
        psf = [s.psf for s in stamps] if self.catalog.use_psf else None
        return fitting.fit(self.model, [s.image for s in stamps], [s.sigma for s in stamps],
                           [s.mask for s in stamps], psf, initial=starts, ids=[s.id for s in stamps], **kw)

    def template(self) -> Table:
        """An empty result table with the fit's columns (for galaxies that cannot be fitted)."""
        if self._template is None:
            probe = Stamp(index=-1, id="probe", image=np.full((3, 3), np.nan), sigma=np.ones((3, 3)),
                          mask=None, psf=np.ones((1, 1)) if self.catalog.use_psf else None)
            t = self._fit(0, [probe]).to_table()
            self._to_output_frame(t, [probe])
            self._derived(t, [probe], None)
            self._template = t[:0]
        return self._template

    def _bad_rows(self, stamps: list[Stamp]) -> Table:
        tmpl = self.template()
        n = len(stamps)
        t = Table()
        for c in tmpl.colnames:
            dt = tmpl[c].dtype
            if c == "id":
                t[c] = [s.id for s in stamps]
            elif c == "status":
                t[c] = [Status.BAD_INPUT.name.lower()] * n
            elif c == "flags":
                t[c] = np.array([s.flags for s in stamps], dtype=dt)
            elif c == "message":
                t[c] = [s.message for s in stamps]
            elif dt.kind == "f":
                t[c] = np.full(n, np.nan)
            elif dt.kind in "iub":
                t[c] = np.zeros(n, dtype=dt)
            else:
                t[c] = [""] * n
        return t

    # -- output frame and derived columns ---------------------------------------------------------
    def _to_output_frame(self, t: Table, stamps: list[Stamp]) -> None:
        """Positions to the image's pixel frame, magnitudes to each galaxy's zeropoint."""
        dx = np.array([s.offset[0] for s in stamps])
        dy = np.array([s.offset[1] for s in stamps])
        dzp = np.array([s.zeropoint - self.model.zeropoint for s in stamps])
        shift = {"x": dx, "y": dy, "mag": dzp}
        for key in self.keys:
            d = shift.get(self.kinds[key])
            if d is None or not np.any(d):
                continue
            for suffix in ("", "_p16", "_p84"):
                name = column(key) + suffix
                if name in t.colnames:
                    t[name] = np.asarray(t[name], dtype=float) + d

    def _derived(self, t: Table, stamps: list[Stamp], result) -> None:
        """Sizes in arcsec, and the mean surface brightness inside r_e (mag/arcsec^2)."""
        scale = np.array([s.pixel_scale for s in stamps], dtype=float)
        for key in self.keys:
            if self.kinds[key] == "length":
                c = column(key)
                t[c + "_arcsec"] = np.asarray(t[c], dtype=float) * scale
                t[c + "_arcsec_err"] = np.asarray(t[c + "_err"], dtype=float) * scale
        index = {k: i for i, k in enumerate(self.keys)}
        for comp in self.model.components:
            names = {s.name for s in comp.profile.params}
            if not {"re", "mag"} <= names:
                continue
            mag, re_ = (np.asarray(t[f"{comp.name}_{p}"], dtype=float) for p in ("mag", "re"))
            q = np.asarray(t[f"{comp.name}_q"], dtype=float) if "q" in names else np.ones(len(t))
            with np.errstate(invalid="ignore", divide="ignore"):
                mu = mag + 2.5 * np.log10(2.0 * math.pi * q * (re_ * scale) ** 2)
                err = np.full(len(t), np.nan)
                if result is not None:
                    cov = np.asarray(result.covariance)
                    ids = [index[f"{comp.name}.{p}"] for p in ("mag", "re", "q") if p in names]
                    grad = np.stack([np.ones(len(t)), 5.0 / (_LN10 * re_), 2.5 / (_LN10 * q)][:len(ids)], axis=1)
                    sub = cov[:, ids][:, :, ids]
                    var = np.einsum("bi,bij,bj->b", grad, sub, grad)
                    err = np.sqrt(np.where(var >= 0, var, np.nan))
            t[f"{comp.name}_mu_e"] = mu
            t[f"{comp.name}_mu_e_err"] = err

    def _hooks(self, t: Table, stamps: list[Stamp], result) -> None:
        for hook in self.hooks:
            for name, values in dict(hook(stamps, t, result)).items():
                t[name] = values

    # -- image blocks and diagnostic plots --------------------------------------------------------
    def _per_galaxy_outputs(self, t: Table, stamps: list[Stamp], result) -> None:
        """Image blocks (``save_images``) and diagnostic plots (``plots``) of the galaxies of one
        fit that were fitted, from one rendering of their best-fit models."""
        status = np.asarray(result.status)
        idx = [j for j in range(len(stamps)) if status[j] != int(Status.BAD_INPUT)]
        if not idx:
            return
        values = {k: np.asarray(result.values[k])[idx] for k in self.keys}
        self._render_outputs(t, idx, [stamps[j] for j in idx], values, blocks=self.opts.save_images,
                             plots=self.opts.plots)

    def _render_outputs(self, t: Table, rows: list[int], stamps: list[Stamp], values: dict, *, blocks: bool,
                        plots: bool) -> None:
        """Render ``stamps`` at ``values`` (the fit's frame, one value per stamp) and write their
        image blocks and/or plots; ``t[rows[b]]`` is stamp ``b``'s result row (output frame).

        A plot that fails (or a rendering that fails when only plots are wanted) is logged and
        costs that plot only."""
        fo = self.fo
        dtype = _DTYPES[fo.dtype]
        try:
            psf = [s.psf for s in stamps] if self.catalog.use_psf else None
            renderer = Renderer(self.model, [s.shape for s in stamps], psf, psf_kind=fo.psf_kind,
                                psf_oversampling=fo.psf_oversampling, dtype=dtype, device=fo.device)
            tv = {k: torch.as_tensor(np.asarray(values[k], dtype=float), dtype=dtype, device=fo.device)
                  for k in self.keys}
            with torch.no_grad():
                model = renderer(tv, check=False)
                comps = renderer.components(tv, check=False)
        except Exception as exc:
            if blocks:
                raise
            for s in stamps:
                self._plot_failure(s.id, exc)
            return
        if blocks:
            self.store.images_dir.mkdir(exist_ok=True)
        for b, (j, s) in enumerate(zip(rows, stamps)):
            model_image = renderer.crop(model, b)
            components = {name: renderer.crop(img, b) for name, img in comps.items()}
            unused = _unused_pixels(s)
            if blocks:
                write_image_block(self.store.images_dir / f"{_safe_name(s.id)}.fits", data=s.image,
                                  model=model_image, sigma=s.sigma, mask=unused, components=components,
                                  cards=self._cards(t, j, s))
            if plots:
                self._plot(t[j], s, model_image, components, unused)

    def plot_path(self, ident) -> Path:
        """The diagnostic plot of galaxy ``ident``."""
        return self.store.plots_dir / f"{_safe_name(ident)}.png"

    def _plot(self, row, s: Stamp, model_image: np.ndarray, components: dict, unused: np.ndarray) -> bool:
        """Write galaxy ``s``'s diagnostic PNG (atomically); a failure is logged, not raised."""
        from .. import plots

        try:
            values = {k: float(row[column(k)]) for k in self.keys}  # image frame, the galaxy's zeropoint
            title = f"{s.id}: {str(row['status']).strip()}, chi2_nu = {float(row['chi2_nu']):.4g}"
            fig = plots.galaxy_figure(self.model, values, s.image, model_image, components, mask=unused,
                                      sigma=s.sigma, offset=s.offset, plate_scale=s.pixel_scale,
                                      zeropoint=s.zeropoint, title=title)
            path = self.plot_path(s.id)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png", dpi=100)
        except Exception as exc:
            self._plot_failure(s.id, exc)
            return False
        return True

    def _plot_failure(self, ident, exc: Exception) -> None:
        self._plot_failed.add(ident)
        log.warning("galaxy %s: PLOT FAILED, no diagnostic plot (%s: %s); its results are not affected",
                    ident, type(exc).__name__, exc)

    def _from_output_frame(self, t: Table, rows: list[int], stamps: list[Stamp]) -> dict[str, np.ndarray]:
        """The values of rows ``rows`` of a result table in the fit's frame (the inverse of
        :meth:`_to_output_frame`)."""
        shift = {"x": np.array([s.offset[0] for s in stamps], dtype=float),
                 "y": np.array([s.offset[1] for s in stamps], dtype=float),
                 "mag": np.array([s.zeropoint - self.model.zeropoint for s in stamps], dtype=float)}
        values = {}
        for key in self.keys:
            v = np.asarray(t[column(key)], dtype=float)[rows]
            d = shift.get(self.kinds[key])
            values[key] = v - d if d is not None else v
        return values

    def plots_at_end(self, table: Table) -> dict:
        """The diagnostic plots still missing for galaxies with results (fitted by a run without
        ``plots``, or whose plot failed in another process), then the catalogue plots; returns the
        plots' part of the summary."""
        from .. import plots

        status = np.asarray(table["status"]).astype(str) if len(table) else np.array([], str)
        fitted = [r for r in range(len(table)) if status[r].strip() != "bad_input"]
        ids = table["id"].tolist() if len(table) else []
        todo = [r for r in fitted if ids[r] not in self._plot_failed and not self.plot_path(ids[r]).is_file()]
        if todo:
            log.info("making the %d diagnostic plots missing from %s", len(todo), self.store.plots_dir)
            where = {i: k for k, i in enumerate(self.catalog.ids)}
            bs = max(1, self.opts.batch_size)
            for start in range(0, len(todo), bs):
                rows, stamps = [], []
                for r in todo[start:start + bs]:
                    try:
                        s = self.catalog.load(where[ids[r]])
                        if s.fatal or s.image is None:
                            raise DataError(f"its input can no longer be read ({s.message})")
                    except Exception as exc:
                        self._plot_failure(ids[r], exc)
                        continue
                    rows.append(r)
                    stamps.append(s)
                if stamps:
                    self._render_outputs(table, rows, stamps, self._from_output_frame(table, rows, stamps),
                                         blocks=False, plots=True)
        made = sum(1 for r in fitted if self.plot_path(ids[r]).is_file())
        catalogue = []
        if fitted:
            try:
                catalogue = [p.name for p in plots.catalog_plots(table, self.store.plots_dir / "catalog")]
            except Exception as exc:
                log.warning("PLOT FAILED: the catalogue plots (%s: %s)", type(exc).__name__, exc)
        log.info("plots: %d of %d fitted galaxies in %s%s", made, len(fitted), self.store.plots_dir,
                 f"; catalogue: {', '.join(catalogue)} in {self.store.plots_dir / 'catalog'}" if catalogue else "")
        return {"galaxies": made, "missing": len(fitted) - made, "catalogue": catalogue}

    def _cards(self, t: Table, j: int, s: Stamp) -> list:
        from .. import __version__

        row = t[j]
        cards = [("ID", str(s.id), "galaxy id"), ("STATUS", str(row["status"]), "fit status"),
                 ("FLAGS", int(row["flags"]), "galprof.Flag bits"), ("MESSAGE", str(row["message"]), ""),
                 ("CHI2", float(row["chi2"]), "chi^2 (or Poisson deviance)"), ("DOF", int(row["dof"]), ""),
                 ("CHI2NU", float(row["chi2_nu"]), "reduced chi^2"), ("NITER", int(row["n_iter"]), "iterations"),
                 ("ZEROPT", float(s.zeropoint), "magnitude zeropoint"),
                 ("PIXSCALE", float(s.pixel_scale), "arcsec/px (nan: unknown)"),
                 ("XOFFSET", s.offset[0], "stamp pixel x is image pixel x + XOFFSET"),
                 ("YOFFSET", s.offset[1], "stamp pixel y is image pixel y + YOFFSET"),
                 ("FITSECT", s.section or "", "cutout region of the image"),
                 ("IMAGE", s.source[-68:], "input image"), ("GALPROF", __version__, "galprof version"),
                 ("MODEL", self.model_source[-68:], "model file")]
        for i, comp in enumerate(self.model.components, start=1):
            cards.append((f"COMP_{i}", comp.name, f"component {i}"))
            cards.append((f"PROF_{i}", comp.profile.name, f"component {i} profile"))
            for spec in comp.profile.params:
                c = f"{comp.name}_{spec.name}"
                cards.append((f"{i}_{spec.name.upper()}", float(row[c]), f"{comp.name}.{spec.name} [{spec.unit}]"))
                cards.append((f"{i}_{spec.name.upper()}_ERR", float(row[c + "_err"]), "1-sigma error"))
        return cards

    # -- the whole run ---------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        from .. import __version__

        try:
            model = self.model.to_dict()
        except GalprofError:
            model = repr(self.model)
        fo = asdict(self.fo)
        fo.pop("device")  # a run may be resumed on another device
        return {"galprof": __version__, "model": model, "fit": fo, "batch_size": self.opts.batch_size,
                "inputs": asdict(self.catalog.options)}

    def batches(self, finished: set) -> list[tuple[int, list[int]]]:
        """(batch number, catalogue rows still to fit) over the whole catalogue's fixed batches."""
        bs = self.opts.batch_size
        out = []
        for number, start in enumerate(range(0, len(self.catalog), bs)):
            rows = [i for i in range(start, min(start + bs, len(self.catalog))) if self.catalog.ids[i] not in finished]
            if rows:
                out.append((number, rows))
        return out

    def load(self, rows: list[int]) -> list[Stamp]:
        return [self.catalog.load(i) for i in rows]

    def execute(self, cluster=None) -> dict:
        """Fit what is left to fit, here or (``cluster``: a
        :class:`~galprof.pipeline.distributed.ClusterOptions`) on a Dask cluster; merge; summarise."""
        opts = self.opts
        t_start = time.perf_counter()
        resumed = self.store.start(self.fingerprint(), overwrite=opts.overwrite)
        finished = self.store.finished(retry_bad=opts.retry_bad)
        todo = self.batches(finished)
        n_todo = sum(len(r) for _, r in todo)
        n_done = len([i for i in self.catalog.ids if i in finished])
        where = "a Dask cluster" if cluster is not None else describe_device(self.fo.device)
        log.info("galprof fit: %d galaxies in %s; %s%d to fit in %d batches of up to %d, on %s",
                 len(self.catalog), self.catalog.path, f"{n_done} already done (resuming); " if resumed else "",
                 n_todo, len(todo), opts.batch_size, where)
        if self.catalog.ignored:
            log.warning("catalogue columns not used: %s", ", ".join(self.catalog.ignored))
        progress = Progress(n_todo, n_done, bar=opts.progress)
        extra = {}
        if cluster is not None:
            from .distributed import fit_on_cluster

            fitted_now, extra = fit_on_cluster(self, todo, progress, cluster)
        else:
            fitted_now = self._fit_here(todo, progress)
        progress.close()
        elapsed = time.perf_counter() - t_start
        return self.finish(fitted_now, elapsed, progress.rate, extra)

    def _fit_here(self, todo: list[tuple[int, list[int]]], progress: Progress) -> int:
        """Fit the batches ``todo`` in this process (files read ahead in threads); returns the
        number of galaxies processed."""
        workers = max(1, int(self.opts.read_threads))
        pending: deque = deque()
        fitted_now = 0
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="galprof-read") as pool:
                queue = iter(todo)

                def submit() -> None:
                    nxt = next(queue, None)
                    if nxt is not None:
                        pending.append((nxt[0], pool.submit(self.load, nxt[1])))

                for _ in range(workers + 1):
                    submit()
                try:
                    while pending:
                        number, future = pending.popleft()
                        stamps = future.result()
                        submit()
                        table = self.fit_batch(number, stamps)
                        self.store.write_part(table)
                        flagged = int(np.sum(np.asarray(table["status"]) == "bad_input"))
                        fitted_now += len(stamps)
                        progress.update(len(stamps), flagged)
                except BaseException:
                    for _, f in pending:
                        f.cancel()
                    raise
        except KeyboardInterrupt:
            progress.close()
            raise Interrupted(f"interrupted after {fitted_now} galaxies; their results are in "
                              f"{self.store.parts_dir}: run the same command again to resume") from None
        return fitted_now

    def finish(self, fitted_now: int, elapsed: float, rate: float, extra: dict | None = None) -> dict:
        from .. import __version__

        table, dropped = self.store.merge(self.catalog.ids)
        if dropped:
            log.warning("%d results in %s are for ids no longer in the catalogue: left out of the table",
                        dropped, self.store.parts_dir)
        missing = len(self.catalog) - len(table)
        table.meta.update({
            "GALPROF": __version__, "TORCH": str(torch.__version__), "MODEL": str(self.model_source),
            "MODELDEF": json.dumps(self.fingerprint()["model"], default=str),
            "CATALOG": str(self.catalog.path), "NGAL": len(table),
            "OPTIONS": json.dumps({**asdict(self.fo), "batch_size": self.opts.batch_size,
                                   "inputs": asdict(self.catalog.options)}, default=str),
            "DEVICE": self.device_text, "DATE": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "FLAGBITS": ",".join(f"{int(f)}={f.name}" for f in Flag),
        })
        for fmt in self.opts.formats:
            write_table(table, self.store.out / f"results{TABLE_FORMATS[fmt]}", fmt)
        summary = _summary(table, len(self.catalog))
        if self.opts.plots:
            summary["plots"] = self.plots_at_end(table)
        summary["this_run"] = {"galaxies": fitted_now, "seconds": round(elapsed, 3),
                               "galaxies_per_s": round(rate, 4) if fitted_now else None, **(extra or {})}
        summary["missing"] = missing
        with atomic_path(self.store.out / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=1))
        for line in _summary_lines(summary):
            log.info("%s", line)
        return summary


def _summary(table: Table, n_catalog: int) -> dict:
    status = np.asarray(table["status"]).astype(str) if len(table) else np.array([], str)
    flags = np.asarray(table["flags"], dtype=np.int64) if len(table) else np.array([], np.int64)
    counts = {s.name.lower(): int(np.sum(status == s.name.lower())) for s in Status}
    by_flag = {f.name: int(np.sum((flags & int(f)) != 0)) for f in Flag}
    return {"catalogue": n_catalog, "results": int(len(table)),
            "fitted": int(len(table) - counts["bad_input"]), "status": counts,
            "not_fitted": counts["bad_input"], "flags": {k: v for k, v in by_flag.items() if v}}


def _summary_lines(s: dict) -> list[str]:
    st = s["status"]
    lines = [f"done: {s['results']} of {s['catalogue']} galaxies have results; fitted {s['fitted']} "
             f"(converged {st['converged']}, iteration cap {st['max_iter']}, non-finite {st['nonfinite']}), "
             f"not fitted (bad input) {s['not_fitted']}"]
    if s["flags"]:
        lines.append("flags: " + ", ".join(f"{k} {v}" for k, v in s["flags"].items()))
    r = s.get("this_run") or {}
    if r.get("galaxies"):
        lines.append(f"this run: {r['galaxies']} galaxies in {r['seconds']:.1f} s "
                     f"({r['galaxies_per_s']:.2f} galaxies/s while fitting)")
    return lines


def _unused_pixels(s: Stamp) -> np.ndarray:
    """Pixels the fit did not use: masked, non-finite data, or sigma not finite and positive."""
    sigma = s.sigma
    mask = s.mask if s.mask is not None else np.zeros(s.shape, bool)
    return mask | ~np.isfinite(s.image) | ~(np.isfinite(sigma) & (sigma > 0))


def _statistics_last(t: Table) -> Table:
    """The fit statistics as the last columns, as in :meth:`FitResult.to_table`."""
    tail = [c for c in ("chi2", "dof", "chi2_nu", "n_iter", "status", "flags", "message") if c in t.colnames]
    order = [c for c in t.colnames if c not in tail] + tail
    return t if order == t.colnames else t[order]


def _fill_masked(t: Table) -> Table:
    """Outer joins leave masked cells for columns a sub-table lacked: NaN / 0 / ''."""
    out = Table(meta=t.meta)
    for c in t.colnames:
        col = t[c]
        if hasattr(col, "mask") and np.any(col.mask):
            kind = col.dtype.kind
            col = col.filled(np.nan if kind == "f" else 0 if kind in "iub" else "")
        out[c] = np.asarray(col)
    return out


def run_pipeline(model: Model, catalog: Catalog, options: PipelineOptions, *, model_source: str = "",
                 hooks: Sequence[Callable] = (), cluster=None) -> dict:
    """Fit every galaxy of ``catalog`` with ``model``; write tables (and image blocks, plots) to
    ``options.out``; return the summary (also written to ``summary.json``).

    Re-running with the same model and options resumes: galaxies with results are skipped.
    With ``cluster`` (a :class:`~galprof.pipeline.distributed.ClusterOptions`), the batches are
    fitted on a Dask cluster's workers and written here, with the same guarantees (a run may be
    resumed in-process or on a cluster, whichever ran before).

    Raises
    ------
    GalprofError
        For problems of the run as a whole, before any fitting; :class:`Interrupted` on Ctrl-C.
    """
    if options.batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {options.batch_size}")
    if options.read_threads < 1:
        raise DataError(f"read threads must be >= 1, got {options.read_threads}")
    formats = list(dict.fromkeys(options.formats))
    if not formats:
        raise DataError("no output format given")
    for fmt in formats:
        check_format(fmt)
    options.formats = formats
    if options.plots:
        from ..plots import check_available

        check_available()  # matplotlib missing: an error now, not after the fit
    run = _Run(model, catalog, options, model_source, hooks)
    store = run.store
    store.lock()
    handler = logging.FileHandler(Path(options.out) / "galprof.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    old_level = log.level
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        return run.execute(cluster)
    finally:
        log.removeHandler(handler)
        handler.close()
        log.setLevel(old_level)
        store.unlock()
        with contextlib.suppress(Exception):
            del run
