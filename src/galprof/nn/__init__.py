"""Neural initial guesses and learned masks (docs/nn_init.md).

A small ResNet (:class:`~galprof.nn.network.InitNet`) maps a masked, noise-normalised stamp on a
fixed 64 x 64 grid to every single-Sérsic parameter with a predictive sigma; a small U-Net
(:class:`~galprof.nn.network.MaskNet`) labels the grid pixels target / other sources / sky. Both
are trained on stamps that galprof's own renderer simulates from a survey description
(:mod:`galprof.nn.survey`, :mod:`galprof.nn.simulate`); the parameter network with a
physics-informed loss: MSE on the transformed parameters plus lambda times the chi^2 of the
stamp against the model rendered from the prediction (:mod:`galprof.nn.train`). Weights for an
SDSS-like survey ship with galprof (:func:`~galprof.nn.infer.load_predictor`).

torch is the only dependency.
"""

from .survey import Survey, load_survey, shipped_survey

__all__ = ["Survey", "load_survey", "shipped_survey"]
