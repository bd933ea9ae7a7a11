"""Detection with sep (galprof.detect's backend) against photutils, on the bundled SDSS stamps.

Same recipe in both (sep called directly, as galprof.detect calls it): mesh background (64 px
meshes, 3 x 3 median filter), the image filtered by SExtractor's default 3 x 3 kernel,
threshold 2 x the background RMS, at least 5 pixels, deblending with 32 levels and contrast
0.005. Prints the time per stamp of each (background + detection + deblending, the median of
``--repeat`` runs; galprof.detect's total, which adds the global sky statistics, beside them)
and the intersection-over-union of the target's segment with the provided segmentation map and
between the two codes.

    OMP_NUM_THREADS=1 python benchmarks/detect_sep_vs_photutils.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

ROOT = Path(__file__).resolve().parents[1]
SDSS = [("J162123.19+322056.4", 2), ("J100247.00+042559.8", 1), ("J092800.99+014011.9", 1)]
KERNEL = np.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])


def with_sep(image):
    import sep

    bkg = sep.Background(image, bw=64, bh=64, fw=3, fh=3)
    objects, seg = sep.extract(image - bkg.back(), 2.0, err=bkg.rms(), minarea=5, deblend_nthresh=32,
                               deblend_cont=0.005, filter_type="conv", segmentation_map=True)
    ny, nx = seg.shape
    return seg, int(seg[ny // 2, nx // 2])


def with_galprof(image):
    from galprof.detect import detect

    det = detect(image)
    return det.segmap, det.target


def with_photutils(image):
    from astropy.convolution import convolve
    from photutils.background import Background2D, MedianBackground
    from photutils.segmentation import deblend_sources, detect_sources

    bkg = Background2D(image, (64, 64), filter_size=(3, 3), bkg_estimator=MedianBackground(), exclude_percentile=100)
    sub = image - bkg.background
    conv = convolve(sub, KERNEL / KERNEL.sum())
    seg = detect_sources(conv, 2.0 * bkg.background_rms, n_pixels=5)
    seg = deblend_sources(conv, seg, n_pixels=5, n_levels=32, contrast=0.005, progress_bar=False)
    data = seg.data
    ny, nx = data.shape
    return data, int(data[ny // 2, nx // 2])


def iou(a, b) -> float:
    return float((a & b).sum() / (a | b).sum())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args(argv)
    print("| galaxy | sep ms | photutils ms | galprof.detect ms | IoU sep vs map | IoU photutils vs map "
          "| IoU sep vs photutils |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, label in SDSS:
        base = ROOT / "examples" / "sdss" / name
        image = np.asarray(fits.getdata(f"{base}_image.fits"), dtype=np.float64)
        given = np.asarray(fits.getdata(f"{base}_mask.fits")) == label
        times = {}
        segs = {}
        for code, fn in (("sep", with_sep), ("photutils", with_photutils), ("galprof", with_galprof)):
            fn(image)  # warm-up
            t = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                seg, target = fn(image)
                t.append(time.perf_counter() - t0)
            times[code] = 1e3 * float(np.median(t))
            segs[code] = seg == target
        print(f"| {name} | {times['sep']:.1f} | {times['photutils']:.1f} | {times['galprof']:.1f} | "
              f"{iou(segs['sep'], given):.3f} | "
              f"{iou(segs['photutils'], given):.3f} | {iou(segs['sep'], segs['photutils']):.3f} |")


if __name__ == "__main__":
    main()
