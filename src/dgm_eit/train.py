"""One training loop for every model.

The trainer knows a model only through :class:`~dgm_eit.models.base.GenerativeModel`:
its stages, the parameters each stage trains, the stage's settings and its loss. It
owns everything else: data order, optimiser, learning-rate warm-up and schedule,
gradient clipping, EMA, early stopping, checkpoints and resume, and
DistributedDataParallel when started by ``torchrun``. What it writes is laid out in
:mod:`dgm_eit.runs`.

Per stage, as NVlabs/edm's ``training_loop``: everything the stage needs (optimiser, EMA,
data order, the loss module) is built once by :meth:`Trainer._setup_stage`, then
:meth:`Trainer._train_epoch` and :meth:`Trainer._end_epoch` alternate until the stage's
epochs or patience run out, and :meth:`Trainer._finish_stage` hands its weights on.

Resume is exact on CPU: the data order comes from a ``torch.Generator`` whose state at
the start of the current epoch is checkpointed (the permutation is regenerated and the
finished batches skipped), and the global torch RNG, which models use for their noise,
is checkpointed too. Validation runs under a forked RNG seeded from the run seed, so it
neither depends on nor disturbs the training noise.
"""

from __future__ import annotations

import io
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dgm_eit import runs
from dgm_eit.data.storage import dataset_gn_settings, read_split, split_sizes
from dgm_eit.errors import InputError
from dgm_eit.files import write_bytes
from dgm_eit.runtime import check_seed
from dgm_eit.models import MODELS
from dgm_eit.models.base import DataInfo, GenerativeModel

STAGE_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "grad_clip", "warmup_steps", "ema",
              "schedule", "patience")
AUTOCAST = ("auto", "off", "bf16", "fp16")
OPTIMIZER_KERNELS = ("loop", "foreach", "fused")
SCHEDULES = ("constant", "cosine", "plateau")
CHECKPOINT_FORMAT = 1


# ---------------------------------------------------------------------------------
# distributed set-up


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as td

        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        here = False
        if not td.is_initialized():
            td.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
            here = True
        return cls(rank=rank, world=world, local_rank=local_rank, initialised_here=here)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as td
            td.barrier()

    def any_flag(self, flag: bool, device) -> bool:
        """True on every rank when any rank raised the flag (stop decisions must agree)."""
        if not self.active:
            return flag
        import torch.distributed as td
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        td.all_reduce(t, op=td.ReduceOp.MAX)
        return bool(t.item() > 0)

    def mean(self, value: float, device) -> float:
        if not self.active:
            return value
        import torch.distributed as td
        t = torch.tensor([value], dtype=torch.float64, device=device)
        td.all_reduce(t)
        return float(t.item()) / self.world

    def close(self) -> None:
        if self.initialised_here:
            import torch.distributed as td
            td.destroy_process_group()


# ---------------------------------------------------------------------------------
# speed settings


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX). Elsewhere torch
    emulates it: on an AVX2-only AMD EPYC (Zen 2) a bfloat16-autocast training step of every
    model here took 10-25x as long as float32."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        try:
            if getattr(torch.cpu, probe)():
                return True
        except (AttributeError, RuntimeError):
            continue
    return False


@dataclass(frozen=True)
class Speed:
    """How the trainer runs a step, from the ``[train]`` keys of :data:`SPEED_KEYS`."""

    autocast: torch.dtype | None = None   # mixed precision dtype, None: float32
    compile: bool = False                 # torch.compile of the loss
    channels_last: bool = False           # NHWC weights for the convolutions
    optimizer_kernel: str = "loop"        # Adam's implementation: loop | foreach | fused

    @classmethod
    def from_config(cls, tcfg: dict, device: torch.device) -> "Speed":
        setting = tcfg["autocast"]
        if setting not in AUTOCAST:
            raise InputError(f"train.autocast must be one of {', '.join(AUTOCAST)}, got {setting!r}")
        dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}.get(setting)
        if setting == "auto":
            if device.type == "cuda":
                dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            else:
                dtype = torch.bfloat16 if native_bf16_cpu() else None
        for key in ("compile", "channels_last"):
            if not isinstance(tcfg[key], bool):
                raise InputError(f"train.{key} must be true or false, got {tcfg[key]!r}")
        if tcfg["optimizer_kernel"] not in OPTIMIZER_KERNELS:
            raise InputError(f"train.optimizer_kernel must be one of {', '.join(OPTIMIZER_KERNELS)}, "
                             f"got {tcfg['optimizer_kernel']!r}")
        return cls(dtype, tcfg["compile"], tcfg["channels_last"], tcfg["optimizer_kernel"])

    def autocast_context(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None)

    def optimizer(self, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        # the three kernels compute the same update (up to rounding) and share one state-dict
        # layout, so a checkpoint written with one resumes with another
        kernel = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **kernel[self.optimizer_kernel])


def optimiser_step(loss_fn, batch: dict, optimizer: torch.optim.Optimizer, params: list, *, speed: Speed,
                   device: torch.device, scaler: torch.amp.GradScaler, grad_clip: float) -> torch.Tensor:
    """One optimiser step on ``loss_fn(batch)`` with the speed settings; returns the loss. A
    non-finite loss is returned before anything is updated (the caller decides what to say)."""
    with speed.autocast_context(device):
        loss = loss_fn(batch)
    if not torch.isfinite(loss):
        return loss
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss


# ---------------------------------------------------------------------------------
# learning rate, EMA


def stage_settings(model: GenerativeModel, stage: str) -> dict:
    try:
        sc = dict(model.stage_config(stage))
    except KeyError:
        raise InputError(f"config has no [{model.name}.{stage}] table with the training settings") from None
    missing = [k for k in STAGE_KEYS if k not in sc]
    if missing:
        raise InputError(f"[{model.name}.{stage}] lacks {', '.join(missing)}")
    if sc["schedule"] not in SCHEDULES:
        raise InputError(f"{model.name}.{stage}.schedule must be one of {', '.join(SCHEDULES)}, got {sc['schedule']!r}")
    for key in ("epochs", "batch_size"):
        if int(sc[key]) < 1:
            raise InputError(f"{model.name}.{stage}.{key} must be >= 1, got {sc[key]}")
    if not 0.0 <= float(sc["ema"]) < 1.0:
        raise InputError(f"{model.name}.{stage}.ema must be a decay in [0, 1), got {sc['ema']}")
    if float(sc["lr"]) <= 0:
        raise InputError(f"{model.name}.{stage}.lr must be positive, got {sc['lr']}")
    return sc


def learning_rate(sc: dict, stage_step: int, total_steps: int, plateau_scale: float, min_lr: float) -> float:
    """Linear warm-up over ``warmup_steps``, then the stage's schedule."""
    base = float(sc["lr"])
    warm = int(sc["warmup_steps"])
    factor = min(1.0, (stage_step + 1) / warm) if warm > 0 else 1.0
    if sc["schedule"] == "cosine":
        span = max(1, total_steps - warm)
        progress = min(1.0, max(0, stage_step - warm) / span)
        factor *= 0.5 * (1.0 + math.cos(math.pi * progress))
    elif sc["schedule"] == "plateau":
        return max(min_lr, base * plateau_scale) * factor
    return base * factor


class EMA:
    """Exponential moving average of parameters.

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so that
    short runs are not dominated by the initial weights."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params = params
        self.decay = float(decay)
        self.shadow = [p.detach().clone() for p in params]
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and averaged weights (call twice to undo)."""
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)

    def state_dict(self) -> dict:
        return {"shadow": [s.cpu() for s in self.shadow], "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise InputError("checkpoint EMA does not match the model's parameters")
        for s, saved in zip(self.shadow, state["shadow"]):
            if s.shape != saved.shape:
                raise InputError("checkpoint EMA does not match the model's parameters")
            s.copy_(saved)
        self.updates = int(state["updates"])


# ---------------------------------------------------------------------------------
# the run


@dataclass
class TrainState:
    """Everything about progress that a checkpoint must restore (besides tensors)."""

    stage_index: int = 0
    epoch: int = 0              # finished epochs of the current stage
    batch: int = 0              # next batch of the current epoch
    step: int = 0               # optimiser steps over all stages
    stage_step: int = 0
    loss_sum: float = 0.0       # running sums of the current epoch
    loss_count: int = 0
    best_val: float = math.inf
    bad_epochs: int = 0
    plateau_scale: float = 1.0
    plateau_best: float = math.inf
    plateau_bad: int = 0
    wall_s: float = 0.0
    stage_finished: bool = False   # early stop decided; the stage only has to be closed
    metrics: list = field(default_factory=list)


@dataclass
class TrainResult:
    run_dir: Path
    completed: bool
    step: int
    stopped_by: str | None = None   # "max_minutes" | "stop_after_steps" | None


@dataclass
class StageContext:
    """What one training stage is run with, built once by ``Trainer._setup_stage``."""

    stage: str
    settings: dict              # the stage's [<model>.<stage>] table
    params: list
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    data_order: torch.Generator
    loss_module: torch.nn.Module   # the model's loss, DDP-wrapped when distributed
    per_rank: int               # training examples each rank sees per epoch
    batch_size: int             # per rank
    steps_per_epoch: int
    total_steps: int
    last_checkpoint: float      # perf_counter time of the latest checkpoint

    @property
    def epochs(self) -> int:
        return int(self.settings["epochs"])


class _StageLoss(torch.nn.Module):
    """Gives DDP a forward() that is the model's loss for one stage."""

    def __init__(self, model: GenerativeModel, stage: str):
        super().__init__()
        self.model = model
        self.stage = stage

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.loss(batch, self.stage)


class _Stop(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _batches(arrays: dict[str, torch.Tensor], idx: torch.Tensor, device) -> dict[str, torch.Tensor]:
    return {k: v[idx.to(v.device)].to(device, non_blocking=True) for k, v in arrays.items()}


def read_training_data(path, keys: tuple[str, ...]) -> tuple[DataInfo, dict, dict]:
    """The :class:`DataInfo` of a data set's train split, its arrays ``keys`` plus ``sigma`` and
    ``v`` (which the info needs whatever the model reads), and the val arrays ``keys``."""
    train = read_split(path, "train", keys=tuple(dict.fromkeys(("sigma", "v") + tuple(keys))))
    info = DataInfo.from_arrays(train["sigma"], train["v"], train.get("gn_extra"))
    return info, train, read_split(path, "val", keys=tuple(keys))


class Trainer:
    def __init__(self, model_name: str, data_path, out_dir, cfg: dict, *, seed: int = 0,
                 device: str = "auto", max_minutes: float | None = None,
                 stop_after_steps: int | None = None, progress: bool | None = None):
        from dgm_eit import runtime

        self.model_cls = MODELS[model_name]
        self.model_name = model_name
        self.data_path = Path(data_path)
        self.out = Path(out_dir)
        self.cfg = cfg
        self.seed = check_seed(seed)   # before the run directory exists
        self.max_seconds = None if max_minutes is None else float(max_minutes) * 60.0
        if self.max_seconds is not None and self.max_seconds < 0:
            raise InputError(f"--max-minutes must be >= 0, got {max_minutes}")
        self.stop_after_steps = stop_after_steps
        tcfg = cfg["train"]
        self.tcfg = tcfg
        self.progress = bool(tcfg["progress"]) if progress is None else progress
        if model_name not in cfg:
            raise InputError(f"config has no [{model_name}] section")

        requested = runtime.resolve_device(device)
        self.dist = Dist.from_env(requested.type)
        if requested.type == "cuda" and self.dist.active:
            requested = torch.device("cuda", self.dist.local_rank)
        if requested.type == "cuda":
            if requested.index is None:   # set_device needs an index ("cuda" alone failed on the first GPU run)
                requested = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(requested)
        self.device = requested
        threads = int(tcfg["threads"]) or runtime.cpu_count()
        if self.device.type == "cpu" and self.dist.active:
            threads = max(1, threads // self.dist.world)
        runtime.limit_threads(threads)
        self.speed = Speed.from_config(tcfg, self.device)

    # -- set-up --------------------------------------------------------------------
    def _load_data(self) -> None:
        keys = tuple(self.model_cls.data_keys_for(self.cfg[self.model_name]))
        self.info, train, val = read_training_data(self.data_path, keys)
        # a NaN in the data would surface later as a NaN loss with advice to lower the lr
        for split, arrays in (("train", train), ("val", val)):
            for key, a in arrays.items():
                bad = ~np.isfinite(a.reshape(len(a), -1).sum(axis=1, dtype=np.float64))
                if bad.any():
                    raise InputError(f"{self.data_path}: {split}/{key} contains NaN or infinite values "
                                     f"(first in sample {int(np.flatnonzero(bad)[0])})")
        self.train_arrays = {k: torch.from_numpy(np.ascontiguousarray(train[k], dtype=np.float32)) for k in keys}
        self.val_arrays = {k: torch.from_numpy(np.ascontiguousarray(val[k], dtype=np.float32)) for k in keys}
        if self.device.type == "cuda":
            size = sum(t.numel() * t.element_size() for t in (*self.train_arrays.values(), *self.val_arrays.values()))
            if size < 8 * 2**30:   # the paper's splits are ~3 GB: keep them on the GPU, no per-step copies
                self.train_arrays = {k: t.to(self.device) for k, t in self.train_arrays.items()}
                self.val_arrays = {k: t.to(self.device) for k, t in self.val_arrays.items()}
        self.n_train = len(self.train_arrays[keys[0]])
        self.n_val = len(self.val_arrays[keys[0]])
        if self.n_train < 1:
            raise InputError(f"data file {self.data_path} has an empty train split")

    def _build_model(self) -> GenerativeModel:
        torch.manual_seed(self.seed)   # same initial weights on every rank and every run
        model = self.model_cls(self.cfg[self.model_name], self.info).to(self.device)
        if self.speed.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    # -- checkpoints ---------------------------------------------------------------
    def _checkpoint_path(self) -> Path:
        return self.out / runs.CHECKPOINT_FILE

    def _save_checkpoint(self, st: TrainState, optimizer, ema: EMA | None, epoch_gen_state) -> None:
        if not self.dist.main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "model_name": self.model_name,
            "train_state": st.__dict__.copy(),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "ema": ema.state_dict() if ema is not None else None,
            "scaler": self.scaler.state_dict() if getattr(self, "scaler", None) is not None else None,
            "data_generator": epoch_gen_state,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        write_bytes(self._checkpoint_path(), buf.getvalue())
        runs.write_training_metrics(self.out, st.metrics)

    def _load_checkpoint(self) -> dict | None:
        path = self._checkpoint_path()
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch.load raises many types on damaged files
            message = str(err)
            if "Weights only load failed" in message:
                # torch's advice (weights_only=False) would run whatever the file holds: never give it
                if "global" in message.lower():
                    raise InputError(f"checkpoint {path} is not a dgm-eit checkpoint: it holds pickled Python "
                                     "objects, which could run code when loaded (it may be unsafe), so it was "
                                     "not loaded; delete it to start the run again") from None
                detail = message.split("WeightsUnpickler error:")[-1].strip().splitlines()
                err = type(err)(detail[0] if detail and "WeightsUnpickler error:" in message
                                else "not a torch checkpoint")
            raise InputError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); "
                             "delete it to start the run again") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT \
                or state.get("model_name") != self.model_name:
            raise InputError(f"checkpoint {path} was not written by this trainer for model "
                             f"{self.model_name!r}; delete it to start the run again")
        try:
            self.model.load_state_dict(state["model"], strict=True)
        except RuntimeError as err:
            raise InputError(f"checkpoint {path} does not match the model ({runs.state_dict_error(err)}); "
                             "delete it to start again") from None
        return state

    # -- the loop ------------------------------------------------------------------
    def run(self) -> TrainResult:
        from contextlib import nullcontext

        from dgm_eit.files import output_lock, require_file

        try:
            # a missing, truncated, unfinished or empty data file is refused before the run
            # directory exists, so a failed start leaves no config.json that would tie --out
            # to this data path
            require_file(self.data_path, "data file")
            if split_sizes(self.data_path)["train"] < 1:
                raise InputError(f"data file {self.data_path} has an empty train split")
            # one writer per run directory, before any work (rank 0 speaks for the run)
            with output_lock(self.out, "dgm-eit train") if self.dist.main else nullcontext():
                return self._run()
        finally:
            self.dist.close()

    def _run(self) -> TrainResult:
        meta = runs.run_meta(self.model_name, self.data_path, self.seed, self.cfg, dataset_gn_settings(self.data_path))
        fresh = not self.out.exists()
        # rank 0 creates the directory first, so the others find a complete config.json
        if self.dist.main:
            finished = runs.prepare_run_dir(self.out, meta, create=True)
        self.dist.barrier()
        if not self.dist.main:
            finished = runs.prepare_run_dir(self.out, meta, create=False)
        if finished:
            return TrainResult(self.out, True, -1, None)
        try:
            self._load_data()
            self.model = self._build_model()
            for stage in self.model.stages:   # refused now, not after the first stage
                stage_settings(self.model, stage)
        except BaseException:
            # a run refused before training leaves no config.json to block the corrected command
            if fresh and self.dist.main:
                import shutil

                shutil.rmtree(self.out, ignore_errors=True)
            raise
        if self.dist.main:
            self.info.save(self.out / runs.DATA_INFO_FILE)

        saved = self._load_checkpoint()
        st = TrainState()
        if saved is not None:
            try:
                st = TrainState(**saved["train_state"])
            except (TypeError, KeyError) as err:
                raise InputError(f"checkpoint {self._checkpoint_path()} has an unknown layout ({err}); "
                                 "delete it to start the run again") from None
        self.started = time.perf_counter()
        self.steps_this_call = 0
        self.wall_at_start = st.wall_s
        # per-rank noise streams; rank 0 keeps the single-process stream
        torch.manual_seed(self.seed + 7919 * self.dist.rank)
        if saved is not None and not self.dist.active:
            torch.set_rng_state(saved["torch_rng"])
            if saved.get("cuda_rng") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state_all(saved["cuda_rng"])

        stages = self.model.stages
        while st.stage_index < len(stages):
            stopped = self._run_stage(st, stages[st.stage_index], saved)
            saved = None
            if stopped:
                self.dist.barrier()
                return TrainResult(self.out, False, st.step, stopped)
        if self.dist.main:
            runs.save_weights(self.model, runs.weights_path(self.out, "model"))
            runs.mark_finished(self.out, st.step, st.wall_s)
        self.dist.barrier()
        return TrainResult(self.out, True, st.step, None)

    def _wall(self) -> float:
        return self.wall_at_start + (time.perf_counter() - self.started)

    def _run_stage(self, st: TrainState, stage: str, saved: dict | None) -> str | None:
        """Train one stage to its end; the reason when a budget stopped it first, else None."""
        ctx = self._setup_stage(st, stage, saved)
        bar = None
        if self.progress and self.dist.main:
            from tqdm import tqdm
            bar = tqdm(total=ctx.total_steps, initial=st.stage_step, desc=f"{self.model.name}/{stage}",
                       unit="step", dynamic_ncols=True, file=sys.stderr, leave=True)
        try:
            while st.epoch < ctx.epochs and not st.stage_finished:
                self._train_epoch(ctx, st, bar)
                st.stage_finished = self._end_epoch(ctx, st)
                st.wall_s = self._wall()
                self._save_checkpoint(st, ctx.optimizer, ctx.ema, ctx.data_order.get_state())
                ctx.last_checkpoint = time.perf_counter()
        except _Stop as stop:
            return stop.reason
        finally:
            # closed first, so the CLI's "interrupted" line starts on a line of its own
            if bar is not None:
                bar.close()
        self._finish_stage(ctx, st)
        return None

    def _setup_stage(self, st: TrainState, stage: str, saved: dict | None) -> StageContext:
        """Optimiser, EMA, data order and loss module of ``stage``, restored from ``saved``
        (the checkpoint being resumed) when given."""
        model = self.model
        sc = stage_settings(model, stage)
        params = model.stage_parameters(stage)
        if not params:
            raise InputError(f"{model.name} stage {stage!r} has no parameters to train")
        trainable = {id(p) for p in params}
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)

        optimizer = self.speed.optimizer(params, float(sc["lr"]), float(sc["weight_decay"]))
        ema = EMA(params, float(sc["ema"])) if float(sc["ema"]) > 0 else None
        data_order = torch.Generator().manual_seed(self.seed * 1000 + st.stage_index)
        if saved is not None:
            if saved["optimizer"] is not None:
                try:
                    optimizer.load_state_dict(saved["optimizer"])
                except (ValueError, KeyError) as err:
                    raise InputError(f"checkpoint optimiser state does not match ({err}); delete "
                                     f"{self._checkpoint_path()} to start again") from None
            if ema is not None:
                if saved["ema"] is None:
                    raise InputError("checkpoint has no EMA state but the stage uses EMA; delete it to start again")
                ema.load_state_dict(saved["ema"])
            try:
                data_order.set_state(saved["data_generator"])
            except (RuntimeError, TypeError) as err:
                raise InputError(f"checkpoint data-order state is damaged ({err}); delete "
                                 f"{self._checkpoint_path()} to start again") from None

        loss_module = _StageLoss(model, stage)
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            loss_module = DDP(loss_module, device_ids=ids)
        if self.speed.compile:
            loss_module = torch.compile(loss_module)
        # float16 gradients underflow without loss scaling; bfloat16 and float32 need none
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.speed.autocast == torch.float16)
        if saved is not None and saved.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(saved["scaler"])

        batch_size = int(sc["batch_size"])
        per_rank = self.n_train // self.dist.world
        if per_rank < 1:
            raise InputError(f"train split has {self.n_train} examples, fewer than {self.dist.world} ranks")
        # BatchNorm cannot train on a batch of one; drop a short last batch when there are full ones
        steps_per_epoch = per_rank // batch_size if per_rank >= batch_size else 1
        return StageContext(stage=stage, settings=sc, params=params, optimizer=optimizer, ema=ema,
                            data_order=data_order, loss_module=loss_module, per_rank=per_rank,
                            batch_size=min(batch_size, per_rank), steps_per_epoch=steps_per_epoch,
                            total_steps=steps_per_epoch * int(sc["epochs"]), last_checkpoint=time.perf_counter())

    def _learning_rate(self, ctx: StageContext, st: TrainState) -> float:
        return learning_rate(ctx.settings, st.stage_step, ctx.total_steps, st.plateau_scale,
                             float(self.tcfg["min_lr"]))

    def _train_epoch(self, ctx: StageContext, st: TrainState, bar) -> None:
        """The batches of one epoch from ``st.batch`` on; raises :class:`_Stop` when a budget runs
        out (after a checkpoint, as on Ctrl-C)."""
        model, sc = self.model, ctx.settings
        # a checkpoint taken mid-epoch stores this state: resume regenerates the permutation
        epoch_start = ctx.data_order.get_state()
        perm = torch.randperm(self.n_train, generator=ctx.data_order)
        mine = perm[self.dist.rank::self.dist.world][:ctx.per_rank]
        checkpoint_every = float(self.tcfg["checkpoint_minutes"]) * 60.0
        model.set_train_mode(ctx.stage)
        try:
            while st.batch < ctx.steps_per_epoch:
                idx = mine[st.batch * ctx.batch_size:(st.batch + 1) * ctx.batch_size]
                batch = _batches(self.train_arrays, idx, self.device)
                lr = self._learning_rate(ctx, st)
                for group in ctx.optimizer.param_groups:
                    group["lr"] = lr
                loss = optimiser_step(ctx.loss_module, batch, ctx.optimizer, ctx.params, speed=self.speed,
                                      device=self.device, scaler=self.scaler, grad_clip=float(sc["grad_clip"]))
                if not torch.isfinite(loss):
                    raise InputError(f"{model.name} stage {ctx.stage!r}: loss is {loss.item()} at step "
                                     f"{st.step}; lower {model.name}.{ctx.stage}.lr or set grad_clip")
                if ctx.ema is not None:
                    ctx.ema.update()
                st.loss_sum += float(loss.detach())
                st.loss_count += 1
                st.batch += 1
                st.step += 1
                st.stage_step += 1
                self.steps_this_call += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=f"{st.epoch + 1}/{sc['epochs']}",
                                    loss=f"{st.loss_sum / st.loss_count:.4g}", lr=f"{lr:.2g}")
                reason = None
                if self.max_seconds is not None and time.perf_counter() - self.started >= self.max_seconds:
                    reason = "max_minutes"
                if self.stop_after_steps is not None and self.steps_this_call >= self.stop_after_steps:
                    reason = "stop_after_steps"
                if self.dist.any_flag(reason is not None, self._flag_device()):
                    raise _Stop(reason or "max_minutes")
                if time.perf_counter() - ctx.last_checkpoint >= checkpoint_every and st.batch < ctx.steps_per_epoch:
                    st.wall_s = self._wall()
                    self._save_checkpoint(st, ctx.optimizer, ctx.ema, epoch_start)
                    ctx.last_checkpoint = time.perf_counter()
        except (_Stop, KeyboardInterrupt):
            st.wall_s = self._wall()
            self._save_checkpoint(st, ctx.optimizer, ctx.ema, epoch_start)
            raise

    def _finish_stage(self, ctx: StageContext, st: TrainState) -> None:
        """Close the stage: its averaged weights stay (later stages build on them) and the
        state moves to the next stage, checkpointed."""
        if ctx.ema is not None:
            ctx.ema.swap()
        st.stage_index += 1
        st.epoch = st.batch = st.stage_step = st.loss_count = 0
        st.stage_finished = False
        st.loss_sum = 0.0
        st.best_val, st.bad_epochs = math.inf, 0
        st.plateau_scale, st.plateau_best, st.plateau_bad = 1.0, math.inf, 0
        st.wall_s = self._wall()
        next_order = torch.Generator().manual_seed(self.seed * 1000 + st.stage_index).get_state()
        self._save_checkpoint(st, None, None, next_order)

    def _flag_device(self):
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _end_epoch(self, ctx: StageContext, st: TrainState) -> bool:
        """Validate, keep the best weights, step the plateau schedule, log the epoch; True when
        the stage stops early."""
        sc, ema = ctx.settings, ctx.ema
        lr = self._learning_rate(ctx, st)
        train_loss = self.dist.mean(st.loss_sum / max(1, st.loss_count), self._flag_device())
        if ema is not None:
            ema.swap()
        try:
            val_loss = self.validate(ctx.stage, int(sc["batch_size"]))
            score = val_loss if math.isfinite(val_loss) else train_loss
            improved = score < st.best_val
            if improved:
                st.best_val = score
                st.bad_epochs = 0
                if self.dist.main:
                    runs.save_weights(self.model, runs.weights_path(self.out, "best"))
            else:
                st.bad_epochs += 1
        finally:
            if ema is not None:
                ema.swap()
        if sc["schedule"] == "plateau":
            if score < st.plateau_best * (1 - 1e-4):
                st.plateau_best, st.plateau_bad = score, 0
            else:
                st.plateau_bad += 1
                if st.plateau_bad > int(self.tcfg["plateau_patience"]):
                    st.plateau_scale *= float(self.tcfg["plateau_factor"])
                    st.plateau_bad = 0
        st.epoch += 1
        st.metrics.append({
            "stage": ctx.stage, "epoch": st.epoch, "step": st.step,
            "train_loss": f"{train_loss:.6g}", "val_loss": f"{val_loss:.6g}", "lr": f"{lr:.6g}",
            "wall_s": f"{self._wall():.2f}",
        })
        st.batch = st.loss_count = 0
        st.loss_sum = 0.0
        patience = int(sc["patience"])
        return patience > 0 and st.bad_epochs >= patience

    @torch.no_grad()
    def validate(self, stage: str, batch_size: int) -> float:
        """Mean validation loss; noise drawn from a fixed seed so epochs compare fairly."""
        if self.n_val == 0:
            return math.nan
        model = self.model
        model.eval()
        size = max(batch_size, int(self.tcfg["val_batch_size"]))
        devices = [self.device] if self.device.type == "cuda" else []
        total, count = 0.0, 0
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + 104729)
            for start in range(0, self.n_val, size):
                idx = torch.arange(start, min(start + size, self.n_val))
                batch = _batches(self.val_arrays, idx, self.device)
                with self.speed.autocast_context(self.device):
                    loss = model.loss(batch, stage)
                total += float(loss) * len(idx)
                count += len(idx)
        return total / count


def train(model_name: str, data_path, out_dir, cfg: dict, *, seed: int = 0, device: str = "auto",
          max_minutes: float | None = None, stop_after_steps: int | None = None,
          progress: bool | None = None) -> TrainResult:
    """Train ``model_name`` on ``data_path`` into ``out_dir``; resumes a run made with the same
    arguments. ``stop_after_steps`` interrupts after that many optimiser steps (as a kill
    would, but with a checkpoint); tests use it to check resume."""
    return Trainer(model_name, data_path, out_dir, cfg, seed=seed, device=device, max_minutes=max_minutes,
                   stop_after_steps=stop_after_steps, progress=progress).run()
