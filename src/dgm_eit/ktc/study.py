"""``dgm-eit run --profile ktc``: the registered methods (:mod:`dgm_eit.methods`) on the real
KTC2023 tank, with the tank's physics (:mod:`dgm_eit.ktc.physics`).

Stages, in order, each reused when its output exists (re-run the command to resume):

1. ``DIR/data/ktc.h5``: simulated tank data (:mod:`dgm_eit.ktc.simulate`), with the
   linearised step's prior chosen on its validation split;
2. ``DIR/runs/<label>/seed<k>``: the model of every trained method of ``run.methods``,
   ``run.seeds`` times each (seed k from :func:`dgm_eit.runtime.training_seed`), trained by the
   same trainer as in the paper's study (two at a time on two cores);
3. ``DIR/methods.json``: every method's own settings (a classical method's, a sampler's t0) and
   segmentation thresholds, chosen on the first ``run.tune_images`` simulated validation
   images by the challenge's score -- never on the real targets; for a trained method once
   per seed, and with several seeds for its seed ensemble too;
4. ``DIR/submissions/<method>[/seed<k>]/level_<L>/<n>.mat``: the four public targets at every
   level of ``run.levels``, in the challenge's output format, then ``scores.csv``,
   ``report.md`` and ``figures/`` (recomputed on every run).
"""

from __future__ import annotations

import json
import sys
import time
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np

from dgm_eit.datasets import ktc2023 as ktc
from dgm_eit.errors import InputError
from dgm_eit.files import read_json, write_text
from dgm_eit.ktc.physics import TankPhysics
from dgm_eit.ktc.report import write_report
from dgm_eit.methods import Method, get_method, method_problem, select_methods, trainers
from dgm_eit.models import MODELS
from dgm_eit.stages import MANIFEST, StageJob, StudyPlan, dataset_done, simulate_stage, train_stage

# keys a re-run may change: which methods and levels are reported, and how the work is spread
RESUME_FREE = ("run.methods", "run.levels", "run.figure_level", "run.jobs", "run.train_max_minutes",
               "run.expected_time", "run.seeds", "run.bootstrap_resamples", "train.progress", "train.threads")
DATA_LABEL = "ktc"   # the data set's name in the training seeds' rule
DATA_FILE = "data/ktc.h5"
# a packed study's copy of its data set's linearised-step settings (the data set stays behind)
LINEAR_SETTINGS = "linear_settings.json"
# a sampler's own settings, chosen on validation: what a seed ensemble's members keep of their seed's choice
SAMPLER_SETTINGS = ("t0", "n_steps", "dc_weight")
# the report's name for each step's time
TIMINGS = {"data": "simulate", "training": "train", "choice": "choose settings on validation",
           "evaluation": "reconstruct the real targets"}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_methods(cfg: dict) -> list[Method]:
    """The registered methods of ``run.methods`` in table order, each trained one followed by its
    seed ensemble when ``run.seeds`` > 1; a method the tank cannot run is refused, saying why."""
    from dgm_eit.runtime import check_seed_settings

    ensembles = check_seed_settings(cfg["run"]) > 1
    methods = select_methods(cfg["run"]["methods"], ensembles=ensembles, classical=TankPhysics.classical_kinds)
    for m in methods:
        problem = method_problem(m, cfg, TankPhysics.classical_kinds, TankPhysics.data_term_samplers)
        if problem:
            raise InputError(f"run.methods: the KTC study cannot run {m.key!r}: {problem}")
        own = m.configure(cfg)   # a method's own config key that the profile lacks is refused here
        if m.model and MODELS[m.model].reads_extra(own[m.model]) and not own["linear"]["extra_images"]:
            raise InputError(f"{m.model}.inputs has 'extra', but linear.extra_images is empty: "
                             "the data set would have no extra classical images")
    return methods


def as_method(method: Method | str) -> Method:
    return method if isinstance(method, Method) else get_method(method)


def seeded(method: Method | str) -> bool:
    return as_method(method).seeded


def run_dir(root: Path, label: str, seed_index: int) -> Path:
    return Path(root) / "runs" / label / f"seed{seed_index}"


def data_path(root: Path) -> Path:
    return Path(root) / DATA_FILE


def linear_settings(root: Path) -> dict:
    """The linearised step's settings the study's data set chose (its prior), from the data set
    or, in a study packed without it (``dgm-eit ktc-pack``), from the record it keeps of them;
    ``{}`` when neither is there (the config's ``[linear]`` is then used as it stands)."""
    from dgm_eit.data.storage import dataset_gn_settings

    data, record = data_path(root), Path(root) / LINEAR_SETTINGS
    if data.is_file():
        return dataset_gn_settings(data)
    if record.is_file():
        return read_json(record, "pack the study again (dgm-eit ktc-pack)")
    return {}


class Methods:
    """The registered methods on one study directory, for simulated or real difference data: the
    trained ones with the models of ``runs/<label>/seed<k>``, all with the tank's physics."""

    def __init__(self, cfg: dict, root: Path, *, seed: int = 0, device: str = "cpu",
                 linear_model: dict | None = None):
        """``linear_model``: CSD*'s data term as the study recorded it
        (:func:`dgm_eit.ktc.physics.recorded_linear_model`); None fits it on the data set's
        training split when a method first needs it."""
        from dgm_eit.ktc.simulate import apply_linear_settings
        from dgm_eit.runtime import check_seed_settings

        self.root, self.seed, self.device = Path(root), int(seed), device
        self.n_seeds = check_seed_settings(cfg["run"])
        self.linear_settings = linear_settings(self.root)
        self.cfg = apply_linear_settings(cfg, self.linear_settings)
        self.physics = TankPhysics(self.cfg, data_path(self.root), linear_model)
        self._models: dict[tuple[str, int], object] = {}

    @property
    def sim(self):
        return self.physics.sim

    def model(self, method: Method, seed_index: int = 0):
        if (method.label, seed_index) not in self._models:
            from dgm_eit.runs import load_run

            where = run_dir(self.root, method.label, seed_index)
            self._models[method.label, seed_index] = load_run(where, self.device)[0]
        return self._models[method.label, seed_index]

    def training_seed(self, method: Method, seed_index: int) -> int:
        from dgm_eit.runtime import training_seed

        return training_seed(self.seed, method.label, DATA_LABEL, seed_index)

    def reconstruct(self, method: Method | str, dv: np.ndarray, masks: np.ndarray, settings: dict | None = None,
                    seed_index: int = 0) -> dict:
        """``dv`` (N, M) difference voltages (NaN allowed where masked), ``masks`` (N, M) bool ->
        ``{"recon": (N, H, W)}`` relative conductivity (+ ``"recon_std"`` for sampled methods).

        A trained method uses the model of seed ``seed_index``; a seed ensemble pools every
        seed's reconstruction, each with that seed's own settings (``settings["members"]``)."""
        from dgm_eit.models.posterior import SAMPLERS_ON_VOLTAGES
        from dgm_eit.reconstruct import pool_members, reconstruct_arrays

        method, settings, run = as_method(method), settings or {}, self.cfg["run"]
        if method.ensemble:
            base = get_method(method.ensemble_of)
            members = settings.get("members") or [{}] * self.n_seeds
            n = base.n_samples(run) or 1
            return pool_members([{**self.reconstruct(base, dv, masks, member, k), "n_samples": n}
                                 for k, member in enumerate(members)])
        if method.model is None:
            return {"recon": self.physics.classical(method.classical, dv, masks, settings)}
        start = self.physics.classical_image(dv, masks)
        n = settings.get("n_samples", method.n_samples(run))
        model, seed = self.model(method, seed_index), self.training_seed(method, seed_index)
        sampler = method.sampler(run)
        csd = {**self.cfg["csd"], **{k: settings[k] for k in SAMPLER_SETTINGS if k in settings}}
        if sampler in SAMPLERS_ON_VOLTAGES:
            settings = {**csd, "sampler": sampler, "n_samples": int(n or 1)}
            return self.physics.sample(model, start, dv, masks, settings, seed)
        opts = {"n_samples": None if n is None else int(n)}
        if sampler is not None:
            opts.update(config=method.configure(self.cfg), sampler=sampler, t0=float(csd["t0"]),
                        n_steps=int(csd["n_steps"]))
        v = np.where(masks, np.nan_to_num(dv), 0.0)
        extra = self.physics.extra_images(dv, masks) if model.needs_extra else None
        out = reconstruct_arrays(model, v, start, seed=seed, extra=extra, **opts)
        return {k: out[k] for k in ("recon", "recon_std") if k in out}


def load_study(run_dir) -> tuple[dict, dict]:
    """``(config, chosen settings per method)`` of a finished ``dgm-eit run --profile ktc`` directory."""
    root = Path(run_dir)
    if not (root / MANIFEST).is_file():
        raise InputError(f"{root} is not a directory made by dgm-eit run --profile ktc (no {MANIFEST})")
    cfg = read_json(root / MANIFEST, "re-run dgm-eit run --profile ktc").get("config", {})
    from dgm_eit.ktc.simulate import is_ktc

    if not is_ktc(cfg):
        raise InputError(f"{root} holds a run of the paper's study, not of the KTC tank (--profile ktc)")
    if not (root / "methods.json").is_file():
        raise InputError(f"{root} has no methods.json: the study has not finished; re-run the same "
                         "dgm-eit run command to finish it")
    chosen = read_json(root / "methods.json", "re-run the same dgm-eit run command to make it again")
    methods = check_methods(cfg)
    old = [m.key for m in methods if m.seeded and m.key in chosen and "seeds" not in chosen[m.key]]
    if old:
        raise InputError(f"{root} was made by an earlier dgm-eit (one model per method, no seeds: {', '.join(old)}); "
                         "make the study again with this version")
    missing = [m.key for m in methods if "score" not in chosen.get(m.key, {})]
    if missing:
        raise InputError(f"{root} has not finished: its methods.json has no settings for {', '.join(missing)} "
                         "of run.methods; re-run the same dgm-eit run command to finish it")
    return cfg, chosen


def validation_set(methods: Methods, n: int) -> dict:
    """The first ``n`` validation samples, remade from the data set's seed: difference
    voltages, masks, 32-px targets and 256-px class truths."""
    sim, seed = methods.sim, methods.seed
    rows = [sim.measure(seed, "val", i) for i in range(n)]
    return {"dv": np.stack([r["v"] for r in rows]), "masks": np.stack([r["mask"] for r in rows]),
            "truths": np.stack([sim.truth_classes(seed, "val", i) for i in range(n)])}


def _tunes(method: Method, run: dict) -> bool:
    """Whether the method's sampler settings are chosen on validation data (as in the paper's study)."""
    from dgm_eit.models.posterior import TUNABLE_SAMPLERS

    return method.tunes_t0 and method.sampler(run) in TUNABLE_SAMPLERS and bool(run["csd_tune_t0"])


def _candidates(methods: Methods, method: Method, val: dict, log: Callable, seed_index: int = 0,
                chosen: dict | None = None) -> list[tuple[dict, np.ndarray]]:
    """``(settings, validation images)`` of every setting a method tries on validation data
    (a seed ensemble tries one: its seeds with their own chosen settings)."""
    from dgm_eit.ktc.segment import tune_thresholds, upsample
    from dgm_eit.models.posterior import SAMPLERS_ON_VOLTAGES

    if method.ensemble:
        seeds = chosen[method.ensemble_of]["seeds"][:methods.n_seeds]
        members = [{k: seed[k] for k in SAMPLER_SETTINGS if k in seed} for seed in seeds]
        return [({"members": members}, methods.reconstruct(method, val["dv"], val["masks"], {"members": members})["recon"])]
    if method.model is None:
        return methods.physics.candidates(method.classical, val["dv"], val["masks"])
    run = methods.cfg["run"]
    if not _tunes(method, run):
        return [({}, methods.reconstruct(method, val["dv"], val["masks"], seed_index=seed_index)["recon"])]
    # t0, steps (and a data term's weight) on a subset with one sample, then the full set
    n = min(int(run["csd_tune_images"]), len(val["dv"]))
    weights = run["csd_tune_dc_weight"] if method.sampler(run) in SAMPLERS_ON_VOLTAGES else [None]
    best = None
    for t0 in run["csd_tune_t0"]:
        for steps in run["csd_tune_steps"]:
            for weight in weights:
                s = {"t0": float(t0), "n_steps": int(steps)} | ({} if weight is None else {"dc_weight": float(weight)})
                images = methods.reconstruct(method, val["dv"][:n], val["masks"][:n], {**s, "n_samples": 1},
                                             seed_index)["recon"]
                score = tune_thresholds(upsample(images), val["truths"][:n])["score"]
                log(f"  {method.key} {', '.join(f'{k} = {v:g}' for k, v in s.items())}: val score {score:.3f} "
                    f"({n} images, 1 sample)")
                if best is None or score > best[1]:
                    best = (s, score)
    return [(best[0], methods.reconstruct(method, val["dv"], val["masks"], best[0], seed_index)["recon"])]


def choose_settings(methods: Methods, method: Method | str, val: dict, log: Callable = _log, seed_index: int = 0,
                    chosen: dict | None = None) -> dict:
    """A method's own settings and thresholds (for a trained method: those of seed
    ``seed_index``'s model), by the mean challenge score on ``val``."""
    from dgm_eit.ktc.segment import tune_thresholds, upsample
    from dgm_eit.models.posterior import SAMPLERS_ON_VOLTAGES

    method = as_method(method)
    started = time.perf_counter()
    rows = []
    for settings, images in _candidates(methods, method, val, log, seed_index, chosen):
        seg = tune_thresholds(upsample(images), val["truths"])
        rows.append({**settings, **{k: seg[k] for k in ("low", "high", "score", "resistive", "conductive",
                                                          "image_scores")}})
    best = max(rows, key=lambda r: r["score"])
    best = {**best, "n_images": len(val["dv"]), "seconds": time.perf_counter() - started}
    if len(rows) > 1:
        best["candidates"] = [{k: v for k, v in r.items() if k != "image_scores"} for r in rows]
    if method.seeded and method.sampler(methods.cfg["run"]) in SAMPLERS_ON_VOLTAGES:
        best.update(methods.physics.data_term_record())
    which = f"{method.key} seed {seed_index}" if method.seeded else method.key
    log(f"  {which}: thresholds {best['low']:g} / {best['high']:g}, val score {best['score']:.3f} "
        f"({best['seconds']:.0f} s, {best['seconds'] / best['n_images']:.2f} s per image)")
    return best


def seed_record(seeds: list[dict]) -> dict:
    """A trained method's entry of ``methods.json``: every seed's own choice, and their mean score."""
    scores = [r["score"] for r in seeds]
    return {"seeds": seeds, "score": float(np.mean(scores)),
            "seed_std": float(np.std(scores, ddof=1)) if len(scores) > 1 else None}


def image_scores(record: dict) -> np.ndarray:
    """(seeds, images) validation scores of a ``methods.json`` entry (one row unless seeded)."""
    return np.array([r["image_scores"] for r in record.get("seeds", [record])], dtype=np.float64)


def validation_intervals(chosen: dict, *, resamples: int, seed: int = 0) -> dict:
    """Per method: its mean validation score with a 95% bootstrap interval over the validation
    images, and its seeds when it has several (:func:`dgm_eit.stats.mean_interval`)."""
    from dgm_eit.stats import mean_interval

    return {m: mean_interval(image_scores(r), resamples=resamples, seed=seed) for m, r in chosen.items()}


def validation_pairs(chosen: dict, *, resamples: int, seed: int = 0) -> dict:
    """Per pair of methods ``(a, b)`` (in ``chosen``'s order): the mean validation score of
    ``a`` minus ``b`` with a paired 95% bootstrap interval over the images and seed pairs
    (:func:`dgm_eit.stats.paired_interval`)."""
    from itertools import combinations

    from dgm_eit.stats import paired_interval

    return {(a, b): paired_interval(image_scores(chosen[a]), image_scores(chosen[b]), resamples=resamples, seed=seed)
            for a, b in combinations(chosen, 2)}


def default_method(chosen: dict, *, resamples: int, seed: int = 0) -> tuple[str, str]:
    """The method ``dgm-eit ktc`` uses without ``--method``, and why (one line).

    The highest mean validation score wins (a trained method: the mean over its seeds). Where
    the runner-up's 95% interval (bootstrap over the validation images, and the seeds) overlaps
    the winner's, the methods are tied and the best-scoring seed ensemble among the tied is
    used (it averages out the seed noise that makes the tie); with no ensemble among them,
    the winner."""
    if not all("image_scores" in r for m, r in chosen.items() if not seeded(m)):
        best = max(chosen, key=lambda m: chosen[m]["score"])   # a study made before the per-image scores
        return best, f"best mean validation score ({chosen[best]['score']:.3f}; no intervals in this older study)"
    intervals = validation_intervals(chosen, resamples=resamples, seed=seed)
    order = sorted(intervals, key=lambda m: -intervals[m].change)
    best = order[0]

    def text(m):
        iv = intervals[m]
        return f"{get_method(m).name} {iv.change:.3f} [{iv.low:.3f}, {iv.high:.3f}]"

    if len(order) == 1 or not intervals[order[1]].overlaps(intervals[best]):
        why = f"best mean validation score, clear of the runner-up: {text(best)}" + (
            f" vs {text(order[1])}" if len(order) > 1 else "")
        return best, why
    tied = [m for m in order if intervals[m].overlaps(intervals[best])]
    ensembles = [m for m in tied if get_method(m).ensemble]
    pick = ensembles[0] if ensembles else best
    rule = "the best-scoring seed ensemble among them" if ensembles else "the best mean, no ensemble among them"
    return pick, (f"validation scores tied (overlapping 95% intervals: {', '.join(text(m) for m in tied)}); "
                  f"{rule}")


def real_targets(directory: Path, levels, truths: bool = True) -> tuple[list[int], dict]:
    """The targets ``data<n>.mat`` of ``directory`` with ``ref.mat`` (:func:`ktc.read_targets`):
    per level, difference voltages and masks (N, M), plus, with ``truths``, the truths where
    ``true<n>.mat`` exist (the entry point never reads them)."""
    directory = Path(directory)
    ref, by_number = ktc.read_targets(directory)
    numbers, frames = list(by_number), list(by_number.values())
    out = {}
    for level in levels:
        mask = ktc.level_mask(level, ref.injections, ref.pattern) & np.isfinite(ref.voltages)
        dv = np.stack([f.voltages - ref.voltages for f in frames])
        out[level] = {"dv": dv, "masks": mask[None, :] & np.isfinite(dv)}
    truth_maps = {n: ktc.load_truth(directory / f"true{n}.mat") for n in numbers
                  if truths and (directory / f"true{n}.mat").is_file()}
    return numbers, {"levels": out, "truths": truth_maps}


def write_submission(directory: Path, numbers, classes: np.ndarray) -> None:
    """``<n>.mat`` with a uint8 ``reconstruction`` per target, as the challenge's entry point writes."""
    directory.mkdir(parents=True, exist_ok=True)
    for n, image in zip(numbers, classes):
        ktc.write_reconstruction(directory / f"{n}.mat", image)


class Study(StudyPlan):
    """The tank study as the stage jobs of every step (:class:`~dgm_eit.stages.StudyPlan` runs
    them). It stops at a step with a stage not done: every choice needs every method trained.
    The choices and the real targets' evaluation are stages run here (the GN path spreads over
    a pool of its own)."""

    resume_free = RESUME_FREE
    stops_at_failure = True

    def __init__(self, cfg: dict, out, *, seed: int = 0, device: str = "cpu", log: Callable = _log):
        from dgm_eit.ktc.simulate import is_ktc

        if not is_ktc(cfg):
            raise InputError("the KTC study needs a config with a [tank] section (--profile ktc)")
        super().__init__(cfg, out, seed=seed, device=device, log=log)
        self.methods_list = check_methods(cfg)
        self.levels = [int(k) for k in cfg["run"]["levels"]]
        if not self.levels or any(k not in ktc.LEVELS for k in self.levels):
            raise InputError(f"run.levels must list levels among 1..7, got {cfg['run']['levels']}")
        self.results: dict | None = None

    @cached_property
    def methods(self) -> Methods:
        return Methods(self.cfg, self.root, seed=self.seed, device=self.device)

    def data_jobs(self) -> list[StageJob]:
        data = data_path(self.root)
        data.parent.mkdir(parents=True, exist_ok=True)
        # the simulator spreads its samples over the cores itself: one stage, run here
        return [StageJob("simulate the tank data", lambda: dataset_done(data, self.log), simulate_stage,
                         dict(cfg=self.cfg, out=data, seed=self.seed), here=True)]

    def training_jobs(self) -> list[StageJob]:
        # seed 0 of every model first, the slowest first within a seed
        return [self._train_job(m, k) for k in range(self.n_seeds) for m in trainers(self.methods_list)]

    def choice_jobs(self) -> list[StageJob]:
        return [StageJob("choose settings and thresholds on validation", lambda: not self._unchosen(self._chosen()),
                         self._choose, {}, here=True)]

    def evaluation_jobs(self) -> list[StageJob]:
        # made again on every run (cheap): done once this run has them
        return [StageJob("reconstruct the real targets", lambda: self.results is not None, self._targets, {},
                         here=True)]

    def report(self, ok: dict[str, bool], seconds: dict[str, float]) -> dict:
        chosen = self._chosen()
        resamples = int(self.cfg["run"]["bootstrap_resamples"])
        mine = {m.key: chosen[m.key] for m in self.methods_list}
        manifest = {"seed": self.seed, "timings": {TIMINGS[step]: t for step, t in seconds.items()},
                    "resamples": resamples, "default": default_method(mine, resamples=resamples),
                    "val_intervals": validation_intervals(mine, resamples=resamples),
                    "val_pairs": validation_pairs(mine, resamples=resamples)}
        paths = write_report(self.root, self.cfg, self.methods, chosen, self.results, manifest)
        return {"chosen": chosen, "results": self.results, "paths": paths}

    def _train_job(self, method: Method, seed_index: int) -> StageJob:
        from dgm_eit.runs import is_finished
        from dgm_eit.runtime import training_seed

        out = run_dir(self.root, method.label, seed_index)
        out.parent.mkdir(parents=True, exist_ok=True)
        return StageJob(f"train {method.label}, seed {seed_index}", lambda: is_finished(out), train_stage,
                        dict(model=method.model, data=data_path(self.root), run_dir=out, cfg=method.configure(self.cfg),
                             device=self.device, seed=training_seed(self.seed, method.label, DATA_LABEL, seed_index)))

    def _chosen(self) -> dict:
        path = self.root / "methods.json"
        return read_json(path, "the chosen method settings") if path.is_file() else {}

    def _unchosen(self, chosen: dict) -> list[Method]:
        """The methods whose choice ``chosen`` lacks: a classical method holds its choice, a
        trained method one per seed, an ensemble one made of this run's seeds (a run that raised
        or lowered --seeds chooses it again)."""
        return [m for m in self.methods_list if "score" not in chosen.get(m.key, {})
                or (m.seeded and len(chosen[m.key]["seeds"]) < self.n_seeds)
                or (m.ensemble and len(chosen[m.key].get("members", [])) != self.n_seeds)]

    def _choose(self) -> None:
        """``methods.json``, written after every choice, so a killed study resumes at the next one."""
        path, chosen = self.root / "methods.json", self._chosen()
        missing = self._unchosen(chosen)
        n = min(int(self.cfg["run"]["tune_images"]), int(self.cfg["data"]["n_val"]))
        self.log(f"[stage] choose settings and thresholds on {n} validation images: "
                 f"{', '.join(m.key for m in missing)}")
        methods, val = self.methods, validation_set(self.methods, n)
        for m in missing:   # in report order: an ensemble after its seeds
            if m.seeded:
                seeds = chosen.get(m.key, {}).get("seeds", [])[:self.n_seeds]
                for k in range(len(seeds), self.n_seeds):
                    seeds.append(choose_settings(methods, m, val, self.log, k))
                    chosen[m.key] = {"seeds": seeds}
                    write_text(path, json.dumps(chosen, indent=2))
                chosen[m.key] = seed_record(seeds)
            else:
                chosen[m.key] = choose_settings(methods, m, val, self.log, chosen=chosen)
            write_text(path, json.dumps(chosen, indent=2))

    def _targets(self) -> None:
        from dgm_eit.ktc.segment import segment_images

        from dgm_eit.ktc.tank import public_dir

        methods, chosen = self.methods, self._chosen()
        numbers, real = real_targets(public_dir(), self.levels)
        # "methods": the first seed's model of each trained method (and every other method), as
        # the figure shows them; "seeds": every seed's, per trained method
        results = {"numbers": numbers, "truths": real["truths"], "methods": {}, "seeds": {}}
        for m in self.methods_list:
            records = chosen[m.key]["seeds"] if m.seeded else [chosen[m.key]]
            runs = []
            for k, record in enumerate(records):
                where = self.root / "submissions" / m.key / (f"seed{k}" if m.seeded else "")
                per_level = {}
                for level in self.levels:
                    data = real["levels"][level]
                    start = time.perf_counter()
                    out = methods.reconstruct(m, data["dv"], data["masks"], record, k)
                    seconds = (time.perf_counter() - start) / len(numbers)
                    classes = segment_images(out["recon"], record["low"], record["high"])
                    write_submission(where / f"level_{level}", numbers, classes)
                    scores = [ktc.score(c, real["truths"][n]) for c, n in zip(classes, numbers)]
                    per_level[level] = {**out, "classes": classes, "scores": scores, "seconds_per_image": seconds}
                runs.append(per_level)
                total = sum(sum(r["scores"]) for r in per_level.values())
                which = f"{m.key} seed {k}" if m.seeded else m.key
                self.log(f"[done] {which}: " + ", ".join(f"L{lv} {sum(r['scores']):.2f}" for lv, r in per_level.items())
                         + f" (total {total:.2f})")
            results["methods"][m.key] = runs[0]
            results["seeds"][m.key] = runs
        self.results = results
