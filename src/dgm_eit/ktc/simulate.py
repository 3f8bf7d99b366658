"""Simulated training data for the KTC2023 tank (``dgm-eit simulate --profile ktc``).

:class:`KTCSimulator` is the tank's counterpart of :class:`dgm_eit.data.simulate.Simulator`
and runs in the same resumable, chunked pipeline (one generator per ``(seed, split, index)``,
so the file does not depend on workers or interruptions). One sample:

1. a phantom of resistive and conductive objects in water (:mod:`dgm_eit.ktc.phantoms`),
   drawn first from the sample's generator;
2. difference voltages ``U(sigma) - U(water)`` on the fine tank mesh (where ``[tank]`` sets
   them, in a tank with the sample's own electrode places, contact impedances and drift:
   :mod:`dgm_eit.ktc.nuisance`), plus Gaussian noise of the organisers' model fitted to the
   measured reference frame (:class:`~dgm_eit.ktc.tank.Tank`);
3. a difficulty level drawn from ``tank.train_levels``: its dropped measurements are set to 0
   in ``v`` and left out of the conditioning image;
4. arrays: ``sigma`` = the truth as relative conductivity clipped to [0, 2] (water 1,
   plastic ~0, metal 2) on the model grid, ``v``, ``v_clean``, and ``gn`` = the linearised
   difference image (the conditioning input of every model, as GN's image is in the paper's
   study), and where ``linear.extra_images`` lists them, ``gn_extra`` = the same step at
   other priors (extra input channels of the U-Net, as in KTC2023's winning design).

The linearised step's prior (std x correlation length) is chosen on the validation split by
the challenge's own score after threshold segmentation (:func:`tune_linear`), recorded in
the file's ``gn_settings`` attribute and used for every split.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from dgm_eit.datasets import ktc2023 as ktc
from dgm_eit.errors import InputError

SETTINGS_KIND = "ktc-linear"


def is_ktc(cfg: dict) -> bool:
    """A config of the tank study (it has a ``[tank]`` section)."""
    return isinstance(cfg.get("tank"), dict)


def check_levels(levels, name: str = "tank.train_levels") -> list[int]:
    if not (isinstance(levels, list) and levels and all(isinstance(k, int) and k in ktc.LEVELS for k in levels)):
        raise InputError(f"{name} must list levels among 1..7, got {levels!r}")
    return list(levels)


def linear_settings(cfg: dict) -> dict:
    """``[linear]`` as typed values (prior std, correlation length in metres)."""
    lin = cfg["linear"]
    return {"prior_std": float(lin["prior_std"]), "corr_length": float(lin["corr_length"])}


def extra_image_factors(cfg: dict) -> list[tuple[float, float]]:
    """``linear.extra_images``: ``(prior std factor, correlation length factor)`` pairs, each
    making one more linearised image with the chosen prior scaled by them."""
    from dgm_eit.config import with_added_keys

    pairs = with_added_keys(cfg)["linear"]["extra_images"]
    ok = isinstance(pairs, list) and all(
        isinstance(p, list) and len(p) == 2
        and all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in p) for p in pairs)
    if not ok:
        raise InputError("linear.extra_images must list [prior std factor, correlation length factor] pairs of "
                         f"positive numbers, got {pairs!r}")
    return [(float(a), float(b)) for a, b in pairs]


def apply_linear_settings(cfg: dict, settings: dict) -> dict:
    """A copy of ``cfg`` whose ``[linear]`` holds the chosen prior, with nothing left to tune."""
    import copy

    out = copy.deepcopy(cfg)
    if settings:
        out["linear"].update(prior_std=float(settings["prior_std"]), corr_length=float(settings["corr_length"]),
                             tune_prior_std=[], tune_corr_length=[])
    return out


class KTCSimulator:
    """Everything mesh-dependent for one tank config, built once per process (registered with
    :mod:`dgm_eit.simulators` for configs with ``[tank]`` by :mod:`dgm_eit.ktc`)."""

    data_sections = ("data", "phantom", "tank", "linear")
    apply_settings = staticmethod(apply_linear_settings)

    @staticmethod
    def check_config(cfg: dict, seed: int) -> None:
        from dgm_eit.data.storage import sample_rng
        from dgm_eit.ktc.phantoms import phantom_sampler

        sampler = phantom_sampler(cfg)
        for index in range(3):
            sampler.sample(sample_rng(seed, "train", index))
        check_levels(cfg["tank"]["train_levels"])
        extra_image_factors(cfg)
        if cfg["linear"]["tune_prior_std"] and int(cfg["data"]["n_val"]) < 1:
            raise InputError("tuning the linearised step (linear.tune_prior_std) needs data.n_val >= 1")

    def __init__(self, cfg: dict):
        from dgm_eit.config import with_added_keys
        from dgm_eit.data.phantoms import element_quadrature_points
        from dgm_eit.ktc import nuisance
        from dgm_eit.ktc.phantoms import phantom_sampler
        from dgm_eit.ktc.tank import Tank, level_masks

        self.cfg = cfg
        self.sampler = phantom_sampler(cfg)
        self.tank = Tank(cfg)
        self.image_size = int(cfg["data"]["image_size"])
        self.n_meas = self.tank.n_meas
        self.levels = check_levels(cfg["tank"]["train_levels"])
        self.masks = level_masks(self.tank.ref.injections, self.tank.ref.pattern)
        p = cfg["phantom"]
        self.supersample = int(p["supersample"])
        mesh = self.tank.fine.mesh
        self.quad_points = element_quadrature_points(mesh.nodes / ktc.TANK_RADIUS, mesh.elements,
                                                     int(p["quadrature"]))
        self.inside = np.asarray(self.tank.grid.inside, dtype=bool)
        self.nuisances = nuisance.Nuisances(self.tank, nuisance.check(with_added_keys(cfg)["tank"]),
                                            self.quad_points, int(p["quadrature"]))
        self.extra_factors = extra_image_factors(cfg)
        self.extra_images = len(self.extra_factors)
        self._recon, self._extra_recons = None, None

    @property
    def recon(self):
        from dgm_eit.ktc.tank import DifferenceReconstructor

        if self._recon is None:
            s = linear_settings(self.cfg)
            self._recon = DifferenceReconstructor(self.tank, s["prior_std"], s["corr_length"])
        return self._recon

    def extra(self, dv: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """The linearised images at the ``linear.extra_images`` priors: (K, H, W) for one
        measurement, (N, K, H, W) for rows of ``dv`` and ``masks``."""
        from dgm_eit.ktc.tank import DifferenceReconstructor

        if self._extra_recons is None:
            s = linear_settings(self.cfg)
            self._extra_recons = [DifferenceReconstructor(self.tank, s["prior_std"] * a, s["corr_length"] * b)
                                  for a, b in self.extra_factors]
        if np.ndim(dv) == 1:
            return np.stack([r.linear(dv, masks) for r in self._extra_recons])
        return np.stack([self.extra(d, m) for d, m in zip(dv, masks)])

    def phantom(self, seed: int, split: str, index: int):
        from dgm_eit.data.storage import sample_rng

        rng = sample_rng(seed, split, index)
        return rng, self.sampler.sample(rng)

    def truth_classes(self, seed: int, split: str, index: int, size: int = ktc.IMAGE_SIZE) -> np.ndarray:
        """The sample's three-class truth on the challenge's 256 x 256 grid."""
        from dgm_eit.ktc.phantoms import class_map

        return class_map(self.phantom(seed, split, index)[1], size)

    def measure(self, seed: int, split: str, index: int) -> dict[str, np.ndarray]:
        from dgm_eit.data.storage import sample_rng
        from dgm_eit.ktc.nuisance import STREAM

        rng, phantom = self.phantom(seed, split, index)
        if self.nuisances.active:
            v_clean = self.nuisances.difference(phantom, sample_rng(seed, split, index, STREAM))
        else:
            sigma = self.tank.sigma_bg * phantom.on_elements(self.quad_points)
            v_clean = self.tank.fine.forward(sigma) - self.tank.u_water
        v = v_clean + self.tank.noise_std * rng.standard_normal(self.n_meas)
        level = int(self.levels[rng.integers(len(self.levels))])
        mask = self.masks[level]
        v = np.where(mask, v, 0.0)
        target = np.clip(phantom.rasterise(self.image_size, self.supersample, inside=self.inside), 0.0, 2.0)
        return {"sigma": target, "v": v, "v_clean": v_clean, "mask": mask}

    def sample(self, seed: int, split: str, index: int) -> dict[str, np.ndarray]:
        out = self.measure(seed, split, index)
        mask = out.pop("mask")
        out["gn"] = self.recon.linear(out["v"], mask)
        if self.extra_images:
            out["gn_extra"] = self.extra(out["v"], mask)
        return out

    def chunk(self, seed: int, split: str, start: int, stop: int) -> dict[str, np.ndarray]:
        from dgm_eit.data import storage

        return storage.stack_chunk([self.sample(seed, split, i) for i in range(start, stop)], seed, split, start)

    def gn_settings(self, seed: int, log: Callable[[str], None] | None = None) -> dict:
        """The linearised step's prior, chosen on the validation split (see :func:`tune_linear`)."""
        from threadpoolctl import threadpool_limits

        lin = self.cfg["linear"]
        stds = [float(s) for s in lin["tune_prior_std"]] or [float(lin["prior_std"])]
        lengths = [float(c) for c in lin["tune_corr_length"]] or [float(lin["corr_length"])]
        n = min(int(lin["tune_images"]), int(self.cfg["data"]["n_val"]))
        record = {"kind": SETTINGS_KIND, **linear_settings(self.cfg), "tuned": len(stds) * len(lengths) > 1,
                  "mesh_h0": self.tank.h0, "mesh_nodes": int(self.tank.coarse.mesh.n_nodes),
                  "tank": self.tank.describe(), "background": self.tank.sigma_bg,
                  "contact_impedance": self.tank.contact_impedance, "fit_residual": float(self.tank.fit.residual)}
        if not record["tuned"]:
            return record
        if n < 1:
            raise InputError("tuning the linearised step (linear.tune_prior_std) needs validation images: "
                             "set data.n_val >= 1")
        started = time.perf_counter()
        with threadpool_limits(1):
            val = [self.measure(seed, "val", i) for i in range(n)]
            truths = np.stack([self.truth_classes(seed, "val", i) for i in range(n)])
            best = tune_linear(self.tank, val, truths, stds, lengths)
        record.update(prior_std=best["prior_std"], corr_length=best["corr_length"], val_score=best["score"],
                      low=best["low"], high=best["high"], tuned_on=f"val[:{n}]", candidates=best["candidates"])
        if log is not None:
            log(f"linearised step tuned on {n} validation images in {time.perf_counter() - started:.0f} s: prior std "
                f"{best['prior_std']:g}, correlation length {best['corr_length']:g} m (val score {best['score']:.3f})")
        return record


def tune_linear(tank, val: list[dict], truths: np.ndarray, stds, lengths) -> dict:
    """Best prior (std x correlation length) of the linearised step by the mean challenge score
    on ``val`` (its thresholds tuned for each candidate, the same rule as every method's)."""
    from dgm_eit.ktc.segment import tune_thresholds, upsample
    from dgm_eit.ktc.tank import DifferenceReconstructor

    rows = []
    for length in lengths:
        for std in stds:
            rec = DifferenceReconstructor(tank, std, length)
            images = np.stack([rec.linear(s["v"], s["mask"]) for s in val])
            seg = tune_thresholds(upsample(images), truths)
            rows.append({"prior_std": std, "corr_length": length, "score": seg["score"], "low": seg["low"],
                         "high": seg["high"]})
    best = max(rows, key=lambda r: r["score"])
    return {**best, "candidates": rows}
