"""Best of K (``run.best_of``): candidates per kept model, chosen on validation images."""

import hashlib
import json

import numpy as np
import pytest

from dgm_eit.best_of import SELECTION_FILE, candidate_dir, validation_mse
from dgm_eit.cli import main
from dgm_eit.config import load_config
from dgm_eit.experiments import Experiment
from dgm_eit.runs import training_time
from dgm_eit.runtime import training_seed

BASE = ["--profile", "smoke", "--seed", "0", "--set", "train.progress=false", "--set", 'run.tests=["T1"]',
        "--set", 'run.methods=["gn", "cvae", "cnf"]', "--set", "run.best_of=2",
        "--set", 'run.best_of_methods=["cnf"]']


@pytest.fixture(scope="module")
def best_of_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("best_of") / "run"
    assert main(["run", "--out", str(out), *BASE]) == 0
    return out


def test_candidate_seeds_follow_the_stated_rule():
    assert training_seed(3, "cnf", "2a_40dB", 1, candidate=0) == training_seed(3, "cnf", "2a_40dB", 1)
    digest = hashlib.sha256(b"3/cnf/2a_40dB/1/candidate2").digest()[:6]
    assert training_seed(3, "cnf", "2a_40dB", 1, candidate=2) == int.from_bytes(digest, "big")
    seeds = {training_seed(3, "cnf", "2a_40dB", k, candidate=j) for k in range(3) for j in range(3)}
    assert len(seeds) == 9


def test_the_kept_model_is_the_candidate_with_the_lowest_validation_mse(best_of_run):
    out = best_of_run
    cfg = load_config("smoke")
    for label in ("2a_40dB", "4a_40dB"):
        run_dir = out / "runs" / f"cnf_{label}" / "seed0"
        selection = json.loads((run_dir / SELECTION_FILE).read_text())
        scores = [c["val_mse"] for c in selection["candidates"]]
        assert len(scores) == 2 and scores[0] != scores[1]
        assert selection["chosen"] == int(np.argmin(scores))
        assert [c["seed"] for c in selection["candidates"]] == [training_seed(0, "cnf", label, 0, j) for j in (0, 1)]
        kept = candidate_dir(run_dir, selection["chosen"])
        for name in ("model.safetensors", "best.safetensors", "config.json", "data_info.json"):
            assert (run_dir / name).read_bytes() == (kept / name).read_bytes()
        # the recorded score is the kept model's validation MSE, drawn as the method draws it
        again = validation_mse(run_dir, out / "data" / f"{label}.h5", n_samples=cfg["run"]["cnf_samples"],
                               sampler=None, seed=selection["candidates"][selection["chosen"]]["seed"], device="cpu")
        assert again == pytest.approx(scores[selection["chosen"]], rel=1e-6)
        # the kept model's cost is that of every candidate
        seconds, steps = training_time(run_dir)
        assert steps == sum(training_time(candidate_dir(run_dir, j))[1] for j in (0, 1))
        assert seconds >= sum(training_time(candidate_dir(run_dir, j))[0] for j in (0, 1))
    # the CVAE is not in best_of_methods: trained once
    assert not (out / "runs" / "cvae_2a_40dB" / "seed0.candidates").exists()
    assert not (out / "runs" / "cvae_2a_40dB" / "seed0" / SELECTION_FILE).exists()
    report = (out / "report.md").read_text()
    assert "Best of 2 (run.best_of, for cnf)" in report
    assert "| cvae on 2a_40dB | " in report and " of 0.0" in report


def test_a_choice_interrupted_while_copying_is_made_again_from_the_same_candidates(best_of_run, capsys):
    out = best_of_run
    run_dir = out / "runs" / "cnf_2a_40dB" / "seed0"
    kept = (run_dir / "model.safetensors").read_bytes()
    trained = {p: p.stat().st_mtime_ns for p in run_dir.parent.glob("seed0.candidates/c*/model.safetensors")}
    selection = (run_dir / SELECTION_FILE).read_text()
    for name in ("done", SELECTION_FILE, "model.safetensors"):   # as a kill during the copy leaves it
        (run_dir / name).unlink()
    capsys.readouterr()
    assert main(["run", "--out", str(out), *BASE]) == 0
    log = capsys.readouterr().err
    assert "train cnf on 2a_40dB, seed 0" in log and "[reuse] train cnf on 4a_40dB, seed 0" in log
    assert {p: p.stat().st_mtime_ns for p in trained} == trained   # no candidate trained again
    assert (run_dir / "model.safetensors").read_bytes() == kept
    assert json.loads((run_dir / SELECTION_FILE).read_text())["chosen"] == json.loads(selection)["chosen"]


@pytest.mark.parametrize("override, message", [
    ("run.best_of=0", "run.best_of must be an integer >= 1"),
    ('run.best_of_methods=["nope"]', "run.best_of_methods: .*nope"),
    ('run.best_of_methods=["gn"]', "name no trained method"),
    ('run.best_of_methods=["csd"]', "name no trained method"),   # not in run.methods below
])
def test_bad_best_of_settings_are_refused_before_any_file(tmp_path, override, message):
    cfg = load_config("smoke", ['run.methods=["gn", "cnf"]', override])
    with pytest.raises(ValueError, match=message):
        Experiment(cfg, tmp_path / "x")
    assert not (tmp_path / "x").exists()
