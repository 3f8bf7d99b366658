import json

import numpy as np
import pytest

from dgm_eit.cli import main
from dgm_eit.config import STUDY_PROFILES, ConfigError, apply_overrides, check_int, flatten, load_config
from dgm_eit.errors import InputError


def test_profiles_share_one_key_set():
    keys = {name: set(flatten(load_config(name))) for name in STUDY_PROFILES}
    for name in STUDY_PROFILES:
        assert keys[name] == keys["smoke"], f"profile {name} differs: {keys[name] ^ keys['smoke']}"


def test_override_parses_json_and_keeps_types():
    cfg = load_config("smoke", ["data.n_train=7", "data.snr_db=25", "mesh.protocol=opposite"])
    assert cfg["data"]["n_train"] == 7
    assert cfg["data"]["snr_db"] == 25.0 and isinstance(cfg["data"]["snr_db"], float)
    assert cfg["mesh"]["protocol"] == "opposite"


def test_unknown_key_is_refused_with_a_hint():
    with pytest.raises(ConfigError, match=r"unknown config key 'data.n_trian'.*data.n_train"):
        load_config("smoke", ["data.n_trian=3"])


def test_wrong_type_is_refused():
    with pytest.raises(ConfigError, match="expects an integer"):
        apply_overrides(load_config("smoke"), ["data.n_train=1.5"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(load_config("smoke"), ["data.n_train"])


def test_check_int_takes_integers_and_names_the_key():
    assert check_int(3, "run.seeds", 1) == 3
    assert type(check_int(np.int64(4), "phantom.count_max", 1)) is int   # numbers drawn by numpy
    for bad in (True, 2.0, "2", 0, None):
        with pytest.raises(InputError, match=r"run\.seeds must be an integer >= 1 \(training runs\), got"):
            check_int(bad, "run.seeds", 1, "training runs")


def test_unknown_profile_is_refused():
    with pytest.raises(ConfigError, match="unknown profile"):
        load_config("huge")


def test_user_file_extends_a_profile(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('extends = "smoke"\n[data]\nn_train = 5\n')
    cfg = load_config(str(path))
    assert cfg["data"]["n_train"] == 5
    assert cfg["data"]["n_val"] == load_config("smoke")["data"]["n_val"]
    path.write_text('extends = "smoke"\n[data]\nbogus = 5\n')
    with pytest.raises(ConfigError, match="mine.toml: unknown config key 'data.bogus'"):
        load_config(str(path))


def test_config_survives_json_round_trip():
    cfg = load_config("quick", ["data.n_test=3"])
    assert json.loads(json.dumps(cfg)) == cfg


def test_cli_without_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: dgm-eit" in capsys.readouterr().out
