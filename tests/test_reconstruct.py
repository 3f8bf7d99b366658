import h5py
import numpy as np
import pytest
import torch

from dgm_eit.cli import main
from dgm_eit.config import load_config
from dgm_eit.errors import InputError
from dgm_eit.models.cvae import CVAE
from dgm_eit.reconstruct import gn_images, reconstruct_split, reconstruct_voltages
from dgm_eit.runs import load_run
from dgm_eit.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import write_tiny_dataset

    root = tmp_path_factory.mktemp("recon")
    data = write_tiny_dataset(root / "tiny.h5")
    cfg = load_config("smoke", ["train.threads=1"])
    train("cvae", data, root / "run", cfg, seed=0, progress=False)
    return data, root / "run"


def test_split_reconstruction_file(trained, tmp_path):
    data, run = trained
    out = tmp_path / "recon.h5"
    assert main(["reconstruct", "--run", str(run), "--data", str(data), "--split", "test",
                 "--out", str(out), "--seed", "4", "--batch-size", "3"]) == 0
    with h5py.File(out, "r") as f, h5py.File(data, "r") as d:
        recon = f["recon"][...]
        assert recon.shape == d["test/sigma"].shape and recon.dtype == np.float32
        assert "recon_std" not in f
        assert f.attrs["method"] == "cvae" and f.attrs["split"] == "test" and f.attrs["seed"] == 4
        assert f.attrs["nfe"] == 1 and f.attrs["seconds_per_image"] > 0
        assert f.attrs["data"].endswith("tiny.h5")
    assert not list(tmp_path.glob("*.tmp*"))
    # the same images as the model itself, up to float rounding of other batch sizes
    model, _, _ = load_run(run)
    with h5py.File(data, "r") as d:
        v = torch.from_numpy(d["test/v"][...])
    direct = model.reconstruct({"v": v})["recon"].numpy()
    np.testing.assert_allclose(recon, direct, rtol=1e-5, atol=1e-6)
    again = reconstruct_split(run, data, "test", seed=4, batch_size=3)
    np.testing.assert_array_equal(again["recon"], recon)   # same settings, same bits


def test_user_voltages_to_npy_and_png(trained, tmp_path):
    data, run = trained
    with h5py.File(data, "r") as d:
        v = d["test/v"][:3]
    np.save(tmp_path / "one.npy", v[0])
    np.save(tmp_path / "many.npy", v)
    assert main(["reconstruct", "--run", str(run), "--voltages", str(tmp_path / "one.npy"),
                 "--out", str(tmp_path / "one_out.npy")]) == 0
    assert np.load(tmp_path / "one_out.npy").shape == (16, 16)
    assert main(["reconstruct", "--run", str(run), "--voltages", str(tmp_path / "many.npy"),
                 "--out", str(tmp_path / "many_out.npy")]) == 0
    many = np.load(tmp_path / "many_out.npy")
    assert many.shape == (3, 16, 16)
    np.testing.assert_allclose(many[0], np.load(tmp_path / "one_out.npy"), rtol=1e-5, atol=1e-6)
    assert main(["reconstruct", "--run", str(run), "--voltages", str(tmp_path / "many.npy"),
                 "--out", str(tmp_path / "many.png")]) == 0
    assert (tmp_path / "many.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wrong_voltage_length_is_a_clear_error(trained, tmp_path, capsys):
    _, run = trained
    np.save(tmp_path / "short.npy", np.ones(100))
    assert main(["reconstruct", "--run", str(run), "--voltages", str(tmp_path / "short.npy"),
                 "--out", str(tmp_path / "x.npy")]) == 2
    assert "trained on 208 measurements" in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()
    np.save(tmp_path / "cube.npy", np.ones((2, 2, 208)))
    with pytest.raises(InputError, match=r"expected \(M,\) or \(N, M\)"):
        from dgm_eit.reconstruct import load_voltages
        load_voltages(tmp_path / "cube.npy")


def test_missing_run_is_a_clear_error(trained, tmp_path, capsys):
    data, _ = trained
    assert main(["reconstruct", "--run", str(tmp_path / "nope"), "--data", str(data),
                 "--out", str(tmp_path / "r.h5")]) == 2
    assert "run directory" in capsys.readouterr().err


def test_models_needing_gn_get_it_for_user_voltages(trained, monkeypatch):
    """A model that declares needs_gn receives a Gauss-Newton image computed on the run's mesh."""
    _, run = trained
    seen = {}

    def spy(self, batch, *, n_samples=1, generator=None, **opts):
        seen.update(batch=batch, opts=opts)
        return {"recon": batch["gn"], "nfe": 0}

    monkeypatch.setattr(CVAE, "needs_gn", True)
    monkeypatch.setattr(CVAE, "reconstruct", spy)
    cfg = load_config("smoke")
    from dgm_eit.physics import ForwardModel, disk_mesh, make_protocol

    m = cfg["mesh"]
    mesh = disk_mesh(n_electrodes=m["n_electrodes"], h0=m["h0"], electrode_model=m["electrode_model"],
                     electrode_width=m["electrode_width"])
    fm = ForwardModel(mesh, make_protocol(m["protocol"], n_electrodes=m["n_electrodes"]),
                      electrode_model=m["electrode_model"], contact_impedance=m["contact_impedance"])
    v_background = np.asarray(fm.forward(np.ones(fm.n_elements)))
    out = reconstruct_voltages(run, v_background, sampler="pc", device="cpu")
    assert seen["opts"]["sampler"] == "pc"
    assert seen["opts"]["config"]["mesh"] == load_run(run)[1]["mesh"]   # the run's config reaches the model
    assert seen["batch"]["gn"].shape == (1, 16, 16)
    inside = out["recon"][0] > 0
    # homogeneous data: the GN image is the background conductivity inside the disk
    assert inside.sum() > 100
    np.testing.assert_allclose(out["recon"][0][inside], 1.0, atol=0.05)
    assert gn_images(load_run(run)[1], v_background[None], 16).shape == (1, 16, 16)
