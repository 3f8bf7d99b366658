import json

import h5py
import numpy as np
import pytest

from dgm_eit.cli import main
from dgm_eit.data.storage import read_split
from dgm_eit.errors import InputError
from dgm_eit.metrics import evaluate
from dgm_eit.results import evaluate_file


def test_npy_and_hdf5_predictions_score_like_the_arrays(tiny_dataset, tmp_path):
    arrays = read_split(tiny_dataset, "test", keys=("sigma", "gn"))
    npy = tmp_path / "gn.npy"
    np.save(npy, arrays["gn"])
    h5 = tmp_path / "gn.h5"
    with h5py.File(h5, "w") as f:
        f["recon"] = arrays["gn"]
    expected = evaluate(arrays["gn"], arrays["sigma"])
    for path in (npy, h5):
        summaries, values = evaluate_file(path, tiny_dataset, "test")
        assert summaries == expected
        assert values["MSE"].shape == (len(arrays["sigma"]),)


def test_cli_prints_a_table_and_json(tiny_dataset, tmp_path, capsys):
    arrays = read_split(tiny_dataset, "val", keys=("sigma", "gn"))
    np.save(tmp_path / "mine.npy", arrays["gn"])
    assert main(["evaluate", "--pred", str(tmp_path / "mine.npy"), "--data", str(tiny_dataset),
                 "--split", "val", "--name", "My method"]) == 0
    out = capsys.readouterr().out
    assert "| Method | MSE | PSNR | SSIM | RE | AE | DR |" in out
    assert "| My method |" in out

    assert main(["evaluate", "--pred", str(tmp_path / "mine.npy"), "--data", str(tiny_dataset),
                 "--split", "val", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = evaluate(arrays["gn"], arrays["sigma"])
    assert report["name"] == "mine" and report["n"] == len(arrays["sigma"])
    assert report["metrics"]["SSIM"]["mean"] == pytest.approx(expected["SSIM"].mean)


def test_mismatches_give_one_clear_error(tiny_dataset, tmp_path, capsys):
    arrays = read_split(tiny_dataset, "test", keys=("sigma",))
    n, h, _ = arrays["sigma"].shape
    np.save(tmp_path / "short.npy", arrays["sigma"][: n - 1])
    with pytest.raises(InputError, match=f"holds {n - 1} images but the 'test' split"):
        evaluate_file(tmp_path / "short.npy", tiny_dataset, "test")
    np.save(tmp_path / "small.npy", arrays["sigma"][:, : h - 2, : h - 2])
    with pytest.raises(InputError, match=f"{h - 2}x{h - 2} images but .* has {h}x{h}"):
        evaluate_file(tmp_path / "small.npy", tiny_dataset, "test")
    with h5py.File(tmp_path / "norecon.h5", "w") as f:
        f["images"] = arrays["sigma"]
    with pytest.raises(InputError, match="no 'recon' array .*images"):
        evaluate_file(tmp_path / "norecon.h5", tiny_dataset, "test")
    bad = arrays["sigma"].copy()
    bad[2, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(InputError, match="NaN .*sample 2"):
        evaluate_file(tmp_path / "nan.npy", tiny_dataset, "test")

    assert main(["evaluate", "--pred", str(tmp_path / "short.npy"), "--data", str(tiny_dataset)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dgm-eit evaluate: error:")
    assert main(["evaluate", "--pred", str(tmp_path / "missing.npy"), "--data", str(tiny_dataset)]) == 2
    assert "does not exist" in capsys.readouterr().err
