"""The reconstruction methods a study compares: one registered :class:`Method` record each.

A method turns a test set's measurements into images: one of a study's classical
reconstructions (GN and the one-step linearised reconstruction, registered here; a study
makes the ones it has, :class:`StudyPhysics`) or a trained model used one way (the score
prior serves several methods, CSD* and guided CSD). Each model file registers its methods
next to its model, as score_sde_pytorch registers its models, so both studies' runners
(:mod:`dgm_eit.experiments`, :mod:`dgm_eit.ktc.study`), their reports and the CLI learn of a
new method from the registry alone.

Every method with a trained model also gets a seed ensemble, registered with it
(:meth:`Method.as_ensemble`): with ``run.seeds`` K > 1 the model is trained K times and the
ensemble pools the K models' reconstructions (the posterior samples of all K for a sampling
method, the average of the K images for a deterministic one), its std map the spread over
all of them.

The paper's own variants are methods too (``cvae-v``: the CVAE that reads the voltages;
``csd-plain``: CSD* without data consistency), registered beside the profiles' choices: a
method may train its model with config values of its own (:attr:`Method.model_config`, in
run directories of its own, :attr:`Method.run_label`) or fix its sampler, and it says which
row of the paper's tables it reproduces and under which config (:meth:`Method.paper_row_for`),
so the report puts the paper's numbers beside that row only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Iterable, Protocol, runtime_checkable

from dgm_eit.config import flatten, set_key
from dgm_eit.errors import InputError
from dgm_eit.models import MODEL_NAMES, MODELS
from dgm_eit.results import DataSpec


@dataclass(frozen=True)
class Method:
    key: str                          # in run.methods and file names
    name: str                         # in tables, CSV rows and figures
    model: str | None = None          # the trained model it needs (dgm_eit.models); None: a classical method
    # a method without a model: which of the study's classical reconstructions it is ("gn",
    # "linear"); a trained method takes the study's classical image when its model needs_gn
    classical: str | None = None
    # the model learns from images alone, so one model, trained on the high-SNR set of the
    # table's anomaly count, serves every noise level
    high_snr_training: bool = False
    cost: int = 0                     # relative cost of training and reconstruction: the costliest start first
    std_map: bool = False             # its spread over samples is shown as a std map
    samples_key: str | None = None    # [run] key: samples drawn per image
    sampler_key: str | None = None    # [run] key: the score model's sampler it uses
    # its insertion time and step count are chosen on validation data ([run] csd_tune_*)
    # when its sampler starts from the GN image
    tunes_t0: bool = False
    ensemble_of: str | None = None    # the key of the method whose seeds this one pools
    # ("section.key", value) pairs set over the profile for its model's training and
    # reconstruction: another model than the profile's, so its runs live under their own
    # run_label (the directory name and the seed rule's model name; default: the model's name)
    model_config: tuple[tuple[str, object], ...] = ()
    run_label: str | None = None
    fixed_sampler: str | None = None  # the score model's sampler it always uses (instead of sampler_key's)
    # the paper's row (paper.PAPER_RESULTS) that runs the same algorithm as this method when
    # the configured values paper_config hold; None: no row of the paper is this method
    paper_row: str | None = None
    paper_config: tuple[tuple[str, object], ...] = ()

    @property
    def ensemble(self) -> bool:
        return self.ensemble_of is not None

    @property
    def seeded(self) -> bool:
        """One trained model per training seed (not a classical method, not an ensemble)."""
        return self.model is not None and not self.ensemble

    def as_ensemble(self) -> "Method":
        """The seed ensemble of this method: same model and settings, K trained copies pooled."""
        # the paper reports one training run per method: an ensemble is no row of its tables
        return replace(self, key=f"{self.key}{ENSEMBLE_SUFFIX}", name=f"{self.name} ens", std_map=True,
                       ensemble_of=self.key, paper_row=None, paper_config=())

    @property
    def label(self) -> str | None:
        """The name of its model's training runs (directories, seeds, stages); None: no model."""
        return self.run_label or self.model

    def configure(self, cfg: dict) -> dict:
        """``cfg`` with :attr:`model_config` set (a copy when there is any); a key the config
        does not have is refused."""
        if not self.model_config:
            return cfg
        cfg = copy.deepcopy(cfg)
        for key, value in self.model_config:
            try:
                set_key(cfg, key, value)
            except InputError as err:
                raise InputError(f"method {self.key!r}: {err}") from None
        return cfg

    def paper_row_for(self, cfg: dict) -> str | None:
        """The paper's row this method reproduces under ``cfg`` (its own config values set),
        or None where it runs another algorithm (the quick profile's GN-image CVAE, CSD* with
        the ``dds`` sampler)."""
        if self.paper_row is None:
            return None
        values = flatten(self.configure(cfg))
        if all(values.get(key, _MISSING) == value for key, value in self.paper_config):
            return self.paper_row
        return None

    def train_set(self, table_train: DataSpec, high_snr_db: float) -> DataSpec | None:
        """The data set whose training split the method's model learns from, for a table whose
        models are trained on ``table_train`` (None: no model)."""
        if self.model is None:
            return None
        if self.high_snr_training:
            return DataSpec(table_train.anomalies, float(high_snr_db))
        return table_train

    def n_samples(self, run: dict) -> int | None:
        return None if self.samples_key is None else int(run[self.samples_key])

    def sampler(self, run: dict) -> str | None:
        if self.fixed_sampler is not None:
            return self.fixed_sampler
        return None if self.sampler_key is None else str(run[self.sampler_key])


ENSEMBLE_SUFFIX = "-ens"
_REGISTRY: dict[str, Method] = {}
_MISSING = object()


def register_method(method: Method) -> Method:
    """Make ``method`` known (and its seed ensemble, when it has a model); a model file calls
    this once per method it serves."""
    for m in (method, method.as_ensemble()) if method.model is not None else (method,):
        known = _REGISTRY.get(m.key)
        if known is not None and known != m:
            raise ValueError(f"method {m.key!r} is registered twice, differently")
        # methods that share training runs must train the same model the same way
        for other in _REGISTRY.values():
            if other.label is not None and other.label == m.label and other.key != m.key and (
                    other.model, other.model_config) != (m.model, m.model_config):
                raise ValueError(f"methods {other.key!r} and {m.key!r} share the run label {m.label!r} but "
                                 "configure their models differently")
        _REGISTRY[m.key] = m
    return method


# the simplest first: a study's table lists its classical methods in this order
LINEARISED = register_method(Method("linear", "linearised", classical="linear"))
GAUSS_NEWTON = register_method(Method("gn", "GN", classical="gn"))


@runtime_checkable
class StudyPhysics(Protocol):
    """What a study supplies to run the registered methods on its measurements: its classical
    reconstructions, the classical image the trained methods take, and the data term of the
    samplers that read the measurements. The KTC study's is :class:`dgm_eit.ktc.physics.TankPhysics`;
    the paper's study makes its one classical image (GN) with the data set
    (:data:`dgm_eit.experiments.CLASSICAL`) and its samplers' data term from ``[mesh]``."""

    classical_kinds: tuple[str, ...]      # the classical reconstructions it makes (Method.classical)
    data_term_samplers: tuple[str, ...]   # samplers on the measurements it has a data term for

    def classical_image(self, dv, masks): ...
    def extra_images(self, dv, masks): ...
    def classical(self, kind: str, dv, masks, settings: dict): ...
    def candidates(self, kind: str, dv, masks) -> list[tuple[dict, object]]: ...
    def sample(self, model, start, dv, masks, settings: dict, seed: int) -> dict: ...
    def data_term_record(self) -> dict: ...


def method_problem(method: Method, cfg: dict, classical: Iterable[str],
                   data_term_samplers: Iterable[str]) -> str | None:
    """Why ``method`` cannot run in a study whose config is ``cfg`` and which makes the classical
    reconstructions ``classical`` and has a data term for ``data_term_samplers``; None when it can."""
    from dgm_eit.models.posterior import SAMPLERS_ON_VOLTAGES

    if method.model is None:
        if method.classical not in classical:
            return f"it is the {method.classical} reconstruction, which this study does not make"
        return None
    if method.model not in cfg:
        return f"its model has no [{method.model}] section in this profile"
    missing = [k for k in (method.samples_key, method.sampler_key) if k is not None and k not in cfg["run"]]
    if missing:
        return f"this profile has no run.{missing[0]}"
    sampler = method.sampler(cfg["run"])
    if sampler in SAMPLERS_ON_VOLTAGES and sampler not in data_term_samplers:
        supplied = ", ".join(data_term_samplers) or "none"
        return f"its sampler {sampler} needs a data term this study does not supply (it has one for: {supplied})"
    return None


def trainers(methods: Iterable[Method]) -> list[Method]:
    """One method per training-run label that ``methods`` need (methods of a label train its model
    alike, checked at registration), the costliest label first: the order in which both studies
    start their training runs, so that parallel jobs end together."""
    chosen: dict[str, Method] = {}
    for m in methods:
        if m.model is not None and m.cost > getattr(chosen.get(m.label), "cost", -1):
            chosen[m.label] = m
    return sorted(chosen.values(), key=lambda m: -m.cost)


def all_methods() -> tuple[Method, ...]:
    """Every method in table order: the classical ones, then each model's methods in the order of
    :data:`dgm_eit.models.MODEL_NAMES` and, within a model file, as registered."""
    for name in MODEL_NAMES:
        try:
            MODELS[name]   # importing a model's module registers its methods
        except InputError:
            continue       # a model left out of this build has no methods
    position = {name: i for i, name in enumerate(MODEL_NAMES)}
    return tuple(sorted(_REGISTRY.values(), key=lambda m: -1 if m.model is None else position[m.model]))


def get_method(key: str) -> Method:
    known = all_methods()
    for method in known:
        if method.key == key:
            return method
    raise InputError(f"unknown method {key!r}; choose from {', '.join(m.key for m in known)}")


def select_methods(keys: Iterable[str], where: str = "run.methods", ensembles: bool = False,
                   classical: Iterable[str] | None = None) -> list[Method]:
    """The methods named by ``keys`` in table order, each followed by its seed ensemble when
    ``ensembles`` (a study with several training seeds); an unknown key is refused naming the
    choices. Ensembles are never named: they come with their method. ``classical``: the
    classical reconstructions the study makes (None: any); the others are no choice."""
    keys = list(keys)
    if not keys:
        raise InputError(f"{where} names no method")
    known = [m for m in all_methods() if not m.ensemble and (classical is None or m.model is not None
                                                               or m.classical in classical)]
    unknown = [k for k in keys if k not in {m.key for m in known}]
    if unknown:
        hint = (" (seed ensembles are not listed: run.seeds > 1 adds one to every trained method)"
                if any(k.endswith(ENSEMBLE_SUFFIX) for k in unknown) else "")
        raise InputError(f"{where}: unknown method(s) {unknown}; choose from {', '.join(m.key for m in known)}{hint}")
    chosen = [m for m in known if m.key in keys]
    if ensembles:
        chosen = [x for m in chosen for x in ((m, get_method(m.key + ENSEMBLE_SUFFIX)) if m.model else (m,))]
    return chosen
