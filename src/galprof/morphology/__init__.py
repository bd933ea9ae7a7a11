"""Non-parametric morphology: concentration, asymmetry, smoothness, Gini, M20 and radii,
batched on CPU or GPU with statmorph's definitions (see docs/morphology.md)."""

from .cli import morphology_columns
from .detect import DetectOptions, segment_stamps
from .flags import MorphFlag, describe_morph_flags
from .hook import morphology_hook
from .measure import COLUMNS, MorphologyOptions, measure_morphology

__all__ = [
    "COLUMNS",
    "DetectOptions",
    "MorphFlag",
    "MorphologyOptions",
    "describe_morph_flags",
    "measure_morphology",
    "morphology_columns",
    "morphology_hook",
    "segment_stamps",
]
