"""Fitting: batched Levenberg–Marquardt with covariance uncertainties."""

from .api import fit
from .data import StampBatch, make_batch
from .lm import LMOptions, levenberg_marquardt
from .problem import FitProblem
from .result import FitResult

__all__ = ["fit", "FitProblem", "FitResult", "LMOptions", "StampBatch", "levenberg_marquardt", "make_batch"]
