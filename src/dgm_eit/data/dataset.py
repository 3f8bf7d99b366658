"""A lazy PyTorch ``Dataset`` over one split of a data-set file.

The HDF5 file is opened on first access in each process and never pickled: a
``DataLoader`` worker (fork or spawn) gets a copy without a handle and opens its own, since
an h5py handle shared across a fork is not safe to read from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dgm_eit.data import storage


class EITDataset(torch.utils.data.Dataset):
    """Samples of ``split`` as dicts of float32 tensors: ``sigma``/``gn`` (H,W), ``v``/``v_clean`` (M,)."""

    def __init__(self, path: str | Path, split: str, keys: Sequence[str] = ("sigma", "v", "gn")):
        self.path = Path(path)
        self.split = split
        self.keys = storage._check_split_keys(split, keys)
        # validate once up front so a bad file fails here, not inside a worker
        with storage.open_dataset(self.path) as f:
            group = f[split]
            self._len = int(group["v"].shape[0])
            self.image_size = int(group["sigma"].shape[-1])
            self.n_meas = int(group["v"].shape[-1])
        self._file = None
        self._pid = None

    def __len__(self) -> int:
        return self._len

    def _group(self):
        if self._file is None or self._pid != os.getpid():
            self._file = storage.open_dataset(self.path)
            self._pid = os.getpid()
        return self._file[self.split]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for split {self.split!r} with {self._len} samples")
        group = self._group()
        return {k: torch.from_numpy(np.asarray(group[k][index], dtype=np.float32)) for k in self.keys}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        return state

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
