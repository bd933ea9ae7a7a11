"""Fit results: values, uncertainties, statistics and flags per galaxy; astropy tables."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..flags import Status, describe_flags

__all__ = ["FitResult"]


def column(key: str) -> str:
    """Table column of parameter ``"comp.param"``: ``comp_param``."""
    return key.replace(".", "_")


@dataclass
class FitResult:
    """Per-galaxy results of a batch fit (NumPy arrays, length B).

    Attributes
    ----------
    keys : every parameter, ``"comp.param"``; ``free`` : the fitted ones
    values, errors : physical values and 1-sigma errors per parameter (errors NaN where not
        available: fixed parameters, singular normal matrix, galaxies not fitted)
    covariance : (B, K, K) covariance of all parameters in ``keys`` order (physical units)
    chi2, dof, n_iter, status, flags, messages, ids
    uncertainty : how ``errors`` were made: "covariance", "bootstrap" or "none"
    statistic : "chi2" or "cash" (``chi2`` then holds the Poisson deviance)
    errors_covariance : the covariance errors (also kept when ``errors`` are bootstrap ones)
    percentiles : with the bootstrap, ``{key: (B, 2)}`` 16th and 84th percentiles
    bootstrap_samples : with the bootstrap, ``{key: (B, n_bootstrap)}`` refitted values
    """

    keys: list[str]
    free: list[str]
    values: dict[str, np.ndarray]
    errors: dict[str, np.ndarray]
    covariance: np.ndarray
    chi2: np.ndarray
    dof: np.ndarray
    n_iter: np.ndarray
    status: np.ndarray
    flags: np.ndarray
    messages: list[str] = field(default_factory=list)
    ids: list | None = None
    uncertainty: str = "covariance"
    statistic: str = "chi2"
    errors_covariance: dict[str, np.ndarray] | None = None
    percentiles: dict[str, np.ndarray] | None = None
    bootstrap_samples: dict[str, np.ndarray] | None = None

    @property
    def chi2_nu(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.dof > 0, self.chi2 / self.dof, np.nan)

    @property
    def correlation(self) -> np.ndarray:
        """(B, K, K) correlation matrices."""
        d = np.sqrt(np.einsum("bii->bi", self.covariance))
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.covariance / (d[:, :, None] * d[:, None, :])

    def to_table(self):
        """An astropy Table: ``id``, ``<comp>_<param>`` and ``_err`` for every parameter (with the
        bootstrap also ``_p16`` and ``_p84``), ``chi2``, ``dof``, ``chi2_nu``, ``n_iter``,
        ``status``, ``flags``, ``message``; the uncertainty method and statistic in ``meta``."""
        from astropy.table import Table

        n = len(self.chi2)
        t = Table()
        t["id"] = self.ids if self.ids is not None else np.arange(n)
        for key in self.keys:
            t[column(key)] = self.values[key]
            t[column(key) + "_err"] = self.errors[key]
            if self.percentiles is not None:
                t[column(key) + "_p16"] = self.percentiles[key][:, 0]
                t[column(key) + "_p84"] = self.percentiles[key][:, 1]
        t["chi2"] = self.chi2
        t["dof"] = self.dof
        t["chi2_nu"] = self.chi2_nu
        t["n_iter"] = self.n_iter
        t["status"] = [Status(int(s)).name.lower() for s in self.status]
        t["flags"] = self.flags
        t["message"] = [m or describe_flags(int(f)) for m, f in zip(self.messages, self.flags)]
        t.meta["uncertainty"] = self.uncertainty
        t.meta["statistic"] = self.statistic
        return t
