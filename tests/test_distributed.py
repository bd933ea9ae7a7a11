"""`galprof fit` on a Dask cluster (galprof.pipeline.distributed): the table of a 2-worker local
cluster is the in-process run's; a worker killed (SIGKILL) in the middle of a batch and a batch
whose task raises are redone, every galaxy ending in exactly one part; a batch failing for good
stops the run with its parts kept; runs resume across in-process and cluster runs.

The reference is the in-process pipeline on the same simulated survey (tests/test_pipeline.py's
Gaussian galaxies, themselves checked there against `galprof.fit` and the truth). The cluster's
workers are separate processes on the loopback interface.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table
from test_pipeline import fit_args, write_survey

import galprof
from galprof.catalog import Catalog
from galprof.cli import main
from galprof.io.tables import read_table
from galprof.pipeline import FitOptions, PipelineOptions, run_pipeline
from galprof.pipeline.distributed import ClusterError, ClusterOptions, local_cluster, worker_device

pytest.importorskip("distributed")

N_GOOD = 12  # + 1 row whose image is missing: 13 rows, 5 batches of 3


@pytest.fixture(scope="module")
def cluster():
    import dask
    from distributed import Client

    # a batch may kill one worker and be rescheduled, not two (Dask's default is 3)
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}), local_cluster(2) as c, \
            Client(c, set_as_default=False) as client:
        client.wait_for_workers(2, timeout=120)
        yield c


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """The survey, its catalogue (with one unreadable galaxy) and the in-process run's output."""
    folder = tmp_path_factory.mktemp("dask_survey")
    write_survey(folder, N_GOOD)
    cat = Table.read(folder / "cat.csv", format="ascii.csv")
    cat.add_row({**{c: cat[1][c] for c in cat.colnames}, "id": "gone", "image": "gone.fits"})
    cat.write(folder / "cat.csv", format="ascii.csv", overwrite=True)
    ref = folder / "ref"
    assert main(fit_args(folder, ref, "--save-images")) == 0
    return folder, ref


def assert_same_table(res: Table, ref: Table) -> None:
    """Same ids in the same order, same statuses, flags and messages; values equal to the rounding
    of another process (threads, memory layout), which the fit's convergence test can leave as
    differences far below the errors: fitted values within 1e-6 of their errors, other numbers
    within 1e-6 relative (in practice most are bit-identical)."""
    assert list(res["id"]) == list(ref["id"])
    assert res.colnames == ref.colnames
    for c in ref.colnames:
        if ref[c].dtype.kind != "f":
            assert list(res[c]) == list(ref[c]), c
        elif c + "_err" in ref.colnames and not c.endswith("_err"):
            tol = 1e-6 * np.where(np.isfinite(ref[c + "_err"]), ref[c + "_err"], 0.0) + 1e-12 * np.abs(ref[c])
            assert np.all((np.abs(res[c] - ref[c]) <= tol) | (np.isnan(res[c]) & np.isnan(ref[c]))), c
        else:
            np.testing.assert_allclose(res[c], ref[c], rtol=1e-6, atol=0, equal_nan=True, err_msg=c)


def part_ids(out: Path) -> list:
    return [i for p in sorted((out / "parts").glob("part-*.fits")) for i in read_table(p)["id"]]


def test_two_worker_cluster_gives_the_in_process_table(survey, cluster, tmp_path, monkeypatch):
    folder, ref_out = survey
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)  # --out relative to a folder that is not the workers' working directory
    assert main(fit_args(folder, Path("out"), "--save-images", "--cluster", cluster.scheduler_address)) == 0
    ref, res = read_table(ref_out / "results.fits"), read_table(out / "results.fits")
    assert_same_table(res, ref)
    assert list(res["status"]).count("converged") == N_GOOD and res["status"][-1] == "bad_input"
    assert "Dask cluster" in res.meta["DEVICE"] and "cpu" in res.meta["DEVICE"]
    assert sorted(part_ids(out)) == sorted(ref["id"])  # each id in exactly one part
    summary = json.loads((out / "summary.json").read_text())
    run = summary["this_run"]
    assert run["galaxies"] == N_GOOD + 1 and run["cluster"]["partitions"] == 5
    assert len(run["cluster"]["partitions_per_worker"]) == 2  # both workers fitted
    assert "MALLOC_TRIM_THRESHOLD_" not in (out / "galprof.log").read_text()  # no slow-worker warning
    # image blocks written by the workers: those of the in-process run
    from astropy.io import fits

    for gid in ("g00", "g11"):
        with fits.open(out / "images" / f"{gid}.fits") as a, fits.open(ref_out / "images" / f"{gid}.fits") as b:
            np.testing.assert_allclose(a["MODEL"].data, b["MODEL"].data, rtol=1e-6, atol=1e-9 * b["MODEL"].data.max())
            assert a[0].header["CHI2"] == pytest.approx(b[0].header["CHI2"], rel=1e-6)
    assert not (out / "images" / "gone.fits").exists()


def test_killed_worker_and_failed_task_are_redone(survey, cluster, tmp_path):
    """Batch 1 stalls on its worker until the test kills that worker process with SIGKILL; batch 2
    raises once. Both are fitted again (by the scheduler and by Dask's retries): the table is
    complete, each id in exactly one part, and equal to the in-process run's."""
    from distributed import Client

    folder, ref_out = survey
    signals = tmp_path / "signals"
    signals.mkdir()

    def sabotage(stamps, table, result):  # runs on the workers, inside the batch's task
        ids = [s.id for s in stamps]
        if "g04" in ids and not (signals / "killed").exists():
            (signals / "busy.tmp").write_text(str(os.getpid()))
            os.replace(signals / "busy.tmp", signals / "busy")
            time.sleep(300)  # the test kills this process here
        if "g07" in ids and not (signals / "raised").exists():
            (signals / "raised").write_text("")
            raise OSError("simulated transient failure")
        return {}

    model = galprof.load_model(folder / "model.yaml")
    options = PipelineOptions(out=tmp_path / "out", batch_size=3, progress=False,
                              fit=FitOptions(jacobian="finite-difference"))
    outcome = {}

    def go():
        try:
            outcome["summary"] = run_pipeline(model, Catalog(folder / "cat.csv", model), options, hooks=[sabotage],
                                              cluster=ClusterOptions(address=cluster.scheduler_address, retries=2))
        except BaseException as exc:  # reported below
            outcome["error"] = exc

    with Client(cluster.scheduler_address, set_as_default=False) as client:
        pids = set(client.run(os.getpid).values())
        thread = threading.Thread(target=go)
        thread.start()
        deadline = time.time() + 240
        while not (signals / "busy").exists() and thread.is_alive() and time.time() < deadline:
            time.sleep(0.05)
        assert (signals / "busy").exists(), outcome
        pid = int((signals / "busy").read_text())
        assert pid in pids  # a worker process of the cluster
        (signals / "killed").write_text("")
        os.kill(pid, signal.SIGKILL)
        thread.join(timeout=300)
        assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert (signals / "raised").exists()
    ref = read_table(ref_out / "results.fits")
    res = read_table(tmp_path / "out" / "results.fits")
    assert_same_table(res, ref)
    ids = part_ids(tmp_path / "out")
    assert sorted(ids) == sorted(ref["id"])  # every id exactly once
    cl = outcome["summary"]["this_run"]["cluster"]
    assert cl["partitions"] == 5 and sum(cl["partitions_per_worker"].values()) == 5


def test_batch_failing_for_good_stops_the_run_and_it_resumes_in_process(survey, cluster, tmp_path):
    folder, ref_out = survey

    def broken(stamps, table, result):
        if "g07" in [s.id for s in stamps]:
            raise OSError("disk on fire")
        return {}

    # the cluster given by a scheduler file, as `dask scheduler --scheduler-file` writes on HPC systems
    (tmp_path / "scheduler.json").write_text(json.dumps({"type": "Scheduler", "address": cluster.scheduler_address}))
    model = galprof.load_model(folder / "model.yaml")
    options = PipelineOptions(out=tmp_path / "out", batch_size=3, progress=False,
                              fit=FitOptions(jacobian="finite-difference"))
    with pytest.raises(ClusterError, match=r"batch 2 \(catalogue rows 6-8, ids g06..g08\).*OSError: disk on fire"):
        run_pipeline(model, Catalog(folder / "cat.csv", model), options, hooks=[broken],
                     cluster=ClusterOptions(address=str(tmp_path / "scheduler.json"), retries=1, in_flight=1))
    done = set(part_ids(tmp_path / "out"))
    assert not done & {"g06", "g07", "g08"} and not (tmp_path / "out" / "results.fits").exists()
    # the same run in-process resumes: fits what is missing only
    summary = run_pipeline(model, Catalog(folder / "cat.csv", model), options)
    assert summary["this_run"]["galaxies"] == N_GOOD + 1 - len(done)
    assert_same_table(read_table(tmp_path / "out" / "results.fits"), read_table(ref_out / "results.fits"))


def test_local_cluster_resumes_an_in_process_run(survey, tmp_path):
    """`--workers 1` starts its own cluster; it fits only the rows an in-process run on the first
    half of the catalogue left (the catalogue grew)."""
    folder, ref_out = survey
    Table.read(folder / "cat.csv", format="ascii.csv")[:6].write(folder / "half.csv", format="ascii.csv",
                                                                  overwrite=True)
    out = tmp_path / "out"
    assert main(fit_args(folder, out, catalog="half.csv")) == 0
    assert main(fit_args(folder, out, "--workers", "1")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["this_run"]["galaxies"] == N_GOOD + 1 - 6
    assert summary["this_run"]["cluster"]["address"] == "local"
    assert_same_table(read_table(out / "results.fits"), read_table(ref_out / "results.fits"))
    assert sorted(part_ids(out)) == sorted(read_table(ref_out / "results.fits")["id"])


def test_cluster_options_are_checked(survey, tmp_path, capsys):
    folder, _ = survey
    assert main(fit_args(folder, tmp_path / "o", "--workers", "0")) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err
    assert main(fit_args(folder, tmp_path / "o", "--workers", "2", "--cluster", "tcp://127.0.0.1:1")) == 2
    assert "not both" in capsys.readouterr().err
    # nothing listens on port 1: a clear error, no table
    opts = ClusterOptions(address="tcp://127.0.0.1:1", connect_timeout=2)
    model = galprof.load_model(folder / "model.yaml")
    with pytest.raises(ClusterError, match="cannot connect to the Dask scheduler"):
        run_pipeline(model, Catalog(folder / "cat.csv", model), PipelineOptions(out=tmp_path / "o2", progress=False),
                     cluster=opts)


def test_worker_device():
    assert worker_device("cpu", assign_gpus=True, worker_name=3) == "cpu"
    assert worker_device("cuda:1", assign_gpus=True, worker_name=0) == "cuda:1"
    assert worker_device("cuda", assign_gpus=False, worker_name=1) == "cuda"  # the worker's visible GPU


def test_batch_that_kills_its_workers_stops_the_run(survey, cluster, tmp_path):
    """A batch whose every attempt kills its worker process (a crash, the memory killer): after
    Dask's allowed failures the run stops with a message naming the batch; the rest is kept."""
    folder, _ = survey

    def crash(stamps, table, result):
        if "g10" in [s.id for s in stamps]:
            os.kill(os.getpid(), signal.SIGKILL)
        return {}

    model = galprof.load_model(folder / "model.yaml")
    options = PipelineOptions(out=tmp_path / "out", batch_size=3, progress=False,
                              fit=FitOptions(jacobian="finite-difference"))
    with pytest.raises(ClusterError, match=r"batch 3 \(catalogue rows 9-11, ids g09..g11\).*workers died each time"):
        run_pipeline(model, Catalog(folder / "cat.csv", model), options, hooks=[crash],
                     cluster=ClusterOptions(address=cluster.scheduler_address, in_flight=1))
    assert not {"g09", "g10", "g11"} & set(part_ids(tmp_path / "out"))
