"""Issue 20, item 4: ``dgm-eit ktc`` works after ``pip install``, with the KTC study shipped in
``dgm_eit/ktc/shipped/`` (made by ``dgm-eit ktc-pack``).

The shipped study runs on the full tank meshes (about 10 s for the default method at level 1);
the loader's refusals stop before any model or mesh is built (well under a second each); the
pack command round-trips the tiny study of ``test_ktc_study`` (``ktc_tiny_study`` in conftest.py,
made once per session).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import scipy.io as sio

from dgm_eit.cli import main
from dgm_eit.datasets import ktc2023 as ktc
from dgm_eit.errors import InputError
from dgm_eit.ktc import bundle
from dgm_eit.methods import get_method
from dgm_eit.ktc.tank import public_dir
from test_cli import fails


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("DGM_EIT_DEBUG", raising=False)


def _provenance() -> dict:
    return json.loads((bundle.shipped_dir() / bundle.PROVENANCE).read_text())


def test_the_shipped_study_reproduces_its_recorded_level_1_scores(tmp_path, capsys):
    bundle.check_bundle(bundle.shipped_dir())
    record = _provenance()
    assert record["format_version"] == bundle.FORMAT_VERSION
    assert record["command"] == "dgm-eit run --profile ktc --seed 0 --seeds 2"
    assert record["shipped_seeds"] == record["seeds_in_study"] == 2
    capsys.readouterr()
    assert main(["ktc", str(public_dir()), str(tmp_path / "out"), "1"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    # the default and its reason come from the shipped methods.json, by the study's own rule
    assert err == [f"dgm-eit ktc: method {get_method(record['default_method']).name}: {record['default_why']}"]
    recorded = record["public_scores"][record["default_method"]]
    scores = {n: ktc.score(ktc.load_reconstruction(tmp_path / "out" / f"{n}.mat"),
                           ktc.load_truth(public_dir() / f"true{n}.mat")) for n in range(1, 5)}
    # scores.csv rounds to 1e-6; another CPU or BLAS may move the network's last float bits and
    # flip a few of the 65,536 pixels next to a threshold, each worth about 1e-5 of a score
    for n, score in scores.items():
        assert score == pytest.approx(recorded["level_1_targets"][str(n)], abs=1e-3)
    assert sum(scores.values()) == pytest.approx(recorded["level_1"], abs=2e-3)


def test_the_wheel_takes_every_file_of_the_shipped_study():
    """pyproject's package-data patterns (what a wheel installs) cover every file the shipped
    manifest lists: one it missed would make the installed study refuse itself as damaged."""
    import tomllib
    from pathlib import Path, PurePosixPath

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["dgm_eit"]
    names = [f"ktc/shipped/{name}" for name in bundle.check_bundle(bundle.shipped_dir())["files"]]
    names.append(f"ktc/shipped/{bundle.MANIFEST}")
    # setuptools globs each pattern from the package folder: "*" never crosses a "/"
    missed = [n for n in names if not any(PurePosixPath(n).match(p) and n.count("/") == p.count("/")
                                          for p in patterns)]
    assert not missed


def test_importing_and_other_commands_never_read_the_shipped_study():
    code = ("import sys, dgm_eit, dgm_eit.cli; dgm_eit.cli.build_parser(); "
            "print('dgm_eit.ktc.bundle' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.fixture
def damaged(tmp_path, monkeypatch):
    """A copy of the shipped study, used as the shipped one, to damage."""
    copy = tmp_path / "shipped"
    shutil.copytree(bundle.shipped_dir(), copy)
    monkeypatch.setattr(bundle, "shipped_dir", lambda: copy)
    return copy


def _manifest(folder) -> dict:
    return json.loads((folder / bundle.MANIFEST).read_text())


def _refused(capsys, tmp_path, *words):
    """dgm-eit ktc without --run: exit 2, one line naming ``words``, no output folder."""
    fails(capsys, ["ktc", public_dir(), tmp_path / "out", "1"], *words)
    assert not (tmp_path / "out").exists()


def test_a_truncated_weights_file_is_refused(damaged, tmp_path, capsys):
    weights = damaged / "runs" / "cvae" / "seed0" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    _refused(capsys, tmp_path, str(weights), "truncated", "reinstall dgm-eit", "--run DIR")


def test_a_checksum_mismatch_is_refused(damaged, tmp_path, capsys):
    # same size, one byte changed: only the checksum can tell
    methods = damaged / "methods.json"
    text = methods.read_text()
    methods.write_text(text.replace('"low": 0.7', '"low": 0.9', 1))
    assert methods.read_text() != text
    _refused(capsys, tmp_path, str(methods), "SHA-256", "reinstall dgm-eit")


def test_a_missing_file_and_an_unknown_format_version_are_refused(damaged, tmp_path, capsys):
    manifest = _manifest(damaged)
    (damaged / bundle.MANIFEST).write_text(json.dumps({**manifest, "format_version": bundle.FORMAT_VERSION + 1}))
    _refused(capsys, tmp_path, str(damaged / bundle.MANIFEST), f"format version {bundle.FORMAT_VERSION + 1}")
    (damaged / bundle.MANIFEST).write_text(json.dumps(manifest))
    (damaged / "runs" / "score" / "seed0" / "data_info.json").unlink()
    _refused(capsys, tmp_path, str(damaged / "runs" / "score" / "seed0" / "data_info.json"), "missing")
    # a packed study given with --run is checked the same way, with its own advice
    with pytest.raises(InputError, match="data_info.json is missing.*dgm-eit ktc-pack"):
        from dgm_eit.ktc.entry import reconstruct_folder

        reconstruct_folder(public_dir(), 1, damaged)


def test_first_seeds_drop_the_other_seeds_and_keep_the_ensembles_only_with_every_seed(tmp_path):
    cfg = {"run": {"seeds": 2}}
    chosen = {"linear": {"score": 0.6}, "cnf": {"seeds": [{"score": 0.8}, {"score": 0.7}], "score": 0.75},
              "cnf-ens": {"score": 0.85, "members": [{}, {}]}}
    shipped_cfg, shipped = bundle.first_seeds(cfg, chosen)
    assert shipped_cfg["run"]["seeds"] == 1 and cfg["run"]["seeds"] == 2
    assert shipped == {"linear": {"score": 0.6}, "cnf": {"seeds": [{"score": 0.8}], "score": 0.8, "seed_std": None}}
    assert bundle.chosen_seeds(chosen) == 2 and bundle.chosen_seeds({"linear": {"score": 0.6}}) == 1
    # run.json keeps the first call's run.seeds; methods.json knows the seeds chosen since
    shipped_cfg, shipped = bundle.first_seeds({"run": {"seeds": 1}}, chosen, 2)
    assert shipped_cfg == cfg and shipped["cnf-ens"] == chosen["cnf-ens"]
    assert shipped["cnf"]["score"] == pytest.approx(0.75) and shipped["cnf"]["seed_std"] == pytest.approx(0.0707, abs=1e-4)
    # the packed scores.csv: the packed methods' rows of the packed seeds only
    study_scores = ("method,seed,level,target,score\nlinear,-,1,1,0.800000\ncnf,0,1,1,0.700000\n"
                    "cnf,1,1,1,0.600000\ncnf-ens,-,1,1,0.750000\n")
    scores_csv = tmp_path / "scores.csv"
    scores_csv.write_text(study_scores)
    rows = bundle.read_scores(scores_csv)
    assert bundle.scores_text(rows, {"linear", "cnf", "cnf-ens"}, 2) == study_scores
    assert bundle.scores_text(rows, {"linear", "cnf"}, 1) == study_scores[:study_scores.index("cnf,1")]
    scores_csv.write_text(study_scores[:-12])
    with pytest.raises(InputError, match="scores.csv is missing or damaged"):
        bundle.read_scores(scores_csv)


def test_ktc_pack_round_trips_a_tiny_study(ktc_tiny_study, tmp_path, capsys):
    from dgm_eit.ktc.study import load_study

    tiny_study = ktc_tiny_study[0]
    packed = tmp_path / "packed"
    assert main(["ktc-pack", str(tiny_study), "--out", str(packed), "--commit", "abc123"]) == 0
    manifest = bundle.check_bundle(packed)
    assert not (packed / "data").exists() and "runs/cvae/seed0/model.safetensors" in manifest["files"]
    assert {"runs/score/seed0/model.safetensors", "runs/unet/seed0/model.safetensors"} <= set(manifest["files"])
    assert load_study(packed) == load_study(tiny_study)
    record = json.loads((packed / bundle.PROVENANCE).read_text())
    assert record["commit"] == "abc123" and record["seed"] == 1
    assert record["command"] == "dgm-eit run --profile ktc --seed 1"
    assert record["config_sha256"] == bundle.config_hash(json.loads((tiny_study / "run.json").read_text())["config"])
    rows = [r.split(",") for r in (tiny_study / "scores.csv").read_text().splitlines()[1:]]
    for method in ("linear", "gn", "cvae", "cnf", "csd", "unet"):
        scores = record["public_scores"][method]
        mine = [(r[2], float(r[4])) for r in rows if r[0] == method]
        assert scores["level_1"] == pytest.approx(sum(s for level, s in mine if level == "1"), abs=1e-5)
        assert scores["all_levels"] == pytest.approx(sum(s for _, s in mine), abs=1e-5)
        assert scores["levels"] == [1, 4]
    # every public-target score of the packed (here: the only) seed comes along, byte for byte
    assert (packed / bundle.SCORES).read_bytes() == (tiny_study / "scores.csv").read_bytes()
    # the packed folder, without the data set, makes the study's own submissions (CSD*: its data
    # model from methods.json; every method: the linearised settings from linear_settings.json)
    for method in ("cvae", "csd", "unet"):
        assert main(["ktc", str(public_dir()), str(tmp_path / method), "1", "--run", str(packed),
                     "--method", method, "--seed", "1"]) == 0
        for n in range(1, 5):
            submitted = tiny_study / "submissions" / method / "seed0" / "level_1" / f"{n}.mat"
            assert (sio.loadmat(tmp_path / method / f"{n}.mat")["reconstruction"]
                    == sio.loadmat(submitted)["reconstruction"]).all()
    # nothing is replaced without --overwrite, a folder of other files never, the study itself never
    before = {p: p.read_bytes() for p in packed.rglob("*") if p.is_file()}
    fails(capsys, ["ktc-pack", tiny_study, "--out", packed], str(packed), "--overwrite")
    assert {p: p.read_bytes() for p in packed.rglob("*") if p.is_file()} == before
    assert main(["ktc-pack", str(tiny_study), "--out", str(packed), "--overwrite"]) == 0
    bundle.check_bundle(packed)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep")
    fails(capsys, ["ktc-pack", tiny_study, "--out", notes, "--overwrite"], str(notes), "not a packed study")
    fails(capsys, ["ktc-pack", tiny_study, "--out", tiny_study, "--overwrite"], "replace the study")
    fails(capsys, ["ktc-pack", tiny_study, "--out", tiny_study / "packed"], "inside the study", str(tiny_study))
    assert not (tiny_study / "packed").exists()
    assert (notes / "mine.txt").read_text() == "keep" and (tiny_study / "methods.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["csd", "cvae", "notes", "packed", "unet"]   # no temporary left
