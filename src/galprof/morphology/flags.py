"""Bit flags of the ``morph_flag`` column."""

from __future__ import annotations

from enum import IntFlag

__all__ = ["MorphFlag", "BAD", "describe_morph_flags"]


class MorphFlag(IntFlag):
    """Bits of ``morph_flag``; each set bit is explained in ``morph_message``.

    The bits in :data:`BAD` mark measurements that statmorph would flag as bad (its ``flag = 2``
    or ``4``); the others as suspect (its ``flag = 1``).
    """

    NO_DATA = 1            #: not measured: unusable input, no target pixels or nonpositive segment flux
    CENTROID = 2           #: centroid outside the stamp (moved to its centre) or on a masked pixel
    ASYM_CENTER = 4        #: asymmetry-centre search drifted or left the stamp (restarted from the brightest pixel)
    ASYM_CENTROID = 8      #: asymmetry-centre search failed twice (centroid used) or ended on a masked pixel
    PETROSIAN = 16         #: a Petrosian radius hit a limit of its search, or a mean flux was zero
    NO_SKYBOX = 32         #: no sky box found: no background corrections
    SKY_NOT_SUBTRACTED = 64  #: |mean of the sky box| > its standard deviation
    GINI_SEGMAP = 128      #: the Gini segmentation is empty or fills the stamp (bad) or disjoint (suspect)
    NONPOSITIVE = 256      #: nonpositive total flux or second moment in a statistic (that statistic is NaN)
    SHAPE_SEGMAP = 512     #: shape-asymmetry segmentation undefined or its brightest pixel added
    GINI_DISJOINT = 1024   #: the Gini segmentation had disjoint parts (only the brightest one kept)
    MID = 2048             #: MID statistics: segmentation fixed (brightest pixel added, zero flux) or D undefined
    MID_SEGMAP = 4096      #: the Gini and MID segmentations overlap little (``segmap_overlap_ratio``)


#: bits that make a measurement bad (statmorph ``flag >= 2``)
BAD = (MorphFlag.NO_DATA | MorphFlag.CENTROID | MorphFlag.ASYM_CENTROID | MorphFlag.PETROSIAN
       | MorphFlag.NO_SKYBOX | MorphFlag.SKY_NOT_SUBTRACTED | MorphFlag.GINI_SEGMAP | MorphFlag.NONPOSITIVE
       | MorphFlag.SHAPE_SEGMAP | MorphFlag.MID)


def describe_morph_flags(value: int) -> str:
    """Comma-separated names of the bits set in ``value``."""
    return ",".join(f.name for f in MorphFlag if value & f) or ""
