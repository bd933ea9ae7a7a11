"""Make the pyimfit model images of tests/data/imfit_functions_golden.npz.

One small IMFIT configuration per function galprof reads (Sersic, Sersic_GenEllipse, Exponential,
Exponential_GenEllipse, Gaussian, Moffat, FerrersBar2D, ModifiedKing, FlatSky, TiltedSkyPlane,
PointSource), each rendered by pyimfit (IMFIT's own code: ``Imfit(model).getModelImage(shape)``,
default pixel subsampling, no PSF except for PointSource, which needs one: a circular Gaussian of
sigma 1.5 px, 25 x 25, normalised). tests/test_imfit.py renders the same configurations through
``galprof.io.imfit.read_imfit_config`` and compares the images, which checks every parameter
conversion (ell, PA, I_e / I_0 / I_tot -> mag, sigma -> FWHM, n -> Ferrer alpha, the TiltedSkyPlane
level) against IMFIT itself. The configurations, the PSF, the images and the versions are stored.

    python benchmarks/make_imfit_functions_golden.py [--out tests/data/imfit_functions_golden.npz]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (64, 72)  # rows, columns

CONFIGS = {
    "Sersic": "X0 36.3\nY0 31.6\nFUNCTION Sersic\nPA 30\nell 0.4\nn 2.5\nI_e 10\nr_e 6\n",
    "Sersic_GenEllipse": "X0 36.3\nY0 31.6\nFUNCTION Sersic_GenEllipse\nPA -20\nell 0.5\nc0 0.8\nn 1.2\nI_e 8\n"
                         "r_e 7\n",
    "Exponential": "X0 35.8\nY0 32.4\nFUNCTION Exponential\nPA 75\nell 0.6\nI_0 40\nh 5\n",
    "Exponential_GenEllipse": "X0 35.8\nY0 32.4\nFUNCTION Exponential_GenEllipse\nPA 10\nell 0.3\nc0 -0.5\n"
                              "I_0 30\nh 6\n",
    "Gaussian": "X0 36.1\nY0 31.9\nFUNCTION Gaussian\nPA 120\nell 0.3\nI_0 50\nsigma 4\n",
    "Moffat": "X0 36.1\nY0 31.9\nFUNCTION Moffat\nPA -45\nell 0.2\nI_0 60\nfwhm 5\nbeta 2.5\n",
    "FerrersBar2D": "X0 36.4\nY0 32.2\nFUNCTION FerrersBar2D\nPA 60\nell 0.55\nc0 0\nn 2\nI_0 20\na_bar 18\n",
    "ModifiedKing": "X0 36.4\nY0 32.2\nFUNCTION ModifiedKing\nPA 15\nell 0.25\nI_0 30\nr_c 3\nr_t 20\n"
                    "alpha 2\n",
    "FlatSky": "X0 36\nY0 32\nFUNCTION FlatSky\nI_sky 3.5\n",
    "TiltedSkyPlane": "X0 20\nY0 40\nFUNCTION TiltedSkyPlane\nI_0 2.0\nm_x 0.03\nm_y -0.02\n",
    "PointSource": "X0 36.25\nY0 31.75\nFUNCTION PointSource\nI_tot 1000\n",
}


def gaussian_psf(size=25, sigma=1.5):
    y, x = np.mgrid[0:size, 0:size] - size // 2
    p = np.exp(-0.5 * (x * x + y * y) / sigma**2)
    return p / p.sum()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "data" / "imfit_functions_golden.npz"))
    args = ap.parse_args(argv)
    import pyimfit

    psf = gaussian_psf()
    images = {}
    for name, text in CONFIGS.items():
        model = pyimfit.parse_config(text.splitlines())
        fitter = pyimfit.Imfit(model, psf=psf if name == "PointSource" else None)
        images[name] = np.asarray(fitter.getModelImage(shape=SHAPE), dtype=np.float64)
        print(f"{name:24s} sum {images[name].sum():12.4f}  max {images[name].max():10.4f}")
    meta = {"pyimfit": pyimfit.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
            "platform": platform.platform(), "shape": SHAPE, "subsampling": True,
            "command": "python benchmarks/make_imfit_functions_golden.py"}
    np.savez_compressed(args.out, configs=json.dumps(CONFIGS), meta=json.dumps(meta), psf=psf,
                        **{f"image_{k}": v for k, v in images.items()})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
