"""Choosing Gauss-Newton's regularisation on a validation split.

A baseline is only fair when its settings get the same care as the models it is compared
with: every data set chooses its GN weight ``lam`` (and iteration count) by a small grid
search on its own validation images, never on the test split. ``[gn]`` holds the grid:

- ``tune_lam``: factors applied to the configured weight (``gn.lam``, already scaled to the
  data's noise level by :func:`gn_config`); ``[]`` switches tuning off;
- ``tune_iters``: iteration counts tried (``[]``: ``gn.max_iter`` only);
- ``tune_images``: validation images scored (the first ones of the split).

The score is the mean image MSE against the ground truth on the pixel grid, the metric the
report ranks methods by. Ties go to the first candidate in grid order.
"""

from __future__ import annotations

import numpy as np

from dgm_eit.errors import InputError


def tuning_grid(cfg: dict) -> tuple[list[float], list[int], int]:
    """``(lam factors, iteration counts, images)`` of ``cfg["gn"]``; empty factors: no tuning."""
    g = cfg["gn"]
    try:
        factors = [float(x) for x in g.get("tune_lam", [])]
        iters = [int(x) for x in g.get("tune_iters", [])]
        images = int(g.get("tune_images", 0))
    except (TypeError, ValueError):
        raise InputError("gn.tune_lam, gn.tune_iters and gn.tune_images must be numbers (lists of numbers)") from None
    if any(not (np.isfinite(f) and f > 0) for f in factors):
        raise InputError(f"gn.tune_lam factors must be positive, got {factors}")
    if any(k < 1 for k in iters):
        raise InputError(f"gn.tune_iters must be >= 1, got {iters}")
    if factors and images < 1:
        raise InputError(f"gn.tune_images must be >= 1 when gn.tune_lam is set, got {images}")
    return factors, iters, images


def tune_gauss_newton(fm, grid, v: np.ndarray, truth: np.ndarray, base: dict, lam_factors, iters) -> dict:
    """Grid search of GN's ``lam`` and ``max_iter`` on validation voltages ``v`` (N, M) with
    ground-truth images ``truth`` (N, H, W).

    ``base`` holds the :func:`gauss_newton` keyword arguments (as from :func:`gn_config`);
    each candidate uses ``lam = factor * base["lam"]``. Returns ``{"lam", "max_iter",
    "val_mse", "candidates": [{"lam", "max_iter", "val_mse"}...], "n_images"}``."""
    from dgm_eit.recon.gauss_newton import gauss_newton

    v = np.asarray(v, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if len(v) == 0 or len(v) != len(truth):
        raise InputError(f"GN tuning needs validation images: got {len(v)} voltage vectors and {len(truth)} images")
    iters = sorted({int(k) for k in iters}) or [int(base["max_iter"])]
    rows = []
    for factor in lam_factors:
        lam = float(factor) * float(base["lam"])
        errors = {k: [] for k in iters}
        for row, target in zip(v, truth):
            # one run to the largest count gives every smaller count's image on the way
            images = {}
            kwargs = {**base, "lam": lam, "max_iter": iters[-1]}
            result = gauss_newton(fm, row, iterates=lambda k, s: images.__setitem__(k, s), **kwargs)
            for k in iters:
                # a run that stopped before k iterations ends with its last image
                sigma = images.get(k, result.sigma)
                errors[k].append(float(np.mean((grid.to_image(sigma) - target) ** 2)))
        for k in iters:
            rows.append({"lam": lam, "max_iter": k, "val_mse": float(np.mean(errors[k]))})
    best = min(rows, key=lambda r: r["val_mse"])
    return {**best, "candidates": rows, "n_images": int(len(v))}


def gn_settings(cfg: dict, fm, tuning: dict | None = None) -> dict:
    """The record of how a data set's GN images are made: method, weight, iterations, mesh
    size, and the tuning table when the weight was chosen on validation data."""
    from dgm_eit.recon.gauss_newton import gn_config

    kwargs = gn_config(cfg)
    record = {"method": kwargs["method"], "p": kwargs["p"], "lam": kwargs["lam"], "max_iter": kwargs["max_iter"],
              "mesh_h0": float(cfg["mesh"]["h0"]), "mesh_nodes": int(fm.mesh.n_nodes),
              "mesh_elements": int(fm.n_elements), "tuned": tuning is not None}
    if tuning is not None:
        record.update(lam=tuning["lam"], max_iter=tuning["max_iter"], val_mse=tuning["val_mse"],
                      tuned_on=f"val[:{tuning['n_images']}]", candidates=tuning["candidates"])
    return record


def apply_gn_settings(cfg: dict, settings: dict) -> dict:
    """A copy of ``cfg`` whose ``[gn]`` reproduces ``settings`` exactly: the chosen weight is
    absolute (no second noise scaling) and nothing is tuned again. Empty ``settings`` (a
    file from before tuning existed): ``cfg`` as it is."""
    import copy

    out = copy.deepcopy(cfg)
    if not settings:
        return out
    out["gn"].update(lam=float(settings["lam"]), max_iter=int(settings["max_iter"]), lam_snr_ref_db=0.0,
                     tune_lam=[])
    return out


def describe(settings: dict) -> str:
    """One line for reports: ``GN: kotre (p = 0.5), lam = 3, 6 iterations, 747-node mesh; lam and
    iterations chosen on val[:40] (MSE 0.0056) from 5 x 3 candidates``."""
    method = settings["method"] + (f" (p = {settings['p']:g})" if settings["method"] == "kotre" else "")
    text = (f"{method}, lam = {settings['lam']:.3g}, {settings['max_iter']} iterations, "
            f"{settings['mesh_nodes']}-node mesh (h0 = {settings['mesh_h0']:g})")
    if settings.get("tuned"):
        n_lam = len({c["lam"] for c in settings["candidates"]})
        n_it = len({c["max_iter"] for c in settings["candidates"]})
        text += (f"; lam and iterations chosen on {settings['tuned_on']} (MSE {settings['val_mse']:.4g}) "
                 f"from {n_lam} x {n_it} candidates")
    else:
        text += "; not tuned (gn.tune_lam = [])"
    return text
