"""Best of K: train one model K times with different seeds and keep the candidate whose
reconstructions of its training set's validation split are best (lowest mean MSE).

Why the images and not the loss: over six CNF seeds per table on the quick data, the change
of the validation-image MSE against GN predicted the test change (r = 0.99 and 1.00), the
final validation NLL did not (r = 0.49 at T1 2a, -0.95 at T1 4a: there the lowest NLL gave
the worst images). Choosing on validation images costs one reconstruction of the validation
split per candidate and keeps the test split out of the choice.

Layout: candidate j trains in ``<run>.candidates/c<j>``, an ordinary training run (resumed as
any other); the chosen candidate's files are then copied into ``<run>`` with
``selection.json`` (every candidate's seed, validation MSE and training time) and the
``done`` marker last, whose time and steps are those of all candidates together (what the
kept model cost). Everything downstream reads ``<run>`` as a run of one seed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from dgm_eit.config import check_int
from dgm_eit.errors import InputError
from dgm_eit.files import read_json, write_bytes, write_text
from dgm_eit.runs import (CONFIG_FILE, DATA_INFO_FILE, DONE_FILE, METRICS_FILE, is_finished, mark_finished,
                          training_time, weights_path)

SELECTION_FILE = "selection.json"
CRITERION = "mean MSE of the reconstructions of the training set's validation split"
# what reconstruction and the report read from a run directory
_KEPT = (CONFIG_FILE, DATA_INFO_FILE, METRICS_FILE, weights_path(".", "model").name, weights_path(".", "best").name)


def check_best_of(run: dict, trained_keys: set[str]) -> tuple[int, tuple[str, ...]]:
    """``[run] best_of`` (candidates per kept model) and ``best_of_methods`` (the trained
    methods whose models are chosen so), checked before any work."""
    k = check_int(run["best_of"], "run.best_of", 1, "training runs per kept model")
    keys = run["best_of_methods"]
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise InputError(f"run.best_of_methods must be a list of method keys, got {keys!r}")
    unknown = [key for key in keys if key not in trained_keys]
    if unknown:
        raise InputError(f"run.best_of_methods: {unknown} name no trained method of run.methods "
                         f"(these do: {', '.join(sorted(trained_keys)) or 'none'})")
    return k, tuple(keys)


def candidate_dir(run_dir: Path, j: int) -> Path:
    run_dir = Path(run_dir)
    return run_dir.with_name(f"{run_dir.name}.candidates") / f"c{j}"


def validation_mse(run_dir: Path, data: Path, *, seed: int, **opts) -> float:
    """The mean per-image MSE of the run's reconstructions of ``data``'s validation split, drawn
    as the method draws them: ``opts`` are its :func:`~dgm_eit.reconstruct.reconstruct_split`
    options (samples, sampler and its config; a tunable sampler at ``[csd]``'s t0)."""
    from dgm_eit.data.storage import read_split
    from dgm_eit.metrics import per_sample
    from dgm_eit.reconstruct import reconstruct_split

    recon = reconstruct_split(run_dir, data, "val", seed=seed, **opts)["recon"]
    truth = read_split(data, "val", keys=("sigma",))["sigma"]
    return float(np.mean(per_sample(recon, truth)["MSE"]))


def train_best_of(train_one, run_dir: Path, seeds: list[int], select: dict) -> int:
    """Train a candidate per seed in ``seeds`` with ``train_one(candidate_dir, seed)`` (a finished
    candidate is reused), score each with :func:`validation_mse` (``select``: its keyword
    arguments but the run and seed), and make ``run_dir`` the best one. Returns its index."""
    run_dir = Path(run_dir)
    candidates = [candidate_dir(run_dir, j) for j in range(len(seeds))]
    for where, seed in zip(candidates, seeds):
        where.parent.mkdir(parents=True, exist_ok=True)
        train_one(where, seed)
    start = time.perf_counter()
    scores = [validation_mse(where, seed=seed, **select) for where, seed in zip(candidates, seeds)]
    best = int(np.argmin(scores))
    times = [training_time(where) for where in candidates]
    wall = sum(t or 0.0 for t, _ in times) + time.perf_counter() - start
    steps = sum(s or 0 for _, s in times)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / DONE_FILE).unlink(missing_ok=True)   # an older choice must not look finished while this one is copied
    for name in _KEPT:
        write_bytes(run_dir / name, (candidates[best] / name).read_bytes())
    write_text(run_dir / SELECTION_FILE, json.dumps({
        "criterion": CRITERION, "chosen": best,
        "candidates": [{"dir": str(where.relative_to(run_dir.parent)), "seed": int(seed), "val_mse": score,
                        "wall_s": t, "steps": s}
                       for where, seed, score, (t, s) in zip(candidates, seeds, scores, times)]}, indent=2))
    mark_finished(run_dir, steps, wall)
    return best


def read_selection(run_dir: Path) -> dict | None:
    """``selection.json`` of a finished best-of run; None for a run trained once."""
    path = Path(run_dir) / SELECTION_FILE
    if not (is_finished(run_dir) and path.is_file()):
        return None
    selection = read_json(path, "delete the run directory's done file to choose again")
    if not (isinstance(selection, dict) and isinstance(selection.get("candidates"), list)
            and isinstance(selection.get("chosen"), int)):
        raise InputError(f"{path} is not a selection file")
    return selection
