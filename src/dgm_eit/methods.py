"""The reconstruction methods a study compares: one registered :class:`Method` record each.

A method turns a test set's measurements into images: GN (the data set's own Gauss-Newton
image, registered here) or a trained model used one way (the score prior serves two
methods, CSD* and guided CSD). Each model file registers its methods next to its model,
as score_sde_pytorch registers its models, so the runner (:mod:`dgm_eit.experiments`), the
report and the CLI learn of a new method from the registry alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from dgm_eit.errors import InputError
from dgm_eit.models import MODEL_NAMES, MODELS
from dgm_eit.results import DataSpec


@dataclass(frozen=True)
class Method:
    key: str                          # in run.methods and file names
    name: str                         # in tables, CSV rows and figures
    model: str | None = None          # the trained model it needs (dgm_eit.models); None: the data set's GN image
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
        return None if self.sampler_key is None else str(run[self.sampler_key])


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make ``method`` known; a model file calls this once per method it serves."""
    known = _REGISTRY.get(method.key)
    if known is not None and known != method:
        raise ValueError(f"method {method.key!r} is registered twice, differently")
    _REGISTRY[method.key] = method
    return method


GAUSS_NEWTON = register_method(Method("gn", "GN"))


def all_methods() -> tuple[Method, ...]:
    """Every method in table order: GN, then each model's methods in the order of
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


def select_methods(keys: Iterable[str], where: str = "run.methods") -> list[Method]:
    """The methods named by ``keys``, in table order; an unknown key is refused naming the choices."""
    keys = list(keys)
    known = all_methods()
    unknown = [k for k in keys if k not in {m.key for m in known}]
    if unknown:
        raise InputError(f"{where}: unknown method(s) {unknown}; choose from {', '.join(m.key for m in known)}")
    return [m for m in known if m.key in keys]
