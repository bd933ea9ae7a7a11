"""Throughput of `galprof fit` in-process and on a local Dask cluster of 1 and 2 workers, and the
cost of a partition (one batch sent to a worker and its table sent back).

The survey is benchmarks/pipeline_10k.py's (single Sérsic galaxies on 48-64 px stamps with a
25 x 25 Moffat PSF, starts perturbed from the truth), fitted with the pipeline's defaults
(float64, LM, finite-difference Jacobian, covariance errors). Every configuration fits the same
catalogue into a fresh output folder; the tables are compared with the in-process one.

Times: *run* is the wall time of `run_pipeline` (connecting to the cluster included; starting the
local cluster and the workers' first import of torch are done before and reported apart);
*task* is a partition's time on its worker (reading its files + fitting), averaged; the
*overhead per partition* is what a partition costs beyond its task: with one partition in flight
(``in_flight=1``, nothing overlaps) it is ``run / partitions - task``: submitting, scheduling,
sending the batch's rows and the table back, and writing the part. A no-op round trip through the
same client shows Dask's share of it.

Run it on an idle machine if you can, with one thread per process:

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/dask_throughput.py [--n 256] [--batch-size 16]
        [--work /tmp/galprof_dask] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _noop(recipe, number, rows, part):
    return number


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--work", type=Path, default=Path("/tmp/galprof_dask"))
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--noop-tasks", type=int, default=100)
    ap.add_argument("--dask-malloc", action="store_true",
                    help="start the workers as Dask does by default (MALLOC_TRIM_THRESHOLD_=65536), not as galprof")
    args = ap.parse_args()

    import torch
    from distributed import Client, LocalCluster
    from pipeline_10k import generate

    import galprof
    from galprof.catalog import Catalog, InputOptions
    from galprof.io.tables import read_table
    from galprof.pipeline import PipelineOptions, run_pipeline
    from galprof.pipeline.distributed import ClusterOptions, _load_recipe, _Recipe, local_cluster

    work = args.work
    if not (work / "catalog.csv").exists() or len(read_table(work / "truth.fits")) != args.n:
        shutil.rmtree(work, ignore_errors=True)
        generate(work, args.n)
    model = galprof.load_model(work / "model.yaml")

    def catalog():
        return Catalog(work / "catalog.csv", model, InputOptions(psf=str(work / "psf.fits")))

    def options(name):
        out = work / f"out_{name}"
        shutil.rmtree(out, ignore_errors=True)
        return PipelineOptions(out=out, batch_size=args.batch_size, progress=False, formats=["fits"])

    n_parts = -(-args.n // args.batch_size)
    print(f"{args.n} galaxies, {n_parts} partitions of {args.batch_size}; {platform.machine()} "
          f"{os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} thread(s); "
          f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    rows = []

    t0, c0 = time.perf_counter(), time.process_time()
    s = run_pipeline(model, catalog(), options("inprocess"))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ref = read_table(work / "out_inprocess" / "results.fits")
    rows.append({"config": "in-process", "wall": wall, "rate": args.n / wall, "cpu": cpu / n_parts,
                 "share": cpu / wall})
    print(f"in-process: {wall:.1f} s, {args.n / wall:.2f} galaxies/s, {cpu / n_parts:.2f} CPU s per batch "
          f"({s['status']['converged']} converged)", flush=True)

    def compare(name):
        t = read_table(work / f"out_{name}" / "results.fits")
        assert list(t["id"]) == list(ref["id"]) and list(t["status"]) == list(ref["status"])
        worst = 0.0
        for c in ref.colnames:
            if c.endswith("_err") or ref[c].dtype.kind != "f" or c + "_err" not in ref.colnames \
                    or not np.isfinite(ref[c + "_err"]).any():
                continue
            with np.errstate(invalid="ignore", divide="ignore"):
                d = np.abs(t[c] - ref[c]) / ref[c + "_err"]
            if np.isfinite(d).any():
                worst = max(worst, float(np.max(d[np.isfinite(d)])))
        return worst

    for n_workers in args.workers:
        t0 = time.perf_counter()
        cluster = local_cluster(n_workers) if not args.dask_malloc else LocalCluster(
            n_workers=n_workers, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0")
        client = Client(cluster, set_as_default=False)
        t_start = time.perf_counter() - t0
        t0 = time.perf_counter()
        client.run(lambda: __import__("galprof.pipeline.run") and None)  # the workers import torch and galprof
        t_import = time.perf_counter() - t0
        for in_flight in (2, 1) if n_workers == 1 else (2,):
            name = f"{n_workers}w_if{in_flight}"
            t0 = time.perf_counter()
            s = run_pipeline(model, catalog(), options(name),
                             cluster=ClusterOptions(address=cluster.scheduler_address, in_flight=in_flight))
            wall = time.perf_counter() - t0
            c = s["this_run"]["cluster"]
            worst = compare(name)
            rows.append({"config": f"{n_workers} worker(s), {in_flight} in flight per worker", "wall": wall,
                         "rate": args.n / wall, "task": c["task_s_mean"], "write": c["write_s_mean"],
                         "cpu": c["task_cpu_s_mean"], "share": c["task_cpu_s_mean"] / c["task_s_mean"],
                         "per_part": wall / c["partitions"], "start": t_start, "import": t_import, "worst": worst})
            print(f"{n_workers} worker(s), in_flight {in_flight}: {wall:.1f} s, {args.n / wall:.2f} galaxies/s; "
                  f"task {c['task_s_mean']:.3f} s (read {c['read_s_mean']:.3f}), part write {c['write_s_mean']:.4f} "
                  f"s, wall/partition {wall / c['partitions']:.3f} s; task CPU {c['task_cpu_s_mean']:.3f} s; "
                  f"cluster start {t_start:.1f} s + worker imports {t_import:.1f} s; max |diff|/err vs in-process "
                  f"{worst:.1e}; per worker "
                  f"{json.dumps(c['partitions_per_worker'])}", flush=True)
        if n_workers == 1:
            # Dask's share: a partition's arguments (its catalogue rows and the run's recipe) there and back
            import cloudpickle

            cat = catalog()
            recipe = client.submit(_load_recipe, cloudpickle.dumps(_Recipe("bench", model, options("noop"), "", [],
                                                                           False)), pure=False)
            part = list(range(args.batch_size))
            times = []
            for k in range(args.noop_tasks):
                t0 = time.perf_counter()
                client.submit(_noop, recipe, k, part, cat.subset(part), pure=False).result()
                times.append(time.perf_counter() - t0)
            noop = float(np.median(times[5:]))
            rows.append({"config": "no-op partition round trip", "noop": noop})
            print(f"no-op partition round trip (1 worker, sequential): median {1e3 * noop:.1f} ms", flush=True)
        client.close()
        cluster.close()

    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    ser = next((r for r in rows if r["config"].startswith("1 worker(s), 1 in flight")), None)
    if ser:
        print(f"overhead per partition (1 worker, 1 in flight: wall/partition - task): "
              f"{ser['per_part'] - ser['task']:.3f} s")
    print("\n| configuration | wall (s) | galaxies / s | task (s) | CPU s / batch | CPU share | wall / partition (s) "
          "| max diff / err |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "wall" in r:
            print(f"| {r['config']} | {r['wall']:.1f} | {r['rate']:.2f} | {r.get('task', float('nan')):.3f} | "
                  f"{r['cpu']:.2f} | {r['share']:.2f} | {r.get('per_part', float('nan')):.3f} | "
                  f"{r.get('worst', 0.0):.1e} |")


if __name__ == "__main__":
    main()
