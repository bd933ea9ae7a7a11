"""Accuracy of galprof's renderer against GalSim, as a table.

For Sérsic galaxies over re in {0.5, 1, 2, 5} px, n in {0.5, 1, 2, 4, 6}, q in {0.2, 0.5, 1},
three position angles and centres at 0, 0.25 and 0.5 px from a pixel centre (40 x 40 stamps),
prints the largest and the median of sum|galprof - GalSim| / flux by re, without PSF (GalSim's
real-space pixel integration) and with a Moffat PSF (beta 4.5, FWHM 3.5 px; GalSim's FFT drawing
of galaxy x Moffat x pixel) given to galprof as a star-like or as an optical PSF image.

    python benchmarks/render_accuracy.py [--options "core_sampling=4"]
"""

from __future__ import annotations

import argparse
import itertools
import sys

import numpy as np
import torch

import galprof


def main(argv=None) -> int:
    import galsim

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--options", default="")
    args = ap.parse_args(argv)
    opts = galprof.RenderOptions(**eval(f"dict({args.options})")) if args.options else None
    real = galsim.GSParams(realspace_relerr=1e-7, realspace_abserr=1e-10, xvalue_accuracy=1e-8, kvalue_accuracy=1e-8)
    fft = galsim.GSParams(folding_threshold=1e-4, maxk_threshold=1e-5, kvalue_accuracy=1e-8, xvalue_accuracy=1e-8,
                          maximum_fft_size=8192)
    moffat = galsim.Moffat(beta=4.5, fwhm=3.5, gsparams=fft)
    psfs = {"star": galsim.Convolve(moffat, galsim.Pixel(1.0), gsparams=fft).drawImage(
                nx=41, ny=41, scale=1.0, method="no_pixel").array,
            "optical": moffat.drawImage(nx=41, ny=41, scale=1.0, method="no_pixel").array}
    cases = [(re, n, q, d, (17.0, 63.0, -40.0)[i % 3]) for i, (re, n, q, d) in enumerate(
        itertools.product([0.5, 1.0, 2.0, 5.0], [0.5, 1.0, 2.0, 4.0, 6.0], [0.2, 0.5, 1.0], [0.0, 0.25, 0.5]))]
    model = galprof.load_model({"components": {"g": {"profile": "sersic", "x0": 1.0, "y0": 1.0, "mag": 0.0,
                                                     "re": 1.0, "n": 1.0, "q": 1.0, "pa": 0.0}}})
    cols = np.array([(20 + d, 21 + d, -7.5, re, n, q, pa) for re, n, q, d, pa in cases]).T
    values = {f"g.{k}": torch.as_tensor(v) for k, v in zip(["x0", "y0", "mag", "re", "n", "q", "pa"], cols)}
    values["g.c0"] = torch.zeros(len(cases), dtype=torch.float64)
    errors = {}
    for setup in ("none", "star", "optical"):
        psf = None if setup == "none" else psfs[setup]
        r = galprof.Renderer(model, [(40, 40)] * len(cases), psf, psf_kind=setup if psf is not None else "star",
                             options=opts)
        ours = r(values).numpy()
        for img, (re, n, q, d, pa) in zip(ours, cases):
            g = galsim.Sersic(n, half_light_radius=re * np.sqrt(q), flux=1000.0,
                              gsparams=real if psf is None else fft).shear(q=q, beta=(pa + 90) * galsim.degrees)
            im = galsim.ImageD(40, 40, scale=1.0)
            if psf is None:
                g.drawImage(image=im, center=galsim.PositionD(20 + d, 21 + d), method="real_space")
            else:
                galsim.Convolve(g, moffat, gsparams=fft).drawImage(image=im, center=galsim.PositionD(20 + d, 21 + d))
            errors.setdefault((setup, re), []).append(np.abs(img - im.array).sum() / 1000.0)
    print(f"# sum|galprof - GalSim| / flux, {len(cases) // 4} galaxies per row (GalSim {galsim.__version__})")
    print(f"{'PSF':>8} {'re/px':>6} {'median':>10} {'max':>10}")
    for (setup, re), e in errors.items():
        print(f"{setup:>8} {re:>6} {np.median(e):>10.2e} {np.max(e):>10.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
