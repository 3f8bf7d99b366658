"""Analytic phantoms: anomalies (circles, ellipses) on a constant background in the unit disk.

A :class:`Phantom` is exact geometry, so it can be evaluated anywhere: on the quadrature
points of a simulation mesh (the conductivity that makes the voltages) and on the pixel
centres of the image grid (the ground truth a model learns), without interpolating one
discretisation onto the other.

* Mesh elements get the **area fraction** average of the phantom over ``k^2`` equal
  sub-triangles (``k`` = ``phantom.quadrature``); an element cut by an anomaly's edge gets
  a blend instead of a staircase, which makes the simulated voltages converge with mesh size.
* Pixels are sampled at their **centres** by default (``phantom.supersample = 1``): the
  paper's ground truth is piecewise constant, and a pixel then holds exactly one of the
  phantom's values. ``supersample = s`` averages ``s x s`` points per pixel (anti-aliased
  edges). Pixels whose centre lies outside the unit disk are 0.

Sampling (:class:`PhantomSampler`) follows the paper: ``data.anomalies`` circles with the
paper's conductivities (2: 0.5, 1.5; 4: 0.01, 0.1, 0.5, 1.5), radii uniform in
``[radius_min, radius_max]``, centres uniform in the disk of radius ``centre_max``, no two
anomalies closer than ``gap`` (ellipses: their bounding circles). Placement is rejection
sampling with a bounded budget; parameters under which the anomalies cannot be placed
raise :class:`~dgm_eit.errors.InputError`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from dgm_eit.errors import InputError

KINDS = ("circles", "ellipses", "random")

# The paper's two data sets: conductivity of each anomaly, in placement order.
PAPER_CONDUCTIVITIES = {2: (0.5, 1.5), 4: (0.01, 0.1, 0.5, 1.5)}

# A placement that keeps colliding restarts from an empty phantom after this many draws
# for one anomaly, so an unlucky early anomaly cannot block the rest forever.
_DRAWS_BEFORE_RESTART = 100


@dataclass(frozen=True)
class Anomaly:
    """An ellipse (a circle when ``a == b``) of constant conductivity ``value``.

    ``a``, ``b``: semi-axes; ``angle``: rotation of the ``a`` axis from the x axis (radians).
    """

    cx: float
    cy: float
    a: float
    b: float
    angle: float
    value: float

    @property
    def bounding_radius(self) -> float:
        return max(self.a, self.b)

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        dx, dy = x - self.cx, y - self.cy
        if self.a == self.b:
            return dx * dx + dy * dy <= self.a * self.a
        c, s = math.cos(self.angle), math.sin(self.angle)
        u = (c * dx + s * dy) / self.a
        w = (-s * dx + c * dy) / self.b
        return u * u + w * w <= 1.0


@dataclass(frozen=True)
class Phantom:
    """Non-overlapping anomalies on a constant background inside the unit disk."""

    anomalies: tuple[Anomaly, ...]
    background: float = 1.0

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Conductivity at points ``(x, y)`` (any equal shapes); 0 outside the unit disk."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        values = self._unclipped(x, y)
        values[x * x + y * y > 1.0] = 0.0
        return values

    def _unclipped(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        values = np.full(np.broadcast(x, y).shape, self.background, dtype=np.float64)
        for anomaly in self.anomalies:
            values[anomaly.contains(x, y)] = anomaly.value
        return values

    def on_elements(self, quad_points: np.ndarray) -> np.ndarray:
        """Element values from :func:`element_quadrature_points` ``(m, q, 2)`` -> ``(m,)``.

        The mesh is the domain: no point of it gets the outside value 0, even where
        rounding puts a boundary node a hair outside the unit circle.
        """
        values = self._unclipped(quad_points[..., 0], quad_points[..., 1])
        return values.mean(axis=-1)

    def rasterise(self, size: int, supersample: int = 1, inside: np.ndarray | None = None) -> np.ndarray:
        """``(size, size)`` float64 image on ``[-1, 1]^2``, row 0 at the top (y up), 0 outside.

        ``inside`` (the grid's disk mask) overrides the default test "pixel centre in
        the closed unit disk", so truth and model images share one mask.
        """
        xs, ys = _pixel_sample_points(size, supersample)
        values = self._unclipped(xs, ys)
        # Sub-samples outside the disk in a boundary pixel must not pull its value towards
        # 0: average over the sub-samples inside only (all of them if none is inside and
        # the mask still keeps the pixel).
        in_disk = xs * xs + ys * ys <= 1.0
        counts = in_disk.sum(axis=-1)
        image = np.where(counts > 0, (values * in_disk).sum(axis=-1) / np.maximum(counts, 1), values.mean(axis=-1))
        if inside is None:
            inside = disk_mask(size)
        elif inside.shape != (size, size):
            raise InputError(f"disk mask has shape {inside.shape}, expected {(size, size)}")
        return np.where(inside, image, 0.0)


def pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(x, y)``, each ``(size, size)``: row 0 is the top (y = +1 side)."""
    c = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    x, y = np.meshgrid(c, -c)
    return x, y


def disk_mask(size: int) -> np.ndarray:
    """``(size, size)`` bool: the pixels whose centre lies in the closed unit disk (the rule of
    ``PixelGrid.inside``, for images of the square the disk fills)."""
    x, y = pixel_centres(size)
    return x * x + y * y <= 1.0


@functools.lru_cache(maxsize=8)
def _pixel_sample_points(size: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    """``(size, size, s*s)`` sample coordinates: the centres of an ``s x s`` split of each pixel."""
    if supersample < 1:
        raise InputError(f"phantom.supersample must be >= 1, got {supersample}")
    x, y = pixel_centres(size)
    pitch = 2.0 / size
    offsets = ((np.arange(supersample) + 0.5) / supersample - 0.5) * pitch
    ox, oy = np.meshgrid(offsets, offsets)
    xs = x[..., None] + ox.reshape(-1)
    ys = y[..., None] + oy.reshape(-1)
    xs.setflags(write=False)
    ys.setflags(write=False)
    return xs, ys


def element_quadrature_points(nodes: np.ndarray, elements: np.ndarray, k: int = 4) -> np.ndarray:
    """``(m, k*k, 2)`` centroids of the ``k^2`` equal-area sub-triangles of every element.

    Their mean of an indicator function is the area fraction of the element it covers,
    up to the sub-triangle resolution.
    """
    if k < 1:
        raise InputError(f"phantom.quadrature must be >= 1, got {k}")
    bary = []
    for i in range(k):
        for j in range(k - i):
            bary.append(((i + 1 / 3) / k, (j + 1 / 3) / k))  # upward sub-triangles
            if i + j <= k - 2:
                bary.append(((i + 2 / 3) / k, (j + 2 / 3) / k))  # downward ones
    lam = np.array(bary)  # weights of vertices 1 and 2
    weights = np.column_stack([1.0 - lam.sum(axis=1), lam])  # (q, 3)
    corners = np.asarray(nodes, dtype=np.float64)[np.asarray(elements)]  # (m, 3, 2)
    return np.einsum("qv,mvd->mqd", weights, corners)


class PhantomSampler:
    """Draws phantoms from the ``[phantom]`` config section and ``data.anomalies``.

    ``kind``:
      * ``circles`` (the paper): ``data.anomalies`` circles, conductivities from
        ``phantom.conductivities`` or, when that list is empty, the paper's values.
      * ``ellipses``: the same counts and values; semi-major axis ``a`` uniform in
        ``[radius_min, radius_max]``, ``b = a * U(aspect_min, 1)``, random orientation.
      * ``random``: ``U{count_min..count_max}`` anomalies, each a circle or an ellipse
        with equal probability, conductivity log-uniform in ``[sigma_min, sigma_max]``.
    """

    def __init__(self, phantom_cfg: dict, anomalies: int):
        p = phantom_cfg
        self.kind = p["kind"]
        if self.kind not in KINDS:
            raise InputError(f"phantom.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        self.background = float(p["background"])
        self.radius_min = float(p["radius_min"])
        self.radius_max = float(p["radius_max"])
        self.centre_max = float(p["centre_max"])
        self.gap = float(p["gap"])
        self.aspect_min = float(p["aspect_min"])
        self.count_min = int(p["count_min"])
        self.count_max = int(p["count_max"])
        self.sigma_min = float(p["sigma_min"])
        self.sigma_max = float(p["sigma_max"])
        self.max_tries = int(p["max_tries"])
        if self.background <= 0:
            raise InputError(f"phantom.background must be positive, got {self.background}")
        if not 0 < self.radius_min <= self.radius_max:
            raise InputError(f"need 0 < phantom.radius_min <= phantom.radius_max, got {self.radius_min}, {self.radius_max}")
        if self.centre_max < 0:
            raise InputError(f"phantom.centre_max must be >= 0, got {self.centre_max}")
        if self.centre_max + self.radius_max > 1.0 + 1e-12:
            raise InputError(f"anomalies would cross the boundary: phantom.centre_max + phantom.radius_max = "
                             f"{self.centre_max + self.radius_max:g} > 1")
        if self.gap < 0:
            raise InputError(f"phantom.gap must be >= 0, got {self.gap}")
        if not 0 < self.aspect_min <= 1:
            raise InputError(f"phantom.aspect_min must be in (0, 1], got {self.aspect_min}")
        if self.max_tries < 1:
            raise InputError(f"phantom.max_tries must be >= 1, got {self.max_tries}")
        if self.kind == "random":
            if not 0 <= self.count_min <= self.count_max:
                raise InputError(f"need 0 <= phantom.count_min <= phantom.count_max, got {self.count_min}, {self.count_max}")
            if not 0 < self.sigma_min <= self.sigma_max:
                raise InputError(f"need 0 < phantom.sigma_min <= phantom.sigma_max, got {self.sigma_min}, {self.sigma_max}")
            self.values: tuple[float, ...] = ()
        else:
            if anomalies < 0:
                raise InputError(f"data.anomalies must be >= 0, got {anomalies}")
            values = tuple(float(s) for s in p["conductivities"])
            if not values:
                if anomalies not in PAPER_CONDUCTIVITIES:
                    raise InputError(f"data.anomalies={anomalies}: the paper defines conductivities for 2 or 4 "
                                     f"anomalies only; set phantom.conductivities to a list of {anomalies} values")
                values = PAPER_CONDUCTIVITIES[anomalies]
            if len(values) != anomalies:
                raise InputError(f"phantom.conductivities has {len(values)} values but data.anomalies={anomalies}")
            if any(s <= 0 for s in values):
                raise InputError(f"phantom.conductivities must be positive, got {list(values)}")
            self.values = values
        largest = self.count_max if self.kind == "random" else len(self.values)
        self._check_room(largest)

    def _check_room(self, count: int) -> None:
        """Refuse counts that cannot fit even in the best arrangement."""
        if not centres_fit(count, self.radius_min, self.gap, self.centre_max):
            raise InputError(f"{count} anomalies of radius >= {self.radius_min:g} with gap {self.gap:g} cannot fit "
                             f"with centres within {self.centre_max:g} of the origin")

    def sample(self, rng: np.random.Generator) -> Phantom:
        if self.kind == "random":
            count = int(rng.integers(self.count_min, self.count_max + 1))
            values = np.exp(rng.uniform(math.log(self.sigma_min), math.log(self.sigma_max), size=count))
            shapes = ["ellipse" if e else "circle" for e in rng.random(count) < 0.5]
        else:
            values = self.values
            shapes = ["circle" if self.kind == "circles" else "ellipse"] * len(values)
        return Phantom(tuple(self._place(rng, list(values), shapes)), self.background)

    def _draw(self, rng: np.random.Generator, value: float, shape: str) -> Anomaly:
        # uniform over the disk of radius centre_max (sqrt for the area element)
        rho = self.centre_max * math.sqrt(rng.random())
        phi = 2 * math.pi * rng.random()
        a = rng.uniform(self.radius_min, self.radius_max)
        if shape == "circle":
            b, angle = a, 0.0
        else:
            b = a * rng.uniform(self.aspect_min, 1.0)
            angle = math.pi * rng.random()
        return Anomaly(rho * math.cos(phi), rho * math.sin(phi), float(a), float(b), float(angle), float(value))

    def _place(self, rng: np.random.Generator, values: list[float], shapes: list[str]) -> list[Anomaly]:
        failure = (f"could not place {len(values)} non-overlapping anomalies (radius {self.radius_min:g}-"
                   f"{self.radius_max:g}, gap {self.gap:g}, centres within {self.centre_max:g}) in "
                   f"{self.max_tries} tries (phantom.max_tries); use fewer or smaller anomalies")
        draws = [functools.partial(self._draw, value=value, shape=shape) for value, shape in zip(values, shapes)]
        return place_apart(rng, draws, self.gap, self.max_tries, failure)


def place_apart(rng: np.random.Generator, draws: list, gap: float, max_tries: int, failure: str,
                fits=lambda obj: True) -> list:
    """Rejection placement: each ``draws[k](rng)`` is redrawn until the object ``fits`` and lies
    ``gap`` apart from those placed (bounding circles). An object that finds no room in
    ``_DRAWS_BEFORE_RESTART`` draws restarts the phantom; ``InputError(failure)`` after
    ``max_tries`` draws in all."""
    total = 0
    while True:
        placed: list = []
        for draw in draws:
            for _ in range(_DRAWS_BEFORE_RESTART):
                total += 1
                if total > max_tries:
                    raise InputError(failure)
                candidate = draw(rng)
                if fits(candidate) and all(_apart(candidate, other, gap) for other in placed):
                    placed.append(candidate)
                    break
            else:
                break  # this object found no room: restart the phantom
        if len(placed) == len(draws):
            return placed


def centres_fit(count: int, radius: float, gap: float, R: float) -> bool:
    """Whether ``count`` centres at least ``2 radius + gap`` apart fit in a disk of radius ``R``."""
    if count <= 1:
        return True
    # The largest possible spacing D for n points in a disk is known for n <= 7 (R times 2,
    # sqrt 3, sqrt 2, 2 sin 36deg, 1, 1); beyond, disks of radius D/2 around the centres are
    # disjoint inside a disk of radius R + D/2.
    need = 2 * radius + gap
    best = {2: 2.0, 3: math.sqrt(3), 4: math.sqrt(2), 5: 2 * math.sin(math.pi / 5), 6: 1.0, 7: 1.0}
    if count in best:
        return need <= best[count] * R + 1e-12
    return count * (need / 2) ** 2 <= (R + need / 2) ** 2


def _apart(p, q, gap: float) -> bool:
    distance = math.hypot(p.cx - q.cx, p.cy - q.cy)
    return distance >= p.bounding_radius + q.bounding_radius + gap


def phantom_sampler(cfg: dict) -> PhantomSampler:
    """The sampler of a resolved config (``[phantom]`` and ``data.anomalies``)."""
    return PhantomSampler(cfg["phantom"], int(cfg["data"]["anomalies"]))
