"""Triangular meshes of a disk with boundary electrodes.

Electrode ``k`` of ``L`` is centred at angle ``first_electrode_angle + 2*pi*k/L``; by default
(angle 0, radius 1) electrode 0 sits at the point (1, 0), and the numbering always runs
counter-clockwise. A disk of another ``radius`` (e.g. a real tank, 0.115 m for KTC2023) is
the unit-disk mesh scaled: ``h0`` and ``electrode_width`` are then lengths in the same unit
as ``radius``, so the triangulation (and every node's index) is that of the unit disk with
``h0/radius`` and ``electrode_width/radius``, rotated by the angle and scaled. Point electrodes are single boundary
nodes; complete-electrode-model (CEM) electrodes are boundary arcs of arc length
``electrode_width`` whose end points are mesh nodes, so the arcs are resolved by edges.

The mesher is Shewchuk's Triangle (the ``triangle`` package): the boundary polygon is
given with spacing ``h0`` and Triangle may not split it (switch ``Y``), so boundary nodes
are exactly the points we place. The interior is a quality mesh (minimum angle 30 deg)
refined in a few passes towards a target edge length that grows linearly from ``h0`` at
the boundary to ``2.7*h0`` at depth 0.35 and stays there: fine where EIT is sensitive,
coarse in the centre. ``h0 = 0.05`` gives about the size the paper reports (731 nodes /
1338 triangles).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from dgm_eit.errors import InputError

ELECTRODE_MODELS = ("point", "cem")

# Target edge length in the centre relative to the boundary spacing h0, and the depth
# over which the size grows; chosen so that h0 = 0.05 gives the paper's mesh size.
_CENTRE_SIZE_FACTOR = 2.7
_GROWTH_DEPTH = 0.35
_REFINE_PASSES = 3
_MIN_ANGLE_DEG = 30


@dataclass(frozen=True, eq=False)
class Mesh:
    """A 2-D P1 mesh with electrodes.

    ``nodes`` (n, 2) float64, ``elements`` (m, 3) int64 counter-clockwise,
    ``electrode_nodes``: one int array per electrode (point: one node; CEM: the arc's
    nodes in counter-clockwise order), ``electrode_edges``: one (k, 2) array per electrode
    of the boundary edges covering the arc (empty for point electrodes).
    ``ref_node`` is the grounded node of the point-electrode model (not an electrode).
    ``radius`` is the radius of the disk the mesh covers (1 for the unit disk; informative,
    for consumers such as pixel grids; the FEM uses only the node coordinates).
    """

    nodes: np.ndarray
    elements: np.ndarray
    electrode_nodes: tuple
    electrode_model: str = "point"
    electrode_edges: tuple = ()
    ref_node: int = 0
    description: str = ""
    radius: float = 1.0
    areas: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        nodes = np.ascontiguousarray(self.nodes, dtype=np.float64)
        elements = np.ascontiguousarray(self.elements, dtype=np.int64)
        if nodes.ndim != 2 or nodes.shape[1] != 2:
            raise InputError(f"mesh nodes must have shape (n, 2), got {nodes.shape}")
        if elements.ndim != 2 or elements.shape[1] != 3:
            raise InputError(f"mesh elements must have shape (m, 3), got {elements.shape}")
        if elements.min() < 0 or elements.max() >= len(nodes):
            raise InputError("mesh elements refer to nodes that do not exist")
        signed = _signed_areas(nodes, elements)
        if np.any(signed == 0):
            raise InputError("mesh has degenerate (zero-area) elements")
        # Orientation matters for the sign of nothing we compute, but the contract says
        # counter-clockwise, so flip clockwise triangles rather than reject them.
        cw = signed < 0
        if np.any(cw):
            elements = elements.copy()
            elements[cw] = elements[cw][:, [0, 2, 1]]
        if self.electrode_model not in ELECTRODE_MODELS:
            raise InputError(f"unknown electrode model {self.electrode_model!r}; choose point or cem")
        electrodes = tuple(np.asarray(e, dtype=np.int64).reshape(-1) for e in self.electrode_nodes)
        if len(electrodes) < 2:
            raise InputError(f"a mesh needs at least 2 electrodes, got {len(electrodes)}")
        for k, e in enumerate(electrodes):
            if e.size == 0 or e.min() < 0 or e.max() >= len(nodes):
                raise InputError(f"electrode {k} refers to nodes that are not in the mesh")
        if self.electrode_model == "point" and any(e.size != 1 for e in electrodes):
            raise InputError("point electrodes must be exactly one node each")
        edges = tuple(np.asarray(e, dtype=np.int64).reshape(-1, 2) for e in self.electrode_edges)
        if self.electrode_model == "cem" and len(edges) != len(electrodes):
            raise InputError("CEM electrodes need their boundary edges (one array per electrode)")
        all_electrode_nodes = np.concatenate(electrodes)
        if not 0 <= self.ref_node < len(nodes):
            raise InputError(f"reference node {self.ref_node} is not in the mesh")
        if self.ref_node in all_electrode_nodes:
            raise InputError(f"reference node {self.ref_node} lies on an electrode")
        for name, value in (("nodes", nodes), ("elements", elements)):
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        for e in electrodes + edges:
            e.setflags(write=False)
        object.__setattr__(self, "electrode_nodes", electrodes)
        object.__setattr__(self, "electrode_edges", edges)
        areas = np.abs(signed)
        areas.setflags(write=False)
        object.__setattr__(self, "areas", areas)

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def n_elements(self) -> int:
        return len(self.elements)

    @property
    def n_electrodes(self) -> int:
        return len(self.electrode_nodes)

    @functools.cached_property
    def centroids(self) -> np.ndarray:
        return self.nodes[self.elements].mean(axis=1)

    @functools.cached_property
    def element_neighbours(self) -> np.ndarray:
        """(k, 2) pairs of elements sharing an edge (each pair once, i < j)."""
        m = self.n_elements
        local = np.array([[0, 1], [1, 2], [2, 0]])
        edges = np.sort(self.elements[:, local], axis=2).reshape(-1, 2)
        owner = np.repeat(np.arange(m), 3)
        key = edges[:, 0] * self.n_nodes + edges[:, 1]
        order = np.argsort(key, kind="stable")
        key, owner = key[order], owner[order]
        shared = np.flatnonzero(key[1:] == key[:-1])
        pairs = np.stack([owner[shared], owner[shared + 1]], axis=1)
        return np.sort(pairs, axis=1)

    def __repr__(self) -> str:
        return (f"Mesh({self.description or 'custom'}: {self.n_nodes} nodes, {self.n_elements} elements, "
                f"{self.n_electrodes} {self.electrode_model} electrodes)")


def _signed_areas(nodes: np.ndarray, elements: np.ndarray) -> np.ndarray:
    p = nodes[elements]
    d1 = p[:, 1] - p[:, 0]
    d2 = p[:, 2] - p[:, 0]
    return 0.5 * (d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0])


def _boundary_angles(n_electrodes: int, h0: float, electrode_model: str, width: float):
    """Angles of the boundary polygon's vertices and, per electrode, the indices of its vertices."""
    L = n_electrodes
    pitch = 2 * np.pi / L
    if electrode_model == "point":
        per_gap = max(1, int(np.ceil(pitch / h0)))
        angles = np.arange(L * per_gap) * (pitch / per_gap)
        return angles, [np.array([k * per_gap]) for k in range(L)]
    # CEM: each arc gets an even number of segments so its centre is a node too; the gaps
    # between arcs get their own uniform spacing so arc end points are exact nodes.
    n_arc = max(2, 2 * int(np.ceil(width / h0 / 2)))
    gap = pitch - width
    n_gap = max(1, int(np.ceil(gap / h0)))
    angles, electrodes = [], []
    for k in range(L):
        start = k * pitch - width / 2
        arc = start + np.arange(n_arc + 1) * (width / n_arc)
        electrodes.append(len(angles) + np.arange(n_arc + 1))
        angles.extend(arc)
        angles.extend(start + width + np.arange(1, n_gap) * (gap / n_gap))
    angles = np.mod(np.asarray(angles), 2 * np.pi)
    return angles, electrodes


def disk_mesh(n_electrodes: int = 16, h0: float = 0.1, electrode_model: str = "point",
              electrode_width: float = 0.2, radius: float = 1.0, first_electrode_angle: float = 0.0) -> Mesh:
    """Mesh of a disk of ``radius`` with ``n_electrodes`` equally spaced electrodes (cached).

    ``h0`` is the boundary edge length (the finest size); central triangles have edges of
    about ``2.7*h0``. ``electrode_width`` (CEM only) is the arc length of one electrode.
    Both are lengths in the unit of ``radius``: a real tank is meshed in its own unit
    (metres), so contact impedances and conductivities keep their physical values instead
    of being rescaled by hand. ``first_electrode_angle`` (radians, counter-clockwise from
    the x axis) is the centre of electrode 0, so a device's own electrode numbering (KTC2023:
    electrode 1 at 90 degrees) needs no relabelling. The defaults (radius 1, angle 0) give
    exactly the meshes of earlier versions.
    Equal parameters return the same (read-only) object, however they are spelled.
    """
    try:
        n_electrodes, h0, electrode_width = int(n_electrodes), float(h0), float(electrode_width)
        radius, first_electrode_angle = float(radius), float(first_electrode_angle)
    except (TypeError, ValueError):
        raise InputError("disk_mesh: n_electrodes, h0, electrode_width, radius and first_electrode_angle "
                         "must be numbers") from None
    if not (np.isfinite(radius) and radius > 0):
        raise InputError(f"disk radius must be positive, got {radius}")
    if not np.isfinite(first_electrode_angle):
        raise InputError(f"first_electrode_angle must be a finite angle in radians, got {first_electrode_angle}")
    if electrode_model == "point":
        electrode_width = 0.0  # unused; one cache entry for every width
    if radius == 1.0 and first_electrode_angle == 0.0:
        return _disk_mesh(n_electrodes, h0, electrode_model, electrode_width)
    return _placed_disk_mesh(n_electrodes, h0, electrode_model, electrode_width, radius,
                             float(np.mod(first_electrode_angle, 2 * np.pi)))


@functools.lru_cache(maxsize=16)
def _placed_disk_mesh(n_electrodes: int, h0: float, electrode_model: str, electrode_width: float,
                      radius: float, angle: float) -> Mesh:
    """The unit-disk mesh (sizes relative to the radius) rotated by ``angle`` and scaled.

    Rotating the finished mesh, rather than the boundary before meshing, keeps the
    triangulation identical to the unit disk's, so a result on one is comparable with the
    other node by node; only coordinates change."""
    try:
        unit = _disk_mesh(n_electrodes, h0 / radius, electrode_model, electrode_width / radius)
    except InputError as err:
        if radius == 1.0:
            raise
        raise InputError(f"{err} (sizes relative to the radius {radius:g}: h0={h0:g}, "
                         f"electrode_width={electrode_width:g} are lengths in the radius's unit)") from None
    c, s = np.cos(angle), np.sin(angle)
    nodes = radius * (unit.nodes @ np.array([[c, s], [-s, c]]))
    desc = f"disk R={radius:g} h0={h0:g} L={n_electrodes} {electrode_model}"
    if angle:
        desc += f" first electrode at {np.degrees(angle):g} deg"
    return Mesh(nodes, unit.elements, unit.electrode_nodes, electrode_model=electrode_model,
                electrode_edges=unit.electrode_edges, ref_node=unit.ref_node, description=desc,
                radius=radius)


@functools.lru_cache(maxsize=16)
def _disk_mesh(n_electrodes: int, h0: float, electrode_model: str, electrode_width: float) -> Mesh:
    import triangle

    if electrode_model not in ELECTRODE_MODELS:
        raise InputError(f"unknown electrode model {electrode_model!r}; choose point or cem")
    if n_electrodes < 2:
        raise InputError(f"n_electrodes must be at least 2, got {n_electrodes}")
    if not (np.isfinite(h0) and 0.005 <= h0 <= 0.5):
        raise InputError(f"mesh size h0 must be in [0.005, 0.5], got {h0}")
    if electrode_model == "cem":
        if not (np.isfinite(electrode_width) and electrode_width > 0):
            raise InputError(f"electrode_width must be positive, got {electrode_width}")
        if electrode_width * n_electrodes >= 2 * np.pi:
            raise InputError(f"{n_electrodes} electrodes of width {electrode_width} do not fit on the "
                             f"unit circle (total {electrode_width * n_electrodes:.3f} >= 2*pi)")
    angles, electrode_vertices = _boundary_angles(n_electrodes, h0, electrode_model, electrode_width)
    nb = len(angles)
    boundary = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    segments = np.stack([np.arange(nb), (np.arange(nb) + 1) % nb], axis=1)
    h_centre = _CENTRE_SIZE_FACTOR * h0
    out = triangle.triangulate({"vertices": boundary, "segments": segments},
                               f"pq{_MIN_ANGLE_DEG}Ya{np.sqrt(3) / 4 * h_centre**2:.12f}Q")
    for _ in range(_REFINE_PASSES):
        depth = 1.0 - np.hypot(*out["vertices"][out["triangles"]].mean(axis=1).T)
        target = h0 + (h_centre - h0) * np.clip(depth / _GROWTH_DEPTH, 0.0, 1.0)
        out["triangle_max_area"] = (np.sqrt(3) / 4 * target**2)[:, None]
        out = triangle.triangulate(out, f"rpq{_MIN_ANGLE_DEG}YaQ")
    nodes = np.asarray(out["vertices"], dtype=np.float64)
    elements = np.asarray(out["triangles"], dtype=np.int64)
    # Triangle keeps input vertices first and (with Y) adds none on the boundary.
    if not np.allclose(nodes[:nb], boundary, atol=1e-12):
        raise RuntimeError("Triangle reordered the boundary vertices")
    # Ground the point model at the interior node nearest the centre: far from every
    # electrode, and its choice does not change electrode voltage differences.
    interior = np.arange(nb, len(nodes))
    ref_node = int(interior[np.argmin(np.hypot(*nodes[interior].T))]) if interior.size else nb - 1
    electrode_nodes = tuple(np.asarray(e) for e in electrode_vertices)
    if electrode_model == "cem":
        edges = tuple(np.stack([e[:-1], e[1:]], axis=1) for e in electrode_nodes)
    else:
        edges = ()
    return Mesh(nodes, elements, electrode_nodes, electrode_model=electrode_model,
                electrode_edges=edges, ref_node=ref_node,
                description=f"disk h0={h0:g} L={n_electrodes} {electrode_model}")




def _cache_clear() -> None:
    _disk_mesh.cache_clear()
    _placed_disk_mesh.cache_clear()


disk_mesh.cache_clear = _cache_clear


def pyeit_like_mesh(nodes, elements, electrode_nodes, ref_node: int | None = None) -> Mesh:
    """Wrap mesh arrays (e.g. pyEIT's ``node``, ``element``, ``el_pos``, ``ref_node``) as a
    point-electrode :class:`Mesh`, for comparisons against other FEM codes.

    ``ref_node`` (the grounded node) defaults, as in pyEIT, to the lowest-numbered node
    that is not an electrode; electrode voltage differences do not depend on it."""
    nodes = np.asarray(nodes, dtype=np.float64)
    if nodes.ndim == 2 and nodes.shape[1] == 3:
        nodes = nodes[:, :2]
    electrode_nodes = np.asarray(electrode_nodes, dtype=np.int64).reshape(-1)
    if len(np.unique(electrode_nodes)) != len(electrode_nodes):
        raise InputError("electrode node indices must be distinct")
    if ref_node is None:
        free = np.setdiff1d(np.arange(len(nodes)), electrode_nodes)
        if free.size == 0:
            raise InputError("every node is an electrode; no node is left to ground")
        ref_node = int(free[0])
    return Mesh(nodes, np.asarray(elements), tuple(np.array([e]) for e in electrode_nodes),
                electrode_model="point", ref_node=int(ref_node), description="wrapped")
