"""Model registry: ``MODELS[name] -> GenerativeModel subclass``.

The classes are imported on first use, so ``import dgm_eit.models`` stays light and a
model whose module is missing (or fails to import) only matters when asked for. A model's
module also registers the methods that use it (:mod:`dgm_eit.methods`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from dgm_eit.errors import InputError

# name -> (module, class)
_MODEL_LOCATIONS = {
    "cvae": ("dgm_eit.models.cvae", "CVAE"),
    "cnf": ("dgm_eit.models.cnf", "CNF"),
    "score": ("dgm_eit.models.score", "ScoreModel"),
    "unet": ("dgm_eit.models.unet", "UNetPostProcessing"),
}

MODEL_NAMES = tuple(_MODEL_LOCATIONS)


class _LazyModels(Mapping):
    def __getitem__(self, name: str):
        if name not in _MODEL_LOCATIONS:
            raise InputError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
        module_name, class_name = _MODEL_LOCATIONS[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            raise InputError(f"model {name!r} is not available in this build ({module_name} is missing)") from None
        return getattr(module, class_name)

    def __iter__(self):
        return iter(_MODEL_LOCATIONS)

    def __len__(self) -> int:
        return len(_MODEL_LOCATIONS)

    def __contains__(self, name) -> bool:
        return name in _MODEL_LOCATIONS


MODELS: Mapping = _LazyModels()


def get_model_class(name: str):
    return MODELS[name]
