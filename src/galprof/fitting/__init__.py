"""Fitting: batched Levenberg–Marquardt and first-order optimisers; covariance and bootstrap errors."""

from .api import OPTIMIZERS, UNCERTAINTIES, fit
from .data import StampBatch, make_batch
from .gradient import AdamOptions, adam
from .lm import LMOptions, levenberg_marquardt
from .problem import STATISTICS, FitProblem, poisson_deviance_residuals
from .result import FitResult

__all__ = ["fit", "AdamOptions", "FitProblem", "FitResult", "LMOptions", "OPTIMIZERS", "STATISTICS",
           "StampBatch", "UNCERTAINTIES", "adam", "levenberg_marquardt", "make_batch", "poisson_deviance_residuals"]
