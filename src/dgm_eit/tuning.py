"""Choices made on a validation split: CSD*'s insertion time and step count (sampler ``csd``,
or ``dds``: CSD* with data consistency), and the scale of a method's std maps that makes
them cover what they claim (:func:`std_scale_on_validation`).

Used by ``dgm-eit tune-t0`` (one prior, one data set, the result stored in the run dir)
and by ``dgm-eit run`` (once per results table, on validation data with the anomaly count
the models were trained on at the test noise level: ``experiments.tuning_spec``).
"""

from __future__ import annotations

import numpy as np

from dgm_eit import runtime
from dgm_eit.data.storage import read_split
from dgm_eit.errors import InputError
from dgm_eit.metrics import per_sample, std_scale_for_coverage
from dgm_eit.models.posterior import SETTING_KEYS
from dgm_eit.reconstruct import reconstruct_arrays, reconstruct_split
from dgm_eit.runs import load_run


def default_t0_grid(t0: float) -> list[float]:
    return sorted({round(min(0.95, max(0.05, t0 + d)), 3) for d in (-0.3, -0.2, -0.1, 0.0, 0.1, 0.2)})


def sweep(model, cfg: dict, arrays: dict, *, t0s, steps, modes, solver, corrector_steps, seed: int,
          batch_size: int = 64, log=None, sampler: str = "csd") -> list[dict]:
    """One row per (mode, t0, n_steps): MSE and SSIM means over ``arrays`` (sigma, gn, v), NFE, time.

    Every setting reuses the same seed, so differences come from the setting, not the noise."""
    rows = []
    for mode in modes:
        for n_steps in steps:
            for t0 in t0s:
                out = reconstruct_arrays(model, arrays["v"], arrays["gn"], n_samples=1, seed=seed,
                                         batch_size=batch_size, config=cfg, sampler=sampler, t0=t0, n_steps=n_steps,
                                         mode=mode, solver=solver, corrector_steps=corrector_steps)
                metrics = per_sample(out["recon"], arrays["sigma"])
                nfe = out["nfe"]
                row = {"mode": mode, "solver": solver, "t0": float(t0), "n_steps": int(n_steps),
                       "corrector_steps": int(corrector_steps), "nfe": nfe,
                       "mse": float(np.mean(metrics["MSE"])), "ssim": float(np.mean(metrics["SSIM"])),
                       "seconds_per_image": out["seconds_per_image"]}
                rows.append(row)
                if log is not None:
                    log(f"  {mode:8s} t0={t0:<6g} steps={n_steps:<5d} nfe={nfe:<5d} "
                        f"MSE={row['mse']:.5f} SSIM={row['ssim']:.4f} {row['seconds_per_image'] * 1e3:.0f} ms/img")
    return rows


def pick_best(rows: list[dict], tolerance: float = 0.0) -> dict:
    """The cheapest row (fewest NFE, then lowest MSE) whose MSE is within (1 + tolerance) of the lowest."""
    lowest = min(r["mse"] for r in rows)
    ok = [r for r in rows if r["mse"] <= lowest * (1 + tolerance)]
    return min(ok, key=lambda r: (r["nfe"], r["mse"]))


def tune_on_validation(run_dir, data_path, cfg: dict, *, t0s, steps, n_images: int, seed: int,
                       device: str = "cpu", sampler: str = "csd") -> tuple[dict, list[dict]]:
    """Sweep ``t0s`` x ``steps`` for the score prior in ``run_dir`` on the first ``n_images``
    of ``data_path``'s validation split; ``cfg`` supplies the rest of ``[csd]``.

    Returns the lowest-MSE setting (the keys of :data:`~dgm_eit.models.posterior.SETTING_KEYS`) and the sweep table."""
    model, _, _ = load_run(run_dir, runtime.resolve_device(device))
    if model.name != "score":
        raise InputError(f"{run_dir} holds a {model.name!r} run; CSD* tuning needs a score run")
    arrays = read_split(data_path, "val", keys=("sigma", "gn", "v"))
    arrays = {k: np.ascontiguousarray(a[:n_images], dtype=np.float32) for k, a in arrays.items()}
    csd = cfg["csd"]
    rows = sweep(model, cfg, arrays, t0s=t0s, steps=steps, modes=[csd["mode"]], solver=csd["solver"],
                 corrector_steps=int(csd["corrector_steps"]), seed=seed, sampler=sampler)
    best = pick_best(rows)
    return {k: best[k] for k in SETTING_KEYS}, rows


def std_scale_on_validation(run_dir, data_path, *, n_images: int, level: float, n_samples: int | None,
                            sampler: str | None, seed: int, device: str, **opts) -> dict:
    """Reconstruct the first ``n_images`` of the validation split of ``data_path`` as the test
    split will be (same samples, sampler and settings), and return the factor that makes their
    std maps cover ``level`` of the disk pixels (:func:`dgm_eit.metrics.std_scale_for_coverage`),
    as the attributes a reconstruction file records it with."""
    out = reconstruct_split(run_dir, data_path, "val", n_samples=n_samples, sampler=sampler, seed=seed,
                            device=device, limit=n_images, **opts)
    if out.get("recon_std") is None:
        raise InputError(f"{run_dir} draws one sample per image: it has no std map to scale")
    truth = read_split(data_path, "val", keys=("sigma",), indices=slice(0, len(out["recon"])))["sigma"]
    return {"std_scale": std_scale_for_coverage(out["recon"], out["recon_std"], truth, level),
            "std_scale_level": float(level), "std_scale_images": len(truth)}
