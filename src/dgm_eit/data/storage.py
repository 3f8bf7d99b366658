"""The data-set file (HDF5, format_version 1) and the resumable ``.partial`` file behind it.

Layout of a finished file (docs/DESIGN.md)::

    /                attrs: config (JSON of the resolved config), format_version = 1,
                            dgm_eit_version, complete = True, seed
    /train, /val, /test
        sigma    (N, H, W) float32   ground truth on the pixel grid, 0 outside the disk
        v        (N, M)    float32   noisy voltages
        v_clean  (N, M)    float32   noiseless voltages
        gn       (N, H, W) float32   Gauss-Newton image on the same grid
        gn_extra (N, K, H, W) float32   only where the simulator makes them: the classical image
                                        at K other settings (extra input channels of a model)

``sigma`` is gzip-compressed per image (piecewise constant: about 50x smaller); the other
arrays are stored plainly (noise does not compress).

While a simulation runs, its arrays live in ``FILE.partial``: the same groups, every
array allocated at full size up front, ``complete = False``, plus ``/_done/<split>``, one
byte per chunk of samples, set only after that chunk's data has been written, flushed
and synced. Once allocated, writing a chunk touches raw data only, never HDF5 metadata,
so a process killed at any moment leaves a file that opens and whose finished chunks are
intact. When every chunk is done, :func:`finalise` writes the finished file from the
partial one in a fixed order (a uniquely named temporary file, then ``os.replace``), so the result is
byte-identical however often the run was interrupted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np

from dgm_eit import __version__
from dgm_eit.errors import InputError
from dgm_eit.files import temp_sibling

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
SPLIT_INDEX = {split: k for k, split in enumerate(SPLITS)}
ARRAY_KEYS = ("sigma", "v", "v_clean", "gn")
EXTRA_KEY = "gn_extra"           # the one array a data set may lack
IMAGE_KEYS = ("sigma", "gn")
DONE_GROUP = "_done"


class FileLockedError(InputError):
    """HDF5 refused to open a file another process holds open for writing."""


def sample_rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """The generator of one sample: a pure function of ``(seed, split, index)``, so a data set
    does not depend on which process made which sample, or in which order. ``stream`` > 0: an
    independent generator of the same sample, for draws that must not move the others."""
    entropy = [int(seed), SPLIT_INDEX[split], int(index)]
    return np.random.default_rng(entropy + [int(stream)] if stream else entropy)


def stack_chunk(samples: list[dict], seed: int, split: str, start: int) -> dict[str, np.ndarray]:
    """Samples ``start, start + 1, ...`` of a split -> one chunk of :data:`ARRAY_KEYS` arrays, and
    ``gn_extra`` where the samples have it (float32); a value that is not finite names its sample
    instead of entering the file."""
    for index, sample in enumerate(samples, start):
        for key, value in sample.items():
            if not np.all(np.isfinite(value)):
                raise RuntimeError(f"sample {split}[{index}] (seed {seed}): {key} is not finite")
    keys = ARRAY_KEYS + ((EXTRA_KEY,) if samples and EXTRA_KEY in samples[0] else ())
    return {key: np.stack([s[key] for s in samples]).astype(np.float32) for key in keys}


def _keys(group: h5py.Group) -> tuple[str, ...]:
    """The arrays a split of this file holds."""
    return ARRAY_KEYS + ((EXTRA_KEY,) if EXTRA_KEY in group else ())


def _open_h5(path: Path, mode: str = "r") -> h5py.File:
    try:
        return h5py.File(path, mode)
    except FileNotFoundError:
        raise
    except BlockingIOError:
        raise FileLockedError(f"{path} is open for writing in another process (another dgm-eit simulate "
                              "running on the same output?)") from None
    except OSError as err:
        raise InputError(f"{path} is not a readable HDF5 file (truncated or corrupt?): {err}") from None


def _validate(f: h5py.File, path: Path, require_complete: bool = True) -> None:
    attrs = f.attrs
    if "format_version" not in attrs or "config" not in attrs:
        raise InputError(f"{path} is not a dgm-eit data set (no format_version/config attributes)")
    version = int(attrs["format_version"])
    if version != FORMAT_VERSION:
        raise InputError(f"{path} has format_version {version}; this dgm-eit reads version {FORMAT_VERSION}")
    if require_complete and not bool(attrs.get("complete", False)):
        raise InputError(f"{path} is incomplete (the simulation was interrupted); "
                         "re-run the same dgm-eit simulate command to finish it")
    try:
        json.loads(attrs["config"])
    except (TypeError, ValueError):
        raise InputError(f"{path}: the config attribute is not valid JSON") from None
    shapes = {}
    for split in SPLITS:
        if split not in f:
            raise InputError(f"{path} has no {split!r} group")
        group = f[split]
        for key in ARRAY_KEYS:
            if key not in group or not isinstance(group[key], h5py.Dataset):
                raise InputError(f"{path}: group {split!r} has no {key!r} array")
            if group[key].ndim < 2:   # a scalar or a flat vector has no samples to index
                raise InputError(f"{path}: {split}/{key} has shape {group[key].shape}, expected "
                                 + ("(N, H, H)" if key in IMAGE_KEYS else "(N, M)"))
            if group[key].dtype.kind not in "fiu":
                raise InputError(f"{path}: {split}/{key} holds {group[key].dtype} values, expected real numbers")
        n = {group[key].shape[0] for key in ARRAY_KEYS}
        if len(n) != 1:
            raise InputError(f"{path}: arrays of {split!r} disagree on the number of samples: "
                             + ", ".join(f"{k} {group[k].shape}" for k in ARRAY_KEYS))
        for key in IMAGE_KEYS:
            if group[key].ndim != 3 or group[key].shape[1] != group[key].shape[2]:
                raise InputError(f"{path}: {split}/{key} has shape {group[key].shape}, expected (N, H, H)")
        for key in ("v", "v_clean"):
            if group[key].ndim != 2:
                raise InputError(f"{path}: {split}/{key} has shape {group[key].shape}, expected (N, M)")
        if EXTRA_KEY in group:
            extra, (n_images, *image) = group[EXTRA_KEY], group["gn"].shape
            if (not isinstance(extra, h5py.Dataset) or extra.ndim != 4 or extra.shape[0] != n_images
                    or list(extra.shape[2:]) != image):
                raise InputError(f"{path}: {split}/{EXTRA_KEY} has shape {getattr(extra, 'shape', None)}, "
                                 f"expected (N, K, H, H) with the gn images' N, H, H {(n_images, *image)}")
        shapes[split] = (group["sigma"].shape[1:], group["v"].shape[1])
    if len(set(shapes.values())) != 1:
        raise InputError(f"{path}: splits disagree on image size or number of measurements: {shapes}")


def open_dataset(path: str | Path) -> h5py.File:
    """Open a finished data set read-only, or raise :class:`InputError` naming what is wrong."""
    path = Path(path)
    if not path.exists():
        partial = partial_path(path)
        hint = (f"; an unfinished simulation is in {partial}: re-run the same dgm-eit simulate command"
                if partial.exists() else "; make one with dgm-eit simulate")
        raise InputError(f"data set {path} does not exist{hint}")
    if path.is_dir():
        raise InputError(f"data set {path} is a directory, not an HDF5 file")
    f = _open_h5(path)
    try:
        _validate(f, path)
    except Exception:
        f.close()
        raise
    return f


def dataset_config(path: str | Path) -> dict:
    """The resolved config the data set was simulated with."""
    with open_dataset(path) as f:
        return json.loads(f.attrs["config"])


def dataset_gn_settings(path: str | Path) -> dict:
    """How the data set's GN images were made: method, weight, iterations, mesh, and the
    validation tuning table (:func:`dgm_eit.recon.tuning.gn_settings`); {} for older files."""
    with open_dataset(path) as f:
        return json.loads(f.attrs["gn_settings"]) if "gn_settings" in f.attrs else {}


def dataset_seed(path: str | Path) -> int | None:
    with open_dataset(path) as f:
        return int(f.attrs["seed"]) if "seed" in f.attrs else None


def _check_split_keys(split: str, keys: Iterable[str]) -> tuple[str, ...]:
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    keys, known = tuple(keys), ARRAY_KEYS + (EXTRA_KEY,)
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise InputError(f"unknown data-set array(s) {unknown}; choose from {', '.join(known)}")
    return keys


def read_split(path: str | Path, split: str, keys: Sequence[str] = ("sigma", "v", "gn"),
               indices: Sequence[int] | slice | None = None) -> dict[str, np.ndarray]:
    """Arrays of one split as float32 numpy arrays (optionally a slice / sorted indices)."""
    keys = _check_split_keys(split, keys)
    with open_dataset(path) as f:
        group = f[split]
        if EXTRA_KEY in keys and EXTRA_KEY not in group:
            raise InputError(f"{path} has no {EXTRA_KEY} images: it was simulated without extra classical "
                             "images (linear.extra_images)")
        n = group["v"].shape[0]
        if indices is None:
            selection = slice(None)
        elif isinstance(indices, slice):
            selection = indices
        else:
            selection = np.asarray(indices, dtype=np.int64)
            if selection.size and (selection.min() < 0 or selection.max() >= n):
                raise InputError(f"index out of range for split {split!r} with {n} samples")
            # h5py fancy indexing needs increasing indices; keep the caller's order
            order = np.argsort(selection, kind="stable")
            unique, inverse = np.unique(selection[order], return_inverse=True)
            out = {}
            for k in keys:
                rows = group[k][unique] if unique.size else np.zeros((0,) + group[k].shape[1:], np.float32)
                restored = np.empty((len(selection),) + rows.shape[1:], dtype=np.float32)
                restored[order] = rows[inverse]
                out[k] = restored
            return out
        return {k: np.asarray(group[k][selection], dtype=np.float32) for k in keys}


def split_sizes(path: str | Path) -> dict[str, int]:
    with open_dataset(path) as f:
        return {s: int(f[s]["v"].shape[0]) for s in SPLITS}


def partial_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".partial")


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PartialFile:
    """The ``.partial`` file of a running simulation (see the module docstring).

    ``identity`` is the JSON that decides whether an existing partial file belongs to the
    same simulation (config sections that change the data, seed, sizes); ``chunk_size``
    is fixed when the file is created and read back on resume.
    """

    def __init__(self, path: Path, f: h5py.File):
        self.path = path
        self.f = f
        self.chunk_size = int(f.attrs["chunk_size"])
        self.sizes = {s: int(f[s]["v"].shape[0]) for s in SPLITS}

    @classmethod
    def create(cls, path: Path, *, config_json: str, identity: str, seed: int, sizes: dict[str, int],
               image_size: int, n_meas: int, chunk_size: int, gn_settings: str = "{}",
               extra_images: int = 0) -> "PartialFile":
        if chunk_size < 1:
            raise InputError(f"chunk size must be >= 1, got {chunk_size}")
        # built under another name and renamed once flushed, so an existing .partial file
        # always has its full structure even if this process is killed while creating it
        building = temp_sibling(path, "new")   # unique: never another writer's file
        f = h5py.File(building, "w")
        try:
            f.attrs["config"] = config_json
            f.attrs["identity"] = identity
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["dgm_eit_version"] = __version__
            f.attrs["complete"] = False
            f.attrs["seed"] = seed
            f.attrs["chunk_size"] = chunk_size
            f.attrs["gn_settings"] = gn_settings
            done = f.create_group(DONE_GROUP)
            for split in SPLITS:
                n = int(sizes[split])
                group = f.create_group(split)
                shapes = {"sigma": (n, image_size, image_size), "gn": (n, image_size, image_size),
                          "v": (n, n_meas), "v_clean": (n, n_meas)}
                if extra_images:
                    shapes[EXTRA_KEY] = (n, int(extra_images), image_size, image_size)
                for key in shapes:
                    _create_preallocated(group, key, shapes[key], np.float32, np.nan)
                _create_preallocated(done, split, (n_chunks(n, chunk_size),), np.uint8, 0)
        except BaseException:
            f.close()
            building.unlink(missing_ok=True)
            raise
        f.close()
        _sync(building)
        os.replace(building, path)
        return cls.open(path)

    @classmethod
    def open(cls, path: Path) -> "PartialFile":
        f = _open_h5(path, "r+")
        try:
            _validate(f, path, require_complete=False)
            for key in ("identity", "chunk_size", "seed"):
                if key not in f.attrs:
                    raise InputError(f"{path} is not a dgm-eit partial file (no {key!r} attribute)")
            if DONE_GROUP not in f:
                raise InputError(f"{path} is not a dgm-eit partial file (no record of finished chunks)")
        except Exception:
            f.close()
            raise
        return cls(path, f)

    @property
    def identity(self) -> str:
        return str(self.f.attrs["identity"])

    @property
    def has_finished_chunk(self) -> bool:
        """Whether any chunk is done: a file without one holds no work to lose."""
        return any(self.done(split).any() for split in SPLITS)

    @property
    def gn_settings(self) -> dict:
        """How this file's GN images are made (:func:`dgm_eit.recon.tuning.gn_settings`)."""
        return json.loads(self.f.attrs["gn_settings"]) if "gn_settings" in self.f.attrs else {}

    @property
    def version(self) -> str:
        """The dgm-eit version that started the file: chunks of two versions must not mix."""
        return str(self.f.attrs["dgm_eit_version"])

    def done(self, split: str) -> np.ndarray:
        return self.f[DONE_GROUP][split][()].astype(bool)

    def chunk_bounds(self, split: str, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_size
        return start, min(start + self.chunk_size, self.sizes[split])

    def pending(self) -> list[tuple[str, int, int, int]]:
        """``(split, chunk, start, stop)`` of every unfinished chunk, in file order."""
        out = []
        for split in SPLITS:
            for chunk in np.flatnonzero(~self.done(split)):
                out.append((split, int(chunk), *self.chunk_bounds(split, int(chunk))))
        return out

    def write_chunk(self, split: str, chunk: int, arrays: dict[str, np.ndarray]) -> None:
        start, stop = self.chunk_bounds(split, chunk)
        group = self.f[split]
        if set(arrays) != set(_keys(group)):
            raise ValueError(f"chunk {split}[{start}:{stop}] has arrays {sorted(arrays)}, the file {sorted(_keys(group))}")
        for key in _keys(group):
            values = np.asarray(arrays[key], dtype=np.float32)
            if values.shape != (stop - start,) + group[key].shape[1:]:
                raise ValueError(f"chunk {split}[{start}:{stop}] {key} has shape {values.shape}")
            group[key][start:stop] = values
        # the data must be on disk before the record says so
        self.f.flush()
        _sync(self.path)
        self.f[DONE_GROUP][split][chunk] = 1
        self.f.flush()

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()


def n_chunks(n: int, chunk_size: int) -> int:
    return -(-int(n) // int(chunk_size))


def _create_preallocated(group: h5py.Group, name: str, shape, dtype, fill) -> h5py.Dataset:
    """Contiguous dataset whose storage exists from the start, so later writes are raw-data only."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC)
    dcpl.set_fill_value(np.array(fill, dtype=dtype))
    return group.create_dataset(name, shape=shape, dtype=dtype, dcpl=dcpl, track_times=False)


def finalise(partial: PartialFile, out: Path, *, block: int = 512) -> None:
    """Write the finished data set ``out`` from a fully done partial file, atomically."""
    for split in SPLITS:
        if not partial.done(split).all():
            raise RuntimeError(f"cannot finalise {partial.path}: split {split!r} has unfinished chunks")
    src = partial.f
    tmp = temp_sibling(out)   # unique: a second writer can never rename this half-written file
    try:
        _write_finished(src, tmp, partial.path, block)
        _sync(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _write_finished(src: h5py.File, tmp: Path, partial_path: Path, block: int) -> None:
    with h5py.File(tmp, "w", track_order=False) as dst:
        # complete stays False until every array is in, in case this write is killed too
        dst.attrs["config"] = src.attrs["config"]
        dst.attrs["format_version"] = FORMAT_VERSION
        dst.attrs["dgm_eit_version"] = src.attrs["dgm_eit_version"]
        dst.attrs["seed"] = src.attrs["seed"]
        if "gn_settings" in src.attrs:
            dst.attrs["gn_settings"] = src.attrs["gn_settings"]
        dst.attrs["complete"] = False
        for split in SPLITS:
            sgroup, dgroup = src[split], dst.create_group(split)
            for key in _keys(sgroup):
                data = sgroup[key]
                n = data.shape[0]
                if key == "sigma" and n > 0:
                    target = dgroup.create_dataset(key, shape=data.shape, dtype=np.float32,
                                                   chunks=(1,) + data.shape[1:], compression="gzip",
                                                   compression_opts=4, shuffle=True, track_times=False)
                else:
                    target = dgroup.create_dataset(key, shape=data.shape, dtype=np.float32, track_times=False)
                for start in range(0, n, block):
                    stop = min(start + block, n)
                    values = data[start:stop]
                    if np.isnan(values).any():
                        raise RuntimeError(f"{partial_path}: {split}/{key}[{start}:{stop}] has unwritten samples")
                    target[start:stop] = values
        dst.attrs["complete"] = True


def read_attrs(path: str | Path) -> dict:
    """Root attributes of any dgm-eit HDF5 file (finished or partial), for messages."""
    with _open_h5(Path(path)) as f:
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
