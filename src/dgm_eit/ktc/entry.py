"""The KTC2023 entry point from Python: a folder of ``ref.mat`` and ``data<n>.mat`` -> images,
std maps and classes, with a study made by ``dgm-eit run --profile ktc`` or, by default, the
study shipped with the package (:mod:`dgm_eit.ktc.bundle`). ``dgm-eit ktc`` is this function
plus its printout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dgm_eit.errors import InputError


@dataclass
class FolderReconstruction:
    """What :func:`reconstruct_folder` made, one entry per ``data<n>.mat`` (sorted by n)."""

    numbers: list[int]               # the n of each data<n>.mat
    method: str                      # a registered method's key ("linear", "gn", "cnf", ...; "cnf-ens": an ensemble)
    name: str                        # its name in tables ("linearised", "CNF", "CNF ens", ...)
    why: str | None                  # why the study's default method was chosen (None: given by the caller)
    val_score: float                 # the method's challenge score on simulated validation data
    recon: np.ndarray                # (N, H, W) sigma / sigma_water (water 1), 0 outside the disk
    recon_std: np.ndarray | None     # (N, H, W) per-pixel std for sampling methods (CNF, CSD*), else None
    classes: np.ndarray              # (N, 256, 256) uint8: 0 water, 1 resistive, 2 conductive


def reconstruct_folder(input_dir, level: int, run_dir=None, *, output_dir=None, method: str | None = None,
                       seed: int = 0, device: str = "auto", overwrite: bool = False) -> FolderReconstruction:
    """Reconstruct every ``data<n>.mat`` of ``input_dir`` against its ``ref.mat`` at ``level``
    (1..7; level L drops electrodes 1..2(L-1)), as difference data ``Uel - Uelref``, with
    ``method`` (default: the study's, :func:`dgm_eit.ktc.study.default_method`) and the
    settings and segmentation thresholds the study chose for it; a trained method uses its
    first seed's model. ``run_dir``: the study (a ``dgm-eit run --profile ktc`` directory or a
    folder packed by ``dgm-eit ktc-pack``); None: the study shipped with the package. A packed
    study is checked against its manifest first. ``output_dir``: also write ``<n>.mat`` in the
    challenge's format (never into ``input_dir`` or the study's folder; a file there that is not
    a reconstruction only with ``overwrite``). Every input and output is checked before a model
    is loaded."""
    from dgm_eit.datasets.ktc2023 import is_reconstruction_file, removed_electrodes
    from dgm_eit.files import check_output
    from dgm_eit.ktc.bundle import PACKED_ADVICE, SHIPPED_ADVICE, check_bundle, is_bundle, shipped_dir
    from dgm_eit.ktc.segment import segment_images
    from dgm_eit.ktc.physics import recorded_linear_model
    from dgm_eit.ktc.study import Methods, default_method, load_study, real_targets, seeded, write_submission
    from dgm_eit.methods import get_method
    from dgm_eit.runtime import check_seed, limit_threads, resolve_device

    removed_electrodes(level)   # refuses a bad level before any work
    check_seed(seed)
    if method is not None:
        get_method(method)   # an unknown key is refused naming the registered methods
    source, out = Path(input_dir), None if output_dir is None else Path(output_dir)
    if out is not None and out.exists() and not out.is_dir():
        raise InputError(f"OUTPUT_DIR {out} exists and is not a directory")
    if out is not None and out.resolve() == source.resolve():
        raise InputError(f"OUTPUT_DIR {out} is INPUT_DIR {source}: <n>.mat would land among the inputs; "
                         "choose another folder")
    shipped = run_dir is None
    if shipped:
        run_dir = shipped_dir()
        check_bundle(run_dir, SHIPPED_ADVICE)   # also when it is missing: a wheel built without it
    elif is_bundle(run_dir):
        check_bundle(run_dir, PACKED_ADVICE)
    cfg, chosen = load_study(run_dir)
    # the study is an input too (checked above, so a folder that is not one is named as such):
    # <n>.mat must not land among its files (a run directory's own submissions, a packed folder,
    # the study shipped inside the installed package)
    if out is not None and out.resolve().is_relative_to(Path(run_dir).resolve()):
        raise InputError(f"OUTPUT_DIR {out} is inside the study {run_dir}: <n>.mat would land among its files; "
                         "choose another folder")
    chosen = {m: record for m, record in chosen.items() if "score" in record}   # a seed's choice may be pending
    why = None
    if method is None:
        method, why = default_method(chosen, resamples=int(cfg["run"]["bootstrap_resamples"]))
    if method not in chosen:
        raise InputError(f"{run_dir} has no settings for method {method!r} (it ran {', '.join(chosen)})")
    record = chosen[method]["seeds"][0] if seeded(method) else chosen[method]
    numbers, real = real_targets(source, [level], truths=False)
    for n in numbers if out is not None else ():
        check_output(out / f"{n}.mat", own_kind=is_reconstruction_file, overwrite=overwrite, option="OUTPUT_DIR file",
                     kind="reconstruction file (one variable 'reconstruction')")
    limit_threads()
    methods = Methods(cfg, Path(run_dir), seed=seed, device=str(resolve_device(device)),
                      linear_model=recorded_linear_model(chosen))
    data = real["levels"][level]
    made = methods.reconstruct(method, data["dv"], data["masks"], record)
    classes = segment_images(made["recon"], record["low"], record["high"])
    if out is not None:
        write_submission(out, numbers, classes)
    std = made.get("recon_std")
    return FolderReconstruction(numbers, method, get_method(method).name, why, float(record["score"]),
                                np.asarray(made["recon"]),
                                None if std is None else np.asarray(std), classes)
