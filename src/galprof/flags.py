"""The per-galaxy bit flags and statuses, one registry for the whole package."""

from __future__ import annotations

from enum import IntEnum, IntFlag

__all__ = ["Flag", "Status", "describe_flags"]


class Flag(IntFlag):
    """Bits of the ``flags`` column. Each set bit is explained in the ``message`` column."""

    BAD_PIXELS = 1        #: some pixels were unusable (NaN data, sigma <= 0 or non-finite) and are masked
    NO_DATA = 2           #: no usable pixel (or fewer than free parameters): not fitted
    BAD_PSF = 4           #: the PSF could not be used: not fitted
    BAD_START = 8         #: initial values outside their bounds or non-finite: not fitted
    NOT_CONVERGED = 16    #: the iteration cap was reached
    NONFINITE = 32        #: the model or chi2 became non-finite
    SINGULAR = 64         #: the normal matrix is singular: no covariance
    AT_BOUND = 128        #: a parameter ended within 1e-6 (relative) of a bound
    BAD_FILE = 256        #: an input file is missing or unreadable, or its shape does not match: not fitted
    BAD_VALUE = 512       #: a catalogue value is missing or invalid (e.g. no sigma and no gain): not fitted
    EDGE = 1024           #: the cutout runs off its image; the pixels outside it are masked
    FIT_ERROR = 2048      #: fitting this galaxy raised an error (see the message): not fitted
    NO_DETECTION = 4096   #: automatic inputs: no source detected at the target's position (model starts used)


class Status(IntEnum):
    """Outcome of one galaxy's fit."""

    CONVERGED = 0
    MAX_ITER = 1
    NONFINITE = 2
    BAD_INPUT = 3


def describe_flags(value: int) -> str:
    """Comma-separated names of the bits set in ``value``."""
    return ",".join(f.name for f in Flag if value & f) or ""
