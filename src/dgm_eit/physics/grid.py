"""Pixel grid <-> mesh element mapping.

The grid has ``size x size`` pixels on the square [-R, R]^2 with y up, R = ``mesh.radius``
(1 for the unit disk; 0.115 m for the KTC2023 tank, whose 256 x 256 images cover that
square): pixel (row, col) has centre ``x = -R + (col + 0.5) * 2R/size``,
``y = R - (row + 0.5) * 2R/size`` (row 0 = top). A pixel is inside the disk when its centre
is (``x^2 + y^2 <= R^2``); images are 0 outside.

Both directions are sparse matrices built once:
- ``to_image``: an inside pixel takes the value of the element containing its centre
  (pixels between the circle and the mesh polygon take the nearest element).
- ``to_elements``: each element gets the area-weighted mean of the inside pixels that
  overlap it; overlap areas are estimated with ``oversample^2`` sub-pixel points per
  pixel. An element hit by no sub-pixel point takes the pixel at its centroid.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from dgm_eit.errors import InputError
from dgm_eit.physics.mesh import Mesh


def _locate(mesh: Mesh, points: np.ndarray) -> np.ndarray:
    """Index of the element containing each point, -1 outside the mesh."""
    from matplotlib.tri import Triangulation

    tri = Triangulation(mesh.nodes[:, 0], mesh.nodes[:, 1], mesh.elements)
    return np.asarray(tri.get_trifinder()(points[:, 0], points[:, 1]), dtype=np.int64)


def _nearest_element(mesh: Mesh, points: np.ndarray) -> np.ndarray:
    from scipy.spatial import cKDTree

    return cKDTree(mesh.centroids).query(points)[1].astype(np.int64)


class PixelGrid:
    def __init__(self, mesh: Mesh, size: int = 32, oversample: int = 4):
        size = int(size)
        if size < 2:
            raise InputError(f"pixel grid size must be at least 2, got {size}")
        if oversample < 1:
            raise InputError(f"oversample must be at least 1, got {oversample}")
        self.mesh = mesh
        self.size = size
        self.shape = (size, size)
        R = float(getattr(mesh, "radius", 1.0))
        step = 2.0 * R / size
        c = -R + (np.arange(size) + 0.5) * step
        self.x, self.y = np.meshgrid(c, -c)  # (H, W), row 0 = top
        self.inside = self.x**2 + self.y**2 <= R * R
        self.inside.setflags(write=False)
        m = mesh.n_elements
        n_pix = size * size
        inside_idx = np.flatnonzero(self.inside.ravel())
        centres = np.stack([self.x.ravel()[inside_idx], self.y.ravel()[inside_idx]], axis=1)
        owner = _locate(mesh, centres)
        missing = owner < 0
        if missing.any():
            owner[missing] = _nearest_element(mesh, centres[missing])
        self._to_image = sp.csr_matrix((np.ones(len(inside_idx)), (inside_idx, owner)), shape=(n_pix, m))

        # sub-pixel points of inside pixels -> elements, counted per (element, pixel)
        offsets = (np.arange(oversample) + 0.5) / oversample * step - step / 2
        ox, oy = np.meshgrid(offsets, offsets)
        sub = (centres[:, None, :] + np.stack([ox.ravel(), oy.ravel()], axis=1)[None]).reshape(-1, 2)
        sub_pixel = np.repeat(inside_idx, oversample * oversample)
        sub_owner = _locate(mesh, sub)
        hit = sub_owner >= 0
        counts = sp.csr_matrix((np.ones(hit.sum()), (sub_owner[hit], sub_pixel[hit])), shape=(m, n_pix))
        counts.sum_duplicates()
        totals = np.asarray(counts.sum(axis=1)).ravel()
        empty = np.flatnonzero(totals == 0)
        if empty.size:
            # elements smaller than a sub-pixel: the pixel at the centroid (clipped inside)
            cen = mesh.centroids[empty]
            col = np.clip(np.floor((cen[:, 0] + R) / step), 0, size - 1).astype(np.int64)
            row = np.clip(np.floor((R - cen[:, 1]) / step), 0, size - 1).astype(np.int64)
            pix = row * size + col
            bad = ~self.inside.ravel()[pix]
            if bad.any():
                # centroid pixel outside the disk: the nearest inside pixel instead
                from scipy.spatial import cKDTree

                pix[bad] = inside_idx[cKDTree(centres).query(cen[bad])[1]]
            counts = counts + sp.csr_matrix((np.ones(empty.size), (empty, pix)), shape=(m, n_pix))
            totals = np.asarray(counts.sum(axis=1)).ravel()
        self._to_elements = sp.csr_matrix(sp.diags(1.0 / totals) @ counts)

    @property
    def image_matrix(self) -> sp.csr_matrix:
        """(H*W, m) sparse: flattened image = matrix @ element values."""
        return self._to_image

    @property
    def element_matrix(self) -> sp.csr_matrix:
        """(m, H*W) sparse: element values = matrix @ flattened image (rows sum to 1)."""
        return self._to_elements

    def to_image(self, values) -> np.ndarray:
        """Element values (..., m) -> images (..., H, W); 0 outside the disk."""
        values = np.asarray(values)
        m = self.mesh.n_elements
        if values.ndim < 1 or values.shape[-1] != m:
            raise InputError(f"element values must have last dimension {m}, got shape {values.shape}")
        lead = values.shape[:-1]
        flat = values.reshape(-1, m)
        out = (self._to_image @ flat.T).T
        return out.reshape(*lead, self.size, self.size).astype(np.result_type(values.dtype, np.float32), copy=False)

    def to_elements(self, image) -> np.ndarray:
        """Images (..., H, W) -> element values (..., m) (area-weighted means)."""
        image = np.asarray(image)
        if image.ndim < 2 or image.shape[-2:] != self.shape:
            raise InputError(f"images must have trailing shape {self.shape}, got {image.shape}")
        lead = image.shape[:-2]
        flat = image.reshape(-1, self.size * self.size)
        out = (self._to_elements @ flat.T).T
        return out.reshape(*lead, self.mesh.n_elements).astype(np.result_type(image.dtype, np.float32), copy=False)

    def __repr__(self) -> str:
        return f"PixelGrid({self.size}x{self.size}, {self.mesh.n_elements} elements)"
