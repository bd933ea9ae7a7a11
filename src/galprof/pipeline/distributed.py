"""Fitting a catalogue on a Dask cluster (``galprof fit ... --cluster ADDRESS`` or ``--workers N``).

The process that runs ``galprof fit`` (the *client*) owns the output folder exactly as a run on
one machine does: it takes the folder's lock, checks ``run.json``, finds what is left to fit,
cuts it into the same fixed batches, and writes every finished batch as one atomic part
(:class:`~galprof.pipeline.store.ResultStore`), then merges. The only difference is where a batch
is fitted: each batch is one Dask task (a *partition*) that a worker runs: it reads the batch's
files (workers must see the input files, and with ``--save-images`` the output folder, at the
same paths: a shared file system, as on any HPC cluster), fits them on the worker's device and
sends the batch's table back. Results stream back as they finish, and a bounded number of
partitions is in flight (``in_flight`` per worker thread), so that neither the client nor the
scheduler holds the whole catalogue's tasks or results.

Because the batches, their seeds and the code that fits them are those of a run on one machine,
a cluster run gives the same table (to the rounding of the batched linear algebra on another
number of threads), and a run may be resumed on a cluster after an in-process run or the other way
round. Lost work is redone, never duplicated: the partitions of a worker that dies are rescheduled
by the Dask scheduler on the other workers (up to ``distributed.scheduler.allowed-failures`` times
per partition), a partition whose task raises is tried again ``retries`` times, and a part is
written only by the client, once per batch, from the task's single result.

Dask (``dask`` and ``distributed``) is an optional dependency: ``pip install 'galprof[dask]'``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import GalprofError

__all__ = ["ClusterError", "ClusterOptions", "fit_on_cluster", "fit_partition", "local_cluster", "worker_device"]

log = logging.getLogger("galprof")


class ClusterError(GalprofError, RuntimeError):
    """The cluster could not be used, or a partition failed for good (the parts finished so far
    are kept: the run resumes)."""


@dataclass
class ClusterOptions:
    """Where and how batches are fitted on a Dask cluster.

    Parameters
    ----------
    address : str or None
        A running cluster: its scheduler's address (``tcp://host:8786``), or the path of the JSON
        scheduler file that ``dask scheduler --scheduler-file`` writes. None: start a local
        cluster of ``n_workers`` worker processes on the loopback interface.
    n_workers : int or None
        Worker processes of the local cluster (``--workers N``).
    threads_per_worker : int
        Threads of each local worker (each thread fits one batch at a time, with one torch thread).
    retries : int
        How many more times a partition whose task raised is tried (Dask's ``retries``). Partitions
        of workers that die are rescheduled by the scheduler in any case.
    in_flight : int
        Partitions submitted per worker thread ahead of the results (at least 2 keeps every worker
        busy while the client writes parts).
    connect_timeout : float
        Seconds to wait for the scheduler at ``address``.
    """

    address: str | None = None
    n_workers: int | None = None
    threads_per_worker: int = 1
    retries: int = 2
    in_flight: int = 2
    connect_timeout: float = 30.0

    def validate(self) -> None:
        if (self.address is None) == (self.n_workers is None):
            raise ClusterError("give a scheduler address (--cluster) or a number of local workers (--workers), "
                               "not both and not neither")
        if self.n_workers is not None and self.n_workers < 1:
            raise ClusterError(f"--workers must be >= 1, got {self.n_workers}")
        if self.threads_per_worker < 1:
            raise ClusterError(f"threads per worker must be >= 1, got {self.threads_per_worker}")
        if self.retries < 0:
            raise ClusterError(f"retries must be >= 0, got {self.retries}")
        if self.in_flight < 1:
            raise ClusterError(f"in_flight must be >= 1, got {self.in_flight}")


def _import_distributed():
    try:
        import distributed
    except ImportError as exc:
        raise ClusterError(f"running on a Dask cluster needs dask and distributed ({exc}): "
                           "pip install 'galprof[dask]'") from None
    return distributed


#: Dask's nanny starts workers with this variable (65536), which fixes glibc's mmap threshold at
#: 128 kB: every large temporary tensor is then mapped and unmapped afresh, and fitting on CPU runs
#: 2-3x slower (docs/benchmarks.md). galprof's local clusters leave it out.
SLOW_MALLOC = "MALLOC_TRIM_THRESHOLD_"


def local_cluster(n_workers: int, threads_per_worker: int = 1, **kwargs):
    """A :class:`distributed.LocalCluster` of ``n_workers`` worker processes on the loopback
    interface, as ``--workers N`` starts it: workers without Dask's ``MALLOC_TRIM_THRESHOLD_``
    (see :data:`SLOW_MALLOC`) and without Dask's sampling profiler (which interrupts the fitting
    thread every 10 ms), one torch thread per worker thread (Dask's ``OMP_NUM_THREADS=1``)."""
    import dask

    distributed = _import_distributed()
    options = {"processes": True, "host": "127.0.0.1", "dashboard_address": ":0", **kwargs}
    with dask.config.set({f"distributed.nanny.pre-spawn-environ.{SLOW_MALLOC}": None,
                          "distributed.worker.profile.enabled": False}):
        return distributed.LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, **options)


# ---------------------------------------------------------------------------------------------
# The worker's side
@dataclass
class _Recipe:
    """What every partition's task needs besides its catalogue rows: pickled once by the client,
    unpickled by one task (:func:`_load_recipe`) whose result the partitions' tasks depend on, so
    that it crosses the network once per worker (and is recomputed, from the scheduler's copy of
    the pickle, if every worker holding it is lost)."""

    token: str
    model: object
    options: object  # PipelineOptions
    model_source: str
    hooks: list
    assign_gpus: bool  # a local cluster started by galprof: worker i takes GPU i mod (GPUs) if it sees several


_FILE_OPTIONS = ("image", "sigma", "weight", "psf", "mask")  # InputOptions that name files
_TEMPLATES: dict = {}  # on a worker: run token -> empty result table (for rows that cannot be fitted)
_CACHE_LOCK = threading.Lock()


def _worker_warnings(device: str) -> list[str]:
    """Settings of this worker process that make fitting slow (reported once per run by the client)."""
    if device == "cpu" and SLOW_MALLOC in os.environ and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        return [f"workers run with {SLOW_MALLOC}={os.environ[SLOW_MALLOC]} (Dask's default), which makes fitting on "
                "CPU 2-3x slower: start them with MALLOC_MMAP_THRESHOLD_=33554432 in their environment, or "
                f"set the Dask configuration distributed.nanny.pre-spawn-environ.{SLOW_MALLOC} to null"]
    return []


def worker_device(device: str, *, assign_gpus: bool = False, worker_name=None) -> str:
    """The device a worker fits on, from the run's ``--device``.

    ``cuda`` is the worker's first visible GPU: give each worker its own GPU through
    ``CUDA_VISIBLE_DEVICES`` (as dask-cuda and ``srun --gpus-per-task=1`` do). On a node where a
    local cluster started by galprof (``assign_gpus``) sees several GPUs and
    ``CUDA_VISIBLE_DEVICES`` is not set, worker ``i`` takes GPU ``i mod (number of GPUs)``. Any
    other device string (``cpu``, ``cuda:1``, ``mps``) is used as given.
    """
    if device != "cuda" or not assign_gpus or "CUDA_VISIBLE_DEVICES" in os.environ:
        return device
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n > 1 and isinstance(worker_name, int):
        return f"cuda:{worker_name % n}"
    return device


def _load_recipe(blob: bytes) -> _Recipe:
    import pickle

    return pickle.loads(blob)


def _worker_name():
    with contextlib.suppress(Exception):
        from distributed import get_worker

        return get_worker().name
    return None


class _Collect(logging.Handler):
    """The galprof log records of this thread (a task's), to be re-emitted by the client."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.thread = threading.get_ident()
        self.records: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.records.append((record.levelno, record.getMessage()))


def fit_partition(recipe: _Recipe, number: int, rows: list[int], part) -> tuple:
    """A worker's task: load and fit one batch (``part``, the catalogue's rows ``rows``, batch
    ``number``) exactly as a run on one machine does; returns ``(table, log records, info)``."""
    from .run import _Run, describe_device

    t0, c0 = time.perf_counter(), time.thread_time()
    token = recipe.token
    device = worker_device(recipe.options.fit.device, assign_gpus=recipe.assign_gpus, worker_name=_worker_name())
    opts = recipe.options
    if device != opts.fit.device:
        opts = replace(opts, fit=replace(opts.fit, device=device))
    collect = _Collect()
    logger = logging.getLogger("galprof")
    logger.addHandler(collect)
    try:
        run = _Run(recipe.model, part, opts, recipe.model_source, recipe.hooks)
        with _CACHE_LOCK:
            run._template = _TEMPLATES.get(token)
        stamps = [part.load(k) for k in range(len(part))]
        for s, row in zip(stamps, rows):
            s.index = row  # the row of the whole catalogue (as in a run on one machine)
        t1 = time.perf_counter()
        table = run.fit_batch(number, stamps)
        if run._template is not None:
            with _CACHE_LOCK:
                if len(_TEMPLATES) > 8:
                    _TEMPLATES.clear()
                _TEMPLATES.setdefault(token, run._template)
    finally:
        logger.removeHandler(collect)
    t2 = time.perf_counter()
    worker = None
    with contextlib.suppress(Exception):
        from distributed import get_worker

        worker = get_worker().address
    info = {"worker": worker, "pid": os.getpid(), "device": describe_device(device), "read_s": t1 - t0,
            "fit_s": t2 - t1, "cpu_s": time.thread_time() - c0, "warnings": _worker_warnings(device)}
    return table, collect.records, info


# ---------------------------------------------------------------------------------------------
# The client's side
@contextlib.contextmanager
def _client(copts: ClusterOptions):
    """A :class:`distributed.Client` on the scheduler at ``address``, or on a local cluster of
    ``n_workers`` processes (closed at the end)."""
    distributed = _import_distributed()
    if copts.address is not None:
        where = {"scheduler_file": copts.address} if os.path.isfile(copts.address) else {"address": copts.address}
        try:
            client = distributed.Client(**where, timeout=copts.connect_timeout, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ClusterError(f"cannot connect to the Dask scheduler at {copts.address!r}: {exc}") from None
        with client:
            yield client, False
        return
    t0 = time.perf_counter()
    chatter = logging.getLogger("distributed")  # the local cluster's start and stop notices: not the user's concern
    level = chatter.level
    if chatter.getEffectiveLevel() < logging.WARNING:
        chatter.setLevel(logging.WARNING)
    try:
        cluster = local_cluster(copts.n_workers, copts.threads_per_worker)
        with cluster, distributed.Client(cluster, set_as_default=False) as client:
            log.info("started a local Dask cluster of %d worker processes x %d threads at %s (%.1f s)",
                     copts.n_workers, copts.threads_per_worker, cluster.scheduler_address, time.perf_counter() - t0)
            yield client, True
    finally:
        chatter.setLevel(level)


def fit_on_cluster(run, todo: list[tuple[int, list[int]]], progress, copts: ClusterOptions) -> tuple[int, dict]:
    """Fit the batches ``todo`` of the pipeline run ``run`` on a Dask cluster, writing each one's
    part as it comes back; returns the galaxies processed and the ``cluster`` entry of the summary.

    Raises
    ------
    ClusterError
        No dask, no scheduler, or a partition that failed for good (its traceback is logged).
    Interrupted
        On Ctrl-C (the parts written are kept).
    """
    import numpy as np

    from .run import Interrupted

    copts.validate()
    distributed = _import_distributed()
    import cloudpickle

    if not todo:
        return 0, {"cluster": {"address": copts.address or "local", "partitions": 0}}

    t_start = time.perf_counter()
    token = uuid.uuid4().hex[:12]
    fitted_now = 0
    per_worker: Counter = Counter()
    devices: set = set()
    task_s = read_s = write_s = cpu_s = 0.0
    with _client(copts) as (client, local):
        # paths as absolute ones: a worker's working directory may be another one
        options = replace(run.opts, out=Path(run.opts.out).resolve())
        inputs = run.catalog.options
        inputs = replace(inputs, **{k: os.path.abspath(v) for k in _FILE_OPTIONS if (v := getattr(inputs, k, None))})
        recipe = _Recipe(token=token, model=run.model, options=options, model_source=run.model_source,
                         hooks=run.hooks, assign_gpus=local)
        recipe_future = client.submit(_load_recipe, cloudpickle.dumps(recipe), key=f"galprof-recipe-{token}",
                                      pure=False, retries=copts.retries)
        started = time.perf_counter() - t_start
        if not local:
            n_threads = sum(client.nthreads().values())
            log.info("Dask scheduler %s: %d workers, %d threads", copts.address, len(client.nthreads()), n_threads)
        queue = iter(todo)
        rows_of: dict = {}
        pending = distributed.as_completed(loop=client.loop)
        in_flight = 0

        def submit() -> bool:
            nonlocal in_flight
            nxt = next(queue, None)
            if nxt is None:
                return False
            number, rows = nxt
            part = run.catalog.subset(rows)
            part.options = inputs
            future = client.submit(fit_partition, recipe_future, number, rows, part,
                                   key=f"galprof-fit-{token}-{number}", retries=copts.retries, pure=False)
            rows_of[future.key] = (number, rows)
            pending.add(future)
            in_flight += 1
            return True

        window = [0, -1e9]  # partitions to keep in flight, when it was last asked (workers come and go)

        def fill() -> None:
            now = time.perf_counter()
            if now - window[1] > 2.0:
                window[:] = [copts.in_flight * max(1, sum(client.nthreads().values())), now]
            while in_flight < window[0] and submit():
                pass

        written: set = set()
        warned: set = set()
        try:
            fill()
            for future in pending:
                in_flight -= 1
                number, rows = rows_of.pop(future.key)
                if future.status != "finished":
                    _fail(future, number, rows, run, len(written))
                table, records, info = future.result()
                future.release()
                for level, message in records:
                    log.log(level, "%s", message)
                if number in written:  # cannot happen (one result per task), but never a second part
                    log.warning("batch %d came back twice: the second result is ignored", number)
                else:
                    t_write = time.perf_counter()
                    run.store.write_part(table)
                    write_s += time.perf_counter() - t_write
                    written.add(number)
                    fitted_now += len(rows)
                    progress.update(len(rows), int(np.sum(np.asarray(table["status"]) == "bad_input")))
                per_worker[info["worker"]] += 1
                for text in info.get("warnings", ()):
                    if text not in warned:
                        warned.add(text)
                        log.warning("%s", text)
                devices.add(info["device"])
                task_s += info["read_s"] + info["fit_s"]
                cpu_s += info.get("cpu_s", 0.0)
                read_s += info["read_s"]
                fill()
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):
                client.cancel(list(pending.futures))
            progress.close()
            raise Interrupted(f"interrupted after {fitted_now} galaxies; their results are in "
                              f"{run.store.parts_dir}: run the same command again to resume") from None
        except BaseException:
            with contextlib.suppress(Exception):
                client.cancel(list(pending.futures))
            raise
        n_workers = len(client.nthreads())
    if devices:
        run.device_text = f"Dask cluster: {'; '.join(sorted(devices))}"
    n_parts = len(written)
    summary = {"address": copts.address or "local", "workers_at_end": n_workers, "startup_s": round(started, 3),
               "partitions": n_parts, "partitions_per_worker": dict(per_worker),
               "task_s_mean": round(task_s / n_parts, 4) if n_parts else None,
               "task_cpu_s_mean": round(cpu_s / n_parts, 4) if n_parts else None,
               "read_s_mean": round(read_s / n_parts, 4) if n_parts else None,
               "write_s_mean": round(write_s / n_parts, 4) if n_parts else None}
    log.info("cluster: %d partitions on %d workers (%s)", n_parts, len(per_worker),
             ", ".join(f"{w}: {n}" for w, n in sorted(per_worker.items(), key=lambda kv: str(kv[0]))))
    return fitted_now, {"cluster": summary}


def _fail(future, number: int, rows: list[int], run, n_written: int):
    """Raise a :class:`ClusterError` for a partition that failed for good."""
    exc = future.exception()
    with contextlib.suppress(Exception):
        import traceback

        tb = "".join(traceback.format_tb(future.traceback()))
        log.error("batch %d failed on the cluster:\n%s%s: %s", number, tb, type(exc).__name__, exc)
    ids = run.catalog.ids
    what = f"batch {number} (catalogue rows {rows[0]}-{rows[-1]}, ids {ids[rows[0]]}..{ids[rows[-1]]})"
    if type(exc).__name__ == "KilledWorker":
        cause = ("its workers died each time it ran (memory? a crash in a library?): try a smaller --batch-size, "
                 "or fit those rows on their own")
    else:
        cause = f"it raised {type(exc).__name__}: {exc}"
    raise ClusterError(f"{what} failed on the cluster after its retries: {cause}. The {n_written} batches finished "
                       f"are in {run.store.parts_dir}: fix the cause and run again to resume") from exc
