"""The paper's own variants beside the profile's choices, end to end on the smoke profile: the
voltage-input CVAE (``cvae-v``) trains a model of its own, plain CSD* (``csd-plain``) samples the
shared prior with the plain sampler, and the report puts the paper's numbers beside them only."""

import csv
import json
import re

import pytest

from dgm_eit.cli import main
from dgm_eit.config import load_config
from dgm_eit.paper import paper_mse_change, settings_for
from dgm_eit.report import format_percent
from dgm_eit.results import recon_attrs

# the smoke profile's own CVAE reads the voltages; reading the GN image here makes "cvae" one of
# ours and "cvae-v" the only paper CVAE, as in the quick profile
BASE = ["--profile", "smoke", "--seed", "0", "--set", "train.progress=false", "--set", 'run.tests=["T1"]',
        "--set", 'cvae.condition="gn"']
VARIANTS = 'run.methods=["gn", "cvae", "cvae-v", "csd", "csd-plain"]'
OURS = 'run.methods=["gn", "cvae", "csd"]'


@pytest.fixture(scope="module")
def variant_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("variants") / "run"
    assert main(["run", "--out", str(out), *BASE, "--set", VARIANTS]) == 0
    return out


def _table(report: str, title: str) -> list[str]:
    """The rows of the results table under the heading ``title`` (header first)."""
    lines = report.split(f"### {title}")[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Method |"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return [line for line in lines[start:end] if line.startswith("| ")]


def test_the_variants_train_and_sample_as_the_paper_did(variant_run):
    out = variant_run
    for spec in ("2a_40dB", "4a_40dB"):
        own = json.loads((out / "runs" / f"cvae-v_{spec}" / "seed0" / "config.json").read_text())
        ours = json.loads((out / "runs" / f"cvae_{spec}" / "seed0" / "config.json").read_text())
        assert (own["model"], own["config"]["cvae"]["condition"]) == ("cvae", "v")
        assert ours["config"]["cvae"]["condition"] == "gn"
        plain = recon_attrs(out / "recon" / f"csd-plain_{spec}_on_{spec}_seed0.h5")
        dds = recon_attrs(out / "recon" / f"csd_{spec}_on_{spec}_seed0.h5")
        assert (plain["sampler"], plain["mode"], dds["sampler"]) == ("csd", "replace", "dds")
        assert plain["run"] == dds["run"]   # one score prior serves both: no second training
        # plain CSD*'s t0 was chosen on validation from the profile's grid, like csd's
        assert plain["t0"] in load_config("smoke")["run"]["csd_tune_t0"]
    assert not (out / "runs" / "score-plain_2a_40dB").exists()
    stages = json.loads((out / "stages.json").read_text())
    assert sorted(k for k in stages if k.startswith("train score")) == ["train score on 2a_40dB, seed 0",
                                                                        "train score on 4a_40dB, seed 0"]


def test_the_paper_column_stands_only_beside_the_faithful_rows(variant_run):
    out = variant_run
    report = (out / "report.md").read_text()
    for setting in settings_for(load_config("smoke", ['run.tests=["T1"]'])):
        rows = {re.match(r"\| ([^|]+?) \|", line).group(1): line.rstrip(" |").split(" | ")[-1]
                for line in _table(report, setting.title)[1:]}
        paper = {name: format_percent(paper_mse_change(setting.paper_table, row))
                 for name, row in (("CVAE-v (paper)", "CVAE"), ("CSD* plain (paper)", "CSD*"))}
        assert rows == {"GN": "-", "CVAE": "-", "CSD*": "-", **paper}
        assert all(v != "-" for v in paper.values())
        assert "shown only beside the rows that run the paper's algorithm: CVAE-v (paper), CSD* plain (paper)" \
            in report.split(f"### {setting.title}")[1]
    with open(out / "metrics.csv", newline="") as f:
        methods = {r["method"] for r in csv.DictReader(f)}
    assert {"CVAE-v (paper)", "CSD* plain (paper)"} <= methods
    assert "| CVAE-v (paper) | 2a_40dB | 1 |" in report and "| CSD* plain (paper) | 4a_40dB | 1 |" in report
    assert "## Names" in report and "**CSD\\* plain (paper)** (`csd-plain`)" in report
    # each recon file of a variant has its remake command, naming its own run directory and sampler
    assert "--run runs/cvae-v_2a_40dB/seed0" in (out / "remake.sh").read_text()
    assert re.search(r"--run runs/score_2a_40dB/seed0 .*--sampler csd", (out / "remake.sh").read_text())


def test_without_a_faithful_row_the_papers_numbers_are_not_shown(variant_run):
    """run.methods may change between calls: the same directory reports ours alone."""
    out = variant_run
    assert main(["run", "--out", str(out), *BASE, "--set", OURS]) == 0
    report = (out / "report.md").read_text()
    assert "paper MSE vs GN |" not in report
    assert report.count("are not comparable with these rows and are not shown") == 2
    assert "Paper (Table 1, mean" not in report


def test_a_second_seed_adds_the_variants_seed_and_their_ensembles(variant_run):
    out = variant_run
    assert main(["run", "--out", str(out), *BASE, "--set", VARIANTS, "--seeds", "2"]) == 0
    assert (out / "runs" / "cvae-v_4a_40dB" / "seed1" / "model.safetensors").is_file()
    assert (out / "recon" / "csd-plain-ens_2a_40dB_on_2a_40dB.h5").is_file()
    report = (out / "report.md").read_text()
    rows = {re.match(r"\| ([^|]+?) \|", line).group(1): line.rstrip(" |").split(" | ")[-1]
            for line in _table(report, "T1: 2 anomalies, 40 dB")[1:]}
    # the paper ran one model per method: its numbers are no ensemble's
    assert rows["CVAE-v (paper) ens"] == rows["CSD* plain (paper) ens"] == "-" != rows["CVAE-v (paper)"]
    assert "| cvae-v on 2a_40dB |" in report   # the training seeds table names the variant's runs
