"""The networks: :class:`InitNet` (a small ResNet: gridded stamp -> single-Sérsic parameters
with a predictive sigma each) and :class:`MaskNet` (a small U-Net: gridded stamp -> target /
other sources / sky per grid pixel), and the parameter transforms between the network's
outputs and galprof's conventions.

Network outputs (:data:`OUTPUTS`), all on the grid (:mod:`galprof.nn.grid`):

``dx, dy``      the target's centre minus the grid centre ``(G + 1) / 2``, grid pixels
``log_re``      ln(re / grid px)
``log_n``       ln(n)
``g1, g2``      ``e (cos 2 PA, sin 2 PA)``, ``e = (1 - q) / (1 + q)`` (no wrap-around in PA,
                and a round galaxy's PA does not matter)
``mag_rel``     ``-2.5 log10(flux_grid / s0)``: flux relative to the stamp's noise scale ``s0``
                (the median sigma of its grid pixels)
``sky_rel``     sky / s0

Each output comes with a mean and a log standard deviation (a Gaussian predictive
distribution); the means are trained on standardised targets (``mean`` and ``scale`` buffers).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["OUTPUTS", "InitNet", "MaskNet", "MASK_LABELS", "encode", "decode", "count_flops"]

OUTPUTS = ("dx", "dy", "log_re", "log_n", "g1", "g2", "mag_rel", "sky_rel")
MASK_LABELS = ("sky", "target", "other")


class _Res(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        return torch.relu(x + self.b2(self.c2(y)))


def _down(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class InitNet(nn.Module):
    """ResNet-style regressor: 3 x 64 x 64 input -> 16 x 32 x 32 (stride-2 stem) -> residual
    stages at 32, 16 and 8 pixels (``widths``) -> 1 x 1 bottleneck to 16 channels, flattened
    (keeping where the light is) -> MLP with the PSF scalar -> means and log-sigmas of the
    :data:`OUTPUTS`. About 17 M multiply-adds and 0.2 M parameters at the defaults."""

    def __init__(self, widths=(16, 32, 64), hidden: int = 128, grid: int = 64, n_scalars: int = 1):
        super().__init__()
        w1, w2, w3 = widths
        self.config = {"widths": list(widths), "hidden": hidden, "grid": grid, "n_scalars": n_scalars}
        self.features = nn.Sequential(_down(3, w1), _Res(w1), _down(w1, w2), _Res(w2), _down(w2, w3), _Res(w3),
                                      nn.Conv2d(w3, 16, 1), nn.ReLU())
        side = grid // 8
        self.head = nn.Sequential(nn.Linear(16 * side * side + n_scalars, hidden), nn.ReLU(),
                                  nn.Linear(hidden, 2 * len(OUTPUTS)))
        k = len(OUTPUTS)
        self.register_buffer("mean", torch.zeros(k))
        self.register_buffer("scale", torch.ones(k))

    def forward(self, x, scalars):
        """``(mu, log_sigma)``, each (B, 8), in standardised units."""
        h = self.features(x).flatten(1)
        out = self.head(torch.cat([h, scalars], dim=1))
        k = len(OUTPUTS)
        return out[:, :k], out[:, k:].clamp(-7.0, 3.0)

    def physical(self, mu, log_sigma):
        """Standardised outputs -> transformed parameters and their sigmas."""
        return mu * self.scale + self.mean, torch.exp(log_sigma) * self.scale


class MaskNet(nn.Module):
    """U-Net-style segmenter: 3 x 64 x 64 -> logits of :data:`MASK_LABELS` per grid pixel
    (encoder 8/16/32 channels at 64/32/16 px, decoder with skip connections)."""

    def __init__(self, widths=(8, 16, 32)):
        super().__init__()
        w1, w2, w3 = widths
        self.config = {"widths": list(widths)}

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.e1, self.e2, self.e3 = block(3, w1), block(w1, w2), block(w2, w3)
        self.u2 = nn.ConvTranspose2d(w3, w2, 2, stride=2)
        self.d2 = block(2 * w2, w2)
        self.u1 = nn.ConvTranspose2d(w2, w1, 2, stride=2)
        self.d1 = block(2 * w1, w1)
        self.out = nn.Conv2d(w1, len(MASK_LABELS), 1)

    def forward(self, x):
        e1 = self.e1(x)
        e2 = self.e2(nn.functional.max_pool2d(e1, 2))
        e3 = self.e3(nn.functional.max_pool2d(e2, 2))
        d2 = self.d2(torch.cat([self.u2(e3), e2], dim=1))
        d1 = self.d1(torch.cat([self.u1(d2), e1], dim=1))
        return self.out(d1)


def encode(truth: dict, s0: torch.Tensor, grid: int = 64) -> torch.Tensor:
    """Grid truth (x0, y0, re, n, q, pa, flux, sky) -> transformed parameters (B, 8)."""
    c = (grid + 1) / 2.0
    e = (1 - truth["q"]) / (1 + truth["q"])
    two = 2.0 * torch.deg2rad(truth["pa"])
    return torch.stack([truth["x0"] - c, truth["y0"] - c, torch.log(truth["re"]), torch.log(truth["n"]),
                        e * torch.cos(two), e * torch.sin(two), -2.5 * torch.log10(truth["flux"] / s0),
                        truth["sky"] / s0], dim=1)


def decode(t: torch.Tensor, s0: torch.Tensor, sig: torch.Tensor | None = None, grid: int = 64,
           n_range=(0.3, 8.0), max_e: float = 0.95) -> tuple[dict, dict]:
    """Transformed parameters (B, 8) (and their sigmas) -> grid values ``{x0, y0, re, n, q, pa,
    flux, sky}`` and first-order sigmas of each (NaN without ``sig``). ``n`` is clipped to
    ``n_range`` and the ellipticity below ``max_e`` (q >= 0.026)."""
    c = (grid + 1) / 2.0
    dx, dy, lre, ln, g1, g2, mrel, srel = t.unbind(1)
    e = torch.sqrt(g1 * g1 + g2 * g2).clamp(min=1e-6, max=max_e)
    q = (1 - e) / (1 + e)
    pa = torch.rad2deg(0.5 * torch.atan2(g2, g1))
    flux = s0 * 10 ** (-0.4 * mrel)
    vals = {"x0": c + dx, "y0": c + dy, "re": torch.exp(lre), "n": torch.exp(ln).clamp(*n_range), "q": q, "pa": pa,
            "flux": flux, "sky": srel * s0}
    if sig is None:
        nan = torch.full_like(dx, math.nan)
        return vals, {k: nan for k in vals}
    sdx, sdy, slre, sln, sg1, sg2, smrel, ssrel = sig.unbind(1)
    se = torch.sqrt((g1 * sg1) ** 2 + (g2 * sg2) ** 2) / e
    spa = torch.rad2deg(0.5 * torch.sqrt((g2 * sg1) ** 2 + (g1 * sg2) ** 2) / (e * e))
    sigmas = {"x0": sdx, "y0": sdy, "re": vals["re"] * slre, "n": vals["n"] * sln, "q": 2 * se / (1 + e) ** 2,
              "pa": spa.clamp(max=90.0), "flux": flux * smrel * math.log(10) / 2.5, "sky": ssrel * s0}
    return vals, sigmas


def count_flops(net: nn.Module, x: torch.Tensor, *extra) -> int:
    """Multiply-adds of one forward pass per stamp (convolutions and linear layers)."""
    total = [0]

    def conv_hook(m, inp, out):
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total[0] += out.shape[1] * out.shape[2] * out.shape[3] * k

    def lin_hook(m, inp, out):
        total[0] += m.in_features * m.out_features

    hooks = []
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(lin_hook))
    with torch.no_grad():
        net(x[:1], *[e[:1] for e in extra])
    for h in hooks:
        h.remove()
    return total[0]
