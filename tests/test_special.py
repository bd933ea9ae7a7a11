"""b_n and other special functions against scipy (an independent implementation)."""

import numpy as np
import pytest
import torch
from scipy.special import gamma, gammaincinv

from galprof.special import boxy_area_factor, flux_to_mag, gauss_legendre, mag_to_flux, sersic_bn


def test_bn_matches_scipy_to_1e5_over_documented_range():
    n = np.geomspace(0.3, 10.0, 4001)
    ref = gammaincinv(2 * n, 0.5)
    got = sersic_bn(torch.as_tensor(n, dtype=torch.float64)).numpy()
    assert np.max(np.abs(got / ref - 1)) < 1e-5
    # and far better in practice (the documented accuracy)
    assert np.max(np.abs(got / ref - 1)) < 1e-12


def test_bn_beats_the_series_approximation_at_small_n():
    n = 0.5
    series = 2 * n - 1 / 3 + 4 / (405 * n) + 46 / (25515 * n**2) + 131 / (1148175 * n**3) - 2194697 / (
        30690717750 * n**4)
    ref = gammaincinv(1.0, 0.5)
    assert abs(series / ref - 1) > 3e-4  # the classical series is this far off...
    assert abs(sersic_bn(torch.tensor(n, dtype=torch.float64)).item() / ref - 1) < 1e-12


def test_bn_float32():
    n = np.geomspace(0.3, 10.0, 501)
    got = sersic_bn(torch.as_tensor(n, dtype=torch.float32)).double().numpy()
    assert np.max(np.abs(got / gammaincinv(2 * n, 0.5) - 1)) < 1e-5


def test_bn_is_smooth_and_its_derivative_is_right():
    """Autodiff derivative against a central difference of scipy's b_n."""
    n = torch.tensor(np.geomspace(0.3, 10.0, 97), dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(sersic_bn(n).sum(), n)
    h = 1e-6
    nn = n.detach().numpy()
    ref = (gammaincinv(2 * (nn + h), 0.5) - gammaincinv(2 * (nn - h), 0.5)) / (2 * h)
    assert np.max(np.abs(grad.numpy() / ref - 1)) < 1e-6
    # no kinks where the approximation switches (n = 20)
    n2 = torch.tensor([19.999, 20.0, 20.001], dtype=torch.float64, requires_grad=True)
    (g2,) = torch.autograd.grad(sersic_bn(n2).sum(), n2)
    assert np.allclose(g2.numpy(), 2.0, atol=1e-3)


@pytest.mark.parametrize("c0", [-0.8, -0.3, 0.0, 0.5, 1.5])
def test_boxy_area_factor_against_closed_form(c0):
    C = c0 + 2
    ref = 4 * gamma(1 + 1 / C) ** 2 / gamma(1 + 2 / C) / np.pi
    assert boxy_area_factor(torch.tensor(c0, dtype=torch.float64)).item() == pytest.approx(ref, rel=1e-12)


def test_gauss_legendre_integrates_polynomials():
    t, w = gauss_legendre(5, dtype=torch.float64)
    for k in range(10):
        assert float((w * t**k).sum()) == pytest.approx(1 / (k + 1), rel=1e-13)


def test_magnitudes_round_trip():
    assert mag_to_flux(22.5, 22.5) == pytest.approx(1.0)
    assert mag_to_flux(17.5, 22.5) == pytest.approx(100.0)
    assert flux_to_mag(100.0, 22.5) == pytest.approx(17.5)
