"""Profile base classes and the registry.

A profile declares its parameters (:class:`~galprof.params.ParamSpec`) and provides a
pure torch kernel. Elliptical profiles only provide the radial shape ``f(r)`` of the
elliptical radius; geometry (centre, axis ratio, position angle, boxiness), flux
normalisation to the total magnitude, pixel integration and PSF convolution are done
once for all of them by :mod:`galprof.render`.

Adding a profile means writing one class::

    from galprof.profiles import EllipticalProfile, register_profile
    from galprof.params import ParamSpec

    @register_profile
    class Cored(EllipticalProfile):
        name = "cored"
        shape_params = (ParamSpec("rc", kind="length", unit="px", bounds=(0.05, 500),
                                  domain=(0, None), doc="core radius"),)

        def radial(self, r, p):
            return (1 + (r / p["rc"]) ** 2) ** -2.0

        def radii(self, p):
            return [p["rc"]]

Its total flux integral is found by quadrature unless :meth:`log_radial_integral` is given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import torch

from ..errors import ModelError
from ..params import ParamSpec
from ..special import gauss_legendre

__all__ = [
    "Profile",
    "EllipticalProfile",
    "SkyProfile",
    "PointProfile",
    "register_profile",
    "get_profile",
    "available_profiles",
]

_REGISTRY: dict[str, type[Profile]] = {}

X0 = ParamSpec("x0", kind="x", unit="px", bounds=(None, None), doc="centre x (pixel coordinate, 1 = first column)")
Y0 = ParamSpec("y0", kind="y", unit="px", bounds=(None, None), doc="centre y (pixel coordinate, 1 = first row)")
MAG = ParamSpec("mag", kind="mag", unit="mag", bounds=(None, None), doc="total magnitude")
Q = ParamSpec("q", kind="other", unit="", default=1.0, bounds=(0.02, 1.0), domain=(1e-3, 1.0),
              doc="axis ratio b/a")
PA = ParamSpec("pa", kind="angle", unit="deg", default=0.0, doc="position angle of the major axis, "
               "degrees counter-clockwise from +y")
C0 = ParamSpec("c0", kind="other", unit="", default=0.0, bounds=(-1.0, 2.0), domain=(-1.0, 8.0),
               fixed=True, doc="boxiness (GALFIT): < 0 disky, > 0 boxy")


def register_profile(cls: type[Profile]) -> type[Profile]:
    """Class decorator adding a profile to the registry under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not name or not isinstance(name, str):
        raise ModelError(f"profile class {cls.__name__} needs a string `name`")
    _REGISTRY[name] = cls
    return cls


def get_profile(name: str) -> Profile:
    """An instance of the registered profile ``name``."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ModelError(
            f"unknown profile {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        ) from None


def available_profiles() -> list[str]:
    return sorted(_REGISTRY)


class Profile:
    """Base class: a named list of parameters and a rendering kind."""

    name: ClassVar[str] = ""
    #: "elliptical", "point" or "sky"
    kind: ClassVar[str] = ""
    params: ClassVar[tuple[ParamSpec, ...]] = ()
    #: whether the PSF applies to this component
    convolved: ClassVar[bool] = True

    def spec(self, name: str) -> ParamSpec:
        for s in self.params:
            if s.name == name:
                return s
        raise ModelError(f"profile {self.name!r} has no parameter {name!r}; "
                         f"it has {', '.join(s.name for s in self.params)}")

    def __repr__(self):
        return f"{type(self).__name__}()"


class EllipticalProfile(Profile):
    """A profile ``I(x, y) = F f(r) / norm`` of the (generalised) elliptical radius ``r``.

    ``r = (|u|^C + |v/q|^C)^(1/C)`` with ``u`` along the major axis, ``C = c0 + 2``; ``F`` is
    the total flux (from ``mag``) and ``norm`` the integral of ``f`` over the plane, so that
    ``mag`` is always the total magnitude.

    Subclasses set ``shape_params`` and implement :meth:`radial`; they may give
    :meth:`log_radial_integral` (closed form), :meth:`radii` and :meth:`cusp`.
    """

    kind = "elliptical"
    shape_params: ClassVar[tuple[ParamSpec, ...]] = ()
    #: True for profiles smooth on the scale of a cell away from their centre (no truncation,
    #: no edge): the renderer may then integrate their outer cells from one value per cell
    #: (``RenderOptions.base_rule``); False (Gauss–Legendre everywhere) unless declared
    smooth: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "params" not in cls.__dict__:
            cls.params = (X0, Y0, MAG, *cls.shape_params, Q, PA, C0)

    # -- kernel interface (r and every p[...] broadcast together; lengths in grid cells) ----
    def radial(self, r: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Unnormalised radial shape ``f(r)``, finite at ``r = 0``."""
        raise NotImplementedError

    def radial_squared(self, r2: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``f`` at ``r = sqrt(r2)``: the renderer's entry point for elliptical (not boxy)
        isophotes. Profiles whose formula is simpler in ``r^2`` may override it (it must equal
        :meth:`radial`); the default takes the square root."""
        return self.radial(torch.sqrt(r2), p)

    def derived(self, p: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Quantities computed once per render from the (B,) parameters and passed to
        :meth:`radial` with them (e.g. the Sérsic ``b_n``); none by default."""
        return {}

    def radii(self, p: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Characteristic radii (ascending): the first is the core scale; a finite outer
        edge, if any, should be last. Used to place quadrature panels."""
        for s in self.shape_params:
            if s.kind == "length":
                return [p[s.name]]
        raise NotImplementedError(f"profile {self.name!r} must define radii()")

    def cusp(self, p: Mapping[str, torch.Tensor]) -> torch.Tensor | float:
        """Power ``s`` of the centre: ``f(r) ~ f(0) (1 - c r^s)`` as ``r -> 0`` (smooth: 2)."""
        return 2.0

    def log_radial_integral(self, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``log`` of ``int_0^inf 2 pi r f(r) dr``; by default by Gauss–Legendre quadrature
        on panels between :meth:`radii`, the last mapped to infinity."""
        ref = next(iter(p.values()))
        order = 48
        t, w = gauss_legendre(order, dtype=ref.dtype, device=ref.device)
        radii = [r.unsqueeze(-1) for r in self.radii(p)]
        pe = {k: v.unsqueeze(-1) for k, v in p.items()}
        total = 0.0
        # [0, r1]: graded towards the centre
        r1 = radii[0]
        s = self.cusp(p)
        if isinstance(s, torch.Tensor):
            g = (2.0 / s).clamp(1.0, 24.0).detach().unsqueeze(-1)
        else:
            g = min(max(2.0 / float(s), 1.0), 24.0)
        rr = (r1 * t ** g).clamp(min=torch.finfo(ref.dtype).tiny ** 0.5)
        total = total + (r1 * g * t ** (g - 1.0) * rr * self.radial(rr, pe) * w).sum(-1)
        for lo, hi in zip(radii[:-1], radii[1:]):
            rr = lo + (hi - lo) * t
            total = total + ((hi - lo) * rr * self.radial(rr, pe) * w).sum(-1)
        rl = radii[-1]
        rr = rl / t
        total = total + (rl / t**2 * rr * self.radial(rr, pe) * w).sum(-1)
        return math.log(2.0 * math.pi) + torch.log(total)


class SkyProfile(Profile):
    """Sky components: evaluated at pixel centres, never convolved with the PSF."""

    kind = "sky"
    convolved = False

    def evaluate(self, dx: torch.Tensor, dy: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Sky level at offsets ``dx, dy`` (pixels) from the stamp centre."""
        raise NotImplementedError


class PointProfile(Profile):
    """A point source: the PSF image, shifted with sub-pixel accuracy."""

    kind = "point"
