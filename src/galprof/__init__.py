"""galprof: fast, batched, accurate fitting of galaxy surface-brightness profiles.

Conventions (GALFIT's): pixel (1, 1) is the centre of the first (lower-left) pixel, x runs
along columns; position angles are degrees counter-clockwise from +y; q = b/a; radii are
semi-major, in pixels; mag = -2.5 log10(total flux) + zeropoint. See docs/conventions.md.
"""

from .errors import DataError, GalprofError, GalprofWarning, ModelError, ParameterError, PSFError
from .fitting import AdamOptions, FitResult, LMOptions, fit
from .flags import Flag, Status
from .model import Component, Model, load_model
from .params import Parameter, ParameterLayout, ParamSpec, Tie
from .profiles import EllipticalProfile, available_profiles, get_profile, register_profile
from .render import Renderer, RenderOptions, render

__version__ = "0.1.0"

__all__ = [
    "Component",
    "FitResult",
    "Flag",
    "LMOptions",
    "Status",
    "fit",
    "AdamOptions",
    "DataError",
    "EllipticalProfile",
    "GalprofError",
    "GalprofWarning",
    "Model",
    "ModelError",
    "Parameter",
    "ParameterError",
    "ParameterLayout",
    "ParamSpec",
    "PSFError",
    "RenderOptions",
    "Renderer",
    "Tie",
    "available_profiles",
    "get_profile",
    "load_model",
    "register_profile",
    "render",
]
