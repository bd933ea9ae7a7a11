from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

#: comparison tolerances by dtype, stated once
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow parameter sweeps")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow sweep: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def sersic_model(x0=20.3, y0=19.8, mag=-7.5, re=3.0, n=2.0, q=0.6, pa=30.0, zeropoint=0.0, **extra):
    import galprof

    comp = {"profile": "sersic", "x0": x0, "y0": y0, "mag": mag, "re": re, "n": n, "q": q, "pa": pa}
    comp.update(extra)
    return galprof.load_model({"zeropoint": zeropoint, "components": {"g": comp}})
