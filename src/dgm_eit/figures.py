"""What every figure of the package shares: resolution, the disk mask, clipping on colour scales.

Images of the disk fill a square whose corners are not part of the domain; drawing them as
0 would look like a conductivity of 0 (the colour of the 4-anomaly set's 0.01 objects), so
they are masked (NaN, drawn in the colour map's "bad" colour, white).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from dgm_eit.data.phantoms import disk_mask
from dgm_eit.errors import InputError

# at least 150 dpi: the figures are meant to go into papers as they are
DPI = 150
OUTSIDE_COLOUR = "white"


def save_figure(fig, path) -> None:
    """Write ``fig`` as a PNG at :data:`DPI`, atomically, and close it whatever happens."""
    import matplotlib.pyplot as plt

    from dgm_eit.files import atomic_path

    try:
        fig.draw_without_rendering()   # constrained layout needs a second pass to clear a wrapped title
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=DPI, format="png")
    finally:
        plt.close(fig)


def outside_masked(images: np.ndarray) -> np.ndarray:
    """``(..., n, n)`` images as float64 with NaN at the pixels whose centre lies outside the disk."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim < 2 or images.shape[-1] != images.shape[-2]:
        raise InputError(f"images of the disk must be square, got shape {images.shape}")
    return np.where(disk_mask(images.shape[-1]), images, np.nan)


def colour_map(name: str, bad: str = OUTSIDE_COLOUR):
    """A matplotlib colour map whose NaN (outside the disk) is ``bad``."""
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad=bad)


def class_colour_map():
    """KTC classes 0 water (grey), 1 resistive (blue), 2 conductive (red): the colours of low and
    high values in the images' ``RdBu_r``; draw with ``vmin=-0.5, vmax=2.5``."""
    from matplotlib.colors import ListedColormap

    return ListedColormap(["#dcdcdc", "#2166ac", "#b2182b"]).with_extremes(bad=OUTSIDE_COLOUR)


CLASS_NAMES = ("water", "resistive", "conductive")


def clip_extend(arrays: Iterable[np.ndarray], vmin: float, vmax: float) -> str:
    """matplotlib's colourbar ``extend`` for values drawn on ``[vmin, vmax]``: an arrow at each
    end beyond which some value (NaN ignored) is clipped, so a clipped scale says so."""
    low = high = False
    for a in arrays:
        a = np.asarray(a, dtype=np.float64)
        finite = a[np.isfinite(a)]
        if finite.size:
            low = low or bool(finite.min() < vmin)
            high = high or bool(finite.max() > vmax)
    return {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}[low, high]
