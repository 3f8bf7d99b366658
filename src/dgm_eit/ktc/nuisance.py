"""Errors the real tank has and the simulation's model lacks, drawn anew for every simulated
sample so that training and validation data carry them (issue 20, item 1).

``[tank]`` keys, each 0 = off (the data of a study made before them):

- ``electrode_shift`` (m): the electrodes' places along the wall, a smooth random pattern
  (harmonics 0-2 of the angle: a turn, a crowding to one side, to two sides) of this rms.
  The empty tank's frame ``ref.mat`` fits best with shifts of rms 4.3 mm, 90% of their
  square in harmonics 0-2 (``benchmarks/ktc_model_error.py reference``);
- ``contact_max`` (Ohm m): each electrode's contact impedance, log-uniform between the fitted
  one and this (the same fit per electrode: mostly 1e-4 to 1e-3, a few near 1e-8);
- ``drift_std`` (at most 0.1): the water's conductivity changes by this relative std between
  the reference frame and the target's (temperature; the water level the objects raise).

A sample's two frames share its electrodes and contact impedances; its drift is the target
frame's alone. The draws come from their own generator, so the phantom, noise and level of
sample ``(seed, split, index)`` are those of the same data set without nuisances: the two are
paired.
"""

from __future__ import annotations

import numpy as np

from dgm_eit.datasets import ktc2023 as ktc
from dgm_eit.errors import InputError

KEYS = ("electrode_shift", "contact_max", "drift_std")
HARMONICS = 2
MAX_DRIFT_STD = 0.1
# the nuisance draws' generator: stream 1 of the sample's seed sequence (0 draws its phantom)
STREAM = 1


def check(tank: dict) -> dict[str, float]:
    """The nuisance keys of a ``[tank]`` section as floats, each >= 0."""
    out = {}
    for key in KEYS:
        value = tank[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise InputError(f"tank.{key} must be a number >= 0 (0: off), got {value!r}")
        out[key] = float(value)
    if out["drift_std"] > MAX_DRIFT_STD:
        raise InputError(f"tank.drift_std must be at most {MAX_DRIFT_STD} (a relative change of the water), "
                         f"got {out['drift_std']}")
    return out


def describe(tank: dict) -> str:
    """One sentence on the nuisances a ``[tank]`` section makes its simulated data carry."""
    from dgm_eit.config import with_added_keys

    s = check(with_added_keys({"tank": tank})["tank"])
    parts = []
    if s["electrode_shift"] > 0:
        parts.append("the electrodes' places shifted by a smooth random pattern of rms "
                     f"{s['electrode_shift'] * 1e3:g} mm")
    if s["contact_max"] > 0:
        parts.append(f"contact impedances log-uniform from the fitted one to {s['contact_max']:g} Ohm m")
    if s["drift_std"] > 0:
        parts.append(f"the water's conductivity changed by {s['drift_std']:.1%} (std) between the reference frame and "
                     "the target's")
    if not parts:
        return ("Simulated data carry no model error beyond the finer mesh that makes them (`tank.electrode_shift`, "
                "`contact_max`, `drift_std` = 0)")
    return "Every simulated sample, for training and validation alike, draws its own nuisances: " + "; ".join(parts)


def electrode_centres(n: int) -> np.ndarray:
    """The tank's electrode centre angles (radians): electrode 1 at 90 degrees, counter-clockwise."""
    return ktc.FIRST_ELECTRODE_ANGLE + 2 * np.pi * np.arange(n) / n


def moved_electrodes(mesh, shifts: np.ndarray, widths: np.ndarray | None = None):
    """``mesh`` with electrode ``l`` turned by ``shifts[l]`` radians (its arc scaled by
    ``widths[l]``): wall nodes between two electrodes follow them linearly, interior nodes with
    the weight ``(r / R)^4``. The triangulation is kept, so voltages are smooth in the shifts."""
    from dgm_eit.physics.mesh import Mesh

    n = mesh.n_electrodes
    centres = electrode_centres(n)
    theta = np.arctan2(mesh.nodes[:, 1], mesh.nodes[:, 0])
    r = np.hypot(*mesh.nodes.T)
    position = np.mod(theta - centres[0], 2 * np.pi) / (2 * np.pi / n)
    k = np.floor(position).astype(int) % n
    f = position - np.floor(position)
    moved = theta + ((1 - f) * shifts[k] + f * shifts[(k + 1) % n]) * (r / ktc.TANK_RADIUS) ** 4
    for l, nodes in enumerate(mesh.electrode_nodes):
        offset = np.angle(np.exp(1j * (theta[nodes] - centres[l])))
        moved[nodes] = centres[l] + shifts[l] + offset * (1.0 if widths is None else widths[l])
    return Mesh(np.stack([r * np.cos(moved), r * np.sin(moved)], 1), mesh.elements, mesh.electrode_nodes,
                electrode_model="cem", electrode_edges=mesh.electrode_edges, ref_node=mesh.ref_node,
                description="tank, electrodes moved", radius=ktc.TANK_RADIUS)


class Nuisances:
    """The nuisance draws of one ``[tank]`` config and the difference voltages they give."""

    def __init__(self, tank, settings: dict[str, float], quad_points: np.ndarray, quadrature: int):
        """``quad_points``: the quadrature points of the tank's fine mesh, made with ``quadrature``
        (a mesh with moved electrodes gets its own)."""
        self.tank, self.quad_points, self.quadrature = tank, quad_points, quadrature
        self.shift, self.contact_max, self.drift_std = (settings[k] for k in KEYS)
        if 0 < self.contact_max <= tank.contact_impedance:
            raise InputError(f"tank.contact_max = {self.contact_max:g} must exceed the fitted contact impedance "
                             f"{tank.contact_impedance:g} Ohm m (or be 0: off)")
        n = tank.fine.mesh.n_electrodes
        angles = electrode_centres(n)
        k = np.arange(1, HARMONICS + 1)[:, None]
        # columns 1, sqrt(2) cos(k theta), sqrt(2) sin(k theta), each of mean square 1 over the
        # electrodes: coefficients of std s / sqrt(columns) give shifts of rms s
        self._basis = np.concatenate([np.ones((1, n)), np.sqrt(2) * np.cos(k * angles),
                                      np.sqrt(2) * np.sin(k * angles)]).T

    @property
    def active(self) -> bool:
        return self.shift > 0 or self.contact_max > 0 or self.drift_std > 0

    def draw(self, rng: np.random.Generator) -> dict:
        """One sample's nuisances: electrode shifts (radians), contact impedances, drift."""
        n = self._basis.shape[0]
        coefficients = rng.standard_normal(self._basis.shape[1]) * self.shift / np.sqrt(self._basis.shape[1])
        z0 = self.tank.contact_impedance
        log_z = rng.uniform(np.log(z0), np.log(max(self.contact_max, z0)), n)
        return {"shifts": self._basis @ coefficients / ktc.TANK_RADIUS, "contact_impedance": np.exp(log_z),
                "drift": float(self.drift_std * rng.standard_normal())}

    def difference(self, phantom, rng: np.random.Generator) -> np.ndarray:
        """Clean difference voltages ``U_target - U_ref`` of ``phantom`` in a tank with the
        nuisances drawn from ``rng``."""
        from dgm_eit.data.phantoms import element_quadrature_points
        from dgm_eit.physics import ForwardModel

        draw = self.draw(rng)
        model, points, u_water = self.tank.fine, self.quad_points, self.tank.u_water
        water = np.full(model.mesh.n_elements, self.tank.sigma_bg)
        mesh = model.mesh
        if self.shift > 0:   # moved electrodes: a mesh of their own, and its quadrature
            mesh = moved_electrodes(mesh, draw["shifts"])
            points = element_quadrature_points(mesh.nodes / ktc.TANK_RADIUS, mesh.elements, self.quadrature)
        if self.shift > 0 or self.contact_max > 0:   # a drift alone keeps the tank's model and empty frame
            model = ForwardModel(mesh, model.protocol, electrode_model="cem",
                                 contact_impedance=draw["contact_impedance"])
            u_water = model.forward(water)
        return model.forward(water * (1 + draw["drift"]) * phantom.on_elements(points)) - u_water
