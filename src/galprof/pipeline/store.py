"""The output folder of a survey run: results written batch by batch, resumable at any moment.

Layout of ``--out DIR``::

    run.json          the run's fingerprint: model and the options that change results
    parts/part-NNNNNNN.fits   one table per fitted batch, written atomically (temporary file + rename)
    results.<fmt>     the merged table, in catalogue order (written at the end, atomically)
    images/<id>.fits  image blocks (--save-images)
    plots/<id>.png    diagnostic plots (--plots); plots/catalog/*.png the catalogue's
    galprof.log, summary.json

A batch's part is renamed into place only once its table (and its image blocks) are complete, so
after a kill at any moment the folder holds whole parts only: re-running skips their ids, refits
the batches that were in flight, and merges. An id is never in two parts unless a galaxy was
deliberately refitted (``retry_bad``); the merge then keeps the newest row.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table, vstack

from ..errors import DataError
from ..io.tables import TABLE_FORMATS, atomic_path, read_table, write_table

__all__ = ["ResultStore"]

log = logging.getLogger("galprof")

_PART = re.compile(r"^part-(\d{7,})\.fits$")


class ResultStore:
    """The output folder ``out`` of a run (see the module docstring)."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.parts_dir = self.out / "parts"
        self.images_dir = self.out / "images"
        self.plots_dir = self.out / "plots"
        self._lock_file = None
        self._counter = 0

    # -- a single writer per folder -----------------------------------------------------------
    def lock(self) -> None:
        """Take the folder's lock (released when the process ends, even if killed)."""
        self.out.mkdir(parents=True, exist_ok=True)
        f = open(self.out / ".lock", "a+")
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX: no lock
            pass
        except OSError:
            f.close()
            raise DataError(f"another galprof run is writing to {str(self.out)!r}") from None
        self._lock_file = f

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # -- the run's identity -----------------------------------------------------------------
    def start(self, fingerprint: dict, *, overwrite: bool = False) -> bool:
        """Check that the folder holds nothing or the same run; returns whether it resumes one.

        With ``overwrite``, previous results (parts, tables, image blocks, plots) are deleted first."""
        run_file = self.out / "run.json"
        if overwrite:
            results = [self.out / f"results{s}" for s in TABLE_FORMATS.values()] + [self.out / "results.csv.meta.json"]
            for p in [run_file, self.out / "summary.json"] + results:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            for d in (self.parts_dir, self.images_dir, self.plots_dir):
                shutil.rmtree(d, ignore_errors=True)
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        # temporaries of a killed run
        for d in (self.out, self.parts_dir, self.images_dir, self.plots_dir, self.plots_dir / "catalog"):
            if d.is_dir():
                for tmp in d.glob(".*.tmp"):
                    with contextlib.suppress(OSError):
                        tmp.unlink()
        fingerprint = json.loads(json.dumps(fingerprint, default=str))
        resumed = run_file.is_file()
        if resumed:
            try:
                old = json.loads(run_file.read_text())
            except (OSError, ValueError) as exc:
                raise DataError(f"{run_file} is unreadable ({exc}); use --overwrite to start again") from None
            if old != fingerprint:
                diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                raise DataError(f"{str(self.out)!r} holds results of a different run ({', '.join(diff)} differ); "
                                "use another --out, the same model and options, or --overwrite")
        else:
            with atomic_path(run_file) as tmp:
                tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
        self._counter = max((int(m.group(1)) for m in map(_PART.match, os.listdir(self.parts_dir)) if m), default=0)
        return resumed

    # -- parts --------------------------------------------------------------------------------
    def parts(self) -> list[Path]:
        """Part files in the order they were written."""
        found = [(int(m.group(1)), self.parts_dir / n) for n in os.listdir(self.parts_dir) if (m := _PART.match(n))]
        return [p for _, p in sorted(found)]

    def read_parts(self) -> list[Table]:
        """Every part (an unreadable one, which atomic writes should make impossible, is set
        aside with a warning: its galaxies are fitted again)."""
        tables = []
        for p in self.parts():
            try:
                tables.append(read_table(p, "fits"))
            except Exception as exc:
                bad = self.parts_dir / "unreadable"
                bad.mkdir(exist_ok=True)
                os.replace(p, bad / p.name)
                log.warning("part %s is unreadable (%s): moved to %s, its galaxies will be fitted again", p.name,
                            exc, bad)
        return tables

    def finished(self, *, retry_bad: bool = False) -> set:
        """Ids with a result (with ``retry_bad``, not counting those whose newest status is ``bad_input``)."""
        latest = {}
        for p in self.parts():
            try:
                with fits.open(p, memmap=False) as hdul:  # two columns only: quick for thousands of parts
                    ids, status = hdul[1].data["id"], hdul[1].data["status"]
            except Exception:
                self.read_parts()  # sets the unreadable part aside (with a warning)
                continue
            for i, st in zip(ids.tolist(), status.tolist()):
                latest[i.decode() if isinstance(i, bytes) else i] = st.decode() if isinstance(st, bytes) else st
        return {i for i, s in latest.items() if not (retry_bad and s == "bad_input")}

    def write_part(self, table: Table) -> Path:
        """Write one batch's results as the next part, atomically."""
        self._counter += 1
        path = self.parts_dir / f"part-{self._counter:07d}.fits"
        write_table(table, path, "fits")
        return path

    # -- the merged table ---------------------------------------------------------------------
    def merge(self, ids: list) -> tuple[Table, int]:
        """All parts as one table, one row per id, in the order of ``ids`` (rows of ids not in
        ``ids`` left out: their count is returned too)."""
        tables = self.read_parts()
        if not tables:
            return Table(), 0
        columns = []
        for t in tables:
            columns += [c for c in t.colnames if c not in columns]
        for t in tables:
            n = len(t)
            for c in columns:
                if c not in t.colnames:
                    like = next(tt[c] for tt in tables if c in tt.colnames)
                    t[c] = _blank(like.dtype, n)
        merged = vstack([t[columns] for t in tables], join_type="exact", metadata_conflicts="silent")
        order = {v: k for k, v in enumerate(ids)}
        row_ids = merged["id"].tolist()
        newest = {}
        for r, i in enumerate(row_ids):  # later parts supersede earlier ones
            newest[i] = r
        keep = [r for i, r in newest.items() if i in order]
        keep.sort(key=lambda r: order[row_ids[r]])
        dropped = sum(1 for i in newest if i not in order)
        out = merged[keep]
        out.meta.clear()
        return out, dropped


def _blank(dtype: np.dtype, n: int) -> np.ndarray:
    if dtype.kind == "f":
        return np.full(n, np.nan)
    if dtype.kind in "iub":
        return np.zeros(n, dtype=dtype)
    return np.array([""] * n, dtype=str)
