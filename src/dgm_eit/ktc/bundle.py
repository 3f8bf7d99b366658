"""A KTC study packed for shipping: what ``dgm-eit ktc`` needs of a finished ``dgm-eit run
--profile ktc`` directory, without its 140 MB data set, and the one the package ships.

``dgm-eit ktc-pack RUN_DIR --out DIR`` (:func:`pack_study`) writes a folder with the study
directory's own layout, so :func:`dgm_eit.ktc.study.load_study` and ``Methods`` read it as
they read the study itself::

    manifest.json         {"format_version", "files": {name: {"sha256", "bytes"}}}: every other file
    provenance.json       commit, --seed, config hash, dgm-eit version, dates, public-target scores
    run.json              the study's {"seed", "config"}
    methods.json          every method's settings chosen on validation (per packed seed; CSD*'s linear data model)
    linear_settings.json  the data set's linearised-step settings (read instead of data/ktc.h5)
    scores.csv            the study's public-target scores (method, seed, level, target) of the packed seeds
    runs/<label>/seed<k>/ model.safetensors, config.json, data_info.json, done

``--seeds N`` packs the first N training seeds of a study trained with ``--seeds K`` (default 1;
``run.seeds`` becomes N). With N = K the seed ensembles come along and the default method is the
study's own; with N < K they are dropped (each pools all K seeds) and the default method is the
one of those seeds' evidence, said as such.
:func:`check_bundle` refuses a damaged folder (a missing file, a size or checksum that is not
the manifest's, an unknown format version) before anything is read from it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from dgm_eit import __version__
from dgm_eit.errors import InputError
from dgm_eit.files import read_json, temp_sibling, write_text
from dgm_eit.ktc.physics import TankPhysics, recorded_linear_model
from dgm_eit.ktc.report import SCORE_COLUMNS
from dgm_eit.ktc.study import (LINEAR_SETTINGS, MANIFEST as STUDY_MANIFEST, as_method, check_methods, default_method,
                               linear_settings, load_study, run_dir, seed_record, seeded)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROVENANCE = "provenance.json"
METHODS_FILE = "methods.json"
SCORES = "scores.csv"
RUN_FILES = ("model.safetensors", "config.json", "data_info.json", "done")
REQUIRED = (PROVENANCE, STUDY_MANIFEST, METHODS_FILE, LINEAR_SETTINGS)
SHIPPED_ADVICE = ("reinstall dgm-eit (pip install --force-reinstall dgm-eit), or pass --run DIR with a study "
                  "of your own (dgm-eit run --profile ktc)")
PACKED_ADVICE = "pack the study again (dgm-eit ktc-pack RUN_DIR --out DIR --overwrite)"


def shipped_dir() -> Path:
    """The study shipped inside the package (read only by ``dgm-eit ktc`` without ``--run``)."""
    return Path(__file__).resolve().parent / "shipped"


def is_bundle(root) -> bool:
    return (Path(root) / MANIFEST).is_file()


def config_hash(cfg: dict) -> str:
    """SHA-256 of the config as canonical JSON (sorted keys, no spaces): the same for the same settings."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _file_record(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def check_bundle(root, advice: str = PACKED_ADVICE) -> dict:
    """The manifest of the packed study ``root``, after checking its format version and the size
    and SHA-256 of every file it lists; anything else is one InputError naming the file."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise InputError(f"{path} is missing: {root} is not a complete packed KTC study; {advice}")
    manifest = read_json(path, advice)
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise InputError(f"{path} has format version {version!r}; dgm-eit {__version__} reads version "
                         f"{FORMAT_VERSION} only; {advice}")
    files = manifest.get("files")
    if not isinstance(files, dict) or any(name not in files for name in REQUIRED):
        raise InputError(f"{path} does not list the packed study's files ({', '.join(REQUIRED)}); {advice}")
    for name, expected in sorted(files.items()):
        target = root / name
        # the manifest is data: a name leading out of the folder is damage, never followed
        if not target.resolve().is_relative_to(root.resolve()) or not isinstance(expected, dict):
            raise InputError(f"{path} lists {name!r}, which is not a file of the packed study; {advice}")
        if not target.is_file():
            raise InputError(f"{target} is missing from the packed study; {advice}")
        found = _file_record(target)
        if found["bytes"] != expected.get("bytes"):
            raise InputError(f"{target} has {found['bytes']} bytes, the manifest says {expected.get('bytes')} "
                             f"(truncated or replaced); {advice}")
        if found["sha256"] != expected.get("sha256"):
            raise InputError(f"{target} does not match its SHA-256 checksum in {MANIFEST} (damaged or "
                             f"replaced); {advice}")
    return manifest


def read_provenance(root) -> dict:
    return read_json(Path(root) / PROVENANCE, PACKED_ADVICE)


# ---------------------------------------------------------------------------------
# packing


def chosen_seeds(chosen: dict) -> int:
    """How many training seeds every trained method of ``methods.json`` has a choice for. The
    study's ``run.json`` cannot tell: ``--seeds`` may change between calls on one directory,
    and the file keeps the first call's config."""
    return min((len(r["seeds"]) for m, r in chosen.items() if seeded(m)), default=1)


def first_seeds(cfg: dict, chosen: dict, n: int = 1) -> tuple[dict, dict]:
    """The study as its first ``n`` training seeds made it: their choices per trained method, and
    the seed ensembles that pool exactly those seeds."""
    import copy

    cfg = copy.deepcopy(cfg)
    cfg["run"]["seeds"] = n
    kept = {m: seed_record(r["seeds"][:n]) if seeded(m) else r for m, r in chosen.items()
            if not as_method(m).ensemble or len(r.get("members", ())) == n}
    return cfg, kept


def read_scores(scores_csv: Path) -> list[dict]:
    """The rows of a study's ``scores.csv``: method, seed, level (int), target, score (float)."""
    try:
        with open(scores_csv, newline="") as f:
            rows = [{"method": r["method"], "seed": r["seed"], "level": int(r["level"]), "target": r["target"],
                     "score": float(r["score"])} for r in csv.DictReader(f)]
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise InputError(f"{scores_csv} is missing or damaged ({err}); re-run the same dgm-eit run command "
                         "to write it again") from None
    return rows


def public_scores(rows: list[dict], methods) -> dict:
    """Per method (seed 0 of a trained one): its level-1 and all-levels challenge-score totals
    over the public targets, and its level-1 score per target, from the rows of :func:`read_scores`."""
    out = {}
    for m in methods:
        mine = [(r["level"], r["target"], r["score"]) for r in rows if r["method"] == m and r["seed"] in ("0", "-")]
        if not mine:
            raise InputError(f"the study's {SCORES} has no scores of method {m!r}; re-run the same dgm-eit run command")
        level1 = {target: score for level, target, score in mine if level == 1}
        out[m] = {"level_1": round(sum(level1.values()), 6), "all_levels": round(sum(s for *_, s in mine), 6),
                  "levels": sorted({level for level, _, _ in mine}), "level_1_targets": level1}
    return out


def scores_text(rows: list[dict], methods, seeds: int) -> str:
    """The rows of ``methods`` and of the first ``seeds`` training seeds, as a ``scores.csv``."""
    kept = {"-", *(str(k) for k in range(seeds))}
    lines = [",".join(SCORE_COLUMNS)]
    lines += [f"{r['method']},{r['seed']},{r['level']},{r['target']},{r['score']:.6f}" for r in rows
              if r["method"] in methods and r["seed"] in kept]
    return "\n".join(lines) + "\n"


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_out(source: Path, out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory; choose another folder")
    if out.resolve() == source.resolve() or source.resolve().is_relative_to(out.resolve()):
        raise InputError(f"--out {out} would replace the study {source} itself; choose another folder")
    if out.resolve().is_relative_to(source.resolve()):
        raise InputError(f"--out {out} is inside the study {source}: the packed files would land among its "
                         "files; choose another folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"--out {out} is not empty; pass --overwrite to replace a packed study there, "
                             "or choose a new folder")
        if not is_bundle(out):
            raise InputError(f"--out {out} holds files that are not a packed study (no {MANIFEST}); "
                             "choose another folder")


def pack_study(study_dir, out, *, seeds: int = 1, overwrite: bool = False, commit: str = "unknown",
               note: str = "") -> dict:
    """Pack the first ``seeds`` training seeds of the finished KTC study ``study_dir`` into the
    folder ``out`` (see the module docstring); the folder appears complete or not at all. Returns
    the provenance record. ``commit``: the git commit of the code that ran the study (the study
    does not record it)."""
    from dgm_eit.config import check_int
    from dgm_eit.runs import is_finished, load_run

    source, out = Path(study_dir), Path(out)
    cfg, chosen = load_study(source)
    trained = chosen_seeds(chosen)
    seeds = check_int(seeds, "--seeds", 1)
    if seeds > trained:
        raise InputError(f"--seeds {seeds}: the study {source} trained {trained} seed{'s' if trained > 1 else ''}")
    _check_out(source, out, overwrite)
    settings = linear_settings(source)
    if not settings:
        raise InputError(f"{source} has neither data/ktc.h5 nor {LINEAR_SETTINGS}: the linearised step's "
                         "settings cannot be packed; re-run the dgm-eit run command that made it")
    shipped_cfg, shipped = first_seeds(cfg, chosen, seeds)
    methods = check_methods(shipped_cfg)
    with_data_term = [m.name for m in methods if m.sampler(shipped_cfg["run"]) in TankPhysics.data_term_samplers]
    if with_data_term and recorded_linear_model(shipped) is None:
        raise InputError(f"{source}/methods.json records no linear data model for {', '.join(with_data_term)} "
                         "(made by an earlier dgm-eit); make the study again with this version")
    models = sorted({m.label for m in methods if m.seeded})
    runs = [(model, k) for model in models for k in range(seeds)]
    for model, k in runs:
        where = run_dir(source, model, k)
        missing = [name for name in RUN_FILES if not (where / name).is_file()]
        if missing or not is_finished(where):
            raise InputError(f"{where} lacks {', '.join(missing) or 'its done marker'}; re-run the same "
                             "dgm-eit run command to finish the study")
    resamples = int(shipped_cfg["run"]["bootstrap_resamples"])
    default, why = default_method({m.key: shipped[m.key] for m in methods}, resamples=resamples)
    scores = read_scores(source / SCORES)
    timings, seed = source / "timings.json", int(read_json(source / STUDY_MANIFEST)["seed"])
    provenance = {
        "format_version": FORMAT_VERSION,
        "commit": commit,
        "note": note,
        "seed": seed,
        "profile": cfg.get("profile"),
        "command": f"dgm-eit run --profile {cfg.get('profile')} --seed {seed}"
                   + (f" --seeds {trained}" if trained > 1 else ""),
        "config_sha256": config_hash(cfg),
        "seeds_in_study": trained,
        "shipped_seeds": seeds,
        "dgm_eit_version": __version__,
        "packed_at": _utc(datetime.now(timezone.utc).timestamp()),
        "study_finished_at": _utc((source / METHODS_FILE).stat().st_mtime),
        "study_seconds": read_json(timings).get("timings") if timings.is_file() else None,
        "default_method": default,
        "default_why": why,
        "public_scores": public_scores(scores, [m.key for m in methods]),
    }
    tmp = temp_sibling(out, "partial")
    try:
        write_text(tmp / STUDY_MANIFEST, json.dumps({"seed": seed, "config": shipped_cfg},
                                                    indent=2, sort_keys=True))
        write_text(tmp / METHODS_FILE, json.dumps(shipped, indent=2))
        write_text(tmp / LINEAR_SETTINGS, json.dumps(settings, indent=2, sort_keys=True))
        write_text(tmp / SCORES, scores_text(scores, {m.key for m in methods}, seeds))
        for model, k in runs:
            src, dst = run_dir(source, model, k), run_dir(tmp, model, k)
            dst.mkdir(parents=True)
            for name in RUN_FILES:
                shutil.copyfile(src / name, dst / name)
            meta = read_json(dst / "config.json")
            # the training data's place on the packing machine means nothing where the study is installed
            meta["data"] = "data/ktc.h5"
            write_text(dst / "config.json", json.dumps(meta, indent=2, sort_keys=True))
        write_text(tmp / PROVENANCE, json.dumps(provenance, indent=2))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {"format_version": FORMAT_VERSION,
                    "files": {p.relative_to(tmp).as_posix(): _file_record(p) for p in files}}
        write_text(tmp / MANIFEST, json.dumps(manifest, indent=2))
        # read back as dgm-eit ktc will, weights included, before it lands
        check_bundle(tmp)
        load_study(tmp)
        for model, k in runs:
            load_run(run_dir(tmp, model, k), "cpu")
        if out.is_dir():
            old = temp_sibling(out, "old")
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except OSError:
                os.rename(old, out)   # the packed study that was there stays where it was
                raise
            shutil.rmtree(old)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return provenance
