"""Non-parametric morphology against statmorph (golden values) and against independent references
for its kernels (scipy, astropy, analytic areas).

Golden values: tests/data/statmorph_golden/, made by benchmarks/make_statmorph_golden.py (statmorph
0.7.2 with its defaults on the same inputs; versions in golden.json).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from galprof.morphology import MorphFlag, MorphologyOptions, measure_morphology, morphology_hook
from galprof.morphology.geometry import aperture_weights, circle_pixel_overlap, ellipse_pixel_overlap
from galprof.morphology.kernels import (
    SortedRanges,
    brentq,
    connected_component,
    gaussian_filter,
    label_components,
    nelder_mead,
    uniform_filter,
)
from galprof.morphology.measure import COLUMNS

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "statmorph_golden"

#: agreement required with statmorph (absolute; "rel" entries relative)
TOL = {"concentration": 0.02, "asymmetry": 0.005, "smoothness": 0.005, "gini": 0.005, "m20": 0.02,
       "gini_m20_bulge": 0.03, "gini_m20_merger": 0.01, "rms_asymmetry2": 0.005, "outer_asymmetry": 0.005,
       "shape_asymmetry": 0.005, "ellipticity_asymmetry": 0.005, "ellipticity_centroid": 0.005}
REL = {"rpetro_circ": 0.005, "rpetro_ellip": 0.005, "rhalf_circ": 0.005, "rhalf_ellip": 0.005, "r20": 0.005,
       "r50": 0.005, "r80": 0.005, "rmax_circ": 0.005, "rmax_ellip": 0.005, "flux_circ": 0.005,
       "flux_ellip": 0.005, "sn_per_pixel": 0.005, "sky_sigma": 0.005}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many small tensor operations: one thread is faster, and much faster on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def golden():
    return json.loads((GOLDEN / "golden.json").read_text())


def _compare(values: dict[str, np.ndarray], refs: list[dict], label: str, pa_tol: float = 0.01) -> dict[str, float]:
    """Max deviation per statistic; asserts the tolerances. statmorph's -99 must be NaN here."""
    worst = {}
    for key in list(TOL) + list(REL):
        ref = np.array([r[key] for r in refs], dtype=float)
        got = np.asarray(values[key], dtype=float)
        invalid = ref == -99.0
        assert np.array_equal(np.isnan(got), invalid), f"{label} {key}: NaN where statmorph has -99 differ"
        ok = ~invalid
        dev = np.abs(got[ok] - ref[ok])
        if key in REL:
            dev = dev / np.abs(ref[ok])
        worst[key] = float(dev.max()) if dev.size else 0.0
        limit = TOL.get(key, REL.get(key))
        assert worst[key] <= limit, f"{label} {key}: max deviation {worst[key]:.3g} > {limit} (stamp {np.argmax(dev)})"
    # MID statistics (MorphologyOptions(mid=True)): the same steps on the same inputs
    for key in ("multimode", "intensity", "deviation"):
        if key not in values:
            continue
        ref = np.array([r[key] for r in refs], dtype=float)
        got = np.asarray(values[key], dtype=float)
        invalid = ref == -99.0
        assert np.array_equal(np.isnan(got), invalid), f"{label} {key}: NaN where statmorph has -99 differ"
        dev = np.abs(got[~invalid] - ref[~invalid])
        worst[key] = float(dev.max()) if dev.size else 0.0
        assert worst[key] <= 1e-8, f"{label} {key}: max deviation {worst[key]:.3g}"
    # position angles: statmorph's orientation (radians from +x) as a PA, the same modulo 180 degrees,
    # reported in (-90, 90] as fitted position angles are
    for key in ("centroid", "asymmetry"):
        if f"pa_{key}" not in values or f"orientation_{key}" not in refs[0]:
            continue
        ref = np.array([r[f"orientation_{key}"] for r in refs], dtype=float)
        got = np.asarray(values[f"pa_{key}"], dtype=float)
        ok = (ref != -99.0) & np.isfinite(got)
        assert np.all((got[ok] > -90.0) & (got[ok] <= 90.0)), f"{label} pa_{key} outside (-90, 90]"
        dev = np.abs((got[ok] - np.degrees(ref[ok]) + 90.0 + 90.0) % 180.0 - 90.0)
        worst[f"pa_{key}"] = float(dev.max()) if dev.size else 0.0
        assert worst[f"pa_{key}"] <= pa_tol, f"{label} pa_{key}: max deviation {worst[f'pa_{key}']:.3g} deg"
    return worst


def test_statmorph_test_image(golden):
    """statmorph's own test image (slice.fits): every statistic to 1e-8."""
    d = np.load(GOLDEN / "slice.npz")
    t = measure_morphology([d["image"]], [d["segmap"]], [1], [d["mask"]], gain=1.0)
    ref = golden["slice"]
    assert t["morph_flag"][0] == 0
    _compare({k: t[k] for k in t.colnames}, [ref], "slice")
    for key in ("concentration", "asymmetry", "smoothness", "gini", "m20", "rpetro_circ", "rpetro_ellip",
                "rhalf_circ", "shape_asymmetry", "outer_asymmetry", "rms_asymmetry2", "sn_per_pixel"):
        assert t[key][0] == pytest.approx(ref[key], rel=1e-8, abs=1e-10), key
    # positions: galprof's frame has the first pixel centred at 1 (statmorph's at 0)
    assert t["xc_asymmetry"][0] - 1 == pytest.approx(ref["xc_asymmetry"], abs=1e-6)
    assert t["yc_asymmetry"][0] - 1 == pytest.approx(ref["yc_asymmetry"], abs=1e-6)
    # statmorph's orientation: radians from +x; galprof's PA: degrees counter-clockwise from +y
    # (the same ellipse modulo 180 degrees), reported in (-90, 90] as fitted position angles are
    for key in ("centroid", "asymmetry"):
        pa = math.degrees(ref[f"orientation_{key}"]) - 90.0
        assert (t[f"pa_{key}"][0] - pa + 90.0) % 180.0 - 90.0 == pytest.approx(0.0, abs=1e-6)
        assert -90.0 < t[f"pa_{key}"][0] <= 90.0


def test_statmorph_simulations(golden):
    """120 simulated stamps of different sizes in one call: the issue's tolerances on every stamp."""
    d = np.load(GOLDEN / "stamps.npz")
    n = len(d["labels"])
    images = [d[f"image_{i:03d}"].astype(np.float64) for i in range(n)]
    segmaps = [d[f"segmap_{i:03d}"] for i in range(n)]
    masks = [d[f"mask_{i:03d}"] if f"mask_{i:03d}" in d else None for i in range(n)]
    assert len({im.shape for im in images}) > 5 and n >= 100
    t = measure_morphology(images, segmaps, list(d["labels"]), masks, gain=2.0)
    refs = golden["simulations"]
    # statmorph's bad measurements (flag >= 2) are bad here too
    bad = np.array([r["flag"] >= 2 for r in refs])
    from galprof.morphology.flags import BAD

    assert np.array_equal(bad, np.asarray(t["morph_flag"]) & int(BAD) != 0)
    _compare({k: t[k] for k in t.colnames}, refs, "simulations")


def test_mid_statistics(golden, tmp_path):
    """MorphologyOptions(mid=True): multimode, intensity and deviation equal statmorph's on its test
    image, the SDSS examples and the 120 simulated stamps; statmorph's bad flags (now including
    those of its MID steps) are galprof's; Gini/MID segmentations that overlap little are marked."""
    pytest.importorskip("skimage")
    pytest.importorskip("scipy")
    from galprof.morphology.flags import BAD

    opts = MorphologyOptions(mid=True)
    d = np.load(GOLDEN / "slice.npz")
    t = measure_morphology([d["image"]], [d["segmap"]], [1], [d["mask"]], gain=1.0, options=opts)
    _compare({k: t[k] for k in t.colnames}, [golden["slice"]], "slice, mid")
    assert 0 < t["multimode"][0] < 1 and 0 < t["intensity"][0] < 1 and t["deviation"][0] > 0
    d = np.load(GOLDEN / "stamps.npz")
    n = len(d["labels"])
    images = [d[f"image_{i:03d}"].astype(np.float64) for i in range(n)]
    segmaps = [d[f"segmap_{i:03d}"] for i in range(n)]
    masks = [d[f"mask_{i:03d}"] if f"mask_{i:03d}" in d else None for i in range(n)]
    t = measure_morphology(images, segmaps, list(d["labels"]), masks, gain=2.0, options=opts)
    refs = golden["simulations"]
    worst = _compare({k: t[k] for k in t.colnames}, refs, "simulations, mid")
    assert set(worst) >= {"multimode", "intensity", "deviation"}
    flags = np.asarray(t["morph_flag"])
    assert np.array_equal(np.array([r["flag"] >= 2 for r in refs]), flags & int(BAD) != 0)
    seg = flags & int(MorphFlag.MID_SEGMAP) != 0
    assert all(r["flag"] >= 1 for r, m in zip(refs, seg) if m)
    # from the command line (--mid), on the bundled SDSS catalogue
    from galprof.cli import main

    assert main(["morph", "--catalog", str(ROOT / "examples" / "sdss" / "catalog.csv"), "--out", str(tmp_path),
                 "--mid"]) == 0
    from astropy.table import Table

    tc = Table.read(tmp_path / "morphology.fits")
    assert {"multimode", "intensity", "deviation"} <= set(tc.colnames)
    assert {"multimode", "intensity", "deviation"} <= set(Table.read(tmp_path / "morphology.csv").colnames)
    worst = _compare({k: tc[k] for k in tc.colnames}, [golden["sdss"][i] for i in tc["id"]], "sdss, mid")
    assert {"multimode", "intensity", "deviation"} <= set(worst)
    # without mid the columns are absent
    t0 = measure_morphology(images[:2], segmaps[:2], list(d["labels"][:2]), masks[:2], gain=2.0)
    assert "multimode" not in t0.colnames


def test_mid_without_its_dependencies_is_a_clear_error(monkeypatch, tmp_path):
    """Without SciPy/scikit-image, --mid and --morphology-mid stop with exit code 2 and a message
    before any work (no output folder), and the API raises ImportError naming the extra."""
    from galprof.cli import main
    from galprof.morphology import mid

    def missing():
        raise ImportError("the MID statistics need SciPy and scikit-image (pip install 'galprof[mid]'): none")

    monkeypatch.setattr(mid, "require", missing)
    cat = str(ROOT / "examples" / "sdss" / "catalog.csv")
    assert main(["morph", "--catalog", cat, "--out", str(tmp_path / "m"), "--mid"]) == 2
    assert main(["fit", str(ROOT / "examples" / "sersic.yaml"), "--catalog", cat, "--out", str(tmp_path / "f"),
                 "--morphology", "--morphology-mid"]) == 2
    assert not (tmp_path / "m").exists() and not (tmp_path / "f").exists()
    with pytest.raises(ImportError, match="galprof\\[mid\\]"):
        measure_morphology([np.ones((9, 9))], gain=1.0, options=MorphologyOptions(mid=True))


def test_mid_failure_of_one_stamp_is_flagged(monkeypatch):
    """An error in one stamp's MID statistics gives that stamp NaN and the MID flag, not a
    failed batch; the other stamps and statistics are untouched."""
    pytest.importorskip("skimage")
    from galprof.morphology import mid

    d = np.load(GOLDEN / "stamps.npz")
    pick = [0, 19, 33]
    args = ([d[f"image_{i:03d}"].astype(float) for i in pick], [d[f"segmap_{i:03d}"] for i in pick],
            [int(d["labels"][i]) for i in pick])
    ref = measure_morphology(*args, gain=2.0, options=MorphologyOptions(mid=True))
    real, calls = mid.mid_statistics, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise ZeroDivisionError("boom")
        return real(*a, **k)

    monkeypatch.setattr(mid, "mid_statistics", flaky)
    t = measure_morphology(*args, gain=2.0, options=MorphologyOptions(mid=True))
    flags = np.asarray(t["morph_flag"])
    bad = [k for k in range(3) if flags[k] & int(MorphFlag.MID)]
    assert len(bad) == 1 and np.isnan(t["multimode"][bad[0]]) and "MID" in t["morph_message"][bad[0]]
    for k in range(3):
        assert t["concentration"][k] == ref["concentration"][k]
        if k != bad[0]:
            assert t["multimode"][k] == ref["multimode"][k] and flags[k] == ref["morph_flag"][k]


def test_cli_sdss_examples(golden, tmp_path):
    """``galprof morph`` on the bundled SDSS catalogue (segmentation maps, labels, sigma images)."""
    from astropy.table import Table

    from galprof.cli import main

    assert main(["morph", "--catalog", str(ROOT / "examples" / "sdss" / "catalog.csv"), "--out", str(tmp_path)]) == 0
    t = Table.read(tmp_path / "morphology.fits")
    t_csv = Table.read(tmp_path / "morphology.csv", format="ascii.csv")
    assert list(t["id"]) == list(t_csv["id"]) == ["J162123", "J100247", "J092800"]
    refs = [golden["sdss"][i] for i in t["id"]]
    _compare({k: t[k] for k in t.colnames}, refs, "sdss")
    assert np.allclose(t["concentration"], t_csv["concentration"])
    # the same with two worker processes (one stamp per batch: padded canvases differ, hence rounding)
    assert main(["morph", "--catalog", str(ROOT / "examples" / "sdss" / "catalog.csv"), "--out", str(tmp_path / "w"),
                 "--workers", "2", "--batch-size", "1"]) == 0
    tw = Table.read(tmp_path / "w" / "morphology.fits")
    # bad --workers values: a clear error before any image is read
    with pytest.raises(SystemExit) as exc:
        main(["morph", "--catalog", str(ROOT / "examples" / "sdss" / "catalog.csv"), "--out", str(tmp_path / "x"),
              "--workers", "0"])
    assert exc.value.code == 2
    assert main(["morph", "--catalog", "missing.csv", "--out", str(tmp_path / "x"), "--workers", "2",
                 "--device", "meta"]) == 2
    assert list(tw["id"]) == list(t["id"])
    for key in ("concentration", "asymmetry", "smoothness", "gini", "m20", "rpetro_circ"):
        np.testing.assert_allclose(tw[key], t[key], rtol=1e-12, atol=1e-14)



def test_fit_cli_morphology_columns(golden, tmp_path):
    """``galprof fit --morphology``: the fit table of the bundled SDSS catalogue gets statmorph's
    columns, which agree with statmorph on the same inputs (the catalogue's segmentation maps);
    a galaxy whose image cannot be read keeps its row, with NaN statistics and the no-data flag."""
    from astropy.table import Table

    from galprof.cli import main

    sdss = ROOT / "examples" / "sdss"
    cat = Table.read(sdss / "catalog.csv", format="ascii.csv")
    for col in ("image", "sigma", "psf", "mask"):
        cat[col] = [str(sdss / v) for v in cat[col]]
    cat.add_row(cat[0])
    cat["id"][-1] = "MISSING"
    cat["image"] = cat["image"].astype(object)
    cat["image"][-1] = str(tmp_path / "no_such_file.fits")
    cat.write(tmp_path / "cat.csv", format="ascii.csv")
    out = tmp_path / "out"
    argv = ["fit", str(ROOT / "examples" / "sersic.yaml"), "--catalog", str(tmp_path / "cat.csv"), "--out", str(out),
            "--morphology", "--max-iter", "5"]
    try:
        import skimage  # noqa: F401

        argv.append("--morphology-mid")  # the MID statistics too
    except ImportError:
        pass
    assert main(argv) == 0
    t = Table.read(out / "results.fits")
    if "--morphology-mid" in argv:
        assert {"multimode", "intensity", "deviation"} <= set(t.colnames)
    assert list(t["id"]) == ["J162123", "J100247", "J092800", "MISSING"]
    assert {"galaxy_re", "chi2", "morph_flag", "morph_message"} <= set(t.colnames)
    assert set(COLUMNS) <= set(t.colnames)
    refs = [golden["sdss"][i] for i in t["id"][:3]]
    _compare({k: np.asarray(t[k])[:3] for k in t.colnames}, refs, "fit --morphology")
    # positions in the image frame, galprof's convention (statmorph's first pixel is centred at 0)
    for key in ("xc_asymmetry", "yc_centroid"):
        assert np.allclose(np.asarray(t[key])[:3], [r[key] + 1.0 for r in refs], atol=0.01)
    assert np.all(np.isnan([t[k][3] for k in COLUMNS])) and t["morph_flag"][3] & int(MorphFlag.NO_DATA)
    csv = Table.read(out / "results.csv", format="ascii.csv")
    assert np.allclose(csv["concentration"][:3], t["concentration"][:3])

def test_batch_equals_single_stamps():
    """Stamps measured together (padded to a common canvas) equal stamps measured alone."""
    d = np.load(GOLDEN / "stamps.npz")
    pick = [0, 19, 33]
    args = ([d[f"image_{i:03d}"].astype(float) for i in pick], [d[f"segmap_{i:03d}"] for i in pick],
            [int(d["labels"][i]) for i in pick])
    together = measure_morphology(*args, gain=2.0)
    for k, i in enumerate(pick):
        alone = measure_morphology([args[0][k]], [args[1][k]], [args[2][k]], gain=2.0)
        for key in ("concentration", "asymmetry", "smoothness", "gini", "m20", "rpetro_ellip", "rhalf_circ"):
            assert together[key][k] == pytest.approx(alone[key][0], rel=1e-10, abs=1e-12), (i, key)


def test_worker_processes_give_the_same_table(golden):
    """workers=2 (batches measured in two processes) returns the one-process table, in order, and
    still agrees with statmorph; a GPU device with workers is refused."""
    d = np.load(GOLDEN / "stamps.npz")
    pick = [3, 0, 19, 33, 57, 80, 101]
    args = ([d[f"image_{i:03d}"].astype(float) for i in pick], [d[f"segmap_{i:03d}"] for i in pick],
            [int(d["labels"][i]) for i in pick],
            [d[f"mask_{i:03d}"] if f"mask_{i:03d}" in d else None for i in pick])
    one = measure_morphology(*args, gain=2.0, batch_size=2, ids=pick)
    two = measure_morphology(*args, gain=2.0, batch_size=2, ids=pick, workers=2)
    assert list(two["id"]) == pick
    for key in one.colnames:
        if key == "morph_message":
            assert list(one[key]) == list(two[key])
        else:
            np.testing.assert_array_equal(np.asarray(one[key], float), np.asarray(two[key], float), err_msg=key)
    _compare({k: two[k] for k in two.colnames}, [golden["simulations"][i] for i in pick], "workers=2")
    with pytest.raises(ValueError, match="CPU only"):
        measure_morphology(*args, gain=2.0, batch_size=2, workers=2, device="meta")
    with pytest.raises(ValueError, match="at least 1"):
        measure_morphology(*args, gain=2.0, workers=0)


def _measure_in_daemon(args, queue):
    t = measure_morphology(*args, gain=2.0, batch_size=2, workers=2)
    queue.put(np.asarray(t["asymmetry"], float))


def test_workers_in_a_daemonic_process_fall_back_to_one():
    """Inside a daemonic process (a multiprocessing pool's or a Dask worker), which may have no
    children, workers=2 measures in that process instead of failing."""
    import multiprocessing

    d = np.load(GOLDEN / "stamps.npz")
    pick = [0, 19, 33]
    args = ([d[f"image_{i:03d}"].astype(float) for i in pick], [d[f"segmap_{i:03d}"] for i in pick],
            [int(d["labels"][i]) for i in pick])
    ref = np.asarray(measure_morphology(*args, gain=2.0, batch_size=2)["asymmetry"], float)
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure_in_daemon, args=(args, queue), daemon=True)
    proc.start()
    got = queue.get(timeout=120)
    proc.join(timeout=60)
    assert proc.exitcode == 0
    np.testing.assert_array_equal(got, ref)


def test_asymmetry_without_overlapping_usable_pixels_is_bad(cpu_kernels):
    """Where no usable pixel overlaps the aperture, the asymmetry is the bad value 100 on every
    path, not a ratio of rounding noise: the ring pixels that do not overlap got weights of
    +-1e-18 before they were cut to 0 (here the NumPy path gave 0.987, the compiled one 100)."""
    from galprof.morphology.asymmetry import AsymmetryFunction
    from galprof.morphology.asymmetry_cpu import StampAsymmetry

    img = np.array([[0, 0, 0], [2.722, 3.315, 0], [0, 3.096, 0.889], [2.812, 2.575, 4.512]])
    mask = np.array([[1, 1, 1], [0, 0, 1], [1, 0, 0], [0, 0, 0]], bool)
    r, cx, cy = 0.1, 0.12169828862635867, 1.4686250141059998
    assert StampAsymmetry(img, mask, r, float("nan"), kind="shape")(cx, cy) == 100.0
    f = AsymmetryFunction(torch.tensor(img[None]), torch.tensor(mask[None]), torch.tensor([4]), torch.tensor([3]),
                          torch.tensor([r], dtype=torch.float64), kind="shape")
    assert float(f(torch.tensor([0]), torch.tensor([cx], dtype=torch.float64),
                   torch.tensor([cy], dtype=torch.float64))[0]) == 100.0
    # small apertures wholly inside a masked disc: always 100
    yy, xx = np.mgrid[0:24, 0:24]
    mask = np.hypot(xx - 11.5, yy - 11.5) < 6
    image = np.where(mask, 0.0, 1.0 + 0.1 * np.cos(xx) * np.sin(yy))
    rng = np.random.default_rng(11)
    for _ in range(200):
        r = rng.uniform(0.05, 1.0)
        cx, cy = rng.uniform(10.5, 12.5, 2)
        assert StampAsymmetry(image, mask, r, 0.0)(cx, cy) == 100.0, (r, cx, cy)


def test_float32_within_tolerances(golden):
    d = np.load(GOLDEN / "stamps.npz")
    pick = list(range(0, 120, 20))
    t = measure_morphology([d[f"image_{i:03d}"].astype(float) for i in pick], [d[f"segmap_{i:03d}"] for i in pick],
                           [int(d["labels"][i]) for i in pick],
                           [d[f"mask_{i:03d}"] if f"mask_{i:03d}" in d else None for i in pick], gain=2.0,
                           dtype=torch.float32)
    # (position angles of nearly round stamps are less certain in float32)
    _compare({k: t[k] for k in t.colnames}, [golden["simulations"][i] for i in pick], "float32", pa_tol=0.5)


def test_bad_stamps_are_flagged_not_fatal():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:60, 0:60]
    good = 100 * np.exp(-np.hypot(xx - 30, yy - 30) / 4) + rng.normal(0, 1, (60, 60))
    seg = (np.hypot(xx - 30, yy - 30) < 15).astype(int)
    images = [good, np.full((60, 60), np.nan), -good, good, np.ones((2, 2)), good]
    segmaps = [seg, seg, seg, np.zeros((60, 60), int), np.ones((2, 2), int), seg[:30]]
    t = measure_morphology(images, segmaps, [1, 1, 1, None, 1, 1], gain=1.0, ids=list("abcdef"))
    flags = np.asarray(t["morph_flag"])
    assert flags[0] & int(MorphFlag.NO_DATA) == 0 and np.isfinite(t["concentration"][0])
    for i in range(1, 6):
        assert flags[i] & int(MorphFlag.NO_DATA), (i, t["morph_message"][i])
        assert np.isnan(t["asymmetry"][i]) and t["morph_message"][i].startswith("bad")
    assert "shape" in t["morph_message"][5] and "label 0" in t["morph_message"][3]


def test_nonpositive_second_moment_about_the_centroid_is_bad():
    """A one-pixel segment has zero second moments about its centroid: statmorph's covariance
    test (a diagonal element <= 0) makes the measurement bad, about the centroid as about the
    asymmetry centre."""
    rng = np.random.default_rng(3)
    img = rng.normal(0, 1, (50, 50))
    seg = np.zeros((50, 50), int)
    seg[25, 20] = 1
    img[25, 20] = 5.5
    t = measure_morphology([img], [seg], [1], gain=2.0, options=MorphologyOptions(n_sigma_outlier=-1))
    flag = int(t["morph_flag"][0])
    assert flag & int(MorphFlag.NONPOSITIVE) and t["morph_message"][0].startswith("bad")


def test_automatic_segmentation():
    """Without a segmentation map the target at the centre is segmented and its companion masked."""
    galsim = pytest.importorskip("galsim")
    gal = galsim.Sersic(n=1.5, half_light_radius=5).shear(q=0.6, beta=30 * galsim.degrees).withFlux(2e4)
    comp = galsim.Gaussian(sigma=2).withFlux(8e3).shift(42, 0)
    img = galsim.Convolve(gal + comp, galsim.Moffat(beta=3.5, fwhm=2.5)).drawImage(nx=120, ny=120, scale=1).array
    img = img + np.random.default_rng(3).normal(0, 1.0, img.shape)
    from galprof.morphology import DetectOptions, segment_stamps

    seg, label = segment_stamps([img], [None], DetectOptions())[0]
    assert label == 1 and seg[60, 60] == 1 and seg[60, 102] == 2
    auto = measure_morphology([img], gain=1.0)
    given = measure_morphology([img], [seg], [1], gain=1.0)
    assert auto["morph_flag"][0] & int(MorphFlag.NO_DATA) == 0
    for key in ("concentration", "asymmetry", "gini", "m20"):
        assert auto[key][0] == given[key][0]


def test_morphology_hook_columns():
    """The pipeline hook returns one value per row, NaN for stamps without an image, positions
    shifted into the image frame."""
    from types import SimpleNamespace

    d = np.load(GOLDEN / "slice.npz")
    image = d["image"].astype(float)
    stamps = [SimpleNamespace(id=1, image=image, sigma=None, mask=None, offset=(10.0, 20.0)),
              SimpleNamespace(id=2, image=None, sigma=None, mask=None, offset=(0.0, 0.0))]
    cols = morphology_hook(gain=1.0)(stamps, None, None)
    alone = measure_morphology([image], gain=1.0)
    assert cols["concentration"][0] == alone["concentration"][0] and np.isnan(cols["concentration"][1])
    assert cols["xc_asymmetry"][0] == pytest.approx(alone["xc_asymmetry"][0] + 10.0)
    assert cols["morph_flag"][1] & int(MorphFlag.NO_DATA)
    assert "multimode" not in cols
    if importlib.util.find_spec("skimage") is not None:
        cols = morphology_hook(gain=1.0, options=MorphologyOptions(mid=True))(stamps, None, None)
        ref = measure_morphology([image], gain=1.0, options=MorphologyOptions(mid=True))
        assert cols["multimode"][0] == ref["multimode"][0] and np.isnan(cols["deviation"][1])


# --------------------------------------------------------------------------------------------
# kernels against independent references
# --------------------------------------------------------------------------------------------

def test_overlaps_sum_to_exact_areas():
    """Exact pixel overlaps add up to pi r^2 and pi a b (apertures well inside the grid)."""
    y, x = torch.meshgrid(torch.arange(80.0, dtype=torch.float64), torch.arange(90.0, dtype=torch.float64),
                          indexing="ij")
    rng = np.random.default_rng(0)
    for _ in range(20):
        cx, cy, a = rng.uniform(35, 45), rng.uniform(35, 45), rng.uniform(0.3, 30)
        e, th = rng.uniform(1, 4), rng.uniform(-3, 3)
        r = torch.tensor(a, dtype=torch.float64)
        assert float(circle_pixel_overlap(x - cx, y - cy, r).sum()) == pytest.approx(math.pi * a * a, rel=1e-12)
        ell = ellipse_pixel_overlap(x - cx, y - cy, r, e, math.cos(th), math.sin(th))
        assert float(ell.sum()) == pytest.approx(math.pi * a * a / e, rel=1e-12)
        dense = aperture_weights(x - cx, y - cy, r, torch.tensor(e, dtype=torch.float64),
                                 torch.tensor(math.cos(th), dtype=torch.float64),
                                 torch.tensor(math.sin(th), dtype=torch.float64))
        assert torch.allclose(dense, ell, atol=1e-12)
        assert float(ell.min()) >= 0 and float(ell.max()) <= 1


@pytest.mark.parametrize("with_scipy", [True, False])
def test_filters_match_scipy(with_scipy, monkeypatch):
    """The tensor filters (GPUs, no SciPy) and the CPU path through SciPy against scipy.ndimage,
    including boxes wider than a stamp."""
    ndi = pytest.importorskip("scipy.ndimage")
    from galprof.morphology import kernels

    if not with_scipy:
        monkeypatch.setattr(kernels, "_NDIMAGE", [None])
    rng = np.random.default_rng(3)
    b, h, w = 5, 40, 50
    x = rng.normal(size=(b, h, w))
    ny, nx = np.array([40, 33, 20, 7, 40]), np.array([50, 41, 9, 30, 12])
    for i in range(b):
        x[i, ny[i]:, :] = 0
        x[i, :, nx[i]:] = 0
    size, sig = np.array([3, 4, 7, 12, 15]), np.array([0.7, 1.5, 2.2, 3.9, 5.0])
    u = uniform_filter(torch.tensor(x), torch.tensor(size), torch.tensor(ny), torch.tensor(nx)).numpy()
    g = gaussian_filter(torch.tensor(x), torch.tensor(sig)).numpy()
    for i in range(b):
        sub = x[i, :ny[i], :nx[i]]
        np.testing.assert_allclose(u[i, :ny[i], :nx[i]], ndi.uniform_filter(sub, size[i]), atol=1e-13)
        np.testing.assert_allclose(g[i, :ny[i], :nx[i]], ndi.gaussian_filter(sub, sig[i], mode="constant"),
                                   atol=1e-13)


def test_components_match_scipy(monkeypatch):
    ndi = pytest.importorskip("scipy.ndimage")
    from galprof.morphology import kernels
    rng = np.random.default_rng(5)
    fg = rng.random((6, 40, 50)) < 0.45
    lab = label_components(torch.tensor(fg)).numpy()
    for i in range(6):
        ref, _ = ndi.label(fg[i], structure=np.ones((3, 3)))
        # same partition: a one-to-one map between the labels
        pairs = {(a, c) for a, c in zip(ref[fg[i]], lab[i][fg[i]])}
        assert len(pairs) == len({a for a, _ in pairs}) == len({c for _, c in pairs})
        assert np.all(lab[i][~fg[i]] == -1)
    seed = torch.tensor([int(np.flatnonzero(fg[i])[0]) for i in range(5)] + [int(np.flatnonzero(~fg[5])[0])])
    fast = connected_component(torch.tensor(fg), seed).numpy()  # on CPU through scipy.ndimage
    monkeypatch.setattr(kernels, "_NDIMAGE", [None])
    comp = connected_component(torch.tensor(fg), seed).numpy()  # the tensor code (GPUs, no SciPy)
    np.testing.assert_array_equal(fast, comp)
    for i in range(5):
        ref, _ = ndi.label(fg[i], structure=np.ones((3, 3)))
        np.testing.assert_array_equal(comp[i], ref == ref.flat[int(seed[i])])
    assert not comp[5].any()  # a seed outside the foreground


def test_brentq_matches_scipy():
    optimize = pytest.importorskip("scipy.optimize")
    cs = torch.tensor([0.3, 1.0, 2.5, 7.0], dtype=torch.float64)

    def f(i, x):
        return torch.cos(x) - cs[i] * x

    lo, hi = torch.zeros(4, dtype=torch.float64), torch.full((4,), 2.0, dtype=torch.float64)
    idx = torch.arange(4)
    root, ok = brentq(f, lo, hi, f(idx, lo), f(idx, hi), xtol=1e-12)
    assert bool(ok.all())
    for k, c in enumerate(cs.tolist()):
        ref = optimize.brentq(lambda t, c=c: math.cos(t) - c * t, 0, 2, xtol=1e-12)
        assert float(root[k]) == pytest.approx(ref, abs=1e-11)


def test_nelder_mead_follows_scipy_fmin():
    """Same simplex path as scipy's fmin: same minimum and the same number of evaluations."""
    optimize = pytest.importorskip("scipy.optimize")
    starts = torch.tensor([[1.3, -0.7], [-1.2, 1.0], [0.0, 2.0], [3.0, 3.0]], dtype=torch.float64)
    shift = torch.tensor([0.5, -1.0, 2.0, 0.1], dtype=torch.float64)

    def f(i, p):
        x, y = p[:, 0], p[:, 1]
        return (1 - x) ** 2 + 10 * (y - x * x) ** 2 + shift[i] * torch.abs(x - 0.3)

    best, fbest, nit, nfev = nelder_mead(f, starts, xtol=1e-8, ftol=1e-10)
    for k in range(4):
        s = shift[k].item()

        def g(p, s=s):
            return (1 - p[0]) ** 2 + 10 * (p[1] - p[0] ** 2) ** 2 + s * abs(p[0] - 0.3)

        x, fx, it, fe, _ = optimize.fmin(g, starts[k].numpy(), xtol=1e-8, ftol=1e-10, full_output=True, disp=False)
        np.testing.assert_allclose(best[k].numpy(), x, atol=1e-9)
        assert int(nfev[k]) == fe and int(nit[k]) == it


def test_fmin2_follows_scipy_fmin():
    """The CPU path's scalar simplex takes scipy fmin's steps: same minimum, same evaluations."""
    optimize = pytest.importorskip("scipy.optimize")
    from galprof.morphology.asymmetry_cpu import fmin2

    for start, s in (((1.3, -0.7), 0.5), ((-1.2, 1.0), -1.0), ((0.0, 2.0), 2.0), ((3.0, 3.0), 0.1)):
        calls = []

        def g(x, y, s=s, calls=calls):
            calls.append(1)
            return (1 - x) ** 2 + 10 * (y - x * x) ** 2 + s * abs(x - 0.3)

        best, fbest = fmin2(g, start, xtol=1e-8, ftol=1e-10)
        x, fx, it, fe, _ = optimize.fmin(lambda p: g(p[0], p[1]), np.array(start), xtol=1e-8, ftol=1e-10,
                                         full_output=True, disp=False)
        np.testing.assert_allclose(best, x, atol=1e-9)
        assert fbest == pytest.approx(fx, abs=1e-14)
        assert len(calls) == 2 * fe  # each run evaluated as often


@pytest.fixture(params=["numpy", "numba"])
def cpu_kernels(request, monkeypatch):
    """The CPU asymmetry path with its NumPy kernels and with the compiled ones (numba)."""
    from galprof.morphology import asymmetry_jit

    if request.param == "numba" and not asymmetry_jit.COMPILED:
        pytest.skip("numba not installed (or GALPROF_NO_JIT set)")
    monkeypatch.setattr(asymmetry_jit, "ENABLED", request.param == "numba")
    return request.param


def test_compiled_asymmetry_equals_numpy(monkeypatch):
    """The compiled evaluation equals the NumPy one at arbitrary centres (in and off the stamp,
    masked stamps, every kind), and the compiled simplex finds fmin2's minimum."""
    from galprof.morphology import asymmetry_jit
    from galprof.morphology.asymmetry_cpu import StampAsymmetry, fmin2

    if not asymmetry_jit.COMPILED:
        pytest.skip("numba not installed (or GALPROF_NO_JIT set)")

    d = np.load(GOLDEN / "stamps.npz")
    rng = np.random.default_rng(3)
    checked = 0
    for i in (1, 9, 16, 40, 70):
        image = d[f"image_{i:03d}"].astype(float)
        mask = d[f"mask_{i:03d}"] if f"mask_{i:03d}" in d else np.zeros(image.shape, bool)
        image = np.where(mask, 0.0, image)
        ny, nx = image.shape
        for kind, sky in (("cas", 0.01), ("rms", 2.0), ("shape", float("nan"))):
            fun = StampAsymmetry(image, mask, radius=rng.uniform(5, 25), sky=sky, kind=kind)
            pts = [(rng.uniform(-2, nx + 2), rng.uniform(-2, ny + 2)) for _ in range(25)]
            pts += [(nx / 2 + rng.uniform(-3, 3), ny / 2 + rng.uniform(-3, 3)) for _ in range(25)]
            for cx, cy in pts:
                monkeypatch.setattr(asymmetry_jit, "ENABLED", False)
                ref = fun(cx, cy)
                monkeypatch.setattr(asymmetry_jit, "ENABLED", True)
                assert fun(cx, cy) == pytest.approx(ref, rel=1e-12, abs=1e-14), (i, kind, cx, cy)
                checked += 1
        fun = StampAsymmetry(image, mask, radius=12.0, sky=0.01)
        monkeypatch.setattr(asymmetry_jit, "ENABLED", False)
        (x, y), f = fmin2(fun, (nx / 2 + 0.7, ny / 2 - 0.4), xtol=1e-6, ftol=1e-4)
        xj, yj, fj = asymmetry_jit.fmin2_asym(*fun.jit_args(), nx / 2 + 0.7, ny / 2 - 0.4, 1e-6, 1e-4, 400, 400)
        assert (xj, yj) == pytest.approx((x, y), abs=1e-9) and fj == pytest.approx(f, rel=1e-12)
    assert any(m for m in (f"mask_{i:03d}" in d for i in (1, 9, 16)))
    assert checked == 5 * 3 * 50


def test_compiled_radial_sums_equal_tensor_sums(monkeypatch):
    """The compiled exact aperture sums (circles and ellipses) equal the tensor code's, for
    radii inside, across and beyond the stamp, zero, negative and NaN radii, on a subset of
    stamps; and both equal the dense exact weights of geometry.aperture_weights."""
    from galprof.morphology import asymmetry_jit
    from galprof.morphology.radial import RadialProfile

    if not asymmetry_jit.COMPILED:
        pytest.skip("numba not installed (or GALPROF_NO_JIT set)")

    rng = np.random.default_rng(5)
    b, h, w = 4, 37, 45
    img = torch.tensor(rng.normal(size=(b, 2, h, w)))
    inside = torch.ones(b, h, w, dtype=torch.bool)
    inside[1, :, 40:] = False
    img = img * inside[:, None]
    xc = torch.tensor(rng.uniform(10, 30, b))
    yc = torch.tensor(rng.uniform(10, 25, b))
    el = torch.tensor(rng.uniform(1, 3, b))
    th = torch.tensor(rng.uniform(-3, 3, b))
    a = torch.tensor(rng.uniform(0, 40, (3, 7)))
    a[0, 0], a[1, 1], a[2, 2], a[0, 3] = 0.0, -2.0, float("nan"), 60.0
    index = torch.tensor([2, 0, 1])
    for ellipse in (False, True):
        extra = (el, th) if ellipse else ()
        monkeypatch.setattr(asymmetry_jit, "ENABLED", False)
        ref = RadialProfile(img, inside, xc, yc, *extra).sums(a, index)
        monkeypatch.setattr(asymmetry_jit, "ENABLED", True)
        prof = RadialProfile(img, inside, xc, yc, *extra)
        assert prof._compiled
        got = prof.sums(a, index)
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-12, atol=1e-12, equal_nan=True)
        # against dense exact weights (independent of the sorted-ring bookkeeping)
        yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
        k = 1  # stamp 0, radius a[1, 3]
        args = (el[0], torch.cos(th[0]), torch.sin(th[0])) if ellipse else ()
        wts = aperture_weights(xx - xc[0], yy - yc[0], a[1, 3], *args)
        dense = (img[0, 0] * wts * inside[0]).sum()
        assert float(got[k, 0, 3]) == pytest.approx(float(dense), rel=1e-10, abs=1e-10)
    # the compiled elementwise elliptical weights (outer asymmetry) equal aperture_weights
    n = 5000
    dx, dy = torch.tensor(rng.uniform(-30, 30, n)), torch.tensor(rng.uniform(-30, 30, n))
    ax, e = torch.tensor(rng.uniform(-1, 25, n)), torch.tensor(rng.uniform(1, 4, n))
    t = torch.tensor(rng.uniform(-3, 3, n))
    ref = aperture_weights(dx, dy, ax, e, torch.cos(t), torch.sin(t))
    got = np.empty(n)
    asymmetry_jit.ellipse_weights(dx.numpy(), dy.numpy(), ax.numpy(), e.numpy(), torch.cos(t).numpy(),
                                  torch.sin(t).numpy(), got)
    assert 0 < (ref.numpy() % 1 > 0).sum() < n  # partial pixels among the others
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-12, atol=1e-13)


def test_cpu_fast_path_equals_batched_path(cpu_kernels):
    """The CPU asymmetry-centre search (float64; NumPy or compiled kernels) gives the batched
    tensor code's centres and asymmetries, on stamps with and without masked pixels and restarts."""
    d = np.load(GOLDEN / "stamps.npz")
    # every 8th stamp, plus restarts from the brightest pixel (18, 70), centroids used after two
    # drifts (37, 117) and masked pixels (1, 9, 16)
    pick = sorted(set(range(0, 120, 8)) | {1, 9, 16, 18, 37, 70, 117})
    args = ([d[f"image_{i:03d}"].astype(float) for i in pick], [d[f"segmap_{i:03d}"] for i in pick],
            [int(d["labels"][i]) for i in pick], [d[f"mask_{i:03d}"] if f"mask_{i:03d}" in d else None for i in pick])
    assert sum(m is not None for m in args[3]) >= 3
    fast = measure_morphology(*args, gain=2.0)
    slow = measure_morphology(*args, gain=2.0, options=MorphologyOptions(cpu_fast_path=False))
    flags = np.asarray(fast["morph_flag"])
    assert (flags & int(MorphFlag.ASYM_CENTER)).any() and (flags & int(MorphFlag.ASYM_CENTROID)).any()
    assert np.array_equal(fast["morph_flag"], slow["morph_flag"])
    for key in COLUMNS:
        np.testing.assert_allclose(fast[key], slow[key], rtol=1e-10, atol=1e-12, err_msg=key)


def test_sigma_clipping_matches_astropy():
    from astropy.stats import sigma_clip

    rng = np.random.default_rng(7)
    data = [np.concatenate([rng.normal(0, 1, 300), rng.normal(8, 1, n)]) for n in (5, 30, 60)]
    width = max(len(d) for d in data)
    vals = torch.full((3, width), float("inf"), dtype=torch.float64)
    for i, d in enumerate(data):
        vals[i, :len(d)] = torch.tensor(np.sort(d))
    sr = SortedRanges(vals, torch.tensor([len(d) for d in data]))
    lo, hi = sr.clip(lambda lo, hi: sr.stats(lo, hi)[1], 3.0, 10)
    mean, med, std = sr.stats(lo, hi)
    for i, d in enumerate(data):
        kept = sigma_clip(d, sigma=3.0, maxiters=10, masked=False, axis=None)
        assert int(hi[i] - lo[i]) == kept.size
        assert float(mean[i]) == pytest.approx(kept.mean(), rel=1e-12)
        assert float(med[i]) == pytest.approx(np.median(kept), rel=1e-12)
        assert float(std[i]) == pytest.approx(kept.std(), rel=1e-9)


def test_options_are_statmorphs_defaults(golden):
    opts = MorphologyOptions()
    for name, value in golden["statmorph_defaults"].items():
        assert getattr(opts, name) == value, name
