"""Profiles and overrides.

A profile (``smoke``, ``quick``, ``paper``) is a TOML file shipped in ``dgm_eit/configs``.
Every profile holds the same keys, so a key unknown to the profile is a typo and is
refused. A user file may start from a shipped profile with ``extends = "quick"`` and
override any of its keys. ``--set a.b=value`` overrides one key; the value is read as
JSON when it parses (numbers, booleans, lists) and as a plain string otherwise.
"""

from __future__ import annotations

import copy
import difflib
import json
import numbers
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from dgm_eit.errors import InputError

PROFILES = ("smoke", "quick", "paper", "ktc")
# the profiles of the paper's study share one key set; "ktc" (the real-data study) has its own
STUDY_PROFILES = ("smoke", "quick", "paper")


class ConfigError(InputError):
    """Unknown profile, unknown key or a value of the wrong type."""


def _read_profile(name: str) -> dict:
    text = resources.files("dgm_eit.configs").joinpath(f"{name}.toml").read_text()
    return tomllib.loads(text)


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


_ABSENT = "<absent>"

# Keys added to a section after data sets and runs were written without them, each with the
# value that reproduces those files: an older file's config reads as if it had them, so it
# stays valid (not "made with another config") and is rebuilt the way it was made.
ADDED_KEYS = {"mesh.radius": 1.0, "mesh.first_electrode_angle": 0.0, "run.calibration_images": 0,
              "unet.output": "regression",
              "run.best_of": 1, "run.best_of_methods": [], "tank.data_std": 0.0,
              "tank.electrode_shift": 0.0, "tank.contact_max": 0.0, "tank.drift_std": 0.0,
              "linear.extra_images": [], "unet.inputs": ["gn"], "cvae.inputs": ["gn"], "cnf.inputs": ["gn"]}


def with_added_keys(cfg: dict) -> dict:
    """``cfg`` with the :data:`ADDED_KEYS` its sections lack filled in (a copy when any is
    missing); a section the config does not have stays absent."""
    missing = [k for k in ADDED_KEYS
               if isinstance(cfg.get(k.split(".")[0]), dict) and k.split(".")[1] not in cfg[k.split(".")[0]]]
    if not missing:
        return cfg
    cfg = copy.deepcopy(cfg)
    for key in missing:
        section, name = key.split(".")
        cfg[section][name] = ADDED_KEYS[key]
    return cfg


def config_changes(old: dict, new: dict, ignore: Iterable[str] = (), limit: int = 5) -> str:
    """The keys whose values differ between two nested configs, as ``"a.b: 1 -> 2, ..."`` (at most
    ``limit`` shown); ``""`` when they agree. Keys under a prefix in ``ignore`` may differ.

    The one check behind "this output was made with another config" (data sets, training
    runs, run directories); each caller chooses what may change between its calls."""
    before, now = flatten(with_added_keys(old)), flatten(with_added_keys(new))
    ignore = tuple(ignore)
    changed = sorted(k for k in set(before) | set(now)
                     if before.get(k, _ABSENT) != now.get(k, _ABSENT) and not k.startswith(ignore))
    shown = ", ".join(f"{k}: {before.get(k, _ABSENT)!r} -> {now.get(k, _ABSENT)!r}" for k in changed[:limit])
    return shown + (f", ... ({len(changed) - limit} more)" if len(changed) > limit else "")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _check_type(key: str, old: Any, new: Any) -> Any:
    if isinstance(old, bool) or isinstance(new, bool):
        if not isinstance(new, bool) or not isinstance(old, bool):
            raise ConfigError(f"config key {key!r} expects {type(old).__name__}, got {new!r}")
        return new
    if isinstance(old, float) and isinstance(new, int):
        return float(new)
    if isinstance(old, (int, float)) and not isinstance(new, (int, float)):
        raise ConfigError(f"config key {key!r} expects a number, got {new!r}")
    if isinstance(old, int) and isinstance(new, float):
        if not new.is_integer():
            raise ConfigError(f"config key {key!r} expects an integer, got {new!r}")
        return int(new)
    if isinstance(old, str) and not isinstance(new, str):
        return str(new) if not isinstance(new, (list, dict)) else _type_error(key, old, new)
    if isinstance(old, list) and not isinstance(new, list):
        raise ConfigError(f"config key {key!r} expects a list, got {new!r}")
    return new


def _type_error(key: str, old: Any, new: Any):
    raise ConfigError(f"config key {key!r} expects {type(old).__name__}, got {new!r}")


def set_key(cfg: dict, key: str, value: Any) -> None:
    """Set dotted ``key`` in ``cfg`` (in place); the key must already exist."""
    known = flatten(cfg)
    if key not in known:
        if any(k.startswith(key + ".") for k in known):
            raise ConfigError(f"config key {key!r} is a section; set one of its keys")
        close = difflib.get_close_matches(key, list(known), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown config key {key!r}{hint}")
    node = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = _check_type(key, node[parts[-1]], value)


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """Return a copy of ``cfg`` with ``key=value`` strings applied."""
    cfg = copy.deepcopy(cfg)
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        set_key(cfg, key.strip(), _parse_value(text.strip()))
    return cfg


def _merge(base: dict, user: dict, origin: str) -> dict:
    cfg = copy.deepcopy(base)
    for key, value in flatten(user).items():
        try:
            set_key(cfg, key, value)
        except ConfigError as err:
            raise ConfigError(f"{origin}: {err}") from None
    return cfg


def load_config(profile: str | Path = "quick", overrides: Iterable[str] = ()) -> dict:
    """Resolve a profile name or a user TOML file, then apply ``--set`` overrides."""
    name = str(profile)
    if name in PROFILES:
        cfg = _read_profile(name)
    elif name.endswith(".toml") or Path(name).is_file():
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"config file {name!r} does not exist")
        try:
            user = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {name!r} is not valid TOML: {err}") from None
        base = user.pop("extends", "quick")
        if base not in PROFILES:
            raise ConfigError(f"config file {name!r}: extends={base!r} is not one of {', '.join(PROFILES)}")
        cfg = _merge(_read_profile(base), user, name)
        cfg["profile"] = f"{base}+{path.name}"
        return apply_overrides(cfg, overrides)
    else:
        raise ConfigError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)} or a .toml file")
    return apply_overrides(cfg, overrides)


def config_from_json(text: str) -> dict:
    """Read a resolved config written by :func:`config_to_json` (no validation against profiles)."""
    return json.loads(text)


def config_to_json(cfg: dict) -> str:
    return json.dumps(cfg, indent=2, sort_keys=True)


def check_int(value: Any, key: str, minimum: int, meaning: str = "") -> int:
    """``value`` of the config key ``key`` as an integer >= ``minimum``, or one clear error
    (a TOML ``true`` is refused: Python counts it as 1; a numpy integer is accepted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise InputError(f"{key} must be an integer >= {minimum}{f' ({meaning})' if meaning else ''}, got {value!r}")
    return int(value)
