"""Reconstruct with a trained run: a data-set split, or a user's own voltages.

Every model is served through ``GenerativeModel.reconstruct(batch, n_samples=...,
generator=..., **opts)``; options such as ``sampler=`` pass through untouched, so the
score model's samplers are reachable from the command line. A run's options come, by
rising priority, from its config (``config=``), the settings ``dgm-eit tune-t0`` chose for
it, and the caller.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import numpy as np
import torch

from dgm_eit import runtime
from dgm_eit.data.storage import dataset_config, open_dataset, read_split
from dgm_eit.errors import InputError
from dgm_eit.files import atomic_path, require_file
from dgm_eit.models.posterior import SETTING_KEYS
from dgm_eit.physics import PixelGrid, forward_model_from_config
from dgm_eit.recon import gauss_newton, gn_config
from dgm_eit.results import write_recon_file
from dgm_eit.runs import load_run, tuned_sampling
from dgm_eit.runtime import check_seed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reconstruct_arrays(model, v: np.ndarray, gn: np.ndarray | None = None, *, n_samples: int | None = None,
                       seed: int = 0, batch_size: int = 64, progress: bool = False,
                       extra: np.ndarray | None = None, **opts) -> dict:
    """Run ``model.reconstruct`` over ``v`` (N,M) in batches (``extra``: the classical images at
    other settings, (N,K,H,W), for a model that reads them).

    Returns ``{"recon": (N,H,W) f32, "recon_std"?: (N,H,W) f32, "nfe": int,
    "seconds_per_image": float}``; the time counts the model calls only."""
    v = np.asarray(v, dtype=np.float32)
    if v.ndim != 2:
        raise InputError(f"voltages must have shape (N, M), got {v.shape}")
    n_meas = model.info.n_meas
    if v.shape[1] != n_meas:
        raise InputError(f"voltage vectors have {v.shape[1]} values, the model was trained on {n_meas}")
    if not np.all(np.isfinite(v)):
        raise InputError("voltages contain NaN or infinite values")
    if len(v) == 0:
        raise InputError(f"no voltage vectors to reconstruct (shape {v.shape})")
    if model.needs_gn and gn is None:
        raise InputError(f"model {model.name!r} needs the Gauss-Newton image 'gn' for each voltage vector")
    if model.needs_extra and (extra is None or len(extra) != len(v)):
        raise InputError(f"model {model.name!r} needs the extra classical images 'gn_extra' for each voltage vector")
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    if n_samples is not None:
        if n_samples < 1:
            raise InputError(f"--samples must be >= 1, got {n_samples}")
        # None leaves the model's own default (e.g. the CNF's number of posterior samples)
        opts["n_samples"] = int(n_samples)
    check_seed(seed)
    device = next(iter(model.buffers())).device
    generator = torch.Generator(device=device).manual_seed(int(seed))
    recon, stds, nfe = [], [], 0
    seconds = 0.0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(v), desc=f"reconstruct {model.name}", unit="img")
    for start in range(0, len(v), batch_size):
        batch = {"v": torch.from_numpy(v[start:start + batch_size]).to(device)}
        if gn is not None:
            batch["gn"] = torch.from_numpy(np.asarray(gn[start:start + batch_size], dtype=np.float32)).to(device)
        if model.needs_extra:
            batch["gn_extra"] = torch.from_numpy(np.asarray(extra[start:start + batch_size], dtype=np.float32)).to(device)
        _sync(device)
        t0 = time.perf_counter()
        out = model.reconstruct(batch, generator=generator, **opts)
        _sync(device)
        seconds += time.perf_counter() - t0
        recon.append(out["recon"].float().cpu().numpy())
        if out.get("recon_std") is not None:
            stds.append(out["recon_std"].float().cpu().numpy())
        nfe = max(nfe, int(out.get("nfe", 0)))
        if bar is not None:
            bar.update(len(batch["v"]))
    if bar is not None:
        bar.close()
    result = {"recon": np.concatenate(recon).astype(np.float32), "nfe": nfe,
              "seconds_per_image": seconds / max(1, len(v))}
    if stds:
        result["recon_std"] = np.concatenate(stds).astype(np.float32)
    for key in ("recon", "recon_std"):
        if key in result:
            bad = ~np.isfinite(result[key]).reshape(len(v), -1).all(axis=1)
            if bad.any():   # never an image of NaN with exit 0
                raise InputError(f"the {model.name} model produced NaN or infinite images (first for input "
                                 f"{int(np.flatnonzero(bad)[0])}): the voltages lie far outside the training "
                                 "range, or the run's weights are damaged; nothing was written")
    return result


def pool_members(members: list[dict]) -> dict:
    """The seed ensemble of K reconstructions of the same images by K models (training seeds).

    Each member holds ``recon`` (N,H,W), the mean of its ``n_samples`` samples per image, and,
    when ``n_samples`` > 1, their std ``recon_std`` (ddof = 1, as every sampler here writes it).
    The result is what the pooled K x n samples give: their mean, and their std (ddof = 1)
    from the within-member spreads and the spread of the member means, so it shows the
    disagreement between the models as well as each model's own uncertainty (for
    deterministic members, n = 1, only the former). ``seconds_per_image`` and ``nfe`` add up:
    the ensemble costs all of its members."""
    if len(members) < 2:
        raise InputError(f"a seed ensemble needs at least 2 members, got {len(members)}")
    counts = {int(m.get("n_samples") or 1) for m in members}
    if len(counts) != 1:
        raise InputError(f"the members of an ensemble drew different sample counts {sorted(counts)}")
    n = counts.pop()
    shapes = {m["recon"].shape for m in members}
    if len(shapes) != 1:
        raise InputError(f"the members of an ensemble reconstructed different shapes {sorted(shapes)}")
    if n > 1 and any(m.get("recon_std") is None for m in members):
        raise InputError(f"a member drew {n} samples per image but has no std map to pool")
    means = np.stack([np.asarray(m["recon"], dtype=np.float64) for m in members])
    mean = means.mean(axis=0)
    squares = n * ((means - mean) ** 2).sum(axis=0)
    if n > 1:
        squares += (n - 1) * sum(np.asarray(m["recon_std"], dtype=np.float64) ** 2 for m in members)
    total = n * len(members)
    return {"recon": mean.astype(np.float32), "recon_std": np.sqrt(squares / (total - 1)).astype(np.float32),
            "n_samples": total, "nfe": int(sum(int(m.get("nfe", 0)) for m in members)),
            "seconds_per_image": float(sum(float(m.get("seconds_per_image", 0.0)) for m in members))}


def check_voltages(v: np.ndarray, info, source: str) -> list[str]:
    """Compare voltages (N,M) with the training statistics in the run's ``data_info.json``.

    Raises :class:`InputError` for a vector of zeros or a sign-flipped one (``-v`` matches the
    training voltages, ``v`` does not); returns warnings for vectors far outside the training
    range, naming the scale factor. Normalised distances (z-scores per measurement) are
    used, so vectors that merely differ from the mean (other anomalies, noise) pass."""
    v = np.asarray(v, dtype=np.float64)
    mean = np.asarray(info.v_mean, dtype=np.float64)
    std = np.asarray(info.v_std, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != mean.shape[0] or not len(v):
        return []
    ref = float(np.linalg.norm(mean))
    norms = np.linalg.norm(v, axis=1)
    zero = np.flatnonzero(norms <= 1e-12 * max(ref, 1e-300))
    if zero.size:
        raise InputError(f"{source}: voltage vector {int(zero[0])} is all zeros ({zero.size} such vector(s)); "
                         "nothing was measured")
    z = np.sqrt(np.mean(((v - mean) / std) ** 2, axis=1))
    z_flipped = np.sqrt(np.mean(((-v - mean) / std) ** 2, axis=1))
    flipped = np.flatnonzero((z > 10) & (z_flipped < z / 10))
    if flipped.size:
        raise InputError(f"{source}: voltage vector {int(flipped[0])} looks sign-flipped ({flipped.size} such "
                         f"vector(s)): its negative matches the training voltages (z-score {z_flipped[flipped[0]]:.2g} "
                         f"vs {z[flipped[0]]:.2g}); check the electrode order or polarity")
    warnings = []
    far = np.flatnonzero(z > 10)
    if far.size and ref > 0:
        factors = norms[far] / ref
        k = int(far[np.argmax(np.abs(np.log(factors)))])
        warnings.append(f"{source}: {far.size} of {len(v)} voltage vector(s) lie far outside the training range "
                        f"(vector {k} is {norms[k] / ref:.3g} x the size of the training voltages, z-score "
                        f"{z[k]:.3g}); the images will not be meaningful")
    return warnings


def _warn(messages: list[str]) -> None:
    import warnings

    for message in messages:
        warnings.warn(message, stacklevel=3)


def _has_array(path, split: str, key: str) -> bool:
    with open_dataset(path) as f:
        return split in f and key in f[split]


def _check_finite(arrays: dict, data_path, split: str) -> None:
    """Name the file, array and sample of a NaN in a data set (the model would only see 'voltages').

    A float64 row sum is non-finite exactly when the row holds a NaN or inf (float32 values
    cannot overflow it), and it needs no full-size boolean copy of a large split."""
    for key, a in arrays.items():
        bad = ~np.isfinite(a.reshape(len(a), -1).sum(axis=1, dtype=np.float64))
        if bad.any():
            raise InputError(f"{data_path}: {split}/{key} contains NaN or infinite values "
                             f"(first in sample {int(np.flatnonzero(bad)[0])})")


def run_options(run_dir, cfg: dict, opts: dict) -> dict:
    """The caller's options over the settings tune-t0 chose for the run, with the run's config
    (the score model reads ``[csd]`` and, to sample on the voltages, ``[mesh]`` from it)."""
    given = {k: v for k, v in opts.items() if v is not None}
    return {"config": cfg, **tuned_sampling(run_dir), **given}


def reconstruct_split(run_dir, data_path, split: str = "test", out=None, *, n_samples: int | None = None,
                      sampler: str | None = None, seed: int = 0, device: str = "auto",
                      batch_size: int = 64, weights: str = "model", limit: int | None = None,
                      progress: bool = False, attrs: dict | None = None, **opts) -> dict:
    """Reconstruct a split of a data-set file; write ``out`` (HDF5) when given, with what
    :func:`reconstruct_command` needs to remake it and the caller's own ``attrs``."""
    device = runtime.resolve_device(device)
    model, cfg, info = load_run(run_dir, device, weights=weights)
    opts = run_options(run_dir, cfg, opts)
    # the noise level of these measurements (data-consistent sampling weighs them by it)
    opts.setdefault("snr_db", dataset_config(data_path).get("data", {}).get("snr_db"))
    keys = ["v"]
    if model.needs_gn or _has_array(data_path, split, "gn"):
        keys.append("gn")
    if model.needs_extra:
        keys.append("gn_extra")
    arrays = read_split(data_path, split, keys=tuple(keys))
    if limit is not None:
        arrays = {k: a[:limit] for k, a in arrays.items()}
    if len(arrays["v"]) == 0:
        raise InputError(f"split {split!r} of {data_path} is empty: nothing to reconstruct")
    _check_finite(arrays, data_path, split)
    if arrays["v"].shape[1] != info.n_meas:
        raise InputError(f"{data_path} has {arrays['v'].shape[1]} measurements per sample, "
                         f"the run was trained on {info.n_meas}")
    if "gn" in arrays and arrays["gn"].shape[-1] != info.image_size:
        raise InputError(f"{data_path} has {arrays['gn'].shape[-1]}-pixel images, "
                         f"the run was trained on {info.image_size}")
    _warn(check_voltages(arrays["v"], info, f"{data_path} {split}/v"))
    if sampler is not None:
        opts["sampler"] = sampler
    result = reconstruct_arrays(model, arrays["v"], arrays.get("gn"), n_samples=n_samples, seed=seed,
                                batch_size=batch_size, progress=progress, extra=arrays.get("gn_extra"), **opts)
    if out is not None:
        # the thread count too: a reduction split over other threads adds in another order
        attrs = {**(attrs or {}), "method": model.name, "split": split, "seed": int(seed), "data": str(Path(data_path).resolve()),
                 "run": str(Path(run_dir).resolve()), "weights": weights, "batch_size": int(batch_size),
                 "threads": torch.get_num_threads(), "device": str(device)}
        if n_samples is not None:
            attrs["n_samples"] = int(n_samples)
        if sampler is not None:
            attrs["sampler"] = sampler
        if limit is not None:
            attrs["limit"] = int(limit)
        # sampler settings chosen on validation (by dgm-eit run or tune-t0) or given explicitly
        attrs.update({k: opts[k] for k in SETTING_KEYS if k in opts})
        write_recon_file(out, result, attrs)
    return result


# the attributes of a reconstruction file that are options of dgm-eit reconstruct, in the
# order a command gives them (t0 and n_steps: the settings dgm-eit run chose on validation)
COMMAND_OPTIONS = (("n_samples", "--samples"), ("sampler", "--sampler"), ("t0", "--t0"), ("n_steps", "--steps"),
                   ("limit", "--limit"), ("weights", "--weights"), ("batch_size", "--batch-size"),
                   ("threads", "--threads"), ("device", "--device"))


def reconstruct_command(attrs: dict, *, run, data, out) -> str:
    """The ``dgm-eit reconstruct`` command that remakes a reconstruction file written by
    :func:`reconstruct_split`, from its attributes ``attrs``; ``run``, ``data`` and ``out`` are
    the paths the command names (the file records absolute ones, which moving the
    directory would break). A file from an older version, without some attribute, gets a
    command that leaves that option at its default."""
    missing = [k for k in ("split", "seed") if k not in attrs]
    if missing:
        raise InputError(f"the reconstruction file records no {' or '.join(missing)}: it was not written by "
                         "dgm-eit reconstruct, so no command remakes it")
    argv = ["dgm-eit", "reconstruct", "--run", str(run), "--data", str(data), "--split", str(attrs["split"]),
            "--out", str(out), "--seed", str(int(attrs["seed"]))]
    for key, option in COMMAND_OPTIONS:
        if key in attrs:
            value = attrs[key]
            # repr: the shortest text that reads back as the same float
            argv += [option, repr(float(value)) if isinstance(value, float) else str(value)]
    return shlex.join(argv)


def gn_images(cfg: dict, v: np.ndarray, image_size: int) -> np.ndarray:
    """Gauss-Newton images (N,H,W) for voltages (N,M) on the run's ``[mesh]``/``[gn]`` config,
    the same way the simulator makes a data set's ``gn`` arrays."""
    fm = forward_model_from_config(cfg, "mesh")
    if fm.n_meas != v.shape[1]:
        raise InputError(f"the run's [mesh] protocol gives {fm.n_meas} measurements, the voltages have {v.shape[1]}")
    grid = PixelGrid(fm.mesh, size=image_size)
    kwargs = gn_config(cfg)
    images = [np.asarray(grid.to_image(np.asarray(gauss_newton(fm, row.astype(np.float64), **kwargs).sigma)))
              for row in v]
    return np.stack(images).astype(np.float32)


def load_voltages(path) -> tuple[np.ndarray, bool]:
    """``(v (N,M) float32, was_one_vector)`` from a ``.npy`` file holding (M,) or (N,M)."""
    path = require_file(path, "voltage file")
    try:
        v = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:   # an empty file: EOFError
        raise InputError(f"{path} is not a readable .npy array ({err or 'empty file'})") from None
    if not isinstance(v, np.ndarray):
        raise InputError(f"{path} is an .npz archive; give one .npy array of voltages")
    if v.dtype.kind not in "fiu":
        raise InputError(f"{path} holds {v.dtype} values, expected real numbers")
    if v.ndim in (1, 2) and not np.all(np.isfinite(v)):
        row, col = np.argwhere(~np.isfinite(np.atleast_2d(v)))[0]
        raise InputError(f"{path} contains NaN or infinite voltages (first at row {row}, column {col})")
    if v.size == 0:
        raise InputError(f"{path} holds no voltages (shape {v.shape})")
    if v.ndim == 1:
        return v[None].astype(np.float32), True
    if v.ndim == 2:
        return v.astype(np.float32), False
    raise InputError(f"{path} has shape {v.shape}; expected (M,) or (N, M) voltages")


def reconstruct_voltages(run_dir, v: np.ndarray, *, n_samples: int | None = None, sampler: str | None = None,
                         seed: int = 0, device: str = "auto", batch_size: int = 64, weights: str = "model",
                         source: str = "voltages", **opts) -> dict:
    """Reconstruct raw voltages (N,M); computes the GN images when the model needs them.
    ``source`` names the voltages in messages (the user's file)."""
    model, cfg, info = load_run(run_dir, runtime.resolve_device(device), weights=weights)
    v = np.asarray(v, dtype=np.float32)
    if v.ndim == 1:
        v = v[None]
    if v.ndim != 2 or v.shape[1] != info.n_meas:
        raise InputError(f"voltages of shape {v.shape}: the run was trained on {info.n_meas} measurements "
                         f"per vector, so give (M,) or (N, M) with M = {info.n_meas}")
    if not np.all(np.isfinite(v)):
        # checked before the Gauss-Newton images, whose own error would not say which input was bad
        raise InputError("voltages contain NaN or infinite values")
    if len(v) == 0:
        raise InputError(f"no voltage vectors to reconstruct (shape {v.shape})")
    _warn(check_voltages(v, info, source))
    if model.needs_gn and "mesh" not in cfg:
        raise InputError(f"{run_dir} was trained on another study's data (its config has no [mesh] to make the GN "
                         "images of raw voltages): reconstruct its data set with --data, or KTC tank measurements "
                         "with dgm-eit ktc")
    gn = gn_images(cfg, v, info.image_size) if model.needs_gn else None
    opts = run_options(run_dir, cfg, opts)
    if sampler is not None:
        opts["sampler"] = sampler
    return reconstruct_arrays(model, v, gn, n_samples=n_samples, seed=seed, batch_size=batch_size, **opts)


def save_user_output(path, result: dict, single: bool) -> Path:
    """``.npy``: the recon array ((H,W) for one vector, else (N,H,W)); ``.png``: a figure."""
    path = Path(path)
    recon = result["recon"][0] if single else result["recon"]
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".png"):
        raise InputError(f"--out {path}: use a .npy or .png file for --voltages (or .h5 with --data)")
    with atomic_path(path) as tmp:
        if suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, recon)
        else:
            _save_png(tmp, result)
    return path


def _save_png(path: Path, result: dict) -> None:
    """The first 16 images (and std maps), one colour scale per row covering every value."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from dgm_eit.figures import DPI, colour_map, outside_masked

    rows = [("reconstruction", outside_masked(result["recon"][:16]), "conductivity σ", "viridis")]
    if "recon_std" in result:
        rows.append(("std", outside_masked(result["recon_std"][:16]), "per-pixel std of σ", "magma"))
    n = len(rows[0][1])
    fig, axes = plt.subplots(len(rows), n, figsize=(1.8 * n + 1.2, 1.9 * len(rows)), squeeze=False,
                             layout="constrained")
    for r, (label, stack, quantity, cmap) in enumerate(rows):
        vmax = max(float(np.nanmax(stack)), 1e-12)
        for i in range(n):
            ax = axes[r][i]
            im = ax.imshow(stack[i], vmin=0.0, vmax=vmax, cmap=colour_map(cmap))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"vector {i}", fontsize=9)
            if i == 0:
                ax.set_ylabel(label)
        fig.colorbar(im, ax=list(axes[r]), fraction=0.03, label=quantity)
    try:
        fig.savefig(path, format="png", dpi=DPI)
    finally:
        plt.close(fig)
