"""Model files, parameters, bounds as bijections, ties."""

import math

import numpy as np
import pytest
import torch

import galprof
from galprof import ModelError, ParameterError
from galprof.params import Identity, Interval, LowerBound, UpperBound, make_transform

ISSUE_EXAMPLE = """
zeropoint: 22.5
components:
  bulge: {profile: sersic, x0: 64.5, y0: 64.5, mag: 17.0, re: {value: 5, bounds: [0.3, 60]}, n: 4, q: 0.8, pa: 30}
  disk:  {profile: expdisk, x0: {tie: bulge.x0}, y0: {tie: bulge.y0}, mag: 16.5, rs: 12, q: 0.5, pa: 35}
  sky:   {profile: sky, sky: {value: 0, fixed: true}}
"""


def test_yaml_model_file_and_ties(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text(ISSUE_EXAMPLE)
    model = galprof.load_model(path)
    assert [c.name for c in model.components] == ["bulge", "disk", "sky"]
    assert model.zeropoint == 22.5
    layout = model.layout(3)
    v = layout.values()
    assert torch.equal(v["disk.x0"], v["bulge.x0"])
    assert "disk.x0" not in layout.free and "sky.sky" not in layout.free and "bulge.c0" not in layout.free
    assert "bulge.re" in layout.free and layout.bounds("bulge.re") == (0.3, 60.0)
    # a tie follows its source through the unconstrained vector
    z = layout.initial()
    z[:, layout.free.index("bulge.x0")] += 1.0
    phys = layout.physical(z)
    assert torch.allclose(phys["disk.x0"], torch.full((3,), 65.5, dtype=torch.float64))
    # round trip through the dictionary form
    again = galprof.Model.from_dict(model.to_dict())
    assert again.to_dict() == model.to_dict()


def test_expression_and_callable_ties():
    model = galprof.load_model({"components": {
        "a": {"profile": "sersic", "x0": 10, "y0": 10, "mag": 15, "re": 4, "n": 2},
        "b": {"profile": "sersic", "x0": {"tie": "a.x0 + 1.5"}, "y0": {"tie": "a.y0"},
              "mag": {"tie": "a.mag - 2.5 * log10(2)"},
              "re": {"tie": "sqrt(a.re) * 2"}, "n": 1}}})
    v = model.layout(1).values()
    assert float(v["b.x0"]) == 11.5
    assert float(v["b.mag"]) == pytest.approx(15 - 2.5 * math.log10(2))
    assert float(v["b.re"]) == pytest.approx(4.0)
    tie = galprof.Tie(lambda vals: vals["a.re"] * 3, depends=("a.re",))
    model["b"].params["re"] = galprof.Parameter(tie=tie)
    assert float(model.layout(1).values()["b.re"]) == pytest.approx(12.0)


@pytest.mark.parametrize("bad, match", [
    ({"components": {"a": {"profile": "nope"}}}, "unknown profile"),
    ({"components": {"a": {"profile": "sersic", "x0": 1, "y0": 1, "mag": 1, "re": 1}}}, "'n' needs a value"),
    ({"components": {"a": {"profile": "sersic", "x0": 1, "y0": 1, "mag": 1, "re": 1, "n": 1, "foo": 2}}},
     "no parameter 'foo'"),
    ({"components": {"a": {"profile": "sky", "sky": {"tie": "b.sky"}}}}, "not a parameter"),
    ({"components": {"a": {"profile": "sky", "sky": {"tie": "a.sky"}}}}, "cycle"),
    ({"components": {"a": {"profile": "sky", "sky": {"tie": "__import__('os')"}}}}, "not allowed"),
    ({"components": {"a": {"profile": "sky", "sky": {"value": 1, "bounds": [2]}}}}, "bounds must be"),
    ({"components": {"a": {"profile": "sky", "sky": "high"}}}, "expected a number"),
    ({"components": {}}, "non-empty"),
    ({"zeropoint": "x", "components": {"a": {"profile": "sky"}}}, "zeropoint"),
])
def test_bad_models_raise_clear_errors(bad, match):
    with pytest.raises(ModelError, match=match):
        galprof.load_model(bad)


def test_cycle_through_two_parameters_is_named():
    with pytest.raises(ModelError, match="a.sky -> b.sky -> a.sky|b.sky -> a.sky -> b.sky"):
        galprof.load_model({"components": {"a": {"profile": "sky", "sky": {"tie": "b.sky"}},
                                           "b": {"profile": "sky", "sky": {"tie": "a.sky"}}}})


@pytest.mark.parametrize("bounds, cls", [((1.0, 5.0), Interval), ((0.5, None), LowerBound),
                                         ((None, 3.0), UpperBound), ((None, None), Identity)])
def test_transforms_are_bijections(bounds, cls):
    t = make_transform(bounds)
    assert isinstance(t, cls)
    z = torch.linspace(-30, 30, 121, dtype=torch.float64)
    x = t.forward(z)
    lo, hi = bounds
    if lo is not None:
        assert torch.all(x > lo)
    if hi is not None:
        assert torch.all(x < hi)
    zz = torch.linspace(-8, 8, 33, dtype=torch.float64)
    assert torch.allclose(t.inverse(t.forward(zz)), zz, atol=1e-9)
    zz.requires_grad_(True)
    (g,) = torch.autograd.grad(t.forward(zz).sum(), zz)
    assert torch.allclose(t.derivative(zz.detach()), g)


def test_per_galaxy_values_and_bounds_check():
    model = galprof.load_model({"components": {"g": {"profile": "sersic", "x0": 5, "y0": 5, "mag": 10,
                                                     "re": {"value": 2.0, "bounds": [0.5, 10]}, "n": 1, "q": 0.7}}})
    layout = model.layout(3)
    layout.set_values("g.re", [1.0, 20.0, 3.0])
    assert layout.in_bounds().tolist() == [True, False, True]
    model["g"].params["n"] = galprof.Parameter(value=np.ones(2))
    with pytest.raises(ParameterError, match="one value per galaxy"):
        model.layout(3)
    with pytest.raises(ParameterError, match="upper bound"):
        make_transform((3.0, 1.0))


def test_subset_layout():
    model = galprof.load_model({"components": {"g": {"profile": "sersic", "x0": 5, "y0": 5, "mag": 10,
                                                     "re": 2, "n": 1}}})
    layout = model.layout(4)
    layout.set_values("g.re", [1.0, 2.0, 3.0, 4.0])
    sub = layout.subset(torch.tensor([1, 3]))
    assert sub.batch_size == 2
    assert sub.values()["g.re"].tolist() == [2.0, 4.0]
