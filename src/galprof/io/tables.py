"""Result tables on disk: FITS, CSV, Parquet and HDF5, metadata included, written atomically.

* ``fits``: a binary table; metadata in its header (string columns stored as UTF-8).
* ``csv``: plain comma-separated values (a header line, then one line per row, floats with all
  their digits); the metadata and the column types go to a sidecar ``<name>.csv.meta.json``, from
  which :func:`read_table` restores them exactly (ids such as ``007`` stay strings).
* ``parquet`` (needs pyarrow: ``pip install 'galprof[parquet]'``): metadata as JSON under the
  schema metadata key ``galprof``.
* ``h5`` (needs h5py: ``pip install 'galprof[hdf5]'``): dataset ``results``, astropy's serialised
  metadata.

Every write goes to a temporary file in the same folder that is then renamed over the target, so
a reader (or a killed writer) never sees a partial table.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from astropy.table import MaskedColumn, Table

from ..errors import DataError

__all__ = ["TABLE_FORMATS", "atomic_path", "check_format", "csv_sidecar", "read_table", "table_format", "write_table"]

#: format name -> file suffix
TABLE_FORMATS = {"fits": ".fits", "csv": ".csv", "parquet": ".parquet", "h5": ".h5"}
_NEEDS = {"parquet": ("pyarrow", "parquet"), "h5": ("h5py", "hdf5")}


def check_format(fmt: str) -> None:
    """Raise :class:`~galprof.errors.DataError` if ``fmt`` is unknown or its library is missing."""
    if fmt not in TABLE_FORMATS:
        raise DataError(f"table format {fmt!r} is not one of {sorted(TABLE_FORMATS)}")
    if fmt in _NEEDS:
        module, extra = _NEEDS[fmt]
        try:
            __import__(module)
        except ImportError:
            raise DataError(f"{fmt} tables need {module}: pip install 'galprof[{extra}]'") from None


def table_format(path: str | os.PathLike) -> str:
    """The format of a table file, from its suffix."""
    suffix = Path(path).suffix.lower()
    for fmt, s in TABLE_FORMATS.items():
        if suffix == s or (fmt == "h5" and suffix in (".hdf5", ".hdf")):
            return fmt
    raise DataError(f"{str(path)!r}: unknown table format (use {', '.join(TABLE_FORMATS.values())})")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it is flushed to disk and renamed to
    ``path`` (atomic on POSIX), on failure removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # as a plainly created file (mkstemp makes it private)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def write_table(table: Table, path: str | os.PathLike, fmt: str | None = None) -> None:
    """Write ``table`` (with its ``meta``) to ``path`` atomically, in ``fmt`` (default: from the suffix)."""
    fmt = fmt or table_format(path)
    check_format(fmt)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy's notes about long header values
        if fmt == "fits":
            t = Table(table, copy=False)
            for name in t.colnames:
                if t[name].dtype.kind == "U":
                    t[name] = np.char.encode(np.asarray(t[name], dtype=str), "utf-8")
            t.write(tmp, format="fits", overwrite=True)
        elif fmt == "csv":
            table.write(tmp, format="ascii.csv", overwrite=True)
        elif fmt == "parquet":
            _write_parquet(table, tmp)
        else:
            table.write(tmp, format="hdf5", path="results", serialize_meta=True, overwrite=True)
    if fmt == "csv":
        side = {"meta": dict(table.meta), "dtypes": {c: table[c].dtype.str for c in table.colnames}}
        with atomic_path(csv_sidecar(path)) as tmp:
            tmp.write_text(json.dumps(side, indent=1, default=str))


def read_table(path: str | os.PathLike, fmt: str | None = None) -> Table:
    """Read a table written by :func:`write_table` (strings as ``str``, metadata in ``meta``)."""
    fmt = fmt or table_format(path)
    check_format(fmt)
    if fmt == "fits":
        t = Table.read(path, format="fits", mask_invalid=False)
    elif fmt == "csv":
        t = _read_csv(path)
    elif fmt == "parquet":
        t = _read_parquet(path)
    else:
        t = Table.read(path, format="hdf5", path="results")
    return _normalise(t)


def csv_sidecar(path: str | os.PathLike) -> Path:
    """The file beside a CSV table that holds its metadata and column types."""
    return Path(str(path) + ".meta.json")


def _read_csv(path) -> Table:
    side = csv_sidecar(path)
    if not side.is_file():
        return Table.read(path, format="ascii.csv")
    from astropy.io import ascii

    info = json.loads(side.read_text())
    raw = Table.read(path, format="ascii.csv", converters={"*": [ascii.convert_numpy(str)]})
    t = Table(meta=info.get("meta", {}))
    for name in raw.colnames:
        col = raw[name]
        text = np.asarray(col.filled("") if isinstance(col, MaskedColumn) else col, dtype=str)
        dt = np.dtype(info["dtypes"].get(name, "<U0"))
        if dt.kind in "SU":
            t[name] = text
        elif dt.kind == "b":
            t[name] = np.array([v == "True" for v in text])
        else:
            t[name] = np.array([v if v != "" else "nan" for v in text]).astype(dt) if len(text) else np.array([], dt)
    return t


def _normalise(t: Table) -> Table:
    """Bytes columns decoded as UTF-8; empty strings that readers return masked made plain again."""
    out = Table(meta=dict(t.meta))
    for name in t.colnames:
        c = t[name]
        if c.dtype.kind in "SU" or c.dtype.kind == "O":
            values = c.filled("") if isinstance(c, MaskedColumn) else c
            out[name] = np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values], dtype=str) \
                if len(values) else np.array([], dtype=str)
        elif isinstance(c, MaskedColumn) and (not np.any(c.mask) or c.dtype.kind == "f"):
            out[name] = c.filled(np.nan) if c.dtype.kind == "f" else np.asarray(c.data)
        else:
            out[name] = c
    return out


def _write_parquet(table: Table, path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {}
    for name in table.colnames:
        c = np.asarray(table[name])
        arrays[name] = pa.array(c.astype(str).tolist() if c.dtype.kind in "SUO" else c)
    meta = {"galprof": json.dumps(dict(table.meta), default=str)}
    pq.write_table(pa.table(arrays).replace_schema_metadata(meta), path)


def _read_parquet(path) -> Table:
    import pyarrow.parquet as pq

    pt = pq.read_table(path)
    t = Table()
    for name in pt.column_names:
        values = pt.column(name).to_numpy(zero_copy_only=False)
        t[name] = np.array(values.tolist(), dtype=str) if values.dtype.kind == "O" else values
    raw = (pt.schema.metadata or {}).get(b"galprof")
    if raw:
        t.meta.update(json.loads(raw))
    return t
