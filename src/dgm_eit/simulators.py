"""Which simulator makes a config's data set: a registry that studies fill from above.

The data layer knows no study. A study registers its simulator under a name, with the
config section that is its own (the KTC2023 tank: ``[tank]``), when its package is
imported; :mod:`dgm_eit.studies` imports the studies dgm-eit ships, and the CLI imports
that. The disk of the paper's study is this layer's own simulator (``[simulation]``).
A config belongs to the registered study whose section it holds; when a study's config
also holds the disk's sections (another tank on a disk mesh), the study's own wins.

A simulator class (see :class:`Simulator`) hands the pipeline everything study-specific:
the data set's samples (with the study's classical reconstruction as the ``gn`` image),
its settings record (how that image is made, chosen on validation data and stored in the
file) and how a config reproduces such a record.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable, Protocol

from dgm_eit.errors import InputError


class Simulator(Protocol):
    """What :mod:`dgm_eit.data.simulate` asks of a study's simulator (built once per process)."""

    # the config sections whose values change the simulated arrays (the data set's identity)
    data_sections: ClassVar[tuple[str, ...]]
    image_size: int
    n_meas: int
    extra_images: int   # classical images at other settings per sample (the gn_extra array; 0: none)

    def __init__(self, cfg: dict) -> None: ...

    @staticmethod
    def check_config(cfg: dict, seed: int) -> None:
        """Refuse what would fail on the first sample, before any file or process exists."""

    @staticmethod
    def apply_settings(cfg: dict, settings: dict) -> dict:
        """A copy of ``cfg`` that makes the classical images exactly as ``settings`` records,
        with nothing left to tune (``{}``: a file from before tuning existed)."""

    def gn_settings(self, seed: int, log: Callable[[str], None] | None = None) -> dict:
        """The settings record of the classical image, chosen on the validation split."""

    def chunk(self, seed: int, split: str, start: int, stop: int) -> dict:
        """Samples ``start:stop`` of ``split`` stacked (``data.storage.stack_chunk``)."""


@dataclass(frozen=True)
class _Entry:
    name: str
    section: str
    location: str   # "module:Class", imported on first use so registering stays cheap
    base: bool = False

    @property
    def module(self) -> str:
        return self.location.split(":")[0]


_ENTRIES: dict[str, _Entry] = {}


def register_simulator(name: str, section: str, location: str, *, base: bool = False) -> None:
    """Register the simulator class at ``location`` ("module:Class") for configs that hold
    ``[section]``. Registering the same entry again (a module imported twice) is harmless."""
    entry = _Entry(name, section, location, base)
    old = _ENTRIES.get(name)
    if old is not None and old != entry:
        raise ValueError(f"simulator {name!r} is already registered as {old.location} for [{old.section}]")
    _ENTRIES[name] = entry


def study_name(cfg: dict) -> str:
    """The name of the registered study that owns ``cfg``, or InputError naming the choices."""
    owners = [e for e in _ENTRIES.values() if isinstance(cfg.get(e.section), dict)]
    if len(owners) > 1:
        owners = [e for e in owners if not e.base]
    if len(owners) == 1:
        return owners[0].name
    known = ", ".join(f"[{e.section}] ({e.name})" for e in _ENTRIES.values())
    if not owners:
        raise InputError(f"no registered study owns this config: it holds none of the sections {known}; a study "
                         "registers its simulator when its package is imported (import dgm_eit.studies for the "
                         "studies dgm-eit ships)")
    raise InputError("this config holds the sections of several studies: "
                     + ", ".join(f"[{e.section}] ({e.name})" for e in owners))


def simulator_class(cfg: dict) -> type:
    """The simulator class of the study that owns ``cfg``."""
    module, _, attr = _ENTRIES[study_name(cfg)].location.partition(":")
    return getattr(importlib.import_module(module), attr)


def apply_settings(cfg: dict, settings: dict) -> dict:
    """``cfg`` made to reproduce a data set's settings record (its ``gn_settings``), by the
    study that owns ``cfg``. Without a record (a file from before tuning existed) the config
    is as it was written, whoever owns it."""
    if not settings:
        return copy.deepcopy(cfg)
    return simulator_class(cfg).apply_settings(cfg, settings)


def registered_modules() -> tuple[str, ...]:
    """The modules behind the registered simulators: a worker process imports them
    (:func:`import_modules`) to see the studies its parent registered."""
    return tuple(sorted({e.module for e in _ENTRIES.values()}))


def import_modules(modules: Iterable[str]) -> None:
    for module in modules:
        importlib.import_module(module)


register_simulator("disk", "simulation", "dgm_eit.data.simulate:Simulator", base=True)
