"""Issue 21: the Guarantees on the KTC side (``dgm-eit ktc``, ``dgm-eit ktc-score``).

Numbered as the issue's findings. Every input the user hands these commands that cannot be
right is refused (exit 2, one stderr line naming the file and the problem, nothing written)
or, where an image can still be made, warned about in one line naming the file; nothing the
user owns is overwritten. The entry point runs on a study directory holding only the
linearised step's settings (``methods.json``), on the small test meshes: seconds per call.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import scipy.io as sio

from dgm_eit.cli import main
from dgm_eit.datasets import ktc2023 as ktc
from dgm_eit.ktc.tank import public_dir
from test_cli import fails
from test_ktc_study import small_cfg


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("DGM_EIT_DEBUG", raising=False)


def _files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _study(directory, methods: list[str], chosen: list[str]):
    """A study directory as ``dgm-eit run --profile ktc`` leaves it once ``chosen`` are chosen."""
    directory.mkdir()
    cfg = small_cfg(f"run.methods={json.dumps(methods)}")
    (directory / "run.json").write_text(json.dumps({"seed": 0, "config": cfg}))
    settings = {"low": 0.5, "high": 1.5, "score": 0.5, "resistive": 0.5, "conductive": 0.5}
    (directory / "methods.json").write_text(json.dumps({m: settings for m in chosen}))
    return directory


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return _study(tmp_path_factory.mktemp("ktc_study") / "study", ["linear"], ["linear"])


def _frame(n: int) -> dict:
    return {k: v for k, v in sio.loadmat(public_dir() / f"data{n}.mat").items() if not k.startswith("__")}


@pytest.fixture
def inputs(tmp_path):
    """INPUT_DIR with ref.mat and two targets, data1.mat and data2.mat."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("ref.mat", "data1.mat", "data2.mat"):
        shutil.copy(public_dir() / name, folder / name)
    return folder


def _ktc(inputs, out, study, *extra) -> list:
    return ["ktc", inputs, out, "1", "--run", study, "--method", "linear", "--device", "cpu", *extra]


def _run(argv) -> int:
    return main([str(a) for a in argv])


# ---------------------------------------------------------------------------------
# 2. nothing the user owns is overwritten

def test_2_ktc_never_overwrites_a_file_it_did_not_write(study, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    truth = out / "1.mat"
    sio.savemat(truth, {"truth": np.zeros((256, 256), np.uint8)})
    before = truth.read_bytes()
    fails(capsys, _ktc(inputs, out, study), str(truth), "--overwrite")
    assert truth.read_bytes() == before and _files(out) == ["1.mat"]
    # --overwrite replaces it; a reconstruction of its own is replaced as a re-run does
    assert _run(_ktc(inputs, out, study, "--overwrite")) == 0
    assert set(sio.loadmat(truth)) - {"__header__", "__version__", "__globals__"} == {"reconstruction"}
    assert _run(_ktc(inputs, out, study)) == 0
    assert _files(out) == ["1.mat", "2.mat"]


def test_2_ktc_refuses_output_dir_equal_to_input_dir(study, inputs, tmp_path, capsys):
    before = _files(inputs)
    link = tmp_path / "link"
    link.symlink_to(inputs)
    for out in (inputs, inputs / ".", link):
        fails(capsys, _ktc(inputs, out, study, "--overwrite"), "OUTPUT_DIR", "INPUT_DIR")
    assert _files(inputs) == before


def test_2_ktc_refuses_an_output_dir_in_the_study_it_reads(study, inputs, capsys, monkeypatch):
    """The study is an input too: <n>.mat must not land among its files (a run directory's
    own submissions, a packed folder, the study shipped inside the installed package)."""
    before = _files(study)
    for out in (study, study / "submissions" / "linear"):
        fails(capsys, _ktc(inputs, out, study, "--overwrite"), "OUTPUT_DIR", str(study))
    assert _files(study) == before and not (study / "submissions").exists()
    # without --run: the shipped study's folder (the tiny study stands in for it, so that nothing
    # could be written into the package; it is no packed bundle, so its manifest check is skipped)
    from dgm_eit.ktc import bundle

    monkeypatch.setattr(bundle, "shipped_dir", lambda: study)
    monkeypatch.setattr(bundle, "check_bundle", lambda *args: None)
    fails(capsys, ["ktc", inputs, study / "o", "1", "--method", "linear"], "OUTPUT_DIR", str(study))
    assert _files(study) == before


# ---------------------------------------------------------------------------------
# 3. target numbers: ASCII digits, one file per number, odd names block nothing

def test_3_one_number_written_two_ways_is_refused_naming_both_files(study, inputs, tmp_path, capsys):
    shutil.copy(inputs / "data2.mat", inputs / "data01.mat")
    fails(capsys, _ktc(inputs, tmp_path / "out", study), "data1.mat", "data01.mat")
    assert not (tmp_path / "out").exists()


def test_3_the_file_the_user_named_is_read(study, inputs, tmp_path):
    """data01.mat is target 1 and is read as itself, never as a data1.mat that does not exist."""
    (inputs / "data1.mat").unlink()
    shutil.move(inputs / "data2.mat", inputs / "data01.mat")
    assert _run(_ktc(inputs, tmp_path / "padded", study)) == 0
    plain = tmp_path / "plain_in"
    plain.mkdir()
    shutil.copy(inputs / "ref.mat", plain / "ref.mat")
    shutil.copy(inputs / "data01.mat", plain / "data1.mat")
    assert _run(_ktc(plain, tmp_path / "plain", study)) == 0
    assert _files(tmp_path / "padded") == ["1.mat"]
    assert (tmp_path / "padded" / "1.mat").read_bytes() == (tmp_path / "plain" / "1.mat").read_bytes()


def test_3_names_with_other_digits_are_ignored_with_one_warning_each(study, inputs, tmp_path):
    odd = ["data\u0663.mat", "data\u00b2.mat"]      # an Arabic-Indic three, a superscript two
    for name in odd:
        shutil.copy(inputs / "data1.mat", inputs / name)
    with pytest.warns(UserWarning) as record:
        assert _run(_ktc(inputs, tmp_path / "out", study)) == 0
    messages = [str(w.message) for w in record if "ignored" in str(w.message)]
    assert len(messages) == 2 and all(any(name in m for m in messages) for name in odd), messages
    assert _files(tmp_path / "out") == ["1.mat", "2.mat"]


def test_3_ktc_score_refuses_one_target_written_two_ways(tmp_path, capsys):
    truths = tmp_path / "truth"
    truths.mkdir()
    shutil.copy(public_dir() / "true1.mat", truths / "true1.mat")
    shutil.copy(public_dir() / "true2.mat", truths / "true01.mat")
    pred = tmp_path / "pred"
    pred.mkdir()
    sio.savemat(pred / "1.mat", {"reconstruction": ktc.load_truth(public_dir() / "true1.mat")})
    fails(capsys, ["ktc-score", "--pred", pred, "--truth", truths], "true1.mat", "true01.mat")
    (truths / "true1.mat").unlink()
    for name in ("1.mat", "01.mat"):
        sio.savemat(pred / name, {"reconstruction": ktc.load_truth(public_dir() / "true2.mat")})
    fails(capsys, ["ktc-score", "--pred", pred, "--truth", truths], "1.mat", "01.mat")


def test_3_ktc_score_ignores_odd_digits_with_a_warning(tmp_path, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    sio.savemat(pred / "1.mat", {"reconstruction": ktc.load_truth(public_dir() / "true1.mat")})
    sio.savemat(pred / "\u00b2.mat", {"reconstruction": ktc.load_truth(public_dir() / "true2.mat")})
    with pytest.warns(UserWarning) as record:
        assert main(["ktc-score", "--pred", str(pred), "--truth", str(public_dir()), "--json"]) == 0
    assert any("\u00b2.mat" in str(w.message) and "ignored" in str(w.message) for w in record)
    scores = {r["target"]: r["score"] for r in json.loads(capsys.readouterr().out)["targets"]}
    assert scores[1] == pytest.approx(1.0) and scores[2] == 0.0


# ---------------------------------------------------------------------------------
# 4. an unfinished study is refused, naming what is missing

def test_4_ktc_refuses_a_study_without_the_settings_of_all_its_methods(inputs, tmp_path, capsys):
    unfinished = _study(tmp_path / "unfinished", ["linear", "gn", "cnf"], ["linear"])
    fails(capsys, ["ktc", inputs, tmp_path / "out", "1", "--run", unfinished], str(unfinished), "gn, cnf", "re-run")
    fails(capsys, _ktc(inputs, tmp_path / "out", unfinished), "gn, cnf")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------
# 5. nonsense voltages: refused, or warned about with the factor

def _replace_frame(inputs, **changes):
    frame = _frame(1)
    frame.update(changes)
    sio.savemat(inputs / "data1.mat", frame)
    return inputs / "data1.mat"


REFUSED = {
    "zeros": (lambda f: {"Uel": np.zeros_like(f["Uel"])}, ["all zeros"]),
    "sign-flipped": (lambda f: {"Uel": -f["Uel"]}, ["sign-flipped"]),
    "complex": (lambda f: {"Uel": f["Uel"] * (1 + 1j)}, ["Uel", "complex"]),
    "Inj all NaN": (lambda f: {"Inj": np.full_like(f["Inj"], np.nan)}, ["Inj", "NaN"]),
    "Inj of another protocol": (lambda f: {"Inj": np.roll(f["Inj"], 1, axis=1)}, ["Inj", "ref.mat"]),
    "Mpat of another protocol": (lambda f: {"Mpat": -f["Mpat"]}, ["Mpat", "ref.mat"]),
    "Uel all NaN": (lambda f: {"Uel": np.full_like(f["Uel"], np.nan)}, ["Uel", "NaN"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_5_nonsense_voltages_are_refused_naming_the_file(study, inputs, tmp_path, capsys, case):
    change, words = REFUSED[case]
    path = _replace_frame(inputs, **change(_frame(1)))
    fails(capsys, _ktc(inputs, tmp_path / "out", study), str(path), *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("uel,factor", [(lambda u: u * 1e30, 1e30), (lambda u: (u * 1000).astype(np.int32), 1e3)])
def test_5_voltages_far_from_the_reference_warn_with_the_factor(study, inputs, tmp_path, uel, factor):
    path = _replace_frame(inputs, Uel=uel(_frame(1)["Uel"]))
    with pytest.warns(UserWarning) as record:
        assert _run(_ktc(inputs, tmp_path / "out", study)) == 0
    messages = [str(w.message) for w in record if str(path) in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in record]
    named = float(messages[0].split(" x the size of")[0].rsplit(" ", 1)[-1])
    assert factor / 2 < named < factor * 2, messages[0]


def test_5_the_public_targets_pass_without_a_warning(study, tmp_path, recwarn):
    assert _run(["ktc", public_dir(), tmp_path / "out", "7", "--run", study, "--method", "linear"]) == 0
    assert [str(w.message) for w in recwarn if ".mat" in str(w.message)] == []
    assert _files(tmp_path / "out") == ["1.mat", "2.mat", "3.mat", "4.mat"]


# ---------------------------------------------------------------------------------
# 6. the entry point never reads truth files

def test_6_a_stray_truth_file_in_input_dir_is_not_read(study, inputs, tmp_path):
    sio.savemat(inputs / "true1.mat", {"truth": np.full((256, 256), 7, np.uint8)})
    assert _run(_ktc(inputs, tmp_path / "out", study)) == 0
    assert _files(tmp_path / "out") == ["1.mat", "2.mat"]


# ---------------------------------------------------------------------------------
# 7. ktc-score validates predictions as it does truths

def _truth(n=1):
    return ktc.load_truth(public_dir() / f"true{n}.mat")


BAD_PREDICTIONS = {
    "NaN where the truth is water": (lambda t: np.where(t == 0, np.nan, t), ["NaN"]),
    "values 0, 3, 6": (lambda t: 3.0 * t, ["classes", "3"]),
    "negated": (lambda t: -1.0 * t, ["classes", "-1"]),
    "all NaN": (lambda t: np.full(t.shape, np.nan), ["NaN"]),
    "all infinite": (lambda t: np.full(t.shape, np.inf), ["infinite"]),
    "complex": (lambda t: t * (1 + 1j), ["complex"]),
}


@pytest.mark.parametrize("case", list(BAD_PREDICTIONS))
def test_7_ktc_score_refuses_a_prediction_that_is_not_a_class_map(tmp_path, capsys, case):
    change, words = BAD_PREDICTIONS[case]
    pred = tmp_path / "pred"
    pred.mkdir()
    sio.savemat(pred / "1.mat", {"reconstruction": change(_truth(1))})
    fails(capsys, ["ktc-score", "--pred", pred, "--truth", public_dir()], str(pred / "1.mat"), *words)


def test_7_a_wrongly_shaped_prediction_scores_0_with_a_warning(tmp_path, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    sio.savemat(pred / "1.mat", {"reconstruction": _truth(1)[::2, ::2]})
    for n in (2, 3, 4):
        sio.savemat(pred / f"{n}.mat", {"reconstruction": _truth(n)})
    capsys.readouterr()
    with pytest.warns(UserWarning) as record:
        assert main(["ktc-score", "--pred", str(pred), "--truth", str(public_dir()), "--json"]) == 0
    assert [str(w.message) for w in record if "scores 0" in str(w.message) and str(pred / "1.mat") in str(w.message)]
    scores = {r["target"]: r["score"] for r in json.loads(capsys.readouterr().out)["targets"]}
    assert scores == {1: 0.0, 2: pytest.approx(1.0), 3: pytest.approx(1.0), 4: pytest.approx(1.0)}


def test_7_ktc_score_help_says_what_scores_0():
    from dgm_eit.cli import build_parser
    from test_cli import _subparser

    text = " ".join(_subparser(build_parser(), ["ktc-score"]).format_help().split())
    assert "missing or wrongly shaped" in text and "scores 0" in text


# ---------------------------------------------------------------------------------
# 8. submissions are byte-identical: a fixed .mat header

def test_8_a_submission_is_the_same_bytes_whenever_it_is_written(tmp_path, monkeypatch):
    import time

    from dgm_eit.ktc.study import write_submission

    classes = _truth(1)[None]
    written = []
    for when in ("Mon Jul 31 20:45:04 2023", "Tue Aug  1 09:00:00 2023"):
        monkeypatch.setattr(time, "asctime", lambda *a, when=when: when)
        write_submission(tmp_path / when[:3], [1], classes)
        written.append((tmp_path / when[:3] / "1.mat").read_bytes())
    assert written[0] == written[1]
    assert np.array_equal(ktc.load_reconstruction(tmp_path / "Mon" / "1.mat"), classes[0])
    assert sio.loadmat(tmp_path / "Mon" / "1.mat")["reconstruction"].dtype == np.uint8


# ---------------------------------------------------------------------------------
# 11. messages that name the file and speak the command line

def test_11_all_nan_reference_names_the_file(study, inputs, tmp_path, capsys):
    ref = {k: v for k, v in sio.loadmat(inputs / "ref.mat").items() if not k.startswith("__")}
    ref["Uelref"] = np.full_like(ref["Uelref"], np.nan)
    sio.savemat(inputs / "ref.mat", ref)
    fails(capsys, _ktc(inputs, tmp_path / "out", study), str(inputs / "ref.mat"), "Uelref", "NaN")


def test_11_a_swapped_reference_is_named_in_command_line_terms(study, inputs, tmp_path, capsys):
    shutil.copy(inputs / "data1.mat", inputs / "ref.mat")
    line = fails(capsys, _ktc(inputs, tmp_path / "out", study), str(inputs / "ref.mat"), "Uelref", "data<n>.mat")
    assert "load_" not in line
