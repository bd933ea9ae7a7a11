"""Exception and warning hierarchy.

Every galprof error also subclasses the matching builtin, so that callers who
catch ``ValueError`` keep working.
"""

from __future__ import annotations


class GalprofError(Exception):
    """Base class of every error raised by galprof."""


class ModelError(GalprofError, ValueError):
    """A model description is invalid (unknown profile, missing parameter, bad tie...)."""


class ParameterError(GalprofError, ValueError):
    """A parameter value or bound is outside what the profile allows."""


class PSFError(GalprofError, ValueError):
    """A PSF image cannot be used (non-finite pixels, zero or negative sum, wrong shape)."""


class DataError(GalprofError, ValueError):
    """Image data cannot be used (wrong shape, unreadable file...)."""


class GalprofWarning(UserWarning):
    """Warnings about inputs that galprof used, but that deserve a look."""
