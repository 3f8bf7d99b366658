"""Directories that hold finished work: a training run, and the output of ``dgm-eit run``.

Training run (written by :mod:`dgm_eit.train`, read by everything that reconstructs)::

    config.json          {"model", "data", "seed", "config", "gn_settings"}: what the run was made with
    data_info.json       shapes and normalisation statistics of the training split
    checkpoints/last.pt  everything needed to continue (written atomically)
    metrics.csv          one row per epoch
    best.safetensors     weights with the best validation loss of the latest stage
    model.safetensors    final weights (EMA where the stage uses it)
    done                 marker: training finished ({"step", "wall_s"})
    tuned_csd.json       optional: sampler settings chosen by ``dgm-eit tune-t0``

Output of ``dgm-eit run``: ``run.json`` (``{"seed", "config"}``) ties the directory to one
config and seed; :func:`check_manifest` refuses to mix another one's stages into it.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from dgm_eit.config import config_changes
from dgm_eit.errors import InputError
from dgm_eit.files import read_json, write_bytes, write_text
from dgm_eit.models import MODELS
from dgm_eit.models.base import DataInfo, GenerativeModel
from dgm_eit.simulators import apply_settings

CONFIG_FILE = "config.json"
DATA_INFO_FILE = "data_info.json"
CHECKPOINT_FILE = "checkpoints/last.pt"
METRICS_FILE = "metrics.csv"
DONE_FILE = "done"
TUNED_FILE = "tuned_csd.json"
WEIGHTS = ("model", "best")          # model.safetensors (final), best.safetensors
METRIC_FIELDS = ("stage", "epoch", "step", "train_loss", "val_loss", "lr", "wall_s")

# [train] keys that change how fast a step runs, not what it learns beyond rounding
SPEED_KEYS = ("autocast", "compile", "channels_last", "optimizer_kernel")
# trainer settings that change how a run proceeds but not what it computes (beyond rounding:
# a checkpoint written with bfloat16 autocast continues in float32)
RESUME_FREE_KEYS = ("train.threads", "train.progress", "train.checkpoint_minutes", *(f"train.{k}" for k in SPEED_KEYS))


# ---------------------------------------------------------------------------------
# the training run's files


def weights_path(run_dir, weights: str = "model") -> Path:
    if weights not in WEIGHTS:
        raise InputError(f"weights must be 'model' or 'best', got {weights!r}")
    return Path(run_dir) / f"{weights}.safetensors"


def is_finished(run_dir) -> bool:
    return (Path(run_dir) / DONE_FILE).is_file()


def mark_finished(run_dir, step: int, wall_s: float) -> None:
    write_text(Path(run_dir) / DONE_FILE, json.dumps({"step": step, "wall_s": round(wall_s, 3)}))


def training_time(run_dir) -> tuple[float | None, int | None]:
    """Wall time and optimiser steps recorded when training finished (summed over resumed sessions)."""
    try:
        done = json.loads((Path(run_dir) / DONE_FILE).read_text())
    except (OSError, ValueError):
        return None, None
    seconds, steps = done.get("wall_s"), done.get("step")
    return (float(seconds) if seconds is not None else None, int(steps) if steps is not None else None)


def write_training_metrics(run_dir, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(Path(run_dir) / METRICS_FILE, buf.getvalue())


def tuned_sampling(run_dir) -> dict:
    """The sampler settings ``dgm-eit tune-t0`` chose for this run (``{}`` when it never ran)."""
    path = Path(run_dir) / TUNED_FILE
    if not path.is_file():
        return {}
    return dict(read_json(path, "re-run dgm-eit tune-t0, or delete it").get("best", {}))


# ---------------------------------------------------------------------------------
# weights


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Model state as safetensors, written atomically (tensors copied: safetensors refuses shared storage)."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    write_bytes(path, save(state, metadata={"format": "pt"}))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise InputError(f"{path} does not exist")
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises several error types for a damaged file
        raise InputError(f"{path} is not a readable safetensors file ({err})") from None
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:   # they would give NaN images with exit 0
        raise InputError(f"{path} holds NaN or infinite weights (in {bad[0]}{' and others' if len(bad) > 1 else ''})")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise InputError(f"{path} does not match the model in this run: {state_dict_error(err)}") from None


def state_dict_error(err: RuntimeError) -> str:
    """The informative part of torch's multi-line load_state_dict error."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    detail = lines[1:] or lines
    return "; ".join(detail[:2])[:300]


# ---------------------------------------------------------------------------------
# creating and loading a run


def run_meta(model_name: str, data_path, seed: int, cfg: dict, gn_settings: dict) -> dict:
    """``config.json``: what a run is made from. ``gn_settings`` is how the data set made its GN
    images; models that read GN images make them the same way for new voltages."""
    return {"model": model_name, "data": str(Path(data_path).resolve()), "seed": int(seed), "config": cfg,
            "gn_settings": gn_settings}


def _training_config(cfg: dict, model_name: str) -> dict:
    """The config sections a resumed run must share with the original: the model's own section
    and the trainer's (other models' sections may change freely)."""
    return {model_name: cfg.get(model_name, {}), "train": cfg.get("train", {})}


def prepare_run_dir(out: Path, meta: dict, create: bool) -> bool:
    """Check that ``out`` is a new directory or a run of the same model, data, seed and training
    config; with ``create``, write ``config.json`` into a new one. True when the run has finished."""
    cfg_path = out / CONFIG_FILE
    if cfg_path.is_file():
        try:
            old = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as err:
            raise InputError(f"{cfg_path} is not valid JSON ({err}); use a new --out") from None
        if old.get("model") != meta["model"]:
            raise InputError(f"{out} holds a {old.get('model')!r} run, not {meta['model']!r}; use a new --out")
        if old.get("data") != meta["data"]:
            raise InputError(f"{out} was trained on {old.get('data')}, not {meta['data']}; use a new --out")
        if old.get("seed") != meta["seed"]:
            raise InputError(f"{out} was trained with --seed {old.get('seed')}, not {meta['seed']}; use a new --out")
        name = meta["model"]
        changes = config_changes(_training_config(old.get("config", {}), name),
                                 _training_config(meta["config"], name), ignore=RESUME_FREE_KEYS)
        if changes:
            raise InputError(f"{out} was made with a different config ({changes}); "
                             "re-run with the same settings to resume, or use a new --out")
        return is_finished(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} exists and is not a dgm-eit run directory (no {CONFIG_FILE}); use a new --out")
    if create:
        (out / CHECKPOINT_FILE).parent.mkdir(parents=True, exist_ok=True)
        write_text(cfg_path, json.dumps(meta, indent=2, sort_keys=True))
    return False


def load_run(run_dir, device="cpu", weights: str = "model") -> tuple[GenerativeModel, dict, DataInfo]:
    """Load a trained run: ``(model in eval mode, full config, DataInfo)``.

    ``weights`` is ``"model"`` (final) or ``"best"`` (best validation loss). The config's
    ``[gn]`` is the one that made the training set's GN images."""
    from dgm_eit import runtime

    run = Path(run_dir)
    if not run.is_dir():
        raise InputError(f"run directory {run} does not exist")
    cfg_path, info_path = run / CONFIG_FILE, run / DATA_INFO_FILE
    if not cfg_path.is_file():
        raise InputError(f"{run} is not a dgm-eit run directory (no {CONFIG_FILE})")
    try:
        meta = json.loads(cfg_path.read_text())
        name, cfg = meta["model"], meta["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"{cfg_path} is damaged ({err})") from None
    cfg = apply_settings(cfg, meta.get("gn_settings") or {})
    if not info_path.is_file():
        raise InputError(f"{run} has no {DATA_INFO_FILE}; the run never started training")
    try:
        info = DataInfo.load(info_path)
    except (json.JSONDecodeError, TypeError) as err:
        raise InputError(f"{info_path} is damaged ({err})") from None
    path = weights_path(run, weights)
    if not path.is_file():
        hint = " (training has not finished: re-run the same dgm-eit train command to resume)" \
            if weights == "model" else ""
        raise InputError(f"{run} has no {path.name}{hint}")
    model = MODELS[name](cfg[name], info)
    load_weights(model, path)
    model.to(runtime.resolve_device(device) if isinstance(device, str) else device)
    model.eval()
    return model, cfg, info


def count_parameters(run_dir) -> int:
    """Trainable parameters of the model in ``run_dir``."""
    model, _, _ = load_run(run_dir, device="cpu")
    return int(sum(p.numel() for p in model.parameters()))


# ---------------------------------------------------------------------------------
# the output directory of dgm-eit run


def check_manifest(root: Path, path: Path, seed: int, cfg: dict, ignore: tuple[str, ...]) -> None:
    """Refuse to mix stages made with a different config or seed into one output directory
    (keys starting with one of ``ignore`` may change); a new directory gets the manifest."""
    if path.exists():
        old = read_json(path, "use a new --out (or restore the file)")
        if old.get("seed") != seed:
            raise InputError(f"{root} was made with --seed {old.get('seed')}, not {seed}; "
                             "use another --out or the same seed")
        changes = config_changes(old.get("config", {}), cfg, ignore=ignore)
        if changes:
            raise InputError(f"{root} was made with a different config ({changes}); use another --out")
    else:
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            # e.g. a training run: its metrics.csv would be overwritten by the report's
            raise InputError(f"{root} exists and is not a dgm-eit run output directory (no {path.name}); "
                             "use a new --out")
        root.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps({"seed": seed, "config": cfg}, indent=2, sort_keys=True))
