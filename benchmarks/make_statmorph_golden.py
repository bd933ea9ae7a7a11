"""Record statmorph's values on the inputs of tests/test_morphology.py.

    python3 benchmarks/make_statmorph_golden.py [--out tests/data/statmorph_golden]

Writes, into the output folder:

- ``stamps.npz``: 120 simulated stamps (benchmarks/morph_sims.py, seed 20261126; sides of 64 to
  128 pixels; integer ADU as int16), their segmentation maps, target labels and masks;
- ``slice.npz``: statmorph's own test image (statmorph/tests/data/slice.fits, copied from
  /work/shared/data/statmorph/: image, segmentation map, mask);
- ``golden.json``: statmorph's attributes for every stamp, slice.fits and the three SDSS galaxies of
  examples/sdss (with their segmentation maps, labels and sigma images), with the versions of
  statmorph and of the packages it uses, and the settings.

statmorph runs with its default settings on float64 copies of the images: gain 2.0 e-/ADU for the
simulations, gain 1.0 for slice.fits (as in statmorph's own tests), the sigma image as weight map
for the SDSS galaxies. GalSim, photutils and statmorph are needed here only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from morph_sims import GAIN, make_stamps  # noqa: E402

SEED = 20261126
COUNT = 120
SIZES = (64, 80, 96, 112, 128)
SLICE = Path("/work/shared/data/statmorph/slice.fits")

#: statmorph attributes recorded (galprof's columns of the same names, plus orientation and flag)
KEYS = [
    "xc_centroid", "yc_centroid", "ellipticity_centroid", "elongation_centroid", "orientation_centroid",
    "xc_asymmetry", "yc_asymmetry", "ellipticity_asymmetry", "elongation_asymmetry", "orientation_asymmetry",
    "flux_circ", "flux_ellip", "rpetro_circ", "rpetro_ellip", "rmax_circ", "rmax_ellip", "rhalf_circ",
    "rhalf_ellip", "r20", "r50", "r80", "gini", "m20", "gini_m20_bulge", "gini_m20_merger", "sn_per_pixel",
    "concentration", "asymmetry", "smoothness", "rms_asymmetry2", "outer_asymmetry", "shape_asymmetry",
    "sky_mean", "sky_median", "sky_sigma", "multimode", "intensity", "deviation", "flag",
]


def run_statmorph(image, segmap, label, mask=None, gain=None, weightmap=None) -> dict:
    import statmorph

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = statmorph.SourceMorphology(np.asarray(image, dtype=np.float64), np.asarray(segmap, dtype=np.int64),
                                       int(label), mask=mask, gain=gain, weightmap=weightmap)
    return {k: float(m[k]) for k in KEYS}


def main(argv=None) -> int:
    import astropy
    import galsim
    import photutils
    import scipy
    import skimage
    import statmorph
    from astropy.io import fits

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "tests" / "data" / "statmorph_golden"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    stamps = make_stamps(COUNT, seed=SEED, sizes=SIZES)
    arrays = {"labels": np.array([s[2] for s in stamps], dtype=np.int16)}
    for i, (img, seg, _, mask, _) in enumerate(stamps):
        arrays[f"image_{i:03d}"] = img
        arrays[f"segmap_{i:03d}"] = seg
        if mask is not None:
            arrays[f"mask_{i:03d}"] = mask
    np.savez_compressed(out / "stamps.npz", **arrays)
    sims = [run_statmorph(img, seg, lab, mask=mask, gain=GAIN) for img, seg, lab, mask, _ in stamps]

    with fits.open(SLICE) as h:
        sl_image, sl_seg, sl_mask = (np.asarray(h[k].data) for k in range(3))
    np.savez_compressed(out / "slice.npz", image=sl_image.astype(np.float32), segmap=sl_seg.astype(np.int16),
                        mask=sl_mask.astype(bool))
    slice_values = run_statmorph(sl_image, sl_seg, 1, mask=sl_mask.astype(bool), gain=1.0)

    sdss = {}
    folder = ROOT / "examples" / "sdss"
    from astropy.table import Table

    for row in Table.read(folder / "catalog.csv"):
        image = fits.getdata(folder / row["image"]).astype(np.float64)
        seg = fits.getdata(folder / row["mask"]).astype(np.int64)
        sigma = fits.getdata(folder / row["sigma"]).astype(np.float64)
        sdss[str(row["id"])] = run_statmorph(image, seg, int(row["mask_label"]), weightmap=sigma)

    import inspect

    sig = inspect.signature(statmorph.SourceMorphology.__init__).parameters
    defaults = {name: sig[name].default for name in (
        "cutout_extent", "min_cutout_size", "n_sigma_outlier", "annulus_width", "eta", "petro_fraction_gini",
        "skybox_size", "petro_extent_cas", "petro_fraction_cas", "petro_extent_flux", "boxcar_size_shape_asym")}
    golden = {
        "generated_by": "benchmarks/make_statmorph_golden.py",
        "date": time.strftime("%Y-%m-%d"),
        "versions": {"statmorph": statmorph.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
                     "scikit-image": skimage.__version__, "photutils": photutils.__version__,
                     "astropy": astropy.__version__, "galsim": galsim.__version__},
        "settings": {"simulations": {"seed": SEED, "count": COUNT, "sizes": SIZES, "gain": GAIN},
                     "slice": {"gain": 1.0, "label": 1}, "sdss": {"weightmap": "sigma image"},
                     "statmorph": "defaults; images as float64; invalid values are statmorph's -99"},
        "statmorph_defaults": defaults,
        "keys": KEYS,
        "simulations": sims,
        "slice": slice_values,
        "sdss": sdss,
    }
    (out / "golden.json").write_text(json.dumps(golden, indent=1))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.2f} MB) in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
