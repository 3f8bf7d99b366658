import hashlib
import json

import h5py
import numpy as np
import pytest

from dgm_eit.data import storage
from dgm_eit.errors import InputError


def test_read_split_and_config(tiny_dataset):
    data = storage.read_split(tiny_dataset, "train")
    assert set(data) == {"sigma", "v", "gn"}
    assert data["sigma"].shape == (24, 16, 16) and data["sigma"].dtype == np.float32
    assert data["v"].shape == (24, 208)
    assert storage.dataset_config(tiny_dataset)["data"]["image_size"] == 16
    picked = storage.read_split(tiny_dataset, "val", ("v",), indices=[5, 1, 5])
    full = storage.read_split(tiny_dataset, "val", ("v",))
    np.testing.assert_array_equal(picked["v"], full["v"][[5, 1, 5]])
    with pytest.raises(InputError, match="unknown split 'dev'"):
        storage.read_split(tiny_dataset, "dev")
    with pytest.raises(InputError, match="unknown data-set array"):
        storage.read_split(tiny_dataset, "train", ("sigma", "volts"))
    with pytest.raises(InputError, match="out of range"):
        storage.read_split(tiny_dataset, "val", ("v",), indices=[8])


def _edit(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


@pytest.mark.parametrize("damage,match", [
    (lambda f: f.attrs.__setitem__("complete", False), "incomplete"),
    (lambda f: f.attrs.__setitem__("format_version", 7), "format_version 7"),
    (lambda f: f.__delitem__("test"), "no 'test' group"),
    (lambda f: f["val"].__delitem__("gn"), "no 'gn' array"),
    (lambda f: f.attrs.__delitem__("config"), "not a dgm-eit data set"),
])
def test_damaged_files_are_named(tiny_dataset, damage, match):
    _edit(tiny_dataset, damage)
    with pytest.raises(InputError, match=match):
        storage.open_dataset(tiny_dataset)


def test_truncated_and_missing_files(tiny_dataset, tmp_path):
    cut = tmp_path / "cut.h5"
    cut.write_bytes(tiny_dataset.read_bytes()[:4000])
    with pytest.raises(InputError, match="truncated or corrupt"):
        storage.read_split(cut, "train")
    with pytest.raises(InputError, match="does not exist; make one"):
        storage.open_dataset(tmp_path / "none.h5")
    storage.partial_path(tmp_path / "half.h5").write_bytes(b"")
    with pytest.raises(InputError, match="unfinished simulation"):
        storage.open_dataset(tmp_path / "half.h5")


def _chunk(split, start, stop, size=4, n_meas=6):
    idx = np.arange(start, stop, dtype=np.float32)[:, None]
    base = idx + {"train": 0, "val": 100, "test": 200}[split]
    return {"sigma": np.broadcast_to(base[:, :, None], (stop - start, size, size)) + 0.5,
            "gn": np.broadcast_to(base[:, :, None], (stop - start, size, size)) + 0.25,
            "v": np.broadcast_to(base, (stop - start, n_meas)) + 0.1,
            "v_clean": np.broadcast_to(base, (stop - start, n_meas)) * 1.0}


def _make_partial(path, sizes):
    return storage.PartialFile.create(path, config_json=json.dumps({"data": {"image_size": 4}}), identity="abc",
                                      seed=5, sizes=sizes, image_size=4, n_meas=6, chunk_size=3)


def test_partial_file_resumes_and_finalises_identically(tmp_path):
    sizes = {"train": 7, "val": 3, "test": 0}
    # one run writes chunks in order, another in reverse with a reopen in between
    outputs = []
    for order, name in ((1, "a"), (-1, "b")):
        part = _make_partial(tmp_path / f"{name}.h5.partial", sizes)
        tasks = part.pending()[::order]
        assert [(t[0], t[2], t[3]) for t in sorted(tasks)] == [("train", 0, 3), ("train", 3, 6), ("train", 6, 7),
                                                               ("val", 0, 3)]
        for split, chunk, start, stop in tasks[:2]:
            part.write_chunk(split, chunk, _chunk(split, start, stop))
        part.close()
        part = storage.PartialFile.open(tmp_path / f"{name}.h5.partial")
        assert part.identity == "abc" and part.chunk_size == 3
        assert len(part.pending()) == 2
        with pytest.raises(RuntimeError, match="unfinished chunks"):
            storage.finalise(part, tmp_path / f"{name}.h5")
        for split, chunk, start, stop in part.pending():
            part.write_chunk(split, chunk, _chunk(split, start, stop))
        storage.finalise(part, tmp_path / f"{name}.h5")
        part.close()
        outputs.append(tmp_path / f"{name}.h5")
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in outputs}
    assert len(digests) == 1
    data = storage.read_split(outputs[0], "train", storage.ARRAY_KEYS)
    np.testing.assert_array_equal(data["v"][:, 0], np.arange(7, dtype=np.float32) + np.float32(0.1))
    assert storage.read_split(outputs[0], "test", ("sigma",))["sigma"].shape == (0, 4, 4)
    assert not list(tmp_path.glob("*.tmp-*"))   # no temporary file of finalise is left


def test_partial_file_is_not_a_data_set(tmp_path):
    part = _make_partial(tmp_path / "x.h5.partial", {"train": 3, "val": 3, "test": 3})
    part.close()
    with pytest.raises(InputError, match="incomplete"):
        storage.open_dataset(tmp_path / "x.h5.partial")


def test_extra_images_are_stored_where_the_simulator_makes_them_and_their_absence_is_named(tmp_path, tiny_dataset):
    sizes = {"train": 4, "val": 2, "test": 0}
    part = storage.PartialFile.create(tmp_path / "x.h5.partial", config_json="{}", identity="x", seed=0, sizes=sizes,
                                      image_size=4, n_meas=6, chunk_size=3, extra_images=2)
    with_extra = []
    for split, chunk, start, stop in part.pending():
        arrays = _chunk(split, start, stop)
        with pytest.raises(ValueError, match="has arrays"):   # a chunk without them does not fit this file
            part.write_chunk(split, chunk, arrays)
        arrays["gn_extra"] = np.stack([arrays["gn"] + 1, arrays["gn"] + 2], axis=1)
        part.write_chunk(split, chunk, arrays)
        with_extra.append((split, start, arrays["gn_extra"]))
    storage.finalise(part, tmp_path / "x.h5")
    part.close()
    for split, start, extra in with_extra:
        got = storage.read_split(tmp_path / "x.h5", split, ("gn", "gn_extra"))
        np.testing.assert_array_equal(got["gn_extra"][start:start + len(extra)], extra)
    assert got["gn_extra"].shape == (2, 2, 4, 4)
    # the chunks the simulators stack carry them where their samples have them
    sample = {k: a[0] for k, a in _chunk("train", 0, 1).items()}
    assert "gn_extra" not in storage.stack_chunk([sample], 0, "train", 0)
    stacked = storage.stack_chunk([{**sample, "gn_extra": np.zeros((2, 4, 4))}], 0, "train", 0)
    assert stacked["gn_extra"].shape == (1, 2, 4, 4)
    with pytest.raises(InputError, match="has no gn_extra images: it was simulated without"):
        storage.read_split(tiny_dataset, "train", ("gn_extra",))

    def damage(f):
        del f["val"]["gn_extra"]
        f["val"].create_dataset("gn_extra", data=np.zeros((2, 2, 3, 3), np.float32))
    _edit(tmp_path / "x.h5", damage)
    with pytest.raises(InputError, match=r"val/gn_extra has shape \(2, 2, 3, 3\), expected \(N, K, H, H\)"):
        storage.open_dataset(tmp_path / "x.h5")
