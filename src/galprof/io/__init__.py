"""Input and output: FITS images, model files."""

from .fits import read_image, write_model_image

__all__ = ["read_image", "write_model_image"]
