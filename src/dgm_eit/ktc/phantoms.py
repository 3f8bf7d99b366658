"""Random phantoms of the KTC2023 water tank: plastic and metal objects in saline water.

The KTC2023 targets are circles, irregular polygons, rotated squares/rectangles and a
plus-shaped cross, each either plastic (much less conductive than the water) or metal
(much more). :class:`KTCPhantomSampler` draws 1..n such objects, so a model trained on
them has seen every kind of target, not only the paper's circles. Values are relative
conductivities ``sigma / sigma_water`` (background 1.0) on the unit disk (tank radius
normalised to 1), so one data set serves any water conductivity.

Every shape is exact geometry with the attributes :class:`~dgm_eit.data.phantoms.Phantom`
needs (``cx, cy, value, bounding_radius``, vectorised ``contains``), so mesh elements and
pixels are evaluated as for the paper's phantoms. The drawn size of an object is the
radius of its bounding circle, so ``gap`` and ``rim`` hold for every shape alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from dgm_eit.config import check_int
from dgm_eit.data.phantoms import Anomaly, Phantom, centres_fit, pixel_centres, place_apart
from dgm_eit.errors import InputError

SHAPES = ("circle", "ellipse", "rectangle", "polygon", "cross")



@dataclass(frozen=True)
class Polygon:
    """A simple polygon (convex or not) of constant ``value``; ``vertices`` in order."""

    vertices: tuple[tuple[float, float], ...]
    value: float

    @property
    def cx(self) -> float:
        return float(np.mean([v[0] for v in self.vertices]))

    @property
    def cy(self) -> float:
        return float(np.mean([v[1] for v in self.vertices]))

    @property
    def bounding_radius(self) -> float:
        cx, cy = self.cx, self.cy
        return max(math.hypot(x - cx, y - cy) for x, y in self.vertices)

    @property
    def area(self) -> float:
        return _shoelace(np.asarray(self.vertices, dtype=np.float64))

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        # crossing number: a ray towards +x crosses the boundary an odd number of times
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        inside = np.zeros(np.broadcast(x, y).shape, dtype=bool)
        n = len(self.vertices)
        for i in range(n):
            (x1, y1), (x2, y2) = self.vertices[i], self.vertices[(i + 1) % n]
            if y1 == y2:
                continue  # a horizontal edge is never crossed by a horizontal ray
            straddles = (y1 > y) != (y2 > y)
            inside ^= straddles & (x < x1 + (y - y1) * ((x2 - x1) / (y2 - y1)))
        return inside


@dataclass(frozen=True)
class Cross:
    """A plus sign: two perpendicular bars ``length x width`` centred at ``(cx, cy)``."""

    cx: float
    cy: float
    length: float
    width: float
    angle: float
    value: float

    @property
    def bounding_radius(self) -> float:
        # the bar corners, not the bar ends, are farthest from the centre
        return math.hypot(self.length, self.width) / 2

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        dx, dy = x - self.cx, y - self.cy
        c, s = math.cos(self.angle), math.sin(self.angle)
        u, w = np.abs(c * dx + s * dy), np.abs(-s * dx + c * dy)
        half_l, half_w = self.length / 2, self.width / 2
        return ((u <= half_l) & (w <= half_w)) | ((w <= half_l) & (u <= half_w))


def _shoelace(v: np.ndarray) -> float:
    x, y = v[:, 0], v[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _rotated(points: np.ndarray, angle: float, cx: float, cy: float) -> tuple[tuple[float, float], ...]:
    c, s = math.cos(angle), math.sin(angle)
    xy = points @ np.array([[c, s], [-s, c]]) + (cx, cy)
    return tuple((float(px), float(py)) for px, py in xy)


class KTCPhantomSampler:
    """Draws :class:`Phantom` s of KTC-like objects from the ``[phantom]`` config section."""

    def __init__(self, p: dict):
        self.shapes = _shapes(p)
        self.count_min, self.count_max = _int(p, "count_min", 1), _int(p, "count_max", 1)
        self.size_min, self.size_max = _float(p, "size_min"), _float(p, "size_max")
        self.centre_max, self.gap, self.rim = _float(p, "centre_max"), _float(p, "gap"), _float(p, "rim")
        self.aspect_min, self.p_conductive = _float(p, "aspect_min"), _float(p, "p_conductive")
        self.resistive = _float(p, "resistive_min"), _float(p, "resistive_max")
        self.conductive = _float(p, "conductive_min"), _float(p, "conductive_max")
        self.max_tries = _int(p, "max_tries", 1)
        self.quadrature, self.supersample = _int(p, "quadrature", 1), _int(p, "supersample", 1)
        _order(p, "count_min", "count_max")
        if self.size_min <= 0:
            raise InputError(f"phantom.size_min must be > 0, got {self.size_min}")
        _order(p, "size_min", "size_max")
        for key in ("centre_max", "gap", "rim"):
            if getattr(self, key) < 0:
                raise InputError(f"phantom.{key} must be >= 0, got {getattr(self, key)}")
        if not 0 < self.aspect_min <= 1:
            raise InputError(f"phantom.aspect_min must be in (0, 1], got {self.aspect_min}")
        if not 0 <= self.p_conductive <= 1:
            raise InputError(f"phantom.p_conductive must be in [0, 1], got {self.p_conductive}")
        if self.resistive[0] <= 0:
            raise InputError(f"phantom.resistive_min must be > 0, got {self.resistive[0]}")
        if self.resistive[1] >= 1:
            raise InputError(f"phantom.resistive_max must be < 1 (less than water), got {self.resistive[1]}")
        _order(p, "resistive_min", "resistive_max")
        if self.conductive[0] <= 1:
            raise InputError(f"phantom.conductive_min must be > 1 (more than water), got {self.conductive[0]}")
        _order(p, "conductive_min", "conductive_max")
        # |c| + r <= 1 - rim: even the smallest object at the centre must leave room
        self.room = 1.0 - self.rim - self.size_min
        if self.room <= 0:
            raise InputError(f"no object fits: phantom.size_min + phantom.rim = {self.size_min + self.rim:g} >= 1")
        if not centres_fit(self.count_max, self.size_min, self.gap, min(self.centre_max, self.room)):
            raise InputError(f"phantom.count_max = {self.count_max} objects of size >= {self.size_min:g} "
                             f"(phantom.size_min) with phantom.gap = {self.gap:g} cannot fit with centres within "
                             f"{min(self.centre_max, self.room):g} of the origin (phantom.centre_max, phantom.rim)")

    def sample(self, rng: np.random.Generator) -> Phantom:
        """A phantom that depends on the state of ``rng`` only."""
        count = int(rng.integers(self.count_min, self.count_max + 1))
        failure = (f"could not place {count} objects (phantom.size_min {self.size_min:g} .. size_max "
                   f"{self.size_max:g}, gap {self.gap:g}, rim {self.rim:g}, centre_max {self.centre_max:g}) "
                   f"in {self.max_tries} draws (phantom.max_tries); use fewer or smaller objects")
        placed = place_apart(rng, [self._draw] * count, self.gap, self.max_tries, failure,
                             fits=lambda obj: math.hypot(obj.cx, obj.cy) + obj.bounding_radius <= 1.0 - self.rim)
        return Phantom(tuple(placed), 1.0)

    def _draw(self, rng: np.random.Generator):
        # fixed order: class, shape, size, position, shape parameters, value
        conductive = rng.random() < self.p_conductive
        shape = self.shapes[int(rng.integers(len(self.shapes)))]
        r = float(rng.uniform(self.size_min, self.size_max))
        rho, phi = self.centre_max * math.sqrt(rng.random()), 2 * math.pi * rng.random()
        cx, cy = rho * math.cos(phi), rho * math.sin(phi)
        lo, hi = self.conductive if conductive else self.resistive
        if shape == "circle":
            obj = Anomaly(cx, cy, r, r, 0.0, 0.0)
        elif shape == "ellipse":
            b, angle = r * rng.uniform(self.aspect_min, 1.0), math.pi * rng.random()
            obj = Anomaly(cx, cy, r, float(b), angle, 0.0)
        elif shape == "rectangle":
            # corners on the bounding circle: half sides r cos t, r sin t with tan t = aspect
            t, angle = math.atan(rng.uniform(self.aspect_min, 1.0)), math.pi * rng.random()
            a, b = r * math.cos(t), r * math.sin(t)
            obj = Polygon(_rotated(np.array([[a, b], [-a, b], [-a, -b], [a, -b]]), angle, cx, cy), 0.0)
        elif shape == "polygon":
            obj = Polygon(_irregular(rng, r, cx, cy), 0.0)
        else:
            w, angle = rng.uniform(self.aspect_min / 2, self.aspect_min), 0.5 * math.pi * rng.random()
            length = 2 * r / math.sqrt(1 + w * w)  # so the bar corners lie on the bounding circle
            obj = Cross(cx, cy, length, float(w * length), angle, 0.0)
        return replace(obj, value=float(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def _irregular(rng: np.random.Generator, r: float, cx: float, cy: float) -> tuple[tuple[float, float], ...]:
    """3..6 vertices, jittered around equal angles: convex, irregular, never a sliver."""
    while True:
        n = int(rng.integers(3, 7))
        angles = 2 * math.pi * (rng.random() + (np.arange(n) + rng.uniform(-0.25, 0.25, n)) / n)
        radii = rng.uniform(0.7, 1.0, n)
        v = np.column_stack([radii * np.cos(angles), radii * np.sin(angles)])
        # the vertex centroid becomes (cx, cy) and the farthest vertex lies at r, so
        # the drawn size and position are those of the bounding circle, as for other shapes
        v -= v.mean(axis=0)
        v *= r / np.hypot(v[:, 0], v[:, 1]).max()
        if _shoelace(v) >= 0.3 * math.pi * r * r / 2:
            return tuple((float(x + cx), float(y + cy)) for x, y in v)


def _get(p: dict, key: str):
    if key not in p:
        raise InputError(f"phantom.{key} is missing")
    return p[key]


def _float(p: dict, key: str) -> float:
    value = _get(p, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"phantom.{key} must be a finite number, got {value!r}")
    return float(value)


def _int(p: dict, key: str, least: int) -> int:
    return check_int(_get(p, key), f"phantom.{key}", least)


def _order(p: dict, low: str, high: str) -> None:
    if p[low] > p[high]:
        raise InputError(f"need phantom.{low} <= phantom.{high}, got {p[low]} > {p[high]}")


def _shapes(p: dict) -> tuple[str, ...]:
    shapes = _get(p, "shapes")
    if isinstance(shapes, str) or not isinstance(shapes, (list, tuple)) or not shapes:
        raise InputError(f"phantom.shapes must be a non-empty list of {', '.join(SHAPES)}, got {shapes!r}")
    for name in shapes:
        if name not in SHAPES:
            raise InputError(f"phantom.shapes: unknown shape {name!r}; known: {', '.join(SHAPES)}")
    if len(set(shapes)) != len(shapes):
        raise InputError(f"phantom.shapes lists a shape twice: {list(shapes)}")
    return tuple(shapes)


def class_map(phantom: Phantom, size: int, inside: np.ndarray | None = None) -> np.ndarray:
    """``(size, size)`` uint8 at pixel centres: 0 water or outside, 1 resistive, 2 conductive."""
    image = phantom.rasterise(size, 1, inside)
    if inside is None:
        x, y = pixel_centres(size)
        inside = x * x + y * y <= 1.0
    classes = np.zeros((size, size), dtype=np.uint8)
    classes[inside & (image < 1.0)] = 1
    classes[inside & (image > 1.0)] = 2
    return classes


def phantom_sampler(cfg: dict) -> KTCPhantomSampler:
    """The sampler of a resolved config (its ``[phantom]`` section)."""
    return KTCPhantomSampler(cfg["phantom"])
