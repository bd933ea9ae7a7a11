"""Render throughput and peak memory of galprof's forward model.

For B = 1, 64, 512 stamps of 128 x 128 px with a 41 x 41 star-like PSF, in float32 and
float64, prints galaxies/s and the peak memory of the process that rendered them (each
configuration runs in a fresh subprocess so that peaks do not mix). On CUDA the peak is
torch's own allocator peak.

    python benchmarks/render_throughput.py [--device cpu|cuda] [--repeat 3] [--options "core_sampling=8"]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def _one(batch: int, dtype_name: str, device: str, repeat: int, options: str) -> dict:
    import numpy as np
    import torch

    import galprof

    dtype = getattr(torch, dtype_name)
    rng = np.random.default_rng(1)
    model = galprof.load_model({
        "zeropoint": 22.5,
        "components": {
            "bulge": {"profile": "sersic", "x0": 64.5, "y0": 64.5, "mag": 17.0, "re": 5.0, "n": 4.0,
                      "q": 0.8, "pa": 30.0},
            "sky": {"profile": "sky", "sky": 0.0},
        },
    })
    yy, xx = np.mgrid[-20:21, -20:21]
    psf = np.exp(-(xx ** 2 + yy ** 2) / (2 * 1.5 ** 2))
    opts = galprof.RenderOptions(**eval(f"dict({options})")) if options else None
    renderer = galprof.Renderer(model, [(128, 128)] * batch, psf, dtype=dtype, device=device, options=opts)
    values = renderer.values()
    values["bulge.x0"] = torch.as_tensor(64.5 + rng.uniform(-2, 2, batch), dtype=dtype, device=device)
    values["bulge.re"] = torch.as_tensor(rng.uniform(1.5, 15, batch), dtype=dtype, device=device)
    values["bulge.n"] = torch.as_tensor(rng.uniform(0.5, 6, batch), dtype=dtype, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        renderer(values, check=False)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeat):
            renderer(values, check=False)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / repeat
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"batch": batch, "dtype": dtype_name, "seconds": dt, "galaxies_per_s": batch / dt, "peak_mb": peak_mb}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batches", default="1,64,512")
    ap.add_argument("--options", default="", help="RenderOptions overrides, e.g. 'core_sampling=8'")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        b, dt = args.one.split(":")
        print(json.dumps(_one(int(b), dt, args.device, args.repeat, args.options)))
        return 0
    import torch

    print(f"# galprof render benchmark: 128x128 stamps, 41x41 PSF, Sersic + sky; device={args.device}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'B':>5} {'dtype':>8} {'s/batch':>9} {'gal/s':>9} {'peak MB':>9}")
    for b in [int(v) for v in args.batches.split(",")]:
        for dt in ("float32", "float64"):
            out = subprocess.run([sys.executable, __file__, "--one", f"{b}:{dt}", "--device", args.device,
                                  "--repeat", str(args.repeat), "--options", args.options],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{r['batch']:>5} {r['dtype']:>8} {r['seconds']:>9.3f} {r['galaxies_per_s']:>9.1f} "
                  f"{r['peak_mb']:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
