"""Surface-brightness profiles (one registry; see :func:`register_profile`)."""

from . import builtin  # noqa: F401  (registers the built-in profiles)
from .base import (
    EllipticalProfile,
    PointProfile,
    Profile,
    SkyProfile,
    available_profiles,
    get_profile,
    register_profile,
)

__all__ = [
    "Profile",
    "EllipticalProfile",
    "SkyProfile",
    "PointProfile",
    "register_profile",
    "get_profile",
    "available_profiles",
]
